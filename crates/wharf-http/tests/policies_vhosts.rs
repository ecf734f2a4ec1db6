//! Policies and vhosts changed through the API, as RabbitMQ's: a policy applies at once to the
//! queues that exist (a lower max-length drops their oldest messages, a dead-letter exchange
//! takes their rejects), survives a restart, and goes with DELETE; a vhost is created, kept
//! across a restart, and deleted with everything in it (its connections closed, its queues and
//! their messages, its permissions and policies). What the configuration defines is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Api, Harness, names};
use lapin::{Connection, ConnectionProperties};
use serde_json::{Value, json};
use wharf_broker::{ApplyTo, Policy};

async fn publish(api: &Api, vhost: &str, routing_key: &str, count: usize) {
    for index in 0..count {
        let answer = api
            .post(
                &format!("/api/exchanges/{vhost}/amq.default/publish"),
                json!({"routing_key": routing_key, "payload": format!("m-{index}"), "payload_encoding": "string", "properties": {"delivery_mode": 2}}),
            )
            .await;
        assert_eq!(answer.body, json!({"routed": true}), "{}", answer.body);
    }
}

async fn depth(api: &Api, vhost: &str, queue: &str) -> u64 {
    api.get(&format!("/api/queues/{vhost}/{queue}")).await.body["messages"].as_u64().unwrap()
}

