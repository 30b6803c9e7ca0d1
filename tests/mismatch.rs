//! Collective argument agreement: whenever the ranks of a communicator disagree about a
//! call (collective, root, count, element type, reduction, algorithm), every rank fails
//! promptly with `CollectiveMismatch` naming two ranks whose calls differ and both calls;
//! no rank returns Ok (with or without wrong data) and none waits for the operation
//! timeout (30 minutes by default, so a timeout cannot pass for a result here).
//!
//! Over the in-process transport (threads), TCP on loopback and shared memory (threads of
//! one process over the real transports), plus real processes started by `ferrorun` over
//! TCP and shared memory; blocking, non-blocking and sub-communicator paths; and a property
//! test drawing random per-rank disagreements for every collective. Every run is bounded
//! (60 s per world); nothing asserts timing beyond that.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::coll::{Case, Kind, check_bytes, run_bytes};
use ferrocomm::{AllReduceAlgo, Communicator, DType, Error, ReduceOp};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Bound for one world's run: a hang fails the test.
const BOUND: Duration = Duration::from_secs(60);

/// A world of `n` ranks on `transport` (threads of this process).
fn world(transport: &str, n: usize) -> Vec<Communicator> {
    match transport {
        "tcp" => Communicator::tcp_loopback_world(n).expect("tcp world"),
        "shm" => Communicator::shm_world(n).expect("shm world"),
        _ => Communicator::local_world(n),
    }
}

/// Runs `f` on every rank (a thread each) within [`BOUND`]; each rank's result in order.
fn on_ranks<R: Send + 'static>(
    comms: Vec<Communicator>,
    f: impl Fn(Communicator) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let (tx, rx) = mpsc::channel();
    let n = comms.len();
    for c in comms {
        let (tx, f) = (tx.clone(), f.clone());
        std::thread::spawn(move || {
            let r = c.rank();
            let _ = tx.send((r, f(c)));
        });
    }
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (r, v) = rx
            .recv_timeout(BOUND)
            .expect("a rank hung (or panicked) in a mismatched collective");
        out[r] = Some(v);
    }
    out.into_iter().map(|v| v.expect("every rank")).collect()
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::AllReduce => "all_reduce",
        Kind::Broadcast => "broadcast",
        Kind::Reduce => "reduce",
        Kind::AllGather => "all_gather",
        Kind::ReduceScatter => "reduce_scatter",
        Kind::Gather => "gather",
        Kind::Scatter => "scatter",
        Kind::AllToAll => "all_to_all",
        Kind::Barrier => "barrier",
    }
}

fn rooted(k: Kind) -> bool {
    matches!(
        k,
        Kind::Broadcast | Kind::Reduce | Kind::Gather | Kind::Scatter
    )
}

/// Whether two ranks calling `a` and `b` make the same call (what must agree).
fn same_call(a: &Case, b: &Case) -> bool {
    if a.kind != b.kind {
        return false;
    }
    if a.kind == Kind::Barrier {
        return true;
    }
    let algo = |c: &Case| {
        if c.kind == Kind::AllReduce && c.in_place {
            c.algo
        } else {
            AllReduceAlgo::Auto
        }
    };
    a.dtype == b.dtype
        && a.count == b.count
        && (!rooted(a.kind) || a.root == b.root)
        && (!a.kind.reduces() || a.op == b.op)
        && (a.kind != Kind::AllReduce || algo(a) == algo(b))
}

/// Whether the description `d` of a call in an error fits case `c`.
fn describes(d: &str, c: &Case) -> bool {
    if !d.starts_with(&format!("{}(", kind_name(c.kind))) {
        return false;
    }
    if c.kind == Kind::Barrier {
        return true;
    }
    let mut parts = vec![format!("type {}", c.dtype), format!("count {}", c.count)];
    if rooted(c.kind) {
        parts.push(format!("root {}", c.root));
    }
    if c.kind.reduces() {
        parts.push(format!("op {}", c.op));
    }
    parts
        .iter()
        .all(|p| d.contains(&format!("{p},")) || d.contains(&format!("{p})")))
}

