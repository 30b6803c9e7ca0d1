//! Bootstrap: how the processes of one job find each other.
//!
//! (Being written: see the interface notes in the task description.)

pub mod host;
pub mod protocol;
pub mod store;
pub mod tcp_store;
pub use store::{PrefixStore, Store};
pub use tcp_store::{ServerConfig, TcpStore, TcpStoreServer};
