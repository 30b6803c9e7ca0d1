//! Transports: how bytes move between two ranks.
//!
//! # The contract every transport keeps
//!
//! A transport moves whole messages between ranks of one job. It knows nothing of tags,
//! communicators or collectives: each message carries an opaque [`Envelope`] that the
//! communicator layer wrote and reads back; the transport only carries it.
//!
//! 1. **Nothing blocks except [`Transport::wait`].** `send`, `fetch` and `progress` return
//!    at once; `progress` does all the I/O that can be done without blocking and reports what
//!    happened through [`Events`].
//! 2. **Several operations in flight.** Any number of sends and receives may be in flight at
//!    once, to the same peer or different ones (a ring step sends right while receiving
//!    left). Messages from one peer are announced to [`Events::incoming`] in the order that
//!    peer sent them.
//! 3. **Receives land in the user's buffer.** When a message is announced, the communicator
//!    either hands over the destination buffer ([`Placement::Into`]): the payload is then
//!    written there and nowhere else; or asks the transport to keep it
//!    ([`Placement::Keep`]): small messages are then read into a buffer the transport
//!    allocates (at most the eager limit), large ones stay at the sender until
//!    [`Transport::fetch`] names the buffer. A peer can never make a receiver allocate more
//!    than the eager limit for a message nobody posted.
//! 4. **Buffers are borrowed, not copied.** A buffer given to `send` or to `fetch`/`Into`
//!    stays valid and untouched by the caller until the transport reports the token done
//!    (or reports the peer failed). That is the `unsafe` part of the contract.
//! 5. **Failures are per peer and final.** When a peer dies or misbehaves, the transport
//!    reports [`Events::peer_failed`] once, forgets every buffer of that peer (they may be
//!    reused at once) and fails later operations on it.
//! 6. **Abort is immediate.** After [`Transport::abort`] no buffer is touched again.
//! 7. **Waiting is cheap.** [`Transport::wait`] blocks in the kernel (poll, futex) rather
//!    than spinning, and returns early when [`Transport::waker`]'s function is called from
//!    another thread.
//! 8. **Waits combine.** A transport whose readiness shows on a file descriptor (an epoll
//!    instance, a completion channel) says so with [`Transport::wait_fd`], which arms it
//!    (or says there is work now); the descriptor polls readable whenever `progress` may
//!    have new work. A process with several transports then sleeps in one place: in `poll`
//!    on all the descriptors when every transport has one, or in the one transport without
//!    a descriptor (shared memory's futex), woken through its [`Transport::waker`] by a
//!    helper thread that polls the other transports' descriptors only while that sleep
//!    lasts (see `comm::engine`).
//!
//! Implementations: [`tcp`] (mio, any two hosts), [`shm`] (rings in shared memory and
//! single-copy reads, ranks of one host), [`ibverbs`] (RDMA, feature `ibverbs`) and
//! [`local`] (threads of one process, for tests).

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
pub use crate::wire::Envelope;

pub mod ibverbs;
pub mod local;
pub mod shm;
pub mod tcp;

/// Identifies one submitted operation so its completion can be reported.
pub type Token = u64;

/// A borrowed send buffer: start and length. See the contract, point 4.
#[derive(Clone, Copy, Debug)]
pub struct SendBuf {
    /// First byte.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

// SAFETY: a SendBuf is only an address; the transport contract (point 4) makes the submitter
// keep the memory valid and unchanged while any thread may read it.
unsafe impl Send for SendBuf {}

impl SendBuf {
    /// Borrows `data` (the caller keeps it alive as the contract says).
    pub fn new(data: &[u8]) -> SendBuf {
        SendBuf {
            ptr: data.as_ptr(),
            len: data.len(),
        }
    }

    /// The bytes.
    ///
    /// # Safety
    /// The memory must still be valid (contract point 4).
    pub unsafe fn as_slice<'a>(&self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees ptr..ptr+len is live and not mutated.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A borrowed receive buffer: start and capacity. See the contract, point 4.
#[derive(Clone, Copy, Debug)]
pub struct RecvBuf {
    /// First byte.
    pub ptr: *mut u8,
    /// Capacity in bytes.
    pub len: usize,
}

// SAFETY: as for SendBuf; the submitter gives the transport exclusive use of the memory
// until the operation completes.
unsafe impl Send for RecvBuf {}

impl RecvBuf {
    /// Borrows `data` (the caller keeps it alive and untouched as the contract says).
    pub fn new(data: &mut [u8]) -> RecvBuf {
        RecvBuf {
            ptr: data.as_mut_ptr(),
            len: data.len(),
        }
    }