/// Parses "`rank A [(world rank W)] called DESC`" at the start of `s`: A and DESC.
fn parse_side(s: &str) -> Option<(usize, String, &str)> {
    let s = s.strip_prefix("rank ")?;
    let digits = s.find(|ch: char| !ch.is_ascii_digit())?;
    let rank = s[..digits].parse().ok()?;
    let rest = &s[digits..];
    let rest = match rest.strip_prefix(" (world rank ") {
        Some(r) => &r[r.find(')')? + 1..],
        None => rest,
    };
    let rest = rest.strip_prefix(" called ")?;
    let end = rest.find(')')? + 1;
    Some((rank, rest[..end].to_string(), &rest[end..]))
}

/// The pair an error names: "call #N: rank A called X but rank B called Y".
fn named_pair(msg: &str) -> Option<(usize, String, usize, String)> {
    let at = msg.find("call #")?;
    let s = &msg[at..];
    let s = &s[s.find(": ")? + 2..];
    let (a, da, rest) = parse_side(s)?;
    let (b, db, _) = parse_side(rest.strip_prefix(" but ")?)?;
    Some((a, da, b, db))
}

/// How a rank's call ended: `Ok(bytes)`, or the error (`true` for a mismatch) and its text.
type Outcome = Result<usize, (bool, String)>;

fn outcome(r: &Result<Vec<u8>, Error>) -> Outcome {
    match r {
        Ok(v) => Ok(v.len()),
        Err(e) => Err((matches!(e, Error::CollectiveMismatch { .. }), e.to_string())),
    }
}

/// Checks that every rank failed with a mismatch naming two ranks whose calls differ and
/// both calls (`cases[r]`: what rank `r` called; ranks of the communicator).
fn assert_all_mismatch(cases: &[Case], res: &[Result<Vec<u8>, Error>], what: &str) {
    let res: Vec<Outcome> = res.iter().map(outcome).collect();
    assert_outcomes(cases, &res, what);
}

fn assert_outcomes(cases: &[Case], res: &[Outcome], what: &str) {
    assert_eq!(res.len(), cases.len(), "{what}: one outcome per rank");
    for (r, res) in res.iter().enumerate() {
        let msg = match res {
            Err((true, msg)) => msg.clone(),
            Err((false, e)) => panic!("{what}: rank {r} failed with another error: {e}"),
            Ok(n) => panic!("{what}: rank {r} returned Ok ({n} bytes)"),
        };
        let (a, da, b, db) =
            named_pair(&msg).unwrap_or_else(|| panic!("{what}: rank {r}: no pair in: {msg}"));
        assert!(
            a != b && a < cases.len() && b < cases.len(),
            "{what}: rank {r}: {msg}"
        );
        assert!(
            !same_call(&cases[a], &cases[b]),
            "{what}: rank {r} names ranks {a} and {b}, whose calls agree: {msg}"
        );
        assert!(
            describes(&da, &cases[a]) && describes(&db, &cases[b]),
            "{what}: rank {r}: the calls named do not fit ranks {a} ({:?}) and {b} ({:?}): {msg}",
            cases[a],
            cases[b]
        );
    }
}

/// Runs `cases[r]` on rank `r` of a world on `transport`; every rank's result.
fn run(transport: &str, cases: &[Case]) -> Vec<Result<Vec<u8>, Error>> {
    let cases = cases.to_vec();
    on_ranks(world(transport, cases.len()), move |c| {
        run_bytes(&c, &cases[c.rank()])
    })
}

fn base(kind: Kind, p: usize, count: usize) -> Case {
    Case {
        kind,
        dtype: DType::F32,
        op: ReduceOp::Sum,
        count,
        root: p / 2,
        algo: AllReduceAlgo::Auto,
        in_place: false,
        salt: 17,
    }
}

/// One way a rank's call can differ from the others'.
#[derive(Clone, Copy, Debug)]
enum Diff {
    Root(usize),
    Count(usize),
    DType(DType),
    Op(ReduceOp),
    Algo(AllReduceAlgo, AllReduceAlgo),
    Kind(Kind),
}

