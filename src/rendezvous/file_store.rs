//! [`FileStore`]: the store of `file://` jobs, one file on a file system every process sees.
//!
//! # Semantics
//!
//! - The file is an append-only log of records, `set key value` or `delete key`; the store's
//!   state is the log replayed in order. Every process of the job opens the same path.
//! - Every operation takes an `flock` on the file (shared to read, exclusive to write), reads
//!   the records appended since its last operation, and — for writes — appends one record
//!   before unlocking. `add` and `compare_set` read and write under one exclusive lock, so they
//!   are atomic across processes. Within a process a mutex serialises the threads (an `flock`
//!   belongs to the open file, which the threads share).
//! - Waits (`get` of an absent key, `wait`) poll: re-read, then sleep 1 ms growing to 50 ms,
//!   until the keys are there or the timeout passes.
//! - Records are bounded like the TCP protocol's (key ≤ 4 KiB, value ≤ 64 MiB) and checked
//!   before allocating. A record cut short at the end of the file (a writer died mid-write) is
//!   ignored by readers and cut off by the next writer. Anything else that does not parse
//!   makes operations fail with [`Error::PeerMisbehaved`]: the file is not a ferrocomm store,
//!   or was damaged.
//! - The file only grows (bootstrap writes a few records per rank). It is not removed by the
//!   store: use a fresh path for every run and delete it afterwards. A file left from an
//!   earlier run would be read as this run's state (bootstrap notices and reports duplicate
//!   ranks or too many processes rather than joining a wrong world). Do not delete or
//!   replace the file while a job uses it; a file that shrinks is re-read from the start.
//! - File systems: any local one; NFS (Linux emulates `flock` with NFS byte-range locks, and
//!   taking the lock revalidates the client's cache); Lustre mounted with `-o flock`; GPFS.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::protocol::{MAX_KEY_LEN, MAX_VALUE_LEN};
use super::store::Store;
use crate::error::{Error, IoContext, Result};

const RECORD_MAGIC: u32 = 0xFC0C_F11E;
const RECORD_HEADER_LEN: usize = 16;
const OP_SET: u8 = 1;
const OP_DELETE: u8 = 2;
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(50);

/// A [`Store`] kept in one file on a shared file system (see the module docs).
pub struct FileStore {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.path)
            .finish()
    }
}

struct Inner {
    file: File,
    state: State,
}

/// What this process has read of the log.
struct State {
    /// Bytes of the log applied to `map`.
    offset: u64,
    map: HashMap<String, Vec<u8>>,
}

/// An `flock` held on a file until dropped.
struct Flock<'a> {
    file: &'a File,
}

