//! Three nodes on loopback calling each other, directly and through fault proxies: calls and
//! their answers, a handler's refusal, handshakes that name the wrong node or a stranger,
//! partitions both ways and one way, dropped connections, delays, and what each member's status
//! says. Waits are on events (an answer, a failure); no test asserts on time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wharf_cluster::frame::{Frame, HELLO_REPLY_HEAD_BYTES, Hello, HelloReply, Kind};
use wharf_cluster::{ClusterConfig, ClusterError, Direction, FaultProxy, Handler, NodeId, Transport};

/// The test service: answers "<node> got <payload>"; "refuse" is refused.
const SERVICE_ECHO: u16 = 7;

fn echo(node: NodeId) -> Handler {
    Arc::new(move |from, service, payload| {
        Box::pin(async move {
            if payload.as_ref() == b"refuse" {
                return Err(format!("node {node} refuses node {from}"));
            }
            assert_eq!(service, SERVICE_ECHO);
            Ok(Bytes::from(format!("{node} got {}", String::from_utf8_lossy(&payload))))
        })
    })
}

fn config(node: NodeId, nodes: &BTreeMap<NodeId, String>) -> ClusterConfig {
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ClusterConfig::new(node, listen, nodes.iter().map(|(id, a)| (*id, a.clone())).collect()).unwrap();
    config.heartbeat_interval_ms = 0;
    config.call_timeout_ms = 30_000;
    config
}

/// Three transports, each knowing the others at the addresses `route(from, to, address)` gives.
async fn cluster(route: impl Fn(NodeId, NodeId, SocketAddr) -> String) -> Vec<Arc<Transport>> {
    // Each node's own address is only known once it listens: start with placeholders, then
    // point every node at the others.
    let mut transports = Vec::new();
    for node in 1..=3 {
        transports.push(Arc::new(Transport::start(&config(node, &BTreeMap::new()), echo(node)).await.unwrap()));
    }
    for from in &transports {
        for to in &transports {
            if from.node_id() != to.node_id() {
                let address = route(from.node_id(), to.node_id(), to.local_addr());
                from.add_member(to.node_id(), address).await.unwrap();
            }
        }
    }
    transports
}

async fn call(from: &Transport, to: NodeId, payload: &'static str) -> Result<String, ClusterError> {
    let answer = from.call(to, SERVICE_ECHO, Bytes::from_static(payload.as_bytes())).await?;
    Ok(String::from_utf8(answer.to_vec()).unwrap())
}

