//! `--definitions FILE`: RabbitMQ's definitions JSON, in the shape `rabbitmqctl
//! export_definitions` and the management API write it, loaded at start.
//!
//! This module owns reading that file ([`Definitions::parse`]), folding its users, vhosts,
//! permissions, limits and policies into a [`BrokerConfig`], and declaring its exchanges, queues
//! and bindings once the broker has recovered (through the same paths a client's declarations
//! take, so they are durable like any other).
//!
//! Decisions, with reasons:
//! - What decides who may do what (users, password hashes, permissions, policies) must be right
//!   or the broker does not start: a half-loaded access list is worse than none. A problem there
//!   is an error naming the item.
//! - Exchanges, queues and bindings are declared one by one; one the broker refuses (an unknown
//!   exchange type, a clash with what is already stored) is a warning naming it, and the others
//!   still load. Declaring what already exists is a no-op, so loading is idempotent and the same
//!   file can be given at every start.
//! - Every field Wharf does not use gets one warning per section and field name (not one per
//!   item: an export of 10,000 queues would otherwise drown the log).

use crate::access::{Permission, TopicPermission};
use crate::config::{BrokerConfig, User, UserLimits, VhostLimits};
use crate::core::Core;
use crate::definitions::{BindingChange, QueueRequest};
use crate::password::PasswordHash;
use crate::persist::json_to_amqp;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use wharf_model::{ConnectionId, Destination, Policy};
use wharf_wire::types::{AMQPValue, FieldTable, ShortString};

/// Largest definitions file read, in bytes: far above any real export, and a bound on what a
/// mistaken path (a log file, a device) can make the broker read into memory.
pub const DEFINITIONS_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Why a definitions file cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionsError {
    /// Not JSON, or not an object at the top.
    #[error("not a RabbitMQ definitions file: {0}")]
    NotDefinitions(String),
    /// One item is wrong: where (`users[2]`), and why.
    #[error("{place}: {reason}")]
    Item {
        /// The item, as `section[index]` or `section[index].field`.
        place: String,
        /// What is wrong.
        reason: String,
    },
}

/// An exchange to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedExchange {
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Type (`direct`, `topic`, …).
    pub kind: String,
    /// Durable.
    pub durable: bool,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Internal.
    pub internal: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

/// A queue to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedQueue {
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Durable.
    pub durable: bool,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

/// A binding to make.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedBinding {
    /// Vhost.
    pub vhost: String,
    /// Source exchange.
    pub source: String,
    /// Destination queue or exchange.
    pub destination: Destination,
    /// Routing key.
    pub routing_key: String,
    /// Arguments.
    pub arguments: FieldTable,
}

/// The exchanges, queues and bindings of a definitions file, declared after recovery.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Topology {
    /// Declared first.
    pub exchanges: Vec<ImportedExchange>,
    /// Then these.
    pub queues: Vec<ImportedQueue>,
    /// Last.
    pub bindings: Vec<ImportedBinding>,
}

/// A parsed definitions file.
#[derive(Debug, Clone, Default)]
pub struct Definitions {
    /// Users (with their hashes and tags).
    pub users: Vec<User>,
    /// Vhost names.
    pub vhosts: Vec<String>,
    /// Permissions.
    pub permissions: Vec<Permission>,
    /// Topic permissions.
    pub topic_permissions: Vec<TopicPermission>,
    /// Per-user limits (`users[].limits`).
    pub user_limits: Vec<UserLimits>,
    /// Per-vhost limits (`vhosts[].limits` or `vhost-limits` parameters).
    pub vhost_limits: Vec<VhostLimits>,
    /// Policies, as (vhost, policy).
    pub policies: Vec<(String, Policy)>,
    /// Exchanges, queues and bindings.
    pub topology: Topology,
    /// Fields and sections Wharf does not use, one line each.
    pub warnings: Vec<String>,
}

/// One item of a section: its place (`users[2]`) and its fields.
type Item<'a> = (String, &'a Map<String, Value>);

/// Reads one section's items, collecting the fields they carry that are not in `used`.
struct Section<'a> {
    name: &'static str,
    items: &'a [Value],
    unused: BTreeSet<String>,
}

