//! Barrier: dissemination.
//!
//! Hensgen, Finkel and Manber, "Two algorithms for barrier synchronization", IJPP 17(1),
//! 1988. In round `k` each rank signals `rank + 2^k` and waits for `rank - 2^k`
//! (modulo `P`): `⌈log2 P⌉` rounds of empty messages, any `P`.

use super::schedule::{Buf, Schedule, ceil_log2};

/// Dissemination barrier.
pub fn dissemination(rank: usize, p: usize) -> Schedule {
    let mut s = Schedule::new(rank, p);
    for k in 0..ceil_log2(p) {
        let d = 1usize << k;
        s.send((rank + d) % p, Buf::Out, 0..0);
        s.recv((rank + p - d % p) % p, Buf::Out, 0..0);
        s.next_round();
    }
    s
}
