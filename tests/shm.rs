//! The shared-memory transport between processes: ranks started by `ferrorun` or by the test
//! itself (this test executable re-executed as a rank, see [`rank_entry_point`]), on one
//! host, on two "hosts" (host identities set apart with `FERROCOMM_HOST_ID`), 8 ranks on 2
//! cores, ranks killed in the middle of transfers, the single-copy fallback, and no segment
//! left in `/dev/shm` after any of it.
//!
//! Every run has a generous time limit: a hang fails the test instead of blocking the suite.
//! Nothing here asserts a timing except "noticed within seconds".

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{FERRORUN, Finished, LIMIT, Proc, ROLE, free_port};

use ferrocomm::transport::shm::{ShmConfig, segment_prefix};
use ferrocomm::{AllReduceAlgo, AllReduceOptions, Communicator, Error, ReduceOp};

// ---------------------------------------------------------------- helpers

/// Names in /dev/shm that belong to job `job`.
fn leftovers(job: &str) -> Vec<String> {
    let prefix = segment_prefix(job);
    std::fs::read_dir("/dev/shm")
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// ferrorun running this executable as ranks with `role`, plus `env`.
fn ferrorun(args: &[&str], role: &str, env: &[(&str, &str)]) -> Proc {
    Proc::start(role, common::ferrorun(args, role, env))
}

/// [`ferrorun`] pinned to CPUs 0 and 1 with taskset (2 cores on a bigger machine).
fn ferrorun_on_two_cpus(args: &[&str], role: &str) -> Proc {
    let mut cmd = Command::new("taskset");
    common::clean_env(&mut cmd);
    cmd.args(["-c", "0,1", FERRORUN])
        .args(args)
        .arg("--")
        .args(common::self_as_rank())
        .env(ROLE, role);
    Proc::start(role, cmd)
}

/// Lines of `out` that start with `tag ` (libtest may print on the same line first).
fn tagged<'a>(out: &'a str, tag: &str) -> Vec<&'a str> {
    let pat = format!("{tag} ");
    out.lines()
        .filter_map(|l| l.find(&pat).map(|i| &l[i + pat.len()..]))
        .collect()
}

/// The job ids the ranks printed (`JOB <id>`), checked to be one.
fn job_of(out: &Finished) -> String {
    let jobs: BTreeSet<&str> = tagged(&out.stdout, "JOB").into_iter().collect();
    assert_eq!(jobs.len(), 1, "one job id expected: {out:?}");
    jobs.into_iter()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A rank started by the test itself (no launcher), through `env://` with rank 0 hosting
/// the store.
fn spawn_rank(
    rank: usize,
    world: usize,
    port: u16,
    job: &str,
    role: &str,
    env: &[(&str, &str)],
) -> Proc {
    let mut cmd = common::by_hand(role, rank, world, port, env);
    cmd.env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("FERROCOMM_JOB_ID", job)
        .env("FERROCOMM_TIMEOUT", "60")
        // The test's own settings win over the defaults above.
        .envs(env.iter().copied());
    Proc::start(&format!("{role} rank {rank}"), cmd)
}

fn pattern(n: usize, salt: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 31 + salt * 7) % 251) as u8).collect()
}

// ---------------------------------------------------------------- the ranks' programs

/// Not a test on its own: when this executable is started as a rank ([`ROLE`] set), runs
/// that role's program; a failure panics (exit code 101).
#[test]
fn rank_entry_point() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let comm = match ferrocomm::init() {
        Ok(c) => c,
        Err(e) => {
            println!("INITERR {e}");
            std::process::exit(3);
        }
    };
    println!(
        "JOB {}",
        std::env::var("FERROCOMM_JOB_ID").unwrap_or_default()
    );
    match role.as_str() {
        "exchange" => exchange(&comm),
        "stress" => stress(&comm),
        "stream-send" => stream(&comm, 0),
        "stream-recv" => stream(&comm, 1),
        "collectives" => collectives(&comm),
        other => panic!("unknown role {other}"),
    }
}

