//! The handle registry: how `ferrocomm_comm_t*`, `ferrocomm_request_t*` and
//! `ferrocomm_reducer_t*` values map to Rust objects, and why a freed handle is recognised
//! without reading freed memory.
//!
//! A handle is not a pointer to anything. It is a 64-bit number shown to C as an opaque
//! pointer: the low 32 bits are `slot index + 1`, the high 32 bits a serial number drawn
//! from a global counter when the object was registered (never 0, so no valid handle is
//! NULL). The objects live in one global table of slots; each slot remembers the serial
//! of the object it holds.
//!
//! Looking a handle up takes the table's lock, checks that the slot exists, is occupied,
//! holds an object of the expected kind and carries the same serial. A handle that was
//! freed fails the check (its slot is empty, or holds a newer object with another serial),
//! and so does a garbage value or a pointer to real memory: the value is only ever used as
//! numbers to index the table, never dereferenced. So double frees, use after free and
//! wrong-kind handles give `FERROCOMM_ERR_INVALID_HANDLE`, never a crash. (A stale handle
//! could only alias a new object after 2^32 registrations reused its slot with the same
//! serial.)
//!
//! Objects are reference counted: a lookup clones the `Arc` and releases the table's lock
//! before the call does its work, so a blocking call never holds up other handles, and a
//! handle freed while another thread is inside a call on it stays alive until that call
//! returns.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::comm::CommCell;
use crate::error::Fail;
use crate::reducer::ReducerCell;
use crate::request::ReqCell;

// Handles are 64-bit numbers carried in pointers.
const _: () = assert!(usize::BITS == 64, "the C ABI needs 64-bit pointers");

/// A registered object.
#[derive(Clone)]
pub(crate) enum Object {
    /// A communicator.
    Comm(Arc<CommCell>),
    /// A pending request.
    Request(Arc<ReqCell>),
    /// A gradient reducer.
    Reducer(Arc<ReducerCell>),
}

/// The kinds of handles, for lookups and messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Comm,
    Request,
    Reducer,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Comm => "communicator",
            Kind::Request => "request",
            Kind::Reducer => "reducer",
        }
    }
}

impl Object {
    fn kind(&self) -> Kind {
        match self {
            Object::Comm(_) => Kind::Comm,
            Object::Request(_) => Kind::Request,
            Object::Reducer(_) => Kind::Reducer,
        }
    }
}

struct Slot {
    serial: u32,
    obj: Option<Object>,
}

struct Registry {
    slots: Vec<Slot>,
    free: Vec<u32>,
    next_serial: u32,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    slots: Vec::new(),
    free: Vec::new(),
    next_serial: 1,
});

fn registry() -> MutexGuard<'static, Registry> {
    // Every critical section below leaves the table consistent, so a poisoned lock (a panic
    // elsewhere while it was held, which none of these sections can cause) is still usable.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn encode(index: u32, serial: u32) -> usize {
    ((u64::from(serial) << 32) | (u64::from(index) + 1)) as usize
}

fn decode(h: usize) -> Option<(usize, u32)> {
    let (lo, hi) = (h as u32, (h >> 32) as u32);
    (lo != 0 && hi != 0).then(|| ((lo - 1) as usize, hi))
}

impl Registry {
    fn find(&self, h: usize, kind: Kind) -> Result<usize, Fail> {
        let stale = || {
            Fail::Handle(format!(
                "{h:#x} is not a live {} handle: it was already freed (or waited for), \
                 or never was a ferrocomm handle",
                kind.name()
            ))
        };
        if h == 0 {
            return Err(Fail::Handle(format!("the {} handle is NULL", kind.name())));
        }
        let (index, serial) = decode(h).ok_or_else(stale)?;
        let slot = self.slots.get(index).ok_or_else(stale)?;
        match &slot.obj {
            Some(obj) if slot.serial == serial => {
                if obj.kind() == kind {
                    Ok(index)
                } else {
                    Err(Fail::Handle(format!(
                        "{h:#x} is a {} handle where a {} handle is expected",
                        obj.kind().name(),
                        kind.name()
                    )))
                }
            }
            _ => Err(stale()),
        }
    }
}

/// Registers `obj` and returns its handle.
pub(crate) fn insert(obj: Object) -> usize {
    let mut reg = registry();
    let serial = reg.next_serial;
    reg.next_serial = reg.next_serial.checked_add(1).unwrap_or(1);
    let index = match reg.free.pop() {
        Some(i) => i,
        None => {
            reg.slots.push(Slot {
                serial: 0,
                obj: None,
            });
            (reg.slots.len() - 1) as u32
        }
    };
    reg.slots[index as usize] = Slot {
        serial,
        obj: Some(obj),
    };
    encode(index, serial)
}

/// The object of handle `h`, which must be of `kind`; it stays registered.
pub(crate) fn get(h: usize, kind: Kind) -> Result<Object, Fail> {
    let reg = registry();
    let i = reg.find(h, kind)?;
    reg.slots[i]
        .obj
        .clone()
        .ok_or_else(|| Fail::Handle(format!("{h:#x} vanished")))
}

/// Unregisters handle `h` (of `kind`) and returns its object; the handle is invalid
/// afterwards.
pub(crate) fn remove(h: usize, kind: Kind) -> Result<Object, Fail> {
    Ok(remove_many(&[h], kind)?.remove(0))
}

/// Unregisters every handle of `hs` at once, or none: when any is invalid or appears twice
/// nothing is removed.
pub(crate) fn remove_many(hs: &[usize], kind: Kind) -> Result<Vec<Object>, Fail> {
    let mut reg = registry();
    let mut idx = Vec::with_capacity(hs.len());
    for (pos, &h) in hs.iter().enumerate() {
        let i = reg.find(h, kind).map_err(|f| match f {
            Fail::Handle(m) if hs.len() > 1 => Fail::Handle(format!("entry {pos}: {m}")),
            other => other,
        })?;
        if idx.contains(&i) {
            return Err(Fail::Handle(format!(
                "entry {pos}: {h:#x} appears twice in the list"
            )));
        }
        idx.push(i);
    }
    let mut out = Vec::with_capacity(idx.len());
    for i in idx {
        if let Some(obj) = reg.slots[i].obj.take() {
            out.push(obj);
        }
        reg.free.push(i as u32);
    }
    Ok(out)
}

/// Unregisters every handle and returns the objects.
pub(crate) fn drain() -> Vec<Object> {
    let mut reg = registry();
    let mut out = Vec::new();
    let mut freed = Vec::new();
    for (i, slot) in reg.slots.iter_mut().enumerate() {
        if let Some(obj) = slot.obj.take() {
            out.push(obj);
            freed.push(i as u32);
        }
    }
    reg.free.extend(freed);
    out
}

/// Number of live handles of `kind`.
#[cfg(test)]
pub(crate) fn live(kind: Kind) -> usize {
    registry()
        .slots
        .iter()
        .filter(|s| s.obj.as_ref().is_some_and(|o| o.kind() == kind))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_encode_index_and_serial() {
        for (i, s) in [(0, 1), (5, 77), (u32::MAX - 1, u32::MAX)] {
            let h = encode(i, s);
            assert_ne!(h, 0);
            assert_eq!(decode(h), Some((i as usize, s)));
        }
        assert_eq!(decode(0), None);
        assert_eq!(
            decode(0x1234_0000_0000),
            None,
            "index part 0 is never valid"
        );
        assert_eq!(decode(7), None, "serial part 0 is never valid");
    }
}
