//! One node's outgoing link to one peer: dialed when a call needs it (and again after it
//! breaks, with a growing pause between failed dials), the handshake, calls multiplexed by id,
//! and what the link looks like now for [`crate::MemberStatus`].

use crate::config::{LinkTls, NodeId};
use crate::error::ClusterError;
use crate::frame::{Frame, HELLO_REPLY_HEAD_BYTES, Hello, HelloReply, Kind};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

/// Requests queued for a link's writer; beyond it callers wait (back-pressure).
const REQUESTS_QUEUED_MAX: usize = 1024;
/// The first pause after a failed dial; it doubles up to [`REDIAL_PAUSE_MS_MAX`].
const REDIAL_PAUSE_MS_MIN: u64 = 25;
const REDIAL_PAUSE_MS_MAX: u64 = 1_000;
/// A link's read buffer to start with.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The calls of one connection awaiting their answers; `closed` once the connection ended (no
/// call is registered after that, so none can wait for an answer that cannot come).
#[derive(Debug, Default)]
struct PendingCalls {
    closed: bool,
    calls: HashMap<u64, oneshot::Sender<Result<Frame, ClusterError>>>,
}

type Pending = Arc<Mutex<PendingCalls>>;

/// Marks a connection's calls as failed: none waits any more, none is registered from now on.
fn close_pending(pending: &Pending, closed: &AtomicBool) {
    let mut calls = lock(pending);
    calls.closed = true;
    closed.store(true, Ordering::Release);
    calls.calls.clear();
}

/// Forgets a call's entry however the call ends, a caller's own cancellation included (openraft
/// drops a call's future when its own deadline passes).
struct Registered {
    pending: Pending,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.pending).calls.remove(&self.id);
    }
}

/// What a link runs over: a TCP socket, or TLS on one.
pub trait LinkStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> LinkStream for S {}

/// A link's stream, whichever it is.
pub(crate) type Stream = Box<dyn LinkStream>;

/// The name a dialer expects in the certificate of `address` (`host:port`): its host.
fn server_name(address: &str) -> Result<rustls_pki_types::ServerName<'static>, ClusterError> {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|_| ClusterError::Config(format!("{host:?} is not a host name TLS can check")))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a link has seen lately.
#[derive(Debug, Default, Clone)]
pub(crate) struct LinkSeen {
    pub last_answer_at: Option<Instant>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
    /// No dial before this (after failed ones).
    redial_at: Option<Instant>,
}

/// The link from this node to `node`.
#[derive(Debug)]
pub(crate) struct Link {
    own: NodeId,
    node: NodeId,
    address: Mutex<String>,
    frame_bytes_max: u32,
    tls: Option<LinkTls>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// The current connection's closed flag, for [`Link::connected`] without waiting.
    current: Mutex<Option<Arc<AtomicBool>>>,
    seen: Mutex<LinkSeen>,
    next_call_id: AtomicU64,
}

