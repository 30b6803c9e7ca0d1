//! The TcpStore wire protocol: pure encode and decode, no I/O (so it can be fuzzed).
//!
//! A client sends one request frame and reads one response frame; requests on one connection
//! are strictly sequential. All integers are little-endian.
//!
//! Request: a fixed 24-byte [`RequestHeader`] followed by `key_len + aux_len + value_len`
//! body bytes (key section, then aux section, then value section):
//!
//! ```text
//! offset size field
//!      0    4 magic 0xFC0C_5351 ("store query")
//!      4    1 version (1)
//!      5    1 opcode   (Op)
//!      6    1 flags    bit 0: CompareSet has an expected value; other bits 0
//!      7    1 reserved (0)
//!      8    4 key_len    bytes of the key section
//!     12    4 aux_len    bytes of the aux section (CompareSet's expected value; else 0)
//!     16    4 value_len  bytes of the value section
//!     20    4 timeout_ms how long the server may wait (Get, Wait; else 0)
//! ```
//!
//! The key section is one UTF-8 key (at most [`MAX_KEY_LEN`] bytes) for every operation
//! except `Wait` and `Check`, whose key section is a list of `(u32 length, UTF-8 bytes)`
//! entries, each key at most [`MAX_KEY_LEN`] and the section at most [`MAX_KEY_LIST_LEN`].
//! Values are at most [`MAX_VALUE_LEN`] bytes. `Add` carries its delta as an 8-byte `i64`
//! value. Every length is checked against these limits from the header alone, so a receiver
//! knows the whole frame is bounded before it allocates anything.
//!
//! Response: a fixed 12-byte [`ResponseHeader`] followed by `body_len` bytes:
//!
//! ```text
//! offset size field
//!      0    4 magic 0xFC0C_5352 ("store reply")
//!      4    1 version (1)
//!      5    1 status   (Status)
//!      6    2 reserved (0)
//!      8    4 body_len
//! ```
//!
//! | status | body |
//! |---|---|
//! | `Ok` | the result: a value (`Get`, `TryGet`, `CompareSet`), an `i64` (`Add`), one byte 0/1 per key (`Check`), one byte 0/1 (`Delete`), empty (`Set`, `Wait`) |
//! | `NotFound` | empty (`TryGet` of an absent key) |
//! | `Timeout` | the keys still missing, as a key list |
//! | `BadRequest` | a UTF-8 message (e.g. `Add` on a value that is not a counter) |
//! | `ShuttingDown` | empty: the server is stopping |
//! | `Refused` | a UTF-8 message; sent unasked when a connection is over the server's client limit |
//! | `Closing` | a UTF-8 message (invalid UTF-8 is refused): the server is stopping, and why (e.g. its host gave up) |
//!
//! `Will` (opcode 9) arms a "last will" on its connection: when that connection closes
//! (its process exited or died) the server sets the key to the value, unless the key is set
//! already or the will was disarmed. A `Will` with an empty key disarms it. The reply is an
//! empty `Ok`. The rendezvous uses it so that a rank that dies during `init` is noticed by
//! the others within seconds, whatever host it ran on.

use std::time::Duration;

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 4 * 1024;
/// Longest value, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024 * 1024;
/// Longest key list (`Wait`, `Check`, a `Timeout` response), in bytes.
pub const MAX_KEY_LIST_LEN: usize = 16 * 1024 * 1024;
/// Longest `BadRequest` message, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Longest server-side wait a request can ask for (`u32` milliseconds, about 49 days).
pub const MAX_TIMEOUT: Duration = Duration::from_millis(u32::MAX as u64);

/// Bytes of an encoded [`RequestHeader`].
pub const REQUEST_HEADER_LEN: usize = 24;
/// Bytes of an encoded [`ResponseHeader`].
pub const RESPONSE_HEADER_LEN: usize = 12;

