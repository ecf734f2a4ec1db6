//! [`Broker`]: starts the runtime (recovery, listeners, accept loops) and stops it cleanly: stop
//! accepting, close every connection with 320 CONNECTION_FORCED, make the last removals durable.
//! Also puts reloaded TLS certificates in force ([`Broker::reload_tls`]).

use crate::alarms::AlarmState;
use crate::config::BrokerConfig;
use crate::connection;
use crate::core::{Core, blocking};
use crate::error::BrokerError;
use crate::tls::ServerTls;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long shutdown waits for connections to finish their close handshake.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running broker.
#[derive(Debug)]
pub struct Broker {
    core: Arc<Core>,
    local_addr: SocketAddr,
    amqps_local_addr: Option<SocketAddr>,
    mqtt_local_addr: Option<SocketAddr>,
    mqtts_local_addr: Option<SocketAddr>,
    tls: Option<Arc<ServerTls>>,
    shutdown: watch::Sender<bool>,
    /// One accept loop per listener (plain AMQP, TLS).
    accepts: Vec<tokio::task::JoinHandle<JoinSet<()>>>,
    timers: tokio::task::JoinHandle<()>,
    /// When it started (the clock's time), for the management interface's uptime.
    started_at_ms: u64,
    /// Its links to the other members, when it is a cluster's node.
    cluster: Option<Arc<wharf_cluster::Transport>>,
}

/// The longest the timer task sleeps: an operation that sets an earlier timer than the one it
/// sleeps towards is noticed at most this late.
const TIMER_POLL_MS: u64 = 20;
/// How often de-duplication key logs are trimmed.
const DEDUP_TRIM_INTERVAL_MS: u64 = 1000;
/// How often the memory and disk alarms are checked (RabbitMQ checks memory about this often).
const ALARM_CHECK_INTERVAL_MS: u64 = 1000;

