//! Shared-memory transport: ranks of one host talk through rings in shared memory, and
//! large messages move with a single copy (`process_vm_readv`).
//!
//! # Structure
//!
//! Every rank owns one segment ([`segment`]) holding its doorbell and one single-producer
//! single-consumer ring ([`ring`]) per local peer: the ring peer→owner. Every rank maps the
//! segments of all its local peers, so a send is a write into the receiver's segment and
//! a receive a read from one's own. No locks on the data path, no system call on the
//! fast path.
//!
//! # Protocols
//!
//! - **Eager** (up to [`ShmConfig::eager_limit`], default 8 KiB): header and payload go
//!   into the ring in one record; the send completes as soon as it is written. The receiver
//!   copies the payload straight from the ring into the posted buffer (or into a buffer of
//!   at most the eager limit when nothing is posted yet).
//! - **Rendezvous** (larger): the sender writes an `Rts` record with the message's length
//!   and address and lends its buffer. Once the receiver has a buffer for it (posted, or
//!   [`Transport::fetch`]), it either pulls the payload with `process_vm_readv` (CMA)
//!   straight from the sender's memory into the buffer — one copy — and sends `Done`; or it
//!   sends `Cts` and the sender streams the payload through the ring in chunks (two copies,
//!   pipelined: the sender copies chunk k+1 in while the receiver copies chunk k out, and
//!   the ring stays in cache). CMA is used for messages of at least
//!   [`ShmConfig::cma_min`] bytes when the kernel allows it; a refusal (`EPERM`: ptrace
//!   policy, containers; `ENOSYS`) is detected once per peer, logged, and that peer streams
//!   from then on. `FERROCOMM_SHM_CMA=0` forces streaming.
//! - **Split single copy** (from [`ShmConfig::split_min`], default 32 KiB, once reads are
//!   known to work with the peer): the receiver reads the first half while the sender
//!   writes the second half into the receiver's buffer with `process_vm_writev`, so both
//!   cores copy (a one-sided copy leaves the sender's core idle; a two-copy pipeline copies
//!   everything twice). The sender counts its writes in progress in the shared ring header
//!   and checks the receiver's state after counting; a receiver that gives a buffer up
//!   (abort, or failing that peer) first marks itself aborted, then waits for the count to
//!   drop to zero, so no write lands in memory it no longer lends.
//!
//! # Waiting
//!
//! [`Transport::wait`] sleeps on the futex of the rank's doorbell (a shared futex: wakers
//! are other processes), after announcing the sleep and checking every ring once more.
//! Writers call `futex_wake` only when the reader announced a sleep, so a spinning reader
//! costs writers one atomic `or` (see [`ring`] for the handshake). Sleeps are cut into slices of at most 100 ms so
//! that peers' liveness is checked while waiting.
//!
//! # Failures
//!
//! A peer that closes normally (drops its transport) marks its rings closed; what it sent
//! before is still delivered, then [`Events::peer_closed`]. A peer process that dies is
//! noticed within about 100 ms through its pidfd (its rings are drained first: it may have
//! sent messages and exited), and reported with [`Events::peer_failed`]. A peer that
//! aborts marks its rings aborted; a single-copy read of its memory that completes after
//! that is not delivered, since the buffer may already have been reused.

pub mod ring;
pub mod segment;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::ring::{Consumer, FIELDS, Producer, RECORD_HEADER};
use self::segment::Segment;
use super::{Envelope, Events, Placement, RecvBuf, SendBuf, Sent, Stored, Token, Transport, Waker};
use crate::error::{Error, Result};
use crate::sync::Ordering;
use crate::sys::{cma, futex, pidfd::PidFd};

pub use segment::{remove_segments_of, segment_prefix};

/// Settings of the shared-memory transport.
#[derive(Clone, Debug)]
pub struct ShmConfig {
    /// Messages up to this many bytes go through the ring whole (eager); larger ones by
    /// rendezvous. `FERROCOMM_SHM_EAGER_LIMIT`, default 8 KiB; at most a quarter of the
    /// ring. Measured on the 2-vCPU machine (half round trip / windowed bandwidth): at
    /// 8 KiB eager 1.52 µs / 13.2 GB/s against single copy 1.28 µs / 9.3 GB/s; at 16 KiB
    /// 2.6 µs / 15.1 GB/s against 1.45 µs / 14.1 GB/s; at 64 KiB 7.6 µs / 12.5 GB/s against
    /// 2.7 µs / 23 GB/s (split). The receiver's copy out of a freshly written ring pulls
    /// every line from the other core's cache, so eager loses early.
    pub eager_limit: usize,
    /// Bytes of each ring (one per ordered pair of local ranks), a power of two of at least
    /// 4 KiB. `FERROCOMM_SHM_RING_SIZE`, default 256 KiB.
    pub ring_size: usize,
    /// Whether single-copy reads (`process_vm_readv`) may be used. `FERROCOMM_SHM_CMA`
    /// (`0`/`1`), default on.
    pub cma: bool,
    /// Rendezvous messages at least this large are pulled with a single copy; smaller ones
    /// stream through the ring. `FERROCOMM_SHM_CMA_MIN`, default 8 KiB (streaming was
    /// slower than a single copy at every size measured: 32 KiB 4.9 against 2.3 µs).
    pub cma_min: usize,
    /// Largest piece of a single-copy read done in one `progress` call, so other traffic
    /// interleaves with a long transfer.
    pub cma_chunk: usize,
    /// Single-copy messages at least this large are split: the receiver reads the first
    /// half while the sender writes the second half into the receiver's buffer
    /// (`process_vm_writev`), so both cores copy. `FERROCOMM_SHM_SPLIT_MIN`, default
    /// 32 KiB; `0` never splits. (Measured half round trips, split against one side:
    /// 32 KiB 2.1 / 2.3 µs, 128 KiB 3.9 / 5.8 µs, 256 KiB 5.7 / 9.0 µs; earlier, 4 MiB 180
    /// against 418 µs.)
    pub split_min: usize,
    /// Tests only: behave as if the kernel refused every single-copy read with `EPERM`
    /// (root is never refused), to exercise the detection and the fallback.
    #[doc(hidden)]
    pub simulate_cma_refusal: bool,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            eager_limit: 8 << 10,
            ring_size: 256 << 10,
            cma: true,
            cma_min: 8 << 10,
            cma_chunk: 1 << 20,
            split_min: 32 << 10,
            simulate_cma_refusal: false,
        }
    }
}

impl ShmConfig {
    /// The defaults adjusted by the environment (see the fields).
    pub fn from_env() -> Result<ShmConfig> {
        Self::from_lookup(&crate::config::process_env)
    }

