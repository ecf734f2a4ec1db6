//! Policies: queue arguments applied by name pattern from the configuration (as RabbitMQ's
//! `set_policy`), a queue's own arguments winning over them, bad policies refused with the reason,
//! policies applying to queues recovered after a crash; and bad `x-` arguments refused at declare
//! time with 406 naming the argument.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;
use wharf_broker::{BrokerConfig, policy_from_json};
use wharf_store::CrashMode;

fn orders_policy(config: &mut BrokerConfig) {
    let policy = policy_from_json(
        "orders-retry",
        "^orders\\.",
        "queues",
        10,
        &json!({"delivery-limit": 2, "dead-letter-exchange": "dlx"}),
    )
    .unwrap();
    config.policies.push(("/".into(), policy));
}

async fn declare_dlx(channel: &lapin::Channel) {
    channel
        .exchange_declare(
            "dlx".into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    durable_queue(channel, "parked", FieldTable::default()).await;
    channel
        .queue_bind("parked".into(), "dlx".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
}

/// Delivers the queue's only message and requeues it until it stops coming back; returns how many
/// times it was delivered.
async fn deliveries_until_gone(channel: &lapin::Channel, queue: &str) -> u32 {
    let mut deliveries = 0;
    while let Some(message) = channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await.unwrap() {
        deliveries += 1;
        message.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
        assert!(deliveries <= 25, "never dead-lettered");
    }
    deliveries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_sets_arguments_by_name_and_own_arguments_win() {
    let broker = TestBroker::start_with(orders_policy).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    declare_dlx(&channel).await;
    durable_queue(&channel, "orders.email", FieldTable::default()).await;
    durable_queue(&channel, "orders.payment", arguments(&[("x-delivery-limit", AMQPValue::LongInt(4))])).await;
    durable_queue(&channel, "audit", FieldTable::default()).await;
    for queue in ["orders.email", "orders.payment", "audit"] {
        assert!(publish_confirmed(&channel, "", queue, b"job", BasicProperties::default()).await);
    }
    assert_eq!(deliveries_until_gone(&channel, "orders.email").await, 2, "the policy's limit");
    assert_eq!(deliveries_until_gone(&channel, "orders.payment").await, 4, "the queue's own argument wins");
    assert_eq!(deliveries_until_gone(&channel, "audit").await, 20, "no policy: the default limit");
    // The policy's dead-letter exchange took the first two; the third went to its automatic DLQ.
    let mut parked = consumer(&channel, "parked").await;
    for _ in 0..2 {
        next(&mut parked).await.ack(BasicAckOptions::default()).await.unwrap();
    }
    let mut audit_dlq = consumer(&channel, "audit.dlq").await;
    next(&mut audit_dlq).await.ack(BasicAckOptions::default()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_apply_to_queues_recovered_after_a_crash() {
    let mut broker = CrashableBroker::start(91, orders_policy).await;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        declare_dlx(&channel).await;
        durable_queue(&channel, "orders.stock", FieldTable::default()).await;
        assert!(publish_confirmed(&channel, "", "orders.stock", b"reserve", BasicProperties::default()).await);
        broker.crash(CrashMode::LoseUnsynced).await;
    }
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    assert_eq!(deliveries_until_gone(&channel, "orders.stock").await, 2);
    broker.stop().await;
}

#[test]
fn bad_policies_are_refused_with_the_reason() {
    for (pattern, apply_to, definition, expected) in [
        ("(", "queues", json!({"delivery-limit": 2}), "invalid pattern"),
        (".*", "queues", json!({"delivery-limt": 2}), "unknown key 'delivery-limt'"),
        (".*", "queues", json!({"message-ttl": "soon"}), "x-message-ttl"),
        (".*", "everything", json!({"delivery-limit": 2}), "apply-to"),
        (".*", "all", json!([1, 2]), "object"),
    ] {
        let error = policy_from_json("p", pattern, apply_to, 0, &definition).unwrap_err();
        assert!(error.contains(expected), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queue_arguments_are_refused_with_406_naming_the_argument() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let text = |value: &str| AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()));
    for (name, value, allowed) in [
        ("x-delivery-limit", AMQPValue::LongInt(0), "-1 (no limit) or an integer"),
        ("x-message-ttl", text("soon"), "integer from 0"),
        ("x-expires", AMQPValue::LongInt(-1), "integer from 1"),
        ("x-max-length", text("ten"), "integer from 0"),
        ("x-overflow", text("explode"), "'drop-head'"),
        ("x-consumer-timeout", AMQPValue::LongInt(0), "integer from 1"),
        ("x-retry-backoff", AMQPValue::LongInt(100), "list of 1 to 64 integers"),
        ("x-deduplication", text("yes"), "boolean"),
        ("x-deduplication-ttl", AMQPValue::LongInt(0), "integer from 1"),
        ("x-single-active-consumer", AMQPValue::LongInt(1), "boolean"),
        ("x-ordered-by", text(""), "non-empty string"),
        ("x-dead-letter-exchange", AMQPValue::LongInt(5), "string"),
        ("x-queue-type", text("stream"), "'classic' or 'quorum'"),
    ] {
        let channel = connection.create_channel().await.unwrap();
        let error = channel
            .queue_declare("q".into(), QueueDeclareOptions::durable(), arguments(&[(name, value)]))
            .await
            .unwrap_err();
        assert_eq!(reply_code(&error), Some(406), "{name}: {error}");
        let message = error.to_string();
        assert!(message.contains(name) && message.contains(allowed), "{name}: {message}");
    }
    // Nothing was created by the refused declarations, and the connection is fine.
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let error = channel.queue_declare("q".into(), passive, FieldTable::default()).await.unwrap_err();
    assert_eq!(reply_code(&error), Some(404));
    broker.stop().await;
}
