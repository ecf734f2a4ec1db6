//! Who the members are and where they listen, and the links' limits: what `wharf serve`'s
//! `--node-id`, `--cluster-listen` and `--cluster-node ID=ADDR` (and their TOML keys) become.

use crate::error::ClusterError;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// A node's id in the cluster (Raft's node id): any number but 0, unique in the cluster.
pub type NodeId = u64;

/// How long a call waits for its answer unless told otherwise.
pub const CALL_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// The largest frame a link takes unless told otherwise: room for a batch of the largest
/// messages (Raft appends carry message bodies).
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 256 * 1024 * 1024;
/// The smallest frame limit allowed: a frame's header and a small request must fit.
const FRAME_BYTES_MAX_MIN: u32 = 4 * 1024;
/// Most members a cluster may have (Raft groups of this size are already slow to commit).
const MEMBERS_MAX: usize = 64;

/// A node's place in its cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// Where this node accepts links from the others.
    pub listen: SocketAddr,
    /// Every initial member, this node included, with the address the others reach it at
    /// (`host:port`; a host name is looked up at each dial).
    pub nodes: BTreeMap<NodeId, String>,
    /// How long a call waits for its answer, in milliseconds.
    pub call_timeout_ms: u64,
    /// The largest frame a link sends or takes, in bytes.
    pub frame_bytes_max: u32,
    /// How often each link is checked with a ping when idle, in milliseconds (0: never).
    pub heartbeat_interval_ms: u64,
    /// TLS on every link, both ways (`None`: plain TCP).
    pub tls: Option<LinkTls>,
}

/// TLS on the links (mutual): a node presents its certificate when it accepts a link and when it
/// dials one, and takes the other end's only if the cluster's CA signed it; a dialer also checks
/// that the certificate names the host it dialed. Built by the broker from its
/// `--cluster-tls-*` files.
#[derive(Clone)]
pub struct LinkTls {
    /// For links other nodes open (requires and verifies their certificate).
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// For links this node opens (presents its certificate, verifies the other's).
    pub connector: tokio_rustls::TlsConnector,
}

impl LinkTls {
    /// Mutual TLS from PEM: this node's certificate chain (its own first) and private key, and
    /// the CA certificates that sign every node's. TLS 1.2 and 1.3 only, on ring (as the
    /// broker's other listeners). `what` names the files in errors.
    pub fn from_pem(chain: &[u8], key: &[u8], ca: &[u8], what: &str) -> Result<LinkTls, ClusterError> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let refuse = |text: String| ClusterError::Config(format!("{what}: {text}"));
        let chain = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| refuse(format!("the certificate is not valid PEM: {error}")))?;
        if chain.is_empty() {
            return Err(refuse("the certificate file holds no certificate".into()));
        }
        let key =
            PrivateKeyDer::from_pem_slice(key).map_err(|error| refuse(format!("the key is not usable: {error}")))?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca) {
            let certificate = certificate.map_err(|error| refuse(format!("the CA file is not valid PEM: {error}")))?;
            roots.add(certificate).map_err(|error| refuse(format!("a CA certificate is unusable: {error}")))?;
        }
        if roots.is_empty() {
            return Err(refuse("the CA file holds no certificate".into()));
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|error| refuse(format!("the CA cannot verify nodes: {error}")))?;
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .map_err(|error| refuse(error.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|error| refuse(format!("the certificate and key cannot be used: {error}")))?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|error| refuse(error.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|error| refuse(format!("the certificate and key cannot be used: {error}")))?;
        Ok(LinkTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }
}

impl std::fmt::Debug for LinkTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("LinkTls")
    }
}

