//! TTLs and length limits: per-message `expiration` and `x-message-ttl` (expired messages are
//! dead-lettered with reason `expired`, also when they expired while the broker was down),
//! `x-expires` on unused queues, `x-max-length` / `x-max-length-bytes` with `drop-head`,
//! `reject-publish` and `reject-publish-dlx`. Time is the test's [`ManualClock`]: each deadline is
//! checked one millisecond before and at the deadline, and a broker that is down lets it pass.

use crate::common;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use std::sync::Arc;
use wharf_broker::ManualClock;
use wharf_store::CrashMode;

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// A fanout dead-letter exchange `dlx` into the queue `dead`.
async fn declare_dead(channel: &lapin::Channel) {
    channel
        .exchange_declare(
            "dlx".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    durable_queue(channel, "dead", FieldTable::default()).await;
    channel
        .queue_bind("dead".into(), "dlx".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
}

async fn count(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dead_lettered_with_their_original_expiration() {
    const EXPIRATION_MS: u64 = 30_000;
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    declare_dead(&channel).await;
    // The queue's own TTL (an hour) is far beyond the message's: only the message's applies here.
    durable_queue(
        &channel,
        "work",
        arguments(&[("x-message-ttl", AMQPValue::LongInt(3_600_000)), ("x-dead-letter-exchange", text("dlx"))]),
    )
    .await;
    let short = BasicProperties::default().with_expiration(EXPIRATION_MS.to_string().into());
    assert!(publish_confirmed(&channel, "", "work", b"short", short).await);
    assert!(publish_confirmed(&channel, "", "work", b"long", BasicProperties::default()).await);

    advance(broker.broker(), &clock, EXPIRATION_MS - 1).await;
    assert_eq!(count(&channel, "work").await, 2, "one millisecond before its expiration both are there");
    assert_eq!(count(&channel, "dead").await, 0);

    advance(broker.broker(), &clock, 1).await;
    let mut dead = consumer(&channel, "dead").await;
    let expired = next(&mut dead).await;
    assert_eq!(expired.data, b"short");
    assert!(expired.properties.expiration().is_none(), "the copy does not expire again");
    let death = &x_death(&expired.properties)[0];
    assert_eq!(header_text(death, "reason").as_deref(), Some("expired"));
    assert_eq!(header_text(death, "original-expiration").as_deref(), Some("30000"));
    assert_eq!(count(&channel, "work").await, 1, "the other message is still there");
    assert_eq!(broker.broker().counters().expired, 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_expired_while_the_broker_was_down_is_never_delivered() {
    const TTL_MS: u64 = 300_000;
    // The clock lives here, not in the broker: it goes on across the crashes.
    let clock = Arc::new(ManualClock::starting_now());
    let mut broker = CrashableBroker::start(61, on_clock(&clock)).await;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        declare_dead(&channel).await;
        durable_queue(
            &channel,
            "work",
            arguments(&[("x-message-ttl", AMQPValue::LongInt(TTL_MS as i32)), ("x-dead-letter-exchange", text("dlx"))]),
        )
        .await;
        assert!(publish_confirmed(&channel, "", "work", b"stale", BasicProperties::default()).await);
        // Down for all but the last millisecond of its TTL: it is recovered, still due later.
        broker.crash_for(CrashMode::LoseUnsynced, &clock, TTL_MS - 1).await;
    }
    {
        let connection = broker.connect().await;
        let channel = connection.create_channel().await.unwrap();
        assert_eq!(count(&channel, "work").await, 1, "one millisecond before its TTL it is still there");
        assert_eq!(count(&channel, "dead").await, 0);
        // Down for one more millisecond: only a millisecond after this broker started, but the
        // broker measures from when the message was published, not from its restart.
        broker.crash_for(CrashMode::LoseUnsynced, &clock, 1).await;
    }
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let got = channel.basic_get("work".into(), BasicGetOptions { no_ack: true }).await.unwrap();
    assert!(got.is_none(), "an expired message is not delivered");
    let mut dead = consumer(&channel, "dead").await;
    let expired = next(&mut dead).await;
    assert_eq!(expired.data, b"stale");
    assert_eq!(header_text(&x_death(&expired.properties)[0], "reason").as_deref(), Some("expired"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_queue_expires_and_a_used_one_does_not() {
    const EXPIRES_MS: u64 = 1_800_000;
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let expires = arguments(&[("x-expires", AMQPValue::LongInt(EXPIRES_MS as i32))]);
    channel.queue_declare("temp".into(), QueueDeclareOptions::default(), expires.clone()).await.unwrap();
    channel.queue_declare("watched".into(), QueueDeclareOptions::default(), expires).await.unwrap();
    let _watching = consumer(&channel, "watched").await;
    // A passive declare does not count as use, so probing does not move the deadline; a failed
    // one closes its channel, so each probe gets its own.
    let exists = |queue: &'static str| {
        let connection = &connection;
        async move {
            let probe = connection.create_channel().await.unwrap();
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            match probe.queue_declare(queue.into(), passive, FieldTable::default()).await {
                Ok(_) => true,
                Err(error) => {
                    assert_eq!(reply_code(&error), Some(404), "{error}");
                    false
                }
            }
        }
    };

    advance(broker.broker(), &clock, EXPIRES_MS - 1).await;
    assert!(exists("temp").await, "expired early");

    advance(broker.broker(), &clock, 1).await;
    assert!(!exists("temp").await, "the unused queue did not expire at its deadline");
    // The queue with a consumer is in use: still there at the deadline, and long after it.
    assert!(exists("watched").await);
    advance(broker.broker(), &clock, 10 * EXPIRES_MS).await;
    assert!(exists("watched").await);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_head_dead_letters_the_oldest_beyond_the_limits() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    declare_dead(&channel).await;
    durable_queue(
        &channel,
        "work",
        arguments(&[("x-max-length", AMQPValue::LongInt(2)), ("x-dead-letter-exchange", text("dlx"))]),
    )
    .await;
    durable_queue(&channel, "bytes", arguments(&[("x-max-length-bytes", AMQPValue::LongInt(10))])).await;
    for body in ["m1", "m2", "m3"] {
        assert!(publish_confirmed(&channel, "", "work", body.as_bytes(), BasicProperties::default()).await);
    }
    for body in ["aaaaaa", "bbbbbb"] {
        assert!(publish_confirmed(&channel, "", "bytes", body.as_bytes(), BasicProperties::default()).await);
    }
    let mut dead = consumer(&channel, "dead").await;
    let dropped = next(&mut dead).await;
    assert_eq!(dropped.data, b"m1");
    assert_eq!(header_text(&x_death(&dropped.properties)[0], "reason").as_deref(), Some("maxlen"));
    assert_eq!(count(&channel, "work").await, 2);
    let kept = channel.basic_get("bytes".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(kept.delivery.data, b"bbbbbb", "12 bytes > 10: the oldest went");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_publish_nacks_and_reject_publish_dlx_also_dead_letters() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    declare_dead(&channel).await;
    durable_queue(
        &channel,
        "strict",
        arguments(&[("x-max-length", AMQPValue::LongInt(1)), ("x-overflow", text("reject-publish"))]),
    )
    .await;
    durable_queue(
        &channel,
        "strict-dlx",
        arguments(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", text("reject-publish-dlx")),
            ("x-dead-letter-exchange", text("dlx")),
        ]),
    )
    .await;
    for queue in ["strict", "strict-dlx"] {
        assert!(publish_confirmed(&channel, "", queue, b"first", BasicProperties::default()).await);
        assert!(
            !publish_confirmed(&channel, "", queue, b"second", BasicProperties::default()).await,
            "{queue}: nacked"
        );
        assert_eq!(count(&channel, queue).await, 1);
    }
    let mut dead = consumer(&channel, "dead").await;
    let refused = next(&mut dead).await;
    assert_eq!(refused.data, b"second");
    assert_eq!(header_text(&x_death(&refused.properties)[0], "queue").as_deref(), Some("strict-dlx"));
    assert_eq!(broker.broker.as_ref().unwrap().counters().rejected_by_length, 2);
    broker.stop().await;
}
