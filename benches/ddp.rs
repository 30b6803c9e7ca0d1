//! One data-parallel training step on 2 ranks (threads over TCP loopback): a model of 100
//! gradient tensors, a simulated backward pass (busy compute proportional to each tensor's
//! size, last tensor first), and the gradients averaged in one of four ways:
//!
//! - `bucketed`: the [`Reducer`] with PyTorch's defaults (25 MiB buckets, 1 MiB first);
//!   each bucket's all_reduce starts as soon as it is complete and overlaps the rest of
//!   backward. Gradients are written straight into bucket memory (`grad_mut`).
//! - `per_param_async`: the reducer with 0 MiB buckets: one asynchronous all_reduce per
//!   tensor, still overlapping backward.
//! - `per_param_blocking`: one blocking all_reduce per tensor right after it is computed.
//! - `at_end`: every gradient computed into one flat buffer, one all_reduce after backward.
//! - `compute_only`: the backward alone (the floor for any overlap).
//!
//! Two kinds of backward (`DDP_BENCH_COMPUTE`, default both):
//!
//! - `cpu`: the backward computes on the rank's thread. With 2 ranks on a 2-core machine
//!   both cores are then busy computing, and TCP loopback needs CPU too: overlap has no
//!   idle core to use, so it cannot pay there (it does on machines with cores to spare).
//! - `device`: the backward runs "on an accelerator": the rank's thread writes the gradient
//!   and then sleeps for the kernel's time (`DEVICE_NS_PER_ELEMENT` per element), as a
//!   training loop waits on GPU kernels. This is the case DDP's overlap is built for.
//!
//! ```text
//! cargo bench --bench ddp
//! DDP_BENCH_MB=100 cargo bench --bench ddp     # model size in MB (default: 8 and 40)
//! DDP_BENCH_COMPUTE=device cargo bench --bench ddp
//! ```

use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use ferrocomm::ddp::{ParamSpec, Reducer, ReducerOptions};
use ferrocomm::{Communicator, ReduceOp};

const TENSORS: usize = 100;
/// Arithmetic per gradient element of the simulated backward.
const WORK: usize = 6;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Bucketed,
    PerParamAsync,
    PerParamBlocking,
    AtEnd,
    ComputeOnly,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Bucketed => "bucketed",
            Mode::PerParamAsync => "per_param_async",
            Mode::PerParamBlocking => "per_param_blocking",
            Mode::AtEnd => "at_end",
            Mode::ComputeOnly => "compute_only",
        }
    }
}

/// Tensor sizes in elements: uneven (as in real models), `total_mb` MB of f32 in all.
fn sizes(total_mb: usize) -> Vec<usize> {
    let weights: Vec<usize> = (0..TENSORS).map(|i| 1 + (i * 7) % 13).collect();
    let sum: usize = weights.iter().sum();
    let total = total_mb * 1_000_000 / 4;
    weights.iter().map(|w| w * total / sum).collect()
}

/// Simulated kernel time per gradient element of the `device` backward (about 1 ms per
/// million elements).
const DEVICE_NS_PER_ELEMENT: u64 = 1;

/// Where the simulated backward runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Compute {
    Cpu,
    Device,
}

thread_local! {
    /// Kernel time owed but not slept yet (sleeping per small tensor would cost more than
    /// the kernel).
    static DEBT_NS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static KIND: std::cell::Cell<Compute> = const { std::cell::Cell::new(Compute::Cpu) };
}

/// The simulated backward of tensor `p`: `WORK` dependent operations per element on the
/// CPU, or a write plus the kernel's time asleep on the "device".
fn compute(out: &mut [f32], p: usize, step: u64) {
    if KIND.get() == Compute::Device {
        out.fill(p as f32 * 0.001 + step as f32 * 1e-6);
        let debt = DEBT_NS.get() + out.len() as u64 * DEVICE_NS_PER_ELEMENT;
        if debt >= 200_000 {
            std::thread::sleep(Duration::from_nanos(debt));
            DEBT_NS.set(0);
        } else {
            DEBT_NS.set(debt);
        }
        return;
    }
    let seed = (p as f32) * 0.001 + step as f32 * 1e-6;
    for (j, g) in out.iter_mut().enumerate() {
        let mut x = seed + j as f32 * 1e-7;
        for _ in 0..WORK {
            x = x * 0.999_9 + 0.000_1;
        }
        *g = x;
    }
}

