//! Collectives between real processes over TCP: this test executable re-executes itself as
//! the rank program ([`rank_program`]), started by `ferrorun` (a sample of the collective
//! matrix, checked against the reference in every rank, bit-identity checked through an
//! all_gather of digests) or by hand (a rank SIGKILLed during all_reduce: the others must
//! fail with an error within seconds, long before the operation timeout).
//!
//! Every run has a generous time limit: a hang fails the test, it never blocks the suite.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::coll::{Case, Kind, check_bytes, digest, ops_for, run_bytes};
use ferrocomm::{AllReduceAlgo, DType, ReduceOp};

const FERRORUN: &str = env!("CARGO_BIN_EXE_ferrorun");
/// Set in the environment of ranks that are this executable: what the rank does.
const AS_RANK: &str = "FERROCOMM_COLL_TEST_AS_RANK";
/// Upper bound for any run.
const LIMIT: Duration = Duration::from_secs(120);

/// The cases every rank of the "sample" program runs, in order (the same on every rank).
fn sample_cases(p: usize) -> Vec<Case> {
    let mut cases = Vec::new();
    let algos = [
        AllReduceAlgo::Ring,
        AllReduceAlgo::HalvingDoubling,
        AllReduceAlgo::RecursiveDoubling,
        AllReduceAlgo::Auto,
    ];
    let mut k = 0usize;
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        for op in ops_for(dtype) {
            let algo = algos[k % algos.len()];
            let count = [0, 1, p - 1, 1001, 70_001][k % 5];
            cases.push(Case::all_reduce(dtype, op, count, algo));
            k += 1;
        }
        // One other collective per type, cycling through them, in and out of place.
        let kind = Kind::ALL[1 + i % (Kind::ALL.len() - 1)];
        for count in [3usize, 40_000 / p] {
            cases.push(Case {
                kind,
                dtype,
                op: ops_for(dtype)[i % 4],
                count,
                root: i % p,
                algo: AllReduceAlgo::Auto,
                in_place: i % 2 == 0,
                salt: (i * 977 + count) as u64,
            });
        }
    }
    // Large enough to pipeline many pieces through each algorithm.
    for algo in &algos[..3] {
        cases.push(Case::all_reduce(DType::F32, ReduceOp::Sum, 3 << 20, *algo));
    }
    cases
}

/// Not a test on its own: the rank program, when this executable runs as a rank (with
/// [`AS_RANK`] set). Otherwise it does nothing.
#[test]
fn rank_program() {
    let Ok(mode) = std::env::var(AS_RANK) else {
        return;
    };
    let comm = ferrocomm::init().unwrap_or_else(|e| panic!("rank failed to join: {e}"));
    let (me, p) = (comm.rank(), comm.size());
    match mode.as_str() {
        "sample" => {
            for case in sample_cases(p) {
                let got =
                    run_bytes(&comm, &case).unwrap_or_else(|e| panic!("rank {me}: {case:?}: {e}"));
                check_bytes(&case, p, me, &got);
                if case.kind == Kind::AllReduce {
                    let mut all = vec![0u64; p];
                    comm.all_gather(&[digest(&got)], &mut all).expect("digests");
                    assert!(
                        all.iter().all(|&d| d == all[0]),
                        "rank {me}: {case:?}: results differ between ranks: {all:?}"
                    );
                }
            }
            println!("COLL OK rank {me} of {p}");
        }
        "die" => {
            let mut v = vec![1.0f32; 1 << 18];
            for i in 0u64.. {
                if let Err(e) = comm.all_reduce(&mut v, ReduceOp::Sum) {
                    println!("COLL ERR rank {me}: {e}");
                    std::process::exit(3);
                }
                if i == 2 {
                    println!("READY rank {me}");
                }
            }
        }
        other => panic!("unknown mode {other}"),
    }
}

fn self_exe() -> String {
    std::env::current_exe()
        .expect("test executable path")
        .to_string_lossy()
        .into_owned()
}

fn rank_args() -> [&'static str; 5] {
    [
        "--exact",
        "rank_program",
        "--nocapture",
        "--test-threads",
        "1",
    ]
}

/// Waits for `child` with the [`LIMIT`]; kills it and fails the test after that.
fn wait_limited(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} hung for {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sample_under_ferrorun(p: usize) {
    let exe = self_exe();
    let mut args = vec![
        "--nproc-per-node".to_string(),
        p.to_string(),
        "--".into(),
        exe,
    ];
    args.extend(rank_args().iter().map(|s| s.to_string()));
    let mut child = Command::new(FERRORUN)
        .args(&args)
        .env(AS_RANK, "sample")
        .env_remove("FERROCOMM_ALLREDUCE_ALGO")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferrorun");
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || std::io::read_to_string(out).unwrap_or_default());
    let err = std::thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
    let status = wait_limited(&mut child, "ferrorun");
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    assert!(
        status.success(),
        "{status:?}\nstdout:\n{out}\nstderr:\n{err}"
    );
    for r in 0..p {
        assert!(
            out.contains(&format!("COLL OK rank {r} of {p}")),
            "rank {r} did not finish\nstdout:\n{out}\nstderr:\n{err}"
        );
    }
}

#[test]
fn sample_of_the_matrix_between_3_processes() {
    sample_under_ferrorun(3);
}

#[test]
fn sample_of_the_matrix_between_4_processes() {
    sample_under_ferrorun(4);
}

#[test]
fn a_sigkilled_rank_fails_the_others_within_seconds() {
    let p = 4;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
        .to_string();
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut children: Vec<Child> = (0..p)
        .map(|r| {
            let mut c = Command::new(self_exe())
                .args(rank_args())
                .env(AS_RANK, "die")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", p.to_string())
                .env("FERROCOMM_OP_TIMEOUT", "600")
                .env_remove("FERROCOMM_STORE_EXTERNAL")
                .env_remove("FERROCOMM_INIT_METHOD")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start a rank");
            let out = c.stdout.take().expect("stdout");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send((r, line));
                }
            });
            c
        })
        .collect();
    drop(tx);
    let kill_all = |children: &mut Vec<Child>| {
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    // Wait until every rank is inside its all_reduce loop.
    let start = Instant::now();
    let mut ready = vec![false; p];
    let mut lines: Vec<(usize, String)> = Vec::new();
    while !ready.iter().all(|&r| r) {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((r, l)) => {
                if l.contains("READY") {
                    ready[r] = true;
                }
                lines.push((r, l));
            }
            Err(_) if start.elapsed() > LIMIT => {
                kill_all(&mut children);
                panic!("the ranks never all got going: {lines:?}");
            }
            Err(_) => {}
        }
    }
    let victim = 1;
    let killed_at = Instant::now();
    children[victim].kill().expect("SIGKILL rank 1");
    let _ = children[victim].wait();
    // Every other rank must exit with an error well before the 600 s operation timeout.
    for (r, c) in children.iter_mut().enumerate() {
        if r == victim {
            continue;
        }
        let status = wait_limited(c, "a surviving rank");
        assert_eq!(status.code(), Some(3), "rank {r}: {status:?}");
    }
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "the survivors took {took:?}"
    );
    lines.extend(rx.try_iter());
    for r in (0..p).filter(|&r| r != victim) {
        let err = lines
            .iter()
            .find(|(q, l)| *q == r && l.starts_with("COLL ERR"))
            .unwrap_or_else(|| panic!("rank {r} printed no error: {lines:?}"));
        assert!(
            err.1.contains("lost peer") || err.1.contains("gave up"),
            "rank {r}: {}",
            err.1
        );
    }
}
