//! Vhosts, exchanges, queues and bindings: listed (a user sees the vhosts it has permissions on;
//! a monitor all of them), read, declared with `PUT`, deleted, and used: publish to an exchange,
//! get from and purge a queue. The default exchange is `amq.default` in paths and `""` in
//! bodies, as in RabbitMQ.

use super::{body_flag, node, parse_body};
use crate::AppState;
use crate::amqp_json::{json_to_properties, json_to_table, properties_to_json, table_to_json};
use crate::auth::Caller;
use crate::error::ApiError;
use crate::listing::{ListQuery, respond, respond_object};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;
use wharf_broker::{AckMode, BindingSpec, BindingView, ExchangeSpec, ExchangeView, QueueView};
use wharf_model::Destination;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/vhosts", get(vhosts))
        .route("/api/vhosts/{vhost}", get(vhost).put(put_vhost).delete(delete_vhost))
        .route("/api/exchanges", get(exchanges))
        .route("/api/exchanges/{vhost}", get(vhost_exchanges))
        .route("/api/exchanges/{vhost}/{name}", get(exchange).put(declare_exchange).delete(delete_exchange))
        .route("/api/exchanges/{vhost}/{name}/publish", post(publish))
        .route("/api/exchanges/{vhost}/{name}/bindings/source", get(exchange_bindings_source))
        .route("/api/exchanges/{vhost}/{name}/bindings/destination", get(exchange_bindings_destination))
        .route("/api/queues", get(queues))
        .route("/api/queues/{vhost}", get(vhost_queues))
        .route("/api/queues/{vhost}/{name}", get(queue).put(declare_queue).delete(delete_queue))
        .route("/api/queues/{vhost}/{name}/contents", axum::routing::delete(purge_queue))
        .route("/api/queues/{vhost}/{name}/get", post(get_messages))
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route("/api/bindings", get(bindings))
        .route("/api/bindings/{vhost}", get(vhost_bindings))
        .route("/api/bindings/{vhost}/e/{source}/{kind}/{destination}", get(binding_list).post(create_binding))
        .route("/api/bindings/{vhost}/e/{source}/{kind}/{destination}/{props}", get(binding).delete(delete_binding))
}

/// `amq.default` in a path is the default exchange, `""`.
fn exchange_name(path_name: &str) -> &str {
    if path_name == "amq.default" { "" } else { path_name }
}

fn vhost_json(state: &AppState, view: &wharf_broker::VhostView) -> Value {
    json!({
        "name": view.name,
        "description": "",
        "tags": [],
        "default_queue_type": "classic",
        "tracing": false,
        "cluster_state": {node(state): "running"},
        "messages": view.messages_ready + view.messages_unacknowledged,
        "messages_ready": view.messages_ready,
        "messages_unacknowledged": view.messages_unacknowledged,
    })
}

async fn vhosts(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let items = state
        .management
        .vhosts()
        .iter()
        .filter(|vhost| caller.sees_vhost(&state, &vhost.name))
        .map(|vhost| vhost_json(&state, vhost))
        .collect();
    Ok(Json(respond(items, &query)?))
}

async fn vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &name)?;
    let found =
        state.management.vhosts().into_iter().find(|vhost| vhost.name == name).ok_or_else(ApiError::not_found)?;
    Ok(Json(vhost_json(&state, &found)))
}

/// Creates a vhost (an administrator's): `{"description": …, "tags": "a,b" or [..]}`, both optional.
async fn put_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let body = super::parse_body(&body)?;
    let description = match body.get("description") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => return Err(ApiError::bad_request(format!("description must be a string, not {other}"))),
    };
    let tags = super::access::tags(&body)?;
    let created = state.management.put_vhost(&name, &description, &tags)?;
    Ok(if created { StatusCode::CREATED } else { StatusCode::NO_CONTENT })
}

