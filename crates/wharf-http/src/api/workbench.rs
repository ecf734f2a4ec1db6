//! The DLQ workbench (a Wharf extension; RabbitMQ has no equivalent): browse any queue's
//! messages without consuming them, a page at a time, each with its headers (`x-death`,
//! `x-failure-reason` …), size, delivery count and body as text or base64.
//!
//! `GET /api/queues/{vhost}/{name}/messages?page=1&page_size=50&encoding=auto&truncate=N`
//! answers a page object shaped like RabbitMQ's paginated lists.
//!
//! Actions, each on messages chosen by `"ids": [entry ids]` or `"all": true`:
//! - `POST …/messages/replay`: to each message's `x-death` origin, or to `"exchange"` with
//!   `"routing_key"`; keeps message id and headers, adds `x-replayed-count`;
//! - `POST …/messages/move` with `"queue"`: to another queue, unchanged;
//! - `DELETE …/messages/{id}`: one message.
//!
//! Replay and move answer `{"moved": [ids], "moved_count", "skipped": [{"id", "reason"}],
//! "remaining", "max_id"}` once the move is durable (with `"all"`, a client repeats the request
//! with `"max_id"` from the first answer while `remaining` is above 0); they are crash-safe (`relocate.rs` in the broker).

use crate::AppState;
use crate::amqp_json::properties_to_json;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use wharf_broker::{BROWSE_PAGE_SIZE_MAX, BrowsedMessage, MoveReport, ReplayTarget, Selection};

/// Messages on a page when `page_size` is not given.
const PAGE_SIZE_DEFAULT: usize = 50;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/queues/{vhost}/{name}/messages", get(browse))
        .route("/api/queues/{vhost}/{name}/messages/replay", post(replay))
        .route("/api/queues/{vhost}/{name}/messages/move", post(move_to_queue))
        .route("/api/queues/{vhost}/{name}/messages/{id}", delete(delete_message))
}

#[derive(Debug, Default, Deserialize)]
struct BrowseQuery {
    page: Option<String>,
    page_size: Option<String>,
    encoding: Option<String>,
    truncate: Option<String>,
}

fn number(text: Option<&str>, what: &str, default: usize) -> Result<usize, ApiError> {
    match text {
        None => Ok(default),
        Some(text) => text.parse().map_err(|_| ApiError::bad_request(format!("{what} must be a positive integer"))),
    }
}

/// A body as the API shows it: text when it is UTF-8 (with `encoding=auto`), else base64.
pub(crate) fn payload_json(payload: &[u8], encoding: &str, truncate: Option<usize>) -> (String, &'static str) {
    let payload = match truncate {
        Some(bytes) if bytes < payload.len() => &payload[..bytes],
        _ => payload,
    };
    match (encoding, std::str::from_utf8(payload)) {
        ("auto", Ok(text)) => (text.to_owned(), "string"),
        _ => (base64::engine::general_purpose::STANDARD.encode(payload), "base64"),
    }
}

fn message_json(message: &BrowsedMessage, encoding: &str, truncate: Option<usize>) -> Value {
    let (payload, payload_encoding) = match &message.payload {
        Some(payload) => {
            let (text, encoding) = payload_json(payload, encoding, truncate);
            (Value::String(text), Value::String(encoding.to_owned()))
        }
        None => (Value::Null, Value::Null),
    };
    let properties = properties_to_json(&message.properties);
    json!({
        "position": message.position,
        "entry_id": message.entry_id,
        "state": message.state.as_str(),
        "message_id": message.properties.message_id().as_ref().map(|id| id.as_str()),
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "redelivered": message.redelivered,
        "delivery_count": message.delivery_count,
        "enqueued_at": message.enqueued_at_ms,
        "expires_at": message.expires_at_ms,
        "payload_bytes": message.payload_bytes,
        "payload": payload,
        "payload_encoding": payload_encoding,
        "properties": properties,
    })
}

