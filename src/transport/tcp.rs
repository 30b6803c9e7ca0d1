//! TCP transport on mio: non-blocking sockets, one poller per rank, no I/O thread.
//!
//! # Connections
//!
//! Every pair of ranks shares one connection, used both ways, opened lazily by whichever
//! rank sends first, so a job only pays for the pairs it uses. (One connection per
//! direction would avoid the handshake below, but then every message needs a separate
//! acknowledgement packet instead of riding on the reply: measured here, that costs a
//! microsecond per message, a third of a loopback ping-pong.)
//!
//! The caller sends a [`Hello`] naming the job (hash of its id), the world size and its
//! rank, and waits for the acceptor's answer before sending frames. The acceptor refuses
//! (logs and closes) anything not of this job, and drops a connection that has not said
//! hello within the handshake deadline. When two ranks dial each other at the same moment,
//! both keep the connection dialled by the lower rank: the higher rank's acceptor takes it
//! and drops its own attempt, the lower rank's acceptor answers `Refuse` to the other.
//!
//! # Messages
//!
//! Frames are those of [`crate::wire`]. Messages up to the eager limit go whole, as one
//! `Eager` frame (header and payload in one `writev`). Larger ones go by rendezvous: `Rts`,
//! then the receiver's `Cts` once a buffer is posted, then one `Data` frame read straight
//! into that buffer. Reads go through a 64 KiB staging buffer so that many small frames cost
//! one system call; a large payload is read directly into the destination.
//!
//! # Waiting
//!
//! [`Transport::progress`] polls with a zero timeout; [`Transport::wait`] blocks in
//! `epoll_wait` until a socket is ready or the waker fires. The communicator spins on
//! `progress` briefly before it calls `wait`.
//!
//! # Failures
//!
//! End of stream, a reset, a refused or timed-out connect, or a malformed frame fails the
//! peer: every buffer of it is forgotten, its sockets are closed and [`Events::peer_failed`]
//! is reported once. When sending fails (the peer closed or reset the connection), what the
//! peer sent before is read and delivered first, and the failure reported after it: a peer
//! that gives up a collective sends a notice saying why and then closes, and its notice
//! must not be lost to the error of a send that happened to come first.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll, Token as MioToken};

use super::{Envelope, Events, Placement, RecvBuf, SendBuf, Sent, Stored, Token, Transport, Waker};
use crate::auth::{self, Channel, ClientHandshake, Secret, ServerHandshake};
use crate::error::{Error, IoContext, Result};
use crate::wire::{FRAME_HEADER_LEN, FrameHeader, FrameKind, HELLO_LEN, Hello, HelloKind};

/// Settings of the TCP transport.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Messages up to this many bytes go eagerly (one frame); larger ones by rendezvous.
    /// `FERROCOMM_TCP_EAGER_LIMIT`, default 64 KiB.
    pub eager_limit: usize,
    /// Largest message accepted from a peer (a sanity bound against corrupted lengths).
    pub max_message: u64,
    /// How long an outgoing connection may take to establish.
    pub connect_timeout: Duration,
    /// How long an accepted connection may take to authenticate and say hello before it is
    /// dropped with a log line. `FERROCOMM_HANDSHAKE_TIMEOUT` (seconds), default 10 s.
    pub handshake_timeout: Duration,
    /// The job secret: with one, every connection opens with the challenge-response of
    /// [`crate::auth`] and peers without it are refused. `FERROCOMM_SECRET`.
    pub secret: Option<Secret>,
    /// `SO_SNDBUF`/`SO_RCVBUF` to request; `None` leaves the kernel's autotuning, which on
    /// Linux grows buffers up to `tcp_wmem`/`tcp_rmem` (4-6 MiB) and is usually best.
    /// `FERROCOMM_SOCKET_BUFFER` (bytes).
    pub socket_buffer: Option<usize>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            eager_limit: 64 * 1024,
            max_message: 1 << 42,
            connect_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            socket_buffer: None,
            secret: None,
        }
    }
}

impl TcpConfig {
    /// The defaults, adjusted by `FERROCOMM_TCP_EAGER_LIMIT`, `FERROCOMM_SOCKET_BUFFER`,
    /// `FERROCOMM_HANDSHAKE_TIMEOUT` and `FERROCOMM_SECRET`.
    pub fn from_env() -> Result<TcpConfig> {
        Self::from_lookup(&crate::config::process_env)
    }

    pub(crate) fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<TcpConfig> {
        let mut cfg = TcpConfig::default();
        if let Some(n) = crate::config::size(lookup, "FERROCOMM_TCP_EAGER_LIMIT")? {
            cfg.eager_limit = n.min(1 << 30);
        }
        cfg.socket_buffer = crate::config::size(lookup, "FERROCOMM_SOCKET_BUFFER")?;
        if let Some(t) = crate::config::seconds(lookup, "FERROCOMM_HANDSHAKE_TIMEOUT")? {
            cfg.handshake_timeout = t.max(Duration::from_millis(1));
        }
        cfg.secret = Secret::from_lookup(lookup);
        Ok(cfg)
    }
}

/// Bytes of the per-connection staging buffer for reads.
const STAGING: usize = 64 * 1024;
/// Payload remainders at least this large are read straight into the destination.
const DIRECT_READ_MIN: usize = 16 * 1024;
/// Frames gathered into one `writev`.
const MAX_IOV_FRAMES: usize = 32;
/// Accepted connections awaiting their hello, at most.
const MAX_PENDING: usize = 4096;

const LISTENER: MioToken = MioToken(0);
const WAKER: MioToken = MioToken(1);
const FIRST_PEER_TOKEN: usize = 2;

/// Binds a listening socket on `ip`, any free port, for a transport to use later.
pub fn bind(ip: IpAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .ctx(|| format!("binding the TCP transport's listening socket on {ip}"))?;
    listener
        .set_nonblocking(true)
        .ctx(|| "making the TCP listener non-blocking")?;
    Ok(listener)
}

/// The local address used to reach `remote`: the interface the routing table picks for it.
/// A connected UDP socket sends nothing; it only asks the kernel for the route.
pub fn local_ip_towards(remote: IpAddr) -> Result<IpAddr> {
    if remote.is_loopback() {
        return Ok(remote);
    }
    let any: SocketAddr = if remote.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(any).ctx(|| "opening a UDP socket to find the route")?;
    sock.connect(SocketAddr::new(remote, 9))
        .ctx(|| format!("finding the local interface that reaches {remote}"))?;
    Ok(sock
        .local_addr()
        .ctx(|| "reading the routed local address")?
        .ip())
}

