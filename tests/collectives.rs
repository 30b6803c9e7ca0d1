//! Collectives with ranks as threads, over the in-process transport and TCP on loopback:
//! every collective, element type, reduction and all_reduce algorithm against a sequential
//! reference (exact for integers, within a rounding bound for floats) with results
//! bit-identical across ranks; mismatched calls; ranks that die; sub-communicators; the
//! asynchronous collectives.
//!
//! The big matrix (world sizes 1..=33 × collectives × types × ops × counts × algorithms) is
//! sampled with a deterministic proptest runner; every test has a generous bound so that a
//! hang fails instead of blocking the suite, and nothing asserts a timing beyond that.

mod common;

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::coll::{Case, Kind, check_bytes, ops_for, run_bytes};
use ferrocomm::{
    AllReduceAlgo, AllReduceOptions, CommConfig, Communicator, DType, Error, ReduceOp,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

const ALGOS: [AllReduceAlgo; 4] = [
    AllReduceAlgo::Auto,
    AllReduceAlgo::Ring,
    AllReduceAlgo::HalvingDoubling,
    AllReduceAlgo::RecursiveDoubling,
];

/// A world of `n` ranks on `transport`.
fn world(transport: &str, n: usize) -> Vec<Communicator> {
    match transport {
        "tcp" => Communicator::tcp_loopback_world(n).expect("tcp world"),
        _ => Communicator::local_world(n),
    }
}

/// A local world whose blocking operations give up after `timeout`.
fn local_world_timeout(n: usize, timeout: Duration) -> Vec<Communicator> {
    let mut cfg = CommConfig::from_env(n).expect("config");
    cfg.op_timeout = Some(timeout);
    cfg.spin = Duration::ZERO;
    Communicator::local_world_with(n, cfg)
}

/// Runs `f` on every rank (a thread each); returns each rank's result in rank order.
fn on_ranks<R: Send>(comms: Vec<Communicator>, f: impl Fn(Communicator) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = comms.into_iter().map(|c| s.spawn(move || f(c))).collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    })
}

