//! [`TorchStore`]: a ferrocomm [`Store`] client of a PyTorch `TCPStore` server (torchrun's
//! agent store, or `TCPStore(is_master=True)` in a Python program), over the protocol of
//! [`super::torch_wire`].
//!
//! Like ferrocomm's own client it keeps a small pool of connections, so a thread blocked in
//! a long `get` does not hold up `set`s from other threads. Every call is bounded: a wait by
//! the caller's timeout (then the wait is cancelled on the server, as torch's client does),
//! everything else by the I/O timeout given at connect time.
//!
//! Differences from ferrocomm's own store that callers may notice:
//! - torch's protocol has no authentication: the job secret cannot be checked here.
//! - torch's `compare_set` cannot tell an absent key from an empty value: an `expected` of
//!   `None` or `Some(b"")` both mean "absent or empty".
//! - `check` asks once per key (torch answers one bit for a whole list).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::store::Store;
use super::torch_wire::{
    self, CHECK_READY, MAX_KEYS, MAX_VALUE_LEN, Query, STOP_WAITING, VALIDATION_MAGIC,
    WAIT_CANCELED,
};
use crate::error::{Error, Result};

/// Idle connections kept for reuse.
const MAX_IDLE: usize = 4;
/// The longest socket timeout asked of the OS (longer waits are cut into pieces).
const MAX_SOCKET_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A client of a PyTorch `TCPStore` server; implements [`Store`].
pub struct TorchStore {
    addr: String,
    io_timeout: Duration,
    idle: Mutex<Vec<TcpStream>>,
}

impl std::fmt::Debug for TorchStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchStore")
            .field("addr", &self.addr)
            .finish()
    }
}

fn clamp(t: Duration) -> Duration {
    t.clamp(Duration::from_millis(1), MAX_SOCKET_TIMEOUT)
}

impl TorchStore {
    /// Connects to the `TCPStore` server at `addr` (`HOST:PORT`), retrying for up to
    /// `connect_timeout` while it is not up yet (logging every `log_interval`), and checks
    /// that it answers torch's validation and ping. `io_timeout` bounds every later request
    /// that does not wait by itself.
    pub fn connect(
        addr: &str,
        connect_timeout: Duration,
        io_timeout: Duration,
        log_interval: Duration,
    ) -> Result<TorchStore> {
        let store = TorchStore {
            addr: addr.to_string(),
            io_timeout,
            idle: Mutex::new(Vec::new()),
        };
        let start = Instant::now();
        let mut next_log = start + log_interval;
        let mut pause = Duration::from_millis(10);
        loop {
            match store.open() {
                Ok(s) => {
                    store.idle.lock().push(s);
                    return Ok(store);
                }
                Err(e) => {
                    let now = Instant::now();
                    if now.duration_since(start) >= connect_timeout {
                        return Err(Error::Timeout {
                            op: format!("connecting to the TCPStore at {addr}"),
                            waited: now.duration_since(start),
                            detail: format!(
                                "last error: {e}; check MASTER_ADDR/MASTER_PORT and that the \
                                 store (torchrun's agent, or the Python program hosting it) runs"
                            ),
                        });
                    }
                    if now >= next_log {
                        tracing::warn!(
                            "still waiting for the TCPStore at {addr} after {:.0?}: {e}",
                            now.duration_since(start)
                        );
                        next_log = now + log_interval;
                    }
                    std::thread::sleep(pause.min(connect_timeout.saturating_sub(now - start)));
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    fn io_err(&self, op: &str, e: io::Error) -> Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            Error::Timeout {
                op: format!("{op} at the TCPStore {}", self.addr),
                waited: self.io_timeout,
                detail: "the store did not answer (is it overloaded or stopped?)".into(),
            }
        } else {
            Error::io(
                format!(
                    "{op} at the TCPStore {} (did the store, e.g. torchrun's agent, exit?)",
                    self.addr
                ),
                e,
            )
        }
    }

    /// A new validated connection.
    fn open(&self) -> Result<TcpStream> {
        let per_try = clamp(self.io_timeout);
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
        let addrs = self
            .addr
            .to_socket_addrs()
            .map_err(|e| self.io_err("resolving the address", e))?;
        for sa in addrs {
            match TcpStream::connect_timeout(&sa, per_try) {
                Ok(mut s) => {
                    let hello = (|| {
                        s.set_nodelay(true)?;
                        s.set_read_timeout(Some(per_try))?;
                        s.set_write_timeout(Some(per_try))?;
                        let nonce = std::process::id();
                        let mut msg = torch_wire::encode_query(&Query::Validate(VALIDATION_MAGIC));
                        msg.extend(torch_wire::encode_query(&Query::Ping(nonce)));
                        s.write_all(&msg)?;
                        let mut b = [0u8; 4];
                        s.read_exact(&mut b)?;
                        if u32::from_le_bytes(b) != nonce {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "the server answered the ping with another nonce: it does not \
                                 speak torch's TCPStore protocol",
                            ));
                        }
                        Ok(())
                    })();
                    match hello {
                        Ok(()) => return Ok(s),
                        Err(e) => last = e,
                    }
                }
                Err(e) => last = e,
            }
        }
        Err(self.io_err("connecting", last))
    }

