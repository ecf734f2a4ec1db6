//! `telemetry-ingestion`: stores every reading exactly once (see `telemetry::services::Ingestion`).
//!
//! `cargo run -p telemetry --bin telemetry-ingestion -- --broker-url amqp://guest:guest@127.0.0.1:5672/%2f`

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "BROKER_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker_url: String,
    /// The service's database: a SQLite file, or a PostgreSQL database's `postgres://` URL.
    #[arg(long, env = "DATABASE", default_value = "ingestion.db")]
    database: telemetry::Database,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::services::run_ingestion(&args.broker_url, &args.database).await
}
