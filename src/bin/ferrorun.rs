//! `ferrorun`: starts the ranks of one node of a ferrocomm (or torchrun-style) job.
//!
//! A thin command line over [`ferrocomm::launch`], which documents the behaviour. Exit
//! status: 0 when every rank exited 0; the status of the failed rank named as the root
//! cause (or 128 + the signal that killed it: a rank killed by a signal is named over the
//! ranks that failed because they lost it, even when they ended first); 128 + signal when
//! ferrorun itself was interrupted; 1 when the launcher could not do its work (rendezvous
//! timeout, program not found); 2 for a bad command line.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ferrocomm::launch::{self, LaunchConfig};

/// Start K ranks of PROGRAM on this node, with the environment torch.distributed and
/// ferrocomm read (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...). Node 0 hosts the job's
/// rendezvous store at --master-addr:--master-port. When a rank fails, the others are
/// stopped, and the rank that caused the failure is named (a rank killed by a signal over
/// the ranks that lost it). Log level: FERROCOMM_LOG (default warn); rendezvous timeout: FERROCOMM_TIMEOUT
/// (seconds, default 300); FERROCOMM_LOG_INTERVAL (seconds, default 10) between "still
/// waiting" messages.
#[derive(Debug, Parser)]
#[command(name = "ferrorun", version)]
struct Cli {
    /// Number of nodes (machines) in the job.
    #[arg(long, default_value_t = 1, value_name = "N")]
    nnodes: usize,

    /// This node's index, 0..N. Node 0 hosts the store.
    #[arg(
        long = "node-rank",
        alias = "node_rank",
        default_value_t = 0,
        value_name = "R"
    )]
    node_rank: usize,

    /// Ranks to start on this node: a number, or `auto` for one per CPU. Nodes may differ.
    #[arg(
        long = "nproc-per-node",
        alias = "nproc_per_node",
        default_value = "1",
        value_name = "K|auto"
    )]
    nproc_per_node: String,

    /// Address of node 0 (where the store is), as the other nodes reach it.
    #[arg(
        long = "master-addr",
        alias = "master_addr",
        default_value = "127.0.0.1",
        value_name = "HOST"
    )]
    master_addr: String,

    /// Port of the store on node 0. Required with --nnodes > 1; on one node a free port is
    /// picked when it is not given.
    #[arg(long = "master-port", alias = "master_port", value_name = "PORT")]
    master_port: Option<u16>,

    /// Prefix every line a rank prints (stdout and stderr) with `[rank N] `.
    #[arg(long = "tag-output", alias = "tag_output")]
    tag_output: bool,

    /// Seconds between SIGTERM and SIGKILL when stopping ranks.
    #[arg(
        long = "grace-period",
        alias = "grace_period",
        default_value = "5",
        value_name = "SECS",
        value_parser = parse_grace
    )]
    grace_period: Duration,

    /// Restart the whole group up to N times when a rank fails (like torchrun's); each
    /// attempt gets a fresh store and `FERROCOMM_RESTART_COUNT` (and
    /// `TORCHELASTIC_RESTART_COUNT`) = 0, 1, ... Single-node jobs only.
    #[arg(
        long = "max-restarts",
        alias = "max_restarts",
        default_value_t = 0,
        value_name = "N"
    )]
    max_restarts: usize,

    /// The program every rank runs (not through Python: give `python3 train.py` where
    /// torchrun takes `train.py`). Everything after it is passed to it; `--` before it is
    /// optional.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM [ARGS]"
    )]
    command: Vec<OsString>,
}

fn parse_grace(s: &str) -> Result<Duration, String> {
    launch::parse_seconds(s)
        .ok_or_else(|| format!("{s:?} is not a number of seconds, e.g. 5 or 0.5"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERROCOMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match configure(cli).and_then(|cfg| launch::run(&cfg)) {
        Ok(outcome) => {
            if !outcome.is_success() {
                eprintln!("ferrorun: {outcome}");
            }
            ExitCode::from(outcome.exit_code().clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("ferrorun: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn configure(cli: Cli) -> ferrocomm::Result<LaunchConfig> {
    let mut command = cli.command.into_iter();
    let program = command.next().unwrap_or_default();
    let mut cfg = LaunchConfig::new(program, command.collect());
    cfg.nnodes = cli.nnodes;
    cfg.node_rank = cli.node_rank;
    cfg.nproc_per_node = launch::parse_nproc(&cli.nproc_per_node)?;
    cfg.master_addr = cli.master_addr;
    cfg.master_port = cli.master_port;
    cfg.tag_output = cli.tag_output;
    cfg.grace_period = cli.grace_period;
    cfg.max_restarts = cli.max_restarts;
    cfg.apply_env()?;
    Ok(cfg)
}
