//! Durable definitions: the only writer of the definitions log. Every declare, delete, bind and
//! unbind of a durable exchange or queue goes through here: the store logs it needs are created
//! first, the definition is written with the model change under the definitions lock, and a
//! failure undoes what was done.

use crate::access::{Resource, Right, VhostGrant};
use crate::core::Core;
use crate::definition_format::{self, Definition, StoredBinding, StoredExchange, StoredQueue};
use crate::persist::text_argument;
use wharf_model::{ConnectionId, Destination, Exchange, ExchangeDeclare, ExchangeKind, ModelError, QueueDeclare};
use wharf_store::{LogId, StoreError};
use wharf_wire::protocol::exchange;

/// A binding to add or remove: from the exchange `source` to `destination`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BindingChange<'a> {
    pub vhost: &'a str,
    pub connection: ConnectionId,
    pub source: &'a str,
    pub destination: &'a Destination,
    pub routing_key: &'a str,
    pub arguments: &'a wharf_wire::types::FieldTable,
}

/// A queue declaration, from a client or from the broker itself (automatic dead-letter queues).
#[derive(Debug, Clone)]
pub(crate) struct QueueRequest<'a> {
    pub vhost: &'a str,
    pub name: String,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: &'a wharf_wire::types::FieldTable,
    pub connection: ConnectionId,
    pub server_named: bool,
    /// The declaring user's permissions, checked on the queue's final name (a server-named queue's
    /// too, as RabbitMQ does); `None` for the broker's own declarations.
    pub grant: Option<&'a VhostGrant>,
}

pub(crate) fn internal_error(error: &StoreError) -> ModelError {
    ModelError {
        code: wharf_wire::reply_code::INTERNAL_ERROR,
        text: format!("INTERNAL_ERROR - {error}"),
        scope: wharf_model::Scope::Connection,
    }
}

