//! [`ApiError`]: every refusal as RabbitMQ's management API gives it, a status code and a JSON
//! body `{"error": …, "reason": …}`; 401 also asks for basic credentials.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use wharf_broker::ManagementError;

/// The realm in `WWW-Authenticate` (RabbitMQ's, which clients and browsers show).
pub const REALM: &str = "Basic realm=\"RabbitMQ Management\"";

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {error}: {reason}")]
pub struct ApiError {
    pub status: StatusCode,
    pub error: &'static str,
    pub reason: String,
    /// Ask for credentials (`WWW-Authenticate`): only for a failed login from a client that is
    /// not a script (a script's request saying `X-Requested-With` gets none, so the browser
    /// running it shows no login prompt of its own).
    pub challenge: bool,
}

impl ApiError {
    pub fn bad_request(reason: String) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, error: "bad_request", reason, challenge: false }
    }

    pub fn not_found() -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error: "Object Not Found",
            reason: "Not Found".into(),
            challenge: false,
        }
    }

    /// No credentials, or wrong ones.
    pub fn login_failed() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: "not_authorized",
            reason: "Login failed".into(),
            challenge: true,
        }
    }

    /// Logged in, but the user's tags or permissions do not allow this: 401 too, spelled
    /// `not_authorised` and without a credentials challenge (RabbitMQ's answer).
    pub fn not_authorised(reason: &str) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: "not_authorised",
            reason: reason.to_owned(),
            challenge: false,
        }
    }

    /// A 400 with an error name of its own (`page_out_of_range`, …).
    pub fn bad_request_named(error: &'static str, reason: String) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, error, reason, challenge: false }
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            error: "method_not_allowed",
            reason: "Method Not Allowed".into(),
            challenge: false,
        }
    }
}

impl From<ManagementError> for ApiError {
    fn from(error: ManagementError) -> Self {
        match error {
            ManagementError::NotFound(_) => ApiError::not_found(),
            ManagementError::AccessRefused(reason) => ApiError::not_authorised(&reason),
            ManagementError::BadRequest(reason) => ApiError::bad_request(reason),
            ManagementError::Unavailable(reason) => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: "service_unavailable",
                reason,
                challenge: false,
            },
            // The store failed (541 INTERNAL_ERROR): the server's fault, not the request's.
            ManagementError::Refused { code: 541, text } => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                error: "internal_server_error",
                reason: without_code_prefix(&text).to_owned(),
                challenge: false,
            },
            // RabbitMQ answers a refused AMQP method with 400 and the method's reply text
            // without its `PRECONDITION_FAILED - ` prefix.
            ManagementError::Refused { text, .. } => ApiError::bad_request(without_code_prefix(&text).to_owned()),
        }
    }
}

/// `inequivalent arg …` from `PRECONDITION_FAILED - inequivalent arg …`.
fn without_code_prefix(text: &str) -> &str {
    match text.split_once(" - ") {
        Some((code, rest))
            if !code.is_empty() && code.bytes().all(|byte| byte.is_ascii_uppercase() || byte == b'_') =>
        {
            rest
        }
        _ => text,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = axum::Json(json!({"error": self.error, "reason": self.reason}));
        let mut response = (self.status, body).into_response();
        // Only a failed login asks for credentials again (a browser then prompts).
        if self.challenge {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(REALM));
        }
        response
    }
}
