//! `wharf serve` processes of a cluster on loopback for the cluster suites: started with
//! `--node-id`, `--cluster-listen` and `--cluster-node`, each on ports of its own, with its
//! AMQP address and management API's URL read from its log; and the management API called as guest. With
//! `WHARF_TEST_NODE_LOGS` set, each node's log is copied to the test's output, `[node N]` first.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

mod ports;
pub use ports::free_port;

/// A running node: its process, its management API's URL, its AMQP address.
pub struct Node {
    pub child: Child,
    pub http: String,
    pub amqp: SocketAddr,
}

/// Starts node `node_id` of a cluster whose members listen at `cluster` (by id), with `extra`
/// arguments.
pub async fn start_node(
    data_dir: &Path,
    node_id: u64,
    cluster: &[(u64, SocketAddr)],
    extra: &[std::ffi::OsString],
) -> Node {
    let own = cluster.iter().find(|(id, _)| *id == node_id).unwrap().1;
    // `WHARF_TEST_BINARY` runs another build (scripts/jepsen.sh runs a copy, so that long runs
    // go on while the tree is rebuilt).
    let binary = std::env::var_os("WHARF_TEST_BINARY").unwrap_or_else(|| env!("CARGO_BIN_EXE_wharf").into());
    let mut command = Command::new(binary);
    command
        .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none", "--amqp-listen", "127.0.0.1:0"])
        .args(["--node-id", &node_id.to_string(), "--cluster-listen", &own.to_string()])
        .arg("--data-dir")
        .arg(data_dir);
    for (id, address) in cluster {
        command.arg("--cluster-node").arg(format!("{id}={address}"));
    }
    command.args(extra);
    let mut child = command.env("NO_COLOR", "1").stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Both listeners bind port 0 and name their address in the log; what the node printed before
    // it was ready goes into the failure, so a node that could not start says why.
    let (mut amqp, mut http) = (None, None);
    let mut printed = Vec::new();
    while amqp.is_none() || http.is_none() {
        let Some(line) = lines.next_line().await.unwrap() else {
            panic!("wharf node {node_id} exited before it was ready; it printed:\n{}", printed.join("\n"));
        };
        if line.contains("accepting AMQP connections") {
            amqp = Some(logged_address(&line, "local_addr=").parse::<SocketAddr>().unwrap());
        } else if line.contains("management API listening") {
            http = Some(logged_address(&line, "address="));
        }
        printed.push(line);
    }
    let (amqp, http) = (amqp.unwrap(), http.unwrap());
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if std::env::var("WHARF_TEST_NODE_LOGS").is_ok() {
                eprintln!("[node {node_id}] {line}");
            }
        }
    });
    Node { child, http: format!("http://{http}"), amqp }
}

/// The address after `key` in a log line.
fn logged_address(line: &str, key: &str) -> String {
    line.split(key).nth(1).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// Nodes 1 to 3 of a cluster, each in `dir/node-N`, started with `extra` arguments: the members'
/// addresses by id, and the running nodes in id order.
pub async fn three_nodes(dir: &Path, extra: &[std::ffi::OsString]) -> (Vec<(u64, SocketAddr)>, Vec<Node>) {
    let cluster: Vec<(u64, SocketAddr)> = (1..=3).map(|id| (id, free_port())).collect();
    let mut nodes = Vec::new();
    for (id, _) in &cluster {
        nodes.push(start_node(&dir.join(format!("node-{id}")), *id, &cluster, extra).await);
    }
    (cluster, nodes)
}

/// An AMQP connection to `amqp` as guest.
pub async fn connect(amqp: SocketAddr) -> lapin::Connection {
    let url = format!("amqp://guest:guest@{amqp}/%2f");
    lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap()
}

/// The next delivery; a consumer that gets none for two minutes fails the test rather than
/// hanging it.
pub async fn next(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    use futures_lite::StreamExt;
    match tokio::time::timeout(std::time::Duration::from_secs(120), consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        other => panic!("no delivery: {other:?}"),
    }
}

/// One management API call as guest: (HTTP status, body as JSON or `Null`).
pub async fn call(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (url, method) = (format!("{base}{path}"), method.to_owned());
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let authorization = "Basic Z3Vlc3Q6Z3Vlc3Q="; // guest:guest
        let body = body.unwrap_or(Value::Null);
        let response = match method.as_str() {
            "GET" => agent.get(&url).header("authorization", authorization).call(),
            "DELETE" => agent.delete(&url).header("authorization", authorization).call(),
            "PUT" => agent.put(&url).header("authorization", authorization).send_json(body),
            _ => agent.post(&url).header("authorization", authorization).send_json(body),
        };
        let mut response = response.unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
    })
    .await
    .unwrap()
}

/// Asks again until `check` holds: what another process does is seen only by asking. Panics
/// after two minutes, so a cluster that never gets there fails the test rather than hanging it.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !check().await {
        assert!(std::time::Instant::now() < give_up, "never happened: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
