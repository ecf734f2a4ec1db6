//! Helpers for the broker's integration tests: a real broker on 127.0.0.1:0 over a temporary data
//! directory, lapin clients connected to it, and a manual clock for the time-driven features.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use lapin::{Connection, ConnectionProperties};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wharf_broker::{Broker, BrokerConfig, ManualClock};

/// A broker and the directory it keeps its data in.
pub struct TestBroker {
    pub broker: Option<Broker>,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

pub fn config(data_dir: &Path) -> BrokerConfig {
    let mut config = BrokerConfig::new(data_dir);
    config.amqp_listen = "127.0.0.1:0".parse().unwrap();
    config
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let broker = Broker::start(config(&data_dir)).await.unwrap();
        TestBroker { broker: Some(broker), data_dir, _temp: Some(temp) }
    }

    /// A broker whose time moves only when the test advances `clock` (see [`advance`]).
    pub async fn start_on(clock: &Arc<ManualClock>) -> TestBroker {
        TestBroker::start_with(on_clock(clock)).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let mut config = config(&data_dir);
        configure(&mut config);
        let broker = Broker::start(config).await.unwrap();
        TestBroker { broker: Some(broker), data_dir, _temp: Some(temp) }
    }

    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().unwrap()
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.broker().local_addr())
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default()).await.unwrap()
    }

    /// Stops the broker cleanly and starts a new one on the same data directory.
    pub async fn restart(&mut self) {
        self.broker.take().unwrap().shutdown().await;
        self.broker = Some(Broker::start(config(&self.data_dir)).await.unwrap());
    }

    /// Stops the broker cleanly and starts a new one on the same data directory, configured by
    /// `configure` (as `start_with` was).
    pub async fn restart_with(&mut self, configure: impl FnOnce(&mut BrokerConfig)) {
        self.broker.take().unwrap().shutdown().await;
        let mut config = config(&self.data_dir);
        configure(&mut config);
        self.broker = Some(Broker::start(config).await.unwrap());
    }

    pub async fn stop(mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
    }
}

/// The AMQP reply code carried by a lapin error, if it is a protocol error.
pub fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// A broker on the fault-injecting file system that can be crashed and restarted in-process:
/// `crash` drops everything the chosen crash mode drops (`KeepUnsynced` is `kill -9`: what was
/// written survives; `LoseUnsynced` is a power loss), then a new broker recovers what is left.
pub struct CrashableBroker {
    pub fs: wharf_store::SimFs,
    pub broker: Option<Broker>,
    configure: std::sync::Arc<dyn Fn(&mut BrokerConfig) + Send + Sync>,
}

impl CrashableBroker {
    pub async fn start(seed: u64, configure: impl Fn(&mut BrokerConfig) + Send + Sync + 'static) -> CrashableBroker {
        let fs = wharf_store::SimFs::new(seed);
        let configure: std::sync::Arc<dyn Fn(&mut BrokerConfig) + Send + Sync> = std::sync::Arc::new(configure);
        let broker = Self::boot(&fs, &configure).await;
        CrashableBroker { fs, broker: Some(broker), configure }
    }

    async fn boot(
        fs: &wharf_store::SimFs,
        configure: &std::sync::Arc<dyn Fn(&mut BrokerConfig) + Send + Sync>,
    ) -> Broker {
        let mut config = BrokerConfig::new("/data");
        config.amqp_listen = "127.0.0.1:0".parse().unwrap();
        config.fs = fs.shared();
        configure(&mut config);
        Broker::start(config).await.unwrap()
    }

    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().unwrap()
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.broker().local_addr())
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default()).await.unwrap()
    }

    /// Crashes the broker (nothing more reaches the disk) and starts a new one on what survived.
    pub async fn crash(&mut self, mode: wharf_store::CrashMode) {
        self.crash_down(mode).await;
        self.broker = Some(Self::boot(&self.fs, &self.configure).await);
    }

    /// Like [`CrashableBroker::crash`], with `down_ms` passing on `clock` while no broker runs
    /// (the broker must be on that clock): what falls due meanwhile is the new broker's to find.
    pub async fn crash_for(&mut self, mode: wharf_store::CrashMode, clock: &ManualClock, down_ms: u64) {
        self.crash_down(mode).await;
        clock.advance(down_ms);
        self.broker = Some(Self::boot(&self.fs, &self.configure).await);
    }

    async fn crash_down(&mut self, mode: wharf_store::CrashMode) {
        self.fs.crash(mode);
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
        self.fs = self.fs.remount();
    }

    /// Stops the broker cleanly and starts it again.
    pub async fn restart(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
        self.broker = Some(Self::boot(&self.fs, &self.configure).await);
    }

    pub async fn stop(mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
    }
}

