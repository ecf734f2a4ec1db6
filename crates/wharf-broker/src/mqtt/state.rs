//! What a persistent MQTT session keeps besides its queue and its queue's bindings, durably:
//! the packet ids of unfinished QoS 2 flows both ways and its shared subscriptions. Kept in the
//! definitions log (kind `mqtt-session`, key `mqtt-session\0<vhost>\0<client id>`, the value JSON
//! after the format's version byte and tag) and in memory, so a session resumed after a broker
//! restart, not only after a reconnect, finishes its QoS 2 flows exactly once and is still a
//! member of its shared subscriptions.
//!
//! When it is written (synced before the packet that depends on it goes out):
//! - a QoS 2 publish from the client with a new packet id: once its message is durable and
//!   before its PUBREC, so a PUBLISH the client sends again after a broker crash is recognised
//!   and not routed twice (and one whose message the crash lost is routed again). A crash
//!   between the two leaves the message without its record: each such message carries a marker
//!   (header `x-mqtt-qos2-flow`: the session's incarnation, the publish's flow number, its packet
//!   id, the client id) from which recovery writes the record it lacks ([`Sessions::load`]). The
//!   incarnation is recorded before the session's first QoS 2 publish, and flows are numbered in
//!   order and recorded one at a time (a refused one's end too, before its PUBREC), so a marker
//!   whose incarnation matches its session's record and whose number is the record's next is
//!   exactly one the crash left unrecorded; markers of finished flows or of ended sessions are
//!   told apart by the same two numbers. The marker is the broker's: a publish's user property
//!   of that name is dropped;
//! - a QoS 2 delivery the client received (its PUBREC): before the message leaves its queue and
//!   the PUBREL goes out, so the PUBREL is sent again after a crash, the id is not reused while
//!   the client still holds it, and the message, should its removal from the queue be lost in
//!   the crash, is recognised by where the store keeps it and not sent again;
//! - a shared subscription made or ended, and the connection's end (when the session's expiry
//!   starts to run).
//!
//! - a QoS 2 publish's PUBREL: before the PUBCOMP lets the client reuse the id.
//!
//! A delivery's PUBCOMP is not synced on its own: it is written with the next change. After a
//! crash such a finished delivery may still be recorded, which is harmless: a PUBREL sent again
//! for it is answered with a PUBCOMP by the client. An incoming id is only taken as a repeat when
//! the PUBLISH has the DUP flag (a new publish reusing the id has not). Only sessions that
//! outlive their connection are written.
//!
//! What is left: a message taken by a consumer and acknowledged, its removal durable, all in the
//! moment between the message becoming durable and its record doing so, leaves no marker behind
//! a crash there; the client's PUBLISH sent again is then routed a second time (as the
//! de-duplication index's keys recovered from messages, `docs/durability.md`).

use crate::core::Core;
use crate::definition_format::DEFINITIONS_FORMAT_VERSION;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use wharf_store::{MetaChange, MetaStore, StoreError};

/// The definitions-log kind of a session's state.
pub(crate) const KIND: &str = "mqtt-session";
/// The value's tag after the format version.
const TAG: u8 = b'S';
/// Most sessions whose state is kept: beyond it, the state of a further session is not kept (its
/// QoS 2 flows then behave as if the broker had forgotten them) and a warning says so.
const SESSIONS_MAX: usize = 100_000;

/// A session's state as stored.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Kept {
    /// How long the session outlives its connection.
    pub expiry_s: u32,
    /// When its last connection ended (ms since the epoch); `None` while it is connected.
    pub disconnected_at_ms: Option<u64>,
    /// QoS 2 publishes from the client whose PUBREL has not come.
    pub incoming_qos_2: BTreeSet<u16>,
    /// QoS 2 deliveries the client received (PUBREC) whose PUBCOMP has not come, by packet id,
    /// with where the store kept the message (log, seq): its removal from the queue is not
    /// synced, so after a crash the message may be back, and is then recognised and not sent.
    pub released: BTreeMap<u16, Option<(u64, u64)>>,
    /// Shared subscriptions, by their `$share/<group>/<filter>` text.
    pub shared: BTreeMap<String, SharedOptions>,
    /// Where the store kept QoS 2 deliveries released before a crash whose PUBCOMP has come
    /// since, but whose copy (back in the queue: the removal was not durable at the crash) has
    /// not been seen yet: it is taken off unsent when it comes.
    #[serde(default)]
    pub skip: BTreeSet<(u64, u64)>,
    /// This incarnation of the session (random, never 0; 0 until its first QoS 2 publish):
    /// markers of an earlier one (the same client id's session that ended) are not this one's.
    #[serde(default)]
    pub incarnation: u64,
    /// The flow number the client's next QoS 2 publish gets (one more than the last recorded).
    #[serde(default)]
    pub next_flow: u64,
}

