//! The channels of one connection: every channel-level method, message assembly from content
//! frames, publishing through the store, publisher confirms, and transactions.
//!
//! Publisher confirms: each publish on a confirm-mode channel gets the next tag and the store
//! tickets of its durable copies; a per-channel task awaits the tickets in order and only then
//! sends `basic.ack` (or `basic.nack` if the store failed). So a confirm always means every
//! persistent copy in a durable queue was `fdatasync`ed. `tx.commit` likewise answers only once
//! the transaction's appends are synced and its acknowledgements made durable (`Store::sync`).

mod basic;
mod content;
mod declare;
mod tx;

use crate::access::{Resource, Right, VhostGrant};
use crate::alarms::SessionMemory;
use crate::confirms::{Confirms, close_confirms};
use crate::core::Core;
use crate::limits::ConnectionLease;
use crate::outbound::{Outbound, Outbox};
use crate::outbound::{method_frame, truncate};
use content::Content;
use std::collections::HashMap;
use std::sync::Arc;
use tx::TxOp;
use wharf_model::{ChannelKey, ConnectionId, ExchangeKind, ModelError, Scope};
use wharf_wire::Frame;
use wharf_wire::methods::MethodId;
use wharf_wire::protocol::{AMQPClass, access, channel, confirm};
use wharf_wire::reply_code;

#[derive(Default)]
struct ChannelState {
    /// `channel.close` was sent; frames are dropped until `close-ok`.
    closing: bool,
    content: Option<Content>,
    confirms: Option<Confirms>,
    tx: Option<Vec<TxOp>>,
    /// For methods that name the queue `""`: the last queue declared on this channel.
    last_queue: String,
    /// Body bytes of the publishes in `tx` (for the memory alarm).
    tx_bytes: u64,
    /// The last exchange a publish on this channel was allowed to write to (and that has no
    /// topic permissions): the next publish to it needs no check (RabbitMQ caches likewise).
    write_allowed: Option<String>,
}

impl ChannelState {
    /// Message bytes this channel holds: an unfinished body, and a transaction's publishes.
    fn held_bytes(&self) -> u64 {
        let unfinished = match &self.content {
            Some(Content::Body { received, .. }) => *received,
            _ => 0,
        };
        unfinished + self.tx_bytes
    }
}

/// All channels of a connection.
pub(crate) struct Session {
    core: Arc<Core>,
    connection: ConnectionId,
    /// What the user may do in the vhost (checked before every method, as RabbitMQ does).
    grant: Arc<VhostGrant>,
    /// Counts this connection and its channels against the vhost's and user's limits.
    lease: ConnectionLease,
    /// This connection's unfinished bodies and transaction buffers in the memory alarm's account.
    memory: SessionMemory,
    /// The user has RabbitMQ's `impersonator` tag: it may publish with any `user_id` property.
    impersonator: bool,
    /// A `basic.publish` arrived since the connection last asked (a connection that publishes
    /// while an alarm is raised is blocked).
    published: bool,
    vhost: String,
    channel_max: u16,
    outbound: Outbox,
    channels: HashMap<u16, ChannelState>,
    /// Given to every message it publishes, for delivery traces (`None` when they are off).
    origin: Option<Arc<wharf_model::trace::Provenance>>,
}

pub(super) type MethodResult = Result<(), ModelError>;

pub(super) fn connection_error(code: u16, label: &str, text: impl std::fmt::Display) -> ModelError {
    ModelError { code, text: format!("{label} - {text}"), scope: Scope::Connection }
}

