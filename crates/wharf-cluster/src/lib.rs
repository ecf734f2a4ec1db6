//! `wharf-cluster`: how the nodes of a Wharf cluster reach each other (issue #19, step 1 of
//! `docs/design/20261205_replication.md`).
//!
//! It owns the node-to-node links and nothing above them: which nodes are members and where
//! they listen ([`ClusterConfig`]), TLS on the links ([`LinkTls`]), the wire format of a link
//! ([`frame`]), request/response
//! calls from one node to another with a deadline ([`Transport`]), what each link looks like
//! now ([`MemberStatus`]), and a TCP proxy that injects faults between two nodes
//! ([`FaultProxy`]) for the cluster's tests. What the calls carry (Raft's messages, forwarded
//! publishes) belongs to the crates that use it; this crate knows only services by number and
//! payloads as bytes, so it depends on nothing of the broker.

mod config;
mod error;
mod faults;
pub mod frame;
mod link;
mod transport;

pub use config::{
    CALL_TIMEOUT_MS_DEFAULT, ClusterConfig, FRAME_BYTES_MAX_DEFAULT, LinkTls, NodeId, parse_cluster_node,
};
pub use error::ClusterError;
pub use faults::{Direction, FaultProxy};
pub use link::LinkStream;
pub use transport::{Handler, HandlerFuture, MemberStatus, SERVICE_PING, Transport};