/// The header marking a QoS 2 publish of a persistent session (see the module's doc).
pub(super) const FLOW_HEADER: &str = "x-mqtt-qos2-flow";

/// A QoS 2 publish's marker: `<incarnation, hex>:<flow>:<packet id>:<client id>`.
pub(super) fn flow_marker(incarnation: u64, flow: u64, packet_id: u16, client_id: &str) -> String {
    format!("{incarnation:016x}:{flow}:{packet_id}:{client_id}")
}

/// A marker's parts: (incarnation, flow, packet id, client id).
fn parse_flow_marker(marker: &str) -> Option<(u64, u64, u16, &str)> {
    let mut parts = marker.splitn(4, ':');
    let incarnation = u64::from_str_radix(parts.next()?, 16).ok()?;
    let flow = parts.next()?.parse().ok()?;
    let packet_id = parts.next()?.parse().ok()?;
    Some((incarnation, flow, packet_id, parts.next()?))
}

/// A new session incarnation: random (std's hasher keys are), mixed with the time, never 0.
pub(super) fn new_incarnation(now_ms: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now_ms);
    hasher.finish().max(1)
}

/// A shared subscription's options (no retained messages are sent for one, and no-local is not
/// allowed on one, so these are all it has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SharedOptions {
    pub qos: u8,
    pub retain_as_published: bool,
    pub identifier: Option<u32>,
}

impl Kept {
    /// Nothing worth a record.
    pub fn is_empty(&self) -> bool {
        self.incoming_qos_2.is_empty()
            && self.released.is_empty()
            && self.shared.is_empty()
            && self.skip.is_empty()
            && self.incarnation == 0
    }

    fn expired(&self, now_ms: u64) -> bool {
        self.disconnected_at_ms.is_some_and(|at_ms| now_ms >= at_ms.saturating_add(u64::from(self.expiry_s) * 1000))
    }
}

/// The stored sessions' state, by vhost and client id (what the definitions log holds).
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    kept: Mutex<HashMap<(String, String), Kept>>,
}

fn key(vhost: &str, client_id: &str) -> Vec<u8> {
    format!("{KIND}\0{vhost}\0{client_id}").into_bytes()
}

fn encode(kept: &Kept) -> Vec<u8> {
    let mut value = vec![DEFINITIONS_FORMAT_VERSION, TAG];
    // Serialising plain integers, booleans and strings cannot fail.
    value.extend(serde_json::to_vec(kept).unwrap_or_default());
    value
}

fn decode(value: &[u8]) -> Option<Kept> {
    serde_json::from_slice(value.strip_prefix(&[DEFINITIONS_FORMAT_VERSION, TAG])?).ok()
}

