//! Tests of the collective functions, called the way C calls them, with 3 ranks (threads that
//! each join a TCP world on loopback): every collective in and out of place, blocking and
//! non-blocking, every data type for all_reduce, split and groups, the bucketed
//! all_reduce of many buffers, and the argument errors.

use std::ffi::{c_int, c_void};
use std::ptr::{null, null_mut};

use crate::error::ferrocomm_result::*;
use crate::tests::{fails, ok, serial, world};
use crate::types::ferrocomm_dtype;
use crate::types::ferrocomm_dtype_code::*;
use crate::types::ferrocomm_op_code::*;
use crate::*;

const IP: *mut c_void = std::ptr::without_provenance_mut(1);

/// A C element type built from a small number (exact in every type).
trait Val: bytemuck::Pod + PartialEq + std::fmt::Debug {
    const CODE: ferrocomm_dtype;
    fn of(x: u8) -> Self;
}

macro_rules! val {
    ($($t:ty => $code:ident, |$x:ident| $e:expr;)*) => {$(
        impl Val for $t {
            const CODE: ferrocomm_dtype = $code as u32;
            fn of($x: u8) -> Self { $e }
        }
    )*};
}

val! {
    u8 => FERROCOMM_U8, |x| x;
    i8 => FERROCOMM_I8, |x| x as i8;
    u16 => FERROCOMM_U16, |x| x.into();
    i16 => FERROCOMM_I16, |x| x.into();
    u32 => FERROCOMM_U32, |x| x.into();
    i32 => FERROCOMM_I32, |x| x.into();
    u64 => FERROCOMM_U64, |x| x.into();
    i64 => FERROCOMM_I64, |x| x.into();
    half::f16 => FERROCOMM_F16, |x| half::f16::from_f32(x.into());
    half::bf16 => FERROCOMM_BF16, |x| half::bf16::from_f32(x.into());
    f32 => FERROCOMM_F32, |x| x.into();
    f64 => FERROCOMM_F64, |x| x.into();
}

/// Rank `r`'s contribution at element `i`.
fn contrib(r: usize, i: usize) -> u8 {
    (r + 1 + i % 5) as u8
}

/// all_reduce with sum of `T` in the three in-place spellings and out of place, blocking and
/// not; 3 ranks, so element `i` sums to `6 + 3 * (i % 5)`.
fn allreduce_sum_all_ways<T: Val>(me: usize, comm: *mut ferrocomm_comm_t) {
    let n = 37;
    let dt = T::CODE;
    let mine: Vec<T> = (0..n).map(|i| T::of(contrib(me, i))).collect();
    let want: Vec<T> = (0..n).map(|i| T::of((6 + 3 * (i % 5)) as u8)).collect();
    let op = FERROCOMM_SUM as u32;
    // SAFETY: every buffer holds `n` elements of T and outlives its call or request.
    unsafe {
        let mut out = vec![T::of(0); n];
        ok(ferrocomm_allreduce(
            comm,
            mine.as_ptr().cast(),
            out.as_mut_ptr().cast(),
            n,
            dt,
            op,
        ));
        assert_eq!(out, want, "out of place, {:?}", T::CODE);
        let mut b = mine.clone();
        ok(ferrocomm_allreduce(
            comm,
            IP,
            b.as_mut_ptr().cast(),
            n,
            dt,
            op,
        ));
        assert_eq!(b, want, "FERROCOMM_IN_PLACE, {:?}", T::CODE);
        let mut b = mine.clone();
        let p = b.as_mut_ptr().cast::<c_void>();
        ok(ferrocomm_allreduce(comm, p, p, n, dt, op));
        assert_eq!(b, want, "sendbuf == recvbuf, {:?}", T::CODE);
        // Non-blocking: the send buffer may change at once; the result lands at wait.
        let mut send = mine.clone();
        let mut out = vec![T::of(0); n];
        let mut req = null_mut();
        ok(ferrocomm_iallreduce(
            comm,
            send.as_ptr().cast(),
            out.as_mut_ptr().cast(),
            n,
            dt,
            op,
            &mut req,
        ));
        send.fill(T::of(99));
        let mut st = ferrocomm_status_t::failed(FERROCOMM_ERR_IO);
        ok(ferrocomm_wait(req, &mut st));
        assert_eq!(out, want, "iallreduce, {:?}", T::CODE);
        let esize = std::mem::size_of::<T>();
        assert_eq!(
            (st.source, st.bytes, st.tag, st.error),
            (usize::MAX, n * esize, 0, 0)
        );
    }
}