impl Broker {
    /// Recovers the data directory, binds the listener and starts accepting connections.
    ///
    /// Needs tokio's multi-threaded runtime: the broker runs work that may block (definition
    /// writes, store round trips) in place on a worker after handing the worker's other tasks
    /// elsewhere, which a current-thread runtime cannot do. It refuses to start on one.
    pub async fn start(config: BrokerConfig) -> Result<Broker, BrokerError> {
        let flavor = tokio::runtime::Handle::current().runtime_flavor();
        if flavor != tokio::runtime::RuntimeFlavor::MultiThread {
            return Err(BrokerError::Runtime(format!(
                "the broker needs tokio's multi-threaded runtime, not {flavor:?} (e.g. #[tokio::main], or #[tokio::test(flavor = \"multi_thread\")])"
            )));
        }
        config.validate()?;
        let plain_address = config.plain_amqp.then_some(config.amqp_listen);
        let tls = config.tls.clone().map(ServerTls::load).transpose()?.map(Arc::new);
        let (core, startup) = tokio::task::spawn_blocking(move || Core::open(config))
            .await
            .map_err(|error| BrokerError::Startup(error.to_string()))??;
        let core = Arc::new(core);
        {
            let core = Arc::clone(&core);
            tokio::task::spawn_blocking(move || {
                core.apply(startup);
                core.declare_imported_topology();
            })
            .await
            .map_err(|error| BrokerError::Startup(error.to_string()))?;
        }
        let cluster = match &core.config.cluster {
            Some(cluster_config) => {
                let mut cluster_config = cluster_config.clone();
                if let Some(files) = &core.config.cluster_tls {
                    cluster_config.tls = Some(cluster_link_tls(files)?);
                }
                let node_id = cluster_config.node_id;
                let groups = wharf_raft::Groups::default();
                let handler = crate::cluster::handler(node_id, groups.clone(), Arc::downgrade(&core));
                let transport = Arc::new(wharf_cluster::Transport::start(&cluster_config, handler).await?);
                let _ = core.cluster_links.set((Arc::clone(&transport), groups.clone()));
                tokio::spawn(crate::cluster::watch_members(Arc::downgrade(&core), Arc::clone(&transport)));
                tokio::spawn(crate::cluster::elect_on_link_loss(Arc::downgrade(&core), Arc::clone(&transport)));
                core.homed_links.attach(Arc::downgrade(&core), Arc::clone(&transport));
                tokio::spawn(crate::cluster::reconcile_consumers(Arc::downgrade(&core)));
                // Quorum queues' groups first: the metadata group, catching up, may delete one.
                let recovered = std::mem::take(&mut *core.recovered_quorum.lock().unwrap_or_else(|p| p.into_inner()));
                for queue in recovered {
                    let Some(log) = queue.log else { continue };
                    let start = crate::cluster::GroupStart {
                        core: &core,
                        transport: &transport,
                        groups: &groups,
                        group: queue.definition.group,
                        vhost: &queue.vhost,
                        name: &queue.name,
                        members: &queue.definition.members,
                        settings: queue.settings,
                        log,
                        initialize: !queue.definition.joined,
                    };
                    if let Err(error) = crate::cluster::start_group(start).await {
                        tracing::error!(queue = %queue.name, %error, "a quorum queue's group did not start");
                    }
                }
                let log = core.metadata_log.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
                let log = log.ok_or_else(|| BrokerError::Startup("the metadata group's log was not opened".into()))?;
                let mut members = cluster_config.nodes.clone();
                members.entry(node_id).or_insert_with(|| transport.local_addr().to_string());
                let group = crate::cluster::MetaGroup::start(
                    &core,
                    Arc::clone(&transport),
                    &groups,
                    log,
                    members,
                    core.config.cluster_join,
                )
                .await?;
                // Set once, here: `metadata` is new with this core.
                let _ = core.metadata.set(Arc::new(group));
                Some(transport)
            }
            None => None,
        };
        // Every listener is bound before any is announced, so a client that saw one announced can
        // reach them all.
        let plain = match plain_address {
            Some(address) => Some(bind(address).await?),
            None => None,
        };
        let secure = match &tls {
            Some(tls) => Some(bind(tls.listen_address()).await?),
            None => None,
        };
        let mqtt = match core.config.mqtt.listen {
            Some(address) => Some(bind(address).await?),
            None => None,
        };
        let mqtts = match (core.config.mqtt.tls_listen, &tls) {
            (Some(address), Some(_)) => Some(bind(address).await?),
            _ => None,
        };
        let timers = tokio::spawn(run_timers(Arc::clone(&core)));
        let (shutdown, shutdown_receiver) = watch::channel(false);
        let mut accepts = Vec::new();
        let mut local_addr = None;
        if let Some((listener, address)) = plain {
            tracing::info!(local_addr = %address, "accepting AMQP connections");
            local_addr = Some(address);
            accepts.push(tokio::spawn(accept_loop(
                listener,
                Arc::clone(&core),
                shutdown_receiver.clone(),
                Speaks::Amqp,
            )));
        }
        let mut mqtt_local_addr = None;
        if let Some((listener, address)) = mqtt {
            tracing::info!(local_addr = %address, "accepting MQTT connections");
            mqtt_local_addr = Some(address);
            accepts.push(tokio::spawn(accept_loop(
                listener,
                Arc::clone(&core),
                shutdown_receiver.clone(),
                Speaks::Mqtt,
            )));
        }
        let mut mqtts_local_addr = None;
        if let (Some((listener, address)), Some(tls)) = (mqtts, &tls) {
            tracing::info!(local_addr = %address, "accepting MQTT connections over TLS");
            mqtts_local_addr = Some(address);
            let speaks = Speaks::MqttOverTls(Arc::clone(tls));
            accepts.push(tokio::spawn(accept_loop(listener, Arc::clone(&core), shutdown_receiver.clone(), speaks)));
        }
        let mut amqps_local_addr = None;
        if let (Some((listener, address)), Some(tls)) = (secure, &tls) {
            tracing::info!(local_addr = %address, "accepting AMQP connections over TLS");
            amqps_local_addr = Some(address);
            let speaks = Speaks::AmqpOverTls(Arc::clone(tls));
            accepts.push(tokio::spawn(accept_loop(listener, Arc::clone(&core), shutdown_receiver, speaks)));
        }
        // `validate` made sure at least one listener is configured.
        let local_addr = local_addr
            .or(amqps_local_addr)
            .ok_or_else(|| BrokerError::Startup("no listener: plain AMQP is off and TLS is not configured".into()))?;
        let started_at_ms = core.now_ms();
        Ok(Broker {
            core,
            local_addr,
            amqps_local_addr,
            mqtt_local_addr,
            mqtts_local_addr,
            tls,
            shutdown,
            accepts,
            timers,
            started_at_ms,
            cluster,
        })
    }

