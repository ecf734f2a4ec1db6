//! Vhost and user limits (connections per vhost and per user, channels per user, queues per vhost)
//! through lapin, with RabbitMQ's refusals; a closed connection gives its places back. And the
//! default consumer timeout: 30 minutes, as RabbitMQ's, for queues that set none.

use crate::common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use std::sync::Arc;
use wharf_broker::{CONSUMER_TIMEOUT_MS_DEFAULT, ManualClock, Permission, User, UserLimits, VhostLimits};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_vhost_and_per_user_are_limited_and_given_back_on_close() {
    let broker = TestBroker::start_with(|config| {
        config.vhosts.push("small".into());
        for user in ["alice", "bob"] {
            config.users.push(User::with_password(user, "pw", false));
            config.permissions.push(Permission::full(user, "small"));
            config.permissions.push(Permission::full(user, "/"));
        }
        config.vhost_limits.push(VhostLimits { vhost: "small".into(), connections_max: Some(2), queues_max: None });
        config.user_limits.push(UserLimits { user: "alice".into(), connections_max: Some(1), channels_max: None });
    })
    .await;
    let alice = connect_as(&broker, "alice", "small").await.unwrap();
    let refused = connect_as(&broker, "alice", "/").await.unwrap_err();
    assert_eq!(reply_code(&refused), Some(530));
    assert_eq!(
        message_of(&refused),
        "NOT_ALLOWED - Connection refused for user 'alice'. User connection limit (1) is reached"
    );
    let bob = connect_as(&broker, "bob", "small").await.unwrap();
    let refused = connect_as(&broker, "bob", "small").await.unwrap_err();
    assert_eq!(
        message_of(&refused),
        "NOT_ALLOWED - access to vhost 'small' refused for user 'bob': connection limit (2) is reached"
    );
    connect_as(&broker, "bob", "/").await.expect("other vhosts have no limit");
    alice.close(200, "done".into()).await.unwrap();
    bob.close(200, "done".into()).await.unwrap();
    // Closing gives the places back (the broker forgets a connection once its close is done).
    let again = connect_as(&broker, "alice", "small").await.unwrap();
    connect_as(&broker, "bob", "small").await.unwrap();
    drop(again);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_per_user_count_across_connections_and_queues_per_vhost_are_limited() {
    let broker = TestBroker::start_with(|config| {
        config.users.push(User::with_password("carol", "pw", false));
        config.permissions.push(Permission::full("carol", "/"));
        config.user_limits.push(UserLimits { user: "carol".into(), connections_max: None, channels_max: Some(3) });
        config.vhost_limits.push(VhostLimits { vhost: "/".into(), connections_max: None, queues_max: Some(2) });
    })
    .await;
    let first = connect_as(&broker, "carol", "/").await.unwrap();
    let second = connect_as(&broker, "carol", "/").await.unwrap();
    let one = first.create_channel().await.unwrap();
    let _two = first.create_channel().await.unwrap();
    let _three = first.create_channel().await.unwrap();
    // The user's fourth channel, on its other connection: refused (530 closes that connection,
    // which held no channel, so its end frees nothing).
    let refused = second.create_channel().await.unwrap_err();
    assert_eq!(reply_code(&refused), Some(530));
    assert_eq!(
        message_of(&refused),
        "NOT_ALLOWED - number of channels opened for user 'carol' has reached the maximum allowed user limit of (3)"
    );
    // A channel the client closes is given back: the next open only fits if it was.
    one.close(200, "done".into()).await.unwrap();
    let channel = first.create_channel().await.unwrap();

    for name in ["a", "b"] {
        channel.queue_declare(name.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    }
    let refused =
        channel.queue_declare("c".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(reply_code(&refused), Some(406));
    assert_eq!(
        message_of(&refused),
        "PRECONDITION_FAILED - cannot declare queue 'c': queue limit in vhost '/' (2) is reached"
    );
    let guest = broker.connect().await.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    guest
        .queue_declare("a".into(), passive, FieldTable::default())
        .await
        .expect("re-declaring an existing one is fine");
    assert!(guest.queue_declare("c".into(), passive, FieldTable::default()).await.is_err(), "c was not made");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_held_30_minutes_goes_back_to_its_queue_by_default() {
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "work", FieldTable::default()).await;
    assert!(publish_confirmed(&channel, "", "work", b"slow", BasicProperties::default()).await);
    let mut work = consumer(&channel, "work").await;
    let first = next(&mut work).await;
    advance(broker.broker(), &clock, CONSUMER_TIMEOUT_MS_DEFAULT - 1).await;
    assert!(nothing_received(&channel, "work", &mut work).await, "held for just under 30 minutes");
    advance(broker.broker(), &clock, 1).await;
    let again = next(&mut work).await;
    assert!(again.redelivered && again.delivery_tag != first.delivery_tag);
    assert_eq!(broker.broker().counters().leases_expired, 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_consumer_timeout_a_delivery_is_held_as_long_as_its_channel_lives() {
    let clock = Arc::new(ManualClock::starting_now());
    let on_clock = on_clock(&clock);
    let broker = TestBroker::start_with(|config| {
        on_clock(config);
        config.consumer_timeout_ms = None;
    })
    .await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "work", FieldTable::default()).await;
    assert!(publish_confirmed(&channel, "", "work", b"slow", BasicProperties::default()).await);
    let mut work = consumer(&channel, "work").await;
    next(&mut work).await;
    advance(broker.broker(), &clock, 10 * CONSUMER_TIMEOUT_MS_DEFAULT).await;
    assert!(nothing_received(&channel, "work", &mut work).await);
    assert_eq!(broker.broker().counters().leases_expired, 0);
    broker.stop().await;
}
