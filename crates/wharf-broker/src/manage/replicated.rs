//! The management calls that change replicated definitions (vhosts, users, permissions, topic
//! permissions, policies): on a broker alone each is carried out here at once
//! (`identity_ops.rs`, `policy_ops.rs`); on a cluster's node it becomes a command of the
//! metadata group (`cluster/`), carried out on every node by the same code, and answered here
//! once it is committed and applied on this node.
//!
//! What must be decided once for every node is decided here, before the command is proposed: a
//! password given in clear is hashed here (each node salting its own would give each node a
//! different hash of it).

use super::Management;
use super::identity_ops::NewPassword;
use super::operations::ManagementError;
use super::policy_ops::PolicySpec;
use crate::access::{Permission, TopicPermission};
use crate::cluster::{MetaCommand, StoredHash, table_bytes};
use crate::password::PasswordHash;

/// A user without a password (certificate logins only), as a command carries it.
fn no_password() -> StoredHash {
    (String::new(), PasswordHash::unusable().to_rabbitmq().1.to_owned())
}

impl Management {
    /// Runs `command` through the metadata group on a cluster's node; `None` on a broker alone.
    fn through_cluster(&self, command: impl FnOnce() -> MetaCommand) -> Option<Result<bool, ManagementError>> {
        let group = self.core.metadata_group()?;
        Some(match group.propose_blocking(command()) {
            Ok(answer) => answer.into_management(),
            Err(error) => Err(ManagementError::Unavailable(error.to_string())),
        })
    }

    /// Creates a vhost (`PUT /api/vhosts/{name}`); returns whether it is new. An existing one is
    /// left as it is (its description and tags are recorded).
    pub fn put_vhost(&self, name: &str, description: &str, tags: &[String]) -> Result<bool, ManagementError> {
        let command = || MetaCommand::PutVhost {
            name: name.to_owned(),
            description: description.to_owned(),
            tags: tags.to_vec(),
        };
        self.through_cluster(command).unwrap_or_else(|| self.put_vhost_here(name, description, tags))
    }

    /// Deletes a vhost and everything in it (see `policy_ops.rs`).
    pub fn delete_vhost(&self, name: &str) -> Result<(), ManagementError> {
        match self.through_cluster(|| MetaCommand::DeleteVhost { name: name.to_owned() }) {
            Some(result) => result.map(|_| ()),
            None => self.delete_vhost_here(name),
        }
    }

    /// Creates or changes a user (`PUT /api/users/{name}`); returns whether it is new.
    pub fn put_user(&self, name: &str, password: NewPassword, tags: Vec<String>) -> Result<bool, ManagementError> {
        if self.core.metadata_group().is_none() {
            return self.put_user_here(name, password, tags);
        }
        let password_hash = match password {
            NewPassword::Clear(text) => {
                let (hash, algorithm) = PasswordHash::new(&text).to_rabbitmq();
                Some((hash, algorithm.to_owned()))
            }
            NewPassword::Hash { password_hash, hashing_algorithm } if password_hash.is_empty() => {
                Some((String::new(), hashing_algorithm))
            }
            NewPassword::Hash { password_hash, hashing_algorithm } => {
                PasswordHash::from_rabbitmq(&password_hash, &hashing_algorithm)
                    .map_err(|error| ManagementError::BadRequest(error.to_string()))?;
                Some((password_hash, hashing_algorithm))
            }
            NewPassword::Hashed(hash) => {
                let (hash, algorithm) = hash.to_rabbitmq();
                Some((hash, algorithm.to_owned()))
            }
            NewPassword::None => Some(no_password()),
            NewPassword::Keep => None,
        };
        let command = || MetaCommand::PutUser { name: name.to_owned(), password_hash, tags };
        self.through_cluster(command).unwrap_or_else(|| Err(ManagementError::Unavailable("the cluster stopped".into())))
    }

    /// Deletes a user and its permissions, and closes its connections; 404 if there is none.
    pub fn delete_user(&self, name: &str) -> Result<(), ManagementError> {
        match self.through_cluster(|| MetaCommand::DeleteUser { name: name.to_owned() }) {
            Some(result) => result.map(|_| ()),
            None => self.delete_user_here(name),
        }
    }

    /// Sets a user's permissions on a vhost (`PUT /api/permissions/{vhost}/{user}`); returns
    /// whether they are new. A pattern that is not a valid regular expression is refused.
    pub fn put_permission(&self, permission: Permission) -> Result<bool, ManagementError> {
        let command = || MetaCommand::PutPermission {
            user: permission.user.clone(),
            vhost: permission.vhost.clone(),
            configure: permission.configure.clone(),
            write: permission.write.clone(),
            read: permission.read.clone(),
        };
        match self.through_cluster(command) {
            Some(result) => result,
            None => self.put_permission_here(permission),
        }
    }

    /// Removes a user's permissions on a vhost (and its topic permissions there), and closes its
    /// connections to that vhost; 404 if it had none.
    pub fn delete_permission(&self, user: &str, vhost: &str) -> Result<(), ManagementError> {
        let command = || MetaCommand::DeletePermission { user: user.to_owned(), vhost: vhost.to_owned() };
        match self.through_cluster(command) {
            Some(result) => result.map(|_| ()),
            None => self.delete_permission_here(user, vhost),
        }
    }

    /// Sets a user's topic permission on one exchange of a vhost.
    pub fn put_topic_permission(&self, permission: TopicPermission) -> Result<(), ManagementError> {
        let command = || MetaCommand::PutTopicPermission {
            user: permission.user.clone(),
            vhost: permission.vhost.clone(),
            exchange: permission.exchange.clone(),
            write: permission.write.clone(),
            read: permission.read.clone(),
        };
        match self.through_cluster(command) {
            Some(result) => result.map(|_| ()),
            None => self.put_topic_permission_here(permission),
        }
    }

    /// Removes a user's topic permissions on a vhost; 404 if it had none.
    pub fn delete_topic_permissions(&self, user: &str, vhost: &str) -> Result<(), ManagementError> {
        let command = || MetaCommand::DeleteTopicPermissions { user: user.to_owned(), vhost: vhost.to_owned() };
        match self.through_cluster(command) {
            Some(result) => result.map(|_| ()),
            None => self.delete_topic_permissions_here(user, vhost),
        }
    }

    /// Creates or replaces a policy (`PUT /api/policies/{vhost}/{name}`) and applies it to the
    /// vhost's queues and exchanges; returns whether it is new.
    pub fn put_policy(&self, vhost: &str, name: &str, spec: PolicySpec) -> Result<bool, ManagementError> {
        if self.core.metadata_group().is_none() {
            return self.put_policy_here(vhost, name, spec);
        }
        let definition = table_bytes(&spec.definition).map_err(|error| ManagementError::BadRequest(error.text))?;
        let command = || MetaCommand::PutPolicy {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            pattern: spec.pattern,
            apply_to: spec.apply_to.as_str().to_owned(),
            priority: spec.priority,
            definition,
        };
        self.through_cluster(command).unwrap_or_else(|| Err(ManagementError::Unavailable("the cluster stopped".into())))
    }

    /// Deletes a policy; what it set no longer applies to the vhost's queues and exchanges.
    pub fn delete_policy(&self, vhost: &str, name: &str) -> Result<(), ManagementError> {
        let command = || MetaCommand::DeletePolicy { vhost: vhost.to_owned(), name: name.to_owned() };
        match self.through_cluster(command) {
            Some(result) => result.map(|_| ()),
            None => self.delete_policy_here(vhost, name),
        }
    }
}
