//! One MQTT connection after its CONNECT was accepted: the packet loop (publishes, their
//! acknowledgements both ways, subscriptions, pings, the client's DISCONNECT), keep-alive, the
//! will, and what the session leaves behind when the connection ends.

use super::acks::PendingAck;
use super::subscriptions::{Recorded, SessionQueue};
use super::writer::{Flight, Granted};
use super::{Ending, convert};
use crate::access::{Resource, Right, VhostGrant};
use crate::core::{Core, blocking};
use crate::outbound::{Outbound, Outbox};
use crate::publish::{PublishRequest, Published, ReservationPool};
use bytes::BytesMut;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::mpsc;
use wharf_model::{ChannelKey, ModelError};
use wharf_mqtt::{
    Ack, Packet, Publish, QoS, RetainHandling, SubAck, Subscribe, UnsubAck, Unsubscribe, Version, Will, reason, topic,
};

/// Most topic aliases a client may set (announced in CONNACK; RabbitMQ's default).
pub(super) const TOPIC_ALIAS_MAXIMUM: u16 = 16;

/// The consumer tag of a session's consumer on its queue.
const CONSUMER_TAG: &str = "mqtt";

/// What the packet loop needs about its connection.
#[derive(Debug)]
pub(super) struct Session {
    pub core: Arc<Core>,
    pub version: Version,
    pub client_id: String,
    pub vhost: String,
    pub exchange: String,
    pub key: ChannelKey,
    pub grant: Arc<VhostGrant>,
    pub outbox: Outbox,
    pub flight: Arc<Flight>,
    pub acks: mpsc::Sender<PendingAck>,
    pub queue: String,
    pub expiry_s: u32,
    /// The session's subscriptions, by filter.
    pub subscriptions: HashMap<String, Recorded>,
    /// The session's consumer is on its queue.
    pub consuming: bool,
    /// The shared subscriptions it is a member of, by their `$share/…` text.
    pub shared: HashMap<String, super::shared::Shared>,
    /// QoS 2 publishes received (PUBREC sent or due) whose PUBREL has not come.
    pub incoming_qos_2: HashSet<u16>,
    /// The session's incarnation and the next QoS 2 publish's flow number, for the markers
    /// that let recovery record a publish a crash left unrecorded (`state.rs`).
    pub incarnation: u64,
    pub next_flow: u64,
    pub topic_aliases: HashMap<u16, String>,
    pub will: Option<Will>,
    pub origin: Option<Arc<wharf_model::trace::Provenance>>,
    /// The user may write to the MQTT exchange (checked once).
    pub write_allowed: bool,
    /// It published since the packet loop last looked (for the alarms).
    pub published: bool,
}