/// Deletes a vhost and everything in it (an administrator's).
async fn delete_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    state.management.delete_vhost(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) fn exchange_json(exchange: &ExchangeView) -> Value {
    json!({
        "name": exchange.name,
        "vhost": exchange.vhost,
        "type": exchange.kind,
        "durable": exchange.durable,
        "auto_delete": exchange.auto_delete,
        "internal": exchange.internal,
        "arguments": table_to_json(&exchange.arguments),
        "policy": exchange.policy,
        "user_who_performed_action": "",
    })
}

fn visible_exchanges(state: &AppState, caller: &Caller, vhost: Option<&str>) -> Vec<Value> {
    state
        .management
        .exchanges(vhost)
        .iter()
        .filter(|exchange| caller.sees_vhost(state, &exchange.vhost))
        .map(exchange_json)
        .collect()
}

async fn exchanges(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(respond(visible_exchanges(&state, &caller, None), &query)?))
}

async fn vhost_exchanges(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    Ok(Json(respond(visible_exchanges(&state, &caller, Some(&vhost)), &query)?))
}

fn find_exchange(state: &AppState, vhost: &str, name: &str) -> Option<ExchangeView> {
    state.management.exchanges(Some(vhost)).into_iter().find(|exchange| exchange.name == name)
}

async fn exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let found = find_exchange(&state, &vhost, exchange_name(&name)).ok_or_else(ApiError::not_found)?;
    Ok(Json(exchange_json(&found)))
}

async fn declare_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let body = parse_body(&body)?;
    let kind = match body.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        None => return Err(ApiError::bad_request("the exchange's type is missing (\"type\": \"direct\" …)".into())),
        Some(other) => return Err(ApiError::bad_request(format!("type must be a string, not {other}"))),
    };
    let durable = body_flag(&body, "durable", true)?;
    let auto_delete = body_flag(&body, "auto_delete", false)?;
    let internal = body_flag(&body, "internal", false)?;
    let arguments =
        json_to_table(body.get("arguments").unwrap_or(&Value::Null), "arguments").map_err(ApiError::bad_request)?;
    let existed = find_exchange(&state, &vhost, &name).is_some();
    let spec = ExchangeSpec { name: &name, kind: &kind, durable, auto_delete, internal, arguments: &arguments };
    state.management.declare_exchange(&caller.name, &vhost, &spec)?;
    Ok(if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED })
}

#[derive(Debug, Default, Deserialize)]
struct DeleteQuery {
    #[serde(rename = "if-unused")]
    if_unused: Option<String>,
    #[serde(rename = "if-empty")]
    if_empty: Option<String>,
}

async fn delete_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let if_unused = query.if_unused.as_deref() == Some("true");
    state.management.delete_exchange(&caller.name, &vhost, exchange_name(&name), if_unused)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Publishes a message and answers once it is durable where it is persistent: `{"routed": …}`.
async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let body = parse_body(&body)?;
    let routing_key = match body.get("routing_key") {
        Some(Value::String(key)) => key.clone(),
        None => return Err(ApiError::bad_request("routing_key is missing".into())),
        Some(other) => return Err(ApiError::bad_request(format!("routing_key must be a string, not {other}"))),
    };
    let payload = match body.get("payload") {
        Some(Value::String(payload)) => payload,
        None => return Err(ApiError::bad_request("payload is missing".into())),
        Some(other) => return Err(ApiError::bad_request(format!("payload must be a string, not {other}"))),
    };
    let payload = match body.get("payload_encoding").and_then(Value::as_str).unwrap_or("string") {
        "string" => Bytes::from(payload.clone().into_bytes()),
        "base64" => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(payload.trim())
                .map_err(|error| ApiError::bad_request(format!("payload is not valid base64: {error}")))?,
        ),
        other => return Err(ApiError::bad_request(format!("payload_encoding must be string or base64, not {other}"))),
    };
    let properties =
        json_to_properties(body.get("properties").unwrap_or(&Value::Null)).map_err(ApiError::bad_request)?;
    let outcome =
        state.management.publish(&caller.name, &vhost, exchange_name(&name), &routing_key, properties, payload).await?;
    Ok(Json(json!({"routed": outcome.routed})))
}

