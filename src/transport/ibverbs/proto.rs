//! The verbs transport's protocol, without verbs: message headers, credits, fragmentation,
//! the registration cache, the connection information published through the store, and
//! the settings. Pure logic, compiled in every build (with or without the `ibverbs`
//! feature) so that it is unit-tested without a device.
//!
//! See the [module documentation](super) for how these pieces fit together.

use std::collections::HashMap;
use std::time::Duration;

use crate::config;
use crate::error::{Error, Result};
use crate::wire::{ENVELOPE_LEN, Envelope};

/// Bytes of the header at the start of every SEND (eager data, control messages).
pub const HEADER_LEN: usize = 64;

const MAGIC: u8 = 0xFB;

/// What a SEND carries. Every kind but [`Msg::Credit`] uses a *data* credit at the receiver
/// (one of its posted receive buffers); `Credit` uses a *control* credit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Msg {
    /// A whole small message; `len` payload bytes follow the header.
    Eager {
        /// The comm layer's envelope.
        env: Envelope,
        /// Payload bytes following the header.
        len: u64,
    },
    /// Ready to send: announces a large message of `len` bytes; no payload.
    Rts {
        /// The sender's id for the message.
        id: u32,
        /// The comm layer's envelope.
        env: Envelope,
        /// Message length.
        len: u64,
    },
    /// Clear to send message `id`, and how.
    Cts {
        /// The id from the `Rts`.
        id: u32,
        /// How the payload is to come.
        mode: CtsMode,
    },
    /// A piece of message `id` at `offset`, payload following the header (the copy path).
    Frag {
        /// The id from the `Rts`.
        id: u32,
        /// Where the payload goes in the message.
        offset: u64,
    },
    /// Only returns credits.
    Credit,
    /// The sender closed its transport normally; nothing more will come.
    Bye,
}

/// How the receiver wants a large message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtsMode {
    /// RDMA-write it into `addr` (registered with `rkey`); the last write carries the id as
    /// immediate data. The sender may still fall back to [`CtsMode::Copy`]'s fragments
    /// (e.g. when it cannot register its buffer): the receiver accepts both.
    Write {
        /// Remote virtual address of the receive buffer.
        addr: u64,
        /// Its remote key.
        rkey: u32,
    },
    /// Send it as `Frag` messages through the eager buffers.
    Copy,
    /// Nobody wants it: drop it and report the send done.
    Discard,
}

/// Credits returned by the receiver of a message to its sender, carried in every header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Returned {
    /// Data buffers reposted.
    pub data: u32,
    /// Control buffers reposted.
    pub ctl: u16,
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the message is.
    pub msg: Msg,
    /// Credits the sender returns with it.
    pub credits: Returned,
}

/// A header or message that breaks the protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Fewer bytes than a header.
    #[error("message of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    /// Wrong magic byte.
    #[error("bad magic byte {0:#04x} (not a ferrocomm verbs peer?)")]
    Magic(u8),
    /// Unknown kind or mode.
    #[error("unknown message kind {0} / mode {1}")]
    Kind(u8, u8),
    /// Payload length disagrees with the header.
    #[error("header announces {announced} payload bytes but {got} arrived")]
    Length {
        /// In the header.
        announced: u64,
        /// In the completion.
        got: usize,
    },
    /// The peer returned more credits than it was ever given.
    #[error("returned {returned} {class} credits; at most {max} were outstanding")]
    Credits {
        /// Data or control.
        class: &'static str,
        /// How many it returned (cumulated).
        returned: u64,
        /// How many it could have.
        max: u64,
    },
    /// A fragment outside its message.
    #[error("fragment {offset}+{len} lies outside the message of {total} bytes")]
    Fragment {
        /// Offset of the piece.
        offset: u64,
        /// Its length.
        len: usize,
        /// The message's length.
        total: u64,
    },
}

impl Header {
    /// Encodes into the fixed 64-byte layout (little-endian):
    ///
    /// ```text
    /// 0 magic 0xFB | 1 kind | 2 mode (Cts) | 3 reserved | 4..6 ctl credits | 6..8 reserved
    /// 8..12 data credits | 12..16 id | 16..24 a (len, offset or address) | 24..28 rkey
    /// 28..32 reserved | 32..64 envelope
    /// ```
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = MAGIC;
        let (kind, mode, id, a, rkey, env) = match self.msg {
            Msg::Eager { env, len } => (1u8, 0u8, 0u32, len, 0u32, env),
            Msg::Rts { id, env, len } => (2, 0, id, len, 0, env),
            Msg::Cts { id, mode } => match mode {
                CtsMode::Write { addr, rkey } => (3, 1, id, addr, rkey, Envelope::default()),
                CtsMode::Copy => (3, 2, id, 0, 0, Envelope::default()),
                CtsMode::Discard => (3, 3, id, 0, 0, Envelope::default()),
            },
            Msg::Frag { id, offset } => (4, 0, id, offset, 0, Envelope::default()),
            Msg::Credit => (5, 0, 0, 0, 0, Envelope::default()),
            Msg::Bye => (6, 0, 0, 0, 0, Envelope::default()),
        };
        b[1] = kind;
        b[2] = mode;
        b[4..6].copy_from_slice(&self.credits.ctl.to_le_bytes());
        b[8..12].copy_from_slice(&self.credits.data.to_le_bytes());
        b[12..16].copy_from_slice(&id.to_le_bytes());
        b[16..24].copy_from_slice(&a.to_le_bytes());
        b[24..28].copy_from_slice(&rkey.to_le_bytes());
        b[32..32 + ENVELOPE_LEN].copy_from_slice(&env.0);
        b
    }

    /// Decodes the header at the start of `bytes` (a whole received message) and checks
    /// the payload length of the kinds that carry one. Returns the header and the payload.
    pub fn decode(bytes: &[u8]) -> std::result::Result<(Header, &[u8]), ProtoError> {
        if bytes.len() < HEADER_LEN {
            return Err(ProtoError::Short(bytes.len()));
        }
        if bytes[0] != MAGIC {
            return Err(ProtoError::Magic(bytes[0]));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let mut a8 = [0u8; 8];
        a8.copy_from_slice(&bytes[16..24]);
        let a = u64::from_le_bytes(a8);
        let id = u32_at(12);
        let rkey = u32_at(24);
        let mut env = Envelope::default();
        env.0.copy_from_slice(&bytes[32..32 + ENVELOPE_LEN]);
        let (kind, mode) = (bytes[1], bytes[2]);
        let msg = match (kind, mode) {
            (1, 0) => Msg::Eager { env, len: a },
            (2, 0) => Msg::Rts { id, env, len: a },
            (3, 1) => Msg::Cts {
                id,
                mode: CtsMode::Write { addr: a, rkey },
            },
            (3, 2) => Msg::Cts {
                id,
                mode: CtsMode::Copy,
            },
            (3, 3) => Msg::Cts {
                id,
                mode: CtsMode::Discard,
            },
            (4, 0) => Msg::Frag { id, offset: a },
            (5, 0) => Msg::Credit,
            (6, 0) => Msg::Bye,
            _ => return Err(ProtoError::Kind(kind, mode)),
        };
        let credits = Returned {
            data: u32_at(8),
            ctl: u16::from_le_bytes([bytes[4], bytes[5]]),
        };
        let payload = &bytes[HEADER_LEN..];
        match msg {
            Msg::Eager { len, .. } if len != payload.len() as u64 => {
                return Err(ProtoError::Length {
                    announced: len,
                    got: payload.len(),
                });
            }
            Msg::Frag { .. } => {}
            Msg::Eager { .. } => {}
            _ if !payload.is_empty() => {
                return Err(ProtoError::Length {
                    announced: 0,
                    got: payload.len(),
                });
            }
            _ => {}
        }
        Ok((Header { msg, credits }, payload))
    }
}

