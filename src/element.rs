//! Element types that ferrocomm can send and reduce, and the reduction operations.
//!
//! [`Element`] is sealed: it is implemented for exactly the types in [`DType`], each of which
//! is plain old data ([`bytemuck::Pod`]), so a slice of elements can be sent as bytes and
//! received back without any conversion.
//!
//! # Reductions
//!
//! [`ReduceOp`] names what a reducing collective computes element by element:
//!
//! | op | integers | floats |
//! |---|---|---|
//! | [`Sum`](ReduceOp::Sum) | wrapping addition (two's complement, like C's unsigned `+`) | IEEE addition |
//! | [`Prod`](ReduceOp::Prod) | wrapping multiplication | IEEE multiplication |
//! | [`Min`](ReduceOp::Min), [`Max`](ReduceOp::Max) | smallest / largest | IEEE 754-2019 `minimum` / `maximum`: `-0.0 < +0.0`, and any NaN operand gives the canonical quiet NaN (see [below](#min-and-max-of-floats)) |
//! | [`Avg`](ReduceOp::Avg) | refused ([`Error::InvalidArgument`]) | sum, then divided by the number of ranks |
//!
//! The kernels are plain loops over zipped slices (no indexing, so no bounds checks in the
//! loop body) with branch-free bodies, which LLVM vectorises: with the default x86-64 target
//! `f32` sums compile to `addps` over 4 lanes, unrolled (see `benches/collectives.rs`, group
//! `kernels`, for their throughput).
//!
//! `f16` and `bf16` sums and products are computed in `f32`, one block of [`HALF_BLOCK`]
//! elements at a time: both operands are widened into two stack arrays, combined with the
//! `f32` kernel, and the result is rounded back to the half type (round to nearest, ties to even). Per-element and
//! per-block conversion give bit-identical results (every binary operation is rounded back
//! to the half type either way; and since `f32` has more than twice the precision of either
//! half type plus two bits, the double rounding equals a direct, correctly rounded half
//! operation); blocks win on speed, because the widening, the `f32` arithmetic and the
//! narrowing each become a vectorised loop (the `f16` conversions use the F16C instructions
//! when the CPU has them). Partial results travel between ranks in the half type, as in NCCL
//! and Gloo: carrying `f32` would double the bytes on the wire.
//!
//! # Min and max of floats
//!
//! For `f16`, `bf16`, `f32` and `f64`, [`Min`](ReduceOp::Min) and [`Max`](ReduceOp::Max)
//! are the `minimum` and `maximum` operations of IEEE 754-2019 (section 9.6), with one
//! choice of NaN made explicit:
//!
//! - `-0.0` is smaller than `+0.0`: `min(-0.0, +0.0) = -0.0` and `max(-0.0, +0.0) = +0.0`,
//!   whichever comes first.
//! - If any operand is a NaN (quiet or signalling, of any sign and payload), the result is
//!   the canonical quiet NaN of the type: positive, the quiet bit set, the rest of the
//!   payload zero (`f16` `0x7E00`, `bf16` `0x7FC0`, `f32` `0x7FC0_0000`, `f64`
//!   `0x7FF8_0000_0000_0000`). Input payloads are not carried through.
//! - Otherwise the smaller (larger) value, bit for bit one of the operands.
//!
//! Both operations are then commutative and associative down to the bits, so a reduction
//! over ranks gives exactly the bits of the sequential one, `min(...min(min(x0, x1), x2)...,
//! xP-1)`, whatever the algorithm, the operand order it uses and the number of ranks: the
//! same answer on every rank, from every collective, for every world size. (Rust's
//! `f32::min` differs: it ignores a NaN operand and may return either zero.) Integers have
//! no such cases: their min and max are exact.
//!
//! These kernels work on the bit patterns and never convert: `f32`/`f64` compare as floats
//! and build the result from comparison masks (`cmpltps`, `cmpunordps`, `andps`/`andnps`/
//! `orps`), `f16`/`bf16` compare integer keys that order like the values (a few shifts,
//! xors and `pcmpgtw` per 8 lanes), all vectorised without SSE4 or AVX.
//!
//! # Operand order
//!
//! Every binary reduction has a defined operand order ([`Order`]), fixed by the algorithm:
//! the tree and doubling algorithms put the operand of the lower rank (or of the lower block
//! of ranks; in a rooted tree, counting from the root) first, the ring puts the partial
//! result received from its left neighbour first (so a ring segment is reduced in rank
//! order rotated to start at some rank). Addition and multiplication are commutative in
//! IEEE arithmetic except for the payload of a NaN result, and not associative, so the
//! order matters to the bits of a float `Sum`, `Prod` or `Avg`: different algorithms (and
//! world sizes) may round differently, within the usual bounds. Within one call every
//! element is either computed by one rank and copied to the others or computed from equal
//! inputs in the same order by every rank that computes it, so every rank gets the same
//! bytes. `Min` and `Max` do not depend on the order at all.

