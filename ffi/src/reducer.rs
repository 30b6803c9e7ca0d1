//! Data-parallel training: the gradient reducer (`ferrocomm::ddp::Reducer`) and
//! `broadcast_parameters`, over the Rust API.
//!
//! A reducer handle owns a Rust `Reducer`, which works on its own duplicate of the
//! communicator it was made on: its all_reduces never mix with the program's own calls, and
//! the communicator handle may be freed while the reducer lives.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr;
use std::sync::Arc;

use ferrocomm_rs::DType;
use ferrocomm_rs::ddp::{ParamMut, ParamSpec, Reducer, ReducerOptions, broadcast_parameters};
use half::{bf16, f16};
use parking_lot::Mutex;

use crate::comm::{ferrocomm_comm_t, with_comm};
use crate::error::{Fail, boundary, ferrocomm_result};
use crate::handle::{self, Kind, Object};
use crate::types::{dtype_arg, ferrocomm_dtype, in_bytes, out_bytes, out_ptr, put};

/// A gradient reducer: gathers the gradients of a model's parameters into buckets and
/// all-reduces (averages) them over the ranks while the backward pass still runs, like
/// PyTorch's `DistributedDataParallel`. An opaque handle; see `ferrocomm_reducer_new` and
/// `ferrocomm_reducer_free`.
#[allow(non_camel_case_types)]
pub struct ferrocomm_reducer_t {
    _opaque: [u8; 0],
}

/// What a reducer handle refers to.
pub(crate) struct ReducerCell {
    /// One thread at a time: a second thread gets `FERROCOMM_ERR_BUSY` instead of waiting.
    reducer: Mutex<Reducer>,
}

fn with_reducer<R>(
    op: &str,
    h: *mut ferrocomm_reducer_t,
    f: impl FnOnce(&mut Reducer) -> Result<R, Fail>,
) -> Result<R, Fail> {
    let cell = match handle::get(h.addr(), Kind::Reducer)? {
        Object::Reducer(c) => c,
        _ => return Err(Fail::Handle(format!("{op}: not a reducer"))),
    };
    let mut guard = cell.reducer.try_lock().ok_or_else(|| {
        Fail::Busy(format!(
            "reducer {:#x} is in use by another thread (a reducer serves one thread at a time)",
            h.addr()
        ))
    })?;
    f(&mut guard)
}

/// `n` entries of the array `p` (argument `arg`), which may be NULL only when `n` is 0.
///
/// # Safety
/// `p` must be NULL or point to `n` readable entries that outlive `'a`.
unsafe fn array<'a, T>(op: &str, arg: &str, p: *const T, n: usize) -> Result<&'a [T], Fail> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Fail::invalid(op, arg, format!("NULL with n = {n}")));
    }
    if n > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(Fail::invalid(
            op,
            "n",
            format!("{n} entries do not fit in memory"),
        ));
    }
    // SAFETY: non-null, `n` readable entries by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// A gradient element type given as a `ferrocomm_dtype` integer: f32, f16 or bf16.
fn grad_dtype(op: &str, arg: &str, code: u32) -> Result<DType, Fail> {
    let dt = dtype_arg(op, arg, code)?;
    match dt {
        DType::F32 | DType::F16 | DType::BF16 => Ok(dt),
        other => Err(Fail::invalid(
            op,
            arg,
            format!(
                "element type {other} is not a gradient type (FERROCOMM_F32, FERROCOMM_F16, \
                 FERROCOMM_BF16)"
            ),
        )),
    }
}