    /// The bytes.
    ///
    /// # Safety
    /// The memory must still be valid and not used by anyone else (contract point 4).
    pub unsafe fn as_mut_slice<'a>(&self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: the caller guarantees exclusive access to ptr..ptr+len.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// What [`Transport::send`] did with the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Complete already: the buffer may be reused, and the token is never reported.
    Done,
    /// In flight: the token is reported to [`Events::send_done`] when complete.
    Pending,
}

/// Where the payload of an announced message goes.
#[derive(Debug)]
pub enum Placement {
    /// Into this buffer (its length is at least the message's); report `token` when done.
    Into(RecvBuf, Token),
    /// Nobody wants it yet: keep it and report it with [`Events::stored`].
    Keep,
    /// Read and drop the payload (the receive already failed, e.g. its buffer was too small).
    Discard,
}

/// A message the transport keeps for later ([`Placement::Keep`]).
#[derive(Debug)]
pub enum Stored {
    /// A small message, read in full.
    Bytes(Vec<u8>),
    /// A large message still at the sender; fetch it with [`Transport::fetch`] (or drop it
    /// with [`Transport::discard`]). `len` is its length.
    Remote {
        /// The transport's handle for it.
        handle: u64,
        /// Its length in bytes.
        len: usize,
    },
}

/// What a transport reports from [`Transport::progress`]. Implemented by the communicator.
pub trait Events {
    /// A message of `len` bytes from `peer` is arriving: decide where it goes.
    fn incoming(&mut self, peer: usize, env: &Envelope, len: usize) -> Placement;
    /// A message the communicator asked to keep.
    fn stored(&mut self, peer: usize, env: Envelope, msg: Stored);
    /// The payload for `token` is complete in its buffer.
    fn recv_done(&mut self, token: Token);
    /// The send `token` is complete: its buffer may be reused.
    fn send_done(&mut self, token: Token);
    /// `peer` closed its communicator normally: nothing more will come from it, and it
    /// takes nothing more. Not a failure: only operations that need this peer fail.
    fn peer_closed(&mut self, peer: usize);
    /// `peer` is gone or broke the protocol. Every operation involving it has failed; its
    /// buffers are no longer used.
    fn peer_failed(&mut self, peer: usize, err: Error);
}

/// What a caller that waits on several transports at once should poll for this one
/// ([`Transport::wait_fd`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitFd {
    /// Work is pending now: don't sleep, call `progress`.
    Ready,
    /// Sleep until this descriptor is readable (then call `progress`), the timeout, or
    /// the waker (which makes it readable).
    Fd(std::os::fd::RawFd),
    /// The transport has no single descriptor; use [`Transport::wait`].
    Unsupported,
}

/// Wakes a thread blocked in [`Transport::wait`]; callable from any thread.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// One way of moving bytes between ranks. See the module documentation for the contract.
pub trait Transport: Send {
    /// Short name for logs and errors (`"tcp"`, `"local"`).
    fn name(&self) -> &'static str;

    /// Queues the message `data` with envelope `env` to `peer`. Returns [`Sent::Done`] when
    /// `data` may already be reused (it was copied out: `token` is then never reported), or
    /// [`Sent::Pending`]: `token` is reported to [`Events::send_done`] when it may.
    ///
    /// # Safety
    /// `data` must stay valid and unchanged until `token` is reported done or the peer
    /// reported failed (contract point 4).
    unsafe fn send(
        &mut self,
        peer: usize,
        env: &Envelope,
        data: SendBuf,
        token: Token,
    ) -> Result<Sent>;

    /// Moves the kept message `handle` of `peer` ([`Stored::Remote`]) into `dst`; reports
    /// `token` to [`Events::recv_done`] when it is there. `dst.len` equals the message length.
    ///
    /// # Safety
    /// `dst` must stay valid and unused by anyone else until `token` is reported done or the
    /// peer reported failed (contract point 4).
    unsafe fn fetch(&mut self, peer: usize, handle: u64, dst: RecvBuf, token: Token) -> Result<()>;

    /// Drops the kept message `handle` of `peer` without receiving it.
    fn discard(&mut self, peer: usize, handle: u64) -> Result<()>;

    /// Does all the I/O possible without blocking; reports events to `ev`. Returns whether
    /// anything happened.
    fn progress(&mut self, ev: &mut dyn Events) -> Result<bool>;

    /// Blocks until `progress` may have something to do, `timeout` passes, or the waker is
    /// called. May return early.
    fn wait(&mut self, timeout: Duration) -> Result<()>;

    /// Prepares to sleep like [`Transport::wait`] (arming whatever notification it needs)
    /// but lets the caller do the sleeping, so that one `poll(2)` covers several
    /// transports. The descriptor stays valid while the transport lives.
    fn wait_fd(&mut self) -> Result<WaitFd> {
        Ok(WaitFd::Unsupported)
    }

    /// A function that makes a concurrent or later [`Transport::wait`] return early.
    fn waker(&self) -> Waker;

    /// Gives up on everything in flight: forgets every borrowed buffer at once (the caller
    /// may reuse them as soon as this returns) and closes the connections. Used when the
    /// communicator fails for good (timeout, abort).
    fn abort(&mut self);
}