const REQUEST_MAGIC: u32 = 0xFC0C_5351;
const RESPONSE_MAGIC: u32 = 0xFC0C_5352;
const VERSION: u8 = 1;
const FLAG_EXPECTED: u8 = 1;

/// Why a frame could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Fewer bytes than the frame needs.
    #[error("truncated frame: {got} of {need} bytes")]
    Truncated {
        /// Bytes available.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The magic number is wrong: not a ferrocomm store peer, or the stream lost sync.
    #[error("bad magic {0:#010x} (not a ferrocomm store peer, or a corrupted stream)")]
    BadMagic(u32),
    /// A protocol version this build does not speak.
    #[error("unsupported store protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    /// An unknown request opcode.
    #[error("unknown store opcode {0}")]
    BadOpcode(u8),
    /// An unknown response status.
    #[error("unknown store response status {0}")]
    BadStatus(u8),
    /// Reserved bits or bytes are not zero.
    #[error("reserved header bits are not zero")]
    Reserved,
    /// A length over its limit.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// Which length (`key`, `value`, `key list`...).
        what: &'static str,
        /// The length given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A key is not valid UTF-8.
    #[error("key is not valid UTF-8")]
    BadUtf8,
    /// The frame's fields are inconsistent with its opcode or status.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

/// A store operation (the `opcode` byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// [`Request::Set`].
    Set = 1,
    /// [`Request::Get`].
    Get = 2,
    /// [`Request::TryGet`].
    TryGet = 3,
    /// [`Request::Add`].
    Add = 4,
    /// [`Request::CompareSet`].
    CompareSet = 5,
    /// [`Request::Wait`].
    Wait = 6,
    /// [`Request::Check`].
    Check = 7,
    /// [`Request::Delete`].
    Delete = 8,
    /// [`Request::Will`].
    Will = 9,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Set,
            2 => Op::Get,
            3 => Op::TryGet,
            4 => Op::Add,
            5 => Op::CompareSet,
            6 => Op::Wait,
            7 => Op::Check,
            8 => Op::Delete,
            9 => Op::Will,
            _ => return None,
        })
    }

    /// Whether the key section is a key list rather than one key.
    fn has_key_list(self) -> bool {
        matches!(self, Op::Wait | Op::Check)
    }
}

/// A request from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Set `key` to `value`.
    Set {
        /// The key.
        key: String,
        /// The new value.
        value: Vec<u8>,
    },
    /// Get `key`, waiting up to `timeout` for it.
    Get {
        /// The key.
        key: String,
        /// How long the server may wait (at most [`MAX_TIMEOUT`]; millisecond resolution).
        timeout: Duration,
    },
    /// Get `key` if it is set, without waiting.
    TryGet {
        /// The key.
        key: String,
    },
    /// Add `delta` to the counter `key`.
    Add {
        /// The key.
        key: String,
        /// The increment.
        delta: i64,
    },
    /// Set `key` to `desired` if its value is `expected` (`None`: absent).
    CompareSet {
        /// The key.
        key: String,
        /// The value required now, `None` for "absent".
        expected: Option<Vec<u8>>,
        /// The value to set.
        desired: Vec<u8>,
    },
    /// Wait up to `timeout` until all `keys` are set.
    Wait {
        /// The keys.
        keys: Vec<String>,
        /// How long the server may wait (at most [`MAX_TIMEOUT`]; millisecond resolution).
        timeout: Duration,
    },
    /// Which of `keys` are set.
    Check {
        /// The keys.
        keys: Vec<String>,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: String,
    },
    /// Arms this connection's last will: when the connection closes, set `key` to `value`
    /// unless `key` is already set. An empty `key` disarms it.
    Will {
        /// The key to set, empty to disarm.
        key: String,
        /// The value to set it to.
        value: Vec<u8>,
    },
}

