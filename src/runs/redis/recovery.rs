//! Redis coming back empty under live runs.
//!
//! A restart without persistence loses every session's lock, owner record and
//! seq counter while runs go on on their owners, which re-take their locks at
//! their next append or renewal (within a third of the lease). Until then such
//! a session looks idle. A session that had events and changed recently (by
//! SQL) but has no counter lost its state: while Redis has been up for less
//! than a lease, starts (the START script, [`super::ownership`]) are refused and
//! readers (the SETTLE script, `SessionFeeds::settle` in [`super::feeds`]) wait,
//! by when a live owner holds its lock again or is gone for good. Only Redis's
//! own uptime decides, so no node's clock matters and nothing waits once Redis
//! is older than a lease.

use std::time::Duration;

use super::node::SEQ_IDLE_TTL;

/// Whether a session changed recently enough that Redis should still hold its
/// seq counter (kept [`SEQ_IDLE_TTL`] after its last run); an hour of slack
/// covers clocks and a counter set a little after the session's last write.
pub(super) fn recently_active(last_active_ms: i64) -> bool {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let age_ms = i64::try_from(now.as_millis()).unwrap_or(i64::MAX).saturating_sub(last_active_ms);
    let kept = SEQ_IDLE_TTL.saturating_sub(Duration::from_secs(3600));
    age_ms < i64::try_from(kept.as_millis()).unwrap_or(i64::MAX)
}
