//! Point-to-point: blocking send/recv/sendrecv over the typed Rust API, non-blocking
//! isend/irecv over `Communicator::isend_raw`/`irecv_raw`.

use std::ffi::c_void;
use std::ptr;

use ferrocomm_rs::transport::{RecvBuf, SendBuf};

use crate::comm::{ferrocomm_comm_t, with_comm};
use crate::error::{Fail, boundary, ferrocomm_result};
use crate::request::{Pending, ferrocomm_request_t, register};
use crate::types::{
    dtype, ferrocomm_dtype, ferrocomm_status_t, in_bytes, out_bytes, out_ptr, put, source, tag,
    with_dtype,
};

/// `src` of a receive that accepts a message from any rank (`MPI_ANY_SOURCE`).
pub const FERROCOMM_ANY_SOURCE: i64 = -1;
/// `tag` of a receive that accepts any tag (`MPI_ANY_TAG`).
pub const FERROCOMM_ANY_TAG: i64 = -1;

/// Views checked bytes as elements; the checks of `in_bytes`/`out_bytes` (alignment, whole
/// elements) make the cast infallible, but a failure is still an error, not a panic.
///
/// An empty buffer is an empty slice of `T` made here, never a cast: the empty byte slice
/// of a count of 0 lies at an address aligned only for bytes, which the cast would refuse
/// for any wider element type.
fn elems<'a, T: bytemuck::Pod>(op: &str, b: &'a [u8]) -> Result<&'a [T], Fail> {
    if b.is_empty() {
        return Ok(&[]);
    }
    bytemuck::try_cast_slice(b).map_err(|e| Fail::invalid(op, "buf", format!("{e:?}")))
}

/// As [`elems`], writable.
fn elems_mut<'a, T: bytemuck::Pod>(op: &str, b: &'a mut [u8]) -> Result<&'a mut [T], Fail> {
    if b.is_empty() {
        return Ok(&mut []);
    }
    bytemuck::try_cast_slice_mut(b).map_err(|e| Fail::invalid(op, "buf", format!("{e:?}")))
}

/// Sends `count` elements of type `dtype` from `buf` to rank `dst` with tag `tag`
/// (`MPI_Send`). Messages from one rank to another with the same tag arrive in order.
///
/// Blocking: returns when `buf` may be reused (the message is on its way or delivered);
/// large messages wait until the receiver has posted its receive. Fails after
/// `FERROCOMM_OP_TIMEOUT`.
///
/// Thread safety: one thread per communicator (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (`buf` NULL with `count` > 0 or not aligned
/// for `dtype`, unknown `dtype`, `dst` out of range), `BUSY`, `TIMEOUT`, `PEER_LOST`,
/// `ABORTED`, `IO`.
///
/// # Safety
/// `buf` must point to `count` readable elements of `dtype` (it may be NULL when `count` is
/// 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_send(
    comm: *mut ferrocomm_comm_t,
    buf: *const c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    dst: usize,
    tag: u32,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_send";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        // SAFETY: the caller's contract; the slice lives only during this call.
        let bytes = unsafe { in_bytes(OP, "buf", buf, count, dt)? };
        with_comm(
            OP,
            comm,
            |c| with_dtype!(OP, dt, T => Ok(c.send(elems::<T>(OP, bytes)?, dst, tag)?)),
        )
    })
}

/// Receives a message from `src` (a rank, or `FERROCOMM_ANY_SOURCE`) with tag `tag` (or
/// `FERROCOMM_ANY_TAG`) into `buf`, which holds up to `count` elements of `dtype`
/// (`MPI_Recv`). The message may be shorter; `status->bytes` says how long it was.
///
/// Blocking: returns when the message is in `buf`; fails after `FERROCOMM_OP_TIMEOUT`
/// (a receive that matched nothing is then withdrawn and the communicator stays usable).
///
/// `status` may be NULL; otherwise it receives the sender, tag and size.
///
/// Thread safety: one thread per communicator (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (bad `buf`, `dtype`, `src` or `tag`; a
/// message larger than `buf` or not a whole number of elements, which is then dropped),
/// `BUSY`, `TIMEOUT`, `PEER_LOST`, `ABORTED`, `IO`.
///
/// # Safety
/// `buf` must point to `count` writable elements of `dtype` (NULL when `count` is 0);
/// `status` must be NULL or valid for writing one `ferrocomm_status_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_recv(
    comm: *mut ferrocomm_comm_t,
    buf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    src: i64,
    tag: i64,
    status: *mut ferrocomm_status_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_recv";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        let (src, tag) = (source(OP, src)?, self::tag(OP, tag)?);
        // SAFETY: the caller's contract; the slice lives only during this call.
        let bytes = unsafe { out_bytes(OP, "buf", buf, count, dt)? };
        let st = with_comm(
            OP,
            comm,
            |c| with_dtype!(OP, dt, T => Ok(c.recv(elems_mut::<T>(OP, bytes)?, src, tag)?)),
        )?;
        // SAFETY: NULL or valid for writes by the caller's contract.
        unsafe { put(status, ferrocomm_status_t::ok(&st)) };
        Ok(())
    })
}

