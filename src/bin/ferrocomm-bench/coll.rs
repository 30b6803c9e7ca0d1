//! Collective benchmarks (nccl-tests' `*_perf`, osu_allreduce, osu_bcast, osu_barrier).
//! Every rank times every call; the results are checked (see `values.rs`).

use std::time::Instant;

use ferrocomm::{Communicator, ReduceOp};

use crate::values::{self, POISON, Val};
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

/// `allreduce`: sum of every rank's `count` elements into a separate output, on every rank
/// (nccl-tests' all_reduce_perf, osu_allreduce; `MPI_Allreduce` with two buffers).
pub struct AllReduce<'c, T> {
    comm: &'c Communicator,
    send: Vec<T>,
    recv: Vec<T>,
}

impl<'c, T: Val> AllReduce<'c, T> {
    /// Buffers of `count` elements.
    pub fn new(comm: &'c Communicator, count: usize) -> Self {
        let (me, n) = (comm.rank(), comm.size());
        AllReduce {
            comm,
            send: (0..count)
                .map(|i| T::small(values::input(me, i, n)))
                .collect(),
            recv: vec![T::small(POISON); count],
        }
    }
}

impl<T: Val> Kernel for AllReduce<'_, T> {
    fn call(&mut self) -> Result<f64, BenchError> {
        let t = Instant::now();
        self.comm
            .all_reduce_into(&self.send, &mut self.recv, ReduceOp::Sum)?;
        Ok(t.elapsed().as_secs_f64())
    }

    fn poison(&mut self) {
        self.recv.fill(T::small(POISON));
    }

    fn check(&self) -> Option<String> {
        let n = self.comm.size();
        self.recv.iter().enumerate().find_map(|(i, &got)| {
            let want = T::small((0..n).map(|r| values::input(r, i, n)).sum());
            (got != want).then(|| format!("allreduce element {i} is {got:?}, expected {want:?}"))
        })
    }
}
