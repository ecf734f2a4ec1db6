//! The MQTT front end with a third-party Rust client (rumqttc), over 3.1.1 and 5.0: a persistent
//! session across a broker restart, and QoS 2 with user properties between two 5.0 clients.

use super::mqtt;
use crate::common::TestBroker;
use std::time::Duration;

/// The longest a test waits for an event before failing (a guard against hangs, not a timing).
const EVENT_WAIT: Duration = Duration::from_secs(30);

async fn next_publish_v4(events: &mut rumqttc::EventLoop) -> rumqttc::Publish {
    loop {
        let event = tokio::time::timeout(EVENT_WAIT, events.poll()).await.expect("no event").unwrap();
        if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish)) = event {
            return publish;
        }
    }
}

async fn connack_v4(events: &mut rumqttc::EventLoop) -> rumqttc::ConnAck {
    loop {
        let event = tokio::time::timeout(EVENT_WAIT, events.poll()).await.expect("no event").unwrap();
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack)) = event {
            return ack;
        }
    }
}

fn options_v4(broker: &TestBroker, client_id: &str, clean: bool) -> rumqttc::MqttOptions {
    let address = mqtt::mqtt_addr(broker);
    let mut options = rumqttc::MqttOptions::new(client_id, address.ip().to_string(), address.port());
    options.set_credentials("guest", "guest");
    options.set_clean_session(clean);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_keeps_its_session_across_a_broker_restart() {
    let mut broker = mqtt::start().await;
    let (client, mut events) = rumqttc::AsyncClient::new(options_v4(&broker, "rumqttc-1", false), 10);
    assert!(!connack_v4(&mut events).await.session_present);
    client.subscribe("fleet/+/position", rumqttc::QoS::AtLeastOnce).await.unwrap();
    loop {
        let event = tokio::time::timeout(EVENT_WAIT, events.poll()).await.expect("no SUBACK").unwrap();
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) = event {
            assert_eq!(ack.return_codes, vec![rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)]);
            break;
        }
    }
    client.disconnect().await.unwrap();
    while tokio::time::timeout(EVENT_WAIT, events.poll()).await.expect("no disconnect").is_ok() {}
    drop(events);
    // While it is away, AMQP publishes to its topics; then the broker restarts.
    let amqp = broker.connect().await;
    let channel = crate::common::confirm_channel(&amqp).await;
    for truck in ["t1", "t2", "t3"] {
        channel
            .basic_publish(
                "amq.topic".into(),
                format!("fleet.{truck}.position").into(),
                lapin::options::BasicPublishOptions::default(),
                truck.as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    drop(amqp);
    broker.restart_with(|config| config.mqtt.listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let (_client, mut events) = rumqttc::AsyncClient::new(options_v4(&broker, "rumqttc-1", false), 10);
    assert!(connack_v4(&mut events).await.session_present, "the session survived the restart");
    let mut received = Vec::new();
    for _ in 0..3 {
        let publish = next_publish_v4(&mut events).await;
        assert_eq!(publish.qos, rumqttc::QoS::AtLeastOnce);
        received.push((publish.topic, publish.payload));
    }
    let expected: Vec<_> = ["t1", "t2", "t3"]
        .iter()
        .map(|truck| (format!("fleet/{truck}/position"), bytes::Bytes::from(truck.as_bytes().to_vec())))
        .collect();
    assert_eq!(received, expected);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_5_0_clients_exchange_qos_2_messages_with_their_properties() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let broker = mqtt::start().await;
    let address = mqtt::mqtt_addr(&broker);
    let options = |client_id: &str| {
        let mut options = MqttOptions::new(client_id, address.ip().to_string(), address.port());
        options.set_credentials("guest", "guest");
        options
    };
    let (subscriber, mut subscriber_events) = AsyncClient::new(options("rumqttc-v5-sub"), 10);
    subscriber.subscribe("meters/#", QoS::ExactlyOnce).await.unwrap();
    loop {
        let event = tokio::time::timeout(EVENT_WAIT, subscriber_events.poll()).await.expect("no SUBACK").unwrap();
        if let Event::Incoming(Packet::SubAck(_)) = event {
            break;
        }
    }
    let (publisher, mut publisher_events) = AsyncClient::new(options("rumqttc-v5-pub"), 10);
    let properties = PublishProperties {
        user_properties: vec![("unit".into(), "kWh".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    publisher.publish_with_properties("meters/7", QoS::ExactlyOnce, false, "12.5", properties).await.unwrap();
    // The publisher's event loop must run for its QoS 2 flow to finish.
    let publishing = tokio::spawn(async move {
        loop {
            match publisher_events.poll().await {
                Ok(Event::Incoming(Packet::PubComp(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    });
    let publish = loop {
        let event = tokio::time::timeout(EVENT_WAIT, subscriber_events.poll()).await.expect("no PUBLISH").unwrap();
        if let Event::Incoming(Packet::Publish(publish)) = event {
            break publish;
        }
    };
    assert_eq!(
        (&publish.topic[..], &publish.payload[..], publish.qos),
        (&b"meters/7"[..], &b"12.5"[..], QoS::ExactlyOnce)
    );
    let received = publish.properties.unwrap_or_default();
    assert_eq!(received.user_properties, vec![("unit".to_owned(), "kWh".to_owned())]);
    assert_eq!(received.content_type.as_deref(), Some("text/plain"));
    assert!(tokio::time::timeout(EVENT_WAIT, publishing).await.expect("no PUBCOMP").unwrap(), "PUBCOMP received");
    broker.stop().await;
}