#[test]
fn allreduce_every_dtype_every_way() {
    let _g = serial();
    world(3, |me, comm| {
        allreduce_sum_all_ways::<u8>(me, comm);
        allreduce_sum_all_ways::<i8>(me, comm);
        allreduce_sum_all_ways::<u16>(me, comm);
        allreduce_sum_all_ways::<i16>(me, comm);
        allreduce_sum_all_ways::<u32>(me, comm);
        allreduce_sum_all_ways::<i32>(me, comm);
        allreduce_sum_all_ways::<u64>(me, comm);
        allreduce_sum_all_ways::<i64>(me, comm);
        allreduce_sum_all_ways::<half::f16>(me, comm);
        allreduce_sum_all_ways::<half::bf16>(me, comm);
        allreduce_sum_all_ways::<f32>(me, comm);
        allreduce_sum_all_ways::<f64>(me, comm);
        // The other operations.
        let x = [me as f64 + 1.0, 10.0 - me as f64];
        let mut out = [0f64; 2];
        for (op, want) in [
            (FERROCOMM_PROD, [6.0, 720.0]),
            (FERROCOMM_MAX, [3.0, 10.0]),
            (FERROCOMM_MIN, [1.0, 8.0]),
            (FERROCOMM_AVG, [2.0, 9.0]),
        ] {
            // SAFETY: two f64 each.
            unsafe {
                ok(ferrocomm_allreduce(
                    comm,
                    x.as_ptr().cast(),
                    out.as_mut_ptr().cast(),
                    2,
                    FERROCOMM_F64 as u32,
                    op as u32,
                ))
            };
            assert_eq!(out, want, "{op:?}");
        }
    });
}

