//! Schedules: what one rank does in a collective, as data.
//!
//! A [`Schedule`] is the list of [`Op`]s one rank performs, each tagged with the *round* it
//! belongs to: send a range of a buffer to a peer, receive a range from a peer (storing it, or
//! reducing it into what is there), or copy a range locally. Rounds are global: round `k` of
//! every rank's schedule is the same communication step of the algorithm (a rank may be idle
//! in a round), so a message sent in round `k` is received in round `k` of its peer.
//!
//! The same schedule is
//! - run for real by the executor ([`super::exec`]), which splits large transfers into pieces
//!   and overlaps them (see there), over any transport;
//! - run in memory by `simulate` (tests), which moves data round by round with no
//!   communicator at all;
//! - costed by [`super::cost`] for thousands of ranks without moving any data.
//!
//! Ranges are in elements. Within a round, a rank's ops are listed in the order the
//! executor must respect where they touch the same data: a send listed before a receive into
//! the same range sends the old contents (the receive is then staged in scratch memory),
//! and a copy listed before a send of its destination is done first. A receive must not be
//! followed in the same round by an op that reads or writes what it wrote
//! (`simulate` checks this).

use std::ops::Range;

use crate::element::Order;

/// Which buffer a range refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Buf {
    /// The caller's input (read only), for out-of-place collectives.
    In,
    /// The caller's output (or the one in-place buffer).
    Out,
    /// Scratch memory of [`Schedule::tmp`] elements, owned by the executor.
    Tmp,
}

/// One operation of a rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Send `buf[range]` to `peer`.
    Send {
        /// Communicator rank of the destination.
        peer: usize,
        /// Source buffer.
        buf: Buf,
        /// Elements sent.
        range: Range<usize>,
    },
    /// Receive `range.len()` elements from `peer` into `buf[range]`; with `reduce`, combine
    /// them with what `buf[range]` holds, in that operand order.
    Recv {
        /// Communicator rank of the source.
        peer: usize,
        /// Destination buffer.
        buf: Buf,
        /// Elements received.
        range: Range<usize>,
        /// `None`: store; `Some(order)`: reduce with the operand order.
        reduce: Option<Order>,
    },
    /// Copy `src[range]` to `dst[at..at + range.len()]`.
    Copy {
        /// Source buffer.
        src: Buf,
        /// Source elements.
        range: Range<usize>,
        /// Destination buffer.
        dst: Buf,
        /// First destination element.
        at: usize,
    },
}

/// An [`Op`] and its round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Communication round (global: the same on every rank).
    pub round: u32,
    /// What to do.
    pub op: Op,
}

/// What one rank does in a collective. Built round by round: the `send`/`recv`/`copy`
/// methods add to the current round, [`Schedule::next_round`] moves on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// This rank.
    pub rank: usize,
    /// Ranks in the collective.
    pub size: usize,
    /// Steps in execution order.
    pub steps: Vec<Step>,
    /// Rounds of the whole algorithm (the same on every rank).
    pub rounds: u32,
    /// Elements of scratch memory ([`Buf::Tmp`]) this rank needs.
    pub tmp: usize,
}

impl Schedule {
    /// An empty schedule for `rank` of `size`, in round 0.
    pub fn new(rank: usize, size: usize) -> Schedule {
        Schedule {
            rank,
            size,
            steps: Vec::new(),
            rounds: 0,
            tmp: 0,
        }
    }

    /// The round ops are added to now.
    pub fn round(&self) -> u32 {
        self.rounds
    }

    /// Rounds the schedule spans: the rounds ended with [`Schedule::next_round`], plus the
    /// current one if it has steps.
    pub fn round_count(&self) -> u32 {
        self.steps
            .last()
            .map_or(self.rounds, |s| self.rounds.max(s.round + 1))
    }

    /// Ends the current round: later ops go to the next one.
    pub fn next_round(&mut self) {
        self.rounds += 1;
    }

    fn push(&mut self, op: Op) {
        self.steps.push(Step {
            round: self.rounds,
            op,
        });
    }

    /// Adds a send of `buf[range]` to `peer` in the current round.
    pub fn send(&mut self, peer: usize, buf: Buf, range: Range<usize>) {
        self.push(Op::Send { peer, buf, range });
    }

    /// Adds a receive from `peer` into `buf[range]` (stored) in the current round.
    pub fn recv(&mut self, peer: usize, buf: Buf, range: Range<usize>) {
        self.push(Op::Recv {
            peer,
            buf,
            range,
            reduce: None,
        });
    }

