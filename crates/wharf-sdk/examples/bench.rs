//! The SDK's benchmark: the relay's throughput (events per second from commit to confirm) and
//! the cost of the `exactly_once` wrapper against a bare handler, on SQLite and, with
//! `WHARF_BENCH_POSTGRES_URL` and `WHARF_BENCH_MYSQL_URL`, PostgreSQL and MySQL, against an embedded Wharf broker (or the broker at
//! `--broker-url`, RabbitMQ say). Results go to stdout as one JSON object per measurement;
//! `docs/benchmarks.md` records them.
//!
//! ```sh
//! cargo run --release -p wharf-sdk --example bench -- [--events 20000] [--broker-url URL]
//! ```

use anyhow::{Context, Result, bail};
use sqlx::{Postgres, Sqlite, Transaction};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use wharf_sdk::{
    ConfirmedPublisher, ConsumerConfig, EffectHandler, Event, HandleError, Handler, Inbox, Incoming, MySqlInbox,
    MySqlOutbox, Outbox, Outcome, PgInbox, PgOutbox, PublisherConfig, Relay, RelayConfig, SqliteInbox, SqliteOutbox,
    exactly_once, run_consumer,
};

struct Args {
    events: usize,
    broker_url: Option<String>,
}

fn args() -> Result<Args> {
    let mut args = Args { events: 20_000, broker_url: None };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        match flag.as_str() {
            "--events" => args.events = iter.next().context("--events needs a count")?.parse()?,
            "--broker-url" => args.broker_url = Some(iter.next().context("--broker-url needs a URL")?),
            other => bail!("unknown flag {other}; flags: --events N, --broker-url URL"),
        }
    }
    Ok(args)
}

fn report(name: &str, database: &str, events: usize, elapsed: Duration) {
    let per_s = events as f64 / elapsed.as_secs_f64();
    println!(
        "{{\"bench\":\"{name}\",\"database\":\"{database}\",\"events\":{events},\"elapsed_s\":{:.3},\"per_s\":{per_s:.0}}}",
        elapsed.as_secs_f64()
    );
}

async fn declare(url: &str, queue: &str) -> Result<()> {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let _ = channel.queue_delete(queue.into(), Default::default()).await;
    channel.queue_declare(queue.into(), lapin::options::QueueDeclareOptions::durable(), Default::default()).await?;
    connection.close(200, "declared".into()).await?;
    Ok(())
}

/// Writes `events` outbox rows (one transaction per 100), then times the relay until all are sent.
async fn relay_throughput<O: Outbox>(
    outbox: O,
    begin: impl AsyncFn() -> sqlx::Result<Transaction<'static, O::Db>>,
    url: &str,
    events: usize,
    database: &str,
) -> Result<()> {
    outbox.migrate().await?;
    declare(url, "bench-relay").await?;
    for chunk in 0..events.div_ceil(100) {
        let mut tx = begin().await?;
        for index in chunk * 100..((chunk + 1) * 100).min(events) {
            outbox
                .enqueue(&mut tx, &Event::new("", "bench-relay", vec![b'x'; 256]).with_id(format!("relay-{index}")))
                .await?;
        }
        tx.commit().await?;
    }
    let mut config = RelayConfig::new(url);
    config.poll_interval_ms = 5;
    let (stop, stopped) = watch::channel(false);
    let started = Instant::now();
    let relay = tokio::spawn(Relay::new(outbox.clone(), config)?.run(stopped));
    while outbox.unsent_count().await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    stop.send(true)?;
    relay.await??;
    report("relay", database, events, elapsed);
    Ok(())
}

/// Acknowledges everything, counting.
struct Bare(Arc<AtomicU64>);

