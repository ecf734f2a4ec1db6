//! Changing users and permissions through the management interface: each change is written to
//! the definitions log (synced) before it takes effect, under the definitions lock so that
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
    fn write_record(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), ManagementError> {
        let written = match value {
            Some(value) => self.core.meta.put(key, value),
            None => self.core.meta.delete(key),
        };
        written.map_err(|error| {
            self.core.store_failed(&error);
            ManagementError::from(internal_error(&error))
        })
    }

    fn identities(&self) -> &Identities {
        &self.core.access
    }

    /// Creates or changes a user (`PUT /api/users/{name}`); returns whether it is new.
    pub fn put_user(&self, name: &str, password: NewPassword, tags: Vec<String>) -> Result<bool, ManagementError> {
        if name.is_empty() || name.len() > 255 {
            return Err(ManagementError::BadRequest("a user name is 1 to 255 bytes".into()));
        }
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
        // `guest` keeps its loopback-only rule whatever its password becomes (RabbitMQ's
        // `loopback_users`).
        let loopback_only = existing.as_ref().is_some_and(|user| user.loopback_only);
        let user = User { name: name.to_owned(), password, loopback_only, tags };
        let _definitions = self.core.definitions();
        crate::core::blocking(|| {
            self.write_record(&identities::user_key(name), Some(&identities::encode_user(&user)))
        })?;
        self.identities().put_user(user);
        Ok(existing.is_none())
    }

    /// Deletes a user and its permissions, and closes its connections; 404 if there is none.
    pub fn delete_user(&self, name: &str) -> Result<(), ManagementError> {
        let _definitions = self.core.definitions();
        if self.identities().user(name).is_none() {
            return Err(ManagementError::NotFound(format!("no user '{name}'")));
        }
        let permissions: Vec<Permission> =
            self.identities().permissions().into_iter().filter(|permission| permission.user == name).collect();
        let topics: Vec<TopicPermission> =
            self.identities().topic_permissions().into_iter().filter(|permission| permission.user == name).collect();
        crate::core::blocking(|| {
            for permission in &permissions {
                self.write_record(&identities::permission_key(&permission.vhost, name), None)?;
            }
            for topic in &topics {
                self.write_record(&identities::topic_permission_key(&topic.vhost, name, &topic.exchange), None)?;
            }
            self.write_record(&identities::user_key(name), None)
        })?;
        self.identities().delete_user(name);
        self.close_connections_of(name, None, &format!("user '{name}' was deleted"));
        Ok(())
    }

    /// Sets a user's permissions on a vhost (`PUT /api/permissions/{vhost}/{user}`); returns
    /// whether they are new. A pattern that is not a valid regular expression is refused.
    pub fn put_permission(&self, permission: Permission) -> Result<bool, ManagementError> {
        if !self.vhost_exists(&permission.vhost) {
            return Err(ManagementError::NotFound(format!("no vhost '{}'", permission.vhost)));
        }
        if self.identities().user(&permission.user).is_none() {
            return Err(ManagementError::BadRequest(format!("no user '{}'", permission.user)));
        }
        let _definitions = self.core.definitions();
        let existed = self.identities().grant(&permission.user, &permission.vhost).is_some();
        // Compiled (and refused) before anything is written.
        crate::access::Access::new(std::slice::from_ref(&permission), &[])
            .map_err(|error| ManagementError::BadRequest(error.to_string()))?;
        let key = identities::permission_key(&permission.vhost, &permission.user);
        crate::core::blocking(|| self.write_record(&key, Some(&identities::encode_permission(&permission))))?;
        self.identities().put_permission(permission).map_err(|error| ManagementError::BadRequest(error.to_string()))?;
        Ok(!existed)
    }

    /// Removes a user's permissions on a vhost (and its topic permissions there), and closes its
    /// connections to that vhost; 404 if it had none.
    pub fn delete_permission(&self, user: &str, vhost: &str) -> Result<(), ManagementError> {
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
        crate::core::blocking(|| {
            for topic in &topics {
                self.write_record(&identities::topic_permission_key(vhost, user, &topic.exchange), None)?;
            }
            self.write_record(&identities::permission_key(vhost, user), None)
        })?;
        self.identities().delete_permission(user, vhost);
        self.close_connections_of(
            user,
            Some(vhost),
            &format!("permissions of user '{user}' on vhost '{vhost}' were removed"),
        );
        Ok(())
    }

    /// Sets a user's topic permission on one exchange of a vhost.
    pub fn put_topic_permission(&self, permission: TopicPermission) -> Result<(), ManagementError> {
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
        crate::core::blocking(|| self.write_record(&key, Some(&identities::encode_topic_permission(&permission))))?;
        self.identities()
            .put_topic_permission(permission)
            .map_err(|error| ManagementError::BadRequest(error.to_string()))
    }

    /// Removes a user's topic permissions on a vhost; 404 if it had none.
    pub fn delete_topic_permissions(&self, user: &str, vhost: &str) -> Result<(), ManagementError> {
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
        crate::core::blocking(|| {
            for exchange in &exchanges {
                self.write_record(&identities::topic_permission_key(vhost, user, exchange), None)?;
            }
            Ok::<(), ManagementError>(())
        })?;
        self.identities().delete_topic_permissions(user, vhost);
        Ok(())
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
