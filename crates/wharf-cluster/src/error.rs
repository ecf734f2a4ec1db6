//! The crate's errors: what a call, a configuration or a link can fail with.

use crate::config::NodeId;

/// What went wrong with the cluster's links or their configuration.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The cluster options do not describe a cluster (the text says which and why).
    #[error("cluster configuration: {0}")]
    Config(String),
    /// The node is not a member this node knows.
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    /// No link to the node could be made (it is down, or unreachable, or refused the handshake).
    #[error("node {node} is unreachable: {reason}")]
    Unreachable {
        /// The node called.
        node: NodeId,
        /// Why (the dial's or the handshake's error).
        reason: String,
    },
    /// The node did not answer within the call's deadline.
    #[error("node {node} did not answer within {timeout_ms} ms")]
    Timeout {
        /// The node called.
        node: NodeId,
        /// The deadline.
        timeout_ms: u64,
    },
    /// The link closed before the answer came (the call may or may not have been handled).
    #[error("the link to node {0} closed before it answered")]
    Disconnected(NodeId),
    /// The other node handled the call and answered with an error.
    #[error("node {node} refused the call: {message}")]
    Remote {
        /// The node called.
        node: NodeId,
        /// Its handler's message.
        message: String,
    },
    /// A request or an answer over the frame limit.
    #[error("a frame of {bytes} bytes is over the limit of {limit} bytes")]
    FrameTooLarge {
        /// The frame's size.
        bytes: u64,
        /// The limit (`ClusterConfig::frame_bytes_max`).
        limit: u32,
    },
    /// The peer broke the link's format (the text says how); the link is closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The transport is shutting down.
    #[error("the cluster transport is stopped")]
    Stopped,
    /// A socket operation failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
