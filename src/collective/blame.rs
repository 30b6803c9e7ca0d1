//! Naming the root cause of a failure: following "waits for" and "failed because of" chains
//! to the rank that is actually stuck or dead, and telling the launcher why a rank failed.
//!
//! # Chains
//!
//! When one rank stops or dies, the others fail one after the other, each because of the
//! rank it waited for: rank 3 times out waiting for rank 0, which waits for rank 1, which
//! waits for the stopped rank 2. Each rank that gives up says whom it blames (a collective
//! notice, see [`crate::collective::exec`], or a failure report to the launcher); those are
//! the *edges* `who -> whom` of a graph. A rank that sends an edge is alive (or was, when
//! it failed) and waiting for someone else, so it is never the final name while its edge
//! leads somewhere. [`resolve`] follows the edges from the first suspect to the end:
//!
//! - a rank known to be *dead* (its connection closed without a notice, its process gone)
//!   ends the chain: it is the root cause, even when it also appears to wait;
//! - a rank without an edge ends the chain: it is stuck (it said nothing) or it failed for
//!   a reason of its own;
//! - a chain that comes back to a rank already on it is a cycle: the ranks on it wait for
//!   each other and none of them is stuck by the evidence (a deadlock in the program, or a
//!   rank resumed while the others gave up).
//!
//! [`root_cause`] adds the rule the launcher needs: a dead rank wins over a chain that ends
//! at a live rank or in a cycle (a rank killed by a signal is the cause of the `PeerLost`
//! failures of the others even when they ended first).
//!
//! # Failure reports
//!
//! `ferrorun` gives every rank a file name in [`FAILURE_FILE_ENV`]. When a collective fails
//! a process's engine, the process writes one [`FailureReport`] there (once, atomically: a
//! temporary file renamed into place) before its error reaches the program: what kind of
//! failure and which rank it blames. The launcher reads it when the rank ends, so it can
//! tell a rank that failed *because of* another (a lost peer, a timeout waiting for a
//! peer) from one that failed by itself, and follow the chain to the root cause. A process
//! that ends with a non-zero status and no report failed outside ferrocomm's collectives
//! (the program's own error, a panic, `exit(3)`): the launcher counts it as a root cause.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::comm::envelope::{NOTICE_MISMATCH, NOTICE_PEER_LOST, NOTICE_TIMEOUT};

/// The environment variable naming the file a rank writes its [`FailureReport`] to (set by
/// `ferrorun` for every rank; unset: no report is written).
pub const FAILURE_FILE_ENV: &str = "FERROCOMM_FAILURE_FILE";

/// Whom a chain of blame names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blame {
    /// This rank is stuck or dead; `via` are the ranks passed on the way (each waited for
    /// the next, the last for `rank`), without the start when it is `rank`.
    Rank {
        /// The rank named.
        rank: usize,
        /// The ranks on the chain before it, from the start.
        via: Vec<usize>,
    },
    /// The ranks on the chain wait for each other (in this order, the last for the first).
    Cycle(Vec<usize>),
}

impl Blame {
    /// The rank named, or for a cycle its first rank.
    pub fn rank(&self) -> usize {
        match self {
            Blame::Rank { rank, .. } => *rank,
            Blame::Cycle(c) => c[0],
        }
    }
}

/// Follows the edges (`who -> whom it waits for / failed because of`) from `start` to the
/// rank that is stuck or dead (see the module documentation). `dead`: ranks known to be
/// dead, which end the chain whatever edges they have.
pub fn resolve(start: usize, edges: &BTreeMap<usize, usize>, dead: &BTreeSet<usize>) -> Blame {
    let mut path = vec![start];
    let mut cur = start;
    loop {
        if dead.contains(&cur) {
            break;
        }
        match edges.get(&cur) {
            Some(&next) if next == cur => break,
            Some(&next) => {
                if let Some(at) = path.iter().position(|&r| r == next) {
                    return Blame::Cycle(path.split_off(at));
                }
                path.push(next);
                cur = next;
            }
            None => break,
        }
    }
    path.pop();
    Blame::Rank {
        rank: cur,
        via: path,
    }
}

/// Like [`resolve`], but a dead rank wins over a chain that ends at a rank not known to be
/// dead, or in a cycle: `dead` in the order the ranks were found dead, the first wins.
pub fn root_cause(start: usize, edges: &BTreeMap<usize, usize>, dead: &[usize]) -> Blame {
    let set: BTreeSet<usize> = dead.iter().copied().collect();
    let chain = resolve(start, edges, &set);
    match (&chain, dead.first()) {
        (Blame::Rank { rank, .. }, _) if set.contains(rank) => chain,
        (_, Some(&first)) => Blame::Rank {
            rank: first,
            via: Vec::new(),
        },
        (_, None) => chain,
    }
}

