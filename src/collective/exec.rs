//! The executor: runs one rank's [`Schedule`] over the communicator.
//!
//! # Pieces and dataflow
//!
//! Every send and receive is cut into *pieces* of at most [`PIECE_BYTES`]; the pieces of
//! the ops of one round are interleaved (piece 0 of every op, then piece 1, ...), giving one
//! list in *program order*. Three cursors walk that list: sends are started in program
//! order, receives are posted in program order, local copies are done in program order, so
//! the k-th message between two ranks is the k-th send of one and the k-th receive of the
//! other (matching is FIFO per peer). Each piece starts as soon as no earlier, unfinished
//! piece touches the same bytes in a conflicting way (read after write, write after read,
//! write after write), and within the limits of [`MAX_SENDS`] sends and [`MAX_RECVS`]
//! receives in flight.
//!
//! A receive that reduces, or whose destination is still being read by an earlier send, is
//! received into a scratch piece and combined (or copied) into place when its destination
//! is free. So the next receive is always posted before the current one is reduced, and a
//! ring's round `k + 1` sends a piece as soon as round `k` has reduced it: both directions
//! of every link carry data all the time, and large messages pipeline through the
//! algorithm without any algorithm having to say so.
//!
//! # Agreement
//!
//! For a call that a rank may finish without having heard from every rank (see
//! `Call::agrees` and the module documentation of [`crate::collective`]), the executor
//! appends agreement pieces after the data pieces: in round `r` (`r < ⌈log2 P⌉`) an empty
//! message to rank `me + 2^r` and one from rank `me - 2^r`, in the communicator's agreement
//! context (`Call::actx`), so they never match a data receive. Every round's receive is
//! posted at the start (their sources differ), so a disagreeing neighbour is found even
//! while the data is blocked (a reduce whose ranks disagree about the root waits for data
//! that never comes); round `r`'s send starts only once round `r - 1`'s receive has been
//! accepted, so what a rank passes on includes what it accepted, and after the last round
//! every rank has compared, directly or not, every rank's fingerprint with its own. The
//! call is complete when data and agreement pieces are all done. Other calls post one
//! receive of any agreement message of the call ("wildcard"), withdrawn at the end: only a
//! rank whose call differs (and so runs the exchange where this one does not) can send one.
//!
//! # Failures
//!
//! The executor waits for whichever request finishes first. A message of another call (or
//! a notice) fails the collective with [`Error::CollectiveMismatch`] (or the error the
//! notice describes); a lost peer, a timeout (no request finished for the operation
//! timeout) or an abort fail it too. On failure the rank sends a notice to every peer of its
//! schedule (and then to the communicator's other ranks), so that ranks blocked in the collective fail at once instead of waiting for
//! their timeout, and then fails the process's engine with the error (see the module
//! documentation of [`crate::collective`]).
//!
//! # Naming the stuck rank
//!
//! When one rank stops (SIGSTOP, a long pause, an endless loop outside the library), the
//! ranks of a collective stop making progress at nearly the same moment and time out
//! together; only those that wait directly for the stopped rank can name it. So a rank
//! that times out first tells every member at once whom it waits for (a timeout notice
//! blaming the rank of its first pending receive, else of its first pending send), then
//! *settles* for a moment (`settle_time`), collecting the others' notices: each is an edge
//! "who waits for whom" (a lost-peer notice: "who lost whom"). A rank that receives a
//! timeout notice (blaming itself or another rank) does the same; a rank blamed by a
//! timeout notice of a *later* call (its sender completed this rank's call and waits for
//! it in the next) answers at once too, whom it waits for in its own call, so a rank that
//! is alive and waiting, in whatever call, extends the chain while the others settle: only
//! a rank that cannot answer (stopped, hung outside the library) ends it. After settling,
//! the rank follows the edges from its suspect to the end ([`super::blame::resolve`]): a rank that
//! sent a notice is alive and waiting, so it is never the final name while its edge leads
//! on; a member lost without a notice (dead) ends the chain. The error names the rank at
//! the end of the chain, the chain itself ("rank 1 waits for rank 4, which waits for rank
//! 2"), and the call; ranks that wait for each other in a cycle are reported as such.
//!
//! Known limit: a rank that passes on a notice it could not resolve sends the blamed rank
//! as its edge (a conclusion, not whom it waits for itself), so on a heavily loaded machine
//! a survivor of a long chain (a ring of 5 ranks) may still name a rank that was waiting;
//! following the names from it has led to the stuck rank in every run of tests/faults.rs.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::time::{Duration, Instant};

use super::blame::{Blame, resolve};
use super::schedule::{Buf, Op, Schedule};
use super::{BLAME_NONE, Call, Pair, notice_reason};
use crate::comm::envelope::STEP_MAX;
use crate::comm::envelope::{
    Env, KIND_COLL, KIND_NOTICE, NOTICE_MISMATCH, NOTICE_PEER_LOST, NOTICE_TIMEOUT,
};
use crate::comm::{Communicator, Done, RawRequest, Source};
use crate::element::{DType, Order, ReduceOp, divide_bytes, reduce_bytes};
use crate::error::{Error, Result};
use crate::transport::Token;

/// Largest piece of a message, in bytes. Large enough that per-message costs (a rendezvous
/// round trip on TCP) are small against the transfer, small enough that a ring step is cut
/// into several pieces that overlap.
pub const PIECE_BYTES: usize = 256 << 10;
/// Sends in flight at once, at most.
pub const MAX_SENDS: usize = 16;
/// Receives in flight at once, at most.
pub const MAX_RECVS: usize = 16;
/// Scratch pieces (received, not yet combined) at once, at most.
const MAX_SCRATCH: usize = 16;
/// How long a failing rank waits for its notices to leave before it fails the engine.
const NOTICE_GRACE: Duration = Duration::from_secs(2);
/// How long a rank that lost a peer drives the transports for notices already on their
/// way in before it reports the loss (see [`Exec::explained`]).
const NOTICE_TAKE_IN: Duration = Duration::from_millis(50);
/// Scratch memory kept between calls, at most (bytes).
const KEEP_TMP: usize = 16 << 20;

/// How long a rank that timed out listens for the timeout notices of its peers before it
/// names the stuck rank (see the module documentation): a fifth of the operation timeout,
/// at most 2 s.
fn settle_time(op_timeout: Duration) -> Duration {
    (op_timeout / 5).min(Duration::from_secs(2))
}

/// Scratch memory a communicator keeps between collectives, so that large collectives do
/// not fault fresh pages in on every call.
#[derive(Default)]
pub(crate) struct ScratchCache {
    pieces: Vec<Vec<u64>>,
    tmp: Vec<u64>,
}

