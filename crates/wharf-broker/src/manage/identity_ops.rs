//! Changing users and permissions through the management interface: each change is written to
//! the definitions log (synced; a deletion of several records in one atomic batch) before it
//! takes effect, under the definitions lock so that
//! concurrent changes reach the log in the order they take effect. Deleting a user, or a user's
//! permissions on a vhost, closes the connections that used them (320 CONNECTION_FORCED), as
//! RabbitMQ does. Only an administrator may call these (the API checks the tag).

use super::Management;
use super::operations::ManagementError;
use crate::access::{Permission, TopicPermission};
use crate::config::User;
use crate::definitions::internal_error;
use crate::identities::{self, Identities};
use crate::password::PasswordHash;

/// How a user's password is given.
#[derive(Debug, Clone)]
pub enum NewPassword {
    /// In clear: hashed here (SHA-256, salted), only the hash kept.
    Clear(String),
    /// Already hashed, as RabbitMQ exports it.
    Hash { password_hash: String, hashing_algorithm: String },
    /// Already hashed, read from a definitions file.
    Hashed(PasswordHash),
    /// No password: only a certificate login (SASL EXTERNAL) can authenticate the user.
    None,
    /// Keep the user's current password (a change of tags only).
    Keep,
}

impl Management {
    fn put_record(&self, key: &[u8], value: &[u8]) -> Result<(), ManagementError> {
        self.core.meta.put(key, value).map_err(|error| {
            self.core.store_failed(&error);
            ManagementError::from(internal_error(&error))
        })
    }

    /// Deletes several records in one atomic batch of the definitions log.
    fn delete_records(&self, keys: Vec<Vec<u8>>) -> Result<(), ManagementError> {
        let changes: Vec<wharf_store::MetaChange> =
            keys.into_iter().map(|key| wharf_store::MetaChange::Delete { key }).collect();
        self.core.meta.apply(&changes).map_err(|error| {
            self.core.store_failed(&error);
            ManagementError::from(internal_error(&error))
        })
    }

    fn identities(&self) -> &Identities {
        &self.core.access
    }

    /// Whether the configuration defines this user (a definitions import leaves such users as
    /// they are).
    pub fn is_configured_user(&self, name: &str) -> bool {
        self.core.config.users.iter().any(|user| user.name == name)
    }

    /// Whether the configuration defines this user's permissions on this vhost.
    pub fn is_configured_permission(&self, user: &str, vhost: &str) -> bool {
        self.core.config.permissions.iter().any(|permission| permission.user == user && permission.vhost == vhost)
    }

    /// Refuses a change to a user the configuration defines: the configuration is applied again
    /// at every start, so the change would not last (`identities.rs`).
    fn refuse_configured_user(&self, name: &str) -> Result<(), ManagementError> {
        if self.core.config.users.iter().any(|user| user.name == name) {
            return Err(ManagementError::BadRequest(format!(
                "user '{name}' is defined by the broker's configuration (wharf.toml users, --definitions, or the \
                 default guest); change it there"
            )));
        }
        Ok(())
    }

    /// Refuses a change to permissions the configuration defines, for the same reason.
    fn refuse_configured_permission(&self, user: &str, vhost: &str) -> Result<(), ManagementError> {
        if self.core.config.permissions.iter().any(|permission| permission.user == user && permission.vhost == vhost) {
            return Err(ManagementError::BadRequest(format!(
                "the permissions of '{user}' on vhost '{vhost}' are defined by the broker's configuration; change them there"
            )));
        }
        Ok(())
    }

