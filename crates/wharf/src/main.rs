//! `wharf`: the broker's binary. The only crate that reads the environment, parses flags and
//! configuration files, installs logging and handles signals.
//!
//! `wharf serve` starts the broker with zero configuration (port 5672, data in `./wharf-data`,
//! `guest`/`guest` from loopback). Every setting can come from a flag, a `WHARF_*` variable or the
//! TOML file named by `--config`; flags win over variables, variables over the file, the file over
//! the defaults. SIGTERM and SIGINT stop the broker cleanly; SIGHUP reloads its TLS certificates.
//! `wharf admin …` administers a running broker through its management API (`admin.rs`);
//! `wharf relay …` runs the outbox relay for services in any language (`relay.rs`).

mod admin;
mod relay;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use wharf_broker::{
    Broker, BrokerConfig, DEFINITIONS_BYTES_MAX, Definitions, PasswordHash, Permission, TlsConfig, TopicPermission,
    User, UserLimits, VhostLimits,
};

#[derive(Debug, Parser)]
#[command(name = "wharf", version, about = "A durable AMQP 0-9-1 message broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(Box<ServeArgs>),
    /// Administer a running broker through its management API (queues, exchanges,
    /// connections, consumers, purge, delete, definitions, peeking into a queue).
    Admin(admin::AdminArgs),
    /// Run the outbox relay for a PostgreSQL, MySQL or SQLite outbox table (docs/outbox-contract.md):
    /// rows written by services in any language are published with confirms.
    Relay(Box<relay::RelayArgs>),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "WHARF_CONFIG")]
    config: Option<PathBuf>,
    /// Address for plain AMQP connections, or `none` for TLS only [default: 0.0.0.0:5672].
    #[arg(long, env = "WHARF_AMQP_LISTEN")]
    amqp_listen: Option<Listen>,
    /// Address for AMQP over TLS (RabbitMQ uses port 5671); needs --tls-cert and --tls-key.
    #[arg(long, env = "WHARF_AMQPS_LISTEN")]
    amqps_listen: Option<SocketAddr>,
    /// Address for MQTT 3.1.1 and 5.0 connections, or `none` to turn MQTT off
    /// [default: 0.0.0.0:1883].
    #[arg(long, env = "WHARF_MQTT_LISTEN")]
    mqtt_listen: Option<Listen>,
    /// Address for MQTT over TLS (RabbitMQ uses port 8883), with the AMQPS certificate settings
    /// (--amqps-listen, --tls-cert, --tls-key).
    #[arg(long, env = "WHARF_MQTTS_LISTEN")]
    mqtts_listen: Option<SocketAddr>,
    /// The topic exchange MQTT publishes go to and subscriptions bind to [default: amq.topic].
    #[arg(long, env = "WHARF_MQTT_EXCHANGE")]
    mqtt_exchange: Option<String>,
    /// The vhost of an MQTT client whose user name names none (`vhost:user` names one)
    /// [default: /].
    #[arg(long, env = "WHARF_MQTT_VHOST")]
    mqtt_vhost: Option<String>,
    /// Address for the management HTTP API (RabbitMQ's management API), or `none` to turn it off
    /// [default: 0.0.0.0:15672].
    #[arg(long, env = "WHARF_HTTP_LISTEN")]
    http_listen: Option<Listen>,
    /// Address for the management API over TLS (RabbitMQ uses port 15671), with the AMQPS
    /// certificate settings (--amqps-listen, --tls-cert, --tls-key).
    #[arg(long, env = "WHARF_HTTPS_LISTEN")]
    https_listen: Option<SocketAddr>,
    /// The server's certificate chain, PEM (its own certificate first). Reloaded on SIGHUP.
    #[arg(long, env = "WHARF_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The server certificate's private key, PEM. Reloaded on SIGHUP.
    #[arg(long, env = "WHARF_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are verified against; a client with a
    /// verified certificate may log in with SASL EXTERNAL as its CN. Reloaded on SIGHUP.
    #[arg(long, env = "WHARF_TLS_CA_CERT")]
    tls_ca_cert: Option<PathBuf>,
    /// Require a client certificate signed by a CA in --tls-ca-cert (mutual TLS).
    #[arg(long, env = "WHARF_TLS_VERIFY_PEER")]
    tls_verify_peer: bool,
    /// Data directory [default: ./wharf-data].
    #[arg(long, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Heartbeat interval offered to clients, in seconds (0 disables) [default: 60].
    #[arg(long, env = "WHARF_HEARTBEAT_S")]
    heartbeat_s: Option<u16>,
    /// Largest frame accepted, in bytes (4096 to 131072) [default: 131072].
    #[arg(long, env = "WHARF_FRAME_MAX")]
    frame_max: Option<u32>,
    /// Largest message body accepted, in bytes [default: 134217728].
    #[arg(long, env = "WHARF_MESSAGE_BYTES_MAX")]
    message_bytes_max: Option<u64>,
    /// Most logged-in client connections at once [default: 10000].
    #[arg(long, env = "WHARF_CONNECTIONS_MAX")]
    connections_max: Option<usize>,
    /// Most sockets still in their handshake (not yet logged in) at once, counted apart from
    /// logged-in connections [default: 1024].
    #[arg(long, env = "WHARF_HANDSHAKES_MAX")]
    handshakes_max: Option<usize>,
    /// Most sockets in their handshake from one source address [default: 256].
    #[arg(long, env = "WHARF_HANDSHAKES_PER_ADDRESS_MAX")]
    handshakes_per_address_max: Option<usize>,
    /// How long a socket has to finish its handshake, in milliseconds [default: 10000].
    #[arg(long, env = "WHARF_HANDSHAKE_TIMEOUT_MS")]
    handshake_timeout_ms: Option<u64>,
    /// Under pipelined load, how long a batch of appends waits for more before it is synced, in
    /// microseconds (0 disables; larger favours throughput over confirm latency) [default: 1000].
    #[arg(long, env = "WHARF_GROUP_COMMIT_DELAY_US")]
    group_commit_delay_us: Option<u64>,
    /// Body bytes of queued messages each durable queue keeps in memory; further persistent
    /// messages are read back from disk when delivered [default: 8388608 (8 MiB)].
    #[arg(long, env = "WHARF_QUEUE_BODY_MEMORY_BYTES_MAX")]
    queue_body_memory_bytes_max: Option<u64>,
    /// The most events each message's delivery trace keeps (its publish, each delivery that did
    /// not end in an ack and what became of it, dead-letter hops, replays), at most 48; 0 turns
    /// traces off [default: 16].
    #[arg(long, env = "WHARF_MESSAGE_TRACE_EVENTS_MAX")]
    message_trace_events_max: Option<usize>,
    /// A RabbitMQ definitions file (JSON, as `rabbitmqctl export_definitions` writes it) to load at
    /// start: users, vhosts, permissions, limits, policies, exchanges, queues and bindings.
    /// Loading is idempotent; users of the configuration file keep working.
    #[arg(long, env = "WHARF_DEFINITIONS", value_name = "FILE")]
    definitions: Option<PathBuf>,
    /// Most channels per connection offered to clients [default: 2047].
    #[arg(long, env = "WHARF_CHANNEL_MAX")]
    channel_max: Option<u16>,
    /// How long a consumer may keep a delivery unacknowledged before it goes back to its queue,
    /// for queues without their own `x-consumer-timeout`, in milliseconds (0: no timeout)
    /// [default: 1800000 (30 minutes)].
    #[arg(long, env = "WHARF_CONSUMER_TIMEOUT_MS")]
    consumer_timeout_ms: Option<u64>,
    /// Memory alarm: above this many bytes of messages held in memory (queued bodies, unfinished
    /// bodies, transaction buffers), publishing connections are blocked [default: 40% of the
    /// machine's memory].
    #[arg(long, env = "WHARF_MEMORY_HIGH_WATERMARK_BYTES")]
    memory_high_watermark_bytes: Option<u64>,
    /// Disk alarm: with less free space than this on the data directory's file system, publishing
    /// connections are blocked [default: 50 MB plus --message-bytes-max].
    #[arg(long, env = "WHARF_DISK_FREE_LIMIT_BYTES")]
    disk_free_limit_bytes: Option<u64>,
    /// A policy, as JSON: {"name": "retry", "pattern": "^orders\\.", "apply_to": "queues",
    /// "priority": 0, "vhost": "/", "definition": {"delivery-limit": 5}}. Repeatable; a policy
    /// here replaces one of the same name and vhost from the configuration file.
    #[arg(long = "policy", value_name = "JSON")]
    policies: Vec<String>,
    /// This node's id in a cluster: a number, not 0, unique among the members. With
    /// --cluster-listen and --cluster-node; without any of the three the broker runs on its own.
    #[arg(long, env = "WHARF_NODE_ID")]
    node_id: Option<u64>,
    /// Address for links from the cluster's other nodes (RabbitMQ's inter-node port is 25672)
    /// [default: 0.0.0.0:25672 when --node-id is given].
    #[arg(long, env = "WHARF_CLUSTER_LISTEN")]
    cluster_listen: Option<SocketAddr>,
    /// An initial member of the cluster as ID=HOST:PORT (its --cluster-listen address). Repeat
    /// once per member; this node may be listed (its address there is the one the others use).
    #[arg(long = "cluster-node", env = "WHARF_CLUSTER_NODES", value_delimiter = ',', value_name = "ID=HOST:PORT")]
    cluster_nodes: Vec<String>,
    /// TLS on the cluster's links: this node's certificate (PEM, its own first), used both to
    /// accept and to dial links; with --cluster-tls-key and --cluster-tls-ca-cert. Every node's
    /// certificate must be signed by that CA and name the host the others dial.
    #[arg(long, env = "WHARF_CLUSTER_TLS_CERT")]
    cluster_tls_cert: Option<PathBuf>,
    /// The private key of --cluster-tls-cert (PEM).
    #[arg(long, env = "WHARF_CLUSTER_TLS_KEY")]
    cluster_tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) that sign the cluster's nodes.
    #[arg(long, env = "WHARF_CLUSTER_TLS_CA_CERT")]
    cluster_tls_ca_cert: Option<PathBuf>,
    /// Join a running cluster: wait to be added (`wharf admin cluster add ID=HOST:PORT` on any
    /// member) instead of forming a new cluster with the --cluster-node members; list the
    /// members and this node with --cluster-node.
    #[arg(long, env = "WHARF_CLUSTER_JOIN")]
    cluster_join: bool,
    /// Entries of a quorum queue's Raft log between two snapshots of its replica; the log
    /// before a snapshot is then purged [default: 4096].
    #[arg(long, env = "WHARF_QUORUM_SNAPSHOT_ENTRIES")]
    quorum_snapshot_entries: Option<u64>,
    /// Entries of the metadata group's Raft log (definition changes) between two snapshots of
    /// the replicated definitions; the log before a snapshot is then purged [default: 4096].
    #[arg(long, env = "WHARF_METADATA_SNAPSHOT_ENTRIES")]
    metadata_snapshot_entries: Option<u64>,
    /// Log filter (tracing syntax) [default: info].
    #[arg(long, env = "WHARF_LOG", default_value = "info")]
    log: String,
}

