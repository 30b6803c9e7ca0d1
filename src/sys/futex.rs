//! Futex wait and wake on a 32-bit word that may live in memory shared between processes.
//!
//! The operations deliberately do not use `FUTEX_PRIVATE_FLAG`: waiters and wakers are in
//! different processes (the word is in a shared mapping), and a private futex is keyed by
//! the address space, so a wake from another process would never reach the sleeper.

use std::time::Duration;

#[cfg(not(loom))]
use std::sync::atomic::AtomicU32;

// A loom build model-checks the ring's protocol only (`transport/shm/ring.rs`); the
// transport around it is compiled but never run, so the futex calls become yields.
#[cfg(loom)]
pub(crate) fn wait(_word: &crate::sync::AtomicU32, _expected: u32, _timeout: Duration) {
    loom::thread::yield_now();
}

#[cfg(loom)]
pub(crate) fn wake(_word: &crate::sync::AtomicU32, _n: i32) {}

#[cfg(not(loom))]
/// Sleeps while `*word == expected`, at most `timeout`. Returns when woken, when the value
/// differs (at once), on a signal or at the timeout; the caller re-checks its condition.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned 32-bit atomic for the duration of the call (it is
    // borrowed); the kernel only reads it. `ts` is a valid timespec on our stack; a relative
    // timeout is what FUTEX_WAIT takes. Errors (EAGAIN: the value changed, EINTR, ETIMEDOUT)
    // all mean "return and re-check", so the result is ignored.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

#[cfg(not(loom))]
/// Wakes up to `n` threads (of any process) sleeping in [`wait`] on `word`.
pub(crate) fn wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a valid, aligned 32-bit atomic (borrowed for the call); FUTEX_WAKE
    // does not access memory beyond looking up waiters keyed by this address.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    #[test]
    fn wait_returns_on_mismatch_timeout_and_wake() {
        let w = Arc::new(AtomicU32::new(1));
        // Value differs: returns at once.
        wait(&w, 0, Duration::from_secs(10));
        // Times out.
        let t = std::time::Instant::now();
        wait(&w, 1, Duration::from_millis(20));
        assert!(t.elapsed() >= Duration::from_millis(10));
        // Woken by another thread.
        let w2 = Arc::clone(&w);
        let h = std::thread::spawn(move || {
            while w2.load(Ordering::SeqCst) == 1 {
                wait(&w2, 1, Duration::from_secs(10));
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        w.store(2, Ordering::SeqCst);
        wake(&w, 1);
        h.join().unwrap();
    }
}
