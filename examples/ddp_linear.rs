//! Data-parallel training as in the walk-through (points 8-10): every rank builds the same
//! model with its own random initialisation, rank 0's parameters are broadcast to all, each
//! rank trains on its own shard of a synthetic data set (a [`DistributedSampler`]), the
//! gradients are averaged by a [`Reducer`] while backward runs, an Adam optimiser updates
//! every replica identically, and rank 0 saves checkpoints (parameters, Adam moments, step,
//! epoch) that `--resume` continues from.
//!
//! ```text
//! cargo build --release --examples --bins
//! # The walk-through's model: one linear layer, 5 inputs -> 1 output.
//! target/release/ferrorun --nproc-per-node 4 -- target/release/examples/ddp_linear
//! # A multi-layer perceptron (several buckets, so communication overlaps backward).
//! target/release/ferrorun --nproc-per-node 4 -- target/release/examples/ddp_linear --model mlp
//! # Checkpoints every 10 steps; stop after 25 (as if the job died); resume.
//! target/release/ferrorun --nproc-per-node 4 -- target/release/examples/ddp_linear --ckpt-dir /tmp/ck --ckpt-every 10 --max-steps 25
//! target/release/ferrorun --nproc-per-node 4 -- target/release/examples/ddp_linear --ckpt-dir /tmp/ck --ckpt-every 10 --resume
//! ```
//!
//! Every rank prints `PARAMS stage=before|broadcast|after rank=R hash=H values=...` (the
//! hash covers every parameter bit; `values` are the first six): different before the
//! broadcast, equal after it and after training. The final parameters of a resumed run are
//! bit-identical to those of an uninterrupted one: the data order depends only on the seed
//! and the epoch, and the checkpoint holds the whole optimiser state.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use ferrocomm::ddp::{
    Checkpoint, CheckpointDir, DistributedSampler, ParamSpec, Reducer, ReducerOptions,
    broadcast_parameters,
};
use ferrocomm::{Communicator, Error, ReduceOp, Result};

/// Which model to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Model {
    /// One linear layer, 5 -> 1 (the walk-through's).
    Linear,
    /// 5 -> hidden -> ... -> 1 with tanh activations.
    Mlp,
}

/// Command-line options.
#[derive(Clone, Debug, Parser)]
#[command(about = "Data-parallel training of a small model with ferrocomm's DDP layer")]
pub struct Args {
    /// The model.
    #[arg(long, value_enum, default_value = "linear")]
    pub model: Model,
    /// Hidden width of the MLP.
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    /// Hidden layers of the MLP.
    #[arg(long, default_value_t = 3)]
    pub layers: usize,
    /// Epochs to train.
    #[arg(long, default_value_t = 5)]
    pub epochs: u64,
    /// Examples in the synthetic data set (every rank holds all of it).
    #[arg(long, default_value_t = 2048)]
    pub samples: usize,
    /// Examples per batch on each rank.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 0.01)]
    pub lr: f32,
    /// Seed of the data, the sampler and the initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Bucket cap of the reducer, in MiB.
    #[arg(long, default_value_t = 25.0)]
    pub bucket_cap_mb: f64,
    /// Directory of checkpoints (none: no checkpoints).
    #[arg(long)]
    pub ckpt_dir: Option<PathBuf>,
    /// Rank 0 saves a checkpoint every this many steps (0: never).
    #[arg(long, default_value_t = 0)]
    pub ckpt_every: u64,
    /// Checkpoints kept.
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    /// Continue from the newest checkpoint in --ckpt-dir (read by rank 0, broadcast).
    #[arg(long)]
    pub resume: bool,
    /// Stop after this many steps in all, as if the job had been killed.
    #[arg(long)]
    pub max_steps: Option<u64>,
}

