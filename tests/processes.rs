//! Real processes: ranks of this test executable (see `common`) joined through the real
//! rendezvous and TCP transport, started by the real `ferrorun` or by hand.
//!
//! Covered: 1, 2, 4 and 8 ranks under ferrorun (8 on a 2-core machine: waiting must sleep,
//! not spin); two ferrorun "nodes" of 2 and 3 ranks on one host; two jobs at once; a rank
//! that never starts; a rank SIGKILLed in the middle of a 1 MiB exchange loop, with and
//! without ferrorun; a rank SIGKILLed during init and a rank 0 started twice, without
//! ferrorun; wrong arguments and settings in the environment.
//!
//! Every process runs under a generous limit (`common::LIMIT`): a hang fails the test, and
//! every process is killed when its test ends. No test asserts a timing beyond that.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Proc, by_hand, count, ferrorun, free_port, free_ports, num, records};

#[test]
fn rank_entry_point() {
    common::rank_main()
}

#[test]
fn ring_through_ferrorun_with_1_2_4_8_ranks() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for n in [1usize, 2, 4, 8] {
        let nproc = n.to_string();
        let f = Proc::start(
            &format!("ferrorun with {n} ranks"),
            ferrorun(&["--nproc-per-node", &nproc], "ring", &[]),
        )
        .finish();
        assert_eq!(f.code(), Some(0), "{f:?}");
        let info = f.records("INFO");
        assert_eq!(info.len(), n, "one INFO per rank: {f:?}");
        let ranks: BTreeSet<usize> = info.iter().map(|r| num(r, "rank")).collect();
        assert_eq!(ranks, (0..n).collect(), "ranks 0..{n} exactly once: {f:?}");
        let pids: BTreeSet<usize> = info.iter().map(|r| num(r, "pid")).collect();
        assert_eq!(pids.len(), n, "one process per rank: {f:?}");
        for r in &info {
            assert_eq!(num(r, "size"), n, "{r:?}");
            assert_eq!(num(r, "local_rank"), num(r, "rank"), "one host: {r:?}");
            assert_eq!(num(r, "local_size"), n, "{r:?}");
            assert_eq!(num(r, "node"), 0, "{r:?}");
            assert!(
                r["tcp"].starts_with("127.0.0.1:"),
                "a loopback master: the transport listens on loopback: {r:?}"
            );
            assert_eq!(r["job"], info[0]["job"], "one job id: {f:?}");
            if n > cores {
                // More ranks than cores (8 on the 2-core test machine): a waiting rank
                // must sleep at once, or it takes the core from the rank it waits for.
                assert_eq!(
                    num(r, "spin_us"),
                    0,
                    "no spinning when oversubscribed: {r:?}"
                );
            }
        }
        let ok = f.records("RING");
        assert_eq!(ok.len(), n, "every rank passed the ring: {f:?}");
        let token = ok
            .iter()
            .find(|r| num(r, "rank") == 0)
            .map(|r| num(r, "token"));
        assert_eq!(token, Some(1000 + n * (n - 1) / 2), "{f:?}");
        assert!(!f.stderr.contains("panicked"), "{f:?}");
    }
}

/// Ferrorun for node `node` of a two-node job on `127.0.0.1:port`.
fn node(port: u16, node: usize, nproc: usize, role: &str, env: &[(&str, &str)]) -> Proc {
    let (port, node_s, nproc) = (port.to_string(), node.to_string(), nproc.to_string());
    Proc::start(
        &format!("node {node}"),
        ferrorun(
            &[
                "--nnodes",
                "2",
                "--node-rank",
                &node_s,
                "--nproc-per-node",
                &nproc,
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &port,
            ],
            role,
            env,
        ),
    )
}