/// A header's value as text (long or short string), for assertions.
pub fn header_text(headers: &lapin::types::FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        lapin::types::AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        lapin::types::AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

/// A header's value as an integer of any width, for assertions.
pub fn header_integer(headers: &lapin::types::FieldTable, name: &str) -> Option<i64> {
    use lapin::types::AMQPValue;
    Some(match headers.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    })
}

/// The `x-death` entries of a message (newest first), each as a field table.
pub fn x_death(properties: &lapin::BasicProperties) -> Vec<lapin::types::FieldTable> {
    let Some(headers) = properties.headers() else { return Vec::new() };
    match headers.inner().get("x-death") {
        Some(lapin::types::AMQPValue::FieldArray(array)) => array
            .as_slice()
            .iter()
            .filter_map(|value| match value {
                lapin::types::AMQPValue::FieldTable(table) => Some(table.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Arguments for a declaration, from (name, value) pairs.
pub fn arguments(pairs: &[(&str, lapin::types::AMQPValue)]) -> lapin::types::FieldTable {
    let mut table = lapin::types::FieldTable::default();
    for (name, value) in pairs {
        table.insert((*name).into(), value.clone());
    }
    table
}

/// The longest a test waits for something the broker must do (far above any expected time, so
/// a broken broker fails the test instead of hanging it).
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Starts a consumer (manual acks) on `queue`.
pub async fn consumer(channel: &lapin::Channel, queue: &str) -> lapin::Consumer {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap()
}

/// The consumer's next delivery (panics after `PATIENCE`).
pub async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    use futures_lite::StreamExt;
    tokio::time::timeout(PATIENCE, consumer.next())
        .await
        .expect("no delivery in time")
        .expect("consumer ended")
        .expect("delivery error")
}

/// The number of ready messages in `queue` (waiting out a backoff or behind their key included),
/// by a passive declare, which does not count as use of the queue (`x-expires` is unaffected).
pub async fn message_count(channel: &lapin::Channel, queue: &str) -> u32 {
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), passive, lapin::types::FieldTable::default()).await.unwrap().message_count()
}

/// True if the broker has sent `consumer` nothing so far, found without waiting: a round trip on
/// `channel` (a passive declare of `queue`) comes back after anything the broker had queued to the
/// connection before (one writer per connection, in order), and lapin hands a delivery to its
/// consumer before it reads the next frame. So `channel` must be on the consumer's connection.
pub async fn nothing_received(channel: &lapin::Channel, queue: &str, consumer: &mut lapin::Consumer) -> bool {
    use futures_lite::StreamExt;
    message_count(channel, queue).await;
    futures_lite::future::poll_once(consumer.next()).await.is_none()
}

/// A configure closure that puts `clock` into the broker's configuration: for
/// `TestBroker::start_with` and for `CrashableBroker::start`, where every broker after a crash or
/// restart gets the same clock, so time goes on across them.
pub fn on_clock(clock: &Arc<ManualClock>) -> impl Fn(&mut BrokerConfig) + Send + Sync + 'static {
    let clock = Arc::clone(clock);
    move |config| config.clock = Arc::clone(&clock) as Arc<dyn wharf_broker::Clock>
}

/// Moves `clock` forward by `duration_ms` and returns once `broker` has fired every timer due by
/// then (a delivery that causes is already queued to its connection).
pub async fn advance(broker: &Broker, clock: &ManualClock, duration_ms: u64) {
    clock.advance(duration_ms);
    broker.fire_due_timers().await;
}

/// Publishes a persistent message on a confirm-mode channel and returns whether it was acked.
pub async fn publish_confirmed(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> bool {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            properties.with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .is_ack()
}

/// A confirm-mode channel.
pub async fn confirm_channel(connection: &Connection) -> lapin::Channel {
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await.unwrap();
    channel
}

/// Declares a durable queue with arguments.
pub async fn durable_queue(channel: &lapin::Channel, name: &str, arguments: lapin::types::FieldTable) {
    channel.queue_declare(name.into(), lapin::options::QueueDeclareOptions::durable(), arguments).await.unwrap();
}

/// The reply text carried by a lapin error (its debug form if it is not a protocol error).
pub fn message_of(error: &lapin::Error) -> String {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
        other => format!("{other:?}"),
    }
}

/// Connects as `user` (password `pw`) to `vhost`.
pub async fn connect_as(broker: &TestBroker, user: &str, vhost: &str) -> Result<Connection, lapin::Error> {
    let url = format!("amqp://{user}:pw@{}/{}", broker.broker().local_addr(), vhost.replace('/', "%2f"));
    Connection::connect(&url, ConnectionProperties::default()).await
}

/// Publishes on a channel in confirm mode and waits for the confirm, for a publish the server
/// refuses by closing the channel: the error carries the channel's close (a later method on the
/// channel could instead fail on the closed channel before the server's reason arrives).
pub async fn publish_refused(
    channel: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: lapin::BasicProperties,
) -> lapin::Error {
    let outcome = async {
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await
    }
    .await;
    outcome.expect_err("the publish was refused")
}
