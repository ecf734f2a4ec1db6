//! [`BrokerError`]: why the broker could not start or had to stop.

/// A failure of the broker as a whole (connection-level problems are answered on the wire).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The store or the definitions log failed.
    #[error("storage: {0}")]
    Store(#[from] wharf_store::StoreError),
    /// The listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A setting cannot work.
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The async runtime cannot run the broker.
    #[error("{0}")]
    Runtime(String),
    /// A blocking startup task failed to run.
    #[error("startup task failed: {0}")]
    Startup(String),
    /// The cluster's links could not start (their listener, most often).
    #[error("cluster: {0}")]
    Cluster(#[from] wharf_cluster::ClusterError),
}