#[derive(Clone, Copy)]
enum Kind {
    Send,
    Recv(Option<Order>),
    Copy {
        src: Buf,
        start: usize,
    },
    /// The agreement message of a round (see the module documentation): no data.
    AgreeSend,
    /// See [`Kind::AgreeSend`].
    AgreeRecv,
}

/// A piece of an op, in bytes.
struct Piece {
    kind: Kind,
    peer: usize,
    buf: Buf,
    range: Range<usize>,
    round: u32,
}

impl Piece {
    /// The byte ranges the piece touches: (buffer, range, writes). Unused slots are empty.
    fn accesses(&self) -> [(Buf, Range<usize>, bool); 2] {
        let none = (self.buf, 0..0, false);
        match self.kind {
            Kind::Send => [(self.buf, self.range.clone(), false), none],
            Kind::Recv(_) => [(self.buf, self.range.clone(), true), none],
            Kind::Copy { src, start } => [
                (self.buf, self.range.clone(), true),
                (src, start..start + self.range.len(), false),
            ],
            Kind::AgreeSend | Kind::AgreeRecv => [none.clone(), none],
        }
    }
}

fn overlap(a: &Range<usize>, b: &Range<usize>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Whether `b` must wait for `a` (earlier, unfinished): they touch the same bytes and one
/// of them writes.
fn conflict(a: &Piece, b: &Piece) -> bool {
    let (x, y) = (a.accesses(), b.accesses());
    x.iter().any(|(ba, ra, wa)| {
        y.iter()
            .any(|(bb, rb, wb)| ba == bb && (*wa || *wb) && overlap(ra, rb))
    })
}

enum St {
    Todo,
    /// A send or receive in flight; a receive into scratch holds it.
    Posted(Option<Vec<u64>>),
    /// Received into scratch, waiting to be combined into place.
    Arrived(Vec<u64>),
    Done,
}

/// A buffer as a raw region: pieces of it are in use by transports while others are
/// reduced into, so no reference to the whole is held during the run.
#[derive(Clone, Copy)]
struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    /// # Safety
    /// `r` lies inside the region and no write to it is in progress elsewhere.
    unsafe fn slice<'a>(&self, r: &Range<usize>) -> &'a [u8] {
        debug_assert!(r.end <= self.len);
        if r.is_empty() {
            return &[];
        }
        // SAFETY: in bounds (checked when the schedule was accepted) and not being written
        // (caller).
        unsafe { std::slice::from_raw_parts(self.ptr.add(r.start), r.len()) }
    }

    /// # Safety
    /// `r` lies inside the region, the region is writable, and nothing else reads or writes
    /// it meanwhile.
    unsafe fn slice_mut<'a>(&self, r: &Range<usize>) -> &'a mut [u8] {
        debug_assert!(r.end <= self.len);
        if r.is_empty() {
            return &mut [];
        }
        // SAFETY: in bounds, writable and exclusive (caller).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len()) }
    }
}

/// How a collective's data is combined.
#[derive(Clone, Copy)]
pub(crate) struct Reduction {
    pub dtype: DType,
    pub op: ReduceOp,
}

struct Exec<'a> {
    comm: &'a Communicator,
    call: &'a Call,
    red: Option<Reduction>,
    peers: Vec<usize>,
    regions: [Region; 3],
    pieces: Vec<Piece>,
    state: Vec<St>,
    first_open: usize,
    next_send: usize,
    next_recv: usize,
    next_copy: usize,
    arrived: Vec<usize>,
    reqs: Vec<RawRequest>,
    req_piece: Vec<usize>,
    sends: usize,
    recvs: usize,
    scratch_out: usize,
    pool: Vec<Vec<u64>>,
    scratch_len: usize,
    /// The notice to pass on: reason and blamed world rank, when a received message made
    /// this rank give up.
    forward: Option<(u32, u32)>,
    /// Notices already sent (a timeout tells the peers at once), awaited by [`Exec::fail`].
    notices: Option<Vec<RawRequest>>,
    /// True while [`Exec::settle_blame`] listens for notices (it does not nest).
    settling: bool,
    /// Whether this rank answered a later call's timeout notice blaming it (see
    /// [`Exec::answer_later`]).
    answered_later: bool,
    /// When the call started.
    started: Instant,
    /// Index of the first agreement piece (send of round 0, then its receive, then round
    /// 1...); `pieces.len()` when the call has no agreement exchange.
    agree_at: usize,
    /// Agreement sends started.
    agree_sent: usize,
    /// Whether the agreement receives are posted.
    agree_posted: bool,
    /// A call without agreement exchange: a receive of any agreement message of this
    /// call, which only a rank whose call differs sends (see the module documentation).
    wildcard: Option<RawRequest>,
    /// The two ranks whose calls differ, once this rank knows them.
    pair: Option<Pair>,
}

fn region_index(b: Buf) -> usize {
    match b {
        Buf::In => 0,
        Buf::Out => 1,
        Buf::Tmp => 2,
    }
}

