//! Cross-memory attach: copying straight out of another process's memory
//! (`process_vm_readv`), the single-copy path of the shared-memory transport.

use std::io;

/// Copies `dst.len()` bytes from address `remote` in process `pid` into `dst`. Returns the
/// bytes copied (less than asked only if the remote range ends in unmapped memory). Errors:
/// `EPERM` (not allowed: ptrace policy, containers), `ENOSYS` (kernel without CMA), `ESRCH`
/// (the process is gone), `EFAULT` (the remote range is not mapped).
///
/// Safe: the kernel writes only into `dst`, which we borrow mutably; the remote address
/// is checked by the kernel against the other process's mappings, so a wrong address is
/// an error, never undefined behaviour here.
pub(crate) fn read(pid: u32, remote: u64, dst: &mut [u8]) -> io::Result<usize> {
    let mut done = 0usize;
    while done < dst.len() {
        let rest = &mut dst[done..];
        let local = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let remote_iov = libc::iovec {
            iov_base: (remote + done as u64) as usize as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: `local` describes memory we own mutably (`rest`) for the duration of the
        // call; `remote_iov` is only interpreted in the other process's address space by the
        // kernel, which validates it. Both iovec arrays have exactly one element.
        let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote_iov, 1, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// Copies `src` to address `remote` in process `pid` (`process_vm_writev`). Returns the
/// bytes copied; errors as for [`read`].
///
/// Safe for this process: the kernel only reads `src`. What it does to the other process is
/// the caller's responsibility: the shared-memory transport writes only into a buffer the
/// receiver lent for exactly this, and only while the receiver has not taken it back (see
/// the transport's split copies).
pub(crate) fn write(pid: u32, remote: u64, src: &[u8]) -> io::Result<usize> {
    let mut done = 0usize;
    while done < src.len() {
        let rest = &src[done..];
        let local = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let remote_iov = libc::iovec {
            iov_base: (remote + done as u64) as usize as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: `local` describes memory we borrow (`rest`), which the kernel only reads;
        // `remote_iov` is interpreted and validated in the other process's address space.
        let n =
            unsafe { libc::process_vm_writev(pid as libc::pid_t, &local, 1, &remote_iov, 1, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_memory() {
        let src: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        let n = super::read(std::process::id(), src.as_ptr() as u64, &mut dst).unwrap();
        assert_eq!(n, src.len());
        assert_eq!(src, dst);
        let mut dst2 = vec![0u8; src.len()];
        let n = super::write(std::process::id(), dst2.as_mut_ptr() as u64, &src).unwrap();
        assert_eq!(n, src.len());
        assert_eq!(src, dst2);
    }
}
