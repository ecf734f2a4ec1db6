//! A TCP proxy that injects network faults between two nodes, for the cluster's tests: put one
//! on each directed link (node A dials the proxy, the proxy dials node B) and the test decides
//! what the link does.
//!
//! - **delay**: each chunk is forwarded that many milliseconds late;
//! - **partition**: nothing is forwarded either way, on open connections and new ones, as a
//!   network that stops carrying packets (TCP keeps the bytes: they arrive after a heal, late);
//! - **one-way partition**: the same in one [`Direction`] only;
//! - **drop**: every open connection is cut now (what was in flight is lost) and new ones are
//!   cut as soon as they are accepted, as a peer whose host is gone;
//! - **heal**: all of that ends.
//!
//! A held direction stops reading from its source, so the sender's socket buffers fill and it
//! feels the same back-pressure as on a dead network; nothing is buffered in the proxy beyond
//! one chunk per direction.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One chunk read and forwarded at a time.
const CHUNK_BYTES: usize = 64 * 1024;

/// A direction through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From whoever dialed the proxy to the target.
    ToTarget,
    /// From the target back to whoever dialed the proxy.
    FromTarget,
}

/// What the proxy does now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Faults {
    delay_ms: u64,
    hold_to_target: bool,
    hold_from_target: bool,
    dropping: bool,
    /// Raised by each drop: connections opened before it are cut.
    cut_epoch: u64,
}

impl Faults {
    fn holds(&self, direction: Direction) -> bool {
        match direction {
            Direction::ToTarget => self.hold_to_target,
            Direction::FromTarget => self.hold_from_target,
        }
    }
}

/// A fault-injecting TCP proxy on 127.0.0.1 in front of one target address. Stopped when
/// dropped.
#[derive(Debug)]
pub struct FaultProxy {
    local_addr: SocketAddr,
    faults: Arc<watch::Sender<Faults>>,
    forwarded_bytes: Arc<AtomicU64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        // Open connections end too.
        self.faults.send_modify(|faults| {
            faults.dropping = true;
            faults.cut_epoch += 1;
        });
    }
}

impl FaultProxy {
    /// A proxy on a free port of 127.0.0.1 forwarding to `target`, passing everything.
    pub async fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let local_addr = listener.local_addr()?;
        let faults = Arc::new(watch::Sender::new(Faults::default()));
        let forwarded_bytes = Arc::new(AtomicU64::new(0));
        let accepting = tokio::spawn(accept(listener, target, Arc::clone(&faults), Arc::clone(&forwarded_bytes)));
        Ok(FaultProxy { local_addr, faults, forwarded_bytes, accepting })
    }

    /// Where to dial to go through the proxy.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Bytes forwarded so far, both ways.
    pub fn forwarded_bytes(&self) -> u64 {
        self.forwarded_bytes.load(Ordering::Relaxed)
    }

    /// Forwards each chunk `delay_ms` late (0: at once).
    pub fn delay(&self, delay_ms: u64) {
        self.faults.send_modify(|faults| faults.delay_ms = delay_ms);
    }

    /// Forwards nothing, either way, until [`FaultProxy::heal`].
    pub fn partition(&self) {
        self.faults.send_modify(|faults| {
            faults.hold_to_target = true;
            faults.hold_from_target = true;
        });
    }

    /// Forwards nothing in `direction` until [`FaultProxy::heal`]; the other way still flows.
    pub fn partition_one_way(&self, direction: Direction) {
        self.faults.send_modify(|faults| match direction {
            Direction::ToTarget => faults.hold_to_target = true,
            Direction::FromTarget => faults.hold_from_target = true,
        });
    }

    /// Cuts every open connection now, and each new one as it comes, until [`FaultProxy::heal`].
    pub fn drop_connections(&self) {
        self.faults.send_modify(|faults| {
            faults.dropping = true;
            faults.cut_epoch += 1;
        });
    }

    /// Ends every fault: held bytes flow, new connections are kept, no delay.
    pub fn heal(&self) {
        self.faults.send_modify(|faults| {
            let cut_epoch = faults.cut_epoch;
            *faults = Faults { cut_epoch, ..Faults::default() };
        });
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    faults: Arc<watch::Sender<Faults>>,
    forwarded_bytes: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let now = *faults.borrow();
        if now.dropping {
            drop(client);
            continue;
        }
        let (faults, forwarded_bytes) = (Arc::clone(&faults), Arc::clone(&forwarded_bytes));
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else { return };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (client_reader, client_writer) = client.into_split();
            let (server_reader, server_writer) = server.into_split();
            let epoch = now.cut_epoch;
            let to_target = pump(client_reader, server_writer, Direction::ToTarget, &faults, epoch, &forwarded_bytes);
            let from_target =
                pump(server_reader, client_writer, Direction::FromTarget, &faults, epoch, &forwarded_bytes);
            tokio::pin!(to_target, from_target);
            // A cut ends both directions (returning drops both sockets); an end of stream ends
            // only its own.
            let (mut to_target_done, mut from_target_done) = (false, false);
            while !(to_target_done && from_target_done) {
                tokio::select! {
                    pumped = &mut to_target, if !to_target_done => {
                        if matches!(pumped, Pumped::Cut) {
                            return;
                        }
                        to_target_done = true;
                    }
                    pumped = &mut from_target, if !from_target_done => {
                        if matches!(pumped, Pumped::Cut) {
                            return;
                        }
                        from_target_done = true;
                    }
                }
            }
        });
    }
}

enum Pumped {
    Ended,
    Cut,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    direction: Direction,
    faults: &watch::Sender<Faults>,
    epoch: u64,
    forwarded_bytes: &AtomicU64,
) -> Pumped {
    let mut changes = faults.subscribe();
    let mut chunk = vec![0u8; CHUNK_BYTES];
    loop {
        // Wait while this direction is held (not reading: the sender feels it).
        let delay_ms = loop {
            let now = *changes.borrow_and_update();
            if now.cut_epoch != epoch {
                return Pumped::Cut;
            }
            if !now.holds(direction) {
                break now.delay_ms;
            }
            if changes.changed().await.is_err() {
                return Pumped::Cut;
            }
        };
        let read = tokio::select! {
            read = from.read(&mut chunk) => read,
            changed = changes.changed() => {
                if changed.is_err() {
                    return Pumped::Cut;
                }
                continue;
            }
        };
        let bytes = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return Pumped::Ended;
            }
            Ok(bytes) => bytes,
        };
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        // A hold or a cut set while this chunk was read applies to it too.
        loop {
            let now = *changes.borrow_and_update();
            if now.cut_epoch != epoch {
                return Pumped::Cut;
            }
            if !now.holds(direction) {
                break;
            }
            if changes.changed().await.is_err() {
                return Pumped::Cut;
            }
        }
        if to.write_all(&chunk[..bytes]).await.is_err() {
            return Pumped::Cut;
        }
        forwarded_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}
