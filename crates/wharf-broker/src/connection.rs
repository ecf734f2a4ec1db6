//! One client connection: the handshake (protocol header, SASL, tune, vhost), then the frame loop
//! that assembles published messages and hands every method to the channel logic in
//! `session.rs`, with heartbeat supervision and both close handshakes. Errors are answered with the
//! reply code the spec and RabbitMQ use, closing only the channel when that is enough.
//!
//! It runs over any byte stream: a plain TCP socket's own halves (`TcpStream::into_split`, the
//! benchmarked path, no locking between reader and writer), or the halves of a TLS stream (see
//! `tls.rs`). The code is generic over the halves, so neither pays for the other.

use crate::access::VhostGrant;
use crate::core::{Core, blocking};
use crate::limits::ConnectionLease;
use crate::manage::{ConnectionFacts, ConnectionInfo};
use crate::outbound::{BACKLOG_BYTES_MAX, Backlog, HandshakeSlot, Outbound, Outbox, Reports, UnsentDelivery};
use crate::outbound::{method_frame, truncate};
use crate::session::{Session, Stop};
use crate::writer::{self, WriterSettings};
use bytes::BytesMut;
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use wharf_model::ConnectionId;
use wharf_wire::frame::{FRAME_MIN_SIZE, decode_protocol_header, encode_protocol_header};
use wharf_wire::methods::MethodId;
use wharf_wire::protocol::{AMQPClass, connection};
use wharf_wire::types::{AMQPValue, FieldTable, LongString, ShortString};
use wharf_wire::{Frame, FrameDecoder, WireError, reply_code, sasl};

/// Most bytes read from a socket at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// How long the server waits for `connection.close-ok` after sending `connection.close`.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a connection stays open after answering the client's `connection.close` (RabbitMQ's
/// 30 s, or the heartbeat interval if shorter): see `linger_after_client_close`.
const CLOSE_LINGER_S_MAX: u64 = 30;

/// Why the frame loop ended.
#[derive(Debug)]
pub(crate) enum Ending {
    /// The client closed the connection (close handshake done).
    ClientClosed,
    /// The server closed it with this code and text.
    ServerClosed(u16, String),
    /// The socket ended or failed without a close handshake.
    SocketLost(String),
    /// No frame within two heartbeat intervals.
    HeartbeatMissed,
}

fn connection_close(code: u16, text: &str, cause: MethodId) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
        reply_code: code,
        reply_text: ShortString::from(truncate(text)),
        class_id: cause.class_id,
        method_id: cause.method_id,
    }))
}

fn server_properties() -> FieldTable {
    let mut capabilities = FieldTable::default();
    for capability in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
        "consumer_priorities",
        "direct_reply_to",
    ] {
        capabilities.insert(ShortString::from(capability), AMQPValue::Boolean(true));
    }
    let mut properties = FieldTable::default();
    let text = |value: &str| AMQPValue::LongString(LongString::from(value));
    properties.insert("product".into(), text("Wharf"));
    properties.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
    properties.insert("platform".into(), text("Rust"));
    properties.insert("information".into(), text("A durable AMQP 0-9-1 broker"));
    properties.insert("copyright".into(), text("The Wharf developers"));
    // RabbitMQ names its cluster after its node; clients and tools show it.
    properties.insert("cluster_name".into(), text(&format!("wharf@{}", host_name())));
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    properties
}

/// This machine's host name (for `cluster_name`), or "localhost" if it cannot be read.
pub(crate) fn host_name() -> String {
    rustix::system::uname().nodename().to_str().map(str::to_owned).unwrap_or_else(|_| "localhost".to_owned())
}

/// Reads from the socket into `buffer`, failing on end of stream; returns the bytes read.
async fn fill<R: AsyncRead + Unpin>(reader: &mut R, buffer: &mut BytesMut) -> Result<usize, String> {
    buffer.reserve(READ_CHUNK_BYTES);
    match reader.read_buf(buffer).await {
        Ok(0) => Err("connection closed by peer".into()),
        Ok(read_bytes) => Ok(read_bytes),
        Err(error) => Err(error.to_string()),
    }
}

