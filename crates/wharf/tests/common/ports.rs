//! Free loopback ports for test servers that must know their address before they start (a
//! cluster node's peers name it; a restarted broker keeps its address). Shared by the test
//! crates of `wharf` and `wharf-sdk` through `#[path]`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

/// A loopback address nobody listens on. It is taken below the kernel's ephemeral range: a port found by binding port
/// 0 lies in that range and, once released, can be taken by any outgoing connection of the
/// other nodes and tests running meanwhile, so the node would fail to start ("address in use").
/// Each test process walks the range from its own starting point, and skips ports in use.
pub fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_first = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next().and_then(|first| first.parse::<u32>().ok()))
        .unwrap_or(32768);
    let (first, last) = (10_000, ephemeral_first.min(65_536));
    if last <= first + 1_000 {
        return std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    }
    let span = last - first;
    let start = (std::process::id() * 613) % span;
    for _ in 0..span {
        let port = first + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().unwrap();
        }
    }
    panic!("no free port between {first} and {last}");
}
