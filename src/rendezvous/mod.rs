//! Bootstrap: how the processes of one job find each other.
//!
//! Every process of a job runs the same program and calls, in effect,
//!
//! ```no_run
//! # use ferrocomm::rendezvous::InitOptions;
//! # use std::collections::BTreeMap;
//! # fn main() -> ferrocomm::Result<()> {
//! let plan = InitOptions::new().resolve()?;          // init method, rank, world size, ...
//! let mut addrs = BTreeMap::new();                     // what peers need to reach this rank
//! addrs.insert("tcp".to_string(), "10.0.0.7:40123".to_string());
//! let boot = plan.join(addrs)?;                        // rank, local rank, every peer's info
//! # Ok(()) }
//! ```
//!
//! # Resolution ([`InitOptions::resolve`])
//!
//! Each setting comes from the first of: the explicit option, the environment, a default.
//!
//! | setting | option | environment | default |
//! |---|---|---|---|
//! | init method | [`InitOptions::init_method`] | `FERROCOMM_INIT_METHOD` | `env://` |
//! | rank | [`InitOptions::rank`] | `RANK`, else `SLURM_PROCID`, else `OMPI_COMM_WORLD_RANK` | assigned by the store |
//! | world size | [`InitOptions::world_size`] | `WORLD_SIZE`, else `SLURM_NTASKS`, else `OMPI_COMM_WORLD_SIZE` | error |
//! | local rank (a hint) | [`InitOptions::local_rank`] | `LOCAL_RANK`, `SLURM_LOCALID`, `OMPI_COMM_WORLD_LOCAL_RANK` | — |
//! | local size (a hint) | — | `LOCAL_WORLD_SIZE`, `OMPI_COMM_WORLD_LOCAL_SIZE` | — |
//! | node rank | [`InitOptions::node_rank`] | `NODE_RANK`, `SLURM_NODEID` | — |
//! | timeout | [`InitOptions::timeout`] | `FERROCOMM_TIMEOUT` (seconds, may be fractional) | 300 s |
//! | log interval | [`InitOptions::log_interval`] | `FERROCOMM_LOG_INTERVAL` (seconds) | 10 s |
//! | job id | [`InitOptions::job_id`] | `FERROCOMM_JOB_ID`, else `TORCHELASTIC_RUN_ID` | `default` |
//! | host identity | [`InitOptions::host_id`] | `FERROCOMM_HOST_ID` | [`host::host_id`] |
//! | store hosted elsewhere | [`InitOptions::store_external`] | `FERROCOMM_STORE_EXTERNAL=1` | no |
//! | torchrun's store | — | `TORCHELASTIC_USE_AGENT_STORE=True` (env:// only; `FERROCOMM_STORE_EXTERNAL` wins) | no: see [`Plan::torch_agent_store`] |
//! | job secret | [`InitOptions::secret`] | `FERROCOMM_SECRET` | none: connections are not authenticated (see [`crate::auth`]) |
//! | transport listen address | [`InitOptions::bind_addr`] | `FERROCOMM_SOCKET_IFADDR` | the interface that routes towards the master (loopback for a loopback master) |
//!
//! The process that hosts the store listens on the master address itself, not on every
//! interface (a master host name that resolves to loopback only on its own machine is the
//! exception, logged), caps its connections (`FERROCOMM_STORE_MAX_CLIENTS`) and, with a
//! secret, drops connections that do not authenticate within `FERROCOMM_HANDSHAKE_TIMEOUT`.
//!
//! The rank variables are read as families: torchrun's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `NODE_RANK`) when `RANK` or `WORLD_SIZE` is set, else Slurm's
//! (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NODEID`) when `SLURM_PROCID` or
//! `SLURM_NTASKS` is set, else Open MPI's (`OMPI_COMM_WORLD_RANK`, `_SIZE`, `_LOCAL_RANK`,
//! `_LOCAL_SIZE`). They apply to every init method (a launcher sets them, the URL names the
//! store). Under `srun` or `mpirun` the scheduler gives the ranks but not a store:
//! `env://` still needs `MASTER_ADDR` and `MASTER_PORT` (e.g. the first host of the
//! allocation and a free port), or use `tcp://` or `file://`. A set but empty variable counts
//! as unset; a malformed one is an [`Error::Config`] naming it.
//!
//! # Joining ([`Plan::join`])
//!
//! 1. **Store.** `file://PATH` opens a [`FileStore`]. For `tcp://` and `env://` the store lives
//!    at the master address: rank 0 hosts a [`TcpStoreServer`] there (unless
//!    `FERROCOMM_STORE_EXTERNAL=1`: the launcher `ferrorun` hosts it); when ranks are still
//!    to be assigned, a process whose master address belongs to its machine tries to bind the
//!    port and hosts if it can (port in use: someone else hosts; it is a client). When rank 0
//!    finds the port in use and a ferrocomm store answers there, it joins that store as a
//!    client, so that the next steps say what is wrong (another job's store, or rank 0
//!    claimed twice); otherwise it fails saying the port is in use. Every process connects
//!    as a client, retrying until the server is up, except that a master host name that
//!    does not resolve fails every rank within a few seconds ([`tcp_store::RESOLVE_GRACE`]).
//!    The hosting process keeps the server alive in its [`Bootstrap`]: it must outlive the
//!    job's use of the store.
//! 2. **Job check.** A `compare_set` of [`JOB_KEY`] to `job_id=ID world_size=N`: a process
//!    that reaches the store of another job (other id or world size) fails at once with
//!    [`Error::JobMismatch`]. The store address is the job's identity: two jobs on one host
//!    use two ports and never mix. Everything else lives under the prefix `job/<job_id>/`.
//! 3. **Rank.** A given rank is claimed with a `compare_set` on `claim/<rank>`: a second
//!    process with the same rank fails with [`Error::Config`]. Without a rank, each process
//!    takes an arrival ticket (`add`), registers (node rank, host id, local rank, pid), and
//!    the first arrival, once all `world_size` registered, sorts them by (node rank, host id,
//!    local rank, pid) and publishes the order: node 0's processes get the lowest ranks, and
//!    nodes may run different numbers of processes.
//! 4. **Peers.** Each rank publishes its [`PeerInfo`] (host identity, hostname, pid and the
//!    transport addresses given to `join`); rank 0 gathers them into one table that every
//!    rank reads. Local rank and local size are derived from host identity (rank order among
//!    the ranks of one host), never taken from `LOCAL_RANK` (a disagreeing `LOCAL_RANK` is
//!    logged).
//!
//! Waiting never hangs silently: waits run in slices of at most a second; every log interval
//! a `tracing::warn!` says which ranks are missing (or how many processes have joined while
//! ranks are unassigned), and at the timeout [`Error::Timeout`] names them, the store and the
//! setting that raises the limit.
//!
//! # A rank that dies during `init`
//!
//! Once its rank is settled, each process arms a last will on the TCP store
//! ([`TcpStore::last_will`]): should its process die (or its `init` fail) before the job is
//! set up, its store connection closes and the store records under [`DEPARTED_KEY`] which
//! rank left (rank, pid, host). A process that fails with an error writes the error there
//! itself. Every waiting rank checks that key between its one-second wait slices and fails
//! at once with [`Error::PeerLost`] naming the rank, whatever host it ran on; the will is
//! withdrawn when `init` completes ([`Bootstrap::finish_init`]). The process hosting the
//! store, when it gives up, closes the store saying why
//! ([`TcpStoreServer::close_with`]), and the others report that reason. Ranks on one host
//! also watch each other's pids while they attach shared memory.

pub mod file_store;
pub mod host;
pub mod protocol;
pub mod store;
pub mod tcp_store;
pub mod torch_store;
pub mod torch_wire;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use file_store::FileStore;
pub use host::{host_id, hostname};
pub use store::{PrefixStore, Store};
pub use tcp_store::{LastWill, ServerConfig, TcpStore, TcpStoreServer};
pub use torch_store::TorchStore;

use crate::auth::Secret;
use crate::error::{Error, Result};

/// Default time to wait for the other processes of a job.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default interval between "still waiting" log lines.
pub const DEFAULT_LOG_INTERVAL: Duration = tcp_store::DEFAULT_LOG_INTERVAL;
/// The un-prefixed store key that records which job a store serves.
pub const JOB_KEY: &str = "ferrocomm/job";
/// The key (under the job's prefix) where the first rank to leave during `init` is recorded
/// (a JSON [`Departure`]).
pub const DEPARTED_KEY: &str = "departed";
/// How often a waiting rank looks for a departed rank.
const DEPARTURE_POLL: Duration = Duration::from_secs(1);