/// One outgoing frame, written as header then payload.
struct Frame {
    head: [u8; FRAME_HEADER_LEN],
    data: SendBuf,
    /// Bytes of head + data already written.
    off: usize,
    /// Reported done when the frame is fully written.
    token: Option<Token>,
}

impl Frame {
    fn total(&self) -> usize {
        FRAME_HEADER_LEN + self.data.len
    }
}

/// A connection this rank is setting up: connect, send hello, read the answer.
struct Dialing {
    stream: TcpStream,
    connected: bool,
    /// What to send next: the authentication `Init`, or (proof and) hello.
    out: Vec<u8>,
    sent: usize,
    /// What to read next: the challenge, or the answer to our hello (its length).
    answer: Vec<u8>,
    got: usize,
    /// Waiting for the acceptor's challenge (a job secret is set).
    auth: Option<ClientHandshake>,
    started: Instant,
}

/// Where the payload being read goes.
enum Dst {
    User(RecvBuf, Token),
    Owned(Vec<u8>, Envelope),
    Discard,
}

enum Rx {
    Header,
    Payload { dst: Dst, len: usize, got: usize },
}

/// An established connection with a peer: frames both ways.
struct Conn {
    stream: TcpStream,
    /// Reading may return more bytes (or the end of the stream).
    readable: bool,
    writable: bool,
    /// Readiness said the peer's side closed (or the socket has an error): the end of the
    /// stream (or the error) follows the bytes still queued, and edge-triggered readiness
    /// will not announce it again, so reads go on until they reach it (see `after_read`).
    hup: bool,
    /// The acceptor's answer, written before any frame.
    preface: Option<([u8; HELLO_LEN], usize)>,
    rx: Rx,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl Conn {
    fn new(stream: TcpStream, preface: Option<[u8; HELLO_LEN]>) -> Conn {
        Conn {
            stream,
            readable: true,
            writable: true,
            hup: false,
            preface: preface.map(|p| (p, 0)),
            rx: Rx::Header,
            buf: vec![0u8; STAGING].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }
}

/// How far an accepted connection has come in its handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading the first bytes: an authentication `Init` or a hello?
    Start,
    /// Reading the `Init`.
    Init,
    /// Challenge sent; reading the proof and the hello behind it.
    Proof,
    /// Reading a hello that came without authentication.
    Hello,
}

/// Bytes an accepted connection may send before our answer, at most.
const PENDING_BUF: usize = auth::PROOF_LEN + HELLO_LEN;

/// An accepted connection that has not said hello yet.
struct Pending {
    stream: TcpStream,
    addr: SocketAddr,
    buf: [u8; PENDING_BUF],
    got: usize,
    /// Bytes the current stage reads.
    want: usize,
    stage: Stage,
    auth: Option<ServerHandshake>,
    since: Instant,
    /// Its hello claimed this rank, which is already connected: either the attempt that
    /// rank gave up when we both dialled at once (it closes it at once), or an impostor.
    duplicate_of: Option<usize>,
}

/// What to do with a connection whose hello was valid.
enum Verdict {
    Accept,
    Refuse(String),
    /// See [`Pending::duplicate_of`]: decided when it closes (quietly) or talks (loudly).
    Duplicate,
}

/// What waits for a `Data` frame of a given message id.
enum Awaiting {
    Into(RecvBuf, Token),
    Discard,
}

#[derive(Default)]
struct Peer {
    addr: Option<SocketAddr>,
    conn: Option<Conn>,
    dialing: Option<Dialing>,
    /// Since when frames wait with neither a connection nor an attempt (our attempt was
    /// refused because the peer's own is coming).
    waiting_since: Option<Instant>,
    queue: VecDeque<Frame>,
    /// Large sends announced with Rts, waiting for the peer's Cts.
    awaiting_cts: HashMap<u64, (SendBuf, Token)>,
    /// Large receives for which we sent Cts, waiting for the Data frame.
    awaiting_data: HashMap<u64, Awaiting>,
    /// Announced large messages nobody has asked for yet: id -> length.
    kept: HashMap<u64, u64>,
    next_id: u64,
    failed: bool,
    /// The peer said goodbye: it finished normally.
    closed: bool,
    /// Sending failed with this error: the peer fails once what it sent is read.
    broken: Option<String>,
}

/// The TCP transport of one rank. See the module documentation.
pub struct TcpTransport {
    rank: usize,
    world: usize,
    job: u64,
    cfg: TcpConfig,
    poll: Poll,
    events: mio::Events,
    /// `events` holds readiness from `wait` not yet acted on.
    events_pending: bool,
    waker: Arc<mio::Waker>,
    listener: TcpListener,
    listener_ready: bool,
    peers: Vec<Peer>,
    pending: Vec<Option<Pending>>,
    /// Completions found outside `progress`, reported at the next call.
    sends_done: Vec<Token>,
    failures: Vec<(usize, String)>,
    /// Peers that said goodbye, not yet reported.
    closed: Vec<usize>,
    /// Peers whose sending failed (see [`Peer::broken`]), to fail at the next progress.
    broken: Vec<usize>,
    /// Connections shut down for writing by [`Transport::abort`], kept open until the
    /// transport is dropped (see there).
    lingering: Vec<TcpStream>,
}

impl TcpTransport {
    /// A transport for `rank` of a job of `world` ranks whose id hashes to `job`, accepting
    /// on `listener` (from [`bind`]) and reaching peer `r` at `peers[r]`.
    pub fn new(
        rank: usize,
        world: usize,
        job: u64,
        listener: std::net::TcpListener,
        peers: Vec<Option<SocketAddr>>,
        cfg: TcpConfig,
    ) -> Result<TcpTransport> {
        if peers.len() != world {
            return Err(Error::invalid(
                "TcpTransport::new",
                "peers",
                format!("{} addresses for a world of {world}", peers.len()),
            ));
        }
        if cfg.secret.is_none() {
            auth::note_unauthenticated("TCP transport");
        }
        let poll = Poll::new().ctx(|| "creating the TCP transport's poller")?;
        let waker = Arc::new(
            mio::Waker::new(poll.registry(), WAKER).ctx(|| "creating the TCP transport's waker")?,
        );
        listener
            .set_nonblocking(true)
            .ctx(|| "making the TCP listener non-blocking")?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .ctx(|| "registering the TCP listener")?;
        let peers = peers
            .into_iter()
            .map(|addr| Peer {
                addr,
                ..Peer::default()
            })
            .collect();
        Ok(TcpTransport {
            rank,
            world,
            job,
            cfg,
            poll,
            events: mio::Events::with_capacity(256),
            events_pending: false,
            waker,
            listener,
            listener_ready: true,
            peers,
            pending: Vec::new(),
            sends_done: Vec::new(),
            failures: Vec::new(),
            closed: Vec::new(),
            broken: Vec::new(),
            lingering: Vec::new(),
        })
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .ctx(|| "reading the TCP listener's address")
    }

