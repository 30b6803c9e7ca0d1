//! The operating-system wall: every system call the shared-memory transport and the waiting
//! machinery need, behind safe functions.
//!
//! Like mio's `sys/unix`, this is the one place (with the shared-memory ring's core) that
//! holds `unsafe` for OS calls; everything above it works with owned handles
//! ([`shm::Mapping`], [`pidfd::PidFd`]) and plain slices. Each function documents what it
//! needs from its caller and why its `unsafe` block holds. Linux only (futexes, memfd-free
//! POSIX shared memory, `process_vm_readv`, pidfds).

pub(crate) mod cma;
pub(crate) mod cpu;
pub(crate) mod futex;
pub(crate) mod pidfd;
pub(crate) mod poll;
pub(crate) mod shm;
pub(crate) mod signal;

/// Calls a libc function that returns `-1` and sets `errno` on failure; evaluates to
/// `io::Result` of the return value.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: every use states, at the call site, why the arguments are valid for
        // this function; the macro only turns -1/errno into an io::Error.
        let res = unsafe { libc::$fn($($arg),*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
pub(crate) use syscall;