const ACCEPTED_URLS: &str = "accepted: tcp://HOST:PORT (IPv6: tcp://[ADDR]:PORT), env:// (MASTER_ADDR, \
     MASTER_PORT, RANK, WORLD_SIZE from the environment), file:///ABSOLUTE/PATH (a file on a file \
     system shared by all processes)";

/// How the processes of a job find their store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitMethod {
    /// `tcp://HOST:PORT`: the store is at this address (hosted by rank 0 unless external).
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// `env://`: the store is at `MASTER_ADDR:MASTER_PORT`.
    Env,
    /// `file:///path`: a [`FileStore`] at this absolute path.
    File(PathBuf),
}

fn fmt_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl std::fmt::Display for InitMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitMethod::Tcp { host, port } => write!(f, "tcp://{}", fmt_host_port(host, *port)),
            InitMethod::Env => write!(f, "env://"),
            InitMethod::File(p) => write!(f, "file://{}", p.display()),
        }
    }
}

/// Splits `HOST:PORT` or `[IPV6]:PORT`.
fn split_host_port(s: &str) -> std::result::Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, rest) = rest
            .split_once(']')
            .ok_or("an IPv6 address needs a closing ']'")?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{host:?} in brackets is not an IPv6 address"));
        }
        let port = rest
            .strip_prefix(':')
            .ok_or("the port is missing after ']'")?;
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or("the port is missing")?;
        if host.contains(':') {
            return Err(
                "an IPv6 address must be written in brackets, e.g. tcp://[::1]:29500".into(),
            );
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("the host is missing".into());
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || "/?#@".contains(c))
    {
        return Err(format!("{host:?} is not a host name or address"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number (1 to 65535)"))?;
    if port == 0 {
        return Err("port 0 cannot be reached by other processes; give a fixed port".into());
    }
    Ok((host.to_owned(), port))
}

impl InitMethod {
    /// Parses `tcp://HOST:PORT` (`tcp://[::1]:PORT` for IPv6), `env://` or
    /// `file:///absolute/path`. Anything else is an [`Error::Config`] saying what is accepted.
    pub fn parse(url: &str) -> Result<InitMethod> {
        let bad = |why: &str| Error::config("init_method", url, format!("{why}; {ACCEPTED_URLS}"));
        if let Some(rest) = url.strip_prefix("tcp://") {
            let (host, port) = split_host_port(rest).map_err(|why| bad(&why))?;
            Ok(InitMethod::Tcp { host, port })
        } else if url == "env://" {
            Ok(InitMethod::Env)
        } else if url.starts_with("env:") {
            Err(bad("env:// takes nothing after the scheme"))
        } else if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad(
                    "file:// needs an absolute path, e.g. file:///shared/job1 (three slashes)",
                ));
            }
            if rest.ends_with('/') {
                return Err(bad("the path names a directory; name a file in it"));
            }
            Ok(InitMethod::File(PathBuf::from(rest)))
        } else {
            Err(bad("unknown scheme"))
        }
    }
}

/// What the caller says about this process; every setting is optional and falls back to the
/// environment and then to a default (see the [module docs](self)).
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    init_method: Option<String>,
    rank: Option<usize>,
    world_size: Option<usize>,
    timeout: Option<Duration>,
    job_id: Option<String>,
    local_rank: Option<usize>,
    node_rank: Option<usize>,
    host_id: Option<String>,
    store_external: Option<bool>,
    log_interval: Option<Duration>,
    secret: Option<Secret>,
    bind_addr: Option<IpAddr>,
}

/// Reads one environment variable: `None` when unset or blank.
type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

