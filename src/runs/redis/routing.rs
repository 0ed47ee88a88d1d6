//! Cross-node verbs: aborts and approval answers routed to the owner node,
//! per-user notices, readiness.

use std::time::Duration;

use ::redis::AsyncCommands;
use tokio::sync::broadcast;

use super::{
    RESPONSE_TIMEOUT, RedisRegistry,
    codec::OwnerRecord,
    keys,
    node::{self, Failure, Reaped},
};
use crate::sync::lock_unpoisoned;
use crate::{
    protocol::{Frame, PermissionAnswer},
    runs::{Control, RegistryError},
};

impl RedisRegistry {
    /// `route_abort`: to the lock holder if it is the user's run; an orphan is ended on the spot.
    pub(super) async fn abort_run(&self, session_id: &str, user_id: &str) -> Result<bool, RegistryError> {
        let node = &self.node;
        let (held, owner): (Option<String>, Option<String>) = node
            .retrying("abort_lookup", node.retry_window(), || async {
                let mut conn = node.conn().await?;
                Ok(::redis::pipe()
                    .get(keys::run(session_id))
                    .get(keys::owner(session_id))
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        if let Some(lock_json) = held {
            let owner = OwnerRecord::parse(&lock_json).map_err(Failure::from)?;
            if owner.user_id != user_id {
                return Ok(false);
            }
            let control = Control::Abort { session_id: session_id.to_string(), run_id: owner.run_id.clone() };
            node.deliver(&owner.node_id, session_id, &owner.run_id, control).await?;
            return Ok(true);
        }
        // An orphan (owner gone, not yet ended): end it now.
        let Some(owner) = owner.as_deref().and_then(|j| OwnerRecord::parse(j).ok()) else { return Ok(false) };
        if owner.user_id != user_id {
            return Ok(false);
        }
        Ok(node.reap(session_id, None, 0).await? != Reaped::Alive)
    }

    /// `route_permission`: `cg:perm:{R}` → session → the owner, if the run is the user's and still waits for R.
    pub(super) async fn answer_permission(
        &self,
        user_id: &str,
        request_id: &str,
        answer: PermissionAnswer,
    ) -> Result<bool, RegistryError> {
        let node = &self.node;
        let key = keys::permission(request_id);
        let session_id: Option<String> = node
            .retrying("permission_lookup", node.retry_window(), || async {
                let mut conn = node.conn().await?;
                Ok(conn.get(&key).await?)
            })
            .await?;
        let Some(session_id) = session_id else { return Ok(false) };
        let (held, known): (Option<String>, bool) = node
            .retrying("permission_check", node.retry_window(), || async {
                let mut conn = node.conn().await?;
                Ok(::redis::pipe()
                    .atomic()
                    .get(keys::run(&session_id))
                    .hexists(keys::pending(&session_id), request_id)
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        let Some(owner) = held.as_deref().and_then(|j| OwnerRecord::parse(j).ok()) else { return Ok(false) };
        if owner.user_id != user_id || !known {
            return Ok(false);
        }
        let control =
            Control::Permission { session_id: session_id.clone(), request_id: request_id.to_string(), answer };
        node.deliver(&owner.node_id, &session_id, &owner.run_id, control).await?;
        Ok(true)
    }

    /// `notify_user`: one PUBLISH on the user's channel; every node holding it fans out.
    pub(super) async fn publish_notice(&self, user_id: &str, frame: Frame) -> Result<(), RegistryError> {
        let node = &self.node;
        let channel = keys::user_channel(user_id);
        node.retrying("notify_user", node.retry_window(), || async {
            let mut conn = node.conn().await?;
            let _: u64 = conn.publish(&channel, frame.as_str()).await?;
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// `user_notices`: a receiver first, then a confirmed hold on the user's channel.
    pub(super) async fn notice_receiver(&self, user_id: &str) -> Result<broadcast::Receiver<Frame>, RegistryError> {
        let node = &self.node;
        let rx = lock_unpoisoned(&node.users)
            .entry(user_id.to_string())
            .or_insert_with(|| node::UserNotices { tx: broadcast::channel(node::USER_CAPACITY).0, holds: 0 })
            .tx
            .subscribe();
        let channel = keys::user_channel(user_id);
        node.hub.acquire(&channel).await?;
        let recorded = lock_unpoisoned(&node.users).get_mut(user_id).map(|u| u.holds += 1).is_some();
        if !recorded {
            node.hub.release(&channel).await;
        }
        Ok(rx)
    }

    /// `admit_send`: one script (INCR, PEXPIRE on the window's first send) on `cg:user:{U}:sends`.
    pub(super) async fn count_send(&self, user_id: &str, limit: u32, window: Duration) -> Result<bool, RegistryError> {
        let node = &self.node;
        let inv = node.scripts.count_send(user_id, node::millis(window));
        // Retried like every call: a retry after a lost reply may count a send twice,
        // which errs on the strict side by one.
        let count: u64 = node.retrying("count_send", node.retry_window(), || node.invoke(&inv)).await?;
        Ok(count <= u64::from(limit))
    }

    /// `ready`: pub/sub connected, last probe answered, PING answered.
    pub(super) async fn check_ready(&self) -> Result<(), String> {
        let node = &self.node;
        if !node.hub.is_connected() {
            return Err("Redis pub/sub connection is down".into());
        }
        lock_unpoisoned(&node.probe.status).clone()?;
        let ping = node.once("ping", || async {
            let mut conn = node.conn().await?;
            let _: String = ::redis::cmd("PING").query_async(&mut conn).await?;
            Ok(())
        });
        match tokio::time::timeout(RESPONSE_TIMEOUT, ping).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("Redis does not answer: {e}")),
            Err(_) => Err("Redis does not answer: timed out".into()),
        }
    }
}
