//! Collective test cases shared by the thread and process tests: deterministic inputs, one
//! call per case on a rank, and the sequential reference each rank's result is checked
//! against (exact for integers, with a bound for floats, bit-identical across ranks).

#![allow(dead_code)]

use ferrocomm::{AllReduceAlgo, AllReduceOptions, Communicator, DType, Element, ReduceOp};
use half::{bf16, f16};

/// Which collective a case calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    AllReduce,
    Broadcast,
    Reduce,
    AllGather,
    ReduceScatter,
    Gather,
    Scatter,
    AllToAll,
    Barrier,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::AllReduce,
        Kind::Broadcast,
        Kind::Reduce,
        Kind::AllGather,
        Kind::ReduceScatter,
        Kind::Gather,
        Kind::Scatter,
        Kind::AllToAll,
        Kind::Barrier,
    ];

    pub fn reduces(self) -> bool {
        matches!(self, Kind::AllReduce | Kind::Reduce | Kind::ReduceScatter)
    }
}

/// One collective call, the same on every rank.
#[derive(Clone, Debug)]
pub struct Case {
    pub kind: Kind,
    pub dtype: DType,
    pub op: ReduceOp,
    /// All elements (all_reduce, broadcast, reduce) or elements per block (the others).
    pub count: usize,
    pub root: usize,
    pub algo: AllReduceAlgo,
    pub in_place: bool,
    pub salt: u64,
}

impl Case {
    pub fn all_reduce(dtype: DType, op: ReduceOp, count: usize, algo: AllReduceAlgo) -> Case {
        Case {
            kind: Kind::AllReduce,
            dtype,
            op,
            count,
            root: 0,
            algo,
            in_place: true,
            salt: count as u64 * 7 + dtype as u64,
        }
    }
}

fn hash(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn bits(rank: usize, i: usize, salt: u64) -> u64 {
    hash(hash(salt ^ (rank as u64) << 40) ^ i as u64)
}

/// A uniform value in [0, 1) from the bits.
fn unit(b: u64) -> f64 {
    (b >> 11) as f64 / (1u64 << 53) as f64
}

/// Element types with what the tests need.
pub trait TElem: Element + Copy + Send + Sync + 'static {
    /// The input of `rank` at `i`.
    fn make(op: ReduceOp, rank: usize, i: usize, salt: u64) -> Self;
    /// Exact combination (integers: wrapping; floats: unused for sum/prod).
    fn combine(op: ReduceOp, a: Self, b: Self) -> Self;
    fn to_f64(self) -> f64;
    /// Relative precision (a little above the unit roundoff).
    const EPS: f64;
    const FLOAT: bool;
}

macro_rules! int_elem {
    ($($t:ty),*) => {$(
        impl TElem for $t {
            fn make(_op: ReduceOp, rank: usize, i: usize, salt: u64) -> Self {
                bits(rank, i, salt) as $t
            }
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Sum => a.wrapping_add(b),
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                    _ => unreachable!("avg on integers"),
                }
            }
            fn to_f64(self) -> f64 { self as f64 }
            const EPS: f64 = 0.0;
            const FLOAT: bool = false;
        }
    )*};
}
int_elem!(u8, u16, u32, u64, i8, i16, i32, i64);

fn float_input(op: ReduceOp, rank: usize, i: usize, salt: u64) -> f64 {
    let u = unit(bits(rank, i, salt));
    match op {
        // Products stay near 1 so that 33 factors neither overflow nor vanish in f16.
        ReduceOp::Prod => 0.9 + 0.2 * u,
        _ => 2.0 * u - 1.0,
    }
}