use half::{bf16, f16};

use crate::error::{Error, Result};

/// The element types of ferrocomm, as carried on the wire and through the C ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum DType {
    /// `u8` (also raw bytes).
    U8 = 0,
    /// `i8`.
    I8 = 1,
    /// `i16`.
    I16 = 2,
    /// `i32`.
    I32 = 3,
    /// `i64`.
    I64 = 4,
    /// `u32`.
    U32 = 5,
    /// `u64`.
    U64 = 6,
    /// IEEE 754 half precision ([`half::f16`]).
    F16 = 7,
    /// bfloat16 ([`half::bf16`]).
    BF16 = 8,
    /// `f32`.
    F32 = 9,
    /// `f64`.
    F64 = 10,
    /// `u16`.
    U16 = 11,
}

impl DType {
    /// Every dtype, in code order.
    pub const ALL: [DType; 12] = [
        DType::U8,
        DType::U16,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U32,
        DType::U64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// True for the floating-point types.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// The lower-case name used in messages and on the command line (`f32`, `bf16`...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::U8 => "u8",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
        }
    }

    /// The dtype with wire code `code`, if any.
    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| *d as u8 == code)
    }

    /// Parses a name as printed by [`DType::name`].
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| d.name() == name)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A type ferrocomm can send, receive and reduce. Sealed: implemented for the types of
/// [`DType`] only.
pub trait Element:
    bytemuck::Pod + Send + Sync + PartialEq + std::fmt::Debug + sealed::Sealed
{
    /// The wire type of `Self`.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    )*};
}

element! {
    u8 => U8, u16 => U16, i8 => I8, i16 => I16, i32 => I32, i64 => I64, u32 => U32, u64 => U64,
    f16 => F16, bf16 => BF16, f32 => F32, f64 => F64,
}

/// What a reducing collective computes, element by element. See the module documentation
/// for the exact semantics per element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum ReduceOp {
    /// Sum (wrapping for integers).
    Sum = 1,
    /// Product (wrapping for integers).
    Prod = 2,
    /// Minimum. Floats: IEEE 754-2019 `minimum` (`-0.0 < +0.0`; any NaN operand gives the
    /// canonical quiet NaN), so the result is that of a sequential reduction whatever the
    /// algorithm; see the [module documentation](self#min-and-max-of-floats).
    Min = 3,
    /// Maximum. Floats: IEEE 754-2019 `maximum` (`-0.0 < +0.0`; any NaN operand gives the
    /// canonical quiet NaN), so the result is that of a sequential reduction whatever the
    /// algorithm; see the [module documentation](self#min-and-max-of-floats).
    Max = 4,
    /// Sum divided by the number of ranks; floating-point types only.
    Avg = 5,
}

impl ReduceOp {
    /// Every operation, in code order.
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::Avg,
    ];

    /// The lower-case name (`sum`, `prod`, `min`, `max`, `avg`).
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
        }
    }

    /// The operation with wire code `code`, if any.
    pub fn from_code(code: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.iter().copied().find(|o| *o as u8 == code)
    }

    /// Parses a name as printed by [`ReduceOp::name`].
    pub fn from_name(name: &str) -> Option<ReduceOp> {
        ReduceOp::ALL.iter().copied().find(|o| o.name() == name)
    }

    /// Checks that this operation applies to `dtype`; `op` names the calling collective
    /// for the error message.
    pub fn check(self, dtype: DType, op: &str) -> Result<()> {
        if self == ReduceOp::Avg && !dtype.is_float() {
            return Err(Error::invalid(
                op,
                "op",
                format!(
                    "avg is defined for floating-point types only, not {dtype}: an integer \
                     average would have to round; use sum and divide, or reduce floats"
                ),
            ));
        }
        Ok(())
    }

    /// The operation applied between ranks' contributions (`Avg` sums, then divides).
    pub(crate) fn combining(self) -> ReduceOp {
        match self {
            ReduceOp::Avg => ReduceOp::Sum,
            other => other,
        }
    }
}

impl std::fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which operand of a binary reduction comes first (is the left operand). It can change the
/// bits of a float sum or product (NaN payloads); float min and max, and every integer
/// operation, give the same result either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// `acc = acc ∘ other`: the accumulator's (this rank's) value first.
    MineFirst,
    /// `acc = other ∘ acc`: the received value first.
    TheirsFirst,
}

/// Elements of `f16`/`bf16` widened to `f32` at a time (two stack arrays of this many `f32`).
pub const HALF_BLOCK: usize = 256;