/// Checks the transports chosen, then moves messages of every protocol around the ring and
/// between all pairs, and passes barriers.
fn exchange(c: &Communicator) {
    let (me, n) = (c.rank(), c.size());
    let expect = std::env::var("EXPECT_TRANSPORT").unwrap_or_else(|_| "shm".into());
    for p in (0..n).filter(|&p| p != me) {
        let got = c.transport_to(p).expect("transport_to");
        let want = match expect.as_str() {
            // Ranks per node in order: the same node is the same local block.
            "mixed" => {
                let per = std::env::var("LOCAL_WORLD_SIZE")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .expect("LOCAL_WORLD_SIZE");
                let node_of = |r: usize| {
                    // Node 0 runs the first `per0` ranks; all tests use equal nodes.
                    r / per
                };
                if node_of(p) == node_of(me) {
                    "shm"
                } else {
                    "tcp"
                }
            }
            other => {
                if other == "shm" {
                    "shm"
                } else {
                    "tcp"
                }
            }
        };
        assert_eq!(got, want, "rank {me} to {p}");
    }
    let right = (me + 1) % n;
    let left = (me + n - 1) % n;
    // Eager, at the default eager limit and just above (single copy, or streamed without
    // CMA), split single copies, and a message larger than the ring.
    let eager = ShmConfig::default().eager_limit;
    for (i, size) in [0usize, 8, eager, eager + 1, 40_000, 100_000, 4 << 20]
        .into_iter()
        .enumerate()
    {
        let out = pattern(size, me + i);
        let mut inp = vec![0u8; size];
        let st = c
            .sendrecv(&out, right, i as u32, &mut inp, left, i as u32)
            .expect("ring exchange");
        assert_eq!(st.bytes, size);
        assert!(inp == pattern(size, left + i), "size {size} from {left}");
    }
    // Every pair at once, non-blocking, mixed sizes.
    let sizes = [24usize, 70_000, 300_000];
    let outs: Vec<Vec<u8>> = (0..n)
        .map(|p| pattern(sizes[p % sizes.len()], me * 100 + p))
        .collect();
    let mut ins: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; sizes[me % sizes.len()]]).collect();
    c.scope(|s| {
        let mut reqs = Vec::new();
        for (p, b) in ins.iter_mut().enumerate() {
            if p != me {
                reqs.push(s.irecv(b, p, 77u32).expect("irecv"));
            }
        }
        for (p, b) in outs.iter().enumerate() {
            if p != me {
                reqs.push(s.isend(b, p, 77).expect("isend"));
            }
        }
        s.wait_all(reqs).expect("all pairs");
    });
    for (p, b) in ins.iter().enumerate() {
        if p != me {
            assert!(
                *b == pattern(sizes[me % sizes.len()], p * 100 + me),
                "from {p}"
            );
        }
    }
    for _ in 0..20 {
        c.barrier().expect("barrier");
    }
    println!("OK {me}");
}

/// Many rounds of barriers, ring shifts of 1 MiB and pairwise exchanges: for 8 ranks on 2
/// cores, where nobody may spin the others off the CPU.
fn stress(c: &Communicator) {
    let (me, n) = (c.rank(), c.size());
    let right = (me + 1) % n;
    let left = (me + n - 1) % n;
    let big = pattern(1 << 20, me);
    let mut inp = vec![0u8; 1 << 20];
    for round in 0..20 {
        c.barrier().expect("barrier");
        c.sendrecv(&big, right, 1, &mut inp, left, 1u32)
            .expect("ring shift");
        assert!(inp == pattern(1 << 20, left), "round {round}");
        let partner = me ^ (1 << (round % 3));
        if partner < n {
            let out = [me as u64; 8];
            let mut got = [0u64; 8];
            c.sendrecv(&out, partner, 2, &mut got, partner, 2u32)
                .expect("pairwise");
            assert_eq!(got, [partner as u64; 8]);
        }
    }
    c.barrier().expect("final barrier");
    println!("OK {me}");
}

