//! [`QueueSettings`] and [`ExchangeSettings`]: the `x-` arguments of a queue or an exchange,
//! merged with the policy that applies to it, parsed and checked once at declare time.
//!
//! Names, meanings and defaults are RabbitMQ's where RabbitMQ has the feature; the rest are
//! Wharf's (see `docs/design/20261127_delivery-guarantees.md`). A value of the wrong type or out
//! of range is refused with 406 PRECONDITION_FAILED naming the argument and what is allowed.
//! Arguments Wharf does not know are kept and ignored, as RabbitMQ does.

use crate::error::{ModelError, Result};
use crate::exchange::ExchangeKind;
use crate::policy::Policy;
use wharf_wire::types::{AMQPValue, FieldTable, ShortString};

/// The delivery limit a queue has when it names none.
pub const DELIVERY_LIMIT_DEFAULT: u32 = 20;
/// The de-duplication window when `x-deduplication-ttl` is not given: 24 hours.
pub const DEDUPLICATION_TTL_MS_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// Largest value of any millisecond argument (TTLs, timeouts, backoff steps): 2^32 - 1 ms, about
/// 49 days, as RabbitMQ's `x-message-ttl`.
pub const DURATION_MS_MAX: u64 = u32::MAX as u64;
/// Most steps in `x-retry-backoff`.
pub const RETRY_BACKOFF_STEPS_MAX: usize = 64;
/// Longest header name for `x-ordered-by` and `x-deduplication-header`.
pub const HEADER_NAME_BYTES_MAX: usize = 255;

/// What a queue does when a publish would exceed `x-max-length` or `x-max-length-bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest ready messages to make room (RabbitMQ's default).
    #[default]
    DropHead,
    /// Refuse the publish: `basic.nack` to a confirming publisher.
    RejectPublish,
    /// Refuse the publish and dead-letter the refused message.
    RejectPublishDlx,
}

/// Broker-side de-duplication by a message key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deduplication {
    /// How long a key is remembered.
    pub ttl_ms: u64,
    /// The header holding the key; `None` means the `message-id` property.
    pub header: Option<String>,
}

/// A queue's effective settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// `x-dead-letter-exchange` (`""` is the default exchange).
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`.
    pub dead_letter_routing_key: Option<String>,
    /// `x-delivery-limit`: most deliveries of one message; `None` for no limit (`-1`).
    pub delivery_limit: Option<u32>,
    /// `x-message-ttl`.
    pub message_ttl_ms: Option<u64>,
    /// `x-expires`: the queue is deleted after this long unused.
    pub expires_ms: Option<u64>,
    /// `x-max-length` (ready messages).
    pub max_length: Option<u64>,
    /// `x-max-length-bytes` (bodies of ready messages).
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-consumer-timeout`: a per-delivery lease.
    pub consumer_timeout_ms: Option<u64>,
    /// `x-retry-backoff`: the wait before a requeued message is delivered again, per attempt.
    pub retry_backoff_ms: Vec<u64>,
    /// `x-deduplication` with its window and key header.
    pub deduplication: Option<Deduplication>,
    /// `x-single-active-consumer`.
    pub single_active_consumer: bool,
    /// `x-ordered-by`: the header whose value orders messages per key.
    pub ordered_by: Option<String>,
    /// `x-max-priority`: a priority queue with priorities 0 to this (see `priority.rs`).
    pub max_priority: Option<u8>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            delivery_limit: Some(DELIVERY_LIMIT_DEFAULT),
            message_ttl_ms: None,
            expires_ms: None,
            max_length: None,
            max_length_bytes: None,
            overflow: Overflow::DropHead,
            consumer_timeout_ms: None,
            retry_backoff_ms: Vec::new(),
            deduplication: None,
            single_active_consumer: false,
            max_priority: None,
            ordered_by: None,
        }
    }
}

/// An exchange's effective settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExchangeSettings {
    /// For an `x-delayed-message` exchange: how it routes once a message is due.
    pub delayed_type: Option<ExchangeKind>,
    /// Broker-side de-duplication of publishes to this exchange.
    pub deduplication: Option<Deduplication>,
    /// `alternate-exchange` (the argument, or the policy's): where a message this exchange
    /// routes nowhere goes instead.
    pub alternate_exchange: Option<String>,
}

fn refuse(argument: &str, allowed: &str, value: &AMQPValue) -> ModelError {
    ModelError::precondition_failed(format!("invalid arg '{argument}': {allowed}, got {}", describe(value)))
}

