//! chatgate: a horizontally scalable WebSocket gateway for AI coding-agent chat runs.
//!
//! # Layout
//!
//! - [`config`]: command line and environment (README §Configuration).
//! - [`protocol`]: the `/ws` wire format: inbound verbs, outbound frames, error codes.
//! - [`runs`]: the run registry (locks, seq, replay, fan-out), split by concern into
//!   small traits ([`runs::RunOwnership`], [`runs::SessionFeeds`], [`runs::RunRouting`],
//!   [`runs::UserNotices`], [`runs::SendLimiter`]) gathered by [`runs::RunRegistry`], with
//!   its in-process ([`runs::memory`]) and Redis ([`runs::redis`]) implementations, one
//!   file per concern in each.
//! - [`runtime`]: provider runtimes behind one trait; `script` is the built-in test runtime;
//!   [`runtime::sandbox`] contains their CLIs (clean environment, bounds, bubblewrap).
//! - [`store`]: sessions and durable history in SQL through sqlx (SQLite or PostgreSQL).
//! - [`gateway`]: the verbs (`chat.send`, `chat.abort`, `chat.subscribe`,
//!   `chat.permission-response`, `chat.unsubscribe`), the owner-side run driver and the
//!   abuse limits ([`gateway::limits`]), and the per-user workspaces and provider homes
//!   ([`gateway::workspaces`]).
//! - [`auth`]: HS256 JWTs.
//! - [`api`]: axum routes (REST, `/ws` socket task, health, metrics) and the HTTP/1.1
//!   accept loop ([`api::serve`]).
//! - [`node`]: wiring one gateway node together, serving and draining it.
//! - [`sync`]: the one poison-tolerant mutex lock every layer uses.
//! - `docs/architecture.md` walks one message through these layers, function by function.

pub mod api;
pub mod auth;
pub mod config;
pub mod gateway;
pub mod node;
pub mod protocol;
pub mod runs;
pub mod runtime;
pub mod store;
pub mod sync;
