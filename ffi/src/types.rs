//! C-side types (data types, status) and the argument checks every exported function
//! shares: enums arrive as plain integers and are validated, pointers are checked for NULL,
//! buffers for size and alignment.

use std::ffi::c_void;

use ferrocomm_rs::{DType, ReduceOp, Source, Status, Tag};

use crate::error::{Fail, ferrocomm_result};

/// A data type argument as C passes it: a `uint32_t` in C (an `enum ferrocomm_dtype :
/// uint32_t` in C++) holding one of the [`ferrocomm_dtype_code`] values. Declared by hand in
/// `cbindgen.toml` (the header's `ferrocomm_dtype`); checked by [`dtype`].
#[allow(non_camel_case_types)]
pub type ferrocomm_dtype = u32;

/// A reduction operation argument as C passes it: a `uint32_t` in C (an `enum ferrocomm_op :
/// uint32_t` in C++) holding one of the [`ferrocomm_op_code`] values. Declared by hand in
/// `cbindgen.toml` (the header's `ferrocomm_op`); checked by [`reduce_op`].
#[allow(non_camel_case_types)]
pub type ferrocomm_op = u32;

/// What kind of code the high byte of a dtype or op value says it is (the values of the two
/// kinds never overlap, so a dtype passed as an op, or the reverse, is recognised).
const DTYPE_BASE: u32 = 0x100;
const OP_BASE: u32 = 0x200;

/// Element types of buffers: the values of `ferrocomm_dtype` (fixed; `0x100 + n`, disjoint
/// from the operations' `0x200 + n`, and 0 is neither). `FERROCOMM_F16` and `FERROCOMM_BF16`
/// buffers hold the 16-bit patterns (`uint16_t` in C). The header's copy (in
/// `cbindgen.toml`) is checked against this one by the tests.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ferrocomm_dtype_code {
    /// `uint8_t` (also raw bytes).
    FERROCOMM_U8 = DTYPE_BASE,
    /// `int8_t`.
    FERROCOMM_I8 = DTYPE_BASE + 1,
    /// `uint16_t`.
    FERROCOMM_U16 = DTYPE_BASE + 2,
    /// `int16_t`.
    FERROCOMM_I16 = DTYPE_BASE + 3,
    /// `uint32_t`.
    FERROCOMM_U32 = DTYPE_BASE + 4,
    /// `int32_t`.
    FERROCOMM_I32 = DTYPE_BASE + 5,
    /// `uint64_t`.
    FERROCOMM_U64 = DTYPE_BASE + 6,
    /// `int64_t`.
    FERROCOMM_I64 = DTYPE_BASE + 7,
    /// IEEE 754 binary16 (`_Float16`; stored as `uint16_t`).
    FERROCOMM_F16 = DTYPE_BASE + 8,
    /// bfloat16 (the upper half of an IEEE 754 binary32; stored as `uint16_t`).
    FERROCOMM_BF16 = DTYPE_BASE + 9,
    /// `float`.
    FERROCOMM_F32 = DTYPE_BASE + 10,
    /// `double`.
    FERROCOMM_F64 = DTYPE_BASE + 11,
}

impl ferrocomm_dtype_code {
    /// Every C data type, in code order.
    pub(crate) const ALL: [ferrocomm_dtype_code; 12] = {
        use ferrocomm_dtype_code::*;
        [
            FERROCOMM_U8,
            FERROCOMM_I8,
            FERROCOMM_U16,
            FERROCOMM_I16,
            FERROCOMM_U32,
            FERROCOMM_I32,
            FERROCOMM_U64,
            FERROCOMM_I64,
            FERROCOMM_F16,
            FERROCOMM_BF16,
            FERROCOMM_F32,
            FERROCOMM_F64,
        ]
    };

    /// The Rust element type.
    pub(crate) fn rust(self) -> DType {
        use ferrocomm_dtype_code::*;
        match self {
            FERROCOMM_U8 => DType::U8,
            FERROCOMM_I8 => DType::I8,
            FERROCOMM_U16 => DType::U16,
            FERROCOMM_I16 => DType::I16,
            FERROCOMM_U32 => DType::U32,
            FERROCOMM_I32 => DType::I32,
            FERROCOMM_U64 => DType::U64,
            FERROCOMM_I64 => DType::I64,
            FERROCOMM_F16 => DType::F16,
            FERROCOMM_BF16 => DType::BF16,
            FERROCOMM_F32 => DType::F32,
            FERROCOMM_F64 => DType::F64,
        }
    }

