//! Request handles: wait, test, waitall, free.

use std::ptr;
use std::sync::Arc;

use ferrocomm_rs::{DType, Error, RawRequest, Status};
use parking_lot::Mutex;

use crate::collective::CollPending;
use crate::error::{Fail, boundary, ferrocomm_result};
use crate::handle::{self, Kind, Object};
use crate::types::{ferrocomm_status_t, out_ptr, put};

/// A non-blocking operation in flight (`MPI_Request`). An opaque handle made by
/// `ferrocomm_isend`, `ferrocomm_irecv` and the non-blocking collectives, released by
/// `ferrocomm_wait`, `ferrocomm_waitall`, a `ferrocomm_test` that reports completion, or
/// `ferrocomm_request_free`.
#[allow(non_camel_case_types)]
pub struct ferrocomm_request_t {
    _opaque: [u8; 0],
}

/// The operation behind a request handle.
pub(crate) enum Pending {
    /// A point-to-point transfer.
    P2p {
        raw: RawRequest,
        /// Element type of the buffer, to check that a received message is whole elements.
        dtype: DType,
        /// A receive (whose message size is checked against the element type).
        recv: bool,
    },
    /// A non-blocking collective (None once finished by `poll`).
    Coll(Option<Box<dyn CollPending>>),
}

/// What a finished collective reports: no peer or tag, the bytes written to the output.
fn coll_status(bytes: usize) -> ferrocomm_status_t {
    ferrocomm_status_t {
        source: usize::MAX,
        bytes,
        tag: 0,
        error: ferrocomm_result::FERROCOMM_OK as u32,
    }
}

impl Pending {
    pub(crate) fn p2p(raw: RawRequest, dtype: DType, recv: bool) -> Pending {
        Pending::P2p { raw, dtype, recv }
    }

    /// Waits for completion.
    fn wait(self, op: &str) -> Result<ferrocomm_status_t, Fail> {
        match self {
            Pending::P2p { raw, dtype, recv } => {
                let st = raw.wait()?;
                Ok(ferrocomm_status_t::ok(&check_whole(op, recv, dtype, st)?))
            }
            Pending::Coll(Some(c)) => Ok(coll_status(c.finish()?)),
            Pending::Coll(None) => Err(Fail::Handle(format!("{op}: the request already ended"))),
        }
    }

    /// Completes the operation if it has finished (`None`: still in flight).
    fn poll(&mut self, op: &str) -> Option<Result<ferrocomm_status_t, Fail>> {
        match self {
            Pending::P2p { raw, dtype, recv } => match raw.test() {
                Ok(None) => None,
                Ok(Some(st)) => {
                    Some(check_whole(op, *recv, *dtype, st).map(|st| ferrocomm_status_t::ok(&st)))
                }
                Err(e) => Some(Err(e.into())),
            },
            Pending::Coll(slot) => {
                if slot.as_ref().is_some_and(|c| !c.done()) {
                    return None;
                }
                let c = slot.take()?;
                Some(c.finish().map(coll_status))
            }
        }
    }
}

/// Refuses a received message that is not a whole number of elements (as
/// `Communicator::recv` does).
fn check_whole(op: &str, recv: bool, dtype: DType, st: Status) -> Result<Status, Fail> {
    if recv && !st.bytes.is_multiple_of(dtype.size()) {
        return Err(Error::invalid(
            op,
            "buf",
            format!(
                "the {}-byte message from rank {} (tag {}) is not a whole number of {} \
                     ({}-byte) elements",
                st.bytes,
                st.source,
                st.tag,
                dtype,
                dtype.size()
            ),
        )
        .into());
    }
    Ok(st)
}

/// What a request handle refers to: the operation until it has finished, then nothing.
pub(crate) struct ReqCell {
    inner: Mutex<Option<Pending>>,
}

/// Registers a pending operation and returns its handle.
pub(crate) fn register(p: Pending) -> *mut ferrocomm_request_t {
    let cell = ReqCell {
        inner: Mutex::new(Some(p)),
    };
    ptr::without_provenance_mut(handle::insert(Object::Request(Arc::new(cell))))
}

