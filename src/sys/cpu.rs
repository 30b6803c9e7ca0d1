//! How many CPUs the ranks of this host can use, for the spin-or-sleep decision.

/// CPUs online on this machine.
pub(crate) fn online() -> usize {
    // SAFETY: sysconf only reads a system setting.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 { n as usize } else { 1 }
}

/// CPUs in this process's affinity mask (`None` if it cannot be read).
pub(crate) fn affinity() -> Option<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed; pid 0 is this thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return None;
    }
    // SAFETY: CPU_COUNT only reads the set.
    Some(unsafe { libc::CPU_COUNT(&set) } as usize)
}
