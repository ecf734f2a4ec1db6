//! Authorization, with RabbitMQ's model: per user and vhost, a `configure`, a `write` and a `read`
//! regular expression over resource names, plus topic permissions (per exchange, `write` and
//! `read` expressions over routing keys) for topic exchanges.
//!
//! This module owns the rules and their answers; the session asks before every method, in the
//! order and with the rights `rabbit_channel` uses (see `session/`), so that an application whose
//! permissions work on RabbitMQ works here unchanged. A refusal is a 403 `ACCESS_REFUSED` channel
//! error naming the right, the resource and the user, in RabbitMQ's words.
//!
//! Decisions, with reasons:
//! - Patterns are Rust regular expressions (RabbitMQ uses PCRE). They agree on everything
//!   permissions are written with in practice (anchors, classes, alternation); look-around and
//!   back-references are refused at start with the pattern named, never silently mismatched.
//! - An empty pattern matches only the empty name, as in RabbitMQ (which substitutes `^$`), and
//!   the default exchange is checked under the name `amq.default`, as RabbitMQ does.
//! - A pattern that matches every name (`.*`, `^.*`, `^.*$`) is answered without running a
//!   regular expression, so the common full-access grant costs nothing per publish.
//! - Topic patterns may use `{username}` and `{vhost}`, expanded at start, as RabbitMQ's internal
//!   backend does. A user with no topic permission for an exchange may use any routing key on it.

use regex::Regex;
use std::collections::HashMap;
use std::sync::Arc;
use wharf_model::ModelError;

/// One user's permissions on one vhost (RabbitMQ's `set_permissions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    /// The user.
    pub user: String,
    /// The vhost.
    pub vhost: String,
    /// Names the user may declare, delete and bind from (regular expression).
    pub configure: String,
    /// Names the user may publish to or bind to (regular expression).
    pub write: String,
    /// Names the user may consume from, get from, purge, or bind from (regular expression).
    pub read: String,
}

impl Permission {
    /// Every right on every resource of `vhost` (`".*" ".*" ".*"`).
    pub fn full(user: &str, vhost: &str) -> Self {
        Permission {
            user: user.to_owned(),
            vhost: vhost.to_owned(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        }
    }
}

/// One user's topic permission on one exchange of one vhost (RabbitMQ's
/// `set_topic_permissions`): which routing keys it may publish with, and bind with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPermission {
    /// The user.
    pub user: String,
    /// The vhost.
    pub vhost: String,
    /// The topic exchange it applies to.
    pub exchange: String,
    /// Routing keys the user may publish with (regular expression).
    pub write: String,
    /// Routing keys the user may bind with (regular expression).
    pub read: String,
}

/// A right, by RabbitMQ's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Right {
    Configure,
    Write,
    Read,
}

impl Right {
    fn name(self) -> &'static str {
        match self {
            Right::Configure => "configure",
            Right::Write => "write",
            Right::Read => "read",
        }
    }
}

/// What kind of resource a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    Exchange,
    Queue,
}

/// A permission pattern, compiled.
#[derive(Debug, Clone)]
enum Pattern {
    /// Matches every name.
    Any,
    Regex(Regex),
}

impl Pattern {
    fn compile(source: &str) -> Result<Pattern, regex::Error> {
        match source {
            ".*" | "^.*" | "^.*$" | ".*$" => Ok(Pattern::Any),
            // RabbitMQ reads an empty pattern as `^$`.
            "" => Ok(Pattern::Regex(Regex::new("^$")?)),
            source => Ok(Pattern::Regex(Regex::new(source)?)),
        }
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Regex(regex) => regex.is_match(name),
        }
    }
}

#[derive(Debug)]
struct TopicGrant {
    exchange: String,
    write: Pattern,
    read: Pattern,
}

/// What one user may do in one vhost; a connection holds the one for its user and vhost.
#[derive(Debug)]
pub(crate) struct VhostGrant {
    user: String,
    vhost: String,
    configure: Pattern,
    write: Pattern,
    read: Pattern,
    topics: Vec<TopicGrant>,
}