pub(crate) fn queue_json(state: &AppState, queue: &QueueView) -> Value {
    let mut json = json!({
        "name": queue.name,
        "vhost": queue.vhost,
        "node": node(state),
        "type": "classic",
        "state": "running",
        "durable": queue.durable,
        "auto_delete": queue.auto_delete,
        "exclusive": queue.exclusive,
        "owner_pid_details": queue.owner.as_ref().map(|owner| json!({"name": owner})),
        "arguments": table_to_json(&queue.arguments),
        "policy": queue.policy,
        "operator_policy": null,
        "effective_policy_definition": queue.policy_definition.as_ref().map_or(json!({}), table_to_json),
        "consumers": queue.consumers,
        "messages": queue.messages_ready + queue.messages_unacknowledged,
        "messages_ready": queue.messages_ready,
        "messages_unacknowledged": queue.messages_unacknowledged,
        "message_bytes": queue.message_bytes_ready + queue.message_bytes_unacknowledged_ram,
        "message_bytes_ready": queue.message_bytes_ready,
        "message_bytes_unacknowledged": queue.message_bytes_unacknowledged_ram,
        "message_bytes_ram": queue.message_bytes_ram + queue.message_bytes_unacknowledged_ram,
        "message_bytes_paged_out": queue.message_bytes_ready.saturating_sub(queue.message_bytes_ram),
        "exclusive_consumer_tag": null,
        "single_active_consumer_tag": null,
    });
    // RabbitMQ leaves `message_stats` out of a queue nothing has passed through yet.
    if let Some(stats) = state.samples.queue_message_stats(&queue.vhost, &queue.name, &queue.stats) {
        json["message_stats"] = stats;
    }
    json
}

fn visible_queues(state: &AppState, caller: &Caller, vhost: Option<&str>) -> Vec<Value> {
    state
        .management
        .queues(vhost)
        .iter()
        .filter(|queue| caller.sees_vhost(state, &queue.vhost))
        .map(|queue| queue_json(state, queue))
        .collect()
}

async fn queues(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(respond(visible_queues(&state, &caller, None), &query)?))
}

async fn vhost_queues(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    Ok(Json(respond(visible_queues(&state, &caller, Some(&vhost)), &query)?))
}

async fn queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let found = state.management.queue(&vhost, &name).ok_or_else(ApiError::not_found)?;
    let mut shown = queue_json(&state, &found);
    // One queue's page also lists its consumers, as RabbitMQ's does.
    let consumers: Vec<Value> = state
        .management
        .consumers()
        .iter()
        .filter(|consumer| consumer.vhost == vhost && consumer.queue == name)
        .map(|consumer| {
            json!({
                "consumer_tag": consumer.consumer_tag,
                "channel_details": {"name": consumer.channel_name, "connection_name": consumer.connection_name, "number": consumer.channel_number, "user": consumer.user},
                "ack_required": consumer.ack_required,
                "prefetch_count": consumer.prefetch_count,
                "exclusive": consumer.exclusive,
                "active": consumer.active,
                "arguments": if consumer.priority != 0 { json!({"x-priority": consumer.priority}) } else { json!({}) },
            })
        })
        .collect();
    shown["consumer_details"] = Value::Array(consumers);
    Ok(Json(respond_object(shown, &query)))
}

async fn declare_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let body = parse_body(&body)?;
    let durable = body_flag(&body, "durable", true)?;
    let auto_delete = body_flag(&body, "auto_delete", false)?;
    let arguments =
        json_to_table(body.get("arguments").unwrap_or(&Value::Null), "arguments").map_err(ApiError::bad_request)?;
    let existed = state.management.queue(&vhost, &name).is_some();
    state.management.declare_queue(&caller.name, &vhost, &name, durable, auto_delete, &arguments)?;
    Ok(if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED })
}

