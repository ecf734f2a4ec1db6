//! Per-message delivery traces (a Wharf extension; RabbitMQ has no equivalent):
//!
//! - `GET /api/queues/{vhost}/{name}/messages/{entry id}/trace`: one message's trace;
//! - `GET /api/traces/{vhost}?message_id=ID`: every message with that message id in the queues of
//!   the vhost the user may read (`wharf admin trace ID`).
//!
//! A trace is `{"queue", "entry_id", "state", "message_id", "delivery_count", "redelivered",
//! "events": […], "events_dropped"}`; each event has `"at"` (ms since the epoch), `"queue"` and
//! `"event"` (`published`, `delivered`, `requeued`, `rejected`, `dead_lettered`, `replayed`,
//! `moved`) with the fields of its kind.

use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use wharf_broker::TraceView;
use wharf_broker::trace::{TraceEvent, TraceKind};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/queues/{vhost}/{name}/messages/{id}/trace", get(one))
        .route("/api/traces/{vhost}", get(search))
}

pub(crate) fn event_json(event: &TraceEvent) -> Value {
    let mut fields = match &event.kind {
        TraceKind::Published(origin) => {
            json!({"event": "published", "connection": origin.connection, "user": origin.user})
        }
        TraceKind::Delivered { connection, consumer_tag } => {
            json!({"event": "delivered", "connection": connection, "consumer_tag": consumer_tag})
        }
        TraceKind::Requeued(cause) => json!({"event": "requeued", "cause": cause.as_str()}),
        TraceKind::Rejected { by_nack } => {
            json!({"event": "rejected", "method": if *by_nack { "basic.nack" } else { "basic.reject" }})
        }
        TraceKind::DeadLettered { reason, exchange, routing_key } => {
            json!({"event": "dead_lettered", "reason": reason.as_str(), "exchange": exchange, "routing_key": routing_key})
        }
        TraceKind::Replayed { exchange, routing_key, user } => {
            json!({"event": "replayed", "exchange": exchange, "routing_key": routing_key, "user": user})
        }
        TraceKind::Moved { to_queue, user } => json!({"event": "moved", "to_queue": to_queue, "user": user}),
    };
    fields["at"] = json!(event.at_ms);
    fields["queue"] = json!(event.queue.as_deref());
    fields
}

pub(crate) fn trace_json(view: &TraceView) -> Value {
    json!({
        "queue": view.queue,
        "entry_id": view.entry_id,
        "state": view.state.as_str(),
        "message_id": view.message_id,
        "delivery_count": view.delivery_count,
        "redelivered": view.redelivered,
        "events": view.trace.events.iter().map(event_json).collect::<Vec<_>>(),
        "events_dropped": view.trace.dropped,
    })
}

async fn one(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name, id)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let id: u64 = id.parse().map_err(|_| ApiError::bad_request(format!("'{id}' is not an entry id")))?;
    let view = state.management.trace(&caller.name, &vhost, &name, id)?;
    let mut body = trace_json(&view);
    body["traces_enabled"] = json!(state.management.traces_enabled());
    Ok(Json(body))
}

#[derive(Debug, Deserialize)]
struct SearchQuery {
    message_id: Option<String>,
}

async fn search(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<SearchQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let message_id = query
        .message_id
        .filter(|id| !id.is_empty())
        .ok_or_else(|| ApiError::bad_request("message_id is missing".into()))?;
    let management = state.management.clone();
    let user = caller.name.clone();
    let found = tokio::task::spawn_blocking(move || management.find_traces(&user, &vhost, &message_id))
        .await
        .map_err(|error| ApiError {
            status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            error: "internal_server_error",
            reason: format!("the search failed: {error}"),
            challenge: false,
        })??;
    Ok(Json(json!({
        "items": found.found.iter().map(trace_json).collect::<Vec<_>>(),
        "scanned": found.scanned,
        "complete": found.complete,
        "traces_enabled": state.management.traces_enabled(),
    })))
}
