//! `/metrics`: the broker in the Prometheus text format (version 0.0.4, what RabbitMQ's
//! Prometheus plugin serves), with the plugin's metric names and labels so the published
//! RabbitMQ Grafana dashboards work unchanged, and Wharf's own `wharf_*` metrics (fsync latency,
//! group-commit batch sizes, store segments and bytes, de-duplication, delivery limits, leases,
//! backoff, alarms).
//!
//! - `/metrics`: every metric aggregated over the broker (no per-object labels), as RabbitMQ's
//!   default endpoint;
//! - `/metrics/per-object`: queue, channel and connection metrics per object (`vhost`/`queue`,
//!   `channel` labels), as RabbitMQ's; `/metrics/detailed` is the same, optionally for one
//!   `vhost`.
//!
//! Like RabbitMQ's plugin, it asks for no credentials. The text is written here rather than with
//! `prometheus-client`, whose encoder writes OpenMetrics (a `# EOF` line, `_total` appended by
//! the library, `info` types) where RabbitMQ's dashboards and scrapers expect the classic
//! format with RabbitMQ's exact names; the format is a handful of escaping rules.

use crate::AppState;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use std::fmt::{Display, Write as _};
use wharf_broker::{BrokerStats, HistogramSnapshot, Overview, QueueView};

/// The content type of the classic text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/metrics", get(aggregated))
        .route("/metrics/per-object", get(per_object))
        .route("/metrics/detailed", get(detailed))
}

#[derive(Debug, Default, Deserialize)]
struct DetailedQuery {
    vhost: Option<String>,
}

async fn aggregated(State(state): State<AppState>) -> Response {
    respond(render(&state, Scope::Aggregated))
}

async fn per_object(State(state): State<AppState>) -> Response {
    respond(render(&state, Scope::PerObject { vhost: None }))
}

async fn detailed(State(state): State<AppState>, Query(query): Query<DetailedQuery>) -> Response {
    respond(render(&state, Scope::PerObject { vhost: query.vhost }))
}

fn respond(text: String) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Aggregated over the broker, or per object (in one vhost, if given).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    Aggregated,
    PerObject { vhost: Option<String> },
}

/// The text being written.
struct Exposition {
    text: String,
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Exposition {
    /// `# HELP` and `# TYPE` of a family.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# TYPE {name} {kind}\n# HELP {name} {help}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, label_value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{label}=\"{}\"", escape_label(label_value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A histogram whose observations are in `unit_divisor`ths of the reported unit (microseconds
    /// reported as seconds: 1e6).
    fn histogram(&mut self, name: &str, help: &str, snapshot: &HistogramSnapshot, unit_divisor: f64) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        for (bound, count) in &snapshot.cumulative {
            let le = (*bound as f64 / unit_divisor).to_string();
            self.sample(&bucket, &[("le", &le)], count);
        }
        self.sample(&bucket, &[("le", "+Inf")], snapshot.count);
        self.sample(&format!("{name}_sum"), &[], snapshot.sum as f64 / unit_divisor);
        self.sample(&format!("{name}_count"), &[], snapshot.count);
    }
}

/// This process's resident memory, open file descriptors and their limit, from `/proc` (Linux;
/// absent elsewhere).
struct ProcessFacts {
    resident_bytes: Option<u64>,
    open_fds: Option<u64>,
    max_fds: Option<u64>,
}

fn process_facts() -> ProcessFacts {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let resident_bytes = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024);
    let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|entries| entries.count() as u64);
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let max_fds = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse().ok());
    ProcessFacts { resident_bytes, open_fds, max_fds }
}

fn render(state: &AppState, scope: Scope) -> String {
    let management = &state.management;
    let overview = management.overview();
    let stats = management.stats();
    let mut out = Exposition { text: String::with_capacity(16 * 1024) };
    identity(&mut out, state, &overview);
    totals(&mut out, &overview, &stats);
    messages(&mut out, &stats);
    resources(&mut out, &overview, &stats);
    wharf_own(&mut out, state, &overview, &stats);
    let vhost = match &scope {
        Scope::Aggregated => None,
        Scope::PerObject { vhost } => Some(vhost.as_deref()),
    };
    let queues = management.queues(vhost.flatten());
    queue_metrics(&mut out, &queues, vhost.is_some());
    if vhost.is_some() {
        object_metrics(&mut out, state, vhost.flatten());
    }
    out.text
}