    /// Creates or changes a user (`PUT /api/users/{name}`); returns whether it is new.
    pub(crate) fn put_user_here(
        &self,
        name: &str,
        password: NewPassword,
        tags: Vec<String>,
    ) -> Result<bool, ManagementError> {
        // Off the async workers: the definitions lock may be held by another change's fsync.
        crate::core::blocking(|| {
            if name.is_empty() || name.len() > 255 || name.contains('\0') {
                return Err(ManagementError::BadRequest("a user name is 1 to 255 bytes, without NUL".into()));
            }
            self.refuse_configured_user(name)?;
            let existing = self.identities().user(name);
            let password = match password {
                NewPassword::Clear(text) => PasswordHash::new(&text),
                NewPassword::Hash { password_hash, .. } if password_hash.is_empty() => PasswordHash::unusable(),
                NewPassword::Hash { password_hash, hashing_algorithm } => {
                    PasswordHash::from_rabbitmq(&password_hash, &hashing_algorithm)
                        .map_err(|error| ManagementError::BadRequest(error.to_string()))?
                }
                NewPassword::Hashed(hash) => hash,
                NewPassword::None => PasswordHash::unusable(),
                NewPassword::Keep => match &existing {
                    Some(user) => user.password.clone(),
                    None => {
                        return Err(ManagementError::BadRequest(
                            "a new user needs password, password_hash, or password_hash \"\" (certificate logins only)"
                                .into(),
                        ));
                    }
                },
            };
            // `guest` is loopback-only whatever its password becomes, also when created anew
            // (RabbitMQ's `loopback_users`).
            let loopback_only = name == "guest" || existing.as_ref().is_some_and(|user| user.loopback_only);
            let user = User { name: name.to_owned(), password, loopback_only, tags };
            let _definitions = self.core.definitions();
            crate::core::blocking(|| self.put_record(&identities::user_key(name), &identities::encode_user(&user)))?;
            self.identities().put_user(user);
            Ok(existing.is_none())
        })
    }

    /// Deletes a user and its permissions, and closes its connections; 404 if there is none.
    pub(crate) fn delete_user_here(&self, name: &str) -> Result<(), ManagementError> {
        // Off the async workers: the definitions lock may be held by another change's fsync.
        crate::core::blocking(|| {
            self.refuse_configured_user(name)?;
            let _definitions = self.core.definitions();
            if self.identities().user(name).is_none() {
                return Err(ManagementError::NotFound(format!("no user '{name}'")));
            }
            let permissions: Vec<Permission> =
                self.identities().permissions().into_iter().filter(|permission| permission.user == name).collect();
            let topics: Vec<TopicPermission> = self
                .identities()
                .topic_permissions()
                .into_iter()
                .filter(|permission| permission.user == name)
                .collect();
            let mut keys: Vec<Vec<u8>> =
                permissions.iter().map(|permission| identities::permission_key(&permission.vhost, name)).collect();
            keys.extend(
                topics.iter().map(|topic| identities::topic_permission_key(&topic.vhost, name, &topic.exchange)),
            );
            keys.push(identities::user_key(name));
            crate::core::blocking(|| self.delete_records(keys))?;
            self.identities().delete_user(name);
            self.close_connections_of(name, None, &format!("user '{name}' was deleted"));
            Ok(())
        })
    }

    /// Sets a user's permissions on a vhost (`PUT /api/permissions/{vhost}/{user}`); returns
    /// whether they are new. A pattern that is not a valid regular expression is refused.
    pub(crate) fn put_permission_here(&self, permission: Permission) -> Result<bool, ManagementError> {
        // Off the async workers: the definitions lock may be held by another change's fsync.
        crate::core::blocking(|| {
            if !self.vhost_exists(&permission.vhost) {
                return Err(ManagementError::NotFound(format!("no vhost '{}'", permission.vhost)));
            }
            if self.identities().user(&permission.user).is_none() {
                return Err(ManagementError::BadRequest(format!("no user '{}'", permission.user)));
            }
            self.refuse_configured_permission(&permission.user, &permission.vhost)?;
            let _definitions = self.core.definitions();
            let existed = self.identities().grant(&permission.user, &permission.vhost).is_some();
            // Compiled (and refused) before anything is written.
            crate::access::Access::new(std::slice::from_ref(&permission), &[])
                .map_err(|error| ManagementError::BadRequest(error.to_string()))?;
            let key = identities::permission_key(&permission.vhost, &permission.user);
            crate::core::blocking(|| self.put_record(&key, &identities::encode_permission(&permission)))?;
            self.identities()
                .put_permission(permission)
                .map_err(|error| ManagementError::BadRequest(error.to_string()))?;
            Ok(!existed)
        })
    }

