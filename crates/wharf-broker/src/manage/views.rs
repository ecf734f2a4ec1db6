//! Owned snapshots of what the broker holds, one type per kind of object the management API
//! lists. Each is taken in one pass under the lock that guards its source (the model lock, the
//! connection registry), never both at once.

use super::Management;
use crate::config::User;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use wharf_model::{ChannelKey, ConnectionId, Destination, Policy};
use wharf_wire::types::FieldTable;

/// The broker as a whole (RabbitMQ's `/api/overview`).
#[derive(Debug, Clone)]
pub struct Overview {
    /// The node's name (`wharf@host`), also the cluster's.
    pub node: String,
    /// Wharf's version.
    pub version: &'static str,
    pub connections: usize,
    pub channels: usize,
    pub consumers: usize,
    pub exchanges: usize,
    pub queues: usize,
    pub messages_ready: u64,
    pub messages_unacknowledged: u64,
    /// Where AMQP (and AMQPS) are accepted.
    pub amqp_listen: Option<SocketAddr>,
    pub amqps_listen: Option<SocketAddr>,
    /// The memory and disk alarms raised now.
    pub memory_alarm: bool,
    pub disk_alarm: bool,
    /// Bytes of message bodies held in memory (what the memory alarm counts).
    pub held_memory_bytes: u64,
    pub memory_high_watermark_bytes: u64,
    pub disk_free_limit_bytes: u64,
    /// The broker's counters since start.
    pub counters: wharf_model::Counters,
}

/// A client connection.
#[derive(Debug, Clone)]
pub struct ConnectionView {
    /// RabbitMQ's name for it: `peer -> local`.
    pub name: String,
    /// The client's `connection_name` property.
    pub client_provided_name: Option<String>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    pub user: String,
    pub vhost: String,
    pub client_properties: FieldTable,
    pub auth_mechanism: String,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat_s: u16,
    pub connected_at_ms: u64,
    /// Channels open on it now.
    pub channels: usize,
    pub received_bytes: u64,
}

/// An open channel.
#[derive(Debug, Clone)]
pub struct ChannelView {
    /// RabbitMQ's name for it: `connection name (number)`.
    pub name: String,
    pub connection_name: String,
    pub number: u16,
    pub user: String,
    pub vhost: String,
    pub peer: Option<SocketAddr>,
    pub prefetch_count: u16,
    pub global_prefetch_count: u16,
    pub messages_unacknowledged: usize,
    pub consumer_count: usize,
}

/// A consumer of a queue.
#[derive(Debug, Clone)]
pub struct ConsumerView {
    pub vhost: String,
    pub queue: String,
    pub consumer_tag: String,
    pub channel_name: String,
    pub channel_number: u16,
    pub connection_name: String,
    pub peer: Option<SocketAddr>,
    pub user: String,
    pub ack_required: bool,
    pub prefetch_count: u16,
    pub exclusive: bool,
    pub priority: i32,
    pub active: bool,
}

/// A virtual host, with its message totals.
#[derive(Debug, Clone)]
pub struct VhostView {
    pub name: String,
    pub messages_ready: u64,
    pub messages_unacknowledged: u64,
    pub queues: usize,
}

/// An exchange.
#[derive(Debug, Clone)]
pub struct ExchangeView {
    pub vhost: String,
    pub name: String,
    /// `direct`, `fanout`, `topic`, `headers` or `x-delayed-message`.
    pub kind: &'static str,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// The policy that applies, if any.
    pub policy: Option<String>,
}

/// A queue.
#[derive(Debug, Clone)]
pub struct QueueView {
    pub vhost: String,
    pub name: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive: bool,
    /// The owning connection's name, for an exclusive queue.
    pub owner: Option<String>,
    pub arguments: FieldTable,
    /// The policy that applies, if any, and its definition.
    pub policy: Option<String>,
    pub policy_definition: Option<FieldTable>,
    pub messages_ready: u64,
    pub messages_unacknowledged: u64,
    pub consumers: usize,
    /// Body bytes of ready messages, in memory or paged out.
    pub message_bytes_ready: u64,
    /// The part of those in memory.
    pub message_bytes_ram: u64,
    /// Body bytes of unacknowledged messages in memory.
    pub message_bytes_unacknowledged_ram: u64,
    /// What passed through it (for its `message_stats`).
    pub stats: wharf_model::QueueStats,
}

/// A binding: from an exchange to a queue or an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct BindingView {
    pub vhost: String,
    /// `""` for the default exchange's implicit bindings.
    pub source: String,
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_type: &'static str,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// A user.
#[derive(Debug, Clone)]
pub struct UserView {
    pub name: String,
    pub tags: Vec<String>,
    /// The salted hash, in RabbitMQ's base64 form, and its algorithm's RabbitMQ name.
    pub password_hash: String,
    pub hashing_algorithm: &'static str,
    pub loopback_only: bool,
}

