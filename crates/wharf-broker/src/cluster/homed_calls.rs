//! `basic.get`, `queue.purge`, `queue.delete` and the counts of `queue.declare-ok` on a queue
//! homed on another node (`homed.rs`): each is a call to the home, answered by the home's own
//! code, or `404` when the home cannot be reached (RabbitMQ's answer while a classic queue's
//! node is down). A get's message stays with the home's proxy of the channel until the channel
//! settles it (a settle op, `homed_link.rs`), as a consumer's does.

use super::homed::home_down;
use super::homed_link::{CALL_COUNTS, CALL_DELETE, CALL_GET, CALL_PURGE, SERVICE_HOMED};
use super::quorum_codec::{Reader, Writer};
use super::{MetaCommand, QuorumGet};
use crate::core::Core;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use wharf_cluster::NodeId;
use wharf_model::{ChannelKey, ModelError, ReplicatedGet};

/// How long a call to a queue's home may take before the queue counts as unreachable (a
/// delete waits for the metadata group's commit on the home, so this is the group's bound).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

const ANSWER_OK: u8 = 0;
const ANSWER_ERROR: u8 = 1;

fn text(reader: &mut Reader<'_>, what: &str) -> Result<String, String> {
    String::from_utf8(reader.bytes(what)?.to_vec()).map_err(|_| format!("a {what} not in UTF-8"))
}

fn error_answer(error: &ModelError) -> Bytes {
    let mut writer = Writer(Vec::with_capacity(8 + error.text.len()));
    writer.u8(ANSWER_ERROR);
    writer.u32(u32::from(error.code));
    writer.bytes(error.text.as_bytes());
    Bytes::from(writer.0)
}

impl Core {
    /// Calls `home` about queue `name` (blocking); the answer's body after its status, or the
    /// home's error as it gave it, or 404 when the home cannot be reached.
    fn call_home(&self, home: NodeId, vhost: &str, name: &str, payload: Vec<u8>) -> Result<Vec<u8>, ModelError> {
        let Some((transport, _)) = self.cluster_links.get() else { return Err(home_down(vhost, name, home)) };
        let handle = tokio::runtime::Handle::current();
        let call = transport.call_within(home, SERVICE_HOMED, Bytes::from(payload), CALL_TIMEOUT);
        let reply = crate::core::blocking(|| handle.block_on(call)).map_err(|error| {
            tracing::debug!(%error, home, queue = name, "the home of a queue did not answer");
            home_down(vhost, name, home)
        })?;
        let mut reader = Reader(&reply);
        let unreadable =
            |error: String| super::command::internal(format!("an unreadable answer from node {home}: {error}"));
        match reader.u8("status").map_err(unreadable)? {
            ANSWER_OK => Ok(reader.0.to_vec()),
            _ => {
                let code = reader.u32("code").map_err(unreadable)?;
                let text = text(&mut reader, "text").map_err(unreadable)?;
                Err(ModelError { code: u16::try_from(code).unwrap_or(541), text, scope: wharf_model::Scope::Channel })
            }
        }
    }

    fn queue_call(&self, kind: u8, vhost: &str, name: &str) -> Writer {
        let mut writer = Writer(Vec::with_capacity(32 + vhost.len() + name.len()));
        writer.u8(kind);
        writer.u32(self.incarnation);
        writer.bytes(vhost.as_bytes());
        writer.bytes(name.as_bytes());
        writer
    }

    /// `basic.get` for channel `key` of a queue homed on `home`.
    pub(crate) fn get_from_home(
        &self,
        home: NodeId,
        key: ChannelKey,
        vhost: &str,
        queue: &str,
        no_ack: bool,
    ) -> Result<QuorumGet, ModelError> {
        // The channel's close tells the home even if this get's answer never comes (the home
        // may hold the message for the channel).
        self.lock_model().touch_replicated(key, queue);
        self.after_stream(home, vhost, queue)?;
        let mut call = self.queue_call(CALL_GET, vhost, queue);
        call.u64(key.connection.0);
        call.u32(u32::from(key.channel));
        call.u8(u8::from(no_ack));
        let answer = self.call_home(home, vhost, queue, call.0)?;
        let unreadable =
            |error: String| super::command::internal(format!("an unreadable get-ok from node {home}: {error}"));
        let mut reader = Reader(&answer);
        if reader.u8("found").map_err(unreadable)? == 0 {
            return Ok(QuorumGet::Empty);
        }
        let id = reader.u64("id").map_err(unreadable)?;
        let delivery_count = reader.u32("delivery count").map_err(unreadable)?;
        let redelivered = reader.u8("redelivered").map_err(unreadable)? == 1;
        let remaining = reader.u32("remaining").map_err(unreadable)?;
        let meta = reader.bytes("meta").map_err(unreadable)?;
        let body = reader.bytes("body").map_err(unreadable)?;
        let Some(message) = crate::persist::decode_message(meta, Bytes::copy_from_slice(body)) else {
            self.give_back_get(key, vhost, queue, id, no_ack);
            return Err(super::command::internal(format!("a message of queue '{queue}' is unreadable")));
        };
        Ok(QuorumGet::Message(ReplicatedGet {
            channel: key,
            queue: queue.to_owned(),
            id,
            message: Arc::new(message),
            delivery_count,
            redelivered,
            no_ack,
            remaining,
        }))
    }

