//! AMQP over TLS: a rustls client (tokio-rustls, as any Rust client would use it) speaking AMQP
//! to the broker's TLS listener. TLS 1.2 and 1.3 are served, TLS 1.1 and plain AMQP on the TLS
//! port get nothing, mutual TLS with SASL `EXTERNAL` logs in as the certificate's CN, and
//! reloaded certificates serve new handshakes while open connections keep going. Certificates are
//! made by the test (rcgen): a CA, a server certificate for 127.0.0.1, client certificates.

use crate::common::{self, TestBroker};
use bytes::BytesMut;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use wharf_broker::{BrokerConfig, TlsConfig, User};
use wharf_wire::frame::{self, FRAME_MIN_SIZE, encode_method};
use wharf_wire::protocol::{AMQPClass, channel, connection, queue};
use wharf_wire::{Frame, FrameDecoder};

/// A safety net so a broken server fails the test instead of hanging it; never a timing claim.
const HANG_GUARD: Duration = common::PATIENCE;

/// A certificate authority that issues the test's certificates.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    certificate: CertificateDer<'static>,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap().der().clone();
        Authority { issuer: Issuer::new(params, key), certificate }
    }

    /// A server certificate for 127.0.0.1 and localhost, with its key.
    fn server(&self) -> (CertificateDer<'static>, KeyPair) {
        let params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, &self.issuer).unwrap().der().clone(), key)
    }

    /// A client certificate whose subject's CN is `common_name`, with its key.
    fn client(&self, common_name: &str) -> (CertificateDer<'static>, KeyPair) {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, &self.issuer).unwrap().der().clone(), key)
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = text.as_bytes().chunks(64).map(|line| std::str::from_utf8(line).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// The files the broker is configured with.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Files {
    fn in_dir(dir: &Path) -> Files {
        Files { cert: dir.join("server.pem"), key: dir.join("server.key"), ca: dir.join("ca.pem") }
    }

    /// Writes a server certificate and key from `authority`, and `authority` as the client CA.
    fn write(&self, authority: &Authority) -> CertificateDer<'static> {
        let (certificate, key) = authority.server();
        std::fs::write(&self.cert, pem("CERTIFICATE", &certificate)).unwrap();
        std::fs::write(&self.key, key.serialize_pem()).unwrap();
        std::fs::write(&self.ca, pem("CERTIFICATE", &authority.certificate)).unwrap();
        certificate
    }

    fn tls(&self, verify_peer: bool, with_ca: bool) -> TlsConfig {
        let mut tls = TlsConfig::new("127.0.0.1:0".parse().unwrap(), &self.cert, &self.key);
        tls.ca_cert_path = with_ca.then(|| self.ca.clone());
        tls.verify_peer = verify_peer;
        tls
    }
}

/// A broker with TLS, and the CA its certificate is from.
struct TlsBroker {
    broker: TestBroker,
    authority: Authority,
    files: Files,
    _dir: tempfile::TempDir,
}

impl TlsBroker {
    async fn start(verify_peer: bool, with_ca: bool, configure: impl FnOnce(&mut BrokerConfig)) -> TlsBroker {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::new("Wharf test CA");
        let files = Files::in_dir(dir.path());
        files.write(&authority);
        let tls = files.tls(verify_peer, with_ca);
        let broker = TestBroker::start_with(|config| {
            config.tls = Some(tls);
            configure(config);
        })
        .await;
        TlsBroker { broker, authority, files, _dir: dir }
    }

    fn amqps(&self) -> SocketAddr {
        self.broker.broker().amqps_local_addr().unwrap()
    }
}

/// How a client connects: which CAs it trusts, which versions it speaks, its certificate.
struct Client {
    roots: Vec<CertificateDer<'static>>,
    versions: &'static [&'static rustls::SupportedProtocolVersion],
    identity: Option<(CertificateDer<'static>, KeyPair)>,
}

impl Client {
    fn trusting(authority: &Authority) -> Client {
        Client { roots: vec![authority.certificate.clone()], versions: rustls::ALL_VERSIONS, identity: None }
    }

