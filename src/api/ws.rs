//! `/ws`: the upgrade (token, Origin) and the socket task.
//!
//! Each socket is two halves joined by its byte-bounded [`Outbox`]: this task
//! reads frames and dispatches verbs; a writer task drains the outbox (which
//! subscribed sessions' publishers fill directly), relays the user's notices,
//! pings every interval and closes with the reason the outbox carries (4008 slow
//! consumer, 4401 token expired, 1012 draining, 1009 frame too large, 1008
//! frame flood, 1007 text not UTF-8, 1002 broken framing). The abuse limits
//! of the upgrade and of inbound frames are decided in [`crate::gateway::limits`].

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{
        ConnectInfo, FromRequestParts, State,
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{StatusCode, request::Parts},
    response::{IntoResponse, Response},
};
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    ApiError, AppState,
    admission::{FrameLimiter, FrameVerdict, SocketSlot, too_many_requests},
    auth::request_token,
};
use crate::{
    auth::Identity,
    gateway::{CloseReason, Connection, Outbox},
    protocol::{ErrorCode, Frame, connected, protocol_error},
};

/// Frames the writer sends per flush, at most.
const WRITE_BATCH: usize = 64;
/// Pings without a pong after which the socket is dropped.
const MAX_MISSED_PONGS: u32 = 2;
/// Socket read buffer, allocated up front and the most read per `read` call:
/// small, since idle sockets are the common case and inbound frames are short
/// (it grows for a larger frame).
const READ_BUFFER: usize = 256;
const WRITE_BUFFER: usize = 16 * 1024;
/// How long a closing socket waits for the peer's Close.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// `GET /ws`: 429 over the client address's connection rate, 401 without a
/// valid token, 503 while draining, 429 when the user has all their sockets
/// open, else upgrade.
pub async fn upgrade(State(state): State<AppState>, parts: Parts) -> Response {
    let mut parts = parts;
    let limits = &state.connection_limits;
    if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
        let client = limits.client_ip(peer.ip(), &parts.headers);
        if !limits.admit_connection(client) {
            tracing::debug!(%client, "connection rate exceeded");
            let rate = limits.settings().conn_rate_per_ip;
            return too_many_requests(format!("Too many new connections from {client}: at most {rate} per second."), 1);
        }
    }
    let identity = match request_token(&parts).map(|t| state.auth.verify(&t)) {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => return ApiError::unauthorized(format!("Access denied. {e}.")).into_response(),
        None => return ApiError::unauthorized("Access denied. No token provided.").into_response(),
    };
    if state.gateway.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "node draining").into_response();
    }
    // Held by the socket task; released when it ends, or here if the upgrade fails.
    let Some(slot) = limits.acquire_socket(&identity.user_id) else {
        let max = limits.settings().max_sockets_per_user;
        return too_many_requests(format!("Too many open sockets: at most {max} per user on this node."), 5);
    };
    let origin_refused = match (&state.settings.allowed_origins, parts.headers.get(axum::http::header::ORIGIN)) {
        (Some(allowed), Some(origin)) => {
            let origin = origin.to_str().unwrap_or("");
            !allowed.iter().any(|a| a == origin || a == "*")
        }
        _ => false,
    };
    let upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection> =
        WebSocketUpgrade::from_request_parts(&mut parts, &state).await;
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let hello = wants_hello(parts.uri.query());
    let max = state.settings.max_frame_bytes;
    let span = tracing::info_span!("socket", user_id = %identity.user_id);
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            // The socket task is spawned here, so that the upgrade's own task (which holds the
            // handshake's state) ends now; and the socket is split here, not in `serve`: a task
            // keeps its arguments for its whole life.
            let (sink, stream) = socket.split();
            tokio::spawn(serve(sink, stream, state, identity, origin_refused, hello, slot).instrument(span));
            std::future::ready(())
        })
}

async fn serve(
    mut sink: SplitSink<WebSocket, Message>,
    mut stream: SplitStream<WebSocket>,
    state: AppState,
    identity: Identity,
    origin_refused: bool,
    hello: bool,
    slot: SocketSlot,
) {
    let _slot = slot;
    let _open = state.gateway.track_socket();
    if origin_refused {
        let _ = Box::pin(sink.send(close_message(CloseReason::Policy))).await;
        return;
    }
    metrics::gauge!("chatgate_connections").increment(1.0);
    let gateway = state.gateway.clone();
    let outbox = Arc::new(Outbox::new(state.settings.send_queue_bytes));
    let conn = Arc::new(Connection::new(identity.user_id.clone(), outbox.clone(), hello));
    if hello {
        outbox.push(connected(&gateway.settings.node_id));
    }
    // Boxed, like `dispatch` below: an idle socket's task keeps the state of its
    // largest await for its whole life, so rare large futures live on the heap only
    // while they run.
    let notices = match Box::pin(gateway.registry.user_notices(&identity.user_id)).await {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::warn!(error = %e, "user notices unavailable for this socket");
            None
        }
    };
    let missed_pongs = Arc::new(AtomicU32::new(0));
    let writer_done = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        sink,
        outbox.clone(),
        notices,
        missed_pongs.clone(),
        state.settings.ping_interval,
        writer_done.clone(),
    ));
    let expiry = tokio::time::sleep(identity.remaining());
    tokio::pin!(expiry);
    let limits = &gateway.settings.limits;
    let mut frame_limiter = FrameLimiter::new(limits.frame_rate, limits.frame_burst);
    let frames_dropped = || {
        format!(
            "Too many frames: at most {} per second (bursts of {}); frames were dropped.",
            limits.frame_rate, limits.frame_burst
        )
    };
    loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(Message::Pong(_))) => missed_pongs.store(0, Ordering::Relaxed),
                Some(Ok(Message::Close(_))) | None => break,
                // Text, binary and ping frames count against the frame rate.
                Some(Ok(message)) => match frame_limiter.check(Instant::now()) {
                    FrameVerdict::Accept => match message {
                        Message::Text(text) => {
                            metrics::counter!("chatgate_frames_received_total").increment(1);
                            Box::pin(gateway.dispatch(&conn, text.as_str())).await;
                        }
                        Message::Binary(_) => {
                            conn.send(protocol_error(ErrorCode::InvalidPayload, "Binary frames are not supported; send JSON text.", None));
                        }
                        _ => {}
                    },
                    FrameVerdict::Drop { notify: true } => {
                        metrics::counter!("chatgate_protocol_errors_total", "code" => ErrorCode::RateLimited.as_str()).increment(1);
                        conn.send(protocol_error(ErrorCode::RateLimited, &frames_dropped(), None));
                    }
                    FrameVerdict::Drop { notify: false } => {}
                    FrameVerdict::Close => {
                        tracing::info!("inbound frame flood; closing the socket");
                        outbox.close(CloseReason::Flood);
                        break;
                    }
                },
                Some(Err(e)) => {
                    outbox.close(read_error_close(e));
                    break;
                }
            },
            _ = &mut expiry => {
                outbox.close(CloseReason::TokenExpired);
                break;
            }
            _ = gateway.sockets_closing.cancelled() => {
                outbox.close(CloseReason::Draining);
                break;
            }
            _ = writer_done.cancelled() => break,
        }
    }
    conn.shutdown();
    outbox.close(CloseReason::Normal);
    Box::pin(close_handshake(stream, writer)).await;
    metrics::gauge!("chatgate_connections").decrement(1.0);
}

