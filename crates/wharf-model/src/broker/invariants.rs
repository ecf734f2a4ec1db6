//! [`BrokerModel::check_invariants`]: a test assertion that the broker's structures agree with
//! each other. Each vhost and queue checks itself (`VirtualHost::check_invariants`,
//! `Queue::check_invariants`); what only the broker can check is what spans them: a channel's
//! unsettled deliveries against the queues' unacknowledged entries, consumers as the channels
//! and the queues each list them, prefetch counts against the deliveries they count, and the
//! timers every pending thing relies on. Always compiled, for the reason given in
//! `queue/invariants.rs`; only the tests call it.

use super::timers::Timer;
use super::{BrokerModel, EXPIRED_TAGS_PER_CHANNEL_MAX};
use crate::queue::ChannelKey;
use std::collections::HashMap;

impl BrokerModel {
    /// Panics, naming the broken invariant, unless every vhost and queue passes its own check
    /// and: every unacknowledged entry of every queue is held by exactly one unsettled delivery
    /// on an open channel, whose delivery tag maps back to it; every unsettled delivery of a
    /// queue that still exists names one of its unacknowledged entries; each channel's and each
    /// consumer's unacknowledged counts equal the deliveries they count; channels and queues list
    /// the same consumers; delivery tags and expired tags are below the channel's next tag, apart
    /// and bounded; and every lease, backoff, expiry, `x-expires` and delayed-message timer the
    /// state relies on is set (and every lease timer belongs to a delivery).
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        for (name, vhost) in &self.vhosts {
            assert_eq!(name, vhost.name(), "invariant broken: vhost '{}' filed as '{name}'", vhost.name());
            vhost.check_invariants();
        }
        let holders = self.check_channels();
        self.check_queues(&holders);
        for (due_ms, timer) in &self.timers {
            let Timer::Lease { channel: key, generation, delivery_tag } = timer else { continue };
            let belongs = self.channels.get(key).is_some_and(|channel| {
                channel.generation == *generation
                    && channel
                        .unacked
                        .get(delivery_tag)
                        .is_some_and(|outstanding| outstanding.lease_due_ms == Some(*due_ms))
            });
            assert!(
                belongs,
                "invariant broken: a lease timer at {due_ms} for delivery tag {delivery_tag} on channel {key:?} (generation {generation}) belongs to no unsettled delivery"
            );
        }
    }

    /// The channel side: returns which (channel, delivery tag) holds each unacknowledged entry,
    /// by (vhost, queue, entry id).
    fn check_channels(&self) -> HashMap<(&str, &str, u64), (ChannelKey, u64)> {
        let mut holders: HashMap<(&str, &str, u64), (ChannelKey, u64)> = HashMap::new();
        for (key, channel) in &self.channels {
            let Some(vhost) = self.vhosts.get(&channel.vhost) else {
                panic!("invariant broken: channel {key:?} is bound to vhost '{}', which does not exist", channel.vhost);
            };
            let below_next = |tag: &u64| *tag < channel.next_delivery_tag;
            assert!(
                channel.unacked.keys().all(below_next) && channel.expired_tags.iter().all(below_next),
                "invariant broken: channel {key:?} holds a delivery tag not below its next tag {}",
                channel.next_delivery_tag
            );
            if let Some(tag) = channel.expired_tags.iter().find(|tag| channel.unacked.contains_key(tag)) {
                panic!("invariant broken: delivery tag {tag} on channel {key:?} is both unsettled and expired");
            }
            assert!(
                channel.expired_tags.len() <= EXPIRED_TAGS_PER_CHANNEL_MAX,
                "invariant broken: channel {key:?} remembers {} expired tags",
                channel.expired_tags.len()
            );
            let counted = channel.unacked.values().filter(|outstanding| outstanding.consumer.is_some()).count();
            assert_eq!(
                channel.consumer_unacked as usize, counted,
                "invariant broken: channel {key:?} has consumer_unacked {} but {counted} unsettled consumer deliveries",
                channel.consumer_unacked
            );
            for (tag, consumer) in &channel.consumers {
                let instance = Some((tag.clone(), consumer.instance));
                let counted = channel.unacked.values().filter(|outstanding| outstanding.consumer == instance).count();
                assert_eq!(
                    consumer.unacked as usize, counted,
                    "invariant broken: consumer '{tag}' on channel {key:?} counts {} unacked but has {counted} unsettled deliveries",
                    consumer.unacked
                );
                let attached = vhost
                    .queue(&consumer.queue)
                    .is_some_and(|queue| queue.consumers().iter().any(|(owner, listed)| owner == key && listed == tag));
                assert!(
                    attached,
                    "invariant broken: consumer '{tag}' on channel {key:?} reads queue '{}', which does not list it",
                    consumer.queue
                );
            }
            for (delivery_tag, outstanding) in &channel.unacked {
                if let Some(due_ms) = outstanding.lease_due_ms.filter(|_| outstanding.own_lease_timer) {
                    let timer =
                        Timer::Lease { channel: *key, generation: channel.generation, delivery_tag: *delivery_tag };
                    assert!(
                        self.timers.contains(&(due_ms, timer)),
                        "invariant broken: delivery tag {delivery_tag} on channel {key:?} has a lease due at {due_ms} but no timer for it"
                    );
                }
                if let Some(due_ms) = outstanding.lease_due_ms.filter(|_| !outstanding.own_lease_timer) {
                    let swept = self.timers.iter().any(|(at, timer)| *timer == Timer::DefaultLeases && *at <= due_ms);
                    assert!(
                        swept,
                        "invariant broken: delivery tag {delivery_tag} on channel {key:?} has a default lease due at {due_ms} but no sweep timer by then"
                    );
                }
                // A quorum queue's delivery is held by its replicated state machine, not here.
                if outstanding.gone || outstanding.replicated {
                    continue;
                }
                let held = vhost
                    .queue(&outstanding.queue)
                    .is_some_and(|queue| queue.unacked_ids().any(|id| id == outstanding.entry_id));
                assert!(
                    held,
                    "invariant broken: delivery tag {delivery_tag} on channel {key:?} names entry {} of queue '{}', which does not hold it unacknowledged",
                    outstanding.entry_id, outstanding.queue
                );
                let place = (channel.vhost.as_str(), outstanding.queue.as_str(), outstanding.entry_id);
                if let Some(other) = holders.insert(place, (*key, *delivery_tag)) {
                    panic!(
                        "invariant broken: entry {} of queue '{}' is unsettled twice, on {other:?} and as tag {delivery_tag} on {key:?}",
                        outstanding.entry_id, outstanding.queue
                    );
                }
            }
        }
        holders
    }

    /// The queue side: each unacknowledged entry has its holder, each consumer its channel, and
    /// each pending backoff, expiry and `x-expires` its timer; each delayed hold its timer.
    fn check_queues(&self, holders: &HashMap<(&str, &str, u64), (ChannelKey, u64)>) {
        for (vhost_name, vhost) in &self.vhosts {
            for queue in vhost.queues() {
                let name = queue.name.as_str();
                for entry in queue.entries() {
                    let events = entry.trace.as_ref().map_or(0, |trace| trace.events.len());
                    let bound = if self.trace_events_max == 0 { 0 } else { self.trace_events_max.max(2) };
                    assert!(
                        events <= bound,
                        "invariant broken: entry {} of queue '{name}' keeps {events} trace events, over {bound}",
                        entry.id
                    );
                }
                if let Some(id) =
                    queue.unacked_ids().find(|id| !holders.contains_key(&(vhost_name.as_str(), name, *id)))
                {
                    panic!("invariant broken: entry {id} of queue '{name}' is unacknowledged but no channel holds it");
                }
                for (key, tag) in queue.consumers() {
                    let listed = self.channels.get(key).is_some_and(|channel| {
                        channel.vhost == *vhost_name
                            && channel.consumers.get(tag).is_some_and(|consumer| consumer.queue == name)
                    });
                    assert!(
                        listed,
                        "invariant broken: queue '{name}' lists consumer '{tag}' on channel {key:?}, which does not read it"
                    );
                }
                let incarnation = queue.incarnation();
                let queue_timer = |due_ms: u64, timer: Timer| self.timers.contains(&(due_ms, timer));
                for id in queue.waiting_ids() {
                    let armed = self.timers.iter().any(|(_, timer)| {
                        *timer == Timer::Backoff { vhost: vhost_name.clone(), queue: name.to_owned(), incarnation, id }
                    });
                    assert!(
                        armed,
                        "invariant broken: entry {id} of queue '{name}' waits out a backoff with no timer to end it"
                    );
                }
                let (earliest_ms, armed_ms) = queue.expiry_timing();
                if let Some(earliest_ms) = earliest_ms {
                    assert!(
                        armed_ms.is_some_and(|armed_ms| armed_ms <= earliest_ms),
                        "invariant broken: queue '{name}' has a message expiring at {earliest_ms} but its expiry timer is armed for {armed_ms:?}"
                    );
                }
                if let Some(armed_ms) = armed_ms {
                    let timer = Timer::Expiry { vhost: vhost_name.clone(), queue: name.to_owned(), incarnation };
                    assert!(
                        queue_timer(armed_ms, timer),
                        "invariant broken: queue '{name}' counts an expiry timer at {armed_ms} that is not set"
                    );
                }
                if let Some(due_ms) = queue.expires_timer_ms() {
                    let timer = Timer::QueueExpires { vhost: vhost_name.clone(), queue: name.to_owned(), incarnation };
                    assert!(
                        queue_timer(due_ms, timer),
                        "invariant broken: queue '{name}' counts an x-expires timer at {due_ms} that is not set"
                    );
                }
            }
            for (exchange, hold) in &vhost.delayed {
                let first_due_ms = hold.due.keys().next().map(|(due_ms, _)| *due_ms);
                if let Some(first_due_ms) = first_due_ms {
                    assert!(
                        hold.timer_ms.is_some_and(|armed_ms| armed_ms <= first_due_ms),
                        "invariant broken: delayed exchange '{exchange}' holds a message due at {first_due_ms} but its timer is armed for {:?}",
                        hold.timer_ms
                    );
                }
                if let Some(armed_ms) = hold.timer_ms {
                    let timer = Timer::Delayed { vhost: vhost_name.clone(), exchange: exchange.clone() };
                    assert!(
                        self.timers.contains(&(armed_ms, timer)),
                        "invariant broken: delayed exchange '{exchange}' counts a timer at {armed_ms} that is not set"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::message::Message;
    use crate::queue::{ChannelKey, ConnectionId};
    use crate::vhost::QueueDeclare;
    use crate::{BrokerModel, Effects};
    use bytes::Bytes;
    use std::sync::Arc;
    use wharf_wire::protocol::BasicProperties;
    use wharf_wire::types::FieldTable;

    const CHANNEL: ChannelKey = ChannelKey { connection: ConnectionId(1), channel: 1 };

    fn message(body: &str) -> Arc<Message> {
        Arc::new(Message::new(
            String::new(),
            "q".into(),
            std::sync::Arc::new(BasicProperties::default()),
            Bytes::new(),
            Bytes::from(body.to_owned()),
        ))
    }

    /// A broker with a queue `q`, a consumer on it holding one delivery, and a message fetched
    /// with `basic.get` and not yet acknowledged.
    fn broker_with_deliveries() -> BrokerModel {
        let mut broker = BrokerModel::new(1);
        let arguments = FieldTable::default();
        let declare = QueueDeclare {
            name: "q",
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: &arguments,
            connection: ConnectionId(1),
            server_named: false,
            store_log: None,
            dedup_log: None,
        };
        broker.vhost_mut("/").unwrap().declare_queue(&declare).unwrap();
        broker.open_channel(CHANNEL, "/").unwrap();
        for body in ["m1", "m2", "m3"] {
            broker.enqueue("/", "q", message(body), None);
        }
        let (fetched, _) = broker.get(CHANNEL, "q", false).unwrap();
        assert!(fetched.is_some());
        broker.qos(CHANNEL, 1, false).unwrap();
        let (_, effects): (String, Effects) = broker.consume(CHANNEL, "q", "c", false, false).unwrap();
        assert_eq!(effects.deliveries.len(), 1);
        broker.check_invariants();
        broker
    }

    #[test]
    fn a_broker_with_deliveries_and_consumers_passes() {
        let mut broker = broker_with_deliveries();
        broker.ack(CHANNEL, 2, false).unwrap();
        broker.check_invariants();
        broker.close_channel(CHANNEL);
        broker.check_invariants();
    }

    #[test]
    #[should_panic(expected = "is unacknowledged but no channel holds it")]
    fn an_unacknowledged_entry_no_channel_holds_is_caught() {
        let mut broker = broker_with_deliveries();
        let channel = broker.channels.get_mut(&CHANNEL).unwrap();
        channel.unacked.remove(&1);
        broker.check_invariants();
    }

    #[test]
    #[should_panic(expected = "has consumer_unacked")]
    fn a_miscounted_channel_prefetch_is_caught() {
        let mut broker = broker_with_deliveries();
        broker.channels.get_mut(&CHANNEL).unwrap().consumer_unacked += 1;
        broker.check_invariants();
    }

    #[test]
    #[should_panic(expected = "which does not list it")]
    fn a_consumer_its_queue_does_not_list_is_caught() {
        let mut broker = broker_with_deliveries();
        let queue = broker.vhosts.get_mut("/").unwrap().queue_mut("q").unwrap();
        queue.detach_consumer(CHANNEL, "c");
        broker.check_invariants();
    }
}
