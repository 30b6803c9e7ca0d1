//! Collective operations, written once against the communicator's point-to-point layer so
//! they run over every transport.
//!
//! # The collectives
//!
//! | call | what every rank ends with | in place (MPI_IN_PLACE) |
//! |---|---|---|
//! | [`all_reduce`](Communicator::all_reduce) | the element-wise reduction over all ranks | the usual form; [`all_reduce_into`](Communicator::all_reduce_into) is out of place |
//! | [`broadcast`](Communicator::broadcast) | the root's buffer | always |
//! | [`reduce`](Communicator::reduce) | the root: the reduction | [`reduce_in_place`](Communicator::reduce_in_place) |
//! | [`all_gather`](Communicator::all_gather) | every rank's block, in rank order | [`all_gather_in_place`](Communicator::all_gather_in_place) |
//! | [`reduce_scatter`](Communicator::reduce_scatter) | block `rank` of the reduction | [`reduce_scatter_in_place`](Communicator::reduce_scatter_in_place) |
//! | [`gather`](Communicator::gather) | the root: every rank's block | [`gather_in_place`](Communicator::gather_in_place) |
//! | [`scatter`](Communicator::scatter) | block `rank` of the root's buffer | [`scatter_in_place`](Communicator::scatter_in_place) |
//! | [`all_to_all`](Communicator::all_to_all) | block `rank` of every rank's buffer | [`all_to_all_in_place`](Communicator::all_to_all_in_place) |
//! | [`barrier`](Communicator::barrier) | nothing; returns when all have entered | |
//!
//! and the asynchronous forms (`iall_reduce`, ...) of [`nonblocking`]. Element types are
//! those of [`Element`]; reductions are the [`ReduceOp`]s (`avg` for floating-point types
//! only). Results are bit-identical on every rank, floats included: each element of the
//! result is computed by one rank and copied to the others, or computed by several ranks
//! from the same operands in the same order.
//!
//! # Algorithms
//!
//! Each algorithm is a [`Schedule`](schedule::Schedule) (rounds of sends, receives and
//! reductions on buffer ranges) built by a function in its own file, whose documentation
//! gives its cost; one executor ([`exec`]) runs every schedule, cutting large transfers
//! into pieces and overlapping them, and the cost model ([`cost`]) evaluates the same
//! schedules for thousands of ranks without moving data. `docs/algorithms.md` compares them.
//!
//! | collective | algorithms | rounds | bytes sent per rank |
//! |---|---|---|---|
//! | all_reduce | [ring](allreduce_ring) | `2(P-1)` | `2(P-1)/P · n` |
//! | | [halving-doubling](allreduce_halving_doubling) | `2 log2 P` (+2 if `P` is not a power of two) | `2(P-1)/P · n` (+`n`) |
//! | | [recursive doubling](allreduce_recursive_doubling) | `log2 P` (+2) | `n log2 P` (+`n`) |
//! | broadcast | [binomial, scatter + all-gather](broadcast) | `⌈log2 P⌉`; `⌈log2 P⌉ + P - 1` | `n ⌈log2 P⌉` at the root; `≈ 2n` |
//! | reduce | [binomial, reduce-scatter + gather](reduce) | `⌈log2 P⌉`; `P` | `n`; `≈ n` |
//! | all_gather | [ring, recursive doubling](all_gather) | `P - 1`; `log2 P` | `(P-1) b` |
//! | reduce_scatter | [ring, recursive halving](reduce_scatter) | `P - 1`; `log2 P` | `(P-1) b` |
//! | gather, scatter | [binomial](gather_scatter) | `⌈log2 P⌉` | root: `(P-1) b` |
//! | all_to_all | [pairwise](all_to_all) | `P - 1` or `P` | `(P-1) b` |
//! | barrier | [dissemination](barrier) | `⌈log2 P⌉` | `⌈log2 P⌉` one-byte tokens |
//!
//! The automatic choices, their thresholds and the overrides (`FERROCOMM_ALLREDUCE_ALGO`,
//! [`AllReduceOptions`]) are in [`select`].
//!
//! # Matching calls, and what happens when ranks disagree
//!
//! Every rank of a communicator must make the same collective calls in the same order, with
//! the same element type, count (per rank's block where the collective has blocks), root,
//! reduction and algorithm. (Whether a rank passes its data in place does not have to
//! agree: it only changes where that rank keeps its own block, never a message.) Every
//! collective call takes the communicator's next sequence number and sends its messages in
//! the communicator's collective context with that number as tag; each message also carries
//! the call's *fingerprint* (operation, element type, count, root, reduction, algorithm). A
//! receive that gets a message of another call rejects it (its bytes are dropped, never
//! mixed into the result) and the call fails with [`Error::CollectiveMismatch`].
//!
//! **Guarantee: a rank returns `Ok` from a collective only after every rank's fingerprint
//! is known to equal its own.** Two mechanisms give it:
//!
//! - *Data dependency.* When a rank's result depends on every rank's data (all_reduce,
//!   all_gather, reduce_scatter, all_to_all, barrier; count > 0), it has checked every
//!   rank's fingerprint transitively: it accepted only messages with its own fingerprint,
//!   and each sender forwarded a contribution only after accepting it in turn. These calls
//!   cost nothing extra.
//! - *Agreement exchange* (see [`exec`]). A rank that can finish without hearing from every
//!   rank (the root of broadcast and scatter, the other ranks of reduce and gather, ranks
//!   whose data path avoids the odd rank, and every call with count 0) also runs
//!   `⌈log2 P⌉` dissemination rounds of empty messages carrying the fingerprint, beside the
//!   data and in a context of their own; the call completes when both are done. A call of
//!   the first kind keeps one receive for agreement messages from any rank posted (no
//!   message): only a rank whose call differs sends it one, so it fails at once too.
//!
//! A rank that finds a mismatch tells *every* member of the communicator, before it fails
//! its engine, with two notices that carry both calls and the two ranks whose calls differ
//! (see `Call::notice_pair`); ranks that learn of it pass the same pair on. So every rank
//! fails promptly with [`Error::CollectiveMismatch`] naming the same kind of evidence:
//! "call #5: rank 0 called broadcast(..., root 0) but rank 2 called broadcast(..., root 1)".
//! A rank that sees a member's connection close after (or because) it reported a mismatch
//! reports the mismatch, not the loss; a member that reported a mismatch in a *later* call
//! completed the current one, so its departure does not fail it.
//!
//! Other failures (lost peer, timeout, abort) also send a *notice* to every member: a rank
//! blocked in the same collective then fails at once with an error that names the first
//! rank's reason, and passes the notice on. So when one rank dies during an all_reduce, its
//! neighbours see [`Error::PeerLost`] within moments (a closed connection, or the local
//! transport's close) and the others through notices. No rank ever waits longer than the
//! operation timeout (`FERROCOMM_OP_TIMEOUT`) for a call that cannot finish. A message of
//! an earlier call found unreceived when a collective starts (which the agreement exchange
//! makes impossible between ranks of this version) still fails that collective with
//! [`Error::CollectiveMismatch`].
//!
//! A failed collective fails the process's engine with its error (like NCCL's
//! communicator abort): the transports forget every buffer still in flight, so the call can
//! return without waiting for peers that will never answer, and every later operation of
//! every communicator of the process returns the same error. Restart the job (or the
//! process group) after such an error. Invalid arguments ([`Error::InvalidArgument`]) are
//! found before anything is sent and leave the communicator usable; but the other ranks
//! are then inside a collective this rank did not enter, and time out unless this rank
//! makes the call again, correctly.
//!
//! # Threads
//!
//! A communicator is used by one thread at a time (it is `Send`, not `Sync`). To run
//! collectives from several threads at once, give each its own communicator
//! ([`Communicator::dup`], [`Communicator::split`], [`Communicator::new_group`]): each has
//! its own context and sequence numbers, so their collectives never interfere, and they share
//! the process's one progress engine. The asynchronous collectives run on a worker thread
//! with a communicator of its own (see [`nonblocking`]).

