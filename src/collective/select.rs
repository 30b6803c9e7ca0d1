//! The algorithms, their names and codes, and the automatic choice between them.
//!
//! # all_reduce
//!
//! With `n` the message size in bytes and `P` the number of ranks ([`choose_all_reduce`]):
//!
//! | condition | algorithm | why |
//! |---|---|---|
//! | `n <= 64 KiB` (2 ranks: `n <= 256 KiB`), or fewer elements than ranks | recursive doubling | fewest rounds (`log2 P`); the bytes do not matter yet |
//! | `P` a power of two | halving-doubling | `2 log2 P` rounds for the optimal `2 (P-1)/P · n` bytes |
//! | otherwise | halving-doubling or ring, whichever the alpha-beta model ([`MODEL`]) finds faster | the fold costs `2n` more bytes, the ring `2(P - 1) - 2 log2 P'` more rounds |
//!
//! The last rule picks the ring for 3 ranks from 64 KiB, for 6 ranks from about 64 KiB,
//! for 100 ranks from about 2.5 MiB, and for 4095 ranks only above 100 MiB (8188 rounds
//! cost more than the fold's bytes). The model's figures are TCP between processes of one
//! host; the 64 KiB threshold was measured on a 2-core machine with 2-4 ranks over TCP
//! (`benches/collectives.rs`): recursive doubling was as fast as the others up to 64 KiB
//! (its messages stay under TCP's eager limit) and halving-doubling ahead from 256 KiB.
//! With 2 ranks the two move the same bytes (recursive doubling one exchange of `n`,
//! halving-doubling two of `n/2`) and recursive doubling saves a round: measured with
//! `ferrocomm-bench allreduce --algo` over TCP loopback (2 ranks, one core each), it was
//! 15-25 % faster from 16 KiB to 256 KiB, even at 512 KiB-1 MiB and behind from 2 MiB
//! ([`RD_MAX_BYTES_TWO`]).
//! `FERROCOMM_ALLREDUCE_ALGO=ring|rhd|rd|auto` overrides the choice for a process, and
//! [`AllReduceOptions`] for a call. Every rank must choose the same algorithm: the choice is
//! part of each message's fingerprint, so ranks that disagree get
//! [`Error::CollectiveMismatch`](crate::Error::CollectiveMismatch) rather than a hang.
//!
//! # The other collectives
//!
//! | collective | small | large (`n` total bytes) |
//! |---|---|---|
//! | broadcast | binomial tree | scatter + ring all-gather when `n >= 512 KiB` and `P >= 3` |
//! | reduce | binomial tree | ring reduce-scatter + gather when `n >= 512 KiB` and `P >= 3` |
//! | all_gather | recursive doubling (`P` a power of two) | ring when `n >= 1 MiB` or `P` is not a power of two |
//! | reduce_scatter | recursive halving (`P` a power of two) | ring when `n >= 1 MiB` or `P` is not a power of two |
//! | gather, scatter | binomial tree | binomial tree |
//! | all_to_all | pairwise exchange | pairwise exchange |
//! | barrier | dissemination | |

use super::allreduce_halving_doubling::Fold;
use super::cost::Model;
use super::schedule::Schedule;
use super::{
    all_gather, all_to_all, allreduce_halving_doubling, allreduce_recursive_doubling,
    allreduce_ring, barrier, broadcast, gather_scatter, reduce, reduce_scatter,
};
use crate::config;
use crate::error::Result;

