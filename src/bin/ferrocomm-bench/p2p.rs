//! Point-to-point benchmarks between ranks 0 and 1 (other ranks only take part in the
//! control messages): `latency` (osu_latency), `bandwidth` (osu_bw), `bibw` (osu_bibw).

use std::time::Instant;

use ferrocomm::Communicator;

use crate::values::{self, POISON, Val};
use crate::{BenchError, Kernel};

const TAG: u32 = 100;
const ACK: u32 = 101;

/// Receive buffers of one window never exceed this many bytes in all: the window shrinks
/// for large messages (as in `bench/peers/mpi-bench.c`).
pub const WINDOW_BYTES_CAP: u64 = 256 << 20;

/// The window used for messages of `bytes`: `window`, or fewer so that the window's receive
/// buffers fit in [`WINDOW_BYTES_CAP`].
pub fn effective_window(window: u64, bytes: u64) -> u64 {
    window.min((WINDOW_BYTES_CAP / bytes.max(1)).max(1)).max(1)
}

fn pattern<T: Val>(rank: usize, count: usize) -> Vec<T> {
    (0..count)
        .map(|i| T::small(values::input(rank, i, 2)))
        .collect()
}

fn first_mismatch<T: Val>(got: &[T], from: usize) -> Option<String> {
    let want = pattern::<T>(from, got.len());
    got.iter().zip(&want).position(|(g, w)| g != w).map(|i| {
        format!(
            "element {i} received from rank {from} is {:?}, expected {:?}",
            got[i], want[i]
        )
    })
}

/// Ping-pong: rank 0 sends, rank 1 sends back; a call's time is half the round trip.
pub struct Latency<'c, T> {
    comm: &'c Communicator,
    sbuf: Vec<T>,
    rbuf: Vec<T>,
}

impl<'c, T: Val> Latency<'c, T> {
    /// Buffers of `count` elements.
    pub fn new(comm: &'c Communicator, count: usize) -> Self {
        Latency {
            comm,
            sbuf: pattern(comm.rank(), count),
            rbuf: vec![T::small(POISON); count],
        }
    }
}

impl<T: Val> Kernel for Latency<'_, T> {
    fn call(&mut self) -> Result<f64, BenchError> {
        let c = self.comm;
        match c.rank() {
            0 => {
                let t = Instant::now();
                c.send(&self.sbuf, 1, TAG)?;
                c.recv(&mut self.rbuf, 1, TAG)?;
                Ok(t.elapsed().as_secs_f64() / 2.0)
            }
            1 => {
                c.recv(&mut self.rbuf, 0, TAG)?;
                c.send(&self.sbuf, 0, TAG)?;
                Ok(0.0)
            }
            _ => Ok(0.0),
        }
    }

    fn poison(&mut self) {
        self.rbuf.fill(T::small(POISON));
    }

    fn check(&self) -> Option<String> {
        match self.comm.rank() {
            r @ (0 | 1) => first_mismatch(&self.rbuf, 1 - r),
            _ => None,
        }
    }
}

/// Streaming: rank 0 starts `window` sends of one buffer, rank 1 `window` receives into
/// separate buffers; when all are done rank 1 sends a 1-byte acknowledgement. A call is one
/// window; rank 0 times it up to the acknowledgement. With `both`, ranks 0 and 1 stream to
/// each other at once and there is no acknowledgement (osu_bibw).
pub struct Stream<'c, T> {
    comm: &'c Communicator,
    both: bool,
    window: usize,
    sbuf: Vec<T>,
    rbufs: Vec<Vec<T>>,
    ack: [u8; 1],
}

impl<'c, T: Val> Stream<'c, T> {
    /// `window` messages of `count` elements per call, one way or (`both`) both ways.
    pub fn new(comm: &'c Communicator, count: usize, window: usize, both: bool) -> Self {
        let me = comm.rank();
        let receives = me == 1 || (both && me == 0);
        let rbufs = if receives {
            vec![vec![T::small(POISON); count]; window]
        } else {
            Vec::new()
        };
        Stream {
            comm,
            both,
            window,
            sbuf: pattern(me, count),
            rbufs,
            ack: [0],
        }
    }
}

impl<T: Val> Kernel for Stream<'_, T> {
    fn call(&mut self) -> Result<f64, BenchError> {
        let c = self.comm;
        let me = c.rank();
        if me > 1 {
            return Ok(0.0);
        }
        let peer = 1 - me;
        let t = Instant::now();
        let sends = me == 0 || self.both;
        let (sbuf, window) = (&self.sbuf, self.window);
        let rbufs = &mut self.rbufs;
        c.scope(|s| {
            let mut reqs = Vec::with_capacity(2 * window);
            for b in rbufs.iter_mut() {
                reqs.push(s.irecv(b.as_mut_slice(), peer, TAG)?);
            }
            if sends {
                for _ in 0..window {
                    reqs.push(s.isend(sbuf.as_slice(), peer, TAG)?);
                }
            }
            s.wait_all(reqs)
        })?;
        if !self.both {
            if me == 0 {
                c.recv(&mut self.ack, 1, ACK)?;
            } else {
                c.send(&self.ack, 0, ACK)?;
            }
        }
        Ok(t.elapsed().as_secs_f64())
    }

    fn poison(&mut self) {
        for b in &mut self.rbufs {
            b.fill(T::small(POISON));
        }
    }

    fn check(&self) -> Option<String> {
        let me = self.comm.rank();
        self.rbufs
            .iter()
            .find_map(|b| first_mismatch(b, 1usize.saturating_sub(me)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_shrink_for_large_messages() {
        assert_eq!(effective_window(64, 0), 64);
        assert_eq!(effective_window(64, 4 << 20), 64);
        assert_eq!(effective_window(64, 16 << 20), 16);
        assert_eq!(effective_window(64, 1 << 30), 1);
        assert_eq!(effective_window(0, 8), 1);
    }
}