pub mod all_gather;
pub mod all_to_all;
pub mod allreduce_halving_doubling;
pub mod allreduce_recursive_doubling;
pub mod allreduce_ring;
mod api;
pub mod barrier;
pub mod blame;
pub mod broadcast;
pub mod cost;
pub mod exec;
pub mod gather_scatter;
pub mod nonblocking;
pub mod reduce;
pub mod reduce_scatter;
pub mod schedule;
pub mod select;

pub use nonblocking::CollHandle;
pub use select::{Algorithm, AllReduceAlgo, AllReduceOptions};

use crate::comm::envelope::{
    Env, KIND_COLL, KIND_NOTICE, NOTICE_MISMATCH, NOTICE_PEER_LOST, NOTICE_TIMEOUT,
};
use crate::comm::{Communicator, Done, RawRequest, Source};
use crate::element::{DType, Element, ReduceOp};
use crate::error::{Error, Result};
use crate::transport::{RecvBuf, SendBuf};

/// Which collective a message belongs to (its code travels in the envelope).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CollOp {
    Barrier = 1,
    AllReduce = 2,
    Broadcast = 3,
    Reduce = 4,
    AllGather = 5,
    ReduceScatter = 6,
    Gather = 7,
    Scatter = 8,
    AllToAll = 9,
}

