//! `telemetry-devices`: the device simulator on its own, against any MQTT broker (Wharf, RabbitMQ's MQTT
//! plugin, Mosquitto): N devices, each with its own client id and persistent session, publishing
//! readings at QoS 1; prints what was acknowledged.
//!
//! `cargo run --release -p telemetry --bin telemetry-devices -- --broker 127.0.0.1:1883 --devices 1000`

use clap::Parser;
use std::time::{Duration, Instant};
use telemetry::devices::{Fleet, simulate};

#[derive(Debug, Parser)]
struct Args {
    /// The broker's MQTT address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: std::net::SocketAddr,
    #[arg(long, default_value = "guest")]
    user: String,
    #[arg(long, default_value = "guest")]
    password: String,
    /// Devices publishing at once.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Readings each device publishes.
    #[arg(long, default_value_t = 20)]
    readings: u64,
    /// Pause between a device's readings, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    telemetry::init_logging("devices");
    let fleet = Fleet {
        broker: args.broker,
        user: args.user,
        password: args.password,
        readings: args.readings,
        interval: Duration::from_millis(args.interval_ms),
    };
    let started = Instant::now();
    let reports = simulate(fleet, args.devices).await;
    let acknowledged: u64 = reports.iter().map(|report| report.acknowledged).sum();
    let reconnects: u64 = reports.iter().map(|report| report.reconnects).sum();
    println!(
        "{} devices: {acknowledged} readings acknowledged in {:.1} s, {reconnects} reconnects",
        reports.len(),
        started.elapsed().as_secs_f64()
    );
}
