//! `wharf serve` as a cluster's node (issue #19, its first step): three processes on loopback
//! started with `--node-id`, `--cluster-listen` and `--cluster-node`, linked to each other, each
//! member's link visible through `wharf admin cluster` and `/api/cluster/members`; a member
//! that is killed shows as unlinked, and again as linked once it is back; nodes link over TLS
//! with `--cluster-tls-*`; cluster settings that cannot work are refused with a message naming
//! them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::free_port;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use tokio::process::{Child, Command};

/// Starts node `node_id` of a cluster whose members listen at `cluster` (by id); returns it with
/// its management API's URL.
async fn start_node(data_dir: &Path, node_id: u64, cluster: &[(u64, SocketAddr)]) -> (Child, String) {
    start_node_with(data_dir, node_id, cluster, &[]).await
}

async fn start_node_with(
    data_dir: &Path,
    node_id: u64,
    cluster: &[(u64, SocketAddr)],
    extra: &[std::ffi::OsString],
) -> (Child, String) {
    let node = common::start_node(data_dir, node_id, cluster, extra).await;
    (node.child, node.http)
}

/// `wharf admin --url URL cluster --json`: the members as node `url` sees them.
async fn members(url: &str) -> Vec<Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["admin", "--url", url, "--json", "cluster"])
        .env_remove("WHARF_ADMIN_USER")
        .env_remove("WHARF_ADMIN_PASSWORD")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice::<Value>(&output.stdout).unwrap().as_array().unwrap().clone()
}

/// Asks node `url` until every member `wanted` names is as wanted: (node, its link is up, calls
/// to it failed since its last answer). The nodes check their links once a second.
async fn wait_until_linked(url: &str, wanted: &[(u64, bool)]) -> Vec<Value> {
    let wanted: Vec<(u64, bool, bool)> = wanted.iter().map(|(node, linked)| (*node, *linked, !linked)).collect();
    wait_until(url, &wanted).await
}

async fn wait_until(url: &str, wanted: &[(u64, bool, bool)]) -> Vec<Value> {
    loop {
        let members = members(url).await;
        let matches = wanted.iter().all(|(node, linked, failing)| {
            members.iter().any(|member| {
                member["node"] == *node
                    && member["outbound_connected"] == *linked
                    && (member["consecutive_failures"].as_u64().unwrap() > 0) == *failing
            })
        });
        if matches {
            return members;
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_link_up_and_show_a_killed_member_until_it_is_back() {
    let temp = tempfile::tempdir().unwrap();
    let cluster: Vec<(u64, SocketAddr)> = (1..=3).map(|id| (id, free_port())).collect();
    let mut nodes = Vec::new();
    for (id, _) in &cluster {
        nodes.push(start_node(&temp.path().join(format!("node-{id}")), *id, &cluster).await);
    }
    let members = wait_until_linked(&nodes[0].1, &[(2, true), (3, true)]).await;
    assert_eq!(members.len(), 3);
    assert_eq!((&members[0]["node"], &members[0]["this_node"]), (&Value::from(1), &Value::Bool(true)));
    assert_eq!(members[1]["address"], cluster[1].1.to_string());
    // Node 3 sees the same cluster from its side.
    wait_until_linked(&nodes[2].1, &[(1, true), (2, true)]).await;

    let (mut node_two, _) = nodes.remove(1);
    node_two.kill().await.unwrap();
    // Down: unlinked, its calls failing, the last failure's text shown.
    let members = wait_until_linked(&nodes[0].1, &[(2, false), (3, true)]).await;
    let two = members.iter().find(|member| member["node"] == 2).unwrap();
    assert!(two["last_error"].as_str().unwrap().contains("node 2"), "{two}");
    let three = members.iter().find(|member| member["node"] == 3).unwrap();
    assert!(three["last_error"].is_null(), "{three}");

    let back = start_node(&temp.path().join("node-2"), 2, &cluster).await;
    wait_until_linked(&nodes[0].1, &[(2, true), (3, true)]).await;
    wait_until_linked(&back.1, &[(1, true), (3, true)]).await;
}

/// A CA and, per node, a certificate for 127.0.0.1 it signed, as PEM files in `dir`: the
/// `--cluster-tls-*` arguments of node `node_id`.
fn tls_files(dir: &Path, issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, node_id: u64) -> Vec<std::ffi::OsString> {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
    let mut params = CertificateParams::new(vec!["127.0.0.1".into()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let certificate = params.signed_by(&key, issuer).unwrap();
    let (cert_path, key_path) = (dir.join(format!("node-{node_id}.pem")), dir.join(format!("node-{node_id}.key")));
    std::fs::write(&cert_path, certificate.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let mut args: Vec<std::ffi::OsString> = vec!["--cluster-tls-cert".into(), cert_path.into()];
    args.extend(["--cluster-tls-key".into(), key_path.into_os_string()]);
    args.extend(["--cluster-tls-ca-cert".into(), dir.join("ca.pem").into_os_string()]);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_link_over_tls_with_certificates_of_the_clusters_ca() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let temp = tempfile::tempdir().unwrap();
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "wharf cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    std::fs::write(temp.path().join("ca.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(params, key);
    let cluster: Vec<(u64, SocketAddr)> = (1..=2).map(|id| (id, free_port())).collect();
    let mut nodes = Vec::new();
    for (id, _) in &cluster {
        let extra = tls_files(temp.path(), &issuer, *id);
        nodes.push(start_node_with(&temp.path().join(format!("node-{id}")), *id, &cluster, &extra).await);
    }
    wait_until_linked(&nodes[0].1, &[(2, true)]).await;
    wait_until_linked(&nodes[1].1, &[(1, true)]).await;
}

#[tokio::test]
async fn cluster_settings_that_cannot_work_are_refused_with_a_message_naming_them() {
    let temp = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (vec!["--cluster-node", "2=127.0.0.1:25672"], "need --node-id"),
        (vec!["--node-id", "1", "--cluster-node", "2"], "--cluster-node \"2\" is not ID=HOST:PORT"),
        (vec!["--node-id", "1", "--cluster-node", "two=127.0.0.1:1"], "is not a node id"),
        (vec!["--node-id", "1", "--cluster-node", "2=a:1", "--cluster-node", "2=b:1"], "node 2 is given twice"),
        (vec!["--node-id", "0"], "--node-id must not be 0"),
        (vec!["--node-id", "1", "--cluster-tls-cert", "node.pem"], "cluster TLS needs all of"),
        (
            vec!["--cluster-tls-cert", "a.pem", "--cluster-tls-key", "a.key", "--cluster-tls-ca-cert", "ca.pem"],
            "this node is in no cluster",
        ),
        (
            vec![
                "--node-id",
                "1",
                "--cluster-tls-cert",
                "a.pem",
                "--cluster-tls-key",
                "a.key",
                "--cluster-tls-ca-cert",
                "ca.pem",
            ],
            "cluster_tls_cert: cannot read a.pem",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(["serve", "--http-listen", "none", "--mqtt-listen", "none", "--amqp-listen", "127.0.0.1:0"])
            .args(&args)
            .env("WHARF_DATA_DIR", temp.path().join("data"))
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "{args:?} was taken");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
