//! Exchanges and bindings: the exchange kinds RabbitMQ ships, how each one matches a binding
//! against a message, and the checks on names that apply to exchanges and queues alike.

use crate::error::{ModelError, Result};
use crate::settings::ExchangeSettings;
use crate::topic;
use wharf_wire::types::{AMQPValue, FieldTable};

/// Longest exchange or queue name (an AMQP short string).
pub const NAME_BYTES_MAX: usize = 255;

/// How an exchange matches bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// Every binding.
    Fanout,
    /// Dot-separated words with `*` and `#` wildcards.
    Topic,
    /// Message headers against binding arguments (`x-match` all/any).
    Headers,
    /// Holds messages for their `x-delay` header, then routes as its `x-delayed-type` (as
    /// RabbitMQ's delayed-message plugin, but stored durably in the log).
    DelayedMessage,
}

impl ExchangeKind {
    /// Parses the type named in `exchange.declare`; an unknown type is a connection error (503),
    /// as in RabbitMQ.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            "x-delayed-message" => Ok(ExchangeKind::DelayedMessage),
            other => Err(ModelError::command_invalid(format!("unknown exchange type '{other}'"))),
        }
    }

    /// The type's protocol name.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
            ExchangeKind::DelayedMessage => "x-delayed-message",
        }
    }
}

/// An exchange's definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: ExchangeKind,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted when its last binding (as a source) goes.
    pub auto_delete: bool,
    /// Only other exchanges may publish to it.
    pub internal: bool,
    /// Declared arguments, kept and compared on redeclare.
    pub arguments: FieldTable,
    /// Effective settings (arguments merged with the policy).
    pub settings: ExchangeSettings,
    /// The store's id for a delayed-message exchange's log of waiting messages.
    pub store_log: Option<u64>,
    /// The store's id for the exchange's de-duplication key log, if it de-duplicates.
    pub dedup_log: Option<u64>,
}

impl Exchange {
    /// A new exchange with default settings and no store logs.
    pub fn new(name: &str, kind: ExchangeKind, durable: bool, auto_delete: bool, internal: bool) -> Exchange {
        Exchange {
            name: name.to_owned(),
            kind,
            durable,
            auto_delete,
            internal,
            arguments: FieldTable::default(),
            settings: ExchangeSettings::default(),
            store_log: None,
            dedup_log: None,
        }
    }

    /// The same exchange with its declared arguments, their effective settings, and the store
    /// logs it owns (declared, or restored from its stored definition).
    pub fn with_stored(
        mut self,
        arguments: FieldTable,
        settings: ExchangeSettings,
        store_log: Option<u64>,
        dedup_log: Option<u64>,
    ) -> Exchange {
        self.arguments = arguments;
        self.settings = settings;
        self.store_log = store_log;
        self.dedup_log = dedup_log;
        self
    }

    /// How it matches bindings: its kind, or for a delayed-message exchange its delayed type.
    pub fn routing_kind(&self) -> ExchangeKind {
        match self.kind {
            ExchangeKind::DelayedMessage => self.settings.delayed_type.unwrap_or(ExchangeKind::Direct),
            kind => kind,
        }
    }
}

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// A queue, by name.
    Queue(String),
    /// An exchange (exchange-to-exchange binding), by name.
    Exchange(String),
}

/// A binding from a source exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// Where matching messages go.
    pub destination: Destination,
    /// The binding key.
    pub routing_key: String,
    /// Binding arguments (headers exchanges match on them).
    pub arguments: FieldTable,
}

impl Binding {
    /// True if a message with this routing key and headers goes through this binding of an
    /// exchange of `kind`.
    pub fn matches(&self, kind: ExchangeKind, routing_key: &str, headers: Option<&FieldTable>) -> bool {
        match kind {
            ExchangeKind::Direct => self.routing_key == routing_key,
            ExchangeKind::Fanout => true,
            ExchangeKind::Topic => topic::matches(&self.routing_key, routing_key),
            ExchangeKind::Headers => headers_match(&self.arguments, headers),
            // Never asked: routing goes through `Exchange::routing_kind`.
            ExchangeKind::DelayedMessage => false,
        }
    }
}