impl<'a> Section<'a> {
    fn new(root: &'a Map<String, Value>, name: &'static str) -> Result<Section<'a>, DefinitionsError> {
        let items = match root.get(name) {
            None | Some(Value::Null) => &[][..],
            Some(Value::Array(items)) => items.as_slice(),
            Some(_) => return Err(item_error(name.to_owned(), "must be a list")),
        };
        Ok(Section { name, items, unused: BTreeSet::new() })
    }

    /// Each item as an object, with its place for error messages.
    fn objects(&mut self, used: &[&str]) -> Result<Vec<Item<'a>>, DefinitionsError> {
        let mut objects = Vec::with_capacity(self.items.len());
        for (index, item) in self.items.iter().enumerate() {
            let place = format!("{}[{index}]", self.name);
            let Value::Object(object) = item else { return Err(item_error(place, "must be an object")) };
            for key in object.keys() {
                if !used.contains(&key.as_str()) {
                    self.unused.insert(key.clone());
                }
            }
            objects.push((place, object));
        }
        Ok(objects)
    }

    fn warn_unused(&self, warnings: &mut Vec<String>) {
        for field in &self.unused {
            warnings.push(format!("{}[].{field} is not used by Wharf; ignored", self.name));
        }
    }
}

fn item_error(place: String, reason: impl Into<String>) -> DefinitionsError {
    DefinitionsError::Item { place, reason: reason.into() }
}

fn text(object: &Map<String, Value>, place: &str, field: &str) -> Result<String, DefinitionsError> {
    match object.get(field) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(item_error(format!("{place}.{field}"), "must be a string")),
        None => Err(item_error(format!("{place}.{field}"), "is missing")),
    }
}

fn text_or(object: &Map<String, Value>, place: &str, field: &str, default: &str) -> Result<String, DefinitionsError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(default.to_owned()),
        Some(_) => text(object, place, field),
    }
}

fn flag(object: &Map<String, Value>, place: &str, field: &str, default: bool) -> Result<bool, DefinitionsError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(item_error(format!("{place}.{field}"), "must be true or false")),
    }
}

/// An AMQP name: at most 255 bytes (a short string on the wire).
fn amqp_name(object: &Map<String, Value>, place: &str, field: &str) -> Result<String, DefinitionsError> {
    let name = text(object, place, field)?;
    if ShortString::try_new(name.as_str()).is_err() {
        return Err(item_error(format!("{place}.{field}"), "is longer than 255 bytes"));
    }
    Ok(name)
}

/// Arguments as a field table that the stored-definitions format can read back (it refuses
/// nesting deeper than the wire's limit, so a deeper one is refused here, before it is stored).
fn arguments(object: &Map<String, Value>, place: &str) -> Result<FieldTable, DefinitionsError> {
    let bad = |reason: &str| item_error(format!("{place}.arguments"), reason);
    match object.get("arguments") {
        None | Some(Value::Null) => Ok(FieldTable::default()),
        Some(value @ Value::Object(_)) => match json_to_amqp(value) {
            Some(AMQPValue::FieldTable(table)) => {
                let reads_back = wharf_wire::frame::encode_field_table(&table)
                    .and_then(|bytes| wharf_wire::frame::decode_field_table(&bytes))
                    .is_some();
                if reads_back { Ok(table) } else { Err(bad("nests too deeply or is too large")) }
            }
            _ => Err(bad("has a value that is not a string, integer, boolean, list or object")),
        },
        Some(_) => Err(bad("must be an object")),
    }
}

/// A limit: RabbitMQ writes a negative number for "no limit".
fn limit(value: &Value, place: &str) -> Result<Option<u32>, DefinitionsError> {
    match value.as_i64() {
        Some(number) if number < 0 => Ok(None),
        Some(number) => Ok(Some(u32::try_from(number).unwrap_or(u32::MAX))),
        None => Err(item_error(place.to_owned(), "must be an integer")),
    }
}

