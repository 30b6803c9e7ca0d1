//! A communicator from an external store given as callbacks: how a host framework
//! (PyTorch's c10d `Store`, a scheduler's key-value service) lends ferrocomm its rendezvous.
//!
//! The caller fills a `ferrocomm_store_ops` with function pointers and a `void*` context;
//! ferrocomm's rendezvous calls them (on the thread that called
//! `ferrocomm_init_with_store`, and nowhere else today) and releases the context through
//! `release` when the communicator's world is gone. Values travel back through a *sink*:
//! a function pointer ferrocomm passes to each callback, which the callback calls once with
//! the value it read (or, on failure, the error text) and which copies the bytes.

use std::ffi::{CStr, c_char, c_void};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use ferrocomm_rs::InitOptions;
use ferrocomm_rs::rendezvous::Store;
use ferrocomm_rs::{Error, Result};

use crate::comm::{ferrocomm_comm_t, register};
use crate::error::{Fail, boundary, ferrocomm_result};
use crate::types::{out_ptr, put};

/// A callback's result: success.
pub const FERROCOMM_STORE_OK: i32 = 0;
/// A callback's result: the wait (`get`, `wait`) ran out of time.
pub const FERROCOMM_STORE_TIMEOUT: i32 = 1;
/// A callback's result: any other failure; the callback passed its message to the sink.
pub const FERROCOMM_STORE_ERROR: i32 = 2;

/// Where a store callback delivers bytes (a value it read, or an error message): call it at
/// most once per callback, with `sink_ctx` as given, `data` readable for `len` bytes (NULL
/// when `len` is 0). ferrocomm copies the bytes before it returns.
#[allow(non_camel_case_types)]
pub type ferrocomm_store_sink =
    Option<unsafe extern "C" fn(sink_ctx: *mut c_void, data: *const u8, len: usize)>;

/// An external key-value store, as callbacks over `ctx`, for `ferrocomm_init_with_store`.
/// Keys are NUL-terminated UTF-8 strings; values are bytes. Every callback returns
/// `FERROCOMM_STORE_OK`, `FERROCOMM_STORE_TIMEOUT` (waits only) or `FERROCOMM_STORE_ERROR`
/// (after passing a message to the sink), and receives a sink for its output. Every member
/// except `release` must be non-NULL; the callbacks must be safe to call from any thread.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ferrocomm_store_ops {
    /// Passed as the first argument of every callback.
    pub ctx: *mut c_void,
    /// Sets `key` to `value[0..len]` and wakes its waiters.
    pub set: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            key: *const c_char,
            value: *const u8,
            len: usize,
            sink: ferrocomm_store_sink,
            sink_ctx: *mut c_void,
        ) -> i32,
    >,
    /// Waits up to `timeout_ms` milliseconds for `key` and passes its value to the sink.
    pub get: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            key: *const c_char,
            timeout_ms: i64,
            sink: ferrocomm_store_sink,
            sink_ctx: *mut c_void,
        ) -> i32,
    >,
    /// Adds `delta` to the counter `key` (missing counts as 0; stored as decimal text) and
    /// stores the new value in `*result`.
    pub add: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            key: *const c_char,
            delta: i64,
            result: *mut i64,
            sink: ferrocomm_store_sink,
            sink_ctx: *mut c_void,
        ) -> i32,
    >,
    /// Atomically: if `key`'s value equals `expected[0..expected_len]` (with
    /// `expected_present` 0: if `key` is absent), sets it to `desired[0..desired_len]`.
    /// Passes the value stored afterwards to the sink. (c10d's `compare_set` treats an
    /// empty `expected` as "absent".)
    pub compare_set: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            key: *const c_char,
            expected: *const u8,
            expected_len: usize,
            expected_present: i32,
            desired: *const u8,
            desired_len: usize,
            sink: ferrocomm_store_sink,
            sink_ctx: *mut c_void,
        ) -> i32,
    >,
    /// Waits up to `timeout_ms` milliseconds until all `n` keys are set.
    pub wait: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            keys: *const *const c_char,
            n: usize,
            timeout_ms: i64,
            sink: ferrocomm_store_sink,
            sink_ctx: *mut c_void,
        ) -> i32,
    >,
    /// For each of the `n` keys, stores 1 in `present[i]` if it is set now, else 0.
    pub check: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            keys: *const *const c_char,
            n: usize,
            present: *mut u8,
            sink: ferrocomm_store_sink,
            sink_ctx: *mut c_void,
        ) -> i32,
    >,
    /// Deletes `key`; stores 1 in `*existed` if it was set, else 0.
    pub delete_key: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            key: *const c_char,
            existed: *mut u8,
            sink: ferrocomm_store_sink,
            sink_ctx: *mut c_void,
        ) -> i32,
    >,
    /// Called once with `ctx` when ferrocomm no longer needs the store (the communicator's
    /// world is gone, or the init failed). May be NULL.
    pub release: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
}