/// Runs `sched` for `call` on `comm`: `inp` is [`Buf::In`], `out` is [`Buf::Out`] (both
/// in elements of `elem` bytes). Received data is combined with `red` where the schedule
/// reduces.
pub(crate) fn run(
    comm: &Communicator,
    call: &Call,
    sched: &Schedule,
    elem: usize,
    red: Option<Reduction>,
    inp: &[u8],
    out: &mut [u8],
) -> Result<()> {
    // A schedule without sends or receives (one rank) touches no transport, so it would not
    // see an abort or an earlier failure: check for them here.
    if sched.steps.iter().all(|s| matches!(s.op, Op::Copy { .. })) {
        comm.shared.check_usable()?;
    }
    sched
        .check_bounds(inp.len() / elem, out.len() / elem)
        .map_err(|e| internal(call, &e))?;
    let mut cache = std::mem::take(&mut *comm.scratch.borrow_mut());
    let tmp_bytes = sched.tmp * elem;
    let words = tmp_bytes.div_ceil(8);
    if cache.tmp.len() < words {
        cache.tmp.resize(words, 0);
    }
    let tmp_bytes_slice: &mut [u8] = &mut bytemuck::cast_slice_mut(&mut cache.tmp[..])[..tmp_bytes];
    let regions = [
        Region {
            ptr: inp.as_ptr().cast_mut(),
            len: inp.len(),
        },
        Region {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        },
        Region {
            ptr: tmp_bytes_slice.as_mut_ptr(),
            len: tmp_bytes,
        },
    ];
    let mut pieces = expand(sched, elem);
    let agree_at = pieces.len();
    let (me, p) = (comm.rank(), comm.size());
    if call.agrees(p) {
        let mut dist = 1;
        let mut round = 0;
        while dist < p {
            for (kind, peer) in [
                (Kind::AgreeSend, (me + dist) % p),
                (Kind::AgreeRecv, (me + p - dist) % p),
            ] {
                pieces.push(Piece {
                    kind,
                    peer,
                    buf: Buf::Tmp,
                    range: 0..0,
                    round,
                });
            }
            dist *= 2;
            round += 1;
        }
    }
    let mut ex = Exec {
        comm,
        call,
        red,
        peers: sched.peers(),
        regions,
        state: (0..pieces.len()).map(|_| St::Todo).collect(),
        pieces,
        first_open: 0,
        next_send: 0,
        next_recv: 0,
        next_copy: 0,
        arrived: Vec::new(),
        reqs: Vec::new(),
        req_piece: Vec::new(),
        sends: 0,
        recvs: 0,
        scratch_out: 0,
        pool: std::mem::take(&mut cache.pieces),
        scratch_len: 0,
        forward: None,
        notices: None,
        settling: false,
        answered_later: false,
        started: Instant::now(),
        agree_at,
        agree_sent: 0,
        agree_posted: false,
        wildcard: None,
        pair: None,
    };
    ex.scratch_len = ex
        .pieces
        .iter()
        .filter(|p| matches!(p.kind, Kind::Recv(_)))
        .map(|p| p.range.len())
        .max()
        .unwrap_or(0)
        .div_ceil(8);
    let result = match ex.drive() {
        Ok(()) => Ok(()),
        Err(e) => Err(ex.fail(call.explain(e))),
    };
    // Every request is finished (done, or failed by the engine's abort) here; an unmatched
    // wildcard is withdrawn.
    ex.reqs.clear();
    ex.wildcard = None;
    let mut pool = std::mem::take(&mut ex.pool);
    for s in ex.state.drain(..) {
        if let St::Posted(Some(v)) | St::Arrived(v) = s {
            pool.push(v);
        }
    }
    pool.truncate(MAX_SCRATCH);
    cache.pieces = pool;
    if cache.tmp.len() * 8 > KEEP_TMP {
        cache.tmp = Vec::new();
    }
    *comm.scratch.borrow_mut() = cache;
    result
}

fn internal(call: &Call, what: &str) -> Error {
    Error::Aborted(format!(
        "internal error in {}: {what}; please report it",
        call.describe_mine()
    ))
}

/// Cuts the schedule's sends and receives into pieces, interleaving the ops of a round.
fn expand(sched: &Schedule, elem: usize) -> Vec<Piece> {
    let piece = (PIECE_BYTES / elem).max(1) * elem;
    let mut out = Vec::with_capacity(sched.steps.len());
    let mut i = 0;
    while i < sched.steps.len() {
        let round = sched.steps[i].round;
        let mut j = i;
        while j < sched.steps.len() && sched.steps[j].round == round {
            j += 1;
        }
        let group = &sched.steps[i..j];
        let count = |op: &Op| match op {
            Op::Send { range, .. } | Op::Recv { range, .. } => {
                (range.len() * elem).div_ceil(piece).max(1)
            }
            Op::Copy { .. } => 1,
        };
        let most = group.iter().map(|s| count(&s.op)).max().unwrap_or(0);
        for k in 0..most {
            for s in group {
                if k >= count(&s.op) {
                    continue;
                }
                let bytes = |r: &Range<usize>| {
                    let (a, b) = (r.start * elem, r.end * elem);
                    let s = a + k * piece;
                    s..(s + piece).min(b)
                };
                out.push(match &s.op {
                    Op::Send { peer, buf, range } => Piece {
                        kind: Kind::Send,
                        peer: *peer,
                        buf: *buf,
                        range: bytes(range),
                        round,
                    },
                    Op::Recv {
                        peer,
                        buf,
                        range,
                        reduce,
                    } => Piece {
                        kind: Kind::Recv(*reduce),
                        peer: *peer,
                        buf: *buf,
                        range: bytes(range),
                        round,
                    },
                    Op::Copy {
                        src,
                        range,
                        dst,
                        at,
                    } => Piece {
                        kind: Kind::Copy {
                            src: *src,
                            start: range.start * elem,
                        },
                        peer: 0,
                        buf: *dst,
                        range: at * elem..(at + range.len()) * elem,
                        round,
                    },
                });
            }
        }
        i = j;
    }
    out
}

