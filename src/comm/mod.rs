//! Communicators and point-to-point messaging.
//!
//! A [`Communicator`] is a group of ranks that exchange messages: the world made by
//! [`init`](crate::init()), or groups derived from it. It offers blocking
//! [`send`](Communicator::send)/[`recv`](Communicator::recv), non-blocking
//! [`isend`](Scope::isend)/[`irecv`](Scope::irecv) inside a [`scope`](Communicator::scope),
//! message tags, receives from any source, and the collectives of [`crate::collective`].
//!
//! # Semantics
//!
//! - Messages from one rank to another with the same tag arrive in the order they were sent
//!   (per (peer, tag) FIFO). Messages with different tags may be received in any order.
//! - A message may arrive before its receive is posted; it is kept until a receive matches.
//! - A receive buffer must be at least as large as the message; otherwise the receive
//!   fails with [`Error::InvalidArgument`] and the message is dropped.
//! - Zero-length messages are messages like any other.
//! - Every blocking call gives up after the operation timeout
//!   ([`CommConfig::op_timeout`], `FERROCOMM_OP_TIMEOUT`, default 30 minutes) with
//!   [`Error::Timeout`]; a receive that matched nothing is simply withdrawn, anything else in
//!   flight makes the communicator unusable.
//!
//! # Threads
//!
//! A `Communicator` is [`Send`] but not [`Sync`]: one thread uses it at a time, which is
//! what keeps the order of collectives well defined. To communicate from several threads at
//! once, give each thread its own communicator with [`Communicator::dup`] (a collective
//! call); all of them share one progress engine, and whichever thread waits drives the
//! transports for all of them.
//!
//! # Waiting
//!
//! A waiting thread first spins on the transports for a short while
//! ([`CommConfig::spin`], `FERROCOMM_SPIN_US`), which is what gives the lowest latency, and
//! then sleeps in the kernel (epoll, futex, condition variable) so that idle ranks cost no
//! CPU and oversubscribed ranks leave the cores to the ranks that have work.

mod engine;
pub(crate) mod envelope;
mod ibverbs_setup;
mod shared;
mod split;
mod watch;
mod world;

pub(crate) use shared::Shared;

pub use world::init;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use engine::Done;
use engine::ReqId;
use envelope::Env;

use crate::collective::AllReduceAlgo;
use crate::collective::exec::ScratchCache;
use crate::collective::nonblocking::Worker;
use crate::config;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::transport::{RecvBuf, SendBuf, Transport};

/// Where a receive accepts messages from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Only from this rank (of the communicator).
    Rank(usize),
    /// From any rank.
    Any,
}

impl From<usize> for Source {
    fn from(r: usize) -> Source {
        Source::Rank(r)
    }
}

/// Which tags a receive accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    /// Only this tag.
    Value(u32),
    /// Any tag.
    Any,
}

impl From<u32> for Tag {
    fn from(t: u32) -> Tag {
        Tag::Value(t)
    }
}

/// What a completed receive (or send) reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Rank of the sender in the communicator (the destination, for sends).
    pub source: usize,
    /// The message's tag.
    pub tag: u32,
    /// Bytes received (or sent).
    pub bytes: usize,
}

impl Status {
    /// Number of `T` elements received.
    pub fn count<T: Element>(&self) -> usize {
        self.bytes / std::mem::size_of::<T>()
    }
}

/// Tunables of a communicator's waiting behaviour.
#[derive(Clone, Debug)]
pub struct CommConfig {
    /// How long a waiting thread polls before it sleeps in the kernel. Default 50 µs when
    /// each rank has a core, 0 when ranks outnumber cores (the CPUs this process may use; a
    /// process pinned to one CPU counts the machine's, as launchers pin one rank per core);
    /// `FERROCOMM_SPIN_US` overrides.
    pub spin: Duration,
    /// How long a blocking operation may wait; `None` waits forever.
    /// `FERROCOMM_OP_TIMEOUT` (seconds, 0 for none), default 1800 s.
    pub op_timeout: Option<Duration>,
    /// The all_reduce algorithm when a call does not choose one:
    /// `FERROCOMM_ALLREDUCE_ALGO` (`auto`, `ring`, `rhd`, `rd`), default `auto`.
    pub allreduce_algo: AllReduceAlgo,
}

