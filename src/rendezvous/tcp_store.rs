//! [`TcpStoreServer`] and its client [`TcpStore`]: the store of `tcp://` and `env://` jobs.
//!
//! The server keeps every key in memory and serves each client connection on its own thread
//! (at most [`ServerConfig::max_clients`] at once; more are accepted and closed at once, with
//! a logged refusal). Requests use the binary protocol of [`super::protocol`]; PyTorch's
//! `TCPStore` clients, told apart by their first byte, are served on the same port by
//! `torch_server` (see [`super::torch_wire`] and `docs/store.md`). Waiting
//! requests (`get` of an absent key, `wait`) block the client's server thread for at most the
//! timeout the client sent; writes (`set`, `add`, a successful `compare_set`) wake exactly the
//! waiters of the key written. A waiter registers under the first key it still misses, so a
//! write wakes only the waiters that can make progress: bootstrap at thousands of ranks does
//! not turn every `set` into a thundering herd.
//!
//! Bad input never takes the server down: a client that sends garbage, a truncated frame, an
//! oversized length, or takes more than [`ServerConfig::frame_timeout`] to send a whole frame
//! (however it trickles the bytes) gets its connection closed with a `tracing::warn!`; every
//! length is checked against the protocol limits before anything is allocated; other clients
//! are unaffected.
//!
//! Deadlines and limits hold with and without a job secret: a new connection must complete
//! its first request (after authenticating, with a secret) within
//! [`ServerConfig::handshake_timeout`], so idle or trickling strangers cannot pile up; one
//! client address may hold at most [`ServerConfig::max_pending_per_client`] connections that
//! have not completed a request yet; [`ServerConfig::max_clients`] bounds the connections
//! (one thread each) in all. A client that has completed a request may then stay idle
//! between frames as long as it likes (ranks keep their connections for the whole job).
//! Refusals and closed connections are logged at most [`LOG_BURST`] times per
//! [`LOG_WINDOW`]; the rest are counted and summed up in one line.
//!
//! A connection can carry a "last will" ([`Request::Will`]): when it closes without having
//! disarmed it, the server sets the will's key (unless set already). The rendezvous arms one
//! per rank so that the others learn within seconds when a rank dies during `init`.
//!
//! Dropping the server (or [`TcpStoreServer::shutdown`]) stops it promptly: the accept thread
//! is woken and joined, waiting requests are answered with a "shutting down" status (with the
//! reason given to [`TcpStoreServer::close_with`], if any), then every client connection is
//! shut down and the client threads are waited for (up to a few seconds).
//!
//! The client, [`TcpStore`], keeps a small pool of connections: a thread blocked in a long
//! `get` does not block `set`s from other threads of the same process, which use another
//! connection. Counters written by `add` are stored as the decimal text of an `i64`. A
//! `compare_set` that fails on an absent key returns an empty value.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::protocol::{
    self, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN, Request, RequestHeader, Response, ResponseHeader,
};
use super::store::Store;
use crate::auth::{self, Channel, ClientHandshake, Secret, ServerHandshake};
use crate::error::{Error, IoContext, Result};

#[path = "torch_server.rs"]
mod torch_server;
pub use torch_server::TORCH_NAMESPACE;

/// How often a client that waits for the server to come up logs that it is still waiting,
/// unless the caller chooses ([`TcpStore::connect_with`]).
pub const DEFAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Extra time a client gives the server to answer a waiting request beyond its own timeout.
const WAIT_GRACE: Duration = Duration::from_secs(10);
/// Idle connections a client keeps for reuse.
const MAX_IDLE: usize = 4;
/// Stack of a server connection thread (requests are decoded on the heap).
const CONN_STACK: usize = 256 * 1024;
/// How long dropping the server waits for its client threads.
const JOIN_WAIT: Duration = Duration::from_secs(5);
/// How long dropping the server lets answered waiters finish writing their reply before it
/// shuts the connections down.
const REPLY_WAIT: Duration = Duration::from_secs(1);
/// Refusal and closed-connection warnings the server logs per [`LOG_WINDOW`]; the rest are
/// counted and summed up in one line.
pub const LOG_BURST: u32 = 10;
/// The window of [`LOG_BURST`].
pub const LOG_WINDOW: Duration = Duration::from_secs(10);
/// A pooled client connection that has never carried a request is replaced after this long:
/// the server drops connections that send no request within its handshake timeout.
const FRESH_FOR: Duration = Duration::from_secs(1);
/// How long a client retries a master host name that does not resolve (a DNS failure is
/// rarely transient; a host that is up but not listening yet is retried until the timeout).
pub const RESOLVE_GRACE: Duration = Duration::from_secs(5);

/// Tunables of a [`TcpStoreServer`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Client connections served at once (one thread each); further ones are closed at once
    /// with a logged refusal. Default 4096 (`FERROCOMM_STORE_MAX_CLIENTS`).
    pub max_clients: usize,
    /// Connections from one client address that have not completed a request yet; further
    /// ones are refused. Default 1024 (`FERROCOMM_STORE_MAX_PENDING`): a quarter of the
    /// default client limit, so one address cannot take every slot, and above the number of
    /// ranks of one host that connect at once when a job starts.
    pub max_pending_per_client: usize,
    /// Longest time a request frame may take from its first byte to its last (and writing
    /// its response may take) before the connection is closed. Default 30 s.
    pub frame_timeout: Duration,
    /// The job secret: when set, every connection must pass the challenge-response of
    /// [`crate::auth`] before its first request, and clients without it are refused.
    pub secret: Option<Secret>,
    /// How long a new connection may take to authenticate (with a secret) and complete its
    /// first request (with or without a secret) before it is dropped with a log line.
    /// Default 10 s (`FERROCOMM_HANDSHAKE_TIMEOUT`).
    pub handshake_timeout: Duration,
    /// Serve PyTorch `TCPStore` clients even though a secret is set (they cannot
    /// authenticate, so they bypass it). Without a secret they are always served. Default
    /// false (`FERROCOMM_STORE_ALLOW_TORCH=1`).
    pub allow_torch: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_clients: 4096,
            max_pending_per_client: 1024,
            frame_timeout: Duration::from_secs(30),
            secret: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            allow_torch: false,
        }
    }
}