impl Definitions {
    /// Parses a definitions file. An item that cannot be used as written is an error naming it;
    /// fields Wharf does not use become [`Definitions::warnings`].
    pub fn parse(json: &[u8]) -> Result<Definitions, DefinitionsError> {
        if json.len() > DEFINITIONS_BYTES_MAX {
            return Err(DefinitionsError::NotDefinitions(format!("larger than {DEFINITIONS_BYTES_MAX} bytes")));
        }
        let root: Value =
            serde_json::from_slice(json).map_err(|error| DefinitionsError::NotDefinitions(error.to_string()))?;
        let Value::Object(root) = root else {
            return Err(DefinitionsError::NotDefinitions("the top level must be an object".into()));
        };
        let mut definitions = Definitions::default();
        const INFORMATIONAL: [&str; 4] = ["rabbit_version", "rabbitmq_version", "product_name", "product_version"];
        const SECTIONS: [&str; 10] = [
            "users",
            "vhosts",
            "permissions",
            "topic_permissions",
            "policies",
            "parameters",
            "global_parameters",
            "exchanges",
            "queues",
            "bindings",
        ];
        for key in root.keys() {
            if !INFORMATIONAL.contains(&key.as_str()) && !SECTIONS.contains(&key.as_str()) {
                definitions.warnings.push(format!("{key} is not used by Wharf; ignored"));
            }
        }
        definitions.read_users(&root)?;
        definitions.read_vhosts(&root)?;
        definitions.read_permissions(&root)?;
        definitions.read_policies(&root)?;
        definitions.read_parameters(&root)?;
        definitions.read_topology(&root)?;
        Ok(definitions)
    }

    fn read_users(&mut self, root: &Map<String, Value>) -> Result<(), DefinitionsError> {
        let mut section = Section::new(root, "users")?;
        for (place, user) in section.objects(&["name", "password_hash", "hashing_algorithm", "tags", "limits"])? {
            let name = text(user, &place, "name")?;
            let hash = text_or(user, &place, "password_hash", "")?;
            let algorithm = text_or(user, &place, "hashing_algorithm", "rabbit_password_hashing_sha256")?;
            // An empty hash is RabbitMQ's user without a password (certificate logins only).
            let password = if hash.is_empty() {
                PasswordHash::unusable()
            } else {
                PasswordHash::from_rabbitmq(&hash, &algorithm)
                    .map_err(|error| item_error(format!("{place}.password_hash"), error.to_string()))?
            };
            let tags = match user.get("tags") {
                None | Some(Value::Null) => Vec::new(),
                // RabbitMQ before 3.9 writes a comma-separated string, later ones a list.
                Some(Value::String(tags)) => {
                    tags.split(',').map(str::trim).filter(|tag| !tag.is_empty()).map(str::to_owned).collect()
                }
                Some(Value::Array(tags)) => tags
                    .iter()
                    .map(|tag| tag.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| item_error(format!("{place}.tags"), "must be strings"))?,
                Some(_) => return Err(item_error(format!("{place}.tags"), "must be a list or a string")),
            };
            if let Some(limits) = user.get("limits").and_then(Value::as_object) {
                let mut user_limits = UserLimits { user: name.clone(), ..UserLimits::default() };
                for (key, value) in limits {
                    let place = format!("{place}.limits.{key}");
                    match key.as_str() {
                        "max-connections" => user_limits.connections_max = limit(value, &place)?,
                        "max-channels" => user_limits.channels_max = limit(value, &place)?,
                        _ => self.warnings.push(format!("users[].limits.{key} is not used by Wharf; ignored")),
                    }
                }
                self.user_limits.push(user_limits);
            }
            // RabbitMQ's `loopback_users` default: `guest` logs in from loopback only, wherever it
            // was defined (exports from RabbitMQ usually carry it).
            let loopback_only = name == "guest";
            self.users.push(User { name, password, loopback_only, tags });
        }
        section.warn_unused(&mut self.warnings);
        Ok(())
    }

    fn read_vhosts(&mut self, root: &Map<String, Value>) -> Result<(), DefinitionsError> {
        let mut section = Section::new(root, "vhosts")?;
        for (place, vhost) in section.objects(&["name", "limits"])? {
            let name = text(vhost, &place, "name")?;
            if let Some(limits) = vhost.get("limits").and_then(Value::as_object) {
                self.read_vhost_limits(&name, limits, &place)?;
            }
            self.vhosts.push(name);
        }
        section.warn_unused(&mut self.warnings);
        Ok(())
    }

    fn read_vhost_limits(
        &mut self,
        vhost: &str,
        limits: &Map<String, Value>,
        place: &str,
    ) -> Result<(), DefinitionsError> {
        let mut vhost_limits = VhostLimits { vhost: vhost.to_owned(), ..VhostLimits::default() };
        for (key, value) in limits {
            let place = format!("{place}.{key}");
            match key.as_str() {
                "max-connections" => vhost_limits.connections_max = limit(value, &place)?,
                "max-queues" => vhost_limits.queues_max = limit(value, &place)?,
                _ => self.warnings.push(format!("vhost limit {key} is not used by Wharf; ignored")),
            }
        }
        self.vhost_limits.retain(|existing| existing.vhost != vhost);
        self.vhost_limits.push(vhost_limits);
        Ok(())
    }

