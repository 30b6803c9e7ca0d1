//! Which failed rank the launcher names: the root cause, not the first rank to end.
//!
//! When rank k is killed, its peers see their connections reset and fail with `PeerLost`,
//! and one of them may well end before the launcher sees rank k end. Each rank that fails
//! in a collective writes a failure report ([`crate::collective::blame`]) saying whom it
//! failed *because of*: those are edges of a chain, which [`decide`] follows to the root
//! cause. The rules, in order:
//!
//! 1. A rank that ended by a signal before the launcher stopped anything, or with a
//!    non-zero status and no report blaming another rank (the program's own error, a
//!    panic, a mismatch), is a *root*.
//! 2. A rank killed by a signal wins: the one the chain of reports from the first failure
//!    leads to, else the first seen (the others' reports may blame a rank that only closed
//!    its connections because of it, and a rank without a report may have lost it outside
//!    a collective).
//! 3. Else the chain from the first failure is followed through the reports: when it ends
//!    at a root, that rank is named. (The launcher still waits up to [`UNEXPLAINED_WAIT`]
//!    for a signal death before naming a rank that exited without any report.)
//! 4. Else, while the chain ends at a rank still running here or on another node, the
//!    launcher waits (up to [`BLAME_WAIT`] after the first failure) for that rank to end
//!    or another node to report; then the first root, or the first failure, is named,
//!    with the rank the chain ends at.
//!
//! So the verdict is deterministic: it depends on how the ranks ended and what they
//! reported, not on the order in which their ends were noticed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::sys::Termination;
use crate::collective::blame::{Blame, resolve};

/// How long the launcher waits, after a first failure that blames another rank, for the
/// rank at the end of the chain to end (or another node to report the root cause) before
/// it stops the job anyway. Noticing a death takes milliseconds; a node's report reaches
/// the others within about a second.
pub const BLAME_WAIT: Duration = Duration::from_secs(3);

/// How long the launcher waits, after a first failure without a report (a non-zero exit
/// outside ferrocomm's collectives, possibly a point-to-point `PeerLost`), for another rank
/// to be seen killed by a signal before it names that first failure.
pub const UNEXPLAINED_WAIT: Duration = Duration::from_secs(1);

/// A rank of this node that failed, in the order the failures were seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failed {
    /// Its global rank.
    pub rank: usize,
    /// How it ended.
    pub how: Termination,
    /// The rank its failure report blames (it failed because of that rank), if any.
    pub because_of: Option<usize>,
    /// Whether it wrote a failure report at all.
    pub reported: bool,
}

impl Failed {
    /// A root cause by itself (see the module documentation).
    fn is_root(&self) -> bool {
        matches!(self.how, Termination::Signaled(_)) || self.because_of.is_none()
    }

    /// Exited non-zero without a report: the launcher gives a signal death elsewhere a
    /// moment ([`UNEXPLAINED_WAIT`]) to show before naming it.
    pub(crate) fn unexplained(&self) -> bool {
        matches!(self.how, Termination::Exited(_)) && !self.reported
    }
}

/// What [`decide`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Name `failed[root]`.
    Named {
        /// Index into the failures.
        root: usize,
    },
    /// No root yet: the chain ends at this rank (still running, or on another node), or in
    /// a cycle (its first rank). Wait, or when the time is up name the first failure.
    Pending {
        /// Where the chain of reports ends.
        ends_at: usize,
    },
}