#[test]
fn two_ferrorun_nodes_of_2_and_3_ranks_make_one_world() {
    let port = free_port();
    // Node 1 first: its launcher and ranks wait for node 0's store.
    let n1 = node(port, 1, 3, "ring", &[]);
    std::thread::sleep(Duration::from_millis(200));
    let n0 = node(port, 0, 2, "ring", &[]);
    let (f0, f1) = (n0.finish(), n1.finish());
    assert_eq!((f0.code(), f1.code()), (Some(0), Some(0)), "{f0:?}{f1:?}");
    let (i0, i1) = (f0.records("INFO"), f1.records("INFO"));
    let ranks = |i: &[std::collections::BTreeMap<String, String>]| {
        i.iter().map(|r| num(r, "rank")).collect::<Vec<_>>()
    };
    let mut all = ranks(&i0);
    all.extend(ranks(&i1));
    all.sort();
    assert_eq!(
        all,
        vec![0, 1, 2, 3, 4],
        "ranks 0..4 exactly once{f0:?}{f1:?}"
    );
    assert_eq!(
        ranks(&i0).into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([0, 1]),
        "node 0's ranks come first{f0:?}"
    );
    for r in i0.iter().chain(&i1) {
        assert_eq!(num(r, "size"), 5, "{r:?}");
        assert_eq!(
            r["job"], i0[0]["job"],
            "one job across both launchers: {r:?}"
        );
        assert_eq!(
            num(r, "env_node_rank"),
            usize::from(num(r, "rank") >= 2),
            "{r:?}"
        );
        // Both "nodes" are one host (same hostname, boot id and network namespace): by
        // host identity all 5 ranks share it, in rank order, and there is one node index.
        assert_eq!(num(r, "local_size"), 5, "{r:?}");
        assert_eq!(num(r, "local_rank"), num(r, "rank"), "{r:?}");
        assert_eq!(num(r, "node"), 0, "{r:?}");
    }
    assert_eq!(count(&f0.stdout, "RING") + count(&f1.stdout, "RING"), 5);
    let token = f0
        .records("RING")
        .iter()
        .find(|r| num(r, "rank") == 0)
        .map(|r| num(r, "token"));
    assert_eq!(token, Some(1000 + 10), "the token crossed both nodes{f0:?}");
}

#[test]
fn two_jobs_at_once_on_one_host_never_mix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let [pa, pb] = free_ports::<2>();
    let start = |name: &str, port: u16, nproc: &str, stop: &std::path::Path| {
        let port = port.to_string();
        let stop = stop.to_str().expect("utf-8 path");
        Proc::start(
            name,
            ferrorun(
                &["--nproc-per-node", nproc, "--master-port", &port],
                "loop",
                &[(common::STOP_FILE, stop), (common::MSG_BYTES, "262144")],
            ),
        )
    };
    let (stop_a, stop_b) = (dir.path().join("stop-a"), dir.path().join("stop-b"));
    let mut a = start("job A", pa, "3", &stop_a);
    let mut b = start("job B", pb, "2", &stop_b);
    // Both jobs are in their loops at the same time before either is told to stop.
    a.wait_for("3 ranks looping", |o| count(o, "LOOPING") == 3);
    b.wait_for("2 ranks looping", |o| count(o, "LOOPING") == 2);
    std::fs::write(&stop_a, b"").expect("stop file");
    std::fs::write(&stop_b, b"").expect("stop file");
    let (fa, fb) = (a.finish(), b.finish());
    assert_eq!((fa.code(), fb.code()), (Some(0), Some(0)), "{fa:?}{fb:?}");
    for (f, n) in [(&fa, 3usize), (&fb, 2)] {
        let info = f.records("INFO");
        let ranks: BTreeSet<usize> = info.iter().map(|r| num(r, "rank")).collect();
        assert_eq!(ranks, (0..n).collect(), "{f:?}");
        assert!(info.iter().all(|r| num(r, "size") == n), "{f:?}");
        let done = f.records("LOOPDONE");
        assert_eq!(done.len(), n, "{f:?}");
        assert_eq!(f.records("FINISHED").len(), n, "{f:?}");
        let rounds: BTreeSet<usize> = done.iter().map(|r| num(r, "rounds")).collect();
        assert_eq!(rounds.len(), 1, "every rank did the same rounds: {f:?}");
    }
    assert_ne!(
        fa.records("INFO")[0]["job"],
        fb.records("INFO")[0]["job"],
        "two jobs, two job ids"
    );
}

