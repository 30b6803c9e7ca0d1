//! all_reduce per algorithm, ranks as threads, over the in-process transport and TCP on
//! loopback; and the reduction kernels alone.
//!
//! `cargo bench --bench collectives` (filter with e.g. `-- tcp/2/allreduce/ring`). The
//! throughput criterion prints for all_reduce is the *bus bandwidth* of nccl-tests,
//! `bytes / time · 2 (P - 1) / P`, so that figures for different rank counts compare. Rank
//! counts: `FERROCOMM_BENCH_RANKS` (comma-separated, default `2,4`). The kernels group
//! reports bytes of the accumulator per second.
//!
//! For processes on separate cores and a comparison with Open MPI and MPICH use the
//! `ferrocomm-bench` CLI.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ferrocomm::element::{Order, reduce_bytes};
use ferrocomm::{AllReduceAlgo, AllReduceOptions, Communicator, DType, ReduceOp};

const SIZES: [usize; 6] = [4, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20];
const ALGOS: [AllReduceAlgo; 4] = [
    AllReduceAlgo::Ring,
    AllReduceAlgo::HalvingDoubling,
    AllReduceAlgo::RecursiveDoubling,
    AllReduceAlgo::Auto,
];

/// What a helper rank is told to do.
enum Cmd {
    Run {
        algo: AllReduceAlgo,
        bytes: usize,
        iters: u64,
    },
    Stop,
}

fn all_reduce(c: &Communicator, v: &mut [f32], algo: AllReduceAlgo) {
    c.all_reduce_with(v, ReduceOp::Sum, &AllReduceOptions::algo(algo))
        .expect("all_reduce");
}

/// A helper rank: runs what rank 0 asks, in step with it.
fn helper(c: Communicator, rx: mpsc::Receiver<Cmd>) {
    while let Ok(Cmd::Run { algo, bytes, iters }) = rx.recv() {
        let mut v = vec![1.0f32; bytes / 4];
        c.barrier().expect("barrier");
        for _ in 0..iters {
            all_reduce(&c, &mut v, algo);
        }
    }
}

fn ranks() -> Vec<usize> {
    std::env::var("FERROCOMM_BENCH_RANKS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2, 4])
}

fn bench_world(cr: &mut Criterion, transport: &str, p: usize) {
    let comms = match transport {
        "tcp" => Communicator::tcp_loopback_world(p).expect("tcp world"),
        _ => Communicator::local_world(p),
    };
    let mut it = comms.into_iter();
    let c = it.next().expect("rank 0");
    let mut txs = Vec::new();
    let mut hs = Vec::new();
    for h in it {
        let (tx, rx) = mpsc::channel();
        txs.push(tx);
        hs.push(std::thread::spawn(move || helper(h, rx)));
    }
    for algo in ALGOS {
        let mut g = cr.benchmark_group(format!("{transport}/{p}/allreduce/{algo}"));
        g.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1500))
            .sample_size(10);
        for bytes in SIZES {
            let bus = (bytes as u64 * 2 * (p as u64 - 1)) / p as u64;
            g.throughput(Throughput::Bytes(bus.max(1)));
            g.bench_with_input(BenchmarkId::from_parameter(bytes), &bytes, |b, &bytes| {
                b.iter_custom(|iters| {
                    for tx in &txs {
                        tx.send(Cmd::Run { algo, bytes, iters }).expect("helper");
                    }
                    let mut v = vec![1.0f32; bytes / 4];
                    c.barrier().expect("barrier");
                    let t = Instant::now();
                    for _ in 0..iters {
                        all_reduce(&c, &mut v, algo);
                    }
                    t.elapsed()
                })
            });
        }
        g.finish();
    }
    for tx in &txs {
        let _ = tx.send(Cmd::Stop);
    }
    for h in hs {
        h.join().expect("helper");
    }
}

fn allreduce(cr: &mut Criterion) {
    for p in ranks() {
        bench_world(cr, "local", p);
        bench_world(cr, "tcp", p);
    }
}

fn kernels(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("kernels");
    g.warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(800));
    let bytes = 1 << 20;
    g.throughput(Throughput::Bytes(bytes as u64));
    let mut acc = vec![0u64; bytes / 8];
    let other = vec![0x3f80_0000_3f80_0000u64; bytes / 8];
    for (dtype, op) in [
        (DType::F32, ReduceOp::Sum),
        (DType::F32, ReduceOp::Max),
        (DType::F64, ReduceOp::Sum),
        (DType::F16, ReduceOp::Sum),
        (DType::BF16, ReduceOp::Sum),
        (DType::I32, ReduceOp::Sum),
        (DType::I64, ReduceOp::Prod),
        (DType::U8, ReduceOp::Min),
    ] {
        g.bench_function(format!("{dtype}/{op}"), |b| {
            let a: &mut [u8] = bytemuck::cast_slice_mut(&mut acc);
            let o: &[u8] = bytemuck::cast_slice(&other);
            b.iter(|| reduce_bytes(dtype, op, a, o, Order::TheirsFirst).expect("kernel"))
        });
    }
    g.finish();
}

criterion_group!(benches, kernels, allreduce);
criterion_main!(benches);