fn configured_policy() -> (String, Policy) {
    let mut definition = wharf_wire::types::FieldTable::default();
    definition.insert("message-ttl".into(), wharf_wire::types::AMQPValue::LongLongInt(60_000));
    ("/".to_owned(), Policy::new("configured", "^audit$", ApplyTo::Queues, 0, definition).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_applies_to_existing_queues_at_once_and_lasts_until_deleted() {
    let mut harness = Harness::start_with(|config| config.policies.push(configured_policy())).await;
    let api = harness.guest();
    assert_eq!(api.put("/api/queues/%2F/orders", json!({"durable": true})).await.status, 201);
    assert_eq!(api.put("/api/queues/%2F/orders.dlq", json!({"durable": true})).await.status, 201);
    publish(&api, "%2F", "orders", 5).await;

    let limit = json!({"pattern": "^orders$", "definition": {"max-length": 2}, "apply-to": "queues", "priority": 1});
    let answer = api.put("/api/policies/%2F/limit", limit).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert_eq!(depth(&api, "%2F", "orders").await, 2, "the oldest three are dropped at once");
    let queue = api.get("/api/queues/%2F/orders").await.body;
    assert_eq!(queue["policy"], "limit");
    assert_eq!(queue["effective_policy_definition"], json!({"max-length": 2}));
    assert_eq!(api.get("/api/queues/%2F/orders.dlq").await.body["policy"], Value::Null, "the pattern is anchored");

    // Replaced: a dead-letter exchange for what is dropped now, and a larger limit.
    let dead_letters = json!({"pattern": "^orders$", "definition": {"max-length": 3, "dead-letter-exchange": "", "dead-letter-routing-key": "orders.dlq"}});
    assert_eq!(api.put("/api/policies/%2F/limit", dead_letters).await.status, 204);
    publish(&api, "%2F", "orders", 2).await;
    assert_eq!(depth(&api, "%2F", "orders").await, 3);
    assert_eq!(depth(&api, "%2F", "orders.dlq").await, 1, "the dropped head went to the dead-letter queue");

    // What cannot be done says why (the harness restarts without the configured policy).
    let configured =
        api.put("/api/policies/%2F/configured", json!({"pattern": ".*", "definition": {"max-length": 1}})).await;
    assert_eq!(configured.status, 400);
    assert!(configured.body["reason"].as_str().unwrap().contains("configuration"), "{}", configured.body);
    let unknown = api.put("/api/policies/%2F/bad", json!({"pattern": ".*", "definition": {"no-such-key": 1}})).await;
    assert_eq!(unknown.status, 400);
    assert!(unknown.body["reason"].as_str().unwrap().contains("unknown key"), "{}", unknown.body);
    let no_pattern = api.put("/api/policies/%2F/bad", json!({"definition": {"max-length": 1}})).await;
    assert!(no_pattern.body["reason"].as_str().unwrap().contains("pattern"), "{}", no_pattern.body);
    let bob = harness.api("bob", "secret");
    let refused = bob.put("/api/policies/%2F/mine", json!({"pattern": ".*", "definition": {"max-length": 1}})).await;
    assert_eq!(refused.status, 401, "a management user is no policymaker");
    assert_eq!(
        api.put("/api/policies/nowhere/p", json!({"pattern": ".*", "definition": {"max-length": 1}})).await.status,
        404
    );
    harness.restart().await;
    let api = harness.guest();
    let stored = api.get("/api/policies/%2F/limit").await;
    assert_eq!(stored.status, 200);
    assert_eq!(stored.body["definition"]["max-length"], 3);
    publish(&api, "%2F", "orders", 1).await;
    assert_eq!(depth(&api, "%2F", "orders").await, 3, "the policy applies after a restart");
    assert_eq!(depth(&api, "%2F", "orders.dlq").await, 2);

    assert_eq!(api.delete("/api/policies/%2F/limit").await.status, 204);
    publish(&api, "%2F", "orders", 2).await;
    assert_eq!(depth(&api, "%2F", "orders").await, 5, "no limit any more");
    assert_eq!(api.get("/api/queues/%2F/orders").await.body["policy"], Value::Null);
    assert_eq!(api.delete("/api/policies/%2F/limit").await.status, 404);

    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_is_created_kept_and_deleted_with_everything_in_it() {
    let mut harness = Harness::start().await;
    let api = harness.guest();
    assert_eq!(api.put("/api/vhosts/staging", json!({"description": "for tests", "tags": "qa"})).await.status, 201);
    assert_eq!(api.put("/api/vhosts/staging", json!({})).await.status, 204);
    assert!(names(&api.get("/api/vhosts").await.body).contains(&"staging".to_owned()));
    let full = json!({"configure": ".*", "write": ".*", "read": ".*"});
    assert_eq!(api.put("/api/permissions/staging/guest", full).await.status, 201);
    assert_eq!(api.put("/api/queues/staging/jobs", json!({"durable": true})).await.status, 201);
    publish(&api, "staging", "jobs", 3).await;
    let policy = json!({"pattern": "^jobs$", "definition": {"max-length": 10}});
    assert_eq!(api.put("/api/policies/staging/cap", policy).await.status, 201);

    harness.restart().await;
    let api = harness.guest();
    assert_eq!(depth(&api, "staging", "jobs").await, 3, "the vhost and its queue survive a restart");
    assert_eq!(api.get("/api/policies/staging/cap").await.status, 200);

    // A client on the vhost is disconnected when it goes.
    let url = harness.amqp_url("guest", "guest").replace("/%2f", "/staging");
    let connection = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
    let mut events = connection.events_listener();
    assert_eq!(api.delete("/api/vhosts/staging").await.status, 204);
    let reason = loop {
        match futures_lite::StreamExt::next(&mut events).await.expect("the connection reports its close") {
            lapin::Event::Error(error) => break error.to_string(),
            _ => continue,
        }
    };
    assert!(reason.contains("320") || reason.contains("CONNECTION_FORCED"), "{reason}");
    assert_eq!(api.get("/api/vhosts/staging").await.status, 404);
    assert!(
        api.get("/api/permissions")
            .await
            .body
            .as_array()
            .unwrap()
            .iter()
            .all(|permission| permission["vhost"] != "staging")
    );
    assert_eq!(api.delete("/api/vhosts/staging").await.status, 404);

    harness.restart().await;
    let api = harness.guest();
    assert_eq!(api.get("/api/vhosts/staging").await.status, 404, "gone for good");
    let queues = names(&api.get("/api/queues").await.body);
    assert!(queues.iter().all(|name| !name.starts_with("wharf.orphaned-log")), "its logs were deleted: {queues:?}");

    let refused = api.delete("/api/vhosts/%2F").await;
    assert_eq!(refused.status, 400);
    assert!(refused.body["reason"].as_str().unwrap().contains("configuration"), "{}", refused.body);
    assert_eq!(harness.api("bob", "secret").put("/api/vhosts/mine", json!({})).await.status, 401);

    // An import creates the vhosts and policies it names.
    let definitions = json!({
        "vhosts": [{"name": "imported"}],
        "policies": [{"vhost": "imported", "name": "ttl", "pattern": ".*", "apply-to": "queues", "priority": 0, "definition": {"message-ttl": 1000}}],
    });
    let imported = api.post("/api/definitions", definitions).await;
    assert_eq!(imported.status, 204, "{}", imported.body);
    assert_eq!(api.get("/api/policies/imported/ttl").await.body["definition"]["message-ttl"], 1000);
    harness.stop().await;
}
