//! [`BrokerConfig`]: everything the runtime needs to know, with RabbitMQ-like defaults. The binary
//! fills it from flags, `WHARF_*` variables and a TOML file; tests build it directly.

use crate::access::{Access, Permission, TopicPermission};
use crate::alarms::{DiskSpace, RealDiskSpace, default_disk_free_limit_bytes, default_memory_high_watermark_bytes};
use crate::clock::{Clock, SystemClock};
use crate::definitions_import::Topology;
use crate::password::PasswordHash;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use wharf_store::{Fs, RealFs, StoreConfig};

/// A user who may connect.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// The password, as a salted hash only (see `password.rs`; never logged).
    pub password: PasswordHash,
    /// Accepted only from loopback addresses (RabbitMQ's rule for `guest`).
    pub loopback_only: bool,
    /// RabbitMQ's user tags (`administrator`, `monitoring`, `management`, `policymaker`, or any
    /// other), kept for the management interface.
    pub tags: Vec<String>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("User")
            .field("name", &self.name)
            .field("loopback_only", &self.loopback_only)
            .field("tags", &self.tags)
            .finish_non_exhaustive()
    }
}

impl User {
    /// RabbitMQ's default user: `guest`/`guest`, loopback only, tagged `administrator` (so it
    /// can use the management API, as in RabbitMQ).
    pub fn guest() -> Self {
        User { tags: vec!["administrator".to_owned()], ..User::with_password("guest", "guest", true) }
    }

    /// A user whose password is given in clear (hashed here; only the hash is kept).
    pub fn with_password(name: &str, password: &str, loopback_only: bool) -> Self {
        User { name: name.to_owned(), password: PasswordHash::new(password), loopback_only, tags: Vec::new() }
    }
}

/// Limits on one vhost (RabbitMQ's `set_vhost_limits`); `None` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VhostLimits {
    /// The vhost.
    pub vhost: String,
    /// Most client connections to it at once (`max-connections`).
    pub connections_max: Option<u32>,
    /// Most queues in it (`max-queues`).
    pub queues_max: Option<u32>,
}

/// Limits on one user (RabbitMQ's `set_user_limits`); `None` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserLimits {
    /// The user.
    pub user: String,
    /// Most connections of this user at once (`max-connections`).
    pub connections_max: Option<u32>,
    /// Most channels open at once across all of this user's connections (`max-channels`).
    pub channels_max: Option<u32>,
}

/// AMQP over TLS (AMQPS): where to listen and with which certificate (see `tls.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Where to accept AMQPS connections (RabbitMQ's port is 5671; 0 picks a free port).
    pub amqps_listen: SocketAddr,
    /// The server's certificate chain, PEM: its own certificate first, then any intermediates.
    pub cert_path: PathBuf,
    /// The server certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
    /// CA certificates (PEM) that client certificates are verified against. Without
    /// `verify_peer`, a client may present a certificate (verified against these, and then
    /// offered SASL `EXTERNAL`) or none.
    pub ca_cert_path: Option<PathBuf>,
    /// Require every client to present a certificate signed by a CA in `ca_cert_path` (mutual
    /// TLS); a client without one fails the TLS handshake.
    pub verify_peer: bool,
}

impl TlsConfig {
    /// TLS on `amqps_listen` with the server's certificate chain and key; no client certificates.
    pub fn new(amqps_listen: SocketAddr, cert_path: impl Into<PathBuf>, key_path: impl Into<PathBuf>) -> Self {
        TlsConfig {
            amqps_listen,
            cert_path: cert_path.into(),
            key_path: key_path.into(),
            ca_cert_path: None,
            verify_peer: false,
        }
    }
}

