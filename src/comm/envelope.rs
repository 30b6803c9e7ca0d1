//! What the communicator layer writes into each message's opaque [`Envelope`].
//!
//! ```text
//! offset size field
//!      0    8 ctx    communicator context (each communicator has one for point-to-point
//!                    and one for collectives)
//!      8    4 tag    user tag (point-to-point) or collective sequence number
//!     12    1 kind   0 point-to-point, 1 collective
//!     13    1 op     collective operation code (collectives only)
//!     14    1 dtype  element type code
//!     15    1 redop  reduction operation code
//!     16    4 root   root rank of rooted collectives
//!     20    8 count  element count of the collective call
//!     28    3 step   algorithm round (collectives); a notice's reason and blamed rank
//!     31    1 algo   algorithm code (collectives), 0 otherwise
//! ```
//! The collective fields (op, dtype, redop, root, count, algo: the call's *fingerprint*) let
//! a receiver compare the sender's call with its own and report a mismatch naming both
//! calls, instead of silently mixing data.
//!
//! A *notice* (kind 2) is what a rank sends to the peers of a collective it has given up
//! (mismatch, lost peer, timeout): it carries the giving-up rank's call in the fingerprint
//! fields and, in `step`, why ([`NOTICE_MISMATCH`], ...) in the top 4 bits and the rank to
//! blame in the low 20. The engine fails every receive of that collective (context and tag)
//! when one arrives, so ranks blocked in the collective learn of the failure at once.
//!
//! A mismatch is reported with two notices that together name both calls: the first
//! differing rank's call in the fingerprint fields and that rank in the blamed field, in
//! the call's own context; and before it, in the communicator's agreement context, the
//! second rank's call and rank. Agreement messages (kind 1, no payload, the fingerprint in
//! the envelope and the round in `step`) travel in that agreement context too.

use crate::wire::Envelope;

/// Whether a message belongs to point-to-point traffic or to a collective.
pub(crate) const KIND_P2P: u8 = 0;
/// See [`KIND_P2P`].
pub(crate) const KIND_COLL: u8 = 1;
/// A collective was given up by the sender; see the module documentation.
pub(crate) const KIND_NOTICE: u8 = 2;

/// Notice reason: the sender saw a collective mismatch.
pub(crate) const NOTICE_MISMATCH: u32 = 1;
/// Notice reason: the sender lost a peer.
pub(crate) const NOTICE_PEER_LOST: u32 = 2;
/// Notice reason: the sender timed out.
pub(crate) const NOTICE_TIMEOUT: u32 = 3;
/// Notice reason: the sender's communicator failed otherwise (aborted, I/O error).
pub(crate) const NOTICE_OTHER: u32 = 4;
/// Largest step value (24 bits).
pub(crate) const STEP_MAX: u32 = 0x00FF_FFFF;

/// The decoded fields of an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Env {
    pub ctx: u64,
    pub tag: u32,
    pub kind: u8,
    pub op: u8,
    pub dtype: u8,
    pub redop: u8,
    pub root: u32,
    pub count: u64,
    /// 24 bits.
    pub step: u32,
    pub algo: u8,
}

impl Env {
    /// A point-to-point envelope.
    pub fn p2p(ctx: u64, tag: u32) -> Env {
        Env {
            ctx,
            tag,
            kind: KIND_P2P,
            ..Env::default()
        }
    }

    pub fn encode(&self) -> Envelope {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.ctx.to_le_bytes());
        b[8..12].copy_from_slice(&self.tag.to_le_bytes());
        b[12] = self.kind;
        b[13] = self.op;
        b[14] = self.dtype;
        b[15] = self.redop;
        b[16..20].copy_from_slice(&self.root.to_le_bytes());
        b[20..28].copy_from_slice(&self.count.to_le_bytes());
        b[28..31].copy_from_slice(&self.step.to_le_bytes()[..3]);
        b[31] = self.algo;
        Envelope(b)
    }

    pub fn decode(e: &Envelope) -> Env {
        let b = &e.0;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        Env {
            ctx: u64_at(0),
            tag: u32_at(8),
            kind: b[12],
            op: b[13],
            dtype: b[14],
            redop: b[15],
            root: u32_at(16),
            count: u64_at(20),
            step: u32::from_le_bytes([b[28], b[29], b[30], 0]),
            algo: b[31],
        }
    }

    /// Whether `self` (a received collective message) belongs to the same call as `mine`:
    /// a collective message (not a notice) with the same fingerprint.
    pub fn same_call(&self, mine: &Env) -> bool {
        self.kind == KIND_COLL
            && (
                self.op, self.dtype, self.redop, self.root, self.count, self.algo,
            ) == (
                mine.op, mine.dtype, mine.redop, mine.root, mine.count, mine.algo,
            )
    }

    /// The kind byte of an encoded envelope.
    pub fn kind_of(e: &Envelope) -> u8 {
        e.0[12]
    }

    /// Context and tag, the two fields receives match on.
    pub fn key(e: &Envelope) -> (u64, u32) {
        let b = &e.0;
        let mut ctx = [0u8; 8];
        ctx.copy_from_slice(&b[0..8]);
        (
            u64::from_le_bytes(ctx),
            u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let e = Env {
            ctx: 0x0102_0304_0506_0708,
            tag: 77,
            kind: KIND_COLL,
            op: 3,
            dtype: 9,
            redop: 1,
            root: 5,
            count: 1 << 40,
            step: 0x00AB_CDEF,
            algo: 3,
        };
        let enc = e.encode();
        assert_eq!(Env::decode(&enc), e);
        assert_eq!(Env::key(&enc), (e.ctx, 77));
        assert_eq!(Env::kind_of(&enc), KIND_COLL);
        let mut other = e;
        other.step = 1;
        assert!(other.same_call(&e));
        other.algo = 1;
        assert!(!other.same_call(&e));
        let notice = Env {
            kind: KIND_NOTICE,
            ..e
        };
        assert!(!notice.same_call(&e));
    }
}