/// The TOML file's shape; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    amqp_listen: Option<Listen>,
    amqps_listen: Option<SocketAddr>,
    mqtt_listen: Option<Listen>,
    mqtts_listen: Option<SocketAddr>,
    mqtt_exchange: Option<String>,
    mqtt_vhost: Option<String>,
    http_listen: Option<Listen>,
    https_listen: Option<SocketAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca_cert: Option<PathBuf>,
    tls_verify_peer: Option<bool>,
    data_dir: Option<PathBuf>,
    heartbeat_s: Option<u16>,
    frame_max: Option<u32>,
    message_bytes_max: Option<u64>,
    connections_max: Option<usize>,
    handshakes_max: Option<usize>,
    handshakes_per_address_max: Option<usize>,
    handshake_timeout_ms: Option<u64>,
    group_commit_delay_us: Option<u64>,
    queue_body_memory_bytes_max: Option<u64>,
    message_trace_events_max: Option<usize>,
    users: Option<Vec<FileUser>>,
    vhosts: Option<Vec<String>>,
    policies: Option<Vec<FilePolicy>>,
    definitions: Option<PathBuf>,
    channel_max: Option<u16>,
    consumer_timeout_ms: Option<u64>,
    vhost_limits: Option<Vec<FileVhostLimits>>,
    user_limits: Option<Vec<FileUserLimits>>,
    memory_high_watermark_bytes: Option<u64>,
    disk_free_limit_bytes: Option<u64>,
    node_id: Option<u64>,
    cluster_listen: Option<SocketAddr>,
    /// `ID=HOST:PORT` per initial member, as `--cluster-node`.
    cluster_nodes: Option<Vec<String>>,
    cluster_tls_cert: Option<PathBuf>,
    cluster_tls_key: Option<PathBuf>,
    cluster_tls_ca_cert: Option<PathBuf>,
    quorum_snapshot_entries: Option<u64>,
    metadata_snapshot_entries: Option<u64>,
    cluster_join: Option<bool>,
}

