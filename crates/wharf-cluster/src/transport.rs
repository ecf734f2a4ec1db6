//! The cluster transport of one node: it accepts the other members' links and answers their
//! calls with the node's [`Handler`], makes this node's calls over its own [`Link`]s, pings idle
//! links so their state stays known, and reports each member's link ([`MemberStatus`]).
//!
//! Each call is bounded: by its deadline, by the frame limit, and per inbound link by the calls
//! handled at once ([`INBOUND_CALLS_MAX`]; beyond it the link is not read until one finishes).

use crate::config::{ClusterConfig, LinkTls, NodeId};
use crate::error::ClusterError;
use crate::frame::{Frame, HELLO_BYTES, Hello, HelloReply, Kind};
use crate::link::{Link, Stream};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};

/// The service every node answers itself, with an empty payload: the links' heartbeat.
pub const SERVICE_PING: u16 = 0;
/// Calls one inbound link may have in hand at once.
pub const INBOUND_CALLS_MAX: usize = 256;
/// How long a dialer has to send its handshake.
const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Inbound links at once (beyond it new ones are closed at once): a few per member.
const INBOUND_LINKS_MAX: usize = 1024;
/// A pause after a failed accept (out of descriptors), so the loop does not spin.
const ACCEPT_PAUSE_MS: u64 = 50;
/// Link losses kept for a slow listener; one that falls further behind misses the oldest (and
/// learns of the outage from its next check instead).
const LINK_LOSSES_KEPT: usize = 64;

/// What a node's handler returns: the answer's payload, or a message saying why not.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>>;
/// Answers the calls other nodes make: (the calling node, the service, the payload).
pub type Handler = Arc<dyn Fn(NodeId, u16, Bytes) -> HandlerFuture + Send + Sync>;

/// One member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its id.
    pub node: NodeId,
    /// Where this node reaches it.
    pub address: String,
    /// It is this node.
    pub this_node: bool,
    /// This node's link to it is up.
    pub outbound_connected: bool,
    /// Links it has open to this node.
    pub inbound_links: usize,
    /// How long ago its last answer came, in milliseconds (`None`: never).
    pub last_answer_ms_ago: Option<u64>,
    /// Calls to it that failed since its last answer.
    pub consecutive_failures: u32,
    /// The last failure's text, if a call failed since its last answer.
    pub last_error: Option<String>,
}

/// A node's end of the cluster's links.
#[derive(Debug)]
pub struct Transport {
    shared: Arc<Shared>,
}

struct Shared {
    node_id: NodeId,
    local_addr: SocketAddr,
    call_timeout: Duration,
    frame_bytes_max: u32,
    tls: Option<LinkTls>,
    links: RwLock<BTreeMap<NodeId, Arc<Link>>>,
    own_address: String,
    inbound: Mutex<HashMap<NodeId, usize>>,
    handler: Handler,
    stopping: watch::Sender<bool>,
    /// A member's last inbound link ended (see [`Transport::link_losses`]).
    link_losses: broadcast::Sender<NodeId>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Shared").field("node_id", &self.node_id).field("local_addr", &self.local_addr).finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Drop for Transport {
    /// A transport dropped without [`Transport::shutdown`] (a broker whose start failed after
    /// it) still stops accepting and pinging: its tasks end.
    fn drop(&mut self) {
        self.shared.stopping.send_replace(true);
    }
}

