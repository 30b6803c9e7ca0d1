//! The measurement loop shared by every subcommand, and the control messages around it.
//!
//! For each message size (the same loop as `bench/peers/mpi-bench.c`, so that ferrocomm and
//! the MPI peers are measured alike):
//!
//! 1. a barrier, then warm-up calls (at most `--warmup`, and at most a quarter of the time
//!    target), untimed;
//! 2. a barrier, then timed calls in chunks. Every call is timed on its own with the
//!    monotonic clock. After each chunk rank 0 decides, outside the timed region, how many
//!    calls the next chunk makes (0: stop): at most twice the last chunk, no more than the
//!    time target still allows at the speed seen so far, and at least enough to reach
//!    `--min-iters`. The phase ends after `--iters` calls, or once the time target has
//!    passed and `--min-iters` calls ran. Re-estimating after every chunk keeps the phase
//!    bounded even when the speed changes by orders of magnitude during the run (ranks
//!    outnumbering cores), where calibrate-then-run would pick far too many iterations.
//!
//! Control messages (the chunk decision, gathering results, checks) travel on a duplicate
//! of the measured communicator, so they never mix with the measured traffic.

use std::time::{Duration, Instant};

use ferrocomm::Communicator;

use crate::BenchError;

/// How many calls a phase makes.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// At most this many calls.
    pub max_iters: u64,
    /// At least this many calls, even past the time target.
    pub min_iters: u64,
    /// Stop once this much time has passed (and `min_iters` ran); `None`: run `max_iters`.
    pub time: Option<Duration>,
}

/// Rank 0's decision after a chunk: how many calls the next chunk makes (0: stop).
///
/// `done` calls ran so far, the last chunk had `chunk` calls, `elapsed` is the phase's time
/// so far.
pub fn next_chunk(lim: &Limits, done: u64, chunk: u64, elapsed: Duration) -> u64 {
    if done >= lim.max_iters {
        return 0;
    }
    let left = lim.max_iters - done;
    let need = lim.min_iters.saturating_sub(done);
    let mut next = chunk.saturating_mul(2).max(1);
    if let Some(target) = lim.time {
        if elapsed >= target {
            if need == 0 {
                return 0;
            }
            return need.min(next).min(left);
        }
        if done > 0 {
            let per_call = elapsed.as_secs_f64() / done as f64;
            let fits = if per_call > 0.0 {
                ((target - elapsed).as_secs_f64() / per_call).ceil()
            } else {
                f64::INFINITY
            };
            let fits = if fits >= u64::MAX as f64 {
                u64::MAX
            } else {
                (fits as u64).max(1)
            };
            next = next.min(fits.max(need.min(next)));
        }
    }
    next.min(left).max(1)
}

/// The control channel: a duplicate of the measured communicator.
pub struct Ctl {
    comm: Communicator,
}

const TAG_CHUNK: u32 = 1;
const TAG_GATHER: u32 = 2;
const TAG_FLAG: u32 = 3;

