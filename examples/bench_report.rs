//! Writes `docs/BENCHMARKS.md` and its plots from the JSON lines `scripts/bench-compare`
//! collected (ferrocomm-bench, the MPI peers and the physical-limit probes).
//!
//! ```text
//! cargo run --release --example bench_report -- RESULTS.jsonl docs/BENCHMARKS.md
//! ```
//!
//! Plots (SVG) go to `bench/` beside the Markdown file. Every point of a table is the median
//! over the repetitions of that point; ratios are ferrocomm's figure over the peer's.
//!
//! Input lines (other lines are ignored):
//! - measurements: `{"impl", "op", "transport", "ranks", "bytes", "usec", "algbw_gbps",
//!   "busbw_gbps", "rep", ...}` as printed by `ferrocomm-bench --json` and `mpi-bench --json`;
//! - physical limits: `{"impl":"phys", "op", "bytes", "gbps"|"usec", "rep"}`;
//! - run notes: `{"impl", "op":"run", "prog", "transport", "ranks", "status", "note"}` for
//!   runs that did not finish cleanly or could not start;
//! - facts about the run: `{"impl":"meta", "key", "value"}`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use plotters::prelude::*;
use serde_json::Value;

const IMPLS: [&str; 3] = ["ferrocomm", "openmpi", "mpich"];
const PEERS: [&str; 2] = ["openmpi", "mpich"];
const TRANSPORTS: [&str; 2] = ["shm", "tcp"];
const OPS: [&str; 9] = [
    "latency",
    "bandwidth",
    "bibw",
    "allreduce",
    "broadcast",
    "allgather",
    "reduce_scatter",
    "alltoall",
    "barrier",
];
/// Differences smaller than this fraction count as a tie (machine noise).
const TIE: f64 = 0.05;

fn impl_name(i: &str) -> &str {
    match i {
        "openmpi" => "Open MPI",
        "mpich" => "MPICH",
        other => other,
    }
}

fn color(i: &str) -> RGBColor {
    match i {
        "ferrocomm" => RGBColor(200, 60, 20),
        "openmpi" => RGBColor(30, 90, 200),
        _ => RGBColor(40, 150, 60),
    }
}

/// What a table shows for an operation, and whether lower is better.
fn metric(op: &str) -> (&'static str, bool) {
    match op {
        "bandwidth" | "bibw" => ("GB/s", false),
        _ => ("µs", true),
    }
}

fn is_coll(op: &str) -> bool {
    !matches!(op, "latency" | "bandwidth" | "bibw")
}

#[derive(Clone, Debug)]
struct Point {
    usec: f64,
    algbw: f64,
    busbw: f64,
}

/// Medians over repetitions, with their spread.
#[derive(Clone, Copy, Debug)]
struct Stat {
    med: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stat(mut v: Vec<f64>) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    let med = if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    };
    Some(Stat {
        med,
        min: v[0],
        max: v[v.len() - 1],
        n: v.len(),
    })
}

type Key = (String, String, u64); // op, transport, ranks

/// Which quantity of a point a table row or plot shows.
type Pick = fn(&Point) -> f64;

/// One plot: file name, title, configuration, quantity, unit, logarithmic value axis.
struct PlotSpec {
    file: String,
    title: String,
    key: Key,
    pick: Pick,
    unit: &'static str,
    logy: bool,
}

#[derive(Default)]
struct Data {
    /// (op, transport, ranks) -> impl -> bytes -> repetitions
    points: BTreeMap<Key, BTreeMap<String, BTreeMap<u64, Vec<Point>>>>,
    /// (op, bytes) -> values (GB/s or µs)
    phys: BTreeMap<(String, u64), Vec<f64>>,
    runs: Vec<Value>,
    meta: Vec<(String, String)>,
}

