//! Vhosts created and deleted while the broker runs, and changing a vhost's policies (the management API's `PUT`/`DELETE
//! /api/policies/…`): every existing queue and exchange gets its settings derived again from its
//! arguments and the policy that now applies, as RabbitMQ applies a policy change to existing
//! queues.
//!
//! What changes at once, and what does not (`docs/design/20261204_management-api.md`):
//! - dead-lettering (`dead-letter-exchange`, `dead-letter-routing-key`), `delivery-limit`,
//!   `max-length`, `max-length-bytes` and `overflow` (a queue now over a lower limit with
//!   `drop-head` drops or dead-letters its oldest messages at once), `consumer-timeout` and
//!   `retry-backoff` (for deliveries from now on), `expires` (armed if the queue is unused and
//!   none was armed), `message-ttl` (for messages that arrive from now on; messages already in
//!   the queue keep the expiry they were given), and an exchange's `alternate-exchange`;
//! - what a queue's structure was built for at declaration stays: `max-priority`,
//!   `ordered-by`, `deduplication` and `single-active-consumer`. A queue whose arguments and
//!   the new policy cannot be merged (an invalid value for it) keeps its settings.

use super::timers::Timer;
use super::{BrokerModel, DeletedExchange, Effects};
use crate::policy::Policy;

impl BrokerModel {
    /// Deletes a vhost and everything in it (`DELETE /api/vhosts/{name}`): its channels are
    /// closed (their unacknowledged messages go back to queues that go next), every queue is
    /// removed (`deleted_queues`, with its store logs) and every exchange
    /// (`deleted_exchanges`), then the vhost. Returns `None` if there is no such vhost.
    pub fn remove_vhost(&mut self, name: &str) -> Option<Effects> {
        self.vhosts.get(name)?;
        let keys: Vec<crate::queue::ChannelKey> =
            self.channels.iter().filter(|(_, channel)| channel.vhost == name).map(|(key, _)| *key).collect();
        let closed =
            keys.into_iter().filter_map(|key| self.channels.remove(&key).map(|channel| (key, channel))).collect();
        let mut effects = self.release_channels(closed);
        let queues: Vec<String> = self
            .vhosts
            .get(name)
            .map(|vhost| vhost.queues().map(|queue| queue.name.clone()).collect())
            .unwrap_or_default();
        for queue in queues {
            effects.merge(self.remove_queue(name, &queue));
        }
        // Deliveries to the closed channels were requeued into queues now gone: nothing to send.
        effects.deliveries.clear();
        let vhost = self.vhosts.remove(name)?;
        // Its timers go with it: a vhost of the same name created later numbers its queues'
        // incarnations from the start again, and must not be reached by these.
        self.timers.retain(|(_, timer)| timer.vhost() != Some(name));
        for exchange in vhost.exchanges() {
            effects.deleted_exchanges.push(DeletedExchange { vhost: name.to_owned(), exchange: exchange.clone() });
        }
        Some(effects)
    }

    /// Replaces the policies of `vhost_name` and applies them to its queues and exchanges.
    /// Returns what the runtime must carry out (drop-head dead letters, dispatches).
    pub fn set_policies(&mut self, vhost_name: &str, policies: Vec<Policy>) -> Effects {
        let mut effects = Effects::default();
        let Some(vhost) = self.vhosts.get_mut(vhost_name) else { return effects };
        vhost.set_policies(policies);
        let exchanges: Vec<(String, crate::exchange::ExchangeKind, wharf_wire::types::FieldTable)> = vhost
            .exchanges()
            .map(|exchange| (exchange.name.clone(), exchange.kind, exchange.arguments.clone()))
            .collect();
        for (name, kind, arguments) in exchanges {
            let Ok(settings) = vhost.exchange_settings(&name, kind, &arguments) else { continue };
            if let Some(exchange) = vhost.exchange_mut(&name) {
                exchange.settings.alternate_exchange = settings.alternate_exchange;
            }
        }
        let names: Vec<String> = vhost.queues().map(|queue| queue.name.clone()).collect();
        for name in names {
            let Some(vhost) = self.vhosts.get_mut(vhost_name) else { break };
            let Some(arguments) = vhost.queue(&name).map(|queue| queue.arguments.clone()) else { continue };
            let Ok(settings) = vhost.queue_settings(&name, &arguments) else { continue };
            let Some(queue) = vhost.queue_mut(&name) else { continue };
            queue.apply_policy_settings(settings);
            self.drop_head_over_limits(vhost_name, &name, &mut effects);
            let Some(queue) = self.vhosts.get_mut(vhost_name).and_then(|vhost| vhost.queue_mut(&name)) else {
                continue;
            };
            if let Some(due_ms) = queue.arm_expires_if_unused() {
                let timer = Timer::QueueExpires {
                    vhost: vhost_name.to_owned(),
                    queue: name.clone(),
                    incarnation: queue.incarnation(),
                };
                self.timers.insert((due_ms, timer));
            }
            effects.merge(self.dispatch(vhost_name, &name));
        }
        effects
    }
}
