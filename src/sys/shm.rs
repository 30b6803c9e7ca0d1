//! POSIX shared-memory objects (`/dev/shm`) and their mappings.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

/// Where POSIX shared-memory objects appear in the file system on Linux.
pub(crate) const SHM_DIR: &str = "/dev/shm";

/// A shared, read-write mapping of a whole shared-memory object. Unmapped on drop. The
/// memory is zero-filled when the object is created.
///
/// The mapping hands out only a raw base pointer: what lives inside (atomics, ring bytes)
/// is interpreted by the transport, which is where the rules for concurrent access are.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; sharing the base pointer between
// threads is sound because all access through it goes through atomics or through the ring
// protocol, which the transport documents.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes the base address and length.
unsafe impl Sync for Mapping {}

fn c_name(name: &str) -> io::Result<CString> {
    if !name.starts_with('/') || name[1..].contains('/') || name.len() > 250 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad shared-memory object name {name:?}"),
        ));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

fn map(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
    // SAFETY: a fresh shared mapping at an address the kernel chooses; `fd` is a valid open
    // descriptor of an object at least `len` bytes long; nothing else is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base =
        NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
    Ok(Mapping { base, len })
}

impl Mapping {
    /// Creates the object `name` (`/something`, must not exist), sizes it to `len` bytes
    /// (zero-filled) and maps it. Readable and writable by the owner only.
    pub(crate) fn create(name: &str, len: usize) -> io::Result<Mapping> {
        let c = c_name(name)?;
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        let fd = super::syscall!(shm_open(
            c.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC,
            0o600 as libc::mode_t
        ))?;
        // SAFETY: shm_open just returned this descriptor; we own it from here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sized = super::syscall!(ftruncate(fd.as_raw_fd(), len as libc::off_t));
        let mapped = sized.and_then(|_| map(&fd, len));
        if mapped.is_err() {
            let _ = unlink(name);
        }
        mapped
    }

    /// Maps the existing object `name`, whose size must be at least `min_len`; returns the
    /// mapping of its whole length.
    pub(crate) fn open(name: &str, min_len: usize) -> io::Result<Mapping> {
        let c = c_name(name)?;
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        let fd = super::syscall!(shm_open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC, 0))?;
        // SAFETY: shm_open just returned this descriptor; we own it from here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid `stat`; fstat overwrites it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable stat buffer on our stack.
        super::syscall!(fstat(fd.as_raw_fd(), &mut st))?;
        let len = st.st_size as usize;
        if len < min_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("shared-memory object {name} has {len} bytes, expected at least {min_len}"),
            ));
        }
        map(&fd, len)
    }

    /// The first byte of the mapping (page aligned).
    pub(crate) fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned; after drop nobody holds a
        // reference into the mapping (users keep an `Arc<Mapping>` as long as they use it).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Removes the name `name` (the memory stays while mapped). `NotFound` if already gone.
pub(crate) fn unlink(name: &str) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    super::syscall!(shm_unlink(c.as_ptr())).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_open_unlink() {
        let name = format!("/ferrocomm-test-sys-{}", std::process::id());
        let a = Mapping::create(&name, 8192).unwrap();
        assert!(Mapping::create(&name, 8192).is_err(), "O_EXCL");
        let b = Mapping::open(&name, 4096).unwrap();
        assert_eq!(b.len(), 8192);
        assert!(Mapping::open(&name, 1 << 20).is_err());
        unlink(&name).unwrap();
        assert_eq!(unlink(&name).unwrap_err().kind(), io::ErrorKind::NotFound);
        // SAFETY: both map the same 8 KiB object; byte 100 is in range; no other access.
        unsafe {
            *a.base().as_ptr().add(100) = 7;
            assert_eq!(*b.base().as_ptr().add(100), 7);
        }
        assert!(!std::path::Path::new(SHM_DIR).join(&name[1..]).exists());
    }
}