impl Transport {
    /// Listens on the configured address and starts answering calls with `handler`.
    pub async fn start(config: &ClusterConfig, handler: Handler) -> Result<Transport, ClusterError> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let links = config
            .peers()
            .map(|(node, address)| {
                let link =
                    Link::new(config.node_id, node, address.to_owned(), config.frame_bytes_max, config.tls.clone());
                (node, Arc::new(link))
            })
            .collect();
        let (stopping, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            node_id: config.node_id,
            local_addr,
            call_timeout: Duration::from_millis(config.call_timeout_ms),
            frame_bytes_max: config.frame_bytes_max,
            tls: config.tls.clone(),
            links: RwLock::new(links),
            own_address: config.nodes.get(&config.node_id).cloned().unwrap_or_else(|| local_addr.to_string()),
            inbound: Mutex::default(),
            handler,
            stopping,
            link_losses: broadcast::channel(LINK_LOSSES_KEPT).0,
        });
        tokio::spawn(accept_links(Arc::clone(&shared), listener));
        if config.heartbeat_interval_ms > 0 {
            tokio::spawn(heartbeat(Arc::clone(&shared), Duration::from_millis(config.heartbeat_interval_ms)));
        }
        tracing::info!(node = config.node_id, %local_addr, members = config.nodes.len(), "accepting cluster links");
        Ok(Transport { shared })
    }

    /// Tells of each member whose last link to this node ended: the first sign that its process
    /// is gone (its sockets close when it dies), well before a call to it times out. Only a
    /// sign: a link also ends when the network between two live nodes drops it, so a listener
    /// checks (a call to the node) before it acts.
    pub fn link_losses(&self) -> broadcast::Receiver<NodeId> {
        self.shared.link_losses.subscribe()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// Where it accepts links.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Calls `service` on `node` with the configured deadline.
    pub async fn call(&self, node: NodeId, service: u16, payload: Bytes) -> Result<Bytes, ClusterError> {
        self.call_within(node, service, payload, self.shared.call_timeout).await
    }

    /// Calls `service` on `node`, waiting at most `timeout` for the answer.
    pub async fn call_within(
        &self,
        node: NodeId,
        service: u16,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, ClusterError> {
        if *self.shared.stopping.borrow() {
            return Err(ClusterError::Stopped);
        }
        let link = self.shared.link(node)?;
        link.call(service, payload, timeout).await
    }

    /// Makes `node` a member reachable at `address` (or moves it there).
    pub async fn add_member(&self, node: NodeId, address: String) -> Result<(), ClusterError> {
        if node == 0 || node == self.shared.node_id {
            return Err(ClusterError::Config(format!(
                "node {node} cannot be added to node {}'s peers",
                self.shared.node_id
            )));
        }
        let link = Link::new(self.shared.node_id, node, address, self.shared.frame_bytes_max, self.shared.tls.clone());
        let link = Arc::new(link);
        let replaced = self.shared.links.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(node, link);
        if let Some(old) = replaced {
            old.disconnect().await;
        }
        Ok(())
    }

    /// Stops reaching `node` (its calls fail with [`ClusterError::UnknownNode`] from now on, and
    /// links it opens are refused).
    pub async fn remove_member(&self, node: NodeId) -> Result<(), ClusterError> {
        let removed = self.shared.links.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&node);
        match removed {
            Some(link) => {
                link.disconnect().await;
                Ok(())
            }
            None => Err(ClusterError::UnknownNode(node)),
        }
    }

    /// Every member, this node first, then by id.
    pub fn members(&self) -> Vec<MemberStatus> {
        let inbound = lock(&self.shared.inbound).clone();
        let mut members = vec![MemberStatus {
            node: self.shared.node_id,
            address: self.shared.own_address.clone(),
            this_node: true,
            outbound_connected: false,
            inbound_links: 0,
            last_answer_ms_ago: None,
            consecutive_failures: 0,
            last_error: None,
        }];
        let links = self.shared.links.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (node, link) in links.iter() {
            let seen = link.seen();
            members.push(MemberStatus {
                node: *node,
                address: link.address(),
                this_node: false,
                outbound_connected: link.connected(),
                inbound_links: inbound.get(node).copied().unwrap_or(0),
                last_answer_ms_ago: seen.last_answer_at.map(|at| at.elapsed().as_millis() as u64),
                consecutive_failures: seen.consecutive_failures,
                last_error: seen.last_error,
            });
        }
        members
    }

    /// Stops accepting links, ends the inbound ones and closes this node's own.
    pub async fn shutdown(&self) {
        self.shared.stopping.send_replace(true);
        let links: Vec<Arc<Link>> =
            self.shared.links.read().unwrap_or_else(|poisoned| poisoned.into_inner()).values().cloned().collect();
        for link in links {
            link.disconnect().await;
        }
    }
}

impl Shared {
    fn link(&self, node: NodeId) -> Result<Arc<Link>, ClusterError> {
        self.links
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&node)
            .cloned()
            .ok_or(ClusterError::UnknownNode(node))
    }

    fn is_member(&self, node: NodeId) -> bool {
        self.links.read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(&node)
    }
}

async fn accept_links(shared: Arc<Shared>, listener: TcpListener) {
    let mut stopping = shared.stopping.subscribe();
    let links = Arc::new(Semaphore::new(INBOUND_LINKS_MAX));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|stopping| *stopping) => return,
        };
        match accepted {
            Ok((socket, peer)) => {
                let Ok(permit) = Arc::clone(&links).try_acquire_owned() else {
                    tracing::warn!(%peer, "cluster link refused: {INBOUND_LINKS_MAX} links are open");
                    continue;
                };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    if let Err(error) = serve_link(&shared, socket).await {
                        tracing::warn!(%peer, %error, "cluster link ended");
                    }
                    drop(permit);
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a cluster link failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_PAUSE_MS)).await;
            }
        }
    }
}

