//! The verbs transport itself: queue pairs per peer, eager buffers and credits, rendezvous
//! by RDMA write or by copy, completion polling and waiting. See the [module
//! documentation](super) for the design.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::proto::{
    self, Class, CtsMode, HEADER_LEN, Header, IbConfig, LinkLayer, Msg, PortInfo, QpInfo,
    Reassembly, RegCache, RegKey, SendPath, WrId, WrKind,
};
use super::verbs::{
    self, CompChannel, Context, Cq, DeviceList, Mr, OwnedMr, Pd, Qp, QpCaps, Remote, SendOp, Sge,
    Wc,
};
use crate::error::{Error, Result};
use crate::transport::{
    Envelope, Events, Placement, RecvBuf, SendBuf, Sent, Stored, Token, Transport, WaitFd, Waker,
};

/// An opened device port, ready to make a transport: what [`open_device`] finds.
pub struct IbDevice {
    ctx: Context,
    port: u8,
    gid_index: u8,
    info: PortInfo,
    max_msg: usize,
    max_qp_wr: u32,
    max_cqe: i32,
}

impl IbDevice {
    /// What this rank publishes about its port.
    pub fn port_info(&self) -> &PortInfo {
        &self.info
    }
}

/// Why no device could be used (for logs and for the error when verbs was forced).
pub type NoDevice = String;

/// Opens the device and port `cfg` names (or the first with an active port). `Ok(Err(why))`
/// when this machine has none usable; `Err` when the verbs library itself fails.
pub fn open_device(
    cfg: &IbConfig,
    forced: bool,
) -> Result<std::result::Result<IbDevice, NoDevice>> {
    let list = DeviceList::new()?;
    if list.is_empty() {
        return Ok(Err(
            "no verbs device on this machine (ibv_get_device_list found none)".into(),
        ));
    }
    let names: Vec<String> = (0..list.len()).map(|i| list.name(i)).collect();
    let candidates: Vec<usize> = match &cfg.device {
        Some(d) => match names.iter().position(|n| n == d) {
            Some(i) => vec![i],
            None => {
                return Ok(Err(format!(
                    "FERROCOMM_IB_DEVICE={d} names no device here (devices: {})",
                    names.join(", ")
                )));
            }
        },
        None => (0..list.len()).collect(),
    };
    let mut why = Vec::new();
    for i in candidates {
        let ctx = list.open(i)?;
        let dev = ctx.query_device()?;
        let ports: Vec<u8> = match cfg.port {
            Some(p) => vec![p],
            None => (1..=dev.ports).collect(),
        };
        for port in ports {
            let attr = match ctx.query_port(port) {
                Ok(a) => a,
                Err(e) => {
                    why.push(format!("{}:{port}: {e}", names[i]));
                    continue;
                }
            };
            if !attr.active {
                why.push(format!("{}:{port} is not active", names[i]));
                continue;
            }
            let link = if attr.link_layer == verbs::LINK_LAYER_ETHERNET {
                LinkLayer::Ethernet
            } else {
                LinkLayer::Infiniband
            };
            let gid_index = match cfg.gid_index {
                Some(g) => g,
                None => pick_gid(&ctx, port, attr.gid_table_len, link),
            };
            let gid = match ctx.query_gid(port, gid_index) {
                Ok(g) if g != [0; 16] => g,
                Ok(_) => {
                    why.push(format!(
                        "{}:{port} has no GID at index {gid_index}",
                        names[i]
                    ));
                    continue;
                }
                Err(e) => {
                    why.push(format!("{}:{port}: {e}", names[i]));
                    continue;
                }
            };
            let info = PortInfo {
                device: names[i].clone(),
                port,
                lid: attr.lid,
                gid,
                gid_index,
                mtu: attr.active_mtu.clamp(1, 5),
                link,
                forced,
            };
            return Ok(Ok(IbDevice {
                ctx,
                port,
                gid_index,
                info,
                max_msg: (attr.max_msg_size as usize).max(1 << 16),
                max_qp_wr: dev.max_qp_wr.max(16) as u32,
                max_cqe: dev.max_cqe.max(64),
            }));
        }
    }
    Ok(Err(format!("no usable port: {}", why.join("; "))))
}

/// The GID to use when none is configured: index 0 on InfiniBand; on RoCE the first
/// IPv4-mapped GID (RoCE v2 over IPv4, routable), else 0.
fn pick_gid(ctx: &Context, port: u8, len: i32, link: LinkLayer) -> u8 {
    if link == LinkLayer::Infiniband {
        return 0;
    }
    for i in 0..len.clamp(0, 256) {
        if let Ok(g) = ctx.query_gid(port, i as u8)
            && g[..10] == [0; 10]
            && g[10..12] == [0xff, 0xff]
        {
            return i as u8;
        }
    }
    0
}

/// Sends waiting for credits, a send buffer or send-queue room, in order.
enum Out {
    /// A message with a header (and, for `Eager`, the user's payload, copied at post time;
    /// `token` reported done then).
    Msg {
        msg: Msg,
        payload: Option<(SendBuf, Token)>,
    },
    /// The copy path of a large message: fragments through the eager buffers.
    Frags {
        id: u32,
        data: SendBuf,
        off: usize,
        token: Token,
    },
    /// The zero-copy path: RDMA writes of the registered user buffer, the last one with
    /// the id as immediate data.
    Write {
        id: u32,
        data: SendBuf,
        lkey: u32,
        addr: u64,
        rkey: u32,
        off: usize,
    },
}

/// A large receive with a buffer, between our Cts and its last byte.
struct InRecv {
    buf: RecvBuf,
    token: Token,
    reasm: Reassembly,
    reg: Option<RegKey>,
}

/// A zero-copy send in flight.
struct OutWrite {
    token: Token,
    key: RegKey,
    /// Write requests posted and not completed.
    pending: u32,
    /// All pieces posted.
    posted: bool,
}

/// A peer's liveness connection: a TCP socket on which nothing is sent but one `B` (a
/// normal goodbye) before it closes.
struct Watch {
    stream: std::net::TcpStream,
    bye: bool,
}