impl CommConfig {
    /// The defaults for `local_ranks` ranks on this host, adjusted by the environment.
    pub fn from_env(local_ranks: usize) -> Result<CommConfig> {
        Self::from_lookup(local_ranks, &config::process_env)
    }

    pub(crate) fn from_lookup(
        local_ranks: usize,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<CommConfig> {
        let cores = cores_for_ranks();
        let spin = match config::parse_var(
            lookup,
            "FERROCOMM_SPIN_US",
            "a whole number of microseconds, e.g. 50 (0: never spin)",
            |v| v.parse::<u64>().ok(),
        )? {
            Some(us) => Duration::from_micros(us),
            None if local_ranks > cores => Duration::ZERO,
            None => Duration::from_micros(50),
        };
        let op_timeout = match config::seconds(lookup, "FERROCOMM_OP_TIMEOUT")? {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => Some(Duration::from_secs(1800)),
        };
        let allreduce_algo = AllReduceAlgo::from_lookup(lookup)?;
        Ok(CommConfig {
            spin,
            op_timeout,
            allreduce_algo,
        })
    }
}

/// The CPUs the ranks of this host share, as far as one rank can tell: what this process
/// may run on (affinity, cgroup quota), except that a mask of a single CPU means a launcher
/// pinned each rank to its own core (`mpirun --bind-to core`, `taskset -c $LOCAL_RANK`),
/// which is not oversubscription: then the machine's CPUs count.
fn cores_for_ranks() -> usize {
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    match crate::sys::cpu::affinity() {
        Some(1) => crate::sys::cpu::online(),
        _ => usable,
    }
}

/// Facts about the process's place in the job, shared by all its communicators.
#[derive(Clone, Debug, Default)]
pub(crate) struct Placement {
    pub local_rank: usize,
    pub local_size: usize,
    pub node_index: usize,
    pub hostname: String,
}

/// A request not tied to a scope: the form the C ABI uses. Dropping it withdraws a receive
/// not yet matched and waits for a transfer in flight, so its buffer is never touched after
/// the drop returns.
#[must_use = "a request must be waited for; dropping it waits or cancels"]
pub struct RawRequest {
    shared: Arc<Shared>,
    id: ReqId,
    group: Arc<Group>,
    live: bool,
}

impl RawRequest {
    /// Waits for completion.
    pub fn wait(mut self) -> Result<Status> {
        self.live = false;
        let d = self.shared.wait(self.id, self.shared.cfg.op_timeout)?;
        Ok(self.group.status(&d))
    }

    /// Completion status if complete, without blocking (drives the transports once). After
    /// it returned `Some` or an error, the request is finished.
    pub fn test(&mut self) -> Result<Option<Status>> {
        if !self.live {
            return Err(Error::invalid("test", "request", "it already completed"));
        }
        let r = self.shared.test(self.id);
        if !matches!(r, Ok(None)) {
            self.live = false;
        }
        Ok(r?.map(|d| self.group.status(&d)))
    }

    /// Whether the request has not completed yet (as far as `test`/`wait` have seen).
    pub fn is_pending(&self) -> bool {
        self.live
    }

    /// The engine's id of the request.
    pub(crate) fn id(&self) -> ReqId {
        self.id
    }

    /// Marks the request finished: its result was taken from the engine by other means
    /// ([`Shared::take_done`]), so dropping it must not touch the engine.
    pub(crate) fn finished(mut self) {
        self.live = false;
    }
}

impl Drop for RawRequest {
    fn drop(&mut self) {
        if self.live {
            self.shared.release(self.id);
        }
    }
}

/// The ranks of a communicator and their world ranks.
#[derive(Debug)]
pub(crate) struct Group {
    /// World rank of each communicator rank.
    pub world: Vec<usize>,
    /// Communicator rank of each world rank (`u32::MAX` when not a member).
    pub rank_of: Vec<u32>,
}

impl Group {
    pub(crate) fn new(world: Vec<usize>, world_size: usize) -> Group {
        let mut rank_of = vec![u32::MAX; world_size];
        for (r, &w) in world.iter().enumerate() {
            rank_of[w] = r as u32;
        }
        Group { world, rank_of }
    }

