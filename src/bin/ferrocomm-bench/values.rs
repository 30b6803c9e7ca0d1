//! Test data whose results can be checked exactly in every element type.
//!
//! Inputs are small non-negative integers, chosen so that a sum over all ranks stays at or
//! below 120: exact in `i8`, `f16` and `bf16` alike. 127 never occurs as a result and
//! marks output not written ("poison").

use ferrocomm::Element;
use ferrocomm::element::DType;
use half::{bf16, f16};

/// An element type the benchmark can fill and check.
pub trait Val: Element + Copy {
    /// The small integer `v` (0..=127) in this type.
    fn small(v: u32) -> Self;
}

macro_rules! val_int {
    ($($t:ty),*) => {$(
        impl Val for $t {
            fn small(v: u32) -> Self {
                v as $t
            }
        }
    )*};
}
val_int!(u8, i8, u16, i16, u32, i32, u64, i64);

impl Val for f32 {
    fn small(v: u32) -> Self {
        v as f32
    }
}
impl Val for f64 {
    fn small(v: u32) -> Self {
        f64::from(v)
    }
}
impl Val for f16 {
    fn small(v: u32) -> Self {
        f16::from_f32(v as f32)
    }
}
impl Val for bf16 {
    fn small(v: u32) -> Self {
        bf16::from_f32(v as f32)
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
    fn dtypes_parse() {
        assert_eq!(parse_dtype("BF16"), Ok(DType::BF16));
        assert!(parse_dtype("f128").unwrap_err().contains("f32"));
        let size = with_dtype!(DType::F64, T => std::mem::size_of::<T>(), _ => 0);
        assert_eq!(size, 8);
    }
}
