//! Collective benchmarks (nccl-tests' `*_perf`, osu_allreduce, osu_bcast, osu_reduce,
//! osu_gather, osu_scatter, osu_barrier).
//! Every rank times every call; the results are checked (see `values.rs`): the output is
//! poisoned before the timed calls and compared element by element with its exact expected
//! value after them (or after every call with `--check all`).

use std::time::Instant;

use ferrocomm::collective::select;
use ferrocomm::{Algorithm, AllReduceAlgo, AllReduceOptions, Communicator, ReduceOp};

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

/// Which collective a [`Coll`] kernel times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// `all_reduce`, out of place (the input is copied to the output, which is reduced in
    /// place: what `all_reduce_into` and MPI's out-of-place MPI_Allreduce do).
    AllReduce,
    /// `broadcast` from a root, in place.
    Broadcast,
    /// `all_gather`: each rank contributes `count / n` elements.
    AllGather,
    /// `reduce_scatter` (MPI_Reduce_scatter_block): each rank keeps `count / n` elements.
    ReduceScatter,
    /// `all_to_all`: `count / n` elements to every rank.
    AllToAll,
    /// `reduce` to a root, out of place (the root's output is the whole buffer).
    Reduce,
    /// `gather` to a root: each rank contributes `count / n` elements, the root's output is
    /// the whole buffer.
    Gather,
    /// `scatter` from a root: the root's input is the whole buffer, each rank receives
    /// `count / n` elements.
    Scatter,
}

impl Which {
    /// The name in JSON rows (nccl-tests' spelling, as `bench/peers/mpi-bench.c` prints it).
    pub fn name(self) -> &'static str {
        match self {
            Which::AllReduce => "allreduce",
            Which::Broadcast => "broadcast",
            Which::AllGather => "allgather",
            Which::ReduceScatter => "reduce_scatter",
            Which::AllToAll => "alltoall",
            Which::Reduce => "reduce",
            Which::Gather => "gather",
            Which::Scatter => "scatter",
        }
    }

    /// Whether the operation cuts its buffer into one block per rank (its element count
    /// must then be a multiple of the rank count).
    pub fn blocked(self) -> bool {
        matches!(
            self,
            Which::AllGather
                | Which::ReduceScatter
                | Which::AllToAll
                | Which::Gather
                | Which::Scatter
        )
    }

    /// Whether the operation has a root (takes `--root`).
    pub fn rooted(self) -> bool {
        matches!(
            self,
            Which::Broadcast | Which::Reduce | Which::Gather | Which::Scatter
        )
    }

    /// Whether the operation reduces (takes `--op`).
    pub fn reduces(self) -> bool {
        matches!(
            self,
            Which::AllReduce | Which::ReduceScatter | Which::Reduce
        )
    }

    /// The algorithm ferrocomm runs for `count` elements of `esize` bytes on `comm` (the
    /// whole buffer: nccl-tests' size), as the library chooses it.
    pub fn algorithm(
        self,
        comm: &Communicator,
        count: usize,
        esize: usize,
        opts: &AllReduceOptions,
    ) -> Algorithm {
        let p = comm.size();
        let bytes = count * esize;
        match self {
            Which::AllReduce => {
                let choice = match opts.algo {
                    AllReduceAlgo::Auto => comm.config().allreduce_algo,
                    given => given,
                };
                choice.resolve(p, count, bytes)
            }
            Which::Broadcast => select::choose_broadcast(p, count, bytes),
            Which::AllGather => select::choose_all_gather(p, bytes),
            Which::ReduceScatter => select::choose_reduce_scatter(p, bytes),
            Which::AllToAll => Algorithm::AllToAllPairwise,
            Which::Reduce => select::choose_reduce(p, count, bytes),
            Which::Gather => Algorithm::GatherBinomial,
            Which::Scatter => Algorithm::ScatterBinomial,
        }
    }
}

/// A collective on fixed buffers of `count` elements in all (nccl-tests' size: the whole
/// buffer; for the blocked operations `count / n` per block). Inputs follow
/// [`values::input`] (for `prod`, [`values::reduce_input`]), so every output element has a
/// known exact value.
pub struct Coll<'c, T> {
    comm: &'c Communicator,
    which: Which,
    op: ReduceOp,
    opts: AllReduceOptions,
    root: usize,
    block: usize,
    sbuf: Vec<T>,
    rbuf: Vec<T>,
}