fn identity(out: &mut Exposition, state: &AppState, overview: &Overview) {
    let node = state.management.node_name();
    out.family("rabbitmq_identity_info", "untyped", "RabbitMQ node & cluster identity info");
    out.sample(
        "rabbitmq_identity_info",
        &[("rabbitmq_node", &node), ("rabbitmq_cluster", &node), ("rabbitmq_cluster_permanent_id", &node)],
        1,
    );
    out.family("rabbitmq_build_info", "untyped", "RabbitMQ & Erlang/OTP version info");
    out.sample(
        "rabbitmq_build_info",
        &[
            ("rabbitmq_version", overview.version),
            ("product", "Wharf"),
            ("prometheus_plugin_version", overview.version),
        ],
        1,
    );
}

fn totals(out: &mut Exposition, overview: &Overview, stats: &BrokerStats) {
    out.single("rabbitmq_connections", "gauge", "Connections currently open", overview.connections);
    out.single("rabbitmq_channels", "gauge", "Channels currently open", overview.channels);
    out.single("rabbitmq_consumers", "gauge", "Consumers currently connected", overview.consumers);
    out.single("rabbitmq_queues", "gauge", "Queues available", overview.queues);
    let closed = |opened: u64, open: usize| opened.saturating_sub(open as u64);
    out.single(
        "rabbitmq_connections_opened_total",
        "counter",
        "Total number of connections opened",
        stats.connections_opened,
    );
    out.single(
        "rabbitmq_connections_closed_total",
        "counter",
        "Total number of connections closed or terminated",
        closed(stats.connections_opened, overview.connections),
    );
    out.single("rabbitmq_channels_opened_total", "counter", "Total number of channels opened", stats.channels_opened);
    out.single(
        "rabbitmq_channels_closed_total",
        "counter",
        "Total number of channels closed",
        closed(stats.channels_opened, overview.channels),
    );
    out.single("rabbitmq_queues_declared_total", "counter", "Total number of queues declared", stats.queues_declared);
    out.single("rabbitmq_queues_created_total", "counter", "Total number of queues created", stats.queues_created);
    out.single("rabbitmq_queues_deleted_total", "counter", "Total number of queues deleted", stats.queues_deleted);
}

fn messages(out: &mut Exposition, stats: &BrokerStats) {
    let counters = &stats.counters;
    let delivered_total = counters.delivered_consume_manual_ack
        + counters.delivered_consume_auto_ack
        + counters.delivered_get_manual_ack
        + counters.delivered_get_auto_ack;
    // The channel families RabbitMQ's overview dashboard charts, summed over every channel.
    let channel: [(&str, &str, u64); 10] = [
        (
            "rabbitmq_channel_messages_published_total",
            "Total number of messages published into an exchange on a channel",
            counters.published,
        ),
        (
            "rabbitmq_channel_messages_unroutable_returned_total",
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
            counters.unroutable_returned,
        ),
        (
            "rabbitmq_channel_messages_unroutable_dropped_total",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
            counters.unroutable_dropped,
        ),
        (
            "rabbitmq_channel_messages_delivered_ack_total",
            "Total number of messages delivered to consumers in manual acknowledgement mode",
            counters.delivered_consume_manual_ack,
        ),
        (
            "rabbitmq_channel_messages_delivered_total",
            "Total number of messages delivered to consumers in automatic acknowledgement mode",
            counters.delivered_consume_auto_ack,
        ),
        (
            "rabbitmq_channel_get_ack_total",
            "Total number of messages fetched with basic.get in manual acknowledgement mode",
            counters.delivered_get_manual_ack,
        ),
        (
            "rabbitmq_channel_get_total",
            "Total number of messages fetched with basic.get in automatic acknowledgement mode",
            counters.delivered_get_auto_ack,
        ),
        (
            "rabbitmq_channel_get_empty_total",
            "Total number of times basic.get operations fetched no message",
            counters.get_empty,
        ),
        (
            "rabbitmq_channel_messages_redelivered_total",
            "Total number of messages redelivered to consumers",
            counters.redelivered,
        ),
        (
            "rabbitmq_channel_messages_acked_total",
            "Total number of messages acknowledged by consumers",
            counters.acknowledged,
        ),
    ];
    for (name, help, value) in channel {
        out.single(name, "counter", help, value);
    }
    let global: [(&str, &str, u64); 13] = [
        (
            "rabbitmq_global_messages_received_total",
            "Total number of messages received from publishers",
            counters.published,
        ),
        (
            "rabbitmq_global_messages_routed_total",
            "Total number of messages routed to queues or streams",
            counters.routed,
        ),
        (
            "rabbitmq_global_messages_unroutable_dropped_total",
            "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
            counters.unroutable_dropped,
        ),
        (
            "rabbitmq_global_messages_unroutable_returned_total",
            "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
            counters.unroutable_returned,
        ),
        (
            "rabbitmq_global_messages_delivered_total",
            "Total number of messages delivered to consumers",
            delivered_total,
        ),
        (
            "rabbitmq_global_messages_delivered_consume_manual_ack_total",
            "Total number of messages delivered to consumers using basic.consume with manual acknowledgment",
            counters.delivered_consume_manual_ack,
        ),
        (
            "rabbitmq_global_messages_delivered_consume_auto_ack_total",
            "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment",
            counters.delivered_consume_auto_ack,
        ),
        (
            "rabbitmq_global_messages_delivered_get_manual_ack_total",
            "Total number of messages delivered to consumers using basic.get with manual acknowledgment",
            counters.delivered_get_manual_ack,
        ),
        (
            "rabbitmq_global_messages_delivered_get_auto_ack_total",
            "Total number of messages delivered to consumers using basic.get with automatic acknowledgment",
            counters.delivered_get_auto_ack,
        ),
        (
            "rabbitmq_global_messages_get_empty_total",
            "Total number of times basic.get operations fetched no message",
            counters.get_empty,
        ),
        (
            "rabbitmq_global_messages_redelivered_total",
            "Total number of messages redelivered to consumers",
            counters.redelivered,
        ),
        (
            "rabbitmq_global_messages_acknowledged_total",
            "Total number of messages acknowledged by consumers",
            counters.acknowledged,
        ),
        (
            "rabbitmq_global_messages_dead_lettered_delivery_limit_total",
            "Total number of messages dead-lettered due to delivery-limit exceeded",
            counters.dead_lettered_delivery_limit,
        ),
    ];
    for (name, help, value) in global {
        out.single(name, "counter", help, value);
    }
    let dead_letters: [(&str, &str, u64); 3] = [
        (
            "rabbitmq_global_messages_dead_lettered_expired_total",
            "Total number of messages dead-lettered due to message TTL exceeded",
            counters.dead_lettered_expired,
        ),
        (
            "rabbitmq_global_messages_dead_lettered_maxlen_total",
            "Total number of messages dead-lettered due to overflow drop-head or reject-publish-dlx",
            counters.dead_lettered_maxlen,
        ),
        (
            "rabbitmq_global_messages_dead_lettered_rejected_total",
            "Total number of messages dead-lettered due to basic.reject or basic.nack",
            counters.dead_lettered_rejected,
        ),
    ];
    for (name, help, value) in dead_letters {
        out.single(name, "counter", help, value);
    }
}

