//! `wharf-mqtt-bench`: a load generator for any MQTT broker (Wharf, RabbitMQ's MQTT plugin,
//! Mosquitto), speaking MQTT 3.1.1 through `wharf-mqtt`'s codec.
//!
//! - `throughput`: P publishers, each keeping at most `--window` QoS 1 publishes awaiting PUBACK,
//!   and one subscriber on `bench/#` with a persistent session (QoS 1), acknowledging each
//!   delivery; the publishes acknowledged and the deliveries per second over `--duration-s`.
//! - `latency`: one publisher at `--rate` msgs/s; publish-to-deliver percentiles at QoS 1.
//! - `idle`: opens `--connections` devices (persistent sessions, each subscribed to its own topic
//!   at QoS 1), reports how long that took, then holds them for `--duration-s` (the caller reads
//!   the broker's memory meanwhile).
//!
//! Every payload carries its publisher, sequence number and send time; the run checks that every
//! acknowledged publish was delivered (a run with missing messages fails). Ends with one JSON line.

use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use wharf_mqtt::{
    Ack, Connect, Decoder, Packet, Properties, Publish, QoS, Subscribe, Subscription, SubscriptionOptions, Version,
};

#[derive(Debug, Clone, Parser)]
#[command(name = "wharf-mqtt-bench")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: SocketAddr,
    #[arg(long, default_value = "guest")]
    user: String,
    #[arg(long, default_value = "guest")]
    password: String,
    #[arg(long, default_value = "throughput", value_parser = ["throughput", "latency", "idle"])]
    mode: String,
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// QoS 1 publishes a publisher keeps awaiting PUBACK.
    #[arg(long, default_value_t = 100)]
    window: usize,
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    #[arg(long, default_value_t = 10)]
    duration_s: u64,
    /// Messages per second in `latency` mode.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Devices in `idle` mode.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// A label for the JSON line.
    #[arg(long, default_value = "")]
    label: String,
}

/// Bytes at the start of every payload: publisher, sequence number, send time (µs since start).
const PAYLOAD_HEADER_BYTES: usize = 20;

struct Client {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    decoder: Decoder,
    buffer: BytesMut,
}

impl Client {
    async fn connect(args: &Args, client_id: &str, clean: bool) -> Result<Client> {
        let stream = TcpStream::connect(args.broker).await.with_context(|| format!("connecting to {}", args.broker))?;
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        let mut decoder = Decoder::new(wharf_mqtt::PACKET_BYTES_MAX_DEFAULT);
        decoder.set_version(Version::V311);
        let mut client = Client { reader, writer, decoder, buffer: BytesMut::with_capacity(64 * 1024) };
        client
            .send(&Packet::Connect(Box::new(Connect {
                version: Version::V311,
                client_id: client_id.to_owned(),
                clean_start: clean,
                keep_alive_s: 120,
                username: Some(args.user.clone()),
                password: Some(Bytes::copy_from_slice(args.password.as_bytes())),
                will: None,
                properties: Properties::default(),
            })))
            .await?;
        match client.recv().await? {
            Packet::ConnAck(ack) if ack.reason == 0 => Ok(client),
            other => bail!("{client_id}: CONNECT refused: {other:?}"),
        }
    }

    async fn send(&mut self, packet: &Packet) -> Result<()> {
        let mut bytes = BytesMut::new();
        wharf_mqtt::encode(packet, Version::V311, &mut bytes);
        Ok(self.writer.write_all(&bytes).await?)
    }

    async fn recv(&mut self) -> Result<Packet> {
        recv(&mut self.reader, &mut self.decoder, &mut self.buffer).await
    }

    async fn subscribe(&mut self, filter: &str) -> Result<()> {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: filter.into(),
                options: SubscriptionOptions::qos(QoS::AtLeastOnce),
            }],
            properties: Properties::default(),
        }))
        .await?;
        loop {
            if let Packet::SubAck(ack) = self.recv().await? {
                if ack.reasons.first().is_some_and(|code| *code <= 2) {
                    return Ok(());
                }
                bail!("SUBSCRIBE refused: {:?}", ack.reasons);
            }
        }
    }
}

async fn recv(reader: &mut OwnedReadHalf, decoder: &mut Decoder, buffer: &mut BytesMut) -> Result<Packet> {
    loop {
        if let Some(packet) = decoder.decode(buffer)? {
            return Ok(packet);
        }
        if reader.read_buf(buffer).await? == 0 {
            bail!("the broker closed the connection");
        }
    }
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 600_000_000, 3).context("creating a latency histogram")
}

