//! Job authentication: every connection proves it belongs to the job before any other byte
//! is trusted.
//!
//! A job may have a *secret* ([`Secret`]): `FERROCOMM_SECRET` in the environment, or
//! [`InitOptions::secret`](crate::InitOptions::secret). `ferrorun` generates a random one per
//! job (unless the user gave one) and passes it to its ranks; its store host uses it too.
//! With a secret, the rendezvous store and the TCP transport open every connection with a
//! mutual HMAC-SHA256 challenge-response (the `hmac` and `sha2` crates; the comparison is
//! constant-time):
//!
//! ```text
//! client -> server  Init       magic, version, kind 1, client nonce Nc (32 random bytes)
//! server -> client  Challenge  magic, version, kind 2, server nonce Ns (32 random bytes),
//!                              HMAC(secret, label || "server" || Nc || Ns)
//! client -> server  Proof      magic, version, kind 5, HMAC(secret, label || "client" || Nc || Ns)
//! ```
//!
//! Each message starts with the magic `0xFC0CA117` (little-endian), version 1, a kind byte
//! and two zero bytes. The label names the channel (`ferrocomm/store/v1`,
//! `ferrocomm/tcp/v1`), so a proof made for one cannot be used for the other; the role
//! makes the server's proof useless as a client's (no reflection). Both nonces are fresh
//! for every connection, so a recorded handshake replayed later fails: the other side has
//! picked a new nonce. The client checks the server's proof before it answers, so a client
//! with the wrong secret learns it at once; the server checks the client's proof before it
//! reads anything else.
//!
//! Only then does the normal protocol start (the store's requests, the transport's
//! [`Hello`](crate::wire::Hello)). What authentication does not do: encrypt, or protect
//! the bytes after the handshake against someone who can rewrite packets on the path.
//!
//! Without a secret nothing changes on the wire and connections are not authenticated (any
//! process that can reach the ports can join the job's store and transports); a process logs
//! that once at `info`. A server with a secret refuses a client without one (it sends
//! [`required_notice`] or, on the store, a `Refused` reply) and logs why, naming the remote
//! address; a server without a secret answers an `Init` with kind 3 ("no secret here") so
//! the client can say what is wrong.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

/// Environment variable holding the job secret.
pub const SECRET_ENV: &str = "FERROCOMM_SECRET";

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof (an HMAC-SHA256 tag).
pub const MAC_LEN: usize = 32;
/// Bytes of the common message header (magic, version, kind, reserved).
pub const HEADER_LEN: usize = 8;
/// Bytes of an `Init` message.
pub const INIT_LEN: usize = HEADER_LEN + NONCE_LEN;
/// Bytes of a `Challenge` (or "no secret here") message.
pub const CHALLENGE_LEN: usize = HEADER_LEN + NONCE_LEN + MAC_LEN;
/// Bytes of a `Proof` message.
pub const PROOF_LEN: usize = HEADER_LEN + MAC_LEN;
/// Bytes of the "authentication required" notice.
pub const NOTICE_LEN: usize = 32;

const MAGIC: u32 = 0xFC0C_A117;
const VERSION: u8 = 1;
const KIND_INIT: u8 = 1;
const KIND_CHALLENGE: u8 = 2;
const KIND_NO_SECRET: u8 = 3;
const KIND_REQUIRED: u8 = 4;
const KIND_PROOF: u8 = 5;

/// What the client is told to check when authentication fails.
pub const HINT: &str = "check FERROCOMM_SECRET / that both sides belong to the same job";

/// A job secret. Its `Debug` output does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes>)", self.0.len())
    }
}

impl Secret {
    /// A secret made of these bytes. Any non-empty string works (hex, a passphrase); every
    /// process of the job must use the same bytes.
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Secret> {
        let b = bytes.as_ref();
        if b.is_empty() {
            return Err(Error::invalid(
                "Secret::new",
                "bytes",
                "the secret is empty",
            ));
        }
        Ok(Secret(Arc::from(b)))
    }

