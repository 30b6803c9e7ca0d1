//! Every algorithm's schedules run in memory ([`schedule::simulate`]) against a sequential
//! reference, for many world sizes and counts, without any communicator.

use super::schedule::{Schedule, simulate};
use super::select::Algorithm;
use crate::element::Order;

fn sizes() -> Vec<usize> {
    let mut v: Vec<usize> = (1..=33).collect();
    v.extend([48, 64, 100]);
    v
}

fn counts(p: usize) -> Vec<usize> {
    let mut c = vec![0, 1, p.saturating_sub(1), p, 2 * p + 3, 257];
    c.dedup();
    c
}

fn value(rank: usize, i: usize) -> u64 {
    (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(1_000_003)
}

fn sum(acc: &mut [u64], other: &[u64], _: Order) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a = a.wrapping_add(*b);
    }
}

fn schedules(
    algo: Algorithm,
    p: usize,
    count: usize,
    root: usize,
    in_place: bool,
) -> Vec<Schedule> {
    (0..p)
        .map(|r| algo.schedule(r, p, count, root, in_place))
        .collect()
}

const ALL_REDUCE: [Algorithm; 3] = [
    Algorithm::AllReduceRing,
    Algorithm::AllReduceHalvingDoubling,
    Algorithm::AllReduceRecursiveDoubling,
];

#[test]
fn all_reduce_sums() {
    for p in sizes() {
        for n in counts(p) {
            let want: Vec<u64> = (0..n)
                .map(|i| (0..p).fold(0u64, |a, r| a.wrapping_add(value(r, i))))
                .collect();
            for algo in ALL_REDUCE {
                let mut out: Vec<Vec<u64>> = (0..p)
                    .map(|r| (0..n).map(|i| value(r, i)).collect())
                    .collect();
                let inp = vec![Vec::new(); p];
                simulate(&schedules(algo, p, n, 0, true), &inp, &mut out, &sum);
                for (r, o) in out.iter().enumerate() {
                    assert_eq!(o, &want, "{algo} P={p} n={n} rank {r}");
                }
            }
        }
    }
}

#[test]
fn out_of_place_all_reduce_reads_the_input_and_copies_less() {
    for p in sizes() {
        for n in counts(p) {
            let want: Vec<u64> = (0..n)
                .map(|i| (0..p).fold(0u64, |a, r| a.wrapping_add(value(r, i))))
                .collect();
            for algo in ALL_REDUCE {
                let inp: Vec<Vec<u64>> = (0..p)
                    .map(|r| (0..n).map(|i| value(r, i)).collect())
                    .collect();
                // The output starts as garbage: everything in it must be written.
                let mut out: Vec<Vec<u64>> = (0..p).map(|_| vec![u64::MAX / 3; n]).collect();
                let scheds = schedules(algo, p, n, 0, false);
                simulate(&scheds, &inp, &mut out, &sum);
                for (r, o) in out.iter().enumerate() {
                    assert_eq!(o, &want, "{algo} P={p} n={n} rank {r}");
                }
                // Never more copying than the whole input once.
                for s in &scheds {
                    let copied: usize = s
                        .steps
                        .iter()
                        .map(|st| match &st.op {
                            super::schedule::Op::Copy { range, .. } => range.len(),
                            _ => 0,
                        })
                        .sum();
                    assert!(copied <= n, "{algo} P={p} n={n} copies {copied}");
                }
            }
        }
    }
    // Two ranks: the ring and halving-doubling copy only the half each rank reduces.
    for algo in [
        Algorithm::AllReduceRing,
        Algorithm::AllReduceHalvingDoubling,
    ] {
        for s in schedules(algo, 2, 1000, 0, false) {
            let copied: usize = s
                .steps
                .iter()
                .map(|st| match &st.op {
                    super::schedule::Op::Copy { range, .. } => range.len(),
                    _ => 0,
                })
                .sum();
            assert_eq!(copied, 500, "{algo}");
        }
    }
}

/// `x -> a x + b`, composed left to right: associative, not commutative. A rank-ordered
/// reduction gives exactly the composition in rank order.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Affine(u64, u64);

fn compose(f: Affine, g: Affine) -> Affine {
    Affine(
        f.0.wrapping_mul(g.0),
        f.1.wrapping_mul(g.0).wrapping_add(g.1),
    )
}

