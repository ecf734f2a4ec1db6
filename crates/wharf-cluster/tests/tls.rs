//! TLS on the links: nodes whose certificates the cluster's CA signed link up and call each
//! other; a node with a certificate from another CA, or none, gets no link (either way); the
//! error says it is unreachable. Certificates are made by the test (rcgen).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use std::sync::Arc;
use wharf_cluster::{ClusterConfig, ClusterError, Handler, LinkTls, Transport};

/// A certificate authority that issues node certificates.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Authority { issuer: Issuer::new(params, key), pem }
    }

    /// A node's TLS: a certificate for 127.0.0.1 (server and client use) signed by this CA,
    /// trusting `trusted`'s certificates.
    fn node_tls(&self, trusted: &Authority) -> LinkTls {
        let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let certificate = params.signed_by(&key, &self.issuer).unwrap().pem();
        LinkTls::from_pem(certificate.as_bytes(), key.serialize_pem().as_bytes(), trusted.pem.as_bytes(), "test")
            .unwrap()
    }
}

fn echo(node: u64) -> Handler {
    Arc::new(move |_from, _service, payload| {
        Box::pin(async move { Ok(Bytes::from(format!("{node} got {}", String::from_utf8_lossy(&payload)))) })
    })
}

async fn start(node: u64, tls: Option<LinkTls>) -> Transport {
    let mut config = ClusterConfig::new(node, "127.0.0.1:0".parse().unwrap(), Vec::new()).unwrap();
    config.heartbeat_interval_ms = 0;
    config.tls = tls;
    Transport::start(&config, echo(node)).await.unwrap()
}

async fn link(from: &Transport, to: &Transport) {
    from.add_member(to.node_id(), to.local_addr().to_string()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_one_ca_link_over_tls_and_others_get_no_link() {
    let cluster_ca = Authority::new("wharf cluster CA");
    let other_ca = Authority::new("someone else's CA");
    let one = start(1, Some(cluster_ca.node_tls(&cluster_ca))).await;
    let two = start(2, Some(cluster_ca.node_tls(&cluster_ca))).await;
    link(&one, &two).await;
    link(&two, &one).await;
    let answer = one.call(2, 7, Bytes::from_static(b"over TLS")).await.unwrap();
    assert_eq!(answer, Bytes::from_static(b"2 got over TLS"));
    assert_eq!(two.call(1, 7, Bytes::from_static(b"back")).await.unwrap(), Bytes::from_static(b"1 got back"));

    // A node whose certificate another CA signed (it trusts the cluster's CA, so it would accept
    // the cluster's nodes): refused by them, both ways.
    let stranger = start(3, Some(other_ca.node_tls(&cluster_ca))).await;
    link(&stranger, &one).await;
    link(&one, &stranger).await;
    let refused = stranger.call(1, 7, Bytes::from_static(b"let me in")).await.unwrap_err();
    assert!(matches!(refused, ClusterError::Unreachable { node: 1, .. }), "{refused}");
    let refused = one.call(3, 7, Bytes::from_static(b"who are you")).await.unwrap_err();
    assert!(matches!(refused, ClusterError::Unreachable { node: 3, .. }), "{refused}");

    // A node without TLS gets no link to a TLS node either.
    let plain = start(4, None).await;
    link(&plain, &one).await;
    let refused = plain.call(1, 7, Bytes::from_static(b"plain")).await.unwrap_err();
    assert!(matches!(refused, ClusterError::Unreachable { node: 1, .. }), "{refused}");
    // The cluster's own link still works.
    assert_eq!(one.call(2, 7, Bytes::from_static(b"still")).await.unwrap(), Bytes::from_static(b"2 got still"));
    for node in [one, two, stranger, plain] {
        node.shutdown().await;
    }
}

#[test]
fn unusable_pem_is_refused_with_a_message_naming_the_files() {
    let ca = Authority::new("ca");
    let error = LinkTls::from_pem(b"not pem", b"", ca.pem.as_bytes(), "--cluster-tls-cert").unwrap_err();
    assert!(error.to_string().contains("--cluster-tls-cert: the certificate file holds no certificate"), "{error}");
    let error =
        LinkTls::from_pem(ca.pem.as_bytes(), b"no key here", ca.pem.as_bytes(), "--cluster-tls-key").unwrap_err();
    assert!(error.to_string().contains("--cluster-tls-key: the key is not usable"), "{error}");
}
