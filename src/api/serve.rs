//! Serving the router over HTTP/1.1: the accept loop, one hyper connection
//! per socket (TCP_NODELAY, WebSocket upgrades, the peer address as
//! `ConnectInfo`), the `--handshake-timeout` against slowloris clients, and
//! the graceful stop used by the drain.
//!
//! hyper's `header_read_timeout` closes a connection whose request headers
//! have not all arrived within the timeout; it runs whenever hyper waits for a
//! request head, so an idle keep-alive connection is closed after the same
//! time; only a connection that timed out before its first request counts as
//! a refused handshake (`chatgate_limit_refusals_total{limit="handshake_timeout"}`).
//! An upgraded WebSocket is no longer read by hyper and is not affected.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::ConnectInfo,
    serve::{Listener, ListenerExt},
};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::gateway::limits::Limit;

/// Serves `router` on `listener` until `stop` is cancelled; then stops
/// accepting, lets open HTTP exchanges finish (idle keep-alive connections are
/// closed) and returns once every connection task has ended.
pub async fn serve(listener: TcpListener, router: Router, handshake_timeout: Duration, stop: CancellationToken) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(handshake_timeout);
    let connections = TaskTracker::new();
    // Frames are small and latency-bound: no Nagle delay on accepted sockets.
    let mut listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    loop {
        // `Listener::accept` retries by itself on per-connection errors and backs off on others.
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        // Whether this connection has had a request: a timeout after one is a
        // keep-alive connection idling out, not a slow handshake.
        let served = Arc::new(AtomicBool::new(false));
        let seen = served.clone();
        let service = router.clone().map_request(move |mut request: axum::http::Request<Incoming>| {
            seen.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            request
        });
        let connection = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service)).with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            tokio::pin!(connection);
            let outcome = tokio::select! {
                outcome = connection.as_mut() => outcome,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = outcome {
                if e.is_timeout() && served.load(Ordering::Relaxed) {
                    tracing::trace!(%peer, "idle keep-alive connection closed");
                } else if e.is_timeout() {
                    Limit::HandshakeTimeout.refused();
                    tracing::debug!(%peer, "request headers not received in time; connection closed");
                } else {
                    tracing::trace!(%peer, error = %e, "connection ended with an error");
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}
