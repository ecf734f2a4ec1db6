//! The management API over TLS with the broker's own certificate settings: a client that trusts
//! the broker's CA gets its answers; one that does not fails the handshake; without TLS settings
//! the API over TLS refuses to start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wharf_broker::{Broker, BrokerConfig, TlsConfig};
use wharf_http::{HttpError, HttpServer};

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = text.as_bytes().chunks(64).map(|line| std::str::from_utf8(line).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

/// A CA certificate, and a server certificate and key for 127.0.0.1 it signed, written as PEM.
fn certificates(dir: &std::path::Path) -> CertificateDer<'static> {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "Wharf API test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = params.self_signed(&ca_key).unwrap().der().clone();
    let issuer = Issuer::new(params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".into()]).unwrap().signed_by(&server_key, &issuer).unwrap();
    std::fs::write(dir.join("server.pem"), pem("CERTIFICATE", server.der())).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    ca
}

/// One HTTP/1.1 request over TLS, trusting `root`; the whole response as text.
async fn get_over_tls(
    address: std::net::SocketAddr,
    root: CertificateDer<'static>,
    path: &str,
) -> std::io::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let socket = tokio::net::TcpStream::connect(address).await?;
    let mut stream = connector.connect(ServerName::try_from("127.0.0.1").unwrap(), socket).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_over_tls_with_the_brokers_certificate() {
    let temp = tempfile::tempdir().unwrap();
    let ca = certificates(temp.path());
    let mut config = BrokerConfig::new(temp.path().join("data"));
    config.amqp_listen = "127.0.0.1:0".parse().unwrap();
    config.tls = Some(TlsConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        temp.path().join("server.pem"),
        temp.path().join("server.key"),
    ));
    let broker = Broker::start(config).await.unwrap();
    let https = HttpServer::start_tls("127.0.0.1:0".parse().unwrap(), broker.management()).await.unwrap();

    let response = get_over_tls(https.local_addr(), ca.clone(), "/api/whoami").await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("{\"name\":\"guest\",\"tags\":[\"administrator\"]}"), "{response}");

    // A client that does not trust the broker's CA cannot complete the handshake.
    let other = tempfile::tempdir().unwrap();
    let stranger = certificates(other.path());
    assert!(get_over_tls(https.local_addr(), stranger, "/api/whoami").await.is_err());
    // The listener still serves trusting clients after a failed handshake.
    let again = get_over_tls(https.local_addr(), ca, "/api/overview?columns=product_name").await.unwrap();
    assert!(again.ends_with("{\"product_name\":\"Wharf\"}"), "{again}");
    https.shutdown().await;
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_tls_needs_the_brokers_tls_settings() {
    let temp = tempfile::tempdir().unwrap();
    let mut config = BrokerConfig::new(temp.path().join("data"));
    config.amqp_listen = "127.0.0.1:0".parse().unwrap();
    let broker = Broker::start(config).await.unwrap();
    let refused = HttpServer::start_tls("127.0.0.1:0".parse().unwrap(), broker.management()).await;
    assert!(matches!(refused, Err(HttpError::NoTls)));
    broker.shutdown().await;
}