/// The parameter list of `ferrocomm_reducer_new`, checked.
///
/// # Safety
/// As `ferrocomm_reducer_new`'s arrays.
unsafe fn specs(
    op: &str,
    n: usize,
    names: *const *const c_char,
    dtypes: *const ferrocomm_dtype,
    numels: *const usize,
    shapes: *const *const usize,
    ndims: *const usize,
) -> Result<Vec<ParamSpec>, Fail> {
    // SAFETY: `n` entries each (or NULL), by the caller's contract.
    let (names, dts, numels) = unsafe {
        (
            array(op, "names", names, n)?,
            array(op, "dtypes", dtypes, n)?,
            array(op, "numels", numels, n)?,
        )
    };
    let dims = match (shapes.is_null(), ndims.is_null()) {
        (true, true) => None,
        (false, false) => {
            // SAFETY: as above.
            Some(unsafe {
                (
                    array(op, "shapes", shapes, n)?,
                    array(op, "ndims", ndims, n)?,
                )
            })
        }
        _ => {
            return Err(Fail::invalid(
                op,
                "shapes",
                "shapes and ndims are both given or both NULL",
            ));
        }
    };
    let mut specs = Vec::with_capacity(n);
    for i in 0..n {
        if names[i].is_null() {
            return Err(Fail::invalid(op, &format!("names[{i}]"), "NULL"));
        }
        // SAFETY: a NUL-terminated string by the caller's contract.
        let name = unsafe { CStr::from_ptr(names[i]) }
            .to_str()
            .map_err(|_| Fail::invalid(op, &format!("names[{i}]"), "not valid UTF-8"))?;
        let dt = grad_dtype(op, &format!("dtypes[{i}] (parameter {name:?})"), dts[i])?;
        let shape = match dims {
            None => vec![numels[i]],
            Some((shapes, ndims)) => {
                let arg = format!("shapes[{i}]");
                // SAFETY: `ndims[i]` readable entries, by the caller's contract.
                let s = unsafe { array(op, &arg, shapes[i], ndims[i])? }.to_vec();
                let prod = s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if prod != Some(numels[i]) {
                    return Err(Fail::invalid(
                        op,
                        &arg,
                        format!(
                            "parameter {name:?} has shape {s:?} but numels[{i}] = {}",
                            numels[i]
                        ),
                    ));
                }
                s
            }
        };
        specs.push(ParamSpec::new(name, &shape, dt));
    }
    Ok(specs)
}

