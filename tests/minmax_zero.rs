//! Min and Max of floats through the collectives give exactly the bits of a sequential
//! reduction with IEEE 754-2019 `minimum`/`maximum` (`-0.0 < +0.0`; any NaN gives the
//! canonical quiet NaN), whatever the algorithm and the world size (issue 13, item 11).
//!
//! Every reducing collective (all_reduce with each algorithm forced, reduce, reduce_scatter
//! at sizes that make each of their algorithms run), `f16`, `bf16`, `f32` and `f64`, world
//! sizes 2..=8 on local threads. The inputs put every combination of `+0.0`/`-0.0` over the
//! ranks into the first `2^P` elements, then a mix of zeros, ones, subnormals, infinities
//! and NaNs of both signs with assorted payloads. The reference here is written
//! independently of the kernels (`f64::total_cmp`, which orders `-0.0` before `+0.0`).
//! Operations time out after a generous bound so that a hang fails; nothing is timed.

use std::collections::BTreeSet;
use std::time::Duration;

use ferrocomm::collective::select::{choose_reduce, choose_reduce_scatter};
use ferrocomm::{
    Algorithm, AllReduceAlgo, AllReduceOptions, CommConfig, Communicator, Element, ReduceOp,
};
use half::{bf16, f16};

/// A float element type seen through its bits.
trait Float: Element {
    /// The canonical quiet NaN's bits.
    const NAN: u64;
    /// Zeros, ±1, the smallest subnormals, infinities; then NaNs (quiet and signalling,
    /// both signs, several payloads). The first `ORDINARY` are not NaNs.
    const VALUES: &'static [u64];
    fn from_u64(bits: u64) -> Self;
    fn to_u64(self) -> u64;
    fn wide(self) -> f64;
}

const ORDINARY: usize = 10;

macro_rules! float {
    ($t:ty, $u:ty, $nan:expr, [$($v:expr),* $(,)?], $wide:expr) => {
        impl Float for $t {
            const NAN: u64 = $nan;
            const VALUES: &'static [u64] = &[$($v),*];
            fn from_u64(bits: u64) -> Self {
                <$t>::from_bits(bits as $u)
            }
            fn to_u64(self) -> u64 {
                self.to_bits() as u64
            }
            fn wide(self) -> f64 {
                ($wide)(self)
            }
        }
    };
}

float!(
    f16,
    u16,
    0x7E00,
    [
        0x0000, 0x8000, 0x0000, 0x8000, 0x3C00, 0xBC00, 0x0001, 0x8001, 0x7C00, 0xFC00, 0x7E00,
        0xFE00, 0x7E01, 0x7C01, 0xFD55, 0x7FFF,
    ],
    |x: f16| x.to_f64()
);
float!(
    bf16,
    u16,
    0x7FC0,
    [
        0x0000, 0x8000, 0x0000, 0x8000, 0x3F80, 0xBF80, 0x0001, 0x8001, 0x7F80, 0xFF80, 0x7FC0,
        0xFFC0, 0x7FC1, 0x7F81, 0xFFAA, 0x7FFF,
    ],
    |x: bf16| x.to_f64()
);
float!(
    f32,
    u32,
    0x7FC0_0000,
    [
        0,
        0x8000_0000,
        0,
        0x8000_0000,
        0x3F80_0000,
        0xBF80_0000,
        1,
        0x8000_0001,
        0x7F80_0000,
        0xFF80_0000,
        0x7FC0_0000,
        0xFFC0_0000,
        0x7FC0_0001,
        0x7F80_0001,
        0xFFA0_5555,
        0x7FFF_FFFF,
    ],
    |x: f32| x as f64
);
float!(
    f64,
    u64,
    0x7FF8_0000_0000_0000,
    [
        0,
        0x8000_0000_0000_0000,
        0,
        0x8000_0000_0000_0000,
        0x3FF0_0000_0000_0000,
        0xBFF0_0000_0000_0000,
        1,
        0x8000_0000_0000_0001,
        0x7FF0_0000_0000_0000,
        0xFFF0_0000_0000_0000,
        0x7FF8_0000_0000_0000,
        0xFFF8_0000_0000_0000,
        0x7FF8_0000_0000_0001,
        0x7FF0_0000_0000_0001,
        0xFFF5_5555_5555_5555,
        0x7FFF_FFFF_FFFF_FFFF,
    ],
    |x: f64| x
);

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Rank `rank`'s element `i` of a world of `p`.
fn input<T: Float>(p: usize, rank: usize, i: usize, salt: u64) -> T {
    if i < 1 << p {
        // Bit `rank` of `i` chooses -0.0: every sign pattern over the ranks.
        return T::from_u64(T::VALUES[(i >> rank) & 1]);
    }
    let h = mix(salt ^ ((i as u64) << 8) ^ rank as u64);
    // About one NaN in 16 operands, so that most elements are not NaN.
    let k = if h.is_multiple_of(16) {
        ORDINARY + (h >> 8) as usize % (T::VALUES.len() - ORDINARY)
    } else {
        (h >> 8) as usize % ORDINARY
    };
    T::from_u64(T::VALUES[k])
}

