//! [`Identities`]: the users and their permissions as the broker holds them while it runs, and
//! changes to them (the management API's `PUT`/`DELETE` on users, permissions and topic
//! permissions), kept durable in the definitions log.
//!
//! Decisions, with reasons:
//! - The configuration (`wharf.toml`, `--definitions`) is applied at every start *after* what
//!   the API stored, so the file stays the source of truth for what it names (a password changed
//!   in the file takes effect; a user the API deleted but the file defines comes back), as
//!   RabbitMQ's `load_definitions` does at boot. What only the API defined survives restarts.
//! - Permissions are compiled whole on every change (changes are rare; the compiled `Access` is
//!   swapped under a lock readers hold only to clone an `Arc`). A connection keeps the grant it
//!   opened with, as RabbitMQ's channels keep their cached permissions; deleting a user or their
//!   permissions on a vhost closes the connections that used them, as RabbitMQ does.
//! - Values are definitions format 1 (its version byte, then a kind tag: `U` user, `P`
//!   permission, `O` topic permission) followed by JSON in RabbitMQ's definitions shape
//!   (`password_hash`, `hashing_algorithm`, `tags`; `configure`/`write`/`read`), under keys of
//!   their own kinds (`user`, `permission`, `topic-permission`; `docs/storage-format.md`), so an
//!   export and the stored form say the same thing, and the start-up migration of pre-format-1
//!   JSON values leaves them alone.

use crate::access::{Access, Permission, PermissionError, TopicPermission, VhostGrant};
use crate::config::User;
use crate::password::PasswordHash;
use serde_json::json;
use std::sync::{Arc, RwLock};

/// What the broker holds now.
#[derive(Debug)]
struct State {
    users: Vec<User>,
    permissions: Vec<Permission>,
    topic_permissions: Vec<TopicPermission>,
    access: Arc<Access>,
}

/// Users and permissions, changeable while the broker runs.
#[derive(Debug)]
pub(crate) struct Identities {
    state: RwLock<State>,
}

/// A stored identity record, read back at start.
#[derive(Debug, Clone)]
pub(crate) enum StoredIdentity {
    User(User),
    Permission(Permission),
    TopicPermission(TopicPermission),
}

pub(crate) fn user_key(name: &str) -> Vec<u8> {
    format!("user\0\0{name}").into_bytes()
}

pub(crate) fn permission_key(vhost: &str, user: &str) -> Vec<u8> {
    format!("permission\0{vhost}\0{user}").into_bytes()
}

pub(crate) fn topic_permission_key(vhost: &str, user: &str, exchange: &str) -> Vec<u8> {
    format!("topic-permission\0{vhost}\0{user}\0{exchange}").into_bytes()
}

/// Whether a definitions key is an identity record's.
pub(crate) fn is_identity_kind(kind: &str) -> bool {
    matches!(kind, "user" | "permission" | "topic-permission")
}

/// Kind tags after the format's version byte.
const USER_TAG: u8 = b'U';
const PERMISSION_TAG: u8 = b'P';
const TOPIC_PERMISSION_TAG: u8 = b'O';

fn framed(tag: u8, body: serde_json::Value) -> Vec<u8> {
    let mut value = vec![crate::definition_format::DEFINITIONS_FORMAT_VERSION, tag];
    value.extend_from_slice(body.to_string().as_bytes());
    value
}

pub(crate) fn encode_user(user: &User) -> Vec<u8> {
    let (password_hash, hashing_algorithm) = user.password.to_rabbitmq();
    let body = json!({
        "password_hash": password_hash,
        "hashing_algorithm": hashing_algorithm,
        "tags": user.tags,
        "loopback_only": user.loopback_only,
    });
    framed(USER_TAG, body)
}

pub(crate) fn encode_permission(permission: &Permission) -> Vec<u8> {
    let body = json!({"configure": permission.configure, "write": permission.write, "read": permission.read});
    framed(PERMISSION_TAG, body)
}

pub(crate) fn encode_topic_permission(permission: &TopicPermission) -> Vec<u8> {
    framed(TOPIC_PERMISSION_TAG, json!({"write": permission.write, "read": permission.read}))
}

