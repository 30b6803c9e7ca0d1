//! The launcher behind `ferrorun`: starts the ranks of one node of a job, hosts or joins the
//! job's rendezvous store, forwards signals, optionally tags output, and fails fast.
//!
//! ```text
//! ferrorun --nnodes 2 --node-rank 0 --nproc-per-node 4 --master-addr node1 --master-port 5003 -- PROGRAM ARGS
//! ```
//!
//! The binary `src/bin/ferrorun.rs` only parses the command line into a [`LaunchConfig`]
//! and calls [`run`]; everything described here is in this module.
//!
//! # The store and the job
//!
//! Node 0's launcher hosts the job's store ([`TcpStoreServer`]) at `master-addr:master-port`
//! for as long as any node of the job runs; every launcher (node 0's too) connects to it
//! as a client. The ranks use the same store for their own rendezvous
//! (`FERROCOMM_STORE_EXTERNAL=1` tells them not to host one).
//!
//! - With one node and no `--master-port`, the store is bound to port 0 and the port the
//!   system picked is given to the ranks, so concurrent single-node jobs never collide.
//! - With `--nnodes` above 1, `--master-port` is required (there is no default such as
//!   torchrun's 29500: every node must be told the same port, and a default would make two
//!   jobs meet on one store by accident).
//! - Node 0 listens on `master-addr` itself when it is a loopback address or `localhost`
//!   (the store stays private to the machine), and on every interface otherwise, as
//!   PyTorch's TCPStore and the ranks' own rendezvous do: other machines may reach node 0
//!   under another of its addresses (NAT, containers), and a host's own name often resolves
//!   to a loopback address on that host only (Debian's 127.0.1.1).
//!
//! The launchers then agree on the job (see the `node` module's key table): node 0 makes a
//! random job id, every node publishes its number of ranks and waits for all `--nnodes`
//! nodes, logging every 10 s (`FERROCOMM_LOG_INTERVAL`) which nodes are missing, and failing
//! after the rendezvous timeout (default 300 s, `FERROCOMM_TIMEOUT` in seconds overrides)
//! with an error that names them. Ranks are numbered in node order, so nodes may run different
//! numbers of ranks: 2 on node 0 and 3 on node 1 give ranks 0,1 and 2,3,4. Node 0 also writes
//! `job_id=ID world_size=N` under [`JOB_KEY`](crate::rendezvous::JOB_KEY), exactly what each
//! rank's rendezvous writes there, so a process of another job that reaches the store fails
//! with [`Error::JobMismatch`].
//!
//! # Environment of every rank
//!
//! `MASTER_ADDR`, `MASTER_PORT` (the store), `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `NODE_RANK`, `GROUP_RANK` (= node rank), `GROUP_WORLD_SIZE`
//! (= nnodes), `ROLE_RANK`, `ROLE_WORLD_SIZE`, `ROLE_NAME=default`,
//! `TORCHELASTIC_RESTART_COUNT=0`, `TORCHELASTIC_MAX_RESTARTS=0`, `TORCHELASTIC_RUN_ID` and
//! `FERROCOMM_JOB_ID` (the job id), `FERROCOMM_STORE_EXTERNAL=1`,
//! `TORCHELASTIC_USE_AGENT_STORE=True` (PyTorch programs join the launcher's store, which
//! serves torch's `TCPStore` clients too); like torchrun,
//! `OMP_NUM_THREADS=1` when a node runs several ranks and it is not already set. The rest
//! of the launcher's environment is passed on. Standard input is `/dev/null`.
//!
//! # Ending
//!
//! - Every rank exits 0: the launcher exits 0.
//! - A rank exits non-zero or is killed by a signal: the launcher names the *root cause*
//!   of the failure (like torchrun's "first observed failure", but not fooled by the order
//!   in which ranks end): every rank gets a file in `FERROCOMM_FAILURE_FILE` (in a private
//!   directory under `TMPDIR`, removed at the end) where a rank whose collective fails
//!   reports whom it failed because of ([`crate::collective::blame`]). A rank killed by a
//!   signal, or one that failed without such a report (the program's own error), wins over
//!   ranks that failed with `PeerLost` or a timeout because of it, even when they ended
//!   first; when the first failure blames a rank still running, the launcher waits up to
//!   [`BLAME_WAIT`] for it, and when it has no report at all, up to [`UNEXPLAINED_WAIT`]
//!   for a rank killed by a signal (the `verdict` module has the rules). Then the failure is
//!   logged, every other rank gets SIGTERM, and whatever still runs after the grace period
//!   (`--grace-period`, default [`DEFAULT_GRACE_PERIOD`]) gets SIGKILL. The launcher exits
//!   with the named rank's status, or 128 + signal, and the binary prints e.g.
//!   `ferrorun: rank 3 (local rank 1, pid 4242) was killed by signal 9 (SIGKILL) (rank 0
//!   (local rank 0, pid 4240) exited with status 1 first, because of rank 3)`.
//! - The launcher receives SIGINT, SIGTERM, SIGHUP or SIGQUIT: it forwards the signal to
//!   every rank, SIGKILLs what is left after the grace period, and exits 128 + signal
//!   (130 for SIGINT, 143 for SIGTERM). A second signal during the grace period kills the
//!   ranks at once. A signal that was ignored when the launcher started (`nohup`) stays
//!   ignored.
//! - Several nodes: the node that fails first publishes its failure in the store; the other
//!   launchers notice it within about a second, stop their ranks the same way and exit with
//!   the failing node's status. Every launcher reports that first failure (`ferrorun: node 1
//!   failed: rank 3 ...`), even one whose own ranks failed a moment later (most likely
//!   because their peer was gone). When node 0's ranks succeeded but another node's launcher
//!   stopped sending heartbeats for 30 s before saying it was done, node 0 exits 1. A
//!   signal to node 0 while it keeps the store up for the other nodes (its own ranks have
//!   ended) makes it exit at once with 128 + signal; the other nodes lose the store.
//!
//! Signals go to each rank's process group, so they also reach what a rank started. See the
//! `ranks` module for how no process is left behind, including when the launcher is killed
//! with SIGKILL (`PR_SET_PDEATHSIG`: the ranks get SIGKILL when the thread that called
//! [`run`] ends, so call it from a thread that lives until it returns).

