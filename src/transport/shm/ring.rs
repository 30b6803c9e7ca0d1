//! The single-producer single-consumer byte ring of the shared-memory transport, and the
//! doorbell a sleeping reader is woken with.
//!
//! # Layout
//!
//! A ring is a `RingHeader` followed by `cap` bytes of data (`cap` a power of two, a
//! multiple of `LINE`). Positions count bytes ever written; the consumer owns `head`
//! (bytes consumed), on its own cache line; the producer keeps its write position to
//! itself. The bytes from `head` up to the producer's position belong to the consumer, the
//! rest to the producer. There are no locks.
//!
//! # Records and stamps
//!
//! A record is one 64-byte header line, then its payload padded to whole lines, so records
//! always start on a cache line and a header never wraps (a payload may wrap and is then
//! copied in two parts). The header's first 8 bytes are its *stamp*: the record's position
//! plus one, XORed with the ring's random `key`. The producer writes the rest of the record,
//! then the stamp with a release store; the consumer polls the stamp at `head` with acquire
//! loads and reads the record once the stamp matches its position. So the consumer waits on
//! the very line it then reads: a small message (whose payload fits in the header, see the
//! transport) costs one cache-line transfer from producer to consumer. A stale line of an
//! earlier lap cannot match: an old header's stamp names an old position, and payload bytes
//! would have to equal a position XOR a random 64-bit key. Header bytes 8..12 hold the
//! payload length; bytes 12..64 are the caller's (`FIELDS`).
//!
//! The consumer hands space back by storing `head` (release), lazily (see the transport);
//! the producer reads `head` (acquire) only when its cached copy shows too little room.
//! Records are never split: the producer waits (its caller queues) until the whole record
//! fits. A record can be at most `cap` bytes.
//!
//! # Doorbell
//!
//! A reader that found nothing to do sleeps on a futex: the doorbell's `state` word, with a
//! `SLEEPING` bit (set by the reader) and a `PENDING` bit (set by writers). Every change is
//! a read-modify-write of that one word, so all of them are totally ordered:
//!
//! - a writer, after publishing a record, does `fetch_or(PENDING)` and calls `futex_wake`
//!   only if it saw `SLEEPING` (no system call while the reader is awake);
//! - the reader does `swap(SLEEPING)`: if it saw `PENDING`, something was published since
//!   it last looked and it does not sleep; otherwise it looks at its rings once more and
//!   sleeps with `futex_wait(state, SLEEPING)`.
//!
//! A writer whose `fetch_or` comes after the reader's `swap` sees `SLEEPING` and wakes it
//! (the futex call either finds the reader queued or makes its wait return at once, since
//! the word changed); one whose `fetch_or` comes before is seen by the swap, which also
//! acquires what the writer published. No wake-up is lost, and no fence is needed.
//!
//! The protocol is model-checked with loom (`mod loom_tests`) and stress-tested with
//! threads (`mod tests`).

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicU32, AtomicU64, Ordering, fence};

/// Alignment of records: one cache line.
pub(crate) const LINE: usize = 64;
/// Bytes of a record header.
pub(crate) const RECORD_HEADER: usize = 64;

/// The producer is still sending.
pub(crate) const OPEN: u32 = 0;
/// The producer closed normally: what is in the ring is all there will be.
pub(crate) const CLOSED: u32 = 1;
/// The producer aborted: data it lent for single-copy reads may have changed.
pub(crate) const ABORTED: u32 = 2;

/// The shared header of one ring. All-zero bytes are a valid, empty, open ring, except
/// that its `key` must be set (by the ring's owner, before peers attach).
#[repr(C)]
pub(crate) struct RingHeader {
    /// Bytes the consumer has released (monotonic).
    pub head: CachePadded<AtomicU64>,
    /// Written by the producer only.
    pub producer: CachePadded<ProducerState>,
    /// Mixed into every stamp; random, fixed at creation.
    pub key: CachePadded<AtomicU64>,
    /// Single-copy writes the *consumer* has in progress into the producer's memory (the
    /// second half of a split copy, see the transport). The producer, before it takes a
    /// lent buffer back, marks itself aborted and waits for this to drop to zero.
    pub remote_writes: CachePadded<AtomicU32>,
}

