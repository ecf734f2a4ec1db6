//! Time on quorum queues: message TTL (`x-message-ttl`, a policy's `message-ttl`, a message's
//! own `expiration`), leases (`x-consumer-timeout`) and retry backoff (`x-retry-backoff`). The
//! node a publish arrives on stamps the message's expiry time in its `Enqueue` (by its clock, so
//! every replica agrees on it), and the group's leader proposes a `Tick` with its clock's time
//! whenever the replica's next timer is due (`QuorumQueue::next_timer_ms`): every replica then
//! dead-letters the expired ready messages alike (reason `expired`; the leader carries the dead
//! letters out, as for the other reasons), takes back deliveries whose lease ran out, and makes
//! ready the returned messages whose backoff is over. A lease or a backoff starts unstamped (the
//! commands that start them carry no time): the replica wakes this loop when one does
//! (`QueueGroup::timers`), and the `Tick` proposed at once stamps it.
//!
//! A message is checked for expiry while it is ready, as RabbitMQ's quorum queues do: one already
//! delivered is the consumer's until settled or returned. Between its expiry and the `Tick`'s
//! commit (a round trip to a majority) a ready message may still be delivered.

use super::quorum::QueueGroup;
use crate::clock::Clock;
use std::sync::{Arc, Weak};
use std::time::Duration;
use wharf_model::QuorumCommand;

/// The longest sleep between two looks at the replica: how late a leader that just took over
/// (or a message enqueued meanwhile) can notice its first expiry.
const LOOK_INTERVAL_MS: u64 = 1_000;

/// The least time between two looks of a leader with an expiry due (a message just expired by
/// a skewed clock, or one made ready at once again, must not turn this into a busy loop).
const TICK_SPACING_MS: u64 = 10;

/// How long a `Tick` may wait for its commit before the next look.
const TICK_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs until the group is gone (its queue deleted, or the broker stopped).
pub(crate) async fn run_timers(group: Weak<QueueGroup>, clock: Arc<dyn Clock>) {
    loop {
        let Some(found) = group.upgrade() else { return };
        let now_ms = clock.now_ms();
        let due = found.next_timer_ms();
        let leading = found.raft().metrics().borrow().state == openraft::ServerState::Leader;
        if leading && due.is_some_and(|due| due <= now_ms) {
            let answer = found.propose_and_wait(QuorumCommand::Tick { now_ms });
            drop(found);
            // One tick at a time: the next look sees what this one did.
            let _ = tokio::time::timeout(TICK_TIMEOUT, answer).await;
            tokio::time::sleep(Duration::from_millis(TICK_SPACING_MS)).await;
            continue;
        }
        let woken = found.timers_changed();
        drop(found);
        // A follower only looks again later (it may be the leader by then); the leader sleeps
        // until the first timer is due, at least `TICK_SPACING_MS` after its last tick, or until
        // the replica starts a timer that waits for its stamp.
        let sleep_ms = match due {
            Some(due) if leading => due.saturating_sub(now_ms).clamp(TICK_SPACING_MS, LOOK_INTERVAL_MS),
            _ => LOOK_INTERVAL_MS,
        };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
            () = woken.notified() => {}
        }
    }
}
