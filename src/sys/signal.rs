//! Signal dispositions the runtime depends on.

use std::sync::Once;

/// Makes a write to a socket whose peer has gone fail with `EPIPE` instead of killing the
/// process with `SIGPIPE`, when the process still has the default disposition.
///
/// ferrocomm writes to sockets (the store, the TCP transport) whose other end may close at
/// any moment: a peer that fails a collective closes its connections after its notices, and
/// a rank that dies closes them all. Each such write must become an error that names the
/// peer, never the silent death of the writing process. Rust programs and Python ignore
/// `SIGPIPE` already; C and C++ programs using the C ABI keep the default (terminate), so
/// the first `init` sets it to "ignore" then. A program that installed its own handler, or
/// ignores the signal already, is left as it is (like gRPC and ZeroMQ's users expect). The
/// one visible effect on a C program: a write to a closed pipe (`prog | head`) returns
/// `EPIPE` instead of ending the program.
pub(crate) fn ignore_sigpipe_if_default() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: `sigaction` with a null new action only reads the current disposition
        // into `old`, a zeroed `sigaction` owned by this frame.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above; SIGPIPE is a valid signal number and `old` is writable.
        let rc = unsafe { libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old) };
        if rc == 0 && old.sa_sigaction == libc::SIG_DFL {
            // SAFETY: installs SIG_IGN for SIGPIPE; no handler code runs, so no
            // async-signal-safety requirement arises.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            tracing::debug!("SIGPIPE was at its default (terminate): now ignored, so a closed socket is an error");
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn sigpipe_is_ignored_after_the_call() {
        super::ignore_sigpipe_if_default();
        // SAFETY: reads the current disposition only.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let rc = unsafe { libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old) };
        assert_eq!(rc, 0);
        // The Rust test harness ignores SIGPIPE already; either way it is not the default.
        assert_ne!(old.sa_sigaction, libc::SIG_DFL);
    }
}