impl Handler for Bare {
    async fn handle(&self, _message: Incoming) -> Outcome {
        self.0.fetch_add(1, Ordering::Relaxed);
        Outcome::Ack
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Tick {
    n: u64,
}

impl wharf_sdk::Message for Tick {
    const TYPE: &'static str = "Tick";
}

/// Counts, in the handler's transaction as exactly_once gives it (the effect itself is nothing:
/// what is measured is the wrapper's begin, inbox insert and commit).
#[derive(Clone)]
struct Counted(Arc<AtomicU64>);

impl EffectHandler<Tick, Sqlite> for Counted {
    async fn handle(
        &self,
        _tx: &mut Transaction<'static, Sqlite>,
        _tick: Tick,
        _: &Incoming,
    ) -> Result<(), HandleError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl EffectHandler<Tick, sqlx::MySql> for Counted {
    async fn handle(
        &self,
        _tx: &mut Transaction<'static, sqlx::MySql>,
        _tick: Tick,
        _: &Incoming,
    ) -> Result<(), HandleError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl EffectHandler<Tick, Postgres> for Counted {
    async fn handle(
        &self,
        _tx: &mut Transaction<'static, Postgres>,
        _tick: Tick,
        _: &Incoming,
    ) -> Result<(), HandleError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

async fn fill(url: &str, queue: &str, events: usize) -> Result<()> {
    declare(url, queue).await?;
    let mut publisher = ConfirmedPublisher::new(PublisherConfig::new(url))?;
    let batch: Vec<Event> = (0..events)
        .map(|index| Event::from_message(&Tick { n: index as u64 }).map(|event| event.with_routing(queue)))
        .collect::<wharf_sdk::Result<_>>()?;
    for outcome in publisher.publish_all(&batch).await {
        outcome?;
    }
    Ok(())
}

trait Routed {
    fn with_routing(self, queue: &str) -> Event;
}

impl Routed for Event {
    fn with_routing(mut self, queue: &str) -> Event {
        self.exchange = String::new();
        self.routing_key = queue.to_owned();
        self
    }
}

/// Drains `events` messages from a filled queue with `handler`; returns the time it took.
async fn drain<H: Handler>(
    url: &str,
    queue: &str,
    handler: H,
    counted: Arc<AtomicU64>,
    events: usize,
) -> Result<Duration> {
    let (stop, stopped) = watch::channel(false);
    let mut config = ConsumerConfig::new(url, queue);
    config.prefetch = 256;
    config.concurrency = 16;
    let started = Instant::now();
    let consuming = tokio::spawn(run_consumer(config, handler, stopped));
    while counted.load(Ordering::Relaxed) < events as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    stop.send(true)?;
    consuming.await??;
    Ok(elapsed)
}

async fn handler_overhead<I: Inbox>(inbox: I, url: &str, events: usize, database: &str) -> Result<()>
where
    Counted: EffectHandler<Tick, I::Db>,
{
    inbox.migrate().await?;
    fill(url, "bench-bare", events).await?;
    let counted = Arc::new(AtomicU64::new(0));
    let bare = drain(url, "bench-bare", Bare(Arc::clone(&counted)), Arc::clone(&counted), events).await?;
    report("bare_handler", database, events, bare);
    fill(url, "bench-once", events).await?;
    let counted = Arc::new(AtomicU64::new(0));
    let wrapped = exactly_once(inbox, Counted(Arc::clone(&counted)));
    let once = drain(url, "bench-once", wrapped, Arc::clone(&counted), events).await?;
    report("exactly_once_handler", database, events, once);
    println!(
        "{{\"bench\":\"exactly_once_overhead\",\"database\":\"{database}\",\"extra_us_per_message\":{:.1}}}",
        (once.as_secs_f64() - bare.as_secs_f64()) * 1e6 / events as f64
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = args()?;
    let temp = tempfile::tempdir()?;
    let (broker, url) = match &args.broker_url {
        Some(url) => (None, url.clone()),
        None => {
            let mut config = wharf_broker::BrokerConfig::new(temp.path().join("broker"));
            config.amqp_listen = "127.0.0.1:0".parse()?;
            let broker = wharf_broker::Broker::start(config).await?;
            let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
            (Some(broker), url)
        }
    };
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(temp.path().join("bench.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(30));
    let sqlite = sqlx::sqlite::SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
    let begin = async || sqlite.begin().await;
    relay_throughput(SqliteOutbox::new(sqlite.clone()), begin, &url, args.events, "sqlite").await?;
    handler_overhead(SqliteInbox::new(sqlite.clone(), "bench"), &url, args.events, "sqlite").await?;
    if let Ok(postgres_url) = std::env::var("WHARF_BENCH_POSTGRES_URL") {
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(20).connect(&postgres_url).await?;
        for table in ["wharf_outbox", "wharf_inbox"] {
            sqlx::query(&format!("DELETE FROM {table}")).execute(&pool).await.ok();
        }
        let begin = async || pool.begin().await;
        relay_throughput(PgOutbox::new(pool.clone()), begin, &url, args.events, "postgres").await?;
        handler_overhead(PgInbox::new(pool.clone(), "bench"), &url, args.events, "postgres").await?;
    }
    if let Ok(mysql_url) = std::env::var("WHARF_BENCH_MYSQL_URL") {
        let pool = sqlx::mysql::MySqlPoolOptions::new().max_connections(20).connect(&mysql_url).await?;
        for table in ["wharf_outbox", "wharf_inbox"] {
            sqlx::query(&format!("DELETE FROM {table}")).execute(&pool).await.ok();
        }
        let begin = async || pool.begin().await;
        relay_throughput(MySqlOutbox::new(pool.clone()), begin, &url, args.events, "mysql").await?;
        handler_overhead(MySqlInbox::new(pool.clone(), "bench"), &url, args.events, "mysql").await?;
    }
    if let Some(broker) = broker {
        broker.shutdown().await;
    }
    Ok(())
}