/// What the transport established before AMQP began.
#[derive(Debug)]
pub(crate) struct Transport {
    /// When the handshake must be done by (a TLS handshake already spent part of the time).
    pub deadline: tokio::time::Instant,
    /// The client's certificate, verified against the configured CA (TLS only): SASL `EXTERNAL`
    /// is offered, and logs in as its CN, only with one.
    pub client_certificate: Option<CertificateDer<'static>>,
    /// The listener's address the client connected to (for the connection's name).
    pub local: SocketAddr,
    /// The connection runs over TLS.
    pub tls: bool,
}

/// The state of one connection.
struct Connection<R> {
    core: Arc<Core>,
    peer: SocketAddr,
    /// The listener's address the client connected to.
    local: SocketAddr,
    tls: bool,
    client_certificate: Option<CertificateDer<'static>>,
    reader: R,
    buffer: BytesMut,
    decoder: FrameDecoder,
    outbound: Outbox,
    settings: Arc<WriterSettings>,
}

impl<R: AsyncRead + Unpin> Connection<R> {
    fn send(&self, channel: u16, method: &AMQPClass) {
        let _ = self.outbound.send(Outbound::Frames(method_frame(channel, method)));
    }

    /// Reads the next frame (during the handshake, with no heartbeat supervision yet).
    async fn next_frame(&mut self) -> Result<Frame, Ending> {
        loop {
            match self.decoder.decode(&mut self.buffer) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(error) => return Err(self.close_for_wire_error(&error).await),
            }
            fill(&mut self.reader, &mut self.buffer).await.map_err(Ending::SocketLost)?;
        }
    }

    async fn close_for_wire_error(&mut self, error: &WireError) -> Ending {
        tracing::warn!(peer = %self.peer, %error, "protocol error");
        self.close_connection(error.reply_code(), &error.to_string(), MethodId::NONE).await
    }

    /// Sends `connection.close` and waits (bounded) for `close-ok`, ignoring anything else.
    async fn close_connection(&mut self, code: u16, text: &str, cause: MethodId) -> Ending {
        self.send(0, &connection_close(code, text, cause));
        let deadline = tokio::time::Instant::now() + CLOSE_OK_TIMEOUT;
        loop {
            match self.decoder.decode(&mut self.buffer) {
                Ok(Some(Frame::Method { method, .. })) => {
                    if matches!(
                        *method,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_) | connection::AMQPMethod::Close(_))
                    ) {
                        break;
                    }
                    continue;
                }
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(_) => break,
            }
            match tokio::time::timeout_at(deadline, fill(&mut self.reader, &mut self.buffer)).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        Ending::ServerClosed(code, text.to_owned())
    }

    /// After answering a client's `connection.close`: keeps reading until the client closes the
    /// socket, answering every further `connection.close` with close-ok and dropping any other
    /// frame, for at most the heartbeat interval (30 s without one, or with a longer one), as
    /// RabbitMQ does, or until the server stops. Closing at once would break clients that close from several threads at
    /// once (each sends its own close) or are still writing when they close: their writes would
    /// fail, and unread bytes make the kernel reset the socket, which can lose the close-ok.
    async fn linger_after_client_close(&mut self, shutdown: &mut watch::Receiver<bool>) {
        let heartbeat_s = u64::from(self.settings.heartbeat_s.load(Ordering::Relaxed));
        let linger_s = if heartbeat_s == 0 { CLOSE_LINGER_S_MAX } else { heartbeat_s.min(CLOSE_LINGER_S_MAX) };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(linger_s);
        loop {
            loop {
                match self.decoder.decode(&mut self.buffer) {
                    Ok(Some(Frame::Method { channel: 0, method })) => {
                        if matches!(*method, AMQPClass::Connection(connection::AMQPMethod::Close(_))) {
                            let close_ok =
                                AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {}));
                            self.send(0, &close_ok);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            // Keep the buffer from growing while dropping what a client still sends.
            if self.buffer.len() > READ_CHUNK_BYTES * 64 {
                return;
            }
            tokio::select! {
                filled = tokio::time::timeout_at(deadline, fill(&mut self.reader, &mut self.buffer)) => {
                    if !matches!(filled, Ok(Ok(_))) {
                        return;
                    }
                }
                // The server is stopping: no reason to wait for the client.
                _ = shutdown.changed() => return,
            }
        }
    }

    /// The handshake. Returns the user name and vhost.
    async fn handshake(&mut self) -> Result<LoggedIn, Ending> {
        let version = loop {
            match decode_protocol_header(&mut self.buffer) {
                Ok(Some(version)) => break version,
                Ok(None) => {
                    fill(&mut self.reader, &mut self.buffer).await.map_err(Ending::SocketLost)?;
                }
                Err(error) => {
                    // The spec's answer to an unsupported header: our header, then close.
                    let mut reply = BytesMut::new();
                    encode_protocol_header(&mut reply);
                    let _ = self.outbound.send(Outbound::Frames(reply.freeze()));
                    return Err(Ending::ServerClosed(reply_code::FRAME_ERROR, error.to_string()));
                }
            }
        };
        let (version_major, version_minor) = version.start_version();
        self.send(
            0,
            &AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major,
                version_minor,
                server_properties: server_properties(),
                mechanisms: LongString::from(match self.client_certificate {
                    Some(_) => sasl::MECHANISMS_WITH_EXTERNAL,
                    None => sasl::MECHANISMS,
                }),
                locales: LongString::from("en_US"),
            })),
        );
        let start_ok = match self.next_frame().await? {
            Frame::Method { channel: 0, method } => match *method {
                AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)) => start_ok,
                _ => return Err(self.unexpected("connection.start-ok").await),
            },
            _ => return Err(self.unexpected("connection.start-ok").await),
        };
        let user = self.authenticate(&start_ok).await?;
        let blocked_capable = announces_capability(&start_ok.client_properties, "connection.blocked");
        let cancel_notify = announces_capability(&start_ok.client_properties, "consumer_cancel_notify");
        self.settings.cancel_notify.store(cancel_notify, Ordering::Relaxed);
        let config = self.core.config.clone();
        self.send(
            0,
            &AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                channel_max: config.channel_max,
                frame_max: config.frame_max,
                heartbeat: config.heartbeat_s,
            })),
        );
        let tune_ok = match self.next_frame().await? {
            Frame::Method { channel: 0, method } => match *method {
                AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)) => tune_ok,
                _ => return Err(self.unexpected("connection.tune-ok").await),
            },
            _ => return Err(self.unexpected("connection.tune-ok").await),
        };
        let frame_max = match tune_ok.frame_max {
            0 => config.frame_max,
            requested if requested < FRAME_MIN_SIZE => {
                let text = format!("frame_max {requested} is below the minimum {FRAME_MIN_SIZE}");
                return Err(self.close_connection(reply_code::NOT_ALLOWED, &text, MethodId::CONNECTION_TUNE_OK).await);
            }
            requested => requested.min(config.frame_max),
        };
        let channel_max = match tune_ok.channel_max {
            0 => config.channel_max,
            requested => requested.min(config.channel_max),
        };
        self.decoder.set_frame_max(frame_max);
        self.settings.frame_max.store(frame_max, Ordering::Relaxed);
        self.settings.heartbeat_s.store(u32::from(tune_ok.heartbeat), Ordering::Relaxed);
        let open = match self.next_frame().await? {
            Frame::Method { channel: 0, method } => match *method {
                AMQPClass::Connection(connection::AMQPMethod::Open(open)) => open,
                _ => return Err(self.unexpected("connection.open").await),
            },
            _ => return Err(self.unexpected("connection.open").await),
        };
        let vhost = open.virtual_host.as_str().to_owned();
        if self.core.lock_model().vhost(&vhost).is_none() {
            let text = format!("NOT_ALLOWED - vhost '{vhost}' not found");
            return Err(self.close_connection(reply_code::NOT_ALLOWED, &text, MethodId::CONNECTION_OPEN).await);
        }
        let Some(grant) = self.core.access.grant(&user, &vhost) else {
            tracing::warn!(peer = %self.peer, %user, %vhost, "connection refused: no permissions on the vhost");
            let text = format!("NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'");
            return Err(self.close_connection(reply_code::NOT_ALLOWED, &text, MethodId::CONNECTION_OPEN).await);
        };
        let lease = match self.core.limits.admit_connection(&user, &vhost) {
            Ok(lease) => lease,
            Err(text) => {
                tracing::warn!(peer = %self.peer, %user, %vhost, reason = %text, "connection refused: limit reached");
                return Err(self.close_connection(reply_code::NOT_ALLOWED, &text, MethodId::CONNECTION_OPEN).await);
            }
        };
        // Only a logged-in connection takes one of the `connections_max` slots (a socket still in
        // its handshake holds a handshake slot instead), so silent sockets cannot lock real
        // clients out.
        let info = Arc::new(ConnectionInfo::new(ConnectionFacts {
            peer: self.peer,
            local: self.local,
            tls: self.tls,
            user: user.clone(),
            vhost: vhost.clone(),
            client_properties: start_ok.client_properties.clone(),
            auth_mechanism: start_ok.mechanism.to_string(),
            frame_max,
            channel_max,
            heartbeat_s: tune_ok.heartbeat,
            connected_at_ms: self.core.now_ms(),
        }));
        let Some(id) = self.core.connections.register(self.outbound.clone(), Arc::clone(&info)) else {
            let limit = self.core.config.connections_max;
            tracing::warn!(peer = %self.peer, limit, "connection refused: too many connections");
            let text = format!("NOT_ALLOWED - connection limit ({limit}) is reached");
            return Err(self.close_connection(reply_code::NOT_ALLOWED, &text, MethodId::CONNECTION_OPEN).await);
        };
        // Its user or permissions may have been removed since the grant was taken; the removal
        // closed the connections registered then, not this one.
        if self.core.access.grant(&user, &vhost).is_none() {
            self.core.connections.unregister(id);
            let text = format!("NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'");
            return Err(self.close_connection(reply_code::NOT_ALLOWED, &text, MethodId::CONNECTION_OPEN).await);
        }
        crate::core::Churn::count(&self.core.churn.connections_opened, 1);
        self.send(0, &AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})));
        Ok(LoggedIn { id, user, vhost, channel_max, grant, lease, blocked_capable, info })
    }

    async fn unexpected(&mut self, expected: &str) -> Ending {
        let text = format!("UNEXPECTED_FRAME - expected {expected}");
        self.close_connection(reply_code::UNEXPECTED_FRAME, &text, MethodId::NONE).await
    }

    async fn authenticate(&mut self, start_ok: &connection::StartOk) -> Result<String, Ending> {
        let mechanism = start_ok.mechanism.as_str();
        let claim = claim(mechanism, start_ok.response.as_bytes(), self.client_certificate.as_ref());
        let outcome = claim.and_then(|claim| {
            crate::login::log_in(&self.core, claim.credentials(), self.peer.ip())
                .map(|user| user.name)
                .map_err(|refused| refusal_text(&refused, mechanism))
        });
        match outcome {
            Ok(user) => Ok(user),
            Err(text) => {
                tracing::warn!(peer = %self.peer, reason = %text, "authentication failed");
                // A client that announced authentication_failure_close is told why, then closed
                // without waiting long; any other is just closed, as RabbitMQ does (an older
                // client may not expect a close during the handshake).
                if announces_capability(&start_ok.client_properties, "authentication_failure_close") {
                    self.send(0, &connection_close(reply_code::ACCESS_REFUSED, &text, MethodId::CONNECTION_START_OK));
                }
                Err(Ending::ServerClosed(reply_code::ACCESS_REFUSED, text))
            }
        }
    }
}

