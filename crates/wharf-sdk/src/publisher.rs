//! [`ConfirmedPublisher`]: publishes with publisher confirms, a bounded number unconfirmed at a
//! time, and survives connection losses: after reconnecting it publishes again every event not
//! yet confirmed, with the same message id, so a broker that de-duplicates (or a consumer's
//! inbox) drops the copy of one that had arrived after all.

use crate::event::{Event, ORDERING_KEY_HEADER};
use crate::{Result, SdkError};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::VecDeque;
use std::time::Duration;

/// The longest wait for a connection, or for one confirm, before the connection counts as lost.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// A channel-level refusal from the broker (its reply code and text), if `error` is one.
fn refusal(error: &lapin::Error) -> Option<(u16, String)> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403..=406) => {
            Some((amqp.get_id(), amqp.to_string()))
        }
        _ => None,
    }
}

fn classify(error: lapin::Error) -> SdkError {
    match refusal(&error) {
        Some((code, text)) => SdkError::Refused { code, text },
        None => SdkError::Amqp(error),
    }
}

/// How the publisher connects and paces itself.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// The broker's AMQP URL.
    pub url: String,
    /// Most messages published and not yet confirmed.
    pub window: usize,
    /// Reconnection attempts for one call before it gives up on the events still unconfirmed.
    pub reconnect_attempts_max: u32,
    /// The longest wait between reconnection attempts (they back off exponentially from 50 ms).
    pub reconnect_delay_ms_max: u64,
}

impl PublisherConfig {
    /// Defaults: a window of 1,000, 5 reconnection attempts, backing off up to 5 s.
    pub fn new(url: impl Into<String>) -> PublisherConfig {
        PublisherConfig { url: url.into(), window: 1000, reconnect_attempts_max: 5, reconnect_delay_ms_max: 5000 }
    }
}

/// A publisher with confirms and reconnection.
#[derive(Debug)]
pub struct ConfirmedPublisher {
    config: PublisherConfig,
    open: Option<(Connection, Channel)>,
}

/// The AMQP properties an event is published with: persistent, its id as `message-id`, its
/// headers (and ordering key) as string headers.
pub(crate) fn properties(event: &Event) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in &event.headers {
        if let Ok(name) = lapin::types::ShortString::try_new(name.as_str()) {
            headers.insert(name, AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())));
        }
    }
    if let Some(key) = &event.ordering_key {
        headers.insert(ORDERING_KEY_HEADER.into(), AMQPValue::LongString(LongString::from(key.as_bytes().to_vec())));
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(event.id.as_str().into())
        .with_headers(headers);
    let short =
        |value: &Option<String>| value.as_deref().and_then(|value| lapin::types::ShortString::try_new(value).ok());
    if let Some(message_type) = short(&event.message_type) {
        properties = properties.with_type(message_type);
    }
    if let Some(correlation_id) = short(&event.correlation_id) {
        properties = properties.with_correlation_id(correlation_id);
    }
    if let Some(reply_to) = short(&event.reply_to) {
        properties = properties.with_reply_to(reply_to);
    }
    if let Some(content_type) = short(&event.content_type) {
        properties = properties.with_content_type(content_type);
    }
    properties
}

impl ConfirmedPublisher {
    /// A publisher; it connects on first use.
    pub fn new(config: PublisherConfig) -> Result<ConfirmedPublisher> {
        if config.window == 0 {
            return Err(SdkError::Config("the publisher's window must be at least 1".into()));
        }
        Ok(ConfirmedPublisher { config, open: None })
    }