/// The producer's flags, on their own cache line.
#[repr(C)]
pub(crate) struct ProducerState {
    /// Non-zero while the producer has records queued that did not fit: the consumer then
    /// rings the producer's doorbell after releasing space.
    pub waiting: AtomicU32,
    /// [`OPEN`], [`CLOSED`] or [`ABORTED`].
    pub state: AtomicU32,
}

impl RingHeader {
    /// A fresh header (for rings not in a shared mapping: tests).
    #[cfg(test)]
    pub(crate) fn new() -> RingHeader {
        RingHeader {
            head: CachePadded::new(AtomicU64::new(0)),
            producer: CachePadded::new(ProducerState {
                waiting: AtomicU32::new(0),
                state: AtomicU32::new(OPEN),
            }),
            key: CachePadded::new(AtomicU64::new(0x9e37_79b9_7f4a_7c15)),
            remote_writes: CachePadded::new(AtomicU32::new(0)),
        }
    }
}

/// The futex word a process sleeps on. All-zero bytes are a valid doorbell.
#[repr(C)]
pub(crate) struct Doorbell {
    /// `SLEEPING | PENDING` bits; the futex word.
    pub state: AtomicU32,
}

/// The owner sleeps, or is about to.
const SLEEPING: u32 = 1;
/// Something was published since the owner last announced a sleep.
const PENDING: u32 = 2;

impl Doorbell {
    /// A fresh doorbell (tests).
    #[cfg(test)]
    pub(crate) fn new() -> Doorbell {
        Doorbell {
            state: AtomicU32::new(0),
        }
    }

    /// The sleeper's first step: announce the sleep. Returns `false` when something was
    /// published meanwhile (do not sleep). Otherwise the caller looks at every ring it reads
    /// once more and, finding nothing, sleeps in `futex_wait(&state, SLEEPING_VALUE)`
    /// ([`Doorbell::sleeping_value`]). Either way it calls [`Doorbell::end_sleep`].
    pub(crate) fn begin_sleep(&self) -> bool {
        self.state.swap(SLEEPING, Ordering::AcqRel) & PENDING == 0
    }

    /// The value the futex sleeps on.
    pub(crate) fn sleeping_value() -> u32 {
        SLEEPING
    }

    /// The sleeper is awake again (acquires what writers published while it slept).
    pub(crate) fn end_sleep(&self) {
        self.state.swap(0, Ordering::AcqRel);
    }

    /// A writer's step after publishing (or another thread's request to return from the
    /// wait): returns whether the owner sleeps and must be woken with `futex_wake`.
    pub(crate) fn notify(&self) -> bool {
        self.state.fetch_or(PENDING, Ordering::AcqRel) & SLEEPING != 0
    }
}

/// The data bytes of a ring, as the ring core accesses them.
pub(crate) trait RingMem {
    /// Capacity in bytes.
    fn cap(&self) -> usize;
    /// The stamp of the line at `off` (a multiple of [`LINE`]): its first 8 bytes, as an
    /// atomic. Those bytes are only ever accessed through this.
    fn stamp(&self, off: usize) -> &AtomicU64;
    /// Copies `src` to `off..off + src.len()`.
    ///
    /// # Safety
    /// The range is inside the ring and owned by the caller under the ring protocol (the
    /// producer's free part).
    unsafe fn write(&self, off: usize, src: &[u8]);
    /// Copies `off..off + dst.len()` into `dst`.
    ///
    /// # Safety
    /// The range is inside the ring and owned by the caller under the ring protocol (the
    /// consumer's published part).
    unsafe fn read(&self, off: usize, dst: &mut [u8]);
}

/// Ring bytes at a raw address (a shared mapping).
pub(crate) struct RawMem {
    ptr: *mut u8,
    cap: usize,
}

// SAFETY: RawMem is an address; accesses through it follow the ring protocol, which gives
// each byte range to one side at a time, whichever thread or process that side runs on.
unsafe impl Send for RawMem {}
// SAFETY: as above.
unsafe impl Sync for RawMem {}

