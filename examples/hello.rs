//! Hello from every rank, then a token passed once around the ring of all ranks.
//!
//! ```text
//! cargo build --release --examples --bins
//! target/release/ferrorun --nproc-per-node 4 -- target/release/examples/hello
//! ```
//! Also runs under `srun`, `mpirun`, or by hand with MASTER_ADDR, MASTER_PORT, RANK and
//! WORLD_SIZE set for each process.

use std::process::ExitCode;

fn main() -> ExitCode {
    ferrocomm::init_logging();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> ferrocomm::Result<()> {
    let comm = ferrocomm::init()?;
    let (rank, size) = (comm.rank(), comm.size());
    println!(
        "hello from rank {rank} of {size} (local rank {} of {} on host {}, node {})",
        comm.local_rank(),
        comm.local_size(),
        comm.hostname(),
        comm.node_index(),
    );

    // Pass a token around the ring: rank 0 starts it, every rank adds its own rank.
    let mut token = [0u64];
    if size > 1 {
        let (next, prev) = ((rank + 1) % size, (rank + size - 1) % size);
        if rank == 0 {
            comm.send(&token, next, 0)?;
            comm.recv(&mut token, prev, 0u32)?;
        } else {
            comm.recv(&mut token, prev, 0u32)?;
            token[0] += rank as u64;
            comm.send(&token, next, 0)?;
        }
    }
    comm.barrier()?;
    if rank == 0 {
        let expected = (size as u64) * (size as u64 - 1) / 2;
        if token[0] != expected {
            return Err(ferrocomm::Error::misbehaved(
                "the ring",
                format!("token came back as {} instead of {expected}", token[0]),
            ));
        }
        println!(
            "token went around {size} ranks and came back as {} (expected {expected}): ok",
            token[0]
        );
    }
    Ok(())
}
