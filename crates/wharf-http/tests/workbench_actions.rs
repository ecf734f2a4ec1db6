//! The DLQ workbench's actions through the API: replay to the `x-death` origin or a chosen
//! exchange (message id and headers kept, `x-replayed-count` added), move to another queue
//! unchanged, delete one message; what cannot move stays, with the reason; all of it survives a
//! restart. (The crash-safety of replay is `crates/wharf/tests/replay_kill9.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Api, Harness};
use serde_json::{Value, json};

/// `orders` dead-letters rejected messages to `orders.dlq` through the default exchange.
async fn declare_orders(api: &Api) {
    let arguments = json!({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "orders.dlq"});
    assert_eq!(api.put("/api/queues/%2F/orders", json!({"durable": true, "arguments": arguments})).await.status, 201);
    assert_eq!(api.put("/api/queues/%2F/orders.dlq", json!({"durable": true})).await.status, 201);
}

async fn publish(api: &Api, routing_key: &str, message_id: &str, headers: Value) {
    let properties = json!({"delivery_mode": 2, "message_id": message_id, "headers": headers});
    let answer = api
        .post(
            "/api/exchanges/%2F/amq.default/publish",
            json!({"routing_key": routing_key, "payload": format!("body of {message_id}"), "payload_encoding": "string", "properties": properties}),
        )
        .await;
    assert_eq!(answer.body, json!({"routed": true}));
}

/// Rejects every message of `orders` without requeue: each is dead-lettered to `orders.dlq`.
async fn reject_all(api: &Api, count: u32) {
    let answer = api
        .post(
            "/api/queues/%2F/orders/get",
            json!({"count": count, "ackmode": "reject_requeue_false", "encoding": "auto"}),
        )
        .await;
    assert_eq!(answer.body.as_array().unwrap().len(), count as usize);
}