/// Makes a gradient reducer for a model's `n` parameters on the ranks of `comm`
/// (`torch.nn.parallel.DistributedDataParallel`'s reducer).
///
/// Parameters, in model order (the order of the forward pass; gradients are bucketed in
/// reverse, since backward produces them back to front): parameter `i` is named `names[i]`
/// (a NUL-terminated UTF-8 string, unique within the model), has element type `dtypes[i]`
/// (`FERROCOMM_F32`, `FERROCOMM_F16` or `FERROCOMM_BF16`) and `numels[i]` elements. Its
/// shape is `shapes[i][0..ndims[i]]` when `shapes` and `ndims` are given (their product
/// must be `numels[i]`), else the one dimension `numels[i]`; shapes only appear in messages
/// and in the check that all ranks agree.
///
/// Settings: `bucket_cap_mb` is the largest bucket in MiB (0: the default, 25);
/// `first_bucket_mb` the cap of the first bucket, which is kept small so that communication
/// starts early (0: the default, 1); `find_unused` nonzero lets parameters that were never
/// marked in a step count as zero instead of failing `ferrocomm_reducer_finish`
/// (PyTorch's `find_unused_parameters=True`).
///
/// Collective: every rank of `comm` calls it with the same parameters (names, element
/// types, shapes, in the same order) and the same bucket caps, at the same point of its
/// sequence of collectives. When the lists differ, every rank fails with
/// `INVALID_ARGUMENT` and a message naming the first difference (position, name, shape or
/// type, or a parameter missing on one rank), instead of hanging or reducing mismatched
/// gradients later. A local argument error (a duplicate name, a bad type) also fails every
/// rank. The reducer then works on its own duplicate of `comm` (`ferrocomm_comm_dup`): its
/// all_reduces never mix with the program's own calls on `comm`, and `comm` may be freed
/// before the reducer.
///
/// Blocking: waits for every rank (one all_gather of a hash); fails after
/// `FERROCOMM_OP_TIMEOUT`. Thread safety: uses `comm` for the call (`BUSY` when another
/// thread is inside a call on it).
///
/// Ownership: on success `*reducer` is a new handle owned by the caller; release it with
/// `ferrocomm_reducer_free` (or `ferrocomm_finalize`). On failure `*reducer` is NULL.
/// `names`, `dtypes`, `numels`, `shapes` and `ndims` are only read during the call.
///
/// Errors: `INVALID_HANDLE`, `BUSY`, `INVALID_ARGUMENT` (`reducer` NULL; `names`,
/// `dtypes` or `numels` NULL with `n` > 0; only one of `shapes` and `ndims` given; a NULL
/// or non-UTF-8 name; a duplicate name; a data type other than f32, f16 and bf16; a shape
/// whose product is not the count; a negative or non-finite cap; parameters that differ
/// between ranks), and the communication errors (`TIMEOUT`, `PEER_LOST`,
/// `COLLECTIVE_MISMATCH`, `ABORTED`, `IO`).
///
/// # Safety
/// `names`, `dtypes` and `numels` must point to `n` entries each (may be NULL when `n` is
/// 0), each name to a NUL-terminated string; `shapes` and `ndims` must both be NULL or point
/// to `n` entries each, `shapes[i]` to `ndims[i]` readable `size_t` (NULL when `ndims[i]`
/// is 0); `reducer` must be NULL or valid for writing one pointer.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ferrocomm_reducer_new(
    comm: *mut ferrocomm_comm_t,
    n: usize,
    names: *const *const c_char,
    dtypes: *const ferrocomm_dtype,
    numels: *const usize,
    shapes: *const *const usize,
    ndims: *const usize,
    bucket_cap_mb: f64,
    first_bucket_mb: f64,
    find_unused: c_int,
    reducer: *mut *mut ferrocomm_reducer_t,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_reducer_new";
    boundary(OP, || {
        // Local checks; when they fail, this rank still takes part in the exchange of
        // ferrocomm_reducer_new (with a parameter list that cannot match), so that the
        // other ranks fail at once instead of waiting for it.
        // SAFETY: forwarded contract.
        let specs = unsafe { specs(OP, n, names, dtypes, numels, shapes, ndims) }.and_then(|s| {
            out_ptr(OP, "reducer", reducer)?;
            Ok(s)
        });
        if !reducer.is_null() {
            // SAFETY: non-null; valid for writes by the caller's contract.
            unsafe { put(reducer, ptr::null_mut()) };
        }
        let defaults = ReducerOptions::default();
        let opts = ReducerOptions::default()
            .bucket_cap_mb(if bucket_cap_mb == 0.0 {
                defaults.bucket_cap_mb
            } else {
                bucket_cap_mb
            })
            .first_bucket_mb(if first_bucket_mb == 0.0 {
                defaults.first_bucket_mb
            } else {
                first_bucket_mb
            })
            .find_unused_parameters(find_unused != 0);
        let r = with_comm(OP, comm, |c| match specs {
            Ok(specs) => Ok(Reducer::new(c, specs, opts)?),
            Err(e) => {
                let placeholder = ParamSpec::new(
                    format!("(invalid arguments to {OP} on rank {})", c.rank()),
                    &[0],
                    DType::U8,
                );
                let _ = Reducer::new(c, vec![placeholder], ReducerOptions::default());
                Err(e)
            }
        })?;
        let cell = ReducerCell {
            reducer: Mutex::new(r),
        };
        let h = handle::insert(Object::Reducer(Arc::new(cell)));
        // SAFETY: as above.
        unsafe { put(reducer, ptr::without_provenance_mut(h)) };
        Ok(())
    })
}

/// The spec of parameter `index`, or an error naming the registered count.
fn param(op: &str, r: &Reducer, index: usize) -> Result<ParamSpec, Fail> {
    r.params().get(index).cloned().ok_or_else(|| {
        Fail::invalid(
            op,
            "index",
            format!(
                "{index} is out of range: {} parameters are registered",
                r.params().len()
            ),
        )
    })
}