    fn status(&self, d: &Done) -> Status {
        let e = Env::decode(&d.env);
        Status {
            source: self.rank_of.get(d.peer).map_or(usize::MAX, |&r| r as usize),
            tag: e.tag,
            bytes: d.len,
        }
    }
}

/// A group of ranks that communicate. See the module documentation.
pub struct Communicator {
    pub(crate) shared: Arc<Shared>,
    /// Context of point-to-point messages; collectives use `ctx + 1`.
    pub(crate) ctx: u64,
    pub(crate) group: Arc<Group>,
    pub(crate) rank: usize,
    /// Collectives called so far (the sequence number of the next one).
    pub(crate) coll_seq: Cell<u32>,
    /// Communicators derived from this one so far (for their context ids).
    pub(crate) children: Cell<u64>,
    /// Groups made with `new_group` so far, per member list (for their context ids).
    pub(crate) groups: RefCell<HashMap<u64, u64>>,
    /// Scratch memory of the collectives, kept between calls.
    pub(crate) scratch: RefCell<ScratchCache>,
    /// The worker thread of asynchronous collectives, once started.
    pub(crate) worker: RefCell<Option<Worker>>,
    /// The last collective calls (their envelopes), to name them in late mismatch reports.
    pub(crate) history: RefCell<VecDeque<Env>>,
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank)
            .field("size", &self.size())
            .field("world_rank", &self.shared.world_rank)
            .field("ctx", &format_args!("{:#x}", self.ctx))
            .finish()
    }
}

impl Communicator {
    pub(crate) fn from_shared(shared: Arc<Shared>, ctx: u64, group: Arc<Group>) -> Communicator {
        let rank = group.rank_of[shared.world_rank] as usize;
        Communicator {
            shared,
            ctx,
            group,
            rank,
            coll_seq: Cell::new(0),
            children: Cell::new(0),
            groups: RefCell::new(HashMap::new()),
            scratch: RefCell::new(ScratchCache::default()),
            worker: RefCell::new(None),
            history: RefCell::new(VecDeque::new()),
            _not_sync: PhantomData,
        }
    }

    /// `n` communicators of one world whose ranks are threads of this process, connected by
    /// the in-process transport. Give each to its own thread (they are `Send`).
    ///
    /// ```
    /// let comms = ferrocomm::Communicator::local_world(3);
    /// std::thread::scope(|s| {
    ///     for comm in comms {
    ///         s.spawn(move || {
    ///             let (me, n) = (comm.rank(), comm.size());
    ///             let mut got = [0u32];
    ///             comm.sendrecv(&[me as u32], (me + 1) % n, 0, &mut got, (me + n - 1) % n, 0u32)
    ///                 .unwrap();
    ///             assert_eq!(got[0] as usize, (me + n - 1) % n);
    ///         });
    ///     }
    /// });
    /// ```
    pub fn local_world(n: usize) -> Vec<Communicator> {
        Self::local_world_with(
            n,
            CommConfig::from_env(n).unwrap_or_else(|e| {
                tracing::warn!("ignoring the environment for a local world: {e}");
                CommConfig {
                    spin: Duration::ZERO,
                    op_timeout: Some(Duration::from_secs(1800)),
                    allreduce_algo: AllReduceAlgo::Auto,
                }
            }),
        )
    }

    /// [`Communicator::local_world`] with explicit waiting settings.
    pub fn local_world_with(n: usize, cfg: CommConfig) -> Vec<Communicator> {
        let hub = crate::transport::local::LocalHub::new(n);
        let group = Arc::new(Group::new((0..n).collect(), n));
        (0..n)
            .map(|r| {
                let t: Box<dyn Transport> = Box::new(hub.endpoint(r));
                let placement = Placement {
                    local_rank: r,
                    local_size: n,
                    node_index: 0,
                    hostname: String::from("local"),
                };
                let shared = Shared::new(
                    r,
                    n,
                    vec![t],
                    vec![0; n],
                    cfg.clone(),
                    placement,
                    Vec::new(),
                );
                Communicator::from_shared(shared, 0, Arc::clone(&group))
            })
            .collect()
    }

