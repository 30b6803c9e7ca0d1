//! Ping-pong between ranks 0 and 1: half round-trip latency and bandwidth per message size.
//!
//! ```text
//! target/release/ferrorun --nproc-per-node 2 -- target/release/examples/pingpong [ITERS]
//! ```
//! Prints one line per size: bytes, median and minimum half round trip in microseconds,
//! and bandwidth (bytes / half round trip). Other ranks, if any, wait at the barrier.

use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    ferrocomm::init_logging();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pingpong: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> ferrocomm::Result<()> {
    let iters: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|_| {
            ferrocomm::Error::invalid("pingpong", "ITERS", format!("{a:?} is not a count"))
        })?,
        None => 2000,
    };
    let comm = ferrocomm::init()?;
    if comm.size() < 2 {
        return Err(ferrocomm::Error::invalid(
            "pingpong",
            "world size",
            "needs at least 2 ranks",
        ));
    }
    let me = comm.rank();
    if me == 0 {
        println!(
            "{:>10} {:>12} {:>12} {:>12}",
            "bytes", "p50_us", "min_us", "MB/s"
        );
    }
    let mut size = 1usize;
    while size <= 4 << 20 {
        let mut buf = vec![0u8; size];
        // Fewer iterations for large messages so every size takes about as long.
        let n = (iters * 8192 / size.max(8192)).max(20);
        let mut samples = Vec::with_capacity(n);
        for i in 0..n + 10 {
            let t = Instant::now();
            match me {
                0 => {
                    comm.send(&buf, 1, 0)?;
                    comm.recv(&mut buf, 1, 0u32)?;
                }
                1 => {
                    comm.recv(&mut buf, 0, 0u32)?;
                    comm.send(&buf, 0, 0)?;
                }
                _ => {}
            }
            if i >= 10 {
                samples.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
            }
        }
        if me == 0 {
            samples.sort_by(f64::total_cmp);
            let p50 = samples[samples.len() / 2];
            println!(
                "{size:>10} {p50:>12.2} {:>12.2} {:>12.1}",
                samples[0],
                size as f64 / p50
            );
        }
        size *= if size < 64 { 8 } else { 4 };
    }
    comm.barrier()
}