/// Which pool of the receiver's buffers a message uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Messages that carry data or move a transfer on (everything but `Credit`, and RDMA
    /// writes with immediate data, which consume a posted receive too).
    Data,
    /// Explicit credit returns.
    Ctl,
}

impl Msg {
    /// The credit class the message uses.
    pub fn class(&self) -> Class {
        match self {
            Msg::Credit => Class::Ctl,
            _ => Class::Data,
        }
    }
}

/// Credit accounting for one peer, both directions.
///
/// The receiver posts `data_slots + ctl_slots` buffers for each peer. A sender uses one
/// credit per SEND (or RDMA write with immediate) and may never use more than the receiver
/// posted, so it can never hit a receiver without a buffer (no RNR retries, no drops).
/// The receiver reposts each buffer as soon as it has consumed it and owes the sender a
/// credit; owed credits ride on the next message going back (piggybacked). When nothing
/// goes back and `threshold` data credits are owed, it sends an explicit `Credit` message,
/// which uses one of the few control credits. Control credits in turn only come back
/// piggybacked; that cannot deadlock provided a receiver applies the credits a message
/// returns and reposts its buffer in one step, before it sends anything (the transport
/// does): a side out of control credits has sent credit messages that the peer has not
/// answered, the peer owes their control credits from the moment it could spend the data
/// credits they brought, so its next message of any kind returns them, while a peer that
/// sends nothing needs no credits back. The property test `credits_hold_under_any_schedule`
/// checks this on random schedules.
#[derive(Clone, Debug)]
pub struct Credits {
    data: u32,
    ctl: u32,
    max_data: u32,
    max_ctl: u32,
    owed_data: u32,
    owed_ctl: u32,
    threshold: u32,
}

impl Credits {
    /// Credits towards a peer that posted `data_slots` and `ctl_slots` buffers for us;
    /// explicit credit messages go back once `threshold` data credits are owed.
    pub fn new(data_slots: u32, ctl_slots: u32, threshold: u32) -> Credits {
        Credits {
            data: data_slots,
            ctl: ctl_slots,
            max_data: data_slots,
            max_ctl: ctl_slots,
            owed_data: 0,
            owed_ctl: 0,
            threshold: threshold.clamp(1, data_slots.max(1)),
        }
    }

    /// Whether a message of `class` may be sent now.
    pub fn can_send(&self, class: Class) -> bool {
        match class {
            Class::Data => self.data > 0,
            Class::Ctl => self.ctl > 0,
        }
    }

    /// Uses a credit of `class` (call only after [`Credits::can_send`]) and takes what this
    /// side owes the peer, to piggyback on the message.
    pub fn consume(&mut self, class: Class) -> Returned {
        match class {
            Class::Data => self.data = self.data.saturating_sub(1),
            Class::Ctl => self.ctl = self.ctl.saturating_sub(1),
        }
        let r = Returned {
            data: self.owed_data,
            ctl: self.owed_ctl as u16,
        };
        self.owed_data = 0;
        self.owed_ctl = 0;
        r
    }

    /// Uses a credit of `class` for a message that has no header to carry owed credits
    /// (an RDMA write with immediate data). Call only after [`Credits::can_send`].
    pub fn take(&mut self, class: Class) {
        match class {
            Class::Data => self.data = self.data.saturating_sub(1),
            Class::Ctl => self.ctl = self.ctl.saturating_sub(1),
        }
    }

    /// Credits the peer returned; refuses more than it could owe.
    pub fn returned(&mut self, r: Returned) -> std::result::Result<(), ProtoError> {
        let data = self.data as u64 + r.data as u64;
        if data > self.max_data as u64 {
            return Err(ProtoError::Credits {
                class: "data",
                returned: r.data as u64,
                max: (self.max_data - self.data) as u64,
            });
        }
        let ctl = self.ctl as u64 + r.ctl as u64;
        if ctl > self.max_ctl as u64 {
            return Err(ProtoError::Credits {
                class: "control",
                returned: r.ctl as u64,
                max: (self.max_ctl - self.ctl) as u64,
            });
        }
        self.data = data as u32;
        self.ctl = ctl as u32;
        Ok(())
    }

    /// This side reposted a receive buffer of `class`: one more credit owed to the peer.
    pub fn reposted(&mut self, class: Class) {
        match class {
            Class::Data => self.owed_data += 1,
            Class::Ctl => self.owed_ctl += 1,
        }
    }

    /// Whether an explicit `Credit` message should go now (nothing else carried them back).
    pub fn wants_credit_message(&self) -> bool {
        self.owed_data >= self.threshold && self.ctl > 0
    }

    /// Data credits available.
    pub fn data(&self) -> u32 {
        self.data
    }

    /// Data credits owed to the peer.
    pub fn owed_data(&self) -> u32 {
        self.owed_data
    }
}

