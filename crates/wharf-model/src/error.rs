//! [`ModelError`]: a refusal with the AMQP reply code and text the client will see, and whether
//! it closes the channel or the whole connection (the spec decides which, per error).

use wharf_wire::reply_code;

/// What an error closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A channel exception: `channel.close` with the code; the connection stays.
    Channel,
    /// A connection exception: `connection.close` with the code.
    Connection,
}

/// A refused operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {text}")]
pub struct ModelError {
    /// The AMQP reply code.
    pub code: u16,
    /// The reply text, RabbitMQ-style (`NOT_FOUND - no queue 'x' in vhost '/'`).
    pub text: String,
    /// What it closes.
    pub scope: Scope,
}

fn error(code: u16, label: &str, scope: Scope, detail: impl std::fmt::Display) -> ModelError {
    ModelError { code, text: format!("{label} - {detail}"), scope }
}

impl ModelError {
    /// 404 on the channel.
    pub fn not_found(detail: impl std::fmt::Display) -> Self {
        error(reply_code::NOT_FOUND, "NOT_FOUND", Scope::Channel, detail)
    }
    /// 406 on the channel.
    pub fn precondition_failed(detail: impl std::fmt::Display) -> Self {
        error(reply_code::PRECONDITION_FAILED, "PRECONDITION_FAILED", Scope::Channel, detail)
    }
    /// 405 on the channel.
    pub fn resource_locked(detail: impl std::fmt::Display) -> Self {
        error(reply_code::RESOURCE_LOCKED, "RESOURCE_LOCKED", Scope::Channel, detail)
    }
    /// 403 on the channel.
    pub fn access_refused(detail: impl std::fmt::Display) -> Self {
        error(reply_code::ACCESS_REFUSED, "ACCESS_REFUSED", Scope::Channel, detail)
    }
    /// 540 on the connection.
    pub fn not_implemented(detail: impl std::fmt::Display) -> Self {
        error(reply_code::NOT_IMPLEMENTED, "NOT_IMPLEMENTED", Scope::Connection, detail)
    }
    /// 503 on the connection.
    pub fn command_invalid(detail: impl std::fmt::Display) -> Self {
        error(reply_code::COMMAND_INVALID, "COMMAND_INVALID", Scope::Connection, detail)
    }
    /// 530 on the connection.
    pub fn not_allowed(detail: impl std::fmt::Display) -> Self {
        error(reply_code::NOT_ALLOWED, "NOT_ALLOWED", Scope::Connection, detail)
    }
    /// 506 on the connection (a connection-level code in the spec and in RabbitMQ).
    pub fn resource_error(detail: impl std::fmt::Display) -> Self {
        error(reply_code::RESOURCE_ERROR, "RESOURCE_ERROR", Scope::Connection, detail)
    }
}

/// The model's result type.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
