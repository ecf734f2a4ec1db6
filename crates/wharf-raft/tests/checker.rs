//! A Jepsen-style check of the replication core: clients write to a three-node group while a
//! seeded schedule partitions nodes (both ways and one way), delays and cuts links, crashes
//! nodes (as a power loss or as `kill -9`) and restarts them from their stores, and stalls the
//! disks of two nodes, then cuts their power. At the end, with
//! every fault healed: every write a client saw confirmed was applied, on every node, exactly
//! once; nothing was applied that no client wrote; and every node applied the same sequence.
//!
//! CI runs a bounded schedule; `WHARF_CHECKER_SEED` and `WHARF_CHECKER_STEPS` choose another
//! (longer runs and their results: `docs/replication-checks.md`):
//! `WHARF_CHECKER_STEPS=400 cargo test --release -p wharf-raft --test checker -- --nocapture`.
//! The schedule's pauses pace the faults; nothing waits on time to decide an outcome.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wharf_cluster::Direction;
use wharf_raft::Command;
use wharf_store::CrashMode;

mod common;
use common::cluster::{applied_up_to, leader_of, texts, three_nodes};

/// A small deterministic generator (xorshift64*): the schedule is the seed's.
struct Schedule(u64);

impl Schedule {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|text| text.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_writes_survive_partitions_and_crashes_exactly_once() {
    let seed = env_u64("WHARF_CHECKER_SEED", 20261205);
    let steps = env_u64("WHARF_CHECKER_STEPS", 24);
    println!("checker: seed {seed}, {steps} steps");
    let mut schedule = Schedule(seed.max(1));
    let (nodes, proxies) = three_nodes(seed).await;
    leader_of(&nodes, &[1, 2, 3]).await;
    let nodes = Arc::new(tokio::sync::RwLock::new(nodes));

