//! The alpha-beta cost of an algorithm, from its schedules, for any number of ranks.
//!
//! [`cost`] builds every rank's [`Schedule`] (the very schedules the executor runs) for `P`
//! ranks and `n` elements, moves no data, and measures them round by round:
//!
//! - `rounds`: rounds in which at least one message (even an empty one) is sent; each costs
//!   a latency `α`;
//! - `critical_bytes`: the sum over rounds of the most bytes any one rank sends or receives
//!   in that round, the bandwidth term `β` of a round-synchronous execution;
//! - `max_sent`: the most bytes any rank sends in the whole collective;
//! - `critical_reduced`: like `critical_bytes` for bytes combined by reductions (`γ`).
//!
//! - `agree_rounds`: the rounds of the agreement exchange the executor runs beside the data
//!   for the calls that need it (broadcast, reduce, gather, scatter, and every call with
//!   count 0 except barrier, on more than one rank; see [`crate::collective::exec`]):
//!   `⌈log2 P⌉` rounds of empty messages, each round's send waiting for the previous
//!   round's receive. Their messages are counted in `messages`.
//!
//! The model time is `max(rounds α + critical_bytes β + critical_reduced γ, agree_rounds α)`
//! (Thakur, Rabenseifner and Gropp 2005, section 3, plus the agreement): the executor posts
//! every agreement receive at the start and sends agreement messages as soon as the
//! previous round's arrives, independently of the data, and the call completes when both
//! are done. The empty agreement messages' share of the links is ignored. The model also
//! ignores what the executor adds on top of the data rounds (pieces of a ring step overlap
//! the next step), so for large messages it is an upper bound.
//!
//! Building the schedules also checks them: in every round, the messages sent and the
//! messages received must pair up (source, destination and size), or [`cost`] fails naming
//! the round. This is how the algorithms are checked at sizes far beyond the machines the
//! tests run on (`P` = 4096 in the tests).

use super::schedule::{Op, Schedule};
use super::select::Algorithm;

/// The cost of one algorithm for `P` ranks and `n` elements. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cost {
    /// The algorithm.
    pub algo: Algorithm,
    /// Ranks.
    pub ranks: usize,
    /// Bytes per element.
    pub elem: usize,
    /// The collective's count (see [`Algorithm::schedule`]).
    pub count: usize,
    /// Rounds with at least one message.
    pub rounds: u32,
    /// Sum over rounds of the most bytes one rank sends or receives in the round.
    pub critical_bytes: u64,
    /// Most bytes sent by one rank over the whole collective.
    pub max_sent: u64,
    /// Sum over rounds of the most bytes one rank reduces in the round.
    pub critical_reduced: u64,
    /// Messages sent by all ranks together, agreement messages included.
    pub messages: u64,
    /// Rounds of the agreement exchange run beside the data (0 when the call has none).
    pub agree_rounds: u32,
}

/// Machine parameters of the alpha-beta-gamma model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Model {
    /// Seconds per message (latency).
    pub alpha: f64,
    /// Seconds per byte moved (inverse bandwidth).
    pub beta: f64,
    /// Seconds per byte reduced.
    pub gamma: f64,
}

impl Cost {
    /// The model's time for this cost, in seconds.
    pub fn time(&self, m: &Model) -> f64 {
        let data = f64::from(self.rounds) * m.alpha
            + self.critical_bytes as f64 * m.beta
            + self.critical_reduced as f64 * m.gamma;
        data.max(f64::from(self.agree_rounds) * m.alpha)
    }
}

/// Rounds of the agreement exchange the executor adds to `algo`'s call among `p` ranks with
/// count `count` (mirrors `Call::agrees` and the executor's dissemination loop).
pub fn agree_rounds(algo: Algorithm, p: usize, count: usize) -> u32 {
    let rooted = matches!(
        algo.collective(),
        "broadcast" | "reduce" | "gather" | "scatter"
    );
    let zero = count == 0 && algo != Algorithm::BarrierDissemination;
    if p > 1 && (rooted || zero) {
        super::schedule::ceil_log2(p)
    } else {
        0
    }
}