    pub(crate) fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<ShmConfig> {
        let mut cfg = ShmConfig::default();
        if let Some(n) = crate::config::size(lookup, "FERROCOMM_SHM_RING_SIZE")? {
            if !n.is_power_of_two() || !(4096..=1 << 30).contains(&n) {
                return Err(Error::config(
                    "FERROCOMM_SHM_RING_SIZE",
                    n.to_string(),
                    "expected a power of two from 4k to 1g",
                ));
            }
            cfg.ring_size = n;
        }
        if let Some(n) = crate::config::size(lookup, "FERROCOMM_SHM_EAGER_LIMIT")? {
            cfg.eager_limit = n;
        }
        cfg.eager_limit = cfg.eager_limit.min(cfg.ring_size / 4);
        if let Some(on) =
            crate::config::parse_var(lookup, "FERROCOMM_SHM_CMA", "0 or 1", |v| match v {
                "0" | "false" | "off" => Some(false),
                "1" | "true" | "on" => Some(true),
                _ => None,
            })?
        {
            cfg.cma = on;
        }
        if let Some(n) = crate::config::size(lookup, "FERROCOMM_SHM_CMA_MIN")? {
            cfg.cma_min = n;
        }
        if let Some(n) = crate::config::size(lookup, "FERROCOMM_SHM_SPLIT_MIN")? {
            cfg.split_min = if n == 0 { usize::MAX } else { n };
        }
        Ok(cfg)
    }
}

/// Record kinds (the second u32 of a record header).
const EAGER: u32 = 1;
const RTS: u32 = 2;
const CTS: u32 = 3;
const DATA: u32 = 4;
const DONE: u32 = 5;
const SPLIT: u32 = 6;
const WROTE: u32 = 7;

/// How often peers' processes are checked while waiting or polling.
const LIVENESS_INTERVAL: Duration = Duration::from_millis(100);
/// Records handled per peer in one `progress` pass before moving on.
const BATCH: usize = 64;
/// Smallest stream chunk worth writing when the ring has less free space (unless the rest
/// of the message is smaller).
const MIN_CHUNK: usize = 4096;

/// A decoded record header.
#[derive(Clone, Copy, Debug)]
struct Rec {
    kind: u32,
    len: u64,
    id: u64,
    aux: u64,
    env: Envelope,
}

impl Rec {
    fn new(kind: u32) -> Rec {
        Rec {
            kind,
            len: 0,
            id: 0,
            aux: 0,
            env: Envelope::default(),
        }
    }

    /// The header fields: kind (byte 0), inline length (byte 1, [`NOT_INLINE`] when the
    /// payload follows the header), two u64 (`a`, `b`: bytes 4..20) and the envelope
    /// (bytes 20..52). Eager messages of at most [`INLINE`] bytes travel in `a`/`b` (one
    /// cache line in all); Rts carries (length, id) and its payload is the sender's address;
    /// Cts and Done carry the id in `a`; Data (id, offset).
    fn encode(&self, inline: Option<&[u8]>) -> [u8; FIELDS] {
        let mut f = [0u8; FIELDS];
        f[0] = self.kind as u8;
        f[1] = NOT_INLINE;
        let (a, b) = match self.kind {
            RTS => (self.len, self.id),
            DATA | SPLIT | WROTE => (self.id, self.aux),
            _ => (self.id, 0),
        };
        f[4..12].copy_from_slice(&a.to_le_bytes());
        f[12..20].copy_from_slice(&b.to_le_bytes());
        if let Some(d) = inline {
            f[1] = d.len() as u8;
            f[4..4 + d.len()].copy_from_slice(d);
        }
        f[20..52].copy_from_slice(&self.env.0);
        f
    }

    /// Decodes the fields of a record with `payload` bytes of payload (Rts: `aux` is read
    /// from the payload by the caller).
    fn decode(f: &[u8; FIELDS], payload: usize) -> Rec {
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&f[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let mut env = Envelope::default();
        env.0.copy_from_slice(&f[20..52]);
        let kind = f[0] as u32;
        let (a, b) = (u64_at(4), u64_at(12));
        let mut r = Rec {
            kind,
            len: payload as u64,
            id: a,
            aux: 0,
            env,
        };
        match kind {
            EAGER if f[1] != NOT_INLINE => r.len = f[1] as u64,
            RTS => (r.len, r.id) = (a, b),
            DATA | SPLIT | WROTE => r.aux = b,
            _ => {}
        }
        r
    }
}

/// Largest eager payload carried inside the record header.
const INLINE: usize = 16;
/// Header byte 1 when the payload follows the header.
const NOT_INLINE: u8 = 0xff;

/// A record waiting for ring space.
enum Out {
    /// A small message: header and payload (borrowed until written).
    Eager {
        env: Envelope,
        data: SendBuf,
        token: Token,
    },
    /// Any record without payload (Rts, Cts, Done).
    Bare(Rec),
}

/// A large send the receiver asked to stream through the ring.
struct StreamOut {
    id: u64,
    data: SendBuf,
    off: usize,
    token: Token,
}

/// Where a streamed message's chunks go.
struct StreamIn {
    dst: RecvBuf,
    len: usize,
    got: usize,
    token: Token,
}

/// A single-copy read in progress.
struct Pull {
    peer: usize,
    id: u64,
    addr: u64,
    dst: RecvBuf,
    len: usize,
    done: usize,
    /// Read `done..end` (the whole message, or the first part of a split one).
    end: usize,
    token: Token,
}

/// A split message this rank receives: it reads `..split`, the sender writes `split..`.
struct SplitIn {
    dst: RecvBuf,
    addr: u64,
    len: usize,
    split: usize,
    token: Token,
    pulled: bool,
    written: bool,
}

/// The second half of a split message this rank sends, written into the receiver.
struct Push {
    peer: usize,
    id: u64,
    /// Local address of the next byte to write.
    src: u64,
    /// Remote address it goes to.
    dst: u64,
    left: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cma {
    Unknown,
    Works,
    Refused,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// Closed normally (its rings said so): reported.
    Closed,
    /// Failed: reported.
    Failed,
}

/// One ring of a mapped segment; holds the segment so the ring stays mapped.
struct RingRef {
    seg: Arc<Segment>,
    hdr: std::ptr::NonNull<ring::RingHeader>,
    mem: ring::RawMem,
}

impl RingRef {
    fn new(seg: &Arc<Segment>, slot: usize) -> RingRef {
        let (hdr, mem) = seg.ring(slot);
        RingRef {
            hdr: std::ptr::NonNull::from(hdr),
            mem,
            seg: Arc::clone(seg),
        }
    }