impl Request {
    /// The request's opcode.
    pub fn op(&self) -> Op {
        match self {
            Request::Set { .. } => Op::Set,
            Request::Get { .. } => Op::Get,
            Request::TryGet { .. } => Op::TryGet,
            Request::Add { .. } => Op::Add,
            Request::CompareSet { .. } => Op::CompareSet,
            Request::Wait { .. } => Op::Wait,
            Request::Check { .. } => Op::Check,
            Request::Delete { .. } => Op::Delete,
            Request::Will { .. } => Op::Will,
        }
    }
}

/// A server's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Success, with the operation's result (see the module docs).
    Ok(Vec<u8>),
    /// `TryGet` of an absent key.
    NotFound,
    /// The server-side wait ran out; these keys were still missing.
    Timeout(Vec<String>),
    /// The request was well-formed but cannot be done (e.g. `Add` on a non-counter).
    BadRequest(String),
    /// The server is stopping.
    ShuttingDown,
    /// The server does not serve this connection (too many clients); it closes it.
    Refused(String),
    /// The server is stopping, for the reason given (e.g. the rank hosting it gave up).
    Closing(String),
}

/// A decoded, validated request header: every length is within its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// The operation.
    pub op: Op,
    /// The flags byte.
    pub flags: u8,
    /// Bytes of the key section.
    pub key_len: u32,
    /// Bytes of the aux section.
    pub aux_len: u32,
    /// Bytes of the value section.
    pub value_len: u32,
    /// Server-side wait in milliseconds.
    pub timeout_ms: u32,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), ProtoError> {
    if len > max {
        Err(ProtoError::TooLong { what, len, max })
    } else {
        Ok(())
    }
}

fn len_u32(what: &'static str, len: usize, max: usize) -> Result<u32, ProtoError> {
    check_len(what, len, max)?;
    u32::try_from(len).map_err(|_| ProtoError::TooLong { what, len, max })
}

impl RequestHeader {
    /// Decodes and validates a request header from the first [`REQUEST_HEADER_LEN`] bytes
    /// of `b`. After this succeeds, [`body_len`](Self::body_len) is bounded by the limits.
    pub fn decode(b: &[u8]) -> Result<RequestHeader, ProtoError> {
        if b.len() < REQUEST_HEADER_LEN {
            return Err(ProtoError::Truncated {
                got: b.len(),
                need: REQUEST_HEADER_LEN,
            });
        }
        let magic = u32_at(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(ProtoError::BadVersion(b[4]));
        }
        let op = Op::from_u8(b[5]).ok_or(ProtoError::BadOpcode(b[5]))?;
        let flags = b[6];
        if b[7] != 0 || flags & !FLAG_EXPECTED != 0 {
            return Err(ProtoError::Reserved);
        }
        let h = RequestHeader {
            op,
            flags,
            key_len: u32_at(b, 8),
            aux_len: u32_at(b, 12),
            value_len: u32_at(b, 16),
            timeout_ms: u32_at(b, 20),
        };
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), ProtoError> {
        let (key, aux, value) = (
            self.key_len as usize,
            self.aux_len as usize,
            self.value_len as usize,
        );
        if self.op.has_key_list() {
            check_len("key list", key, MAX_KEY_LIST_LEN)?;
        } else {
            check_len("key", key, MAX_KEY_LEN)?;
        }
        if self.flags != 0 && self.op != Op::CompareSet {
            return Err(ProtoError::Malformed(
                "expected-value flag on an operation other than compare_set",
            ));
        }
        if self.op == Op::CompareSet {
            if self.flags & FLAG_EXPECTED == 0 && aux != 0 {
                return Err(ProtoError::Malformed(
                    "compare_set without expected value has an aux section",
                ));
            }
            check_len("expected value", aux, MAX_VALUE_LEN)?;
        } else if aux != 0 {
            return Err(ProtoError::Malformed(
                "aux section on an operation other than compare_set",
            ));
        }
        match self.op {
            Op::Set | Op::CompareSet | Op::Will => check_len("value", value, MAX_VALUE_LEN)?,
            Op::Add if value != 8 => {
                return Err(ProtoError::Malformed("add needs an 8-byte delta"));
            }
            Op::Add => {}
            _ if value != 0 => {
                return Err(ProtoError::Malformed(
                    "value section on an operation without a value",
                ));
            }
            _ => {}
        }
        if self.timeout_ms != 0 && !matches!(self.op, Op::Get | Op::Wait) {
            return Err(ProtoError::Malformed(
                "timeout on an operation that does not wait",
            ));
        }
        Ok(())
    }