/// all_reduce (every algorithm), broadcast and all_gather over shared memory, at sizes that
/// take each path of the transport (eager, streamed, single copy and split single copy);
/// every element checked. Values are small integers, so float sums are exact.
fn collectives(c: &Communicator) {
    let (me, n) = (c.rank(), c.size());
    for p in (0..n).filter(|&p| p != me) {
        assert_eq!(c.transport_to(p).expect("transport_to"), "shm", "to {p}");
    }
    // Elements: 1, a few, eager-sized, streamed, 1 MiB of f32 (single copy, split).
    let counts = [1usize, 7, 4 << 10, 20_000, 1 << 18];
    for (round, &count) in counts.iter().enumerate() {
        let value = |r: usize, i: usize| ((r * 131 + i * 7 + round) % 97) as f32;
        let want: Vec<f32> = (0..count)
            .map(|i| (0..n).map(|r| value(r, i)).sum())
            .collect();
        for algo in AllReduceAlgo::ALL {
            let mut buf: Vec<f32> = (0..count).map(|i| value(me, i)).collect();
            c.all_reduce_with(&mut buf, ReduceOp::Sum, &AllReduceOptions::algo(algo))
                .unwrap_or_else(|e| panic!("all_reduce {algo:?} of {count}: {e}"));
            assert!(buf == want, "all_reduce {algo:?} of {count} on rank {me}");
        }
        let mut maxed: Vec<i64> = (0..count).map(|i| (me * count + i) as i64).collect();
        c.all_reduce(&mut maxed, ReduceOp::Max)
            .expect("all_reduce max");
        assert!(
            maxed
                .iter()
                .enumerate()
                .all(|(i, &v)| v == ((n - 1) * count + i) as i64),
            "all_reduce max of {count} on rank {me}"
        );

        let root = round % n;
        let mut b: Vec<f64> = if me == root {
            (0..count).map(|i| (i * 3 + root) as f64).collect()
        } else {
            vec![-1.0; count]
        };
        c.broadcast(&mut b, root).expect("broadcast");
        assert!(
            b.iter()
                .enumerate()
                .all(|(i, &v)| v == (i * 3 + root) as f64),
            "broadcast of {count} from {root} on rank {me}"
        );

        let mine: Vec<u32> = (0..count).map(|i| (me * 1_000_003 + i) as u32).collect();
        let mut all = vec![0u32; count * n];
        c.all_gather(&mine, &mut all).expect("all_gather");
        for (r, block) in all.chunks(count).enumerate() {
            assert!(
                block
                    .iter()
                    .enumerate()
                    .all(|(i, &v)| v == (r * 1_000_003 + i) as u32),
                "all_gather of {count}: block {r} on rank {me}"
            );
        }
    }
    c.barrier().expect("barrier");
    println!("OK {me}");
}

/// Rank 0 sends 64 MiB messages to rank 1 until something fails; the test kills one of
/// them. The survivor prints how it failed (`LOST` for a lost peer) and exits 0.
fn stream(c: &Communicator, _role_rank: usize) {
    let me = c.rank();
    let n = 64 << 20;
    let mut buf = vec![me as u8; n];
    println!("PID {me} {}", std::process::id());
    println!("STREAMING {me}");
    let started = Instant::now();
    let mut i = 0u64;
    let err = loop {
        let r = if me == 0 {
            c.send(&buf, 1, 0).map(|_| ())
        } else {
            c.recv(&mut buf, 0, 0u32).map(|_| ())
        };
        if let Err(e) = r {
            break e;
        }
        i += 1;
        if i == 2 {
            println!("FLOWING {me}");
            if let Ok(dir) = std::env::var("MARK_DIR") {
                std::fs::write(format!("{dir}/flowing-{me}"), b"").expect("marker");
            }
        }
        if started.elapsed() > Duration::from_secs(100) {
            panic!("rank {me}: nobody was killed");
        }
    };
    let kind = match err {
        Error::PeerLost { .. } => "LOST",
        _ => "OTHER",
    };
    println!("{kind} {me} {err}");
    // Exit without closing the communicator normally would look like a crash to nobody:
    // the peer is dead already.
    std::process::exit(0);
}

// ---------------------------------------------------------------- tests

#[test]
fn ranks_of_one_host_exchange_over_shared_memory() {
    let f = ferrorun(&["--nproc-per-node", "3"], "exchange", &[]).finish();
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert_eq!(tagged(&f.stdout, "OK").len(), 3, "{f:?}");
    assert!(leftovers(&job_of(&f)).is_empty(), "segments left behind");
}

#[test]
fn cma_disabled_streams_everything_through_the_rings() {
    let f = ferrorun(
        &["--nproc-per-node", "2"],
        "exchange",
        &[
            ("FERROCOMM_SHM_CMA", "0"),
            ("FERROCOMM_SHM_RING_SIZE", "64k"),
        ],
    )
    .finish();
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert_eq!(tagged(&f.stdout, "OK").len(), 2, "{f:?}");
    assert!(leftovers(&job_of(&f)).is_empty());
}

