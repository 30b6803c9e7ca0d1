//! The data-parallel layer: gradient reduction equals one process on the whole batch,
//! bucket plans, overlap, gradient accumulation, every error case, parameter broadcast,
//! checkpoint broadcast, and the `ddp_linear` example under `ferrorun` (replicas equal
//! after broadcast and after training; a resumed run ends bit-identical to an
//! uninterrupted one).
//!
//! Ranks are threads over the in-process transport (or TCP loopback), or processes under
//! `ferrorun` for the example. Every wait is bounded: a hang fails the test.

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/ddp_linear.rs"]
mod ddp_linear;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferrocomm::ddp::{
    BucketState, Checkpoint, CheckpointDir, DistributedSampler, ParamSpec, Reducer, ReducerOptions,
    broadcast_parameters,
};
use ferrocomm::{Communicator, DType, Error};
use half::{bf16, f16};

/// Far above what any test here needs.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs `f` on every rank of `comms` (one thread each) and returns the results in rank
/// order; fails the test if a rank panics or they take longer than [`LIMIT`].
fn on_ranks<R: Send + 'static>(
    comms: Vec<Communicator>,
    f: impl Fn(Communicator) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let n = comms.len();
    let (tx, rx) = mpsc::channel();
    for comm in comms {
        let (tx, f) = (tx.clone(), f.clone());
        std::thread::spawn(move || {
            let rank = comm.rank();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(comm)));
            let _ = tx.send((rank, r));
        });
    }
    let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
    let deadline = Instant::now() + LIMIT;
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((rank, Ok(r))) => out[rank] = Some(r),
            Ok((rank, Err(p))) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("rank {rank} panicked: {msg}");
            }
            Err(_) => panic!("ranks did not finish within {LIMIT:?}"),
        }
    }
    out.into_iter()
        .map(|r| r.expect("every rank reported"))
        .collect()
}

fn local(n: usize) -> Vec<Communicator> {
    Communicator::local_world(n)
}

fn tcp(n: usize) -> Vec<Communicator> {
    Communicator::tcp_loopback_world(n).expect("loopback world")
}

// ---------------------------------------------------------------------------------------
// A model with a closed-form gradient, for equivalence tests
// ---------------------------------------------------------------------------------------

/// Parameter shapes: several sizes, so small caps give several buckets.
fn model_specs() -> Vec<ParamSpec> {
    vec![
        ParamSpec::of::<f32>("embed.weight", &[40, 8]),
        ParamSpec::of::<f32>("fc1.weight", &[16, 8]),
        ParamSpec::of::<f32>("fc1.bias", &[16]),
        ParamSpec::of::<f32>("fc2.weight", &[300]),
        ParamSpec::of::<f32>("fc2.bias", &[3]),
        ParamSpec::of::<f32>("head.weight", &[7, 11]),
    ]
}

/// The target sample `i` sets for element `j` of parameter `p`.
fn target(i: usize, p: usize, j: usize) -> f32 {
    (i as f32 * 0.37 + p as f32 * 1.1 + j as f32 * 0.013).sin()
}

/// Gradient of `sum over the batch of 0.5 * |theta_p - target(i, p)|^2`, divided by
/// `scale` (the batch size for a mean loss, 1 for a sum).
fn grad_of(theta: &[f32], p: usize, batch: &[usize], scale: f32) -> Vec<f32> {
    (0..theta.len())
        .map(|j| {
            batch
                .iter()
                .map(|&i| theta[j] - target(i, p, j))
                .sum::<f32>()
                / scale
        })
        .collect()
}

fn init_params(specs: &[ParamSpec]) -> Vec<Vec<f32>> {
    specs
        .iter()
        .enumerate()
        .map(|(p, s)| (0..s.numel()).map(|j| (p * 7 + j) as f32 * 0.01).collect())
        .collect()
}

const SAMPLES: usize = 60;
const BATCH: usize = 3;
const STEPS: usize = 5;
const LR: f32 = 0.3;