fn env_str(env: EnvLookup<'_>, name: &str) -> Option<String> {
    env(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn env_usize(env: EnvLookup<'_>, name: &str) -> Result<Option<usize>> {
    env_str(env, name)
        .map(|v| {
            v.parse::<usize>()
                .map_err(|_| Error::config(name, &v, "expected a non-negative integer"))
        })
        .transpose()
}

fn parse_secs(name: &str, v: &str) -> Result<Duration> {
    let secs: f64 = v
        .parse()
        .map_err(|_| Error::config(name, v, "expected a number of seconds, e.g. 300 or 0.5"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(Error::config(
            name,
            v,
            "expected a positive number of seconds",
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| Error::config(name, v, "too large"))
}

fn env_secs(env: EnvLookup<'_>, name: &str) -> Result<Option<Duration>> {
    env_str(env, name).map(|v| parse_secs(name, &v)).transpose()
}

fn env_bool(env: EnvLookup<'_>, name: &str) -> Result<Option<bool>> {
    env_str(env, name)
        .map(|v| match v.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(Error::config(
                name,
                &v,
                "expected 1 or 0 (true/false, yes/no)",
            )),
        })
        .transpose()
}

/// One launcher's names for the rank variables.
struct Family {
    rank: &'static str,
    world: &'static str,
    local_rank: &'static str,
    local_size: Option<&'static str>,
    node_rank: Option<&'static str>,
}

const FAMILIES: [Family; 3] = [
    Family {
        rank: "RANK",
        world: "WORLD_SIZE",
        local_rank: "LOCAL_RANK",
        local_size: Some("LOCAL_WORLD_SIZE"),
        node_rank: Some("NODE_RANK"),
    },
    Family {
        rank: "SLURM_PROCID",
        world: "SLURM_NTASKS",
        local_rank: "SLURM_LOCALID",
        local_size: None,
        node_rank: Some("SLURM_NODEID"),
    },
    Family {
        rank: "OMPI_COMM_WORLD_RANK",
        world: "OMPI_COMM_WORLD_SIZE",
        local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
        local_size: Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
        node_rank: None,
    },
];

/// The rank variables found in the environment, with the names they came from.
#[derive(Default)]
struct EnvRanks {
    rank: Option<(usize, &'static str)>,
    world: Option<(usize, &'static str)>,
    local_rank: Option<usize>,
    local_size: Option<usize>,
    node_rank: Option<usize>,
}

fn env_ranks(env: EnvLookup<'_>) -> Result<EnvRanks> {
    let family = FAMILIES
        .iter()
        .find(|f| env_str(env, f.rank).is_some() || env_str(env, f.world).is_some())
        .unwrap_or(&FAMILIES[0]);
    let opt = |name: Option<&'static str>| {
        name.map(|n| env_usize(env, n))
            .transpose()
            .map(Option::flatten)
    };
    Ok(EnvRanks {
        rank: env_usize(env, family.rank)?.map(|r| (r, family.rank)),
        world: env_usize(env, family.world)?.map(|w| (w, family.world)),
        local_rank: env_usize(env, family.local_rank)?,
        local_size: opt(family.local_size)?,
        node_rank: opt(family.node_rank)?,
    })
}

impl InitOptions {
    /// Options with nothing set: everything comes from the environment or defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// The init method URL (`tcp://HOST:PORT`, `env://`, `file:///path`).
    pub fn init_method(mut self, url: &str) -> Self {
        self.init_method = Some(url.to_owned());
        self
    }

    /// This process's rank (otherwise from the environment, else assigned by the store).
    pub fn rank(mut self, rank: usize) -> Self {
        self.rank = Some(rank);
        self
    }

    /// The number of processes in the job.
    pub fn world_size(mut self, world_size: usize) -> Self {
        self.world_size = Some(world_size);
        self
    }

    /// How long to wait for the other processes (and the store) before failing.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The job's name; every process of a job must use the same.
    pub fn job_id(mut self, job_id: &str) -> Self {
        self.job_id = Some(job_id.to_owned());
        self
    }

    /// A hint: this process's index among the processes of its node (used to order rank
    /// assignment; the real local rank is derived from host identity).
    pub fn local_rank(mut self, local_rank: usize) -> Self {
        self.local_rank = Some(local_rank);
        self
    }

    /// The index of this process's node (orders rank assignment: node 0 first).
    pub fn node_rank(mut self, node_rank: usize) -> Self {
        self.node_rank = Some(node_rank);
        self
    }

    /// Overrides this machine's identity (tests, or machines that share a hostname).
    pub fn host_id(mut self, host_id: &str) -> Self {
        self.host_id = Some(host_id.to_owned());
        self
    }

    /// Whether the store is hosted by someone else (the launcher): then no rank hosts it.
    pub fn store_external(mut self, external: bool) -> Self {
        self.store_external = Some(external);
        self
    }

    /// How often a waiting process logs who is missing.
    pub fn log_interval(mut self, interval: Duration) -> Self {
        self.log_interval = Some(interval);
        self
    }

    /// The job secret that authenticates every connection (see [`crate::auth`]); otherwise
    /// `FERROCOMM_SECRET`, else none (unauthenticated). Every process of the job must use
    /// the same secret.
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// The local address the TCP transport listens on (otherwise `FERROCOMM_SOCKET_IFADDR`,
    /// else the interface that routes towards the master address; a loopback master gives
    /// loopback). The store, when this process hosts it, listens on the master address
    /// itself (see the module docs).
    pub fn bind_addr(mut self, ip: IpAddr) -> Self {
        self.bind_addr = Some(ip);
        self
    }

    /// Resolves the options against the process environment (see the module docs).
    pub fn resolve(&self) -> Result<Plan> {
        self.resolve_with(&|name| std::env::var(name).ok())
    }

    /// Resolves the options against `env` instead of the process environment: `env(name)`
    /// returns the variable's value, `None` when unset.
    pub fn resolve_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Plan> {
        let method = match &self.init_method {
            Some(url) => InitMethod::parse(url)?,
            None => match env_str(env, "FERROCOMM_INIT_METHOD") {
                Some(url) => InitMethod::parse(&url).map_err(|e| match e {
                    Error::Config { value, why, .. } => {
                        Error::config("FERROCOMM_INIT_METHOD", value, why)
                    }
                    other => other,
                })?,
                None => InitMethod::Env,
            },
        };
        let found = env_ranks(env)?;
        let (world_size, world_from) = match (self.world_size, found.world) {
            (Some(w), _) => (w, "the world_size option"),
            (None, Some((w, name))) => (w, name),
            (None, None) => {
                return Err(Error::config(
                    "world_size",
                    "",
                    "not given: pass InitOptions::world_size or set WORLD_SIZE (torchrun, ferrorun), \
                     or run under srun (SLURM_NTASKS) or mpirun (OMPI_COMM_WORLD_SIZE)",
                ));
            }
        };
        if world_size == 0 {
            return Err(Error::config(
                world_from,
                "0",
                "the world size must be at least 1",
            ));
        }
        let (rank, rank_from) = match (self.rank, found.rank) {
            (Some(r), _) => (Some(r), "the rank option"),
            (None, Some((r, name))) => (Some(r), name),
            (None, None) => (None, ""),
        };
        if let Some(r) = rank
            && r >= world_size
        {
            return Err(Error::invalid(
                "init",
                "rank",
                format!(
                    "rank {r} (from {rank_from}) is not below the world size {world_size} (from {world_from})"
                ),
            ));
        }
        let timeout = match self.timeout {
            Some(t) => t,
            None => env_secs(env, "FERROCOMM_TIMEOUT")?.unwrap_or(DEFAULT_TIMEOUT),
        };
        let log_interval = match self.log_interval {
            Some(t) => t,
            None => env_secs(env, "FERROCOMM_LOG_INTERVAL")?.unwrap_or(DEFAULT_LOG_INTERVAL),
        };
        let job_id = self
            .job_id
            .clone()
            .map(|j| j.trim().to_owned())
            .filter(|j| !j.is_empty())
            .or_else(|| env_str(env, "FERROCOMM_JOB_ID"))
            .or_else(|| env_str(env, "TORCHELASTIC_RUN_ID"))
            .unwrap_or_else(|| "default".to_owned());
        let store_external = match self.store_external {
            Some(b) => b,
            None => env_bool(env, "FERROCOMM_STORE_EXTERNAL")?.unwrap_or(false),
        };
        // Under torchrun, its agent hosts a PyTorch TCPStore at MASTER_ADDR:MASTER_PORT and
        // says so; ferrorun hosts ferrocomm's own store and sets FERROCOMM_STORE_EXTERNAL,
        // which wins.
        let torch_agent_store = (!store_external
            && matches!(method, InitMethod::Env)
            && env_str(env, "TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"))
        .then(|| {
            format!(
                "ferrocomm/attempt_{}",
                env_str(env, "TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into())
            )
        });
        let host_id = host::host_id_with(
            self.host_id
                .clone()
                .or_else(|| env_str(env, host::HOST_ID_ENV)),
        );
        let secret = self.secret.clone().or_else(|| Secret::from_lookup(env));
        let bind_addr = match self.bind_addr {
            Some(ip) => Some(ip),
            None => crate::config::parse_var(
                env,
                "FERROCOMM_SOCKET_IFADDR",
                "an IP address of this host",
                |v| v.parse::<IpAddr>().ok(),
            )?,
        };
        let (master_host, master_port) = match &method {
            InitMethod::Tcp { host, port } => (Some(host.clone()), Some(*port)),
            InitMethod::File(_) => (None, None),
            InitMethod::Env => {
                let need = "env:// needs MASTER_ADDR and MASTER_PORT (torchrun and ferrorun set them; under \
                            srun or mpirun set them yourself, e.g. to the first host of the allocation \
                            and a free port)";
                let host = env_str(env, "MASTER_ADDR")
                    .ok_or_else(|| Error::config("MASTER_ADDR", "", format!("not set: {need}")))?;
                let port = env_str(env, "MASTER_PORT")
                    .ok_or_else(|| Error::config("MASTER_PORT", "", format!("not set: {need}")))?;
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(&host)
                    .to_owned();
                if host
                    .chars()
                    .any(|c| c.is_whitespace() || "/?#@[]".contains(c))
                {
                    return Err(Error::config(
                        "MASTER_ADDR",
                        host,
                        "expected a host name or an IP address",
                    ));
                }
                let port = match port.parse::<u16>() {
                    Ok(p) if p != 0 => p,
                    _ => {
                        return Err(Error::config(
                            "MASTER_PORT",
                            port,
                            "expected a port number from 1 to 65535",
                        ));
                    }
                };
                (Some(host), Some(port))
            }
        };
        let store_addr = master_host
            .as_deref()
            .zip(master_port)
            .map(|(h, p)| fmt_host_port(h, p));
        Ok(Plan {
            method,
            rank,
            world_size,
            timeout,
            job_id,
            store_addr,
            master_host,
            master_port,
            local_rank: self.local_rank.or(found.local_rank),
            local_world_size: found.local_size,
            node_rank: self.node_rank.or(found.node_rank),
            host_id,
            store_external,
            log_interval,
            secret,
            bind_addr,
            torch_agent_store,
        })
    }
}

/// Everything [`InitOptions::resolve`] decided: what [`Plan::join`] will do.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The init method.
    pub method: InitMethod,
    /// This process's rank, `None` when the store assigns it.
    pub rank: Option<usize>,
    /// The number of processes in the job.
    pub world_size: usize,
    /// How long to wait for the store and the other processes.
    pub timeout: Duration,
    /// The job's name.
    pub job_id: String,
    /// `HOST:PORT` of the TCP store (`tcp://`, `env://`), `None` for `file://`.
    pub store_addr: Option<String>,
    /// The master host (IPv6 without brackets), `None` for `file://`.
    pub master_host: Option<String>,
    /// The master port, `None` for `file://`.
    pub master_port: Option<u16>,
    /// The local rank the environment claims (a hint, checked against host identity).
    pub local_rank: Option<usize>,
    /// The local size the environment claims (a hint, checked against host identity).
    pub local_world_size: Option<usize>,
    /// This node's index, when known (orders rank assignment).
    pub node_rank: Option<usize>,
    /// This machine's identity (see [`host::host_id`]).
    pub host_id: String,
    /// Whether someone other than rank 0 hosts the TCP store.
    pub store_external: bool,
    /// How often waits log who is missing.
    pub log_interval: Duration,
    /// The job secret (`None`: connections are not authenticated).
    pub secret: Option<Secret>,
    /// Under torchrun (`TORCHELASTIC_USE_AGENT_STORE=True`, env://, and no
    /// `FERROCOMM_STORE_EXTERNAL`): the key prefix (`ferrocomm/attempt_<restart count>`) under
    /// which this job's keys live in the agent's PyTorch `TCPStore`, which every rank joins
    /// as a client ([`TorchStore`]). `None`: ferrocomm's own store.
    pub torch_agent_store: Option<String>,
    /// The local address to listen on, when the user named one.
    pub bind_addr: Option<IpAddr>,
}

/// What a rank tells its peers about itself.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PeerInfo {
    /// The rank.
    pub rank: usize,
    /// Its machine's identity (equal for ranks that can share memory).
    pub host_id: String,
    /// Its machine's hostname (for messages).
    pub hostname: String,
    /// Its process id.
    pub pid: u32,
    /// Transport addresses, opaque here: e.g. `"tcp" -> "10.0.0.7:40123"`.
    pub addrs: BTreeMap<String, String>,
}

/// The result of a successful [`Plan::join`]: this process's place in the job.
pub struct Bootstrap {
    /// This process's rank.
    pub rank: usize,
    /// The number of processes in the job.
    pub world_size: usize,
    /// This process's index among the ranks of its host (in rank order).
    pub local_rank: usize,
    /// The number of ranks on this host.
    pub local_size: usize,
    /// The index of this host among the job's distinct hosts, in order of their lowest rank.
    pub node_index: usize,
    /// Every rank's information, indexed by rank (this one included).
    pub peers: Vec<PeerInfo>,
    /// The job's store, already prefixed with the job (`job/<job_id>/`).
    pub store: Arc<dyn Store>,
    /// The job's name.
    pub job_id: String,
    /// The timeout the job was started with.
    pub timeout: Duration,
    /// The store server, when this process hosts it: dropped with the bootstrap.
    server: Option<TcpStoreServer>,
    /// This rank's last will on the store, armed until `init` completes.
    will: Option<LastWill>,
}

/// Which rank left during `init`, and why: the value of [`DEPARTED_KEY`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Departure {
    /// The rank that left.
    pub rank: usize,
    /// Its process id.
    pub pid: u32,
    /// Its hostname.
    pub hostname: String,
    /// What happened to it.
    pub why: String,
}

impl Departure {
    fn of_me(rank: usize, why: String) -> Departure {
        Departure {
            rank,
            pid: std::process::id(),
            hostname: hostname(),
            why,
        }
    }

    /// The error a rank (`me`, when its rank is known) reports about this departure.
    pub fn error(&self, me: Option<usize>, during: &str) -> Error {
        let detail = format!(
            "rank {} (pid {} on {}) left during init: {}; the job cannot be set up without it \
             (restart the job)",
            self.rank, self.pid, self.hostname, self.why
        );
        match me {
            Some(rank) => Error::PeerLost {
                rank,
                peer: self.rank,
                op: format!("init ({during})"),
                detail,
            },
            None => Error::Aborted(format!("init ({during}): {detail}")),
        }
    }
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("local_size", &self.local_size)
            .field("node_index", &self.node_index)
            .field("store", &self.store.describe())
            .field("job_id", &self.job_id)
            .field("hosts_store", &self.server.is_some())
            .finish_non_exhaustive()
    }
}

impl Bootstrap {
    /// Whether this process hosts the job's TCP store. It then has to stay alive (keep this
    /// value) while any rank still uses the store.
    pub fn hosts_store(&self) -> bool {
        self.server.is_some()
    }

    /// This rank's own entry of [`peers`](Self::peers).
    pub fn me(&self) -> &PeerInfo {
        &self.peers[self.rank]
    }

    /// Says that `init` completed on this rank: withdraws its last will, so that its exit
    /// from now on is not reported as a departure during `init`.
    pub fn finish_init(&mut self) {
        if let Some(w) = self.will.take() {
            finish_will(self.rank, w);
        }
    }

    /// Takes this rank's last will out of the bootstrap (to withdraw it with
    /// [`finish_will`] once `init` has completed; dropping it reports a departure).
    pub fn take_will(&mut self) -> Option<LastWill> {
        self.will.take()
    }

    /// Gives up `init` on this rank after `err`: records the departure (with `err`) for the
    /// other ranks and, when this process hosts the store, closes it saying why.
    pub fn abandon(self, err: &Error) {
        let d = Departure::of_me(self.rank, format!("it failed: {err}"));
        if let Ok(v) = serde_json::to_vec(&d) {
            let _ = self.store.compare_set(DEPARTED_KEY, None, &v);
        }
        if let Some(server) = self.server {
            server.close_with(&format!(
                "rank {} (pid {} on {}), which hosts the store, gave up: {err}",
                self.rank, d.pid, d.hostname
            ));
        }
    }
}

/// Withdraws the last will of `rank` (see [`Bootstrap::finish_init`]).
pub fn finish_will(rank: usize, will: LastWill) {
    if let Err(e) = will.disarm() {
        tracing::debug!("rank {rank}: withdrawing the last will: {e}");
    }
}

/// Formats ranks compactly: `0-3, 7, 9-10`, at most 20 runs.
fn fmt_ranks(ranks: &[usize]) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &r in ranks {
        match runs.last_mut() {
            Some((_, hi)) if *hi + 1 == r => *hi = r,
            _ => runs.push((r, r)),
        }
    }
    let mut out: Vec<String> = runs
        .iter()
        .take(20)
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect();
    if runs.len() > 20 {
        out.push("...".into());
    }
    out.join(", ")
}

/// The job's single deadline, and waits that log while they last.
struct Waiting {
    start: Instant,
    timeout: Duration,
    interval: Duration,
    store: String,
    /// This process's rank once settled.
    me: Option<usize>,
}

impl Waiting {
    fn remaining(&self) -> Duration {
        self.timeout.saturating_sub(self.start.elapsed())
    }

    fn expired(&self, what: &str, status: &str) -> Error {
        Error::Timeout {
            op: format!("rendezvous ({what})"),
            waited: self.start.elapsed(),
            detail: format!(
                "{status}; store {}; FERROCOMM_TIMEOUT=<seconds> (or InitOptions::timeout) raises the limit of {:?}",
                self.store, self.timeout
            ),
        }
    }

    /// The store failed while `what` was being waited for. Every process of a job has the
    /// same timeout, so the process hosting the store often gives up (and takes the store
    /// with it) a moment before the others: at the deadline that is still a timeout, and
    /// before it the error says what the wait had seen last (who was missing).
    fn store_failed(&self, what: &str, err: Error, last: Option<&str>) -> Error {
        let last = last.unwrap_or("no status seen yet");
        if self.remaining().is_zero() {
            return self.expired(
                what,
                &format!("{last}; then the store stopped answering ({err})"),
            );
        }
        match err {
            Error::Io { context, source } => Error::Io {
                context: format!("{context}; rendezvous ({what}) last saw: {last}"),
                source,
            },
            other => other,
        }
    }

    /// Fails when a rank has left the job during `init` (see [`DEPARTED_KEY`]).
    fn check_departed(&self, store: &dyn Store, what: &str) -> Result<()> {
        match store.try_get(DEPARTED_KEY)? {
            None => Ok(()),
            Some(v) => {
                let d: Departure = from_json(store, DEPARTED_KEY, &v)?;
                Err(d.error(self.me, &format!("rendezvous: {what}")))
            }
        }
    }

    /// Waits for `keys` in slices of at most [`DEPARTURE_POLL`], failing when a rank has
    /// departed; every log interval logs `status()`; at the deadline fails with it.
    fn wait(
        &self,
        store: &dyn Store,
        what: &str,
        keys: &[String],
        mut status: impl FnMut() -> Result<String>,
    ) -> Result<()> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut last: Option<String> = None;
        let mut logged = Instant::now();
        loop {
            let slice = self.remaining().min(self.interval).min(DEPARTURE_POLL);
            match store.wait(&refs, slice) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(self.store_failed(what, e, last.as_deref())),
            }
            if let Err(e) = self.check_departed(store, what) {
                return Err(match e {
                    Error::PeerLost { .. } | Error::Aborted(_) | Error::PeerMisbehaved { .. } => e,
                    e => self.store_failed(what, e, last.as_deref()),
                });
            }
            let expired = self.remaining().is_zero();
            if !expired && logged.elapsed() < self.interval {
                continue;
            }
            logged = Instant::now();
            let s = match status() {
                Ok(s) => s,
                Err(e) => return Err(self.store_failed(what, e, last.as_deref())),
            };
            if expired {
                return Err(self.expired(what, &s));
            }
            tracing::warn!(
                "rendezvous ({what}): still waiting after {:.0?} of {:?}: {s} (store {})",
                self.start.elapsed(),
                self.timeout,
                self.store
            );
            last = Some(s);
        }
    }
}