impl RawMem {
    /// Ring bytes at `ptr..ptr + cap`.
    ///
    /// # Safety
    /// The range must stay mapped and writable while the value is used, and be accessed by
    /// others only under the ring protocol.
    pub(crate) unsafe fn new(ptr: *mut u8, cap: usize) -> RawMem {
        RawMem { ptr, cap }
    }
}

impl RingMem for RawMem {
    fn cap(&self) -> usize {
        self.cap
    }
    fn stamp(&self, off: usize) -> &AtomicU64 {
        assert!(off < self.cap && off.is_multiple_of(LINE));
        // SAFETY: in range (asserted) and 8-aligned (lines are 64-aligned in a page-aligned
        // mapping); all-zero bytes are a valid AtomicU64; the mapping outlives `self`
        // (RawMem's contract). These 8 bytes are only accessed atomically.
        unsafe { &*self.ptr.add(off).cast::<AtomicU64>() }
    }
    unsafe fn write(&self, off: usize, src: &[u8]) {
        debug_assert!(off + src.len() <= self.cap);
        // SAFETY: in range (caller), and the caller owns these bytes; `src` is ours and
        // cannot overlap the shared mapping's producer part that only we write.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) }
    }
    unsafe fn read(&self, off: usize, dst: &mut [u8]) {
        debug_assert!(off + dst.len() <= self.cap);
        // SAFETY: in range and published to us (caller); `dst` is exclusively ours.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) }
    }
}

/// Rounds `n` up to a whole number of lines.
pub(crate) fn pad(n: usize) -> usize {
    n.div_ceil(LINE) * LINE
}

/// Bytes a record with `payload` bytes of payload takes in the ring.
pub(crate) fn record_size(payload: usize) -> usize {
    RECORD_HEADER + pad(payload)
}

/// The largest payload of a record that fits in a ring of `cap` bytes.
#[cfg(test)]
pub(crate) fn max_payload(cap: usize) -> usize {
    cap - RECORD_HEADER
}

/// Copies `src` into the ring at stream position `pos`, wrapping at the end.
///
/// # Safety
/// `[pos, pos + src.len())` is the caller's under the ring protocol and `src.len() <= cap`.
unsafe fn copy_in(mem: &impl RingMem, pos: u64, src: &[u8]) {
    let cap = mem.cap();
    let off = (pos % cap as u64) as usize;
    let first = src.len().min(cap - off);
    // SAFETY: both parts are inside the ring and inside the caller's range.
    unsafe {
        mem.write(off, &src[..first]);
        if first < src.len() {
            mem.write(0, &src[first..]);
        }
    }
}

/// Copies from the ring at stream position `pos` into `dst`, wrapping at the end.
///
/// # Safety
/// `[pos, pos + dst.len())` is the caller's under the ring protocol and `dst.len() <= cap`.
unsafe fn copy_out(mem: &impl RingMem, pos: u64, dst: &mut [u8]) {
    let cap = mem.cap();
    let off = (pos % cap as u64) as usize;
    let first = dst.len().min(cap - off);
    // SAFETY: both parts are inside the ring and inside the caller's range.
    unsafe {
        let (a, b) = dst.split_at_mut(first);
        mem.read(off, a);
        if !b.is_empty() {
            mem.read(0, b);
        }
    }
}

/// Bytes of a record header the caller fills (header bytes 12..64).
pub(crate) const FIELDS: usize = RECORD_HEADER - 12;

fn stamp_of(pos: u64, key: u64) -> u64 {
    (pos + 1) ^ key
}

/// The producer's private state (kept in its own process, not in the shared mapping).
#[derive(Debug)]
pub(crate) struct Producer {
    tail: u64,
    head_cache: u64,
    cap: u64,
    key: u64,
}

impl Producer {
    /// A producer for the empty ring `hdr` of `cap` bytes.
    pub(crate) fn new(hdr: &RingHeader, cap: usize) -> Producer {
        Producer {
            tail: 0,
            head_cache: 0,
            cap: cap as u64,
            key: hdr.key.load(Ordering::Relaxed),
        }
    }

    /// Bytes free now, looking at the consumer's `head` again if the cached value shows
    /// less than `want`.
    pub(crate) fn free(&mut self, hdr: &RingHeader, want: usize) -> usize {
        let free = self.cap - (self.tail - self.head_cache);
        if free >= want as u64 {
            return free as usize;
        }
        self.head_cache = hdr.head.load(Ordering::Acquire);
        (self.cap - (self.tail - self.head_cache)) as usize
    }