    /// Bytes of body that follow the header (bounded by the limits once decoded).
    pub fn body_len(&self) -> usize {
        self.key_len as usize + self.aux_len as usize + self.value_len as usize
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.op as u8;
        b[6] = self.flags;
        b[8..12].copy_from_slice(&self.key_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.aux_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.value_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.timeout_ms.to_le_bytes());
        b
    }
}

fn timeout_ms(t: Duration) -> u32 {
    u32::try_from(t.as_millis()).unwrap_or(u32::MAX)
}

fn encode_key_list(keys: &[String]) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::new();
    for k in keys {
        let len = len_u32("key", k.len(), MAX_KEY_LEN)?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        check_len("key list", out.len(), MAX_KEY_LIST_LEN)?;
    }
    Ok(out)
}

fn decode_key(b: &[u8]) -> Result<String, ProtoError> {
    check_len("key", b.len(), MAX_KEY_LEN)?;
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| ProtoError::BadUtf8)
}

fn decode_key_list(mut b: &[u8]) -> Result<Vec<String>, ProtoError> {
    check_len("key list", b.len(), MAX_KEY_LIST_LEN)?;
    let mut keys = Vec::new();
    while !b.is_empty() {
        if b.len() < 4 {
            return Err(ProtoError::Malformed("key list ends inside a key length"));
        }
        let len = u32_at(b, 0) as usize;
        check_len("key", len, MAX_KEY_LEN)?;
        let rest = &b[4..];
        if rest.len() < len {
            return Err(ProtoError::Malformed("key list ends inside a key"));
        }
        keys.push(decode_key(&rest[..len])?);
        b = &rest[len..];
    }
    Ok(keys)
}

/// Encodes a request into one frame. Fails (without I/O) when a key or value is over its
/// limit.
pub fn encode_request(req: &Request) -> Result<Vec<u8>, ProtoError> {
    let (key, aux, value, flags, timeout): (Vec<u8>, &[u8], Vec<u8>, u8, u32) = match req {
        Request::Set { key, value } | Request::Will { key, value } => {
            (key.as_bytes().to_vec(), &[], value.clone(), 0, 0)
        }
        Request::Get { key, timeout } => (
            key.as_bytes().to_vec(),
            &[],
            Vec::new(),
            0,
            timeout_ms(*timeout),
        ),
        Request::TryGet { key } | Request::Delete { key } => {
            (key.as_bytes().to_vec(), &[], Vec::new(), 0, 0)
        }
        Request::Add { key, delta } => (
            key.as_bytes().to_vec(),
            &[],
            delta.to_le_bytes().to_vec(),
            0,
            0,
        ),
        Request::CompareSet {
            key,
            expected,
            desired,
        } => (
            key.as_bytes().to_vec(),
            expected.as_deref().unwrap_or(&[]),
            desired.clone(),
            if expected.is_some() { FLAG_EXPECTED } else { 0 },
            0,
        ),
        Request::Wait { keys, timeout } => (
            encode_key_list(keys)?,
            &[],
            Vec::new(),
            0,
            timeout_ms(*timeout),
        ),
        Request::Check { keys } => (encode_key_list(keys)?, &[], Vec::new(), 0, 0),
    };
    let op = req.op();
    let header = RequestHeader {
        op,
        flags,
        key_len: if op.has_key_list() {
            len_u32("key list", key.len(), MAX_KEY_LIST_LEN)?
        } else {
            len_u32("key", key.len(), MAX_KEY_LEN)?
        },
        aux_len: len_u32("expected value", aux.len(), MAX_VALUE_LEN)?,
        value_len: len_u32("value", value.len(), MAX_VALUE_LEN)?,
        timeout_ms: timeout,
    };
    header.validate()?;
    let mut out = Vec::with_capacity(REQUEST_HEADER_LEN + header.body_len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&key);
    out.extend_from_slice(aux);
    out.extend_from_slice(&value);
    Ok(out)
}

