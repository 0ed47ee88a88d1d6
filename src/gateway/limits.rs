//! Abuse limits, the rules (docs/operations.md "Abuse limits"): the limits of one node
//! ([`LimitSettings`]), the label of every refusal ([`Limit`]), the token bucket every rate
//! uses, the `chat.send` window and the replay bound of one subscribe. Admission at the HTTP
//! edge (the per-IP connection rate, sockets per user, inbound frames per socket, the 429
//! answer) is `api::admission`; the `chat.send` rate is counted by the run registry, so it
//! holds across the cluster; subscriptions per socket are counted by the
//! [`Connection`](super::Connection).

use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::runs::Event;

/// The limits of one node (README §Configuration, docs/operations.md §13).
#[derive(Debug, Clone)]
pub struct LimitSettings {
    /// `--conn-rate-per-ip`: new WebSockets per second per client address.
    pub conn_rate_per_ip: u32,
    /// `--conn-burst-per-ip`: new WebSockets one client address may open at once.
    pub conn_burst_per_ip: u32,
    /// `--trusted-proxies`: peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// `--max-sockets-per-user`, on this node.
    pub max_sockets_per_user: u32,
    /// `--max-subscriptions-per-socket`.
    pub max_subscriptions_per_socket: u32,
    /// `--max-sends-per-minute`, per user across the cluster.
    pub max_sends_per_minute: u32,
    /// `--frame-rate`: inbound frames per second per socket.
    pub frame_rate: u32,
    /// `--frame-burst`: inbound frames one socket may send at once.
    pub frame_burst: u32,
    /// `--max-replay-bytes`: replayed bytes per subscribe target.
    pub max_replay_bytes: usize,
}

/// The window of `--max-sends-per-minute`.
pub const SEND_WINDOW: Duration = Duration::from_secs(60);

/// Which limit refused something: the `limit` label of `chatgate_limit_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    ConnectionsPerIp,
    SocketsPerUser,
    SubscriptionsPerSocket,
    SendsPerMinute,
    FramesPerSecond,
    FrameFlood,
    HandshakeTimeout,
    BodyBytes,
    ReplayBytes,
    MaxRuns,
}

impl Limit {
    pub const ALL: [Limit; 10] = [
        Limit::ConnectionsPerIp,
        Limit::SocketsPerUser,
        Limit::SubscriptionsPerSocket,
        Limit::SendsPerMinute,
        Limit::FramesPerSecond,
        Limit::FrameFlood,
        Limit::HandshakeTimeout,
        Limit::BodyBytes,
        Limit::ReplayBytes,
        Limit::MaxRuns,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::ConnectionsPerIp => "connections_per_ip",
            Limit::SocketsPerUser => "sockets_per_user",
            Limit::SubscriptionsPerSocket => "subscriptions_per_socket",
            Limit::SendsPerMinute => "sends_per_minute",
            Limit::FramesPerSecond => "frames_per_second",
            Limit::FrameFlood => "frame_flood",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::BodyBytes => "body_bytes",
            Limit::ReplayBytes => "replay_bytes",
            Limit::MaxRuns => "max_runs",
        }
    }

    /// Counts one refusal (a refused upgrade, request or verb, a dropped frame, a cut replay).
    pub fn refused(self) {
        metrics::counter!("chatgate_limit_refusals_total", "limit" => self.label()).increment(1);
    }
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: u32, now: Instant) -> Self {
        TokenBucket { tokens: f64::from(burst), refilled_at: now }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: u32, burst: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Bounds one subscribe's replay to `max_bytes` of frames, keeping the newest
/// events. True when events were cut (the ack then says `replayTruncated`).
pub fn cap_replay(replay: &mut Vec<Event>, max_bytes: usize) -> bool {
    let mut bytes = 0usize;
    let mut keep = 0usize;
    for event in replay.iter().rev() {
        bytes = bytes.saturating_add(event.frame.len());
        if bytes > max_bytes {
            break;
        }
        keep += 1;
    }
    let cut = replay.len() - keep;
    if cut == 0 {
        return false;
    }
    replay.drain(..cut);
    Limit::ReplayBytes.refused();
    true
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::protocol::Frame;

    #[test]
    fn bucket_refills_at_the_rate_up_to_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(2, start);
        assert!(bucket.take(10, 2, start) && bucket.take(10, 2, start));
        assert!(!bucket.take(10, 2, start));
        assert!(bucket.take(10, 2, start + Duration::from_millis(100)));
        assert!(!bucket.take(10, 2, start + Duration::from_millis(150)));
        let later = start + Duration::from_secs(60);
        assert!(bucket.take(10, 2, later) && bucket.take(10, 2, later) && !bucket.take(10, 2, later));
    }

    fn event(seq: u64, bytes: usize) -> Event {
        let body = "x".repeat(bytes);
        Event { seq, run_id: Arc::from("r"), terminal: false, frame: Frame::from(body) }
    }

    #[test]
    fn replay_cap_keeps_the_newest_events() {
        let mut replay: Vec<Event> = (1..=5).map(|seq| event(seq, 4)).collect();
        assert!(cap_replay(&mut replay, 10));
        assert_eq!(replay.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        let mut small: Vec<Event> = (1..=2).map(|seq| event(seq, 4)).collect();
        assert!(!cap_replay(&mut small, 8));
        assert_eq!(small.len(), 2);
        let mut huge = vec![event(1, 100)];
        assert!(cap_replay(&mut huge, 10));
        assert!(huge.is_empty());
    }
}
