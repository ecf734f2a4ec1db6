//! What crosses the links for homed classic queues (`homed.rs`), on cluster service
//! [`SERVICE_HOMED`].
//!
//! Towards a queue's home, from each other node, one ordered stream per home ([`Forwarder`]):
//! publishes routed to its queues, and what this node's channels did with their consumers and
//! deliveries (the model's [`ReplicatedOp`]s: checkout, cancel, down, settle), sent in batches,
//! one call at a time, so the home sees them in the order they happened. The home carries a
//! publish out as its own (`Core::place`: admission, limits, de-duplication, its store and its
//! `fdatasync`) and answers once it is durable there; the publisher's confirm waits for that
//! answer (a [`crate::confirms::Durable::Replicated`] wait, as for a quorum queue), and a home
//! that cannot be reached nacks it. A consumer on another node is served on the home through
//! a *proxy*: a connection of the home's model (one per remote connection) whose channels stand
//! for the remote channels, whose consumers are the remote consumers (manual acks, their
//! prefetch), and whose writer sends the deliveries to the consumer's node instead of a socket.
//! So every guarantee of a classic queue (delivery limits, dead-lettering, leases, backoff,
//! per-key ordering, redelivery of what a closed channel held) is the home's own code.
//!
//! Towards a consumer's node, from the home: the proxies' deliveries, batched per proxy, one
//! call at a time ([`CALL_DELIVER`]); the consumer's node hands each to its channel with its own
//! delivery tag (`BrokerModel::deliver_replicated`), and its settle names the home's tag.
//!
//! Failure: a proxy whose delivery call fails is closed on the home (what it held is requeued,
//! redelivered) and its consumers are cancelled on their node (`basic.cancel`, so a client
//! consumes again). A node that loses its link to another and cannot ping it (the same signal
//! as `failover.rs`) closes that node's proxies if it is their home, and cancels its own
//! consumers of the queues that node is home to. A batch naming a proxy the home does not have
//! (closed meanwhile, or the home restarted) is answered with its channels, whose consumers the
//! node then cancels. A proxy channel opened again continues above the delivery tags it gave
//! before, and a restarted home starts its tags above its earlier run's (the time in seconds,
//! shifted 20 bits), so a late settle never names another delivery.

use super::quorum_codec::{Reader, Writer};
use crate::core::Core;
use crate::publish::{Placed, ReservationPool};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use wharf_cluster::{NodeId, SERVICE_PING, Transport};
use wharf_model::ReplicatedOutcome;
use wharf_model::{CancelledConsumer, ChannelKey, ConnectionId, Effects, QuorumAnswer, ReplicatedOp};

/// The cluster service of homed queues' traffic.
pub(crate) const SERVICE_HOMED: u16 = 6;

/// To a home: publishes and consumer ops, in order.
pub(super) const CALL_BATCH: u8 = 1;
/// To a home: `basic.get`.
pub(super) const CALL_GET: u8 = 2;
/// To a home: `queue.purge`.
pub(super) const CALL_PURGE: u8 = 3;
/// To a home: `queue.delete` (checked there, then proposed to the metadata group).
pub(super) const CALL_DELETE: u8 = 4;
/// To a home: the queue's ready messages and consumers.
pub(super) const CALL_COUNTS: u8 = 5;
/// To a consumer's node: deliveries and server-side cancels of one proxy.
pub(super) const CALL_DELIVER: u8 = 6;
/// To a consumer's node: the home closed the proxy of one of its connections.
pub(super) const CALL_PROXY_CLOSED: u8 = 7;

pub(super) const ITEM_PUBLISH: u8 = 1;
pub(super) const ITEM_CHECKOUT: u8 = 2;
pub(super) const ITEM_CANCEL: u8 = 3;
pub(super) const ITEM_DOWN: u8 = 4;
pub(super) const ITEM_SETTLE: u8 = 5;
pub(super) const ITEM_DELIVER: u8 = 6;
pub(super) const ITEM_CANCELLED: u8 = 7;
const ITEM_PROBE: u8 = 8;
const ITEM_BARRIER: u8 = 9;