/// Decodes the body of a request whose header was decoded by [`RequestHeader::decode`].
/// `body` must be exactly [`RequestHeader::body_len`] bytes.
pub fn decode_request_body(h: &RequestHeader, body: &[u8]) -> Result<Request, ProtoError> {
    if body.len() != h.body_len() {
        return Err(ProtoError::Truncated {
            got: body.len(),
            need: h.body_len(),
        });
    }
    let (key, rest) = body.split_at(h.key_len as usize);
    let (aux, value) = rest.split_at(h.aux_len as usize);
    let timeout = Duration::from_millis(u64::from(h.timeout_ms));
    Ok(match h.op {
        Op::Set => Request::Set {
            key: decode_key(key)?,
            value: value.to_vec(),
        },
        Op::Get => Request::Get {
            key: decode_key(key)?,
            timeout,
        },
        Op::TryGet => Request::TryGet {
            key: decode_key(key)?,
        },
        Op::Add => {
            let mut d = [0u8; 8];
            if value.len() != 8 {
                return Err(ProtoError::Malformed("add needs an 8-byte delta"));
            }
            d.copy_from_slice(value);
            Request::Add {
                key: decode_key(key)?,
                delta: i64::from_le_bytes(d),
            }
        }
        Op::CompareSet => Request::CompareSet {
            key: decode_key(key)?,
            expected: (h.flags & FLAG_EXPECTED != 0).then(|| aux.to_vec()),
            desired: value.to_vec(),
        },
        Op::Wait => Request::Wait {
            keys: decode_key_list(key)?,
            timeout,
        },
        Op::Check => Request::Check {
            keys: decode_key_list(key)?,
        },
        Op::Delete => Request::Delete {
            key: decode_key(key)?,
        },
        Op::Will => Request::Will {
            key: decode_key(key)?,
            value: value.to_vec(),
        },
    })
}

/// Decodes one whole request frame from the start of `b`; returns it and the bytes it took.
/// [`ProtoError::Truncated`] says how many bytes the frame needs when `b` is too short.
pub fn decode_request(b: &[u8]) -> Result<(Request, usize), ProtoError> {
    let h = RequestHeader::decode(b)?;
    let total = REQUEST_HEADER_LEN + h.body_len();
    if b.len() < total {
        return Err(ProtoError::Truncated {
            got: b.len(),
            need: total,
        });
    }
    Ok((
        decode_request_body(&h, &b[REQUEST_HEADER_LEN..total])?,
        total,
    ))
}

/// A response's status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// [`Response::Ok`].
    Ok = 0,
    /// [`Response::NotFound`].
    NotFound = 1,
    /// [`Response::Timeout`].
    Timeout = 2,
    /// [`Response::BadRequest`].
    BadRequest = 3,
    /// [`Response::ShuttingDown`].
    ShuttingDown = 4,
    /// [`Response::Refused`].
    Refused = 5,
    /// [`Response::Closing`].
    Closing = 6,
}

impl Status {
    fn from_u8(v: u8) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::NotFound,
            2 => Status::Timeout,
            3 => Status::BadRequest,
            4 => Status::ShuttingDown,
            5 => Status::Refused,
            6 => Status::Closing,
            _ => return None,
        })
    }
}

/// A decoded, validated response header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    /// The status.
    pub status: Status,
    /// Bytes of body that follow (within the limit for the status).
    pub body_len: u32,
}