/// Hands over the gradient of parameter `index` (its position in `ferrocomm_reducer_new`'s
/// lists) for this step: `count` elements of the parameter's element type at `grad`. The
/// gradient is copied into its bucket (added to the sum while accumulating, see
/// `ferrocomm_reducer_set_sync`), so `grad` may be reused as soon as the call returns. When
/// the bucket and every bucket before it are complete, their all_reduce starts in the
/// background while the caller goes on with backward. The first call of a step opens it.
///
/// Every parameter is marked exactly once per step; marking one twice fails with
/// `INVALID_ARGUMENT` naming it, and changes nothing (the step goes on).
///
/// Blocking: no (copies, then may start a background all_reduce). Thread safety: one thread
/// at a time per reducer (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `BUSY`, `INVALID_ARGUMENT` (`index` out of range; `count` not
/// the parameter's element count; `grad` NULL or misaligned; the parameter already marked in
/// this step; all naming the parameter), and the communication error of an earlier failed
/// step (a reducer whose all_reduce failed stays failed; free it).
///
/// # Safety
/// `grad` must point to `count` readable elements of the parameter's element type.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_reducer_mark_ready(
    reducer: *mut ferrocomm_reducer_t,
    index: usize,
    grad: *const c_void,
    count: usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_reducer_mark_ready";
    boundary(OP, || {
        with_reducer(OP, reducer, |r| {
            let p = param(OP, r, index)?;
            let arg = format!("grad (parameter {:?})", p.name);
            // SAFETY: `count` readable elements of the parameter's type, by the caller's
            // contract; checked for NULL and alignment.
            let bytes = unsafe { in_bytes(OP, &arg, grad, count, p.dtype)? };
            let cast = |e: bytemuck::PodCastError| Fail::invalid(OP, &arg, e.to_string());
            match p.dtype {
                DType::F32 => {
                    r.mark_ready::<f32>(index, bytemuck::try_cast_slice(bytes).map_err(cast)?)?
                }
                DType::F16 => {
                    r.mark_ready::<f16>(index, bytemuck::try_cast_slice(bytes).map_err(cast)?)?
                }
                _ => r.mark_ready::<bf16>(index, bytemuck::try_cast_slice(bytes).map_err(cast)?)?,
            }
            Ok(())
        })
    })
}

/// Ends the step: checks that every parameter was marked (with `find_unused`, unmarked ones
/// count as zero), and in a synchronised step starts the remaining buckets' all_reduces and
/// waits for all of them. Afterwards `ferrocomm_reducer_grad` gives each parameter's
/// gradient averaged over the ranks (after an unsynchronised step: this rank's sum so far).
///
/// Collective in effect: in a synchronised step every rank of the reducer must finish the
/// step (the all_reduces need them all).
///
/// Blocking: yes, until every bucket is reduced; fails after `FERROCOMM_OP_TIMEOUT`.
/// Thread safety: one thread at a time per reducer (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `BUSY`, `INVALID_ARGUMENT` (parameters never marked in this
/// step, named in the message; the step stays open: mark them and call it again), and the
/// communication errors (`TIMEOUT`, `PEER_LOST`, `COLLECTIVE_MISMATCH`, `ABORTED`, `IO`),
/// after which the reducer is unusable (every later call fails the same way; free it).
#[unsafe(no_mangle)]
pub extern "C" fn ferrocomm_reducer_finish(reducer: *mut ferrocomm_reducer_t) -> ferrocomm_result {
    const OP: &str = "ferrocomm_reducer_finish";
    boundary(OP, || with_reducer(OP, reducer, |r| Ok(r.finish()?)))
}

/// Copies parameter `index`'s gradient after `ferrocomm_reducer_finish` into `out`:
/// `count` elements (the parameter's element count) of its element type. After a
/// synchronised step it is the average over the ranks (bit-identical on every rank), after
/// an unsynchronised one this rank's accumulated sum. Readable until the next step's first
/// `ferrocomm_reducer_mark_ready`.
///
/// Blocking: no. Thread safety: one thread at a time per reducer (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `BUSY`, `INVALID_ARGUMENT` (`index` out of range; `count` not
/// the parameter's element count; `out` NULL or misaligned; a step is open), and the error
/// of a failed step.
///
/// # Safety
/// `out` must point to `count` writable elements of the parameter's element type.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_reducer_grad(
    reducer: *mut ferrocomm_reducer_t,
    index: usize,
    out: *mut c_void,
    count: usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_reducer_grad";
    boundary(OP, || {
        with_reducer(OP, reducer, |r| {
            let p = param(OP, r, index)?;
            let arg = format!("out (parameter {:?})", p.name);
            if count != p.numel() {
                return Err(Fail::invalid(
                    OP,
                    &arg,
                    format!(
                        "parameter {:?} of shape {:?} has {} elements, count is {count}",
                        p.name,
                        p.shape,
                        p.numel()
                    ),
                ));
            }
            // SAFETY: `count` writable elements of the parameter's type, by the caller's
            // contract; checked for NULL and alignment.
            let dst = unsafe { out_bytes(OP, &arg, out, count, p.dtype)? };
            let src: &[u8] = match p.dtype {
                DType::F32 => bytemuck::cast_slice(r.grad::<f32>(index)?),
                DType::F16 => bytemuck::cast_slice(r.grad::<f16>(index)?),
                _ => bytemuck::cast_slice(r.grad::<bf16>(index)?),
            };
            dst.copy_from_slice(src);
            Ok(())
        })
    })
}