impl Exec<'_> {
    fn drive(&mut self) -> Result<()> {
        if let Some((err, peer)) = self.call.stale(self.comm) {
            self.forward = Some((NOTICE_MISMATCH, (peer as u32).min(BLAME_NONE)));
            return Err(err);
        }
        if self.agree_at == self.pieces.len() && self.comm.size() > 1 {
            self.wildcard = Some(self.call.agree_recv(self.comm, Source::Any)?);
        }
        loop {
            if let Err(e) = self.issue() {
                return Err(self.explained(e));
            }
            if self.first_open == self.pieces.len() {
                return Ok(());
            }
            if self.reqs.is_empty() {
                return Err(internal(
                    self.call,
                    "the schedule stalled with nothing in flight",
                ));
            }
            self.wait()?;
        }
    }

    /// Whether piece `i` must wait for an earlier, unfinished piece.
    fn blocked(&self, i: usize) -> bool {
        let p = &self.pieces[i];
        (self.first_open..i)
            .any(|j| !matches!(self.state[j], St::Done) && conflict(&self.pieces[j], p))
    }

    /// Starts, posts and completes everything that can go now.
    fn issue(&mut self) -> Result<()> {
        self.agree()?;
        loop {
            let mut any = false;
            // Received pieces whose destination is free: combine them into place.
            let mut k = 0;
            while k < self.arrived.len() {
                let i = self.arrived[k];
                if self.blocked(i) {
                    k += 1;
                    continue;
                }
                self.arrived.remove(k);
                self.land(i)?;
                any = true;
            }
            while self.next_copy < self.pieces.len() {
                let i = self.next_copy;
                if !matches!(self.pieces[i].kind, Kind::Copy { .. }) {
                    self.next_copy += 1;
                    continue;
                }
                if self.blocked(i) {
                    break;
                }
                self.copy(i);
                self.next_copy += 1;
                any = true;
            }
            while self.next_send < self.pieces.len() && self.sends < MAX_SENDS {
                let i = self.next_send;
                if !matches!(self.pieces[i].kind, Kind::Send) {
                    self.next_send += 1;
                    continue;
                }
                if self.blocked(i) {
                    break;
                }
                self.start_send(i)?;
                self.next_send += 1;
                any = true;
            }
            while self.next_recv < self.pieces.len() && self.recvs < MAX_RECVS {
                let i = self.next_recv;
                let Kind::Recv(reduce) = self.pieces[i].kind else {
                    self.next_recv += 1;
                    continue;
                };
                let direct = reduce.is_none() && !self.blocked(i);
                if !direct && self.scratch_out == MAX_SCRATCH {
                    break;
                }
                self.post_recv(i, direct)?;
                self.next_recv += 1;
                any = true;
            }
            while self.first_open < self.pieces.len()
                && matches!(self.state[self.first_open], St::Done)
            {
                self.first_open += 1;
            }
            if !any {
                return Ok(());
            }
        }
    }

    /// Advances the agreement exchange: posts every round's receive at once (their sources
    /// differ), starts round `r`'s send once round `r - 1`'s receive is done, so that what
    /// a rank passes on includes what it heard (dissemination: after `⌈log2 P⌉` rounds every
    /// rank has heard, directly or not, from every rank, and each message was compared).
    fn agree(&mut self) -> Result<()> {
        if self.agree_at == self.pieces.len() {
            return Ok(());
        }
        if !self.agree_posted {
            self.agree_posted = true;
            for i in (self.agree_at + 1..self.pieces.len()).step_by(2) {
                let req = self
                    .call
                    .agree_recv(self.comm, Source::Rank(self.pieces[i].peer))?;
                self.reqs.push(req);
                self.req_piece.push(i);
                self.state[i] = St::Posted(None);
            }
        }
        loop {
            let i = self.agree_at + 2 * self.agree_sent;
            if i >= self.pieces.len()
                || (i > self.agree_at && !matches!(self.state[i - 1], St::Done))
            {
                return Ok(());
            }
            let p = &self.pieces[i];
            // SAFETY: an agreement message has no payload.
            let req = unsafe { self.call.agree_send(self.comm, p.peer, p.round)? };
            self.reqs.push(req);
            self.req_piece.push(i);
            self.state[i] = St::Posted(None);
            self.agree_sent += 1;
        }
    }

    fn copy(&mut self, i: usize) {
        let p = &self.pieces[i];
        let Kind::Copy { src, start } = p.kind else {
            return;
        };
        let from = self.regions[region_index(src)];
        let to = self.regions[region_index(p.buf)];
        let n = p.range.len();
        // SAFETY: both ranges are in bounds (checked schedule) and no unfinished earlier piece
        // touches them (not blocked); later pieces that do wait for this one. `copy` allows
        // overlap, and the schedule never copies into the input.
        unsafe { std::ptr::copy(from.ptr.add(start), to.ptr.add(p.range.start), n) };
        self.state[i] = St::Done;
    }

    fn start_send(&mut self, i: usize) -> Result<()> {
        let p = &self.pieces[i];
        let region = self.regions[region_index(p.buf)];
        // SAFETY: in bounds, and no unfinished piece writes it (not blocked; later writers
        // wait for this send to finish).
        let data = unsafe { region.slice(&p.range) };
        let step = p.round.min(STEP_MAX);
        // SAFETY: `data` stays valid and unchanged until the request finishes: the buffers
        // outlive the run, every request is finished before `run` returns (or the engine is
        // failed, which makes transports forget buffers), and writers of the range wait.
        let req = unsafe { self.call.isend(self.comm, data, p.peer, step)? };
        self.reqs.push(req);
        self.req_piece.push(i);
        self.sends += 1;
        self.state[i] = St::Posted(None);
        Ok(())
    }

    fn post_recv(&mut self, i: usize, direct: bool) -> Result<()> {
        let p = &self.pieces[i];
        let (peer, len) = (p.peer, p.range.len());
        let (req, scratch) = if direct {
            let region = self.regions[region_index(p.buf)];
            // SAFETY: in bounds, writable (never the input: checked schedule), and no
            // unfinished earlier piece touches it (not blocked); later ones wait for this.
            let dst = unsafe { region.slice_mut(&p.range) };
            // SAFETY: as for sends: the memory outlives the request.
            (unsafe { self.call.irecv(self.comm, dst, peer)? }, None)
        } else {
            let mut v = self.pool.pop().unwrap_or_default();
            if v.len() < self.scratch_len {
                v.resize(self.scratch_len, 0);
            }
            let bytes: &mut [u8] = &mut bytemuck::cast_slice_mut(&mut v[..])[..len];
            // SAFETY: the scratch vector's heap memory moves with it into the piece's state
            // and is not touched until the request finishes (then it is read, or returned
            // to the pool after the engine failed).
            let req = unsafe { self.call.irecv(self.comm, bytes, peer)? };
            self.scratch_out += 1;
            (req, Some(v))
        };
        self.reqs.push(req);
        self.req_piece.push(i);
        self.recvs += 1;
        self.state[i] = St::Posted(scratch);
        Ok(())
    }

    /// Combines (or copies) an arrived scratch piece into place.
    fn land(&mut self, i: usize) -> Result<()> {
        let St::Arrived(v) = std::mem::replace(&mut self.state[i], St::Done) else {
            return Ok(());
        };
        let p = &self.pieces[i];
        let region = self.regions[region_index(p.buf)];
        // SAFETY: in bounds, writable, and no unfinished earlier piece touches the range
        // (checked by the caller); later ones wait for this piece.
        let dst = unsafe { region.slice_mut(&p.range) };
        let src = &bytemuck::cast_slice::<u64, u8>(&v[..])[..p.range.len()];
        let r = match (p.kind, self.red) {
            (Kind::Recv(Some(order)), Some(red)) => {
                reduce_bytes(red.dtype, red.op, dst, src, order)
            }
            (Kind::Recv(Some(_)), None) => Err(internal(self.call, "a reduction without an op")),
            _ => {
                dst.copy_from_slice(src);
                Ok(())
            }
        };
        self.pool.push(v);
        self.scratch_out -= 1;
        r
    }

    /// Waits until at least one request finishes and handles every finished one.
    fn wait(&mut self) -> Result<()> {
        let mut ids: Vec<Token> = self.reqs.iter().map(RawRequest::id).collect();
        let n = ids.len();
        if let Some(w) = &self.wildcard {
            ids.push(w.id());
        }
        let shared = &self.comm.shared;
        let start = Instant::now();
        let mut done: Vec<(usize, Result<Done>)> = Vec::new();
        while done.is_empty() {
            // A lost member dooms the call even when no request of this rank involves it
            // (it would wait for ranks that wait for the lost one): fail now, and the
            // notices tell the others.
            let (losses, lost, notice, later) = {
                let eng = shared.lock();
                (
                    eng.losses(),
                    // A member that gave up a later call completed this one: it sent this
                    // rank everything of this call, so its loss does not doom the call.
                    self.lost_member(
                        |w| {
                            eng.lost(w)
                                .filter(|_| {
                                    !ahead(
                                        self.call,
                                        eng.notice_from(self.call.ctx, self.call.seq, w),
                                    )
                                })
                                .cloned()
                        },
                        |w| eng.notice_from(self.call.ctx, self.call.seq, w).is_some(),
                    ),
                    eng.notice_of(self.call.ctx, self.call.seq),
                    if self.answered_later {
                        Vec::new()
                    } else {
                        eng.later_notices(self.call.ctx, self.call.seq)
                    },
                )
            };
            // A member gave the call up (its notice found no receive of this rank posted),
            // or an earlier one that this rank completed: it joins no later call.
            if let Some((peer, env)) = notice {
                let done = Done {
                    peer,
                    len: 0,
                    env,
                    rejected: true,
                };
                return Err(self.notice_error(&done, 0, None));
            }
            if let Some(e) = lost {
                return Err(self.explained(e));
            }
            // A rank that completed this call timed out in a later one waiting for this
            // rank, which is alive and waiting in turn: it answers at once whom it waits
            // for, so the chain leads on (a stopped rank cannot answer, which names it).
            if let Some(e) = self.answer_later(&later) {
                return Err(e);
            }
            let left = shared
                .cfg
                .op_timeout
                .map(|t| t.saturating_sub(start.elapsed()));
            if let Err(e) = shared.wait_any_or_loss(&ids, losses, left) {
                return Err(match e {
                    Error::Timeout { .. } => self.timed_out(start.elapsed()),
                    other => self.explained(other),
                });
            }
            shared.take_done(&ids, |k, r| done.push((k, r)));
        }
        // The wildcard matched: a rank whose call differs sent an agreement message.
        if let Some(at) = done.iter().position(|d| d.0 == n) {
            let (_, r) = done.swap_remove(at);
            if let Some(w) = self.wildcard.take() {
                w.finished();
            }
            // A receive from any rank fails when some rank is lost: the loss itself fails
            // this call when it matters (see `lost_member`); and a rank lost after it
            // completed this call shows that every rank's call matched this one.
            if let Ok(d) = r {
                let e = self.notice_error(&d, 0, None);
                return Err(self.explained(e));
            }
            if done.is_empty() {
                return Ok(());
            }
        }
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        // A notice explains why its sender gave up; the sender then fails its engine and
        // closes its connections, so the same batch may hold losses of that sender that
        // are only consequences: the notice wins.
        let (mut first_err, mut notice_err) = (None, None);
        for (k, r) in done {
            let req = self.reqs.swap_remove(k);
            let i = self.req_piece.swap_remove(k);
            req.finished();
            let from_notice = matches!(&r, Ok(d) if d.rejected);
            if let Err(e) = self.finished(i, r) {
                if from_notice {
                    notice_err.get_or_insert(e);
                } else {
                    first_err.get_or_insert(e);
                }
            }
        }
        match notice_err.or(first_err) {
            Some(e) => Err(self.explained(e)),
            None => Ok(()),
        }
    }

    /// `err`, or for the loss of a peer that gave up a call first, the error its notice
    /// describes (see [`Exec::notice_waiting`]).
    fn explained(&mut self, err: Error) -> Error {
        if matches!(err, Error::PeerLost { .. } | Error::Aborted(_)) {
            self.take_in_notices();
        }
        match err {
            Error::PeerLost { peer, .. } if let Some(e) = self.notice_waiting(peer) => e,
            Error::PeerLost { .. } | Error::Aborted(_) if let Some(e) = self.mismatch_known() => e,
            Error::PeerLost { peer, .. } if let Some(e) = self.mismatch_elsewhere(peer) => e,
            e => e,
        }
    }

    /// The mismatch that world rank `peer` reported in a call of another communicator
    /// (its engine, shared by all its communicators, then failed, which is the loss this
    /// rank saw), if it did.
    fn mismatch_elsewhere(&mut self, peer: usize) -> Option<Error> {
        let notices = self.comm.shared.lock().notices_of_peer(peer);
        let main = notices.iter().rev().map(Env::decode).find(|e| {
            e.ctx != self.call.ctx && e.ctx & 1 == 1 && e.step >> 20 == NOTICE_MISMATCH
        })?;
        let actx = Call::agree_ctx(main.ctx - 1);
        let second = notices
            .iter()
            .map(Env::decode)
            .find(|e| e.ctx == actx && e.tag == main.tag && e.step >> 20 == NOTICE_MISMATCH)?;
        let pair = Pair {
            a: (main.step & BLAME_NONE) as usize,
            ea: main,
            b: (second.step & BLAME_NONE) as usize,
            eb: second,
        };
        self.pair = Some(pair);
        self.forward = Some((NOTICE_MISMATCH, BLAME_NONE));
        Some(pair.elsewhere(self.comm, self.call, peer))
    }

    /// Drives the transports a moment so that a notice already on its way in (sent before
    /// its sender failed, which a send to that sender can find first) is taken in.
    fn take_in_notices(&self) {
        let shared = &self.comm.shared;
        let losses = shared.lock().losses();
        let _ = shared.wait_any_or_loss(&[], losses, Some(NOTICE_TAKE_IN));
    }

    /// The error of a mismatch notice of this call from any rank, if one arrived: a lost
    /// peer may only be a rank that gave up the call for that mismatch (it fails its
    /// engine after sending its notices), so the mismatch is the better answer.
    fn mismatch_known(&mut self) -> Option<Error> {
        let (peer, env) = self
            .comm
            .shared
            .lock()
            .notice_of(self.call.ctx, self.call.seq)?;
        if Env::decode(&env).step >> 20 != NOTICE_MISMATCH {
            return None;
        }
        let done = Done {
            peer,
            len: 0,
            env,
            rejected: true,
        };
        Some(self.notice_error(&done, 0, None))
    }

    /// The error for the first member of the communicator that was lost (crashed, or its
    /// connection broke) without a notice, else the first lost at all, if any: explained by
    /// its notice when it gave up a call (see [`Exec::notice_waiting`]).
    fn lost_member(
        &self,
        lost: impl Fn(usize) -> Option<Error>,
        gave_notice: impl Fn(usize) -> bool,
    ) -> Option<Error> {
        let comm = self.comm;
        let me = comm.world_rank();
        // A member that died (lost without a notice) is the cause, not one that gave up
        // because of it and closed its connections after sending its notice.
        let all_lost: Vec<usize> = comm
            .group
            .world
            .iter()
            .copied()
            .filter(|&w| w != me && lost(w).is_some())
            .collect();
        let peer = super::blame::first_dead(&all_lost, &gave_notice)?;
        let why = lost(peer)?;
        let detail = match why {
            Error::PeerLost { detail, .. } => detail,
            other => other.to_string(),
        };
        Some(Error::PeerLost {
            rank: me,
            peer,
            op: self.call.describe_mine(),
            detail: format!("{detail} (the call needs every rank of the communicator)"),
        })
    }

    /// The error of a notice from world rank `peer` for this call that arrived before a
    /// receive of this rank could take it (then the peer closed its connections): the
    /// peer did not crash, it gave up, and the notice says why.
    fn notice_waiting(&mut self, peer: usize) -> Option<Error> {
        let env = self
            .comm
            .shared
            .lock()
            .notice_from(self.call.ctx, self.call.seq, peer)?;
        let done = Done {
            peer,
            len: 0,
            env,
            rejected: true,
        };
        let step = Env::decode(&env).step;
        if step >> 20 == NOTICE_MISMATCH {
            return Some(self.notice_error(&done, 0, None));
        }
        self.forward = Some((step >> 20, step & BLAME_NONE));
        Some(
            self.call
                .rejected(self.comm, &done, 0, self.started.elapsed()),
        )
    }

    fn finished(&mut self, i: usize, r: Result<Done>) -> Result<()> {
        let st = std::mem::replace(&mut self.state[i], St::Done);
        let kind = self.pieces[i].kind;
        let is_send = matches!(kind, Kind::Send | Kind::AgreeSend);
        match kind {
            Kind::Send => self.sends -= 1,
            Kind::Recv(_) => self.recvs -= 1,
            _ => {}
        }
        let scratch = match st {
            St::Posted(s) => s,
            _ => None,
        };
        let done = match r {
            Ok(d) => d,
            Err(Error::PeerLost { .. }) if is_send && self.peer_ahead(self.pieces[i].peer) => {
                // The peer completed this call (it gave up a later one) and so received
                // everything this rank sends it in this call.
                return Ok(());
            }
            Err(e) => {
                if let Some(v) = scratch {
                    self.pool.push(v);
                    self.scratch_out -= 1;
                }
                return Err(e);
            }
        };
        if is_send {
            return Ok(());
        }
        let want = self.pieces[i].range.len();
        if done.rejected || done.len != want {
            if let Some(v) = scratch {
                self.pool.push(v);
                self.scratch_out -= 1;
            }
            let peer = self.pieces[i].peer;
            return Err(self.notice_error(&done, want, Some(peer)));
        }
        if let Some(v) = scratch {
            self.state[i] = St::Arrived(v);
            // Keep program order among arrived pieces.
            let at = self.arrived.partition_point(|&j| j < i);
            self.arrived.insert(at, i);
        }
        Ok(())
    }

    /// Handles a failure: tells the schedule's peers, fails the engine, returns the error.
    fn fail(&mut self, err: Error) -> Error {
        let shared = &self.comm.shared;
        if shared.lock().fatal().is_none() {
            let (reason, blamed) = self.forward.unwrap_or_else(|| notice_reason(&err));
            let notices = match self.notices.take() {
                Some(sent) => sent,
                None => self.send_notices(reason, blamed),
            };
            super::blame::report_failure(reason, blamed, &err);
            let ids: Vec<Token> = notices.iter().map(RawRequest::id).collect();
            let deadline = std::time::Instant::now() + NOTICE_GRACE;
            let mut left = ids.clone();
            while !left.is_empty() {
                let now = std::time::Instant::now();
                if now >= deadline || shared.wait_any(&left, Some(deadline - now)).is_err() {
                    break;
                }
                let mut finished = Vec::new();
                shared.take_done(&left, |k, _| finished.push(left[k]));
                left.retain(|id| !finished.contains(id));
            }
            let mut pending = Vec::new();
            for r in notices {
                if left.contains(&r.id()) {
                    pending.push(r);
                } else {
                    r.finished();
                }
            }
            shared.fail(err.clone());
            // Failed by the engine now: dropping them does not wait.
            drop(pending);
        }
        err
    }
}