/// Default deadline for a connection's authentication handshake (store and transport).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl ServerConfig {
    /// The defaults adjusted by `FERROCOMM_STORE_MAX_CLIENTS`, `FERROCOMM_STORE_MAX_PENDING`,
    /// `FERROCOMM_HANDSHAKE_TIMEOUT` (seconds), `FERROCOMM_SECRET` and
    /// `FERROCOMM_STORE_ALLOW_TORCH`.
    pub fn from_env() -> Result<ServerConfig> {
        Self::from_lookup(&crate::config::process_env)
    }

    pub(crate) fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<ServerConfig> {
        let mut cfg = ServerConfig::default();
        if let Some(n) = crate::config::parse_var(
            lookup,
            "FERROCOMM_STORE_MAX_CLIENTS",
            "a positive number of connections",
            |v| v.parse::<usize>().ok().filter(|n| *n > 0),
        )? {
            cfg.max_clients = n;
        }
        if let Some(n) = crate::config::parse_var(
            lookup,
            "FERROCOMM_STORE_MAX_PENDING",
            "a positive number of connections",
            |v| v.parse::<usize>().ok().filter(|n| *n > 0),
        )? {
            cfg.max_pending_per_client = n;
        }
        if let Some(t) = crate::config::seconds(lookup, "FERROCOMM_HANDSHAKE_TIMEOUT")? {
            cfg.handshake_timeout = t;
        }
        cfg.secret = Secret::from_lookup(lookup);
        if let Some(allow) = crate::config::parse_var(
            lookup,
            "FERROCOMM_STORE_ALLOW_TORCH",
            "1 or 0 (true or false)",
            |v| match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Some(true),
                "0" | "false" | "no" | "off" | "" => Some(false),
                _ => None,
            },
        )? {
            cfg.allow_torch = allow;
        }
        Ok(cfg)
    }
}

/// The keys and who waits for them.
#[derive(Default)]
struct Data {
    map: HashMap<String, Vec<u8>>,
    /// Waiters by the key they miss; each condvar belongs to one waiting request.
    waiters: HashMap<String, Vec<Arc<Condvar>>>,
    shutdown: bool,
    /// Why the server stops, when its owner said ([`TcpStoreServer::close_with`]).
    closing: Option<String>,
    /// The queues of PyTorch clients ([`torch_server`]).
    torch_queues: torch_server::Queues,
}

impl Data {
    fn set(&mut self, key: String, value: Vec<u8>) {
        if let Some(list) = self.waiters.remove(&key) {
            for cv in list {
                cv.notify_one();
            }
        }
        self.map.insert(key, value);
    }

    /// The answer to every request once the server stops.
    fn stopped(&self) -> Response {
        match &self.closing {
            Some(why) => Response::Closing(why.clone()),
            None => Response::ShuttingDown,
        }
    }

    fn unregister(&mut self, key: &str, cv: &Arc<Condvar>) {
        if let Some(list) = self.waiters.get_mut(key) {
            list.retain(|c| !Arc::ptr_eq(c, cv));
            if list.is_empty() {
                self.waiters.remove(key);
            }
        }
    }
}

struct Shared {
    data: Mutex<Data>,
    stopping: AtomicBool,
    /// A clone of every client connection, to shut them down when the server stops.
    conns: Mutex<HashMap<u64, TcpStream>>,
    active: Mutex<usize>,
    idle: Condvar,
    /// Connections per client address that have not completed a request yet.
    pending: Mutex<HashMap<IpAddr, usize>>,
    /// Requests read and not yet answered (shutdown lets them finish their reply).
    in_flight: AtomicUsize,
    log: Mutex<LogLimit>,
    addr: SocketAddr,
    config: ServerConfig,
}

