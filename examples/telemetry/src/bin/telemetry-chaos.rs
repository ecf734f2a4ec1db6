//! `telemetry-chaos`: the telemetry system under fire. The broker (Wharf, embedded, MQTT on) and the
//! ingestion and alerting services run as separate processes, the devices in this process. While they publish,
//! a random one of the three processes is SIGKILLed every few seconds and started again. Then it
//! waits for the system to go quiet and checks, from the services' databases and the alerts
//! queue: every reading the broker acknowledged is stored exactly once (and nothing is stored that
//! no device sent), and every reading over the threshold raised exactly one alert row and exactly
//! one alert message. Prints a report; exits non-zero on any violation.
//!
//! The services keep their data in SQLite files in the work directory, or, with
//! `--postgres-url`, in a new PostgreSQL database made for the run on that server.
//!
//! `cargo run --release -p telemetry --bin telemetry-chaos -- --devices 1000 --readings 20`

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use telemetry::devices::{self, DeviceReport, Fleet};
use telemetry::*;
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
#[command(name = "telemetry-chaos", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Devices publishing at once.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Readings each device publishes.
    #[arg(long, default_value_t = 20)]
    readings: u64,
    /// Pause between a device's readings, in milliseconds.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// A process is killed (SIGKILL) and restarted this often, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    kill_every_ms: u64,
    /// Seed for the choice of victims.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the processes keep their data (default: a new temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// How long to wait for the system to go quiet after the last reading, in seconds.
    #[arg(long, default_value_t = 180)]
    quiet_timeout_s: u64,
    /// A PostgreSQL server (`postgres://user:password@host:port/database`, a database to connect
    /// to for creating the run's own): the services keep their data in a new database there
    /// instead of SQLite files.
    #[arg(long, env = "TELEMETRY_CHAOS_POSTGRES_URL")]
    postgres_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Role {
    #[command(hide = true)]
    Broker {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        amqp_port: u16,
        #[arg(long)]
        mqtt_port: u16,
    },
    #[command(hide = true)]
    Ingestion {
        #[arg(long)]
        broker_url: String,
        #[arg(long)]
        database: Database,
    },
    #[command(hide = true)]
    Alerting {
        #[arg(long)]
        broker_url: String,
        #[arg(long)]
        database: Database,
    },
}

async fn run_broker(data_dir: PathBuf, amqp_port: u16, mqtt_port: u16) -> Result<()> {
    init_logging("broker");
    let mut config = wharf_broker::BrokerConfig::new(data_dir);
    config.amqp_listen = SocketAddr::from(([127, 0, 0, 1], amqp_port));
    config.mqtt.listen = Some(SocketAddr::from(([127, 0, 0, 1], mqtt_port)));
    let broker = wharf_broker::Broker::start(config).await?;
    terminated().await;
    broker.shutdown().await;
    Ok(())
}

/// A small deterministic random source (victims are reproducible from the seed).
struct Random(u64);

impl Random {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound.max(1)
    }
}

/// A process the chaos run manages.
struct Managed {
    name: &'static str,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    kills: u32,
    /// Times it exited without being killed (a crash: a violation).
    crashes: u32,
}