/// Of the ranks found lost (their connections closed), the one to name: the first that
/// sent no notice (it died) over those that gave up with a notice first (they failed
/// because of something and closed their connections after), else the first.
pub fn first_dead(lost: &[usize], gave_notice: impl Fn(usize) -> bool) -> Option<usize> {
    lost.iter()
        .copied()
        .find(|&r| !gave_notice(r))
        .or_else(|| lost.first().copied())
}

/// Why a rank failed, as it reported to its launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// It lost a peer (the peer died, or gave up because it lost one in turn).
    PeerLost,
    /// It timed out waiting for a peer.
    Timeout,
    /// The ranks' calls did not match.
    Mismatch,
    /// Anything else (an abort, a broken transport, a local error).
    Other,
}

impl FailureKind {
    fn word(self) -> &'static str {
        match self {
            FailureKind::PeerLost => "peer_lost",
            FailureKind::Timeout => "timeout",
            FailureKind::Mismatch => "mismatch",
            FailureKind::Other => "other",
        }
    }

    fn from_word(w: &str) -> Option<Self> {
        Some(match w {
            "peer_lost" => FailureKind::PeerLost,
            "timeout" => FailureKind::Timeout,
            "mismatch" => FailureKind::Mismatch,
            "other" => FailureKind::Other,
            _ => return None,
        })
    }

    /// The kind of a collective notice's reason (`NOTICE_*`).
    pub(crate) fn of_notice(reason: u32) -> Self {
        match reason {
            NOTICE_PEER_LOST => FailureKind::PeerLost,
            NOTICE_TIMEOUT => FailureKind::Timeout,
            NOTICE_MISMATCH => FailureKind::Mismatch,
            _ => FailureKind::Other,
        }
    }
}

/// What a failing rank tells its launcher (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureReport {
    /// What went wrong.
    pub kind: FailureKind,
    /// The (world) rank it blames, if any.
    pub blamed: Option<usize>,
    /// The error, on one line.
    pub message: String,
}

/// The first line of every report, so that a stray file is not taken for one.
const MAGIC: &str = "ferrocomm-failure-v1";

impl FailureReport {
    /// The rank this one failed because of: the blamed rank of a lost peer or a timeout
    /// (it waited for that rank), unless that is `me`. A mismatch or another failure is
    /// the rank's own (`None`).
    pub fn because_of(&self, me: usize) -> Option<usize> {
        match self.kind {
            FailureKind::PeerLost | FailureKind::Timeout => self.blamed.filter(|&b| b != me),
            FailureKind::Mismatch | FailureKind::Other => None,
        }
    }

    /// The text of the file.
    pub fn encode(&self) -> String {
        let blamed = self
            .blamed
            .map_or_else(|| "-".to_string(), |b| b.to_string());
        let message = self.message.replace(['\n', '\r'], " ");
        format!("{MAGIC} {} {blamed}\n{message}\n", self.kind.word())
    }

    /// Parses the text of a file; `None` when it is not a report.
    pub fn decode(text: &str) -> Option<Self> {
        let (head, rest) = text.split_once('\n').unwrap_or((text, ""));
        let mut words = head.split_whitespace();
        if words.next()? != MAGIC {
            return None;
        }
        let kind = FailureKind::from_word(words.next()?)?;
        let blamed = match words.next()? {
            "-" => None,
            b => Some(b.parse().ok()?),
        };
        Some(FailureReport {
            kind,
            blamed,
            message: rest.lines().next().unwrap_or("").to_string(),
        })
    }

    /// Reads the report at `path`; `None` when there is none (or it is not a report).
    pub fn read(path: &Path) -> Option<Self> {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| Self::decode(&t))
    }

    /// Writes the report to `path` atomically (a temporary file beside it, renamed).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        std::fs::write(&tmp, self.encode())?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

/// Set once this process has written its report: only the first failure is the cause.
static REPORTED: AtomicBool = AtomicBool::new(false);