    /// Removes a user's permissions on a vhost (and its topic permissions there), and closes its
    /// connections to that vhost; 404 if it had none.
    pub(crate) fn delete_permission_here(&self, user: &str, vhost: &str) -> Result<(), ManagementError> {
        // Off the async workers: the definitions lock may be held by another change's fsync.
        crate::core::blocking(|| {
            self.refuse_configured_permission(user, vhost)?;
            let _definitions = self.core.definitions();
            if self.identities().grant(user, vhost).is_none() {
                return Err(ManagementError::NotFound(format!("no permissions of '{user}' on vhost '{vhost}'")));
            }
            let topics: Vec<TopicPermission> = self
                .identities()
                .topic_permissions()
                .into_iter()
                .filter(|permission| permission.user == user && permission.vhost == vhost)
                .collect();
            let mut keys: Vec<Vec<u8>> =
                topics.iter().map(|topic| identities::topic_permission_key(vhost, user, &topic.exchange)).collect();
            keys.push(identities::permission_key(vhost, user));
            crate::core::blocking(|| self.delete_records(keys))?;
            self.identities().delete_permission(user, vhost);
            self.close_connections_of(
                user,
                Some(vhost),
                &format!("permissions of user '{user}' on vhost '{vhost}' were removed"),
            );
            Ok(())
        })
    }

    /// Sets a user's topic permission on one exchange of a vhost.
    pub(crate) fn put_topic_permission_here(&self, permission: TopicPermission) -> Result<(), ManagementError> {
        // Off the async workers: the definitions lock may be held by another change's fsync.
        crate::core::blocking(|| {
            if permission.exchange.contains('\0') {
                return Err(ManagementError::BadRequest("an exchange name has no NUL".into()));
            }
            if !self.vhost_exists(&permission.vhost) {
                return Err(ManagementError::NotFound(format!("no vhost '{}'", permission.vhost)));
            }
            if self.identities().user(&permission.user).is_none() {
                return Err(ManagementError::BadRequest(format!("no user '{}'", permission.user)));
            }
            let _definitions = self.core.definitions();
            // Compiled against a full grant so a bad pattern is refused before anything is written.
            let probe = Permission::full(&permission.user, &permission.vhost);
            crate::access::Access::new(&[probe], std::slice::from_ref(&permission))
                .map_err(|error| ManagementError::BadRequest(error.to_string()))?;
            let key = identities::topic_permission_key(&permission.vhost, &permission.user, &permission.exchange);
            crate::core::blocking(|| self.put_record(&key, &identities::encode_topic_permission(&permission)))?;
            self.identities()
                .put_topic_permission(permission)
                .map_err(|error| ManagementError::BadRequest(error.to_string()))
        })
    }

    /// Removes a user's topic permissions on a vhost; 404 if it had none.
    pub(crate) fn delete_topic_permissions_here(&self, user: &str, vhost: &str) -> Result<(), ManagementError> {
        // Off the async workers: the definitions lock may be held by another change's fsync.
        crate::core::blocking(|| {
            let _definitions = self.core.definitions();
            let exchanges: Vec<String> = self
                .identities()
                .topic_permissions()
                .into_iter()
                .filter(|permission| permission.user == user && permission.vhost == vhost)
                .map(|permission| permission.exchange)
                .collect();
            if exchanges.is_empty() {
                return Err(ManagementError::NotFound(format!("no topic permissions of '{user}' on vhost '{vhost}'")));
            }
            let keys =
                exchanges.iter().map(|exchange| identities::topic_permission_key(vhost, user, exchange)).collect();
            crate::core::blocking(|| self.delete_records(keys))?;
            self.identities().delete_topic_permissions(user, vhost);
            Ok(())
        })
    }

    /// Asks `user`'s connections (to `vhost`, or to any) to close.
    fn close_connections_of(&self, user: &str, vhost: Option<&str>, reason: &str) {
        for info in self.core.connections.infos() {
            if info.facts.user == user && vhost.is_none_or(|vhost| info.facts.vhost == vhost) {
                info.request_close(reason);
            }
        }
    }
}