/// A user's permissions on one vhost (RabbitMQ's `set_permissions`): regular expressions over
/// the names of exchanges and queues.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePermission {
    #[serde(default = "default_vhost")]
    vhost: String,
    configure: String,
    write: String,
    read: String,
}

/// A user's topic permission (RabbitMQ's `set_topic_permissions`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTopicPermission {
    #[serde(default = "default_vhost")]
    vhost: String,
    exchange: String,
    write: String,
    read: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVhostLimits {
    vhost: String,
    connections_max: Option<u32>,
    queues_max: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUserLimits {
    user: String,
    connections_max: Option<u32>,
    channels_max: Option<u32>,
}

/// Where a listener listens: an address, or `none` (plain AMQP off, TLS only; the HTTP API off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
enum Listen {
    At(SocketAddr),
    Off,
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "none" {
            return Ok(Listen::Off);
        }
        text.parse().map(Listen::At).map_err(|_| format!("{text:?} is neither an address (host:port) nor `none`"))
    }
}

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

/// A policy, as RabbitMQ's `set_policy` takes it: the definition's keys are the `x-` arguments
/// without `x-` (`delivery-limit`, `dead-letter-exchange`, `message-ttl`, ...).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    name: String,
    pattern: String,
    definition: serde_json::Value,
    #[serde(default = "default_vhost")]
    vhost: String,
    #[serde(default = "default_apply_to")]
    apply_to: String,
    #[serde(default)]
    priority: i64,
}