mod node;
mod output;
mod ranks;
mod sys;
mod verdict;

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use node::RemoteFailure;
pub use sys::Termination;
pub use verdict::{BLAME_WAIT, UNEXPLAINED_WAIT};

use crate::collective::blame::{FAILURE_FILE_ENV, FailureReport};
use crate::error::{Error, IoContext, Result};
use crate::rendezvous::Store;
use crate::rendezvous::tcp_store::{ServerConfig, TcpStore, TcpStoreServer};
use node::{Agreement, Link, NodePlan};
use ranks::{RankSpec, Ranks};
use sys::SignalPipe;
use verdict::{Failed, Verdict};

/// Default time between SIGTERM and SIGKILL when stopping ranks: long enough for a rank to
/// flush its output and close its connections, short enough that a failed job is torn down
/// promptly. A rank that needs longer (to write a checkpoint) needs `--grace-period`.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(5);

/// Default time the launchers wait for every node to join (`FERROCOMM_TIMEOUT` overrides).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The environment variable that overrides [`DEFAULT_TIMEOUT`], in seconds (the same one the
/// ranks' rendezvous reads).
pub const TIMEOUT_ENV: &str = "FERROCOMM_TIMEOUT";

/// Default interval between "still waiting for node(s) ..." messages.
pub const DEFAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The environment variable that overrides [`DEFAULT_LOG_INTERVAL`], in seconds.
pub const LOG_INTERVAL_ENV: &str = "FERROCOMM_LOG_INTERVAL";

/// How one node of a job is launched.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LaunchConfig {
    /// Number of nodes in the job (`--nnodes`), at least 1.
    pub nnodes: usize,
    /// This node's index in `0..nnodes` (`--node-rank`).
    pub node_rank: usize,
    /// Ranks to start on this node (`--nproc-per-node`), at least 1. Nodes may differ.
    pub nproc_per_node: usize,
    /// Host name or IP address of node 0, where the store is (`--master-addr`).
    pub master_addr: String,
    /// Port of the store (`--master-port`). `None` on a single node: pick a free one.
    /// Required with several nodes.
    pub master_port: Option<u16>,
    /// Prefix every line of every rank's stdout and stderr with `[rank N] `.
    pub tag_output: bool,
    /// Time between SIGTERM and SIGKILL when stopping ranks.
    pub grace_period: Duration,
    /// How long to wait for every node to join (and, on nodes other than 0, for the store
    /// to come up).
    pub rendezvous_timeout: Duration,
    /// How often a launcher waiting for other nodes logs which ones are missing.
    pub log_interval: Duration,
    /// The program every rank runs (looked up in `PATH` when it has no `/`).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// How many times the whole group is restarted after a rank fails (`--max-restarts`,
    /// like torchrun's); 0: fail at the first failure. Single-node jobs only.
    pub max_restarts: usize,
}

impl LaunchConfig {
    /// One node, one rank, store on 127.0.0.1 at a free port, no output tags, the default
    /// grace period and timeout.
    pub fn new(program: impl Into<OsString>, args: Vec<OsString>) -> Self {
        LaunchConfig {
            nnodes: 1,
            node_rank: 0,
            nproc_per_node: 1,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            tag_output: false,
            grace_period: DEFAULT_GRACE_PERIOD,
            rendezvous_timeout: DEFAULT_TIMEOUT,
            log_interval: DEFAULT_LOG_INTERVAL,
            program: program.into(),
            args,
            max_restarts: 0,
        }
    }

