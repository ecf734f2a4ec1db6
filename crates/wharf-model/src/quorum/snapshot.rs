//! A quorum queue's state as bytes, for its group's snapshots: everything that decides what
//! the queue does next (settings, the next id, every message with its delivery count and
//! holder, the ready order, the consumers with their prefetch and holdings, the round-robin
//! order, the de-duplication keys within their window, the leases and backoffs), so a replica restored from a snapshot and fed the commands after it decides exactly
//! as one that applied every command (the property test in `tests.rs` checks it).
//!
//! The format is this crate's own, little-endian and versioned by its first byte; decoding
//! checks every length against what is left, so damaged bytes are refused, never trusted.

use super::{ConsumerState, Held, QuorumConsumer, QuorumQueue, QuorumSettings};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// The format's version, its first byte. Version 2 added, at the end, the settings and the
/// state of leases, retry backoff and single active consumer, and the messages' ordering keys;
/// version 1 is still read (none of those).
const FORMAT_VERSION: u8 = 2;

impl QuorumQueue {
    /// The state as bytes (see the module doc).
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        put_option_u64(&mut out, self.settings.delivery_limit.map(u64::from));
        put_option_u64(&mut out, self.settings.max_length);
        put_option_u64(&mut out, self.settings.max_length_bytes);
        out.push(u8::from(self.settings.reject_publish));
        out.extend_from_slice(&self.next_id.to_le_bytes());
        out.extend_from_slice(&(self.messages.len() as u64).to_le_bytes());
        for (id, held) in &self.messages {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&(held.payload.len() as u64).to_le_bytes());
            out.extend_from_slice(&held.payload);
            put_option_u64(&mut out, held.expires_at_ms);
            out.extend_from_slice(&held.delivery_count.to_le_bytes());
            match &held.checked_out_to {
                Some(consumer) => {
                    out.push(1);
                    put_consumer(&mut out, consumer);
                }
                None => out.push(0),
            }
        }
        out.extend_from_slice(&(self.ready.len() as u64).to_le_bytes());
        for id in &self.ready {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&(self.consumers.len() as u64).to_le_bytes());
        for (consumer, state) in &self.consumers {
            put_consumer(&mut out, consumer);
            out.extend_from_slice(&state.prefetch.to_le_bytes());
            out.push(u8::from(state.cancelled));
            out.extend_from_slice(&(state.holds.len() as u64).to_le_bytes());
            for id in &state.holds {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.service_order.len() as u64).to_le_bytes());
        for consumer in &self.service_order {
            put_consumer(&mut out, consumer);
        }
        put_option_u64(&mut out, self.settings.dedup_ttl_ms);
        out.extend_from_slice(&(self.dedup_keys.len() as u64).to_le_bytes());
        for (key, until) in &self.dedup_keys {
            out.extend_from_slice(&(key.len() as u64).to_le_bytes());
            out.extend_from_slice(key);
            out.extend_from_slice(&until.to_le_bytes());
        }
        out.extend_from_slice(&(self.settings.retry_backoff_ms.len() as u64).to_le_bytes());
        for step in &self.settings.retry_backoff_ms {
            out.extend_from_slice(&step.to_le_bytes());
        }
        put_option_u64(&mut out, self.settings.lease_ms);
        out.push(u8::from(self.settings.single_active_consumer));
        for timed in [&self.waiting, &self.leased] {
            out.extend_from_slice(&(timed.len() as u64).to_le_bytes());
            for id in timed {
                out.extend_from_slice(&id.to_le_bytes());
                put_option_u64(&mut out, self.messages.get(id).and_then(|held| held.due_ms));
            }
        }
        let keyed: Vec<(&u64, &Arc<[u8]>)> =
            self.messages.iter().filter_map(|(id, held)| held.order_key.as_ref().map(|key| (id, key))).collect();
        out.extend_from_slice(&(keyed.len() as u64).to_le_bytes());
        for (id, key) in keyed {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&(key.len() as u64).to_le_bytes());
            out.extend_from_slice(key);
        }
        out
    }

    /// The state `bytes` hold, or `None` if they are not a snapshot this version wrote whole.
    pub fn decode_snapshot(bytes: &[u8]) -> Option<QuorumQueue> {
        let mut reader = Reader { bytes };
        let version = reader.u8()?;
        if version != 1 && version != FORMAT_VERSION {
            return None;
        }
        let mut settings = QuorumSettings {
            delivery_limit: reader.option_u64()?.map(u32::try_from).transpose().ok()?,
            max_length: reader.option_u64()?,
            max_length_bytes: reader.option_u64()?,
            reject_publish: reader.flag()?,
            ..Default::default()
        };
        let next_id = reader.u64()?;
        let mut messages = BTreeMap::new();
        for _ in 0..reader.u64()? {
            let id = reader.u64()?;
            let length = usize::try_from(reader.u64()?).ok()?;
            let payload: Arc<[u8]> = Arc::from(reader.take(length)?);
            let expires_at_ms = reader.option_u64()?;
            let delivery_count = reader.u32()?;
            let checked_out_to = if reader.flag()? { Some(reader.consumer()?) } else { None };
            let held = Held { payload, expires_at_ms, delivery_count, checked_out_to, due_ms: None, order_key: None };
            messages.insert(id, held);
        }
        let mut ready = BTreeSet::new();
        let mut ready_bytes = 0u64;
        for _ in 0..reader.u64()? {
            let id = reader.u64()?;
            ready_bytes += messages.get(&id)?.payload.len() as u64;
            ready.insert(id);
        }
        let mut consumers = BTreeMap::new();
        for _ in 0..reader.u64()? {
            let consumer = reader.consumer()?;
            let prefetch = reader.u32()?;
            let cancelled = reader.flag()?;
            let mut holds = BTreeSet::new();
            for _ in 0..reader.u64()? {
                holds.insert(reader.u64()?);
            }
            consumers.insert(consumer, ConsumerState { prefetch, holds, cancelled });
        }
        let mut service_order = VecDeque::new();
        for _ in 0..reader.u64()? {
            service_order.push_back(reader.consumer()?);
        }
        settings.dedup_ttl_ms = reader.option_u64()?;
        let mut dedup_keys = BTreeMap::new();
        let mut dedup_order = BTreeSet::new();
        for _ in 0..reader.u64()? {
            let length = usize::try_from(reader.u64()?).ok()?;
            let key: Arc<[u8]> = Arc::from(reader.take(length)?);
            let until = reader.u64()?;
            dedup_order.insert((until, Arc::clone(&key)));
            dedup_keys.insert(key, until);
        }
        let (mut waiting, mut leased) = (BTreeSet::new(), BTreeSet::new());
        if version >= 2 {
            for _ in 0..reader.u64()? {
                settings.retry_backoff_ms.push(reader.u64()?);
            }
            settings.lease_ms = reader.option_u64()?;
            settings.single_active_consumer = reader.flag()?;
            for timed in [&mut waiting, &mut leased] {
                for _ in 0..reader.u64()? {
                    let id = reader.u64()?;
                    messages.get_mut(&id)?.due_ms = reader.option_u64()?;
                    timed.insert(id);
                }
            }
            for _ in 0..reader.u64()? {
                let id = reader.u64()?;
                let length = usize::try_from(reader.u64()?).ok()?;
                messages.get_mut(&id)?.order_key = Some(Arc::from(reader.take(length)?));
            }
        }
        if !reader.bytes.is_empty() {
            return None;
        }
        let mut queue = QuorumQueue {
            settings,
            next_id,
            messages,
            ready,
            ready_bytes,
            consumers,
            service_order,
            dedup_keys,
            dedup_order,
            waiting,
            leased,
            ..Default::default()
        };
        queue.rebuild_ordering();
        queue.note_unstamped_timers();
        Some(queue)
    }
}