/// Calls until one is answered (a link that was just cut is dialed again).
async fn call_until_answered(from: &Transport, to: NodeId) -> String {
    loop {
        let answer = from.call_within(to, SERVICE_ECHO, Bytes::from_static(b"again"), Duration::from_secs(30)).await;
        if let Ok(answer) = answer {
            return String::from_utf8(answer.to_vec()).unwrap();
        }
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_calls_every_other_and_gets_its_answer() {
    let nodes = cluster(|_, _, address| address.to_string()).await;
    for from in &nodes {
        for to in 1..=3 {
            if to != from.node_id() {
                assert_eq!(call(from, to, "hello").await.unwrap(), format!("{to} got hello"));
            }
        }
    }
    // Many calls at once on one link, each with its own answer.
    let calls: Vec<_> = (0..200)
        .map(|index| {
            let from = Arc::clone(&nodes[0]);
            tokio::spawn(async move { from.call(2, SERVICE_ECHO, Bytes::from(format!("call {index}"))).await })
        })
        .collect();
    for (index, answer) in calls.into_iter().enumerate() {
        assert_eq!(answer.await.unwrap().unwrap(), Bytes::from(format!("2 got call {index}")));
    }
    let refused = call(&nodes[0], 3, "refuse").await.unwrap_err();
    assert!(
        matches!(&refused, ClusterError::Remote { node: 3, message } if message == "node 3 refuses node 1"),
        "{refused}"
    );
    assert!(matches!(call(&nodes[0], 9, "hello").await, Err(ClusterError::UnknownNode(9))));
    let status = nodes[0].members();
    assert_eq!(status.iter().map(|member| member.node).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(status[0].this_node);
    for member in &status[1..] {
        assert!(member.outbound_connected, "{member:?}");
        assert_eq!(member.inbound_links, 1, "{member:?}");
        assert!(member.last_answer_ms_ago.is_some());
    }
    for node in &nodes {
        node.shutdown().await;
    }
}

/// Node 1's link to node 2 through a proxy; every other link direct.
async fn proxied_one_to_two() -> (Vec<Arc<Transport>>, FaultProxy) {
    let direct = cluster(|_, _, address| address.to_string()).await;
    let proxy = FaultProxy::start(direct[1].local_addr()).await.unwrap();
    direct[0].add_member(2, proxy.local_addr().to_string()).await.unwrap();
    (direct, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_stops_calls_both_ways_until_it_heals() {
    let (nodes, proxy) = proxied_one_to_two().await;
    assert_eq!(call(&nodes[0], 2, "before").await.unwrap(), "2 got before");
    proxy.partition();
    let stalled = nodes[0].call_within(2, SERVICE_ECHO, Bytes::from_static(b"during"), Duration::from_millis(200));
    assert!(matches!(stalled.await, Err(ClusterError::Timeout { node: 2, .. })));
    // Node 2's own link to node 1 does not go through the proxy: it still works.
    assert_eq!(call(&nodes[1], 1, "direct").await.unwrap(), "1 got direct");
    assert!(nodes[0].members()[1].consecutive_failures >= 1);
    proxy.heal();
    assert_eq!(call_until_answered(&nodes[0], 2).await, "2 got again");
    assert_eq!(nodes[0].members()[1].consecutive_failures, 0);
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_partition_loses_the_answers_but_not_the_requests() {
    let (nodes, proxy) = proxied_one_to_two().await;
    assert_eq!(call(&nodes[0], 2, "before").await.unwrap(), "2 got before");
    let before = proxy.forwarded_bytes();
    proxy.partition_one_way(Direction::FromTarget);
    let unanswered = nodes[0].call_within(2, SERVICE_ECHO, Bytes::from_static(b"lost"), Duration::from_millis(200));
    assert!(matches!(unanswered.await, Err(ClusterError::Timeout { .. })));
    // The request went through (the proxy forwards it whenever it gets to it).
    while proxy.forwarded_bytes() == before {
        tokio::task::yield_now().await;
    }
    proxy.heal();
    assert_eq!(call_until_answered(&nodes[0], 2).await, "2 got again");
    proxy.partition_one_way(Direction::ToTarget);
    let unsent = nodes[0].call_within(2, SERVICE_ECHO, Bytes::from_static(b"held"), Duration::from_millis(200));
    assert!(matches!(unsent.await, Err(ClusterError::Timeout { .. })));
    proxy.heal();
    assert_eq!(call_until_answered(&nodes[0], 2).await, "2 got again");
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_fail_their_calls_and_the_link_is_dialed_again() {
    let (nodes, proxy) = proxied_one_to_two().await;
    assert_eq!(call(&nodes[0], 2, "before").await.unwrap(), "2 got before");
    proxy.drop_connections();
    // The cut link fails (closed, or refused when dialed again while the proxy still drops).
    loop {
        match call(&nodes[0], 2, "during").await {
            Err(ClusterError::Disconnected(2) | ClusterError::Unreachable { node: 2, .. }) => break,
            // The cut may not have reached this end yet.
            Ok(_) => tokio::task::yield_now().await,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(!nodes[0].members()[1].outbound_connected);
    proxy.heal();
    assert_eq!(call_until_answered(&nodes[0], 2).await, "2 got again");
    assert!(nodes[0].members()[1].outbound_connected);
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_link_still_answers_every_call_in_full() {
    let (nodes, proxy) = proxied_one_to_two().await;
    proxy.delay(20);
    let big = Bytes::from(vec![b'x'; 300_000]);
    let answer = nodes[0].call(2, SERVICE_ECHO, big.clone()).await.unwrap();
    assert_eq!(answer.len(), "2 got ".len() + big.len());
    proxy.heal();
    for node in &nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_for_another_node_or_from_a_stranger_is_refused() {
    let nodes = cluster(|_, _, address| address.to_string()).await;
    for (hello, expected) in [
        (Hello { from: 2, to: 3 }, "this is node 1, not node 3"),
        (Hello { from: 9, to: 1 }, "node 9 is not a member node 1 knows"),
    ] {
        let mut socket = tokio::net::TcpStream::connect(nodes[0].local_addr()).await.unwrap();
        socket.write_all(&hello.encode()).await.unwrap();
        let mut head = [0u8; HELLO_REPLY_HEAD_BYTES];
        socket.read_exact(&mut head).await.unwrap();
        let (node, refused, reason_bytes) = HelloReply::decode_head(&head).unwrap();
        let mut reason = vec![0u8; reason_bytes];
        socket.read_exact(&mut reason).await.unwrap();
        assert_eq!((node, refused, String::from_utf8(reason).unwrap().as_str()), (1, true, expected));
        assert_eq!(socket.read(&mut [0u8; 1]).await.unwrap(), 0, "closed after the refusal");
    }
    // A node that dials the wrong address learns it from the answer.
    nodes[1].add_member(3, nodes[0].local_addr().to_string()).await.unwrap();
    let wrong = call(&nodes[1], 3, "hello").await.unwrap_err();
    assert!(wrong.to_string().contains("this is node 1, not node 3"), "{wrong}");
    for node in &nodes {
        node.shutdown().await;
    }
}

/// Whether the other end closed the socket without sending anything (a close with bytes still
/// unread on its side is a reset).
async fn closed(socket: &mut tokio::net::TcpStream) -> bool {
    match socket.read(&mut [0u8; 64]).await {
        Ok(read) => read == 0,
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bytes_on_a_link_close_that_link_only() {
    let nodes = cluster(|_, _, address| address.to_string()).await;
    // Not a cluster link at all.
    let mut stranger = tokio::net::TcpStream::connect(nodes[0].local_addr()).await.unwrap();
    stranger.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert!(closed(&mut stranger).await, "closed without an answer");
    // A member's link that sends a frame over the limit, then one of an unknown kind.
    for bad in [u32::MAX.to_be_bytes().to_vec(), {
        let mut frame = bytes::BytesMut::new();
        Frame { kind: Kind::Request, id: 1, service: SERVICE_ECHO, payload: Bytes::new() }
            .encode(&mut frame, 64)
            .unwrap();
        frame[4] = 9;
        frame.to_vec()
    }] {
        let mut socket = tokio::net::TcpStream::connect(nodes[0].local_addr()).await.unwrap();
        socket.write_all(&Hello { from: 2, to: 1 }.encode()).await.unwrap();
        let mut head = [0u8; HELLO_REPLY_HEAD_BYTES];
        socket.read_exact(&mut head).await.unwrap();
        assert!(!HelloReply::decode_head(&head).unwrap().1);
        socket.write_all(&bad).await.unwrap();
        assert!(closed(&mut socket).await, "the link was closed");
    }
    // The node still answers its members.
    assert_eq!(call(&nodes[1], 1, "still").await.unwrap(), "1 got still");
    for node in &nodes {
        node.shutdown().await;
    }
}
