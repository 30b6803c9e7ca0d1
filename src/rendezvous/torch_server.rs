//! The store server's side of PyTorch's `TCPStore` protocol ([`super::super::torch_wire`]): torch's
//! own clients (`init_process_group` with `env://` or `tcp://`, torchrun-style rendezvous,
//! `TCPStore(is_master=False)`) are served on the same port as ferrocomm's clients, over the
//! same keys and waiters.
//!
//! A connection whose first byte is `0x00` (torch's `VALIDATE`) is a torch client; ferrocomm's
//! requests and authentication messages start with other bytes. Torch clients' keys live
//! under their own namespace ([`TORCH_NAMESPACE`]), so they never collide with ferrocomm's
//! rendezvous keys: `num_keys` and `list_keys` count and list only torch keys.
//!
//! Torch clients cannot authenticate: with a job secret set the server refuses them (with a
//! log line) unless [`ServerConfig::allow_torch`](super::ServerConfig::allow_torch) is set,
//! in which case they are served without authentication, like torchrun's own store.
//!
//! The server's limits apply as to ferrocomm's clients: the client limits at accept, the
//! deadline for the first complete query ([`ServerConfig::handshake_timeout`](super::ServerConfig::handshake_timeout)),
//! the frame timeout from the first byte of a later query to its last, the write timeout,
//! and the rate-limited log; a validated torch client may then stay idle as long as it
//! likes. A `Wait` or `Barrier` runs on
//! a helper thread of the connection, so the connection keeps reading and can take the
//! client's `CancelWait`.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Instant;

use parking_lot::Condvar;

use super::super::torch_wire::{
    self, CHECK_NOT_READY, CHECK_READY, Query, STOP_WAITING, VALIDATION_MAGIC, WAIT_CANCELED,
    put_bytes, put_i64,
};
use super::{Data, PendingGuard, Shared};

/// The prefix under which torch clients' keys are kept in the server's map. It starts with
/// a byte ferrocomm's own keys never use, so the two namespaces cannot meet.
pub const TORCH_NAMESPACE: &str = "\u{1}torch/";

/// Torch's queues (`queue_push`/`queue_pop`), kept beside the key-value map.
pub(super) type Queues = std::collections::HashMap<String, VecDeque<Vec<u8>>>;

fn ns(key: &str) -> String {
    format!("{TORCH_NAMESPACE}{key}")
}

/// What the first byte of a connection says.
pub(super) enum Kind {
    /// A PyTorch `TCPStore` client.
    Torch,
    /// Anything else (ferrocomm's protocol, its authentication, or a closed connection).
    Other,
    /// Nothing within the limit.
    Silent,
}

/// Peeks at the first byte of a new connection, waiting until `by` at most. A connection
/// that closes before sending anything counts as `Other`: the ordinary path reports it as
/// before.
pub(super) fn detect(stream: &TcpStream, by: Instant) -> Kind {
    let mut b = [0u8; 1];
    loop {
        let left = by.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Kind::Silent;
        }
        if stream.set_read_timeout(Some(left)).is_err() {
            return Kind::Other;
        }
        match stream.peek(&mut b) {
            Ok(1) if b[0] == torch_wire::QueryType::Validate as u8 => return Kind::Torch,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Kind::Silent;
            }
            _ => return Kind::Other,
        }
    }
}

/// A waiter's condition: `None` when met, else the key whose writes may meet it.
type Cond<'s> = Box<dyn Fn(&Data) -> Option<String> + Send + 's>;

/// The helper thread of a pending `Wait` or `Barrier`.
struct Pending<'scope> {
    cancel: Arc<AtomicBool>,
    cv: Arc<Condvar>,
    thread: ScopedJoinHandle<'scope, ()>,
}

/// Whether `key` (namespaced) counts as set for a waiter: a value, or a non-empty queue.
fn present(data: &Data, key: &str) -> bool {
    data.map.contains_key(key) || data.torch_queues.get(key).is_some_and(|q| !q.is_empty())
}