fn default_vhost() -> String {
    "/".into()
}

fn default_apply_to() -> String {
    "all".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUser {
    name: String,
    /// In clear (hashed at start; only the hash is kept in memory).
    password: Option<String>,
    /// Or a hash as RabbitMQ exports it (`rabbitmqctl export_definitions`), so the password need
    /// not be written down at all.
    password_hash: Option<String>,
    /// The hash's algorithm, by RabbitMQ's name [default: rabbit_password_hashing_sha256].
    hashing_algorithm: Option<String>,
    #[serde(default)]
    loopback_only: bool,
    /// RabbitMQ's user tags (`administrator`, `monitoring`, …).
    #[serde(default)]
    tags: Vec<String>,
    /// Permissions per vhost; a user without any has every right on every vhost (as before
    /// permissions existed, so older files keep working).
    permissions: Option<Vec<FilePermission>>,
    #[serde(default)]
    topic_permissions: Vec<FileTopicPermission>,
}

impl FileUser {
    /// Adds this user's permissions to `config`; false if it lists none.
    fn add_permissions(&self, config: &mut BrokerConfig) -> bool {
        for permission in self.permissions.iter().flatten() {
            config.permissions.push(Permission {
                user: self.name.clone(),
                vhost: permission.vhost.clone(),
                configure: permission.configure.clone(),
                write: permission.write.clone(),
                read: permission.read.clone(),
            });
        }
        for topic in &self.topic_permissions {
            config.topic_permissions.push(TopicPermission {
                user: self.name.clone(),
                vhost: topic.vhost.clone(),
                exchange: topic.exchange.clone(),
                write: topic.write.clone(),
                read: topic.read.clone(),
            });
        }
        self.permissions.is_some()
    }

    fn into_user(self) -> Result<User> {
        let password = match (self.password, self.password_hash) {
            (Some(password), None) => PasswordHash::new(&password),
            (None, Some(hash)) => {
                let algorithm = self.hashing_algorithm.as_deref().unwrap_or("rabbit_password_hashing_sha256");
                PasswordHash::from_rabbitmq(&hash, algorithm)
                    .map_err(|error| anyhow::anyhow!("user '{}': {error}", self.name))?
            }
            _ => bail!("user '{}' needs exactly one of password and password_hash", self.name),
        };
        // RabbitMQ's `loopback_users` default: `guest` logs in from loopback only, wherever it is
        // defined.
        let loopback_only = self.loopback_only || self.name == "guest";
        Ok(User { name: self.name, password, loopback_only, tags: self.tags })
    }
}

/// Reads and parses a definitions file, logging a warning for everything in it Wharf does not use.
fn read_definitions(path: &Path) -> Result<Definitions> {
    let size = std::fs::metadata(path).with_context(|| format!("reading definitions file {}", path.display()))?.len();
    if size > DEFINITIONS_BYTES_MAX as u64 {
        bail!("definitions file {} is larger than {DEFINITIONS_BYTES_MAX} bytes", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading definitions file {}", path.display()))?;
    let definitions =
        Definitions::parse(&bytes).with_context(|| format!("definitions file {} is not valid", path.display()))?;
    for warning in &definitions.warnings {
        tracing::warn!(file = %path.display(), "definitions file: {warning}");
    }
    tracing::info!(
        file = %path.display(),
        users = definitions.users.len(),
        vhosts = definitions.vhosts.len(),
        permissions = definitions.permissions.len(),
        policies = definitions.policies.len(),
        exchanges = definitions.topology.exchanges.len(),
        queues = definitions.topology.queues.len(),
        bindings = definitions.topology.bindings.len(),
        "definitions file read"
    );
    Ok(definitions)
}

/// The TLS settings from flags, variables and the file; refused when some are set but TLS could
/// not run (an address without a certificate, or certificates without an address).
fn tls_config(args: &ServeArgs, file: &FileConfig) -> Result<Option<TlsConfig>> {
    let amqps_listen = args.amqps_listen.or(file.amqps_listen);
    let cert = args.tls_cert.clone().or_else(|| file.tls_cert.clone());
    let key = args.tls_key.clone().or_else(|| file.tls_key.clone());
    let ca_cert = args.tls_ca_cert.clone().or_else(|| file.tls_ca_cert.clone());
    let verify_peer = args.tls_verify_peer || file.tls_verify_peer.unwrap_or(false);
    let Some(amqps_listen) = amqps_listen else {
        if cert.is_some() || key.is_some() || ca_cert.is_some() || verify_peer {
            bail!("TLS settings are given but --amqps-listen (amqps_listen) is not: TLS would not be used");
        }
        return Ok(None);
    };
    let (Some(cert), Some(key)) = (cert, key) else {
        bail!("--amqps-listen (amqps_listen) needs --tls-cert and --tls-key (tls_cert, tls_key)");
    };
    Ok(Some(TlsConfig { amqps_listen, cert_path: cert, key_path: key, ca_cert_path: ca_cert, verify_peer }))
}

/// RabbitMQ's inter-node port, the default for --cluster-listen.
const CLUSTER_PORT_DEFAULT: u16 = 25672;

/// The cluster settings from flags, variables and the file: `None` for a broker on its own;
/// refused when some are given without --node-id, or do not describe a cluster.
fn cluster_config(args: &ServeArgs, file: &FileConfig) -> Result<Option<wharf_broker::ClusterConfig>> {
    let node_id = args.node_id.or(file.node_id);
    let listen = args.cluster_listen.or(file.cluster_listen);
    let nodes = if args.cluster_nodes.is_empty() {
        file.cluster_nodes.clone().unwrap_or_default()
    } else {
        args.cluster_nodes.clone()
    };
    let Some(node_id) = node_id else {
        if listen.is_some() || !nodes.is_empty() {
            bail!("--cluster-listen and --cluster-node (cluster_listen, cluster_nodes) need --node-id (node_id)");
        }
        return Ok(None);
    };
    let listen = listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], CLUSTER_PORT_DEFAULT)));
    let members = nodes.iter().map(|text| wharf_broker::parse_cluster_node(text)).collect::<Result<Vec<_>, _>>()?;
    Ok(Some(wharf_broker::ClusterConfig::new(node_id, listen, members)?))
}

