//! The broker as a whole: `overview`, `nodes`, `whoami`, `cluster-name`, Wharf's
//! `cluster/members` (each member's link as this node sees it), `cluster/metadata` (the
//! metadata group), `extensions`,
//! `aliveness-test` and the `health/checks/*` endpoints RabbitMQ has for probes (200 and
//! `{"status":"ok"}` when healthy, 503 and `{"status":"failed","reason":…}` when not).

use super::node;
use crate::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::listing::{ListQuery, respond_object};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Router, body::Bytes};
use serde_json::{Value, json};
use wharf_broker::{AckMode, Overview};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{node}", get(one_node))
        .route("/api/whoami", get(whoami))
        .route("/api/cluster-name", get(cluster_name))
        .route("/api/cluster/members", get(cluster_members))
        .route("/api/cluster/members/{node}", axum::routing::put(add_cluster_member).delete(remove_cluster_member))
        .route("/api/cluster/metadata", get(cluster_metadata))
        .route("/api/cluster/queues", get(cluster_queues))
        .route("/api/queues/quorum/{vhost}/{name}/replicas/add", axum::routing::post(add_replica))
        .route(
            "/api/queues/quorum/{vhost}/{name}/replicas/delete",
            axum::routing::post(delete_replica).delete(delete_replica),
        )
        .route("/api/queues/quorum/{vhost}/{name}/leader", axum::routing::post(move_leader))
        .route("/api/extensions", get(extensions))
        .route("/api/aliveness-test/{vhost}", get(aliveness_test))
        .route("/api/health/checks/alarms", get(alarms))
        .route("/api/health/checks/local-alarms", get(alarms))
        .route("/api/health/checks/virtual-hosts", get(ok))
        .route("/api/health/checks/node-is-quorum-critical", get(ok))
        .route("/api/health/checks/node-is-mirror-sync-critical", get(ok))
        .route("/api/health/checks/port-listener/{port}", get(port_listener))
        .route("/api/health/checks/protocol-listener/{protocol}", get(protocol_listener))
        .route("/api/health/checks/certificate-expiration/{within}/{unit}", get(ok))
}

/// The exchange types a vhost can declare, as `overview` lists them.
const EXCHANGE_TYPES: [(&str, &str); 5] = [
    ("direct", "AMQP direct exchange, as per the AMQP specification"),
    ("fanout", "AMQP fanout exchange, as per the AMQP specification"),
    ("headers", "AMQP headers exchange, as per the AMQP specification"),
    ("topic", "AMQP topic exchange, as per the AMQP specification"),
    ("x-delayed-message", "Delayed message exchange: holds a message for its x-delay"),
];

fn listeners(state: &AppState, overview: &Overview) -> Vec<Value> {
    let node = node(state);
    let mut listeners = Vec::new();
    for (protocol, address) in [("amqp", overview.amqp_listen), ("amqp/ssl", overview.amqps_listen)] {
        if let Some(address) = address {
            listeners.push(json!({
                "node": node, "protocol": protocol, "ip_address": address.ip().to_string(), "port": address.port(),
            }));
        }
    }
    listeners.push(json!({
        "node": node, "protocol": "http", "ip_address": state.listen.ip().to_string(), "port": state.listen.port(),
    }));
    listeners
}

/// RabbitMQ's history parameters: how far back (`*_age`, seconds) and how far apart (`*_incr`).
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct RatesQuery {
    msg_rates_age: Option<u64>,
    msg_rates_incr: Option<u64>,
    lengths_age: Option<u64>,
    lengths_incr: Option<u64>,
}

impl RatesQuery {
    fn messages(&self) -> Option<(u64, u64)> {
        self.msg_rates_age.map(|age| (age.min(3600), self.msg_rates_incr.unwrap_or(5)))
    }

    fn lengths(&self) -> Option<(u64, u64)> {
        self.lengths_age.map(|age| (age.min(3600), self.lengths_incr.unwrap_or(5)))
    }
}

