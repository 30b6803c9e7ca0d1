//! Frame headers on the wire: encode and decode, with no I/O (so they can be fuzzed).
//!
//! Every transport that carries a byte stream (TCP, the shared-memory rings) frames messages
//! with a fixed 56-byte [`FrameHeader`], little-endian:
//!
//! ```text
//! offset size field
//!      0    2 magic 0xFC0C
//!      2    1 version (1)
//!      3    1 kind     (FrameKind)
//!      4    4 reserved (0)
//!      8    8 len      payload bytes following (Eager, Data) or announced (Rts)
//!     16    8 id       message id chosen by the sender (Rts, Cts, Data)
//!     24   32 envelope opaque to transports; the comm layer's routing (context, tag, ...)
//! ```
//!
//! Small messages go as one `Eager` frame (header then payload). Large ones use a
//! rendezvous: the sender announces with `Rts` (ready to send, no payload), the receiver
//! answers `Cts` (clear to send) once it has a buffer for it, and the payload follows in a
//! `Data` frame that the receiver reads straight into that buffer. A receiver therefore never
//! allocates more than the eager limit for a message it did not ask for.
//!
//! A sender that closes its communicator normally sends `Bye` last, so that its peers can
//! tell a finished rank from a crashed one.
//!
//! A new connection starts with a [`Hello`] that names the job and the sender's rank.

/// Bytes of the opaque routing envelope carried by every message.
pub const ENVELOPE_LEN: usize = 32;

/// Bytes of an encoded [`FrameHeader`].
pub const FRAME_HEADER_LEN: usize = 56;

/// Bytes of an encoded [`Hello`].
pub const HELLO_LEN: usize = 32;

const MAGIC: u16 = 0xFC0C;
const HELLO_MAGIC: u32 = 0xFC0C_4E11;
const VERSION: u8 = 1;

/// Routing information of a message, opaque to transports: the communicator layer decides
/// what the bytes mean and transports carry them unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Envelope(pub [u8; ENVELOPE_LEN]);

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Envelope(")?;
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Header and `len` payload bytes: a whole small message.
    Eager = 1,
    /// Announces a message of `len` bytes with id `id`; no payload follows.
    Rts = 2,
    /// The receiver has a buffer for message `id`: send it.
    Cts = 3,
    /// The `len` payload bytes of message `id`.
    Data = 4,
    /// The sender closed its communicator normally; nothing more will come.
    Bye = 5,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Eager,
            2 => FrameKind::Rts,
            3 => FrameKind::Cts,
            4 => FrameKind::Data,
            5 => FrameKind::Bye,
            _ => return None,
        })
    }

    /// Whether `len` payload bytes follow the header on the stream.
    pub fn has_payload(self) -> bool {
        matches!(self, FrameKind::Eager | FrameKind::Data)
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Payload length (see [`FrameKind`]).
    pub len: u64,
    /// Message id for the rendezvous frames, 0 otherwise.
    pub id: u64,
    /// The comm layer's routing information.
    pub env: Envelope,
}

/// Why a header could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than a header.
    #[error("truncated header: {got} of {need} bytes")]
    Truncated {
        /// Bytes available.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The magic number is wrong: not a ferrocomm peer, or the stream lost sync.
    #[error("bad magic {0:#06x} (not a ferrocomm peer, or a corrupted stream)")]
    BadMagic(u32),
    /// A version this build does not speak.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    /// An unknown frame kind.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// A length over the limit the receiver accepts.
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    TooLong {
        /// Announced length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// A reserved field is not zero.
    #[error("reserved header bytes are not zero")]
    Reserved,
}

impl FrameHeader {
    /// Encodes the header into its 56 bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = VERSION;
        b[3] = self.kind as u8;
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.id.to_le_bytes());
        b[24..56].copy_from_slice(&self.env.0);
        b
    }

    /// Decodes a header, refusing payloads longer than `max_payload` for the kinds that
    /// carry one (`Eager`, `Data`) and announcements over `max_message` (`Rts`).
    pub fn decode(b: &[u8], max_eager: u64, max_message: u64) -> Result<FrameHeader, DecodeError> {
        if b.len() < FRAME_HEADER_LEN {
            return Err(DecodeError::Truncated {
                got: b.len(),
                need: FRAME_HEADER_LEN,
            });
        }
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic as u32));
        }
        if b[2] != VERSION {
            return Err(DecodeError::BadVersion(b[2]));
        }
        let kind = FrameKind::from_u8(b[3]).ok_or(DecodeError::BadKind(b[3]))?;
        if b[4..8] != [0; 4] {
            return Err(DecodeError::Reserved);
        }
        let len = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        let id = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes"));
        let max = match kind {
            FrameKind::Eager => max_eager,
            FrameKind::Rts | FrameKind::Data => max_message,
            FrameKind::Cts | FrameKind::Bye => 0,
        };
        if len > max {
            return Err(DecodeError::TooLong { len, max });
        }
        let mut env = Envelope::default();
        env.0.copy_from_slice(&b[24..56]);
        Ok(FrameHeader { kind, len, id, env })
    }
}

/// What a [`Hello`] is: the caller's greeting or the acceptor's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum HelloKind {
    /// The caller introduces itself.
    Request = 0,
    /// The acceptor takes the connection: frames may flow both ways.
    Accept = 1,
    /// The acceptor refuses it (e.g. both ranks dialled each other at once and the other
    /// connection is kept).
    Refuse = 2,
}

