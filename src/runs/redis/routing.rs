//! [`RunRouting`] over Redis: aborts and approval answers routed to the owner
//! node (through [`RedisNode::deliver`](super::node::RedisNode::deliver): directly when it is this one, else on
//! its `cg:node:<id>` channel), and a user's running runs from the per-user
//! run index, each entry checked against its owner record.

use ::redis::AsyncCommands;
use async_trait::async_trait;

use super::{
    RedisRegistry,
    codec::OwnerRecord,
    keys,
    node::{Failure, Reaped, parse_index_member},
};
use crate::{
    protocol::PermissionAnswer,
    runs::{Control, RegistryError, RunRouting, RunningRun},
};

#[async_trait]
impl RunRouting for RedisRegistry {
    /// To the lock holder if it is the user's run; an orphan is ended on the spot.
    async fn route_abort(&self, session_id: &str, user_id: &str) -> Result<bool, RegistryError> {
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

    /// `cg:perm:{R}` → session → the owner, if the run is the user's and still waits for R.
    async fn route_permission(
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

    /// The user's index, each entry checked against its owner record.
    async fn running_runs(&self, user_id: &str) -> Result<Vec<RunningRun>, RegistryError> {
        let node = &self.node;
        let index = keys::user_runs(user_id);
        let members: Vec<String> = node
            .retrying("user_runs", node.retry_window(), || async {
                let mut conn = node.conn().await?;
                Ok(conn.smembers(&index).await?)
            })
            .await?;
        let entries: Vec<(String, (String, String))> =
            members.into_iter().filter_map(|m| parse_index_member(&m).map(|parsed| (m, parsed))).collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let commands: Vec<::redis::Cmd> = entries
            .iter()
            .flat_map(|(_, (session_id, _))| {
                [::redis::Cmd::get(keys::owner(session_id)), ::redis::Cmd::get(keys::seq(session_id))]
            })
            .collect();
        let values: Vec<Option<String>> =
            node.retrying("running_owners", node.retry_window(), || node.query_each(&commands)).await?;
        let mut runs = Vec::new();
        let mut stale = Vec::new();
        for ((member, (session_id, run_id)), pair) in entries.into_iter().zip(values.chunks(2)) {
            let owner = pair.first().cloned().flatten().and_then(|j| OwnerRecord::parse(&j).ok());
            match owner {
                Some(owner) if owner.run_id == run_id && owner.user_id == user_id => {
                    let last_seq = pair.get(1).cloned().flatten().and_then(|s| s.parse().ok()).unwrap_or(0);
                    runs.push(RunningRun {
                        session_id,
                        provider: owner.provider,
                        run_id,
                        started_at: owner.started_at,
                        last_seq,
                        node_id: owner.node_id,
                        user_id: owner.user_id,
                    });
                }
                // The run is over (its owner record is gone or belongs to a later run).
                _ => stale.push(member),
            }
        }
        if !stale.is_empty() {
            let mut conn = node.conn().await?;
            let _: () = conn.srem(&index, stale).await.map_err(Failure::from)?;
        }
        runs.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        Ok(runs)
    }
}
