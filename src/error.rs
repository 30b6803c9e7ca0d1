//! The one error type of ferrocomm.
//!
//! Every message says what happened, where (rank, peer, operation) and, where there is
//! something to do, what to do. Variants fall into a few families, so that callers can
//! decide what to do without parsing text:
//!
//! | family | variants | communicator afterwards |
//! |---|---|---|
//! | API misuse | [`Error::InvalidArgument`], [`Error::Config`] | still usable |
//! | a peer failed | [`Error::PeerLost`], [`Error::PeerMisbehaved`], [`Error::CollectiveMismatch`] | unusable (sticky) |
//! | waiting too long | [`Error::Timeout`] | unusable for collectives |
//! | bootstrap | [`Error::JobMismatch`], [`Error::Timeout`] | no communicator was made |
//! | local failure | [`Error::Io`], [`Error::Aborted`] | unusable (sticky) |
//!
//! "Sticky" means that once a communicator has seen the error, every later operation on it
//! returns the same error: a half-finished collective cannot be resumed safely.

use std::time::Duration;

/// Result type of every fallible ferrocomm function.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in ferrocomm.
#[derive(Debug, thiserror::Error, Clone)]
#[non_exhaustive]
pub enum Error {
    /// A function was called with an argument it cannot accept (API misuse). Nothing was sent
    /// or changed; fix the call.
    #[error("invalid argument `{arg}` to {op}: {why}")]
    InvalidArgument {
        /// The operation that was called (`send`, `all_reduce`, `init_process_group`...).
        op: String,
        /// The argument at fault.
        arg: String,
        /// Why it was refused, with the value and the accepted range.
        why: String,
    },

    /// A configuration value (environment variable, URL, option) is malformed or out of range.
    #[error("bad configuration {name}={value:?}: {why}")]
    Config {
        /// The variable, option or URL part.
        name: String,
        /// The value that was given.
        value: String,
        /// Why it was refused and what is accepted.
        why: String,
    },

    /// Waiting for something took longer than the configured timeout.
    #[error("timed out after {:.1?} in {op}: {detail}", waited)]
    Timeout {
        /// What was being waited for (`rendezvous`, `all_reduce`, `recv from rank 3`...).
        op: String,
        /// How long it waited.
        waited: Duration,
        /// Who is missing or stuck, the store address, and which setting raises the limit.
        detail: String,
    },

    /// A peer disappeared: its connection closed or its process died while an operation
    /// depended on it. The communicator is unusable afterwards.
    #[error("rank {rank}: lost peer rank {peer} during {op}: {detail}")]
    PeerLost {
        /// The rank reporting the loss (in the world communicator).
        rank: usize,
        /// The rank that was lost (in the world communicator).
        peer: usize,
        /// The operation that needed the peer.
        op: String,
        /// What was observed (connection reset, end of stream, process gone).
        detail: String,
    },

    /// A peer (or a stranger) sent bytes that break the protocol: garbage, a truncated frame,
    /// an impossible length. The connection is closed.
    #[error("protocol violation by {peer}: {detail}")]
    PeerMisbehaved {
        /// Who sent it (`rank 2`, `store client 127.0.0.1:40312`...).
        peer: String,
        /// What was wrong with it.
        detail: String,
    },

    /// A process reached the rendezvous of another job (other job id or world size).
    #[error("job mismatch at store {store}: {detail}")]
    JobMismatch {
        /// The store address that was reached.
        store: String,
        /// What differs, on both sides, and what to check.
        detail: String,
    },

    /// Ranks called different collectives (or the same with different arguments) at the same
    /// point of their sequence.
    #[error("collective mismatch on rank {rank}: {detail}")]
    CollectiveMismatch {
        /// The rank that noticed.
        rank: usize,
        /// Both calls: this rank's and the peer's (op, type, count, root).
        detail: String,
    },

    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and where.
        context: String,
        /// The underlying error (shared so the error stays `Clone` and can be sticky).
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },

    /// The communicator was aborted (by `abort()` or by a fatal error on another thread).
    #[error("aborted: {0}")]
    Aborted(String),
}

impl Error {
    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid(op: impl Into<String>, arg: impl Into<String>, why: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op: op.into(),
            arg: arg.into(),
            why: why.into(),
        }
    }

    /// Builds an [`Error::Config`].
    pub fn config(
        name: impl Into<String>,
        value: impl Into<String>,
        why: impl Into<String>,
    ) -> Self {
        Error::Config {
            name: name.into(),
            value: value.into(),
            why: why.into(),
        }
    }

    /// Builds an [`Error::Io`] from an I/O error and what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source: std::sync::Arc::new(source),
        }
    }

    /// Builds an [`Error::PeerMisbehaved`].
    pub fn misbehaved(peer: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::PeerMisbehaved {
            peer: peer.into(),
            detail: detail.into(),
        }
    }

    /// True when the error leaves the communicator unusable (every later call fails with it).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Error::InvalidArgument { .. } | Error::Config { .. })
    }

    /// True for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

/// Adds context to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    /// Turns an I/O error into [`Error::Io`] with the context produced by `f`.
    fn ctx<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}
