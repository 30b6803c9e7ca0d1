//! PyTorch's `TCPStore` wire protocol: pure encode and decode of its queries, no I/O (so it
//! can be fuzzed).
//!
//! ferrocomm speaks this protocol in two places: its store server answers torch's own
//! `TCPStore` clients on the same port as ferrocomm's clients (the first byte of a
//! connection tells them apart: torch starts with [`QueryType::Validate`] = `0x00`, ferrocomm
//! with the little-endian magic of [`super::protocol`] or of [`crate::auth`]), and
//! [`TorchStore`](super::torch_store::TorchStore) is a ferrocomm client of a torch server
//! (torchrun's agent store, or `TCPStore(is_master=True)` in a Python program).
//!
//! The protocol, as torch 2.x sends it (checked against torch 2.15 on the wire):
//!
//! - Integers are little-endian (the host order of every platform torch ships for); a
//!   string or byte vector is a `u64` length followed by the bytes; a key list is a `u64`
//!   count followed by that many strings.
//! - A connection starts with `Validate` (`0x00`, then the `u32` magic `0x3C85F7CE`, no
//!   reply) and usually a `Ping` (`0x0D`, a `u32` nonce, echoed back).
//! - Every other query is one type byte followed by its arguments:
//!
//! | query | arguments | reply |
//! |---|---|---|
//! | `Set` (1) | key, value | none |
//! | `CompareSet` (2) | key, expected, desired | the value afterwards (`expected` if the key is absent and `expected` is not empty) |
//! | `Get` (3) | key | value (the client waits for the key first) |
//! | `Add` (4) | key, `i64` delta | `i64` new value; stored as its decimal text |
//! | `Check` (5) | key list | one byte: 0 all keys set, 1 not |
//! | `Wait` (6) | key list | one byte 0 (`STOP_WAITING`) once every key is set |
//! | `GetNumKeys` (7) | none | `i64` |
//! | `DeleteKey` (8) | key | `i64` number deleted |
//! | `Append` (9) | key, bytes | none |
//! | `MultiGet` (10) | key list | one value per key |
//! | `MultiSet` (11) | `u64` count, then count (key, value) pairs | none |
//! | `CancelWait` (12) | none | one byte 1 (`WAIT_CANCELED`), after a pending `STOP_WAITING` if one was sent |
//! | `Ping` (13) | `u32` nonce | the nonce |
//! | `QueuePush` (14) | key, value | none |
//! | `QueuePop` (15) | key | `i64` items before the pop, then the value if it was > 0 |
//! | `QueueLen` (16) | key | `i64` |
//! | `ListKeys` (17) | none | `i64` count, then the keys |
//! | `Barrier` (18) | key, `i64` world size | one byte 0 once `world size` clients arrived |
//!
//! A waiting client (`Wait`, `Barrier`) that times out sends `CancelWait` and reads until
//! the `WAIT_CANCELED` byte.
//!
//! Limits: a key is at most [`MAX_KEY_LEN`] bytes of UTF-8, a value at most
//! [`MAX_VALUE_LEN`], a key list at most [`MAX_KEYS`] keys, and a whole query at most
//! [`MAX_QUERY_LEN`] bytes. Every length is checked as soon as it is read, before the bytes
//! it announces arrive, so a receiver can refuse an oversized query without buffering it.

use super::protocol;

/// The magic number a torch client sends right after [`QueryType::Validate`].
pub const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;
/// Longest key, in bytes (the same as ferrocomm's own protocol).
pub const MAX_KEY_LEN: usize = protocol::MAX_KEY_LEN;
/// Longest value, in bytes (the same as ferrocomm's own protocol).
pub const MAX_VALUE_LEN: usize = protocol::MAX_VALUE_LEN;
/// Most keys in one key list (torch's own server allows 128 Ki).
pub const MAX_KEYS: usize = 128 * 1024;
/// Longest query, in bytes, all arguments included.
pub const MAX_QUERY_LEN: usize = MAX_VALUE_LEN + 16 * 1024 * 1024;

/// The first byte of every torch query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum QueryType {
    /// The connection's first query: the validation magic.
    Validate = 0,
    /// Set a key.
    Set = 1,
    /// Compare and set a key.
    CompareSet = 2,
    /// Read a key.
    Get = 3,
    /// Add to a counter.
    Add = 4,
    /// Whether keys are set.
    Check = 5,
    /// Wait for keys.
    Wait = 6,
    /// How many keys are set.
    GetNumKeys = 7,
    /// Delete a key.
    DeleteKey = 8,
    /// Append bytes to a key.
    Append = 9,
    /// Read several keys.
    MultiGet = 10,
    /// Set several keys.
    MultiSet = 11,
    /// Cancel the pending `Wait` or `Barrier`.
    CancelWait = 12,
    /// Echo a nonce.
    Ping = 13,
    /// Push onto a queue.
    QueuePush = 14,
    /// Pop from a queue.
    QueuePop = 15,
    /// Length of a queue.
    QueueLen = 16,
    /// Every key.
    ListKeys = 17,
    /// Count arrivals at a barrier key and wait for the world.
    Barrier = 18,
}

