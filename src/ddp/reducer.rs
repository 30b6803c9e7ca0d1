//! The gradient [`Reducer`]: what `DistributedDataParallel` does with gradients.
//!
//! Every rank registers the model's parameters (name, shape, element type) in model order.
//! Their gradients are grouped into buckets by [`super::buckets::plan`]: in reverse order,
//! since backward produces them back to front, at most `bucket_cap_mb` (25 MiB) per bucket
//! and a small first bucket (1 MiB) so that communication starts early. During backward the
//! program calls [`Reducer::mark_ready`] with each gradient as soon as it has it; the
//! gradient is copied into its bucket, and when a bucket is complete its `all_reduce` starts
//! on a worker thread ([`Communicator::iall_reduce`]) while backward computes the next
//! gradients. [`Reducer::finish`] waits for every bucket; the averaged gradients (sum over
//! ranks / world size) are then read with [`Reducer::grad`].
//!
//! # Steps
//!
//! A step starts with its first `mark_ready` (or [`Reducer::grad_mut`]) and ends with
//! `finish`. Every parameter must be marked exactly once per step:
//!
//! - marking one twice is an error naming it (nothing changes, the step goes on);
//! - `finish` with parameters never marked is an error naming them, unless
//!   [`ReducerOptions::find_unused_parameters`] is set, in which case they contribute zero
//!   (PyTorch's `find_unused_parameters=True`). After the error the step is still open: mark
//!   the missing ones and call `finish` again.
//!
//! Buckets are reduced strictly in bucket order on every rank (a complete bucket waits for
//! the ones before it), so ranks whose backward passes produce gradients in different orders
//! still issue the same collectives in the same order.
//!
//! # Gradient accumulation
//!
//! Steps run while synchronisation is off ([`Reducer::no_sync`] or
//! [`Reducer::set_sync`]`(false)`, PyTorch's `no_sync()`) send nothing: the gradients are
//! summed locally in the buckets. The next synchronised step adds its own gradients and
//! reduces the sum, so after `finish` each gradient is `(sum over ranks of the sum over the
//! accumulated steps) / world size`. The mode of a step is fixed at its first `mark_ready`.
//!
//! # Gradient views
//!
//! Instead of handing a finished gradient to `mark_ready` (one copy), a backward pass can
//! accumulate straight into bucket memory: [`Reducer::grad_mut`] gives the parameter's slot
//! (zero at the start of an accumulation window, else the sum so far), the program adds its
//! gradient there and calls [`Reducer::mark_ready_in_place`].
//!
//! # Checks at construction
//!
//! [`Reducer::new`] is a collective over the communicator: the ranks exchange a fingerprint
//! of their parameter lists (one `all_gather` of a 64-bit hash), and when the lists differ
//! every rank fails with an error naming the first difference (position, name, shape or
//! type, or a missing parameter) instead of hanging or silently reducing mismatched
//! gradients later. The reducer then works on a duplicate of the communicator
//! ([`Communicator::dup`]), so its collectives never mix with the program's own.
//!
//! # Precision
//!
//! Buckets of `f16` and `bf16` are reduced in their own type, like NCCL does: each pairwise
//! sum is computed in `f32` and rounded once, then the division by the world size is done in
//! `f32` and rounded once. Every rank ends with bit-identical gradients.

use std::collections::HashMap;

use half::{bf16, f16};

use crate::collective::CollHandle;
use crate::comm::Communicator;
use crate::element::{DType, Element, Order, ReduceOp, reduce_bytes};
use crate::error::{Error, Result};

use super::buckets::{self, BucketPlan, Slot};

const MIB: f64 = (1u64 << 20) as f64;

/// One parameter as registered with a [`Reducer`]: its name, shape and element type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ParamSpec {
    /// Name, unique within the model (`fc1.weight`).
    pub name: String,
    /// Dimensions (empty for a scalar).
    pub shape: Vec<usize>,
    /// Element type: [`DType::F32`], [`DType::F16`] or [`DType::BF16`].
    pub dtype: DType,
}

impl ParamSpec {
    /// A parameter named `name` of `shape` and element type `dtype`.
    pub fn new(name: impl Into<String>, shape: &[usize], dtype: DType) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
        }
    }

    /// A parameter of element type `T`.
    pub fn of<T: Element>(name: impl Into<String>, shape: &[usize]) -> ParamSpec {
        ParamSpec::new(name, shape, T::DTYPE)
    }

    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn describe(&self) -> String {
        format!("{:?} {:?} {}", self.name, self.shape, self.dtype)
    }
}