fn resources(out: &mut Exposition, overview: &Overview, stats: &BrokerStats) {
    let process = process_facts();
    if let Some(bytes) = process.resident_bytes {
        out.single("rabbitmq_process_resident_memory_bytes", "gauge", "Memory used in bytes", bytes);
    }
    out.single(
        "rabbitmq_resident_memory_limit_bytes",
        "gauge",
        "Memory high watermark in bytes",
        overview.memory_high_watermark_bytes,
    );
    if let Some(free) = stats.disk_free_bytes {
        out.single("rabbitmq_disk_space_available_bytes", "gauge", "Disk space available in bytes", free);
    }
    out.single(
        "rabbitmq_disk_space_available_limit_bytes",
        "gauge",
        "Free disk space low watermark in bytes",
        overview.disk_free_limit_bytes,
    );
    if let Some(open) = process.open_fds {
        out.single("rabbitmq_process_open_fds", "gauge", "Open file descriptors", open);
    }
    if let Some(max) = process.max_fds {
        out.single("rabbitmq_process_max_fds", "gauge", "Open file descriptors limit", max);
    }
    out.single(
        "rabbitmq_alarms_memory_used_watermark",
        "untyped",
        "is 1 if VM memory watermark alarm is in effect",
        u8::from(overview.memory_alarm),
    );
    out.single(
        "rabbitmq_alarms_free_disk_space_watermark",
        "untyped",
        "is 1 if free disk space watermark alarm is in effect",
        u8::from(overview.disk_alarm),
    );
    out.single("rabbitmq_io_sync_ops_total", "counter", "Total number of I/O sync operations", stats.store.data_syncs);
}