/// `acc[i] = acc[i] ∘ other[i]` (or `other[i] ∘ acc[i]`, see [`Order`]) for every `i`, on
/// byte slices holding elements of `dtype`. `op` must be a combining operation (not
/// [`ReduceOp::Avg`], which combines as [`ReduceOp::Sum`]).
///
/// Fails with [`Error::InvalidArgument`] if the slices differ in length, are not a whole
/// number of elements, or are not aligned for `dtype`.
pub fn reduce_bytes(
    dtype: DType,
    op: ReduceOp,
    acc: &mut [u8],
    other: &[u8],
    order: Order,
) -> Result<()> {
    if acc.len() != other.len() {
        return Err(Error::invalid(
            "reduce",
            "other",
            format!(
                "{} bytes against an accumulator of {}",
                other.len(),
                acc.len()
            ),
        ));
    }
    let op = op.combining();
    let first = order == Order::TheirsFirst;
    if matches!(op, ReduceOp::Min | ReduceOp::Max) && dtype.is_float() {
        // IEEE 754-2019 minimum/maximum: the operand order does not matter.
        match dtype {
            DType::F16 => min_max_f16(op, cast_mut(acc)?, cast(other)?),
            DType::BF16 => min_max_bf16(op, cast_mut(acc)?, cast(other)?),
            DType::F32 => min_max_f32(op, cast_mut(acc)?, cast(other)?),
            _ => min_max_f64(op, cast_mut(acc)?, cast(other)?),
        }
        return Ok(());
    }
    match dtype {
        DType::U8 => kernel::<u8>(op, cast_mut(acc)?, cast(other)?, first),
        DType::U16 => kernel::<u16>(op, cast_mut(acc)?, cast(other)?, first),
        DType::U32 => kernel::<u32>(op, cast_mut(acc)?, cast(other)?, first),
        DType::U64 => kernel::<u64>(op, cast_mut(acc)?, cast(other)?, first),
        DType::I8 => kernel::<i8>(op, cast_mut(acc)?, cast(other)?, first),
        DType::I16 => kernel::<i16>(op, cast_mut(acc)?, cast(other)?, first),
        DType::I32 => kernel::<i32>(op, cast_mut(acc)?, cast(other)?, first),
        DType::I64 => kernel::<i64>(op, cast_mut(acc)?, cast(other)?, first),
        DType::F32 => kernel::<f32>(op, cast_mut(acc)?, cast(other)?, first),
        DType::F64 => kernel::<f64>(op, cast_mut(acc)?, cast(other)?, first),
        DType::F16 => half_kernel::<f16>(op, cast_mut(acc)?, cast(other)?, first),
        DType::BF16 => half_kernel::<bf16>(op, cast_mut(acc)?, cast(other)?, first),
    }
    Ok(())
}

/// Divides every element of `buf` (floats of `dtype`) by `n`: the last step of
/// [`ReduceOp::Avg`]. Each element is divided once and correctly rounded (for `f16`/`bf16`:
/// in `f32`, then rounded back), so equal inputs give equal outputs on every rank.
pub fn divide_bytes(dtype: DType, buf: &mut [u8], n: usize) -> Result<()> {
    match dtype {
        DType::F32 => {
            let d = n as f32;
            cast_mut::<f32>(buf)?.iter_mut().for_each(|x| *x /= d);
        }
        DType::F64 => {
            let d = n as f64;
            cast_mut::<f64>(buf)?.iter_mut().for_each(|x| *x /= d);
        }
        DType::F16 => divide_half::<f16>(cast_mut(buf)?, n as f32),
        DType::BF16 => divide_half::<bf16>(cast_mut(buf)?, n as f32),
        other => {
            return Err(Error::invalid(
                "avg",
                "dtype",
                format!("{other} is not a floating-point type"),
            ));
        }
    }
    Ok(())
}

fn cast<T: bytemuck::Pod>(b: &[u8]) -> Result<&[T]> {
    if b.is_empty() {
        return Ok(&[]);
    }
    bytemuck::try_cast_slice(b).map_err(|e| {
        Error::invalid(
            "reduce",
            "buffer",
            format!(
                "{} bytes cannot be viewed as {}: {e}",
                b.len(),
                std::any::type_name::<T>()
            ),
        )
    })
}

fn cast_mut<T: bytemuck::Pod>(b: &mut [u8]) -> Result<&mut [T]> {
    if b.is_empty() {
        return Ok(&mut []);
    }
    let len = b.len();
    bytemuck::try_cast_slice_mut(b).map_err(|e| {
        Error::invalid(
            "reduce",
            "buffer",
            format!(
                "{len} bytes cannot be viewed as {}: {e}",
                std::any::type_name::<T>()
            ),
        )
    })
}

/// Element arithmetic of the reduction kernels: branch-free so loops vectorise.
trait Arith: Copy {
    fn add(self, b: Self) -> Self;
    fn mul(self, b: Self) -> Self;
    fn min(self, b: Self) -> Self;
    fn max(self, b: Self) -> Self;
}

macro_rules! int_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)]
            fn add(self, b: Self) -> Self { self.wrapping_add(b) }
            #[inline(always)]
            fn mul(self, b: Self) -> Self { self.wrapping_mul(b) }
            #[inline(always)]
            fn min(self, b: Self) -> Self { if b < self { b } else { self } }
            #[inline(always)]
            fn max(self, b: Self) -> Self { if b > self { b } else { self } }
        }
    )*};
}

