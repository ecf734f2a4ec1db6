//! [`VirtualHost`]: a namespace of exchanges, queues and bindings, with RabbitMQ's rules for
//! declaring, comparing on redeclare, deleting, binding and routing.

use crate::error::{ModelError, Result};
use crate::exchange::{Binding, Destination, Exchange, ExchangeKind, check_name};
use crate::queue::{ConnectionId, Queue};
use std::collections::{BTreeMap, BTreeSet};
use wharf_wire::types::FieldTable;

/// Most queues one vhost holds.
pub const QUEUES_MAX: usize = 100_000;
/// Most exchanges one vhost holds.
pub const EXCHANGES_MAX: usize = 10_000;
/// Most bindings from one exchange.
pub const BINDINGS_PER_EXCHANGE_MAX: usize = 100_000;

/// The arguments of `exchange.declare`.
#[derive(Debug, Clone)]
pub struct ExchangeDeclare<'a> {
    /// Name.
    pub name: &'a str,
    /// Type name (`direct`, …).
    pub kind: &'a str,
    /// Only check that it exists.
    pub passive: bool,
    /// Durable.
    pub durable: bool,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Internal.
    pub internal: bool,
    /// Arguments.
    pub arguments: &'a FieldTable,
}

/// The arguments of `queue.declare`.
#[derive(Debug, Clone)]
pub struct QueueDeclare<'a> {
    /// Name; empty asks the server to pick one.
    pub name: &'a str,
    /// Only check that it exists.
    pub passive: bool,
    /// Durable.
    pub durable: bool,
    /// Exclusive to the declaring connection.
    pub exclusive: bool,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Arguments.
    pub arguments: &'a FieldTable,
    /// The declaring connection.
    pub connection: ConnectionId,
}

/// What a declare did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// The name (the generated one for a server-named queue).
    pub name: String,
    /// True if it was created now (the runtime persists new durable definitions).
    pub created: bool,
}

/// A virtual host.
#[derive(Debug)]
pub struct VirtualHost {
    name: String,
    exchanges: BTreeMap<String, Exchange>,
    queues: BTreeMap<String, Queue>,
    /// Bindings by source exchange.
    bindings: BTreeMap<String, Vec<Binding>>,
    generated_names: u64,
    name_seed: u64,
}

fn inequivalent(what: &str, argument: &str, name: &str, vhost: &str, received: String, current: String) -> ModelError {
    ModelError::precondition_failed(format!(
        "inequivalent arg '{argument}' for {what} '{name}' in vhost '{vhost}': received '{received}' but current is '{current}'"
    ))
}

impl VirtualHost {
    /// A vhost with the standard exchanges (the default one and the `amq.*` ones). `name_seed`
    /// makes server-generated queue names unique across restarts.
    pub fn new(name: &str, name_seed: u64) -> Self {
        let mut vhost = VirtualHost {
            name: name.to_owned(),
            exchanges: BTreeMap::new(),
            queues: BTreeMap::new(),
            bindings: BTreeMap::new(),
            generated_names: 0,
            name_seed,
        };
        for (name, kind) in [
            ("", ExchangeKind::Direct),
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
            ("amq.match", ExchangeKind::Headers),
        ] {
            vhost.exchanges.insert(
                name.to_owned(),
                Exchange {
                    name: name.to_owned(),
                    kind,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: FieldTable::default(),
                },
            );
        }
        vhost
    }