fn wharf_own(out: &mut Exposition, state: &AppState, overview: &Overview, stats: &BrokerStats) {
    let counters = &stats.counters;
    out.histogram(
        "wharf_store_fsync_duration_seconds",
        "Latency of each fdatasync of a data file (queue segments, ack log)",
        &stats.sync_latency_us,
        1e6,
    );
    out.histogram(
        "wharf_store_group_commit_appends",
        "Appends made durable by one group-commit batch (one fdatasync per file it touched)",
        &stats.batch_appends,
        1.0,
    );
    out.single("wharf_store_appends_total", "counter", "Records appended to the store", stats.store.appends);
    let usage = state.management.segment_usage();
    out.single("wharf_store_segments", "gauge", "Message segment files in the store", usage.segments);
    out.single(
        "wharf_store_segment_bytes",
        "gauge",
        "Bytes of the store's message segment files (written length)",
        usage.bytes,
    );
    out.single("wharf_store_batches_total", "counter", "Batches the store's writer processed", stats.store.batches);
    out.single(
        "wharf_store_segments_deleted_total",
        "counter",
        "Message segments deleted once every record in them was removed",
        stats.store.segments_deleted,
    );
    let own: [(&str, &str, u64); 8] = [
        (
            "wharf_deduplicated_total",
            "Publishes dropped as duplicates by queue or exchange de-duplication",
            counters.duplicates_dropped,
        ),
        (
            "wharf_dead_lettered_delivery_limit_total",
            "Messages dead-lettered after their queue's delivery limit",
            counters.dead_lettered_delivery_limit,
        ),
        ("wharf_dead_lettered_total", "Messages dead-lettered, any reason", counters.dead_lettered),
        (
            "wharf_lease_expiries_total",
            "Deliveries whose lease (consumer timeout) ran out, requeued",
            counters.leases_expired,
        ),
        (
            "wharf_backoff_waits_total",
            "Requeued messages held back for their queue's retry backoff",
            counters.backoff_waits,
        ),
        ("wharf_messages_expired_total", "Messages whose TTL ran out", counters.expired),
        (
            "wharf_delayed_released_total",
            "Delayed messages released to their exchange's bindings",
            counters.delayed_released,
        ),
        (
            "wharf_paged_out_total",
            "Queued message bodies dropped from memory, read back from the store when delivered",
            counters.paged_out,
        ),
    ];
    for (name, help, value) in own {
        out.single(name, "counter", help, value);
    }
    out.family("wharf_alarm", "gauge", "1 while the alarm on this resource is raised (publishers are blocked)");
    out.sample("wharf_alarm", &[("resource", "memory")], u8::from(overview.memory_alarm));
    out.sample("wharf_alarm", &[("resource", "disk")], u8::from(overview.disk_alarm));
    out.single(
        "wharf_held_memory_bytes",
        "gauge",
        "Bytes of message bodies held in memory (what the memory alarm counts)",
        overview.held_memory_bytes,
    );
}

/// Queue families: one sample per queue, or their sums.
fn queue_metrics(out: &mut Exposition, queues: &[QueueView], per_object: bool) {
    type Field = fn(&QueueView) -> u64;
    let families: [(&str, &str, Field); 9] = [
        ("rabbitmq_queue_messages_ready", "Messages ready to be delivered to consumers", |queue| queue.messages_ready),
        ("rabbitmq_queue_messages_unacked", "Messages delivered to consumers but not yet acknowledged", |queue| {
            queue.messages_unacknowledged
        }),
        ("rabbitmq_queue_messages", "Sum of ready and unacknowledged messages - total queue depth", |queue| {
            queue.messages_ready + queue.messages_unacknowledged
        }),
        ("rabbitmq_queue_consumers", "Consumers on a queue", |queue| queue.consumers as u64),
        ("rabbitmq_queue_messages_ready_bytes", "Size in bytes of ready messages", |queue| queue.message_bytes_ready),
        ("rabbitmq_queue_messages_unacked_bytes", "Size in bytes of all unacknowledged messages", |queue| {
            queue.message_bytes_unacknowledged_ram
        }),
        ("rabbitmq_queue_messages_bytes", "Size in bytes of ready and unacknowledged messages", |queue| {
            queue.message_bytes_ready + queue.message_bytes_unacknowledged_ram
        }),
        ("rabbitmq_queue_messages_ram_bytes", "Size of ready and unacknowledged messages stored in memory", |queue| {
            queue.message_bytes_ram + queue.message_bytes_unacknowledged_ram
        }),
        ("rabbitmq_queue_messages_paged_out_bytes", "Size in bytes of messages paged out to disk", |queue| {
            queue.message_bytes_ready.saturating_sub(queue.message_bytes_ram)
        }),
    ];
    let counters: [(&str, &str, Field); 8] = [
        ("rabbitmq_queue_messages_published_total", "Total number of messages published to queues", |queue| {
            queue.stats.publish
        }),
        (
            "rabbitmq_queue_get_ack_total",
            "Total number of messages fetched from a queue with basic.get in manual acknowledgement mode",
            |queue| queue.stats.get,
        ),
        (
            "rabbitmq_queue_get_total",
            "Total number of messages fetched from a queue with basic.get in automatic acknowledgement mode",
            |queue| queue.stats.get_no_ack,
        ),
        (
            "rabbitmq_queue_messages_delivered_ack_total",
            "Total number of messages delivered from a queue to consumers in manual acknowledgement mode",
            |queue| queue.stats.deliver,
        ),
        (
            "rabbitmq_queue_messages_delivered_total",
            "Total number of messages delivered from a queue to consumers in automatic acknowledgement mode",
            |queue| queue.stats.deliver_no_ack,
        ),
        (
            "rabbitmq_queue_messages_redelivered_total",
            "Total number of messages redelivered from a queue to consumers",
            |queue| queue.stats.redeliver,
        ),
        (
            "rabbitmq_queue_messages_acked_total",
            "Total number of messages acknowledged by consumers on a queue",
            |queue| queue.stats.ack,
        ),
        (
            "rabbitmq_queue_get_empty_total",
            "Total number of times basic.get operations fetched no message on a queue",
            |queue| queue.stats.get_empty,
        ),
    ];
    let gauges = families.into_iter().map(|(name, help, field)| (name, help, field, "gauge"));
    let counters = counters.into_iter().map(|(name, help, field)| (name, help, field, "counter"));
    for (name, help, field, kind) in gauges.chain(counters) {
        out.family(name, kind, help);
        if per_object {
            for queue in queues {
                out.sample(name, &[("vhost", &queue.vhost), ("queue", &queue.name)], field(queue));
            }
        } else {
            out.sample(name, &[], queues.iter().map(field).sum::<u64>());
        }
    }
}