impl<'c, T: Val> Coll<'c, T> {
    /// Buffers for `which` over `count` elements (a multiple of the rank count for the
    /// blocked operations); `op` for the reductions, `opts` for all_reduce, `root` for
    /// the rooted operations (the root's output of reduce and gather is the whole buffer;
    /// the other ranks have none).
    pub fn new(
        comm: &'c Communicator,
        which: Which,
        count: usize,
        op: ReduceOp,
        opts: AllReduceOptions,
        root: usize,
    ) -> Self {
        let (me, n) = (comm.rank(), comm.size());
        let block = count / n.max(1);
        let poison = || vec![T::small(POISON); count];
        let full = |f: &dyn Fn(usize) -> u32| (0..count).map(|i| T::small(f(i))).collect();
        let (sbuf, rbuf) = match which {
            Which::AllReduce | Which::ReduceScatter => {
                let s: Vec<T> = full(&|i| values::reduce_input(op, me, i, n));
                let r = if which == Which::AllReduce {
                    poison()
                } else {
                    vec![T::small(POISON); block]
                };
                (s, r)
            }
            Which::Broadcast => {
                let r = if me == root {
                    full(&|i| values::input(root, i, n))
                } else {
                    poison()
                };
                (Vec::new(), r)
            }
            Which::AllGather => {
                let s = (0..block)
                    .map(|j| T::small(values::input(me, me * block + j, n)))
                    .collect();
                (s, poison())
            }
            Which::AllToAll => (full(&|i| values::input(me, i, n)), poison()),
            Which::Reduce => {
                let s: Vec<T> = full(&|i| values::reduce_input(op, me, i, n));
                (s, if me == root { poison() } else { Vec::new() })
            }
            Which::Gather => {
                let s = (0..block)
                    .map(|j| T::small(values::input(me, me * block + j, n)))
                    .collect();
                (s, if me == root { poison() } else { Vec::new() })
            }
            Which::Scatter => {
                let s = if me == root {
                    full(&|i| values::input(root, i, n))
                } else {
                    Vec::new()
                };
                (s, vec![T::small(POISON); block])
            }
        };
        Coll {
            comm,
            which,
            op,
            opts,
            root,
            block,
            sbuf,
            rbuf,
        }
    }

    /// What output element `i` of this rank must be.
    fn want(&self, i: usize) -> Option<T> {
        let (me, n, b) = (self.comm.rank(), self.comm.size(), self.block);
        match self.which {
            Which::AllReduce | Which::Reduce => values::expected(self.op, i, n),
            Which::ReduceScatter => values::expected(self.op, me * b + i, n),
            Which::Broadcast => Some(T::small(values::input(self.root, i, n))),
            Which::AllGather | Which::Gather => Some(T::small(values::input(i / b.max(1), i, n))),
            Which::Scatter => Some(T::small(values::input(self.root, me * b + i, n))),
            Which::AllToAll => Some(T::small(values::input(
                i / b.max(1),
                me * b + i % b.max(1),
                n,
            ))),
        }
    }
}