impl VhostGrant {
    /// The user this grant is for.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Allows `right` on the exchange or queue `name`, or refuses with RabbitMQ's 403.
    pub fn check(&self, right: Right, resource: Resource, name: &str) -> Result<(), ModelError> {
        let pattern = match right {
            Right::Configure => &self.configure,
            Right::Write => &self.write,
            Right::Read => &self.read,
        };
        let (kind, name) = match resource {
            Resource::Exchange if name.is_empty() => ("exchange", "amq.default"),
            Resource::Exchange => ("exchange", name),
            Resource::Queue => ("queue", name),
        };
        if pattern.matches(name) {
            return Ok(());
        }
        Err(ModelError::access_refused(format!(
            "{} access to {kind} '{name}' in vhost '{}' refused for user '{}'",
            right.name(),
            self.vhost,
            self.user
        )))
    }

    /// Whether any topic permission names `exchange` (only then does a topic check need the
    /// exchange's kind).
    pub fn has_topic_rules(&self, exchange: &str) -> bool {
        self.topics.iter().any(|topic| topic.exchange == exchange)
    }

    /// Allows `right` (write to publish, read to bind) with `routing_key` on the topic exchange
    /// `exchange`, or refuses with RabbitMQ's 403.
    pub fn check_topic(&self, right: Right, exchange: &str, routing_key: &str) -> Result<(), ModelError> {
        let Some(topic) = self.topics.iter().find(|topic| topic.exchange == exchange) else { return Ok(()) };
        let pattern = match right {
            Right::Write => &topic.write,
            Right::Read => &topic.read,
            Right::Configure => return Ok(()),
        };
        if pattern.matches(routing_key) {
            return Ok(());
        }
        Err(ModelError::access_refused(format!(
            "{} access to topic '{routing_key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
            right.name(),
            self.vhost,
            self.user
        )))
    }
}

/// Every user's grants, compiled at start.
#[derive(Debug, Default)]
pub(crate) struct Access {
    grants: HashMap<(String, String), Arc<VhostGrant>>,
}

/// A permission whose pattern is not a valid regular expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} of user '{user}' in vhost '{vhost}': pattern {pattern:?} is not a valid regular expression: {reason}")]
pub struct PermissionError {
    /// Which pattern (`configure`, `write`, `read`, or the topic permission's exchange).
    pub what: String,
    /// The user.
    pub user: String,
    /// The vhost.
    pub vhost: String,
    /// The pattern.
    pub pattern: String,
    /// Why it does not compile.
    pub reason: String,
}

impl PermissionError {
    fn new(what: String, user: &str, vhost: &str, pattern: &str, error: &regex::Error) -> Self {
        PermissionError {
            what,
            user: user.to_owned(),
            vhost: vhost.to_owned(),
            pattern: pattern.to_owned(),
            reason: error.to_string(),
        }
    }
}

impl Access {
    /// Compiles the permissions. A later permission for the same user and vhost replaces an
    /// earlier one, as a later `set_permissions` does.
    pub fn new(permissions: &[Permission], topic_permissions: &[TopicPermission]) -> Result<Access, PermissionError> {
        let mut compiled: HashMap<(String, String), VhostGrant> = HashMap::new();
        for permission in permissions {
            let compile = |what: &str, source: &str| {
                Pattern::compile(source).map_err(|error| {
                    PermissionError::new(
                        format!("the {what} permission"),
                        &permission.user,
                        &permission.vhost,
                        source,
                        &error,
                    )
                })
            };
            let grant = VhostGrant {
                user: permission.user.clone(),
                vhost: permission.vhost.clone(),
                configure: compile("configure", &permission.configure)?,
                write: compile("write", &permission.write)?,
                read: compile("read", &permission.read)?,
                topics: Vec::new(),
            };
            compiled.insert((permission.user.clone(), permission.vhost.clone()), grant);
        }
        for topic in topic_permissions {
            let key = (topic.user.clone(), topic.vhost.clone());
            // A topic permission without a vhost permission grants nothing (no vhost access).
            let Some(grant) = compiled.get_mut(&key) else { continue };
            let compile = |what: &str, source: &str| {
                let expanded = source.replace("{username}", &topic.user).replace("{vhost}", &topic.vhost);
                Pattern::compile(&expanded).map_err(|error| {
                    let what = format!("the topic {what} permission on exchange '{}'", topic.exchange);
                    PermissionError::new(what, &topic.user, &topic.vhost, source, &error)
                })
            };
            let compiled_topic = TopicGrant {
                exchange: topic.exchange.clone(),
                write: compile("write", &topic.write)?,
                read: compile("read", &topic.read)?,
            };
            grant.topics.retain(|existing| existing.exchange != topic.exchange);
            grant.topics.push(compiled_topic);
        }
        Ok(Access { grants: compiled.into_iter().map(|(key, grant)| (key, Arc::new(grant))).collect() })
    }

