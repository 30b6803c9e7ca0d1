//! The ranks of this node: starting them, noticing when they end, signalling and reaping
//! them.
//!
//! Each rank is started in a process group of its own (`setpgid(0, 0)`), so that a signal
//! reaches the rank *and* whatever it started (a `sh -c` wrapper's children, data-loader
//! workers); a terminal's Ctrl-C reaches only the launcher, which forwards it. Ranks are
//! not reaped until the launcher is done with them, so their pids and process group ids
//! cannot be reused while the launcher may still signal them. When the launcher is done,
//! whatever is left in a rank's process group is killed with SIGKILL, and only then are the
//! ranks reaped: no process of the job outlives the launcher, except one that deliberately
//! left its rank's process group (`setsid`). Every rank also gets `PR_SET_PDEATHSIG` =
//! SIGKILL, so the ranks die even when the launcher itself is killed with SIGKILL (their
//! own children then survive: only the rank has the death signal).
//!
//! Standard input of every rank is `/dev/null`: a rank in its own process group that read
//! from the terminal would be stopped by SIGTTIN.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::output::{Sink, spawn_tagger};
use super::sys::{self, Termination};
use crate::error::{Error, Result};

/// What one rank of this node is started with.
pub(crate) struct RankSpec {
    /// Global rank.
    pub rank: usize,
    /// Rank on this node.
    pub local_rank: usize,
    /// Environment variables set for it (on top of the launcher's own).
    pub env: Vec<(String, String)>,
}

/// A started rank.
pub(crate) struct LocalRank {
    /// Global rank.
    pub rank: usize,
    /// Rank on this node.
    pub local_rank: usize,
    child: Child,
    /// How it ended, once it has.
    pub ended: Option<Termination>,
}

impl LocalRank {
    /// The rank's pid, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The ranks of this node. Dropping it kills and reaps every rank still there.
pub(crate) struct Ranks {
    ranks: Vec<LocalRank>,
    taggers: Vec<JoinHandle<()>>,
}

/// How long [`Ranks::finish`] waits for the output of ranks to drain.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

impl Ranks {
    /// Starts one process per spec, `program args...`. With `tag_output`, their stdout and
    /// stderr are piped through [`spawn_tagger`]; otherwise they inherit the launcher's.
    /// When one cannot be started, the ones already started are killed and the error says
    /// which rank and program failed.
    pub fn spawn(
        program: &OsStr,
        args: &[OsString],
        specs: Vec<RankSpec>,
        tag_output: bool,
    ) -> Result<Ranks> {
        let mut set = Ranks {
            ranks: Vec::with_capacity(specs.len()),
            taggers: Vec::new(),
        };
        for spec in specs {
            let mut cmd = Command::new(program);
            cmd.args(args)
                .envs(spec.env)
                .stdin(Stdio::null())
                .process_group(0);
            if tag_output {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            sys::die_with_parent(&mut cmd);
            let mut child = cmd.spawn().map_err(|e| {
                Error::io(
                    format!(
                        "ferrorun: cannot start rank {} (local rank {}) as `{}`; check the \
                         program path and its permissions",
                        spec.rank,
                        spec.local_rank,
                        program.to_string_lossy()
                    ),
                    e,
                )
            })?;
            let out = child.stdout.take();
            let err = child.stderr.take();
            set.ranks.push(LocalRank {
                rank: spec.rank,
                local_rank: spec.local_rank,
                child,
                ended: None,
            });
            tracing::debug!(
                rank = spec.rank,
                local_rank = spec.local_rank,
                "rank started"
            );
            for (pipe, sink) in [
                (
                    out.map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
                    Sink::Stdout,
                ),
                (
                    err.map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
                    Sink::Stderr,
                ),
            ] {
                if let Some(pipe) = pipe {
                    let handle = spawn_tagger(spec.rank, pipe, sink)
                        .map_err(|e| Error::io("ferrorun: cannot start an output thread", e))?;
                    set.taggers.push(handle);
                }
            }
        }
        Ok(set)
    }

    /// The ranks, in the order they were started (local rank order).
    pub fn ranks(&self) -> &[LocalRank] {
        &self.ranks
    }

    /// Looks for ranks that ended since the last call (without reaping them) and returns
    /// their indices in [`Ranks::ranks`].
    pub fn poll(&mut self) -> Result<Vec<usize>> {
        let mut ended = Vec::new();
        for (i, r) in self.ranks.iter_mut().enumerate() {
            if r.ended.is_some() {
                continue;
            }
            let pid = r.child.id();
            let status = sys::peek_exit(pid).map_err(|e| {
                Error::io(
                    format!("ferrorun: waiting for rank {} (pid {pid})", r.rank),
                    e,
                )
            })?;
            if let Some(t) = status {
                r.ended = Some(t);
                ended.push(i);
            }
        }
        Ok(ended)
    }

    /// True when every rank has ended.
    pub fn all_ended(&self) -> bool {
        self.ranks.iter().all(|r| r.ended.is_some())
    }

    /// The global ranks still running.
    pub fn running(&self) -> Vec<usize> {
        self.ranks
            .iter()
            .filter(|r| r.ended.is_none())
            .map(|r| r.rank)
            .collect()
    }

    /// Sends `sig` to the process group of every rank, ended or not (an ended rank's
    /// group may still hold processes it started).
    pub fn signal_all(&self, sig: i32) {
        for r in &self.ranks {
            sys::signal_group(r.child.id(), sig);
        }
    }

    /// Kills whatever is left in the ranks' process groups, reaps the ranks and waits a
    /// little for their output to drain. Call once every rank has ended.
    pub fn finish(mut self) {
        self.kill_and_reap();
        let deadline = Instant::now() + DRAIN_WAIT;
        for t in std::mem::take(&mut self.taggers) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                // A process that left the rank's group still holds the pipe; leave the
                // thread copying in the background rather than wait for it.
                tracing::debug!(
                    "output of a rank is still open after its process group was killed"
                );
            }
        }
    }

    fn kill_and_reap(&mut self) {
        self.signal_all(libc::SIGKILL);
        for r in self.ranks.drain(..) {
            let mut child = r.child;
            if let Err(e) = child.wait() {
                tracing::warn!(rank = r.rank, error = %e, "reaping rank failed");
            }
        }
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}
