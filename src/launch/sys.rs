//! The launcher's operating-system calls: every `unsafe` block of `ferrorun` lives here.
//!
//! - [`SignalPipe`]: a self-pipe. A signal handler for SIGINT, SIGTERM, SIGHUP, SIGQUIT and
//!   SIGCHLD writes the signal number as one byte into a non-blocking pipe; the supervising
//!   thread waits on the read end with `poll(2)`, so it wakes at once when a rank exits or a
//!   signal arrives, and does all real work outside the handler. Other threads wake it by
//!   writing [`WAKE`] through a [`Waker`].
//! - [`peek_exit`]: `waitid(WNOWAIT)`, which reports that a rank exited *without* reaping it.
//!   An unreaped rank keeps its pid, and so its process group id, reserved, which makes
//!   [`signal_group`] on it safe from pid reuse until the launcher reaps it at the very end.
//! - [`die_with_parent`]: `PR_SET_PDEATHSIG`, run in the child between `fork` and `exec`.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

/// The byte a [`Waker`] writes into the pipe; no signal has number 0.
pub(crate) const WAKE: u8 = 0;

/// Signals the launcher handles itself: forwarded to every rank, then it exits 128 + signal.
pub(crate) const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Write end of the installed pipe, read by the signal handler; -1 when none is installed.
static PIPE_FD: AtomicI32 = AtomicI32::new(-1);
/// Only one [`SignalPipe`] may exist per process (signal dispositions are process-wide).
static INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    // SAFETY: `__errno_location` returns this thread's errno slot, valid for the thread's
    // lifetime. Only async-signal-safe calls (`write`) happen in between, and errno is
    // restored so the interrupted code never sees it change.
    unsafe {
        let errno = libc::__errno_location();
        let saved = *errno;
        let fd = PIPE_FD.load(Ordering::Relaxed);
        if fd >= 0 {
            let byte = sig as u8;
            // A full pipe drops the byte; harmless, the reader is already due to wake up.
            libc::write(fd, (&raw const byte).cast(), 1);
        }
        *errno = saved;
    }
}

/// Wakes the thread waiting in [`SignalPipe::wait`] from another thread.
///
/// It keeps the read end open too, so that waking after the [`SignalPipe`] is gone (a
/// background thread that outlives the launch) fills a pipe nobody reads instead of raising
/// SIGPIPE.
pub(crate) struct Waker {
    writer: std::io::PipeWriter,
    _reader: Arc<std::io::PipeReader>,
}

impl Waker {
    /// Makes the waiting thread return from [`SignalPipe::wait`] with a [`WAKE`] event.
    pub(crate) fn wake(&self) {
        // A full pipe means a wake-up is already pending: ignoring the error is correct.
        let _ = (&self.writer).write(&[WAKE]);
    }
}