    /// `n` communicators of one world whose ranks are threads of this process, connected by
    /// the TCP transport over loopback (127.0.0.1), one listening socket per rank. For tests
    /// and benchmarks of the TCP path without starting processes.
    pub fn tcp_loopback_world(n: usize) -> Result<Vec<Communicator>> {
        use crate::transport::tcp;
        let cfg = CommConfig::from_env(n)?;
        let tcp_cfg = tcp::TcpConfig::from_env()?;
        let ip = std::net::IpAddr::from([127, 0, 0, 1]);
        let listeners = (0..n).map(|_| tcp::bind(ip)).collect::<Result<Vec<_>>>()?;
        let addrs = listeners
            .iter()
            .map(|l| {
                l.local_addr()
                    .map(Some)
                    .map_err(|e| Error::io("reading a listener address", e))
            })
            .collect::<Result<Vec<_>>>()?;
        let group = Arc::new(Group::new((0..n).collect(), n));
        let job = crate::wire::job_hash(&format!("loopback-{}", std::process::id()));
        listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let t = tcp::TcpTransport::new(r, n, job, l, addrs.clone(), tcp_cfg.clone())?;
                let placement = Placement {
                    local_rank: r,
                    local_size: n,
                    node_index: 0,
                    hostname: String::from("localhost"),
                };
                let shared = Shared::new(
                    r,
                    n,
                    vec![Box::new(t)],
                    vec![0; n],
                    cfg.clone(),
                    placement,
                    Vec::new(),
                );
                Ok(Communicator::from_shared(shared, 0, Arc::clone(&group)))
            })
            .collect()
    }

    /// `n` communicators of one world whose ranks are threads of this process, connected by
    /// the shared-memory transport (the same rings, doorbells and single-copy reads as
    /// between processes). For tests and benchmarks of the shared-memory path without
    /// starting processes. Settings come from the environment (`FERROCOMM_SHM_*`).
    pub fn shm_world(n: usize) -> Result<Vec<Communicator>> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static WORLDS: AtomicU64 = AtomicU64::new(0);
        let job = format!(
            "shm-world-{}-{}",
            std::process::id(),
            WORLDS.fetch_add(1, Ordering::Relaxed)
        );
        Self::shm_world_with(n, &job, crate::transport::shm::ShmConfig::from_env()?)
    }

    /// [`Communicator::shm_world`] with an explicit job name (which names the segments, see
    /// [`crate::transport::shm::segment_prefix`]) and settings.
    pub fn shm_world_with(
        n: usize,
        job: &str,
        shm_cfg: crate::transport::shm::ShmConfig,
    ) -> Result<Vec<Communicator>> {
        use crate::transport::shm::{LocalPeer, ShmSetup};
        let cfg = CommConfig::from_env(n)?;
        let pid = std::process::id();
        let local: Vec<LocalPeer> = (0..n)
            .map(|rank| LocalPeer {
                rank,
                pid,
                segment: ShmSetup::name_for(job),
            })
            .collect();
        let setups = (0..n)
            .map(|r| ShmSetup::create(r, n, local.clone(), shm_cfg.clone()))
            .collect::<Result<Vec<_>>>()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let transports = setups
            .into_iter()
            .map(|s| s.connect(deadline))
            .collect::<Result<Vec<_>>>()?;
        for t in &transports {
            t.wait_attached(deadline)?;
        }
        let group = Arc::new(Group::new((0..n).collect(), n));
        Ok(transports
            .into_iter()
            .enumerate()
            .map(|(r, t)| {
                let placement = Placement {
                    local_rank: r,
                    local_size: n,
                    node_index: 0,
                    hostname: String::from("localhost"),
                };
                let shared = Shared::new(
                    r,
                    n,
                    vec![Box::new(t)],
                    vec![0; n],
                    cfg.clone(),
                    placement,
                    Vec::new(),
                );
                Communicator::from_shared(shared, 0, Arc::clone(&group))
            })
            .collect())
    }

    /// A new communicator with the same ranks whose messages never mix with this one's
    /// (MPI_Comm_dup). Every rank of this communicator must call it, in the same order
    /// relative to its other communicator-creating calls; it sends no messages. The dup
    /// shares this communicator's connections, so a fatal error on either (a collective
    /// mismatch, a lost peer, an abort) fails both: see [`Communicator::abort`].
    pub fn dup(&self) -> Communicator {
        Communicator::from_shared(
            Arc::clone(&self.shared),
            self.child_ctx(),
            Arc::clone(&self.group),
        )
    }

    /// The context of the next communicator derived from this one. Every member derives the
    /// same value because every member derives its children in the same order. Contexts are
    /// even (a communicator's collectives use `ctx + 1`); 64-bit hashing makes a collision
    /// between two live communicators practically impossible.
    pub(crate) fn child_ctx(&self) -> u64 {
        let n = self.next_child();
        mix_ctx(self.ctx, &[n])
    }

    /// Counts one more derived communicator; returns its number (from 1).
    pub(crate) fn next_child(&self) -> u64 {
        let n = self.children.get() + 1;
        self.children.set(n);
        n
    }

    /// A communicator over the same ranks for this one's asynchronous collectives. Its
    /// context depends only on this one's, so every rank derives the same one whenever its
    /// worker starts.
    pub(crate) fn async_comm(&self) -> Communicator {
        Communicator::from_shared(
            Arc::clone(&self.shared),
            mix_ctx(self.ctx, &[CTX_ASYNC, 0]),
            Arc::clone(&self.group),
        )
    }

    /// This process's rank in the communicator, `0..size()`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks in the communicator.
    pub fn size(&self) -> usize {
        self.group.world.len()
    }

    /// Rank in the world communicator.
    pub fn world_rank(&self) -> usize {
        self.shared.world_rank
    }

    /// Number of ranks in the world.
    pub fn world_size(&self) -> usize {
        self.shared.world_size
    }

    /// Rank among the world's ranks on this host (by host identity), `0..local_size()`.
    pub fn local_rank(&self) -> usize {
        self.shared.placement.local_rank
    }

    /// Number of the world's ranks on this host.
    pub fn local_size(&self) -> usize {
        self.shared.placement.local_size
    }

    /// Index of this host among the job's hosts, in rank order (0 for the host of rank 0).
    pub fn node_index(&self) -> usize {
        self.shared.placement.node_index
    }

    /// Name of this host.
    pub fn hostname(&self) -> &str {
        &self.shared.placement.hostname
    }

    /// The transport that carries messages to `rank` (`"tcp"`, `"local"`, `"self"`...).
    pub fn transport_to(&self, rank: usize) -> Result<&'static str> {
        let w = self.world_of(rank, "transport_to")?;
        Ok(self.shared.lock().transport_of(w))
    }

    /// The waiting settings in force.
    pub fn config(&self) -> &CommConfig {
        &self.shared.cfg
    }

    /// Fails every operation of this communicator's world at once, now and later, with
    /// [`Error::Aborted`]: threads blocked in a call return. The world is every communicator
    /// made from the same init (this one, the one it came from, and their dups, splits and
    /// groups), at any size, one rank included; communicators of another init are not
    /// affected. Any fatal error (a lost peer, a collective mismatch, ...) has the same
    /// scope. Callable from any thread through [`Communicator::abort_handle`].
    pub fn abort(&self, reason: &str) {
        self.abort_handle().abort(reason)
    }

    /// A handle that can abort the communicators from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    pub(crate) fn world_of(&self, rank: usize, op: &str) -> Result<usize> {
        self.group.world.get(rank).copied().ok_or_else(|| {
            Error::invalid(
                op,
                "rank",
                format!(
                    "{rank} is out of range for a communicator of {} ranks",
                    self.size()
                ),
            )
        })
    }

    fn source_world(&self, src: Source, op: &str) -> Result<Option<usize>> {
        match src {
            Source::Any => Ok(None),
            Source::Rank(r) => self.world_of(r, op).map(Some),
        }
    }

    /// Starts a send of raw bytes; the caller keeps `data` valid until the request ends.
    ///
    /// # Safety
    /// `data` must stay valid and unchanged until the returned request has completed or been
    /// dropped (a `RawRequest` must not be leaked with `mem::forget` while `data` can go
    /// away).
    pub unsafe fn isend_raw(&self, data: SendBuf, dst: usize, tag: u32) -> Result<RawRequest> {
        // SAFETY: forwarded.
        unsafe { self.isend_ctx(data, dst, &Env::p2p(self.ctx, tag), "send") }
    }

    /// Starts a send with a prepared envelope.
    ///
    /// # Safety
    /// As for [`Communicator::isend_raw`].
    pub(crate) unsafe fn isend_ctx(
        &self,
        data: SendBuf,
        dst: usize,
        env: &Env,
        op: &str,
    ) -> Result<RawRequest> {
        let w = self.world_of(dst, op)?;
        // SAFETY: the returned RawRequest keeps the request; its drop waits (contract above).
        let id = unsafe { self.shared.lock().send(w, env, data)? };
        Ok(self.raw(id))
    }

    /// Starts a receive of raw bytes into `buf`.
    ///
    /// # Safety
    /// `buf` must stay valid and unused until the returned request has completed or been
    /// dropped (see [`Communicator::isend_raw`]).
    pub unsafe fn irecv_raw(&self, buf: RecvBuf, src: Source, tag: Tag) -> Result<RawRequest> {
        let tag = match tag {
            Tag::Value(t) => Some(t),
            Tag::Any => None,
        };
        // SAFETY: forwarded.
        unsafe { self.irecv_ctx(buf, src, self.ctx, tag, None, "recv") }
    }

    /// Posts a receive in context `ctx`; with `expect`, a collective receive (see
    /// `Engine::recv`).
    ///
    /// # Safety
    /// As for [`Communicator::irecv_raw`].
    pub(crate) unsafe fn irecv_ctx(
        &self,
        buf: RecvBuf,
        src: Source,
        ctx: u64,
        tag: Option<u32>,
        expect: Option<Env>,
        op: &str,
    ) -> Result<RawRequest> {
        let w = self.source_world(src, op)?;
        // SAFETY: as in isend_ctx.
        let id = unsafe { self.shared.lock().recv(ctx, w, tag, buf, expect)? };
        Ok(self.raw(id))
    }

    fn raw(&self, id: ReqId) -> RawRequest {
        RawRequest {
            shared: Arc::clone(&self.shared),
            id,
            group: Arc::clone(&self.group),
            live: true,
        }
    }

    /// Sends `buf` to rank `dst` with tag `tag`; returns when `buf` may be reused.
    pub fn send<T: Element>(&self, buf: &[T], dst: usize, tag: u32) -> Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(buf);
        // SAFETY: the request is waited for (or its drop waits) before `buf`'s borrow ends.
        let req = unsafe { self.isend_raw(SendBuf::new(bytes), dst, tag)? };
        req.wait().map(|_| ())
    }

    /// Receives a message from `src` with tag `tag` into `buf` (which must be at least as
    /// large as the message). Returns who sent it, its tag and its size.
    pub fn recv<T: Element>(
        &self,
        buf: &mut [T],
        src: impl Into<Source>,
        tag: impl Into<Tag>,
    ) -> Result<Status> {
        self.recv_timeout(buf, src, tag, self.shared.cfg.op_timeout)
    }

    /// [`Communicator::recv`] with its own timeout (`None`: wait forever). A receive that
    /// times out before any message matched is withdrawn and the communicator stays usable.
    pub fn recv_timeout<T: Element>(
        &self,
        buf: &mut [T],
        src: impl Into<Source>,
        tag: impl Into<Tag>,
        timeout: Option<Duration>,
    ) -> Result<Status> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(buf);
        // SAFETY: as in send.
        let mut req = unsafe { self.irecv_raw(RecvBuf::new(bytes), src.into(), tag.into())? };
        req.live = false;
        let d = self.shared.wait(req.id, timeout)?;
        let st = self.group.status(&d);
        check_whole::<T>(&st)?;
        Ok(st)
    }

    /// Sends `send` to `dst` and receives into `recv` from `src` at the same time (so a ring
    /// shift cannot deadlock).
    pub fn sendrecv<T: Element>(
        &self,
        send: &[T],
        dst: usize,
        send_tag: u32,
        recv: &mut [T],
        src: impl Into<Source>,
        recv_tag: impl Into<Tag>,
    ) -> Result<Status> {
        let (src, recv_tag) = (src.into(), recv_tag.into());
        self.scope(|s| {
            let r = s.irecv(recv, src, recv_tag)?;
            let w = s.isend(send, dst, send_tag)?;
            let sent = w.wait();
            let got = r.wait()?;
            sent?;
            Ok(got)
        })
    }

    /// Runs `f` with a [`Scope`] in which non-blocking sends and receives borrow buffers from
    /// outside the scope. Every request started in the scope is finished when it ends (waited
    /// for, or withdrawn if it is a receive nothing matched), even on panic, so no buffer is
    /// touched after `scope` returns.
    pub fn scope<'env, F, R>(&'env self, f: F) -> R
    where
        F: for<'scope> FnOnce(&'scope Scope<'scope, 'env>) -> R,
    {
        let scope = Scope {
            comm: self,
            started: std::cell::RefCell::new(Vec::new()),
            _scope: PhantomData,
            _env: PhantomData,
        };
        let guard = ScopeGuard(&scope);
        let r = f(&scope);
        drop(guard);
        r
    }
}

