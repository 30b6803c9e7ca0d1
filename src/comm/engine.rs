//! The progress engine: requests, message matching and the transports of one process.
//!
//! One engine serves a process's world communicator and every communicator derived from it
//! (they share the transports and are told apart by the context in each envelope). It is
//! driven by whichever thread waits: there is no I/O thread.
//!
//! Matching follows MPI: a receive names a context, a source (or any) and a tag (or any);
//! posted receives are matched in the order they were posted, arriving messages in the
//! order each peer sent them, so messages between two ranks with the same context and tag
//! never overtake each other. A message that arrives before its receive is kept in the
//! unexpected queue (small ones whole, large ones still at the sender, see the transport
//! contract).
//!
//! A kept message takes its place in the unexpected queue as soon as its header arrives,
//! even while its payload is still being read: a receive posted in the meantime claims it
//! (and gets the payload when it is complete) instead of waiting for a later message, so a
//! receive can neither hang on a message that was already on its way nor see messages out
//! of order.

use std::collections::VecDeque;
use std::fmt;

use super::envelope::{Env, KIND_COLL, KIND_NOTICE};
use super::watch::FdWatcher;
use crate::error::{Error, Result};
use crate::transport::{
    Envelope, Events, Placement, RecvBuf, SendBuf, Stored, Token, Transport, WaitFd,
};

/// Identifies a request: slot index in the low 32 bits, the slot's generation above.
pub(crate) type ReqId = Token;

/// Marks the calling rank itself in the routing table.
const ROUTE_SELF: u8 = u8::MAX;

/// What a completed request reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Done {
    /// World rank of the sender (receives) or destination (sends).
    pub peer: usize,
    /// Bytes received or sent.
    pub len: usize,
    /// The message's envelope (receives).
    pub env: Envelope,
    /// A collective receive that got a message of another call (or a notice) instead: its
    /// payload was dropped and `env` is the offending message's envelope.
    pub rejected: bool,
}

#[derive(Clone, Copy, Debug)]
enum OpKind {
    Send,
    Recv,
}

/// What a request is, for error messages.
#[derive(Clone, Copy, Debug)]
struct Op {
    kind: OpKind,
    peer: Option<usize>,
    tag: Option<u32>,
    ctx: u64,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, self.peer) {
            (OpKind::Send, Some(p)) => write!(f, "send to rank {p}")?,
            (OpKind::Send, None) => write!(f, "send")?,
            (OpKind::Recv, Some(p)) => write!(f, "recv from rank {p}")?,
            (OpKind::Recv, None) => write!(f, "recv from any rank")?,
        }
        match self.tag {
            Some(t) => write!(f, " (tag {t}, context {:#x})", self.ctx),
            None => write!(f, " (any tag, context {:#x})", self.ctx),
        }
    }
}

enum State {
    Free,
    /// A receive waiting in the posted queue.
    Posted,
    /// Handed to a transport.
    Active,
    Done(Result<Done>),
}

struct Slot {
    generation: u32,
    state: State,
    op: Op,
    /// Filled when a receive is matched.
    matched: Done,
}

struct PostedRecv {
    ctx: u64,
    src: Option<usize>,
    tag: Option<u32>,
    buf: RecvBuf,
    req: ReqId,
    /// For collective receives: the receiver's own call, which the message must match.
    expect: Option<Env>,
}

struct Unexpected {
    peer: usize,
    env: Envelope,
    /// Length announced by the header.
    len: usize,
    /// `None` while the payload is still arriving.
    msg: Option<Stored>,
    /// A receive that matched the message while its payload was arriving.
    claim: Claim,
}

/// Who takes a kept message once its payload is complete.
enum Claim {
    /// Nobody yet: the next matching receive.
    Open,
    /// This receive (its request is active; the buffer holds at least `len` bytes).
    Recv(RecvBuf, ReqId),
    /// Nobody: a receive matched it but was too small; drop it.
    Drop,
}

