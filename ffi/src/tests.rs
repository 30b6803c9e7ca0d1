//! Tests of the exported functions, called from Rust the way C calls them: ranks are
//! threads that each join a TCP world on loopback through `ferrocomm_init_url`.
//!
//! The handle registry is global, and `ferrocomm_finalize` releases every handle of the
//! process, so tests that make handles run one at a time (`serial()`).

use std::ffi::{CStr, CString, c_int, c_void};
use std::ptr::{null, null_mut};
use std::sync::{Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::ferrocomm_result::{self, *};
use crate::types::ferrocomm_dtype_code::*;
use crate::*;

static SERIAL: Mutex<()> = Mutex::new(());

pub(crate) fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn last() -> String {
    // SAFETY: always a valid NUL-terminated string.
    unsafe { CStr::from_ptr(ferrocomm_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[track_caller]
pub(crate) fn ok(r: ferrocomm_result) {
    assert_eq!(r, FERROCOMM_OK, "{}", last());
}

#[track_caller]
pub(crate) fn fails(r: ferrocomm_result, code: ferrocomm_result, needle: &str) {
    assert_eq!(r, code, "{}", last());
    let msg = last();
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
}

/// How long a test world may run before the watchdog aborts its communicators.
const LIMIT: Duration = Duration::from_secs(90);

/// Runs `f(rank, comm)` on `n` threads, each the rank of a world made with
/// `ferrocomm_init_url` (a file store, TCP between the ranks); frees each communicator afterwards. A rank that panics frees its
/// communicator first (so its peers see it leave instead of waiting for it), and a watchdog
/// aborts every communicator after [`LIMIT`]: a bug fails the test instead of hanging it.
pub(crate) fn world(n: usize, f: impl Fn(usize, *mut ferrocomm_comm_t) + Sync) {
    // A file store: no port to pick, so no race with other programs for one.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = CString::new(format!("file://{}/store", dir.path().display())).unwrap();
    let comms = Mutex::new(Vec::new());
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let comms = &comms;
        s.spawn(move || {
            if done_rx.recv_timeout(LIMIT) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                for &h in comms.lock().unwrap().iter() {
                    let comm: *mut ferrocomm_comm_t = std::ptr::without_provenance_mut(h);
                    // SAFETY: a valid reason string; the handle may be stale (then refused).
                    unsafe { ferrocomm_comm_abort(comm, c"the test's watchdog fired".as_ptr()) };
                }
            }
        });
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (url, f) = (&url, &f);
                s.spawn(move || {
                    let mut comm = null_mut();
                    // SAFETY: valid NUL-terminated url and out-pointer.
                    ok(unsafe { ferrocomm_init_url(url.as_ptr(), n as i64, r as i64, &mut comm) });
                    // Handles travel between threads as numbers (as in C).
                    let h = comm as usize;
                    comms.lock().unwrap().push(h);
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        f(r, std::ptr::without_provenance_mut(h))
                    }));
                    let freed = ferrocomm_comm_free(comm);
                    if let Err(p) = run {
                        std::panic::resume_unwind(p);
                    }
                    ok(freed);
                })
            })
            .collect();
        let results: Vec<_> = hs.into_iter().map(|h| h.join()).collect();
        drop(done_tx);
        for r in results {
            if let Err(p) = r {
                std::panic::resume_unwind(p);
            }
        }
    });
}

