//! Vhost and user limits, as RabbitMQ's `set_vhost_limits` and `set_user_limits` have them:
//! connections per vhost, queues per vhost, connections per user and channels per user (across
//! all of that user's connections).
//!
//! This module owns the counts. A logged-in connection holds a [`ConnectionLease`], which counts
//! it against its vhost and user and tracks its channels; dropping the lease (however the
//! connection ends) gives everything back, so a count cannot leak. The refusals use RabbitMQ's
//! codes and words: 530 `NOT_ALLOWED` on the connection for connections and channels, 406
//! `PRECONDITION_FAILED` on the channel for a queue over the vhost's limit.

use crate::config::{UserLimits, VhostLimits};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use wharf_model::ModelError;

#[derive(Debug, Default)]
struct Counts {
    vhost_connections: HashMap<String, u32>,
    user_connections: HashMap<String, u32>,
    user_channels: HashMap<String, u32>,
}

/// The configured limits and what is counted against them.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    vhosts: HashMap<String, VhostLimits>,
    users: HashMap<String, UserLimits>,
    counts: Mutex<Counts>,
}

fn decrement(counts: &mut HashMap<String, u32>, key: &str, by: u32) {
    if let Some(count) = counts.get_mut(key) {
        *count = count.saturating_sub(by);
        if *count == 0 {
            counts.remove(key);
        }
    }
}

impl Limits {
    pub fn new(vhosts: &[VhostLimits], users: &[UserLimits]) -> Arc<Limits> {
        Arc::new(Limits {
            vhosts: vhosts.iter().map(|limits| (limits.vhost.clone(), limits.clone())).collect(),
            users: users.iter().map(|limits| (limits.user.clone(), limits.clone())).collect(),
            counts: Mutex::default(),
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a new connection of `user` to `vhost`, or refuses it with the text of RabbitMQ's
    /// 530.
    pub fn admit_connection(self: &Arc<Self>, user: &str, vhost: &str) -> Result<ConnectionLease, String> {
        let mut counts = self.counts();
        let vhost_max = self.vhosts.get(vhost).and_then(|limits| limits.connections_max);
        if let Some(max) = vhost_max
            && counts.vhost_connections.get(vhost).copied().unwrap_or(0) >= max
        {
            return Err(format!(
                "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}': connection limit ({max}) is reached"
            ));
        }
        let user_max = self.users.get(user).and_then(|limits| limits.connections_max);
        if let Some(max) = user_max
            && counts.user_connections.get(user).copied().unwrap_or(0) >= max
        {
            return Err(format!(
                "NOT_ALLOWED - Connection refused for user '{user}'. User connection limit ({max}) is reached"
            ));
        }
        *counts.vhost_connections.entry(vhost.to_owned()).or_default() += 1;
        *counts.user_connections.entry(user.to_owned()).or_default() += 1;
        Ok(ConnectionLease { limits: Arc::clone(self), user: user.to_owned(), vhost: vhost.to_owned(), channels: 0 })
    }

    /// Refuses a new queue in `vhost` if it already holds its `max-queues`.
    pub fn check_new_queue(&self, vhost: &str, name: &str, queue_count: usize) -> Result<(), ModelError> {
        match self.vhosts.get(vhost).and_then(|limits| limits.queues_max) {
            Some(max) if queue_count >= max as usize => Err(ModelError::precondition_failed(format!(
                "cannot declare queue '{name}': queue limit in vhost '{vhost}' ({max}) is reached"
            ))),
            _ => Ok(()),
        }
    }
}

/// One logged-in connection's place in the counts; dropping it gives the place back.
#[derive(Debug)]
pub(crate) struct ConnectionLease {
    limits: Arc<Limits>,
    user: String,
    vhost: String,
    /// Channels this connection has counted against its user.
    channels: u32,
}

impl ConnectionLease {
    /// Allows one more channel for the user (the connection has `open_now` open), or refuses
    /// with RabbitMQ's 530 text.
    pub fn admit_channel(&mut self, open_now: usize) -> Result<(), ModelError> {
        self.set_channels(open_now);
        let Some(max) = self.limits.users.get(&self.user).and_then(|limits| limits.channels_max) else {
            return Ok(());
        };
        // Checked and taken under one lock, so two connections of the user opening at once cannot
        // both take the last place (the session's count after the frame corrects a failed open).
        let mut counts = self.limits.counts();
        let count = counts.user_channels.entry(self.user.clone()).or_default();
        if *count >= max {
            return Err(ModelError::not_allowed(format!(
                "number of channels opened for user '{}' has reached the maximum allowed user limit of ({max})",
                self.user
            )));
        }
        *count += 1;
        self.channels += 1;
        Ok(())
    }

    /// Brings the user's channel count in line with the `open_now` channels this connection has.
    pub fn set_channels(&mut self, open_now: usize) {
        let open_now = u32::try_from(open_now).unwrap_or(u32::MAX);
        if open_now == self.channels {
            return;
        }
        let mut counts = self.limits.counts();
        if open_now > self.channels {
            *counts.user_channels.entry(self.user.clone()).or_default() += open_now - self.channels;
        } else {
            decrement(&mut counts.user_channels, &self.user, self.channels - open_now);
        }
        self.channels = open_now;
    }
}

impl Drop for ConnectionLease {
    fn drop(&mut self) {
        let mut counts = self.limits.counts();
        decrement(&mut counts.vhost_connections, &self.vhost, 1);
        decrement(&mut counts.user_connections, &self.user, 1);
        decrement(&mut counts.user_channels, &self.user, self.channels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_count_connections_and_channels_and_give_them_back() {
        let limits = Limits::new(
            &[VhostLimits { vhost: "/".into(), connections_max: Some(2), queues_max: Some(1) }],
            &[UserLimits { user: "u".into(), connections_max: Some(1), channels_max: Some(3) }],
        );
        let mut first = limits.admit_connection("u", "/").unwrap();
        let refused = limits.admit_connection("u", "/").unwrap_err();
        assert!(refused.contains("User connection limit (1) is reached"), "{refused}");
        let other = limits.admit_connection("v", "/").unwrap();
        let refused = limits.admit_connection("w", "/").unwrap_err();
        assert!(refused.contains("connection limit (2) is reached"), "{refused}");
        drop(other);
        let _again = limits.admit_connection("w", "/").unwrap();
        for open in 0..3 {
            first.admit_channel(open).unwrap();
        }
        let refused = first.admit_channel(3).unwrap_err();
        assert_eq!(refused.code, 530);
        first.set_channels(1);
        first.admit_channel(1).unwrap();
        drop(first);
        let mut second = limits.admit_connection("u", "/").unwrap();
        for open in 0..3 {
            second.admit_channel(open).unwrap();
            second.set_channels(open + 1);
        }
        assert!(second.admit_channel(3).is_err(), "the closed connection's channels were given back, no more");
        assert!(limits.check_new_queue("/", "q", 0).is_ok());
        assert_eq!(limits.check_new_queue("/", "q", 1).unwrap_err().code, 406);
        assert!(limits.check_new_queue("other", "q", 1000).is_ok());
    }
}
