//! Per-user notices: frames (`session_upserted`) for every socket of one user,
//! on every node.
//!
//! A socket listens with a [`NoticeSink`] (its outbox). Each node keeps its
//! listening sockets by user in [`Listeners`], and whoever brings a notice to
//! the node (the memory registry's `notify_user`, the Redis pub/sub
//! dispatcher) hands it to them in its own call: no channel, buffer or task
//! per user. A sink with no room skips the notice; it is advisory (a client
//! reloads the session list on reconnect).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
};

use async_trait::async_trait;

use super::RegistryError;
use crate::{protocol::Frame, sync::lock_unpoisoned};

/// Fan-out of per-user notices across nodes (docs/cluster.md §The seam).
#[async_trait]
pub trait UserNotices: Send + Sync + 'static {
    /// Sends a per-user notice (`session_upserted`) to that user's sockets on every node.
    async fn notify_user(&self, user_id: &str, frame: Frame) -> Result<(), RegistryError>;

    /// Delivers the user's notices to `sink` until the listener drops.
    async fn listen_user(&self, user_id: &str, sink: Arc<dyn NoticeSink>) -> Result<NoticeListener, RegistryError>;
}

/// Where a user's notices go (a socket's outbox, for the gateway).
pub trait NoticeSink: Send + Sync + 'static {
    /// Queues a notice, or skips it when there is no room.
    fn notice(&self, frame: &Frame);
}

/// One node's listening sockets, by user.
#[derive(Default)]
pub struct Listeners {
    users: Mutex<HashMap<Box<str>, User>>,
}

/// A user with listening sockets on this node.
struct User {
    sinks: Vec<Arc<dyn NoticeSink>>,
    /// What the backend holds for the user beside its sinks (Redis: the hub's
    /// holds on the user's channel), let go of by [`Listeners::take_idle`].
    holds: usize,
}

impl Listeners {
    /// Starts delivering `user_id`'s notices to `sink`.
    pub fn add(self: &Arc<Self>, user_id: &str, sink: Arc<dyn NoticeSink>) -> NoticeListener {
        let mut users = lock_unpoisoned(&self.users);
        let user = users.entry(user_id.into()).or_insert_with(|| User { sinks: Vec::new(), holds: 0 });
        // One at a time: most users have one or two sockets on a node.
        user.sinks.reserve_exact(1);
        user.sinks.push(sink.clone());
        NoticeListener { listeners: Arc::downgrade(self), user_id: user_id.into(), sink }
    }

    /// Counts one backend hold for a user with listeners; false (nothing
    /// counted) when the user has none, and the caller lets go of it.
    pub fn hold(&self, user_id: &str) -> bool {
        lock_unpoisoned(&self.users).get_mut(user_id).map(|user| user.holds += 1).is_some()
    }

    /// Hands a notice to every listening socket of the user on this node.
    pub fn send(&self, user_id: &str, frame: &Frame) {
        if let Some(user) = lock_unpoisoned(&self.users).get(user_id) {
            for sink in &user.sinks {
                sink.notice(frame);
            }
        }
    }

    /// Forgets users nobody listens to any more that the backend still holds
    /// something for; returns them with their holds, to let go of.
    pub fn take_idle(&self) -> Vec<(Box<str>, usize)> {
        let mut users = lock_unpoisoned(&self.users);
        let idle: Vec<Box<str>> = users.iter().filter(|(_, u)| u.sinks.is_empty()).map(|(id, _)| id.clone()).collect();
        idle.into_iter().filter_map(|id| users.remove(&id).map(|user| (id, user.holds))).collect()
    }

    /// Users with listening sockets or holds on this node.
    pub fn users(&self) -> usize {
        lock_unpoisoned(&self.users).len()
    }

    fn remove(&self, user_id: &str, sink: &Arc<dyn NoticeSink>) {
        let mut users = lock_unpoisoned(&self.users);
        let Some(user) = users.get_mut(user_id) else { return };
        // The same sink by address (a vtable pointer may differ between codegen units).
        if let Some(at) = user.sinks.iter().position(|s| std::ptr::addr_eq(Arc::as_ptr(s), Arc::as_ptr(sink))) {
            user.sinks.swap_remove(at);
        }
        if user.sinks.is_empty() && user.holds == 0 {
            users.remove(user_id);
        }
    }
}

/// A socket's hold on its user's notices: delivery stops when it drops.
pub struct NoticeListener {
    listeners: Weak<Listeners>,
    user_id: Box<str>,
    sink: Arc<dyn NoticeSink>,
}

impl Drop for NoticeListener {
    fn drop(&mut self) {
        if let Some(listeners) = self.listeners.upgrade() {
            listeners.remove(&self.user_id, &self.sink);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Frame>>);

    impl NoticeSink for Collect {
        fn notice(&self, frame: &Frame) {
            lock_unpoisoned(&self.0).push(frame.clone());
        }
    }

    #[test]
    fn a_notice_reaches_the_users_listeners_until_they_drop() {
        let listeners = Arc::new(Listeners::default());
        let (one, two, other) =
            (Arc::new(Collect::default()), Arc::new(Collect::default()), Arc::new(Collect::default()));
        let first = listeners.add("u", one.clone());
        let second = listeners.add("u", two.clone());
        let _third = listeners.add("v", other.clone());
        listeners.send("u", &Frame::from("a"));
        drop(first);
        listeners.send("u", &Frame::from("b"));
        assert_eq!(*lock_unpoisoned(&one.0), vec![Frame::from("a")]);
        assert_eq!(*lock_unpoisoned(&two.0), vec![Frame::from("a"), Frame::from("b")]);
        assert!(lock_unpoisoned(&other.0).is_empty());
        // The last listener without holds takes the user with it; one with holds waits for take_idle.
        drop(second);
        assert_eq!(listeners.users(), 1);
        let held = listeners.add("w", one.clone());
        assert!(listeners.hold("w") && !listeners.hold("nobody"));
        drop(held);
        assert_eq!(listeners.take_idle(), vec![(Box::from("w"), 1)]);
        assert_eq!(listeners.users(), 1);
    }
}