fn describe(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(text) => format!("'{text}'"),
        AMQPValue::ShortString(text) => format!("'{text}'"),
        AMQPValue::Boolean(flag) => flag.to_string(),
        other => match integer(other) {
            Some(number) => number.to_string(),
            None => format!("a value of type {}", other.get_type()),
        },
    }
}

/// An integer of any AMQP width.
pub(crate) fn integer(value: &AMQPValue) -> Option<i128> {
    Some(match value {
        AMQPValue::ShortShortInt(v) => i128::from(*v),
        AMQPValue::ShortShortUInt(v) => i128::from(*v),
        AMQPValue::ShortInt(v) => i128::from(*v),
        AMQPValue::ShortUInt(v) => i128::from(*v),
        AMQPValue::LongInt(v) => i128::from(*v),
        AMQPValue::LongUInt(v) => i128::from(*v),
        AMQPValue::LongLongInt(v) => i128::from(*v),
        _ => return None,
    })
}

/// Text of a string value (short or long).
pub(crate) fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => String::from_utf8(text.as_bytes().to_vec()).ok(),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

fn integer_in(argument: &str, value: &AMQPValue, low: i128, high: i128) -> Result<u64> {
    match integer(value) {
        Some(number) if (low..=high).contains(&number) => Ok(number as u64),
        _ => Err(refuse(argument, &format!("must be an integer from {low} to {high}"), value)),
    }
}

fn boolean(argument: &str, value: &AMQPValue) -> Result<bool> {
    match value {
        AMQPValue::Boolean(flag) => Ok(*flag),
        _ => Err(refuse(argument, "must be a boolean", value)),
    }
}

fn name(argument: &str, value: &AMQPValue, allow_empty: bool) -> Result<String> {
    match text(value) {
        Some(name) if name.len() <= HEADER_NAME_BYTES_MAX && (allow_empty || !name.is_empty()) => Ok(name),
        _ => Err(refuse(
            argument,
            &format!(
                "must be a {}string of at most {HEADER_NAME_BYTES_MAX} bytes",
                if allow_empty { "" } else { "non-empty " }
            ),
            value,
        )),
    }
}

/// The arguments a queue or exchange ends up with: its own `x-` arguments, and for each key it
/// does not set, the policy's value (policy keys are spelled without `x-`, as RabbitMQ's).
pub fn effective_arguments(own: &FieldTable, policy: Option<&Policy>) -> FieldTable {
    let mut merged = own.clone();
    if let Some(policy) = policy {
        for (key, value) in policy.definition.inner() {
            let argument = format!("x-{key}");
            if !own.contains_key(&argument)
                && let Ok(argument) = ShortString::try_new(argument)
            {
                merged.insert(argument, value.clone());
            }
        }
    }
    merged
}

/// A `basic.consume`'s `x-priority` (0 without one): any integer, as RabbitMQ takes it;
/// anything else is refused with 406. Other consumer arguments are ignored, as RabbitMQ ignores
/// the ones it does not know.
pub fn consumer_priority(arguments: &FieldTable) -> Result<i32> {
    match arguments.inner().get("x-priority") {
        None => Ok(0),
        Some(value) => match integer(value) {
            Some(priority) => Ok(priority.clamp(i128::from(i32::MIN), i128::from(i32::MAX)) as i32),
            None => Err(refuse("x-priority", "must be an integer", value)),
        },
    }
}

