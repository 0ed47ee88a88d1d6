//! A private `redis-server` (no persistence) on a port of its own, for tests and scenarios
//! that kill, restart or measure Redis without touching the shared one. Only the process
//! started here is ever signalled; it is killed when dropped.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::ports::free_port;

/// How long a fresh server has to answer `PING`.
const START_WAIT: Duration = Duration::from_secs(10);

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
        let port = self.port;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed?)")?;
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        while Instant::now() < deadline {
            if ping(port) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!("private redis-server on port {port} exited at start ({status})");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        bail!("private redis-server on port {port} did not answer PING within {START_WAIT:?}")
    }

    /// SIGKILL (whatever the server held is gone) and reap; a no-op when it is down.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a server on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.write_all(b"PING\r\n")?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply)?;
        Ok(&reply == b"+PONG\r\n")
    };
    attempt().unwrap_or(false)
}
