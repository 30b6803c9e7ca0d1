//! Point-to-point semantics, the same suite over the in-process transport, over TCP on
//! loopback and over shared memory (ranks as threads in all three).

use std::time::Duration;

use std::cell::Cell;

use ferrocomm::{Communicator, Error, Source, Tag};

thread_local! {
    static TRANSPORT: Cell<&'static str> = const { Cell::new("local") };
}

/// Runs `f` on every rank of a world of `n` ranks on the transport the test binary was
/// parameterised with; panics propagate.
fn run<F>(n: usize, f: F)
where
    F: Fn(Communicator) + Send + Sync,
{
    let comms = match TRANSPORT.with(|t| t.get()) {
        "tcp" => Communicator::tcp_loopback_world(n).expect("tcp world"),
        "shm" => Communicator::shm_world(n).expect("shm world"),
        _ => Communicator::local_world(n),
    };
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = comms.into_iter().map(|c| s.spawn(move || f(c))).collect();
        for h in handles {
            h.join().expect("rank panicked");
        }
    });
}

fn ring_pass_of_a_token() {
    for n in [1, 2, 3, 8, 17] {
        run(n, |c| {
            let (me, n) = (c.rank(), c.size());
            let mut token = [0u64];
            if me == 0 {
                token[0] = 1;
                if n > 1 {
                    c.send(&token, 1, 5).unwrap();
                    c.recv(&mut token, n - 1, 5u32).unwrap();
                }
                assert_eq!(token[0], n as u64);
            } else {
                let st = c.recv(&mut token, me - 1, 5u32).unwrap();
                assert_eq!((st.source, st.tag, st.bytes), (me - 1, 5, 8));
                token[0] += 1;
                c.send(&token, (me + 1) % n, 5).unwrap();
            }
        });
    }
}

fn same_tag_messages_stay_in_order_and_tags_select() {
    run(2, |c| {
        if c.rank() == 0 {
            for i in 0..100u32 {
                c.send(&[i], 1, 1).unwrap();
                c.send(&[1000 + i], 1, 2).unwrap();
            }
        } else {
            // Receive all of tag 2 first: tag 1's messages wait as unexpected.
            let mut x = [0u32];
            for i in 0..100 {
                c.recv(&mut x, 0, 2u32).unwrap();
                assert_eq!(x[0], 1000 + i);
            }
            for i in 0..100 {
                c.recv(&mut x, 0, 1u32).unwrap();
                assert_eq!(x[0], i);
            }
        }
    });
}

fn any_source_and_any_tag() {
    run(5, |c| {
        if c.rank() == 0 {
            let mut seen = [false; 5];
            for _ in 1..5 {
                let mut x = [0usize as u64];
                let st = c.recv(&mut x, Source::Any, Tag::Any).unwrap();
                assert_eq!(x[0] as usize, st.source);
                assert_eq!(st.tag as usize, 10 + st.source);
                assert!(!seen[st.source]);
                seen[st.source] = true;
            }
        } else {
            c.send(&[c.rank() as u64], 0, 10 + c.rank() as u32).unwrap();
        }
    });
}

fn zero_length_and_self_messages() {
    run(2, |c| {
        let me = c.rank();
        let mut empty: [f32; 0] = [];
        c.sendrecv(&[] as &[f32], 1 - me, 3, &mut empty, 1 - me, 3u32)
            .unwrap();
        // A message to oneself is kept until received.
        c.send(&[7i16, 8], me, 9).unwrap();
        let mut got = [0i16; 4];
        let st = c.recv(&mut got, me, 9u32).unwrap();
        assert_eq!(st.count::<i16>(), 2);
        assert_eq!(&got[..2], &[7, 8]);
    });
}