    fn of(code: u32) -> Option<ferrocomm_dtype_code> {
        Self::ALL.iter().copied().find(|d| *d as u32 == code)
    }
}

/// Why `code` is not a value of the kind `want` ("ferrocomm_dtype" or "ferrocomm_op"):
/// names the other kind's constant when it is one (swapped arguments).
fn not_a(code: u32, want: &str, range: &str) -> String {
    let swapped = if let Some(d) = ferrocomm_dtype_code::of(code) {
        Some(format!("{d:?}, a ferrocomm_dtype"))
    } else {
        ferrocomm_op_code::of(code).map(|o| format!("{o:?}, an operation (ferrocomm_op)"))
    };
    match swapped {
        Some(what) => format!(
            "{code} ({code:#x}) is {what}, not a {want}; are the dtype and op arguments swapped?"
        ),
        None => format!("{code} ({code:#x}) is not a {want} ({range})"),
    }
}

/// Validates a data type given as an integer.
pub(crate) fn dtype(op: &str, code: u32) -> Result<DType, Fail> {
    dtype_arg(op, "dtype", code)
}

/// Validates a data type given as an integer in the argument `arg`.
pub(crate) fn dtype_arg(op: &str, arg: &str, code: u32) -> Result<DType, Fail> {
    ferrocomm_dtype_code::of(code)
        .map(|d| d.rust())
        .ok_or_else(|| {
            Fail::invalid(
                op,
                arg,
                not_a(
                    code,
                    "ferrocomm_dtype",
                    "0x100..=0x10b, FERROCOMM_U8..FERROCOMM_F64",
                ),
            )
        })
}

/// Reduction operations of the collectives that combine values: the values of
/// `ferrocomm_op` (fixed; `0x200 + n` in NCCL's order `ncclSum` .. `ncclAvg`, disjoint from
/// the data types). The header's copy (in `cbindgen.toml`) is checked against this one by
/// the tests.
#[allow(non_camel_case_types)]
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ferrocomm_op_code {
    /// Sum (wrapping for integer types).
    FERROCOMM_SUM = OP_BASE,
    /// Product (wrapping for integer types).
    FERROCOMM_PROD = OP_BASE + 1,
    /// Maximum. Floats: IEEE 754-2019 maximum (+0.0 > -0.0; a NaN operand gives the canonical quiet NaN), so the result does not depend on the algorithm or world size.
    FERROCOMM_MAX = OP_BASE + 2,
    /// Minimum. Floats: IEEE 754-2019 minimum (-0.0 < +0.0; a NaN operand gives the canonical quiet NaN), so the result does not depend on the algorithm or world size.
    FERROCOMM_MIN = OP_BASE + 3,
    /// Sum divided by the number of ranks; floating-point types only (an integer type gives
    /// `FERROCOMM_ERR_INVALID_ARGUMENT`).
    FERROCOMM_AVG = OP_BASE + 4,
}

impl ferrocomm_op_code {
    /// Every operation, in code order.
    pub(crate) const ALL: [ferrocomm_op_code; 5] = {
        use ferrocomm_op_code::*;
        [
            FERROCOMM_SUM,
            FERROCOMM_PROD,
            FERROCOMM_MAX,
            FERROCOMM_MIN,
            FERROCOMM_AVG,
        ]
    };

    /// The Rust operation.
    pub(crate) fn rust(self) -> ReduceOp {
        use ferrocomm_op_code::*;
        match self {
            FERROCOMM_SUM => ReduceOp::Sum,
            FERROCOMM_PROD => ReduceOp::Prod,
            FERROCOMM_MAX => ReduceOp::Max,
            FERROCOMM_MIN => ReduceOp::Min,
            FERROCOMM_AVG => ReduceOp::Avg,
        }
    }

    fn of(code: u32) -> Option<ferrocomm_op_code> {
        Self::ALL.iter().copied().find(|o| *o as u32 == code)
    }
}