    /// Runs `f` on a pooled connection; the connection goes back to the pool only if `f`
    /// succeeded (a failed one may hold half a reply).
    fn with_conn<T>(&self, f: impl FnOnce(&mut TcpStream) -> Result<T>) -> Result<T> {
        let pooled = self.idle.lock().pop();
        let mut s = match pooled {
            Some(s) => s,
            None => self.open()?,
        };
        let t = clamp(self.io_timeout);
        s.set_read_timeout(Some(t))
            .and_then(|()| s.set_write_timeout(Some(t)))
            .map_err(|e| self.io_err("configuring a connection", e))?;
        let out = f(&mut s)?;
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(s);
        }
        Ok(out)
    }

    fn send(&self, s: &mut TcpStream, op: &str, q: &Query) -> Result<()> {
        s.write_all(&torch_wire::encode_query(q))
            .map_err(|e| self.io_err(op, e))
    }

    fn read_u8(&self, s: &mut TcpStream, op: &str) -> Result<u8> {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(|e| self.io_err(op, e))?;
        Ok(b[0])
    }

    fn read_i64(&self, s: &mut TcpStream, op: &str) -> Result<i64> {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).map_err(|e| self.io_err(op, e))?;
        Ok(i64::from_le_bytes(b))
    }

    fn read_bytes(&self, s: &mut TcpStream, op: &str) -> Result<Vec<u8>> {
        let len = self.read_i64(s, op)? as u64;
        if len > MAX_VALUE_LEN as u64 {
            return Err(self.misbehaved(
                op,
                format!("a value of {len} bytes (limit {MAX_VALUE_LEN})"),
            ));
        }
        let mut v = vec![0u8; len as usize];
        s.read_exact(&mut v).map_err(|e| self.io_err(op, e))?;
        Ok(v)
    }

    fn misbehaved(&self, op: &str, what: String) -> Error {
        Error::misbehaved(
            format!("TCPStore {}", self.addr),
            format!("{what} in reply to {op}"),
        )
    }

    /// One `Check` of one key list: whether every key is set.
    fn check_all(&self, keys: &[&str]) -> Result<bool> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        self.with_conn(|s| {
            self.send(s, "check", &Query::Check(keys))?;
            Ok(self.read_u8(s, "check")? == CHECK_READY)
        })
    }

    fn get_now(&self, key: &str) -> Result<Vec<u8>> {
        self.with_conn(|s| {
            self.send(s, "get", &Query::Get(key.to_string()))?;
            self.read_bytes(s, "get")
        })
    }
}

