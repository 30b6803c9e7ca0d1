//! Races in the progress engine that ordinary tests rarely hit, provoked on purpose.

use std::time::Duration;

use ferrocomm::Communicator;

/// A small (eager) message whose payload is still arriving when its receive is posted must
/// still be delivered to that receive. Many eager messages of the largest eager size are
/// streamed at a receiver that posts one receive at a time: with socket buffers full, the
/// receiver keeps seeing a header whose payload is only partly there when it posts the
/// next receive. (Before the fix, such a message was kept as unexpected when it completed,
/// next to the receive posted for it, and the receive waited forever.)
#[test]
fn a_receive_posted_while_its_eager_payload_arrives_gets_it() {
    for comms in [
        Communicator::tcp_loopback_world(2).expect("tcp world"),
        Communicator::local_world(2),
    ] {
        let n = 400usize;
        let size = 64 << 10;
        std::thread::scope(|s| {
            let mut it = comms.into_iter();
            let (c0, c1) = (it.next().expect("rank 0"), it.next().expect("rank 1"));
            s.spawn(move || {
                let msgs: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; size]).collect();
                c0.scope(|sc| {
                    let reqs = msgs
                        .iter()
                        .enumerate()
                        .map(|(i, m)| sc.isend(m, 1, i as u32).expect("isend"))
                        .collect();
                    sc.wait_all(reqs).expect("sends");
                });
                let mut done = [0u8];
                c0.recv(&mut done, 1, 9999u32).expect("done");
            });
            s.spawn(move || {
                let mut buf = vec![0u8; size];
                for i in 0..n {
                    let st = c1
                        .recv_timeout(&mut buf, 0, i as u32, Some(Duration::from_secs(20)))
                        .unwrap_or_else(|e| panic!("message {i}: {e}"));
                    assert_eq!(st.bytes, size);
                    assert!(buf.iter().all(|&b| b == i as u8), "message {i}");
                }
                c1.send(&[1u8], 0, 9999).expect("done");
            });
        });
    }
}