impl Data {
    fn load(text: &str) -> Data {
        let mut d = Data::default();
        for line in text.lines() {
            let line = line.trim();
            if !line.starts_with('{') {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let f = |k: &str| v.get(k).and_then(Value::as_f64);
            let imp = s("impl");
            let op = s("op");
            match (imp.as_str(), op.as_str()) {
                ("meta", _) => d.meta.push((s("key"), s("value"))),
                ("phys", _) => {
                    let bytes = v.get("bytes").and_then(Value::as_u64).unwrap_or(0);
                    if let Some(x) = f("gbps").or(f("usec")) {
                        d.phys.entry((op, bytes)).or_default().push(x);
                    }
                }
                (_, "run") => d.runs.push(v.clone()),
                _ => {
                    let (Some(usec), Some(ranks), Some(bytes)) = (
                        f("usec"),
                        v.get("ranks").and_then(Value::as_u64),
                        v.get("bytes").and_then(Value::as_u64),
                    ) else {
                        continue;
                    };
                    let p = Point {
                        usec,
                        algbw: f("algbw_gbps").unwrap_or(0.0),
                        busbw: f("busbw_gbps").unwrap_or(0.0),
                    };
                    d.points
                        .entry((op, s("transport"), ranks))
                        .or_default()
                        .entry(imp)
                        .or_default()
                        .entry(bytes)
                        .or_default()
                        .push(p);
                }
            }
        }
        d
    }

    fn series(&self, key: &Key, imp: &str) -> Option<&BTreeMap<u64, Vec<Point>>> {
        self.points.get(key).and_then(|m| m.get(imp))
    }

    /// The median of `pick` over repetitions at one size.
    fn at(&self, key: &Key, imp: &str, bytes: u64, pick: Pick) -> Option<Stat> {
        let reps = self.series(key, imp)?.get(&bytes)?;
        stat(reps.iter().map(pick).collect())
    }

    fn ranks_of(&self, op: &str, transport: &str) -> BTreeSet<u64> {
        self.points
            .keys()
            .filter(|(o, t, _)| o == op && t == transport)
            .map(|k| k.2)
            .collect()
    }

    fn meta(&self, key: &str) -> Option<&str> {
        self.meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn key(op: &str, transport: &str, ranks: u64) -> Key {
    (op.to_string(), transport.to_string(), ranks)
}

fn primary(op: &str) -> Pick {
    match op {
        "bandwidth" | "bibw" => |p| p.algbw,
        _ => |p| p.usec,
    }
}

fn size(b: u64) -> String {
    if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

/// Three significant digits, thousands without decimals.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{v:.0}");
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(s: Option<Stat>) -> String {
    s.map_or("–".into(), |s| num(s.med))
}

fn cell_spread(s: Option<Stat>) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{} ({}–{})", num(s.med), num(s.min), num(s.max)),
        Some(s) => num(s.med),
        None => "–".into(),
    }
}

fn ratio(f: Option<Stat>, p: Option<Stat>) -> String {
    match (f, p) {
        (Some(f), Some(p)) if p.med > 0.0 => format!("{:.2}", f.med / p.med),
        _ => "–".into(),
    }
}

/// How many times slower ferrocomm is than the peer (1 = equal), from the primary metric.
fn slowdown(op: &str, f: f64, p: f64) -> f64 {
    if metric(op).1 { f / p } else { p / f }
}

const METHOD: &str = r#"## How to read this page

Every number is the **median over the repetitions** of that point (each repetition is a
separate launch; ferrocomm, Open MPI and MPICH run one after the other for each
configuration, in an order that rotates between repetitions, so machine noise hits all
three alike). Ratios are **ferrocomm / peer** of the column's quantity: for times
(µs) below 1 means ferrocomm is faster, for bandwidths (GB/s) above 1 means ferrocomm is
faster. 1 GB = 10⁹ bytes. "–" means the point was not measured (see the notes).

ferrocomm runs under `ferrorun`, the peers under their own `mpirun`; all three run the
same measurement loop (`src/bin/ferrocomm-bench/harness.rs`, mirrored line by line in
`bench/peers/mpi-bench.c`):

1. per size: a barrier, then untimed warm-up calls (at most `-w`, at most a quarter of
   `-T` seconds), then a barrier;
2. timed calls in chunks, **each call timed on its own** with the monotonic clock; after
   each chunk rank 0 decides, outside the timed region, how long the next chunk is (at most
   double the last, no more than the time target `-T` still allows at the speed seen, at
   least enough to reach `--min-iters`), and stops after `-n` calls or once `-T` seconds
   have passed;
3. the result is checked: outputs are poisoned before the timed phase and compared element
   by element after it (`--check all`: after every call); a wrong result ends the program
   with exit status 1.

Reported time: point-to-point, rank 0's median call (half the round trip for `latency`;
per message for `bandwidth`/`bibw`); collectives, the mean over ranks of each rank's
median call (min and max over ranks are in the JSON). algbw = bytes / time; busbw = algbw ×
nccl-tests' factor: all_reduce 2(n−1)/n, all_gather, reduce_scatter and all_to_all
(n−1)/n, broadcast 1. Sizes follow nccl-tests: the whole buffer of the collective
(all_gather: the gathered output; reduce_scatter and all_to_all: the input of one rank).

## Correspondence with the OSU micro-benchmarks and nccl-tests

| `ferrocomm-bench` | OSU | nccl-tests | what is timed |
|---|---|---|---|
| `latency` | `osu_latency` | – | ping-pong between ranks 0 and 1, half the round trip; OSU reports the mean, we the median call |
| `bandwidth` | `osu_bw` | – | rank 0 posts a window (`-W`, default 64) of non-blocking sends, rank 1 the receives, then a 1-byte ack; time per message |
| `bibw` | `osu_bibw` | – | both ranks post a window of receives and sends to each other; bandwidth counts both directions |
| `allreduce` | `osu_allreduce` | `all_reduce_perf` | sum, out of place; `--algo` forces an algorithm |
| `broadcast` | `osu_bcast` | `broadcast_perf` | from `--root` (0), in place |
| `allgather` | `osu_allgather` | `all_gather_perf` | each rank contributes bytes/n |
| `reduce-scatter` | `osu_reduce_scatter` | `reduce_scatter_perf` | sum; each rank keeps bytes/n |
| `alltoall` | `osu_alltoall` | `alltoall_perf` | bytes/n to every rank |
| `barrier` | `osu_barrier` | – | back-to-back barriers |

Options follow nccl-tests where it has one: `-b`/`-e` (min/max bytes, K/M/G suffixes), `-f`
(step factor), `-i` (step bytes), `-n` (at most n timed calls), `-w` (warm-up calls), `-d`
(element type); plus `-T` (seconds per size), `--min-iters`, `--check last|all`, `--json`,
`--transport` (sets `FERROCOMM_TRANSPORT`), `--bind core`. OSU differs in two ways that
matter when comparing with published OSU numbers: it reports the mean over iterations (we
report the median, robust to the scheduler stalls of a shared 2-vCPU machine) and its
collectives put a barrier after every call (ours run back to back, as nccl-tests does).
"#;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, md] = args.as_slice() else {
        eprintln!("usage: bench_report RESULTS.jsonl OUT.md");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(input) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("bench_report: cannot read {input}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let data = Data::load(&text);
    if data.points.is_empty() {
        eprintln!("bench_report: {input} holds no measurements");
        return ExitCode::FAILURE;
    }
    let md = PathBuf::from(md);
    let dir = md.parent().unwrap_or(Path::new(".")).join("bench");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("bench_report: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let mut plots_failed = Vec::new();
    let report = write_report(&data, &dir, &mut plots_failed);
    if let Err(e) = std::fs::write(&md, report) {
        eprintln!("bench_report: cannot write {}: {e}", md.display());
        return ExitCode::FAILURE;
    }
    for p in &plots_failed {
        eprintln!("bench_report: plot failed: {p}");
    }
    if !plots_failed.is_empty() {
        return ExitCode::FAILURE;
    }
    println!(
        "bench_report: wrote {} and plots in {}",
        md.display(),
        dir.display()
    );
    ExitCode::SUCCESS
}

fn write_report(d: &Data, dir: &Path, failed: &mut Vec<String>) -> String {
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "# ferrocomm beside Open MPI and MPICH\n");
    let _ = writeln!(
        w,
        "Generated by `scripts/bench-compare{}` on {} — do not edit by hand; re-run the script.\n",
        if d.meta("quick") == Some("1") {
            " --quick"
        } else {
            ""
        },
        d.meta("date").unwrap_or("(date unknown)")
    );
    let _ = writeln!(w, "| | |\n|---|---|");
    for (k, label) in [
        ("machine", "machine"),
        ("cpu", "CPU"),
        ("kernel", "kernel"),
        ("ferrocomm", "ferrocomm"),
        ("openmpi", "Open MPI"),
        ("mpich", "MPICH"),
        ("reps", "repetitions per point"),
        ("duration", "duration of the run"),
        ("steal", "CPU time stolen by the hypervisor during the run"),
    ] {
        if let Some(v) = d.meta(k) {
            let _ = writeln!(w, "| {label} | {v} |");
        }
    }
    let _ = writeln!(w);
    if let Some(cfg) = d.meta("configs") {
        let _ = writeln!(w, "Launch configurations:\n\n```text\n{cfg}\n```\n");
    }

    key_numbers(d, w);
    behind(d, w);
    physical(d, w);
    plots(d, dir, w, failed);
    let _ = writeln!(w, "{METHOD}");
    full_tables(d, w);
    notes(d, w);
    o
}

fn key_numbers(d: &Data, w: &mut String) {
    let _ = writeln!(w, "## Key numbers: 2 ranks\n");
    let _ = writeln!(
        w,
        "Median over repetitions (min–max over repetitions in brackets); ratio = ferrocomm / peer.\n"
    );
    let _ = writeln!(
        w,
        "| metric | transport | ferrocomm | Open MPI | MPICH | ferrocomm / Open MPI | ferrocomm / MPICH |"
    );
    let _ = writeln!(w, "|---|---|---:|---:|---:|---:|---:|");
    let rows: [(&str, u64, &str, Pick); 10] = [
        ("latency", 8, "8 B latency, µs", |p| p.usec),
        ("latency", 4096, "4 KiB latency, µs", |p| p.usec),
        ("latency", 65536, "64 KiB latency, µs", |p| p.usec),
        ("latency", 1 << 20, "1 MiB latency, µs", |p| p.usec),
        ("bandwidth", 65536, "64 KiB bandwidth, GB/s", |p| p.algbw),
        ("bandwidth", 1 << 20, "1 MiB bandwidth, GB/s", |p| p.algbw),
        ("bandwidth", 4 << 20, "4 MiB bandwidth, GB/s", |p| p.algbw),
        ("allreduce", 65536, "all_reduce 64 KiB busbw, GB/s", |p| {
            p.busbw
        }),
        ("allreduce", 1 << 20, "all_reduce 1 MiB busbw, GB/s", |p| {
            p.busbw
        }),
        (
            "allreduce",
            64 << 20,
            "all_reduce 64 MiB busbw, GB/s",
            |p| p.busbw,
        ),
    ];
    let mut extra = vec![("allreduce", 4u64, "all_reduce 4 B time, µs")];
    extra.push(("barrier", 0, "barrier, µs"));
    for (op, bytes, label, pick) in rows.iter().copied().chain(
        extra
            .into_iter()
            .map(|(o, b, l)| (o, b, l, (|p: &Point| p.usec) as Pick)),
    ) {
        for t in TRANSPORTS {
            let k = key(op, t, 2);
            let s: Vec<Option<Stat>> = IMPLS.iter().map(|i| d.at(&k, i, bytes, pick)).collect();
            if s.iter().all(Option::is_none) {
                continue;
            }
            let _ = writeln!(
                w,
                "| {label} | {t} | {} | {} | {} | {} | {} |",
                cell_spread(s[0]),
                cell_spread(s[1]),
                cell_spread(s[2]),
                ratio(s[0], s[1]),
                ratio(s[0], s[2])
            );
        }
    }
    let _ = writeln!(w);
}

fn behind(d: &Data, w: &mut String) {
    let _ = writeln!(w, "## Where ferrocomm is behind\n");
    let _ = writeln!(
        w,
        "For every configuration both ferrocomm and a peer measured: the sizes where ferrocomm \
         is slower by more than {:.0} % (time longer, or bandwidth lower), the worst of them, \
         and the median shortfall over those sizes. \"× slower\" is the peer's speed over \
         ferrocomm's.\n",
        TIE * 100.0
    );
    let mut rows = Vec::new();
    let mut ahead = Vec::new();
    for op in OPS {
        for t in TRANSPORTS {
            for r in d.ranks_of(op, t) {
                let k = key(op, t, r);
                let Some(f) = d.series(&k, "ferrocomm") else {
                    continue;
                };
                for peer in PEERS {
                    if d.series(&k, peer).is_none() {
                        continue;
                    }
                    let mut compared = 0;
                    let mut slow: Vec<(u64, f64)> = Vec::new();
                    for &b in f.keys() {
                        let (Some(fs), Some(ps)) = (
                            d.at(&k, "ferrocomm", b, primary(op)),
                            d.at(&k, peer, b, primary(op)),
                        ) else {
                            continue;
                        };
                        compared += 1;
                        let x = slowdown(op, fs.med, ps.med);
                        if x > 1.0 + TIE {
                            slow.push((b, x));
                        }
                    }
                    if compared == 0 {
                        continue;
                    }
                    if slow.is_empty() {
                        ahead.push(format!("{op} {t} {r} ranks vs {}", impl_name(peer)));
                        continue;
                    }
                    let worst = slow
                        .iter()
                        .copied()
                        .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
                    let med = stat(slow.iter().map(|s| s.1).collect()).map_or(0.0, |s| s.med);
                    let (lo, hi) = (slow[0].0, slow[slow.len() - 1].0);
                    let span = if lo == hi {
                        size(lo)
                    } else {
                        format!("{}–{}", size(lo), size(hi))
                    };
                    rows.push(format!(
                        "| {op} | {t} | {r} | {} | {} of {compared} ({span}) | {:.2}× at {} | {:.2}× |",
                        impl_name(peer),
                        slow.len(),
                        worst.1,
                        size(worst.0),
                        med
                    ));
                }
            }
        }
    }
    if rows.is_empty() {
        let _ = writeln!(w, "Nowhere among the measured points.\n");
    } else {
        let _ = writeln!(
            w,
            "| operation | transport | ranks | peer | sizes behind | worst | median shortfall |"
        );
        let _ = writeln!(w, "|---|---|---:|---|---|---:|---:|");
        for r in rows {
            let _ = writeln!(w, "{r}");
        }
        let _ = writeln!(w);
    }
    if !ahead.is_empty() {
        let _ = writeln!(
            w,
            "Not behind at any size (within {:.0} %): {}.\n",
            TIE * 100.0,
            ahead.join("; ")
        );
    }
}

fn physical(d: &Data, w: &mut String) {
    let _ = writeln!(w, "## Physical limits of this machine\n");
    if d.phys.is_empty() {
        let _ = writeln!(w, "Not measured in this run.\n");
        return;
    }
    let _ = writeln!(
        w,
        "Measured by `bench/phys/phys.c` in the same run (median over repetitions, each the \
         median of 5 trials; processes pinned to CPUs 0 and 1):\n"
    );
    let _ = writeln!(w, "| limit | value |\n|---|---:|");
    for ((op, bytes), v) in &d.phys {
        let s = stat(v.clone());
        let (label, unit) = match op.as_str() {
            "memcpy" => (
                format!("memcpy {}, one thread", size(*bytes)),
                "GB/s copied",
            ),
            "tcp_stream" => (
                "TCP loopback, one stream (1 MiB writes)".to_string(),
                "GB/s",
            ),
            "tcp_pingpong" => (
                "TCP loopback 1-byte ping-pong, blocking reads, half round trip".to_string(),
                "µs",
            ),
            "tcp_pingpong_spin" => (
                "TCP loopback 1-byte ping-pong, non-blocking spinning reads, half round trip"
                    .to_string(),
                "µs",
            ),
            "shm_pingpong" => (
                "shared-memory flag ping-pong, spinning, half round trip".to_string(),
                "µs",
            ),
            other => (other.to_string(), ""),
        };
        let _ = writeln!(w, "| {label} | {} {unit} |", cell_spread(s));
    }
    let _ = writeln!(w);
}

fn plots(d: &Data, dir: &Path, w: &mut String, failed: &mut Vec<String>) {
    let _ = writeln!(w, "## Plots\n");
    let rel = dir
        .file_name()
        .map_or("bench".to_string(), |n| n.to_string_lossy().into_owned());
    let mut any = false;
    for t in TRANSPORTS {
        let mut specs = vec![
            PlotSpec {
                file: format!("latency-{t}"),
                title: format!("latency, {t}, 2 ranks (half round trip)"),
                key: key("latency", t, 2),
                pick: |p| p.usec,
                unit: "µs",
                logy: true,
            },
            PlotSpec {
                file: format!("bandwidth-{t}"),
                title: format!("bandwidth, {t}, 2 ranks (window of 64)"),
                key: key("bandwidth", t, 2),
                pick: |p| p.algbw,
                unit: "GB/s",
                logy: false,
            },
        ];
        for r in d.ranks_of("allreduce", t) {
            specs.push(PlotSpec {
                file: format!("allreduce-busbw-{t}-{r}"),
                title: format!("all_reduce busbw, {t}, {r} ranks"),
                key: key("allreduce", t, r),
                pick: |p| p.busbw,
                unit: "GB/s",
                logy: false,
            });
        }
        for PlotSpec {
            file,
            title,
            key: k,
            pick,
            unit,
            logy,
        } in specs
        {
            if !d.points.contains_key(&k) {
                continue;
            }
            let path = dir.join(format!("{file}.svg"));
            match plot(d, &path, &title, &k, pick, unit, logy) {
                Ok(()) => {
                    any = true;
                    let _ = writeln!(w, "![{title}]({rel}/{file}.svg)\n");
                }
                Err(e) => failed.push(format!("{}: {e}", path.display())),
            }
        }
    }
    if !any {
        let _ = writeln!(w, "No data to plot.\n");
    }
}

fn plot(
    d: &Data,
    path: &Path,
    title: &str,
    k: &Key,
    pick: Pick,
    unit: &str,
    logy: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut lines: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    for i in IMPLS {
        let Some(series) = d.series(k, i) else {
            continue;
        };
        let pts: Vec<(f64, f64)> = series
            .keys()
            .filter(|&&b| b > 0)
            .filter_map(|&b| d.at(k, i, b, pick).map(|s| (b as f64, s.med)))
            .filter(|&(_, y)| y > 0.0 && y.is_finite())
            .collect();
        if !pts.is_empty() {
            lines.push((i, pts));
        }
    }
    let all = lines.iter().flat_map(|l| l.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, 0f64, f64::MAX, 0f64);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if lines.is_empty() {
        return Err("no points".into());
    }
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let (xlo, xhi) = (x0 / 1.4, x1 * 1.4);
    let x_range = (xlo..xhi).log_scale().with_key_points(x_ticks(x0, x1));
    let fmt_x = |v: &f64| size(v.round() as u64);
    macro_rules! draw {
        ($y_range:expr) => {{
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 20))
                .margin(14)
                .x_label_area_size(40)
                .y_label_area_size(64)
                .build_cartesian_2d(x_range, $y_range)?;
            chart
                .configure_mesh()
                .x_desc("message size")
                .y_desc(unit)
                .x_label_formatter(&fmt_x)
                .y_label_formatter(&|v| num(*v))
                .draw()?;
            for (i, pts) in &lines {
                let c = color(i);
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                    .label(impl_name(i))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                    });
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    if logy {
        let (ylo, yhi) = (y0 / 1.4, y1 * 1.4);
        draw!((ylo..yhi).log_scale().with_key_points(y_ticks(ylo, yhi)));
    } else {
        draw!(0.0..y1 * 1.1);
    }
    root.present()?;
    Ok(())
}

/// Tick positions for a byte axis: powers of 4 (of 2 when the range is short, of 16 when it
/// is long) from `lo` to `hi`.
fn x_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi / lo.max(1.0)).log2();
    let step = if span <= 10.0 {
        1
    } else if span <= 24.0 {
        2
    } else {
        4
    };
    (0..63)
        .step_by(step)
        .map(|e| (1u64 << e) as f64)
        .filter(|&v| v >= lo && v <= hi)
        .collect()
}

