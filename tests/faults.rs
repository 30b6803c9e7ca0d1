//! Faults: ranks that die or stop in the middle of collectives, and aborts from another
//! thread. Every test is bounded (a hang fails instead of blocking the suite).
//!
//! - `killed_ranks_are_named_by_every_survivor_and_by_ferrorun`: 20 trials per transport of
//!   a 4-rank `allreduce-loop` (all_reduce and all_to_all of changing sizes) in which
//!   one rank, chosen at random, is SIGKILLed at a random moment. Every survivor fails with
//!   `PeerLost` within 10 s naming the dead rank itself (never a survivor that gave up
//!   first: its notice arrives before its loss), every `ferrorun` exits 137 naming that
//!   rank and "signal 9 (SIGKILL)" in its headline although survivors exit at once after
//!   failing (often before the killed rank is seen to end), and no temporary file (a
//!   private `TMPDIR`, where ferrorun keeps the ranks' failure reports) or
//!   shared-memory segment (`/dev/shm`, ferrocomm's names) is left. The transports are the
//!   data in [`TRANSPORTS`]; one that this build does not accept (`FERROCOMM_TRANSPORT`
//!   refused as a configuration error) is skipped with a printed line.
//! - `a_stopped_rank_is_named_by_the_timeout_of_the_others`: SIGSTOP one of 3 ranks in an
//!   all_reduce loop with `FERROCOMM_OP_TIMEOUT=5`: the others fail with `Timeout` naming
//!   the stopped rank and the operation (`all_reduce` or `all_to_all`) and call number,
//!   after about the timeout (bounded above, never
//!   before it).
//! - `a_stopped_rank_is_named_at_the_end_of_the_chain_of_waiting_ranks`: the same with 4
//!   and 5 ranks, where most survivors wait for the stopped rank only through others:
//!   each follows the others' timeout notices (a waiting rank that is blamed, in whatever
//!   call, answers at once whom it waits for); the names lead to the stopped rank (under
//!   heavy load a survivor may still name a rank that was waiting: see the module
//!   documentation of `collective::exec`; how many named it directly is printed).
//! - `abort_from_another_thread_releases_every_waiter`: threads blocked in recv and
//!   all_reduce on local and TCP worlds all return `Aborted` when another thread aborts.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{Proc, by_hand, count, ferrorun, free_port, num, records, unix_ms};
use ferrocomm::{Communicator, Error, ReduceOp};

#[test]
fn rank_entry_point() {
    common::rank_main()
}

/// One way of connecting the ranks of a kill trial.
struct TransportCase {
    /// Printed in messages.
    name: &'static str,
    /// `FERROCOMM_TRANSPORT` for every rank.
    transport: &'static str,
    /// `(ranks, FERROCOMM_HOST_ID)` of each simulated node (one `ferrorun` each); an empty
    /// host id keeps the real one.
    nodes: &'static [(usize, &'static str)],
}

/// The transports every fault trial runs over.
const TRANSPORTS: &[TransportCase] = &[
    TransportCase {
        name: "tcp",
        transport: "tcp",
        nodes: &[(4, "")],
    },
    TransportCase {
        name: "shm",
        transport: "shm",
        nodes: &[(4, "")],
    },
    TransportCase {
        // Two simulated nodes on this host: shm within each, TCP between them.
        name: "mixed shm+tcp (2 nodes x 2 ranks)",
        transport: "auto",
        nodes: &[(2, "fci-node-a"), (2, "fci-node-b")],
    },
];

/// Kill trials per transport.
const TRIALS: usize = 20;
/// Trials run at once (each 4 ranks and its launchers; 2 cores).
const BATCH: usize = 2;
/// Names under /dev/shm that belong to ferrocomm (`transport::shm::segment_prefix`).
const SHM_PREFIXES: &[&str] = &["ferrocomm-"];

