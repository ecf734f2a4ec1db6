//! The queue's consumers and its use: the round-robin order dispatch serves them in, consumer
//! priorities (`x-priority`), exclusive and single active consumers, auto-delete with the last consumer, and the `x-expires`
//! countdown that runs while the queue has none. Kept apart from where the queue's messages are
//! (`queue.rs`), which none of this touches.

use super::{ChannelKey, Queue};

impl Queue {
    /// Attaches a consumer at the end of the round-robin order; it holds the queue alone if
    /// `exclusive`. The queue counts as used at `now_ms` and as having had a consumer (so an
    /// auto-delete queue goes with its last one).
    pub(crate) fn attach_consumer(&mut self, key: ChannelKey, tag: &str, exclusive: bool, priority: i32, now_ms: u64) {
        self.consumers.push((key, tag.to_owned()));
        self.consumer_priorities.push(priority);
        self.had_consumer = true;
        self.last_used_ms = now_ms;
        if exclusive {
            self.exclusive_consumer = Some((key, tag.to_owned()));
        }
    }

    /// Detaches a consumer (and its exclusive hold, if it had one); the round-robin position
    /// starts over if it pointed past the end.
    pub(crate) fn detach_consumer(&mut self, key: ChannelKey, tag: &str) {
        if let Some(index) =
            self.consumers.iter().position(|(owner, consumer_tag)| *owner == key && consumer_tag == tag)
        {
            self.consumers.remove(index);
            self.consumer_priorities.remove(index);
            if index < self.next_consumer {
                // Keep pointing at the same next consumer.
                self.next_consumer -= 1;
            }
        }
        if self.exclusive_consumer.as_ref().is_some_and(|(owner, consumer_tag)| *owner == key && consumer_tag == tag) {
            self.exclusive_consumer = None;
        }
        if self.next_consumer >= self.consumers.len() {
            self.next_consumer = 0;
        }
    }

    /// Detaches every consumer (the queue is being deleted); returns them, for the broker to
    /// cancel.
    pub(crate) fn take_consumers(&mut self) -> Vec<(ChannelKey, String)> {
        self.exclusive_consumer = None;
        self.next_consumer = 0;
        self.consumer_priorities.clear();
        std::mem::take(&mut self.consumers)
    }

    /// True if a consumer holds the queue exclusively.
    pub(crate) fn has_exclusive_consumer(&self) -> bool {
        self.exclusive_consumer.is_some()
    }

    /// True for an auto-delete queue whose last consumer went: it must be deleted now.
    pub(crate) fn auto_delete_due(&self) -> bool {
        self.auto_delete && self.had_consumer && self.consumers.is_empty()
    }

    /// The next consumer to serve: round-robin from the one after the last served, the first
    /// that `has_room` accepts, which then counts as the last served. With consumer priorities,
    /// the highest priority that has a consumer with room is served, round-robin among its
    /// consumers (RabbitMQ: lower priorities get messages only while the higher ones are
    /// blocked). With a single active consumer only the first (the oldest) is ever served, as in
    /// RabbitMQ 3.10, whose single active consumer does not look at priorities.
    pub(crate) fn next_consumer_with_room(
        &mut self,
        mut has_room: impl FnMut(&ChannelKey, &str) -> bool,
    ) -> Option<(ChannelKey, String)> {
        let count =
            if self.settings.single_active_consumer { self.consumers.len().min(1) } else { self.consumers.len() };
        if self.next_consumer >= count {
            self.next_consumer = 0;
        }
        let highest = self.consumer_priorities.iter().max().copied().unwrap_or(0);
        let mixed = count > 1 && self.consumer_priorities.iter().any(|priority| *priority != highest);
        if mixed {
            // One pass in round-robin order: the first consumer with room at the highest
            // priority found (stopping early at the highest there is).
            let mut best: Option<usize> = None;
            for step in 0..count {
                let index = (self.next_consumer + step) % count;
                let priority = self.consumer_priorities[index];
                if best.is_some_and(|best| self.consumer_priorities[best] >= priority) {
                    continue;
                }
                let (key, tag) = &self.consumers[index];
                if has_room(key, tag) {
                    best = Some(index);
                    if priority == highest {
                        break;
                    }
                }
            }
            let index = best?;
            self.next_consumer = (index + 1) % count;
            return Some(self.consumers[index].clone());
        }
        for step in 0..count {
            let index = (self.next_consumer + step) % count;
            let (key, tag) = &self.consumers[index];
            if has_room(key, tag) {
                self.next_consumer = (index + 1) % count;
                return Some(self.consumers[index].clone());
            }
        }
        None
    }

    /// Marks the queue used at `now_ms`: its `x-expires` countdown starts again. Returns when an
    /// `x-expires` timer must be armed, if the queue has the setting and none is armed (one timer
    /// per queue: when it fires it arms itself again if the queue was used meanwhile).
    pub(crate) fn touch(&mut self, now_ms: u64) -> Option<u64> {
        self.last_used_ms = now_ms;
        let expires_ms = self.settings.expires_ms?;
        if self.expires_timer_ms.is_some() {
            return None;
        }
        let due_ms = now_ms.saturating_add(expires_ms);
        self.expires_timer_ms = Some(due_ms);
        Some(due_ms)
    }

    /// After a policy change: when an `x-expires` timer must be armed for a queue that now has
    /// the setting, has no consumer and has none armed (due `expires` after its last use).
    pub(crate) fn arm_expires_if_unused(&mut self) -> Option<u64> {
        let expires_ms = self.settings.expires_ms?;
        if self.expires_timer_ms.is_some() || !self.consumers.is_empty() {
            return None;
        }
        let due_ms = self.last_used_ms.saturating_add(expires_ms);
        self.expires_timer_ms = Some(due_ms);
        Some(due_ms)
    }

    /// The `x-expires` timer fired at `now_ms`: the queue is to be deleted if it has had no
    /// consumer and no use for that long; if it was used meanwhile the timer is armed again for
    /// the new due time (a queue with consumers is armed again when the last one goes).
    pub(crate) fn expires_timer_fired(&mut self, now_ms: u64) -> Unused {
        self.expires_timer_ms = None;
        let Some(expires_ms) = self.settings.expires_ms else { return Unused::Keep };
        if !self.consumers.is_empty() {
            return Unused::Keep;
        }
        let due_ms = self.last_used_ms.saturating_add(expires_ms);
        if due_ms <= now_ms {
            return Unused::Delete;
        }
        self.expires_timer_ms = Some(due_ms);
        Unused::ArmAgain { due_ms }
    }
}

/// What the queue's `x-expires` timer found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unused {
    /// In use, or without `x-expires`: nothing to do.
    Keep,
    /// Unused for its whole `x-expires`: delete it.
    Delete,
    /// Used meanwhile: arm the timer again for `due_ms`.
    ArmAgain {
        /// When it would expire now.
        due_ms: u64,
    },
}