/// Settings of a [`Reducer`]. `ReducerOptions::default()` is PyTorch's: 25 MiB buckets, a
/// 1 MiB first bucket, unused parameters are an error.
#[derive(Clone, Debug, PartialEq)]
pub struct ReducerOptions {
    /// Largest bucket in MiB (a parameter larger than this gets a bucket of its own).
    pub bucket_cap_mb: f64,
    /// Cap of the first bucket of each element type in MiB.
    pub first_bucket_mb: f64,
    /// Parameters never marked in a step contribute zero instead of failing `finish`.
    pub find_unused_parameters: bool,
}

impl Default for ReducerOptions {
    fn default() -> Self {
        ReducerOptions {
            bucket_cap_mb: 25.0,
            first_bucket_mb: 1.0,
            find_unused_parameters: false,
        }
    }
}

impl ReducerOptions {
    /// Sets [`ReducerOptions::bucket_cap_mb`].
    pub fn bucket_cap_mb(mut self, mb: f64) -> Self {
        self.bucket_cap_mb = mb;
        self
    }

    /// Sets [`ReducerOptions::first_bucket_mb`].
    pub fn first_bucket_mb(mut self, mb: f64) -> Self {
        self.first_bucket_mb = mb;
        self
    }

    /// Sets [`ReducerOptions::find_unused_parameters`].
    pub fn find_unused_parameters(mut self, on: bool) -> Self {
        self.find_unused_parameters = on;
        self
    }

    fn cap_bytes(mb: f64, what: &str) -> Result<usize> {
        if !mb.is_finite() || mb < 0.0 {
            return Err(Error::invalid(
                "Reducer::new",
                what,
                format!("{mb} MiB: must be a finite number >= 0"),
            ));
        }
        Ok((mb * MIB) as usize)
    }
}

/// Where a bucket is in the current step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketState {
    /// Waiting for gradients (or for an earlier bucket), or idle between steps.
    Filling,
    /// Its all_reduce has started and not finished yet.
    InFlight,
    /// Its all_reduce has finished (collected by the next [`Reducer::finish`]).
    Reduced,
}

/// Bucket memory of one element type.
enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Buf {
    fn zeroed(dtype: DType, n: usize) -> Result<Buf> {
        Ok(match dtype {
            DType::F32 => Buf::F32(vec![0.0; n]),
            DType::F16 => Buf::F16(vec![f16::ZERO; n]),
            DType::BF16 => Buf::BF16(vec![bf16::ZERO; n]),
            other => {
                return Err(Error::invalid(
                    "Reducer::new",
                    "params",
                    format!("element type {other} is not a gradient type (f32, f16, bf16)"),
                ));
            }
        })
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Buf::F32(v) => bytemuck::cast_slice(v),
            Buf::F16(v) => bytemuck::cast_slice(v),
            Buf::BF16(v) => bytemuck::cast_slice(v),
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Buf::F32(v) => bytemuck::cast_slice_mut(v),
            Buf::F16(v) => bytemuck::cast_slice_mut(v),
            Buf::BF16(v) => bytemuck::cast_slice_mut(v),
        }
    }
}

/// A bucket's all_reduce in flight.
enum Flying {
    F32(CollHandle<Vec<f32>>),
    F16(CollHandle<Vec<f16>>),
    BF16(CollHandle<Vec<bf16>>),
}

impl Flying {
    fn test(&self) -> bool {
        match self {
            Flying::F32(h) => h.test(),
            Flying::F16(h) => h.test(),
            Flying::BF16(h) => h.test(),
        }
    }

    fn wait(self) -> Result<Buf> {
        Ok(match self {
            Flying::F32(h) => Buf::F32(h.wait()?),
            Flying::F16(h) => Buf::F16(h.wait()?),
            Flying::BF16(h) => Buf::BF16(h.wait()?),
        })
    }
}

enum Mem {
    Here(Buf),
    Flying(Flying),
    /// After a failed all_reduce (the reducer is unusable).
    Lost,
}

struct Bucket {
    plan: BucketPlan,
    mem: Mem,
    /// Parameters of the bucket not yet marked in this step.
    pending: usize,
}