/// Runs `cases` in order on a world of `p` ranks on `transport`, checks every rank's result
/// against the reference as it arrives, and checks that every rank of an all_reduce ended
/// with the same bytes.
fn run_world(transport: &str, p: usize, cases: &[Case]) {
    let comms = world(transport, p);
    let (tx, rx) = mpsc::channel::<(usize, usize, Vec<u8>)>();
    std::thread::scope(|s| {
        for c in comms {
            let tx = tx.clone();
            s.spawn(move || {
                for (k, case) in cases.iter().enumerate() {
                    let got = run_bytes(&c, case)
                        .unwrap_or_else(|e| panic!("{case:?} on rank {} of {p}: {e}", c.rank()));
                    if tx.send((k, c.rank(), got)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        // First result of each all_reduce case, for the bit-identity check.
        let mut first: HashMap<usize, Vec<u8>> = HashMap::new();
        let mut seen = vec![0usize; cases.len()];
        for (k, rank, got) in rx {
            let case = &cases[k];
            check_bytes(case, p, rank, &got);
            if case.kind == Kind::AllReduce {
                let f = first.entry(k).or_insert_with(|| got.clone());
                assert!(
                    *f == got,
                    "{case:?} P={p}: rank {rank}'s bytes differ from another rank's"
                );
            }
            seen[k] += 1;
            if seen[k] == p {
                first.remove(&k);
            }
        }
        assert!(seen.iter().all(|&n| n == p), "some rank did not finish");
    });
}

fn dtype() -> impl Strategy<Value = DType> {
    proptest::sample::select(DType::ALL.to_vec())
}

/// A case for a world of `p` ranks: any collective, type, op, root and algorithm, and a
/// count among 0, 1, p - 1, small odd, and large (large ones bounded by `max_large`).
fn case(p: usize, max_large: usize) -> impl Strategy<Value = Case> {
    (
        proptest::sample::select(Kind::ALL.to_vec()),
        dtype(),
        0..5usize,
        0..4usize,
        0..p,
        proptest::sample::select(ALGOS.to_vec()),
        any::<bool>(),
        any::<u64>(),
        1..(max_large.max(2)),
    )
        .prop_map(
            move |(kind, dtype, opi, ci, root, algo, in_place, salt, large)| {
                let ops = ops_for(dtype);
                let op = ops[opi % ops.len()];
                let per_block = !matches!(kind, Kind::AllReduce | Kind::Broadcast | Kind::Reduce);
                let count = match ci {
                    0 => 0,
                    1 => 1,
                    2 => p.saturating_sub(1),
                    _ => {
                        let big = if per_block { large / p } else { large };
                        big | 1
                    }
                };
                Case {
                    kind,
                    dtype,
                    op,
                    count,
                    root,
                    algo,
                    in_place,
                    salt,
                }
            },
        )
}

/// Worlds: a size and a list of cases.
fn worlds(
    sizes: Vec<usize>,
    cases: usize,
    max_large: usize,
) -> impl Strategy<Value = (usize, Vec<Case>)> {
    proptest::sample::select(sizes).prop_flat_map(move |p| {
        (
            Just(p),
            proptest::collection::vec(case(p, max_large), cases),
        )
    })
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 64,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    )
}

#[test]
fn sampled_matrix_over_local_threads() {
    let sizes: Vec<usize> = (1..=33).collect();
    runner(40)
        .run(&worlds(sizes, 12, 300_000), |(p, cases)| {
            let max = if p > 8 { 60_000 } else { 300_000 };
            let cases: Vec<Case> = cases
                .into_iter()
                .map(|mut c| {
                    c.count = c.count.min(max);
                    c
                })
                .collect();
            run_world("local", p, &cases);
            Ok(())
        })
        .unwrap();
}

#[test]
fn sampled_matrix_over_tcp_loopback() {
    runner(10)
        .run(
            &worlds(vec![2, 3, 4, 5, 7, 8, 13], 8, 200_000),
            |(p, cases)| {
                run_world("tcp", p, &cases);
                Ok(())
            },
        )
        .unwrap();
}

/// Every type and op with every all_reduce algorithm forced, on a few world sizes (every
/// count kind: 0, 1, P - 1, odd).
#[test]
fn every_type_op_and_algorithm_of_all_reduce() {
    for p in [1usize, 2, 3, 5, 8, 12] {
        let mut cases = Vec::new();
        for algo in &ALGOS[1..] {
            for dtype in DType::ALL {
                for op in ops_for(dtype) {
                    for count in [0, 1, p.saturating_sub(1), 37] {
                        cases.push(Case::all_reduce(dtype, op, count, *algo));
                    }
                }
            }
        }
        run_world("local", p, &cases);
    }
}

/// Each collective's algorithms (chosen by size: both sides of every threshold), in and
/// out of place, every root kind.
#[test]
fn every_collective_on_both_sides_of_its_thresholds() {
    for p in [2, 3, 4, 7, 8] {
        let mut cases = Vec::new();
        for kind in Kind::ALL {
            // 8-byte elements: 40 000 of them cross every threshold, 300 do not.
            for count in [300usize, 140_000] {
                let count = if matches!(kind, Kind::AllReduce | Kind::Broadcast | Kind::Reduce) {
                    count
                } else {
                    count / p
                };
                for in_place in [false, true] {
                    for root in [0, p - 1] {
                        cases.push(Case {
                            kind,
                            dtype: DType::F64,
                            op: ReduceOp::Sum,
                            count,
                            root,
                            algo: AllReduceAlgo::Auto,
                            in_place,
                            salt: (count + root) as u64,
                        });
                    }
                }
            }
        }
        run_world("local", p, &cases);
    }
}

/// Summation order must not depend on the rank: values that make float addition very
/// order-sensitive still give the same bytes on every rank, for every algorithm.
#[test]
fn float_results_are_bit_identical_across_ranks() {
    for p in [3, 4, 6, 7, 13] {
        for algo in &ALGOS[1..] {
            let results = on_ranks(world("local", p), |c| {
                let me = c.rank();
                let mut v: Vec<f32> = (0..5000)
                    .map(|i| {
                        let big = if (i + me) % 3 == 0 { 1e8 } else { 1.0 };
                        let sign = if (i * 7 + me) % 2 == 0 { 1.0 } else { -1.0 };
                        sign * big * (1.0 + (i * 13 + me * 101) as f32 * 1e-3)
                    })
                    .collect();
                c.all_reduce_with(&mut v, ReduceOp::Sum, &AllReduceOptions::algo(*algo))
                    .unwrap();
                let mut h: Vec<half::bf16> = (0..999)
                    .map(|i| half::bf16::from_f32(((i * 31 + me * 7) % 97) as f32 * 0.37 - 17.0))
                    .collect();
                c.all_reduce_with(&mut h, ReduceOp::Avg, &AllReduceOptions::algo(*algo))
                    .unwrap();
                (v, h)
            });
            for (r, res) in results.iter().enumerate() {
                let same = res
                    .0
                    .iter()
                    .zip(&results[0].0)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
                    && res.1 == results[0].1;
                assert!(same, "P={p} {algo}: rank {r} differs from rank 0");
            }
        }
    }
}

/// Nobody leaves a barrier before everybody has entered it (ranks enter in a different
/// order each time).
#[test]
fn no_rank_leaves_a_barrier_before_all_have_entered() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    for transport in ["local", "tcp"] {
        for p in [2usize, 3, 4, 5, 8, 13] {
            let entered: Vec<AtomicUsize> = (0..10).map(|_| AtomicUsize::new(0)).collect();
            on_ranks(world(transport, p), |c| {
                for (round, count) in entered.iter().enumerate() {
                    // A different late rank each round.
                    if c.rank() == (round * 7) % p {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    c.barrier().unwrap();
                    let n = count.load(Ordering::SeqCst);
                    assert_eq!(
                        n,
                        p,
                        "{transport} P={p}: rank {} left barrier {round} early",
                        c.rank()
                    );
                }
            });
        }
    }
}

#[test]
fn invalid_arguments_are_refused_before_anything_is_sent() {
    on_ranks(world("local", 3), |c| {
        let mut ints = [1i32; 6];
        let e = c.all_reduce(&mut ints, ReduceOp::Avg).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains("avg"),
            "{e}"
        );
        let e = c.broadcast(&mut ints, 3).unwrap_err();
        assert!(e.to_string().contains("root"), "{e}");
        let mut out = [0i32; 5];
        let e = c.all_gather(&ints[..2], &mut out).unwrap_err();
        assert!(e.to_string().contains("6"), "{e}");
        let e = c.all_to_all_in_place(&mut out).unwrap_err();
        assert!(e.to_string().contains("3 equal blocks"), "{e}");
        let e = c
            .reduce_scatter(&ints, &mut out[..1], ReduceOp::Sum)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        // Nothing was sent and no sequence number used: the communicator still works.
        c.all_reduce(&mut ints, ReduceOp::Sum).unwrap();
        assert_eq!(ints, [3; 6]);
    });
}

/// Runs `f(rank, comm)` on a world of `p` local ranks whose operation timeout is
/// `timeout`; every rank must finish within `bound` (a hang fails the test).
fn bounded<R: Send>(
    p: usize,
    timeout: Duration,
    bound: Duration,
    f: impl Fn(usize, Communicator) -> R + Sync,
) -> Vec<R> {
    let start = Instant::now();
    let r = on_ranks(local_world_timeout(p, timeout), |c| f(c.rank(), c));
    assert!(start.elapsed() < bound, "took {:?}", start.elapsed());
    r
}

fn is_mismatch(e: &Error) -> bool {
    matches!(e, Error::CollectiveMismatch { .. })
}

#[test]
fn mismatched_collectives_fail_on_every_rank_naming_both_calls() {
    // Different collective, type, count, root, algorithm: every rank fails, at least one
    // names both calls, and the message bytes never land in a result.
    type Call = fn(usize, &Communicator) -> ferrocomm::Result<()>;
    let variants: Vec<(&str, &str, Call)> = vec![
        ("all_reduce", "broadcast", |r, c| {
            let mut v = [1.0f32; 8];
            if r == 0 {
                c.all_reduce(&mut v, ReduceOp::Sum)
            } else {
                c.broadcast(&mut v, 0)
            }
        }),
        ("count 8", "count 9", |r, c| {
            let mut v = vec![1.0f32; 8 + r % 2];
            c.all_reduce(&mut v, ReduceOp::Sum)
        }),
        ("type f32", "type i32", |r, c| {
            if r == 0 {
                c.all_reduce(&mut [1.0f32; 8], ReduceOp::Sum)
            } else {
                c.all_reduce(&mut [1i32; 8], ReduceOp::Sum)
            }
        }),
        ("root 0", "root 1", |r, c| {
            c.broadcast(&mut [1u8; 100], r.min(1))
        }),
        ("algorithm ring", "algorithm rhd", |r, c| {
            let a = if r == 0 {
                AllReduceAlgo::Ring
            } else {
                AllReduceAlgo::HalvingDoubling
            };
            c.all_reduce_with(&mut [1u64; 1000], ReduceOp::Max, &AllReduceOptions::algo(a))
        }),
        ("op sum", "op max", |r, c| {
            let op = if r == 0 { ReduceOp::Sum } else { ReduceOp::Max };
            c.all_reduce(&mut [1u64; 10], op)
        }),
    ];
    for p in [2, 3] {
        for (a, b, call) in &variants {
            let errs = bounded(
                p,
                Duration::from_secs(120),
                Duration::from_secs(60),
                |r, c| {
                    // Every rank fails in the call itself, a broadcast root (which only
                    // sends) included: no rank returns before all fingerprints agree.
                    let err = call(r, &c).expect_err("a mismatch must fail the call");
                    // Sticky: the communicator is unusable afterwards.
                    assert!(c.barrier().is_err());
                    err
                },
            );
            assert!(errs.iter().all(is_mismatch), "P={p} {a}/{b}: {errs:?}");
            let named = errs.iter().all(|e| {
                let s = e.to_string();
                s.contains(a) && s.contains(b) && s.contains("call #0")
            });
            assert!(
                named,
                "P={p}: no error names both {a:?} and {b:?}: {errs:?}"
            );
        }
    }
}

#[test]
fn a_rank_calling_another_collective_makes_every_rank_fail_fast() {
    // Rank 2 of 6 calls a barrier while the others all-reduce: the ranks it never talks to
    // learn through notices, long before the (long) operation timeout.
    for algo in &ALGOS[1..] {
        let errs = bounded(
            6,
            Duration::from_secs(300),
            Duration::from_secs(60),
            |r, c| {
                if r == 2 {
                    c.barrier().expect_err("mismatch")
                } else {
                    let mut v = vec![r as f32; 4096];
                    c.all_reduce_with(&mut v, ReduceOp::Sum, &AllReduceOptions::algo(*algo))
                        .expect_err("mismatch")
                }
            },
        );
        assert!(errs.iter().all(is_mismatch), "{algo}: {errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.to_string().contains("barrier") && e.to_string().contains("all_reduce")),
            "{algo}: {errs:?}"
        );
    }
}

#[test]
fn mismatches_that_exchange_no_data_fail_every_rank_at_once() {
    // Rank 0 reduces to itself (waits for rank 1), rank 1 waits for rank 0's broadcast: no
    // data moves, but the agreement exchange compares the calls, so both ranks fail with
    // the mismatch long before the operation timeout (one minute here).
    let errs = bounded(
        2,
        Duration::from_secs(60),
        Duration::from_secs(30),
        |r, c| {
            let mut v = [1u32; 4];
            if r == 0 {
                c.reduce_in_place(&mut v, ReduceOp::Sum, 0)
            } else {
                c.broadcast(&mut v, 0)
            }
            .expect_err("no match")
        },
    );
    for e in &errs {
        assert!(is_mismatch(e), "{e}");
        let s = e.to_string();
        assert!(s.contains("reduce(") && s.contains("broadcast("), "{s}");
    }
}

/// All ranks all-reduce 1 MiB in a loop; `kill` makes rank 2 go away after a few rounds.
/// Every other rank must stop with an error soon (the operation timeout is 10 minutes).
fn rank_dies_during_all_reduce(transport: &str, algo: AllReduceAlgo, kill: fn(Communicator)) {
    let comms = match transport {
        "tcp" => {
            let c = Communicator::tcp_loopback_world(5).expect("tcp");
            assert!(
                c[0].config()
                    .op_timeout
                    .is_none_or(|t| t > Duration::from_secs(100))
            );
            c
        }
        _ => local_world_timeout(5, Duration::from_secs(600)),
    };
    let start = Instant::now();
    let out = on_ranks(comms, |c| {
        let me = c.rank();
        let mut v = vec![1.0f32; 1 << 18];
        for i in 0..10_000 {
            if me == 2 && i == 3 {
                kill(c);
                return None;
            }
            if let Err(e) = c.all_reduce_with(&mut v, ReduceOp::Sum, &AllReduceOptions::algo(algo))
            {
                return Some(e);
            }
        }
        panic!("rank {me} never noticed that rank 2 died");
    });
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    for (r, e) in out.iter().enumerate() {
        if r == 2 {
            continue;
        }
        let e = e.as_ref().expect("an error");
        assert!(matches!(e, Error::PeerLost { .. }), "rank {r}: {e}");
    }
}

#[test]
fn a_rank_that_drops_its_communicator_during_all_reduce_fails_the_others() {
    for algo in &ALGOS[1..] {
        rank_dies_during_all_reduce("local", *algo, drop);
        rank_dies_during_all_reduce("tcp", *algo, drop);
    }
}

#[test]
fn a_rank_that_aborts_during_all_reduce_fails_the_others() {
    let abort: fn(Communicator) = |c| {
        c.abort("test: rank 2 dies");
        // Keep the communicator alive a moment: the others must not depend on it closing.
        std::thread::sleep(Duration::from_millis(200));
    };
    for algo in &ALGOS[1..] {
        rank_dies_during_all_reduce("local", *algo, abort);
        rank_dies_during_all_reduce("tcp", *algo, abort);
    }
}

#[test]
fn split_orders_by_key_and_undefined_gets_nothing() {
    on_ranks(world("local", 7), |c| {
        let me = c.rank();
        // Colors 0 (even), 1 (odd), and rank 6 undefined; keys reverse the order.
        let color = if me == 6 { None } else { Some(me as u32 % 2) };
        let sub = c.split(color, -(me as i64)).unwrap();
        if me == 6 {
            assert!(sub.is_none());
            c.barrier().unwrap();
            return;
        }
        let sub = sub.unwrap();
        let members: Vec<usize> = (0..6).filter(|r| r % 2 == me % 2).rev().collect();
        assert_eq!(sub.size(), 3);
        assert_eq!(members[sub.rank()], me);
        let mut got = vec![0u64; 3];
        sub.all_gather(&[me as u64], &mut got).unwrap();
        assert_eq!(got, members.iter().map(|&r| r as u64).collect::<Vec<_>>());
        // The parent still works, and so does a second split of it.
        c.barrier().unwrap();
    });
}

#[test]
fn collectives_on_sub_communicators_in_parallel_threads_never_interfere() {
    on_ranks(world("local", 6), |c| {
        let me = c.rank();
        let parity = c.split(Some(me as u32 % 2), 0).unwrap().unwrap();
        let halves = c.split(Some(me as u32 / 3), me as i64).unwrap().unwrap();
        let dup = c.dup();
        let subs = [(parity, 10.0), (halves, 1000.0), (dup, 100_000.0)];
        std::thread::scope(|s| {
            for (sub, scale) in subs {
                s.spawn(move || {
                    let n = sub.size() as f64;
                    for i in 0..60usize {
                        let x = scale + i as f64;
                        let count = 1 + (i * 997) % 70_000;
                        let mut v = vec![x; count];
                        let algo = ALGOS[i % 4];
                        sub.all_reduce_with(&mut v, ReduceOp::Sum, &AllReduceOptions::algo(algo))
                            .unwrap();
                        assert!(v.iter().all(|&y| y == x * n), "scale {scale} round {i}");
                        let mut b = [if sub.rank() == 0 { x } else { 0.0 }];
                        sub.broadcast(&mut b, 0).unwrap();
                        assert_eq!(b[0], x);
                    }
                });
            }
        });
    });
}

#[test]
fn new_group_is_made_by_its_members_only() {
    on_ranks(world("local", 5), |c| {
        let me = c.rank();
        let members = [3, 1, 0];
        if let Some(pos) = members.iter().position(|&r| r == me) {
            let g = c.new_group(&members).unwrap();
            assert_eq!((g.size(), g.rank()), (3, pos));
            let mut r = vec![0u32; if g.rank() == 0 { 3 } else { 0 }];
            g.gather(&[me as u32], &mut r, 0).unwrap();
            if g.rank() == 0 {
                assert_eq!(r, [3, 1, 0]);
            }
            // A second group of the same ranks has its own context: both run at once.
            let g2 = c.new_group(&members).unwrap();
            std::thread::scope(|s| {
                s.spawn(move || {
                    for _ in 0..30 {
                        let mut x = [me as i64];
                        g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
                        assert_eq!(x[0], 4);
                    }
                });
                for _ in 0..30 {
                    let mut x = [1i64];
                    g2.all_reduce(&mut x, ReduceOp::Prod).unwrap();
                    assert_eq!(x[0], 1);
                }
            });
        } else {
            let e = c.new_group(&members).unwrap_err();
            assert!(e.to_string().contains("not in the list"), "{e}");
        }
        for bad in [&[][..], &[0, 0][..], &[0, 9][..]] {
            assert!(matches!(
                c.new_group(bad),
                Err(Error::InvalidArgument { .. })
            ));
        }
        // The parent is untouched.
        c.barrier().unwrap();
    });
}

#[test]
fn async_collectives_run_in_call_order_beside_blocking_ones() {
    on_ranks(world("local", 4), |c| {
        let me = c.rank() as f32;
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let v = vec![me + i as f32; 10_000 + i * 1000];
                c.iall_reduce(v, ReduceOp::Sum)
            })
            .collect();
        // Blocking collectives on the same communicator meanwhile: their own sequence.
        for _ in 0..10 {
            let mut x = [1u8];
            c.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            assert_eq!(x[0], 4);
        }
        let b = c.ibroadcast(vec![me; 3], 2);
        let g = c.iall_gather(vec![me as u16]);
        let bar = c.ibarrier();
        for (i, h) in handles.into_iter().enumerate() {
            let v = h.wait().unwrap();
            assert_eq!(v.len(), 10_000 + i * 1000);
            assert!(v.iter().all(|&x| x == 6.0 + 4.0 * i as f32));
        }
        assert_eq!(b.wait().unwrap(), vec![2.0; 3]);
        assert_eq!(g.wait().unwrap(), vec![0, 1, 2, 3]);
        bar.wait().unwrap();
        let h = c.ireduce_scatter(vec![1i32; 8], ReduceOp::Sum);
        while !h.test() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(h.wait().unwrap(), vec![4, 4]);
        let r = c.ireduce(vec![2u64; 5], ReduceOp::Prod, 1).wait().unwrap();
        assert_eq!(
            r,
            if c.rank() == 1 {
                vec![16; 5]
            } else {
                vec![2; 5]
            }
        );
        let s = c
            .iscatter((0..8).collect::<Vec<u32>>(), 2, 0)
            .wait()
            .unwrap();
        assert_eq!(s, vec![2 * c.rank() as u32, 2 * c.rank() as u32 + 1]);
        let gg = c.igather(vec![c.rank() as u8], 3).wait().unwrap();
        assert_eq!(
            gg,
            if c.rank() == 3 {
                vec![0, 1, 2, 3]
            } else {
                vec![]
            }
        );
        let a = c.iall_to_all(vec![c.rank() as u8; 4]).wait().unwrap();
        assert_eq!(a, vec![0, 1, 2, 3]);
    });
}

#[test]
fn a_mismatched_async_collective_fails_through_its_handle() {
    let errs = bounded(
        2,
        Duration::from_secs(120),
        Duration::from_secs(60),
        |r, c| {
            let h = c.iall_reduce(vec![1.0f64; 10 + r], ReduceOp::Sum);
            h.wait().expect_err("mismatch")
        },
    );
    assert!(errs.iter().any(is_mismatch), "{errs:?}");
}

#[test]
fn avg_divides_by_the_world_size() {
    on_ranks(world("local", 4), |c| {
        let mut v = vec![c.rank() as f64 * 2.0; 100];
        c.all_reduce(&mut v, ReduceOp::Avg).unwrap();
        assert!(v.iter().all(|&x| x == 3.0));
        let mut h = [half::f16::from_f32(c.rank() as f32)];
        c.all_reduce(&mut h, ReduceOp::Avg).unwrap();
        assert_eq!(h[0].to_f32(), 1.5);
        let mut out = [0.0f32; 1];
        c.reduce_scatter(&[4.0f32, 8.0, 12.0, 16.0], &mut out, ReduceOp::Avg)
            .unwrap();
        assert_eq!(out[0], 4.0 * (c.rank() as f32 + 1.0));
    });
}