/// `c` changed by `d` (`None` when `d` does not apply to `c`'s collective).
fn changed(c: &Case, d: Diff, p: usize) -> Option<Case> {
    let mut c = c.clone();
    match d {
        Diff::Root(k) if rooted(c.kind) => c.root = (c.root + 1 + k % (p - 1)) % p,
        Diff::Count(n) if c.kind != Kind::Barrier && n != c.count => c.count = n,
        Diff::DType(t) if c.kind != Kind::Barrier && t != c.dtype => c.dtype = t,
        Diff::Op(o) if c.kind.reduces() && o != c.op => c.op = o,
        Diff::Algo(_, b) if c.kind == Kind::AllReduce => {
            c.in_place = true;
            c.algo = b;
        }
        Diff::Kind(k) if k != c.kind => c.kind = k,
        _ => return None,
    }
    Some(c)
}

/// The per-rank calls: `base` everywhere, `changed` on the ranks of `mask`.
fn spread(base: &Case, d: Diff, p: usize, mask: u64) -> Option<Vec<Case>> {
    let mut base = base.clone();
    if let Diff::Algo(a, _) = d {
        if base.kind != Kind::AllReduce {
            return None;
        }
        base.in_place = true;
        base.algo = a;
    }
    let other = changed(&base, d, p)?;
    if same_call(&base, &other) {
        return None;
    }
    Some(
        (0..p)
            .map(|r| {
                if mask >> r & 1 == 1 {
                    other.clone()
                } else {
                    base.clone()
                }
            })
            .collect(),
    )
}

const DIFFS: [Diff; 8] = [
    Diff::Root(0),
    Diff::Count(6),
    Diff::Count(0),
    Diff::DType(DType::I32),
    Diff::DType(DType::F64),
    Diff::Op(ReduceOp::Max),
    Diff::Algo(AllReduceAlgo::Ring, AllReduceAlgo::HalvingDoubling),
    Diff::Kind(Kind::Barrier),
];

/// Every collective, every kind of disagreement, at world sizes 2, 3, 4, 5 and 8, with the
/// odd call on one rank (the first, the last, or one in the middle) or on every odd rank.
fn matrix(transport: &str, sizes: &[usize]) {
    let mut runs = 0;
    for &p in sizes {
        for (ki, kind) in Kind::ALL.into_iter().enumerate() {
            for (di, d) in DIFFS.into_iter().enumerate() {
                let d = match d {
                    // Another collective: the next one (barrier is in the list itself).
                    Diff::Kind(_) if kind == Kind::Barrier => Diff::Kind(Kind::Broadcast),
                    Diff::Kind(_) => Diff::Kind(Kind::ALL[(ki + 1) % Kind::ALL.len()]),
                    d => d,
                };
                let masks = [
                    1u64,
                    1 << (p - 1),
                    1 << (p / 2),
                    0xAAAA_AAAA & ((1 << p) - 1),
                ];
                let mask = masks[(ki + di + p) % masks.len()];
                let count = if (ki + di) % 3 == 0 { 5 } else { 3 };
                let Some(cases) = spread(&base(kind, p, count), d, p, mask) else {
                    continue;
                };
                let what = format!("{transport} P={p} {kind:?} {d:?} mask {mask:#b}");
                assert_all_mismatch(&cases, &run(transport, &cases), &what);
                runs += 1;
            }
        }
    }
    assert!(runs > 50, "only {runs} runs");
}

#[test]
fn every_disagreement_fails_every_rank_local() {
    matrix("local", &[2, 3, 4, 5, 8]);
}

#[test]
fn every_disagreement_fails_every_rank_tcp() {
    matrix("tcp", &[2, 3, 5]);
}

#[test]
fn every_disagreement_fails_every_rank_shm() {
    matrix("shm", &[2, 4, 5]);
}