fn cell_of(obj: Object) -> Result<Arc<ReqCell>, Fail> {
    match obj {
        Object::Request(c) => Ok(c),
        Object::Comm(_) | Object::Reducer(_) => Err(Fail::Handle("not a request".into())),
    }
}

fn already_done(h: usize) -> Fail {
    Fail::Handle(format!(
        "request {h:#x} already completed (ferrocomm_test reported it on another thread)"
    ))
}

/// Unregisters `h` and waits for its operation.
fn wait_one(op: &str, cell: Arc<ReqCell>, h: usize) -> Result<ferrocomm_status_t, Fail> {
    let pending = cell.inner.lock().take().ok_or_else(|| already_done(h))?;
    pending.wait(op)
}

/// Waits for a request to complete (`MPI_Wait`) and releases it. For a non-blocking
/// collective, this is the call that copies the result into the output buffer.
///
/// Blocking: until the operation is complete (its buffer may then be reused), or fails
/// after `FERROCOMM_OP_TIMEOUT`. `status` (may be NULL) receives the sender, tag and size
/// (for a send: the destination and the size sent) and the result in `status->error`.
///
/// Ownership: consumes the handle whatever the result; it is invalid afterwards (a second
/// wait or free returns `INVALID_HANDLE`).
///
/// Thread safety: any thread, not only the one that started the operation, and without
/// holding up the communicator, which other calls may use meanwhile.
///
/// Errors: `INVALID_HANDLE`; the operation's own errors (`INVALID_ARGUMENT` for a message
/// larger than the buffer or not a whole number of elements, `TIMEOUT`, `PEER_LOST`,
/// `ABORTED`, `COLLECTIVE_MISMATCH`, `IO`).
///
/// # Safety
/// `status` must be NULL or valid for writing one `ferrocomm_status_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_wait(
    request: *mut ferrocomm_request_t,
    status: *mut ferrocomm_status_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_wait";
    boundary(OP, || {
        let h = request.addr();
        let cell = cell_of(handle::remove(h, Kind::Request)?)?;
        let r = wait_one(OP, cell, h);
        let st = match &r {
            Ok(st) => *st,
            Err(f) => ferrocomm_status_t::failed(f.code()),
        };
        // SAFETY: NULL or valid for writes by the caller's contract.
        unsafe { put(status, st) };
        r.map(|_| ())
    })
}

/// Checks whether a request has completed, without blocking (`MPI_Test`); drives the
/// transports once so that polling in a loop makes progress.
///
/// Sets `*done` to 1 when the operation has ended, successfully or not: the handle is then
/// released (invalid afterwards), `status` (may be NULL) is filled, a collective's result is
/// copied into its output buffer, and the result is the operation's. Sets `*done` to 0 when it is still in flight: the handle stays valid and
/// the result is `FERROCOMM_OK`.
///
/// Thread safety: any thread; `BUSY` when another thread is testing the same request at
/// the same moment.
///
/// Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (`done` NULL), `BUSY`, and the operation's
/// own errors as for `ferrocomm_wait` (with `*done` = 1).
///
/// # Safety
/// `done` must be NULL or valid for writing one `int`; `status` NULL or valid for writing
/// one `ferrocomm_status_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_test(
    request: *mut ferrocomm_request_t,
    done: *mut std::ffi::c_int,
    status: *mut ferrocomm_status_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_test";
    boundary(OP, || {
        out_ptr(OP, "done", done)?;
        let h = request.addr();
        let cell = cell_of(handle::get(h, Kind::Request)?)?;
        let mut slot = cell.inner.try_lock().ok_or_else(|| {
            Fail::Busy(format!(
                "request {h:#x} is being tested or waited for by another thread"
            ))
        })?;
        let pending = slot.as_mut().ok_or_else(|| already_done(h))?;
        let Some(r) = pending.poll(OP) else {
            // SAFETY: checked non-null; valid for writes by the caller's contract.
            unsafe { put(done, 0) };
            return Ok(());
        };
        *slot = None;
        drop(slot);
        // Another thread may have started waiting for it meanwhile; it then finds it empty.
        let _ = handle::remove(h, Kind::Request);
        let st = match &r {
            Ok(st) => *st,
            Err(f) => ferrocomm_status_t::failed(f.code()),
        };
        // SAFETY: `done` checked non-null, `status` NULL or valid, by the caller's contract.
        unsafe {
            put(done, 1);
            put(status, st);
        }
        r.map(|_| ())
    })
}