#[test]
fn rooted_and_gathering_collectives_in_and_out_of_place() {
    let _g = serial();
    world(3, |me, comm| {
        let (p, k) = (3usize, 4usize);
        let dt = FERROCOMM_I32 as u32;
        let sum = FERROCOMM_SUM as u32;
        let block = |r: usize| -> Vec<i32> { (0..k).map(|i| (10 * r + i) as i32).collect() };
        let all: Vec<i32> = (0..p).flat_map(block).collect();
        // SAFETY: every buffer has the element count its call documents and outlives it.
        unsafe {
            for root in 0..p {
                // broadcast
                let mut b = if me == root { block(root) } else { vec![0; k] };
                ok(ferrocomm_broadcast(
                    comm,
                    b.as_mut_ptr().cast(),
                    k,
                    dt,
                    root,
                ));
                assert_eq!(b, block(root));
                // reduce, out of place (recvbuf NULL off the root) and in place everywhere
                let mine = block(me);
                let want: Vec<i32> = (0..k).map(|i| (30 + 3 * i) as i32).collect();
                let mut out = vec![0; k];
                let rp = if me == root {
                    out.as_mut_ptr().cast()
                } else {
                    null_mut()
                };
                ok(ferrocomm_reduce(
                    comm,
                    mine.as_ptr().cast(),
                    rp,
                    k,
                    dt,
                    sum,
                    root,
                ));
                if me == root {
                    assert_eq!(out, want);
                }
                let mut b = block(me);
                ok(ferrocomm_reduce(
                    comm,
                    IP,
                    b.as_mut_ptr().cast(),
                    k,
                    dt,
                    sum,
                    root,
                ));
                assert_eq!(b, if me == root { want.clone() } else { block(me) });
                // gather: out of place; in place at the root by pointer and by IN_PLACE
                let mut g = vec![0; if me == root { p * k } else { 0 }];
                ok(ferrocomm_gather(
                    comm,
                    mine.as_ptr().cast(),
                    g.as_mut_ptr().cast(),
                    k,
                    dt,
                    root,
                ));
                if me == root {
                    assert_eq!(g, all);
                }
                let mut g = vec![-1; p * k];
                g[me * k..(me + 1) * k].copy_from_slice(&mine);
                let sp = if me == root {
                    IP.cast_const()
                } else {
                    mine.as_ptr().cast()
                };
                ok(ferrocomm_gather(
                    comm,
                    sp,
                    g.as_mut_ptr().cast(),
                    k,
                    dt,
                    root,
                ));
                if me == root {
                    assert_eq!(g, all);
                }
                // scatter: out of place; in place at the root
                let mut r = vec![0; k];
                let sp = if me == root {
                    all.as_ptr().cast()
                } else {
                    null()
                };
                ok(ferrocomm_scatter(
                    comm,
                    sp,
                    r.as_mut_ptr().cast(),
                    k,
                    dt,
                    root,
                ));
                assert_eq!(r, block(me));
                let mut whole = all.clone();
                let rp = if me == root {
                    IP
                } else {
                    r.as_mut_ptr().cast()
                };
                r.fill(0);
                ok(ferrocomm_scatter(
                    comm,
                    whole.as_mut_ptr().cast(),
                    rp,
                    k,
                    dt,
                    root,
                ));
                if me == root {
                    assert_eq!(whole, all, "the root's buffer is unchanged");
                } else {
                    assert_eq!(r, block(me));
                }
            }
            // all_gather: out of place, IN_PLACE, and sendbuf at this rank's block
            let mine = block(me);
            let mut g = vec![0; p * k];
            ok(ferrocomm_allgather(
                comm,
                mine.as_ptr().cast(),
                g.as_mut_ptr().cast(),
                k,
                dt,
            ));
            assert_eq!(g, all);
            let mut g = vec![0; p * k];
            g[me * k..(me + 1) * k].copy_from_slice(&mine);
            ok(ferrocomm_allgather(comm, IP, g.as_mut_ptr().cast(), k, dt));
            assert_eq!(g, all);
            let mut g = vec![0; p * k];
            g[me * k..(me + 1) * k].copy_from_slice(&mine);
            let at = g.as_ptr().add(me * k).cast::<c_void>();
            ok(ferrocomm_allgather(comm, at, g.as_mut_ptr().cast(), k, dt));
            assert_eq!(g, all);
            // reduce_scatter: every rank sends `all`, so block r sums to 3 * block(r)
            let want = |r: usize| -> Vec<i32> { block(r).iter().map(|x| 3 * x).collect() };
            let mut out = vec![0; k];
            ok(ferrocomm_reduce_scatter(
                comm,
                all.as_ptr().cast(),
                out.as_mut_ptr().cast(),
                k,
                dt,
                sum,
            ));
            assert_eq!(out, want(me));
            let mut whole = all.clone();
            ok(ferrocomm_reduce_scatter(
                comm,
                IP,
                whole.as_mut_ptr().cast(),
                k,
                dt,
                sum,
            ));
            assert_eq!(whole[me * k..(me + 1) * k], want(me));
            let mut whole = all.clone();
            let at = whole.as_mut_ptr().add(me * k).cast::<c_void>();
            ok(ferrocomm_reduce_scatter(
                comm,
                whole.as_ptr().cast(),
                at,
                k,
                dt,
                sum,
            ));
            assert_eq!(whole[me * k..(me + 1) * k], want(me));
            // all_to_all: block j of rank r is 100 * r + j; rank me receives 100 * j + me
            let send: Vec<i32> = (0..p * k).map(|i| (100 * me + i / k) as i32).collect();
            let want: Vec<i32> = (0..p * k).map(|i| (100 * (i / k) + me) as i32).collect();
            let mut out = vec![0; p * k];
            ok(ferrocomm_alltoall(
                comm,
                send.as_ptr().cast(),
                out.as_mut_ptr().cast(),
                k,
                dt,
            ));
            assert_eq!(out, want);
            let mut b = send.clone();
            ok(ferrocomm_alltoall(comm, IP, b.as_mut_ptr().cast(), k, dt));
            assert_eq!(b, want);
            ok(ferrocomm_barrier(comm));
        }
    });
}