#[test]
fn disagreeing_roots_are_found_by_every_rank() {
    // Issue 13, item 1: broadcast with root 0 on rank 0 and root 1 elsewhere returned Ok
    // everywhere (rank 2 received rank 1's data); reduce with disagreeing roots left ranks
    // waiting for the operation timeout.
    for kind in [Kind::Broadcast, Kind::Reduce, Kind::Gather, Kind::Scatter] {
        for p in [2, 3, 4, 5, 8] {
            for in_place in [false, true] {
                let cases: Vec<Case> = (0..p)
                    .map(|r| Case {
                        root: usize::from(r != 0),
                        in_place,
                        ..base(kind, p, 4)
                    })
                    .collect();
                let what = format!("{kind:?} P={p} in place {in_place}");
                assert_all_mismatch(&cases, &run("local", &cases), &what);
            }
        }
    }
}

#[test]
fn relaying_ranks_name_the_real_pair_not_themselves() {
    // Issue 13, item 12: ranks that only relay the error named themselves; every rank must
    // name the two ranks whose calls differ. Rank 3 of 6 calls another collective.
    for kind in [Kind::AllReduce, Kind::Broadcast, Kind::AllGather] {
        let cases: Vec<Case> = (0..6)
            .map(|r| {
                let mut c = base(kind, 6, 64);
                if r == 3 {
                    c.count = 65;
                }
                c
            })
            .collect();
        let res = run("local", &cases);
        assert_all_mismatch(&cases, &res, &format!("{kind:?}"));
        for (r, e) in res.iter().enumerate() {
            let msg = e
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default();
            let (a, _, b, _) = named_pair(&msg).unwrap_or_default();
            assert!(a == 3 || b == 3, "rank {r} does not name rank 3: {msg}");
        }
    }
}

#[test]
fn in_place_and_out_of_place_ranks_agree() {
    // In-place-ness only changes where a rank keeps its own data, never the messages: ranks
    // may choose differently and still get the right result.
    for kind in [
        Kind::Reduce,
        Kind::Gather,
        Kind::Scatter,
        Kind::AllGather,
        Kind::ReduceScatter,
        Kind::AllToAll,
    ] {
        for p in [1, 2, 3, 5] {
            let cases: Vec<Case> = (0..p)
                .map(|r| Case {
                    in_place: r % 2 == 1,
                    ..base(kind, p, 7)
                })
                .collect();
            let res = run("local", &cases);
            for (r, got) in res.into_iter().enumerate() {
                let got = got.unwrap_or_else(|e| panic!("{kind:?} P={p} rank {r}: {e}"));
                check_bytes(&cases[r], p, r, &got);
            }
        }
    }
}

#[test]
fn one_rank_communicators_have_nothing_to_disagree_with() {
    for kind in Kind::ALL {
        let c = base(kind, 1, 3);
        let res = run("local", std::slice::from_ref(&c));
        let got = res.into_iter().next().expect("one rank").expect("1 rank");
        check_bytes(&c, 1, 0, &got);
        let c0 = base(kind, 1, 0);
        run("local", &[c0]).into_iter().for_each(|r| {
            r.expect("count 0 on one rank");
        });
    }
}

#[test]
fn calls_without_data_agree_too() {
    // Count 0 moves no data, so only the agreement exchange can find the difference.
    for kind in [
        Kind::AllReduce,
        Kind::AllGather,
        Kind::AllToAll,
        Kind::ReduceScatter,
    ] {
        for p in [2, 3, 4] {
            let cases: Vec<Case> = (0..p)
                .map(|r| base(kind, p, if r == p - 1 { 2 } else { 0 }))
                .collect();
            assert_all_mismatch(&cases, &run("local", &cases), &format!("{kind:?} P={p}"));
            // And when every rank passes 0, the call succeeds.
            let cases: Vec<Case> = (0..p).map(|_| base(kind, p, 0)).collect();
            for r in run("local", &cases) {
                r.expect("count 0 everywhere");
            }
        }
    }
}

