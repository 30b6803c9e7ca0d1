//! How gradients are grouped into buckets for all_reduce, the way PyTorch's DDP does it.
//!
//! Gradients become ready back to front during the backward pass, so parameters are
//! assigned to buckets in reverse registration order. A bucket holds parameters of one
//! element type only and is closed when adding the next parameter would exceed its cap: the
//! first bucket of each type has a small cap (1 MiB by default) so that the first all_reduce starts early
//! in the backward pass, the others' large (25 MiB) so that each all_reduce is big enough to
//! run at full bandwidth. A single parameter larger than the cap gets a bucket of its own.

use crate::element::DType;

/// Where one parameter's gradient lives in the buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Bucket index.
    pub bucket: usize,
    /// Offset in the bucket, in elements.
    pub offset: usize,
    /// Length in elements.
    pub len: usize,
}

/// One bucket: its element type and its parameters (indices into the registration order),
/// in the order their gradients are expected to become ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketPlan {
    /// Element type of every parameter in the bucket.
    pub dtype: DType,
    /// Parameters, in bucket order.
    pub params: Vec<usize>,
    /// Total elements.
    pub numel: usize,
}

/// Assigns parameters of the given types and sizes (in registration order) to buckets.
/// Returns the buckets (in the order they fill during backward) and each parameter's slot.
pub fn plan(
    params: &[(DType, usize)],
    first_cap_bytes: usize,
    cap_bytes: usize,
) -> (Vec<BucketPlan>, Vec<Slot>) {
    let mut buckets: Vec<BucketPlan> = Vec::new();
    let mut slots = vec![
        Slot {
            bucket: 0,
            offset: 0,
            len: 0
        };
        params.len()
    ];
    // For each element type: the bucket being filled, and whether it is the type's first.
    let mut open: Vec<(DType, usize, bool)> = Vec::new();
    for (i, &(dtype, numel)) in params.iter().enumerate().rev() {
        let bytes = numel * dtype.size();
        let current = open.iter().position(|&(d, _, _)| d == dtype);
        let fits = current.is_some_and(|k| {
            let (_, b, first) = open[k];
            let cap = if first { first_cap_bytes } else { cap_bytes };
            buckets[b].numel * dtype.size() + bytes <= cap
        });
        let b = match (current, fits) {
            (Some(k), true) => open[k].1,
            _ => {
                buckets.push(BucketPlan {
                    dtype,
                    params: Vec::new(),
                    numel: 0,
                });
                let b = buckets.len() - 1;
                match current {
                    Some(k) => open[k] = (dtype, b, false),
                    None => open.push((dtype, b, true)),
                }
                b
            }
        };
        slots[i] = Slot {
            bucket: b,
            offset: buckets[b].numel,
            len: numel,
        };
        buckets[b].params.push(i);
        buckets[b].numel += numel;
    }
    (buckets, slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn reverse_order_small_first_bucket() {
        // Ten f32 parameters of 512 KiB each (131072 elements).
        let params = vec![(DType::F32, 131_072); 10];
        let (buckets, slots) = plan(&params, MIB, 2 * MIB);
        let groups: Vec<Vec<usize>> = buckets.iter().map(|b| b.params.clone()).collect();
        assert_eq!(groups, vec![vec![9, 8], vec![7, 6, 5, 4], vec![3, 2, 1, 0]]);
        assert_eq!(
            slots[9],
            Slot {
                bucket: 0,
                offset: 0,
                len: 131_072
            }
        );
        assert_eq!(
            slots[8],
            Slot {
                bucket: 0,
                offset: 131_072,
                len: 131_072
            }
        );
        assert_eq!(slots[0].bucket, 2);
    }

    #[test]
    fn types_are_never_mixed_and_big_params_stand_alone() {
        let params = vec![
            (DType::F32, 10),
            (DType::BF16, 10),
            (DType::F32, 10 * MIB),
            (DType::BF16, 20),
        ];
        let (buckets, slots) = plan(&params, MIB, 2 * MIB);
        for b in &buckets {
            assert!(b.params.iter().all(|&p| params[p].0 == b.dtype));
        }
        // The 40 MiB parameter is alone in its bucket.
        let big = slots[2].bucket;
        assert_eq!(buckets[big].params, vec![2]);
    }

    proptest! {
        #[test]
        fn every_parameter_once_within_caps(sizes in proptest::collection::vec((0usize..3, 1usize..400_000), 0..60)) {
            let types = [DType::F32, DType::F16, DType::BF16];
            let params: Vec<(DType, usize)> = sizes.iter().map(|&(t, n)| (types[t], n)).collect();
            let (buckets, slots) = plan(&params, MIB, 4 * MIB);
            let mut seen = vec![0; params.len()];
            for (b, bucket) in buckets.iter().enumerate() {
                let mut offset = 0;
                for &p in &bucket.params {
                    seen[p] += 1;
                    prop_assert_eq!(slots[p], Slot { bucket: b, offset, len: params[p].1 });
                    offset += params[p].1;
                }
                prop_assert_eq!(offset, bucket.numel);
                let first_of_type = buckets[..b].iter().all(|o| o.dtype != bucket.dtype);
                let cap = if first_of_type { MIB } else { 4 * MIB };
                prop_assert!(bucket.numel * bucket.dtype.size() <= cap || bucket.params.len() == 1);
                // Within a bucket, parameters are in reverse registration order.
                prop_assert!(bucket.params.windows(2).all(|w| w[0] > w[1]));
            }
            prop_assert!(seen.iter().all(|&c| c == 1));
        }
    }
}
