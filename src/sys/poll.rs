//! `poll(2)` on a handful of descriptors, for combining waits.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Waits up to `timeout` until one of `fds` is readable. Returns, per descriptor, whether it
/// is readable (or hung up / in error, which a reader must also act on). An interrupted
/// wait returns all `false`.
pub(crate) fn readable(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // Round a sub-millisecond non-zero timeout up so it is not a busy poll.
    let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures that the kernel may
    // write `revents` into during the call; we hold it mutably.
    let rc = super::syscall!(poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms));
    match rc {
        Ok(_) => Ok(pfds
            .iter()
            .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(vec![false; fds.len()]),
        Err(e) => Err(e),
    }
}