/// Runs blocking storage work (definitions, queue logs) without stalling the runtime's other tasks.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        core: Arc<Core>,
        connection: ConnectionId,
        grant: Arc<VhostGrant>,
        lease: ConnectionLease,
        vhost: String,
        channel_max: u16,
        outbound: Outbox,
        origin: Option<Arc<wharf_model::trace::Provenance>>,
    ) -> Self {
        let memory = core.alarms.session_memory();
        // The users as they are now (the management API may have changed them).
        let impersonator =
            core.access.user(grant.user()).is_some_and(|user| user.tags.iter().any(|tag| tag == "impersonator"));
        Session {
            impersonator,
            core,
            connection,
            grant,
            lease,
            memory,
            published: false,
            vhost,
            channel_max,
            outbound,
            channels: HashMap::new(),
            origin,
        }
    }

    /// Allows `right` on a resource of this vhost, or refuses with 403 (see `access.rs`).
    fn allow(&self, right: Right, resource: Resource, name: &str) -> MethodResult {
        self.grant.check(right, resource, name)
    }

    /// Allows `right` with `routing_key` if `exchange` is a topic exchange the user has topic
    /// permissions on; any other exchange needs no topic check.
    fn allow_topic(&self, right: Right, exchange: &str, routing_key: &str) -> MethodResult {
        if !self.grant.has_topic_rules(exchange) {
            return Ok(());
        }
        let is_topic = {
            let model = self.core.lock_model();
            let found = model.vhost(&self.vhost).and_then(|vhost| vhost.exchange(exchange));
            found.is_some_and(|found| found.kind == ExchangeKind::Topic)
        };
        if is_topic { self.grant.check_topic(right, exchange, routing_key) } else { Ok(()) }
    }

    /// The connection these channels belong to.
    pub fn connection(&self) -> ConnectionId {
        self.connection
    }

    fn key(&self, channel: u16) -> ChannelKey {
        ChannelKey { connection: self.connection, channel }
    }

    fn send(&self, channel: u16, method: AMQPClass) {
        let _ = self.outbound.send(Outbound::Frames(method_frame(channel, &method)));
    }

    /// Closes every channel (connection gone): unacked messages go back to their queues,
    /// exclusive queues are deleted.
    pub fn close_all(&mut self) {
        for state in self.channels.values() {
            if let Some(confirms) = &state.confirms {
                close_confirms(&confirms.closed);
            }
        }
        self.channels.clear();
        let connection = self.connection;
        let _ = blocking(|| self.core.act(|model| Ok(((), model.close_connection(connection)))));
    }

    /// Handles one frame after the handshake.
    pub async fn handle(&mut self, frame: Frame) -> Result<(), Stop> {
        let outcome = match frame {
            Frame::Heartbeat => Ok(()),
            Frame::Method { channel: 0, method } => self.connection_method(*method),
            Frame::Method { channel, method } => self.channel_method(channel, *method).await,
            Frame::Header { channel, header } => self.content_header(channel, header),
            Frame::Body { channel, payload } => self.content_body(channel, payload).await,
        };
        // Channels closed by this frame stop counting against the user's limit, and what the
        // channels hold is counted for the memory alarm.
        self.lease.set_channels(self.channels.len());
        let held_bytes = self.channels.values().map(ChannelState::held_bytes).sum();
        self.memory.set(held_bytes);
        outcome
    }

    /// Takes this connection's holdings out of the memory account (while it is blocked: see
    /// `connection.rs`); its next frame counts them again.
    pub fn leave_memory_account(&mut self) {
        self.memory.set(0);
    }

    /// Whether a `basic.publish` arrived since the last call.
    pub fn take_published(&mut self) -> bool {
        std::mem::take(&mut self.published)
    }

    fn connection_method(&mut self, method: AMQPClass) -> Result<(), Stop> {
        use wharf_wire::protocol::connection::AMQPMethod as Connection;
        let cause = MethodId::of(&method);
        match method {
            AMQPClass::Connection(Connection::Close(close)) => {
                tracing::debug!(code = close.reply_code, text = %close.reply_text, "client closes the connection");
                Err(Stop::ClientClosed)
            }
            AMQPClass::Connection(Connection::CloseOk(_) | Connection::Blocked(_) | Connection::Unblocked(_)) => Ok(()),
            AMQPClass::Connection(Connection::UpdateSecret(update)) => {
                // Clients send this to refresh an expiring token (OAuth 2). With passwords there is
                // nothing that expires: RabbitMQ's internal backend accepts any new secret without
                // checking it, keeps the user and its permissions, and answers update-secret-ok,
                // so clients that refresh on a timer keep working. Wharf does the same.
                tracing::debug!(reason = %update.reason, "connection.update-secret accepted");
                self.send(0, AMQPClass::Connection(Connection::UpdateSecretOk(Default::default())));
                Ok(())
            }
            _ => Err(Stop::Error {
                error: connection_error(
                    reply_code::CHANNEL_ERROR,
                    "CHANNEL_ERROR",
                    "only connection methods are allowed on channel 0",
                ),
                cause,
            }),
        }
    }

    /// Closes one channel with an error: `channel.close` to the client, its unacked messages back
    /// to their queues, and everything on it ignored until `close-ok`.
    fn channel_error(&mut self, channel: u16, error: &ModelError, cause: MethodId) {
        tracing::debug!(channel, %error, "channel error");
        // Close it in the model first, so no delivery or confirm can follow the channel.close.
        if let Some(state) = self.channels.get_mut(&channel) {
            state.closing = true;
            state.content = None;
            state.tx = None;
            state.tx_bytes = 0;
            if let Some(confirms) = state.confirms.take() {
                close_confirms(&confirms.closed);
            }
        }
        let key = self.key(channel);
        let mut model = self.core.lock_model();
        let mut effects = model.close_channel(key);
        self.core.send(&mut effects);
        drop(model);
        self.send(
            channel,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: error.code,
                reply_text: truncate(&error.text).into(),
                class_id: cause.class_id,
                method_id: cause.method_id,
            })),
        );
        blocking(|| self.core.apply(effects));
    }

    fn fail(&mut self, channel: u16, error: ModelError, cause: MethodId) -> Result<(), Stop> {
        match error.scope {
            Scope::Channel => {
                self.channel_error(channel, &error, cause);
                Ok(())
            }
            Scope::Connection => Err(Stop::Error { error, cause }),
        }
    }

    async fn channel_method(&mut self, channel: u16, method: AMQPClass) -> Result<(), Stop> {
        let cause = MethodId::of(&method);
        let Some(state) = self.channels.get_mut(&channel) else {
            if let AMQPClass::Channel(channel::AMQPMethod::Open(_)) = method {
                return self.open_channel(channel).map_err(|error| Stop::Error { error, cause });
            }
            let error = connection_error(
                reply_code::CHANNEL_ERROR,
                "CHANNEL_ERROR",
                format!("expected 'channel.open' on channel {channel}"),
            );
            return Err(Stop::Error { error, cause });
        };
        if state.closing {
            // The server closed the channel: everything is dropped until the client's close-ok.
            // If the client closed it too (the two closes crossed), its close is answered and
            // the channel stays reserved until that close-ok all the same, as in RabbitMQ; a
            // channel.open on it before then is 504 "second 'channel.open' seen".
            match method {
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                    self.channels.remove(&channel);
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                    self.send(channel, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})));
                }
                AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                    let error =
                        connection_error(reply_code::CHANNEL_ERROR, "CHANNEL_ERROR", "second 'channel.open' seen");
                    return Err(Stop::Error { error, cause });
                }
                _ => {}
            }
            return Ok(());
        }
        if state.content.is_some() {
            let error = connection_error(
                reply_code::UNEXPECTED_FRAME,
                "UNEXPECTED_FRAME",
                format!("expected content header or body on channel {channel}, got a method"),
            );
            return Err(Stop::Error { error, cause });
        }
        let outcome = match method {
            AMQPClass::Channel(method) => self.channel_class(channel, method),
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                self.send(channel, AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})));
                Ok(())
            }
            AMQPClass::Exchange(method) => blocking(|| self.exchange_class(channel, method)),
            AMQPClass::Queue(method) => blocking(|| self.queue_class(channel, method)),
            AMQPClass::Basic(method) => self.basic_class(channel, method).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => self.confirm_select(channel, select),
            AMQPClass::Tx(method) => self.tx_class(channel, method).await,
            _ => Err(ModelError::command_invalid(format!("method {cause} is not valid from a client"))),
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(error) => self.fail(channel, error, cause),
        }
    }

    fn open_channel(&mut self, channel: u16) -> MethodResult {
        // Like RabbitMQ, channel_max bounds how many channels are open at once, not their numbers:
        // clients that number channels from a counter (and never reuse one) keep working.
        if self.channel_max != 0 && self.channels.len() >= usize::from(self.channel_max) {
            return Err(ModelError::not_allowed(format!(
                "number of channels opened ({}) has reached the negotiated channel_max ({})",
                self.channels.len(),
                self.channel_max
            )));
        }
        self.lease.admit_channel(self.channels.len())?;
        self.core.lock_model().open_channel(self.key(channel), &self.vhost)?;
        crate::core::Churn::count(&self.core.churn.channels_opened, 1);
        self.channels.insert(channel, ChannelState::default());
        self.send(channel, AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})));
        Ok(())
    }

    fn channel_class(&mut self, channel: u16, method: channel::AMQPMethod) -> MethodResult {
        match method {
            channel::AMQPMethod::Open(_) => Err(connection_error(
                reply_code::CHANNEL_ERROR,
                "CHANNEL_ERROR",
                format!("channel {channel} is already open"),
            )),
            channel::AMQPMethod::Close(_) => {
                if let Some(state) = self.channels.remove(&channel)
                    && let Some(confirms) = state.confirms
                {
                    close_confirms(&confirms.closed);
                }
                let key = self.key(channel);
                let _ = blocking(|| self.core.act(|model| Ok(((), model.close_channel(key)))));
                self.send(channel, AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})));
                Ok(())
            }
            // RabbitMQ: a close-ok for a channel the server did not close is a hard error.
            channel::AMQPMethod::CloseOk(_) => {
                Err(connection_error(reply_code::COMMAND_INVALID, "COMMAND_INVALID", "unimplemented method"))
            }
            channel::AMQPMethod::Flow(flow) if flow.active => {
                self.send(channel, AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk { active: true })));
                Ok(())
            }
            channel::AMQPMethod::Flow(_) => Err(ModelError::not_implemented("channel.flow with active=false")),
            _ => Err(ModelError::command_invalid("this channel method is not valid from a client")),
        }
    }

    fn queue_name(&self, channel: u16, name: &str) -> String {
        if name.is_empty() {
            self.channels.get(&channel).map(|state| state.last_queue.clone()).unwrap_or_default()
        } else {
            name.to_owned()
        }
    }
}

pub(super) fn missing_vhost() -> ModelError {
    ModelError::not_allowed("vhost no longer exists")
}

/// Why the session stopped the connection.
#[derive(Debug)]
pub(crate) enum Stop {
    /// `connection.close` from the client.
    ClientClosed,
    /// A connection-level error, and the method that caused it.
    Error { error: ModelError, cause: MethodId },
}