/// Rate limit of the server's refusal warnings (see [`LOG_BURST`]).
struct LogLimit {
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    fn new() -> LogLimit {
        LogLimit {
            window: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Logs the summary of the lines suppressed so far, if any.
    fn flush(&mut self, addr: SocketAddr) {
        if self.suppressed > 0 {
            tracing::warn!(
                "store server {addr}: {} more refused or closed connections in the last {:.0?} \
                 were not logged one by one",
                self.suppressed,
                self.window.elapsed()
            );
        }
        self.window = Instant::now();
        self.logged = 0;
        self.suppressed = 0;
    }

    fn warn(&mut self, addr: SocketAddr, line: impl FnOnce() -> String) {
        if self.window.elapsed() >= LOG_WINDOW {
            self.flush(addr);
        }
        if self.logged < LOG_BURST {
            self.logged += 1;
            tracing::warn!("store server {addr}: {}", line());
            if self.logged == LOG_BURST {
                tracing::warn!(
                    "store server {addr}: {LOG_BURST} refusals within {LOG_WINDOW:?}; further \
                     ones in this window are counted and summed up"
                );
            }
        } else {
            self.suppressed += 1;
        }
    }
}

/// Reads exactly `buf.len()` bytes, each read bounded by what is left until `deadline`:
/// a client trickling bytes cannot stretch it. Times out with `TimedOut`.
fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` by `deadline` (see [`read_by`]).
fn write_by(s: &mut TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut sent = 0;
    while sent < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        s.set_write_timeout(Some(left))?;
        match s.write(&buf[sent..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What one connection has asked to leave behind when it closes: `(key, value)`.
type Will = Option<(String, Vec<u8>)>;

impl Shared {
    /// Waits, holding `data` between checks, until every key has been seen set. Returns `None`
    /// when they all have, or the response to send otherwise.
    fn wait_keys(
        &self,
        data: &mut MutexGuard<'_, Data>,
        keys: &[String],
        timeout: Duration,
    ) -> Option<Response> {
        let deadline = Instant::now().checked_add(timeout);
        let cv = Arc::new(Condvar::new());
        let mut next = 0;
        loop {
            while next < keys.len() && data.map.contains_key(&keys[next]) {
                next += 1;
            }
            if next == keys.len() {
                return None;
            }
            if data.shutdown {
                return Some(data.stopped());
            }
            let now = Instant::now();
            let remaining = match deadline {
                Some(d) if d <= now => {
                    let missing = keys[next..]
                        .iter()
                        .filter(|k| !data.map.contains_key(k.as_str()))
                        .cloned()
                        .collect();
                    return Some(Response::Timeout(missing));
                }
                Some(d) => d - now,
                None => protocol::MAX_TIMEOUT,
            };
            let key = keys[next].clone();
            data.waiters
                .entry(key.clone())
                .or_default()
                .push(cv.clone());
            cv.wait_for(data, remaining);
            data.unregister(&key, &cv);
        }
    }

    fn handle(&self, req: Request) -> Response {
        let mut data = self.data.lock();
        if data.shutdown {
            return data.stopped();
        }
        match req {
            Request::Set { key, value } => {
                data.set(key, value);
                Response::Ok(Vec::new())
            }
            Request::Get { key, timeout } => {
                match self.wait_keys(&mut data, std::slice::from_ref(&key), timeout) {
                    // Present: `wait_keys` returned without releasing the lock after its check.
                    None => Response::Ok(data.map.get(&key).cloned().unwrap_or_default()),
                    Some(r) => r,
                }
            }
            Request::TryGet { key } => match data.map.get(&key) {
                Some(v) => Response::Ok(v.clone()),
                None => Response::NotFound,
            },
            Request::Add { key, delta } => {
                let current = match data.map.get(&key) {
                    None => 0,
                    Some(v) => match std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.trim().parse::<i64>().ok())
                    {
                        Some(n) => n,
                        None => {
                            return Response::BadRequest(format!(
                                "the value of key {key:?} is not a counter (the decimal text of an i64)"
                            ));
                        }
                    },
                };
                let Some(new) = current.checked_add(delta) else {
                    return Response::BadRequest(format!(
                        "counter {key:?} overflows: {current} + {delta}"
                    ));
                };
                data.set(key, new.to_string().into_bytes());
                Response::Ok(new.to_le_bytes().to_vec())
            }
            Request::CompareSet {
                key,
                expected,
                desired,
            } => {
                let current = data.map.get(&key);
                if current.map(Vec::as_slice) == expected.as_deref() {
                    data.set(key, desired.clone());
                    Response::Ok(desired)
                } else {
                    Response::Ok(current.cloned().unwrap_or_default())
                }
            }
            Request::Wait { keys, timeout } => match self.wait_keys(&mut data, &keys, timeout) {
                None => Response::Ok(Vec::new()),
                Some(r) => r,
            },
            Request::Check { keys } => Response::Ok(
                keys.iter()
                    .map(|k| u8::from(data.map.contains_key(k)))
                    .collect(),
            ),
            Request::Delete { key } => {
                Response::Ok(vec![u8::from(data.map.remove(&key).is_some())])
            }
            // Connection state: answered by `serve_one`, never here.
            Request::Will { .. } => Response::BadRequest("a will belongs to a connection".into()),
        }
    }

    /// Carries out the will of a connection that closed: sets its key unless set already.
    fn execute_will(&self, peer: SocketAddr, will: Will) {
        let Some((key, value)) = will else {
            return;
        };
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        tracing::debug!(
            "store server {}: client {peer} closed with a will; setting {key:?}",
            self.addr
        );
        let mut data = self.data.lock();
        if !data.shutdown && !data.map.contains_key(&key) {
            data.set(key, value);
        }
    }

    /// Reads, answers and returns `Ok(true)` for one request; `Ok(false)` when the client
    /// closed the connection between frames; `Err` with what to log otherwise. Reading
    /// ([`read_request`](Self::read_request)) and encoding the reply are the codec's part;
    /// the rest (deadlines, wills, shutdown) holds for any codec.
    fn serve_one(
        &self,
        stream: &mut TcpStream,
        first_by: Option<Instant>,
        will: &mut Will,
    ) -> std::result::Result<bool, String> {
        let Some(req) = self.read_request(stream, first_by)? else {
            return Ok(false);
        };
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let resp = match req {
            Request::Will { key, value } => {
                *will = (!key.is_empty()).then_some((key, value));
                Response::Ok(Vec::new())
            }
            req => self.handle(req),
        };
        let sent = write_by(
            stream,
            &protocol::encode_response(&resp),
            Instant::now() + self.config.frame_timeout.max(Duration::from_millis(1)),
        );
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        sent.map_err(|e| format!("cannot send the reply: {e}"))?;
        Ok(true)
    }

    /// Reads one request frame of [`protocol`]: `Ok(None)` when the client closed the
    /// connection between frames. Until the connection's first request, the whole request
    /// must arrive by `first_by`; after it, the client may stay idle between frames as long
    /// as it likes. Every frame must arrive within the frame timeout of its first byte.
    fn read_request(
        &self,
        stream: &mut TcpStream,
        first_by: Option<Instant>,
    ) -> std::result::Result<Option<Request>, String> {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        let cfg = |e: io::Error| format!("cannot configure the socket: {e}");
        let first_limit = self.config.handshake_timeout;
        let late = || {
            format!(
                "no complete request within {first_limit:?} of connecting (idle or trickling \
                 connection dropped; FERROCOMM_HANDSHAKE_TIMEOUT sets the limit)"
            )
        };
        match first_by {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(late());
                }
                stream.set_read_timeout(Some(left)).map_err(cfg)?;
            }
            None => stream.set_read_timeout(None).map_err(cfg)?,
        }
        loop {
            match stream.read(&mut header[..1]) {
                Ok(0) => return Ok(None),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(late());
                }
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
        let frame_timeout = self.config.frame_timeout;
        let mut deadline = Instant::now() + frame_timeout.max(Duration::from_millis(1));
        if let Some(d) = first_by {
            deadline = deadline.min(d);
        }
        let stalled = |e: io::Error, what: &str| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                if first_by.is_some_and(|d| d <= Instant::now()) =>
            {
                late()
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("a request {what} took more than {frame_timeout:?} to arrive")
            }
            io::ErrorKind::UnexpectedEof => {
                format!("truncated request {what} (connection closed inside it)")
            }
            _ => format!("read failed inside a request {what}: {e}"),
        };
        read_by(stream, &mut header[1..], deadline).map_err(|e| stalled(e, "header"))?;
        if auth::is_auth_message(&header) {
            // A client with a secret, and this server has none: say so before closing.
            let _ = stream.write_all(&auth::no_secret_reply());
            linger_close(stream);
            return Err(format!(
                "authentication failed: the client has a job secret and this store has none ({})",
                auth::HINT
            ));
        }
        let h = RequestHeader::decode(&header).map_err(|e| format!("bad request header: {e}"))?;
        // Bounded: `decode` checked every length against the protocol limits.
        let mut body = vec![0u8; h.body_len()];
        read_by(stream, &mut body, deadline).map_err(|e| stalled(e, "body"))?;
        let req =
            protocol::decode_request_body(&h, &body).map_err(|e| format!("bad request: {e}"))?;
        Ok(Some(req))
    }

    /// Runs the server's side of the handshake of [`crate::auth`] within the handshake
    /// deadline; `Err` says why the client is refused.
    fn authenticate(
        &self,
        stream: &mut TcpStream,
        secret: &Secret,
    ) -> std::result::Result<(), String> {
        let limit = self.config.handshake_timeout.max(Duration::from_millis(1));
        let deadline = Instant::now() + limit;
        let io = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("no authentication within {limit:?} (half-open handshake dropped)")
            }
            io::ErrorKind::UnexpectedEof => {
                "authentication failed: the client closed the connection during the handshake \
                 (it does not have this job's secret?)"
                    .to_string()
            }
            _ => format!("authentication failed: {e}"),
        };
        // Each read is bounded by what is left of the deadline, so a client trickling bytes
        // cannot stretch it.
        let read = |s: &mut TcpStream, buf: &mut [u8]| -> std::result::Result<(), String> {
            let mut got = 0;
            while got < buf.len() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io(io::ErrorKind::TimedOut.into()));
                }
                s.set_read_timeout(Some(left)).map_err(io)?;
                match s.read(&mut buf[got..]) {
                    Ok(0) => return Err(io(io::ErrorKind::UnexpectedEof.into())),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io(e)),
                }
            }
            Ok(())
        };
        let mut init = [0u8; auth::INIT_LEN];
        read(stream, &mut init[..4])?;
        if !auth::is_auth_message(&init) {
            let why = format!(
                "authentication failed: this store requires the job secret and the client sent \
                 none; {}",
                auth::HINT
            );
            let _ = stream.write_all(&protocol::encode_response(&Response::Refused(why.clone())));
            linger_close(stream);
            return Err(why);
        }
        read(stream, &mut init[4..])?;
        let (hs, challenge) = ServerHandshake::challenge(secret, Channel::Store, &init)
            .map_err(|e| format!("authentication failed: {e}"))?;
        stream.write_all(&challenge).map_err(io)?;
        let mut proof = [0u8; auth::PROOF_LEN];
        read(stream, &mut proof)?;
        hs.verify(&proof)
            .map_err(|e| format!("authentication failed: {e}"))
    }

    /// Logs a refusal or a closed connection, rate-limited (see [`LOG_BURST`]).
    fn refusal(&self, line: impl FnOnce() -> String) {
        if !self.stopping.load(Ordering::Acquire) {
            self.log.lock().warn(self.addr, line);
        }
    }

    /// Serves one connection until it closes. `pending` counts it against its address's
    /// limit of connections without a completed request, until its first request.
    fn serve(&self, mut stream: TcpStream, peer: SocketAddr, pending: PendingGuard) {
        let first_by = Instant::now() + self.config.handshake_timeout.max(Duration::from_millis(1));
        let mut pending = Some(pending);
        if let Err(e) = stream.set_write_timeout(Some(self.config.frame_timeout)) {
            self.refusal(|| format!("closing connection of {peer}: {e}"));
            return;
        }
        // PyTorch `TCPStore` clients start with a 0x00 byte; `torch_server` serves them.
        match torch_server::detect(&stream, first_by) {
            torch_server::Kind::Silent => {
                self.refusal(|| {
                    format!(
                        "refusing client {peer}: nothing received within {:?}",
                        self.config.handshake_timeout
                    )
                });
                return;
            }
            torch_server::Kind::Torch
                if self.config.secret.is_some() && !self.config.allow_torch =>
            {
                self.refusal(|| {
                    format!(
                        "refusing PyTorch TCPStore client {peer}: this store requires the job \
                         secret (FERROCOMM_SECRET) and torch's protocol cannot authenticate; \
                         set FERROCOMM_STORE_ALLOW_TORCH=1 where the store is hosted to serve \
                         torch clients without authentication"
                    )
                });
                linger_close(&mut stream);
                return;
            }
            torch_server::Kind::Torch => {
                return torch_server::serve(self, stream, peer, pending.take(), first_by);
            }
            torch_server::Kind::Other => {}
        }
        if let Some(secret) = &self.config.secret {
            if let Err(why) = self.authenticate(&mut stream, secret) {
                self.refusal(|| format!("refusing client {peer}: {why}"));
                return;
            }
            tracing::debug!("store server {}: client {peer} authenticated", self.addr);
        }
        let mut will: Will = None;
        loop {
            let by = pending.is_some().then_some(first_by);
            match self.serve_one(&mut stream, by, &mut will) {
                Ok(true) => {
                    pending = None;
                }
                Ok(false) => {
                    tracing::debug!("store server {}: client {peer} disconnected", self.addr);
                    break;
                }
                Err(why) => {
                    self.refusal(|| format!("closing connection of client {peer}: {why}"));
                    break;
                }
            }
        }
        drop(pending);
        self.execute_will(peer, will);
    }
}

/// Counts a connection against its client address's limit of connections that have not
/// completed a request ([`ServerConfig::max_pending_per_client`]) while it lives.
struct PendingGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut pending = self.shared.pending.lock();
        if let Some(n) = pending.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                pending.remove(&self.ip);
            }
        }
    }
}

/// Ends a connection after a refusal so that the client reads the refusal: closing with
/// unread input would reset the connection and could discard it. Half-closes, then reads
/// and drops what the client still sends, for at most a second.
fn linger_close(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let until = Instant::now() + Duration::from_secs(1);
    let mut sink = [0u8; 4096];
    while Instant::now() < until {
        match stream.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Decrements the active-client count (and forgets the connection) when a client thread ends.
struct ActiveGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.shared.conns.lock().remove(&self.id);
        let mut active = self.shared.active.lock();
        *active = active.saturating_sub(1);
        if *active == 0 {
            self.shared.idle.notify_all();
        }
    }
}

const LISTEN: mio::Token = mio::Token(0);
const WAKE: mio::Token = mio::Token(1);

/// The store server: hosted by rank 0 (or by the launcher, `ferrorun`) for the whole job.
///
/// Serves in background threads from [`bind`](Self::bind) until dropped.
pub struct TcpStoreServer {
    shared: Arc<Shared>,
    waker: mio::Waker,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpStoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStoreServer")
            .field("addr", &self.shared.addr)
            .finish()
    }
}

impl TcpStoreServer {
    /// Binds `addr` (port 0: any free port) and starts serving with the default
    /// [`ServerConfig`].
    pub fn bind(addr: SocketAddr) -> Result<TcpStoreServer> {
        Self::bind_with(addr, ServerConfig::default())
    }

    /// Binds `addr` and starts serving with `config`.
    pub fn bind_with(addr: SocketAddr, config: ServerConfig) -> Result<TcpStoreServer> {
        let listener = TcpListener::bind(addr).ctx(|| {
            format!(
                "binding the store server to {addr} (is the port in use by another job or process?)"
            )
        })?;
        Self::from_listener(listener, config)
    }

    /// Serves on a listener the caller has bound already (e.g. to tell "address in use" apart
    /// from other failures).
    pub fn from_listener(listener: TcpListener, config: ServerConfig) -> Result<TcpStoreServer> {
        let addr = listener
            .local_addr()
            .ctx(|| "reading the store server's address")?;
        listener
            .set_nonblocking(true)
            .ctx(|| format!("store server {addr}: configuring the listener"))?;
        let mut listener = mio::net::TcpListener::from_std(listener);
        let poll = mio::Poll::new().ctx(|| format!("store server {addr}: creating a poller"))?;
        let waker = mio::Waker::new(poll.registry(), WAKE)
            .ctx(|| format!("store server {addr}: creating a waker"))?;
        poll.registry()
            .register(&mut listener, LISTEN, mio::Interest::READABLE)
            .ctx(|| format!("store server {addr}: registering the listener"))?;
        let shared = Arc::new(Shared {
            data: Mutex::new(Data::default()),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            active: Mutex::new(0),
            idle: Condvar::new(),
            pending: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            log: Mutex::new(LogLimit::new()),
            addr,
            config,
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("ferrocomm-store-accept".into())
            .spawn(move || accept_loop(&s, poll, listener))
            .ctx(|| format!("store server {addr}: starting the accept thread"))?;
        tracing::debug!("store server listening on {addr}");
        if shared.config.secret.is_none() {
            auth::note_unauthenticated("store server");
        }
        Ok(TcpStoreServer {
            shared,
            waker,
            accept: Some(accept),
        })
    }

    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Stops the server (the same as dropping it): see the module docs.
    pub fn shutdown(self) {}

    /// Stops the server, answering every waiting and later request with `reason` (e.g.
    /// "rank 0 gave up: ..."), so that the clients say why the store went away.
    pub fn close_with(self, reason: &str) {
        self.shared.data.lock().closing = Some(reason.to_owned());
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        let shared = &self.shared;
        shared.stopping.store(true, Ordering::Release);
        if let Err(e) = self.waker.wake() {
            tracing::warn!(
                "store server {}: cannot wake the accept thread: {e}",
                shared.addr
            );
        }
        if let Some(h) = self.accept.take()
            && h.join().is_err()
        {
            tracing::warn!("store server {}: the accept thread panicked", shared.addr);
        }
        // No new connections now. Answer every waiting request first (with the reason, if
        // any), and let the replies go out before the connections are shut down.
        {
            let mut data = shared.data.lock();
            data.shutdown = true;
            for list in data.waiters.values() {
                for cv in list {
                    cv.notify_one();
                }
            }
        }
        let replies_by = Instant::now() + REPLY_WAIT;
        while shared.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < replies_by {
            std::thread::sleep(Duration::from_millis(1));
        }
        for s in shared.conns.lock().values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let deadline = Instant::now() + JOIN_WAIT;
        let mut active = shared.active.lock();
        while *active > 0 {
            if shared.idle.wait_until(&mut active, deadline).timed_out() {
                tracing::warn!(
                    "store server {}: {} client threads still running after shutdown",
                    shared.addr,
                    *active
                );
                break;
            }
        }
        shared.log.lock().flush(shared.addr);
        tracing::debug!("store server {} stopped", shared.addr);
    }
}

fn accept_loop(shared: &Arc<Shared>, mut poll: mio::Poll, listener: mio::net::TcpListener) {
    let mut events = mio::Events::with_capacity(16);
    let mut next_id = 0u64;
    let mut retry_in = None;
    loop {
        if let Err(e) = poll.poll(&mut events, retry_in)
            && e.kind() != io::ErrorKind::Interrupted
        {
            tracing::warn!("store server {}: poll failed: {e}", shared.addr);
            std::thread::sleep(Duration::from_millis(100));
        }
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        retry_in = None;
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    next_id += 1;
                    admit(shared, stream.into(), peer, next_id);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // E.g. out of file descriptors: the connection stays queued; try again soon.
                    tracing::warn!("store server {}: accept failed: {e}; retrying", shared.addr);
                    retry_in = Some(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

/// Tells a refused client why (best effort: a fresh socket takes a small write without
/// blocking) and logs it, rate-limited.
fn refuse(shared: &Shared, mut stream: TcpStream, why: String) {
    let _ = stream.write(&protocol::encode_response(&Response::Refused(why.clone())));
    shared.refusal(|| why);
}

fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr, id: u64) {
    {
        let mut active = shared.active.lock();
        if *active >= shared.config.max_clients {
            let why = format!(
                "the store server at {} already serves {} clients (its limit, \
                 FERROCOMM_STORE_MAX_CLIENTS); refusing {peer}",
                shared.addr, *active
            );
            drop(active);
            refuse(shared, stream, why);
            return;
        }
        let mut pending = shared.pending.lock();
        let n = pending.entry(peer.ip()).or_insert(0);
        if *n >= shared.config.max_pending_per_client {
            let why = format!(
                "{} already has {n} connections to the store server at {} that have not \
                 completed a request (the limit, FERROCOMM_STORE_MAX_PENDING); refusing {peer}",
                peer.ip(),
                shared.addr
            );
            drop(pending);
            drop(active);
            refuse(shared, stream, why);
            return;
        }
        *n += 1;
        *active += 1;
    }
    let pending = PendingGuard {
        shared: shared.clone(),
        ip: peer.ip(),
    };
    let guard = ActiveGuard {
        shared: shared.clone(),
        id,
    };
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.try_clone());
    match setup {
        Ok(clone) => {
            shared.conns.lock().insert(id, clone);
        }
        Err(e) => {
            shared.refusal(|| format!("dropping client {peer}: {e}"));
            return;
        }
    }
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("ferrocomm-store-conn".into())
        .stack_size(CONN_STACK)
        .spawn(move || {
            let _guard = guard;
            s.serve(stream, peer, pending);
        });
    if let Err(e) = spawned {
        // The closure (and with it the guards) was dropped: the counts are already restored.
        shared.refusal(|| format!("cannot start a thread for client {peer}: {e}"));
    }
}

/// A client of a [`TcpStoreServer`]; implements [`Store`].
///
/// `Send + Sync`: threads share it; concurrent calls use separate connections from a small
/// pool, so a long `get` in one thread does not hold up the others.
pub struct TcpStore {
    addr: String,
    /// Bounds every request that does not wait by itself.
    io_timeout: Duration,
    /// Connections ready for reuse, each with the time it was opened if it has not carried a
    /// request yet (the server drops those after its handshake timeout).
    idle: Mutex<Vec<(TcpStream, Option<Instant>)>>,
    /// The job secret every new connection authenticates with, if any.
    secret: Option<Secret>,
}

impl std::fmt::Debug for TcpStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStore")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Why a dial failed: the name did not resolve, or no connection to what it resolved to.
enum Dial {
    Resolve(io::Error),
    Connect(io::Error),
}

impl std::fmt::Display for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dial::Resolve(e) => write!(f, "the host name does not resolve: {e}"),
            Dial::Connect(e) => e.fmt(f),
        }
    }
}

impl From<Dial> for io::Error {
    fn from(d: Dial) -> io::Error {
        match d {
            Dial::Resolve(e) => {
                io::Error::new(e.kind(), format!("the host name does not resolve: {e}"))
            }
            Dial::Connect(e) => e,
        }
    }
}

fn connect_once(addr: &str, per_try: Duration) -> std::result::Result<TcpStream, Dial> {
    let resolved: Vec<SocketAddr> = addr.to_socket_addrs().map_err(Dial::Resolve)?.collect();
    if resolved.is_empty() {
        return Err(Dial::Resolve(io::Error::new(
            io::ErrorKind::NotFound,
            "the name resolved to no address",
        )));
    }
    let mut last = None;
    for sa in resolved {
        match TcpStream::connect_timeout(&sa, per_try.max(Duration::from_millis(1))) {
            Ok(s) => {
                s.set_nodelay(true).map_err(Dial::Connect)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(Dial::Connect(
        last.unwrap_or_else(|| io::ErrorKind::NotConnected.into()),
    ))
}

/// A connection's last will, armed on a store connection of its own ([`TcpStore::last_will`]):
/// if this value is dropped (or the process dies) without [`disarm`](Self::disarm), the
/// store sets the will's key.
pub struct LastWill {
    stream: TcpStream,
    addr: String,
    timeout: Duration,
}

impl std::fmt::Debug for LastWill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LastWill")
            .field("store", &self.addr)
            .finish()
    }
}

impl LastWill {
    /// Withdraws the will and closes its connection: the key is not set.
    pub fn disarm(mut self) -> Result<()> {
        let frame = protocol::encode_request(&Request::Will {
            key: String::new(),
            value: Vec::new(),
        })
        .map_err(|e| Error::invalid("LastWill::disarm", "key", e.to_string()))?;
        let addr = self.addr.clone();
        let io = |e: io::Error| {
            Error::io(
                format!("store tcp://{addr}: withdrawing this process's last will"),
                e,
            )
        };
        self.stream
            .set_read_timeout(Some(self.timeout))
            .map_err(io)?;
        self.stream
            .set_write_timeout(Some(self.timeout))
            .map_err(io)?;
        self.stream.write_all(&frame).map_err(io)?;
        let mut hb = [0u8; RESPONSE_HEADER_LEN];
        self.stream.read_exact(&mut hb).map_err(io)?;
        match ResponseHeader::decode(&hb) {
            Ok(h) if h.status == protocol::Status::Ok && h.body_len == 0 => Ok(()),
            _ => Err(Error::misbehaved(
                format!("store tcp://{}", self.addr),
                "unexpected reply to withdrawing a will",
            )),
        }
    }
}

/// The client's side of the handshake of [`crate::auth`] on a fresh connection.
fn client_handshake(
    s: &mut TcpStream,
    secret: &Secret,
    addr: &str,
    timeout: Duration,
) -> Result<()> {
    let failed = |why: String| Error::JobMismatch {
        store: format!("tcp://{addr}"),
        detail: format!("authentication failed: {why}; {}", auth::HINT),
    };
    let io = |e: io::Error| {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            Error::Timeout {
                op: format!("authenticating to the store at {addr}"),
                waited: timeout,
                detail: "the store did not answer the handshake (is it overloaded or stopped?)"
                    .into(),
            }
        } else {
            failed(format!("the connection failed during the handshake: {e}"))
        }
    };
    let (hs, init) =
        ClientHandshake::start(secret, Channel::Store).map_err(|e| failed(e.to_string()))?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.write_all(&init).map_err(io)?;
    let mut challenge = [0u8; auth::CHALLENGE_LEN];
    s.read_exact(&mut challenge[..RESPONSE_HEADER_LEN])
        .map_err(io)?;
    if let Ok(h) = ResponseHeader::decode(&challenge[..RESPONSE_HEADER_LEN]) {
        // Not a challenge but a reply: the server refuses (over its client limit, or it
        // wants no authentication from a client like this). Bounded by the header check.
        let mut body = vec![0u8; h.body_len as usize];
        s.read_exact(&mut body).map_err(io)?;
        return Err(match protocol::decode_response_body(&h, &body) {
            Ok(Response::Refused(m)) => Error::io(
                format!("store tcp://{addr}: {m}"),
                io::Error::from(io::ErrorKind::ConnectionRefused),
            ),
            _ => failed("the store answered the handshake with a reply".into()),
        });
    }
    s.read_exact(&mut challenge[RESPONSE_HEADER_LEN..])
        .map_err(io)?;
    let proof = hs.answer(&challenge).map_err(|e| failed(e.to_string()))?;
    s.write_all(&proof).map_err(io)?;
    Ok(())
}

/// Formats a key list for an error message, at most 20 keys.
fn fmt_keys(keys: &[String]) -> String {
    const SHOWN: usize = 20;
    let mut s = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    s
}

impl TcpStore {
    /// Connects to the store at `addr` (`"host:port"`, `"[::1]:port"`), retrying while it is
    /// not up yet (connection refused, name not resolvable, unreachable) until `timeout`, and
    /// logging every [`DEFAULT_LOG_INTERVAL`] that it is still waiting. The same `timeout`
    /// bounds every later request that does not wait by itself.
    pub fn connect(addr: &str, timeout: Duration) -> Result<TcpStore> {
        Self::connect_with(addr, timeout, DEFAULT_LOG_INTERVAL)
    }

    /// [`connect`](Self::connect), logging every `log_interval`.
    ///
    /// The timeout bounds the connection attempts and, until
    /// [`set_request_timeout`](Self::set_request_timeout) says otherwise, every later request
    /// that does not wait by itself.
    pub fn connect_with(addr: &str, timeout: Duration, log_interval: Duration) -> Result<TcpStore> {
        Self::connect_secure(addr, timeout, log_interval, None)
    }

    /// [`connect_with`](Self::connect_with), authenticating every connection with `secret`
    /// (see [`crate::auth`]); `None` connects without authentication. Authentication
    /// failures are not retried: they end in [`Error::JobMismatch`] saying
    /// "authentication failed".
    pub fn connect_secure(
        addr: &str,
        timeout: Duration,
        log_interval: Duration,
        secret: Option<Secret>,
    ) -> Result<TcpStore> {
        if secret.is_none() {
            auth::note_unauthenticated("store client");
        }
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            }
            _ => {
                return Err(Error::invalid(
                    "TcpStore::connect",
                    "addr",
                    format!(
                        "{addr:?} is not HOST:PORT (IPv6: [ADDR]:PORT) with a port from 1 to 65535"
                    ),
                ));
            }
        }
        let start = Instant::now();
        let deadline = start.checked_add(timeout);
        let mut last_log = start;
        let mut backoff = Duration::from_millis(10);
        let mut unresolved_since: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let remaining =
                deadline.map_or(Duration::from_secs(5), |d| d.saturating_duration_since(now));
            let err = match connect_once(addr, remaining.min(Duration::from_secs(5))) {
                Ok(mut s) => {
                    let io_timeout = timeout.max(Duration::from_millis(1));
                    if let Some(secret) = &secret {
                        client_handshake(&mut s, secret, addr, io_timeout)?;
                    }
                    tracing::debug!("connected to the store at {addr}");
                    return Ok(TcpStore {
                        addr: addr.to_owned(),
                        io_timeout,
                        idle: Mutex::new(vec![(s, Some(Instant::now()))]),
                        secret,
                    });
                }
                Err(Dial::Resolve(e)) => {
                    let since = *unresolved_since.get_or_insert(now);
                    if now - since >= RESOLVE_GRACE || deadline.is_some_and(|d| now >= d) {
                        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                        return Err(Error::io(
                            format!(
                                "store tcp://{addr}: the host name {host:?} does not resolve \
                                 (tried for {:.0?}); check the master address (MASTER_ADDR or \
                                 the tcp:// host) and this machine's DNS or /etc/hosts",
                                now - start
                            ),
                            io::Error::new(e.kind(), e.to_string()),
                        ));
                    }
                    Dial::Resolve(e)
                }
                Err(e) => {
                    unresolved_since = None;
                    e
                }
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout {
                    op: format!("connecting to the store at {addr}"),
                    waited: now - start,
                    detail: format!(
                        "no store answered at {addr} (last error: {err}); check that the process \
                         hosting the store (rank 0, or the launcher when FERROCOMM_STORE_EXTERNAL=1) \
                         is running, that MASTER_ADDR/MASTER_PORT or the tcp:// address name it, and \
                         that no firewall blocks the port; FERROCOMM_TIMEOUT (seconds) raises the limit"
                    ),
                });
            }
            if now - last_log >= log_interval {
                last_log = now;
                tracing::warn!(
                    "waiting for store at {addr} for {:.0?} ({err}); retrying for up to {timeout:?} in all",
                    now - start
                );
            }
            let pause = deadline.map_or(backoff, |d| backoff.min(d.saturating_duration_since(now)));
            std::thread::sleep(pause);
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Sets how long a request that does not wait by itself (`set`, `add`, `check`...) may
    /// take before it fails with [`Error::Timeout`] (initially the connect timeout).
    /// Waiting requests (`get`, `wait`) are bounded by their own timeout plus a grace period.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.io_timeout = timeout.max(Duration::from_millis(1));
    }

    /// The address this client connects to, as given to [`connect`](Self::connect).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// A fresh connection to the store, authenticated if there is a secret.
    fn open(&self) -> Result<TcpStream> {
        let mut s = connect_once(&self.addr, self.io_timeout.min(Duration::from_secs(30)))
            .map_err(io::Error::from)
            .ctx(|| {
                format!(
                    "store tcp://{}: opening another connection (the store host, rank 0 or the \
                     launcher, may be gone: it exited, gave up or was killed; see its log)",
                    self.addr
                )
            })?;
        if let Some(secret) = &self.secret {
            client_handshake(&mut s, secret, &self.addr, self.io_timeout)?;
        }
        Ok(s)
    }

    fn checkout(&self) -> Result<TcpStream> {
        loop {
            let Some((s, fresh)) = self.idle.lock().pop() else {
                break;
            };
            // Never used and old: the server may have dropped it as idle; open another.
            if fresh.is_none_or(|t| t.elapsed() < FRESH_FOR) {
                return Ok(s);
            }
        }
        self.open()
    }

    fn checkin(&self, s: TcpStream) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push((s, None));
        }
    }

    /// Arms a last will on a connection of its own: if the returned value is dropped, or
    /// this process dies, before [`LastWill::disarm`], the server sets `key` to `value`
    /// (unless `key` is set already). See [`protocol`] (`Will`).
    pub fn last_will(&self, key: &str, value: &[u8]) -> Result<LastWill> {
        if key.is_empty() {
            return Err(Error::invalid(
                "TcpStore::last_will",
                "key",
                "the key must not be empty",
            ));
        }
        let req = Request::Will {
            key: key.to_owned(),
            value: value.to_vec(),
        };
        let mut stream = self.open()?;
        match self.exchange(&mut stream, "last_will", &req, None)? {
            Response::Ok(v) if v.is_empty() => Ok(LastWill {
                stream,
                addr: self.addr.clone(),
                timeout: self.io_timeout,
            }),
            r => Err(self.unexpected("last_will", &r)),
        }
    }

    fn io_error(&self, what: &str, e: io::Error, read_timeout: Duration) -> Error {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            Error::Timeout {
                op: format!("store {what}"),
                waited: read_timeout,
                detail: format!(
                    "no reply from the store at tcp://{} (is the process hosting it overloaded or stopped?)",
                    self.addr
                ),
            }
        } else if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ) {
            Error::io(
                format!(
                    "store tcp://{}: {what}: the store host closed the connection (the process \
                     hosting the store, rank 0 or the launcher, exited, gave up or was killed; \
                     its log says why)",
                    self.addr
                ),
                io::Error::new(e.kind(), "connection closed by the store host"),
            )
        } else {
            Error::io(
                format!(
                    "store tcp://{}: {what}: connection failed (is the process hosting the store still running?)",
                    self.addr
                ),
                e,
            )
        }
    }

    /// Sends `req` on `stream` and reads the response; a stopping server's answer becomes
    /// an error that says so (and why, when the server's owner said).
    fn exchange(
        &self,
        stream: &mut TcpStream,
        what: &str,
        req: &Request,
        wait: Option<Duration>,
    ) -> Result<Response> {
        let frame = protocol::encode_request(req)
            .map_err(|e| Error::invalid(format!("Store::{what}"), "key/value", e.to_string()))?;
        let read_timeout = wait
            .map_or(self.io_timeout, |w| {
                w.min(protocol::MAX_TIMEOUT).saturating_add(WAIT_GRACE)
            })
            .max(Duration::from_millis(1));
        let peer = format!("store tcp://{}", self.addr);
        let io = |e| self.io_error(what, e, read_timeout);
        let s = stream;
        s.set_read_timeout(Some(read_timeout)).map_err(io)?;
        s.set_write_timeout(Some(self.io_timeout)).map_err(io)?;
        s.write_all(&frame).map_err(io)?;
        let mut hb = [0u8; RESPONSE_HEADER_LEN];
        s.read_exact(&mut hb).map_err(io)?;
        let h = ResponseHeader::decode(&hb)
            .map_err(|e| Error::misbehaved(&peer, format!("bad reply header to {what}: {e}")))?;
        let mut body = vec![0u8; h.body_len as usize];
        s.read_exact(&mut body).map_err(io)?;
        let resp = protocol::decode_response_body(&h, &body)
            .map_err(|e| Error::misbehaved(&peer, format!("bad reply to {what}: {e}")))?;
        match resp {
            Response::ShuttingDown => Err(Error::io(
                format!(
                    "store tcp://{}: {what}: the store server is shutting down (the process hosting it \
                     — rank 0 or the launcher — is exiting)",
                    self.addr
                ),
                io::Error::from(io::ErrorKind::ConnectionAborted),
            )),
            Response::Closing(why) => Err(Error::io(
                format!(
                    "store tcp://{}: {what}: the store host closed the store: {why}",
                    self.addr
                ),
                io::Error::from(io::ErrorKind::ConnectionAborted),
            )),
            Response::BadRequest(m) => Err(Error::invalid(format!("Store::{what}"), "key", m)),
            Response::Refused(m) => Err(Error::io(
                format!("store tcp://{}: {what}: {m}", self.addr),
                io::Error::from(io::ErrorKind::ConnectionRefused),
            )),
            r => Ok(r),
        }
    }

    /// Sends one request and reads its response on a pooled connection.
    fn request(&self, what: &str, req: &Request, wait: Option<Duration>) -> Result<Response> {
        let mut stream = self.checkout()?;
        let resp = self.exchange(&mut stream, what, req, wait)?;
        self.checkin(stream);
        Ok(resp)
    }

    fn unexpected(&self, what: &str, r: &Response) -> Error {
        let kind = match r {
            Response::Ok(v) => format!("a value of {} bytes", v.len()),
            Response::NotFound => "not found".into(),
            Response::Timeout(_) => "timeout".into(),
            Response::BadRequest(_) => "bad request".into(),
            Response::ShuttingDown => "shutting down".into(),
            Response::Refused(_) => "refused".into(),
            Response::Closing(_) => "closing".into(),
        };
        Error::misbehaved(
            format!("store tcp://{}", self.addr),
            format!("unexpected reply to {what}: {kind}"),
        )
    }

    fn timeout(&self, what: &str, waited: Duration, missing: &[String]) -> Error {
        Error::Timeout {
            op: format!("store {what}"),
            waited,
            detail: format!(
                "keys not set: {} (store tcp://{})",
                fmt_keys(missing),
                self.addr
            ),
        }
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let req = Request::Set {
            key: key.to_owned(),
            value: value.to_vec(),
        };
        match self.request("set", &req, None)? {
            Response::Ok(_) => Ok(()),
            r => Err(self.unexpected("set", &r)),
        }
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let req = Request::Get {
            key: key.to_owned(),
            timeout,
        };
        match self.request("get", &req, Some(timeout))? {
            Response::Ok(v) => Ok(v),
            Response::Timeout(missing) => Err(self.timeout("get", timeout, &missing)),
            r => Err(self.unexpected("get", &r)),
        }
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.request(
            "try_get",
            &Request::TryGet {
                key: key.to_owned(),
            },
            None,
        )? {
            Response::Ok(v) => Ok(Some(v)),
            Response::NotFound => Ok(None),
            r => Err(self.unexpected("try_get", &r)),
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let req = Request::Add {
            key: key.to_owned(),
            delta,
        };
        match self.request("add", &req, None)? {
            Response::Ok(v) if v.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                Ok(i64::from_le_bytes(b))
            }
            r => Err(self.unexpected("add", &r)),
        }
    }

    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>> {
        let req = Request::CompareSet {
            key: key.to_owned(),
            expected: expected.map(<[u8]>::to_vec),
            desired: desired.to_vec(),
        };
        match self.request("compare_set", &req, None)? {
            Response::Ok(v) => Ok(v),
            r => Err(self.unexpected("compare_set", &r)),
        }
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let req = Request::Wait {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            timeout,
        };
        match self.request("wait", &req, Some(timeout))? {
            Response::Ok(_) => Ok(()),
            Response::Timeout(missing) => Err(self.timeout("wait", timeout, &missing)),
            r => Err(self.unexpected("wait", &r)),
        }
    }

    fn check(&self, keys: &[&str]) -> Result<Vec<bool>> {
        let req = Request::Check {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        };
        match self.request("check", &req, None)? {
            Response::Ok(v) if v.len() == keys.len() => Ok(v.into_iter().map(|b| b != 0).collect()),
            r => Err(self.unexpected("check", &r)),
        }
    }

    fn delete(&self, key: &str) -> Result<bool> {
        match self.request(
            "delete",
            &Request::Delete {
                key: key.to_owned(),
            },
            None,
        )? {
            Response::Ok(v) if v.len() == 1 => Ok(v[0] != 0),
            r => Err(self.unexpected("delete", &r)),
        }
    }

    fn describe(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}