    fn read_permissions(&mut self, root: &Map<String, Value>) -> Result<(), DefinitionsError> {
        let mut section = Section::new(root, "permissions")?;
        for (place, permission) in section.objects(&["user", "vhost", "configure", "write", "read"])? {
            self.permissions.push(Permission {
                user: text(permission, &place, "user")?,
                vhost: text(permission, &place, "vhost")?,
                configure: text(permission, &place, "configure")?,
                write: text(permission, &place, "write")?,
                read: text(permission, &place, "read")?,
            });
        }
        section.warn_unused(&mut self.warnings);
        let mut section = Section::new(root, "topic_permissions")?;
        for (place, permission) in section.objects(&["user", "vhost", "exchange", "write", "read"])? {
            self.topic_permissions.push(TopicPermission {
                user: text(permission, &place, "user")?,
                vhost: text(permission, &place, "vhost")?,
                exchange: text(permission, &place, "exchange")?,
                write: text(permission, &place, "write")?,
                read: text(permission, &place, "read")?,
            });
        }
        section.warn_unused(&mut self.warnings);
        // Checked here, so a bad pattern is named with its place in the file.
        crate::access::Access::new(&self.permissions, &self.topic_permissions)
            .map_err(|error| item_error("permissions".into(), error.to_string()))?;
        Ok(())
    }

    fn read_policies(&mut self, root: &Map<String, Value>) -> Result<(), DefinitionsError> {
        let mut section = Section::new(root, "policies")?;
        for (place, policy) in section.objects(&["vhost", "name", "pattern", "apply-to", "definition", "priority"])? {
            let name = text(policy, &place, "name")?;
            let vhost = text_or(policy, &place, "vhost", "/")?;
            let pattern = text(policy, &place, "pattern")?;
            let apply_to = text_or(policy, &place, "apply-to", "all")?;
            let priority = match policy.get("priority") {
                None | Some(Value::Null) => 0,
                Some(value) => {
                    value.as_i64().ok_or_else(|| item_error(format!("{place}.priority"), "must be an integer"))?
                }
            };
            let Some(Value::Object(definition)) = policy.get("definition") else {
                return Err(item_error(format!("{place}.definition"), "must be an object"));
            };
            // Keys for features Wharf does not have (mirroring, lazy mode, federation) are dropped
            // with a warning; a policy with nothing left is skipped.
            let mut known = Map::new();
            for (key, value) in definition {
                if wharf_model::policy::POLICY_KEYS.contains(&key.as_str()) {
                    known.insert(key.clone(), value.clone());
                } else {
                    self.warnings
                        .push(format!("policy '{name}' in vhost '{vhost}': key '{key}' is not used by Wharf; ignored"));
                }
            }
            if known.is_empty() {
                continue;
            }
            let policy = crate::policy_from_json(&name, &pattern, &apply_to, priority, &Value::Object(known))
                .map_err(|reason| item_error(place.clone(), reason))?;
            self.policies.retain(|(existing_vhost, existing)| !(existing_vhost == &vhost && existing.name == name));
            self.policies.push((vhost, policy));
        }
        section.warn_unused(&mut self.warnings);
        Ok(())
    }

    fn read_parameters(&mut self, root: &Map<String, Value>) -> Result<(), DefinitionsError> {
        let mut section = Section::new(root, "parameters")?;
        for (place, parameter) in section.objects(&["vhost", "component", "name", "value"])? {
            let component = text(parameter, &place, "component")?;
            if component != "vhost-limits" {
                self.warnings.push(format!("parameters of component '{component}' are not used by Wharf; ignored"));
                continue;
            }
            let vhost = text_or(parameter, &place, "vhost", "/")?;
            let Some(Value::Object(limits)) = parameter.get("value") else {
                return Err(item_error(format!("{place}.value"), "must be an object"));
            };
            self.read_vhost_limits(&vhost, limits, &format!("{place}.value"))?;
        }
        section.warn_unused(&mut self.warnings);
        let global = Section::new(root, "global_parameters")?;
        if !global.items.is_empty() {
            self.warnings.push("global_parameters are not used by Wharf; ignored".into());
        }
        self.warnings.sort();
        self.warnings.dedup();
        Ok(())
    }

