//! Results: an nccl-tests-style table for people, JSON lines for programs.
//!
//! The JSON keys are the same for ferrocomm and the MPI peers (`bench/peers/mpi-bench.c`),
//! so `scripts/bench-compare` reads both alike. 1 GB = 1e9 bytes.

use serde::Serialize;

/// One measured point (one operation at one size), as printed by rank 0.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Who was measured: `ferrocomm` (the peers print `openmpi` or `mpich`).
    #[serde(rename = "impl")]
    pub implementation: &'static str,
    /// The operation (`latency`, `bandwidth`, `bibw`, `allreduce`, ...).
    pub op: &'static str,
    /// The transport between rank 0 and its peers, as the communicator reports it.
    pub transport: String,
    /// World size.
    pub ranks: usize,
    /// Element type.
    pub dtype: &'static str,
    /// Bytes of the operation (nccl-tests' size: the whole buffer of a collective).
    pub bytes: u64,
    /// Elements of `dtype` in `bytes`.
    pub count: u64,
    /// Median microseconds per operation (half the round trip for `latency`; per message
    /// for `bandwidth` and `bibw`); for collectives the mean over ranks of each rank's
    /// median.
    pub usec: f64,
    /// Collectives: the fastest rank's median; point-to-point: the fastest call.
    pub usec_min: f64,
    /// Collectives: the slowest rank's median.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usec_max: Option<f64>,
    /// Point-to-point: the 99th percentile call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usec_p99: Option<f64>,
    /// Algorithm bandwidth, GB/s: bytes / usec (both directions for `bibw`).
    pub algbw_gbps: f64,
    /// Bus bandwidth, GB/s: algbw times nccl-tests' factor for the operation.
    pub busbw_gbps: f64,
    /// Timed calls (per rank).
    pub iters: u64,
    /// Messages in flight per iteration (`bandwidth`, `bibw`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
    /// The algorithm ferrocomm ran (collectives; the library's name, e.g. `ring`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algo: Option<String>,
    /// Root rank (`broadcast`, `reduce`, `gather`, `scatter`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<usize>,
    /// Reduction (`allreduce`, `reduce_scatter`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redop: Option<&'static str>,
    /// `ok` when the results were verified (a wrong result makes the program fail).
    pub check: &'static str,
}

/// nccl-tests' bus-bandwidth factor of an operation on `n` ranks: busbw = algbw × factor.
pub fn busbw_factor(op: &str, n: usize) -> f64 {
    let n = n as f64;
    match op {
        "allreduce" => 2.0 * (n - 1.0) / n,
        // gather and scatter: size = the root's whole buffer, of which (n-1)/n crosses links.
        "allgather" | "reduce_scatter" | "alltoall" | "gather" | "scatter" => (n - 1.0) / n,
        // broadcast, reduce and point-to-point: every byte crosses one link once.
        _ => 1.0,
    }
}

/// Whether rows of `op` have per-rank min/max (collectives) or per-call quantiles (p2p).
fn is_p2p(op: &str) -> bool {
    matches!(op, "latency" | "bandwidth" | "bibw")
}

/// Prints the table's title and column headers.
pub fn print_header(title: &str, op: &str) {
    println!("# {title}");
    println!("#");
    if is_p2p(op) {
        println!(
            "# {:>12} {:>12} {:>5} {:>11} {:>11} {:>11} {:>9} {:>9} {:>8} {:>5}",
            "size", "count", "type", "time", "min", "p99", "algbw", "busbw", "iters", "check"
        );
    } else {
        println!(
            "# {:>12} {:>12} {:>5} {:>11} {:>11} {:>11} {:>9} {:>9} {:>8} {:>5}",
            "size", "count", "type", "time", "min", "max", "algbw", "busbw", "iters", "check"
        );
    }
    println!(
        "# {:>12} {:>12} {:>5} {:>11} {:>11} {:>11} {:>9} {:>9} {:>8} {:>5}",
        "(B)", "(elements)", "", "(us)", "(us)", "(us)", "(GB/s)", "(GB/s)", "", ""
    );
}

/// Prints one row, as a table line or (with `json`) one JSON object.
pub fn print_row(row: &Row, json: bool) {
    if json {
        match serde_json::to_string(row) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("ferrocomm-bench: cannot encode a result: {e}"),
        }
        return;
    }
    let third = row.usec_max.or(row.usec_p99).unwrap_or(f64::NAN);
    println!(
        "  {:>12} {:>12} {:>5} {:>11} {:>11} {:>11} {:>9} {:>9} {:>8} {:>5}",
        row.bytes,
        row.count,
        row.dtype,
        fmt_us(row.usec),
        fmt_us(row.usec_min),
        fmt_us(third),
        fmt_gbps(row.algbw_gbps),
        fmt_gbps(row.busbw_gbps),
        row.iters,
        row.check
    );
}

fn fmt_us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{v:.0}")
    } else if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_gbps(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// GB/s (1e9 B/s) of `bytes` moved in `usec` microseconds; 0 for an empty or instant op.
pub fn gbps(bytes: f64, usec: f64) -> f64 {
    if usec > 0.0 { bytes / usec / 1e3 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_tests_bus_bandwidth_factors() {
        assert_eq!(busbw_factor("allreduce", 2), 1.0);
        assert_eq!(busbw_factor("allreduce", 4), 1.5);
        assert_eq!(busbw_factor("allgather", 4), 0.75);
        assert_eq!(busbw_factor("reduce_scatter", 8), 0.875);
        assert_eq!(busbw_factor("alltoall", 2), 0.5);
        assert_eq!(busbw_factor("broadcast", 8), 1.0);
        assert_eq!(busbw_factor("reduce", 8), 1.0);
        assert_eq!(busbw_factor("gather", 4), 0.75);
        assert_eq!(busbw_factor("scatter", 2), 0.5);
        assert_eq!(busbw_factor("latency", 2), 1.0);
    }

    #[test]
    fn gigabytes_are_decimal() {
        // 1 MB in 1000 us = 1 GB/s.
        assert_eq!(gbps(1e6, 1000.0), 1.0);
        assert_eq!(gbps(8.0, 0.0), 0.0);
    }

    #[test]
    fn json_rows_have_the_documented_keys() {
        let row = Row {
            implementation: "ferrocomm",
            op: "latency",
            transport: "tcp".into(),
            ranks: 2,
            dtype: "u8",
            bytes: 8,
            count: 8,
            usec: 10.0,
            usec_min: 9.0,
            usec_max: None,
            usec_p99: Some(20.0),
            algbw_gbps: 0.0008,
            busbw_gbps: 0.0008,
            iters: 100,
            window: None,
            algo: None,
            root: None,
            redop: None,
            check: "ok",
        };
        let v: serde_json::Value = serde_json::to_value(&row).unwrap();
        for k in [
            "impl",
            "op",
            "transport",
            "ranks",
            "bytes",
            "usec",
            "algbw_gbps",
            "busbw_gbps",
        ] {
            assert!(v.get(k).is_some(), "missing {k} in {v}");
        }
        assert!(v.get("usec_max").is_none() && v.get("window").is_none());
    }
}