/// A fully connected layer: `out = w x + b`, `w` of shape `[outs, ins]`.
#[derive(Clone, Debug)]
struct Layer {
    ins: usize,
    outs: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

/// SplitMix64: small, deterministic everywhere.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// The model's layers, initialised from `seed` (each rank passes its own).
fn init_model(args: &Args, seed: u64) -> Vec<Layer> {
    let widths: Vec<usize> = match args.model {
        Model::Linear => vec![5, 1],
        Model::Mlp => std::iter::once(5)
            .chain(std::iter::repeat_n(args.hidden, args.layers))
            .chain(std::iter::once(1))
            .collect(),
    };
    let mut rng = Rng(seed);
    widths
        .windows(2)
        .map(|w| {
            let (ins, outs) = (w[0], w[1]);
            let scale = 1.0 / (ins as f32).sqrt();
            Layer {
                ins,
                outs,
                w: (0..ins * outs).map(|_| rng.uniform() * scale).collect(),
                b: (0..outs).map(|_| rng.uniform() * scale).collect(),
            }
        })
        .collect()
}

/// Parameter names and shapes in model order: `l0.weight`, `l0.bias`, `l1.weight`, ...
fn specs(model: &[Layer]) -> Vec<ParamSpec> {
    model
        .iter()
        .enumerate()
        .flat_map(|(i, l)| {
            [
                ParamSpec::of::<f32>(format!("l{i}.weight"), &[l.outs, l.ins]),
                ParamSpec::of::<f32>(format!("l{i}.bias"), &[l.outs]),
            ]
        })
        .collect()
}

fn params_mut(model: &mut [Layer]) -> Vec<&mut Vec<f32>> {
    model
        .iter_mut()
        .flat_map(|l| [&mut l.w, &mut l.b])
        .collect()
}

/// The synthetic data set: inputs in [-1, 1)^5 and a target function with a little noise.
fn dataset(args: &Args) -> (Vec<[f32; 5]>, Vec<f32>) {
    let mut rng = Rng(args.seed ^ 0xda7a);
    let mut xs = Vec::with_capacity(args.samples);
    let mut ys = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let x = [(); 5].map(|_| rng.uniform());
        let y = match args.model {
            Model::Linear => {
                0.5 * x[0] - 1.5 * x[1] + 2.0 * x[2] + 0.25 * x[3] - x[4]
                    + 0.3
                    + 0.05 * rng.uniform()
            }
            Model::Mlp => {
                (2.0 * x[0]).sin() + x[1] * x[2] - 0.5 * x[3]
                    + 0.3 * x[4] * x[4]
                    + 0.05 * rng.uniform()
            }
        };
        xs.push(x);
        ys.push(y);
    }
    (xs, ys)
}

/// Forward and backward over one batch: the mean squared error, and each gradient handed
/// to the reducer as soon as backward has it (last layer first).
fn train_batch(
    model: &[Layer],
    xs: &[&[f32; 5]],
    ys: &[f32],
    reducer: &mut Reducer,
) -> Result<f32> {
    let n = xs.len();
    // acts[0] = inputs; acts[l + 1] = output of layer l (tanh except for the last).
    let mut acts: Vec<Vec<f32>> = vec![xs.iter().flat_map(|x| x.iter().copied()).collect()];
    for (li, l) in model.iter().enumerate() {
        let inp = &acts[li];
        let mut out = vec![0f32; n * l.outs];
        for s in 0..n {
            for o in 0..l.outs {
                let row = &l.w[o * l.ins..(o + 1) * l.ins];
                let x = &inp[s * l.ins..(s + 1) * l.ins];
                let z = l.b[o] + row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
                out[s * l.outs + o] = if li + 1 < model.len() { z.tanh() } else { z };
            }
        }
        acts.push(out);
    }
    let pred = &acts[model.len()];
    let mut loss = 0f32;
    // delta = dLoss/dz of the current layer, per sample and output.
    let mut delta: Vec<f32> = (0..n)
        .map(|s| {
            let e = pred[s] - ys[s];
            loss += e * e;
            2.0 * e / n as f32
        })
        .collect();
    for li in (0..model.len()).rev() {
        let l = &model[li];
        let inp = &acts[li];
        let mut gw = vec![0f32; l.outs * l.ins];
        let mut gb = vec![0f32; l.outs];
        for s in 0..n {
            for o in 0..l.outs {
                let d = delta[s * l.outs + o];
                gb[o] += d;
                let x = &inp[s * l.ins..(s + 1) * l.ins];
                for (g, xi) in gw[o * l.ins..(o + 1) * l.ins].iter_mut().zip(x) {
                    *g += d * xi;
                }
            }
        }
        reducer.mark_ready(2 * li + 1, &gb)?;
        reducer.mark_ready(2 * li, &gw)?;
        if li > 0 {
            // Through the weights and the previous layer's tanh.
            let mut prev = vec![0f32; n * l.ins];
            for s in 0..n {
                for o in 0..l.outs {
                    let d = delta[s * l.outs + o];
                    for i in 0..l.ins {
                        prev[s * l.ins + i] += d * l.w[o * l.ins + i];
                    }
                }
                for i in 0..l.ins {
                    let a = inp[s * l.ins + i];
                    prev[s * l.ins + i] *= 1.0 - a * a;
                }
            }
            delta = prev;
        }
    }
    Ok(loss / n as f32)
}

