//! All-gather: a ring, or recursive doubling for powers of two.
//!
//! Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in
//! MPICH", IJHPCA 19(1), 2005, section 4.2.
//!
//! Each rank contributes a block of `b` elements; the output holds the `P` blocks in rank
//! order (`n = P b`). In place, each rank's block is already at its place in the output.
//!
//! **Ring.** In round `k` rank `r` sends block `(r - k) mod P` to `r + 1` and receives
//! block `(r - k - 1) mod P` from `r - 1`. `P - 1` rounds, `(P - 1) b` bytes sent per rank
//! (the lower bound), any `P`.
//!
//! **Recursive doubling** (`P` a power of two). In round `k` a rank exchanges the `2^k`
//! blocks of its aligned group with the rank whose number differs in bit `k`. `log2 P`
//! rounds, the same `(P - 1) b` bytes.

use super::schedule::{Buf, Schedule};

fn own_block(s: &mut Schedule, b: usize, in_place: bool) {
    if !in_place {
        s.copy(Buf::In, 0..b, Buf::Out, s.rank * b);
    }
}

/// Ring all-gather of blocks of `b` elements.
pub fn ring(rank: usize, p: usize, b: usize, in_place: bool) -> Schedule {
    let mut s = Schedule::new(rank, p);
    own_block(&mut s, b, in_place);
    let (right, left) = ((rank + 1) % p, (rank + p - 1) % p);
    let blk = |i: usize| (i % p) * b..(i % p + 1) * b;
    for k in 0..p.saturating_sub(1) {
        s.send(right, Buf::Out, blk(rank + p - k));
        s.recv(left, Buf::Out, blk(rank + 2 * p - k - 1));
        s.next_round();
    }
    s
}

/// Recursive doubling all-gather of blocks of `b` elements; `p` must be a power of two.
pub fn recursive_doubling(rank: usize, p: usize, b: usize, in_place: bool) -> Schedule {
    debug_assert!(p.is_power_of_two());
    let mut s = Schedule::new(rank, p);
    own_block(&mut s, b, in_place);
    let mut mask = 1;
    while mask < p {
        let partner = rank ^ mask;
        let mine = rank & !(mask - 1);
        let theirs = partner & !(mask - 1);
        s.send(partner, Buf::Out, mine * b..(mine + mask) * b);
        s.recv(partner, Buf::Out, theirs * b..(theirs + mask) * b);
        s.next_round();
        mask *= 2;
    }
    s
}
