//! [`Relay`]: the task that moves outbox rows to the broker. It claims pending rows, publishes
//! them with confirms, and marks them sent only after the broker confirmed them; rows it cannot
//! publish (unknown exchange, body too large) are marked failed with the reason; rows whose
//! publish did not go through are given back for another attempt. Sent rows are deleted after a
//! retention period.
//!
//! What a crash does: a relay killed between publish and mark leaves its rows claimed; when the
//! claim lease runs out they are published again with the same message ids, so a de-duplicating
//! broker drops the copies (and without one, the consumer's inbox does). A database that goes
//! away makes the relay retry with backoff and log; no row is ever skipped.

use crate::event::Event;
use crate::outbox::{OutboxRow, OutboxStore, now_ms};
use crate::publisher::{ConfirmedPublisher, PublisherConfig};
use crate::{Result, SdkError};
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::watch;
use tracing::Instrument;

/// How a relay works.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The broker.
    pub publisher: PublisherConfig,
    /// Most rows claimed (and published) per round.
    pub batch_size: i64,
    /// How long a claim holds: a relay that dies holding rows loses them after this.
    pub lease_ms: i64,
    /// How long the relay waits for work when the outbox is empty (on PostgreSQL it is woken
    /// sooner by the `enqueue` notification; this is the fallback).
    pub poll_interval_ms: u64,
    /// Sent rows are deleted after this long.
    pub retention_ms: i64,
    /// How often sent rows past their retention are looked for.
    pub housekeeping_interval_ms: i64,
    /// Largest body the broker takes (the relay marks larger rows failed instead of having the
    /// broker close its channel).
    pub message_bytes_max: usize,
    /// After the broker refused a row this many times (nacked it, or no queue took it), the row
    /// is marked failed.
    pub refusals_max: i32,
    /// Up after each round that went through, down with the error after one that failed.
    pub health: crate::observe::Health,
}

impl RelayConfig {
    /// Defaults: batches of 500, a 60 s lease (longer than the publisher's reconnection attempts
    /// take), a 1 s poll fallback, sent rows kept 1 hour (looked for every minute), 128 MiB bodies
    /// (the broker's default limit), 20 refusals.
    pub fn new(url: impl Into<String>) -> RelayConfig {
        RelayConfig {
            publisher: PublisherConfig::new(url),
            batch_size: 500,
            lease_ms: 60_000,
            poll_interval_ms: 1_000,
            retention_ms: 60 * 60 * 1000,
            housekeeping_interval_ms: 60_000,
            message_bytes_max: 128 * 1024 * 1024,
            refusals_max: 20,
            health: crate::observe::Health::new(),
        }
    }
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RoundReport {
    /// Rows confirmed and marked sent.
    pub sent: usize,
    /// Rows marked failed.
    pub failed: usize,
    /// Rows given back for another attempt.
    pub released: usize,
}

/// The relay.
#[derive(Debug)]
pub struct Relay<S: OutboxStore> {
    store: S,
    config: RelayConfig,
    id: String,
    publisher: ConfirmedPublisher,
    known_exchanges: HashSet<String>,
}

impl<S: OutboxStore> Relay<S> {
    /// A relay over `store`.
    pub fn new(store: S, config: RelayConfig) -> Result<Relay<S>> {
        if config.batch_size < 1 || config.lease_ms < 1 {
            return Err(SdkError::Config("the relay's batch size and lease must be at least 1".into()));
        }
        let publisher = ConfirmedPublisher::new(config.publisher.clone())?;
        Ok(Relay { store, config, id: uuid::Uuid::now_v7().to_string(), publisher, known_exchanges: HashSet::new() })
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs until `shutdown` turns true (or its sender is dropped): rounds back to back while
    /// there is work, waiting for work otherwise, backing off on errors (database or broker
    /// unreachable). A stop lets the round in progress finish: its rows end marked sent or
    /// failed, or given back.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut failures = 0u32;
        let mut last_purge_ms = 0;
        let mut last_stats_ms = 0;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let now = now_ms();
            if now - last_purge_ms >= self.config.housekeeping_interval_ms {
                last_purge_ms = now;
                match self.store.purge_sent(now - self.config.retention_ms).await {
                    Ok(purged) if purged > 0 => tracing::debug!(purged, "outbox rows past retention deleted"),
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "purging sent outbox rows failed"),
                }
            }
            // A round is not cut short by a stop: it ends with its rows marked sent, failed or
            // given back, so nothing this relay claimed waits out its lease. A round is bounded
            // (the publisher's timeouts and reconnection attempts).
            let span = tracing::debug_span!("wharf.relay.round", claimed = tracing::field::Empty);
            let round = self.round().instrument(span).await;
            match &round {
                Ok(_) => self.config.health.up(),
                Err(error) => self.config.health.down(error.to_string()),
            }
            // The gauges at most once a second: a query each round would cost throughput.
            let now = now_ms();
            if now - last_stats_ms >= 1_000 {
                last_stats_ms = now;
                match self.store.stats().await {
                    Ok(Some(stats)) => crate::observe::outbox_stats(&self.store.table_name(), stats, now),
                    Ok(None) => {}
                    Err(error) => tracing::debug!(%error, "reading the outbox's gauges failed"),
                }
            }
            let wait = match round {
                Ok(report) if report.sent + report.failed + report.released > 0 => {
                    failures = 0;
                    if report.released > 0 {
                        // Something did not go through: do not spin on it.
                        Duration::from_millis(self.config.poll_interval_ms.min(200))
                    } else {
                        continue;
                    }
                }
                Ok(_) => {
                    failures = 0;
                    let idle = Duration::from_millis(self.config.poll_interval_ms)
                        .min(Duration::from_millis(self.config.housekeeping_interval_ms.max(1) as u64));
                    tokio::select! {
                        () = self.store.wait_for_work(idle) => {}
                        _ = stopped(&mut shutdown) => return Ok(()),
                    }
                    continue;
                }
                Err(error) => {
                    failures += 1;
                    let backoff_ms = (100u64 << failures.min(9)).min(30_000);
                    tracing::warn!(%error, backoff_ms, "outbox relay round failed; retrying");
                    Duration::from_millis(backoff_ms)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = stopped(&mut shutdown) => return Ok(()),
            }
        }
    }

