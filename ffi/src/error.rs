//! Result codes, the thread-local last error message, and the panic boundary.
//!
//! Every exported function runs its body through [`boundary`]: a Rust error becomes a
//! [`ferrocomm_result`] code plus a message kept per thread for
//! [`ferrocomm_last_error`], and a panic is caught (it must never unwind into C) and becomes
//! [`ferrocomm_result::FERROCOMM_ERR_PANIC`].

use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use ferrocomm_rs::Error;

/// What a ferrocomm function returns: `FERROCOMM_OK` (0) or the kind of failure. The codes
/// are fixed: new codes may be added at the end, existing ones never change meaning.
/// `ferrocomm_last_error()` gives the full message of the most recent failure on the
/// calling thread.
///
/// What survives a failure (argument errors change nothing; fatal errors fail every
/// communicator of the world, sticky) is stated in the header's copy of this enumeration,
/// declared by hand in `cbindgen.toml` (a `uint32_t` typedef in C, an enum in C++); the
/// values here and there are checked equal by `types::tests`.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ferrocomm_result {
    /// Success.
    FERROCOMM_OK = 0,
    /// An argument was refused: a null pointer, a buffer too small or misaligned for its
    /// data type, a rank out of range, an unknown data type, operation or flag. Nothing was
    /// sent or changed.
    FERROCOMM_ERR_INVALID_ARGUMENT = 1,
    /// A handle is null, was already freed (or waited for), or is of the wrong kind (a
    /// request where a communicator is expected). Nothing was changed.
    FERROCOMM_ERR_INVALID_HANDLE = 2,
    /// Another thread is inside a call on the same communicator. A communicator is used by
    /// one thread at a time; give each thread its own with `ferrocomm_comm_dup`.
    FERROCOMM_ERR_BUSY = 3,
    /// A setting (environment variable, init URL) is malformed or out of range.
    FERROCOMM_ERR_CONFIG = 4,
    /// An operation waited longer than its timeout (`FERROCOMM_TIMEOUT` for init,
    /// `FERROCOMM_OP_TIMEOUT` for operations).
    FERROCOMM_ERR_TIMEOUT = 5,
    /// A peer's process died or its connection closed while an operation needed it.
    FERROCOMM_ERR_PEER_LOST = 6,
    /// A peer (or a stranger) broke the protocol.
    FERROCOMM_ERR_PEER_MISBEHAVED = 7,
    /// The rendezvous store belongs to another job (other job id or world size).
    FERROCOMM_ERR_JOB_MISMATCH = 8,
    /// Ranks called different collectives (or the same with different arguments).
    FERROCOMM_ERR_COLLECTIVE_MISMATCH = 9,
    /// An operating-system call failed.
    FERROCOMM_ERR_IO = 10,
    /// The communicator was aborted (`ferrocomm_comm_abort` or a fatal error).
    FERROCOMM_ERR_ABORTED = 11,
    /// A bug in ferrocomm: a Rust panic was caught at the library boundary. The message
    /// says where; please report it. Free the communicator involved.
    FERROCOMM_ERR_PANIC = 12,
    /// An error this version of the C ABI has no code for (a newer Rust error kind).
    FERROCOMM_ERR_INTERNAL = 13,
}

use ferrocomm_result::*;

impl ferrocomm_result {
    /// Every code, in order.
    pub(crate) const ALL: [ferrocomm_result; 14] = [
        FERROCOMM_OK,
        FERROCOMM_ERR_INVALID_ARGUMENT,
        FERROCOMM_ERR_INVALID_HANDLE,
        FERROCOMM_ERR_BUSY,
        FERROCOMM_ERR_CONFIG,
        FERROCOMM_ERR_TIMEOUT,
        FERROCOMM_ERR_PEER_LOST,
        FERROCOMM_ERR_PEER_MISBEHAVED,
        FERROCOMM_ERR_JOB_MISMATCH,
        FERROCOMM_ERR_COLLECTIVE_MISMATCH,
        FERROCOMM_ERR_IO,
        FERROCOMM_ERR_ABORTED,
        FERROCOMM_ERR_PANIC,
        FERROCOMM_ERR_INTERNAL,
    ];

