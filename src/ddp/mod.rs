//! Data-parallel training helpers: what `DistributedDataParallel`, `DistributedSampler` and
//! rank-0 checkpointing give PyTorch users.
//!
//! - [`DistributedSampler`]: disjoint per-rank shards of a data set, reshuffled per epoch.
//! - [`Checkpoint`] and [`CheckpointDir`]: named tensors in the safetensors format, saved
//!   atomically by rank 0, loadable anywhere.

pub mod buckets;
pub mod checkpoint;
pub mod sampler;

pub use checkpoint::{Checkpoint, CheckpointDir, Tensor};
pub use sampler::DistributedSampler;