    /// The secret in `FERROCOMM_SECRET` (surrounding whitespace removed), `None` when unset
    /// or blank.
    pub fn from_env() -> Option<Secret> {
        Self::from_lookup(&crate::config::process_env)
    }

    pub(crate) fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Option<Secret> {
        let v = lookup(SECRET_ENV)?;
        let v = v.trim();
        Secret::new(v).ok()
    }

    /// A fresh random secret as 64 hex digits (256 bits), as `ferrorun` generates per job.
    pub fn generate_hex() -> Result<String> {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).map_err(|e| {
            Error::io(
                "generating a job secret",
                std::io::Error::other(e.to_string()),
            )
        })?;
        Ok(b.iter().map(|x| format!("{x:02x}")).collect())
    }
}

/// Which protocol a handshake opens (part of what is signed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// The rendezvous store (TcpStore).
    Store,
    /// The TCP transport between ranks.
    Transport,
}

impl Channel {
    fn label(self) -> &'static [u8] {
        match self {
            Channel::Store => b"ferrocomm/store/v1\0",
            Channel::Transport => b"ferrocomm/tcp/v1\0",
        }
    }
}

/// Why a handshake failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The bytes are not the handshake message expected here.
    #[error("malformed authentication message: {0}")]
    Malformed(&'static str),
    /// The peer's proof does not match: it does not have this job's secret (or replays an
    /// old handshake).
    #[error(
        "the peer's proof does not match this job's secret (a different secret, or a replayed handshake)"
    )]
    WrongProof,
    /// The server has no secret while this client has one.
    #[error("the server has no job secret, but this side has one")]
    PeerHasNoSecret,
    /// The server requires a secret while this client has none.
    #[error("the server requires the job secret, and this side has none")]
    PeerRequiresSecret,
    /// No random numbers could be had.
    #[error("cannot generate a nonce: {0}")]
    Random(String),
}

fn header(kind: u8) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = VERSION;
    h[5] = kind;
    h
}

/// Whether `b` starts with this module's magic number (at least 4 bytes needed).
pub fn is_auth_message(b: &[u8]) -> bool {
    b.len() >= 4 && b[0..4] == MAGIC.to_le_bytes()
}

/// The kind byte of a message after checking its header.
fn kind_of(b: &[u8]) -> std::result::Result<u8, AuthError> {
    if b.len() < HEADER_LEN {
        return Err(AuthError::Malformed("shorter than a header"));
    }
    if !is_auth_message(b) {
        return Err(AuthError::Malformed("bad magic"));
    }
    if b[4] != VERSION {
        return Err(AuthError::Malformed("unsupported version"));
    }
    if b[6..8] != [0, 0] {
        return Err(AuthError::Malformed("reserved bytes are not zero"));
    }
    Ok(b[5])
}

/// If `b` is the server's "authentication required" notice or its "no secret here" reply,
/// the error it means.
pub fn refusal_of(b: &[u8]) -> Option<AuthError> {
    match kind_of(b) {
        Ok(KIND_REQUIRED) => Some(AuthError::PeerRequiresSecret),
        Ok(KIND_NO_SECRET) => Some(AuthError::PeerHasNoSecret),
        _ => None,
    }
}

fn nonce() -> std::result::Result<[u8; NONCE_LEN], AuthError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(n)
}

fn mac(
    secret: &Secret,
    channel: Channel,
    role: &[u8],
    cn: &[u8; NONCE_LEN],
    sn: &[u8; NONCE_LEN],
) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut m = match <Hmac<Sha256> as Mac>::new_from_slice(&secret.0) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    m.update(channel.label());
    m.update(role);
    m.update(cn);
    m.update(sn);
    m
}

/// The client's side of a handshake (see the module docs).
pub struct ClientHandshake {
    secret: Secret,
    channel: Channel,
    cn: [u8; NONCE_LEN],
}