/// Splits `len` bytes into pieces of at most `max` bytes: `(offset, length)` pairs. One
/// empty piece for `len == 0`.
pub fn fragments(len: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let max = max.max(1);
    let n = len.div_ceil(max).max(1);
    (0..n).map(move |i| {
        let off = i * max;
        (off, len.saturating_sub(off).min(max))
    })
}

/// Tracks the pieces of one message arriving by fragments.
#[derive(Clone, Debug)]
pub struct Reassembly {
    total: u64,
    got: u64,
}

impl Reassembly {
    /// A message of `total` bytes, nothing arrived yet.
    pub fn new(total: u64) -> Reassembly {
        Reassembly { total, got: 0 }
    }

    /// Checks that a piece of `len` bytes at `offset` lies inside the message and counts it;
    /// returns whether the message is now complete. (Pieces arrive once each, in order, on
    /// a reliable connection; a piece past the end is a protocol violation.)
    pub fn add(&mut self, offset: u64, len: usize) -> std::result::Result<bool, ProtoError> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.total) || self.got + len as u64 > self.total {
            return Err(ProtoError::Fragment {
                offset,
                len,
                total: self.total,
            });
        }
        self.got += len as u64;
        Ok(self.got == self.total)
    }

    /// Bytes still missing.
    pub fn missing(&self) -> u64 {
        self.total - self.got
    }
}

/// How a message of a given size is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendPath {
    /// Header and payload inside the work request (no buffer, no DMA read of ours).
    Inline,
    /// Copied into a registered send buffer, one SEND.
    Eager,
    /// Announced with `Rts`; the receiver chooses write or copy in its `Cts`.
    Rendezvous,
}

/// The path for a message of `len` bytes.
pub fn send_path(len: usize, max_inline: usize, eager_limit: usize) -> SendPath {
    if HEADER_LEN + len <= max_inline {
        SendPath::Inline
    } else if len <= eager_limit {
        SendPath::Eager
    } else {
        SendPath::Rendezvous
    }
}

/// Kinds of work requests, encoded in their 64-bit id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WrKind {
    /// A posted receive buffer; index = slot.
    Recv,
    /// A SEND from a send slot; index = slot.
    Send,
    /// An inline SEND (no slot).
    SendInline,
    /// An RDMA write of a large message; index = transfer id.
    Write,
    /// A keepalive write.
    Keepalive,
    /// A test operation of the verbs wrapper's users.
    Other,
}

/// A work request id: kind, peer and index packed into the `wr_id` the completion returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WrId {
    /// What the request was.
    pub kind: WrKind,
    /// The peer (world rank).
    pub peer: u32,
    /// Slot or transfer id.
    pub index: u32,
}

impl WrId {
    /// Packs into 64 bits: kind in the top 8, peer in the next 24, index in the low 32.
    pub fn encode(self) -> u64 {
        let k = match self.kind {
            WrKind::Recv => 1u64,
            WrKind::Send => 2,
            WrKind::SendInline => 3,
            WrKind::Write => 4,
            WrKind::Keepalive => 5,
            WrKind::Other => 6,
        };
        (k << 56) | ((self.peer as u64 & 0xff_ffff) << 32) | self.index as u64
    }

    /// Unpacks; `None` for an id this transport never made.
    pub fn decode(v: u64) -> Option<WrId> {
        let kind = match v >> 56 {
            1 => WrKind::Recv,
            2 => WrKind::Send,
            3 => WrKind::SendInline,
            4 => WrKind::Write,
            5 => WrKind::Keepalive,
            6 => WrKind::Other,
            _ => return None,
        };
        Some(WrId {
            kind,
            peer: ((v >> 32) & 0xff_ffff) as u32,
            index: v as u32,
        })
    }
}

/// A registration cache: memory registrations of user buffers, keyed by
/// `(address, length, access)`, shared by the transfers that use the same buffer at once
/// and, when `capacity` is non-zero, kept after their last use (least recently used first
/// out once the idle ones exceed `capacity` bytes).
///
/// # Why keeping idle registrations is opt-in
///
/// A registration pins the *physical* pages behind a virtual range at the time it is made.
/// If the program frees the buffer and the allocator later hands out a new one at the same
/// address (glibc does this all the time for large blocks: `munmap` then `mmap` of the same
/// size lands at the same place), a cached registration still names the old pages: an RDMA
/// write through it lands in memory the program no longer sees and the receive silently
/// "completes" with stale data. Open MPI and UCX avoid this by intercepting `munmap`/`free`
/// (memory hooks) and invalidating; NCCL avoids it by only ever RDMA-ing its own (or
/// explicitly registered) buffers. This cache cannot see frees, so by default
/// (`capacity == 0`) a registration lives only while transfers use it and is dropped
/// (deregistered) after the last one completes: always correct. With
/// `FERROCOMM_IB_REG_CACHE=<bytes>` idle registrations are kept, like Open MPI's
/// `mpi_leave_pinned`: for programs that keep their communication buffers alive (code that
/// drives the transport directly can call [`RegCache::invalidate`] through it before
/// freeing one).
pub struct RegCache<R> {
    entries: HashMap<RegKey, Entry<R>>,
    capacity: usize,
    idle_bytes: usize,
    clock: u64,
    /// Lookups that found a registration.
    pub hits: u64,
    /// Lookups that had to register.
    pub misses: u64,
}

/// The key of a registration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegKey {
    /// Start address.
    pub addr: usize,
    /// Length in bytes.
    pub len: usize,
    /// Access flags it was registered with.
    pub access: u32,
}

struct Entry<R> {
    reg: R,
    users: u32,
    last_use: u64,
    /// Invalidated while in use: dropped at the last release instead of kept.
    stale: bool,
}