#[test]
fn nonblocking_collectives_with_wait_test_and_waitall() {
    let _g = serial();
    world(3, |me, comm| {
        let (p, k, root) = (3usize, 3usize, 1usize);
        let dt = FERROCOMM_F32 as u32;
        let block = |r: usize| -> Vec<f32> { (0..k).map(|i| (10 * r + i) as f32).collect() };
        let all: Vec<f32> = (0..p).flat_map(block).collect();
        let mine = block(me);
        let mut bc = if me == root {
            block(root)
        } else {
            vec![0.0; k]
        };
        let mut red = vec![0f32; k];
        let mut ag = vec![0f32; p * k];
        let mut rs = vec![0f32; k];
        let mut ga = vec![0f32; p * k];
        let mut sc = vec![0f32; k];
        let send_a2a: Vec<f32> = (0..p * k).map(|i| (100 * me + i / k) as f32).collect();
        let mut a2a = vec![0f32; p * k];
        let mut ar = mine.clone();
        let mut reqs = [null_mut(); 9];
        // SAFETY: every buffer has the count its call documents and outlives its request
        // (all are waited for below).
        unsafe {
            ok(ferrocomm_iallreduce(
                comm,
                IP,
                ar.as_mut_ptr().cast(),
                k,
                dt,
                FERROCOMM_MAX as u32,
                &mut reqs[0],
            ));
            ok(ferrocomm_ibroadcast(
                comm,
                bc.as_mut_ptr().cast(),
                k,
                dt,
                root,
                &mut reqs[1],
            ));
            ok(ferrocomm_ireduce(
                comm,
                mine.as_ptr().cast(),
                red.as_mut_ptr().cast(),
                k,
                dt,
                FERROCOMM_SUM as u32,
                root,
                &mut reqs[2],
            ));
            ok(ferrocomm_iallgather(
                comm,
                mine.as_ptr().cast(),
                ag.as_mut_ptr().cast(),
                k,
                dt,
                &mut reqs[3],
            ));
            ok(ferrocomm_ireduce_scatter(
                comm,
                all.as_ptr().cast(),
                rs.as_mut_ptr().cast(),
                k,
                dt,
                FERROCOMM_AVG as u32,
                &mut reqs[4],
            ));
            ok(ferrocomm_igather(
                comm,
                mine.as_ptr().cast(),
                ga.as_mut_ptr().cast(),
                k,
                dt,
                root,
                &mut reqs[5],
            ));
            ok(ferrocomm_iscatter(
                comm,
                all.as_ptr().cast(),
                sc.as_mut_ptr().cast(),
                k,
                dt,
                root,
                &mut reqs[6],
            ));
            ok(ferrocomm_ialltoall(
                comm,
                send_a2a.as_ptr().cast(),
                a2a.as_mut_ptr().cast(),
                k,
                dt,
                &mut reqs[7],
            ));
            ok(ferrocomm_ibarrier(comm, &mut reqs[8]));
            // Point-to-point and blocking collectives may run meanwhile.
            ok(ferrocomm_barrier(comm));
            // test one until it reports completion (bounded by the op timeout), then the rest
            let mut done: c_int = 0;
            let mut st = ferrocomm_status_t::failed(FERROCOMM_ERR_IO);
            let t0 = std::time::Instant::now();
            while done == 0 {
                ok(ferrocomm_test(reqs[0], &mut done, &mut st));
                assert!(
                    t0.elapsed() < std::time::Duration::from_secs(60),
                    "never completed"
                );
                std::thread::yield_now();
            }
            assert_eq!(st.bytes, k * 4);
            let mut sts = [ferrocomm_status_t::failed(FERROCOMM_ERR_IO); 8];
            ok(ferrocomm_waitall(8, reqs[1..].as_ptr(), sts.as_mut_ptr()));
            assert!(sts.iter().all(|s| s.error == 0), "{sts:?}");
        }
        assert_eq!(ar, block(2), "max over ranks is rank 2's block");
        assert_eq!(bc, block(root));
        if me == root {
            assert_eq!(red, (0..k).map(|i| (30 + 3 * i) as f32).collect::<Vec<_>>());
            assert_eq!(ga, all);
        } else {
            assert_eq!(red, [0.0; 3], "not written off the root");
            assert_eq!(ga, [0.0; 9], "not written off the root");
        }
        assert_eq!(ag, all);
        assert_eq!(rs, block(me), "avg of three equal blocks");
        assert_eq!(sc, block(me));
        assert_eq!(
            a2a,
            (0..p * k)
                .map(|i| (100 * (i / k) + me) as f32)
                .collect::<Vec<_>>()
        );
        // A freed collective request still runs (the others expect it) but writes nothing.
        let mut untouched = vec![-7f32; k];
        let mut req = null_mut();
        // SAFETY: `mine` and `untouched` hold k f32 and outlive the calls.
        unsafe {
            ok(ferrocomm_iallreduce(
                comm,
                mine.as_ptr().cast(),
                untouched.as_mut_ptr().cast(),
                k,
                dt,
                FERROCOMM_SUM as u32,
                &mut req,
            ));
            ok(ferrocomm_request_free(req));
            fails(
                ferrocomm_wait(req, null_mut()),
                FERROCOMM_ERR_INVALID_HANDLE,
                "already freed",
            );
            // The next one on the same sequence completes after it.
            let mut b = mine.clone();
            ok(ferrocomm_iallreduce(
                comm,
                IP,
                b.as_mut_ptr().cast(),
                k,
                dt,
                FERROCOMM_MIN as u32,
                &mut req,
            ));
            ok(ferrocomm_wait(req, null_mut()));
            assert_eq!(b, block(0));
        }
        assert_eq!(untouched, [-7.0; 3]);
    });
}