/// What [`Plan::open_store`] opened: the store, the server if this process hosts it, and
/// the TCP client (for the last will) if the store is a TCP store.
type OpenStore = (
    Arc<dyn Store>,
    Option<TcpStoreServer>,
    Option<Arc<TcpStore>>,
);

/// Whether this process hosts the store.
enum Hosting {
    /// It does.
    Server(TcpStoreServer),
    /// Someone else does (or will).
    Client,
    /// Rank 0 must host it but the port is in use; the error to report if no store answers.
    InUse(Error),
}

/// A process's registration for rank assignment.
#[derive(serde::Serialize, serde::Deserialize)]
struct Registration {
    ticket: i64,
    node_rank: Option<usize>,
    host_id: String,
    local_rank: Option<usize>,
    pid: u32,
}

/// The address a store hosted for master `host` (resolved to the local address `ip`)
/// listens on: the master address itself, the one address its clients dial, so the store is
/// not exposed on other interfaces. A host *name* that resolves to loopback on this machine
/// only (Debian maps the machine's own name to 127.0.1.1) while it is not `localhost` is the
/// exception: other machines reach this one under its real address, so the store listens on
/// every interface and says so in the log.
pub(crate) fn store_bind_ip(host: &str, ip: IpAddr) -> IpAddr {
    let literal = host.parse::<IpAddr>().is_ok() || host.eq_ignore_ascii_case("localhost");
    if literal || !ip.is_loopback() {
        return ip;
    }
    let any = match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    tracing::info!(
        "the master host {host} resolves to {ip} (loopback) on this machine only: the store \
         listens on {any} so that other machines reach it; give the master as an IP address \
         to listen on that address alone"
    );
    any
}

fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || TcpListener::bind((ip, 0)).is_ok()
}

impl Plan {
    /// The master host resolved to an address (to pick the local interface facing it), `None`
    /// for `file://` or when the name does not resolve.
    pub fn master_ip(&self) -> Option<IpAddr> {
        let host = self.master_host.as_deref()?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Some(ip);
        }
        (host, self.master_port.unwrap_or(0))
            .to_socket_addrs()
            .ok()?
            .next()
            .map(|sa| sa.ip())
    }

    fn names(&self) -> (&'static str, &'static str) {
        match self.method {
            InitMethod::Env => ("MASTER_ADDR", "MASTER_PORT"),
            _ => ("init_method host", "init_method port"),
        }
    }

    /// Hosts the store on this machine if the master address is one of its own. `required`
    /// (rank 0): failing to is an error, except that a port in use is [`Hosting::InUse`];
    /// otherwise [`Hosting::Client`] means "be a client".
    fn host_store(&self, host: &str, port: u16, required: bool) -> Result<Hosting> {
        let (addr_name, port_name) = self.names();
        let ips: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match (host, port).to_socket_addrs() {
                Ok(it) => it.map(|sa| sa.ip()).collect(),
                Err(e) if required => {
                    return Err(Error::config(
                        addr_name,
                        host,
                        format!("cannot resolve the master host: {e}"),
                    ));
                }
                Err(e) => {
                    tracing::debug!("cannot resolve {host} ({e}); joining the store as a client");
                    return Ok(Hosting::Client);
                }
            },
        };
        // Prefer an address other machines can reach.
        let local = ips
            .iter()
            .copied()
            .find(|ip| !ip.is_loopback() && is_local(*ip))
            .or_else(|| ips.iter().copied().find(|ip| is_local(*ip)));
        let Some(ip) = local else {
            if required {
                return Err(Error::config(
                    addr_name,
                    host,
                    format!(
                        "rank 0 hosts the store at the master address, but {host} ({ips:?}) is not an \
                         address of this machine; point it at rank 0's machine, or let the launcher \
                         host the store and set FERROCOMM_STORE_EXTERNAL=1"
                    ),
                ));
            }
            return Ok(Hosting::Client);
        };
        let bind_ip = store_bind_ip(host, ip);
        match TcpListener::bind((bind_ip, port)) {
            Ok(l) => {
                tracing::info!(
                    "hosting the store of job {} at {host}:{port} (listening on {bind_ip})",
                    self.job_id
                );
                // Every rank holds at least one connection, more while several of its threads
                // use the store at once: scale the default limit for very large jobs.
                let mut config = ServerConfig::from_env()?;
                // (and one more for its last will during init).
                let need = self.world_size.saturating_mul(3).saturating_add(64);
                if crate::config::process_env("FERROCOMM_STORE_MAX_CLIENTS").is_none() {
                    config.max_clients = config.max_clients.max(need);
                }
                // The ranks of a big host connect at once when the job starts.
                if crate::config::process_env("FERROCOMM_STORE_MAX_PENDING").is_none() {
                    config.max_pending_per_client = config.max_pending_per_client.max(need);
                }
                config.secret = self.secret.clone();
                Ok(Hosting::Server(TcpStoreServer::from_listener(l, config)?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && !required => {
                tracing::debug!(
                    "port {port} is in use: another process hosts the store; joining as a client"
                );
                Ok(Hosting::Client)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                Ok(Hosting::InUse(Error::config(
                    port_name,
                    port.to_string(),
                    format!(
                        "rank 0 hosts the store, but port {port} on this machine is in use: by another job's \
                     store (every job needs its own port), by a stale process, or by a launcher hosting \
                     the store (then set FERROCOMM_STORE_EXTERNAL=1)"
                    ),
                )))
            }
            Err(e) => Err(Error::io(
                format!("binding the store server to {bind_ip}:{port}"),
                e,
            )),
        }
    }

    /// Resolves the master host name, retrying for at most [`tcp_store::RESOLVE_GRACE`]: a
    /// name that does not resolve fails every rank at once, naming it.
    fn check_resolves(&self, host: &str, port: u16) -> Result<()> {
        if host.parse::<IpAddr>().is_ok() {
            return Ok(());
        }
        let start = Instant::now();
        loop {
            let err = match (host, port).to_socket_addrs().map(|mut it| it.next()) {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => "it resolves to no address".to_owned(),
                Err(e) => e.to_string(),
            };
            if start.elapsed() >= tcp_store::RESOLVE_GRACE.min(self.timeout) {
                return Err(Error::config(
                    self.names().0,
                    host,
                    format!(
                        "the master host name {host:?} does not resolve on this machine ({err}; \
                         tried for {:.0?}); every rank must reach rank 0's machine under this \
                         name: check the name, this machine's DNS or /etc/hosts, or give an IP \
                         address",
                        start.elapsed()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Rank 0 found the store port in use (`in_use`): if a ferrocomm store answers there,
    /// this process joins it as a client, so that the job check and the rank claim say what
    /// is wrong (another job, or rank 0 claimed twice); otherwise `in_use` is the error.
    fn probe_in_use(&self, addr: &str, in_use: Error, waiting: &Waiting) -> Result<TcpStore> {
        const PROBE: Duration = Duration::from_secs(5);
        let limit = waiting.remaining().min(PROBE);
        let probe =
            TcpStore::connect_secure(addr, limit, PROBE, self.secret.clone()).and_then(|mut c| {
                c.set_request_timeout(limit);
                c.try_get(JOB_KEY).map(|_| c)
            });
        match probe {
            Ok(c) => {
                tracing::info!(
                    "rank 0: port {addr} is in use by a store that answers; joining it as a \
                     client to learn whose it is"
                );
                Ok(c)
            }
            Err(Error::JobMismatch { store, detail }) => Err(Error::JobMismatch { store, detail }),
            Err(e) => Err(match in_use {
                Error::Config { name, value, why } => Error::Config {
                    name,
                    value,
                    why: format!("{why} (no ferrocomm store answers there: {e})"),
                },
                other => other,
            }),
        }
    }

    fn open_store(&self, waiting: &Waiting) -> Result<OpenStore> {
        match &self.method {
            InitMethod::File(path) => Ok((Arc::new(FileStore::open(path)?), None, None)),
            InitMethod::Tcp { .. } | InitMethod::Env => {
                let (Some(host), Some(port), Some(addr)) =
                    (&self.master_host, self.master_port, &self.store_addr)
                else {
                    return Err(Error::config(
                        self.names().0,
                        "",
                        "no master address: tcp:// and env:// need one",
                    ));
                };
                if let Some(prefix) = &self.torch_agent_store {
                    if self.secret.is_some() {
                        tracing::warn!(
                            "joining torchrun's store at {addr}: PyTorch's TCPStore has no \
                             authentication, so the job secret is not checked by the store \
                             (the transports still check it)"
                        );
                    }
                    let client = TorchStore::connect(
                        addr,
                        waiting.remaining(),
                        self.timeout,
                        self.log_interval,
                    )?;
                    let store: Arc<dyn Store> =
                        Arc::new(PrefixStore::new(prefix.clone(), Arc::new(client)));
                    return Ok((store, None, None));
                }
                let hosting = match (self.store_external, self.rank) {
                    (true, _) | (false, Some(1..)) => Hosting::Client,
                    (false, Some(0)) => self.host_store(host, port, true)?,
                    (false, None) => self.host_store(host, port, false)?,
                };
                let (server, mut client) = match hosting {
                    Hosting::Server(s) => (Some(s), None),
                    Hosting::Client => (None, None),
                    Hosting::InUse(e) => (None, Some(self.probe_in_use(addr, e, waiting)?)),
                };
                if server.is_none() && client.is_none() {
                    self.check_resolves(host, port)?;
                }
                let mut client = match client.take() {
                    Some(c) => c,
                    None => TcpStore::connect_secure(
                        addr,
                        waiting.remaining(),
                        self.log_interval,
                        self.secret.clone(),
                    )?,
                };
                client.set_request_timeout(self.timeout);
                let client = Arc::new(client);
                Ok((client.clone(), server, Some(client)))
            }
        }
    }

    fn check_job(&self, raw: &dyn Store) -> Result<()> {
        let ours = format!("job_id={} world_size={}", self.job_id, self.world_size);
        let got = raw.compare_set(JOB_KEY, None, ours.as_bytes())?;
        if got != ours.as_bytes() {
            return Err(Error::JobMismatch {
                store: raw.describe(),
                detail: format!(
                    "this process belongs to {ours}, but the store serves {}. Every job needs its own \
                     store address: check that MASTER_PORT (or the tcp:// port, or the file:// path) is \
                     not used by another job, and that all processes of this job agree on WORLD_SIZE \
                     and FERROCOMM_JOB_ID (or TORCHELASTIC_RUN_ID)",
                    String::from_utf8_lossy(&got)
                ),
            });
        }
        Ok(())
    }

    fn claim_rank(&self, store: &dyn Store, rank: usize, me: &str) -> Result<()> {
        let got = store.compare_set(&format!("claim/{rank}"), None, me.as_bytes())?;
        if got != me.as_bytes() {
            return Err(Error::config(
                "rank",
                rank.to_string(),
                format!(
                    "rank {rank} is claimed twice: another process ({}) already holds rank {rank} \
                     of job {} at store {}, and this process ({me}) asks for it too; check that \
                     RANK (or SLURM_PROCID, OMPI_COMM_WORLD_RANK, the rank option) is unique per \
                     process and that no earlier run of this job still runs at this address \
                     (MASTER_PORT); a file:// store left from an earlier run must be deleted",
                    String::from_utf8_lossy(&got),
                    self.job_id,
                    store.describe()
                ),
            ));
        }
        Ok(())
    }

    fn assign_rank(&self, store: &dyn Store, waiting: &Waiting) -> Result<usize> {
        let w = self.world_size;
        let ticket = store.add("arrivals", 1)?;
        if ticket < 1 || ticket as u64 > w as u64 {
            return Err(Error::config(
                "world_size",
                w.to_string(),
                format!(
                    "more than {w} processes joined job {} at store {} without a rank (this is arrival \
                     {ticket}); check that WORLD_SIZE matches the number of processes started, that no \
                     other run uses this store address, and that a file:// store is not left from an \
                     earlier run",
                    self.job_id,
                    store.describe()
                ),
            ));
        }
        let reg = Registration {
            ticket,
            node_rank: self.node_rank,
            host_id: self.host_id.clone(),
            local_rank: self.local_rank,
            pid: std::process::id(),
        };
        store.set(&format!("reg/{ticket}"), &to_json(&reg)?)?;
        let status = || -> Result<String> {
            let joined = store
                .try_get("arrivals")?
                .and_then(|v| String::from_utf8_lossy(&v).trim().parse::<u64>().ok())
                .unwrap_or(0);
            Ok(if joined >= w as u64 {
                format!(
                    "all {w} processes have joined; waiting for the first of them to publish the rank \
                     assignment (did it exit?)"
                )
            } else {
                format!("{joined} of {w} processes have joined; ranks are assigned once all have")
            })
        };
        let order: Vec<i64> = if ticket == 1 {
            let keys: Vec<String> = (1..=w).map(|t| format!("reg/{t}")).collect();
            waiting.wait(store, "rank assignment", &keys, status)?;
            let mut regs = Vec::with_capacity(w);
            for k in &keys {
                regs.push(from_json::<Registration>(
                    store,
                    k,
                    &store.get(k, waiting.remaining())?,
                )?);
            }
            regs.sort_by(|a, b| {
                (a.node_rank, &a.host_id, a.local_rank, a.pid, a.ticket).cmp(&(
                    b.node_rank,
                    &b.host_id,
                    b.local_rank,
                    b.pid,
                    b.ticket,
                ))
            });
            let order: Vec<i64> = regs.iter().map(|r| r.ticket).collect();
            store.set("assignment", &to_json(&order)?)?;
            order
        } else {
            waiting.wait(store, "rank assignment", &["assignment".to_owned()], status)?;
            from_json(
                store,
                "assignment",
                &store.get("assignment", waiting.remaining())?,
            )?
        };
        match order.iter().position(|&t| t == ticket) {
            Some(rank) if order.len() == w => Ok(rank),
            _ => Err(Error::misbehaved(
                store.describe(),
                format!("the rank assignment does not list arrival {ticket} among {w} processes"),
            )),
        }
    }

    fn exchange_peers(
        &self,
        store: &dyn Store,
        me: &PeerInfo,
        waiting: &Waiting,
    ) -> Result<Vec<PeerInfo>> {
        let w = self.world_size;
        store.set(&format!("peer/{}", me.rank), &to_json(me)?)?;
        let peer_keys: Vec<String> = (0..w).map(|r| format!("peer/{r}")).collect();
        let status = || -> Result<String> {
            let refs: Vec<&str> = peer_keys.iter().map(String::as_str).collect();
            let present = store.check(&refs)?;
            let missing: Vec<usize> = (0..w)
                .filter(|&r| !present.get(r).copied().unwrap_or(false))
                .collect();
            Ok(if missing.is_empty() {
                "all ranks have joined; waiting for rank 0 to publish the peer table (did rank 0 exit?)".to_owned()
            } else {
                format!(
                    "missing ranks: {} ({} of {w} have joined)",
                    fmt_ranks(&missing),
                    w - missing.len()
                )
            })
        };
        let peers: Vec<PeerInfo> = if me.rank == 0 {
            waiting.wait(store, "peer exchange", &peer_keys, status)?;
            let mut peers = Vec::with_capacity(w);
            for k in &peer_keys {
                peers.push(from_json::<PeerInfo>(
                    store,
                    k,
                    &store.get(k, waiting.remaining())?,
                )?);
            }
            store.set("peers", &to_json(&peers)?)?;
            peers
        } else {
            waiting.wait(store, "peer exchange", &["peers".to_owned()], status)?;
            from_json(store, "peers", &store.get("peers", waiting.remaining())?)?
        };
        let consistent = peers.len() == w && peers.iter().enumerate().all(|(r, p)| p.rank == r);
        if !consistent || peers[me.rank] != *me {
            return Err(Error::misbehaved(
                store.describe(),
                "the peer table does not match this job (wrong length, ranks out of order, or this \
                 rank's entry differs from what it published): it is probably left from an earlier \
                 run; use a fresh file:// path or a fresh store for every run",
            ));
        }
        Ok(peers)
    }

    /// Joins the job: opens (or hosts) the store, checks it serves this job, settles this
    /// process's rank, publishes `addrs` and this host's identity, and waits for every rank's
    /// (see the [module docs](self)). Fails after [`timeout`](Self::timeout) in all, naming
    /// who is missing.
    pub fn join(&self, addrs: BTreeMap<String, String>) -> Result<Bootstrap> {
        self.join_via(None, addrs)
    }

    /// Joins the job as [`join`](Self::join) does, but through `store`, a store someone
    /// else made (PyTorch's c10d store, handed over the C ABI as callbacks), instead of the
    /// one the init method names: nothing is hosted or opened, and the init method only
    /// picks the interface the transports listen on. `store` should be private to this
    /// job or group (a prefixed view); everything is written under `job/<job_id>/` in it.
    pub fn join_with_store(
        &self,
        store: Arc<dyn Store>,
        addrs: BTreeMap<String, String>,
    ) -> Result<Bootstrap> {
        self.join_via(Some(store), addrs)
    }

    fn join_via(
        &self,
        given: Option<Arc<dyn Store>>,
        addrs: BTreeMap<String, String>,
    ) -> Result<Bootstrap> {
        let w = self.world_size;
        if w == 0 {
            return Err(Error::invalid(
                "join",
                "world_size",
                "the world size must be at least 1",
            ));
        }
        if let Some(r) = self.rank
            && r >= w
        {
            return Err(Error::invalid(
                "join",
                "rank",
                format!("rank {r} is not below the world size {w}"),
            ));
        }
        let start = Instant::now();
        let mut waiting = Waiting {
            start,
            timeout: self.timeout,
            interval: self.log_interval.max(Duration::from_millis(10)),
            store: self
                .store_addr
                .clone()
                .unwrap_or_else(|| self.method.to_string()),
            me: None,
        };
        let (raw, server, tcp) = match given {
            Some(store) => (store, None, None),
            None => self.open_store(&waiting)?,
        };
        waiting.store = raw.describe();
        let prefix = format!("job/{}", self.job_id);
        let store: Arc<dyn Store> = Arc::new(PrefixStore::new(prefix.clone(), raw.clone()));
        let mut will = None;
        let joined = (|| -> Result<(usize, PeerInfo, Vec<PeerInfo>)> {
            self.check_job(&*raw)?;
            let rank = match self.rank {
                Some(r) => {
                    let nonce = getrandom::u64().unwrap_or(0);
                    let me = format!(
                        "pid {} on {} ({}, #{nonce:016x})",
                        std::process::id(),
                        hostname(),
                        self.host_id
                    );
                    self.claim_rank(&*store, r, &me)?;
                    r
                }
                None => self.assign_rank(&*store, &waiting)?,
            };
            waiting.me = Some(rank);
            if let Some(tcp) = &tcp {
                let d = Departure::of_me(
                    rank,
                    "its connection to the store closed before init completed: the process \
                     exited, crashed or was killed (see its log and exit status)"
                        .into(),
                );
                will = Some(tcp.last_will(&format!("{prefix}/{DEPARTED_KEY}"), &to_json(&d)?)?);
            }
            let me = PeerInfo {
                rank,
                host_id: self.host_id.clone(),
                hostname: hostname(),
                pid: std::process::id(),
                addrs,
            };
            let peers = self.exchange_peers(&*store, &me, &waiting)?;
            Ok((rank, me, peers))
        })();
        let (rank, me, peers) = match joined {
            Ok(v) => v,
            Err(e) => {
                // Tell the others at once (only once this rank is settled: a process refused
                // its rank must not disturb the job that holds it). A timeout is not news:
                // the others have the same deadline and say themselves who is missing.
                if let (Some(rank), Some(w)) = (waiting.me, will.take()) {
                    if e.is_timeout() {
                        finish_will(rank, w);
                    } else {
                        let d = Departure::of_me(rank, format!("it failed: {e}"));
                        if let Ok(v) = to_json(&d) {
                            let _ = store.compare_set(DEPARTED_KEY, None, &v);
                        }
                    }
                }
                if let Some(server) = server {
                    let who = waiting
                        .me
                        .map_or_else(|| "the process".to_owned(), |r| format!("rank {r}"));
                    server.close_with(&format!(
                        "{who} (pid {} on {}), which hosted it, gave up: {e}",
                        std::process::id(),
                        hostname()
                    ));
                }
                return Err(e);
            }
        };
        let local: Vec<usize> = (0..w).filter(|&r| peers[r].host_id == me.host_id).collect();
        let local_rank = local.iter().position(|&r| r == rank).unwrap_or(0);
        let local_size = local.len();
        let mut hosts: HashMap<&str, usize> = HashMap::new();
        for p in &peers {
            let n = hosts.len();
            hosts.entry(p.host_id.as_str()).or_insert(n);
        }
        let node_index = hosts.get(me.host_id.as_str()).copied().unwrap_or(0);
        if let Some(claimed) = self.local_rank
            && claimed != local_rank
        {
            tracing::warn!(
                "rank {rank}: LOCAL_RANK says {claimed}, but by host identity ({}) this is local rank \
                 {local_rank} of {local_size}; using {local_rank}",
                me.host_id
            );
        }
        if let Some(claimed) = self.local_world_size
            && claimed != local_size
        {
            tracing::warn!(
                "rank {rank}: LOCAL_WORLD_SIZE says {claimed}, but {local_size} ranks share this host \
                 ({}); using {local_size}",
                me.host_id
            );
        }
        tracing::debug!(
            "rank {rank} of {w} joined job {} (local {local_rank} of {local_size}, node {node_index})",
            self.job_id
        );
        Ok(Bootstrap {
            rank,
            world_size: w,
            local_rank,
            local_size,
            node_index,
            peers,
            store,
            job_id: self.job_id.clone(),
            timeout: self.timeout,
            server,
            will,
        })
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v)
        .map_err(|e| Error::invalid("join", "addrs", format!("cannot encode: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(store: &dyn Store, key: &str, v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| {
        Error::misbehaved(
            store.describe(),
            format!("bad value under key {key:?}: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn resolve(opts: &InitOptions, vars: &[(&str, &str)]) -> Result<Plan> {
        opts.resolve_with(&env_of(vars))
    }

    fn config_name(e: &Error) -> &str {
        match e {
            Error::Config { name, .. } => name,
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    #[test]
    fn parses_good_urls() {
        let cases = [
            (
                "tcp://10.0.0.1:29500",
                InitMethod::Tcp {
                    host: "10.0.0.1".into(),
                    port: 29500,
                },
            ),
            (
                "tcp://node1:5003",
                InitMethod::Tcp {
                    host: "node1".into(),
                    port: 5003,
                },
            ),
            (
                "tcp://[::1]:29500",
                InitMethod::Tcp {
                    host: "::1".into(),
                    port: 29500,
                },
            ),
            (
                "tcp://[fe80::1]:1",
                InitMethod::Tcp {
                    host: "fe80::1".into(),
                    port: 1,
                },
            ),
            ("env://", InitMethod::Env),
            (
                "file:///shared/job1",
                InitMethod::File("/shared/job1".into()),
            ),
        ];
        for (url, want) in cases {
            let got = InitMethod::parse(url).unwrap();
            assert_eq!(got, want, "{url}");
            assert_eq!(got.to_string(), url);
        }
    }

    #[test]
    fn refuses_bad_urls_saying_what_is_accepted() {
        for url in [
            "",
            "tcp://",
            "tcp://host",
            "tcp://host:",
            "tcp://:29500",
            "tcp://host:0",
            "tcp://host:65536",
            "tcp://host:port",
            "tcp://::1:29500",
            "tcp://[::1]29500",
            "tcp://[nothex]:1",
            "tcp://user@host:1",
            "tcp://host:1/path",
            "env:",
            "env://x",
            "file://relative/path",
            "file:///dir/",
            "http://host:80",
            "host:29500",
        ] {
            let e = InitMethod::parse(url).expect_err(url);
            assert_eq!(config_name(&e), "init_method", "{url}");
            let msg = e.to_string();
            assert!(
                msg.contains("tcp://HOST:PORT")
                    && msg.contains("env://")
                    && msg.contains("file:///"),
                "{msg}"
            );
        }
    }

    #[test]
    fn reads_torchrun_variables() {
        let p = resolve(
            &InitOptions::new(),
            &[
                ("RANK", "3"),
                ("WORLD_SIZE", "8"),
                ("LOCAL_RANK", "1"),
                ("LOCAL_WORLD_SIZE", "2"),
                ("NODE_RANK", "1"),
                ("MASTER_ADDR", "10.1.2.3"),
                ("MASTER_PORT", "29500"),
                // Slurm's are ignored when torchrun's are there.
                ("SLURM_PROCID", "0"),
                ("SLURM_NTASKS", "99"),
            ],
        )
        .unwrap();
        assert_eq!(p.method, InitMethod::Env);
        assert_eq!((p.rank, p.world_size), (Some(3), 8));
        assert_eq!(
            (p.local_rank, p.local_world_size, p.node_rank),
            (Some(1), Some(2), Some(1))
        );
        assert_eq!(p.store_addr.as_deref(), Some("10.1.2.3:29500"));
        assert_eq!(p.master_ip(), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(p.timeout, DEFAULT_TIMEOUT);
        assert_eq!(p.log_interval, DEFAULT_LOG_INTERVAL);
        assert_eq!(p.job_id, "default");
        assert!(!p.store_external);
    }

    #[test]
    fn under_torchrun_joins_the_agent_store_unless_ferrorun_hosts_one() {
        let base = [
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
        ];
        let p = resolve(&InitOptions::new(), &base).unwrap();
        assert_eq!(p.torch_agent_store, None);
        let mut torchrun = base.to_vec();
        torchrun.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        torchrun.push(("TORCHELASTIC_RESTART_COUNT", "2"));
        let p = resolve(&InitOptions::new(), &torchrun).unwrap();
        assert_eq!(p.torch_agent_store.as_deref(), Some("ferrocomm/attempt_2"));
        // ferrorun sets both: its own store (ferrocomm's protocol, authenticated) wins.
        let mut ferrorun = torchrun.clone();
        ferrorun.push(("FERROCOMM_STORE_EXTERNAL", "1"));
        let p = resolve(&InitOptions::new(), &ferrorun).unwrap();
        assert_eq!(p.torch_agent_store, None);
        // Only env:// names the agent's store.
        let p = resolve(
            &InitOptions::new().init_method("tcp://127.0.0.1:29400"),
            &torchrun,
        )
        .unwrap();
        assert_eq!(p.torch_agent_store, None);
    }

    #[test]
    fn reads_slurm_then_open_mpi_variables() {
        let master = [("MASTER_ADDR", "::1"), ("MASTER_PORT", "1234")];
        let slurm = [
            ("SLURM_PROCID", "4"),
            ("SLURM_NTASKS", "5"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "2"),
            ("OMPI_COMM_WORLD_RANK", "0"),
        ];
        let p = resolve(&InitOptions::new(), &[&master[..], &slurm[..]].concat()).unwrap();
        assert_eq!(
            (p.rank, p.world_size, p.local_rank, p.node_rank),
            (Some(4), 5, Some(1), Some(2))
        );
        assert_eq!(p.store_addr.as_deref(), Some("[::1]:1234"));
        assert_eq!(p.master_ip(), Some("::1".parse().unwrap()));

        let ompi = [
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ];
        let p = resolve(&InitOptions::new(), &[&master[..], &ompi[..]].concat()).unwrap();
        assert_eq!(
            (p.rank, p.world_size, p.local_rank, p.local_world_size),
            (Some(2), 4, Some(0), Some(2))
        );
        assert_eq!(p.node_rank, None);
    }

    #[test]
    fn options_override_the_environment() {
        let vars = [
            ("FERROCOMM_INIT_METHOD", "tcp://10.0.0.9:7000"),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("FERROCOMM_TIMEOUT", "2.5"),
            ("FERROCOMM_JOB_ID", "env-job"),
            ("TORCHELASTIC_RUN_ID", "elastic"),
            ("FERROCOMM_STORE_EXTERNAL", "1"),
            ("FERROCOMM_HOST_ID", "env-host"),
            ("FERROCOMM_LOG_INTERVAL", "0.25"),
        ];
        let p = resolve(&InitOptions::new(), &vars).unwrap();
        assert_eq!(
            p.method,
            InitMethod::Tcp {
                host: "10.0.0.9".into(),
                port: 7000
            }
        );
        assert_eq!((p.rank, p.world_size), (Some(1), 2));
        assert_eq!(p.timeout, Duration::from_millis(2500));
        assert_eq!(p.log_interval, Duration::from_millis(250));
        assert_eq!(p.job_id, "env-job");
        assert!(p.store_external);
        assert_eq!(p.host_id, "env-host");

        let opts = InitOptions::new()
            .init_method("file:///tmp/x")
            .rank(0)
            .world_size(3)
            .timeout(Duration::from_secs(7))
            .job_id("opt-job")
            .store_external(false)
            .host_id("opt-host")
            .node_rank(4)
            .local_rank(2);
        let p = resolve(&opts, &vars).unwrap();
        assert_eq!(p.method, InitMethod::File("/tmp/x".into()));
        assert_eq!((p.rank, p.world_size), (Some(0), 3));
        assert_eq!(p.timeout, Duration::from_secs(7));
        assert_eq!(p.job_id, "opt-job");
        assert!(!p.store_external);
        assert_eq!(p.host_id, "opt-host");
        assert_eq!((p.node_rank, p.local_rank), (Some(4), Some(2)));
        assert_eq!(p.store_addr, None);
        assert_eq!(p.master_ip(), None);

        let p = resolve(
            &InitOptions::new(),
            &[&vars[1..3], &[("TORCHELASTIC_RUN_ID", "elastic")][..]].concat(),
        );
        let p = p.map_err(|e| e.to_string()).unwrap_err();
        assert!(p.contains("MASTER_ADDR"), "env:// is the default: {p}");
        let p = resolve(
            &InitOptions::new().init_method("tcp://h:1"),
            &[("WORLD_SIZE", "1"), ("TORCHELASTIC_RUN_ID", "elastic")],
        )
        .unwrap();
        assert_eq!(p.job_id, "elastic");
        assert_eq!(p.rank, None);
    }

    #[test]
    fn malformed_values_name_their_variable() {
        let base = [
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
            ("WORLD_SIZE", "2"),
        ];
        let bad = |extra: &[(&str, &str)]| {
            let mut vars: Vec<(&str, &str)> = base.to_vec();
            for (k, v) in extra {
                vars.retain(|(b, _)| b != k);
                vars.push((k, v));
            }
            resolve(&InitOptions::new(), &vars).expect_err("should be refused")
        };
        assert_eq!(config_name(&bad(&[("RANK", "one")])), "RANK");
        assert_eq!(config_name(&bad(&[("WORLD_SIZE", "-2")])), "WORLD_SIZE");
        assert_eq!(config_name(&bad(&[("WORLD_SIZE", "0")])), "WORLD_SIZE");
        assert_eq!(config_name(&bad(&[("LOCAL_RANK", "x")])), "LOCAL_RANK");
        assert_eq!(
            config_name(&bad(&[("MASTER_PORT", "70000")])),
            "MASTER_PORT"
        );
        assert_eq!(config_name(&bad(&[("MASTER_PORT", "0")])), "MASTER_PORT");
        assert_eq!(config_name(&bad(&[("MASTER_ADDR", "a b")])), "MASTER_ADDR");
        assert_eq!(
            config_name(&bad(&[("FERROCOMM_TIMEOUT", "-1")])),
            "FERROCOMM_TIMEOUT"
        );
        assert_eq!(
            config_name(&bad(&[("FERROCOMM_TIMEOUT", "soon")])),
            "FERROCOMM_TIMEOUT"
        );
        assert_eq!(
            config_name(&bad(&[("FERROCOMM_LOG_INTERVAL", "inf")])),
            "FERROCOMM_LOG_INTERVAL"
        );
        assert_eq!(
            config_name(&bad(&[("FERROCOMM_STORE_EXTERNAL", "maybe")])),
            "FERROCOMM_STORE_EXTERNAL"
        );
        assert_eq!(
            config_name(&bad(&[("FERROCOMM_INIT_METHOD", "bogus://")])),
            "FERROCOMM_INIT_METHOD"
        );
        assert_eq!(
            config_name(&bad(&[("SLURM_PROCID", "z"), ("WORLD_SIZE", "")])),
            "SLURM_PROCID"
        );

        let e = resolve(&InitOptions::new(), &base[..2]).unwrap_err();
        assert_eq!(config_name(&e), "world_size");
        assert!(e.to_string().contains("WORLD_SIZE"), "{e}");

        let e = bad(&[("RANK", "2")]);
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
        assert!(
            e.to_string().contains("RANK") && e.to_string().contains("WORLD_SIZE"),
            "{e}"
        );
        let e = resolve(&InitOptions::new().rank(5).world_size(5), &base).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");

        let e = resolve(
            &InitOptions::new(),
            &[("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
        )
        .unwrap_err();
        assert_eq!(config_name(&e), "MASTER_PORT");
        // Blank counts as unset.
        let p = resolve(
            &InitOptions::new(),
            &[&base[..], &[("RANK", " ")][..]].concat(),
        )
        .unwrap();
        assert_eq!(p.rank, None);
    }

    #[test]
    fn join_checks_its_plan() {
        let mut plan = InitOptions::new()
            .init_method("file:///nonexistent-dir-ferrocomm/x")
            .world_size(2)
            .resolve_with(&|_| None)
            .unwrap();
        plan.rank = Some(2);
        assert!(matches!(
            plan.join(BTreeMap::new()),
            Err(Error::InvalidArgument { .. })
        ));
        plan.rank = Some(0);
        plan.world_size = 0;
        assert!(matches!(
            plan.join(BTreeMap::new()),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn formats_rank_lists() {
        assert_eq!(fmt_ranks(&[]), "");
        assert_eq!(fmt_ranks(&[2]), "2");
        assert_eq!(fmt_ranks(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7-8");
        let many: Vec<usize> = (0..100).step_by(2).collect();
        assert!(fmt_ranks(&many).ends_with("..."));
    }
}
