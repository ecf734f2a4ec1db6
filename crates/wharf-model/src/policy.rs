//! [`Policy`]: queue and exchange arguments applied by name pattern, as RabbitMQ's
//! `rabbitmqctl set_policy`, so operators set dead-lettering, limits, leases or de-duplication
//! without touching producers. Of the policies whose pattern matches a name, the one with the
//! highest priority applies (ties: the first by name); a queue's or exchange's own `x-` arguments
//! win over the policy's values.

use crate::error::{ModelError, Result};
use crate::exchange::ExchangeKind;
use crate::settings::{ExchangeSettings, QueueSettings, effective_arguments};
use wharf_wire::types::FieldTable;

/// Longest policy pattern.
pub const POLICY_PATTERN_BYTES_MAX: usize = 1024;
/// Most policies per vhost.
pub const POLICIES_MAX: usize = 1000;

/// The keys a policy definition may set (RabbitMQ's spelling, without `x-`).
pub const POLICY_KEYS: &[&str] = &[
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "delivery-limit",
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "overflow",
    "consumer-timeout",
    "retry-backoff",
    "deduplication",
    "deduplication-ttl",
    "deduplication-header",
    "single-active-consumer",
    "ordered-by",
    "alternate-exchange",
];

/// What a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTo {
    /// Queues only (RabbitMQ's `queues`).
    Queues,
    /// Exchanges only.
    Exchanges,
    /// Both (RabbitMQ's `all`).
    All,
}

impl ApplyTo {
    /// Parses RabbitMQ's names.
    pub fn parse(text: &str) -> Result<ApplyTo> {
        match text {
            "queues" => Ok(ApplyTo::Queues),
            "exchanges" => Ok(ApplyTo::Exchanges),
            "all" => Ok(ApplyTo::All),
            other => Err(ModelError::precondition_failed(format!(
                "invalid apply-to '{other}': must be 'queues', 'exchanges' or 'all'"
            ))),
        }
    }

    /// RabbitMQ's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyTo::Queues => "queues",
            ApplyTo::Exchanges => "exchanges",
            ApplyTo::All => "all",
        }
    }
}

/// A policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Its name (unique per vhost).
    pub name: String,
    /// The regular expression names are matched against (unanchored, as RabbitMQ).
    pub pattern: regex::Regex,
    /// What it applies to.
    pub apply_to: ApplyTo,
    /// Higher wins when several match.
    pub priority: i64,
    /// The arguments it sets, keys without `x-`.
    pub definition: FieldTable,
}

impl Policy {
    /// A checked policy: the pattern must compile, every key must be one Wharf knows, and every
    /// value must be one a queue (or exchange) argument could have.
    pub fn new(name: &str, pattern: &str, apply_to: ApplyTo, priority: i64, definition: FieldTable) -> Result<Policy> {
        if name.is_empty() || name.len() > 255 {
            return Err(ModelError::precondition_failed("a policy name must be 1 to 255 bytes"));
        }
        if pattern.len() > POLICY_PATTERN_BYTES_MAX {
            return Err(ModelError::precondition_failed(format!(
                "policy '{name}': the pattern is longer than {POLICY_PATTERN_BYTES_MAX} bytes"
            )));
        }
        let compiled = regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|error| ModelError::precondition_failed(format!("policy '{name}': invalid pattern: {error}")))?;
        if definition.inner().is_empty() {
            return Err(ModelError::precondition_failed(format!("policy '{name}': the definition is empty")));
        }
        for key in definition.inner().keys() {
            if !POLICY_KEYS.contains(&key.as_str()) {
                return Err(ModelError::precondition_failed(format!(
                    "policy '{name}': unknown key '{key}' (known: {})",
                    POLICY_KEYS.join(", ")
                )));
            }
        }
        let policy = Policy { name: name.to_owned(), pattern: compiled, apply_to, priority, definition };
        let arguments = effective_arguments(&FieldTable::default(), Some(&policy));
        QueueSettings::parse(&arguments)
            .map_err(|error| ModelError::precondition_failed(format!("policy '{name}': {}", error.text)))?;
        ExchangeSettings::parse(ExchangeKind::Direct, &arguments)
            .map_err(|error| ModelError::precondition_failed(format!("policy '{name}': {}", error.text)))?;
        Ok(policy)
    }

    fn applies(&self, name: &str, to_queue: bool) -> bool {
        let kind_matches = match self.apply_to {
            ApplyTo::All => true,
            ApplyTo::Queues => to_queue,
            ApplyTo::Exchanges => !to_queue,
        };
        kind_matches && self.pattern.is_match(name)
    }
}

/// Picks the policy for a queue (`to_queue`) or an exchange named `name`.
pub fn select<'a>(policies: &'a [Policy], name: &str, to_queue: bool) -> Option<&'a Policy> {
    policies
        .iter()
        .filter(|policy| policy.applies(name, to_queue))
        .max_by(|left, right| left.priority.cmp(&right.priority).then_with(|| right.name.cmp(&left.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_wire::types::AMQPValue;

    fn definition(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in pairs {
            table.insert(key.into(), value);
        }
        table
    }

    #[test]
    fn highest_priority_wins_and_own_arguments_win_over_policies() {
        let low = Policy::new(
            "low",
            "^orders",
            ApplyTo::Queues,
            1,
            definition(vec![("delivery-limit", AMQPValue::LongInt(5))]),
        )
        .unwrap();
        let high = Policy::new(
            "high",
            "^orders\\.",
            ApplyTo::All,
            9,
            definition(vec![("delivery-limit", AMQPValue::LongInt(7))]),
        )
        .unwrap();
        let policies = vec![low, high];
        assert_eq!(select(&policies, "orders.email", true).unwrap().name, "high");
        assert_eq!(select(&policies, "orders", true).unwrap().name, "low");
        assert!(select(&policies, "orders", false).is_none(), "queues-only policy");
        assert!(select(&policies, "payments", true).is_none());
        let own = definition(vec![("x-delivery-limit", AMQPValue::LongInt(3))]);
        let merged = effective_arguments(&own, select(&policies, "orders.email", true));
        assert_eq!(QueueSettings::parse(&merged).unwrap().delivery_limit, Some(3));
        let merged = effective_arguments(&FieldTable::default(), select(&policies, "orders.email", true));
        assert_eq!(QueueSettings::parse(&merged).unwrap().delivery_limit, Some(7));
    }

    #[test]
    fn bad_policies_are_refused_with_the_reason() {
        let bad = [
            ("(", definition(vec![("delivery-limit", AMQPValue::LongInt(5))]), "invalid pattern"),
            (".*", definition(vec![("delivery-limt", AMQPValue::LongInt(5))]), "unknown key 'delivery-limt'"),
            (".*", definition(vec![("message-ttl", AMQPValue::LongString("x".into()))]), "x-message-ttl"),
            (".*", FieldTable::default(), "empty"),
        ];
        for (pattern, definition, expected) in bad {
            let error = Policy::new("p", pattern, ApplyTo::All, 0, definition).unwrap_err();
            assert!(error.text.contains(expected), "{}", error.text);
        }
    }
}