    /// One round: claim, check, publish, mark.
    pub async fn round(&mut self) -> Result<RoundReport> {
        let rows = self.store.claim(&self.id, now_ms(), self.config.lease_ms, self.config.batch_size).await?;
        tracing::Span::current().record("claimed", rows.len());
        let mut report = RoundReport::default();
        if rows.is_empty() {
            return Ok(report);
        }
        let mut publishable: Vec<OutboxRow> = Vec::with_capacity(rows.len());
        let mut given_back = Vec::new();
        for row in rows {
            match self.problem(&row.event).await {
                Ok(None) => publishable.push(row),
                Ok(Some(reason)) => {
                    tracing::error!(id = %row.event.id, %reason, "outbox event cannot be published; marked failed");
                    self.store.mark_failed(row.seq, &reason).await?;
                    report.failed += 1;
                }
                Err(error) => {
                    // Broker unreachable while checking: try again later.
                    given_back.push(row.seq);
                    tracing::warn!(%error, "could not check an exchange");
                }
            }
        }
        let events: Vec<Event> = publishable.iter().map(|row| row.event.clone()).collect();
        let outcomes = self.publisher.publish_all(&events).await;
        let mut sent = Vec::new();
        let mut suspects = Vec::new();
        for (row, outcome) in publishable.iter().zip(outcomes) {
            match outcome {
                Ok(()) => sent.push(row.seq),
                Err(SdkError::Refused { .. }) => suspects.push(row),
                Err(error @ (SdkError::Nacked { .. } | SdkError::Unroutable { .. })) => {
                    if self.refuse(row, &error.to_string()).await? {
                        report.failed += 1;
                    } else {
                        report.released += 1;
                    }
                }
                Err(error) => {
                    tracing::warn!(id = %row.event.id, %error, "publish did not go through; will retry");
                    given_back.push(row.seq);
                }
            }
        }
        // The broker closed the channel over one of these, not knowing which: one at a time,
        // the refusal falls on the row that causes it.
        if !suspects.is_empty() {
            self.known_exchanges.clear();
            for row in suspects {
                match self.publisher.publish(&row.event).await {
                    Ok(()) => sent.push(row.seq),
                    Err(SdkError::Refused { code, text }) => {
                        let reason = format!("the broker refused it: {code} {text}");
                        tracing::error!(id = %row.event.id, %reason, "outbox event cannot be published; marked failed");
                        self.store.mark_failed(row.seq, &reason).await?;
                        report.failed += 1;
                    }
                    Err(error @ (SdkError::Nacked { .. } | SdkError::Unroutable { .. })) => {
                        if self.refuse(row, &error.to_string()).await? {
                            report.failed += 1;
                        } else {
                            report.released += 1;
                        }
                    }
                    Err(_) => given_back.push(row.seq),
                }
            }
        }
        // Marked sent only now that the broker confirmed them. If this fails (or the process
        // dies first), the lease runs out and they are published again: at least once.
        let marked_ms = now_ms();
        self.store.mark_sent(&sent, marked_ms).await?;
        report.sent = sent.len();
        let created: Vec<i64> =
            publishable.iter().filter(|row| sent.contains(&row.seq)).map(|row| row.created_at_ms).collect();
        crate::observe::relayed(&created, report.failed, marked_ms);
        self.store.release(&self.id, &given_back).await?;
        report.released += given_back.len();
        Ok(report)
    }

    async fn refuse(&self, row: &OutboxRow, reason: &str) -> Result<bool> {
        let failed = self.store.refuse(row.seq, reason, self.config.refusals_max).await?;
        if failed {
            tracing::error!(id = %row.event.id, %reason, "outbox event refused too often; marked failed");
        } else {
            tracing::warn!(id = %row.event.id, %reason, "the broker refused an outbox event; will retry");
        }
        Ok(failed)
    }

    /// Why an event can never be published, if it cannot.
    async fn problem(&mut self, event: &Event) -> Result<Option<String>> {
        if let Err(SdkError::Invalid { reason, .. }) = event.check() {
            return Ok(Some(reason));
        }
        if event.body.len() > self.config.message_bytes_max {
            return Ok(Some(format!(
                "body of {} bytes is larger than the broker's limit of {} bytes",
                event.body.len(),
                self.config.message_bytes_max
            )));
        }
        if !self.known_exchanges.contains(&event.exchange) {
            if !self.publisher.exchange_exists(&event.exchange).await? {
                return Ok(Some(format!("unknown exchange '{}'", event.exchange)));
            }
            self.known_exchanges.insert(event.exchange.clone());
        }
        Ok(None)
    }
}

/// Resolves once `shutdown` is true or its sender is gone (either way: stop).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