/// Every collective algorithm of ferrocomm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// all_reduce: ring ([`super::allreduce_ring`]).
    AllReduceRing,
    /// all_reduce: recursive halving-doubling ([`super::allreduce_halving_doubling`]).
    AllReduceHalvingDoubling,
    /// all_reduce: recursive doubling ([`super::allreduce_recursive_doubling`]).
    AllReduceRecursiveDoubling,
    /// broadcast: binomial tree ([`super::broadcast`]).
    BroadcastBinomial,
    /// broadcast: binomial scatter then ring all-gather ([`super::broadcast`]).
    BroadcastScatterAllGather,
    /// reduce: binomial tree ([`super::reduce`]).
    ReduceBinomial,
    /// reduce: ring reduce-scatter then gather to the root ([`super::reduce`]).
    ReduceScatterGather,
    /// all_gather: ring ([`super::all_gather`]).
    AllGatherRing,
    /// all_gather: recursive doubling, powers of two ([`super::all_gather`]).
    AllGatherRecursiveDoubling,
    /// reduce_scatter: ring ([`super::reduce_scatter`]).
    ReduceScatterRing,
    /// reduce_scatter: recursive halving, powers of two ([`super::reduce_scatter`]).
    ReduceScatterRecursiveHalving,
    /// gather: binomial tree ([`super::gather_scatter`]).
    GatherBinomial,
    /// scatter: binomial tree ([`super::gather_scatter`]).
    ScatterBinomial,
    /// all_to_all: pairwise exchange ([`super::all_to_all`]).
    AllToAllPairwise,
    /// barrier: dissemination ([`super::barrier`]).
    BarrierDissemination,
}

impl Algorithm {
    /// Every algorithm, in code order.
    pub const ALL: [Algorithm; 15] = [
        Algorithm::AllReduceRing,
        Algorithm::AllReduceHalvingDoubling,
        Algorithm::AllReduceRecursiveDoubling,
        Algorithm::BroadcastBinomial,
        Algorithm::BroadcastScatterAllGather,
        Algorithm::ReduceBinomial,
        Algorithm::ReduceScatterGather,
        Algorithm::AllGatherRing,
        Algorithm::AllGatherRecursiveDoubling,
        Algorithm::ReduceScatterRing,
        Algorithm::ReduceScatterRecursiveHalving,
        Algorithm::GatherBinomial,
        Algorithm::ScatterBinomial,
        Algorithm::AllToAllPairwise,
        Algorithm::BarrierDissemination,
    ];

