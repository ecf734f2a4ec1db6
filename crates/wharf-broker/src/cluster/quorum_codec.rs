//! The bytes of a quorum queue group's log entries and answers. An entry is a batch of
//! [`QuorumCommand`]s (a node proposes what its channels did since its last proposal in one
//! entry); an answer is one [`QuorumAnswer`] per command. Binary, since entries carry message
//! bodies: a command is a tag byte and its fields, integers big-endian, strings and payloads
//! with a u32 length. Every length read is checked against what is left, so a damaged entry is
//! refused, never a panic.

use std::sync::Arc;
use wharf_model::{QuorumAnswer, QuorumCommand, QuorumConsumer};

const ENQUEUE: u8 = 1;
const CHECKOUT: u8 = 2;
const CANCEL: u8 = 3;
const DOWN: u8 = 4;
const SETTLE: u8 = 5;
const RETURN: u8 = 6;
const DISCARD: u8 = 7;
const NODE_DOWN: u8 = 8;
const NODE_RESTARTED: u8 = 9;
const TICK: u8 = 10;
const PURGE: u8 = 11;
const ENQUEUE_KEYED: u8 = 12;
const DEQUEUE: u8 = 13;
/// `ENQUEUE` and `ENQUEUE_KEYED` with an ordering key after their fields (`x-ordered-by`).
const ENQUEUE_ORDERED: u8 = 14;
const ENQUEUE_KEYED_ORDERED: u8 = 15;

const ANSWER_DONE: u8 = 1;
const ANSWER_DONE_WITH_ID: u8 = 2;
const ANSWER_REJECTED: u8 = 3;
const ANSWER_REMOVED: u8 = 4;
const ANSWER_DUPLICATE: u8 = 5;
const ANSWER_DEQUEUED: u8 = 6;
const ANSWER_EMPTY: u8 = 7;

/// Ids one settle command may name (a batch of acks is split into commands of this many).
pub(crate) const IDS_PER_COMMAND_MAX: usize = 65_536;

/// Big-endian fields into bytes (also the encoding of `homed_link.rs`'s calls).
pub(super) struct Writer(pub(super) Vec<u8>);

impl Writer {
    pub(super) fn u8(&mut self, value: u8) {
        self.0.push(value);
    }
    pub(super) fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_be_bytes());
    }
    pub(super) fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_be_bytes());
    }
    pub(super) fn bytes(&mut self, value: &[u8]) {
        self.u32(value.len() as u32);
        self.0.extend_from_slice(value);
    }
    fn consumer(&mut self, consumer: &QuorumConsumer) {
        self.u64(consumer.node);
        self.u32(consumer.incarnation);
        self.u64(consumer.connection);
        self.u32(u32::from(consumer.channel));
        self.bytes(consumer.tag.as_bytes());
    }
    fn ids(&mut self, ids: &[u64]) {
        self.u32(ids.len() as u32);
        for id in ids {
            self.u64(*id);
        }
    }
}

/// Fields out of bytes, each length checked against what is left.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, count: usize, what: &str) -> Result<&'a [u8], String> {
        if self.0.len() < count {
            return Err(format!("a cluster message ends inside its {what}"));
        }
        let (taken, rest) = self.0.split_at(count);
        self.0 = rest;
        Ok(taken)
    }
    pub(super) fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    pub(super) fn u32(&mut self, what: &str) -> Result<u32, String> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }
    pub(super) fn u64(&mut self, what: &str) -> Result<u64, String> {
        let bytes = self.take(8, what)?;
        let mut array = [0; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_be_bytes(array))
    }
    pub(super) fn bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let length = self.u32(what)? as usize;
        self.take(length, what)
    }
    fn consumer(&mut self) -> Result<QuorumConsumer, String> {
        let node = self.u64("consumer's node")?;
        let incarnation = self.u32("consumer's incarnation")?;
        let connection = self.u64("consumer's connection")?;
        let channel = u16::try_from(self.u32("consumer's channel")?).map_err(|_| "a channel over 65535".to_owned())?;
        let tag =
            String::from_utf8(self.bytes("consumer tag")?.to_vec()).map_err(|_| "a tag not in UTF-8".to_owned())?;
        Ok(QuorumConsumer { node, incarnation, connection, channel, tag })
    }
    fn ids(&mut self) -> Result<Vec<u64>, String> {
        let count = self.u32("ids")? as usize;
        if count > IDS_PER_COMMAND_MAX || count.saturating_mul(8) > self.0.len() {
            return Err(format!("a command names {count} ids, more than it holds or than allowed"));
        }
        (0..count).map(|_| self.u64("id")).collect()
    }
}

