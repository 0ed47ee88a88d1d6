//! Redis coming back empty under live runs.
//!
//! A restart without persistence loses every session's lock, owner record and
//! seq counter while runs go on on their owners, which re-take their locks at
//! their next append or renewal (within a third of the lease). Until then such
//! a session looks idle. A session that had events and changed recently (by
//! SQL) but has no counter lost its state: while Redis has been up for less
//! than a lease, starts (the START script) are refused and readers
//! ([`RedisRegistry::settle_session`]) wait, by when a live owner holds its lock
//! again or is gone for good. Only Redis's own uptime decides, so no node's
//! clock matters and nothing waits once Redis is older than a lease.

use std::time::Duration;

use super::{
    RedisRegistry,
    node::{Lane, MAX_SCRIPT_SEQ, SEQ_IDLE_TTL, millis},
};
use crate::runs::RegistryError;

/// Whether a session changed recently enough that Redis should still hold its
/// seq counter (kept [`SEQ_IDLE_TTL`] after its last run); an hour of slack
/// covers clocks and a counter set a little after the session's last write.
pub fn recently_active(last_active_ms: i64) -> bool {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let age_ms = i64::try_from(now.as_millis()).unwrap_or(i64::MAX).saturating_sub(last_active_ms);
    let kept = SEQ_IDLE_TTL.saturating_sub(Duration::from_secs(3600));
    age_ms < i64::try_from(kept.as_millis()).unwrap_or(i64::MAX)
}

impl RedisRegistry {
    /// How long a reader should wait before trusting what Redis says of the
    /// session (zero: now). See the module doc.
    pub(super) async fn settle_session(
        &self,
        session_id: &str,
        seq_floor: u64,
        last_active_ms: i64,
    ) -> Result<Duration, RegistryError> {
        let node = &self.node;
        let floor = seq_floor.min(MAX_SCRIPT_SEQ - 1);
        let inv = node.scripts.settle(session_id, floor, millis(node.opts.lease), recently_active(last_active_ms));
        let wait_ms: u64 = node.retrying("settle", node.retry_window(), || node.invoke_on(Lane::Write, &inv)).await?;
        if wait_ms > 0 {
            metrics::counter!("chatgate_subscribes_waiting_recovery_total").increment(1);
        }
        Ok(Duration::from_millis(wait_ms))
    }
}