    /// Writes one record (header `fields`, then `payload`) and publishes it. Returns `false`,
    /// and writes nothing, if it does not fit now.
    ///
    /// # Safety
    /// `mem` is the data of the ring `hdr` heads, and this is its only producer.
    pub(crate) unsafe fn push(
        &mut self,
        hdr: &RingHeader,
        mem: &impl RingMem,
        fields: &[u8; FIELDS],
        payload: &[u8],
    ) -> bool {
        let size = record_size(payload.len());
        if size as u64 > self.cap || self.free(hdr, size) < size {
            return false;
        }
        let mut h = [0u8; RECORD_HEADER - 8];
        h[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[4..].copy_from_slice(fields);
        let off = (self.tail % self.cap) as usize;
        // SAFETY: `size` bytes from `tail` are free, hence ours; the header line does not
        // wrap (records start on lines, `cap` is a multiple of LINE); bytes 0..8 of it are
        // the stamp, written atomically below.
        unsafe {
            mem.write(off + 8, &h);
            copy_in(mem, self.tail + RECORD_HEADER as u64, payload);
        }
        mem.stamp(off)
            .store(stamp_of(self.tail, self.key), Ordering::Release);
        self.tail += size as u64;
        true
    }
}

/// A record header from the ring is impossible: the peer is broken or hostile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Corrupt(pub String);

/// The consumer's private state.
#[derive(Debug)]
pub(crate) struct Consumer {
    head: u64,
    released: u64,
    cap: u64,
    key: u64,
}

impl Consumer {
    /// A consumer for the empty ring `hdr` of `cap` bytes.
    pub(crate) fn new(hdr: &RingHeader, cap: usize) -> Consumer {
        Consumer {
            head: 0,
            released: 0,
            cap: cap as u64,
            key: hdr.key.load(Ordering::Relaxed),
        }
    }

    /// Whether the producer has published a record not yet consumed.
    pub(crate) fn has_data(&self, mem: &impl RingMem) -> bool {
        let off = (self.head % self.cap) as usize;
        mem.stamp(off).load(Ordering::Acquire) == stamp_of(self.head, self.key)
    }

    /// The header fields of the next record and its payload length, if one is published.
    ///
    /// # Safety
    /// `mem` is the data of the ring, and this is its only consumer.
    pub(crate) unsafe fn peek(
        &mut self,
        mem: &impl RingMem,
    ) -> Result<Option<([u8; FIELDS], usize)>, Corrupt> {
        if !self.has_data(mem) {
            return Ok(None);
        }
        let off = (self.head % self.cap) as usize;
        let mut h = [0u8; RECORD_HEADER - 8];
        // SAFETY: the stamp (acquired) says the whole record is published; the header
        // line does not wrap.
        unsafe { mem.read(off + 8, &mut h) };
        let payload = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if record_size(payload) as u64 > self.cap {
            return Err(Corrupt(format!(
                "a record claims {payload} payload bytes, more than the ring holds ({})",
                self.cap
            )));
        }
        let mut fields = [0u8; FIELDS];
        fields.copy_from_slice(&h[4..]);
        Ok(Some((fields, payload)))
    }

    /// Copies payload bytes `skip..skip + dst.len()` of the record [`Consumer::peek`]
    /// returned.
    ///
    /// # Safety
    /// As for `peek`; the range lies within the record's payload (published with it).
    pub(crate) unsafe fn read_payload(&self, mem: &impl RingMem, skip: usize, dst: &mut [u8]) {
        // SAFETY: the caller keeps within the peeked record, which is published.
        unsafe { copy_out(mem, self.head + (RECORD_HEADER + skip) as u64, dst) }
    }

    /// Moves past the record peeked last (its payload length is `payload`). The bytes are
    /// given back to the producer at the next [`Consumer::release`].
    pub(crate) fn consume(&mut self, payload: usize) {
        self.head += record_size(payload) as u64;
    }

    /// Bytes consumed but not yet handed back.
    pub(crate) fn unreleased(&self) -> usize {
        (self.head - self.released) as usize
    }

