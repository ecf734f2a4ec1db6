//! The MQTT 3.1.1 and 5.0 front end (`docs/design/20261204_mqtt.md`): MQTT clients on the same
//! durable core as AMQP ones, mapped as RabbitMQ's MQTT plugin maps them. A publish goes to the
//! MQTT exchange (`amq.topic`) with its topic as the routing key (`/` as `.`), through the one
//! publish path (`publish.rs`), and a QoS 1 or 2 publish is acknowledged only once it is durable;
//! a session's subscriptions are bindings of its own queue, consumed on a channel of the
//! connection's own, so MQTT and AMQP clients meet on the exchange and every delivery guarantee
//! applies to MQTT subscribers.
//!
//! `mod.rs` accepts the socket and handles CONNECT (authentication with the broker's users, the
//! vhost from a `vhost:user` name, the client id, taking a session over, resuming one);
//! `session.rs` runs the packet loop; `writer.rs` sends deliveries as PUBLISH packets;
//! `acks.rs` acknowledges publishes in order once durable; `subscriptions.rs` keeps subscriptions
//! as bindings; `state.rs` keeps what else a persistent session needs after a crash;
//! `shared.rs` shared subscriptions; `will.rs` wills; `retained.rs` keeps retained messages;
//! `convert.rs` maps message properties; `clients.rs` the client ids in use.

mod acks;
mod clients;
mod convert;
pub(crate) mod retained;
mod session;
mod shared;
pub(crate) mod state;
mod subscriptions;
mod transport;
mod will;
mod writer;

pub(crate) use clients::Clients;
pub(crate) use retained::Retained;
pub(crate) use state::Sessions;

use crate::access::{Resource, Right};
use crate::core::{Core, blocking};
use crate::manage::{ConnectionFacts, ConnectionInfo};
use crate::outbound::{Backlog, HandshakeSlot, Outbox};
use bytes::BytesMut;
use session::Session;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use transport::Transport;
use wharf_model::ChannelKey;
use wharf_mqtt::{ConnAck, Connect, DecodeError, Decoder, Disconnect, Packet, Properties, Version, reason};
use wharf_wire::types::{AMQPValue, FieldTable};

/// The largest CONNECT taken before the client has logged in (RabbitMQ's
/// `max_packet_size_unauthenticated`).
const UNAUTHENTICATED_PACKET_BYTES_MAX: u32 = 65_536;

/// Longest client id: its queue's name (`mqtt-subscription-<id>qos1`) must fit AMQP's 255 bytes.
const CLIENT_ID_BYTES_MAX: usize = 255 - "mqtt-subscription-qos1".len();

/// How a connection ended.
#[derive(Debug)]
pub(super) enum Ending {
    /// The client sent DISCONNECT.
    ClientDisconnected,
    /// The socket closed or failed.
    Lost(String),
    /// Nothing came within one and a half keep-alive intervals.
    KeepAliveTimeout,
    /// The client broke the protocol: 5.0 is told the reason code before the close.
    Protocol(u8, String),
    /// The server closed it (shutdown, takeover, a management close, a store failure).
    Closed(String),
}

/// Serves one socket accepted on the MQTT listener until it closes.
pub(crate) async fn serve(
    core: Arc<Core>,
    socket: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    handshake_slot: HandshakeSlot,
) {
    let _ = socket.set_nodelay(true);
    let local = socket.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(core.config.handshake_timeout_ms);
    let accepted = Accepted { peer, local, tls: false, deadline, client_certificate: None };
    serve_stream(core, socket, accepted, shutdown, handshake_slot).await;
}

/// Serves one socket accepted on the MQTT-over-TLS listener: the TLS handshake within the same
/// handshake slot and deadline as the CONNECT that follows it (as AMQPS does, `tls.rs`).
pub(crate) async fn serve_tls(
    core: Arc<Core>,
    socket: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    handshake_slot: HandshakeSlot,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(core.config.handshake_timeout_ms);
    let Some(crate::tls::Accepted { stream, handshake_slot, local, client_certificate }) =
        crate::tls::handshake(socket, handshake_slot, peer, &mut shutdown, acceptor, deadline).await
    else {
        return;
    };
    let accepted = Accepted { peer, local, tls: true, deadline, client_certificate };
    serve_stream(core, stream, accepted, shutdown, handshake_slot).await;
}