impl Core {
    /// `queue.declare`. A new durable queue gets its store log(s) and its durable definition
    /// *before* it appears in the model, all under the definitions lock: nothing can be published
    /// into it, and no declare-ok can be sent for it, before it is fully durable. Bad arguments
    /// are refused (406) before anything is created. Returns the queue's name.
    pub fn declare_queue_here(&self, request: QueueRequest<'_>) -> Result<String, ModelError> {
        let _definitions = self.definitions();
        let mut name = request.name.clone();
        let server_named = request.server_named;
        let (creates_durable, deduplicates) = {
            let mut model = self.lock_model();
            let vhost =
                model.vhost_mut(request.vhost).ok_or_else(|| ModelError::not_allowed("vhost no longer exists"))?;
            if server_named {
                name = vhost.generate_queue_name();
            }
            let creates = !request.passive && vhost.queue(&name).is_none();
            // RabbitMQ's order: configure on the queue for any declare that is not passive; the
            // dead-letter exchange's rights only for a queue that is new.
            if let Some(grant) = request.grant
                && !request.passive
            {
                grant.check(Right::Configure, Resource::Queue, &name)?;
                if creates && let Some(exchange) = text_argument(request.arguments, "x-dead-letter-exchange") {
                    grant.check(Right::Read, Resource::Queue, &name)?;
                    grant.check(Right::Write, Resource::Exchange, &exchange)?;
                }
            }
            if creates {
                self.limits.check_new_queue(request.vhost, &name, vhost.queue_count())?;
            }
            let settings = if creates { Some(vhost.queue_settings(&name, request.arguments)?) } else { None };
            let deduplicates = settings.is_some_and(|settings| settings.deduplication.is_some());
            (creates && request.durable && !request.exclusive, deduplicates)
        };
        let mut store_log = None;
        let mut dedup_log = None;
        if creates_durable {
            let create = || {
                self.store.create_log().and_then(|ticket| ticket.wait()).map_err(|error| {
                    self.store_failed(&error);
                    internal_error(&error)
                })
            };
            let id = create()?;
            let dedup_id = if deduplicates {
                match create() {
                    Ok(dedup_id) => Some(dedup_id),
                    Err(error) => {
                        let _ = self.store.delete_log(id);
                        return Err(error);
                    }
                }
            } else {
                None
            };
            let stored = StoredQueue {
                auto_delete: request.auto_delete,
                arguments: request.arguments.clone(),
                store_log: id.0,
                dedup_log: dedup_id.map(|dedup_id| dedup_id.0),
            };
            let value = definition_format::encode_queue(&stored);
            if let Err(error) = self.meta.put(&definition_format::queue_key(request.vhost, &name), &value) {
                let _ = self.store.delete_log(id);
                if let Some(dedup_id) = dedup_id {
                    let _ = self.store.delete_log(dedup_id);
                }
                self.store_failed(&error);
                return Err(internal_error(&error));
            }
            store_log = Some(id.0);
            dedup_log = dedup_id.map(|dedup_id| dedup_id.0);
        }
        let mut model = self.lock_model();
        let declared = model
            .vhost_mut(request.vhost)
            .ok_or_else(|| ModelError::not_allowed("vhost no longer exists"))?
            .declare_queue(&QueueDeclare {
                name: &name,
                passive: request.passive,
                durable: request.durable,
                exclusive: request.exclusive,
                auto_delete: request.auto_delete,
                arguments: request.arguments,
                connection: request.connection,
                server_named,
                store_log,
                dedup_log,
            });
        match declared {
            Ok(declared) => {
                if let Some(ttl_ms) = model
                    .vhost(request.vhost)
                    .and_then(|vhost| vhost.queue(&declared.name))
                    .and_then(|queue| queue.settings.deduplication.as_ref().map(|dedup| dedup.ttl_ms))
                    && let Some(log) = dedup_log
                {
                    self.dedup_logs.register(log, ttl_ms);
                }
                if !request.passive {
                    model.touch_queue(request.vhost, &declared.name);
                    crate::core::Churn::count(&self.churn.queues_declared, 1);
                }
                if declared.created {
                    crate::core::Churn::count(&self.churn.queues_created, 1);
                }
                Ok(declared.name)
            }
            Err(error) => {
                drop(model);
                if let Some(id) = store_log {
                    // Refused (a bad name, a limit): take back the log and the definition.
                    self.forget_queue(request.vhost, &name, Some(id), dedup_log);
                }
                Err(error)
            }
        }
    }

    /// Removes a durable queue's definition (and its bindings' definitions), then its logs. The
    /// definition goes first: a crash in between leaves an orphaned log, deleted at startup.
    /// The caller holds the definitions lock.
    pub fn forget_queue(&self, vhost: &str, name: &str, store_log: Option<u64>, dedup_log: Option<u64>) {
        let mut keys = vec![definition_format::queue_key(vhost, name)];
        keys.extend(self.binding_keys_to(vhost, &Destination::Queue(name.to_owned())));
        let changes: Vec<_> = keys.into_iter().map(|key| wharf_store::MetaChange::Delete { key }).collect();
        if let Err(error) = self.meta.apply(&changes) {
            tracing::error!(queue = name, %error, "could not remove a queue definition");
            self.store_failed(&error);
            return;
        }
        for queue in store_log.into_iter().chain(dedup_log) {
            self.dedup_logs.forget(queue);
            match self.store.delete_log(LogId(queue)) {
                Ok(_) | Err(StoreError::UnknownLog(_)) => {}
                Err(error) => self.store_failed(&error),
            }
        }
    }

    /// Definition keys of stored bindings leading to `destination` (read from the log's map).
    fn binding_keys_to(&self, vhost: &str, destination: &Destination) -> Vec<Vec<u8>> {
        self.meta
            .entries()
            .into_iter()
            .filter_map(|(key, value)| {
                let (kind, key_vhost, _) = definition_format::split_key(&key)?;
                if kind != "binding" || key_vhost != vhost {
                    return None;
                }
                let Ok(Definition::Binding { stored, .. }) = definition_format::decode(&key, &value) else {
                    return None;
                };
                // A binding leads to the destination, or (for an exchange) leaves from it.
                let matches = &stored.destination == destination
                    || matches!(destination, Destination::Exchange(name) if &stored.source == name);
                matches.then_some(key)
            })
            .collect()
    }