impl<R> RegCache<R> {
    /// A cache keeping at most `capacity` bytes of idle registrations (0: keep none).
    pub fn new(capacity: usize) -> RegCache<R> {
        RegCache {
            entries: HashMap::new(),
            capacity,
            idle_bytes: 0,
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// The registration for `key`, made with `register` on a miss; counts one more user.
    /// Release it with [`RegCache::release`] when the transfer ends.
    pub fn acquire<E>(
        &mut self,
        key: RegKey,
        register: impl FnOnce() -> std::result::Result<R, E>,
    ) -> std::result::Result<&R, E> {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self.entries.get_mut(&key)
            && !e.stale
        {
            if e.users == 0 {
                self.idle_bytes -= key.len;
            }
            e.users += 1;
            e.last_use = clock;
            self.hits += 1;
            return Ok(&self.entries[&key].reg);
        }
        self.misses += 1;
        let reg = register()?;
        // A stale entry with the same key still in use keeps its own registration alive
        // through its users; the new one replaces it in the map only when it is gone.
        let e = self.entries.entry(key).or_insert(Entry {
            reg,
            users: 0,
            last_use: clock,
            stale: false,
        });
        e.users += 1;
        e.last_use = clock;
        Ok(&e.reg)
    }

    /// The registration for `key` if some transfer holds it.
    pub fn get(&self, key: &RegKey) -> Option<&R> {
        self.entries.get(key).map(|e| &e.reg)
    }

    /// One user of `key` is done. Returns the registrations to drop now (deregister): this
    /// one if nobody uses it and it is not kept, and any evicted to stay within capacity.
    pub fn release(&mut self, key: &RegKey) -> Vec<R> {
        let mut out = Vec::new();
        let Some(e) = self.entries.get_mut(key) else {
            return out;
        };
        e.users = e.users.saturating_sub(1);
        if e.users > 0 {
            return out;
        }
        if e.stale || self.capacity == 0 || key.len > self.capacity {
            if let Some(e) = self.entries.remove(key) {
                out.push(e.reg);
            }
            return out;
        }
        self.idle_bytes += key.len;
        while self.idle_bytes > self.capacity {
            let Some(victim) = self
                .entries
                .iter()
                .filter(|(_, e)| e.users == 0)
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(e) = self.entries.remove(&victim) {
                self.idle_bytes -= victim.len;
                out.push(e.reg);
            }
        }
        out
    }

    /// Forgets every registration overlapping `[addr, addr + len)`: idle ones are returned
    /// to drop now, those in use are dropped at their last release.
    pub fn invalidate(&mut self, addr: usize, len: usize) -> Vec<R> {
        let end = addr.saturating_add(len);
        let hit: Vec<RegKey> = self
            .entries
            .keys()
            .filter(|k| k.addr < end && addr < k.addr.saturating_add(k.len))
            .copied()
            .collect();
        let mut out = Vec::new();
        for k in hit {
            let idle = self.entries.get(&k).is_some_and(|e| e.users == 0);
            if idle {
                if let Some(e) = self.entries.remove(&k) {
                    self.idle_bytes -= k.len;
                    out.push(e.reg);
                }
            } else if let Some(e) = self.entries.get_mut(&k) {
                e.stale = true;
            }
        }
        out
    }

    /// Drops everything (at shutdown, or when every transfer was abandoned).
    pub fn clear(&mut self) -> Vec<R> {
        self.idle_bytes = 0;
        self.entries.drain().map(|(_, e)| e.reg).collect()
    }

    /// Registrations held (in use or idle).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no registration is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of idle registrations kept.
    pub fn idle_bytes(&self) -> usize {
        self.idle_bytes
    }
}

/// Link layers of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkLayer {
    /// InfiniBand (LIDs, subnet manager).
    Infiniband,
    /// RoCE (Ethernet; GIDs and a global route header always).
    Ethernet,
}

/// What a rank publishes about its port under the `"ibverbs"` key of its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    /// Device name (`mlx5_0`, `rxe0`).
    pub device: String,
    /// Port number (1-based).
    pub port: u8,
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The GID used.
    pub gid: [u8; 16],
    /// Its index in the port's GID table.
    pub gid_index: u8,
    /// Active path MTU (the verbs enum value: 1 = 256 B .. 5 = 4096 B).
    pub mtu: u8,
    /// Link layer.
    pub link: LinkLayer,
    /// The rank forced the verbs transport for every peer (`FERROCOMM_TRANSPORT=ibverbs`),
    /// same-host peers included.
    pub forced: bool,
}

impl PortInfo {
    /// The text form: `v1;dev=rxe0;port=1;lid=0;gid=<32 hex>;gidx=1;mtu=3;ll=eth;forced=1`.
    pub fn encode(&self) -> String {
        let gid: String = self.gid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "v1;dev={};port={};lid={};gid={gid};gidx={};mtu={};ll={};forced={}",
            self.device,
            self.port,
            self.lid,
            self.gid_index,
            self.mtu,
            match self.link {
                LinkLayer::Infiniband => "ib",
                LinkLayer::Ethernet => "eth",
            },
            u8::from(self.forced)
        )
    }

    /// Parses [`PortInfo::encode`]'s form; `None` if it is not that.
    pub fn decode(s: &str) -> Option<PortInfo> {
        let mut it = s.split(';');
        if it.next()? != "v1" {
            return None;
        }
        let mut kv: HashMap<&str, &str> = HashMap::new();
        for part in it {
            let (k, v) = part.split_once('=')?;
            kv.insert(k, v);
        }
        let gid_hex = kv.get("gid")?;
        if gid_hex.len() != 32 {
            return None;
        }
        let mut gid = [0u8; 16];
        for (i, b) in gid.iter_mut().enumerate() {
            *b = u8::from_str_radix(gid_hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(PortInfo {
            device: kv.get("dev")?.to_string(),
            port: kv.get("port")?.parse().ok()?,
            lid: kv.get("lid")?.parse().ok()?,
            gid,
            gid_index: kv.get("gidx")?.parse().ok()?,
            mtu: kv
                .get("mtu")?
                .parse()
                .ok()
                .filter(|m| (1..=5).contains(m))?,
            link: match *kv.get("ll")? {
                "ib" => LinkLayer::Infiniband,
                "eth" => LinkLayer::Ethernet,
                _ => return None,
            },
            forced: kv.get("forced")? == &"1",
        })
    }

    /// Whether two ports can reach each other: the same link layer and the same GID subnet
    /// prefix (InfiniBand subnets; for RoCE the prefix of the GIDs' type: link-local
    /// `fe80::`, or zero for IPv4-mapped GIDs). A heuristic: ports in different IB subnets
    /// joined by routers, or RoCE GIDs on unrouted VLANs, are not told apart; force TCP
    /// there with `FERROCOMM_TRANSPORT=tcp`.
    pub fn same_fabric(&self, other: &PortInfo) -> bool {
        self.link == other.link && self.gid[..8] == other.gid[..8]
    }
}

/// What a rank publishes, per peer, about the queue pair it made for that peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpInfo {
    /// The peer (world rank) this queue pair talks to.
    pub peer: u32,
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number.
    pub psn: u32,
    /// Data receive buffers posted for the peer.
    pub data_slots: u32,
    /// Control receive buffers posted for the peer.
    pub ctl_slots: u32,
    /// Bytes of each receive buffer (header included).
    pub slot_size: u32,
    /// Address of the 8-byte keepalive target.
    pub ka_addr: u64,
    /// Its remote key.
    pub ka_rkey: u32,
}

