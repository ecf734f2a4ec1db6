//! `/metrics` scraped from a real broker and parsed as the Prometheus text format: every line is
//! a comment or a well-formed sample, every family is typed once, and the values follow what the
//! test did (publishes, deliveries, acks, dead letters, queue depths per queue).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Harness;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};

/// A parsed exposition: `(name, labels) -> value`.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the classic text format strictly: `# TYPE` and `# HELP` comments, and samples
/// `name{label="value",…} number` with escaped label values; any other line fails the test.
fn parse(text: &str) -> Samples {
    let mut samples = Samples::new();
    let mut typed = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram", "untyped", "summary"].contains(&kind), "{line}");
            assert!(typed.insert(name.to_owned()), "family {name} typed twice");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.is_empty() && !line.starts_with('#'), "unexpected line {line:?}");
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => (name.to_owned(), parse_labels(rest.strip_suffix('}').unwrap())),
        };
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name {name}");
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(&name);
        assert!(typed.contains(&name) || typed.contains(family), "sample {name} before its # TYPE");
        assert!(samples.insert((name, labels), value).is_none(), "duplicate series in {line:?}");
    }
    samples
}

fn parse_labels(mut text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !text.is_empty() {
        let (name, rest) = text.split_once("=\"").unwrap();
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().unwrap() {
                (_, '\\') => match chars.next().unwrap().1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (index, '"') => break index,
                (_, other) => value.push(other),
            }
        };
        labels.insert(name.to_owned(), value);
        text = rest[end + 1..].trim_start_matches(',');
    }
    labels
}

fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let key = (name.to_owned(), labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
    *samples.get(&key).unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_what_the_broker_did_in_rabbitmqs_names() {
    let harness = Harness::start().await;
    let api = harness.guest();
    api.put("/api/queues/%2F/work", json!({"durable": true})).await;
    api.put("/api/queues/%2F/weird%22name", json!({"durable": false})).await;
    for payload in ["a", "b", "c"] {
        let published = api
            .post(
                "/api/exchanges/%2F/amq.default/publish",
                json!({"routing_key": "work", "payload": payload, "payload_encoding": "string", "properties": {"delivery_mode": 2}}),
            )
            .await;
        assert_eq!(published.body, json!({"routed": true}));
    }
    api.post(
        "/api/exchanges/%2F/amq.default/publish",
        json!({"routing_key": "nowhere", "payload": "x", "payload_encoding": "string", "properties": {}}),
    )
    .await;
    api.post("/api/queues/%2F/work/get", json!({"count": 1, "ackmode": "ack_requeue_false"})).await;
    api.post("/api/queues/%2F/work/get", json!({"count": 1, "ackmode": "reject_requeue_false"})).await;

    let (status, content_type, text) = api.get_text("/metrics").await;
    assert_eq!((status, content_type.as_str()), (200, "text/plain; version=0.0.4"));
    let samples = parse(&text);
    assert_eq!(value(&samples, "rabbitmq_queues", &[]), 2.0);
    assert_eq!(value(&samples, "rabbitmq_queue_messages_ready", &[]), 1.0, "3 published, 1 acked, 1 rejected");
    assert_eq!(value(&samples, "rabbitmq_global_messages_received_total", &[]), 4.0);
    assert_eq!(value(&samples, "rabbitmq_global_messages_routed_total", &[]), 3.0);
    // The API's publish is mandatory, so an unroutable one counts as returned.
    assert_eq!(value(&samples, "rabbitmq_global_messages_unroutable_returned_total", &[]), 1.0);
    assert_eq!(value(&samples, "rabbitmq_channel_get_ack_total", &[]), 2.0);
    assert_eq!(value(&samples, "rabbitmq_global_messages_acknowledged_total", &[]), 1.0);
    assert_eq!(value(&samples, "rabbitmq_global_messages_delivered_total", &[]), 2.0);
    assert_eq!(value(&samples, "rabbitmq_queues_created_total", &[]), 2.0);
    assert_eq!(value(&samples, "wharf_alarm", &[("resource", "memory")]), 0.0);
    let node = api.get("/api/overview").await.body["node"].as_str().unwrap().to_owned();
    let identity = [
        ("rabbitmq_cluster", node.as_str()),
        ("rabbitmq_cluster_permanent_id", node.as_str()),
        ("rabbitmq_node", node.as_str()),
    ];
    assert_eq!(value(&samples, "rabbitmq_identity_info", &identity), 1.0);
    // Three persistent appends to a durable queue, each made durable by an fdatasync.
    assert!(value(&samples, "wharf_store_fsync_duration_seconds_count", &[]) >= 1.0);
    assert!(value(&samples, "wharf_store_group_commit_appends_sum", &[]) >= 3.0);
    // The durable queue's log is a segment file holding its three records.
    assert!(value(&samples, "wharf_store_segments", &[]) >= 1.0);
    assert!(value(&samples, "wharf_store_segment_bytes", &[]) > 0.0);
    assert!(!samples.keys().any(|(name, labels)| name == "rabbitmq_queue_messages_ready" && !labels.is_empty()));

    let (_, _, text) = api.get_text("/metrics/per-object").await;
    let samples = parse(&text);
    assert_eq!(value(&samples, "rabbitmq_queue_messages_ready", &[("queue", "work"), ("vhost", "/")]), 1.0);
    assert_eq!(value(&samples, "rabbitmq_queue_messages_ready", &[("queue", "weird\"name"), ("vhost", "/")]), 0.0);
    // Per-queue counters: three published into `work`, two taken with a get, one of them acked.
    let work = [("queue", "work"), ("vhost", "/")];
    assert_eq!(value(&samples, "rabbitmq_queue_messages_published_total", &work), 3.0);
    assert_eq!(value(&samples, "rabbitmq_queue_get_ack_total", &work), 2.0);
    assert_eq!(value(&samples, "rabbitmq_queue_messages_acked_total", &work), 1.0);
    assert_eq!(value(&samples, "rabbitmq_queue_messages_delivered_ack_total", &work), 0.0);
    assert_eq!(
        value(&samples, "rabbitmq_queue_messages_published_total", &[("queue", "weird\"name"), ("vhost", "/")]),
        0.0
    );
    // The queue's own message_stats in the API, counters now (rates come with the sampler).
    let queue = api.get("/api/queues/%2F/work").await.body;
    assert_eq!(queue["message_stats"]["publish"], 3, "{queue}");
    assert_eq!(queue["message_stats"]["get"], 2);
    assert_eq!(queue["message_stats"]["deliver_get"], 2);
    assert_eq!(queue["message_stats"]["ack"], 1);
    assert!(queue["message_stats"]["publish_details"]["rate"].is_number());
    let idle = api.get("/api/queues/%2F/weird%22name").await.body;
    assert!(idle.get("message_stats").is_none(), "nothing passed through it: {idle}");
    let (_, _, text) = api.get_text("/metrics/detailed?vhost=other").await;
    parse(&text);
    assert!(!text.contains("queue=\"work\""), "only the vhost asked for");
    harness.stop().await;
}
