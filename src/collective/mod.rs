//! Collective operations, written once against the communicator's point-to-point layer so
//! they run over every transport.
//!
//! Every collective call takes the communicator's next sequence number and sends its
//! messages in the communicator's collective context with that number as tag. Each message
//! also carries the call's fingerprint (operation, element type, count, root): a rank that
//! receives a message of a different call at the same point of the sequence fails with
//! [`Error::CollectiveMismatch`] naming both calls, instead of mixing data.

use crate::comm::envelope::{Env, KIND_COLL};
use crate::comm::{Communicator, RawRequest, Source};
use crate::element::DType;
use crate::error::{Error, Result};
use crate::transport::{RecvBuf, SendBuf};

/// Which collective a message belongs to (its code travels in the envelope).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CollOp {
    Barrier = 1,
}

impl CollOp {
    fn name(code: u8) -> &'static str {
        match code {
            1 => "barrier",
            _ => "unknown collective",
        }
    }
}

/// The identity of one collective call, carried by each of its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Call {
    pub op: CollOp,
    pub dtype: Option<DType>,
    pub redop: u8,
    pub count: u64,
    pub root: u32,
    pub seq: u32,
    pub ctx: u64,
}

impl Call {
    /// Starts a call on `comm`: takes its next sequence number.
    pub fn begin(
        comm: &Communicator,
        op: CollOp,
        dtype: Option<DType>,
        count: usize,
        root: usize,
    ) -> Call {
        let seq = comm.coll_seq.get();
        comm.coll_seq.set(seq.wrapping_add(1));
        Call {
            op,
            dtype,
            redop: 0,
            count: count as u64,
            root: root as u32,
            seq,
            ctx: comm.ctx + 1,
        }
    }

    fn env(&self, step: u32) -> Env {
        Env {
            ctx: self.ctx,
            tag: self.seq,
            kind: KIND_COLL,
            op: self.op as u8,
            dtype: self.dtype.map_or(u8::MAX, |d| d as u8),
            redop: self.redop,
            root: self.root,
            count: self.count,
            step,
        }
    }

    fn describe(op: u8, dtype: u8, count: u64, root: u32) -> String {
        let dtype = DType::from_code(dtype).map_or("-", |d| d.name());
        format!(
            "{}(type {dtype}, count {count}, root {root})",
            CollOp::name(op)
        )
    }

    /// Starts sending `data` to `dst` as step `step` of this call.
    ///
    /// # Safety
    /// `data` must stay valid and unchanged until the request completes or is dropped.
    pub unsafe fn isend(
        &self,
        comm: &Communicator,
        data: &[u8],
        dst: usize,
        step: u32,
    ) -> Result<RawRequest> {
        // SAFETY: forwarded.
        unsafe { comm.isend_ctx(SendBuf::new(data), dst, &self.env(step), "collective send") }
    }

    /// Starts receiving step `step` of this call from `src` into `buf`.
    ///
    /// # Safety
    /// `buf` must stay valid and unused until the request completes or is dropped.
    pub unsafe fn irecv(
        &self,
        comm: &Communicator,
        buf: &mut [u8],
        src: usize,
    ) -> Result<RawRequest> {
        // SAFETY: forwarded.
        unsafe {
            comm.irecv_ctx(
                RecvBuf::new(buf),
                Source::Rank(src),
                self.ctx,
                Some(self.seq),
                "collective recv",
            )
        }
    }

    /// Waits for a receive of this call and checks the sender made the same call.
    pub fn finish_recv(&self, comm: &Communicator, req: RawRequest) -> Result<usize> {
        let (st, env) = req.wait_env()?;
        let mine = self.env(env.step);
        if (env.op, env.dtype, env.count, env.root, env.redop)
            != (mine.op, mine.dtype, mine.count, mine.root, mine.redop)
        {
            return Err(Error::CollectiveMismatch {
                rank: comm.rank(),
                detail: format!(
                    "call #{} on this rank is {}, but rank {} called {}; every rank must make the \
                     same collective calls in the same order with matching arguments",
                    self.seq,
                    Call::describe(mine.op, mine.dtype, mine.count, mine.root),
                    st.source,
                    Call::describe(env.op, env.dtype, env.count, env.root),
                ),
            });
        }
        Ok(st.bytes)
    }
}

impl Communicator {
    /// Blocks until every rank of the communicator has called `barrier`.
    ///
    /// Dissemination algorithm (Hensgen, Finkel and Manber 1988): in round k each rank
    /// signals rank + 2^k and waits for rank - 2^k; ⌈log2 P⌉ rounds of zero-byte messages.
    pub fn barrier(&self) -> Result<()> {
        let call = Call::begin(self, CollOp::Barrier, None, 0, 0);
        let (n, me) = (self.size(), self.rank());
        let mut dist = 1;
        let mut step = 0;
        while dist < n {
            let to = (me + dist) % n;
            let from = (me + n - dist) % n;
            let mut empty = [0u8; 0];
            // SAFETY: both buffers outlive the requests, which are waited for (or dropped,
            // which waits) before this iteration ends.
            let r = unsafe { call.irecv(self, &mut empty, from)? };
            // SAFETY: as above.
            let s = unsafe { call.isend(self, &[], to, step)? };
            let got = call.finish_recv(self, r);
            s.wait()?;
            got?;
            dist *= 2;
            step += 1;
        }
        Ok(())
    }
}