impl<T: Val> Kernel for Coll<'_, T> {
    fn call(&mut self) -> Result<f64, BenchError> {
        let c = self.comm;
        let t = Instant::now();
        match self.which {
            Which::AllReduce => {
                self.rbuf.copy_from_slice(&self.sbuf);
                c.all_reduce_with(&mut self.rbuf, self.op, &self.opts)?;
            }
            Which::Broadcast => c.broadcast(&mut self.rbuf, self.root)?,
            Which::AllGather => c.all_gather(&self.sbuf, &mut self.rbuf)?,
            Which::ReduceScatter => c.reduce_scatter(&self.sbuf, &mut self.rbuf, self.op)?,
            Which::AllToAll => c.all_to_all(&self.sbuf, &mut self.rbuf)?,
            Which::Reduce => c.reduce(&self.sbuf, &mut self.rbuf, self.op, self.root)?,
            Which::Gather => c.gather(&self.sbuf, &mut self.rbuf, self.root)?,
            Which::Scatter => c.scatter(&self.sbuf, &mut self.rbuf, self.root)?,
        }
        Ok(t.elapsed().as_secs_f64())
    }

    fn poison(&mut self) {
        if self.which == Which::Broadcast && self.comm.rank() == self.root {
            return;
        }
        self.rbuf.fill(T::small(POISON));
    }

    fn check(&self) -> Option<String> {
        let what = self.which.name();
        for (i, got) in self.rbuf.iter().enumerate() {
            let Some(want) = self.want(i) else {
                return Some(format!(
                    "{what}: no expected value for {} over {}",
                    self.op,
                    T::DTYPE
                ));
            };
            // Compare bit patterns: exact, and NaN never equals anything.
            if bytemuck::bytes_of(got) != bytemuck::bytes_of(&want) {
                return Some(format!(
                    "{what} output element {i} is {got:?}, expected {want:?}{}",
                    if self.which.reduces() {
                        format!(" ({} over {} ranks)", self.op, self.comm.size())
                    } else {
                        String::new()
                    }
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Which; 8] = [
        Which::AllReduce,
        Which::Broadcast,
        Which::AllGather,
        Which::ReduceScatter,
        Which::AllToAll,
        Which::Reduce,
        Which::Gather,
        Which::Scatter,
    ];

    /// Runs `which` on `n` thread ranks with `count` elements; each rank returns what its
    /// check said after a correct call, after its output was poisoned, and after one element
    /// was corrupted.
    fn run<T: Val>(
        which: Which,
        n: usize,
        count: usize,
        op: ReduceOp,
        algo: AllReduceAlgo,
    ) -> Vec<[Option<String>; 3]> {
        let comms = Communicator::local_world(n);
        std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let root = n - 1;
                        let opts = AllReduceOptions::algo(algo);
                        let mut k = Coll::<T>::new(&comm, which, count, op, opts, root);
                        k.poison();
                        k.call().expect("the collective runs");
                        let ok = k.check();
                        k.poison();
                        let poisoned = k.check();
                        k.call().expect("the collective runs again");
                        if let Some(last) = k.rbuf.last_mut() {
                            *last = T::small(POISON);
                        }
                        let corrupted = k.check();
                        [ok, poisoned, corrupted]
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("rank thread"))
                .collect()
        })
    }

    fn expect_checked(which: Which, n: usize, op: ReduceOp, got: &[[Option<String>; 3]]) {
        for (r, [ok, poisoned, corrupted]) in got.iter().enumerate() {
            let at = format!("{} {op} n={n} rank {r}", which.name());
            assert_eq!(ok, &None, "{at}: a correct result was refused");
            let root_keeps = which == Which::Broadcast && r == n - 1;
            // Reduce and gather leave the other ranks without output: nothing to check.
            let no_output = matches!(which, Which::Reduce | Which::Gather) && r != n - 1;
            assert_eq!(
                poisoned.is_some(),
                !root_keeps && !no_output,
                "{at}: output not written: {poisoned:?}"
            );
            if no_output {
                assert_eq!(corrupted, &None, "{at}");
                continue;
            }
            let msg = corrupted.as_deref().unwrap_or_default();
            assert!(
                msg.contains(which.name()) && msg.contains("expected"),
                "{at}: a corrupted element was not found: {corrupted:?}"
            );
        }
    }

    #[test]
    fn correct_results_pass_and_wrong_ones_are_found() {
        for n in [1, 2, 3, 4] {
            for which in ALL {
                let count = 12 * n;
                let got = run::<f32>(which, n, count, ReduceOp::Sum, AllReduceAlgo::Auto);
                expect_checked(which, n, ReduceOp::Sum, &got);
            }
        }
    }

    #[test]
    fn every_reduction_and_algorithm_is_checked_exactly() {
        for n in [2, 3, 4] {
            for op in ReduceOp::ALL {
                for algo in AllReduceAlgo::ALL {
                    let got = run::<half::bf16>(Which::AllReduce, n, 8 * n, op, algo);
                    expect_checked(Which::AllReduce, n, op, &got);
                }
                for w in [Which::ReduceScatter, Which::Reduce] {
                    let got = run::<f64>(w, n, 8 * n, op, AllReduceAlgo::Auto);
                    expect_checked(w, n, op, &got);
                }
                if op != ReduceOp::Avg {
                    let got = run::<i8>(Which::AllReduce, n, 8 * n, op, AllReduceAlgo::Auto);
                    expect_checked(Which::AllReduce, n, op, &got);
                }
            }
        }
    }

    #[test]
    fn algorithm_names_follow_the_library_choice() {
        let comms = Communicator::local_world(1);
        let c = &comms[0];
        let auto = AllReduceOptions::default();
        let ring = AllReduceOptions::algo(AllReduceAlgo::Ring);
        assert_eq!(
            Which::AllReduce.algorithm(c, 1, 4, &ring),
            Algorithm::AllReduceRing
        );
        assert_eq!(
            Which::AllReduce.algorithm(c, 1, 4, &auto),
            select::choose_all_reduce(1, 1, 4)
        );
        assert_eq!(
            Which::AllToAll.algorithm(c, 8, 4, &auto),
            Algorithm::AllToAllPairwise
        );
        assert!(Which::AllGather.blocked() && !Which::AllReduce.blocked());
        assert!(Which::ReduceScatter.reduces() && !Which::Broadcast.reduces());
        assert!(Which::Reduce.reduces() && !Which::Gather.reduces());
        assert!(Which::Gather.blocked() && Which::Scatter.blocked() && !Which::Reduce.blocked());
        assert!(Which::Scatter.rooted() && !Which::AllGather.rooted());
        assert_eq!(
            Which::Reduce.algorithm(c, 1 << 20, 4, &auto),
            select::choose_reduce(1, 1 << 20, 4 << 20)
        );
    }
}
