//! The verbs transport for real, on a soft-RoCE (rxe) device.
//!
//! These tests need a verbs device: `scripts/test` builds this binary with
//! `--features ibverbs` and runs it inside the rxe VM (`../shared/rxe-vm/run-in-rxe-vm.sh`),
//! where `RXE_DEV` and `RXE_GID_INDEX` name the device. Elsewhere they print that they
//! skipped (and fail under `FERROCOMM_REQUIRE_ALL=1`).
//!
//! Ranks are processes: a test re-executes this binary once per rank (`--exact NAME`) with
//! `IBTEST_RANK` set; the rank then joins the job through the real rendezvous (env://,
//! rank 0 hosting the store on loopback) with `FERROCOMM_TRANSPORT=ibverbs`, so every pair
//! talks through an RC queue pair of the one rxe device. The parent waits for all ranks
//! with a generous deadline: a hang fails the test, it never blocks the run.
#![cfg(feature = "ibverbs")]

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use ferrocomm::transport::ibverbs::verbs;
use ferrocomm::{Communicator, Error};

/// Per test, for all its ranks (the VM runs code ~8x slower than the host).
const LIMIT: Duration = Duration::from_secs(120);

/// The rxe device of the VM, or `None` (skip) outside it.
fn device() -> Option<(String, String)> {
    let dev = std::env::var("RXE_DEV").ok().filter(|d| !d.is_empty());
    let gid = std::env::var("RXE_GID_INDEX").unwrap_or_else(|_| "0".into());
    match dev {
        Some(d) => Some((d, gid)),
        None => {
            let msg = "skipped: no rxe device (RXE_DEV unset); scripts/test runs this binary \
                       inside the soft-RoCE VM";
            if std::env::var("FERROCOMM_REQUIRE_ALL").as_deref() == Ok("1") {
                panic!("{msg}, and FERROCOMM_REQUIRE_ALL=1 forbids skipping");
            }
            eprintln!("{msg}");
            None
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Runs test `name` as `n` rank processes with `env` added, and returns their statuses.
fn spawn_world(name: &str, n: usize, env: &[(&str, &str)]) -> Vec<ExitStatus> {
    let (dev, gid) = device().expect("checked by the caller");
    let exe = std::env::current_exe().expect("test binary path");
    let port = free_port().to_string();
    let mut children: Vec<Child> = (0..n)
        .map(|rank| {
            let mut cmd = Command::new(&exe);
            cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env("IBTEST_RANK", rank.to_string())
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("FERROCOMM_TRANSPORT", "ibverbs")
                .env("FERROCOMM_IB_DEVICE", &dev)
                .env("FERROCOMM_IB_GID_INDEX", &gid)
                .env("FERROCOMM_TIMEOUT", "60")
                .env("FERROCOMM_OP_TIMEOUT", "90")
                .env("FERROCOMM_JOB_ID", format!("ibtest-{name}"));
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.spawn().expect("spawn rank")
        })
        .collect();
    let start = Instant::now();
    let mut status: Vec<Option<ExitStatus>> = vec![None; n];
    while status.iter().any(Option::is_none) {
        for (i, c) in children.iter_mut().enumerate() {
            if status[i].is_none() {
                status[i] = c.try_wait().expect("wait");
            }
        }
        if start.elapsed() > LIMIT {
            for c in children.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            panic!("{name}: ranks still running after {LIMIT:?}: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{name}: {n} ranks finished in {:.2?}", start.elapsed());
    status
        .into_iter()
        .map(|s| s.expect("all finished"))
        .collect()
}

/// The rank of this process when it is a rank of a test, `None` in the parent.
fn my_rank() -> Option<usize> {
    let r = std::env::var("IBTEST_RANK")
        .ok()
        .and_then(|r| r.parse().ok());
    if r.is_some() {
        ferrocomm::init_logging();
    }
    r
}

/// Runs `body` on every rank of an `n`-rank world; asserts every rank succeeded.
fn world(name: &str, n: usize, env: &[(&str, &str)], body: fn(&Communicator)) {
    world_over(name, n, env, "ibverbs", body)
}

/// [`world`], expecting every peer to be reached over `transport`.
fn world_over(
    name: &str,
    n: usize,
    env: &[(&str, &str)],
    transport: &str,
    body: fn(&Communicator),
) {
    if my_rank().is_some() {
        let comm = ferrocomm::init().expect("init");
        for peer in (0..comm.size()).filter(|&p| p != comm.rank()) {
            assert_eq!(comm.transport_to(peer).unwrap(), transport, "peer {peer}");
        }
        body(&comm);
        comm.barrier().expect("final barrier");
        drop(comm);
        // A rank runs one world and ends (a test may start several worlds in turn).
        std::process::exit(0);
    }
    if device().is_none() {
        return;
    }
    let st = spawn_world(name, n, env);
    assert!(
        st.iter().all(ExitStatus::success),
        "{name}: rank statuses {st:?}"
    );
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const SIZES: &[usize] = &[
    0,
    1,
    7,
    64,
    65,
    1000,
    8191,
    8192,
    8193,
    65536,
    262_143,
    262_144,
    1 << 20,
    (3 << 20) + 5,
    8 << 20,
];

/// Ping-pong of every size (expected receives), checking every byte both ways.
fn ping_pong_sizes(c: &Communicator) {
    let me = c.rank();
    for (i, &len) in SIZES.iter().enumerate() {
        let tag = i as u32;
        let mut buf = vec![0u8; len];
        if me == 0 {
            c.send(&pattern(len, i as u64), 1, tag).unwrap();
            let st = c.recv(&mut buf, 1, tag).unwrap();
            assert_eq!(st.bytes, len);
            assert!(
                buf == pattern(len, 1000 + i as u64),
                "size {len}: echo differs"
            );
        } else if me == 1 {
            let st = c.recv(&mut buf, 0, tag).unwrap();
            assert_eq!((st.source, st.bytes), (0, len));
            assert!(buf == pattern(len, i as u64), "size {len}: data differs");
            c.send(&pattern(len, 1000 + i as u64), 0, tag).unwrap();
        }
    }
}

/// Every size sent before the receiver posts anything: small ones are kept whole, large
/// ones stay at the sender until fetched; received in reverse order.
fn unexpected_sizes(c: &Communicator) {
    let me = c.rank();
    if me == 0 {
        let data: Vec<Vec<u8>> = SIZES
            .iter()
            .enumerate()
            .map(|(i, &l)| pattern(l, 50 + i as u64))
            .collect();
        c.scope(|s| {
            let reqs = data
                .iter()
                .enumerate()
                .map(|(i, d)| s.isend(d, 1, 100 + i as u32))
                .collect::<ferrocomm::Result<Vec<_>>>()?;
            s.wait_all(reqs)
        })
        .unwrap();
    } else if me == 1 {
        std::thread::sleep(Duration::from_millis(500));
        for (i, &len) in SIZES.iter().enumerate().rev() {
            let mut buf = vec![0u8; len];
            let st = c.recv(&mut buf, 0, 100 + i as u32).unwrap();
            assert_eq!(st.bytes, len);
            assert!(
                buf == pattern(len, 50 + i as u64),
                "unexpected size {len} differs"
            );
        }
    }
}

fn p2p_body(c: &Communicator) {
    ping_pong_sizes(c);
    unexpected_sizes(c);
}

#[test]
fn p2p_0_bytes_to_8_mib() {
    world("p2p_0_bytes_to_8_mib", 2, &[], p2p_body);
}

/// The same with every rendezvous message copied through the eager buffers (no
/// registration of user buffers), with a tiny credit window, and with a registration
/// cache that keeps registrations.
#[test]
fn p2p_copy_path_small_window() {
    world(
        "p2p_copy_path_small_window",
        2,
        &[
            ("FERROCOMM_IB_ZCOPY_THRESHOLD", "1g"),
            ("FERROCOMM_IB_RECV_SLOTS", "4"),
            ("FERROCOMM_IB_EAGER_LIMIT", "4k"),
        ],
        p2p_body,
    );
}

#[test]
fn p2p_zero_copy_with_reg_cache() {
    world(
        "p2p_zero_copy_with_reg_cache",
        2,
        &[
            ("FERROCOMM_IB_ZCOPY_THRESHOLD", "8193"),
            ("FERROCOMM_IB_REG_CACHE", "64m"),
            ("FERROCOMM_IB_INLINE", "0"),
        ],
        |c| {
            // The same buffers again and again: registered once each.
            for _ in 0..3 {
                ping_pong_sizes(c);
            }
        },
    );
}

/// Thousands of small messages one way, nobody receiving until all are sent (so the
/// receiver's buffers and credits cycle many times), then both ways at once.
#[test]
fn credits_many_small_messages() {
    world(
        "credits_many_small_messages",
        2,
        &[("FERROCOMM_IB_RECV_SLOTS", "4")],
        |c| {
            let (me, n) = (c.rank(), 2000u32);
            if me == 0 {
                for i in 0..n {
                    c.send(&[i, i ^ 0xabcd], 1, 7).unwrap();
                }
            } else {
                std::thread::sleep(Duration::from_millis(300));
                let mut x = [0u32; 2];
                for i in 0..n {
                    c.recv(&mut x, 0, 7u32).unwrap();
                    assert_eq!(x, [i, i ^ 0xabcd]);
                }
            }
            c.barrier().unwrap();
            let other = 1 - me;
            let out: Vec<u64> = (0..500).map(|i| (me as u64) << 32 | i).collect();
            let mut inp = vec![0u64; 500];
            c.scope(|s| {
                let mut reqs = Vec::new();
                for (i, (o, x)) in out.iter().zip(inp.iter_mut()).enumerate() {
                    reqs.push(s.irecv(std::slice::from_mut(x), other, i as u32)?);
                    reqs.push(s.isend(std::slice::from_ref(o), other, i as u32)?);
                }
                s.wait_all(reqs)
            })
            .unwrap();
            for (i, x) in inp.iter().enumerate() {
                assert_eq!(*x, (other as u64) << 32 | i as u64);
            }
        },
    );
}

/// The library's all_reduce (every algorithm forced in turn, and the automatic choice) and
/// broadcast over verbs, results checked exactly.
fn collectives_body(c: &Communicator) {
    use ferrocomm::{AllReduceAlgo, AllReduceOptions, ReduceOp};
    let (me, n) = (c.rank(), c.size());
    let algos = [
        None,
        Some(AllReduceAlgo::Ring),
        Some(AllReduceAlgo::HalvingDoubling),
        Some(AllReduceAlgo::RecursiveDoubling),
    ];
    for algo in algos {
        for len in [1usize, 10, 3 * 100_000 + 7] {
            let mut data: Vec<f64> = (0..len).map(|i| (me * 1000 + i % 997) as f64).collect();
            match algo {
                None => c.all_reduce(&mut data, ReduceOp::Sum).unwrap(),
                Some(a) => c
                    .all_reduce_with(&mut data, ReduceOp::Sum, &AllReduceOptions::algo(a))
                    .unwrap(),
            }
            for (i, x) in data.iter().enumerate() {
                let want: f64 = (0..n).map(|r| (r * 1000 + i % 997) as f64).sum();
                assert_eq!(*x, want, "all_reduce ({algo:?}) of {len} at {i}");
            }
        }
    }
    for (root, len) in [(0usize, 100usize), (n - 1, 1 << 20), (1, 8192 + 1)] {
        let want = pattern(len, root as u64 + 7);
        let mut buf = if me == root {
            want.clone()
        } else {
            vec![0; len]
        };
        c.broadcast(&mut buf, root).unwrap();
        assert!(buf == want, "broadcast of {len} from {root}");
    }
}

#[test]
fn all_reduce_and_broadcast_2_ranks() {
    world("all_reduce_and_broadcast_2_ranks", 2, &[], collectives_body);
}

#[test]
fn all_reduce_and_broadcast_3_ranks() {
    world("all_reduce_and_broadcast_3_ranks", 3, &[], collectives_body);
}

/// A rank killed with SIGKILL: the survivor's pending receive fails with an error naming
/// the peer and the verbs status, well before the operation timeout.
#[test]
fn killed_peer_fails_operations() {
    let name = "killed_peer_fails_operations";
    if let Some(rank) = my_rank() {
        let comm = ferrocomm::init().expect("init");
        comm.barrier().unwrap();
        if rank == 1 {
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: raising a signal in our own process.
            unsafe { libc::raise(libc::SIGKILL) };
            unreachable!("killed");
        }
        let start = Instant::now();
        let mut buf = [0u8; 16];
        let err = comm
            .recv_timeout(&mut buf, 1, 3u32, Some(Duration::from_secs(80)))
            .expect_err("the peer is dead");
        let text = err.to_string();
        eprintln!("rank 0 got, after {:.2?}: {text}", start.elapsed());
        assert!(matches!(err, Error::PeerLost { peer: 1, .. }), "{err:?}");
        assert!(text.contains("rank 1"), "{text}");
        assert!(
            text.contains("verbs status"),
            "names the verbs status: {text}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "took {:?}",
            start.elapsed()
        );
        // Later operations with the dead peer fail at once; the error is sticky.
        assert!(comm.send(&[1u8], 1, 0).is_err());
        return;
    }
    if device().is_none() {
        return;
    }
    let st = spawn_world(name, 2, &[("FERROCOMM_IB_KEEPALIVE", "0.2")]);
    assert!(st[0].success(), "survivor: {:?}", st[0]);
    assert!(!st[1].success(), "the killed rank: {:?}", st[1]);
}

/// A rank that aborts its communicator but lives on: the other's receive fails at once
/// (the aborting side closes its liveness connections), it does not wait for the timeout.
#[test]
fn aborted_peer_fails_operations() {
    let name = "aborted_peer_fails_operations";
    if let Some(rank) = my_rank() {
        let comm = ferrocomm::init().expect("init");
        comm.barrier().unwrap();
        if rank == 1 {
            comm.abort("test: giving up");
            std::thread::sleep(Duration::from_secs(5));
            return;
        }
        let start = Instant::now();
        let mut buf = [0u8; 4];
        let err = comm
            .recv_timeout(&mut buf, 1, 3u32, Some(Duration::from_secs(60)))
            .expect_err("the peer gave up");
        assert!(matches!(err, Error::PeerLost { peer: 1, .. }), "{err:?}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
        return;
    }
    if device().is_none() {
        return;
    }
    let st = spawn_world(name, 2, &[]);
    assert!(st.iter().all(ExitStatus::success), "{st:?}");
}

/// A rank that finishes normally says goodbye: the other's receive fails as "closed".
#[test]
fn closed_peer_is_not_a_crash() {
    let name = "closed_peer_is_not_a_crash";
    if let Some(rank) = my_rank() {
        let comm = ferrocomm::init().expect("init");
        comm.barrier().unwrap();
        if rank == 1 {
            drop(comm);
            return;
        }
        let mut buf = [0u8; 4];
        let err = comm
            .recv_timeout(&mut buf, 1, 3u32, Some(Duration::from_secs(60)))
            .expect_err("the peer left");
        assert!(err.to_string().contains("closed"), "{err}");
        return;
    }
    if device().is_none() {
        return;
    }
    let st = spawn_world(name, 2, &[]);
    assert!(st.iter().all(ExitStatus::success), "{st:?}");
}

/// `auto` between ranks of one host uses shared memory (verbs is for other hosts, unless
/// forced), even with a device; so does `auto` when the named device does not exist.
#[test]
fn auto_picks_shared_memory_on_one_host_with_or_without_a_device() {
    fn ping(c: &Communicator) {
        let mut x = [c.rank() as u32];
        let other = 1 - c.rank();
        c.sendrecv(&[c.rank() as u32], other, 1, &mut x, other, 1u32)
            .unwrap();
        assert_eq!(x[0] as usize, other);
    }
    world_over(
        "auto_picks_shared_memory_on_one_host_with_or_without_a_device",
        2,
        &[("FERROCOMM_TRANSPORT", "auto")],
        "shm",
        ping,
    );
    world_over(
        "auto_picks_shared_memory_on_one_host_with_or_without_a_device",
        2,
        &[
            ("FERROCOMM_TRANSPORT", "auto"),
            ("FERROCOMM_IB_DEVICE", "nosuch0"),
        ],
        "shm",
        ping,
    );
}

/// Forcing verbs with a device that does not exist is an error that names it.
#[test]
fn forced_verbs_without_the_device_is_an_error() {
    if my_rank().is_some() {
        let Err(err) = ferrocomm::init() else {
            panic!("no device: init must fail");
        };
        let text = err.to_string();
        assert!(matches!(err, Error::Config { .. }), "{err:?}");
        assert!(
            text.contains("nosuch0") && text.contains("ibverbs"),
            "{text}"
        );
        return;
    }
    if device().is_none() {
        return;
    }
    let st = spawn_world(
        "forced_verbs_without_the_device_is_an_error",
        1,
        &[("FERROCOMM_IB_DEVICE", "nosuch0")],
    );
    assert!(st[0].success(), "{st:?}");
}

/// A rank blocked in a receive sleeps (completion channel) instead of spinning: over 3 s
/// of waiting it uses far less than 3 s of CPU.
#[test]
fn idle_wait_sleeps() {
    world("idle_wait_sleeps", 2, &[], |c| {
        let mut x = [0u8; 8];
        if c.rank() == 0 {
            let cpu = || {
                // SAFETY: getrusage fills the zeroed struct we pass.
                let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
                // SAFETY: ru is a valid, writable rusage.
                unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
                let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
                t(ru.ru_utime) + t(ru.ru_stime)
            };
            let (before, start) = (cpu(), Instant::now());
            c.recv(&mut x, 1, 5u32).unwrap();
            let (used, waited) = (cpu() - before, start.elapsed());
            eprintln!("waited {waited:.2?}, used {used:.3} s of CPU");
            assert!(waited >= Duration::from_secs(2), "{waited:?}");
            assert!(
                used < waited.as_secs_f64() / 2.0,
                "{used} s of CPU in {waited:?}"
            );
        } else {
            std::thread::sleep(Duration::from_secs(3));
            c.send(&x, 0, 5).unwrap();
        }
    });
}

/// The verbs wrapper alone: two queue pairs of one device connected to each other; send,
/// RDMA write with immediate, RDMA read, and a write with a wrong key failing with a
/// status that says so.
#[test]
fn verbs_wrapper_loopback() {
    if my_rank().is_some() {
        return;
    }
    let Some((dev, gid)) = device() else { return };
    let gid: u8 = gid.parse().expect("RXE_GID_INDEX");
    let list = verbs::DeviceList::new().unwrap();
    let i = (0..list.len())
        .find(|&i| list.name(i) == dev)
        .expect("device listed");
    let ctx = list.open(i).unwrap();
    drop(list);
    let port = ctx.query_port(1).unwrap();
    assert!(port.active);
    let my_gid = ctx.query_gid(1, gid).unwrap();
    let pd = ctx.alloc_pd().unwrap();
    let chan = ctx.comp_channel().unwrap();
    let cq = ctx.create_cq(64, Some(&chan)).unwrap();
    let caps = verbs::QpCaps {
        send_wr: 16,
        recv_wr: 16,
        max_inline: 64,
    };
    let a = verbs::Qp::new_rc(&pd, &cq, &cq, caps, 1, gid, 100).unwrap();
    let b = verbs::Qp::new_rc(&pd, &cq, &cq, caps, 1, gid, 200).unwrap();
    let remote = |q: &verbs::Qp| verbs::Remote {
        qpn: q.qpn(),
        psn: q.psn(),
        lid: port.lid,
        gid: my_gid,
        global: true,
        mtu: port.active_mtu,
    };
    let all = verbs::access::LOCAL_WRITE | verbs::access::REMOTE_WRITE | verbs::access::REMOTE_READ;
    let abuf = pd.alloc_registered(4096, all).unwrap();
    let bbuf = pd.alloc_registered(4096, all).unwrap();
    // SAFETY: no request uses the buffers while they are filled.
    unsafe {
        abuf.slice_mut(0, 4096).copy_from_slice(&pattern(4096, 1));
        bbuf.slice_mut(0, 4096).fill(0);
    }
    // SAFETY: bbuf outlives the queue pairs' use of it (completions are polled below).
    unsafe {
        b.post_recv(1, bbuf.sge(0, 1024)).unwrap();
        b.post_recv(2, bbuf.sge(3072, 16)).unwrap();
    }
    a.connect(&remote(&b)).unwrap();
    b.connect(&remote(&a)).unwrap();
    let wait = |n: usize| -> Vec<verbs::Wc> {
        let mut out = Vec::new();
        let t = Instant::now();
        while out.len() < n {
            cq.poll(&mut out, 32).unwrap();
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "completions: {out:?}"
            );
        }
        out
    };
    // SAFETY: abuf/bbuf are registered and live until the completions are polled.
    unsafe {
        a.post_send(10, &[abuf.sge(0, 100)], verbs::SendOp::Send, false)
            .unwrap();
    }
    let wcs = wait(2);
    assert!(wcs.iter().all(verbs::Wc::ok), "{wcs:?}");
    let r = wcs
        .iter()
        .find(|w| w.wr_id == 1)
        .expect("receive completion");
    assert_eq!(r.byte_len, 100);
    // SAFETY: the receive completed; nothing writes bbuf now.
    assert_eq!(unsafe { bbuf.slice(0, 100) }, &pattern(4096, 1)[..100]);
    // RDMA write with immediate into bbuf[1024..2048].
    // SAFETY: abuf is registered and live; the target range of bbuf was granted (its rkey)
    // and nothing else uses it until the completion is polled.
    unsafe {
        a.post_send(
            11,
            &[abuf.sge(0, 1024)],
            verbs::SendOp::WriteImm {
                addr: bbuf.ptr() as u64 + 1024,
                rkey: bbuf.mr().rkey(),
                imm: 0xfeed_beef,
            },
            false,
        )
        .unwrap();
    }
    let wcs = wait(2);
    let r = wcs.iter().find(|w| w.wr_id == 2).expect("imm completion");
    assert!(
        r.ok() && r.is_write_imm() && r.imm == Some(0xfeed_beef),
        "{r:?}"
    );
    // SAFETY: the write completed; nothing writes bbuf now.
    assert_eq!(unsafe { bbuf.slice(1024, 1024) }, &pattern(4096, 1)[..1024]);
    // RDMA read of bbuf[1024..1536] into abuf[2048..].
    // SAFETY: abuf[2048..2560] is registered and unused until the read completes.
    unsafe {
        a.post_send(
            12,
            &[abuf.sge(2048, 512)],
            verbs::SendOp::Read {
                addr: bbuf.ptr() as u64 + 1024,
                rkey: bbuf.mr().rkey(),
            },
            false,
        )
        .unwrap();
    }
    let wcs = wait(1);
    assert!(wcs[0].ok(), "{wcs:?}");
    // SAFETY: the read completed; nothing writes abuf now.
    assert_eq!(unsafe { abuf.slice(2048, 512) }, &pattern(4096, 1)[..512]);
    // A write with a key nobody granted: a remote access error, by name.
    // SAFETY: abuf is registered and live; a wrong rkey makes the peer refuse the write.
    unsafe {
        a.post_send(
            13,
            &[abuf.sge(0, 8)],
            verbs::SendOp::Write {
                addr: bbuf.ptr() as u64,
                rkey: bbuf.mr().rkey() ^ 0x5a5a_0000,
            },
            false,
        )
        .unwrap();
    }
    let wcs = wait(1);
    assert!(!wcs[0].ok(), "{wcs:?}");
    let text = wcs[0].describe();
    eprintln!("bad key: {text}");
    assert!(text.contains("error"), "{text}");
    // The queue pair is now in the error state: another request is flushed, not lost.
    // SAFETY: abuf is registered and live; the request is flushed, never executed.
    unsafe {
        a.post_send(14, &[abuf.sge(0, 8)], verbs::SendOp::Send, false)
            .unwrap();
    }
    let wcs = wait(1);
    assert!(wcs[0].flushed(), "{wcs:?}");
    assert!(
        verbs::status_str(wcs[0].status)
            .to_lowercase()
            .contains("flush"),
        "{}",
        wcs[0].describe()
    );
}
