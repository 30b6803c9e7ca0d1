//! Tests of the data-parallel functions (`ferrocomm_reducer_*`,
//! `ferrocomm_broadcast_parameters`), called the way C calls them, with 3 ranks (threads
//! that each join a TCP world on loopback): averaged gradients over several buckets and
//! element types, gradient accumulation, unused parameters, and the errors (marked twice,
//! never marked, parameter lists that differ between ranks, bad arguments and handles).

use std::ffi::{CString, c_char, c_void};
use std::ptr::{null, null_mut};

use half::f16;

use crate::error::ferrocomm_result::*;
use crate::tests::{fails, ok, serial, world};
use crate::types::ferrocomm_dtype_code::*;
use crate::*;

/// One parameter as C declares it.
struct P {
    name: &'static str,
    dtype: ferrocomm_dtype_code,
    shape: Vec<usize>,
}

fn p(name: &'static str, dtype: ferrocomm_dtype_code, shape: &[usize]) -> P {
    P {
        name,
        dtype,
        shape: shape.to_vec(),
    }
}

/// `ferrocomm_reducer_new` with shapes; returns the result and the handle.
fn new_reducer(
    comm: *mut ferrocomm_comm_t,
    ps: &[P],
    cap_mb: f64,
    first_mb: f64,
    find_unused: bool,
) -> (ferrocomm_result, *mut ferrocomm_reducer_t) {
    let names: Vec<CString> = ps.iter().map(|p| CString::new(p.name).unwrap()).collect();
    let name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let dtypes: Vec<u32> = ps.iter().map(|p| p.dtype as u32).collect();
    let numels: Vec<usize> = ps.iter().map(|p| p.shape.iter().product()).collect();
    let shapes: Vec<*const usize> = ps.iter().map(|p| p.shape.as_ptr()).collect();
    let ndims: Vec<usize> = ps.iter().map(|p| p.shape.len()).collect();
    let mut r = null_mut();
    // SAFETY: every array holds `ps.len()` entries, each shape `ndims[i]`.
    let rc = unsafe {
        ferrocomm_reducer_new(
            comm,
            ps.len(),
            name_ptrs.as_ptr(),
            dtypes.as_ptr(),
            numels.as_ptr(),
            shapes.as_ptr(),
            ndims.as_ptr(),
            cap_mb,
            first_mb,
            find_unused.into(),
            &mut r,
        )
    };
    (rc, r)
}

fn mark<T>(r: *mut ferrocomm_reducer_t, i: usize, g: &[T]) -> ferrocomm_result {
    // SAFETY: `g` holds `g.len()` elements.
    unsafe { ferrocomm_reducer_mark_ready(r, i, g.as_ptr().cast(), g.len()) }
}

fn grad<T: Default + Clone>(r: *mut ferrocomm_reducer_t, i: usize, n: usize) -> Vec<T> {
    let mut out = vec![T::default(); n];
    // SAFETY: `out` holds `n` elements.
    ok(unsafe { ferrocomm_reducer_grad(r, i, out.as_mut_ptr().cast(), n) });
    out
}

/// Rank `r`'s gradient of a parameter with `n` elements, step `s` (small integers: exact
/// in f16 and in every sum and average below).
fn g(r: usize, s: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((r + 1) * (s + 1) + i % 4) as f32).collect()
}

/// The average of `g` over 3 ranks.
fn avg(s: usize, n: usize) -> Vec<f32> {
    let all: Vec<Vec<f32>> = (0..3).map(|r| g(r, s, n)).collect();
    (0..n)
        .map(|i| all.iter().map(|v| v[i]).sum::<f32>() / 3.0)
        .collect()
}

