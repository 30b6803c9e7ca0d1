//! Reduce-scatter (equal blocks): a ring, or recursive halving for powers of two.
//!
//! Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in
//! MPICH", IJHPCA 19(1), 2005, section 4.5.
//!
//! The input holds `P` blocks of `b` elements; rank `r` ends with block `r` reduced over
//! every rank. Out of place, the input is first copied to scratch memory (the caller's
//! input is never modified) and the result copied out; in place, the work happens in the
//! caller's buffer and the result is left in block `r` of it.
//!
//! **Ring.** In round `k` rank `r` sends block `(r - k - 1) mod P` to `r + 1` and
//! receives block `(r - k - 2) mod P` from `r - 1`, reducing it (received partial first).
//! `P - 1` rounds, `(P - 1) b` bytes sent and reduced per rank, any `P`.
//!
//! **Recursive halving** (`P` a power of two). In round `k` a rank sends the half of its
//! current block range that its partner at distance `P / 2^(k+1)` keeps, and reduces the
//! half it keeps (lower rank's operand first). `log2 P` rounds, the same bytes.

use super::schedule::{Buf, Schedule};
use crate::element::Order;

fn work(s: &mut Schedule, p: usize, b: usize, in_place: bool) -> Buf {
    if in_place {
        Buf::Out
    } else {
        s.tmp = p * b;
        s.copy(Buf::In, 0..p * b, Buf::Tmp, 0);
        Buf::Tmp
    }
}

fn result(s: &mut Schedule, w: Buf, b: usize) {
    if w == Buf::Tmp {
        s.next_round();
        let r = s.rank;
        s.copy(Buf::Tmp, r * b..(r + 1) * b, Buf::Out, 0);
    }
}

/// Ring reduce-scatter of blocks of `b` elements.
pub fn ring(rank: usize, p: usize, b: usize, in_place: bool) -> Schedule {
    let mut s = Schedule::new(rank, p);
    let w = work(&mut s, p, b, in_place);
    let (right, left) = ((rank + 1) % p, (rank + p - 1) % p);
    let blk = |i: usize| (i % p) * b..(i % p + 1) * b;
    for k in 0..p.saturating_sub(1) {
        s.send(right, w, blk(rank + 2 * p - k - 1));
        s.recv_reduce(left, w, blk(rank + 2 * p - k - 2), Order::TheirsFirst);
        s.next_round();
    }
    result(&mut s, w, b);
    s
}

/// Recursive halving reduce-scatter of blocks of `b` elements; `p` must be a power of two.
pub fn recursive_halving(rank: usize, p: usize, b: usize, in_place: bool) -> Schedule {
    debug_assert!(p.is_power_of_two());
    let mut s = Schedule::new(rank, p);
    let w = work(&mut s, p, b, in_place);
    let (mut lo, mut hi) = (0, p);
    let mut mask = p / 2;
    while mask > 0 {
        let partner = rank ^ mask;
        let mid = (lo + hi) / 2;
        if rank < partner {
            s.send(partner, w, mid * b..hi * b);
            s.recv_reduce(partner, w, lo * b..mid * b, Order::MineFirst);
            hi = mid;
        } else {
            s.send(partner, w, lo * b..mid * b);
            s.recv_reduce(partner, w, mid * b..hi * b, Order::TheirsFirst);
            lo = mid;
        }
        s.next_round();
        mask /= 2;
    }
    result(&mut s, w, b);
    s
}