int_arith!(u8, u16, u32, u64, i8, i16, i32, i64);

macro_rules! float_arith {
    ($($t:ty: $min:ident, $max:ident),*) => {$(
        impl Arith for $t {
            #[inline(always)]
            fn add(self, b: Self) -> Self { self + b }
            #[inline(always)]
            fn mul(self, b: Self) -> Self { self * b }
            // `reduce_bytes` runs float min/max on the bit patterns directly; these say the
            // same, so that the trait means one thing.
            #[inline(always)]
            fn min(self, b: Self) -> Self { <$t>::from_bits($min(self.to_bits(), b.to_bits())) }
            #[inline(always)]
            fn max(self, b: Self) -> Self { <$t>::from_bits($max(self.to_bits(), b.to_bits())) }
        }
    )*};
}

float_arith!(f32: min_f32, max_f32, f64: min_f64, max_f64);

/// IEEE 754-2019 `minimum` and `maximum` for a 16-bit float format, on its bits (`$u` the
/// bits, `$i` the signed integer of the same width, `$inf` the bits of +infinity, `$qnan`
/// the canonical quiet NaN), and the slice kernel that applies one of them.
///
/// Every bit pattern that is not a NaN gets a key, a signed integer that orders like the
/// value with `-0.0 < +0.0`: a positive float's bits as they are, a negative float's bits
/// with everything but the sign flipped (a larger magnitude then gives a smaller key).
/// Different patterns have different keys, so the operand with the smaller (larger) key is
/// the answer whatever the operand order. A NaN operand, quiet or signalling, whatever its
/// sign and payload, gives `$qnan`. No conversion to `f32`: each lane is shifts, xors,
/// integer compares and selects, which LLVM vectorises (8 lanes with SSE2).
macro_rules! ieee_min_max {
    ($($min:ident, $max:ident, $slices:ident: $u:ty, $i:ty, $inf:expr, $qnan:expr;)*) => {$(
        #[inline(always)]
        fn $min(a: $u, b: $u) -> $u {
            let key = |x: $u| {
                let s = x as $i;
                s ^ ((s >> (<$i>::BITS - 1)) as $u >> 1) as $i
            };
            let nan = |x: $u| x & (<$u>::MAX >> 1) > $inf;
            let r = if key(b) < key(a) { b } else { a };
            if nan(a) | nan(b) { $qnan } else { r }
        }

        #[inline(always)]
        fn $max(a: $u, b: $u) -> $u {
            let key = |x: $u| {
                let s = x as $i;
                s ^ ((s >> (<$i>::BITS - 1)) as $u >> 1) as $i
            };
            let nan = |x: $u| x & (<$u>::MAX >> 1) > $inf;
            let r = if key(b) > key(a) { b } else { a };
            if nan(a) | nan(b) { $qnan } else { r }
        }

        /// `acc[i] = minimum(acc[i], other[i])` (`maximum` for [`ReduceOp::Max`]).
        fn $slices(op: ReduceOp, acc: &mut [$u], other: &[$u]) {
            if op == ReduceOp::Max {
                zip_with(acc, other, $max)
            } else {
                zip_with(acc, other, $min)
            }
        }
    )*};
}

ieee_min_max! {
    min_f16, max_f16, min_max_f16: u16, i16, 0x7C00, 0x7E00;
    min_bf16, max_bf16, min_max_bf16: u16, i16, 0x7F80, 0x7FC0;
}

/// IEEE 754-2019 `minimum` and `maximum` for `f32`/`f64` (`$t`), on its bits (`$u`), with
/// `$qnan` the canonical quiet NaN; and the slice kernel that applies one of them.
///
/// The operands are compared as floats and the result is assembled from the comparison
/// masks: the smaller (larger) operand, or, when they compare equal, `a | b` (`a & b`).
/// Equal floats have equal bits except `-0.0` and `+0.0`, where OR keeps the sign bit (so
/// `minimum` gives `-0.0`) and AND clears it (`maximum` gives `+0.0`). Either operand a NaN
/// gives `$qnan`. Two compares, three mask operations and a NaN select per vector
/// (`cmpltps`, `andnps`/`orps`, `cmpunordps`).
macro_rules! ieee_min_max_float {
    ($($min:ident, $max:ident, $slices:ident: $t:ty, $u:ty, $qnan:expr;)*) => {$(
        #[inline(always)]
        fn $min(a: $u, b: $u) -> $u {
            let (x, y) = (<$t>::from_bits(a), <$t>::from_bits(b));
            // `b`, `a`, or when equal (or unordered) `a | b`.
            let b_less: $u = if y < x { !0 } else { 0 };
            let a_less: $u = if x < y { !0 } else { 0 };
            let r = (a & !b_less) | (b & !a_less);
            if x.is_nan() | y.is_nan() { $qnan } else { r }
        }

        #[inline(always)]
        fn $max(a: $u, b: $u) -> $u {
            let (x, y) = (<$t>::from_bits(a), <$t>::from_bits(b));
            // `b`, `a`, or when equal (or unordered) `a & b`.
            let b_more: $u = if y > x { !0 } else { 0 };
            let a_more: $u = if x > y { !0 } else { 0 };
            let r = (a | b_more) & (b | a_more);
            if x.is_nan() | y.is_nan() { $qnan } else { r }
        }

        /// `acc[i] = minimum(acc[i], other[i])` (`maximum` for [`ReduceOp::Max`]).
        fn $slices(op: ReduceOp, acc: &mut [$u], other: &[$u]) {
            if op == ReduceOp::Max {
                zip_with(acc, other, $max)
            } else {
                zip_with(acc, other, $min)
            }
        }
    )*};
}