    async fn channel(&mut self) -> Result<Channel> {
        if let Some((connection, channel)) = &self.open
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        self.open = None;
        let connection = tokio::time::timeout(
            BROKER_TIMEOUT,
            Connection::connect(&self.config.url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| SdkError::Unreachable("connecting timed out".into()))??;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        self.open = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Drops the connection (after an error), so the next call reconnects.
    fn reset(&mut self) {
        self.open = None;
    }

    /// True if the exchange exists (a passive declare on a channel of its own, since a missing
    /// exchange closes the channel that asked).
    pub async fn exchange_exists(&mut self, exchange: &str) -> Result<bool> {
        if exchange.is_empty() {
            return Ok(true);
        }
        self.channel().await?;
        let Some((connection, _)) = &self.open else { return Err(SdkError::Unreachable("not connected".into())) };
        let probe = connection.create_channel().await?;
        let declared = probe
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Direct,
                ExchangeDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(()) => {
                let _ = probe.close(200, "probe done".into()).await;
                Ok(true)
            }
            Err(error) if matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404) => {
                Ok(false)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Publishes one event and waits for its confirm (reconnecting as needed).
    pub async fn publish(&mut self, event: &Event) -> Result<()> {
        self.publish_all(std::slice::from_ref(event)).await.pop().unwrap_or(Ok(()))
    }

    /// Publishes the events in order (mandatory: a message no queue receives is reported, not
    /// silently dropped), at most `window` unconfirmed at a time, and returns one outcome per
    /// event: `Ok` once the broker confirmed it and a queue took it; `Nacked` if the broker
    /// refused it; `Unroutable` if no queue took it; `Refused` for every event still unconfirmed
    /// when the broker closed the channel over one of them (the caller cannot know which one: it
    /// publishes them again one at a time). A connection loss is not an outcome: the publisher
    /// reconnects (backing off) and publishes again whatever was not yet confirmed, with the same
    /// message ids; only when every attempt failed do the rest end as `Unreachable`.
    pub async fn publish_all(&mut self, events: &[Event]) -> Vec<Result<()>> {
        let mut outcomes: Vec<Option<Result<()>>> = events.iter().map(|_| None).collect();
        let mut failures = 0u32;
        loop {
            let pending: Vec<usize> = (0..events.len()).filter(|&index| outcomes[index].is_none()).collect();
            if pending.is_empty() {
                break;
            }
            match self.publish_pending(events, &pending, &mut outcomes).await {
                Ok(()) => failures = 0,
                Err(SdkError::Refused { code, text }) => {
                    self.reset();
                    for outcome in outcomes.iter_mut().filter(|outcome| outcome.is_none()) {
                        *outcome = Some(Err(SdkError::Refused { code, text: text.clone() }));
                    }
                    break;
                }
                Err(error) => {
                    self.reset();
                    failures += 1;
                    tracing::warn!(%error, attempt = failures, "publishing failed; reconnecting");
                    if failures > self.config.reconnect_attempts_max {
                        for outcome in outcomes.iter_mut().filter(|outcome| outcome.is_none()) {
                            *outcome = Some(Err(SdkError::Unreachable(error.to_string())));
                        }
                        break;
                    }
                    let delay_ms = (50u64 << failures.min(16)).min(self.config.reconnect_delay_ms_max);
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
            }
        }
        outcomes.into_iter().map(|outcome| outcome.unwrap_or(Ok(()))).collect()
    }

    async fn publish_pending(
        &mut self,
        events: &[Event],
        pending: &[usize],
        outcomes: &mut [Option<Result<()>>],
    ) -> Result<()> {
        let channel = self.channel().await?;
        let mut in_flight = VecDeque::new();
        for &index in pending {
            if in_flight.len() >= self.config.window
                && let Some((oldest, confirm)) = in_flight.pop_front()
            {
                settle(events, oldest, confirm, outcomes).await?;
            }
            let event = &events[index];
            let published = channel
                .basic_publish(
                    event.exchange.as_str().into(),
                    event.routing_key.as_str().into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    &event.body,
                    properties(event),
                )
                .await;
            match published {
                Ok(confirm) => in_flight.push_back((index, confirm)),
                Err(error) => {
                    // The channel may have been closed over an earlier publish: the reason is in
                    // the confirms still waiting.
                    while let Some((earlier, confirm)) = in_flight.pop_front() {
                        settle(events, earlier, confirm, outcomes).await?;
                    }
                    return Err(classify(error));
                }
            }
        }
        while let Some((index, confirm)) = in_flight.pop_front() {
            settle(events, index, confirm, outcomes).await?;
        }
        Ok(())
    }
}

async fn settle(
    events: &[Event],
    index: usize,
    confirm: lapin::PublisherConfirm,
    outcomes: &mut [Option<Result<()>>],
) -> Result<()> {
    let confirmation = tokio::time::timeout(BROKER_TIMEOUT, confirm)
        .await
        .map_err(|_| SdkError::Unreachable("no confirm in time".into()))?
        .map_err(classify)?;
    let message_id = events[index].id.clone();
    outcomes[index] = Some(match confirmation {
        lapin::Confirmation::Ack(None) => Ok(()),
        lapin::Confirmation::Ack(Some(_)) => Err(SdkError::Unroutable { message_id }),
        lapin::Confirmation::Nack(_) | lapin::Confirmation::NotRequested => Err(SdkError::Nacked { message_id }),
    });
    Ok(())
}
