//! Collectives, blocking and non-blocking, over the Rust API.
//!
//! Blocking calls hand the caller's buffers to the Rust collectives as slices: no copy.
//! Non-blocking calls use the Rust API's asynchronous collectives (`iall_reduce` and
//! friends), which own their buffers (`Vec<T>`) and run on the communicator's worker thread:
//! the input is copied into a vector when the call starts, and the result is copied into the
//! caller's output buffer by the `ferrocomm_wait`/`ferrocomm_test`/`ferrocomm_waitall` that
//! sees the request complete. (A zero-copy path would need the worker to run on borrowed C
//! memory, which the Rust API deliberately does not offer; the copies cost two memcpys per
//! call, small beside the transfer.)
//!
//! In place: `FERROCOMM_IN_PLACE` (the address 1, as `MPI_IN_PLACE`) in the argument MPI
//! puts it in, or NCCL's pointer rule (`sendbuf == recvbuf`, or the rank's block of the
//! larger buffer), selects the Rust API's `*_in_place` function. Buffers that overlap in any
//! other way are refused: they would alias in ways the collectives cannot honour.

use std::ffi::c_void;
use std::ptr;

use ferrocomm_rs::{CollHandle, DType, Element};

use crate::comm::{ferrocomm_comm_t, with_comm};
use crate::error::{Fail, boundary, ferrocomm_result};
use crate::request::{Pending, ferrocomm_request_t, register};
use crate::types::{
    byte_len, check_ptr, dtype, ferrocomm_dtype, ferrocomm_op, out_ptr, put, reduce_op, with_dtype,
};

/// The address `FERROCOMM_IN_PLACE` stands for.
const IN_PLACE: usize = 1;

fn is_in_place(p: *const c_void) -> bool {
    p.addr() == IN_PLACE
}

/// A checked buffer of the caller: not NULL when `count > 0`, aligned for its element type,
/// and a byte length that fits in memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Region {
    ptr: *mut u8,
    count: usize,
    esize: usize,
}

impl Region {
    fn new(op: &str, arg: &str, p: *const c_void, count: usize, dt: DType) -> Result<Region, Fail> {
        if is_in_place(p) {
            return Err(Fail::invalid(
                op,
                arg,
                "FERROCOMM_IN_PLACE is not allowed in this argument (see the function's \
                 documentation for where it goes)",
            ));
        }
        byte_len(op, arg, count, dt)?;
        check_ptr(op, arg, p, count, dt)?;
        Ok(Region {
            ptr: p.cast::<u8>().cast_mut(),
            count,
            esize: dt.size(),
        })
    }

    fn empty(dt: DType) -> Region {
        Region {
            ptr: ptr::null_mut(),
            count: 0,
            esize: dt.size(),
        }
    }

    fn bytes(&self) -> usize {
        self.count * self.esize
    }

    /// Block `i` of `count` elements (`(i + 1) * count` must not exceed `self.count`).
    fn block(&self, i: usize, count: usize) -> Region {
        debug_assert!((i + 1) * count <= self.count);
        Region {
            ptr: self.ptr.wrapping_add(i * count * self.esize),
            count,
            esize: self.esize,
        }
    }

    fn overlaps(&self, o: &Region) -> bool {
        let (a0, b0) = (self.ptr.addr(), o.ptr.addr());
        self.count > 0 && o.count > 0 && a0 < b0 + o.bytes() && b0 < a0 + self.bytes()
    }

    /// The elements, read-only.
    ///
    /// # Safety
    /// The region must be readable memory of `count` elements of `T` that nothing writes
    /// while the slice is used; `T` must be the element type it was checked for.
    unsafe fn get<'a, T: Element>(&self) -> &'a [T] {
        if self.count == 0 {
            return &[];
        }
        debug_assert_eq!(std::mem::size_of::<T>(), self.esize);
        // SAFETY: non-null and aligned (checked in `new`), `count` readable elements by the
        // caller's contract; every bit pattern is a valid `T` (Pod).
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<T>(), self.count) }
    }

    /// The elements, writable.
    ///
    /// # Safety
    /// As [`Region::get`], and nothing else reads or writes the memory while the slice is
    /// used.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get_mut<'a, T: Element>(&self) -> &'a mut [T] {
        if self.count == 0 {
            return &mut [];
        }
        debug_assert_eq!(std::mem::size_of::<T>(), self.esize);
        // SAFETY: as in `get`, with exclusive access by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<T>(), self.count) }
    }
}

/// How a collective uses the caller's buffers.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// One buffer, input and output (the Rust `*_in_place` function).
    InPlace(Region),
    /// Separate input and output, checked not to overlap (either may be empty).
    Separate { send: Region, recv: Region },
}

fn separate(op: &str, send: Region, recv: Region) -> Result<Layout, Fail> {
    if send.overlaps(&recv) {
        return Err(Fail::invalid(
            op,
            "recvbuf",
            "overlaps sendbuf without being the in-place case; pass FERROCOMM_IN_PLACE (or \
             the pointers the function's documentation names for in place) or use separate \
             buffers",
        ));
    }
    Ok(Layout::Separate { send, recv })
}

fn check_root(op: &str, root: usize, size: usize) -> Result<(), Fail> {
    if root >= size {
        return Err(Fail::invalid(
            op,
            "root",
            format!("{root} is out of range for a communicator of {size} ranks"),
        ));
    }
    Ok(())
}

/// `count * size` elements, refused when it overflows.
fn total(op: &str, arg: &str, count: usize, size: usize) -> Result<usize, Fail> {
    count.checked_mul(size).ok_or_else(|| {
        Fail::invalid(
            op,
            arg,
            format!("{count} elements per rank times {size} ranks overflows"),
        )
    })
}

