//! Watching another process's lifetime without races on recycled pids.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A handle on a process that tells whether it still runs.
///
/// Uses a pidfd (`pidfd_open`, Linux 5.3) where the kernel has one: it refers to exactly
/// that process, even after its pid is reused. Elsewhere falls back to `kill(pid, 0)`.
#[derive(Debug)]
pub(crate) struct PidFd {
    pid: u32,
    fd: Option<OwnedFd>,
}

impl PidFd {
    /// Opens a handle on `pid`. Fails with `ESRCH` if it is already gone.
    pub(crate) fn open(pid: u32) -> io::Result<PidFd> {
        // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
        if fd >= 0 {
            // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            return Ok(PidFd { pid, fd: Some(fd) });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EPERM) => {
                let me = PidFd { pid, fd: None };
                if me.alive() {
                    Ok(me)
                } else {
                    Err(io::Error::from_raw_os_error(libc::ESRCH))
                }
            }
            _ => Err(e),
        }
    }

    /// Whether the process still runs (a zombie counts as gone).
    pub(crate) fn alive(&self) -> bool {
        match &self.fd {
            Some(fd) => {
                // A pidfd polls readable once the process has exited.
                !matches!(super::poll::readable(&[fd.as_raw_fd()], std::time::Duration::ZERO),
                    Ok(v) if v.first().copied().unwrap_or(false))
            }
            None => {
                // SAFETY: kill with signal 0 sends nothing; it only checks the pid exists.
                let rc = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
                rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_a_child_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let p = PidFd::open(child.id()).unwrap();
        assert!(p.alive());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!p.alive());
        assert!(PidFd::open(std::process::id()).unwrap().alive());
    }
}