/// Headers-exchange matching as RabbitMQ does it: `x-match` is `all` (default), `any`,
/// `all-with-x` or `any-with-x`; binding arguments starting with `x-` are ignored unless the
/// `-with-x` form is used; an argument of type void matches on presence alone.
fn headers_match(arguments: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mode = match arguments.inner().get("x-match") {
        Some(AMQPValue::LongString(value)) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(value)) => value.as_str().to_owned(),
        _ => "all".to_owned(),
    };
    let (any, with_x) = match mode.as_str() {
        "any" => (true, false),
        "any-with-x" => (true, true),
        "all-with-x" => (false, true),
        _ => (false, false),
    };
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty).inner();
    let mut considered = arguments
        .inner()
        .iter()
        .filter(|(key, _)| key.as_str() != "x-match" && (with_x || !key.as_str().starts_with("x-")))
        .peekable();
    if considered.peek().is_none() {
        // No criteria: `all` of nothing matches, `any` of nothing does not.
        return !any;
    }
    let mut matched = considered.map(|(key, expected)| match (expected, headers.get(key)) {
        (AMQPValue::Void, present) => present.is_some(),
        (expected, Some(actual)) => values_equal(expected, actual),
        (_, None) => false,
    });
    if any { matched.any(|hit| hit) } else { matched.all(|hit| hit) }
}

/// Compares header values loosely across integer widths and string kinds, as clients encode the
/// same number or text in different AMQP types.
fn values_equal(left: &AMQPValue, right: &AMQPValue) -> bool {
    fn as_integer(value: &AMQPValue) -> Option<i128> {
        match value {
            AMQPValue::Timestamp(v) => Some(i128::from(*v)),
            other => crate::settings::integer(other),
        }
    }
    fn as_text(value: &AMQPValue) -> Option<Vec<u8>> {
        match value {
            AMQPValue::ShortString(v) => Some(v.as_str().as_bytes().to_vec()),
            AMQPValue::LongString(v) => Some(v.as_bytes().to_vec()),
            _ => None,
        }
    }
    match (as_integer(left), as_integer(right)) {
        (Some(a), Some(b)) => a == b,
        _ => match (as_text(left), as_text(right)) {
            (Some(a), Some(b)) => a == b,
            _ => left == right,
        },
    }
}

/// Checks a name from a client: at most 255 bytes and no control characters. The spec's grammar
/// (letters, digits, `-`, `_`, `.`, `:`) is not enforced because RabbitMQ does not enforce it and
/// applications rely on that (`orders/eu`, names with spaces); control characters would only
/// corrupt logs and the management API.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    if name.len() > NAME_BYTES_MAX {
        return Err(ModelError::precondition_failed(format!("{kind} name is longer than {NAME_BYTES_MAX} bytes")));
    }
    if let Some(bad) = name.chars().find(|c| c.is_control()) {
        return Err(ModelError::precondition_failed(format!("{kind} name '{name}' contains the character {bad:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_wire::types::ShortString;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in pairs {
            table.insert(ShortString::from(*key), value.clone());
        }
        table
    }

    fn binding(arguments: FieldTable) -> Binding {
        Binding { destination: Destination::Queue("q".into()), routing_key: String::new(), arguments }
    }

    #[test]
    fn headers_all_any_and_with_x() {
        let headers = table(&[("format", AMQPValue::LongString("pdf".into())), ("size", AMQPValue::LongInt(10))]);
        let all = binding(table(&[
            ("x-match", AMQPValue::LongString("all".into())),
            ("format", AMQPValue::LongString("pdf".into())),
            ("size", AMQPValue::LongLongInt(10)),
        ]));
        assert!(all.matches(ExchangeKind::Headers, "", Some(&headers)));
        let all_miss = binding(table(&[("format", AMQPValue::LongString("pdf".into())), ("type", AMQPValue::Void)]));
        assert!(!all_miss.matches(ExchangeKind::Headers, "", Some(&headers)));
        let any = binding(table(&[
            ("x-match", AMQPValue::ShortString("any".into())),
            ("format", AMQPValue::LongString("zip".into())),
            ("size", AMQPValue::LongInt(10)),
        ]));
        assert!(any.matches(ExchangeKind::Headers, "", Some(&headers)));
        assert!(!any.matches(ExchangeKind::Headers, "", None));
        let x_headers = table(&[("x-tenant", AMQPValue::LongString("a".into()))]);
        let ignores_x = binding(table(&[("x-tenant", AMQPValue::LongString("b".into()))]));
        assert!(ignores_x.matches(ExchangeKind::Headers, "", Some(&x_headers)), "x- arguments are ignored");
        let with_x = binding(table(&[
            ("x-match", AMQPValue::LongString("all-with-x".into())),
            ("x-tenant", AMQPValue::LongString("b".into())),
        ]));
        assert!(!with_x.matches(ExchangeKind::Headers, "", Some(&x_headers)));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("queue", "order.received:eu-1_a").is_ok());
        assert!(check_name("queue", "spaces and/slashes are fine").is_ok());
        assert!(check_name("queue", "bad\nname").is_err());
        assert!(check_name("queue", &"q".repeat(256)).is_err());
        assert!(ExchangeKind::parse("x-unknown").is_err());
    }
}
