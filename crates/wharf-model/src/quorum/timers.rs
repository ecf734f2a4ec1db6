//! Time on a quorum queue: message TTL, leases (`x-consumer-timeout`) and retry backoff
//! (`x-retry-backoff`), all carried out by the `Tick` command, which brings the time of the
//! leader that proposed it (the machine has no clock of its own, so every replica decides
//! alike).
//!
//! A lease starts when a message is checked out and a backoff when it is returned, but neither
//! command carries a time. So each starts *unstamped*: the next `Tick` stamps it with its time
//! plus the lease or the backoff step, and a later `Tick` past that time carries it out (the
//! leader proposes a `Tick` at once when something waits for its stamp, see
//! [`QuorumQueue::next_timer_ms`]). A lease thus starts a commit round trip after the delivery,
//! never before it. A lease that runs out takes the message back from its consumer, as a return
//! (delivery count kept, redelivered, past the delivery limit dead-lettered, and on a queue with
//! a backoff waiting out its step); the consumer's late settle of it is then ignored. A backoff
//! that runs out makes the message ready again, in its place by id.

use super::{QuorumDeathReason, QuorumEffect, QuorumMessageId, QuorumQueue};

impl QuorumQueue {
    /// Applies `Tick { now_ms }`: leases run out, backoffs end, ready messages expire.
    pub(super) fn tick(&mut self, now_ms: u64, effects: &mut Vec<QuorumEffect>) {
        if let Some(lease_ms) = self.settings.lease_ms {
            let mut ran_out = Vec::new();
            for id in &self.leased {
                let Some(held) = self.messages.get_mut(id) else { continue };
                match held.due_ms {
                    None => held.due_ms = Some(now_ms.saturating_add(lease_ms)),
                    Some(due) if due <= now_ms => ran_out.push(*id),
                    Some(_) => {}
                }
            }
            for id in ran_out {
                let Some(consumer) = self.messages.get(&id).and_then(|held| held.checked_out_to.clone()) else {
                    continue;
                };
                self.release(&consumer, id);
                self.requeue(id, effects);
                self.forget_if_done(&consumer);
            }
        }
        let mut ready_again = Vec::new();
        for id in &self.waiting {
            let Some(held) = self.messages.get_mut(id) else { continue };
            match held.due_ms {
                None => {
                    let step = backoff_step_ms(&self.settings.retry_backoff_ms, held.delivery_count);
                    held.due_ms = Some(now_ms.saturating_add(step));
                    if step == 0 {
                        ready_again.push(*id);
                    }
                }
                Some(due) if due <= now_ms => ready_again.push(*id),
                Some(_) => {}
            }
        }
        for id in ready_again {
            self.waiting.remove(&id);
            if let Some(held) = self.messages.get_mut(&id) {
                held.due_ms = None;
            }
            self.make_ready(id);
        }
        let expired: Vec<QuorumMessageId> = self
            .ready
            .iter()
            .copied()
            .filter(|id| self.messages.get(id).and_then(|held| held.expires_at_ms).is_some_and(|at| at <= now_ms))
            .collect();
        for id in expired {
            self.take_ready(id);
            self.dead_letter(id, QuorumDeathReason::Expired, effects);
        }
        // Every lease and backoff is stamped now (those of queues without leases or backoff
        // never start).
        self.unstamped = super::UnstampedHint(false);
    }

    /// When the leader should next propose a `Tick`: `Some(0)` (now) when a lease or a backoff
    /// waits for its stamp, else the earliest of the ready messages' expiries, the leases and
    /// the backoffs; `None` when nothing waits on time. A scan: called by the leader's timer
    /// loop, not per command.
    pub fn next_timer_ms(&self) -> Option<u64> {
        let mut next = self.earliest_ready_expiry_ms();
        for id in self.leased.iter().chain(&self.waiting) {
            match self.messages.get(id).map(|held| held.due_ms) {
                Some(None) => return Some(0),
                Some(Some(due)) => next = Some(next.map_or(due, |next| next.min(due))),
                None => {}
            }
        }
        next
    }

    /// Whether a lease or a backoff may wait for a `Tick` to stamp it: O(1), asked by the leader
    /// after every entry (a hint set when one starts and cleared by the `Tick` that stamps them,
    /// so it may say yes once too often, never no too soon).
    pub fn has_unstamped_timers(&self) -> bool {
        self.unstamped.0
    }

    /// Sets the hint from the state (after a snapshot is read): a scan, once.
    pub(super) fn note_unstamped_timers(&mut self) {
        let unstamped = self
            .leased
            .iter()
            .chain(&self.waiting)
            .any(|id| self.messages.get(id).is_some_and(|held| held.due_ms.is_none()));
        self.unstamped = super::UnstampedHint(unstamped);
    }
}

/// The backoff before a message delivered `delivery_count` times is ready again: the step for
/// that attempt, the last step repeating (as a classic queue's `QueueSettings::backoff_ms`).
fn backoff_step_ms(steps: &[u64], delivery_count: u32) -> u64 {
    let Some(last) = steps.len().checked_sub(1) else { return 0 };
    let attempt = (delivery_count.max(1) - 1) as usize;
    steps[attempt.min(last)]
}