#[test]
fn split_and_groups_make_working_communicators() {
    let _g = serial();
    world(3, |me, comm| {
        // SAFETY: valid out-pointers and buffers.
        unsafe {
            // Ranks 0 and 2 (color 0), numbered by descending key; rank 1 opts out.
            let color = if me == 1 { FERROCOMM_UNDEFINED } else { 0 };
            let mut sub = std::ptr::without_provenance_mut(1);
            ok(ferrocomm_comm_split(comm, color, -(me as i64), &mut sub));
            if me == 1 {
                assert!(sub.is_null());
            } else {
                let (mut r, mut s) = (9, 9);
                ok(ferrocomm_comm_rank(sub, &mut r));
                ok(ferrocomm_comm_size(sub, &mut s));
                assert_eq!((r, s), (if me == 2 { 0 } else { 1 }, 2));
                let mut x = [me as u64];
                ok(ferrocomm_allreduce(
                    sub,
                    IP,
                    x.as_mut_ptr().cast(),
                    1,
                    FERROCOMM_U64 as u32,
                    FERROCOMM_SUM as u32,
                ));
                assert_eq!(x, [2]);
                ok(ferrocomm_comm_free(sub));
            }
            let mut sub = null_mut();
            fails(
                ferrocomm_comm_split(comm, -2, 0, &mut sub),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "FERROCOMM_UNDEFINED",
            );
            fails(
                ferrocomm_comm_split(comm, 1 << 33, 0, &mut sub),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "4294967295",
            );
            // A group of ranks 2 and 1 (in that order); rank 0 is not a member.
            if me != 0 {
                let list = [2usize, 1];
                let mut g = null_mut();
                ok(ferrocomm_comm_create_group(comm, list.as_ptr(), 2, &mut g));
                let mut r = 9;
                ok(ferrocomm_comm_rank(g, &mut r));
                assert_eq!(r, 2 - me);
                let mut v = [0i32; 2];
                let mine = [me as i32; 1];
                ok(ferrocomm_allgather(
                    g,
                    mine.as_ptr().cast(),
                    v.as_mut_ptr().cast(),
                    1,
                    FERROCOMM_I32 as u32,
                ));
                assert_eq!(v, [2, 1]);
                ok(ferrocomm_comm_free(g));
            } else {
                let list = [2usize, 1];
                let mut g = null_mut();
                fails(
                    ferrocomm_comm_create_group(comm, list.as_ptr(), 2, &mut g),
                    FERROCOMM_ERR_INVALID_ARGUMENT,
                    "not in the list",
                );
                fails(
                    ferrocomm_comm_create_group(comm, null(), 2, &mut g),
                    FERROCOMM_ERR_INVALID_ARGUMENT,
                    "NULL with n = 2",
                );
                assert!(g.is_null());
            }
            ok(ferrocomm_barrier(comm));
        }
    });
}

