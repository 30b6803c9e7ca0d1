//! Collective benchmarks (nccl-tests' `*_perf`, osu_allreduce, osu_bcast, osu_barrier).
//! Every rank times every call; the results are checked (see `values.rs`).

use std::time::Instant;

use ferrocomm::Communicator;

use crate::{BenchError, Kernel};

/// `barrier`: back-to-back barriers (osu_barrier).
pub struct Barrier<'c> {
    comm: &'c Communicator,
}

impl<'c> Barrier<'c> {
    /// A barrier kernel on `comm`.
    pub fn new(comm: &'c Communicator) -> Self {
        Barrier { comm }
    }
}

impl Kernel for Barrier<'_> {
    fn call(&mut self) -> Result<f64, BenchError> {
        let t = Instant::now();
        self.comm.barrier()?;
        Ok(t.elapsed().as_secs_f64())
    }

    fn poison(&mut self) {}

    fn check(&self) -> Option<String> {
        None
    }
}
