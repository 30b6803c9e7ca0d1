//! Test data whose results can be checked exactly in every element type.
//!
//! Inputs are small non-negative integers, chosen so that a sum over all ranks stays at or
//! below 120: exact in `i8`, `f16` and `bf16` alike. 127 never occurs as a result and
//! marks output not written ("poison").

use ferrocomm::element::DType;
use ferrocomm::{Element, ReduceOp};
use half::{bf16, f16};

/// An element type the benchmark can fill and check.
pub trait Val: Element + Copy {
    /// The small integer `v` (0..=127) in this type.
    fn small(v: u32) -> Self;
    /// `sum / n` as [`ReduceOp::Avg`] computes it (divided once, correctly rounded; f16 and
    /// bf16 through f32); `None` for integer types, which have no average.
    fn avg(sum: u32, n: usize) -> Option<Self>;
}

macro_rules! val_int {
    ($($t:ty),*) => {$(
        impl Val for $t {
            fn small(v: u32) -> Self {
                v as $t
            }
            fn avg(_: u32, _: usize) -> Option<Self> {
                None
            }
        }
    )*};
}
val_int!(u8, i8, u16, i16, u32, i32, u64, i64);

impl Val for f32 {
    fn small(v: u32) -> Self {
        v as f32
    }
    fn avg(sum: u32, n: usize) -> Option<Self> {
        Some(sum as f32 / n as f32)
    }
}
impl Val for f64 {
    fn small(v: u32) -> Self {
        f64::from(v)
    }
    fn avg(sum: u32, n: usize) -> Option<Self> {
        Some(f64::from(sum) / n as f64)
    }
}
impl Val for f16 {
    fn small(v: u32) -> Self {
        f16::from_f32(v as f32)
    }
    fn avg(sum: u32, n: usize) -> Option<Self> {
        Some(f16::from_f32(sum as f32 / n as f32))
    }
}
impl Val for bf16 {
    fn small(v: u32) -> Self {
        bf16::from_f32(v as f32)
    }
    fn avg(sum: u32, n: usize) -> Option<Self> {
        Some(bf16::from_f32(sum as f32 / n as f32))
    }
}

/// The value that marks output an operation has not written.
pub const POISON: u32 = 127;

/// Values are taken modulo this, so that `n` ranks' sum stays at or below 120.
pub fn modulus(n: usize) -> u32 {
    (120 / n.max(1) as u32).clamp(1, 8)
}

/// Element `i` of rank `rank`'s input on a communicator of `n` ranks (`i` global: the
/// index in the whole vector the operation reduces or moves).
pub fn input(rank: usize, i: usize, n: usize) -> u32 {
    ((rank + i * 3) % modulus(n) as usize) as u32
}

/// Products stay at or below 2^6 = 64: for `prod`, only every `prod_stride(n)`-th rank (at
/// most 6 ranks) has elements other than 1: element `i` of the `k`-th of them is 2 when bit
/// `k` of `i` is set, so that products differ between elements.
fn prod_stride(n: usize) -> usize {
    n.div_ceil(6).max(1)
}

/// Element `i` of rank `rank`'s input to a reduction `op` on `n` ranks: [`input`], except
/// for `prod`, whose inputs are 1 or 2 so that products stay small.
pub fn reduce_input(op: ReduceOp, rank: usize, i: usize, n: usize) -> u32 {
    match op {
        ReduceOp::Prod => {
            let s = prod_stride(n);
            1 + u32::from(rank.is_multiple_of(s) && (i >> (rank / s)) & 1 == 1)
        }
        _ => input(rank, i, n),
    }
}

/// Element `i` of the exact result of reducing [`reduce_input`] over `n` ranks with `op`
/// (for `avg`: the sum, which [`Val::avg`] divides); `None` for an operation this program
/// cannot check.
pub fn reduced(op: ReduceOp, i: usize, n: usize) -> Option<u32> {
    let each = (0..n).map(|r| reduce_input(op, r, i, n));
    match op {
        ReduceOp::Sum | ReduceOp::Avg => Some(each.sum()),
        ReduceOp::Prod => Some(each.product()),
        ReduceOp::Min => each.min(),
        ReduceOp::Max => each.max(),
        _ => None,
    }
}

