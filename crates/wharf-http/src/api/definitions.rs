//! Definitions: `GET /api/definitions` exports the broker's users, vhosts, permissions, policies
//! and durable topology in the format `rabbitmqctl export_definitions` writes (per vhost with
//! `/api/definitions/{vhost}`: that vhost's policies and topology); `POST` imports such a file.
//!
//! An import sets its users (with their hashes and tags), permissions and topic permissions,
//! durably, as the API's `PUT`s do, then declares its exchanges, queues and bindings as the
//! caller, through the same paths as a client's declarations (an existing object with other
//! properties is refused, 406 as over AMQP). Its vhosts are created and its policies set, as the
//! API's `PUT`s do, before its topology; a policy the configuration defines may only be repeated
//! as it is (so an export imports back unchanged): a file that changes one is refused whole,
//! before anything is changed, naming it.

use super::access::{permission_json, policy_json, topic_permission_json, user_json};
use crate::AppState;
use crate::amqp_json::table_to_json;
use crate::auth::Caller;
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use wharf_broker::{BindingSpec, Definitions, ExchangeSpec, Management, NewPassword, PolicySpec};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/definitions", get(export_all).post(import_all))
        .route("/api/definitions/{vhost}", get(export_vhost).post(import_vhost))
}

/// Durable topology, as definitions list it: durable queues that are not exclusive, durable
/// exchanges other than the default and `amq.*` ones, and bindings between those (the
/// default exchange's implicit ones excluded).
fn topology(management: &Management, vhost: Option<&str>) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let queues: Vec<_> =
        management.queues(vhost).into_iter().filter(|queue| queue.durable && !queue.exclusive).collect();
    let exchanges: Vec<_> = management
        .exchanges(vhost)
        .into_iter()
        .filter(|exchange| exchange.durable && !exchange.name.is_empty() && !exchange.name.starts_with("amq."))
        .collect();
    let queue_json = queues
        .iter()
        .map(|queue| {
            json!({"name": queue.name, "vhost": queue.vhost, "durable": true, "auto_delete": queue.auto_delete, "arguments": table_to_json(&queue.arguments)})
        })
        .collect();
    let exchange_json = exchanges
        .iter()
        .map(|exchange| {
            json!({
                "name": exchange.name, "vhost": exchange.vhost, "type": exchange.kind, "durable": true,
                "auto_delete": exchange.auto_delete, "internal": exchange.internal, "arguments": table_to_json(&exchange.arguments),
            })
        })
        .collect();
    let binding_json = management
        .bindings(vhost)
        .into_iter()
        .filter(|binding| !binding.source.is_empty())
        .map(|binding| {
            json!({
                "source": binding.source, "vhost": binding.vhost, "destination": binding.destination,
                "destination_type": binding.destination_type, "routing_key": binding.routing_key,
                "arguments": table_to_json(&binding.arguments),
            })
        })
        .collect();
    (queue_json, exchange_json, binding_json)
}

fn strip_vhost(items: Vec<Value>) -> Vec<Value> {
    items
        .into_iter()
        .map(|mut item| {
            if let Value::Object(fields) = &mut item {
                fields.remove("vhost");
            }
            item
        })
        .collect()
}

async fn export_all(State(state): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require_administrator()?;
    let management = &state.management;
    let version = management.overview().version;
    let (queues, exchanges, bindings) = topology(management, None);
    let vhosts: Vec<Value> = management
        .vhosts()
        .iter()
        .map(|vhost| json!({"name": vhost.name, "description": "", "tags": [], "metadata": {"description": "", "tags": []}}))
        .collect();
    Ok(Json(json!({
        "rabbit_version": version,
        "rabbitmq_version": version,
        "product_name": "Wharf",
        "product_version": version,
        "users": management.users().iter().map(user_json).collect::<Vec<_>>(),
        "vhosts": vhosts,
        "permissions": management.permissions().iter().map(permission_json).collect::<Vec<_>>(),
        "topic_permissions": management.topic_permissions().iter().map(topic_permission_json).collect::<Vec<_>>(),
        "parameters": [],
        "global_parameters": [{"name": "cluster_name", "value": management.node_name()}],
        "policies": management.policies().iter().map(|(vhost, policy)| policy_json(vhost, policy)).collect::<Vec<_>>(),
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    })))
}

async fn export_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_vhost(&state, &vhost)?;
    caller.require_administrator()?;
    let management = &state.management;
    let version = management.overview().version;
    let (queues, exchanges, bindings) = topology(management, Some(&vhost));
    let policies: Vec<Value> = management
        .policies()
        .iter()
        .filter(|(policy_vhost, _)| *policy_vhost == vhost)
        .map(|(vhost, policy)| policy_json(vhost, policy))
        .collect();
    Ok(Json(json!({
        "rabbit_version": version,
        "rabbitmq_version": version,
        "product_name": "Wharf",
        "product_version": version,
        "parameters": [],
        "policies": strip_vhost(policies),
        "queues": strip_vhost(queues),
        "exchanges": strip_vhost(exchanges),
        "bindings": strip_vhost(bindings),
    })))
}

