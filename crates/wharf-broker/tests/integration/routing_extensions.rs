//! RabbitMQ's routing extensions through a real client: alternate exchanges (a message an
//! exchange routes nowhere goes to its `alternate-exchange`) and sender-selected distribution
//! (`CC` and `BCC` headers add routing keys; `BCC` is never delivered).

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};

fn strings(values: &[&str]) -> AMQPValue {
    AMQPValue::FieldArray(FieldArray::from(
        values
            .iter()
            .map(|value| AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())))
            .collect::<Vec<_>>(),
    ))
}

async fn get_body(channel: &lapin::Channel, queue: &str) -> Option<Vec<u8>> {
    let got = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap()?;
    Some(got.delivery.data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_routed_nowhere_goes_to_the_alternate_exchange() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    let declare = |name: &'static str, kind: lapin::ExchangeKind, arguments: FieldTable| {
        let channel = channel.clone();
        async move {
            channel.exchange_declare(name.into(), kind, ExchangeDeclareOptions::default(), arguments).await.unwrap()
        }
    };
    declare("unrouted", lapin::ExchangeKind::Fanout, FieldTable::default()).await;
    declare(
        "orders",
        lapin::ExchangeKind::Direct,
        arguments(&[("alternate-exchange", AMQPValue::LongString("unrouted".into()))]),
    )
    .await;
    for queue in ["orders.paid", "orders.lost"] {
        channel.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    }
    channel
        .queue_bind(
            "orders.paid".into(),
            "orders".into(),
            "paid".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            "orders.lost".into(),
            "unrouted".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // A mandatory publish the alternate exchange takes is routed: it is not returned.
    let publish = |key: &'static str, body: &'static [u8]| {
        let channel = channel.clone();
        async move {
            channel
                .basic_publish(
                    "orders".into(),
                    key.into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    body,
                    BasicProperties::default(),
                )
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    let confirm = publish("paid", b"routed").await;
    assert!(confirm.take_message().is_none());
    let confirm = publish("refunded", b"nowhere").await;
    assert!(confirm.take_message().is_none(), "the alternate exchange routed it");
    assert_eq!(get_body(&channel, "orders.paid").await, Some(b"routed".to_vec()));
    assert_eq!(get_body(&channel, "orders.lost").await, Some(b"nowhere".to_vec()));
    assert_eq!(get_body(&channel, "orders.lost").await, None, "a routed message does not go to the alternate");
    // A non-string alternate-exchange is refused.
    let bad = connection.create_channel().await.unwrap();
    let error = bad
        .exchange_declare(
            "bad".into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            arguments(&[("alternate-exchange", AMQPValue::LongInt(5))]),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(406));
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc_and_bcc_add_recipients_and_bcc_is_not_delivered() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    for queue in ["to", "copy", "blind"] {
        channel.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    }
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), strings(&["copy"]));
    headers.insert("BCC".into(), strings(&["blind"]));
    channel
        .basic_publish(
            "".into(),
            "to".into(),
            BasicPublishOptions::default(),
            b"memo",
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
    for queue in ["to", "copy", "blind"] {
        let got = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap().expect(queue);
        assert_eq!(got.delivery.data, b"memo");
        let headers = got.delivery.properties.headers().clone().unwrap_or_default();
        assert!(headers.inner().contains_key("CC"), "CC is kept ({queue})");
        assert!(!headers.inner().contains_key("BCC"), "BCC is removed ({queue})");
    }
    // A CC that is not an array is refused with 406.
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), AMQPValue::LongString("copy".into()));
    let channel = confirm_channel(&connection).await;
    let error = publish_refused(&channel, "", "to", b"memo", BasicProperties::default().with_headers(headers)).await;
    assert_eq!(reply_code(&error), Some(406));
    assert!(message_of(&error).contains("CC"), "{}", message_of(&error));
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}