/// Entries of /dev/shm with ferrocomm's names.
fn shm_segments() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| SHM_PREFIXES.iter().any(|p| n.starts_with(p)))
                .collect()
        })
        .unwrap_or_default()
}

/// A small deterministic generator (the seed is printed, so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = common::mix(self.0);
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Starts the launchers of one trial: one `ferrorun` per node of `case`.
fn launch(case: &TransportCase, tmp: &Path, env: &[(&str, &str)]) -> Vec<Proc> {
    let port = free_port().to_string();
    let nnodes = case.nodes.len().to_string();
    let tmp = tmp.to_str().expect("utf-8 temporary directory");
    case.nodes
        .iter()
        .enumerate()
        .map(|(i, &(nproc, host))| {
            let (node, nproc) = (i.to_string(), nproc.to_string());
            let mut env: Vec<(&str, &str)> = env.to_vec();
            env.push(("FERROCOMM_TRANSPORT", case.transport));
            env.push(("TMPDIR", tmp));
            if !host.is_empty() {
                env.push(("FERROCOMM_HOST_ID", host));
            }
            Proc::start(
                &format!("{} node {i}", case.name),
                ferrorun(
                    &[
                        "--nnodes",
                        &nnodes,
                        "--node-rank",
                        &node,
                        "--nproc-per-node",
                        &nproc,
                        "--master-addr",
                        "127.0.0.1",
                        "--master-port",
                        &port,
                        "--tag-output",
                        "--grace-period",
                        "60",
                    ],
                    "allreduce-loop",
                    &env,
                ),
            )
        })
        .collect()
}

