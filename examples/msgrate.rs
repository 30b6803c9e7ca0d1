//! Message rate between ranks 0 and 1: windows of non-blocking sends, one acknowledgement
//! per window.
//!
//! ```text
//! target/release/ferrorun --nproc-per-node 2 -- target/release/examples/msgrate [WINDOWS]
//! ```
//! Prints one line per size: bytes, messages per second and MB/s. Other ranks, if any,
//! wait at the barrier.

use std::process::ExitCode;
use std::time::Instant;

/// Messages in flight per window.
const WINDOW: usize = 64;

fn main() -> ExitCode {
    ferrocomm::init_logging();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msgrate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> ferrocomm::Result<()> {
    let windows: usize = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|_| {
            ferrocomm::Error::invalid("msgrate", "WINDOWS", format!("{a:?} is not a count"))
        })?,
        None => 200,
    };
    let comm = ferrocomm::init()?;
    if comm.size() < 2 {
        return Err(ferrocomm::Error::invalid(
            "msgrate",
            "world size",
            "needs at least 2 ranks",
        ));
    }
    let me = comm.rank();
    if me == 0 {
        println!("{:>10} {:>14} {:>10}", "bytes", "msgs_per_s", "MB/s");
    }
    for size in [8usize, 64, 1024, 8192] {
        let bufs: Vec<Vec<u8>> = (0..WINDOW).map(|_| vec![1u8; size]).collect();
        let mut rbufs: Vec<Vec<u8>> = (0..WINDOW).map(|_| vec![0u8; size]).collect();
        let mut ack = [0u8; 1];
        comm.barrier()?;
        let t = Instant::now();
        for _ in 0..windows {
            match me {
                0 => {
                    comm.scope(|s| {
                        let reqs = bufs
                            .iter()
                            .map(|b| s.isend(b, 1, 1))
                            .collect::<ferrocomm::Result<Vec<_>>>()?;
                        s.wait_all(reqs)
                    })?;
                    comm.recv(&mut ack, 1, 2u32)?;
                }
                1 => {
                    comm.scope(|s| {
                        let reqs = rbufs
                            .iter_mut()
                            .map(|b| s.irecv(b, 0, 1u32))
                            .collect::<ferrocomm::Result<Vec<_>>>()?;
                        s.wait_all(reqs)
                    })?;
                    comm.send(&ack, 0, 2)?;
                }
                _ => {}
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if me == 0 {
            let msgs = (windows * WINDOW) as f64;
            println!(
                "{size:>10} {:>14.0} {:>10.1}",
                msgs / secs,
                msgs * size as f64 / secs / 1e6
            );
        }
    }
    comm.barrier()
}
