//! Reduce to a root: a binomial tree for small messages, a ring reduce-scatter followed by a
//! gather for large ones.
//!
//! Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in
//! MPICH", IJHPCA 19(1), 2005, section 4.3 (binomial tree; Rabenseifner's reduce-scatter
//! followed by a gather for long messages).
//!
//! Ranks are numbered relative to the root. The root accumulates in its output; other
//! ranks that receive accumulate in scratch memory, so the caller's input is never
//! modified.
//!
//! **Binomial tree.** In round `k` a rank whose lowest set bit of `rel` is `2^k` sends its
//! partial result to `rel - 2^k`; a rank with `rel mod 2^(k+1) = 0` receives from
//! `rel + 2^k` (if it exists) and reduces, its own operand first. `⌈log2 P⌉` rounds of `n`
//! bytes.
//!
//! **Reduce-scatter + gather.** A ring reduce-scatter (`P - 1` rounds, `(P - 1)/P · n`
//! bytes per rank, see [`super::allreduce_ring`]) leaves segment `(r + 1) mod P` reduced at
//! rank `r`; in one more round every rank sends its segment to the root, which receives
//! them straight into place. `P` rounds; the root receives `(P - 1)/P · n` bytes in the last
//! one, every other rank sends about `n` bytes in all, instead of `n ⌈log2 P⌉` through
//! the root's subtree.

use super::allreduce_ring::reduce_scatter_rounds;
use super::schedule::{Buf, Schedule, block, ceil_log2};
use crate::element::Order;

/// Where the caller's contribution is: [`Buf::In`], or [`Buf::Out`] for the root of an
/// in-place reduce.
fn source(in_place: bool, rank: usize, root: usize) -> Buf {
    if in_place && rank == root {
        Buf::Out
    } else {
        Buf::In
    }
}

/// Binomial tree reduce of `n` elements to `root`.
pub fn binomial(rank: usize, p: usize, n: usize, root: usize, in_place: bool) -> Schedule {
    let mut s = Schedule::new(rank, p);
    let rel = (rank + p - root) % p;
    let real = |r: usize| (r + root) % p;
    let src = source(in_place, rank, root);
    let has_children = rel + 1 < p && (rel == 0 || rel.is_multiple_of(2));
    // The accumulator: the root's output, scratch for inner ranks, none for leaves.
    let acc = if rel == 0 {
        Buf::Out
    } else if has_children {
        s.tmp = n;
        Buf::Tmp
    } else {
        src
    };
    s.copy(src, 0..n, acc, 0);
    for k in 0..ceil_log2(p) {
        let mask = 1usize << k;
        if rel != 0 && rel & (2 * mask - 1) == mask {
            s.send(real(rel - mask), acc, 0..n);
        } else if rel.is_multiple_of(2 * mask) && rel + mask < p {
            s.recv_reduce(real(rel + mask), acc, 0..n, Order::MineFirst);
        }
        s.next_round();
    }
    s
}

/// Ring reduce-scatter, then every segment to `root`.
pub fn reduce_scatter_gather(
    rank: usize,
    p: usize,
    n: usize,
    root: usize,
    in_place: bool,
) -> Schedule {
    let mut s = Schedule::new(rank, p);
    let src = source(in_place, rank, root);
    let acc = if rank == root {
        Buf::Out
    } else {
        s.tmp = n;
        Buf::Tmp
    };
    s.copy(src, 0..n, acc, 0);
    if p == 1 {
        return s;
    }
    reduce_scatter_rounds(&mut s, acc, n, p);
    if rank == root {
        for q in (0..p).filter(|&q| q != root) {
            s.recv(q, Buf::Out, block(n, p, (q + 1) % p));
        }
    } else {
        s.send(root, acc, block(n, p, (rank + 1) % p));
    }
    s.next_round();
    s
}
