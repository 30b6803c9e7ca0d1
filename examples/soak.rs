//! Soak: many collectives of random kinds, sizes, element types, reduction operations and
//! roots, every result checked against a reference computed locally, with the resident
//! memory (VmRSS) printed at the start, after a warm-up and at the end.
//!
//! ```text
//! cargo build --release --examples --bins
//! target/release/ferrorun --nproc-per-node 4 -- target/release/examples/soak 100000
//! ```
//! Arguments: the number of collectives (default 10,000) and a seed (hexadecimal, default
//! 1; every rank must get the same). Every rank derives the same sequence of calls from the
//! seed, so the ranks agree on each call without exchanging anything. Each rank prints one
//! `SOAK` line at the end; the exit status is non-zero if a call failed or a result did
//! not match.
//!
//! The contributions are small integers (0 to 3, or 1 to 2 for products), so sums, products,
//! minima and maxima are exact in every type (8-bit integers and 16-bit floats included) and
//! in any order of reduction; averages are compared with a small relative tolerance.

use std::process::ExitCode;
use std::time::Instant;

use ferrocomm::{Communicator, Element, ReduceOp};
use half::{bf16, f16};

fn main() -> ExitCode {
    ferrocomm::init_logging();
    let mut args = std::env::args().skip(1);
    let n = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000u64);
    let seed = args
        .next()
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .unwrap_or(1);
    let comm = match ferrocomm::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::FAILURE;
        }
    };
    match soak(&comm, n, seed) {
        Ok(s) => {
            println!("{s}");
            if s.mismatches == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("soak rank {}: {e}", comm.rank());
            ExitCode::FAILURE
        }
    }
}

/// What one rank's soak did.
pub struct Summary {
    /// This rank.
    pub rank: usize,
    /// Collectives run.
    pub calls: u64,
    /// Collectives whose result differed from the reference.
    pub mismatches: u64,
    /// The first mismatch, described.
    pub first_mismatch: Option<String>,
    /// Elements checked.
    pub elements: u64,
    /// Seconds the loop took.
    pub secs: f64,
    /// VmRSS (KiB) after init, after the first 2% of the calls, after half of them, and at
    /// the end: flat from the second on when nothing leaks.
    pub rss_kib: [u64; 4],
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SOAK rank={} calls={} mismatches={} elements={} secs={:.1} rss_start_kib={} \
             rss_warm_kib={} rss_half_kib={} rss_end_kib={}",
            self.rank,
            self.calls,
            self.mismatches,
            self.elements,
            self.secs,
            self.rss_kib[0],
            self.rss_kib[1],
            self.rss_kib[2],
            self.rss_kib[3]
        )?;
        if let Some(m) = &self.first_mismatch {
            write!(f, " first_mismatch=\"{m}\"")?;
        }
        Ok(())
    }
}

/// This process's resident memory (VmRSS, KiB), 0 if unknown.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// splitmix64.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// An element type the soak uses: built from small integers, combined like the library's
/// reductions.
trait Val: Element + PartialEq + std::fmt::Debug {
    const FLOAT: bool;
    fn small(v: u8) -> Self;
    fn as_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
    fn combine(op: ReduceOp, a: Self, b: Self) -> Self;
}

macro_rules! int_val {
    ($($t:ty),*) => {$(
        impl Val for $t {
            const FLOAT: bool = false;
            fn small(v: u8) -> Self {
                v as $t
            }
            fn as_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                match op {
                    ReduceOp::Prod => a.wrapping_mul(b),
                    ReduceOp::Min => a.min(b),
                    ReduceOp::Max => a.max(b),
                    // Sum and Avg (drawn only for floats); ReduceOp is non-exhaustive.
                    _ => a.wrapping_add(b),
                }
            }
        }
    )*};
}
int_val!(u8, i16, u32, i64);

macro_rules! float_val {
    ($($t:ty: $from:expr, $to:expr),*) => {$(
        impl Val for $t {
            const FLOAT: bool = true;
            fn small(v: u8) -> Self {
                Self::from_f64(v as f64)
            }
            fn as_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(x: f64) -> Self {
                $from(x)
            }
            fn combine(op: ReduceOp, a: Self, b: Self) -> Self {
                let (x, y) = (a.as_f64(), b.as_f64());
                let r = match op {
                    ReduceOp::Prod => x * y,
                    ReduceOp::Min => x.min(y),
                    ReduceOp::Max => x.max(y),
                    // Sum and Avg (divided later); ReduceOp is non-exhaustive.
                    _ => x + y,
                };
                Self::from_f64(r)
            }
        }
    )*};
}
float_val!(
    f32: |v: f64| v as f32, |v: f32| v as f64,
    f64: |v: f64| v, |v: f64| v,
    f16: f16::from_f64, |v: f16| v.to_f64(),
    bf16: bf16::from_f64, |v: bf16| v.to_f64()
);