/// Where an accepted connection came from and how.
#[derive(Debug)]
struct Accepted {
    peer: SocketAddr,
    local: SocketAddr,
    tls: bool,
    /// When the CONNECT must have come by.
    deadline: tokio::time::Instant,
    /// A client certificate the TLS handshake verified (MQTTS with a CA configured).
    client_certificate: Option<rustls_pki_types::CertificateDer<'static>>,
}

/// Serves one connection over `socket` until it closes.
async fn serve_stream<S: Transport>(
    core: Arc<Core>,
    mut socket: S,
    accepted: Accepted,
    shutdown: watch::Receiver<bool>,
    handshake_slot: HandshakeSlot,
) {
    let (peer, deadline) = (accepted.peer, accepted.deadline);
    let mut buffer = BytesMut::with_capacity(1024);
    let mut decoder = Decoder::new(UNAUTHENTICATED_PACKET_BYTES_MAX);
    let first = tokio::time::timeout_at(deadline, async {
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Some(packet)) => return Ok(packet),
                Ok(None) => transport::read_more(&mut socket, &mut buffer).await.map_err(|_| None)?,
                Err(error) => return Err(Some(error)),
            };
        }
    })
    .await;
    let connect = match first {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Err(Some(DecodeError::UnsupportedVersion { name, level }))) => {
            tracing::info!(%peer, %name, level, "MQTT connection refused: unsupported protocol version");
            // 3.1.1 says: CONNACK with return code 1, then close (section 3.1.2.2).
            let mut reply = BytesMut::new();
            let refusal = ConnAck {
                session_present: false,
                reason: reason::UNSUPPORTED_PROTOCOL_VERSION,
                properties: Properties::default(),
            };
            wharf_mqtt::encode(&Packet::ConnAck(refusal), Version::V311, &mut reply);
            let _ = socket.write_all(&reply).await;
            let _ = socket.flush().await;
            return;
        }
        Ok(Err(Some(error))) => {
            tracing::info!(%peer, %error, "MQTT connection closed: bad CONNECT");
            return;
        }
        Ok(Ok(_)) | Ok(Err(None)) => return,
        Err(_) => {
            tracing::info!(%peer, "MQTT connection closed: no CONNECT in time");
            return;
        }
    };
    let version = connect.version;
    match authenticate(&core, &connect, peer, accepted.client_certificate.as_ref()) {
        Ok(admitted) => {
            // Not kept for the connection's life.
            let mut connect = connect;
            connect.password = None;
            run(core, *connect, admitted, accepted, socket, buffer, decoder, shutdown, handshake_slot).await
        }
        Err(code) => refuse(&mut socket, version, code).await,
    }
}

/// Answers a CONNECT with a refusal (then the socket is closed).
async fn refuse<S: AsyncWrite + Unpin>(socket: &mut S, version: Version, code: u8) {
    let mut reply = BytesMut::new();
    let refusal = ConnAck { session_present: false, reason: code, properties: Properties::default() };
    wharf_mqtt::encode(&Packet::ConnAck(refusal), version, &mut reply);
    // Flushed: a TLS stream may hold the record until then.
    let _ = socket.write_all(&reply).await;
    let _ = socket.flush().await;
}

/// Who a CONNECT logged in as.
#[derive(Debug)]
struct Admitted {
    user: String,
    vhost: String,
    grant: Arc<crate::access::VhostGrant>,
    client_id: String,
    /// The client id the server made up for a client that sent none (told in 5.0's CONNACK).
    assigned: Option<String>,
}