/// Domain separators of derived contexts (`mix_ctx`'s first part), so that a split, a group
/// and an asynchronous worker never derive the same context as a dup.
pub(crate) const CTX_SPLIT: u64 = 0x5350_4c49_5400_0001;
/// See [`CTX_SPLIT`].
pub(crate) const CTX_GROUP: u64 = 0x4752_4f55_5000_0002;
/// See [`CTX_SPLIT`].
pub(crate) const CTX_ASYNC: u64 = 0x4153_594e_4300_0003;

/// A context derived from `parent` and `parts` (splitmix64 over each part): even, at
/// least 2, and for 64-bit values practically never equal to another live context.
pub(crate) fn mix_ctx(parent: u64, parts: &[u64]) -> u64 {
    let mut x = parent;
    for &p in parts {
        x ^= p.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
    }
    (x & !1).max(2)
}

fn check_whole<T: Element>(st: &Status) -> Result<()> {
    let size = std::mem::size_of::<T>();
    if !st.bytes.is_multiple_of(size) {
        return Err(Error::invalid(
            "recv",
            "buffer",
            format!(
                "the {}-byte message from rank {} (tag {}) is not a whole number of {} ({size}-byte) elements",
                st.bytes,
                st.source,
                st.tag,
                T::DTYPE
            ),
        ));
    }
    Ok(())
}

