//! Classic queues on a cluster (`docs/design/20261205_replication.md`, §7): a durable classic
//! queue lives on one node, its *home* (the node its declaring client is connected to, as
//! RabbitMQ's default `client-local` locator places it), and clients on every other node reach
//! it through the cluster, as they reach a RabbitMQ classic queue on another node.
//!
//! The declaration goes through the metadata group (`DeclareHomedQueue`): the home declares the
//! queue as a broker alone does (its store log, its record); every other node keeps a
//! placeholder in its model, marked `replicated` like a quorum queue's, so declares, bindings and
//! routing work there, and what its channels do with the queue's consumers and deliveries comes
//! out of the model as the same [`wharf_model::ReplicatedOp`]s, which go to the home
//! (`homed_link.rs`). Every node records the queue (kind `homed-queue`: its home and arguments),
//! so a restarted node restores its placeholder, and bindings to the queue and its deletion are
//! metadata commands too.
//!
//! Which classic queues are homed: durable, not exclusive, not auto-delete, named by the
//! client. The others stay on their connection's node only, as before: an exclusive queue is
//! its connection's alone (RabbitMQ's too), a transient one is lost with its node anyway, an
//! auto-delete one is deleted by its last consumer leaving, which a node far from it cannot see
//! happen in order (RabbitMQ reaches those from other nodes; Wharf does not yet).
//!
//! While a queue's home is down or cut off, the queue is unavailable elsewhere, as RabbitMQ's
//! is: a declare, consume, get, purge or delete of it through another node is answered
//! `404 NOT_FOUND` ("home node N of queue ... is down or unreachable"), so a client retries
//! later, and a publish routed to it is nacked (never confirmed, never dropped silently).

use super::MetaCommand;
use super::command::{internal, table_bytes};
use crate::core::Core;
use crate::definitions::QueueRequest;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use wharf_cluster::NodeId;
use wharf_model::ModelError;

/// The definitions-log kind of a homed queue's record (on every node, its home included).
pub(crate) const KIND: &str = "homed-queue";

/// A homed queue's record in a node's definitions log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HomedDefinition {
    pub home: NodeId,
    /// The queue's arguments, an AMQP field table in its wire form (a placeholder's, so that a
    /// declare on any node is checked for equivalence as on the home).
    pub arguments: Vec<u8>,
}

pub(crate) fn key(vhost: &str, name: &str) -> Vec<u8> {
    format!("{KIND}\0{vhost}\0{name}").into_bytes()
}

fn encode(definition: &HomedDefinition) -> Result<Vec<u8>, String> {
    crate::definition_format::encode_record(definition)
}

pub(crate) fn decode(value: &[u8]) -> Option<HomedDefinition> {
    crate::definition_format::decode_record(value)
}

/// Whether the definitions log has a homed queue's record here (not a classic queue's own).
pub(crate) fn is_record_kind(kind: &str) -> bool {
    kind == KIND
}

/// Every homed queue this node knows of, by (vhost, name): its home.
#[derive(Debug, Default)]
pub(crate) struct HomedQueues {
    homes: RwLock<HashMap<(String, String), NodeId>>,
    /// Whether there is any (asked on every publish and consumer op to a replicated queue:
    /// a cluster with quorum queues only does not pay for the lookup's allocations).
    any: std::sync::atomic::AtomicBool,
}

impl HomedQueues {
    /// The homed queues the definitions log records.
    pub fn from_meta(meta: &wharf_store::MetaStore) -> HomedQueues {
        let prefix = format!("{KIND}\0").into_bytes();
        let mut homes = HashMap::new();
        for (key, value) in meta.entries() {
            let Some(rest) = key.strip_prefix(prefix.as_slice()) else { continue };
            let text = String::from_utf8_lossy(rest);
            let Some((vhost, name)) = text.split_once('\0') else { continue };
            if let Some(definition) = decode(&value) {
                homes.insert((vhost.to_owned(), name.to_owned()), definition.home);
            }
        }
        let any = std::sync::atomic::AtomicBool::new(!homes.is_empty());
        HomedQueues { homes: RwLock::new(homes), any }
    }

    /// The home of queue `name` in `vhost`, if it is a homed queue.
    pub fn home_of(&self, vhost: &str, name: &str) -> Option<NodeId> {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let homes = self.homes.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        homes.get(&(vhost.to_owned(), name.to_owned())).copied()
    }

