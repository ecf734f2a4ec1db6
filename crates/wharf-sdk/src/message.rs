//! Typed messages: a [`Message`] is a serde type with a name; it becomes an [`Event`] (JSON body,
//! `application/json`, its name in the AMQP `type` property) to publish through an outbox, and a
//! delivery becomes one again with [`Incoming::decode`]. The name travels with the message so a
//! consumer can refuse a message of another type instead of misreading its fields.

use crate::consumer::Incoming;
use crate::event::Event;
use crate::handler::HandleError;
use crate::{Result, SdkError};

/// The content type of typed messages' bodies.
pub const JSON: &str = "application/json";

/// A message type.
///
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderReceived { order_id: String, total_cents: i64 }
///
/// impl wharf_sdk::Message for OrderReceived {
///     const TYPE: &'static str = "OrderReceived";
///     const EXCHANGE: &'static str = "orders";
///     fn routing_key(&self) -> String { "order.received".into() }
///     fn ordering_key(&self) -> Option<String> { Some(self.order_id.clone()) }
/// }
/// ```
pub trait Message: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {
    /// The type's name, sent as the AMQP `type` property (keep it stable: renaming it is a
    /// change of contract with every consumer).
    const TYPE: &'static str;
    /// The exchange it is published to (`""`, the default exchange, routes by queue name).
    const EXCHANGE: &'static str = "";

    /// Its routing key: the type's name unless the type says otherwise.
    fn routing_key(&self) -> String {
        Self::TYPE.to_owned()
    }

    /// Messages with the same ordering key are published, and on an `x-ordered-by` queue
    /// delivered, in the order they were written. None by default.
    fn ordering_key(&self) -> Option<String> {
        None
    }
}

impl Event {
    /// The event that carries `message`: a fresh id (see [`Event::with_idempotency_key`] for a
    /// stable one), the type's exchange, routing key and ordering key, a JSON body.
    pub fn from_message<M: Message>(message: &M) -> Result<Event> {
        let body = serde_json::to_vec(message)
            .map_err(|error| SdkError::Body(format!("cannot serialise a {}: {error}", M::TYPE)))?;
        let mut event = Event::new(M::EXCHANGE, message.routing_key(), body).with_content_type(JSON).with_type(M::TYPE);
        event.ordering_key = message.ordering_key();
        Ok(event)
    }
}

impl Incoming {
    /// The body as `M`. A message whose AMQP `type` names another type, or whose body is not an
    /// `M`, is a permanent failure (retrying cannot fix it), with the reason.
    pub fn decode<M: Message>(&self) -> std::result::Result<M, HandleError> {
        if let Some(message_type) = &self.message_type
            && message_type != M::TYPE
        {
            return Err(HandleError::Permanent(format!(
                "message type '{message_type}' where '{}' was expected",
                M::TYPE
            )));
        }
        serde_json::from_slice(&self.body)
            .map_err(|error| HandleError::Permanent(format!("the body is not a valid {}: {error}", M::TYPE)))
    }
}