#[test]
fn allreduce_many_packs_buckets_and_averages() {
    let _g = serial();
    world(3, |me, comm| {
        // 7 buffers of mixed sizes (one empty, one larger than the bucket cap of 64 bytes).
        let sizes = [3usize, 5, 0, 40, 2, 1, 9];
        let mut bufs: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(b, &n)| (0..n).map(|i| (me * 100 + b * 10 + i) as f32).collect())
            .collect();
        let ptrs: Vec<*mut c_void> = bufs.iter_mut().map(|b| b.as_mut_ptr().cast()).collect();
        // SAFETY: each pointer holds its count of f32; the vectors outlive the call.
        unsafe {
            ok(ferrocomm_allreduce_many(
                comm,
                ptrs.as_ptr(),
                sizes.as_ptr(),
                sizes.len(),
                FERROCOMM_F32 as u32,
                FERROCOMM_AVG as u32,
                64,
            ));
        }
        for (b, buf) in bufs.iter().enumerate() {
            let want: Vec<f32> = (0..sizes[b]).map(|i| (100 + b * 10 + i) as f32).collect();
            assert_eq!(*buf, want, "buffer {b}");
        }
        // Default cap, integer sum; then the errors.
        let mut a = [me as i64; 4];
        let mut c = [1i64; 2];
        let ptrs = [a.as_mut_ptr().cast::<c_void>(), c.as_mut_ptr().cast()];
        // SAFETY: as above; the failing calls must not touch the buffers.
        unsafe {
            ok(ferrocomm_allreduce_many(
                comm,
                ptrs.as_ptr(),
                [4, 2].as_ptr(),
                2,
                FERROCOMM_I64 as u32,
                FERROCOMM_SUM as u32,
                0,
            ));
            fails(
                ferrocomm_allreduce_many(
                    comm,
                    ptrs.as_ptr(),
                    [4, 2].as_ptr(),
                    2,
                    FERROCOMM_I64 as u32,
                    FERROCOMM_AVG as u32,
                    0,
                ),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "avg is defined for floating-point",
            );
            let same = [ptrs[0], ptrs[0]];
            fails(
                ferrocomm_allreduce_many(
                    comm,
                    same.as_ptr(),
                    [4, 2].as_ptr(),
                    2,
                    FERROCOMM_I64 as u32,
                    FERROCOMM_SUM as u32,
                    0,
                ),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "overlap",
            );
            fails(
                ferrocomm_allreduce_many(
                    comm,
                    ptrs.as_ptr(),
                    null(),
                    2,
                    FERROCOMM_I64 as u32,
                    FERROCOMM_SUM as u32,
                    0,
                ),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "`counts`",
            );
            ok(ferrocomm_allreduce_many(
                comm,
                null(),
                null(),
                0,
                FERROCOMM_I64 as u32,
                FERROCOMM_SUM as u32,
                0,
            ));
        }
        assert_eq!((a, c), ([3; 4], [3; 2]));
    });
}

