//! The readers' side: snapshots, subscriptions (hold the channel, then one
//! atomic read, then the live feed), running runs.

use std::sync::Arc;

use ::redis::AsyncCommands;
use serde_json::Value as Json;

use super::{
    RedisRegistry,
    codec::{self, OwnerRecord},
    keys,
    live::{SeenRun, attach_feed},
    node::{Failure, Lane, MAX_SCRIPT_SEQ, parse_index_member},
    scripts::ReadReply,
};
use crate::runs::{Event, LiveFeed, RegistryError, RunningRun, Snapshot, Subscription, feed::RangeSource};
use crate::sync::lock_unpoisoned;

impl RedisRegistry {
    /// One consistent read of the session; with `after = Some(L)` the current run's events after L.
    pub(super) async fn read_session(
        &self,
        session_id: &str,
        after: Option<u64>,
    ) -> Result<SessionRead, RegistryError> {
        let node = &self.node;
        let inv = node.scripts.read(session_id, after.map(|a| a.min(MAX_SCRIPT_SEQ - 1)));
        let reply: ReadReply = node.retrying("read", node.retry_window(), || node.invoke_on(Lane::Read, &inv)).await?;
        let ReadReply { owner_json, top, replay, pending } = reply;
        let pending = pending
            .iter()
            .map(|json| serde_json::from_str(json).unwrap_or_else(|_| Json::String(json.clone())))
            .collect();
        let owner =
            if owner_json.is_empty() { None } else { Some(OwnerRecord::parse(&owner_json).map_err(Failure::from)?) };
        Ok(SessionRead { owner, top, replay, pending })
    }

    /// `subscribe`: hold the channel, attach a receiver, then read once (docs/cluster.md §Subscribing, steps 1–3).
    pub(super) async fn open_subscription(
        &self,
        session_id: &str,
        after_seq: u64,
    ) -> Result<Subscription, RegistryError> {
        let node = &self.node;
        // 1. The node's subscription is confirmed, and this feed's receiver exists,
        //    before anything is read: every later event arrives live.
        node.hub.acquire(&keys::live_channel(session_id)).await?;
        let (rx, guard) = attach_feed(node, session_id);
        // 2. One atomic read: owner record, seq top, the current run after the cursor.
        let read = self.read_session(session_id, Some(after_seq)).await?;
        let (replay_truncated, replay) = match &read.owner {
            Some(owner) => {
                let from = after_seq.max(owner.first_seq.saturating_sub(1));
                (!codec::is_contiguous(&read.replay, from, read.top), read.replay.clone())
            }
            None => (false, Vec::new()),
        };
        {
            let mut sessions = lock_unpoisoned(&node.sessions);
            // Raised only for a lone feed: other feeds may still wait for older events.
            if let Some(session) = sessions.get_mut(session_id)
                && session.feeds == 1
                && session.last_dispatched <= read.top
            {
                session.last_dispatched = read.top;
                session.run =
                    read.owner.as_ref().map(|o| SeenRun { run_id: o.run_id.clone(), provider: o.provider.clone() });
            }
        }
        let source: Arc<dyn RangeSource> = node.clone();
        let live = LiveFeed::new(session_id.to_string(), rx, read.top, source, Some(Box::new(guard)));
        Ok(Subscription { snapshot: read.snapshot(), replay_truncated, replay, live })
    }

    /// `running_runs`: the user's index, each entry checked against its owner record.
    pub(super) async fn runs_of_user(&self, user_id: &str) -> Result<Vec<RunningRun>, RegistryError> {
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
        let mut pipe = ::redis::pipe();
        for (_, (session_id, _)) in &entries {
            pipe.get(keys::owner(session_id)).get(keys::seq(session_id));
        }
        let values: Vec<Option<String>> = node
            .retrying("running_owners", node.retry_window(), || async {
                let mut conn = node.conn().await?;
                Ok(pipe.query_async(&mut conn).await?)
            })
            .await?;
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

pub(super) struct SessionRead {
    owner: Option<OwnerRecord>,
    top: u64,
    replay: Vec<Event>,
    pending: Vec<Json>,
}

impl SessionRead {
    pub(super) fn snapshot(&self) -> Snapshot {
        match &self.owner {
            Some(owner) => Snapshot {
                is_processing: true,
                run_id: Some(owner.run_id.clone()),
                owner_node: Some(owner.node_id.clone()),
                last_seq: self.top,
                pending_permissions: self.pending.clone(),
            },
            None => Snapshot { last_seq: self.top, ..Snapshot::default() },
        }
    }
}
