//! Admission at the HTTP edge (docs/operations.md "Abuse limits"): the per-IP rate of new
//! connections, open sockets per user, the client address behind trusted proxies, the inbound
//! frame rate of one socket, and the 429 answer. The numbers and the token bucket are the
//! gateway's rules ([`crate::gateway::limits`]).
//!
//! Every table here is bounded: per-IP buckets live in two generations of at
//! most [`IP_GENERATION_CAPACITY`] entries each (an address not seen for a
//! whole generation starts again with a full bucket), and a user's socket count
//! is removed when its last socket closes.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use ipnet::IpNet;

use super::{ApiError, RestCode};
use crate::{
    gateway::limits::{Limit, LimitSettings, TokenBucket},
    sync::lock_unpoisoned,
};

/// Client addresses remembered per generation of the per-IP table.
pub const IP_GENERATION_CAPACITY: usize = 32 * 1024;
/// A socket whose dropped frames within one [`FRAME_WINDOW`] pass this many
/// times `--frame-burst` is flooding: it is closed with 1008.
pub const FLOOD_FACTOR: u32 = 4;
/// The window in which a socket is told `RATE_LIMITED` once and its drops are counted.
pub const FRAME_WINDOW: Duration = Duration::from_secs(1);

/// An HTTP 429 in the REST error envelope, with `Retry-After`.
pub fn too_many_requests(message: impl Into<String>, retry_after_secs: u64) -> Response {
    let mut response = ApiError::new(RestCode::RateLimited, message).into_response();
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs.max(1)));
    response
}

/// Per-address token buckets in two bounded generations: when the current one
/// fills up it becomes the previous one (the older is dropped), and an address
/// found in the previous generation moves back to the current one.
struct IpBuckets {
    current: HashMap<IpAddr, TokenBucket>,
    previous: HashMap<IpAddr, TokenBucket>,
    capacity: usize,
}

impl IpBuckets {
    fn bucket(&mut self, key: IpAddr, burst: u32, now: Instant) -> &mut TokenBucket {
        if !self.current.contains_key(&key) {
            let bucket = self.previous.remove(&key).unwrap_or_else(|| TokenBucket::full(burst, now));
            if self.current.len() >= self.capacity {
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(key, bucket);
        }
        // Present: found or inserted above.
        self.current.entry(key).or_insert_with(|| TokenBucket::full(burst, now))
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// The node's connection limits: new sockets per client address, open sockets per user.
pub struct ConnectionLimits {
    settings: LimitSettings,
    ip_buckets: Mutex<IpBuckets>,
    user_sockets: Arc<Mutex<HashMap<String, u32>>>,
}

impl ConnectionLimits {
    pub fn new(settings: LimitSettings) -> Self {
        Self::with_ip_capacity(settings, IP_GENERATION_CAPACITY)
    }

    fn with_ip_capacity(settings: LimitSettings, capacity: usize) -> Self {
        ConnectionLimits {
            settings,
            ip_buckets: Mutex::new(IpBuckets {
                current: HashMap::new(),
                previous: HashMap::new(),
                capacity: capacity.max(1),
            }),
            user_sockets: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    /// The client's address: the peer, or — when the peer is a trusted proxy —
    /// the nearest address in `X-Forwarded-For` that is not a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        client_ip(peer, headers, &self.settings.trusted_proxies)
    }

    /// Takes one new-connection token of `client`; false when its bucket is empty.
    pub fn admit_connection(&self, client: IpAddr) -> bool {
        let (rate, burst) = (self.settings.conn_rate_per_ip, self.settings.conn_burst_per_ip);
        let now = Instant::now();
        let admitted = lock_unpoisoned(&self.ip_buckets).bucket(rate_key(client), burst, now).take(rate, burst, now);
        if !admitted {
            Limit::ConnectionsPerIp.refused();
        }
        admitted
    }

    /// Addresses the per-IP table holds (at most twice the generation capacity).
    pub fn tracked_addresses(&self) -> usize {
        lock_unpoisoned(&self.ip_buckets).len()
    }

    /// A socket slot of `user_id`, or `None` when the user has `--max-sockets-per-user` open.
    pub fn acquire_socket(&self, user_id: &str) -> Option<SocketSlot> {
        let mut counts = lock_unpoisoned(&self.user_sockets);
        let open = counts.entry(user_id.to_string()).or_insert(0);
        if *open >= self.settings.max_sockets_per_user {
            if *open == 0 {
                counts.remove(user_id);
            }
            drop(counts);
            Limit::SocketsPerUser.refused();
            return None;
        }
        *open += 1;
        Some(SocketSlot { user_id: user_id.to_string(), counts: self.user_sockets.clone() })
    }

    /// Users with at least one open socket on this node.
    pub fn users_with_sockets(&self) -> usize {
        lock_unpoisoned(&self.user_sockets).len()
    }
}

/// One of a user's socket slots; released on drop (the socket ended, or its upgrade failed).
pub struct SocketSlot {
    user_id: String,
    counts: Arc<Mutex<HashMap<String, u32>>>,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut counts = lock_unpoisoned(&self.counts);
        if let Some(open) = counts.get_mut(&self.user_id) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                counts.remove(&self.user_id);
            }
        }
    }
}

/// IPv4 addresses count alone; IPv6 addresses by their /64, the block one
/// subscriber usually holds.
fn rate_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    proxies.iter().any(|net| net.contains(&ip))
}