#[test]
fn asynchronous_collectives_report_the_mismatch_through_their_handles() {
    for p in [2, 3, 5] {
        let res = on_ranks(world("local", p), move |c| {
            let r = c.rank();
            let root = usize::from(r == p - 1);
            let errs = [c.ibroadcast(vec![1u32; 8], root).wait().err()];
            errs.into_iter()
                .map(|e| e.map(|e| e.to_string()))
                .collect::<Vec<_>>()
        });
        for (r, errs) in res.iter().enumerate() {
            for e in errs {
                let e = e.as_ref().unwrap_or_else(|| panic!("P={p} rank {r}: Ok"));
                assert!(
                    e.contains("collective mismatch") && named_pair(e).is_some(),
                    "{e}"
                );
            }
        }
        for f in [
            |c: &Communicator, p: usize| {
                let root = usize::from(c.rank() == p - 1);
                c.ireduce(vec![1.0f64; 8], ReduceOp::Sum, root).wait().err()
            },
            |c: &Communicator, _| {
                c.iall_reduce(vec![1.0f64; 8 + c.rank() % 2], ReduceOp::Sum)
                    .wait()
                    .err()
            },
            |c: &Communicator, p: usize| {
                let root = usize::from(c.rank() == p - 1);
                c.igather(vec![1u8; 3], root).wait().err()
            },
            |c: &Communicator, p: usize| {
                if c.rank() == p - 1 {
                    c.ibarrier().wait().err()
                } else {
                    c.iall_to_all(vec![0u16; 2 * p]).wait().err()
                }
            },
        ] {
            let res = on_ranks(world("local", p), move |c| f(&c, p).map(|e| e.to_string()));
            for (r, e) in res.iter().enumerate() {
                let e = e.as_ref().unwrap_or_else(|| panic!("P={p} rank {r}: Ok"));
                assert!(
                    e.contains("collective mismatch") && named_pair(e).is_some(),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn sub_communicators_fail_only_their_members() {
    // Six ranks split into evens and odds; the evens disagree about a broadcast's root, the
    // odds make the same call correctly and must succeed.
    // The threads meet after making the communicators, so that no rank fails (which fails
    // its whole engine) while another still needs it for the split.
    let made = std::sync::Arc::new(std::sync::Barrier::new(6));
    let res = on_ranks(world("local", 6), move |c| {
        let w = c.rank();
        let sub = c
            .split(Some((w % 2) as u32), w as i64)
            .expect("split")
            .expect("member");
        made.wait();
        let root = if w == 4 { 1 } else { 0 };
        let mut v = vec![sub.rank() as u64 + 1; 16];
        sub.broadcast(&mut v, root)
            .map(|()| v)
            .map_err(|e| e.to_string())
    });
    for (w, r) in res.iter().enumerate() {
        if w % 2 == 1 {
            assert_eq!(r.as_ref().expect("the odd ranks agree"), &vec![1u64; 16]);
        } else {
            let e = r.as_ref().expect_err("the even ranks disagree");
            let (a, da, b, db) = named_pair(e).unwrap_or_else(|| panic!("{e}"));
            assert!(e.contains("world rank 4"), "{e}");
            assert!(a == 2 || b == 2, "{e}");
            assert!(
                da.contains("root") && db.contains("root") && da != db,
                "{e}"
            );
        }
    }
    // new_group: ranks 1, 2, 3 disagree about a reduce's count.
    let made = std::sync::Arc::new(std::sync::Barrier::new(3));
    let res = on_ranks(world("local", 4), move |c| {
        if c.rank() == 0 {
            return Ok(());
        }
        let g = c.new_group(&[1, 2, 3]).expect("group");
        made.wait();
        let n = if c.rank() == 3 { 5 } else { 4 };
        let mut v = vec![1i64; n];
        g.reduce_in_place(&mut v, ReduceOp::Sum, 0)
            .map_err(|e| e.to_string())
    });
    for r in &res[1..] {
        let e = r.as_ref().expect_err("mismatch");
        assert!(named_pair(e).is_some() && e.contains("count 5"), "{e}");
    }
}

/// A random disagreement: world size, collective, base count and type, the kind of
/// difference and which ranks make the odd call.
fn disagreement(max_p: usize) -> impl Strategy<Value = Vec<Case>> {
    let dtypes = [DType::F32, DType::F64, DType::I32, DType::U8, DType::I64];
    let ops = [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min];
    let algos = [
        AllReduceAlgo::Ring,
        AllReduceAlgo::HalvingDoubling,
        AllReduceAlgo::RecursiveDoubling,
    ];
    (
        2..=max_p,
        0..Kind::ALL.len(),
        prop_oneof![Just(1usize), 0usize..40, Just(20_000)],
        0..dtypes.len(),
        0..ops.len(),
        0..8usize,
        any::<u64>(),
        any::<u64>(),
    )
        .prop_filter_map(
            "the difference must apply",
            move |(p, k, n, t, o, d, x, mask)| {
                let kind = Kind::ALL[k];
                let mut b = base(kind, p, n);
                b.dtype = dtypes[t];
                b.op = ops[o];
                b.root = (x as usize) % p;
                b.salt = x;
                let d = match d {
                    0 => Diff::Root((x >> 8) as usize),
                    1 => Diff::Count((x >> 8) as usize % 50),
                    2 => Diff::DType(dtypes[(t + 1 + (x >> 8) as usize % 4) % dtypes.len()]),
                    3 => Diff::Op(ops[(o + 1 + (x >> 8) as usize % 2) % ops.len()]),
                    4 => Diff::Algo(algos[(x >> 8) as usize % 3], algos[(x >> 12) as usize % 3]),
                    _ => Diff::Kind(Kind::ALL[(x >> 8) as usize % Kind::ALL.len()]),
                };
                // Some ranks, not all.
                let mask = (mask % ((1u64 << p) - 1)).max(1);
                spread(&b, d, p, mask)
            },
        )
}

fn property(transport: &str, max_p: usize, cases: u32, seed: u8) {
    let cfg = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]);
    let mut runner = TestRunner::new_with_rng(cfg, rng);
    runner
        .run(&disagreement(max_p), |cases| {
            let what = format!("{transport}: {cases:?}");
            assert_all_mismatch(&cases, &run(transport, &cases), &what);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn property_random_disagreements_fail_every_rank_local() {
    property("local", 8, 256, 1);
}

#[test]
fn property_random_disagreements_fail_every_rank_tcp() {
    property("tcp", 5, 24, 2);
}

#[test]
fn property_random_disagreements_fail_every_rank_shm() {
    property("shm", 5, 24, 3);
}

// ---------------------------------------------------------------------------------------
// Real processes under ferrorun, over TCP and shared memory
// ---------------------------------------------------------------------------------------

/// Environment variable of a rank process: the calls of every rank (see [`encode`]).
const CASES_VAR: &str = "FERROCOMM_MISMATCH_TEST_CASES";
const ALGOS: [AllReduceAlgo; 4] = [
    AllReduceAlgo::Auto,
    AllReduceAlgo::Ring,
    AllReduceAlgo::HalvingDoubling,
    AllReduceAlgo::RecursiveDoubling,
];
const OPS: [ReduceOp; 5] = [
    ReduceOp::Sum,
    ReduceOp::Prod,
    ReduceOp::Min,
    ReduceOp::Max,
    ReduceOp::Avg,
];

fn index<T: PartialEq>(all: &[T], x: &T) -> usize {
    all.iter().position(|a| a == x).expect("listed")
}

/// `kind,dtype,op,count,root,algo,in_place,salt;...` (indexes into the lists).
fn encode(cases: &[Case]) -> String {
    cases
        .iter()
        .map(|c| {
            format!(
                "{},{},{},{},{},{},{},{}",
                index(&Kind::ALL, &c.kind),
                index(&DType::ALL, &c.dtype),
                index(&OPS, &c.op),
                c.count,
                c.root,
                index(&ALGOS, &c.algo),
                u8::from(c.in_place),
                c.salt
            )
        })
        .collect::<Vec<_>>()
        .join(";")
}

fn decode(s: &str) -> Vec<Case> {
    s.split(';')
        .map(|c| {
            let f: Vec<u64> = c.split(',').map(|x| x.parse().expect("number")).collect();
            Case {
                kind: Kind::ALL[f[0] as usize],
                dtype: DType::ALL[f[1] as usize],
                op: OPS[f[2] as usize],
                count: f[3] as usize,
                root: f[4] as usize,
                algo: ALGOS[f[5] as usize],
                in_place: f[6] == 1,
                salt: f[7],
            }
        })
        .collect()
}

/// Not a test on its own: the rank program when this executable runs as a rank.
#[test]
fn rank_entry_point() {
    let Ok(cases) = std::env::var(CASES_VAR) else {
        return common::rank_main();
    };
    let cases = decode(&cases);
    let comm = ferrocomm::init().unwrap_or_else(|e| panic!("rank failed to join: {e}"));
    let me = comm.rank();
    // Every rank exits 0 whatever happened (ferrorun stops the others when one fails);
    // the test reads the outcome from stdout.
    match run_bytes(&comm, &cases[me]) {
        Ok(v) => println!("MMOUT rank={me} ok={}", v.len()),
        Err(e) => {
            let m = matches!(e, Error::CollectiveMismatch { .. });
            println!("MMOUT rank={me} err={} {e}", u8::from(m));
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}

/// Runs `cases` as processes under ferrorun over `transport` and checks the outcomes.
fn processes(transport: &str, cases: &[Case], what: &str) {
    let p = cases.len().to_string();
    let cmd = common::ferrorun(
        &["--nproc-per-node", &p],
        "mismatch",
        &[
            (CASES_VAR, &encode(cases)),
            ("FERROCOMM_TRANSPORT", transport),
            ("FERROCOMM_OP_TIMEOUT", "1800"),
        ],
    );
    let done = common::Proc::start(what, cmd).finish_within(BOUND);
    let mut res: Vec<Option<Outcome>> = vec![None; cases.len()];
    for line in done.stdout.lines() {
        let Some((_, rest)) = line.split_once("MMOUT rank=") else {
            continue;
        };
        let (rank, rest) = rest.split_once(' ').expect("rank and outcome");
        let rank: usize = rank.parse().expect("rank");
        res[rank] = Some(if let Some(n) = rest.strip_prefix("ok=") {
            Ok(n.parse().expect("bytes"))
        } else {
            let (m, msg) = rest.split_once(' ').expect("error");
            Err((m == "err=1", msg.to_string()))
        });
    }
    let res: Vec<Outcome> = res
        .into_iter()
        .enumerate()
        .map(|(r, o)| o.unwrap_or_else(|| panic!("{what}: no outcome of rank {r}: {done:?}")))
        .collect();
    assert_outcomes(cases, &res, what);
}

/// A few fixed disagreements and random ones, each a job of real processes.
fn process_matrix(transport: &str, seed: u8) {
    let fixed: Vec<Vec<Case>> = vec![
        // Issue 13 item 1: broadcast, root 0 on rank 0, root 1 elsewhere.
        (0..3)
            .map(|r| Case {
                root: usize::from(r != 0),
                ..base(Kind::Broadcast, 3, 4)
            })
            .collect(),
        // Reduce with disagreeing roots: no rank may wait for the operation timeout.
        (0..4)
            .map(|r| Case {
                root: usize::from(r == 2),
                ..base(Kind::Reduce, 4, 1)
            })
            .collect(),
        // One rank calls another collective.
        (0..3)
            .map(|r| {
                base(
                    if r == 1 {
                        Kind::Gather
                    } else {
                        Kind::AllGather
                    },
                    3,
                    2,
                )
            })
            .collect(),
    ];
    for (i, cases) in fixed.iter().enumerate() {
        processes(
            transport,
            cases,
            &format!("{transport} fixed {i}: {cases:?}"),
        );
    }
    let cfg = Config {
        cases: 6,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]);
    let mut runner = TestRunner::new_with_rng(cfg, rng);
    runner
        .run(&disagreement(4), |cases| {
            processes(transport, &cases, &format!("{transport}: {cases:?}"));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn processes_over_tcp_fail_every_rank_with_the_mismatch() {
    process_matrix("tcp", 4);
}

#[test]
fn processes_over_shm_fail_every_rank_with_the_mismatch() {
    process_matrix("shm", 5);
}