/// The expected output element `i` of reduction `op` over `n` ranks, in type `T`.
pub fn expected<T: Val>(op: ReduceOp, i: usize, n: usize) -> Option<T> {
    let v = reduced(op, i, n)?;
    if op == ReduceOp::Avg {
        T::avg(v, n)
    } else {
        Some(T::small(v))
    }
}

/// Runs `$body` with `$t` bound to the Rust type of `$dtype`; `$other` for a type this
/// program does not know (`DType` is non-exhaustive).
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
            ferrocomm::DType::U8 => {
                type $t = u8;
                $body
            }
            ferrocomm::DType::I8 => {
                type $t = i8;
                $body
            }
            ferrocomm::DType::U16 => {
                type $t = u16;
                $body
            }
            ferrocomm::DType::I16 => {
                type $t = i16;
                $body
            }
            ferrocomm::DType::U32 => {
                type $t = u32;
                $body
            }
            ferrocomm::DType::I32 => {
                type $t = i32;
                $body
            }
            ferrocomm::DType::U64 => {
                type $t = u64;
                $body
            }
            ferrocomm::DType::I64 => {
                type $t = i64;
                $body
            }
            ferrocomm::DType::F16 => {
                type $t = half::f16;
                $body
            }
            ferrocomm::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            ferrocomm::DType::F32 => {
                type $t = f32;
                $body
            }
            ferrocomm::DType::F64 => {
                type $t = f64;
                $body
            }
            _ => $other,
        }
    };
}
pub(crate) use with_dtype;

/// Parses an element type name (`f32`, `bf16`, ...) for the command line.
pub fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::from_name(&s.to_ascii_lowercase()).ok_or_else(|| {
        let names: Vec<&str> = DType::ALL.iter().map(|d| d.name()).collect();
        format!("{s:?} is not an element type; one of: {}", names.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_stay_exact_and_never_poison() {
        for n in 1..=64 {
            for i in 0..64 {
                let s: u32 = (0..n).map(|r| input(r, i, n)).sum();
                assert!(s <= 120, "n={n} i={i} sum={s}");
                assert_ne!(s, POISON);
            }
        }
        // The largest sum is exact in the narrowest float types.
        assert_eq!(f16::small(120).to_f32(), 120.0);
        assert_eq!(bf16::small(120).to_f32(), 120.0);
        assert_eq!(i8::small(POISON), 127);
    }

    #[test]
    fn reductions_stay_exact_and_never_poison() {
        for n in 1..=64 {
            for i in 0..64 {
                for op in ReduceOp::ALL {
                    let v = reduced(op, i, n).expect("every operation is checkable");
                    assert!(v <= 120, "{op} n={n} i={i} result={v}");
                    assert_ne!(v, POISON);
                }
                let p: u32 = (0..n)
                    .map(|r| reduce_input(ReduceOp::Prod, r, i, n))
                    .product();
                assert!((1..=64).contains(&p), "prod n={n} i={i} = {p}");
            }
        }
        assert_eq!(reduced(ReduceOp::Sum, 0, 2), Some(1)); // 0 + 1
        assert_eq!(reduced(ReduceOp::Max, 1, 3), Some(5)); // inputs 3, 4, 5
        assert_eq!(reduced(ReduceOp::Min, 1, 3), Some(3));
        assert_eq!(expected::<f32>(ReduceOp::Avg, 0, 2), Some(0.5));
        assert_eq!(expected::<i32>(ReduceOp::Avg, 0, 2), None);
        assert_eq!(expected::<u8>(ReduceOp::Prod, 0, 2), Some(1));
        assert_eq!(expected::<u8>(ReduceOp::Prod, 2, 2), Some(2)); // 1 * 2
        assert_eq!(expected::<u8>(ReduceOp::Prod, 63, 64), Some(64));
    }

    #[test]
    fn dtypes_parse() {
        assert_eq!(parse_dtype("BF16"), Ok(DType::BF16));
        assert!(parse_dtype("f128").unwrap_err().contains("f32"));
        let size = with_dtype!(DType::F64, T => std::mem::size_of::<T>(), _ => 0);
        assert_eq!(size, 8);
    }
}
