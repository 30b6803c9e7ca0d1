//! The C ABI of ferrocomm: `libferrocomm.so`, `libferrocomm.a` and `include/ferrocomm.h`.
//!
//! A thin layer over the Rust API: every function checks its arguments, looks up its
//! handles, calls the Rust function and translates the result. Nothing else happens here.
//!
//! - Every exported function runs inside a panic boundary ([`error::boundary`]): a panic
//!   becomes `FERROCOMM_ERR_PANIC`, never an unwind into C.
//! - Errors are a fixed `#[repr(u32)]` code ([`ferrocomm_result`]) plus a thread-local
//!   message with the full text of the Rust error (`ferrocomm_last_error`).
//! - Enumerations (data types, operations, flags) are taken as plain integers and
//!   validated; pointers are checked for NULL, buffers for size and alignment.
//! - Handles are numbers in a registry, never pointers to freed memory, so double frees
//!   and stale or wrong-kind handles are recognised ([`handle`]).
//!
//! The header is generated from this crate by cbindgen (pinned in `Cargo.toml`) with
//! `cbindgen.toml`; `tests/header.rs` checks that the committed header is up to date and
//! rewrites it with `FERROCOMM_BLESS=1`. Doc comments here are the header's comments.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

mod collective;
mod comm;
mod error;
mod ext_store;
mod handle;
mod p2p;
mod reducer;
mod request;
mod sampler;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_coll;
#[cfg(test)]
mod tests_ddp;
mod types;

pub use collective::*;
pub use comm::*;
pub use error::{ferrocomm_last_error, ferrocomm_result, ferrocomm_strerror};
pub use ext_store::*;
pub use p2p::*;
pub use reducer::*;
pub use request::*;
pub use sampler::*;
pub use types::{
    ferrocomm_dtype, ferrocomm_dtype_code, ferrocomm_op, ferrocomm_op_code, ferrocomm_status_t,
};

use error::boundary;

/// The library's version as a static NUL-terminated string, e.g. "0.1.0". Never NULL; do
/// not free. Thread safe, does not block.
#[unsafe(no_mangle)]
pub extern "C" fn ferrocomm_version() -> *const std::ffi::c_char {
    static VERSION: &std::ffi::CStr = {
        match std::ffi::CStr::from_bytes_with_nul(
            concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes(),
        ) {
            Ok(v) => v,
            Err(_) => c"unknown",
        }
    };
    VERSION.as_ptr()
}

/// Stores the size in bytes of one element of data type `dtype` (a `ferrocomm_dtype`) in
/// `*size`. Thread safe, does not block.
///
/// Errors: `INVALID_ARGUMENT` (unknown `dtype`, `size` NULL).
///
/// # Safety
/// `size` must be NULL or valid for writing one `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_dtype_size(
    dtype: ferrocomm_dtype,
    size: *mut usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_dtype_size";
    boundary(OP, || {
        types::out_ptr(OP, "size", size)?;
        let d = types::dtype(OP, dtype)?;
        // SAFETY: checked non-null; valid for writes by the caller's contract.
        unsafe { types::put(size, d.size()) };
        Ok(())
    })
}