/// Refuses a file that changes a policy the configuration defines, or grants permissions on a
/// vhost that neither exists nor is in the file, before anything is changed.
fn check_configuration_unchanged(management: &Management, definitions: &Definitions) -> Result<(), ApiError> {
    let refuse = |what: String| Err(ApiError::bad_request(format!("{what}; nothing was imported")));
    let policies = management.policies();
    for (vhost, policy) in &definitions.policies {
        if !management.is_configured_policy(vhost, &policy.name) {
            continue;
        }
        let same = policies.iter().any(|(known_vhost, known)| {
            known_vhost == vhost
                && known.name == policy.name
                && known.pattern.as_str() == policy.pattern.as_str()
                && known.apply_to == policy.apply_to
                && known.priority == policy.priority
                && known.definition == policy.definition
        });
        if !same {
            return refuse(format!(
                "the file defines policy '{}' in vhost '{vhost}' differently from the broker's configuration \
                 (wharf.toml [[policies]], --policy), which sets it",
                policy.name
            ));
        }
    }
    for permission in definitions
        .permissions
        .iter()
        .map(|permission| &permission.vhost)
        .chain(definitions.topic_permissions.iter().map(|permission| &permission.vhost))
    {
        if !management.vhost_exists(permission) && !definitions.vhosts.contains(permission) {
            return refuse(format!("the file grants permissions on vhost '{permission}', which does not exist"));
        }
    }
    Ok(())
}

/// Sets the file's users, then their permissions, as the API's `PUT`s would; those the
/// configuration defines stay as the configuration says (it is applied again at every start).
fn import_identities(management: &Management, definitions: &Definitions) -> Result<(), ApiError> {
    for user in definitions.users.iter().filter(|user| !management.is_configured_user(&user.name)) {
        management.put_user(&user.name, NewPassword::Hashed(user.password.clone()), user.tags.clone())?;
    }
    let settable = |permission: &&wharf_broker::Permission| {
        !management.is_configured_permission(&permission.user, &permission.vhost)
    };
    for permission in definitions.permissions.iter().filter(settable) {
        management.put_permission(permission.clone())?;
    }
    for permission in &definitions.topic_permissions {
        management.put_topic_permission(permission.clone())?;
    }
    Ok(())
}

/// Creates the file's vhosts that do not exist, and sets its policies (but those the
/// configuration defines, which the check found unchanged).
fn import_vhosts_and_policies(management: &Management, definitions: &Definitions) -> Result<(), ApiError> {
    for vhost in &definitions.vhosts {
        if !management.vhost_exists(vhost) {
            management.put_vhost(vhost, "", &[])?;
        }
    }
    for (vhost, policy) in &definitions.policies {
        if management.is_configured_policy(vhost, &policy.name) {
            continue;
        }
        if !management.vhost_exists(vhost) {
            management.put_vhost(vhost, "", &[])?;
        }
        let spec = PolicySpec {
            pattern: policy.pattern.as_str().to_owned(),
            apply_to: policy.apply_to,
            priority: policy.priority,
            definition: policy.definition.clone(),
        };
        management.put_policy(vhost, &policy.name, spec)?;
    }
    Ok(())
}

/// Declares the file's topology as the caller: exchanges, then queues, then bindings.
fn import(state: &AppState, caller: &Caller, definitions: &Definitions) -> Result<(), ApiError> {
    check_configuration_unchanged(&state.management, definitions)?;
    import_vhosts_and_policies(&state.management, definitions)?;
    import_identities(&state.management, definitions)?;
    let management = &state.management;
    let topology = &definitions.topology;
    for vhost in topology
        .exchanges
        .iter()
        .map(|exchange| &exchange.vhost)
        .chain(topology.queues.iter().map(|queue| &queue.vhost))
    {
        caller.require_vhost(state, vhost)?;
    }
    for exchange in &topology.exchanges {
        let spec = ExchangeSpec {
            name: &exchange.name,
            kind: &exchange.kind,
            durable: exchange.durable,
            auto_delete: exchange.auto_delete,
            internal: exchange.internal,
            arguments: &exchange.arguments,
        };
        management.declare_exchange(&caller.name, &exchange.vhost, &spec)?;
    }
    for queue in &topology.queues {
        management.declare_queue(
            &caller.name,
            &queue.vhost,
            &queue.name,
            queue.durable,
            queue.auto_delete,
            &queue.arguments,
        )?;
    }
    for binding in &topology.bindings {
        let spec = BindingSpec {
            source: &binding.source,
            destination: &binding.destination,
            routing_key: &binding.routing_key,
            arguments: &binding.arguments,
        };
        management.change_binding(&caller.name, &binding.vhost, &spec, true)?;
    }
    Ok(())
}

fn parse(body: &[u8]) -> Result<Definitions, ApiError> {
    Definitions::parse(body).map_err(|error| ApiError::bad_request(error.to_string()))
}

async fn import_all(State(state): State<AppState>, caller: Caller, body: Bytes) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    let definitions = parse(&body)?;
    import(&state, &caller, &definitions)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn import_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    caller.require_administrator()?;
    caller.require_vhost(&state, &vhost)?;
    // A vhost's file has no vhost fields: each item is given this one.
    let mut file = super::parse_body(&body)?;
    for section in ["queues", "exchanges", "bindings", "policies"] {
        if let Some(Value::Array(items)) = file.get_mut(section) {
            for item in items {
                if let Value::Object(fields) = item {
                    fields.insert("vhost".into(), Value::String(vhost.clone()));
                }
            }
        }
    }
    let definitions = parse(file.to_string().as_bytes())?;
    import(&state, &caller, &definitions)?;
    Ok(StatusCode::NO_CONTENT)
}
