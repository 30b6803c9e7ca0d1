//! TCP transport on mio: non-blocking sockets, one poller per rank, no I/O thread.
//!
//! # Connections
//!
//! Every ordered pair of ranks has its own connection: rank `a` sends to `b` on a connection
//! that `a` opened to `b`'s listener, and reads what `b` sends on the connection `b` opened.
//! There is no connection race to break and each direction streams independently (a ring
//! step that sends right while receiving left uses two sockets, both full). Connections are
//! opened lazily, on the first message to a peer, so a job only pays for the pairs it uses.
//! A new connection starts with a [`Hello`] naming the job (hash of its id), the world size
//! and the caller's rank; the acceptor refuses (logs and closes) anything else, and drops a
//! connection that has not said hello within the handshake deadline.
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
//! is reported once.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll, Token as MioToken};

use super::{Envelope, Events, Placement, RecvBuf, SendBuf, Sent, Stored, Token, Transport, Waker};
use crate::error::{Error, IoContext, Result};
use crate::wire::{FRAME_HEADER_LEN, FrameHeader, FrameKind, HELLO_LEN, Hello};

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
    /// How long an accepted connection may take to say hello.
    pub handshake_timeout: Duration,
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
        }
    }
}

impl TcpConfig {
    /// The defaults, adjusted by `FERROCOMM_TCP_EAGER_LIMIT` and `FERROCOMM_SOCKET_BUFFER`.
    pub fn from_env() -> Result<TcpConfig> {
        Self::from_lookup(&crate::config::process_env)
    }

