//! [`Wharf::builder`]: one place that starts what a service runs (migrations, relays, inbox
//! purgers, consumers) and one shutdown that drains them all.
//!
//! `start` runs every migration first and fails fast on any, before anything consumes or
//! publishes. `shutdown` tells every task at once: consumers cancel and let their in-flight
//! handlers finish and settle, relays finish the round in progress (its rows end sent, failed or
//! given back), purgers stop. It then waits for all of them and reports the first error.

use crate::consumer::{ConsumerConfig, Handler, run_consumer};
use crate::inbox::{INBOX_RETENTION_MS_DEFAULT, Inbox, purge_inbox_periodically};
use crate::observe::Health;
use crate::outbox::Outbox;
use crate::relay::{Relay, RelayConfig};
use crate::{Result, SdkError};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

type Task = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
type Starter = Box<dyn FnOnce(watch::Receiver<bool>) -> Task + Send>;

/// How often inbox entries past their retention are deleted.
const PURGE_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// What a service runs, started together and stopped together.
pub struct WharfBuilder {
    broker_url: String,
    migrate: bool,
    /// The first setting found wrong while building, reported by `start`.
    refused: Option<SdkError>,
    migrations: Vec<Task>,
    starters: Vec<(String, Starter)>,
    health: Vec<(String, Health)>,
}

impl std::fmt::Debug for WharfBuilder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.starters.iter().map(|(name, _)| name.as_str()).collect();
        formatter.debug_struct("WharfBuilder").field("tasks", &names).finish_non_exhaustive()
    }
}

/// The running service: its tasks, their health, and the shutdown.
#[derive(Debug)]
pub struct Wharf {
    stop: watch::Sender<bool>,
    tasks: JoinSet<(String, Result<()>)>,
    health: Vec<(String, Health)>,
}

impl Wharf {
    /// A builder for a service that talks to the broker at `broker_url`.
    pub fn builder(broker_url: impl Into<String>) -> WharfBuilder {
        WharfBuilder {
            broker_url: broker_url.into(),
            migrate: true,
            refused: None,
            migrations: Vec::new(),
            starters: Vec::new(),
            health: Vec::new(),
        }
    }

    /// Each relay's and consumer's health, by name (`relay:<table>`, `consumer:<queue>`).
    pub fn health(&self) -> &[(String, Health)] {
        &self.health
    }

    /// True when every relay and consumer is up.
    pub fn is_healthy(&self) -> bool {
        self.health.iter().all(|(_, health)| health.is_up())
    }

    /// Stops everything and waits for it: in-flight handlers finish and settle, relays finish
    /// their round. Returns the first task's error, if any failed.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        let mut first_error = None;
        while let Some(joined) = self.tasks.join_next().await {
            let failure = match joined {
                Ok((_, Ok(()))) => None,
                Ok((name, Err(error))) => Some(SdkError::Config(format!("{name} failed: {error}"))),
                Err(error) => Some(SdkError::Config(format!("a task panicked or was cancelled: {error}"))),
            };
            if let Some(failure) = failure {
                tracing::error!(%failure, "a task ended with an error");
                first_error.get_or_insert(failure);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl WharfBuilder {
    /// An outbox: migrated at start, relayed with the defaults of [`RelayConfig::new`].
    pub fn outbox<O: Outbox>(self, outbox: O) -> WharfBuilder {
        let config = RelayConfig::new(self.broker_url.clone());
        self.outbox_with(outbox, config)
    }

    /// Leaves the tables alone at start: for teams whose own migration tool applies the SDK's
    /// files (running both would apply an `ALTER TABLE` twice).
    pub fn without_migrations(mut self) -> WharfBuilder {
        self.migrate = false;
        self
    }

    /// An outbox with its relay's own settings (checked now; a bad one fails `start`).
    pub fn outbox_with<O: Outbox>(mut self, outbox: O, config: RelayConfig) -> WharfBuilder {
        let name = format!("relay:{}", outbox.table_name());
        self.health.push((name.clone(), config.health.clone()));
        let migrating = outbox.clone();
        self.migrations.push(Box::pin(async move { migrating.migrate().await }));
        match Relay::new(outbox, config) {
            Ok(relay) => self
                .starters
                .push((name, Box::new(move |stopped| Box::pin(async move { relay.run(stopped).await }) as Task))),
            Err(error) => {
                self.refused.get_or_insert(error);
            }
        }
        self
    }

    /// An inbox: migrated at start, its entries past [`INBOX_RETENTION_MS_DEFAULT`] deleted
    /// hourly.
    pub fn inbox<I: Inbox>(mut self, inbox: I) -> WharfBuilder {
        let migrating = inbox.clone();
        self.migrations.push(Box::pin(async move { migrating.migrate().await }));
        self.starters.push((
            "inbox purger".into(),
            Box::new(move |stopped| {
                Box::pin(async move {
                    purge_inbox_periodically(inbox, INBOX_RETENTION_MS_DEFAULT, PURGE_INTERVAL, stopped).await;
                    Ok(())
                }) as Task
            }),
        ));
        self
    }

    /// A consumer: `handler` on `config.queue` (its settings checked now; a bad one fails
    /// `start`).
    pub fn consumer<H: Handler>(mut self, config: ConsumerConfig, handler: H) -> WharfBuilder {
        if config.concurrency == 0 || config.prefetch == 0 {
            self.refused.get_or_insert(SdkError::Config(format!(
                "consumer of '{}': concurrency and prefetch must be at least 1",
                config.queue
            )));
            return self;
        }
        let name = format!("consumer:{}", config.queue);
        self.health.push((name.clone(), config.health.clone()));
        self.starters.push((
            name,
            Box::new(move |stopped| Box::pin(async move { run_consumer(config, handler, stopped).await }) as Task),
        ));
        self
    }

    /// Runs every migration, then starts every task; refuses to start on a bad setting.
    pub async fn start(self) -> Result<Wharf> {
        if let Some(refused) = self.refused {
            return Err(refused);
        }
        if self.migrate {
            for migration in self.migrations {
                migration.await?;
            }
        }
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for (name, start) in self.starters {
            let task = start(stopped.clone());
            tasks.spawn(async move { (name, task.await) });
        }
        Ok(Wharf { stop, tasks, health: self.health })
    }
}
