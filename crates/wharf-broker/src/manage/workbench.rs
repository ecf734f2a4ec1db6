//! The DLQ workbench's actions (browsing is `browse.rs`): replay messages to the exchange and
//! routing key they were dead-lettered from (their newest `x-death` entry) or to a chosen one,
//! move them to another queue, delete one. Replay and move go through `relocate.rs`, which
//! makes them crash-safe; a replayed message keeps its message id, properties and headers and
//! gains `x-replayed-count`; a moved one is unchanged.
//!
//! Decisions (`docs/design/20261204_dlq-workbench.md`):
//! - Only ready messages (and those waiting out a retry backoff) move; one delivered to a
//!   consumer and not settled is skipped with the reason.
//! - A replay is not a publish: it is not de-duplicated (it keeps the message id on purpose),
//!   and it is not confirmed to anyone; a queue whose `x-overflow` would refuse a publish
//!   refuses the copy (the message stays, with the reason).
//! - Permissions: read on the source queue (as a get), write on the target exchange (the
//!   default exchange for a move) and its topic permissions, as a publish.

use super::Management;
use super::operations::ManagementError;
use crate::access::{Resource, Right, VhostGrant};
use crate::relocate::Relocation;
use std::sync::Arc;
use wharf_model::trace::{TraceEvent, TraceKind};
use wharf_model::{ExchangeKind, Message, WithdrawRefusal, deadletter};

/// The most messages one request replays or moves; what is left is reported as `remaining`.
pub const MOVE_REQUEST_MESSAGES_MAX: usize = 50_000;
/// Messages moved per store sync.
const MOVE_CHUNK_MESSAGES: usize = 500;
/// Body bytes read into memory per chunk, at most (beyond one message): a chunk of paged-out
/// bodies is read back whole before its copies are written.
const MOVE_CHUNK_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Which messages of the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These entry ids (as browsing shows them).
    Ids(Vec<u64>),
    /// Every ready or waiting message (up to [`MOVE_REQUEST_MESSAGES_MAX`]) whose id is at most
    /// `max_id` if given: a client repeating an "all" request passes the `max_id` the first
    /// answer reported, so copies a replay put back into the same queue (which get higher ids)
    /// are not taken again.
    All { max_id: Option<u64> },
}

/// Where a replay sends messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayTarget {
    /// The exchange and routing key of each message's newest `x-death` entry.
    Original,
    /// This exchange and routing key, for every message.
    Exchange { exchange: String, routing_key: String },
}

/// What a replay or move did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveReport {
    /// Entry ids moved.
    pub moved: Vec<u64>,
    /// Entry ids left where they are, and why.
    pub skipped: Vec<(u64, String)>,
    /// Ready messages of the selection not looked at (over [`MOVE_REQUEST_MESSAGES_MAX`]).
    pub remaining: usize,
    /// For an "all" selection: the highest id it covered (what a repeated request passes).
    pub max_id: Option<u64>,
}

/// Where one message goes.
enum Plan {
    Replay(ReplayTarget),
    Move(String),
}

impl Management {
    /// Replays messages of `queue` (see the module documentation).
    pub fn replay(
        &self,
        user: &str,
        vhost: &str,
        queue: &str,
        selection: Selection,
        target: ReplayTarget,
    ) -> Result<MoveReport, ManagementError> {
        self.relocate_messages(user, vhost, queue, selection, Plan::Replay(target))
    }

    /// Moves messages of `queue` to `to_queue`, unchanged.
    pub fn move_messages(
        &self,
        user: &str,
        vhost: &str,
        queue: &str,
        selection: Selection,
        to_queue: &str,
    ) -> Result<MoveReport, ManagementError> {
        self.relocate_messages(user, vhost, queue, selection, Plan::Move(to_queue.to_owned()))
    }

    /// Deletes message `entry_id` from `queue` (needs read on the queue, as a purge). Returns
    /// once its removal is durable.
    pub fn delete_message(&self, user: &str, vhost: &str, queue: &str, entry_id: u64) -> Result<(), ManagementError> {
        let grant = self.grant(user, vhost)?;
        grant.check(Right::Read, Resource::Queue, queue)?;
        let stored = {
            let mut model = self.core.lock_model();
            super::browse::readable_queue(&model, vhost, queue)?;
            let withdrawn =
                model.withdraw(vhost, queue, entry_id).map_err(|refusal| refused(queue, entry_id, refusal))?;
            let mut effects = withdrawn.effects;
            self.core.send(&mut effects);
            let entry = withdrawn.entry;
            let stored = model
                .vhost(vhost)
                .and_then(|found| found.queue(queue))
                .and_then(|found| found.stored_at(entry.store_seq, entry.transient_record));
            drop(model);
            self.core.apply(effects);
            stored
        };
        if let Some(stored) = stored {
            crate::core::blocking(|| {
                self.core.remove_stored_record(stored);
                self.core.store.sync().and_then(|ticket| ticket.wait())
            })
            .map_err(|error| {
                self.core.store_failed(&error);
                ManagementError::Refused { code: 541, text: format!("the removal could not be stored: {error}") }
            })?;
        }
        Ok(())
    }