/// The broker's configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Where to accept AMQP connections (port 5672 by default; 0 picks a free port).
    pub amqp_listen: SocketAddr,
    /// Whether to accept plain (unencrypted) AMQP on `amqp_listen`. Off, the broker speaks only
    /// TLS, on `tls`'s listener.
    pub plain_amqp: bool,
    /// AMQP over TLS on a listener of its own, if set.
    pub tls: Option<TlsConfig>,
    /// The data directory (message logs, definitions).
    pub data_dir: PathBuf,
    /// Who may connect.
    pub users: Vec<User>,
    /// What each user may do in each vhost (see `access.rs`); a user without a permission on a
    /// vhost cannot open a connection to it. By default `guest` has full access to `/`.
    pub permissions: Vec<Permission>,
    /// Which routing keys users may publish and bind with on topic exchanges.
    pub topic_permissions: Vec<TopicPermission>,
    /// Limits per vhost (connections, queues).
    pub vhost_limits: Vec<VhostLimits>,
    /// Limits per user (connections, channels).
    pub user_limits: Vec<UserLimits>,
    /// Exchanges, queues and bindings from a definitions file, declared once the data directory
    /// is recovered (see `definitions_import.rs`).
    pub imported_topology: Topology,
    /// The virtual hosts (besides any found in the stored definitions); `/` is always there.
    pub vhosts: Vec<String>,
    /// Largest frame the server accepts and offers in `connection.tune`.
    pub frame_max: u32,
    /// Most channels per connection offered in `connection.tune`.
    pub channel_max: u16,
    /// Heartbeat interval offered in `connection.tune`, in seconds (0 disables).
    pub heartbeat_s: u16,
    /// Largest message body accepted; a larger one closes the channel with 406.
    pub message_bytes_max: u64,
    /// Most logged-in client connections at once; a connection beyond it is refused at
    /// `connection.open` with 530.
    pub connections_max: usize,
    /// Most sockets in their handshake (accepted, not yet logged in) at once; more are closed at
    /// accept. Kept apart from `connections_max`, so sockets that never log in cannot take the
    /// slots of real clients; each also has `handshake_timeout_ms` to finish.
    pub handshakes_max: usize,
    /// Most of those from one source address (an IPv6 address counts by its /64), so one host
    /// cannot take every handshake slot.
    pub handshakes_per_address_max: usize,
    /// How long the server waits for the handshake to finish, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// How long a consumer may hold a delivery unacknowledged before its lease runs out and the
    /// message goes back to its queue, for queues that set no `x-consumer-timeout` (by argument
    /// or policy). RabbitMQ's default, 30 minutes; `None` for no timeout.
    pub consumer_timeout_ms: Option<u64>,
    /// The memory alarm's threshold: above it (message bodies in queues' memory, deliveries not yet
    /// written, unfinished bodies, transaction buffers), publishers are blocked. RabbitMQ's
    /// default, 40% of the machine's memory.
    pub memory_high_watermark_bytes: u64,
    /// The disk alarm's threshold: with less free space than this on the data directory's file
    /// system, publishers are blocked. `None`: RabbitMQ's 50 MB plus the largest message accepted.
    pub disk_free_limit_bytes: Option<u64>,
    /// Where the disk alarm reads free space from: the real file system, or a figure a test sets.
    pub disk_space: Arc<dyn DiskSpace>,
    /// Storage tuning.
    pub store: StoreConfig,
    /// The file system the data directory lives on: the real one, or a fault-injecting one in
    /// tests.
    pub fs: Arc<dyn Fs>,
    /// Policies, as (vhost, policy): queue and exchange arguments applied by name pattern.
    pub policies: Vec<(String, wharf_model::Policy)>,
    /// Body bytes of queued messages a durable queue keeps in memory; beyond it, the bodies of
    /// further persistent messages are dropped from memory once written and read back from the
    /// store when they are delivered (a backlog costs disk, not memory).
    pub queue_body_memory_bytes_max: u64,
    /// The most events each message's delivery trace keeps (its publish, deliveries that did
    /// not end in an ack and their outcome, dead-letter hops, replays); 0 turns traces off. At
    /// most [`wharf_model::trace::TRACE_EVENTS_LIMIT`].
    pub message_trace_events_max: usize,
    /// Where time comes from: the system's clock, or a [`ManualClock`](crate::ManualClock) in
    /// tests (see `clock.rs`).
    pub clock: Arc<dyn Clock>,
    /// The MQTT front end (off unless `mqtt.listen` is set; the binary turns it on at 1883).
    pub mqtt: MqttConfig,
    /// This node's place in a cluster (`--node-id`, `--cluster-listen`, `--cluster-node`);
    /// `None` for a broker on its own.
    pub cluster: Option<wharf_cluster::ClusterConfig>,
    /// Join a running cluster (`--cluster-join`): wait to be added as a member (`PUT
    /// /api/cluster/members/{node}` on any member) instead of forming the metadata group with
    /// the `--cluster-node` members.
    pub cluster_join: bool,
    /// Entries of a quorum queue's Raft log between two snapshots of its replica
    /// (`--quorum-snapshot-entries`).
    pub quorum_snapshot_entries: u64,
    /// Entries of the metadata group's Raft log between two snapshots of the replicated
    /// definitions (`--metadata-snapshot-entries`; `cluster/meta_snapshot.rs`).
    pub metadata_snapshot_entries: u64,
    /// TLS on the cluster's links (`--cluster-tls-cert`, `--cluster-tls-key`,
    /// `--cluster-tls-ca-cert`): read when the broker starts.
    pub cluster_tls: Option<ClusterTlsFiles>,
}

