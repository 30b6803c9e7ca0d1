//! Gather and scatter: binomial trees.
//!
//! Thakur, Rabenseifner and Gropp, "Optimization of Collective Communication Operations in
//! MPICH", IJHPCA 19(1), 2005, section 4 (binomial gather and scatter).
//!
//! Ranks are numbered relative to the root; the subtree of relative rank `rel > 0` is
//! `[rel, rel + lowbit(rel))` (clipped to `P`), the root's is everything. Each rank moves its
//! whole subtree's blocks in one step, so `⌈log2 P⌉` rounds instead of `P - 1` messages
//! at the root, and the root still receives (gather) or sends (scatter) each of the
//! `(P - 1) b` bytes once. Inner ranks stage their subtree in scratch memory; the root
//! reads and writes the caller's buffer directly. Because the root's buffer is in real rank
//! order, a subtree that wraps around the end of it travels as two messages (split at
//! relative rank `P - root`), on every hop, so that both ends cut it the same way.
//!
//! In place (MPI_IN_PLACE at the root): the root's own block is already in its place in
//! the full buffer and is not copied.

use std::ops::Range;

use super::schedule::{Buf, Schedule, ceil_log2};

fn lowbit(x: usize) -> usize {
    x & x.wrapping_neg()
}

/// The relative ranks `[a, c)` cut at the wrap point `s` of the root's buffer.
fn parts(a: usize, c: usize, s: usize) -> Vec<Range<usize>> {
    if a < s && s < c {
        vec![a..s, s..c]
    } else {
        std::iter::once(a..c).collect()
    }
}

/// Where relative blocks `r` live at relative rank `rel`.
struct Layout {
    p: usize,
    b: usize,
    root: usize,
    rel: usize,
    /// The buffer holding this rank's subtree: the root's full buffer, scratch, or the
    /// caller's single block.
    buf: Buf,
}

impl Layout {
    fn range(&self, r: &Range<usize>) -> Range<usize> {
        let (b, p) = (self.b, self.p);
        if self.rel == 0 {
            let start = (r.start + self.root) % p;
            start * b..(start + r.len()) * b
        } else {
            (r.start - self.rel) * b..(r.end - self.rel) * b
        }
    }
}

fn subtree(rel: usize, p: usize) -> usize {
    if rel == 0 {
        p
    } else {
        lowbit(rel).min(p - rel)
    }
}

/// Binomial gather of blocks of `b` elements to `root`.
pub fn gather(rank: usize, p: usize, b: usize, root: usize, in_place: bool) -> Schedule {
    let mut s = Schedule::new(rank, p);
    let rel = (rank + p - root) % p;
    let real = |r: usize| (r + root) % p;
    let size = subtree(rel, p);
    let buf = if rel == 0 {
        if !in_place {
            s.copy(Buf::In, 0..b, Buf::Out, root * b);
        }
        Buf::Out
    } else if size > 1 {
        s.tmp = size * b;
        s.copy(Buf::In, 0..b, Buf::Tmp, 0);
        Buf::Tmp
    } else {
        Buf::In
    };
    let lay = Layout {
        p,
        b,
        root,
        rel,
        buf,
    };
    let wrap = p - root;
    for k in 0..ceil_log2(p) {
        let mask = 1usize << k;
        if rel != 0 && lowbit(rel) == mask {
            for r in parts(rel, rel + size, wrap) {
                s.send(real(rel - mask), lay.buf, lay.range(&r));
            }
        } else if rel.is_multiple_of(2 * mask) && rel + mask < p {
            let child = rel + mask;
            for r in parts(child, child + subtree(child, p), wrap) {
                s.recv(real(child), lay.buf, lay.range(&r));
            }
        }
        s.next_round();
    }
    s
}

/// Binomial scatter of blocks of `b` elements from `root`.
pub fn scatter(rank: usize, p: usize, b: usize, root: usize, in_place: bool) -> Schedule {
    let mut s = Schedule::new(rank, p);
    let rel = (rank + p - root) % p;
    let real = |r: usize| (r + root) % p;
    let size = subtree(rel, p);
    let buf = if rel == 0 {
        if in_place { Buf::Out } else { Buf::In }
    } else if size > 1 {
        s.tmp = size * b;
        Buf::Tmp
    } else {
        Buf::Out
    };
    if rel == 0 && !in_place {
        s.copy(Buf::In, root * b..(root + 1) * b, Buf::Out, 0);
    }
    let lay = Layout {
        p,
        b,
        root,
        rel,
        buf,
    };
    let wrap = p - root;
    let levels = ceil_log2(p);
    for t in 0..levels {
        let mask = 1usize << (levels - 1 - t);
        if rel != 0 && buf == Buf::Tmp && lowbit(rel) == 2 * mask {
            // The round after this rank received its subtree: keep its own block.
            s.copy(Buf::Tmp, 0..b, Buf::Out, 0);
        }
        if rel.is_multiple_of(2 * mask) && rel + mask < p {
            let child = rel + mask;
            for r in parts(child, child + subtree(child, p), wrap) {
                s.send(real(child), lay.buf, lay.range(&r));
            }
        } else if rel != 0 && lowbit(rel) == mask {
            for r in parts(rel, rel + size, wrap) {
                s.recv(real(rel - mask), lay.buf, lay.range(&r));
            }
        }
        s.next_round();
    }
    s
}