#[test]
fn bad_handles_are_errors_not_crashes() {
    let _g = serial();
    let mut rank = 0usize;
    // SAFETY: every pointer passed is valid or NULL; handles are never dereferenced.
    unsafe {
        fails(
            ferrocomm_comm_rank(null_mut(), &mut rank),
            FERROCOMM_ERR_INVALID_HANDLE,
            "NULL",
        );
        let garbage = std::ptr::without_provenance_mut(0xdead_beef_0000_0042);
        fails(
            ferrocomm_comm_rank(garbage, &mut rank),
            FERROCOMM_ERR_INVALID_HANDLE,
            "not a live",
        );
        // A pointer to real memory is just a number that matches no slot.
        let mut x = 0u64;
        let real = (&raw mut x).cast::<ferrocomm_comm_t>();
        fails(
            ferrocomm_comm_free(real),
            FERROCOMM_ERR_INVALID_HANDLE,
            "not a live",
        );
        fails(
            ferrocomm_barrier(null_mut()),
            FERROCOMM_ERR_INVALID_HANDLE,
            "NULL",
        );
        fails(
            ferrocomm_wait(null_mut(), null_mut()),
            FERROCOMM_ERR_INVALID_HANDLE,
            "NULL",
        );
        fails(
            ferrocomm_request_free(garbage.cast()),
            FERROCOMM_ERR_INVALID_HANDLE,
            "request",
        );
    }
    // Double free and use after free of a real communicator; a request handle is not a
    // communicator handle and vice versa.
    world(1, |_, comm| {
        let mut dup = null_mut();
        let mut rank = 9usize;
        // SAFETY: valid out-pointers.
        unsafe {
            ok(ferrocomm_comm_dup(comm, &mut dup));
            ok(ferrocomm_comm_rank(dup, &mut rank));
        }
        assert_eq!(rank, 0);
        ok(ferrocomm_comm_free(dup));
        fails(
            ferrocomm_comm_free(dup),
            FERROCOMM_ERR_INVALID_HANDLE,
            "already freed",
        );
        // SAFETY: valid out-pointer.
        unsafe {
            fails(
                ferrocomm_comm_rank(dup, &mut rank),
                FERROCOMM_ERR_INVALID_HANDLE,
                "already freed",
            );
        }
        let mut buf = [0u32; 4];
        let mut req = null_mut();
        // SAFETY: `buf` outlives the request (freed below).
        unsafe {
            ok(ferrocomm_irecv(
                comm,
                buf.as_mut_ptr().cast(),
                4,
                FERROCOMM_U32 as u32,
                0,
                5,
                &mut req,
            ));
        }
        fails(
            ferrocomm_comm_free(req.cast()),
            FERROCOMM_ERR_INVALID_HANDLE,
            "is a request handle",
        );
        fails(
            ferrocomm_barrier(req.cast()),
            FERROCOMM_ERR_INVALID_HANDLE,
            "is a request handle",
        );
        fails(
            ferrocomm_request_free(comm.cast()),
            FERROCOMM_ERR_INVALID_HANDLE,
            "is a communicator",
        );
        // Freeing an unmatched receive withdraws it; a second free is refused.
        ok(ferrocomm_request_free(req));
        fails(
            ferrocomm_request_free(req),
            FERROCOMM_ERR_INVALID_HANDLE,
            "already freed",
        );
        // SAFETY: NULL status is allowed.
        unsafe {
            fails(
                ferrocomm_wait(req, null_mut()),
                FERROCOMM_ERR_INVALID_HANDLE,
                "already freed",
            )
        };
    });
    assert_eq!(comm::live(), 0);
    assert_eq!(request::live(), 0);
}