#[test]
fn forced_tcp_uses_tcp_between_local_ranks() {
    let f = ferrorun(
        &["--nproc-per-node", "2"],
        "exchange",
        &[("FERROCOMM_TRANSPORT", "tcp"), ("EXPECT_TRANSPORT", "tcp")],
    )
    .finish();
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert_eq!(tagged(&f.stdout, "OK").len(), 2, "{f:?}");
    assert!(leftovers(&job_of(&f)).is_empty());
}

/// Starts the two nodes of a job whose nodes have different host identities.
fn two_hosts(role: &str, env: &[(&str, &str)]) -> (Finished, Finished) {
    let port = free_port().to_string();
    let node = |rank: &'static str, host: &'static str| {
        let mut e: Vec<(&str, &str)> = env.to_vec();
        e.push(("FERROCOMM_HOST_ID", host));
        ferrorun(
            &[
                "--nnodes",
                "2",
                "--node-rank",
                rank,
                "--nproc-per-node",
                "2",
                "--master-port",
                &port,
            ],
            role,
            &e,
        )
    };
    let n1 = node("1", "test-host-b");
    let n0 = node("0", "test-host-a");
    (n0.finish(), n1.finish())
}

#[test]
fn mixed_world_uses_shm_within_and_tcp_between_hosts() {
    let (f0, f1) = two_hosts("exchange", &[("EXPECT_TRANSPORT", "mixed")]);
    assert_eq!((f0.code(), f1.code()), (Some(0), Some(0)), "{f0:?}\n{f1:?}");
    assert_eq!(
        tagged(&f0.stdout, "OK").len() + tagged(&f1.stdout, "OK").len(),
        4
    );
    assert!(leftovers(&job_of(&f0)).is_empty());
}

#[test]
fn forcing_shm_across_hosts_fails_clearly() {
    let (f0, f1) = two_hosts("exchange", &[("FERROCOMM_TRANSPORT", "shm")]);
    for f in [&f0, &f1] {
        assert_ne!(f.code(), Some(0), "{f:?}");
        let errs = tagged(&f.stdout, "INITERR");
        assert!(!errs.is_empty(), "{f:?}");
        for e in errs {
            assert!(
                e.contains("FERROCOMM_TRANSPORT") && e.contains("another host"),
                "{e}"
            );
        }
    }
}

#[test]
fn eight_ranks_on_two_cores_make_progress() {
    // ferrorun gives every rank LOCAL_WORLD_SIZE=8, so on this 2-core machine they spin 0 µs
    // and sleep on their futex at once; `taskset` keeps it to 2 cores on bigger machines.
    let mut args = vec!["--nproc-per-node", "8"];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let taskset = cores > 2
        && Command::new("taskset")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    let f = if taskset {
        ferrorun_on_two_cpus(&args, "stress").finish()
    } else {
        args.truncate(2);
        ferrorun(&args, "stress", &[]).finish()
    };
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert_eq!(tagged(&f.stdout, "OK").len(), 8, "{f:?}");
    assert!(leftovers(&job_of(&f)).is_empty());
}

#[test]
fn collectives_run_over_shared_memory() {
    for nproc in ["2", "3", "4"] {
        let f = ferrorun(&["--nproc-per-node", nproc], "collectives", &[]).finish();
        assert_eq!(f.code(), Some(0), "{nproc} ranks: {f:?}");
        assert_eq!(
            tagged(&f.stdout, "OK").len(),
            nproc.parse().unwrap_or(0),
            "{f:?}"
        );
        assert!(leftovers(&job_of(&f)).is_empty(), "{nproc} ranks");
    }
}

#[test]
fn collectives_of_eight_ranks_on_two_cores() {
    // As eight_ranks_on_two_cores_make_progress: LOCAL_WORLD_SIZE=8 > cores, so no spin.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let f = if cores > 2 {
        ferrorun_on_two_cpus(&["--nproc-per-node", "8"], "collectives").finish()
    } else {
        ferrorun(&["--nproc-per-node", "8"], "collectives", &[]).finish()
    };
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert_eq!(tagged(&f.stdout, "OK").len(), 8, "{f:?}");
    assert!(leftovers(&job_of(&f)).is_empty());
}