/// Runs a blocking collective on `layout` with `$T` bound to the element type: `$ip` with
/// `$b: &mut [T]` in place, `$sep` with `$s: &[T]` and `$r: &mut [T]` otherwise.
macro_rules! dispatch {
    ($op:expr, $dt:expr, $layout:expr, $T:ident,
     |$b:ident| $ip:expr, |$s:ident, $r:ident| $sep:expr) => {
        with_dtype!($op, $dt, $T => match $layout {
            Layout::InPlace(region) => {
                // SAFETY: a checked region of the caller's buffer, valid and not touched by
                // anything else during this blocking call (the function's contract).
                let $b = unsafe { region.get_mut::<$T>() };
                Ok($ip?)
            }
            Layout::Separate { send, recv } => {
                // SAFETY: as above; the two regions were checked not to overlap.
                let ($s, $r) = unsafe { (send.get::<$T>(), recv.get_mut::<$T>()) };
                Ok($sep?)
            }
        })
    };
}

/// A non-blocking collective's state behind a request handle.
pub(crate) trait CollPending: Send {
    /// Whether the collective has finished.
    fn done(&self) -> bool;
    /// Waits for the collective, copies its result into the caller's buffer, and returns
    /// the number of bytes written there.
    fn finish(self: Box<Self>) -> Result<usize, Fail>;
}

/// An asynchronous collective producing a vector, and where its result goes.
struct CollReq<T: Element> {
    handle: CollHandle<Vec<T>>,
    out: Option<Region>,
}

// SAFETY: the only non-Send field is the raw pointer of `out`, the caller's output buffer,
// which the caller keeps valid and untouched until the request ends (the documented buffer
// rule); it is written once, by the thread that completes the request.
unsafe impl<T: Element> Send for CollReq<T> {}

impl<T: Element> CollPending for CollReq<T> {
    fn done(&self) -> bool {
        self.handle.test()
    }

    fn finish(self: Box<Self>) -> Result<usize, Fail> {
        let v = self.handle.wait()?;
        let Some(out) = self.out else {
            return Ok(0);
        };
        if v.len() != out.count {
            return Err(Fail::Coded(
                ferrocomm_result::FERROCOMM_ERR_INTERNAL,
                format!(
                    "the asynchronous collective returned {} elements where {} were expected; \
                     this is a bug in ferrocomm, please report it",
                    v.len(),
                    out.count
                ),
            ));
        }
        // SAFETY: the caller's output buffer, valid and untouched until the request ends
        // (the documented buffer rule); checked when the call started.
        unsafe { out.get_mut::<T>() }.copy_from_slice(&v);
        Ok(out.bytes())
    }
}

/// An asynchronous barrier.
struct BarrierReq(CollHandle<()>);

impl CollPending for BarrierReq {
    fn done(&self) -> bool {
        self.0.test()
    }

    fn finish(self: Box<Self>) -> Result<usize, Fail> {
        self.0.wait()?;
        Ok(0)
    }
}

/// Starts an asynchronous collective: copies `input` into a vector, gives it to `f`, and
/// remembers where the result goes.
///
/// # Safety
/// `input` must be readable as in [`Region::get`] for the duration of this call.
unsafe fn start<T: Element>(
    input: Region,
    out: Option<Region>,
    f: impl FnOnce(Vec<T>) -> CollHandle<Vec<T>>,
) -> Box<dyn CollPending> {
    // SAFETY: the caller's contract.
    let v = unsafe { input.get::<T>() }.to_vec();
    Box::new(CollReq {
        handle: f(v),
        out: out.filter(|o| o.count > 0),
    })
}

/// The request out-pointer of a non-blocking call: checked and set to NULL first.
///
/// # Safety
/// `request` must be NULL or valid for writing one pointer.
unsafe fn request_out(op: &str, request: *mut *mut ferrocomm_request_t) -> Result<(), Fail> {
    out_ptr(op, "request", request)?;
    // SAFETY: checked non-null; valid for writes by the caller's contract.
    unsafe { put(request, ptr::null_mut()) };
    Ok(())
}

// ---- all_reduce -------------------------------------------------------------------------

fn allreduce_layout(
    op: &str,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dt: DType,
) -> Result<Layout, Fail> {
    let recv = Region::new(op, "recvbuf", recvbuf, count, dt)?;
    if is_in_place(sendbuf) || ptr::eq(sendbuf, recvbuf) {
        return Ok(Layout::InPlace(recv));
    }
    separate(op, Region::new(op, "sendbuf", sendbuf, count, dt)?, recv)
}

/// Reduces `count` elements of `dtype` element-wise with `op` over every rank
/// (`MPI_Allreduce`, `ncclAllReduce`): afterwards every rank's `recvbuf` holds the same
/// result, bit for bit (floating point included). The algorithm is chosen by size and number
/// of ranks; `FERROCOMM_ALLREDUCE_ALGO=ring|rhd|rd|auto` overrides it.
///
/// In place: `sendbuf` = `FERROCOMM_IN_PLACE` or `sendbuf == recvbuf`; `recvbuf` is then
/// the input and the output. Otherwise the buffers must not overlap.
///
/// Collective: every rank calls it with the same `count`, `dtype` and `op`, in the same
/// order as its other collectives on `comm` (a mismatch gives `COLLECTIVE_MISMATCH` on the
/// ranks involved, never mixed data).
///
/// Blocking: returns when this rank's result is in `recvbuf`; fails after
/// `FERROCOMM_OP_TIMEOUT`. No copy of the buffers is made.
///
/// Thread safety: one thread per communicator (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (a NULL or misaligned buffer with `count` >
/// 0, overlapping buffers, unknown `dtype` or `op`, `FERROCOMM_AVG` on an integer type,
/// `count` too large for memory), `BUSY`, `TIMEOUT`, `PEER_LOST`, `COLLECTIVE_MISMATCH`,
/// `ABORTED`, `IO`. After a communication error the communicator is unusable (see
/// `ferrocomm_result`) and `recvbuf`'s contents are unspecified.
///
/// # Safety
/// `sendbuf` must be `FERROCOMM_IN_PLACE`, or point to `count` readable elements of `dtype`;
/// `recvbuf` to `count` writable elements (either may be NULL when `count` is 0). Neither
/// may be touched by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_allreduce(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    op: ferrocomm_op,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_allreduce";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        let rop = reduce_op(OP, op, dt)?;
        let layout = allreduce_layout(OP, sendbuf, recvbuf, count, dt)?;
        with_comm(OP, comm, |c| {
            dispatch!(OP, dt, layout, T, |b| c.all_reduce(b, rop), |s, r| c
                .all_reduce_into(s, r, rop))
        })
    })
}

