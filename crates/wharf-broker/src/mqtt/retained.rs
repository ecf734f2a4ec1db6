//! Retained messages: the last retained publish of each topic, per vhost, kept durably in the
//! definitions log (kind `mqtt-retained`, key `mqtt-retained\0<vhost>\0<topic>`, the value the
//! publish as a 5.0 PUBLISH packet after the format's version byte and tag) and in memory for
//! subscriptions. A retained publish is written (and synced) before its PUBACK; an empty one
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
/// The value's tag after the format version.
const TAG: u8 = b'R';
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
}

#[derive(Debug, Default)]
struct RetainedState {
    by_vhost: HashMap<String, BTreeMap<String, Publish>>,
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

fn weight(publish: &Publish) -> u64 {
    (publish.topic.len() + publish.payload.len()) as u64 + 64
}

impl Retained {
    /// The retained messages stored in the definitions log (at start).
    pub(crate) fn load(entries: &BTreeMap<Vec<u8>, Vec<u8>>) -> Retained {
        let mut state = RetainedState::default();
        for (key, value) in entries {
            let Some((KIND, vhost, topic_name)) = crate::definition_format::split_key(key) else { continue };
            match decode(value) {
                Some(publish) if publish.topic == topic_name => {
                    state.count += 1;
                    state.bytes += weight(&publish);
                    state.by_vhost.entry(vhost.to_owned()).or_default().insert(topic_name.to_owned(), publish);
                }
                _ => {
                    tracing::error!(%vhost, topic = %topic_name, "a stored retained MQTT message is unreadable; skipped")
                }
            }
        }
        Retained { state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RetainedState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps `publish` as its topic's retained message (an empty payload clears the topic),
    /// durably: it returns once the definitions log synced it.
    pub(super) fn keep(&self, core: &Core, vhost: &str, publish: &Publish) -> Result<(), NotKept> {
        let key = key(vhost, &publish.topic);
        if publish.payload.is_empty() {
            blocking(|| core.meta.delete(&key)).map_err(NotKept::Store)?;
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
        {
            let state = self.lock();
            let replaced = state.by_vhost.get(vhost).and_then(|topics| topics.get(&publish.topic)).map(weight);
            let count = state.count + usize::from(replaced.is_none());
            let bytes = state.bytes + weight(&stored) - replaced.unwrap_or(0);
            if count > RETAINED_MESSAGES_MAX || bytes > RETAINED_BYTES_MAX {
                return Err(NotKept::Full);
            }
        }
        blocking(|| core.meta.put(&key, &encode(&stored))).map_err(NotKept::Store)?;
        let mut state = self.lock();
        let added = weight(&stored);
        match state.by_vhost.entry(vhost.to_owned()).or_default().insert(publish.topic.clone(), stored) {
            Some(replaced) => state.bytes -= weight(&replaced),
            None => state.count += 1,
        }
        state.bytes += added;
        Ok(())
    }

    /// The retained messages whose topics `filter` matches.
    pub(super) fn matching(&self, vhost: &str, filter: &str) -> Vec<Publish> {
        let state = self.lock();
        let Some(topics) = state.by_vhost.get(vhost) else { return Vec::new() };
        if !filter.contains(['+', '#']) {
            return topics.get(filter).cloned().into_iter().collect();
        }
        topics.iter().filter(|(name, _)| topic::matches(filter, name)).map(|(_, publish)| publish.clone()).collect()
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

fn encode(publish: &Publish) -> Vec<u8> {
    let mut packet = BytesMut::new();
    wharf_mqtt::encode(&Packet::Publish(publish.clone()), Version::V5, &mut packet);
    let mut value = vec![DEFINITIONS_FORMAT_VERSION, TAG];
    value.extend_from_slice(&packet);
    value
}

fn decode(value: &[u8]) -> Option<Publish> {
    let packet = value.strip_prefix(&[DEFINITIONS_FORMAT_VERSION, TAG])?;
    let mut decoder = Decoder::new(wharf_mqtt::PACKET_BYTES_MAX_LIMIT);
    decoder.set_version(Version::V5);
    let mut buffer = BytesMut::from(packet);
    match decoder.decode(&mut buffer) {
        Ok(Some(Packet::Publish(publish))) if buffer.is_empty() => Some(publish),
        _ => None,
    }
}