/// Decides whom to name among `failed` (non-empty; see the module documentation).
pub(crate) fn decide(failed: &[Failed]) -> Verdict {
    let Some(first) = failed.first() else {
        return Verdict::Pending { ends_at: 0 };
    };
    let edges: BTreeMap<usize, usize> = failed
        .iter()
        .filter_map(|f| Some((f.rank, f.because_of?)))
        .collect();
    let roots: BTreeSet<usize> = failed
        .iter()
        .filter(|f| f.is_root())
        .map(|f| f.rank)
        .collect();
    let at = |rank: usize| failed.iter().position(|f| f.rank == rank);
    let chain = resolve(first.rank, &edges, &roots);
    let ends_at = chain.rank();
    let signaled = |f: &Failed| matches!(f.how, Termination::Signaled(_));
    // A rank killed by a signal is the cause of the others' failures, wherever their
    // chain leads (a rank's report may blame a rank that only closed its connections
    // because of it; a rank without a report may have lost it outside a collective).
    if failed.iter().any(signaled) {
        let on_chain = at(ends_at).filter(|&i| signaled(&failed[i]));
        let root = on_chain.or_else(|| failed.iter().position(signaled));
        return Verdict::Named {
            root: root.unwrap_or(0),
        };
    }
    if let Blame::Rank { rank, .. } = chain
        && let Some(i) = at(rank)
        && failed[i].is_root()
    {
        return Verdict::Named { root: i };
    }
    // The chain leads to a rank still running (here or on another node): wait for it.
    if matches!(chain, Blame::Rank { .. }) && at(ends_at).is_none() {
        return Verdict::Pending { ends_at };
    }
    match failed.iter().position(Failed::is_root) {
        Some(i) => Verdict::Named { root: i },
        None => Verdict::Pending { ends_at },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(rank: usize, because_of: Option<usize>) -> Failed {
        Failed {
            rank,
            how: Termination::Exited(1),
            because_of,
            reported: because_of.is_some(),
        }
    }

    fn killed(rank: usize) -> Failed {
        Failed {
            rank,
            how: Termination::Signaled(9),
            because_of: None,
            reported: false,
        }
    }

    #[test]
    fn a_first_failure_of_its_own_is_named_at_once() {
        assert_eq!(decide(&[exited(1, None)]), Verdict::Named { root: 0 });
        assert_eq!(decide(&[killed(3)]), Verdict::Named { root: 0 });
    }

    #[test]
    fn the_killed_rank_wins_over_its_victims_that_ended_first() {
        // Rank 0 lost rank 2 and ended first: wait for rank 2.
        let mut f = vec![exited(0, Some(2))];
        assert_eq!(decide(&f), Verdict::Pending { ends_at: 2 });
        f.push(exited(1, Some(0)));
        assert_eq!(decide(&f), Verdict::Pending { ends_at: 2 });
        f.push(killed(2));
        assert_eq!(decide(&f), Verdict::Named { root: 2 });
        // A victim that blames another victim: followed.
        let f = [exited(3, Some(1)), exited(1, Some(2)), killed(2)];
        assert_eq!(decide(&f), Verdict::Named { root: 2 });
    }

    #[test]
    fn a_rank_that_exited_without_a_report_is_a_root() {
        let f = [exited(0, Some(2)), exited(2, None)];
        assert_eq!(decide(&f), Verdict::Named { root: 1 });
        // A signal death wins over an unexplained exit off the chain.
        let f = [exited(0, Some(1)), exited(3, None), killed(2)];
        assert_eq!(decide(&f), Verdict::Named { root: 2 });
        // A signal death wins even when the chain leads elsewhere (a rank's report blamed a
        // rank that only closed its connections after the killed one died).
        let f = [exited(0, Some(1)), killed(2)];
        assert_eq!(decide(&f), Verdict::Named { root: 1 });
        // A signal death wins over an exit without a report that was seen first.
        let f = [exited(0, None), killed(2)];
        assert_eq!(decide(&f), Verdict::Named { root: 1 });
        assert!(f[0].unexplained() && !f[1].unexplained());
        // An unexplained exit off the chain does not decide while the chain's end runs.
        let f = [exited(0, Some(2)), exited(3, None)];
        assert_eq!(decide(&f), Verdict::Pending { ends_at: 2 });
    }

    #[test]
    fn a_chain_to_a_live_rank_or_a_cycle_waits() {
        // Timeouts blaming a stopped rank 2 that never ends.
        let f = [exited(0, Some(1)), exited(1, Some(2)), exited(3, Some(2))];
        assert_eq!(decide(&f), Verdict::Pending { ends_at: 2 });
        let f = [exited(0, Some(1)), exited(1, Some(0))];
        assert_eq!(decide(&f), Verdict::Pending { ends_at: 0 });
    }
}