    /// Reads the TLS certificate, key and CA files again and uses them for every TLS handshake
    /// from now on; open connections keep going on the settings they began with. If the files
    /// cannot be used, the settings in force stay and the error says why. Without TLS there is
    /// nothing to reload.
    pub fn reload_tls(&self) -> Result<(), BrokerError> {
        let Some(tls) = &self.tls else { return Ok(()) };
        match blocking(|| tls.reload()) {
            Ok(()) => {
                tracing::info!("TLS certificates reloaded");
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, "reloading TLS certificates failed; the previous ones stay in force");
                Err(error.into())
            }
        }
    }

    /// The broker's shared state, for the crate's own tests.
    #[cfg(test)]
    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// The management interface's handle on this broker (see `manage/`).
    pub fn management(&self) -> crate::Management {
        let listeners = crate::manage::Listeners {
            amqp: self.core.config.plain_amqp.then_some(self.local_addr),
            amqps: self.amqps_local_addr,
            tls: self.tls.clone(),
            cluster: self.cluster.clone(),
        };
        crate::Management::new(Arc::clone(&self.core), self.started_at_ms, listeners)
    }

    /// What the broker counted (dead letters, expiries, duplicates dropped, leases expired, …).
    pub fn counters(&self) -> wharf_model::Counters {
        self.core.counters()
    }

    /// Fires every timer due at the clock's current time (TTLs, leases, backoffs, delayed
    /// messages, `x-expires`) and trims de-duplication logs, and returns once that is done. The
    /// broker does this by itself as time passes; with a [`ManualClock`](crate::ManualClock) a
    /// test calls it after advancing the clock, to know the broker has acted on the new time.
    pub async fn fire_due_timers(&self) {
        let core = Arc::clone(&self.core);
        let fired = tokio::task::spawn_blocking(move || {
            core.tick();
            core.trim_dedup_logs();
        })
        .await;
        if fired.is_err() {
            tracing::error!("firing due timers failed");
        }
    }

    /// Raises or clears the memory and disk alarms for what the broker holds now and the free
    /// space now, and returns the state. The broker does this by itself every second; a test
    /// calls it to know the broker has acted on a change.
    pub async fn check_alarms(&self) -> AlarmState {
        let core = Arc::clone(&self.core);
        tokio::task::spawn_blocking(move || core.check_alarms()).await.unwrap_or_default()
    }

    /// The alarms raised now.
    pub fn alarms(&self) -> AlarmState {
        self.core.alarms.state()
    }

    /// Where the broker accepts plain AMQP connections (useful when listening on port 0); with
    /// plain AMQP off, where it accepts TLS ones: the one address every broker has.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the broker accepts links from the cluster's other nodes, if it is a cluster's node.
    pub fn cluster_local_addr(&self) -> Option<SocketAddr> {
        self.cluster.as_ref().map(|cluster| cluster.local_addr())
    }

    /// Where the broker accepts MQTT connections, if it does.
    pub fn mqtt_local_addr(&self) -> Option<SocketAddr> {
        self.mqtt_local_addr
    }

    /// Where the broker accepts MQTT over TLS, if it does.
    pub fn mqtts_local_addr(&self) -> Option<SocketAddr> {
        self.mqtts_local_addr
    }

    /// Where the broker accepts AMQP over TLS, if it does.
    pub fn amqps_local_addr(&self) -> Option<SocketAddr> {
        self.amqps_local_addr
    }

    /// Open client connections.
    pub fn connection_count(&self) -> usize {
        self.core.connections.count()
    }

    /// Resolves when the store has failed and the broker must stop (the reason).
    pub async fn fatal_error(&self) -> String {
        let mut fatal = self.core.fatal.subscribe();
        loop {
            if let Some(reason) = fatal.borrow().clone() {
                return reason;
            }
            if fatal.changed().await.is_err() {
                return "broker stopped".into();
            }
        }
    }

    /// Stops accepting, closes every connection with 320 CONNECTION_FORCED, waits (bounded) for
    /// them to finish, and closes the store so pending removals are durable.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        for group in self.core.quorum.all() {
            group.shutdown().await;
        }
        if let Some(group) = self.core.metadata_group() {
            group.shutdown().await;
        }
        if let Some(cluster) = &self.cluster {
            cluster.shutdown().await;
        }
        let mut open = Vec::new();
        for accept in self.accepts {
            if let Ok(connections) = accept.await {
                open.push(connections);
            }
        }
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            for connections in &mut open {
                while connections.join_next().await.is_some() {}
            }
        });
        if drained.await.is_err() {
            tracing::warn!("connections still open after the shutdown grace period; aborting them");
        }
        self.timers.abort();
        let _ = self.timers.await;
        // Dead-letter transfers still removing their originals finish first (bounded: past the
        // grace period an original left behind is dead-lettered again after the restart, at
        // least once, as after a crash).
        if tokio::time::timeout(SHUTDOWN_GRACE, self.core.transfer_removals.settled()).await.is_err() {
            tracing::warn!("dead-letter transfers still removing their originals after the grace period");
        }
        let core = self.core;
        // Closing the store makes the last removals durable and leaves its clean-stop marker.
        let closed = tokio::task::spawn_blocking(move || core.store.clone().close()).await;
        match closed {
            Ok(Ok(())) => tracing::info!("store closed"),
            Ok(Err(error)) => tracing::error!(%error, "closing the store failed"),
            Err(error) => tracing::error!(%error, "closing the store failed"),
        }
    }
}