    fn read_topology(&mut self, root: &Map<String, Value>) -> Result<(), DefinitionsError> {
        let mut section = Section::new(root, "exchanges")?;
        let used = ["name", "vhost", "type", "durable", "auto_delete", "internal", "arguments"];
        for (place, exchange) in section.objects(&used)? {
            self.topology.exchanges.push(ImportedExchange {
                vhost: text_or(exchange, &place, "vhost", "/")?,
                name: amqp_name(exchange, &place, "name")?,
                kind: text(exchange, &place, "type")?,
                durable: flag(exchange, &place, "durable", true)?,
                auto_delete: flag(exchange, &place, "auto_delete", false)?,
                internal: flag(exchange, &place, "internal", false)?,
                arguments: arguments(exchange, &place)?,
            });
        }
        section.warn_unused(&mut self.warnings);
        let mut section = Section::new(root, "queues")?;
        for (place, queue) in section.objects(&["name", "vhost", "durable", "auto_delete", "arguments", "type"])? {
            self.topology.queues.push(ImportedQueue {
                vhost: text_or(queue, &place, "vhost", "/")?,
                name: amqp_name(queue, &place, "name")?,
                durable: flag(queue, &place, "durable", true)?,
                auto_delete: flag(queue, &place, "auto_delete", false)?,
                arguments: arguments(queue, &place)?,
            });
        }
        section.warn_unused(&mut self.warnings);
        let mut section = Section::new(root, "bindings")?;
        let used = ["source", "vhost", "destination", "destination_type", "routing_key", "arguments"];
        for (place, binding) in section.objects(&used)? {
            let destination = amqp_name(binding, &place, "destination")?;
            let destination = match text_or(binding, &place, "destination_type", "queue")?.as_str() {
                "queue" => Destination::Queue(destination),
                "exchange" => Destination::Exchange(destination),
                other => {
                    let reason = format!("must be 'queue' or 'exchange', not '{other}'");
                    return Err(item_error(format!("{place}.destination_type"), reason));
                }
            };
            self.topology.bindings.push(ImportedBinding {
                vhost: text_or(binding, &place, "vhost", "/")?,
                source: amqp_name(binding, &place, "source")?,
                destination,
                routing_key: amqp_name(binding, &place, "routing_key")?,
                arguments: arguments(binding, &place)?,
            });
        }
        section.warn_unused(&mut self.warnings);
        self.warnings.sort();
        self.warnings.dedup();
        Ok(())
    }
}

impl BrokerConfig {
    /// Folds a definitions file into this configuration: its users (replacing any of the same
    /// name), vhosts, permissions, topic permissions, limits and policies (a later one of the same
    /// name and vhost replacing an earlier one), and its exchanges, queues and bindings, which the
    /// broker declares once it has recovered its data directory.
    pub fn import_definitions(&mut self, definitions: Definitions) {
        for user in definitions.users {
            self.users.retain(|existing| existing.name != user.name);
            self.users.push(user);
        }
        for vhost in definitions.vhosts {
            if !self.vhosts.contains(&vhost) {
                self.vhosts.push(vhost);
            }
        }
        for permission in definitions.permissions {
            self.permissions
                .retain(|existing| !(existing.user == permission.user && existing.vhost == permission.vhost));
            self.permissions.push(permission);
        }
        for topic in definitions.topic_permissions {
            self.topic_permissions.retain(|existing| {
                !(existing.user == topic.user && existing.vhost == topic.vhost && existing.exchange == topic.exchange)
            });
            self.topic_permissions.push(topic);
        }
        for limits in definitions.user_limits {
            self.user_limits.retain(|existing| existing.user != limits.user);
            self.user_limits.push(limits);
        }
        for limits in definitions.vhost_limits {
            self.vhost_limits.retain(|existing| existing.vhost != limits.vhost);
            self.vhost_limits.push(limits);
        }
        for (vhost, policy) in definitions.policies {
            self.policies
                .retain(|(existing_vhost, existing)| !(existing_vhost == &vhost && existing.name == policy.name));
            self.policies.push((vhost, policy));
        }
        let topology = &mut self.imported_topology;
        topology.exchanges.extend(definitions.topology.exchanges);
        topology.queues.extend(definitions.topology.queues);
        topology.bindings.extend(definitions.topology.bindings);
    }
}