/// Channel and connection families, one sample per object (`channel` labels the object, as in
/// RabbitMQ, where it is the Erlang process; here it is the object's name).
fn object_metrics(out: &mut Exposition, state: &AppState, vhost: Option<&str>) {
    let in_vhost = |name: &str| vhost.is_none_or(|wanted| wanted == name);
    let channels: Vec<_> = state.management.channels().into_iter().filter(|channel| in_vhost(&channel.vhost)).collect();
    out.family("rabbitmq_channel_consumers", "gauge", "Consumers on a channel");
    for channel in &channels {
        out.sample("rabbitmq_channel_consumers", &[("channel", &channel.name)], channel.consumer_count);
    }
    out.family("rabbitmq_channel_messages_unacked", "gauge", "Delivered but not yet acknowledged messages");
    for channel in &channels {
        out.sample("rabbitmq_channel_messages_unacked", &[("channel", &channel.name)], channel.messages_unacknowledged);
    }
    out.family(
        "rabbitmq_channel_prefetch",
        "gauge",
        "Total limit of unacknowledged messages for all consumers on a channel",
    );
    for channel in &channels {
        out.sample("rabbitmq_channel_prefetch", &[("channel", &channel.name)], channel.global_prefetch_count);
    }
    let connections: Vec<_> =
        state.management.connections().into_iter().filter(|connection| in_vhost(&connection.vhost)).collect();
    out.family("rabbitmq_connection_incoming_bytes_total", "counter", "Total number of bytes received on a connection");
    for connection in &connections {
        out.sample(
            "rabbitmq_connection_incoming_bytes_total",
            &[("channel", &connection.name)],
            connection.received_bytes,
        );
    }
    out.family("rabbitmq_connection_channels", "gauge", "Channels on a connection");
    for connection in &connections {
        out.sample("rabbitmq_connection_channels", &[("channel", &connection.name)], connection.channels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition { text: String::new() };
        out.sample("m", &[("queue", "a\"b\\c\nd")], 1);
        assert_eq!(out.text, "m{queue=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn histograms_have_cumulative_buckets_an_infinity_bucket_a_sum_and_a_count() {
        let mut out = Exposition { text: String::new() };
        let snapshot = HistogramSnapshot { cumulative: vec![(500, 2), (1000, 3)], sum: 2100, count: 4 };
        out.histogram("h_seconds", "help", &snapshot, 1e6);
        let expected = "# TYPE h_seconds histogram\n# HELP h_seconds help\nh_seconds_bucket{le=\"0.0005\"} 2\n\
                        h_seconds_bucket{le=\"0.001\"} 3\nh_seconds_bucket{le=\"+Inf\"} 4\nh_seconds_sum 0.0021\nh_seconds_count 4\n";
        assert_eq!(out.text, expected);
    }
}