impl<'a> Flock<'a> {
    fn take(file: &'a File, exclusive: bool) -> io::Result<Flock<'a>> {
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock only reads the descriptor number, which `file` keeps open for the
            // duration of the call (and of the returned guard).
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Flock { file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        // SAFETY: as in `take`: the descriptor is open for as long as `self.file` is borrowed.
        // Closing the file would release the lock too, so a failure here cannot leak it.
        unsafe {
            libc::flock(self.file.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

fn encode_record(op: u8, key: &str, value: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HEADER_LEN + key.len() + value.len());
    r.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    r.extend_from_slice(&[op, 0, 0, 0]);
    r.extend_from_slice(&(key.len() as u32).to_le_bytes());
    r.extend_from_slice(&(value.len() as u32).to_le_bytes());
    r.extend_from_slice(key.as_bytes());
    r.extend_from_slice(value);
    r
}

impl FileStore {
    /// Opens (creating it if needed) the store file at `path`. The directory must exist.
    pub fn open(path: impl AsRef<Path>) -> Result<FileStore> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx(|| {
                format!(
                    "opening the file store {} (does the directory exist, on a file system all processes share?)",
                    path.display()
                )
            })?;
        let store = FileStore {
            path,
            inner: Mutex::new(Inner {
                file,
                state: State {
                    offset: 0,
                    map: HashMap::new(),
                },
            }),
        };
        // Fail now, not at the first operation, if the file is not a store.
        store.read(|_| ())?;
        Ok(store)
    }

    /// The path of the store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, at: u64, why: impl std::fmt::Display) -> Error {
        Error::misbehaved(
            format!("file store {}", self.path.display()),
            format!(
                "bad record at byte {at}: {why}; the file is not a ferrocomm store or was damaged \
                 (use a fresh path for every job)"
            ),
        )
    }

    /// Applies the records appended since the last call. Under an exclusive lock, a record
    /// cut short at the end (its writer died) is removed from the file.
    fn refresh(&self, file: &File, st: &mut State, exclusive: bool) -> Result<()> {
        let ctx = || format!("reading the file store {}", self.path.display());
        let len = file.metadata().ctx(ctx)?.len();
        if len < st.offset {
            tracing::warn!(
                "file store {}: the file shrank from {} to {len} bytes (deleted or replaced?); re-reading it",
                self.path.display(),
                st.offset
            );
            st.offset = 0;
            st.map.clear();
        }
        let mut pos = st.offset;
        let mut header = [0u8; RECORD_HEADER_LEN];
        while pos < len {
            if len - pos < RECORD_HEADER_LEN as u64 {
                break;
            }
            file.read_exact_at(&mut header, pos).ctx(ctx)?;
            let word = |at: usize| {
                u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
            };
            if word(0) != RECORD_MAGIC {
                return Err(self.corrupt(pos, format!("magic {:#010x}", word(0))));
            }
            let op = header[4];
            if !matches!(op, OP_SET | OP_DELETE) || header[5..8] != [0, 0, 0] {
                return Err(self.corrupt(pos, format!("unknown record kind {op}")));
            }
            let (key_len, value_len) = (word(8) as usize, word(12) as usize);
            if key_len > MAX_KEY_LEN
                || value_len > MAX_VALUE_LEN
                || (op == OP_DELETE && value_len != 0)
            {
                return Err(self.corrupt(pos, format!("impossible lengths {key_len}/{value_len}")));
            }
            let total = (RECORD_HEADER_LEN + key_len + value_len) as u64;
            if len - pos < total {
                break;
            }
            // Bounded by the limits checked above.
            let mut body = vec![0u8; key_len + value_len];
            file.read_exact_at(&mut body, pos + RECORD_HEADER_LEN as u64)
                .ctx(ctx)?;
            let value = body.split_off(key_len);
            let key = String::from_utf8(body).map_err(|_| self.corrupt(pos, "key is not UTF-8"))?;
            if op == OP_SET {
                st.map.insert(key, value);
            } else {
                st.map.remove(&key);
            }
            pos += total;
        }
        st.offset = pos;
        if pos < len && exclusive {
            tracing::warn!(
                "file store {}: discarding an incomplete record at byte {pos} (a process died while writing it)",
                self.path.display()
            );
            file.set_len(pos)
                .ctx(|| format!("truncating the file store {}", self.path.display()))?;
        }
        Ok(())
    }

    /// Runs `f` on the current state under a shared lock.
    fn read<T>(&self, f: impl FnOnce(&HashMap<String, Vec<u8>>) -> T) -> Result<T> {
        let mut guard = self.inner.lock();
        let Inner { file, state } = &mut *guard;
        let _lock = Flock::take(file, false)
            .ctx(|| format!("locking the file store {}", self.path.display()))?;
        self.refresh(file, state, false)?;
        Ok(f(&state.map))
    }

    /// Runs `f` on the current state under an exclusive lock; `f` returns the result and the
    /// record to append, if any.
    fn write<T>(
        &self,
        f: impl FnOnce(&HashMap<String, Vec<u8>>) -> Result<(T, Option<(u8, String, Vec<u8>)>)>,
    ) -> Result<T> {
        let mut guard = self.inner.lock();
        let Inner { file, state } = &mut *guard;
        let _lock = Flock::take(file, true)
            .ctx(|| format!("locking the file store {}", self.path.display()))?;
        self.refresh(file, state, true)?;
        let (out, record) = f(&state.map)?;
        if let Some((op, key, value)) = record {
            let rec = encode_record(op, &key, &value);
            file.write_all_at(&rec, state.offset)
                .ctx(|| format!("writing the file store {}", self.path.display()))?;
            state.offset += rec.len() as u64;
            if op == OP_SET {
                state.map.insert(key, value);
            } else {
                state.map.remove(&key);
            }
        }
        Ok(out)
    }

    /// Polls `f` until it returns `Some` or `timeout` passes; then `missing` names the keys.
    fn poll<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&HashMap<String, Vec<u8>>) -> std::result::Result<T, Vec<String>>,
    ) -> Result<T> {
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        let mut pause = POLL_MIN;
        loop {
            let missing = match self.read(&mut f)? {
                Ok(v) => return Ok(v),
                Err(missing) => missing,
            };
            let now = Instant::now();
            let remaining = deadline.map_or(POLL_MAX, |d| d.saturating_duration_since(now));
            if remaining.is_zero() {
                let mut shown: Vec<String> =
                    missing.iter().take(20).map(|k| format!("{k:?}")).collect();
                if missing.len() > 20 {
                    shown.push(format!("and {} more", missing.len() - 20));
                }
                return Err(Error::Timeout {
                    op: format!("store {what}"),
                    waited: now - start,
                    detail: format!(
                        "keys not set: {} (store {})",
                        shown.join(", "),
                        self.describe()
                    ),
                });
            }
            std::thread::sleep(pause.min(remaining));
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    fn check_key(&self, op: &str, key: &str) -> Result<()> {
        if key.len() > MAX_KEY_LEN {
            return Err(Error::invalid(
                format!("Store::{op}"),
                "key",
                format!(
                    "{} bytes is longer than the limit of {MAX_KEY_LEN}",
                    key.len()
                ),
            ));
        }
        Ok(())
    }

    fn check_value(&self, op: &str, value: &[u8]) -> Result<()> {
        if value.len() > MAX_VALUE_LEN {
            return Err(Error::invalid(
                format!("Store::{op}"),
                "value",
                format!(
                    "{} bytes is longer than the limit of {MAX_VALUE_LEN}",
                    value.len()
                ),
            ));
        }
        Ok(())
    }
}

impl Store for FileStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.check_key("set", key)?;
        self.check_value("set", value)?;
        self.write(|_| Ok(((), Some((OP_SET, key.to_owned(), value.to_vec())))))
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.check_key("get", key)?;
        self.poll("get", timeout, |m| {
            m.get(key).cloned().ok_or_else(|| vec![key.to_owned()])
        })
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.check_key("try_get", key)?;
        self.read(|m| m.get(key).cloned())
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.check_key("add", key)?;
        self.write(|m| {
            let current = match m.get(key) {
                None => 0,
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.trim().parse::<i64>().ok())
                    .ok_or_else(|| {
                        Error::invalid(
                            "Store::add",
                            "key",
                            format!("the value of key {key:?} is not a counter (the decimal text of an i64)"),
                        )
                    })?,
            };
            let new = current.checked_add(delta).ok_or_else(|| {
                Error::invalid("Store::add", "delta", format!("counter {key:?} overflows: {current} + {delta}"))
            })?;
            Ok((new, Some((OP_SET, key.to_owned(), new.to_string().into_bytes()))))
        })
    }

    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        self.check_key("compare_set", key)?;
        self.check_value("compare_set", desired)?;
        self.write(|m| {
            let current = m.get(key);
            if current.map(Vec::as_slice) == expected {
                Ok((
                    desired.to_vec(),
                    Some((OP_SET, key.to_owned(), desired.to_vec())),
                ))
            } else {
                Ok((current.cloned().unwrap_or_default(), None))
            }
        })
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        for k in keys {
            self.check_key("wait", k)?;
        }
        self.poll("wait", timeout, |m| {
            let missing: Vec<String> = keys
                .iter()
                .filter(|k| !m.contains_key(**k))
                .map(|k| (*k).to_owned())
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(missing)
            }
        })
    }

    fn check(&self, keys: &[&str]) -> Result<Vec<bool>> {
        self.read(|m| keys.iter().map(|k| m.contains_key(*k)).collect())
    }

    fn delete(&self, key: &str) -> Result<bool> {
        self.check_key("delete", key)?;
        self.write(|m| {
            if m.contains_key(key) {
                Ok((true, Some((OP_DELETE, key.to_owned(), Vec::new()))))
            } else {
                Ok((false, None))
            }
        })
    }

    fn describe(&self) -> String {
        format!("file://{}", self.path.display())
    }
}