/// The collectives the soak draws from.
#[derive(Clone, Copy, Debug)]
enum Kind {
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

const KINDS: [Kind; 9] = [
    Kind::AllReduce,
    Kind::AllReduce,
    Kind::Broadcast,
    Kind::Reduce,
    Kind::AllGather,
    Kind::ReduceScatter,
    Kind::Gather,
    Kind::Scatter,
    Kind::AllToAll,
];

/// One call, the same on every rank.
struct Plan {
    i: u64,
    kind: Kind,
    op: ReduceOp,
    /// Elements per block (per rank for block-wise collectives, the whole buffer otherwise).
    count: usize,
    root: usize,
    salt: u64,
}

impl Plan {
    fn new(seed: u64, i: u64, size: usize, float: bool) -> Plan {
        let r = mix(seed ^ mix(i));
        let kind = if r % 64 == 63 {
            Kind::Barrier
        } else {
            KINDS[(r >> 8) as usize % KINDS.len()]
        };
        let ops: &[ReduceOp] = if float {
            &[
                ReduceOp::Sum,
                ReduceOp::Prod,
                ReduceOp::Min,
                ReduceOp::Max,
                ReduceOp::Avg,
            ]
        } else {
            &[ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max]
        };
        let op = ops[(r >> 16) as usize % ops.len()];
        // Mostly small (eager), one in 16 up to 64 Ki elements (rendezvous, pipelined).
        let c = mix(r);
        let count = if c.is_multiple_of(16) {
            1 + (c >> 8) as usize % (64 * 1024)
        } else {
            1 + (c >> 8) as usize % 1024
        };
        let root = (r >> 24) as usize % size;
        Plan {
            i,
            kind,
            op,
            count,
            root,
            salt: mix(r ^ 0x5eed),
        }
    }

    /// Rank `rank`'s contribution at index `j` (a small integer).
    fn value<T: Val>(&self, rank: usize, j: usize) -> T {
        let v = (mix(self.salt ^ (rank as u64) << 40 ^ j as u64) >> 32) as u8;
        T::small(if self.op == ReduceOp::Prod {
            1 + v % 2
        } else {
            v % 4
        })
    }

