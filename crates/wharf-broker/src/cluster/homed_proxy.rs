//! The home's side of homed queues' consumers on other nodes (`homed_link.rs`): the proxies.
//! A proxy is a connection of the home's model standing for one connection of another node
//! (by node, that node's run and its connection id); its channels stand for that connection's
//! channels, its consumers for their consumers (manual acks, their prefetch); its writer sends
//! the deliveries to the consumer's node instead of a socket, a batch per call, and reports
//! what was sent, so the home's model paces them as a client connection's.

use super::homed_link::{
    BATCH_ITEMS_MAX, CALL_DELIVER, CALL_PROXY_CLOSED, CONFIRM_TIMEOUT, ITEM_CANCELLED, ITEM_DELIVER, RemoteConnection,
    SERVICE_HOMED, lock,
};
use super::quorum_codec::Writer;
use crate::core::Core;
use crate::outbound::{Backlog, Outbound, OutboundDelivery, Outbox};
use crate::pager::DeliveryBody;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;
use wharf_cluster::{NodeId, Transport};
use wharf_model::{ChannelKey, ConnectionId, Effects};

/// A proxy on this node (the home) for a connection of another node.
#[derive(Debug)]
pub(super) struct Proxy {
    id: ConnectionId,
    /// Its open channels (the remote channel numbers) and their vhosts.
    channels: HashMap<u16, String>,
}

#[derive(Debug, Default)]
pub(super) struct Proxies {
    by_remote: HashMap<RemoteConnection, Proxy>,
    /// Above every delivery tag a closed proxy channel of this run gave: a proxy channel opened
    /// later starts here at least, so a settle that comes late (from a channel closed and
    /// opened again, or a delivery in flight when its proxy closed) never names a delivery of
    /// another proxy channel.
    tag_floor: u64,
}

impl Proxies {
    /// Notes the tags a proxy channel about to close gave.
    fn retire(&mut self, model: &wharf_model::BrokerModel, key: ChannelKey) {
        if let Some(next) = model.next_delivery_tag(key) {
            self.tag_floor = self.tag_floor.max(next);
        }
    }
}

/// The first delivery tag of a proxy channel opened in this run: above every tag an earlier
/// run of this node gave (it started at an earlier second; no channel takes 2^20 deliveries a
/// second).
fn run_start_tag() -> u64 {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_secs());
    seconds << 20
}

impl Core {
    /// The model channel standing for a remote channel, if its proxy has it open.
    pub(super) fn proxy_channel(&self, remote: RemoteConnection, channel: u16) -> Option<ChannelKey> {
        let proxies = lock(&self.homed_links.proxies);
        let proxy = proxies.by_remote.get(&remote)?;
        proxy.channels.contains_key(&channel).then_some(ChannelKey { connection: proxy.id, channel })
    }