impl Core {
    /// Declares the imported exchanges, queues and bindings (blocking: run it off the async
    /// workers). What exists already is left as it is; what the broker refuses is a warning.
    pub fn declare_imported_topology(&self) {
        let topology = &self.config.imported_topology;
        let mut declared = 0usize;
        for exchange in &topology.exchanges {
            let exists =
                self.lock_model().vhost(&exchange.vhost).is_some_and(|vhost| vhost.exchange(&exchange.name).is_some());
            // The built-in `amq.*` exchanges cannot be declared by anyone, and need not be.
            if exists && exchange.name.starts_with("amq.") {
                continue;
            }
            let declare = wharf_wire::protocol::exchange::Declare {
                exchange: exchange.name.as_str().into(),
                kind: exchange.kind.as_str().into(),
                passive: false,
                durable: exchange.durable,
                auto_delete: exchange.auto_delete,
                internal: exchange.internal,
                nowait: false,
                arguments: exchange.arguments.clone(),
            };
            match self.declare_exchange(&exchange.vhost, &declare) {
                Ok(()) => declared += 1,
                Err(error) => tracing::warn!(
                    vhost = %exchange.vhost, exchange = %exchange.name, %error,
                    "definitions file: exchange not declared"
                ),
            }
        }
        for queue in &topology.queues {
            let request = QueueRequest {
                vhost: &queue.vhost,
                name: queue.name.clone(),
                passive: false,
                durable: queue.durable,
                exclusive: false,
                auto_delete: queue.auto_delete,
                arguments: &queue.arguments,
                connection: ConnectionId(0),
                server_named: false,
                grant: None,
            };
            match self.declare_queue(request) {
                Ok(_) => declared += 1,
                Err(error) => {
                    tracing::warn!(vhost = %queue.vhost, queue = %queue.name, %error, "definitions file: queue not declared")
                }
            }
        }
        for binding in &topology.bindings {
            let change = BindingChange {
                vhost: &binding.vhost,
                connection: ConnectionId(0),
                source: &binding.source,
                destination: &binding.destination,
                routing_key: &binding.routing_key,
                arguments: &binding.arguments,
            };
            match self.change_binding(&change, true) {
                Ok(()) => declared += 1,
                Err(error) => tracing::warn!(
                    vhost = %binding.vhost, source = %binding.source, destination = ?binding.destination, %error,
                    "definitions file: binding not made"
                ),
            }
        }
        let total = topology.exchanges.len() + topology.queues.len() + topology.bindings.len();
        if total > 0 {
            tracing::info!(declared, total, "definitions file: exchanges, queues and bindings declared");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rabbitmq_export_is_read_whole_with_warnings_for_what_is_not_used() {
        let json = br##"{
            "rabbit_version": "3.10.8", "rabbitmq_version": "3.10.8",
            "product_name": "RabbitMQ", "product_version": "3.10.8",
            "users": [
                {"name": "test", "password_hash": "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR",
                 "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"],
                 "limits": {"max-connections": 10, "max-channels": -1}},
                {"name": "old", "password_hash": "", "tags": "management,monitoring"}
            ],
            "vhosts": [{"name": "/", "description": "Default", "tags": [], "metadata": {}}, {"name": "orders"}],
            "permissions": [{"user": "test", "vhost": "orders", "configure": "^app\\.", "write": ".*", "read": ".*"}],
            "topic_permissions": [{"user": "test", "vhost": "orders", "exchange": "amq.topic", "write": "^a", "read": ".*"}],
            "parameters": [{"vhost": "orders", "component": "vhost-limits", "name": "limits", "value": {"max-queues": 100}},
                           {"vhost": "orders", "component": "shovel", "name": "s", "value": {}}],
            "global_parameters": [{"name": "cluster_name", "value": "rabbit@host"}],
            "policies": [{"vhost": "orders", "name": "dlx", "pattern": "^app\\.", "apply-to": "queues",
                          "definition": {"dead-letter-exchange": "dead", "ha-mode": "all"}, "priority": 1}],
            "queues": [{"name": "app.q", "vhost": "orders", "durable": true, "auto_delete": false,
                        "arguments": {"x-queue-type": "quorum", "x-nested": {"a": [1, "b"]}}}],
            "exchanges": [{"name": "app.x", "vhost": "orders", "type": "topic", "durable": true,
                           "auto_delete": false, "internal": false, "arguments": {}}],
            "bindings": [{"source": "app.x", "vhost": "orders", "destination": "app.q",
                          "destination_type": "queue", "routing_key": "#", "arguments": {}}]
        }"##;
        let definitions = Definitions::parse(json).unwrap();
        assert_eq!(definitions.users.len(), 2);
        assert!(definitions.users[0].password.verify(b"test12"), "RabbitMQ's own example hash verifies");
        assert_eq!(definitions.users[0].tags, ["administrator"]);
        assert_eq!(definitions.users[1].tags, ["management", "monitoring"]);
        assert!(!definitions.users[1].password.verify(b""), "an empty hash lets no password in");
        assert!(!definitions.users[0].loopback_only);
        let guest = br#"{"users": [{"name": "guest", "password_hash": "", "tags": ["administrator"]}]}"#;
        assert!(Definitions::parse(guest).unwrap().users[0].loopback_only, "guest stays loopback-only");
        assert_eq!(definitions.vhosts, ["/", "orders"]);
        assert_eq!(definitions.permissions[0].configure, "^app\\.");
        assert_eq!(definitions.topic_permissions[0].exchange, "amq.topic");
        assert_eq!(definitions.user_limits[0].connections_max, Some(10));
        assert_eq!(definitions.user_limits[0].channels_max, None, "negative is no limit");
        assert_eq!(definitions.vhost_limits[0].queues_max, Some(100));
        assert_eq!(definitions.policies.len(), 1);
        assert_eq!(definitions.topology.queues[0].name, "app.q");
        assert_eq!(definitions.topology.exchanges[0].kind, "topic");
        assert_eq!(definitions.topology.bindings[0].destination, Destination::Queue("app.q".into()));
        let warnings = definitions.warnings.join("\n");
        for expected in
            ["vhosts[].description", "vhosts[].metadata", "'ha-mode'", "component 'shovel'", "global_parameters"]
        {
            assert!(warnings.contains(expected), "a warning for {expected}:\n{warnings}");
        }
        assert!(!warnings.contains("rabbit_version"), "informational fields are not warned about");
    }