/// Who a client says it is: a name and password from its SASL response, or (`EXTERNAL`) the CN of
/// its verified certificate.
#[derive(Debug)]
enum Claim {
    Password(sasl::Credentials),
    Certificate(String),
}

impl Claim {
    fn credentials(&self) -> crate::login::Credentials<'_> {
        match self {
            Claim::Password(credentials) => crate::login::Credentials::Password {
                user: &credentials.username,
                password: credentials.password.as_bytes(),
            },
            Claim::Certificate(name) => crate::login::Credentials::Certificate(name),
        }
    }
}

/// The 403 reply text RabbitMQ gives for a refused login.
fn refusal_text(refused: &crate::login::Refused, mechanism: &str) -> String {
    match refused {
        crate::login::Refused::Throttled => {
            "ACCESS_REFUSED - too many failed logins from this address; try again later".to_owned()
        }
        crate::login::Refused::BadCredentials => {
            format!("ACCESS_REFUSED - Login was refused using authentication mechanism {mechanism}")
        }
        crate::login::Refused::LoopbackOnly(user) => {
            format!("ACCESS_REFUSED - user '{user}' can only connect via localhost")
        }
    }
}

/// Reads the client's claim, or the 403 reply text RabbitMQ would give. `EXTERNAL` exists only
/// with a verified client certificate (it is not offered otherwise); its response, at most an
/// authorization identity, is ignored, as RabbitMQ's `rabbitmq_auth_mechanism_ssl` ignores it.
fn claim(mechanism: &str, response: &[u8], client_certificate: Option<&CertificateDer<'_>>) -> Result<Claim, String> {
    if mechanism == sasl::MECHANISM_EXTERNAL
        && let Some(certificate) = client_certificate
    {
        return crate::cert_name::common_name(certificate)
            .map(Claim::Certificate)
            .map_err(|error| format!("ACCESS_REFUSED - EXTERNAL: {}", error.reason()));
    }
    match sasl::parse_response(mechanism, response) {
        Ok(Some(credentials)) => Ok(Claim::Password(credentials)),
        Ok(None) => Err(format!("ACCESS_REFUSED - unsupported authentication mechanism {mechanism}")),
        Err(error) => Err(format!("ACCESS_REFUSED - {error}")),
    }
}