/// The message bytes a command carries.
pub(super) fn payload_len(command: &QuorumCommand) -> usize {
    match command {
        QuorumCommand::Enqueue { payload, .. } | QuorumCommand::EnqueueKeyed { payload, .. } => payload.len(),
        _ => 0,
    }
}

/// A batch of commands as one entry, written into a buffer sized for their payloads at once
/// (an entry of a busy queue is up to a MiB; growing into it copied it several times).
pub(crate) fn encode_commands<'a, I>(commands: I) -> Vec<u8>
where
    I: IntoIterator<Item = &'a QuorumCommand>,
    I::IntoIter: ExactSizeIterator + Clone,
{
    let commands = commands.into_iter();
    let payload_bytes: usize = commands.clone().map(payload_len).sum();
    let mut writer = Writer(Vec::with_capacity(4 + payload_bytes + 64 * commands.len()));
    writer.u32(commands.len() as u32);
    for command in commands {
        match command {
            QuorumCommand::Enqueue { payload, expires_at_ms, order_key } => {
                writer.u8(if order_key.is_some() { ENQUEUE_ORDERED } else { ENQUEUE });
                writer.u64(expires_at_ms.map_or(0, |at| at.saturating_add(1)));
                writer.bytes(payload);
                if let Some(order_key) = order_key {
                    writer.bytes(order_key);
                }
            }
            QuorumCommand::EnqueueKeyed { payload, expires_at_ms, key, now_ms, order_key } => {
                writer.u8(if order_key.is_some() { ENQUEUE_KEYED_ORDERED } else { ENQUEUE_KEYED });
                writer.u64(expires_at_ms.map_or(0, |at| at.saturating_add(1)));
                writer.u64(*now_ms);
                writer.bytes(key);
                writer.bytes(payload);
                if let Some(order_key) = order_key {
                    writer.bytes(order_key);
                }
            }
            QuorumCommand::Checkout { consumer, prefetch } => {
                writer.u8(CHECKOUT);
                writer.consumer(consumer);
                writer.u32(*prefetch);
            }
            QuorumCommand::Dequeue { consumer, settle } => {
                writer.u8(DEQUEUE);
                writer.consumer(consumer);
                writer.u8(u8::from(*settle));
            }
            QuorumCommand::Cancel { consumer } => {
                writer.u8(CANCEL);
                writer.consumer(consumer);
            }
            QuorumCommand::Down { consumer } => {
                writer.u8(DOWN);
                writer.consumer(consumer);
            }
            QuorumCommand::Settle { consumer, ids }
            | QuorumCommand::Return { consumer, ids }
            | QuorumCommand::Discard { consumer, ids } => {
                writer.u8(match command {
                    QuorumCommand::Settle { .. } => SETTLE,
                    QuorumCommand::Return { .. } => RETURN,
                    _ => DISCARD,
                });
                writer.consumer(consumer);
                writer.ids(ids);
            }
            QuorumCommand::NodeDown { node } => {
                writer.u8(NODE_DOWN);
                writer.u64(*node);
            }
            QuorumCommand::NodeRestarted { node, incarnation } => {
                writer.u8(NODE_RESTARTED);
                writer.u64(*node);
                writer.u32(*incarnation);
            }
            QuorumCommand::Tick { now_ms } => {
                writer.u8(TICK);
                writer.u64(*now_ms);
            }
            QuorumCommand::Purge => writer.u8(PURGE),
        }
    }
    writer.0
}