/// Tick positions for a logarithmic value axis: 1, 2 and 5 times powers of ten.
fn y_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut p = 10f64.powi(lo.log10().floor() as i32);
    while p <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = p * m;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        p *= 10.0;
    }
    out
}

fn full_tables(d: &Data, w: &mut String) {
    let _ = writeln!(w, "## All measurements\n");
    for op in OPS {
        for t in TRANSPORTS {
            for r in d.ranks_of(op, t) {
                let k = key(op, t, r);
                let (unit, lower) = metric(op);
                let better = if lower {
                    "below 1: ferrocomm faster"
                } else {
                    "above 1: ferrocomm faster"
                };
                let _ = writeln!(w, "### {op}, {t}, {r} ranks\n");
                let sizes: BTreeSet<u64> = IMPLS
                    .iter()
                    .filter_map(|i| d.series(&k, i))
                    .flat_map(|s| s.keys().copied())
                    .collect();
                let coll = is_coll(op) && op != "barrier";
                let mut head = format!(
                    "| size | ferrocomm {unit} | Open MPI {unit} | MPICH {unit} | f / Open MPI ({better}) | f / MPICH |"
                );
                let mut rule = "|---:|---:|---:|---:|---:|---:|".to_string();
                if coll {
                    head.push_str(" ferrocomm busbw GB/s | Open MPI busbw | MPICH busbw |");
                    rule.push_str("---:|---:|---:|");
                }
                let _ = writeln!(w, "{head}\n{rule}");
                for b in sizes {
                    let s: Vec<Option<Stat>> =
                        IMPLS.iter().map(|i| d.at(&k, i, b, primary(op))).collect();
                    let mut line = format!(
                        "| {} | {} | {} | {} | {} | {} |",
                        size(b),
                        cell(s[0]),
                        cell(s[1]),
                        cell(s[2]),
                        ratio(s[0], s[1]),
                        ratio(s[0], s[2])
                    );
                    if coll {
                        for i in IMPLS {
                            let _ = write!(line, " {} |", cell(d.at(&k, i, b, |p| p.busbw)));
                        }
                    }
                    let _ = writeln!(w, "{line}");
                }
                let _ = writeln!(w);
            }
        }
    }
}

fn notes(d: &Data, w: &mut String) {
    let _ = writeln!(w, "## Notes on this run\n");
    if d.runs.is_empty() {
        let _ = writeln!(w, "Every launch finished cleanly.");
        return;
    }
    // Group identical notes (same implementation, program, status and note).
    let mut groups: BTreeMap<(String, String, String, String), Vec<String>> = BTreeMap::new();
    for v in &d.runs {
        let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let where_ = match (
            s("transport").as_str(),
            v.get("ranks").and_then(Value::as_u64),
        ) {
            ("all", _) => "every transport".to_string(),
            (t, Some(0) | None) => t.to_string(),
            (t, Some(r)) => format!("{t} {r} ranks"),
        };
        groups
            .entry((s("impl"), s("prog"), s("status"), s("note")))
            .or_default()
            .push(where_);
    }
    for ((imp, prog, status, note), mut wh) in groups {
        wh.sort();
        wh.dedup();
        let _ = writeln!(
            w,
            "- {} `{prog}`: {status} ({}){}",
            impl_name(&imp),
            wh.join(", "),
            if note.is_empty() {
                String::new()
            } else {
                format!(" — {note}")
            }
        );
    }
}
