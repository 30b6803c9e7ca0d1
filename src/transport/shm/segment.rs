//! A rank's shared-memory segment: its doorbell and the rings its local peers write into.
//!
//! # Layout
//!
//! ```text
//! 0      SegHeader   magic (written last), slot count, ring capacity, owner pid, attach count
//! 128    Doorbell    futex word (sleeping and pending bits), on its own cache line
//! 4096   slot 0      RingHeader (3 cache-padded lines) + `cap` bytes of ring data
//!        slot 1      ...
//! ```
//!
//! Slot `i` is the ring that the rank with local index `i` writes to the owner (the owner's
//! own slot is unused). Every rank maps every local peer's segment: it writes its messages
//! into its slot there and rings that peer's doorbell; it reads what peers sent from its own
//! segment.
//!
//! # Names and cleanup
//!
//! Segments are POSIX shared-memory objects named `/ferrocomm-<job hash>-<pid>-<nonce>`. The
//! name is published through the rendezvous, and removed as soon as every local peer has
//! mapped the segment: each attaching peer increments the attach count and the one that
//! completes it unlinks the name. From then on only the mappings keep the memory, and the
//! kernel frees it when the last process using it exits, however it exits. The owner also
//! unlinks it when initialisation ends, on every error path (the owner's [`Segment`]
//! unlinks its name when dropped) and when the transport is dropped (in case a peer never
//! attached). A name could then survive only if its owner is killed during initialisation,
//! before every peer mapped the segment: the peers that find the owner dead remove its name
//! (see `ShmSetup::connect` and `ShmTransport::wait_attached`), and `ferrorun` sweeps the
//! names of its exited ranks ([`remove_segments_of`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ring::{Doorbell, RawMem, RingHeader};
use crate::error::{Error, Result};
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use crate::sys::shm::{self, Mapping};

const MAGIC: u64 = 0x6665_7272_6f73_686d; // "ferroshm"
const VERSION: u32 = 1;
const DOORBELL_OFFSET: usize = 128;
const SLOTS_OFFSET: usize = 4096;

#[repr(C)]
struct SegHeader {
    magic: AtomicU64,
    version: AtomicU32,
    slots: AtomicU32,
    cap: AtomicU64,
    owner_pid: AtomicU32,
    attached: AtomicU32,
}

fn slot_stride(cap: usize) -> usize {
    std::mem::size_of::<RingHeader>().next_multiple_of(128) + cap
}

fn segment_len(slots: usize, cap: usize) -> usize {
    SLOTS_OFFSET + slots * slot_stride(cap)
}

/// The prefix of every segment name of the job `job_id` (without the leading `/`), as it
/// appears in `/dev/shm`: tests scan for it to prove nothing is left behind.
pub fn segment_prefix(job_id: &str) -> String {
    format!("ferrocomm-{:016x}-", crate::wire::job_hash(job_id))
}

/// Removes the names of the segments of job `job_id` created by processes `pids` (that have
/// ended), and returns how many there were. `ferrorun` calls it for its ranks once they
/// have exited: a rank killed while it started up (before its peers mapped its segment)
/// cannot remove its own.
pub fn remove_segments_of(job_id: &str, pids: &[u32]) -> usize {
    let prefix = segment_prefix(job_id);
    let Ok(dir) = std::fs::read_dir(shm::SHM_DIR) else {
        return 0;
    };
    let mut removed = 0;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| pids.contains(&p)) && shm::unlink(&format!("/{name}")).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Removes the name of the segment `name` of a local peer whose process has exited (a peer
/// killed during initialisation, before every rank mapped its segment, runs no destructor).
/// A name that is not there (never created, or removed already) is fine.
pub(crate) fn remove_name_of_dead_owner(name: &str) {
    match shm::unlink(name) {
        Ok(()) => tracing::debug!("removed the shared-memory segment {name} of a dead peer"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("removing the shared-memory segment {name} of a dead peer: {e}"),
    }
}

/// A fresh, unique segment name for this process in job `job_id`.
pub(crate) fn new_name(job_id: &str) -> String {
    let mut nonce = [0u8; 4];
    if getrandom::fill(&mut nonce).is_err() {
        // Unique enough within one process: the pid is already in the name.
        nonce = (Instant::now().elapsed().subsec_nanos() ^ 0x9e37_79b9).to_le_bytes();
    }
    format!(
        "/{}{}-{:08x}",
        segment_prefix(job_id),
        std::process::id(),
        u32::from_le_bytes(nonce)
    )
}

/// One mapped segment (the own one or a peer's).
pub(crate) struct Segment {
    map: Mapping,
    name: String,
    /// This process created it: its name goes when it is dropped, whatever happened.
    owner: bool,
    slots: usize,
    cap: usize,
    unlinked: std::sync::atomic::AtomicBool,
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.owner {
            self.unlink();
        }
    }
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment").field("name", &self.name).finish()
    }
}

