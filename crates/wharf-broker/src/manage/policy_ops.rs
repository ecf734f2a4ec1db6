//! Vhosts and policies changed through the management interface (`PUT`/`DELETE /api/vhosts/…`
//! and `/api/policies/…`), durably: each change is written to the definitions log
//! (`policy_records.rs`) under the definitions lock before it takes effect. A policy change is
//! applied to the vhost's existing queues and exchanges at once (`broker/policies.rs` in the
//! model says which settings follow). What the configuration defines (`/`, `vhosts`,
//! `[[policies]]`, `--policy`) is refused here: the configuration is applied again at every
//! start, so a change made here would not last.
//!
//! Deleting a vhost deletes everything in it, as RabbitMQ does: its connections are closed
//! (320), its queues with their messages, its exchanges and bindings, and every permission and
//! policy on it; its definitions go in one atomic batch, then its store logs.

use super::Management;
use super::operations::ManagementError;
use crate::definitions::internal_error;
use crate::policy_records;
use wharf_model::{ApplyTo, Policy};
use wharf_store::{LogId, MetaChange, StoreError};
use wharf_wire::types::FieldTable;

/// A policy as the API gives it.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    pub pattern: String,
    pub apply_to: ApplyTo,
    pub priority: i64,
    pub definition: FieldTable,
}

impl Management {
    /// Whether the configuration defines this vhost (`/` always exists).
    pub fn is_configured_vhost(&self, name: &str) -> bool {
        name == "/" || self.core.config.vhosts.iter().any(|vhost| vhost == name)
    }

    /// Whether the configuration defines this policy.
    pub fn is_configured_policy(&self, vhost: &str, name: &str) -> bool {
        self.core.config.policies.iter().any(|(found, policy)| found == vhost && policy.name == name)
    }

    fn write_definitions(&self, changes: &[MetaChange]) -> Result<(), ManagementError> {
        self.core.meta.apply(changes).map_err(|error| {
            self.core.store_failed(&error);
            ManagementError::from(internal_error(&error))
        })
    }

    /// Creates a vhost (`PUT /api/vhosts/{name}`); returns whether it is new. An existing one is
    /// left as it is (its description and tags are recorded).
    pub(crate) fn put_vhost_here(
        &self,
        name: &str,
        description: &str,
        tags: &[String],
    ) -> Result<bool, ManagementError> {
        if name.is_empty() || name.len() > 255 || name.contains('\0') {
            return Err(ManagementError::BadRequest("a vhost name is 1 to 255 bytes, without NUL".into()));
        }
        crate::core::blocking(|| {
            let _definitions_lock = self.core.definitions();
            let exists = self.vhost_exists(name);
            if !self.is_configured_vhost(name) {
                let record = policy_records::encode_vhost(description, tags);
                self.write_definitions(&[MetaChange::Put { key: policy_records::vhost_key(name), value: record }])?;
            }
            if !exists {
                crate::recovery::ensure_vhost(&self.core.config, &mut self.core.lock_model(), name);
            }
            Ok(!exists)
        })
    }

    /// Deletes a vhost and everything in it (see the module documentation).
    pub(crate) fn delete_vhost_here(&self, name: &str) -> Result<(), ManagementError> {
        if self.is_configured_vhost(name) {
            return Err(ManagementError::BadRequest(format!(
                "vhost '{name}' is defined by the broker's configuration (`/` always, or wharf.toml vhosts); \
                 remove it there"
            )));
        }
        if !self.vhost_exists(name) {
            return Err(ManagementError::NotFound(format!("no vhost '{name}'")));
        }
        for info in self.core.connections.infos() {
            if info.facts.vhost == name {
                info.request_close(&format!("vhost '{name}' is deleted"));
            }
        }
        crate::core::blocking(|| {
            let definitions_lock = self.core.definitions();
            let keys: Vec<Vec<u8>> = self
                .core
                .meta
                .entries()
                .into_keys()
                .filter(|key| crate::definition_format::split_key(key).is_some_and(|(_, vhost, _)| vhost == name))
                .collect();
            // Its quorum queues' groups stop and their logs go, once their records are gone.
            let quorum: Vec<(String, Option<u64>)> = keys
                .iter()
                .filter_map(|key| {
                    let (kind, _, queue) = crate::definition_format::split_key(key)?;
                    if !crate::cluster::is_quorum_record(kind) {
                        return None;
                    }
                    let log = self.core.meta.get(key).and_then(|value| crate::cluster::quorum_log(&value));
                    Some((queue.to_owned(), log))
                })
                .collect();
            let changes: Vec<MetaChange> = keys.into_iter().map(|key| MetaChange::Delete { key }).collect();
            self.write_definitions(&changes)?;
            for (queue, log) in quorum {
                self.core.stop_quorum_group(name, &queue, log);
            }
            self.core.homed.forget_vhost(name);
            let mut model = self.core.lock_model();
            self.core.mqtt_retained.forget_vhost(name);
            self.core.mqtt_sessions.forget_vhost(name);
            let Some(mut effects) = model.remove_vhost(name) else { return Ok(()) };
            self.core.send(&mut effects);
            drop(model);
            drop(definitions_lock);
            // A connection that logged in to it while this ran is closed too; it can open no
            // channel there any more (the vhost is gone from the model).
            for info in self.core.connections.infos() {
                if info.facts.vhost == name {
                    info.request_close(&format!("vhost '{name}' is deleted"));
                }
            }
            let mut logs: Vec<u64> = Vec::new();
            for deleted in std::mem::take(&mut effects.deleted_queues) {
                logs.extend(deleted.store_log.into_iter().chain(deleted.dedup_log).chain(deleted.transient_log));
            }
            for deleted in std::mem::take(&mut effects.deleted_exchanges) {
                logs.extend(deleted.exchange.store_log.into_iter().chain(deleted.exchange.dedup_log));
            }
            for log in logs {
                self.core.dedup_logs.forget(log);
                match self.core.store.delete_log(LogId(log)) {
                    Ok(_) | Err(StoreError::UnknownLog(_)) => {}
                    Err(error) => self.core.store_failed(&error),
                }
            }
            effects.removed.clear();
            self.core.apply(effects);
            for permission in self.core.access.permissions() {
                if permission.vhost == name {
                    self.core.access.delete_permission(&permission.user, name);
                }
            }
            Ok(())
        })
    }