    fn conn_token(peer: usize) -> MioToken {
        MioToken(FIRST_PEER_TOKEN + 2 * peer)
    }

    fn dial_token(peer: usize) -> MioToken {
        MioToken(FIRST_PEER_TOKEN + 2 * peer + 1)
    }

    fn pending_token(&self, slot: usize) -> MioToken {
        MioToken(FIRST_PEER_TOKEN + 2 * self.world + slot)
    }

    fn check_peer(&self, peer: usize, op: &str) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            return Err(Error::invalid(
                op,
                "peer",
                format!(
                    "rank {peer} is not a remote rank of this world of {}",
                    self.world
                ),
            ));
        }
        if self.peers[peer].failed || self.peers[peer].closed {
            return Err(Error::PeerLost {
                rank: self.rank,
                peer,
                op: op.into(),
                detail: if self.peers[peer].closed {
                    "it closed its communicator (finished)".into()
                } else {
                    "the connection already failed".into()
                },
            });
        }
        Ok(())
    }

    /// Marks `peer` failed: forgets its buffers, closes its sockets, reports it later.
    fn fail(&mut self, peer: usize, detail: String) {
        let registry = self.poll.registry();
        let p = &mut self.peers[peer];
        if p.failed || p.closed {
            return;
        }
        p.failed = true;
        if let Some(mut c) = p.conn.take() {
            let _ = registry.deregister(&mut c.stream);
        }
        if let Some(mut d) = p.dialing.take() {
            let _ = registry.deregister(&mut d.stream);
        }
        p.queue.clear();
        p.awaiting_cts.clear();
        p.awaiting_data.clear();
        p.kept.clear();
        self.failures.push((peer, detail));
    }

    fn hello(&self, kind: HelloKind) -> [u8; HELLO_LEN] {
        Hello {
            kind,
            job: self.job,
            world: self.world as u32,
            rank: self.rank as u32,
            nonce: 0,
        }
        .encode()
    }

    /// Starts dialling `peer` unless a connection exists or is being set up.
    fn ensure_link(&mut self, peer: usize) -> Result<()> {
        let p = &self.peers[peer];
        if p.conn.is_some() || p.dialing.is_some() || p.waiting_since.is_some() {
            return Ok(());
        }
        let addr = p.addr.ok_or_else(|| {
            Error::invalid(
                "send",
                "peer",
                format!("rank {peer} published no TCP address (is TCP disabled there?)"),
            )
        })?;
        let mut stream = TcpStream::connect(addr)
            .ctx(|| format!("rank {}: connecting to rank {peer} at {addr}", self.rank))?;
        self.poll
            .registry()
            .register(
                &mut stream,
                Self::dial_token(peer),
                Interest::WRITABLE | Interest::READABLE,
            )
            .ctx(|| "registering a TCP connection")?;
        let (out, answer, auth) = match &self.cfg.secret {
            Some(secret) => {
                let (hs, init) = ClientHandshake::start(secret, Channel::Transport)
                    .map_err(|e| Error::io("starting a handshake", io::Error::other(e)))?;
                (init.to_vec(), vec![0; auth::CHALLENGE_LEN], Some(hs))
            }
            None => (
                self.hello(HelloKind::Request).to_vec(),
                vec![0; HELLO_LEN],
                None,
            ),
        };
        self.peers[peer].dialing = Some(Dialing {
            stream,
            connected: false,
            out,
            sent: 0,
            answer,
            got: 0,
            auth,
            started: Instant::now(),
        });
        Ok(())
    }

    /// Advances the connection attempt to `peer`: connect, hello, answer.
    fn dial(&mut self, peer: usize) {
        match self.try_dial(peer) {
            Ok(()) => {}
            Err(detail) => self.fail(peer, detail),
        }
    }

    fn try_dial(&mut self, peer: usize) -> std::result::Result<(), String> {
        let addr = self.peers[peer].addr;
        let Some(d) = self.peers[peer].dialing.as_mut() else {
            return Ok(());
        };
        if !d.connected {
            if let Ok(Some(e)) | Err(e) = d.stream.take_error() {
                return Err(format!("connecting to {addr:?} failed: {e}"));
            }
            match d.stream.peer_addr() {
                Ok(_) => d.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("connecting to {addr:?} failed: {e}")),
            }
        }
        loop {
            while d.sent < d.out.len() {
                match d.stream.write(&d.out[d.sent..]) {
                    Ok(0) => return Err("connection closed during the handshake".into()),
                    Ok(n) => d.sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("sending the handshake failed: {e}")),
                }
            }
            let Some(hs) = d.auth.as_ref() else { break };
            while d.got < d.answer.len() {
                match d.stream.read(&mut d.answer[d.got..]) {
                    Ok(0) => {
                        return Err(format!(
                            "authentication failed: the process at {addr:?} closed the connection \
                             without a challenge ({} of {} bytes); {}",
                            d.got,
                            auth::CHALLENGE_LEN,
                            auth::HINT
                        ));
                    }
                    Ok(n) => d.got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("connection failed during the handshake: {e}")),
                }
            }
            let proof = hs.answer(&d.answer).map_err(|e| {
                format!(
                    "authentication failed with the process at {addr:?}: {e}; {}",
                    auth::HINT
                )
            })?;
            let hello = Hello {
                kind: HelloKind::Request,
                job: self.job,
                world: self.world as u32,
                rank: self.rank as u32,
                nonce: 0,
            }
            .encode();
            d.out = [&proof[..], &hello[..]].concat();
            d.sent = 0;
            d.answer = vec![0; HELLO_LEN];
            d.got = 0;
            d.auth = None;
        }
        // Exactly the answer: frames may follow it and belong to the connection.
        while d.got < HELLO_LEN {
            match d.stream.read(&mut d.answer[d.got..]) {
                Ok(0) => {
                    // Closed unanswered: the peer dropped this attempt for its own (a race
                    // it resolved before answering) or it is gone. Wait for its connection;
                    // the deadline check fails the peer if none comes.
                    self.drop_dialing(peer);
                    return Ok(());
                }
                Ok(n) => d.got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("connection failed during the handshake: {e}")),
            }
        }
        let answer = Hello::decode(&d.answer).map_err(|e| match auth::refusal_of(&d.answer) {
            Some(refusal) => format!(
                "authentication failed with the process at {addr:?}: {refusal}; {}",
                auth::HINT
            ),
            None => format!("answered the handshake with garbage: {e}"),
        })?;
        if answer.job != self.job
            || answer.world as usize != self.world
            || answer.rank as usize != peer
        {
            return Err(format!(
                "the process at {addr:?} is not rank {peer} of this job (it answered as rank {} of a world of {})",
                answer.rank, answer.world
            ));
        }
        match answer.kind {
            HelloKind::Accept => {
                let Some(mut d) = self.peers[peer].dialing.take() else {
                    return Ok(());
                };
                self.poll
                    .registry()
                    .reregister(
                        &mut d.stream,
                        Self::conn_token(peer),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .map_err(|e| format!("cannot register its connection: {e}"))?;
                self.establish(peer, Conn::new(d.stream, None));
            }
            HelloKind::Refuse => self.drop_dialing(peer),
            HelloKind::Request => return Err("answered the handshake with a request".into()),
        }
        Ok(())
    }

    /// Gives up our attempt to reach `peer`; frames wait for the peer's connection.
    fn drop_dialing(&mut self, peer: usize) {
        if let Some(mut d) = self.peers[peer].dialing.take() {
            let _ = self.poll.registry().deregister(&mut d.stream);
        }
        let p = &mut self.peers[peer];
        if p.conn.is_none() {
            p.waiting_since.get_or_insert_with(Instant::now);
        }
    }

    fn establish(&mut self, peer: usize, conn: Conn) {
        let _ = conn.stream.set_nodelay(true);
        if let Some(size) = self.cfg.socket_buffer {
            let sock = socket2::SockRef::from(&conn.stream);
            let _ = sock.set_send_buffer_size(size);
            let _ = sock.set_recv_buffer_size(size);
        }
        let p = &mut self.peers[peer];
        p.conn = Some(conn);
        p.waiting_since = None;
        self.flush(peer);
    }

    fn push_frame(&mut self, peer: usize, frame: Frame) -> Result<()> {
        self.ensure_link(peer)?;
        self.peers[peer].queue.push_back(frame);
        self.flush(peer);
        Ok(())
    }

    /// Writes as much of `peer`'s queue as the socket takes.
    fn flush(&mut self, peer: usize) {
        if let Err(detail) = self.try_flush(peer) {
            let p = &mut self.peers[peer];
            match p.conn.as_mut() {
                // Read what the peer sent before failing it (see the module docs).
                Some(c) if p.broken.is_none() => {
                    c.readable = true;
                    c.writable = false;
                    p.broken = Some(detail);
                    self.broken.push(peer);
                }
                Some(_) => {}
                None => self.fail(peer, detail),
            }
        }
    }

    fn try_flush(&mut self, peer: usize) -> std::result::Result<(), String> {
        if self.peers[peer].broken.is_some() {
            return Ok(());
        }
        if self.peers[peer].conn.is_none() {
            if self.peers[peer].dialing.is_some() {
                self.try_dial(peer)?;
            }
            return Ok(());
        }
        let p = &mut self.peers[peer];
        let Some(out) = p.conn.as_mut() else {
            return Ok(());
        };
        if let Some((answer, sent)) = out.preface.as_mut() {
            while *sent < HELLO_LEN {
                match out.stream.write(&answer[*sent..]) {
                    Ok(0) => return Err("connection closed during the handshake".into()),
                    Ok(n) => *sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        out.writable = false;
                        return Ok(());
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("answering the handshake failed: {e}")),
                }
            }
            out.preface = None;
        }
        while out.writable && !p.queue.is_empty() {
            let mut iov: [IoSlice<'_>; 2 * MAX_IOV_FRAMES] =
                [IoSlice::new(&[]); 2 * MAX_IOV_FRAMES];
            let mut n_iov = 0;
            for f in p.queue.iter().take(MAX_IOV_FRAMES) {
                if f.off < FRAME_HEADER_LEN {
                    iov[n_iov] = IoSlice::new(&f.head[f.off..]);
                    n_iov += 1;
                }
                let data_off = f.off.saturating_sub(FRAME_HEADER_LEN);
                if f.data.len > data_off {
                    // SAFETY: queued frames' buffers stay valid until their token is
                    // reported or the peer fails (contract point 4).
                    let data = unsafe { f.data.as_slice() };
                    iov[n_iov] = IoSlice::new(&data[data_off..]);
                    n_iov += 1;
                }
            }
            match out.stream.write_vectored(&iov[..n_iov]) {
                Ok(0) => return Err("the connection accepted no bytes".into()),
                Ok(mut n) => {
                    while n > 0 {
                        let f = p
                            .queue
                            .front_mut()
                            .expect("written bytes belong to a frame");
                        let step = n.min(f.total() - f.off);
                        f.off += step;
                        n -= step;
                        if f.off == f.total() {
                            if let Some(t) = f.token {
                                self.sends_done.push(t);
                            }
                            p.queue.pop_front();
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => out.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("sending failed: {e}")),
            }
        }
        Ok(())
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, addr)) => {
                    let live = self.pending.iter().filter(|p| p.is_some()).count();
                    if live >= MAX_PENDING {
                        tracing::warn!(
                            rank = self.rank,
                            %addr,
                            "refusing a TCP connection: {MAX_PENDING} handshakes already pending"
                        );
                        continue;
                    }
                    let slot = match self.pending.iter().position(Option::is_none) {
                        Some(i) => i,
                        None => {
                            self.pending.push(None);
                            self.pending.len() - 1
                        }
                    };
                    let token = self.pending_token(slot);
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut stream, token, Interest::READABLE)
                    {
                        tracing::warn!(rank = self.rank, %addr, "cannot register an accepted connection: {e}");
                        continue;
                    }
                    self.pending[slot] = Some(Pending {
                        stream,
                        addr,
                        buf: [0; PENDING_BUF],
                        got: 0,
                        want: auth::HEADER_LEN,
                        stage: Stage::Start,
                        auth: None,
                        since: Instant::now(),
                        duplicate_of: None,
                    });
                    self.read_hello(slot);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.listener_ready = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: keep serving what we have, try again later.
                    tracing::warn!(rank = self.rank, "accepting a TCP connection failed: {e}");
                    self.listener_ready = false;
                    return;
                }
            }
        }
    }

    /// Reads the hello of pending connection `slot`; accepts or refuses it when complete.
    fn read_hello(&mut self, slot: usize) {
        let Some(pd) = self.pending[slot].as_mut() else {
            return;
        };
        if let Some(peer) = pd.duplicate_of {
            let mut probe = [0u8; 64];
            match pd.stream.read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(0) | Err(_) => {
                    tracing::debug!(
                        rank = self.rank,
                        peer,
                        "dropped the connection attempt rank {peer} gave up"
                    );
                    self.drop_pending(slot);
                }
                Ok(_) => self.refuse(slot, format!("rank {peer} is already connected")),
            }
            return;
        }
        // Exactly the handshake: the caller sends nothing else before our answer.
        let hello_bytes = loop {
            while pd.got < pd.want {
                match pd.stream.read(&mut pd.buf[pd.got..pd.want]) {
                    Ok(0) if pd.stage == Stage::Proof => {
                        // Nothing was trusted yet. Usually a crossing dial: its rank accepted
                        // ours (the lower rank's connection wins) and dropped this attempt
                        // mid-handshake. A caller without the secret also ends here; it
                        // learned nothing, so this is no warning.
                        tracing::debug!(
                            rank = self.rank,
                            from = %pd.addr,
                            "dropped a connection closed after the challenge (a crossing \
                             dial given up, or a caller without this job's secret)"
                        );
                        self.drop_pending(slot);
                        return;
                    }
                    Ok(0) if pd.stage == Stage::Start && pd.got == 0 => {
                        // Closed before saying anything: usually a crossing dial that its rank
                        // gave up (the lower rank's connection wins). Nothing to warn about.
                        tracing::debug!(
                            rank = self.rank,
                            from = %pd.addr,
                            "dropped a connection closed before its handshake (a crossing dial \
                             given up?)"
                        );
                        self.drop_pending(slot);
                        return;
                    }
                    Ok(0) => {
                        let why = format!("closed during the handshake ({} bytes)", pd.got);
                        self.refuse(slot, why);
                        return;
                    }
                    Ok(n) => pd.got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                        ) =>
                    {
                        // The dialer dropped its attempt (a crossing dial given up after the
                        // tie-break, or a rank that exited): a healthy run sees this too.
                        tracing::debug!(
                            rank = self.rank,
                            from = %pd.addr,
                            "dropped a connection reset during its handshake: {e}"
                        );
                        self.drop_pending(slot);
                        return;
                    }
                    Err(e) => {
                        self.refuse(slot, format!("read failed: {e}"));
                        return;
                    }
                }
            }
            match pd.stage {
                Stage::Start => {
                    (pd.stage, pd.want) = if auth::is_auth_message(&pd.buf) {
                        (Stage::Init, auth::INIT_LEN)
                    } else {
                        (Stage::Hello, HELLO_LEN)
                    };
                }
                Stage::Init => {
                    let Some(secret) = &self.cfg.secret else {
                        let _ = pd.stream.write(&auth::no_secret_reply());
                        let why = format!(
                            "authentication failed: it has a job secret and this rank has none; {}",
                            auth::HINT
                        );
                        self.refuse(slot, why);
                        return;
                    };
                    let (hs, challenge) = match ServerHandshake::challenge(
                        secret,
                        Channel::Transport,
                        &pd.buf[..auth::INIT_LEN],
                    ) {
                        Ok(v) => v,
                        Err(e) => {
                            self.refuse(slot, format!("authentication failed: {e}"));
                            return;
                        }
                    };
                    // A fresh socket takes these few bytes at once.
                    match pd.stream.write(&challenge) {
                        Ok(n) if n == challenge.len() => {}
                        other => {
                            let why = format!("cannot send the challenge: {other:?}");
                            self.refuse(slot, why);
                            return;
                        }
                    }
                    pd.auth = Some(hs);
                    (pd.stage, pd.got, pd.want) = (Stage::Proof, 0, auth::PROOF_LEN + HELLO_LEN);
                }
                Stage::Proof => {
                    let verdict = match &pd.auth {
                        Some(hs) => hs.verify(&pd.buf[..auth::PROOF_LEN]),
                        None => Err(auth::AuthError::Malformed("no handshake in progress")),
                    };
                    if let Err(e) = verdict {
                        self.refuse(slot, format!("authentication failed: {e}"));
                        return;
                    }
                    let mut h = [0u8; HELLO_LEN];
                    h.copy_from_slice(&pd.buf[auth::PROOF_LEN..auth::PROOF_LEN + HELLO_LEN]);
                    break h;
                }
                Stage::Hello => {
                    if self.cfg.secret.is_some() {
                        let _ = pd.stream.write(&auth::required_notice());
                        let why = format!(
                            "authentication failed: it did not authenticate (it has no job \
                             secret); {}",
                            auth::HINT
                        );
                        self.refuse(slot, why);
                        return;
                    }
                    let mut h = [0u8; HELLO_LEN];
                    h.copy_from_slice(&pd.buf[..HELLO_LEN]);
                    break h;
                }
            }
        };
        let hello = match Hello::decode(&hello_bytes) {
            Ok(h) => h,
            Err(e) => {
                self.refuse(slot, format!("not a ferrocomm handshake: {e}"));
                return;
            }
        };
        let peer = hello.rank as usize;
        let invalid = if hello.kind != HelloKind::Request {
            Some("it answered a handshake nobody started".to_string())
        } else if hello.job != self.job {
            Some("it belongs to another job (different job id)".to_string())
        } else if hello.world as usize != self.world {
            Some(format!(
                "it has world size {}, this job {}",
                hello.world, self.world
            ))
        } else if peer >= self.world || peer == self.rank {
            Some(format!("it claims rank {}", hello.rank))
        } else {
            None
        };
        if let Some(why) = invalid {
            self.refuse(slot, why);
            return;
        }
        let verdict = {
            let p = &self.peers[peer];
            if p.failed || p.closed {
                Verdict::Refuse(format!("rank {peer} already failed or finished here"))
            } else if p.conn.is_some() {
                Verdict::Duplicate
            } else if p.dialing.is_some() && peer > self.rank {
                // Both dialled: the lower rank's connection (ours) is the one kept.
                Verdict::Refuse(String::new())
            } else {
                Verdict::Accept
            }
        };
        if let Verdict::Duplicate = verdict {
            if let Some(pd) = self.pending[slot].as_mut() {
                pd.duplicate_of = Some(peer);
            }
            self.read_hello(slot);
            return;
        }
        let Some(mut pd) = self.pending[slot].take() else {
            return;
        };
        match verdict {
            Verdict::Duplicate => {}
            Verdict::Refuse(why) => {
                let _ = self.poll.registry().deregister(&mut pd.stream);
                let _ = pd.stream.write(&self.hello(HelloKind::Refuse));
                if !why.is_empty() {
                    tracing::warn!(rank = self.rank, from = %pd.addr, "refused a transport connection: {why}");
                }
            }
            Verdict::Accept => {
                // Our own attempt, if any, loses to the lower rank's connection.
                if let Some(mut d) = self.peers[peer].dialing.take() {
                    let _ = self.poll.registry().deregister(&mut d.stream);
                }
                let mut stream = pd.stream;
                if let Err(e) = self.poll.registry().reregister(
                    &mut stream,
                    Self::conn_token(peer),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.fail(peer, format!("cannot register its connection: {e}"));
                    return;
                }
                let answer = self.hello(HelloKind::Accept);
                self.establish(peer, Conn::new(stream, Some(answer)));
            }
        }
    }

    fn drop_pending(&mut self, slot: usize) {
        if let Some(mut pd) = self.pending[slot].take() {
            let _ = self.poll.registry().deregister(&mut pd.stream);
        }
    }

    fn refuse(&mut self, slot: usize, why: String) {
        if let Some(mut pd) = self.pending[slot].take() {
            tracing::warn!(
                rank = self.rank,
                from = %pd.addr,
                "refused a transport connection: {why}"
            );
            let _ = self.poll.registry().deregister(&mut pd.stream);
        }
    }

    /// Reads everything `peer` has sent so far.
    fn read_peer(&mut self, peer: usize, ev: &mut dyn Events) {
        match self.try_read_peer(peer, ev) {
            Ok(()) => {}
            Err(ReadFault::Lost(detail)) => self.fail(peer, detail),
            Err(ReadFault::Violation(detail)) => {
                // Logged now: the operations that will fail may come much later (or never),
                // and the address tells an impostor from a buggy peer.
                let from = self.peers[peer]
                    .conn
                    .as_ref()
                    .and_then(|c| c.stream.peer_addr().ok())
                    .map_or_else(|| "an unknown address".to_string(), |a| a.to_string());
                tracing::warn!(
                    rank = self.rank,
                    peer,
                    %from,
                    "closing the connection of rank {peer}: it broke the protocol: {detail}"
                );
                self.fail(peer, format!("broke the protocol: {detail}"));
            }
        }
    }

    fn try_read_peer(
        &mut self,
        peer: usize,
        ev: &mut dyn Events,
    ) -> std::result::Result<(), ReadFault> {
        let max_eager = self.cfg.eager_limit as u64;
        let max_message = self.cfg.max_message;
        loop {
            let Some(c) = self.peers[peer].conn.as_mut() else {
                return Ok(());
            };
            match &mut c.rx {
                Rx::Header => {
                    if c.end - c.pos < FRAME_HEADER_LEN {
                        if !c.readable {
                            return Ok(());
                        }
                        c.buf.copy_within(c.pos..c.end, 0);
                        c.end -= c.pos;
                        c.pos = 0;
                        let end = c.end;
                        let room = c.buf.len() - end;
                        match fill(&mut c.stream, &mut c.buf[end..]).map_err(ReadFault::Lost)? {
                            Some(n) => {
                                c.end += n;
                                c.readable = after_read(n, room, c.hup);
                            }
                            None => c.readable = false,
                        }
                        continue;
                    }
                    let h = FrameHeader::decode(&c.buf[c.pos..c.end], max_eager, max_message)
                        .map_err(|e| {
                            ReadFault::Violation(format!("sent a bad frame header: {e}"))
                        })?;
                    c.pos += FRAME_HEADER_LEN;
                    self.on_header(peer, h, ev).map_err(ReadFault::Violation)?;
                }
                Rx::Payload { dst, len, got } => {
                    let take = (c.end - c.pos).min(*len - *got);
                    if take > 0 {
                        let src = &c.buf[c.pos..c.pos + take];
                        match dst {
                            Dst::User(b, _) => {
                                // SAFETY: the communicator gave this buffer (at least `len`
                                // bytes) to the transport until its token is reported.
                                let dst = unsafe { b.as_mut_slice() };
                                dst[*got..*got + take].copy_from_slice(src);
                            }
                            Dst::Owned(v, _) => v[*got..*got + take].copy_from_slice(src),
                            Dst::Discard => {}
                        }
                        c.pos += take;
                        *got += take;
                    }
                    if *got == *len {
                        let Rx::Payload { dst, .. } = std::mem::replace(&mut c.rx, Rx::Header)
                        else {
                            unreachable!("matched Payload above")
                        };
                        match dst {
                            Dst::User(_, token) => ev.recv_done(token),
                            Dst::Owned(v, env) => ev.stored(peer, env, Stored::Bytes(v)),
                            Dst::Discard => {}
                        }
                        continue;
                    }
                    if !c.readable {
                        return Ok(());
                    }
                    let remaining = *len - *got;
                    let direct: Option<&mut [u8]> = match dst {
                        Dst::User(b, _) if remaining >= DIRECT_READ_MIN => {
                            // SAFETY: as above.
                            Some(&mut unsafe { b.as_mut_slice() }[*got..*len])
                        }
                        Dst::Owned(v, _) if remaining >= DIRECT_READ_MIN => {
                            Some(&mut v[*got..*len])
                        }
                        _ => None,
                    };
                    if let Some(target) = direct {
                        let room = target.len();
                        match fill(&mut c.stream, target).map_err(ReadFault::Lost)? {
                            Some(n) => {
                                *got += n;
                                c.readable = after_read(n, room, c.hup);
                            }
                            None => c.readable = false,
                        }
                    } else {
                        c.pos = 0;
                        c.end = 0;
                        let room = c.buf.len();
                        match fill(&mut c.stream, &mut c.buf[..]).map_err(ReadFault::Lost)? {
                            Some(n) => {
                                c.end = n;
                                c.readable = after_read(n, room, c.hup);
                            }
                            None => c.readable = false,
                        }
                    }
                }
            }
        }
    }

    /// Acts on a decoded frame header from `peer`.
    fn on_header(
        &mut self,
        peer: usize,
        h: FrameHeader,
        ev: &mut dyn Events,
    ) -> std::result::Result<(), String> {
        let len = h.len as usize;
        match h.kind {
            FrameKind::Eager => {
                let dst = match ev.incoming(peer, &h.env, len) {
                    Placement::Into(buf, token) => {
                        check_capacity(&buf, len)?;
                        Dst::User(buf, token)
                    }
                    Placement::Keep => Dst::Owned(vec![0u8; len], h.env),
                    Placement::Discard => Dst::Discard,
                };
                self.set_payload(peer, dst, len);
            }
            FrameKind::Rts => {
                let p = &mut self.peers[peer];
                if p.kept.contains_key(&h.id) || p.awaiting_data.contains_key(&h.id) {
                    return Err(format!("announced message id {} twice", h.id));
                }
                match ev.incoming(peer, &h.env, len) {
                    Placement::Into(buf, token) => {
                        check_capacity(&buf, len)?;
                        self.peers[peer]
                            .awaiting_data
                            .insert(h.id, Awaiting::Into(buf, token));
                        self.send_cts(peer, h.id);
                    }
                    Placement::Keep => {
                        self.peers[peer].kept.insert(h.id, h.len);
                        ev.stored(peer, h.env, Stored::Remote { handle: h.id, len });
                    }
                    Placement::Discard => {
                        self.peers[peer]
                            .awaiting_data
                            .insert(h.id, Awaiting::Discard);
                        self.send_cts(peer, h.id);
                    }
                }
            }
            FrameKind::Cts => {
                let (data, token) =
                    self.peers[peer].awaiting_cts.remove(&h.id).ok_or_else(|| {
                        format!("cleared message id {} that was never announced", h.id)
                    })?;
                let head = FrameHeader {
                    kind: FrameKind::Data,
                    len: data.len as u64,
                    id: h.id,
                    env: Envelope::default(),
                }
                .encode();
                self.peers[peer].queue.push_back(Frame {
                    head,
                    data,
                    off: 0,
                    token: Some(token),
                });
                self.flush(peer);
            }
            FrameKind::Bye => {
                if let Some(mut c) = self.peers[peer].conn.take() {
                    let _ = self.poll.registry().deregister(&mut c.stream);
                }
                let p = &mut self.peers[peer];
                p.closed = true;
                p.queue.clear();
                p.awaiting_cts.clear();
                p.awaiting_data.clear();
                p.kept.clear();
                self.closed.push(peer);
            }
            FrameKind::Data => {
                let dst = match self.peers[peer].awaiting_data.remove(&h.id) {
                    Some(Awaiting::Into(buf, token)) => {
                        check_capacity(&buf, len)?;
                        Dst::User(buf, token)
                    }
                    Some(Awaiting::Discard) => Dst::Discard,
                    None => {
                        return Err(format!(
                            "sent data for message id {} that was never cleared",
                            h.id
                        ));
                    }
                };
                self.set_payload(peer, dst, len);
            }
        }
        Ok(())
    }

    fn set_payload(&mut self, peer: usize, dst: Dst, len: usize) {
        if let Some(c) = self.peers[peer].conn.as_mut() {
            c.rx = Rx::Payload { dst, len, got: 0 };
        }
    }

    fn send_cts(&mut self, peer: usize, id: u64) {
        let head = FrameHeader {
            kind: FrameKind::Cts,
            len: 0,
            id,
            env: Envelope::default(),
        }
        .encode();
        let frame = Frame {
            head,
            data: SendBuf {
                ptr: std::ptr::null(),
                len: 0,
            },
            off: 0,
            token: None,
        };
        if let Err(e) = self.push_frame(peer, frame) {
            self.fail(peer, format!("cannot answer its announcement: {e}"));
        }
    }

    /// Drops handshakes and connection attempts past their deadline.
    fn check_deadlines(&mut self) {
        let now = Instant::now();
        for slot in 0..self.pending.len() {
            if let Some(pd) = &self.pending[slot]
                && now.duration_since(pd.since) > self.cfg.handshake_timeout
            {
                let why = match pd.duplicate_of {
                    Some(peer) => format!("rank {peer} is already connected"),
                    None => format!(
                        "handshake not completed within {:?}; half-open connection dropped",
                        self.cfg.handshake_timeout
                    ),
                };
                self.refuse(slot, why);
            }
        }
        for peer in 0..self.peers.len() {
            let p = &self.peers[peer];
            let since = match (&p.dialing, p.waiting_since) {
                (Some(d), _) => Some(d.started),
                (None, Some(t)) => Some(t),
                _ => None,
            };
            if let Some(since) = since
                && now.duration_since(since) > self.cfg.connect_timeout
            {
                let detail = if p.dialing.is_some() {
                    format!(
                        "connecting to {:?} took longer than {:?} (host unreachable or firewalled?)",
                        p.addr, self.cfg.connect_timeout
                    )
                } else {
                    format!(
                        "it refused our connection for its own, which never came within {:?}",
                        self.cfg.connect_timeout
                    )
                };
                self.fail(peer, detail);
            }
        }
    }

    fn handle_events(&mut self, ev: &mut dyn Events) {
        let events: Vec<(MioToken, bool, bool, bool)> = self
            .events
            .iter()
            .map(|e| {
                (
                    e.token(),
                    e.is_readable(),
                    e.is_writable(),
                    e.is_error() || e.is_read_closed() || e.is_write_closed(),
                )
            })
            .collect();
        for (token, readable, writable, closed) in events {
            let t = token.0;
            if token == LISTENER {
                self.listener_ready = true;
                continue;
            }
            if token == WAKER || t < FIRST_PEER_TOKEN {
                continue;
            }
            let idx = t - FIRST_PEER_TOKEN;
            if idx >= 2 * self.world {
                self.read_hello(idx - 2 * self.world);
                continue;
            }
            let peer = idx / 2;
            if idx.is_multiple_of(2) {
                let Some(c) = self.peers[peer].conn.as_mut() else {
                    continue;
                };
                if writable {
                    c.writable = true;
                }
                if readable || closed {
                    c.readable = true;
                    c.hup |= closed;
                    self.read_peer(peer, ev);
                }
                if writable {
                    self.flush(peer);
                }
            } else {
                self.dial(peer);
            }
        }
    }
}