async fn overview(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
    Query(rates): Query<RatesQuery>,
) -> Json<Value> {
    let overview = state.management.overview();
    let node = node(&state);
    // A user who is not a monitor sees the totals of its own vhosts only (RabbitMQ's rule).
    let (ready, unacked) = if caller.is_monitor() {
        (overview.messages_ready, overview.messages_unacknowledged)
    } else {
        let mut totals = (0, 0);
        for vhost in state.management.vhosts().iter().filter(|vhost| caller.sees_vhost(&state, &vhost.name)) {
            totals.0 += vhost.messages_ready;
            totals.1 += vhost.messages_unacknowledged;
        }
        totals
    };
    let exchange_types: Vec<Value> = EXCHANGE_TYPES
        .iter()
        .map(|(name, description)| json!({"name": name, "description": description, "enabled": true}))
        .collect();
    // Rates are the broker's: a monitor sees them (and the totals' history); another user sees
    // its vhosts' totals, without rates, which Wharf does not keep per vhost.
    let (queue_totals, message_stats) = if caller.is_monitor() {
        let now = crate::sampler::sample_now(&state.management);
        (state.samples.queue_totals(&now, rates.lengths()), state.samples.message_stats(&now, rates.messages()))
    } else {
        (json!({"messages": ready + unacked, "messages_ready": ready, "messages_unacknowledged": unacked}), json!({}))
    };
    Json(respond_object(
        json!({
            "management_version": overview.version,
            "rates_mode": "basic",
            "exchange_types": exchange_types,
            "product_version": overview.version,
            "product_name": "Wharf",
            "rabbitmq_version": overview.version,
            "cluster_name": node,
            "node": node,
            "disable_stats": false,
            "enable_queue_totals": true,
            "object_totals": {
                "connections": overview.connections,
                "channels": overview.channels,
                "consumers": overview.consumers,
                "exchanges": overview.exchanges,
                "queues": overview.queues,
            },
            "queue_totals": queue_totals,
            "message_stats": message_stats,
            "listeners": listeners(&state, &overview),
            "contexts": [{"node": node, "description": "Wharf Management", "path": "/", "port": state.listen.port().to_string()}],
        }),
        &query,
    ))
}

fn node_json(state: &AppState) -> Value {
    let overview = state.management.overview();
    let uptime_ms = state.management.now_ms().saturating_sub(state.management.started_at_ms());
    json!({
        "name": node(state),
        "type": "disc",
        "running": true,
        "os_pid": std::process::id().to_string(),
        "uptime": uptime_ms,
        "processors": std::thread::available_parallelism().map_or(1, usize::from),
        "mem_used": overview.held_memory_bytes,
        "mem_limit": overview.memory_high_watermark_bytes,
        "mem_alarm": overview.memory_alarm,
        "disk_free_limit": overview.disk_free_limit_bytes,
        "disk_free_alarm": overview.disk_alarm,
        "partitions": [],
        "being_drained": false,
        "exchange_types": EXCHANGE_TYPES.iter().map(|(name, description)| json!({"name": name, "description": description, "enabled": true})).collect::<Vec<_>>(),
    })
}

async fn nodes(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require_monitor()?;
    Ok(Json(json!([node_json(&state)])))
}

async fn one_node(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_monitor()?;
    if name != node(&state) {
        return Err(ApiError::not_found());
    }
    Ok(Json(node_json(&state)))
}

async fn whoami(caller: Caller) -> Json<Value> {
    Json(json!({"name": caller.name, "tags": caller.tags}))
}

async fn cluster_name(State(state): State<AppState>, _caller: Caller) -> Json<Value> {
    Json(json!({"name": node(&state)}))
}