/// What a finished handshake established.
#[derive(Debug)]
struct LoggedIn {
    /// The connection's id in the registry (it holds a `connections_max` slot from here on).
    id: ConnectionId,
    user: String,
    vhost: String,
    channel_max: u16,
    /// What the user may do in the vhost.
    grant: Arc<VhostGrant>,
    /// Its place in the vhost's and user's connection counts.
    lease: ConnectionLease,
    /// The client understands `connection.blocked` and `connection.unblocked`.
    blocked_capable: bool,
    /// What the management interface shows of it (and how it asks to close it).
    info: Arc<ConnectionInfo>,
}

/// Serves one socket accepted on the plain AMQP listener until it closes.
pub(crate) async fn serve_plain(
    core: Arc<Core>,
    socket: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    handshake_slot: HandshakeSlot,
) {
    let _ = socket.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(core.config.handshake_timeout_ms);
    let local = socket.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (reader, writer_half) = socket.into_split();
    let transport = Transport { deadline, client_certificate: None, local, tls: false };
    serve(core, reader, writer_half, peer, shutdown, handshake_slot, transport).await;
}

/// Serves one connection over a byte stream's halves until it closes.
/// Until it has logged in, a connection holds `handshake_slot` (taken at accept, bounded by
/// `handshakes_max`), and must be done by `transport.deadline` (`handshake_timeout_ms` after
/// accept); it holds none of the `connections_max` slots.
pub(crate) async fn serve<R, W>(
    core: Arc<Core>,
    reader: R,
    writer_half: W,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    handshake_slot: HandshakeSlot,
    transport: Transport,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (sender, outbound_receiver) = mpsc::unbounded_channel();
    let backlog = Arc::new(Backlog::default());
    let outbound = Outbox { sender, backlog: Arc::clone(&backlog) };
    let settings = Arc::new(WriterSettings::new());
    let writer = tokio::spawn(writer::run(writer_half, outbound_receiver, Arc::clone(&settings), backlog));
    let mut connection = Connection {
        core: Arc::clone(&core),
        peer,
        local: transport.local,
        tls: transport.tls,
        client_certificate: transport.client_certificate,
        reader,
        buffer: BytesMut::with_capacity(READ_CHUNK_BYTES),
        decoder: FrameDecoder::new(FRAME_MIN_SIZE),
        outbound: outbound.clone(),
        settings: Arc::clone(&settings),
    };
    let handshake = tokio::time::timeout_at(transport.deadline, connection.handshake()).await;
    drop(handshake_slot);
    let (ending, id) = match handshake {
        Err(_) => (Ending::SocketLost("handshake timed out".into()), None),
        Ok(Err(ending)) => (ending, None),
        Ok(Ok(LoggedIn { id, user, vhost, channel_max, grant, lease, blocked_capable, info })) => {
            tracing::info!(%peer, connection = id.0, %user, %vhost, "connection opened");
            let origin = core.trace_origin(id, &info);
            let mut session =
                Session::new(Arc::clone(&core), id, grant, lease, vhost, channel_max, outbound.clone(), origin);
            let ending = run_frames(&mut connection, &mut session, shutdown, blocked_capable, &info).await;
            session.close_all();
            (ending, Some(id))
        }
    };
    let connection_id = id.map(|id| id.0);
    match &ending {
        Ending::ClientClosed => tracing::info!(%peer, ?connection_id, "connection closed by client"),
        Ending::ServerClosed(code, text) => {
            tracing::info!(%peer, ?connection_id, code, %text, "connection closed by server")
        }
        Ending::SocketLost(reason) => tracing::info!(%peer, ?connection_id, %reason, "connection lost"),
        Ending::HeartbeatMissed => tracing::info!(%peer, ?connection_id, "connection closed: missed heartbeats"),
    }
    if let Some(id) = id {
        core.connections.unregister(id);
    }
    drop(connection);
    drop(outbound);
    let _ = writer.await;
}