pub(super) const PUBLISHED: u8 = 0;
pub(super) const PUBLISH_REFUSED: u8 = 1;
pub(super) const PUBLISH_FAILED: u8 = 2;

/// Most items one call carries, and roughly most bytes (a message over it goes alone).
pub(super) const BATCH_ITEMS_MAX: usize = 1024;
pub(super) const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Most consumer ops waiting to be sent again to an unreachable home (see [`run_forwarder`]).
const OPS_PENDING_MAX: usize = 100_000;
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How often each node names its consumers of homed queues to their homes, so that one the
/// home does not serve (its proxy closed while this node did not hear of it, its checkout
/// refused) is cancelled here and its client told.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// How long the ping that confirms a lost node may take (as `failover.rs`).
pub(super) const CONFIRM_TIMEOUT: Duration = Duration::from_millis(300);

/// One item for a home, encoded, with the publisher waiting for its answer if it is a publish.
struct Forward {
    item: Vec<u8>,
    answer: Option<oneshot::Sender<Result<QuorumAnswer, String>>>,
}

/// A remote connection's proxy on its queues' home: (node, its incarnation, its connection id).
pub(super) type RemoteConnection = (NodeId, u32, u64);

/// Homed queues' links on this node: its forwarders to other homes, and its proxies as a home.
#[derive(Default)]
pub(crate) struct HomedLinks {
    /// The broker and its links, once the links are up ([`HomedLinks::attach`]).
    pub(super) attached: std::sync::OnceLock<(Weak<Core>, Arc<Transport>)>,
    forwarders: Mutex<HashMap<NodeId, mpsc::UnboundedSender<Forward>>>,
    /// Bytes of publishes and ops waiting in the forwarders: counted as held memory by the
    /// memory alarm, which blocks publishers when a slow or unreachable home lets them pile up.
    queued_bytes: std::sync::atomic::AtomicU64,
    /// On a home: the last "ops lost" number each node's run sent (see [`run_forwarder`]).
    ops_lost: Mutex<HashMap<(NodeId, u32), u32>>,
    pub(super) proxies: Mutex<super::homed_proxy::Proxies>,
}

impl HomedLinks {
    /// The broker and its links, once attached.
    pub(crate) fn attached(&self) -> Option<(Weak<Core>, Arc<Transport>)> {
        self.attached.get().map(|(core, transport)| (core.clone(), Arc::clone(transport)))
    }

