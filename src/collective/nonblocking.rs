//! Asynchronous collectives: `iall_reduce` and friends return a [`CollHandle`] at once and
//! run on a worker thread, so computation can overlap communication (the DDP layer
//! all-reduces a bucket of gradients while backward computes the next).
//!
//! # Rules
//!
//! - **Call order.** A communicator's asynchronous collectives run one after the other, in
//!   the order they were called, on one worker thread per communicator (started by the
//!   first asynchronous call). Every rank must start the same asynchronous collectives in
//!   the same order, as for blocking ones; a disagreement is reported as for blocking
//!   collectives ([`crate::Error::CollectiveMismatch`]).
//! - **Their own traffic.** The worker uses a communicator of its own, with a context
//!   derived from this one's (the same on every rank, whenever the worker starts), so its
//!   messages never mix with the blocking collectives or point-to-point messages the calling
//!   thread runs meanwhile. The two sequences are independent: blocking and asynchronous
//!   collectives may interleave differently on different ranks.
//! - **Owned buffers.** An asynchronous call takes its buffers by value (`Vec<T>`) and
//!   [`CollHandle::wait`] gives them back, so nothing borrowed can change under the
//!   transfer.
//! - **Waiting.** [`CollHandle::wait`] blocks until the collective finished;
//!   [`CollHandle::test`] says whether it has. The worker sleeps when it has nothing to do,
//!   and while a collective waits for peers it sleeps in the kernel like any waiting thread
//!   (it shares the process's engine; whichever thread waits drives it).
//! - **Dropping.** A handle dropped before completion does not cancel its collective (the
//!   other ranks expect it); the result is discarded. Dropping the communicator waits for
//!   the worker to finish every collective already started.
//! - **Errors.** A failed asynchronous collective fails the engine as a blocking one does,
//!   so later calls on every communicator of the process fail too, and the error is
//!   returned by the handle's `wait`.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::comm::Communicator;
use crate::element::{Element, ReduceOp};
use crate::error::{Error, Result};

use super::select::AllReduceOptions;

/// The result of an asynchronous collective, once it is there.
struct Slot<T> {
    value: Mutex<Option<Result<T>>>,
    ready: Condvar,
}

impl<T> Slot<T> {
    fn set(&self, r: Result<T>) {
        let mut v = self.value.lock().unwrap_or_else(|p| p.into_inner());
        *v = Some(r);
        self.ready.notify_all();
    }
}

/// A running asynchronous collective. See the [module documentation](self).
#[must_use = "an asynchronous collective's result (and its buffer) come back through wait"]
pub struct CollHandle<T> {
    slot: Arc<Slot<T>>,
}

impl<T> std::fmt::Debug for CollHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollHandle")
            .field("done", &self.test())
            .finish()
    }
}

impl<T> CollHandle<T> {
    /// Blocks until the collective has finished and returns its result (the buffer).
    pub fn wait(self) -> Result<T> {
        let mut v = self.slot.value.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = v.take() {
                return r;
            }
            v = self.slot.ready.wait(v).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Whether the collective has finished (then [`CollHandle::wait`] returns at once).
    pub fn test(&self) -> bool {
        self.slot
            .value
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

type Job = Box<dyn FnOnce(&Communicator) + Send>;

/// A communicator's worker thread.
pub(crate) struct Worker {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop after the jobs already queued.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Communicator {
    /// Queues `f` for this communicator's worker, starting the worker if needed.
    fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Communicator) -> Result<R> + Send + 'static,
    ) -> CollHandle<R> {
        let slot = Arc::new(Slot {
            value: Mutex::new(None),
            ready: Condvar::new(),
        });
        let out = Arc::clone(&slot);
        let job: Job = Box::new(move |c: &Communicator| {
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| f(c))).unwrap_or_else(|_| {
                Err(Error::Aborted(
                    "an asynchronous collective panicked on the worker thread".into(),
                ))
            });
            out.set(r);
        });
        let mut worker = self.worker.borrow_mut();
        if worker.is_none() {
            match self.start_worker() {
                Ok(w) => *worker = Some(w),
                Err(e) => {
                    slot.set(Err(e));
                    return CollHandle { slot };
                }
            }
        }
        let sent = worker
            .as_ref()
            .and_then(|w| w.tx.as_ref())
            .map(|tx| tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            slot.set(Err(Error::Aborted(
                "the asynchronous collective worker has stopped".into(),
            )));
        }
        CollHandle { slot }
    }