impl Ctl {
    /// Makes the control channel of `comm` (every rank calls it).
    pub fn new(comm: &Communicator) -> Ctl {
        Ctl { comm: comm.dup() }
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Every rank waits for all others.
    pub fn barrier(&self) -> Result<(), BenchError> {
        Ok(self.comm.barrier()?)
    }

    /// Rank 0's `v` on every rank (linear: ranks are few and this is outside the timing).
    pub fn bcast_u64(&self, v: u64) -> Result<u64, BenchError> {
        let n = self.comm.size();
        if self.rank() == 0 {
            for r in 1..n {
                self.comm.send(&[v], r, TAG_CHUNK)?;
            }
            Ok(v)
        } else {
            let mut b = [0u64];
            self.comm.recv(&mut b, 0, TAG_CHUNK)?;
            Ok(b[0])
        }
    }

    /// Every rank's `v`, in rank order, on rank 0; an empty vector elsewhere.
    pub fn gather_f64(&self, v: f64) -> Result<Vec<f64>, BenchError> {
        let n = self.comm.size();
        if self.rank() == 0 {
            let mut all = vec![v];
            for r in 1..n {
                let mut b = [0f64];
                self.comm.recv(&mut b, r, TAG_GATHER)?;
                all.push(b[0]);
            }
            Ok(all)
        } else {
            self.comm.send(&[v], 0, TAG_GATHER)?;
            Ok(Vec::new())
        }
    }

    /// True on every rank when `ok` is true on every rank.
    pub fn all_ok(&self, ok: bool) -> Result<bool, BenchError> {
        let n = self.comm.size();
        let mut all = ok;
        if self.rank() == 0 {
            for r in 1..n {
                let mut b = [0u8];
                self.comm.recv(&mut b, r, TAG_FLAG)?;
                all &= b[0] == 1;
            }
        } else {
            self.comm.send(&[u8::from(ok)], 0, TAG_FLAG)?;
        }
        Ok(self.bcast_u64(u64::from(all))? == 1)
    }

    /// Runs `op` in chunks until rank 0 says stop (see the module doc); returns the seconds
    /// each call reported, if `keep`.
    pub fn phase(
        &self,
        lim: &Limits,
        keep: bool,
        op: &mut dyn FnMut() -> Result<f64, BenchError>,
    ) -> Result<Vec<f64>, BenchError> {
        let mut samples = Vec::new();
        let start = Instant::now();
        let (mut done, mut chunk) = (0u64, 1u64.min(lim.max_iters));
        while chunk > 0 {
            for _ in 0..chunk {
                let s = op()?;
                if keep {
                    samples.push(s);
                }
            }
            done += chunk;
            let next = if self.rank() == 0 {
                next_chunk(lim, done, chunk, start.elapsed())
            } else {
                0
            };
            chunk = self.bcast_u64(next)?;
        }
        Ok(samples)
    }
}

/// The median of `v` (the mean of the two middle values for an even length); 0 if empty.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The `q`-quantile (0..=1) of sorted `v`, nearest rank; 0 if empty.
pub fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The message sizes of a sweep, nccl-tests style: from `min` to `max`, multiplied by
/// `factor`, or increased by `step` when it is given. 0 is followed by 1.
pub fn sizes(min: u64, max: u64, factor: u64, step: Option<u64>) -> Vec<u64> {
    let mut out = Vec::new();
    let mut s = min;
    while s <= max {
        out.push(s);
        let next = match step {
            Some(st) => s.saturating_add(st.max(1)),
            None if s == 0 => 1,
            None => s.saturating_mul(factor.max(2)),
        };
        if next == s {
            break;
        }
        s = next;
    }
    out
}

/// Parses a byte count: `4096`, `64K`, `1M`, `2G` (powers of 1024; `KiB`/`MB`-style
/// suffixes and lower case accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 8, 64K, 1M, 1G)"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim(max: u64, min: u64, time_ms: Option<u64>) -> Limits {
        Limits {
            max_iters: max,
            min_iters: min,
            time: time_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn chunks_double_without_a_time_target_and_stop_at_max() {
        let l = lim(10, 1, None);
        let mut done = 1;
        let mut chunk = 1;
        let mut seen = vec![1];
        loop {
            let next = next_chunk(&l, done, chunk, Duration::ZERO);
            if next == 0 {
                break;
            }
            seen.push(next);
            done += next;
            chunk = next;
        }
        assert_eq!(seen, vec![1, 2, 4, 3]);
        assert_eq!(done, 10);
    }

    #[test]
    fn chunks_stop_at_the_time_target_once_min_iters_ran() {
        let l = lim(1_000_000, 5, Some(100));
        // 10 calls took 50 ms: 10 more fit.
        assert_eq!(next_chunk(&l, 10, 8, Duration::from_millis(50)), 10);
        // Past the target with enough calls: stop.
        assert_eq!(next_chunk(&l, 10, 8, Duration::from_millis(120)), 0);
        // Past the target but short of min_iters: just enough to reach it.
        assert_eq!(next_chunk(&l, 2, 2, Duration::from_millis(500)), 3);
        // Slow calls: never fewer than 1, never more than the time allows.
        assert_eq!(next_chunk(&l, 6, 4, Duration::from_millis(90)), 1);
        // Fast calls: capped by doubling.
        assert_eq!(next_chunk(&l, 4, 4, Duration::from_micros(4)), 8);
        // Below min_iters, slowness still lets the chunk reach min_iters within doubling.
        assert_eq!(next_chunk(&l, 1, 1, Duration::from_millis(99)), 2);
    }

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&mut []), 0.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile_sorted(&v, 0.99), 99.0);
        assert_eq!(quantile_sorted(&v, 0.0), 1.0);
        assert_eq!(quantile_sorted(&v, 1.0), 100.0);
    }

    #[test]
    fn size_sweeps() {
        assert_eq!(sizes(8, 64, 2, None), vec![8, 16, 32, 64]);
        assert_eq!(sizes(0, 4, 2, None), vec![0, 1, 2, 4]);
        assert_eq!(sizes(4, 100, 4, None), vec![4, 16, 64]);
        assert_eq!(sizes(10, 30, 2, Some(10)), vec![10, 20, 30]);
        assert_eq!(sizes(9, 8, 2, None), Vec::<u64>::new());
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("8"), Ok(8));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("lots").is_err());
    }
}