/// One kill trial; panics (with everything the processes printed) when a check fails.
fn kill_trial(case: &TransportCase, trial: usize, seed: u64) {
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().expect("temporary directory");
    let shm_before = shm_segments();
    let ranks: usize = case.nodes.iter().map(|n| n.0).sum();
    // Survivors ignore ferrorun's SIGTERM, so that each prints its own report of the
    // loss, and exit as soon as they have failed: often before the launcher sees the
    // killed rank end, which ferrorun must still name (it follows the survivors' failure
    // reports to the root cause).
    let mut nodes = launch(
        case,
        tmp.path(),
        &[
            (common::IGNORE_SIGTERM, "1"),
            (common::LINGER_MS, "0"),
            (common::MAX_SECS, "60"),
            // Far above what noticing a death takes; a rank that misses the death says
            // what it was waiting for instead of hanging until ferrorun's SIGKILL.
            ("FERROCOMM_OP_TIMEOUT", "20"),
        ],
    );
    for (i, node) in nodes.iter_mut().enumerate() {
        let want = case.nodes[i].0;
        node.wait_for("its ranks looping", |o| count(o, "LOOPING") == want);
    }
    let infos: Vec<_> = nodes
        .iter()
        .flat_map(|n| records(&n.stdout(), "INFO"))
        .collect();
    let mut trial_pids: Vec<usize> = infos.iter().map(|r| num(r, "pid")).collect();
    trial_pids.extend(nodes.iter().map(|n| n.pid() as usize));
    let victim = rng.below(ranks as u64) as usize;
    let pid = infos
        .iter()
        .find(|r| num(r, "rank") == victim)
        .map(|r| num(r, "pid"))
        .expect("the victim's pid");
    let local = infos
        .iter()
        .find(|r| num(r, "rank") == victim)
        .map(|r| num(r, "local_rank"))
        .expect("the victim's local rank");
    // A random moment of the loop: 0 to 300 ms after every rank has looped a few times.
    std::thread::sleep(Duration::from_millis(rng.below(300)));
    let killed_at = unix_ms();
    // SAFETY: kill(2) with a pid the trial's rank printed; it only sends a signal.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "SIGKILL rank {victim} (pid {pid})");
    let finished = common::finish_all(nodes);
    let what = format!(
        "{} trial {trial} (seed {seed:#x}): rank {victim} (pid {pid}) killed",
        case.name
    );
    let all_err: String = finished.iter().map(|f| f.stderr.as_str()).collect();
    for f in &finished {
        assert_eq!(f.code(), Some(128 + 9), "{what}: ferrorun exits 137: {f:?}");
        assert!(
            f.stderr.contains(&format!(
                "rank {victim} (local rank {local}, pid {pid}) was killed by signal 9 (SIGKILL)"
            )),
            "{what}: every ferrorun names the rank that died first and how: {f:?}"
        );
        assert!(!f.stderr.contains("panicked"), "{what}: {f:?}");
    }
    // Whom each survivor names as lost (its first PeerLost), and when it gave up.
    let mut named = std::collections::BTreeMap::new();
    let mut direct = 0;
    for survivor in (0..ranks).filter(|&r| r != victim) {
        let prefix = format!("[rank {survivor}] ");
        let lines: Vec<&str> = all_err.lines().filter(|l| l.starts_with(&prefix)).collect();
        let lost = lines
            .iter()
            .filter(|l| l.contains("[PeerLost {"))
            .find_map(|l| l.split_once(&format!("rank {survivor}: lost peer rank ")))
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<usize>().ok())
            .unwrap_or_else(|| {
                panic!("{what}: rank {survivor} reports no lost peer (PeerLost):\n{all_err}")
            });
        direct += usize::from(lost == victim);
        if lost != victim {
            let line = lines
                .iter()
                .find(|l| l.contains("[PeerLost {"))
                .unwrap_or(&"");
            eprintln!("{what}: rank {survivor} names rank {lost}: {line}");
        }
        named.insert(survivor, lost);
        let failed_at = lines
            .iter()
            .find_map(|l| l.split_once("FAILTIME ").map(|(_, r)| r))
            .and_then(|r| records(&format!("FAILTIME {r}"), "FAILTIME").pop())
            .map(|r| num(&r, "unix_ms") as u64)
            .unwrap_or_else(|| panic!("{what}: rank {survivor} printed no FAILTIME:\n{all_err}"));
        let took = failed_at.saturating_sub(killed_at);
        assert!(
            took < 10_000,
            "{what}: rank {survivor} noticed after {took} ms (limit 10 s):\n{all_err}"
        );
    }
    // Every survivor names the dead rank itself, never another survivor (one that gave up
    // before it sent its notice first, which the transports deliver before its loss).
    assert_eq!(
        direct,
        named.len(),
        "{what}: every survivor names the dead rank {victim}: {named:?}\n{all_err}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read the temporary directory")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{what}: temporary files left: {left:?}");
    // Other jobs on this machine (other test binaries) may create segments meanwhile:
    // a segment named after a process (a decimal field of its name) that is not one of
    // this trial's belongs to them; any other new segment counts.
    let new_shm: Vec<_> = shm_segments()
        .difference(&shm_before)
        .filter(|name| {
            let pids: Vec<usize> = name.split('-').filter_map(|p| p.parse().ok()).collect();
            pids.is_empty() || pids.iter().any(|p| trial_pids.contains(p))
        })
        .cloned()
        .collect();
    assert!(
        new_shm.is_empty(),
        "{what}: shared-memory segments left in /dev/shm: {new_shm:?}"
    );
}

