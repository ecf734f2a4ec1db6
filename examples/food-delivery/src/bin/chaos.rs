//! `chaos`: the food-delivery system under fire. Starts the broker and the four services as
//! separate processes (each with its own data), places orders at a steady rate over HTTP (a share
//! of them with an item nobody sells), and every few seconds kills a random process, the broker
//! included, with SIGKILL and starts it again. When the orders are in, it waits for the system to
//! go quiet and checks, from the services' own databases, the payment provider's ledger and the
//! mailbox: every order charged exactly once, stock reserved exactly once per item, exactly one
//! email per order, every bad order in `inventory.dlq` with its reason, no message left in any
//! other queue, no outbox row unsent. Prints a report; exits non-zero on any violation.
//!
//! `cargo run --release -p food-delivery --bin chaos -- --orders 300`

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use food_delivery::services;
use food_delivery::*;
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
#[command(name = "chaos", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Orders to place.
    #[arg(long, default_value_t = 300)]
    orders: usize,
    /// Orders per second.
    #[arg(long, default_value_t = 25.0)]
    rate: f64,
    /// A process is killed (SIGKILL) and restarted this often, in milliseconds.
    #[arg(long, default_value_t = 2500)]
    kill_every_ms: u64,
    /// Share of orders with an item nobody sells (they must end in the dead-letter queue).
    #[arg(long, default_value_t = 0.05)]
    bad_share: f64,
    /// Seed for the choice of orders and victims.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the processes keep their data (default: a new temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// How long to wait for the system to go quiet after the last order, in seconds.
    #[arg(long, default_value_t = 180)]
    quiet_timeout_s: u64,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// The broker (Wharf, embedded), writing its counters for the report.
    #[command(hide = true)]
    Broker {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        counters_dir: PathBuf,
    },
    #[command(hide = true)]
    Order(services::order::Args),
    #[command(hide = true)]
    Payment(services::payment::Args),
    #[command(hide = true)]
    Inventory(services::inventory::Args),
    #[command(hide = true)]
    Email(services::email::Args),
}

/// A small deterministic random source (the run is reproducible from its seed).
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
    fn chance(&mut self, share: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < share
    }
}

async fn run_broker(data_dir: PathBuf, port: u16, counters_dir: PathBuf) -> Result<()> {
    let mut config = wharf_broker::BrokerConfig::new(data_dir);
    config.amqp_listen = SocketAddr::from(([127, 0, 0, 1], port));
    let broker = wharf_broker::Broker::start(config).await?;
    let path = counters_dir.join(format!("broker-{}.json", std::process::id()));
    let temporary = counters_dir.join(format!("broker-{}.tmp", std::process::id()));
    let terminated = terminated();
    tokio::pin!(terminated);
    let write = |broker: &wharf_broker::Broker| {
        let counters = broker.counters();
        let json = serde_json::json!({ "duplicates_dropped": counters.duplicates_dropped, "dead_lettered": counters.dead_lettered });
        if std::fs::write(&temporary, json.to_string()).is_ok() {
            let _ = std::fs::rename(&temporary, &path);
        }
    };
    loop {
        write(&broker);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = &mut terminated => break,
        }
    }
    write(&broker);
    broker.shutdown().await;
    Ok(())
}

/// A process the chaos run manages.
struct Managed {
    name: &'static str,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    kills: u32,
    /// Times it exited without being killed (a crash: reported as a violation).
    crashes: u32,
}

impl Managed {
    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(std::env::current_exe()?)
            .args(&self.args)
            .env("WHARF_LOG", "warn")
            // The services read it; the chaos run's databases are the SQLite files it checks.
            .env_remove("DATABASE_URL")
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