    /// Removes a durable exchange's definition and every stored binding from or to it, then its
    /// logs (delayed messages, de-duplication keys). The caller holds the definitions lock.
    pub fn forget_exchange(&self, vhost: &str, exchange: &Exchange) -> Result<(), StoreError> {
        let mut keys = vec![definition_format::exchange_key(vhost, &exchange.name)];
        keys.extend(self.binding_keys_to(vhost, &Destination::Exchange(exchange.name.clone())));
        let changes: Vec<_> = keys.into_iter().map(|key| wharf_store::MetaChange::Delete { key }).collect();
        self.meta.apply(&changes)?;
        for log in exchange.store_log.into_iter().chain(exchange.dedup_log) {
            self.dedup_logs.forget(log);
            match self.store.delete_log(LogId(log)) {
                Ok(_) | Err(StoreError::UnknownLog(_)) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// `queue.bind`/`exchange.bind` (`add`) and their unbinds: the model change and the
    /// definition write happen together under the definitions lock; a failed write undoes the
    /// model change. Exchanges that auto-delete as a result are forgotten too.
    pub fn change_binding_here(&self, change: &BindingChange<'_>, add: bool) -> Result<(), ModelError> {
        let BindingChange { vhost: vhost_name, connection, source, destination, routing_key, arguments } = *change;
        let _definitions = self.definitions();
        let binding = wharf_model::Binding {
            destination: destination.clone(),
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        };
        let stored = StoredBinding::of(source, &binding);
        let value = definition_format::encode_binding(&stored);
        if add && value.len() > wharf_store::META_VALUE_BYTES_MAX {
            return Err(ModelError::precondition_failed("binding arguments are too large to store durably"));
        }
        let (changed, durable, auto_deleted) = {
            let mut model = self.lock_model();
            let vhost = model.vhost_mut(vhost_name).ok_or_else(missing_vhost)?;
            let durable = vhost.exchange(source).is_some_and(|exchange| exchange.durable)
                && match destination {
                    Destination::Queue(name) => {
                        vhost.queue(name).is_some_and(|queue| queue.durable && queue.exclusive_owner.is_none())
                    }
                    Destination::Exchange(name) => vhost.exchange(name).is_some_and(|exchange| exchange.durable),
                };
            let changed = if add {
                vhost.bind(source, destination.clone(), routing_key, arguments, connection)?
            } else {
                vhost.unbind(source, destination, routing_key, arguments, connection)?
            };
            (changed, durable, vhost.take_auto_deleted())
        };
        let key = definition_format::binding_key(vhost_name, &stored);
        if changed && durable {
            let written = if add { self.meta.put(&key, &value) } else { self.meta.delete(&key) };
            if let Err(error) = written {
                if add {
                    let mut model = self.lock_model();
                    if let Some(vhost) = model.vhost_mut(vhost_name) {
                        let _ = vhost.unbind(source, destination, routing_key, arguments, connection);
                    }
                }
                self.store_failed(&error);
                return Err(internal_error(&error));
            }
        }
        for exchange in auto_deleted.iter().filter(|exchange| exchange.durable) {
            self.forget_exchange(vhost_name, exchange).map_err(|error| {
                self.store_failed(&error);
                internal_error(&error)
            })?;
        }
        Ok(())
    }

    /// `exchange.declare`. A new durable exchange that holds delayed messages or de-duplicates
    /// gets its store logs before it becomes visible, and its definition is written before the
    /// declare-ok; bad arguments are refused before anything is created; a failed write undoes
    /// the declaration.
    pub fn declare_exchange_here(&self, vhost_name: &str, declare: &exchange::Declare) -> Result<(), ModelError> {
        let _definitions = self.definitions();
        let name = declare.exchange.as_str();
        // A new durable exchange that holds delayed messages or de-duplicates gets its
        // store logs before it becomes visible (bad arguments are refused first).
        let needs = {
            let model = self.lock_model();
            let vhost = model.vhost(vhost_name).ok_or_else(missing_vhost)?;
            if declare.passive || !declare.durable || vhost.exchange(name).is_some() || name.is_empty() {
                None
            } else {
                let kind = ExchangeKind::parse(declare.kind.as_str())?;
                let settings = vhost.exchange_settings(name, kind, &declare.arguments)?;
                Some((kind == ExchangeKind::DelayedMessage, settings.deduplication.map(|dedup| dedup.ttl_ms)))
            }
        };
        let mut logs = Vec::new();
        let (delayed, dedup_ttl) = needs.unwrap_or((false, None));
        for wanted in [delayed, dedup_ttl.is_some()] {
            if !wanted {
                logs.push(None);
                continue;
            }
            match self.store.create_log().and_then(|ticket| ticket.wait()) {
                Ok(id) => logs.push(Some(id.0)),
                Err(error) => {
                    for id in logs.iter().flatten() {
                        let _ = self.store.delete_log(LogId(*id));
                    }
                    self.store_failed(&error);
                    return Err(internal_error(&error));
                }
            }
        }
        let (store_log, dedup_log) = (logs[0], logs[1]);
        let declared = {
            let mut model = self.lock_model();
            let vhost = model.vhost_mut(vhost_name).ok_or_else(missing_vhost)?;
            vhost
                .declare_exchange(&ExchangeDeclare {
                    name,
                    kind: declare.kind.as_str(),
                    passive: declare.passive,
                    durable: declare.durable,
                    auto_delete: declare.auto_delete,
                    internal: declare.internal,
                    arguments: &declare.arguments,
                    store_log,
                    dedup_log,
                })
                .map(|declared| {
                    let stored = (declared.created && declare.durable)
                        .then(|| vhost.exchange(&declared.name).map(StoredExchange::of))
                        .flatten();
                    (declared, stored)
                })
        };
        let (declared, stored) = match declared {
            Ok(declared) => declared,
            Err(error) => {
                for id in [store_log, dedup_log].into_iter().flatten() {
                    let _ = self.store.delete_log(LogId(id));
                }
                return Err(error);
            }
        };
        if let Some(stored) = stored {
            let value = definition_format::encode_exchange(&stored);
            if let Err(error) = self.meta.put(&definition_format::exchange_key(vhost_name, &declared.name), &value) {
                // Undo: the exchange must not exist without its definition.
                if let Some(vhost) = self.lock_model().vhost_mut(vhost_name) {
                    let _ = vhost.delete_exchange(&declared.name, false);
                }
                for id in [store_log, dedup_log].into_iter().flatten() {
                    let _ = self.store.delete_log(LogId(id));
                }
                self.store_failed(&error);
                return Err(internal_error(&error));
            }
            if let (Some(log), Some(ttl_ms)) = (dedup_log, dedup_ttl) {
                self.dedup_logs.register(log, ttl_ms);
            }
        }
        Ok(())
    }

    /// `exchange.delete`: the exchange and every exchange that auto-deletes as a result leave the
    /// model, then their definitions, bindings and logs are forgotten.
    pub fn delete_exchange_here(&self, vhost_name: &str, name: &str, if_unused: bool) -> Result<(), ModelError> {
        let _definitions = self.definitions();
        let (removed, auto_deleted) = {
            let mut model = self.lock_model();
            let vhost = model.vhost_mut(vhost_name).ok_or_else(missing_vhost)?;
            let removed = vhost.delete_exchange(name, if_unused)?;
            (removed, vhost.take_auto_deleted())
        };
        for exchange in removed.iter().chain(auto_deleted.iter()).filter(|exchange| exchange.durable) {
            self.forget_exchange(vhost_name, exchange).map_err(|error| {
                self.store_failed(&error);
                internal_error(&error)
            })?;
        }
        Ok(())
    }
}

fn missing_vhost() -> ModelError {
    ModelError::not_allowed("vhost no longer exists")
}
