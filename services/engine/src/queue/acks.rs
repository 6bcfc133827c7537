//! The deliveries one consumer holds on one AMQP channel, and how to ack
//! them. A channel numbers its deliveries with one tag sequence over every
//! queue consumed on it, and an ack with `multiple` settles every
//! unacknowledged tag up to its own on the whole channel, also those still
//! waiting unseen in another partition's consumer buffer. So a batch may
//! hold tag 9 while tag 7 waits unseen: a `multiple` ack through 9 would
//! settle 7 unprocessed, and 7 would be lost with the channel (301 of
//! 20,000 orders once). Acks go `multiple` only up to the highest tag
//! below which every tag has been taken; above it, one by one.
//!
//! Used by the RabbitMQ consumer and by the simulator's broker model, so
//! that the simulator runs this very bookkeeping against RabbitMQ's rules.

use crate::mutants::{self, Mutant};
use std::collections::{BTreeMap, BTreeSet};

/// What to send to settle every held delivery through a tag.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AckPlan {
    /// One ack with `multiple` through this tag.
    pub multiple_through: Option<u64>,
    /// Then one single ack each.
    pub singles: Vec<u64>,
}

/// The deliveries taken on one channel and not yet settled, by tag.
#[derive(Debug)]
pub struct ChannelAcks<D> {
    held: BTreeMap<u64, D>,
    /// Every tag up to this one has been taken.
    seen_through: u64,
    /// Tags taken above `seen_through` (waiting for the gap below to fill).
    seen_ahead: BTreeSet<u64>,
}

impl<D> Default for ChannelAcks<D> {
    fn default() -> Self {
        Self {
            held: BTreeMap::new(),
            seen_through: 0,
            seen_ahead: BTreeSet::new(),
        }
    }
}

impl<D> ChannelAcks<D> {
    /// A delivery was taken from the channel.
    pub fn took(&mut self, tag: u64, delivery: D) {
        self.held.insert(tag, delivery);
        self.seen_ahead.insert(tag);
        while self.seen_ahead.remove(&(self.seen_through + 1)) {
            self.seen_through += 1;
        }
    }

    pub fn get(&self, tag: u64) -> Option<&D> {
        self.held.get(&tag)
    }

    /// Settled on its own (a dead letter): no longer held.
    pub fn remove(&mut self, tag: u64) -> Option<D> {
        self.held.remove(&tag)
    }

    /// How to settle every held delivery through `tag`.
    pub fn plan(&self, tag: u64) -> AckPlan {
        let seen_through = if mutants::active(Mutant::AckPastUnseen) {
            u64::MAX
        } else {
            self.seen_through
        };
        plan_acks(self.held.keys().copied(), seen_through, tag)
    }

    /// Every held delivery through `tag` was settled.
    pub fn settled_through(&mut self, tag: u64) {
        self.held.retain(|t, _| *t > tag);
    }
}

/// One `multiple` ack through the newest held tag at or below both `tag`
/// and `seen_through`, and single acks for the held tags above that, up
/// to `tag`.
fn plan_acks(held: impl Iterator<Item = u64>, seen_through: u64, tag: u64) -> AckPlan {
    let safe = tag.min(seen_through);
    let mut plan = AckPlan::default();
    for t in held.filter(|t| *t <= tag) {
        if t <= safe {
            plan.multiple_through = plan.multiple_through.max(Some(t));
        } else {
            plan.singles.push(t);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holding(tags: &[u64]) -> ChannelAcks<()> {
        let mut acks = ChannelAcks::default();
        for t in tags {
            acks.took(*t, ());
        }
        acks
    }

    fn plan(through: Option<u64>, singles: &[u64]) -> AckPlan {
        AckPlan {
            multiple_through: through,
            singles: singles.to_vec(),
        }
    }

    #[test]
    fn acks_go_multiple_only_where_no_tag_is_unseen() {
        // Nothing unseen: one multiple ack through the newest held tag.
        assert_eq!(holding(&[1, 2, 3]).plan(3), plan(Some(3), &[]));
        // Tags 1, 3, 5 taken while 2 and 4 wait in another partition's
        // consumer: multiple through 1 only, then 3 and 5 each alone.
        assert_eq!(holding(&[1, 3, 5]).plan(5), plan(Some(1), &[3, 5]));
        // Held tags above the ack's own stay held.
        let mut acks = holding(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        acks.settled_through(3);
        assert_eq!(acks.plan(6), plan(Some(6), &[]));
        acks.settled_through(6);
        assert_eq!(acks.plan(9), plan(Some(9), &[]));
        // Tag 5 unseen: multiple through 4, then 6 alone.
        let acks = holding(&[1, 2, 3, 4, 6, 9]);
        assert_eq!(acks.plan(6), plan(Some(4), &[6]));
        // Nothing below the gap is held: single acks only.
        let mut acks = holding(&[1, 2, 3, 4, 5, 6, 7, 9, 10]);
        acks.settled_through(7);
        assert_eq!(acks.plan(10), plan(None, &[9, 10]));
        // Once the gap fills, multiple again.
        acks.took(8, ());
        assert_eq!(acks.plan(10), plan(Some(10), &[]));
    }
}