/// Kills rank `victim` of a 2-rank job streaming 64 MiB messages once data flows; the
/// other rank must fail with PeerLost within seconds, and no segment may be left.
fn kill_mid_transfer(victim: usize, env: &[(&str, &str)]) {
    let port = free_port();
    let job = format!("shm-kill-{}-{victim}-{}", std::process::id(), env.len());
    let dir = tempfile::tempdir().expect("tempdir");
    let mark = dir.path().to_string_lossy().into_owned();
    let mut env = env.to_vec();
    env.push(("MARK_DIR", &mark));
    let r0 = spawn_rank(0, 2, port, &job, "stream-send", &env);
    let r1 = spawn_rank(1, 2, port, &job, "stream-recv", &env);
    let (mut victim_proc, survivor) = if victim == 0 { (r0, r1) } else { (r1, r0) };
    // Kill once both have moved a couple of messages: data is then flowing.
    let start = Instant::now();
    while !(dir.path().join("flowing-0").exists() && dir.path().join("flowing-1").exists()) {
        assert!(start.elapsed() < LIMIT, "the ranks never got going");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(victim_proc.running(), "the victim exited early");
    let killed_at = Instant::now();
    victim_proc.kill();
    let s = survivor.finish();
    let noticed = killed_at.elapsed();
    assert_eq!(s.code(), Some(0), "{s:?}");
    let lost = tagged(&s.stdout, "LOST");
    assert_eq!(lost.len(), 1, "{s:?}");
    assert!(
        tagged(&s.stdout, "FLOWING").len() == 1,
        "data never flowed: {s:?}"
    );
    assert!(
        noticed < Duration::from_secs(20),
        "noticed after {noticed:?} (started {:?} ago)",
        start.elapsed()
    );
    assert!(leftovers(&job).is_empty(), "segments left behind");
}

#[test]
fn killed_receiver_is_noticed_by_the_sender() {
    kill_mid_transfer(1, &[]);
}

#[test]
fn killed_sender_is_noticed_by_the_receiver() {
    kill_mid_transfer(0, &[]);
}

#[test]
fn killed_peer_is_noticed_while_streaming_without_cma() {
    kill_mid_transfer(0, &[("FERROCOMM_SHM_CMA", "0")]);
    kill_mid_transfer(1, &[("FERROCOMM_SHM_CMA", "0")]);
}

// ---------------------------------------------------------------- in one process

/// A `tracing` writer into a shared buffer, to count warnings.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn refused_single_copy_is_detected_once_and_falls_back() {
    let cfg = ShmConfig {
        simulate_cma_refusal: true,
        ..ShmConfig::default()
    };
    let job = format!("shm-refusal-{}", std::process::id());
    let comms = Communicator::shm_world_with(2, &job, cfg).unwrap();
    assert!(leftovers(&job).is_empty(), "names are removed once mapped");
    let log = LogBuf::default();
    std::thread::scope(|s| {
        for c in comms {
            let log = log.clone();
            s.spawn(move || {
                let sub = tracing_subscriber::fmt()
                    .with_writer(move || log.clone())
                    .with_ansi(false)
                    .finish();
                tracing::subscriber::with_default(sub, || {
                    let peer = 1 - c.rank();
                    for i in 0..3 {
                        let out = pattern(1 << 20, c.rank() + i);
                        let mut inp = vec![0u8; 1 << 20];
                        c.sendrecv(&out, peer, 0, &mut inp, peer, 0u32).unwrap();
                        assert!(inp == pattern(1 << 20, peer + i));
                    }
                });
            });
        }
    });
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).into_owned();
    let warnings = text.matches("refused").count();
    assert_eq!(warnings, 2, "one warning per rank and peer:\n{text}");
    assert!(leftovers(&job).is_empty());
}

