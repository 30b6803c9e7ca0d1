//! The collective calls of [`Communicator`].

use super::exec::{self, Reduction, finish_avg};
use super::select::{self, Algorithm, AllReduceAlgo, AllReduceOptions};
use super::{Call, CollOp, as_bytes, as_bytes_mut};
use crate::comm::Communicator;
use crate::element::{Element, ReduceOp};
use crate::error::{Error, Result};

/// What a collective call asks for, before it is checked and run.
struct Job<'a, T: Element> {
    op: CollOp,
    algo: Algorithm,
    redop: Option<ReduceOp>,
    count: usize,
    root: usize,
    in_place: bool,
    inp: &'a [T],
    out: &'a mut [T],
}

fn length(op: &str, arg: &str, want: usize, got: usize, why: &str) -> Result<()> {
    if want != got {
        return Err(Error::invalid(
            op,
            arg,
            format!("it has {got} elements but must have {want} ({why})"),
        ));
    }
    Ok(())
}

fn times(op: &str, count: usize, p: usize) -> Result<usize> {
    count.checked_mul(p).ok_or_else(|| {
        Error::invalid(
            op,
            "count",
            format!("{count} elements per rank times {p} ranks overflows"),
        )
    })
}

fn divisible(op: &str, arg: &str, len: usize, p: usize) -> Result<usize> {
    if !len.is_multiple_of(p) {
        return Err(Error::invalid(
            op,
            arg,
            format!("its {len} elements cannot be cut into {p} equal blocks, one per rank"),
        ));
    }
    Ok(len / p)
}