ieee_min_max_float! {
    min_f32, max_f32, min_max_f32: f32, u32, 0x7FC0_0000;
    min_f64, max_f64, min_max_f64: f64, u64, 0x7FF8_0000_0000_0000;
}

#[inline(always)]
fn zip_with<T: Copy>(acc: &mut [T], other: &[T], f: impl Fn(T, T) -> T) {
    for (a, &b) in acc.iter_mut().zip(other) {
        *a = f(*a, b);
    }
}

#[inline(always)]
fn kernel<T: Arith>(op: ReduceOp, acc: &mut [T], other: &[T], theirs_first: bool) {
    // One loop per (op, order): each body is a single vectorisable operation.
    match (op, theirs_first) {
        (ReduceOp::Sum | ReduceOp::Avg, false) => zip_with(acc, other, |a, b| a.add(b)),
        (ReduceOp::Sum | ReduceOp::Avg, true) => zip_with(acc, other, |a, b| b.add(a)),
        (ReduceOp::Prod, false) => zip_with(acc, other, |a, b| a.mul(b)),
        (ReduceOp::Prod, true) => zip_with(acc, other, |a, b| b.mul(a)),
        (ReduceOp::Min, false) => zip_with(acc, other, |a, b| a.min(b)),
        (ReduceOp::Min, true) => zip_with(acc, other, |a, b| b.min(a)),
        (ReduceOp::Max, false) => zip_with(acc, other, |a, b| a.max(b)),
        (ReduceOp::Max, true) => zip_with(acc, other, |a, b| b.max(a)),
    }
}

/// A 16-bit float type reduced through `f32`.
trait HalfType: bytemuck::Pod {
    fn widen(src: &[Self], dst: &mut [f32]);
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl HalfType for f16 {
    fn widen(src: &[f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        // Vectorised, with F16C where the CPU has it (detected at run time by `half`).
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

impl HalfType for bf16 {
    fn widen(src: &[bf16], dst: &mut [f32]) {
        // bf16 is the upper half of an f32: a shift per lane.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(f32_to_bf16_bits(*s));
        }
    }
}

/// Rounds an `f32` to the nearest `bf16` (ties to even), quieting NaNs: the same result as
/// [`half::bf16::from_f32`], written without branches so the loop vectorises.
#[inline(always)]
fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x0040;
    (if x.is_nan() { nan } else { rounded }) as u16
}

fn half_kernel<H: HalfType>(op: ReduceOp, acc: &mut [H], other: &[H], theirs_first: bool) {
    let mut a = [0f32; HALF_BLOCK];
    let mut b = [0f32; HALF_BLOCK];
    for (ac, oc) in acc.chunks_mut(HALF_BLOCK).zip(other.chunks(HALF_BLOCK)) {
        let n = ac.len();
        H::widen(ac, &mut a[..n]);
        H::widen(oc, &mut b[..n]);
        kernel::<f32>(op, &mut a[..n], &b[..n], theirs_first);
        H::narrow(&a[..n], ac);
    }
}

fn divide_half<H: HalfType>(buf: &mut [H], d: f32) {
    let mut a = [0f32; HALF_BLOCK];
    for c in buf.chunks_mut(HALF_BLOCK) {
        let n = c.len();
        H::widen(c, &mut a[..n]);
        a[..n].iter_mut().for_each(|x| *x /= d);
        H::narrow(&a[..n], c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_code(d as u8), Some(d));
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::from_code(200), None);
        assert_eq!(DType::from_name("f128"), None);
    }

    #[test]
    fn sizes_match_rust_types() {
        assert_eq!(<f16 as Element>::DTYPE.size(), std::mem::size_of::<f16>());
        assert_eq!(<bf16 as Element>::DTYPE.size(), std::mem::size_of::<bf16>());
        assert_eq!(<f64 as Element>::DTYPE.size(), 8);
        assert_eq!(<i16 as Element>::DTYPE.size(), 2);
    }
}

#[cfg(test)]
mod reduce_tests {
    use super::*;

    fn bytes<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
        bytemuck::cast_slice(v).to_vec()
    }