    /// Takes the rendezvous timeout and log interval from `FERROCOMM_TIMEOUT` and
    /// `FERROCOMM_LOG_INTERVAL` (seconds, fractions allowed) where they are set.
    pub fn apply_env(&mut self) -> Result<()> {
        self.rendezvous_timeout = seconds_from_env(TIMEOUT_ENV, self.rendezvous_timeout)?;
        self.log_interval = seconds_from_env(LOG_INTERVAL_ENV, self.log_interval)?;
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        const OP: &str = "ferrorun";
        if self.nnodes == 0 {
            return Err(Error::invalid(OP, "--nnodes", "must be at least 1"));
        }
        if self.node_rank >= self.nnodes {
            return Err(Error::invalid(
                OP,
                "--node-rank",
                format!(
                    "is {} but must be below --nnodes {} (nodes are numbered from 0)",
                    self.node_rank, self.nnodes
                ),
            ));
        }
        if self.nproc_per_node == 0 {
            return Err(Error::invalid(OP, "--nproc-per-node", "must be at least 1"));
        }
        if self.nnodes > 1 && self.master_port.is_none() {
            return Err(Error::invalid(
                OP,
                "--master-port",
                format!(
                    "is required with --nnodes {}: every node must be given the same port, \
                     a free one on node 0 (torchrun users: 29500 was its default)",
                    self.nnodes
                ),
            ));
        }
        if self.rendezvous_timeout.is_zero() || self.log_interval.is_zero() {
            return Err(Error::invalid(
                OP,
                "rendezvous_timeout/log_interval",
                "must be positive",
            ));
        }
        if self.master_addr.is_empty() {
            return Err(Error::invalid(OP, "--master-addr", "must not be empty"));
        }
        if self.max_restarts > 0 && self.nnodes > 1 {
            return Err(Error::invalid(
                OP,
                "--max-restarts",
                "restarts are implemented for single-node jobs (--nnodes 1) only: restarting \
                 the group of several nodes needs every node to agree, which this launcher \
                 does not do",
            ));
        }
        if self.program.is_empty() {
            return Err(Error::invalid(OP, "PROGRAM", "no program to run was given"));
        }
        Ok(())
    }
}

/// Reads a positive number of seconds from the environment variable `name`; `default`
/// when it is unset or blank.
pub fn seconds_from_env(name: &str, default: Duration) -> Result<Duration> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::config(
            name,
            v.to_string_lossy(),
            "must be a positive number of seconds",
        )),
        Ok(v) if v.trim().is_empty() => Ok(default),
        Ok(v) => match parse_seconds(&v) {
            Some(t) if !t.is_zero() => Ok(t),
            _ => Err(Error::config(
                name,
                v,
                "must be a positive number of seconds, e.g. 600 or 0.5",
            )),
        },
    }
}

/// Parses a non-negative number of seconds (`"5"`, `"0.5"`, `"0"`); `None` when it is not
/// one.
pub fn parse_seconds(s: &str) -> Option<Duration> {
    let secs: f64 = s.trim().parse().ok()?;
    if secs.is_finite() && secs >= 0.0 {
        Duration::try_from_secs_f64(secs).ok()
    } else {
        None
    }
}

/// Parses `--nproc-per-node`: a positive number, or `auto` / `cpu` for the number of CPUs
/// this process may run on.
pub fn parse_nproc(s: &str) -> Result<usize> {
    match s.trim() {
        "auto" | "cpu" => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
        t => match t.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(Error::config(
                "--nproc-per-node",
                s,
                "must be a positive number of ranks, `auto` or `cpu` (one rank per CPU)",
            )),
        },
    }
}

/// How the launch ended, and so what the launcher exits with ([`Outcome::exit_code`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Every rank of this node exited with status 0 (and no other node reported a failure).
    Success,
    /// A rank of this node failed first: every other rank was stopped.
    RankFailed {
        /// Its global rank.
        rank: usize,
        /// Its rank on this node.
        local_rank: usize,
        /// Its process id.
        pid: u32,
        /// How it ended.
        how: Termination,
        /// When this rank is not the first that failed: how the first failed and whom
        /// its chain of failures led to (see [`BLAME_WAIT`] and the module docs).
        note: Option<String>,
    },
    /// Another node's launcher reported a failure first; this node's ranks were stopped.
    RemoteFailure(RemoteFailure),
    /// The launcher received this signal and forwarded it to the ranks.
    Interrupted {
        /// The signal number.
        signal: i32,
    },
}

impl Outcome {
    /// What the launcher exits with: 0 on success, the failed rank's exit status or 128 +
    /// the signal that killed it, the failing node's code, or 128 + the signal received.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Success => 0,
            Outcome::RankFailed { how, .. } => how.exit_code(),
            Outcome::RemoteFailure(f) => f.code,
            Outcome::Interrupted { signal } => 128 + signal,
        }
    }

    /// True for [`Outcome::Success`].
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success)
    }
}

impl Termination {
    /// The conventional exit code for this ending: the status, or 128 + signal.
    pub fn exit_code(&self) -> i32 {
        match *self {
            Termination::Exited(code) => code,
            Termination::Signaled(sig) => 128 + sig,
        }
    }

    /// True for an exit with status 0.
    pub fn is_success(&self) -> bool {
        *self == Termination::Exited(0)
    }
}

impl std::fmt::Display for Termination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Termination::Exited(code) => write!(f, "exited with status {code}"),
            Termination::Signaled(sig) => match sys::signal_name(sig) {
                Some(name) => write!(f, "was killed by signal {sig} ({name})"),
                None => write!(f, "was killed by signal {sig}"),
            },
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Success => write!(f, "every rank exited with status 0"),
            Outcome::RankFailed {
                rank,
                local_rank,
                pid,
                how,
                note,
            } => {
                write!(f, "rank {rank} (local rank {local_rank}, pid {pid}) {how}")?;
                match note {
                    Some(n) => write!(f, " ({n})"),
                    None => Ok(()),
                }
            }
            Outcome::RemoteFailure(r) => write!(f, "node {} failed: {}", r.node, r.message),
            Outcome::Interrupted { signal } => match sys::signal_name(*signal) {
                Some(name) => write!(f, "interrupted by signal {signal} ({name})"),
                None => write!(f, "interrupted by signal {signal}"),
            },
        }
    }
}