    /// Short name of the algorithm within its collective (`ring`, `rhd`, `binomial`...).
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::AllReduceRing | Algorithm::AllGatherRing | Algorithm::ReduceScatterRing => {
                "ring"
            }
            Algorithm::AllReduceHalvingDoubling => "rhd",
            Algorithm::AllReduceRecursiveDoubling | Algorithm::AllGatherRecursiveDoubling => "rd",
            Algorithm::BroadcastBinomial
            | Algorithm::ReduceBinomial
            | Algorithm::GatherBinomial
            | Algorithm::ScatterBinomial => "binomial",
            Algorithm::BroadcastScatterAllGather => "scatter_allgather",
            Algorithm::ReduceScatterGather => "reduce_scatter_gather",
            Algorithm::ReduceScatterRecursiveHalving => "rh",
            Algorithm::AllToAllPairwise => "pairwise",
            Algorithm::BarrierDissemination => "dissemination",
        }
    }

    /// The collective the algorithm implements (`all_reduce`, `broadcast`...).
    pub const fn collective(self) -> &'static str {
        match self {
            Algorithm::AllReduceRing
            | Algorithm::AllReduceHalvingDoubling
            | Algorithm::AllReduceRecursiveDoubling => "all_reduce",
            Algorithm::BroadcastBinomial | Algorithm::BroadcastScatterAllGather => "broadcast",
            Algorithm::ReduceBinomial | Algorithm::ReduceScatterGather => "reduce",
            Algorithm::AllGatherRing | Algorithm::AllGatherRecursiveDoubling => "all_gather",
            Algorithm::ReduceScatterRing | Algorithm::ReduceScatterRecursiveHalving => {
                "reduce_scatter"
            }
            Algorithm::GatherBinomial => "gather",
            Algorithm::ScatterBinomial => "scatter",
            Algorithm::AllToAllPairwise => "all_to_all",
            Algorithm::BarrierDissemination => "barrier",
        }
    }

    /// The code carried in each message's fingerprint (1-based).
    pub(crate) fn code(self) -> u8 {
        Algorithm::ALL
            .iter()
            .position(|&a| a == self)
            .map_or(0, |i| i as u8 + 1)
    }

    /// The algorithm with fingerprint code `code`.
    pub(crate) fn from_code(code: u8) -> Option<Algorithm> {
        Algorithm::ALL
            .get(usize::from(code).checked_sub(1)?)
            .copied()
    }

    /// Whether the algorithm works for `p` ranks (some need a power of two).
    pub fn supports(self, p: usize) -> bool {
        match self {
            Algorithm::AllGatherRecursiveDoubling | Algorithm::ReduceScatterRecursiveHalving => {
                p.is_power_of_two()
            }
            _ => p >= 1,
        }
    }

    /// Rank `rank`'s schedule among `p` ranks. `count` is the collective's count: all
    /// elements for all_reduce, broadcast and reduce; elements per rank's block for
    /// all_gather, reduce_scatter, gather, scatter and all_to_all; ignored for barrier.
    /// `root` matters for rooted collectives; `in_place` selects the MPI_IN_PLACE layout
    /// (see each collective). The caller checks [`Algorithm::supports`].
    pub fn schedule(
        self,
        rank: usize,
        p: usize,
        count: usize,
        root: usize,
        in_place: bool,
    ) -> Schedule {
        // all_reduce: in place on the output; out of place, the same schedule reading the
        // input where the output still equals it.
        let all_reduce = |s: Schedule| {
            if in_place {
                s
            } else {
                s.reading_input_first(count)
            }
        };
        match self {
            Algorithm::AllReduceRing => all_reduce(allreduce_ring::schedule(rank, p, count)),
            Algorithm::AllReduceHalvingDoubling => {
                all_reduce(allreduce_halving_doubling::schedule(rank, p, count))
            }
            Algorithm::AllReduceRecursiveDoubling => {
                all_reduce(allreduce_recursive_doubling::schedule(rank, p, count))
            }
            Algorithm::BroadcastBinomial => broadcast::binomial(rank, p, count, root),
            Algorithm::BroadcastScatterAllGather => {
                broadcast::scatter_all_gather(rank, p, count, root)
            }
            Algorithm::ReduceBinomial => reduce::binomial(rank, p, count, root, in_place),
            Algorithm::ReduceScatterGather => {
                reduce::reduce_scatter_gather(rank, p, count, root, in_place)
            }
            Algorithm::AllGatherRing => all_gather::ring(rank, p, count, in_place),
            Algorithm::AllGatherRecursiveDoubling => {
                all_gather::recursive_doubling(rank, p, count, in_place)
            }
            Algorithm::ReduceScatterRing => reduce_scatter::ring(rank, p, count, in_place),
            Algorithm::ReduceScatterRecursiveHalving => {
                reduce_scatter::recursive_halving(rank, p, count, in_place)
            }
            Algorithm::GatherBinomial => gather_scatter::gather(rank, p, count, root, in_place),
            Algorithm::ScatterBinomial => gather_scatter::scatter(rank, p, count, root, in_place),
            Algorithm::AllToAllPairwise => all_to_all::pairwise(rank, p, count, in_place),
            Algorithm::BarrierDissemination => barrier::dissemination(rank, p),
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.collective(), self.name())
    }
}

/// Which all_reduce algorithm to use. See the module documentation for what `Auto` picks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum AllReduceAlgo {
    /// Chosen by message size and world size (the default).
    #[default]
    Auto,
    /// Ring: reduce-scatter then all-gather.
    Ring,
    /// Recursive halving-doubling (Rabenseifner).
    HalvingDoubling,
    /// Recursive doubling.
    RecursiveDoubling,
}

impl AllReduceAlgo {
    /// Every choice.
    pub const ALL: [AllReduceAlgo; 4] = [
        AllReduceAlgo::Auto,
        AllReduceAlgo::Ring,
        AllReduceAlgo::HalvingDoubling,
        AllReduceAlgo::RecursiveDoubling,
    ];