/// Non-blocking `ferrocomm_allreduce` (`MPI_Iallreduce`): starts the reduction and stores a
/// request in `*request`; `ferrocomm_wait`, `ferrocomm_test` or `ferrocomm_waitall` ends it.
///
/// How it runs: the input is copied when this call starts (so `sendbuf` may be reused as
/// soon as it returns), the collective runs on the communicator's worker thread, and the
/// result is copied into `recvbuf` by the call that sees the request complete (wait, test
/// or waitall), on that call's thread. Buffer rule: keep `recvbuf` valid and do not read or
/// write it until then; freeing the request with `ferrocomm_request_free` (or
/// `ferrocomm_finalize`) lets the collective finish (the other ranks expect it) but never
/// writes `recvbuf`.
///
/// Order: a communicator's non-blocking collectives run one after another in the order
/// they were started, and every rank must start the same ones in the same order. They are
/// a sequence of their own, independent of the blocking collectives and point-to-point
/// messages on the same communicator (which may run meanwhile).
///
/// In place and arguments: as `ferrocomm_allreduce`. Argument errors are reported here;
/// communication errors by the call that ends the request.
///
/// Ownership: `*request` is a new handle owned by the caller (NULL on failure).
///
/// Thread safety: one thread per communicator (`BUSY` otherwise); the request may be ended
/// on any thread. Does not block.
///
/// Errors: as `ferrocomm_allreduce` (without the communication errors), and
/// `INVALID_ARGUMENT` for a NULL `request`.
///
/// # Safety
/// As `ferrocomm_allreduce` for this call; `recvbuf` must then stay valid and untouched as
/// described above; `request` must be NULL or valid for writing one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_iallreduce(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    op: ferrocomm_op,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_iallreduce";
    boundary(OP, || {
        // SAFETY: the caller's contract for `request`.
        unsafe { request_out(OP, request)? };
        let dt = self::dtype(OP, dtype)?;
        let rop = reduce_op(OP, op, dt)?;
        let (input, out) = match allreduce_layout(OP, sendbuf, recvbuf, count, dt)? {
            Layout::InPlace(b) => (b, b),
            Layout::Separate { send, recv } => (send, recv),
        };
        let p = with_comm(OP, comm, |c| {
            // SAFETY: `input` is readable during this call (the caller's contract).
            with_dtype!(OP, dt, T => Ok(unsafe {
                start::<T>(input, Some(out), |v| c.iall_reduce(v, rop))
            }))
        })?;
        // SAFETY: checked non-null by request_out.
        unsafe { put(request, register(Pending::Coll(Some(p)))) };
        Ok(())
    })
}

// ---- broadcast --------------------------------------------------------------------------

/// Copies `count` elements of `dtype` from the root's `buf` into every other rank's `buf`
/// (`MPI_Bcast`, `ncclBroadcast` in place).
///
/// Collective, blocking, thread safety: as `ferrocomm_allreduce` (every rank passes the same
/// `count`, `dtype` and `root`).
///
/// Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (bad `buf` or `dtype`, `root` >= size),
/// `BUSY`, `TIMEOUT`, `PEER_LOST`, `COLLECTIVE_MISMATCH`, `ABORTED`, `IO`.
///
/// # Safety
/// `buf` must point to `count` elements of `dtype`, readable at the root and writable
/// elsewhere (NULL when `count` is 0), untouched by other threads during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_broadcast(
    comm: *mut ferrocomm_comm_t,
    buf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    root: usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_broadcast";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        let b = Region::new(OP, "buf", buf, count, dt)?;
        with_comm(OP, comm, |c| {
            check_root(OP, root, c.size())?;
            // SAFETY: a checked region of the caller's buffer, exclusively ours during this
            // blocking call (the function's contract).
            with_dtype!(OP, dt, T => Ok(c.broadcast(unsafe { b.get_mut::<T>() }, root)?))
        })
    })
}

/// Non-blocking `ferrocomm_broadcast`. The root's `buf` is copied at the call (the root may
/// reuse it at once and it is never written); the other ranks' `buf` receives the data when
/// the request completes. Rules for the request, the buffer, order and errors: as
/// `ferrocomm_iallreduce`.
///
/// # Safety
/// As `ferrocomm_broadcast` for this call; then `buf` must stay valid and untouched on the
/// other ranks until the request ends; `request` must be NULL or valid for writing one
/// pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_ibroadcast(
    comm: *mut ferrocomm_comm_t,
    buf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    root: usize,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_ibroadcast";
    boundary(OP, || {
        // SAFETY: the caller's contract for `request`.
        unsafe { request_out(OP, request)? };
        let dt = self::dtype(OP, dtype)?;
        let b = Region::new(OP, "buf", buf, count, dt)?;
        let p = with_comm(OP, comm, |c| {
            check_root(OP, root, c.size())?;
            let out = (c.rank() != root).then_some(b);
            // SAFETY: `b` is readable during this call (the caller's contract).
            with_dtype!(OP, dt, T => Ok(unsafe {
                start::<T>(b, out, |v| c.ibroadcast(v, root))
            }))
        })?;
        // SAFETY: checked non-null by request_out.
        unsafe { put(request, register(Pending::Coll(Some(p)))) };
        Ok(())
    })
}

// ---- reduce -----------------------------------------------------------------------------

fn reduce_layout(
    op: &str,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dt: DType,
    is_root: bool,
) -> Result<Layout, Fail> {
    if is_in_place(sendbuf) || (is_root && ptr::eq(sendbuf, recvbuf)) {
        return Ok(Layout::InPlace(Region::new(
            op, "recvbuf", recvbuf, count, dt,
        )?));
    }
    let send = Region::new(op, "sendbuf", sendbuf, count, dt)?;
    let recv = if is_root {
        Region::new(op, "recvbuf", recvbuf, count, dt)?
    } else {
        Region::empty(dt)
    };
    separate(op, send, recv)
}