/// Matching state; receives the transports' events.
struct Core {
    me: usize,
    posted: VecDeque<PostedRecv>,
    unexpected: VecDeque<Unexpected>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    failed: Vec<Option<Error>>,
    /// Peers whose failure was a loss (a crash, a broken connection), not a goodbye.
    lost: Vec<bool>,
    /// Counts losses of peers and notices, so that a waiting collective learns of a loss
    /// that completes none of its requests (see [`Engine::losses`]).
    losses: u64,
    fatal: Option<Error>,
    /// Notices received lately (sender, envelope): collectives given up by a peer.
    notices: VecDeque<(usize, Envelope)>,
}

/// Notices remembered for receives posted after they arrived.
const MAX_NOTICES: usize = 64;

fn id_of(index: u32, generation: u32) -> ReqId {
    ((generation as u64) << 32) | index as u64
}

fn matches(p: &PostedRecv, peer: usize, ctx: u64, tag: u32) -> bool {
    p.ctx == ctx && p.src.is_none_or(|s| s == peer) && p.tag.is_none_or(|t| t == tag)
}

fn truncated(op: &Op, cap: usize, len: usize, peer: usize, tag: u32) -> Error {
    Error::invalid(
        op.to_string(),
        "buffer",
        format!(
            "it holds {cap} bytes but the message from rank {peer} (tag {tag}) has {len}; \
             post a receive at least as large as the message"
        ),
    )
}

/// Rewrites a peer failure reported by a transport so that it names `op`.
fn for_op(err: &Error, op: &Op) -> Error {
    match err {
        Error::PeerLost {
            rank, peer, detail, ..
        } => Error::PeerLost {
            rank: *rank,
            peer: *peer,
            op: op.to_string(),
            detail: detail.clone(),
        },
        other => other.clone(),
    }
}

impl Core {
    fn slot(&mut self, id: ReqId) -> Option<&mut Slot> {
        let s = self.slots.get_mut((id & 0xffff_ffff) as usize)?;
        (s.generation == (id >> 32) as u32 && !matches!(s.state, State::Free)).then_some(s)
    }

    fn alloc(&mut self, state: State, op: Op) -> ReqId {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    state: State::Free,
                    op,
                    matched: Done {
                        peer: 0,
                        len: 0,
                        env: Envelope::default(),
                        rejected: false,
                    },
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[index as usize];
        s.generation = s.generation.wrapping_add(1);
        s.state = state;
        s.op = op;
        id_of(index, s.generation)
    }

    fn finish(&mut self, id: ReqId, result: Result<Done>) {
        if let Some(s) = self.slot(id) {
            s.state = State::Done(result);
        }
    }

    fn peer_error(&self, peer: usize) -> Option<&Error> {
        self.failed.get(peer).and_then(Option::as_ref)
    }

    /// A peer gave up the collective with the notice's context and tag: every collective
    /// receive of it, posted now or later, completes as rejected with the notice.
    fn notice(&mut self, peer: usize, env: Envelope) {
        let (ctx, tag) = Env::key(&env);
        tracing::debug!(rank = self.me, peer, ctx, tag, "collective notice");
        let mut hit = Vec::new();
        self.posted.retain(|p| {
            let h = p.expect.is_some() && p.ctx == ctx && p.tag == Some(tag);
            if h {
                hit.push(p.req);
            }
            !h
        });
        for id in hit {
            self.finish(
                id,
                Ok(Done {
                    peer,
                    len: 0,
                    env,
                    rejected: true,
                }),
            );
        }
        self.losses += 1;
        if self.notices.len() == MAX_NOTICES {
            self.notices.pop_front();
        }
        self.notices.push_back((peer, env));
    }
}

impl Events for Core {
    fn incoming(&mut self, peer: usize, env: &Envelope, len: usize) -> Placement {
        if self.fatal.is_some() {
            return Placement::Discard;
        }
        if Env::kind_of(env) == KIND_NOTICE {
            self.notice(peer, *env);
            return Placement::Discard;
        }
        let (ctx, tag) = Env::key(env);
        let Some(pos) = self.posted.iter().position(|p| matches(p, peer, ctx, tag)) else {
            // Its place in the queue is taken now; `stored` fills it in.
            self.unexpected.push_back(Unexpected {
                peer,
                env: *env,
                len,
                msg: None,
                claim: Claim::Open,
            });
            return Placement::Keep;
        };
        let p = self.posted.remove(pos).expect("position is in range");
        let env = *env;
        let Some(slot) = self.slot(p.req) else {
            return Placement::Discard;
        };
        if let Some(mine) = &p.expect
            && (p.buf.len < len || !Env::decode(&env).same_call(mine))
        {
            slot.state = State::Done(Ok(Done {
                peer,
                len,
                env,
                rejected: true,
            }));
            return Placement::Discard;
        }
        if p.buf.len < len {
            let err = truncated(&slot.op, p.buf.len, len, peer, tag);
            slot.state = State::Done(Err(err));
            return Placement::Discard;
        }
        slot.state = State::Active;
        slot.matched = Done {
            peer,
            len,
            env,
            rejected: false,
        };
        Placement::Into(p.buf, p.req)
    }

