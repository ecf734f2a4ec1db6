//! Users, permissions, topic permissions and policies. Users and permissions are the
//! administrator's (RabbitMQ's rule); a policy is seen by anyone who sees its vhost.
//!
//! Users, permissions and topic permissions are changed here too (by an administrator), durably,
//! and policies (by a policymaker with access to the vhost, or an administrator), applied at once
//! to the vhost's queues and exchanges. What the broker's configuration defines is refused with a
//! reason naming where to change it.

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
use wharf_broker::{ApplyTo, NewPassword, Permission, Policy, PolicySpec, TopicPermission, UserView};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/users", get(users))
        .route("/api/users/{name}", get(user).put(put_user).delete(delete_user))
        .route("/api/users/{name}/permissions", get(user_permissions))
        .route("/api/users/{name}/topic-permissions", get(user_topic_permissions))
        .route("/api/permissions", get(permissions))
        .route("/api/permissions/{vhost}/{user}", get(permission).put(put_permission).delete(delete_permission))
        .route("/api/vhosts/{vhost}/permissions", get(vhost_permissions))
        .route("/api/topic-permissions", get(topic_permissions))
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            get(user_vhost_topic_permissions).put(put_topic_permission).delete(delete_topic_permissions),
        )
        .route("/api/vhosts/{vhost}/topic-permissions", get(vhost_topic_permissions))
        .route("/api/policies", get(policies))
        .route("/api/policies/{vhost}", get(vhost_policies))
        .route("/api/policies/{vhost}/{name}", get(policy).put(put_policy).delete(delete_policy))
}

/// May the caller change policies in `vhost`: a policymaker with access to it, or an
/// administrator (RabbitMQ's rule).
fn require_policymaker(state: &AppState, caller: &Caller, vhost: &str) -> Result<(), ApiError> {
    caller.require_vhost(state, vhost)?;
    if caller.is_policymaker() && (caller.is_administrator() || state.management.can_access_vhost(&caller.name, vhost))
    {
        Ok(())
    } else {
        Err(ApiError::not_authorised("Not policymaker user"))
    }
}

async fn put_policy(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    require_policymaker(&state, &caller, &vhost)?;
    let body = parse_body(&body)?;
    let pattern = required_text(&body, "pattern")?;
    let apply_to = match body.get("apply-to").or_else(|| body.get("apply_to")) {
        None | Some(Value::Null) => ApplyTo::All,
        Some(Value::String(text)) => ApplyTo::parse(text).map_err(|error| ApiError::bad_request(error.text))?,
        Some(other) => return Err(ApiError::bad_request(format!("apply-to must be a string, not {other}"))),
    };
    let priority = match body.get("priority") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(number)) => {
            number.as_i64().ok_or_else(|| ApiError::bad_request("priority must be an integer".into()))?
        }
        Some(Value::String(text)) => text
            .trim()
            .parse()
            .map_err(|_| ApiError::bad_request(format!("priority must be an integer, not {text}")))?,
        Some(other) => return Err(ApiError::bad_request(format!("priority must be an integer, not {other}"))),
    };
    let definition = match body.get("definition") {
        Some(definition @ Value::Object(_)) => {
            crate::amqp_json::json_to_table(definition, "definition").map_err(ApiError::bad_request)?
        }
        None | Some(Value::Null) => return Err(ApiError::bad_request("definition is missing".into())),
        Some(other) => return Err(ApiError::bad_request(format!("definition must be an object, not {other}"))),
    };
    let spec = PolicySpec { pattern, apply_to, priority, definition };
    let created = state.management.put_policy(&vhost, &name, spec)?;
    Ok(if created { StatusCode::CREATED } else { StatusCode::NO_CONTENT })
}

async fn delete_policy(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    require_policymaker(&state, &caller, &vhost)?;
    state.management.delete_policy(&vhost, &name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// A string field of a body, required.
fn required_text(body: &Value, name: &str) -> Result<String, ApiError> {
    match body.get(name) {
        Some(Value::String(text)) => Ok(text.clone()),
        None | Some(Value::Null) => Err(ApiError::bad_request(format!("{name} is missing"))),
        Some(other) => Err(ApiError::bad_request(format!("{name} must be a string, not {other}"))),
    }
}

/// RabbitMQ's `tags`: a comma-separated string or a list of strings.
/// `tags` of a user or a vhost: `"a,b"` or `["a", "b"]`.
pub(crate) fn tags(body: &Value) -> Result<Vec<String>, ApiError> {
    match body.get("tags") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => {
            Ok(text.split(',').map(str::trim).filter(|tag| !tag.is_empty()).map(str::to_owned).collect())
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str().map(str::to_owned).ok_or_else(|| ApiError::bad_request("tags must be strings".into()))
            })
            .collect(),
        Some(other) => Err(ApiError::bad_request(format!("tags must be a string or a list, not {other}"))),
    }
}

async fn put_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let body = parse_body(&body)?;
    let password = match (body.get("password"), body.get("password_hash")) {
        (Some(Value::String(password)), _) => NewPassword::Clear(password.clone()),
        (_, Some(Value::String(hash))) => NewPassword::Hash {
            password_hash: hash.clone(),
            hashing_algorithm: body
                .get("hashing_algorithm")
                .and_then(Value::as_str)
                .unwrap_or("rabbit_password_hashing_sha256")
                .to_owned(),
        },
        (Some(_), _) | (_, Some(_)) => return Err(ApiError::bad_request("password must be a string".into())),
        (None, None) => NewPassword::Keep,
    };
    let created = state.management.put_user(&name, password, tags(&body)?)?;
    Ok(if created { StatusCode::CREATED } else { StatusCode::NO_CONTENT })
}

async fn delete_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    state.management.delete_user(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let body = parse_body(&body)?;
    let permission = Permission {
        user,
        vhost,
        configure: required_text(&body, "configure")?,
        write: required_text(&body, "write")?,
        read: required_text(&body, "read")?,
    };
    let created = state.management.put_permission(permission)?;
    Ok(if created { StatusCode::CREATED } else { StatusCode::NO_CONTENT })
}

async fn delete_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    state.management.delete_permission(&user, &vhost)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_topic_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let body = parse_body(&body)?;
    let permission = TopicPermission {
        user,
        vhost,
        exchange: required_text(&body, "exchange")?,
        write: required_text(&body, "write")?,
        read: required_text(&body, "read")?,
    };
    let existed = state.management.topic_permissions().iter().any(|known| {
        known.user == permission.user && known.vhost == permission.vhost && known.exchange == permission.exchange
    });
    state.management.put_topic_permission(permission)?;
    Ok(if existed { StatusCode::NO_CONTENT } else { StatusCode::CREATED })
}

async fn delete_topic_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    state.management.delete_topic_permissions(&user, &vhost)?;
    Ok(StatusCode::NO_CONTENT)
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