impl CollOp {
    fn name(code: u8) -> &'static str {
        match code {
            1 => "barrier",
            2 => "all_reduce",
            3 => "broadcast",
            4 => "reduce",
            5 => "all_gather",
            6 => "reduce_scatter",
            7 => "gather",
            8 => "scatter",
            9 => "all_to_all",
            _ => "unknown collective",
        }
    }

    fn rooted(code: u8) -> bool {
        matches!(code, 3 | 4 | 7 | 8)
    }
}

/// Calls remembered per communicator for late mismatch reports.
const HISTORY: usize = 32;

/// Blamed-rank value of a notice that blames nobody in particular.
pub(crate) const BLAME_NONE: u32 = 0xF_FFFF;

/// The identity of one collective call, carried by each of its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Call {
    pub op: CollOp,
    pub dtype: Option<DType>,
    pub redop: Option<ReduceOp>,
    pub count: u64,
    pub root: u32,
    pub algo: Option<Algorithm>,
    pub seq: u32,
    pub ctx: u64,
    /// Context of the call's agreement messages (see [`exec`]) and of the second notice
    /// of a mismatch report: apart from the data messages, so that the two never match
    /// each other's receives.
    pub actx: u64,
}

/// Domain separator of a communicator's agreement context (see [`Call::actx`]).
const CTX_AGREE: u64 = 0x4147_5245_4500_0004;

/// Two ranks whose calls differ: world rank `a` called `ea`, world rank `b` called `eb`.
/// A rank that finds a mismatch reports it with this pair; ranks that learn of it from a
/// notice pass the same pair on, so every rank names the same two calls.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pair {
    pub a: usize,
    pub ea: Env,
    pub b: usize,
    pub eb: Env,
}

impl Pair {
    /// The error for this rank (`mine`) when world rank `via` failed for this mismatch in
    /// a call of another communicator (this rank lost it during `mine`).
    pub fn elsewhere(&self, comm: &Communicator, mine: &Call, via: usize) -> Error {
        let w = |r: usize| format!("world rank {r}");
        Error::CollectiveMismatch {
            rank: comm.rank(),
            detail: format!(
                "call #{} of another communicator: {} called {} but {} called {} \
                 (reported by {}, which then failed, while this rank was in {}); every rank \
                 must make the same collective calls in the same order with matching arguments",
                self.ea.tag,
                w(self.a),
                Call::describe(&self.ea),
                w(self.b),
                Call::describe(&self.eb),
                w(via),
                mine.describe_mine()
            ),
        }
    }

    /// The error for this rank (`mine`), told by world rank `via` (`None`: found here).
    pub fn error(&self, comm: &Communicator, mine: &Call, via: Option<usize>) -> Error {
        let me = comm.world_rank();
        let (a, b) = (Call::who(comm, self.a), Call::who(comm, self.b));
        let (ca, cb) = (Call::describe(&self.ea), Call::describe(&self.eb));
        let context = match via {
            Some(v) if v != self.a && v != self.b => format!(
                " (reported by {}; this rank called {})",
                Call::who(comm, v),
                Call::describe(&mine.env(0))
            ),
            _ if me != self.a && me != self.b => {
                format!(" (this rank called {})", Call::describe(&mine.env(0)))
            }
            _ => String::new(),
        };
        let context = if self.ea.tag == mine.seq {
            context
        } else {
            format!(
                "{context} (found while this rank was in call #{}, {})",
                mine.seq,
                Call::describe(&mine.env(0))
            )
        };
        let what = if self.ea.same_call(&self.eb) {
            String::from(
                " with the same arguments but different message sizes (different ferrocomm \
                 versions?)",
            )
        } else {
            String::new()
        };
        Error::CollectiveMismatch {
            rank: comm.rank(),
            detail: format!(
                "call #{}: {a} called {ca} but {b} called {cb}{what}{context}; every rank must \
                 make the same collective calls in the same order with matching arguments",
                self.ea.tag
            ),
        }
    }
}

