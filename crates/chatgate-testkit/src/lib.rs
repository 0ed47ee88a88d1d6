//! The test kit of chatgate's tests and of `chatgate-bench`: one way to start what a test or
//! a scenario runs against, so that no test file or bench module carries its own copy.
//!
//! - [`ports`]: free ports for listeners, below the kernel's ephemeral range;
//! - [`node`]: the real `chatgate` binary as a child process ([`node::NodeCommand`] builds it,
//!   [`node::NodeProcess`] signals, restarts and waits for it);
//! - [`redis`]: a private `redis-server` on its own port; [`redis_cluster`]: a private Redis
//!   Cluster (failover, restart, slot migration by hand); [`redis_sentinel`]: a primary, a
//!   replica and 3 sentinels; [`redis_tls`]: a TLS-only server with certificates made at
//!   test time (mutual TLS and an ACL user optional);
//! - [`postgres`]: a private PostgreSQL cluster (TLS-only optional, certificates made at test
//!   time), and the URL of the shared test database;
//! - [`balancer`]: nginx in front of N nodes (round robin, WebSocket upgrade);
//! - [`ws`]: a WebSocket client; [`token`]: tokens, valid and crafted;
//! - [`stack`]: N nodes behind nginx for as long as a command runs, with a control endpoint
//!   (the `chatgate-stack` binary, the browser suite's stack).
//!
//! Errors: starting and stopping things returns [`anyhow::Result`] (the bench propagates it,
//! tests `.expect()` it); the test client [`ws::Ws`] panics with a clear message instead,
//! since its callers are assertions.

pub mod balancer;
pub mod node;
pub mod ports;
pub mod postgres;
pub mod redis;
pub mod redis_cluster;
mod redis_proc;
pub mod redis_sentinel;
pub mod redis_tls;
pub mod stack;
pub mod token;
pub mod ws;