impl Exec<'_> {
    /// Sends a notice (`reason`, `blamed` world rank) to every peer of the schedule, then to
    /// every other rank of the communicator: a rank that already completed this call and
    /// waits for this one in a later call, with which this call exchanged nothing, must
    /// learn why too (else it sees only this rank's connections close). Failure path only:
    /// the extra notices cost nothing in a call that succeeds.
    fn send_notices(&self, reason: u32, blamed: u32) -> Vec<RawRequest> {
        let mut notices = Vec::new();
        let me = self.comm.rank();
        let others = (0..self.comm.size()).filter(|r| *r != me && !self.peers.contains(r));
        for peer in self.peers.iter().copied().chain(others) {
            if let (NOTICE_MISMATCH, Some(pair)) = (reason, &self.pair) {
                notices.extend(self.call.notice_pair(self.comm, peer, pair));
                continue;
            }
            // SAFETY: a notice has no payload.
            if let Ok(r) = unsafe { self.call.notice(self.comm, peer, reason, blamed) } {
                notices.push(r);
            }
        }
        notices
    }

    /// The error for a receive that got a notice, another call's message, or a message
    /// of the wrong size (`want` bytes expected); sets the notice to pass on. `posted_for`:
    /// the communicator rank the receive was posted for (this rank was waiting for it).
    fn notice_error(&mut self, done: &Done, want: usize, posted_for: Option<usize>) -> Error {
        let env = Env::decode(&done.env);
        if done.rejected
            && env.kind == KIND_NOTICE
            && env.step >> 20 == NOTICE_TIMEOUT
            && let Some(e) = self.blamed_but_waiting(done.peer, env.step & BLAME_NONE, posted_for)
        {
            return e;
        }
        if done.rejected
            && env.kind == KIND_NOTICE
            && env.step >> 20 == NOTICE_MISMATCH
            && let Some(pair) = self.reported_pair(done.peer, env.tag)
        {
            self.pair = Some(pair);
            self.forward = Some((NOTICE_MISMATCH, BLAME_NONE));
            return pair.error(self.comm, self.call, Some(done.peer));
        }
        if env.kind == KIND_COLL {
            // A message of another call (or of this call, cut differently): this rank
            // found the mismatch, between itself and the sender.
            let pair = Pair {
                a: self.comm.world_rank(),
                ea: self.call.fingerprint(),
                b: done.peer,
                eb: env,
            };
            self.pair = Some(pair);
            self.forward = Some((NOTICE_MISMATCH, (done.peer as u32).min(BLAME_NONE)));
            if !env.same_call(&self.call.fingerprint()) {
                return pair.error(self.comm, self.call, None);
            }
        }
        if done.rejected
            && env.kind == KIND_NOTICE
            && env.step >> 20 == NOTICE_TIMEOUT
            && let Some(e) = self.blamed_elsewhere(done.peer, env.step & BLAME_NONE, posted_for)
        {
            return e;
        }
        self.forward = Some(if done.rejected && env.kind == KIND_NOTICE {
            (env.step >> 20, env.step & BLAME_NONE)
        } else {
            (NOTICE_MISMATCH, (done.peer as u32).min(BLAME_NONE))
        });
        self.call
            .rejected(self.comm, done, want, self.started.elapsed())
    }

    /// Whether communicator rank `peer` gave up a call later than this one (so completed
    /// this one).
    fn peer_ahead(&self, peer: usize) -> bool {
        let w = self.comm.group.world.get(peer).copied().unwrap_or(peer);
        let eng = self.comm.shared.lock();
        ahead(self.call, eng.notice_from(self.call.ctx, self.call.seq, w))
    }

    /// The mismatch that world rank `from` reports in its two notices of call `tag` (see
    /// [`Call::notice_pair`]); waits a moment for the second to arrive when only one is
    /// here. `None` when `from` sent no such pair.
    fn reported_pair(&self, from: usize, tag: u32) -> Option<Pair> {
        let shared = &self.comm.shared;
        let deadline = Instant::now() + NOTICE_GRACE;
        loop {
            let (losses, first, second) = {
                let eng = shared.lock();
                let get = |ctx| {
                    eng.notice_from(ctx, tag, from)
                        .map(|e| Env::decode(&e))
                        .filter(|e| e.tag == tag && e.step >> 20 == NOTICE_MISMATCH)
                };
                (eng.losses(), get(self.call.ctx), get(self.call.actx))
            };
            match (first, second) {
                (Some(ea), Some(eb)) => {
                    return Some(Pair {
                        a: (ea.step & BLAME_NONE) as usize,
                        ea,
                        b: (eb.step & BLAME_NONE) as usize,
                        eb,
                    });
                }
                (None, None) => return None,
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline
                || shared
                    .wait_any_or_loss(&[], losses, Some(deadline - now))
                    .is_err()
            {
                return None;
            }
        }
    }

    /// Answers the first timeout notice among `later` (notices of later calls, see
    /// `Engine::later_notices`) that blames this rank, at most once per
    /// call: the error of [`Exec::blamed_but_waiting`], if this rank waits for another.
    fn answer_later(&mut self, later: &[(usize, crate::wire::Envelope)]) -> Option<Error> {
        let me = self.comm.world_rank();
        let (from, blamed) = later.iter().find_map(|(from, env)| {
            let env = Env::decode(env);
            let blamed = env.step & BLAME_NONE;
            (env.kind == KIND_NOTICE && env.step >> 20 == NOTICE_TIMEOUT && blamed as usize == me)
                .then_some((*from, blamed))
        })?;
        self.answered_later = true;
        self.blamed_but_waiting(from, blamed, None)
    }

    /// A timeout notice from world rank `from` blames `blamed`: when that is this rank,
    /// which is not stuck but waiting in turn for another rank (`from` timed out first),
    /// the error naming the rank this one waits for, which the notices pass on. `None`
    /// when the notice blames another rank, or this rank waits for nobody but `from`.
    fn blamed_but_waiting(
        &mut self,
        from: usize,
        blamed: u32,
        posted_for: Option<usize>,
    ) -> Option<Error> {
        let comm = self.comm;
        let me = comm.world_rank();
        if blamed as usize != me {
            return None;
        }
        let world = |r: usize| comm.group.world.get(r).copied().unwrap_or(r);
        // The receive the notice took was waiting too (it is no longer pending).
        let target = posted_for
            .into_iter()
            .chain(self.waiting_for().into_iter().map(|(r, _)| r))
            .map(world)
            .find(|&w| w != from && w != me)?;
        let chain = self.settle_blame(target, Some(target));
        let stuck = chain.rank();
        self.forward = Some((NOTICE_TIMEOUT, stuck as u32));
        let waited = self.started.elapsed();
        Some(Error::Timeout {
            op: format!("{} on rank {}", self.call.describe_mine(), comm.rank()),
            waited,
            detail: format!(
                "{} timed out in the call waiting for this rank and gave up, but this rank \
                 was itself waiting for {}{}: {} is stuck (stopped, hung in other work, \
                 unreachable, or much slower); raise FERROCOMM_OP_TIMEOUT (seconds, 0 = no \
                 limit) if it is only slow",
                Call::who(comm, from),
                Call::who(comm, target),
                chain_text(comm, &chain),
                Call::who(comm, stuck)
            ),
        })
    }

    /// A timeout notice from world rank `from` blames `blamed`, another rank: when the
    /// notices of the others show `blamed` alive and waiting in turn, the error naming the
    /// rank at the end of that chain, which the notices pass on. `None` when the chain
    /// ends at `blamed` (the notice's own error says it all). `posted_for`: as for
    /// [`Exec::notice_error`].
    fn blamed_elsewhere(
        &mut self,
        from: usize,
        blamed: u32,
        posted_for: Option<usize>,
    ) -> Option<Error> {
        let comm = self.comm;
        let me = comm.world_rank();
        let blamed = blamed as usize;
        if blamed == BLAME_NONE as usize || blamed == me || blamed == from || self.settling {
            return None;
        }
        let world = |r: usize| comm.group.world.get(r).copied().unwrap_or(r);
        let mine = posted_for
            .into_iter()
            .chain(self.waiting_for().into_iter().map(|(r, _)| r))
            .map(world)
            .find(|&w| w != me);
        let chain = self.settle_blame(blamed, mine);
        let stuck = chain.rank();
        if stuck == blamed {
            return None;
        }
        self.forward = Some((NOTICE_TIMEOUT, stuck as u32));
        Some(Error::Timeout {
            op: format!("{} on rank {}", self.call.describe_mine(), comm.rank()),
            waited: self.started.elapsed(),
            detail: format!(
                "{} timed out in the call waiting for {} and gave up, but {} was itself \
                 waiting{}: {} is stuck (stopped, hung in other work, unreachable, or much \
                 slower); raise FERROCOMM_OP_TIMEOUT (seconds, 0 = no limit) if it is only \
                 slow",
                Call::who(comm, from),
                Call::who(comm, blamed),
                Call::who(comm, blamed),
                chain_text(comm, &chain),
                Call::who(comm, stuck)
            ),
        })
    }

    /// The evidence for naming a stuck rank of this call (see [`super::blame`]): the edges
    /// `who -> whom` of the timeout and lost-peer notices kept from the communicator's
    /// members, this rank's own edge (`mine`: whom it waits for), and the members lost
    /// without a notice.
    fn blame_evidence(
        &self,
        mine: Option<usize>,
    ) -> (BTreeMap<usize, usize>, BTreeSet<usize>, u64) {
        let comm = self.comm;
        let me = comm.world_rank();
        let mut edges: BTreeMap<usize, usize> = mine.map(|m| (me, m)).into_iter().collect();
        let mut dead = BTreeSet::new();
        let eng = comm.shared.lock();
        for &w in comm.group.world.iter().filter(|&&w| w != me) {
            match eng.notice_from(self.call.ctx, self.call.seq, w) {
                Some(env) => {
                    let env = Env::decode(&env);
                    let (reason, blamed) = (env.step >> 20, env.step & BLAME_NONE);
                    if env.kind == KIND_NOTICE
                        && matches!(reason, NOTICE_TIMEOUT | NOTICE_PEER_LOST)
                        && blamed != BLAME_NONE
                        && blamed as usize != w
                    {
                        edges.insert(w, blamed as usize);
                    }
                }
                None if eng.lost(w).is_some() => {
                    dead.insert(w);
                }
                None => {}
            }
        }
        (edges, dead, eng.losses())
    }

    /// Tells every member at once that this rank gave up because of `suspect` (if it has
    /// not yet sent its notices), then listens for the others' notices for the settle time,
    /// finishing requests that complete meanwhile, and follows the chain of "waits for"
    /// from `suspect` to its end (see [`super::blame::resolve`]). `mine`: whom this rank
    /// waits for. Stops early when the chain ends at a dead rank.
    fn settle_blame(&mut self, suspect: usize, mine: Option<usize>) -> Blame {
        let shared = &self.comm.shared;
        if self.notices.is_none() {
            self.notices = Some(self.send_notices(NOTICE_TIMEOUT, suspect as u32));
        }
        let settle = shared.cfg.op_timeout.map_or(Duration::ZERO, settle_time);
        let deadline = Instant::now() + settle;
        let nested = std::mem::replace(&mut self.settling, true);
        loop {
            let (edges, dead, losses) = self.blame_evidence(mine);
            let chain = resolve(suspect, &edges, &dead);
            let now = Instant::now();
            if nested || now >= deadline || dead.contains(&chain.rank()) {
                self.settling = nested;
                return chain;
            }
            let ids: Vec<Token> = self.reqs.iter().map(RawRequest::id).collect();
            match shared.wait_any_or_loss(&ids, losses, Some(deadline - now)) {
                Ok(()) => {}
                Err(Error::Timeout { .. }) => continue,
                Err(_) => {
                    // The evidence as it is now (what arrived while waiting counts).
                    let (edges, dead, _) = self.blame_evidence(mine);
                    self.settling = nested;
                    return resolve(suspect, &edges, &dead);
                }
            }
            let mut done: Vec<(usize, Result<Done>)> = Vec::new();
            shared.take_done(&ids, |k, r| done.push((k, r)));
            done.sort_by_key(|d| std::cmp::Reverse(d.0));
            for (k, r) in done {
                let req = self.reqs.swap_remove(k);
                let i = self.req_piece.swap_remove(k);
                req.finished();
                // Keeps the pieces' states consistent; the call fails anyway.
                let _ = self.finished(i, r);
            }
        }
    }

    /// The communicator ranks this rank is waiting for, each once: those of pending
    /// receives first (their data is what is missing), then those of pending sends, with
    /// `true` for a receive.
    fn waiting_for(&self) -> Vec<(usize, bool)> {
        let mut out: Vec<(usize, bool)> = Vec::new();
        for want_recv in [true, false] {
            for &i in &self.req_piece {
                let p = &self.pieces[i];
                let is_recv = matches!(p.kind, Kind::Recv(_));
                if is_recv == want_recv && !out.iter().any(|&(q, _)| q == p.peer) {
                    out.push((p.peer, is_recv));
                }
            }
        }
        out
    }

    /// No request finished for `waited` (the operation timeout): tells the peers whom this
    /// rank waits for, settles (see the module documentation) and returns the timeout
    /// error naming the rank that is probably stuck.
    fn timed_out(&mut self, waited: Duration) -> Error {
        let comm = self.comm;
        let world = |r: usize| comm.group.world.get(r).copied().unwrap_or(r);
        let waiting = self.waiting_for();
        let list = waiting
            .iter()
            .map(|&(r, recv)| {
                let what = if recv { "receive from" } else { "send to" };
                format!("{what} {}", Call::who(comm, world(r)))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let Some(&(first, _)) = waiting.first() else {
            return internal(self.call, "a timeout with nothing in flight");
        };
        let suspect = world(first);
        let chain = self.settle_blame(suspect, Some(suspect));
        let stuck = chain.rank();
        self.forward = Some((NOTICE_TIMEOUT, stuck as u32));
        let why = match &chain {
            Blame::Cycle(_) => format!(
                "the ranks wait for each other{}, none is known to be stuck: a deadlock in \
                 the program's calls, or a rank that resumed after the others gave up",
                chain_text(comm, &chain)
            ),
            Blame::Rank { via, .. } if !via.is_empty() => format!(
                "the ranks timed out too, each waiting for the next{}",
                chain_text(comm, &chain)
            ),
            Blame::Rank { .. } => String::from("it sent nothing"),
        };
        Error::Timeout {
            op: format!("{} on rank {}", self.call.describe_mine(), comm.rank()),
            waited,
            detail: format!(
                "nothing of the call arrived or left for {waited:.1?} while this rank waited \
                 for: {list}; {} is stuck ({why}): it may be stopped, hung in other work, \
                 unreachable (a cut link), or much slower; raise FERROCOMM_OP_TIMEOUT (seconds, 0 = no limit) if it \
                 is only slow",
                Call::who(comm, stuck)
            ),
        }
    }
}

/// Whether `notice` (a peer's latest notice in `call`'s context) gave up a call after
/// `call`: the peer completed `call`.
fn ahead(call: &Call, notice: Option<crate::wire::Envelope>) -> bool {
    notice.is_some_and(|e| {
        let tag = Env::decode(&e).tag;
        (1..=0x7FFF_FFFF).contains(&tag.wrapping_sub(call.seq))
    })
}

/// The chain of a [`Blame`] in words, for an error: ` (rank 1 waits for rank 4, which
/// waits for rank 2)`; empty when it has no hop.
fn chain_text(comm: &Communicator, chain: &Blame) -> String {
    let ranks: Vec<usize> = match chain {
        Blame::Rank { rank, via } if !via.is_empty() => {
            via.iter().copied().chain([*rank]).collect()
        }
        Blame::Rank { .. } => return String::new(),
        Blame::Cycle(c) => c.iter().copied().chain(c.first().copied()).collect(),
    };
    let mut text = String::from(" (");
    for (i, &w) in ranks.iter().enumerate() {
        text += match i {
            0 => "",
            1 => " waits for ",
            _ => ", which waits for ",
        };
        text += &Call::who(comm, w);
    }
    text.push(')');
    text
}

/// Finishes an [`ReduceOp::Avg`]: divides `out` by `n` (nothing for other ops).
pub(crate) fn finish_avg(red: Reduction, out: &mut [u8], n: usize) -> Result<()> {
    if red.op == ReduceOp::Avg && n > 1 {
        divide_bytes(red.dtype, out, n)?;
    }
    Ok(())
}
