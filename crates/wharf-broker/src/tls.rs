//! AMQP over TLS: the server's rustls configuration built from PEM files (TLS 1.2 and 1.3 only;
//! client certificates verified against a CA when one is configured, required with
//! `verify_peer`), swapped whole when the files are reloaded, and the TLS handshake of an
//! accepted socket, inside the same handshake slot and deadline as the AMQP handshake that
//! follows it.
//!
//! Why the pieces are where they are is in `docs/design/20261203_tls.md`.

use crate::config::{ConfigError, TlsConfig};
use crate::connection;
use crate::core::Core;
use crate::outbound::HandshakeSlot;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// The protocol versions offered: TLS 1.0 and 1.1 are broken and rustls has neither anyway; the
/// list is explicit so that a future default cannot widen it unnoticed.
pub(crate) const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn refuse<T>(text: String) -> Result<T, ConfigError> {
    Err(ConfigError(text))
}

fn read(setting: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).or_else(|error| refuse(format!("{setting}: cannot read {}: {error}", path.display())))
}

/// Every certificate in a PEM file; refused if it holds none.
fn read_certificates(setting: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bytes = read(setting, path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .or_else(|error| refuse(format!("{setting}: {} is not valid PEM: {error}", path.display())))?;
    if certificates.is_empty() {
        return refuse(format!("{setting}: {} holds no certificate (no PEM `CERTIFICATE` block)", path.display()));
    }
    Ok(certificates)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let bytes = read("tls_key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).or_else(|error| {
        let reason = match error {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "holds no private key (no PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)".to_owned()
            }
            other => format!("is not valid PEM: {other}"),
        };
        refuse(format!("tls_key: {} {reason}", path.display()))
    })
}

/// Builds the server's TLS configuration from the files `config` names, with a clear error
/// naming the setting, the file and the problem when one cannot be used.
pub(crate) fn server_config(config: &TlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    if config.verify_peer && config.ca_cert_path.is_none() {
        return refuse("tls_verify_peer needs tls_ca_cert: the CA certificates to verify clients against".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_certificates("tls_cert", &config.cert_path)?;
    let key = read_key(&config.key_path)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .or_else(|error| refuse(format!("TLS: {error}")))?;
    let builder = match &config.ca_cert_path {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, config.verify_peer, &provider)?),
    };
    let server = builder.with_single_cert(chain, key).or_else(|error| {
        let (cert, key) = (config.cert_path.display(), config.key_path.display());
        refuse(match error {
            rustls::Error::InconsistentKeys(_) => {
                format!("tls_key: the key in {key} does not belong to the certificate in {cert}")
            }
            other => format!("tls_cert/tls_key: {cert} and {key} cannot be used: {other}"),
        })
    })?;
    Ok(Arc::new(server))
}

fn client_verifier(
    path: &Path,
    required: bool,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, ConfigError> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates("tls_ca_cert", path)? {
        roots.add(certificate).or_else(|error| {
            refuse(format!("tls_ca_cert: {} holds an unusable certificate: {error}", path.display()))
        })?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    // Without verify_peer a certificate is optional, but one that is presented is still verified:
    // EXTERNAL trusts only a verified one (RabbitMQ's `fail_if_no_peer_cert = false`).
    let builder = if required { builder } else { builder.allow_unauthenticated() };
    builder.build().or_else(|error| refuse(format!("tls_ca_cert: {}: {error}", path.display())))
}

/// The TLS settings in force: new handshakes take the current ones; [`ServerTls::reload`] swaps
/// them whole, so a connection keeps the settings it was accepted with (and stays open).
#[derive(Debug)]
pub(crate) struct ServerTls {
    config: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    pub(crate) fn load(config: TlsConfig) -> Result<ServerTls, ConfigError> {
        let current = RwLock::new(server_config(&config)?);
        Ok(ServerTls { config, current })
    }

    pub(crate) fn listen_address(&self) -> SocketAddr {
        self.config.amqps_listen
    }

    /// An acceptor with the settings in force now.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        let current = self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        TlsAcceptor::from(Arc::clone(&current))
    }

    /// Reads the files again and, if they can be used, puts them in force for new handshakes.
    /// If not, the settings in force stay, and the error says why.
    pub(crate) fn reload(&self) -> Result<(), ConfigError> {
        let fresh = server_config(&self.config)?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        Ok(())
    }
}

/// A finished TLS handshake: the stream, the local address, and the client's certificate.
/// rustls hands over a client certificate only once it verified it against the configured CA
/// (and asks for none without a CA), so a certificate here is a verified one.
pub(crate) struct Accepted {
    pub stream: tokio_rustls::server::TlsStream<TcpStream>,
    /// The handshake slot, still held for the protocol's handshake.
    pub handshake_slot: HandshakeSlot,
    pub local: SocketAddr,
    pub client_certificate: Option<CertificateDer<'static>>,
}

/// The TLS handshake of a socket accepted on a TLS listener (AMQPS or MQTTS), within `deadline`
/// (the protocol's handshake, which follows, gets only what time is left). `None` if it failed,
/// timed out or the broker is shutting down (logged); the slot is then free before the socket
/// closes, so a peer that sees the close can count on the slot being there for its next attempt.
pub(crate) async fn handshake(
    socket: TcpStream,
    handshake_slot: HandshakeSlot,
    peer: SocketAddr,
    shutdown: &mut watch::Receiver<bool>,
    acceptor: TlsAcceptor,
    deadline: tokio::time::Instant,
) -> Option<Accepted> {
    let _ = socket.set_nodelay(true);
    let accept = tokio::time::timeout_at(deadline, acceptor.accept(socket));
    tokio::pin!(accept);
    let accepted = tokio::select! {
        accepted = &mut accept => accepted,
        _ = shutdown.changed() => return None,
    };
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        failed => {
            match failed {
                Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake failed"),
                _ => tracing::info!(%peer, "TLS handshake timed out"),
            }
            drop(handshake_slot);
            return None;
        }
    };
    let (socket, session) = stream.get_ref();
    let local = socket.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let client_certificate =
        session.peer_certificates().and_then(|chain| chain.first()).map(|c| c.clone().into_owned());
    tracing::debug!(%peer, version = ?session.protocol_version(), client_certificate = client_certificate.is_some(), "TLS handshake done");
    Some(Accepted { stream, handshake_slot, local, client_certificate })
}

/// Serves one socket accepted on the TLS listener: the TLS handshake, then the AMQP connection
/// over it. The TLS handshake counts against the handshake slot and `handshake_timeout_ms` like
/// the AMQP handshake, which gets only what time is left, so a silent or slow socket cannot hold
/// a slot longer on this port than on the plain one.
pub(crate) async fn serve(
    core: Arc<Core>,
    socket: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
    handshake_slot: HandshakeSlot,
    acceptor: TlsAcceptor,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(core.config.handshake_timeout_ms);
    let Some(Accepted { stream, handshake_slot, local, client_certificate }) =
        handshake(socket, handshake_slot, peer, &mut shutdown, acceptor, deadline).await
    else {
        return;
    };
    let (reader, writer) = tokio::io::split(stream);
    let transport = connection::Transport { deadline, client_certificate, local, tls: true };
    connection::serve(core, reader, writer, peer, shutdown, handshake_slot, transport).await;
}
