//! A private `redis-server` (no persistence) on a port of its own, for tests and scenarios
//! that kill, restart or measure Redis without touching the shared one. Only the process
//! started here is ever signalled; it is killed when dropped.

use std::process::{Child, Command, Stdio};

use anyhow::Context;

use crate::{
    ports::free_port,
    redis_proc::{kill, server_args, wait_for_ping},
};

/// A `redis-server` owned by its creator.
pub struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// An empty server on a free port (see [`crate::ports`]).
    pub fn start() -> anyhow::Result<PrivateRedis> {
        PrivateRedis::start_on(free_port()?)
    }

    /// An empty server on `port`.
    pub fn start_on(port: u16) -> anyhow::Result<PrivateRedis> {
        let mut redis = PrivateRedis { port, child: None };
        redis.restart()?;
        Ok(redis)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's pid while it runs (for its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server if it runs and starts an empty one on the same port; returns once it
    /// answers `PING`.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let mut child = Command::new("redis-server")
            .args(server_args(self.port))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed?)")?;
        let ready = wait_for_ping(self.port, &mut child);
        self.child = Some(child);
        if ready.is_err() {
            self.kill();
        }
        ready
    }

    /// SIGKILL (whatever the server held is gone) and reap; a no-op when it is down.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            kill(child);
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
