//! A Raft group of three nodes on loopback, each with its own store, its links through fault
//! proxies the test controls: commands commit on a majority and every member applies them in
//! order; a partitioned leader is replaced and the group goes on, and the old leader catches up
//! once the partition heals; a node crashed (as a power loss) comes back from its store and
//! catches up; a node cut off while the leader snapshots and purges its log catches up from a
//! snapshot sent over its link; a fourth node joins as a learner, becomes a voter in place of another, and the
//! group's status says so. Waits are on openraft's metrics (events), never on time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use openraft::{BasicNode, ServerState};
use std::collections::BTreeSet;
use wharf_raft::GroupStatus;
use wharf_store::CrashMode;

mod common;
use common::cluster::{applied_up_to, leader_of, node, start_node, texts, three_nodes, write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_commit_on_a_majority_and_every_member_applies_them_in_order() {
    let (nodes, _proxies) = three_nodes(1).await;
    let leader = leader_of(&nodes, &[1, 2, 3]).await;
    for index in 0..20 {
        write(node(&nodes, leader), &format!("command {index}")).await;
    }
    let last = node(&nodes, leader).raft.metrics().borrow().last_log_index.unwrap();
    let expected: Vec<String> = (0..20).map(|index| format!("command {index}")).collect();
    for member in &nodes {
        applied_up_to(member, last).await;
        assert_eq!(texts(&member.machine), expected, "node {}", member.id);
    }
    for member in &nodes {
        member.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_is_replaced_and_catches_up_after_the_heal() {
    let (nodes, proxies) = three_nodes(1).await;
    let old = leader_of(&nodes, &[1, 2, 3]).await;
    write(node(&nodes, old), "before").await;
    for ((from, to), proxy) in &proxies {
        if *from == old || *to == old {
            proxy.partition();
        }
    }
    let rest: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    let new = leader_of(&nodes, &rest).await;
    assert_ne!(new, old);
    write(node(&nodes, new), "during").await;
    for proxy in proxies.values() {
        proxy.heal();
    }
    let last = node(&nodes, new).raft.metrics().borrow().last_log_index.unwrap();
    for member in &nodes {
        applied_up_to(member, last).await;
        assert_eq!(texts(&member.machine), vec!["before", "during"], "node {}", member.id);
    }
    let state = node(&nodes, old).raft.metrics().borrow().state;
    assert_ne!(state, ServerState::Leader, "the old leader stepped down");
    for member in &nodes {
        member.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_comes_back_from_its_store_and_catches_up() {
    let (mut nodes, proxies) = three_nodes(2).await;
    let old = leader_of(&nodes, &[1, 2, 3]).await;
    write(node(&nodes, old), "first").await;
    // A power loss on the leader: what it had not synced is gone; its links are cut.
    for ((from, to), proxy) in &proxies {
        if *from == old || *to == old {
            proxy.drop_connections();
        }
    }
    let position = nodes.iter().position(|member| member.id == old).unwrap();
    nodes[position].crash_and_restart(CrashMode::LoseUnsynced).await;
    let rest: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    let new = leader_of(&nodes, &rest).await;
    write(node(&nodes, new), "second").await;
    for proxy in proxies.values() {
        proxy.heal();
    }
    let last = node(&nodes, new).raft.metrics().borrow().last_log_index.unwrap();
    for member in &nodes {
        applied_up_to(member, last).await;
        assert_eq!(texts(&member.machine), vec!["first", "second"], "node {}", member.id);
    }
    for member in &nodes {
        member.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_joins_as_a_learner_and_replaces_a_voter() {
    let (mut nodes, _proxies) = three_nodes(3).await;
    let leader = leader_of(&nodes, &[1, 2, 3]).await;
    write(node(&nodes, leader), "before the join").await;
    let fourth = start_node(4, 44).await;
    for other in &nodes {
        other.transport.add_member(4, fourth.transport.local_addr().to_string()).await.unwrap();
        fourth.transport.add_member(other.id, other.transport.local_addr().to_string()).await.unwrap();
    }
    let address = fourth.transport.local_addr().to_string();
    node(&nodes, leader).raft.add_learner(4, BasicNode::new(address), true).await.unwrap();
    let status = GroupStatus::of(&node(&nodes, leader).raft);
    assert_eq!((status.role, status.voters.clone(), status.learners.clone()), ("leader", vec![1, 2, 3], vec![4]));
    assert_eq!(status.lag.keys().copied().collect::<Vec<_>>(), {
        let mut others: Vec<u64> = vec![1, 2, 3, 4].into_iter().filter(|id| *id != leader).collect();
        others.sort();
        others
    });
    // A voter that is not the leader leaves; the learner takes its place.
    let leaving = (1..=3).find(|id| *id != leader).unwrap();
    let voters: BTreeSet<u64> = [1, 2, 3, 4].into_iter().filter(|id| *id != leaving).collect();
    node(&nodes, leader).raft.change_membership(voters.clone(), false).await.unwrap();
    write(node(&nodes, leader), "after the change").await;
    nodes.push(fourth);
    let last = node(&nodes, leader).raft.metrics().borrow().last_log_index.unwrap();
    applied_up_to(node(&nodes, 4), last).await;
    assert_eq!(texts(&node(&nodes, 4).machine), vec!["before the join", "after the change"]);
    let status = GroupStatus::of(&node(&nodes, 4).raft);
    assert_eq!((status.role, status.leader), ("follower", Some(leader)));
    assert_eq!(status.voters, voters.into_iter().collect::<Vec<_>>());
    assert!(status.learners.is_empty());
    for member in &nodes {
        member.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_purged_log_catches_up_from_a_snapshot() {
    let (nodes, proxies) = three_nodes(5).await;
    let leader = leader_of(&nodes, &[1, 2, 3]).await;
    let behind = (1..=3).find(|id| *id != leader).unwrap();
    for ((from, to), proxy) in &proxies {
        if *from == behind || *to == behind {
            proxy.partition();
        }
    }
    let behind_last = node(&nodes, behind).raft.metrics().borrow().last_log_index.unwrap_or(0);
    let expected: Vec<String> = (0..300).map(|index| format!("entry {index}")).collect();
    for text in &expected {
        write(node(&nodes, leader), text).await;
    }
    // The leader snapshots every 200 entries and keeps 20 behind: the entries the cut-off node
    // needs next are gone from its log.
    node(&nodes, leader)
        .raft
        .wait(None)
        .metrics(|metrics| metrics.purged.is_some_and(|purged| purged.index > behind_last + 1), "purged")
        .await
        .unwrap();
    for proxy in proxies.values() {
        proxy.heal();
    }
    let last = node(&nodes, leader).raft.metrics().borrow().last_log_index.unwrap();
    applied_up_to(node(&nodes, behind), last).await;
    // The leader no longer had the entries the node needed next (the wait above), so this
    // state came in a snapshot. (The node's own snapshot metric would prove nothing: it builds
    // one itself after 200 entries either way.)
    assert_eq!(texts(&node(&nodes, behind).machine), expected);
    for member in &nodes {
        member.stop().await;
    }
}