async fn browse(api: &Api, queue: &str) -> Vec<Value> {
    let page = api.get(&format!("/api/queues/%2F/{queue}/messages?page_size=100")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    page.body["items"].as_array().unwrap().clone()
}

fn message_ids(items: &[Value]) -> Vec<String> {
    items.iter().map(|item| item["message_id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_dead_letters_back_where_they_died_keeping_their_identity() {
    let mut harness = Harness::start().await;
    let api = harness.guest();
    declare_orders(&api).await;
    publish(&api, "orders", "order-1", json!({"x-tenant": "acme"})).await;
    publish(&api, "orders", "order-2", json!({})).await;
    reject_all(&api, 2).await;
    let dead = browse(&api, "orders.dlq").await;
    assert_eq!(message_ids(&dead), ["order-1", "order-2"]);
    assert_eq!(dead[0]["properties"]["headers"]["x-death"][0]["queue"], "orders");

    let first = dead[0]["entry_id"].as_u64().unwrap();
    let answer = api.post("/api/queues/%2F/orders.dlq/messages/replay", json!({"ids": [first]})).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body, json!({"moved": [first], "moved_count": 1, "skipped": [], "remaining": 0, "max_id": null}));

    assert_eq!(message_ids(&browse(&api, "orders.dlq").await), ["order-2"]);
    let replayed = browse(&api, "orders").await;
    assert_eq!(message_ids(&replayed), ["order-1"]);
    let headers = &replayed[0]["properties"]["headers"];
    assert_eq!(headers["x-replayed-count"], 1);
    assert_eq!(headers["x-tenant"], "acme", "headers are kept");
    assert_eq!(headers["x-death"][0]["reason"], "rejected", "x-death is kept");
    assert_eq!(replayed[0]["payload"], "body of order-1");
    assert_eq!(replayed[0]["properties"]["delivery_mode"], 2);

    // It dies again and is replayed again: the count goes on.
    reject_all(&api, 1).await;
    let answer = api.post("/api/queues/%2F/orders.dlq/messages/replay", json!({"all": true})).await;
    assert_eq!(answer.body["moved_count"], 2, "{}", answer.body);
    let replayed = browse(&api, "orders").await;
    assert_eq!(message_ids(&replayed), ["order-2", "order-1"]);
    assert_eq!(replayed[1]["properties"]["headers"]["x-replayed-count"], 2);
    assert_eq!(replayed[0]["properties"]["headers"]["x-replayed-count"], 1);

    // After a restart everything is where the replays put it.
    harness.restart().await;
    let api = harness.guest();
    assert!(browse(&api, "orders.dlq").await.is_empty());
    assert_eq!(message_ids(&browse(&api, "orders").await), ["order-2", "order-1"]);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_a_chosen_exchange_and_what_cannot_be_replayed_stays_with_its_reason() {
    let harness = Harness::start().await;
    let api = harness.guest();
    declare_orders(&api).await;
    assert_eq!(api.put("/api/exchanges/%2F/retry", json!({"type": "direct", "durable": true})).await.status, 201);
    assert_eq!(api.put("/api/queues/%2F/retry.orders", json!({"durable": true})).await.status, 201);
    let binding = json!({"routing_key": "again"});
    assert_eq!(api.post("/api/bindings/%2F/e/retry/q/retry.orders", binding).await.status, 201);
    // One message never died (no x-death): it has no origin to go back to.
    publish(&api, "orders.dlq", "stray", json!({})).await;
    publish(&api, "orders", "order-1", json!({})).await;
    reject_all(&api, 1).await;
    let dead = browse(&api, "orders.dlq").await;
    let (stray, order) = (dead[0]["entry_id"].as_u64().unwrap(), dead[1]["entry_id"].as_u64().unwrap());

    let answer = api.post("/api/queues/%2F/orders.dlq/messages/replay", json!({"ids": [stray, order, 999_999]})).await;
    assert_eq!(answer.body["moved"], json!([order]), "{}", answer.body);
    let skipped = answer.body["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2);
    assert!(skipped.iter().any(|item| item["id"] == stray && item["reason"].as_str().unwrap().contains("x-death")));
    assert!(
        skipped.iter().any(|item| item["id"] == 999_999 && item["reason"].as_str().unwrap().contains("no message"))
    );
    assert_eq!(message_ids(&browse(&api, "orders.dlq").await), ["stray"]);

    // To a chosen exchange and key; one that routes nowhere leaves the message where it is.
    let nowhere = json!({"all": true, "exchange": "retry", "routing_key": "nowhere"});
    let answer = api.post("/api/queues/%2F/orders.dlq/messages/replay", nowhere).await;
    assert_eq!(answer.body["moved_count"], 0);
    assert!(answer.body["skipped"][0]["reason"].as_str().unwrap().contains("no queue"), "{}", answer.body);
    let chosen = json!({"all": true, "exchange": "retry", "routing_key": "again"});
    let answer = api.post("/api/queues/%2F/orders.dlq/messages/replay", chosen).await;
    assert_eq!(answer.body["moved"], json!([stray]));
    let retried = browse(&api, "retry.orders").await;
    assert_eq!(message_ids(&retried), ["stray"]);
    assert_eq!(retried[0]["exchange"], "retry");
    assert_eq!(retried[0]["routing_key"], "again");

    // Bad requests are refused with the reason.
    let no_selection = api.post("/api/queues/%2F/orders.dlq/messages/replay", json!({})).await;
    assert_eq!(no_selection.status, 400);
    assert!(no_selection.body["reason"].as_str().unwrap().contains("ids"), "{}", no_selection.body);
    let missing_exchange = json!({"all": true, "exchange": "nope"});
    let answer = api.post("/api/queues/%2F/retry.orders/messages/replay", missing_exchange).await;
    assert!(answer.body["skipped"][0]["reason"].as_str().unwrap().contains("nope"), "{}", answer.body);
    let missing_queue = api.post("/api/queues/%2F/ghost/messages/replay", json!({"all": true})).await;
    assert_eq!(missing_queue.status, 404);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_and_delete_and_a_user_without_rights_cannot() {
    let mut harness = Harness::start().await;
    let api = harness.guest();
    declare_orders(&api).await;
    assert_eq!(api.put("/api/queues/%2F/parked", json!({"durable": true})).await.status, 201);
    for id in ["a", "b", "c"] {
        publish(&api, "orders", id, json!({})).await;
    }
    reject_all(&api, 3).await;
    let dead = browse(&api, "orders.dlq").await;
    let ids: Vec<u64> = dead.iter().map(|item| item["entry_id"].as_u64().unwrap()).collect();

    let answer =
        api.post("/api/queues/%2F/orders.dlq/messages/move", json!({"ids": [ids[0], ids[1]], "queue": "parked"})).await;
    assert_eq!(answer.body["moved"], json!([ids[0], ids[1]]), "{}", answer.body);
    let parked = browse(&api, "parked").await;
    assert_eq!(message_ids(&parked), ["a", "b"]);
    assert!(parked[0]["properties"]["headers"].get("x-replayed-count").is_none(), "a move changes nothing");
    assert_eq!(parked[0]["routing_key"], dead[0]["routing_key"]);
    let to_nowhere = api.post("/api/queues/%2F/orders.dlq/messages/move", json!({"all": true, "queue": "ghost"})).await;
    assert_eq!(to_nowhere.status, 404);

    let deleted = api.delete(&format!("/api/queues/%2F/orders.dlq/messages/{}", ids[2])).await;
    assert_eq!(deleted.status, 204);
    assert!(browse(&api, "orders.dlq").await.is_empty());
    let again = api.delete(&format!("/api/queues/%2F/orders.dlq/messages/{}", ids[2])).await;
    assert_eq!(again.status, 404);
    let not_an_id = api.delete("/api/queues/%2F/orders.dlq/messages/first").await;
    assert_eq!(not_an_id.status, 400);

    // A management user with permissions may; a monitoring user without any may not.
    let stranger = harness.api("bob", "secret");
    let parked_ids: Vec<u64> = parked.iter().map(|item| item["entry_id"].as_u64().unwrap()).collect();
    let delete = stranger.delete(&format!("/api/queues/%2F/parked/messages/{}", parked_ids[0])).await;
    assert_eq!(delete.status, 204, "bob has full permissions on /");
    let monitor = harness.api("watcher", "secret");
    let refused = monitor.post("/api/queues/%2F/parked/messages/move", json!({"all": true, "queue": "orders"})).await;
    assert_eq!(refused.status, 401, "{}", refused.body);

    harness.restart().await;
    let api = harness.guest();
    assert_eq!(message_ids(&browse(&api, "parked").await), ["b"]);
    assert!(browse(&api, "orders.dlq").await.is_empty());
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_out_dead_letters_replay_from_their_x_death_and_stay_paged() {
    // Every body beyond the first byte is paged out: the DLQ's messages keep only their raw
    // properties in memory, and so do the copies a replay puts in `orders`.
    let mut harness = Harness::start_with(|config| config.queue_body_memory_bytes_max = 1).await;
    let api = harness.guest();
    declare_orders(&api).await;
    for id in ["p-1", "p-2", "p-3"] {
        publish(&api, "orders", id, json!({"x-replayed-count": 4})).await;
    }
    reject_all(&api, 3).await;
    // A dead letter's body leaves memory once its record is written, which nobody waits for:
    // each look takes the model lock, which applies the page-outs the writer reported.
    let mut looks = 0;
    while api.get("/api/queues/%2F/orders.dlq").await.body["message_bytes_paged_out"].as_u64().unwrap() == 0 {
        looks += 1;
        assert!(looks < 10_000, "the dead letters' bodies were never paged out");
        tokio::task::yield_now().await;
    }

    let answer = api.post("/api/queues/%2F/orders.dlq/messages/replay", json!({"all": true})).await;
    assert_eq!(answer.body["moved_count"], 3, "{}", answer.body);
    let replayed = browse(&api, "orders").await;
    assert_eq!(message_ids(&replayed), ["p-1", "p-2", "p-3"]);
    assert_eq!(replayed[0]["properties"]["headers"]["x-replayed-count"], 5, "counted on from the stored header");
    assert_eq!(replayed[2]["payload"], "body of p-3", "bodies read back from disk");
    let orders = api.get("/api/queues/%2F/orders").await.body;
    assert!(orders["message_bytes_paged_out"].as_u64().unwrap() > 0, "the copies are paged out too: {orders}");
    harness.restart().await;
    assert_eq!(message_ids(&browse(&harness.guest(), "orders").await), ["p-1", "p-2", "p-3"]);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_connections_exclusive_queue_is_not_browsed_traced_or_replayed() {
    let harness = Harness::start().await;
    let api = harness.guest();
    let connection = harness.amqp("owner").await;
    let channel = connection.create_channel().await.unwrap();
    let exclusive = lapin::options::QueueDeclareOptions { exclusive: true, ..Default::default() };
    channel.queue_declare("mine".into(), exclusive, lapin::types::FieldTable::default()).await.unwrap();
    assert_eq!(api.put("/api/queues/%2F/parked", json!({"durable": true})).await.status, 201);
    for (method, path, body) in [
        ("GET", "/api/queues/%2F/mine/messages", None),
        ("GET", "/api/queues/%2F/mine/messages/1/trace", None),
        ("POST", "/api/queues/%2F/mine/messages/replay", Some(json!({"all": true}))),
        ("POST", "/api/queues/%2F/mine/messages/move", Some(json!({"all": true, "queue": "parked"}))),
        ("DELETE", "/api/queues/%2F/mine/messages/1", None),
    ] {
        let answer = api.call(method, path, body).await;
        assert_eq!(answer.status, 400, "{method} {path}: {}", answer.body);
        assert!(
            answer.body["reason"].as_str().unwrap().contains("exclusive access to locked queue 'mine'"),
            "{}",
            answer.body
        );
    }
    connection.close(200, "done".into()).await.unwrap();
    harness.stop().await;
}