/// Adam (Kingma and Ba, 2015) with bias correction.
struct Adam {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    /// Steps taken.
    t: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Adam {
    fn new(lr: f32, sizes: &[usize]) -> Adam {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    fn step(&mut self, params: &mut [&mut Vec<f32>], reducer: &Reducer) -> Result<()> {
        self.t += 1;
        let c1 = 1.0 - self.beta1.powi(self.t as i32);
        let c2 = 1.0 - self.beta2.powi(self.t as i32);
        for (i, p) in params.iter_mut().enumerate() {
            let g = reducer.grad::<f32>(i)?;
            for (((w, &g), m), v) in p.iter_mut().zip(g).zip(&mut self.m[i]).zip(&mut self.v[i]) {
                *m = self.beta1 * *m + (1.0 - self.beta1) * g;
                *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
                let mh = *m / c1;
                let vh = *v / c2;
                *w -= self.lr * mh / (vh.sqrt() + self.eps);
            }
        }
        Ok(())
    }
}

/// FNV-1a over every parameter's bits, in order.
fn hash_params(model: &[Layer]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for l in model {
        for x in l.w.iter().chain(&l.b) {
            for b in x.to_bits().to_le_bytes() {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    h
}

fn print_params(stage: &str, rank: usize, model: &[Layer]) {
    let first: Vec<String> = model
        .iter()
        .flat_map(|l| l.w.iter().chain(&l.b))
        .take(6)
        .map(|x| format!("{x:?}"))
        .collect();
    println!(
        "PARAMS stage={stage} rank={rank} hash={:016x} values=[{}]",
        hash_params(model),
        first.join(",")
    );
}

/// Whether every rank holds the same parameters (one all_gather of the hashes).
fn all_equal(comm: &Communicator, model: &[Layer]) -> Result<bool> {
    let mut hashes = vec![0u64; comm.size()];
    comm.all_gather(&[hash_params(model)], &mut hashes)?;
    Ok(hashes.iter().all(|&h| h == hashes[0]))
}

fn checkpoint(model: &[Layer], specs: &[ParamSpec], adam: &Adam, epoch: u64) -> Result<Checkpoint> {
    let mut c = Checkpoint::new();
    let values = model.iter().flat_map(|l| [&l.w, &l.b]);
    for (i, (spec, p)) in specs.iter().zip(values).enumerate() {
        c.insert(&spec.name, &spec.shape, p)?;
        c.insert(&format!("adam.m.{}", spec.name), &spec.shape, &adam.m[i])?;
        c.insert(&format!("adam.v.{}", spec.name), &spec.shape, &adam.v[i])?;
    }
    c.set_meta("epoch", epoch);
    c.set_meta("adam_t", adam.t);
    Ok(c)
}

fn restore(
    c: &Checkpoint,
    model: &mut [Layer],
    specs: &[ParamSpec],
    adam: &mut Adam,
) -> Result<()> {
    for (i, (spec, p)) in specs.iter().zip(params_mut(model)).enumerate() {
        let get = |name: &str| -> Result<Vec<f32>> {
            let t = c.tensor(name)?;
            if t.shape != spec.shape {
                return Err(Error::invalid(
                    "resume",
                    name.to_string(),
                    format!(
                        "the checkpoint has shape {:?}, the model {:?} (other --model, --hidden or --layers?)",
                        t.shape, spec.shape
                    ),
                ));
            }
            t.to_vec()
        };
        *p = get(&spec.name)?;
        adam.m[i] = get(&format!("adam.m.{}", spec.name))?;
        adam.v[i] = get(&format!("adam.v.{}", spec.name))?;
    }
    adam.t = c.meta_u64("adam_t")?;
    Ok(())
}

/// Trains as `args` say on the ranks of `comm`.
pub fn train(comm: &Communicator, args: &Args) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.size());
    if args.batch_size == 0 {
        return Err(Error::invalid(
            "ddp_linear",
            "--batch-size",
            "must be at least 1",
        ));
    }
    // Each rank initialises differently (as each would with its own random state).
    let mut model = init_model(
        args,
        args.seed.wrapping_mul(1000).wrapping_add(rank as u64 + 1),
    );
    print_params("before", rank, &model);
    broadcast_parameters(comm, params_mut(&mut model).into_iter().map(Into::into))?;
    print_params("broadcast", rank, &model);
    if rank == 0 {
        println!("EQUAL stage=broadcast all={}", all_equal(comm, &model)?);
    } else {
        all_equal(comm, &model)?;
    }

    let specs = specs(&model);
    let mut reducer = Reducer::new(
        comm,
        specs.clone(),
        ReducerOptions::default().bucket_cap_mb(args.bucket_cap_mb),
    )?;
    let sizes: Vec<usize> = specs.iter().map(ParamSpec::numel).collect();
    let mut adam = Adam::new(args.lr, &sizes);
    if rank == 0 {
        let n: usize = sizes.iter().sum();
        println!(
            "model {:?}: {} tensors, {n} parameters, {} buckets; {world} ranks",
            args.model,
            specs.len(),
            reducer.buckets().len()
        );
    }

    let (xs, ys) = dataset(args);
    let mut sampler = DistributedSampler::new(args.samples, world, rank)?.seed(args.seed);
    let per_epoch = sampler.num_samples().div_ceil(args.batch_size) as u64;
    let dir = match &args.ckpt_dir {
        Some(d) => Some(CheckpointDir::new(d, args.keep)?),
        None => None,
    };
    let mut step = 0u64;
    if args.resume {
        let Some(dir) = &dir else {
            return Err(Error::invalid("ddp_linear", "--resume", "needs --ckpt-dir"));
        };
        // Rank 0 reads, every rank receives: works without a shared file system.
        match dir.load_latest_broadcast(comm)? {
            Some((s, c)) => {
                restore(&c, &mut model, &specs, &mut adam)?;
                step = s;
                if rank == 0 {
                    println!("RESUMED step={s} epoch={}", c.meta_u64("epoch")?);
                }
            }
            None if rank == 0 => {
                println!("no checkpoint in {}: starting afresh", dir.path().display())
            }
            None => {}
        }
    }

    let first_epoch = step / per_epoch.max(1);
    for epoch in first_epoch..args.epochs {
        sampler.set_epoch(epoch);
        let order = sampler.indices();
        let start = Instant::now();
        let (mut loss_sum, mut batches, mut seen) = (0f64, 0u64, 0usize);
        for (b, chunk) in order.chunks(args.batch_size).enumerate() {
            if epoch * per_epoch + (b as u64) < step {
                continue; // done before the checkpoint we resumed from
            }
            let bx: Vec<&[f32; 5]> = chunk.iter().map(|&i| &xs[i]).collect();
            let by: Vec<f32> = chunk.iter().map(|&i| ys[i]).collect();
            loss_sum += train_batch(&model, &bx, &by, &mut reducer)? as f64;
            reducer.finish()?;
            adam.step(&mut params_mut(&mut model), &reducer)?;
            step += 1;
            batches += 1;
            seen += chunk.len();
            if let Some(dir) = &dir
                && rank == 0
                && args.ckpt_every > 0
                && step.is_multiple_of(args.ckpt_every)
            {
                let done = step.is_multiple_of(per_epoch);
                let ck = checkpoint(&model, &specs, &adam, epoch + done as u64)?;
                dir.save(step, &ck)?;
            }
            if args.max_steps == Some(step) {
                print_params("stopped", rank, &model);
                if rank == 0 {
                    println!("STOPPED step={step} (--max-steps)");
                }
                return Ok(());
            }
        }
        // The mean loss over all ranks, and the throughput of all ranks.
        let mut stats = [loss_sum / batches.max(1) as f64, seen as f64];
        comm.all_reduce(&mut stats, ReduceOp::Sum)?;
        if rank == 0 {
            let secs = start.elapsed().as_secs_f64();
            println!(
                "epoch {}/{}: loss {:.6}, {:.0} samples/s ({} steps)",
                epoch + 1,
                args.epochs,
                stats[0] / world as f64,
                stats[1] / secs.max(1e-9),
                batches
            );
        }
    }
    print_params("after", rank, &model);
    let equal = all_equal(comm, &model)?;
    if rank == 0 {
        println!("EQUAL stage=after all={equal} step={step}");
    }
    if !equal {
        return Err(Error::invalid(
            "ddp_linear",
            "training",
            "replicas diverged: the ranks' parameters differ after training",
        ));
    }
    Ok(())
}

/// Parses `argv` (program name first), joins the job and trains; returns the exit status.
pub fn cli(argv: impl IntoIterator<Item = String>) -> u8 {
    ferrocomm::init_logging();
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match ferrocomm::init().and_then(|comm| train(&comm, &args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ddp_linear: {e}");
            1
        }
    }
}

#[allow(dead_code)] // the tests include this file as a module and call `cli`
fn main() -> ExitCode {
    ExitCode::from(cli(std::env::args()))
}