/// Launches this node's ranks as `cfg` says and waits until they have all ended (and, on
/// node 0 of a multi-node job, until every other node is done with the store).
///
/// Returns how the job ended; `Err` only when the launcher itself could not do its work
/// (bad configuration, the store unreachable or the rendezvous timed out, a rank that could
/// not be started). Ranks already started are killed before an `Err` is returned.
///
/// Installs process-wide signal handlers for its duration (restored on return), so only
/// one `run` may be active per process at a time.
pub fn run(cfg: &LaunchConfig) -> Result<Outcome> {
    cfg.validate()?;
    let signals = SignalPipe::install().ctx(|| "ferrorun: cannot install signal handlers")?;
    let mut pending_signal = None;
    let mut interrupted = || {
        if pending_signal.is_none() {
            pending_signal = signals.drain().ok().and_then(|b| {
                b.into_iter()
                    .map(i32::from)
                    .find(|s| sys::FORWARDED.contains(s))
            });
        }
        pending_signal
    };
    let secret = job_secret(cfg)?;
    let mut restart = 0;
    loop {
        let outcome = attempt(cfg, &signals, &mut interrupted, restart, secret.as_ref())?;
        match &outcome {
            Outcome::RankFailed { rank, how, .. } if restart < cfg.max_restarts => {
                restart += 1;
                tracing::warn!(
                    "rank {rank} {how}; restarting the group (restart {restart} of {})",
                    cfg.max_restarts
                );
            }
            Outcome::RankFailed { .. } if cfg.max_restarts > 0 => {
                tracing::warn!(
                    "giving up after {} restart(s) (--max-restarts {})",
                    restart,
                    cfg.max_restarts
                );
                return Ok(outcome);
            }
            _ => return Ok(outcome),
        }
    }
}

/// The job secret the ranks and the store use: `FERROCOMM_SECRET` if the user set it, else
/// a fresh random one on a single node. Several nodes cannot agree on a random secret
/// without a trusted channel, so there the user must set the same one on every node (or
/// run unauthenticated, which is logged).
fn job_secret(cfg: &LaunchConfig) -> Result<Option<String>> {
    if let Some(s) = std::env::var(crate::auth::SECRET_ENV)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
    {
        return Ok(Some(s));
    }
    if cfg.nnodes > 1 {
        tracing::warn!(
            "{} nodes and no {}: connections are not authenticated; set the same {} on every \
             node to authenticate them",
            cfg.nnodes,
            crate::auth::SECRET_ENV,
            crate::auth::SECRET_ENV
        );
        return Ok(None);
    }
    crate::auth::Secret::generate_hex().map(Some)
}

