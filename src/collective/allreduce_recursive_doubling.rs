//! Recursive doubling all_reduce: the latency-optimal algorithm for small messages.
//!
//! Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in
//! MPICH", IJHPCA 19(1), 2005, section 4.4 (MPICH's choice for short messages).
//!
//! For a power of two `P`: in round `k` each rank exchanges its whole vector with the rank
//! whose number differs in bit `k` and reduces, the operand of the lower rank first. After
//! round `k` every rank of an aligned block of `2^(k+1)` ranks holds the same bytes (both
//! partners computed `lower ∘ upper` from equal inputs), so all ranks end bit-identical.
//! Other `P` fold onto the largest power of two below it as in
//! [`super::allreduce_halving_doubling`] (one round in, one round out).
//!
//! | | `P` a power of two | otherwise |
//! |---|---|---|
//! | rounds | `log2 P` | `log2 P' + 2` |
//! | bytes sent per rank | `n log2 P` | `n (log2 P' + 1)` |
//! | bytes reduced per rank | `n log2 P` | `n (log2 P' + 1)` |
//!
//! The fewest rounds of the three all_reduce algorithms, but every round carries the whole
//! vector: the choice for small messages.

use super::allreduce_halving_doubling::Fold;
use super::schedule::{Buf, Schedule};
use crate::element::Order;

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
            for _ in 0..levels {
                s.next_round();
            }
        }
        Some(v) => {
            let mut mask = 1;
            while mask < f.p2 {
                let partner = v ^ mask;
                let order = if partner < v {
                    Order::TheirsFirst
                } else {
                    Order::MineFirst
                };
                s.send(f.real(partner), Buf::Out, 0..n);
                s.recv_reduce(f.real(partner), Buf::Out, 0..n, order);
                s.next_round();
                mask *= 2;
            }
        }
    }
    f.fold_out(&mut s, n);
    s
}