impl Session {
    pub fn queue(&self) -> SessionQueue<'_> {
        SessionQueue {
            core: &self.core,
            vhost: &self.vhost,
            exchange: &self.exchange,
            queue: self.queue.clone(),
            connection: self.key.connection,
            key: self.key,
            grant: &self.grant,
            expiry_s: self.expiry_s,
        }
    }

    /// Sends a packet that waits on nothing (SUBACK, UNSUBACK, PINGRESP, PUBREL, DISCONNECT).
    pub fn send(&self, packet: &Packet) {
        let mut buffer = BytesMut::new();
        wharf_mqtt::encode(packet, self.version, &mut buffer);
        let _ = self.outbox.send(Outbound::Frames(buffer.freeze()));
    }

    /// Queues an acknowledgement (PUBACK, PUBREC or PUBCOMP) behind those of earlier publishes.
    async fn acknowledge(
        &self,
        packet: Packet,
        durable: Vec<crate::confirms::Durable>,
        refused: bool,
    ) -> Result<(), Ending> {
        let pending = PendingAck::new(&packet, durable, refused)
            .ok_or_else(|| Ending::Closed("not an acknowledgement".into()))?;
        self.acks.send(pending).await.map_err(|_| Ending::Closed("the acknowledgement task stopped".into()))
    }

    /// Starts the session's consumer on its queue (once it has one).
    pub fn consume(&mut self) -> Result<(), ModelError> {
        if self.consuming {
            return Ok(());
        }
        let (key, queue) = (self.key, self.queue.clone());
        let core = Arc::clone(&self.core);
        blocking(|| {
            core.act(|model| {
                let (_, effects) = model.consume_with_priority(key, &queue, CONSUMER_TAG, false, false, 0)?;
                Ok(((), effects))
            })
        })?;
        self.consuming = true;
        Ok(())
    }

    /// Handles one packet from the client.
    pub async fn handle(&mut self, packet: Packet) -> Result<(), Ending> {
        match packet {
            Packet::Publish(publish) => self.publish(publish).await,
            Packet::PubAck(ack) => {
                self.settle(ack.packet_id, QoS::AtLeastOnce);
                Ok(())
            }
            Packet::PubRec(ack) => {
                // A refused PUBREC (5.0 reason ≥ 0x80) ends the flow: the message leaves its
                // queue and nothing is released.
                if ack.reason >= 0x80 {
                    self.settle(ack.packet_id, QoS::ExactlyOnce);
                    return Ok(());
                }
                let expected = self
                    .flight
                    .lock()
                    .in_flight
                    .get(&ack.packet_id)
                    .filter(|flight| flight.qos == QoS::ExactlyOnce)
                    .map(|flight| flight.stored);
                let code = if expected.is_some() { reason::SUCCESS } else { reason::PACKET_IDENTIFIER_NOT_FOUND };
                if let Some(stored) = expected {
                    // Recorded before the message leaves its queue: after a crash its PUBREL is
                    // sent again, never the message. The PUBREL waits until the removal is
                    // durable too, so from then on the message cannot come back.
                    self.flight.lock().released.insert(ack.packet_id, stored);
                    self.persist(true)?;
                    self.settle(ack.packet_id, QoS::ExactlyOnce);
                    if stored.is_some() {
                        self.sync_store().await?;
                        if let Some(position) = self.flight.lock().released.get_mut(&ack.packet_id) {
                            *position = None;
                        }
                    }
                }
                self.send(&Packet::PubRel(Ack::new(ack.packet_id, code)));
                Ok(())
            }
            Packet::PubComp(ack) => {
                let mut flight = self.flight.lock();
                // A delivery released before a crash may still come back (its removal was not
                // durable then): it stays recognisable after the flow ends (`state.rs`).
                if let Some(Some(position)) = flight.released.remove(&ack.packet_id) {
                    flight.skip.insert(position);
                }
                Ok(())
            }
            Packet::PubRel(ack) => {
                let code = if self.incoming_qos_2.remove(&ack.packet_id) {
                    // The id's end is durable before PUBCOMP lets the client reuse it: a stale
                    // id would take the client's next publish with it, sent again, as a repeat.
                    self.persist(true)?;
                    reason::SUCCESS
                } else {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                };
                let packet = Packet::PubComp(Ack::new(ack.packet_id, code));
                self.acknowledge(packet, Vec::new(), false).await
            }
            Packet::Subscribe(subscribe) => self.subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => self.unsubscribe(unsubscribe),
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(disconnect) => {
                // A normal disconnect discards the will; 0x04 asks for it to be sent anyway.
                if disconnect.reason != reason::DISCONNECT_WITH_WILL {
                    self.will = None;
                }
                // 5.0 may change the session's expiry here, but not from 0 (section 3.14.2.2.2).
                if let Some(expiry_s) = disconnect.properties.session_expiry_interval_s {
                    if self.expiry_s == 0 && expiry_s > 0 {
                        return Err(Ending::Protocol(
                            reason::PROTOCOL_ERROR,
                            "session expiry set at DISCONNECT after 0".into(),
                        ));
                    }
                    self.expiry_s = expiry_s.min(self.core.config.mqtt.session_expiry_max_s);
                }
                Err(Ending::ClientDisconnected)
            }
            Packet::Connect(_) => Err(Ending::Protocol(reason::PROTOCOL_ERROR, "a second CONNECT".into())),
            Packet::Auth(_) => Err(Ending::Protocol(
                reason::BAD_AUTHENTICATION_METHOD,
                "extended authentication is not supported".into(),
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(Ending::Protocol(reason::PROTOCOL_ERROR, "a packet only servers send".into()))
            }
        }
    }

    /// The client acknowledged the delivery with `packet_id` (PUBACK for QoS 1, PUBREC for QoS
    /// 2): the message leaves its queue. Returns whether it was in flight.
    fn settle(&self, packet_id: u16, expected: QoS) -> bool {
        let in_flight = {
            let mut state = self.flight.lock();
            match state.in_flight.get(&packet_id) {
                Some(flight) if flight.qos == expected => state.in_flight.remove(&packet_id),
                _ => None,
            }
        };
        let Some(in_flight) = in_flight else { return false };
        let key = self.key;
        let _ = self.core.act(|model| Ok(((), model.ack(key, in_flight.delivery_tag, false)?)));
        true
    }

    /// Acknowledges the deliveries the writer sent at QoS 0.
    pub fn settle_written_at_qos_0(&self) {
        let tags = std::mem::take(&mut self.flight.lock().written_at_qos_0);
        if tags.is_empty() {
            return;
        }
        let key = self.key;
        let _ = self.core.act(|model| {
            let mut effects = wharf_model::Effects::default();
            for tag in tags {
                if let Ok(more) = model.ack(key, tag, false) {
                    effects.merge(more);
                }
            }
            Ok(((), effects))
        });
    }

    async fn publish(&mut self, mut publish: Publish) -> Result<(), Ending> {
        if let Some(alias) = publish.properties.topic_alias {
            if alias > TOPIC_ALIAS_MAXIMUM {
                return Err(Ending::Protocol(
                    reason::TOPIC_ALIAS_INVALID,
                    format!("topic alias {alias} is over the maximum"),
                ));
            }
            if publish.topic.is_empty() {
                match self.topic_aliases.get(&alias) {
                    Some(topic_name) => publish.topic = topic_name.clone(),
                    None => {
                        return Err(Ending::Protocol(reason::PROTOCOL_ERROR, format!("unknown topic alias {alias}")));
                    }
                }
            } else {
                self.topic_aliases.insert(alias, publish.topic.clone());
            }
            publish.properties.topic_alias = None;
        }
        let packet_id = publish.packet_id;
        if publish.qos == QoS::ExactlyOnce && publish.dup && self.incoming_qos_2.contains(&packet_id) {
            // Sent again before our PUBREC reached it: it was taken once already. (Without the
            // DUP flag it is a new publish reusing the id: the flow before it was finished, its
            // end perhaps not recorded before a crash, `state.rs`.)
            let packet = Packet::PubRec(Ack::new(packet_id, reason::SUCCESS));
            return self.acknowledge(packet, Vec::new(), false).await;
        }
        let routing_key = topic::to_amqp(&publish.topic);
        if let Err(error) = self.allow_publish(&routing_key) {
            tracing::warn!(client_id = %self.client_id, topic = %publish.topic, %error, "MQTT publish refused");
            // 5.0 can refuse a QoS 1 or 2 publish and go on; otherwise the connection ends (as
            // RabbitMQ's `disconnect_on_unauthorized`).
            if self.version.is_v5() && publish.qos != QoS::AtMostOnce {
                let refusal = Ack::new(packet_id, reason::NOT_AUTHORIZED);
                let packet =
                    if publish.qos == QoS::AtLeastOnce { Packet::PubAck(refusal) } else { Packet::PubRec(refusal) };
                return self.acknowledge(packet, Vec::new(), false).await;
            }
            return Err(Ending::Protocol(reason::NOT_AUTHORIZED, error.text));
        }
        self.published = true;
        // Only a persistent session's QoS 2 publish is recorded, and so marked.
        let marker = if publish.qos == QoS::ExactlyOnce && self.expiry_s > 0 {
            Some(self.next_flow_marker(packet_id)?)
        } else {
            None
        };
        let message = convert::message_from_publish(
            &self.exchange,
            routing_key.clone(),
            &publish,
            false,
            self.publisher(),
            marker.as_deref(),
        )
        .with_trace(self.origin.clone());
        // Whether it reached a queue is asked for only where a 5.0 client can be told.
        let mandatory = self.version.is_v5() && publish.qos != QoS::AtMostOnce;
        let request = PublishRequest {
            vhost: &self.vhost,
            channel: 1,
            exchange: &self.exchange,
            routing_key: &routing_key,
            mandatory,
        };
        let core = &self.core;
        let published = if core.store.under_back_pressure() {
            blocking(|| core.publish(&request, message, &mut ReservationPool::default()))
        } else {
            core.publish(&request, message, &mut ReservationPool::default())
        };
        let Published { durable, nack, failed, returned } =
            published.map_err(|error| Ending::Protocol(reason::IMPLEMENTATION_SPECIFIC_ERROR, error.text))?;
        let mut kept = true;
        if publish.retain {
            match self.core.mqtt_retained.keep(&self.core, &self.vhost, &publish) {
                Ok(()) => {}
                Err(super::retained::NotKept::Full) => {
                    tracing::warn!(client_id = %self.client_id, topic = %publish.topic, "retained message not kept: the retained store is full");
                    kept = false;
                }
                Err(super::retained::NotKept::Store(error)) => {
                    self.core.store_failed(&error);
                    return Err(Ending::Closed(format!("the retained message could not be stored: {error}")));
                }
            }
        }
        let code = if failed {
            reason::UNSPECIFIED_ERROR
        } else if nack || !kept {
            reason::QUOTA_EXCEEDED
        } else if returned.is_some() {
            reason::NO_MATCHING_SUBSCRIBERS
        } else {
            reason::SUCCESS
        };
        let packet = match publish.qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => Packet::PubAck(Ack::new(packet_id, code)),
            QoS::ExactlyOnce if code < 0x80 && self.expiry_s > 0 => {
                // The id is recorded once the message is durable and before the PUBREC: a
                // PUBLISH sent again after a crash is then known, and one whose message a crash
                // lost is not (it is routed again).
                for ticket in durable {
                    if let Err(error) = ticket.wait().await {
                        self.core.store_failed(&error);
                        return Err(Ending::Closed(format!("the message could not be stored: {error}")));
                    }
                }
                self.incoming_qos_2.insert(packet_id);
                self.persist(true)?;
                return self.acknowledge(Packet::PubRec(Ack::new(packet_id, code)), Vec::new(), false).await;
            }
            QoS::ExactlyOnce => {
                if code < 0x80 {
                    self.incoming_qos_2.insert(packet_id);
                } else if marker.is_some() {
                    // Refused, but copies may be in queues with their marker: the flow's end is
                    // recorded (its number passed, its id not kept) before the client hears of
                    // it, or recovery would take the id for one a crash left unrecorded.
                    self.persist(true)?;
                }
                Packet::PubRec(Ack::new(packet_id, code))
            }
        };
        self.acknowledge(packet, durable, nack).await
    }

    /// The marker of the QoS 2 publish `packet_id` (`state.rs`): the session's incarnation is
    /// made durable before its first marker, so recovery can tell this session's markers from
    /// those of an earlier session with the same client id. Flow numbers are taken in the
    /// order publishes arrive; each is recorded (its message durable first) before the next
    /// publish is read, so the only unrecorded one a crash can leave is the last.
    fn next_flow_marker(&mut self, packet_id: u16) -> Result<String, Ending> {
        if self.incarnation == 0 {
            self.incarnation = super::state::new_incarnation(self.core.now_ms());
            self.persist(true)?;
        }
        let flow = self.next_flow;
        self.next_flow = flow.saturating_add(1);
        Ok(super::state::flow_marker(self.incarnation, flow, packet_id, &self.client_id))
    }

    /// Waits until everything submitted to the store so far is durable.
    async fn sync_store(&self) -> Result<(), Ending> {
        let synced = match self.core.store.sync() {
            Ok(ticket) => crate::confirms::Durable::sync(ticket).wait().await,
            Err(error) => Err(error),
        };
        synced.map_err(|error| {
            self.core.store_failed(&error);
            Ending::Closed(format!("the store could not sync: {error}"))
        })
    }

    /// The client id to carry on a publish, once some session subscribed with no-local.
    pub(super) fn publisher(&self) -> Option<&str> {
        self.core.mqtt_clients.no_local_seen().then_some(self.client_id.as_str())
    }

    /// Writes the session's state (`state.rs`) if it outlives its connection: `connected`
    /// false when the connection ends (its expiry starts to run then).
    pub fn persist(&self, connected: bool) -> Result<(), Ending> {
        if self.expiry_s == 0 {
            return Ok(());
        }
        let (released, skip) = {
            let flight = self.flight.lock();
            let released =
                flight.released.iter().map(|(id, stored)| (*id, stored.map(|at| (at.log, at.seq)))).collect();
            (released, flight.skip.iter().map(|at| (at.log, at.seq)).collect())
        };
        let kept = super::state::Kept {
            expiry_s: self.expiry_s,
            disconnected_at_ms: (!connected).then(|| self.core.now_ms()),
            incoming_qos_2: self.incoming_qos_2.iter().copied().collect(),
            released,
            shared: self.shared.iter().map(|(text, member)| (text.clone(), member.options())).collect(),
            skip,
            incarnation: self.incarnation,
            next_flow: self.next_flow,
        };
        let core = &self.core;
        blocking(|| core.mqtt_sessions.write(core, &self.vhost, &self.client_id, &kept)).map_err(|error| {
            core.store_failed(&error);
            Ending::Closed(format!("the session's state could not be stored: {error}"))
        })
    }

    pub(super) fn allow_publish(&mut self, routing_key: &str) -> Result<(), ModelError> {
        if !self.write_allowed {
            self.grant.check(Right::Write, Resource::Exchange, &self.exchange)?;
            self.write_allowed = true;
        }
        if self.grant.has_topic_rules(&self.exchange) {
            self.grant.check_topic(Right::Write, &self.exchange, routing_key)?;
        }
        Ok(())
    }

    fn subscribe(&mut self, subscribe: Subscribe) -> Result<(), Ending> {
        let identifier = subscribe.properties.subscription_identifiers.first().copied();
        let mut reasons = Vec::with_capacity(subscribe.subscriptions.len());
        let mut retained_for = Vec::new();
        let shared_before = self.shared.len();
        for subscription in &subscribe.subscriptions {
            // Section 3.8.3.1: no-local on a shared subscription is a protocol error.
            if subscription.options.no_local && subscription.filter.starts_with("$share/") {
                return Err(Ending::Protocol(reason::PROTOCOL_ERROR, "no-local on a shared subscription".into()));
            }
            if subscription.options.no_local {
                self.core.mqtt_clients.see_no_local();
            }
        }
        for subscription in subscribe.subscriptions {
            let code = match topic::parse_filter(&subscription.filter) {
                Err(error) => {
                    tracing::info!(client_id = %self.client_id, %error, "MQTT subscription refused");
                    reason::TOPIC_FILTER_INVALID
                }
                Ok(topic::ParsedFilter { share_group: Some(group), filter }) => {
                    let (group, filter) = (group.to_owned(), filter.to_owned());
                    self.subscribe_shared(&subscription.filter, &group, &filter, subscription.options, identifier)
                }
                Ok(_) => {
                    let granted = Granted {
                        filter: subscription.filter.clone(),
                        qos: subscription.options.qos,
                        identifier,
                        no_local: subscription.options.no_local,
                        retain_as_published: subscription.options.retain_as_published,
                    };
                    let existed = self.subscriptions.contains_key(&granted.filter);
                    match self.add_subscription(granted, subscription.options) {
                        Ok(()) => {
                            let wanted = match subscription.options.retain_handling {
                                RetainHandling::SendAtSubscribe => true,
                                RetainHandling::SendAtNewSubscribe => !existed,
                                RetainHandling::DoNotSend => false,
                            };
                            if wanted {
                                retained_for.push(subscription.filter.clone());
                            }
                            subscription.options.qos as u8
                        }
                        Err(error) => {
                            tracing::warn!(client_id = %self.client_id, error = %error.text, "MQTT subscription refused");
                            if error.code == wharf_wire::reply_code::ACCESS_REFUSED {
                                reason::NOT_AUTHORIZED
                            } else {
                                reason::UNSPECIFIED_ERROR
                            }
                        }
                    }
                }
            };
            reasons.push(code);
        }
        // A no-op when nothing changed (`state.rs` compares with what it stored).
        if shared_before > 0 || !self.shared.is_empty() {
            self.persist(true)?;
        }
        let packet_id = subscribe.packet_id;
        self.send(&Packet::SubAck(SubAck { packet_id, reasons, properties: Default::default() }));
        for filter in retained_for {
            self.send_retained(&filter);
        }
        Ok(())
    }

    /// Puts copies of the retained messages `filter` matches into the session's queue (after the
    /// SUBACK, as the specification orders), marked so they go out with the retain flag.
    fn send_retained(&self, filter: &str) {
        for publish in self.core.mqtt_retained.matching(&self.vhost, filter, self.core.now_ms()) {
            let routing_key = topic::to_amqp(&publish.topic);
            let message = convert::message_from_publish(&self.exchange, routing_key, &publish, true, None, None);
            let request = PublishRequest {
                vhost: &self.vhost,
                channel: 1,
                exchange: "",
                routing_key: &self.queue,
                mandatory: false,
            };
            let core = &self.core;
            if let Err(error) = blocking(|| core.publish(&request, message, &mut ReservationPool::default())) {
                tracing::warn!(client_id = %self.client_id, error = %error.text, "a retained message could not be sent");
            }
        }
    }

    fn add_subscription(
        &mut self,
        granted: Granted,
        options: wharf_mqtt::SubscriptionOptions,
    ) -> Result<(), ModelError> {
        let queue = self.queue();
        queue.allow(&granted.filter)?;
        queue.declare()?;
        let recorded = Recorded { granted: granted.clone(), options };
        queue.bind(&granted, &options, self.subscriptions.get(&granted.filter))?;
        self.subscriptions.insert(granted.filter.clone(), recorded);
        self.publish_subscriptions();
        self.consume()
    }

    /// Tells the writer the subscriptions as they are now.
    pub fn publish_subscriptions(&self) {
        let own = self.subscriptions.values().map(|recorded| recorded.granted.clone());
        let shared = self.shared.values().map(|member| member.granted.clone());
        // Matched as deliveries' topics come back from routing keys: `.` in a filter is a level
        // separator there too (RabbitMQ's mapping), so `v1.0/status` matches `v1/0/status`.
        let granted = own
            .chain(shared)
            .map(|granted| Granted { filter: topic::to_mqtt(&topic::to_amqp(&granted.filter)), ..granted })
            .collect();
        self.flight.lock().subscriptions = granted;
    }

    fn unsubscribe(&mut self, unsubscribe: Unsubscribe) -> Result<(), Ending> {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        let shared_before = self.shared.len();
        for filter in unsubscribe.filters {
            if let Some(code) = self.unsubscribe_shared(&filter) {
                reasons.push(code);
                continue;
            }
            let code = match self.subscriptions.get(&filter).cloned() {
                None => reason::NO_SUBSCRIPTION_EXISTED,
                Some(recorded) => match self.queue().unbind(&recorded) {
                    Ok(()) => {
                        self.subscriptions.remove(&filter);
                        reason::SUCCESS
                    }
                    Err(error) => {
                        tracing::warn!(client_id = %self.client_id, error = %error.text, "MQTT unsubscribe failed");
                        reason::UNSPECIFIED_ERROR
                    }
                },
            };
            reasons.push(code);
        }
        self.publish_subscriptions();
        if self.shared.len() != shared_before {
            self.persist(true)?;
        }
        let packet_id = unsubscribe.packet_id;
        self.send(&Packet::UnsubAck(UnsubAck { packet_id, reasons, properties: Default::default() }));
        Ok(())
    }
}