/// One attempt at running the group: a fresh store, the ranks, their supervision.
fn attempt(
    cfg: &LaunchConfig,
    signals: &SignalPipe,
    interrupted: &mut impl FnMut() -> Option<i32>,
    restart: usize,
    secret: Option<&String>,
) -> Result<Outcome> {
    let secret_key = secret.map(crate::auth::Secret::new).transpose()?;
    // The store: hosted here on node 0, reached by every launcher as a client.
    let server = if cfg.node_rank == 0 {
        Some(host_store(cfg, secret_key.clone())?)
    } else {
        None
    };
    let port = match (&server, cfg.master_port) {
        (Some(s), _) => s.local_addr().port(),
        (None, Some(p)) => p,
        (None, None) => {
            return Err(Error::invalid(
                "ferrorun",
                "--master-port",
                "is required on nodes other than 0",
            ));
        }
    };
    let store_addr = join_host_port(&cfg.master_addr, port);
    let store: Arc<dyn Store> = match connect_store(&store_addr, cfg, secret_key, interrupted)? {
        Some(s) => Arc::new(s),
        None => return Ok(interrupted_outcome(interrupted)),
    };
    if cfg.node_rank == 0 {
        node::publish_job_id(&*store, &node::new_job_id()?)?;
    }
    let plan = match node::agree(
        &*store,
        cfg.nnodes,
        cfg.node_rank,
        cfg.nproc_per_node,
        cfg.rendezvous_timeout,
        cfg.log_interval,
        &mut *interrupted,
    )? {
        Agreement::Plan(p) => p,
        Agreement::Interrupted(signal) => return Ok(Outcome::Interrupted { signal }),
    };
    if let Some(signal) = interrupted() {
        return Ok(Outcome::Interrupted { signal });
    }

    let link = if cfg.nnodes > 1 {
        let waker = signals
            .waker()
            .ctx(|| "ferrorun: cannot create a wake-up pipe")?;
        Some(Link::start(
            store.clone(),
            cfg.nnodes,
            cfg.node_rank,
            waker,
        )?)
    } else {
        None
    };

    let mut specs = rank_specs(cfg, &plan, port);
    for spec in &mut specs {
        for (k, v) in &mut spec.env {
            match k.as_str() {
                "TORCHELASTIC_RESTART_COUNT" => *v = restart.to_string(),
                "TORCHELASTIC_MAX_RESTARTS" => *v = cfg.max_restarts.to_string(),
                _ => {}
            }
        }
        spec.env
            .push(("FERROCOMM_RESTART_COUNT".into(), restart.to_string()));
        if let Some(s) = secret {
            spec.env.push((crate::auth::SECRET_ENV.into(), s.clone()));
        }
    }
    let reports = ReportDir::create(&plan.job_id, restart);
    if let Some(dir) = &reports {
        for spec in &mut specs {
            let path = dir.path_of(spec.rank);
            spec.env
                .push((FAILURE_FILE_ENV.into(), path.to_string_lossy().into_owned()));
        }
    }
    let mut ranks = match Ranks::spawn(&cfg.program, &cfg.args, specs, cfg.tag_output) {
        Ok(r) => r,
        Err(e) => {
            if let Some(link) = &link {
                link.fail(1, format!("node {}: {e}", cfg.node_rank));
                link.done(1);
                wait_for_link(link, signals, Some(Duration::from_secs(5)))?;
            }
            return Err(e);
        }
    };
    tracing::info!(
        "started {} rank(s) of `{}` (ranks {}..{} of {})",
        cfg.nproc_per_node,
        cfg.program.to_string_lossy(),
        plan.rank_offset,
        plan.rank_offset + cfg.nproc_per_node,
        plan.world_size
    );

    let pids: Vec<u32> = ranks.ranks().iter().map(|r| r.pid()).collect();
    let outcome = supervise(
        &mut ranks,
        signals,
        link.as_ref(),
        cfg.grace_period,
        reports.as_ref(),
    );
    ranks.finish();
    // Ranks killed while they started up cannot remove their shared-memory segments.
    let left = crate::transport::shm::remove_segments_of(&plan.job_id, &pids);
    if left > 0 {
        tracing::info!("removed {left} shared-memory segment(s) of ranks that died starting up");
    }
    let mut outcome = outcome?;

    if let Some(link) = &link {
        link.done(outcome.exit_code());
        // Node 0 hosts the store: it stays until the other nodes are done with it.
        let limit = (cfg.node_rank != 0).then_some(Duration::from_secs(5));
        if cfg.node_rank == 0 && !link.finished() {
            tracing::info!(
                "this node's ranks have ended; keeping the store up for the other nodes"
            );
        }
        if let Some(signal) = wait_for_link(link, signals, limit)?
            && outcome.is_success()
        {
            outcome = Outcome::Interrupted { signal };
        }
        // Every launcher reports the job's first failure, as published in the store: a
        // rank here that failed after a rank elsewhere was most likely its victim.
        if !matches!(outcome, Outcome::Interrupted { .. }) {
            if let Some(first) = link.remote_failure() {
                if let Outcome::RankFailed { .. } = outcome {
                    tracing::warn!("{outcome}, but node {} failed first", first.node);
                }
                outcome = Outcome::RemoteFailure(first);
            } else if let (true, Some(lost)) = (outcome.is_success(), link.lost_node()) {
                outcome = Outcome::RemoteFailure(lost);
            }
        }
    }
    drop(reports);
    drop(store);
    drop(server);
    Ok(outcome)
}

/// The private directory of the ranks' failure reports (see
/// [`crate::collective::blame`]): one file per rank, named in its [`FAILURE_FILE_ENV`].
/// Removed with everything in it when dropped.
struct ReportDir(PathBuf);

impl ReportDir {
    /// Creates it in the temporary directory (`TMPDIR`); `None` (reports are then not
    /// used, and the first failure is named) when that fails.
    fn create(job_id: &str, restart: usize) -> Option<ReportDir> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!(
            "ferrorun-{}-{job_id}-{restart}",
            std::process::id()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => Some(ReportDir(path)),
            Err(e) => {
                tracing::warn!(
                    "cannot create {} for the ranks' failure reports ({e}); a failure is \
                     reported as the first rank that ended, not its root cause",
                    path.display()
                );
                None
            }
        }
    }

    fn path_of(&self, rank: usize) -> PathBuf {
        self.0.join(format!("rank-{rank}"))
    }

    /// The failure report of `rank`, if it wrote one.
    fn report(&self, rank: usize) -> Option<FailureReport> {
        FailureReport::read(&self.path_of(rank))
    }
}

impl Drop for ReportDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The outcome naming `failed[k]` (see the `verdict` module); `pending_end`: where the
/// chain of failures ended when no root cause was found in time.
fn verdict_outcome(
    ranks: &Ranks,
    failed: &[(usize, Failed)],
    k: usize,
    pending_end: Option<usize>,
) -> Outcome {
    let who = |i: usize| {
        let r = &ranks.ranks()[i];
        format!(
            "rank {} (local rank {}, pid {})",
            r.rank,
            r.local_rank,
            r.pid()
        )
    };
    let (i, f) = &failed[k];
    let (first_i, first) = &failed[0];
    let mut notes = Vec::new();
    if k != 0 {
        let why = match first.because_of {
            Some(b) => format!(", because of rank {b}"),
            None => String::new(),
        };
        notes.push(format!("{} {} first{why}", who(*first_i), first.how));
    }
    if let Some(end) = pending_end {
        match ranks.ranks().iter().position(|r| r.rank == end) {
            Some(j) if ranks.ranks()[j].ended.is_none() => notes.push(format!(
                "the failures lead to {}, which was still running {:.0?} later: stopped, \
                 hung, or much slower",
                who(j),
                BLAME_WAIT
            )),
            Some(_) => notes.push(format!(
                "the ranks' reports blame each other, starting with rank {end}"
            )),
            None => notes.push(format!(
                "the failures lead to rank {end}, on another node, which reported nothing \
                 within {BLAME_WAIT:.0?}"
            )),
        }
    }
    let r = &ranks.ranks()[*i];
    Outcome::RankFailed {
        rank: r.rank,
        local_rank: r.local_rank,
        pid: r.pid(),
        how: f.how,
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    }
}