/// The cluster links' TLS files: all three or none.
fn cluster_tls(args: &ServeArgs, file: &FileConfig) -> Result<Option<wharf_broker::ClusterTlsFiles>> {
    let cert = args.cluster_tls_cert.clone().or_else(|| file.cluster_tls_cert.clone());
    let key = args.cluster_tls_key.clone().or_else(|| file.cluster_tls_key.clone());
    let ca_cert = args.cluster_tls_ca_cert.clone().or_else(|| file.cluster_tls_ca_cert.clone());
    match (cert, key, ca_cert) {
        (None, None, None) => Ok(None),
        (Some(cert_path), Some(key_path), Some(ca_cert_path)) => {
            Ok(Some(wharf_broker::ClusterTlsFiles { cert_path, key_path, ca_cert_path }))
        }
        _ => bail!(
            "cluster TLS needs all of --cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca-cert (cluster_tls_cert, cluster_tls_key, cluster_tls_ca_cert)"
        ),
    }
}

fn read_file_config(path: &Path) -> Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading configuration file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("configuration file {} is not valid", path.display()))
}

/// Merges flags and variables (already merged by clap) over the file over the defaults, and checks
/// the result.
fn broker_config(args: &ServeArgs) -> Result<BrokerConfig> {
    let file = match &args.config {
        Some(path) => read_file_config(path)?,
        None => FileConfig::default(),
    };
    let data_dir = args.data_dir.clone().or(file.data_dir.clone()).unwrap_or_else(|| PathBuf::from("wharf-data"));
    let mut config = BrokerConfig::new(data_dir);
    match args.amqp_listen.or(file.amqp_listen) {
        Some(Listen::At(address)) => config.amqp_listen = address,
        Some(Listen::Off) => config.plain_amqp = false,
        None => {}
    }
    config.tls = tls_config(args, &file)?;
    config.cluster = cluster_config(args, &file)?;
    config.cluster_tls = cluster_tls(args, &file)?;
    config.mqtt.listen = match args.mqtt_listen.or(file.mqtt_listen) {
        Some(Listen::At(address)) => Some(address),
        Some(Listen::Off) => None,
        None => Some(SocketAddr::from(([0, 0, 0, 0], 1883))),
    };
    config.mqtt.tls_listen = args.mqtts_listen.or(file.mqtts_listen);
    if let Some(exchange) = args.mqtt_exchange.clone().or(file.mqtt_exchange.clone()) {
        config.mqtt.exchange = exchange;
    }
    if let Some(vhost) = args.mqtt_vhost.clone().or(file.mqtt_vhost.clone()) {
        config.mqtt.vhost = vhost;
    }
    if let Some(heartbeat_s) = args.heartbeat_s.or(file.heartbeat_s) {
        config.heartbeat_s = heartbeat_s;
    }
    if let Some(frame_max) = args.frame_max.or(file.frame_max) {
        config.frame_max = frame_max;
    }
    if let Some(message_bytes_max) = args.message_bytes_max.or(file.message_bytes_max) {
        config.message_bytes_max = message_bytes_max;
    }
    if let Some(connections_max) = args.connections_max.or(file.connections_max) {
        config.connections_max = connections_max;
    }
    if let Some(handshakes_max) = args.handshakes_max.or(file.handshakes_max) {
        config.handshakes_max = handshakes_max;
    }
    if let Some(per_address_max) = args.handshakes_per_address_max.or(file.handshakes_per_address_max) {
        config.handshakes_per_address_max = per_address_max;
    }
    if let Some(handshake_timeout_ms) = args.handshake_timeout_ms.or(file.handshake_timeout_ms) {
        config.handshake_timeout_ms = handshake_timeout_ms;
    }
    if let Some(vhosts) = file.vhosts {
        config.vhosts.extend(vhosts);
    }
    if let Some(delay_us) = args.group_commit_delay_us.or(file.group_commit_delay_us) {
        config.store.group_commit_delay_us = delay_us;
    }
    if let Some(bytes) = args.queue_body_memory_bytes_max.or(file.queue_body_memory_bytes_max) {
        config.queue_body_memory_bytes_max = bytes;
    }
    if let Some(events) = args.message_trace_events_max.or(file.message_trace_events_max) {
        config.message_trace_events_max = events;
    }
    let mut policies = file.policies.unwrap_or_default();
    for text in &args.policies {
        let policy: FilePolicy =
            serde_json::from_str(text).with_context(|| format!("--policy {text}: not a policy in JSON"))?;
        policies.retain(|existing| !(existing.name == policy.name && existing.vhost == policy.vhost));
        policies.push(policy);
    }
    for policy in policies {
        let checked = wharf_broker::policy_from_json(
            &policy.name,
            &policy.pattern,
            &policy.apply_to,
            policy.priority,
            &policy.definition,
        )
        .map_err(|reason| anyhow::anyhow!("policy '{}' is not valid: {reason}", policy.name))?;
        config.policies.push((policy.vhost, checked));
    }
    if let Some(bytes) = args.memory_high_watermark_bytes.or(file.memory_high_watermark_bytes) {
        config.memory_high_watermark_bytes = bytes;
    }
    if let Some(bytes) = args.disk_free_limit_bytes.or(file.disk_free_limit_bytes) {
        config.disk_free_limit_bytes = Some(bytes);
    }
    config.cluster_join = args.cluster_join || file.cluster_join.unwrap_or(false);
    if let Some(entries) = args.quorum_snapshot_entries.or(file.quorum_snapshot_entries) {
        config.quorum_snapshot_entries = entries;
    }
    if let Some(entries) = args.metadata_snapshot_entries.or(file.metadata_snapshot_entries) {
        config.metadata_snapshot_entries = entries;
    }
    if let Some(channel_max) = args.channel_max.or(file.channel_max) {
        config.channel_max = channel_max;
    }
    if let Some(timeout_ms) = args.consumer_timeout_ms.or(file.consumer_timeout_ms) {
        config.consumer_timeout_ms = (timeout_ms > 0).then_some(timeout_ms);
    }
    for limits in file.vhost_limits.into_iter().flatten() {
        config.vhost_limits.push(VhostLimits {
            vhost: limits.vhost,
            connections_max: limits.connections_max,
            queues_max: limits.queues_max,
        });
    }
    for limits in file.user_limits.into_iter().flatten() {
        config.user_limits.push(UserLimits {
            user: limits.user,
            connections_max: limits.connections_max,
            channels_max: limits.channels_max,
        });
    }
    // Users of the file without permissions get every right on every vhost (from the file and
    // from the definitions file), as they had before permissions existed; so does the default
    // `guest` when nothing names users.
    let mut full_access = Vec::new();
    let file_lists_users = file.users.is_some();
    if let Some(users) = file.users {
        if users.is_empty() {
            bail!("the configuration file lists no users; nobody could connect");
        }
        config.permissions.clear();
        let mut converted = Vec::with_capacity(users.len());
        for user in users {
            if !user.add_permissions(&mut config) {
                full_access.push(user.name.clone());
            }
            converted.push(user.into_user()?);
        }
        config.users = converted;
    }
    if let Some(path) = args.definitions.clone().or(file.definitions) {
        let definitions = read_definitions(&path)?;
        // A definitions file that names users replaces the default `guest` (as a locked-down
        // broker wants), unless the configuration file named users itself.
        if !file_lists_users && !definitions.users.is_empty() {
            config.users.clear();
            config.permissions.clear();
        }
        for user in &definitions.users {
            if file_lists_users && config.users.iter().any(|existing| existing.name == user.name) {
                tracing::warn!(user = %user.name, "the definitions file's user replaces the configuration file's");
            }
        }
        config.import_definitions(definitions);
    } else if !file_lists_users {
        full_access.push("guest".to_owned());
    }
    for user in full_access {
        config.grant_full_access(&user);
    }
    // Every setting is checked by the broker's own rules (the same ones `Broker::start` applies).
    config.validate()?;
    Ok(config)
}