    fn run<T: Element>(op: ReduceOp, a: &[T], b: &[T], order: Order) -> Vec<T> {
        // Aligned copies: Vec<T> then viewed as bytes.
        let mut acc = a.to_vec();
        let other = b.to_vec();
        reduce_bytes(
            T::DTYPE,
            op,
            bytemuck::cast_slice_mut(&mut acc),
            bytemuck::cast_slice(&other),
            order,
        )
        .unwrap();
        acc
    }

    #[test]
    fn integer_ops_wrap_and_compare() {
        let a = [250u8, 3, 7, 0];
        let b = [10u8, 5, 7, 255];
        assert_eq!(
            run(ReduceOp::Sum, &a, &b, Order::MineFirst),
            [4, 8, 14, 255]
        );
        assert_eq!(
            run(ReduceOp::Prod, &a, &b, Order::MineFirst),
            [196, 15, 49, 0]
        );
        assert_eq!(run(ReduceOp::Min, &a, &b, Order::MineFirst), [10, 3, 7, 0]);
        assert_eq!(
            run(ReduceOp::Max, &a, &b, Order::TheirsFirst),
            [250, 5, 7, 255]
        );
        let a = [i64::MAX, -5];
        let b = [1i64, -7];
        assert_eq!(
            run(ReduceOp::Sum, &a, &b, Order::MineFirst),
            [i64::MIN, -12]
        );
        assert_eq!(run(ReduceOp::Min, &a, &b, Order::MineFirst), [1, -7]);
    }

    /// A float element type seen through its bits, for the min/max tests.
    trait Float: Element {
        const CANONICAL_NAN: u64;
        /// Interesting bit patterns: zeros, ±1, infinities, the smallest subnormals, the
        /// largest finite values, quiet and signalling NaNs of both signs with payloads.
        const SPECIALS: &'static [u64];
        fn from_u64(bits: u64) -> Self;
        fn to_u64(self) -> u64;
        fn wide(self) -> f64;
    }

    macro_rules! test_float {
        ($t:ty, $u:ty, $nan:expr, [$($s:expr),* $(,)?], $wide:expr) => {
            impl Float for $t {
                const CANONICAL_NAN: u64 = $nan;
                const SPECIALS: &'static [u64] = &[$($s),*];
                fn from_u64(bits: u64) -> Self { <$t>::from_bits(bits as $u) }
                fn to_u64(self) -> u64 { self.to_bits() as u64 }
                fn wide(self) -> f64 { ($wide)(self) }
            }
        };
    }

    test_float!(
        f16,
        u16,
        0x7E00,
        [
            0x0000, 0x8000, 0x3C00, 0xBC00, 0x7C00, 0xFC00, 0x0001, 0x8001, 0x7BFF, 0xFBFF, 0x7E00,
            0xFE00, 0x7E01, 0x7C01, 0xFD55, 0x7FFF,
        ],
        |x: f16| x.to_f64()
    );
    test_float!(
        bf16,
        u16,
        0x7FC0,
        [
            0x0000, 0x8000, 0x3F80, 0xBF80, 0x7F80, 0xFF80, 0x0001, 0x8001, 0x7F7F, 0xFF7F, 0x7FC0,
            0xFFC0, 0x7FC1, 0x7F81, 0xFFAA, 0x7FFF,
        ],
        |x: bf16| x.to_f64()
    );
    test_float!(
        f32,
        u32,
        0x7FC0_0000,
        [
            0x0000_0000,
            0x8000_0000,
            0x3F80_0000,
            0xBF80_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x0000_0001,
            0x8000_0001,
            0x7F7F_FFFF,
            0xFF7F_FFFF,
            0x7FC0_0000,
            0xFFC0_0000,
            0x7FC0_0001,
            0x7F80_0001,
            0xFFA0_5555,
            0x7FFF_FFFF,
        ],
        |x: f32| x as f64
    );
    test_float!(
        f64,
        u64,
        0x7FF8_0000_0000_0000,
        [
            0,
            0x8000_0000_0000_0000,
            0x3FF0_0000_0000_0000,
            0xBFF0_0000_0000_0000,
            0x7FF0_0000_0000_0000,
            0xFFF0_0000_0000_0000,
            1,
            0x8000_0000_0000_0001,
            0x7FEF_FFFF_FFFF_FFFF,
            0xFFEF_FFFF_FFFF_FFFF,
            0x7FF8_0000_0000_0000,
            0xFFF8_0000_0000_0000,
            0x7FF8_0000_0000_0001,
            0x7FF0_0000_0000_0001,
            0xFFF5_5555_5555_5555,
            0x7FFF_FFFF_FFFF_FFFF,
        ],
        |x: f64| x
    );

