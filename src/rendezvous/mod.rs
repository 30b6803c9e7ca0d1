//! Bootstrap: how the processes of one job find each other.
//!
//! (Being written: see the interface notes in the task description.)

pub mod file_store;
pub mod host;
pub mod protocol;
pub mod store;
pub mod tcp_store;
pub use store::{PrefixStore, Store};
pub use file_store::FileStore;
pub use tcp_store::{ServerConfig, TcpStore, TcpStoreServer};
