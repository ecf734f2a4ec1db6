//! What the group tests share: a state machine ([`machine`]) and a three-node cluster harness
//! whose nodes can be crashed and restarted from their stores ([`cluster`]).
#![allow(dead_code)]

pub mod cluster;
pub mod machine;

pub use machine::Machine;