struct Peer {
    qp: Qp,
    credits: proto::Credits,
    /// First slot of this peer in the receive and send buffer pools.
    slot_base: usize,
    send_free: Vec<u32>,
    sq_free: u32,
    sq_total: u32,
    /// Largest payload of an eager message or fragment to this peer.
    eager_max: usize,
    queue: VecDeque<Out>,
    next_id: u32,
    awaiting_cts: HashMap<u32, (SendBuf, Token)>,
    receiving: HashMap<u32, InRecv>,
    kept: HashMap<u32, u64>,
    writes: HashMap<u32, OutWrite>,
    ka_addr: u64,
    ka_rkey: u32,
    ka_pending: bool,
    failed: bool,
    closed: bool,
}

/// The verbs transport of one rank. See the module documentation.
pub struct IbvTransport {
    rank: usize,
    cfg: IbConfig,
    port_info: PortInfo,
    // Field order is drop order: queue pairs (in peers) first, then memory, then the CQ.
    peers: Vec<Option<Peer>>,
    reg: RegCache<Mr>,
    recv_pool: OwnedMr,
    send_pool: OwnedMr,
    /// 16 bytes: 0..8 is peers' keepalive target, 8..16 our keepalive source.
    ka_pool: OwnedMr,
    cq: Cq,
    chan: CompChannel,
    pd: Pd,
    slot_size: usize,
    max_inline: usize,
    max_write: usize,
    wcs: Vec<Wc>,
    armed: bool,
    epoll: OwnedFd,
    wake_fd: Arc<OwnedFd>,
    last_keepalive: Instant,
    /// Per peer, the liveness connection (see [`IbvTransport::watch`]).
    watches: Vec<Option<Watch>>,
    /// A liveness connection may have something to read.
    watch_ready: bool,
    sends_done: Vec<Token>,
    failures: Vec<(usize, String)>,
    closed: Vec<usize>,
}

const EPOLL_CHANNEL: u64 = 1;
const EPOLL_WAKER: u64 = 2;
/// Epoll tags of liveness connections: this plus the peer's rank.
const EPOLL_WATCH: u64 = 16;
/// Completions handled per progress call at most, so one busy peer cannot starve the rest.
const MAX_WCS_PER_PROGRESS: usize = 512;
/// Send-queue entries beyond the credit window: RDMA writes and keepalives.
const SQ_EXTRA: u32 = 32;
/// `IBV_WC_WR_FLUSH_ERR`: what requests of a queue pair in the error state end with.
const FLUSH_STATUS: u32 = 5;