/// The packet loop: reads and handles packets until the connection ends. Like the AMQP frame
/// loop it stops reading while the writer is far behind, and while an alarm is raised for a
/// connection that publishes.
pub(super) async fn run_packets<R: super::transport::Fill>(
    session: &mut Session,
    mut reading: super::Reading<R>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut failed: tokio::sync::watch::Receiver<Option<String>>,
    info: &crate::manage::ConnectionInfo,
) -> Ending {
    use std::sync::atomic::Ordering;
    let mut close_requested = info.close_requested();
    let mut fatal = session.core.fatal.subscribe();
    let backlog = Arc::clone(&session.outbox.backlog);
    // 1.5 times the keep-alive (section 3.1.2.10); none without one.
    let silence_limit = match reading.keep_alive_s {
        0 => std::time::Duration::from_secs(365 * 24 * 3600),
        keep_alive_s => std::time::Duration::from_millis(u64::from(keep_alive_s) * 1500),
    };
    let mut last_read = tokio::time::Instant::now();
    loop {
        loop {
            match reading.decoder.decode(&mut reading.buffer) {
                Ok(Some(packet)) => {
                    if let Err(ending) = session.handle(packet).await {
                        return ending;
                    }
                }
                Ok(None) => break,
                Err(error) => return Ending::Protocol(error.reason_code(), error.to_string()),
            }
        }
        if backlog.reports.has_unsent() {
            act_on_writer_reports(session);
        }
        if std::mem::take(&mut session.published) && session.core.alarms.state().any() {
            let mut alarms = session.core.alarms.subscribe();
            while alarms.borrow_and_update().any() {
                tokio::select! {
                    changed = alarms.changed() => if changed.is_err() { break },
                    _ = shutdown.changed() => return Ending::Closed("broker shutting down".into()),
                    _ = fatal.changed() => return Ending::Closed("the broker's storage failed".into()),
                    _ = close_requested.changed() => {
                        return Ending::Closed(close_requested.borrow().clone().unwrap_or_default());
                    }
                    () = session.flight.stop.notified() => return Ending::Closed(session.flight.stop_reason()),
                }
            }
            last_read = tokio::time::Instant::now();
        }
        while backlog.bytes.load(Ordering::Relaxed) > crate::outbound::BACKLOG_BYTES_MAX {
            let drained = backlog.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if backlog.bytes.load(Ordering::Relaxed) <= crate::outbound::BACKLOG_BYTES_MAX {
                break;
            }
            tokio::select! {
                () = drained => {}
                _ = shutdown.changed() => return Ending::Closed("broker shutting down".into()),
                _ = close_requested.changed() => {
                    return Ending::Closed(close_requested.borrow().clone().unwrap_or_default());
                }
                () = session.flight.stop.notified() => return Ending::Closed(session.flight.stop_reason()),
            }
        }
        tokio::select! {
            read = tokio::time::timeout_at(last_read + silence_limit, reading.reader.fill(&mut reading.buffer)) => match read {
                Ok(Ok(read_bytes)) => {
                    last_read = tokio::time::Instant::now();
                    info.count_received(read_bytes);
                }
                Ok(Err(reason)) => return Ending::Lost(reason),
                Err(_) => return Ending::KeepAliveTimeout,
            },
            () = session.flight.qos_0_written.notified() => session.settle_written_at_qos_0(),
            () = backlog.reports.ready.notified() => act_on_writer_reports(session),
            _ = shutdown.changed() => return Ending::Closed("broker shutting down".into()),
            _ = fatal.changed() => return Ending::Closed("the broker's storage failed".into()),
            _ = close_requested.changed() => {
                return Ending::Closed(close_requested.borrow().clone().unwrap_or_default());
            }
            _ = failed.changed() => {
                return Ending::Closed(failed.borrow().clone().unwrap_or_default());
            }
            () = session.flight.stop.notified() => return Ending::Closed(session.flight.stop_reason()),
            () = backlog.writer_failed.notified() => {
                return Ending::Closed("a stored message could not be read back".into());
            }
        }
    }
}

/// Tells the model what the writer reported (as the AMQP connection does).
fn act_on_writer_reports(session: &Session) {
    let crate::outbound::Reports { written_bytes, unsent } = session.outbox.backlog.reports.take();
    let connection = session.key.connection;
    let core = &session.core;
    if written_bytes > 0 {
        let _ = core.act(|model| Ok(((), model.written(connection, written_bytes))));
    }
    for crate::outbound::UnsentDelivery { channel, delivery_tag } in unsent {
        let undelivered = wharf_model::trace::Refusal::Undelivered;
        let _ = blocking(|| core.act(|model| Ok(((), model.refuse(channel, delivery_tag, false, true, undelivered)?))));
    }
}