/// The management API's addresses from flags, variables and the file: plain HTTP (`None` when
/// it is off) and HTTPS (`None` unless asked for).
fn http_listen(args: &ServeArgs) -> Result<(Option<SocketAddr>, Option<SocketAddr>)> {
    let file = match &args.config {
        Some(path) => read_file_config(path)?,
        None => FileConfig::default(),
    };
    let plain = match args.http_listen.or(file.http_listen) {
        Some(Listen::At(address)) => Some(address),
        Some(Listen::Off) => None,
        None => Some(SocketAddr::from(([0, 0, 0, 0], HTTP_PORT_DEFAULT))),
    };
    Ok((plain, args.https_listen.or(file.https_listen)))
}

/// RabbitMQ's management port.
const HTTP_PORT_DEFAULT: u16 = 15672;

async fn serve(args: ServeArgs) -> Result<()> {
    let config = broker_config(&args)?;
    let (http_listen, https_listen) = http_listen(&args)?;
    if https_listen.is_some() && config.tls.is_none() {
        bail!(
            "--https-listen (https_listen) needs the TLS settings of AMQPS: --amqps-listen, --tls-cert and --tls-key"
        );
    }
    // Signal handlers first: a SIGHUP or SIGTERM that arrives while the listeners start must not
    // take the default action (ending the process).
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tracing::info!(data_dir = %config.data_dir.display(), "starting wharf");
    let broker = Broker::start(config).await.context("starting the broker")?;
    let mut http = Vec::new();
    for (address, tls) in [(http_listen, false), (https_listen, true)] {
        let Some(address) = address else { continue };
        let started = if tls {
            wharf_http::HttpServer::start_tls(address, broker.management()).await
        } else {
            wharf_http::HttpServer::start(address, broker.management()).await
        };
        match started {
            Ok(server) => http.push(server),
            Err(error) => {
                for server in http {
                    server.shutdown().await;
                }
                broker.shutdown().await;
                return Err(error).context("starting the management API");
            }
        }
    }
    let outcome = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT received; shutting down"); break Ok(()) }
            _ = terminate.recv() => { tracing::info!("SIGTERM received; shutting down"); break Ok(()) }
            _ = hangup.recv() => {
                if broker.amqps_local_addr().is_some() {
                    tracing::info!("SIGHUP received; reloading TLS certificates");
                    // A failure is logged by the broker, and the certificates in force stay.
                    let _ = broker.reload_tls();
                } else {
                    tracing::info!("SIGHUP received; TLS is off, nothing to reload");
                }
            }
            reason = broker.fatal_error() => break Err(anyhow::anyhow!("storage failed: {reason}")),
        }
    };
    for server in http {
        server.shutdown().await;
    }
    broker.shutdown().await;
    outcome
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Serve(args) => *args,
        Command::Admin(args) => {
            return match admin::run(args) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("wharf admin: {error:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::Relay(args) => {
            return run_logged(&args.log.clone(), relay::run(*args));
        }
    };
    run_logged(&args.log.clone(), serve(args))
}

/// Installs logging at `log` and runs `work` on a multi-threaded runtime; errors are logged and
/// printed, and make the exit status 1.
fn run_logged(log: &str, work: impl std::future::Future<Output = Result<()>>) -> std::process::ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_new(log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wharf: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("wharf: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
