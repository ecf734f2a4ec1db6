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
    /// Stopped on request.
    #[error("stopped")]
    Stopped,
}

/// The SDK's result type.
pub type Result<T, E = SdkError> = std::result::Result<T, E>;