/// The commands of an entry.
pub(crate) fn decode_commands(bytes: &[u8]) -> Result<Vec<QuorumCommand>, String> {
    let mut reader = Reader(bytes);
    let count = reader.u32("command count")? as usize;
    // Every command takes at least its tag byte.
    if count > reader.0.len() {
        return Err(format!("an entry claims {count} commands in {} bytes", reader.0.len()));
    }
    let mut commands = Vec::with_capacity(count);
    for _ in 0..count {
        let command = match reader.u8("command tag")? {
            tag @ (ENQUEUE | ENQUEUE_ORDERED) => {
                let expires = reader.u64("expiry")?;
                let payload = Arc::from(reader.bytes("payload")?);
                let order_key =
                    if tag == ENQUEUE_ORDERED { Some(Arc::from(reader.bytes("ordering key")?)) } else { None };
                QuorumCommand::Enqueue { payload, expires_at_ms: expires.checked_sub(1), order_key }
            }
            tag @ (ENQUEUE_KEYED | ENQUEUE_KEYED_ORDERED) => {
                let expires = reader.u64("expiry")?;
                let now_ms = reader.u64("time")?;
                let key = Arc::from(reader.bytes("key")?);
                let payload = Arc::from(reader.bytes("payload")?);
                let order_key =
                    if tag == ENQUEUE_KEYED_ORDERED { Some(Arc::from(reader.bytes("ordering key")?)) } else { None };
                QuorumCommand::EnqueueKeyed { payload, expires_at_ms: expires.checked_sub(1), key, now_ms, order_key }
            }
            CHECKOUT => QuorumCommand::Checkout { consumer: reader.consumer()?, prefetch: reader.u32("prefetch")? },
            DEQUEUE => QuorumCommand::Dequeue { consumer: reader.consumer()?, settle: reader.u8("settle")? != 0 },
            CANCEL => QuorumCommand::Cancel { consumer: reader.consumer()? },
            DOWN => QuorumCommand::Down { consumer: reader.consumer()? },
            SETTLE => QuorumCommand::Settle { consumer: reader.consumer()?, ids: reader.ids()? },
            RETURN => QuorumCommand::Return { consumer: reader.consumer()?, ids: reader.ids()? },
            DISCARD => QuorumCommand::Discard { consumer: reader.consumer()?, ids: reader.ids()? },
            NODE_DOWN => QuorumCommand::NodeDown { node: reader.u64("node")? },
            NODE_RESTARTED => {
                QuorumCommand::NodeRestarted { node: reader.u64("node")?, incarnation: reader.u32("incarnation")? }
            }
            TICK => QuorumCommand::Tick { now_ms: reader.u64("time")? },
            PURGE => QuorumCommand::Purge,
            other => return Err(format!("unknown quorum queue command {other}")),
        };
        commands.push(command);
    }
    if !reader.0.is_empty() {
        return Err(format!("{} bytes after an entry's last command", reader.0.len()));
    }
    Ok(commands)
}

pub(crate) fn encode_answers(answers: &[QuorumAnswer]) -> Vec<u8> {
    let mut writer = Writer(Vec::with_capacity(4 + answers.len() * 9));
    writer.u32(answers.len() as u32);
    for answer in answers {
        match answer {
            QuorumAnswer::Done { id: None } => writer.u8(ANSWER_DONE),
            QuorumAnswer::Done { id: Some(id) } => {
                writer.u8(ANSWER_DONE_WITH_ID);
                writer.u64(*id);
            }
            QuorumAnswer::Rejected => writer.u8(ANSWER_REJECTED),
            QuorumAnswer::Duplicate => writer.u8(ANSWER_DUPLICATE),
            QuorumAnswer::Empty => writer.u8(ANSWER_EMPTY),
            QuorumAnswer::Dequeued { id, payload, delivery_count, redelivered, remaining } => {
                writer.u8(ANSWER_DEQUEUED);
                writer.u64(*id);
                writer.u32(*delivery_count);
                writer.u8(u8::from(*redelivered));
                writer.u64(*remaining);
                writer.bytes(payload);
            }
            QuorumAnswer::Removed { count } => {
                writer.u8(ANSWER_REMOVED);
                writer.u64(*count);
            }
        }
    }
    writer.0
}

pub(crate) fn decode_answers(bytes: &[u8]) -> Result<Vec<QuorumAnswer>, String> {
    let mut reader = Reader(bytes);
    let count = reader.u32("answer count")? as usize;
    if count > reader.0.len() {
        return Err(format!("{count} answers in {} bytes", reader.0.len()));
    }
    (0..count)
        .map(|_| match reader.u8("answer")? {
            ANSWER_DONE => Ok(QuorumAnswer::Done { id: None }),
            ANSWER_DONE_WITH_ID => Ok(QuorumAnswer::Done { id: Some(reader.u64("id")?) }),
            ANSWER_REJECTED => Ok(QuorumAnswer::Rejected),
            ANSWER_DUPLICATE => Ok(QuorumAnswer::Duplicate),
            ANSWER_EMPTY => Ok(QuorumAnswer::Empty),
            ANSWER_DEQUEUED => Ok(QuorumAnswer::Dequeued {
                id: reader.u64("id")?,
                delivery_count: reader.u32("delivery count")?,
                redelivered: reader.u8("redelivered")? != 0,
                remaining: reader.u64("remaining")?,
                payload: Arc::from(reader.bytes("payload")?),
            }),
            ANSWER_REMOVED => Ok(QuorumAnswer::Removed { count: reader.u64("count")? }),
            other => Err(format!("unknown answer {other}")),
        })
        .collect()
}

