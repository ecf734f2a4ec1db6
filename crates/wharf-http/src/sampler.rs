//! Message rates, as RabbitMQ's management API reports them (`message_stats.publish_details.rate`,
//! `queue_totals.messages_details.rate`, …): a task samples the broker's counters and queue totals
//! every [`SAMPLE_INTERVAL`] (RabbitMQ's default statistics interval) into a ring of the last
//! [`SAMPLES_KEPT`]; a rate is the change between the last two samples per second, and a history
//! (for charts) is the samples within the age a request asks for (`msg_rates_age`,
//! `lengths_age`, in seconds, with `*_incr` steps), as RabbitMQ's `samples` arrays.

use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wharf_broker::{Management, QueueStats};

/// How often the counters are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: ten minutes' worth at the interval.
pub const SAMPLES_KEPT: usize = 121;

/// The counters of one sample, by RabbitMQ's `message_stats` names.
pub const MESSAGE_STATS: [&str; 11] = [
    "publish",
    "deliver",
    "deliver_no_ack",
    "get",
    "get_no_ack",
    "deliver_get",
    "redeliver",
    "ack",
    "get_empty",
    "return_unroutable",
    "drop_unroutable",
];

/// The queue totals of one sample, by RabbitMQ's `queue_totals` names.
pub const QUEUE_TOTALS: [&str; 3] = ["messages", "messages_ready", "messages_unacknowledged"];

/// One sample: when, the message counters, the queue totals.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    pub message_stats: [u64; MESSAGE_STATS.len()],
    pub queue_totals: [u64; QUEUE_TOTALS.len()],
}

/// The kept samples, oldest first; and each queue's counters at the last two samples, for its
/// own rates (no history per queue: ten minutes of 10,000 queues' samples would cost more than
/// the charts are worth).
#[derive(Debug, Default)]
pub struct Samples {
    ring: Mutex<VecDeque<Sample>>,
    queues: Mutex<QueueSamples>,
}

/// Per-queue counters at two moments.
#[derive(Debug, Default)]
struct QueueSamples {
    previous: (u64, HashMap<(String, String), QueueStats>),
    latest: (u64, HashMap<(String, String), QueueStats>),
}

/// Reads one counter of a queue.
type QueueCounter = fn(&QueueStats) -> u64;

/// A queue's `message_stats` names and how to read each from its counters.
const QUEUE_MESSAGE_STATS: [(&str, QueueCounter); 9] = [
    ("publish", |stats| stats.publish),
    ("deliver", |stats| stats.deliver),
    ("deliver_no_ack", |stats| stats.deliver_no_ack),
    ("get", |stats| stats.get),
    ("get_no_ack", |stats| stats.get_no_ack),
    ("deliver_get", |stats| stats.deliver + stats.deliver_no_ack + stats.get + stats.get_no_ack),
    ("redeliver", |stats| stats.redeliver),
    ("ack", |stats| stats.ack),
    ("get_empty", |stats| stats.get_empty),
];