    /// Adds a receive from `peer` reduced into `buf[range]` in the current round.
    pub fn recv_reduce(&mut self, peer: usize, buf: Buf, range: Range<usize>, order: Order) {
        self.push(Op::Recv {
            peer,
            buf,
            range,
            reduce: Some(order),
        });
    }

    /// Adds a local copy in the current round (skipped when empty or a no-op).
    pub fn copy(&mut self, src: Buf, range: Range<usize>, dst: Buf, at: usize) {
        if range.is_empty() || (src == dst && range.start == at) {
            return;
        }
        self.push(Op::Copy {
            src,
            range,
            dst,
            at,
        });
    }

    /// The out-of-place form of a schedule written in place on [`Buf::Out`] of `n`
    /// elements (which starts as a copy of the input): instead of copying the whole input
    /// into the output first, reads of output ranges not yet written go to [`Buf::In`], a
    /// range is copied only just before it is reduced into, and ranges that are only
    /// overwritten are never copied. For a ring or halving-doubling all_reduce that removes
    /// the up-front copy of the whole buffer (or, for the ranges a rank reduces, moves it
    /// next to the reduction, piece by piece, while the data is in cache).
    pub fn reading_input_first(self, n: usize) -> Schedule {
        // Output ranges still equal to the input (never written), sorted and disjoint.
        let mut fresh: Vec<Range<usize>> = Vec::new();
        if n > 0 {
            fresh.push(0..n);
        }
        let overlap = |fresh: &[Range<usize>], r: &Range<usize>| -> Vec<Range<usize>> {
            fresh
                .iter()
                .filter_map(|f| {
                    let (a, b) = (f.start.max(r.start), f.end.min(r.end));
                    (a < b).then_some(a..b)
                })
                .collect()
        };
        let covered = |fresh: &[Range<usize>], r: &Range<usize>| {
            fresh.iter().any(|f| f.start <= r.start && r.end <= f.end)
        };
        let remove = |fresh: &mut Vec<Range<usize>>, r: &Range<usize>| {
            let mut out = Vec::with_capacity(fresh.len() + 1);
            for f in fresh.drain(..) {
                if f.end <= r.start || r.end <= f.start {
                    out.push(f);
                    continue;
                }
                if f.start < r.start {
                    out.push(f.start..r.start);
                }
                if r.end < f.end {
                    out.push(r.end..f.end);
                }
            }
            *fresh = out;
        };
        let mut out = Schedule {
            steps: Vec::with_capacity(self.steps.len() + 4),
            ..self.clone()
        };
        // Copies In -> Out of the fresh parts of `r`, in `round`, which are then written.
        let materialise =
            |out: &mut Schedule, fresh: &mut Vec<Range<usize>>, r: &Range<usize>, round| {
                for part in overlap(fresh, r) {
                    remove(fresh, &part);
                    out.steps.push(Step {
                        round,
                        op: Op::Copy {
                            src: Buf::In,
                            at: part.start,
                            range: part,
                            dst: Buf::Out,
                        },
                    });
                }
            };
        for step in self.steps {
            let round = step.round;
            let op = match step.op {
                Op::Send {
                    peer,
                    buf: Buf::Out,
                    range,
                } if !range.is_empty() && covered(&fresh, &range) => Op::Send {
                    peer,
                    buf: Buf::In,
                    range,
                },
                Op::Send {
                    peer,
                    buf: Buf::Out,
                    range,
                } => {
                    materialise(&mut out, &mut fresh, &range, round);
                    Op::Send {
                        peer,
                        buf: Buf::Out,
                        range,
                    }
                }
                Op::Recv {
                    peer,
                    buf: Buf::Out,
                    range,
                    reduce,
                } => {
                    if reduce.is_some() {
                        materialise(&mut out, &mut fresh, &range, round);
                    } else {
                        remove(&mut fresh, &range);
                    }
                    Op::Recv {
                        peer,
                        buf: Buf::Out,
                        range,
                        reduce,
                    }
                }
                Op::Copy {
                    src,
                    range,
                    dst,
                    at,
                } => {
                    let src = if src == Buf::Out && !range.is_empty() && covered(&fresh, &range) {
                        Buf::In
                    } else {
                        if src == Buf::Out {
                            materialise(&mut out, &mut fresh, &range, round);
                        }
                        src
                    };
                    if dst == Buf::Out {
                        remove(&mut fresh, &(at..at + range.len()));
                    }
                    Op::Copy {
                        src,
                        range,
                        dst,
                        at,
                    }
                }
                other => other,
            };
            out.steps.push(Step { round, op });
        }
        // What was never touched is the input itself.
        let last = out.steps.last().map_or(0, |s| s.round);
        for part in fresh {
            out.steps.push(Step {
                round: last,
                op: Op::Copy {
                    src: Buf::In,
                    at: part.start,
                    range: part,
                    dst: Buf::Out,
                },
            });
        }
        out
    }