/// The PEM files of the cluster links' mutual TLS.
#[derive(Debug, Clone)]
pub struct ClusterTlsFiles {
    /// This node's certificate chain (its own first); used both to accept and to dial links.
    pub cert_path: PathBuf,
    /// Its private key.
    pub key_path: PathBuf,
    /// The CA certificates that sign every node's certificate.
    pub ca_cert_path: PathBuf,
}

/// The MQTT front end's settings (`docs/design/20261204_mqtt.md`); names follow RabbitMQ's
/// `mqtt.*` settings where it has one.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// Where to accept MQTT connections; `None` turns MQTT off.
    pub listen: Option<SocketAddr>,
    /// Where to accept MQTT over TLS (RabbitMQ uses 8883), with the AMQPS certificate settings.
    pub tls_listen: Option<SocketAddr>,
    /// The topic exchange MQTT publishes go to and subscriptions bind to (RabbitMQ's
    /// `mqtt.exchange`).
    pub exchange: String,
    /// The vhost of a client that names none (RabbitMQ's `mqtt.vhost`); a user name
    /// `vhost:user` names one.
    pub vhost: String,
    /// The longest a session outlives its connection (RabbitMQ's
    /// `max_session_expiry_interval_seconds`): a 3.1.1 session without clean session lives this
    /// long, a 5.0 one its own expiry up to this.
    pub session_expiry_max_s: u32,
    /// Most messages sent to a client and not yet acknowledged (capped by the client's receive
    /// maximum in 5.0).
    pub prefetch: u16,
    /// The largest packet taken from a client once it has logged in (its CONNECT may be at most
    /// 64 KiB).
    pub packet_bytes_max: u32,
}

/// Smallest [`MqttConfig::packet_bytes_max`] accepted.
pub const MQTT_PACKET_BYTES_MIN: u32 = 1024;

/// Default for [`MqttConfig::session_expiry_max_s`]: RabbitMQ's one day.
pub const MQTT_SESSION_EXPIRY_MAX_S_DEFAULT: u32 = 86_400;

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: None,
            tls_listen: None,
            exchange: "amq.topic".into(),
            vhost: "/".into(),
            session_expiry_max_s: MQTT_SESSION_EXPIRY_MAX_S_DEFAULT,
            prefetch: 1_000,
            packet_bytes_max: wharf_mqtt::PACKET_BYTES_MAX_DEFAULT,
        }
    }
}

/// Default for [`BrokerConfig::consumer_timeout_ms`]: RabbitMQ's 30 minutes.
pub const CONSUMER_TIMEOUT_MS_DEFAULT: u64 = 30 * 60 * 1000;

/// Default for [`BrokerConfig::message_trace_events_max`] (`docs/design/20261204_message-traces.md`
/// says what it costs).
pub const MESSAGE_TRACE_EVENTS_MAX_DEFAULT: usize = 16;

/// Default for [`BrokerConfig::queue_body_memory_bytes_max`]: enough for a consumer that is a
/// few seconds behind at full speed to be served from memory.
pub const QUEUE_BODY_MEMORY_BYTES_MAX_DEFAULT: u64 = 8 * 1024 * 1024;

impl BrokerConfig {
    /// The disk alarm's threshold in effect (the configured one, or the default).
    pub fn disk_free_limit_bytes(&self) -> u64 {
        self.disk_free_limit_bytes.unwrap_or_else(|| default_disk_free_limit_bytes(self.message_bytes_max))
    }

    /// Gives `user` every right on every vhost of this configuration (the rule for users of the
    /// configuration file that list no permissions, so configurations written before permissions
    /// existed keep working).
    pub fn grant_full_access(&mut self, user: &str) {
        for vhost in self.vhosts.clone() {
            if !self.permissions.iter().any(|permission| permission.user == user && permission.vhost == vhost) {
                self.permissions.push(Permission::full(user, &vhost));
            }
        }
    }