impl Drop for TcpTransport {
    /// Says goodbye on every open connection, so peers see a normal end rather than a crash.
    fn drop(&mut self) {
        let bye = FrameHeader {
            kind: FrameKind::Bye,
            len: 0,
            id: 0,
            env: Envelope::default(),
        }
        .encode();
        for p in self.peers.iter_mut() {
            let Some(out) = p.conn.as_mut() else { continue };
            if p.failed || p.closed || out.preface.is_some() || !p.queue.is_empty() {
                continue;
            }
            // Best effort, bounded: a peer that stopped reading must not hold us here.
            let sock = socket2::SockRef::from(&out.stream);
            let _ = sock.set_nonblocking(false);
            let _ = sock.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = out.stream.write_all(&bye);
        }
    }
}

/// Why reading from a peer's connection stopped.
enum ReadFault {
    /// The connection ended or broke: the peer exited or crashed, or the network failed.
    Lost(String),
    /// The peer sent bytes that break the protocol (a bad header, an impossible length, an
    /// unknown message id).
    Violation(String),
}

/// Reads into `buf`: `Some(n)` bytes (n > 0), `None` when nothing is available; end of
/// stream and errors are failures of the peer.
/// Whether a socket may hold more to read after a read of `n` bytes into `room`: a short
/// read emptied it, and edge-triggered readiness reports the next arrival, so there is no
/// need to read until EAGAIN, except when readiness already reported the peer's end
/// (`hup`): that was the last report, and the end of the stream that follows the bytes
/// just read must still be read, or the peer's death goes unnoticed (a peer that sends its
/// last frame and exits at once delivers both in one readiness event).
fn after_read(n: usize, room: usize, hup: bool) -> bool {
    n == room || hup
}