#[test]
fn a_rank_that_never_starts_is_named_and_the_others_give_up() {
    let port = free_port();
    let env = [("FERROCOMM_TIMEOUT", "3"), ("FERROCOMM_LOG_INTERVAL", "1")];
    // World of 3: rank 1 never starts. Rank 0 hosts the store and gathers the peer table;
    // rank 2 waits for that table.
    let r0 = Proc::start("rank 0", by_hand("init", 0, 3, port, &env));
    let r2 = Proc::start("rank 2", by_hand("init", 2, 3, port, &env));
    for (rank, f) in [(0, r0.finish()), (2, r2.finish())] {
        assert_eq!(f.code(), Some(1), "{f:?}");
        let err = f
            .stderr
            .lines()
            .find(|l| l.contains("RANKERR"))
            .unwrap_or_else(|| panic!("no error line: {f:?}"));
        assert!(
            err.contains("missing ranks: 1 (2 of 3 have joined)"),
            "names the missing rank: {f:?}"
        );
        assert!(
            err.contains(&format!("127.0.0.1:{port}")),
            "names the store: {f:?}"
        );
        if rank == 0 || err.contains("[Timeout {") {
            assert!(err.contains("[Timeout {"), "{f:?}");
            assert!(
                err.contains("FERROCOMM_TIMEOUT"),
                "says what raises it: {f:?}"
            );
        } else {
            // Rank 0 has the same timeout and hosts the store: when it gives up a moment
            // earlier, rank 2 loses the store just before its own deadline and says so,
            // with rank 0's reason or what it saw last.
            assert!(err.contains("[Io {") && err.contains("gave up"), "{f:?}");
            assert!(!err.contains("failed to fill whole buffer"), "{f:?}");
        }
        assert!(
            f.stderr.contains("still waiting") && f.stderr.contains("missing ranks: 1"),
            "logs who is missing while it waits: {f:?}"
        );
    }
}

/// Checks what the survivors of a SIGKILLed rank 1 (of 3) printed: each names rank 1 as
/// lost. `tagged`: their output went through `ferrorun --tag-output`.
fn survivors_name_the_dead_rank(stderr: &str, survivor: usize, tagged: bool) {
    let prefix = if tagged {
        format!("[rank {survivor}] ")
    } else {
        String::new()
    };
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&format!("RANKERR rank={survivor}:")))
        .collect();
    assert!(
        !errors.is_empty(),
        "rank {survivor} printed no error:\n{stderr}"
    );
    assert!(
        errors.iter().any(
            |l| l.contains(&format!("rank {survivor}: lost peer rank 1 during "))
                && l.contains("PeerLost")
        ),
        "rank {survivor} names the dead rank 1 (PeerLost):\n{stderr}"
    );
}

#[test]
fn a_rank_killed_mid_transfer_under_ferrorun() {
    // The survivors ignore SIGTERM, so that ferrorun's fail-fast stop (SIGTERM right after
    // the first failure) does not kill them before they notice the loss themselves: what
    // they print shows that the transport reports the dead peer. ferrorun's SIGKILL after
    // the grace period would still end them; they exit on their own long before.
    //
    // They also wait a second before exiting. A survivor notices the loss within
    // microseconds and can become a zombie before the SIGKILLed rank does (its teardown is
    // not faster): ferrorun, which can only tell which child it saw end first, would then
    // report the survivor. Real programs rarely exit that fast; the test wants to check
    // the report of the dead rank, not that race.
    let mut job = Proc::start(
        "ferrorun",
        ferrorun(
            &[
                "--nproc-per-node",
                "3",
                "--tag-output",
                "--grace-period",
                "60",
            ],
            "loop",
            &[
                (common::IGNORE_SIGTERM, "1"),
                (common::LINGER_MS, "1000"),
                (common::MAX_SECS, "80"),
            ],
        ),
    );
    job.wait_for("3 ranks looping", |o| count(o, "LOOPING") == 3);
    let pid = records(&job.stdout(), "INFO")
        .iter()
        .find(|r| num(r, "rank") == 1)
        .map(|r| num(r, "pid"))
        .expect("rank 1's pid");
    // SAFETY: kill(2) with a pid this test's job printed; it only sends a signal.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "SIGKILL rank 1 (pid {pid})");
    let f = job.finish();
    assert_eq!(
        f.code(),
        Some(128 + 9),
        "ferrorun exits 128 + SIGKILL: {f:?}"
    );
    assert!(
        f.stderr.contains(&format!(
            "ferrorun: rank 1 (local rank 1, pid {pid}) was killed by signal 9 (SIGKILL)"
        )),
        "ferrorun names the rank that died and how: {f:?}"
    );
    for survivor in [0, 2] {
        survivors_name_the_dead_rank(&f.stderr, survivor, true);
    }
    assert!(!f.stderr.contains("panicked"), "{f:?}");
}