impl ResponseHeader {
    /// Decodes and validates a response header from the first [`RESPONSE_HEADER_LEN`] bytes
    /// of `b`; the body length is checked against the limit for its status.
    pub fn decode(b: &[u8]) -> Result<ResponseHeader, ProtoError> {
        if b.len() < RESPONSE_HEADER_LEN {
            return Err(ProtoError::Truncated {
                got: b.len(),
                need: RESPONSE_HEADER_LEN,
            });
        }
        let magic = u32_at(b, 0);
        if magic != RESPONSE_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(ProtoError::BadVersion(b[4]));
        }
        let status = Status::from_u8(b[5]).ok_or(ProtoError::BadStatus(b[5]))?;
        if b[6] != 0 || b[7] != 0 {
            return Err(ProtoError::Reserved);
        }
        let body_len = u32_at(b, 8);
        let len = body_len as usize;
        match status {
            Status::Ok => check_len("value", len, MAX_VALUE_LEN)?,
            Status::Timeout => check_len("key list", len, MAX_KEY_LIST_LEN)?,
            Status::BadRequest | Status::Refused | Status::Closing => {
                check_len("message", len, MAX_MESSAGE_LEN)?
            }
            Status::NotFound | Status::ShuttingDown if len != 0 => {
                return Err(ProtoError::Malformed("body on a status without one"));
            }
            Status::NotFound | Status::ShuttingDown => {}
        }
        Ok(ResponseHeader { status, body_len })
    }
}