macro_rules! float_elem {
    ($($t:ty => $from:expr, $to:expr, $eps:expr);* $(;)?) => {$(
        impl TElem for $t {
            fn make(op: ReduceOp, rank: usize, i: usize, salt: u64) -> Self {
                ($from)(float_input(op, rank, i, salt))
            }
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Min => if b.to_f64() < a.to_f64() { b } else { a },
                    ReduceOp::Max => if b.to_f64() > a.to_f64() { b } else { a },
                    _ => unreachable!("sums and products are checked in f64"),
                }
            }
            fn to_f64(self) -> f64 { ($to)(self) }
            const EPS: f64 = $eps;
            const FLOAT: bool = true;
        }
    )*};
}
float_elem! {
    f32 => |x: f64| x as f32, |x: f32| x as f64, 2.5e-7;
    f64 => |x: f64| x, |x: f64| x, 5e-16;
    f16 => f16::from_f64, f16::to_f64, 1.0e-3;
    bf16 => bf16::from_f64, bf16::to_f64, 8.0e-3;
}

fn input<T: TElem>(c: &Case, rank: usize, len: usize) -> Vec<T> {
    (0..len).map(|i| T::make(c.op, rank, i, c.salt)).collect()
}

/// Runs case `c` on `comm` and returns what this rank ended with (empty where the
/// collective leaves nothing on this rank). Inputs that must stay unchanged are checked
/// here.
pub fn run_case<T: TElem>(comm: &Communicator, c: &Case) -> Result<Vec<T>, ferrocomm::Error> {
    let (me, p, n) = (comm.rank(), comm.size(), c.count);
    match c.kind {
        Kind::AllReduce => {
            let mut buf = input::<T>(c, me, n);
            if c.in_place {
                comm.all_reduce_with(&mut buf, c.op, &AllReduceOptions::algo(c.algo))?;
                Ok(buf)
            } else {
                let mut out = vec![T::zeroed(); n];
                comm.all_reduce_into(&buf, &mut out, c.op)?;
                Ok(out)
            }
        }
        Kind::Broadcast => {
            let mut buf = if me == c.root {
                input::<T>(c, me, n)
            } else {
                vec![T::zeroed(); n]
            };
            comm.broadcast(&mut buf, c.root)?;
            Ok(buf)
        }
        Kind::Reduce => {
            let send = input::<T>(c, me, n);
            if c.in_place {
                let mut buf = send.clone();
                comm.reduce_in_place(&mut buf, c.op, c.root)?;
                if me == c.root {
                    Ok(buf)
                } else {
                    assert!(buf == send, "reduce_in_place changed a non-root buffer");
                    Ok(Vec::new())
                }
            } else {
                let mut out = vec![T::zeroed(); if me == c.root { n } else { 0 }];
                comm.reduce(&send, &mut out, c.op, c.root)?;
                Ok(out)
            }
        }
        Kind::AllGather => {
            let mine = input::<T>(c, me, n);
            let mut out = vec![T::zeroed(); n * p];
            if c.in_place {
                out[me * n..(me + 1) * n].copy_from_slice(&mine);
                comm.all_gather_in_place(&mut out)?;
            } else {
                comm.all_gather(&mine, &mut out)?;
            }
            Ok(out)
        }
        Kind::ReduceScatter => {
            let send = input::<T>(c, me, n * p);
            if c.in_place {
                let mut buf = send;
                comm.reduce_scatter_in_place(&mut buf, c.op)?;
                Ok(buf[me * n..(me + 1) * n].to_vec())
            } else {
                let mut out = vec![T::zeroed(); n];
                comm.reduce_scatter(&send, &mut out, c.op)?;
                Ok(out)
            }
        }
        Kind::Gather => {
            let mine = input::<T>(c, me, n);
            if c.in_place {
                if me == c.root {
                    let mut out = vec![T::zeroed(); n * p];
                    out[me * n..(me + 1) * n].copy_from_slice(&mine);
                    comm.gather_in_place(&mut out, c.root)?;
                    Ok(out)
                } else {
                    let mut buf = mine.clone();
                    comm.gather_in_place(&mut buf, c.root)?;
                    assert!(buf == mine, "gather_in_place changed a non-root buffer");
                    Ok(Vec::new())
                }
            } else {
                let mut out = vec![T::zeroed(); if me == c.root { n * p } else { 0 }];
                comm.gather(&mine, &mut out, c.root)?;
                Ok(out)
            }
        }
        Kind::Scatter => {
            let all = |_: ()| input::<T>(c, c.root, n * p);
            if c.in_place && me == c.root {
                let mut buf = all(());
                comm.scatter_in_place(&mut buf, c.root)?;
                Ok(buf[me * n..(me + 1) * n].to_vec())
            } else if c.in_place {
                let mut buf = vec![T::zeroed(); n];
                comm.scatter_in_place(&mut buf, c.root)?;
                Ok(buf)
            } else {
                let send = if me == c.root { all(()) } else { Vec::new() };
                let mut out = vec![T::zeroed(); n];
                comm.scatter(&send, &mut out, c.root)?;
                Ok(out)
            }
        }
        Kind::AllToAll => {
            let send = input::<T>(c, me, n * p);
            if c.in_place {
                let mut buf = send;
                comm.all_to_all_in_place(&mut buf)?;
                Ok(buf)
            } else {
                let mut out = vec![T::zeroed(); n * p];
                comm.all_to_all(&send, &mut out)?;
                Ok(out)
            }
        }
        Kind::Barrier => {
            comm.barrier()?;
            Ok(Vec::new())
        }
    }
}