impl ClientHandshake {
    /// Starts a handshake: the state, and the `Init` message to send.
    pub fn start(
        secret: &Secret,
        channel: Channel,
    ) -> std::result::Result<(ClientHandshake, [u8; INIT_LEN]), AuthError> {
        let cn = nonce()?;
        let mut msg = [0u8; INIT_LEN];
        msg[..HEADER_LEN].copy_from_slice(&header(KIND_INIT));
        msg[HEADER_LEN..].copy_from_slice(&cn);
        Ok((
            ClientHandshake {
                secret: secret.clone(),
                channel,
                cn,
            },
            msg,
        ))
    }

    /// Checks the server's challenge ([`CHALLENGE_LEN`] bytes) and returns the `Proof` to
    /// send.
    pub fn answer(&self, b: &[u8]) -> std::result::Result<[u8; PROOF_LEN], AuthError> {
        match kind_of(b)? {
            KIND_CHALLENGE => {}
            KIND_NO_SECRET => return Err(AuthError::PeerHasNoSecret),
            KIND_REQUIRED => return Err(AuthError::PeerRequiresSecret),
            _ => return Err(AuthError::Malformed("expected a challenge")),
        }
        if b.len() != CHALLENGE_LEN {
            return Err(AuthError::Malformed("challenge of the wrong length"));
        }
        let mut sn = [0u8; NONCE_LEN];
        sn.copy_from_slice(&b[HEADER_LEN..HEADER_LEN + NONCE_LEN]);
        mac(&self.secret, self.channel, b"server", &self.cn, &sn)
            .verify_slice(&b[HEADER_LEN + NONCE_LEN..])
            .map_err(|_| AuthError::WrongProof)?;
        let tag = mac(&self.secret, self.channel, b"client", &self.cn, &sn).finalize();
        let mut msg = [0u8; PROOF_LEN];
        msg[..HEADER_LEN].copy_from_slice(&header(KIND_PROOF));
        msg[HEADER_LEN..].copy_from_slice(&tag.into_bytes());
        Ok(msg)
    }
}

/// The server's side of a handshake (see the module docs).
pub struct ServerHandshake {
    secret: Secret,
    channel: Channel,
    cn: [u8; NONCE_LEN],
    sn: [u8; NONCE_LEN],
}

impl ServerHandshake {
    /// Reads a client's `Init` ([`INIT_LEN`] bytes): the state, and the challenge to send.
    pub fn challenge(
        secret: &Secret,
        channel: Channel,
        b: &[u8],
    ) -> std::result::Result<(ServerHandshake, [u8; CHALLENGE_LEN]), AuthError> {
        if kind_of(b)? != KIND_INIT || b.len() != INIT_LEN {
            return Err(AuthError::Malformed("expected an Init message"));
        }
        let mut cn = [0u8; NONCE_LEN];
        cn.copy_from_slice(&b[HEADER_LEN..]);
        let sn = nonce()?;
        let tag = mac(secret, channel, b"server", &cn, &sn).finalize();
        let mut msg = [0u8; CHALLENGE_LEN];
        msg[..HEADER_LEN].copy_from_slice(&header(KIND_CHALLENGE));
        msg[HEADER_LEN..HEADER_LEN + NONCE_LEN].copy_from_slice(&sn);
        msg[HEADER_LEN + NONCE_LEN..].copy_from_slice(&tag.into_bytes());
        Ok((
            ServerHandshake {
                secret: secret.clone(),
                channel,
                cn,
                sn,
            },
            msg,
        ))
    }

    /// Checks the client's `Proof` ([`PROOF_LEN`] bytes), in constant time.
    pub fn verify(&self, b: &[u8]) -> std::result::Result<(), AuthError> {
        if kind_of(b)? != KIND_PROOF || b.len() != PROOF_LEN {
            return Err(AuthError::Malformed("expected a Proof message"));
        }
        mac(&self.secret, self.channel, b"client", &self.cn, &self.sn)
            .verify_slice(&b[HEADER_LEN..])
            .map_err(|_| AuthError::WrongProof)
    }
}