    fn start_worker(&self) -> Result<Worker> {
        let comm = self.async_comm();
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(format!("ferrocomm-async-{}", self.rank()))
            .spawn(move || {
                // Blocks (no spinning) until a job comes or the channel closes.
                while let Ok(job) = rx.recv() {
                    job(&comm);
                }
            })
            .map_err(|e| Error::io("starting the asynchronous collective worker thread", e))?;
        Ok(Worker {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Asynchronous [`Communicator::all_reduce`]; the handle gives `buf` back reduced.
    pub fn iall_reduce<T: Element>(&self, buf: Vec<T>, op: ReduceOp) -> CollHandle<Vec<T>> {
        self.iall_reduce_with(buf, op, AllReduceOptions::default())
    }

    /// Asynchronous [`Communicator::all_reduce_with`].
    pub fn iall_reduce_with<T: Element>(
        &self,
        mut buf: Vec<T>,
        op: ReduceOp,
        opts: AllReduceOptions,
    ) -> CollHandle<Vec<T>> {
        self.submit(move |c| c.all_reduce_with(&mut buf, op, &opts).map(|()| buf))
    }

    /// Asynchronous [`Communicator::broadcast`].
    pub fn ibroadcast<T: Element>(&self, mut buf: Vec<T>, root: usize) -> CollHandle<Vec<T>> {
        self.submit(move |c| c.broadcast(&mut buf, root).map(|()| buf))
    }

    /// Asynchronous [`Communicator::reduce_in_place`]: the root's buffer comes back reduced,
    /// the others' unchanged.
    pub fn ireduce<T: Element>(
        &self,
        mut buf: Vec<T>,
        op: ReduceOp,
        root: usize,
    ) -> CollHandle<Vec<T>> {
        self.submit(move |c| c.reduce_in_place(&mut buf, op, root).map(|()| buf))
    }

    /// Asynchronous [`Communicator::all_gather`]: returns the `size()` blocks.
    pub fn iall_gather<T: Element>(&self, send: Vec<T>) -> CollHandle<Vec<T>> {
        self.submit(move |c| {
            let mut out = vec![T::zeroed(); send.len() * c.size()];
            c.all_gather(&send, &mut out).map(|()| out)
        })
    }

    /// Asynchronous [`Communicator::reduce_scatter`]: returns this rank's block.
    pub fn ireduce_scatter<T: Element>(&self, send: Vec<T>, op: ReduceOp) -> CollHandle<Vec<T>> {
        self.submit(move |c| {
            let mut out = vec![T::zeroed(); send.len() / c.size().max(1)];
            c.reduce_scatter(&send, &mut out, op).map(|()| out)
        })
    }

    /// Asynchronous [`Communicator::gather`]: returns the `size()` blocks at the root, an
    /// empty vector elsewhere.
    pub fn igather<T: Element>(&self, send: Vec<T>, root: usize) -> CollHandle<Vec<T>> {
        self.submit(move |c| {
            let n = if c.rank() == root {
                send.len() * c.size()
            } else {
                0
            };
            let mut out = vec![T::zeroed(); n];
            c.gather(&send, &mut out, root).map(|()| out)
        })
    }

    /// Asynchronous [`Communicator::scatter`] of blocks of `count` elements: returns this
    /// rank's block (`send` is used at the root only).
    pub fn iscatter<T: Element>(
        &self,
        send: Vec<T>,
        count: usize,
        root: usize,
    ) -> CollHandle<Vec<T>> {
        self.submit(move |c| {
            let mut out = vec![T::zeroed(); count];
            c.scatter(&send, &mut out, root).map(|()| out)
        })
    }

    /// Asynchronous [`Communicator::all_to_all_in_place`].
    pub fn iall_to_all<T: Element>(&self, mut buf: Vec<T>) -> CollHandle<Vec<T>> {
        self.submit(move |c| c.all_to_all_in_place(&mut buf).map(|()| buf))
    }

    /// Asynchronous [`Communicator::barrier`].
    pub fn ibarrier(&self) -> CollHandle<()> {
        self.submit(|c| c.barrier())
    }
}