/// Reduces every rank's `count` elements of `dtype` element-wise with `op` into the root's
/// `recvbuf` (`MPI_Reduce`, `ncclReduce`). `recvbuf` is ignored on the other ranks (may be
/// NULL); no rank's `sendbuf` is modified.
///
/// In place: `sendbuf` = `FERROCOMM_IN_PLACE` (on any rank) or, at the root,
/// `sendbuf == recvbuf`: `recvbuf` is then the rank's contribution, and at the root also the
/// result (the other ranks' `recvbuf` is left unchanged).
///
/// Collective, blocking, thread safety: as `ferrocomm_allreduce` (every rank passes the same
/// `count`, `dtype`, `op` and `root`).
///
/// Errors: as `ferrocomm_allreduce`, and `INVALID_ARGUMENT` for `root` >= size.
///
/// # Safety
/// `sendbuf` must be `FERROCOMM_IN_PLACE` or point to `count` readable elements of `dtype`;
/// `recvbuf` must point to `count` writable elements at the root (and wherever `sendbuf` is
/// `FERROCOMM_IN_PLACE`); NULL is allowed for `count` 0. Untouched by other threads during
/// the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_reduce(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    op: ferrocomm_op,
    root: usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_reduce";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        let rop = reduce_op(OP, op, dt)?;
        with_comm(OP, comm, |c| {
            check_root(OP, root, c.size())?;
            let layout = reduce_layout(OP, sendbuf, recvbuf, count, dt, c.rank() == root)?;
            dispatch!(
                OP,
                dt,
                layout,
                T,
                |b| c.reduce_in_place(b, rop, root),
                |s, r| c.reduce(s, r, rop, root)
            )
        })
    })
}

/// Non-blocking `ferrocomm_reduce`: the contribution is copied at the call; the root's
/// `recvbuf` receives the result when the request completes (the other ranks' buffers are
/// never written). Rules for the request, the buffers, order and errors: as
/// `ferrocomm_iallreduce`.
///
/// # Safety
/// As `ferrocomm_reduce` for this call; then the root's `recvbuf` must stay valid and
/// untouched until the request ends; `request` must be NULL or valid for writing one
/// pointer.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ferrocomm_ireduce(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    op: ferrocomm_op,
    root: usize,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_ireduce";
    boundary(OP, || {
        // SAFETY: the caller's contract for `request`.
        unsafe { request_out(OP, request)? };
        let dt = self::dtype(OP, dtype)?;
        let rop = reduce_op(OP, op, dt)?;
        let p = with_comm(OP, comm, |c| {
            check_root(OP, root, c.size())?;
            let me_root = c.rank() == root;
            let (input, out) = match reduce_layout(OP, sendbuf, recvbuf, count, dt, me_root)? {
                Layout::InPlace(b) => (b, b),
                Layout::Separate { send, recv } => (send, recv),
            };
            let out = me_root.then_some(out);
            // SAFETY: `input` is readable during this call (the caller's contract).
            with_dtype!(OP, dt, T => Ok(unsafe {
                start::<T>(input, out, |v| c.ireduce(v, rop, root))
            }))
        })?;
        // SAFETY: checked non-null by request_out.
        unsafe { put(request, register(Pending::Coll(Some(p)))) };
        Ok(())
    })
}

// ---- all_gather -------------------------------------------------------------------------

fn allgather_layout(
    op: &str,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dt: DType,
    (rank, size): (usize, usize),
) -> Result<Layout, Fail> {
    let recv = Region::new(op, "recvbuf", recvbuf, total(op, "count", count, size)?, dt)?;
    let mine = recv.block(rank, count);
    if is_in_place(sendbuf) || (count > 0 && sendbuf.cast::<u8>() == mine.ptr.cast_const()) {
        return Ok(Layout::InPlace(recv));
    }
    separate(op, Region::new(op, "sendbuf", sendbuf, count, dt)?, recv)
}

/// Gathers every rank's `count` elements of `dtype` from `sendbuf` into every rank's
/// `recvbuf` (`size * count` elements), in rank order (`MPI_Allgather`, `ncclAllGather`).
///
/// In place: `sendbuf` = `FERROCOMM_IN_PLACE`, or `sendbuf` pointing at this rank's block of
/// `recvbuf` (`recvbuf + rank * count` elements, NCCL's rule): this rank's contribution is
/// then already in its block. Otherwise the buffers must not overlap.
///
/// Collective, blocking, thread safety: as `ferrocomm_allreduce` (every rank passes the same
/// `count` and `dtype`).
///
/// Errors: as `ferrocomm_allreduce` without `op`; `INVALID_ARGUMENT` when `size * count`
/// overflows.
///
/// # Safety
/// `sendbuf` must be `FERROCOMM_IN_PLACE` or point to `count` readable elements of `dtype`;
/// `recvbuf` to `size * count` writable elements; untouched by other threads during the
/// call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_allgather(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_allgather";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        with_comm(OP, comm, |c| {
            let layout = allgather_layout(OP, sendbuf, recvbuf, count, dt, (c.rank(), c.size()))?;
            dispatch!(OP, dt, layout, T, |b| c.all_gather_in_place(b), |s, r| c
                .all_gather(s, r))
        })
    })
}

/// Non-blocking `ferrocomm_allgather`: the contribution is copied at the call; `recvbuf`
/// receives every block when the request completes. Rules for the request, the buffers,
/// order and errors: as `ferrocomm_iallreduce`.
///
/// # Safety
/// As `ferrocomm_allgather` for this call; then `recvbuf` must stay valid and untouched
/// until the request ends; `request` must be NULL or valid for writing one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_iallgather(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_iallgather";
    boundary(OP, || {
        // SAFETY: the caller's contract for `request`.
        unsafe { request_out(OP, request)? };
        let dt = self::dtype(OP, dtype)?;
        let p = with_comm(OP, comm, |c| {
            let rank = c.rank();
            let layout = allgather_layout(OP, sendbuf, recvbuf, count, dt, (rank, c.size()))?;
            let (input, out) = match layout {
                Layout::InPlace(b) => (b.block(rank, count), b),
                Layout::Separate { send, recv } => (send, recv),
            };
            // SAFETY: `input` is readable during this call (the caller's contract).
            with_dtype!(OP, dt, T => Ok(unsafe {
                start::<T>(input, Some(out), |v| c.iall_gather(v))
            }))
        })?;
        // SAFETY: checked non-null by request_out.
        unsafe { put(request, register(Pending::Coll(Some(p)))) };
        Ok(())
    })
}

