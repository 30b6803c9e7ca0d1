//! The atomics the shared-memory ring is written against: `std`'s normally, loom's when
//! the crate is built with `--cfg loom` so that the ring's protocol can be model-checked
//! (see `transport/shm/ring.rs`, `mod loom_tests`, for the command).

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