    /// The name accepted by `FERROCOMM_ALLREDUCE_ALGO`: `auto`, `ring`, `rhd`, `rd`.
    pub const fn name(self) -> &'static str {
        match self {
            AllReduceAlgo::Auto => "auto",
            AllReduceAlgo::Ring => "ring",
            AllReduceAlgo::HalvingDoubling => "rhd",
            AllReduceAlgo::RecursiveDoubling => "rd",
        }
    }

    /// Parses a name as printed by [`AllReduceAlgo::name`] (case-insensitive).
    pub fn from_name(name: &str) -> Option<AllReduceAlgo> {
        let name = name.trim().to_ascii_lowercase();
        AllReduceAlgo::ALL
            .iter()
            .copied()
            .find(|a| a.name() == name)
    }

    /// `FERROCOMM_ALLREDUCE_ALGO` from `lookup` (unset: `Auto`).
    pub(crate) fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<AllReduceAlgo> {
        config::parse_var(
            lookup,
            "FERROCOMM_ALLREDUCE_ALGO",
            "one of: auto, ring, rhd, rd",
            AllReduceAlgo::from_name,
        )
        .map(Option::unwrap_or_default)
    }

    /// The algorithm this choice means for `p` ranks and `count` elements of `bytes` bytes.
    pub fn resolve(self, p: usize, count: usize, bytes: usize) -> Algorithm {
        match self {
            AllReduceAlgo::Auto => choose_all_reduce(p, count, bytes),
            AllReduceAlgo::Ring => Algorithm::AllReduceRing,
            AllReduceAlgo::HalvingDoubling => Algorithm::AllReduceHalvingDoubling,
            AllReduceAlgo::RecursiveDoubling => Algorithm::AllReduceRecursiveDoubling,
        }
    }
}

impl std::fmt::Display for AllReduceAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Options of [`Communicator::all_reduce_with`](crate::Communicator::all_reduce_with).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AllReduceOptions {
    /// The algorithm. `Auto` (the default) defers to `FERROCOMM_ALLREDUCE_ALGO` when it is
    /// set, and to [`choose_all_reduce`] otherwise; anything else is used as given.
    pub algo: AllReduceAlgo,
}

impl AllReduceOptions {
    /// Options that use `algo`.
    pub fn algo(algo: AllReduceAlgo) -> AllReduceOptions {
        AllReduceOptions { algo }
    }
}

/// Messages up to this many bytes use recursive doubling.
pub const RD_MAX_BYTES: usize = 64 << 10;
/// With 2 ranks, messages up to this many bytes use recursive doubling (see the module
/// documentation).
pub const RD_MAX_BYTES_TWO: usize = 256 << 10;

/// The machine model the automatic all_reduce choice uses between halving-doubling and the
/// ring when `P` is not a power of two: 15 µs per message, 2 GB/s, reductions at 10 GB/s.
pub const MODEL: Model = Model {
    alpha: 15e-6,
    beta: 1.0 / 2e9,
    gamma: 1.0 / 10e9,
};

/// The model time of halving-doubling and of the ring for `p` ranks and `n` bytes, from the
/// closed forms (see [`super::allreduce_halving_doubling`], [`super::allreduce_ring`]).
fn model_rhd_ring(p: usize, n: usize) -> (f64, f64) {
    let fold = Fold::new(p);
    let (q, f, n) = (fold.p2 as f64, f64::from(u8::from(fold.rem > 0)), n as f64);
    let levels = f64::from(fold.levels());
    let m = &MODEL;
    let rhd = (2.0 * levels + 2.0 * f) * m.alpha
        + (2.0 * (q - 1.0) / q + 2.0 * f) * n * m.beta
        + ((q - 1.0) / q + f) * n * m.gamma;
    let pf = p as f64;
    let ring = 2.0 * (pf - 1.0) * m.alpha
        + 2.0 * (pf - 1.0) / pf * n * m.beta
        + (pf - 1.0) / pf * n * m.gamma;
    (rhd, ring)
}
/// Broadcast and reduce switch from a binomial tree to their two-phase algorithms here.
pub const TREE_MAX_BYTES: usize = 512 << 10;
/// all_gather and reduce_scatter switch from the logarithmic algorithms to the ring here.
pub const LOG_MAX_BYTES: usize = 1 << 20;

/// The automatic all_reduce choice; see the module documentation.
pub fn choose_all_reduce(p: usize, count: usize, bytes: usize) -> Algorithm {
    let rd_max = if p == 2 {
        RD_MAX_BYTES_TWO
    } else {
        RD_MAX_BYTES
    };
    if bytes <= rd_max || count < p {
        return Algorithm::AllReduceRecursiveDoubling;
    }
    if p.is_power_of_two() {
        return Algorithm::AllReduceHalvingDoubling;
    }
    let (rhd, ring) = model_rhd_ring(p, bytes);
    if ring < rhd {
        Algorithm::AllReduceRing
    } else {
        Algorithm::AllReduceHalvingDoubling
    }
}

