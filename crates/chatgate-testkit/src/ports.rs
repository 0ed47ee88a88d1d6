//! Free TCP ports for listeners (nodes, Redis, nginx) on 127.0.0.1.
//!
//! Ports are taken *below* the kernel's ephemeral range: outgoing connections (to Redis,
//! PostgreSQL, each other) take their source ports from that range, and one could take a
//! listener's port between the check here and the listener's bind, or while a node or Redis
//! is down between two starts on the same port.

use anyhow::bail;

/// How far a Redis Cluster node's bus port lies above its client port.
pub const CLUSTER_BUS_OFFSET: u16 = 10_000;

/// `count` consecutive ports, each free now, below the ephemeral range.
pub fn free_ports(count: u16) -> anyhow::Result<Vec<u16>> {
    let low = ephemeral_low();
    let (from, to) = (low.saturating_sub(12_000).max(10_000), low.saturating_sub(count));
    consecutive_free(count, from, to, 0)
}

/// `count` consecutive ports P for Redis Cluster nodes: each P and its bus port
/// P + [`CLUSTER_BUS_OFFSET`] free now, and both below the ephemeral range.
pub fn free_cluster_ports(count: u16) -> anyhow::Result<Vec<u16>> {
    let to = ephemeral_low().saturating_sub(CLUSTER_BUS_OFFSET + count);
    consecutive_free(count, 10_000.min(to.saturating_sub(1)), to, CLUSTER_BUS_OFFSET)
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    range.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(32768)
}

/// `count` consecutive ports from `from..to`, each free now, and so is each one's `+ offset`
/// when the offset is not zero.
fn consecutive_free(count: u16, from: u16, to: u16, offset: u16) -> anyhow::Result<Vec<u16>> {
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..200 {
        let base = rand::random_range(from..to);
        if (base..base + count).all(|port| free(port) && (offset == 0 || free(port + offset))) {
            return Ok((base..base + count).collect());
        }
    }
    bail!("no {count} consecutive free ports between {from} and {to} (offset {offset})")
}

/// One free port (see [`free_ports`]).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(free_ports(1)?[0])
}
