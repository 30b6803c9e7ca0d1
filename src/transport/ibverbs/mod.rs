//! InfiniBand / RoCE verbs transport (cargo feature `ibverbs`, through `rdma-sys`).
//!
//! It keeps the [transport contract](crate::transport) over reliable-connected (RC) queue
//! pairs. [`proto`] (always compiled, no verbs) holds the protocol logic and its unit
//! tests; `verbs` (feature `ibverbs`) is the only code that calls libibverbs; `transport`
//! (feature `ibverbs`) is `IbvTransport`. docs/ibverbs.md compares the design with
//! NCCL's and UCX's.
//!
//! # Connections
//!
//! One RC queue pair per peer, all sharing one completion queue (sends and receives) and
//! one protection domain. Before the store exchange a rank publishes its port under the
//! `"ibverbs"` key of its [`PeerInfo`](crate::rendezvous::PeerInfo) addresses
//! ([`proto::PortInfo`]: device, port, LID, GID and its index, active MTU, link layer,
//! whether verbs was forced). A pair uses verbs when both published a port, the ports are
//! on the same fabric ([`proto::PortInfo::same_fabric`]) and the ranks are on different
//! hosts, or both forced verbs (`FERROCOMM_TRANSPORT=ibverbs`); every rank evaluates that
//! same symmetric rule. After the join each rank creates its queue pairs (INIT, receives
//! posted), publishes one store key `ibverbs/qp/<rank>` with a line per peer
//! ([`proto::QpInfo`]: QPN, PSN, receive buffer count and size, keepalive target), reads
//! its peers' keys, moves each queue pair to RTR and RTS, and then waits for every peer's
//! `ibverbs/ready/<rank>` key, so nobody sends to a queue pair that cannot receive yet.
//! (An eager full mesh through the store: fine for hundreds of ranks; lazy connection
//! through a side channel is future work.)
//!
//! # Messages
//!
//! Every SEND starts with a 64-byte [`proto::Header`]. By size (defaults; all tunable):
//!
//! | size | path | copies (sender + receiver) | verbs operations |
//! |---|---|---|---|
//! | header + payload <= inline size (128 B: payload <= 64 B) | inline SEND | 1 into the WQE + 1 out of the receive buffer | 1 SEND |
//! | <= eager limit (8 KiB) | eager SEND from a registered send buffer | 1 + 1 | 1 SEND |
//! | < zero-copy threshold (256 KiB) | rendezvous, then fragments through the eager buffers, pipelined by the credit window | 1 + 1 | RTS, CTS, one SEND per 8 KiB |
//! | >= zero-copy threshold | rendezvous, then RDMA write with immediate into the user's registered buffer | 0 + 0 | RTS, CTS, 1 WRITE_WITH_IMM (per GiB) |
//!
//! A message the receiver has not posted a buffer for is announced to the communicator
//! as usual: small ones are copied out of the receive buffer into a `Vec` (at most the
//! eager limit, contract point 3); large ones stay at the sender (only the `Rts` arrived)
//! until [`Transport::fetch`](crate::transport::Transport::fetch) names a buffer. The
//! receiver decides the path of a large message in its `Cts`: zero-copy when it is over
//! the threshold and its buffer registers; the sender falls back to fragments when its own
//! buffer does not register. The last write's immediate data is the message id, so the
//! receiver learns the data is complete from one receive completion (no extra FIN).
//!
//! # Credits
//!
//! [`proto::Credits`]: each peer may have at most as many SENDs (and writes with
//! immediate) outstanding as the receiver posted buffers for it (32 data + 2 control by
//! default); returned credits ride on every header, and an explicit `Credit` message goes
//! when half the window is owed and nothing else goes back. A sender never overruns a
//! receiver, so receiver-not-ready retries never happen.
//!
//! # Registration
//!
//! Registrations of user buffers go through [`proto::RegCache`], shared by concurrent
//! transfers of the same buffer. By default a registration is dropped after its last
//! transfer (a freed and reused buffer can never see a stale registration); with
//! `FERROCOMM_IB_REG_CACHE=<bytes>` idle ones are kept, which is only safe for programs
//! that keep their buffers (see [`proto::RegCache`]).
//!
//! # Waiting and failures
//!
//! `progress` polls the completion queue (no system call). `wait` arms the completion
//! queue, polls it once more (a completion may have slipped in before the arming), and
//! sleeps in `epoll_wait` on the completion channel's fd and an eventfd that the waker
//! writes; the communicator spins on `progress` for `FERROCOMM_SPIN_US` before it calls
//! `wait`. [`Transport::wait_fd`](crate::transport::Transport::wait_fd) exposes that epoll
//! fd so a communicator with several transports sleeps on all of them at once.
//!
//! A completion with a bad status fails its peer with an error naming the peer and the
//! verbs status text (`ibv_wc_status_str`). A peer whose process died does not answer: an
//! 8-byte RDMA write probes every live peer once a second (`FERROCOMM_IB_KEEPALIVE`) while
//! the transport is driven, and exhausts its retries (about 0.5 s) against a dead one,
//! which then fails. A peer that closes normally sends `Bye` first.

pub mod proto;

#[cfg(feature = "ibverbs")]
mod transport;
#[cfg(feature = "ibverbs")]
pub mod verbs;

#[cfg(feature = "ibverbs")]
pub use transport::{IbDevice, IbvTransport, NoDevice, open_device};