/// Checks a CONNECT's credentials, vhost and client id. Err: the reason code to refuse it with.
/// A CONNECT without a user name and password over TLS with a verified client certificate logs
/// in as the user the certificate's common name names (RabbitMQ's `ssl_cert_login`), in the
/// default MQTT vhost.
fn authenticate(
    core: &Core,
    connect: &Connect,
    peer: SocketAddr,
    client_certificate: Option<&rustls_pki_types::CertificateDer<'static>>,
) -> Result<Admitted, u8> {
    let settings = &core.config.mqtt;
    let (vhost, user, password);
    match (connect.username.as_deref(), connect.password.as_deref(), client_certificate) {
        (Some(name), Some(given), _) => {
            // RabbitMQ's `vhost:user`, split at the last colon.
            (vhost, user) = match name.rsplit_once(':') {
                Some((vhost, user)) => (vhost.to_owned(), user.to_owned()),
                None => (settings.vhost.clone(), name.to_owned()),
            };
            password = Some(given);
        }
        (None, None, Some(certificate)) => {
            let common_name = crate::cert_name::common_name(certificate).map_err(|error| {
                tracing::warn!(%peer, reason = %error.reason(), "MQTT connection refused: the client certificate names no user");
                reason::BAD_USER_NAME_OR_PASSWORD
            })?;
            (vhost, user) = (settings.vhost.clone(), common_name);
            password = None;
        }
        _ => {
            tracing::warn!(%peer, "MQTT connection refused: no user name and password (anonymous logins are off)");
            return Err(reason::BAD_USER_NAME_OR_PASSWORD);
        }
    }
    let credentials = match password {
        Some(password) => crate::login::Credentials::Password { user: &user, password },
        None => crate::login::Credentials::Certificate(&user),
    };
    if let Err(refused) = crate::login::log_in(core, credentials, peer.ip()) {
        let code = match refused {
            crate::login::Refused::BadCredentials => reason::BAD_USER_NAME_OR_PASSWORD,
            crate::login::Refused::Throttled | crate::login::Refused::LoopbackOnly(_) => reason::NOT_AUTHORIZED,
        };
        tracing::warn!(%peer, %user, ?refused, "MQTT connection refused");
        return Err(code);
    }
    if core.lock_model().vhost(&vhost).is_none() {
        tracing::warn!(%peer, %user, %vhost, "MQTT connection refused: no such vhost");
        return Err(reason::BAD_USER_NAME_OR_PASSWORD);
    }
    let Some(grant) = core.access.grant(&user, &vhost) else {
        tracing::warn!(%peer, %user, %vhost, "MQTT connection refused: no permissions on the vhost");
        return Err(reason::NOT_AUTHORIZED);
    };
    let mut client_id = connect.client_id.clone();
    let mut assigned = None;
    if client_id.is_empty() {
        // 3.1.1: a client without an id must start clean (section 3.1.3.1).
        if !connect.clean_start && !connect.version.is_v5() {
            return Err(reason::CLIENT_IDENTIFIER_NOT_VALID);
        }
        client_id = format!("wharf-{:016x}", random_u64(core.now_ms()));
        assigned = Some(client_id.clone());
    }
    if client_id.len() > CLIENT_ID_BYTES_MAX {
        tracing::warn!(%peer, "MQTT connection refused: client id over {CLIENT_ID_BYTES_MAX} bytes");
        return Err(reason::CLIENT_IDENTIFIER_NOT_VALID);
    }
    Ok(Admitted { user, vhost, grant, client_id, assigned })
}

/// A server-assigned client id's random part (std's per-process random hasher keys).
fn random_u64(seed: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(seed);
    hasher.finish()
}

