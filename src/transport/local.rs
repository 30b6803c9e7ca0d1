//! In-process transport: ranks are threads of one process.
//!
//! Each rank has a mailbox (a queue behind a mutex plus a condition variable). A send copies
//! the payload into the receiver's mailbox and is done at once; `progress` on the receiving
//! side moves queued messages into posted buffers (one more copy) or hands them over whole
//! as kept messages. It exists so that tests and examples can run collectives with 1..64
//! ranks as threads, with no sockets and no sleeps.
//!
//! An endpoint that goes away tells every other rank, as a TCP connection would: dropping it
//! is a normal close ([`Events::peer_closed`] on the others), aborting it a failure
//! ([`Events::peer_failed`]). Messages it sent before are still delivered first.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::{Envelope, Events, Placement, RecvBuf, SendBuf, Sent, Stored, Token, Transport, Waker};
use crate::error::{Error, Result};

struct Message {
    from: usize,
    env: Envelope,
    data: Vec<u8>,
    what: What,
}

/// What a mailbox entry is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum What {
    /// A message.
    Data,
    /// The sender closed its endpoint normally.
    Closed,
    /// The sender aborted.
    Failed,
}

#[derive(Default)]
struct Mailbox {
    queue: Mutex<MailboxState>,
    ready: Condvar,
}

#[derive(Default)]
struct MailboxState {
    messages: VecDeque<Message>,
    /// Set by a waker: the next `wait` returns at once.
    poked: bool,
    /// Set when the owning rank is gone; senders then fail.
    closed: bool,
}

/// The shared part of a local world: one mailbox per rank.
pub struct LocalHub {
    boxes: Vec<Mailbox>,
}

impl LocalHub {
    /// A hub for `size` ranks.
    pub fn new(size: usize) -> Arc<LocalHub> {
        Arc::new(LocalHub {
            boxes: (0..size).map(|_| Mailbox::default()).collect(),
        })
    }

    /// The transport endpoint of `rank`.
    pub fn endpoint(self: &Arc<Self>, rank: usize) -> LocalTransport {
        LocalTransport {
            hub: Arc::clone(self),
            rank,
            batch: VecDeque::new(),
            gone: false,
        }
    }
}

/// One rank's endpoint of a [`LocalHub`].
pub struct LocalTransport {
    hub: Arc<LocalHub>,
    rank: usize,
    /// Messages taken from the mailbox, not yet delivered.
    batch: VecDeque<Message>,
    /// Closed or aborted: the other ranks have been told.
    gone: bool,
}

impl LocalTransport {
    /// Closes this rank's mailbox and tells every other rank how it went.
    fn leave(&mut self, what: What) {
        if self.gone {
            return;
        }
        self.gone = true;
        self.hub.boxes[self.rank].queue.lock().closed = true;
        for (peer, mailbox) in self.hub.boxes.iter().enumerate() {
            if peer == self.rank {
                continue;
            }
            let mut q = mailbox.queue.lock();
            if q.closed {
                continue;
            }
            q.messages.push_back(Message {
                from: self.rank,
                env: Envelope::default(),
                data: Vec::new(),
                what,
            });
            drop(q);
            mailbox.ready.notify_all();
        }
    }
}

impl Drop for LocalTransport {
    fn drop(&mut self) {
        self.leave(What::Closed);
    }
}

impl Transport for LocalTransport {
    fn name(&self) -> &'static str {
        "local"
    }

    unsafe fn send(
        &mut self,
        peer: usize,
        env: &Envelope,
        data: SendBuf,
        _token: Token,
    ) -> Result<Sent> {
        let mailbox = self
            .hub
            .boxes
            .get(peer)
            .ok_or_else(|| Error::invalid("send", "peer", format!("no local rank {peer}")))?;
        // SAFETY: the caller keeps `data` valid until the send completes (contract point 4);
        // it completes (Sent::Done) only after this copy.
        let bytes = unsafe { data.as_slice() }.to_vec();
        {
            let mut q = mailbox.queue.lock();
            if q.closed {
                return Err(Error::PeerLost {
                    rank: self.rank,
                    peer,
                    op: "send".into(),
                    detail: "the local rank's endpoint was dropped".into(),
                });
            }
            q.messages.push_back(Message {
                from: self.rank,
                env: *env,
                data: bytes,
                what: What::Data,
            });
        }
        mailbox.ready.notify_one();
        // The payload is copied: the send is done.
        Ok(Sent::Done)
    }

    unsafe fn fetch(
        &mut self,
        peer: usize,
        _handle: u64,
        _dst: RecvBuf,
        _token: Token,
    ) -> Result<()> {
        Err(Error::misbehaved(
            format!("local rank {peer}"),
            "fetch of a remote message, but the local transport keeps every message whole",
        ))
    }

    fn discard(&mut self, _peer: usize, _handle: u64) -> Result<()> {
        Ok(())
    }

    fn progress(&mut self, ev: &mut dyn Events) -> Result<bool> {
        {
            let mut q = self.hub.boxes[self.rank].queue.lock();
            q.poked = false;
            self.batch.extend(q.messages.drain(..));
        }
        let did = !self.batch.is_empty();
        while let Some(m) = self.batch.pop_front() {
            match m.what {
                What::Data => {}
                What::Closed => {
                    ev.peer_closed(m.from);
                    continue;
                }
                What::Failed => {
                    ev.peer_failed(
                        m.from,
                        Error::PeerLost {
                            rank: self.rank,
                            peer: m.from,
                            op: "local".into(),
                            detail: "that rank's communicator failed or was aborted".into(),
                        },
                    );
                    continue;
                }
            }
            match ev.incoming(m.from, &m.env, m.data.len()) {
                Placement::Into(buf, token) => {
                    // SAFETY: the communicator gave us exclusive use of `buf` (at least
                    // `len` bytes) until we report `token`.
                    let dst = unsafe { buf.as_mut_slice() };
                    dst[..m.data.len()].copy_from_slice(&m.data);
                    ev.recv_done(token);
                }
                Placement::Keep => ev.stored(m.from, m.env, Stored::Bytes(m.data)),
                Placement::Discard => {}
            }
        }
        Ok(did)
    }

    fn wait(&mut self, timeout: Duration) -> Result<()> {
        let mailbox = &self.hub.boxes[self.rank];
        let mut q = mailbox.queue.lock();
        if q.messages.is_empty() && !q.poked {
            mailbox.ready.wait_for(&mut q, timeout);
        }
        q.poked = false;
        Ok(())
    }

    fn waker(&self) -> Waker {
        let hub = Arc::clone(&self.hub);
        let rank = self.rank;
        Arc::new(move || {
            let mailbox = &hub.boxes[rank];
            mailbox.queue.lock().poked = true;
            mailbox.ready.notify_all();
        })
    }

    fn abort(&mut self) {
        self.batch.clear();
        self.leave(What::Failed);
    }
}