/// Aborts a process's communicators from any thread. See [`Communicator::abort`].
#[derive(Clone)]
pub struct AbortHandle {
    shared: Arc<Shared>,
}

impl AbortHandle {
    /// Fails every current and later operation with [`Error::Aborted`] carrying `reason`.
    pub fn abort(&self, reason: &str) {
        self.shared.abort(reason);
    }
}

/// Non-blocking operations on borrowed buffers; see [`Communicator::scope`].
pub struct Scope<'scope, 'env: 'scope> {
    comm: &'env Communicator,
    started: std::cell::RefCell<Vec<ReqId>>,
    _scope: PhantomData<&'scope mut &'scope ()>,
    _env: PhantomData<&'env mut &'env ()>,
}

struct ScopeGuard<'a, 'scope, 'env>(&'a Scope<'scope, 'env>);

impl Drop for ScopeGuard<'_, '_, '_> {
    fn drop(&mut self) {
        // Requests already waited for are gone from the engine (their ids no longer match a
        // live slot), so this only finishes the ones dropped early or leaked.
        for id in self.0.started.borrow_mut().drain(..) {
            self.0.comm.shared.release(id);
        }
    }
}

impl<'scope, 'env> Scope<'scope, 'env> {
    /// The communicator of this scope.
    pub fn comm(&self) -> &'env Communicator {
        self.comm
    }

    fn track(&'scope self, raw: RawRequest) -> Request<'scope> {
        self.started.borrow_mut().push(raw.id);
        Request {
            raw,
            _scope: PhantomData,
        }
    }

    /// Starts sending `buf` to `dst` with tag `tag`.
    pub fn isend<T: Element>(
        &'scope self,
        buf: &'env [T],
        dst: usize,
        tag: u32,
    ) -> Result<Request<'scope>> {
        let bytes: &[u8] = bytemuck::cast_slice(buf);
        // SAFETY: `buf` outlives the scope, and the scope finishes every request it started.
        let raw = unsafe { self.comm.isend_raw(SendBuf::new(bytes), dst, tag)? };
        Ok(self.track(raw))
    }

    /// Starts receiving into `buf` from `src` with tag `tag`.
    pub fn irecv<T: Element>(
        &'scope self,
        buf: &'env mut [T],
        src: impl Into<Source>,
        tag: impl Into<Tag>,
    ) -> Result<Request<'scope>> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(buf);
        // SAFETY: as in isend.
        let raw = unsafe {
            self.comm
                .irecv_raw(RecvBuf::new(bytes), src.into(), tag.into())?
        };
        Ok(self.track(raw))
    }

    /// Waits for every request; returns their statuses in order, or the first error (after
    /// all have finished, so no buffer is left in use).
    pub fn wait_all(&self, reqs: Vec<Request<'scope>>) -> Result<Vec<Status>> {
        wait_all(reqs)
    }
}

