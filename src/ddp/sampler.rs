//! `DistributedSampler`: which examples of a data set each rank trains on, without moving
//! any data.
//!
//! Every node holds the whole data set. Every rank makes the same pseudo-random permutation
//! of `0..len` from `seed + epoch`, pads it by repeating its first indices (or trims it, with
//! `drop_last`) to a multiple of the world size, and takes indices `rank, rank + W,
//! rank + 2W, ...`. The shards are disjoint and, without padding, cover every index exactly
//! once per epoch; call [`DistributedSampler::set_epoch`] before each epoch, or every epoch
//! repeats the same order (as with PyTorch's sampler).
//!
//! The permutation is a Fisher-Yates shuffle driven by xoshiro256** seeded through
//! SplitMix64 (Blackman and Vigna): deterministic on every platform, independent of the
//! world size, and not the same sequence as PyTorch's (which uses its own generator).

use crate::error::{Error, Result};

/// The per-rank view of a data set for one epoch at a time. See the module documentation.
#[derive(Clone, Debug)]
pub struct DistributedSampler {
    len: usize,
    world: usize,
    rank: usize,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
    epoch: u64,
}

impl DistributedSampler {
    /// A sampler over a data set of `len` examples for `rank` of `world` ranks, shuffling
    /// (from `seed + epoch`) and padding; see the builder methods to change that.
    pub fn new(len: usize, world: usize, rank: usize) -> Result<DistributedSampler> {
        if world == 0 {
            return Err(Error::invalid(
                "DistributedSampler::new",
                "world",
                "must be at least 1",
            ));
        }
        if rank >= world {
            return Err(Error::invalid(
                "DistributedSampler::new",
                "rank",
                format!("{rank} is out of range for a world of {world}"),
            ));
        }
        Ok(DistributedSampler {
            len,
            world,
            rank,
            shuffle: true,
            seed: 0,
            drop_last: false,
            epoch: 0,
        })
    }

    /// Shuffle each epoch (default) or keep the data set's order.
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    /// The seed every rank must share (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Drop the tail that does not divide evenly among the ranks instead of padding it with
    /// repeated indices (default: pad).
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Sets the epoch: the permutation depends on `seed + epoch`.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Indices per rank per epoch: `ceil(len / world)`, or `floor(len / world)` with
    /// `drop_last`.
    pub fn num_samples(&self) -> usize {
        if self.drop_last {
            self.len / self.world
        } else {
            self.len.div_ceil(self.world)
        }
    }

    /// Indices of all ranks per epoch: `num_samples() * world`.
    pub fn total_size(&self) -> usize {
        self.num_samples() * self.world
    }

    /// This rank's indices for the current epoch, in training order.
    pub fn indices(&self) -> Vec<usize> {
        let order = self.epoch_order();
        order
            .into_iter()
            .skip(self.rank)
            .step_by(self.world)
            .collect()
    }

    /// The padded or trimmed order of the whole epoch, shared by every rank.
    fn epoch_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = Xoshiro256::new(self.seed.wrapping_add(self.epoch));
            // Fisher-Yates, from the back.
            for i in (1..order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        let total = self.total_size();
        if total <= order.len() {
            order.truncate(total);
        } else if !order.is_empty() {
            let mut k = 0;
            while order.len() < total {
                order.push(order[k]);
                k += 1;
            }
        }
        order
    }
}

impl IntoIterator for &DistributedSampler {
    type Item = usize;
    type IntoIter = std::vec::IntoIter<usize>;
    fn into_iter(self) -> Self::IntoIter {
        self.indices().into_iter()
    }
}

/// xoshiro256** (Blackman and Vigna, 2018), seeded through SplitMix64.
struct Xoshiro256 {
    s: [u64; 4],
}

impl Xoshiro256 {
    fn new(seed: u64) -> Xoshiro256 {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Xoshiro256 {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` (n > 0), without modulo bias (Lemire's method).
    fn below(&mut self, n: u64) -> u64 {
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all_ranks(
        len: usize,
        world: usize,
        seed: u64,
        epoch: u64,
        shuffle: bool,
        drop_last: bool,
    ) -> Vec<Vec<usize>> {
        (0..world)
            .map(|r| {
                let mut s = DistributedSampler::new(len, world, r)
                    .unwrap()
                    .seed(seed)
                    .shuffle(shuffle)
                    .drop_last(drop_last);
                s.set_epoch(epoch);
                s.indices()
            })
            .collect()
    }

    #[test]
    fn pads_like_pytorch_without_shuffle() {
        // 10 examples over 4 ranks: 3 each, the order padded with 0 and 1.
        let shards = all_ranks(10, 4, 0, 0, false, false);
        assert_eq!(
            shards,
            vec![vec![0, 4, 8], vec![1, 5, 9], vec![2, 6, 0], vec![3, 7, 1]]
        );
        let shards = all_ranks(10, 4, 0, 0, false, true);
        assert_eq!(shards, vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]);
        // More ranks than examples: padding repeats the data set as often as needed.
        let shards = all_ranks(2, 5, 0, 0, false, false);
        assert_eq!(shards, vec![vec![0], vec![1], vec![0], vec![1], vec![0]]);
        assert!(all_ranks(0, 3, 0, 0, true, false).iter().all(Vec::is_empty));
    }

    #[test]
    fn epochs_change_the_order_and_seeds_are_shared() {
        let a = all_ranks(1000, 4, 7, 0, true, false);
        let b = all_ranks(1000, 4, 7, 1, true, false);
        assert_ne!(a, b);
        assert_eq!(a, all_ranks(1000, 4, 7, 0, true, false));
        assert_ne!(a, all_ranks(1000, 4, 8, 0, true, false));
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(DistributedSampler::new(10, 0, 0).is_err());
        let err = DistributedSampler::new(10, 2, 2).unwrap_err().to_string();
        assert!(err.contains("rank") && err.contains("2"), "{err}");
    }

    proptest! {
        #[test]
        fn shards_partition_each_epoch(len in 0usize..500, world in 1usize..17, seed: u64, epoch in 0u64..5, shuffle: bool, drop_last: bool) {
            let shards = all_ranks(len, world, seed, epoch, shuffle, drop_last);
            let n = shards[0].len();
            prop_assert!(shards.iter().all(|s| s.len() == n), "equal shard sizes");
            let mut all: Vec<usize> = shards.concat();
            prop_assert!(all.iter().all(|&i| i < len.max(1)));
            all.sort_unstable();
            let distinct = { let mut d = all.clone(); d.dedup(); d.len() };
            if drop_last {
                prop_assert_eq!(n, len / world);
                prop_assert_eq!(distinct, all.len(), "no index twice");
            } else {
                prop_assert_eq!(n, len.div_ceil(world));
                prop_assert_eq!(distinct, len, "every index at least once");
                if len % world == 0 {
                    prop_assert_eq!(all, (0..len).collect::<Vec<_>>(), "exactly once without padding");
                }
            }
        }
    }
}
