//! Authorization with RabbitMQ's model, through lapin: the whole permission matrix, method by
//! method (each method against users that lack exactly one right), topic permissions, vhost access,
//! and refusals that change nothing.

use crate::common::{TestBroker, arguments, connect_as, message_count, message_of, reply_code};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use wharf_broker::{BrokerConfig, Permission, TopicPermission, User};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Right {
    Configure,
    Write,
    Read,
}

impl Right {
    fn name(self) -> &'static str {
        match self {
            Right::Configure => "configure",
            Right::Write => "write",
            Right::Read => "read",
        }
    }
}

/// Every channel method that touches a resource, as a client would send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    ExchangeDeclare,
    ExchangeDeclareWithAlternate,
    ExchangeDeclarePassive,
    ExchangeDelete,
    ExchangeBind,
    ExchangeUnbind,
    QueueDeclare,
    QueueDeclareWithDeadLetter,
    QueueDeclarePassive,
    QueueDelete,
    QueuePurge,
    QueueBind,
    QueueUnbind,
    Publish,
    Consume,
    Get,
}

const METHODS: [Method; 16] = [
    Method::ExchangeDeclare,
    Method::ExchangeDeclareWithAlternate,
    Method::ExchangeDeclarePassive,
    Method::ExchangeDelete,
    Method::ExchangeBind,
    Method::ExchangeUnbind,
    Method::QueueDeclare,
    Method::QueueDeclareWithDeadLetter,
    Method::QueueDeclarePassive,
    Method::QueueDelete,
    Method::QueuePurge,
    Method::QueueBind,
    Method::QueueUnbind,
    Method::Publish,
    Method::Consume,
    Method::Get,
];

/// The resources one case works on: queue `q`, exchange `x` (source), exchange `x2`
/// (destination, alternate or dead-letter exchange). Unique per case.
struct Names {
    q: String,
    x: String,
    x2: String,
}

/// What RabbitMQ requires for each method: (right, resource kind, which name).
fn needs(method: Method, names: &Names) -> Vec<(Right, &'static str, String)> {
    let q = || names.q.clone();
    let x = || names.x.clone();
    let x2 = || names.x2.clone();
    match method {
        Method::ExchangeDeclare | Method::ExchangeDelete => vec![(Right::Configure, "exchange", x())],
        Method::ExchangeDeclareWithAlternate => {
            vec![(Right::Configure, "exchange", x()), (Right::Read, "exchange", x()), (Right::Write, "exchange", x2())]
        }
        Method::ExchangeDeclarePassive | Method::QueueDeclarePassive => vec![],
        Method::ExchangeBind | Method::ExchangeUnbind => {
            vec![(Right::Write, "exchange", x2()), (Right::Read, "exchange", x())]
        }
        Method::QueueDeclare | Method::QueueDelete => vec![(Right::Configure, "queue", q())],
        Method::QueueDeclareWithDeadLetter => {
            vec![(Right::Configure, "queue", q()), (Right::Read, "queue", q()), (Right::Write, "exchange", x2())]
        }
        Method::QueuePurge | Method::Consume | Method::Get => vec![(Right::Read, "queue", q())],
        Method::QueueBind | Method::QueueUnbind => vec![(Right::Write, "queue", q()), (Right::Read, "exchange", x())],
        Method::Publish => vec![(Right::Write, "exchange", x())],
    }
}