#[test]
fn killed_ranks_are_named_by_every_survivor_and_by_ferrorun() {
    let base = std::env::var("FERROCOMM_FAULT_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| unix_ms() ^ u64::from(std::process::id()) << 32);
    eprintln!("kill trials: seed {base:#x} (FERROCOMM_FAULT_SEED={base:x} replays it)");
    let mut ran = 0;
    for case in TRANSPORTS {
        let started = Instant::now();
        for first in (0..TRIALS).step_by(BATCH) {
            std::thread::scope(|s| {
                for trial in first..(first + BATCH).min(TRIALS) {
                    let seed = common::mix(base ^ trial as u64 ^ (ran as u64) << 40);
                    s.spawn(move || kill_trial(case, trial, seed));
                }
            });
        }
        eprintln!(
            "kill trials over {}: {TRIALS} passed in {:.1?}",
            case.name,
            started.elapsed()
        );
        ran += 1;
    }
    assert!(ran > 0, "tcp is always available");
}

/// SIGSTOPs rank `stopped` of `n` ranks (started by hand) in an all_reduce loop with
/// `FERROCOMM_OP_TIMEOUT=5`: every other rank fails with `Timeout` naming a stuck rank
/// (never itself) and the operation and call number, after about the timeout (bounded
/// above, never before it), and following the names from any survivor leads to the
/// stopped rank; `strict`: every survivor names the stopped rank itself.
fn stopped_rank_trial(n: usize, stopped: usize, strict: bool) {
    let port = free_port();
    let env = [
        (common::MAX_SECS, "80"),
        ("FERROCOMM_OP_TIMEOUT", "5"),
        (common::REPORT_EVERY, "1"),
    ];
    let mut ranks: Vec<Proc> = (0..n)
        .map(|r| {
            Proc::start(
                &format!("rank {r}"),
                by_hand("allreduce-loop", r, n, port, &env),
            )
        })
        .collect();
    for p in ranks.iter_mut() {
        p.wait_for("looping", |o| count(o, "LOOPING") == 1);
    }
    let stuck = ranks.remove(stopped);
    let pid = stuck.pid() as libc::pid_t;
    // SAFETY: kill(2) on a child of this test that has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped_at = Instant::now();
    // Every survivor ends before any check, so that a failure shows every view.
    let survivors: Vec<usize> = (0..n).filter(|&r| r != stopped).collect();
    let finished: Vec<_> = ranks
        .into_iter()
        .zip(survivors)
        .map(|(p, survivor)| {
            let f = p.finish();
            (survivor, f, stopped_at.elapsed())
        })
        .collect();
    let all: String = finished.iter().map(|(_, f, _)| format!("{f:?}")).collect();
    let what = format!("{n} ranks, rank {stopped} stopped");
    let mut named = std::collections::BTreeMap::new();
    for (survivor, f, after) in &finished {
        assert_eq!(f.code(), Some(1), "{what}: rank {survivor} fails: {all}");
        let err = f
            .stderr
            .lines()
            .find(|l| l.contains("RANKERR"))
            .unwrap_or_else(|| panic!("{what}: rank {survivor} reports no error: {all}"));
        eprintln!("{what}: rank {survivor} after {after:.1?}: {err}");
        assert!(
            err.contains("[Timeout {"),
            "{what}: rank {survivor}: a timeout: {all}"
        );
        // The loop runs all_reduce and all_to_all: the stop may catch either.
        assert!(
            ["in all_reduce(", "in all_to_all("]
                .iter()
                .any(|op| err.contains(op))
                && err.contains(" (call #"),
            "{what}: rank {survivor} names the operation and the call: {all}"
        );
        let stuck_named = err
            .split_once(" is stuck")
            .and_then(|(head, _)| head.rsplit_once("rank "))
            .and_then(|(_, k)| k.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("{what}: rank {survivor} names no stuck rank: {all}"));
        assert_ne!(
            stuck_named, *survivor,
            "{what}: a rank never names itself: {all}"
        );
        assert!(
            !strict || stuck_named == stopped,
            "{what}: rank {survivor} names the stopped rank {stopped}: {all}"
        );
        named.insert(*survivor, stuck_named);
        // Never before the timeout (measured from the stop: the last progress was before
        // it); generously bounded above (settling, a loaded machine).
        assert!(
            *after >= Duration::from_secs(5) && *after < Duration::from_secs(30),
            "{what}: rank {survivor} gave up after {after:?}, timeout 5 s: {all}"
        );
    }
    // Every survivor names the stopped rank, or a rank that was waiting (alive, but not
    // yet timed out itself when this one settled: see `exec`'s "Naming the stuck rank")
    // whose own error leads on to the stopped rank: the cause can always be followed.
    let direct = named.values().filter(|&&k| k == stopped).count();
    for &s in named.keys() {
        let mut at = s;
        for _ in 0..n {
            if at == stopped {
                break;
            }
            at = *named
                .get(&at)
                .unwrap_or_else(|| panic!("{what}: rank {s}'s chain leaves the job: {all}"));
        }
        assert_eq!(
            at, stopped,
            "{what}: rank {s}'s report does not lead to the stopped rank: {named:?}\n{all}"
        );
    }
    eprintln!(
        "{what}: {direct} of {} survivors name it directly ({named:?})",
        named.len()
    );
    // SAFETY: as above; the stopped rank is resumed and then killed.
    unsafe {
        libc::kill(pid, libc::SIGCONT);
        libc::kill(pid, libc::SIGKILL);
    }
    let f = stuck.finish();
    assert!(
        f.code() == Some(1) || std::os::unix::process::ExitStatusExt::signal(&f.status) == Some(9),
        "{f:?}"
    );
}

#[test]
fn a_stopped_rank_is_named_by_the_timeout_of_the_others() {
    stopped_rank_trial(3, 1, true);
}

#[test]
fn a_stopped_rank_is_named_at_the_end_of_the_chain_of_waiting_ranks() {
    // With 4 and 5 ranks, most survivors do not wait for the stopped rank directly: each
    // must follow the others' timeout notices to it, never naming a rank that waits.
    stopped_rank_trial(4, 2, false);
    stopped_rank_trial(5, 3, false);
}

/// Blocks `waiters` threads of rank 0 of `world` (recv from a rank that never sends,
/// all_reduce that rank 1 never joins), aborts from another thread, and checks that every
/// waiter returns `Aborted` carrying the reason, well within the bound.
fn abort_releases(name: &str, mut world: Vec<Communicator>) {
    let rank1 = world.pop().expect("rank 1");
    let rank0 = world.pop().expect("rank 0");
    let handle = rank0.abort_handle();
    let comms: Vec<Communicator> = (0..6).map(|_| rank0.dup()).collect();
    let started = Arc::new(Barrier::new(comms.len() + 1));
    let threads: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let started = Arc::clone(&started);
            std::thread::spawn(move || {
                started.wait();
                let t = Instant::now();
                let r = if i % 2 == 0 {
                    let mut buf = [0u32; 16];
                    c.recv(&mut buf, 1, i as u32).map(drop)
                } else {
                    let mut buf = vec![1.0f32; 1 << (i * 3)];
                    c.all_reduce(&mut buf, ReduceOp::Sum)
                };
                (i, r, t.elapsed())
            })
        })
        .collect();
    started.wait();
    // Let every thread block (there is no "blocked" signal; if one is late it still must
    // return Aborted, since the abort is sticky).
    std::thread::sleep(Duration::from_millis(300));
    let aborted_at = Instant::now();
    handle.abort("test abort from another thread");
    for t in threads {
        let (i, r, _) = t.join().expect("waiter thread");
        match r {
            Err(Error::Aborted(why)) => {
                assert!(why.contains("test abort"), "{name} waiter {i}: {why}")
            }
            other => panic!("{name}: waiter {i} returned {other:?}, not Aborted"),
        }
    }
    let all_back = aborted_at.elapsed();
    assert!(
        all_back < Duration::from_secs(5),
        "{name}: waiters came back {all_back:?} after the abort"
    );
    // Sticky: later calls fail the same way.
    let mut buf = [0u8; 1];
    assert!(matches!(
        rank0.recv(&mut buf, 1, 0u32),
        Err(Error::Aborted(_))
    ));
    drop(rank1);
}

#[test]
fn abort_from_another_thread_releases_every_waiter() {
    abort_releases("local", Communicator::local_world(2));
    abort_releases(
        "tcp",
        Communicator::tcp_loopback_world(2).expect("tcp loopback world"),
    );
}
