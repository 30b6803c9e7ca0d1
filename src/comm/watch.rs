//! Sleeping on several transports at once.
//!
//! A process with shared-memory peers and TCP peers has two kinds of wake-up: a futex in
//! shared memory (rung by peer processes, no descriptor) and an epoll descriptor (sockets).
//! No single kernel call waits on both, so the waiting thread sleeps on the futex — the
//! path whose latency matters most, as the peers on the same host are the close ones — and
//! an [`FdWatcher`] thread polls the other transports' descriptors *while that sleep
//! lasts*, ringing the futex transport's waker when one becomes readable.
//!
//! Why this shape: the alternatives are an eventfd registered in the TCP poller that peer
//! processes write to (each process would need every peer's descriptor: `pidfd_getfd`
//! needs ptrace rights, which containers often refuse), or the waiting thread in epoll with
//! the futex forwarded by a helper (every shared-memory wake-up would then take two hops
//! instead of one). Here the shared-memory wake-up is direct, a TCP wake-up takes one extra
//! thread hop (a few µs, next to TCP's 10 µs or more), the watcher costs nothing while the
//! waiting thread spins or works (it is parked, not polling), and a process with one
//! transport has no watcher at all.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::transport::Waker;

/// How long one poll of the watched descriptors lasts before the watcher looks at its
/// state again (it only matters for shutting down: arming wakes it at once).
const POLL_SLICE: Duration = Duration::from_millis(100);

struct State {
    /// Incremented by every arm; 0 is never armed.
    armed: u64,
    /// Whether the current arm is still in force.
    active: bool,
    /// The arm the watcher already rang for (at most one ring per sleep).
    rung: u64,
    stop: bool,
}

struct Inner {
    state: Mutex<State>,
    cv: Condvar,
    fds: Vec<RawFd>,
    waker: Waker,
}

/// Rings `waker` when one of `fds` becomes readable while armed. See the module docs.
pub(crate) struct FdWatcher {
    inner: Arc<Inner>,
}

impl FdWatcher {
    /// Starts the watcher thread for `fds`, which rings `waker`.
    pub(crate) fn start(fds: Vec<RawFd>, waker: Waker) -> std::io::Result<FdWatcher> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                armed: 0,
                active: false,
                rung: 0,
                stop: false,
            }),
            cv: Condvar::new(),
            fds,
            waker,
        });
        let i2 = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("ferrocomm-watch".into())
            .spawn(move || run(&i2))?;
        Ok(FdWatcher { inner })
    }

    /// The waiting thread is about to sleep: watch until [`FdWatcher::disarm`].
    pub(crate) fn arm(&self) {
        let mut s = self.inner.state.lock();
        s.armed += 1;
        s.active = true;
        drop(s);
        self.inner.cv.notify_one();
    }

    /// The waiting thread woke up.
    pub(crate) fn disarm(&self) {
        self.inner.state.lock().active = false;
    }
}

impl Drop for FdWatcher {
    fn drop(&mut self) {
        self.inner.state.lock().stop = true;
        self.inner.cv.notify_one();
        // Not joined: the thread notices within one poll slice and holds nothing that
        // needs this value.
    }
}

fn run(inner: &Inner) {
    loop {
        let arm = {
            let mut s = inner.state.lock();
            while !(s.stop || s.active && s.rung != s.armed) {
                inner.cv.wait(&mut s);
            }
            if s.stop {
                return;
            }
            s.armed
        };
        let ready = match crate::sys::poll::readable(&inner.fds, POLL_SLICE) {
            Ok(r) => r.iter().any(|&x| x),
            Err(e) => {
                tracing::warn!("watching transport descriptors failed: {e}");
                // Ring anyway: the waiting thread then polls every transport itself.
                true
            }
        };
        if ready {
            let mut s = inner.state.lock();
            if s.active && s.armed == arm {
                s.rung = arm;
                drop(s);
                (inner.waker)();
            }
        }
    }
}