/// See [`ConnectionLimits::client_ip`]. Entries are read right to left (each
/// proxy appends the address it got the request from); the first one that is
/// not a trusted proxy is the client. An entry that does not parse stops the
/// walk: the trusted hop that appended it is taken as the client.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, proxies: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    if proxies.is_empty() || !trusted(peer, proxies) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_forwarded_entry(entry) else { break };
        client = ip;
        if !trusted(ip, proxies) {
            break;
        }
    }
    client
}

/// An `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    entry.parse::<SocketAddr>().ok().map(|addr| addr.ip().to_canonical())
}

/// What to do with one inbound frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameVerdict {
    /// Within the rate: handle it.
    Accept,
    /// Over the rate: drop it; `notify` for the first drop of a window
    /// (the socket is told `RATE_LIMITED` once per window, not per frame).
    Drop { notify: bool },
    /// Flooding far beyond the rate: close the socket with 1008.
    Close,
}

/// Inbound frame rate of one socket: `--frame-rate` with a `--frame-burst` bucket.
pub struct FrameLimiter {
    rate: u32,
    burst: u32,
    bucket: TokenBucket,
    window_started: Option<Instant>,
    dropped_in_window: u32,
}

impl FrameLimiter {
    pub fn new(rate: u32, burst: u32) -> Self {
        FrameLimiter {
            rate,
            burst,
            bucket: TokenBucket::full(burst, Instant::now()),
            window_started: None,
            dropped_in_window: 0,
        }
    }

    /// Counts one frame (text, binary or ping; never a pong or a close).
    pub fn check(&mut self, now: Instant) -> FrameVerdict {
        if self.bucket.take(self.rate, self.burst, now) {
            return FrameVerdict::Accept;
        }
        let new_window =
            self.window_started.is_none_or(|started| now.saturating_duration_since(started) >= FRAME_WINDOW);
        if new_window {
            self.window_started = Some(now);
            self.dropped_in_window = 0;
        }
        self.dropped_in_window = self.dropped_in_window.saturating_add(1);
        if self.dropped_in_window > self.burst.saturating_mul(FLOOD_FACTOR) {
            Limit::FrameFlood.refused();
            return FrameVerdict::Close;
        }
        Limit::FramesPerSecond.refused();
        FrameVerdict::Drop { notify: new_window }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LimitSettings {
        LimitSettings {
            conn_rate_per_ip: 1,
            conn_burst_per_ip: 2,
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            max_sockets_per_user: 2,
            max_subscriptions_per_socket: 1,
            max_sends_per_minute: 1,
            frame_rate: 10,
            frame_burst: 5,
            max_replay_bytes: 10,
        }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append("x-forwarded-for", value.parse().unwrap());
        }
        map
    }

