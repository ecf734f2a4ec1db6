//! Routing a message through a vhost's exchanges to its queues, as RabbitMQ's
//! `rabbit_exchange:route` does: exchange-to-exchange bindings followed (each exchange once, so
//! cycles end), an exchange that routes the message nowhere handing it to its alternate exchange
//! (`alternate-exchange`, by argument or policy), and sender-selected distribution: the `CC` and
//! `BCC` headers, arrays of strings, add routing keys (the runtime strips `BCC` before the message
//! is stored or delivered).

use super::VirtualHost;
use crate::error::{ModelError, Result};
use crate::exchange::Destination;
use std::collections::BTreeSet;
use wharf_wire::types::{AMQPValue, FieldTable};

/// The headers of sender-selected distribution.
const SENDER_SELECTED_HEADERS: [&str; 2] = ["CC", "BCC"];

/// The routing keys of a message: its own, then those of its `CC` and `BCC` headers. A `CC` or
/// `BCC` that is not an array is refused (406, as RabbitMQ); non-string elements are skipped.
pub fn routing_keys<'a>(routing_key: &'a str, headers: Option<&'a FieldTable>) -> Result<Vec<&'a str>> {
    let mut keys = vec![routing_key];
    let Some(headers) = headers else { return Ok(keys) };
    for name in SENDER_SELECTED_HEADERS {
        match headers.inner().get(name) {
            None => {}
            Some(AMQPValue::FieldArray(values)) => {
                keys.extend(values.as_slice().iter().filter_map(|value| match value {
                    AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok(),
                    AMQPValue::ShortString(text) => Some(text.as_str()),
                    _ => None,
                }));
            }
            Some(other) => {
                return Err(ModelError::precondition_failed(format!(
                    "invalid message: the {name} header must be an array of strings, not a value of type {}",
                    other.get_type()
                )));
            }
        }
    }
    Ok(keys)
}

impl VirtualHost {
    /// The queues a message published to `exchange` reaches: 404 for a missing exchange, 403 for
    /// an internal one. Every queue appears once.
    pub fn route(&self, exchange: &str, routing_key: &str, headers: Option<&FieldTable>) -> Result<Vec<String>> {
        if self.exchanges.get(exchange).is_some_and(|start| start.internal) {
            return Err(ModelError::access_refused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                self.name
            )));
        }
        self.route_from(exchange, routing_key, headers)
    }

    /// Routing as `route`, for the broker's own publishes (dead letters, due delayed messages),
    /// which may go through internal exchanges.
    pub fn route_from(&self, exchange: &str, routing_key: &str, headers: Option<&FieldTable>) -> Result<Vec<String>> {
        let start = self.exchanges.get(exchange).ok_or_else(|| self.no_exchange(exchange))?;
        let keys = routing_keys(routing_key, headers)?;
        if exchange.is_empty() {
            let named: BTreeSet<&str> = keys.into_iter().filter(|key| self.queues.contains_key(*key)).collect();
            return Ok(named.into_iter().map(str::to_owned).collect());
        }
        let mut queues = BTreeSet::new();
        let mut visited = BTreeSet::from([exchange.to_owned()]);
        let mut pending = vec![start];
        while let Some(current) = pending.pop() {
            let kind = current.routing_kind();
            let mut routed = false;
            for binding in self.bindings.get(&current.name).into_iter().flatten() {
                if !keys.iter().any(|key| binding.matches(kind, key, headers)) {
                    continue;
                }
                routed = true;
                match &binding.destination {
                    Destination::Queue(queue) => {
                        queues.insert(queue.clone());
                    }
                    Destination::Exchange(next) => {
                        if visited.insert(next.clone())
                            && let Some(next) = self.exchanges.get(next)
                        {
                            pending.push(next);
                        }
                    }
                }
            }
            // Nothing matched here: the alternate exchange takes it (if it exists; RabbitMQ
            // routes to a missing one silently, as nowhere).
            if !routed
                && let Some(alternate) = &current.settings.alternate_exchange
                && visited.insert(alternate.clone())
                && let Some(alternate) = self.exchanges.get(alternate)
            {
                pending.push(alternate);
            }
        }
        Ok(queues.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_wire::types::{FieldArray, LongString};

    #[test]
    fn cc_and_bcc_add_routing_keys_and_other_types_are_refused() {
        let mut headers = FieldTable::default();
        let strings = |keys: &[&str]| {
            AMQPValue::FieldArray(FieldArray::from(
                keys.iter()
                    .map(|key| AMQPValue::LongString(LongString::from(key.as_bytes().to_vec())))
                    .collect::<Vec<_>>(),
            ))
        };
        headers.insert("CC".into(), strings(&["a", "b"]));
        headers.insert("BCC".into(), strings(&["c"]));
        assert_eq!(routing_keys("k", Some(&headers)).unwrap(), vec!["k", "a", "b", "c"]);
        assert_eq!(routing_keys("k", None).unwrap(), vec!["k"]);
        headers.insert("CC".into(), AMQPValue::LongString(LongString::from(b"a".to_vec())));
        let error = routing_keys("k", Some(&headers)).unwrap_err();
        assert_eq!(error.code, 406);
        assert!(error.text.contains("CC"), "{}", error.text);
    }
}
