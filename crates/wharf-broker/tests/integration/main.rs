//! The broker's integration tests: the real broker on 127.0.0.1:0 driven by stock clients (lapin,
//! raw sockets), one module per feature area. One test binary, not one per area: each binary
//! links the whole broker and lapin, and fifteen links cost more build time on two cores than
//! every test in them takes to run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod alarms;
mod authorization;
mod bad_input;
mod confirms_and_transactions;
mod consumers;
mod dead_lettering;
mod declarations;
mod deduplication;
mod definitions_format;
mod delayed_messages;
mod delivery_limit;
mod direct_reply_to;
mod food_delivery;
mod full_disk;
mod leases;
mod limits;
mod mqtt;
mod mqtt_clients;
mod mqtt_sessions;
mod ordering;
mod orphaned_logs;
mod paging;
mod policies;
mod priorities;
mod protocol_corners;
mod retry_backoff;
mod routing_extensions;
mod tls;
mod transient_paging;
mod ttl_and_limits;
mod virtual_time;