    fn relocate_messages(
        &self,
        user: &str,
        vhost: &str,
        queue: &str,
        selection: Selection,
        plan: Plan,
    ) -> Result<MoveReport, ManagementError> {
        let grant = self.grant(user, vhost)?;
        grant.check(Right::Read, Resource::Queue, queue)?;
        match &plan {
            Plan::Move(to_queue) => {
                grant.check(Right::Write, Resource::Exchange, "")?;
                let model = self.core.lock_model();
                if model.vhost(vhost).and_then(|found| found.queue(to_queue)).is_none() {
                    return Err(ManagementError::NotFound(format!("no queue '{to_queue}' in vhost '{vhost}'")));
                }
            }
            Plan::Replay(ReplayTarget::Exchange { exchange, routing_key }) => {
                grant.check(Right::Write, Resource::Exchange, exchange)?;
                self.allow_replay_topic(&grant, vhost, exchange, routing_key)?;
            }
            Plan::Replay(ReplayTarget::Original) => {}
        }
        let ids = {
            let model = self.core.lock_model();
            super::browse::readable_queue(&model, vhost, queue)?;
            match selection {
                Selection::Ids(ids) => (ids, None),
                Selection::All { max_id } => {
                    let found = model.vhost(vhost).and_then(|found| found.queue(queue));
                    let mut ids = found.map(|found| found.movable_ids()).unwrap_or_default();
                    if let Some(max_id) = max_id {
                        ids.retain(|id| *id <= max_id);
                    }
                    let highest = ids.last().copied().or(max_id);
                    (ids, highest)
                }
            }
        };
        let (mut ids, max_id) = ids;
        let mut report = MoveReport { max_id, ..MoveReport::default() };
        if ids.len() > MOVE_REQUEST_MESSAGES_MAX {
            report.remaining = ids.len() - MOVE_REQUEST_MESSAGES_MAX;
            ids.truncate(MOVE_REQUEST_MESSAGES_MAX);
        }
        let mut rest: &[u64] = &ids;
        while !rest.is_empty() {
            let (relocations, looked_at) = self.withdraw_planned(&grant, user, vhost, queue, rest, &plan, &mut report);
            rest = &rest[looked_at.max(1).min(rest.len())..];
            if relocations.is_empty() {
                continue;
            }
            for (id, outcome) in crate::core::blocking(|| self.core.relocate(relocations)) {
                match outcome {
                    Ok(()) => report.moved.push(id),
                    Err(reason) => report.skipped.push((id, reason)),
                }
            }
        }
        report.moved.sort_unstable();
        report.skipped.sort_unstable();
        Ok(report)
    }