impl Segment {
    fn header(&self) -> &SegHeader {
        // SAFETY: the mapping is at least SLOTS_OFFSET bytes, page aligned, and SegHeader is
        // made of atomics for which all-zero is valid; it lives as long as `self.map`.
        unsafe { &*self.map.base().as_ptr().cast::<SegHeader>() }
    }

    /// The owner's doorbell.
    pub(crate) fn doorbell(&self) -> &Doorbell {
        // SAFETY: as in `header`; the doorbell lies at DOORBELL_OFFSET < SLOTS_OFFSET and is
        // suitably aligned (128).
        unsafe {
            &*self
                .map
                .base()
                .as_ptr()
                .add(DOORBELL_OFFSET)
                .cast::<Doorbell>()
        }
    }

    /// The header and data of ring `slot`.
    pub(crate) fn ring(&self, slot: usize) -> (&RingHeader, RawMem) {
        assert!(slot < self.slots, "ring slot {slot} of {}", self.slots);
        let stride = slot_stride(self.cap);
        let hdr_size = std::mem::size_of::<RingHeader>().next_multiple_of(128);
        // SAFETY: the slot lies inside the mapping (segment_len counted it, and `open`
        // checked the length); the offset is a multiple of 128, RingHeader's alignment; the
        // data follows the header. Both live as long as `self.map`.
        unsafe {
            let base = self.map.base().as_ptr().add(SLOTS_OFFSET + slot * stride);
            let mem = RawMem::new(base.add(hdr_size), self.cap);
            (&*base.cast::<RingHeader>(), mem)
        }
    }