/// Gathers gradients into buckets and all-reduces them while backward runs. See the
/// [module documentation](self).
pub struct Reducer {
    comm: Communicator,
    params: Vec<ParamSpec>,
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
    buckets: Vec<Bucket>,
    opts: ReducerOptions,
    /// Synchronise the next step (false inside `no_sync`).
    sync: bool,
    /// A step is open (something was marked or viewed since the last finish).
    in_step: bool,
    /// The open step's mode.
    step_sync: bool,
    /// The buckets hold a local sum of earlier unsynchronised steps.
    accumulated: bool,
    marked: Vec<bool>,
    /// Slots already prepared (zeroed) for this step by `grad_mut`.
    touched: Vec<bool>,
    /// The next bucket to launch, in bucket order.
    next_launch: usize,
    launched_total: u64,
    steps: u64,
    failed: Option<Error>,
}

impl std::fmt::Debug for Reducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reducer")
            .field("rank", &self.comm.rank())
            .field("params", &self.params.len())
            .field("buckets", &self.buckets.len())
            .field("sync", &self.sync)
            .field("steps", &self.steps)
            .finish()
    }
}

/// FNV-1a, 64 bits: the same on every platform.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Starts the line of bucket caps in a description.
const CAPS: &str = "bucket caps (first, others; bytes): ";

/// One line per parameter, then the bucket caps: the fingerprint's input and, on a
/// mismatch, what is compared.
fn describe_all(params: &[ParamSpec], caps: &str) -> String {
    let mut s = String::new();
    for p in params {
        s.push_str(&p.describe());
        s.push('\n');
    }
    s.push_str(CAPS);
    s.push_str(caps);
    s.push('\n');
    s
}

/// The first difference between rank 0's description and `rank`'s, in words.
fn first_difference(mine: &[String], theirs: &[String], rank: usize) -> String {
    let split = |l: &[String]| -> (Vec<String>, Option<String>) {
        match l.split_last() {
            Some((last, rest)) if last.starts_with(CAPS) => {
                (rest.to_vec(), Some(last[CAPS.len()..].to_string()))
            }
            _ => (l.to_vec(), None),
        }
    };
    let ((mine, my_caps), (theirs, their_caps)) = (split(mine), split(theirs));
    for (k, (a, b)) in mine.iter().zip(&theirs).enumerate() {
        if a != b {
            return format!("parameter #{k} is {a} on rank 0 but {b} on rank {rank}");
        }
    }
    match mine.len().cmp(&theirs.len()) {
        std::cmp::Ordering::Greater => format!(
            "rank 0 registers {} parameters, rank {rank} only {} (the first missing on rank \
             {rank} is #{}: {})",
            mine.len(),
            theirs.len(),
            theirs.len(),
            mine[theirs.len()]
        ),
        std::cmp::Ordering::Less => format!(
            "rank {rank} registers {} parameters, rank 0 only {} (the first extra on rank \
             {rank} is #{}: {})",
            theirs.len(),
            mine.len(),
            mine.len(),
            theirs[mine.len()]
        ),
        std::cmp::Ordering::Equal if my_caps != their_caps => format!(
            "the parameters agree, but the bucket caps (first, others, in bytes) are {} on \
             rank 0 and {} on rank {rank} (ReducerOptions must be the same everywhere)",
            my_caps.unwrap_or_default(),
            their_caps.unwrap_or_default()
        ),
        std::cmp::Ordering::Equal => format!("rank 0 and rank {rank} differ in an unknown way"),
    }
}

/// Checks that every rank registered the same parameters; on a mismatch every rank returns
/// the same error naming the first difference.
fn check_same_params(comm: &Communicator, params: &[ParamSpec], caps: &str) -> Result<()> {
    let text = describe_all(params, caps);
    let mut hashes = vec![0u64; comm.size()];
    comm.all_gather(&[fnv1a(text.as_bytes())], &mut hashes)?;
    if hashes.iter().all(|&h| h == hashes[0]) {
        return Ok(());
    }
    // Rare path: exchange the lists themselves to say what differs.
    let mut lens = vec![0u64; comm.size()];
    comm.all_gather(&[text.len() as u64], &mut lens)?;
    let max = lens.iter().copied().max().unwrap_or(0) as usize;
    let mut mine = text.into_bytes();
    mine.resize(max, 0);
    let mut all = vec![0u8; max * comm.size()];
    comm.all_gather(&mine, &mut all)?;
    let lists: Vec<Vec<String>> = all
        .chunks(max.max(1))
        .zip(&lens)
        .map(|(c, &len)| {
            String::from_utf8_lossy(&c[..(len as usize).min(c.len())])
                .lines()
                .map(str::to_string)
                .collect()
        })
        .collect();
    let detail = (1..comm.size())
        .find(|&r| hashes[r] != hashes[0])
        .map(|r| first_difference(&lists[0], &lists[r], r))
        .unwrap_or_else(|| "the parameter lists differ".to_string());
    Err(Error::invalid(
        "Reducer::new",
        "params",
        format!(
            "ranks registered different parameters: {detail}; every rank must register the \
             same parameters (names, shapes, element types) in the same order"
        ),
    ))
}

