//! Recursive halving-doubling all_reduce (Rabenseifner's algorithm).
//!
//! Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in
//! MPICH", IJHPCA 19(1), 2005, section 4.4; the same scheme as Gloo's
//! `allreduce_halving_doubling.h`.
//!
//! For a power of two `P`: a reduce-scatter by recursive halving (round `k`: send half of
//! the current range to the rank at distance `2^k`, receive the other half from it and
//! reduce it), then an all-gather by recursive doubling that retraces the same steps
//! backwards. Each element is reduced by exactly one rank and then copied to the others,
//! so every rank ends with the same bytes. Partners at distance `2^k` hold reductions of
//! two adjacent aligned groups of `2^k` ranks, and the lower group's operand comes first,
//! so every element is reduced in rank order (`a_0 ∘ a_1 ∘ ... ∘ a_{P-1}`).
//!
//! Any other `P`: with `P' = 2^⌊log2 P⌋` and `R = P - P'`, the standard fold. In a first
//! round, each of the first `2R` even ranks sends its whole vector to the next odd rank,
//! which reduces it (even rank's operand first) and stands for both; the `P'` remaining
//! ranks (the odd ones of the first `2R`, and every rank from `2R` on) run the power-of-two
//! algorithm; a last round sends the result back to the even ranks that sat out.
//!
//! | | `P` a power of two | otherwise |
//! |---|---|---|
//! | rounds | `2 log2 P` | `2 log2 P' + 2` |
//! | bytes sent per rank (most loaded) | `2 (P - 1) / P · n` | `2 (P' - 1) / P' · n + n` |
//! | bytes on the critical path | `2 (P - 1) / P · n` | `2 (P' - 1) / P' · n + 2n` |
//! | bytes reduced per rank | `(P - 1) / P · n` | `(P' - 1) / P' · n + n` |
//!
//! Fewer rounds than the ring for the same bytes when `P` is a power of two: the choice for
//! medium messages, and for large ones where latency still matters.

use super::schedule::{Buf, Schedule};
use crate::element::Order;

/// How the ranks of a world of `p` fold onto a power of two.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fold {
    /// The largest power of two `<= p`.
    pub p2: usize,
    /// `p - p2`: ranks `0, 2, .., 2 rem - 2` sit out.
    pub rem: usize,
}

impl Fold {
    pub fn new(p: usize) -> Fold {
        let p2 = if p == 0 {
            0
        } else {
            1 << (usize::BITS - 1 - p.leading_zeros())
        };
        Fold { p2, rem: p - p2 }
    }

    /// The rank among the `p2` that `rank` plays, or `None` if it sits out.
    pub fn vrank(&self, rank: usize) -> Option<usize> {
        if rank < 2 * self.rem {
            (rank % 2 == 1).then_some(rank / 2)
        } else {
            Some(rank - self.rem)
        }
    }

    /// The real rank of virtual rank `v`.
    pub fn real(&self, v: usize) -> usize {
        if v < self.rem {
            2 * v + 1
        } else {
            v + self.rem
        }
    }

    /// Round 0 when folding: the even ranks of the first `2 rem` send everything to the
    /// next odd rank, which reduces it.
    pub fn fold_in(&self, s: &mut Schedule, n: usize) {
        if self.rem == 0 {
            return;
        }
        let r = s.rank;
        if r < 2 * self.rem {
            if r.is_multiple_of(2) {
                s.send(r + 1, Buf::Out, 0..n);
            } else {
                s.recv_reduce(r - 1, Buf::Out, 0..n, Order::TheirsFirst);
            }
        }
        s.next_round();
    }

    /// The last round when folding: the odd ranks send the result back.
    pub fn fold_out(&self, s: &mut Schedule, n: usize) {
        if self.rem == 0 {
            return;
        }
        let r = s.rank;
        if r < 2 * self.rem {
            if r % 2 == 1 {
                s.send(r - 1, Buf::Out, 0..n);
            } else {
                s.recv(r + 1, Buf::Out, 0..n);
            }
        }
        s.next_round();
    }

    /// log2 of `p2`.
    pub fn levels(&self) -> u32 {
        self.p2.trailing_zeros()
    }
}

/// Rank `rank`'s schedule for `n` elements among `p` ranks, in place on [`Buf::Out`].
pub fn schedule(rank: usize, p: usize, n: usize) -> Schedule {
    let mut s = Schedule::new(rank, p);
    if p == 1 {
        return s;
    }
    let f = Fold::new(p);
    f.fold_in(&mut s, n);
    let levels = f.levels();
    match f.vrank(rank) {
        None => {
            for _ in 0..2 * levels {
                s.next_round();
            }
        }
        Some(v) => {
            // Reduce-scatter by recursive halving, nearest partner first (so that each step
            // combines adjacent groups of ranks): afterwards virtual rank v owns the slice
            // whose index is v's bits reversed.
            let (mut lo, mut hi) = (0, n);
            let mut ranges = Vec::with_capacity(levels as usize);
            let mut mask = 1;
            while mask < f.p2 {
                let partner = v ^ mask;
                let peer = f.real(partner);
                let mid = lo + (hi - lo) / 2;
                ranges.push((lo, hi));
                if v < partner {
                    s.send(peer, Buf::Out, mid..hi);
                    s.recv_reduce(peer, Buf::Out, lo..mid, Order::MineFirst);
                    hi = mid;
                } else {
                    s.send(peer, Buf::Out, lo..mid);
                    s.recv_reduce(peer, Buf::Out, mid..hi, Order::TheirsFirst);
                    lo = mid;
                }
                s.next_round();
                mask *= 2;
            }
            // All-gather by recursive doubling, retracing the halving backwards.
            let mut mask = f.p2 / 2;
            while mask > 0 {
                let partner = v ^ mask;
                let peer = f.real(partner);
                let (plo, phi) = ranges.pop().unwrap_or((0, n));
                s.send(peer, Buf::Out, lo..hi);
                if lo == plo {
                    s.recv(peer, Buf::Out, hi..phi);
                } else {
                    s.recv(peer, Buf::Out, plo..lo);
                }
                lo = plo;
                hi = phi;
                s.next_round();
                mask /= 2;
            }
        }
    }
    f.fold_out(&mut s, n);
    s
}
