//! `/ws`: the upgrade (token, Origin) and the socket task.
//!
//! Each socket is one task around its byte-bounded [`Outbox`]: it reads frames and
//! carries out their verbs one at a time; meanwhile it drains the outbox (which
//! subscribed sessions' publishers and the user's notices fill directly) into the
//! socket, pings every interval and closes with the reason the outbox carries (4008
//! slow consumer, 4401 token expired, 1012 draining, 1009 frame too large, 1008
//! frame flood, 1007 text not UTF-8, 1002 broken framing). The abuse limits
//! of the upgrade and of inbound frames are decided in [`crate::gateway::limits`].

use std::{
    collections::VecDeque,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
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
use futures_util::{SinkExt, StreamExt};
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
            // handshake's state) ends now.
            tokio::spawn(serve(socket, state, identity, origin_refused, hello, slot).instrument(span));
            std::future::ready(())
        })
}

async fn serve(
    mut socket: WebSocket,
    state: AppState,
    identity: Identity,
    origin_refused: bool,
    hello: bool,
    slot: SocketSlot,
) {
    let _slot = slot;
    let _open = state.gateway.track_socket();
    if origin_refused {
        let _ = Box::pin(socket.send(close_message(CloseReason::Policy))).await;
        return;
    }
    metrics::gauge!("chatgate_connections").increment(1.0);
    let gateway = state.gateway.clone();
    let ping_interval = state.settings.ping_interval;
    let outbox = Arc::new(Outbox::new(state.settings.send_queue_bytes));
    let conn = Arc::new(Connection::new(identity.user_id.clone(), outbox.clone(), hello));
    if hello {
        outbox.push(connected(&gateway.settings.node_id));
    }
    // Boxed, like the verbs below: an idle socket's task keeps the state of its largest
    // await for its whole life, so rare large futures live on the heap only while they run.
    let _notices = match Box::pin(gateway.registry.listen_user(&identity.user_id, outbox.clone())).await {
        Ok(listener) => Some(listener),
        Err(e) => {
            tracing::warn!(error = %e, "user notices unavailable for this socket");
            None
        }
    };
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    let mut missed_pongs = 0u32;
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
    // The verb being carried out: frames are not read meanwhile (verbs run in order), but the
    // socket is still written.
    let mut verb: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = None;
    // Frames popped from the outbox (allocated on use: most sockets are idle most of the time).
    let mut batch: Vec<Frame> = Vec::new();
    let mut out = Outgoing::default();
    let mut peer_closed = false;
    loop {
        let reading = verb.is_none();
        tokio::select! {
            io = std::future::poll_fn(|cx| poll_socket(&mut socket, &mut out, reading, cx)) => match io {
                SocketEvent::Written(Ok(())) if out.closing => break,
                SocketEvent::Written(Ok(())) => {}
                SocketEvent::Written(Err(_)) => break,
                SocketEvent::Read(Some(Ok(Message::Pong(_)))) => missed_pongs = 0,
                SocketEvent::Read(Some(Ok(Message::Close(_))) | None) => {
                    peer_closed = true;
                    break;
                }
                // Text, binary and ping frames count against the frame rate.
                SocketEvent::Read(Some(Ok(message))) => match frame_limiter.check(Instant::now()) {
                    FrameVerdict::Accept => match message {
                        Message::Text(text) => {
                            metrics::counter!("chatgate_frames_received_total").increment(1);
                            let (gateway, conn) = (&gateway, &conn);
                            verb = Some(Box::pin(async move { gateway.dispatch(conn, text.as_str()).await }));
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
                SocketEvent::Read(Some(Err(e))) => {
                    peer_closed = true;
                    outbox.close(read_error_close(e));
                    break;
                }
            },
            () = async { if let Some(verb) = verb.as_mut() { verb.await } }, if !reading => verb = None,
            popped = outbox.pop(&mut batch, WRITE_BATCH), if !out.busy() => out.popped(popped, &mut batch),
            _ = ping.tick() => {
                // A peer that stops reading stalls the write; after two ping intervals it is
                // dead, like one that misses two pongs.
                if out.stalled_for(ping_interval * MAX_MISSED_PONGS) {
                    tracing::info!("peer stopped reading; dropping the socket");
                    break;
                }
                if missed_pongs >= MAX_MISSED_PONGS {
                    tracing::info!("peer missed two pongs; dropping the socket");
                    break;
                }
                missed_pongs += 1;
                out.push(Message::Ping(Default::default()));
            }
            // Like the frames, these wait for the verb being carried out.
            _ = &mut expiry, if reading => {
                outbox.close(CloseReason::TokenExpired);
                break;
            }
            _ = gateway.sockets_closing.cancelled(), if reading => {
                outbox.close(CloseReason::Draining);
                break;
            }
        }
    }
    if let Some(verb) = verb.take() {
        verb.await;
    }
    conn.shutdown();
    outbox.close(CloseReason::Normal);
    Box::pin(close(&mut socket, &outbox, out, peer_closed, ping_interval * MAX_MISSED_PONGS)).await;
    metrics::gauge!("chatgate_connections").decrement(1.0);
}

/// The socket's end: what is being written, the rest of the outbox and the close frame (with
/// the reason the outbox carries) are written, as long as the peer reads (`write_limit`, the
/// stall rule), while what it still sends is read and dropped, so that a peer blocked in a send
/// gets to read our close. Then its Close is awaited ([`CLOSE_LINGER`]), so the connection ends
/// with FIN rather than a reset that would discard our close on the peer's side.
async fn close(
    socket: &mut WebSocket,
    outbox: &Outbox,
    mut out: Outgoing,
    mut peer_closed: bool,
    write_limit: Duration,
) {
    let mut batch = Vec::new();
    let written = tokio::time::timeout(write_limit, async {
        loop {
            if !out.busy() {
                if out.closing {
                    return true;
                }
                // Closed: the outbox answers at once.
                out.popped(outbox.pop(&mut batch, WRITE_BATCH).await, &mut batch);
                continue;
            }
            match std::future::poll_fn(|cx| poll_socket(socket, &mut out, !peer_closed, cx)).await {
                SocketEvent::Written(Ok(())) => {}
                SocketEvent::Written(Err(_)) => return false,
                SocketEvent::Read(Some(Ok(Message::Close(_))) | Some(Err(_)) | None) => peer_closed = true,
                SocketEvent::Read(Some(Ok(_))) => {}
            }
        }
    })
    .await;
    if written == Ok(true) && !peer_closed {
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(Ok(message)) = socket.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    // Flushes the reply to a peer's Close (tungstenite queues it) when nothing else did.
    let _ = tokio::time::timeout(CLOSE_LINGER, socket.close()).await;
}

/// What the socket did: a frame read (or its end), or the frames queued for it written.
enum SocketEvent {
    Read(Option<Result<Message, axum::Error>>),
    Written(Result<(), axum::Error>),
}

/// Drives both directions of the one socket: writes what [`Outgoing`] holds, and reads a frame
/// when `read` (not while a verb is being carried out).
fn poll_socket(socket: &mut WebSocket, out: &mut Outgoing, read: bool, cx: &mut Context<'_>) -> Poll<SocketEvent> {
    if out.busy()
        && let Poll::Ready(written) = out.poll_write(socket, cx)
    {
        return Poll::Ready(SocketEvent::Written(written));
    }
    if read && let Poll::Ready(frame) = socket.poll_next_unpin(cx) {
        return Poll::Ready(SocketEvent::Read(frame));
    }
    Poll::Pending
}

/// The messages on their way into the socket: fed one by one, then flushed.
#[derive(Default)]
struct Outgoing {
    queue: VecDeque<Message>,
    flushing: bool,
    /// Since when it has been writing (for the stall check).
    since: Option<Instant>,
    /// The close frame is queued: the socket ends once it is written.
    closing: bool,
}

impl Outgoing {
    fn busy(&self) -> bool {
        !self.queue.is_empty() || self.flushing
    }

    fn push(&mut self, message: Message) {
        if self.closing {
            return;
        }
        if !self.busy() {
            self.since = Some(Instant::now());
        }
        self.queue.push_back(message);
    }

    /// Queues what the outbox answered: a batch (letting go of its buffer) or its close.
    fn popped(&mut self, popped: Result<(), CloseReason>, batch: &mut Vec<Frame>) {
        match popped {
            Ok(()) => {
                for frame in std::mem::take(batch) {
                    self.push(Message::Text(frame));
                }
            }
            Err(reason) => self.close(reason),
        }
    }

    fn close(&mut self, reason: CloseReason) {
        if reason != CloseReason::Normal {
            tracing::info!(code = reason.code(), reason = reason.text(), "closing socket");
        }
        self.push(close_message(reason));
        self.closing = true;
    }

    fn stalled_for(&self, limit: Duration) -> bool {
        self.since.is_some_and(|since| since.elapsed() >= limit)
    }

    fn poll_write(&mut self, socket: &mut WebSocket, cx: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        while !self.queue.is_empty() {
            ready!(socket.poll_ready_unpin(cx))?;
            if let Some(message) = self.queue.pop_front() {
                socket.start_send_unpin(message)?;
                self.flushing = true;
            }
        }
        if self.flushing {
            ready!(socket.poll_flush_unpin(cx))?;
            self.flushing = false;
        }
        self.since = None;
        // Let go of the queue's buffer: an idle socket holds none.
        self.queue = VecDeque::new();
        Poll::Ready(Ok(()))
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