/// Copies what a callback passes to its sink.
///
/// # Safety
/// `sink_ctx` is the `Vec<u8>` ferrocomm passed; `data` is readable for `len` bytes.
unsafe extern "C" fn sink(sink_ctx: *mut c_void, data: *const u8, len: usize) {
    if sink_ctx.is_null() {
        return;
    }
    // SAFETY: ferrocomm passes a pointer to a live `Vec<u8>` it owns for the callback's
    // duration; no one else touches it meanwhile.
    let out = unsafe { &mut *sink_ctx.cast::<Vec<u8>>() };
    out.clear();
    if len > 0 && !data.is_null() {
        // SAFETY: readable for `len` bytes by the sink's contract.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(data, len) });
    }
}

/// The callbacks as a ferrocomm [`Store`].
struct ExtStore {
    ops: ferrocomm_store_ops,
}

// SAFETY: the caller of `ferrocomm_init_with_store` promises that the callbacks and `ctx`
// may be used from any thread, concurrently (documented on `ferrocomm_store_ops`).
unsafe impl Send for ExtStore {}
// SAFETY: as above.
unsafe impl Sync for ExtStore {}

impl Drop for ExtStore {
    fn drop(&mut self) {
        if let Some(release) = self.ops.release {
            // SAFETY: called once, with the context the caller gave, as documented.
            unsafe { release(self.ops.ctx) };
        }
    }
}