    /// What `user` may do in `vhost`, or `None` if it may not use the vhost at all.
    pub fn grant(&self, user: &str, vhost: &str) -> Option<Arc<VhostGrant>> {
        self.grants.get(&(user.to_owned(), vhost.to_owned())).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permission(configure: &str, write: &str, read: &str) -> Permission {
        Permission {
            user: "u".into(),
            vhost: "/".into(),
            configure: configure.into(),
            write: write.into(),
            read: read.into(),
        }
    }

    #[test]
    fn patterns_follow_rabbitmq_and_refusals_name_right_resource_and_user() {
        let access = Access::new(&[permission("^app\\.", "", ".*")], &[]).unwrap();
        let grant = access.grant("u", "/").unwrap();
        assert!(grant.check(Right::Configure, Resource::Queue, "app.orders").is_ok());
        let refused = grant.check(Right::Configure, Resource::Queue, "other").unwrap_err();
        assert_eq!(refused.code, 403);
        assert_eq!(
            refused.text,
            "ACCESS_REFUSED - configure access to queue 'other' in vhost '/' refused for user 'u'"
        );
        // The empty pattern matches nothing but the empty name; the default exchange is amq.default.
        let refused = grant.check(Right::Write, Resource::Exchange, "").unwrap_err();
        assert!(refused.text.contains("write access to exchange 'amq.default'"), "{}", refused.text);
        assert!(grant.check(Right::Read, Resource::Queue, "anything").is_ok());
        assert!(access.grant("u", "other-vhost").is_none());
        assert!(access.grant("nobody", "/").is_none());
    }

    #[test]
    fn topic_permissions_expand_variables_and_apply_only_to_their_exchange() {
        let topic = TopicPermission {
            user: "u".into(),
            vhost: "/".into(),
            exchange: "amq.topic".into(),
            write: "^{username}\\.".into(),
            read: "^shared\\.".into(),
        };
        let access = Access::new(&[permission(".*", ".*", ".*")], &[topic]).unwrap();
        let grant = access.grant("u", "/").unwrap();
        assert!(grant.check_topic(Right::Write, "amq.topic", "u.readings").is_ok());
        let refused = grant.check_topic(Right::Write, "amq.topic", "v.readings").unwrap_err();
        assert_eq!(
            refused.text,
            "ACCESS_REFUSED - write access to topic 'v.readings' in exchange 'amq.topic' in vhost '/' refused for user 'u'"
        );
        assert!(grant.check_topic(Right::Read, "amq.topic", "shared.x").is_ok());
        assert!(grant.check_topic(Right::Read, "amq.topic", "u.x").is_err());
        assert!(grant.check_topic(Right::Write, "other", "v.readings").is_ok(), "no rule for that exchange");
        assert!(grant.has_topic_rules("amq.topic") && !grant.has_topic_rules("other"));
    }

    #[test]
    fn a_bad_pattern_is_refused_with_its_place_named() {
        let error = Access::new(&[permission("(", ".*", ".*")], &[]).unwrap_err();
        assert_eq!(
            (error.what.as_str(), error.user.as_str(), error.vhost.as_str()),
            ("the configure permission", "u", "/")
        );
        assert!(error.to_string().contains("not a valid regular expression"));
    }
}