/// The sequential reduction over ranks `0..p` of element `i`, as bits.
fn sequential<T: Float>(op: ReduceOp, p: usize, i: usize, salt: u64) -> u64 {
    let mut acc = input::<T>(p, 0, i, salt);
    for r in 1..p {
        let b = input::<T>(p, r, i, salt);
        let (x, y) = (acc.wide(), b.wide());
        acc = if x.is_nan() || y.is_nan() {
            T::from_u64(T::NAN)
        } else {
            let b_wins = match op {
                ReduceOp::Min => y.total_cmp(&x).is_lt(),
                _ => y.total_cmp(&x).is_gt(),
            };
            if b_wins { b } else { acc }
        };
    }
    acc.to_u64()
}

/// A local world of `p` ranks that sleeps rather than spins and fails a hang after 120 s.
fn world(p: usize) -> Vec<Communicator> {
    let mut cfg = CommConfig::from_env(p).expect("config");
    cfg.op_timeout = Some(Duration::from_secs(120));
    cfg.spin = Duration::ZERO;
    Communicator::local_world_with(p, cfg)
}

/// One call on every rank.
#[derive(Clone, Copy, Debug)]
enum Call {
    AllReduce(AllReduceAlgo, usize),
    Reduce { count: usize, root: usize },
    ReduceScatter { block: usize },
}

/// Runs `calls` with `op` on a world of `p` ranks and checks every result element's bits
/// against the sequential reduction.
fn check<T: Float>(p: usize, op: ReduceOp, calls: &[Call]) {
    let results: Vec<Vec<Vec<T>>> = std::thread::scope(|s| {
        let hs: Vec<_> = world(p)
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let r = c.rank();
                    let mut out = vec![];
                    for (k, call) in calls.iter().enumerate() {
                        let salt = k as u64;
                        let data = |n: usize| -> Vec<T> {
                            (0..n).map(|i| input::<T>(p, r, i, salt)).collect()
                        };
                        let what = format!("{} {op} {call:?} on rank {r} of {p}", T::DTYPE);
                        match *call {
                            Call::AllReduce(algo, n) => {
                                let mut buf = data(n);
                                c.all_reduce_with(&mut buf, op, &AllReduceOptions::algo(algo))
                                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                                out.push(buf);
                            }
                            Call::Reduce { count, root } => {
                                let send = data(count);
                                let mut recv =
                                    vec![T::from_u64(0); if r == root { count } else { 0 }];
                                c.reduce(&send, &mut recv, op, root)
                                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                                out.push(recv);
                            }
                            Call::ReduceScatter { block } => {
                                let send = data(block * p);
                                let mut recv = vec![T::from_u64(0); block];
                                c.reduce_scatter(&send, &mut recv, op)
                                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                                out.push(recv);
                            }
                        }
                    }
                    out
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    });
    for (k, call) in calls.iter().enumerate() {
        let salt = k as u64;
        let total = match *call {
            Call::AllReduce(_, n) => n,
            Call::Reduce { count, .. } => count,
            Call::ReduceScatter { block } => block * p,
        };
        let want: Vec<u64> = (0..total)
            .map(|i| sequential::<T>(op, p, i, salt))
            .collect();
        for (r, outs) in results.iter().enumerate() {
            // The part of the full result rank `r` holds.
            let range = match *call {
                Call::AllReduce(..) => 0..total,
                Call::Reduce { root, .. } => 0..if r == root { total } else { 0 },
                Call::ReduceScatter { block } => r * block..(r + 1) * block,
            };
            let got = &outs[k];
            assert_eq!(got.len(), range.len(), "{call:?}");
            for (v, i) in got.iter().zip(range) {
                assert_eq!(
                    v.to_u64(),
                    want[i],
                    "{} {op} {call:?}, world of {p}: rank {r} element {i} is {:#x}, the \
                     sequential rule gives {:#x}; inputs {:x?}",
                    T::DTYPE,
                    v.to_u64(),
                    want[i],
                    (0..p)
                        .map(|q| input::<T>(p, q, i, salt).to_u64())
                        .collect::<Vec<_>>(),
                );
            }
        }
    }
}