/// The frame loop after the handshake.
async fn run_frames<R: AsyncRead + Unpin>(
    connection: &mut Connection<R>,
    session: &mut Session,
    mut shutdown: watch::Receiver<bool>,
    blocked_capable: bool,
    info: &ConnectionInfo,
) -> Ending {
    let mut fatal = connection.core.fatal.subscribe();
    let mut close_requested = info.close_requested();
    // When the client last sent anything: heartbeat supervision counts from here, and only a
    // read moves it (other wake-ups of this loop, such as the writer's reports, must not).
    let mut last_read = tokio::time::Instant::now();
    loop {
        // Handle every complete frame already buffered before reading more.
        loop {
            match connection.decoder.decode(&mut connection.buffer) {
                Ok(Some(frame)) => match handle_frame(connection, session, frame).await {
                    Ok(()) => {}
                    Err(Stop::ClientClosed) => {
                        // Release everything first, so nothing follows the close-ok.
                        session.close_all();
                        connection
                            .send(0, &AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})));
                        connection.linger_after_client_close(&mut shutdown).await;
                        return Ending::ClientClosed;
                    }
                    Err(Stop::Error { error, cause }) => {
                        tracing::warn!(peer = %connection.peer, %error, %cause, "connection error");
                        return connection.close_connection(error.code, &error.text, cause).await;
                    }
                },
                Ok(None) => break,
                Err(error) => return connection.close_for_wire_error(&error).await,
            }
        }
        // A connection that publishes while an alarm is raised is not read from until it clears
        // (RabbitMQ's flow control); one that only consumes goes on.
        if session.take_published() && connection.core.alarms.state().any() {
            if let Some(ending) = wait_out_alarm(connection, session, blocked_capable, &mut shutdown).await {
                return ending;
            }
            last_read = tokio::time::Instant::now();
        }
        // Back-pressure: while the writer is far behind (a client that sends but does not read),
        // stop reading this socket until it catches up.
        let backlog = Arc::clone(&connection.outbound.backlog);
        while backlog.bytes.load(Ordering::Relaxed) > BACKLOG_BYTES_MAX {
            let drained = backlog.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if backlog.bytes.load(Ordering::Relaxed) <= BACKLOG_BYTES_MAX {
                break;
            }
            tokio::select! {
                () = drained => {}
                _ = shutdown.changed() => {
                    return connection.close_connection(reply_code::CONNECTION_FORCED, "CONNECTION_FORCED - broker shutting down", MethodId::NONE).await;
                }
            }
        }
        let heartbeat_s = connection.settings.heartbeat_s.load(Ordering::Relaxed);
        let silence_limit = if heartbeat_s == 0 {
            Duration::from_secs(24 * 3600)
        } else {
            Duration::from_secs(u64::from(heartbeat_s) * 2)
        };
        tokio::select! {
            read = tokio::time::timeout_at(last_read + silence_limit, fill(&mut connection.reader, &mut connection.buffer)) => match read {
                Ok(Ok(read_bytes)) => {
                    last_read = tokio::time::Instant::now();
                    info.count_received(read_bytes);
                }
                Ok(Err(reason)) => return Ending::SocketLost(reason),
                Err(_) => return Ending::HeartbeatMissed,
            },
            _ = shutdown.changed() => {
                return connection.close_connection(reply_code::CONNECTION_FORCED, "CONNECTION_FORCED - broker shutting down", MethodId::NONE).await;
            }
            _ = fatal.changed() => {
                return connection.close_connection(reply_code::INTERNAL_ERROR, "INTERNAL_ERROR - the broker's storage failed", MethodId::NONE).await;
            }
            _ = close_requested.changed() => {
                let reason = close_requested.borrow().clone().unwrap_or_default();
                let text = format!("CONNECTION_FORCED - {reason}");
                return connection.close_connection(reply_code::CONNECTION_FORCED, &text, MethodId::NONE).await;
            }
            () = backlog.writer_failed.notified() => {
                return connection.close_connection(reply_code::INTERNAL_ERROR, "INTERNAL_ERROR - a stored message could not be read back", MethodId::NONE).await;
            }
            () = backlog.reports.ready.notified() => act_on_writer_reports(&connection.core, session, &backlog),
        }
    }
}

