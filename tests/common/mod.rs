//! Shared by the multi-process test files: starting processes under a time limit (killed
//! when the test ends, passes or fails), collecting their output while they run, and the
//! rank programs.
//!
//! # Rank programs
//!
//! The ranks of these tests are the test executable itself, started again (by `ferrorun`,
//! by hand, or in a network namespace) with `--exact rank_entry_point`, and with
//! [`ROLE`] in the environment saying what to do. Every test file that uses them has
//!
//! ```ignore
//! #[test]
//! fn rank_entry_point() {
//!     common::rank_main()
//! }
//! ```
//!
//! which does nothing in a normal test run (no [`ROLE`]) and, in a rank, runs the role and
//! exits the process with its status (so libtest prints no summary). This needs no example
//! binary (cargo builds examples for `cargo test` only in some modes) and always runs the
//! code of this very build. The roles print `KEY k=v ...` lines that the tests parse:
//!
//! - `ring`: [`ferrocomm::init`], prints `INFO`, passes a token once around the ring (every
//!   rank checks the value it receives), shifts 1 MiB around the ring (rendezvous path,
//!   contents checked), passes a barrier, prints `RING ok`.
//! - `loop`: init, `INFO`, then exchanges messages (1 MiB by default) with both ring
//!   neighbours over and over, checking every word, printing `LOOPING` after a few rounds.
//!   Rank 0 ends the loop once the file `FERROCOMM_ITEST_STOP_FILE` exists (the decision
//!   travels with the messages, so every rank does the same number of rounds), prints
//!   `LOOPDONE`, sends a word to rank + far and receives one from rank - far
//!   (`FERROCOMM_ITEST_FAR`, default 2), passes a barrier
//!   and prints `FINISHED`. Gives up after `FERROCOMM_ITEST_MAX_SECS` (default 80).
//! - `init`: only `ferrocomm::init()` (for argument and timeout errors).
//! - `allreduce-loop`: init, `INFO`, then iterations of: an `all_reduce` (sum of `u64`) of a
//!   size that changes every iteration (8 B to 1 MiB, the same on every rank: derived from
//!   the iteration number), result checked word by word, and every other iteration an
//!   `all_to_all` (every pair of ranks exchanges a block; sizes vary too, contents
//!   checked). Only collectives: a rank that gives up one tells the others why (notices),
//!   so every survivor of a killed rank can name it.
//!   Prints `LOOPING` after a few iterations and `ITER rank=R i=I` every
//!   `FERROCOMM_ITEST_REPORT_EVERY` iterations (default: never). Ends after
//!   `FERROCOMM_ITEST_ITERS` iterations (default: never) with a barrier and `FINISHED`, or
//!   gives up after `FERROCOMM_ITEST_MAX_SECS` (default 80).
//!
//! A failing role prints `RANKERR rank=R: <error> [<Debug of the error>]` on stderr, one
//! line per error, `FAILTIME rank=R unix_ms=T` (when it gave up, wall clock, for tests that
//! bound how long noticing a failure took) and `MEM rank=R hwm_kib=N` (its peak resident
//! memory), waits
//! `FERROCOMM_ITEST_LINGER_MS` (default 0) and exits 1.
#![allow(dead_code)] // every test file uses a different part of this module

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferrocomm::rendezvous::{PeerInfo, Store, TcpStore};
use ferrocomm::{Communicator, Error};

pub mod coll;

