//! MQTT client ids in use, by vhost: a client id has one connection at a time. A second CONNECT
//! with the same id takes the session over: the first connection is asked to close (5.0: DISCONNECT
//! 0x8E), and the new one waits until it has let go of the session's queue before it goes on.

use crate::manage::ConnectionInfo;
use std::collections::HashMap;
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
    /// Some session subscribed with no-local since start: from then on MQTT publishes carry
    /// their client id (`convert.rs`), so a session can leave out its own. Never cleared; a
    /// broker that never sees no-local adds nothing to any message.
    no_local_seen: std::sync::atomic::AtomicBool,
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

impl Clients {
    /// A session subscribed with no-local.
    pub(super) fn see_no_local(&self) {
        self.no_local_seen.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether publishes must carry their client id (for no-local subscriptions).
    pub(super) fn no_local_seen(&self) -> bool {
        self.no_local_seen.load(std::sync::atomic::Ordering::Relaxed)
    }
}