    /// Publishes `head`, handing consumed bytes back. Returns whether anything was released
    /// (the caller then checks whether the producer waits for space).
    pub(crate) fn release(&mut self, hdr: &RingHeader) -> bool {
        if self.released == self.head {
            return false;
        }
        self.released = self.head;
        hdr.head.store(self.head, Ordering::Release);
        true
    }
}

/// A cheap look (no fence) at whether the producer announced it waits for space: used to
/// hand space back early. Not enough on its own (see [`producer_waits`]).
pub(crate) fn producer_may_wait(hdr: &RingHeader) -> bool {
    hdr.producer.waiting.load(Ordering::Relaxed) != 0
}

/// After [`Consumer::release`]: whether the producer announced it waits for space and must
/// have its doorbell rung.
pub(crate) fn producer_waits(hdr: &RingHeader) -> bool {
    fence(Ordering::SeqCst);
    hdr.producer.waiting.load(Ordering::Relaxed) != 0
}

/// The producer found the ring full: announce it, then look at `head` once more (the
/// consumer may have released space just before it could see the flag). Returns the bytes
/// free after the announcement.
pub(crate) fn announce_waiting(p: &mut Producer, hdr: &RingHeader, want: usize) -> usize {
    hdr.producer.waiting.store(1, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    p.head_cache = hdr.head.load(Ordering::SeqCst);
    p.free(hdr, want)
}

/// The producer's queue drained: no more need to be told about space.
pub(crate) fn clear_waiting(hdr: &RingHeader) {
    if hdr.producer.waiting.load(Ordering::Relaxed) != 0 {
        hdr.producer.waiting.store(0, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64 as StdU64;

    /// Ring bytes on the heap, accessed through the production `RawMem`.
    struct HeapRing {
        hdr: RingHeader,
        _buf: Box<[StdU64]>,
        mem: RawMem,
    }

    impl HeapRing {
        fn new(cap: usize) -> HeapRing {
            let buf: Box<[StdU64]> = (0..cap / 8).map(|_| StdU64::new(0)).collect();
            // SAFETY: the buffer lives as long as the HeapRing (it owns it) and is only
            // accessed through `mem`.
            let mem = unsafe { RawMem::new(buf.as_ptr() as *mut u8, cap) };
            HeapRing {
                hdr: RingHeader::new(),
                _buf: buf,
                mem,
            }
        }
    }

    fn fields(kind: u32, id: u64) -> [u8; FIELDS] {
        let mut f = [0u8; FIELDS];
        f[0..4].copy_from_slice(&kind.to_le_bytes());
        f[4..12].copy_from_slice(&id.to_le_bytes());
        f
    }

    fn pattern(n: usize, salt: u64) -> Vec<u8> {
        (0..n)
            .map(|i| ((i as u64 * 31 + salt) % 251) as u8)
            .collect()
    }

    /// Pops one record: (kind, id, payload).
    fn pop(c: &mut Consumer, r: &HeapRing) -> Option<(u32, u64, Vec<u8>)> {
        // SAFETY: single consumer of this ring.
        let (f, n) = unsafe { c.peek(&r.mem) }.unwrap()?;
        let mut p = vec![0u8; n];
        // SAFETY: within the peeked record.
        unsafe { c.read_payload(&r.mem, 0, &mut p) };
        c.consume(n);
        c.release(&r.hdr);
        let kind = u32::from_le_bytes(f[0..4].try_into().unwrap());
        let id = u64::from_le_bytes(f[4..12].try_into().unwrap());
        Some((kind, id, p))
    }

    #[test]
    fn zero_length_exact_size_and_wrap_around() {
        let cap = 1024;
        let r = HeapRing::new(cap);
        let (mut p, mut c) = (Producer::new(&r.hdr, cap), Consumer::new(&r.hdr, cap));
        // SAFETY: single producer of this ring (all pushes in this test).
        unsafe {
            assert!(p.push(&r.hdr, &r.mem, &fields(1, 0), &[]));
            assert_eq!(pop(&mut c, &r), Some((1, 0, vec![])));
            // A record of exactly the ring's size.
            let big = pattern(max_payload(cap), 3);
            assert!(p.push(&r.hdr, &r.mem, &fields(2, 1), &big));
            // Full: nothing else fits, not even an empty record.
            assert!(!p.push(&r.hdr, &r.mem, &fields(1, 2), &[]));
            assert_eq!(pop(&mut c, &r), Some((2, 1, big)));
            assert_eq!(pop(&mut c, &r), None);
            // Too large ever: refused.
            let huge = vec![0u8; max_payload(cap) + 1];
            assert!(!p.push(&r.hdr, &r.mem, &fields(2, 2), &huge));
            // Wrap-around: payloads that start near the end split in two.
            for i in 0..50u64 {
                let m = pattern(100 + (i as usize * 37) % 700, i);
                assert!(p.push(&r.hdr, &r.mem, &fields(3, i), &m), "record {i}");
                assert_eq!(pop(&mut c, &r), Some((3, i, m)));
            }
        }
    }

    #[test]
    fn stale_payload_bytes_never_look_like_a_record() {
        // Fill a ring with payload lines whose first 8 bytes are every small number (the
        // unkeyed stamps of the next laps), then check that only real records are seen.
        let cap = 512;
        let r = HeapRing::new(cap);
        let (mut p, mut c) = (Producer::new(&r.hdr, cap), Consumer::new(&r.hdr, cap));
        let mut m = vec![0u8; cap - RECORD_HEADER];
        for (i, line) in m.chunks_mut(LINE).enumerate() {
            line[..8].copy_from_slice(&((cap + LINE * (i + 1)) as u64 + 1).to_le_bytes());
        }
        // SAFETY: single producer.
        assert!(unsafe { p.push(&r.hdr, &r.mem, &fields(1, 0), &m) });
        assert_eq!(pop(&mut c, &r).map(|x| x.2), Some(m));
        for _ in 0..20 {
            assert_eq!(pop(&mut c, &r), None);
        }
    }

    #[test]
    fn full_ring_back_pressure_and_waiting_flag() {
        let cap = 512;
        let r = HeapRing::new(cap);
        let (mut p, mut c) = (Producer::new(&r.hdr, cap), Consumer::new(&r.hdr, cap));
        let m = pattern(60, 1);
        let mut pushed = 0;
        // SAFETY: single producer.
        while unsafe { p.push(&r.hdr, &r.mem, &fields(1, pushed), &m) } {
            pushed += 1;
        }
        assert_eq!(pushed, 4, "four 128-byte records fill 512 bytes");
        assert_eq!(announce_waiting(&mut p, &r.hdr, 128), 0);
        assert!(pop(&mut c, &r).is_some());
        assert!(producer_waits(&r.hdr));
        assert_eq!(p.free(&r.hdr, 128), 128);
        clear_waiting(&r.hdr);
        assert!(!producer_waits(&r.hdr));
    }

    #[test]
    fn impossible_lengths_are_reported() {
        let cap = 256;
        let r = HeapRing::new(cap);
        let mut c = Consumer::new(&r.hdr, cap);
        // A correctly stamped header claiming more payload than a ring can hold, as a
        // broken peer would write it.
        // SAFETY: nobody else uses this ring.
        unsafe { r.mem.write(8, &1000u32.to_le_bytes()) };
        r.mem.stamp(0).store(stamp_of(0, c.key), Ordering::Release);
        // SAFETY: single consumer.
        assert!(unsafe { c.peek(&r.mem) }.is_err());
    }

    /// Two threads stream thousands of records of random sizes through a small ring; the
    /// consumer checks every byte and the order. A bounded stand-in for the loom model.
    #[test]
    fn threads_stream_through_a_small_ring() {
        let cap = 4096;
        let r = Arc::new(HeapRing::new(cap));
        let n = 20_000u64;
        let r2 = Arc::clone(&r);
        let producer = std::thread::spawn(move || {
            let mut p = Producer::new(&r2.hdr, cap);
            let mut x = 12345u64;
            for i in 0..n {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let m = pattern((x % 1500) as usize, i);
                // SAFETY: single producer.
                while !unsafe { p.push(&r2.hdr, &r2.mem, &fields(7, i), &m) } {
                    std::hint::spin_loop();
                    std::thread::yield_now();
                }
            }
        });
        let mut c = Consumer::new(&r.hdr, cap);
        let mut x = 12345u64;
        let mut i = 0;
        while i < n {
            match pop(&mut c, &r) {
                Some((kind, id, p)) => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    assert_eq!((kind, id), (7, i));
                    assert_eq!(p, pattern((x % 1500) as usize, i), "record {i}");
                    i += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        producer.join().unwrap();
    }

    /// The doorbell's handshake with real futexes: a sleeper never misses a message.
    #[test]
    fn doorbell_never_loses_a_wakeup() {
        use std::time::Duration;
        let cap = 1024;
        let r = Arc::new((HeapRing::new(cap), Doorbell::new()));
        let n = 3000u64;
        let r2 = Arc::clone(&r);
        let producer = std::thread::spawn(move || {
            let (ring, bell) = &*r2;
            let mut p = Producer::new(&ring.hdr, cap);
            for i in 0..n {
                // SAFETY: single producer.
                while !unsafe { p.push(&ring.hdr, &ring.mem, &fields(1, i), &[]) } {
                    std::thread::yield_now();
                }
                if bell.notify() {
                    crate::sys::futex::wake(&bell.state, 1);
                }
                if i % 7 == 0 {
                    std::thread::yield_now();
                }
            }
        });
        let (ring, bell) = &*r;
        let mut c = Consumer::new(&ring.hdr, cap);
        let mut got = 0;
        let mut lost = 0;
        while got < n {
            if let Some((_, id, _)) = pop(&mut c, ring) {
                assert_eq!(id, got);
                got += 1;
                continue;
            }
            if bell.begin_sleep() && !c.has_data(&ring.mem) {
                let t = std::time::Instant::now();
                let v = Doorbell::sleeping_value();
                crate::sys::futex::wait(&bell.state, v, Duration::from_secs(2));
                // A lost wake-up shows as a sleep to the timeout with data waiting.
                if t.elapsed() >= Duration::from_secs(2) && c.has_data(&ring.mem) {
                    lost += 1;
                }
            }
            bell.end_sleep();
        }
        producer.join().unwrap();
        assert_eq!(lost, 0);
    }
}

/// Model checks of the ring and the doorbell under loom. Run with
///
/// ```text
/// RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
///     cargo test --release --lib transport::shm::ring::loom_tests
/// ```
///
/// (`LOOM_MAX_PREEMPTIONS=2` bounds the search further if it takes too long.)
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    /// Ring bytes as loom cells, one per cache line (records own whole lines; the header's
    /// caller bytes and the payload lines), plus one atomic stamp per line, so loom reports
    /// any access the protocol does not order.
    struct LoomMem {
        lines: Vec<UnsafeCell<[u8; LINE]>>,
        stamps: Vec<AtomicU64>,
    }

    impl LoomMem {
        fn new(lines: usize) -> LoomMem {
            LoomMem {
                lines: (0..lines).map(|_| UnsafeCell::new([0u8; LINE])).collect(),
                stamps: (0..lines).map(|_| AtomicU64::new(0)).collect(),
            }
        }
    }

    impl RingMem for LoomMem {
        fn cap(&self) -> usize {
            self.lines.len() * LINE
        }
        fn stamp(&self, off: usize) -> &AtomicU64 {
            &self.stamps[off / LINE]
        }
        unsafe fn write(&self, off: usize, src: &[u8]) {
            let mut done = 0;
            while done < src.len() {
                let (line, at) = ((off + done) / LINE, (off + done) % LINE);
                let n = (LINE - at).min(src.len() - done);
                self.lines[line].with_mut(|p| {
                    // SAFETY: loom checks that no other access to this line is concurrent.
                    unsafe { (&mut *p)[at..at + n].copy_from_slice(&src[done..done + n]) }
                });
                done += n;
            }
        }
        unsafe fn read(&self, off: usize, dst: &mut [u8]) {
            let mut done = 0;
            while done < dst.len() {
                let (line, at) = ((off + done) / LINE, (off + done) % LINE);
                let n = (LINE - at).min(dst.len() - done);
                self.lines[line].with(|p| {
                    // SAFETY: as in write.
                    dst[done..done + n].copy_from_slice(unsafe { &(&*p)[at..at + n] })
                });
                done += n;
            }
        }
    }

    fn fields(id: u64) -> [u8; FIELDS] {
        let mut f = [0u8; FIELDS];
        f[0..8].copy_from_slice(&id.to_le_bytes());
        f
    }

    /// Records of 1, 2 and 3 lines through a 4-line ring: back-pressure, wrap-around and a
    /// payload split at the end, in every interleaving; every byte arrives intact, in order.
    #[test]
    fn ring_delivers_in_order_under_every_interleaving() {
        loom::model(|| {
            let cap = 4 * LINE;
            let shared = Arc::new((RingHeader::new(), LoomMem::new(4)));
            let sizes = [0usize, 100, 70];
            let s2 = Arc::clone(&shared);
            let t = loom::thread::spawn(move || {
                let (hdr, mem) = &*s2;
                let mut p = Producer::new(hdr, cap);
                for (i, &n) in sizes.iter().enumerate() {
                    let m = vec![i as u8 + 1; n];
                    // SAFETY: single producer.
                    while !unsafe { p.push(hdr, mem, &fields(i as u64), &m) } {
                        loom::thread::yield_now();
                    }
                }
            });
            let (hdr, mem) = &*shared;
            let mut c = Consumer::new(hdr, cap);
            let mut i = 0;
            while i < sizes.len() {
                // SAFETY: single consumer.
                match unsafe { c.peek(mem) }.expect("valid ring") {
                    Some((f, n)) => {
                        assert_eq!(n, sizes[i]);
                        assert_eq!(u64::from_le_bytes(f[0..8].try_into().unwrap()), i as u64);
                        let mut p = vec![0u8; n];
                        // SAFETY: within the peeked record.
                        unsafe { c.read_payload(mem, 0, &mut p) };
                        assert!(p.iter().all(|&b| b == i as u8 + 1));
                        c.consume(n);
                        c.release(hdr);
                        i += 1;
                    }
                    None => loom::thread::yield_now(),
                }
            }
            t.join().unwrap();
        });
    }

    /// The doorbell handshake: a sleeper that would sleep has been seen by the writer, so
    /// the writer wakes it; and once awake it sees the record.
    #[test]
    fn doorbell_sleeper_sees_data_or_is_woken() {
        loom::model(|| {
            let cap = 4 * LINE;
            let shared = Arc::new((RingHeader::new(), LoomMem::new(4), Doorbell::new()));
            let s2 = Arc::clone(&shared);
            let t = loom::thread::spawn(move || {
                let (hdr, mem, bell) = &*s2;
                let mut p = Producer::new(hdr, cap);
                // SAFETY: single producer.
                assert!(unsafe { p.push(hdr, mem, &fields(1), &[]) });
                bell.notify()
            });
            let (hdr, mem, bell) = &*shared;
            let c = Consumer::new(hdr, cap);
            let sleeps = bell.begin_sleep() && !c.has_data(mem);
            // futex_wait(state, SLEEPING) blocks only if the word is still SLEEPING.
            let blocks = sleeps && bell.state.load(Ordering::SeqCst) == Doorbell::sleeping_value();
            let woke = t.join().unwrap();
            bell.end_sleep();
            assert!(
                !blocks || woke,
                "a sleeper missed the record and was not woken"
            );
            if sleeps {
                assert!(c.has_data(mem), "awake again, the record must be visible");
            }
        });
    }

    /// Space hand-back: a producer waiting for space is either told or sees the space.
    #[test]
    fn waiting_producer_sees_space_or_is_told() {
        loom::model(|| {
            let cap = 2 * LINE;
            let hdr = Arc::new(RingHeader::new());
            let h2 = Arc::clone(&hdr);
            let mut p = Producer::new(&hdr, cap);
            // The ring is full (two lines published, not yet released).
            p.tail = 2 * LINE as u64;
            let t = loom::thread::spawn(move || {
                let mut c = Consumer::new(&h2, cap);
                c.consume(0);
                c.release(&h2);
                producer_waits(&h2)
            });
            let free = announce_waiting(&mut p, &hdr, LINE);
            let told = t.join().unwrap();
            assert!(free >= LINE || told);
        });
    }
}