/// Validates an operation given as an integer, and that it applies to `dt` (avg: floating
/// point only).
pub(crate) fn reduce_op(op: &str, code: u32, dt: DType) -> Result<ReduceOp, Fail> {
    let r = ferrocomm_op_code::of(code)
        .map(|o| o.rust())
        .ok_or_else(|| {
            Fail::invalid(
                op,
                "op",
                not_a(
                    code,
                    "ferrocomm_op",
                    "0x200..=0x204, FERROCOMM_SUM..FERROCOMM_AVG",
                ),
            )
        })?;
    r.check(dt, op)?;
    Ok(r)
}

/// Runs `$body` with `$T` bound to the Rust type of the `DType` `$dt`; returns an
/// invalid-argument error of `$op` from the enclosing function for a type it does not know.
macro_rules! with_dtype {
    ($op:expr, $dt:expr, $T:ident => $body:expr) => {{
        use ferrocomm_rs::DType;
        match $dt {
            DType::U8 => {
                type $T = u8;
                $body
            }
            DType::I8 => {
                type $T = i8;
                $body
            }
            DType::U16 => {
                type $T = u16;
                $body
            }
            DType::I16 => {
                type $T = i16;
                $body
            }
            DType::U32 => {
                type $T = u32;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::U64 => {
                type $T = u64;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            other => {
                return Err(crate::error::Fail::invalid(
                    $op,
                    "dtype",
                    format!("{other} is not supported by this version of the C ABI"),
                ));
            }
        }
    }};
}
pub(crate) use with_dtype;

/// What a completed operation reports (`MPI_Status`). Filled by `ferrocomm_recv`,
/// `ferrocomm_wait`, `ferrocomm_test` and `ferrocomm_waitall`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ferrocomm_status_t {
    /// The sender's rank in the communicator (for a receive), the destination (for a send);
    /// `SIZE_MAX` for a collective.
    pub source: usize,
    /// Bytes received (or sent); for a collective, the bytes written into this rank's
    /// output buffer. Divide by the data type's size for elements.
    pub bytes: usize,
    /// The message's tag (0 for a collective).
    pub tag: u32,
    /// How this operation ended (`FERROCOMM_OK` or an error code): lets
    /// `ferrocomm_waitall` report each request.
    pub error: u32,
}

impl ferrocomm_status_t {
    pub(crate) fn ok(st: &Status) -> ferrocomm_status_t {
        ferrocomm_status_t {
            source: st.source,
            bytes: st.bytes,
            tag: st.tag,
            error: ferrocomm_result::FERROCOMM_OK as u32,
        }
    }

    pub(crate) fn failed(code: ferrocomm_result) -> ferrocomm_status_t {
        ferrocomm_status_t {
            source: usize::MAX,
            bytes: 0,
            tag: 0,
            error: code as u32,
        }
    }
}

/// `src` of a receive: a rank, or `FERROCOMM_ANY_SOURCE` (-1).
pub(crate) fn source(op: &str, src: i64) -> Result<Source, Fail> {
    match src {
        -1 => Ok(Source::Any),
        r if r >= 0 => Ok(Source::Rank(r as usize)),
        r => Err(Fail::invalid(
            op,
            "src",
            format!("{r} is neither a rank nor FERROCOMM_ANY_SOURCE (-1)"),
        )),
    }
}

/// `tag` of a receive: a tag in `0..=UINT32_MAX`, or `FERROCOMM_ANY_TAG` (-1).
pub(crate) fn tag(op: &str, tag: i64) -> Result<Tag, Fail> {
    match tag {
        -1 => Ok(Tag::Any),
        t if (0..=i64::from(u32::MAX)).contains(&t) => Ok(Tag::Value(t as u32)),
        t => Err(Fail::invalid(
            op,
            "tag",
            format!("{t} is neither a tag in 0..=4294967295 nor FERROCOMM_ANY_TAG (-1)"),
        )),
    }
}

/// The byte length of `count` elements of `dt`, refused when it overflows what a buffer can
/// be.
pub(crate) fn byte_len(op: &str, arg: &str, count: usize, dt: DType) -> Result<usize, Fail> {
    count
        .checked_mul(dt.size())
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| {
            Fail::invalid(
                op,
                arg,
                format!("{count} elements of {dt} do not fit in memory"),
            )
        })
}

pub(crate) fn check_ptr(
    op: &str,
    arg: &str,
    p: *const c_void,
    count: usize,
    dt: DType,
) -> Result<(), Fail> {
    if count > 0 && p.is_null() {
        return Err(Fail::invalid(
            op,
            arg,
            format!("NULL with a count of {count}"),
        ));
    }
    if count > 0 && !(p as usize).is_multiple_of(dt.size()) {
        return Err(Fail::invalid(
            op,
            arg,
            format!(
                "{p:p} is not aligned for {dt} (a multiple of {} bytes is needed)",
                dt.size()
            ),
        ));
    }
    Ok(())
}