/// Reads an identity record (key parts from `split_key`); `None` if it is damaged or of another
/// kind than its key says.
pub(crate) fn decode(kind: &str, vhost: &str, rest: &str, value: &[u8]) -> Option<StoredIdentity> {
    let tag = match kind {
        "user" => USER_TAG,
        "permission" => PERMISSION_TAG,
        _ => TOPIC_PERMISSION_TAG,
    };
    let body = match value {
        [version, found, body @ ..]
            if *version == crate::definition_format::DEFINITIONS_FORMAT_VERSION && *found == tag =>
        {
            body
        }
        _ => return None,
    };
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |name: &str| value.get(name).and_then(serde_json::Value::as_str).map(str::to_owned);
    match kind {
        "user" => {
            let hash = text("password_hash")?;
            let password = if hash.is_empty() {
                PasswordHash::unusable()
            } else {
                PasswordHash::from_rabbitmq(&hash, &text("hashing_algorithm")?).ok()?
            };
            let tags =
                value.get("tags")?.as_array()?.iter().filter_map(|tag| tag.as_str().map(str::to_owned)).collect();
            let loopback_only = value.get("loopback_only").and_then(serde_json::Value::as_bool).unwrap_or(false);
            Some(StoredIdentity::User(User { name: rest.to_owned(), password, loopback_only, tags }))
        }
        "permission" => Some(StoredIdentity::Permission(Permission {
            user: rest.to_owned(),
            vhost: vhost.to_owned(),
            configure: text("configure")?,
            write: text("write")?,
            read: text("read")?,
        })),
        "topic-permission" => {
            let (user, exchange) = rest.split_once('\0')?;
            Some(StoredIdentity::TopicPermission(TopicPermission {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
                exchange: exchange.to_owned(),
                write: text("write")?,
                read: text("read")?,
            }))
        }
        _ => None,
    }
}

