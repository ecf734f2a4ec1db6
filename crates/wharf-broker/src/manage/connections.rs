//! What the management interface knows of a client connection ([`ConnectionInfo`], registered
//! with the connection in `outbound::Connections`) and how it asks one to close: the connection's
//! frame loop watches `close_requested` and closes with 320 CONNECTION_FORCED and the reason, as
//! RabbitMQ's `DELETE /api/connections/{name}` does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::watch;
use wharf_wire::types::FieldTable;

/// What the handshake established, for [`ConnectionInfo::new`].
#[derive(Debug)]
pub(crate) struct ConnectionFacts {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    pub user: String,
    pub vhost: String,
    pub client_properties: FieldTable,
    pub auth_mechanism: String,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat_s: u16,
    pub connected_at_ms: u64,
}

/// A logged-in connection as the management interface shows it.
#[derive(Debug)]
pub(crate) struct ConnectionInfo {
    /// Its id in the registry (set when it is registered).
    pub id: AtomicU64,
    /// RabbitMQ's name for it: `peer -> local` (`127.0.0.1:53211 -> 127.0.0.1:5672`).
    pub name: String,
    pub facts: ConnectionFacts,
    /// Bytes read from its socket.
    received_bytes: AtomicU64,
    /// Set to the reason when someone asks it to close.
    close: watch::Sender<Option<String>>,
    /// A receiver made with the channel: its clones see a request made at any time after the
    /// connection was created, also one made before its frame loop started watching.
    close_seen: watch::Receiver<Option<String>>,
}

impl ConnectionInfo {
    pub fn new(facts: ConnectionFacts) -> ConnectionInfo {
        let (close, close_seen) = watch::channel(None);
        ConnectionInfo {
            id: AtomicU64::new(0),
            name: format!("{} -> {}", facts.peer, facts.local),
            facts,
            received_bytes: AtomicU64::new(0),
            close,
            close_seen,
        }
    }

    /// Counts bytes read from the socket.
    pub fn count_received(&self, bytes: usize) {
        self.received_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn received_bytes(&self) -> u64 {
        self.received_bytes.load(Ordering::Relaxed)
    }

    /// What the connection's frame loop watches: a reason appears when it must close.
    pub fn close_requested(&self) -> watch::Receiver<Option<String>> {
        self.close_seen.clone()
    }

    /// Asks the connection to close with 320 CONNECTION_FORCED and `reason`.
    pub fn request_close(&self, reason: &str) {
        self.close.send_replace(Some(reason.to_owned()));
    }

    /// The client's `connection_name` property, if it set one.
    pub fn client_provided_name(&self) -> Option<String> {
        match self.facts.client_properties.inner().get("connection_name") {
            Some(wharf_wire::types::AMQPValue::LongString(name)) => {
                Some(String::from_utf8_lossy(name.as_bytes()).into_owned())
            }
            Some(wharf_wire::types::AMQPValue::ShortString(name)) => Some(name.as_str().to_owned()),
            _ => None,
        }
    }
}