    // Clients: each writes its own numbered commands, to whichever node it picks, and records
    // what was confirmed. A write that fails may or may not have been applied (indeterminate).
    let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
    let attempted = Arc::new(Mutex::new(BTreeSet::new()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut clients = Vec::new();
    for client in 0..3u64 {
        let (nodes, confirmed, attempted, stopped) =
            (Arc::clone(&nodes), Arc::clone(&confirmed), Arc::clone(&attempted), stopped.clone());
        let mut picks = Schedule(seed.wrapping_add(client + 1).max(1));
        clients.push(tokio::spawn(async move {
            let mut number = 0u64;
            // The node to write to next: the leader a refusal named, else one picked at random.
            let mut next: Option<u64> = None;
            while !*stopped.borrow() {
                let text = format!("client {client} write {number}");
                number += 1;
                attempted.lock().unwrap().insert(text.clone());
                let target = next.take().unwrap_or_else(|| 1 + picks.below(3));
                let raft = nodes.read().await.iter().find(|node| node.id == target).unwrap().raft.clone();
                let written =
                    tokio::time::timeout(Duration::from_secs(2), raft.client_write(Command(text.clone().into_bytes())));
                match written.await {
                    Ok(Ok(_)) => {
                        confirmed.lock().unwrap().insert(text);
                        next = Some(target);
                    }
                    Ok(Err(error)) => {
                        next = error.forward_to_leader().and_then(|forward| forward.leader_id);
                        // A client's pause before it tries again (no leader yet, say).
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => {}
                }
            }
        }));
    }

    for step in 0..steps {
        let target = 1 + schedule.below(3);
        let action = schedule.below(7);
        match action {
            0 => {
                println!("step {step}: partition node {target}");
                for ((from, to), proxy) in &proxies {
                    if *from == target || *to == target {
                        proxy.partition();
                    }
                }
            }
            1 => {
                let other = 1 + (target + schedule.below(2)) % 3;
                let direction = if schedule.below(2) == 0 { Direction::ToTarget } else { Direction::FromTarget };
                println!("step {step}: one-way partition on {target} -> {other} ({direction:?})");
                proxies[&(target, other)].partition_one_way(direction);
            }
            2 => {
                println!("step {step}: links of node {target} delayed");
                for ((from, to), proxy) in &proxies {
                    if *from == target || *to == target {
                        proxy.delay(1 + schedule.below(50));
                    }
                }
            }
            3 => {
                println!("step {step}: links of node {target} cut");
                for ((from, to), proxy) in &proxies {
                    if *from == target || *to == target {
                        proxy.drop_connections();
                    }
                }
            }
            4 => {
                let mode = if schedule.below(2) == 0 { CrashMode::LoseUnsynced } else { CrashMode::KeepUnsynced };
                println!("step {step}: crash node {target} ({mode:?}) and restart it");
                for ((from, to), proxy) in &proxies {
                    if *from == target || *to == target {
                        proxy.drop_connections();
                    }
                }
                let mut nodes = nodes.write().await;
                let position = nodes.iter().position(|node| node.id == target).unwrap();
                nodes[position].crash_and_restart(mode).await;
                for ((from, to), proxy) in &proxies {
                    if *from == target || *to == target {
                        proxy.heal();
                    }
                }
            }
            5 => {
                // Two machines' disks stall (writes go in, syncs never finish), then both lose
                // power: a confirmed write survives only if a majority had it synced before
                // the confirm, so nothing may be confirmed while they stall.
                let spared = target;
                println!("step {step}: disks stall on every node but {spared}, then both lose power and restart");
                for node in nodes.read().await.iter().filter(|node| node.id != spared) {
                    node.stall_disk();
                }
                tokio::time::sleep(Duration::from_millis(100 + schedule.below(400))).await;
                for proxy in proxies.values() {
                    proxy.drop_connections();
                }
                let mut nodes = nodes.write().await;
                for node in nodes.iter_mut().filter(|node| node.id != spared) {
                    node.crash_and_restart(CrashMode::LoseUnsynced).await;
                }
                for proxy in proxies.values() {
                    proxy.heal();
                }
            }
            _ => {
                println!("step {step}: heal everything");
                for proxy in proxies.values() {
                    proxy.heal();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100 + schedule.below(400))).await;
    }

    for proxy in proxies.values() {
        proxy.heal();
    }
    stop.send_replace(true);
    for client in clients {
        client.await.unwrap();
    }
    let nodes = nodes.read().await;
    // A last write through the leader commits everything before it; then every node applies up
    // to it. (A node back from a partition with a higher term can still depose the leader just
    // then: the write is tried again with whoever leads.)
    let last = loop {
        let leader = leader_of(&nodes, &[1, 2, 3]).await;
        let barrier = nodes.iter().find(|node| node.id == leader).unwrap();
        if let Ok(written) = barrier.raft.client_write(Command(b"barrier".to_vec())).await {
            break written.log_id.index;
        }
    };
    let confirmed = confirmed.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    let mut sequences = BTreeMap::new();
    for node in nodes.iter() {
        applied_up_to(node, last).await;
        let running = node.raft.metrics().borrow().running_state.clone();
        assert!(running.is_ok(), "node {}'s Raft stopped: {running:?}", node.id);
        let applied: Vec<String> = texts(&node.machine).into_iter().filter(|text| text != "barrier").collect();
        let unique: BTreeSet<&String> = applied.iter().collect();
        assert_eq!(unique.len(), applied.len(), "node {} applied a write twice", node.id);
        for text in &confirmed {
            assert!(unique.contains(text), "node {} lost confirmed {text:?}", node.id);
        }
        for text in &applied {
            assert!(attempted.contains(text), "node {} applied {text:?}, which nobody wrote", node.id);
        }
        sequences.insert(node.id, applied);
    }
    let first = sequences.values().next().unwrap();
    for (id, sequence) in &sequences {
        assert_eq!(sequence, first, "node {id} applied another sequence than node 1");
    }
    println!(
        "checker: {} writes attempted, {} confirmed, {} applied on every node, none lost or doubled",
        attempted.len(),
        confirmed.len(),
        first.len()
    );
    for node in nodes.iter() {
        node.stop().await;
    }
}