    /// Every distinct peer this rank exchanges messages with.
    pub fn peers(&self) -> Vec<usize> {
        let mut p: Vec<usize> = self
            .steps
            .iter()
            .filter_map(|s| match s.op {
                Op::Send { peer, .. } | Op::Recv { peer, .. } => Some(peer),
                Op::Copy { .. } => None,
            })
            .collect();
        p.sort_unstable();
        p.dedup();
        p
    }

    /// Checks that every range lies inside its buffer, given the buffers' lengths in
    /// elements. A failure is a bug in the algorithm, reported as text.
    pub fn check_bounds(&self, len_in: usize, len_out: usize) -> Result<(), String> {
        let len = |b: Buf| match b {
            Buf::In => len_in,
            Buf::Out => len_out,
            Buf::Tmp => self.tmp,
        };
        for s in &self.steps {
            let (b, r, extra) = match &s.op {
                Op::Send { buf, range, peer }
                | Op::Recv {
                    buf, range, peer, ..
                } => {
                    if *peer >= self.size || *peer == self.rank {
                        return Err(format!("round {}: bad peer {peer}", s.round));
                    }
                    (*buf, range.clone(), None)
                }
                Op::Copy {
                    src,
                    range,
                    dst,
                    at,
                } => (*src, range.clone(), Some((*dst, *at..*at + range.len()))),
            };
            for (b, r) in std::iter::once((b, r)).chain(extra) {
                if r.start > r.end || r.end > len(b) {
                    return Err(format!(
                        "round {}: range {r:?} outside {b:?} of {} elements",
                        s.round,
                        len(b)
                    ));
                }
            }
            if let Op::Recv { buf: Buf::In, .. } | Op::Copy { dst: Buf::In, .. } = s.op {
                return Err(format!("round {}: writes into the input", s.round));
            }
        }
        Ok(())
    }
}