// ---- reduce_scatter ---------------------------------------------------------------------

fn reduce_scatter_layout(
    op: &str,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dt: DType,
    (rank, size): (usize, usize),
) -> Result<Layout, Fail> {
    let n = total(op, "count", count, size)?;
    if is_in_place(sendbuf) {
        return Ok(Layout::InPlace(Region::new(op, "recvbuf", recvbuf, n, dt)?));
    }
    let send = Region::new(op, "sendbuf", sendbuf, n, dt)?;
    if count > 0 && recvbuf.cast::<u8>() == send.block(rank, count).ptr {
        return Ok(Layout::InPlace(send));
    }
    separate(op, send, Region::new(op, "recvbuf", recvbuf, count, dt)?)
}

/// Reduces every rank's `sendbuf` (`size * count` elements of `dtype`) element-wise with
/// `op` and leaves block `rank` of the result (`count` elements) in `recvbuf`
/// (`MPI_Reduce_scatter_block`, `ncclReduceScatter`).
///
/// In place (NCCL's convention, not MPI's): either `sendbuf` = `FERROCOMM_IN_PLACE` and
/// `recvbuf` holds all `size * count` elements, or `recvbuf` points at this rank's block of
/// `sendbuf` (`sendbuf + rank * count` elements). The result is left in this rank's block
/// of the whole buffer (MPI would move it to the front); the other blocks hold partial
/// results afterwards. Otherwise the buffers must not overlap.
///
/// Collective, blocking, thread safety: as `ferrocomm_allreduce`.
///
/// Errors: as `ferrocomm_allreduce`; `INVALID_ARGUMENT` when `size * count` overflows.
///
/// # Safety
/// `sendbuf` must be `FERROCOMM_IN_PLACE` or point to `size * count` readable elements of
/// `dtype`; `recvbuf` to `count` writable elements (`size * count` with
/// `FERROCOMM_IN_PLACE`); untouched by other threads during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_reduce_scatter(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    op: ferrocomm_op,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_reduce_scatter";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        let rop = reduce_op(OP, op, dt)?;
        with_comm(OP, comm, |c| {
            let ctx = (c.rank(), c.size());
            let layout = reduce_scatter_layout(OP, sendbuf, recvbuf, count, dt, ctx)?;
            dispatch!(
                OP,
                dt,
                layout,
                T,
                |b| c.reduce_scatter_in_place(b, rop),
                |s, r| c.reduce_scatter(s, r, rop)
            )
        })
    })
}

/// Non-blocking `ferrocomm_reduce_scatter`: the input is copied at the call; this rank's
/// block of the result is written when the request completes (in place: into this rank's
/// block, the other blocks are left as they were). Rules for the request, the buffers,
/// order and errors: as `ferrocomm_iallreduce`.
///
/// # Safety
/// As `ferrocomm_reduce_scatter` for this call; then the output block must stay valid and
/// untouched until the request ends; `request` must be NULL or valid for writing one
/// pointer.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ferrocomm_ireduce_scatter(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    op: ferrocomm_op,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_ireduce_scatter";
    boundary(OP, || {
        // SAFETY: the caller's contract for `request`.
        unsafe { request_out(OP, request)? };
        let dt = self::dtype(OP, dtype)?;
        let rop = reduce_op(OP, op, dt)?;
        let p = with_comm(OP, comm, |c| {
            let rank = c.rank();
            let layout = reduce_scatter_layout(OP, sendbuf, recvbuf, count, dt, (rank, c.size()))?;
            let (input, out) = match layout {
                Layout::InPlace(b) => (b, b.block(rank, count)),
                Layout::Separate { send, recv } => (send, recv),
            };
            // SAFETY: `input` is readable during this call (the caller's contract).
            with_dtype!(OP, dt, T => Ok(unsafe {
                start::<T>(input, Some(out), |v| c.ireduce_scatter(v, rop))
            }))
        })?;
        // SAFETY: checked non-null by request_out.
        unsafe { put(request, register(Pending::Coll(Some(p)))) };
        Ok(())
    })
}

// ---- gather -----------------------------------------------------------------------------

fn gather_layout(
    op: &str,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dt: DType,
    (rank, size, root): (usize, usize, usize),
) -> Result<Layout, Fail> {
    if rank != root {
        return separate(
            op,
            Region::new(op, "sendbuf", sendbuf, count, dt)?,
            Region::empty(dt),
        );
    }
    let recv = Region::new(op, "recvbuf", recvbuf, total(op, "count", count, size)?, dt)?;
    let mine = recv.block(rank, count);
    if is_in_place(sendbuf) || (count > 0 && sendbuf.cast::<u8>() == mine.ptr.cast_const()) {
        return Ok(Layout::InPlace(recv));
    }
    separate(op, Region::new(op, "sendbuf", sendbuf, count, dt)?, recv)
}

/// Gathers every rank's `count` elements of `dtype` from `sendbuf` into the root's `recvbuf`
/// (`size * count` elements), in rank order (`MPI_Gather`). `recvbuf` is ignored on the
/// other ranks (may be NULL).
///
/// In place, at the root only: `sendbuf` = `FERROCOMM_IN_PLACE` or `sendbuf` pointing at
/// the root's block of `recvbuf`; the root's contribution is then already in place. The
/// other ranks must pass a real `sendbuf` (`FERROCOMM_IN_PLACE` is refused there).
///
/// Collective, blocking, thread safety: as `ferrocomm_allreduce` (every rank passes the same
/// `count`, `dtype` and `root`).
///
/// Errors: as `ferrocomm_allgather`, and `INVALID_ARGUMENT` for `root` >= size.
///
/// # Safety
/// `sendbuf` must point to `count` readable elements of `dtype` (or be
/// `FERROCOMM_IN_PLACE` at the root); the root's `recvbuf` to `size * count` writable
/// elements; untouched by other threads during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_gather(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    root: usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_gather";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        with_comm(OP, comm, |c| {
            check_root(OP, root, c.size())?;
            let ctx = (c.rank(), c.size(), root);
            let layout = gather_layout(OP, sendbuf, recvbuf, count, dt, ctx)?;
            dispatch!(OP, dt, layout, T, |b| c.gather_in_place(b, root), |s, r| c
                .gather(s, r, root))
        })
    })
}