    /// Defaults for a data directory: port 5672 on all interfaces, `guest`/`guest` from
    /// loopback, frame_max 128 KiB, 2047 channels, 60 s heartbeats, 128 MiB messages.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BrokerConfig {
            amqp_listen: SocketAddr::from(([0, 0, 0, 0], 5672)),
            plain_amqp: true,
            tls: None,
            data_dir: data_dir.into(),
            users: vec![User::guest()],
            permissions: vec![Permission::full("guest", "/")],
            topic_permissions: Vec::new(),
            vhost_limits: Vec::new(),
            user_limits: Vec::new(),
            imported_topology: Topology::default(),
            vhosts: vec!["/".into()],
            frame_max: wharf_wire::frame::FRAME_MAX_LIMIT,
            channel_max: 2047,
            heartbeat_s: 60,
            message_bytes_max: 128 * 1024 * 1024,
            connections_max: 10_000,
            handshakes_max: 1_024,
            handshakes_per_address_max: 256,
            handshake_timeout_ms: 10_000,
            consumer_timeout_ms: Some(CONSUMER_TIMEOUT_MS_DEFAULT),
            memory_high_watermark_bytes: default_memory_high_watermark_bytes(),
            disk_free_limit_bytes: None,
            disk_space: Arc::new(RealDiskSpace),
            store: StoreConfig::default(),
            fs: RealFs::shared(),
            policies: Vec::new(),
            queue_body_memory_bytes_max: QUEUE_BODY_MEMORY_BYTES_MAX_DEFAULT,
            message_trace_events_max: MESSAGE_TRACE_EVENTS_MAX_DEFAULT,
            clock: Arc::new(SystemClock),
            mqtt: MqttConfig::default(),
            cluster: None,
            cluster_tls: None,
            cluster_join: false,
            quorum_snapshot_entries: 4_096,
            metadata_snapshot_entries: 4_096,
        }
    }
}

/// Longest group-commit delay accepted, in microseconds (0.1 s): a longer one would only add
/// latency to every confirm.
pub const GROUP_COMMIT_DELAY_US_MAX: u64 = 100_000;

/// Smallest `frame_max` accepted (AMQP 0-9-1's minimum frame size).
pub const FRAME_MAX_MIN: u32 = 4096;