fn put_option_u64(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        Some(value) => {
            out.push(1);
            out.extend_from_slice(&value.to_le_bytes());
        }
        None => out.push(0),
    }
}

fn put_consumer(out: &mut Vec<u8>, consumer: &QuorumConsumer) {
    out.extend_from_slice(&consumer.node.to_le_bytes());
    out.extend_from_slice(&consumer.incarnation.to_le_bytes());
    out.extend_from_slice(&consumer.connection.to_le_bytes());
    out.extend_from_slice(&consumer.channel.to_le_bytes());
    out.extend_from_slice(&(consumer.tag.len() as u64).to_le_bytes());
    out.extend_from_slice(consumer.tag.as_bytes());
}

/// Reads what `encode_snapshot` wrote, refusing anything short.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, length: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < length {
            return None;
        }
        let (taken, rest) = self.bytes.split_at(length);
        self.bytes = rest;
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn flag(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn option_u64(&mut self) -> Option<Option<u64>> {
        if self.flag()? { Some(Some(self.u64()?)) } else { Some(None) }
    }

    fn consumer(&mut self) -> Option<QuorumConsumer> {
        let node = self.u64()?;
        let incarnation = self.u32()?;
        let connection = self.u64()?;
        let channel = self.u16()?;
        let length = usize::try_from(self.u64()?).ok()?;
        let tag = String::from_utf8(self.take(length)?.to_vec()).ok()?;
        Some(QuorumConsumer { node, incarnation, connection, channel, tag })
    }
}