async fn delete_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(query): Query<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let if_unused = query.if_unused.as_deref() == Some("true");
    let if_empty = query.if_empty.as_deref() == Some("true");
    state.management.delete_queue(&caller.name, &vhost, &name, if_unused, if_empty)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn purge_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    state.management.purge_queue(&caller.name, &vhost, &name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_messages(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let body = parse_body(&body)?;
    let count = match body.get("count") {
        Some(Value::Number(number)) => number.as_u64(),
        Some(Value::String(text)) => text.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| ApiError::bad_request("count must be a positive integer".into()))?;
    let ack_mode = body.get("ackmode").and_then(Value::as_str).and_then(AckMode::parse).ok_or_else(|| {
        ApiError::bad_request(
            "ackmode must be ack_requeue_true, ack_requeue_false, reject_requeue_true or reject_requeue_false".into(),
        )
    })?;
    let encoding = body.get("encoding").and_then(Value::as_str).unwrap_or("auto");
    if encoding != "auto" && encoding != "base64" {
        return Err(ApiError::bad_request("encoding must be auto or base64".into()));
    }
    let truncate = match body.get("truncate") {
        None | Some(Value::Null) => None,
        Some(Value::Number(number)) => number.as_u64().map(|bytes| bytes as usize),
        Some(Value::String(text)) => text.parse().ok(),
        _ => return Err(ApiError::bad_request("truncate must be a number of bytes".into())),
    };
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    let messages = state.management.get(&caller.name, &vhost, &name, count, ack_mode).await?;
    let shown: Vec<Value> = messages
        .iter()
        .map(|message| {
            let (payload, payload_encoding) = super::workbench::payload_json(&message.payload, encoding, truncate);
            json!({
                "payload_bytes": message.payload.len(),
                "redelivered": message.redelivered,
                "exchange": message.exchange,
                "routing_key": message.routing_key,
                "message_count": message.message_count,
                "properties": properties_to_json(&message.properties),
                "payload": payload,
                "payload_encoding": payload_encoding,
            })
        })
        .collect();
    Ok(Json(Value::Array(shown)))
}

/// RabbitMQ's `properties_key` of a binding: its routing key, or with arguments the routing key,
/// `~` and a short hash of them, so that two bindings differing only in arguments have
/// different paths.
fn properties_key(binding: &BindingView) -> String {
    if binding.arguments.inner().is_empty() {
        return binding.routing_key.clone();
    }
    let arguments = table_to_json(&binding.arguments).to_string();
    let digest = sha2::Sha256::digest(arguments.as_bytes());
    let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..12]);
    format!("{}~{hash}", binding.routing_key)
}

fn binding_json(binding: &BindingView) -> Value {
    json!({
        "source": binding.source,
        "vhost": binding.vhost,
        "destination": binding.destination,
        "destination_type": binding.destination_type,
        "routing_key": binding.routing_key,
        "arguments": table_to_json(&binding.arguments),
        "properties_key": properties_key(binding),
    })
}

fn visible_bindings(state: &AppState, caller: &Caller, vhost: Option<&str>) -> Vec<BindingView> {
    state.management.bindings(vhost).into_iter().filter(|binding| caller.sees_vhost(state, &binding.vhost)).collect()
}

fn binding_list_json(bindings: impl Iterator<Item = BindingView>) -> Vec<Value> {
    bindings.map(|binding| binding_json(&binding)).collect()
}

async fn bindings(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(respond(binding_list_json(visible_bindings(&state, &caller, None).into_iter()), &query)?))
}

async fn vhost_bindings(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    Ok(Json(respond(binding_list_json(visible_bindings(&state, &caller, Some(&vhost)).into_iter()), &query)?))
}

async fn exchange_bindings_source(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let name = exchange_name(&name).to_owned();
    find_exchange(&state, &vhost, &name).ok_or_else(ApiError::not_found)?;
    let found = visible_bindings(&state, &caller, Some(&vhost)).into_iter().filter(|binding| binding.source == name);
    Ok(Json(Value::Array(binding_list_json(found))))
}

async fn exchange_bindings_destination(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    find_exchange(&state, &vhost, &name).ok_or_else(ApiError::not_found)?;
    let found = visible_bindings(&state, &caller, Some(&vhost))
        .into_iter()
        .filter(|binding| binding.destination_type == "exchange" && binding.destination == name);
    Ok(Json(Value::Array(binding_list_json(found))))
}