    /// The code's short description, NUL-terminated for C.
    fn describe(self) -> &'static std::ffi::CStr {
        match self {
            FERROCOMM_OK => c"success",
            FERROCOMM_ERR_INVALID_ARGUMENT => c"invalid argument",
            FERROCOMM_ERR_INVALID_HANDLE => c"invalid handle (null, freed, or of another kind)",
            FERROCOMM_ERR_BUSY => c"communicator in use by another thread",
            FERROCOMM_ERR_CONFIG => c"bad configuration",
            FERROCOMM_ERR_TIMEOUT => c"timed out",
            FERROCOMM_ERR_PEER_LOST => c"lost a peer",
            FERROCOMM_ERR_PEER_MISBEHAVED => c"protocol violation by a peer",
            FERROCOMM_ERR_JOB_MISMATCH => c"job mismatch at the rendezvous store",
            FERROCOMM_ERR_COLLECTIVE_MISMATCH => c"collective mismatch between ranks",
            FERROCOMM_ERR_IO => c"operating-system error",
            FERROCOMM_ERR_ABORTED => c"aborted",
            FERROCOMM_ERR_PANIC => c"internal error (caught panic)",
            FERROCOMM_ERR_INTERNAL => c"internal error (unknown error kind)",
        }
    }
}

/// Why an exported function failed, before it becomes a code and a message.
#[derive(Debug)]
pub(crate) enum Fail {
    /// An error of the Rust API (argument errors are made as `Error::InvalidArgument` too).
    Rust(Error),
    /// A null, stale or wrong-kind handle.
    Handle(String),
    /// The communicator is in use by another thread.
    Busy(String),
    /// A failure already turned into a code, with its message (e.g. with context added).
    Coded(ferrocomm_result, String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Rust(e)
    }
}

impl Fail {
    /// An `InvalidArgument` error of the C function `op`.
    pub(crate) fn invalid(op: &str, arg: &str, why: impl Into<String>) -> Fail {
        Fail::Rust(Error::invalid(op, arg, why))
    }

    /// The code this failure is reported as.
    pub(crate) fn code(&self) -> ferrocomm_result {
        match self {
            Fail::Handle(_) => FERROCOMM_ERR_INVALID_HANDLE,
            Fail::Busy(_) => FERROCOMM_ERR_BUSY,
            Fail::Coded(c, _) => *c,
            Fail::Rust(e) => code_of(e),
        }
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Rust(e) => write!(f, "{e}"),
            Fail::Handle(m) | Fail::Busy(m) | Fail::Coded(_, m) => f.write_str(m),
        }
    }
}

/// The code of a Rust error.
pub(crate) fn code_of(e: &Error) -> ferrocomm_result {
    match e {
        Error::InvalidArgument { .. } => FERROCOMM_ERR_INVALID_ARGUMENT,
        Error::Config { .. } => FERROCOMM_ERR_CONFIG,
        Error::Timeout { .. } => FERROCOMM_ERR_TIMEOUT,
        Error::PeerLost { .. } => FERROCOMM_ERR_PEER_LOST,
        Error::PeerMisbehaved { .. } => FERROCOMM_ERR_PEER_MISBEHAVED,
        Error::JobMismatch { .. } => FERROCOMM_ERR_JOB_MISMATCH,
        Error::CollectiveMismatch { .. } => FERROCOMM_ERR_COLLECTIVE_MISMATCH,
        Error::Io { .. } => FERROCOMM_ERR_IO,
        Error::Aborted(_) => FERROCOMM_ERR_ABORTED,
        _ => FERROCOMM_ERR_INTERNAL,
    }
}

thread_local! {
    /// The message of the most recent failure on this thread (empty: none yet).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Stores `msg` as this thread's last error (interior NULs become spaces).
pub(crate) fn set_last_error(msg: String) {
    let mut bytes = msg.into_bytes();
    for b in bytes.iter_mut().filter(|b| **b == 0) {
        *b = b' ';
    }
    let c = CString::new(bytes).unwrap_or_default();
    // During thread teardown the slot may be gone; the code still reports the failure.
    let _ = LAST_ERROR.try_with(|slot| *slot.borrow_mut() = c);
}

/// Runs the body of the exported function `op`: `Ok` becomes `FERROCOMM_OK`, an error its
/// code (with the message stored for `ferrocomm_last_error`), a panic `FERROCOMM_ERR_PANIC`.
pub(crate) fn boundary(op: &str, body: impl FnOnce() -> Result<(), Fail>) -> ferrocomm_result {
    // AssertUnwindSafe: after a panic nothing the body touched is used to produce a result;
    // the registry and the communicators are behind mutexes that do not poison (parking_lot)
    // or whose poisoning is ignored because every critical section leaves them consistent.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => FERROCOMM_OK,
        Ok(Err(fail)) => {
            let code = fail.code();
            set_last_error(format!("{op}: {fail}"));
            code
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_string());
            set_last_error(format!(
                "{op}: internal error, a panic was caught at the C boundary: {what}; \
                 this is a bug in ferrocomm, please report it; free the communicator involved"
            ));
            FERROCOMM_ERR_PANIC
        }
    }
}