impl IbvTransport {
    /// A transport for `rank` of a world of `peers.len()` ranks on `dev`, with a queue pair
    /// (in INIT, receives posted) for each rank `r` where `peers[r]`. Connect it with
    /// [`IbvTransport::connect`] after publishing [`IbvTransport::local_info`].
    pub fn new(dev: IbDevice, rank: usize, peers: &[bool], cfg: IbConfig) -> Result<IbvTransport> {
        let n_peers = peers
            .iter()
            .enumerate()
            .filter(|&(r, &p)| p && r != rank)
            .count();
        let slots = (cfg.data_slots + cfg.ctl_slots) as usize;
        let slot_size = cfg.slot_size();
        let sq = (slots as u32 + SQ_EXTRA).min(dev.max_qp_wr);
        let rq = (slots as u32).min(dev.max_qp_wr);
        if (rq as usize) < slots {
            return Err(Error::config(
                "FERROCOMM_IB_RECV_SLOTS",
                cfg.data_slots.to_string(),
                format!(
                    "the device takes at most {} receives per queue pair",
                    dev.max_qp_wr
                ),
            ));
        }
        let cqe = ((sq + rq) as usize * n_peers.max(1) + 16).min(dev.max_cqe as usize) as i32;
        let pd = dev.ctx.alloc_pd()?;
        let chan = dev.ctx.comp_channel()?;
        let cq = dev.ctx.create_cq(cqe, Some(&chan))?;
        let pool_len = slot_size * slots * n_peers.max(1);
        let recv_pool = pd.alloc_registered(pool_len, verbs::access::LOCAL_WRITE)?;
        let send_pool = pd.alloc_registered(pool_len, verbs::access::LOCAL_WRITE)?;
        let ka_pool =
            pd.alloc_registered(16, verbs::access::LOCAL_WRITE | verbs::access::REMOTE_WRITE)?;
        let mut rng = [0u8; 4];
        getrandom::fill(&mut rng).map_err(|e| {
            Error::io(
                "drawing initial packet sequence numbers",
                std::io::Error::other(e.to_string()),
            )
        })?;
        let psn_base = u32::from_le_bytes(rng);
        let mut list: Vec<Option<Peer>> = Vec::with_capacity(peers.len());
        let mut base = 0;
        for (r, &use_it) in peers.iter().enumerate() {
            if !use_it || r == rank {
                list.push(None);
                continue;
            }
            let qp = Qp::new_rc(
                &pd,
                &cq,
                &cq,
                QpCaps {
                    send_wr: sq,
                    recv_wr: rq,
                    max_inline: cfg.max_inline,
                },
                dev.port,
                dev.gid_index,
                psn_base.wrapping_add(r as u32 * 7919),
            )?;
            let peer = Peer {
                qp,
                credits: proto::Credits::new(1, 1, 1),
                slot_base: base,
                send_free: (0..slots as u32).rev().collect(),
                sq_free: sq,
                sq_total: sq,
                eager_max: cfg.eager_limit,
                queue: VecDeque::new(),
                next_id: 1,
                awaiting_cts: HashMap::new(),
                receiving: HashMap::new(),
                kept: HashMap::new(),
                writes: HashMap::new(),
                ka_addr: 0,
                ka_rkey: 0,
                ka_pending: false,
                failed: false,
                closed: false,
            };
            for i in 0..slots {
                let sge = recv_pool.sge((base + i) * slot_size, slot_size);
                let id = WrId {
                    kind: WrKind::Recv,
                    peer: r as u32,
                    index: i as u32,
                }
                .encode();
                // SAFETY: the slot lies in recv_pool, which outlives the queue pair (field
                // order); nobody else uses a slot while its receive is posted.
                unsafe { peer.qp.post_recv(id, sge)? };
            }
            base += slots;
            list.push(Some(peer));
        }
        let max_inline = list
            .iter()
            .flatten()
            .map(|p| p.qp.caps().max_inline as usize)
            .min()
            .unwrap_or(0);
        // SAFETY: epoll_create1 and eventfd make new descriptors; results are checked.
        let (ep, efd) = unsafe {
            (
                libc::epoll_create1(libc::EPOLL_CLOEXEC),
                libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC),
            )
        };
        if ep < 0 || efd < 0 {
            return Err(Error::io(
                "creating the verbs transport's epoll and eventfd",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: both descriptors were just created and are owned from here on.
        let (epoll, wake_fd) = unsafe { (OwnedFd::from_raw_fd(ep), OwnedFd::from_raw_fd(efd)) };
        for (fd, tag) in [
            (chan.fd(), EPOLL_CHANNEL),
            (wake_fd.as_raw_fd(), EPOLL_WAKER),
        ] {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: tag,
            };
            // SAFETY: epoll and fd are open descriptors; ev is a valid event.
            let ret =
                unsafe { libc::epoll_ctl(epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
            if ret != 0 {
                return Err(Error::io(
                    "registering the completion channel with epoll",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        tracing::debug!(
            rank,
            device = %dev.info.device,
            peers = n_peers,
            max_inline,
            slot_size,
            slots,
            "verbs transport created"
        );
        Ok(IbvTransport {
            rank,
            max_write: cfg.max_write.min(dev.max_msg).max(1 << 16),
            reg: RegCache::new(cfg.reg_cache),
            cfg,
            port_info: dev.info,
            peers: list,
            recv_pool,
            send_pool,
            ka_pool,
            cq,
            chan,
            pd,
            slot_size,
            max_inline,
            wcs: Vec::with_capacity(64),
            armed: false,
            epoll,
            wake_fd: Arc::new(wake_fd),
            last_keepalive: Instant::now(),
            watches: (0..peers.len()).map(|_| None).collect(),
            watch_ready: false,
            sends_done: Vec::new(),
            failures: Vec::new(),
            closed: Vec::new(),
        })
    }

    /// What peers need to connect to this rank: its port, and per peer its queue pair.
    pub fn local_info(&self) -> (PortInfo, Vec<QpInfo>) {
        let qps = self
            .peers
            .iter()
            .enumerate()
            .filter_map(|(r, p)| {
                p.as_ref().map(|p| QpInfo {
                    peer: r as u32,
                    qpn: p.qp.qpn(),
                    psn: p.qp.psn(),
                    data_slots: self.cfg.data_slots,
                    ctl_slots: self.cfg.ctl_slots,
                    slot_size: self.slot_size as u32,
                    ka_addr: self.ka_pool.ptr() as u64,
                    ka_rkey: self.ka_pool.mr().rkey(),
                })
            })
            .collect();
        (self.port_info.clone(), qps)
    }

    /// The ranks this transport has a queue pair for.
    pub fn peers(&self) -> Vec<usize> {
        (0..self.peers.len())
            .filter(|&r| self.peers[r].is_some())
            .collect()
    }

    /// Brings the queue pair of `peer` to RTS towards its published `port` and `qp`.
    pub fn connect(&mut self, peer: usize, port: &PortInfo, qp: &QpInfo) -> Result<()> {
        let mine = &self.port_info;
        let Some(Some(p)) = self.peers.get_mut(peer) else {
            return Err(Error::invalid(
                "connect",
                "peer",
                format!("no queue pair for rank {peer}"),
            ));
        };
        if qp.peer as usize != self.rank {
            return Err(Error::misbehaved(
                format!("rank {peer}"),
                format!(
                    "published a queue pair for rank {} as ours ({})",
                    qp.peer, self.rank
                ),
            ));
        }
        let remote = Remote {
            qpn: qp.qpn,
            psn: qp.psn,
            lid: port.lid,
            gid: port.gid,
            global: port.link == LinkLayer::Ethernet || port.lid == 0 || !mine.same_fabric(port),
            mtu: mine.mtu.min(port.mtu),
        };
        p.qp.connect(&remote).map_err(|e| Error::PeerLost {
            rank: self.rank,
            peer,
            op: "connecting the verbs queue pair".into(),
            detail: format!("{e} (its port: {})", port.encode()),
        })?;
        p.credits = proto::Credits::new(qp.data_slots, qp.ctl_slots, (qp.data_slots / 2).max(1));
        p.eager_max = (qp.slot_size as usize).min(self.slot_size) - HEADER_LEN;
        p.ka_addr = qp.ka_addr;
        p.ka_rkey = qp.ka_rkey;
        Ok(())
    }

    /// Forgets idle cached registrations overlapping `[addr, addr + len)` (call before
    /// freeing a buffer that was used for large messages when `FERROCOMM_IB_REG_CACHE` is
    /// set).
    pub fn invalidate(&mut self, addr: usize, len: usize) {
        drop(self.reg.invalidate(addr, len));
    }

    /// Watches `peer` through `stream`, a TCP connection to it on which nothing flows: when
    /// its process dies the kernel closes the connection and the peer fails at once, even
    /// where the verbs stack would never time out (soft-RoCE does not retry a write to a
    /// destroyed queue pair) or only after its retries. A normal close sends one `B` first.
    pub fn watch(&mut self, peer: usize, stream: std::net::TcpStream) -> Result<()> {
        if !matches!(self.peers.get(peer), Some(Some(_))) {
            return Err(Error::invalid(
                "watch",
                "peer",
                format!("no queue pair for rank {peer}"),
            ));
        }
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io("making a liveness connection non-blocking", e))?;
        let mut e = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            u64: EPOLL_WATCH + peer as u64,
        };
        // SAFETY: both descriptors are open; e is a valid event.
        let ret = unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                stream.as_raw_fd(),
                &mut e,
            )
        };
        if ret != 0 {
            return Err(Error::io(
                "registering a liveness connection with epoll",
                std::io::Error::last_os_error(),
            ));
        }
        self.watches[peer] = Some(Watch { stream, bye: false });
        Ok(())
    }

    /// Reads the liveness connections: a closed one fails its peer, unless it said goodbye
    /// (then the peer is closed, after everything it sent before has been handled).
    fn check_watches(&mut self, ev: &mut dyn Events) -> Result<()> {
        use std::io::Read;
        self.watch_ready = false;
        let mut gone = Vec::new();
        for (peer, w) in self.watches.iter_mut().enumerate() {
            let Some(w) = w else { continue };
            let mut buf = [0u8; 16];
            let end = loop {
                match w.stream.read(&mut buf) {
                    Ok(0) => break Some("closed".to_string()),
                    Ok(n) => w.bye |= buf[..n].contains(&b'B'),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(format!("failed ({e})")),
                }
            };
            if let Some(how) = end {
                gone.push((peer, w.bye, how));
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        // What the peer sent before it went is in the completion queue: handle it first.
        self.poll_all(ev)?;
        for (peer, bye, how) in gone {
            self.unwatch(peer);
            let Some(Some(p)) = self.peers.get_mut(peer) else {
                continue;
            };
            if p.failed || p.closed {
                continue;
            }
            if bye {
                p.closed = true;
                self.closed.push(peer);
                continue;
            }
            let detail = format!(
                "its process is gone or it gave up on this rank (its liveness connection {how} \
                 without a goodbye); its queue pair is now in the error state, verbs status of \
                 its requests: {}",
                verbs::status_str(FLUSH_STATUS)
            );
            self.fail(peer, detail);
        }
        Ok(())
    }

    /// Handles every completion in the queue now.
    fn poll_all(&mut self, ev: &mut dyn Events) -> Result<bool> {
        let mut did = false;
        let mut handled = 0;
        loop {
            if self.wcs.is_empty() {
                self.cq.poll(&mut self.wcs, 32)?;
            }
            if self.wcs.is_empty() {
                break;
            }
            did = true;
            let mut batch = std::mem::take(&mut self.wcs);
            handled += batch.len();
            for wc in &batch {
                self.handle(*wc, ev);
            }
            batch.clear();
            if self.wcs.is_empty() {
                self.wcs = batch;
            }
            if handled >= MAX_WCS_PER_PROGRESS {
                break;
            }
        }
        Ok(did)
    }

    fn check_peer(&self, peer: usize, op: &str) -> Result<()> {
        match self.peers.get(peer) {
            Some(Some(p)) if p.failed || p.closed => Err(Error::PeerLost {
                rank: self.rank,
                peer,
                op: op.into(),
                detail: if p.closed {
                    "it closed its communicator (finished)".into()
                } else {
                    "its verbs connection already failed".into()
                },
            }),
            Some(Some(_)) => Ok(()),
            _ => Err(Error::invalid(
                op,
                "peer",
                format!("rank {peer} is not reached through the verbs transport"),
            )),
        }
    }

    /// Fails `peer`: its queue pair goes to the error state, its buffers are forgotten.
    fn fail(&mut self, peer: usize, detail: String) {
        let Some(Some(p)) = self.peers.get_mut(peer) else {
            return;
        };
        if p.failed || p.closed {
            return;
        }
        p.failed = true;
        if let Err(e) = p.qp.to_error() {
            tracing::debug!(peer, "moving the queue pair to the error state: {e}");
        }
        let mut keys: Vec<RegKey> = p.receiving.values().filter_map(|r| r.reg).collect();
        keys.extend(p.writes.values().map(|w| w.key));
        p.queue.clear();
        p.awaiting_cts.clear();
        p.receiving.clear();
        p.kept.clear();
        p.writes.clear();
        for k in keys {
            drop(self.reg.release(&k));
        }
        // Closing the liveness connection (without a goodbye) tells the peer at once that
        // this side gave up on it, so it does not wait on a queue pair that is now dead.
        self.unwatch(peer);
        tracing::debug!(rank = self.rank, peer, "verbs peer failed: {detail}");
        self.failures.push((peer, detail));
    }

    /// Stops watching `peer` and closes its liveness connection.
    fn unwatch(&mut self, peer: usize) {
        if let Some(w) = self.watches.get_mut(peer).and_then(Option::take) {
            // SAFETY: removing an open descriptor from our epoll set.
            unsafe {
                libc::epoll_ctl(
                    self.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    w.stream.as_raw_fd(),
                    std::ptr::null_mut(),
                )
            };
        }
    }

    fn recv_slot(&self, peer: &Peer, i: u32) -> (usize, Sge) {
        let off = (peer.slot_base + i as usize) * self.slot_size;
        (off, self.recv_pool.sge(off, self.slot_size))
    }

    /// Posts what `peer`'s queue allows, then an explicit credit message if one is due.
    fn flush(&mut self, peer: usize) {
        if let Err(detail) = self.try_flush(peer) {
            self.fail(peer, detail);
        }
    }

    fn try_flush(&mut self, peer: usize) -> std::result::Result<(), String> {
        let Some(Some(p)) = self.peers.get_mut(peer) else {
            return Ok(());
        };
        if p.failed || p.closed {
            return Ok(());
        }
        while let Some(front) = p.queue.front_mut() {
            if p.sq_free == 0 {
                break;
            }
            match front {
                Out::Msg { msg, payload } => {
                    let class = msg.class();
                    if !p.credits.can_send(class) {
                        break;
                    }
                    let data = payload.map(|(d, _)| d);
                    let len = data.map_or(0, |d| d.len);
                    let inline = HEADER_LEN + len <= self.max_inline;
                    if !inline && p.send_free.is_empty() {
                        break;
                    }
                    let msg = *msg;
                    let token = payload.map(|(_, t)| t);
                    let credits = p.credits.consume(class);
                    let head = Header { msg, credits }.encode();
                    // SAFETY: the send buffer stays valid until its token is reported
                    // (contract point 4); it is copied by post_message.
                    let bytes = data.map_or(&[][..], |d| unsafe { d.as_slice() });
                    post_message(
                        p,
                        peer,
                        &self.send_pool,
                        self.slot_size,
                        &head,
                        bytes,
                        inline,
                    )?;
                    p.queue.pop_front();
                    if let Some(t) = token {
                        self.sends_done.push(t);
                    }
                }
                Out::Frags {
                    id,
                    data,
                    off,
                    token,
                } => {
                    let (id, data, start, token) = (*id, *data, *off, *token);
                    if !p.credits.can_send(Class::Data) || p.send_free.is_empty() {
                        break;
                    }
                    let n = (data.len - start).min(p.eager_max);
                    let msg = Msg::Frag {
                        id,
                        offset: start as u64,
                    };
                    let credits = p.credits.consume(Class::Data);
                    let head = Header { msg, credits }.encode();
                    // SAFETY: as above: borrowed until the token is reported.
                    let bytes = unsafe { &data.as_slice()[start..start + n] };
                    post_message(
                        p,
                        peer,
                        &self.send_pool,
                        self.slot_size,
                        &head,
                        bytes,
                        false,
                    )?;
                    if start + n >= data.len {
                        p.queue.pop_front();
                        self.sends_done.push(token);
                    } else if let Some(Out::Frags { off, .. }) = p.queue.front_mut() {
                        *off = start + n;
                    }
                }
                Out::Write {
                    id,
                    data,
                    lkey,
                    addr,
                    rkey,
                    off,
                } => {
                    let n = (data.len - *off).min(self.max_write);
                    let last = *off + n >= data.len;
                    if last && !p.credits.can_send(Class::Data) {
                        break;
                    }
                    let sge = Sge {
                        addr: data.ptr as u64 + *off as u64,
                        len: n as u32,
                        lkey: *lkey,
                    };
                    let raddr = *addr + *off as u64;
                    let op = if last {
                        p.credits.take(Class::Data);
                        SendOp::WriteImm {
                            addr: raddr,
                            rkey: *rkey,
                            imm: *id,
                        }
                    } else {
                        SendOp::Write {
                            addr: raddr,
                            rkey: *rkey,
                        }
                    };
                    let wr = WrId {
                        kind: WrKind::Write,
                        peer: peer as u32,
                        index: *id,
                    }
                    .encode();
                    // SAFETY: the source is the user's send buffer, borrowed until the
                    // token is reported, registered (lkey) until the last write completes;
                    // the target was granted by the peer's Cts.
                    unsafe { p.qp.post_send(wr, &[sge], op, false) }.map_err(|e| e.to_string())?;
                    p.sq_free -= 1;
                    *off += n;
                    let id = *id;
                    if let Some(w) = p.writes.get_mut(&id) {
                        w.pending += 1;
                        w.posted = last;
                    }
                    if last {
                        p.queue.pop_front();
                    }
                }
            }
        }
        let inline = HEADER_LEN <= self.max_inline;
        if p.credits.wants_credit_message() && p.sq_free > 0 && (inline || !p.send_free.is_empty())
        {
            let credits = p.credits.consume(Class::Ctl);
            let head = Header {
                msg: Msg::Credit,
                credits,
            }
            .encode();
            post_message(p, peer, &self.send_pool, self.slot_size, &head, &[], inline)?;
        }
        Ok(())
    }

    /// Handles one completion.
    fn handle(&mut self, wc: Wc, ev: &mut dyn Events) {
        let Some(id) = WrId::decode(wc.wr_id) else {
            tracing::warn!(wr_id = wc.wr_id, "completion of an unknown work request");
            return;
        };
        let peer = id.peer as usize;
        let Some(Some(p)) = self.peers.get_mut(peer) else {
            return;
        };
        // Send-queue accounting first: it holds whatever the status.
        match id.kind {
            WrKind::Send => {
                p.send_free.push(id.index);
                p.sq_free += 1;
            }
            WrKind::SendInline | WrKind::Write | WrKind::Other => p.sq_free += 1,
            WrKind::Keepalive => {
                p.sq_free += 1;
                p.ka_pending = false;
                tracing::trace!(peer, status = wc.status, "keepalive completed");
            }
            WrKind::Recv => {}
        }
        if p.failed || p.closed {
            return;
        }
        if !wc.ok() {
            let what = match id.kind {
                WrKind::Recv => "a receive",
                WrKind::Send | WrKind::SendInline => "a send",
                WrKind::Write => "an RDMA write",
                WrKind::Keepalive => "a keepalive probe",
                WrKind::Other => "a request",
            };
            let detail = format!(
                "{what} failed with verbs status {} (the peer's process is gone, or \
                 its queue pair failed)",
                wc.describe()
            );
            self.fail(peer, detail);
            return;
        }
        let result = match id.kind {
            WrKind::Recv => self.on_recv(peer, id.index, wc, ev),
            WrKind::Write => {
                self.on_write_done(peer, id.index);
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(detail) = result {
            self.fail(peer, detail);
        }
    }

    fn on_write_done(&mut self, peer: usize, id: u32) {
        let Some(Some(p)) = self.peers.get_mut(peer) else {
            return;
        };
        let Some(w) = p.writes.get_mut(&id) else {
            return;
        };
        w.pending = w.pending.saturating_sub(1);
        if w.pending == 0
            && w.posted
            && let Some(w) = p.writes.remove(&id)
        {
            drop(self.reg.release(&w.key));
            self.sends_done.push(w.token);
        }
    }

    fn on_recv(
        &mut self,
        peer: usize,
        slot: u32,
        wc: Wc,
        ev: &mut dyn Events,
    ) -> std::result::Result<(), String> {
        let class = if wc.is_write_imm() {
            let id = wc.imm.ok_or("an RDMA write completed without its id")?;
            self.finish_write_recv(peer, id, ev)?;
            Class::Data
        } else {
            let (off, _) = match self.peers[peer].as_ref() {
                Some(p) => self.recv_slot(p, slot),
                None => return Ok(()),
            };
            let len = (wc.byte_len as usize).min(self.slot_size);
            // SAFETY: the slot's receive has completed and it is not reposted until this
            // message is handled, so the HCA does not write it meanwhile. The slice is
            // detached from `self` (raw parts) so that handling can update the peer's state;
            // the pool outlives this call.
            let bytes: &[u8] = unsafe {
                let s = self.recv_pool.slice(off, len);
                std::slice::from_raw_parts(s.as_ptr(), s.len())
            };
            let (h, payload) =
                Header::decode(bytes).map_err(|e| format!("sent a bad message: {e}"))?;
            let class = h.msg.class();
            if let Some(Some(p)) = self.peers.get_mut(peer) {
                p.credits
                    .returned(h.credits)
                    .map_err(|e| format!("broke the credit protocol: {e}"))?;
            }
            self.dispatch(peer, h.msg, payload, ev)?;
            class
        };
        // Repost the slot and count the credit owed.
        let Some(Some(p)) = self.peers.get_mut(peer) else {
            return Ok(());
        };
        if p.failed || p.closed {
            return Ok(());
        }
        let sge = self.recv_pool.sge(
            (p.slot_base + slot as usize) * self.slot_size,
            self.slot_size,
        );
        let wr = WrId {
            kind: WrKind::Recv,
            peer: peer as u32,
            index: slot,
        }
        .encode();
        // SAFETY: the slot is in recv_pool (outlives the QP) and was just consumed.
        unsafe { p.qp.post_recv(wr, sge) }.map_err(|e| e.to_string())?;
        p.credits.reposted(class);
        Ok(())
    }

    fn dispatch(
        &mut self,
        peer: usize,
        msg: Msg,
        payload: &[u8],
        ev: &mut dyn Events,
    ) -> std::result::Result<(), String> {
        match msg {
            Msg::Eager { env, len } => match ev.incoming(peer, &env, len as usize) {
                Placement::Into(buf, token) => {
                    if buf.len < payload.len() {
                        return Err(format!("internal error: buffer of {} for {len}", buf.len));
                    }
                    // SAFETY: the communicator handed over this buffer (at least len bytes)
                    // until the token is reported.
                    let dst = unsafe { buf.as_mut_slice() };
                    dst[..payload.len()].copy_from_slice(payload);
                    ev.recv_done(token);
                }
                Placement::Keep => ev.stored(peer, env, Stored::Bytes(payload.to_vec())),
                Placement::Discard => {}
            },
            Msg::Rts { id, env, len } => {
                if len > self.cfg.max_message {
                    return Err(format!(
                        "announced a message of {len} bytes, over the limit of {}",
                        self.cfg.max_message
                    ));
                }
                match ev.incoming(peer, &env, len as usize) {
                    Placement::Into(buf, token) => self.start_recv(peer, id, len, buf, token),
                    Placement::Keep => {
                        if let Some(Some(p)) = self.peers.get_mut(peer) {
                            p.kept.insert(id, len);
                        }
                        ev.stored(
                            peer,
                            env,
                            Stored::Remote {
                                handle: id as u64,
                                len: len as usize,
                            },
                        );
                    }
                    Placement::Discard => self.queue_msg(
                        peer,
                        Msg::Cts {
                            id,
                            mode: CtsMode::Discard,
                        },
                    ),
                }
            }
            Msg::Cts { id, mode } => {
                let Some(Some(p)) = self.peers.get_mut(peer) else {
                    return Ok(());
                };
                let (data, token) = p
                    .awaiting_cts
                    .remove(&id)
                    .ok_or_else(|| format!("cleared message id {id} that was never announced"))?;
                match mode {
                    CtsMode::Discard => self.sends_done.push(token),
                    CtsMode::Copy => p.queue.push_back(Out::Frags {
                        id,
                        data,
                        off: 0,
                        token,
                    }),
                    CtsMode::Write { addr, rkey } => {
                        let key = RegKey {
                            addr: data.ptr as usize,
                            len: data.len,
                            access: 0,
                        };
                        // SAFETY: the send buffer stays valid until its token is reported;
                        // the registration is released before that (write completion).
                        let reg = self.reg.acquire(key, || unsafe {
                            self.pd.register(data.ptr as *mut u8, data.len, 0)
                        });
                        let p = self.peers[peer].as_mut().ok_or("peer vanished")?;
                        match reg {
                            Ok(mr) => {
                                let lkey = mr.lkey();
                                p.writes.insert(
                                    id,
                                    OutWrite {
                                        token,
                                        key,
                                        pending: 0,
                                        posted: false,
                                    },
                                );
                                p.queue.push_back(Out::Write {
                                    id,
                                    data,
                                    lkey,
                                    addr,
                                    rkey,
                                    off: 0,
                                });
                            }
                            Err(e) => {
                                tracing::debug!(
                                    peer,
                                    "registering a send buffer failed ({e}); copying"
                                );
                                p.queue.push_back(Out::Frags {
                                    id,
                                    data,
                                    off: 0,
                                    token,
                                });
                            }
                        }
                    }
                }
            }
            Msg::Frag { id, offset } => {
                let Some(Some(p)) = self.peers.get_mut(peer) else {
                    return Ok(());
                };
                let r = p.receiving.get_mut(&id).ok_or_else(|| {
                    format!("sent a fragment of message {id} that was never cleared")
                })?;
                let done = r
                    .reasm
                    .add(offset, payload.len())
                    .map_err(|e| format!("sent a bad fragment: {e}"))?;
                // SAFETY: the buffer is the communicator's, handed over until the token is
                // reported; the fragment was checked to lie inside the message.
                let dst = unsafe { r.buf.as_mut_slice() };
                dst[offset as usize..offset as usize + payload.len()].copy_from_slice(payload);
                if done {
                    self.finish_recv(peer, id, ev);
                }
            }
            Msg::Credit => {}
            Msg::Bye => {
                if let Some(Some(p)) = self.peers.get_mut(peer) {
                    p.closed = true;
                    p.queue.clear();
                    p.awaiting_cts.clear();
                    p.kept.clear();
                    let mut keys: Vec<RegKey> =
                        p.receiving.values().filter_map(|r| r.reg).collect();
                    keys.extend(p.writes.values().map(|w| w.key));
                    p.receiving.clear();
                    p.writes.clear();
                    for k in keys {
                        drop(self.reg.release(&k));
                    }
                    self.closed.push(peer);
                }
            }
        }
        Ok(())
    }

    fn finish_write_recv(
        &mut self,
        peer: usize,
        id: u32,
        ev: &mut dyn Events,
    ) -> std::result::Result<(), String> {
        let Some(Some(p)) = self.peers.get_mut(peer) else {
            return Ok(());
        };
        if !p.receiving.contains_key(&id) {
            return Err(format!("RDMA-wrote message {id} that was never cleared"));
        }
        self.finish_recv(peer, id, ev);
        Ok(())
    }

    fn finish_recv(&mut self, peer: usize, id: u32, ev: &mut dyn Events) {
        let Some(Some(p)) = self.peers.get_mut(peer) else {
            return;
        };
        if let Some(r) = p.receiving.remove(&id) {
            if let Some(k) = r.reg {
                drop(self.reg.release(&k));
            }
            ev.recv_done(r.token);
        }
    }

    /// Sets up the receive of announced message `id` into `buf` and answers with a Cts.
    fn start_recv(&mut self, peer: usize, id: u32, len: u64, buf: RecvBuf, token: Token) {
        let len_us = len as usize;
        let mut mode = CtsMode::Copy;
        let mut reg = None;
        if len_us >= self.cfg.zcopy_threshold {
            let key = RegKey {
                addr: buf.ptr as usize,
                len: len_us,
                access: verbs::access::LOCAL_WRITE | verbs::access::REMOTE_WRITE,
            };
            // SAFETY: the receive buffer is handed over until the token is reported; the
            // registration is released before (at the last byte, or when the peer fails).
            let r = self.reg.acquire(key, || unsafe {
                self.pd.register(buf.ptr, len_us, key.access)
            });
            match r {
                Ok(mr) => {
                    mode = CtsMode::Write {
                        addr: buf.ptr as u64,
                        rkey: mr.rkey(),
                    };
                    reg = Some(key);
                }
                Err(e) => {
                    tracing::debug!(peer, "registering a receive buffer failed ({e}); copying")
                }
            }
        }
        if let Some(Some(p)) = self.peers.get_mut(peer) {
            p.receiving.insert(
                id,
                InRecv {
                    buf: RecvBuf {
                        ptr: buf.ptr,
                        len: len_us,
                    },
                    token,
                    reasm: Reassembly::new(len),
                    reg,
                },
            );
        }
        self.queue_msg(peer, Msg::Cts { id, mode });
    }

    fn queue_msg(&mut self, peer: usize, msg: Msg) {
        if let Some(Some(p)) = self.peers.get_mut(peer) {
            p.queue.push_back(Out::Msg { msg, payload: None });
        }
    }

    /// Probes every live peer with an 8-byte RDMA write now and then: a peer whose process
    /// died never answers, the write fails after the retries, and the peer fails.
    fn keepalive(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.last_keepalive) < self.cfg.keepalive {
            return false;
        }
        self.last_keepalive = now;
        let src = self.ka_pool.sge(8, 8);
        let mut broken = Vec::new();
        for (r, p) in self.peers.iter_mut().enumerate() {
            let Some(p) = p else { continue };
            if p.failed
                || p.closed
                || p.ka_pending
                || p.sq_free == 0
                || p.ka_rkey == 0 && p.ka_addr == 0
            {
                continue;
            }
            let wr = WrId {
                kind: WrKind::Keepalive,
                peer: r as u32,
                index: 0,
            }
            .encode();
            let op = SendOp::Write {
                addr: p.ka_addr,
                rkey: p.ka_rkey,
            };
            // SAFETY: the source is 8 bytes of our registered keepalive pool (outlives the
            // QP); the target is the peer's published keepalive word.
            match unsafe { p.qp.post_send(wr, &[src], op, false) } {
                Ok(()) => {
                    tracing::trace!(peer = r, "keepalive posted");
                    p.sq_free -= 1;
                    p.ka_pending = true;
                }
                Err(e) => broken.push((r, format!("posting a keepalive probe failed: {e}"))),
            }
        }
        for (r, why) in broken {
            self.fail(r, why);
        }
        true
    }

    /// Takes pending completion events and wake-ups after a sleep.
    fn drain_events(&mut self) -> Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: epoll is our open descriptor; events has room for 8 entries; no wait.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 8, 0) };
        for e in &events[..n.max(0) as usize] {
            if e.u64 >= EPOLL_WATCH {
                self.watch_ready = true;
            }
        }
        while self.chan.get_event(&self.cq)? {}
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes from our non-blocking eventfd into a local buffer.
        unsafe { libc::read(self.wake_fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        self.armed = false;
        Ok(())
    }

    /// Arms the CQ and checks it once more (a completion may have arrived just before):
    /// true when there is work and the caller must not sleep.
    fn arm(&mut self) -> Result<bool> {
        if !self.wcs.is_empty()
            || !self.sends_done.is_empty()
            || !self.failures.is_empty()
            || !self.closed.is_empty()
        {
            return Ok(true);
        }
        if !self.armed {
            self.cq.arm()?;
            self.armed = true;
        }
        self.cq.poll(&mut self.wcs, 32)?;
        Ok(!self.wcs.is_empty())
    }
}

/// Posts header + `bytes` to peer `p` as one SEND: inline, or copied into a send slot.
fn post_message(
    p: &mut Peer,
    peer: usize,
    pool: &OwnedMr,
    slot_size: usize,
    head: &[u8; HEADER_LEN],
    bytes: &[u8],
    inline: bool,
) -> std::result::Result<(), String> {
    let total = HEADER_LEN + bytes.len();
    if inline {
        // Header and payload as two elements: the provider copies both into the work
        // request, so the payload is copied once, straight from the user's buffer.
        let mut sges = [Sge {
            addr: head.as_ptr() as u64,
            len: HEADER_LEN as u32,
            lkey: 0,
        }; 2];
        let n = if bytes.is_empty() {
            1
        } else {
            sges[1] = Sge {
                addr: bytes.as_ptr() as u64,
                len: bytes.len() as u32,
                lkey: 0,
            };
            2
        };
        let wr = WrId {
            kind: WrKind::SendInline,
            peer: peer as u32,
            index: 0,
        }
        .encode();
        // SAFETY: inline data is copied into the work request during the call; the header
        // and the payload live across it.
        unsafe { p.qp.post_send(wr, &sges[..n], SendOp::Send, true) }.map_err(|e| e.to_string())?;
    } else {
        let slot = p.send_free.pop().ok_or("internal error: no send buffer")?;
        let off = (p.slot_base + slot as usize) * slot_size;
        // SAFETY: the slot is free (no posted request uses it until this one completes).
        let dst = unsafe { pool.slice_mut(off, total) };
        dst[..HEADER_LEN].copy_from_slice(head);
        dst[HEADER_LEN..].copy_from_slice(bytes);
        let wr = WrId {
            kind: WrKind::Send,
            peer: peer as u32,
            index: slot,
        }
        .encode();
        // SAFETY: the slot is registered memory of the pool, which outlives the QP, and is
        // not reused before this request's completion returns it to send_free.
        if let Err(e) = unsafe {
            p.qp.post_send(wr, &[pool.sge(off, total)], SendOp::Send, false)
        } {
            p.send_free.push(slot);
            return Err(e.to_string());
        }
    }
    p.sq_free -= 1;
    Ok(())
}

impl Transport for IbvTransport {
    fn name(&self) -> &'static str {
        "ibverbs"
    }

    unsafe fn send(
        &mut self,
        peer: usize,
        env: &Envelope,
        data: SendBuf,
        token: Token,
    ) -> Result<Sent> {
        self.check_peer(peer, "send")?;
        let max_inline = self.max_inline;
        let Some(Some(p)) = self.peers.get_mut(peer) else {
            return Ok(Sent::Pending);
        };
        match proto::send_path(data.len, max_inline, p.eager_max) {
            SendPath::Inline | SendPath::Eager => p.queue.push_back(Out::Msg {
                msg: Msg::Eager {
                    env: *env,
                    len: data.len as u64,
                },
                payload: Some((data, token)),
            }),
            SendPath::Rendezvous => {
                let id = p.next_id;
                p.next_id = p.next_id.wrapping_add(1).max(1);
                p.awaiting_cts.insert(id, (data, token));
                p.queue.push_back(Out::Msg {
                    msg: Msg::Rts {
                        id,
                        env: *env,
                        len: data.len as u64,
                    },
                    payload: None,
                });
            }
        }
        self.flush(peer);
        Ok(Sent::Pending)
    }

    unsafe fn fetch(&mut self, peer: usize, handle: u64, dst: RecvBuf, token: Token) -> Result<()> {
        self.check_peer(peer, "recv")?;
        let id = handle as u32;
        let len = match self.peers.get(peer) {
            Some(Some(p)) => p.kept.get(&id).copied(),
            _ => None,
        }
        .ok_or_else(|| {
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
        if let Some(Some(p)) = self.peers.get_mut(peer) {
            p.kept.remove(&id);
        }
        self.start_recv(peer, id, len, dst, token);
        self.flush(peer);
        Ok(())
    }

    fn discard(&mut self, peer: usize, handle: u64) -> Result<()> {
        let id = handle as u32;
        let had = match self.peers.get_mut(peer) {
            Some(Some(p)) if !p.failed && !p.closed => p.kept.remove(&id).is_some(),
            _ => false,
        };
        if had {
            self.queue_msg(
                peer,
                Msg::Cts {
                    id,
                    mode: CtsMode::Discard,
                },
            );
            self.flush(peer);
        }
        Ok(())
    }

    fn progress(&mut self, ev: &mut dyn Events) -> Result<bool> {
        if self.armed {
            self.drain_events()?;
        }
        let mut did = self.poll_all(ev)?;
        if self.watch_ready {
            self.check_watches(ev)?;
            did = true;
        }
        for peer in 0..self.peers.len() {
            if let Some(p) = &self.peers[peer]
                && !p.failed
                && !p.closed
                && (!p.queue.is_empty() || p.credits.wants_credit_message())
            {
                self.flush(peer);
            }
        }
        if self.keepalive() {
            self.check_watches(ev)?;
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
                    op: "ibverbs".into(),
                    detail,
                },
            );
        }
        Ok(did)
    }

    fn wait(&mut self, timeout: Duration) -> Result<()> {
        if self.arm()? {
            return Ok(());
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // A timeout shorter than a millisecond still sleeps one (epoll's resolution).
        let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
        // SAFETY: epoll is our open descriptor; events has room for 2 entries.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 2, ms) };
        for e in &events[..n.max(0) as usize] {
            if e.u64 >= EPOLL_WATCH {
                self.watch_ready = true;
            }
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io("waiting for verbs completions (epoll_wait)", e));
            }
        }
        Ok(())
    }

    fn wait_fd(&mut self) -> Result<WaitFd> {
        Ok(if self.arm()? {
            WaitFd::Ready
        } else {
            WaitFd::Fd(self.epoll.as_raw_fd())
        })
    }

    fn waker(&self) -> Waker {
        let fd = Arc::clone(&self.wake_fd);
        Arc::new(move || {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes to our eventfd, kept open by the Arc.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        })
    }

    fn abort(&mut self) {
        for peer in 0..self.peers.len() {
            self.fail(peer, "this rank aborted".into());
        }
        self.sends_done.clear();
        self.failures.clear();
        self.closed.clear();
    }
}

impl Drop for IbvTransport {
    /// Says goodbye to every live peer (so it sees a normal end, not a crash), waits up to
    /// half a second for those sends to complete, then frees the verbs objects.
    fn drop(&mut self) {
        for w in self.watches.iter_mut().flatten() {
            use std::io::Write;
            let _ = w.stream.write(b"B");
        }
        let mut expect = 0;
        for peer in 0..self.peers.len() {
            let Some(Some(p)) = self.peers.get_mut(peer) else {
                continue;
            };
            let inline = HEADER_LEN <= self.max_inline;
            if p.failed
                || p.closed
                || !p.queue.is_empty()
                || p.sq_free == 0
                || !p.credits.can_send(Class::Data)
                || (!inline && p.send_free.is_empty())
            {
                continue;
            }
            let credits = p.credits.consume(Class::Data);
            let head = Header {
                msg: Msg::Bye,
                credits,
            }
            .encode();
            if post_message(p, peer, &self.send_pool, self.slot_size, &head, &[], inline).is_ok() {
                expect += 1;
            }
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        let mut wcs = Vec::new();
        while expect > 0 && Instant::now() < deadline {
            let busy = self
                .peers
                .iter()
                .flatten()
                .any(|p| !p.failed && p.sq_free < p.sq_total);
            if !busy {
                break;
            }
            wcs.clear();
            match self.cq.poll(&mut wcs, 32) {
                Ok(0) => std::thread::sleep(Duration::from_micros(200)),
                Ok(_) => {
                    for wc in &wcs {
                        let Some(id) = WrId::decode(wc.wr_id) else {
                            continue;
                        };
                        if id.kind == WrKind::Recv {
                            continue;
                        }
                        if let Some(Some(p)) = self.peers.get_mut(id.peer as usize) {
                            p.sq_free += 1;
                            if !wc.ok() {
                                p.failed = true;
                            }
                        }
                    }
                }
                Err(_) => break,
            }
        }
        // Queue pairs go before the memory and the CQ (field order does the rest).
        self.peers.clear();
        drop(self.reg.clear());
    }
}

impl AsRawFd for IbvTransport {
    /// The descriptor [`Transport::wait`] sleeps on (epoll over the completion channel and
    /// the waker).
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}
