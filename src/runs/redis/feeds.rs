//! [`SessionFeeds`] over Redis, the readers' side: snapshots, subscriptions
//! (hold the channel, then one atomic read, then the live feed), range reads
//! of the replay stream (also the feeds' gap repair, [`RangeSource`] for the
//! node), and settling after Redis lost its data ([`super::recovery`]).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use serde_json::Value as Json;

use super::{
    RedisRegistry,
    codec::{self, OwnerRecord},
    connection::Lane,
    keys,
    live::{SeenRun, attach_feed},
    node::{Failure, MAX_SCRIPT_SEQ, RedisNode, millis},
    recovery::recently_active,
    scripts::ReadReply,
};
use crate::{
    runs::{Event, LiveFeed, RegistryError, ReplayRange, SessionFeeds, Snapshot, Subscription, feed::RangeSource},
    sync::lock_unpoisoned,
};

#[async_trait]
impl SessionFeeds for RedisRegistry {
    /// One `lua/read.lua` call, without replay.
    async fn snapshot(&self, session_id: &str) -> Result<Snapshot, RegistryError> {
        Ok(self.read_session(session_id, None).await?.snapshot())
    }

    /// Hold the channel, attach a receiver, then read once (docs/cluster.md §Subscribing, steps 1–3).
    async fn subscribe(&self, session_id: &str, after_seq: u64) -> Result<Subscription, RegistryError> {
        let node = &self.node;
        // 1. The node's subscription is confirmed, and this feed's receiver exists,
        //    before anything is read: every later event arrives live.
        node.hub.acquire(&keys::live_channel(session_id)).await?;
        let (channel, rx, guard) = attach_feed(node, session_id);
        // 2. One atomic read: owner record, seq top, the current run after the cursor.
        let mut read = self.read_session(session_id, Some(after_seq)).await?;
        let replay = std::mem::take(&mut read.replay);
        let (replay_truncated, replay) = match &read.owner {
            Some(owner) => {
                let from = after_seq.max(owner.first_seq.saturating_sub(1));
                (!codec::is_contiguous(&replay, from, read.top), replay)
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
                session.run = read.owner.as_ref().map(|o| SeenRun::new(o.run_id.clone(), o.provider.clone()));
            }
        }
        let source: Arc<dyn RangeSource> = node.clone();
        let live = LiveFeed::new(session_id.to_string(), &channel, rx, read.top, source, Some(Box::new(guard)));
        Ok(Subscription { snapshot: read.snapshot(), replay_truncated, replay, live })
    }

    /// The stream's entries, through the node's [`RangeSource`] (below), which feeds fill gaps from.
    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError> {
        self.node.read_range(session_id, after_seq, up_to).await
    }

    /// How long a reader should wait before trusting what Redis says of the
    /// session (zero: now): `lua/settle.lua`, see [`super::recovery`].
    async fn settle(&self, session_id: &str, seq_floor: u64, last_active_ms: i64) -> Result<Duration, RegistryError> {
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

#[async_trait]
impl RangeSource for RedisNode {
    async fn read_range(&self, session_id: &str, after_seq: u64, up_to: u64) -> Result<ReplayRange, RegistryError> {
        if after_seq >= MAX_SCRIPT_SEQ || up_to <= after_seq {
            return Ok(ReplayRange { events: Vec::new(), complete: true });
        }
        let (top, events) = self.read_events(session_id, after_seq, up_to).await?;
        let complete = codec::is_contiguous(&events, after_seq, up_to.min(top));
        Ok(ReplayRange { events, complete })
    }
}

impl RedisRegistry {
    /// One consistent read of the session; with `after = Some(L)` the current run's events after L.
    async fn read_session(&self, session_id: &str, after: Option<u64>) -> Result<SessionRead, RegistryError> {
        let node = &self.node;
        let inv = node.scripts.read(session_id, after.map(|a| a.min(MAX_SCRIPT_SEQ - 1)));
        let _permit = node.read_permit().await;
        let reply: ReadReply = node.retrying("read", node.retry_window(), || node.invoke_on(Lane::Read, &inv)).await?;
        let ReadReply { owner_json, top, mut replay, pending, deferred_from } = reply;
        if let Some(from) = deferred_from {
            // A long replay: the same entries, now, without Lua (see `lua/read.lua`). A gap that
            // a trim made since is told as any other (the replay is checked against `top`).
            replay = node.read_stream(session_id, from, top).await?;
        }
        let pending = pending
            .iter()
            .map(|json| serde_json::from_str(json).unwrap_or_else(|_| Json::String(json.clone())))
            .collect();
        let owner =
            if owner_json.is_empty() { None } else { Some(OwnerRecord::parse(&owner_json).map_err(Failure::from)?) };
        Ok(SessionRead { owner, top, replay, pending })
    }
}

struct SessionRead {
    owner: Option<OwnerRecord>,
    top: u64,
    replay: Vec<Event>,
    pending: Vec<Json>,
}

impl SessionRead {
    fn snapshot(&self) -> Snapshot {
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