    pub(crate) fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<TcpConfig> {
        let mut cfg = TcpConfig::default();
        if let Some(n) = crate::config::size(lookup, "FERROCOMM_TCP_EAGER_LIMIT")? {
            cfg.eager_limit = n.min(1 << 30);
        }
        cfg.socket_buffer = crate::config::size(lookup, "FERROCOMM_SOCKET_BUFFER")?;
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

/// The connection on which this rank sends to a peer.
struct OutConn {
    stream: TcpStream,
    connected: bool,
    writable: bool,
    hello: [u8; HELLO_LEN],
    hello_sent: usize,
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

/// The connection on which this rank reads what a peer sends.
struct InConn {
    stream: TcpStream,
    readable: bool,
    rx: Rx,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl InConn {
    fn new(stream: TcpStream, leftover: &[u8]) -> InConn {
        let mut buf = vec![0u8; STAGING].into_boxed_slice();
        buf[..leftover.len()].copy_from_slice(leftover);
        InConn {
            stream,
            readable: true,
            rx: Rx::Header,
            buf,
            pos: 0,
            end: leftover.len(),
        }
    }
}

/// An accepted connection that has not said hello yet.
struct Pending {
    stream: TcpStream,
    addr: SocketAddr,
    buf: [u8; HELLO_LEN],
    got: usize,
    since: Instant,
}

/// What waits for a `Data` frame of a given message id.
enum Awaiting {
    Into(RecvBuf, Token),
    Discard,
}

#[derive(Default)]
struct Peer {
    addr: Option<SocketAddr>,
    out: Option<OutConn>,
    inn: Option<InConn>,
    queue: VecDeque<Frame>,
    /// Large sends announced with Rts, waiting for the peer's Cts.
    awaiting_cts: HashMap<u64, (SendBuf, Token)>,
    /// Large receives for which we sent Cts, waiting for the Data frame.
    awaiting_data: HashMap<u64, Awaiting>,
    /// Announced large messages nobody has asked for yet: id -> length.
    kept: HashMap<u64, u64>,
    next_id: u64,
    failed: bool,
    /// Why the connection we send on was closed by the peer, if it was.
    out_dead: Option<String>,
    /// The peer said goodbye: it finished normally.
    closed: bool,
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
        })
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .ctx(|| "reading the TCP listener's address")
    }

    fn out_token(peer: usize) -> MioToken {
        MioToken(FIRST_PEER_TOKEN + 2 * peer)
    }

    fn in_token(peer: usize) -> MioToken {
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
        if let Some(mut out) = p.out.take() {
            let _ = registry.deregister(&mut out.stream);
        }
        if let Some(mut inn) = p.inn.take() {
            let _ = registry.deregister(&mut inn.stream);
        }
        p.queue.clear();
        p.awaiting_cts.clear();
        p.awaiting_data.clear();
        p.kept.clear();
        self.failures.push((peer, detail));
    }

    /// Opens the outgoing connection to `peer` if there is none.
    fn ensure_out(&mut self, peer: usize) -> Result<()> {
        if self.peers[peer].out.is_some() {
            return Ok(());
        }
        if let Some(why) = self.peers[peer].out_dead.clone() {
            self.fail(peer, why.clone());
            return Err(Error::PeerLost {
                rank: self.rank,
                peer,
                op: "send".into(),
                detail: why,
            });
        }
        let addr = self.peers[peer].addr.ok_or_else(|| {
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
                Self::out_token(peer),
                Interest::WRITABLE | Interest::READABLE,
            )
            .ctx(|| "registering a TCP connection")?;
        let hello = Hello {
            job: self.job,
            world: self.world as u32,
            rank: self.rank as u32,
            nonce: 0,
        };
        self.peers[peer].out = Some(OutConn {
            stream,
            connected: false,
            writable: false,
            hello: hello.encode(),
            hello_sent: 0,
            started: Instant::now(),
        });
        Ok(())
    }

    fn push_frame(&mut self, peer: usize, frame: Frame) -> Result<()> {
        self.ensure_out(peer)?;
        self.peers[peer].queue.push_back(frame);
        self.flush(peer);
        Ok(())
    }

    /// Writes as much of `peer`'s queue as the socket takes.
    fn flush(&mut self, peer: usize) {
        if let Err(detail) = self.try_flush(peer) {
            self.fail(peer, detail);
        }
    }

    fn try_flush(&mut self, peer: usize) -> std::result::Result<(), String> {
        let p = &mut self.peers[peer];
        let Some(out) = p.out.as_mut() else {
            return Ok(());
        };
        if !out.connected {
            if !out.writable {
                return Ok(());
            }
            if let Ok(Some(e)) | Err(e) = out.stream.take_error() {
                return Err(format!("connecting to {:?} failed: {e}", p.addr));
            }
            match out.stream.peer_addr() {
                Ok(_) => {
                    out.connected = true;
                    let _ = out.stream.set_nodelay(true);
                    if let Some(size) = self.cfg.socket_buffer {
                        let sock = socket2::SockRef::from(&out.stream);
                        let _ = sock.set_send_buffer_size(size);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    out.writable = false;
                    return Ok(());
                }
                Err(e) => return Err(format!("connecting to {:?} failed: {e}", p.addr)),
            }
        }
        while out.hello_sent < HELLO_LEN {
            match out.stream.write(&out.hello[out.hello_sent..]) {
                Ok(0) => return Err("connection closed during the handshake".into()),
                Ok(n) => out.hello_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    out.writable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("sending the handshake failed: {e}")),
            }
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
                        buf: [0; HELLO_LEN],
                        got: 0,
                        since: Instant::now(),
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

    /// Reads the hello of pending connection `slot`; promotes or refuses it when complete.
    fn read_hello(&mut self, slot: usize) {
        let Some(pd) = self.pending[slot].as_mut() else {
            return;
        };
        let mut staged = [0u8; STAGING];
        let result: std::result::Result<Option<usize>, String> = loop {
            if pd.got < HELLO_LEN {
                match pd.stream.read(&mut pd.buf[pd.got..]) {
                    Ok(0) => break Err("closed before saying hello".into()),
                    Ok(n) => pd.got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(format!("read failed: {e}")),
                }
                continue;
            }
            // Frames may follow the hello in the same segment: carry them over.
            match pd.stream.read(&mut staged) {
                Ok(n) => break Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(Some(0)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(format!("read failed: {e}")),
            }
        };
        let leftover = match result {
            Ok(None) => return,
            Ok(Some(n)) => n,
            Err(why) => {
                self.refuse(slot, why);
                return;
            }
        };
        let Some(pd) = self.pending[slot].take() else {
            return;
        };
        let hello = match Hello::decode(&pd.buf) {
            Ok(h) => h,
            Err(e) => {
                self.pending[slot] = Some(pd);
                self.refuse(slot, format!("not a ferrocomm handshake: {e}"));
                return;
            }
        };
        let why = if hello.job != self.job {
            Some("it belongs to another job (different job id)".to_string())
        } else if hello.world as usize != self.world {
            Some(format!(
                "it has world size {}, this job {}",
                hello.world, self.world
            ))
        } else if hello.rank as usize >= self.world || hello.rank as usize == self.rank {
            Some(format!("it claims rank {}", hello.rank))
        } else if self.peers[hello.rank as usize].inn.is_some() {
            Some(format!("rank {} is already connected", hello.rank))
        } else {
            None
        };
        if let Some(why) = why {
            self.pending[slot] = Some(pd);
            self.refuse(slot, why);
            return;
        }
        let peer = hello.rank as usize;
        let mut stream = pd.stream;
        if let Err(e) =
            self.poll
                .registry()
                .reregister(&mut stream, Self::in_token(peer), Interest::READABLE)
        {
            self.fail(peer, format!("cannot register its connection: {e}"));
            return;
        }
        let _ = stream.set_nodelay(true);
        if let Some(size) = self.cfg.socket_buffer {
            let _ = socket2::SockRef::from(&stream).set_recv_buffer_size(size);
        }
        if self.peers[peer].failed {
            return;
        }
        self.peers[peer].inn = Some(InConn::new(stream, &staged[..leftover]));
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
        if let Err(detail) = self.try_read_peer(peer, ev) {
            self.fail(peer, detail);
        }
    }

    fn try_read_peer(
        &mut self,
        peer: usize,
        ev: &mut dyn Events,
    ) -> std::result::Result<(), String> {
        let max_eager = self.cfg.eager_limit as u64;
        let max_message = self.cfg.max_message;
        loop {
            let Some(c) = self.peers[peer].inn.as_mut() else {
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
                        match fill(&mut c.stream, &mut c.buf[end..])? {
                            Some(n) => c.end += n,
                            None => c.readable = false,
                        }
                        continue;
                    }
                    let h = FrameHeader::decode(&c.buf[c.pos..c.end], max_eager, max_message)
                        .map_err(|e| format!("sent a bad frame header: {e}"))?;
                    c.pos += FRAME_HEADER_LEN;
                    self.on_header(peer, h, ev)?;
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
                        match fill(&mut c.stream, target)? {
                            Some(n) => *got += n,
                            None => c.readable = false,
                        }
                    } else {
                        c.pos = 0;
                        c.end = 0;
                        match fill(&mut c.stream, &mut c.buf[..])? {
                            Some(n) => c.end = n,
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
                if let Some(mut c) = self.peers[peer].inn.take() {
                    let _ = self.poll.registry().deregister(&mut c.stream);
                }
                let p = &mut self.peers[peer];
                p.closed = true;
                p.queue.clear();
                p.awaiting_cts.clear();
                p.awaiting_data.clear();
                p.kept.clear();
                if let Some(mut out) = p.out.take() {
                    let _ = self.poll.registry().deregister(&mut out.stream);
                }
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
        if let Some(c) = self.peers[peer].inn.as_mut() {
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
                let why = format!("no hello within {:?}", self.cfg.handshake_timeout);
                self.refuse(slot, why);
            }
        }
        for peer in 0..self.peers.len() {
            if let Some(out) = &self.peers[peer].out
                && !out.connected
                && now.duration_since(out.started) > self.cfg.connect_timeout
            {
                let detail = format!(
                    "connecting to {:?} took longer than {:?} (host unreachable or firewalled?)",
                    self.peers[peer].addr, self.cfg.connect_timeout
                );
                self.fail(peer, detail);
            }
        }
    }

    /// The peer closed the connection we send on. What it sent us before it went may still
    /// sit unread on the other connection: deliver that first, and fail the peer when that
    /// connection ends too (or at once when nothing else can arrive or a send is waiting).
    fn out_closed(&mut self, peer: usize, why: String, ev: &mut dyn Events) {
        if let Some(mut out) = self.peers[peer].out.take() {
            let _ = self.poll.registry().deregister(&mut out.stream);
        }
        self.peers[peer].out_dead = Some(why.clone());
        // Its connection to us may still wait in the accept queue or the handshake.
        self.accept_all();
        for slot in 0..self.pending.len() {
            self.read_hello(slot);
        }
        if self.peers[peer].inn.is_some() {
            if let Some(inn) = self.peers[peer].inn.as_mut() {
                inn.readable = true;
            }
            self.read_peer(peer, ev);
        }
        let p = &self.peers[peer];
        if !p.failed && (p.inn.is_none() || !p.queue.is_empty() || !p.awaiting_cts.is_empty()) {
            self.fail(peer, why);
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
                let Some(out) = self.peers[peer].out.as_mut() else {
                    continue;
                };
                if writable {
                    out.writable = true;
                }
                if (readable || closed) && out.connected {
                    // Nothing is ever sent to us on this connection: readiness means the
                    // peer closed it or reset it.
                    let mut probe = [0u8; 64];
                    let closed_why = match out.stream.read(&mut probe) {
                        Ok(0) => Some(
                            "closed the connection (its process exited or crashed)".to_string(),
                        ),
                        Ok(_) => Some("sent bytes on a send-only connection".to_string()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                        Err(e) => Some(format!("connection failed: {e}")),
                    };
                    if let Some(why) = closed_why {
                        self.out_closed(peer, why, ev);
                        continue;
                    }
                }
                self.flush(peer);
            } else if let Some(inn) = self.peers[peer].inn.as_mut()
                && (readable || closed)
            {
                inn.readable = true;
                self.read_peer(peer, ev);
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
            let Some(out) = p.out.as_mut() else { continue };
            if p.failed
                || p.closed
                || !out.connected
                || out.hello_sent < HELLO_LEN
                || !p.queue.is_empty()
            {
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

/// Reads into `buf`: `Some(n)` bytes (n > 0), `None` when nothing is available; end of
/// stream and errors are failures of the peer.
fn fill(stream: &mut TcpStream, buf: &mut [u8]) -> std::result::Result<Option<usize>, String> {
    loop {
        match stream.read(buf) {
            Ok(0) => return Err("closed the connection".into()),
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
                .any(|p| p.out.as_ref().is_some_and(|o| !o.connected))
        {
            self.check_deadlines();
        }
        for peer in 0..self.peers.len() {
            if self.peers[peer]
                .inn
                .as_ref()
                .is_some_and(|c| c.readable || c.end > c.pos)
            {
                self.read_peer(peer, ev);
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

    fn waker(&self) -> Waker {
        let w = Arc::clone(&self.waker);
        Arc::new(move || {
            let _ = w.wake();
        })
    }

    fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        // Readable while the epoll instance has events ready (the waker's included); polling
        // it does not consume them.
        Some(self.poll.as_raw_fd())
    }

    fn abort(&mut self) {
        for peer in 0..self.peers.len() {
            if peer != self.rank {
                self.fail(peer, "this rank aborted".into());
            }
        }
        self.sends_done.clear();
        self.failures.clear();
    }
}