impl Call {
    /// Starts a call on `comm`: takes its next sequence number.
    pub fn begin(
        comm: &Communicator,
        op: CollOp,
        dtype: Option<DType>,
        redop: Option<ReduceOp>,
        count: usize,
        root: usize,
        algo: Option<Algorithm>,
    ) -> Call {
        let seq = comm.coll_seq.get();
        comm.coll_seq.set(seq.wrapping_add(1));
        let call = Call {
            op,
            dtype,
            redop,
            count: count as u64,
            root: root as u32,
            algo,
            seq,
            ctx: comm.ctx + 1,
            actx: Call::agree_ctx(comm.ctx),
        };
        let mut h = comm.history.borrow_mut();
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(call.env(0));
        call
    }

    /// A mismatch in an earlier call that this rank completed without noticing: a message of
    /// that call from a peer that this rank never received.
    pub fn stale(&self, comm: &Communicator) -> Option<(Error, usize)> {
        let (peer, env) = comm.shared.lock().stale_collective(self.ctx, self.seq)?;
        let env = Env::decode(&env);
        let mine = comm
            .history
            .borrow()
            .iter()
            .find(|e| e.tag == env.tag)
            .map_or_else(|| String::from("a collective"), Call::describe);
        let err = Error::CollectiveMismatch {
            rank: comm.rank(),
            detail: format!(
                "call #{} on this rank was {mine}, but {} called {} (a message of it was \
                 never received here; found when call #{} started); every rank must make the \
                 same collective calls in the same order with matching arguments",
                env.tag,
                Call::who(comm, peer),
                Call::describe(&env),
                self.seq,
            ),
        };
        Some((err, peer))
    }

    /// The agreement context of the communicator with (point-to-point) context `ctx`.
    pub fn agree_ctx(ctx: u64) -> u64 {
        crate::comm::mix_ctx(ctx, &[CTX_AGREE]) | 1
    }

    /// Whether the call needs the agreement exchange (see [`exec`]) among `p` ranks: a
    /// rank may complete it without having heard, even indirectly, from every rank (rooted
    /// collectives; calls without data).
    pub fn agrees(&self, p: usize) -> bool {
        p > 1 && (CollOp::rooted(self.op as u8) || (self.count == 0 && self.op != CollOp::Barrier))
    }

    /// Starts sending this call's agreement message of round `round` to `dst`: no payload,
    /// the fingerprint in the envelope.
    ///
    /// # Safety
    /// None beyond the call's: the message has no payload. (Unsafe only because it shares
    /// the raw send path.)
    pub unsafe fn agree_send(
        &self,
        comm: &Communicator,
        dst: usize,
        round: u32,
    ) -> Result<RawRequest> {
        let env = Env {
            ctx: self.actx,
            ..self.env(round)
        };
        // SAFETY: the empty buffer is valid forever.
        unsafe { comm.isend_ctx(SendBuf::new(&[]), dst, &env, "collective agreement send") }
    }

    /// Posts a receive of this call's agreement message from `src`; a message of another
    /// call (a rank whose call differs) completes it as rejected.
    pub fn agree_recv(&self, comm: &Communicator, src: Source) -> Result<RawRequest> {
        let env = Env {
            ctx: self.actx,
            ..self.env(0)
        };
        // SAFETY: the empty buffer is valid forever.
        unsafe {
            comm.irecv_ctx(
                RecvBuf::new(&mut []),
                src,
                self.actx,
                Some(self.seq),
                Some(env),
                "collective agreement recv",
            )
        }
    }