impl ClusterConfig {
    /// A cluster of `nodes` seen from `node_id`, which listens on `listen`. This node may be
    /// among `nodes` (its address there is the one the others use) or not (then `listen` is
    /// its address). Checked: ids are not 0, there is at most [`MEMBERS_MAX`] of them.
    pub fn new(node_id: NodeId, listen: SocketAddr, nodes: Vec<(NodeId, String)>) -> Result<Self, ClusterError> {
        if node_id == 0 {
            return Err(ClusterError::Config("--node-id must not be 0".into()));
        }
        let mut members = BTreeMap::new();
        for (id, address) in nodes {
            if id == 0 {
                return Err(ClusterError::Config(format!("node id 0 in --cluster-node {id}={address}")));
            }
            if let Some(earlier) = members.insert(id, address.clone()) {
                return Err(ClusterError::Config(format!(
                    "node {id} is given twice in --cluster-node ({earlier} and {address})"
                )));
            }
        }
        members.entry(node_id).or_insert_with(|| listen.to_string());
        if members.len() > MEMBERS_MAX {
            return Err(ClusterError::Config(format!(
                "{} members are more than the {MEMBERS_MAX} a cluster may have",
                members.len()
            )));
        }
        Ok(ClusterConfig {
            node_id,
            listen,
            nodes: members,
            call_timeout_ms: CALL_TIMEOUT_MS_DEFAULT,
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            heartbeat_interval_ms: 1_000,
            tls: None,
        })
    }

    /// Checks the limits set after [`ClusterConfig::new`].
    pub fn validate(&self) -> Result<(), ClusterError> {
        if self.call_timeout_ms == 0 {
            return Err(ClusterError::Config("the cluster call timeout must be above 0 ms".into()));
        }
        if self.frame_bytes_max < FRAME_BYTES_MAX_MIN {
            return Err(ClusterError::Config(format!(
                "the cluster frame limit must be at least {FRAME_BYTES_MAX_MIN} bytes"
            )));
        }
        Ok(())
    }

    /// The other members, by id.
    pub fn peers(&self) -> impl Iterator<Item = (NodeId, &str)> {
        self.nodes.iter().filter(|(id, _)| **id != self.node_id).map(|(id, address)| (*id, address.as_str()))
    }
}

/// One `--cluster-node` value: `ID=HOST:PORT`.
pub fn parse_cluster_node(text: &str) -> Result<(NodeId, String), ClusterError> {
    let Some((id, address)) = text.split_once('=') else {
        return Err(ClusterError::Config(format!("--cluster-node {text:?} is not ID=HOST:PORT")));
    };
    let id: NodeId = id
        .trim()
        .parse()
        .map_err(|_| ClusterError::Config(format!("--cluster-node {text:?}: {id:?} is not a node id (a number)")))?;
    let address = address.trim();
    let port_ok = address.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok {
        return Err(ClusterError::Config(format!("--cluster-node {text:?}: {address:?} is not HOST:PORT")));
    }
    Ok((id, address.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_argument_is_an_id_and_an_address() {
        assert_eq!(parse_cluster_node("2=10.0.0.2:25672").unwrap(), (2, "10.0.0.2:25672".to_owned()));
        assert_eq!(parse_cluster_node("3=node-3.local:25672").unwrap(), (3, "node-3.local:25672".to_owned()));
        assert_eq!(parse_cluster_node("4=[::1]:25672").unwrap(), (4, "[::1]:25672".to_owned()));
        for bad in ["2", "two=10.0.0.2:1", "2=10.0.0.2", "2=10.0.0.2:port", "2=:25672", "-1=a:1"] {
            let error = parse_cluster_node(bad).unwrap_err().to_string();
            assert!(error.contains("--cluster-node"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_members_include_this_node_and_ids_are_unique() {
        let listen: SocketAddr = "127.0.0.1:25672".parse().unwrap();
        let config = ClusterConfig::new(1, listen, vec![(2, "b:1".into()), (3, "c:1".into())]).unwrap();
        assert_eq!(config.nodes.get(&1).map(String::as_str), Some("127.0.0.1:25672"));
        assert_eq!(config.peers().map(|(id, _)| id).collect::<Vec<_>>(), vec![2, 3]);
        let listed = ClusterConfig::new(1, listen, vec![(1, "a.example:25672".into())]).unwrap();
        assert_eq!(listed.nodes[&1], "a.example:25672", "its own entry is the address others use");
        let twice = ClusterConfig::new(1, listen, vec![(2, "b:1".into()), (2, "c:1".into())]).unwrap_err();
        assert!(twice.to_string().contains("node 2 is given twice"), "{twice}");
        assert!(ClusterConfig::new(0, listen, vec![]).unwrap_err().to_string().contains("--node-id"));
        assert!(ClusterConfig::new(1, listen, vec![(0, "z:1".into())]).is_err());
        let mut limits = ClusterConfig::new(1, listen, vec![]).unwrap();
        limits.frame_bytes_max = 10;
        assert!(limits.validate().unwrap_err().to_string().contains("frame limit"));
    }
}
