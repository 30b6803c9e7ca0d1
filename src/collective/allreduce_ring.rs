//! Ring all_reduce: a reduce-scatter around the ring, then an all-gather around it.
//!
//! Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms for clusters of
//! workstations", JPDC 69(2), 2009; the same scheme as Gloo's `allreduce_ring.h` and
//! NCCL's ring.
//!
//! The `n` elements are cut into `P` segments (as evenly as possible). In round
//! `k = 0..P-1` of the reduce-scatter, rank `r` sends segment `(r - k) mod P` to `r + 1`
//! and receives segment `(r - k - 1) mod P` from `r - 1`, reducing it into its own copy
//! (received partial first). After `P - 1` rounds rank `r` holds segment `(r + 1) mod P`
//! fully reduced. In the all-gather rounds `k = 0..P-1` it sends segment
//! `(r + 1 - k) mod P` and stores segment `(r - k) mod P`, so every rank ends with the
//! exact bytes its owner computed: results are bit-identical on every rank.
//!
//! | | |
//! |---|---|
//! | rounds | `2(P - 1)` |
//! | bytes sent per rank | `2 (P - 1) / P · n` (the lower bound for all_reduce) |
//! | bytes reduced per rank | `(P - 1) / P · n` |
//! | any `P` | yes, nothing special for non-powers of two |
//!
//! Every round is one message to the right neighbour and one from the left one, so each
//! link carries data in both directions at once; the executor cuts segments into pieces
//! and starts sending a piece of round `k + 1` as soon as round `k` has reduced it, which
//! pipelines large messages through the ring. Latency grows linearly with `P`: it is the
//! algorithm for large messages.

use super::schedule::{Buf, Schedule, block};
use crate::element::Order;

/// Rank `rank`'s schedule for `n` elements among `p` ranks, in place on [`Buf::Out`].
pub fn schedule(rank: usize, p: usize, n: usize) -> Schedule {
    let mut s = Schedule::new(rank, p);
    if p == 1 {
        return s;
    }
    reduce_scatter_rounds(&mut s, Buf::Out, n, p);
    all_gather_rounds(&mut s, Buf::Out, n, p);
    s
}

/// The reduce-scatter half on `buf`: afterwards rank `r` owns segment `(r + 1) mod p`.
pub(crate) fn reduce_scatter_rounds(s: &mut Schedule, buf: Buf, n: usize, p: usize) {
    let rank = s.rank;
    let (right, left) = ((rank + 1) % p, (rank + p - 1) % p);
    let seg = |i: usize| block(n, p, i % p);
    for k in 0..p - 1 {
        s.send(right, buf, seg(rank + p - k));
        s.recv_reduce(left, buf, seg(rank + 2 * p - k - 1), Order::TheirsFirst);
        s.next_round();
    }
}

/// The all-gather half on `buf`: rank `r` starts owning segment `(r + 1) mod p`.
pub(crate) fn all_gather_rounds(s: &mut Schedule, buf: Buf, n: usize, p: usize) {
    let rank = s.rank;
    let (right, left) = ((rank + 1) % p, (rank + p - 1) % p);
    let seg = |i: usize| block(n, p, i % p);
    for k in 0..p - 1 {
        s.send(right, buf, seg(rank + 1 + p - k));
        s.recv(left, buf, seg(rank + p - k));
        s.next_round();
    }
}