/// Non-blocking `ferrocomm_gather`: the contribution is copied at the call; the root's
/// `recvbuf` receives every block when the request completes. Rules for the request, the
/// buffers, order and errors: as `ferrocomm_iallreduce`.
///
/// # Safety
/// As `ferrocomm_gather` for this call; then the root's `recvbuf` must stay valid and
/// untouched until the request ends; `request` must be NULL or valid for writing one
/// pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_igather(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    root: usize,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_igather";
    boundary(OP, || {
        // SAFETY: the caller's contract for `request`.
        unsafe { request_out(OP, request)? };
        let dt = self::dtype(OP, dtype)?;
        let p = with_comm(OP, comm, |c| {
            check_root(OP, root, c.size())?;
            let ctx = (c.rank(), c.size(), root);
            let (input, out) = match gather_layout(OP, sendbuf, recvbuf, count, dt, ctx)? {
                Layout::InPlace(b) => (b.block(root, count), b),
                Layout::Separate { send, recv } => (send, recv),
            };
            // SAFETY: `input` is readable during this call (the caller's contract).
            with_dtype!(OP, dt, T => Ok(unsafe {
                start::<T>(input, Some(out), |v| c.igather(v, root))
            }))
        })?;
        // SAFETY: checked non-null by request_out.
        unsafe { put(request, register(Pending::Coll(Some(p)))) };
        Ok(())
    })
}

// ---- scatter ----------------------------------------------------------------------------

fn scatter_layout(
    op: &str,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dt: DType,
    (rank, size, root): (usize, usize, usize),
) -> Result<Layout, Fail> {
    if rank != root {
        return separate(
            op,
            Region::empty(dt),
            Region::new(op, "recvbuf", recvbuf, count, dt)?,
        );
    }
    let send = Region::new(op, "sendbuf", sendbuf, total(op, "count", count, size)?, dt)?;
    let mine = send.block(rank, count);
    if is_in_place(recvbuf) || (count > 0 && recvbuf.cast::<u8>() == mine.ptr) {
        return Ok(Layout::InPlace(send));
    }
    separate(op, send, Region::new(op, "recvbuf", recvbuf, count, dt)?)
}

/// Sends block `i` (`count` elements of `dtype`) of the root's `sendbuf` (`size * count`
/// elements) to rank `i`'s `recvbuf` (`MPI_Scatter`). `sendbuf` is ignored on the other
/// ranks (may be NULL).
///
/// In place, at the root only: `recvbuf` = `FERROCOMM_IN_PLACE` (as MPI, in `recvbuf`) or
/// `recvbuf` pointing at the root's block of `sendbuf`; the root's block then stays where it
/// is. The other ranks must pass a real `recvbuf`.
///
/// Collective, blocking, thread safety: as `ferrocomm_allreduce` (every rank passes the same
/// `count`, `dtype` and `root`).
///
/// Errors: as `ferrocomm_gather`.
///
/// # Safety
/// The root's `sendbuf` must point to `size * count` readable elements of `dtype`;
/// `recvbuf` to `count` writable elements (or be `FERROCOMM_IN_PLACE` at the root);
/// untouched by other threads during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_scatter(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    root: usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_scatter";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        with_comm(OP, comm, |c| {
            check_root(OP, root, c.size())?;
            let ctx = (c.rank(), c.size(), root);
            let layout = scatter_layout(OP, sendbuf, recvbuf, count, dt, ctx)?;
            dispatch!(
                OP,
                dt,
                layout,
                T,
                |b| c.scatter_in_place(b, root),
                |s, r| c.scatter(s, r, root)
            )
        })
    })
}

/// Non-blocking `ferrocomm_scatter`: the root's `sendbuf` is copied at the call (and never
/// written); `recvbuf` receives this rank's block when the request completes (in place at
/// the root: nothing is written). Rules for the request, the buffers, order and errors: as
/// `ferrocomm_iallreduce`.
///
/// # Safety
/// As `ferrocomm_scatter` for this call; then `recvbuf` must stay valid and untouched until
/// the request ends; `request` must be NULL or valid for writing one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_iscatter(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    root: usize,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_iscatter";
    boundary(OP, || {
        // SAFETY: the caller's contract for `request`.
        unsafe { request_out(OP, request)? };
        let dt = self::dtype(OP, dtype)?;
        let p = with_comm(OP, comm, |c| {
            check_root(OP, root, c.size())?;
            let ctx = (c.rank(), c.size(), root);
            let (input, out) = match scatter_layout(OP, sendbuf, recvbuf, count, dt, ctx)? {
                Layout::InPlace(b) => (b, None),
                Layout::Separate { send, recv } => (send, Some(recv)),
            };
            // SAFETY: `input` is readable during this call (the caller's contract).
            with_dtype!(OP, dt, T => Ok(unsafe {
                start::<T>(input, out, |v| c.iscatter(v, count, root))
            }))
        })?;
        // SAFETY: checked non-null by request_out.
        unsafe { put(request, register(Pending::Coll(Some(p)))) };
        Ok(())
    })
}

// ---- all_to_all -------------------------------------------------------------------------

fn alltoall_layout(
    op: &str,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dt: DType,
    size: usize,
) -> Result<Layout, Fail> {
    let n = total(op, "count", count, size)?;
    let recv = Region::new(op, "recvbuf", recvbuf, n, dt)?;
    if is_in_place(sendbuf) || ptr::eq(sendbuf, recvbuf) {
        return Ok(Layout::InPlace(recv));
    }
    separate(op, Region::new(op, "sendbuf", sendbuf, n, dt)?, recv)
}