/// A setting that cannot work, named, with what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl BrokerConfig {
    /// Checks every setting; the binary and `Broker::start` both refuse a configuration that
    /// fails, with a message naming the setting and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let refuse = |text: String| Err(ConfigError(text));
        if let Some(cluster) = &self.cluster
            && let Err(error) = cluster.validate()
        {
            return refuse(error.to_string());
        }
        if self.cluster_join && self.cluster.is_none() {
            return refuse("cluster_join is set but this node is in no cluster (no node_id)".into());
        }
        if self.cluster_tls.is_some() && self.cluster.is_none() {
            return refuse("cluster TLS settings are given but this node is in no cluster (no node_id)".into());
        }
        if self.quorum_snapshot_entries == 0 {
            return refuse("quorum_snapshot_entries must be at least 1".into());
        }
        if self.metadata_snapshot_entries == 0 {
            return refuse("metadata_snapshot_entries must be at least 1".into());
        }
        let frame_max_limit = wharf_wire::frame::FRAME_MAX_LIMIT;
        if !(FRAME_MAX_MIN..=frame_max_limit).contains(&self.frame_max) {
            return refuse(format!(
                "frame_max must be between {FRAME_MAX_MIN} and {frame_max_limit} bytes, got {}",
                self.frame_max
            ));
        }
        let body_limit = wharf_store::format::BODY_BYTES_MAX as u64;
        if self.message_bytes_max == 0 || self.message_bytes_max > body_limit {
            return refuse(format!(
                "message_bytes_max must be between 1 and {body_limit} bytes, got {}",
                self.message_bytes_max
            ));
        }
        if self.connections_max == 0 {
            return refuse("connections_max must be at least 1".into());
        }
        if self.handshakes_max == 0 {
            return refuse("handshakes_max must be at least 1".into());
        }
        if self.handshakes_per_address_max == 0 {
            return refuse("handshakes_per_address_max must be at least 1".into());
        }
        if self.mqtt.tls_listen.is_some() && self.tls.is_none() {
            return refuse("mqtts_listen needs the TLS settings (amqps_listen, tls_cert, tls_key)".into());
        }
        if self.mqtt.listen.is_some() || self.mqtt.tls_listen.is_some() {
            let limit = wharf_mqtt::PACKET_BYTES_MAX_LIMIT;
            if !(MQTT_PACKET_BYTES_MIN..=limit).contains(&self.mqtt.packet_bytes_max) {
                return refuse(format!(
                    "mqtt packet_bytes_max must be between {MQTT_PACKET_BYTES_MIN} and {limit} bytes, got {}",
                    self.mqtt.packet_bytes_max
                ));
            }
            if self.mqtt.prefetch == 0 {
                return refuse("mqtt prefetch must be at least 1".into());
            }
            if self.mqtt.exchange.is_empty() {
                return refuse("mqtt exchange must name a topic exchange (RabbitMQ's is amq.topic)".into());
            }
            if !self.vhosts.contains(&self.mqtt.vhost) {
                return refuse(format!("mqtt vhost '{}' is not one of the configured vhosts", self.mqtt.vhost));
            }
        }
        if self.message_trace_events_max > wharf_model::trace::TRACE_EVENTS_LIMIT {
            return refuse(format!(
                "message_trace_events_max is {}; at most {} (0 turns traces off)",
                self.message_trace_events_max,
                wharf_model::trace::TRACE_EVENTS_LIMIT
            ));
        }
        if self.consumer_timeout_ms == Some(0) {
            return refuse("consumer_timeout_ms must be at least 1 (or none, for no timeout)".into());
        }
        if self.handshake_timeout_ms == 0 {
            return refuse("handshake_timeout_ms must be at least 1".into());
        }
        for vhost in &self.vhosts {
            if vhost.is_empty() || vhost.len() > 255 || vhost.chars().any(char::is_control) {
                return refuse(format!("vhost name {vhost:?} is not valid (1 to 255 bytes, no control characters)"));
            }
        }
        if self.store.group_commit_delay_us > GROUP_COMMIT_DELAY_US_MAX {
            return refuse(format!(
                "group_commit_delay_us must be at most {GROUP_COMMIT_DELAY_US_MAX} (0.1 s), got {}",
                self.store.group_commit_delay_us
            ));
        }
        if self.users.is_empty() {
            return refuse("the configuration lists no users; nobody could connect".into());
        }
        if let Err(error) = Access::new(&self.permissions, &self.topic_permissions) {
            return refuse(error.to_string());
        }
        match &self.tls {
            None if !self.plain_amqp => {
                return refuse("plain AMQP is off and TLS is not configured: nobody could connect".into());
            }
            None => {}
            // Reads the files, so a missing or unusable one is named at start, not at the first
            // handshake.
            Some(tls) => {
                if self.plain_amqp && tls.amqps_listen == self.amqp_listen && tls.amqps_listen.port() != 0 {
                    return refuse(format!(
                        "amqps_listen and amqp_listen are both {}: TLS needs a port of its own",
                        tls.amqps_listen
                    ));
                }
                crate::tls::server_config(tls)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_each_bad_setting_is_named() {
        let defaults = BrokerConfig::new("/data");
        assert_eq!(defaults.validate(), Ok(()));
        let refused = |change: &dyn Fn(&mut BrokerConfig)| {
            let mut config = BrokerConfig::new("/data");
            change(&mut config);
            config.validate().unwrap_err().0
        };
        assert!(refused(&|config| config.frame_max = 100).starts_with("frame_max must be between 4096"));
        assert!(refused(&|config| config.message_bytes_max = 0).starts_with("message_bytes_max"));
        assert!(refused(&|config| config.connections_max = 0).starts_with("connections_max"));
        assert!(refused(&|config| config.vhosts.push(String::new())).starts_with("vhost name"));
        assert!(refused(&|config| config.store.group_commit_delay_us = 200_000).starts_with("group_commit_delay_us"));
        assert!(refused(&|config| config.users.clear()).contains("no users"));
        let bad_pattern = refused(&|config| config.permissions[0].write = "(".into());
        assert!(bad_pattern.starts_with("the write permission of user 'guest' in vhost '/'"), "{bad_pattern}");
    }
}