    #[test]
    fn a_bad_item_is_named_and_nothing_loads() {
        let refused = |json: &str| Definitions::parse(json.as_bytes()).unwrap_err().to_string();
        assert!(refused("[]").contains("the top level must be an object"));
        assert!(refused("{").starts_with("not a RabbitMQ definitions file"));
        assert_eq!(
            refused(
                r#"{"users": [{"name": "a", "password_hash": "!!", "hashing_algorithm": "rabbit_password_hashing_sha256"}]}"#
            ),
            "users[0].password_hash: password_hash is not a base64 salt and rabbit_password_hashing_sha256 digest"
        );
        assert!(refused(r#"{"users": [{"password_hash": ""}]}"#).starts_with("users[0].name: is missing"));
        let bad_pattern =
            refused(r#"{"permissions": [{"user": "a", "vhost": "/", "configure": "(", "write": "", "read": ""}]}"#);
        assert!(bad_pattern.starts_with("permissions: the configure permission of user 'a'"), "{bad_pattern}");
        assert!(
            refused(r#"{"queues": [{"name": "q", "arguments": []}]}"#)
                .starts_with("queues[0].arguments: must be an object")
        );
        assert!(
            refused(
                r#"{"bindings": [{"source": "x", "destination": "q", "destination_type": "topic", "routing_key": ""}]}"#
            )
            .contains("destination_type")
        );
        let deep = format!(
            r#"{{"queues": [{{"name": "q", "arguments": {{"x-a": {}1{}}}}}]}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        assert!(refused(&deep).contains("nests too deeply"), "{}", refused(&deep));
    }

    #[test]
    fn importing_twice_is_the_same_as_importing_once() {
        let json = br#"{"users": [{"name": "a", "password_hash": "", "tags": []}],
                        "vhosts": [{"name": "v"}],
                        "permissions": [{"user": "a", "vhost": "v", "configure": ".*", "write": ".*", "read": ".*"}],
                        "policies": [{"vhost": "v", "name": "p", "pattern": ".*", "definition": {"delivery-limit": 3}}]}"#;
        let mut once = BrokerConfig::new("/data");
        once.import_definitions(Definitions::parse(json).unwrap());
        let mut twice = once.clone();
        twice.import_definitions(Definitions::parse(json).unwrap());
        assert_eq!(once.users.len(), twice.users.len());
        assert_eq!(once.vhosts, twice.vhosts);
        assert_eq!(once.permissions, twice.permissions);
        assert_eq!(once.policies.len(), twice.policies.len());
    }
}
