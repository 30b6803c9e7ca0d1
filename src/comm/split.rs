//! Sub-communicators: [`Communicator::split`] and [`Communicator::new_group`].
//!
//! A sub-communicator is a group of some of the parent's ranks, numbered from 0, with a
//! context of its own: its point-to-point messages and collectives never match those of any
//! other communicator, so collectives on different sub-communicators may run at the same
//! time (from different threads, each with its own communicator) without interfering. All
//! communicators of a process share its one progress engine and transports.
//!
//! Contexts are derived, never negotiated: every member computes the same 64-bit value
//! from the parent's context and what identifies the new communicator, which is why the
//! calls that create communicators must be made in the same order on every member.

use std::sync::Arc;

use super::{CTX_GROUP, CTX_SPLIT, Communicator, Group, mix_ctx};
use crate::error::{Error, Result};

impl Communicator {
    /// Splits this communicator by `color`, like `MPI_Comm_split`. Every rank of this
    /// communicator must call it (it is a collective: an all_gather of colors and keys).
    ///
    /// Ranks that pass the same `Some(color)` form one new communicator, numbered by `key`
    /// (ties broken by their rank here); a rank that passes `None` (MPI_UNDEFINED) gets
    /// `None`. Each color's communicator has its own context, derived from this
    /// communicator's, a count of the communicators derived from it so far and the color;
    /// so, as for [`Communicator::dup`], every rank must create communicators from this one
    /// in the same order.
    ///
    /// ```
    /// use ferrocomm::{Communicator, ReduceOp};
    /// let comms = Communicator::local_world(4);
    /// std::thread::scope(|s| {
    ///     for comm in comms {
    ///         s.spawn(move || {
    ///             // Even and odd ranks, each in its own communicator.
    ///             let half = comm.split(Some(comm.rank() as u32 % 2), 0).unwrap().unwrap();
    ///             assert_eq!((half.size(), half.rank()), (2, comm.rank() / 2));
    ///             let mut x = [comm.rank() as u64];
    ///             half.all_reduce(&mut x, ReduceOp::Sum).unwrap();
    ///             assert_eq!(x[0], if comm.rank() % 2 == 0 { 2 } else { 4 });
    ///         });
    ///     }
    /// });
    /// ```
    pub fn split(&self, color: Option<u32>, key: i64) -> Result<Option<Communicator>> {
        let p = self.size();
        let mine = [
            i64::from(color.is_some()),
            i64::from(color.unwrap_or(0)),
            key,
        ];
        let mut all = vec![0i64; 3 * p];
        self.all_gather(&mine, &mut all)?;
        let n = self.next_child();
        let Some(color) = color else {
            return Ok(None);
        };
        let mut members: Vec<(i64, usize)> = all
            .chunks_exact(3)
            .enumerate()
            .filter(|(_, c)| c[0] == 1 && c[1] == i64::from(color))
            .map(|(r, c)| (c[2], r))
            .collect();
        members.sort_unstable();
        let world: Vec<usize> = members.iter().map(|&(_, r)| self.group.world[r]).collect();
        let ctx = mix_ctx(self.ctx, &[CTX_SPLIT, n, u64::from(color)]);
        Ok(Some(Communicator::from_shared(
            Arc::clone(&self.shared),
            ctx,
            Arc::new(Group::new(world, self.shared.world_size)),
        )))
    }

    /// A communicator of the ranks `ranks` of this one, numbered in the order given, like
    /// `MPI_Comm_create_group`: only the members call it, each with the same list in the
    /// same order, and it sends no messages.
    ///
    /// The context is derived from this communicator's, the member list, and how many
    /// groups with that list this rank created before; so members must create groups of
    /// the same list in the same order (groups of different lists may be created in any
    /// order). Fails with [`Error::InvalidArgument`] if the list is empty, repeats a rank,
    /// names a rank out of range, or does not contain this rank.
    pub fn new_group(&self, ranks: &[usize]) -> Result<Communicator> {
        let p = self.size();
        if ranks.is_empty() {
            return Err(Error::invalid("new_group", "ranks", "the list is empty"));
        }
        let mut seen = vec![false; p];
        for &r in ranks {
            if r >= p {
                return Err(Error::invalid(
                    "new_group",
                    "ranks",
                    format!("{r} is out of range for a communicator of {p} ranks"),
                ));
            }
            if std::mem::replace(&mut seen[r], true) {
                return Err(Error::invalid(
                    "new_group",
                    "ranks",
                    format!("{r} appears twice"),
                ));
            }
        }
        if !seen[self.rank()] {
            return Err(Error::invalid(
                "new_group",
                "ranks",
                format!(
                    "this rank ({}) is not in the list: only the members call new_group",
                    self.rank()
                ),
            ));
        }
        let list = mix_ctx(
            ranks.len() as u64,
            &ranks.iter().map(|&r| r as u64).collect::<Vec<_>>(),
        );
        let k = {
            let mut g = self.groups.borrow_mut();
            let k = g.entry(list).or_insert(0);
            *k += 1;
            *k
        };
        let world: Vec<usize> = ranks.iter().map(|&r| self.group.world[r]).collect();
        Ok(Communicator::from_shared(
            Arc::clone(&self.shared),
            mix_ctx(self.ctx, &[CTX_GROUP, list, k]),
            Arc::new(Group::new(world, self.shared.world_size)),
        ))
    }
}