    /// The reduction of every rank's contribution at index `j`.
    fn reduced<T: Val>(&self, size: usize, j: usize) -> T {
        let mut acc = self.value::<T>(0, j);
        for r in 1..size {
            acc = T::combine(self.op, acc, self.value(r, j));
        }
        if self.op == ReduceOp::Avg {
            // Compared with a tolerance (see `same`).
            return T::from_f64(acc.as_f64() / size as f64);
        }
        acc
    }
}

fn same<T: Val>(op: ReduceOp, got: T, want: T) -> bool {
    if T::FLOAT && op == ReduceOp::Avg {
        let (g, w) = (got.as_f64(), want.as_f64());
        // 16-bit floats carry 8 (bf16) or 11 (f16) significant bits.
        (g - w).abs() <= 1e-2 * w.abs().max(1.0)
    } else {
        got == want
    }
}

/// Runs `n` collectives on `comm` drawn from `seed`; every rank must call it with the same
/// arguments. A failed call ends the soak with its error; mismatches are counted.
pub fn soak(comm: &Communicator, n: u64, seed: u64) -> Result<Summary, String> {
    let mut s = Summary {
        rank: comm.rank(),
        calls: 0,
        mismatches: 0,
        first_mismatch: None,
        elements: 0,
        secs: 0.0,
        rss_kib: [rss_kib(), 0, 0, 0],
    };
    let warm = (n / 50).max(1);
    let started = Instant::now();
    for i in 0..n {
        let ty = mix(seed ^ mix(i) ^ 0x7e) % 8;
        let r = match ty {
            0 => one::<u8>(comm, seed, i, &mut s),
            1 => one::<i16>(comm, seed, i, &mut s),
            2 => one::<u32>(comm, seed, i, &mut s),
            3 => one::<i64>(comm, seed, i, &mut s),
            4 => one::<f32>(comm, seed, i, &mut s),
            5 => one::<f64>(comm, seed, i, &mut s),
            6 => one::<f16>(comm, seed, i, &mut s),
            _ => one::<bf16>(comm, seed, i, &mut s),
        };
        r.map_err(|e| format!("call {i}: {e}"))?;
        s.calls += 1;
        if i + 1 == warm {
            s.rss_kib[1] = rss_kib();
        }
        if i + 1 == n / 2 {
            s.rss_kib[2] = rss_kib();
        }
    }
    comm.barrier().map_err(|e| format!("final barrier: {e}"))?;
    s.secs = started.elapsed().as_secs_f64();
    s.rss_kib[3] = rss_kib();
    Ok(s)
}

/// Runs call `i` with element type `T` and checks its result.
fn one<T: Val>(comm: &Communicator, seed: u64, i: u64, s: &mut Summary) -> ferrocomm::Result<()> {
    let (me, p) = (comm.rank(), comm.size());
    let plan = Plan::new(seed, i, p, T::FLOAT);
    let b = plan.count;
    let v = |r: usize, j: usize| plan.value::<T>(r, j);
    // (index, got, want) of the result to check.
    let mut check = |got: &[T], want: &dyn Fn(usize) -> T| {
        s.elements += got.len() as u64;
        if let Some(j) = (0..got.len()).find(|&j| !same(plan.op, got[j], want(j))) {
            s.mismatches += 1;
            s.first_mismatch.get_or_insert_with(|| {
                format!(
                    "call {} {:?} {:?} {:?} count {b} root {}: element {j} is {:?}, expected {:?}",
                    plan.i,
                    plan.kind,
                    T::DTYPE,
                    plan.op,
                    plan.root,
                    got[j],
                    want(j)
                )
            });
        }
    };
    match plan.kind {
        Kind::AllReduce => {
            let mut buf: Vec<T> = (0..b).map(|j| v(me, j)).collect();
            comm.all_reduce(&mut buf, plan.op)?;
            check(&buf, &|j| plan.reduced(p, j));
        }
        Kind::Broadcast => {
            let mut buf: Vec<T> = (0..b)
                .map(|j| {
                    if me == plan.root {
                        v(me, j)
                    } else {
                        T::small(9)
                    }
                })
                .collect();
            comm.broadcast(&mut buf, plan.root)?;
            check(&buf, &|j| v(plan.root, j));
        }
        Kind::Reduce => {
            let send: Vec<T> = (0..b).map(|j| v(me, j)).collect();
            let mut recv = vec![T::small(9); if me == plan.root { b } else { 0 }];
            comm.reduce(&send, &mut recv, plan.op, plan.root)?;
            check(&recv, &|j| plan.reduced(p, j));
        }
        Kind::AllGather => {
            let send: Vec<T> = (0..b).map(|j| v(me, j)).collect();
            let mut recv = vec![T::small(9); b * p];
            comm.all_gather(&send, &mut recv)?;
            check(&recv, &|k| v(k / b, k % b));
        }
        Kind::ReduceScatter => {
            let send: Vec<T> = (0..b * p).map(|k| v(me, k)).collect();
            let mut recv = vec![T::small(9); b];
            comm.reduce_scatter(&send, &mut recv, plan.op)?;
            check(&recv, &|j| plan.reduced(p, me * b + j));
        }
        Kind::Gather => {
            let send: Vec<T> = (0..b).map(|j| v(me, j)).collect();
            let mut recv = vec![T::small(9); if me == plan.root { b * p } else { 0 }];
            comm.gather(&send, &mut recv, plan.root)?;
            check(&recv, &|k| v(k / b, k % b));
        }
        Kind::Scatter => {
            let send: Vec<T> = if me == plan.root {
                (0..b * p).map(|k| v(me, k)).collect()
            } else {
                Vec::new()
            };
            let mut recv = vec![T::small(9); b];
            comm.scatter(&send, &mut recv, plan.root)?;
            check(&recv, &|j| v(plan.root, me * b + j));
        }
        Kind::AllToAll => {
            // Block for rank t from rank f: f's values at t*b.., which t can compute.
            let send: Vec<T> = (0..b * p).map(|k| v(me, k)).collect();
            let mut recv = vec![T::small(9); b * p];
            comm.all_to_all(&send, &mut recv)?;
            check(&recv, &|k| v(k / b, me * b + k % b));
        }
        Kind::Barrier => comm.barrier()?,
    }
    Ok(())
}