/// Reports this process's first failure to its launcher, when it set
/// [`FAILURE_FILE_ENV`]: a collective notice's `reason` and `blamed` world rank (`BLAME_NONE`
/// for none), and the error.
pub(crate) fn report_failure(reason: u32, blamed: u32, err: &crate::error::Error) {
    let Some(path) = std::env::var_os(FAILURE_FILE_ENV).filter(|p| !p.is_empty()) else {
        return;
    };
    if REPORTED.swap(true, Ordering::SeqCst) {
        return;
    }
    let report = FailureReport {
        kind: FailureKind::of_notice(reason),
        blamed: (blamed != super::BLAME_NONE).then_some(blamed as usize),
        message: err.to_string(),
    };
    if let Err(e) = report.write(Path::new(&path)) {
        tracing::debug!("cannot write the failure report to {path:?}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edges(e: &[(usize, usize)]) -> BTreeMap<usize, usize> {
        e.iter().copied().collect()
    }

    fn named(rank: usize, via: &[usize]) -> Blame {
        Blame::Rank {
            rank,
            via: via.to_vec(),
        }
    }

    #[test]
    fn a_rank_without_an_edge_is_named() {
        let none = BTreeSet::new();
        assert_eq!(resolve(1, &edges(&[]), &none), named(1, &[]));
        // 3 waits for 0, 0 for 1, 1 for the stopped 2: 2, never the waiting 1.
        let e = edges(&[(3, 0), (0, 1), (1, 2)]);
        assert_eq!(resolve(0, &e, &none), named(2, &[0, 1]));
        assert_eq!(resolve(3, &e, &none), named(2, &[3, 0, 1]));
        assert_eq!(resolve(2, &e, &none), named(2, &[]));
    }

    #[test]
    fn a_dead_rank_ends_the_chain() {
        // 1 blames 2, but 2 is dead (it may have reported an edge before dying).
        let e = edges(&[(0, 1), (1, 2), (2, 3)]);
        let dead: BTreeSet<usize> = [2].into();
        assert_eq!(resolve(0, &e, &dead), named(2, &[0, 1]));
    }

    #[test]
    fn cycles_are_reported() {
        let e = edges(&[(0, 1), (1, 2), (2, 1)]);
        assert_eq!(resolve(0, &e, &BTreeSet::new()), Blame::Cycle(vec![1, 2]));
        assert_eq!(Blame::Cycle(vec![1, 2]).rank(), 1);
        // A self edge is no edge.
        assert_eq!(
            resolve(4, &edges(&[(4, 4)]), &BTreeSet::new()),
            named(4, &[])
        );
    }

    #[test]
    fn a_dead_rank_wins_over_a_live_end_or_a_cycle() {
        // 0 lost 1, which exited after 2 was killed; 1's report blames 2.
        let e = edges(&[(0, 1), (1, 2)]);
        assert_eq!(root_cause(0, &e, &[2]), named(2, &[0, 1]));
        // The chain ends at a live rank (no edge) but 3 died: 3.
        assert_eq!(root_cause(0, &edges(&[(0, 1)]), &[3]), named(3, &[]));
        assert_eq!(
            root_cause(0, &edges(&[(0, 1), (1, 0)]), &[3, 2]),
            named(3, &[])
        );
        // Nobody dead: the chain decides.
        assert_eq!(root_cause(0, &e, &[]), named(2, &[0, 1]));
    }

    #[test]
    fn the_first_lost_rank_without_a_notice_is_dead() {
        assert_eq!(first_dead(&[0, 2], |r| r == 0), Some(2));
        assert_eq!(first_dead(&[0, 2], |_| true), Some(0));
        assert_eq!(first_dead(&[], |_| false), None);
    }

    #[test]
    fn reports_round_trip_and_name_whom_they_fail_because_of() {
        let r = FailureReport {
            kind: FailureKind::PeerLost,
            blamed: Some(2),
            message: "rank 0: lost peer rank 2\nsecond line".into(),
        };
        let back = FailureReport::decode(&r.encode()).expect("decodes");
        assert_eq!(back.kind, FailureKind::PeerLost);
        assert_eq!(back.blamed, Some(2));
        assert_eq!(back.message, "rank 0: lost peer rank 2 second line");
        assert_eq!(back.because_of(0), Some(2));
        assert_eq!(back.because_of(2), None);
        let m = FailureReport {
            kind: FailureKind::Mismatch,
            blamed: None,
            message: String::new(),
        };
        let back = FailureReport::decode(&m.encode()).expect("decodes");
        assert_eq!(
            (back.kind, back.blamed, back.because_of(0)),
            (FailureKind::Mismatch, None, None)
        );
        assert_eq!(FailureReport::decode("hello\n"), None);
        assert_eq!(FailureReport::decode(""), None);
        assert_eq!(
            FailureReport::decode("ferrocomm-failure-v1 timeout x\n"),
            None
        );
    }

    #[test]
    fn reports_are_written_atomically() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("rank-0");
        assert_eq!(FailureReport::read(&path), None);
        let r = FailureReport {
            kind: FailureKind::Timeout,
            blamed: Some(1),
            message: "timed out".into(),
        };
        r.write(&path).expect("writes");
        assert_eq!(FailureReport::read(&path), Some(r));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("lists")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("rank-0")]);
    }
}