async fn direct_exchange(channel: &Channel, name: &str) {
    channel
        .exchange_declare(name.into(), ExchangeKind::Direct, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
}

async fn publish(channel: &Channel, exchange: &str, routing_key: &str) -> Result<(), lapin::Error> {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await?
        .await?;
    Ok(())
}

async fn queue_exists(channel: &Channel, name: &str) -> bool {
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(name.into(), options, FieldTable::default()).await.is_ok()
}

async fn exchange_exists(channel: &Channel, name: &str) -> bool {
    let options = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
    channel.exchange_declare(name.into(), ExchangeKind::Direct, options, FieldTable::default()).await.is_ok()
}

async fn plain_queue(channel: &Channel, name: &str) {
    channel.queue_declare(name.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
}

/// Creates what the method acts on, as the administrator.
async fn set_up(method: Method, admin: &Channel, names: &Names) {
    match method {
        Method::ExchangeDeclare | Method::QueueDeclare => {}
        Method::ExchangeDeclareWithAlternate | Method::QueueDeclareWithDeadLetter => {
            direct_exchange(admin, &names.x2).await
        }
        Method::ExchangeDeclarePassive | Method::ExchangeDelete => direct_exchange(admin, &names.x).await,
        Method::ExchangeBind | Method::ExchangeUnbind => {
            direct_exchange(admin, &names.x).await;
            direct_exchange(admin, &names.x2).await;
            plain_queue(admin, &names.q).await;
            let (q, x2) = (names.q.as_str(), names.x2.as_str());
            admin
                .queue_bind(q.into(), x2.into(), "k".into(), QueueBindOptions::default(), FieldTable::default())
                .await
                .unwrap();
            if method == Method::ExchangeUnbind {
                let (x, x2) = (names.x.as_str(), names.x2.as_str());
                let options = ExchangeBindOptions::default();
                admin.exchange_bind(x2.into(), x.into(), "k".into(), options, FieldTable::default()).await.unwrap();
            }
        }
        Method::QueueDeclarePassive | Method::QueueDelete | Method::QueuePurge | Method::Consume | Method::Get => {
            plain_queue(admin, &names.q).await;
            publish(admin, "", &names.q).await.unwrap();
        }
        Method::QueueBind | Method::QueueUnbind | Method::Publish => {
            direct_exchange(admin, &names.x).await;
            plain_queue(admin, &names.q).await;
            if method != Method::QueueBind {
                let (q, x) = (names.q.as_str(), names.x.as_str());
                admin
                    .queue_bind(q.into(), x.into(), "k".into(), QueueBindOptions::default(), FieldTable::default())
                    .await
                    .unwrap();
            }
        }
    }
}

/// Sends the method as `user` would.
async fn attempt(method: Method, channel: &Channel, names: &Names) -> Result<(), lapin::Error> {
    let (q, x, x2) = (names.q.as_str(), names.x.as_str(), names.x2.as_str());
    match method {
        Method::ExchangeDeclare => {
            let options = ExchangeDeclareOptions::default();
            channel.exchange_declare(x.into(), ExchangeKind::Direct, options, FieldTable::default()).await
        }
        Method::ExchangeDeclareWithAlternate => {
            let alternate = arguments(&[("alternate-exchange", AMQPValue::LongString(x2.into()))]);
            channel.exchange_declare(x.into(), ExchangeKind::Direct, ExchangeDeclareOptions::default(), alternate).await
        }
        Method::ExchangeDeclarePassive => {
            let options = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
            channel.exchange_declare(x.into(), ExchangeKind::Direct, options, FieldTable::default()).await
        }
        Method::ExchangeDelete => channel.exchange_delete(x.into(), ExchangeDeleteOptions::default()).await,
        Method::ExchangeBind => {
            channel
                .exchange_bind(x2.into(), x.into(), "k".into(), ExchangeBindOptions::default(), FieldTable::default())
                .await
        }
        Method::ExchangeUnbind => {
            let options = ExchangeUnbindOptions::default();
            channel.exchange_unbind(x2.into(), x.into(), "k".into(), options, FieldTable::default()).await
        }
        Method::QueueDeclare => {
            channel.queue_declare(q.into(), QueueDeclareOptions::default(), FieldTable::default()).await.map(drop)
        }
        Method::QueueDeclareWithDeadLetter => {
            let dead_letter = arguments(&[("x-dead-letter-exchange", AMQPValue::LongString(x2.into()))]);
            channel.queue_declare(q.into(), QueueDeclareOptions::default(), dead_letter).await.map(drop)
        }
        Method::QueueDeclarePassive => {
            let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            channel.queue_declare(q.into(), options, FieldTable::default()).await.map(drop)
        }
        Method::QueueDelete => channel.queue_delete(q.into(), QueueDeleteOptions::default()).await.map(drop),
        Method::QueuePurge => channel.queue_purge(q.into(), QueuePurgeOptions::default()).await.map(drop),
        Method::QueueBind => {
            channel.queue_bind(q.into(), x.into(), "k".into(), QueueBindOptions::default(), FieldTable::default()).await
        }
        Method::QueueUnbind => channel.queue_unbind(q.into(), x.into(), "k".into(), FieldTable::default()).await,
        Method::Publish => publish(channel, x, "k").await,
        Method::Consume => channel
            .basic_consume(q.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map(drop),
        Method::Get => channel.basic_get(q.into(), BasicGetOptions::default()).await.map(drop),
    }
}

/// After a refusal: everything is as `set_up` left it.
async fn assert_unchanged(method: Method, admin: &Channel, names: &Names) {
    let (q, x, x2) = (names.q.as_str(), names.x.as_str(), names.x2.as_str());
    match method {
        Method::ExchangeDeclare | Method::ExchangeDeclareWithAlternate => {
            assert!(!exchange_exists(admin, x).await, "{method:?}: the exchange was not created")
        }
        Method::QueueDeclare | Method::QueueDeclareWithDeadLetter => {
            assert!(!queue_exists(admin, q).await, "{method:?}: the queue was not created")
        }
        Method::ExchangeDelete => assert!(exchange_exists(admin, x).await, "the exchange is still there"),
        Method::QueueDelete | Method::QueuePurge | Method::Get | Method::Consume => {
            assert_eq!(message_count(admin, q).await, 1, "{method:?}: the message is still there")
        }
        Method::ExchangeBind | Method::QueueBind => {
            publish(admin, x, "k").await.unwrap();
            assert_eq!(message_count(admin, q).await, 0, "{method:?}: no binding was made");
        }
        Method::ExchangeUnbind | Method::QueueUnbind => {
            publish(admin, x, "k").await.unwrap();
            assert_eq!(message_count(admin, q).await, 1, "{method:?}: the binding is still there");
        }
        Method::Publish => assert_eq!(message_count(admin, q).await, 0, "nothing was published"),
        Method::ExchangeDeclarePassive | Method::QueueDeclarePassive => {}
    }
    let _ = x2;
}

/// A user that has every right but `missing` (whose pattern is empty: RabbitMQ's "nothing").
fn user_without(missing: Option<Right>) -> (String, Permission) {
    let name = match missing {
        None => "full".to_owned(),
        Some(right) => format!("no-{}", right.name()),
    };
    let pattern = |right: Right| if missing == Some(right) { String::new() } else { ".*".to_owned() };
    let permission = Permission {
        user: name.clone(),
        vhost: "/".into(),
        configure: pattern(Right::Configure),
        write: pattern(Right::Write),
        read: pattern(Right::Read),
    };
    (name, permission)
}

fn add_user(config: &mut BrokerConfig, name: &str) {
    config.users.push(User::with_password(name, "pw", false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_needs_exactly_the_rights_rabbitmq_checks() {
    let rights = [None, Some(Right::Configure), Some(Right::Write), Some(Right::Read)];
    let broker = TestBroker::start_with(|config| {
        for missing in rights {
            let (name, permission) = user_without(missing);
            add_user(config, &name);
            config.permissions.push(permission);
        }
    })
    .await;
    let admin_connection = broker.connect().await;
    let mut checked = 0;
    for method in METHODS {
        for missing in rights {
            let (user, _) = user_without(missing);
            let id = format!("{method:?}-{user}").to_lowercase();
            let names = Names { q: format!("q-{id}"), x: format!("x-{id}"), x2: format!("x2-{id}") };
            let admin = admin_connection.create_channel().await.unwrap();
            admin.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            set_up(method, &admin, &names).await;
            let connection = connect_as(&broker, &user, "/").await.unwrap();
            let channel = connection.create_channel().await.unwrap();
            channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            let outcome = attempt(method, &channel, &names).await;
            let refused_for = needs(method, &names).into_iter().find(|(right, _, _)| Some(*right) == missing);
            match (refused_for, outcome) {
                (None, Ok(())) => {}
                (None, Err(error)) => panic!("{method:?} as {user}: refused unexpectedly: {error}"),
                (Some(_), Ok(())) => panic!("{method:?} as {user}: allowed without {missing:?}"),
                (Some((right, kind, name)), Err(error)) => {
                    assert_eq!(reply_code(&error), Some(403), "{method:?} as {user}: {error}");
                    assert_eq!(
                        message_of(&error),
                        format!(
                            "ACCESS_REFUSED - {} access to {kind} '{name}' in vhost '/' refused for user '{user}'",
                            right.name()
                        ),
                        "{method:?} as {user}"
                    );
                    assert_unchanged(method, &admin, &names).await;
                }
            }
            checked += 1;
            let _ = connection.close(200, "done".into()).await;
        }
    }
    assert_eq!(checked, METHODS.len() * rights.len());
    // (Some administrator channels were closed by passive declares of what must not exist.)
    let _ = admin_connection.close(200, "done".into()).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_scope_a_user_to_its_own_names_and_the_default_exchange_is_amq_default() {
    let broker = TestBroker::start_with(|config| {
        add_user(config, "app");
        config.permissions.push(Permission {
            user: "app".into(),
            vhost: "/".into(),
            configure: "^app\\.".into(),
            write: "^app\\.".into(),
            read: "^app\\.".into(),
        });
    })
    .await;
    let connection = connect_as(&broker, "app", "/").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("app.orders".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let refused = channel
        .queue_declare("billing.orders".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(reply_code(&refused), Some(403));
    assert!(message_of(&refused).contains("configure access to queue 'billing.orders'"), "{}", message_of(&refused));
    // The channel is closed; the connection goes on. The default exchange is checked as
    // amq.default, which this user may not write to.
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let refused = publish(&channel, "", "app.orders").await.unwrap_err();
    assert!(
        message_of(&refused).contains("write access to exchange 'amq.default' in vhost '/'"),
        "{}",
        message_of(&refused)
    );
    let admin = broker.connect().await.create_channel().await.unwrap();
    assert_eq!(message_count(&admin, "app.orders").await, 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_permissions_limit_routing_keys_on_topic_exchanges_only() {
    let broker = TestBroker::start_with(|config| {
        add_user(config, "device");
        config.permissions.push(Permission::full("device", "/"));
        config.topic_permissions.push(TopicPermission {
            user: "device".into(),
            vhost: "/".into(),
            exchange: "amq.topic".into(),
            write: "^{username}\\.".into(),
            read: "^alerts\\.".into(),
        });
    })
    .await;
    let admin = broker.connect().await.create_channel().await.unwrap();
    admin.queue_declare("readings".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    admin
        .queue_bind(
            "readings".into(),
            "amq.topic".into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let connection = connect_as(&broker, "device", "/").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    publish(&channel, "amq.topic", "device.temperature").await.unwrap();
    let refused = publish(&channel, "amq.topic", "other.temperature").await.unwrap_err();
    assert_eq!(reply_code(&refused), Some(403));
    assert_eq!(
        message_of(&refused),
        "ACCESS_REFUSED - write access to topic 'other.temperature' in exchange 'amq.topic' in vhost '/' refused for user 'device'"
    );
    assert_eq!(message_count(&admin, "readings").await, 1, "only the allowed key was published");
    // Binding with a key needs topic read; other exchanges have no topic rules.
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("mine".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let bind = |key: &'static str| {
        let channel = channel.clone();
        async move {
            channel
                .queue_bind(
                    "mine".into(),
                    "amq.topic".into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
        }
    };
    bind("alerts.fire").await.unwrap();
    let refused = bind("device.#").await.unwrap_err();
    assert!(
        message_of(&refused).contains("read access to topic 'device.#' in exchange 'amq.topic'"),
        "{}",
        message_of(&refused)
    );
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    publish(&channel, "amq.direct", "other.temperature").await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_permissions_on_a_vhost_cannot_open_it() {
    let broker = TestBroker::start_with(|config| {
        config.vhosts.push("staging".into());
        add_user(config, "ops");
        config.permissions.push(Permission::full("ops", "staging"));
    })
    .await;
    for (user, vhost) in [("ops", "/"), ("guest", "staging")] {
        let url = format!(
            "amqp://{user}:{}@{}/{}",
            if user == "guest" { "guest" } else { "pw" },
            broker.broker().local_addr(),
            vhost.replace('/', "%2f")
        );
        let refused = Connection::connect(&url, ConnectionProperties::default()).await.unwrap_err();
        assert_eq!(reply_code(&refused), Some(530), "{user} on {vhost}: {refused}");
        assert_eq!(message_of(&refused), format!("NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'"));
    }
    connect_as(&broker, "ops", "staging").await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_exchange_needs_write_only_when_the_queue_is_new() {
    let broker = TestBroker::start_with(|config| {
        add_user(config, "app");
        config.permissions.push(Permission {
            user: "app".into(),
            vhost: "/".into(),
            configure: "^app\\.".into(),
            write: "^app\\.".into(),
            read: ".*".into(),
        });
    })
    .await;
    let dead_letter = arguments(&[("x-dead-letter-exchange", AMQPValue::LongString("dead".into()))]);
    let admin = broker.connect().await.create_channel().await.unwrap();
    direct_exchange(&admin, "dead").await;
    admin.queue_declare("app.work".into(), QueueDeclareOptions::default(), dead_letter.clone()).await.unwrap();
    let connection = connect_as(&broker, "app", "/").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    // Re-declaring the existing queue, as every worker does at start: allowed, as in RabbitMQ.
    channel.queue_declare("app.work".into(), QueueDeclareOptions::default(), dead_letter.clone()).await.unwrap();
    // A new queue naming the same dead-letter exchange needs write on it.
    let refused =
        channel.queue_declare("app.other".into(), QueueDeclareOptions::default(), dead_letter).await.unwrap_err();
    assert!(message_of(&refused).contains("write access to exchange 'dead'"), "{}", message_of(&refused));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_names_only_its_publisher_as_user_id_unless_it_may_impersonate() {
    let broker = TestBroker::start_with(|config| {
        for name in ["app", "relay"] {
            add_user(config, name);
            config.permissions.push(Permission::full(name, "/"));
        }
        if let Some(relay) = config.users.iter_mut().find(|user| user.name == "relay") {
            relay.tags.push("impersonator".into());
        }
    })
    .await;
    let admin = broker.connect().await.create_channel().await.unwrap();
    admin.queue_declare("inbox".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let publish_as = |user: &'static str, user_id: &'static str| {
        let broker = &broker;
        async move {
            let connection = connect_as(broker, user, "/").await.unwrap();
            let channel = connection.create_channel().await.unwrap();
            channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            let properties = BasicProperties::default().with_user_id(user_id.into());
            let outcome = async {
                channel
                    .basic_publish("".into(), "inbox".into(), BasicPublishOptions::default(), b"m", properties)
                    .await?
                    .await
            }
            .await;
            outcome.map(drop)
        }
    };
    publish_as("app", "app").await.expect("its own name");
    let refused = publish_as("app", "billing").await.unwrap_err();
    assert_eq!(reply_code(&refused), Some(406));
    assert_eq!(
        message_of(&refused),
        "PRECONDITION_FAILED - user_id property set to 'billing' but authenticated user was 'app'"
    );
    publish_as("relay", "billing").await.expect("an impersonator may name anyone");
    assert_eq!(message_count(&admin, "inbox").await, 2, "the refused one was not published");
    broker.stop().await;
}