    /// Creates this process's segment `name` with `slots` rings of `cap` bytes.
    pub(crate) fn create(name: &str, slots: usize, cap: usize) -> Result<Arc<Segment>> {
        let len = segment_len(slots, cap);
        let map = Mapping::create(name, len).map_err(|e| {
            Error::io(
                format!(
                    "creating the shared-memory segment {name} ({len} bytes) in {}; is /dev/shm \
                     mounted and large enough? FERROCOMM_TRANSPORT=tcp avoids shared memory",
                    shm::SHM_DIR
                ),
                e,
            )
        })?;
        let seg = Segment {
            map,
            name: name.to_string(),
            owner: true,
            slots,
            cap,
            unlinked: std::sync::atomic::AtomicBool::new(false),
        };
        // Every ring gets its own random stamp key (see `ring`).
        let mut seed = [0u8; 8];
        if getrandom::fill(&mut seed).is_err() {
            seed = (std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes();
        }
        let mut key = u64::from_le_bytes(seed) | 1 << 63;
        for slot in 0..slots {
            key = key
                .wrapping_mul(0x5851_f42d_4c95_7f2d)
                .wrapping_add(1442695040888963407);
            seg.ring(slot).0.key.store(key | 1 << 63, Ordering::Relaxed);
        }
        let h = seg.header();
        h.version.store(VERSION, Ordering::Relaxed);
        h.slots.store(slots as u32, Ordering::Relaxed);
        h.cap.store(cap as u64, Ordering::Relaxed);
        h.owner_pid.store(std::process::id(), Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(Arc::new(seg))
    }

    /// Maps the segment `name` of a peer, waiting for it to appear until `deadline`;
    /// checks that it has `slots` rings of `cap` bytes, then counts this attachment and
    /// unlinks the name if this was the last of `expected` attachments. While it waits,
    /// `alive` is asked whether the owner still runs; its error ends the wait.
    pub(crate) fn attach(
        name: &str,
        slots: usize,
        cap: usize,
        expected: u32,
        deadline: Instant,
        who: &str,
        alive: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Arc<Segment>> {
        let len = segment_len(slots, cap);
        let start = Instant::now();
        let map = loop {
            match Mapping::open(name, SLOTS_OFFSET) {
                Ok(m) => {
                    // SAFETY: the mapping has at least SLOTS_OFFSET bytes; see `header`.
                    let h = unsafe { &*m.base().as_ptr().cast::<SegHeader>() };
                    if h.magic.load(Ordering::Acquire) == MAGIC {
                        break m;
                    }
                }
                // Not there yet, or created but not yet sized (the owner's shm_open and
                // ftruncate are two steps).
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::UnexpectedEof
                    ) => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("mapping {who}'s shared-memory segment {name}"),
                        e,
                    ));
                }
            }
            alive()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    op: format!("attaching {who}'s shared-memory segment {name}"),
                    waited: start.elapsed(),
                    detail: "the segment did not appear; that rank may have failed during \
                             start-up, or its /dev/shm is not this one (containers?); \
                             FERROCOMM_TRANSPORT=tcp avoids shared memory"
                        .into(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let seg = Segment {
            map,
            name: name.to_string(),
            owner: false,
            slots,
            cap,
            unlinked: std::sync::atomic::AtomicBool::new(false),
        };
        let h = seg.header();
        let (v, s, c) = (
            h.version.load(Ordering::Relaxed),
            h.slots.load(Ordering::Relaxed) as usize,
            h.cap.load(Ordering::Relaxed) as usize,
        );
        if v != VERSION || s != slots || c != cap || seg.map.len() < len {
            return Err(Error::misbehaved(
                who,
                format!(
                    "its shared-memory segment {name} has version {v}, {s} rings of {c} bytes \
                     ({} bytes); expected version {VERSION}, {slots} rings of {cap} bytes: \
                     do all ranks use the same ferrocomm and FERROCOMM_SHM_RING_SIZE?",
                    seg.map.len()
                ),
            ));
        }
        if h.attached.fetch_add(1, Ordering::AcqRel) + 1 >= expected {
            seg.unlink();
        }
        Ok(Arc::new(seg))
    }

    /// Removes the segment's name (idempotent; the memory stays while mapped).
    pub(crate) fn unlink(&self) {
        if self
            .unlinked
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        match shm::unlink(&self.name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("removing shared-memory segment {}: {e}", self.name),
        }
    }

    /// How many peers have attached this segment.
    pub(crate) fn attached(&self) -> u32 {
        self.header().attached.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_of_dead_ranks_are_swept_by_pid() {
        let job = format!("sweep-test-{}", std::process::id());
        let dead = Segment::create(
            &format!("/{}4000000001-00000001", segment_prefix(&job)),
            2,
            4096,
        )
        .unwrap();
        let alive = Segment::create(
            &format!("/{}4000000002-00000002", segment_prefix(&job)),
            2,
            4096,
        )
        .unwrap();
        // Pretend both owners died without cleaning up: forget the mappings' names.
        std::mem::forget(dead);
        assert_eq!(remove_segments_of(&job, &[4_000_000_001]), 1);
        let left: Vec<String> = std::fs::read_dir(shm::SHM_DIR)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&segment_prefix(&job)))
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].contains("4000000002"));
        drop(alive);
        assert_eq!(
            remove_segments_of(&job, &[4_000_000_002]),
            0,
            "the owner removed it"
        );
    }
}