/// A message as an enqueue carries it: its stored meta (`persist.rs`), then its body.
pub(crate) fn encode_payload(meta: &[u8], body: &[u8]) -> Arc<[u8]> {
    let mut payload = Vec::with_capacity(4 + meta.len() + body.len());
    payload.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    payload.extend_from_slice(meta);
    payload.extend_from_slice(body);
    Arc::from(payload)
}

/// The (meta, body) of a payload.
pub(crate) fn split_payload(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let length = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?) as usize;
    let rest = payload.get(4..)?;
    (length <= rest.len()).then(|| rest.split_at(length))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn every_command_and_answer_reads_back_as_written_and_damage_is_refused() {
        let consumer = QuorumConsumer { node: 2, incarnation: 9, connection: 77, channel: 3, tag: "ctag".into() };
        let commands = vec![
            QuorumCommand::Enqueue {
                payload: encode_payload(b"meta", b"body"),
                expires_at_ms: Some(0),
                order_key: None,
            },
            QuorumCommand::Enqueue { payload: Arc::from(&b""[..]), expires_at_ms: None, order_key: None },
            QuorumCommand::Enqueue {
                payload: Arc::from(&b"x"[..]),
                expires_at_ms: None,
                order_key: Some(Arc::from(&b"customer-7"[..])),
            },
            QuorumCommand::EnqueueKeyed {
                payload: encode_payload(b"meta", b"body"),
                expires_at_ms: Some(5),
                key: Arc::from(&b"order-1"[..]),
                now_ms: 42,
                order_key: None,
            },
            QuorumCommand::EnqueueKeyed {
                payload: Arc::from(&b"y"[..]),
                expires_at_ms: None,
                key: Arc::from(&b"order-2"[..]),
                now_ms: 43,
                order_key: Some(Arc::from(&b""[..])),
            },
            QuorumCommand::Checkout { consumer: consumer.clone(), prefetch: 10 },
            QuorumCommand::Dequeue { consumer: consumer.clone(), settle: true },
            QuorumCommand::Cancel { consumer: consumer.clone() },
            QuorumCommand::Down { consumer: consumer.clone() },
            QuorumCommand::Settle { consumer: consumer.clone(), ids: vec![1, 2] },
            QuorumCommand::Return { consumer: consumer.clone(), ids: vec![3] },
            QuorumCommand::Discard { consumer, ids: vec![] },
            QuorumCommand::NodeDown { node: 3 },
            QuorumCommand::NodeRestarted { node: 1, incarnation: 5 },
            QuorumCommand::Tick { now_ms: 123 },
            QuorumCommand::Purge,
        ];
        let bytes = encode_commands(&commands);
        assert_eq!(decode_commands(&bytes).unwrap(), commands);
        for cut in 0..bytes.len() {
            assert!(decode_commands(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let answers = vec![
            QuorumAnswer::Done { id: None },
            QuorumAnswer::Done { id: Some(4) },
            QuorumAnswer::Rejected,
            QuorumAnswer::Duplicate,
            QuorumAnswer::Empty,
            QuorumAnswer::Dequeued {
                id: 9,
                payload: encode_payload(b"m", b"b"),
                delivery_count: 2,
                redelivered: true,
                remaining: 3,
            },
            QuorumAnswer::Removed { count: 2 },
        ];
        assert_eq!(decode_answers(&encode_answers(&answers)).unwrap(), answers);
        assert!(decode_commands(&[0, 0, 0, 1, 99]).is_err());
        assert!(decode_commands(&[255, 255, 255, 255]).is_err());
        let payload = encode_payload(b"m", b"xyz");
        assert_eq!(split_payload(&payload), Some((&b"m"[..], &b"xyz"[..])));
        assert_eq!(split_payload(&[0, 0, 0, 9, 1]), None);
    }
}