/// What the subscriber saw.
#[derive(Default)]
struct Seen {
    delivered: AtomicU64,
    unique: Mutex<HashSet<(u32, u64)>>,
    latency_us: Mutex<Option<Histogram<u64>>>,
}

/// Subscribes on `bench/#` (a persistent session) and acknowledges every delivery until `stop`.
async fn subscriber(
    args: Args,
    start: Instant,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let mut client = Client::connect(&args, "bench-subscriber", false).await?;
    client.subscribe("bench/#").await?;
    let _ = ready.send(());
    let Client { reader, mut writer, mut decoder, mut buffer } = client;
    let mut reader = reader;
    let mut acks = BytesMut::new();
    while !stop.load(Ordering::Relaxed) {
        let packet = match tokio::time::timeout(
            Duration::from_millis(200),
            recv(&mut reader, &mut decoder, &mut buffer),
        )
        .await
        {
            Ok(packet) => packet?,
            Err(_) => continue,
        };
        let Packet::Publish(publish) = packet else { continue };
        if publish.payload.len() >= PAYLOAD_HEADER_BYTES {
            let header = &publish.payload[..PAYLOAD_HEADER_BYTES];
            let publisher = u32::from_be_bytes(header[0..4].try_into()?);
            let seq = u64::from_be_bytes(header[4..12].try_into()?);
            let sent_us = u64::from_be_bytes(header[12..20].try_into()?);
            let now_us = start.elapsed().as_micros() as u64;
            if let Some(histogram) = seen.latency_us.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.as_mut() {
                let _ = histogram.record(now_us.saturating_sub(sent_us).max(1));
            }
            seen.unique.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert((publisher, seq));
        }
        seen.delivered.fetch_add(1, Ordering::Relaxed);
        if publish.qos != QoS::AtMostOnce {
            wharf_mqtt::encode(&Packet::PubAck(Ack::new(publish.packet_id, 0)), Version::V311, &mut acks);
            // Written in batches: whatever arrived in the same read goes out in one write.
            if buffer.is_empty() || acks.len() > 16 * 1024 {
                writer.write_all(&acks).await?;
                acks.clear();
            }
        }
    }
    if !acks.is_empty() {
        writer.write_all(&acks).await?;
    }
    Ok(())
}

/// Publishes QoS 1 until `stop`, keeping at most `window` awaiting PUBACK (or at `rate` msgs/s
/// when `paced`); returns the sequence numbers acknowledged.
async fn publisher(
    args: Args,
    index: u32,
    start: Instant,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    paced: bool,
) -> Result<Vec<u64>> {
    let client = Client::connect(&args, &format!("bench-publisher-{index}"), true).await?;
    let Client { mut reader, mut writer, mut decoder, mut buffer } = client;
    let window = Arc::new(tokio::sync::Semaphore::new(args.window.max(1)));
    let in_flight: Arc<Mutex<std::collections::HashMap<u16, u64>>> = Arc::default();
    let acknowledged: Arc<Mutex<Vec<u64>>> = Arc::default();
    let reading = {
        let (window, in_flight, acknowledged, acked, stop) = (
            Arc::clone(&window),
            Arc::clone(&in_flight),
            Arc::clone(&acknowledged),
            Arc::clone(&acked),
            Arc::clone(&stop),
        );
        tokio::spawn(async move {
            loop {
                let packet =
                    match tokio::time::timeout(Duration::from_secs(5), recv(&mut reader, &mut decoder, &mut buffer))
                        .await
                    {
                        Ok(Ok(packet)) => packet,
                        Ok(Err(_)) => return,
                        Err(_) if stop.load(Ordering::Relaxed) => return,
                        Err(_) => continue,
                    };
                if let Packet::PubAck(ack) = packet {
                    let seq = in_flight.lock().ok().and_then(|mut map| map.remove(&ack.packet_id));
                    if let (Some(seq), Ok(mut list)) = (seq, acknowledged.lock()) {
                        list.push(seq);
                        acked.fetch_add(1, Ordering::Relaxed);
                        window.add_permits(1);
                    }
                }
            }
        })
    };
    let topic = format!("bench/p{index}");
    let filler = vec![b'x'; args.payload_bytes.saturating_sub(PAYLOAD_HEADER_BYTES)];
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let mut next_at = Instant::now();
    let mut seq: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        if paced {
            tokio::time::sleep_until(next_at.into()).await;
            next_at += interval;
        }
        let Ok(permit) = tokio::time::timeout(Duration::from_millis(200), window.acquire()).await else { continue };
        permit?.forget();
        seq += 1;
        let packet_id = (seq % 65_535) as u16 + 1;
        in_flight.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert(packet_id, seq);
        let mut payload = Vec::with_capacity(args.payload_bytes.max(PAYLOAD_HEADER_BYTES));
        payload.extend_from_slice(&index.to_be_bytes());
        payload.extend_from_slice(&seq.to_be_bytes());
        payload.extend_from_slice(&(start.elapsed().as_micros() as u64).to_be_bytes());
        payload.extend_from_slice(&filler);
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.clone(),
            packet_id,
            properties: Properties::default(),
            payload: Bytes::from(payload),
        };
        let mut bytes = BytesMut::new();
        wharf_mqtt::encode(&Packet::Publish(publish), Version::V311, &mut bytes);
        writer.write_all(&bytes).await?;
    }
    // What is still awaiting PUBACK gets a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight.lock().map(|map| !map.is_empty()).unwrap_or(false) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reading.abort();
    let list = acknowledged.lock().map(|list| list.clone()).unwrap_or_default();
    Ok(list)
}