/// The cluster links' TLS from its PEM files, with an error naming the file that cannot be used.
fn cluster_link_tls(files: &crate::config::ClusterTlsFiles) -> Result<wharf_cluster::LinkTls, BrokerError> {
    let read = |setting: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|error| {
            BrokerError::Config(crate::config::ConfigError(format!(
                "{setting}: cannot read {}: {error}",
                path.display()
            )))
        })
    };
    let chain = read("cluster_tls_cert", &files.cert_path)?;
    let key = read("cluster_tls_key", &files.key_path)?;
    let ca = read("cluster_tls_ca_cert", &files.ca_cert_path)?;
    let what = format!(
        "cluster TLS ({}, {}, {})",
        files.cert_path.display(),
        files.key_path.display(),
        files.ca_cert_path.display()
    );
    Ok(wharf_cluster::LinkTls::from_pem(&chain, &key, &ca, &what)?)
}

/// Fires the model's timers (TTLs, leases, backoffs, delayed messages, `x-expires`) when they
/// are due, and trims de-duplication key logs. Timer work that blocks (store removals, creating an
/// automatic dead-letter queue) runs off the async workers.
async fn run_timers(core: Arc<Core>) {
    let mut last_trim_ms = 0;
    // Alarms follow real time, not the broker's clock (a manual clock in tests stands still).
    let mut last_alarm_check = tokio::time::Instant::now();
    loop {
        let now = core.now_ms();
        let wait_ms = core.next_timer_ms().map_or(TIMER_POLL_MS, |at| at.saturating_sub(now).min(TIMER_POLL_MS));
        if wait_ms > 0 {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
        let now = core.now_ms();
        let trim = now.saturating_sub(last_trim_ms) >= DEDUP_TRIM_INTERVAL_MS;
        if trim {
            last_trim_ms = now;
        }
        if last_alarm_check.elapsed() >= Duration::from_millis(ALARM_CHECK_INTERVAL_MS) {
            last_alarm_check = tokio::time::Instant::now();
            let core = Arc::clone(&core);
            if tokio::task::spawn_blocking(move || core.check_alarms()).await.is_err() {
                tracing::error!("the alarm check failed");
            }
        }
        let due = core.next_timer_ms().is_some_and(|at| at <= now);
        if due || trim {
            let core = Arc::clone(&core);
            let worked = tokio::task::spawn_blocking(move || {
                if due {
                    core.tick();
                }
                if trim {
                    core.trim_dedup_logs();
                }
            })
            .await;
            if worked.is_err() {
                tracing::error!("the timer task failed");
            }
        }
    }
}

async fn bind(address: SocketAddr) -> Result<(TcpListener, SocketAddr), BrokerError> {
    let listener = TcpListener::bind(address).await.map_err(|source| BrokerError::Listen { address, source })?;
    let local_addr = listener.local_addr().map_err(|source| BrokerError::Listen { address, source })?;
    Ok((listener, local_addr))
}

/// What a listener's sockets speak.
enum Speaks {
    Amqp,
    AmqpOverTls(Arc<ServerTls>),
    Mqtt,
    MqttOverTls(Arc<ServerTls>),
}

/// Accepts sockets on one listener until shutdown.
async fn accept_loop(
    listener: TcpListener,
    core: Arc<Core>,
    mut shutdown: watch::Receiver<bool>,
    speaks: Speaks,
) -> JoinSet<()> {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                // The handshake slot is taken here, in accept order, so the cap applies to sockets
                // exactly as they arrive.
                Ok((socket, peer)) => match core.connections.begin_handshake(peer.ip()) {
                    Some(slot) => {
                        let core = Arc::clone(&core);
                        match &speaks {
                            Speaks::Amqp => connections.spawn(connection::serve_plain(core, socket, peer, shutdown.clone(), slot)),
                            // The settings in force at accept: a reload applies from the next socket.
                            Speaks::AmqpOverTls(tls) => connections.spawn(crate::tls::serve(core, socket, peer, shutdown.clone(), slot, tls.acceptor())),
                            Speaks::Mqtt => connections.spawn(crate::mqtt::serve(core, socket, peer, shutdown.clone(), slot)),
                            Speaks::MqttOverTls(tls) => connections.spawn(crate::mqtt::serve_tls(core, socket, peer, shutdown.clone(), slot, tls.acceptor())),
                        };
                    }
                    None => {
                        tracing::warn!(%peer, "connection refused: too many handshakes in progress (in all, or from this address)");
                        drop(socket);
                    }
                },
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
        // Reap finished connection tasks so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    connections
}