/// The installed signal handlers and the pipe they write into; restores the previous
/// handlers when dropped.
pub(crate) struct SignalPipe {
    reader: Arc<std::io::PipeReader>,
    writer: std::io::PipeWriter,
    /// (signal, previous disposition) for every handler this pipe installed.
    previous: Vec<(i32, libc::sigaction)>,
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers are involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl SignalPipe {
    /// Creates the pipe and installs the handlers. A signal among [`FORWARDED`] that was
    /// ignored when the launcher started (`nohup`, a background job of a script) stays
    /// ignored, for the launcher and for its ranks.
    pub(crate) fn install() -> io::Result<SignalPipe> {
        if INSTALLED.swap(true, Ordering::AcqRel) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "another ferrorun launch is already running in this process",
            ));
        }
        let made = Self::make();
        if made.is_err() {
            INSTALLED.store(false, Ordering::Release);
        }
        made
    }

    fn make() -> io::Result<SignalPipe> {
        let (reader, writer) = std::io::pipe()?;
        set_nonblocking(reader.as_raw_fd())?;
        set_nonblocking(writer.as_raw_fd())?;
        PIPE_FD.store(writer.as_raw_fd(), Ordering::Release);
        let mut pipe = SignalPipe {
            reader: Arc::new(reader),
            writer,
            previous: Vec::new(),
        };
        for sig in FORWARDED.into_iter().chain([libc::SIGCHLD]) {
            // SAFETY: an all-zero `sigaction` is a valid value (SIG_DFL, empty mask, no flags).
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: querying the current disposition into a valid, writable struct.
            if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
                return Err(io::Error::last_os_error());
            }
            if sig != libc::SIGCHLD && old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            // SAFETY: as above, all-zero is a valid `sigaction`.
            let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
            new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            new.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
            // SAFETY: `new.sa_mask` is a valid sigset_t to initialise.
            unsafe { libc::sigemptyset(&mut new.sa_mask) };
            // SAFETY: `new` is fully initialised and its handler is async-signal-safe
            // (it only calls `write` and preserves errno).
            if unsafe { libc::sigaction(sig, &new, std::ptr::null_mut()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            pipe.previous.push((sig, old));
        }
        Ok(pipe)
    }

    /// A handle other threads use to wake [`SignalPipe::wait`].
    pub(crate) fn waker(&self) -> io::Result<Waker> {
        Ok(Waker {
            writer: self.writer.try_clone()?,
            _reader: self.reader.clone(),
        })
    }

    /// Waits until a byte is in the pipe or `timeout` passes (`None`: no limit), then returns
    /// every byte there: signal numbers and [`WAKE`]s.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> io::Result<Vec<u8>> {
        let ms = match timeout {
            None => -1,
            // Round up so that a deadline 0.4 ms away does not spin.
            Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
        };
        let mut pfd = libc::pollfd {
            fd: self.reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid array of one pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        self.drain()
    }

    /// Returns the bytes in the pipe now, without waiting.
    pub(crate) fn drain(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match (&*self.reader).read(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for (sig, old) in self.previous.drain(..).rev() {
            // SAFETY: restoring a disposition that `sigaction` itself reported earlier.
            unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
        }
        PIPE_FD.store(-1, Ordering::Release);
        INSTALLED.store(false, Ordering::Release);
    }
}

/// How a rank ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// It exited with this status.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

/// Reports whether process `pid` (a child of this process) has ended, without reaping it.
pub(crate) fn peek_exit(pid: u32) -> io::Result<Option<Termination>> {
    loop {
        // SAFETY: an all-zero siginfo_t is valid, and zeroing is required: with WNOHANG,
        // `si_pid` stays 0 when the child has not changed state.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is valid and writable; `pid` is our own unreaped child.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: `waitid` filled `info` for SIGCHLD (or left it zeroed), so the SIGCHLD
        // union members `si_pid` and `si_status` are the ones to read.
        let (who, status) = unsafe { (info.si_pid(), info.si_status()) };
        if who == 0 {
            return Ok(None);
        }
        return Ok(match info.si_code {
            libc::CLD_EXITED => Some(Termination::Exited(status)),
            libc::CLD_KILLED | libc::CLD_DUMPED => Some(Termination::Signaled(status)),
            _ => None,
        });
    }
}

/// Sends `sig` to every process of the process group `pgid`. Errors (the group is already
/// empty) are ignored: there is nothing left to signal.
pub(crate) fn signal_group(pgid: u32, sig: i32) {
    // SAFETY: plain syscall without pointers. The caller passes the group of one of its
    // unreaped ranks, so the id cannot belong to an unrelated process group.
    unsafe { libc::killpg(pgid as libc::pid_t, sig) };
}

/// Makes the child started by `cmd` receive SIGKILL when the thread that spawns it ends
/// (normally: when the launcher dies, even by SIGKILL).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, and calls only
    // async-signal-safe functions (`prctl`, `getppid`); it allocates nothing (an
    // `io::Error` from an OS code is not heap-allocated).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The launcher may have died before the prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// The conventional name of a signal, for messages (`SIGKILL`); `None` when unknown.
pub(crate) fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return None,
    })
}