    fn hdr(&self) -> &ring::RingHeader {
        // SAFETY: the header lies in `self.seg`'s mapping, which this value keeps alive.
        unsafe { self.hdr.as_ref() }
    }
}

// SAFETY: the pointers refer into a mapping the value owns (through the Arc); the ring
// protocol, not thread identity, governs access to it.
unsafe impl Send for RingRef {}

/// One local peer.
struct Peer {
    pid: u32,
    /// Watches the peer's process; `None` when it is this process (threads as ranks).
    proc: Option<PidFd>,
    /// The ring this rank writes to the peer (in the peer's segment, next to its doorbell).
    out: RingRef,
    prod: Producer,
    /// The ring the peer writes to this rank (in this rank's segment).
    inn: RingRef,
    cons: Consumer,
    /// Records that did not fit yet, in order.
    queue: VecDeque<Out>,
    /// Streams this rank sends, in the order they were cleared.
    streams: VecDeque<StreamOut>,
    /// Large sends announced, not yet taken (pulled or streamed).
    lent: HashMap<u64, (SendBuf, Token)>,
    /// Large messages announced to this rank and kept: id -> (length, sender address).
    kept: HashMap<u64, (usize, u64)>,
    /// Streams this rank receives.
    incoming: HashMap<u64, StreamIn>,
    /// Split copies this rank receives.
    splits: HashMap<u64, SplitIn>,
    next_id: u64,
    cma: Cma,
    state: State,
    /// The peer's process was seen gone: fail it once its ring is drained.
    gone: bool,
}

/// The shared-memory transport of one rank. See the module documentation.
pub struct ShmTransport {
    rank: usize,
    world: usize,
    cfg: ShmConfig,
    seg: Arc<Segment>,
    peers: Vec<Option<Box<Peer>>>,
    /// World ranks of the peers, for iteration.
    order: Vec<usize>,
    sends_done: Vec<Token>,
    failures: Vec<(usize, Error)>,
    closed: Vec<usize>,
    pulls: VecDeque<Pull>,
    pushes: VecDeque<Push>,
    checked_at: Instant,
    polls: u32,
    aborted: bool,
}

/// One local rank, as the transport needs to know it.
#[derive(Clone, Debug)]
pub struct LocalPeer {
    /// World rank.
    pub rank: usize,
    /// Process id.
    pub pid: u32,
    /// Its segment's name (published through the rendezvous).
    pub segment: String,
}

/// The first half of building a transport: this rank's segment exists, peers can attach.
pub struct ShmSetup {
    rank: usize,
    world: usize,
    cfg: ShmConfig,
    seg: Arc<Segment>,
    /// Local ranks in world-rank order (this one included); a rank's slot is its index.
    local: Vec<LocalPeer>,
}

impl ShmSetup {
    /// A fresh segment name for this process in job `job_id`, to publish before the
    /// segment exists (it is created by [`ShmSetup::create`] once the local ranks are known).
    pub fn name_for(job_id: &str) -> String {
        segment::new_name(job_id)
    }

    /// Creates the segment of world rank `rank` under the name it published. `local` lists
    /// every rank of this host (this one included, any order).
    pub fn create(
        rank: usize,
        world: usize,
        mut local: Vec<LocalPeer>,
        cfg: ShmConfig,
    ) -> Result<ShmSetup> {
        local.sort_by_key(|p| p.rank);
        let me = local.iter().find(|p| p.rank == rank).ok_or_else(|| {
            Error::invalid(
                "ShmSetup::create",
                "local",
                "the list must include this rank",
            )
        })?;
        let seg = Segment::create(&me.segment, local.len(), cfg.ring_size)?;
        Ok(ShmSetup {
            rank,
            world,
            cfg,
            seg,
            local,
        })
    }

    /// Maps every peer's segment (waiting for each to exist until `deadline`) and returns
    /// the transport.
    pub fn connect(self, deadline: Instant) -> Result<ShmTransport> {
        let n = self.local.len();
        let my_slot = self
            .local
            .iter()
            .position(|p| p.rank == self.rank)
            .unwrap_or(0);
        let mut peers: Vec<Option<Box<Peer>>> = (0..self.world).map(|_| None).collect();
        let mut order = Vec::new();
        let me = std::process::id();
        for (slot, p) in self.local.iter().enumerate() {
            if p.rank == self.rank {
                continue;
            }
            if p.rank >= self.world {
                return Err(Error::invalid(
                    "ShmSetup::connect",
                    "local",
                    format!("rank {} outside a world of {}", p.rank, self.world),
                ));
            }
            let who = format!("rank {}", p.rank);
            let lost = |detail: String| Error::PeerLost {
                rank: self.rank,
                peer: p.rank,
                op: "init (attaching shared memory)".into(),
                detail,
            };
            // Watched from the start: a rank that dies before creating its segment is
            // noticed at once, not at the timeout.
            let proc = if p.pid == me {
                None
            } else {
                Some(PidFd::open(p.pid).map_err(|e| {
                    if e.raw_os_error() == Some(libc::ESRCH) {
                        // It may have created its segment before it died: nobody else
                        // would remove the name.
                        segment::remove_name_of_dead_owner(&p.segment);
                        lost(format!(
                            "its process (pid {}) has exited: it died or failed during start-up \
                             (see its log)",
                            p.pid
                        ))
                    } else {
                        lost(format!("its process {} cannot be watched: {e}", p.pid))
                    }
                })?)
            };
            let seg = Segment::attach(
                &p.segment,
                n,
                self.cfg.ring_size,
                (n - 1) as u32,
                deadline,
                &who,
                &mut || match &proc {
                    Some(pr) if !pr.alive() => {
                        segment::remove_name_of_dead_owner(&p.segment);
                        Err(lost(format!(
                            "its process (pid {}) exited before creating its shared-memory segment \
                         {}: it died or failed during start-up (see its log)",
                            p.pid, p.segment
                        )))
                    }
                    _ => Ok(()),
                },
            )?;
            peers[p.rank] = Some(Box::new(Peer {
                pid: p.pid,
                proc,
                out: RingRef::new(&seg, my_slot),
                prod: Producer::new(seg.ring(my_slot).0, self.cfg.ring_size),
                inn: RingRef::new(&self.seg, slot),
                cons: Consumer::new(self.seg.ring(slot).0, self.cfg.ring_size),
                queue: VecDeque::new(),
                streams: VecDeque::new(),
                lent: HashMap::new(),
                kept: HashMap::new(),
                incoming: HashMap::new(),
                splits: HashMap::new(),
                next_id: 0,
                cma: if self.cfg.cma {
                    Cma::Unknown
                } else {
                    Cma::Refused
                },
                state: State::Open,
                gone: false,
            }));
            order.push(p.rank);
        }
        if n == 1 {
            self.seg.unlink();
        }
        tracing::debug!(
            rank = self.rank,
            peers = order.len(),
            "shared-memory transport connected"
        );
        Ok(ShmTransport {
            rank: self.rank,
            world: self.world,
            cfg: self.cfg,
            seg: self.seg,
            peers,
            order,
            sends_done: Vec::new(),
            failures: Vec::new(),
            closed: Vec::new(),
            pulls: VecDeque::new(),
            pushes: VecDeque::new(),
            checked_at: Instant::now(),
            polls: 0,
            aborted: false,
        })
    }
}

/// Tells the owner of `seg` that something was published; wakes it if it sleeps.
fn notify(seg: &Segment) {
    let bell = seg.doorbell();
    if bell.notify() {
        futex::wake(&bell.state, 1);
    }
}

impl ShmTransport {
    /// The world ranks this transport reaches.
    pub fn peers(&self) -> &[usize] {
        &self.order
    }