impl Communicator {
    fn check_root(&self, op: &str, root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(Error::invalid(
                op,
                "root",
                format!(
                    "{root} is out of range for a communicator of {} ranks",
                    self.size()
                ),
            ));
        }
        Ok(())
    }

    fn check_op<T: Element>(&self, name: &str, op: ReduceOp) -> Result<()> {
        op.check(T::DTYPE, name)
    }

    /// Runs a checked job: takes a sequence number, builds the schedule, executes it.
    fn run_job<T: Element>(&self, job: Job<'_, T>) -> Result<()> {
        let call = Call::begin(
            self,
            job.op,
            Some(T::DTYPE),
            job.redop,
            job.count,
            job.root,
            Some(job.algo),
        );
        let sched = job
            .algo
            .schedule(self.rank(), self.size(), job.count, job.root, job.in_place);
        tracing::trace!(
            rank = self.rank(),
            seq = call.seq,
            algo = %job.algo,
            count = job.count,
            "collective"
        );
        let red = job.redop.map(|op| Reduction {
            dtype: T::DTYPE,
            op,
        });
        exec::run(
            self,
            &call,
            &sched,
            std::mem::size_of::<T>(),
            red,
            as_bytes(job.inp),
            as_bytes_mut(job.out),
        )
    }

    /// Reduces `buf` element-wise over every rank, in place: afterwards every rank holds the
    /// same result, bit for bit. The algorithm is chosen automatically (see
    /// [`crate::collective::select`]); `FERROCOMM_ALLREDUCE_ALGO` overrides the choice.
    ///
    /// ```
    /// use ferrocomm::{Communicator, ReduceOp};
    /// let comms = Communicator::local_world(3);
    /// std::thread::scope(|s| {
    ///     for comm in comms {
    ///         s.spawn(move || {
    ///             let mut grad = vec![comm.rank() as f32; 4];
    ///             comm.all_reduce(&mut grad, ReduceOp::Sum).unwrap();
    ///             assert_eq!(grad, [3.0; 4]); // 0 + 1 + 2
    ///         });
    ///     }
    /// });
    /// ```
    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.all_reduce_with(buf, op, &AllReduceOptions::default())
    }

    /// [`Communicator::all_reduce`] with options (the algorithm).
    pub fn all_reduce_with<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        opts: &AllReduceOptions,
    ) -> Result<()> {
        self.check_op::<T>("all_reduce", op)?;
        self.all_reduce_job(None, buf, op, opts)
    }

    /// all_reduce into `out`, from `inp` (out of place) or from `out` itself (`None`).
    fn all_reduce_job<T: Element>(
        &self,
        inp: Option<&[T]>,
        buf: &mut [T],
        op: ReduceOp,
        opts: &AllReduceOptions,
    ) -> Result<()> {
        let choice = match opts.algo {
            AllReduceAlgo::Auto => self.shared.cfg.allreduce_algo,
            given => given,
        };
        let algo = choice.resolve(self.size(), buf.len(), std::mem::size_of_val(buf));
        let count = buf.len();
        self.run_job(Job {
            op: CollOp::AllReduce,
            algo,
            redop: Some(op),
            count,
            root: 0,
            in_place: inp.is_none(),
            inp: inp.unwrap_or(&[]),
            out: &mut *buf,
        })?;
        finish_avg(
            Reduction {
                dtype: T::DTYPE,
                op,
            },
            as_bytes_mut(buf),
            self.size(),
        )
    }

    /// Out-of-place [`Communicator::all_reduce`]: `recv` (as long as `send`) gets the
    /// reduction of every rank's `send`.
    pub fn all_reduce_into<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.check_op::<T>("all_reduce", op)?;
        length(
            "all_reduce",
            "recv",
            send.len(),
            recv.len(),
            "as long as send",
        )?;
        // Out of place: the schedule reads `send` where `recv` does not hold data yet, so
        // the input is not first copied whole into the output.
        self.all_reduce_job(Some(send), recv, op, &AllReduceOptions::default())
    }

    /// Copies the root's `buf` into every other rank's `buf` (all of the same length).
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        let (p, count) = (self.size(), buf.len());
        let algo = select::choose_broadcast(p, count, std::mem::size_of_val(buf));
        self.run_job(Job {
            op: CollOp::Broadcast,
            algo,
            redop: None,
            count,
            root,
            in_place: true,
            inp: &[],
            out: buf,
        })
    }

    /// Reduces every rank's `send` element-wise into the root's `recv` (as long as `send`);
    /// `recv` is not used on the other ranks (pass an empty slice). No rank's `send` is
    /// modified.
    pub fn reduce<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.check_root("reduce", root)?;
        self.check_op::<T>("reduce", op)?;
        let me_root = self.rank() == root;
        if me_root {
            length(
                "reduce",
                "recv",
                send.len(),
                recv.len(),
                "as long as send, at the root",
            )?;
        }
        let count = send.len();
        let algo = select::choose_reduce(self.size(), count, std::mem::size_of_val(send));
        let out: &mut [T] = if me_root { &mut *recv } else { &mut [] };
        self.run_job(Job {
            op: CollOp::Reduce,
            algo,
            redop: Some(op),
            count,
            root,
            in_place: false,
            inp: send,
            out,
        })?;
        if me_root {
            finish_avg(
                Reduction {
                    dtype: T::DTYPE,
                    op,
                },
                as_bytes_mut(recv),
                self.size(),
            )?;
        }
        Ok(())
    }

    /// In-place [`Communicator::reduce`]: the root's `buf` is its contribution and receives
    /// the result; the other ranks' `buf` is their contribution and is left unchanged.
    pub fn reduce_in_place<T: Element>(
        &self,
        buf: &mut [T],
        op: ReduceOp,
        root: usize,
    ) -> Result<()> {
        self.check_root("reduce", root)?;
        self.check_op::<T>("reduce", op)?;
        let count = buf.len();
        let algo = select::choose_reduce(self.size(), count, std::mem::size_of_val(buf));
        if self.rank() == root {
            self.run_job(Job {
                op: CollOp::Reduce,
                algo,
                redop: Some(op),
                count,
                root,
                in_place: true,
                inp: &[],
                out: &mut *buf,
            })?;
            finish_avg(
                Reduction {
                    dtype: T::DTYPE,
                    op,
                },
                as_bytes_mut(buf),
                self.size(),
            )
        } else {
            self.run_job(Job {
                op: CollOp::Reduce,
                algo,
                redop: Some(op),
                count,
                root,
                in_place: true,
                inp: buf,
                out: &mut [],
            })
        }
    }

    /// Gathers every rank's `send` block into every rank's `recv`, in rank order (`recv` is
    /// `size()` times as long as `send`).
    pub fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let p = self.size();
        let b = send.len();
        length(
            "all_gather",
            "recv",
            times("all_gather", b, p)?,
            recv.len(),
            "size() blocks of send's length",
        )?;
        let algo = select::choose_all_gather(p, std::mem::size_of_val(recv));
        self.run_job(Job {
            op: CollOp::AllGather,
            algo,
            redop: None,
            count: b,
            root: 0,
            in_place: false,
            inp: send,
            out: recv,
        })
    }

    /// In-place [`Communicator::all_gather`]: `buf` holds `size()` equal blocks and this
    /// rank's block is already at its place (`buf[rank * b..(rank + 1) * b]`).
    pub fn all_gather_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let p = self.size();
        let b = divisible("all_gather", "buf", buf.len(), p)?;
        let algo = select::choose_all_gather(p, std::mem::size_of_val(buf));
        self.run_job(Job {
            op: CollOp::AllGather,
            algo,
            redop: None,
            count: b,
            root: 0,
            in_place: true,
            inp: &[],
            out: buf,
        })
    }

    /// Reduces every rank's `send` (`size()` blocks of `recv`'s length) element-wise and
    /// leaves block `rank` of the result in `recv` (MPI_Reduce_scatter_block).
    pub fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        self.check_op::<T>("reduce_scatter", op)?;
        let p = self.size();
        let b = recv.len();
        length(
            "reduce_scatter",
            "send",
            times("reduce_scatter", b, p)?,
            send.len(),
            "size() blocks of recv's length",
        )?;
        let algo = select::choose_reduce_scatter(p, std::mem::size_of_val(send));
        self.run_job(Job {
            op: CollOp::ReduceScatter,
            algo,
            redop: Some(op),
            count: b,
            root: 0,
            in_place: false,
            inp: send,
            out: &mut *recv,
        })?;
        finish_avg(
            Reduction {
                dtype: T::DTYPE,
                op,
            },
            as_bytes_mut(recv),
            p,
        )
    }

    /// In-place [`Communicator::reduce_scatter`]: `buf` holds `size()` equal blocks; the
    /// result is left in this rank's block, `buf[rank * b..(rank + 1) * b]` (unlike MPI,
    /// which moves it to the front); the other blocks hold partial results afterwards.
    pub fn reduce_scatter_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        self.check_op::<T>("reduce_scatter", op)?;
        let p = self.size();
        let b = divisible("reduce_scatter", "buf", buf.len(), p)?;
        let algo = select::choose_reduce_scatter(p, std::mem::size_of_val(buf));
        self.run_job(Job {
            op: CollOp::ReduceScatter,
            algo,
            redop: Some(op),
            count: b,
            root: 0,
            in_place: true,
            inp: &[],
            out: &mut *buf,
        })?;
        let r = self.rank();
        finish_avg(
            Reduction {
                dtype: T::DTYPE,
                op,
            },
            as_bytes_mut(&mut buf[r * b..(r + 1) * b]),
            p,
        )
    }

    /// Gathers every rank's `send` block into the root's `recv` (`size()` times as long), in
    /// rank order; `recv` is not used on the other ranks (pass an empty slice).
    pub fn gather<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.check_root("gather", root)?;
        let p = self.size();
        let b = send.len();
        let me_root = self.rank() == root;
        if me_root {
            length(
                "gather",
                "recv",
                times("gather", b, p)?,
                recv.len(),
                "size() blocks of send's length, at the root",
            )?;
        }
        let out: &mut [T] = if me_root { recv } else { &mut [] };
        self.run_job(Job {
            op: CollOp::Gather,
            algo: Algorithm::GatherBinomial,
            redop: None,
            count: b,
            root,
            in_place: false,
            inp: send,
            out,
        })
    }

    /// In-place [`Communicator::gather`]: at the root `buf` is the whole output (`size()`
    /// blocks) with the root's own block already in place; at the other ranks `buf` is their
    /// block.
    pub fn gather_in_place<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root("gather", root)?;
        let p = self.size();
        if self.rank() == root {
            let b = divisible("gather", "buf", buf.len(), p)?;
            self.run_job(Job {
                op: CollOp::Gather,
                algo: Algorithm::GatherBinomial,
                redop: None,
                count: b,
                root,
                in_place: true,
                inp: &[],
                out: buf,
            })
        } else {
            self.run_job(Job {
                op: CollOp::Gather,
                algo: Algorithm::GatherBinomial,
                redop: None,
                count: buf.len(),
                root,
                in_place: true,
                inp: buf,
                out: &mut [],
            })
        }
    }

    /// Sends block `i` of the root's `send` (`size()` blocks of `recv`'s length) to rank
    /// `i`'s `recv`; `send` is not used on the other ranks (pass an empty slice).
    pub fn scatter<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.check_root("scatter", root)?;
        let p = self.size();
        let b = recv.len();
        let me_root = self.rank() == root;
        if me_root {
            length(
                "scatter",
                "send",
                times("scatter", b, p)?,
                send.len(),
                "size() blocks of recv's length, at the root",
            )?;
        }
        let inp: &[T] = if me_root { send } else { &[] };
        self.run_job(Job {
            op: CollOp::Scatter,
            algo: Algorithm::ScatterBinomial,
            redop: None,
            count: b,
            root,
            in_place: false,
            inp,
            out: recv,
        })
    }

    /// In-place [`Communicator::scatter`]: at the root `buf` is the whole input (`size()`
    /// blocks) and the root's own block stays where it is; at the other ranks `buf` receives
    /// their block.
    pub fn scatter_in_place<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root("scatter", root)?;
        let p = self.size();
        let b = if self.rank() == root {
            divisible("scatter", "buf", buf.len(), p)?
        } else {
            buf.len()
        };
        self.run_job(Job {
            op: CollOp::Scatter,
            algo: Algorithm::ScatterBinomial,
            redop: None,
            count: b,
            root,
            in_place: true,
            inp: &[],
            out: buf,
        })
    }

    /// Sends block `j` of `send` to rank `j`, which stores it as block `rank` of its `recv`
    /// (`send` and `recv` hold `size()` equal blocks).
    pub fn all_to_all<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let p = self.size();
        length(
            "all_to_all",
            "recv",
            send.len(),
            recv.len(),
            "as long as send",
        )?;
        let b = divisible("all_to_all", "send", send.len(), p)?;
        self.run_job(Job {
            op: CollOp::AllToAll,
            algo: Algorithm::AllToAllPairwise,
            redop: None,
            count: b,
            root: 0,
            in_place: false,
            inp: send,
            out: recv,
        })
    }

    /// In-place [`Communicator::all_to_all`] on `buf` (`size()` equal blocks).
    pub fn all_to_all_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let p = self.size();
        let b = divisible("all_to_all", "buf", buf.len(), p)?;
        self.run_job(Job {
            op: CollOp::AllToAll,
            algo: Algorithm::AllToAllPairwise,
            redop: None,
            count: b,
            root: 0,
            in_place: true,
            inp: &[],
            out: buf,
        })
    }

    /// Blocks until every rank of the communicator has called `barrier`
    /// ([dissemination](super::barrier), `⌈log2 P⌉` rounds of one-byte messages).
    pub fn barrier(&self) -> Result<()> {
        let call = Call::begin(
            self,
            CollOp::Barrier,
            None,
            None,
            0,
            0,
            Some(Algorithm::BarrierDissemination),
        );
        let sched = Algorithm::BarrierDissemination.schedule(self.rank(), self.size(), 0, 0, true);
        exec::run(self, &call, &sched, 1, None, &[], &mut [])
    }
}