/// The message of the most recent failed ferrocomm call on the calling thread: the full
/// text of the error, saying what happened, where (rank, peer, operation) and what to do.
/// An empty string when no call has failed on this thread yet.
///
/// Ownership: the string belongs to the library; it stays valid and unchanged until the
/// next ferrocomm call on the same thread (copy it to keep it). Never returns NULL.
///
/// Thread safety: each thread has its own last error. Does not block. Successful calls do
/// not clear it.
#[unsafe(no_mangle)]
pub extern "C" fn ferrocomm_last_error() -> *const c_char {
    static EMPTY: &std::ffi::CStr = c"";
    catch_unwind(|| {
        LAST_ERROR
            .try_with(|slot| slot.borrow().as_ptr())
            .unwrap_or(EMPTY.as_ptr())
    })
    .unwrap_or(EMPTY.as_ptr())
}

/// A short static description of a result code ("invalid argument", "timed out"...);
/// "unknown ferrocomm result code" for a value that is not a code.
///
/// Ownership: a static string; never free it. Never returns NULL. Thread safe, does not
/// block.
#[unsafe(no_mangle)]
pub extern "C" fn ferrocomm_strerror(code: u32) -> *const c_char {
    ferrocomm_result::ALL
        .iter()
        .find(|c| **c as u32 == code)
        .map_or(c"unknown ferrocomm result code".as_ptr(), |c| {
            c.describe().as_ptr()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> String {
        // SAFETY: ferrocomm_last_error returns a valid NUL-terminated string.
        unsafe { CStr::from_ptr(ferrocomm_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn codes_are_fixed_and_described() {
        for (i, c) in ferrocomm_result::ALL.iter().enumerate() {
            assert_eq!(*c as u32, i as u32, "codes are dense and in order");
            // SAFETY: static NUL-terminated string.
            let s = unsafe { CStr::from_ptr(ferrocomm_strerror(i as u32)) };
            assert!(!s.to_bytes().is_empty());
        }
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(ferrocomm_strerror(9999)) };
        assert_eq!(s.to_str().unwrap(), "unknown ferrocomm result code");
    }

    #[test]
    fn panics_become_a_code_and_a_message() {
        let code = boundary("ferrocomm_test_op", || panic!("boom {}", 42));
        assert_eq!(code, FERROCOMM_ERR_PANIC);
        let msg = last();
        assert!(
            msg.contains("ferrocomm_test_op") && msg.contains("boom 42"),
            "{msg}"
        );
        let code = boundary("ferrocomm_test_op", || std::panic::panic_any(7u8));
        assert_eq!(code, FERROCOMM_ERR_PANIC);
        assert!(last().contains("without a message"));
    }

    #[test]
    fn errors_keep_their_full_text_per_thread() {
        let code = boundary("ferrocomm_x", || {
            Err(Error::config("FERROCOMM_TIMEOUT", "soon", "seconds, a number").into())
        });
        assert_eq!(code, FERROCOMM_ERR_CONFIG);
        let msg = last();
        assert_eq!(
            msg,
            "ferrocomm_x: bad configuration FERROCOMM_TIMEOUT=\"soon\": seconds, a number"
        );
        // Another thread has its own (empty) last error; success does not clear ours.
        let other = std::thread::spawn(last).join().unwrap();
        assert_eq!(other, "");
        assert_eq!(boundary("ferrocomm_y", || Ok(())), FERROCOMM_OK);
        assert_eq!(last(), msg);
        // Interior NULs cannot truncate the message.
        boundary("ferrocomm_z", || Err(Fail::Handle("a\0b".into())));
        assert_eq!(last(), "ferrocomm_z: a b");
    }
}