/// Waits for all `count` requests of the array `requests` (`MPI_Waitall`) and releases
/// them.
///
/// All handles are checked first: if any is NULL, invalid, or appears twice, nothing is
/// waited for or released and the result is `INVALID_HANDLE` (the message names the
/// entry). Otherwise every request is waited for, even after one failed, so no buffer is
/// in use when it returns; `statuses` (may be NULL, else `count` entries) receives each
/// request's status with its own result in `error`, and the result is the first failure's
/// (its message names the entry) or `FERROCOMM_OK`.
///
/// Blocking: until every operation has ended. Thread safety: as `ferrocomm_wait`.
///
/// Ownership: consumes every handle of the array when the handles were valid.
///
/// # Safety
/// `requests` must point to `count` handles (NULL when `count` is 0); `statuses` must be
/// NULL or valid for writing `count` `ferrocomm_status_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_waitall(
    count: usize,
    requests: *const *mut ferrocomm_request_t,
    statuses: *mut ferrocomm_status_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_waitall";
    boundary(OP, || {
        if count == 0 {
            return Ok(());
        }
        if requests.is_null() {
            return Err(Fail::invalid(
                OP,
                "requests",
                format!("NULL with a count of {count}"),
            ));
        }
        if count > isize::MAX as usize / std::mem::size_of::<*mut ferrocomm_request_t>() {
            return Err(Fail::invalid(
                OP,
                "count",
                format!("{count} handles do not fit in memory"),
            ));
        }
        // SAFETY: `count` readable handles by the caller's contract.
        let hs: Vec<usize> = unsafe { std::slice::from_raw_parts(requests, count) }
            .iter()
            .map(|r| r.addr())
            .collect();
        let cells = handle::remove_many(&hs, Kind::Request)?
            .into_iter()
            .map(cell_of)
            .collect::<Result<Vec<_>, Fail>>()?;
        let mut first: Option<(usize, Fail)> = None;
        for (i, (cell, &h)) in cells.into_iter().zip(&hs).enumerate() {
            let st = match wait_one(OP, cell, h) {
                Ok(st) => st,
                Err(f) => {
                    let st = ferrocomm_status_t::failed(f.code());
                    first.get_or_insert((i, f));
                    st
                }
            };
            if !statuses.is_null() {
                // SAFETY: `count` writable statuses by the caller's contract; i < count.
                unsafe { put(statuses.add(i), st) };
            }
        }
        match first {
            None => Ok(()),
            // The failure's code, with the entry named in front of its full text.
            Some((i, f)) => Err(Fail::Coded(f.code(), format!("request {i}: {f}"))),
        }
    })
}

/// Releases a request without waiting for its result (`MPI_Request_free`, `MPI_Cancel`):
/// a receive that no message has matched yet is withdrawn at once; a transfer already in
/// flight is waited for (up to `FERROCOMM_OP_TIMEOUT`) so that the buffer is not used after
/// this returns. A non-blocking collective is not cancelled (the other ranks expect it): it
/// runs to its end on the worker thread, its result is discarded and its output buffer is
/// never written; this call does not wait for it.
///
/// Ownership: consumes the handle; a second free returns `INVALID_HANDLE`.
///
/// Thread safety: any thread. Errors: `INVALID_HANDLE`.
#[unsafe(no_mangle)]
pub extern "C" fn ferrocomm_request_free(request: *mut ferrocomm_request_t) -> ferrocomm_result {
    boundary("ferrocomm_request_free", || {
        let cell = cell_of(handle::remove(request.addr(), Kind::Request)?)?;
        // Dropping the RawRequest withdraws or waits (its Drop).
        drop(cell.inner.lock().take());
        Ok(())
    })
}

/// Number of live request handles (for tests).
#[cfg(test)]
pub(crate) fn live() -> usize {
    handle::live(Kind::Request)
}