/// The first bytes on every transport connection, each way: who is calling (or answering),
/// for which job.
///
/// ```text
/// offset size field
///      0    4 magic 0xFC0C4E11
///      4    1 version
///      5    1 kind    HelloKind
///      6    2 reserved (0)
///      8    8 job     hash of the job id
///     16    4 world   world size
///     20    4 rank    the caller's rank
///     24    8 nonce   reserved for authentication (0 without a job secret)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Greeting or answer.
    pub kind: HelloKind,
    /// Hash of the job identifier ([`job_hash`]).
    pub job: u64,
    /// World size of the caller's job.
    pub world: u32,
    /// The sender's rank.
    pub rank: u32,
    /// Authentication nonce (0 when the job has no secret).
    pub nonce: u64,
}

impl Hello {
    /// Encodes into [`HELLO_LEN`] bytes.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.kind as u8;
        b[8..16].copy_from_slice(&self.job.to_le_bytes());
        b[16..20].copy_from_slice(&self.world.to_le_bytes());
        b[20..24].copy_from_slice(&self.rank.to_le_bytes());
        b[24..32].copy_from_slice(&self.nonce.to_le_bytes());
        b
    }

    /// Decodes a hello.
    pub fn decode(b: &[u8]) -> Result<Hello, DecodeError> {
        if b.len() < HELLO_LEN {
            return Err(DecodeError::Truncated {
                got: b.len(),
                need: HELLO_LEN,
            });
        }
        let magic = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != HELLO_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(DecodeError::BadVersion(b[4]));
        }
        let kind = match b[5] {
            0 => HelloKind::Request,
            1 => HelloKind::Accept,
            2 => HelloKind::Refuse,
            k => return Err(DecodeError::BadKind(k)),
        };
        if b[6..8] != [0; 2] {
            return Err(DecodeError::Reserved);
        }
        Ok(Hello {
            kind,
            job: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            world: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
            rank: u32::from_le_bytes(b[20..24].try_into().expect("4 bytes")),
            nonce: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        })
    }
}

/// A stable 64-bit hash (FNV-1a) of a job identifier, carried in [`Hello`].
pub fn job_hash(job_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job_id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(kind: FrameKind, len: u64, id: u64, fill: u8) -> FrameHeader {
        FrameHeader {
            kind,
            len,
            id,
            env: Envelope([fill; ENVELOPE_LEN]),
        }
    }

    #[test]
    fn header_round_trips() {
        for kind in [
            FrameKind::Eager,
            FrameKind::Rts,
            FrameKind::Cts,
            FrameKind::Data,
        ] {
            let len = if kind == FrameKind::Cts { 0 } else { 77 };
            let h = header(kind, len, 9, 0xab);
            assert_eq!(FrameHeader::decode(&h.encode(), 1 << 20, 1 << 40), Ok(h));
        }
    }

    #[test]
    fn header_rejects_bad_input() {
        let good = header(FrameKind::Eager, 10, 0, 1).encode();
        assert!(matches!(
            FrameHeader::decode(&good[..20], 100, 100),
            Err(DecodeError::Truncated { got: 20, need: 56 })
        ));
        let mut b = good;
        b[0] = 0;
        assert!(matches!(
            FrameHeader::decode(&b, 100, 100),
            Err(DecodeError::BadMagic(_))
        ));
        let mut b = good;
        b[2] = 9;
        assert_eq!(
            FrameHeader::decode(&b, 100, 100),
            Err(DecodeError::BadVersion(9))
        );
        let mut b = good;
        b[3] = 0;
        assert_eq!(
            FrameHeader::decode(&b, 100, 100),
            Err(DecodeError::BadKind(0))
        );
        let mut b = good;
        b[5] = 1;
        assert_eq!(
            FrameHeader::decode(&b, 100, 100),
            Err(DecodeError::Reserved)
        );
        assert_eq!(
            FrameHeader::decode(&good, 9, 100),
            Err(DecodeError::TooLong { len: 10, max: 9 })
        );
        let cts = header(FrameKind::Cts, 1, 0, 0).encode();
        assert!(matches!(
            FrameHeader::decode(&cts, 100, 100),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn hello_round_trips_and_rejects_garbage() {
        let h = Hello {
            kind: HelloKind::Accept,
            job: job_hash("bert"),
            world: 8,
            rank: 3,
            nonce: 0,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        assert!(Hello::decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n......").is_err());
        assert!(Hello::decode(&h.encode()[..31]).is_err());
        assert_ne!(job_hash("bert"), job_hash("gpt"));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = FrameHeader::decode(&bytes, 1 << 16, 1 << 30);
            let _ = Hello::decode(&bytes);
        }

        #[test]
        fn any_valid_header_round_trips(kind in 1u8..=5, len in 0u64..1_000_000, id: u64, env: [u8; 32]) {
            let kind = FrameKind::from_u8(kind).unwrap();
            let len = if matches!(kind, FrameKind::Cts | FrameKind::Bye) { 0 } else { len };
            let h = FrameHeader { kind, len, id, env: Envelope(env) };
            prop_assert_eq!(FrameHeader::decode(&h.encode(), 1_000_000, 1_000_000), Ok(h));
        }
    }
}