#[test]
fn a_rank_killed_mid_transfer_without_a_launcher() {
    // Started by hand: nobody but the transport can tell the survivors that rank 1 died.
    let port = free_port();
    let env = [(common::MAX_SECS, "80")];
    let mut ranks: Vec<Proc> = (0..3)
        .map(|r| Proc::start(&format!("rank {r}"), by_hand("loop", r, 3, port, &env)))
        .collect();
    for p in ranks.iter_mut() {
        p.wait_for("looping", |o| count(o, "LOOPING") == 1);
    }
    let victim = ranks.remove(1);
    // SAFETY: kill(2) on a child of this test that has not been reaped yet.
    let rc = unsafe { libc::kill(victim.pid() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0);
    let dead = victim.finish();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&dead.status),
        Some(9),
        "{dead:?}"
    );
    for (p, survivor) in ranks.into_iter().zip([0, 2]) {
        let f = p.finish();
        assert_eq!(f.code(), Some(1), "the survivor fails: {f:?}");
        survivors_name_the_dead_rank(&f.stderr, survivor, false);
        assert!(!f.stderr.contains("panicked"), "{f:?}");
    }
}

/// Variables set, the error variant expected, and what its message must say.
type Case = (
    &'static [(&'static str, &'static str)],
    &'static str,
    &'static [&'static str],
);

#[test]
fn wrong_arguments_in_the_environment_fail_at_once_naming_them() {
    // Every process is rank 0 of a world of 2 whose rank 1 never comes, with a rendezvous
    // timeout far above the test's limit: a setting checked only after the rendezvous would
    // hang the process (and fail the test) instead of failing at once.
    let cases: &[Case] = &[
        (
            &[("RANK", "2")],
            "InvalidArgument",
            &[
                "`rank`",
                "rank 2 (from RANK) is not below the world size 2 (from WORLD_SIZE)",
            ],
        ),
        (
            &[("FERROCOMM_INIT_METHOD", "http://127.0.0.1:5003")],
            "Config",
            &[
                "FERROCOMM_INIT_METHOD",
                "http://127.0.0.1:5003",
                "tcp://HOST:PORT",
            ],
        ),
        (
            &[("FERROCOMM_INIT_METHOD", "tcp://127.0.0.1")],
            "Config",
            &["FERROCOMM_INIT_METHOD", "tcp://HOST:PORT"],
        ),
        (
            &[("FERROCOMM_INIT_METHOD", "file://relative/path")],
            "Config",
            &["FERROCOMM_INIT_METHOD", "file:///ABSOLUTE/PATH"],
        ),
        (
            &[("MASTER_PORT", "99999")],
            "Config",
            &["MASTER_PORT", "99999", "1 to 65535"],
        ),
        (
            &[("WORLD_SIZE", "0")],
            "Config",
            &["WORLD_SIZE", "at least 1"],
        ),
        (&[("RANK", "one")], "Config", &["RANK", "\"one\""]),
        (
            &[("FERROCOMM_TIMEOUT", "soon")],
            "Config",
            &["FERROCOMM_TIMEOUT", "seconds"],
        ),
        (
            &[("FERROCOMM_LOG_INTERVAL", "often")],
            "Config",
            &["FERROCOMM_LOG_INTERVAL"],
        ),
        (
            &[("FERROCOMM_TRANSPORT", "pigeon")],
            "Config",
            &["FERROCOMM_TRANSPORT", "tcp"],
        ),
        (
            &[("FERROCOMM_SOCKET_IFADDR", "eth0")],
            "Config",
            &["FERROCOMM_SOCKET_IFADDR", "IP address"],
        ),
        (
            // A well-formed address that is not this host's.
            &[("FERROCOMM_SOCKET_IFADDR", "198.18.255.254")],
            "Config",
            &[
                "FERROCOMM_SOCKET_IFADDR",
                "198.18.255.254",
                "address of this host",
            ],
        ),
        (
            &[("FERROCOMM_TCP_EAGER_LIMIT", "lots")],
            "Config",
            &["FERROCOMM_TCP_EAGER_LIMIT", "byte count"],
        ),
        (
            &[("FERROCOMM_SPIN_US", "-5")],
            "Config",
            &["FERROCOMM_SPIN_US", "microseconds"],
        ),
        (
            &[("FERROCOMM_OP_TIMEOUT", "never")],
            "Config",
            &["FERROCOMM_OP_TIMEOUT", "seconds"],
        ),
    ];
    let procs: Vec<Proc> = cases
        .iter()
        .map(|(env, _, _)| {
            let mut cmd = by_hand("init", 0, 2, free_port(), &[("FERROCOMM_TIMEOUT", "600")]);
            cmd.envs(env.iter().copied());
            Proc::start(&format!("init with {env:?}"), cmd)
        })
        .collect();
    for (p, (_, variant, words)) in procs.into_iter().zip(cases) {
        let f = p.finish();
        assert_eq!(f.code(), Some(1), "{f:?}");
        let err = f
            .stderr
            .lines()
            .find(|l| l.contains("RANKERR"))
            .unwrap_or_else(|| panic!("no error line: {f:?}"));
        assert!(
            err.contains(&format!("[{variant} {{")),
            "a {variant} error: {f:?}"
        );
        for w in *words {
            assert!(err.contains(w), "the error says {w:?}: {f:?}");
        }
        assert!(!f.stderr.contains("panicked"), "{f:?}");
    }
}

