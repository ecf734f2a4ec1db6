//! Connections, channels and consumers: listed (a monitor sees all of them, any other user its
//! own connections and channels, and the consumers in its vhosts), and a connection closed with
//! `DELETE` (320 CONNECTION_FORCED to the client, with the `X-Reason` header as the reason).

use super::node;
use crate::AppState;
use crate::amqp_json::table_to_json;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::listing::{ListQuery, respond};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use wharf_broker::{ChannelView, ConnectionView, ConsumerView};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/connections", get(connections))
        .route("/api/vhosts/{vhost}/connections", get(vhost_connections))
        .route("/api/connections/{name}", get(connection).delete(close_connection))
        .route("/api/connections/{name}/channels", get(connection_channels))
        .route("/api/channels", get(channels))
        .route("/api/vhosts/{vhost}/channels", get(vhost_channels))
        .route("/api/channels/{name}", get(channel))
        .route("/api/consumers", get(consumers))
        .route("/api/consumers/{vhost}", get(vhost_consumers))
}

fn connection_json(state: &AppState, connection: &ConnectionView) -> Value {
    json!({
        "name": connection.name,
        "node": node(state),
        "type": "network",
        "state": "running",
        "protocol": "AMQP 0-9-1",
        "user": connection.user,
        "user_who_performed_action": connection.user,
        "vhost": connection.vhost,
        "host": connection.local.ip().to_string(),
        "port": connection.local.port(),
        "peer_host": connection.peer.ip().to_string(),
        "peer_port": connection.peer.port(),
        "ssl": connection.tls,
        "auth_mechanism": connection.auth_mechanism,
        "client_properties": table_to_json(&connection.client_properties),
        "user_provided_name": connection.client_provided_name,
        "connected_at": connection.connected_at_ms,
        "frame_max": connection.frame_max,
        "channel_max": connection.channel_max,
        "timeout": connection.heartbeat_s,
        "channels": connection.channels,
        "recv_oct": connection.received_bytes,
    })
}

fn channel_json(state: &AppState, channel: &ChannelView) -> Value {
    json!({
        "name": channel.name,
        "node": node(state),
        "number": channel.number,
        "user": channel.user,
        "user_who_performed_action": channel.user,
        "vhost": channel.vhost,
        "state": "running",
        "connection_details": {
            "name": channel.connection_name,
            "peer_host": channel.peer.map(|peer| peer.ip().to_string()),
            "peer_port": channel.peer.map(|peer| peer.port()),
        },
        "prefetch_count": channel.prefetch_count,
        "global_prefetch_count": channel.global_prefetch_count,
        "messages_unacknowledged": channel.messages_unacknowledged,
        "consumer_count": channel.consumer_count,
    })
}

fn consumer_json(state: &AppState, consumer: &ConsumerView) -> Value {
    json!({
        "consumer_tag": consumer.consumer_tag,
        "queue": {"name": consumer.queue, "vhost": consumer.vhost},
        "channel_details": {
            "name": consumer.channel_name,
            "number": consumer.channel_number,
            "connection_name": consumer.connection_name,
            "node": node(state),
            "peer_host": consumer.peer.map(|peer| peer.ip().to_string()),
            "peer_port": consumer.peer.map(|peer| peer.port()),
            "user": consumer.user,
        },
        "ack_required": consumer.ack_required,
        "prefetch_count": consumer.prefetch_count,
        "exclusive": consumer.exclusive,
        "active": consumer.active,
        "activity_status": if consumer.active { "up" } else { "waiting" },
        "arguments": if consumer.priority != 0 { json!({"x-priority": consumer.priority}) } else { json!({}) },
    })
}

/// The connections the caller may see, in `vhost` if given.
fn visible_connections(state: &AppState, caller: &Caller, vhost: Option<&str>) -> Vec<ConnectionView> {
    state
        .management
        .connections()
        .into_iter()
        .filter(|connection| caller.is_monitor() || connection.user == caller.name)
        .filter(|connection| vhost.is_none_or(|vhost| connection.vhost == vhost))
        .collect()
}

fn visible_channels(state: &AppState, caller: &Caller) -> Vec<ChannelView> {
    state
        .management
        .channels()
        .into_iter()
        .filter(|channel| caller.is_monitor() || channel.user == caller.name)
        .collect()
}

async fn connections(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let items = visible_connections(&state, &caller, None)
        .iter()
        .map(|connection| connection_json(&state, connection))
        .collect();
    Ok(Json(respond(items, &query)?))
}

async fn vhost_connections(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let items = visible_connections(&state, &caller, Some(&vhost))
        .iter()
        .map(|connection| connection_json(&state, connection))
        .collect();
    Ok(Json(respond(items, &query)?))
}

fn find_connection(state: &AppState, caller: &Caller, name: &str) -> Result<ConnectionView, ApiError> {
    visible_connections(state, caller, None)
        .into_iter()
        .find(|connection| connection.name == name)
        .ok_or_else(ApiError::not_found)
}

async fn connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(connection_json(&state, &find_connection(&state, &caller, &name)?)))
}

async fn close_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let connection = find_connection(&state, &caller, &name)?;
    if !caller.is_administrator() && connection.user != caller.name {
        return Err(ApiError::not_authorised("Not administrator user"));
    }
    let reason = headers
        .get("x-reason")
        .and_then(|value| value.to_str().ok())
        .filter(|reason| !reason.is_empty())
        .unwrap_or("Closed via management plugin");
    // Reply texts are short strings: the connection cuts the reason to fit.
    state.management.close_connection(&connection.name, reason);
    Ok(StatusCode::NO_CONTENT)
}

async fn connection_channels(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let connection = find_connection(&state, &caller, &name)?;
    let items = visible_channels(&state, &caller)
        .iter()
        .filter(|channel| channel.connection_name == connection.name)
        .map(|channel| channel_json(&state, channel))
        .collect();
    Ok(Json(respond(items, &query)?))
}

async fn channels(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let items = visible_channels(&state, &caller).iter().map(|channel| channel_json(&state, channel)).collect();
    Ok(Json(respond(items, &query)?))
}

async fn vhost_channels(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let items = visible_channels(&state, &caller)
        .iter()
        .filter(|channel| channel.vhost == vhost)
        .map(|channel| channel_json(&state, channel))
        .collect();
    Ok(Json(respond(items, &query)?))
}

async fn channel(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let found = visible_channels(&state, &caller)
        .into_iter()
        .find(|channel| channel.name == name)
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(channel_json(&state, &found)))
}

async fn consumers(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let items = state
        .management
        .consumers()
        .iter()
        .filter(|consumer| caller.sees_vhost(&state, &consumer.vhost))
        .map(|consumer| consumer_json(&state, consumer))
        .collect();
    Ok(Json(respond(items, &query)?))
}

async fn vhost_consumers(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let items = state
        .management
        .consumers()
        .iter()
        .filter(|consumer| consumer.vhost == vhost)
        .map(|consumer| consumer_json(&state, consumer))
        .collect();
    Ok(Json(respond(items, &query)?))
}
