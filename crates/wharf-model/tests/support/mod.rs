//! Test wrappers that check the model's invariants after every operation. [`CheckedBroker`] and
//! [`CheckedVhost`] give read access to the model they wrap (`Deref`) but no mutable access:
//! every operation that changes it goes through a method here, which runs the model's
//! `check_invariants` once the operation is done. A test that needs an operation not wrapped yet
//! does not compile until it is added, so no operation slips past the check.

// Each test file uses only some of the wrapped operations.
#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use wharf_model::{
    BrokerModel, ChannelKey, ConnectionId, Declared, Delivery, Destination, Effects, Exchange, ExchangeDeclare,
    Message, PagedBody, QueueDeclare, Result, VirtualHost,
};
use wharf_wire::types::FieldTable;

/// A [`BrokerModel`] whose invariants are checked after every operation.
#[derive(Debug)]
pub struct CheckedBroker {
    model: BrokerModel,
}

impl Deref for CheckedBroker {
    type Target = BrokerModel;

    fn deref(&self) -> &BrokerModel {
        &self.model
    }
}

impl CheckedBroker {
    pub fn new(seed: u64) -> Self {
        let mut broker = CheckedBroker { model: BrokerModel::new(seed) };
        // Half the runs keep delivery traces (with a small bound, so it is reached).
        if seed % 2 == 1 {
            broker.model.set_trace_events_max(3);
        }
        broker.model.check_invariants();
        broker
    }

    /// Recovery as the runtime does it: `restore` puts the recovered messages into the queues
    /// (straight into the model, as the runtime does), then `after_recovery` finishes. One
    /// operation for the check: until `after_recovery` has run, expiries and backoffs of the
    /// recovered messages have no timers yet, by design.
    pub fn recover_with(&mut self, restore: impl FnOnce(&mut BrokerModel)) -> Effects {
        restore(&mut self.model);
        let effects = self.model.after_recovery();
        self.model.check_invariants();
        effects
    }

    /// A vhost to declare, bind or configure in; the invariants are checked when the returned
    /// guard goes (at the end of the statement, for a temporary).
    pub fn vhost_mut(&mut self, name: &str) -> Option<VhostGuard<'_>> {
        self.model.vhost_mut(name)?;
        Some(VhostGuard { model: &mut self.model, name: name.to_owned() })
    }

    /// Runs one operation on the model and checks the invariants after it.
    fn checked<T>(&mut self, operation: impl FnOnce(&mut BrokerModel) -> T) -> T {
        let result = operation(&mut self.model);
        self.model.check_invariants();
        result
    }

    pub fn open_channel(&mut self, key: ChannelKey, vhost: &str) -> Result<()> {
        self.checked(|model| model.open_channel(key, vhost))
    }

    pub fn close_channel(&mut self, key: ChannelKey) -> Effects {
        self.checked(|model| model.close_channel(key))
    }

    pub fn close_connection(&mut self, connection: ConnectionId) -> Effects {
        self.checked(|model| model.close_connection(connection))
    }

    pub fn written(&mut self, connection: ConnectionId, bytes: u64) -> Effects {
        self.checked(|model| model.written(connection, bytes))
    }

    pub fn qos(&mut self, key: ChannelKey, prefetch_count: u16, global: bool) -> Result<Effects> {
        self.checked(|model| model.qos(key, prefetch_count, global))
    }

    pub fn consume(
        &mut self,
        key: ChannelKey,
        queue: &str,
        tag: &str,
        no_ack: bool,
        exclusive: bool,
    ) -> Result<(String, Effects)> {
        self.checked(|model| model.consume(key, queue, tag, no_ack, exclusive))
    }

    pub fn cancel(&mut self, key: ChannelKey, tag: &str) -> Result<Effects> {
        self.checked(|model| model.cancel(key, tag))
    }

    pub fn enqueue(&mut self, vhost: &str, queue: &str, message: Arc<Message>, store_seq: Option<u64>) -> Effects {
        self.checked(|model| model.enqueue(vhost, queue, message, store_seq))
    }

    pub fn get(&mut self, key: ChannelKey, queue: &str, no_ack: bool) -> Result<(Option<Delivery>, Effects)> {
        self.checked(|model| model.get(key, queue, no_ack))
    }

    pub fn ack(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool) -> Result<Effects> {
        self.checked(|model| model.ack(key, delivery_tag, multiple))
    }

    pub fn reject(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<Effects> {
        self.checked(|model| model.reject(key, delivery_tag, multiple, requeue))
    }

    pub fn recover(&mut self, key: ChannelKey, requeue: bool) -> Result<Effects> {
        self.checked(|model| model.recover(key, requeue))
    }

    pub fn set_trace_events_max(&mut self, max: usize) {
        self.model.set_trace_events_max(max);
    }

    pub fn add_vhost(&mut self, name: &str) {
        self.model.add_vhost(name);
        self.model.check_invariants();
    }

    pub fn set_policies(&mut self, vhost: &str, policies: Vec<wharf_model::Policy>) -> Effects {
        self.checked(|model| model.set_policies(vhost, policies))
    }

    pub fn remove_vhost(&mut self, vhost: &str) -> Option<Effects> {
        self.checked(|model| model.remove_vhost(vhost))
    }

    pub fn withdraw(
        &mut self,
        vhost: &str,
        queue: &str,
        id: u64,
    ) -> std::result::Result<wharf_model::Withdrawn, wharf_model::WithdrawRefusal> {
        self.checked(|model| model.withdraw(vhost, queue, id))
    }

    pub fn reinstate(
        &mut self,
        vhost: &str,
        queue: &str,
        incarnation: u64,
        entry: wharf_model::Entry,
    ) -> std::result::Result<Effects, wharf_model::Entry> {
        self.checked(|model| model.reinstate(vhost, queue, incarnation, entry))
    }

    pub fn purge(&mut self, key: ChannelKey, queue: &str) -> Result<(u32, Effects)> {
        self.checked(|model| model.purge(key, queue))
    }

    pub fn delete_queue(
        &mut self,
        key: ChannelKey,
        queue: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<(u32, Effects)> {
        self.checked(|model| model.delete_queue(key, queue, if_unused, if_empty))
    }

    pub fn page_out(&mut self, vhost: &str, queue: &str, entry_id: u64, store_seq: u64, paged: PagedBody) -> bool {
        self.checked(|model| model.page_out(vhost, queue, entry_id, store_seq, paged))
    }

    pub fn set_now(&mut self, now_ms: u64) {
        self.checked(|model| model.set_now(now_ms))
    }

    pub fn tick(&mut self) -> Effects {
        self.checked(|model| model.tick())
    }
}

/// Mutable access to one vhost of a [`CheckedBroker`]; the broker's invariants are checked when
/// it is dropped.
#[derive(Debug)]
pub struct VhostGuard<'a> {
    model: &'a mut BrokerModel,
    name: String,
}