    fn stored(&mut self, peer: usize, env: Envelope, msg: Stored) {
        if self.fatal.is_some() {
            return;
        }
        let Some(pos) = self
            .unexpected
            .iter()
            .position(|u| u.peer == peer && u.msg.is_none() && u.env == env)
        else {
            // No header seen (a transport that reports whole messages only).
            let len = match &msg {
                Stored::Bytes(v) => v.len(),
                Stored::Remote { len, .. } => *len,
            };
            self.unexpected.push_back(Unexpected {
                peer,
                env,
                len,
                msg: Some(msg),
                claim: Claim::Open,
            });
            return;
        };
        let u = &mut self.unexpected[pos];
        match (&u.claim, msg) {
            (Claim::Open, msg) => u.msg = Some(msg),
            (Claim::Recv(buf, id), Stored::Bytes(v)) => {
                let (buf, id) = (*buf, *id);
                let done = Done {
                    peer,
                    len: v.len(),
                    env,
                    rejected: false,
                };
                self.unexpected.remove(pos);
                // SAFETY: the claiming receive is active, so its buffer is still valid and
                // reserved for this message; it holds at least `len` bytes (checked when it
                // claimed the message).
                let dst = unsafe { buf.as_mut_slice() };
                dst[..v.len()].copy_from_slice(&v);
                self.finish(id, Ok(done));
            }
            (Claim::Drop, Stored::Bytes(_)) => {
                self.unexpected.remove(pos);
            }
            // Still at the sender: `Engine::progress` fetches or discards it (a transport
            // cannot be called from inside its own events).
            (_, msg @ Stored::Remote { .. }) => u.msg = Some(msg),
        }
    }

    fn recv_done(&mut self, token: Token) {
        if let Some(s) = self.slot(token) {
            s.state = State::Done(Ok(s.matched));
        }
    }

    fn send_done(&mut self, token: Token) {
        if let Some(s) = self.slot(token) {
            s.state = State::Done(Ok(s.matched));
        }
    }

    fn peer_closed(&mut self, peer: usize) {
        tracing::debug!(rank = self.me, peer, "peer closed its communicator");
        let err = Error::PeerLost {
            rank: self.me,
            peer,
            op: String::new(),
            detail: "that rank closed its communicator (it finished) while this one still \
                     expected it to take part"
                .into(),
        };
        if let Some(f) = self.failed.get_mut(peer) {
            f.get_or_insert(err.clone());
        }
        // Only what names this peer fails; receives from any source may still be matched
        // by the others.
        let mut doomed = Vec::new();
        self.posted.retain(|p| {
            let hit = p.src == Some(peer);
            if hit {
                doomed.push(p.req);
            }
            !hit
        });
        for s in self.slots.iter_mut() {
            if matches!(s.state, State::Active) && s.op.peer == Some(peer) {
                s.state = State::Done(Err(for_op(&err, &s.op)));
            }
        }
        for id in doomed {
            if let Some(s) = self.slot(id) {
                s.state = State::Done(Err(for_op(&err, &s.op)));
            }
        }
    }