    /// A remote consumer's checkout: its proxy (connection and channel) opened if needed, and
    /// the consumer attached there with its prefetch, acks manual. Done again, it changes
    /// nothing.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn proxy_checkout(
        &self,
        model: &mut wharf_model::BrokerModel,
        remote: RemoteConnection,
        channel: u16,
        vhost: &str,
        queue: &str,
        tag: &str,
        prefetch: u16,
    ) -> Effects {
        let Some(key) = self.proxy_channel_for_get(model, remote, channel, vhost) else { return Effects::default() };
        if model.has_consumer(key, tag) {
            return Effects::default();
        }
        let mut effects = model.qos(key, prefetch, false).unwrap_or_default();
        match model.consume(key, queue, tag, false, false) {
            Ok((_, consumed)) => effects.merge(consumed),
            Err(error) => tracing::debug!(%error, queue, "a remote consumer's checkout was refused"),
        }
        effects
    }

    /// The model channel standing for a remote channel, its proxy (connection and channel)
    /// opened if needed; `None` if it cannot be.
    pub(super) fn proxy_channel_for_get(
        &self,
        model: &mut wharf_model::BrokerModel,
        remote: RemoteConnection,
        channel: u16,
        vhost: &str,
    ) -> Option<ChannelKey> {
        let mut proxies = lock(&self.homed_links.proxies);
        let Proxies { by_remote, tag_floor } = &mut *proxies;
        let proxy = match by_remote.get_mut(&remote) {
            Some(proxy) => proxy,
            None => {
                let proxy = self.open_proxy(remote)?;
                by_remote.entry(remote).or_insert(proxy)
            }
        };
        let key = ChannelKey { connection: proxy.id, channel };
        if let std::collections::hash_map::Entry::Vacant(entry) = proxy.channels.entry(channel) {
            let first = (*tag_floor).max(run_start_tag());
            if let Err(error) = model.open_channel_from(key, vhost, first) {
                tracing::warn!(%error, "a remote channel's proxy could not be opened");
                return None;
            }
            entry.insert(vhost.to_owned());
        }
        Some(key)
    }

    /// Registers a proxy connection whose writer sends to the remote node.
    fn open_proxy(&self, remote: RemoteConnection) -> Option<Proxy> {
        let (core, transport) = self.homed_links.attached.get()?;
        let (core, transport) = (core.clone(), Arc::clone(transport));
        let (sender, receiver) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        let outbox = Outbox { sender, backlog: Arc::clone(&backlog) };
        let id = self.connections.register_proxy(outbox);
        tokio::spawn(run_proxy_writer(core, transport, id, remote, receiver, backlog));
        Some(Proxy { id, channels: HashMap::new() })
    }

    /// A remote channel closed (its consumers' `Down`): its proxy channel closes, and what it
    /// held goes back to the queue, redelivered.
    pub(super) fn proxy_down(
        &self,
        model: &mut wharf_model::BrokerModel,
        remote: RemoteConnection,
        channel: u16,
    ) -> Effects {
        let mut proxies = lock(&self.homed_links.proxies);
        let Some(proxy) = proxies.by_remote.get_mut(&remote) else { return Effects::default() };
        if proxy.channels.remove(&channel).is_none() {
            return Effects::default();
        }
        let key = ChannelKey { connection: proxy.id, channel };
        let empty = proxy.channels.is_empty();
        proxies.retire(model, key);
        let effects = model.close_channel(key);
        let Some(proxy) = proxies.by_remote.get_mut(&remote).filter(|_| empty) else { return effects };
        let id = proxy.id;
        proxies.by_remote.remove(&remote);
        self.connections.unregister(id);
        merged(effects, model.close_connection(id))
    }

    /// Closes the proxies of `remote` connections matching `which` (under the model lock):
    /// everything they held goes back to its queues.
    pub(super) fn close_proxies(&self, which: impl Fn(&RemoteConnection) -> bool) {
        let effects = {
            let mut model = self.lock_model();
            let mut proxies = lock(&self.homed_links.proxies);
            let closing: Vec<RemoteConnection> =
                proxies.by_remote.keys().filter(|remote| which(remote)).copied().collect();
            let mut effects = Effects::default();
            for remote in closing {
                let Some(proxy) = proxies.by_remote.remove(&remote) else { continue };
                for channel in proxy.channels.keys() {
                    proxies.retire(&model, ChannelKey { connection: proxy.id, channel: *channel });
                }
                self.connections.unregister(proxy.id);
                effects.merge(model.close_connection(proxy.id));
            }
            drop(proxies);
            self.send(&mut effects);
            effects
        };
        self.apply(effects);
    }

    /// A node's batch from a new run: its earlier runs' proxies are closed (their connections
    /// died with that run).
    pub(super) fn drop_earlier_runs(&self, node: NodeId, incarnation: u32) {
        let stale = {
            let proxies = lock(&self.homed_links.proxies);
            proxies.by_remote.keys().any(|(owner, run, _)| *owner == node && *run != incarnation)
        };
        if stale {
            self.close_proxies(|(owner, run, _)| *owner == node && *run != incarnation);
        }
    }
}

fn merged(mut first: Effects, second: Effects) -> Effects {
    first.merge(second);
    first
}