/// The cluster's members: this node first, then each other member with its link's state. A
/// broker on its own is a cluster of one.
async fn cluster_members(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require_monitor()?;
    let Some(members) = state.management.cluster_members() else {
        return Ok(Json(json!([{"node": null, "name": node(&state), "this_node": true, "clustered": false}])));
    };
    let metadata = state.management.metadata_group();
    let members: Vec<Value> = members
        .into_iter()
        .map(|member| {
            let leader = metadata.as_ref().and_then(|group| group.leader);
            let lag = metadata.as_ref().and_then(|group| group.lag.get(&member.node).copied().flatten());
            json!({
                "metadata_leader": leader == Some(member.node),
                "metadata_lag": lag,
                "node": member.node,
                "address": member.address,
                "this_node": member.this_node,
                "clustered": true,
                "outbound_connected": member.outbound_connected,
                "inbound_links": member.inbound_links,
                "last_answer_ms_ago": member.last_answer_ms_ago,
                "consecutive_failures": member.consecutive_failures,
                "last_error": member.last_error,
            })
        })
        .collect();
    Ok(Json(Value::Array(members)))
}

/// Adds a node to the running cluster: `{"address": "HOST:PORT"}` (its `--cluster-listen`
/// address as the others reach it). The node must be running with `--cluster-join`; the answer
/// comes once it has caught up and votes (201).
async fn add_cluster_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(node): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let node = member_id(&node)?;
    let body = super::parse_body(&body)?;
    let Some(address) = body.get("address").and_then(Value::as_str) else {
        return Err(ApiError::bad_request("the body needs \"address\": the node's HOST:PORT for cluster links".into()));
    };
    state.management.change_cluster_member(node, Some(address.to_owned())).await?;
    Ok(StatusCode::CREATED)
}