    /// Creates or replaces a policy (`PUT /api/policies/{vhost}/{name}`) and applies it to the
    /// vhost's queues and exchanges; returns whether it is new.
    pub(crate) fn put_policy_here(&self, vhost: &str, name: &str, spec: PolicySpec) -> Result<bool, ManagementError> {
        if self.is_configured_policy(vhost, name) {
            return Err(ManagementError::BadRequest(format!(
                "policy '{name}' in vhost '{vhost}' is defined by the broker's configuration (wharf.toml \
                 [[policies]], --policy); change it there"
            )));
        }
        if name.contains('\0') {
            return Err(ManagementError::BadRequest("a policy name has no NUL".into()));
        }
        let policy = Policy::new(name, &spec.pattern, spec.apply_to, spec.priority, spec.definition)
            .map_err(|error| ManagementError::BadRequest(error.text))?;
        let record = policy_records::encode_policy(&policy)
            .ok_or_else(|| ManagementError::BadRequest(format!("policy '{name}': the definition cannot be stored")))?;
        crate::core::blocking(|| {
            let definitions_lock = self.core.definitions();
            if !self.vhost_exists(vhost) {
                return Err(ManagementError::NotFound(format!("no vhost '{vhost}'")));
            }
            self.write_definitions(&[MetaChange::Put { key: policy_records::policy_key(vhost, name), value: record }])?;
            let mut model = self.core.lock_model();
            let mut policies = model.vhost(vhost).map(|found| found.policies().to_vec()).unwrap_or_default();
            let created = !policies.iter().any(|found| found.name == name);
            policies.retain(|found| found.name != name);
            policies.push(policy);
            let mut effects = model.set_policies(vhost, policies);
            self.core.send(&mut effects);
            drop(model);
            // Dead letters may declare an automatic dead-letter queue, which takes this lock.
            drop(definitions_lock);
            self.core.apply(effects);
            Ok(created)
        })
    }

    /// Deletes a policy; what it set no longer applies to the vhost's queues and exchanges.
    pub(crate) fn delete_policy_here(&self, vhost: &str, name: &str) -> Result<(), ManagementError> {
        if self.is_configured_policy(vhost, name) {
            return Err(ManagementError::BadRequest(format!(
                "policy '{name}' in vhost '{vhost}' is defined by the broker's configuration (wharf.toml \
                 [[policies]], --policy); remove it there"
            )));
        }
        crate::core::blocking(|| {
            let definitions_lock = self.core.definitions();
            let exists = self
                .core
                .lock_model()
                .vhost(vhost)
                .is_some_and(|found| found.policies().iter().any(|policy| policy.name == name));
            if !exists {
                return Err(ManagementError::NotFound(format!("no policy '{name}' in vhost '{vhost}'")));
            }
            self.write_definitions(&[MetaChange::Delete { key: policy_records::policy_key(vhost, name) }])?;
            let mut model = self.core.lock_model();
            let mut policies = model.vhost(vhost).map(|found| found.policies().to_vec()).unwrap_or_default();
            policies.retain(|found| found.name != name);
            let mut effects = model.set_policies(vhost, policies);
            self.core.send(&mut effects);
            drop(model);
            drop(definitions_lock);
            self.core.apply(effects);
            Ok(())
        })
    }
}