/// Sends `sendcount` elements from `sendbuf` to `dst` and receives up to `recvcount`
/// elements into `recvbuf` from `src`, both of `dtype`, at the same time
/// (`MPI_Sendrecv`): a ring shift where every rank sends right and receives left cannot
/// deadlock. The buffers must not overlap.
///
/// Blocking, thread safety and errors: as `ferrocomm_send` and `ferrocomm_recv` together;
/// also `INVALID_ARGUMENT` when the buffers overlap. `status` (may be NULL) describes the
/// received message.
///
/// # Safety
/// As `ferrocomm_send` for `sendbuf`, as `ferrocomm_recv` for `recvbuf` and `status`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ferrocomm_sendrecv(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    sendcount: usize,
    dtype: ferrocomm_dtype,
    dst: usize,
    sendtag: u32,
    recvbuf: *mut c_void,
    recvcount: usize,
    src: i64,
    recvtag: i64,
    status: *mut ferrocomm_status_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_sendrecv";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        let (src, recvtag) = (source(OP, src)?, tag(OP, recvtag)?);
        // SAFETY: the caller's contract; the slices live only during this call and are
        // checked not to overlap before both exist.
        let sbytes = unsafe { in_bytes(OP, "sendbuf", sendbuf, sendcount, dt)? };
        let (s0, s1) = (sendbuf as usize, sendbuf as usize + sbytes.len());
        let rlen = recvcount.saturating_mul(dt.size());
        let (r0, r1) = (recvbuf as usize, (recvbuf as usize).saturating_add(rlen));
        if s0 < r1 && r0 < s1 {
            return Err(Fail::invalid(
                OP,
                "recvbuf",
                "overlaps sendbuf; use separate buffers",
            ));
        }
        // SAFETY: as above.
        let rbytes = unsafe { out_bytes(OP, "recvbuf", recvbuf, recvcount, dt)? };
        let st = with_comm(OP, comm, |c| {
            with_dtype!(OP, dt, T => Ok(c.sendrecv(
                elems::<T>(OP, sbytes)?,
                dst,
                sendtag,
                elems_mut::<T>(OP, rbytes)?,
                src,
                recvtag,
            )?))
        })?;
        // SAFETY: NULL or valid for writes by the caller's contract.
        unsafe { put(status, ferrocomm_status_t::ok(&st)) };
        Ok(())
    })
}

/// Starts sending `count` elements of `dtype` from `buf` to `dst` with tag `tag`
/// (`MPI_Isend`) and stores a request in `*request`.
///
/// Does not block. `buf` is read while the send is in flight: keep it valid and unchanged
/// until `ferrocomm_wait`, `ferrocomm_waitall`, a successful `ferrocomm_test` or
/// `ferrocomm_request_free` has returned for the request.
///
/// Ownership: `*request` is a new handle owned by the caller, released by exactly one of
/// those calls (or `ferrocomm_finalize`); NULL on failure.
///
/// Thread safety: one thread per communicator (`BUSY` otherwise); the request may be waited
/// for on any thread.
///
/// Errors: as `ferrocomm_send` (without `TIMEOUT`), and `INVALID_ARGUMENT` for a NULL
/// `request`.
///
/// # Safety
/// `buf` must point to `count` readable elements of `dtype` (NULL when `count` is 0) that
/// stay valid and unchanged as described above; `request` must be NULL or valid for writing
/// one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_isend(
    comm: *mut ferrocomm_comm_t,
    buf: *const c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    dst: usize,
    tag: u32,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_isend";
    boundary(OP, || {
        out_ptr(OP, "request", request)?;
        // SAFETY: checked non-null; valid for writes by the caller's contract.
        unsafe { put(request, ptr::null_mut()) };
        let dt = self::dtype(OP, dtype)?;
        // SAFETY: the caller's contract (valid until the request ends).
        let bytes = unsafe { in_bytes(OP, "buf", buf, count, dt)? };
        let raw = with_comm(OP, comm, |c| {
            // SAFETY: the caller keeps `buf` valid and unchanged until the request has been
            // waited for or freed; the request handle owns the RawRequest, whose drop (on
            // free or finalize) waits for the transfer.
            Ok(unsafe { c.isend_raw(SendBuf::new(bytes), dst, tag)? })
        })?;
        // SAFETY: as above.
        unsafe { put(request, register(Pending::p2p(raw, dt, false))) };
        Ok(())
    })
}

/// Starts receiving into `buf` (room for `count` elements of `dtype`) a message from `src`
/// (or `FERROCOMM_ANY_SOURCE`) with tag `tag` (or `FERROCOMM_ANY_TAG`) (`MPI_Irecv`), and
/// stores a request in `*request`.
///
/// Does not block. `buf` is written while the receive is in flight: keep it valid and do
/// not touch it until the request has ended (as for `ferrocomm_isend`). Freeing the request
/// before a message matched withdraws the receive.
///
/// Ownership, thread safety: as `ferrocomm_isend`.
///
/// Errors: as `ferrocomm_recv` (argument errors here; message errors when waiting), and
/// `INVALID_ARGUMENT` for a NULL `request`.
///
/// # Safety
/// `buf` must point to `count` writable elements of `dtype` (NULL when `count` is 0) that
/// stay valid and untouched as described above; `request` must be NULL or valid for writing
/// one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_irecv(
    comm: *mut ferrocomm_comm_t,
    buf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    src: i64,
    tag: i64,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_irecv";
    boundary(OP, || {
        out_ptr(OP, "request", request)?;
        // SAFETY: checked non-null; valid for writes by the caller's contract.
        unsafe { put(request, ptr::null_mut()) };
        let dt = self::dtype(OP, dtype)?;
        let (src, tag) = (source(OP, src)?, self::tag(OP, tag)?);
        // SAFETY: the caller's contract (valid and untouched until the request ends).
        let bytes = unsafe { out_bytes(OP, "buf", buf, count, dt)? };
        let raw = with_comm(OP, comm, |c| {
            // SAFETY: as in ferrocomm_isend.
            Ok(unsafe { c.irecv_raw(RecvBuf::new(bytes), src, tag)? })
        })?;
        // SAFETY: as above.
        unsafe { put(request, register(Pending::p2p(raw, dt, true))) };
        Ok(())
    })
}