fn typed_messages_of_every_element_type() {
    use half::{bf16, f16};
    run(2, |c| {
        if c.rank() == 0 {
            c.send(&[f16::from_f32(1.5), f16::from_f32(-2.0)], 1, 0)
                .unwrap();
            c.send(&[bf16::from_f32(3.0)], 1, 1).unwrap();
            c.send(&[i8::MIN, i8::MAX], 1, 2).unwrap();
            c.send(&[u64::MAX], 1, 3).unwrap();
            c.send(&[f64::MIN_POSITIVE], 1, 4).unwrap();
        } else {
            let mut a = [f16::ZERO; 2];
            c.recv(&mut a, 0, 0u32).unwrap();
            assert_eq!(a[0].to_f32(), 1.5);
            let mut b = [bf16::ZERO];
            c.recv(&mut b, 0, 1u32).unwrap();
            assert_eq!(b[0].to_f32(), 3.0);
            let mut d = [0i8; 2];
            c.recv(&mut d, 0, 2u32).unwrap();
            assert_eq!(d, [i8::MIN, i8::MAX]);
            let mut e = [0u64];
            c.recv(&mut e, 0, 3u32).unwrap();
            assert_eq!(e[0], u64::MAX);
            let mut f = [0f64];
            c.recv(&mut f, 0, 4u32).unwrap();
            assert_eq!(f[0], f64::MIN_POSITIVE);
        }
    });
}

fn too_small_buffer_and_bad_ranks_are_invalid_arguments() {
    run(2, |c| {
        if c.rank() == 0 {
            c.send(&[1u8; 10], 1, 0).unwrap();
            c.send(&[2u8; 3], 1, 0).unwrap();
        } else {
            let mut small = [0u8; 4];
            let err = c.recv(&mut small, 0, 0u32).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("4 bytes") && msg.contains("10"), "{msg}");
            // The communicator is still usable and the next message is intact.
            let st = c.recv(&mut small, 0, 0u32).unwrap();
            assert_eq!((st.bytes, small[..3].to_vec()), (3, vec![2, 2, 2]));
        }
        let err = c.send(&[1u8], 2, 0).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        let mut b = [0u8];
        assert!(matches!(
            c.recv(&mut b, 7, 0u32),
            Err(Error::InvalidArgument { .. })
        ));
        // A 3-byte message cannot fill whole u16s.
        if c.rank() == 0 {
            c.send(&[1u8; 3], 1, 4).unwrap();
        } else {
            let mut w = [0u16; 4];
            let err = c.recv(&mut w, 0, 4u32).unwrap_err();
            assert!(err.to_string().contains("whole number"), "{err}");
        }
    });
}

fn nonblocking_requests_in_a_scope() {
    run(4, |c| {
        let (me, n) = (c.rank(), c.size());
        let send: Vec<Vec<u32>> = (0..n).map(|p| vec![(me * 100 + p) as u32; 1000]).collect();
        let mut recv: Vec<Vec<u32>> = vec![vec![0; 1000]; n];
        c.scope(|s| {
            let mut reqs = Vec::new();
            for (p, buf) in recv.iter_mut().enumerate() {
                reqs.push(s.irecv(buf, p, 7u32).unwrap());
            }
            for (p, buf) in send.iter().enumerate() {
                reqs.push(s.isend(buf, p, 7).unwrap());
            }
            let st = s.wait_all(reqs).unwrap();
            assert_eq!(st.len(), 2 * n);
        });
        for (p, buf) in recv.iter().enumerate() {
            assert!(buf.iter().all(|&x| x == (p * 100 + me) as u32));
        }
    });
}

fn test_polls_and_dropped_receives_are_withdrawn() {
    run(2, |c| {
        if c.rank() == 1 {
            // A receive nobody matches, dropped: withdrawn, and the scope ends.
            let mut b = [0u8];
            c.scope(|s| {
                let r = s.irecv(&mut b, 0, 12345u32).unwrap();
                drop(r);
            });
            let mut buf = [0u32; 1];
            c.scope(|s| {
                let mut r = s.irecv(&mut buf, 0, 1u32).unwrap();
                // Nothing sent yet on tag 1 (rank 0 waits for our go).
                assert!(r.test().unwrap().is_none());
                c.send(&[1u8], 0, 99).unwrap();
                let st = r.wait().unwrap();
                assert_eq!(st.bytes, 4);
            });
            assert_eq!(buf[0], 42);
        } else {
            let mut go = [0u8];
            c.recv(&mut go, 1, 99u32).unwrap();
            c.send(&[42u32], 1, 1).unwrap();
        }
    });
}

fn recv_timeout_withdraws_and_keeps_the_communicator() {
    run(2, |c| {
        if c.rank() == 1 {
            let mut b = [0u8; 4];
            let err = c
                .recv_timeout(&mut b, 0, 1u32, Some(Duration::from_millis(50)))
                .unwrap_err();
            assert!(err.is_timeout(), "{err}");
            assert!(err.to_string().contains("recv from rank 0"), "{err}");
            c.send(&[1u8], 0, 2).unwrap();
            c.recv(&mut b, 0, 1u32).unwrap();
            assert_eq!(b, [5; 4]);
        } else {
            let mut go = [0u8];
            c.recv(&mut go, 1, 2u32).unwrap();
            c.send(&[5u8; 4], 1, 1).unwrap();
        }
    });
}

