//! Per-message delivery traces through the API: a message's publish, each delivery that did not
//! end in an ack and what became of it, its dead-letter hop and its replay, kept across a
//! restart, bounded, found by message id; and nothing when traces are off.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Api, Harness};
use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use serde_json::{Value, json};

async fn declare_orders(api: &Api) {
    let arguments = json!({"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "orders.dlq"});
    assert_eq!(api.put("/api/queues/%2F/orders", json!({"durable": true, "arguments": arguments})).await.status, 201);
    assert_eq!(api.put("/api/queues/%2F/orders.dlq", json!({"durable": true})).await.status, 201);
}

async fn publish(connection: &Connection, message_id: &str) {
    let channel = connection.create_channel().await.unwrap();
    // Confirmed, so the message is in its queue when this returns.
    channel.confirm_select(Default::default()).await.unwrap();
    let properties = BasicProperties::default().with_delivery_mode(2).with_message_id(message_id.into());
    channel
        .basic_publish("".into(), "orders".into(), BasicPublishOptions::default(), b"{}", properties)
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The only message of `queue`, as browsing shows it.
async fn only_message(api: &Api, queue: &str) -> Value {
    let page = api.get(&format!("/api/queues/%2F/{queue}/messages")).await.body;
    assert_eq!(page["total_count"], 1, "{page}");
    page["items"][0].clone()
}

async fn trace_of(api: &Api, queue: &str) -> Value {
    let entry = only_message(api, queue).await["entry_id"].as_u64().unwrap();
    let answer = api.get(&format!("/api/queues/%2F/{queue}/messages/{entry}/trace")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.body
}

fn kinds(trace: &Value) -> Vec<String> {
    trace["events"].as_array().unwrap().iter().map(|event| event["event"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_shows_who_had_it_and_what_happened_across_a_restart_and_a_replay() {
    let mut harness = Harness::start().await;
    let api = harness.guest();
    declare_orders(&api).await;
    let publisher = harness.amqp("checkout-service").await;
    publish(&publisher, "order-7").await;

    // A worker takes it, asks for it again, takes it again and rejects it.
    let worker = harness.amqp("payment-worker").await;
    let channel = worker.create_channel().await.unwrap();
    let mut deliveries = channel
        .basic_consume("orders".into(), "payments".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let first = deliveries.next().await.unwrap().unwrap();
    first.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await.unwrap();
    let second = deliveries.next().await.unwrap().unwrap();
    assert!(second.redelivered);
    second.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    // The rejection is asynchronous to this client: the message arrives in the DLQ.
    let mut dead = None;
    while dead.is_none() {
        let page = api.get("/api/queues/%2F/orders.dlq/messages").await.body;
        if page["total_count"] == 1 {
            dead = Some(page);
        } else {
            tokio::task::yield_now().await;
        }
    }

    let trace = trace_of(&api, "orders.dlq").await;
    assert_eq!(
        kinds(&trace),
        ["published", "delivered", "requeued", "delivered", "rejected", "dead_lettered"],
        "{trace}"
    );
    let events = trace["events"].as_array().unwrap();
    assert_eq!(
        (events[0]["connection"].as_str(), events[0]["user"].as_str()),
        (Some("checkout-service"), Some("guest"))
    );
    assert_eq!(
        (events[1]["connection"].as_str(), events[1]["consumer_tag"].as_str()),
        (Some("payment-worker"), Some("payments"))
    );
    assert_eq!(events[2]["cause"], "nack");
    assert_eq!(events[4]["method"], "basic.reject");
    assert_eq!(events[5]["reason"], "rejected");
    assert_eq!(events[5]["routing_key"], "orders.dlq");
    assert!(events.iter().all(|event| event["queue"] == "orders"), "every event happened in orders: {trace}");
    let times: Vec<u64> = events.iter().map(|event| event["at"].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|pair| pair[0] <= pair[1]), "oldest first: {times:?}");
    assert_eq!(trace["message_id"], "order-7");
    assert_eq!(trace["traces_enabled"], true);

    // Durable with the message.
    drop(channel);
    worker.close(200, "done".into()).await.unwrap();
    publisher.close(200, "done".into()).await.unwrap();
    harness.restart().await;
    let api = harness.guest();
    let after = trace_of(&api, "orders.dlq").await;
    assert_eq!(after["events"], trace["events"], "the trace survives a restart");

    // Replayed: the trace goes with it, and says who replayed it where.
    let entry = only_message(&api, "orders.dlq").await["entry_id"].clone();
    let replayed = api.post("/api/queues/%2F/orders.dlq/messages/replay", json!({"ids": [entry]})).await;
    assert_eq!(replayed.body["moved_count"], 1, "{}", replayed.body);
    let trace = trace_of(&api, "orders").await;
    assert_eq!(kinds(&trace).last().unwrap(), "replayed");
    let last = trace["events"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (last["user"].as_str(), last["routing_key"].as_str(), last["queue"].as_str()),
        (Some("guest"), Some("orders"), Some("orders.dlq"))
    );

    // Found by its message id.
    let found = api.get("/api/traces/%2F?message_id=order-7").await.body;
    assert_eq!(found["items"].as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found["items"][0]["queue"], "orders");
    assert_eq!(found["items"][0]["events"], trace["events"]);
    assert_eq!(found["complete"], true);
    let none = api.get("/api/traces/%2F?message_id=no-such-order").await.body;
    assert_eq!(none["items"], json!([]));
    assert_eq!(api.get("/api/traces/%2F").await.status, 400);
    assert_eq!(api.get("/api/queues/%2F/orders/messages/12345678/trace").await.status, 404);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_channel_is_recorded_and_a_trace_keeps_its_publish_within_its_bound() {
    let harness = Harness::start_with(|config| config.message_trace_events_max = 4).await;
    let api = harness.guest();
    declare_orders(&api).await;
    let publisher = harness.amqp("publisher").await;
    publish(&publisher, "order-1").await;
    let worker = harness.amqp("worker").await;
    for round in 0..3 {
        let channel = worker.create_channel().await.unwrap();
        let mut deliveries = channel
            .basic_consume(
                "orders".into(),
                format!("round-{round}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        deliveries.next().await.unwrap().unwrap();
        channel.close(200, "gone".into()).await.unwrap();
    }
    let trace = trace_of(&api, "orders").await;
    // Six events happened after the publish; four are kept, the publish among them.
    assert_eq!(kinds(&trace), ["published", "requeued", "delivered", "requeued"], "{trace}");
    assert_eq!(trace["events_dropped"], 3);
    assert_eq!(trace["events"][3]["cause"], "channel_closed");
    assert_eq!(trace["events"][2]["consumer_tag"], "round-2");
    assert_eq!(trace["delivery_count"], 3);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_traces_off_nothing_is_recorded() {
    let harness = Harness::start_with(|config| config.message_trace_events_max = 0).await;
    let api = harness.guest();
    declare_orders(&api).await;
    let publisher = harness.amqp("publisher").await;
    publish(&publisher, "order-1").await;
    let answer = api
        .post("/api/queues/%2F/orders/get", json!({"count": 1, "ackmode": "reject_requeue_false", "encoding": "auto"}))
        .await;
    assert_eq!(answer.status, 200);
    let trace = trace_of(&api, "orders.dlq").await;
    assert_eq!(trace["events"], json!([]));
    assert_eq!(trace["traces_enabled"], false);
    harness.stop().await;
}
