//! `ferrocomm-bench`: the OSU micro-benchmarks and nccl-tests in ferrocomm's own form.
//!
//! Run under a launcher, one process per rank:
//!
//! ```text
//! ferrorun --nproc-per-node 2 -- ferrocomm-bench latency -b 1 -e 4M
//! FERROCOMM_TRANSPORT=tcp ferrorun --nproc-per-node 2 -- ferrocomm-bench bandwidth --json
//! ```
//!
//! Rank 0 prints an nccl-tests-style table (or, with `--json`, one JSON object per size).
//! How each subcommand corresponds to the OSU benchmarks and nccl-tests, and how the numbers
//! are computed, is written down in `docs/BENCHMARKS.md`; the measurement loop is in
//! `harness.rs`. A benchmark whose data arrives wrong fails (exit status 1).

mod coll;
mod harness;
mod output;
mod p2p;
mod values;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferrocomm::{AllReduceAlgo, AllReduceOptions, Communicator, DType, ReduceOp};

use coll::Which;
use harness::{Ctl, Limits};
use output::Row;
use values::{Val, with_dtype};

/// Why a benchmark run failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A communication error.
    #[error(transparent)]
    Comm(#[from] ferrocomm::Error),
    /// A result was wrong on some rank.
    #[error("{0}")]
    Wrong(String),
    /// The arguments make no sense for this job.
    #[error("{0}")]
    Usage(String),
}

/// One benchmarked operation on fixed buffers, called again and again.
pub trait Kernel {
    /// Performs the operation once and returns the seconds it took as this rank measures
    /// them (ranks that do not measure return 0).
    fn call(&mut self) -> Result<f64, BenchError>;
    /// Overwrites the output with a value no correct result contains.
    fn poison(&mut self);
    /// Describes the first wrong element of the output, if any.
    fn check(&self) -> Option<String>;
}

