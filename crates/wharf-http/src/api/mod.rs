//! The routes of the management API, one module per area, each handler a thin translation
//! between HTTP/JSON and [`wharf_broker::Management`]. Paths and their shapes follow RabbitMQ's
//! management plugin (`rabbit_mgmt_dispatcher`); vhost names are percent-encoded in paths
//! (`%2F` for `/`).

mod access;
mod connections;
mod definitions;
mod objects;
mod overview;
mod traces;
mod workbench;

use crate::AppState;
use crate::error::ApiError;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(overview::routes())
        .merge(connections::routes())
        .merge(objects::routes())
        .merge(access::routes())
        .merge(definitions::routes())
        .merge(workbench::routes())
        .merge(traces::routes())
        .merge(crate::metrics::routes())
        .merge(crate::console::routes())
        .route("/api/{*rest}", get(not_found).put(not_found).post(not_found).delete(not_found))
        .layer(DefaultBodyLimit::max(crate::REQUEST_BYTES_MAX))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found()
}

/// A JSON request body: 400 naming the problem when it is not JSON (RabbitMQ's answer), not
/// axum's plain-text rejection.
pub(crate) fn parse_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Value::Object(serde_json::Map::new()));
    }
    // RabbitMQ's reason is `not_json`; the parser's message says where.
    serde_json::from_slice(body).map_err(|error| ApiError::bad_request(format!("not_json: {error}")))
}

/// A boolean field of a request body (`true`/`false`, or the strings RabbitMQ's forms send).
pub(crate) fn body_flag(body: &serde_json::Value, name: &str, default: bool) -> Result<bool, ApiError> {
    match body.get(name) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::Bool(flag)) => Ok(*flag),
        Some(serde_json::Value::String(text)) if text == "true" => Ok(true),
        Some(serde_json::Value::String(text)) if text == "false" => Ok(false),
        Some(other) => Err(ApiError::bad_request(format!("{name} must be true or false, not {other}"))),
    }
}

/// The node's name, as every object shows it.
pub(crate) fn node(state: &AppState) -> String {
    state.management.node_name()
}