/// One rank's state for a mode.
struct Rank {
    comm: Communicator,
    mode: Mode,
    sizes: Vec<usize>,
    reducer: Option<Reducer>,
    grads: Vec<Vec<f32>>,
    flat: Vec<f32>,
    step: u64,
}

impl Rank {
    fn new(comm: Communicator, mode: Mode, sizes: &[usize]) -> Rank {
        let specs: Vec<ParamSpec> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| ParamSpec::of::<f32>(format!("p{i}"), &[n]))
            .collect();
        let reducer = match mode {
            Mode::Bucketed => Some(ReducerOptions::default()),
            Mode::PerParamAsync => Some(
                ReducerOptions::default()
                    .bucket_cap_mb(0.0)
                    .first_bucket_mb(0.0),
            ),
            _ => None,
        }
        .map(|o| Reducer::new(&comm, specs, o).expect("reducer"));
        Rank {
            mode,
            reducer,
            grads: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            flat: vec![0.0; sizes.iter().sum()],
            sizes: sizes.to_vec(),
            comm,
            step: 0,
        }
    }

    fn step(&mut self) {
        self.step += 1;
        let n = self.sizes.len();
        match self.mode {
            Mode::Bucketed | Mode::PerParamAsync => {
                let r = self.reducer.as_mut().expect("reducer");
                for p in (0..n).rev() {
                    compute(r.grad_mut::<f32>(p).expect("slot"), p, self.step);
                    r.mark_ready_in_place(p).expect("mark");
                }
                r.finish().expect("finish");
            }
            Mode::PerParamBlocking => {
                for p in (0..n).rev() {
                    compute(&mut self.grads[p], p, self.step);
                    self.comm
                        .all_reduce(&mut self.grads[p], ReduceOp::Avg)
                        .expect("all_reduce");
                }
            }
            Mode::AtEnd => {
                let mut end = self.flat.len();
                for p in (0..n).rev() {
                    let start = end - self.sizes[p];
                    compute(&mut self.flat[start..end], p, self.step);
                    end = start;
                }
                self.comm
                    .all_reduce(&mut self.flat, ReduceOp::Avg)
                    .expect("all_reduce");
            }
            Mode::ComputeOnly => {
                for p in (0..n).rev() {
                    compute(&mut self.grads[p], p, self.step);
                }
            }
        }
    }
}

fn bench_ddp(c: &mut Criterion) {
    let models: Vec<usize> = match std::env::var("DDP_BENCH_MB") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => vec![8, 40],
    };
    let kinds: Vec<Compute> = match std::env::var("DDP_BENCH_COMPUTE").as_deref() {
        Ok("cpu") => vec![Compute::Cpu],
        Ok("device") => vec![Compute::Device],
        _ => vec![Compute::Cpu, Compute::Device],
    };
    for (mb, kind) in models
        .iter()
        .flat_map(|&mb| kinds.iter().map(move |&k| (mb, k)))
    {
        let sizes = sizes(mb);
        let label = if kind == Compute::Cpu {
            "cpu"
        } else {
            "device"
        };
        let mut g = c.benchmark_group(format!("ddp_step_{mb}MB_2ranks_tcp_{label}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        for mode in [
            Mode::Bucketed,
            Mode::PerParamAsync,
            Mode::PerParamBlocking,
            Mode::AtEnd,
            Mode::ComputeOnly,
        ] {
            let mut comms = Communicator::tcp_loopback_world(2).expect("loopback world");
            let c1 = comms.pop().expect("rank 1");
            let c0 = comms.pop().expect("rank 0");
            let (go, go_rx) = mpsc::channel::<u64>();
            let (done, done_rx) = mpsc::channel::<()>();
            let s1 = sizes.clone();
            KIND.set(kind);
            let peer = std::thread::spawn(move || {
                KIND.set(kind);
                let mut r = Rank::new(c1, mode, &s1);
                while let Ok(iters) = go_rx.recv() {
                    for _ in 0..iters {
                        r.step();
                    }
                    let _ = done.send(());
                }
            });
            let mut r0 = Rank::new(c0, mode, &sizes);
            g.bench_function(mode.name(), |b| {
                b.iter_custom(|iters| {
                    go.send(iters).expect("peer alive");
                    let t = Instant::now();
                    for _ in 0..iters {
                        r0.step();
                    }
                    let e = t.elapsed();
                    done_rx.recv().expect("peer done");
                    e
                })
            });
            drop(go);
            peer.join().expect("peer thread");
        }
        g.finish();
    }
}

criterion_group!(benches, bench_ddp);
criterion_main!(benches);
