//! Retained messages: the last retained publish of each topic, per vhost, kept durably in the
//! definitions log (kind `mqtt-retained`, key `mqtt-retained\0<vhost>\0<topic>`, the value the
//! publish as a 5.0 PUBLISH packet after the format's version byte, tag and, for tag `E`, the
//! time it was kept) and in memory for subscriptions. One with a message expiry (5.0) is no
//! longer sent once it has expired, and a copy goes out with the time it has left, as the
//! specification asks (section 3.3.2.3.3). A retained publish is written (and synced) before its PUBACK; an empty one
//! clears the topic. A new subscription gets the retained messages its filter matches as copies
//! put into the session's own queue, marked with the header `x-mqtt-retained`, so they are
//! delivered, acknowledged and redelivered like any other message, with the retain flag set.
//! Bounded: at most [`RETAINED_MESSAGES_MAX`] messages and [`RETAINED_BYTES_MAX`] bytes in all.

use crate::core::{Core, blocking};
use crate::definition_format::DEFINITIONS_FORMAT_VERSION;
use bytes::BytesMut;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use wharf_mqtt::{Decoder, Packet, Publish, Version, topic};
use wharf_store::StoreError;

/// The definitions-log kind of a retained message.
pub(crate) const KIND: &str = "mqtt-retained";
/// The value's tag after the format version (older records: no time kept; they never expire).
const TAG: u8 = b'R';
/// The tag of a record with the time it was kept (ms since the epoch, 8 bytes big-endian).
const TAG_TIMED: u8 = b'E';
/// The header that marks a copy delivered because a subscription was made.
pub(super) const RETAINED_HEADER: &str = "x-mqtt-retained";
/// Most retained messages the broker keeps (RabbitMQ's default limit is 100,000 per vhost).
pub(crate) const RETAINED_MESSAGES_MAX: usize = 100_000;
/// Most bytes of retained messages the broker keeps (they are all in memory).
pub(crate) const RETAINED_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// The retained messages, by vhost and topic.
#[derive(Debug, Default)]
pub(crate) struct Retained {
    state: Mutex<RetainedState>,
    /// Held across a change's write to the definitions log and to memory, so the two agree
    /// (one retained write at a time, each already a synced write of its own).
    writing: Mutex<()>,
}

#[derive(Debug, Default)]
struct RetainedState {
    by_vhost: HashMap<String, BTreeMap<String, Kept>>,
    count: usize,
    bytes: u64,
}

/// Why a retained message was not kept.
#[derive(Debug)]
pub(super) enum NotKept {
    /// Over [`RETAINED_MESSAGES_MAX`] or [`RETAINED_BYTES_MAX`].
    Full,
    /// The definitions log could not take it (the broker stops).
    Store(StoreError),
}

fn key(vhost: &str, topic_name: &str) -> Vec<u8> {
    format!("{KIND}\0{vhost}\0{topic_name}").into_bytes()
}

/// A retained publish and when it was kept.
#[derive(Debug, Clone)]
struct Kept {
    publish: Publish,
    kept_at_ms: u64,
}

impl Kept {
    /// The publish as it goes out at `now_ms`: `None` once expired, else with the expiry left.
    fn at(&self, now_ms: u64) -> Option<Publish> {
        let mut publish = self.publish.clone();
        if let Some(expiry_s) = publish.properties.message_expiry_interval_s {
            let age_s = now_ms.saturating_sub(self.kept_at_ms) / 1000;
            let left_s = u64::from(expiry_s).checked_sub(age_s).filter(|left_s| *left_s > 0)?;
            publish.properties.message_expiry_interval_s = Some(left_s as u32);
        }
        Some(publish)
    }
}

fn weight(kept: &Kept) -> u64 {
    (kept.publish.topic.len() + kept.publish.payload.len()) as u64 + 64
}