/// Turns synchronisation of the following steps on (`sync` nonzero, the default) or off
/// (0): PyTorch's `no_sync()`. Steps finished while it is off send nothing; their gradients
/// are summed locally, and the next synchronised step adds its own and reduces the sum, so
/// each gradient ends as (sum over ranks of the accumulated steps' gradients) / ranks. A
/// step already open keeps the mode it started with.
///
/// Blocking: no. Thread safety: one thread at a time per reducer (`BUSY` otherwise).
/// Errors: `INVALID_HANDLE`, `BUSY`.
#[unsafe(no_mangle)]
pub extern "C" fn ferrocomm_reducer_set_sync(
    reducer: *mut ferrocomm_reducer_t,
    sync: c_int,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_reducer_set_sync";
    boundary(OP, || {
        with_reducer(OP, reducer, |r| {
            r.set_sync(sync != 0);
            Ok(())
        })
    })
}

/// Stores the position of the parameter named `name` (as given to `ferrocomm_reducer_new`)
/// in `*index`.
///
/// Blocking: no. Thread safety: one thread at a time per reducer (`BUSY` otherwise).
/// Errors: `INVALID_HANDLE`, `BUSY`, `INVALID_ARGUMENT` (`name` NULL, not UTF-8 or not
/// registered; `index` NULL).
///
/// # Safety
/// `name` must be NULL or a NUL-terminated string; `index` NULL or valid for writing one
/// `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_reducer_index(
    reducer: *mut ferrocomm_reducer_t,
    name: *const c_char,
    index: *mut usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_reducer_index";
    boundary(OP, || {
        out_ptr(OP, "index", index)?;
        if name.is_null() {
            return Err(Fail::invalid(OP, "name", "NULL"));
        }
        // SAFETY: a NUL-terminated string by the caller's contract.
        let name = unsafe { CStr::from_ptr(name) }
            .to_str()
            .map_err(|_| Fail::invalid(OP, "name", "not valid UTF-8"))?;
        with_reducer(OP, reducer, |r| {
            let i = r.index_of(name).ok_or_else(|| {
                Fail::invalid(OP, "name", format!("no parameter {name:?} is registered"))
            })?;
            // SAFETY: checked non-null; valid for writes by the caller's contract.
            unsafe { put(index, i) };
            Ok(())
        })
    })
}

/// Releases a reducer handle. Bucket all_reduces still in flight (a step marked but not
/// finished) are completed first, since the other ranks take part in them; a reducer
/// freed in the middle of a step therefore waits for the other ranks' matching buckets (up
/// to `FERROCOMM_OP_TIMEOUT`). The communicator it was made on is not affected.
///
/// Ownership: consumes the handle; it is invalid afterwards, and freeing it again returns
/// `FERROCOMM_ERR_INVALID_HANDLE` (never a crash). Thread safety: any thread; if another
/// thread is inside a call on the reducer, the reducer is released when that call returns.
///
/// Errors: `INVALID_HANDLE`.
#[unsafe(no_mangle)]
pub extern "C" fn ferrocomm_reducer_free(reducer: *mut ferrocomm_reducer_t) -> ferrocomm_result {
    boundary("ferrocomm_reducer_free", || {
        drop(handle::remove(reducer.addr(), Kind::Reducer)?);
        Ok(())
    })
}