    /// IEEE 754-2019 `minimum`/`maximum` with the canonical NaN, written independently of
    /// the kernels: through `f64` (exact for every type) and `total_cmp`, which orders
    /// `-0.0` before `+0.0`.
    fn reference<T: Float>(op: ReduceOp, a: T, b: T) -> u64 {
        let (x, y) = (a.wide(), b.wide());
        if x.is_nan() || y.is_nan() {
            return T::CANONICAL_NAN;
        }
        let b_wins = match op {
            ReduceOp::Min => y.total_cmp(&x).is_lt(),
            _ => y.total_cmp(&x).is_gt(),
        };
        if b_wins { b.to_u64() } else { a.to_u64() }
    }

    /// Every pair of `a` and `b` (as bits) through the kernel in both orders, against the
    /// reference; also checks that the kernel is associative on a triple of specials.
    fn check_min_max<T: Float>(a_bits: &[u64], b_bits: &[u64]) {
        let (mut a, mut b) = (vec![], vec![]);
        for &x in a_bits {
            for &y in b_bits {
                a.push(T::from_u64(x));
                b.push(T::from_u64(y));
            }
        }
        for op in [ReduceOp::Min, ReduceOp::Max] {
            for order in [Order::MineFirst, Order::TheirsFirst] {
                let got = run(op, &a, &b, order);
                for i in 0..a.len() {
                    assert_eq!(
                        got[i].to_u64(),
                        reference(op, a[i], b[i]),
                        "{} {op} of {:#x} and {:#x}, {order:?}",
                        T::DTYPE,
                        a[i].to_u64(),
                        b[i].to_u64(),
                    );
                }
            }
        }
    }

    #[test]
    fn float_min_max_are_ieee_minimum_maximum_whatever_the_order() {
        fn each<T: Float>() {
            let (z, nz) = (T::from_u64(0), T::from_u64(T::SPECIALS[1]));
            assert!(nz.wide() == 0.0 && nz.wide().is_sign_negative());
            for order in [Order::MineFirst, Order::TheirsFirst] {
                // The rule of the documentation, spelt out.
                let m = run(ReduceOp::Min, &[z, nz], &[nz, z], order);
                assert_eq!(
                    [m[0].to_u64(), m[1].to_u64()],
                    [nz.to_u64(); 2],
                    "{}",
                    T::DTYPE
                );
                let m = run(ReduceOp::Max, &[z, nz], &[nz, z], order);
                assert_eq!([m[0].to_u64(), m[1].to_u64()], [0, 0], "{}", T::DTYPE);
            }
            // Every pair of specials, so every combination of ±0, ±inf and NaNs.
            check_min_max::<T>(T::SPECIALS, T::SPECIALS);
            // Associative and commutative down to the bits: every tree gives one answer.
            for op in [ReduceOp::Min, ReduceOp::Max] {
                let s = T::SPECIALS;
                for &x in s {
                    for &y in s {
                        for &w in s {
                            let (x, y, w) = (T::from_u64(x), T::from_u64(y), T::from_u64(w));
                            let left = run(
                                op,
                                &run(op, &[x], &[y], Order::MineFirst),
                                &[w],
                                Order::MineFirst,
                            );
                            let right = run(
                                op,
                                &[x],
                                &run(op, &[w], &[y], Order::TheirsFirst),
                                Order::MineFirst,
                            );
                            assert_eq!(left[0].to_u64(), right[0].to_u64(), "{} {op}", T::DTYPE);
                        }
                    }
                }
            }
        }
        each::<f16>();
        each::<bf16>();
        each::<f32>();
        each::<f64>();
    }

    #[test]
    fn half_min_max_match_the_reference_for_every_bit_pattern() {
        // Every f16 and bf16 against the specials, in both positions.
        let all: Vec<u64> = (0..=u16::MAX as u64).collect();
        check_min_max::<f16>(&all, f16::SPECIALS);
        check_min_max::<f16>(f16::SPECIALS, &all);
        check_min_max::<bf16>(&all, bf16::SPECIALS);
        check_min_max::<bf16>(bf16::SPECIALS, &all);
    }

    #[test]
    fn wide_min_max_match_the_reference_on_random_bits() {
        // Random patterns, half of them with the exponent forced all-ones (infinities and
        // NaNs) or zero (zeros and subnormals), so the special cases are common.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut pats32 = vec![];
        let mut pats64 = vec![];
        for _ in 0..4096 {
            let r = next();
            let (e32, e64) = match r % 4 {
                0 => (0x7F80_0000u64, 0x7FF0_0000_0000_0000u64),
                1 => (0, 0),
                _ => (r & 0x7F80_0000, r & 0x7FF0_0000_0000_0000),
            };
            let m = next();
            pats32.push((m & 0x807F_FFFF) | e32);
            pats64.push((m & 0x800F_FFFF_FFFF_FFFF) | e64);
        }
        check_min_max::<f32>(&pats32[..256], &pats32[256..512]);
        check_min_max::<f32>(&pats32[..64], &pats32[..64]);
        check_min_max::<f64>(&pats64[..256], &pats64[256..512]);
        check_min_max::<f64>(&pats64[..64], &pats64[..64]);
    }