/// The automatic broadcast choice.
pub fn choose_broadcast(p: usize, count: usize, bytes: usize) -> Algorithm {
    if bytes >= TREE_MAX_BYTES && p >= 3 && count >= p {
        Algorithm::BroadcastScatterAllGather
    } else {
        Algorithm::BroadcastBinomial
    }
}

/// The automatic reduce choice.
pub fn choose_reduce(p: usize, count: usize, bytes: usize) -> Algorithm {
    if bytes >= TREE_MAX_BYTES && p >= 3 && count >= p {
        Algorithm::ReduceScatterGather
    } else {
        Algorithm::ReduceBinomial
    }
}

/// The automatic all_gather choice (`total_bytes`: the whole output).
pub fn choose_all_gather(p: usize, total_bytes: usize) -> Algorithm {
    if p.is_power_of_two() && total_bytes < LOG_MAX_BYTES {
        Algorithm::AllGatherRecursiveDoubling
    } else {
        Algorithm::AllGatherRing
    }
}

/// The automatic reduce_scatter choice (`total_bytes`: the whole input).
pub fn choose_reduce_scatter(p: usize, total_bytes: usize) -> Algorithm {
    if p.is_power_of_two() && total_bytes < LOG_MAX_BYTES {
        Algorithm::ReduceScatterRecursiveHalving
    } else {
        Algorithm::ReduceScatterRing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::from_code(a.code()), Some(a));
            assert!(!a.name().is_empty() && !a.collective().is_empty());
        }
        assert_eq!(Algorithm::from_code(0), None);
        assert_eq!(Algorithm::from_code(200), None);
        for a in AllReduceAlgo::ALL {
            assert_eq!(AllReduceAlgo::from_name(a.name()), Some(a));
        }
        assert_eq!(
            AllReduceAlgo::from_name(" RING "),
            Some(AllReduceAlgo::Ring)
        );
    }

    #[test]
    fn env_override_parses() {
        let env = |v: &'static str| {
            move |k: &str| (k == "FERROCOMM_ALLREDUCE_ALGO").then(|| v.to_string())
        };
        assert_eq!(
            AllReduceAlgo::from_lookup(&env("rhd")).unwrap(),
            AllReduceAlgo::HalvingDoubling
        );
        assert_eq!(
            AllReduceAlgo::from_lookup(&|_| None).unwrap(),
            AllReduceAlgo::Auto
        );
        let e = AllReduceAlgo::from_lookup(&env("tree"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FERROCOMM_ALLREDUCE_ALGO") && e.contains("ring"),
            "{e}"
        );
    }

    #[test]
    fn automatic_choice() {
        use Algorithm::*;
        let c = choose_all_reduce;
        assert_eq!(c(8, 1, 4), AllReduceRecursiveDoubling);
        assert_eq!(c(2, 1 << 16, 256 << 10), AllReduceRecursiveDoubling);
        assert_eq!(c(2, 1 << 16, (256 << 10) + 4), AllReduceHalvingDoubling);
        assert_eq!(c(4, 1 << 16, 256 << 10), AllReduceHalvingDoubling);
        assert_eq!(c(8, 3, 12 << 20), AllReduceRecursiveDoubling);
        assert_eq!(c(8, 1 << 20, 4 << 20), AllReduceHalvingDoubling);
        assert_eq!(c(3, 1 << 20, 4 << 20), AllReduceRing);
        assert_eq!(c(100, 1 << 18, 1 << 20), AllReduceHalvingDoubling);
        assert_eq!(c(100, 1 << 20, 4 << 20), AllReduceRing);
        assert_eq!(c(4095, 1 << 24, 64 << 20), AllReduceHalvingDoubling);
    }

    #[test]
    fn the_closed_forms_match_the_cost_model() {
        for p in [3usize, 6, 7, 100] {
            let n = p * 4096;
            let (rhd, ring) = model_rhd_ring(p, n);
            let c = |a| super::super::cost::cost(a, p, n, 1).unwrap().time(&MODEL);
            let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.max(y);
            assert!(close(rhd, c(Algorithm::AllReduceHalvingDoubling)), "P={p}");
            assert!(close(ring, c(Algorithm::AllReduceRing)), "P={p}");
        }
    }
}
