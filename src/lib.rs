//! ferrocomm: message passing and collective communication for distributed training and HPC.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod element;
pub mod error;
pub mod launch;
pub mod rendezvous;
pub mod transport;
pub mod wire;

pub use element::{DType, Element};
pub use error::{Error, Result};