/// The bytes of a send buffer of `count` elements of `dt`.
///
/// # Safety
/// When `count > 0` and `p` is not NULL, `p` must point to `count` readable elements of `dt`
/// that are not written while the returned slice is used.
pub(crate) unsafe fn in_bytes<'a>(
    op: &str,
    arg: &str,
    p: *const c_void,
    count: usize,
    dt: DType,
) -> Result<&'a [u8], Fail> {
    let len = byte_len(op, arg, count, dt)?;
    check_ptr(op, arg, p, count, dt)?;
    if len == 0 {
        return Ok(&[]);
    }
    // SAFETY: non-null, aligned, and (the caller's contract) `len` readable bytes.
    Ok(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) })
}

/// The bytes of a receive buffer of `count` elements of `dt`.
///
/// # Safety
/// When `count > 0` and `p` is not NULL, `p` must point to `count` writable elements of `dt`
/// that nothing else reads or writes while the returned slice is used.
pub(crate) unsafe fn out_bytes<'a>(
    op: &str,
    arg: &str,
    p: *mut c_void,
    count: usize,
    dt: DType,
) -> Result<&'a mut [u8], Fail> {
    let len = byte_len(op, arg, count, dt)?;
    check_ptr(op, arg, p, count, dt)?;
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: non-null, aligned, and (the caller's contract) `len` exclusive writable bytes.
    Ok(unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) })
}

/// Checks that the out-pointer `p` is not NULL.
pub(crate) fn out_ptr<T>(op: &str, arg: &str, p: *mut T) -> Result<(), Fail> {
    if p.is_null() {
        Err(Fail::invalid(op, arg, "NULL where a result must be stored"))
    } else {
        Ok(())
    }
}