impl Managed {
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(std::env::current_exe()?)
            .args(&self.args)
            .env("WHARF_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
            self.kills += 1;
        }
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Starts it again if it died on its own (counted as a crash).
    async fn ensure_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            tracing::warn!(process = self.name, %status, "exited on its own; restarting");
            self.crashes += 1;
            self.child = None;
        }
        if self.child.is_none() {
            self.start()?;
        }
        Ok(())
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_for_port(port: u16) -> Result<()> {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("nothing listens on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Ready and unacknowledged messages in a queue (passive declare), or an error if the broker
/// cannot be asked now.
async fn queue_depth(url: &str, queue: &str) -> Result<u32> {
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await
    .context("connecting to the broker timed out")??;
    let channel = connection.create_channel().await?;
    let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let declared = channel.queue_declare(queue.into(), options, lapin::types::FieldTable::default()).await;
    let _ = connection.close(200, "checked".into()).await;
    Ok(declared?.message_count())
}

/// Takes every message off the alerts queue; returns how many came per message id.
async fn drain_alerts(url: &str) -> Result<HashMap<String, u32>> {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut by_id = HashMap::new();
    while let Some(message) =
        channel.basic_get(ALERTS_QUEUE.into(), lapin::options::BasicGetOptions { no_ack: true }).await?
    {
        let id = message.properties.message_id().as_ref().map(|id| id.to_string()).unwrap_or_default();
        *by_id.entry(id).or_insert(0) += 1;
    }
    let _ = connection.close(200, "drained".into()).await;
    Ok(by_id)
}

async fn orchestrate(args: RunArgs) -> Result<bool> {
    init_logging("chaos");
    let temporary = tempfile_dir()?;
    let dir = args.work_dir.clone().unwrap_or_else(|| temporary.clone());
    std::fs::create_dir_all(&dir)?;
    let (amqp_port, mqtt_port) = (free_port()?, free_port()?);
    let url = format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f");
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (ingestion_db, alerting_db) = match &args.postgres_url {
        None => (path("ingestion.db"), path("alerting.db")),
        Some(admin_url) => {
            let url = new_postgres_database(admin_url).await?;
            (url.clone(), url)
        }
    };
    let managed = |name: &'static str, args: Vec<String>| Managed {
        name,
        args,
        log: dir.join(format!("{name}.log")),
        child: None,
        kills: 0,
        crashes: 0,
    };
    let mut processes = vec![
        managed(
            "broker",
            vec![
                "broker".into(),
                "--data-dir".into(),
                path("broker"),
                "--amqp-port".into(),
                amqp_port.to_string(),
                "--mqtt-port".into(),
                mqtt_port.to_string(),
            ],
        ),
        managed(
            "ingestion",
            vec!["ingestion".into(), "--broker-url".into(), url.clone(), "--database".into(), ingestion_db.clone()],
        ),
        managed(
            "alerting",
            vec!["alerting".into(), "--broker-url".into(), url.clone(), "--database".into(), alerting_db.clone()],
        ),
    ];
    processes[0].start()?;
    wait_for_port(amqp_port).await?;
    wait_for_port(mqtt_port).await?;
    // The queues exist before any device publishes: a reading published before its queues
    // were bound would be routed nowhere (and 3.1.1 cannot tell the device so).
    declare_topology_when_up(&url).await?;
    for process in &mut processes[1..] {
        process.start()?;
    }
    let fleet = Fleet {
        broker: SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
        user: "guest".into(),
        password: "guest".into(),
        readings: args.readings,
        interval: Duration::from_millis(args.interval_ms),
    };
    let started = Instant::now();
    let simulation = tokio::spawn(devices::simulate(fleet, args.devices));
    tokio::pin!(simulation);
    let mut random = Random(args.seed.max(1));
    let reports: Vec<DeviceReport> = loop {
        tokio::select! {
            reports = &mut simulation => break reports?,
            () = tokio::time::sleep(Duration::from_millis(args.kill_every_ms)) => {
                let victim = random.below(processes.len() as u64) as usize;
                tracing::info!(victim = processes[victim].name, "SIGKILL");
                processes[victim].kill().await;
                processes[victim].start()?;
                for process in &mut processes {
                    process.ensure_running().await?;
                }
            }
        }
    };
    let published_s = started.elapsed().as_secs_f64();
    // Quiet: both queues empty and every alert relayed, twice in a row.
    let deadline = Instant::now() + Duration::from_secs(args.quiet_timeout_s);
    let ingestion_db: Database = ingestion_db.parse()?;
    let alerting_db: Database = alerting_db.parse()?;
    let alerting_pool = alerting_db.open().await?;
    let mut quiet_rounds = 0;
    while quiet_rounds < 2 {
        if Instant::now() > deadline {
            bail!("the system did not go quiet within {} s", args.quiet_timeout_s);
        }
        for process in &mut processes {
            process.ensure_running().await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ingestion = queue_depth(&url, INGESTION_QUEUE).await;
        let alerting = queue_depth(&url, ALERTING_QUEUE).await;
        let unsent = alerting_pool.integer("SELECT COUNT(*) FROM wharf_outbox WHERE status <> 1").await.unwrap_or(1);
        let quiet = matches!((ingestion, alerting), (Ok(0), Ok(0))) && unsent == 0;
        quiet_rounds = if quiet { quiet_rounds + 1 } else { 0 };
    }
    let alert_messages = drain_alerts(&url).await?;
    for process in &mut processes {
        process.stop().await;
    }
    let violations = check(&ingestion_db, &alerting_db, &reports, &alert_messages).await?;
    let acknowledged: u64 = reports.iter().map(|report| report.acknowledged).sum();
    let reconnects: u64 = reports.iter().map(|report| report.reconnects).sum();
    println!(
        "telemetry chaos: {} devices, {acknowledged} readings acknowledged in {published_s:.1} s, {reconnects} reconnects, {} alerts; kills: {}",
        reports.len(),
        alert_messages.len(),
        processes.iter().map(|process| format!("{} {}", process.name, process.kills)).collect::<Vec<_>>().join(", ")
    );
    let crashes: Vec<String> = processes
        .iter()
        .filter(|process| process.crashes > 0)
        .map(|process| {
            format!("{} exited on its own {} times (see {})", process.name, process.crashes, process.log.display())
        })
        .collect();
    let all: Vec<String> = violations.into_iter().chain(crashes).collect();
    for violation in &all {
        println!("VIOLATION: {violation}");
    }
    if all.is_empty() && args.work_dir.is_none() {
        let _ = std::fs::remove_dir_all(&temporary);
    }
    Ok(all.is_empty())
}

/// Creates a database for this run on the PostgreSQL server `admin_url` reaches; its URL.
async fn new_postgres_database(admin_url: &str) -> Result<String> {
    let name = format!("telemetry_chaos_{}", std::process::id());
    let admin = sqlx::PgPool::connect(admin_url).await.with_context(|| format!("connecting to {admin_url}"))?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}")).execute(&admin).await?;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await?;
    admin.close().await;
    let (server, _) = admin_url.rsplit_once('/').context("the PostgreSQL URL names no database")?;
    Ok(format!("{server}/{name}"))
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("wharf-telemetry-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The exactly-once checks, from the databases and the drained alerts.
async fn check(
    ingestion_db: &Database,
    alerting_db: &Database,
    reports: &[DeviceReport],
    alert_messages: &HashMap<String, u32>,
) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    let ingestion = ingestion_db.open().await?;
    let mut stored: BTreeMap<(String, u64), u32> = BTreeMap::new();
    for (device, seq) in ingestion.pairs("SELECT device, seq FROM readings").await? {
        *stored.entry((device, seq as u64)).or_insert(0) += 1;
    }
    let sent: HashMap<&str, &DeviceReport> = reports.iter().map(|report| (report.device.as_str(), report)).collect();
    for ((device, seq), copies) in &stored {
        if *copies > 1 {
            violations.push(format!("reading {device}/{seq} stored {copies} times"));
        }
        if sent.get(device.as_str()).is_none_or(|report| *seq > report.sent) {
            violations.push(format!("reading {device}/{seq} stored but never sent"));
        }
    }
    for report in reports {
        for seq in 1..=report.acknowledged {
            if !stored.contains_key(&(report.device.clone(), seq)) {
                violations.push(format!("reading {}/{seq} acknowledged by the broker but not stored", report.device));
            }
        }
    }
    let alerting = alerting_db.open().await?;
    let mut alert_rows: BTreeMap<(String, u64), u32> = BTreeMap::new();
    for (device, seq) in alerting.pairs("SELECT device, seq FROM alerts").await? {
        *alert_rows.entry((device, seq as u64)).or_insert(0) += 1;
    }
    let ids: HashMap<String, String> = alerting
        .blobs("SELECT id, body FROM wharf_outbox")
        .await?
        .into_iter()
        .filter_map(|(id, body)| {
            let alert: Alert = serde_json::from_slice(&body).ok()?;
            Some((alert.idempotency_key(), id))
        })
        .collect();
    for (device, seq) in stored.keys() {
        let reading = Reading::simulated(device, *seq);
        let key = (device.clone(), *seq);
        let rows = alert_rows.get(&key).copied().unwrap_or(0);
        let expected = u32::from(reading.crosses_threshold());
        if rows != expected {
            violations.push(format!(
                "reading {device}/{seq} (value {}) has {rows} alert rows, not {expected}",
                reading.value
            ));
        }
        if reading.crosses_threshold() {
            let id = ids.get(&reading.key());
            let messages = id.and_then(|id| alert_messages.get(id)).copied().unwrap_or(0);
            if messages != 1 {
                violations.push(format!("reading {device}/{seq} raised {messages} alert messages, not 1"));
            }
        }
    }
    let expected_messages =
        stored.keys().filter(|(device, seq)| Reading::simulated(device, *seq).crosses_threshold()).count();
    let total_messages: u32 = alert_messages.values().sum();
    if total_messages as usize != expected_messages {
        violations.push(format!("{total_messages} alert messages for {expected_messages} readings over the threshold"));
    }
    Ok(violations)
}

#[tokio::main]
async fn main() -> Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.role {
        Some(Role::Broker { data_dir, amqp_port, mqtt_port }) => run_broker(data_dir, amqp_port, mqtt_port).await?,
        Some(Role::Ingestion { broker_url, database }) => services::run_ingestion(&broker_url, &database).await?,
        Some(Role::Alerting { broker_url, database }) => services::run_alerting(&broker_url, &database).await?,
        None => {
            return Ok(if orchestrate(cli.run).await? {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            });
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