/// Trains with `comm.size()` ranks: sampler shards, mean-loss gradients reduced by the
/// reducer, SGD. Returns the final parameters.
fn train_ddp(comm: Communicator, opts: ReducerOptions) -> Vec<Vec<f32>> {
    let specs = model_specs();
    let mut params = init_params(&specs);
    let mut reducer = Reducer::new(&comm, specs.clone(), opts).unwrap();
    let sampler = DistributedSampler::new(SAMPLES, comm.size(), comm.rank())
        .unwrap()
        .seed(5);
    let mine = sampler.indices();
    for step in 0..STEPS {
        let batch = &mine[step * BATCH..(step + 1) * BATCH];
        // Backward order: last parameter first.
        for p in (0..specs.len()).rev() {
            let g = grad_of(&params[p], p, batch, BATCH as f32);
            reducer.mark_ready(p, &g).unwrap();
        }
        reducer.finish().unwrap();
        for (p, theta) in params.iter_mut().enumerate() {
            for (w, g) in theta.iter_mut().zip(reducer.grad::<f32>(p).unwrap()) {
                *w -= LR * g;
            }
        }
    }
    params
}

/// The same training in one process on the concatenation of every rank's batches.
fn train_single(world: usize) -> Vec<Vec<f32>> {
    let specs = model_specs();
    let mut params = init_params(&specs);
    let shards: Vec<Vec<usize>> = (0..world)
        .map(|r| {
            DistributedSampler::new(SAMPLES, world, r)
                .unwrap()
                .seed(5)
                .indices()
        })
        .collect();
    for step in 0..STEPS {
        let big: Vec<usize> = shards
            .iter()
            .flat_map(|s| s[step * BATCH..(step + 1) * BATCH].iter().copied())
            .collect();
        for (p, theta) in params.iter_mut().enumerate() {
            let g = grad_of(theta, p, &big, big.len() as f32);
            for (w, g) in theta.iter_mut().zip(g) {
                *w -= LR * g;
            }
        }
    }
    params
}

fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32, what: &str) {
    for (p, (x, y)) in a.iter().zip(b).enumerate() {
        for (j, (u, v)) in x.iter().zip(y).enumerate() {
            assert!(
                (u - v).abs() <= tol * (1.0 + v.abs()),
                "{what}: parameter {p} element {j}: {u} vs {v}"
            );
        }
    }
}

fn small_buckets() -> ReducerOptions {
    // 1 KiB first bucket, 2 KiB others: several buckets for the model above.
    ReducerOptions::default()
        .first_bucket_mb(1.0 / 1024.0)
        .bucket_cap_mb(2.0 / 1024.0)
}

#[test]
fn world_of_w_equals_one_process_on_the_concatenated_batches() {
    for (world, transport) in [(2, "local"), (3, "local"), (4, "tcp")] {
        let comms = if transport == "tcp" {
            tcp(world)
        } else {
            local(world)
        };
        let results = on_ranks(comms, |c| train_ddp(c, small_buckets()));
        let reference = train_single(world);
        for (r, got) in results.iter().enumerate() {
            // Replicas are bit-identical, and equal to one process within float rounding.
            assert_eq!(
                got, &results[0],
                "rank {r} differs from rank 0 ({transport})"
            );
            assert_close(got, &reference, 1e-5, &format!("world {world} rank {r}"));
        }
    }
    // Default buckets (one bucket for this small model) give the same.
    let results = on_ranks(local(2), |c| train_ddp(c, ReducerOptions::default()));
    assert_close(&results[0], &train_single(2), 1e-5, "default buckets");
}

// ---------------------------------------------------------------------------------------
// Buckets
// ---------------------------------------------------------------------------------------