/// A live connection of a link: its writer's queue, the calls awaiting answers, its tasks.
#[derive(Debug)]
struct Connection {
    requests: mpsc::Sender<Bytes>,
    pending: Pending,
    closed: Arc<AtomicBool>,
    tasks: [AbortHandle; 2],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Link {
    pub fn new(own: NodeId, node: NodeId, address: String, frame_bytes_max: u32, tls: Option<LinkTls>) -> Link {
        Link {
            own,
            node,
            address: Mutex::new(address),
            frame_bytes_max,
            tls,
            connection: tokio::sync::Mutex::new(None),
            current: Mutex::new(None),
            seen: Mutex::new(LinkSeen::default()),
            next_call_id: AtomicU64::new(1),
        }
    }

    pub fn address(&self) -> String {
        lock(&self.address).clone()
    }

    pub fn seen(&self) -> LinkSeen {
        lock(&self.seen).clone()
    }

    /// Whether a connection is up now.
    pub fn connected(&self) -> bool {
        lock(&self.current).as_ref().is_some_and(|closed| !closed.load(Ordering::Acquire))
    }

    /// Closes the connection, if any (the next call dials again).
    pub async fn disconnect(&self) {
        self.connection.lock().await.take();
        lock(&self.current).take();
    }

    /// Calls `service` on the node with `payload`, waiting at most `timeout`.
    pub async fn call(&self, service: u16, payload: Bytes, timeout: Duration) -> Result<Bytes, ClusterError> {
        let id = self.next_call_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = BytesMut::new();
        Frame { kind: Kind::Request, id, service, payload }.encode(&mut frame, self.frame_bytes_max)?;
        let outcome = tokio::time::timeout(timeout, async {
            let connection = self.connect().await?;
            let (answer_sender, answer) = oneshot::channel();
            {
                let mut calls = lock(&connection.pending);
                if calls.closed {
                    return Err(ClusterError::Disconnected(self.node));
                }
                calls.calls.insert(id, answer_sender);
            }
            let _registered = Registered { pending: Arc::clone(&connection.pending), id };
            connection.requests.send(frame.freeze()).await.map_err(|_| ClusterError::Disconnected(self.node))?;
            drop(connection);
            answer.await.map_err(|_| ClusterError::Disconnected(self.node))?
        })
        .await;
        let result = match outcome {
            Ok(Ok(frame)) => Ok(frame.payload),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(ClusterError::Timeout { node: self.node, timeout_ms: timeout.as_millis() as u64 }),
        };
        self.note(&result);
        result
    }

    fn note(&self, result: &Result<Bytes, ClusterError>) {
        let mut seen = lock(&self.seen);
        match result {
            // A handler's own refusal still shows the link works.
            Ok(_) | Err(ClusterError::Remote { .. }) => {
                seen.last_answer_at = Some(Instant::now());
                seen.consecutive_failures = 0;
                seen.last_error = None;
            }
            Err(error) => {
                seen.consecutive_failures = seen.consecutive_failures.saturating_add(1);
                seen.last_error = Some(error.to_string());
            }
        }
    }

    /// The live connection, dialed if there is none (unless a failed dial was too recent).
    async fn connect(&self) -> Result<Arc<Connection>, ClusterError> {
        let mut slot = self.connection.lock().await;
        if let Some(live) = slot.as_ref().filter(|live| !live.closed.load(Ordering::Acquire)) {
            return Ok(Arc::clone(live));
        }
        slot.take();
        let (redial_at, last_error) = {
            let seen = lock(&self.seen);
            (seen.redial_at, seen.last_error.clone())
        };
        if redial_at.is_some_and(|at| Instant::now() < at) {
            let reason = last_error.unwrap_or_else(|| "a dial failed just now".into());
            return Err(ClusterError::Unreachable { node: self.node, reason });
        }
        match self.dial().await {
            Ok(connection) => {
                lock(&self.seen).redial_at = None;
                let connection = Arc::new(connection);
                *lock(&self.current) = Some(Arc::clone(&connection.closed));
                *slot = Some(Arc::clone(&connection));
                Ok(connection)
            }
            Err(error) => {
                let mut seen = lock(&self.seen);
                let shift = seen.consecutive_failures.min(6);
                let pause_ms = (REDIAL_PAUSE_MS_MIN << shift).min(REDIAL_PAUSE_MS_MAX);
                seen.redial_at = Some(Instant::now() + Duration::from_millis(pause_ms));
                Err(ClusterError::Unreachable { node: self.node, reason: error.to_string() })
            }
        }
    }

    async fn dial(&self) -> Result<Connection, ClusterError> {
        let address = self.address();
        let socket = TcpStream::connect(address.as_str()).await?;
        socket.set_nodelay(true)?;
        let mut socket: Stream = match &self.tls {
            Some(tls) => Box::new(tls.connector.connect(server_name(&address)?, socket).await?),
            None => Box::new(socket),
        };
        socket.write_all(&Hello { from: self.own, to: self.node }.encode()).await?;
        let mut head = [0u8; HELLO_REPLY_HEAD_BYTES];
        socket.read_exact(&mut head).await?;
        let (node, refused, reason_bytes) = HelloReply::decode_head(&head)?;
        let mut reason = vec![0u8; reason_bytes];
        socket.read_exact(&mut reason).await?;
        if refused {
            return Err(ClusterError::Protocol(format!("refused: {}", String::from_utf8_lossy(&reason))));
        }
        if node != self.node {
            return Err(ClusterError::Protocol(format!("{address} is node {node}, not node {}", self.node)));
        }
        let (reader, writer) = tokio::io::split(socket);
        let (requests, queued) = mpsc::channel(REQUESTS_QUEUED_MAX);
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let reading = tokio::spawn(read_answers(
            reader,
            Arc::clone(&pending),
            Arc::clone(&closed),
            self.node,
            self.frame_bytes_max,
        ));
        let writing =
            tokio::spawn(write_requests(writer, queued, Arc::clone(&pending), Arc::clone(&closed), self.node));
        Ok(Connection { requests, pending, closed, tasks: [reading.abort_handle(), writing.abort_handle()] })
    }
}

/// Hands each answer to its caller until the link ends; then every waiting call fails.
async fn read_answers(
    mut reader: ReadHalf<Stream>,
    pending: Pending,
    closed: Arc<AtomicBool>,
    node: NodeId,
    frame_bytes_max: u32,
) {
    let mut buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let ending = 'link: loop {
        match reader.read_buf(&mut buffer).await {
            Ok(0) => break 'link "closed by the peer".to_owned(),
            Ok(_) => {}
            Err(error) => break 'link error.to_string(),
        }
        loop {
            match Frame::decode(&mut buffer, frame_bytes_max) {
                Ok(None) => break,
                Ok(Some(frame)) => {
                    let id = frame.id;
                    let result = match frame.kind {
                        Kind::Answer => Ok(frame),
                        Kind::Failure => Err(ClusterError::Remote {
                            node,
                            message: String::from_utf8_lossy(&frame.payload).into_owned(),
                        }),
                        Kind::Request => break 'link "a request came the wrong way".to_owned(),
                    };
                    // A call that timed out is gone; its late answer is dropped.
                    if let Some(caller) = lock(&pending).calls.remove(&id) {
                        let _ = caller.send(result);
                    }
                }
                Err(error) => break 'link error.to_string(),
            }
        }
    };
    close_pending(&pending, &closed);
    tracing::debug!(node, %ending, "cluster link closed");
}

/// Writes queued requests, as many as are waiting in one write.
async fn write_requests(
    mut writer: WriteHalf<Stream>,
    mut queued: mpsc::Receiver<Bytes>,
    pending: Pending,
    closed: Arc<AtomicBool>,
    node: NodeId,
) {
    let mut batch = BytesMut::new();
    while let Some(first) = queued.recv().await {
        batch.extend_from_slice(&first);
        while batch.len() < READ_BUFFER_BYTES {
            match queued.try_recv() {
                Ok(next) => batch.extend_from_slice(&next),
                Err(_) => break,
            }
        }
        if let Err(error) = writer.write_all(&batch).await {
            tracing::debug!(node, %error, "cluster link write failed");
            break;
        }
        batch.clear();
    }
    // Calls whose requests may not have gone out fail now rather than at their deadline.
    close_pending(&pending, &closed);
}
