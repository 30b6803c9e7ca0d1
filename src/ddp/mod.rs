//! Data-parallel training helpers: what `DistributedDataParallel`, `DistributedSampler` and
//! rank-0 checkpointing give PyTorch users.
//!
//! - [`broadcast_parameters`]: rank 0's parameter values to every rank, so replicas start
//!   equal.
//! - [`Reducer`]: gradients gathered into buckets and all-reduced while backward still runs;
//!   averaged gradients at the end of each step; gradient accumulation with
//!   [`Reducer::no_sync`]; errors for parameters marked twice, never marked, or registered
//!   differently on different ranks.
//! - [`DistributedSampler`]: disjoint per-rank shards of a data set, reshuffled per epoch.
//! - [`Checkpoint`] and [`CheckpointDir`]: named tensors in the safetensors format, saved
//!   atomically by rank 0, loadable anywhere, or read by rank 0 and broadcast
//!   ([`CheckpointDir::load_latest_broadcast`]) when the file system is not shared.
//!
//! A training step, as `examples/ddp_linear.rs` does it:
//!
//! ```
//! use ferrocomm::Communicator;
//! use ferrocomm::ddp::{ParamSpec, Reducer, ReducerOptions, broadcast_parameters};
//! let comms = Communicator::local_world(2);
//! std::thread::scope(|s| {
//!     for comm in comms {
//!         s.spawn(move || {
//!             let mut w = vec![comm.rank() as f32; 5];
//!             let mut b = vec![0.0f32];
//!             broadcast_parameters(&comm, [(&mut w).into(), (&mut b).into()]).unwrap();
//!             let specs = vec![ParamSpec::of::<f32>("w", &[1, 5]), ParamSpec::of::<f32>("b", &[1])];
//!             let mut reducer = Reducer::new(&comm, specs, ReducerOptions::default()).unwrap();
//!             // Backward: the last layer's gradients come first.
//!             reducer.mark_ready(1, &[comm.rank() as f32]).unwrap();
//!             reducer.mark_ready(0, &[1.0f32; 5]).unwrap();
//!             reducer.finish().unwrap();
//!             assert_eq!(reducer.grad::<f32>(1).unwrap(), &[0.5]); // (0 + 1) / 2
//!         });
//!     }
//! });
//! ```

pub mod buckets;
pub mod checkpoint;
pub mod reducer;
pub mod sampler;

pub use checkpoint::{Checkpoint, CheckpointDir, Tensor};
pub use reducer::{
    BucketState, ParamMut, ParamSpec, Reducer, ReducerOptions, broadcast_parameters,
};
pub use sampler::DistributedSampler;
