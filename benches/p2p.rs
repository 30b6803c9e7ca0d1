//! Point-to-point latency and streaming bandwidth, ranks as threads, per transport.
//!
//! `cargo bench --bench p2p` (add `-- tcp/latency` to filter). Latency is the half round trip
//! of a ping-pong; bandwidth streams a window of 64 non-blocking sends and waits for one
//! acknowledgement; bibw streams a window both ways at once (throughput counts both
//! directions). The same operations as `ferrocomm-bench latency|bandwidth|bibw`. For processes on separate cores and a comparison with Open MPI/MPICH,
//! use `ferrocomm-bench` and `scripts/bench-compare`.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferrocomm::Communicator;

const WINDOW: usize = 64;
const CTRL: u32 = 1;
const DATA: u32 = 2;
const ACK: u32 = 3;

/// Rank 1's side: obeys commands from rank 0 until told to stop.
fn responder(c: Communicator) {
    let mut cmd = [0u64; 3];
    let mut buf = Vec::new();
    loop {
        c.recv(&mut cmd, 0, CTRL).expect("command");
        let [kind, iters, size] = cmd;
        buf.resize(size as usize, 0u8);
        match kind {
            0 => return,
            3 => {
                let out = vec![7u8; size as usize];
                let mut window: Vec<Vec<u8>> = vec![vec![0u8; size as usize]; WINDOW];
                for _ in 0..iters {
                    exchange_window(&c, 0, &out, &mut window);
                }
            }
            1 => {
                for _ in 0..iters {
                    c.recv(&mut buf, 0, DATA).expect("ping");
                    c.send(&buf, 0, DATA).expect("pong");
                }
            }
            _ => {
                let mut window: Vec<Vec<u8>> = vec![vec![0u8; size as usize]; WINDOW];
                for _ in 0..iters {
                    c.scope(|s| {
                        let reqs = window
                            .iter_mut()
                            .map(|b| s.irecv(b, 0, DATA).expect("irecv"))
                            .collect();
                        s.wait_all(reqs).expect("window");
                    });
                    c.send(&[1u8], 0, ACK).expect("ack");
                }
            }
        }
    }
}

/// One window of `bibw`: `WINDOW` receives from and `WINDOW` sends of `out` to `peer`.
fn exchange_window(c: &Communicator, peer: usize, out: &[u8], window: &mut [Vec<u8>]) {
    c.scope(|s| {
        let mut reqs = Vec::with_capacity(2 * WINDOW);
        for b in window.iter_mut() {
            reqs.push(s.irecv(b.as_mut_slice(), peer, DATA).expect("irecv"));
        }
        for _ in 0..WINDOW {
            reqs.push(s.isend(out, peer, DATA).expect("isend"));
        }
        s.wait_all(reqs).expect("window");
    });
}

fn world(transport: &str) -> Vec<Communicator> {
    match transport {
        "tcp" => Communicator::tcp_loopback_world(2).expect("tcp world"),
        _ => Communicator::local_world(2),
    }
}

fn bench_transport(cr: &mut Criterion, transport: &str) {
    let mut comms = world(transport);
    let peer = comms.pop().expect("rank 1");
    let c = comms.pop().expect("rank 0");
    let handle = std::thread::spawn(move || responder(peer));

    let mut g = cr.benchmark_group(format!("{transport}/latency"));
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for size in [8usize, 1024, 64 << 10, 1 << 20, 4 << 20] {
        let mut buf = vec![0u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter_custom(|iters| {
                c.send(&[1u64, iters, size as u64], 1, CTRL)
                    .expect("command");
                let t = Instant::now();
                for _ in 0..iters {
                    c.send(&buf, 1, DATA).expect("ping");
                    c.recv(&mut buf, 1, DATA).expect("pong");
                }
                // Half the round trip per iteration.
                t.elapsed() / 2
            })
        });
    }
    g.finish();

    let mut g = cr.benchmark_group(format!("{transport}/bandwidth"));
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for size in [64usize << 10, 1 << 20, 4 << 20] {
        let window: Vec<Vec<u8>> = vec![vec![7u8; size]; WINDOW];
        g.throughput(Throughput::Bytes((size * WINDOW) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter_custom(|iters| {
                c.send(&[2u64, iters, size as u64], 1, CTRL)
                    .expect("command");
                let t = Instant::now();
                let mut ack = [0u8];
                for _ in 0..iters {
                    c.scope(|s| {
                        let reqs = window
                            .iter()
                            .map(|b| s.isend(b, 1, DATA).expect("isend"))
                            .collect();
                        s.wait_all(reqs).expect("window");
                    });
                    c.recv(&mut ack, 1, ACK).expect("ack");
                }
                t.elapsed()
            })
        });
    }
    g.finish();

    let mut g = cr.benchmark_group(format!("{transport}/bibw"));
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    for size in [64usize << 10, 1 << 20] {
        let out = vec![7u8; size];
        let mut window: Vec<Vec<u8>> = vec![vec![0u8; size]; WINDOW];
        g.throughput(Throughput::Bytes((2 * size * WINDOW) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter_custom(|iters| {
                c.send(&[3u64, iters, size as u64], 1, CTRL)
                    .expect("command");
                let t = Instant::now();
                for _ in 0..iters {
                    exchange_window(&c, 1, &out, &mut window);
                }
                t.elapsed()
            })
        });
    }
    g.finish();

    c.send(&[0u64, 0, 0], 1, CTRL).expect("stop");
    handle.join().expect("responder");
}

fn p2p(cr: &mut Criterion) {
    bench_transport(cr, "tcp");
    bench_transport(cr, "local");
}

criterion_group!(benches, p2p);
criterion_main!(benches);
