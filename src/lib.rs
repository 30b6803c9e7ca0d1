//! ferrocomm: message passing and collective communication for distributed training and HPC.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod collective;
pub mod comm;
mod config;
pub mod element;
pub mod error;
pub mod launch;
mod logging;
pub mod rendezvous;
pub mod transport;
pub mod wire;

pub use comm::{CommConfig, Communicator, RawRequest, Request, Scope, Source, Status, Tag, init};
pub use element::{DType, Element};
pub use error::{Error, Result};
pub use logging::init_logging;
pub use rendezvous::InitOptions;
