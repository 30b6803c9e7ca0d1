//! ferrocomm: message passing and collective communication for distributed training and HPC.
//!
//! A program starts N processes (ranks) on one or many machines; they find each other
//! through a rendezvous store, connect over the best transport each pair has, and exchange
//! messages point-to-point or in collectives.
//!
//! ```
//! // Ranks as threads of one process (tests, examples); under `ferrorun` a process calls
//! // `ferrocomm::init()` instead and gets the same `Communicator`.
//! let comms = ferrocomm::Communicator::local_world(4);
//! std::thread::scope(|s| {
//!     for comm in comms {
//!         s.spawn(move || -> ferrocomm::Result<()> {
//!             let (me, n) = (comm.rank(), comm.size());
//!             let mut left = [0u32];
//!             comm.sendrecv(&[me as u32], (me + 1) % n, 0, &mut left, (me + n - 1) % n, 0u32)?;
//!             assert_eq!(left[0] as usize, (me + n - 1) % n);
//!             // Every rank contributes me + 1; every rank gets the sum.
//!             let mut grad = [me as f32 + 1.0; 3];
//!             comm.all_reduce(&mut grad, ferrocomm::ReduceOp::Sum)?;
//!             assert_eq!(grad, [(n * (n + 1) / 2) as f32; 3]);
//!             comm.barrier()
//!         });
//!     }
//! });
//! ```
//!
//! Where things are: [`init`] / [`InitOptions`] join a job (`tcp://`, `env://`, `file://`;
//! [`rendezvous`] holds the stores); [`Communicator`] has point-to-point, the collectives
//! ([`collective`]: algorithms, selection, asynchronous forms) and sub-communicators;
//! [`transport`] holds the TCP, shared-memory, in-process and (feature `ibverbs`) verbs
//! transports; [`ddp`] the data-parallel helpers (Reducer, DistributedSampler, checkpoints);
//! [`launch`] the `ferrorun` launcher. See the README for the walk-through, the launcher,
//! init methods and settings.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod auth;
pub mod collective;
pub mod comm;
mod config;
pub mod ddp;
pub mod element;
pub mod error;
pub mod launch;
mod logging;
pub mod rendezvous;
mod sync;
mod sys;
pub mod transport;
pub mod wire;

pub use collective::{Algorithm, AllReduceAlgo, AllReduceOptions, CollHandle};
pub use comm::{CommConfig, Communicator, RawRequest, Request, Scope, Source, Status, Tag, init};
pub use element::{DType, Element, ReduceOp};
pub use error::{Error, Result};
pub use logging::init_logging;
pub use rendezvous::InitOptions;

/// The README's examples, compiled as doc tests so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