fn to_f16(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

#[test]
fn reducer_averages_gradients_over_buckets_and_accumulates() {
    let _g = serial();
    world(3, |me, comm| {
        // Two "layers" of f32 and an f16 bias; caps of 0.25 MiB make several buckets (the
        // 100000-float weight is a bucket of its own).
        let ps = [
            p("fc1.weight", FERROCOMM_F32, &[100, 1000]),
            p("fc1.bias", FERROCOMM_F16, &[100]),
            p("fc2.weight", FERROCOMM_F32, &[10, 100]),
            p("fc2.bias", FERROCOMM_F32, &[10]),
        ];
        let (rc, r) = new_reducer(comm, &ps, 0.25, 0.01, false);
        ok(rc);
        let n: Vec<usize> = ps.iter().map(|p| p.shape.iter().product()).collect();
        let mut idx = usize::MAX;
        // SAFETY: a NUL-terminated name and a valid out-pointer.
        ok(unsafe { ferrocomm_reducer_index(r, c"fc2.weight".as_ptr(), &mut idx) });
        assert_eq!(idx, 2);
        // SAFETY: as above.
        let rc = unsafe { ferrocomm_reducer_index(r, c"fc3.weight".as_ptr(), &mut idx) };
        fails(
            rc,
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "no parameter \"fc3.weight\"",
        );

        // Step 0, synchronised, backward order (last layer first).
        for i in (0..4).rev() {
            let gi = g(me, 0, n[i]);
            if i == 1 {
                ok(mark(r, i, &to_f16(&gi)));
            } else {
                ok(mark(r, i, &gi));
            }
        }
        ok(ferrocomm_reducer_finish(r));
        for i in [0, 2, 3] {
            assert_eq!(grad::<f32>(r, i, n[i]), avg(0, n[i]), "parameter {i}");
        }
        assert_eq!(grad::<f16>(r, 1, n[1]), to_f16(&avg(0, n[1])));

        // Steps 1 (unsynchronised) and 2: each gradient is the average over ranks of the sum
        // of both steps.
        ok(ferrocomm_reducer_set_sync(r, 0));
        for (i, &ni) in n.iter().enumerate() {
            let gi = g(me, 1, ni);
            if i == 1 {
                ok(mark(r, i, &to_f16(&gi)));
            } else {
                ok(mark(r, i, &gi));
            }
        }
        ok(ferrocomm_reducer_finish(r));
        // After an unsynchronised step: this rank's own sum so far.
        assert_eq!(grad::<f32>(r, 3, n[3]), g(me, 1, n[3]));
        ok(ferrocomm_reducer_set_sync(r, 1));
        for i in (0..4).rev() {
            let gi = g(me, 2, n[i]);
            if i == 1 {
                ok(mark(r, i, &to_f16(&gi)));
            } else {
                ok(mark(r, i, &gi));
            }
        }
        ok(ferrocomm_reducer_finish(r));
        for (i, &ni) in n.iter().enumerate() {
            let want: Vec<f32> = avg(1, ni)
                .iter()
                .zip(avg(2, ni))
                .map(|(a, b)| a + b)
                .collect();
            if i == 1 {
                assert_eq!(grad::<f16>(r, i, ni), to_f16(&want));
            } else {
                assert_eq!(grad::<f32>(r, i, ni), want, "parameter {i}");
            }
        }
        ok(ferrocomm_reducer_free(r));
        fails(
            ferrocomm_reducer_free(r),
            FERROCOMM_ERR_INVALID_HANDLE,
            "not a live reducer handle",
        );
    });
    assert_eq!(crate::reducer::live(), 0);
}

#[test]
fn reducer_errors_name_the_parameter() {
    let _g = serial();
    world(3, |me, comm| {
        let ps = [
            p("embed", FERROCOMM_F32, &[4, 3]),
            p("head", FERROCOMM_F32, &[5]),
        ];
        let (rc, r) = new_reducer(comm, &ps, 0.0, 0.0, false);
        ok(rc);
        let (a, b) = (vec![me as f32; 12], vec![1.0f32; 5]);
        ok(mark(r, 1, &b));
        fails(
            mark(r, 1, &b),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "parameter \"head\" (#1) was already marked ready",
        );
        // Reading a gradient while the step is open, or finishing it with "embed" unmarked.
        let mut out = vec![0.0f32; 5];
        // SAFETY: `out` holds 5 floats.
        let rc = unsafe { ferrocomm_reducer_grad(r, 1, out.as_mut_ptr().cast(), 5) };
        fails(rc, FERROCOMM_ERR_INVALID_ARGUMENT, "a step is open");
        fails(
            ferrocomm_reducer_finish(r),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "1 of 2 parameters were never marked ready in this step: \"embed\"",
        );
        // Wrong sizes, indices, pointers: refused, naming the parameter.
        fails(
            mark(r, 0, &a[..11]),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "parameter \"embed\" of shape [4, 3] has 12 elements, the gradient 11",
        );
        fails(
            mark(r, 2, &a),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "2 is out of range: 2 parameters are registered",
        );
        // SAFETY: NULL is refused before use.
        let rc = unsafe { ferrocomm_reducer_mark_ready(r, 0, null(), 12) };
        fails(
            rc,
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "grad (parameter \"embed\")",
        );
        let odd = a.as_ptr().cast::<u8>().wrapping_add(1).cast::<c_void>();
        // SAFETY: misaligned, refused before use.
        let rc = unsafe { ferrocomm_reducer_mark_ready(r, 0, odd, 11) };
        fails(rc, FERROCOMM_ERR_INVALID_ARGUMENT, "not aligned");
        // The step is still open and goes on: mark the missing one, finish.
        ok(mark(r, 0, &a));
        ok(ferrocomm_reducer_finish(r));
        assert_eq!(grad::<f32>(r, 0, 12), vec![1.0; 12]); // (0 + 1 + 2) / 3
        let mut out = vec![0.0f32; 4];
        // SAFETY: `out` holds 4 floats.
        let rc = unsafe { ferrocomm_reducer_grad(r, 1, out.as_mut_ptr().cast(), 4) };
        fails(
            rc,
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "parameter \"head\" of shape [5] has 5 elements, count is 4",
        );
        // Handles of the wrong kind.
        let as_comm: *mut ferrocomm_comm_t = r.cast();
        fails(
            ferrocomm_barrier(as_comm),
            FERROCOMM_ERR_INVALID_HANDLE,
            "is a reducer handle where a communicator handle is expected",
        );
        fails(
            ferrocomm_reducer_finish(comm.cast()),
            FERROCOMM_ERR_INVALID_HANDLE,
            "is a communicator handle where a reducer handle is expected",
        );
        ok(ferrocomm_reducer_free(r));

        // find_unused: a parameter never marked counts as zero.
        let (rc, r) = new_reducer(comm, &ps, 0.0, 0.0, true);
        ok(rc);
        ok(mark(r, 1, &[(me * 3) as f32; 5]));
        ok(ferrocomm_reducer_finish(r));
        assert_eq!(grad::<f32>(r, 0, 12), vec![0.0; 12]);
        assert_eq!(grad::<f32>(r, 1, 5), vec![3.0; 5]); // (0 + 3 + 6) / 3
        ok(ferrocomm_reducer_free(r));

        // Bad arguments of ferrocomm_reducer_new (local; every rank passes the same).
        let (rc, r) = new_reducer(comm, &[p("x", FERROCOMM_F64, &[2])], 0.0, 0.0, false);
        fails(rc, FERROCOMM_ERR_INVALID_ARGUMENT, "parameter \"x\"");
        assert!(r.is_null());
        let (rc, _) = new_reducer(comm, &ps, -1.0, 0.0, false);
        fails(rc, FERROCOMM_ERR_INVALID_ARGUMENT, "bucket_cap_mb");
        let dup = [p("w", FERROCOMM_F32, &[2]), p("w", FERROCOMM_F32, &[2])];
        let (rc, _) = new_reducer(comm, &dup, 0.0, 0.0, false);
        fails(
            rc,
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "\"w\" is registered twice",
        );
        let numel = [3usize];
        let shape = [2usize, 2];
        let (nd, sp, name, dt) = (2usize, shape.as_ptr(), c"w".as_ptr(), FERROCOMM_F32 as u32);
        let mut r = null_mut();
        // SAFETY: one entry in each array; a shape of 2 dimensions.
        let rc = unsafe {
            ferrocomm_reducer_new(
                comm,
                1,
                &name,
                &dt,
                numel.as_ptr(),
                &sp,
                &nd,
                0.0,
                0.0,
                0,
                &mut r,
            )
        };
        fails(
            rc,
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "has shape [2, 2] but numels[0] = 3",
        );
        // SAFETY: NULL arrays with n > 0 are refused before use.
        let rc = unsafe {
            ferrocomm_reducer_new(
                comm,
                1,
                null(),
                &dt,
                numel.as_ptr(),
                null(),
                null(),
                0.0,
                0.0,
                0,
                &mut r,
            )
        };
        fails(rc, FERROCOMM_ERR_INVALID_ARGUMENT, "names");
        // The communicator is still fine after all that.
        ok(ferrocomm_barrier(comm));
    });
    assert_eq!(crate::reducer::live(), 0);
}

#[test]
fn mismatched_parameter_lists_fail_on_every_rank() {
    let _g = serial();
    world(3, |me, comm| {
        // Rank 2 has another shape for parameter #1.
        let shape = if me == 2 { [8, 3] } else { [8, 4] };
        let ps = [
            p("conv.weight", FERROCOMM_F32, &[16]),
            p("fc.weight", FERROCOMM_F32, &shape),
        ];
        let (rc, r) = new_reducer(comm, &ps, 0.0, 0.0, false);
        fails(
            rc,
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "parameter #1 is \"fc.weight\" [8, 4] f32 on rank 0 but \"fc.weight\" [8, 3] f32 \
             on rank 2",
        );
        assert!(r.is_null());
        // Rank 1 misses a parameter.
        let n = if me == 1 { 1 } else { 2 };
        let (rc, _) = new_reducer(comm, &ps[..n], 0.0, 0.0, false);
        fails(
            rc,
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "the first missing on rank 1 is #1",
        );
        // A local error on one rank (an f64 gradient) fails every rank instead of leaving
        // the others waiting.
        let ps = [p(
            "w",
            if me == 0 {
                FERROCOMM_F64
            } else {
                FERROCOMM_F32
            },
            &[4],
        )];
        let (rc, _) = new_reducer(comm, &ps, 0.0, 0.0, false);
        if me == 0 {
            fails(rc, FERROCOMM_ERR_INVALID_ARGUMENT, "not a gradient type");
        } else {
            fails(
                rc,
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "invalid arguments to ferrocomm_reducer_new on rank 0",
            );
        }
        // Different bucket caps are a difference too.
        let ps = [p("w", FERROCOMM_F32, &[4])];
        let (rc, _) = new_reducer(comm, &ps, if me == 1 { 5.0 } else { 0.0 }, 0.0, false);
        fails(rc, FERROCOMM_ERR_INVALID_ARGUMENT, "bucket caps");
        ok(ferrocomm_barrier(comm));
    });
    assert_eq!(crate::reducer::live(), 0);
}

#[test]
fn broadcast_parameters_copies_rank_zero() {
    let _g = serial();
    world(3, |me, comm| {
        let mut w = vec![me as f32 + 1.0; 1000];
        let mut b = to_f16(&[me as f32; 7]);
        let mut h = vec![half::bf16::from_f32(me as f32 * 2.0); 3];
        let bufs: [*mut c_void; 3] = [
            w.as_mut_ptr().cast(),
            b.as_mut_ptr().cast(),
            h.as_mut_ptr().cast(),
        ];
        let counts = [1000usize, 7, 3];
        let dtypes = [
            FERROCOMM_F32 as u32,
            FERROCOMM_F16 as u32,
            FERROCOMM_BF16 as u32,
        ];
        // SAFETY: three buffers of the given counts and types.
        ok(unsafe {
            ferrocomm_broadcast_parameters(comm, bufs.as_ptr(), counts.as_ptr(), dtypes.as_ptr(), 3)
        });
        assert_eq!(w, vec![1.0; 1000]);
        assert_eq!(b, to_f16(&[0.0; 7]));
        assert_eq!(h, vec![half::bf16::ZERO; 3]);
        // Overlapping buffers and non-gradient types are refused before anything is sent.
        let two: [*mut c_void; 2] = [w.as_mut_ptr().cast(), w[10..].as_mut_ptr().cast()];
        // SAFETY: refused before the buffers are used.
        let rc = unsafe {
            ferrocomm_broadcast_parameters(
                comm,
                two.as_ptr(),
                [20usize, 5].as_ptr(),
                [FERROCOMM_F32 as u32; 2].as_ptr(),
                2,
            )
        };
        fails(
            rc,
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "bufs[0] and bufs[1] overlap",
        );
        // SAFETY: as above.
        let rc = unsafe {
            ferrocomm_broadcast_parameters(
                comm,
                two.as_ptr(),
                [1usize, 1].as_ptr(),
                [FERROCOMM_F32 as u32, FERROCOMM_I64 as u32].as_ptr(),
                2,
            )
        };
        fails(rc, FERROCOMM_ERR_INVALID_ARGUMENT, "dtypes[1]");
        // SAFETY: n = 0 needs no arrays; the NULL handle is refused.
        let rc = unsafe { ferrocomm_broadcast_parameters(null_mut(), null(), null(), null(), 0) };
        fails(rc, FERROCOMM_ERR_INVALID_HANDLE, "NULL");
    });
}