    fn insert(&self, vhost: &str, name: &str, home: NodeId) {
        let mut homes = self.homes.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        homes.insert((vhost.to_owned(), name.to_owned()), home);
        self.any.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn remove(&self, vhost: &str, name: &str) {
        let mut homes = self.homes.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        homes.remove(&(vhost.to_owned(), name.to_owned()));
    }

    /// Forgets a deleted vhost's queues.
    pub fn forget_vhost(&self, vhost: &str) {
        let mut homes = self.homes.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        homes.retain(|(queue_vhost, _), _| queue_vhost != vhost);
    }

    /// The queues homed on `node`: (vhost, name).
    pub fn on(&self, node: NodeId) -> Vec<(String, String)> {
        let homes = self.homes.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        homes.iter().filter(|(_, home)| **home == node).map(|(queue, _)| queue.clone()).collect()
    }
}

/// The error for a queue whose home cannot be reached (RabbitMQ's answer, 404, so that clients
/// retry the declare or consume later).
pub(crate) fn home_down(vhost: &str, name: &str, home: NodeId) -> ModelError {
    ModelError::not_found(format!(
        "home node {home} of durable queue '{name}' in vhost '{vhost}' is down or unreachable"
    ))
}

impl Core {
    /// This node's id on a cluster.
    pub(crate) fn cluster_node(&self) -> Option<NodeId> {
        self.config.cluster.as_ref().map(|cluster| cluster.node_id)
    }

    /// The home of queue `name` if it is homed on another node than this one.
    pub(crate) fn remote_home(&self, vhost: &str, name: &str) -> Option<NodeId> {
        let own = self.cluster_node()?;
        self.homed.home_of(vhost, name).filter(|home| *home != own)
    }

    /// `queue.declare` of a new durable classic queue on a cluster: proposed to the metadata
    /// group with this node as its home. `None` when the declare is not one of those (it exists
    /// already, or it is exclusive, transient, auto-delete, server-named or passive): the caller
    /// declares it here, as a broker alone does.
    pub(crate) fn declare_homed_queue(&self, request: &QueueRequest<'_>) -> Option<Result<String, ModelError>> {
        let group = self.metadata_group()?;
        let own = self.cluster_node()?;
        let homed = !request.passive
            && request.durable
            && !request.exclusive
            && !request.auto_delete
            && !request.server_named
            && !request.name.is_empty();
        if !homed {
            return None;
        }
        let name = request.name.clone();
        {
            let model = self.lock_model();
            let vhost = match model.vhost(request.vhost) {
                Some(vhost) => vhost,
                None => return Some(Err(ModelError::not_allowed("vhost no longer exists"))),
            };
            if vhost.queue(&name).is_some() {
                return None;
            }
            // The same checks as a declare here, before anything is proposed: the queue's
            // arguments, the vhost's queue limit, the declaring user's rights.
            let checked = (|| {
                if let Some(grant) = request.grant {
                    use crate::access::{Resource, Right};
                    grant.check(Right::Configure, Resource::Queue, &name)?;
                    if let Some(exchange) = crate::persist::text_argument(request.arguments, "x-dead-letter-exchange") {
                        grant.check(Right::Read, Resource::Queue, &name)?;
                        grant.check(Right::Write, Resource::Exchange, &exchange)?;
                    }
                }
                self.limits.check_new_queue(request.vhost, &name, vhost.queue_count())?;
                vhost.queue_settings(&name, request.arguments).map(|_| ())
            })();
            if let Err(error) = checked {
                return Some(Err(error));
            }
        }
        let arguments = match table_bytes(request.arguments) {
            Ok(arguments) => arguments,
            Err(error) => return Some(Err(error)),
        };
        let command = MetaCommand::DeclareHomedQueue {
            vhost: request.vhost.to_owned(),
            name: name.clone(),
            home: own,
            arguments,
        };
        Some(match group.propose_blocking(command) {
            Ok(answer) => answer.into_model().map(|()| name),
            Err(error) => Err(internal(error)),
        })
    }