/// The launcher built with these tests.
pub const FERRORUN: &str = env!("CARGO_BIN_EXE_ferrorun");
/// Upper bound for any process of these tests: far above what any needs; reaching it fails
/// the test (and kills the process) instead of blocking the suite.
pub const LIMIT: Duration = Duration::from_secs(90);
/// Selects the rank program (see the module docs).
pub const ROLE: &str = "FERROCOMM_ITEST_ROLE";
/// `loop`: rank 0 ends the loop once this file exists.
pub const STOP_FILE: &str = "FERROCOMM_ITEST_STOP_FILE";
/// `loop`: bytes per message (default 1 MiB).
pub const MSG_BYTES: &str = "FERROCOMM_ITEST_MSG_BYTES";
/// `loop`: seconds after which the loop gives up (default 80).
pub const MAX_SECS: &str = "FERROCOMM_ITEST_MAX_SECS";
/// `loop`: the distance of the pairs used once after the loop (default 2).
pub const FAR: &str = "FERROCOMM_ITEST_FAR";
/// Set to `1`: the rank ignores SIGTERM (see the killed-rank test under ferrorun).
pub const IGNORE_SIGTERM: &str = "FERROCOMM_ITEST_IGNORE_SIGTERM";
/// Milliseconds a failing rank waits after printing its errors before it exits.
pub const LINGER_MS: &str = "FERROCOMM_ITEST_LINGER_MS";
/// `allreduce-loop`: iterations to run before finishing (default: until stopped).
pub const ITERS: &str = "FERROCOMM_ITEST_ITERS";
/// `allreduce-loop`: print `ITER` every this many iterations (default: never).
pub const REPORT_EVERY: &str = "FERROCOMM_ITEST_REPORT_EVERY";

/// True when tests that cannot run here must fail instead of skipping (CI).
pub fn require_all() -> bool {
    std::env::var("FERROCOMM_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// A running process whose output is collected while it runs; killed when dropped.
pub struct Proc {
    name: String,
    child: Child,
    started: Instant,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

/// What a finished process left.
pub struct Finished {
    /// What the test called it.
    pub name: String,
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// From start to exit.
    pub elapsed: Duration,
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "\n=== {}: {} after {:.1?}\n--- stdout:\n{}\n--- stderr:\n{}\n===",
            self.name, self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

impl Finished {
    /// The exit code, `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Every `KEY k=v ...` record with this key on stdout (see [`records`]).
    pub fn records(&self, key: &str) -> Vec<BTreeMap<String, String>> {
        records(&self.stdout, key)
    }
}

fn collect(mut r: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(&mut r);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let mut s = into.lock().unwrap_or_else(|e| e.into_inner());
                    s.push_str(&String::from_utf8_lossy(&line));
                }
            }
        }
    })
}