impl QueryType {
    /// The query type of a first byte, if it is one.
    pub fn from_byte(b: u8) -> Option<QueryType> {
        use QueryType::*;
        Some(match b {
            0 => Validate,
            1 => Set,
            2 => CompareSet,
            3 => Get,
            4 => Add,
            5 => Check,
            6 => Wait,
            7 => GetNumKeys,
            8 => DeleteKey,
            9 => Append,
            10 => MultiGet,
            11 => MultiSet,
            12 => CancelWait,
            13 => Ping,
            14 => QueuePush,
            15 => QueuePop,
            16 => QueueLen,
            17 => ListKeys,
            18 => Barrier,
            _ => return None,
        })
    }
}

/// The reply byte of `Check`: every key is set.
pub const CHECK_READY: u8 = 0;
/// The reply byte of `Check`: some key is missing.
pub const CHECK_NOT_READY: u8 = 1;
/// The reply byte of `Wait` and `Barrier`: done waiting.
pub const STOP_WAITING: u8 = 0;
/// The reply byte of `CancelWait`.
pub const WAIT_CANCELED: u8 = 1;

/// One decoded torch query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// `Validate` with the magic the client sent.
    Validate(u32),
    /// `Set`.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
    },
    /// `CompareSet`.
    CompareSet {
        /// The key.
        key: String,
        /// The expected value (empty: the key is absent).
        expected: Vec<u8>,
        /// The value to store when the expectation holds.
        desired: Vec<u8>,
    },
    /// `Get`.
    Get(String),
    /// `Add`.
    Add {
        /// The counter.
        key: String,
        /// What to add.
        delta: i64,
    },
    /// `Check`.
    Check(Vec<String>),
    /// `Wait`.
    Wait(Vec<String>),
    /// `GetNumKeys`.
    GetNumKeys,
    /// `DeleteKey`.
    DeleteKey(String),
    /// `Append`.
    Append {
        /// The key.
        key: String,
        /// The bytes to append.
        value: Vec<u8>,
    },
    /// `MultiGet`.
    MultiGet(Vec<String>),
    /// `MultiSet`.
    MultiSet(Vec<(String, Vec<u8>)>),
    /// `CancelWait`.
    CancelWait,
    /// `Ping` with its nonce.
    Ping(u32),
    /// `QueuePush`.
    QueuePush {
        /// The queue.
        key: String,
        /// The item.
        value: Vec<u8>,
    },
    /// `QueuePop`.
    QueuePop(String),
    /// `QueueLen`.
    QueueLen(String),
    /// `ListKeys`.
    ListKeys,
    /// `Barrier`.
    Barrier {
        /// The barrier's counter key.
        key: String,
        /// How many arrivals release it.
        world_size: i64,
    },
}

/// Why bytes are not a valid torch query.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first byte is no query type.
    #[error("unknown TCPStore query type {0:#04x}")]
    UnknownQuery(u8),
    /// A length or count is over the limit.
    #[error("{what} of {got} is over the limit of {max}")]
    TooLong {
        /// What was too long (`key`, `value`, `key count`, `query`).
        what: &'static str,
        /// The announced length or count.
        got: u64,
        /// The limit.
        max: usize,
    },
    /// A key is not UTF-8.
    #[error("a key is not UTF-8")]
    KeyNotUtf8,
}

/// Reads a query out of a growing buffer.
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

/// `Ok(None)` inside the decoder: more bytes are needed.
type Step<T> = Result<Option<T>, WireError>;