/// Sends block `j` (`count` elements of `dtype`) of `sendbuf` to rank `j`, which stores it
/// as block `rank` of its `recvbuf` (`MPI_Alltoall`); both buffers hold `size * count`
/// elements.
///
/// In place: `sendbuf` = `FERROCOMM_IN_PLACE` or `sendbuf == recvbuf`. Otherwise the
/// buffers must not overlap.
///
/// Collective, blocking, thread safety: as `ferrocomm_allreduce` (every rank passes the same
/// `count` and `dtype`).
///
/// Errors: as `ferrocomm_allgather`.
///
/// # Safety
/// `sendbuf` must be `FERROCOMM_IN_PLACE` or point to `size * count` readable elements of
/// `dtype`; `recvbuf` to `size * count` writable elements; untouched by other threads during
/// the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_alltoall(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_alltoall";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        with_comm(OP, comm, |c| {
            let layout = alltoall_layout(OP, sendbuf, recvbuf, count, dt, c.size())?;
            dispatch!(OP, dt, layout, T, |b| c.all_to_all_in_place(b), |s, r| c
                .all_to_all(s, r))
        })
    })
}

/// Non-blocking `ferrocomm_alltoall`: `sendbuf` is copied at the call; `recvbuf` receives
/// the blocks when the request completes. Rules for the request, the buffers, order and
/// errors: as `ferrocomm_iallreduce`.
///
/// # Safety
/// As `ferrocomm_alltoall` for this call; then `recvbuf` must stay valid and untouched
/// until the request ends; `request` must be NULL or valid for writing one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_ialltoall(
    comm: *mut ferrocomm_comm_t,
    sendbuf: *const c_void,
    recvbuf: *mut c_void,
    count: usize,
    dtype: ferrocomm_dtype,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_ialltoall";
    boundary(OP, || {
        // SAFETY: the caller's contract for `request`.
        unsafe { request_out(OP, request)? };
        let dt = self::dtype(OP, dtype)?;
        let p = with_comm(OP, comm, |c| {
            let (input, out) = match alltoall_layout(OP, sendbuf, recvbuf, count, dt, c.size())? {
                Layout::InPlace(b) => (b, b),
                Layout::Separate { send, recv } => (send, recv),
            };
            // SAFETY: `input` is readable during this call (the caller's contract).
            with_dtype!(OP, dt, T => Ok(unsafe {
                start::<T>(input, Some(out), |v| c.iall_to_all(v))
            }))
        })?;
        // SAFETY: checked non-null by request_out.
        unsafe { put(request, register(Pending::Coll(Some(p)))) };
        Ok(())
    })
}

// ---- barrier ----------------------------------------------------------------------------

/// Non-blocking `ferrocomm_barrier` (`MPI_Ibarrier`): the request completes when every
/// rank has started the barrier. Order, request and errors: as `ferrocomm_iallreduce`.
///
/// # Safety
/// `request` must be NULL or valid for writing one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_ibarrier(
    comm: *mut ferrocomm_comm_t,
    request: *mut *mut ferrocomm_request_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_ibarrier";
    boundary(OP, || {
        // SAFETY: the caller's contract for `request`.
        unsafe { request_out(OP, request)? };
        let p = with_comm(OP, comm, |c| {
            Ok(Box::new(BarrierReq(c.ibarrier())) as Box<dyn CollPending>)
        })?;
        // SAFETY: checked non-null by request_out.
        unsafe { put(request, register(Pending::Coll(Some(p)))) };
        Ok(())
    })
}

// ---- all_reduce of many buffers (the DDP helper) ------------------------------------------