    fn peer_failed(&mut self, peer: usize, err: Error) {
        tracing::debug!(rank = self.me, peer, "peer failed: {err}");
        if let Some(f) = self.failed.get_mut(peer) {
            f.get_or_insert(err.clone());
        }
        if let Some(l) = self.lost.get_mut(peer) {
            *l = true;
        }
        self.losses += 1;
        // Fail everything that needs this peer: its transfers in flight, receives naming it,
        // and receives from any source (the peer may have been the one to send).
        let mut doomed = Vec::new();
        self.posted.retain(|p| {
            let hit = p.src.is_none_or(|s| s == peer);
            if hit {
                doomed.push(p.req);
            }
            !hit
        });
        for s in self.slots.iter_mut() {
            let involved = matches!(s.state, State::Active)
                && match s.op.peer {
                    Some(p) => p == peer,
                    None => s.matched.peer == peer,
                };
            if involved {
                s.state = State::Done(Err(for_op(&err, &s.op)));
            }
        }
        for id in doomed {
            if let Some(s) = self.slot(id) {
                s.state = State::Done(Err(for_op(&err, &s.op)));
            }
        }
        // Large messages still at the dead sender can never be fetched, nor can payloads
        // it had not finished sending.
        self.unexpected
            .retain(|u| !(u.peer == peer && matches!(u.msg, None | Some(Stored::Remote { .. }))));
    }
}

/// The descriptor watcher of a process whose sleep one transport hosts (see
/// [`Engine::wait`]).
enum Watch {
    /// Started: armed for each hosted sleep.
    Running(FdWatcher),
    /// It could not be started: take short turns instead.
    Failed,
}

/// The transports and matching state of one process. Not thread-safe by itself: the
/// communicator layer wraps it in a mutex.
pub(crate) struct Engine {
    transports: Vec<Box<dyn Transport>>,
    /// The watcher of a sleep hosted by one transport (started at the first such sleep).
    watch: Option<Watch>,
    /// Index into `transports` for each world rank (`ROUTE_SELF` for this rank).
    route: Vec<u8>,
    core: Core,
}

impl Engine {
    /// An engine for world rank `me` reaching world rank `r` through
    /// `transports[route[r]]` (`route[me]` is ignored).
    pub fn new(me: usize, transports: Vec<Box<dyn Transport>>, mut route: Vec<u8>) -> Engine {
        if let Some(r) = route.get_mut(me) {
            *r = ROUTE_SELF;
        }
        let world = route.len();
        Engine {
            transports,
            watch: None,
            route,
            core: Core {
                me,
                posted: VecDeque::new(),
                unexpected: VecDeque::new(),
                slots: Vec::new(),
                free: Vec::new(),
                failed: vec![None; world],
                lost: vec![false; world],
                losses: 0,
                fatal: None,
                notices: VecDeque::new(),
            },
        }
    }