/// Blocks a publishing connection while an alarm is raised: `connection.blocked` (if the client
/// announced the capability), no reads until every alarm clears, then `connection.unblocked`.
/// Returns how the connection ended if the broker stops meanwhile.
async fn wait_out_alarm<R: AsyncRead + Unpin>(
    connection: &mut Connection<R>,
    session: &mut Session,
    notify: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Ending> {
    let mut alarms = connection.core.alarms.subscribe();
    let state = *alarms.borrow_and_update();
    if !state.any() {
        return None;
    }
    tracing::info!(peer = %connection.peer, reason = state.reason(), "connection blocked");
    if notify {
        let blocked = connection::Blocked { reason: ShortString::from(state.reason()) };
        connection.send(0, &AMQPClass::Connection(connection::AMQPMethod::Blocked(blocked)));
    }
    // What this connection holds (a transaction's publishes, a body half sent) cannot grow while
    // it is not read, and only frames it cannot send now could free it: counted, it could hold
    // the alarm up for ever. It counts again from its next frame.
    session.leave_memory_account();
    let mut fatal = connection.core.fatal.subscribe();
    let backlog = Arc::clone(&connection.outbound.backlog);
    let outbound = connection.outbound.sender.clone();
    while alarms.borrow_and_update().any() {
        tokio::select! {
            changed = alarms.changed() => if changed.is_err() { break },
            _ = shutdown.changed() => {
                let text = "CONNECTION_FORCED - broker shutting down";
                return Some(connection.close_connection(reply_code::CONNECTION_FORCED, text, MethodId::NONE).await);
            }
            _ = fatal.changed() => {
                let text = "INTERNAL_ERROR - the broker's storage failed";
                return Some(connection.close_connection(reply_code::INTERNAL_ERROR, text, MethodId::NONE).await);
            }
            () = backlog.writer_failed.notified() => {
                let text = "INTERNAL_ERROR - a stored message could not be read back";
                return Some(connection.close_connection(reply_code::INTERNAL_ERROR, text, MethodId::NONE).await);
            }
            // The writer stopped: the socket is gone (seen when a heartbeat or delivery fails).
            () = outbound.closed() => return Some(Ending::SocketLost("socket closed while blocked".into())),
            // Deliveries to this connection's consumers go on while it is blocked: what the writer
            // reports keeps the model dispatching to it.
            () = backlog.reports.ready.notified() => act_on_writer_reports(&connection.core, session, &backlog),
        }
    }
    tracing::info!(peer = %connection.peer, "connection unblocked");
    if notify {
        connection.send(0, &AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {})));
    }
    None
}