    /// The vhost's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn no_exchange(&self, name: &str) -> ModelError {
        ModelError::not_found(format!("no exchange '{name}' in vhost '{}'", self.name))
    }

    fn no_queue(&self, name: &str) -> ModelError {
        ModelError::not_found(format!("no queue '{name}' in vhost '{}'", self.name))
    }

    /// An exchange by name.
    pub fn exchange(&self, name: &str) -> Option<&Exchange> {
        self.exchanges.get(name)
    }

    /// All exchanges.
    pub fn exchanges(&self) -> impl Iterator<Item = &Exchange> {
        self.exchanges.values()
    }

    /// A queue by name.
    pub fn queue(&self, name: &str) -> Option<&Queue> {
        self.queues.get(name)
    }

    /// A queue by name, mutable.
    pub fn queue_mut(&mut self, name: &str) -> Option<&mut Queue> {
        self.queues.get_mut(name)
    }

    /// All queues.
    pub fn queues(&self) -> impl Iterator<Item = &Queue> {
        self.queues.values()
    }

    /// Every binding, as (source, binding).
    pub fn bindings(&self) -> impl Iterator<Item = (&str, &Binding)> {
        self.bindings.iter().flat_map(|(source, list)| list.iter().map(move |binding| (source.as_str(), binding)))
    }

    /// `exchange.declare`.
    pub fn declare_exchange(&mut self, declare: &ExchangeDeclare<'_>) -> Result<Declared> {
        check_name("exchange", declare.name)?;
        if declare.passive {
            return match self.exchanges.contains_key(declare.name) {
                true => Ok(Declared { name: declare.name.to_owned(), created: false }),
                false => Err(self.no_exchange(declare.name)),
            };
        }
        if declare.name.is_empty() {
            return Err(ModelError::access_refused("operation not permitted on the default exchange"));
        }
        let kind = ExchangeKind::parse(declare.kind)?;
        if let Some(existing) = self.exchanges.get(declare.name) {
            let compare = |argument: &str, received: String, current: String| {
                inequivalent("exchange", argument, declare.name, &self.name, received, current)
            };
            if existing.kind != kind {
                return Err(compare("type", kind.as_str().into(), existing.kind.as_str().into()));
            }
            if existing.durable != declare.durable {
                return Err(compare("durable", declare.durable.to_string(), existing.durable.to_string()));
            }
            if existing.auto_delete != declare.auto_delete {
                return Err(compare("auto_delete", declare.auto_delete.to_string(), existing.auto_delete.to_string()));
            }
            if existing.internal != declare.internal {
                return Err(compare("internal", declare.internal.to_string(), existing.internal.to_string()));
            }
            if &existing.arguments != declare.arguments {
                return Err(compare(
                    "arguments",
                    format!("{:?}", declare.arguments),
                    format!("{:?}", existing.arguments),
                ));
            }
            return Ok(Declared { name: declare.name.to_owned(), created: false });
        }
        if declare.name.starts_with("amq.") {
            return Err(ModelError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                declare.name
            )));
        }
        if self.exchanges.len() >= EXCHANGES_MAX {
            return Err(ModelError::resource_error(format!("vhost '{}' holds {EXCHANGES_MAX} exchanges", self.name)));
        }
        self.exchanges.insert(
            declare.name.to_owned(),
            Exchange {
                name: declare.name.to_owned(),
                kind,
                durable: declare.durable,
                auto_delete: declare.auto_delete,
                internal: declare.internal,
                arguments: declare.arguments.clone(),
            },
        );
        Ok(Declared { name: declare.name.to_owned(), created: true })
    }

    /// `exchange.delete`. Deleting an exchange that does not exist succeeds (as RabbitMQ 3.x).
    /// Returns the removed exchange, if there was one.
    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<Option<Exchange>> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(ModelError::access_refused(format!("operation not permitted on exchange '{name}'")));
        }
        if !self.exchanges.contains_key(name) {
            return Ok(None);
        }
        if if_unused && self.bindings.get(name).is_some_and(|list| !list.is_empty()) {
            return Err(ModelError::precondition_failed(format!("exchange '{name}' in vhost '{}' in use", self.name)));
        }
        self.bindings.remove(name);
        let destination = Destination::Exchange(name.to_owned());
        self.remove_bindings_to(&destination);
        Ok(self.exchanges.remove(name))
    }

    fn remove_bindings_to(&mut self, destination: &Destination) {
        let mut emptied = Vec::new();
        for (source, list) in self.bindings.iter_mut() {
            let before = list.len();
            list.retain(|binding| &binding.destination != destination);
            if list.is_empty() && before > 0 {
                emptied.push(source.clone());
            }
        }
        for source in emptied {
            self.bindings.remove(&source);
            self.auto_delete_exchange(&source);
        }
    }

    fn auto_delete_exchange(&mut self, name: &str) {
        if self.exchanges.get(name).is_some_and(|exchange| exchange.auto_delete)
            && self.bindings.get(name).is_none_or(|list| list.is_empty())
        {
            self.exchanges.remove(name);
            self.remove_bindings_to(&Destination::Exchange(name.to_owned()));
        }
    }

    /// `queue.declare` (name checks, exclusivity and equivalence; the queue's state is untouched
    /// on redeclare).
    pub fn declare_queue(&mut self, declare: &QueueDeclare<'_>) -> Result<Declared> {
        check_name("queue", declare.name)?;
        if declare.passive {
            let queue = self.queues.get(declare.name).ok_or_else(|| self.no_queue(declare.name))?;
            self.check_exclusive(queue, declare.connection)?;
            return Ok(Declared { name: declare.name.to_owned(), created: false });
        }
        let name = if declare.name.is_empty() {
            self.generated_names += 1;
            format!("amq.gen-{:016x}-{}", self.name_seed, self.generated_names)
        } else if declare.name.starts_with("amq.") && !self.queues.contains_key(declare.name) {
            return Err(ModelError::access_refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                declare.name
            )));
        } else {
            declare.name.to_owned()
        };
        if let Some(existing) = self.queues.get(&name) {
            self.check_exclusive(existing, declare.connection)?;
            let compare = |argument: &str, received: bool, current: bool| {
                inequivalent("queue", argument, &name, &self.name, received.to_string(), current.to_string())
            };
            if existing.durable != declare.durable {
                return Err(compare("durable", declare.durable, existing.durable));
            }
            if existing.exclusive_owner.is_some() != declare.exclusive {
                return Err(compare("exclusive", declare.exclusive, existing.exclusive_owner.is_some()));
            }
            if existing.auto_delete != declare.auto_delete {
                return Err(compare("auto_delete", declare.auto_delete, existing.auto_delete));
            }
            if &existing.arguments != declare.arguments {
                return Err(inequivalent(
                    "queue",
                    "arguments",
                    &name,
                    &self.name,
                    format!("{:?}", declare.arguments),
                    format!("{:?}", existing.arguments),
                ));
            }
            return Ok(Declared { name, created: false });
        }
        if self.queues.len() >= QUEUES_MAX {
            return Err(ModelError::resource_error(format!("vhost '{}' holds {QUEUES_MAX} queues", self.name)));
        }
        let owner = declare.exclusive.then_some(declare.connection);
        self.queues.insert(
            name.clone(),
            Queue::new(name.clone(), declare.durable, owner, declare.auto_delete, declare.arguments.clone()),
        );
        Ok(Declared { name, created: true })
    }

    /// Adds a queue recovered from durable definitions (no checks: it was valid when declared).
    pub fn restore_queue(&mut self, queue: Queue) {
        self.queues.insert(queue.name.clone(), queue);
    }

    /// Adds an exchange recovered from durable definitions.
    pub fn restore_exchange(&mut self, exchange: Exchange) {
        self.exchanges.insert(exchange.name.clone(), exchange);
    }

    /// Fails with 405 if `queue` is exclusive to another connection.
    pub fn check_exclusive(&self, queue: &Queue, connection: ConnectionId) -> Result<()> {
        match queue.exclusive_owner {
            Some(owner) if owner != connection => Err(ModelError::resource_locked(format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '{}'",
                queue.name, self.name
            ))),
            _ => Ok(()),
        }
    }

    /// A queue that `connection` may use, or 404 / 405.
    pub fn usable_queue(&self, name: &str, connection: ConnectionId) -> Result<&Queue> {
        let queue = self.queues.get(name).ok_or_else(|| self.no_queue(name))?;
        self.check_exclusive(queue, connection)?;
        Ok(queue)
    }

    /// Removes a queue and every binding to it (the caller has checked conditions and consumers).
    pub fn remove_queue(&mut self, name: &str) -> Option<Queue> {
        let queue = self.queues.remove(name)?;
        self.remove_bindings_to(&Destination::Queue(name.to_owned()));
        Some(queue)
    }

    /// `queue.bind` and `exchange.bind`. Binding twice is a no-op. Returns true if added.
    pub fn bind(
        &mut self,
        source: &str,
        destination: Destination,
        routing_key: &str,
        arguments: &FieldTable,
        connection: ConnectionId,
    ) -> Result<bool> {
        if source.is_empty() {
            return Err(ModelError::access_refused("operation not permitted on the default exchange"));
        }
        match &destination {
            Destination::Queue(queue) => {
                self.usable_queue(queue, connection)?;
            }
            Destination::Exchange(exchange) => {
                if exchange.is_empty() {
                    return Err(ModelError::access_refused("operation not permitted on the default exchange"));
                }
                if !self.exchanges.contains_key(exchange) {
                    return Err(self.no_exchange(exchange));
                }
            }
        }
        if !self.exchanges.contains_key(source) {
            return Err(self.no_exchange(source));
        }
        let list = self.bindings.entry(source.to_owned()).or_default();
        if list.iter().any(|binding| {
            binding.destination == destination && binding.routing_key == routing_key && &binding.arguments == arguments
        }) {
            return Ok(false);
        }
        if list.len() >= BINDINGS_PER_EXCHANGE_MAX {
            return Err(ModelError::resource_error(format!(
                "exchange '{source}' already has {BINDINGS_PER_EXCHANGE_MAX} bindings"
            )));
        }
        list.push(Binding { destination, routing_key: routing_key.to_owned(), arguments: arguments.clone() });
        Ok(true)
    }

    /// `queue.unbind` and `exchange.unbind`. Unbinding what is not bound succeeds. Returns true if
    /// a binding was removed.
    pub fn unbind(
        &mut self,
        source: &str,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
        connection: ConnectionId,
    ) -> Result<bool> {
        if source.is_empty() {
            return Err(ModelError::access_refused("operation not permitted on the default exchange"));
        }
        match destination {
            Destination::Queue(queue) => {
                self.usable_queue(queue, connection)?;
            }
            Destination::Exchange(exchange) if !self.exchanges.contains_key(exchange) => {
                return Err(self.no_exchange(exchange));
            }
            Destination::Exchange(_) => {}
        }
        if !self.exchanges.contains_key(source) {
            return Err(self.no_exchange(source));
        }
        let Some(list) = self.bindings.get_mut(source) else { return Ok(false) };
        let before = list.len();
        list.retain(|binding| {
            !(&binding.destination == destination
                && binding.routing_key == routing_key
                && &binding.arguments == arguments)
        });
        let removed = list.len() < before;
        if list.is_empty() {
            self.bindings.remove(source);
            self.auto_delete_exchange(source);
        }
        Ok(removed)
    }

    /// The queues a message published to `exchange` reaches: 404 for a missing exchange, 403 for
    /// an internal one. Follows exchange-to-exchange bindings (each exchange visited once, so
    /// cycles end); every queue appears once.
    pub fn route(&self, exchange: &str, routing_key: &str, headers: Option<&FieldTable>) -> Result<Vec<String>> {
        let start = self.exchanges.get(exchange).ok_or_else(|| self.no_exchange(exchange))?;
        if start.internal {
            return Err(ModelError::access_refused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                self.name
            )));
        }
        if exchange.is_empty() {
            return Ok(self.queues.contains_key(routing_key).then(|| routing_key.to_owned()).into_iter().collect());
        }
        let mut queues = BTreeSet::new();
        let mut visited = BTreeSet::from([exchange.to_owned()]);
        let mut pending = vec![start];
        while let Some(current) = pending.pop() {
            for binding in self.bindings.get(&current.name).into_iter().flatten() {
                if !binding.matches(current.kind, routing_key, headers) {
                    continue;
                }
                match &binding.destination {
                    Destination::Queue(queue) => {
                        queues.insert(queue.clone());
                    }
                    Destination::Exchange(next) => {
                        if visited.insert(next.clone())
                            && let Some(next) = self.exchanges.get(next)
                        {
                            pending.push(next);
                        }
                    }
                }
            }
        }
        Ok(queues.into_iter().collect())
    }
}