fn key_c(op: &str, key: &str) -> Result<std::ffi::CString> {
    std::ffi::CString::new(key)
        .map_err(|_| Error::invalid(op, "key", format!("{key:?} contains NUL")))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ExtStore {
    /// Turns a callback's return code and sink output into a result.
    fn check_rc(&self, op: &str, what: &str, rc: i32, out: &[u8], waited: Duration) -> Result<()> {
        match rc {
            FERROCOMM_STORE_OK => Ok(()),
            FERROCOMM_STORE_TIMEOUT => Err(Error::Timeout {
                op: format!("external store {op}"),
                waited,
                detail: format!("still waiting for {what} in {}", self.describe()),
            }),
            _ => Err(Error::io(
                format!("external store {op} of {what}"),
                std::io::Error::other(if out.is_empty() {
                    format!("the callback failed with code {rc} and no message")
                } else {
                    String::from_utf8_lossy(out).into_owned()
                }),
            )),
        }
    }

    fn keys_c(op: &str, keys: &[&str]) -> Result<(Vec<std::ffi::CString>, Vec<*const c_char>)> {
        let owned = keys
            .iter()
            .map(|k| key_c(op, k))
            .collect::<Result<Vec<_>>>()?;
        let ptrs = owned.iter().map(|k| k.as_ptr()).collect();
        Ok((owned, ptrs))
    }
}

/// A NULL callback: refused by `ferrocomm_init_with_store` before an `ExtStore` exists.
fn missing(name: &str) -> Error {
    Error::invalid("external store", name, "the callback is NULL")
}

impl Store for ExtStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let f = self.ops.set.ok_or_else(|| missing("set"))?;
        let k = key_c("set", key)?;
        let mut out = Vec::new();
        // SAFETY: valid key and value for the call's duration; the sink context is `out`.
        let rc = unsafe {
            f(
                self.ops.ctx,
                k.as_ptr(),
                value.as_ptr(),
                value.len(),
                Some(sink),
                ptr::from_mut(&mut out).cast(),
            )
        };
        self.check_rc("set", key, rc, &out, Duration::ZERO)
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let f = self.ops.get.ok_or_else(|| missing("get"))?;
        let k = key_c("get", key)?;
        let mut out = Vec::new();
        // SAFETY: as in `set`.
        let rc = unsafe {
            f(
                self.ops.ctx,
                k.as_ptr(),
                millis(timeout),
                Some(sink),
                ptr::from_mut(&mut out).cast(),
            )
        };
        self.check_rc("get", key, rc, &out, timeout)?;
        Ok(out)
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if self.check(&[key])?.first().copied().unwrap_or(false) {
            // Set now; keys are not deleted during a rendezvous, so this does not wait.
            self.get(key, Duration::from_secs(60)).map(Some)
        } else {
            Ok(None)
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let f = self.ops.add.ok_or_else(|| missing("add"))?;
        let k = key_c("add", key)?;
        let mut out = Vec::new();
        let mut result = 0i64;
        // SAFETY: as in `set`; `result` is writable.
        let rc = unsafe {
            f(
                self.ops.ctx,
                k.as_ptr(),
                delta,
                &mut result,
                Some(sink),
                ptr::from_mut(&mut out).cast(),
            )
        };
        self.check_rc("add", key, rc, &out, Duration::ZERO)?;
        Ok(result)
    }

    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        let f = self.ops.compare_set.ok_or_else(|| missing("compare_set"))?;
        let k = key_c("compare_set", key)?;
        let mut out = Vec::new();
        let (e, elen, present) = match expected {
            Some(e) => (e.as_ptr(), e.len(), 1),
            None => (ptr::null(), 0, 0),
        };
        // SAFETY: as in `set`.
        let rc = unsafe {
            f(
                self.ops.ctx,
                k.as_ptr(),
                e,
                elen,
                present,
                desired.as_ptr(),
                desired.len(),
                Some(sink),
                ptr::from_mut(&mut out).cast(),
            )
        };
        self.check_rc("compare_set", key, rc, &out, Duration::ZERO)?;
        Ok(out)
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let f = self.ops.wait.ok_or_else(|| missing("wait"))?;
        let (_owned, ptrs) = Self::keys_c("wait", keys)?;
        let mut out = Vec::new();
        // SAFETY: `ptrs` points at `keys.len()` NUL-terminated strings kept alive by `_owned`.
        let rc = unsafe {
            f(
                self.ops.ctx,
                ptrs.as_ptr(),
                ptrs.len(),
                millis(timeout),
                Some(sink),
                ptr::from_mut(&mut out).cast(),
            )
        };
        self.check_rc("wait", &keys.join(", "), rc, &out, timeout)
    }

    fn check(&self, keys: &[&str]) -> Result<Vec<bool>> {
        let f = self.ops.check.ok_or_else(|| missing("check"))?;
        let (_owned, ptrs) = Self::keys_c("check", keys)?;
        let mut out = Vec::new();
        let mut present = vec![0u8; keys.len()];
        // SAFETY: as in `wait`; `present` is writable for `keys.len()` bytes.
        let rc = unsafe {
            f(
                self.ops.ctx,
                ptrs.as_ptr(),
                ptrs.len(),
                present.as_mut_ptr(),
                Some(sink),
                ptr::from_mut(&mut out).cast(),
            )
        };
        self.check_rc("check", &keys.join(", "), rc, &out, Duration::ZERO)?;
        Ok(present.into_iter().map(|b| b != 0).collect())
    }

    fn delete(&self, key: &str) -> Result<bool> {
        let f = self.ops.delete_key.ok_or_else(|| missing("delete_key"))?;
        let k = key_c("delete", key)?;
        let mut out = Vec::new();
        let mut existed = 0u8;
        // SAFETY: as in `set`; `existed` is writable.
        let rc = unsafe {
            f(
                self.ops.ctx,
                k.as_ptr(),
                &mut existed,
                Some(sink),
                ptr::from_mut(&mut out).cast(),
            )
        };
        self.check_rc("delete", key, rc, &out, Duration::ZERO)?;
        Ok(existed != 0)
    }

    fn describe(&self) -> String {
        "an external store (callbacks given to ferrocomm_init_with_store)".to_owned()
    }
}

