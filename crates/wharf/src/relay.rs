//! `wharf relay`: the outbox relay as a process of its own, for services written in any language
//! (`docs/outbox-contract.md` is the table contract they write to). It runs `wharf-sdk`'s relay
//! over a PostgreSQL, MySQL or SQLite outbox, migrating the table first unless told not to. Settings come
//! from flags, `WHARF_RELAY_*` variables and the TOML file named by `--config`, with the same
//! precedence as `wharf serve` (flags, then variables, then the file, then the defaults).
//! SIGTERM and SIGINT stop it after the round in progress, so nothing it claimed waits out a lease.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::watch;
use wharf_sdk::{MySqlOutbox, Outbox, OutboxConfig, OutboxStore, PgOutbox, Relay, RelayConfig, SqliteOutbox};

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// TOML configuration file (keys as the flags, in snake_case).
    #[arg(long, env = "WHARF_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// The database holding the outbox: postgres://…, mysql://… or sqlite:PATH.
    #[arg(long, env = "WHARF_RELAY_DATABASE_URL")]
    database_url: Option<String>,
    /// The broker: amqp://user:password@host:port/vhost (amqps:// for TLS).
    #[arg(long, env = "WHARF_RELAY_BROKER_URL")]
    broker_url: Option<String>,
    /// The outbox table, `table` or `schema.table` [default: wharf_outbox].
    #[arg(long, env = "WHARF_RELAY_OUTBOX_TABLE")]
    outbox_table: Option<String>,
    /// The PostgreSQL NOTIFY channel writers signal [default: wharf_outbox].
    #[arg(long, env = "WHARF_RELAY_NOTIFY_CHANNEL")]
    notify_channel: Option<String>,
    /// Do not create or migrate the outbox table at start (a team's own migrations own it).
    #[arg(long, env = "WHARF_RELAY_NO_MIGRATE")]
    no_migrate: bool,
    /// Most rows claimed and published per round [default: 500].
    #[arg(long, env = "WHARF_RELAY_BATCH_SIZE")]
    batch_size: Option<i64>,
    /// How long a claim holds, in milliseconds [default: 60000].
    #[arg(long, env = "WHARF_RELAY_LEASE_MS")]
    lease_ms: Option<i64>,
    /// How long an idle relay waits before looking again, in milliseconds (PostgreSQL wakes it
    /// sooner on NOTIFY) [default: 1000].
    #[arg(long, env = "WHARF_RELAY_POLL_INTERVAL_MS")]
    poll_interval_ms: Option<u64>,
    /// How long sent rows are kept, in milliseconds [default: 3600000].
    #[arg(long, env = "WHARF_RELAY_RETENTION_MS")]
    retention_ms: Option<i64>,
    /// Log filter (tracing syntax) [default: info].
    #[arg(long, env = "WHARF_RELAY_LOG", default_value = "info")]
    pub log: String,
}

/// The TOML file's shape; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    broker_url: Option<String>,
    outbox_table: Option<String>,
    notify_channel: Option<String>,
    no_migrate: Option<bool>,
    batch_size: Option<i64>,
    lease_ms: Option<i64>,
    poll_interval_ms: Option<u64>,
    retention_ms: Option<i64>,
}

/// Everything the relay runs with, settled.
#[derive(Debug)]
struct Settings {
    database_url: String,
    outbox: OutboxConfig,
    migrate: bool,
    relay: RelayConfig,
}

fn settle(args: RelayArgs) -> Result<Settings> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let Some(database_url) = args.database_url.or(file.database_url) else {
        bail!(
            "--database-url (WHARF_RELAY_DATABASE_URL, database_url) is required: postgres://…, mysql://… or sqlite:PATH"
        );
    };
    let Some(broker_url) = args.broker_url.or(file.broker_url) else {
        bail!("--broker-url (WHARF_RELAY_BROKER_URL, broker_url) is required: amqp://user:password@host:port/vhost");
    };
    if !(broker_url.starts_with("amqp://") || broker_url.starts_with("amqps://")) {
        bail!("--broker-url must start with amqp:// or amqps://, not '{broker_url}'");
    }
    let defaults = OutboxConfig::default();
    let outbox = OutboxConfig {
        table: args.outbox_table.or(file.outbox_table).unwrap_or(defaults.table),
        notify_channel: args.notify_channel.or(file.notify_channel).unwrap_or(defaults.notify_channel),
    };
    let mut relay = RelayConfig::new(broker_url);
    if let Some(batch_size) = args.batch_size.or(file.batch_size) {
        relay.batch_size = batch_size;
    }
    if let Some(lease_ms) = args.lease_ms.or(file.lease_ms) {
        relay.lease_ms = lease_ms;
    }
    if let Some(poll_interval_ms) = args.poll_interval_ms.or(file.poll_interval_ms) {
        relay.poll_interval_ms = poll_interval_ms;
    }
    if let Some(retention_ms) = args.retention_ms.or(file.retention_ms) {
        relay.retention_ms = retention_ms;
    }
    if relay.batch_size < 1 || relay.lease_ms < 1 || relay.poll_interval_ms < 1 || relay.retention_ms < 0 {
        bail!("--batch-size, --lease-ms and --poll-interval-ms must be at least 1, --retention-ms at least 0");
    }
    let migrate = !(args.no_migrate || file.no_migrate.unwrap_or(false));
    Ok(Settings { database_url, outbox, migrate, relay })
}

/// Runs the relay until SIGTERM or SIGINT.
pub async fn run(args: RelayArgs) -> Result<()> {
    let settings = settle(args)?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; stopping after this round"),
            _ = terminate.recv() => tracing::info!("SIGTERM received; stopping after this round"),
        }
        let _ = stop.send(true);
    });
    let url = settings.database_url.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy(url)
            .context("--database-url is not a usable PostgreSQL URL")?;
        let outbox = PgOutbox::with_config(pool, &settings.outbox)?;
        relay(outbox, settings, stopped).await
    } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        let url = url.replacen("mariadb://", "mysql://", 1);
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_lazy(&url)
            .context("--database-url is not a usable MySQL URL")?;
        let outbox = MySqlOutbox::with_config(pool, &settings.outbox)?;
        relay(outbox, settings, stopped).await
    } else if let Some(path) = url.strip_prefix("sqlite:") {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .with_context(|| format!("--database-url is not a usable SQLite URL: {url}"))?
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        tracing::info!(path, "relaying a SQLite outbox");
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(2).connect_lazy_with(options);
        let outbox = SqliteOutbox::with_config(pool, &settings.outbox)?;
        relay(outbox, settings, stopped).await
    } else {
        bail!("--database-url must start with postgres://, postgresql://, mysql:// or sqlite:, not '{url}'")
    }
}

async fn relay<O: Outbox + OutboxStore>(outbox: O, settings: Settings, stopped: watch::Receiver<bool>) -> Result<()> {
    if settings.migrate {
        outbox.migrate().await.context("migrating the outbox table")?;
    }
    tracing::info!(table = %settings.outbox.table, broker = %redacted(&settings.relay.publisher.url), "relay started");
    Relay::new(outbox, settings.relay)?.run(stopped).await?;
    tracing::info!("relay stopped");
    Ok(())
}

/// A URL with its password left out, for logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(redacted("amqp://app:s3cret@127.0.0.1:5672/%2f"), "amqp://app:***@127.0.0.1:5672/%2f");
        assert_eq!(redacted("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