/// The counter value of `key`, if it is one.
fn counter(data: &Data, key: &str) -> Option<i64> {
    std::str::from_utf8(data.map.get(key)?)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Blocks until `cond` returns `None` (true), or cancellation or shutdown (false). `cond`
/// returns the key to be woken by while it is unmet.
fn wait_until(
    shared: &Shared,
    cv: &Arc<Condvar>,
    cancel: &AtomicBool,
    cond: &dyn Fn(&Data) -> Option<String>,
) -> bool {
    let mut data = shared.data.lock();
    loop {
        let Some(key) = cond(&data) else {
            return true;
        };
        if data.shutdown || cancel.load(Ordering::Acquire) {
            return false;
        }
        data.waiters
            .entry(key.clone())
            .or_default()
            .push(cv.clone());
        cv.wait(&mut data);
        data.unregister(&key, cv);
    }
}

struct Conn<'a> {
    shared: &'a Shared,
    stream: TcpStream,
    peer: SocketAddr,
    validated: bool,
    /// Until its first complete query: the deadline for it, and the guard counting this
    /// connection against its address's limit of such connections.
    first: Option<(Option<PendingGuard>, Instant)>,
}

impl<'a> Conn<'a> {
    fn write(&mut self, b: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(b)
            .map_err(|e| format!("cannot send the reply: {e}"))
    }

    /// Ends the pending wait, if any: cancels it (a no-op when it already answered) and
    /// joins its thread, so its `STOP_WAITING` (if sent) precedes whatever follows.
    fn finish(&self, pending: &mut Option<Pending<'_>>) {
        if let Some(p) = pending.take() {
            p.cancel.store(true, Ordering::Release);
            {
                let _data = self.shared.data.lock();
                p.cv.notify_all();
            }
            let _ = p.thread.join();
        }
    }