/// What a server without a secret answers to an `Init` ([`CHALLENGE_LEN`] bytes).
pub fn no_secret_reply() -> [u8; CHALLENGE_LEN] {
    let mut msg = [0u8; CHALLENGE_LEN];
    msg[..HEADER_LEN].copy_from_slice(&header(KIND_NO_SECRET));
    msg
}

/// What a server with a secret sends (then closes) to a client that did not authenticate
/// ([`NOTICE_LEN`] bytes, the size of a transport hello).
pub fn required_notice() -> [u8; NOTICE_LEN] {
    let mut msg = [0u8; NOTICE_LEN];
    msg[..HEADER_LEN].copy_from_slice(&header(KIND_REQUIRED));
    msg
}

/// Logs once per process, at `info`, that connections are not authenticated.
pub(crate) fn note_unauthenticated(what: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        tracing::info!(
            "{what}: no job secret ({SECRET_ENV} unset): connections are not authenticated; \
             any process that reaches the ports can join (ferrorun sets a secret for its ranks)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s).unwrap()
    }

    #[test]
    fn matching_secrets_complete() {
        let s = secret("k");
        let (c, init) = ClientHandshake::start(&s, Channel::Store).unwrap();
        let (srv, chal) = ServerHandshake::challenge(&s, Channel::Store, &init).unwrap();
        let proof = c.answer(&chal).unwrap();
        srv.verify(&proof).unwrap();
    }

    #[test]
    fn wrong_secret_channel_replay_and_reflection_fail() {
        let (a, b) = (secret("a"), secret("b"));
        let (c, init) = ClientHandshake::start(&a, Channel::Store).unwrap();
        let (_, chal) = ServerHandshake::challenge(&b, Channel::Store, &init).unwrap();
        assert_eq!(c.answer(&chal), Err(AuthError::WrongProof));
        // Another channel's label.
        let (_, chal) = ServerHandshake::challenge(&a, Channel::Transport, &init).unwrap();
        assert_eq!(c.answer(&chal), Err(AuthError::WrongProof));
        // Replay: the client's proof for one server nonce fails against a fresh one.
        let (srv1, chal1) = ServerHandshake::challenge(&a, Channel::Store, &init).unwrap();
        let proof = c.answer(&chal1).unwrap();
        srv1.verify(&proof).unwrap();
        let (srv2, _) = ServerHandshake::challenge(&a, Channel::Store, &init).unwrap();
        assert_eq!(srv2.verify(&proof), Err(AuthError::WrongProof));
        // Reflection: the server's own proof is no client proof.
        let mut reflected = [0u8; PROOF_LEN];
        reflected[..HEADER_LEN].copy_from_slice(&header(KIND_PROOF));
        reflected[HEADER_LEN..].copy_from_slice(&chal1[HEADER_LEN + NONCE_LEN..]);
        assert_eq!(srv1.verify(&reflected), Err(AuthError::WrongProof));
    }

    #[test]
    fn refusals_are_recognised() {
        let (c, _) = ClientHandshake::start(&secret("a"), Channel::Store).unwrap();
        assert_eq!(
            c.answer(&no_secret_reply()),
            Err(AuthError::PeerHasNoSecret)
        );
        assert_eq!(
            refusal_of(&required_notice()),
            Some(AuthError::PeerRequiresSecret)
        );
        assert_eq!(refusal_of(b"GET / HTTP/1.1\r\n"), None);
        assert!(format!("{:?}", secret("hunter2")).contains("7 bytes"));
        assert!(!format!("{:?}", secret("hunter2")).contains("hunter2"));
        assert_eq!(Secret::generate_hex().unwrap().len(), 64);
        assert!(Secret::new("").is_err());
    }
}
