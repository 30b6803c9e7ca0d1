//! Barrier: dissemination.
//!
//! Hensgen, Finkel and Manber, "Two algorithms for barrier synchronization", IJPP 17(1),
//! 1988. In round `k` each rank signals `rank + 2^k` and waits for `rank - 2^k`
//! (modulo `P`): `⌈log2 P⌉` rounds of one-byte messages, any `P`.
//!
//! A rank may only signal in round `k + 1` after it heard in round `k` (that is what makes
//! the last round's signal mean "everybody has entered"). The executor orders operations by
//! the data they touch, so the signal is a one-byte token in scratch memory: round `k`
//! receives it into the byte that round `k + 1` sends.

use super::schedule::{Buf, Schedule, ceil_log2};

/// Dissemination barrier.
pub fn dissemination(rank: usize, p: usize) -> Schedule {
    let mut s = Schedule::new(rank, p);
    if p > 1 {
        s.tmp = 1;
    }
    for k in 0..ceil_log2(p) {
        let d = 1usize << k;
        s.send((rank + d) % p, Buf::Tmp, 0..1);
        s.recv((rank + p - d % p) % p, Buf::Tmp, 0..1);
        s.next_round();
    }
    s
}