    /// Waits until everything this node sent `home` before now is carried out there: a get,
    /// purge or delete is a direct call, which would otherwise overtake what this node's
    /// channels did before it (publishes, a close and reopen of a channel number, a cancel).
    fn after_stream(&self, home: NodeId, vhost: &str, queue: &str) -> Result<(), ModelError> {
        let barrier = self.barrier_to_home(home);
        let handle = tokio::runtime::Handle::current();
        let passed = crate::core::blocking(|| handle.block_on(tokio::time::timeout(CALL_TIMEOUT, barrier)));
        if matches!(passed, Ok(Ok(Ok(_)))) { Ok(()) } else { Err(home_down(vhost, queue, home)) }
    }

    /// `queue.purge` of a queue homed on `home`: how many messages it removed.
    pub(crate) fn purge_at_home(&self, home: NodeId, vhost: &str, queue: &str) -> Result<u32, ModelError> {
        self.after_stream(home, vhost, queue)?;
        let call = self.queue_call(CALL_PURGE, vhost, queue);
        let answer = self.call_home(home, vhost, queue, call.0)?;
        Reader(&answer).u32("count").map_err(super::command::internal)
    }

    /// `queue.delete` of a queue homed on `home`: checked there, deleted on every node.
    pub(crate) fn delete_at_home(
        &self,
        home: NodeId,
        vhost: &str,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, ModelError> {
        self.after_stream(home, vhost, queue)?;
        let mut call = self.queue_call(CALL_DELETE, vhost, queue);
        call.u8(u8::from(if_unused));
        call.u8(u8::from(if_empty));
        let answer = self.call_home(home, vhost, queue, call.0)?;
        Reader(&answer).u32("count").map_err(super::command::internal)
    }

    /// A queue homed on `home`: (ready messages, consumers), for `queue.declare-ok`.
    pub(crate) fn counts_at_home(&self, home: NodeId, vhost: &str, queue: &str) -> Result<(u32, u32), ModelError> {
        let call = self.queue_call(CALL_COUNTS, vhost, queue);
        let answer = self.call_home(home, vhost, queue, call.0)?;
        let mut reader = Reader(&answer);
        let ready = reader.u32("ready").map_err(super::command::internal)?;
        let consumers = reader.u32("consumers").map_err(super::command::internal)?;
        Ok((ready, consumers))
    }

    /// On the home: a get, purge, delete or count call from node `from`.
    pub(super) async fn handle_queue_call(
        self: &Arc<Core>,
        from: NodeId,
        kind: u8,
        mut reader: Reader<'_>,
    ) -> Result<Bytes, String> {
        let incarnation = reader.u32("incarnation")?;
        let vhost = text(&mut reader, "vhost")?;
        let queue = text(&mut reader, "queue")?;
        let local = crate::core::blocking(|| {
            let model = self.lock_model();
            model.vhost(&vhost).and_then(|found| found.queue(&queue)).map(|found| !found.replicated)
        });
        if local != Some(true) {
            return Ok(error_answer(&ModelError::not_found(format!("no queue '{queue}' in vhost '{vhost}'"))));
        }
        let mut writer = Writer(Vec::with_capacity(64));
        writer.u8(ANSWER_OK);
        let outcome = match kind {
            CALL_GET => {
                let connection = reader.u64("connection")?;
                let channel = u16::try_from(reader.u32("channel")?).map_err(|_| "a channel over 65535".to_owned())?;
                let no_ack = reader.u8("no-ack")? == 1;
                self.get_here_for(from, incarnation, connection, channel, &vhost, &queue, no_ack, &mut writer).await
            }
            CALL_PURGE => {
                crate::core::blocking(|| self.on_scratch_channel(&vhost, |model, key| model.purge(key, &queue)))
                    .map(|count| writer.u32(count))
            }
            CALL_DELETE => {
                let if_unused = reader.u8("if-unused")? == 1;
                let if_empty = reader.u8("if-empty")? == 1;
                crate::core::blocking(|| self.delete_homed_here_checked(&vhost, &queue, if_unused, if_empty))
                    .map(|count| writer.u32(count))
            }
            CALL_COUNTS => {
                let (ready, consumers) = crate::core::blocking(|| {
                    let model = self.lock_model();
                    let found = model.vhost(&vhost).and_then(|found| found.queue(&queue));
                    found.map_or((0, 0), |found| (found.ready_count() as u32, found.consumer_count() as u32))
                });
                writer.u32(ready);
                writer.u32(consumers);
                Ok(())
            }
            other => return Err(format!("unknown homed-queue call {other}")),
        };
        Ok(match outcome {
            Ok(()) => Bytes::from(writer.0),
            Err(error) => error_answer(&error),
        })
    }

    /// On the home: `queue.delete` asked through another node, refused as RabbitMQ refuses it
    /// (in use, not empty), otherwise deleted on every node through the metadata group.
    fn delete_homed_here_checked(
        &self,
        vhost: &str,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, ModelError> {
        let ready = {
            let model = self.lock_model();
            let Some(found) = model.vhost(vhost).and_then(|found| found.queue(queue)) else { return Ok(0) };
            if if_unused && found.consumer_count() > 0 {
                return Err(ModelError::precondition_failed(format!("queue '{queue}' in vhost '{vhost}' in use")));
            }
            if if_empty && found.ready_count() > 0 {
                return Err(ModelError::precondition_failed(format!("queue '{queue}' in vhost '{vhost}' not empty")));
            }
            found.ready_count() as u32
        };
        let Some(group) = self.metadata_group() else { return Err(super::command::internal("no metadata group")) };
        let command = MetaCommand::DeleteHomedQueue { vhost: vhost.to_owned(), name: queue.to_owned() };
        match group.propose_blocking(command) {
            Ok(answer) => answer.into_model().map(|()| ready),
            Err(error) => Err(super::command::internal(error)),
        }
    }

    /// `queue.delete` of a homed queue asked on this node: its home checks and deletes it. `None`
    /// if it is not a homed queue.
    pub(crate) fn delete_homed_queue(
        &self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Option<Result<u32, ModelError>> {
        let home = self.homed.home_of(vhost, name)?;
        if Some(home) == self.cluster_node() {
            return Some(self.delete_homed_here_checked(vhost, name, if_unused, if_empty));
        }
        Some(self.delete_at_home(home, vhost, name, if_unused, if_empty))
    }

    /// On the home: a get for a remote channel, through its proxy channel.
    #[allow(clippy::too_many_arguments)]
    async fn get_here_for(
        self: &Arc<Core>,
        from: NodeId,
        incarnation: u32,
        connection: u64,
        channel: u16,
        vhost: &str,
        queue: &str,
        no_ack: bool,
        writer: &mut Writer,
    ) -> Result<(), ModelError> {
        let (delivery, effects) = crate::core::blocking(|| {
            let mut model = self.lock_model();
            let Some(key) = self.proxy_channel_for_get(&mut model, (from, incarnation, connection), channel, vhost)
            else {
                return Err(super::command::internal("the proxy of the channel could not be opened"));
            };
            let (delivery, mut effects) = model.get(key, queue, no_ack)?;
            // The answer goes back in the reply, not through the proxy's writer: counted as
            // written at once, or the proxy's pending bytes would only grow.
            if let Some(delivery) = &delivery {
                effects.merge(model.written(key.connection, wharf_model::broker::delivery_bytes(&delivery.message)));
            }
            self.send(&mut effects);
            Ok((delivery, effects))
        })?;
        self.apply(effects);
        let Some(delivery) = delivery else {
            writer.u8(0);
            return Ok(());
        };
        if let Some(recorded) = self.record_delivery(&delivery) {
            let _ = recorded.await;
        }
        let body = match crate::pager::delivery_body(&self.store, &self.fatal, &delivery) {
            crate::pager::DeliveryBody::Resident(bytes) => bytes,
            crate::pager::DeliveryBody::Paged(read) => crate::core::blocking(|| read.read()).map_err(|_| {
                super::command::internal(format!("a message of queue '{queue}' could not be read back"))
            })?,
        };
        writer.u8(1);
        writer.u64(delivery.delivery_tag);
        writer.u32(delivery.delivery_count);
        writer.u8(u8::from(delivery.redelivered));
        writer.u32(delivery.message_count);
        writer.bytes(&crate::persist::encode_message_meta(&delivery.message));
        writer.bytes(&body);
        Ok(())
    }
}
