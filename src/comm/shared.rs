//! What every communicator of one process shares: the engine, and how threads wait on it.
//!
//! There is no I/O thread. A thread that waits for a request becomes the *leader* if
//! nobody is driving the engine: it polls the transports (spinning briefly, then sleeping
//! in the transport's kernel wait) and hands results to the other waiting threads, the
//! *followers*, which sleep (parked) until their request is done or the leader leaves.
//! Short operations (posting a send or a receive) take the engine lock directly; a leader
//! asleep in the kernel is woken to let them in.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::engine::{Done, Engine, ReqId};
use super::{CommConfig, Placement};
use crate::error::{Error, Result};
use crate::transport::{Transport, Waker};

/// What a waiting thread waits for. The leader borrows the caller's request ids (no
/// allocation per wait); a follower, whose wish other threads read, owns a copy.
enum Want<'a> {
    /// Request `id`, whose result it takes.
    One(ReqId),
    /// Any of these requests to be done (results stay in the engine), or, with `Some`,
    /// the engine's count of losses to differ from this one (see [`Engine::losses`]).
    Any(Cow<'a, [ReqId]>, Option<u64>),
}

/// What a wait ended with.
enum Got {
    /// The result of [`Want::One`].
    Taken(Result<Done>),
    /// One of [`Want::Any`]'s requests is done.
    Ready,
}

/// A thread waiting for requests that another thread's progress may complete.
struct Follower {
    want: Want<'static>,
    thread: Thread,
    result: Mutex<Option<Got>>,
}

/// Longest sleep in one transport wait or park, so deadlines and aborts are seen promptly
/// even if a wake-up is lost.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// While spinning, the clock is read once every this many idle passes.
const CLOCK_EVERY: u32 = 16;

/// The engine of a process and its waiting machinery.
pub(crate) struct Shared {
    engine: Mutex<Engine>,
    /// Threads blocked acquiring the engine for a short operation.
    contenders: AtomicUsize,
    followers: Mutex<Vec<Arc<Follower>>>,
    n_followers: AtomicUsize,
    wakers: Vec<Waker>,
    aborted: AtomicBool,
    abort_reason: Mutex<String>,
    pub cfg: CommConfig,
    pub world_rank: usize,
    pub world_size: usize,
    pub placement: Placement,
    /// Kept alive as long as the communicators (e.g. the rendezvous store server).
    _keep: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

/// The engine lock for a short operation; hands leadership on when dropped.
pub(crate) struct EngineGuard<'a> {
    guard: Option<MutexGuard<'a, Engine>>,
    shared: &'a Shared,
}

impl std::ops::Deref for EngineGuard<'_> {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        self.guard.as_ref().expect("guard is held until drop")
    }
}

impl std::ops::DerefMut for EngineGuard<'_> {
    fn deref_mut(&mut self) -> &mut Engine {
        self.guard.as_mut().expect("guard is held until drop")
    }
}

impl Drop for EngineGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        // Followers may be waiting for someone to lead.
        self.shared.wake_one_follower();
    }
}

impl Shared {
    pub(crate) fn new(
        world_rank: usize,
        world_size: usize,
        transports: Vec<Box<dyn Transport>>,
        route: Vec<u8>,
        cfg: CommConfig,
        placement: Placement,
        keep: Vec<Box<dyn std::any::Any + Send + Sync>>,
    ) -> Arc<Shared> {
        let engine = Engine::new(world_rank, transports, route);
        let wakers = engine.wakers();
        Arc::new(Shared {
            engine: Mutex::new(engine),
            contenders: AtomicUsize::new(0),
            followers: Mutex::new(Vec::new()),
            n_followers: AtomicUsize::new(0),
            wakers,
            aborted: AtomicBool::new(false),
            abort_reason: Mutex::new(String::new()),
            cfg,
            world_rank,
            world_size,
            placement,
            _keep: keep,
        })
    }

