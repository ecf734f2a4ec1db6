//! The device simulator: N devices, each its own MQTT 3.1.1 connection with its own client id and
//! a persistent session, publishing its readings one after the other at QoS 1. A device counts
//! a reading as delivered only when the broker acknowledged it (PUBACK, sent once the reading is
//! on disk); if the connection breaks first (the broker was killed), it reconnects with backoff
//! and publishes the same reading again, marked DUP, which is why the services' inboxes key on
//! the reading's identity. Speaks MQTT through `wharf-mqtt`'s codec, so it knows exactly which
//! reading each PUBACK is for.

use crate::Reading;
use anyhow::{Context, Result, bail};
use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wharf_mqtt::{Connect, Decoder, Packet, Properties, Publish, QoS, Version};

/// The longest a device waits for an answer before it takes the connection for broken.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// How the devices run.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub broker: SocketAddr,
    pub user: String,
    pub password: String,
    /// Readings each device publishes.
    pub readings: u64,
    /// Pause between a device's readings.
    pub interval: Duration,
}

/// What a device did.
#[derive(Debug, Clone, Default)]
pub struct DeviceReport {
    pub device: String,
    /// Readings 1..=acknowledged were acknowledged by the broker.
    pub acknowledged: u64,
    /// The highest reading sent at all (one more than acknowledged if the last one's PUBACK
    /// never came).
    pub sent: u64,
    /// Connections it had to open again.
    pub reconnects: u64,
}

/// The device id of the `index`th device.
pub fn device_id(index: usize) -> String {
    format!("device-{index:05}")
}

struct Connection {
    stream: TcpStream,
    decoder: Decoder,
    buffer: BytesMut,
}

impl Connection {
    async fn open(fleet: &Fleet, device: &str) -> Result<Connection> {
        let stream = tokio::time::timeout(ANSWER_WAIT, TcpStream::connect(fleet.broker)).await??;
        let _ = stream.set_nodelay(true);
        let mut connection =
            Connection { stream, decoder: Decoder::new(wharf_mqtt::PACKET_BYTES_MAX_DEFAULT), buffer: BytesMut::new() };
        connection.decoder.set_version(Version::V311);
        connection
            .send(&Packet::Connect(Box::new(Connect {
                version: Version::V311,
                client_id: device.to_owned(),
                clean_start: false,
                keep_alive_s: 30,
                username: Some(fleet.user.clone()),
                password: Some(Bytes::copy_from_slice(fleet.password.as_bytes())),
                will: None,
                properties: Properties::default(),
            })))
            .await?;
        match connection.recv().await? {
            Packet::ConnAck(ack) if ack.reason == 0 => Ok(connection),
            Packet::ConnAck(ack) => bail!("CONNACK refused with {:#x}", ack.reason),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, packet: &Packet) -> Result<()> {
        let mut bytes = BytesMut::new();
        wharf_mqtt::encode(packet, Version::V311, &mut bytes);
        self.stream.write_all(&bytes).await.context("writing")
    }

    async fn recv(&mut self) -> Result<Packet> {
        loop {
            if let Some(packet) = self.decoder.decode(&mut self.buffer)? {
                return Ok(packet);
            }
            let read = tokio::time::timeout(ANSWER_WAIT, self.stream.read_buf(&mut self.buffer))
                .await
                .context("no answer")??;
            if read == 0 {
                bail!("the broker closed the connection");
            }
        }
    }
}

/// Runs one device to its last reading.
pub async fn run_device(fleet: Arc<Fleet>, index: usize) -> DeviceReport {
    let device = device_id(index);
    let mut report = DeviceReport { device: device.clone(), ..DeviceReport::default() };
    let mut connection: Option<Connection> = None;
    let mut backoff = Duration::from_millis(50);
    let mut seq = 1;
    let mut dup = false;
    while seq <= fleet.readings {
        let open = match connection.take() {
            Some(open) => Ok(open),
            None => Connection::open(&fleet, &device).await,
        };
        let mut open = match open {
            Ok(open) => open,
            Err(error) => {
                tracing::debug!(%device, %error, "connect failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                report.reconnects += 1;
                continue;
            }
        };
        let reading = Reading::simulated(&device, seq);
        let packet_id = (seq % u64::from(u16::MAX)) as u16 + 1;
        let publish = Packet::Publish(Publish {
            dup,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: crate::reading_topic(&device),
            packet_id,
            properties: Properties::default(),
            payload: Bytes::from(serde_json::to_vec(&reading).unwrap_or_default()),
        });
        report.sent = report.sent.max(seq);
        let acknowledged = async {
            open.send(&publish).await?;
            loop {
                match open.recv().await? {
                    Packet::PubAck(ack) if ack.packet_id == packet_id => return Ok::<_, anyhow::Error>(()),
                    _ => continue,
                }
            }
        }
        .await;
        match acknowledged {
            Ok(()) => {
                report.acknowledged = seq;
                seq += 1;
                dup = false;
                backoff = Duration::from_millis(50);
                connection = Some(open);
                if !fleet.interval.is_zero() {
                    tokio::time::sleep(fleet.interval).await;
                }
            }
            Err(error) => {
                tracing::debug!(%device, seq, %error, "publish not acknowledged; reconnecting");
                // The same reading again: the broker may have it already.
                dup = true;
                report.reconnects += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    if let Some(mut open) = connection {
        let _ = open.send(&Packet::Disconnect(wharf_mqtt::Disconnect::new(0))).await;
    }
    report
}

/// Runs `devices` devices at once (their starts spread over a second, so they do not all shake
/// hands at the same moment) and returns what each did.
pub async fn simulate(fleet: Fleet, devices: usize) -> Vec<DeviceReport> {
    let fleet = Arc::new(fleet);
    let spread = Duration::from_millis(1000) / (devices.max(1) as u32);
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..devices {
        let fleet = Arc::clone(&fleet);
        tasks.spawn(async move {
            tokio::time::sleep(spread * index as u32).await;
            run_device(fleet, index).await
        });
    }
    let mut reports = Vec::with_capacity(devices);
    while let Some(report) = tasks.join_next().await {
        if let Ok(report) = report {
            reports.push(report);
        }
    }
    reports.sort_by(|a, b| a.device.cmp(&b.device));
    reports
}
