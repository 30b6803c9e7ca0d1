//! Unidirectional streaming bandwidth from rank 0 to rank 1, the way the OSU and the
//! `../shared/peers` `bw` benchmarks measure it: per iteration rank 0 starts a window of 64
//! non-blocking sends of one buffer, rank 1 a window of 64 receives into one buffer, and rank
//! 1 answers with a 1-byte acknowledgement once all have arrived.
//!
//! ```text
//! target/release/ferrorun --nproc-per-node 2 -- target/release/examples/bw [SECONDS_PER_SIZE]
//! ```
//! Prints one line per size (4 KiB to 16 MiB): bytes, iterations and MB/s (1 MB = 1e6 B).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferrocomm::transport::{RecvBuf, SendBuf};
use ferrocomm::{Communicator, RawRequest, Source, Tag};

const WINDOW: usize = 64;

fn main() -> ExitCode {
    ferrocomm::init_logging();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bw: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One window: 64 transfers and the acknowledgement.
fn window(comm: &Communicator, sbuf: &[u8], rbuf: &mut [u8]) -> ferrocomm::Result<()> {
    let mut reqs: Vec<RawRequest> = Vec::with_capacity(WINDOW);
    match comm.rank() {
        0 => {
            for _ in 0..WINDOW {
                // SAFETY: every request is waited for below, before `sbuf`'s borrow ends.
                reqs.push(unsafe { comm.isend_raw(SendBuf::new(sbuf), 1, 10)? });
            }
            for r in reqs {
                r.wait()?;
            }
            comm.recv(&mut [0u8], 1, 11u32)?;
        }
        1 => {
            let dst = RecvBuf::new(rbuf);
            for _ in 0..WINDOW {
                // SAFETY: all requests are waited for below, before `rbuf`'s borrow ends.
                // They share one buffer on purpose, as the MPI benchmark does: the bytes are
                // not looked at, and the transport completes one receive at a time.
                reqs.push(unsafe { comm.irecv_raw(dst, Source::Rank(0), Tag::Value(10))? });
            }
            for r in reqs {
                r.wait()?;
            }
            comm.send(&[1u8], 0, 11)?;
        }
        _ => {}
    }
    Ok(())
}

fn run() -> ferrocomm::Result<()> {
    let secs: f64 = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|_| {
            ferrocomm::Error::invalid("bw", "SECONDS_PER_SIZE", format!("{a:?} is not a number"))
        })?,
        None => 0.15,
    };
    let comm = ferrocomm::init()?;
    if comm.size() < 2 {
        return Err(ferrocomm::Error::invalid(
            "bw",
            "world size",
            "needs at least 2 ranks",
        ));
    }
    let max = 16 << 20;
    let sbuf = vec![b'a'; max];
    let mut rbuf = vec![b'b'; max];
    let mut size = 4096usize;
    while size <= max {
        comm.barrier()?;
        window(&comm, &sbuf[..size], &mut rbuf[..size])?;
        // Rank 0 decides how many windows, so both run the same number.
        let mut iters = 0u64;
        let start = Instant::now();
        loop {
            let mut go = [1u8];
            if comm.rank() == 0 && start.elapsed() >= Duration::from_secs_f64(secs) {
                go[0] = 0;
            }
            match comm.rank() {
                0 => comm.send(&go, 1, 12)?,
                1 => {
                    comm.recv(&mut go, 0, 12u32)?;
                }
                _ => go[0] = 0,
            }
            if go[0] == 0 {
                break;
            }
            window(&comm, &sbuf[..size], &mut rbuf[..size])?;
            iters += 1;
        }
        let t = start.elapsed().as_secs_f64();
        if comm.rank() == 0 {
            let mbps = (size * WINDOW) as f64 * iters as f64 / t / 1e6;
            println!("bw bytes={size} iters={iters} MBps={mbps:.1}");
        }
        size *= 4;
    }
    comm.barrier()
}