/// The reduction over ranks `0..p` of element `i` for a float type, in f64, with the bound
/// its computation in `T` may be off by.
fn float_reference<T: TElem>(c: &Case, p: usize, i: usize) -> (f64, f64) {
    let vals: Vec<f64> = (0..p)
        .map(|r| T::make(c.op, r, i, c.salt).to_f64())
        .collect();
    let abs: f64 = vals.iter().map(|v| v.abs()).sum();
    let k = (p + 2) as f64 * T::EPS;
    match c.op {
        ReduceOp::Sum => (vals.iter().sum(), k * abs + 1e-300),
        ReduceOp::Avg => (
            vals.iter().sum::<f64>() / p as f64,
            k * abs / p as f64 + 1e-300,
        ),
        ReduceOp::Prod => {
            let w: f64 = vals.iter().product();
            (w, k * w.abs() + 1e-300)
        }
        ReduceOp::Min => (vals.iter().copied().fold(f64::INFINITY, f64::min), 0.0),
        ReduceOp::Max => (vals.iter().copied().fold(f64::NEG_INFINITY, f64::max), 0.0),
        _ => unreachable!("no other op"),
    }
}

fn check_reduced<T: TElem>(
    c: &Case,
    p: usize,
    got: &[T],
    elems: std::ops::Range<usize>,
    what: &str,
) {
    assert_eq!(got.len(), elems.len(), "{what}: length");
    for (k, i) in elems.enumerate() {
        let g = got[k];
        if T::FLOAT {
            let (want, tol) = float_reference::<T>(c, p, i);
            let err = (g.to_f64() - want).abs();
            assert!(
                err <= tol,
                "{what}: element {i} is {} but the reference is {want} (off by {err:e} > {tol:e})",
                g.to_f64()
            );
        } else {
            let want = (1..p).fold(T::make(c.op, 0, i, c.salt), |a, r| {
                T::combine(c.op, a, T::make(c.op, r, i, c.salt))
            });
            assert!(g == want, "{what}: element {i} is {g:?}, want {want:?}");
        }
    }
}

