//! Users, permissions, topic permissions and policies. Users and permissions are the
//! administrator's (RabbitMQ's rule); a policy is seen by anyone who sees its vhost.
//!
//! They are listed here; they are set by the broker's configuration (`wharf.toml`, `--policy`,
//! `--definitions`), so a change through the API is refused with 405 and a reason naming where
//! to make it.

use super::parse_body;
use crate::AppState;
use crate::amqp_json::table_to_json;
use crate::auth::Caller;
use crate::error::ApiError;
use crate::listing::{ListQuery, respond};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use wharf_broker::{Permission, Policy, TopicPermission, UserView};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/users", get(users))
        .route("/api/users/{name}", get(user).put(configured_elsewhere).delete(configured_elsewhere))
        .route("/api/users/{name}/permissions", get(user_permissions))
        .route("/api/users/{name}/topic-permissions", get(user_topic_permissions))
        .route("/api/permissions", get(permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(permission).put(configured_elsewhere).delete(configured_elsewhere),
        )
        .route("/api/vhosts/{vhost}/permissions", get(vhost_permissions))
        .route("/api/topic-permissions", get(topic_permissions))
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            get(user_vhost_topic_permissions).put(configured_elsewhere).delete(configured_elsewhere),
        )
        .route("/api/vhosts/{vhost}/topic-permissions", get(vhost_topic_permissions))
        .route("/api/policies", get(policies))
        .route("/api/policies/{vhost}", get(vhost_policies))
        .route("/api/policies/{vhost}/{name}", get(policy).put(configured_elsewhere).delete(configured_elsewhere))
}

/// A change to what the configuration defines.
async fn configured_elsewhere(_caller: Caller, body: Bytes) -> Result<StatusCode, ApiError> {
    parse_body(&body)?;
    Err(ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        error: "method_not_allowed",
        reason: "users, permissions and policies are set in the broker's configuration (wharf.toml, --policy, --definitions)".into(),
    })
}

pub(crate) fn user_json(user: &UserView) -> Value {
    json!({
        "name": user.name,
        "password_hash": user.password_hash,
        "hashing_algorithm": user.hashing_algorithm,
        "tags": user.tags,
        "limits": {},
    })
}

pub(crate) fn permission_json(permission: &Permission) -> Value {
    json!({
        "user": permission.user,
        "vhost": permission.vhost,
        "configure": permission.configure,
        "write": permission.write,
        "read": permission.read,
    })
}

pub(crate) fn topic_permission_json(permission: &TopicPermission) -> Value {
    json!({
        "user": permission.user,
        "vhost": permission.vhost,
        "exchange": permission.exchange,
        "write": permission.write,
        "read": permission.read,
    })
}

pub(crate) fn policy_json(vhost: &str, policy: &Policy) -> Value {
    json!({
        "vhost": vhost,
        "name": policy.name,
        "pattern": policy.pattern.as_str(),
        "apply-to": policy.apply_to.as_str(),
        "definition": table_to_json(&policy.definition),
        "priority": policy.priority,
    })
}

async fn users(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    Ok(Json(respond(state.management.users().iter().map(user_json).collect(), &query)?))
}

fn find_user(state: &AppState, name: &str) -> Result<UserView, ApiError> {
    state.management.users().into_iter().find(|user| user.name == name).ok_or_else(ApiError::not_found)
}

async fn user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    Ok(Json(user_json(&find_user(&state, &name)?)))
}

async fn user_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    find_user(&state, &name)?;
    let found = state.management.permissions().into_iter().filter(|permission| permission.user == name);
    Ok(Json(Value::Array(found.map(|permission| permission_json(&permission)).collect())))
}

async fn user_topic_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    find_user(&state, &name)?;
    let found = state.management.topic_permissions().into_iter().filter(|permission| permission.user == name);
    Ok(Json(Value::Array(found.map(|permission| topic_permission_json(&permission)).collect())))
}

async fn permissions(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    Ok(Json(respond(state.management.permissions().iter().map(permission_json).collect(), &query)?))
}

async fn permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    let found = state
        .management
        .permissions()
        .into_iter()
        .find(|permission| permission.vhost == vhost && permission.user == user)
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(permission_json(&found)))
}

async fn vhost_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    caller.require_vhost(&state, &vhost)?;
    let found = state.management.permissions().into_iter().filter(|permission| permission.vhost == vhost);
    Ok(Json(Value::Array(found.map(|permission| permission_json(&permission)).collect())))
}

async fn topic_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    Ok(Json(respond(state.management.topic_permissions().iter().map(topic_permission_json).collect(), &query)?))
}

async fn user_vhost_topic_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    let found: Vec<Value> = state
        .management
        .topic_permissions()
        .iter()
        .filter(|permission| permission.vhost == vhost && permission.user == user)
        .map(topic_permission_json)
        .collect();
    if found.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(Json(Value::Array(found)))
}

async fn vhost_topic_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    caller.require_vhost(&state, &vhost)?;
    let found = state.management.topic_permissions().into_iter().filter(|permission| permission.vhost == vhost);
    Ok(Json(Value::Array(found.map(|permission| topic_permission_json(&permission)).collect())))
}

async fn policies(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let items = state
        .management
        .policies()
        .iter()
        .filter(|(vhost, _)| caller.sees_vhost(&state, vhost))
        .map(|(vhost, policy)| policy_json(vhost, policy))
        .collect();
    Ok(Json(respond(items, &query)?))
}

async fn vhost_policies(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let items = state
        .management
        .policies()
        .iter()
        .filter(|(policy_vhost, _)| *policy_vhost == vhost)
        .map(|(vhost, policy)| policy_json(vhost, policy))
        .collect();
    Ok(Json(respond(items, &query)?))
}

async fn policy(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    let found = state
        .management
        .policies()
        .into_iter()
        .find(|(policy_vhost, policy)| *policy_vhost == vhost && policy.name == name)
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(policy_json(&found.0, &found.1)))
}