async fn browse(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<BrowseQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let page = number(query.page.as_deref(), "page", 1)?;
    let page_size = number(query.page_size.as_deref(), "page_size", PAGE_SIZE_DEFAULT)?;
    if page == 0 || page_size == 0 || page_size > BROWSE_PAGE_SIZE_MAX {
        return Err(ApiError::bad_request_named(
            "invalid_pagination_parameters",
            format!(
                "Invalid pagination parameters: page number {page}, page size {page_size} (at most {BROWSE_PAGE_SIZE_MAX})"
            ),
        ));
    }
    let encoding = query.encoding.as_deref().unwrap_or("auto");
    if encoding != "auto" && encoding != "base64" {
        return Err(ApiError::bad_request("encoding must be auto or base64".into()));
    }
    let truncate = query.truncate.as_deref().map(|text| number(Some(text), "truncate", 0)).transpose()?;
    let skip = (page - 1).saturating_mul(page_size);
    let browsed = state.management.browse(&caller.name, &vhost, &name, skip, page_size)?;
    let items: Vec<Value> = browsed.messages.iter().map(|message| message_json(message, encoding, truncate)).collect();
    Ok(Json(json!({
        "filtered_count": browsed.total,
        "item_count": items.len(),
        "items": items,
        "page": page,
        "page_count": browsed.total.div_ceil(page_size),
        "page_size": page_size,
        "total_count": browsed.total,
    })))
}

/// The messages a request names: `"ids"` (entry ids) or `"all": true`, not both.
fn selection(body: &Value) -> Result<Selection, ApiError> {
    let all = crate::api::body_flag(body, "all", false)?;
    match (body.get("ids"), all) {
        (Some(_), true) => Err(ApiError::bad_request("give ids or all, not both".into())),
        (None, true) => {
            let max_id = match body.get("max_id") {
                None | Some(Value::Null) => None,
                Some(Value::Number(number)) => {
                    Some(number.as_u64().ok_or_else(|| ApiError::bad_request("max_id must be an entry id".into()))?)
                }
                Some(other) => return Err(ApiError::bad_request(format!("max_id must be an entry id, not {other}"))),
            };
            Ok(Selection::All { max_id })
        }
        (None, false) => Err(ApiError::bad_request("ids is missing (or give \"all\": true)".into())),
        (Some(Value::Array(items)), false) => {
            if items.len() > wharf_broker::MOVE_REQUEST_MESSAGES_MAX {
                return Err(ApiError::bad_request(format!(
                    "at most {} ids per request",
                    wharf_broker::MOVE_REQUEST_MESSAGES_MAX
                )));
            }
            let ids = items
                .iter()
                .map(|item| match item {
                    Value::Number(number) => number.as_u64(),
                    Value::String(text) => text.parse().ok(),
                    _ => None,
                })
                .collect::<Option<Vec<u64>>>()
                .ok_or_else(|| ApiError::bad_request("ids must be entry ids (non-negative integers)".into()))?;
            Ok(Selection::Ids(ids))
        }
        (Some(other), false) => Err(ApiError::bad_request(format!("ids must be an array, not {other}"))),
    }
}

fn text_field<'a>(body: &'a Value, name: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(ApiError::bad_request(format!("{name} must be a string, not {other}"))),
    }
}

fn report_json(report: &MoveReport) -> Value {
    json!({
        "moved": report.moved,
        "moved_count": report.moved.len(),
        "skipped": report.skipped.iter().map(|(id, reason)| json!({"id": id, "reason": reason})).collect::<Vec<_>>(),
        "remaining": report.remaining,
        "max_id": report.max_id,
    })
}

async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let body = crate::api::parse_body(&body)?;
    let selection = selection(&body)?;
    let target = match (text_field(&body, "exchange")?, text_field(&body, "routing_key")?) {
        (Some(exchange), routing_key) => ReplayTarget::Exchange {
            exchange: exchange.to_owned(),
            routing_key: routing_key.unwrap_or_default().to_owned(),
        },
        (None, Some(_)) => {
            return Err(ApiError::bad_request("routing_key needs exchange (\"\" for the default exchange)".into()));
        }
        (None, None) => ReplayTarget::Original,
    };
    let report = state.management.replay(&caller.name, &vhost, &name, selection, target)?;
    Ok(Json(report_json(&report)))
}

async fn move_to_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let body = crate::api::parse_body(&body)?;
    let selection = selection(&body)?;
    let to_queue = text_field(&body, "queue")?.ok_or_else(|| ApiError::bad_request("queue is missing".into()))?;
    if to_queue == name {
        return Err(ApiError::bad_request("the target queue is the queue itself".into()));
    }
    let report = state.management.move_messages(&caller.name, &vhost, &name, selection, to_queue)?;
    Ok(Json(report_json(&report)))
}

async fn delete_message(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name, id)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let id: u64 = id.parse().map_err(|_| ApiError::bad_request(format!("'{id}' is not an entry id")))?;
    state.management.delete_message(&caller.name, &vhost, &name, id)?;
    Ok(StatusCode::NO_CONTENT)
}