fn barrier_for_many_world_sizes() {
    for n in [1, 2, 3, 5, 8, 13, 33] {
        run(n, |c| {
            for _ in 0..3 {
                c.barrier().unwrap();
            }
        });
    }
}

#[test]
fn abort_unblocks_a_waiting_thread() {
    let mut comms = Communicator::local_world(2);
    let c1 = comms.pop().unwrap();
    let c0 = comms.pop().unwrap();
    let handle = c0.abort_handle();
    let t = std::thread::spawn(move || {
        let mut b = [0u8];
        c0.recv(&mut b, 1, 0u32)
    });
    std::thread::sleep(Duration::from_millis(50));
    handle.abort("test says stop");
    let err = t.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::Aborted(_)), "{err}");
    assert!(err.to_string().contains("test says stop"));
    drop(c1);
}

fn large_messages_posted_early_and_late() {
    let sizes = [0usize, 1, 65_535, 65_536, 65_537, 1 << 20, 8 << 20];
    run(2, |c| {
        let pattern = |n: usize, salt: usize| -> Vec<u8> {
            (0..n).map(|i| ((i * 31 + salt) % 251) as u8).collect()
        };
        if c.rank() == 0 {
            // Non-blocking: large messages wait for their receive (rendezvous), and rank 1
            // receives them in reverse order.
            let first: Vec<Vec<u8>> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| pattern(n, i))
                .collect();
            c.scope(|s| {
                let reqs = first
                    .iter()
                    .enumerate()
                    .map(|(i, m)| s.isend(m, 1, i as u32).unwrap())
                    .collect();
                s.wait_all(reqs).unwrap();
            });
            // Second round: rank 1 has posted first (it tells us when).
            let mut go = [0u8];
            c.recv(&mut go, 1, 1000u32).unwrap();
            for (i, &n) in sizes.iter().enumerate() {
                c.send(&pattern(n, i + 7), 1, 100 + i as u32).unwrap();
            }
        } else {
            // Receive the first round in reverse tag order: everything arrives unexpected.
            for (i, &n) in sizes.iter().enumerate().rev() {
                let mut buf = vec![0u8; n + 3];
                let st = c.recv(&mut buf, 0, i as u32).unwrap();
                assert_eq!(st.bytes, n);
                assert!(buf[..n] == pattern(n, i)[..], "size {n}");
            }
            let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
            c.scope(|s| {
                let reqs: Vec<_> = bufs
                    .iter_mut()
                    .enumerate()
                    .map(|(i, b)| s.irecv(b, 0, 100 + i as u32).unwrap())
                    .collect();
                c.send(&[1u8], 0, 1000).unwrap();
                s.wait_all(reqs).unwrap();
            });
            for (i, b) in bufs.iter().enumerate() {
                assert!(b[..] == pattern(sizes[i], i + 7)[..], "size {}", sizes[i]);
            }
        }
    });
}

fn large_message_into_too_small_buffer() {
    run(2, |c| {
        if c.rank() == 0 {
            c.send(&vec![9u8; 1 << 20], 1, 0).unwrap();
            c.send(&vec![8u8; 1 << 20], 1, 0).unwrap();
        } else {
            let mut small = vec![0u8; 1000];
            let err = c.recv(&mut small, 0, 0u32).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
            let mut big = vec![0u8; 1 << 20];
            c.recv(&mut big, 0, 0u32).unwrap();
            assert!(big.iter().all(|&b| b == 8));
        }
    });
}

fn bidirectional_streams_at_once() {
    run(2, |c| {
        let peer = 1 - c.rank();
        let out: Vec<u32> = (0..(4 << 20) / 4)
            .map(|i| i as u32 ^ c.rank() as u32)
            .collect();
        let mut inp = vec![0u32; out.len()];
        for _ in 0..3 {
            c.sendrecv(&out, peer, 1, &mut inp, peer, 1u32).unwrap();
            assert!(
                inp.iter()
                    .enumerate()
                    .all(|(i, &x)| x == i as u32 ^ peer as u32)
            );
        }
    });
}