impl Proc {
    /// Starts `cmd` with stdin from `/dev/null` and stdout and stderr collected.
    pub fn start(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(collect(o, Arc::clone(&out)));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(collect(e, Arc::clone(&err)));
        }
        Proc {
            name: name.to_string(),
            child,
            started: Instant::now(),
            out,
            err,
            readers,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has not exited yet.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILLs it and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stdout so far.
    pub fn stdout(&self) -> String {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        self.err.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until `cond(stdout)` holds. Fails the test when the process exits first or
    /// after [`LIMIT`].
    pub fn wait_for(&mut self, what: &str, cond: impl Fn(&str) -> bool) {
        loop {
            if cond(&self.stdout()) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers catch the last lines before judging.
                std::thread::sleep(Duration::from_millis(100));
                if cond(&self.stdout()) {
                    return;
                }
                panic!(
                    "{}: exited ({status}) before {what}\n--- stdout:\n{}\n--- stderr:\n{}",
                    self.name,
                    self.stdout(),
                    self.stderr()
                );
            }
            if self.started.elapsed() > LIMIT {
                panic!(
                    "{}: no {what} within {LIMIT:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                    self.name,
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit; kills it and fails the test after [`LIMIT`].
    pub fn finish(self) -> Finished {
        self.finish_within(LIMIT)
    }

    /// Waits for the process to exit; kills it and fails the test after `limit`.
    pub fn finish_within(mut self, limit: Duration) -> Finished {
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => {}
                Err(e) => panic!("{}: waiting failed: {e}", self.name),
            }
            if self.started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                panic!(
                    "{}: still running after {limit:?} (hung; killed)\n--- stdout:\n{}\n--- stderr:\n{}",
                    self.name,
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished {
            name: self.name.clone(),
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            elapsed,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A test that failed before `finish` must not leave the process running (ferrorun's
        // ranks die with it: PR_SET_PDEATHSIG).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Finishes every process (in order), each within [`LIMIT`] of its own start.
pub fn finish_all(procs: Vec<Proc>) -> Vec<Finished> {
    procs.into_iter().map(Proc::finish).collect()
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

/// Removes every variable that could make a rank join something other than what the test
/// says (a developer's or CI's own `RANK`, `MASTER_PORT`, `FERROCOMM_*`, Slurm, Open MPI).
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    const NAMES: [&str; 8] = [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "GROUP_RANK",
    ];
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let foreign = ["FERROCOMM_", "SLURM_", "OMPI_", "TORCHELASTIC_"]
            .iter()
            .any(|p| k.starts_with(p))
            && k != "FERROCOMM_REQUIRE_ALL";
        if foreign || NAMES.contains(&k.as_str()) {
            cmd.env_remove(&k);
        }
    }
    cmd.env("FERROCOMM_LOG", "warn")
}

/// The arguments that run this test executable as a rank.
pub fn self_as_rank() -> Vec<String> {
    let exe = std::env::current_exe().expect("test executable path");
    vec![
        exe.to_string_lossy().into_owned(),
        "--exact".into(),
        "rank_entry_point".into(),
        "--nocapture".into(),
        "--test-threads".into(),
        "1".into(),
        "--quiet".into(),
    ]
}

/// `ferrorun ARGS -- <this executable as a rank>` with `role` and `env`.
pub fn ferrorun(args: &[&str], role: &str, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(FERRORUN);
    clean_env(&mut cmd);
    cmd.args(args)
        .arg("--")
        .args(self_as_rank())
        .env(ROLE, role);
    cmd.envs(env.iter().copied());
    cmd
}

/// One rank started by hand, as a user without a launcher would: `env://` with
/// `MASTER_ADDR=127.0.0.1`, `MASTER_PORT`, `RANK` and `WORLD_SIZE`; rank 0 hosts the store.
pub fn by_hand(role: &str, rank: usize, world: usize, port: u16, env: &[(&str, &str)]) -> Command {
    let args = self_as_rank();
    let mut cmd = Command::new(&args[0]);
    clean_env(&mut cmd);
    cmd.args(&args[1..])
        .env(ROLE, role)
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string());
    cmd.envs(env.iter().copied());
    cmd
}

/// A port that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct ports that were free a moment ago (all bound at once, then released).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local address").port())
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

/// Parses the `KEY k=v k=v ...` records of `text` (anywhere in a line, so libtest or
/// `--tag-output` prefixes do not matter; values have no spaces).
pub fn records(text: &str, key: &str) -> Vec<BTreeMap<String, String>> {
    let pat = format!("{key} ");
    text.lines()
        .filter_map(|l| l.split_once(&pat).map(|(_, rest)| rest))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Field `k` of record `r` as a number; fails the test when absent.
pub fn num(r: &BTreeMap<String, String>, k: &str) -> usize {
    r.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("record {r:?} has no number {k}"))
}

/// How many `KEY` records `text` has.
pub fn count(text: &str, key: &str) -> usize {
    records(text, key).len()
}

// ---------------------------------------------------------------------------------------
// Rank programs
// ---------------------------------------------------------------------------------------

/// The body of every test file's `rank_entry_point`: runs the role named by [`ROLE`] and
/// exits the process; returns at once when [`ROLE`] is not set (a normal test run).
pub fn rank_main() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    ferrocomm::init_logging();
    if std::env::var(IGNORE_SIGTERM).is_ok_and(|v| v == "1") {
        // SAFETY: SIG_IGN installs no handler code; nothing else in this process changes
        // SIGTERM's disposition.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }
    let rank = std::env::var("RANK").unwrap_or_else(|_| "?".into());
    let result = match role.as_str() {
        "ring" => ring(),
        "loop" => exchange_loop(),
        "init" => ferrocomm::init().map(drop).map_err(|e| vec![show(&e)]),
        "allreduce-loop" => allreduce_loop(),
        other => Err(vec![format!("unknown role {other:?}")]),
    };
    let code = match result {
        Ok(()) => 0,
        Err(errors) => {
            let at = unix_ms();
            for e in errors {
                eprintln!("RANKERR rank={rank}: {e}");
            }
            eprintln!("FAILTIME rank={rank} unix_ms={at}");
            eprintln!("MEM rank={rank} hwm_kib={}", peak_memory_kib());
            std::thread::sleep(Duration::from_millis(env_num(LINGER_MS, 0)));
            1
        }
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

/// Milliseconds since the Unix epoch (wall clock: comparable between processes).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An error with its variant (the Debug form), for the tests to check both.
fn show(e: &Error) -> String {
    format!("{e} [{e:?}]")
}

fn fail(e: Error) -> Vec<String> {
    vec![show(&e)]
}

/// Peak resident memory of this process (VmHWM), in KiB; 0 if unreadable.
pub fn peak_memory_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// This rank's TCP address as published in the job's store (the rendezvous' peer table).
fn published_tcp(rank: usize) -> String {
    let (Ok(host), Ok(port)) = (std::env::var("MASTER_ADDR"), std::env::var("MASTER_PORT")) else {
        return "?".into();
    };
    let job = std::env::var("FERROCOMM_JOB_ID").unwrap_or_else(|_| "default".into());
    let read = || -> Result<String, String> {
        let store = TcpStore::connect_secure(
            &format!("{host}:{port}"),
            Duration::from_secs(20),
            Duration::from_secs(10),
            ferrocomm::auth::Secret::from_env(),
        )
        .map_err(|e| e.to_string())?;
        let raw = store
            .get(&format!("job/{job}/peers"), Duration::from_secs(20))
            .map_err(|e| e.to_string())?;
        let peers: Vec<PeerInfo> = serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
        peers
            .get(rank)
            .and_then(|p| p.addrs.get("tcp").cloned())
            .ok_or_else(|| "no tcp address".into())
    };
    read().unwrap_or_else(|e| format!("unreadable({})", e.replace(' ', "_")))
}

fn print_info(comm: &Communicator) {
    println!(
        "INFO rank={} size={} local_rank={} local_size={} node={} host={} tcp={} pid={} \
         env_node_rank={} job={} spin_us={}",
        comm.rank(),
        comm.size(),
        comm.local_rank(),
        comm.local_size(),
        comm.node_index(),
        comm.hostname(),
        published_tcp(comm.rank()),
        std::process::id(),
        std::env::var("NODE_RANK").unwrap_or_else(|_| "-".into()),
        std::env::var("FERROCOMM_JOB_ID").unwrap_or_else(|_| "default".into()),
        comm.config().spin.as_micros(),
    );
}

/// The word `j` of the message `sender` sends in round `round`.
fn pattern(sender: usize, round: u64, j: usize) -> u64 {
    ((sender as u64) << 56) ^ (round << 32) ^ (j as u64).wrapping_mul(0x9E37_79B9)
}

fn ring() -> Result<(), Vec<String>> {
    let comm = ferrocomm::init().map_err(fail)?;
    print_info(&comm);
    let (me, n) = (comm.rank(), comm.size());
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    // The token starts at 1000 on rank 0; rank r adds r; everyone checks what it gets.
    let mut token = [1000u64];
    if n > 1 {
        // What rank r >= 1 receives: 1000 + 1 + 2 + ... + (r - 1).
        let before = |r: usize| 1000 + (r as u64) * (r as u64 - 1) / 2;
        if me == 0 {
            comm.send(&token, next, 3).map_err(fail)?;
            comm.recv(&mut token, prev, 3u32).map_err(fail)?;
        } else {
            comm.recv(&mut token, prev, 3u32).map_err(fail)?;
            if token[0] != before(me) {
                return Err(vec![format!(
                    "rank {me} got the token as {} from rank {prev}, expected {}",
                    token[0],
                    before(me)
                )]);
            }
            token[0] += me as u64;
            comm.send(&token, next, 3).map_err(fail)?;
        }
        let want = 1000 + (n as u64) * (n as u64 - 1) / 2;
        if me == 0 && token[0] != want {
            return Err(vec![format!(
                "the token came back as {}, expected {want}",
                token[0]
            )]);
        }
    }
    // 1 MiB shifted once around the ring: the rendezvous path, contents checked.
    let words = 128 * 1024;
    let out: Vec<u64> = (0..words).map(|j| pattern(me, 7, j)).collect();
    let mut inp = vec![0u64; words];
    comm.sendrecv(&out, next, 4, &mut inp, prev, 4u32)
        .map_err(fail)?;
    if let Some(j) = (0..words).find(|&j| inp[j] != pattern(prev, 7, j)) {
        return Err(vec![format!(
            "rank {me}: word {j} of the 1 MiB message from rank {prev} is {:#x}, expected {:#x}",
            inp[j],
            pattern(prev, 7, j)
        )]);
    }
    comm.barrier().map_err(fail)?;
    println!("RING ok rank={me} size={n} token={}", token[0]);
    Ok(())
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn exchange_loop() -> Result<(), Vec<String>> {
    let comm = ferrocomm::init().map_err(fail)?;
    print_info(&comm);
    let (me, n) = (comm.rank(), comm.size());
    let (right, left) = ((me + 1) % n, (me + n - 1) % n);
    let words = (env_num(MSG_BYTES, 1 << 20) as usize / 8).max(2);
    let max = Duration::from_secs(env_num(MAX_SECS, 80));
    let stop_file = std::env::var_os(STOP_FILE).map(PathBuf::from);
    let started = Instant::now();
    // Words 0 and 1 of every message: the round and the round after which everyone stops
    // (u64::MAX: not decided yet). Rank 0 decides `n` rounds ahead; the decision travels one
    // hop per round in both directions, so every rank knows it in time.
    let mut stop_at = u64::MAX;
    let (mut to_right, mut to_left) = (vec![0u64; words], vec![0u64; words]);
    let (mut from_left, mut from_right) = (vec![0u64; words], vec![0u64; words]);
    let mut round = 0u64;
    loop {
        if started.elapsed() > max {
            return Err(vec![format!(
                "rank {me}: the loop ran for {max:?} without being stopped"
            )]);
        }
        if me == 0 && stop_at == u64::MAX && stop_file.as_ref().is_some_and(|f| f.exists()) {
            stop_at = round + n as u64;
        }
        if n > 1 {
            for buf in [&mut to_right, &mut to_left] {
                buf[0] = round;
                buf[1] = stop_at;
                for (j, w) in buf.iter_mut().enumerate().skip(2) {
                    *w = pattern(me, round, j);
                }
            }
            let errors = comm.scope(|s| {
                let mut errors = Vec::new();
                let mut reqs = Vec::new();
                for r in [
                    s.irecv(&mut from_left, left, 1u32),
                    s.irecv(&mut from_right, right, 2u32),
                    s.isend(&to_right, right, 1),
                    s.isend(&to_left, left, 2),
                ] {
                    match r {
                        Ok(r) => reqs.push(r),
                        Err(e) => errors.push(show(&e)),
                    }
                }
                for r in reqs {
                    if let Err(e) = r.wait() {
                        errors.push(show(&e));
                    }
                }
                errors
            });
            if !errors.is_empty() {
                return Err(errors);
            }
            for (buf, from) in [(&from_left, left), (&from_right, right)] {
                if buf[0] != round {
                    return Err(vec![format!(
                        "rank {me}: round {round}: the message from rank {from} is of round {}",
                        buf[0]
                    )]);
                }
                if let Some(j) = (2..words).find(|&j| buf[j] != pattern(from, round, j)) {
                    return Err(vec![format!(
                        "rank {me}: round {round}: word {j} from rank {from} is {:#x}, expected {:#x}",
                        buf[j],
                        pattern(from, round, j)
                    )]);
                }
                stop_at = stop_at.min(buf[1]);
            }
        } else if stop_at == u64::MAX && stop_file.as_ref().is_some_and(|f| f.exists()) {
            stop_at = round;
        }
        if round == 2 {
            println!("LOOPING rank={me}");
        }
        if round >= stop_at {
            break;
        }
        round += 1;
    }
    println!(
        "LOOPDONE rank={me} rounds={} hwm_kib={}",
        round + 1,
        peak_memory_kib()
    );
    let far: usize = std::env::var(FAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    if n > far && far > 0 {
        // One word to rank + far (sent first: it cannot block, it fits the eager limit),
        // one from rank - far: the only use of those pairs (see the impostor test).
        comm.send(&[me as u64], (me + far) % n, 5).map_err(fail)?;
        let mut word = [0u64];
        comm.recv(&mut word, (me + n - far) % n, 5u32)
            .map_err(fail)?;
    }
    comm.barrier().map_err(fail)?;
    println!("FINISHED rank={me}");
    Ok(())
}

/// splitmix64: a small, good mixer; `allreduce-loop` derives every size from it.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Words in iteration `i`'s all_reduce: mostly small (eager), every fourth up to 1 MiB
/// (rendezvous, cut into pieces by the executor).
fn loop_words(i: u64, salt: u64) -> usize {
    let r = mix(i ^ salt);
    if r.is_multiple_of(4) {
        1 + (r >> 8) as usize % (128 * 1024)
    } else {
        1 + (r >> 8) as usize % 2048
    }
}

fn allreduce_loop() -> Result<(), Vec<String>> {
    let comm = ferrocomm::init().map_err(fail)?;
    print_info(&comm);
    let (me, n) = (comm.rank(), comm.size());
    let iters = env_num(ITERS, u64::MAX);
    let every = env_num(REPORT_EVERY, 0);
    let max = Duration::from_secs(env_num(MAX_SECS, 80));
    let started = Instant::now();
    let mut buf: Vec<u64> = Vec::new();
    let mut i = 0u64;
    while i < iters {
        if started.elapsed() > max {
            return Err(vec![format!(
                "rank {me}: the loop ran for {max:?} without being stopped"
            )]);
        }
        let words = loop_words(i, 1);
        buf.clear();
        buf.extend((0..words).map(|j| pattern(me, i, j)));
        comm.all_reduce(&mut buf, ferrocomm::ReduceOp::Sum)
            .map_err(fail)?;
        let want = |j: usize| (0..n).fold(0u64, |a, r| a.wrapping_add(pattern(r, i, j)));
        if let Some(j) = (0..words).find(|&j| buf[j] != want(j)) {
            return Err(vec![format!(
                "rank {me}: all_reduce {i}: word {j} of {words} is {:#x}, expected {:#x}",
                buf[j],
                want(j)
            )]);
        }
        if i % 2 == 1 && n > 1 {
            all_pairs(&comm, i)?;
        }
        if i == 3 {
            println!("LOOPING rank={me}");
        }
        if every > 0 && i.is_multiple_of(every) {
            println!("ITER rank={me} i={i}");
        }
        i += 1;
    }
    comm.barrier().map_err(fail)?;
    println!("FINISHED rank={me} iters={i}");
    Ok(())
}

/// Every rank sends a block to and receives one from every other rank with `all_to_all`
/// (the block size varies with the iteration), checking every word.
fn all_pairs(comm: &Communicator, i: u64) -> Result<(), Vec<String>> {
    let (me, n) = (comm.rank(), comm.size());
    let b = loop_words(i, 2);
    let word = |from: usize, to: usize, j: usize| pattern(from, i, j) ^ to as u64;
    let send: Vec<u64> = (0..n * b).map(|k| word(me, k / b, k % b)).collect();
    let mut recv = vec![0u64; n * b];
    comm.all_to_all(&send, &mut recv).map_err(fail)?;
    if let Some(k) = (0..n * b).find(|&k| recv[k] != word(k / b, me, k % b)) {
        return Err(vec![format!(
            "rank {me}: all_to_all {i}: word {} of the block from rank {} is {:#x}",
            k % b,
            k / b,
            recv[k]
        )]);
    }
    Ok(())
}