    /// Sends `peer` the report of mismatch `pair`: two notices, the second call's (in the
    /// agreement context) first, then the first call's (in the call's context), which fails
    /// the peer's receives of the call. Both travel in order on one link, so a rank that
    /// sees the second finds the first already there.
    pub fn notice_pair(&self, comm: &Communicator, peer: usize, pair: &Pair) -> Vec<RawRequest> {
        let mut out = Vec::new();
        let notices = [
            Env {
                ctx: self.actx,
                tag: self.seq,
                kind: KIND_NOTICE,
                step: (NOTICE_MISMATCH << 20) | (pair.b as u32 & BLAME_NONE),
                ..pair.eb
            },
            Env {
                ctx: self.ctx,
                tag: self.seq,
                kind: KIND_NOTICE,
                step: (NOTICE_MISMATCH << 20) | (pair.a as u32 & BLAME_NONE),
                ..pair.ea
            },
        ];
        for env in notices {
            // SAFETY: the empty buffer is valid forever.
            match unsafe { comm.isend_ctx(SendBuf::new(&[]), peer, &env, "collective notice") } {
                Ok(r) => out.push(r),
                Err(_) => break,
            }
        }
        out
    }

    /// The call's fingerprint, as its messages carry it.
    pub fn fingerprint(&self) -> Env {
        self.env(0)
    }

    fn env(&self, step: u32) -> Env {
        Env {
            ctx: self.ctx,
            tag: self.seq,
            kind: KIND_COLL,
            op: self.op as u8,
            dtype: self.dtype.map_or(u8::MAX, |d| d as u8),
            redop: self.redop.map_or(0, |r| r as u8),
            root: self.root,
            count: self.count,
            step,
            algo: self.algo.map_or(0, Algorithm::code),
        }
    }

    /// `all_reduce(type f32, count 10, op sum, algorithm rhd)` for a call's fields.
    fn describe(env: &Env) -> String {
        let mut parts = Vec::new();
        if let Some(d) = DType::from_code(env.dtype) {
            parts.push(format!("type {d}"));
        }
        if env.op != CollOp::Barrier as u8 {
            parts.push(format!("count {}", env.count));
        }
        if let Some(r) = ReduceOp::from_code(env.redop) {
            parts.push(format!("op {r}"));
        }
        if CollOp::rooted(env.op) {
            parts.push(format!("root {}", env.root));
        }
        if let Some(a) = Algorithm::from_code(env.algo) {
            parts.push(format!("algorithm {}", a.name()));
        }
        format!("{}({})", CollOp::name(env.op), parts.join(", "))
    }

    /// This call, described.
    pub fn describe_mine(&self) -> String {
        format!("{} (call #{})", Call::describe(&self.env(0)), self.seq)
    }

    /// Starts sending `data` to `dst` as round `step` of this call.
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