impl Samples {
    pub fn push(&self, sample: Sample) {
        let mut ring = self.ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if ring.len() == SAMPLES_KEPT {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    /// Records every queue's counters at `at_ms`.
    pub fn push_queues(&self, at_ms: u64, stats: Vec<(String, String, QueueStats)>) {
        let latest: HashMap<(String, String), QueueStats> =
            stats.into_iter().map(|(vhost, name, stats)| ((vhost, name), stats)).collect();
        let mut queues = self.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        queues.previous = std::mem::replace(&mut queues.latest, (at_ms, latest));
    }

    /// A queue's `message_stats` (RabbitMQ's per-queue fields, each with `_details.rate` over
    /// the last sampling interval), or `None` if nothing passed through it yet.
    pub fn queue_message_stats(&self, vhost: &str, name: &str, now: &QueueStats) -> Option<Value> {
        if *now == QueueStats::default() {
            return None;
        }
        let queues = self.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (vhost.to_owned(), name.to_owned());
        let pair = match (queues.previous.1.get(&key), queues.latest.1.get(&key)) {
            (Some(previous), Some(latest)) if queues.latest.0 > queues.previous.0 => {
                Some((previous, latest, (queues.latest.0 - queues.previous.0) as f64 / 1000.0))
            }
            _ => None,
        };
        let mut stats = Map::new();
        for (field, read) in QUEUE_MESSAGE_STATS {
            stats.insert(field.to_owned(), json!(read(now)));
            let rate = pair.map_or(0.0, |(previous, latest, seconds)| {
                read(latest).saturating_sub(read(previous)) as f64 / seconds
            });
            stats.insert(format!("{field}_details"), json!({"rate": (rate * 10.0).round() / 10.0}));
        }
        Some(Value::Object(stats))
    }

    fn snapshot(&self) -> Vec<Sample> {
        self.ring.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter().cloned().collect()
    }

    /// `message_stats`: each counter's value now and its `_details` (rate; with `age_s`, the
    /// samples of that age every `step_s`).
    pub fn message_stats(&self, now: &Sample, age: Option<(u64, u64)>) -> Value {
        let samples = self.snapshot();
        let mut stats = Map::new();
        for (index, name) in MESSAGE_STATS.iter().enumerate() {
            stats.insert((*name).to_owned(), json!(now.message_stats[index]));
            let details = details(&samples, now, age, |sample| sample.message_stats[index]);
            stats.insert(format!("{name}_details"), details);
        }
        Value::Object(stats)
    }

    /// `queue_totals`: each total now and its `_details` (its rate of change; samples with an age).
    pub fn queue_totals(&self, now: &Sample, age: Option<(u64, u64)>) -> Value {
        let samples = self.snapshot();
        let mut totals = Map::new();
        for (index, name) in QUEUE_TOTALS.iter().enumerate() {
            totals.insert((*name).to_owned(), json!(now.queue_totals[index]));
            let details = details(&samples, now, age, |sample| sample.queue_totals[index]);
            totals.insert(format!("{name}_details"), details);
        }
        Value::Object(totals)
    }
}

/// The rate of `value` between the last kept sample and `now` (or between the last two kept
/// samples when `now` is no newer), per second; and with `age`, the kept samples of the last
/// `age.0` seconds at least `age.1` seconds apart, newest first, as RabbitMQ lists them.
fn details(samples: &[Sample], now: &Sample, age: Option<(u64, u64)>, value: impl Fn(&Sample) -> u64) -> Value {
    let previous = samples.iter().rev().find(|sample| sample.at_ms + 500 <= now.at_ms);
    let rate = match previous {
        Some(previous) => {
            let seconds = (now.at_ms - previous.at_ms) as f64 / 1000.0;
            (value(now) as f64 - value(previous) as f64) / seconds
        }
        None => 0.0,
    };
    let mut details = json!({"rate": (rate * 10.0).round() / 10.0});
    if let Some((age_s, step_s)) = age {
        let oldest_ms = now.at_ms.saturating_sub(age_s * 1000);
        let mut listed: Vec<Value> = Vec::new();
        let mut last_ms = u64::MAX;
        for sample in std::iter::once(now).chain(samples.iter().rev()) {
            if sample.at_ms < oldest_ms {
                break;
            }
            if last_ms != u64::MAX && last_ms.saturating_sub(sample.at_ms) < step_s.max(1) * 1000 {
                continue;
            }
            last_ms = sample.at_ms;
            listed.push(json!({"sample": value(sample), "timestamp": sample.at_ms}));
        }
        details["samples"] = Value::Array(listed);
    }
    details
}

/// The broker's counters and queue totals now.
pub fn sample_now(management: &Management) -> Sample {
    let overview = management.overview();
    let counters = management.stats().counters;
    let message_stats = [
        counters.published,
        counters.delivered_consume_manual_ack,
        counters.delivered_consume_auto_ack,
        counters.delivered_get_manual_ack,
        counters.delivered_get_auto_ack,
        counters.delivered_consume_manual_ack
            + counters.delivered_consume_auto_ack
            + counters.delivered_get_manual_ack
            + counters.delivered_get_auto_ack,
        counters.redelivered,
        counters.acknowledged,
        counters.get_empty,
        counters.unroutable_returned,
        counters.unroutable_dropped,
    ];
    let ready = overview.messages_ready;
    let unacked = overview.messages_unacknowledged;
    Sample { at_ms: management.now_ms(), message_stats, queue_totals: [ready + unacked, ready, unacked] }
}

/// Samples every [`SAMPLE_INTERVAL`] until the returned task is aborted.
pub fn start(management: Management, samples: Arc<Samples>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(SAMPLE_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let sample = sample_now(&management);
            samples.push_queues(sample.at_ms, management.queue_stats());
            samples.push(sample);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, published: u64, ready: u64) -> Sample {
        let mut message_stats = [0; MESSAGE_STATS.len()];
        message_stats[0] = published;
        Sample { at_ms, message_stats, queue_totals: [ready, ready, 0] }
    }

    #[test]
    fn a_queues_rates_are_per_second_over_the_last_interval() {
        let samples = Samples::default();
        let stats = |publish: u64, ack: u64| QueueStats { publish, ack, deliver: ack, ..QueueStats::default() };
        let key = |stats: QueueStats| vec![("/".to_owned(), "orders".to_owned(), stats)];
        samples.push_queues(0, key(stats(0, 0)));
        assert_eq!(samples.queue_message_stats("/", "orders", &stats(10, 0)).unwrap()["publish_details"]["rate"], 0.0);
        samples.push_queues(5_000, key(stats(50, 25)));
        let now = samples.queue_message_stats("/", "orders", &stats(60, 30)).unwrap();
        assert_eq!(now["publish"], 60, "counters are as of now");
        assert_eq!(now["publish_details"]["rate"], 10.0);
        assert_eq!(now["ack_details"]["rate"], 5.0);
        assert_eq!(now["deliver_get"], 30);
        assert_eq!(samples.queue_message_stats("/", "idle", &QueueStats::default()), None);
    }

    #[test]
    fn rates_are_per_second_between_the_last_sample_and_now() {
        let samples = Samples::default();
        samples.push(sample(0, 0, 0));
        samples.push(sample(5_000, 100, 50));
        let now = sample(10_000, 600, 30);
        let stats = samples.message_stats(&now, None);
        assert_eq!(stats["publish"], 600);
        assert_eq!(stats["publish_details"], json!({"rate": 100.0}));
        let totals = samples.queue_totals(&now, None);
        assert_eq!(totals["messages_ready_details"]["rate"], -4.0);
    }

    #[test]
    fn histories_list_samples_of_the_age_asked_for_newest_first() {
        let samples = Samples::default();
        for step in 0..10 {
            samples.push(sample(step * 5_000, step * 10, 0));
        }
        let now = sample(50_000, 100, 0);
        let stats = samples.message_stats(&now, Some((20, 10)));
        let listed: Vec<u64> = stats["publish_details"]["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["timestamp"].as_u64().unwrap())
            .collect();
        assert_eq!(listed, [50_000, 40_000, 30_000]);
        assert!(Samples::default().message_stats(&now, None)["publish_details"]["rate"] == json!(0.0));
    }

    #[test]
    fn the_ring_keeps_the_newest_samples() {
        let samples = Samples::default();
        for step in 0..(SAMPLES_KEPT as u64 + 5) {
            samples.push(sample(step, step, 0));
        }
        let kept = samples.snapshot();
        assert_eq!(kept.len(), SAMPLES_KEPT);
        assert_eq!(kept[0].at_ms, 5);
    }
}
