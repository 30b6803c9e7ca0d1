//! [`TcpStoreServer`] and its client [`TcpStore`]: the store of `tcp://` and `env://` jobs.
//!
//! The server keeps every key in memory and serves each client connection on its own thread
//! (at most [`ServerConfig::max_clients`] at once; more are accepted and closed at once, with
//! a logged refusal). Requests use the binary protocol of [`super::protocol`]. Waiting
//! requests (`get` of an absent key, `wait`) block the client's server thread for at most the
//! timeout the client sent; writes (`set`, `add`, a successful `compare_set`) wake exactly the
//! waiters of the key written. A waiter registers under the first key it still misses, so a
//! write wakes only the waiters that can make progress: bootstrap at thousands of ranks does
//! not turn every `set` into a thundering herd.
//!
//! Bad input never takes the server down: a client that sends garbage, a truncated frame, an
//! oversized length, or stalls for more than [`ServerConfig::frame_timeout`] in the middle of
//! a frame gets its connection closed with a `tracing::warn!`; every length is checked
//! against the protocol limits before anything is allocated; other clients are unaffected.
//! An idle client (between frames) may stay connected as long as it likes.
//!
//! Dropping the server (or [`TcpStoreServer::shutdown`]) stops it promptly: the accept thread
//! is woken and joined, every client connection is shut down, waiting requests are answered
//! with a "shutting down" status, and the client threads are waited for (up to a few
//! seconds).
//!
//! The client, [`TcpStore`], keeps a small pool of connections: a thread blocked in a long
//! `get` does not block `set`s from other threads of the same process, which use another
//! connection. Counters written by `add` are stored as the decimal text of an `i64`. A
//! `compare_set` that fails on an absent key returns an empty value.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Tunables of a [`TcpStoreServer`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Client connections served at once; further ones are closed at once with a logged
    /// refusal. Default 4096 (`FERROCOMM_STORE_MAX_CLIENTS`).
    pub max_clients: usize,
    /// Longest pause allowed in the middle of a request frame (and for writing a response)
    /// before the connection is closed. Default 30 s.
    pub frame_timeout: Duration,
    /// The job secret: when set, every connection must pass the challenge-response of
    /// [`crate::auth`] before its first request, and clients without it are refused.
    pub secret: Option<Secret>,
    /// How long a new connection may take to authenticate (with a secret) before it is
    /// dropped with a log line. Default 10 s (`FERROCOMM_HANDSHAKE_TIMEOUT`).
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
    /// The defaults adjusted by `FERROCOMM_STORE_MAX_CLIENTS`, `FERROCOMM_HANDSHAKE_TIMEOUT`
    /// (seconds) and `FERROCOMM_SECRET`.
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
    addr: SocketAddr,
    config: ServerConfig,
}

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
                return Some(Response::ShuttingDown);
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
        }
    }

    /// Reads, answers and returns `Ok(true)` for one request; `Ok(false)` when the client
    /// closed the connection between frames; `Err` with what to log otherwise.
    fn serve_one(&self, stream: &mut TcpStream) -> std::result::Result<bool, String> {
        let mut header = [0u8; REQUEST_HEADER_LEN];
        // Between frames a client may stay idle as long as it likes.
        stream
            .set_read_timeout(None)
            .map_err(|e| format!("cannot configure the socket: {e}"))?;
        loop {
            match stream.read(&mut header[..1]) {
                Ok(0) => return Ok(false),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
        let frame_timeout = self.config.frame_timeout;
        stream
            .set_read_timeout(Some(frame_timeout))
            .map_err(|e| format!("cannot configure the socket: {e}"))?;
        let stalled = |e: io::Error, what: &str| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("stalled for more than {frame_timeout:?} inside a request {what}")
            }
            io::ErrorKind::UnexpectedEof => {
                format!("truncated request {what} (connection closed inside it)")
            }
            _ => format!("read failed inside a request {what}: {e}"),
        };
        stream
            .read_exact(&mut header[1..])
            .map_err(|e| stalled(e, "header"))?;
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
        stream
            .read_exact(&mut body)
            .map_err(|e| stalled(e, "body"))?;
        let req =
            protocol::decode_request_body(&h, &body).map_err(|e| format!("bad request: {e}"))?;
        drop(body);
        let resp = self.handle(req);
        stream
            .write_all(&protocol::encode_response(&resp))
            .map_err(|e| format!("cannot send the reply: {e}"))?;
        Ok(true)
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

    fn serve(&self, mut stream: TcpStream, peer: SocketAddr) {
        if let Err(e) = stream.set_write_timeout(Some(self.config.frame_timeout)) {
            tracing::warn!(
                "store server {}: closing connection of {peer}: {e}",
                self.addr
            );
            return;
        }
        // PyTorch `TCPStore` clients start with a 0x00 byte; `torch_server` serves them.
        let limit = self
            .config
            .secret
            .as_ref()
            .map(|_| self.config.handshake_timeout);
        let kind = torch_server::detect(&stream, limit);
        if let (torch_server::Kind::Silent, Some(limit)) = (&kind, limit) {
            if !self.stopping.load(Ordering::Acquire) {
                tracing::warn!(
                    "store server {}: refusing client {peer}: no authentication within \
                     {limit:?} (half-open handshake dropped)",
                    self.addr
                );
            }
            return;
        }
        if let torch_server::Kind::Torch = kind {
            if self.config.secret.is_some() && !self.config.allow_torch {
                if let Some(n) = torch_server::log_refusal() {
                    tracing::warn!(
                        "store server {}: refusing PyTorch TCPStore client {peer} ({n} so far): \
                         this store requires the job secret (FERROCOMM_SECRET) and torch's \
                         protocol cannot authenticate; set FERROCOMM_STORE_ALLOW_TORCH=1 where \
                         the store is hosted to serve torch clients without authentication",
                        self.addr
                    );
                }
                linger_close(&mut stream);
                return;
            }
            return torch_server::serve(self, stream, peer);
        }
        if let Some(secret) = &self.config.secret {
            if let Err(why) = self.authenticate(&mut stream, secret) {
                if !self.stopping.load(Ordering::Acquire) {
                    tracing::warn!("store server {}: refusing client {peer}: {why}", self.addr);
                }
                return;
            }
            tracing::debug!("store server {}: client {peer} authenticated", self.addr);
        }
        loop {
            match self.serve_one(&mut stream) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!("store server {}: client {peer} disconnected", self.addr);
                    return;
                }
                Err(why) => {
                    if !self.stopping.load(Ordering::Acquire) {
                        tracing::warn!(
                            "store server {}: closing connection of client {peer}: {why}",
                            self.addr
                        );
                    }
                    return;
                }
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
        // No new connections now. Wake everything the client threads may block on.
        for s in shared.conns.lock().values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        {
            let mut data = shared.data.lock();
            data.shutdown = true;
            for list in data.waiters.values() {
                for cv in list {
                    cv.notify_one();
                }
            }
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
        tracing::debug!("store server {} stopped", shared.addr);
    }
}

fn accept_loop(shared: &Arc<Shared>, mut poll: mio::Poll, listener: mio::net::TcpListener) {
    let mut events = mio::Events::with_capacity(16);
    let mut next_id = 0u64;
    let mut refused = 0u64;
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
                    admit(shared, stream.into(), peer, next_id, &mut refused);
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

fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr, id: u64, refused: &mut u64) {
    {
        let mut active = shared.active.lock();
        if *active >= shared.config.max_clients {
            *refused += 1;
            let why = format!(
                "the store server at {} already serves {} clients (its limit); refusing {peer}",
                shared.addr, *active
            );
            if *refused == 1 || refused.is_multiple_of(1000) {
                tracing::warn!("{why}; {refused} refused so far");
            }
            // Best effort: tell the client why before closing (a fresh socket takes a small
            // write without blocking).
            let mut stream = stream;
            let _ = stream.write(&protocol::encode_response(&Response::Refused(why)));
            return;
        }
        *active += 1;
    }
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
            tracing::warn!("store server {}: dropping client {peer}: {e}", shared.addr);
            return;
        }
    }
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("ferrocomm-store-conn".into())
        .stack_size(CONN_STACK)
        .spawn(move || {
            let _guard = guard;
            s.serve(stream, peer);
        });
    if let Err(e) = spawned {
        // The closure (and with it the guard) was dropped: the count is already restored.
        tracing::warn!(
            "store server {}: cannot start a thread for client {peer}: {e}",
            shared.addr
        );
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
    idle: Mutex<Vec<TcpStream>>,
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

fn connect_once(addr: &str, per_try: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for sa in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sa, per_try.max(Duration::from_millis(1))) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
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
                        idle: Mutex::new(vec![s]),
                        secret,
                    });
                }
                Err(e) => e,
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

    fn checkout(&self) -> Result<TcpStream> {
        if let Some(s) = self.idle.lock().pop() {
            return Ok(s);
        }
        let mut s = connect_once(&self.addr, self.io_timeout.min(Duration::from_secs(30))).ctx(|| {
            format!(
                "store tcp://{}: opening another connection (is the process hosting the store still running?)",
                self.addr
            )
        })?;
        if let Some(secret) = &self.secret {
            client_handshake(&mut s, secret, &self.addr, self.io_timeout)?;
        }
        Ok(s)
    }

    fn checkin(&self, s: TcpStream) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(s);
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

    /// Sends one request and reads its response on a pooled connection.
    fn request(&self, what: &str, req: &Request, wait: Option<Duration>) -> Result<Response> {
        let frame = protocol::encode_request(req)
            .map_err(|e| Error::invalid(format!("Store::{what}"), "key/value", e.to_string()))?;
        let mut stream = self.checkout()?;
        let read_timeout = wait
            .map_or(self.io_timeout, |w| {
                w.min(protocol::MAX_TIMEOUT).saturating_add(WAIT_GRACE)
            })
            .max(Duration::from_millis(1));
        let peer = format!("store tcp://{}", self.addr);
        let exchange = |s: &mut TcpStream| -> Result<Response> {
            let io = |e| self.io_error(what, e, read_timeout);
            s.set_read_timeout(Some(read_timeout)).map_err(io)?;
            s.set_write_timeout(Some(self.io_timeout)).map_err(io)?;
            s.write_all(&frame).map_err(io)?;
            let mut hb = [0u8; RESPONSE_HEADER_LEN];
            s.read_exact(&mut hb).map_err(io)?;
            let h = ResponseHeader::decode(&hb).map_err(|e| {
                Error::misbehaved(&peer, format!("bad reply header to {what}: {e}"))
            })?;
            let mut body = vec![0u8; h.body_len as usize];
            s.read_exact(&mut body).map_err(io)?;
            protocol::decode_response_body(&h, &body)
                .map_err(|e| Error::misbehaved(&peer, format!("bad reply to {what}: {e}")))
        };
        let resp = exchange(&mut stream)?;
        self.checkin(stream);
        match resp {
            Response::ShuttingDown => Err(Error::io(
                format!(
                    "store tcp://{}: {what}: the store server is shutting down (the process hosting it \
                     — rank 0 or the launcher — is exiting)",
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

    fn unexpected(&self, what: &str, r: &Response) -> Error {
        let kind = match r {
            Response::Ok(v) => format!("a value of {} bytes", v.len()),
            Response::NotFound => "not found".into(),
            Response::Timeout(_) => "timeout".into(),
            Response::BadRequest(_) => "bad request".into(),
            Response::ShuttingDown => "shutting down".into(),
            Response::Refused(_) => "refused".into(),
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