/// Registers the connection, takes the client id, opens or resumes the session, answers the
/// CONNECT and runs the packet loop until the connection ends; then sends the will and lets
/// go of the session.
#[allow(clippy::too_many_arguments)]
async fn run<S: Transport>(
    core: Arc<Core>,
    connect: Connect,
    admitted: Admitted,
    accepted: Accepted,
    mut socket: S,
    buffer: BytesMut,
    mut decoder: Decoder,
    shutdown: watch::Receiver<bool>,
    handshake_slot: HandshakeSlot,
) {
    let Admitted { user, vhost, grant, client_id, assigned } = admitted;
    let Accepted { peer, local, tls, .. } = accepted;
    let version = connect.version;
    let v5 = version.is_v5();
    let settings = &core.config.mqtt;
    let lease = match core.limits.admit_connection(&user, &vhost) {
        Ok(lease) => lease,
        Err(text) => {
            tracing::warn!(%peer, %user, %vhost, reason = %text, "MQTT connection refused: limit reached");
            return refuse(&mut socket, version, reason::QUOTA_EXCEEDED).await;
        }
    };
    let mut client_properties = FieldTable::default();
    client_properties.insert("product".into(), AMQPValue::LongString("MQTT".into()));
    client_properties.insert("connection_name".into(), AMQPValue::LongString(client_id.as_str().into()));
    let info = Arc::new(ConnectionInfo::new(ConnectionFacts {
        peer,
        local,
        tls,
        user: user.clone(),
        vhost: vhost.clone(),
        client_properties,
        auth_mechanism: format!("MQTT {}", if v5 { "5.0" } else { "3.1.1" }),
        frame_max: settings.packet_bytes_max,
        channel_max: 1,
        heartbeat_s: connect.keep_alive_s,
        connected_at_ms: core.now_ms(),
    }));
    let (sender, outbound_receiver) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    let outbox = Outbox { sender, backlog: Arc::clone(&backlog) };
    let Some(id) = core.connections.register(outbox.clone(), Arc::clone(&info)) else {
        tracing::warn!(%peer, "MQTT connection refused: too many connections");
        return refuse(&mut socket, version, reason::SERVER_BUSY).await;
    };
    drop(handshake_slot);
    let Some(client_lease) = core.mqtt_clients.take(&vhost, &client_id, Arc::clone(&info)).await else {
        core.connections.unregister(id);
        tracing::warn!(%peer, %client_id, "MQTT connection refused: the connection holding its client id did not let go");
        return refuse(&mut socket, version, reason::SERVER_BUSY).await;
    };
    let key = ChannelKey { connection: id, channel: 1 };
    let prefetch = settings.prefetch.min(connect.properties.receive_maximum.unwrap_or(u16::MAX));
    // The prefetch is the channel's (RabbitMQ's `global`): the session's queue and its shared
    // subscriptions together stay within the client's receive maximum.
    let opened = core.act(|model| {
        model.open_channel(key, &vhost)?;
        Ok(((), model.qos(key, prefetch, true)?))
    });
    if let Err(error) = opened {
        core.connections.unregister(id);
        tracing::warn!(%peer, error = %error.text, "MQTT connection refused");
        return refuse(&mut socket, version, reason::SERVER_UNAVAILABLE).await;
    }
    let max_s = settings.session_expiry_max_s;
    let expiry_s = if v5 {
        connect.properties.session_expiry_interval_s.unwrap_or(0).min(max_s)
    } else if connect.clean_start {
        0
    } else {
        max_s
    };
    // What the session kept besides its queue (`state.rs`); a clean start ends it.
    let kept = if connect.clean_start {
        state::Kept::default()
    } else {
        core.mqtt_sessions.take(&vhost, &client_id, core.now_ms())
    };
    let flight = Arc::new(writer::Flight::new(
        version,
        client_id.clone(),
        connect.properties.maximum_packet_size.unwrap_or(wharf_mqtt::PACKET_BYTES_MAX_LIMIT),
        &kept,
    ));
    let (acks_sender, acks_receiver) = mpsc::channel(acks::WAITING_ACKS_MAX);
    let (failed_sender, failed) = watch::channel(None);
    let mut session = Session {
        core: Arc::clone(&core),
        version,
        client_id: client_id.clone(),
        vhost: vhost.clone(),
        exchange: settings.exchange.clone(),
        key,
        grant,
        outbox: outbox.clone(),
        flight: Arc::clone(&flight),
        acks: acks_sender,
        queue: subscriptions::queue_name(&client_id),
        expiry_s,
        subscriptions: Default::default(),
        consuming: false,
        shared: Default::default(),
        incoming_qos_2: kept.incoming_qos_2.iter().copied().collect(),
        incarnation: kept.incarnation,
        next_flow: kept.next_flow,
        topic_aliases: Default::default(),
        will: connect.will.clone(),
        origin: core.trace_origin(id, &info),
        write_allowed: false,
        published: false,
    };
    // A session is another user's to resume or end only with the rights its queue needs
    // (client ids are per vhost, as in RabbitMQ).
    if session.queue().exists() {
        let right = if connect.clean_start { Right::Configure } else { Right::Read };
        if let Err(error) = session.grant.check(right, Resource::Queue, &session.queue) {
            tracing::warn!(%peer, %user, %client_id, error = %error.text, "MQTT connection refused: the session's queue is not the user's");
            let _ = blocking(|| core.act(|model| Ok(((), model.close_connection(id)))));
            core.connections.unregister(id);
            return refuse(&mut socket, version, reason::NOT_AUTHORIZED).await;
        }
    }
    // Connected again in time: a will waiting for its delay is not sent (if the user may
    // configure its queue, as for taking the session over).
    if session.grant.check(Right::Configure, Resource::Queue, &will::queue_name(&client_id)).is_ok() {
        will::cancel(&core, &vhost, &client_id, key);
    }
    // A session that now ends with its connection keeps no record (a crash ends it too).
    if expiry_s == 0
        && !connect.clean_start
        && let Err(error) = blocking(|| core.mqtt_sessions.write(&core, &vhost, &client_id, &state::Kept::default()))
    {
        tracing::warn!(%client_id, %error, "the MQTT session's old state could not be deleted");
    }
    // A clean start ends the session before it; otherwise it goes on where it was: its queue
    // and subscriptions, its shared subscriptions, and its unfinished QoS 2 flows.
    let released: Vec<u16> = kept.released.keys().copied().collect();
    let resumed = if connect.clean_start {
        if let Err(error) = session.queue().discard() {
            tracing::warn!(%client_id, error = %error.text, "the previous MQTT session could not be discarded");
        }
        let core = &core;
        if let Err(error) = blocking(|| core.mqtt_sessions.write(core, &vhost, &client_id, &state::Kept::default())) {
            tracing::warn!(%client_id, %error, "the previous MQTT session's state could not be deleted");
        }
        false
    } else {
        session.queue().exists() || !kept.is_empty()
    };
    if resumed {
        session.subscriptions = session
            .queue()
            .recorded()
            .into_iter()
            .map(|recorded| (recorded.granted.filter.clone(), recorded))
            .collect();
        if session.subscriptions.values().any(|recorded| recorded.options.no_local) {
            core.mqtt_clients.see_no_local();
        }
        session.publish_subscriptions();
    }
    decoder.set_packet_bytes_max(settings.packet_bytes_max);
    let mut properties = Properties::default();
    if v5 {
        properties.assigned_client_identifier = assigned;
        properties.topic_alias_maximum = Some(session::TOPIC_ALIAS_MAXIMUM);
        properties.receive_maximum = Some(acks::WAITING_ACKS_MAX as u16);
        properties.maximum_packet_size = Some(settings.packet_bytes_max);
        if connect.properties.session_expiry_interval_s.is_some_and(|asked| asked > max_s) {
            properties.session_expiry_interval_s = Some(max_s);
        }
    }
    session.send(&Packet::ConnAck(ConnAck { session_present: resumed, reason: reason::SUCCESS, properties }));
    // QoS 2 deliveries the client received before it went: their PUBREL again (section 4.4).
    for packet_id in released {
        session.send(&Packet::PubRel(wharf_mqtt::Ack::new(packet_id, reason::SUCCESS)));
    }
    // After the CONNACK, so no delivery overtakes it.
    if resumed
        && !session.subscriptions.is_empty()
        && let Err(error) = session.consume()
    {
        tracing::warn!(%client_id, error = %error.text, "the MQTT session's queue could not be consumed");
    }
    if resumed {
        session.rejoin_shared(&kept.shared);
    }
    // Connected again: its expiry is not running.
    if let Err(Ending::Closed(text)) = session.persist(true) {
        tracing::warn!(%client_id, %text, "the MQTT session's state could not be stored");
    }
    tracing::info!(%peer, connection = id.0, %user, %vhost, %client_id, resumed, "MQTT connection opened");
    crate::core::Churn::count(&core.churn.connections_opened, 1);
    let (reader, writer_half) = socket.split_halves();
    let writer_task =
        tokio::spawn(writer::run(writer_half, outbound_receiver, Arc::clone(&flight), Arc::clone(&backlog)));
    let acks_task = tokio::spawn(acks::run(acks_receiver, outbox.clone(), version, failed_sender));
    let reading = Reading { reader, buffer, decoder, keep_alive_s: connect.keep_alive_s };
    let ending = session::run_packets(&mut session, reading, shutdown, failed, &info).await;
    let disconnect = match &ending {
        Ending::ClientDisconnected => {
            tracing::info!(%peer, %client_id, "MQTT connection closed by client");
            None
        }
        Ending::Protocol(code, text) => {
            tracing::info!(%peer, %client_id, code, %text, "MQTT connection closed: protocol error");
            Some(*code)
        }
        Ending::Closed(text) => {
            tracing::info!(%peer, %client_id, %text, "MQTT connection closed by the server");
            Some(if text == clients::TAKEN_OVER { reason::SESSION_TAKEN_OVER } else { reason::ADMINISTRATIVE_ACTION })
        }
        Ending::KeepAliveTimeout => {
            tracing::info!(%peer, %client_id, "MQTT connection closed: keep-alive timeout");
            Some(reason::KEEP_ALIVE_TIMEOUT)
        }
        Ending::Lost(text) => {
            tracing::info!(%peer, %client_id, %text, "MQTT connection lost");
            None
        }
    };
    session.send_will();
    // Unacknowledged deliveries go back to the queue (marked redelivered); a clean session's
    // exclusive queue goes with the connection, and so does a resumed durable queue of a session
    // that now ends with its connection (5.0 expiry 0).
    let _ = blocking(|| core.act(|model| Ok(((), model.close_connection(id)))));
    if session.expiry_s == 0
        && let Err(error) = session.queue().discard()
    {
        tracing::warn!(%client_id, error = %error.text, "the ended MQTT session's queue could not be deleted");
    }
    // What the session keeps besides its queue, durably, from now until it expires (or nothing,
    // if it ends with its connection).
    if session.expiry_s > 0 {
        if let Err(Ending::Closed(text)) = session.persist(false) {
            tracing::warn!(%client_id, %text, "the MQTT session's state could not be stored");
        }
    } else if let Err(error) = blocking(|| core.mqtt_sessions.write(&core, &vhost, &client_id, &state::Kept::default()))
    {
        tracing::warn!(%client_id, %error, "the ended MQTT session's state could not be deleted");
    }
    // Every acknowledgement already due goes out (each once its message is durable) before the
    // session's state is handed on: a takeover must not acknowledge a repeated QoS 2 publish
    // whose first copy is not durable yet. The server's DISCONNECT comes after them.
    drop(session);
    let _ = acks_task.await;
    if let Some(code) = disconnect.filter(|_| v5) {
        let mut buffer = BytesMut::new();
        wharf_mqtt::encode(&Packet::Disconnect(Disconnect::new(code)), version, &mut buffer);
        let _ = outbox.send(crate::outbound::Outbound::Frames(buffer.freeze()));
    }
    core.connections.unregister(id);
    drop(client_lease);
    drop(lease);
    drop(outbox);
    let _ = writer_task.await;
}

/// The reading side of a connection after CONNECT.
#[derive(Debug)]
pub(super) struct Reading<R> {
    pub reader: R,
    pub buffer: BytesMut,
    pub decoder: Decoder,
    pub keep_alive_s: u16,
}