    fn with_certificate(mut self, identity: (CertificateDer<'static>, KeyPair)) -> Client {
        self.identity = Some(identity);
        self
    }

    async fn connect(&self, address: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        for root in &self.roots {
            roots.add(root.clone()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(self.versions)
            .unwrap()
            .with_root_certificates(roots);
        let config = match &self.identity {
            Some((certificate, key)) => builder
                .with_client_auth_cert(vec![certificate.clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap())
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let socket = TcpStream::connect(address).await?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        tokio::time::timeout(HANG_GUARD, TlsConnector::from(Arc::new(config)).connect(name, socket))
            .await
            .expect("TLS handshake hung")
    }
}

/// A hand-driven AMQP client over any stream.
struct Amqp<S> {
    stream: S,
    buffer: BytesMut,
    decoder: FrameDecoder,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Amqp<S> {
    fn over(stream: S) -> Amqp<S> {
        Amqp { stream, buffer: BytesMut::new(), decoder: FrameDecoder::new(frame::FRAME_MAX_LIMIT) }
    }

    async fn send_method(&mut self, channel: u16, method: AMQPClass) {
        let mut buffer = BytesMut::new();
        encode_method(&mut buffer, channel, &method).unwrap();
        self.stream.write_all(&buffer).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next method, or `None` once the server has closed the stream (or broken it off).
    async fn next_method(&mut self) -> Option<AMQPClass> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer).unwrap() {
                match frame {
                    Frame::Method { method, .. } => return Some(*method),
                    _ => continue,
                }
            }
            let read =
                tokio::time::timeout(HANG_GUARD, self.stream.read_buf(&mut self.buffer)).await.expect("server hung");
            if read.unwrap_or(0) == 0 {
                return None;
            }
        }
    }

    /// Sends the protocol header; the mechanisms `connection.start` offers, or `None` if the
    /// stream ended first.
    async fn start(&mut self) -> Option<String> {
        if self.stream.write_all(&frame::PROTOCOL_HEADER).await.is_err() || self.stream.flush().await.is_err() {
            return None;
        }
        match self.next_method().await? {
            AMQPClass::Connection(connection::AMQPMethod::Start(start)) => {
                Some(String::from_utf8(start.mechanisms.as_bytes().to_vec()).unwrap())
            }
            other => panic!("expected connection.start, got {other:?}"),
        }
    }

    /// The rest of the handshake after `start`; the `connection.close` if the server refused.
    async fn login(&mut self, mechanism: &str, response: &[u8]) -> Result<(), connection::Close> {
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: crate::bad_input::modern_client_properties(&[]),
                mechanism: mechanism.into(),
                response: response.to_vec().into(),
                locale: "en_US".into(),
            })),
        )
        .await;
        match self.next_method().await {
            Some(AMQPClass::Connection(connection::AMQPMethod::Tune(_))) => {}
            Some(AMQPClass::Connection(connection::AMQPMethod::Close(close))) => return Err(close),
            other => panic!("unexpected {other:?}"),
        }
        let tune_ok = connection::TuneOk { channel_max: 16, frame_max: FRAME_MIN_SIZE, heartbeat: 0 };
        self.send_method(0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok))).await;
        let open = connection::Open { virtual_host: "/".into() };
        self.send_method(0, AMQPClass::Connection(connection::AMQPMethod::Open(open))).await;
        match self.next_method().await {
            Some(AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
        self.send_method(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await;
        match self.next_method().await {
            Some(AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) => Ok(()),
            other => panic!("expected channel.open-ok, got {other:?}"),
        }
    }

    /// Declares `name` on channel 1 and returns the name the broker answered with: a full round
    /// trip through the broker on this connection.
    async fn declare(&mut self, name: &str) -> String {
        let declare = queue::Declare { queue: name.into(), auto_delete: true, ..Default::default() };
        self.send_method(1, AMQPClass::Queue(queue::AMQPMethod::Declare(declare))).await;
        match self.next_method().await {
            Some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok))) => ok.queue.as_str().to_owned(),
            other => panic!("expected queue.declare-ok, got {other:?}"),
        }
    }
}