async fn run_traffic(args: Args, paced: bool) -> Result<()> {
    let start = Instant::now();
    let seen = Arc::new(Seen::default());
    if paced {
        *seen.latency_us.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(histogram()?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ready, subscribed) = tokio::sync::oneshot::channel();
    let subscribing = tokio::spawn(subscriber(args.clone(), start, Arc::clone(&seen), Arc::clone(&stop), ready));
    subscribed.await.context("the subscriber did not subscribe")?;
    let publishing_stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let publishers = if paced { 1 } else { args.publishers.max(1) };
    let mut tasks = Vec::new();
    for index in 0..publishers {
        tasks.push(tokio::spawn(publisher(
            args.clone(),
            index as u32,
            start,
            Arc::clone(&publishing_stop),
            Arc::clone(&acked),
            paced,
        )));
    }
    let measured_from = Instant::now();
    let (acked_before, delivered_before) = (acked.load(Ordering::Relaxed), seen.delivered.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(args.duration_s)).await;
    let elapsed_s = measured_from.elapsed().as_secs_f64();
    let published_per_s = (acked.load(Ordering::Relaxed) - acked_before) as f64 / elapsed_s;
    let delivered_per_s = (seen.delivered.load(Ordering::Relaxed) - delivered_before) as f64 / elapsed_s;
    publishing_stop.store(true, Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for (index, task) in tasks.into_iter().enumerate() {
        for seq in task.await?? {
            acknowledged.push((index as u32, seq));
        }
    }
    // Every acknowledged publish must arrive (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let missing = {
            let unique = seen.unique.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            acknowledged.iter().filter(|key| !unique.contains(key)).count()
        };
        if missing == 0 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::Relaxed);
    subscribing.await??;
    let latency = seen.latency_us.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.take();
    let percentiles = latency.map(|histogram| {
        format!(
            ", \"p50_us\": {}, \"p99_us\": {}, \"p999_us\": {}",
            histogram.value_at_quantile(0.5),
            histogram.value_at_quantile(0.99),
            histogram.value_at_quantile(0.999)
        )
    });
    println!(
        "{{\"label\": \"{}\", \"mode\": \"{}\", \"publishers\": {publishers}, \"window\": {}, \"payload_bytes\": {}, \"published_per_s\": {published_per_s:.0}, \"delivered_per_s\": {delivered_per_s:.0}, \"acknowledged\": {}, \"missing\": {missing}{}}}",
        args.label,
        args.mode,
        args.window,
        args.payload_bytes,
        acknowledged.len(),
        percentiles.unwrap_or_default()
    );
    if missing > 0 {
        bail!("{missing} acknowledged publishes were never delivered");
    }
    Ok(())
}

async fn run_idle(args: Args) -> Result<()> {
    let started = Instant::now();
    let mut clients = Vec::with_capacity(args.connections);
    for index in 0..args.connections {
        let mut client = Client::connect(&args, &format!("bench-device-{index:06}"), false).await?;
        client.subscribe(&format!("devices/{index}/commands")).await?;
        clients.push(client);
    }
    let connect_s = started.elapsed().as_secs_f64();
    println!(
        "{{\"label\": \"{}\", \"mode\": \"idle\", \"connections\": {}, \"connect_s\": {connect_s:.2}}}",
        args.label,
        clients.len()
    );
    // Held while the caller reads the broker's memory; answered pings keep them alive.
    tokio::time::sleep(Duration::from_secs(args.duration_s)).await;
    drop(clients);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match args.mode.as_str() {
        "throughput" => run_traffic(args, false).await,
        "latency" => run_traffic(args, true).await,
        _ => run_idle(args).await,
    }
}