/// A non-blocking send or receive started in a [`Scope`].
#[must_use = "a request must be waited for; dropping it waits or cancels"]
pub struct Request<'scope> {
    raw: RawRequest,
    _scope: PhantomData<&'scope ()>,
}

impl Request<'_> {
    /// Waits for completion.
    pub fn wait(self) -> Result<Status> {
        self.raw.wait()
    }

    /// The status if complete, without blocking.
    pub fn test(&mut self) -> Result<Option<Status>> {
        self.raw.test()
    }
}

/// Waits for every request; returns their statuses in order, or the first error (after all
/// have finished).
pub fn wait_all(reqs: Vec<Request<'_>>) -> Result<Vec<Status>> {
    let mut out = Vec::with_capacity(reqs.len());
    let mut first_err = None;
    for r in reqs {
        match r.wait() {
            Ok(s) => out.push(s),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::element::ReduceOp;

    fn aborted<T: std::fmt::Debug>(what: &str, r: Result<T>) {
        match r {
            Err(Error::Aborted(why)) => assert!(why.contains("stop here"), "{what}: {why}"),
            other => panic!("{what} after abort returned {other:?}, not the abort error"),
        }
    }

    /// After `abort`, every call of a one-rank communicator fails with the abort error, on
    /// every path: point-to-point to itself, blocking and non-blocking collectives (which
    /// touch no transport at one rank), and communicators derived from it.
    #[test]
    fn abort_of_a_one_rank_communicator_fails_every_later_call() {
        let comm = Communicator::local_world(1).pop().expect("one rank");
        let mut v = [1.0f32; 4];
        comm.all_reduce(&mut v, ReduceOp::Sum)
            .expect("works before abort");
        let dup = comm.dup();
        comm.abort("stop here");
        aborted("all_reduce", comm.all_reduce(&mut v, ReduceOp::Sum));
        aborted("broadcast", comm.broadcast(&mut v, 0));
        aborted("barrier", comm.barrier());
        let mut all = [0.0f32; 4];
        aborted("all_gather", comm.all_gather(&v, &mut all));
        aborted("send to itself", comm.send(&v, 0, 1));
        aborted("recv", comm.recv(&mut v, 0, 1u32).map(|_| ()));
        aborted(
            "iall_reduce",
            comm.iall_reduce(vec![1.0f32; 4], ReduceOp::Sum).wait(),
        );
        aborted("all_reduce on a dup", dup.all_reduce(&mut v, ReduceOp::Sum));
        aborted("barrier on a later dup", comm.dup().barrier());
    }
}