/// Windows of eager messages in both directions at once (the pattern of osu_bibw): the
/// receives of a window are posted while the peer's previous messages may still be arriving
/// as unexpected ones, half read. Every message must reach the receive that was posted for
/// it, in order, and no receive may be left waiting (a hang fails after the watchdog's
/// limit, by aborting the communicators).
fn windows_of_eager_messages_both_ways() {
    const WINDOW: usize = 64;
    const LEN: usize = (48 << 10) / 4;
    let comms = match TRANSPORT.with(|t| t.get()) {
        "tcp" => Communicator::tcp_loopback_world(2).expect("tcp world"),
        _ => Communicator::local_world(2),
    };
    let aborts: Vec<_> = comms.iter().map(Communicator::abort_handle).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        for c in comms {
            let tx = tx.clone();
            s.spawn(move || {
                let (me, peer) = (c.rank(), 1 - c.rank());
                let r = (|| -> ferrocomm::Result<()> {
                    for round in 0..40u32 {
                        let outs: Vec<Vec<u32>> = (0..WINDOW as u32)
                            .map(|i| vec![(round << 16) | (i << 1) | me as u32; LEN])
                            .collect();
                        let mut ins = vec![vec![0u32; LEN]; WINDOW];
                        c.scope(|s| {
                            let mut reqs = Vec::new();
                            for b in ins.iter_mut() {
                                reqs.push(s.irecv(b.as_mut_slice(), peer, 3u32)?);
                            }
                            for o in &outs {
                                reqs.push(s.isend(o.as_slice(), peer, 3)?);
                            }
                            s.wait_all(reqs).map(|_| ())
                        })?;
                        for (i, b) in ins.iter().enumerate() {
                            let want = (round << 16) | ((i as u32) << 1) | peer as u32;
                            assert!(
                                b.iter().all(|&x| x == want),
                                "rank {me} round {round}: receive {i} got {:#x}, expected {want:#x}",
                                b[0]
                            );
                        }
                    }
                    c.barrier()
                })();
                let _ = tx.send(r);
            });
        }
        drop(tx);
        for _ in 0..2 {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(r) => r.expect("rank failed"),
                Err(_) => {
                    for a in &aborts {
                        a.abort("test watchdog: the ranks did not finish in 120 s");
                    }
                    panic!("windows of eager messages hung (aborted after 120 s)");
                }
            }
        }
    });
}

macro_rules! per_transport {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[test] fn $name() { super::TRANSPORT.with(|t| t.set("local")); super::$name() })*
        }
        mod tcp {
            $(#[test] fn $name() { super::TRANSPORT.with(|t| t.set("tcp")); super::$name() })*
        }
        mod shm {
            $(#[test] fn $name() { super::TRANSPORT.with(|t| t.set("shm")); super::$name() })*
        }
    };
}

per_transport!(
    large_messages_posted_early_and_late,
    large_message_into_too_small_buffer,
    bidirectional_streams_at_once,
    windows_of_eager_messages_both_ways,
    ring_pass_of_a_token,
    same_tag_messages_stay_in_order_and_tags_select,
    any_source_and_any_tag,
    zero_length_and_self_messages,
    typed_messages_of_every_element_type,
    too_small_buffer_and_bad_ranks_are_invalid_arguments,
    nonblocking_requests_in_a_scope,
    test_polls_and_dropped_receives_are_withdrawn,
    recv_timeout_withdraws_and_keeps_the_communicator,
    barrier_for_many_world_sizes,
);

#[test]
fn dup_separates_traffic_and_threads() {
    run(3, |c| {
        let d = c.dup();
        let (me, n) = (c.rank(), c.size());
        // The same tag on both communicators: each receive sees only its own message.
        c.send(&[1u32], (me + 1) % n, 0).unwrap();
        d.send(&[2u32], (me + 1) % n, 0).unwrap();
        let mut x = [0u32];
        d.recv(&mut x, (me + n - 1) % n, 0u32).unwrap();
        assert_eq!(x[0], 2);
        c.recv(&mut x, (me + n - 1) % n, 0u32).unwrap();
        assert_eq!(x[0], 1);
        // A second thread uses the dup while this one uses the original.
        std::thread::scope(|s| {
            s.spawn(move || {
                for _ in 0..50 {
                    d.barrier().unwrap();
                }
            });
            for _ in 0..50 {
                c.barrier().unwrap();
            }
        });
    });
}