impl QueueSettings {
    /// Parses and checks a queue's effective arguments.
    pub fn parse(arguments: &FieldTable) -> Result<QueueSettings> {
        let mut settings = QueueSettings::default();
        let mut dedup_enabled = false;
        let mut dedup_ttl_ms = DEDUPLICATION_TTL_MS_DEFAULT;
        let mut dedup_header = None;
        for (key, value) in arguments.inner() {
            let key = key.as_str();
            match key {
                "x-dead-letter-exchange" => settings.dead_letter_exchange = Some(name(key, value, true)?),
                "x-dead-letter-routing-key" => settings.dead_letter_routing_key = Some(name(key, value, true)?),
                "x-delivery-limit" => {
                    settings.delivery_limit = match integer(value) {
                        Some(-1) => None,
                        Some(limit) if (1..=i128::from(i32::MAX)).contains(&limit) => Some(limit as u32),
                        _ => {
                            return Err(refuse(key, "must be -1 (no limit) or an integer from 1 to 2147483647", value));
                        }
                    }
                }
                "x-message-ttl" => settings.message_ttl_ms = Some(integer_in(key, value, 0, DURATION_MS_MAX.into())?),
                "x-expires" => settings.expires_ms = Some(integer_in(key, value, 1, DURATION_MS_MAX.into())?),
                "x-max-length" => settings.max_length = Some(integer_in(key, value, 0, i64::MAX.into())?),
                "x-max-length-bytes" => settings.max_length_bytes = Some(integer_in(key, value, 0, i64::MAX.into())?),
                "x-overflow" => {
                    settings.overflow = match text(value).as_deref() {
                        Some("drop-head") => Overflow::DropHead,
                        Some("reject-publish") => Overflow::RejectPublish,
                        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                        _ => {
                            return Err(refuse(
                                key,
                                "must be 'drop-head', 'reject-publish' or 'reject-publish-dlx'",
                                value,
                            ));
                        }
                    }
                }
                "x-consumer-timeout" => {
                    settings.consumer_timeout_ms = Some(integer_in(key, value, 1, DURATION_MS_MAX.into())?)
                }
                "x-retry-backoff" => settings.retry_backoff_ms = backoff(key, value)?,
                "x-deduplication" => dedup_enabled = boolean(key, value)?,
                "x-deduplication-ttl" => dedup_ttl_ms = integer_in(key, value, 1, DURATION_MS_MAX.into())?,
                "x-deduplication-header" => dedup_header = Some(name(key, value, false)?),
                "x-single-active-consumer" => settings.single_active_consumer = boolean(key, value)?,
                "x-ordered-by" => settings.ordered_by = Some(name(key, value, false)?),
                "x-max-priority" => settings.max_priority = Some(integer_in(key, value, 0, 255)? as u8),
                // RabbitMQ's lazy mode pages a backlog to disk early; Wharf pages every backlog
                // beyond its memory bound, so both modes mean the same here. Accepted for
                // declarations written for RabbitMQ; other values are refused as RabbitMQ does.
                "x-queue-mode" => match text(value).as_deref() {
                    Some("default" | "lazy") => {}
                    _ => return Err(refuse(key, "must be 'default' or 'lazy'", value)),
                },
                "x-queue-type" => match text(value).as_deref() {
                    // Wharf has one queue implementation, as durable as RabbitMQ's quorum queues;
                    // both names are accepted so RabbitMQ declarations work unchanged.
                    Some("classic" | "quorum") => {}
                    _ => return Err(refuse(key, "must be 'classic' or 'quorum' ('stream' is not supported)", value)),
                },
                _ => {}
            }
        }
        if dedup_enabled {
            settings.deduplication = Some(Deduplication { ttl_ms: dedup_ttl_ms, header: dedup_header });
        }
        Ok(settings)
    }

    /// The backoff before redelivering a message that has been delivered `delivery_count` times
    /// and was requeued by the consumer: the step for that attempt, the last step repeating.
    pub fn backoff_ms(&self, delivery_count: u32) -> Option<u64> {
        let last = self.retry_backoff_ms.len().checked_sub(1)?;
        let attempt = (delivery_count.max(1) - 1) as usize;
        Some(self.retry_backoff_ms[attempt.min(last)])
    }
}

fn backoff(key: &str, value: &AMQPValue) -> Result<Vec<u64>> {
    let allowed =
        format!("must be a list of 1 to {RETRY_BACKOFF_STEPS_MAX} integers from 0 to {DURATION_MS_MAX} (milliseconds)");
    let AMQPValue::FieldArray(steps) = value else { return Err(refuse(key, &allowed, value)) };
    let steps = steps.as_slice();
    if steps.is_empty() || steps.len() > RETRY_BACKOFF_STEPS_MAX {
        return Err(refuse(key, &allowed, value));
    }
    steps
        .iter()
        .map(|step| match integer(step) {
            Some(ms) if (0..=i128::from(DURATION_MS_MAX)).contains(&ms) => Ok(ms as u64),
            _ => Err(refuse(key, &allowed, step)),
        })
        .collect()
}