#[test]
fn bad_arguments_are_errors() {
    let _g = serial();
    // SAFETY: pointers are valid or NULL as each call documents; the calls must refuse the
    // bad ones without touching them.
    unsafe {
        fails(
            ferrocomm_init(null_mut()),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "`comm`",
        );
        let mut c = std::ptr::without_provenance_mut(1);
        let url = c"tcp://127.0.0.1:1";
        fails(
            ferrocomm_init_url(url.as_ptr(), -2, 0, &mut c),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "world_size",
        );
        assert!(c.is_null(), "the out-handle is NULL after a failure");
        fails(
            ferrocomm_init_url(url.as_ptr(), 2, 5, &mut c),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "`rank` to ferrocomm_init_url: 5 is out of range for the world_size 2",
        );
        fails(
            ferrocomm_init_url(url.as_ptr(), 0, -1, &mut c),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "`world_size`",
        );
        let bad = c"nonsense://x";
        fails(
            ferrocomm_init_url(bad.as_ptr(), 1, 0, &mut c),
            FERROCOMM_ERR_CONFIG,
            "nonsense",
        );
        let mut size = 0usize;
        ok(ferrocomm_dtype_size(FERROCOMM_BF16 as u32, &mut size));
        assert_eq!(size, 2);
        fails(
            ferrocomm_dtype_size(12, &mut size),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "12 (0xc) is not a ferrocomm_dtype",
        );
        fails(
            ferrocomm_dtype_size(0, null_mut()),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "`size`",
        );
    }
    world(2, |me, comm| {
        let other = 1 - me;
        let data = [1.5f64, 2.5, 3.5];
        let mut odd = [0u8; 16];
        let mut req = null_mut();
        // SAFETY: as above.
        unsafe {
            let p = data.as_ptr().cast::<c_void>();
            fails(
                ferrocomm_send(comm, p, 3, 99, other, 0),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "99 (0x63) is not a ferrocomm_dtype",
            );
            fails(
                ferrocomm_send(comm, null(), 3, FERROCOMM_F64 as u32, other, 0),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "NULL with a count of 3",
            );
            fails(
                ferrocomm_send(comm, p, 3, FERROCOMM_F64 as u32, 7, 0),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "7 is out of range",
            );
            let misaligned = odd.as_mut_ptr().add(1).cast::<c_void>();
            fails(
                ferrocomm_recv(comm, misaligned, 2, FERROCOMM_U32 as u32, 0, 0, null_mut()),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "not aligned",
            );
            fails(
                ferrocomm_recv(
                    comm,
                    odd.as_mut_ptr().cast(),
                    1,
                    FERROCOMM_U8 as u32,
                    -2,
                    0,
                    null_mut(),
                ),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "FERROCOMM_ANY_SOURCE",
            );
            fails(
                ferrocomm_recv(
                    comm,
                    odd.as_mut_ptr().cast(),
                    1,
                    FERROCOMM_U8 as u32,
                    0,
                    1 << 40,
                    null_mut(),
                ),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "FERROCOMM_ANY_TAG",
            );
            fails(
                ferrocomm_isend(comm, p, 3, FERROCOMM_F64 as u32, other, 0, null_mut()),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "`request`",
            );
            fails(
                ferrocomm_irecv(
                    comm,
                    odd.as_mut_ptr().cast(),
                    usize::MAX,
                    FERROCOMM_F64 as u32,
                    0,
                    0,
                    &mut req,
                ),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "do not fit",
            );
            assert!(req.is_null());
            let buf = odd.as_mut_ptr().cast::<c_void>();
            fails(
                ferrocomm_sendrecv(
                    comm,
                    buf,
                    2,
                    FERROCOMM_U8 as u32,
                    other,
                    0,
                    buf.cast::<u8>().add(1).cast(),
                    2,
                    -1,
                    -1,
                    null_mut(),
                ),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "overlaps",
            );
            fails(
                ferrocomm_waitall(2, null(), null_mut()),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "NULL with a count of 2",
            );
            ok(ferrocomm_waitall(0, null(), null_mut()));
            let one = [null_mut()];
            fails(
                ferrocomm_waitall(usize::MAX, one.as_ptr(), null_mut()),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "do not fit",
            );
            let mut done: c_int = 0;
            fails(
                ferrocomm_test(null_mut(), null_mut(), null_mut()),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "`done`",
            );
            fails(
                ferrocomm_test(null_mut(), &mut done, null_mut()),
                FERROCOMM_ERR_INVALID_HANDLE,
                "NULL",
            );
            let r = c"\xff\xfe";
            fails(
                ferrocomm_comm_abort(comm, r.as_ptr()),
                FERROCOMM_ERR_INVALID_ARGUMENT,
                "UTF-8",
            );
        }
        // The communicator is still usable after argument errors: a message that is too
        // large, or not whole elements, is refused on receipt and the next one goes through.
        // SAFETY: valid buffers of the stated sizes.
        unsafe {
            if me == 0 {
                let p = data.as_ptr().cast::<c_void>();
                ok(ferrocomm_send(comm, p, 3, FERROCOMM_F64 as u32, 1, 1));
                ok(ferrocomm_send(comm, p, 3, FERROCOMM_U8 as u32, 1, 2));
                ok(ferrocomm_send(comm, p, 3, FERROCOMM_U8 as u32, 1, 3));
                ok(ferrocomm_send(comm, p, 3, FERROCOMM_F64 as u32, 1, 4));
            } else {
                let mut small = [0f64; 2];
                let sp = small.as_mut_ptr().cast::<c_void>();
                fails(
                    ferrocomm_recv(comm, sp, 2, FERROCOMM_F64 as u32, 0, 1, null_mut()),
                    FERROCOMM_ERR_INVALID_ARGUMENT,
                    "",
                );
                fails(
                    ferrocomm_recv(comm, sp, 2, FERROCOMM_F64 as u32, 0, 2, null_mut()),
                    FERROCOMM_ERR_INVALID_ARGUMENT,
                    "not a whole number of f64",
                );
                let mut req = null_mut();
                ok(ferrocomm_irecv(
                    comm,
                    sp,
                    2,
                    FERROCOMM_U16 as u32,
                    0,
                    3,
                    &mut req,
                ));
                let mut st = ferrocomm_status_t::failed(FERROCOMM_OK);
                fails(
                    ferrocomm_wait(req, &mut st),
                    FERROCOMM_ERR_INVALID_ARGUMENT,
                    "not a whole number of u16",
                );
                assert_eq!(st.error, FERROCOMM_ERR_INVALID_ARGUMENT as u32);
                let mut three = [0f64; 3];
                ok(ferrocomm_recv(
                    comm,
                    three.as_mut_ptr().cast(),
                    3,
                    FERROCOMM_F64 as u32,
                    0,
                    4,
                    &mut st,
                ));
                assert_eq!(three, data);
                assert_eq!((st.source, st.tag, st.bytes, st.error), (0, 4, 24, 0));
            }
            ok(ferrocomm_barrier(comm));
        }
    });
}