/// The calls for a world of `p` and element size `size`: all_reduce with each algorithm
/// at a small size, ring and halving-doubling also at 1 MiB, reduce and reduce_scatter below and
/// above their algorithm thresholds. Records the reduce and reduce_scatter algorithms that
/// the library will choose in `seen`.
fn calls(p: usize, size: usize, seen: &mut BTreeSet<String>) -> Vec<Call> {
    let small = (1 << p) + 300;
    let large = (1 << 20) / size;
    let mut v = vec![];
    for algo in [
        AllReduceAlgo::Ring,
        AllReduceAlgo::HalvingDoubling,
        AllReduceAlgo::RecursiveDoubling,
        AllReduceAlgo::Auto,
    ] {
        v.push(Call::AllReduce(algo, small));
    }
    // The bandwidth algorithms at 1 MiB: several segments per rank, cut into pieces.
    for algo in [AllReduceAlgo::Ring, AllReduceAlgo::HalvingDoubling] {
        v.push(Call::AllReduce(algo, large));
    }
    // A count that is no multiple of the world size, so blocks differ in length.
    let big_reduce = (512 << 10) / size + 3;
    for (count, root) in [(small, 0), (big_reduce, p - 1)] {
        seen.insert(format!("{:?}", choose_reduce(p, count, count * size)));
        v.push(Call::Reduce { count, root });
    }
    for block in [small / p + 1, large / p + 1] {
        seen.insert(format!("{:?}", choose_reduce_scatter(p, block * p * size)));
        v.push(Call::ReduceScatter { block });
    }
    v
}

fn every_world<T: Float>() {
    let mut seen = BTreeSet::new();
    for p in 2..=8 {
        let calls = calls(p, std::mem::size_of::<T>(), &mut seen);
        for op in [ReduceOp::Min, ReduceOp::Max] {
            check::<T>(p, op, &calls);
        }
    }
    // The sizes above make every reduce and reduce_scatter algorithm run.
    let want: BTreeSet<String> = [
        Algorithm::ReduceBinomial,
        Algorithm::ReduceScatterGather,
        Algorithm::ReduceScatterRing,
        Algorithm::ReduceScatterRecursiveHalving,
    ]
    .iter()
    .map(|a| format!("{a:?}"))
    .collect();
    assert_eq!(seen, want);
}

#[test]
fn f16_min_max_match_the_sequential_rule_on_every_algorithm() {
    every_world::<f16>();
}

#[test]
fn bf16_min_max_match_the_sequential_rule_on_every_algorithm() {
    every_world::<bf16>();
}

#[test]
fn f32_min_max_match_the_sequential_rule_on_every_algorithm() {
    every_world::<f32>();
}

#[test]
fn f64_min_max_match_the_sequential_rule_on_every_algorithm() {
    every_world::<f64>();
}

#[test]
fn signed_zeros_give_the_documented_answer_on_two_ranks() {
    // The case of the issue, spelt out: rank 0 has +0.0, rank 1 has -0.0 (and the reverse).
    for algo in [
        AllReduceAlgo::Ring,
        AllReduceAlgo::HalvingDoubling,
        AllReduceAlgo::RecursiveDoubling,
    ] {
        let got: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = world(2)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let mine = if c.rank() == 0 {
                            [0.0f32, -0.0]
                        } else {
                            [-0.0, 0.0]
                        };
                        let mut min = mine;
                        let mut max = mine;
                        let o = AllReduceOptions::algo(algo);
                        c.all_reduce_with(&mut min, ReduceOp::Min, &o).expect("min");
                        c.all_reduce_with(&mut max, ReduceOp::Max, &o).expect("max");
                        [min, max].concat()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("rank")).collect()
        });
        for g in got {
            let bits: Vec<u32> = g.iter().map(|x| x.to_bits()).collect();
            assert_eq!(bits, [0x8000_0000, 0x8000_0000, 0, 0], "{algo}");
        }
    }
}
