//! Bootstrap: how the processes of one job find each other.
//!
//! (Being written: see the interface notes in the task description.)

pub mod host;
pub mod protocol;
pub mod store;

pub use store::{PrefixStore, Store};