/// Reads (and drops) what the peer still sends until its Close, so the
/// connection ends with FIN rather than a reset that would discard our close
/// frame on the peer's side; then waits for the writer.
async fn close_handshake(mut stream: SplitStream<WebSocket>, writer: tokio::task::JoinHandle<()>) {
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
    if tokio::time::timeout(CLOSE_LINGER, writer).await.is_err() {
        tracing::debug!("socket writer did not finish in time");
    }
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    outbox: Arc<Outbox>,
    mut notices: Option<broadcast::Receiver<Frame>>,
    missed_pongs: Arc<AtomicU32>,
    ping_interval: Duration,
    done: CancellationToken,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    // Allocated on first use: most sockets are idle most of the time.
    let mut batch: Vec<Frame> = Vec::new();
    loop {
        tokio::select! {
            popped = outbox.pop(&mut batch, WRITE_BATCH) => match popped {
                Ok(()) => {
                    // A peer that stops reading stalls the write; after two ping
                    // intervals it is dead, like one that misses two pongs.
                    // Boxed, timer included: an idle socket's writer holds no write state.
                    let write = async {
                        for frame in batch.drain(..) {
                            sink.feed(Message::Text(frame)).await?;
                        }
                        sink.flush().await
                    };
                    match Box::pin(tokio::time::timeout(ping_interval * MAX_MISSED_PONGS, write)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break,
                        Err(_) => {
                            tracing::info!("peer stopped reading; dropping the socket");
                            batch.clear();
                            break;
                        }
                    }
                }
                Err(reason) => {
                    if reason != CloseReason::Normal {
                        tracing::info!(code = reason.code(), reason = reason.text(), "closing socket");
                    }
                    let _ = Box::pin(sink.send(close_message(reason))).await;
                    break;
                }
            },
            notice = next_notice(&mut notices) => match notice {
                Ok(frame) => {
                    outbox.push(frame);
                }
                // A lagging socket skips notices rather than holding memory for them.
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => notices = None,
            },
            _ = ping.tick() => {
                if missed_pongs.fetch_add(1, Ordering::Relaxed) >= MAX_MISSED_PONGS {
                    tracing::info!("peer missed two pongs; dropping the socket");
                    break;
                }
                if Box::pin(sink.send(Message::Ping(Default::default()))).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = Box::pin(sink.close()).await;
    outbox.close(CloseReason::Normal);
    done.cancel();
}

/// The user's next notice; pending forever without a notice channel.
async fn next_notice(notices: &mut Option<broadcast::Receiver<Frame>>) -> Result<Frame, RecvError> {
    match notices {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `hello=1` (or `true`) in the query: the client opts into chatgate's
/// additions, the `connected` frame first (docs/protocol.md §Compatibility rules).
fn wants_hello(query: Option<&str>) -> bool {
    query.unwrap_or("").split('&').any(|pair| matches!(pair, "hello=1" | "hello=true" | "hello"))
}

fn close_message(reason: CloseReason) -> Message {
    Message::Close(Some(CloseFrame { code: reason.code(), reason: reason.text().into() }))
}

/// The close a failed read earns: the peer's fault gets its RFC 6455 code; a
/// connection that simply went away (a killed tab, a dropped network: the TCP
/// stream ended or was reset without a close frame) is a plain disconnect,
/// logged with its cause, and gets a normal close (which it may never see).
fn read_error_close(error: axum::Error) -> CloseReason {
    use tungstenite::error::ProtocolError;
    let error = error.into_inner();
    let reason = match error.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => CloseReason::TooLarge,
        Some(tungstenite::Error::Utf8(_)) => CloseReason::InvalidUtf8,
        Some(tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => CloseReason::Normal,
        Some(tungstenite::Error::Protocol(_)) => CloseReason::ProtocolViolation,
        _ => CloseReason::Normal,
    };
    if reason == CloseReason::Normal {
        tracing::debug!(cause = %error, "client disconnected without a close frame");
    }
    reason
}