/// Copies `grad` into `slot` or adds it there.
fn put(dtype: DType, slot: &mut [u8], grad: &[u8], add: bool) -> Result<()> {
    if add {
        reduce_bytes(dtype, ReduceOp::Sum, slot, grad, Order::MineFirst)
    } else {
        slot.copy_from_slice(grad);
        Ok(())
    }
}

impl Reducer {
    /// A reducer for `params` (in model order) on the ranks of `comm`. A collective: every
    /// rank of `comm` calls it, with the same parameters, at the same point of its
    /// collective sequence; it fails on every rank, naming the first difference, when the
    /// ranks' lists differ. Parameter names must be unique; element types are `f32`, `f16`
    /// or `bf16`.
    pub fn new(
        comm: &Communicator,
        params: Vec<ParamSpec>,
        opts: ReducerOptions,
    ) -> Result<Reducer> {
        // Local checks first, but their failure still takes part in the exchange below, so
        // that the other ranks fail too instead of waiting for this one.
        let local = (|| -> Result<(usize, usize, HashMap<String, usize>)> {
            let first_cap = ReducerOptions::cap_bytes(opts.first_bucket_mb, "first_bucket_mb")?;
            let cap = ReducerOptions::cap_bytes(opts.bucket_cap_mb, "bucket_cap_mb")?;
            let mut by_name = HashMap::with_capacity(params.len());
            for (i, p) in params.iter().enumerate() {
                if !matches!(p.dtype, DType::F32 | DType::F16 | DType::BF16) {
                    return Err(Error::invalid(
                        "Reducer::new",
                        "params",
                        format!(
                            "parameter {:?} has element type {}; gradients must be f32, f16 \
                             or bf16",
                            p.name, p.dtype
                        ),
                    ));
                }
                if let Some(j) = by_name.insert(p.name.clone(), i) {
                    return Err(Error::invalid(
                        "Reducer::new",
                        "params",
                        format!(
                            "parameter name {:?} is registered twice (#{j} and #{i})",
                            p.name
                        ),
                    ));
                }
            }
            Ok((first_cap, cap, by_name))
        })();
        let caps = match &local {
            Ok((first, cap, _)) => format!("{first} {cap}"),
            Err(e) => format!("invalid: {e}"),
        };
        let agreed = check_same_params(comm, &params, &caps);
        let (first_cap, cap, by_name) = local?;
        agreed?;
        let sizes: Vec<(DType, usize)> = params.iter().map(|p| (p.dtype, p.numel())).collect();
        let (plans, slots) = buckets::plan(&sizes, first_cap, cap);
        let buckets = plans
            .into_iter()
            .map(|plan| {
                Ok(Bucket {
                    mem: Mem::Here(Buf::zeroed(plan.dtype, plan.numel)?),
                    pending: plan.params.len(),
                    plan,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let n = params.len();
        Ok(Reducer {
            comm: comm.dup(),
            params,
            slots,
            by_name,
            buckets,
            opts,
            sync: true,
            in_step: false,
            step_sync: true,
            accumulated: false,
            marked: vec![false; n],
            touched: vec![false; n],
            next_launch: 0,
            launched_total: 0,
            steps: 0,
            failed: None,
        })
    }

    /// The registered parameters, in model order.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// The index of parameter `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The bucket plan (in the order buckets are reduced).
    pub fn buckets(&self) -> Vec<&BucketPlan> {
        self.buckets.iter().map(|b| &b.plan).collect()
    }

    /// Where parameter `param`'s gradient lives in the buckets.
    pub fn slot(&self, param: usize) -> Option<Slot> {
        self.slots.get(param).copied()
    }

    /// The options the reducer was made with.
    pub fn options(&self) -> &ReducerOptions {
        &self.opts
    }

    /// Where bucket `bucket` is in the current step ([`BucketState::Filling`] for an index
    /// out of range).
    pub fn bucket_state(&self, bucket: usize) -> BucketState {
        match self.buckets.get(bucket).map(|b| &b.mem) {
            Some(Mem::Flying(f)) if f.test() => BucketState::Reduced,
            Some(Mem::Flying(_)) => BucketState::InFlight,
            _ => BucketState::Filling,
        }
    }

    /// Buckets whose all_reduce has been started in the open step (0 between steps).
    pub fn launched_in_step(&self) -> usize {
        if self.in_step { self.next_launch } else { 0 }
    }

    /// All_reduce calls started since the reducer was made.
    pub fn launched_total(&self) -> u64 {
        self.launched_total
    }

    /// Steps finished so far (synchronised or not).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Whether the next step synchronises (false inside [`Reducer::no_sync`]).
    pub fn is_sync(&self) -> bool {
        self.sync
    }

    /// Turns synchronisation of the following steps on or off (off: gradients accumulate
    /// locally; see the module documentation). An open step keeps the mode it started with.
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// Runs `f` with synchronisation off (PyTorch's `with ddp.no_sync():`): the steps it
    /// finishes accumulate gradients locally; the next synchronised step reduces the sum.
    pub fn no_sync<R>(&mut self, f: impl FnOnce(&mut Reducer) -> R) -> R {
        let prev = self.sync;
        self.sync = false;
        let r = f(self);
        self.sync = prev;
        r
    }

    fn check_usable(&self) -> Result<()> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn param_checked<T: Element>(&self, op: &str, param: usize, len: Option<usize>) -> Result<()> {
        let Some(p) = self.params.get(param) else {
            return Err(Error::invalid(
                op,
                "param",
                format!(
                    "index {param} is out of range: {} parameters are registered",
                    self.params.len()
                ),
            ));
        };
        if T::DTYPE != p.dtype {
            return Err(Error::invalid(
                op,
                "grad",
                format!(
                    "parameter {:?} has element type {}, the gradient {}",
                    p.name,
                    p.dtype,
                    T::DTYPE
                ),
            ));
        }
        if let Some(len) = len
            && len != p.numel()
        {
            return Err(Error::invalid(
                op,
                "grad",
                format!(
                    "parameter {:?} of shape {:?} has {} elements, the gradient {len}",
                    p.name,
                    p.shape,
                    p.numel()
                ),
            ));
        }
        if self.marked[param] {
            return Err(Error::invalid(
                op,
                "param",
                format!(
                    "parameter {:?} (#{param}) was already marked ready in this step; each \
                     parameter's gradient is handed over once per step (call finish() to end \
                     the step)",
                    p.name
                ),
            ));
        }
        Ok(())
    }

    fn begin_step(&mut self) {
        if !self.in_step {
            self.in_step = true;
            self.step_sync = self.sync;
            self.next_launch = 0;
            for b in &mut self.buckets {
                b.pending = b.plan.params.len();
            }
        }
    }

    /// The bytes of `param`'s slot; the bucket's memory must be here (it is, for a
    /// parameter not yet marked in the open step).
    fn slot_bytes(&mut self, param: usize) -> Result<&mut [u8]> {
        let s = self.slots[param];
        let size = self.params[param].dtype.size();
        match &mut self.buckets[s.bucket].mem {
            Mem::Here(buf) => Ok(&mut buf.bytes_mut()[s.offset * size..(s.offset + s.len) * size]),
            _ => Err(Error::invalid(
                "Reducer",
                "param",
                format!(
                    "the bucket of parameter {:?} is being reduced",
                    self.params[param].name
                ),
            )),
        }
    }

    /// Hands over parameter `param`'s gradient for this step (`param` indexes the
    /// registration order; see [`Reducer::index_of`]). The gradient is copied into its bucket
    /// (added, while accumulating); when the bucket and every bucket before it are complete,
    /// their all_reduce starts in the background.
    pub fn mark_ready<T: Element>(&mut self, param: usize, grad: &[T]) -> Result<()> {
        self.check_usable()?;
        self.param_checked::<T>("Reducer::mark_ready", param, Some(grad.len()))?;
        self.begin_step();
        let add = self.accumulated || self.touched[param];
        let dtype = self.params[param].dtype;
        put(
            dtype,
            self.slot_bytes(param)?,
            bytemuck::cast_slice(grad),
            add,
        )?;
        self.set_marked(param);
        Ok(())
    }

    /// [`Reducer::mark_ready`] by parameter name.
    pub fn mark_ready_by_name<T: Element>(&mut self, name: &str, grad: &[T]) -> Result<()> {
        let i = self.index_of(name).ok_or_else(|| {
            Error::invalid(
                "Reducer::mark_ready_by_name",
                "name",
                format!("no parameter {name:?} is registered"),
            )
        })?;
        self.mark_ready(i, grad)
    }

    /// Parameter `param`'s gradient slot in bucket memory, for a backward pass that
    /// accumulates into it directly: zero at the start of an accumulation window, else the
    /// sum of the earlier unsynchronised steps. Add this step's gradient, then call
    /// [`Reducer::mark_ready_in_place`]. Opens a step if none is open.
    pub fn grad_mut<T: Element>(&mut self, param: usize) -> Result<&mut [T]> {
        self.check_usable()?;
        self.param_checked::<T>("Reducer::grad_mut", param, None)?;
        self.begin_step();
        let zero = !self.accumulated && !self.touched[param];
        self.touched[param] = true;
        let bytes = self.slot_bytes(param)?;
        if zero {
            bytes.fill(0);
        }
        bytemuck::try_cast_slice_mut(bytes)
            .map_err(|e| Error::invalid("Reducer::grad_mut", "T", e.to_string()))
    }

    /// Marks parameter `param` ready with the gradient already in its slot (see
    /// [`Reducer::grad_mut`]).
    pub fn mark_ready_in_place(&mut self, param: usize) -> Result<()> {
        self.check_usable()?;
        let Some(p) = self.params.get(param) else {
            return Err(Error::invalid(
                "Reducer::mark_ready_in_place",
                "param",
                format!("index {param} is out of range"),
            ));
        };
        if !self.touched[param] && !self.accumulated {
            return Err(Error::invalid(
                "Reducer::mark_ready_in_place",
                "param",
                format!(
                    "parameter {:?} has no gradient in its slot yet: write it through grad_mut \
                     first",
                    p.name
                ),
            ));
        }
        match p.dtype {
            DType::F32 => self.param_checked::<f32>("Reducer::mark_ready_in_place", param, None)?,
            DType::F16 => self.param_checked::<f16>("Reducer::mark_ready_in_place", param, None)?,
            _ => self.param_checked::<bf16>("Reducer::mark_ready_in_place", param, None)?,
        }
        self.begin_step();
        self.set_marked(param);
        Ok(())
    }

    fn set_marked(&mut self, param: usize) {
        self.marked[param] = true;
        let b = self.slots[param].bucket;
        self.buckets[b].pending -= 1;
        if self.step_sync {
            self.launch_ready();
        }
    }

    /// Starts the all_reduce of every complete bucket whose predecessors have started.
    fn launch_ready(&mut self) {
        while let Some(b) = self.buckets.get_mut(self.next_launch) {
            if b.pending != 0 {
                break;
            }
            let mem = std::mem::replace(&mut b.mem, Mem::Lost);
            b.mem = match mem {
                Mem::Here(Buf::F32(v)) => {
                    Mem::Flying(Flying::F32(self.comm.iall_reduce(v, ReduceOp::Avg)))
                }
                Mem::Here(Buf::F16(v)) => {
                    Mem::Flying(Flying::F16(self.comm.iall_reduce(v, ReduceOp::Avg)))
                }
                Mem::Here(Buf::BF16(v)) => {
                    Mem::Flying(Flying::BF16(self.comm.iall_reduce(v, ReduceOp::Avg)))
                }
                other => other,
            };
            self.next_launch += 1;
            self.launched_total += 1;
        }
    }

    /// Ends the step: checks that every parameter was marked (or counts the unmarked ones as
    /// zero with [`ReducerOptions::find_unused_parameters`]), and in a synchronised step
    /// starts the remaining buckets and waits for all of them. Afterwards
    /// [`Reducer::grad`] gives the averaged gradients (in an unsynchronised step: this rank's
    /// sum so far).
    pub fn finish(&mut self) -> Result<()> {
        self.check_usable()?;
        self.begin_step();
        let unmarked: Vec<usize> = (0..self.params.len())
            .filter(|&i| !self.marked[i])
            .collect();
        if !unmarked.is_empty() {
            if !self.opts.find_unused_parameters {
                let names: Vec<String> = unmarked
                    .iter()
                    .take(10)
                    .map(|&i| format!("{:?}", self.params[i].name))
                    .collect();
                let more = if unmarked.len() > 10 {
                    format!(" and {} more", unmarked.len() - 10)
                } else {
                    String::new()
                };
                return Err(Error::invalid(
                    "Reducer::finish",
                    "step",
                    format!(
                        "{} of {} parameters were never marked ready in this step: {}{more}; \
                         mark them (the step stays open), or set find_unused_parameters if \
                         the model does not use every parameter in every step",
                        unmarked.len(),
                        self.params.len(),
                        names.join(", ")
                    ),
                ));
            }
            for &i in &unmarked {
                // An unused parameter contributes nothing: its slot keeps the accumulated
                // sum, or becomes zero.
                if !self.accumulated {
                    self.slot_bytes(i)?.fill(0);
                }
                self.set_marked(i);
            }
        }
        if self.step_sync {
            self.launch_ready();
            let mut first_err = None;
            for b in &mut self.buckets {
                if let Mem::Flying(_) = b.mem {
                    let Mem::Flying(f) = std::mem::replace(&mut b.mem, Mem::Lost) else {
                        continue;
                    };
                    match f.wait() {
                        Ok(buf) => b.mem = Mem::Here(buf),
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
            }
            if let Some(e) = first_err {
                self.failed = Some(e.clone());
                return Err(e);
            }
            self.accumulated = false;
        } else {
            self.accumulated = true;
        }
        self.in_step = false;
        self.marked.fill(false);
        self.touched.fill(false);
        self.steps += 1;
        Ok(())
    }

    /// Parameter `param`'s gradient after [`Reducer::finish`]: averaged over the ranks after
    /// a synchronised step, this rank's accumulated sum after an unsynchronised one. Valid
    /// until the next step's first `mark_ready`.
    pub fn grad<T: Element>(&self, param: usize) -> Result<&[T]> {
        self.check_usable()?;
        let Some(p) = self.params.get(param) else {
            return Err(Error::invalid(
                "Reducer::grad",
                "param",
                format!("index {param} is out of range"),
            ));
        };
        if T::DTYPE != p.dtype {
            return Err(Error::invalid(
                "Reducer::grad",
                "T",
                format!(
                    "parameter {:?} has element type {}, not {}",
                    p.name,
                    p.dtype,
                    T::DTYPE
                ),
            ));
        }
        let s = self.slots[param];
        let size = p.dtype.size();
        match &self.buckets[s.bucket].mem {
            Mem::Here(buf) if !self.in_step => {
                bytemuck::try_cast_slice(&buf.bytes()[s.offset * size..(s.offset + s.len) * size])
                    .map_err(|e| Error::invalid("Reducer::grad", "T", e.to_string()))
            }
            _ => Err(Error::invalid(
                "Reducer::grad",
                "param",
                format!(
                    "a step is open: the gradient of {:?} is readable after finish()",
                    p.name
                ),
            )),
        }
    }

    /// [`Reducer::grad`] by parameter name.
    pub fn grad_by_name<T: Element>(&self, name: &str) -> Result<&[T]> {
        let i = self.index_of(name).ok_or_else(|| {
            Error::invalid(
                "Reducer::grad_by_name",
                "name",
                format!("no parameter {name:?} is registered"),
            )
        })?;
        self.grad(i)
    }
}

/// A parameter's values for [`broadcast_parameters`]: a mutable slice of `f32`, `f16` or
/// `bf16` (`.into()` makes one from a slice).
#[derive(Debug)]
pub enum ParamMut<'a> {
    /// `f32` values.
    F32(&'a mut [f32]),
    /// `f16` values.
    F16(&'a mut [f16]),
    /// `bf16` values.
    BF16(&'a mut [bf16]),
}

impl<'a> From<&'a mut [f32]> for ParamMut<'a> {
    fn from(s: &'a mut [f32]) -> Self {
        ParamMut::F32(s)
    }
}

impl<'a> From<&'a mut [f16]> for ParamMut<'a> {
    fn from(s: &'a mut [f16]) -> Self {
        ParamMut::F16(s)
    }
}

impl<'a> From<&'a mut [bf16]> for ParamMut<'a> {
    fn from(s: &'a mut [bf16]) -> Self {
        ParamMut::BF16(s)
    }
}

impl<'a> From<&'a mut Vec<f32>> for ParamMut<'a> {
    fn from(s: &'a mut Vec<f32>) -> Self {
        ParamMut::F32(s)
    }
}

impl<'a> From<&'a mut Vec<f16>> for ParamMut<'a> {
    fn from(s: &'a mut Vec<f16>) -> Self {
        ParamMut::F16(s)
    }
}

impl<'a> From<&'a mut Vec<bf16>> for ParamMut<'a> {
    fn from(s: &'a mut Vec<bf16>) -> Self {
        ParamMut::BF16(s)
    }
}

/// Packs the slices of one type, broadcasts them from rank 0 in one call, unpacks.
fn broadcast_flat<T: Element>(comm: &Communicator, parts: &mut [&mut [T]]) -> Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut flat = Vec::with_capacity(total);
    for p in parts.iter() {
        flat.extend_from_slice(p);
    }
    comm.broadcast(&mut flat, 0)?;
    let mut at = 0;
    for p in parts.iter_mut() {
        p.copy_from_slice(&flat[at..at + p.len()]);
        at += p.len();
    }
    Ok(())
}

/// Copies rank 0's parameter values to every rank (what DDP does when it wraps a model), so
/// replicas start equal however each initialised them. A collective: every rank passes its
/// parameters in the same order with the same sizes; each element type takes one broadcast
/// (three in all, empty ones included), and sizes that differ between ranks fail with
/// [`Error::CollectiveMismatch`].
///
/// ```
/// use ferrocomm::{Communicator, ddp::broadcast_parameters};
/// let comms = Communicator::local_world(2);
/// std::thread::scope(|s| {
///     for comm in comms {
///         s.spawn(move || {
///             let mut w = vec![comm.rank() as f32 + 1.0; 3];
///             let mut b = vec![half::bf16::from_f32(comm.rank() as f32)];
///             broadcast_parameters(&comm, [(&mut w).into(), (&mut b).into()]).unwrap();
///             assert_eq!((w, b[0].to_f32()), (vec![1.0; 3], 0.0));
///         });
///     }
/// });
/// ```
pub fn broadcast_parameters<'a>(
    comm: &Communicator,
    params: impl IntoIterator<Item = ParamMut<'a>>,
) -> Result<()> {
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for p in params {
        match p {
            ParamMut::F32(s) => a.push(s),
            ParamMut::F16(s) => b.push(s),
            ParamMut::BF16(s) => c.push(s),
        }
    }
    broadcast_flat(comm, &mut a)?;
    broadcast_flat(comm, &mut b)?;
    broadcast_flat(comm, &mut c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference_names_position_name_and_shape() {
        let a = vec!["\"w\" [2, 3] f32".to_string(), "\"b\" [2] f32".to_string()];
        let mut b = a.clone();
        b[1] = "\"b\" [3] f32".to_string();
        let m = first_difference(&a, &b, 2);
        assert!(
            m.contains("#1") && m.contains("[2]") && m.contains("[3]") && m.contains("rank 2"),
            "{m}"
        );
        let m = first_difference(&a, &a[..1], 1);
        assert!(m.contains("only 1") && m.contains("\"b\""), "{m}");
        let m = first_difference(&a[..1], &a, 3);
        assert!(m.contains("rank 3 registers 2"), "{m}");
        let with = |caps: &str| {
            let mut l = a.clone();
            l.push(format!("{CAPS}{caps}"));
            l
        };
        let m = first_difference(&with("1 2"), &with("1 3"), 1);
        assert!(
            m.contains("bucket caps") && m.contains("1 3 on rank 1"),
            "{m}"
        );
        let m = first_difference(&with("1 2")[1..], &with("1 2"), 1);
        assert!(m.contains("parameter #0"), "{m}");
    }

    #[test]
    fn bad_options_and_types_are_refused_before_any_communication() {
        let comm = Communicator::local_world(1).pop().unwrap();
        let e = Reducer::new(
            &comm,
            vec![ParamSpec::of::<f64>("w", &[2])],
            ReducerOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"w\"") && e.contains("f64"), "{e}");
        let e = Reducer::new(
            &comm,
            vec![
                ParamSpec::of::<f32>("w", &[2]),
                ParamSpec::of::<f32>("w", &[3]),
            ],
            ReducerOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("twice"), "{e}");
        let e = Reducer::new(&comm, vec![], ReducerOptions::default().bucket_cap_mb(-1.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bucket_cap_mb"), "{e}");
    }

    #[test]
    fn single_rank_step_averages_over_one() {
        let comm = Communicator::local_world(1).pop().unwrap();
        let mut r = Reducer::new(
            &comm,
            vec![
                ParamSpec::of::<f32>("w", &[2, 2]),
                ParamSpec::of::<bf16>("b", &[2]),
            ],
            ReducerOptions::default(),
        )
        .unwrap();
        r.mark_ready(1, &[bf16::from_f32(1.5), bf16::from_f32(-2.0)])
            .unwrap();
        r.mark_ready(0, &[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        r.finish().unwrap();
        assert_eq!(r.grad::<f32>(0).unwrap(), &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(r.grad_by_name::<bf16>("b").unwrap()[1].to_f32(), -2.0);
        assert!(r.grad::<f32>(1).is_err(), "wrong type");
    }
}