/// A proxy's writer on the home: its deliveries, a batch per call, to the consumer's node.
async fn run_proxy_writer(
    core: Weak<Core>,
    transport: Arc<Transport>,
    id: ConnectionId,
    remote: RemoteConnection,
    mut receiver: mpsc::UnboundedReceiver<Outbound>,
    backlog: Arc<Backlog>,
) {
    let (node, incarnation, connection) = remote;
    loop {
        let Some(first) = receiver.recv().await else { return };
        let mut items = vec![first];
        while items.len() < BATCH_ITEMS_MAX {
            match receiver.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        let Some(strong) = core.upgrade() else { return };
        let mut writer = Writer(Vec::with_capacity(64 * items.len()));
        writer.u8(CALL_DELIVER);
        writer.u32(incarnation);
        writer.u64(connection);
        let count_at = writer.0.len();
        writer.u32(0);
        let mut count = 0u32;
        let mut weight = 0u64;
        let mut unreadable = false;
        for item in items {
            backlog.bytes.fetch_sub(item.size_bytes(), std::sync::atomic::Ordering::Relaxed);
            match item {
                Outbound::Deliver(OutboundDelivery { delivery, count_recorded, body }) => {
                    // Counted as written whether sent or skipped, as a socket's writer counts.
                    weight += wharf_model::broker::delivery_bytes(&delivery.message);
                    if let Some(recorded) = count_recorded {
                        // Sent only once its delivery count is on disk, as to a socket.
                        let _ = recorded.await;
                    }
                    let body = match body {
                        DeliveryBody::Resident(bytes) => bytes,
                        DeliveryBody::Paged(read) => match crate::core::blocking(|| read.read()) {
                            Ok(bytes) => bytes,
                            Err(_) => {
                                unreadable = true;
                                continue;
                            }
                        },
                    };
                    let Some(tag) = delivery.consumer_tag.as_deref() else { continue };
                    let vhost = {
                        let proxies = lock(&strong.homed_links.proxies);
                        proxies
                            .by_remote
                            .get(&remote)
                            .and_then(|proxy| proxy.channels.get(&delivery.channel.channel).cloned())
                    };
                    let Some(vhost) = vhost else { continue };
                    writer.u8(ITEM_DELIVER);
                    writer.u32(u32::from(delivery.channel.channel));
                    writer.bytes(tag.as_bytes());
                    writer.bytes(vhost.as_bytes());
                    writer.bytes(delivery.queue.as_bytes());
                    writer.u64(delivery.delivery_tag);
                    writer.u32(delivery.delivery_count);
                    writer.u8(u8::from(delivery.redelivered));
                    writer.bytes(&crate::persist::encode_message_meta(&delivery.message));
                    writer.bytes(&body);
                    count += 1;
                }
                Outbound::CancelConsumer { channel, consumer_tag } => {
                    writer.u8(ITEM_CANCELLED);
                    writer.u32(u32::from(channel));
                    writer.bytes(consumer_tag.as_bytes());
                    count += 1;
                }
                Outbound::Frames(_) | Outbound::Return { .. } => {}
            }
        }
        writer.0[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
        let sent = count == 0 || transport.call(node, SERVICE_HOMED, Bytes::from(writer.0)).await.is_ok();
        if !sent || unreadable {
            tracing::info!(node, connection, "a remote consumer's node did not take its deliveries; closing its proxy");
            crate::core::blocking(|| strong.close_proxies(|candidate| *candidate == remote));
            tokio::spawn(async move { tell_proxy_closed(&transport, remote).await });
            return;
        }
        let effects = {
            let mut model = strong.lock_model();
            let mut effects = model.written(id, weight);
            strong.send(&mut effects);
            effects
        };
        strong.apply(effects);
    }
}

/// Tells a consumer's node that the proxy of its connection is gone, so that it cancels its
/// consumers there (best effort: a node that does not hear it learns it from its next batch,
/// which names the proxy the home no longer has, or from its own watch of the links).
async fn tell_proxy_closed(transport: &Transport, remote: RemoteConnection) {
    let (node, incarnation, connection) = remote;
    let mut writer = Writer(Vec::new());
    writer.u8(CALL_PROXY_CLOSED);
    writer.u32(incarnation);
    writer.u64(connection);
    let _ = transport.call_within(node, SERVICE_HOMED, Bytes::from(writer.0), CONFIRM_TIMEOUT).await;
}