    /// Bytes waiting in the forwarders (see the field).
    pub(crate) fn queued_bytes(&self) -> u64 {
        self.queued_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_sent(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Starts the links' use for homed queues: the watch of lost nodes runs from now on.
    pub(crate) fn attach(&self, core: Weak<Core>, transport: Arc<Transport>) {
        if self.attached.set((core.clone(), Arc::clone(&transport))).is_ok() {
            tokio::spawn(watch_homes(core.clone(), transport));
            tokio::spawn(probe_homes(core));
        }
    }
}

impl std::fmt::Debug for HomedLinks {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("HomedLinks").finish_non_exhaustive()
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Core {
    /// Sends `item` to `home`'s forwarder (started on first use).
    fn forward(&self, home: NodeId, forward: Forward) {
        let Some((core, transport)) = self.homed_links.attached.get() else {
            if let Some(answer) = forward.answer {
                let _ = answer.send(Err("the cluster's links are not up".into()));
            }
            return;
        };
        self.homed_links.queued_bytes.fetch_add(forward.item.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut forwarders = lock(&self.homed_links.forwarders);
        let sender = forwarders.entry(home).or_insert_with(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(run_forwarder(core.clone(), Arc::clone(transport), home, receiver));
            sender
        });
        if let Err(unsent) = sender.send(forward) {
            self.homed_links.count_sent(unsent.0.item.len());
            if let Some(answer) = unsent.0.answer {
                let _ = answer.send(Err("this node is stopping".into()));
            }
        }
    }

    /// A publish to a queue homed on `home`: its answer once the home has it on disk.
    pub(crate) fn publish_to_home(
        &self,
        home: NodeId,
        vhost: &str,
        queue: &str,
        from_publisher: bool,
        meta: &[u8],
        body: &[u8],
    ) -> oneshot::Receiver<Result<QuorumAnswer, String>> {
        let (sender, receiver) = oneshot::channel();
        let mut writer = Writer(Vec::with_capacity(32 + vhost.len() + queue.len() + meta.len() + body.len()));
        writer.u8(ITEM_PUBLISH);
        writer.bytes(vhost.as_bytes());
        writer.bytes(queue.as_bytes());
        writer.u8(u8::from(from_publisher));
        writer.bytes(meta);
        writer.bytes(body);
        self.forward(home, Forward { item: writer.0, answer: Some(sender) });
        receiver
    }

    /// A barrier in the stream to `home`: answered once everything sent before it was carried
    /// out there (a get waits for it, so that it never overtakes its channel's earlier ops).
    pub(crate) fn barrier_to_home(&self, home: NodeId) -> oneshot::Receiver<Result<QuorumAnswer, String>> {
        let (sender, receiver) = oneshot::channel();
        let mut writer = Writer(Vec::with_capacity(16));
        writer.u8(ITEM_BARRIER);
        writer.bytes(b"");
        writer.bytes(b"");
        self.forward(home, Forward { item: writer.0, answer: Some(sender) });
        receiver
    }

    /// What a channel did with a homed queue's consumer or delivery, to its home. Called under
    /// the model lock (`propose_replicated`), so the ops keep the model's order.
    pub(crate) fn op_to_home(&self, home: NodeId, op: ReplicatedOp) {
        let mut writer = Writer(Vec::with_capacity(64));
        let (vhost, queue, channel, tag) = match &op {
            ReplicatedOp::Checkout { vhost, queue, channel, tag, .. }
            | ReplicatedOp::Cancel { vhost, queue, channel, tag }
            | ReplicatedOp::Down { vhost, queue, channel, tag }
            | ReplicatedOp::Settle { vhost, queue, channel, tag, .. } => (vhost, queue, channel, tag),
        };
        writer.u8(match op {
            ReplicatedOp::Checkout { .. } => ITEM_CHECKOUT,
            ReplicatedOp::Cancel { .. } => ITEM_CANCEL,
            ReplicatedOp::Down { .. } => ITEM_DOWN,
            ReplicatedOp::Settle { .. } => ITEM_SETTLE,
        });
        writer.bytes(vhost.as_bytes());
        writer.bytes(queue.as_bytes());
        writer.u64(channel.connection.0);
        writer.u32(u32::from(channel.channel));
        writer.bytes(tag.as_bytes());
        match op {
            ReplicatedOp::Checkout { prefetch, .. } => writer.u32(u32::from(prefetch)),
            ReplicatedOp::Settle { id, outcome, .. } => {
                writer.u64(id);
                writer.u8(match outcome {
                    ReplicatedOutcome::Settled => 0,
                    ReplicatedOutcome::Returned => 1,
                    ReplicatedOutcome::Discarded => 2,
                });
            }
            _ => {}
        }
        self.forward(home, Forward { item: writer.0, answer: None });
    }

    /// Answers a [`SERVICE_HOMED`] call from node `from`.
    pub(crate) async fn handle_homed(self: &Arc<Core>, from: NodeId, payload: &[u8]) -> Result<Bytes, String> {
        let mut reader = Reader(payload);
        match reader.u8("call")? {
            CALL_BATCH => self.handle_batch(from, reader).await,
            CALL_DELIVER => crate::core::blocking(|| self.handle_deliveries(from, reader)),
            CALL_PROXY_CLOSED => {
                let incarnation = reader.u32("incarnation")?;
                let connection = reader.u64("connection")?;
                if incarnation == self.incarnation {
                    crate::core::blocking(|| {
                        self.cancel_remote_consumers(from, |key, _| key.connection.0 == connection);
                    });
                }
                Ok(Bytes::new())
            }
            kind @ (CALL_GET | CALL_PURGE | CALL_DELETE | CALL_COUNTS) => {
                self.handle_queue_call(from, kind, reader).await
            }
            other => Err(format!("unknown homed-queue call {other}")),
        }
    }

    /// On the home: a batch of publishes and consumer ops from node `from`, carried out in
    /// order; answered once its publishes are durable here (a status each) with the channels
    /// it named that have no proxy here.
    async fn handle_batch(self: &Arc<Core>, from: NodeId, mut reader: Reader<'_>) -> Result<Bytes, String> {
        let incarnation = reader.u32("incarnation")?;
        let ops_lost = reader.u32("ops lost")?;
        let count = reader.u32("item count")? as usize;
        if count > BATCH_ITEMS_MAX * 2 {
            return Err(format!("a batch of {count} items"));
        }
        crate::core::blocking(|| {
            self.drop_earlier_runs(from, incarnation);
            // Ops of this node were dropped (a new number): its proxies no longer stand for its
            // channels. Once per number, however often a batch carrying it is sent again.
            let seen = {
                let mut lost = lock(&self.homed_links.ops_lost);
                lost.retain(|(node, run), _| *node != from || *run == incarnation);
                let seen = lost.entry((from, incarnation)).or_insert(0);
                std::mem::replace(seen, ops_lost)
            };
            if seen != ops_lost {
                self.close_proxies(|remote| remote.0 == from && remote.1 == incarnation);
            }
        });
        let mut published: Vec<Placed> = Vec::new();
        let mut later: Vec<Effects> = Vec::new();
        let mut unknown: Unknown = BTreeSet::new();
        crate::core::blocking(|| -> Result<(), String> {
            let mut model = self.lock_model();
            for _ in 0..count {
                let kind = reader.u8("item")?;
                let vhost = text(&mut reader, "vhost")?;
                let queue = text(&mut reader, "queue")?;
                if kind == ITEM_BARRIER {
                    // Answered like a publish, once everything before it is carried out.
                    published.push(Placed::default());
                    continue;
                }
                if kind == ITEM_PUBLISH {
                    let from_publisher = reader.u8("publisher flag")? == 1;
                    let meta = reader.bytes("meta")?;
                    let body = reader.bytes("body")?;
                    let mut placed = Placed::default();
                    let local = model
                        .vhost(&vhost)
                        .and_then(|found| found.queue(&queue))
                        .is_some_and(|found| !found.replicated);
                    match crate::persist::decode_message(meta, Bytes::copy_from_slice(body)) {
                        Some(message) if local => {
                            let message = Arc::new(message);
                            let pool = &mut ReservationPool::default();
                            self.place(
                                &mut model,
                                &vhost,
                                std::slice::from_ref(&queue),
                                &message,
                                from_publisher,
                                &mut placed,
                                pool,
                            );
                        }
                        _ => placed.failed = true,
                    }
                    later.append(&mut placed.later);
                    published.push(placed);
                    continue;
                }
                let connection = reader.u64("connection")?;
                let channel = u16::try_from(reader.u32("channel")?).map_err(|_| "a channel over 65535".to_owned())?;
                let tag = text(&mut reader, "consumer tag")?;
                let remote = (from, incarnation, connection);
                let mut effects = match kind {
                    ITEM_CHECKOUT => {
                        let prefetch = u16::try_from(reader.u32("prefetch")?).unwrap_or(u16::MAX);
                        self.proxy_checkout(&mut model, remote, channel, &vhost, &queue, &tag, prefetch)
                    }
                    // A cancel of a consumer the home does not have is done already.
                    ITEM_CANCEL => match self.proxy_channel(remote, channel) {
                        Some(key) => model.cancel(key, &tag).unwrap_or_default(),
                        None => Effects::default(),
                    },
                    ITEM_PROBE => {
                        match self.proxy_channel(remote, channel) {
                            Some(key) if model.has_consumer(key, &tag) => {}
                            Some(_) => {
                                unknown.insert((connection, channel, tag));
                            }
                            None => {
                                unknown.insert((connection, channel, String::new()));
                            }
                        }
                        Effects::default()
                    }
                    ITEM_DOWN => self.proxy_down(&mut model, remote, channel),
                    ITEM_SETTLE => {
                        let id = reader.u64("id")?;
                        let outcome = reader.u8("outcome")?;
                        match self.proxy_channel(remote, channel) {
                            // A tag the proxy does not hold (settled already, or of a proxy
                            // closed meanwhile) is no error: nothing is settled twice.
                            Some(key) => match outcome {
                                0 => model.ack(key, id, false),
                                1 => model.reject(key, id, false, true),
                                _ => model.reject(key, id, false, false),
                            }
                            .unwrap_or_default(),
                            None => {
                                unknown.insert((connection, channel, String::new()));
                                Effects::default()
                            }
                        }
                    }
                    other => return Err(format!("unknown homed-queue item {other}")),
                };
                self.send(&mut effects);
                later.push(effects);
            }
            Ok(())
        })?;
        for effects in later {
            self.apply(effects);
        }
        let mut writer = Writer(Vec::with_capacity(8 + published.len()));
        writer.u32(published.len() as u32);
        for mut placed in published {
            if !placed.transient_logs_wanted.is_empty() {
                let wanted = std::mem::take(&mut placed.transient_logs_wanted);
                crate::core::blocking(|| self.create_transient_logs(wanted));
            }
            let refused = placed.refused;
            let durable = self.durable(&mut placed);
            let mut status = if placed.failed { PUBLISH_FAILED } else { PUBLISHED };
            for wait in durable {
                if wait.wait().await.is_err() {
                    status = PUBLISH_FAILED;
                }
            }
            if refused && status == PUBLISHED {
                status = PUBLISH_REFUSED;
            }
            writer.u8(status);
        }
        writer.u32(unknown.len() as u32);
        for (connection, channel, tag) in unknown {
            writer.u64(connection);
            writer.u32(u32::from(channel));
            writer.bytes(tag.as_bytes());
        }
        Ok(Bytes::from(writer.0))
    }

    /// On a consumer's node: the deliveries (and server-side cancels) of one proxy.
    fn handle_deliveries(self: &Arc<Core>, from: NodeId, mut reader: Reader<'_>) -> Result<Bytes, String> {
        let incarnation = reader.u32("incarnation")?;
        if incarnation != self.incarnation {
            return Err("deliveries for an earlier run of this node".into());
        }
        let connection = ConnectionId(reader.u64("connection")?);
        let count = reader.u32("item count")? as usize;
        let mut model = self.lock_model();
        for _ in 0..count {
            let kind = reader.u8("item")?;
            let channel = u16::try_from(reader.u32("channel")?).map_err(|_| "a channel over 65535".to_owned())?;
            let tag = text(&mut reader, "consumer tag")?;
            let key = ChannelKey { connection, channel };
            if kind == ITEM_CANCELLED {
                let mut effects = model.cancel(key, &tag).unwrap_or_default();
                effects.cancelled.push(CancelledConsumer { channel: key, consumer_tag: tag });
                self.send(&mut effects);
                continue;
            }
            let vhost = text(&mut reader, "vhost")?;
            let queue = text(&mut reader, "queue")?;
            let id = reader.u64("id")?;
            let delivery_count = reader.u32("delivery count")?;
            let redelivered = reader.u8("redelivered")? == 1;
            let meta = reader.bytes("meta")?;
            let body = reader.bytes("body")?;
            let Some(message) = crate::persist::decode_message(meta, Bytes::copy_from_slice(body)) else {
                return Err(format!("an unreadable message of queue '{queue}'"));
            };
            if self.homed.home_of(&vhost, &queue) != Some(from) {
                continue;
            }
            let delivery = wharf_model::ReplicatedDelivery {
                vhost,
                channel: key,
                tag,
                queue,
                id,
                message: Arc::new(message),
                delivery_count,
                redelivered,
            };
            let (sent, mut effects) = model.deliver_replicated(delivery);
            effects.deliveries.extend(sent);
            self.send(&mut effects);
        }
        Ok(Bytes::new())
    }

    /// Cancels this node's consumers of queues homed on `home` on the channels `which` picks:
    /// the home lost them. Each client is told (`basic.cancel`) and can consume again.
    fn cancel_remote_consumers(&self, home: NodeId, which: impl Fn(ChannelKey, &str) -> bool) {
        let queues = self.homed.on(home);
        if queues.is_empty() {
            return;
        }
        let mut model = self.lock_model();
        for (vhost, queue) in queues {
            for (key, tag, _) in model.replicated_consumers(&vhost, &queue) {
                if !which(key, &tag) {
                    continue;
                }
                tracing::info!(queue = %queue, home, "the home of a queue lost this node's consumer; cancelling it");
                let mut effects = model.cancel(key, &tag).unwrap_or_default();
                effects.cancelled.push(CancelledConsumer { channel: key, consumer_tag: tag });
                self.send(&mut effects);
            }
        }
    }
}

pub(super) fn text(reader: &mut Reader<'_>, what: &str) -> Result<String, String> {
    String::from_utf8(reader.bytes(what)?.to_vec()).map_err(|_| format!("a {what} not in UTF-8"))
}

/// Sends what this node has for `home`, a batch at a time, until the broker stops. A batch
/// whose call fails has its publishes nacked (one may have been taken: sending it again could
/// store it twice), and so have the publishes waiting behind it (a publisher is not held while
/// the home is unreachable); its consumer ops, and those waiting, are sent again, in order, until
/// the home takes them: each means the same twice, and a home that restarted meanwhile knows
/// none of the proxies they name and says so. Past [`OPS_PENDING_MAX`] waiting ops they are
/// dropped, this node's consumers of the home's queues cancelled, and the batches after that
/// carry a new "ops lost" number, at which the home closes this node's proxies once.
async fn run_forwarder(
    core: Weak<Core>,
    transport: Arc<Transport>,
    home: NodeId,
    mut receiver: mpsc::UnboundedReceiver<Forward>,
) {
    let mut retry: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::new();
    let mut ops_lost: u32 = 0;
    loop {
        let mut batch: Vec<Forward> = Vec::new();
        while batch.len() < BATCH_ITEMS_MAX {
            match retry.pop_front() {
                Some(item) => batch.push(Forward { item, answer: None }),
                None => break,
            }
        }
        if batch.is_empty() {
            match receiver.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
        }
        let mut bytes: usize = batch.iter().map(|forward| forward.item.len()).sum();
        while batch.len() < BATCH_ITEMS_MAX && bytes < BATCH_BYTES_MAX {
            match receiver.try_recv() {
                Ok(forward) => {
                    bytes += forward.item.len();
                    batch.push(forward);
                }
                Err(_) => break,
            }
        }
        let Some(incarnation) = core.upgrade().map(|core| core.incarnation) else { return };
        let mut writer = Writer(Vec::with_capacity(bytes + 16));
        writer.u8(CALL_BATCH);
        writer.u32(incarnation);
        writer.u32(ops_lost);
        writer.u32(batch.len() as u32);
        for forward in &batch {
            writer.0.extend_from_slice(&forward.item);
        }
        let outcome = transport.call(home, SERVICE_HOMED, Bytes::from(writer.0)).await;
        let Some(strong) = core.upgrade() else { return };
        match outcome {
            Ok(reply) => {
                strong.homed_links.count_sent(bytes);
                let (statuses, unknown) = decode_batch_reply(&reply).unwrap_or_default();
                let mut statuses = statuses.into_iter();
                for forward in batch {
                    if let Some(answer) = forward.answer {
                        let outcome = match statuses.next() {
                            Some(PUBLISHED) => Ok(QuorumAnswer::Done { id: None }),
                            Some(PUBLISH_REFUSED) => Ok(QuorumAnswer::Rejected),
                            _ => Err(format!("node {home}, the queue's home, could not take the message")),
                        };
                        let _ = answer.send(outcome);
                    }
                }
                if !unknown.is_empty() {
                    crate::core::blocking(|| {
                        strong.cancel_remote_consumers(home, |key, tag| {
                            let channel = (key.connection.0, key.channel);
                            unknown.contains(&(channel.0, channel.1, String::new()))
                                || unknown.contains(&(channel.0, channel.1, tag.to_owned()))
                        });
                    });
                }
            }
            Err(error) => {
                let refuse = |forward: Forward, retry: &mut Vec<Vec<u8>>| match forward.answer {
                    Some(answer) => {
                        strong.homed_links.count_sent(forward.item.len());
                        let _ = answer.send(Err(format!("node {home}, the queue's home, is unreachable: {error}")));
                    }
                    None => retry.push(forward.item),
                };
                let mut again = Vec::new();
                for forward in batch {
                    refuse(forward, &mut again);
                }
                for item in again.into_iter().rev() {
                    retry.push_front(item);
                }
                let mut behind = Vec::new();
                while let Ok(forward) = receiver.try_recv() {
                    refuse(forward, &mut behind);
                }
                retry.extend(behind);
                if retry.len() > OPS_PENDING_MAX {
                    tracing::warn!(
                        home,
                        ops = retry.len(),
                        "consumer ops for an unreachable home dropped; its queues' consumers here are cancelled"
                    );
                    strong.homed_links.count_sent(retry.iter().map(Vec::len).sum());
                    retry.clear();
                    ops_lost = ops_lost.wrapping_add(1);
                    crate::core::blocking(|| strong.cancel_remote_consumers(home, |_, _| true));
                }
                drop(strong);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
}

/// What a home named as unknown to it: (connection, channel, consumer tag), the tag empty for
/// a whole channel it has no proxy of.
type Unknown = BTreeSet<(u64, u16, String)>;

fn decode_batch_reply(reply: &[u8]) -> Result<(Vec<u8>, Unknown), String> {
    let mut reader = Reader(reply);
    let count = reader.u32("status count")? as usize;
    let statuses = reader.take(count, "statuses")?.to_vec();
    let unknown_count = reader.u32("unknown count")? as usize;
    let mut unknown = BTreeSet::new();
    for _ in 0..unknown_count {
        let connection = reader.u64("connection")?;
        let channel = u16::try_from(reader.u32("channel")?).map_err(|_| "a channel over 65535".to_owned())?;
        let tag = text(&mut reader, "consumer tag")?;
        unknown.insert((connection, channel, tag));
    }
    Ok((statuses, unknown))
}

/// Watches the links until the broker stops: a node lost (its link down and a ping unanswered)
/// has its proxies here closed, and this node's consumers of the queues it is home to are
/// cancelled.
async fn watch_homes(core: Weak<Core>, transport: Arc<Transport>) {
    let mut losses = transport.link_losses();
    loop {
        let node = match losses.recv().await {
            Ok(node) => node,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if transport.call_within(node, SERVICE_PING, Bytes::new(), CONFIRM_TIMEOUT).await.is_ok() {
            continue;
        }
        let Some(core) = core.upgrade() else { return };
        crate::core::blocking(|| {
            core.close_proxies(|(owner, _, _)| *owner == node);
            core.cancel_remote_consumers(node, |_, _| true);
        });
    }
}

/// Names this node's consumers of homed queues to their homes every [`PROBE_INTERVAL`] (under
/// the model lock, so in order with the consumers' own ops), until the broker stops: a home
/// answers with those it does not serve, which are then cancelled here.
async fn probe_homes(core: Weak<Core>) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(core) = core.upgrade() else { return };
        crate::core::blocking(|| {
            let model = core.lock_model();
            for ((vhost, queue), consumers) in model.replicated_consumers_by_queue() {
                let Some(home) = core.remote_home(&vhost, &queue) else { continue };
                for (key, tag, _) in consumers {
                    let mut writer = Writer(Vec::with_capacity(32 + vhost.len() + queue.len() + tag.len()));
                    writer.u8(ITEM_PROBE);
                    writer.bytes(vhost.as_bytes());
                    writer.bytes(queue.as_bytes());
                    writer.u64(key.connection.0);
                    writer.u32(u32::from(key.channel));
                    writer.bytes(tag.as_bytes());
                    core.forward(home, Forward { item: writer.0, answer: None });
                }
            }
        });
    }
}
