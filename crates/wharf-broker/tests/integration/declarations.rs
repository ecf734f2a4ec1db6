//! Exchanges and queues with a stock client: routing through every exchange type and
//! exchange-to-exchange bindings, queue declare variants, and their errors with RabbitMQ's codes
//! (a channel error closes only that channel).

use crate::common;

use common::{TestBroker, message_of, reply_code};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};

async fn publish(channel: &Channel, exchange: &str, key: &str, body: &str, headers: Option<FieldTable>) {
    let mut properties = BasicProperties::default();
    if let Some(headers) = headers {
        properties = properties.with_headers(headers);
    }
    channel
        .basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body.as_bytes(), properties)
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn drain(channel: &Channel, queue: &str) -> Vec<String> {
    let mut bodies = Vec::new();
    while let Some(message) = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        bodies.push(String::from_utf8(message.delivery.data.clone()).unwrap());
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exchange_type_routes() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for (name, kind) in [
        ("d", ExchangeKind::Direct),
        ("f", ExchangeKind::Fanout),
        ("t", ExchangeKind::Topic),
        ("h", ExchangeKind::Headers),
    ] {
        channel
            .exchange_declare(name.into(), kind, ExchangeDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
    }
    for queue in ["q1", "q2"] {
        channel.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    }
    let bind = |queue: &'static str, exchange: &'static str, key: &'static str, arguments: FieldTable| {
        let channel = channel.clone();
        async move {
            channel
                .queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), arguments)
                .await
                .unwrap()
        }
    };
    bind("q1", "d", "red", FieldTable::default()).await;
    bind("q1", "f", "", FieldTable::default()).await;
    bind("q2", "f", "", FieldTable::default()).await;
    bind("q2", "t", "eu.*.orders", FieldTable::default()).await;
    let mut match_any = FieldTable::default();
    match_any.insert("x-match".into(), AMQPValue::LongString("any".into()));
    match_any.insert("region".into(), AMQPValue::LongString("eu".into()));
    bind("q1", "h", "", match_any).await;

    publish(&channel, "d", "red", "direct-hit", None).await;
    publish(&channel, "d", "blue", "direct-miss", None).await;
    publish(&channel, "f", "whatever", "fanout", None).await;
    publish(&channel, "t", "eu.de.orders", "topic-hit", None).await;
    publish(&channel, "t", "us.ny.orders", "topic-miss", None).await;
    let mut headers = FieldTable::default();
    headers.insert("region".into(), AMQPValue::LongString("eu".into()));
    publish(&channel, "h", "", "headers-hit", Some(headers)).await;
    publish(&channel, "", "q2", "default", None).await;
    assert_eq!(drain(&channel, "q1").await, vec!["direct-hit", "fanout", "headers-hit"]);
    assert_eq!(drain(&channel, "q2").await, vec!["fanout", "topic-hit", "default"]);

    // Exchange-to-exchange: t -> d (topic binding), d routes on to q1.
    channel
        .exchange_bind("d".into(), "t".into(), "red".into(), ExchangeBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    publish(&channel, "t", "red", "through-two-exchanges", None).await;
    assert_eq!(drain(&channel, "q1").await, vec!["through-two-exchanges"]);
    channel
        .exchange_unbind("d".into(), "t".into(), "red".into(), ExchangeUnbindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    publish(&channel, "t", "red", "unbound", None).await;
    assert!(drain(&channel, "q1").await.is_empty());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_errors_close_the_channel_with_rabbitmq_codes() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let setup = connection.create_channel().await.unwrap();
    setup.queue_declare("durable-q".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();

    let channel = connection.create_channel().await.unwrap();
    let error = channel
        .queue_declare(
            "missing".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(404), "{error}");

    let channel = connection.create_channel().await.unwrap();
    let error = channel
        .queue_declare("durable-q".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(406), "{error}");
    assert!(error.to_string().contains("inequivalent arg 'durable'"), "{error}");

    let channel = connection.create_channel().await.unwrap();
    let error = channel
        .exchange_declare(
            "amq.custom".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(403), "{error}");

    let channel = connection.create_channel().await.unwrap();
    let error = channel
        .queue_bind(
            "durable-q".into(),
            "no-such-exchange".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(404), "{error}");

    // Another connection's exclusive queue.
    let owner = broker.connect().await;
    let owner_channel = owner.create_channel().await.unwrap();
    owner_channel
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions { exclusive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let error = channel
        .basic_consume("mine".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(405), "{error}");

    // The connection, and its other channels, are unaffected by all of the above.
    let declared =
        setup.queue_declare("durable-q".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    assert_eq!(declared.message_count(), 0);
    owner.close(200, "bye".into()).await.unwrap();
    // The exclusive queue went with its connection.
    let channel = connection.create_channel().await.unwrap();
    let error = channel
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(404), "{error}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_named_queues_purge_and_conditional_delete() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let queue = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let name = queue.name().as_str().to_owned();
    assert!(name.starts_with("amq.gen-"), "{name}");
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for _ in 0..3 {
        publish(&channel, "", &name, "x", None).await;
    }
    let error = channel
        .queue_delete(name.as_str().into(), QueueDeleteOptions { if_empty: true, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(406), "{error}");
    let channel = connection.create_channel().await.unwrap();
    assert_eq!(channel.queue_purge(name.as_str().into(), QueuePurgeOptions::default()).await.unwrap(), 3);
    assert_eq!(
        channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions { if_empty: true, ..Default::default() })
            .await
            .unwrap(),
        0
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_queues_and_messages_do_not_survive_a_restart_durable_ones_do() {
    let mut broker = TestBroker::start().await;
    {
        let connection = broker.connect().await;
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        channel.queue_declare("kept".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
        channel.queue_declare("transient".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
        for (body, mode) in [("persistent", 2), ("transient-message", 1)] {
            channel
                .basic_publish(
                    "".into(),
                    "kept".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(mode),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
        connection.close(200, "bye".into()).await.unwrap();
    }
    broker.restart().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    assert_eq!(drain(&channel, "kept").await, vec!["persistent"]);
    let error = channel
        .queue_declare(
            "transient".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(404));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_deleted_durable_exchanges_stay_deleted_and_large_bindings_persist() {
    let mut broker = TestBroker::start().await;
    let mut big = FieldTable::default();
    big.insert("x-match".into(), AMQPValue::LongString("any".into()));
    big.insert("padding".into(), AMQPValue::LongString("p".repeat(5_000).into()));
    {
        let connection = broker.connect().await;
        let channel = connection.create_channel().await.unwrap();
        channel.queue_declare("dq".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
        let durable_auto_delete = ExchangeDeclareOptions { durable: true, auto_delete: true, ..Default::default() };
        channel
            .exchange_declare("fleeting".into(), ExchangeKind::Fanout, durable_auto_delete, FieldTable::default())
            .await
            .unwrap();
        channel
            .queue_bind("dq".into(), "fleeting".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .unwrap();
        // Its last binding goes: the exchange auto-deletes, and must not come back after a restart.
        channel.queue_unbind("dq".into(), "fleeting".into(), "".into(), FieldTable::default()).await.unwrap();
        // A headers binding with arguments far larger than a definitions key.
        channel
            .exchange_declare(
                "hx".into(),
                ExchangeKind::Headers,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind("dq".into(), "hx".into(), "".into(), QueueBindOptions::default(), big.clone())
            .await
            .unwrap();
        connection.close(200, "bye".into()).await.unwrap();
    }
    broker.restart().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert("padding".into(), AMQPValue::LongString("p".repeat(5_000).into()));
    publish(&channel, "hx", "", "matched", Some(headers)).await;
    assert_eq!(drain(&channel, "dq").await, vec!["matched"], "the large binding survived the restart");
    channel.queue_unbind("dq".into(), "hx".into(), "".into(), big).await.unwrap();
    let error = channel
        .exchange_declare(
            "fleeting".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(404), "{error}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeclaring_with_the_other_exclusive_value_is_405_even_on_the_owning_connection() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let owner = connection.create_channel().await.unwrap();
    let exclusive = QueueDeclareOptions { exclusive: true, ..Default::default() };
    owner.queue_declare("mine".into(), exclusive, FieldTable::default()).await.unwrap();
    owner.queue_declare("shared".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    for (queue, options) in [("mine", QueueDeclareOptions::default()), ("shared", exclusive)] {
        let channel = connection.create_channel().await.unwrap();
        let error = channel.queue_declare(queue.into(), options, FieldTable::default()).await.unwrap_err();
        assert_eq!(reply_code(&error), Some(405), "{queue}: {}", message_of(&error));
        assert!(
            message_of(&error).contains("cannot obtain exclusive access to locked queue"),
            "{}",
            message_of(&error)
        );
    }
    // The same value again is fine.
    owner.queue_declare("mine".into(), exclusive, FieldTable::default()).await.unwrap();
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn even_a_passive_declare_of_the_default_exchange_is_refused_with_403() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    let error = channel
        .exchange_declare("".into(), lapin::ExchangeKind::Direct, passive, FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(403));
    assert_eq!(message_of(&error), "ACCESS_REFUSED - operation not permitted on the default exchange");
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_if_empty_counts_ready_messages_only_as_rabbitmq() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("drained".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    publish(&channel, "", "drained", "one", None).await;
    publish(&channel, "", "drained", "two", None).await;
    let if_empty = QueueDeleteOptions { if_empty: true, ..Default::default() };
    let error = channel.queue_delete("drained".into(), if_empty).await.unwrap_err();
    assert_eq!(reply_code(&error), Some(406), "two ready messages: not empty");
    let channel = connection.create_channel().await.unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(channel.basic_get("drained".into(), BasicGetOptions::default()).await.unwrap().unwrap());
    }
    // Both delivered, neither acked yet: empty, as a client deleting after its gets expects.
    assert_eq!(channel.queue_delete("drained".into(), if_empty).await.unwrap(), 0);
    // Acknowledging a delivery of the deleted queue is harmless.
    held.remove(0).delivery.ack(BasicAckOptions::default()).await.unwrap();
    channel.queue_declare("after".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbinding_after_an_auto_delete_queue_went_with_its_consumer_succeeds() {
    // aio-pika's RPC closes this way: cancel the only consumer of its auto-delete reply queue
    // (which deletes the queue, and then its auto-delete exchange), then unbind, then delete.
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let auto_delete = ExchangeDeclareOptions { auto_delete: true, ..Default::default() };
    channel
        .exchange_declare("rpc.dlx".into(), ExchangeKind::Headers, auto_delete, FieldTable::default())
        .await
        .unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let name = queue.name().as_str().to_owned();
    channel
        .queue_bind(
            name.as_str().into(),
            "rpc.dlx".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = channel
        .basic_consume(name.as_str().into(), "results".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    channel.basic_cancel(consumer.tag().as_str().into(), BasicCancelOptions::default()).await.unwrap();
    channel.queue_unbind(name.as_str().into(), "rpc.dlx".into(), "".into(), FieldTable::default()).await.unwrap();
    assert_eq!(channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await.unwrap(), 0);
    // The queue did go: a passive declare says so.
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let error = channel.queue_declare(name.as_str().into(), passive, FieldTable::default()).await.unwrap_err();
    assert_eq!(reply_code(&error), Some(404));
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}