#[test]
fn collective_argument_errors() {
    let _g = serial();
    world(2, |_me, comm| {
        let x = [1f32; 8];
        let mut y = [0f32; 8];
        let (xp, yp) = (x.as_ptr().cast::<c_void>(), y.as_mut_ptr().cast::<c_void>());
        let f32c = FERROCOMM_F32 as u32;
        let mut req = std::ptr::without_provenance_mut(1);
        // SAFETY: the buffers hold 8 f32; every call below must refuse its arguments without
        // touching memory it was not given.
        unsafe {
            fails(
                ferrocomm_allreduce(comm, xp, yp, 8, f32c, 5),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "5 (0x5) is not a ferrocomm_op",
            );
            fails(
                ferrocomm_allreduce(comm, xp, yp, 8, 12, FERROCOMM_SUM as u32),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "12 (0xc) is not a ferrocomm_dtype",
            );
            fails(
                ferrocomm_allreduce(comm, xp, yp, 8, FERROCOMM_U32 as u32, FERROCOMM_AVG as u32),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "avg is defined for floating-point types only",
            );
            fails(
                ferrocomm_allreduce(comm, null(), yp, 8, f32c, FERROCOMM_SUM as u32),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "`sendbuf`",
            );
            fails(
                ferrocomm_allreduce(comm, xp, null_mut(), 8, f32c, FERROCOMM_SUM as u32),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "`recvbuf`",
            );
            fails(
                ferrocomm_allreduce(comm, xp, IP, 8, f32c, FERROCOMM_SUM as u32),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "FERROCOMM_IN_PLACE is not allowed",
            );
            fails(
                ferrocomm_allreduce(
                    comm,
                    yp.cast_const(),
                    yp.cast::<f32>().add(1).cast(),
                    4,
                    f32c,
                    FERROCOMM_SUM as u32,
                ),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "overlaps sendbuf",
            );
            fails(
                ferrocomm_allreduce(
                    comm,
                    xp,
                    yp.cast::<u8>().add(2).cast(),
                    2,
                    f32c,
                    FERROCOMM_SUM as u32,
                ),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "not aligned",
            );
            fails(
                ferrocomm_broadcast(comm, yp, 8, f32c, 2),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "2 is out of range",
            );
            fails(
                ferrocomm_reduce(comm, xp, yp, 8, f32c, FERROCOMM_SUM as u32, 9),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "9 is out of range",
            );
            fails(
                ferrocomm_gather(comm, xp, yp, 4, f32c, 5),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "`root`",
            );
            fails(
                ferrocomm_iscatter(comm, xp, yp, 4, f32c, 5, &mut req),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "`root`",
            );
            assert!(req.is_null(), "the request is NULL after a failure");
            fails(
                ferrocomm_allgather(comm, xp, yp, usize::MAX, f32c),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "overflows",
            );
            fails(
                ferrocomm_alltoall(comm, xp, yp, usize::MAX / 4, f32c),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "do not fit",
            );
            fails(
                ferrocomm_reduce_scatter(
                    comm,
                    xp,
                    yp,
                    usize::MAX / 2 + 1,
                    f32c,
                    FERROCOMM_SUM as u32,
                ),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "overflows",
            );
            fails(
                ferrocomm_iallreduce(comm, xp, yp, 8, f32c, FERROCOMM_SUM as u32, null_mut()),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "`request`",
            );
            fails(
                ferrocomm_ibarrier(null_mut(), &mut req),
                FERROCOMM_ERR_INVALID_HANDLE,
                "NULL",
            );
            // Zero elements: NULL buffers are fine, and the communicator still works after the
            // refusals above (nothing was sent).
            ok(ferrocomm_allreduce(
                comm,
                null(),
                null_mut(),
                0,
                f32c,
                FERROCOMM_SUM as u32,
            ));
            ok(ferrocomm_allreduce(
                comm,
                xp,
                yp,
                8,
                f32c,
                FERROCOMM_SUM as u32,
            ));
        }
        assert_eq!(y, [2.0; 8]);
    });
    assert_eq!(comm::live(), 0);
    assert_eq!(request::live(), 0);
}

/// The scope of a failure, as the header states it: a mismatch on a dup fails every
/// communicator of the same world (the parent too, sticky), and leaves a communicator of
/// another world of the same process working.
#[test]
fn a_mismatch_on_a_dup_fails_its_world_and_no_other() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("a temporary directory");
    world(2, |me, comm| {
        // SAFETY: valid url, buffers and out-pointers throughout.
        unsafe {
            let url = std::ffi::CString::new(format!("file://{}/other-{me}", dir.path().display()))
                .unwrap();
            let mut other = null_mut();
            ok(ferrocomm_init_url(url.as_ptr(), 1, 0, &mut other));
            let mut dup = null_mut();
            ok(ferrocomm_comm_dup(comm, &mut dup));
            let mut v = vec![1f32; 8 + me];
            let mut r = ferrocomm_allreduce(
                dup,
                IP,
                v.as_mut_ptr().cast(),
                v.len(),
                FERROCOMM_F32 as u32,
                FERROCOMM_SUM as u32,
            );
            for _ in 0..3 {
                if r != FERROCOMM_OK {
                    break;
                }
                r = ferrocomm_barrier(dup);
            }
            assert_ne!(r, FERROCOMM_OK, "a mismatch must fail");
            // The parent is failed too, with the same sticky error, on every path.
            let parent = ferrocomm_barrier(comm);
            assert_ne!(parent, FERROCOMM_OK, "the parent shares the failed world");
            let x = [1u8];
            assert_ne!(
                ferrocomm_send(comm, x.as_ptr().cast(), 1, FERROCOMM_U8 as u32, 1 - me, 0),
                FERROCOMM_OK
            );
            // Another world of this process is not affected.
            let mut w = [me as f64; 3];
            ok(ferrocomm_allreduce(
                other,
                IP,
                w.as_mut_ptr().cast(),
                3,
                FERROCOMM_F64 as u32,
                FERROCOMM_SUM as u32,
            ));
            assert_eq!(w, [me as f64; 3]);
            ok(ferrocomm_comm_free(dup));
            ok(ferrocomm_comm_free(other));
        }
    });
}

