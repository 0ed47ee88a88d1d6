//! Free TCP ports for listeners (nodes, Redis, nginx) on 127.0.0.1.
//!
//! Ports are taken *below* the kernel's ephemeral range: outgoing connections (to Redis,
//! PostgreSQL, each other) take their source ports from that range, and one could take a
//! listener's port between the check here and the listener's bind, or while a node or Redis
//! is down between two starts on the same port.

use anyhow::bail;

/// `count` consecutive ports, each free now, below the ephemeral range.
pub fn free_ports(count: u16) -> anyhow::Result<Vec<u16>> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range.split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(32768);
    let (from, to) = (low.saturating_sub(12_000).max(10_000), low.saturating_sub(count));
    for _ in 0..200 {
        let base = rand::random_range(from..to);
        if (base..base + count).all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return Ok((base..base + count).collect());
        }
    }
    bail!("no {count} consecutive free ports between {from} and {to}")
}

/// One free port (see [`free_ports`]).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(free_ports(1)?[0])
}