    fn ip(raw: &str) -> IpAddr {
        raw.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies = settings().trusted_proxies;
        let xff = headers(&["203.0.113.9, 10.1.1.1"]);
        assert_eq!(client_ip(ip("198.51.100.1"), &xff, &proxies), ip("198.51.100.1"), "untrusted peer");
        assert_eq!(client_ip(ip("10.0.0.2"), &xff, &proxies), ip("203.0.113.9"), "skips trusted hops");
        let spoofed = headers(&["1.1.1.1", "203.0.113.9"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &spoofed, &proxies), ip("203.0.113.9"), "rightmost untrusted wins");
        assert_eq!(client_ip(ip("10.0.0.2"), &HeaderMap::new(), &proxies), ip("10.0.0.2"), "no header");
        assert_eq!(client_ip(ip("10.0.0.2"), &headers(&["junk, 10.9.9.9"]), &proxies), ip("10.9.9.9"));
        assert_eq!(client_ip(ip("10.0.0.2"), &headers(&["[2001:db8::1]:443"]), &proxies), ip("2001:db8::1"));
        assert_eq!(client_ip(ip("::ffff:10.0.0.2"), &xff, &proxies), ip("203.0.113.9"), "mapped peer");
        assert_eq!(client_ip(ip("10.0.0.2"), &xff, &[]), ip("10.0.0.2"), "no proxies configured");
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64() {
        assert_eq!(rate_key(ip("2001:db8:1:2:aaaa::1")), rate_key(ip("2001:db8:1:2:bbbb::2")));
        assert_ne!(rate_key(ip("2001:db8:1:2::1")), rate_key(ip("2001:db8:1:3::1")));
        assert_eq!(rate_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn ip_table_stays_bounded_and_keeps_recent_addresses() {
        let limits = ConnectionLimits::with_ip_capacity(settings(), 4);
        let hot = ip("192.0.2.200");
        assert!(limits.admit_connection(hot) && limits.admit_connection(hot));
        assert!(!limits.admit_connection(hot), "burst of 2 used");
        for i in 0..1000u32 {
            let other = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(limits.admit_connection(other));
            assert!(limits.tracked_addresses() <= 8);
            if i % 3 == 0 {
                // Seen again every few addresses: never evicted, still empty.
                assert!(!limits.admit_connection(hot), "at {i}");
            }
        }
    }

    #[test]
    fn socket_slots_are_counted_per_user_and_released() {
        let limits = ConnectionLimits::new(settings());
        let a1 = limits.acquire_socket("a").unwrap();
        let a2 = limits.acquire_socket("a").unwrap();
        assert!(limits.acquire_socket("a").is_none());
        let b = limits.acquire_socket("b").unwrap();
        drop(a1);
        let a3 = limits.acquire_socket("a").unwrap();
        drop((a2, a3, b));
        assert_eq!(limits.users_with_sockets(), 0, "no entry outlives its sockets");
    }

    #[test]
    fn frames_over_the_rate_are_dropped_noticed_once_per_window_then_closed() {
        let mut limiter = FrameLimiter::new(10, 5);
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(limiter.check(now), FrameVerdict::Accept);
        }
        assert_eq!(limiter.check(now), FrameVerdict::Drop { notify: true });
        assert_eq!(limiter.check(now), FrameVerdict::Drop { notify: false });
        let next = now + Duration::from_millis(1100);
        for _ in 0..5 {
            assert_eq!(limiter.check(next), FrameVerdict::Accept, "refilled");
        }
        assert_eq!(limiter.check(next), FrameVerdict::Drop { notify: true }, "a new window is noticed again");
        let verdicts: Vec<FrameVerdict> = (0..FLOOD_FACTOR * 5).map(|_| limiter.check(next)).collect();
        assert_eq!(verdicts.last(), Some(&FrameVerdict::Close));
        assert!(verdicts[..verdicts.len() - 1].iter().all(|v| *v == FrameVerdict::Drop { notify: false }));
    }
}
