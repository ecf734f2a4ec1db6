//! The binary's TLS settings: flags, `WHARF_*` variables and TOML keys make a TLS-only broker
//! with mutual TLS; SIGHUP reloads the certificates (a new handshake sees the new one, a
//! connection from before goes on), a reload that cannot be used keeps the old one; settings that
//! cannot work are refused with a message naming them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/ports.rs"]
mod ports;
use ports::free_port;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc::UnboundedReceiver;

/// A safety net so a broken binary fails the test instead of hanging it; never a timing claim.
const HANG_GUARD: Duration = Duration::from_secs(30);

struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
}

impl Authority {
    fn new() -> Authority {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "Wharf test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        Authority { pem: certificate.pem(), der: certificate.der().clone(), issuer: Issuer::new(params, key) }
    }

    /// Writes a new server certificate for 127.0.0.1 and its key; returns the certificate.
    fn write_server(&self, dir: &Path) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(dir.join("server.pem"), certificate.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        certificate.der().clone()
    }

    fn client(&self, common_name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (certificate.der().clone(), PrivateKeyDer::try_from(key.serialize_der()).unwrap())
    }

    /// A TLS connection with a client certificate for guest; returns it and the server's
    /// certificate as it presented it.
    async fn connect(
        &self,
        address: SocketAddr,
    ) -> (tokio_rustls::client::TlsStream<TcpStream>, CertificateDer<'static>) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let (certificate, key) = self.client("guest");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![certificate], key)
            .unwrap();
        let socket = TcpStream::connect(address).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let connect = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, socket);
        let stream = tokio::time::timeout(HANG_GUARD, connect).await.unwrap().unwrap();
        let server = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
        (stream, server)
    }
}

/// Sends the AMQP protocol header and reads `connection.start`; returns its mechanisms field's
/// neighbourhood as text (enough to see which mechanisms are offered).
async fn start(stream: &mut tokio_rustls::client::TlsStream<TcpStream>) -> String {
    stream.write_all(b"AMQP\0\0\x09\x01").await.unwrap();
    stream.flush().await.unwrap();
    let mut header = [0u8; 7];
    tokio::time::timeout(HANG_GUARD, stream.read_exact(&mut header)).await.unwrap().unwrap();
    assert_eq!(header[0], 1, "a method frame");
    let size = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    let mut payload = vec![0u8; size + 1];
    tokio::time::timeout(HANG_GUARD, stream.read_exact(&mut payload)).await.unwrap().unwrap();
    assert_eq!(&payload[..4], &[0, 10, 0, 10], "connection.start");
    String::from_utf8_lossy(&payload).into_owned()
}

/// Starts the binary and waits for its TLS listener; returns it and its log lines from then on.
async fn start_wharf(dir: &Path, amqps: SocketAddr) -> (Child, UnboundedReceiver<String>) {
    let config = dir.join("wharf.toml");
    std::fs::write(&config, "tls_verify_peer = true\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "none",
            "--amqp-listen",
            "none",
            "--amqps-listen",
            &amqps.to_string(),
        ])
        .arg("--config")
        .arg(&config)
        .arg("--tls-cert")
        .arg(dir.join("server.pem"))
        .env("WHARF_TLS_KEY", dir.join("server.key"))
        .env("WHARF_TLS_CA_CERT", dir.join("ca.pem"))
        .env("WHARF_DATA_DIR", dir.join("data"))
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines.next_line().await.unwrap().expect("wharf exited before it was ready");
        let plain = line.contains("accepting AMQP connections") && !line.contains("over TLS");
        assert!(!plain, "plain AMQP is off: {line}");
        if line.contains("accepting AMQP connections over TLS") {
            break;
        }
    }
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = sender.send(line);
        }
    });
    (child, receiver)
}

/// Waits for a log line containing `text`.
async fn log_line(log: &mut UnboundedReceiver<String>, text: &str) -> String {
    let wait = async {
        while let Some(line) = log.recv().await {
            if line.contains(text) {
                return line;
            }
        }
        panic!("wharf exited without logging {text:?}");
    };
    tokio::time::timeout(HANG_GUARD, wait).await.expect("the line never came")
}

async fn hangup(child: &Child) {
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_broker_with_mutual_tls_reloads_its_certificate_on_sighup() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let authority = Authority::new();
    std::fs::write(dir.join("ca.pem"), &authority.pem).unwrap();
    let first = authority.write_server(dir);
    let amqps = free_port();
    let (mut wharf, mut log) = start_wharf(dir, amqps).await;

    let (mut before, seen) = authority.connect(amqps).await;
    assert_eq!(seen, first);
    let rotated = authority.write_server(dir);
    hangup(&wharf).await;
    log_line(&mut log, "TLS certificates reloaded").await;
    let (mut after, seen) = authority.connect(amqps).await;
    assert_eq!(seen, rotated, "a handshake after SIGHUP sees the new certificate");
    // Both connections speak AMQP, the one from before the reload included, and a client with a
    // verified certificate is offered EXTERNAL.
    assert!(start(&mut before).await.contains("EXTERNAL"));
    assert!(start(&mut after).await.contains("EXTERNAL"));

    std::fs::write(dir.join("server.key"), "not a key\n").unwrap();
    hangup(&wharf).await;
    let failed = log_line(&mut log, "reloading TLS certificates failed").await;
    assert!(failed.contains("server.key"), "{failed}");
    let (_, seen) = authority.connect(amqps).await;
    assert_eq!(seen, rotated, "a reload that failed keeps the certificate in force");

    drop((before, after));
    wharf.start_kill().unwrap();
    wharf.wait().await.unwrap();
}

#[tokio::test]
async fn tls_settings_that_cannot_work_are_refused_naming_them() {
    let temp = tempfile::tempdir().unwrap();
    let refused = |args: &'static [&'static str]| {
        let data_dir = temp.path().join("data");
        async move {
            let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
                .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none"])
                .args(args)
                .env("WHARF_DATA_DIR", data_dir)
                .output()
                .await
                .unwrap();
            assert!(!output.status.success(), "{args:?} was accepted");
            String::from_utf8_lossy(&output.stderr).into_owned()
        }
    };
    let stderr = refused(&["--amqps-listen", "127.0.0.1:0"]).await;
    assert!(stderr.contains("needs --tls-cert and --tls-key"), "{stderr}");
    let stderr = refused(&["--tls-cert", "server.pem", "--tls-key", "server.key"]).await;
    assert!(stderr.contains("--amqps-listen (amqps_listen) is not"), "{stderr}");
    let stderr =
        refused(&["--amqps-listen", "127.0.0.1:0", "--tls-cert", "/no/such.pem", "--tls-key", "/no/such.key"]).await;
    assert!(stderr.contains("tls_cert: cannot read /no/such.pem"), "{stderr}");
    let stderr = refused(&["--amqp-listen", "none"]).await;
    assert!(stderr.contains("plain AMQP is off and TLS is not configured"), "{stderr}");
    let stderr = refused(&["--amqp-listen", "nowhere"]).await;
    assert!(stderr.contains("--amqp-listen") && stderr.contains("nor `none`"), "{stderr}");
}