#[test]
fn mismatched_collectives_are_an_error_code_not_mixed_data() {
    let _g = serial();
    let codes = std::sync::Mutex::new(Vec::new());
    world(2, |me, comm| {
        // Rank 0 reduces 8 elements, rank 1 reduces 9: every rank fails (in this call, or in
        // the next barrier), at least one with COLLECTIVE_MISMATCH, and the communicator
        // stays failed.
        let mut v = vec![1f32; 8 + me];
        // SAFETY: `v` holds 8 + me f32.
        let mut r = unsafe {
            ferrocomm_allreduce(
                comm,
                IP,
                v.as_mut_ptr().cast(),
                v.len(),
                FERROCOMM_F32 as u32,
                FERROCOMM_SUM as u32,
            )
        };
        for _ in 0..3 {
            if r != FERROCOMM_OK {
                break;
            }
            r = ferrocomm_barrier(comm);
        }
        assert_ne!(r, FERROCOMM_OK, "a mismatch must fail");
        assert_ne!(ferrocomm_barrier(comm), FERROCOMM_OK, "sticky");
        codes.lock().unwrap().push((r, crate::tests::last()));
    });
    let codes = codes.into_inner().unwrap();
    assert!(
        codes
            .iter()
            .any(|(c, m)| *c == FERROCOMM_ERR_COLLECTIVE_MISMATCH && m.contains("count")),
        "{codes:?}"
    );
}

#[test]
fn collective_requests_outlive_their_communicator_and_mix_with_p2p_in_waitall() {
    let _g = serial();
    world(2, |me, comm| {
        let other = 1 - me;
        let mut dup = null_mut();
        let mut v = vec![me as f64 + 1.0; 1000];
        let out = [me as u32; 4];
        let mut inp = [9u32; 4];
        let mut reqs = [null_mut(); 3];
        // SAFETY: every buffer outlives its request (all are waited for below).
        unsafe {
            ok(ferrocomm_comm_dup(comm, &mut dup));
            ok(ferrocomm_iallreduce(
                dup,
                IP,
                v.as_mut_ptr().cast(),
                v.len(),
                FERROCOMM_F64 as u32,
                FERROCOMM_SUM as u32,
                &mut reqs[0],
            ));
            // Freeing the communicator lets its started collective finish; the request
            // stays valid and still delivers the result.
            ok(ferrocomm_comm_free(dup));
            ok(ferrocomm_irecv(
                comm,
                inp.as_mut_ptr().cast(),
                4,
                FERROCOMM_U32 as u32,
                other as i64,
                7,
                &mut reqs[1],
            ));
            ok(ferrocomm_isend(
                comm,
                out.as_ptr().cast(),
                4,
                FERROCOMM_U32 as u32,
                other,
                7,
                &mut reqs[2],
            ));
            let mut sts = [ferrocomm_status_t::failed(FERROCOMM_ERR_IO); 3];
            ok(ferrocomm_waitall(3, reqs.as_ptr(), sts.as_mut_ptr()));
            assert_eq!((sts[0].source, sts[0].bytes), (usize::MAX, 8000));
            assert_eq!((sts[1].source, sts[1].tag, sts[1].bytes), (other, 7, 16));
        }
        assert!(v.iter().all(|&x| x == 3.0));
        assert_eq!(inp, [other as u32; 4]);
    });
    assert_eq!(request::live(), 0);
}