/// Whether `client_properties` announce `capability` (under `capabilities`, as `true`).
fn announces_capability(client_properties: &FieldTable, capability: &str) -> bool {
    match client_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(capabilities)) => {
            matches!(capabilities.inner().get(capability), Some(AMQPValue::Boolean(true)))
        }
        _ => false,
    }
}

/// Hands one frame to the session. A delivery the writer could not send frees its slot first: the
/// writer reported it before writing anything queued after it (such as that channel's close-ok),
/// so a frame that reopens the channel and reuses the delivery tag always comes after the slot is
/// freed, never before.
async fn handle_frame<R>(connection: &Connection<R>, session: &mut Session, frame: Frame) -> Result<(), Stop> {
    let backlog = &connection.outbound.backlog;
    if backlog.reports.has_unsent() {
        act_on_writer_reports(&connection.core, session, backlog);
    }
    session.handle(frame).await
}

/// Tells the model what the connection's writer reported: delivery bytes written (so dispatching
/// to a connection that had too much pending resumes) and deliveries it could not send (requeued).
fn act_on_writer_reports(core: &Core, session: &Session, backlog: &Backlog) {
    let Reports { written_bytes, unsent } = backlog.reports.take();
    let connection = session.connection();
    if written_bytes > 0 {
        let _ = core.act(|model| Ok(((), model.written(connection, written_bytes))));
    }
    for UnsentDelivery { channel, delivery_tag } in unsent {
        let undelivered = wharf_model::trace::Refusal::Undelivered;
        let _ = blocking(|| core.act(|model| Ok(((), model.refuse(channel, delivery_tag, false, true, undelivered)?))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::User;

    /// The whole login decision for a response, as `authenticate` makes it.
    fn login(
        users: &[User],
        mechanism: &str,
        response: &[u8],
        certificate: Option<&CertificateDer<'_>>,
        peer: std::net::IpAddr,
    ) -> Result<String, String> {
        claim(mechanism, response, certificate).and_then(|claim| {
            let credentials = claim.credentials();
            let found = users.iter().find(|user| user.name == credentials.user()).cloned();
            crate::login::decide(found, credentials, peer)
                .map(|user| user.name)
                .map_err(|refused| refusal_text(&refused, mechanism))
        })
    }

    #[test]
    fn guest_only_from_loopback_and_passwords_must_match() {
        let users = vec![User::guest(), User::with_password("app", "pw", false)];
        let loopback: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let remote: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let authorize = |mechanism: &str, response: &[u8], peer| login(&users, mechanism, response, None, peer);
        assert_eq!(authorize("PLAIN", b"\0guest\0guest", loopback), Ok("guest".into()));
        let refused = authorize("PLAIN", b"\0guest\0guest", remote).unwrap_err();
        assert_eq!(refused, "ACCESS_REFUSED - user 'guest' can only connect via localhost");
        assert_eq!(authorize("PLAIN", b"\0app\0pw", remote), Ok("app".into()));
        assert!(authorize("PLAIN", b"\0app\0wrong", remote).unwrap_err().contains("Login was refused"));
        assert!(authorize("PLAIN", b"\0ap\0pw", remote).is_err(), "a prefix of a name is not the name");
        assert!(authorize("CRAM-MD5", b"", loopback).unwrap_err().contains("unsupported"));
    }

    fn certificate_for(common_name: &str) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().der().clone()
    }

    #[test]
    fn external_logs_in_as_the_certificates_common_name_if_that_user_exists() {
        let users = vec![User::guest(), User::with_password("app", "pw", false)];
        let remote: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let app = certificate_for("app");
        // The password is not asked for, and the response (an authorization identity) is ignored.
        assert_eq!(login(&users, "EXTERNAL", b"", Some(&app), remote), Ok("app".into()));
        assert_eq!(login(&users, "EXTERNAL", b"guest", Some(&app), remote), Ok("app".into()));
        let stranger = certificate_for("stranger");
        let refused = login(&users, "EXTERNAL", b"", Some(&stranger), remote).unwrap_err();
        assert_eq!(refused, "ACCESS_REFUSED - Login was refused using authentication mechanism EXTERNAL");
        let guest = certificate_for("guest");
        let refused = login(&users, "EXTERNAL", b"", Some(&guest), remote).unwrap_err();
        assert_eq!(refused, "ACCESS_REFUSED - user 'guest' can only connect via localhost");
        // Without a verified certificate EXTERNAL is not offered, and not accepted either.
        let refused = login(&users, "EXTERNAL", b"app", None, remote).unwrap_err();
        assert_eq!(refused, "ACCESS_REFUSED - unsupported authentication mechanism EXTERNAL");
        // PLAIN still works on a connection with a certificate, as whoever the password says.
        assert_eq!(
            login(&users, "PLAIN", b"\0guest\0guest", Some(&app), "127.0.0.1".parse().unwrap()),
            Ok("guest".into())
        );
    }
}