/// Removes a node from the running cluster (refused while it holds a quorum queue's replica).
async fn remove_cluster_member(
    State(state): State<AppState>,
    caller: Caller,
    Path(node): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let node = member_id(&node)?;
    state.management.change_cluster_member(node, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Adds a replica of a quorum queue on `{"node": N}` (RabbitMQ's `rabbitmq-queues add_member`);
/// answered once the new replica has caught up and votes (201).
async fn add_replica(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let node = replica_node(&body)?;
    state.management.change_quorum_replica(&vhost, &name, node, true).await?;
    Ok(StatusCode::CREATED)
}

/// Removes a quorum queue's replica on `{"node": N}` (`rabbitmq-queues delete_member`).
async fn delete_replica(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let node = replica_node(&body)?;
    state.management.change_quorum_replica(&vhost, &name, node, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Makes the replica on `{"node": N}` the quorum queue's leader (RabbitMQ's
/// `rabbitmq-queues transfer_leadership`); answered once it leads (204).
async fn move_leader(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let node = replica_node(&body)?;
    state.management.move_quorum_leader(&vhost, &name, node).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn replica_node(body: &[u8]) -> Result<u64, ApiError> {
    let body = super::parse_body(body)?;
    body.get("node")
        .and_then(Value::as_u64)
        .filter(|node| *node > 0)
        .ok_or_else(|| ApiError::bad_request("the body needs \"node\": the id of the node (a number from 1)".into()))
}

fn member_id(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .ok()
        .filter(|node| *node > 0)
        .ok_or_else(|| ApiError::bad_request(format!("'{text}' is not a node id (a number from 1)")))
}

/// The metadata group (definitions replicated to every node) as this node sees it: its role,
/// the leader, the term, how far its log and state machine are, the voters, and on the leader
/// how many entries each other member is behind. 404 on a broker on its own.
async fn cluster_metadata(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require_monitor()?;
    let Some(group) = state.management.metadata_group() else { return Err(ApiError::not_found()) };
    let lag: serde_json::Map<String, Value> =
        group.lag.iter().map(|(node, behind)| (node.to_string(), json!(behind))).collect();
    Ok(Json(json!({
        "role": group.role,
        "leader": group.leader,
        "term": group.term,
        "last_log_index": group.last_log_index,
        "applied_index": group.applied_index,
        "snapshot_index": group.snapshot_index,
        "purged_index": group.purged_index,
        "voters": group.voters,
        "learners": group.learners,
        "lag": lag,
    })))
}

/// This node's quorum queues' groups: each queue's members, its group's leader and term as this
/// node sees them, and what this node's replica holds (ready, delivered and unsettled, consumers).
async fn cluster_queues(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require_monitor()?;
    let queues: Vec<Value> = state
        .management
        .quorum_queues()
        .into_iter()
        .map(|queue| {
            json!({
                "vhost": queue.vhost,
                "name": queue.name,
                "group": queue.group,
                "members": queue.members,
                "role": queue.status.role,
                "leader": queue.status.leader,
                "term": queue.status.term,
                "last_log_index": queue.status.last_log_index,
                "applied_index": queue.status.applied_index,
                "snapshot_index": queue.status.snapshot_index,
                "purged_index": queue.status.purged_index,
                "ready": queue.ready,
                "unacked": queue.checked_out,
                "consumers": queue.consumers,
                "early_elections": queue.early_elections,
            })
        })
        .collect();
    Ok(Json(Value::Array(queues)))
}

async fn extensions(_caller: Caller) -> Json<Value> {
    Json(json!([]))
}

fn healthy() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

fn failed(reason: String, extra: Value) -> Response {
    let mut body = json!({"status": "failed", "reason": reason});
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn ok(_caller: Caller) -> Response {
    healthy()
}

async fn alarms(State(state): State<AppState>, _caller: Caller) -> Response {
    let overview = state.management.overview();
    let mut alarms = Vec::new();
    if overview.memory_alarm {
        alarms.push(json!({"node": node(&state), "resource": "memory"}));
    }
    if overview.disk_alarm {
        alarms.push(json!({"node": node(&state), "resource": "disk"}));
    }
    if alarms.is_empty() {
        healthy()
    } else {
        failed("resource alarm(s) in effect in the cluster".into(), json!({"alarms": alarms}))
    }
}

async fn port_listener(State(state): State<AppState>, _caller: Caller, Path(port): Path<String>) -> Response {
    let overview = state.management.overview();
    let ports: Vec<u16> = listeners(&state, &overview)
        .iter()
        .filter_map(|listener| listener["port"].as_u64())
        .map(|port| port as u16)
        .collect();
    match port.parse::<u16>() {
        Ok(port) if ports.contains(&port) => Json(json!({"status": "ok", "port": port})).into_response(),
        Ok(port) => failed(format!("No active listener on port {port}"), json!({"missing": port, "ports": ports})),
        Err(_) => ApiError::bad_request(format!("'{port}' is not a port number")).into_response(),
    }
}

async fn protocol_listener(State(state): State<AppState>, _caller: Caller, Path(protocol): Path<String>) -> Response {
    let overview = state.management.overview();
    let protocols: Vec<String> = listeners(&state, &overview)
        .iter()
        .filter_map(|listener| listener["protocol"].as_str().map(str::to_owned))
        .collect();
    let wanted = match protocol.as_str() {
        "amqp091" | "amqp0.9.1" | "amqp0-9-1" => "amqp",
        "amqps" => "amqp/ssl",
        other => other,
    };
    if protocols.iter().any(|found| found == wanted) {
        Json(json!({"status": "ok", "protocol": protocol})).into_response()
    } else {
        failed(
            format!("No active listener for protocol {protocol}"),
            json!({"missing": protocol, "protocols": protocols}),
        )
    }
}

/// RabbitMQ's aliveness test: declares the queue `aliveness-test` in the vhost, publishes a
/// message to it and reads it back.
async fn aliveness_test(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let management = &state.management;
    const QUEUE: &str = "aliveness-test";
    management.declare_queue(&caller.name, &vhost, QUEUE, false, false, &Default::default())?;
    let properties = wharf_wire::protocol::BasicProperties::default();
    let payload = Bytes::from_static(b"test_message");
    management.publish(&caller.name, &vhost, "", QUEUE, properties, payload.clone()).await?;
    let got = management.get(&caller.name, &vhost, QUEUE, 1, AckMode::Ack).await?;
    if got.first().is_some_and(|message| message.payload == payload) {
        Ok(healthy())
    } else {
        Ok(failed("the aliveness test message did not come back".into(), json!({})))
    }
}