    /// Step 1 of a move for the next chunk of `ids` (at most [`MOVE_CHUNK_MESSAGES`] messages and
    /// about [`MOVE_CHUNK_BYTES_MAX`] of bodies): where each message goes, and taking it out of
    /// its queue, under one model lock. Messages that cannot go are left where they are, in
    /// `report.skipped` with the reason. Returns the relocations and how many ids it looked at.
    #[allow(clippy::too_many_arguments)]
    fn withdraw_planned(
        &self,
        grant: &VhostGrant,
        user: &str,
        vhost_name: &str,
        queue_name: &str,
        ids: &[u64],
        plan: &Plan,
        report: &mut MoveReport,
    ) -> (Vec<Relocation>, usize) {
        let mut relocations = Vec::new();
        let now_ms = self.core.now_ms();
        let mut model = self.core.lock_model();
        let trace_events_max = model.trace_events_max();
        let mut chunk_bytes = 0u64;
        let mut later: Vec<wharf_model::Effects> = Vec::new();
        // What this chunk already sends to each target, for their length limits.
        let mut pending: std::collections::HashMap<String, (u64, u64)> = std::collections::HashMap::new();
        let mut looked_at = 0;
        for &id in ids {
            if looked_at == MOVE_CHUNK_MESSAGES || chunk_bytes > MOVE_CHUNK_BYTES_MAX {
                break;
            }
            looked_at += 1;
            let Some((vhost, queue)) =
                model.vhost(vhost_name).and_then(|vhost| vhost.queue(queue_name).map(|queue| (vhost, queue)))
            else {
                report.skipped.push((id, format!("queue '{queue_name}' was deleted")));
                continue;
            };
            let Some(entry) = queue.peek(id) else {
                let refusal =
                    if queue.is_unacked(id) { WithdrawRefusal::Unacknowledged } else { WithdrawRefusal::NotFound };
                report.skipped.push((id, refused(queue_name, id, refusal).to_string()));
                continue;
            };
            let source = queue.stored_at(entry.store_seq, entry.transient_record);
            let planned: Result<(Message, Vec<String>), String> = (|| {
                let (message, targets) = match plan {
                    Plan::Move(to_queue) => ((*entry.message).clone(), vec![to_queue.clone()]),
                    Plan::Replay(target) => {
                        let (exchange, routing_key) = match target {
                            ReplayTarget::Exchange { exchange, routing_key } => (exchange.clone(), routing_key.clone()),
                            ReplayTarget::Original => {
                                let origin = deadletter::death_origin(&entry.message).ok_or_else(|| {
                                    "it has no x-death header to replay from: choose an exchange".to_owned()
                                })?;
                                grant
                                    .check(Right::Write, Resource::Exchange, &origin.0)
                                    .map_err(|error| error.text.clone())?;
                                let is_topic =
                                    vhost.exchange(&origin.0).is_some_and(|found| found.kind == ExchangeKind::Topic);
                                if is_topic && grant.has_topic_rules(&origin.0) {
                                    grant
                                        .check_topic(Right::Write, &origin.0, &origin.1)
                                        .map_err(|error| error.text.clone())?;
                                }
                                origin
                            }
                        };
                        if vhost.exchange(&exchange).is_some_and(|found| found.kind == ExchangeKind::DelayedMessage) {
                            return Err(format!(
                                "'{exchange}' is a delayed-message exchange: replay to the exchange it routes to"
                            ));
                        }
                        // A paged-out message keeps only its raw properties: parse them again.
                        let properties = entry.message.full_properties();
                        let targets = vhost
                            .route(&exchange, &routing_key, properties.headers().as_ref())
                            .map_err(|error| error.text.clone())?;
                        (deadletter::replayed(&entry.message, &exchange, &routing_key), targets)
                    }
                };
                if targets.is_empty() {
                    return Err(format!(
                        "exchange '{}' routes routing key '{}' to no queue",
                        message.exchange, message.routing_key
                    ));
                }
                let full = targets.iter().find(|target| {
                    let (messages, bytes) = pending.get(target.as_str()).copied().unwrap_or((0, 0));
                    model.would_refuse(vhost_name, target, &message, messages, bytes)
                });
                if let Some(full) = full {
                    return Err(format!("queue '{full}' is full and refuses new messages (x-overflow)"));
                }
                Ok((message, targets))
            })();
            let (mut message, targets) = match planned {
                Ok(planned) => planned,
                Err(reason) => {
                    report.skipped.push((id, reason));
                    continue;
                }
            };
            if trace_events_max > 0 {
                let kind = match plan {
                    Plan::Move(to_queue) => TraceKind::Moved { to_queue: to_queue.clone(), user: user.to_owned() },
                    Plan::Replay(_) => TraceKind::Replayed {
                        exchange: message.exchange.clone(),
                        routing_key: message.routing_key.clone(),
                        user: user.to_owned(),
                    },
                };
                let hop = TraceEvent { at_ms: now_ms, queue: None, kind };
                let provenance = wharf_model::trace::carried(
                    entry.message.trace.as_deref(),
                    entry.enqueued_ms,
                    entry.trace.as_deref(),
                    queue_name,
                    hop,
                    trace_events_max,
                );
                message.trace = Some(Arc::new(provenance));
            }
            match model.withdraw(vhost_name, queue_name, id) {
                Ok(withdrawn) => {
                    let mut effects = withdrawn.effects;
                    self.core.send(&mut effects);
                    later.push(effects);
                    chunk_bytes += message.body_bytes();
                    for target in &targets {
                        let counted = pending.entry(target.clone()).or_insert((0, 0));
                        counted.0 += 1;
                        counted.1 += message.body_bytes();
                    }
                    relocations.push(Relocation {
                        vhost: vhost_name.to_owned(),
                        source_queue: queue_name.to_owned(),
                        source_incarnation: withdrawn.incarnation,
                        source,
                        entry: withdrawn.entry,
                        message: Arc::new(message),
                        targets,
                    });
                }
                Err(refusal) => report.skipped.push((id, refused(queue_name, id, refusal).to_string())),
            }
        }
        drop(model);
        for effects in later {
            self.core.apply(effects);
        }
        (relocations, looked_at)
    }

    /// A replay's topic-permission check, as a publish's.
    fn allow_replay_topic(
        &self,
        grant: &VhostGrant,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), ManagementError> {
        if !grant.has_topic_rules(exchange) {
            return Ok(());
        }
        let model = self.core.lock_model();
        let is_topic = model
            .vhost(vhost)
            .and_then(|found| found.exchange(exchange))
            .is_some_and(|found| found.kind == ExchangeKind::Topic);
        drop(model);
        if is_topic {
            grant.check_topic(Right::Write, exchange, routing_key)?;
        }
        Ok(())
    }
}

fn refused(queue: &str, id: u64, refusal: WithdrawRefusal) -> ManagementError {
    match refusal {
        WithdrawRefusal::NotFound => ManagementError::NotFound(format!("no message {id} in queue '{queue}'")),
        WithdrawRefusal::Unacknowledged => ManagementError::Refused {
            code: 409,
            text: format!("message {id} in queue '{queue}' is delivered to a consumer and not yet settled"),
        },
    }
}
