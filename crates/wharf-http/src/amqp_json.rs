//! AMQP values as JSON and back, as RabbitMQ's management API renders them: tables as objects,
//! arrays as arrays, numbers as numbers, strings as strings, byte arrays and invalid UTF-8 as
//! text with replacement characters, void as null; and message properties as the `properties`
//! object of `get` and `publish`.

use serde_json::{Map, Value, json};
use wharf_wire::protocol::BasicProperties;
use wharf_wire::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

/// A table as a JSON object.
pub fn table_to_json(table: &FieldTable) -> Value {
    Value::Object(table.inner().iter().map(|(key, value)| (key.as_str().to_owned(), value_to_json(value))).collect())
}

/// One AMQP value as JSON.
pub fn value_to_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(flag) => json!(flag),
        AMQPValue::ShortShortInt(number) => json!(number),
        AMQPValue::ShortShortUInt(number) => json!(number),
        AMQPValue::ShortInt(number) => json!(number),
        AMQPValue::ShortUInt(number) => json!(number),
        AMQPValue::LongInt(number) => json!(number),
        AMQPValue::LongUInt(number) => json!(number),
        AMQPValue::LongLongInt(number) => json!(number),
        AMQPValue::Float(number) => json!(number),
        AMQPValue::Double(number) => json!(number),
        AMQPValue::DecimalValue(decimal) => json!(f64::from(decimal.value) / 10f64.powi(i32::from(decimal.scale))),
        AMQPValue::ShortString(text) => json!(text.as_str()),
        AMQPValue::LongString(text) => json!(String::from_utf8_lossy(text.as_bytes())),
        AMQPValue::FieldArray(items) => Value::Array(items.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::Timestamp(seconds) => json!(seconds),
        AMQPValue::FieldTable(table) => table_to_json(table),
        AMQPValue::ByteArray(bytes) => json!(String::from_utf8_lossy(bytes.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

/// A JSON object as a table (declare arguments, binding arguments, headers): integers become
/// signed 64-bit integers, other numbers doubles, strings long strings. `what` names the field
/// in the error.
pub fn json_to_table(value: &Value, what: &str) -> Result<FieldTable, String> {
    match value {
        Value::Null => Ok(FieldTable::default()),
        Value::Object(map) => object_to_table(map, what),
        _ => Err(format!("{what} must be a JSON object")),
    }
}

fn object_to_table(map: &Map<String, Value>, what: &str) -> Result<FieldTable, String> {
    let mut table = FieldTable::default();
    for (key, item) in map {
        let name = ShortString::try_new(key.as_str()).map_err(|_| format!("{what}: the key '{key}' is too long"))?;
        table.insert(name, json_to_value(item, what)?);
    }
    Ok(table)
}

fn json_to_value(value: &Value, what: &str) -> Result<AMQPValue, String> {
    Ok(match value {
        Value::Bool(flag) => AMQPValue::Boolean(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(integer) => AMQPValue::LongLongInt(integer),
            None => AMQPValue::Double(number.as_f64().ok_or_else(|| format!("{what}: {number} is out of range"))?),
        },
        Value::String(text) => AMQPValue::LongString(LongString::from(text.as_bytes().to_vec())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(|item| json_to_value(item, what)).collect::<Result<Vec<_>, _>>()?,
        )),
        Value::Object(map) => AMQPValue::FieldTable(object_to_table(map, what)?),
        Value::Null => AMQPValue::Void,
    })
}

/// Message properties as the API shows them: only those set, `headers` as an object.
pub fn properties_to_json(properties: &BasicProperties) -> Value {
    let mut object = Map::new();
    let mut text = |name: &str, value: Option<&ShortString>| {
        if let Some(value) = value {
            object.insert(name.to_owned(), json!(value.as_str()));
        }
    };
    text("content_type", properties.content_type().as_ref());
    text("content_encoding", properties.content_encoding().as_ref());
    text("correlation_id", properties.correlation_id().as_ref());
    text("reply_to", properties.reply_to().as_ref());
    text("expiration", properties.expiration().as_ref());
    text("message_id", properties.message_id().as_ref());
    text("type", properties.kind().as_ref());
    text("user_id", properties.user_id().as_ref());
    text("app_id", properties.app_id().as_ref());
    text("cluster_id", properties.cluster_id().as_ref());
    if let Some(mode) = properties.delivery_mode() {
        object.insert("delivery_mode".into(), json!(mode));
    }
    if let Some(priority) = properties.priority() {
        object.insert("priority".into(), json!(priority));
    }
    if let Some(timestamp) = properties.timestamp() {
        object.insert("timestamp".into(), json!(timestamp));
    }
    if let Some(headers) = properties.headers() {
        object.insert("headers".into(), table_to_json(headers));
    }
    Value::Object(object)
}

/// The `properties` object of a publish as message properties; an unknown property or a value
/// of the wrong type is refused, naming it.
pub fn json_to_properties(value: &Value) -> Result<BasicProperties, String> {
    let map = match value {
        Value::Null => return Ok(BasicProperties::default()),
        Value::Object(map) => map,
        _ => return Err("properties must be a JSON object".into()),
    };
    let mut properties = BasicProperties::default();
    for (name, item) in map {
        let short = || -> Result<ShortString, String> {
            let text = match item {
                Value::String(text) => text.clone(),
                Value::Number(number) => number.to_string(),
                _ => return Err(format!("property '{name}' must be a string")),
            };
            ShortString::try_new(text).map_err(|_| format!("property '{name}' is longer than 255 bytes"))
        };
        let integer = |max: u64| -> Result<u64, String> {
            let number = match item {
                Value::Number(number) => number.as_u64(),
                Value::String(text) => text.parse().ok(),
                _ => None,
            };
            number
                .filter(|number| *number <= max)
                .ok_or_else(|| format!("property '{name}' must be an integer from 0 to {max}"))
        };
        properties = match name.as_str() {
            "content_type" => properties.with_content_type(short()?),
            "content_encoding" => properties.with_content_encoding(short()?),
            "correlation_id" => properties.with_correlation_id(short()?),
            "reply_to" => properties.with_reply_to(short()?),
            "expiration" => properties.with_expiration(short()?),
            "message_id" => properties.with_message_id(short()?),
            "type" => properties.with_type(short()?),
            "user_id" => properties.with_user_id(short()?),
            "app_id" => properties.with_app_id(short()?),
            "cluster_id" => properties.with_cluster_id(short()?),
            "delivery_mode" => properties.with_delivery_mode(integer(2)? as u8),
            "priority" => properties.with_priority(integer(255)? as u8),
            "timestamp" => properties.with_timestamp(integer(u64::MAX)?),
            "headers" => properties.with_headers(json_to_table(item, "headers")?),
            other => return Err(format!("unknown message property '{other}'")),
        };
    }
    Ok(properties)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_through_json() {
        let value = json!({"x-max-priority": 5, "name": "text", "nested": {"list": [1, "two", true]}, "ratio": 0.5});
        let table = json_to_table(&value, "arguments").unwrap();
        assert_eq!(table_to_json(&table), value);
    }

    #[test]
    fn properties_round_trip_and_unknown_ones_are_refused() {
        let value =
            json!({"delivery_mode": 2, "message_id": "m-1", "headers": {"x-death": [{"count": 1}]}, "priority": 3});
        let properties = json_to_properties(&value).unwrap();
        assert_eq!(properties_to_json(&properties), value);
        assert!(json_to_properties(&json!({"colour": "red"})).unwrap_err().contains("colour"));
        assert!(json_to_properties(&json!({"delivery_mode": 7})).unwrap_err().contains("delivery_mode"));
    }
}