#[test]
fn a_rank_killed_during_init_is_named_by_the_others_within_seconds() {
    // Started by hand, world of 3: rank 2 never comes, so ranks 0 and 1 wait in the
    // rendezvous with a timeout far beyond the test's limit. SIGKILL rank 1 there: rank 0
    // must fail within seconds naming it (it used to wait for the whole timeout).
    let port = free_port();
    let env = [
        ("FERROCOMM_TIMEOUT", "600"),
        ("FERROCOMM_LOG_INTERVAL", "0.2"),
    ];
    let r0 = Proc::start("rank 0", by_hand("init", 0, 3, port, &env));
    let mut r1 = Proc::start("rank 1", by_hand("init", 1, 3, port, &env));
    let deadline = std::time::Instant::now() + common::LIMIT;
    while !r1.stderr().contains("still waiting") {
        assert!(std::time::Instant::now() < deadline, "rank 1 never waited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = r1.pid();
    r1.kill();
    let f = r0.finish();
    assert_eq!(f.code(), Some(1), "{f:?}");
    let err = f
        .stderr
        .lines()
        .find(|l| l.contains("RANKERR"))
        .unwrap_or_else(|| panic!("no error line: {f:?}"));
    assert!(
        err.contains("rank 0: lost peer rank 1 during init") && err.contains("PeerLost"),
        "{f:?}"
    );
    assert!(
        err.contains(&format!("rank 1 (pid {pid} on ")),
        "names its pid: {f:?}"
    );
    assert!(!f.stderr.contains("panicked"), "{f:?}");
}

#[test]
fn a_second_process_started_as_rank_0_is_told_rank_0_is_claimed() {
    let port = free_port();
    let env = [("FERROCOMM_TIMEOUT", "600")];
    let mut first = Proc::start("rank 0", by_hand("init", 0, 2, port, &env));
    let store =
        ferrocomm::rendezvous::TcpStore::connect(&format!("127.0.0.1:{port}"), common::LIMIT)
            .expect("rank 0's store");
    ferrocomm::rendezvous::Store::wait(&store, &["job/default/claim/0"], common::LIMIT)
        .expect("rank 0 claims its rank");
    // A user starts rank 0 twice: the second is told so (not "port in use"), at once.
    let f = Proc::start("rank 0 again", by_hand("init", 0, 2, port, &env)).finish();
    assert_eq!(f.code(), Some(1), "{f:?}");
    let err = f
        .stderr
        .lines()
        .find(|l| l.contains("RANKERR"))
        .unwrap_or_else(|| panic!("no error line: {f:?}"));
    for w in [
        "[Config {",
        "rank 0 is claimed twice",
        &format!("pid {} on ", first.pid()),
        &format!("127.0.0.1:{port}"),
    ] {
        assert!(err.contains(w), "says {w:?}: {f:?}");
    }
    assert!(!err.contains("in use"), "{f:?}");
    assert!(first.running(), "the first rank 0 is not disturbed");
    first.kill();
}