async fn queue_bindings(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    state.management.queue(&vhost, &name).ok_or_else(ApiError::not_found)?;
    let found = visible_bindings(&state, &caller, Some(&vhost))
        .into_iter()
        .filter(|binding| binding.destination_type == "queue" && binding.destination == name);
    Ok(Json(Value::Array(binding_list_json(found))))
}

/// The destination of a binding path: `q` for a queue, `e` for an exchange.
fn destination(kind: &str, name: &str) -> Result<Destination, ApiError> {
    match kind {
        "q" => Ok(Destination::Queue(name.to_owned())),
        "e" => Ok(Destination::Exchange(name.to_owned())),
        _ => Err(ApiError::not_found()),
    }
}

fn bindings_between(state: &AppState, vhost: &str, source: &str, destination: &Destination) -> Vec<BindingView> {
    let (name, kind) = match destination {
        Destination::Queue(name) => (name, "queue"),
        Destination::Exchange(name) => (name, "exchange"),
    };
    state
        .management
        .bindings(Some(vhost))
        .into_iter()
        .filter(|binding| binding.source == source && binding.destination_type == kind && &binding.destination == name)
        .collect()
}

async fn binding_list(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, target)): Path<(String, String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let to = destination(&kind, &target)?;
    let source = exchange_name(&source).to_owned();
    Ok(Json(Value::Array(binding_list_json(bindings_between(&state, &vhost, &source, &to).into_iter()))))
}

async fn create_binding(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, target)): Path<(String, String, String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let to = destination(&kind, &target)?;
    let source = exchange_name(&source).to_owned();
    if source.is_empty() {
        return Err(ApiError::not_authorised("the default exchange's bindings cannot be changed"));
    }
    let body = parse_body(&body)?;
    let routing_key = match body.get("routing_key") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(key)) => key.clone(),
        Some(other) => return Err(ApiError::bad_request(format!("routing_key must be a string, not {other}"))),
    };
    let arguments =
        json_to_table(body.get("arguments").unwrap_or(&Value::Null), "arguments").map_err(ApiError::bad_request)?;
    let spec = BindingSpec { source: &source, destination: &to, routing_key: &routing_key, arguments: &arguments };
    state.management.change_binding(&caller.name, &vhost, &spec, true)?;
    let created = BindingView {
        vhost: vhost.clone(),
        source: source.clone(),
        destination: target.clone(),
        destination_type: if kind == "q" { "queue" } else { "exchange" },
        routing_key,
        arguments,
    };
    // RabbitMQ's Location is relative to the request's path: `{destination}/{properties_key}`.
    let location = format!("{}/{}", encode_segment(&target), encode_segment(&properties_key(&created)));
    Ok((StatusCode::CREATED, [(header::LOCATION, location)]).into_response())
}

fn find_binding(
    state: &AppState,
    vhost: &str,
    source: &str,
    to: &Destination,
    props: &str,
) -> Result<BindingView, ApiError> {
    bindings_between(state, vhost, source, to)
        .into_iter()
        .find(|binding| properties_key(binding) == props)
        .ok_or_else(ApiError::not_found)
}

async fn binding(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, target, props)): Path<(String, String, String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let to = destination(&kind, &target)?;
    let found = find_binding(&state, &vhost, exchange_name(&source), &to, &props)?;
    Ok(Json(binding_json(&found)))
}

async fn delete_binding(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, target, props)): Path<(String, String, String, String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let to = destination(&kind, &target)?;
    let source = exchange_name(&source).to_owned();
    let found = find_binding(&state, &vhost, &source, &to, &props)?;
    if source.is_empty() {
        return Err(ApiError::not_authorised("the default exchange's bindings cannot be changed"));
    }
    let spec =
        BindingSpec { source: &source, destination: &to, routing_key: &found.routing_key, arguments: &found.arguments };
    state.management.change_binding(&caller.name, &vhost, &spec, false)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Percent-encodes a path segment.
pub(crate) fn encode_segment(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        // Unreserved characters and `*`, which a path segment may hold as it is (RFC 3986).
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'*') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}