impl UserView {
    fn of(user: &User) -> UserView {
        let (password_hash, hashing_algorithm) = user.password.to_rabbitmq();
        UserView {
            name: user.name.clone(),
            tags: user.tags.clone(),
            password_hash,
            hashing_algorithm,
            loopback_only: user.loopback_only,
        }
    }
}

/// What the registry knows of a connection, by id, for naming channels and consumers.
struct Owner {
    name: String,
    peer: SocketAddr,
    user: String,
}

impl Management {
    fn owners(&self) -> HashMap<ConnectionId, Owner> {
        self.core
            .connections
            .infos()
            .into_iter()
            .map(|info| {
                let id = ConnectionId(info.id.load(Ordering::Relaxed));
                let owner = Owner { name: info.name.clone(), peer: info.facts.peer, user: info.facts.user.clone() };
                (id, owner)
            })
            .collect()
    }

    /// The node's name (`wharf@host`).
    pub fn node_name(&self) -> String {
        node_name()
    }

    /// When the broker started, in milliseconds since the Unix epoch (the clock's time).
    pub fn started_at_ms(&self) -> u64 {
        self.started_at_ms
    }

    /// The clock's time now, in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        self.core.now_ms()
    }

    /// The broker as a whole.
    pub fn overview(&self) -> Overview {
        let connections = self.core.connections.count();
        let (channels, consumers, exchanges, queues, ready, unacked, held_memory_bytes, counters) = {
            let model = self.core.lock_model();
            let channels = model.channel_summaries();
            let consumers = channels.iter().map(|channel| channel.consumer_count).sum();
            let mut exchanges = 0;
            let mut queues = 0;
            let mut ready = 0;
            let mut unacked = 0;
            for vhost in model.vhosts() {
                exchanges += vhost.exchanges().count();
                for queue in vhost.queues() {
                    queues += 1;
                    ready += queue.ready_count() as u64;
                    unacked += queue.unacked_count() as u64;
                }
            }
            (channels.len(), consumers, exchanges, queues, ready, unacked, model.held_memory_bytes(), model.counters())
        };
        let alarms = self.core.alarms.state();
        Overview {
            node: node_name(),
            version: env!("CARGO_PKG_VERSION"),
            connections,
            channels,
            consumers,
            exchanges,
            queues,
            messages_ready: ready,
            messages_unacknowledged: unacked,
            amqp_listen: self.amqp_listen,
            amqps_listen: self.amqps_listen,
            memory_alarm: alarms.memory,
            disk_alarm: alarms.disk,
            held_memory_bytes,
            memory_high_watermark_bytes: self.core.config.memory_high_watermark_bytes,
            disk_free_limit_bytes: self.core.config.disk_free_limit_bytes(),
            counters,
        }
    }

    /// Every client connection.
    pub fn connections(&self) -> Vec<ConnectionView> {
        let infos = self.core.connections.infos();
        let mut channels: HashMap<ConnectionId, usize> = HashMap::new();
        for summary in self.core.lock_model().channel_summaries() {
            *channels.entry(summary.key.connection).or_default() += 1;
        }
        let mut views: Vec<ConnectionView> = infos
            .iter()
            .map(|info| {
                let id = ConnectionId(info.id.load(Ordering::Relaxed));
                let facts = &info.facts;
                ConnectionView {
                    name: info.name.clone(),
                    client_provided_name: info.client_provided_name(),
                    peer: facts.peer,
                    local: facts.local,
                    tls: facts.tls,
                    user: facts.user.clone(),
                    vhost: facts.vhost.clone(),
                    client_properties: facts.client_properties.clone(),
                    auth_mechanism: facts.auth_mechanism.clone(),
                    frame_max: facts.frame_max,
                    channel_max: facts.channel_max,
                    heartbeat_s: facts.heartbeat_s,
                    connected_at_ms: facts.connected_at_ms,
                    channels: channels.get(&id).copied().unwrap_or(0),
                    received_bytes: info.received_bytes(),
                }
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    /// Asks the connection named `name` to close (320 CONNECTION_FORCED, `reason`); false if no
    /// such connection is open.
    pub fn close_connection(&self, name: &str, reason: &str) -> bool {
        match self.core.connections.infos().into_iter().find(|info| info.name == name) {
            Some(info) => {
                info.request_close(reason);
                true
            }
            None => false,
        }
    }

    /// Every open channel of a client connection.
    pub fn channels(&self) -> Vec<ChannelView> {
        let owners = self.owners();
        let summaries = self.core.lock_model().channel_summaries();
        summaries
            .into_iter()
            .filter_map(|summary| {
                let owner = owners.get(&summary.key.connection)?;
                Some(ChannelView {
                    name: channel_name(&owner.name, summary.key),
                    connection_name: owner.name.clone(),
                    number: summary.key.channel,
                    user: owner.user.clone(),
                    vhost: summary.vhost,
                    peer: Some(owner.peer),
                    prefetch_count: summary.prefetch_count,
                    global_prefetch_count: summary.global_prefetch_count,
                    messages_unacknowledged: summary.messages_unacknowledged,
                    consumer_count: summary.consumer_count,
                })
            })
            .collect()
    }

    /// Every consumer of a queue on a client connection.
    pub fn consumers(&self) -> Vec<ConsumerView> {
        let owners = self.owners();
        let summaries = self.core.lock_model().consumer_summaries();
        summaries
            .into_iter()
            .filter_map(|summary| {
                let owner = owners.get(&summary.channel.connection)?;
                Some(ConsumerView {
                    vhost: summary.vhost,
                    queue: summary.queue,
                    consumer_tag: summary.consumer_tag,
                    channel_name: channel_name(&owner.name, summary.channel),
                    channel_number: summary.channel.channel,
                    connection_name: owner.name.clone(),
                    peer: Some(owner.peer),
                    user: owner.user.clone(),
                    ack_required: summary.ack_required,
                    prefetch_count: summary.prefetch_count,
                    exclusive: summary.exclusive,
                    priority: summary.priority,
                    active: summary.active,
                })
            })
            .collect()
    }

    /// Every vhost, by name.
    pub fn vhosts(&self) -> Vec<VhostView> {
        let model = self.core.lock_model();
        model
            .vhosts()
            .map(|vhost| {
                let (mut ready, mut unacked, mut queues) = (0, 0, 0);
                for queue in vhost.queues() {
                    ready += queue.ready_count() as u64;
                    unacked += queue.unacked_count() as u64;
                    queues += 1;
                }
                VhostView {
                    name: vhost.name().to_owned(),
                    messages_ready: ready,
                    messages_unacknowledged: unacked,
                    queues,
                }
            })
            .collect()
    }

    /// Every exchange, of one vhost or of all, by vhost and name.
    pub fn exchanges(&self, vhost: Option<&str>) -> Vec<ExchangeView> {
        let model = self.core.lock_model();
        let mut views = Vec::new();
        for found in model.vhosts().filter(|found| vhost.is_none_or(|name| found.name() == name)) {
            for exchange in found.exchanges() {
                views.push(ExchangeView {
                    vhost: found.name().to_owned(),
                    name: exchange.name.clone(),
                    kind: exchange.kind.as_str(),
                    durable: exchange.durable,
                    auto_delete: exchange.auto_delete,
                    internal: exchange.internal,
                    arguments: exchange.arguments.clone(),
                    policy: wharf_model::policy::select(found.policies(), &exchange.name, false)
                        .map(|policy| policy.name.clone()),
                });
            }
        }
        views.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        views
    }

    /// Every queue's counters (vhost, name, counters), for sampling rates: lighter than
    /// [`Management::queues`].
    pub fn queue_stats(&self) -> Vec<(String, String, wharf_model::QueueStats)> {
        let model = self.core.lock_model();
        model
            .vhosts()
            .flat_map(|found| found.queues().map(|queue| (found.name().to_owned(), queue.name.clone(), queue.stats())))
            .collect()
    }

    /// Every queue, of one vhost or of all, by vhost and name.
    pub fn queues(&self, vhost: Option<&str>) -> Vec<QueueView> {
        let owners = self.owners();
        let model = self.core.lock_model();
        let mut views = Vec::new();
        for found in model.vhosts().filter(|found| vhost.is_none_or(|name| found.name() == name)) {
            for queue in found.queues() {
                let policy = wharf_model::policy::select(found.policies(), &queue.name, true);
                views.push(QueueView {
                    vhost: found.name().to_owned(),
                    name: queue.name.clone(),
                    durable: queue.durable,
                    auto_delete: queue.auto_delete,
                    exclusive: queue.exclusive_owner.is_some(),
                    owner: queue.exclusive_owner.and_then(|owner| owners.get(&owner)).map(|owner| owner.name.clone()),
                    arguments: queue.arguments.clone(),
                    policy: policy.map(|policy| policy.name.clone()),
                    policy_definition: policy.map(|policy| policy.definition.clone()),
                    messages_ready: queue.ready_count() as u64,
                    messages_unacknowledged: queue.unacked_count() as u64,
                    consumers: queue.consumer_count(),
                    message_bytes_ready: queue.held_bytes(),
                    message_bytes_ram: queue.resident_bytes(),
                    message_bytes_unacknowledged_ram: queue.unacked_resident_bytes(),
                    stats: queue.stats(),
                });
            }
        }
        views.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        views
    }

    /// One queue.
    pub fn queue(&self, vhost: &str, name: &str) -> Option<QueueView> {
        // The model has no index by vhost and name across vhosts worth a separate path: one
        // vhost's queues are filtered, which is what the API does anyway.
        self.queues(Some(vhost)).into_iter().find(|queue| queue.name == name)
    }

    /// Every binding, of one vhost or of all: the default exchange's implicit binding to each
    /// queue first (as RabbitMQ lists them), then the declared ones, by source.
    pub fn bindings(&self, vhost: Option<&str>) -> Vec<BindingView> {
        let model = self.core.lock_model();
        let mut views = Vec::new();
        for found in model.vhosts().filter(|found| vhost.is_none_or(|name| found.name() == name)) {
            let mut implicit: Vec<BindingView> = found
                .queues()
                .map(|queue| BindingView {
                    vhost: found.name().to_owned(),
                    source: String::new(),
                    destination: queue.name.clone(),
                    destination_type: "queue",
                    routing_key: queue.name.clone(),
                    arguments: FieldTable::default(),
                })
                .collect();
            implicit.sort_by(|a, b| a.destination.cmp(&b.destination));
            views.extend(implicit);
            let mut declared: Vec<BindingView> = found
                .bindings()
                .map(|(source, binding)| {
                    let (destination, destination_type) = match &binding.destination {
                        Destination::Queue(name) => (name.clone(), "queue"),
                        Destination::Exchange(name) => (name.clone(), "exchange"),
                    };
                    BindingView {
                        vhost: found.name().to_owned(),
                        source: source.to_owned(),
                        destination,
                        destination_type,
                        routing_key: binding.routing_key.clone(),
                        arguments: binding.arguments.clone(),
                    }
                })
                .collect();
            declared.sort_by(|a, b| {
                (&a.source, &a.destination_type, &a.destination, &a.routing_key).cmp(&(
                    &b.source,
                    &b.destination_type,
                    &b.destination,
                    &b.routing_key,
                ))
            });
            views.extend(declared);
        }
        views
    }

    /// Every user, by name.
    pub fn users(&self) -> Vec<UserView> {
        let mut views: Vec<UserView> = self.core.access.users().iter().map(UserView::of).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    /// Every permission.
    pub fn permissions(&self) -> Vec<crate::Permission> {
        self.core.access.permissions()
    }

    /// Every topic permission.
    pub fn topic_permissions(&self) -> Vec<crate::TopicPermission> {
        self.core.access.topic_permissions()
    }

    /// Every policy, as (vhost, policy).
    pub fn policies(&self) -> Vec<(String, Policy)> {
        let model = self.core.lock_model();
        let mut policies: Vec<(String, Policy)> = model
            .vhosts()
            .flat_map(|vhost| vhost.policies().iter().map(move |policy| (vhost.name().to_owned(), policy.clone())))
            .collect();
        policies.sort_by(|a, b| (&a.0, &a.1.name).cmp(&(&b.0, &b.1.name)));
        policies
    }

    /// Checks a user's password for the management interface, with the AMQP login's rules
    /// (`guest` only from loopback) and its throttle on repeated failures. Returns the user.
    pub fn authenticate(&self, name: &str, password: &str, peer: std::net::IpAddr) -> Option<UserView> {
        let credentials = crate::login::Credentials::Password { user: name, password: password.as_bytes() };
        crate::login::log_in(&self.core, credentials, peer).ok().map(|user| UserView::of(&user))
    }

    /// Whether `user` has any permission on `vhost` (what RabbitMQ requires of a non-administrator
    /// to see the vhost's objects).
    pub fn can_access_vhost(&self, user: &str, vhost: &str) -> bool {
        self.core.access.grant(user, vhost).is_some()
    }

    /// True if the vhost exists.
    pub fn vhost_exists(&self, vhost: &str) -> bool {
        self.core.lock_model().vhost(vhost).is_some()
    }
}

/// The node's name: `wharf@host`.
pub(crate) fn node_name() -> String {
    format!("wharf@{}", crate::connection::host_name())
}

/// RabbitMQ's name for a channel: `connection name (number)`.
fn channel_name(connection_name: &str, key: ChannelKey) -> String {
    format!("{connection_name} ({})", key.channel)
}