impl QpInfo {
    /// One line of text: `peer qpn psn data ctl slot ka_addr ka_rkey`.
    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {} {} {} {} {}",
            self.peer,
            self.qpn,
            self.psn,
            self.data_slots,
            self.ctl_slots,
            self.slot_size,
            self.ka_addr,
            self.ka_rkey
        )
    }

    /// Parses one line of [`QpInfo::encode`].
    pub fn decode(s: &str) -> Option<QpInfo> {
        let v: Vec<u64> = s
            .split_whitespace()
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let [peer, qpn, psn, data, ctl, slot, ka_addr, ka_rkey] = v[..] else {
            return None;
        };
        let u = |x: u64| u32::try_from(x).ok();
        Some(QpInfo {
            peer: u(peer)?,
            qpn: u(qpn)?,
            psn: u(psn)? & 0xff_ffff,
            data_slots: u(data).filter(|&d| d > 0)?,
            ctl_slots: u(ctl).filter(|&c| c > 0)?,
            slot_size: u(slot).filter(|&s| s as usize > HEADER_LEN)?,
            ka_addr,
            ka_rkey: u(ka_rkey)?,
        })
    }
}

/// Settings of the verbs transport.
#[derive(Clone, Debug)]
pub struct IbConfig {
    /// Device to use (`FERROCOMM_IB_DEVICE=name[:port]`); default: the first device with an
    /// active port.
    pub device: Option<String>,
    /// Port (1-based); default: the first active port of the device.
    pub port: Option<u8>,
    /// GID table index (`FERROCOMM_IB_GID_INDEX`); default 0 on InfiniBand, on RoCE the
    /// first index whose GID is IPv4-mapped (RoCE v2 over IPv4), else 0.
    pub gid_index: Option<u8>,
    /// Largest message sent eagerly, in bytes (`FERROCOMM_IB_EAGER_LIMIT`, default 8 KiB).
    /// Each receive buffer holds this plus the 64-byte header.
    pub eager_limit: usize,
    /// Data receive buffers per peer (`FERROCOMM_IB_RECV_SLOTS`, default 32): the eager
    /// window, and the pipeline depth of the copy path.
    pub data_slots: u32,
    /// Control receive buffers per peer (for explicit credit messages).
    pub ctl_slots: u32,
    /// Inline data requested for the queue pairs (`FERROCOMM_IB_INLINE`, default 128 bytes:
    /// header plus 64 payload bytes); the device may grant less.
    pub max_inline: u32,
    /// Messages at least this large go by RDMA write into the user's registered buffer;
    /// smaller rendezvous messages are copied through the eager buffers
    /// (`FERROCOMM_IB_ZCOPY_THRESHOLD`, default 256 KiB).
    pub zcopy_threshold: usize,
    /// Bytes of idle registrations kept (`FERROCOMM_IB_REG_CACHE`, default 0: deregister
    /// after use; see [`RegCache`] for why).
    pub reg_cache: usize,
    /// Largest single RDMA write (a message is written in pieces of this size).
    pub max_write: usize,
    /// How often a peer is probed with an 8-byte RDMA write while the transport is in use,
    /// so that a vanished peer fails operations instead of hanging them
    /// (`FERROCOMM_IB_KEEPALIVE`, seconds, default 1).
    pub keepalive: Duration,
    /// Largest message accepted from a peer (a bound against corrupted lengths).
    pub max_message: u64,
}

impl Default for IbConfig {
    fn default() -> Self {
        IbConfig {
            device: None,
            port: None,
            gid_index: None,
            eager_limit: 8 * 1024,
            data_slots: 32,
            ctl_slots: 2,
            max_inline: 128,
            zcopy_threshold: 256 * 1024,
            reg_cache: 0,
            max_write: 1 << 30,
            keepalive: Duration::from_secs(1),
            max_message: 1 << 42,
        }
    }
}

impl IbConfig {
    /// The defaults adjusted by the environment (see each field).
    pub fn from_env() -> Result<IbConfig> {
        Self::from_lookup(&config::process_env)
    }

    pub(crate) fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<IbConfig> {
        let mut c = IbConfig::default();
        if let Some((dev, port)) = config::parse_var(
            lookup,
            "FERROCOMM_IB_DEVICE",
            "a verbs device name, optionally with :PORT (e.g. mlx5_0 or rxe0:1)",
            |v| match v.split_once(':') {
                Some((d, p)) => p
                    .parse::<u8>()
                    .ok()
                    .filter(|&p| p > 0 && !d.is_empty())
                    .map(|p| (d.to_string(), Some(p))),
                None => Some((v.to_string(), None)),
            },
        )? {
            c.device = Some(dev);
            c.port = port;
        }
        c.gid_index = config::parse_var(
            lookup,
            "FERROCOMM_IB_GID_INDEX",
            "a GID table index 0..255",
            |v| v.parse::<u8>().ok(),
        )?;
        if let Some(n) = config::size(lookup, "FERROCOMM_IB_EAGER_LIMIT")? {
            if !(64..=1 << 20).contains(&n) {
                return Err(Error::config(
                    "FERROCOMM_IB_EAGER_LIMIT",
                    n.to_string(),
                    "expected 64 bytes .. 1 MiB",
                ));
            }
            c.eager_limit = n;
        }
        if let Some(n) = config::parse_var(
            lookup,
            "FERROCOMM_IB_RECV_SLOTS",
            "a buffer count 2..4096",
            |v| v.parse::<u32>().ok().filter(|n| (2..=4096).contains(n)),
        )? {
            c.data_slots = n;
        }
        if let Some(n) = config::size(lookup, "FERROCOMM_IB_INLINE")? {
            c.max_inline = n.min(1024) as u32;
        }
        if let Some(n) = config::size(lookup, "FERROCOMM_IB_ZCOPY_THRESHOLD")? {
            c.zcopy_threshold = n;
        }
        if let Some(n) = config::size(lookup, "FERROCOMM_IB_REG_CACHE")? {
            c.reg_cache = n;
        }
        if let Some(d) = config::seconds(lookup, "FERROCOMM_IB_KEEPALIVE")? {
            c.keepalive = d.max(Duration::from_millis(10));
        }
        Ok(c)
    }