impl Store for TorchStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let q = Query::Set {
            key: key.to_string(),
            value: value.to_vec(),
        };
        // torch's `set` has no reply: a ping behind it on the same connection confirms the
        // server took it, so a lost connection is an error here, not a silently lost key.
        let nonce = std::process::id() ^ 0x5e7;
        let mut msg = torch_wire::encode_query(&q);
        msg.extend(torch_wire::encode_query(&Query::Ping(nonce)));
        self.with_conn(|s| {
            s.write_all(&msg).map_err(|e| self.io_err("set", e))?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).map_err(|e| self.io_err("set", e))?;
            if u32::from_le_bytes(b) != nonce {
                return Err(self.misbehaved("set", "a ping reply with another nonce".into()));
            }
            Ok(())
        })
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.wait(&[key], timeout)?;
        self.get_now(key)
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if self.check_all(&[key])? {
            self.get_now(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let q = Query::Add {
            key: key.to_string(),
            delta,
        };
        self.with_conn(|s| {
            self.send(s, "add", &q)?;
            self.read_i64(s, "add")
        })
    }

    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        let expected = expected.unwrap_or_default().to_vec();
        let q = Query::CompareSet {
            key: key.to_string(),
            expected: expected.clone(),
            desired: desired.to_vec(),
        };
        let got = self.with_conn(|s| {
            self.send(s, "compare_set", &q)?;
            self.read_bytes(s, "compare_set")
        })?;
        // torch answers `expected` when the key is absent (and `expected` is not empty): had
        // the key held `expected`, the swap would have happened and the answer be `desired`.
        if !expected.is_empty() && got == expected && expected != desired {
            return Ok(Vec::new());
        }
        Ok(got)
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        if keys.len() > MAX_KEYS {
            return Err(Error::invalid(
                "wait",
                "keys",
                format!(
                    "{} keys; torch's store takes at most {MAX_KEYS}",
                    keys.len()
                ),
            ));
        }
        let list: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let start = Instant::now();
        let done = self.with_conn(|s| {
            self.send(s, "wait", &Query::Wait(list))?;
            let deadline = start + timeout.min(MAX_SOCKET_TIMEOUT * 365);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                s.set_read_timeout(Some(clamp(left)))
                    .map_err(|e| self.io_err("wait", e))?;
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(0) => {
                        return Err(
                            self.io_err("wait", io::Error::from(io::ErrorKind::UnexpectedEof))
                        );
                    }
                    Ok(_) if b[0] == STOP_WAITING => return Ok(true),
                    Ok(_) => {
                        return Err(self.misbehaved("wait", format!("the byte {:#04x}", b[0])));
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(self.io_err("wait", e)),
                }
            }
            // Timed out: cancel on the server, which may have just answered.
            s.set_read_timeout(Some(clamp(self.io_timeout)))
                .map_err(|e| self.io_err("cancelling a wait", e))?;
            self.send(s, "cancelling a wait", &Query::CancelWait)?;
            let mut ready = false;
            loop {
                match self.read_u8(s, "cancelling a wait")? {
                    STOP_WAITING => ready = true,
                    WAIT_CANCELED => return Ok(ready),
                    b => {
                        return Err(
                            self.misbehaved("cancelling a wait", format!("the byte {b:#04x}"))
                        );
                    }
                }
            }
        })?;
        if done {
            return Ok(());
        }
        let mut missing = Vec::new();
        for k in keys {
            if !self.check_all(&[k])? {
                missing.push(*k);
            }
        }
        if missing.is_empty() {
            // Set between the timeout and the check: done after all.
            return Ok(());
        }
        Err(Error::Timeout {
            op: format!("waiting for keys at the TCPStore {}", self.addr),
            waited: start.elapsed(),
            detail: format!("still missing: {}", missing.join(", ")),
        })
    }

    fn check(&self, keys: &[&str]) -> Result<Vec<bool>> {
        keys.iter().map(|k| self.check_all(&[k])).collect()
    }

    fn delete(&self, key: &str) -> Result<bool> {
        self.with_conn(|s| {
            self.send(s, "delete", &Query::DeleteKey(key.to_string()))?;
            Ok(self.read_i64(s, "delete")? > 0)
        })
    }

    fn describe(&self) -> String {
        format!("torch-tcpstore://{}", self.addr)
    }
}