/// Stores `v` through the out-pointer `p` (already checked by [`out_ptr`]); NULL is skipped.
///
/// # Safety
/// `p` must be NULL or valid for a write of `T`.
pub(crate) unsafe fn put<T>(p: *mut T, v: T) {
    if !p.is_null() {
        // SAFETY: non-null and (the caller's contract) valid for writes. `write` drops no old
        // value, which is right for the plain C types this is used with.
        unsafe { p.write(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_map_one_to_one() {
        for (i, d) in ferrocomm_dtype_code::ALL.iter().enumerate() {
            assert_eq!(*d as u32, 0x100 + i as u32);
            assert_eq!(dtype("t", *d as u32).unwrap(), d.rust());
            let name = format!("{d:?}").to_lowercase();
            assert_eq!(format!("ferrocomm_{}", d.rust().name()), name);
        }
        let mut all: Vec<_> = ferrocomm_dtype_code::ALL.iter().map(|d| d.rust()).collect();
        all.dedup();
        assert_eq!(all.len(), DType::ALL.len(), "every Rust type has a C code");
        for bad in [0, 11, 12, 0x10c, 99, u32::MAX] {
            let e = dtype("ferrocomm_send", bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{bad:#x}")) && e.contains("dtype"),
                "{e}"
            );
        }
    }

    #[test]
    fn ops_map_one_to_one() {
        for (i, o) in ferrocomm_op_code::ALL.iter().enumerate() {
            assert_eq!(*o as u32, 0x200 + i as u32);
            assert_eq!(reduce_op("t", *o as u32, DType::F32).unwrap(), o.rust());
            let name = format!("{o:?}").to_lowercase();
            assert_eq!(format!("ferrocomm_{}", o.rust().name()), name);
        }
        let mut all: Vec<_> = ferrocomm_op_code::ALL.iter().map(|o| o.rust()).collect();
        all.sort_by_key(|o| *o as u8);
        all.dedup();
        assert_eq!(
            all.len(),
            ReduceOp::ALL.len(),
            "every Rust operation has a C code"
        );
        for bad in [0, 4, 5, 0x205, 99, u32::MAX] {
            let e = reduce_op("ferrocomm_allreduce", bad, DType::F32).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("{bad} ({bad:#x}) is not a ferrocomm_op")),
                "{e}"
            );
        }
        let e = reduce_op("ferrocomm_allreduce", 0x204, DType::I32).unwrap_err();
        assert!(
            e.to_string().contains("avg is defined for floating-point"),
            "{e}"
        );
    }

    /// Swapped dtype and op arguments fail loudly, naming the argument and the swap (the
    /// two kinds' values are disjoint; before, an op value was also a valid dtype).
    #[test]
    fn swapped_dtype_and_op_are_refused() {
        use ferrocomm_dtype_code::*;
        use ferrocomm_op_code::*;
        let e = dtype("ferrocomm_allreduce", FERROCOMM_SUM as u32).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("`dtype`") && m.contains("FERROCOMM_SUM") && m.contains("swapped"),
            "{m}"
        );
        for d in ferrocomm_dtype_code::ALL {
            let m = reduce_op("ferrocomm_allreduce", d as u32, DType::F32)
                .unwrap_err()
                .to_string();
            assert!(
                m.contains("`op`") && m.contains(&format!("{d:?}")) && m.contains("swapped"),
                "{m}"
            );
        }
        for o in ferrocomm_op_code::ALL {
            assert!(dtype("t", o as u32).is_err());
        }
        assert!(reduce_op("t", FERROCOMM_F32 as u32, DType::F32).is_err());
    }

    /// The header declares these enumerations by hand (`cbindgen.toml`): every constant there
    /// has the value of the Rust enum, and every Rust value is there.
    #[test]
    fn header_constants_match_the_rust_enums() {
        let h =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/ferrocomm.h"))
                .expect("include/ferrocomm.h");
        let value = |name: &str| -> Option<u32> {
            let line = h
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{name} = ")))?;
            let v = line.split('=').nth(1)?.trim().trim_end_matches(',');
            match v.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => v.parse().ok(),
            }
        };
        let mut all: Vec<(String, u32)> = Vec::new();
        all.extend(
            ferrocomm_dtype_code::ALL
                .iter()
                .map(|d| (format!("{d:?}"), *d as u32)),
        );
        all.extend(
            ferrocomm_op_code::ALL
                .iter()
                .map(|o| (format!("{o:?}"), *o as u32)),
        );
        all.extend(
            crate::error::ferrocomm_result::ALL
                .iter()
                .map(|c| (format!("{c:?}"), *c as u32)),
        );
        for (name, v) in &all {
            assert_eq!(value(name), Some(*v), "{name} in include/ferrocomm.h");
        }
        let declared = h
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                t.starts_with("FERROCOMM_") && t.contains(" = ")
            })
            .count();
        assert_eq!(declared, all.len(), "constants the Rust enums do not have");
    }

    #[test]
    fn sources_and_tags_are_checked() {
        assert_eq!(source("t", -1).unwrap(), Source::Any);
        assert_eq!(source("t", 3).unwrap(), Source::Rank(3));
        assert!(source("t", -2).is_err());
        assert_eq!(tag("t", -1).unwrap(), Tag::Any);
        assert_eq!(tag("t", 4_294_967_295).unwrap(), Tag::Value(u32::MAX));
        assert!(tag("t", 4_294_967_296).is_err());
        assert!(tag("t", -5).is_err());
    }

    #[test]
    fn buffers_are_checked() {
        let data = [0u64; 4];
        let p = data.as_ptr().cast::<c_void>();
        // SAFETY: `data` holds 4 u64 (32 bytes).
        unsafe {
            assert_eq!(in_bytes("t", "buf", p, 4, DType::U64).unwrap().len(), 32);
            assert_eq!(in_bytes("t", "buf", p, 8, DType::F32).unwrap().len(), 32);
            assert!(in_bytes("t", "buf", std::ptr::null(), 0, DType::F64).is_ok());
            let e = in_bytes("t", "buf", std::ptr::null(), 1, DType::F64).unwrap_err();
            assert!(e.to_string().contains("NULL"), "{e}");
            let odd = p.cast::<u8>().add(1).cast::<c_void>();
            let e = in_bytes("t", "buf", odd, 1, DType::F32).unwrap_err();
            assert!(e.to_string().contains("aligned"), "{e}");
            assert!(in_bytes("t", "buf", odd, 1, DType::U8).is_ok());
            let e = in_bytes("t", "buf", p, usize::MAX / 2, DType::F64).unwrap_err();
            assert!(e.to_string().contains("do not fit"), "{e}");
        }
    }
}