    /// Bytes of each receive buffer: the header plus the eager limit.
    pub fn slot_size(&self) -> usize {
        HEADER_LEN + self.eager_limit
    }

    /// The data credits that trigger an explicit credit message: half the window.
    pub fn credit_threshold(&self) -> u32 {
        (self.data_slots / 2).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: u8) -> Envelope {
        Envelope([n; ENVELOPE_LEN])
    }

    #[test]
    fn headers_round_trip() {
        let msgs = [
            Msg::Eager {
                env: env(1),
                len: 0,
            },
            Msg::Rts {
                id: 7,
                env: env(2),
                len: 1 << 40,
            },
            Msg::Cts {
                id: 9,
                mode: CtsMode::Write {
                    addr: 0xdead_beef_0000,
                    rkey: 0x1234,
                },
            },
            Msg::Cts {
                id: 10,
                mode: CtsMode::Copy,
            },
            Msg::Cts {
                id: 11,
                mode: CtsMode::Discard,
            },
            Msg::Frag {
                id: 3,
                offset: 8192,
            },
            Msg::Credit,
            Msg::Bye,
        ];
        for msg in msgs {
            let h = Header {
                msg,
                credits: Returned { data: 17, ctl: 2 },
            };
            let mut bytes = h.encode().to_vec();
            if let Msg::Frag { .. } = msg {
                bytes.extend_from_slice(&[5; 100]);
            }
            let (back, payload) = Header::decode(&bytes).unwrap();
            assert_eq!(back, h);
            assert_eq!(
                payload.len(),
                if matches!(msg, Msg::Frag { .. }) {
                    100
                } else {
                    0
                }
            );
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(Header::decode(&[0; 10]), Err(ProtoError::Short(10)));
        let mut b = Header {
            msg: Msg::Credit,
            credits: Returned::default(),
        }
        .encode();
        b[0] = 0;
        assert_eq!(Header::decode(&b), Err(ProtoError::Magic(0)));
        b[0] = MAGIC;
        b[1] = 99;
        assert!(matches!(Header::decode(&b), Err(ProtoError::Kind(99, 0))));
        // An eager header announcing more than arrived.
        let mut e = Header {
            msg: Msg::Eager {
                env: env(0),
                len: 10,
            },
            credits: Returned::default(),
        }
        .encode()
        .to_vec();
        e.extend_from_slice(&[0; 4]);
        assert!(matches!(
            Header::decode(&e),
            Err(ProtoError::Length {
                announced: 10,
                got: 4
            })
        ));
        // A control message with a payload.
        let mut c = Header {
            msg: Msg::Bye,
            credits: Returned::default(),
        }
        .encode()
        .to_vec();
        c.push(1);
        assert!(Header::decode(&c).is_err());
    }

    /// Two sides exchanging messages through the credit scheme: the sender never has more
    /// messages outstanding than the receiver posted, and everything gets through.
    #[test]
    fn credits_never_overrun_and_always_come_back() {
        let slots = 8;
        let mut a = Credits::new(slots, 2, 4); // a's view of b's buffers
        let mut b = Credits::new(slots, 2, 4); // b's view of a's buffers
        // b's posted buffers for a, consumed but not reposted yet.
        let mut in_flight_to_b: Vec<Header> = Vec::new();
        let mut posted_at_b = slots;
        let mut delivered = 0;
        let mut credit_msgs = 0;
        for _round in 0..1000 {
            // a sends as much as it may.
            while a.can_send(Class::Data) {
                let credits = a.consume(Class::Data);
                in_flight_to_b.push(Header {
                    msg: Msg::Eager {
                        env: env(0),
                        len: 0,
                    },
                    credits,
                });
            }
            // b receives: each uses one posted buffer (never more than posted).
            for h in in_flight_to_b.drain(..) {
                assert!(posted_at_b > 0, "sender overran the receiver");
                posted_at_b -= 1;
                b.returned(h.credits).unwrap();
                delivered += 1;
                posted_at_b += 1;
                b.reposted(Class::Data);
            }
            // b has nothing to send: it returns credits explicitly.
            if b.wants_credit_message() {
                let credits = b.consume(Class::Ctl);
                credit_msgs += 1;
                a.returned(credits).unwrap();
                // a reposts the credit message's control buffer; owed to b, piggybacked
                // on a's next message.
                a.reposted(Class::Ctl);
            }
        }
        assert!(delivered > 1000 * 4, "{delivered}");
        assert!(credit_msgs > 0);
        // b's control credits keep coming back on a's data messages.
        assert!(b.can_send(Class::Ctl));
    }

    /// One side of the credit model below: its view of the peer's buffers, its own
    /// buffers, what it still has to send.
    struct Side {
        credits: Credits,
        posted: u32,
        to_send: u32,
        delivered: u32,
    }

    proptest::proptest! {
        /// Random interleavings of sending, delivery (with its repost) and credit messages
        /// in both directions: no SEND ever finds the receiver without a posted buffer, and
        /// once everybody keeps going every message gets through with all credits back.
        /// (With delivery and repost split apart, a side could spend the credits a
        /// `Credit` message brought before owing its control credit back, and both sides
        /// could stall; the transport never splits them.)
        #[test]
        fn credits_hold_under_any_schedule(
            slots in 1u32..8,
            ctl in 1u32..3,
            msgs in (0u32..200, 0u32..200),
            steps in proptest::collection::vec(0u8..8, 0..2000),
        ) {
            let threshold = (slots / 2).max(1);
            let mut sides = [msgs.0, msgs.1].map(|n| Side {
                credits: Credits::new(slots, ctl, threshold),
                posted: slots + ctl,
                to_send: n,
                delivered: 0,
            });
            // wires[x]: messages from x to 1 - x, in order.
            let mut wires: [std::collections::VecDeque<Header>; 2] = Default::default();
            let step = |sides: &mut [Side; 2], wires: &mut [std::collections::VecDeque<Header>; 2], action: u8| {
                let x = (action & 1) as usize;
                let y = 1 - x;
                match action >> 1 {
                    0 => {
                        if sides[x].to_send > 0 && sides[x].credits.can_send(Class::Data) {
                            let credits = sides[x].credits.consume(Class::Data);
                            sides[x].to_send -= 1;
                            wires[x].push_back(Header { msg: Msg::Credit, credits }.with_data());
                        }
                    }
                    1 => {
                        if let Some(h) = wires[x].pop_front() {
                            proptest::prop_assert!(sides[y].posted > 0, "overran the receiver");
                            sides[y].posted -= 1;
                            sides[y].credits.returned(h.credits).map_err(|e| {
                                proptest::test_runner::TestCaseError::fail(e.to_string())
                            })?;
                            let class = h.msg.class();
                            if class == Class::Data {
                                sides[y].delivered += 1;
                            }
                            // The transport applies returned credits and reposts the
                            // buffer in one step, before it sends anything (on_recv).
                            sides[y].posted += 1;
                            sides[y].credits.reposted(class);
                        }
                    }
                    2 => {}
                    _ => {
                        if sides[x].credits.wants_credit_message() {
                            let credits = sides[x].credits.consume(Class::Ctl);
                            wires[x].push_back(Header { msg: Msg::Credit, credits });
                        }
                    }
                }
                Ok(())
            };
            for &a in &steps {
                step(&mut sides, &mut wires, a)?;
            }
            // Everybody keeps going: everything arrives.
            for _ in 0..20_000 {
                for a in 0..8 {
                    step(&mut sides, &mut wires, a)?;
                }
                if sides.iter().all(|s| s.to_send == 0) && wires.iter().all(|w| w.is_empty())
                {
                    break;
                }
            }
            proptest::prop_assert_eq!((sides[1].delivered, sides[0].delivered), msgs);
            proptest::prop_assert!(sides.iter().all(|s| s.posted == slots + ctl));
        }

        /// Any fragment size reassembles any length exactly once.
        #[test]
        fn fragments_reassemble(len in 0usize..100_000, max in 1usize..20_000) {
            let mut r = Reassembly::new(len as u64);
            let mut done = len == 0;
            for (off, n) in fragments(len, max) {
                proptest::prop_assert!(n <= max);
                if n > 0 || len == 0 {
                    done = r.add(off as u64, n).unwrap();
                }
            }
            proptest::prop_assert!(done);
            proptest::prop_assert_eq!(r.missing(), 0);
        }
    }

    impl Header {
        /// The same credits on a data-class message (for the model above).
        fn with_data(self) -> Header {
            Header {
                msg: Msg::Eager {
                    env: Envelope::default(),
                    len: 0,
                },
                credits: self.credits,
            }
        }
    }

    #[test]
    fn credits_refuse_a_peer_returning_too_many() {
        let mut c = Credits::new(4, 1, 2);
        assert!(c.returned(Returned { data: 1, ctl: 0 }).is_err());
        let _ = c.consume(Class::Data);
        c.returned(Returned { data: 1, ctl: 0 }).unwrap();
        assert!(c.returned(Returned { data: 0, ctl: 1 }).is_err());
    }

    #[test]
    fn piggyback_takes_what_is_owed() {
        let mut c = Credits::new(4, 1, 2);
        c.reposted(Class::Data);
        assert!(!c.wants_credit_message());
        c.reposted(Class::Data);
        c.reposted(Class::Ctl);
        assert!(c.wants_credit_message());
        let r = c.consume(Class::Data);
        assert_eq!(r, Returned { data: 2, ctl: 1 });
        assert_eq!(c.owed_data(), 0);
        assert_eq!(c.data(), 3);
        assert!(!c.wants_credit_message());
    }

    #[test]
    fn fragments_cover_the_message() {
        assert_eq!(fragments(0, 10).collect::<Vec<_>>(), vec![(0, 0)]);
        assert_eq!(fragments(10, 10).collect::<Vec<_>>(), vec![(0, 10)]);
        assert_eq!(
            fragments(25, 10).collect::<Vec<_>>(),
            vec![(0, 10), (10, 10), (20, 5)]
        );
        for len in [1usize, 8191, 8192, 8193, 1 << 20, (8 << 20) + 3] {
            let mut r = Reassembly::new(len as u64);
            let mut done = false;
            let mut next = 0;
            for (off, n) in fragments(len, 8192) {
                assert_eq!(off, next);
                next += n;
                assert!(!done);
                done = r.add(off as u64, n).unwrap();
            }
            assert!(done && r.missing() == 0 && next == len);
        }
    }

    #[test]
    fn reassembly_refuses_pieces_outside_the_message() {
        let mut r = Reassembly::new(100);
        assert!(r.add(90, 20).is_err());
        assert!(r.add(u64::MAX, 2).is_err());
        assert_eq!(r.add(0, 60), Ok(false));
        assert!(r.add(0, 60).is_err(), "more bytes than the message");
        assert_eq!(r.add(60, 40), Ok(true));
    }

    #[test]
    fn paths_by_size() {
        assert_eq!(send_path(0, 128, 8192), SendPath::Inline);
        assert_eq!(send_path(64, 128, 8192), SendPath::Inline);
        assert_eq!(send_path(65, 128, 8192), SendPath::Eager);
        assert_eq!(send_path(8192, 128, 8192), SendPath::Eager);
        assert_eq!(send_path(8193, 128, 8192), SendPath::Rendezvous);
        assert_eq!(send_path(0, 0, 8192), SendPath::Eager);
    }

    #[test]
    fn wr_ids_round_trip() {
        for kind in [
            WrKind::Recv,
            WrKind::Send,
            WrKind::SendInline,
            WrKind::Write,
            WrKind::Keepalive,
            WrKind::Other,
        ] {
            let id = WrId {
                kind,
                peer: 0xab_cdef,
                index: u32::MAX,
            };
            assert_eq!(WrId::decode(id.encode()), Some(id));
        }
        assert_eq!(WrId::decode(0), None);
    }

    /// A registration that counts its deregistrations.
    struct FakeReg(std::rc::Rc<std::cell::Cell<u32>>);
    impl Drop for FakeReg {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    fn key(addr: usize, len: usize) -> RegKey {
        RegKey {
            addr,
            len,
            access: 1,
        }
    }

    #[test]
    fn reg_cache_without_capacity_deregisters_after_last_use() {
        let dereg = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut c: RegCache<FakeReg> = RegCache::new(0);
        let k = key(0x1000, 4096);
        c.acquire::<()>(k, || Ok(FakeReg(dereg.clone()))).unwrap();
        // A second concurrent use shares it.
        c.acquire::<()>(k, || panic!("must hit")).unwrap();
        assert_eq!((c.hits, c.misses), (1, 1));
        drop(c.release(&k));
        assert_eq!(dereg.get(), 0);
        drop(c.release(&k));
        assert_eq!(dereg.get(), 1);
        assert!(c.is_empty());
        // A failed registration leaves nothing behind.
        assert_eq!(c.acquire(k, || Err("no memlock")).err(), Some("no memlock"));
        assert!(c.is_empty());
    }

    #[test]
    fn reg_cache_keeps_idle_registrations_within_capacity_lru() {
        let dereg = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut c: RegCache<FakeReg> = RegCache::new(10_000);
        let (a, b, d) = (key(0, 4000), key(10_000, 4000), key(20_000, 4000));
        for k in [a, b] {
            c.acquire::<()>(k, || Ok(FakeReg(dereg.clone()))).unwrap();
            drop(c.release(&k));
        }
        assert_eq!((dereg.get(), c.idle_bytes()), (0, 8000));
        // Reuse of `a` hits and makes `b` the least recently used.
        c.acquire::<()>(a, || panic!("must hit")).unwrap();
        drop(c.release(&a));
        c.acquire::<()>(d, || Ok(FakeReg(dereg.clone()))).unwrap();
        drop(c.release(&d));
        assert_eq!(dereg.get(), 1, "one evicted");
        assert!(c.get(&b).is_none() && c.get(&a).is_some() && c.get(&d).is_some());
        // Different length at the same address is a different registration.
        c.acquire::<()>(key(0, 8000), || Ok(FakeReg(dereg.clone())))
            .unwrap();
        assert_eq!(c.misses, 4);
        drop(c.release(&key(0, 8000)));
        assert!(c.idle_bytes() <= 10_000);
        // A registration larger than the cache is never kept.
        c.acquire::<()>(key(1 << 30, 20_000), || Ok(FakeReg(dereg.clone())))
            .unwrap();
        let before = dereg.get();
        drop(c.release(&key(1 << 30, 20_000)));
        assert_eq!(dereg.get(), before + 1);
    }

    #[test]
    fn reg_cache_invalidation() {
        let dereg = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut c: RegCache<FakeReg> = RegCache::new(1 << 20);
        let (idle, busy, other) = (key(0, 4096), key(4096, 4096), key(1 << 16, 4096));
        for k in [idle, busy, other] {
            c.acquire::<()>(k, || Ok(FakeReg(dereg.clone()))).unwrap();
        }
        drop(c.release(&idle));
        drop(c.release(&other));
        // Free of [100, 5000): overlaps `idle` and `busy`, not `other`.
        drop(c.invalidate(100, 4900));
        assert_eq!(dereg.get(), 1, "the idle overlapping one goes at once");
        assert!(c.get(&busy).is_some(), "the busy one stays until released");
        // A new lookup of the stale key registers afresh... once its old user is done.
        drop(c.release(&busy));
        assert_eq!(dereg.get(), 2);
        c.acquire::<()>(busy, || Ok(FakeReg(dereg.clone())))
            .unwrap();
        assert_eq!(c.misses, 4);
        drop(c.release(&busy));
        assert!(c.get(&other).is_some());
        drop(c.clear());
        assert_eq!(dereg.get(), 4);
    }

    #[test]
    fn port_and_qp_info_round_trip() {
        let p = PortInfo {
            device: "rxe0".into(),
            port: 1,
            lid: 0,
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
            gid_index: 1,
            mtu: 3,
            link: LinkLayer::Ethernet,
            forced: true,
        };
        assert_eq!(PortInfo::decode(&p.encode()), Some(p.clone()));
        assert_eq!(PortInfo::decode("v2;dev=x"), None);
        assert_eq!(PortInfo::decode("v1;dev=x;port=1"), None);
        let mut q = p.clone();
        q.gid[15] = 9;
        assert!(p.same_fabric(&q));
        q.gid[0] = 0;
        assert!(!p.same_fabric(&q));
        q = p.clone();
        q.link = LinkLayer::Infiniband;
        assert!(!p.same_fabric(&q));

        let qi = QpInfo {
            peer: 2,
            qpn: 17,
            psn: 0x12_3456,
            data_slots: 32,
            ctl_slots: 2,
            slot_size: 8256,
            ka_addr: 0x7fff_0000_1000,
            ka_rkey: 99,
        };
        assert_eq!(QpInfo::decode(&qi.encode()), Some(qi));
        assert_eq!(QpInfo::decode("1 2 3"), None);
        assert_eq!(QpInfo::decode("1 2 3 0 2 8256 0 0"), None, "no data slots");
    }

    #[test]
    fn config_from_env() {
        let env = |k: &str| {
            match k {
                "FERROCOMM_IB_DEVICE" => Some("rxe0:1"),
                "FERROCOMM_IB_GID_INDEX" => Some("1"),
                "FERROCOMM_IB_EAGER_LIMIT" => Some("4k"),
                "FERROCOMM_IB_REG_CACHE" => Some("64m"),
                _ => None,
            }
            .map(String::from)
        };
        let c = IbConfig::from_lookup(&env).unwrap();
        assert_eq!(c.device.as_deref(), Some("rxe0"));
        assert_eq!((c.port, c.gid_index), (Some(1), Some(1)));
        assert_eq!((c.eager_limit, c.slot_size()), (4096, 4096 + HEADER_LEN));
        assert_eq!(c.reg_cache, 64 << 20);
        let bad = |k: &str| (k == "FERROCOMM_IB_DEVICE").then(|| "rxe0:x".to_string());
        let err = IbConfig::from_lookup(&bad).unwrap_err().to_string();
        assert!(err.contains("FERROCOMM_IB_DEVICE"), "{err}");
        let tiny = |k: &str| (k == "FERROCOMM_IB_EAGER_LIMIT").then(|| "1".to_string());
        assert!(IbConfig::from_lookup(&tiny).is_err());
    }
}