    /// Waits until every local peer has mapped this rank's segment (each does so in
    /// [`ShmSetup::connect`]), at most until `deadline`, then makes sure its name is gone
    /// from `/dev/shm`: from here on a crash leaves nothing behind.
    pub fn wait_attached(&self, deadline: Instant) -> Result<()> {
        let expected = self.order.len() as u32;
        let start = Instant::now();
        while self.seg.attached() < expected {
            for &r in &self.order {
                if let Some(p) = self.peers[r].as_deref()
                    && p.proc.as_ref().is_some_and(|pr| !pr.alive())
                {
                    // Its segment's name may still wait for peers that will now never
                    // attach it: remove it (it is mapped here, the memory stays valid).
                    p.out.seg.unlink();
                    return Err(Error::PeerLost {
                        rank: self.rank,
                        peer: r,
                        op: "init (waiting for local peers to map shared memory)".into(),
                        detail: format!(
                            "its process (pid {}) exited during start-up (see its log)",
                            p.pid
                        ),
                    });
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    op: format!(
                        "rank {}: waiting for local peers to map its shared memory",
                        self.rank
                    ),
                    waited: start.elapsed(),
                    detail: format!(
                        "{} of {expected} local peers attached; the others may have failed \
                         during start-up",
                        self.seg.attached()
                    ),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.seg.unlink();
        Ok(())
    }

    fn peer_mut(&mut self, peer: usize, op: &str) -> Result<&mut Peer> {
        let rank = self.rank;
        let world = self.world;
        match self.peers.get_mut(peer).and_then(|p| p.as_deref_mut()) {
            None => Err(Error::invalid(
                op,
                "peer",
                format!(
                    "rank {peer} is not a shared-memory peer of rank {rank} (world of {world})"
                ),
            )),
            Some(p) if p.state != State::Open => Err(Error::PeerLost {
                rank,
                peer,
                op: op.into(),
                detail: match p.state {
                    State::Closed => "it closed its communicator (finished)".into(),
                    _ => "its shared-memory connection already failed".into(),
                },
            }),
            Some(p) => Ok(p),
        }
    }

    /// Marks `peer` failed: forgets its buffers and reports it at the next progress.
    fn fail(&mut self, peer: usize, err: Error) {
        let Some(p) = self.peers.get_mut(peer).and_then(|p| p.as_deref_mut()) else {
            return;
        };
        if p.state != State::Open {
            return;
        }
        p.state = State::Failed;
        take_back_lent(p);
        forget(p);
        self.pulls.retain(|x| x.peer != peer);
        self.pushes.retain(|x| x.peer != peer);
        self.failures.push((peer, err));
    }

    /// Writes what is queued for `peer` as far as the ring takes it. Returns whether
    /// anything was written.
    fn flush(&mut self, peer: usize) -> bool {
        let Some(p) = self.peers.get_mut(peer).and_then(|p| p.as_deref_mut()) else {
            return false;
        };
        if p.state != State::Open {
            return false;
        }
        let mut wrote = false;
        let (hdr, mem) = (p.out.hdr(), &p.out.mem);
        while let Some(out) = p.queue.front() {
            // SAFETY: this transport is the only producer of this ring (its slot in the
            // peer's segment); eager payloads are valid until their token is reported
            // (contract point 4), which happens only after this write.
            let ok = unsafe {
                match out {
                    Out::Eager { env, data, .. } => push_eager(&mut p.prod, hdr, mem, env, data),
                    Out::Bare(r) => push_bare_rec(&mut p.prod, hdr, mem, r),
                }
            };
            if !ok {
                break;
            }
            wrote = true;
            if let Some(Out::Eager { token, .. }) = p.queue.pop_front() {
                self.sends_done.push(token);
            }
        }
        while p.queue.is_empty() {
            let Some(s) = p.streams.front_mut() else {
                break;
            };
            let rest = s.data.len - s.off;
            let max_chunk = self.cfg.ring_size / 4;
            let free = p.prod.free(hdr, ring::record_size(rest.min(max_chunk)));
            let room = free.saturating_sub(RECORD_HEADER) & !(ring::LINE - 1);
            let chunk = rest.min(room).min(max_chunk);
            if chunk < rest.min(MIN_CHUNK.min(max_chunk)) {
                break;
            }
            let mut r = Rec::new(DATA);
            r.len = chunk as u64;
            r.id = s.id;
            r.aux = s.off as u64;
            // SAFETY: single producer (as above); the streamed buffer is lent until its
            // token is reported, after its last chunk.
            let ok = unsafe {
                let all = s.data.as_slice();
                p.prod
                    .push(hdr, mem, &r.encode(None), &all[s.off..s.off + chunk])
            };
            if !ok {
                break;
            }
            wrote = true;
            s.off += chunk;
            if s.off == s.data.len {
                self.sends_done.push(s.token);
                p.streams.pop_front();
            }
        }
        if p.queue.is_empty() && p.streams.is_empty() {
            ring::clear_waiting(hdr);
        } else {
            let want = match p.queue.front() {
                Some(out) => out.size(),
                None => ring::record_size(MIN_CHUNK.min(self.cfg.ring_size / 4)),
            };
            if ring::announce_waiting(&mut p.prod, hdr, want) >= want {
                // Space appeared meanwhile: the next progress pass writes more.
                wrote = true;
            }
        }
        if wrote {
            notify(&p.out.seg);
        }
        wrote
    }

    /// Queues a bare record to `peer` and tries to write it.
    fn push_bare(&mut self, peer: usize, rec: Rec) {
        if let Some(p) = self.peers.get_mut(peer).and_then(|p| p.as_deref_mut())
            && p.state == State::Open
        {
            p.queue.push_back(Out::Bare(rec));
            self.flush(peer);
        }
    }

    /// Starts receiving the large message `id` of `peer` into `dst` (exactly its length).
    fn start_receive(
        &mut self,
        peer: usize,
        id: u64,
        len: usize,
        addr: u64,
        dst: RecvBuf,
        token: Token,
    ) {
        let Some(p) = self.peers.get_mut(peer).and_then(|p| p.as_deref_mut()) else {
            return;
        };
        if len >= self.cfg.split_min && p.cma == Cma::Works {
            // Reads are known to work with this peer (a refusal now could not fall back
            // to streaming once the sender writes its half).
            let split = (len / 2) & !4095;
            p.splits.insert(
                id,
                SplitIn {
                    dst,
                    addr,
                    len,
                    split,
                    token,
                    pulled: split == 0,
                    written: false,
                },
            );
            if split > 0 {
                self.pulls.push_back(Pull {
                    peer,
                    id,
                    addr,
                    dst,
                    len,
                    done: 0,
                    end: split,
                    token,
                });
            }
            let mut r = Rec::new(SPLIT);
            r.id = id;
            r.aux = dst.ptr as u64;
            r.len = split as u64;
            self.push_bare(peer, r);
        } else if len >= self.cfg.cma_min && p.cma != Cma::Refused {
            self.pulls.push_back(Pull {
                peer,
                id,
                addr,
                dst,
                len,
                done: 0,
                end: len,
                token,
            });
        } else {
            p.incoming.insert(
                id,
                StreamIn {
                    dst,
                    len,
                    got: 0,
                    token,
                },
            );
            let mut r = Rec::new(CTS);
            r.id = id;
            self.push_bare(peer, r);
        }
    }

    /// Reads what `peer` sent. Returns whether anything happened.
    fn poll_peer(&mut self, peer: usize, ev: &mut dyn Events) -> bool {
        let mut did = false;
        for _ in 0..BATCH {
            let Some(p) = self.peers.get_mut(peer).and_then(|p| p.as_deref_mut()) else {
                return did;
            };
            if p.state != State::Open {
                return did;
            }
            // SAFETY: this transport is the only consumer of the ring its peer writes to it.
            let next = unsafe { p.cons.peek(&p.inn.mem) };
            let (f, payload) = match next {
                Ok(Some(x)) => x,
                Ok(None) => {
                    self.release(peer, false);
                    return self.check_closed(peer) || did;
                }
                Err(e) => {
                    let err = Error::misbehaved(format!("rank {peer}"), e.0);
                    self.fail(peer, err);
                    return true;
                }
            };
            did = true;
            let r = Rec::decode(&f, payload);
            if let Err(why) = self.handle(peer, &r, &f, payload, ev) {
                self.fail(peer, Error::misbehaved(format!("rank {peer}"), why));
                return true;
            }
            if let Some(p) = self.peers.get_mut(peer).and_then(|p| p.as_deref_mut()) {
                p.cons.consume(payload);
            }
        }
        self.release(peer, false);
        did
    }

    /// Hands consumed ring space back to `peer` and wakes it if it waits for space.
    ///
    /// Lazily, unless `now`: publishing `head` and checking whether the producer waits
    /// needs a full fence, too much for every small message. Space goes back once an eighth
    /// of the ring is consumed, as soon as the producer is seen waiting, and always before
    /// this rank sleeps (`wait` calls this with `now`), so a waiting producer is never
    /// left without it.
    fn release(&mut self, peer: usize, now: bool) {
        let Some(p) = self.peers.get_mut(peer).and_then(|p| p.as_deref_mut()) else {
            return;
        };
        let hdr = p.inn.hdr();
        let pending = p.cons.unreleased();
        if pending == 0
            || !(now || pending >= self.cfg.ring_size / 8 || ring::producer_may_wait(hdr))
        {
            return;
        }
        if p.cons.release(hdr) && ring::producer_waits(hdr) {
            notify(&p.out.seg);
        }
    }

    /// After the ring from `peer` was found empty: did it close or die?
    fn check_closed(&mut self, peer: usize) -> bool {
        let Some(p) = self.peers.get_mut(peer).and_then(|p| p.as_deref_mut()) else {
            return false;
        };
        let hdr = p.inn.hdr();
        let state = hdr.producer.state.load(Ordering::Acquire);
        if state == ring::OPEN && !p.gone {
            return false;
        }
        // A close is final only once everything written before it has been read.
        if p.cons.has_data(&p.inn.mem) {
            return false;
        }
        match state {
            ring::CLOSED => {
                p.state = State::Closed;
                forget(p);
                self.pulls.retain(|x| x.peer != peer);
                self.pushes.retain(|x| x.peer != peer);
                self.closed.push(peer);
            }
            ring::ABORTED => {
                let err = lost(self.rank, peer, "shm", "it aborted its communicator".into());
                self.fail(peer, err);
            }
            _ => {
                let detail = format!(
                    "its process {} exited without closing its communicator (killed or crashed)",
                    p.pid
                );
                let err = lost(self.rank, peer, "shm", detail);
                self.fail(peer, err);
            }
        }
        true
    }

    /// Acts on one record from `peer`. `Err` is a protocol violation.
    fn handle(
        &mut self,
        peer: usize,
        r: &Rec,
        fields: &[u8; FIELDS],
        payload: usize,
        ev: &mut dyn Events,
    ) -> std::result::Result<(), String> {
        let p = self
            .peers
            .get_mut(peer)
            .and_then(|p| p.as_deref_mut())
            .ok_or("unknown peer")?;
        match r.kind {
            EAGER => {
                let len = r.len as usize;
                let inline = fields[1] != NOT_INLINE;
                if (inline && (len > INLINE || payload != 0)) || (!inline && len != payload) {
                    return Err(format!("eager record of {len} bytes carries {payload}"));
                }
                let read = |p: &Peer, dst: &mut [u8]| {
                    if inline {
                        dst.copy_from_slice(&fields[4..4 + dst.len()]);
                    } else {
                        // SAFETY: this rank is the ring's only consumer and the record is
                        // published (peeked); `dst` is exactly the payload's length.
                        unsafe { p.cons.read_payload(&p.inn.mem, 0, dst) };
                    }
                };
                match ev.incoming(peer, &r.env, len) {
                    Placement::Into(buf, token) => {
                        if buf.len < len {
                            return Err(format!("internal: buffer of {} for {len}", buf.len));
                        }
                        // SAFETY: the communicator gave us exclusive use of `buf` (contract
                        // point 4), at least `len` bytes.
                        read(p, unsafe { &mut buf.as_mut_slice()[..len] });
                        ev.recv_done(token);
                    }
                    Placement::Keep => {
                        let mut v = vec![0u8; len];
                        read(p, &mut v);
                        ev.stored(peer, r.env, Stored::Bytes(v));
                    }
                    Placement::Discard => {}
                }
            }
            RTS => {
                if payload != 8 {
                    return Err(format!("announcement with {payload} payload bytes"));
                }
                let mut addr = [0u8; 8];
                // SAFETY: only consumer; the 8-byte payload is published with the record.
                unsafe { p.cons.read_payload(&p.inn.mem, 0, &mut addr) };
                let r = &Rec {
                    aux: u64::from_le_bytes(addr),
                    ..*r
                };
                let len = usize::try_from(r.len).map_err(|_| "impossible length")?;
                if p.kept.contains_key(&r.id) || p.incoming.contains_key(&r.id) {
                    return Err(format!("announced message id {} twice", r.id));
                }
                match ev.incoming(peer, &r.env, len) {
                    Placement::Into(buf, token) => {
                        if buf.len < len {
                            return Err(format!("internal: buffer of {} for {len}", buf.len));
                        }
                        let dst = RecvBuf { ptr: buf.ptr, len };
                        self.start_receive(peer, r.id, len, r.aux, dst, token);
                    }
                    Placement::Keep => {
                        p.kept.insert(r.id, (len, r.aux));
                        ev.stored(peer, r.env, Stored::Remote { handle: r.id, len });
                    }
                    Placement::Discard => {
                        let mut d = Rec::new(DONE);
                        d.id = r.id;
                        self.push_bare(peer, d);
                    }
                }
            }
            CTS => {
                let (data, token) = p
                    .lent
                    .remove(&r.id)
                    .ok_or_else(|| format!("cleared message id {} that is not lent", r.id))?;
                p.streams.push_back(StreamOut {
                    id: r.id,
                    data,
                    off: 0,
                    token,
                });
                self.flush(peer);
            }
            DONE => {
                let (_, token) = p
                    .lent
                    .remove(&r.id)
                    .ok_or_else(|| format!("finished message id {} that is not lent", r.id))?;
                self.sends_done.push(token);
            }
            SPLIT => {
                if payload != 8 {
                    return Err(format!("split request with {payload} payload bytes"));
                }
                let mut b = [0u8; 8];
                // SAFETY: only consumer; the 8-byte payload is published with the record.
                unsafe { p.cons.read_payload(&p.inn.mem, 0, &mut b) };
                let split = usize::try_from(u64::from_le_bytes(b)).map_err(|_| "bad split")?;
                let (data, _) = p
                    .lent
                    .get(&r.id)
                    .ok_or_else(|| format!("split message id {} that is not lent", r.id))?;
                if split > data.len {
                    return Err(format!("split at {split} of a {}-byte message", data.len));
                }
                self.pushes.push_back(Push {
                    peer,
                    id: r.id,
                    src: data.ptr as u64 + split as u64,
                    dst: r.aux + split as u64,
                    left: data.len - split,
                });
            }
            WROTE => {
                let s = p
                    .splits
                    .get_mut(&r.id)
                    .ok_or_else(|| format!("wrote message id {} that is not split", r.id))?;
                if r.aux != 0 {
                    // The sender may not write into us: read its half too.
                    let (addr, dst, len, split, token) = (s.addr, s.dst, s.len, s.split, s.token);
                    s.written = true;
                    s.pulled = false;
                    self.pulls.push_back(Pull {
                        peer,
                        id: r.id,
                        addr,
                        dst,
                        len,
                        done: split,
                        end: len,
                        token,
                    });
                } else {
                    s.written = true;
                    self.finish_split(peer, r.id, ev);
                }
            }
            DATA => {
                let s = p
                    .incoming
                    .get_mut(&r.id)
                    .ok_or_else(|| format!("sent data of message id {} not cleared", r.id))?;
                let off = usize::try_from(r.aux).map_err(|_| "impossible offset")?;
                if r.len as usize != payload || off != s.got || off + payload > s.len {
                    return Err(format!(
                        "data chunk of {payload} bytes at {off} does not continue message {} \
                         ({} of {} bytes received)",
                        r.id, s.got, s.len
                    ));
                }
                // SAFETY: `s.dst` is lent to us until its token is reported; the range is
                // inside it (checked); the record is published and we are its only reader.
                unsafe {
                    let dst = &mut s.dst.as_mut_slice()[off..off + payload];
                    p.cons.read_payload(&p.inn.mem, 0, dst);
                }
                s.got += payload;
                if s.got == s.len
                    && let Some(s) = p.incoming.remove(&r.id)
                {
                    ev.recv_done(s.token);
                }
            }
            k => return Err(format!("unknown record kind {k}")),
        }
        Ok(())
    }

    /// Advances single-copy reads. Returns whether anything happened.
    fn run_pulls(&mut self, ev: &mut dyn Events) -> bool {
        let Some(mut pull) = self.pulls.pop_front() else {
            return false;
        };
        let Some(p) = self.peers.get_mut(pull.peer).and_then(|p| p.as_deref_mut()) else {
            return true;
        };
        let n = (pull.end - pull.done).min(self.cfg.cma_chunk);
        // SAFETY: `pull.dst` is lent to us until its token is reported (contract point 4).
        let dst = unsafe { &mut pull.dst.as_mut_slice()[pull.done..pull.done + n] };
        let read = if self.cfg.simulate_cma_refusal {
            Err(std::io::Error::from_raw_os_error(libc::EPERM))
        } else {
            cma::read(p.pid, pull.addr + pull.done as u64, dst)
        };
        match read {
            Ok(got) if got == n => {
                p.cma = Cma::Works;
                pull.done += n;
                if pull.done < pull.end {
                    self.pulls.push_front(pull);
                    return true;
                }
                if let Some(s) = p.splits.get_mut(&pull.id) {
                    s.pulled = true;
                    self.finish_split(pull.peer, pull.id, ev);
                    return true;
                }
                // The data is only good if the sender had not aborted (and so could not
                // have reused its buffer) while we read it. The receive is not completed:
                // the peer is failed once its ring is drained (`check_closed`), so what it
                // wrote before aborting (a notice saying why it gave up) arrives first.
                if p.inn.hdr().producer.state.load(Ordering::Acquire) == ring::ABORTED {
                    tracing::debug!(
                        rank = self.rank,
                        peer = pull.peer,
                        "the peer aborted during a transfer; failing it once its ring is drained"
                    );
                    return true;
                }
                ev.recv_done(pull.token);
                let mut d = Rec::new(DONE);
                d.id = pull.id;
                self.push_bare(pull.peer, d);
            }
            Ok(got) => {
                let err = Error::misbehaved(
                    format!("rank {}", pull.peer),
                    format!(
                        "lent a buffer of {} bytes at {:#x} of which only {} can be read",
                        pull.len,
                        pull.addr,
                        pull.done + got
                    ),
                );
                self.fail(pull.peer, err);
            }
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS))
                    && !p.splits.contains_key(&pull.id) =>
            {
                tracing::warn!(
                    rank = self.rank,
                    peer = pull.peer,
                    "single-copy reads (process_vm_readv) are refused ({e}); streaming \
                     large messages through shared memory instead (slower; allow ptrace \
                     between the ranks, or set FERROCOMM_SHM_CMA=0 to skip the attempt)"
                );
                p.cma = Cma::Refused;
                self.start_receive(
                    pull.peer, pull.id, pull.len, pull.addr, pull.dst, pull.token,
                );
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                // The next poll of its ring drains it and reports the loss (which also
                // drops this pull).
                p.gone = true;
                self.pulls.push_front(pull);
            }
            Err(e) => {
                let err = lost(
                    self.rank,
                    pull.peer,
                    "recv",
                    format!("reading its memory failed: {e}"),
                );
                self.fail(pull.peer, err);
            }
        }
        true
    }

    /// Completes the split message `id` of `peer` once both halves are in.
    fn finish_split(&mut self, peer: usize, id: u64, ev: &mut dyn Events) {
        let Some(p) = self.peers.get_mut(peer).and_then(|p| p.as_deref_mut()) else {
            return;
        };
        if !p.splits.get(&id).is_some_and(|s| s.pulled && s.written) {
            return;
        }
        let Some(s) = p.splits.remove(&id) else {
            return;
        };
        if p.inn.hdr().producer.state.load(Ordering::Acquire) == ring::ABORTED {
            // As in `run_pulls`: failed once its ring is drained, after its last records.
            return;
        }
        ev.recv_done(s.token);
        let mut d = Rec::new(DONE);
        d.id = id;
        self.push_bare(peer, d);
    }

    /// Advances the writes of split messages this rank sends. Returns whether anything
    /// happened.
    fn run_pushes(&mut self) -> bool {
        let Some(mut push) = self.pushes.pop_front() else {
            return false;
        };
        let Some(p) = self.peers.get_mut(push.peer).and_then(|p| p.as_deref_mut()) else {
            return true;
        };
        // The receiver's view: it takes its buffer back only after marking its ring to us
        // aborted and seeing no write of ours in flight (see `take_back_lent`).
        let hdr = p.inn.hdr();
        hdr.remote_writes.fetch_add(1, Ordering::SeqCst);
        if hdr.producer.state.load(Ordering::SeqCst) != ring::OPEN {
            hdr.remote_writes.fetch_sub(1, Ordering::SeqCst);
            return true;
        }
        let n = push.left.min(self.cfg.cma_chunk);
        // SAFETY: the source is our lent send buffer (valid until the receiver's Done,
        // contract point 4), `n` bytes from `src` lie inside it.
        let src = unsafe { std::slice::from_raw_parts(push.src as *const u8, n) };
        let wrote = cma::write(p.pid, push.dst, src);
        hdr.remote_writes.fetch_sub(1, Ordering::SeqCst);
        let status = match wrote {
            Ok(k) if k == n => {
                push.src += n as u64;
                push.dst += n as u64;
                push.left -= n;
                if push.left > 0 {
                    self.pushes.push_front(push);
                    return true;
                }
                0
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) => {
                tracing::debug!(peer = push.peer, "single-copy writes refused ({e})");
                1
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                p.gone = true;
                return true;
            }
            other => {
                let why = match other {
                    Ok(k) => format!("only {k} of {n} bytes could be written into its buffer"),
                    Err(e) => format!("writing into its buffer failed: {e}"),
                };
                let err = lost(self.rank, push.peer, "send", why);
                self.fail(push.peer, err);
                return true;
            }
        };
        let mut w = Rec::new(WROTE);
        w.id = push.id;
        w.aux = status;
        self.push_bare(push.peer, w);
        true
    }

    /// Looks at every peer process; marks the dead ones (drained and reported by the next
    /// poll of their ring).
    fn check_liveness(&mut self) {
        self.checked_at = Instant::now();
        for &peer in &self.order {
            if let Some(p) = self.peers[peer].as_deref_mut()
                && p.state == State::Open
                && !p.gone
                && p.proc.as_ref().is_some_and(|pr| !pr.alive())
            {
                tracing::debug!(rank = self.rank, peer, pid = p.pid, "peer process is gone");
                p.gone = true;
            }
        }
    }

    /// Whether `progress` has something to do now (looked at just before sleeping).
    fn has_work(&mut self) -> bool {
        if !self.sends_done.is_empty()
            || !self.failures.is_empty()
            || !self.closed.is_empty()
            || !self.pulls.is_empty()
            || !self.pushes.is_empty()
        {
            return true;
        }
        for &peer in &self.order {
            let Some(p) = self.peers[peer].as_deref_mut() else {
                continue;
            };
            if p.state != State::Open {
                continue;
            }
            let hdr = p.inn.hdr();
            if p.gone
                || p.cons.has_data(&p.inn.mem)
                || hdr.producer.state.load(Ordering::Acquire) != ring::OPEN
            {
                return true;
            }
            if !p.queue.is_empty() || !p.streams.is_empty() {
                let out = p.out.hdr();
                let want = match p.queue.front() {
                    Some(o) => o.size(),
                    None => ring::record_size(MIN_CHUNK.min(self.cfg.ring_size / 4)),
                };
                if p.prod.free(out, want) >= want {
                    return true;
                }
            }
        }
        false
    }

    /// Marks every outgoing ring `state` and wakes the peers so they notice.
    fn mark_rings(&mut self, state: u32) {
        for &peer in &self.order {
            if let Some(p) = self.peers[peer].as_deref() {
                p.out.hdr().producer.state.store(state, Ordering::Release);
                notify(&p.out.seg);
            }
        }
    }
}

/// Writes an eager message (inline in the header when small enough).
///
/// # Safety
/// `prod` is the only producer of the ring (`hdr`, `mem`); `data` is valid.
unsafe fn push_eager(
    prod: &mut Producer,
    hdr: &ring::RingHeader,
    mem: &ring::RawMem,
    env: &Envelope,
    data: &SendBuf,
) -> bool {
    let mut r = Rec::new(EAGER);
    r.env = *env;
    // SAFETY: the caller guarantees `data` is valid.
    let bytes = unsafe { data.as_slice() };
    // SAFETY: single producer (caller).
    unsafe {
        if bytes.len() <= INLINE {
            prod.push(hdr, mem, &r.encode(Some(bytes)), &[])
        } else {
            prod.push(hdr, mem, &r.encode(None), bytes)
        }
    }
}

/// Writes a record without user payload (Rts carries the sender's address).
///
/// # Safety
/// `prod` is the only producer of the ring (`hdr`, `mem`).
unsafe fn push_bare_rec(
    prod: &mut Producer,
    hdr: &ring::RingHeader,
    mem: &ring::RawMem,
    r: &Rec,
) -> bool {
    let addr = r.aux.to_le_bytes();
    let split = r.len.to_le_bytes();
    let payload: &[u8] = match r.kind {
        RTS => &addr,
        SPLIT => &split,
        _ => &[],
    };
    // SAFETY: single producer (caller).
    unsafe { prod.push(hdr, mem, &r.encode(None), payload) }
}

impl Out {
    /// Bytes the record takes in the ring.
    fn size(&self) -> usize {
        match self {
            Out::Eager { data, .. } if data.len <= INLINE => RECORD_HEADER,
            Out::Eager { data, .. } => ring::record_size(data.len),
            Out::Bare(r) if r.kind == RTS || r.kind == SPLIT => ring::record_size(8),
            Out::Bare(_) => RECORD_HEADER,
        }
    }
}

fn lost(rank: usize, peer: usize, op: &str, detail: String) -> Error {
    Error::PeerLost {
        rank,
        peer,
        op: op.into(),
        detail,
    }
}

/// Forgets every buffer of a peer (contract point 5).
fn forget(p: &mut Peer) {
    p.queue.clear();
    p.streams.clear();
    p.lent.clear();
    p.kept.clear();
    p.incoming.clear();
    p.splits.clear();
}

/// Before forgetting buffers `p` may be writing into (split copies): tells it to stop (its
/// view of our ring says aborted) and waits until no write of it is in flight, or it is
/// gone, for at most two seconds. After that nobody touches those buffers again.
fn take_back_lent(p: &mut Peer) {
    if p.splits.is_empty() {
        return;
    }
    let hdr = p.out.hdr();
    hdr.producer.state.swap(ring::ABORTED, Ordering::SeqCst);
    let start = Instant::now();
    while hdr.remote_writes.load(Ordering::SeqCst) != 0 {
        let alive = p.proc.as_ref().is_none_or(|pr| pr.alive());
        if !alive || start.elapsed() > Duration::from_secs(2) {
            if alive {
                tracing::warn!(
                    pid = p.pid,
                    "a peer is still writing into a buffer this rank takes back"
                );
            }
            break;
        }
        std::thread::yield_now();
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        if !self.aborted {
            self.mark_rings(ring::CLOSED);
        }
        self.seg.unlink();
    }
}

impl Transport for ShmTransport {
    fn name(&self) -> &'static str {
        "shm"
    }