    /// Carries out a homed queue's declaration on this node (the metadata group's state
    /// machine calls it; blocking): the queue itself on its home, a placeholder elsewhere, and
    /// the record everywhere. Declaring one that exists is a no-op.
    pub(crate) fn declare_homed_queue_here(
        self: &Arc<Core>,
        vhost_name: &str,
        name: &str,
        home: NodeId,
        arguments: &[u8],
    ) -> Result<(), ModelError> {
        let table = wharf_wire::frame::decode_field_table(arguments)
            .ok_or_else(|| internal("a homed queue's arguments are unreadable"))?;
        let own = self.cluster_node().unwrap_or(0);
        let existing = {
            let model = self.lock_model();
            let vhost =
                model.vhost(vhost_name).ok_or_else(|| ModelError::not_found(format!("no vhost '{vhost_name}'")))?;
            vhost.queue(name).map(|queue| queue.replicated)
        };
        match existing {
            Some(true) if self.homed.home_of(vhost_name, name).is_some() => return Ok(()),
            Some(true) => {
                return Err(ModelError::precondition_failed(format!(
                    "inequivalent arg 'x-queue-type' for queue '{name}' in vhost '{vhost_name}': received 'classic' but current is 'quorum'"
                )));
            }
            // A queue of this name on this node alone (declared before it joined, or exclusive
            // to a connection here): it stays; this node cannot reach the homed one by name.
            Some(false) if home != own => {
                tracing::warn!(
                    vhost = vhost_name,
                    queue = name,
                    home,
                    "a queue of this node has the name of a queue homed on another node; this node keeps its own"
                );
                return Ok(());
            }
            _ => {}
        }
        let definitions = if home == own {
            if existing.is_none() {
                self.declare_queue_here(QueueRequest {
                    vhost: vhost_name,
                    name: name.to_owned(),
                    passive: false,
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    arguments: &table,
                    connection: wharf_model::ConnectionId(0),
                    server_named: false,
                    grant: None,
                })?;
            }
            self.definitions()
        } else {
            let definitions = self.definitions();
            let mut model = self.lock_model();
            let vhost =
                model.vhost_mut(vhost_name).ok_or_else(|| ModelError::not_found(format!("no vhost '{vhost_name}'")))?;
            super::quorum_declare::declare_replicated(vhost, name, &table)?;
            definitions
        };
        let value = encode(&HomedDefinition { home, arguments: arguments.to_vec() }).map_err(internal)?;
        if let Err(error) = self.meta.put(&key(vhost_name, name), &value) {
            self.store_failed(&error);
            return Err(crate::definitions::internal_error(&error));
        }
        drop(definitions);
        self.homed.insert(vhost_name, name, home);
        Ok(())
    }

    /// A queue homed here left the model by itself (`x-expires`, a policy's `expires`): the
    /// other nodes' placeholders go too, through the metadata group (in the background: this
    /// runs where effects are carried out). A deletion through the group forgot the queue's
    /// home first, so it does not come back here.
    pub(crate) fn homed_queue_gone_here(&self, vhost: &str, name: &str) {
        let own = self.cluster_node();
        if own.is_none() || self.homed.home_of(vhost, name) != own {
            return;
        }
        let Some(group) = self.metadata_group().cloned() else { return };
        let Some((core, _)) = self.homed_links.attached() else { return };
        let command = MetaCommand::DeleteHomedQueue { vhost: vhost.to_owned(), name: name.to_owned() };
        let (vhost, queue) = (vhost.to_owned(), name.to_owned());
        // Until it is done (a minority cannot commit it; asked again once a leader is back),
        // unless the queue is homed here again meanwhile (declared anew before this committed).
        tokio::spawn(async move {
            loop {
                match group.propose(command.clone()).await {
                    Ok(_) => return,
                    Err(error) => {
                        tracing::warn!(queue, %error, "a homed queue deleted here is not yet deleted on the other nodes")
                    }
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let Some(core) = core.upgrade() else { return };
                let back = core.lock_model().vhost(&vhost).is_some_and(|found| found.queue(&queue).is_some());
                if back || core.homed.home_of(&vhost, &queue) != core.cluster_node() {
                    return;
                }
            }
        });
    }

    /// Carries out a homed queue's deletion on this node (the metadata group's state machine
    /// calls it; blocking): on its home the queue and its messages, elsewhere the placeholder
    /// (consumers there are cancelled by the server); the record everywhere.
    pub(crate) fn delete_homed_queue_here(self: &Arc<Core>, vhost: &str, name: &str) -> Result<(), ModelError> {
        let Some(home) = self.homed.home_of(vhost, name) else { return Ok(()) };
        let own = self.cluster_node().unwrap_or(0);
        {
            let _definitions = self.definitions();
            if let Err(error) = self.meta.delete(&key(vhost, name)) {
                self.store_failed(&error);
                return Err(crate::definitions::internal_error(&error));
            }
        }
        self.homed.remove(vhost, name);
        if home == own {
            self.on_scratch_channel(vhost, |model, key| model.delete_queue(key, name, false, false)).map(|_| ())
        } else {
            self.act(|model| Ok(((), model.remove_replicated_queue(vhost, name))))
        }
    }
}

/// Restores a homed queue's placeholder at recovery, on a node other than its home (its home
/// restores the queue itself from the classic queue's own record).
pub(crate) fn restore(
    model: &mut wharf_model::BrokerModel,
    own: Option<NodeId>,
    vhost: &str,
    name: &str,
    value: &[u8],
) {
    let Some(definition) = decode(value) else {
        tracing::error!(queue = name, "a homed queue's record is unreadable");
        return;
    };
    if Some(definition.home) == own {
        return;
    }
    let table = wharf_wire::frame::decode_field_table(&definition.arguments).unwrap_or_default();
    let Some(found) = model.vhost_mut(vhost) else { return };
    if found.queue(name).is_some() {
        return;
    }
    if let Err(error) = super::quorum_declare::declare_replicated(found, name, &table) {
        tracing::error!(queue = name, %error, "a homed queue's placeholder could not be restored");
    }
}