    /// The name of the transport that reaches `peer` (`"self"` for this rank).
    pub fn transport_of(&self, peer: usize) -> &'static str {
        match self.route.get(peer) {
            Some(&ROUTE_SELF) => "self",
            Some(&t) => self.transports[t as usize].name(),
            None => "none",
        }
    }

    /// Wakers of every transport (for other threads and abort).
    pub fn wakers(&self) -> Vec<crate::transport::Waker> {
        self.transports.iter().map(|t| t.waker()).collect()
    }

    fn check_usable(&self) -> Result<()> {
        match &self.core.fatal {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn check_peer(&self, peer: usize, op: &Op) -> Result<()> {
        if peer >= self.route.len() {
            return Err(Error::invalid(
                op.to_string(),
                "rank",
                format!(
                    "rank {peer} does not exist in a world of {}",
                    self.route.len()
                ),
            ));
        }
        match self.core.peer_error(peer) {
            Some(e) => Err(for_op(e, op)),
            None => Ok(()),
        }
    }

    /// Starts sending `data` with envelope `env` to world rank `peer`.
    ///
    /// # Safety
    /// `data` must stay valid and unchanged until the request completes, is abandoned by
    /// [`Engine::abort`], or this call returns an error.
    pub unsafe fn send(&mut self, peer: usize, env: &Env, data: SendBuf) -> Result<ReqId> {
        self.check_usable()?;
        let op = Op {
            kind: OpKind::Send,
            peer: Some(peer),
            tag: Some(env.tag),
            ctx: env.ctx,
        };
        self.check_peer(peer, &op)?;
        let envelope = env.encode();
        let id = self.core.alloc(State::Active, op);
        if let Some(s) = self.core.slot(id) {
            s.matched = Done {
                peer,
                len: data.len,
                env: envelope,
                rejected: false,
            };
        }
        let route = self.route[peer];
        if route == ROUTE_SELF {
            // SAFETY: `data` is valid now (caller's contract); it is copied before returning.
            let bytes = unsafe { data.as_slice() };
            self.deliver_to_self(&envelope, bytes);
            self.core.send_done(id);
            return Ok(id);
        }
        // SAFETY: forwarded from this function's contract.
        let sent = unsafe { self.transports[route as usize].send(peer, &envelope, data, id) };
        match sent {
            Ok(crate::transport::Sent::Done) => self.core.send_done(id),
            Ok(crate::transport::Sent::Pending) => {}
            Err(e) => {
                self.release(id);
                return Err(e);
            }
        }
        Ok(id)
    }

    fn deliver_to_self(&mut self, envelope: &Envelope, bytes: &[u8]) {
        let me = self.core.me;
        match self.core.incoming(me, envelope, bytes.len()) {
            Placement::Into(buf, token) => {
                // SAFETY: the posted receive handed over its buffer, at least `len` bytes.
                let dst = unsafe { buf.as_mut_slice() };
                dst[..bytes.len()].copy_from_slice(bytes);
                self.core.recv_done(token);
            }
            Placement::Keep => self
                .core
                .stored(me, *envelope, Stored::Bytes(bytes.to_vec())),
            Placement::Discard => {}
        }
    }

    /// Posts a receive of a message with context `ctx` from world rank `src` (any when
    /// `None`) with tag `tag` (any when `None`) into `buf`.
    ///
    /// With `expect` (a collective's own call), a message of another call, a notice, or a
    /// message larger than `buf` does not fail the receive: it completes as
    /// [`Done::rejected`] with that message's envelope, and nothing is written to `buf`.
    ///
    /// # Safety
    /// `buf` must stay valid and unused by anyone else until the request completes, is
    /// cancelled, abandoned by [`Engine::abort`], or this call returns an error.
    pub unsafe fn recv(
        &mut self,
        ctx: u64,
        src: Option<usize>,
        tag: Option<u32>,
        buf: RecvBuf,
        expect: Option<Env>,
    ) -> Result<ReqId> {
        self.check_usable()?;
        let op = Op {
            kind: OpKind::Recv,
            peer: src,
            tag,
            ctx,
        };
        if let Some(s) = src
            && s >= self.route.len()
        {
            self.check_peer(s, &op)?;
        }
        if expect.is_some()
            && let Some(t) = tag
            && let Some(&(peer, env)) = self
                .core
                .notices
                .iter()
                .find(|(_, e)| Env::key(e) == (ctx, t))
        {
            let id = self.core.alloc(State::Active, op);
            self.core.finish(
                id,
                Ok(Done {
                    peer,
                    len: 0,
                    env,
                    rejected: true,
                }),
            );
            return Ok(id);
        }
        // Messages that arrived before their sender failed can still be received.
        let pos = self.core.unexpected.iter().position(|u| {
            let (c, t) = Env::key(&u.env);
            matches!(u.claim, Claim::Open)
                && c == ctx
                && src.is_none_or(|s| s == u.peer)
                && tag.is_none_or(|x| x == t)
        });
        let Some(pos) = pos else {
            if let Some(s) = src {
                self.check_peer(s, &op)?;
            }
            let id = self.core.alloc(State::Posted, op);
            self.core.posted.push_back(PostedRecv {
                ctx,
                src,
                tag,
                buf,
                req: id,
                expect,
            });
            return Ok(id);
        };
        if self.core.unexpected[pos].msg.is_none() {
            // Its payload is still arriving: claim it.
            let u = &mut self.core.unexpected[pos];
            let (peer, len, env) = (u.peer, u.len, u.env);
            if let Some(mine) = &expect
                && (buf.len < len || !Env::decode(&env).same_call(mine))
            {
                // Another call's message: this collective receive is rejected at once and
                // the message consumed, as when it is already complete.
                self.core.unexpected[pos].claim = Claim::Drop;
                let id = self.core.alloc(State::Active, op);
                self.core.finish(
                    id,
                    Ok(Done {
                        peer,
                        len,
                        env,
                        rejected: true,
                    }),
                );
                return Ok(id);
            }
            if buf.len < len {
                u.claim = Claim::Drop;
                let (_, t) = Env::key(&env);
                return Err(truncated(&op, buf.len, len, peer, t));
            }
            let id = self.core.alloc(State::Active, op);
            if let Some(s) = self.core.slot(id) {
                s.matched = Done {
                    peer,
                    len,
                    env,
                    rejected: false,
                };
            }
            self.core.unexpected[pos].claim = Claim::Recv(buf, id);
            return Ok(id);
        }
        let u = self
            .core
            .unexpected
            .remove(pos)
            .expect("position is in range");
        let Some(msg) = u.msg else {
            unreachable!("checked above that the payload is complete")
        };
        let (_, t) = Env::key(&u.env);
        let len = match &msg {
            Stored::Bytes(v) => v.len(),
            Stored::Remote { len, .. } => *len,
        };
        if let Some(mine) = &expect
            && (buf.len < len || !Env::decode(&u.env).same_call(mine))
        {
            if let Stored::Remote { handle, .. } = msg {
                self.discard(u.peer, handle);
            }
            let id = self.core.alloc(State::Active, op);
            self.core.finish(
                id,
                Ok(Done {
                    peer: u.peer,
                    len,
                    env: u.env,
                    rejected: true,
                }),
            );
            return Ok(id);
        }
        if buf.len < len {
            if let Stored::Remote { handle, .. } = msg {
                self.discard(u.peer, handle);
            }
            return Err(truncated(&op, buf.len, len, u.peer, t));
        }
        let id = self.core.alloc(State::Active, op);
        let done = Done {
            peer: u.peer,
            len,
            env: u.env,
            rejected: false,
        };
        if let Some(s) = self.core.slot(id) {
            s.matched = done;
        }
        match msg {
            Stored::Bytes(v) => {
                // SAFETY: `buf` is valid and ours (caller's contract) and holds `len` bytes.
                let dst = unsafe { buf.as_mut_slice() };
                dst[..len].copy_from_slice(&v);
                self.core.finish(id, Ok(done));
            }
            Stored::Remote { handle, .. } => {
                let route = self.route[u.peer];
                let dst = RecvBuf { ptr: buf.ptr, len };
                // SAFETY: forwarded from this function's contract.
                let fetched =
                    unsafe { self.transports[route as usize].fetch(u.peer, handle, dst, id) };
                if let Err(e) = fetched {
                    self.release(id);
                    return Err(e);
                }
            }
        }
        Ok(id)
    }

    fn discard(&mut self, peer: usize, handle: u64) {
        if let Some(&route) = self.route.get(peer)
            && route != ROUTE_SELF
            && let Err(e) = self.transports[route as usize].discard(peer, handle)
        {
            tracing::debug!(peer, "dropping a kept message failed: {e}");
        }
    }

    /// Drives every transport without blocking. Returns whether anything happened.
    pub fn progress(&mut self) -> Result<bool> {
        let mut did = false;
        for t in self.transports.iter_mut() {
            did |= t.progress(&mut self.core)?;
        }
        self.settle_claims();
        Ok(did)
    }

    /// Fetches (or discards) large messages that were claimed before the transport reported
    /// them as stored.
    fn settle_claims(&mut self) {
        while let Some(pos) = self.core.unexpected.iter().position(|u| {
            matches!(u.msg, Some(Stored::Remote { .. })) && !matches!(u.claim, Claim::Open)
        }) {
            let Some(u) = self.core.unexpected.remove(pos) else {
                break;
            };
            let Some(Stored::Remote { handle, len }) = u.msg else {
                continue;
            };
            match u.claim {
                Claim::Recv(buf, id) => {
                    let route = self.route[u.peer];
                    let dst = RecvBuf { ptr: buf.ptr, len };
                    // SAFETY: the claiming receive is active, so its buffer stays valid until
                    // the transport reports the token; it holds at least `len` bytes.
                    let fetched =
                        unsafe { self.transports[route as usize].fetch(u.peer, handle, dst, id) };
                    if let Err(e) = fetched {
                        self.core.finish(id, Err(e));
                    }
                }
                Claim::Drop => self.discard(u.peer, handle),
                Claim::Open => {}
            }
        }
    }

    /// Blocks until a transport may have something to do, at most `timeout`.
    ///
    /// With one transport, its own wait. With several (contract point 8 of
    /// [`crate::transport`]): `poll` on their descriptors when all have one; when exactly one
    /// has none (shared memory), a sleep in that one while a [`FdWatcher`] thread watches the
    /// others' descriptors and wakes it; otherwise (never today) short turns on each.
    pub fn wait(&mut self, timeout: std::time::Duration) -> Result<()> {
        let n = self.transports.len();
        match n {
            0 => return Ok(()),
            1 => return self.transports[0].wait(timeout),
            _ => {}
        }
        // Arm every transport's notification; one with work now means no sleep at all.
        let mut fds = Vec::with_capacity(n);
        let mut hosts = Vec::new();
        for (i, t) in self.transports.iter_mut().enumerate() {
            match t.wait_fd()? {
                WaitFd::Ready => return Ok(()),
                WaitFd::Fd(fd) => fds.push(fd),
                WaitFd::Unsupported => hosts.push(i),
            }
        }
        match hosts[..] {
            [] => {
                crate::sys::poll::readable(&fds, timeout)
                    .map_err(|e| Error::io("waiting on the transports' descriptors", e))?;
                Ok(())
            }
            [host] if self.watcher(host, fds) => {
                let Some(Watch::Running(watcher)) = &self.watch else {
                    return Ok(());
                };
                watcher.arm();
                let r = self.transports[host].wait(timeout);
                watcher.disarm();
                r
            }
            _ => {
                let slice = (timeout / n as u32).min(std::time::Duration::from_millis(1));
                for t in self.transports.iter_mut() {
                    t.wait(slice)?;
                }
                Ok(())
            }
        }
    }

    /// Whether the descriptor watcher for a sleep hosted by transport `host` runs (started
    /// at the first such sleep, watching `fds`: the descriptors stay valid while their
    /// transports live).
    fn watcher(&mut self, host: usize, fds: Vec<std::os::fd::RawFd>) -> bool {
        if self.watch.is_none() {
            self.watch = Some(match FdWatcher::start(fds, self.transports[host].waker()) {
                Ok(w) => Watch::Running(w),
                Err(e) => {
                    tracing::warn!("cannot start the descriptor watcher thread: {e}");
                    Watch::Failed
                }
            });
        }
        matches!(self.watch, Some(Watch::Running(_)))
    }

    /// The result of `id` if it is complete (the request is then released).
    pub fn take(&mut self, id: ReqId) -> Option<Result<Done>> {
        let s = self.core.slot(id)?;
        if !matches!(s.state, State::Done(_)) {
            return None;
        }
        let State::Done(r) = std::mem::replace(&mut s.state, State::Free) else {
            unreachable!("checked Done above")
        };
        self.core.free.push((id & 0xffff_ffff) as u32);
        Some(r)
    }

    /// Whether `id` is complete (without releasing it).
    pub fn is_done(&mut self, id: ReqId) -> bool {
        self.core
            .slot(id)
            .is_none_or(|s| matches!(s.state, State::Done(_)))
    }

    /// Withdraws `id` if it is a receive not matched yet. Returns whether it was withdrawn
    /// (then its buffer is no longer referenced).
    pub fn cancel(&mut self, id: ReqId) -> bool {
        let Some(s) = self.core.slot(id) else {
            return true;
        };
        match s.state {
            State::Posted => {
                self.core.posted.retain(|p| p.req != id);
                self.release(id);
                true
            }
            State::Done(_) => {
                self.release(id);
                true
            }
            _ => false,
        }
    }

    fn release(&mut self, id: ReqId) {
        if let Some(s) = self.core.slot(id) {
            s.state = State::Free;
            self.core.free.push((id & 0xffff_ffff) as u32);
        }
    }

    /// Describes request `id` for error messages.
    pub fn describe(&mut self, id: ReqId) -> String {
        self.core
            .slot(id)
            .map(|s| s.op.to_string())
            .unwrap_or_default()
    }

    /// A collective message of context `ctx` kept unreceived although its call (tag) is
    /// older than `seq`: evidence that the sender's call at that point differed from this
    /// rank's (this rank completed the call without receiving it). Returns the sender and
    /// the message's envelope.
    pub fn stale_collective(&self, ctx: u64, seq: u32) -> Option<(usize, Envelope)> {
        self.core.unexpected.iter().find_map(|u| {
            let (c, tag) = Env::key(&u.env);
            let older = (1..=0x7FFF_FFFF).contains(&seq.wrapping_sub(tag));
            (c == ctx && older && Env::kind_of(&u.env) == KIND_COLL).then_some((u.peer, u.env))
        })
    }

    /// The envelope of a collective notice in context `ctx` from world rank `peer` (kept
    /// for receives posted later), that of call `seq` if there is one, else the latest:
    /// evidence that `peer` did not crash but gave up that call, or an earlier one that
    /// this rank completed first (its connection may have closed right after, when it
    /// failed its own engine).
    pub fn notice_from(&self, ctx: u64, seq: u32, peer: usize) -> Option<Envelope> {
        let mut from = self
            .core
            .notices
            .iter()
            .filter(|(p, env)| *p == peer && Env::key(env).0 == ctx)
            .map(|(_, env)| *env);
        let all: Vec<Envelope> = from.by_ref().collect();
        all.iter()
            .find(|env| Env::key(env).1 == seq)
            .or(all.last())
            .copied()
    }

    /// The envelopes of the collective notices kept from world rank `peer`, in any
    /// context, oldest first.
    pub fn notices_of_peer(&self, peer: usize) -> Vec<Envelope> {
        self.core
            .notices
            .iter()
            .filter(|(p, _)| *p == peer)
            .map(|(_, env)| *env)
            .collect()
    }

    /// How many peer losses and collective notices this engine has seen: a waiter that
    /// remembers the count learns that a peer was lost, even one none of its requests
    /// involves (see [`crate::comm::shared::Shared::wait_any_or_loss`]).
    pub fn losses(&self) -> u64 {
        self.core.losses
    }

    /// Why world rank `peer` was lost (it crashed, or its connection broke), if it was; a
    /// peer that closed its communicator normally is not lost.
    pub fn lost(&self, peer: usize) -> Option<&Error> {
        if self.core.lost.get(peer).copied().unwrap_or(false) {
            self.core.peer_error(peer)
        } else {
            None
        }
    }

    /// A collective notice kept for context `ctx` that dooms call `seq`: the first for
    /// `seq` itself, else the latest for an earlier call (which this rank completed before
    /// its sender gave it up; the sender then failed for good and joins no later call).
    /// Its sender (world rank) and envelope.
    pub fn notice_of(&self, ctx: u64, seq: u32) -> Option<(usize, Envelope)> {
        let mut earlier = None;
        for &(peer, env) in &self.core.notices {
            let (c, tag) = Env::key(&env);
            if c != ctx {
                continue;
            }
            if tag == seq {
                return Some((peer, env));
            }
            if tag < seq {
                earlier = Some((peer, env));
            }
        }
        earlier
    }

    /// The collective notices kept for context `ctx` of calls *later* than `seq` (their
    /// senders completed call `seq`), oldest first, with their senders (world ranks): a
    /// rank still in call `seq` that such a notice blames answers it at once (see the
    /// module documentation of `collective::exec`, "Naming the stuck rank").
    pub fn later_notices(&self, ctx: u64, seq: u32) -> Vec<(usize, Envelope)> {
        self.core
            .notices
            .iter()
            .copied()
            .filter(|(_, env)| {
                let (c, tag) = Env::key(env);
                c == ctx && (1..=0x7FFF_FFFF).contains(&tag.wrapping_sub(seq))
            })
            .collect()
    }

    /// The sticky error, if the engine has failed for good.
    pub fn fatal(&self) -> Option<Error> {
        self.core.fatal.clone()
    }

    /// Fails the engine for good with `err`: every transport forgets its buffers, every
    /// pending request completes with `err`, and every later call returns it.
    pub fn abort(&mut self, err: Error) {
        if self.core.fatal.is_some() {
            return;
        }
        tracing::debug!(rank = self.core.me, "communicator failed for good: {err}");
        for t in self.transports.iter_mut() {
            t.abort();
        }
        self.core.fatal = Some(err.clone());
        self.core.posted.clear();
        self.core.unexpected.clear();
        for s in self.core.slots.iter_mut() {
            if matches!(s.state, State::Posted | State::Active) {
                s.state = State::Done(Err(err.clone()));
            }
        }
    }
}