    unsafe fn send(
        &mut self,
        peer: usize,
        env: &Envelope,
        data: SendBuf,
        token: Token,
    ) -> Result<Sent> {
        let eager = data.len <= self.cfg.eager_limit;
        let p = self.peer_mut(peer, "send")?;
        if eager {
            if p.queue.is_empty() {
                // SAFETY: single producer of our slot in the peer's segment; `data` is valid
                // now (caller's contract).
                let pushed =
                    unsafe { push_eager(&mut p.prod, p.out.hdr(), &p.out.mem, env, &data) };
                if pushed {
                    notify(&p.out.seg);
                    return Ok(Sent::Done);
                }
            }
            p.queue.push_back(Out::Eager {
                env: *env,
                data,
                token,
            });
        } else {
            let id = p.next_id;
            p.next_id += 1;
            p.lent.insert(id, (data, token));
            let mut r = Rec::new(RTS);
            r.len = data.len as u64;
            r.id = id;
            r.aux = data.ptr as u64;
            r.env = *env;
            p.queue.push_back(Out::Bare(r));
        }
        self.flush(peer);
        Ok(Sent::Pending)
    }

    unsafe fn fetch(&mut self, peer: usize, handle: u64, dst: RecvBuf, token: Token) -> Result<()> {
        let p = self.peer_mut(peer, "recv")?;
        let (len, addr) = p.kept.remove(&handle).ok_or_else(|| {
            Error::invalid(
                "recv",
                "handle",
                format!("rank {peer} has no kept message {handle}"),
            )
        })?;
        if dst.len < len {
            return Err(Error::invalid(
                "recv",
                "buffer",
                format!("{} bytes for a message of {len}", dst.len),
            ));
        }
        let dst = RecvBuf { ptr: dst.ptr, len };
        self.start_receive(peer, handle, len, addr, dst, token);
        Ok(())
    }