impl Identities {
    /// From stored records, then the configuration's users and permissions over them.
    pub fn new(
        stored: Vec<StoredIdentity>,
        users: &[User],
        permissions: &[Permission],
        topic_permissions: &[TopicPermission],
    ) -> Identities {
        let mut state = State {
            users: Vec::new(),
            permissions: Vec::new(),
            topic_permissions: Vec::new(),
            access: Arc::new(Access::default()),
        };
        for record in stored {
            match record {
                StoredIdentity::User(user) => put_user(&mut state.users, user),
                StoredIdentity::Permission(permission) => put_permission(&mut state.permissions, permission),
                StoredIdentity::TopicPermission(permission) => {
                    put_topic_permission(&mut state.topic_permissions, permission)
                }
            }
        }
        for user in users {
            put_user(&mut state.users, user.clone());
        }
        for permission in permissions {
            put_permission(&mut state.permissions, permission.clone());
        }
        for permission in topic_permissions {
            put_topic_permission(&mut state.topic_permissions, permission.clone());
        }
        // `Broker::start` validated the configuration's permissions, and stored ones were
        // compiled before they were stored; should they fail anyway, nobody gets access (closed,
        // not open).
        state.access = match Access::new(&state.permissions, &state.topic_permissions) {
            Ok(access) => Arc::new(access),
            Err(error) => {
                tracing::error!(%error, "permissions cannot be compiled; no user has access");
                Arc::new(Access::default())
            }
        };
        Identities { state: RwLock::new(state) }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What `user` may do in `vhost`, or `None` if it may not use the vhost at all.
    pub fn grant(&self, user: &str, vhost: &str) -> Option<Arc<VhostGrant>> {
        let access = Arc::clone(&self.read().access);
        access.grant(user, vhost)
    }

    pub fn user(&self, name: &str) -> Option<User> {
        self.read().users.iter().find(|user| user.name == name).cloned()
    }

    pub fn users(&self) -> Vec<User> {
        self.read().users.clone()
    }

    pub fn permissions(&self) -> Vec<Permission> {
        self.read().permissions.clone()
    }

    pub fn topic_permissions(&self) -> Vec<TopicPermission> {
        self.read().topic_permissions.clone()
    }

    pub fn put_user(&self, user: User) {
        put_user(&mut self.write().users, user);
    }

    /// Removes a user and its permissions; false if there was none.
    pub fn delete_user(&self, name: &str) -> bool {
        let mut state = self.write();
        let before = state.users.len();
        state.users.retain(|user| user.name != name);
        if state.users.len() == before {
            return false;
        }
        state.permissions.retain(|permission| permission.user != name);
        state.topic_permissions.retain(|permission| permission.user != name);
        recompile(&mut state);
        true
    }

    /// Sets a permission, compiled first: a bad pattern changes nothing.
    pub fn put_permission(&self, permission: Permission) -> Result<(), PermissionError> {
        let mut state = self.write();
        let mut permissions = state.permissions.clone();
        put_permission(&mut permissions, permission);
        let access = Access::new(&permissions, &state.topic_permissions)?;
        state.permissions = permissions;
        state.access = Arc::new(access);
        Ok(())
    }

    /// Removes `user`'s permissions on `vhost` (topic permissions too); false if it had none.
    pub fn delete_permission(&self, user: &str, vhost: &str) -> bool {
        let mut state = self.write();
        let before = state.permissions.len();
        state.permissions.retain(|permission| !(permission.user == user && permission.vhost == vhost));
        if state.permissions.len() == before {
            return false;
        }
        state.topic_permissions.retain(|permission| !(permission.user == user && permission.vhost == vhost));
        recompile(&mut state);
        true
    }

    /// Sets a topic permission, compiled first.
    pub fn put_topic_permission(&self, permission: TopicPermission) -> Result<(), PermissionError> {
        let mut state = self.write();
        let mut topic_permissions = state.topic_permissions.clone();
        put_topic_permission(&mut topic_permissions, permission);
        let access = Access::new(&state.permissions, &topic_permissions)?;
        state.topic_permissions = topic_permissions;
        state.access = Arc::new(access);
        Ok(())
    }

    /// Removes `user`'s topic permissions on `vhost`; returns the exchanges they were for.
    pub fn delete_topic_permissions(&self, user: &str, vhost: &str) -> Vec<String> {
        let mut state = self.write();
        let mut removed = Vec::new();
        state.topic_permissions.retain(|permission| {
            let matches = permission.user == user && permission.vhost == vhost;
            if matches {
                removed.push(permission.exchange.clone());
            }
            !matches
        });
        recompile(&mut state);
        removed
    }
}

/// Recompiles after a removal (which cannot make a pattern invalid).
fn recompile(state: &mut State) {
    if let Ok(access) = Access::new(&state.permissions, &state.topic_permissions) {
        state.access = Arc::new(access);
    }
}

fn put_user(users: &mut Vec<User>, user: User) {
    match users.iter_mut().find(|existing| existing.name == user.name) {
        Some(existing) => *existing = user,
        None => users.push(user),
    }
}

fn put_permission(permissions: &mut Vec<Permission>, permission: Permission) {
    match permissions.iter_mut().find(|existing| existing.user == permission.user && existing.vhost == permission.vhost)
    {
        Some(existing) => *existing = permission,
        None => permissions.push(permission),
    }
}

fn put_topic_permission(permissions: &mut Vec<TopicPermission>, permission: TopicPermission) {
    let same = |existing: &TopicPermission| {
        existing.user == permission.user
            && existing.vhost == permission.vhost
            && existing.exchange == permission.exchange
    };
    match permissions.iter_mut().find(|existing| same(existing)) {
        Some(existing) => *existing = permission,
        None => permissions.push(permission),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_the_configuration_wins_over_stored_ones() {
        let stored_user = User { tags: vec!["monitoring".into()], ..User::with_password("ops", "old", false) };
        let decoded = decode("user", "", "ops", &encode_user(&stored_user)).unwrap();
        let StoredIdentity::User(user) = &decoded else { panic!("{decoded:?}") };
        assert!(user.password.verify(b"old") && user.tags == ["monitoring"]);
        let permission = Permission::full("ops", "/");
        let decoded_permission = decode("permission", "/", "ops", &encode_permission(&permission)).unwrap();
        let topic = TopicPermission {
            user: "ops".into(),
            vhost: "/".into(),
            exchange: "amq.topic".into(),
            write: "^a".into(),
            read: ".*".into(),
        };
        let decoded_topic =
            decode("topic-permission", "/", "ops\0amq.topic", &encode_topic_permission(&topic)).unwrap();
        let configured = User::with_password("ops", "new", false);
        let identities = Identities::new(vec![decoded, decoded_permission, decoded_topic], &[configured], &[], &[]);
        let ops = identities.user("ops").unwrap();
        assert!(ops.password.verify(b"new"), "the configuration's password wins");
        assert!(identities.grant("ops", "/").is_some());
        assert_eq!(identities.topic_permissions(), std::slice::from_ref(&topic));
        assert!(decode("user", "", "x", b"not json").is_none());
        assert!(decode("user", "", "x", &encode_permission(&permission)).is_none(), "a value of another kind");
        // The stored form, pinned: the format's version byte, the kind's tag, RabbitMQ's JSON.
        let topic_value =
            encode_topic_permission(&TopicPermission { write: "w".into(), read: "r".into(), ..topic.clone() });
        assert_eq!(topic_value, b"\x01O{\"read\":\"r\",\"write\":\"w\"}");
    }

    #[test]
    fn a_bad_pattern_changes_nothing_and_deleting_a_user_takes_its_permissions() {
        let identities = Identities::new(Vec::new(), &[User::guest()], &[Permission::full("guest", "/")], &[]);
        let bad = Permission { configure: "(".into(), ..Permission::full("guest", "/") };
        assert!(identities.put_permission(bad).is_err());
        assert_eq!(identities.permissions(), [Permission::full("guest", "/")]);
        assert!(identities.delete_user("guest"));
        assert!(identities.grant("guest", "/").is_none());
        assert!(identities.permissions().is_empty());
        assert!(!identities.delete_user("guest"));
    }
}