/// Checks rank `rank`'s result of case `c` in a world of `p`.
pub fn check_case<T: TElem>(c: &Case, p: usize, rank: usize, got: &[T]) {
    let n = c.count;
    let what = format!("{c:?} P={p} rank {rank}");
    match c.kind {
        Kind::AllReduce => check_reduced(c, p, got, 0..n, &what),
        Kind::Reduce => {
            if rank == c.root {
                check_reduced(c, p, got, 0..n, &what);
            } else {
                assert!(got.is_empty(), "{what}");
            }
        }
        Kind::ReduceScatter => check_reduced(c, p, got, rank * n..(rank + 1) * n, &what),
        Kind::Broadcast => {
            let want = input::<T>(c, c.root, n);
            assert!(got == &want[..], "{what}: not the root's data");
        }
        Kind::AllGather => {
            let want: Vec<T> = (0..p).flat_map(|r| input::<T>(c, r, n)).collect();
            assert!(got == &want[..], "{what}: blocks differ");
        }
        Kind::Gather => {
            if rank == c.root {
                let want: Vec<T> = (0..p).flat_map(|r| input::<T>(c, r, n)).collect();
                assert!(got == &want[..], "{what}: blocks differ");
            } else {
                assert!(got.is_empty(), "{what}");
            }
        }
        Kind::Scatter => {
            let all = input::<T>(c, c.root, n * p);
            assert!(got == &all[rank * n..(rank + 1) * n], "{what}: wrong block");
        }
        Kind::AllToAll => {
            let want: Vec<T> = (0..p)
                .flat_map(|q| input::<T>(c, q, n * p)[rank * n..(rank + 1) * n].to_vec())
                .collect();
            assert!(got == &want[..], "{what}: wrong blocks");
        }
        Kind::Barrier => {}
    }
}

/// Runs `c` with the element type of its dtype and returns the result as bytes.
pub fn run_bytes(comm: &Communicator, c: &Case) -> Result<Vec<u8>, ferrocomm::Error> {
    fn go<T: TElem>(comm: &Communicator, c: &Case) -> Result<Vec<u8>, ferrocomm::Error> {
        run_case::<T>(comm, c).map(|v| bytemuck::cast_slice(&v).to_vec())
    }
    match c.dtype {
        DType::U8 => go::<u8>(comm, c),
        DType::U16 => go::<u16>(comm, c),
        DType::U32 => go::<u32>(comm, c),
        DType::U64 => go::<u64>(comm, c),
        DType::I8 => go::<i8>(comm, c),
        DType::I16 => go::<i16>(comm, c),
        DType::I32 => go::<i32>(comm, c),
        DType::I64 => go::<i64>(comm, c),
        DType::F16 => go::<f16>(comm, c),
        DType::BF16 => go::<bf16>(comm, c),
        DType::F32 => go::<f32>(comm, c),
        DType::F64 => go::<f64>(comm, c),
        other => panic!("no test element type for {other}"),
    }
}

/// Checks a result given as bytes.
pub fn check_bytes(c: &Case, p: usize, rank: usize, got: &[u8]) {
    fn go<T: TElem>(c: &Case, p: usize, rank: usize, got: &[u8]) {
        // Copy into an aligned vector.
        let mut v = vec![T::zeroed(); got.len() / std::mem::size_of::<T>()];
        bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(got);
        check_case::<T>(c, p, rank, &v)
    }
    match c.dtype {
        DType::U8 => go::<u8>(c, p, rank, got),
        DType::U16 => go::<u16>(c, p, rank, got),
        DType::U32 => go::<u32>(c, p, rank, got),
        DType::U64 => go::<u64>(c, p, rank, got),
        DType::I8 => go::<i8>(c, p, rank, got),
        DType::I16 => go::<i16>(c, p, rank, got),
        DType::I32 => go::<i32>(c, p, rank, got),
        DType::I64 => go::<i64>(c, p, rank, got),
        DType::F16 => go::<f16>(c, p, rank, got),
        DType::BF16 => go::<bf16>(c, p, rank, got),
        DType::F32 => go::<f32>(c, p, rank, got),
        DType::F64 => go::<f64>(c, p, rank, got),
        other => panic!("no test element type for {other}"),
    }
}

/// The ops that apply to `dtype`.
pub fn ops_for(dtype: DType) -> Vec<ReduceOp> {
    ReduceOp::ALL
        .into_iter()
        .filter(|op| op.check(dtype, "test").is_ok())
        .collect()
}

/// A 64-bit digest of bytes (for bit-identity checks between processes).
pub fn digest(b: &[u8]) -> u64 {
    b.chunks(8).fold(b.len() as u64, |h, c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        hash(h ^ u64::from_le_bytes(w))
    })
}