/// One inbound link: the handshake, then the peer's calls until it closes or this node stops.
async fn serve_link(shared: &Arc<Shared>, socket: TcpStream) -> Result<(), ClusterError> {
    socket.set_nodelay(true)?;
    let mut hello = [0u8; HELLO_BYTES];
    // The TLS handshake and the link's own share one deadline.
    let handshake = tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), async {
        let mut socket: Stream = match &shared.tls {
            Some(tls) => Box::new(tls.acceptor.accept(socket).await?),
            None => Box::new(socket),
        };
        socket.read_exact(&mut hello).await?;
        Ok::<Stream, std::io::Error>(socket)
    });
    let mut socket = match handshake.await {
        Ok(socket) => socket?,
        Err(_) => return Err(ClusterError::Protocol("no handshake within its deadline".into())),
    };
    let hello = Hello::decode(&hello)?;
    let refusal = if hello.to != shared.node_id {
        Some(format!("this is node {}, not node {}", shared.node_id, hello.to))
    } else if !shared.is_member(hello.from) {
        Some(format!("node {} is not a member node {} knows", hello.from, shared.node_id))
    } else {
        None
    };
    socket.write_all(&HelloReply { node: shared.node_id, refusal: refusal.clone() }.encode()).await?;
    if let Some(reason) = refusal {
        return Err(ClusterError::Protocol(format!("handshake refused: {reason}")));
    }
    let from = hello.from;
    *lock(&shared.inbound).entry(from).or_default() += 1;
    let outcome = answer_calls(shared, socket, from).await;
    let mut inbound = lock(&shared.inbound);
    if let Some(count) = inbound.get_mut(&from) {
        *count -= 1;
        if *count == 0 {
            inbound.remove(&from);
            // Nobody listening is fine: the send only fails then.
            let _ = shared.link_losses.send(from);
        }
    }
    outcome
}

async fn answer_calls(shared: &Arc<Shared>, socket: Stream, from: NodeId) -> Result<(), ClusterError> {
    let (mut reader, writer) = tokio::io::split(socket);
    let (answers, to_write) = mpsc::channel::<Frame>(INBOUND_CALLS_MAX);
    let writing = tokio::spawn(write_answers(writer, to_write, shared.frame_bytes_max));
    let in_hand = Arc::new(Semaphore::new(INBOUND_CALLS_MAX));
    let mut stopping = shared.stopping.subscribe();
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    let outcome = 'link: loop {
        loop {
            let frame = match Frame::decode(&mut buffer, shared.frame_bytes_max) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => break 'link Err(error),
            };
            if frame.kind != Kind::Request {
                break 'link Err(ClusterError::Protocol("an answer came the wrong way".into()));
            }
            let Ok(permit) = Arc::clone(&in_hand).acquire_owned().await else { break 'link Ok(()) };
            let (handler, answers) = (Arc::clone(&shared.handler), answers.clone());
            tokio::spawn(async move {
                let result = if frame.service == SERVICE_PING {
                    Ok(Bytes::new())
                } else {
                    handler(from, frame.service, frame.payload).await
                };
                let (kind, payload) = match result {
                    Ok(payload) => (Kind::Answer, payload),
                    Err(message) => (Kind::Failure, Bytes::from(message.into_bytes())),
                };
                let _ = answers.send(Frame { kind, id: frame.id, service: frame.service, payload }).await;
                drop(permit);
            });
        }
        let read = tokio::select! {
            read = reader.read_buf(&mut buffer) => read,
            _ = stopping.wait_for(|stopping| *stopping) => break 'link Ok(()),
        };
        match read {
            Ok(0) => break 'link Ok(()),
            Ok(_) => {}
            Err(error) => break 'link Err(error.into()),
        }
    };
    drop(answers);
    writing.abort();
    outcome
}

/// Writes answers as they are ready; one over the frame limit goes as a failure saying so.
async fn write_answers(
    mut writer: tokio::io::WriteHalf<Stream>,
    mut to_write: mpsc::Receiver<Frame>,
    frame_bytes_max: u32,
) {
    let mut batch = BytesMut::new();
    while let Some(first) = to_write.recv().await {
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            if let Err(error) = frame.encode(&mut batch, frame_bytes_max) {
                let failure = Frame {
                    kind: Kind::Failure,
                    id: frame.id,
                    service: frame.service,
                    payload: error.to_string().into(),
                };
                let _ = failure.encode(&mut batch, frame_bytes_max);
            }
            if batch.len() < 64 * 1024 {
                next = to_write.try_recv().ok();
            }
        }
        if writer.write_all(&batch).await.is_err() {
            return;
        }
        batch.clear();
    }
}

/// Pings every link once per interval, so each member's state is current without traffic.
async fn heartbeat(shared: Arc<Shared>, interval: Duration) {
    let mut stopping = shared.stopping.subscribe();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
        let links: Vec<Arc<Link>> =
            shared.links.read().unwrap_or_else(|poisoned| poisoned.into_inner()).values().cloned().collect();
        for link in links {
            let timeout = shared.call_timeout.min(interval.max(Duration::from_millis(1)) * 4);
            tokio::spawn(async move {
                let _ = link.call(SERVICE_PING, Bytes::new(), timeout).await;
            });
        }
    }
}