macro_rules! need {
    ($e:expr) => {
        match $e? {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.buf.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn bytes(&mut self, what: &'static str, max: usize) -> Step<Vec<u8>> {
        let Some(len) = self.u64() else {
            return Ok(None);
        };
        if len > max as u64 {
            return Err(WireError::TooLong {
                what,
                got: len,
                max,
            });
        }
        check_query_len(self.at as u64 + len)?;
        Ok(self.take(len as usize).map(<[u8]>::to_vec))
    }
    fn key(&mut self) -> Step<String> {
        let b = need!(self.bytes("key", MAX_KEY_LEN));
        String::from_utf8(b)
            .map(Some)
            .map_err(|_| WireError::KeyNotUtf8)
    }
    fn count(&mut self) -> Step<usize> {
        let Some(n) = self.u64() else {
            return Ok(None);
        };
        if n > MAX_KEYS as u64 {
            return Err(WireError::TooLong {
                what: "key count",
                got: n,
                max: MAX_KEYS,
            });
        }
        Ok(Some(n as usize))
    }
    fn keys(&mut self) -> Step<Vec<String>> {
        let n = need!(self.count());
        let mut keys = Vec::new();
        for _ in 0..n {
            keys.push(need!(self.key()));
        }
        Ok(Some(keys))
    }
}

fn check_query_len(len: u64) -> Result<(), WireError> {
    if len > MAX_QUERY_LEN as u64 {
        return Err(WireError::TooLong {
            what: "query",
            got: len,
            max: MAX_QUERY_LEN,
        });
    }
    Ok(())
}

/// Decodes the query at the start of `buf`: `Ok(Some((query, bytes used)))`, `Ok(None)` when
/// `buf` holds only the beginning of a valid query (read more and call again), `Err` when it
/// can never become one. Every length is checked before the bytes it announces are needed.
pub fn decode_query(buf: &[u8]) -> Result<Option<(Query, usize)>, WireError> {
    let mut c = Cursor { buf, at: 0 };
    let Some(t) = c.u8() else {
        return Ok(None);
    };
    let kind = QueryType::from_byte(t).ok_or(WireError::UnknownQuery(t))?;
    let q = match kind {
        QueryType::Validate => match c.u32() {
            Some(m) => Query::Validate(m),
            None => return Ok(None),
        },
        QueryType::Set => {
            let key = need!(c.key());
            let value = need!(c.bytes("value", MAX_VALUE_LEN));
            Query::Set { key, value }
        }
        QueryType::CompareSet => {
            let key = need!(c.key());
            let expected = need!(c.bytes("value", MAX_VALUE_LEN));
            let desired = need!(c.bytes("value", MAX_VALUE_LEN));
            Query::CompareSet {
                key,
                expected,
                desired,
            }
        }
        QueryType::Get => Query::Get(need!(c.key())),
        QueryType::Add => {
            let key = need!(c.key());
            match c.u64() {
                Some(d) => Query::Add {
                    key,
                    delta: d as i64,
                },
                None => return Ok(None),
            }
        }
        QueryType::Check => Query::Check(need!(c.keys())),
        QueryType::Wait => Query::Wait(need!(c.keys())),
        QueryType::GetNumKeys => Query::GetNumKeys,
        QueryType::DeleteKey => Query::DeleteKey(need!(c.key())),
        QueryType::Append => {
            let key = need!(c.key());
            let value = need!(c.bytes("value", MAX_VALUE_LEN));
            Query::Append { key, value }
        }
        QueryType::MultiGet => Query::MultiGet(need!(c.keys())),
        QueryType::MultiSet => {
            let n = need!(c.count());
            let mut pairs = Vec::new();
            for _ in 0..n {
                let key = need!(c.key());
                let value = need!(c.bytes("value", MAX_VALUE_LEN));
                pairs.push((key, value));
            }
            Query::MultiSet(pairs)
        }
        QueryType::CancelWait => Query::CancelWait,
        QueryType::Ping => match c.u32() {
            Some(n) => Query::Ping(n),
            None => return Ok(None),
        },
        QueryType::QueuePush => {
            let key = need!(c.key());
            let value = need!(c.bytes("value", MAX_VALUE_LEN));
            Query::QueuePush { key, value }
        }
        QueryType::QueuePop => Query::QueuePop(need!(c.key())),
        QueryType::QueueLen => Query::QueueLen(need!(c.key())),
        QueryType::ListKeys => Query::ListKeys,
        QueryType::Barrier => {
            let key = need!(c.key());
            match c.u64() {
                Some(w) => Query::Barrier {
                    key,
                    world_size: w as i64,
                },
                None => return Ok(None),
            }
        }
    };
    Ok(Some((q, c.at)))
}

/// Appends a `u64` length and the bytes.
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    out.extend_from_slice(b);
}

/// Appends an `i64`.
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_keys(out: &mut Vec<u8>, keys: &[String]) {
    out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for k in keys {
        put_bytes(out, k.as_bytes());
    }
}

/// Encodes `q` exactly as torch's client does.
pub fn encode_query(q: &Query) -> Vec<u8> {
    let mut out = Vec::new();
    match q {
        Query::Validate(m) => {
            out.push(QueryType::Validate as u8);
            out.extend_from_slice(&m.to_le_bytes());
        }
        Query::Set { key, value } => {
            out.push(QueryType::Set as u8);
            put_bytes(&mut out, key.as_bytes());
            put_bytes(&mut out, value);
        }
        Query::CompareSet {
            key,
            expected,
            desired,
        } => {
            out.push(QueryType::CompareSet as u8);
            put_bytes(&mut out, key.as_bytes());
            put_bytes(&mut out, expected);
            put_bytes(&mut out, desired);
        }
        Query::Get(key) => {
            out.push(QueryType::Get as u8);
            put_bytes(&mut out, key.as_bytes());
        }
        Query::Add { key, delta } => {
            out.push(QueryType::Add as u8);
            put_bytes(&mut out, key.as_bytes());
            put_i64(&mut out, *delta);
        }
        Query::Check(keys) => {
            out.push(QueryType::Check as u8);
            put_keys(&mut out, keys);
        }
        Query::Wait(keys) => {
            out.push(QueryType::Wait as u8);
            put_keys(&mut out, keys);
        }
        Query::GetNumKeys => out.push(QueryType::GetNumKeys as u8),
        Query::DeleteKey(key) => {
            out.push(QueryType::DeleteKey as u8);
            put_bytes(&mut out, key.as_bytes());
        }
        Query::Append { key, value } => {
            out.push(QueryType::Append as u8);
            put_bytes(&mut out, key.as_bytes());
            put_bytes(&mut out, value);
        }
        Query::MultiGet(keys) => {
            out.push(QueryType::MultiGet as u8);
            put_keys(&mut out, keys);
        }
        Query::MultiSet(pairs) => {
            out.push(QueryType::MultiSet as u8);
            out.extend_from_slice(&(pairs.len() as u64).to_le_bytes());
            for (k, v) in pairs {
                put_bytes(&mut out, k.as_bytes());
                put_bytes(&mut out, v);
            }
        }
        Query::CancelWait => out.push(QueryType::CancelWait as u8),
        Query::Ping(n) => {
            out.push(QueryType::Ping as u8);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Query::QueuePush { key, value } => {
            out.push(QueryType::QueuePush as u8);
            put_bytes(&mut out, key.as_bytes());
            put_bytes(&mut out, value);
        }
        Query::QueuePop(key) => {
            out.push(QueryType::QueuePop as u8);
            put_bytes(&mut out, key.as_bytes());
        }
        Query::QueueLen(key) => {
            out.push(QueryType::QueueLen as u8);
            put_bytes(&mut out, key.as_bytes());
        }
        Query::ListKeys => out.push(QueryType::ListKeys as u8),
        Query::Barrier { key, world_size } => {
            out.push(QueryType::Barrier as u8);
            put_bytes(&mut out, key.as_bytes());
            put_i64(&mut out, *world_size);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_match_what_torch_sends() {
        // Captured from torch 2.15's client on loopback.
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let set = hex("0102000000000000002f6b02000000000000007631");
        assert_eq!(
            decode_query(&set),
            Ok(Some((
                Query::Set {
                    key: "/k".into(),
                    value: b"v1".to_vec()
                },
                set.len()
            )))
        );
        let add = hex("0402000000000000002f6e0500000000000000");
        assert_eq!(
            encode_query(&Query::Add {
                key: "/n".into(),
                delta: 5
            }),
            add
        );
        let wait = hex("06010000000000000005000000000000002f6e6f7065");
        assert_eq!(
            decode_query(&wait).unwrap().unwrap().0,
            Query::Wait(vec!["/nope".into()])
        );
        let hello = hex("00cef7853c0da9330000");
        let (q, n) = decode_query(&hello).unwrap().unwrap();
        assert_eq!((q, n), (Query::Validate(VALIDATION_MAGIC), 5));
        assert_eq!(
            decode_query(&hello[n..]).unwrap().unwrap().0,
            Query::Ping(0x33a9)
        );
    }

    #[test]
    fn every_prefix_asks_for_more_and_oversized_lengths_fail_early() {
        let q = encode_query(&Query::MultiSet(vec![
            ("a".into(), b"1".to_vec()),
            ("bb".into(), Vec::new()),
        ]));
        for i in 0..q.len() {
            assert_eq!(decode_query(&q[..i]), Ok(None), "prefix of {i} bytes");
        }
        let mut big = vec![QueryType::Set as u8];
        big.extend_from_slice(&(MAX_KEY_LEN as u64 + 1).to_le_bytes());
        assert!(matches!(
            decode_query(&big),
            Err(WireError::TooLong { what: "key", .. })
        ));
        let mut many = vec![QueryType::Wait as u8];
        many.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_query(&many),
            Err(WireError::TooLong {
                what: "key count",
                ..
            })
        ));
        assert_eq!(decode_query(&[0x42]), Err(WireError::UnknownQuery(0x42)));
    }
}
