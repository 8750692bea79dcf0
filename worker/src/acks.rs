//! Acknowledging deliveries when several batches are in flight on one channel.
//!
//! A multiple ack (`basic.ack` with `multiple`) settles every delivery up to its tag, so
//! acking batch B's highest tag while batch A, holding lower tags, is still committing
//! would settle A's deliveries behind its back: a crash then would lose them. The window
//! remembers which tags are settled and answers the highest tag below which every
//! delivery is settled; only that is acked, as one multiple ack.
//!
//! Delivery tags start at 1 on each channel and grow by one per delivery; the worker's
//! consuming channel carries one consumer and nothing else, so the tags it sees are
//! contiguous. A new channel needs a new window.

use std::collections::BTreeSet;

#[derive(Debug)]
pub struct AckWindow {
    /// The lowest tag not acked yet.
    next: u64,
    /// Settled tags at or above `next`, waiting for the ones below them.
    settled: BTreeSet<u64>,
}

impl Default for AckWindow {
    fn default() -> Self {
        Self {
            next: 1,
            settled: BTreeSet::new(),
        }
    }
}

impl AckWindow {
    /// Records that `tags` are settled. Returns the tag to ack with `multiple` when the
    /// contiguous settled run from the lowest unacked tag grew, else None.
    pub fn settle(&mut self, tags: impl IntoIterator<Item = u64>) -> Option<u64> {
        for t in tags {
            if t >= self.next {
                self.settled.insert(t);
            }
        }
        let start = self.next;
        while self.settled.remove(&self.next) {
            self.next += 1;
        }
        (self.next > start).then(|| self.next - 1)
    }

    /// Settled tags still waiting for a lower one.
    pub fn waiting(&self) -> usize {
        self.settled.len()
    }

    /// Takes the settled tags still waiting for a lower one: when the channel is about
    /// to close with that lower one unsettled, each is acked on its own (a single ack is
    /// always allowed), so settled work is not redelivered and done twice.
    pub fn take_waiting(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.settled).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_batch_settled_first_waits_for_the_earlier_one() {
        let mut w = AckWindow::default();
        // Batch B (4..=6) commits before batch A (1..=3): nothing may be acked yet.
        assert_eq!(w.settle([4, 5, 6]), None);
        assert_eq!(w.waiting(), 3);
        // A settles: one multiple ack covers both.
        assert_eq!(w.settle([2, 1, 3]), Some(6));
        assert_eq!(w.waiting(), 0);
        // In order: each batch acks itself.
        assert_eq!(w.settle([7, 8]), Some(8));
        // A hole in the middle holds back everything above it.
        assert_eq!(w.settle([9, 11]), Some(9));
        assert_eq!(w.settle([12]), None);
        assert_eq!(w.settle([10]), Some(12));
        // A tag settled twice or below the window changes nothing.
        assert_eq!(w.settle([5, 12]), None);
        // Before a channel closes with a hole, the settled ones go one by one.
        assert_eq!(w.settle([14, 16]), None);
        assert_eq!(w.take_waiting(), [14, 16]);
        assert_eq!(w.waiting(), 0);
    }

    #[test]
    fn interleaved_batches_never_ack_an_unsettled_tag() {
        // Three batches with interleaved tags, settled in every order.
        let batches: [&[u64]; 3] = [&[1, 4, 7], &[2, 5, 8], &[3, 6, 9]];
        for order in [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ] {
            let mut w = AckWindow::default();
            let mut settled = BTreeSet::new();
            let mut acked = 0;
            for &b in &order {
                settled.extend(batches[b].iter().copied());
                if let Some(upto) = w.settle(batches[b].iter().copied()) {
                    assert!((1..=upto).all(|t| settled.contains(&t)), "{order:?}");
                    acked = upto;
                }
            }
            assert_eq!(acked, 9, "{order:?}");
        }
    }
}