    /// Takes the engine for a short operation; a leader asleep in a transport wait is woken
    /// to hand it over.
    pub(crate) fn lock(&self) -> EngineGuard<'_> {
        let guard = match self.engine.try_lock() {
            Some(g) => g,
            None => {
                self.contenders.fetch_add(1, Ordering::SeqCst);
                self.wake_transports();
                let g = self.engine.lock();
                self.contenders.fetch_sub(1, Ordering::SeqCst);
                g
            }
        };
        let mut g = EngineGuard {
            guard: Some(guard),
            shared: self,
        };
        self.apply_abort(&mut g);
        g
    }

    fn apply_abort(&self, eng: &mut Engine) {
        if self.aborted.load(Ordering::SeqCst) && eng.fatal().is_none() {
            eng.abort(Error::Aborted(self.abort_reason.lock().clone()));
        }
    }

    fn wake_transports(&self) {
        for w in &self.wakers {
            w();
        }
    }

    fn wake_one_follower(&self) {
        if self.n_followers.load(Ordering::SeqCst) > 0
            && let Some(f) = self.followers.lock().first()
        {
            f.thread.unpark();
        }
    }

    /// Fails every current and later operation of the engine with `err` (sticky): the
    /// transports forget every buffer at once and close their connections.
    pub(crate) fn fail(&self, err: Error) {
        let mut g = self.lock();
        g.abort(err);
        self.hand_out(&mut g);
    }

    /// The sticky error once the engine has failed for good or was aborted. For operations
    /// that would not otherwise touch the engine (a collective of a one-rank communicator),
    /// so they fail after an abort like every other operation.
    pub(crate) fn check_usable(&self) -> Result<()> {
        match self.lock().fatal() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Fails every current and later operation with [`Error::Aborted`].
    pub(crate) fn abort(&self, reason: &str) {
        *self.abort_reason.lock() = reason.to_string();
        self.aborted.store(true, Ordering::SeqCst);
        self.wake_transports();
        // Apply it now, so requests nobody waits on fail too, and release the followers.
        let mut g = self.lock();
        self.apply_abort(&mut g);
        self.hand_out(&mut g);
    }

    /// Gives finished followers their results and wakes them.
    fn hand_out(&self, eng: &mut Engine) {
        if self.n_followers.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut followers = self.followers.lock();
        followers.retain(|f| match Self::check(eng, &f.want) {
            Some(got) => {
                *f.result.lock() = Some(got);
                f.thread.unpark();
                false
            }
            None => true,
        });
        self.n_followers.store(followers.len(), Ordering::SeqCst);
    }

    /// Whether `want` is satisfied (taking the result of a single request).
    fn check(eng: &mut Engine, want: &Want) -> Option<Got> {
        match want {
            Want::One(id) => eng.take(*id).map(Got::Taken),
            Want::Any(ids, losses) => (ids.iter().any(|&id| eng.is_done(id))
                || losses.is_some_and(|l| l != eng.losses()))
            .then_some(Got::Ready),
        }
    }

    /// Waits until at least one of `ids` is done (its result stays in the engine, see
    /// [`Shared::take_done`]), driving the transports when no other thread does. After
    /// `timeout` it returns [`Error::Timeout`] naming the first request not done, and
    /// leaves every request as it is: the caller decides what to do with them.
    pub(crate) fn wait_any(&self, ids: &[ReqId], timeout: Option<Duration>) -> Result<()> {
        match self.wait_for(Want::Any(Cow::Borrowed(ids), None), timeout)? {
            Got::Ready => Ok(()),
            Got::Taken(r) => r.map(|_| ()),
        }
    }

    /// Like [`Shared::wait_any`], but also returns (with nothing done, perhaps) as soon as
    /// the engine's count of losses ([`Engine::losses`]) differs from `losses`: a peer was
    /// lost or a collective notice arrived, which may doom the caller's collective even if
    /// none of its requests involves that peer.
    pub(crate) fn wait_any_or_loss(
        &self,
        ids: &[ReqId],
        losses: u64,
        timeout: Option<Duration>,
    ) -> Result<()> {
        match self.wait_for(Want::Any(Cow::Borrowed(ids), Some(losses)), timeout)? {
            Got::Ready => Ok(()),
            Got::Taken(r) => r.map(|_| ()),
        }
    }

    /// Takes the results of the requests of `ids` that are done, without driving the
    /// transports; `f` gets the index into `ids` and the result.
    pub(crate) fn take_done(&self, ids: &[ReqId], mut f: impl FnMut(usize, Result<Done>)) {
        let mut eng = self.lock();
        for (i, &id) in ids.iter().enumerate() {
            if let Some(r) = eng.take(id) {
                f(i, r);
            }
        }
    }

    /// Waits for request `id` (up to `timeout`), driving the transports when no other thread
    /// does.
    pub(crate) fn wait(&self, id: ReqId, timeout: Option<Duration>) -> Result<Done> {
        match self.wait_for(Want::One(id), timeout)? {
            Got::Taken(r) => r,
            Got::Ready => unreachable!("a single-request wait takes its result"),
        }
    }

    /// Waits until `want` is satisfied. The outer error is only a timeout of
    /// [`Want::Any`]; a single request's errors (including its timeout) are inside
    /// [`Got::Taken`].
    fn wait_for(&self, want: Want<'_>, timeout: Option<Duration>) -> Result<Got> {
        // Read lazily: a request that completes within a few progress passes never reads
        // the clock (a clock read costs about as much as a pass).
        let mut start: Option<Instant> = None;
        let mut me: Option<Arc<Follower>> = None;
        loop {
            if let Some(f) = &me
                && let Some(r) = f.result.lock().take()
            {
                return Ok(r);
            }
            if let Some(guard) = self.engine.try_lock() {
                if let Some(f) = me.take() {
                    self.unfollow(&f);
                    if let Some(r) = f.result.lock().take() {
                        drop(guard);
                        self.wake_one_follower();
                        return Ok(r);
                    }
                }
                if let Some(r) = self.lead(guard, &want, &mut start, timeout) {
                    self.wake_one_follower();
                    return r;
                }
                std::thread::yield_now();
                continue;
            }
            let Some(f) = &me else {
                // Register, then look at the lock once more before sleeping: the leader may
                // have left in between.
                let f = Arc::new(Follower {
                    want: Self::copy_want(&want),
                    thread: std::thread::current(),
                    result: Mutex::new(None),
                });
                let mut list = self.followers.lock();
                list.push(Arc::clone(&f));
                self.n_followers.store(list.len(), Ordering::SeqCst);
                me = Some(f);
                continue;
            };
            let waited = start.get_or_insert_with(Instant::now).elapsed();
            if let Some(limit) = timeout
                && waited >= limit
            {
                let f = Arc::clone(f);
                self.unfollow(&f);
                if let Some(r) = f.result.lock().take() {
                    return Ok(r);
                }
                let mut g = self.lock();
                if let Some(r) = Self::check(&mut g, &want) {
                    return Ok(r);
                }
                return self.expired(&mut g, &want, waited);
            }
            std::thread::park_timeout(MAX_SLEEP);
        }
    }

    fn copy_want(want: &Want) -> Want<'static> {
        match want {
            Want::One(id) => Want::One(*id),
            Want::Any(ids, losses) => Want::Any(Cow::Owned(ids.to_vec()), *losses),
        }
    }

    /// The outcome of a wait for `want` that ran out of time.
    fn expired(&self, eng: &mut Engine, want: &Want, waited: Duration) -> Result<Got> {
        match want {
            Want::One(id) => Ok(Got::Taken(Err(self.timed_out(eng, *id, waited)))),
            Want::Any(ids, _) => {
                let what = ids
                    .iter()
                    .find(|&&id| !eng.is_done(id))
                    .map(|&id| eng.describe(id))
                    .unwrap_or_default();
                Err(Error::Timeout {
                    op: format!("{what} on rank {}", self.world_rank),
                    waited,
                    detail: "the peer may be stopped, stuck in other work, or much slower; \
                             raise FERROCOMM_OP_TIMEOUT (seconds, 0 = no limit) if it is only \
                             slow"
                        .into(),
                })
            }
        }
    }

    fn unfollow(&self, f: &Arc<Follower>) {
        let mut list = self.followers.lock();
        list.retain(|x| !Arc::ptr_eq(x, f));
        self.n_followers.store(list.len(), Ordering::SeqCst);
    }

    /// Drives the engine until `want` is satisfied (`Some`), or until another thread needs
    /// the lock (`None`: the caller tries again).
    fn lead(
        &self,
        mut eng: MutexGuard<'_, Engine>,
        want: &Want,
        start: &mut Option<Instant>,
        timeout: Option<Duration>,
    ) -> Option<Result<Got>> {
        // Idle passes in a row; the clock is read once every CLOCK_EVERY of them, and the
        // spin is measured from the first read of an idle stretch.
        let mut idle = 0u32;
        let mut idle_since: Option<Instant> = None;
        loop {
            self.apply_abort(&mut eng);
            if let Some(r) = Self::check(&mut eng, want) {
                self.hand_out(&mut eng);
                return Some(Ok(r));
            }
            let busy = match eng.progress() {
                Ok(b) => b,
                Err(e) => {
                    eng.abort(e);
                    true
                }
            };
            // Followers' requests may have completed, here or when they were posted (a
            // send can complete at once).
            self.hand_out(&mut eng);
            if busy {
                if let Some(r) = Self::check(&mut eng, want) {
                    return Some(Ok(r));
                }
                idle = 0;
                idle_since = None;
            } else {
                idle += 1;
            }
            if self.contenders.load(Ordering::SeqCst) > 0 {
                return None;
            }
            if !idle.is_multiple_of(CLOCK_EVERY) && !self.cfg.spin.is_zero() {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            let waited = now - *start.get_or_insert(now);
            if let Some(limit) = timeout
                && waited >= limit
            {
                let r = self.expired(&mut eng, want, waited);
                self.hand_out(&mut eng);
                return Some(r);
            }
            if busy || now - *idle_since.get_or_insert(now) < self.cfg.spin {
                std::hint::spin_loop();
                continue;
            }
            let slice = timeout
                .map_or(MAX_SLEEP, |l| l.saturating_sub(waited))
                .min(MAX_SLEEP);
            if let Err(e) = eng.wait(slice) {
                eng.abort(e);
                self.hand_out(&mut eng);
            }
        }
    }

    /// The timeout error of request `id`; withdraws it if it can, else fails the engine.
    fn timed_out(&self, eng: &mut Engine, id: ReqId, waited: Duration) -> Error {
        let what = eng.describe(id);
        let err = Error::Timeout {
            op: format!("{what} on rank {}", self.world_rank),
            waited,
            detail: "the peer may be stopped, stuck in other work, or much slower; raise \
                     FERROCOMM_OP_TIMEOUT (seconds, 0 = no limit) if it is only slow"
                .into(),
        };
        if !eng.cancel(id) {
            eng.abort(err.clone());
            let _ = eng.take(id);
        }
        err
    }

    /// Whether `id` completed, driving the transports once.
    pub(crate) fn test(&self, id: ReqId) -> Result<Option<Done>> {
        let mut eng = self.lock();
        if !eng.is_done(id) {
            if let Err(e) = eng.progress() {
                eng.abort(e);
            }
            self.hand_out(&mut eng);
        }
        eng.take(id).transpose()
    }

    /// Gets rid of request `id` whose owner does not want it any more: withdraws a receive
    /// not yet matched, waits for anything in flight.
    pub(crate) fn release(&self, id: ReqId) {
        let cancelled = self.lock().cancel(id);
        if !cancelled {
            let _ = self.wait(id, self.cfg.op_timeout);
        }
    }
}