fn interrupted_outcome(interrupted: &mut impl FnMut() -> Option<i32>) -> Outcome {
    Outcome::Interrupted {
        signal: interrupted().unwrap_or(libc::SIGINT),
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Binds the job's store on node 0 (see the module docs for which address).
fn host_store(cfg: &LaunchConfig, secret: Option<crate::auth::Secret>) -> Result<TcpStoreServer> {
    let port = cfg.master_port.unwrap_or(0);
    let host = cfg
        .master_addr
        .trim_start_matches('[')
        .trim_end_matches(']');
    // The master address itself (see `rendezvous::store_bind_ip`), not every interface.
    let ip = match host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => {
            let resolved: Vec<IpAddr> = (host, port)
                .to_socket_addrs()
                .map_err(|e| {
                    Error::config(
                        "--master-addr",
                        &cfg.master_addr,
                        format!("node 0 cannot resolve it: {e}"),
                    )
                })?
                .map(|sa| sa.ip())
                .collect();
            let own = |ip: &IpAddr| std::net::TcpListener::bind((*ip, 0)).is_ok();
            let Some(ip) = resolved
                .iter()
                .find(|ip| !ip.is_loopback() && own(ip))
                .or_else(|| resolved.iter().find(|ip| own(ip)))
                .copied()
            else {
                return Err(Error::config(
                    "--master-addr",
                    &cfg.master_addr,
                    format!("resolves to {resolved:?}, none of them an address of node 0"),
                ));
            };
            crate::rendezvous::store_bind_ip(host, ip)
        }
    };
    let mut config = ServerConfig::from_env()?;
    // A secret the user did not set (generated here for a single node) must not lock out
    // PyTorch programs, whose TCPStore clients cannot authenticate: they are served, confined
    // to their own key namespace, unless FERROCOMM_STORE_ALLOW_TORCH=0. A user-set secret
    // keeps them out unless FERROCOMM_STORE_ALLOW_TORCH=1.
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !set(crate::auth::SECRET_ENV) && !set("FERROCOMM_STORE_ALLOW_TORCH") {
        config.allow_torch = true;
    }
    config.secret = secret;
    let server = TcpStoreServer::bind_with(SocketAddr::new(ip, port), config)?;
    tracing::debug!("store listening on {}", server.local_addr());
    Ok(server)
}

/// Connects to the store, retrying until `timeout` (node 0 may start after this node).
/// `Ok(None)`: a signal arrived first.
fn connect_store(
    addr: &str,
    cfg: &LaunchConfig,
    secret: Option<crate::auth::Secret>,
    interrupted: &mut impl FnMut() -> Option<i32>,
) -> Result<Option<TcpStore>> {
    let start = Instant::now();
    let deadline = start + cfg.rendezvous_timeout;
    let mut next_log = start + cfg.log_interval;
    loop {
        if interrupted().is_some() {
            return Ok(None);
        }
        let now = Instant::now();
        let step = Duration::from_secs(1).min(deadline.saturating_duration_since(now));
        match TcpStore::connect_secure(addr, step, cfg.log_interval, secret.clone()) {
            Ok(s) => return Ok(Some(s)),
            Err(e @ Error::JobMismatch { .. }) => return Err(e),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Timeout {
                    op: "ferrorun: connecting to the store".into(),
                    waited: start.elapsed(),
                    detail: format!(
                        "no store at {addr} ({e}); start node 0's ferrorun with the same \
                         --master-addr/--master-port, or raise {TIMEOUT_ENV} (seconds)"
                    ),
                });
            }
            Err(e) => {
                if Instant::now() >= next_log {
                    tracing::warn!("waiting for node 0's store at {addr}: {e}");
                    next_log += cfg.log_interval;
                }
                // `connect` may fail at once (connection refused): do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn rank_specs(cfg: &LaunchConfig, plan: &NodePlan, port: u16) -> Vec<RankSpec> {
    let local_world = cfg.nproc_per_node;
    let set_omp = local_world > 1 && std::env::var_os("OMP_NUM_THREADS").is_none();
    if set_omp {
        tracing::info!("setting OMP_NUM_THREADS=1 for every rank (it was not set)");
    }
    (0..local_world)
        .map(|local_rank| {
            let rank = plan.rank_offset + local_rank;
            let mut env: Vec<(String, String)> = vec![
                ("MASTER_ADDR".into(), cfg.master_addr.clone()),
                ("MASTER_PORT".into(), port.to_string()),
                ("RANK".into(), rank.to_string()),
                ("WORLD_SIZE".into(), plan.world_size.to_string()),
                ("LOCAL_RANK".into(), local_rank.to_string()),
                ("LOCAL_WORLD_SIZE".into(), local_world.to_string()),
                ("NODE_RANK".into(), cfg.node_rank.to_string()),
                ("GROUP_RANK".into(), cfg.node_rank.to_string()),
                ("GROUP_WORLD_SIZE".into(), cfg.nnodes.to_string()),
                ("ROLE_RANK".into(), rank.to_string()),
                ("ROLE_WORLD_SIZE".into(), plan.world_size.to_string()),
                ("ROLE_NAME".into(), "default".into()),
                ("TORCHELASTIC_RESTART_COUNT".into(), "0".into()),
                ("TORCHELASTIC_MAX_RESTARTS".into(), "0".into()),
                ("TORCHELASTIC_RUN_ID".into(), plan.job_id.clone()),
                ("FERROCOMM_JOB_ID".into(), plan.job_id.clone()),
                ("FERROCOMM_STORE_EXTERNAL".into(), "1".into()),
                // PyTorch's env:// then joins this store (which speaks TCPStore's protocol)
                // in every rank instead of binding MASTER_PORT in rank 0.
                ("TORCHELASTIC_USE_AGENT_STORE".into(), "True".into()),
            ];
            if set_omp {
                env.push(("OMP_NUM_THREADS".into(), "1".into()));
            }
            RankSpec {
                rank,
                local_rank,
                env,
            }
        })
        .collect()
}

/// What the supervisor is doing about an ending job.
struct Stopping {
    outcome: Outcome,
    kill_at: Instant,
    killed: bool,
}

/// Watches the ranks until every one has ended, stopping them all on the first failure,
/// signal or remote failure.
fn supervise(
    ranks: &mut Ranks,
    signals: &SignalPipe,
    link: Option<&Link>,
    grace: Duration,
    reports: Option<&ReportDir>,
) -> Result<Outcome> {
    let mut stopping: Option<Stopping> = None;
    // The ranks that failed before anything was stopped, in the order seen, and when the
    // wait for the root cause ends (see the `verdict` module).
    let mut failed: Vec<(usize, Failed)> = Vec::new();
    let mut decide_by: Option<Instant> = None;
    let mut first_failed_at: Option<Instant> = None;
    let begin_stop = |ranks: &Ranks, outcome: Outcome, sig: i32| {
        ranks.signal_all(sig);
        if let (Some(link), false) = (link, matches!(outcome, Outcome::RemoteFailure(_))) {
            link.fail(outcome.exit_code(), outcome.to_string());
        }
        Stopping {
            outcome,
            kill_at: Instant::now() + grace,
            killed: false,
        }
    };
    loop {
        for i in ranks.poll()? {
            let r = &ranks.ranks()[i];
            let Some(how) = r.ended else { continue };
            tracing::debug!(rank = r.rank, "rank {how}");
            if how.is_success() || stopping.is_some() {
                continue;
            }
            let report = reports.and_then(|d| d.report(r.rank));
            let because_of = report.as_ref().and_then(|rep| rep.because_of(r.rank));
            if let Some(b) = because_of {
                tracing::info!(rank = r.rank, "rank {how}, because of rank {b}");
            }
            failed.push((
                i,
                Failed {
                    rank: r.rank,
                    how,
                    because_of,
                    reported: report.is_some(),
                },
            ));
            first_failed_at.get_or_insert_with(Instant::now);
            decide_by.get_or_insert_with(|| Instant::now() + BLAME_WAIT);
        }
        if stopping.is_none()
            && let Some(by) = decide_by
        {
            let list: Vec<Failed> = failed.iter().map(|(_, f)| f.clone()).collect();
            let here = |rank: usize| ranks.ranks().iter().any(|r| r.rank == rank);
            let chosen = match verdict::decide(&list) {
                // A rank that exited without a report may have lost a peer outside a
                // collective: give a signal death a moment to show.
                Verdict::Named { root }
                    if list[root].unexplained()
                        && !ranks.all_ended()
                        && first_failed_at
                            .is_some_and(|t| t.elapsed() < verdict::UNEXPLAINED_WAIT) =>
                {
                    None
                }
                Verdict::Named { root } => Some((root, None)),
                // Nothing more to learn here once every rank has ended, unless the chain
                // leads to another node, which may still report it.
                Verdict::Pending { ends_at }
                    if Instant::now() >= by
                        || (ranks.all_ended() && (link.is_none() || here(ends_at))) =>
                {
                    let root = list.iter().position(|f| f.because_of.is_none());
                    Some((root.unwrap_or(0), Some(ends_at)))
                }
                Verdict::Pending { .. } => None,
            };
            if let Some((k, pending_end)) = chosen {
                let outcome = verdict_outcome(ranks, &failed, k, pending_end);
                tracing::error!("{outcome}; stopping the other ranks");
                stopping = Some(begin_stop(ranks, outcome, libc::SIGTERM));
            }
        }
        // (Still deciding: the chain leads to another node, whose report may come.)
        if ranks.all_ended() && (stopping.is_some() || decide_by.is_none()) {
            break;
        }
        if stopping.is_none()
            && let Some(f) = link.and_then(Link::remote_failure)
        {
            tracing::error!(
                "node {} failed ({}); stopping this node's ranks",
                f.node,
                f.message
            );
            stopping = Some(begin_stop(ranks, Outcome::RemoteFailure(f), libc::SIGTERM));
        }
        let mut timeout = Duration::from_secs(1);
        if let (None, Some(by), Some(first)) = (&stopping, decide_by, first_failed_at) {
            let now = Instant::now();
            let unexplained_end = first + verdict::UNEXPLAINED_WAIT;
            let next = if now < unexplained_end {
                unexplained_end
            } else {
                by
            };
            timeout = timeout.min(next.saturating_duration_since(now));
        }
        if let Some(s) = stopping.as_mut().filter(|s| !s.killed) {
            let now = Instant::now();
            if now >= s.kill_at {
                tracing::warn!(
                    "rank(s) {:?} still running {:.1?} after SIGTERM; sending SIGKILL",
                    ranks.running(),
                    grace
                );
                ranks.signal_all(libc::SIGKILL);
                s.killed = true;
            } else {
                timeout = timeout.min(s.kill_at - now);
            }
        }
        let events = signals
            .wait(Some(timeout))
            .ctx(|| "ferrorun: waiting for signals")?;
        for sig in events.into_iter().map(i32::from) {
            if !sys::FORWARDED.contains(&sig) {
                continue; // SIGCHLD or a wake-up: the next poll looks at the ranks.
            }
            match stopping.as_mut() {
                None => {
                    tracing::warn!(
                        "received {}; forwarding it to every rank",
                        sys::signal_name(sig).unwrap_or("a signal")
                    );
                    stopping = Some(begin_stop(ranks, Outcome::Interrupted { signal: sig }, sig));
                }
                Some(s) if !s.killed => {
                    tracing::warn!("received another signal while stopping; sending SIGKILL now");
                    ranks.signal_all(libc::SIGKILL);
                    s.killed = true;
                }
                Some(_) => {}
            }
        }
    }
    Ok(stopping.map_or(Outcome::Success, |s| s.outcome))
}

/// Waits for the link to finish (up to `limit`), handling signals meanwhile. Returns the
/// signal that cut the wait short, if one did.
fn wait_for_link(
    link: &Link,
    signals: &SignalPipe,
    limit: Option<Duration>,
) -> Result<Option<i32>> {
    let deadline = limit.map(|l| Instant::now() + l);
    loop {
        if link.finished() {
            return Ok(None);
        }
        let mut step = Duration::from_secs(1);
        if let Some(d) = deadline {
            let now = Instant::now();
            if now >= d {
                tracing::debug!("the store did not confirm the end of this node in time");
                return Ok(None);
            }
            step = step.min(d - now);
        }
        let events = signals
            .wait(Some(step))
            .ctx(|| "ferrorun: waiting for signals")?;
        if let Some(sig) = events
            .into_iter()
            .map(i32::from)
            .find(|s| sys::FORWARDED.contains(s))
        {
            return Ok(Some(sig));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nproc() {
        assert_eq!(parse_nproc("3").ok(), Some(3));
        assert!(parse_nproc("auto").is_ok_and(|n| n >= 1));
        assert!(parse_nproc("0").is_err());
        assert!(parse_nproc("-1").is_err());
        assert!(parse_nproc("gpu").is_err());
    }

    #[test]
    fn parses_seconds() {
        assert_eq!(parse_seconds("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_seconds("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_seconds("-1"), None);
        assert_eq!(parse_seconds("inf"), None);
        assert_eq!(parse_seconds("x"), None);
    }

    #[test]
    fn exit_codes_and_messages() {
        let failed = Outcome::RankFailed {
            rank: 3,
            local_rank: 1,
            pid: 4242,
            how: Termination::Exited(1),
            note: None,
        };
        assert_eq!(failed.exit_code(), 1);
        assert_eq!(
            failed.to_string(),
            "rank 3 (local rank 1, pid 4242) exited with status 1"
        );
        let named = Outcome::RankFailed {
            rank: 2,
            local_rank: 2,
            pid: 4243,
            how: Termination::Signaled(9),
            note: Some("rank 0 (local rank 0, pid 4241) exited with status 1 first".into()),
        };
        assert_eq!(named.exit_code(), 137);
        assert_eq!(
            named.to_string(),
            "rank 2 (local rank 2, pid 4243) was killed by signal 9 (SIGKILL) (rank 0 (local \
             rank 0, pid 4241) exited with status 1 first)"
        );
        let killed = Termination::Signaled(9);
        assert_eq!(killed.exit_code(), 137);
        assert_eq!(killed.to_string(), "was killed by signal 9 (SIGKILL)");
        assert_eq!(Outcome::Interrupted { signal: 2 }.exit_code(), 130);
        assert_eq!(Outcome::Interrupted { signal: 15 }.exit_code(), 143);
        assert_eq!(Outcome::Success.exit_code(), 0);
    }

    #[test]
    fn validates() {
        let mut cfg = LaunchConfig::new("true", vec![]);
        assert!(cfg.validate().is_ok());
        cfg.nnodes = 2;
        assert!(cfg.validate().is_err(), "several nodes need --master-port");
        cfg.master_port = Some(1234);
        assert!(cfg.validate().is_ok());
        cfg.node_rank = 2;
        assert!(cfg.validate().is_err());
        cfg.node_rank = 1;
        cfg.nproc_per_node = 0;
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn host_port() {
        assert_eq!(join_host_port("127.0.0.1", 5), "127.0.0.1:5");
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
        assert_eq!(join_host_port("[::1]", 5), "[::1]:5");
        assert_eq!(join_host_port("node1", 5), "node1:5");
    }
}