impl Deref for VhostGuard<'_> {
    type Target = VirtualHost;

    fn deref(&self) -> &VirtualHost {
        self.model.vhost(&self.name).expect("the guard is only made for a vhost that exists")
    }
}

impl DerefMut for VhostGuard<'_> {
    fn deref_mut(&mut self) -> &mut VirtualHost {
        self.model.vhost_mut(&self.name).expect("the guard is only made for a vhost that exists")
    }
}

impl Drop for VhostGuard<'_> {
    fn drop(&mut self) {
        // A test already failing must report its own failure, not abort on a second panic.
        if !std::thread::panicking() {
            self.model.check_invariants();
        }
    }
}

/// A [`VirtualHost`] whose invariants are checked after every operation.
#[derive(Debug)]
pub struct CheckedVhost {
    vhost: VirtualHost,
}

impl Deref for CheckedVhost {
    type Target = VirtualHost;

    fn deref(&self) -> &VirtualHost {
        &self.vhost
    }
}

impl CheckedVhost {
    pub fn new(name: &str, name_seed: u64) -> Self {
        let vhost = CheckedVhost { vhost: VirtualHost::new(name, name_seed) };
        vhost.vhost.check_invariants();
        vhost
    }

    /// Runs one operation on the vhost and checks the invariants after it.
    fn checked<T>(&mut self, operation: impl FnOnce(&mut VirtualHost) -> T) -> T {
        let result = operation(&mut self.vhost);
        self.vhost.check_invariants();
        result
    }

    pub fn declare_exchange(&mut self, declare: &ExchangeDeclare<'_>) -> Result<Declared> {
        self.checked(|vhost| vhost.declare_exchange(declare))
    }

    pub fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<Option<Exchange>> {
        self.checked(|vhost| vhost.delete_exchange(name, if_unused))
    }

    pub fn declare_queue(&mut self, declare: &QueueDeclare<'_>) -> Result<Declared> {
        self.checked(|vhost| vhost.declare_queue(declare))
    }

    pub fn remove_queue(&mut self, name: &str) -> Option<wharf_model::Queue> {
        self.checked(|vhost| vhost.remove_queue(name))
    }

    pub fn bind(
        &mut self,
        source: &str,
        destination: Destination,
        routing_key: &str,
        arguments: &FieldTable,
        connection: ConnectionId,
    ) -> Result<bool> {
        self.checked(|vhost| vhost.bind(source, destination, routing_key, arguments, connection))
    }

    pub fn unbind(
        &mut self,
        source: &str,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
        connection: ConnectionId,
    ) -> Result<bool> {
        self.checked(|vhost| vhost.unbind(source, destination, routing_key, arguments, connection))
    }
}