/// The element range of block `i` when `n` elements are cut into `p` blocks as evenly as
/// possible (the first `n % p` blocks have one more element).
pub fn block(n: usize, p: usize, i: usize) -> Range<usize> {
    let (base, extra) = (n / p, n % p);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// The element range of blocks `a..b` (contiguous), cut as in [`block`].
pub fn blocks(n: usize, p: usize, a: usize, b: usize) -> Range<usize> {
    let start = if a >= p { n } else { block(n, p, a).start };
    if b <= a {
        start..start
    } else {
        start..block(n, p, b - 1).end
    }
}

/// Smallest `k` with `2^k >= p` (0 for `p <= 1`).
pub fn ceil_log2(p: usize) -> u32 {
    if p <= 1 {
        0
    } else {
        usize::BITS - (p - 1).leading_zeros()
    }
}

/// How `simulate` combines a received range into the accumulator.
#[cfg(test)]
pub type Combine<T> = dyn Fn(&mut [T], &[T], Order);

/// Runs every rank's schedule in memory, round by round, moving data between the ranks'
/// buffers as the communicator would (for tests of the algorithms without threads or
/// sockets). `reduce` combines a received range into the accumulator with an operand order.
///
/// Panics on a schedule bug: a message nobody receives, sizes that differ between sender
/// and receiver, a receive followed in its round by an op on the same data, or ranges
/// outside their buffers.
#[cfg(test)]
pub fn simulate<T: Copy + Default>(
    schedules: &[Schedule],
    inputs: &[Vec<T>],
    outputs: &mut [Vec<T>],
    reduce: &Combine<T>,
) {
    use std::collections::{HashMap, VecDeque};
    let p = schedules.len();
    let rounds = schedules
        .iter()
        .map(Schedule::round_count)
        .max()
        .unwrap_or(0);
    assert!(
        schedules
            .iter()
            .all(|s| s.round_count() == rounds || s.steps.is_empty()),
        "ranks disagree on the rounds"
    );
    let mut tmps: Vec<Vec<T>> = schedules
        .iter()
        .map(|s| vec![T::default(); s.tmp])
        .collect();
    let mut pos = vec![0usize; p];
    for round in 0..rounds {
        let mut wires: HashMap<(usize, usize), VecDeque<Vec<T>>> = HashMap::new();
        let mut deferred: Vec<Vec<Op>> = vec![Vec::new(); p];
        for r in 0..p {
            let s = &schedules[r];
            assert_eq!(s.rank, r);
            s.check_bounds(inputs[r].len(), outputs[r].len())
                .unwrap_or_else(|e| panic!("rank {r}: {e}"));
            let mut written: Vec<(Buf, Range<usize>)> = Vec::new();
            let overlaps = |w: &[(Buf, Range<usize>)], b: Buf, rg: &Range<usize>| {
                w.iter()
                    .any(|(wb, wr)| *wb == b && wr.start < rg.end && rg.start < wr.end)
            };
            while pos[r] < s.steps.len() && s.steps[pos[r]].round == round {
                let op = s.steps[pos[r]].op.clone();
                pos[r] += 1;
                match &op {
                    Op::Send { peer, buf, range } => {
                        assert!(
                            !overlaps(&written, *buf, range),
                            "rank {r} round {round}: send after receive of the same data"
                        );
                        let data = match buf {
                            Buf::In => inputs[r][range.clone()].to_vec(),
                            Buf::Out => outputs[r][range.clone()].to_vec(),
                            Buf::Tmp => tmps[r][range.clone()].to_vec(),
                        };
                        wires.entry((r, *peer)).or_default().push_back(data);
                    }
                    Op::Copy {
                        src,
                        range,
                        dst,
                        at,
                    } => {
                        let dr = *at..*at + range.len();
                        assert!(
                            !overlaps(&written, *src, range) && !overlaps(&written, *dst, &dr),
                            "rank {r} round {round}: copy after receive of the same data"
                        );
                        let data = match src {
                            Buf::In => inputs[r][range.clone()].to_vec(),
                            Buf::Out => outputs[r][range.clone()].to_vec(),
                            Buf::Tmp => tmps[r][range.clone()].to_vec(),
                        };
                        match dst {
                            Buf::In => panic!("copy into the input"),
                            Buf::Out => outputs[r][dr].copy_from_slice(&data),
                            Buf::Tmp => tmps[r][dr].copy_from_slice(&data),
                        }
                    }
                    Op::Recv { buf, range, .. } => {
                        assert!(
                            !overlaps(&written, *buf, range),
                            "rank {r} round {round}: two receives into the same data"
                        );
                        written.push((*buf, range.clone()));
                        deferred[r].push(op.clone());
                    }
                }
            }
        }
        for (r, ops) in deferred.into_iter().enumerate() {
            for op in ops {
                let Op::Recv {
                    peer,
                    buf,
                    range,
                    reduce: how,
                } = op
                else {
                    continue;
                };
                let data = wires
                    .get_mut(&(peer, r))
                    .and_then(|q| q.pop_front())
                    .unwrap_or_else(|| {
                        panic!("round {round}: rank {r} receives from {peer}, which sent nothing")
                    });
                assert_eq!(data.len(), range.len(), "round {round}: {peer} -> {r} size");
                let dst = match buf {
                    Buf::In => panic!("receive into the input"),
                    Buf::Out => &mut outputs[r][range],
                    Buf::Tmp => &mut tmps[r][range],
                };
                match how {
                    None => dst.copy_from_slice(&data),
                    Some(order) => reduce(dst, &data, order),
                }
            }
        }
        for ((from, to), q) in wires {
            assert!(
                q.is_empty(),
                "round {round}: {} message(s) from {from} to {to} not received",
                q.len()
            );
        }
    }
    for (r, s) in schedules.iter().enumerate() {
        assert_eq!(
            pos[r],
            s.steps.len(),
            "rank {r}: steps after the last round"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_everything_once() {
        for n in [0usize, 1, 5, 7, 64, 101] {
            for p in 1..=9 {
                let mut next = 0;
                for i in 0..p {
                    let b = block(n, p, i);
                    assert_eq!(b.start, next);
                    next = b.end;
                    assert!(b.len() == n / p || b.len() == n / p + 1);
                }
                assert_eq!(next, n);
                assert_eq!(blocks(n, p, 0, p), 0..n);
                if p >= 3 {
                    assert_eq!(blocks(n, p, 1, 3), block(n, p, 1).start..block(n, p, 2).end);
                }
                assert_eq!(blocks(n, p, p, p), n..n);
            }
        }
    }

    #[test]
    fn ceil_log2_values() {
        let want = [
            (0, 0),
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (8, 3),
            (9, 4),
            (4096, 12),
        ];
        for (p, k) in want {
            assert_eq!(ceil_log2(p), k, "{p}");
        }
    }
}
