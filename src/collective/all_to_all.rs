//! All-to-all (equal blocks): pairwise exchange.
//!
//! Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in
//! MPICH", IJHPCA 19(1), 2005, section 4.6 (pairwise exchange).
//!
//! Block `j` of rank `i`'s input ends as block `i` of rank `j`'s output. Each round pairs
//! every rank with one partner and the two swap the blocks meant for each other: for a
//! power of two `P`, round `k = 1..P` pairs `r` with `r XOR k` (`P - 1` rounds); otherwise
//! round `k = 0..P` pairs `r` with `(k - r) mod P` (`P` rounds, a rank paired with itself
//! sits the round out), which meets every pair exactly once. `(P - 1) b` bytes sent per
//! rank; one message in each direction per round, so both directions of each link are
//! used.
//!
//! In place the block sent to a partner and the block received from it occupy the same
//! place: the executor receives into scratch and copies once the send is done.

use super::schedule::{Buf, Schedule};

/// Pairwise all-to-all of blocks of `b` elements.
pub fn pairwise(rank: usize, p: usize, b: usize, in_place: bool) -> Schedule {
    let mut s = Schedule::new(rank, p);
    let src = if in_place { Buf::Out } else { Buf::In };
    let blk = |i: usize| i * b..(i + 1) * b;
    s.copy(src, blk(rank), Buf::Out, rank * b);
    let rounds = if p.is_power_of_two() { 1..p } else { 0..p };
    for k in rounds {
        let partner = if p.is_power_of_two() {
            rank ^ k
        } else {
            (k + p - rank) % p
        };
        if partner != rank {
            s.send(partner, src, blk(partner));
            s.recv(partner, Buf::Out, blk(partner));
        }
        s.next_round();
    }
    s
}