    #[test]
    fn avg_is_refused_for_integers_only() {
        for d in DType::ALL {
            let r = ReduceOp::Avg.check(d, "all_reduce");
            assert_eq!(r.is_ok(), d.is_float(), "{d}");
            if let Err(e) = r {
                assert!(
                    e.to_string().contains("avg") && e.to_string().contains(d.name()),
                    "{e}"
                );
            }
            for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
                op.check(d, "x").unwrap();
            }
        }
        let mut b = bytes(&[1i32, 2]);
        assert!(divide_bytes(DType::I32, &mut b, 2).is_err());
    }

    #[test]
    fn half_types_reduce_like_a_correctly_rounded_half_operation() {
        // Every pair from a spread of values, including specials, against the f64 result
        // rounded once (f64 holds every sum and product of two halves exactly, except for
        // products that overflow, which round the same way).
        let vals: Vec<f32> = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            0.1,
            3.3,
            1e-5,
            -7e-8,
            65504.0,
            1024.5,
            2049.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            6.1e-5,
            0.33333,
            123.456,
        ]
        .to_vec();
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
            let (mut a16, mut b16, mut abf, mut bbf) = (vec![], vec![], vec![], vec![]);
            for &x in &vals {
                for &y in &vals {
                    a16.push(f16::from_f32(x));
                    b16.push(f16::from_f32(y));
                    abf.push(bf16::from_f32(x));
                    bbf.push(bf16::from_f32(y));
                }
            }
            let exact = |x: f64, y: f64| match op {
                ReduceOp::Sum => x + y,
                ReduceOp::Prod => x * y,
                // IEEE minimum/maximum (no NaN among the values; -0.0 < +0.0).
                ReduceOp::Min if y.total_cmp(&x).is_lt() => y,
                ReduceOp::Max if y.total_cmp(&x).is_gt() => y,
                _ => x,
            };
            let got = run(op, &a16, &b16, Order::MineFirst);
            for i in 0..got.len() {
                let want = f16::from_f64(exact(a16[i].to_f64(), b16[i].to_f64()));
                if want.is_nan() {
                    assert!(got[i].is_nan());
                } else {
                    assert_eq!(
                        got[i].to_bits(),
                        want.to_bits(),
                        "f16 {op} {} {}",
                        a16[i],
                        b16[i]
                    );
                }
            }
            let got = run(op, &abf, &bbf, Order::MineFirst);
            for i in 0..got.len() {
                let want = bf16::from_f64(exact(abf[i].to_f64(), bbf[i].to_f64()));
                if want.is_nan() {
                    assert!(got[i].is_nan());
                } else {
                    assert_eq!(
                        got[i].to_bits(),
                        want.to_bits(),
                        "bf16 {op} {} {}",
                        abf[i],
                        bbf[i]
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_narrowing_matches_half() {
        let mut x = 0x1234_5678u32;
        let mut vals = vec![
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
        ];
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            vals.push(f32::from_bits(x));
        }
        for v in vals {
            let want = bf16::from_f32(v);
            let got = f32_to_bf16_bits(v);
            if v.is_nan() {
                assert!(bf16::from_bits(got).is_nan());
            } else {
                assert_eq!(got, want.to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn long_slices_cover_block_edges() {
        let n = HALF_BLOCK * 3 + 17;
        let a: Vec<f16> = (0..n).map(|i| f16::from_f32(i as f32 * 0.5)).collect();
        let b: Vec<f16> = (0..n).map(|i| f16::from_f32(1.0 + i as f32)).collect();
        let got = run(ReduceOp::Sum, &a, &b, Order::TheirsFirst);
        for i in 0..n {
            assert_eq!(got[i], f16::from_f32(a[i].to_f32() + b[i].to_f32()), "{i}");
        }
        let mut avg = bytes(&got);
        divide_bytes(DType::F16, &mut avg, 4).unwrap();
        let avg: &[f16] = bytemuck::cast_slice(&avg);
        assert_eq!(avg[10], f16::from_f32(got[10].to_f32() / 4.0));
    }

    #[test]
    fn mismatched_lengths_are_refused() {
        let mut a = vec![0u8; 8];
        assert!(
            reduce_bytes(
                DType::U8,
                ReduceOp::Sum,
                &mut a,
                &[0u8; 4],
                Order::MineFirst
            )
            .is_err()
        );
        let mut a = vec![0u32; 2];
        let a: &mut [u8] = bytemuck::cast_slice_mut(&mut a);
        assert!(
            reduce_bytes(
                DType::F32,
                ReduceOp::Sum,
                &mut a[..6],
                &[0u8; 6],
                Order::MineFirst
            )
            .is_err()
        );
    }

    #[test]
    fn op_names_round_trip() {
        for op in ReduceOp::ALL {
            assert_eq!(ReduceOp::from_name(op.name()), Some(op));
            assert_eq!(ReduceOp::from_code(op as u8), Some(op));
        }
        assert_eq!(ReduceOp::from_code(0), None);
    }
}