    /// Restarts it if it died on its own (it must not: that would be a crash to report).
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

#[derive(Debug, Clone)]
struct Placed {
    id: String,
    bad: bool,
    items: Vec<Item>,
}

/// Places one order, retrying (with the same id, so a retry never creates a second order) until
/// the order service answers: it may be down (killed) at any moment.
async fn place(http: SocketAddr, order: &Placed, customer: &str) -> Result<()> {
    let body = serde_json::json!({
        "id": order.id, "customer": customer, "restaurant": "Trattoria Wharf",
        "items": order.items, "total_cents": 1250 * order.items.len() as i64,
    })
    .to_string();
    let started = Instant::now();
    loop {
        match http::request(http, "POST", "/orders", Some(body.clone())).await {
            Ok((200 | 201, _)) => return Ok(()),
            Ok((status, text)) if (400..500).contains(&status) => bail!("order {} refused: {status} {text}", order.id),
            _ if started.elapsed() > Duration::from_secs(120) => bail!("order {} could not be placed", order.id),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Ready messages in a queue; `None` if it does not exist.
async fn queue_depth(url: &str, queue: &str) -> Result<Option<u32>> {
    let connection = connect(url).await?;
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            lapin::types::FieldTable::default(),
        )
        .await;
    let _ = connection.close(200, "checked".into()).await;
    match declared {
        Ok(declared) => Ok(Some(declared.message_count())),
        Err(error) if matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Connects to the broker, giving up after 10 s (a stalled broker must not hang the run).
async fn connect(url: &str) -> Result<lapin::Connection> {
    Ok(tokio::time::timeout(
        Duration::from_secs(10),
        lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
    )
    .await
    .context("connecting to the broker timed out")??)
}

async fn counter(pool: &sqlx::SqlitePool, name: &str) -> i64 {
    sqlx::query("SELECT value FROM counters WHERE name = ?")
        .bind(name)
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
        .map_or(0, |row| row.get("value"))
}

/// Everything that must hold once the system is quiet; the violations found (empty: all good).
async fn check(dir: &Path, url: &str, placed: &[Placed]) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    let all: BTreeSet<&str> = placed.iter().map(|order| order.id.as_str()).collect();
    let good: Vec<&Placed> = placed.iter().filter(|order| !order.bad).collect();
    let bad: BTreeSet<&str> = placed.iter().filter(|order| order.bad).map(|order| order.id.as_str()).collect();

    let ledger = open_sqlite(&dir.join("payment-provider.db")).await?;
    let mut charges: BTreeMap<String, i64> = BTreeMap::new();
    for row in sqlx::query("SELECT idempotency_key FROM charges").fetch_all(&ledger).await? {
        let key: String = row.get("idempotency_key");
        *charges.entry(key.trim_start_matches("order-").to_owned()).or_default() += 1;
    }
    for id in &all {
        match charges.get(*id) {
            Some(1) => {}
            Some(count) => violations.push(format!("order {id} charged {count} times")),
            None => violations.push(format!("order {id} never charged")),
        }
    }
    let payments = open_sqlite(&dir.join("payment-service.db")).await?;
    let paid: i64 = sqlx::query("SELECT COUNT(*) AS n FROM payments").fetch_one(&payments).await?.get("n");
    if paid != all.len() as i64 {
        violations.push(format!("{paid} payments recorded for {} orders", all.len()));
    }

    let inventory = open_sqlite(&dir.join("inventory-service.db")).await?;
    let mut reserved: BTreeMap<(String, String), i64> = BTreeMap::new();
    for row in sqlx::query("SELECT order_id, sku, quantity FROM reservations").fetch_all(&inventory).await? {
        reserved.insert((row.get("order_id"), row.get("sku")), row.get("quantity"));
    }
    for order in &good {
        let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
        for item in &order.items {
            *wanted.entry(item.sku.as_str()).or_default() += i64::from(item.quantity);
        }
        for (sku, quantity) in wanted {
            match reserved.get(&(order.id.clone(), sku.to_owned())) {
                Some(got) if *got == quantity => {}
                Some(got) => {
                    violations.push(format!("order {}: {got} of {sku} reserved, {quantity} ordered", order.id))
                }
                None => violations.push(format!("order {}: {sku} never reserved", order.id)),
            }
        }
    }
    if reserved.keys().any(|(order, _)| bad.contains(order.as_str())) {
        violations.push("stock reserved for an order with an unknown item".into());
    }

    let email = open_sqlite(&dir.join("email-service.db")).await?;
    let mailed: Vec<String> = sqlx::query("SELECT order_id FROM mailbox")
        .fetch_all(&email)
        .await?
        .iter()
        .map(|row| row.get("order_id"))
        .collect();
    let mailed_set: BTreeSet<&str> = mailed.iter().map(String::as_str).collect();
    if mailed.len() != mailed_set.len() {
        violations.push("an order was mailed twice".into());
    }
    for id in &all {
        if !mailed_set.contains(id) {
            violations.push(format!("order {id} never mailed"));
        }
    }

    let orders = open_sqlite(&dir.join("order-service.db")).await?;
    let unreported: i64 =
        sqlx::query("SELECT COUNT(*) AS n FROM orders WHERE payment IS NULL OR stock IS NULL OR email IS NULL")
            .fetch_one(&orders)
            .await?
            .get("n");
    if unreported > 0 {
        violations.push(format!("{unreported} orders still wait for a service's report"));
    }
    for (name, pool) in [
        ("order-service", &orders),
        ("payment-service", &payments),
        ("inventory-service", &inventory),
        ("email-service", &email),
    ] {
        let unsent: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM wharf_outbox WHERE status <> 1").fetch_one(pool).await?.get("n");
        if unsent > 0 {
            violations.push(format!("{name}: {unsent} outbox rows unsent"));
        }
    }

    // Each service's effects, counted in the same transaction as the effect: exactly one per
    // order (a second effect for an order would mean the inbox let a duplicate through).
    for (name, pool) in [("payment-service", &payments), ("inventory-service", &inventory), ("email-service", &email)] {
        let effects = counter(pool, "effects").await;
        if effects != all.len() as i64 {
            violations.push(format!("{name}: {effects} effects for {} orders", all.len()));
        }
    }
    for queue in [PAYMENT_QUEUE, INVENTORY_QUEUE, EMAIL_QUEUE, STATUS_QUEUE] {
        let depth = queue_depth(url, queue).await?.unwrap_or(0);
        if depth > 0 {
            violations.push(format!("{depth} messages left in {queue}"));
        }
        // A message that failed 20 times would sit in the queue's automatic dead-letter queue.
        let parked = queue_depth(url, &format!("{queue}.dlq")).await?.unwrap_or(0);
        if parked > 0 {
            violations.push(format!("{parked} messages in {queue}.dlq"));
        }
    }
    let parked = queue_depth(url, INVENTORY_DLQ).await?.unwrap_or(0);
    if parked as usize != bad.len() {
        violations.push(format!("{parked} messages in {INVENTORY_DLQ}, {} bad orders", bad.len()));
    }
    Ok(violations)
}

/// Reads the dead-letter queue (without taking anything off it) and checks every bad order is
/// there once, with its reason.
async fn check_dead_letters(url: &str, placed: &[Placed]) -> Result<Vec<String>> {
    use futures_lite::StreamExt;
    let bad: BTreeSet<&str> = placed.iter().filter(|order| order.bad).map(|order| order.id.as_str()).collect();
    let connection = connect(url).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(1000, lapin::options::BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            INVENTORY_DLQ.into(),
            "".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await?;
    let mut seen = BTreeMap::new();
    while seen.len() < bad.len() {
        let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await else { break };
        let delivery = delivery?;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let text = |name: &str| match headers.inner().get(name) {
            Some(lapin::types::AMQPValue::LongString(value)) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
            _ => String::new(),
        };
        *seen.entry(text("order-id")).or_insert_with(|| (0, text(FAILURE_REASON_HEADER))) = {
            let previous = seen.get(&text("order-id")).map_or(0, |(count, _)| *count);
            (previous + 1, text(FAILURE_REASON_HEADER))
        };
    }
    // Nothing is acknowledged: closing gives every message back to the queue.
    let _ = connection.close(200, "inspected".into()).await;
    let mut violations = Vec::new();
    for id in &bad {
        match seen.get(*id) {
            Some((1, reason)) if reason.starts_with("unknown item") => {}
            Some((count, reason)) => {
                violations.push(format!("bad order {id}: {count} dead letters, reason '{reason}'"))
            }
            None => violations.push(format!("bad order {id} is not in {INVENTORY_DLQ}")),
        }
    }
    Ok(violations)
}

fn percentile(sorted: &[i64], quantile: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * quantile).round() as usize]
}

async fn orchestrate(args: RunArgs) -> Result<bool> {
    let temp;
    let dir = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = std::env::temp_dir().join(format!("food-delivery-chaos-{}", std::process::id()));
            std::fs::create_dir_all(&temp)?;
            temp
        }
    };
    let broker_port = free_port()?;
    let http_port = free_port()?;
    let url = format!("amqp://guest:guest@127.0.0.1:{broker_port}/%2f");
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let log = |name: &str| dir.join(format!("{name}.log"));
    let managed = |name: &'static str, args: Vec<String>| Managed {
        name,
        args,
        log: log(name),
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
                "--port".into(),
                broker_port.to_string(),
                "--counters-dir".into(),
                path("."),
            ],
        ),
        managed(
            "order-service",
            vec![
                "order".into(),
                "--broker-url".into(),
                url.clone(),
                "--database".into(),
                path("order-service.db"),
                "--http".into(),
                format!("127.0.0.1:{http_port}"),
            ],
        ),
        managed(
            "payment-service",
            vec![
                "payment".into(),
                "--broker-url".into(),
                url.clone(),
                "--database".into(),
                path("payment-service.db"),
                "--provider".into(),
                path("payment-provider.db"),
            ],
        ),
        managed(
            "inventory-service",
            vec![
                "inventory".into(),
                "--broker-url".into(),
                url.clone(),
                "--database".into(),
                path("inventory-service.db"),
            ],
        ),
        managed(
            "email-service",
            vec!["email".into(), "--broker-url".into(), url.clone(), "--database".into(), path("email-service.db")],
        ),
    ];
    for process in &mut processes {
        process.start()?;
    }
    wait_for_port(broker_port).await?;
    wait_for_port(http_port).await?;
    eprintln!(
        "chaos: data in {}; placing {} orders at {}/s, killing a process every {} ms",
        dir.display(),
        args.orders,
        args.rate,
        args.kill_every_ms
    );

    let mut random = Random(args.seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut orders = Vec::with_capacity(args.orders);
    for index in 0..args.orders {
        let bad = random.chance(args.bad_share);
        let mut items: Vec<Item> = (0..1 + random.below(3))
            .map(|_| Item {
                sku: CATALOG[random.below(CATALOG.len() as u64) as usize].to_owned(),
                quantity: 1 + random.below(3) as u32,
            })
            .collect();
        if bad {
            items.push(Item { sku: "mystery-dish".into(), quantity: 1 });
        }
        orders.push(Placed { id: format!("o{}-{index}", args.seed), bad, items });
    }
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let placed: Arc<Mutex<usize>> = Arc::default();
    let placer = {
        let orders = orders.clone();
        let placed = Arc::clone(&placed);
        let interval = Duration::from_secs_f64(1.0 / args.rate.max(0.1));
        tokio::spawn(async move {
            let started = Instant::now();
            for (index, order) in orders.iter().enumerate() {
                tokio::time::sleep_until((started + interval * index as u32).into()).await;
                place(http, order, &format!("customer-{}", index % 17)).await?;
                *placed.lock().map_err(|_| anyhow::anyhow!("poisoned"))? += 1;
            }
            anyhow::Ok(())
        })
    };
    let started = Instant::now();
    let mut next_kill = Instant::now() + Duration::from_millis(args.kill_every_ms);
    // Victims in shuffled rounds: every process (the broker too) is killed once per round.
    let mut victims: Vec<usize> = Vec::new();
    while !placer.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
        for process in &mut processes {
            process.ensure_running().await?;
        }
        if Instant::now() >= next_kill {
            next_kill += Duration::from_millis(args.kill_every_ms);
            if victims.is_empty() {
                victims = (0..processes.len()).collect();
                for index in (1..victims.len()).rev() {
                    let other = random.below(index as u64 + 1) as usize;
                    victims.swap(index, other);
                }
            }
            let Some(victim) = victims.pop() else { continue };
            let process = &mut processes[victim];
            process.kill().await;
            eprintln!(
                "chaos: {:>6.1}s killed {} (orders placed: {})",
                started.elapsed().as_secs_f64(),
                process.name,
                placed.lock().map_or(0, |placed| *placed)
            );
            process.start()?;
        }
    }
    placer.await??;
    eprintln!(
        "chaos: {:>6.1}s all {} orders placed; waiting for the system to go quiet",
        started.elapsed().as_secs_f64(),
        orders.len()
    );
    let deadline = Instant::now() + Duration::from_secs(args.quiet_timeout_s);
    let mut violations;
    loop {
        for process in &mut processes {
            process.ensure_running().await?;
        }
        violations = match check(&dir, &url, &orders).await {
            Ok(found) => found,
            Err(error) => vec![format!("checking failed: {error:#}")],
        };
        if violations.is_empty() {
            // Quiet means it stays so: anything still in flight (a duplicate on its way) would
            // show in a second look a moment later.
            tokio::time::sleep(Duration::from_secs(2)).await;
            violations = match check(&dir, &url, &orders).await {
                Ok(found) => found,
                Err(error) => vec![format!("checking failed: {error:#}")],
            };
        }
        if violations.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if violations.is_empty() {
        violations.extend(check_dead_letters(&url, &orders).await?);
    }
    for process in &mut processes {
        process.stop().await;
        if process.crashes > 0 {
            violations.push(format!(
                "{} exited on its own {} times (see {})",
                process.name,
                process.crashes,
                process.log.display()
            ));
        }
    }

    // The report.
    let mut redeliveries = 0;
    let mut inbox_duplicates = 0;
    for name in ["order-service.db", "payment-service.db", "inventory-service.db", "email-service.db"] {
        let pool = open_sqlite(&dir.join(name)).await?;
        redeliveries += counter(&pool, "redeliveries").await;
        inbox_duplicates += counter(&pool, "inbox_duplicates").await;
    }
    let mut broker_duplicates = 0;
    for entry in std::fs::read_dir(&dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with("broker-")
            && entry.path().extension().is_some_and(|ext| ext == "json")
        {
            let counters: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(entry.path())?).unwrap_or_default();
            broker_duplicates += counters["duplicates_dropped"].as_i64().unwrap_or(0);
        }
    }
    let orders_db = open_sqlite(&dir.join("order-service.db")).await?;
    let email_db = open_sqlite(&dir.join("email-service.db")).await?;
    let mut placed_at = BTreeMap::new();
    for row in sqlx::query("SELECT id, created_at FROM orders").fetch_all(&orders_db).await? {
        placed_at.insert(row.get::<String, _>("id"), row.get::<i64, _>("created_at"));
    }
    let mut latencies: Vec<i64> = sqlx::query("SELECT order_id, sent_at FROM mailbox")
        .fetch_all(&email_db)
        .await?
        .iter()
        .filter_map(|row| Some(row.get::<i64, _>("sent_at") - placed_at.get(&row.get::<String, _>("order_id"))?))
        .collect();
    latencies.sort_unstable();
    println!("food-delivery chaos run (seed {})", args.seed);
    println!("  orders: {} ({} with an unknown item)", orders.len(), orders.iter().filter(|order| order.bad).count());
    println!(
        "  kills: {}",
        processes.iter().map(|process| format!("{} {}", process.name, process.kills)).collect::<Vec<_>>().join(", ")
    );
    println!("  redeliveries seen by services: {redeliveries}");
    println!("  duplicates suppressed: by the broker {broker_duplicates}, by inboxes {inbox_duplicates}");
    println!(
        "  order placed -> confirmation mailed: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0)
    );
    if violations.is_empty() {
        println!(
            "  result: every order charged once, stocked once, mailed once; bad orders dead-lettered with their reason"
        );
        if args.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(true)
    } else {
        println!("  VIOLATIONS ({}), data kept in {}:", violations.len(), dir.display());
        for violation in violations.iter().take(50) {
            println!("    {violation}");
        }
        Ok(false)
    }
}

#[tokio::main]
async fn main() -> Result<std::process::ExitCode> {
    let cli = Cli::parse();
    match cli.role {
        Some(Role::Broker { data_dir, port, counters_dir }) => {
            init_logging("broker");
            run_broker(data_dir, port, counters_dir).await?;
        }
        Some(Role::Order(args)) => services::order::run(args).await?,
        Some(Role::Payment(args)) => services::payment::run(args).await?,
        Some(Role::Inventory(args)) => services::inventory::run(args).await?,
        Some(Role::Email(args)) => services::email::run(args).await?,
        None => {
            init_logging("chaos");
            return Ok(if orchestrate(cli.run).await? {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            });
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