    fn discard(&mut self, peer: usize, handle: u64) -> Result<()> {
        let Ok(p) = self.peer_mut(peer, "discard") else {
            return Ok(());
        };
        if p.kept.remove(&handle).is_some() {
            let mut d = Rec::new(DONE);
            d.id = handle;
            self.push_bare(peer, d);
        }
        Ok(())
    }

    fn progress(&mut self, ev: &mut dyn Events) -> Result<bool> {
        let mut did = false;
        self.polls = self.polls.wrapping_add(1);
        if self.polls.is_multiple_of(1024) && self.checked_at.elapsed() >= LIVENESS_INTERVAL {
            self.check_liveness();
        }
        for i in 0..self.order.len() {
            let peer = self.order[i];
            did |= self.poll_peer(peer, ev);
            if let Some(p) = self.peers[peer].as_deref()
                && (!p.queue.is_empty() || !p.streams.is_empty())
            {
                did |= self.flush(peer);
            }
        }
        did |= self.run_pulls(ev);
        did |= self.run_pushes();
        for token in self.sends_done.drain(..) {
            did = true;
            ev.send_done(token);
        }
        for peer in std::mem::take(&mut self.closed) {
            did = true;
            ev.peer_closed(peer);
        }
        for (peer, err) in std::mem::take(&mut self.failures) {
            did = true;
            ev.peer_failed(peer, err);
        }
        Ok(did)
    }

    fn wait(&mut self, timeout: Duration) -> Result<()> {
        if self.checked_at.elapsed() >= LIVENESS_INTERVAL {
            self.check_liveness();
        }
        for i in 0..self.order.len() {
            let peer = self.order[i];
            self.release(peer, true);
        }
        let seg = Arc::clone(&self.seg);
        let bell = seg.doorbell();
        if bell.begin_sleep() && !self.has_work() {
            let v = ring::Doorbell::sleeping_value();
            futex::wait(&bell.state, v, timeout.min(LIVENESS_INTERVAL));
        }
        bell.end_sleep();
        Ok(())
    }

    fn waker(&self) -> Waker {
        let seg = Arc::clone(&self.seg);
        Arc::new(move || notify(&seg))
    }

    fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            self.mark_rings(ring::ABORTED);
        }
        for i in 0..self.order.len() {
            let peer = self.order[i];
            if let Some(p) = self.peers[peer].as_deref_mut()
                && p.state == State::Open
            {
                p.state = State::Failed;
                take_back_lent(p);
                forget(p);
            }
        }
        self.pulls.clear();
        self.pushes.clear();
        self.sends_done.clear();
        self.failures.clear();
        self.closed.clear();
    }
}