impl Retained {
    /// The retained messages stored in the definitions log (at start).
    pub(crate) fn load(entries: &BTreeMap<Vec<u8>, Vec<u8>>) -> Retained {
        let mut state = RetainedState::default();
        for (key, value) in entries {
            let Some((KIND, vhost, topic_name)) = crate::definition_format::split_key(key) else { continue };
            match decode(value) {
                Some(kept) if kept.publish.topic == topic_name => {
                    state.count += 1;
                    state.bytes += weight(&kept);
                    state.by_vhost.entry(vhost.to_owned()).or_default().insert(topic_name.to_owned(), kept);
                }
                _ => {
                    tracing::error!(%vhost, topic = %topic_name, "a stored retained MQTT message is unreadable; skipped")
                }
            }
        }
        Retained { state: Mutex::new(state), writing: Mutex::new(()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RetainedState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps `publish` as its topic's retained message (an empty payload clears the topic),
    /// durably: it returns once the definitions log synced it.
    pub(super) fn keep(&self, core: &Core, vhost: &str, publish: &Publish) -> Result<(), NotKept> {
        // Waiting for `writing` (another retained publish's sync) is blocking work too.
        blocking(|| self.keep_now(core, vhost, publish))
    }

    fn keep_now(&self, core: &Core, vhost: &str, publish: &Publish) -> Result<(), NotKept> {
        let _writing = self.writing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = key(vhost, &publish.topic);
        if publish.payload.is_empty() {
            core.meta.delete(&key).map_err(NotKept::Store)?;
            let mut state = self.lock();
            if let Some(removed) = state.by_vhost.get_mut(vhost).and_then(|topics| topics.remove(&publish.topic)) {
                state.count -= 1;
                state.bytes -= weight(&removed);
            }
            return Ok(());
        }
        let mut stored = publish.clone();
        stored.dup = false;
        stored.packet_id = if stored.qos == wharf_mqtt::QoS::AtMostOnce { 0 } else { 1 };
        stored.retain = true;
        stored.properties.topic_alias = None;
        let stored = Kept { publish: stored, kept_at_ms: core.now_ms() };
        for attempt in 0..2 {
            let state = self.lock();
            let replaced = state.by_vhost.get(vhost).and_then(|topics| topics.get(&publish.topic)).map(weight);
            let count = state.count + usize::from(replaced.is_none());
            let bytes = state.bytes + weight(&stored) - replaced.unwrap_or(0);
            if count <= RETAINED_MESSAGES_MAX && bytes <= RETAINED_BYTES_MAX {
                break;
            }
            drop(state);
            if attempt > 0 {
                return Err(NotKept::Full);
            }
            self.drop_expired(core).map_err(NotKept::Store)?;
        }
        core.meta.put(&key, &encode(&stored)).map_err(NotKept::Store)?;
        let mut state = self.lock();
        let added = weight(&stored);
        match state.by_vhost.entry(vhost.to_owned()).or_default().insert(publish.topic.clone(), stored) {
            Some(replaced) => state.bytes -= weight(&replaced),
            None => state.count += 1,
        }
        state.bytes += added;
        Ok(())
    }

    /// The retained messages whose topics `filter` matches and that have not expired at
    /// `now_ms`, each with the expiry it has left.
    pub(super) fn matching(&self, vhost: &str, filter: &str, now_ms: u64) -> Vec<Publish> {
        let state = self.lock();
        let Some(topics) = state.by_vhost.get(vhost) else { return Vec::new() };
        if !filter.contains(['+', '#']) {
            return topics.get(filter).and_then(|kept| kept.at(now_ms)).into_iter().collect();
        }
        topics.iter().filter(|(name, _)| topic::matches(filter, name)).filter_map(|(_, kept)| kept.at(now_ms)).collect()
    }

    /// Drops the retained messages that have expired (to make room); `writing` is held.
    fn drop_expired(&self, core: &Core) -> Result<(), StoreError> {
        let now_ms = core.now_ms();
        let expired: Vec<(String, String)> = {
            let state = self.lock();
            state
                .by_vhost
                .iter()
                .flat_map(|(vhost, topics)| {
                    topics
                        .iter()
                        .filter(|(_, kept)| kept.at(now_ms).is_none())
                        .map(|(name, _)| (vhost.clone(), name.clone()))
                })
                .collect()
        };
        if expired.is_empty() {
            return Ok(());
        }
        let changes: Vec<wharf_store::MetaChange> = expired
            .iter()
            .map(|(vhost, topic_name)| wharf_store::MetaChange::Delete { key: key(vhost, topic_name) })
            .collect();
        core.meta.apply(&changes)?;
        let mut state = self.lock();
        for (vhost, topic_name) in expired {
            if let Some(removed) = state.by_vhost.get_mut(&vhost).and_then(|topics| topics.remove(&topic_name)) {
                state.count -= 1;
                state.bytes -= weight(&removed);
            }
        }
        Ok(())
    }

    /// Forgets a deleted vhost's retained messages (their records went with the vhost's).
    pub(crate) fn forget_vhost(&self, vhost: &str) {
        let mut state = self.lock();
        if let Some(topics) = state.by_vhost.remove(vhost) {
            state.count -= topics.len();
            state.bytes -= topics.values().map(weight).sum::<u64>();
        }
    }
}

fn encode(kept: &Kept) -> Vec<u8> {
    let mut packet = BytesMut::new();
    wharf_mqtt::encode(&Packet::Publish(kept.publish.clone()), Version::V5, &mut packet);
    let mut value = vec![DEFINITIONS_FORMAT_VERSION, TAG_TIMED];
    value.extend_from_slice(&kept.kept_at_ms.to_be_bytes());
    value.extend_from_slice(&packet);
    value
}

fn decode(value: &[u8]) -> Option<Kept> {
    let (kept_at_ms, packet) = match value.strip_prefix(&[DEFINITIONS_FORMAT_VERSION, TAG_TIMED]) {
        Some(timed) => {
            let (at, packet) = timed.split_first_chunk::<8>()?;
            (u64::from_be_bytes(*at), packet)
        }
        None => (0, value.strip_prefix(&[DEFINITIONS_FORMAT_VERSION, TAG])?),
    };
    let publish = decode_publish(packet)?;
    // An older record has no time: it is kept as it was, without an expiry running.
    let publish = if kept_at_ms == 0 {
        Publish {
            properties: wharf_mqtt::Properties { message_expiry_interval_s: None, ..publish.properties },
            ..publish
        }
    } else {
        publish
    };
    Some(Kept { publish, kept_at_ms })
}

fn decode_publish(packet: &[u8]) -> Option<Publish> {
    let mut decoder = Decoder::new(wharf_mqtt::PACKET_BYTES_MAX_LIMIT);
    decoder.set_version(Version::V5);
    let mut buffer = BytesMut::from(packet);
    match decoder.decode(&mut buffer) {
        Ok(Some(Packet::Publish(publish))) if buffer.is_empty() => Some(publish),
        _ => None,
    }
}
