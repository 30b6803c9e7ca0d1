//! all_reduce under a launcher: every rank contributes a vector, every rank gets the sum,
//! checks it, and rank 0 prints what it got and how long a few sizes took.
//!
//! ```text
//! target/release/ferrorun --nproc-per-node 4 -- target/release/examples/allreduce
//! FERROCOMM_TRANSPORT=tcp target/release/ferrorun --nproc-per-node 4 -- target/release/examples/allreduce
//! ```
//!
//! Like every example it initialises from the environment, so it also runs under srun,
//! mpirun, torchrun-style variables set by hand, or several `ferrorun --nnodes` nodes.

use std::process::ExitCode;
use std::time::Instant;

use ferrocomm::{Communicator, ReduceOp};

fn run(comm: &Communicator) -> ferrocomm::Result<()> {
    let (rank, size) = (comm.rank(), comm.size());
    // Rank r contributes r + 1 in every element: the sum is size * (size + 1) / 2.
    let want = (size * (size + 1) / 2) as f32;
    let mut small = vec![(rank + 1) as f32; 4];
    comm.all_reduce(&mut small, ReduceOp::Sum)?;
    println!(
        "rank {rank}/{size} (host {}, transport to the next rank: {}): all_reduce gave {:?}",
        comm.hostname(),
        if size > 1 {
            comm.transport_to((rank + 1) % size)?
        } else {
            "none"
        },
        small
    );
    if small.iter().any(|&x| x != want) {
        return Err(ferrocomm::Error::invalid(
            "allreduce example",
            "result",
            format!("expected {want} in every element, got {small:?}"),
        ));
    }
    // Averages too (DDP's gradient averaging), then a few sizes timed.
    comm.all_reduce(&mut small, ReduceOp::Avg)?;
    for elems in [1usize << 10, 1 << 16, 1 << 20, 1 << 22] {
        let mut v = vec![(rank + 1) as f32; elems];
        comm.barrier()?;
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            v.fill((rank + 1) as f32);
            comm.all_reduce(&mut v, ReduceOp::Sum)?;
        }
        let per_call = t.elapsed() / reps;
        if let Some(bad) = v.iter().position(|&x| x != want) {
            return Err(ferrocomm::Error::invalid(
                "allreduce example",
                "result",
                format!("element {bad} of {elems} is {}, expected {want}", v[bad]),
            ));
        }
        if rank == 0 {
            let bytes = elems * 4;
            // nccl-tests' bus bandwidth: what each link carried, comparable across sizes.
            let busbw = bytes as f64 * 2.0 * (size as f64 - 1.0)
                / size as f64
                / per_call.as_secs_f64()
                / 1e9;
            println!(
                "all_reduce of {:>8} f32 ({:>6} KiB): {:>9.1?} per call, busbw {busbw:.2} GB/s",
                elems,
                bytes >> 10,
                per_call
            );
        }
    }
    comm.barrier()?;
    if rank == 0 {
        println!("all {size} ranks agree: every element is {want}");
    }
    Ok(())
}

fn main() -> ExitCode {
    ferrocomm::init_logging();
    let comm = match ferrocomm::init() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("allreduce: cannot join the job: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&comm) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("allreduce: rank {}: {e}", comm.rank());
            ExitCode::FAILURE
        }
    }
}