/// Joins a job through an external store given as callbacks (PyTorch's c10d store, handed
/// to a process group's backend) and makes its communicator: what `ferrocomm_init_url` does,
/// except that ferrocomm neither hosts nor opens a store. Everything is written under
/// `job/<job_id>/` of the store (`FERROCOMM_JOB_ID`, default "default"); give each
/// communicator a store of its own (a prefixed view), as c10d does for each process group.
///
/// - `ops`: the store; copied, so the struct itself may be freed after the call, but `ctx`
///   and the callbacks must stay valid until `ops->release` is called (on failure: before
///   this function returns; on success: when the last communicator of the world is freed).
/// - `world_size`, `rank`: as `ferrocomm_init_url` (-1: from the environment).
/// - `url`: NULL, or an init URL (`tcp://HOST:PORT`, `env://`) used only to pick the
///   interface the transports listen on (the one facing HOST). NULL: `env://` when
///   `MASTER_ADDR` is set, else the address of this machine's hostname.
/// - `timeout_ms`: how long the rendezvous may take, or 0 for `FERROCOMM_TIMEOUT`.
///
/// Blocking: collective over the job, as `ferrocomm_init`; the callbacks run on the calling
/// thread. Ownership: on success `*comm` is a new handle (`ferrocomm_comm_free`); NULL on
/// failure.
///
/// Errors: `INVALID_ARGUMENT` (`ops` or `comm` NULL, a NULL callback other than `release`,
/// `url` not UTF-8, `world_size`/`rank`/`timeout_ms` below their range), `CONFIG`,
/// `TIMEOUT`, `JOB_MISMATCH`, `PEER_LOST`, `IO` (a callback failed: its message is included).
///
/// # Safety
/// `ops` must be NULL or point to a readable `ferrocomm_store_ops` whose callbacks keep the
/// contracts above; `url` NULL or NUL-terminated; `comm` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_init_with_store(
    ops: *const ferrocomm_store_ops,
    world_size: i64,
    rank: i64,
    url: *const c_char,
    timeout_ms: i64,
    comm: *mut *mut ferrocomm_comm_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_init_with_store";
    boundary(OP, || {
        if ops.is_null() {
            return Err(Fail::invalid(OP, "ops", "NULL"));
        }
        // SAFETY: non-null and readable by the caller's contract.
        let ops = unsafe { *ops };
        // From here on the store owns `ctx`: dropping it (on any failure) calls `release`.
        let store = ExtStore { ops };
        out_ptr(OP, "comm", comm)?;
        // SAFETY: checked non-null; valid for writes by the caller's contract.
        unsafe { put(comm, ptr::null_mut()) };
        let names = [
            ("set", ops.set.is_none()),
            ("get", ops.get.is_none()),
            ("add", ops.add.is_none()),
            ("compare_set", ops.compare_set.is_none()),
            ("wait", ops.wait.is_none()),
            ("check", ops.check.is_none()),
            ("delete_key", ops.delete_key.is_none()),
        ];
        if let Some((name, _)) = names.iter().find(|(_, null)| *null) {
            return Err(Fail::invalid(
                OP,
                "ops",
                format!("the callback `{name}` is NULL"),
            ));
        }
        let mut opts = InitOptions::new();
        let url = if url.is_null() {
            None
        } else {
            // SAFETY: a NUL-terminated string by the caller's contract.
            Some(
                unsafe { CStr::from_ptr(url) }
                    .to_str()
                    .map_err(|_| Fail::invalid(OP, "url", "not valid UTF-8"))?
                    .to_owned(),
            )
        };
        let url = url.unwrap_or_else(|| {
            let master = std::env::var("MASTER_ADDR").is_ok_and(|v| !v.trim().is_empty())
                && std::env::var("MASTER_PORT").is_ok_and(|v| !v.trim().is_empty());
            if master {
                "env://".to_owned()
            } else {
                // Never opened: only picks the hostname's address for the transports.
                "file:///ferrocomm-external-store".to_owned()
            }
        });
        opts = opts.init_method(&url);
        opts = match world_size {
            -1 => opts,
            n if n >= 0 => opts.world_size(n as usize),
            n => return Err(Fail::invalid(OP, "world_size", format!("{n} is below -1"))),
        };
        opts = match rank {
            -1 => opts,
            r if r >= 0 => opts.rank(r as usize),
            r => return Err(Fail::invalid(OP, "rank", format!("{r} is below -1"))),
        };
        opts = match timeout_ms {
            0 => opts,
            t if t > 0 => opts.timeout(Duration::from_millis(t as u64)),
            t => return Err(Fail::invalid(OP, "timeout_ms", format!("{t} is negative"))),
        };
        ferrocomm_rs::init_logging();
        let c = opts.init_with_store(Arc::new(store))?;
        // SAFETY: as above.
        unsafe { put(comm, register(c)) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// An in-memory store behind the callbacks, as a host framework would lend one.
    #[derive(Default)]
    struct Mem {
        map: Mutex<HashMap<String, Vec<u8>>>,
        released: std::sync::atomic::AtomicBool,
    }

    fn mem(ctx: *mut c_void) -> &'static Mem {
        // SAFETY: the tests pass a pointer to a `Mem` that outlives the communicator.
        unsafe { &*ctx.cast::<Mem>() }
    }

    fn key(k: *const c_char) -> String {
        // SAFETY: ferrocomm passes NUL-terminated keys.
        unsafe { CStr::from_ptr(k) }.to_string_lossy().into_owned()
    }

    fn give(s: ferrocomm_store_sink, sc: *mut c_void, v: &[u8]) {
        if let Some(f) = s {
            // SAFETY: the sink ferrocomm passed, with its context.
            unsafe { f(sc, v.as_ptr(), v.len()) };
        }
    }

    unsafe extern "C" fn set(
        ctx: *mut c_void,
        k: *const c_char,
        v: *const u8,
        n: usize,
        _s: ferrocomm_store_sink,
        _sc: *mut c_void,
    ) -> i32 {
        let v = if n == 0 {
            Vec::new()
        } else {
            // SAFETY: `v` is readable for `n` bytes.
            unsafe { std::slice::from_raw_parts(v, n) }.to_vec()
        };
        mem(ctx).map.lock().unwrap().insert(key(k), v);
        FERROCOMM_STORE_OK
    }

    unsafe extern "C" fn get(
        ctx: *mut c_void,
        k: *const c_char,
        _t: i64,
        s: ferrocomm_store_sink,
        sc: *mut c_void,
    ) -> i32 {
        match mem(ctx).map.lock().unwrap().get(&key(k)) {
            Some(v) => {
                give(s, sc, v);
                FERROCOMM_STORE_OK
            }
            None => FERROCOMM_STORE_TIMEOUT,
        }
    }

    unsafe extern "C" fn add(
        ctx: *mut c_void,
        k: *const c_char,
        d: i64,
        out: *mut i64,
        _s: ferrocomm_store_sink,
        _sc: *mut c_void,
    ) -> i32 {
        let mut m = mem(ctx).map.lock().unwrap();
        let e = m.entry(key(k)).or_insert_with(|| b"0".to_vec());
        let n: i64 = String::from_utf8_lossy(e).parse().unwrap_or(0) + d;
        *e = n.to_string().into_bytes();
        // SAFETY: writable by the callback contract.
        unsafe { *out = n };
        FERROCOMM_STORE_OK
    }

    #[allow(clippy::too_many_arguments)]
    unsafe extern "C" fn cas(
        ctx: *mut c_void,
        k: *const c_char,
        _e: *const u8,
        _en: usize,
        present: i32,
        d: *const u8,
        dn: usize,
        s: ferrocomm_store_sink,
        sc: *mut c_void,
    ) -> i32 {
        assert_eq!(
            present, 0,
            "ferrocomm's rendezvous only asks for absent keys"
        );
        let mut m = mem(ctx).map.lock().unwrap();
        // SAFETY: readable for `dn` bytes.
        let d = unsafe { std::slice::from_raw_parts(d, dn) }.to_vec();
        let v = m.entry(key(k)).or_insert(d).clone();
        give(s, sc, &v);
        FERROCOMM_STORE_OK
    }

    fn keys(ks: *const *const c_char, n: usize) -> Vec<String> {
        // SAFETY: `n` key pointers.
        (0..n).map(|i| key(unsafe { *ks.add(i) })).collect()
    }

    unsafe extern "C" fn wait(
        ctx: *mut c_void,
        ks: *const *const c_char,
        n: usize,
        _t: i64,
        _s: ferrocomm_store_sink,
        _sc: *mut c_void,
    ) -> i32 {
        let m = mem(ctx).map.lock().unwrap();
        if keys(ks, n).iter().all(|k| m.contains_key(k)) {
            FERROCOMM_STORE_OK
        } else {
            FERROCOMM_STORE_TIMEOUT
        }
    }

    unsafe extern "C" fn check(
        ctx: *mut c_void,
        ks: *const *const c_char,
        n: usize,
        out: *mut u8,
        _s: ferrocomm_store_sink,
        _sc: *mut c_void,
    ) -> i32 {
        let m = mem(ctx).map.lock().unwrap();
        for (i, k) in keys(ks, n).iter().enumerate() {
            // SAFETY: `n` writable bytes.
            unsafe { *out.add(i) = m.contains_key(k) as u8 };
        }
        FERROCOMM_STORE_OK
    }

    unsafe extern "C" fn delete(
        ctx: *mut c_void,
        k: *const c_char,
        out: *mut u8,
        _s: ferrocomm_store_sink,
        _sc: *mut c_void,
    ) -> i32 {
        let had = mem(ctx).map.lock().unwrap().remove(&key(k)).is_some();
        // SAFETY: writable.
        unsafe { *out = had as u8 };
        FERROCOMM_STORE_OK
    }

    unsafe extern "C" fn failing_set(
        _ctx: *mut c_void,
        _k: *const c_char,
        _v: *const u8,
        _n: usize,
        s: ferrocomm_store_sink,
        sc: *mut c_void,
    ) -> i32 {
        give(s, sc, b"the host store is gone");
        FERROCOMM_STORE_ERROR
    }

    unsafe extern "C" fn release(ctx: *mut c_void) {
        mem(ctx)
            .released
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn last_message() -> String {
        // SAFETY: a NUL-terminated string owned by the library (or NULL).
        let p = crate::ferrocomm_last_error();
        if p.is_null() {
            return String::new();
        }
        // SAFETY: as above.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn ops(m: &Mem) -> ferrocomm_store_ops {
        ferrocomm_store_ops {
            ctx: ptr::from_ref(m).cast_mut().cast(),
            set: Some(set),
            get: Some(get),
            add: Some(add),
            compare_set: Some(cas),
            wait: Some(wait),
            check: Some(check),
            delete_key: Some(delete),
            release: Some(release),
        }
    }

    #[test]
    fn one_rank_joins_through_callbacks_and_releases_the_store() {
        let m: &'static Mem = Box::leak(Box::default());
        let o = ops(m);
        let mut comm = ptr::null_mut();
        // SAFETY: valid ops and out pointer.
        let rc = unsafe {
            ferrocomm_init_with_store(&o, 1, 0, c"tcp://127.0.0.1:1".as_ptr(), 20_000, &mut comm)
        };
        assert_eq!(rc, ferrocomm_result::FERROCOMM_OK, "{}", last_message());
        assert!(
            m.map.lock().unwrap().keys().any(|k| k.starts_with("job/")),
            "the rendezvous wrote to the store"
        );
        assert_eq!(
            crate::ferrocomm_barrier(comm),
            ferrocomm_result::FERROCOMM_OK
        );
        assert!(!m.released.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(
            crate::ferrocomm_comm_free(comm),
            ferrocomm_result::FERROCOMM_OK
        );
        assert!(
            m.released.load(std::sync::atomic::Ordering::SeqCst),
            "release runs when the world is gone"
        );
    }

    #[test]
    fn a_failing_callback_is_an_error_with_its_message_and_releases() {
        let m: &'static Mem = Box::leak(Box::default());
        let mut o = ops(m);
        o.set = Some(failing_set);
        o.compare_set = Some(cas);
        let mut comm = ptr::null_mut();
        // SAFETY: valid ops and out pointer.
        let rc = unsafe { ferrocomm_init_with_store(&o, 2, 1, ptr::null(), 5_000, &mut comm) };
        assert_ne!(rc, ferrocomm_result::FERROCOMM_OK);
        assert!(comm.is_null());
        let msg = last_message();
        assert!(msg.contains("the host store is gone"), "{msg}");
        assert!(m.released.load(std::sync::atomic::Ordering::SeqCst));
        o.get = None;
        // SAFETY: as above.
        let rc = unsafe { ferrocomm_init_with_store(&o, 1, 0, ptr::null(), 0, &mut comm) };
        assert_eq!(rc, ferrocomm_result::FERROCOMM_ERR_INVALID_ARGUMENT);
    }
}
