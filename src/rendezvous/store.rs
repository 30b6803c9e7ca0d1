//! The key-value store every rank talks to during bootstrap, and the contract its
//! implementations keep.
//!
//! A store is how ranks find each other before any transport exists: each rank publishes
//! what its peers need (host identity, listening address) under a key and waits for the
//! keys of the others. Implementations: [`TcpStore`](super::TcpStore) (a server hosted by
//! rank 0 or by `ferrorun`, clients in every rank), [`FileStore`](super::FileStore) (a file
//! on a shared file system) and [`PrefixStore`], which namespaces another store so that
//! sub-groups and jobs can share one.
//!
//! Every blocking call takes a timeout and fails with [`Error::Timeout`] naming the keys it
//! was still waiting for; nothing in a store waits forever.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};

/// A key-value store shared by all ranks of a job.
///
/// Keys are UTF-8 strings, values are bytes. All methods are safe to call from several
/// threads at once. Counters written by [`Store::add`] are stored as the decimal text of an
/// `i64`, so `get` on a counter returns e.g. `b"3"`.
pub trait Store: Send + Sync {
    /// Sets `key` to `value`, replacing any previous value, and wakes every waiter on `key`.
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;

    /// Returns the value of `key`, waiting up to `timeout` for it to be set.
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>>;

    /// Returns the value of `key` if it is set, without waiting.
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Adds `delta` to the counter `key` (missing counts as 0) and returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;

    /// Atomically: if the current value of `key` equals `expected` (`None`: the key is
    /// absent), sets it to `desired`. Returns the value stored afterwards (`desired` on
    /// success, the current value otherwise).
    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>>;

    /// Waits up to `timeout` until every key in `keys` is set.
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()>;

    /// For each key, whether it is set now (no waiting).
    fn check(&self, keys: &[&str]) -> Result<Vec<bool>>;

    /// Deletes `key`; returns whether it existed.
    fn delete(&self, key: &str) -> Result<bool>;

    /// A human-readable address of the store for error messages (`tcp://10.0.0.1:29500`,
    /// `file:///shared/job`).
    fn describe(&self) -> String;
}

/// A view of another store in which every key is prefixed with `prefix/`.
///
/// Sub-communicators and concurrent jobs sharing one store each get their own prefix, so
/// their keys never collide.
#[derive(Clone)]
pub struct PrefixStore {
    prefix: String,
    inner: Arc<dyn Store>,
}

impl PrefixStore {
    /// Wraps `inner`; every key `k` becomes `prefix/k` there.
    pub fn new(prefix: impl Into<String>, inner: Arc<dyn Store>) -> Self {
        PrefixStore {
            prefix: prefix.into(),
            inner,
        }
    }

    /// The prefix this view adds (without the trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, key: &str) -> String {
        format!("{}/{}", self.prefix, key)
    }

    fn keys(&self, keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| self.key(k)).collect()
    }

    /// Restores the caller's key names in a timeout error raised by the inner store.
    fn strip(&self, err: Error) -> Error {
        match err {
            Error::Timeout { op, waited, detail } => Error::Timeout {
                op,
                waited,
                detail: detail.replace(&format!("{}/", self.prefix), ""),
            },
            other => other,
        }
    }
}

impl Store for PrefixStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.inner.set(&self.key(key), value)
    }
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.inner
            .get(&self.key(key), timeout)
            .map_err(|e| self.strip(e))
    }
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.try_get(&self.key(key))
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.inner.add(&self.key(key), delta)
    }
    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        self.inner.compare_set(&self.key(key), expected, desired)
    }
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let owned = self.keys(keys);
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        self.inner.wait(&refs, timeout).map_err(|e| self.strip(e))
    }
    fn check(&self, keys: &[&str]) -> Result<Vec<bool>> {
        let owned = self.keys(keys);
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        self.inner.check(&refs)
    }
    fn delete(&self, key: &str) -> Result<bool> {
        self.inner.delete(&self.key(key))
    }
    fn describe(&self) -> String {
        format!("{} (prefix {})", self.inner.describe(), self.prefix)
    }
}