    /// Starts receiving a message of this call from `src` into `buf`: a message of another
    /// call completes the request as rejected (see [`Call::rejected`]).
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
                Some(self.env(0)),
                "collective recv",
            )
        }
    }

    /// Sends `peer` a notice that this rank gave up the call.
    ///
    /// # Safety
    /// None beyond the call's: a notice has no payload. (Unsafe only because it shares the
    /// raw send path.)
    pub unsafe fn notice(
        &self,
        comm: &Communicator,
        peer: usize,
        reason: u32,
        blamed: u32,
    ) -> Result<RawRequest> {
        let env = Env {
            kind: KIND_NOTICE,
            step: (reason << 20) | (blamed & BLAME_NONE),
            ..self.env(0)
        };
        // SAFETY: the empty buffer is valid forever.
        unsafe { comm.isend_ctx(SendBuf::new(&[]), peer, &env, "collective notice") }
    }

    /// "rank 3" or "rank 3 (world rank 7)" for world rank `w`.
    pub(crate) fn who(comm: &Communicator, w: usize) -> String {
        match comm.group.rank_of.get(w) {
            Some(&r) if r as usize == w => format!("rank {r}"),
            Some(&r) if r != u32::MAX => format!("rank {r} (world rank {w})"),
            _ => format!("world rank {w}"),
        }
    }

    /// The error for a receive that got another call's message, a notice, or a message of
    /// the wrong size (`want` bytes expected); `waited`: since the call started.
    pub fn rejected(
        &self,
        comm: &Communicator,
        done: &Done,
        want: usize,
        waited: std::time::Duration,
    ) -> Error {
        let env = Env::decode(&done.env);
        let mine = self.describe_mine();
        let src = Call::who(comm, done.peer);
        let theirs = Call::describe(&env);
        if env.kind == KIND_NOTICE {
            let reason = env.step >> 20;
            let blamed = env.step & BLAME_NONE;
            let whom = if blamed == BLAME_NONE {
                String::from("another rank")
            } else {
                Call::who(comm, blamed as usize)
            };
            // A notice of an earlier call that this rank completed before the peer gave
            // it up (found when the peer's connection closed, see `exec`).
            let the_call = if env.tag == self.seq {
                String::from("the call")
            } else {
                format!(
                    "its call #{} ({theirs}), which this rank had completed,",
                    env.tag
                )
            };
            return match reason {
                NOTICE_MISMATCH => Error::CollectiveMismatch {
                    rank: comm.rank(),
                    detail: format!(
                        "{src} gave up {mine} (it called {theirs}) because its call did not \
                         match that of {whom}; every rank must make the same collective calls \
                         in the same order with matching arguments"
                    ),
                },
                NOTICE_PEER_LOST => Error::PeerLost {
                    rank: comm.world_rank(),
                    peer: if blamed == BLAME_NONE {
                        done.peer
                    } else {
                        blamed as usize
                    },
                    op: mine,
                    detail: format!("{src} gave up {the_call} because it lost {whom}"),
                },
                NOTICE_TIMEOUT if blamed == BLAME_NONE => Error::Timeout {
                    op: format!("{mine} on rank {}", comm.rank()),
                    waited,
                    detail: format!(
                        "{src} timed out in {the_call} and gave up; raise FERROCOMM_OP_TIMEOUT \
                         (seconds, 0 = no limit) if the ranks are only slow"
                    ),
                },
                NOTICE_TIMEOUT => Error::Timeout {
                    op: format!("{mine} on rank {}", comm.rank()),
                    waited,
                    detail: format!(
                        "{src} timed out in {the_call} waiting for {whom} and gave up: {whom} is stuck \
                         (stopped, hung in other work, unreachable, or much slower); raise \
                         FERROCOMM_OP_TIMEOUT (seconds, 0 = no limit) if it is only slow"
                    ),
                },
                _ => Error::PeerLost {
                    rank: comm.world_rank(),
                    peer: done.peer,
                    op: mine,
                    detail: format!("{src} failed in {the_call} (aborted or broken) and gave up"),
                },
            };
        }
        if env.kind == KIND_COLL && env.same_call(&self.env(0)) {
            return Error::CollectiveMismatch {
                rank: comm.rank(),
                detail: format!(
                    "{src} sent {} bytes for {mine} where this rank expected {want}: the ranks \
                     cut the data differently (different ferrocomm versions?)",
                    done.len
                ),
            };
        }
        Error::CollectiveMismatch {
            rank: comm.rank(),
            detail: format!(
                "call #{} on this rank is {}, but {src} called {theirs}; every rank must make \
                 the same collective calls in the same order with matching arguments",
                self.seq,
                Call::describe(&self.env(0)),
            ),
        }
    }

    /// Adds the call to errors that name a point-to-point operation.
    pub fn explain(&self, err: Error) -> Error {
        let me = self.describe_mine();
        match err {
            Error::PeerLost {
                rank,
                peer,
                op,
                detail,
            } if !op.starts_with(&me) => Error::PeerLost {
                rank,
                peer,
                op: format!("{}: {op}", self.describe_mine()),
                detail,
            },
            Error::Timeout { op, waited, detail } if !op.starts_with(&me) => Error::Timeout {
                op: format!("{}: {op}", self.describe_mine()),
                waited,
                detail,
            },
            other => other,
        }
    }
}

/// `NOTICE_*` reason and blamed world rank for an error that made this rank give up.
pub(crate) fn notice_reason(err: &Error) -> (u32, u32) {
    use crate::comm::envelope::NOTICE_OTHER;
    match err {
        Error::PeerLost { peer, .. } => (NOTICE_PEER_LOST, (*peer as u32).min(BLAME_NONE)),
        Error::CollectiveMismatch { .. } => (NOTICE_MISMATCH, BLAME_NONE),
        Error::Timeout { .. } => (NOTICE_TIMEOUT, BLAME_NONE),
        _ => (NOTICE_OTHER, BLAME_NONE),
    }
}

/// Bytes of a slice of elements.
fn as_bytes<T: Element>(s: &[T]) -> &[u8] {
    bytemuck::cast_slice(s)
}

/// Mutable bytes of a slice of elements.
fn as_bytes_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    bytemuck::cast_slice_mut(s)
}

#[cfg(test)]
mod tests;