fn fill(stream: &mut TcpStream, buf: &mut [u8]) -> std::result::Result<Option<usize>, String> {
    loop {
        match stream.read(buf) {
            Ok(0) => return Err("closed the connection (its process exited or crashed)".into()),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("connection failed: {e}")),
        }
    }
}

fn check_capacity(buf: &RecvBuf, len: usize) -> std::result::Result<(), String> {
    if buf.len < len {
        // The communicator checks sizes before placing; reaching this is a bug, not input.
        return Err(format!(
            "internal error: buffer of {} bytes for {len}",
            buf.len
        ));
    }
    Ok(())
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    unsafe fn send(
        &mut self,
        peer: usize,
        env: &Envelope,
        data: SendBuf,
        token: Token,
    ) -> Result<Sent> {
        self.check_peer(peer, "send")?;
        let frame = if data.len <= self.cfg.eager_limit {
            Frame {
                head: FrameHeader {
                    kind: FrameKind::Eager,
                    len: data.len as u64,
                    id: 0,
                    env: *env,
                }
                .encode(),
                data,
                off: 0,
                token: Some(token),
            }
        } else {
            let p = &mut self.peers[peer];
            let id = p.next_id;
            p.next_id += 1;
            p.awaiting_cts.insert(id, (data, token));
            Frame {
                head: FrameHeader {
                    kind: FrameKind::Rts,
                    len: data.len as u64,
                    id,
                    env: *env,
                }
                .encode(),
                data: SendBuf {
                    ptr: std::ptr::null(),
                    len: 0,
                },
                off: 0,
                token: None,
            }
        };
        self.push_frame(peer, frame).map(|()| Sent::Pending)
    }

    unsafe fn fetch(&mut self, peer: usize, handle: u64, dst: RecvBuf, token: Token) -> Result<()> {
        self.check_peer(peer, "recv")?;
        let len = self.peers[peer].kept.remove(&handle).ok_or_else(|| {
            Error::invalid(
                "recv",
                "handle",
                format!("rank {peer} has no kept message {handle}"),
            )
        })?;
        if (dst.len as u64) < len {
            return Err(Error::invalid(
                "recv",
                "buffer",
                format!("{} bytes for a message of {len}", dst.len),
            ));
        }
        self.peers[peer]
            .awaiting_data
            .insert(handle, Awaiting::Into(dst, token));
        self.send_cts(peer, handle);
        Ok(())
    }

    fn discard(&mut self, peer: usize, handle: u64) -> Result<()> {
        if peer >= self.world || self.peers[peer].failed {
            return Ok(());
        }
        if self.peers[peer].kept.remove(&handle).is_some() {
            self.peers[peer]
                .awaiting_data
                .insert(handle, Awaiting::Discard);
            self.send_cts(peer, handle);
        }
        Ok(())
    }

    fn progress(&mut self, ev: &mut dyn Events) -> Result<bool> {
        // Sends that completed in the caller's own write: report them without a system call
        // (the next progress polls), so a blocking send returns as soon as it is written.
        if !self.sends_done.is_empty() && !self.events_pending {
            for token in self.sends_done.drain(..) {
                ev.send_done(token);
            }
            return Ok(true);
        }
        let mut did = false;
        if self.events_pending {
            self.events_pending = false;
            self.handle_events(ev);
            did = true;
        }
        match self.poll.poll(&mut self.events, Some(Duration::ZERO)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("polling the TCP transport's sockets", e)),
        }
        if !self.events.is_empty() {
            did = true;
            self.handle_events(ev);
        }
        if self.listener_ready {
            self.accept_all();
        }
        if self.pending.iter().any(Option::is_some)
            || self
                .peers
                .iter()
                .any(|p| p.dialing.is_some() || p.waiting_since.is_some())
        {
            self.check_deadlines();
        }
        for peer in 0..self.peers.len() {
            if self.peers[peer]
                .conn
                .as_ref()
                .is_some_and(|c| c.readable || c.end > c.pos)
            {
                self.read_peer(peer, ev);
            }
        }
        for peer in std::mem::take(&mut self.broken) {
            // Everything readable was read just above.
            if let Some(detail) = self.peers[peer].broken.take() {
                did = true;
                self.fail(peer, detail);
            }
        }
        for token in self.sends_done.drain(..) {
            did = true;
            ev.send_done(token);
        }
        for peer in std::mem::take(&mut self.closed) {
            did = true;
            ev.peer_closed(peer);
        }
        for (peer, detail) in std::mem::take(&mut self.failures) {
            did = true;
            ev.peer_failed(
                peer,
                Error::PeerLost {
                    rank: self.rank,
                    peer,
                    op: "tcp".into(),
                    detail,
                },
            );
        }
        Ok(did)
    }

    fn wait(&mut self, timeout: Duration) -> Result<()> {
        if self.events_pending
            || !self.sends_done.is_empty()
            || !self.failures.is_empty()
            || !self.broken.is_empty()
            || self.listener_ready
        {
            return Ok(());
        }
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(Error::io("waiting on the TCP transport's sockets", e)),
        }
        // The next progress acts on these events (epoll is edge-triggered: they are not
        // reported again).
        self.events_pending = !self.events.is_empty();
        Ok(())
    }

    fn wait_fd(&mut self) -> Result<super::WaitFd> {
        if self.events_pending
            || !self.sends_done.is_empty()
            || !self.failures.is_empty()
            || !self.broken.is_empty()
            || self.listener_ready
        {
            return Ok(super::WaitFd::Ready);
        }
        // The epoll descriptor is readable while it has events ready; `progress` takes them.
        Ok(super::WaitFd::Fd(std::os::fd::AsRawFd::as_raw_fd(
            &self.poll,
        )))
    }

    fn waker(&self) -> Waker {
        let w = Arc::clone(&self.waker);
        Arc::new(move || {
            let _ = w.wake();
        })
    }

    fn abort(&mut self) {
        for peer in 0..self.peers.len() {
            if peer == self.rank {
                continue;
            }
            // Closing a socket with unread bytes resets the connection, and a reset throws
            // away what the kernel had not yet delivered, e.g. the notice a failing
            // collective just sent saying why this rank gives up. So: shut down writing (the
            // peer reads everything sent, then the end of stream) and close only when the
            // transport is dropped.
            if let Some(mut c) = self.peers[peer].conn.take() {
                let _ = self.poll.registry().deregister(&mut c.stream);
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                self.lingering.push(c.stream);
            }
            self.fail(peer, "this rank aborted".into());
        }
        self.sends_done.clear();
        self.failures.clear();
    }
}