#[test]
fn a_rank_that_closes_is_reported_closed_not_crashed() {
    let comms = Communicator::shm_world(3).unwrap();
    let mut it = comms.into_iter();
    let (c0, c1, c2) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    // Rank 2 sends, then closes: its message is still delivered.
    c2.send(&[5u32; 10], 0, 1).unwrap();
    drop(c2);
    let mut got = [0u32; 10];
    c0.recv(&mut got, 2, 1u32).unwrap();
    assert_eq!(got, [5; 10]);
    let err = c0
        .recv_timeout(&mut got, 2, 1u32, Some(Duration::from_secs(30)))
        .unwrap_err();
    assert!(matches!(err, Error::PeerLost { .. }), "{err}");
    assert!(err.to_string().contains("closed"), "{err}");
    // The others still talk.
    std::thread::scope(|s| {
        s.spawn(move || c1.send(&[9u8], 0, 3).unwrap());
        let mut b = [0u8];
        c0.recv(&mut b, 1, 3u32).unwrap();
        assert_eq!(b, [9]);
    });
}

#[test]
fn shm_world_of_many_threads_on_few_cores() {
    // 8 threads as ranks: more ranks than this machine's cores (in CI), so no spinning.
    let comms = Communicator::shm_world(8).unwrap();
    std::thread::scope(|s| {
        for c in comms {
            s.spawn(move || stress(&c));
        }
    });
}

/// A rank that dies (killed: no destructor runs) after creating its segment, before its
/// peers mapped it: the peers that find it dead remove its name, and their own go when
/// their setups fail, so nothing is left in /dev/shm.
#[test]
fn a_rank_killed_after_creating_its_segment_leaves_nothing_behind() {
    use ferrocomm::transport::shm::{LocalPeer, ShmSetup};
    let job = format!("shm-died-in-init-{}", std::process::id());
    // A pid that has exited (and been reaped): the "killed" rank's.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait for true");
    let me = std::process::id();
    let local: Vec<LocalPeer> = [me, me, dead]
        .iter()
        .enumerate()
        .map(|(rank, &pid)| LocalPeer {
            rank,
            pid,
            segment: ShmSetup::name_for(&job),
        })
        .collect();
    let setup = |r| ShmSetup::create(r, 3, local.clone(), ShmConfig::default()).unwrap();
    // Rank 2 creates its segment and dies: forgetting the setup is what a kill does.
    std::mem::forget(setup(2));
    let (s0, s1) = (setup(0), setup(1));
    assert_eq!(leftovers(&job).len(), 3, "{:?}", leftovers(&job));
    // Rank 0 maps rank 1's segment, then finds rank 2 dead; rank 1 then fails too (its
    // setup is dropped, as an error return from init does).
    match s0.connect(Instant::now() + Duration::from_secs(30)) {
        Err(Error::PeerLost { peer: 2, .. }) => {}
        other => panic!("expected PeerLost for rank 2, got {:?}", other.err()),
    }
    drop(s1);
    assert!(
        leftovers(&job).is_empty(),
        "segments left behind: {:?}",
        leftovers(&job)
    );
}

/// As above, but the rank dies after a peer mapped its segment, while that peer waits for
/// the others to map its own: the waiting peer removes the dead rank's name.
#[test]
fn a_rank_killed_while_peers_attach_leaves_nothing_behind() {
    use ferrocomm::transport::shm::{LocalPeer, ShmSetup};
    let job = format!("shm-died-attaching-{}", std::process::id());
    let mut child = Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    let me = std::process::id();
    let local: Vec<LocalPeer> = [me, me, child.id()]
        .iter()
        .enumerate()
        .map(|(rank, &pid)| LocalPeer {
            rank,
            pid,
            segment: ShmSetup::name_for(&job),
        })
        .collect();
    let setup = |r| ShmSetup::create(r, 3, local.clone(), ShmConfig::default()).unwrap();
    std::mem::forget(setup(2));
    let (s0, s1) = (setup(0), setup(1));
    let deadline = Instant::now() + Duration::from_secs(30);
    let t0 = s0
        .connect(deadline)
        .expect("rank 0 maps both peers' segments");
    // Rank 2 is killed; rank 1 has not attached anything yet.
    child.kill().expect("kill");
    child.wait().expect("wait");
    match t0.wait_attached(deadline) {
        Err(Error::PeerLost { .. }) => {}
        other => panic!("expected PeerLost, got {other:?}"),
    }
    drop(t0);
    drop(s1);
    assert!(
        leftovers(&job).is_empty(),
        "segments left behind: {:?}",
        leftovers(&job)
    );
}
