//! Direct reply-to (`amq.rabbitmq.reply-to`) through a real client: an RPC round trip without a
//! reply queue, the name a request's `reply_to` is rewritten to, the 406s RabbitMQ gives, and a
//! reply for a consumer that is gone.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_round_trip_needs_no_reply_queue() {
    let broker = TestBroker::start().await;
    let server = broker.connect().await;
    let server_channel = confirm_channel(&server).await;
    server_channel.queue_declare("rpc".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let mut requests = consumer(&server_channel, "rpc").await;

    let client = broker.connect().await;
    let client_channel = client.create_channel().await.unwrap();
    let mut replies = client_channel
        .basic_consume(
            REPLY_TO.into(),
            "replies".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for index in 0..3 {
        client_channel
            .basic_publish(
                "".into(),
                "rpc".into(),
                BasicPublishOptions::default(),
                format!("question {index}").as_bytes(),
                BasicProperties::default().with_reply_to(REPLY_TO.into()).with_correlation_id(index.to_string().into()),
            )
            .await
            .unwrap();
        let request = next(&mut requests).await;
        let reply_to = request.properties.reply_to().as_ref().unwrap().as_str().to_owned();
        assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "the request names its reply: {reply_to}");
        request.ack(BasicAckOptions::default()).await.unwrap();
        // The reply name answers a passive declare while its consumer is there.
        let declared = server_channel
            .queue_declare(
                reply_to.as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        assert_eq!(declared.message_count(), 0);
        let correlation_id = request.properties.correlation_id().clone().unwrap();
        let properties = BasicProperties::default().with_correlation_id(correlation_id);
        assert!(
            publish_confirmed(&server_channel, "", &reply_to, format!("answer {index}").as_bytes(), properties).await
        );
        let reply = next(&mut replies).await;
        assert_eq!(reply.data, format!("answer {index}").into_bytes());
        assert_eq!(
            reply.properties.correlation_id().as_ref().map(|id| id.as_str().to_owned()),
            Some(index.to_string())
        );
        assert_eq!(reply.routing_key.as_str(), reply_to);
    }

    // Once the client's channel is closed, a reply to it reaches nobody: a mandatory one comes
    // back, and its name no longer answers a passive declare.
    let reply_to = {
        client_channel
            .basic_publish(
                "".into(),
                "rpc".into(),
                BasicPublishOptions::default(),
                b"last question",
                BasicProperties::default().with_reply_to(REPLY_TO.into()),
            )
            .await
            .unwrap();
        let request = next(&mut requests).await;
        request.ack(BasicAckOptions::default()).await.unwrap();
        request.properties.reply_to().as_ref().unwrap().as_str().to_owned()
    };
    client_channel.close(200, "bye".into()).await.unwrap();
    let confirm = server_channel
        .basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"too late",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let returned = confirm.take_message().expect("the late reply is returned");
    assert_eq!(returned.reply_code, 312);
    let error = server_channel
        .queue_declare(
            reply_to.as_str().into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(404));
    client.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misuse_gets_rabbitmq_s_406s() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    // Asking for a direct reply on a channel without a reply consumer.
    let channel = confirm_channel(&connection).await;
    let properties = BasicProperties::default().with_reply_to(REPLY_TO.into());
    let error = publish_refused(&channel, "", "anywhere", b"question", properties).await;
    assert_eq!(reply_code(&error), Some(406));
    assert!(message_of(&error).contains("fast reply consumer does not exist"), "{}", message_of(&error));
    // A reply consumer that would acknowledge (each case on its own connection).
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let error = channel
        .basic_consume(REPLY_TO.into(), "acking".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(406));
    assert!(message_of(&error).contains("reply consumer cannot acknowledge"), "{}", message_of(&error));
    // A second reply consumer on one channel.
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
    // Held: lapin cancels a consumer whose handle is dropped, and a cancel that reached the broker
    // first would make room for the second.
    let _first = channel.basic_consume(REPLY_TO.into(), "first".into(), no_ack, FieldTable::default()).await.unwrap();
    let error =
        channel.basic_consume(REPLY_TO.into(), "second".into(), no_ack, FieldTable::default()).await.unwrap_err();
    assert_eq!(reply_code(&error), Some(406));
    assert!(message_of(&error).contains("reply consumer already set"), "{}", message_of(&error));
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}