impl Sessions {
    /// The sessions' state stored in the definitions log (at start). A session that was
    /// connected when the broker stopped has been disconnected since `now_ms`; records of
    /// sessions that expired while the broker was down are deleted. `flow_markers` are the
    /// QoS 2 markers recovery found on queued messages: a record that lacks one (a crash came
    /// between the message and its record) gets it now, durably.
    pub(crate) fn load(
        meta: &MetaStore,
        entries: &BTreeMap<Vec<u8>, Vec<u8>>,
        now_ms: u64,
        vhost_exists: impl Fn(&str) -> bool,
        flow_markers: &FlowMarkers,
    ) -> Sessions {
        let mut kept = HashMap::new();
        let mut expired = Vec::new();
        for (key, value) in entries {
            let Some((KIND, vhost, client_id)) = crate::definition_format::split_key(key) else { continue };
            match decode(value) {
                Some(mut state) => {
                    state.disconnected_at_ms.get_or_insert(now_ms);
                    if state.expired(now_ms) || !vhost_exists(vhost) {
                        expired.push(MetaChange::Delete { key: key.clone() });
                    } else {
                        kept.insert((vhost.to_owned(), client_id.to_owned()), state);
                    }
                }
                None => tracing::error!(%vhost, %client_id, "a stored MQTT session state is unreadable; skipped"),
            }
        }
        if !expired.is_empty()
            && let Err(error) = meta.apply(&expired)
        {
            tracing::warn!(%error, "expired MQTT session states could not be deleted");
        }
        let completed = complete_from_markers(&mut kept, flow_markers);
        let changes: Vec<MetaChange> = completed
            .iter()
            .filter_map(|map_key| {
                let state = kept.get(map_key)?;
                Some(MetaChange::Put { key: key(&map_key.0, &map_key.1), value: encode(state) })
            })
            .collect();
        if !changes.is_empty() {
            tracing::info!(sessions = changes.len(), "MQTT QoS 2 publishes recorded from their messages after a crash");
            if let Err(error) = meta.apply(&changes) {
                tracing::warn!(%error, "MQTT session states completed from their messages could not be stored");
            }
        }
        Sessions { kept: Mutex::new(kept) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Kept>> {
        self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What the session `client_id` kept (nothing if it expired).
    pub(super) fn take(&self, vhost: &str, client_id: &str, now_ms: u64) -> Kept {
        match self.lock().get(&(vhost.to_owned(), client_id.to_owned())) {
            Some(state) if !state.expired(now_ms) => state.clone(),
            _ => Kept::default(),
        }
    }

    /// Stores the session's state (synced); an empty one deletes its record. Called with the
    /// client id held (`clients.rs`), so one session's writes never race.
    pub(super) fn write(&self, core: &Core, vhost: &str, client_id: &str, state: &Kept) -> Result<(), StoreError> {
        let map_key = (vhost.to_owned(), client_id.to_owned());
        // A connection ending after its vhost was deleted leaves nothing behind.
        if !state.is_empty() && core.lock_model().vhost(vhost).is_none() {
            return Ok(());
        }
        let stored = self.lock().get(&map_key).cloned();
        if state.is_empty() {
            if stored.is_some() {
                core.meta.delete(&key(vhost, client_id))?;
                self.lock().remove(&map_key);
            }
            return Ok(());
        }
        if stored.as_ref() == Some(state) {
            return Ok(());
        }
        if stored.is_none() && !self.room_for_one_more(core) {
            tracing::warn!(%vhost, %client_id, "MQTT session state not kept: {SESSIONS_MAX} sessions hold some");
            return Ok(());
        }
        core.meta.put(&key(vhost, client_id), &encode(state))?;
        self.lock().insert(map_key, state.clone());
        Ok(())
    }

    /// Whether another session's state may be kept, after dropping those that expired.
    fn room_for_one_more(&self, core: &Core) -> bool {
        let mut kept = self.lock();
        if kept.len() < SESSIONS_MAX {
            return true;
        }
        let now_ms = core.now_ms();
        let expired: Vec<_> =
            kept.iter().filter(|(_, state)| state.expired(now_ms)).map(|(key, _)| key.clone()).collect();
        let changes: Vec<MetaChange> =
            expired.iter().map(|(vhost, client_id)| MetaChange::Delete { key: key(vhost, client_id) }).collect();
        for map_key in &expired {
            kept.remove(map_key);
        }
        drop(kept);
        if !changes.is_empty()
            && let Err(error) = core.meta.apply(&changes)
        {
            tracing::warn!(%error, "expired MQTT session states could not be deleted");
        }
        self.lock().len() < SESSIONS_MAX
    }

    /// Forgets a deleted vhost's sessions (their records went with the vhost's).
    pub(crate) fn forget_vhost(&self, vhost: &str) {
        self.lock().retain(|(session_vhost, _), _| session_vhost != vhost);
    }
}

/// The QoS 2 markers recovery found on queued messages: for each session incarnation (vhost,
/// client id, incarnation), its highest flow and that publish's packet id. Only the highest can
/// be unrecorded (flows are recorded one at a time, in order), so one per session is kept.
#[derive(Debug, Default)]
pub(crate) struct FlowMarkers {
    highest: HashMap<(String, String, u64), (u64, u16)>,
}

impl FlowMarkers {
    /// Notes the marker a recovered message in `vhost` carries, if it has one.
    pub(crate) fn note(&mut self, vhost: &str, message: &wharf_model::Message) {
        let properties = message.full_properties();
        let Some(table) = properties.headers().as_ref() else { return };
        let Some(wharf_wire::types::AMQPValue::LongString(text)) = table.inner().get(FLOW_HEADER) else { return };
        let Some((incarnation, flow, packet_id, client_id)) =
            std::str::from_utf8(text.as_bytes()).ok().and_then(parse_flow_marker)
        else {
            return;
        };
        let highest =
            self.highest.entry((vhost.to_owned(), client_id.to_owned(), incarnation)).or_insert((flow, packet_id));
        if flow > highest.0 {
            *highest = (flow, packet_id);
        }
    }
}

/// Adds to each session's incoming QoS 2 ids the one a marker shows durable but its record does
/// not have (see the module's doc); returns the sessions changed.
fn complete_from_markers(
    kept: &mut HashMap<(String, String), Kept>,
    markers: &FlowMarkers,
) -> BTreeSet<(String, String)> {
    let mut changed = BTreeSet::new();
    for ((vhost, client_id, incarnation), (flow, packet_id)) in &markers.highest {
        let map_key = (vhost.clone(), client_id.clone());
        let Some(state) = kept.get_mut(&map_key) else { continue };
        // Flows are recorded one at a time and in order (a refused one's end too), so the only
        // one a crash can leave unrecorded is the record's next; any other is finished, or not
        // this session's doing.
        if state.incarnation != *incarnation || *flow != state.next_flow {
            continue;
        }
        state.incoming_qos_2.insert(*packet_id);
        state.next_flow = flow.saturating_add(1);
        changed.insert(map_key);
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_survives_its_encoding_and_expires_after_its_interval() {
        let mut state = Kept { expiry_s: 10, disconnected_at_ms: Some(1_000), ..Kept::default() };
        state.incoming_qos_2.insert(7);
        state.released.insert(9, Some((3, 44)));
        state.released.insert(10, None);
        state
            .shared
            .insert("$share/g/a/+".into(), SharedOptions { qos: 2, retain_as_published: true, identifier: Some(4) });
        assert_eq!(decode(&encode(&state)), Some(state.clone()));
        assert!(!state.expired(10_999));
        assert!(state.expired(11_000));
        state.disconnected_at_ms = None;
        assert!(!state.expired(u64::MAX), "a connected session does not expire");
        assert_eq!(decode(b"\x01Snot json"), None);
    }

    #[test]
    fn a_marker_names_its_publish_even_with_colons_in_the_client_id() {
        let marker = flow_marker(0xabc, 41, 7, "plant:3:meter");
        assert_eq!(parse_flow_marker(&marker), Some((0xabc, 41, 7, "plant:3:meter")));
        assert_eq!(parse_flow_marker("zz:1:2:c"), None);
        assert_eq!(parse_flow_marker("1:2:70000:c"), None, "a packet id is 16 bits");
        assert_ne!(new_incarnation(5), 0);
    }

    #[test]
    fn only_a_marker_of_the_sessions_incarnation_past_its_record_is_taken() {
        let session = |incarnation, next_flow| Kept { expiry_s: 60, incarnation, next_flow, ..Kept::default() };
        let mut kept = HashMap::new();
        for (client_id, state) in [("unrecorded", session(9, 4)), ("finished", session(9, 4)), ("newer", session(8, 0))]
        {
            kept.insert(("/".to_owned(), client_id.to_owned()), state);
        }
        let mut markers = FlowMarkers::default();
        // The crash came between flow 4's message and its record.
        markers.highest.insert(("/".into(), "unrecorded".into(), 9), (4, 12));
        // Flow 3 was recorded (the record has reached 4) and finished since.
        markers.highest.insert(("/".into(), "finished".into(), 9), (3, 12));
        // Past the next flow: no crash leaves that (a marker not the broker's own, say).
        kept.insert(("/".to_owned(), "ahead".to_owned()), session(9, 4));
        markers.highest.insert(("/".into(), "ahead".into(), 9), (u64::MAX, 12));
        // A marker of an earlier session with the same client id.
        markers.highest.insert(("/".into(), "newer".into(), 7), (0, 12));
        // A session with no record.
        markers.highest.insert(("/".into(), "gone".into(), 9), (4, 12));
        let changed = complete_from_markers(&mut kept, &markers);
        assert_eq!(changed.into_iter().map(|(_, client_id)| client_id).collect::<Vec<_>>(), vec!["unrecorded"]);
        let unrecorded = &kept[&("/".to_owned(), "unrecorded".to_owned())];
        assert_eq!(
            (unrecorded.incoming_qos_2.iter().copied().collect::<Vec<_>>(), unrecorded.next_flow),
            (vec![12], 5)
        );
        assert!(kept[&("/".to_owned(), "finished".to_owned())].incoming_qos_2.is_empty());
        assert!(kept[&("/".to_owned(), "newer".to_owned())].incoming_qos_2.is_empty());
        assert_eq!(kept[&("/".to_owned(), "ahead".to_owned())].next_flow, 4);
    }
}
