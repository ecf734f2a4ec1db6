//! `wharf-bench`: a load generator for any AMQP 0-9-1 broker (Wharf, RabbitMQ, …), built on lapin.
//!
//! N producers and M consumers, one connection each. Producers publish with publisher confirms and
//! keep at most `--confirm-window` messages unconfirmed; consumers use `--prefetch` and ack every
//! k-th delivery with `multiple`. Every message carries its producer, sequence number and send
//! time, so the run measures end-to-end and publish→confirm latency and checks correctness as it
//! goes: every confirmed message must be consumed (a run with missing messages fails), duplicates
//! are counted. Progress is printed once a second; the run ends with one JSON line.

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_lite::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod phases;
mod raw_idle;
use phases::{declare, drain, failover, idle, probe};

/// Bytes at the start of every body: producer id, sequence number, send time (ns).
const BODY_HEADER_BYTES: usize = 20;
/// Acks written ahead of the consumer before it waits for the oldest to be written.
const ACKS_PENDING_MAX: usize = 1024;
/// How long the run waits, after the producers stop, for consumers to receive what was confirmed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Parser)]
#[command(name = "wharf-bench", about = "Load generator for AMQP 0-9-1 brokers")]
struct Options {
    /// Broker URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Producers (one connection each).
    #[arg(long, default_value_t = 1)]
    producers: usize,
    /// Consumers (one connection each).
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Message body size in bytes (at least 20).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Send transient messages instead of persistent ones.
    #[arg(long)]
    transient: bool,
    /// Most unconfirmed messages per producer.
    #[arg(long, default_value_t = 1000)]
    confirm_window: usize,
    /// Consumer prefetch.
    #[arg(long, default_value_t = 1000)]
    prefetch: u16,
    /// Ack every k-th delivery (with `multiple`).
    #[arg(long, default_value_t = 1)]
    ack_every: u64,
    /// Queue type argument (`classic` or `quorum`, RabbitMQ's `x-queue-type`); empty for none.
    #[arg(long, default_value = "")]
    queue_type: String,
    /// Fan-out: a topic exchange routing each message to this many queues (0: one queue).
    #[arg(long, default_value_t = 0)]
    fanout: usize,
    /// Spread: this many queues, each message published (default exchange) to one of them in
    /// turn; consumer c takes queues c, c + consumers, … with a channel each. With `--phase
    /// declare` or `idle`, how many queues (and idle connections) to open.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// For `--phase declare`: also publish one persistent message to each queue, with confirms.
    #[arg(long)]
    fill: bool,
    /// Messages per second for the whole run (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How long producers publish, in seconds.
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Stop after this many messages per producer (0: use the duration).
    #[arg(long, default_value_t = 0)]
    messages: u64,
    /// Name prefix for the queues and exchange (so parallel runs do not meet).
    #[arg(long, default_value = "wharf-bench")]
    name: String,
    /// A few seconds, for CI: 2 s of publishing unless --messages is given.
    #[arg(long)]
    quick: bool,
    /// `all`: publish and consume at once (the default). `publish`: only publish, building a
    /// backlog (no consumers, no check). `drain`: only consume an existing backlog of `--expect`
    /// messages (checks each was received once). `probe`: wait until the broker accepts a
    /// connection and serves a message from the queue (the last one of `--queues`); prints when
    /// (for restart timing). `declare`: declare `--queues` durable queues from one connection
    /// (and `--fill` them). `idle`: open `--queues` connections, each with a channel and a
    /// consumer on its own queue, print how long that took, and hold them until killed.
    /// `failover`: publish one persistent message at a time to the queue (declared beforehand,
    /// e.g. by `declare` on another node), each confirmed before the next, for `--duration-s`,
    /// connecting again whenever the connection breaks; print the longest time without a confirm
    /// and when it began and ended (kill a node meanwhile: that gap is the failover).
    #[arg(long, default_value = "all", value_parser = ["all", "publish", "drain", "probe", "declare", "idle", "failover"])]
    phase: String,
    /// For `--phase drain`: how many messages the backlog holds.
    #[arg(long, default_value_t = 0)]
    expect: u64,
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

/// Everything the producers and consumers record.
struct Stats {
    published: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    consumed: AtomicU64,
    duplicates: AtomicU64,
    /// Per (producer, queue): sequence numbers seen, for duplicates and missing.
    seen: Mutex<HashMap<(u32, String), Vec<u64>>>,
    /// Per producer: confirmed sequence numbers.
    confirmed_seqs: Mutex<HashMap<u32, Vec<u64>>>,
    end_to_end_us: Mutex<Histogram<u64>>,
    confirm_us: Mutex<Histogram<u64>>,
    producers_done: AtomicBool,
    /// When the last message was consumed, in ns since the epoch (for the end-to-end rate).
    last_consumed_ns: AtomicU64,
}

impl Stats {
    /// Empty counters; `producers_done` from the start for a run without producers.
    fn new(producers_done: bool) -> Result<Stats> {
        Ok(Stats {
            published: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            nacked: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            seen: Mutex::new(HashMap::new()),
            confirmed_seqs: Mutex::new(HashMap::new()),
            end_to_end_us: Mutex::new(histogram()?),
            confirm_us: Mutex::new(histogram()?),
            producers_done: AtomicBool::new(producers_done),
            last_consumed_ns: AtomicU64::new(0),
        })
    }
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("creating a latency histogram")
}

async fn connect(url: &str) -> Result<Connection> {
    Connection::connect(url, ConnectionProperties::default()).await.with_context(|| format!("connecting to {url}"))
}

fn queue_names(options: &Options) -> Vec<String> {
    if options.fanout > 0 {
        (0..options.fanout).map(|index| format!("{}.q{index}", options.name)).collect()
    } else if options.queues > 1 {
        (0..options.queues).map(|index| format!("{}.q{index}", options.name)).collect()
    } else {
        vec![format!("{}.q", options.name)]
    }
}

/// In spread mode, the queue (index) producer `producer`'s message `seq` goes to.
fn spread_queue(options: &Options, producer: u32, seq: u64) -> usize {
    ((u64::from(producer) + seq) % options.queues.max(1) as u64) as usize
}

/// How many copies of each message the consumers receive in total.
fn copies(options: &Options) -> u64 {
    options.fanout.max(1) as u64
}

fn queue_arguments(options: &Options) -> FieldTable {
    let mut arguments = FieldTable::default();
    if !options.queue_type.is_empty() {
        arguments.insert("x-queue-type".into(), AMQPValue::LongString(options.queue_type.as_str().into()));
    }
    arguments
}

async fn setup(options: &Options) -> Result<()> {
    let connection = connect(&options.url).await?;
    let channel = connection.create_channel().await?;
    let arguments = queue_arguments(options);
    for queue in queue_names(options) {
        // Start from empty: a leftover queue from an earlier run would skew the counts.
        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        channel.queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), arguments.clone()).await?;
        if options.fanout > 0 {
            let exchange = format!("{}.x", options.name);
            channel
                .exchange_declare(
                    exchange.as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions { durable: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.as_str().into(),
                    "order.received".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
    }
    connection.close(200, "setup done".into()).await?;
    Ok(())
}

/// A lapin call started at once and finished later. lapin resolves a publish or an ack only once
/// its I/O thread has written the frames, so a client that awaits each in turn pays a thread
/// round trip per message and, on a small machine, becomes the bound instead of the broker.
/// Polling the call once queues its frames right away (in call order: delivery tags and frames
/// follow the order of the calls), and the outcome is collected later.
enum Pipelined<T> {
    Pending(Pin<Box<dyn Future<Output = lapin::Result<T>> + Send>>),
    Done(lapin::Result<T>),
}

impl<T: Send + 'static> Pipelined<T> {
    async fn start(call: impl Future<Output = lapin::Result<T>> + Send + 'static) -> Self {
        let mut call: Pin<Box<dyn Future<Output = lapin::Result<T>> + Send>> = Box::pin(call);
        match futures_lite::future::poll_once(&mut call).await {
            Some(outcome) => Pipelined::Done(outcome),
            None => Pipelined::Pending(call),
        }
    }

    /// Polls a pending call once; true once it is done.
    async fn poll_now(&mut self) -> bool {
        if let Pipelined::Pending(call) = self
            && let Some(outcome) = futures_lite::future::poll_once(call).await
        {
            *self = Pipelined::Done(outcome);
        }
        matches!(self, Pipelined::Done(_))
    }

    /// Waits until the call is done (its outcome is kept for `finish`).
    async fn wait(&mut self) {
        if let Pipelined::Pending(call) = self {
            let outcome = call.await;
            *self = Pipelined::Done(outcome);
        }
    }

    async fn finish(self) -> lapin::Result<T> {
        match self {
            Pipelined::Pending(call) => call.await,
            Pipelined::Done(outcome) => outcome,
        }
    }
}

/// Runs a producer or consumer, saying at once on stderr why it failed (its result is only looked
/// at when the run ends).
async fn reported(role: &'static str, work: impl Future<Output = Result<()>>) -> Result<()> {
    let outcome = work.await;
    if let Err(error) = &outcome {
        eprintln!("{role} failed: {error:#}");
    }
    outcome
}

async fn produce(options: Arc<Options>, producer: u32, stats: Arc<Stats>, deadline: Instant) -> Result<()> {
    let connection = connect(&options.url).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let (exchange, routing_key) = if options.fanout > 0 {
        (format!("{}.x", options.name), "order.received".to_owned())
    } else {
        (String::new(), format!("{}.q", options.name))
    };
    let spread = (options.fanout == 0 && options.queues > 1).then(|| queue_names(&options));
    let properties = BasicProperties::default().with_delivery_mode(if options.transient { 1 } else { 2 });
    let per_producer_rate = options.rate as f64 / options.producers as f64;
    let started = Instant::now();
    let mut in_flight: VecDeque<(u64, Instant, Pipelined<Confirmation>)> = VecDeque::new();
    let mut seq = 0u64;
    let mut body = vec![0u8; options.size.max(BODY_HEADER_BYTES)];
    body[..4].copy_from_slice(&producer.to_le_bytes());
    let settle = |(confirmed_seq, sent, confirmation): (u64, Instant, lapin::Result<Confirmation>)| -> Result<()> {
        let confirmation = confirmation?;
        let latency_us = sent.elapsed().as_micros() as u64;
        if let Ok(mut histogram) = stats.confirm_us.lock() {
            let _ = histogram.record(latency_us.max(1));
        }
        if confirmation.is_ack() {
            stats.confirmed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut confirmed) = stats.confirmed_seqs.lock() {
                confirmed.entry(producer).or_default().push(confirmed_seq);
            }
        } else {
            stats.nacked.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    };
    loop {
        // Confirms that have arrived are counted now, so that their latency is measured when
        // they arrive rather than when the window fills.
        while let Some((_, _, call)) = in_flight.front_mut()
            && call.poll_now().await
        {
            if let Some((confirmed_seq, sent, call)) = in_flight.pop_front() {
                settle((confirmed_seq, sent, call.finish().await))?;
            }
        }
        let more = Instant::now() < deadline && (options.messages == 0 || seq < options.messages);
        if more && in_flight.len() < options.confirm_window {
            if per_producer_rate > 0.0 {
                let due = started + Duration::from_secs_f64(seq as f64 / per_producer_rate);
                if let Some((_, _, call)) = in_flight.front_mut() {
                    // Wait for the next send time, or for the oldest confirm if it comes first.
                    tokio::select! {
                        () = tokio::time::sleep_until(due.into()) => {}
                        () = call.wait() => continue,
                    }
                } else {
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            let mut message = body.clone();
            message[4..12].copy_from_slice(&seq.to_le_bytes());
            message[12..20].copy_from_slice(&now_ns().to_le_bytes());
            let sent = Instant::now();
            let routing_key = match &spread {
                Some(names) => names[spread_queue(&options, producer, seq)].as_str(),
                None => routing_key.as_str(),
            };
            let publish = {
                let (channel, exchange, routing_key, properties) =
                    (channel.clone(), exchange.as_str().into(), routing_key.into(), properties.clone());
                async move {
                    let confirm = channel
                        .basic_publish(exchange, routing_key, BasicPublishOptions::default(), &message, properties)
                        .await?;
                    // Written (lapin copied it into frames): only the confirm is awaited now, so
                    // the window does not hold a copy of every body in flight.
                    drop(message);
                    confirm.await
                }
            };
            in_flight.push_back((seq, sent, Pipelined::start(publish).await));
            stats.published.fetch_add(1, Ordering::Relaxed);
            seq += 1;
            continue;
        }
        let Some((confirmed_seq, sent, call)) = in_flight.pop_front() else { break };
        settle((confirmed_seq, sent, call.finish().await))?;
    }
    connection.close(200, "producer done".into()).await?;
    Ok(())
}

/// Records one delivery: its end-to-end latency (send time to now) and its sequence number.
fn record_delivery(stats: &Stats, queue: &str, data: &[u8]) {
    if data.len() >= BODY_HEADER_BYTES {
        let producer = u32::from_le_bytes(data[..4].try_into().unwrap_or_default());
        let seq = u64::from_le_bytes(data[4..12].try_into().unwrap_or_default());
        let sent_ns = u64::from_le_bytes(data[12..20].try_into().unwrap_or_default());
        let latency_us = now_ns().saturating_sub(sent_ns) / 1_000;
        if let Ok(mut histogram) = stats.end_to_end_us.lock() {
            let _ = histogram.record(latency_us.max(1));
        }
        if let Ok(mut seen) = stats.seen.lock() {
            seen.entry((producer, queue.to_owned())).or_default().push(seq);
        }
    }
    stats.consumed.fetch_add(1, Ordering::Relaxed);
    stats.last_consumed_ns.fetch_max(now_ns(), Ordering::Relaxed);
}

/// What the consumer's callback passes on to the task that acks.
enum Received {
    Delivery { delivery_tag: u64 },
    Cancelled,
    Failed(lapin::Error),
}

/// Where a consumer's deliveries come from.
enum Deliveries {
    /// lapin's stream, polled by the consumer task.
    Stream(lapin::Consumer),
    /// lapin's callback, which records each delivery on lapin's I/O thread and passes it on. The
    /// consumer is held here because dropping it cancels the subscription.
    Callback { _subscription: lapin::Consumer, received: tokio::sync::mpsc::UnboundedReceiver<Received> },
}

impl Deliveries {
    async fn next(&mut self, stats: &Stats, queue: &str) -> Option<Received> {
        match self {
            Deliveries::Stream(consumer) => Some(match consumer.next().await? {
                Ok(delivery) => {
                    record_delivery(stats, queue, &delivery.data);
                    Received::Delivery { delivery_tag: delivery.delivery_tag }
                }
                Err(error) => Received::Failed(error),
            }),
            Deliveries::Callback { received, .. } => received.recv().await,
        }
    }
}

/// Consumes, acking every `--ack-every`-th delivery with `multiple`, from one task in delivery
/// order, as the broker requires for `multiple` acks.
///
/// In the fixed-rate (latency) mode deliveries come through lapin's callback API
/// (`Consumer::set_delegate`) rather than its stream. lapin reads and parses frames on its own I/O
/// thread; its stream hands each delivery to the consuming task through a channel, and waking
/// that task on another thread added 0.24-0.37 ms at p99 to every end-to-end latency (measured by
/// packet capture, `docs/benchmarks.md`), the same for every broker. The callback runs on the I/O
/// thread as soon as the delivery is parsed, which is where a callback-style consumer (the Java
/// client's `handleDelivery`, pika's `on_message_callback`) sees it, so the latency is taken
/// there. At full speed the stream is used: lapin spawns a task per callback, which cost the
/// client ~15% more CPU per message with three consumers (S3), and the client's CPU is what
/// bounds throughput on a small machine.
async fn consume(options: Arc<Options>, queues: Vec<String>, stats: Arc<Stats>, stop: Arc<AtomicBool>) -> Result<()> {
    let connection = connect(&options.url).await?;
    let mut channels = Vec::new();
    // Held until the connection closes: a dropped channel starts closing on its own, and the
    // connection's close then finds it half closed and fails.
    let mut held = Vec::new();
    for queue in queues {
        let channel = connection.create_channel().await?;
        held.push(channel.clone());
        let (options, stats, stop) = (Arc::clone(&options), Arc::clone(&stats), Arc::clone(&stop));
        channels.push(tokio::spawn(consume_channel(options, channel, queue, stats, stop)));
    }
    for channel in channels {
        channel.await??;
    }
    connection.close(200, "consumer done".into()).await?;
    drop(held);
    Ok(())
}

/// One channel's consumer on one queue (see [`consume`]).
async fn consume_channel(
    options: Arc<Options>,
    channel: lapin::Channel,
    queue: String,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    channel.basic_qos(options.prefetch, BasicQosOptions::default()).await?;
    let consumer = channel
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let mut deliveries = if options.rate == 0 {
        Deliveries::Stream(consumer)
    } else {
        // Unbounded is safe: the prefetch bounds how many deliveries are ever unacked.
        let (received_in, received_out) = tokio::sync::mpsc::unbounded_channel();
        let stats = Arc::clone(&stats);
        let queue = queue.clone();
        consumer.set_delegate(move |delivery: lapin::message::DeliveryResult| {
            // This body runs on lapin's I/O thread; only the empty future below is spawned.
            let received = match delivery {
                Ok(Some(delivery)) => {
                    record_delivery(&stats, &queue, &delivery.data);
                    Received::Delivery { delivery_tag: delivery.delivery_tag }
                }
                Ok(None) => Received::Cancelled,
                Err(error) => Received::Failed(error),
            };
            let _ = received_in.send(received);
            async {}
        });
        Deliveries::Callback { _subscription: consumer, received: received_out }
    };
    let mut unacked = 0u64;
    let mut acks: VecDeque<Pipelined<()>> = VecDeque::new();
    loop {
        let received = tokio::select! {
            received = deliveries.next(&stats, &queue) => received,
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                if stop.load(Ordering::Relaxed) { break; }
                continue;
            }
        };
        let delivery_tag = match received {
            Some(Received::Delivery { delivery_tag }) => delivery_tag,
            Some(Received::Cancelled) | None => break,
            Some(Received::Failed(error)) => return Err(error.into()),
        };
        unacked += 1;
        if unacked >= options.ack_every {
            // The channel's own basic.ack queues its frame when first polled, so acks go out in
            // order (lapin's `Acker` goes through a task per call and may reorder them, which a
            // broker rejects for `multiple` acks).
            let channel = channel.clone();
            acks.push_back(
                Pipelined::start(
                    async move { channel.basic_ack(delivery_tag, BasicAckOptions { multiple: true }).await },
                )
                .await,
            );
            unacked = 0;
            // Acks are written in order: the front is done before those behind it. Collect what
            // is done; wait for the front only when too many are pending.
            while let Some(front) = acks.front_mut() {
                if !front.poll_now().await && acks.len() <= ACKS_PENDING_MAX {
                    break;
                }
                if let Some(ack) = acks.pop_front() {
                    ack.finish().await?;
                }
            }
        }
    }
    for ack in acks {
        ack.finish().await?;
    }
    Ok(())
}

fn percentiles(histogram: &Histogram<u64>) -> String {
    let at = |quantile: f64| histogram.value_at_quantile(quantile);
    format!(
        "{{\"p50\":{},\"p90\":{},\"p99\":{},\"p99_9\":{},\"max\":{}}}",
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        histogram.max()
    )
}

fn epoch_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let mut options = Options::parse();
    if options.quick && options.messages == 0 {
        options.duration_s = 2;
    }
    if options.size < BODY_HEADER_BYTES {
        bail!("--size must be at least {BODY_HEADER_BYTES} bytes (the body carries producer, sequence and send time)");
    }
    if options.producers == 0 || options.ack_every == 0 || options.confirm_window == 0 {
        bail!("--producers, --ack-every and --confirm-window must be at least 1");
    }
    let options = Arc::new(options);
    if options.fanout == 0 && options.queues > 1 && options.consumers > options.queues {
        bail!("with --queues, --consumers must be at most the number of queues (each consumer takes some)");
    }
    match options.phase.as_str() {
        "declare" => return declare(&options).await,
        "idle" => return idle(Arc::clone(&options)).await,
        "probe" => return probe(&options).await,
        "drain" => return drain(Arc::clone(&options)).await,
        "failover" => return failover(&options).await,
        _ => {}
    }
    setup(&options).await?;
    let stats = Arc::new(Stats::new(false)?);
    let stop = Arc::new(AtomicBool::new(false));
    let queues = queue_names(&options);
    let publish_only = options.phase == "publish";
    let mut consumers = Vec::new();
    let spread = options.fanout == 0 && options.queues > 1;
    // Spread: consumer c takes every consumers-th queue from c. Otherwise each queue has
    // `--consumers` consumers of its own.
    let assignments: Vec<Vec<String>> = if publish_only {
        Vec::new()
    } else if spread {
        (0..options.consumers)
            .map(|consumer| queues.iter().skip(consumer).step_by(options.consumers).cloned().collect())
            .collect()
    } else {
        queues.iter().flat_map(|queue| (0..options.consumers).map(move |_| vec![queue.clone()])).collect()
    };
    for assigned in assignments {
        consumers.push(tokio::spawn(reported(
            "consumer",
            consume(Arc::clone(&options), assigned, Arc::clone(&stats), Arc::clone(&stop)),
        )));
    }
    let started = Instant::now();
    let started_ns = now_ns();
    let deadline = started + Duration::from_secs(options.duration_s);
    let producers: Vec<_> = (0..options.producers as u32)
        .map(|producer| {
            tokio::spawn(reported("producer", produce(Arc::clone(&options), producer, Arc::clone(&stats), deadline)))
        })
        .collect();
    let progress = {
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let mut last = (0, 0);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let confirmed = stats.confirmed.load(Ordering::Relaxed);
                let consumed = stats.consumed.load(Ordering::Relaxed);
                eprintln!(
                    "{:>5.1}s confirmed {confirmed:>9} (+{:>7}/s) consumed {consumed:>9} (+{:>7}/s)",
                    started.elapsed().as_secs_f64(),
                    confirmed - last.0,
                    consumed - last.1
                );
                last = (confirmed, consumed);
            }
        })
    };
    for producer in producers {
        producer.await??;
    }
    let publish_elapsed = started.elapsed();
    stats.producers_done.store(true, Ordering::Relaxed);
    // Wait for the consumers to receive everything confirmed (each message once per queue).
    let expected = if publish_only { 0 } else { stats.confirmed.load(Ordering::Relaxed) * copies(&options) };
    let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
    while stats.consumed.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for consumer in consumers {
        consumer.await??;
    }
    progress.abort();

    let mut missing = 0u64;
    if !publish_only {
        let confirmed = stats.confirmed_seqs.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let mut seen = stats.seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        for received in seen.values_mut() {
            received.sort_unstable();
            let before = received.len();
            received.dedup();
            stats.duplicates.fetch_add((before - received.len()) as u64, Ordering::Relaxed);
        }
        for (producer, seqs) in confirmed.iter() {
            for seq in seqs {
                // Every queue of a fan-out holds a copy; in spread mode, the one it was sent to.
                let holders: Vec<&String> = if spread {
                    vec![&queues[spread_queue(&options, *producer, *seq)]]
                } else {
                    queues.iter().collect()
                };
                for queue in holders {
                    let received = seen.get(&(*producer, queue.clone()));
                    if received.is_none_or(|received| received.binary_search(seq).is_err()) {
                        missing += 1;
                    }
                }
            }
        }
    }
    let confirmed = stats.confirmed.load(Ordering::Relaxed);
    let consumed = stats.consumed.load(Ordering::Relaxed);
    let throughput = confirmed as f64 / publish_elapsed.as_secs_f64();
    // Delivered end to end: every copy consumed, over the time until the last one arrived (a
    // broker that lets publishers run ahead of consumers shows a lower figure here).
    let consumed_s = (stats.last_consumed_ns.load(Ordering::Relaxed).saturating_sub(started_ns)) as f64 / 1e9;
    let end_to_end_rate = if consumed_s > 0.0 { consumed as f64 / copies(&options) as f64 / consumed_s } else { 0.0 };
    let end_to_end = stats.end_to_end_us.lock().map(|histogram| percentiles(&histogram)).unwrap_or_default();
    let confirm = stats.confirm_us.lock().map(|histogram| percentiles(&histogram)).unwrap_or_default();
    println!(
        "{{\"producers\":{},\"consumers\":{},\"size\":{},\"persistent\":{},\"fanout\":{},\"published\":{},\"confirmed\":{},\"nacked\":{},\"consumed\":{},\"duplicates\":{},\"missing\":{missing},\"seconds\":{:.3},\"msgs_per_s\":{throughput:.0},\"e2e_msgs_per_s\":{end_to_end_rate:.0},\"mb_per_s\":{:.2},\"end_to_end_us\":{end_to_end},\"confirm_us\":{confirm}}}",
        options.producers,
        options.consumers,
        options.size,
        !options.transient,
        options.fanout,
        stats.published.load(Ordering::Relaxed),
        confirmed,
        stats.nacked.load(Ordering::Relaxed),
        consumed,
        stats.duplicates.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        throughput * options.size as f64 / 1e6,
    );
    if missing > 0 {
        bail!("{missing} confirmed messages were never consumed");
    }
    Ok(())
}