/// Ping-pong and streaming benchmarks between two ranks, and collectives, over ferrocomm;
/// run one process per rank under `ferrorun`. Rank 0 prints the results.
#[derive(Debug, Parser)]
#[command(name = "ferrocomm-bench", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Ping-pong between ranks 0 and 1; time = half the round trip (osu_latency).
    Latency(#[command(flatten)] Common),
    /// Rank 0 streams a window of non-blocking sends to rank 1, which acknowledges each
    /// window (osu_bw); time = per message.
    Bandwidth(#[command(flatten)] StreamArgs),
    /// Ranks 0 and 1 stream windows to each other at once (osu_bibw); bandwidth counts both
    /// directions.
    Bibw(#[command(flatten)] StreamArgs),
    /// Back-to-back barriers (osu_barrier); time = mean over ranks of each rank's median.
    Barrier(#[command(flatten)] Common),
    /// all_reduce, out of place (all_reduce_perf, osu_allreduce); size = the whole buffer,
    /// busbw = algbw × 2(n-1)/n.
    Allreduce(#[command(flatten)] AllReduceArgs),
    /// broadcast from --root, in place (broadcast_perf, osu_bcast); busbw = algbw.
    Broadcast(#[command(flatten)] RootArgs),
    /// reduce to --root, out of place (reduce_perf, osu_reduce); size = the whole buffer,
    /// busbw = algbw.
    Reduce(#[command(flatten)] ReduceArgs),
    /// gather to --root (gather_perf, osu_gather); size = the root's gathered output (n
    /// blocks), busbw = algbw × (n-1)/n.
    Gather(#[command(flatten)] RootArgs),
    /// scatter from --root (scatter_perf, osu_scatter); size = the root's input (n blocks),
    /// busbw = algbw × (n-1)/n.
    Scatter(#[command(flatten)] RootArgs),
    /// all_gather (all_gather_perf, osu_allgather); size = the gathered output (n blocks),
    /// busbw = algbw × (n-1)/n.
    Allgather(#[command(flatten)] Common),
    /// reduce_scatter, MPI_Reduce_scatter_block's semantics (reduce_scatter_perf); size = one
    /// rank's input (n blocks), busbw = algbw × (n-1)/n.
    ReduceScatter(#[command(flatten)] OpArgs),
    /// all_to_all (alltoall_perf, osu_alltoall); size = one rank's input (n blocks),
    /// busbw = algbw × (n-1)/n.
    Alltoall(#[command(flatten)] Common),
}

#[derive(Debug, Args)]
struct OpArgs {
    #[command(flatten)]
    common: Common,
    /// Reduction: sum, prod, min, max, avg (avg: floating-point types only).
    #[arg(short = 'o', long, default_value = "sum", value_parser = parse_op)]
    op: ReduceOp,
}

#[derive(Debug, Args)]
struct AllReduceArgs {
    #[command(flatten)]
    op: OpArgs,
    /// Algorithm: auto (the library's choice, or FERROCOMM_ALLREDUCE_ALGO when set), ring,
    /// rhd (recursive halving-doubling) or rd (recursive doubling).
    #[arg(short = 'a', long, default_value = "auto", value_parser = parse_algo)]
    algo: AllReduceAlgo,
}

#[derive(Debug, Args)]
struct RootArgs {
    #[command(flatten)]
    common: Common,
    /// The root rank.
    #[arg(short = 'r', long, default_value_t = 0)]
    root: usize,
}

#[derive(Debug, Args)]
struct ReduceArgs {
    #[command(flatten)]
    op: OpArgs,
    /// The root rank.
    #[arg(short = 'r', long, default_value_t = 0)]
    root: usize,
}

fn parse_op(s: &str) -> Result<ReduceOp, String> {
    ReduceOp::from_name(&s.trim().to_ascii_lowercase())
        .ok_or_else(|| format!("{s:?} is not a reduction; one of: sum, prod, min, max, avg"))
}

fn parse_algo(s: &str) -> Result<AllReduceAlgo, String> {
    AllReduceAlgo::from_name(s)
        .ok_or_else(|| format!("{s:?} is not an all_reduce algorithm; one of: auto, ring, rhd, rd"))
}

#[derive(Debug, Args)]
struct StreamArgs {
    #[command(flatten)]
    common: Common,
    /// Messages in flight per window (fewer for large messages, so that a window's buffers
    /// stay within 256 MiB).
    #[arg(short = 'W', long, default_value_t = 64)]
    window: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CheckMode {
    /// Verify the output of the last timed call of each size (poisoned before timing).
    Last,
    /// Verify after every timed call (outside the timed region; changes cache state).
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Bind {
    /// Leave placement to the OS.
    None,
    /// Pin each rank to one CPU: the local rank's, modulo the CPUs this process may use.
    Core,
}

/// Options every subcommand takes (nccl-tests' spellings where it has one).
#[derive(Clone, Debug, Args)]
struct Common {
    /// Smallest size in bytes (suffixes K, M, G). Default: 1 for point-to-point, 4 for
    /// collectives.
    #[arg(short = 'b', long = "minbytes", value_parser = harness::parse_size)]
    min_bytes: Option<u64>,
    /// Largest size in bytes. Default: 4M for point-to-point, 64M for collectives.
    #[arg(short = 'e', long = "maxbytes", value_parser = harness::parse_size)]
    max_bytes: Option<u64>,
    /// Multiply the size by this between points.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2)]
    step_factor: u64,
    /// Add this many bytes between points instead of multiplying.
    #[arg(short = 'i', long = "stepbytes", value_parser = harness::parse_size)]
    step_bytes: Option<u64>,
    /// At most this many timed calls per size.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    iters: u64,
    /// At least this many timed calls per size, even past the time target.
    #[arg(long = "min-iters", default_value_t = 10)]
    min_iters: u64,
    /// Seconds of timed calls to aim for per size; 0: exactly --iters calls.
    #[arg(short = 'T', long, default_value_t = 0.5)]
    time: f64,
    /// At most this many untimed calls before timing (and at most a quarter of --time).
    #[arg(short = 'w', long, default_value_t = 10)]
    warmup: u64,
    /// Element type: u8, i8, u16, i16, u32, i32, u64, i64, f16, bf16, f32, f64. Default:
    /// u8 for point-to-point, f32 for collectives.
    #[arg(short = 'd', long = "dtype", value_parser = values::parse_dtype)]
    dtype: Option<DType>,
    /// Transport: sets FERROCOMM_TRANSPORT (auto, tcp, ...) for this process.
    #[arg(long)]
    transport: Option<String>,
    /// Print one JSON object per size instead of the table.
    #[arg(long)]
    json: bool,
    /// When results are verified.
    #[arg(long, value_enum, default_value_t = CheckMode::Last)]
    check: CheckMode,
    /// Where ranks run.
    #[arg(long, value_enum, default_value_t = Bind::None)]
    bind: Bind,
}

/// What the kernels of one run share.
struct Ctx<'a> {
    comm: &'a Communicator,
    ctl: &'a Ctl,
    opts: &'a Common,
    transport: String,
}

impl Ctx<'_> {
    fn limits(&self) -> Limits {
        Limits {
            max_iters: self.opts.iters.max(1),
            min_iters: self.opts.min_iters.min(self.opts.iters.max(1)),
            time: (self.opts.time > 0.0).then(|| Duration::from_secs_f64(self.opts.time)),
        }
    }

    /// Warm-up, then the timed phase, then the check; every rank's timed seconds per call.
    fn measure(&self, k: &mut dyn Kernel) -> Result<Vec<f64>, BenchError> {
        self.ctl.barrier()?;
        if self.opts.warmup > 0 {
            let lim = Limits {
                max_iters: self.opts.warmup,
                min_iters: 1,
                time: self.limits().time.map(|t| t / 4),
            };
            self.ctl.phase(&lim, false, &mut || k.call())?;
        }
        k.poison();
        self.ctl.barrier()?;
        let every = self.opts.check == CheckMode::All;
        let mut wrong: Option<String> = None;
        let samples = self.ctl.phase(&self.limits(), true, &mut || {
            let s = k.call()?;
            if every {
                if wrong.is_none() {
                    wrong = k.check();
                }
                k.poison();
            }
            Ok(s)
        })?;
        if !every {
            wrong = k.check();
        }
        if let Some(w) = &wrong {
            eprintln!(
                "ferrocomm-bench: rank {}: wrong result: {w}",
                self.comm.rank()
            );
        }
        if !self.ctl.all_ok(wrong.is_none())? {
            return Err(BenchError::Wrong(
                "a rank received or computed wrong data (see the messages above)".into(),
            ));
        }
        Ok(samples)
    }

    fn row(&self, op: &'static str, dtype: DType, bytes: u64) -> Row {
        Row {
            implementation: "ferrocomm",
            op,
            transport: self.transport.clone(),
            ranks: self.comm.size(),
            dtype: dtype.name(),
            bytes,
            count: bytes / dtype.size() as u64,
            usec: 0.0,
            usec_min: 0.0,
            usec_max: None,
            usec_p99: None,
            algbw_gbps: 0.0,
            busbw_gbps: 0.0,
            iters: 0,
            window: None,
            algo: None,
            root: None,
            redop: None,
            check: "ok",
        }
    }

    /// Rank 0's row of a point-to-point benchmark from its samples (seconds per call);
    /// `per_call` messages per call, `dirs` directions counted in the bandwidth.
    fn p2p_row(
        &self,
        mut row: Row,
        mut samples: Vec<f64>,
        per_call: u64,
        dirs: f64,
    ) -> Option<Row> {
        if self.comm.rank() != 0 {
            return None;
        }
        let scale = 1e6 / per_call as f64;
        row.iters = samples.len() as u64;
        row.usec = harness::median(&mut samples) * scale;
        row.usec_min = samples.first().copied().unwrap_or(0.0) * scale;
        row.usec_p99 = Some(harness::quantile_sorted(&samples, 0.99) * scale);
        row.algbw_gbps = output::gbps(dirs * row.bytes as f64, row.usec);
        row.busbw_gbps = row.algbw_gbps * output::busbw_factor(row.op, row.ranks);
        Some(row)
    }
}

impl Ctx<'_> {
    /// Rank 0's row of a collective: each rank's median, gathered; usec is their mean.
    fn coll_row(&self, mut row: Row, mut samples: Vec<f64>) -> Result<Option<Row>, BenchError> {
        row.iters = samples.len() as u64;
        let mine = harness::median(&mut samples) * 1e6;
        let all = self.ctl.gather_f64(mine)?;
        if self.comm.rank() != 0 {
            return Ok(None);
        }
        row.usec = all.iter().sum::<f64>() / all.len() as f64;
        row.usec_min = all.iter().copied().fold(f64::INFINITY, f64::min);
        row.usec_max = Some(all.iter().copied().fold(0.0, f64::max));
        row.algbw_gbps = output::gbps(row.bytes as f64, row.usec);
        row.busbw_gbps = row.algbw_gbps * output::busbw_factor(row.op, row.ranks);
        Ok(Some(row))
    }
}

fn defaults(cmd: &Cmd) -> (u64, u64, DType) {
    match cmd {
        Cmd::Latency(_) | Cmd::Bandwidth(_) | Cmd::Bibw(_) => (1, 4 << 20, DType::U8),
        Cmd::Barrier(_) => (0, 0, DType::U8),
        _ => (4, 64 << 20, DType::F32),
    }
}

fn common(cmd: &Cmd) -> &Common {
    match cmd {
        Cmd::Latency(c) | Cmd::Barrier(c) | Cmd::Allgather(c) | Cmd::Alltoall(c) => c,
        Cmd::Bandwidth(s) | Cmd::Bibw(s) => &s.common,
        Cmd::Allreduce(a) => &a.op.common,
        Cmd::ReduceScatter(a) => &a.common,
        Cmd::Broadcast(a) | Cmd::Gather(a) | Cmd::Scatter(a) => &a.common,
        Cmd::Reduce(a) => &a.op.common,
    }
}

/// The collective a subcommand times, if it is one of the data-moving collectives.
fn which(cmd: &Cmd) -> Option<Which> {
    match cmd {
        Cmd::Allreduce(_) => Some(Which::AllReduce),
        Cmd::Broadcast(_) => Some(Which::Broadcast),
        Cmd::Allgather(_) => Some(Which::AllGather),
        Cmd::ReduceScatter(_) => Some(Which::ReduceScatter),
        Cmd::Alltoall(_) => Some(Which::AllToAll),
        Cmd::Reduce(_) => Some(Which::Reduce),
        Cmd::Gather(_) => Some(Which::Gather),
        Cmd::Scatter(_) => Some(Which::Scatter),
        Cmd::Latency(_) | Cmd::Bandwidth(_) | Cmd::Bibw(_) | Cmd::Barrier(_) => None,
    }
}

fn op_name(cmd: &Cmd) -> &'static str {
    match cmd {
        Cmd::Latency(_) => "latency",
        Cmd::Bandwidth(_) => "bandwidth",
        Cmd::Bibw(_) => "bibw",
        Cmd::Barrier(_) => "barrier",
        _ => which(cmd).map_or("?", Which::name),
    }
}

/// The reduction, all_reduce options and root of a collective subcommand.
fn coll_params(cmd: &Cmd) -> (ReduceOp, AllReduceOptions, usize) {
    match cmd {
        Cmd::Allreduce(a) => (a.op.op, AllReduceOptions::algo(a.algo), 0),
        Cmd::ReduceScatter(a) => (a.op, AllReduceOptions::default(), 0),
        Cmd::Broadcast(a) | Cmd::Gather(a) | Cmd::Scatter(a) => {
            (ReduceOp::Sum, AllReduceOptions::default(), a.root)
        }
        Cmd::Reduce(a) => (a.op.op, AllReduceOptions::default(), a.root),
        _ => (ReduceOp::Sum, AllReduceOptions::default(), 0),
    }
}

/// The element count of one point of a sweep: `size` bytes of `dtype`, cut down to a
/// multiple of the rank count for the operations that cut their buffer into blocks (as
/// `bench/peers/mpi-bench.c` does).
fn point_count(cmd: &Cmd, size: u64, dtype: DType, n: usize) -> usize {
    let count = (size / dtype.size() as u64) as usize;
    match which(cmd) {
        Some(w) if w.blocked() => count - count % n.max(1),
        _ => count,
    }
}

/// Checks the options of a collective subcommand against the job, before anything runs.
fn check_coll_args<T: values::Val>(cmd: &Cmd, dtype: DType, n: usize) -> Result<(), BenchError> {
    let Some(w) = which(cmd) else {
        return Ok(());
    };
    let (op, _, root) = coll_params(cmd);
    if w.reduces() {
        op.check(dtype, w.name())
            .map_err(|e| BenchError::Usage(format!("--op {op} with --dtype {dtype}: {e}")))?;
        if values::expected::<T>(op, 0, n).is_none() {
            return Err(BenchError::Usage(format!(
                "--op {op} with --dtype {dtype}: this benchmark cannot check that result"
            )));
        }
    }
    if root >= n {
        return Err(BenchError::Usage(format!(
            "--root {root} is out of range for {n} ranks"
        )));
    }
    Ok(())
}

/// One size of one benchmark; rank 0 gets the row.
fn point<T: Val>(
    cx: &Ctx,
    cmd: &Cmd,
    dtype: DType,
    count: usize,
) -> Result<Option<Row>, BenchError> {
    let bytes = (count * dtype.size()) as u64;
    let row = cx.row(op_name(cmd), dtype, bytes);
    match cmd {
        Cmd::Latency(_) => {
            let mut k = p2p::Latency::<T>::new(cx.comm, count);
            let s = cx.measure(&mut k)?;
            Ok(cx.p2p_row(row, s, 1, 1.0))
        }
        Cmd::Bandwidth(a) | Cmd::Bibw(a) => {
            let both = matches!(cmd, Cmd::Bibw(_));
            let w = p2p::effective_window(a.window, bytes);
            let mut k = p2p::Stream::<T>::new(cx.comm, count, w as usize, both);
            let s = cx.measure(&mut k)?;
            let dirs = if both { 2.0 } else { 1.0 };
            Ok(cx.p2p_row(row, s, w, dirs).map(|mut r| {
                r.window = Some(w);
                r
            }))
        }
        Cmd::Barrier(_) => {
            let mut k = coll::Barrier::new(cx.comm);
            let s = cx.measure(&mut k)?;
            cx.coll_row(row, s)
        }
        Cmd::Allreduce(_)
        | Cmd::Broadcast(_)
        | Cmd::Allgather(_)
        | Cmd::ReduceScatter(_)
        | Cmd::Alltoall(_)
        | Cmd::Reduce(_)
        | Cmd::Gather(_)
        | Cmd::Scatter(_) => {
            let Some(w) = which(cmd) else {
                return Ok(None);
            };
            let (op, opts, root) = coll_params(cmd);
            let mut k = coll::Coll::<T>::new(cx.comm, w, count, op, opts, root);
            let s = cx.measure(&mut k)?;
            let algo = w.algorithm(cx.comm, count, dtype.size(), &opts);
            let mut row = row;
            row.algo = Some(algo.name().to_string());
            row.root = w.rooted().then_some(root);
            row.redop = w.reduces().then(|| op.name());
            cx.coll_row(row, s)
        }
    }
}

fn run(cli: &Cli) -> Result<(), BenchError> {
    let opts = common(&cli.cmd);
    let (min_default, max_default, dtype_default) = defaults(&cli.cmd);
    let dtype = opts.dtype.unwrap_or(dtype_default);
    let comm = ferrocomm::init()?;
    if opts.bind == Bind::Core {
        bind_to_core(comm.local_rank())?;
    }
    let (me, n) = (comm.rank(), comm.size());
    let op = op_name(&cli.cmd);
    if matches!(cli.cmd, Cmd::Latency(_) | Cmd::Bandwidth(_) | Cmd::Bibw(_)) && n < 2 {
        return Err(BenchError::Usage(format!(
            "{op} needs at least 2 ranks (ranks 0 and 1 communicate; start it with e.g. \
             ferrorun --nproc-per-node 2)"
        )));
    }
    with_dtype!(dtype, T => check_coll_args::<T>(&cli.cmd, dtype, n),
        _ => Err(BenchError::Usage(format!("element type {dtype} is not supported here"))))?;
    let ctl = Ctl::new(&comm);
    let transport = if n > 1 {
        comm.transport_to(1)?.to_string()
    } else {
        "self".to_string()
    };
    let cx = Ctx {
        comm: &comm,
        ctl: &ctl,
        opts,
        transport,
    };
    let min = opts.min_bytes.unwrap_or(min_default);
    let max = opts.max_bytes.unwrap_or(max_default);
    if me == 0 && !opts.json {
        let lim = cx.limits();
        let extra = match &cli.cmd {
            Cmd::Allreduce(a) => format!(", op {}, algorithm {}", a.op.op, a.algo),
            Cmd::ReduceScatter(a) => format!(", op {}", a.op),
            Cmd::Broadcast(a) | Cmd::Gather(a) | Cmd::Scatter(a) => format!(", root {}", a.root),
            Cmd::Reduce(a) => format!(", op {}, root {}", a.op.op, a.root),
            _ => String::new(),
        };
        output::print_header(
            &format!(
                "ferrocomm-bench {op}: {n} ranks, transport {}{extra}, type {dtype}, warm-up ≤{}, \
                 timed calls {}..{}{}",
                cx.transport,
                opts.warmup,
                lim.min_iters,
                lim.max_iters,
                lim.time
                    .map(|t| format!(" or {:.2} s per size", t.as_secs_f64()))
                    .unwrap_or_default()
            ),
            op,
        );
    }
    let mut last = None;
    let sweep = if matches!(cli.cmd, Cmd::Barrier(_)) {
        vec![0]
    } else {
        harness::sizes(min, max, opts.step_factor, opts.step_bytes)
    };
    for size in sweep {
        let count = point_count(&cli.cmd, size, dtype, n);
        let bytes = (count * dtype.size()) as u64;
        if last == Some(bytes) || (count == 0 && which(&cli.cmd).is_some()) {
            continue;
        }
        last = Some(bytes);
        let row = with_dtype!(dtype, T => point::<T>(&cx, &cli.cmd, dtype, count),
            _ => Err(BenchError::Usage(format!("element type {dtype} is not supported here"))))?;
        if let Some(row) = row {
            output::print_row(&row, opts.json);
        }
    }
    ctl.barrier()?;
    Ok(())
}

/// Pins the calling thread to one of the CPUs it may run on: number `local_rank` modulo
/// their count.
fn bind_to_core(local_rank: usize) -> Result<(), BenchError> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a valid, writable cpu_set_t of `size` bytes; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Err(ferrocomm::Error::io(
            "reading this process's CPU affinity for --bind core",
            std::io::Error::last_os_error(),
        )
        .into());
    }
    // SAFETY: CPU_ISSET reads a bit of the valid set for an index below CPU_SETSIZE.
    let allowed: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    let Some(&cpu) = allowed.get(local_rank % allowed.len().max(1)) else {
        return Err(BenchError::Usage(
            "--bind core: this process may run on no CPU".into(),
        ));
    };
    // SAFETY: as above; CPU_ZERO/CPU_SET write within the set.
    unsafe {
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
    }
    // SAFETY: `set` is a valid cpu_set_t of `size` bytes.
    if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
        return Err(ferrocomm::Error::io(
            format!("pinning rank to CPU {cpu} for --bind core"),
            std::io::Error::last_os_error(),
        )
        .into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(t) = &common(&cli.cmd).transport {
        // SAFETY: no other thread exists yet (nothing has been started), so nothing can
        // read the environment concurrently.
        unsafe { std::env::set_var("FERROCOMM_TRANSPORT", t) };
    }
    ferrocomm::init_logging();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let rank = std::env::var("RANK").unwrap_or_else(|_| "?".into());
            eprintln!("ferrocomm-bench: rank {rank}: {e}");
            ExitCode::FAILURE
        }
    }
}