#[test]
fn buckets_respect_the_cap_and_reverse_order() {
    let mib = 1usize << 20;
    // 30 parameters of 3 MiB each, a few small ones, and a 30 MiB one; defaults (25 MiB
    // buckets, 1 MiB first bucket).
    let mut specs = vec![ParamSpec::of::<f32>("small.0", &[1000])];
    for i in 0..30 {
        specs.push(ParamSpec::of::<f32>(format!("p{i}"), &[3 * mib / 4]));
    }
    specs.push(ParamSpec::of::<f32>("big", &[30 * mib / 4]));
    specs.push(ParamSpec::of::<f32>("small.1", &[100]));
    specs.push(ParamSpec::of::<f32>("small.2", &[200]));
    let r = on_ranks(local(1), move |c| {
        let r = Reducer::new(&c, specs.clone(), ReducerOptions::default()).unwrap();
        let plans: Vec<(Vec<usize>, usize)> = r
            .buckets()
            .iter()
            .map(|b| (b.params.clone(), b.numel * 4))
            .collect();
        let slots: Vec<_> = (0..specs.len()).map(|i| r.slot(i).unwrap()).collect();
        (plans, slots, specs.len())
    });
    let (plans, slots, n) = &r[0];
    // Reverse registration order across and within buckets.
    let order: Vec<usize> = plans.iter().flat_map(|(p, _)| p.iter().copied()).collect();
    assert_eq!(order, (0..*n).rev().collect::<Vec<_>>());
    // First bucket: the two small ones (1.2 KB), closed before the 30 MiB parameter.
    assert_eq!(plans[0].0, vec![n - 1, n - 2]);
    assert!(plans[0].1 <= mib);
    // The 30 MiB parameter stands alone; the others are within 25 MiB (8 x 3 MiB).
    assert_eq!(plans[1].0, vec![n - 3]);
    for (params, bytes) in &plans[2..] {
        assert!(*bytes <= 25 * mib, "{params:?}: {bytes} bytes");
    }
    assert_eq!(plans[2].0.len(), 8);
    for (b, (params, _)) in plans.iter().enumerate() {
        let mut off = 0;
        for &p in params {
            assert_eq!((slots[p].bucket, slots[p].offset), (b, off));
            off += slots[p].len;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Overlap
// ---------------------------------------------------------------------------------------

#[test]
fn bucket_all_reduce_runs_before_the_last_gradient_is_marked() {
    let out = on_ranks(tcp(2), |c| {
        let n = 65_536; // 256 KiB per parameter: with 256 KiB caps, one bucket each
        let specs: Vec<ParamSpec> = (0..4)
            .map(|i| ParamSpec::of::<f32>(format!("layer{i}.weight"), &[n]))
            .collect();
        let opts = ReducerOptions::default()
            .first_bucket_mb(0.25)
            .bucket_cap_mb(0.25);
        let mut r = Reducer::new(&c, specs, opts).unwrap();
        assert_eq!(r.buckets().len(), 4);
        let me = c.rank() as f32;
        for p in [3, 2, 1] {
            r.mark_ready(p, &vec![me + p as f32; n]).unwrap();
        }
        // Three buckets are on their way although backward has not finished.
        assert_eq!(r.launched_in_step(), 3);
        assert_eq!(r.bucket_state(3), BucketState::Filling);
        // The first bucket's all_reduce completes while parameter 0 is still unmarked.
        let start = Instant::now();
        while r.bucket_state(0) != BucketState::Reduced {
            assert!(start.elapsed() < LIMIT, "the first bucket never completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        r.mark_ready(0, &vec![me; n]).unwrap();
        r.finish().unwrap();
        (0..4)
            .map(|p| r.grad::<f32>(p).unwrap()[n - 1])
            .collect::<Vec<f32>>()
    });
    for got in out {
        // (p + 0 + p + 1) / 2
        assert_eq!(got, vec![0.5, 1.5, 2.5, 3.5]);
    }
}

#[test]
fn buckets_are_reduced_in_bucket_order_whatever_the_marking_order() {
    // Rank 0 marks front to back, rank 1 back to front; equal-sized buckets would be
    // silently swapped if each rank launched them as they complete.
    let out = on_ranks(local(2), |c| {
        let specs: Vec<ParamSpec> = (0..5)
            .map(|i| ParamSpec::of::<f32>(format!("p{i}"), &[256]))
            .collect();
        let opts = ReducerOptions::default()
            .first_bucket_mb(0.001)
            .bucket_cap_mb(0.001);
        let mut r = Reducer::new(&c, specs, opts).unwrap();
        let order: Vec<usize> = if c.rank() == 0 {
            (0..5).collect()
        } else {
            (0..5).rev().collect()
        };
        for p in order {
            r.mark_ready(p, &vec![(10 * p + c.rank()) as f32; 256])
                .unwrap();
        }
        r.finish().unwrap();
        (0..5)
            .map(|p| r.grad::<f32>(p).unwrap()[0])
            .collect::<Vec<_>>()
    });
    for got in out {
        assert_eq!(got, vec![0.5, 10.5, 20.5, 30.5, 40.5]);
    }
}

// ---------------------------------------------------------------------------------------
// Accumulation, half types, views
// ---------------------------------------------------------------------------------------

#[test]
fn no_sync_accumulation_equals_the_big_batch_gradient() {
    const K: usize = 4; // micro-batches per rank: K - 1 under no_sync, the last synchronised
    let world = 3;
    let out = on_ranks(local(world), |c| {
        let specs = model_specs();
        let params = init_params(&specs);
        let mut r = Reducer::new(&c, specs.clone(), small_buckets()).unwrap();
        let micro = |k: usize| -> Vec<usize> {
            (0..BATCH).map(|i| (c.rank() * K + k) * BATCH + i).collect()
        };
        let launched = r.launched_total();
        r.no_sync(|r| {
            for k in 0..K - 1 {
                for p in (0..specs.len()).rev() {
                    r.mark_ready(p, &grad_of(&params[p], p, &micro(k), 1.0))
                        .unwrap();
                }
                r.finish().unwrap();
            }
        });
        assert_eq!(r.launched_total(), launched, "no_sync steps sent nothing");
        assert!(r.is_sync());
        for p in (0..specs.len()).rev() {
            r.mark_ready(p, &grad_of(&params[p], p, &micro(K - 1), 1.0))
                .unwrap();
        }
        r.finish().unwrap();
        assert!(r.launched_total() > launched);
        (0..specs.len())
            .map(|p| r.grad::<f32>(p).unwrap().to_vec())
            .collect::<Vec<_>>()
    });
    // The big batch: every micro-batch of every rank; sum loss, averaged over ranks.
    let specs = model_specs();
    let params = init_params(&specs);
    let all: Vec<usize> = (0..world * K * BATCH).collect();
    let expect: Vec<Vec<f32>> = (0..specs.len())
        .map(|p| grad_of(&params[p], p, &all, world as f32))
        .collect();
    for got in &out {
        assert_eq!(got, &out[0]);
        assert_close(got, &expect, 1e-5, "accumulated");
    }
}

#[test]
fn half_precision_buckets_average_correctly() {
    let out = on_ranks(local(3), |c| {
        let specs = vec![
            ParamSpec::of::<f16>("h", &[64]),
            ParamSpec::of::<bf16>("b", &[64]),
            ParamSpec::of::<f32>("f", &[64]),
        ];
        let mut r = Reducer::new(&c, specs, ReducerOptions::default()).unwrap();
        // Types never share a bucket.
        assert_eq!(r.buckets().len(), 3);
        let v = |j: usize| (j as f32 - 32.0) * 0.25 + c.rank() as f32 * 0.5;
        let f: Vec<f32> = (0..64).map(v).collect();
        let h: Vec<f16> = f.iter().map(|&x| f16::from_f32(x)).collect();
        let b: Vec<bf16> = f.iter().map(|&x| bf16::from_f32(x)).collect();
        r.mark_ready(2, &f).unwrap();
        r.mark_ready(1, &b).unwrap();
        r.mark_ready(0, &h).unwrap();
        r.finish().unwrap();
        (
            r.grad::<f16>(0).unwrap().to_vec(),
            r.grad::<bf16>(1).unwrap().to_vec(),
            r.grad::<f32>(2).unwrap().to_vec(),
        )
    });
    for (h, b, f) in &out {
        assert_eq!(
            (h, b, f),
            (&out[0].0, &out[0].1, &out[0].2),
            "ranks agree bitwise"
        );
        for j in 0..64 {
            // The sums are exact in every type here (at most 8 significant bits); the division
            // is rounded once.
            let sum: f32 = (0..3)
                .map(|r| (j as f32 - 32.0) * 0.25 + r as f32 * 0.5)
                .sum();
            assert_eq!(f[j], sum / 3.0);
            assert_eq!(h[j], f16::from_f32(sum / 3.0), "f16 element {j}");
            assert_eq!(b[j], bf16::from_f32(sum / 3.0), "bf16 element {j}");
        }
    }
}

#[test]
fn gradient_views_into_bucket_memory_equal_copies() {
    let out = on_ranks(local(2), |c| {
        let specs = model_specs();
        let params = init_params(&specs);
        let batch = [c.rank(), c.rank() + 2];
        let mut by_copy = Reducer::new(&c, specs.clone(), small_buckets()).unwrap();
        let mut by_view = Reducer::new(&c, specs.clone(), small_buckets()).unwrap();
        for p in (0..specs.len()).rev() {
            let g = grad_of(&params[p], p, &batch, 1.0);
            by_copy.mark_ready(p, &g).unwrap();
            // Accumulate into the slot in two halves of the batch.
            for i in batch {
                let part = grad_of(&params[p], p, &[i], 1.0);
                let slot = by_view.grad_mut::<f32>(p).unwrap();
                for (s, x) in slot.iter_mut().zip(part) {
                    *s += x;
                }
            }
            by_view.mark_ready_in_place(p).unwrap();
        }
        by_copy.finish().unwrap();
        by_view.finish().unwrap();
        (0..specs.len())
            .map(|p| {
                (
                    by_copy.grad::<f32>(p).unwrap().to_vec(),
                    by_view.grad::<f32>(p).unwrap().to_vec(),
                )
            })
            .collect::<Vec<_>>()
    });
    for per_param in out {
        for (a, b) in per_param {
            assert_close(&[a], &[b], 1e-6, "view vs copy");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

fn invalid(e: &Error) -> &str {
    match e {
        Error::InvalidArgument { why, .. } => why,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn marking_twice_names_the_parameter_and_the_step_goes_on() {
    let out = on_ranks(local(2), |c| {
        let specs = model_specs();
        let mut r = Reducer::new(&c, specs.clone(), ReducerOptions::default()).unwrap();
        let zeros = |p: usize| vec![1.0f32; specs[p].numel()];
        r.mark_ready(2, &zeros(2)).unwrap();
        let e = r.mark_ready(2, &zeros(2)).unwrap_err();
        let msg = invalid(&e).to_string();
        assert!(
            msg.contains("\"fc1.bias\"") && msg.contains("already marked"),
            "{msg}"
        );
        // Wrong type, wrong length, unknown index or name: errors naming the parameter.
        let e = r.mark_ready(0, &[bf16::ZERO; 320]).unwrap_err();
        assert!(
            invalid(&e).contains("embed.weight") && invalid(&e).contains("bf16"),
            "{e}"
        );
        let e = r.mark_ready(0, &[0f32; 3]).unwrap_err();
        assert!(
            invalid(&e).contains("[40, 8]") && invalid(&e).contains("320"),
            "{e}"
        );
        assert!(r.mark_ready(99, &[0f32]).is_err());
        assert!(r.mark_ready_by_name("nope", &[0f32]).is_err());
        for p in [5, 4, 3, 1, 0] {
            r.mark_ready(p, &zeros(p)).unwrap();
        }
        r.finish().unwrap();
        r.grad::<f32>(2).unwrap()[0]
    });
    assert_eq!(out, vec![1.0, 1.0]);
}

#[test]
fn finishing_with_unmarked_parameters_names_them_and_can_be_completed() {
    let out = on_ranks(local(2), |c| {
        let specs = model_specs();
        let mut r = Reducer::new(&c, specs.clone(), ReducerOptions::default()).unwrap();
        for p in [5, 4, 3, 0] {
            r.mark_ready(p, &vec![1.0f32; specs[p].numel()]).unwrap();
        }
        let e = r.finish().unwrap_err();
        let msg = invalid(&e).to_string();
        assert!(
            msg.contains("2 of 6")
                && msg.contains("\"fc1.weight\"")
                && msg.contains("\"fc1.bias\"")
                && msg.contains("find_unused_parameters"),
            "{msg}"
        );
        assert!(!msg.contains("head.weight"), "{msg}");
        assert!(r.grad::<f32>(0).is_err(), "the step is still open");
        // Complete the step: it reduces normally.
        r.mark_ready(2, &[2.0f32; 16]).unwrap();
        r.mark_ready(1, &vec![2.0f32; 128]).unwrap();
        r.finish().unwrap();
        (r.grad::<f32>(1).unwrap()[0], r.steps())
    });
    assert_eq!(out, vec![(2.0, 1), (2.0, 1)]);
}

#[test]
fn find_unused_parameters_counts_them_as_zero() {
    let out = on_ranks(local(2), |c| {
        let specs = model_specs();
        let opts = small_buckets().find_unused_parameters(true);
        let mut r = Reducer::new(&c, specs.clone(), opts).unwrap();
        let mut got = Vec::new();
        for step in 0..2 {
            for p in (0..specs.len()).rev() {
                // Rank 1 never uses fc2.weight (#3); in step 1 nobody uses head.weight.
                if (c.rank() == 1 && p == 3) || (step == 1 && p == 5) {
                    continue;
                }
                r.mark_ready(p, &vec![4.0f32; specs[p].numel()]).unwrap();
            }
            r.finish().unwrap();
            got.push((r.grad::<f32>(3).unwrap()[0], r.grad::<f32>(5).unwrap()[0]));
        }
        got
    });
    for got in out {
        assert_eq!(got, vec![(2.0, 4.0), (2.0, 0.0)]);
    }
}

/// Reducer::new on ranks whose lists differ: every rank fails, naming the first difference.
fn mismatch(edit: fn(usize, &mut Vec<ParamSpec>)) -> Vec<String> {
    on_ranks(local(3), move |c| {
        let mut specs = model_specs();
        edit(c.rank(), &mut specs);
        let e = Reducer::new(&c, specs, ReducerOptions::default()).unwrap_err();
        invalid(&e).to_string()
    })
}

#[test]
fn ranks_with_different_parameters_fail_naming_the_first_difference() {
    // A shape.
    for msg in mismatch(|r, s| {
        if r == 2 {
            s[2].shape = vec![17];
        }
    }) {
        assert!(
            msg.contains("parameter #2")
                && msg.contains("\"fc1.bias\" [16] f32 on rank 0")
                && msg.contains("\"fc1.bias\" [17] f32 on rank 2"),
            "{msg}"
        );
    }
    // A name (and so the order).
    for msg in mismatch(|r, s| {
        if r == 1 {
            s.swap(1, 2);
        }
    }) {
        assert!(
            msg.contains("parameter #1") && msg.contains("rank 1"),
            "{msg}"
        );
        assert!(
            msg.contains("fc1.weight") && msg.contains("fc1.bias"),
            "{msg}"
        );
    }
    // A type.
    for msg in mismatch(|r, s| {
        if r == 1 {
            s[4].dtype = DType::BF16;
        }
    }) {
        assert!(msg.contains("#4") && msg.contains("bf16"), "{msg}");
    }
    // Bucket caps.
    let out = on_ranks(local(2), |c| {
        let opts = ReducerOptions::default().bucket_cap_mb(if c.rank() == 1 { 10.0 } else { 25.0 });
        invalid(&Reducer::new(&c, model_specs(), opts).unwrap_err()).to_string()
    });
    for msg in out {
        assert!(
            msg.contains("bucket caps") && msg.contains("on rank 1"),
            "{msg}"
        );
    }
    // A rank whose list is invalid on its own (a name twice) says so; the others do not
    // wait for it.
    let out = mismatch(|r, s| {
        if r == 1 {
            s[3].name = "fc1.bias".into();
        }
    });
    assert!(out[1].contains("registered twice"), "{}", out[1]);
    assert!(
        out[0].contains("parameter #3") && out[2].contains("parameter #3"),
        "{out:?}"
    );
    // A missing parameter.
    for msg in mismatch(|r, s| {
        if r == 2 {
            s.pop();
        }
    }) {
        assert!(
            msg.contains("rank 0 registers 6 parameters, rank 2 only 5")
                && msg.contains("head.weight"),
            "{msg}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Parameter and checkpoint broadcast
// ---------------------------------------------------------------------------------------

#[test]
fn broadcast_parameters_copies_rank_0s_values_of_every_type() {
    let out = on_ranks(tcp(3), |c| {
        let me = c.rank() as f32;
        let mut w = vec![me; 1000];
        let mut b = vec![me + 0.5; 3];
        let mut h = vec![f16::from_f32(me); 7];
        let mut z = vec![bf16::from_f32(-me); 5];
        broadcast_parameters(
            &c,
            [
                (&mut w).into(),
                (&mut h).into(),
                (&mut b).into(),
                (&mut z).into(),
            ],
        )
        .unwrap();
        (w, b, h, z)
    });
    for (w, b, h, z) in out {
        assert!(w.iter().all(|&x| x == 0.0));
        assert_eq!(b, vec![0.5; 3]);
        assert_eq!(h, vec![f16::ZERO; 7]);
        assert!(z.iter().all(|x| x.to_f32() == 0.0));
    }
}

#[test]
fn checkpoint_read_by_rank_0_reaches_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let mut c = Checkpoint::new();
    c.insert("w", &[2, 2], &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
    c.insert("m", &[3], &[bf16::from_f32(0.5); 3]).unwrap();
    c.set_meta("epoch", 4);
    CheckpointDir::new(root.join("rank0"), 2)
        .unwrap()
        .save(17, &c)
        .unwrap();
    // Each rank has its own directory (no shared file system); only rank 0's has files.
    let out = on_ranks(local(3), move |comm| {
        let dir = CheckpointDir::new(root.join(format!("rank{}", comm.rank())), 2).unwrap();
        dir.load_latest_broadcast(&comm).unwrap()
    });
    for got in out {
        let (step, ck) = got.expect("every rank gets the checkpoint");
        assert_eq!(step, 17);
        assert_eq!(ck.get::<f32>("w").unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(ck.meta_u64("epoch").unwrap(), 4);
        assert_eq!(ck.tensor("m").unwrap().dtype, DType::BF16);
    }
    // No checkpoint: None everywhere. A corrupt one: an error everywhere, no hang.
    let tmp2 = tempfile::tempdir().unwrap();
    let root2 = tmp2.path().to_path_buf();
    let none = on_ranks(local(2), {
        let root2 = root2.clone();
        move |comm| {
            let dir = CheckpointDir::new(root2.join(format!("e{}", comm.rank())), 2).unwrap();
            dir.load_latest_broadcast(&comm).unwrap().is_none()
        }
    });
    assert_eq!(none, vec![true, true]);
    std::fs::write(root2.join("e0/ckpt-0000000005.safetensors"), b"garbage").unwrap();
    let errs = on_ranks(local(2), move |comm| {
        let dir = CheckpointDir::new(root2.join(format!("e{}", comm.rank())), 2).unwrap();
        dir.load_latest_broadcast(&comm).unwrap_err().to_string()
    });
    assert!(errs[0].contains("ckpt-0000000005"), "{}", errs[0]);
    assert!(errs[1].contains("rank 0 could not provide"), "{}", errs[1]);
}

// ---------------------------------------------------------------------------------------
// The example under ferrorun
// ---------------------------------------------------------------------------------------

/// Selects the example as this executable's rank program; its arguments.
const EXAMPLE_ARGS: &str = "DDP_EXAMPLE_ARGS";
/// On attempt 0 of a `--max-restarts` job, rank 1 dies after this step.
const DIE_AFTER: &str = "DDP_EXAMPLE_DIE_AFTER";

/// Not a test on its own: as a rank started by ferrorun with role `ddp_example`, runs the
/// `ddp_linear` example's code (this file includes it) with the arguments in
/// [`EXAMPLE_ARGS`]; other roles are those of `common`.
#[test]
fn rank_entry_point() {
    if std::env::var(common::ROLE).as_deref() == Ok("ddp_example") {
        let mut args = std::env::var(EXAMPLE_ARGS).unwrap_or_default();
        // The elastic-restart test: on the first attempt, rank 1 stops after step
        // `DIE_AFTER` and is then killed (SIGKILL), in the middle of the others' training.
        let die = std::env::var(DIE_AFTER).ok().filter(|_| {
            std::env::var("FERROCOMM_RESTART_COUNT").as_deref() == Ok("0")
                && std::env::var("RANK").as_deref() == Ok("1")
        });
        if let Some(step) = &die {
            args.push_str(&format!(" --max-steps {step}"));
        }
        let argv = std::iter::once("ddp_linear".to_string())
            .chain(args.split_whitespace().map(str::to_string));
        let code = ddp_linear::cli(argv);
        if die.is_some() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &std::process::id().to_string()])
                .status();
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(code.into());
    }
    common::rank_main()
}

/// Runs the example on 4 ranks under ferrorun; fails the test unless it succeeds.
fn run_example(args: &str) -> common::Finished {
    let cmd = common::ferrorun(
        &["--nproc-per-node", "4"],
        "ddp_example",
        &[(EXAMPLE_ARGS, args)],
    );
    let f = common::Proc::start(&format!("ddp_linear {args}"), cmd).finish();
    assert_eq!(f.code(), Some(0), "{f:?}");
    f
}

/// `PARAMS` records of `stage`: rank -> (hash, values).
fn params_at(f: &common::Finished, stage: &str) -> BTreeMap<usize, (String, String)> {
    f.records("PARAMS")
        .into_iter()
        .filter(|r| r.get("stage").map(String::as_str) == Some(stage))
        .map(|r| {
            (
                common::num(&r, "rank"),
                (r["hash"].clone(), r["values"].clone()),
            )
        })
        .collect()
}

#[test]
fn example_replicas_start_and_end_equal_and_resume_matches() {
    let model = "--model mlp --hidden 24 --layers 3 --samples 512 --epochs 3 --bucket-cap-mb 0.002";
    let full = run_example(model);
    let before = params_at(&full, "before");
    let bcast = params_at(&full, "broadcast");
    let after = params_at(&full, "after");
    assert_eq!(before.len(), 4, "{full:?}");
    // Different before (each rank initialised itself), rank 0's everywhere after.
    let distinct: BTreeSet<&String> = before.values().map(|(h, _)| h).collect();
    assert_eq!(distinct.len(), 4, "{full:?}");
    assert!(bcast.values().all(|v| v == &before[&0]), "{full:?}");
    assert_eq!(after.len(), 4);
    assert!(after.values().all(|v| v == &after[&0]), "{full:?}");
    assert_ne!(after[&0], before[&0]);
    assert!(full.stdout.contains("EQUAL stage=broadcast all=true"));
    assert!(
        full.stdout.contains("EQUAL stage=after all=true step=12"),
        "{full:?}"
    );
    // One progress line per epoch, from rank 0 only, with loss and throughput.
    let progress: Vec<&str> = full
        .stdout
        .lines()
        .filter(|l| l.contains("samples/s"))
        .collect();
    assert_eq!(progress.len(), 3, "{full:?}");
    assert!(progress[0].contains("epoch 1/3: loss "), "{progress:?}");

    // Interrupted after 7 steps (checkpoints every 3: the newest is step 6), then resumed.
    let tmp = tempfile::tempdir().unwrap();
    let ck = format!("--ckpt-dir {} --ckpt-every 3", tmp.path().display());
    let part = run_example(&format!("{model} {ck} --max-steps 7"));
    assert!(part.stdout.contains("STOPPED step=7"), "{part:?}");
    let steps = CheckpointDir::new(tmp.path(), 3).unwrap().steps().unwrap();
    assert_eq!(steps, vec![3, 6]);
    let resumed = run_example(&format!("{model} {ck} --resume"));
    assert!(
        resumed.stdout.contains("RESUMED step=6 epoch=1"),
        "{resumed:?}"
    );
    let again = params_at(&resumed, "after");
    assert_eq!(
        again, after,
        "resumed run ends where the uninterrupted one does"
    );
    assert!(
        resumed
            .stdout
            .contains("EQUAL stage=after all=true step=12")
    );

    // The walk-through's linear layer: 5 weights and a bias, equal on every rank.
    let lin = run_example("--epochs 2");
    let after = params_at(&lin, "after");
    assert_eq!(after.len(), 4);
    assert!(after.values().all(|v| v == &after[&0]), "{lin:?}");
    assert_eq!(after[&0].1.split(',').count(), 6, "{lin:?}");
}

/// Elastic restart (torchrun's `--max-restarts`): one rank is killed once in the middle of
/// training; ferrorun restarts the whole group, the example resumes from rank 0's newest
/// checkpoint, and the final parameters equal those of an undisturbed run, bit for bit.
#[test]
fn a_rank_killed_once_under_max_restarts_resumes_to_the_same_parameters() {
    let model = "--model mlp --hidden 24 --layers 3 --samples 512 --epochs 3 --bucket-cap-mb 0.002";
    let undisturbed = run_example(model);
    let want = params_at(&undisturbed, "after");
    assert_eq!(want.len(), 4, "{undisturbed:?}");

    let tmp = tempfile::tempdir().unwrap();
    let args = format!(
        "{model} --ckpt-dir {} --ckpt-every 3 --resume",
        tmp.path().display()
    );
    let cmd = common::ferrorun(
        &["--nproc-per-node", "4", "--max-restarts", "1"],
        "ddp_example",
        &[(EXAMPLE_ARGS, args.as_str()), (DIE_AFTER, "7")],
    );
    let f = common::Proc::start("ddp_linear under --max-restarts 1", cmd).finish();
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert!(
        f.stderr.contains("restarting the group (restart 1 of 1)"),
        "{f:?}"
    );
    // The first attempt started afresh; the second resumed from the checkpoint of step 6.
    assert!(f.stdout.contains("starting afresh"), "{f:?}");
    assert!(f.stdout.contains("RESUMED step=6 epoch=1"), "{f:?}");
    assert_eq!(params_at(&f, "after"), want, "{f:?}");
    assert!(
        f.stdout.contains("EQUAL stage=after all=true step=12"),
        "{f:?}"
    );
}