    /// Starts a helper thread that answers `STOP_WAITING` once `cond` holds.
    fn start_wait<'scope>(
        &self,
        scope: &'scope Scope<'scope, 'a>,
        cond: Cond<'scope>,
    ) -> Result<Pending<'scope>, String> {
        let cancel = Arc::new(AtomicBool::new(false));
        let cv = Arc::new(Condvar::new());
        let mut out = self
            .stream
            .try_clone()
            .map_err(|e| format!("cannot start a wait: {e}"))?;
        let shared = self.shared;
        let (c, v) = (cancel.clone(), cv.clone());
        let thread = std::thread::Builder::new()
            .name("ferrocomm-store-torch-wait".into())
            .stack_size(64 * 1024)
            .spawn_scoped(scope, move || {
                if wait_until(shared, &v, &c, &*cond) {
                    let _ = out.write_all(&[STOP_WAITING]);
                }
            })
            .map_err(|e| format!("cannot start a wait thread: {e}"))?;
        Ok(Pending { cancel, cv, thread })
    }

    /// Answers one query; `Err` says why the connection is closed.
    fn handle<'scope>(
        &mut self,
        q: Query,
        scope: &'scope Scope<'scope, 'a>,
        pending: &mut Option<Pending<'scope>>,
    ) -> Result<(), String> {
        if !self.validated {
            return match q {
                Query::Validate(VALIDATION_MAGIC) => {
                    self.validated = true;
                    Ok(())
                }
                Query::Validate(m) => Err(format!("wrong TCPStore validation magic {m:#010x}")),
                other => Err(format!(
                    "the first TCPStore query must be VALIDATE, not {other:?}"
                )),
            };
        }
        let cancel_reply = matches!(q, Query::CancelWait);
        self.finish(pending);
        let mut out = Vec::new();
        match q {
            Query::Validate(_) => return Err("a second VALIDATE".into()),
            Query::Ping(n) => out.extend_from_slice(&n.to_le_bytes()),
            Query::CancelWait => {}
            Query::Set { key, value } => self.shared.data.lock().set(ns(&key), value),
            Query::MultiSet(pairs) => {
                let mut data = self.shared.data.lock();
                for (k, v) in pairs {
                    data.set(ns(&k), v);
                }
            }
            Query::Get(key) => {
                let data = self.shared.data.lock();
                put_bytes(&mut out, data.map.get(&ns(&key)).map_or(&[][..], |v| v));
            }
            Query::MultiGet(keys) => {
                let data = self.shared.data.lock();
                for k in keys {
                    put_bytes(&mut out, data.map.get(&ns(&k)).map_or(&[][..], |v| v));
                }
            }
            Query::Add { key, delta } => {
                let key = ns(&key);
                let mut data = self.shared.data.lock();
                let current = match data.map.get(&key) {
                    None => 0,
                    Some(_) => counter(&data, &key).ok_or_else(|| {
                        format!(
                            "add on key {:?}, whose value is not a counter",
                            &key[TORCH_NAMESPACE.len()..]
                        )
                    })?,
                };
                let new = current.checked_add(delta).ok_or_else(|| {
                    format!(
                        "counter {:?} overflows: {current} + {delta}",
                        &key[TORCH_NAMESPACE.len()..]
                    )
                })?;
                data.set(key, new.to_string().into_bytes());
                put_i64(&mut out, new);
            }
            Query::CompareSet {
                key,
                expected,
                desired,
            } => {
                let key = ns(&key);
                let mut data = self.shared.data.lock();
                let now = match data.map.get(&key) {
                    None if expected.is_empty() => {
                        data.set(key, desired.clone());
                        desired
                    }
                    None => expected,
                    Some(v) if *v == expected => {
                        data.set(key, desired.clone());
                        desired
                    }
                    Some(v) => v.clone(),
                };
                put_bytes(&mut out, &now);
            }
            Query::Check(keys) => {
                let data = self.shared.data.lock();
                let ready = keys.iter().all(|k| present(&data, &ns(k)));
                out.push(if ready { CHECK_READY } else { CHECK_NOT_READY });
            }
            Query::Wait(keys) => {
                let keys: Vec<String> = keys.iter().map(|k| ns(k)).collect();
                let cond = move |data: &Data| keys.iter().find(|k| !present(data, k)).cloned();
                *pending = Some(self.start_wait(scope, Box::new(cond))?);
            }
            Query::Barrier { key, world_size } => {
                let key = ns(&key);
                {
                    let mut data = self.shared.data.lock();
                    let n = counter(&data, &key).unwrap_or(0).saturating_add(1);
                    data.set(key.clone(), n.to_string().into_bytes());
                }
                let cond = move |data: &Data| {
                    (counter(data, &key).unwrap_or(0) < world_size).then(|| key.clone())
                };
                *pending = Some(self.start_wait(scope, Box::new(cond))?);
            }
            Query::GetNumKeys => {
                let data = self.shared.data.lock();
                let n = data
                    .map
                    .keys()
                    .filter(|k| k.starts_with(TORCH_NAMESPACE))
                    .count();
                put_i64(&mut out, n as i64);
            }
            Query::ListKeys => {
                let data = self.shared.data.lock();
                let keys: Vec<&str> = data
                    .map
                    .keys()
                    .filter_map(|k| k.strip_prefix(TORCH_NAMESPACE))
                    .collect();
                put_i64(&mut out, keys.len() as i64);
                for k in keys {
                    put_bytes(&mut out, k.as_bytes());
                }
            }
            Query::DeleteKey(key) => {
                let removed = self.shared.data.lock().map.remove(&ns(&key)).is_some();
                put_i64(&mut out, i64::from(removed));
            }
            Query::Append { key, value } => {
                let key = ns(&key);
                let mut data = self.shared.data.lock();
                let mut v = data.map.get(&key).cloned().unwrap_or_default();
                if v.len() + value.len() > torch_wire::MAX_VALUE_LEN {
                    return Err(format!(
                        "append would make key {:?} longer than {} bytes",
                        &key[TORCH_NAMESPACE.len()..],
                        torch_wire::MAX_VALUE_LEN
                    ));
                }
                v.extend_from_slice(&value);
                data.set(key, v);
            }
            Query::QueuePush { key, value } => {
                let key = ns(&key);
                let mut data = self.shared.data.lock();
                data.torch_queues
                    .entry(key.clone())
                    .or_default()
                    .push_back(value);
                if let Some(list) = data.waiters.remove(&key) {
                    for cv in list {
                        cv.notify_one();
                    }
                }
            }
            Query::QueuePop(key) => {
                let key = ns(&key);
                let mut data = self.shared.data.lock();
                let q = data.torch_queues.get_mut(&key);
                let len = q.as_ref().map_or(0, |q| q.len());
                put_i64(&mut out, len as i64);
                if let Some(item) = q.and_then(VecDeque::pop_front) {
                    put_bytes(&mut out, &item);
                }
                if data.torch_queues.get(&key).is_some_and(VecDeque::is_empty) {
                    data.torch_queues.remove(&key);
                }
            }
            Query::QueueLen(key) => {
                let data = self.shared.data.lock();
                let len = data.torch_queues.get(&ns(&key)).map_or(0, VecDeque::len);
                put_i64(&mut out, len as i64);
            }
        }
        if cancel_reply {
            out.push(WAIT_CANCELED);
        }
        if !out.is_empty() {
            self.write(&out)?;
        }
        Ok(())
    }

    /// Reads and answers queries until the client leaves (`Ok`) or breaks a rule (`Err`).
    fn run<'scope>(
        &mut self,
        scope: &'scope Scope<'scope, 'a>,
        pending: &mut Option<Pending<'scope>>,
    ) -> Result<(), String> {
        let frame_timeout = self.shared.config.frame_timeout;
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut started: Option<Instant> = None;
        loop {
            match torch_wire::decode_query(&buf) {
                Err(e) => return Err(format!("bad TCPStore query: {e}")),
                Ok(Some((q, used))) => {
                    buf.drain(..used);
                    started = (!buf.is_empty()).then(Instant::now);
                    self.handle(q, scope, pending)?;
                    self.first = None;
                    continue;
                }
                Ok(None) => {}
            }
            // Between queries a client may stay idle as long as it likes; inside one it has
            // the frame timeout.
            let limit = match started {
                None => match &self.first {
                    // The first query must be complete by the deadline of new connections.
                    Some((_, by)) => {
                        let left = by.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return Err(format!(
                                "no complete first query within {:?}",
                                self.shared.config.handshake_timeout
                            ));
                        }
                        Some(left)
                    }
                    None => None,
                },
                Some(t) => {
                    let mut left = frame_timeout.saturating_sub(t.elapsed());
                    if let Some((_, by)) = &self.first {
                        left = left.min(by.saturating_duration_since(Instant::now()));
                    }
                    if left.is_zero() {
                        return Err(format!(
                            "stalled for more than {frame_timeout:?} inside a TCPStore query"
                        ));
                    }
                    Some(left)
                }
            };
            self.stream
                .set_read_timeout(limit)
                .map_err(|e| format!("cannot configure the socket: {e}"))?;
            match self.stream.read(&mut chunk) {
                Ok(0) if buf.is_empty() => return Ok(()),
                Ok(0) => {
                    return Err("truncated TCPStore query (connection closed inside it)".into());
                }
                Ok(n) => {
                    if buf.is_empty() {
                        started = Some(Instant::now());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
    }
}

/// Serves one torch client until it leaves; logs why if it is closed for a fault.
pub(super) fn serve(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    pending: Option<PendingGuard>,
    first_by: Instant,
) {
    std::thread::scope(|scope| {
        let mut conn = Conn {
            shared,
            stream,
            peer,
            validated: false,
            first: Some((pending, first_by)),
        };
        let mut pending = None;
        let result = conn.run(scope, &mut pending);
        conn.finish(&mut pending);
        match result {
            Ok(()) => tracing::debug!(
                "store server {}: PyTorch client {} disconnected",
                shared.addr,
                conn.peer
            ),
            Err(why) => shared
                .refusal(|| format!("closing connection of PyTorch client {}: {why}", conn.peer)),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::ServerConfig;

    #[test]
    fn allow_torch_is_read_from_the_environment() {
        let with = |v: &'static str| {
            ServerConfig::from_lookup(&move |name: &str| {
                (name == "FERROCOMM_STORE_ALLOW_TORCH").then(|| v.to_string())
            })
        };
        assert!(!ServerConfig::default().allow_torch);
        assert!(with("1").unwrap().allow_torch);
        assert!(with("true").unwrap().allow_torch);
        assert!(!with("0").unwrap().allow_torch);
        let err = with("maybe").unwrap_err().to_string();
        assert!(err.contains("FERROCOMM_STORE_ALLOW_TORCH"), "{err}");
    }
}