/// Default bucket size of `ferrocomm_allreduce_many`: 25 MiB, PyTorch DDP's `bucket_cap_mb`.
pub const FERROCOMM_DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// All-reduces `n` buffers of one data type at once, the way data-parallel training reduces
/// gradients (`ferrocomm_allreduce` of each buffer, but faster): buffer `i` is `bufs[i]`
/// with `counts[i]` elements of `dtype`, and afterwards holds the element-wise reduction with
/// `op` over every rank (`FERROCOMM_AVG` for averaged gradients). In place.
///
/// How: consecutive buffers are packed into buckets of at most `bucket_bytes` (0:
/// `FERROCOMM_DEFAULT_BUCKET_BYTES`, 25 MiB), each bucket is all-reduced as one message on
/// the communicator's non-blocking sequence while the next is packed, and the results are
/// copied back; a buffer that is a bucket on its own (as large as the cap, or alone) is
/// all-reduced in place without a copy, on the blocking sequence, meanwhile. Fewer, larger
/// messages cost one latency per bucket instead of per buffer. This is a thin layer over
/// `ferrocomm_allreduce`/`ferrocomm_iallreduce`; to overlap the reduction with the backward
/// pass, use the reducer (`ferrocomm_reducer_new`) instead.
///
/// Collective: every rank passes the same `n`, `counts`, `dtype`, `op` and `bucket_bytes`
/// (a difference gives `COLLECTIVE_MISMATCH`, not mixed data). Uses both the blocking and the
/// non-blocking sequences of `comm` (as one blocking call from the caller's point of view).
///
/// Blocking: returns when every buffer holds its result; fails after `FERROCOMM_OP_TIMEOUT`.
/// Thread safety: one thread per communicator (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `INVALID_ARGUMENT` (`bufs` or `counts` NULL with `n` > 0, a
/// NULL or misaligned buffer with a count > 0, buffers that overlap each other, unknown
/// `dtype` or `op`, avg on an integer type), `BUSY`, and the communication errors of
/// `ferrocomm_allreduce`, after which the buffers' contents are unspecified.
///
/// # Safety
/// `bufs` and `counts` must point to `n` entries each (NULL when `n` is 0); each `bufs[i]`
/// to `counts[i]` readable and writable elements of `dtype`, untouched by other threads
/// during the call.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ferrocomm_allreduce_many(
    comm: *mut ferrocomm_comm_t,
    bufs: *const *mut c_void,
    counts: *const usize,
    n: usize,
    dtype: ferrocomm_dtype,
    op: ferrocomm_op,
    bucket_bytes: usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_allreduce_many";
    boundary(OP, || {
        let dt = self::dtype(OP, dtype)?;
        let rop = reduce_op(OP, op, dt)?;
        if n > 0 && (bufs.is_null() || counts.is_null()) {
            let arg = if bufs.is_null() { "bufs" } else { "counts" };
            return Err(Fail::invalid(OP, arg, format!("NULL with n = {n}")));
        }
        if n > isize::MAX as usize / std::mem::size_of::<usize>() {
            return Err(Fail::invalid(
                OP,
                "n",
                format!("{n} entries do not fit in memory"),
            ));
        }
        let (ps, cs) = if n == 0 {
            (&[][..], &[][..])
        } else {
            // SAFETY: `n` readable entries each, by the caller's contract.
            unsafe {
                (
                    std::slice::from_raw_parts(bufs, n),
                    std::slice::from_raw_parts(counts, n),
                )
            }
        };
        let regions = ps
            .iter()
            .zip(cs)
            .enumerate()
            .map(|(i, (&p, &c))| Region::new(OP, &format!("bufs[{i}]"), p, c, dt))
            .collect::<Result<Vec<_>, Fail>>()?;
        let mut sorted: Vec<(usize, &Region)> = regions.iter().enumerate().collect();
        sorted.sort_by_key(|(_, r)| r.ptr.addr());
        for w in sorted.windows(2) {
            if w[0].1.overlaps(w[1].1) {
                return Err(Fail::invalid(
                    OP,
                    "bufs",
                    format!("bufs[{}] and bufs[{}] overlap", w[0].0, w[1].0),
                ));
            }
        }
        let cap = if bucket_bytes == 0 {
            FERROCOMM_DEFAULT_BUCKET_BYTES
        } else {
            bucket_bytes
        };
        // Consecutive buffers, closed when the next would exceed the cap.
        let mut buckets: Vec<Vec<Region>> = Vec::new();
        let mut bytes = 0usize;
        for r in regions.into_iter().filter(|r| r.count > 0) {
            match buckets.last_mut() {
                Some(b) if bytes + r.bytes() <= cap => {
                    bytes += r.bytes();
                    b.push(r);
                }
                _ => {
                    bytes = r.bytes();
                    buckets.push(vec![r]);
                }
            }
        }
        with_comm(OP, comm, |c| {
            with_dtype!(OP, dt, T => {
                let mut started = Vec::new();
                for b in &buckets {
                    if let [one] = b.as_slice() {
                        // SAFETY: a checked region of the caller's buffer, not overlapping
                        // any other (checked above), exclusively ours during this call.
                        c.all_reduce(unsafe { one.get_mut::<T>() }, rop)?;
                        continue;
                    }
                    let mut packed: Vec<T> = Vec::with_capacity(b.iter().map(|r| r.count).sum());
                    for r in b {
                        // SAFETY: as above.
                        packed.extend_from_slice(unsafe { r.get::<T>() });
                    }
                    started.push((b, c.iall_reduce(packed, rop)));
                }
                for (b, h) in started {
                    let packed = h.wait()?;
                    let mut at = 0;
                    for r in b {
                        let part = packed.get(at..at + r.count).ok_or_else(|| {
                            Fail::Coded(
                                ferrocomm_result::FERROCOMM_ERR_INTERNAL,
                                "a bucket came back shorter than it was sent; this is a \
                                 bug in ferrocomm, please report it"
                                    .to_string(),
                            )
                        })?;
                        // SAFETY: as above.
                        unsafe { r.get_mut::<T>() }.copy_from_slice(part);
                        at += r.count;
                    }
                }
                Ok(())
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(p: usize, count: usize) -> Region {
        Region {
            ptr: ptr::without_provenance_mut(p),
            count,
            esize: 4,
        }
    }

    #[test]
    fn regions_overlap_only_when_they_share_bytes() {
        assert!(region(64, 4).overlaps(&region(64, 1)));
        assert!(region(64, 4).overlaps(&region(76, 4)));
        assert!(!region(64, 4).overlaps(&region(80, 4)));
        assert!(!region(80, 4).overlaps(&region(64, 4)));
        assert!(
            !region(64, 0).overlaps(&region(64, 4)),
            "empty overlaps nothing"
        );
        assert_eq!(region(64, 8).block(1, 2).ptr.addr(), 72);
    }

    #[test]
    fn layouts_follow_the_in_place_rules() {
        let dt = DType::F32;
        let mut whole = [0f32; 6];
        let w = whole.as_mut_ptr().cast::<c_void>();
        let at = |i: usize| w.cast::<f32>().wrapping_add(i).cast::<c_void>();
        let ip = ptr::without_provenance::<c_void>(IN_PLACE);
        let is_ip = |l: Result<Layout, Fail>| matches!(l, Ok(Layout::InPlace(_)));
        // all_gather of 2 per rank among 3: rank 1's block starts at element 2.
        assert!(is_ip(allgather_layout("t", ip, w, 2, dt, (1, 3))));
        assert!(is_ip(allgather_layout("t", at(2), w, 2, dt, (1, 3))));
        let e = allgather_layout("t", at(1), w, 2, dt, (1, 3)).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
        // reduce_scatter: recvbuf at this rank's block of sendbuf.
        assert!(is_ip(reduce_scatter_layout("t", w, at(4), 2, dt, (2, 3))));
        assert!(is_ip(reduce_scatter_layout("t", ip, w, 2, dt, (2, 3))));
        // gather: IN_PLACE only at the root.
        assert!(is_ip(gather_layout("t", ip, w, 2, dt, (0, 3, 0))));
        let e = gather_layout("t", ip, w, 2, dt, (1, 3, 0)).unwrap_err();
        assert!(
            e.to_string().contains("FERROCOMM_IN_PLACE is not allowed"),
            "{e}"
        );
        // scatter: IN_PLACE in recvbuf at the root.
        assert!(is_ip(scatter_layout(
            "t",
            w,
            ip.cast_mut(),
            2,
            dt,
            (0, 3, 0)
        )));
        assert!(scatter_layout("t", w, ip.cast_mut(), 2, dt, (1, 3, 0)).is_err());
        // Counts that overflow are refused before any pointer is used.
        let e = alltoall_layout("t", w, w, usize::MAX / 2, dt, 3).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        let e = allreduce_layout("t", w, w, usize::MAX / 2, dt).unwrap_err();
        assert!(e.to_string().contains("do not fit"), "{e}");
    }
}