/// Copies rank 0's parameter values to every rank, so that replicas start equal however
/// each initialised them (what DDP does when it wraps a model). Parameter `i` is `bufs[i]`
/// with `counts[i]` elements of `dtypes[i]` (`FERROCOMM_F32`, `FERROCOMM_F16` or
/// `FERROCOMM_BF16`); the buffers are overwritten with rank 0's values (rank 0's are read).
/// The parameters of each element type are packed and broadcast in one call (three calls
/// in all, empty ones included).
///
/// Collective: every rank passes its parameters in the same order with the same counts and
/// types; sizes that differ between ranks fail with `COLLECTIVE_MISMATCH`.
///
/// Blocking: returns when every buffer holds rank 0's values; fails after
/// `FERROCOMM_OP_TIMEOUT`. Thread safety: one thread per communicator (`BUSY` otherwise).
///
/// Errors: `INVALID_HANDLE`, `BUSY`, `INVALID_ARGUMENT` (`bufs`, `counts` or `dtypes` NULL
/// with `n` > 0; a NULL or misaligned buffer with a count > 0; buffers that overlap; a data
/// type other than f32, f16 and bf16), and the communication errors (`TIMEOUT`,
/// `PEER_LOST`, `COLLECTIVE_MISMATCH`, `ABORTED`, `IO`), after which the buffers' contents
/// are unspecified.
///
/// # Safety
/// `bufs`, `counts` and `dtypes` must point to `n` entries each (NULL when `n` is 0); each
/// `bufs[i]` to `counts[i]` readable and writable elements of `dtypes[i]`, untouched by other
/// threads during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ferrocomm_broadcast_parameters(
    comm: *mut ferrocomm_comm_t,
    bufs: *const *mut c_void,
    counts: *const usize,
    dtypes: *const ferrocomm_dtype,
    n: usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_broadcast_parameters";
    boundary(OP, || {
        // SAFETY: `n` entries each (or NULL), by the caller's contract.
        let (ps, cs, ds) = unsafe {
            (
                array(OP, "bufs", bufs, n)?,
                array(OP, "counts", counts, n)?,
                array(OP, "dtypes", dtypes, n)?,
            )
        };
        let mut regions = Vec::with_capacity(n);
        for i in 0..n {
            let dt = grad_dtype(OP, &format!("dtypes[{i}]"), ds[i])?;
            let arg = format!("bufs[{i}]");
            // Checks NULL, alignment and size; the slice itself is made below, once the
            // buffers are known not to overlap.
            // SAFETY: `counts[i]` readable elements, by the caller's contract.
            let len = unsafe { in_bytes(OP, &arg, ps[i], cs[i], dt)? }.len();
            regions.push((i, ps[i].addr(), len, dt));
        }
        let mut sorted: Vec<_> = regions.iter().filter(|r| r.2 > 0).collect();
        sorted.sort_by_key(|r| r.1);
        for w in sorted.windows(2) {
            if w[0].1 + w[0].2 > w[1].1 {
                return Err(Fail::invalid(
                    OP,
                    "bufs",
                    format!("bufs[{}] and bufs[{}] overlap", w[0].0, w[1].0),
                ));
            }
        }
        let mut params = Vec::with_capacity(n);
        for &(i, _, _, dt) in &regions {
            let arg = format!("bufs[{i}]");
            // SAFETY: `counts[i]` writable elements of `dt` by the caller's contract, checked
            // for NULL and alignment, and not overlapping any other buffer (checked above).
            let bytes = unsafe { out_bytes(OP, &arg, ps[i], cs[i], dt)? };
            let cast = |e: bytemuck::PodCastError| Fail::invalid(OP, &arg, e.to_string());
            params.push(match dt {
                DType::F32 => ParamMut::F32(bytemuck::try_cast_slice_mut(bytes).map_err(cast)?),
                DType::F16 => ParamMut::F16(bytemuck::try_cast_slice_mut(bytes).map_err(cast)?),
                _ => ParamMut::BF16(bytemuck::try_cast_slice_mut(bytes).map_err(cast)?),
            });
        }
        with_comm(OP, comm, |c| Ok(broadcast_parameters(c, params)?))
    })
}

/// Number of live reducer handles (for tests).
#[cfg(test)]
pub(crate) fn live() -> usize {
    handle::live(Kind::Reducer)
}