/// Connects, logs in with PLAIN as guest and declares a queue; returns the client.
async fn guest_over_tls(client: &Client, address: SocketAddr) -> Amqp<TlsStream<TcpStream>> {
    let mut amqp = Amqp::over(client.connect(address).await.unwrap());
    let mechanisms = amqp.start().await.unwrap();
    assert!(!mechanisms.contains("EXTERNAL"), "EXTERNAL is offered only with a client certificate: {mechanisms}");
    amqp.login("PLAIN", b"\0guest\0guest").await.unwrap();
    assert_eq!(amqp.declare("tls.works").await, "tls.works");
    amqp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_serve_amqp_and_plain_amqp_stays_on_its_own_port() {
    let broker = TlsBroker::start(false, false, |_| {}).await;
    const TLS_1_3: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    const TLS_1_2: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    for (versions, expected) in
        [(TLS_1_3, rustls::ProtocolVersion::TLSv1_3), (TLS_1_2, rustls::ProtocolVersion::TLSv1_2)]
    {
        let client = Client { versions, ..Client::trusting(&broker.authority) };
        let amqp = guest_over_tls(&client, broker.amqps()).await;
        assert_eq!(amqp.stream.get_ref().1.protocol_version(), Some(expected));
    }
    let plain = broker.broker.connect().await;
    assert!(plain.create_channel().await.is_ok(), "the plain listener still serves lapin");
    broker.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_amqp_on_the_tls_port_gets_no_amqp_bytes() {
    let broker = TlsBroker::start(false, false, |_| {}).await;
    let mut socket = TcpStream::connect(broker.amqps()).await.unwrap();
    socket.write_all(&frame::PROTOCOL_HEADER).await.unwrap();
    let mut reply = Vec::new();
    // The server closes the socket (a reset counts as closed too).
    let _ = tokio::time::timeout(HANG_GUARD, socket.read_to_end(&mut reply)).await.expect("the server kept the socket");
    assert!(!reply.windows(4).any(|window| window == b"AMQP"), "no AMQP protocol header: {reply:?}");
    // At most a TLS alert record (content type 21) says why; never a frame or a header.
    assert!(reply.is_empty() || reply[0] == 21, "only a TLS alert, if anything: {reply:?}");
    broker.broker.stop().await;
}

/// A ClientHello offering `version` at most (as client_version, with no supported_versions
/// extension), written out by hand since no client at hand still speaks TLS 1.1. Everything else
/// in it does for TLS 1.2 with the test's ECDSA certificate (a GCM suite and the signature scheme
/// it needs), so with 1.1 the version is the only reason left to refuse it.
fn client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut hello = version.to_vec(); // client_version
    hello.extend([7u8; 32]); // random
    hello.push(0); // no session id
    hello.extend([0x00, 0x04, 0xC0, 0x2B, 0xC0, 0x13]); // ECDHE-ECDSA-AES128-GCM, ECDHE-RSA-AES128-CBC
    hello.extend([0x01, 0x00]); // compression: null
    // Extensions: signature_algorithms = [ecdsa_secp256r1_sha256]; supported_groups = [x25519].
    let extensions = [0x00, 0x0D, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03, 0x00, 0x0A, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1D];
    hello.extend(u16::try_from(extensions.len()).unwrap().to_be_bytes());
    hello.extend(extensions);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend(u16::try_from(hello.len()).unwrap().to_be_bytes());
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend(u16::try_from(handshake.len()).unwrap().to_be_bytes());
    record.extend(handshake);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_1_is_refused_with_a_protocol_version_alert() {
    let broker = TlsBroker::start(false, false, |_| {}).await;
    // The same hello offering TLS 1.2 gets a ServerHello: a handshake record (22).
    let mut socket = TcpStream::connect(broker.amqps()).await.unwrap();
    socket.write_all(&client_hello([0x03, 0x03])).await.unwrap();
    let mut first = [0u8; 1];
    tokio::time::timeout(HANG_GUARD, socket.read_exact(&mut first)).await.expect("no answer").unwrap();
    assert_eq!(first, [22]);

    let mut socket = TcpStream::connect(broker.amqps()).await.unwrap();
    socket.write_all(&client_hello([0x03, 0x02])).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, socket.read_to_end(&mut reply)).await.expect("the server kept the socket");
    // An alert record (21), fatal (2), protocol_version (70); no ServerHello.
    assert!(reply.len() >= 7, "{reply:?}");
    assert_eq!((reply[0], reply[5], reply[6]), (21, 2, 70), "{reply:?}");
    broker.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_logs_in_with_external_as_the_certificates_common_name() {
    let broker = TlsBroker::start(true, true, |config| {
        config.users.push(User::with_password("orders", "a password EXTERNAL never asks for", false));
        config.grant_full_access("orders");
    })
    .await;
    let orders = Client::trusting(&broker.authority).with_certificate(broker.authority.client("orders"));
    let mut amqp = Amqp::over(orders.connect(broker.amqps()).await.unwrap());
    let mechanisms = amqp.start().await.unwrap();
    assert!(mechanisms.split(' ').any(|mechanism| mechanism == "EXTERNAL"), "{mechanisms}");
    amqp.login("EXTERNAL", b"").await.unwrap();
    assert_eq!(amqp.declare("orders.inbox").await, "orders.inbox");

    // A verified certificate of a user the broker does not know: refused like a bad password.
    let stranger = Client::trusting(&broker.authority).with_certificate(broker.authority.client("stranger"));
    let mut amqp = Amqp::over(stranger.connect(broker.amqps()).await.unwrap());
    amqp.start().await.unwrap();
    let refused = amqp.login("EXTERNAL", b"").await.unwrap_err();
    assert_eq!(refused.reply_code, 403);
    assert_eq!(
        refused.reply_text.as_str(),
        "ACCESS_REFUSED - Login was refused using authentication mechanism EXTERNAL"
    );

    // PLAIN still works for a client with a certificate.
    let mut amqp = Amqp::over(orders.connect(broker.amqps()).await.unwrap());
    amqp.start().await.unwrap();
    amqp.login("PLAIN", b"\0guest\0guest").await.unwrap();
    // Gone before the stop, which would otherwise wait for their close-ok.
    drop(amqp);
    broker.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_verify_peer_a_client_without_a_trusted_certificate_gets_no_amqp() {
    let broker = TlsBroker::start(true, true, |_| {}).await;
    // No certificate at all. In TLS 1.3 the client finishes its side of the handshake before
    // the server refuses, so the refusal shows as the stream ending before `connection.start`.
    let anonymous = Client::trusting(&broker.authority);
    if let Ok(stream) = anonymous.connect(broker.amqps()).await {
        assert_eq!(Amqp::over(stream).start().await, None, "no connection.start without a certificate");
    }
    // A certificate from another CA.
    let other = Authority::new("Some other CA");
    let forged = Client::trusting(&broker.authority).with_certificate(other.client("guest"));
    if let Ok(stream) = forged.connect(broker.amqps()).await {
        assert_eq!(Amqp::over(stream).start().await, None, "no connection.start with an untrusted certificate");
    }
    // The trusted one gets in, so the refusals above were about the certificates.
    let trusted = Client::trusting(&broker.authority).with_certificate(broker.authority.client("guest"));
    let mut amqp = Amqp::over(trusted.connect(broker.amqps()).await.unwrap());
    amqp.start().await.unwrap();
    amqp.login("EXTERNAL", b"").await.unwrap();
    drop(amqp);
    broker.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_ca_but_no_verify_peer_client_certificates_are_optional() {
    let broker = TlsBroker::start(false, true, |_| {}).await;
    guest_over_tls(&Client::trusting(&broker.authority), broker.amqps()).await;
    let guest = Client::trusting(&broker.authority).with_certificate(broker.authority.client("guest"));
    let mut amqp = Amqp::over(guest.connect(broker.amqps()).await.unwrap());
    assert!(amqp.start().await.unwrap().contains("EXTERNAL"));
    amqp.login("EXTERNAL", b"").await.unwrap();
    drop(amqp);
    broker.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_certificates_serve_new_handshakes_while_open_connections_keep_going() {
    let broker = TlsBroker::start(false, false, |_| {}).await;
    let first = broker.authority.certificate.clone();
    let next_authority = Authority::new("Wharf test CA, rotated");
    let client =
        Client { roots: vec![first, next_authority.certificate.clone()], ..Client::trusting(&broker.authority) };
    let mut before = guest_over_tls(&client, broker.amqps()).await;
    let old_certificate = before.stream.get_ref().1.peer_certificates().unwrap()[0].clone();

    let rotated = broker.files.write(&next_authority);
    broker.broker.broker().reload_tls().unwrap();
    let after = guest_over_tls(&client, broker.amqps()).await;
    assert_eq!(after.stream.get_ref().1.peer_certificates().unwrap()[0], rotated, "a new handshake sees the new one");
    assert_ne!(rotated, old_certificate);
    assert_eq!(before.declare("still.open").await, "still.open", "the connection from before the reload goes on");

    // A reload that cannot be used keeps what is in force, and says why.
    std::fs::write(&broker.files.key, "not a key\n").unwrap();
    let error = broker.broker.broker().reload_tls().unwrap_err().to_string();
    assert!(error.contains("tls_key") && error.contains("server.key") && error.contains("no private key"), "{error}");
    let again = guest_over_tls(&client, broker.amqps()).await;
    assert_eq!(again.stream.get_ref().1.peer_certificates().unwrap()[0], rotated);
    drop((before, after, again));
    broker.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_socket_holds_a_handshake_slot_only_until_the_handshake_timeout() {
    // The slot: with one handshake slot, a silent socket on the TLS port leaves none for the next.
    let broker = TlsBroker::start(false, false, |config| config.handshakes_max = 1).await;
    let silent = TcpStream::connect(broker.amqps()).await.unwrap();
    let client = Client::trusting(&broker.authority);
    assert!(client.connect(broker.amqps()).await.is_err(), "closed at accept: every handshake slot is taken");
    drop(silent);
    broker.broker.stop().await;

    // The timeout: the server closes a socket that never finishes its TLS handshake, and its
    // slot is free again.
    let broker = TlsBroker::start(false, false, |config| {
        config.handshakes_max = 1;
        // Long enough for a real client's TLS handshake, which must still fit in it below.
        config.handshake_timeout_ms = 1_000;
    })
    .await;
    let mut silent = TcpStream::connect(broker.amqps()).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(HANG_GUARD, silent.read_to_end(&mut reply)).await.expect("never closed");
    assert!(reply.is_empty(), "{reply:?}");
    let connected = Client::trusting(&broker.authority).connect(broker.amqps()).await;
    assert!(connected.is_ok(), "the slot was freed: {connected:?}");
    broker.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_serves_tls_and_local_addr_is_the_tls_listener() {
    let broker = TlsBroker::start(false, false, |config| config.plain_amqp = false).await;
    assert_eq!(broker.broker.broker().local_addr(), broker.amqps());
    guest_over_tls(&Client::trusting(&broker.authority), broker.amqps()).await;
    broker.broker.stop().await;
}

#[test]
fn unusable_tls_settings_are_refused_naming_the_setting_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let files = Files::in_dir(dir.path());
    let authority = Authority::new("Wharf test CA");
    files.write(&authority);
    let refused = |change: &dyn Fn(&mut TlsConfig)| {
        let mut config = BrokerConfig::new(dir.path().join("data"));
        let mut tls = files.tls(false, true);
        change(&mut tls);
        config.tls = Some(tls);
        config.validate().unwrap_err().0
    };
    let missing = dir.path().join("missing.pem");
    let text = refused(&|tls| tls.cert_path = missing.clone());
    assert!(text.starts_with("tls_cert: cannot read") && text.contains("missing.pem"), "{text}");
    let text = refused(&|tls| tls.key_path = files.cert.clone());
    assert!(text.starts_with("tls_key:") && text.contains("server.pem holds no private key"), "{text}");
    let text = refused(&|tls| tls.cert_path = files.key.clone());
    assert!(text.starts_with("tls_cert:") && text.contains("holds no certificate"), "{text}");
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let text = refused(&|tls| tls.key_path = other_key.clone());
    assert!(text.contains("other.key does not belong to the certificate in"), "{text}");
    let text = refused(&|tls| {
        tls.ca_cert_path = None;
        tls.verify_peer = true;
    });
    assert!(text.starts_with("tls_verify_peer needs tls_ca_cert"), "{text}");
    let text = refused(&|tls| tls.ca_cert_path = Some(missing.clone()));
    assert!(text.starts_with("tls_ca_cert: cannot read"), "{text}");

    let mut no_listener = BrokerConfig::new(dir.path().join("data"));
    no_listener.plain_amqp = false;
    assert!(no_listener.validate().unwrap_err().0.contains("plain AMQP is off and TLS is not configured"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_publishes_and_subscribes_with_the_amqps_certificate() {
    use wharf_mqtt::{
        Ack, Connect, Decoder, Packet, Properties, Publish, QoS, Subscribe, Subscription, SubscriptionOptions, Version,
    };
    let broker = TlsBroker::start(false, false, |config| {
        config.mqtt.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let address = broker.broker.broker().mqtts_local_addr().expect("an MQTTS listener");
    let client = Client::trusting(&broker.authority);
    let mut stream = client.connect(address).await.unwrap();
    let mut decoder = Decoder::new(1 << 20);
    decoder.set_version(Version::V311);
    let mut buffer = BytesMut::new();
    let mut exchange = async |packet: Packet, stream: &mut TlsStream<TcpStream>| -> Packet {
        let mut bytes = BytesMut::new();
        wharf_mqtt::encode(&packet, Version::V311, &mut bytes);
        stream.write_all(&bytes).await.unwrap();
        loop {
            if let Some(packet) = decoder.decode(&mut buffer).unwrap() {
                return packet;
            }
            let read = tokio::time::timeout(HANG_GUARD, stream.read_buf(&mut buffer)).await.unwrap().unwrap();
            assert!(read > 0, "the broker closed the TLS connection");
        }
    };
    let connect = Packet::Connect(Box::new(Connect {
        version: Version::V311,
        client_id: "tls-device".into(),
        clean_start: true,
        keep_alive_s: 30,
        username: Some("guest".into()),
        password: Some(bytes::Bytes::from_static(b"guest")),
        will: None,
        properties: Properties::default(),
    }));
    assert!(matches!(exchange(connect, &mut stream).await, Packet::ConnAck(ack) if ack.reason == 0));
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: "secure/#".into(),
            options: SubscriptionOptions::qos(QoS::AtLeastOnce),
        }],
        properties: Properties::default(),
    });
    assert!(matches!(exchange(subscribe, &mut stream).await, Packet::SubAck(ack) if ack.reasons == vec![1]));
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "secure/reading".into(),
        packet_id: 7,
        properties: Properties::default(),
        payload: bytes::Bytes::from_static(b"42"),
    });
    // The PUBACK and the delivery come in either order.
    let first = exchange(publish, &mut stream).await;
    let second = loop {
        if let Some(packet) = decoder.decode(&mut buffer).unwrap() {
            break packet;
        }
        let read = tokio::time::timeout(HANG_GUARD, stream.read_buf(&mut buffer)).await.unwrap().unwrap();
        assert!(read > 0);
    };
    let (ack, delivery) = match (first, second) {
        (Packet::PubAck(ack), Packet::Publish(delivery)) | (Packet::Publish(delivery), Packet::PubAck(ack)) => {
            (ack, delivery)
        }
        other => panic!("expected a PUBACK and a PUBLISH, got {other:?}"),
    };
    assert_eq!(ack, Ack::new(7, 0));
    assert_eq!((delivery.topic.as_str(), &delivery.payload[..]), ("secure/reading", &b"42"[..]));
    broker.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_client_with_a_verified_certificate_logs_in_as_its_common_name_without_a_password() {
    use wharf_mqtt::{Connect, Decoder, Packet, Properties, Version};
    let broker = TlsBroker::start(true, true, |config| {
        config.users.push(User::with_password("meter-7", "a password the certificate replaces", false));
        config.grant_full_access("meter-7");
        config.mqtt.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let address = broker.broker.broker().mqtts_local_addr().expect("an MQTTS listener");
    let connack = async |common_name: &str, login: Option<(&str, &str)>| -> u8 {
        let client = Client::trusting(&broker.authority).with_certificate(broker.authority.client(common_name));
        let mut stream = client.connect(address).await.unwrap();
        let connect = Packet::Connect(Box::new(Connect {
            version: Version::V311,
            client_id: format!("{common_name}-device"),
            clean_start: true,
            keep_alive_s: 30,
            username: login.map(|(user, _)| user.to_owned()),
            password: login.map(|(_, password)| bytes::Bytes::copy_from_slice(password.as_bytes())),
            will: None,
            properties: Properties::default(),
        }));
        let mut bytes = BytesMut::new();
        wharf_mqtt::encode(&connect, Version::V311, &mut bytes);
        stream.write_all(&bytes).await.unwrap();
        let mut decoder = Decoder::new(1 << 20);
        decoder.set_version(Version::V311);
        let mut buffer = BytesMut::new();
        loop {
            if let Some(Packet::ConnAck(ack)) = decoder.decode(&mut buffer).unwrap() {
                return ack.reason;
            }
            let read = tokio::time::timeout(HANG_GUARD, stream.read_buf(&mut buffer)).await.unwrap().unwrap();
            assert!(read > 0, "closed without a CONNACK");
        }
    };
    assert_eq!(connack("meter-7", None).await, 0, "the certificate's common name is the user");
    // A certificate naming no user of the broker: refused as a bad user name (3.1.1 code 4,
    // which the codec reads as 5.0's 0x86).
    assert_eq!(connack("stranger", None).await, wharf_mqtt::reason::BAD_USER_NAME_OR_PASSWORD);
    // A user name and password still decide when given, certificate or not.
    assert_eq!(connack("stranger", Some(("guest", "guest"))).await, 0);
    assert_eq!(connack("meter-7", Some(("meter-7", "wrong"))).await, wharf_mqtt::reason::BAD_USER_NAME_OR_PASSWORD);
    broker.broker.stop().await;
}
