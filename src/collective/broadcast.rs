//! Broadcast: a binomial tree for small messages, scatter then all-gather for large ones.
//!
//! Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in
//! MPICH", IJHPCA 19(1), 2005, section 4.1 (binomial tree; scatter followed by a ring
//! all-gather, after Barnett et al. and van de Geijn).
//!
//! Ranks are numbered relative to the root (`rel = (rank - root) mod P`).
//!
//! **Binomial tree.** In round `k` every rank with `rel < 2^k` that has the data sends it
//! to `rel + 2^k`. `⌈log2 P⌉` rounds; the root sends `n` bytes `⌈log2 P⌉` times. With the
//! executor's pieces, an inner rank forwards each piece as soon as it has it, so large
//! messages pipeline down the tree.
//!
//! **Scatter + all-gather.** The `n` elements are cut into `P` blocks (block `i` for
//! relative rank `i`); a binomial scatter (top down: in round `t` a rank holding blocks
//! `[rel, rel + 2m)`, `m = 2^(⌈log2 P⌉ - 1 - t)`, sends `[rel + m, rel + 2m)` to `rel + m`)
//! leaves block `rel` at every rank, then a ring all-gather completes every copy.
//! `⌈log2 P⌉ + P - 1` rounds; at most `n` bytes sent by the root and about
//! `2 (P - 1) / P · n` by any rank on the critical path, instead of `n ⌈log2 P⌉`.
//!
//! Both work for any `P`.

use super::schedule::{Buf, Schedule, block, blocks, ceil_log2};

/// Binomial tree broadcast of `n` elements of [`Buf::Out`] from `root`.
pub fn binomial(rank: usize, p: usize, n: usize, root: usize) -> Schedule {
    let mut s = Schedule::new(rank, p);
    let rel = (rank + p - root) % p;
    let real = |r: usize| (r + root) % p;
    for k in 0..ceil_log2(p) {
        let mask = 1usize << k;
        if rel < mask && rel + mask < p {
            s.send(real(rel + mask), Buf::Out, 0..n);
        } else if rel >= mask && rel < 2 * mask {
            s.recv(real(rel - mask), Buf::Out, 0..n);
        }
        s.next_round();
    }
    s
}

/// Binomial scatter then ring all-gather broadcast of `n` elements of [`Buf::Out`] from
/// `root`.
pub fn scatter_all_gather(rank: usize, p: usize, n: usize, root: usize) -> Schedule {
    let mut s = Schedule::new(rank, p);
    if p == 1 {
        return s;
    }
    let rel = (rank + p - root) % p;
    let real = |r: usize| (r + root) % p;
    let levels = ceil_log2(p);
    for t in 0..levels {
        let mask = 1usize << (levels - 1 - t);
        if rel.is_multiple_of(2 * mask) && rel + mask < p {
            let to = rel + mask;
            s.send(
                real(to),
                Buf::Out,
                blocks(n, p, to, (rel + 2 * mask).min(p)),
            );
        } else if rel % (2 * mask) == mask {
            s.recv(
                real(rel - mask),
                Buf::Out,
                blocks(n, p, rel, (rel + mask).min(p)),
            );
        }
        s.next_round();
    }
    let (right, left) = (real(rel + 1), real(rel + p - 1));
    for k in 0..p - 1 {
        s.send(right, Buf::Out, block(n, p, (rel + p - k) % p));
        s.recv(left, Buf::Out, block(n, p, (rel + 2 * p - k - 1) % p));
        s.next_round();
    }
    s
}