#[test]
fn doubling_algorithms_reduce_in_rank_order_on_every_rank() {
    // Lower rank's operand first, at every step, including the fold of non-powers of two:
    // with a non-commutative operation every rank must end with f_0 ∘ f_1 ∘ ... ∘ f_{P-1}.
    let apply = |acc: &mut [Affine], other: &[Affine], order: Order| {
        for (a, b) in acc.iter_mut().zip(other) {
            *a = match order {
                Order::MineFirst => compose(*a, *b),
                Order::TheirsFirst => compose(*b, *a),
            };
        }
    };
    for p in sizes() {
        let f = |r: usize, i: usize| Affine(value(r, i) | 1, value(r + 7, i));
        for n in [1, p, 3 * p + 1] {
            let want: Vec<Affine> = (0..n)
                .map(|i| (1..p).fold(f(0, i), |a, r| compose(a, f(r, i))))
                .collect();
            for algo in [
                Algorithm::AllReduceRecursiveDoubling,
                Algorithm::AllReduceHalvingDoubling,
            ] {
                let mut out: Vec<Vec<Affine>> =
                    (0..p).map(|r| (0..n).map(|i| f(r, i)).collect()).collect();
                simulate(
                    &schedules(algo, p, n, 0, true),
                    &vec![Vec::new(); p],
                    &mut out,
                    &apply,
                );
                for (r, o) in out.iter().enumerate() {
                    assert_eq!(o, &want, "{algo} P={p} n={n} rank {r}");
                }
            }
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    for p in sizes() {
        for n in counts(p) {
            for root in [0, p / 2, p - 1] {
                for algo in [
                    Algorithm::BroadcastBinomial,
                    Algorithm::BroadcastScatterAllGather,
                ] {
                    let mut out: Vec<Vec<u64>> = (0..p)
                        .map(|r| {
                            (0..n)
                                .map(|i| if r == root { value(r, i) } else { 0 })
                                .collect()
                        })
                        .collect();
                    simulate(
                        &schedules(algo, p, n, root, true),
                        &vec![Vec::new(); p],
                        &mut out,
                        &sum,
                    );
                    let want: Vec<u64> = (0..n).map(|i| value(root, i)).collect();
                    for (r, o) in out.iter().enumerate() {
                        assert_eq!(o, &want, "{algo} P={p} n={n} root {root} rank {r}");
                    }
                }
            }
        }
    }
}

#[test]
fn reduce_to_every_root_in_and_out_of_place() {
    for p in sizes() {
        for n in counts(p) {
            let want: Vec<u64> = (0..n)
                .map(|i| (0..p).fold(0u64, |a, r| a.wrapping_add(value(r, i))))
                .collect();
            for root in [0, p / 2, p - 1] {
                for algo in [Algorithm::ReduceBinomial, Algorithm::ReduceScatterGather] {
                    for in_place in [false, true] {
                        let data = |r: usize| (0..n).map(|i| value(r, i)).collect::<Vec<u64>>();
                        let inp: Vec<Vec<u64>> = (0..p)
                            .map(|r| {
                                if in_place && r == root {
                                    Vec::new()
                                } else {
                                    data(r)
                                }
                            })
                            .collect();
                        let mut out: Vec<Vec<u64>> = (0..p)
                            .map(|r| match (r == root, in_place) {
                                (true, true) => data(r),
                                (true, false) => vec![0; n],
                                _ => Vec::new(),
                            })
                            .collect();
                        let before = inp.clone();
                        simulate(&schedules(algo, p, n, root, in_place), &inp, &mut out, &sum);
                        assert_eq!(
                            out[root], want,
                            "{algo} P={p} n={n} root {root} in place {in_place}"
                        );
                        assert_eq!(inp, before, "inputs unchanged");
                    }
                }
            }
        }
    }
}

#[test]
fn all_gather_and_reduce_scatter_blocks() {
    for p in sizes() {
        for b in [0, 1, 3, 17] {
            let mut ag = vec![Algorithm::AllGatherRing];
            let mut rs = vec![Algorithm::ReduceScatterRing];
            if p.is_power_of_two() {
                ag.push(Algorithm::AllGatherRecursiveDoubling);
                rs.push(Algorithm::ReduceScatterRecursiveHalving);
            }
            let all: Vec<u64> = (0..p * b).map(|i| value(i / b.max(1), i)).collect();
            for &algo in &ag {
                for in_place in [false, true] {
                    let inp: Vec<Vec<u64>> = (0..p)
                        .map(|r| {
                            if in_place {
                                Vec::new()
                            } else {
                                all[r * b..(r + 1) * b].to_vec()
                            }
                        })
                        .collect();
                    let mut out: Vec<Vec<u64>> = (0..p)
                        .map(|r| {
                            let mut o = vec![0; p * b];
                            if in_place {
                                o[r * b..(r + 1) * b].copy_from_slice(&all[r * b..(r + 1) * b]);
                            }
                            o
                        })
                        .collect();
                    simulate(&schedules(algo, p, b, 0, in_place), &inp, &mut out, &sum);
                    for (r, o) in out.iter().enumerate() {
                        assert_eq!(o, &all, "{algo} P={p} b={b} in place {in_place} rank {r}");
                    }
                }
            }
            let full = |r: usize| (0..p * b).map(|i| value(r, i)).collect::<Vec<u64>>();
            let want: Vec<u64> = (0..p * b)
                .map(|i| (0..p).fold(0u64, |a, r| a.wrapping_add(value(r, i))))
                .collect();
            for &algo in &rs {
                for in_place in [false, true] {
                    let inp: Vec<Vec<u64>> = (0..p)
                        .map(|r| if in_place { Vec::new() } else { full(r) })
                        .collect();
                    let mut out: Vec<Vec<u64>> = (0..p)
                        .map(|r| if in_place { full(r) } else { vec![0; b] })
                        .collect();
                    simulate(&schedules(algo, p, b, 0, in_place), &inp, &mut out, &sum);
                    for (r, o) in out.iter().enumerate() {
                        let got = if in_place {
                            &o[r * b..(r + 1) * b]
                        } else {
                            &o[..]
                        };
                        assert_eq!(
                            got,
                            &want[r * b..(r + 1) * b],
                            "{algo} P={p} b={b} rank {r}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn gather_and_scatter_with_every_root() {
    for p in sizes() {
        for b in [0, 1, 5] {
            let all: Vec<u64> = (0..p * b).map(|i| value(i / b.max(1), i)).collect();
            for root in 0..p {
                for in_place in [false, true] {
                    // Gather.
                    let inp: Vec<Vec<u64>> = (0..p)
                        .map(|r| {
                            if in_place && r == root {
                                Vec::new()
                            } else {
                                all[r * b..(r + 1) * b].to_vec()
                            }
                        })
                        .collect();
                    let mut out: Vec<Vec<u64>> = (0..p)
                        .map(|r| {
                            if r != root {
                                return Vec::new();
                            }
                            let mut o = vec![0; p * b];
                            if in_place {
                                o[r * b..(r + 1) * b].copy_from_slice(&all[r * b..(r + 1) * b]);
                            }
                            o
                        })
                        .collect();
                    let algo = Algorithm::GatherBinomial;
                    simulate(&schedules(algo, p, b, root, in_place), &inp, &mut out, &sum);
                    assert_eq!(
                        out[root], all,
                        "gather P={p} b={b} root {root} in place {in_place}"
                    );
                    // Scatter.
                    let inp: Vec<Vec<u64>> = (0..p)
                        .map(|r| {
                            if r == root && !in_place {
                                all.clone()
                            } else {
                                Vec::new()
                            }
                        })
                        .collect();
                    let mut out: Vec<Vec<u64>> = (0..p)
                        .map(|r| {
                            if r == root && in_place {
                                all.clone()
                            } else {
                                vec![0; b]
                            }
                        })
                        .collect();
                    let algo = Algorithm::ScatterBinomial;
                    simulate(&schedules(algo, p, b, root, in_place), &inp, &mut out, &sum);
                    for (r, o) in out.iter().enumerate() {
                        let got = if r == root && in_place {
                            &o[r * b..(r + 1) * b]
                        } else {
                            &o[..]
                        };
                        assert_eq!(
                            got,
                            &all[r * b..(r + 1) * b],
                            "scatter P={p} b={b} root {root} rank {r}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn all_to_all_transposes() {
    for p in sizes() {
        for b in [0, 1, 4] {
            let blockv = |from: usize, to: usize, k: usize| value(from, to * 1000 + k);
            let want = |r: usize| -> Vec<u64> {
                (0..p)
                    .flat_map(|q| (0..b).map(move |k| blockv(q, r, k)))
                    .collect()
            };
            let mine = |r: usize| -> Vec<u64> {
                (0..p)
                    .flat_map(|q| (0..b).map(move |k| blockv(r, q, k)))
                    .collect()
            };
            for in_place in [false, true] {
                let inp: Vec<Vec<u64>> = (0..p)
                    .map(|r| if in_place { Vec::new() } else { mine(r) })
                    .collect();
                let mut out: Vec<Vec<u64>> = (0..p)
                    .map(|r| if in_place { mine(r) } else { vec![0; p * b] })
                    .collect();
                let algo = Algorithm::AllToAllPairwise;
                simulate(&schedules(algo, p, b, 0, in_place), &inp, &mut out, &sum);
                for (r, o) in out.iter().enumerate() {
                    assert_eq!(o, &want(r), "P={p} b={b} in place {in_place} rank {r}");
                }
            }
        }
    }
}

#[test]
fn barrier_pairs_up() {
    for p in sizes() {
        let mut out = vec![Vec::<u64>::new(); p];
        simulate(
            &schedules(Algorithm::BarrierDissemination, p, 0, 0, true),
            &vec![Vec::new(); p],
            &mut out,
            &sum,
        );
    }
}
