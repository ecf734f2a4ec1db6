//! MQTT client ids in use, by vhost: a client id has one connection at a time. A second CONNECT
//! with the same id takes the session over: the first connection is asked to close (5.0: DISCONNECT
//! 0x8E), and the new one waits until it has let go of the session's queue before it goes on.

use crate::manage::ConnectionInfo;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a connection holding a client id is asked to close with when another takes it over.
pub(super) const TAKEN_OVER: &str = "MQTT session taken over by a new connection with the same client id";

/// How long a new connection waits for the one it takes over from to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// A client id's holder: its connection (to ask it to close) and a lock it holds while open.
#[derive(Debug)]
struct Holder {
    info: Arc<ConnectionInfo>,
    held: Arc<tokio::sync::Mutex<()>>,
}

/// The client ids in use.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    holders: Mutex<HashMap<(String, String), Holder>>,
    /// The packet-id state of sessions between connections (see [`Kept`]), until they expire.
    /// In memory: `docs/design/20261204_mqtt.md` says what a broker restart does to it.
    kept: Mutex<HashMap<(String, String), (Kept, std::time::Instant)>>,
}

/// A client id held by a connection; gives it up when dropped.
#[derive(Debug)]
pub(super) struct ClientLease<'a> {
    clients: &'a Clients,
    key: (String, String),
    info: Arc<ConnectionInfo>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for ClientLease<'_> {
    fn drop(&mut self) {
        let mut holders = self.clients.holders.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Only if it is still ours: a connection that took over may have replaced it already.
        if holders.get(&self.key).is_some_and(|holder| Arc::ptr_eq(&holder.info, &self.info)) {
            holders.remove(&self.key);
        }
    }
}

impl Clients {
    /// Takes `client_id` in `vhost` for the connection `info`: a connection holding it is asked
    /// to close, and this waits (bounded) until it has. `None` if it did not let go in time.
    pub(super) async fn take(
        &self,
        vhost: &str,
        client_id: &str,
        info: Arc<ConnectionInfo>,
    ) -> Option<ClientLease<'_>> {
        let key = (vhost.to_owned(), client_id.to_owned());
        let held = Arc::new(tokio::sync::Mutex::new(()));
        // Locked before anyone can see it, so a later taker waits for this connection.
        let guard = Arc::clone(&held).try_lock_owned().ok()?;
        let previous = {
            let mut holders = self.holders.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            holders.insert(key.clone(), Holder { info: Arc::clone(&info), held })
        };
        let lease = ClientLease { clients: self, key, info, _guard: guard };
        if let Some(previous) = previous {
            previous.info.request_close(TAKEN_OVER);
            tokio::time::timeout(TAKEOVER_WAIT, previous.held.lock_owned()).await.ok()?;
        }
        Some(lease)
    }
}

/// Most sessions whose packet-id state is kept between connections; beyond it the state of a
/// session that disconnects is not kept (its QoS 2 flows then behave as after a restart).
const KEPT_SESSIONS_MAX: usize = 100_000;

/// What a persistent session keeps between its connections besides its queue: the packet ids of
/// unfinished QoS 2 flows both ways, and where packet ids go on.
#[derive(Debug, Default, Clone)]
pub(super) struct Kept {
    /// QoS 2 publishes from the client whose PUBREL has not come.
    pub incoming_qos_2: HashSet<u16>,
    /// QoS 2 deliveries the client received (PUBREC) whose PUBCOMP has not come: their PUBREL
    /// is sent again when the session resumes.
    pub released: HashSet<u16>,
    /// The next packet id for a delivery (so ids the client may still hold are not reused soon).
    pub next_packet_id: u16,
}

impl Kept {
    pub fn is_empty(&self) -> bool {
        self.incoming_qos_2.is_empty() && self.released.is_empty()
    }
}

impl Clients {
    /// What a session kept between connections (nothing once it expired).
    pub(super) fn take_kept(&self, vhost: &str, client_id: &str, now: std::time::Instant) -> Kept {
        let mut kept = self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match kept.remove(&(vhost.to_owned(), client_id.to_owned())) {
            Some((state, expires_at)) if expires_at > now => state,
            _ => Kept::default(),
        }
    }

    /// Keeps a session's state until it resumes or `expires_at`.
    pub(super) fn keep(&self, vhost: &str, client_id: &str, state: Kept, expires_at: std::time::Instant) {
        let mut kept = self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (vhost.to_owned(), client_id.to_owned());
        if state.is_empty() {
            kept.remove(&key);
            return;
        }
        if kept.len() >= KEPT_SESSIONS_MAX && !kept.contains_key(&key) {
            let now = std::time::Instant::now();
            kept.retain(|_, (_, expires_at)| *expires_at > now);
            if kept.len() >= KEPT_SESSIONS_MAX {
                tracing::warn!(%vhost, %client_id, "MQTT session state not kept: {KEPT_SESSIONS_MAX} sessions hold some");
                return;
            }
        }
        kept.insert(key, (state, expires_at));
    }
}