fn mix(src: usize, dst: usize, len: usize) -> u64 {
    let mut x = (src as u64) ^ ((dst as u64) << 21) ^ ((len as u64) << 42) ^ (len as u64 >> 22);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Per-round totals over all ranks.
#[derive(Clone, Default)]
struct Round {
    any: bool,
    max_bytes: u64,
    max_reduced: u64,
    sends: u64,
    recvs: u64,
    n_sends: u64,
    n_recvs: u64,
}

/// The cost of `algo` for `p` ranks and `count` elements of `elem` bytes (root 0, out of
/// place). Fails, naming the round, if the schedules' messages do not pair up, or if the
/// algorithm does not support `p` ranks.
pub fn cost(algo: Algorithm, p: usize, count: usize, elem: usize) -> Result<Cost, String> {
    if p == 0 || !algo.supports(p) {
        return Err(format!("{algo} does not support {p} ranks"));
    }
    let mut rounds: Vec<Round> = Vec::new();
    let mut max_sent = 0u64;
    let mut messages = 0u64;
    for rank in 0..p {
        let s: Schedule = algo.schedule(rank, p, count, 0, false);
        let count_r = s.round_count() as usize;
        if rank == 0 {
            rounds = vec![Round::default(); count_r];
        } else if rounds.len() != count_r && !s.steps.is_empty() {
            return Err(format!(
                "rank {rank} has {count_r} rounds, rank 0 has {}",
                rounds.len()
            ));
        }
        let mut sent_total = 0u64;
        let (mut cur, mut sent, mut recvd, mut reduced) = (u32::MAX, 0u64, 0u64, 0u64);
        fn flush(rounds: &mut [Round], cur: u32, sent: u64, recvd: u64, reduced: u64) {
            if let Some(r) = rounds.get_mut(cur as usize) {
                r.max_bytes = r.max_bytes.max(sent.max(recvd));
                r.max_reduced = r.max_reduced.max(reduced);
            }
        }
        for st in &s.steps {
            if st.round != cur {
                flush(&mut rounds, cur, sent, recvd, reduced);
                (cur, sent, recvd, reduced) = (st.round, 0, 0, 0);
            }
            let Some(r) = rounds.get_mut(st.round as usize) else {
                return Err(format!(
                    "rank {rank}: a step in round {} of {}",
                    st.round,
                    rounds.len()
                ));
            };
            match &st.op {
                Op::Send { peer, range, .. } => {
                    let b = (range.len() * elem) as u64;
                    sent += b;
                    sent_total += b;
                    messages += 1;
                    r.any = true;
                    r.sends = r.sends.wrapping_add(mix(rank, *peer, range.len()));
                    r.n_sends += 1;
                }
                Op::Recv {
                    peer,
                    range,
                    reduce,
                    ..
                } => {
                    let b = (range.len() * elem) as u64;
                    recvd += b;
                    if reduce.is_some() {
                        reduced += b;
                    }
                    r.recvs = r.recvs.wrapping_add(mix(*peer, rank, range.len()));
                    r.n_recvs += 1;
                }
                Op::Copy { .. } => {}
            }
        }
        flush(&mut rounds, cur, sent, recvd, reduced);
        max_sent = max_sent.max(sent_total);
    }
    for (i, r) in rounds.iter().enumerate() {
        if r.sends != r.recvs || r.n_sends != r.n_recvs {
            return Err(format!(
                "{algo} with {p} ranks and {count} elements: in round {i}, {} messages are sent \
                 and {} received, and they do not pair up",
                r.n_sends, r.n_recvs
            ));
        }
    }
    let agree_rounds = agree_rounds(algo, p, count);
    messages += p as u64 * u64::from(agree_rounds);
    Ok(Cost {
        agree_rounds,
        algo,
        ranks: p,
        elem,
        count,
        rounds: rounds.iter().filter(|r| r.any).count() as u32,
        critical_bytes: rounds.iter().map(|r| r.max_bytes).sum(),
        max_sent,
        critical_reduced: rounds.iter().map(|r| r.max_reduced).sum(),
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log2(p: usize) -> u32 {
        p.trailing_zeros()
    }

    fn p2_below(p: usize) -> usize {
        1 << (usize::BITS - 1 - p.leading_zeros())
    }

    /// Ranks to test: small ones of every kind, and large powers of two and others.
    fn sizes() -> Vec<usize> {
        let mut v: Vec<usize> = (1..=17).collect();
        v.extend([
            31, 32, 33, 63, 64, 100, 127, 128, 255, 256, 1000, 1024, 4095, 4096,
        ]);
        v
    }

    #[test]
    fn ring_moves_2_p_minus_1_over_p_n_in_2_p_minus_1_rounds() {
        for p in sizes() {
            let n = p * 1000;
            let c = cost(Algorithm::AllReduceRing, p, n, 4).unwrap();
            let (p64, n64) = (p as u64, n as u64 * 4);
            assert_eq!(c.rounds, 2 * (p as u32 - 1), "P={p}");
            assert_eq!(c.max_sent, 2 * (p64 - 1) * n64 / p64, "P={p}");
            assert_eq!(c.critical_bytes, 2 * (p64 - 1) * n64 / p64, "P={p}");
            assert_eq!(c.critical_reduced, (p64 - 1) * n64 / p64, "P={p}");
            assert_eq!(c.messages, 2 * p64 * (p64 - 1), "P={p}");
        }
    }

    #[test]
    fn halving_doubling_takes_2_log2_p_rounds_for_powers_of_two() {
        for p in sizes() {
            let n = 4096 * 3;
            let c = cost(Algorithm::AllReduceHalvingDoubling, p, n, 8).unwrap();
            let n64 = n as u64 * 8;
            if p.is_power_of_two() {
                let p64 = p as u64;
                assert_eq!(c.rounds, 2 * log2(p), "P={p}");
                assert_eq!(c.max_sent, 2 * (p64 - 1) * n64 / p64, "P={p}");
                assert_eq!(c.critical_bytes, 2 * (p64 - 1) * n64 / p64, "P={p}");
            } else {
                // The fold: one round in, one out, each moving the whole vector.
                let q = p2_below(p) as u64;
                assert_eq!(c.rounds, 2 * log2(q as usize) + 2, "P={p}");
                assert_eq!(c.critical_bytes, 2 * n64 + 2 * (q - 1) * n64 / q, "P={p}");
                assert_eq!(c.max_sent, n64 + 2 * (q - 1) * n64 / q, "P={p}");
            }
        }
    }

    #[test]
    fn recursive_doubling_takes_log2_p_rounds_of_the_whole_vector() {
        for p in sizes() {
            let n = 1000;
            let c = cost(Algorithm::AllReduceRecursiveDoubling, p, n, 4).unwrap();
            let n64 = 4000u64;
            let q = p2_below(p);
            let extra = u32::from(!p.is_power_of_two()) * 2;
            assert_eq!(c.rounds, log2(q) + extra, "P={p}");
            assert_eq!(c.critical_bytes, n64 * u64::from(log2(q) + extra), "P={p}");
            assert_eq!(c.max_sent, n64 * u64::from(log2(q) + extra / 2), "P={p}");
        }
    }

    #[test]
    fn other_collectives_pair_up_and_match_their_closed_forms() {
        for p in sizes().into_iter().filter(|&p| p <= 1024) {
            let lg = super::super::schedule::ceil_log2(p);
            let (b, n) = (7usize, 7 * p);
            let bin = cost(Algorithm::BroadcastBinomial, p, n, 1).unwrap();
            assert_eq!(bin.rounds, lg, "P={p}");
            assert_eq!(bin.max_sent, (n as u64) * u64::from(lg), "P={p}");
            let sag = cost(Algorithm::BroadcastScatterAllGather, p, n, 1).unwrap();
            assert_eq!(
                sag.rounds,
                if p == 1 { 0 } else { lg + p as u32 - 1 },
                "P={p}"
            );
            let red = cost(Algorithm::ReduceBinomial, p, n, 1).unwrap();
            assert_eq!(red.rounds, lg, "P={p}");
            let rsg = cost(Algorithm::ReduceScatterGather, p, n, 1).unwrap();
            assert_eq!(rsg.rounds, p as u32 - 1 + u32::from(p > 1), "P={p}");
            let ag = cost(Algorithm::AllGatherRing, p, b, 1).unwrap();
            assert_eq!(
                (ag.rounds, ag.max_sent),
                (p as u32 - 1, ((p - 1) * b) as u64),
                "P={p}"
            );
            let rs = cost(Algorithm::ReduceScatterRing, p, b, 1).unwrap();
            assert_eq!(
                (rs.rounds, rs.max_sent),
                (p as u32 - 1, ((p - 1) * b) as u64),
                "P={p}"
            );
            if p.is_power_of_two() {
                let ag = cost(Algorithm::AllGatherRecursiveDoubling, p, b, 1).unwrap();
                assert_eq!(
                    (ag.rounds, ag.max_sent),
                    (lg, ((p - 1) * b) as u64),
                    "P={p}"
                );
                let rh = cost(Algorithm::ReduceScatterRecursiveHalving, p, b, 1).unwrap();
                assert_eq!(
                    (rh.rounds, rh.max_sent),
                    (lg, ((p - 1) * b) as u64),
                    "P={p}"
                );
            } else {
                assert!(cost(Algorithm::AllGatherRecursiveDoubling, p, b, 1).is_err());
            }
            let g = cost(Algorithm::GatherBinomial, p, b, 1).unwrap();
            assert_eq!(g.rounds, lg, "P={p}");
            let sc = cost(Algorithm::ScatterBinomial, p, b, 1).unwrap();
            assert_eq!(sc.rounds, lg, "P={p}");
            let bar = cost(Algorithm::BarrierDissemination, p, 0, 1).unwrap();
            assert_eq!((bar.rounds, bar.max_sent), (lg, u64::from(lg)), "P={p}");
            if p <= 256 {
                let a2a = cost(Algorithm::AllToAllPairwise, p, b, 1).unwrap();
                assert_eq!(a2a.max_sent, ((p - 1) * b) as u64, "P={p}");
                let want = if p.is_power_of_two() { p - 1 } else { p };
                assert_eq!(a2a.rounds, want as u32, "P={p}");
            }
        }
    }

    #[test]
    fn agreement_rounds_are_counted_and_overlap_the_data() {
        let m = Model {
            alpha: 1.0,
            beta: 0.0,
            gamma: 0.0,
        };
        for p in sizes().into_iter().filter(|&p| p <= 1024) {
            let lg = super::super::schedule::ceil_log2(p);
            let rooted = [
                Algorithm::BroadcastBinomial,
                Algorithm::BroadcastScatterAllGather,
                Algorithm::ReduceBinomial,
                Algorithm::ReduceScatterGather,
                Algorithm::GatherBinomial,
                Algorithm::ScatterBinomial,
            ];
            for a in rooted {
                for n in [0, 7 * p] {
                    let c = cost(a, p, n, 4).unwrap();
                    assert_eq!(c.agree_rounds, lg, "{a} P={p} n={n}");
                    let want = f64::from(c.rounds.max(lg));
                    assert_eq!(c.time(&m), want, "{a} P={p} n={n}");
                }
            }
            // The same schedule without agreement: only the agreement's messages differ.
            let g = cost(Algorithm::GatherBinomial, p, 3, 4).unwrap();
            let ag = cost(Algorithm::AllGatherRing, p, 3, 4).unwrap();
            assert_eq!(ag.agree_rounds, 0, "P={p}");
            let data_msgs = (0..p)
                .map(|r| {
                    Algorithm::GatherBinomial
                        .schedule(r, p, 3, 0, false)
                        .steps
                        .iter()
                        .filter(|s| matches!(s.op, Op::Send { .. }))
                        .count() as u64
                })
                .sum::<u64>();
            assert_eq!(g.messages, data_msgs + p as u64 * u64::from(lg), "P={p}");
            // Count 0: every collective but barrier agrees; all_reduce then has no data
            // rounds, and the agreement is the whole cost.
            for a in [Algorithm::AllReduceRing, Algorithm::AllToAllPairwise] {
                let c = cost(a, p, 0, 4).unwrap();
                assert_eq!(c.agree_rounds, lg, "{a} P={p}");
                assert!(c.time(&m) >= f64::from(lg), "{a} P={p}");
            }
            let bar = cost(Algorithm::BarrierDissemination, p, 0, 1).unwrap();
            assert_eq!(bar.agree_rounds, 0, "P={p}");
            assert_eq!(
                cost(Algorithm::AllReduceRing, p, 5 * p, 4)
                    .unwrap()
                    .agree_rounds,
                0
            );
        }
        // A single rank exchanges nothing.
        assert_eq!(
            cost(Algorithm::BroadcastBinomial, 1, 9, 4)
                .unwrap()
                .agree_rounds,
            0
        );
    }

    #[test]
    fn model_time_prefers_doubling_for_small_and_bandwidth_optimal_for_large() {
        let m = Model {
            alpha: 15e-6,
            beta: 1.0 / 3e9,
            gamma: 1.0 / 10e9,
        };
        let t = |a, n| cost(a, 8, n, 1).unwrap().time(&m);
        assert!(t(Algorithm::AllReduceRecursiveDoubling, 64) < t(Algorithm::AllReduceRing, 64));
        assert!(
            t(Algorithm::AllReduceHalvingDoubling, 64 << 20)
                < t(Algorithm::AllReduceRecursiveDoubling, 64 << 20)
        );
    }
}
