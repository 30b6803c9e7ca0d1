//! The distributed sampler: which examples of a data set a rank trains on.

use ferrocomm_rs::ddp::DistributedSampler;

use crate::error::{Fail, boundary, ferrocomm_result};
use crate::types::{out_ptr, put};

/// `flags` of `ferrocomm_sampler_indices`: keep the data set's order instead of shuffling.
pub const FERROCOMM_SAMPLER_NO_SHUFFLE: u32 = 1;
/// `flags` of `ferrocomm_sampler_indices`: drop the tail that does not divide evenly among
/// the ranks instead of padding it with repeated indices.
pub const FERROCOMM_SAMPLER_DROP_LAST: u32 = 2;

/// Computes this rank's indices into a data set of `len` examples for one epoch, like
/// PyTorch's `DistributedSampler`: every rank makes the same permutation of `0..len` from
/// `seed + epoch` (so pass a new `epoch` each epoch, or every epoch repeats the order),
/// pads it by repeating its first indices to a multiple of `world` (or trims it with
/// `FERROCOMM_SAMPLER_DROP_LAST`), and rank `rank` takes indices `rank, rank + world, ...`.
/// The shards of the ranks are disjoint and, without padding, cover every index once.
///
/// `flags`: 0 (shuffle and pad), or a combination of `FERROCOMM_SAMPLER_NO_SHUFFLE` and
/// `FERROCOMM_SAMPLER_DROP_LAST`.
///
/// Output: with `indices` NULL, only stores the number of indices in `*count` (call it
/// first to size the array). Otherwise `capacity` is the length of `indices`; the indices
/// are written in training order and their number stored in `*count`. When `capacity` is
/// too small, nothing is written except the needed number in `*count`, and the result is
/// `INVALID_ARGUMENT`.
///
/// Pure computation: no communicator needed, no communication, thread safe, does not
/// block (time and memory proportional to `len`).
///
/// Errors: `INVALID_ARGUMENT` (`world` 0, `rank` >= `world`, unknown flag bits, `count`
/// NULL, `capacity` too small).
///
/// # Safety
/// `indices` must be NULL or valid for writing `capacity` `uint64_t`; `count` must be
/// valid for writing one `size_t`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ferrocomm_sampler_indices(
    len: u64,
    world: u64,
    rank: u64,
    seed: u64,
    epoch: u64,
    flags: u32,
    indices: *mut u64,
    capacity: usize,
    count: *mut usize,
) -> ferrocomm_result {
    const OP: &str = "ferrocomm_sampler_indices";
    boundary(OP, || {
        out_ptr(OP, "count", count)?;
        let known = FERROCOMM_SAMPLER_NO_SHUFFLE | FERROCOMM_SAMPLER_DROP_LAST;
        if flags & !known != 0 {
            return Err(Fail::invalid(
                OP,
                "flags",
                format!(
                    "{flags:#x} has unknown bits {:#x} (known: FERROCOMM_SAMPLER_NO_SHUFFLE, \
                     FERROCOMM_SAMPLER_DROP_LAST)",
                    flags & !known
                ),
            ));
        }
        let size = |v: u64, arg: &str| {
            usize::try_from(v)
                .map_err(|_| Fail::invalid(OP, arg, format!("{v} does not fit in size_t")))
        };
        let mut s = DistributedSampler::new(
            size(len, "len")?,
            size(world, "world")?,
            size(rank, "rank")?,
        )?
        .seed(seed)
        .shuffle(flags & FERROCOMM_SAMPLER_NO_SHUFFLE == 0)
        .drop_last(flags & FERROCOMM_SAMPLER_DROP_LAST != 0);
        s.set_epoch(epoch);
        let n = s.num_samples();
        // SAFETY: checked non-null; valid for writes by the caller's contract.
        unsafe { put(count, n) };
        if indices.is_null() {
            return Ok(());
        }
        if capacity < n {
            return Err(Fail::invalid(
                OP,
                "capacity",
                format!("{capacity} is too small for the {n} indices of rank {rank}"),
            ));
        }
        // SAFETY: `capacity` >= n writable u64 by the caller's contract.
        let out = unsafe { std::slice::from_raw_parts_mut(indices, n) };
        for (o, i) in out.iter_mut().zip(s.indices()) {
            *o = i as u64;
        }
        Ok(())
    })
}