#[test]
fn point_to_point_in_a_ring_of_three() {
    let _g = serial();
    world(3, |me, comm| {
        let n = 3usize;
        let (right, left) = ((me + 1) % n, (me + n - 1) % n);
        let mut size = 0usize;
        // SAFETY: valid buffers and out-pointers throughout; requests are waited for before
        // their buffers go away.
        unsafe {
            ok(ferrocomm_comm_size(comm, &mut size));
            assert_eq!(size, n);
            let mut v = 0usize;
            ok(ferrocomm_comm_rank(comm, &mut v));
            assert_eq!(v, me);
            ok(ferrocomm_comm_local_size(comm, &mut v));
            assert_eq!(v, n, "one host");
            ok(ferrocomm_comm_local_rank(comm, &mut v));
            assert!(v < n);
            ok(ferrocomm_comm_node_index(comm, &mut v));
            assert_eq!(v, 0);

            // Every data type through sendrecv around the ring.
            for dt in crate::types::ferrocomm_dtype_code::ALL {
                let mut esize = 0usize;
                ok(ferrocomm_dtype_size(dt as u32, &mut esize));
                let count = 5usize;
                let out: Vec<u64> = (0..count as u64)
                    .map(|i| (me as u64 + 1) * 100 + i)
                    .collect();
                let mut inp = vec![0u64; count];
                let mut st = ferrocomm_status_t::failed(FERROCOMM_OK);
                // u64 storage is aligned for every type; `count * esize` bytes are used.
                ok(ferrocomm_sendrecv(
                    comm,
                    out.as_ptr().cast(),
                    count,
                    dt as u32,
                    right,
                    7,
                    inp.as_mut_ptr().cast(),
                    count,
                    left as i64,
                    7,
                    &mut st,
                ));
                assert_eq!(
                    (st.source, st.tag, st.bytes),
                    (left, 7, count * esize),
                    "{dt:?}"
                );
                let expect: Vec<u64> = (0..count as u64)
                    .map(|i| (left as u64 + 1) * 100 + i)
                    .collect();
                let got = std::slice::from_raw_parts(inp.as_ptr().cast::<u8>(), count * esize);
                let want = std::slice::from_raw_parts(expect.as_ptr().cast::<u8>(), count * esize);
                assert_eq!(got, want, "{dt:?}");
            }

            // Non-blocking: receives from any source posted before the sends; test polls.
            let mut inbox = [[0f32; 4]; 2];
            let mut reqs = [null_mut(); 4];
            let [a, b] = &mut inbox;
            ok(ferrocomm_irecv(
                comm,
                a.as_mut_ptr().cast(),
                4,
                FERROCOMM_F32 as u32,
                FERROCOMM_ANY_SOURCE,
                11,
                &mut reqs[0],
            ));
            ok(ferrocomm_irecv(
                comm,
                b.as_mut_ptr().cast(),
                4,
                FERROCOMM_F32 as u32,
                FERROCOMM_ANY_SOURCE,
                FERROCOMM_ANY_TAG,
                &mut reqs[1],
            ));
            let payload = [me as f32; 4];
            ok(ferrocomm_isend(
                comm,
                payload.as_ptr().cast(),
                4,
                FERROCOMM_F32 as u32,
                right,
                11,
                &mut reqs[2],
            ));
            ok(ferrocomm_isend(
                comm,
                payload.as_ptr().cast(),
                4,
                FERROCOMM_F32 as u32,
                left,
                11,
                &mut reqs[3],
            ));
            let mut done: c_int = 0;
            let mut st = ferrocomm_status_t::failed(FERROCOMM_OK);
            let deadline = Instant::now() + Duration::from_secs(60);
            while done == 0 {
                ok(ferrocomm_test(reqs[0], &mut done, &mut st));
                assert!(Instant::now() < deadline, "test never completed");
                if done == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            assert_eq!(st.tag, 11);
            assert!(st.source == left || st.source == right);
            // The completed request is released: waiting for it again is refused.
            fails(
                ferrocomm_wait(reqs[0], null_mut()),
                FERROCOMM_ERR_INVALID_HANDLE,
                "already freed",
            );
            // waitall refuses duplicates and changes nothing.
            let dupes = [reqs[1], reqs[1]];
            fails(
                ferrocomm_waitall(2, dupes.as_ptr(), null_mut()),
                FERROCOMM_ERR_INVALID_HANDLE,
                "appears twice",
            );
            let mut sts = [ferrocomm_status_t::failed(FERROCOMM_OK); 3];
            ok(ferrocomm_waitall(3, reqs[1..].as_ptr(), sts.as_mut_ptr()));
            let mut from = [st.source, sts[0].source];
            from.sort_unstable();
            let mut expect = [left, right];
            expect.sort_unstable();
            assert_eq!(from, expect);
            for (buf, src) in inbox.iter().zip([st.source, sts[0].source]) {
                assert_eq!(*buf, [src as f32; 4]);
            }
            assert_eq!(
                (sts[1].source, sts[1].bytes, sts[2].source),
                (right, 16, left)
            );
            assert!(sts.iter().all(|s| s.error == 0));
            fails(
                ferrocomm_waitall(1, reqs[1..].as_ptr(), null_mut()),
                FERROCOMM_ERR_INVALID_HANDLE,
                "not a live request",
            );

            // Zero-length messages and NULL buffers with count 0 (after a barrier, so that no
            // ANY_TAG receive above can match them).
            ok(ferrocomm_barrier(comm));
            if me == 0 {
                ok(ferrocomm_send(comm, null(), 0, FERROCOMM_U8 as u32, 1, 3));
            } else if me == 1 {
                let mut st = ferrocomm_status_t::failed(FERROCOMM_ERR_IO);
                ok(ferrocomm_recv(
                    comm,
                    null_mut(),
                    0,
                    FERROCOMM_U8 as u32,
                    0,
                    3,
                    &mut st,
                ));
                assert_eq!((st.source, st.bytes, st.error), (0, 0, 0));
            }
            ok(ferrocomm_barrier(comm));
        }
    });
    assert_eq!(request::live(), 0);
}

#[test]
fn a_busy_communicator_and_abort_from_another_thread() {
    let _g = serial();
    world(1, |_, comm| {
        let started = Barrier::new(2);
        std::thread::scope(|s| {
            let h = comm as usize;
            let started = &started;
            let blocked = s.spawn(move || {
                let comm: *mut ferrocomm_comm_t = std::ptr::without_provenance_mut(h);
                let mut x = 0u32;
                started.wait();
                // Nobody sends this: the receive blocks until the abort.
                // SAFETY: valid buffer.
                let r = unsafe {
                    ferrocomm_recv(
                        comm,
                        (&raw mut x).cast(),
                        1,
                        FERROCOMM_U32 as u32,
                        0,
                        77,
                        null_mut(),
                    )
                };
                (r, last())
            });
            started.wait();
            // While the other thread is inside a call, this one gets BUSY (not a data race),
            // but the queries and abort still work.
            let deadline = Instant::now() + Duration::from_secs(30);
            let x = 1u32;
            loop {
                // SAFETY: valid buffer.
                let r = unsafe {
                    ferrocomm_send(comm, (&raw const x).cast(), 1, FERROCOMM_U32 as u32, 0, 1)
                };
                if r == FERROCOMM_ERR_BUSY {
                    assert!(last().contains("ferrocomm_comm_dup"), "{}", last());
                    break;
                }
                // The receiver had not locked it yet: the send to self went through.
                ok(r);
                assert!(Instant::now() < deadline, "never saw BUSY");
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut size = 0usize;
            // SAFETY: valid out-pointer and reason.
            unsafe {
                ok(ferrocomm_comm_size(comm, &mut size));
                ok(ferrocomm_comm_abort(comm, c"test is over".as_ptr()));
            }
            let (r, msg) = blocked.join().expect("receiver thread");
            assert_eq!(r, FERROCOMM_ERR_ABORTED, "{msg}");
            assert!(msg.contains("test is over"), "{msg}");
        });
        // Sticky: later calls fail the same way.
        let x = 1u32;
        // SAFETY: valid buffer.
        let r =
            unsafe { ferrocomm_send(comm, (&raw const x).cast(), 1, FERROCOMM_U32 as u32, 0, 1) };
        fails(r, FERROCOMM_ERR_ABORTED, "test is over");
    });
}

#[test]
fn finalize_releases_everything() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = CString::new(format!("file://{}/store", dir.path().display())).unwrap();
    let (mut comm, mut dup, mut req) = (null_mut(), null_mut(), null_mut());
    let mut buf = [0u8; 8];
    // Handles a failed test may have left behind.
    ok(ferrocomm_finalize());
    // SAFETY: valid url and out-pointers; `buf` outlives the request, which finalize
    // releases.
    unsafe {
        ok(ferrocomm_init_url(url.as_ptr(), 1, 0, &mut comm));
        ok(ferrocomm_comm_dup(comm, &mut dup));
        ok(ferrocomm_irecv(
            dup,
            buf.as_mut_ptr().cast(),
            8,
            FERROCOMM_U8 as u32,
            0,
            0,
            &mut req,
        ));
    }
    assert_eq!((comm::live(), request::live()), (2, 1));
    ok(ferrocomm_finalize());
    assert_eq!((comm::live(), request::live()), (0, 0));
    fails(
        ferrocomm_request_free(req),
        FERROCOMM_ERR_INVALID_HANDLE,
        "already freed",
    );
    fails(
        ferrocomm_comm_free(dup),
        FERROCOMM_ERR_INVALID_HANDLE,
        "already freed",
    );
    fails(
        ferrocomm_comm_free(comm),
        FERROCOMM_ERR_INVALID_HANDLE,
        "already freed",
    );
    // The library can be initialised again (a new store file: a file store serves one job).
    let url = CString::new(format!("file://{}/store2", dir.path().display())).unwrap();
    // SAFETY: as above.
    unsafe { ok(ferrocomm_init_url(url.as_ptr(), 1, 0, &mut comm)) };
    ok(ferrocomm_barrier(comm));
    ok(ferrocomm_finalize());
}

#[test]
fn sampler_indices_match_the_rust_sampler() {
    let mut count = 0usize;
    // SAFETY: valid out-pointers and arrays of the stated capacity.
    unsafe {
        ok(ferrocomm_sampler_indices(
            10,
            4,
            2,
            0,
            0,
            FERROCOMM_SAMPLER_NO_SHUFFLE,
            null_mut(),
            0,
            &mut count,
        ));
        assert_eq!(count, 3);
        let mut idx = [0u64; 3];
        ok(ferrocomm_sampler_indices(
            10,
            4,
            2,
            0,
            0,
            FERROCOMM_SAMPLER_NO_SHUFFLE,
            idx.as_mut_ptr(),
            3,
            &mut count,
        ));
        assert_eq!(idx, [2, 6, 0], "padded with the first indices");
        ok(ferrocomm_sampler_indices(
            10,
            4,
            2,
            0,
            0,
            FERROCOMM_SAMPLER_NO_SHUFFLE | FERROCOMM_SAMPLER_DROP_LAST,
            idx.as_mut_ptr(),
            3,
            &mut count,
        ));
        assert_eq!((count, &idx[..2]), (2, &[2u64, 6][..]));
        let mut big = vec![0u64; 250];
        ok(ferrocomm_sampler_indices(
            1000,
            4,
            1,
            7,
            3,
            0,
            big.as_mut_ptr(),
            250,
            &mut count,
        ));
        let mut s = ferrocomm_rs::ddp::DistributedSampler::new(1000, 4, 1)
            .unwrap()
            .seed(7);
        s.set_epoch(3);
        assert_eq!(
            big,
            s.indices()
                .into_iter()
                .map(|i| i as u64)
                .collect::<Vec<_>>()
        );
        fails(
            ferrocomm_sampler_indices(1000, 4, 1, 7, 3, 0, big.as_mut_ptr(), 249, &mut count),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "too small",
        );
        assert_eq!(count, 250, "the needed size is reported");
        fails(
            ferrocomm_sampler_indices(10, 0, 0, 0, 0, 0, null_mut(), 0, &mut count),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "world",
        );
        fails(
            ferrocomm_sampler_indices(10, 2, 2, 0, 0, 0, null_mut(), 0, &mut count),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "rank",
        );
        fails(
            ferrocomm_sampler_indices(10, 2, 0, 0, 0, 8, null_mut(), 0, &mut count),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "unknown bits 0x8",
        );
        fails(
            ferrocomm_sampler_indices(10, 2, 0, 0, 0, 0, null_mut(), 0, null_mut()),
            FERROCOMM_ERR_INVALID_ARGUMENT,
            "`count`",
        );
    }
}

#[test]
fn version_is_the_crate_version() {
    // SAFETY: static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(ferrocomm_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

/// Blocking point-to-point with a count of 0 works for every element type, with a NULL or
/// an aligned pointer (the empty slice used to be cast from bytes at an address aligned only
/// for bytes, and every type wider than one byte was refused).
#[test]
fn zero_count_blocking_point_to_point_of_every_type() {
    let _g = serial();
    world(2, |me, comm| {
        let peer = 1 - me;
        let mut store = [0u64; 2];
        for dt in crate::types::ferrocomm_dtype_code::ALL {
            let aligned = store.as_mut_ptr().cast::<c_void>();
            for p in [null_mut(), aligned] {
                let mut st = ferrocomm_status_t::failed(FERROCOMM_OK);
                // SAFETY: count 0: nothing is read or written; `st` is a valid out-pointer.
                unsafe {
                    if me == 0 {
                        ok(ferrocomm_send(comm, p, 0, dt as u32, peer, 3));
                        ok(ferrocomm_recv(
                            comm,
                            p,
                            0,
                            dt as u32,
                            peer as i64,
                            4,
                            &mut st,
                        ));
                    } else {
                        ok(ferrocomm_recv(
                            comm,
                            p,
                            0,
                            dt as u32,
                            peer as i64,
                            3,
                            &mut st,
                        ));
                        ok(ferrocomm_send(comm, p, 0, dt as u32, peer, 4));
                    }
                    assert_eq!((st.source, st.bytes), (peer, 0), "{dt:?}");
                    ok(ferrocomm_sendrecv(
                        comm,
                        p,
                        0,
                        dt as u32,
                        peer,
                        5,
                        p,
                        0,
                        peer as i64,
                        5,
                        &mut st,
                    ));
                    assert_eq!((st.source, st.bytes), (peer, 0), "{dt:?}");
                }
            }
        }
    });
}

/// `ferrocomm_comm_abort` on a one-rank communicator: every later call fails with
/// `FERROCOMM_ERR_ABORTED` on every path (point-to-point to itself, blocking and
/// non-blocking collectives, a dup), as at any other size. Collectives of one rank touch
/// no transport, and used to return OK after the abort.
#[test]
fn abort_of_a_one_rank_world_fails_every_later_call() {
    let _g = serial();
    world(1, |_, comm| {
        let mut v = [1.0f32; 4];
        let p = v.as_mut_ptr().cast::<c_void>();
        let (f32c, sum) = (
            FERROCOMM_F32 as u32,
            crate::types::ferrocomm_op_code::FERROCOMM_SUM as u32,
        );
        // SAFETY: `v` holds 4 floats; handles and out-pointers are valid.
        unsafe {
            ok(ferrocomm_allreduce(comm, p, p, 4, f32c, sum));
            let mut dup = null_mut();
            ok(ferrocomm_comm_dup(comm, &mut dup));
            ok(ferrocomm_comm_abort(comm, c"stop here".as_ptr()));
            let aborted = |r| fails(r, FERROCOMM_ERR_ABORTED, "stop here");
            aborted(ferrocomm_allreduce(comm, p, p, 4, f32c, sum));
            aborted(ferrocomm_broadcast(comm, p, 4, f32c, 0));
            aborted(ferrocomm_barrier(comm));
            aborted(ferrocomm_send(comm, p, 4, f32c, 0, 1));
            aborted(ferrocomm_recv(comm, p, 4, f32c, 0, 1, null_mut()));
            let mut req = null_mut();
            let r = ferrocomm_iallreduce(comm, p, p, 4, f32c, sum, &mut req);
            if r == FERROCOMM_OK {
                aborted(ferrocomm_wait(req, null_mut()));
            } else {
                aborted(r);
            }
            aborted(ferrocomm_allreduce(dup, p, p, 4, f32c, sum));
            aborted(ferrocomm_barrier(dup));
            let (bufs, counts) = ([p], [4usize]);
            aborted(ferrocomm_allreduce_many(
                comm,
                bufs.as_ptr(),
                counts.as_ptr(),
                1,
                f32c,
                sum,
                0,
            ));
            let mut sub = null_mut();
            aborted(ferrocomm_comm_split(comm, 0, 0, &mut sub));
            assert!(sub.is_null());
            ok(ferrocomm_comm_free(dup));
        }
    });
}

/// A rank out of range is `INVALID_ARGUMENT` when both numbers are arguments of
/// `ferrocomm_init_url`, and `CONFIG` (as the header says) when they come from the
/// environment; it used to be `INVALID_ARGUMENT` either way.
#[test]
fn init_rank_out_of_range_from_the_environment_is_config() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = CString::new(format!("file://{}/store", dir.path().display())).unwrap();
    let mut c = std::ptr::without_provenance_mut(1);
    // SAFETY: set_var/remove_var: every test of this binary that reads the environment
    // (they all initialise communicators) holds `serial()`, as this one does. The init
    // calls get a valid url and out-pointer.
    unsafe {
        std::env::set_var("RANK", "5");
        std::env::set_var("WORLD_SIZE", "2");
        let r = ferrocomm_init_url(url.as_ptr(), -1, -1, &mut c);
        let msg = last();
        let r2 = ferrocomm_init_url(url.as_ptr(), 2, -1, &mut c);
        let msg2 = last();
        std::env::remove_var("RANK");
        std::env::remove_var("WORLD_SIZE");
        assert_eq!(r, FERROCOMM_ERR_CONFIG, "{msg}");
        assert!(msg.contains("RANK") && msg.contains("WORLD_SIZE"), "{msg}");
        assert_eq!(r2, FERROCOMM_ERR_CONFIG, "{msg2}");
        assert!(c.is_null());
    }
}