impl ExchangeSettings {
    /// Parses and checks an exchange's effective arguments; `kind` is its declared type.
    pub fn parse(kind: ExchangeKind, arguments: &FieldTable) -> Result<ExchangeSettings> {
        let mut settings = ExchangeSettings::default();
        let mut dedup_enabled = false;
        let mut dedup_ttl_ms = DEDUPLICATION_TTL_MS_DEFAULT;
        let mut dedup_header = None;
        for (key, value) in arguments.inner() {
            let key = key.as_str();
            match key {
                "x-delayed-type" if kind == ExchangeKind::DelayedMessage => {
                    let allowed = "must be 'direct', 'fanout', 'topic' or 'headers'";
                    settings.delayed_type = match text(value).as_deref() {
                        Some("direct") => Some(ExchangeKind::Direct),
                        Some("fanout") => Some(ExchangeKind::Fanout),
                        Some("topic") => Some(ExchangeKind::Topic),
                        Some("headers") => Some(ExchangeKind::Headers),
                        _ => return Err(refuse(key, allowed, value)),
                    };
                }
                "x-deduplication" => dedup_enabled = boolean(key, value)?,
                "x-deduplication-ttl" => dedup_ttl_ms = integer_in(key, value, 1, DURATION_MS_MAX.into())?,
                "x-deduplication-header" => dedup_header = Some(name(key, value, false)?),
                // The declared argument (RabbitMQ's name has no `x-`) wins over a policy's.
                "alternate-exchange" => settings.alternate_exchange = Some(name(key, value, true)?),
                "x-alternate-exchange" if !arguments.contains_key("alternate-exchange") => {
                    settings.alternate_exchange = Some(name(key, value, true)?)
                }
                _ => {}
            }
        }
        if kind == ExchangeKind::DelayedMessage && settings.delayed_type.is_none() {
            return Err(ModelError::precondition_failed(
                "Invalid argument, 'x-delayed-type' must be an existing exchange type ('direct', 'fanout', 'topic' or 'headers')",
            ));
        }
        if dedup_enabled {
            settings.deduplication = Some(Deduplication { ttl_ms: dedup_ttl_ms, header: dedup_header });
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_wire::types::FieldArray;

    fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in pairs {
            table.insert(key.into(), value);
        }
        table
    }

    #[test]
    fn defaults_and_values() {
        let settings = QueueSettings::parse(&FieldTable::default()).unwrap();
        assert_eq!(settings.delivery_limit, Some(20));
        let settings = QueueSettings::parse(&table(vec![
            ("x-delivery-limit", AMQPValue::LongInt(-1)),
            ("x-message-ttl", AMQPValue::LongLongInt(1000)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
            (
                "x-retry-backoff",
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::ShortInt(10), AMQPValue::LongInt(50)])),
            ),
            ("x-deduplication", AMQPValue::Boolean(true)),
            ("x-unknown", AMQPValue::Boolean(true)),
            ("x-max-priority", AMQPValue::ShortShortUInt(10)),
            ("x-queue-mode", AMQPValue::LongString("lazy".into())),
        ]))
        .unwrap();
        assert_eq!(settings.max_priority, Some(10));
        assert_eq!(settings.delivery_limit, None);
        assert_eq!(settings.message_ttl_ms, Some(1000));
        assert_eq!(settings.overflow, Overflow::RejectPublish);
        assert_eq!(settings.backoff_ms(1), Some(10));
        assert_eq!(settings.backoff_ms(2), Some(50));
        assert_eq!(settings.backoff_ms(9), Some(50), "the last step repeats");
        assert_eq!(settings.deduplication.unwrap().ttl_ms, DEDUPLICATION_TTL_MS_DEFAULT);
    }

    #[test]
    fn bad_values_name_the_argument() {
        for (key, value, expected) in [
            ("x-delivery-limit", AMQPValue::LongInt(0), "x-delivery-limit"),
            ("x-message-ttl", AMQPValue::LongString("soon".into()), "x-message-ttl"),
            ("x-expires", AMQPValue::LongInt(0), "x-expires"),
            ("x-max-length", AMQPValue::LongInt(-5), "x-max-length"),
            ("x-overflow", AMQPValue::LongString("explode".into()), "'drop-head'"),
            ("x-retry-backoff", AMQPValue::LongInt(5), "x-retry-backoff"),
            ("x-deduplication", AMQPValue::LongInt(1), "must be a boolean"),
            ("x-ordered-by", AMQPValue::LongString("".into()), "x-ordered-by"),
            ("x-queue-type", AMQPValue::LongString("stream".into()), "x-queue-type"),
            ("x-max-priority", AMQPValue::LongInt(256), "x-max-priority"),
            ("x-max-priority", AMQPValue::LongInt(-1), "x-max-priority"),
            ("x-queue-mode", AMQPValue::LongString("fast".into()), "x-queue-mode"),
        ] {
            let error = QueueSettings::parse(&table(vec![(key, value)])).unwrap_err();
            assert_eq!(error.code, 406, "{key}");
            assert!(error.text.contains(expected), "{key}: {}", error.text);
        }
    }

    #[test]
    fn delayed_exchanges_need_a_type() {
        let error = ExchangeSettings::parse(ExchangeKind::DelayedMessage, &FieldTable::default()).unwrap_err();
        assert_eq!(error.code, 406);
        let settings = ExchangeSettings::parse(
            ExchangeKind::DelayedMessage,
            &table(vec![("x-delayed-type", AMQPValue::LongString("topic".into()))]),
        )
        .unwrap();
        assert_eq!(settings.delayed_type, Some(ExchangeKind::Topic));
    }
}