/// Encodes a response. Over-long parts are cut to their limit (a `Timeout` key list to the
/// keys that fit, a message to [`MAX_MESSAGE_LEN`]) so that encoding never fails; an `Ok`
/// value over [`MAX_VALUE_LEN`] cannot happen because the server never stores one.
pub fn encode_response(resp: &Response) -> Vec<u8> {
    let (status, body): (Status, Vec<u8>) = match resp {
        Response::Ok(v) => (Status::Ok, v[..v.len().min(MAX_VALUE_LEN)].to_vec()),
        Response::NotFound => (Status::NotFound, Vec::new()),
        Response::Timeout(keys) => {
            let mut body = Vec::new();
            for k in keys {
                let k = &k.as_bytes()[..k.len().min(MAX_KEY_LEN)];
                if body.len() + 4 + k.len() > MAX_KEY_LIST_LEN {
                    break;
                }
                body.extend_from_slice(&(k.len() as u32).to_le_bytes());
                body.extend_from_slice(k);
            }
            (Status::Timeout, body)
        }
        Response::BadRequest(m) => (Status::BadRequest, truncated(m)),
        Response::Refused(m) => (Status::Refused, truncated(m)),
        Response::ShuttingDown => (Status::ShuttingDown, Vec::new()),
        Response::Closing(m) => (Status::Closing, truncated(m)),
    };
    let mut out = Vec::with_capacity(RESPONSE_HEADER_LEN + body.len());
    out.extend_from_slice(&RESPONSE_MAGIC.to_le_bytes());
    out.push(VERSION);
    out.push(status as u8);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The bytes of `m`, cut at a character boundary to at most [`MAX_MESSAGE_LEN`].
fn truncated(m: &str) -> Vec<u8> {
    let mut end = m.len().min(MAX_MESSAGE_LEN);
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    m.as_bytes()[..end].to_vec()
}

/// Decodes the body of a response whose header was decoded by [`ResponseHeader::decode`].
pub fn decode_response_body(h: &ResponseHeader, body: &[u8]) -> Result<Response, ProtoError> {
    if body.len() != h.body_len as usize {
        return Err(ProtoError::Truncated {
            got: body.len(),
            need: h.body_len as usize,
        });
    }
    Ok(match h.status {
        Status::Ok => Response::Ok(body.to_vec()),
        Status::NotFound => Response::NotFound,
        Status::Timeout => Response::Timeout(decode_key_list(body)?),
        Status::BadRequest => Response::BadRequest(String::from_utf8_lossy(body).into_owned()),
        Status::ShuttingDown => Response::ShuttingDown,
        Status::Refused => Response::Refused(String::from_utf8_lossy(body).into_owned()),
        // Strict (unlike the older messages): a reason always re-encodes to the same bytes.
        Status::Closing => {
            Response::Closing(String::from_utf8(body.to_vec()).map_err(|_| ProtoError::BadUtf8)?)
        }
    })
}

/// Decodes one whole response frame from the start of `b`; returns it and the bytes it took.
pub fn decode_response(b: &[u8]) -> Result<(Response, usize), ProtoError> {
    let h = ResponseHeader::decode(b)?;
    let total = RESPONSE_HEADER_LEN + h.body_len as usize;
    if b.len() < total {
        return Err(ProtoError::Truncated {
            got: b.len(),
            need: total,
        });
    }
    Ok((
        decode_response_body(&h, &b[RESPONSE_HEADER_LEN..total])?,
        total,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Request> {
        vec![
            Request::Set {
                key: "a".into(),
                value: b"xyz".to_vec(),
            },
            Request::Set {
                key: String::new(),
                value: Vec::new(),
            },
            Request::Get {
                key: "peer/3".into(),
                timeout: Duration::from_millis(1500),
            },
            Request::TryGet { key: "k".into() },
            Request::Add {
                key: "c".into(),
                delta: -7,
            },
            Request::CompareSet {
                key: "j".into(),
                expected: None,
                desired: b"v".to_vec(),
            },
            Request::CompareSet {
                key: "j".into(),
                expected: Some(Vec::new()),
                desired: b"v".to_vec(),
            },
            Request::Wait {
                keys: vec!["a".into(), "bé".into(), String::new()],
                timeout: Duration::from_secs(3),
            },
            Request::Check { keys: Vec::new() },
            Request::Delete { key: "d".into() },
            Request::Will {
                key: "failed".into(),
                value: b"rank 3 died".to_vec(),
            },
            Request::Will {
                key: String::new(),
                value: Vec::new(),
            },
        ]
    }

    #[test]
    fn requests_round_trip() {
        for r in samples() {
            let b = encode_request(&r).unwrap();
            assert_eq!(decode_request(&b), Ok((r.clone(), b.len())), "{r:?}");
            // Every proper prefix is reported as truncated, never as something else.
            for cut in 0..b.len() {
                assert!(matches!(
                    decode_request(&b[..cut]),
                    Err(ProtoError::Truncated { .. })
                ));
            }
        }
    }

    #[test]
    fn responses_round_trip() {
        let all = [
            Response::Ok(b"value".to_vec()),
            Response::Ok(Vec::new()),
            Response::NotFound,
            Response::Timeout(vec!["peer/1".into(), "peer/2".into()]),
            Response::BadRequest("not a counter".into()),
            Response::ShuttingDown,
            Response::Refused("too many clients".into()),
            Response::Closing("rank 0 gave up".into()),
        ];
        for r in all {
            let b = encode_response(&r);
            assert_eq!(decode_response(&b), Ok((r.clone(), b.len())));
            for cut in 0..b.len() {
                assert!(matches!(
                    decode_response(&b[..cut]),
                    Err(ProtoError::Truncated { .. })
                ));
            }
        }
    }

    #[test]
    fn encode_refuses_over_limit() {
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert!(matches!(
            encode_request(&Request::TryGet { key: long.clone() }),
            Err(ProtoError::TooLong { what: "key", .. })
        ));
        assert!(encode_request(&Request::Check { keys: vec![long] }).is_err());
        let ok = "k".repeat(MAX_KEY_LEN);
        assert!(encode_request(&Request::TryGet { key: ok }).is_ok());
    }

    #[test]
    fn header_rejects_bad_input() {
        let good = encode_request(&Request::Set {
            key: "a".into(),
            value: b"b".to_vec(),
        })
        .unwrap();
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(
            RequestHeader::decode(&b),
            Err(ProtoError::BadMagic(_))
        ));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(RequestHeader::decode(&b), Err(ProtoError::BadVersion(2)));
        let mut b = good.clone();
        b[5] = 99;
        assert_eq!(RequestHeader::decode(&b), Err(ProtoError::BadOpcode(99)));
        let mut b = good.clone();
        b[7] = 1;
        assert_eq!(RequestHeader::decode(&b), Err(ProtoError::Reserved));
        // An oversized value length is refused from the header alone.
        let mut b = good.clone();
        b[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            RequestHeader::decode(&b),
            Err(ProtoError::TooLong { what: "value", .. })
        ));
        let mut b = good.clone();
        b[8..12].copy_from_slice(&((MAX_KEY_LEN + 1) as u32).to_le_bytes());
        assert!(matches!(
            RequestHeader::decode(&b),
            Err(ProtoError::TooLong { what: "key", .. })
        ));
        // A timeout on an operation that does not wait.
        let mut b = good.clone();
        b[20] = 1;
        assert!(matches!(
            RequestHeader::decode(&b),
            Err(ProtoError::Malformed(_))
        ));
        assert!(decode_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err());
    }

    #[test]
    fn key_list_rejects_inconsistent_lengths() {
        let mut b = encode_request(&Request::Check {
            keys: vec!["abc".into()],
        })
        .unwrap();
        // The key inside claims 4 bytes but only 3 follow.
        b[REQUEST_HEADER_LEN] = 4;
        assert!(matches!(decode_request(&b), Err(ProtoError::Malformed(_))));
        let mut b = encode_request(&Request::TryGet { key: "ab".into() }).unwrap();
        b[REQUEST_HEADER_LEN] = 0xff;
        assert_eq!(decode_request(&b), Err(ProtoError::BadUtf8));
    }

    fn key() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-z0-9/é]{0,12}").unwrap()
    }

    fn value() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..40)
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (key(), value()).prop_map(|(key, value)| Request::Set { key, value }),
            (key(), 0u32..100_000).prop_map(|(key, ms)| Request::Get {
                key,
                timeout: Duration::from_millis(ms.into())
            }),
            key().prop_map(|key| Request::TryGet { key }),
            (key(), any::<i64>()).prop_map(|(key, delta)| Request::Add { key, delta }),
            (key(), proptest::option::of(value()), value()).prop_map(|(key, expected, desired)| {
                Request::CompareSet {
                    key,
                    expected,
                    desired,
                }
            }),
            (proptest::collection::vec(key(), 0..6), 0u32..100_000).prop_map(|(keys, ms)| {
                Request::Wait {
                    keys,
                    timeout: Duration::from_millis(ms.into()),
                }
            }),
            proptest::collection::vec(key(), 0..6).prop_map(|keys| Request::Check { keys }),
            key().prop_map(|key| Request::Delete { key }),
        ]
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
            if let Ok(h) = RequestHeader::decode(&bytes) {
                prop_assert!(h.body_len() <= MAX_KEY_LIST_LEN + 2 * MAX_VALUE_LEN);
            }
        }

        #[test]
        fn decode_never_panics_on_mutated_frames(r in request(), pos: usize, byte: u8) {
            let mut b = encode_request(&r).unwrap();
            let i = pos % b.len();
            b[i] = byte;
            let _ = decode_request(&b);
        }

        #[test]
        fn any_request_round_trips(r in request()) {
            let b = encode_request(&r).unwrap();
            prop_assert_eq!(decode_request(&b), Ok((r, b.len())));
        }

        #[test]
        fn any_timeout_response_round_trips(keys in proptest::collection::vec(key(), 0..6)) {
            let r = Response::Timeout(keys);
            let b = encode_response(&r);
            prop_assert_eq!(decode_response(&b), Ok((r, b.len())));
        }
    }
}
