//! [`SdkError`]: everything the SDK can fail with.

/// An SDK failure.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// The broker could not be reached or the connection broke.
    #[error("AMQP connection to the broker failed: {0}")]
    Amqp(#[from] lapin::Error),
    /// The database refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The broker refused a publish (`basic.nack`).
    #[error("the broker refused (nacked) message {message_id}")]
    Nacked {
        /// The message refused.
        message_id: String,
    },
    /// The broker took the message but no queue received it (no binding matched).
    #[error("message {message_id} reached no queue (nothing is bound for its routing key)")]
    Unroutable {
        /// The message.
        message_id: String,
    },
    /// The broker closed the channel over a publish (an exchange that does not exist, a body over
    /// its limit, an access it refuses): the reply code and text.
    #[error("the broker refused a publish: {code} {text}")]
    Refused {
        /// AMQP reply code (403, 404, 406, …).
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// An event that can never be published (the reason says why); the relay marks it failed.
    #[error("event {id} cannot be published: {reason}")]
    Invalid {
        /// The event.
        id: String,
        /// Why.
        reason: String,
    },
    /// The broker stayed unreachable through every reconnection attempt.
    #[error("the broker is unreachable: {0}")]
    Unreachable(String),
    /// A setting out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// An event with this id is already in the outbox: the business operation that wrote it
    /// ran before (a retried request with the same idempotency key). The transaction is still
    /// usable; the caller usually rolls it back and answers as the first time did.
    #[error("an event with id {id} is already in the outbox")]
    Duplicate {
        /// The id.
        id: String,
    },
    /// A migration of the SDK's tables failed; nothing of it was applied.
    #[error("migration {version} ({description}) failed: {source}")]
    Migration {
        /// Its version.
        version: i64,
        /// Its description (the file name's rest).
        description: String,
        /// The database's error.
        source: sqlx::Error,
    },
    /// A message body is not the type the handler expects, or cannot be serialised.
    #[error("message body: {0}")]
    Body(String),
    /// A request got no reply in time.
    #[error("no reply to request {id} within {timeout_ms} ms")]
    NoReply {
        /// The request's id.
        id: String,
        /// How long it waited.
        timeout_ms: u64,
    },
    /// Stopped on request.
    #[error("stopped")]
    Stopped,
}

/// The SDK's result type.
pub type Result<T, E = SdkError> = std::result::Result<T, E>;
