//! A WebSocket client of the gateway on tokio-tungstenite: [`Ws`], the tests' client (it
//! panics with a clear message when a frame does not come), and the fallible socket
//! functions the bench drives its load with ([`open`], [`send`], [`recv`], [`recv_text`]).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, Utf8Bytes, client::IntoClientRequest},
};

/// A client WebSocket.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a test waits for one frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// `url` asking for chatgate's additions (`hello=1`: the `connected` frame first).
pub fn with_hello(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}hello=1")
}

/// Opens `ws://<addr>/ws?token=<token>&hello=1`, from `source` when given (to spread many
/// clients over 127.0.0.x), and reads the `connected` frame.
pub async fn open(addr: SocketAddr, token: &str, source: Option<IpAddr>) -> anyhow::Result<Socket> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{addr}/ws?token={token}&hello=1");
    let (mut ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await?;
    let hello = recv(&mut ws, Duration::from_secs(10)).await?;
    if hello["kind"] != "connected" {
        bail!("expected the connected frame, got {hello}");
    }
    Ok(ws)
}

/// The i-th client source address: 127.0.0.2 to 127.0.0.251, so that one source address
/// never runs out of ports.
pub fn source_address(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 2 + (i % 250) as u8])
}

/// Sends `value` as a text frame.
pub async fn send(ws: &mut Socket, value: Value) -> anyhow::Result<()> {
    ws.send(Message::Text(value.to_string().into())).await?;
    Ok(())
}

/// The next text frame (pings skipped).
pub async fn recv_text(ws: &mut Socket, wait: Duration) -> anyhow::Result<Utf8Bytes> {
    loop {
        let frame = tokio::time::timeout(wait, ws.next()).await.context("timed out waiting for a frame")?;
        match frame {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(Message::Close(frame))) => bail!("socket closed: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("socket ended"),
        }
    }
}

/// The next JSON frame (pings skipped).
pub async fn recv(ws: &mut Socket, wait: Duration) -> anyhow::Result<Value> {
    let text = recv_text(ws, wait).await?;
    Ok(serde_json::from_str(&text)?)
}

/// The tests' WebSocket client.
pub struct Ws {
    pub stream: Socket,
    /// The node serving this socket (from its `connected` frame).
    pub node_id: String,
}

impl Ws {
    /// Connects with `hello=1` and reads the `connected {nodeId}` frame that opts in to.
    pub async fn connect(url: &str) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(with_hello(url)).await.expect("websocket connects");
        let mut ws = Ws { stream, node_id: String::new() };
        let hello = ws.recv().await;
        assert_eq!(hello["kind"], "connected", "first frame: {hello}");
        ws.node_id = hello["nodeId"].as_str().unwrap_or_default().to_string();
        ws
    }

    /// Like [`Ws::connect`], over a TCP connection with a small fixed receive
    /// buffer (no autotuning): a client that stops reading then holds little in
    /// its kernel buffers, so the server sees it as slow within a few megabytes
    /// (loopback autotuning would otherwise absorb tens of them).
    pub async fn connect_small_receive_buffer(url: &str) -> Ws {
        let request = with_hello(url).into_client_request().expect("ws url");
        let authority = request.uri().authority().expect("host:port").as_str().to_string();
        let addr = tokio::net::lookup_host(&authority).await.unwrap().next().expect("an address");
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
        let socket = socket.unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let tcp = socket.connect(addr).await.expect("tcp connects");
        let (stream, _) =
            tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp)).await.expect("websocket connects");
        let mut ws = Ws { stream, node_id: String::new() };
        let hello = ws.recv().await;
        assert_eq!(hello["kind"], "connected", "first frame: {hello}");
        ws.node_id = hello["nodeId"].as_str().unwrap_or_default().to_string();
        ws
    }

    /// A socket as upstream's client opens it (no `hello=1`: no `connected` frame) and the
    /// `X-Chatgate-Node` header of its upgrade response.
    pub async fn connect_upstream(url: &str) -> (Ws, Option<String>) {
        let (stream, response) = tokio_tungstenite::connect_async(url).await.expect("websocket connects");
        let node = response.headers().get("x-chatgate-node").and_then(|v| v.to_str().ok()).map(str::to_string);
        (Ws { stream, node_id: String::new() }, node)
    }

    /// An upgrade (with `hello=1`) carrying extra headers; the `connected` frame is not read.
    pub async fn try_connect(url: &str, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
        let mut request = with_hello(url).into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                tungstenite::http::HeaderValue::from_str(value).unwrap(),
            );
        }
        let (stream, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Ws { stream, node_id: String::new() })
    }
    /// Waits for the socket to close; the close code (`None`: no close frame). Panics on timeout.
    pub async fn closed(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_recv(left).await {
                Some(Ok(_)) => continue,
                Some(Err(code)) => return code,
                None => panic!("socket still open after {wait:?}"),
            }
        }
    }

    /// The next frame that is not a `session_upserted` notice.
    pub async fn recv_reply(&mut self) -> Value {
        loop {
            let frame = self.recv().await;
            if frame["kind"] != "session_upserted" {
                return frame;
            }
        }
    }

    pub async fn send(&mut self, value: Value) {
        self.stream.send(Message::Text(value.to_string().into())).await.unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::Text(text.to_string().into())).await.unwrap();
    }

    /// The next JSON frame; panics on timeout or close.
    pub async fn recv(&mut self) -> Value {
        match self.try_recv(FRAME_TIMEOUT).await {
            Some(Ok(v)) => v,
            Some(Err(close)) => panic!("socket closed: {close:?}"),
            None => panic!("no frame within {FRAME_TIMEOUT:?}"),
        }
    }

    /// The next JSON frame, `Err(close code)` when the socket closes, `None` on timeout.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Result<Value, Option<u16>>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next()).await.ok()?;
            match next {
                Some(Ok(Message::Text(text))) => return Some(Ok(serde_json::from_str(&text).unwrap())),
                Some(Ok(Message::Close(frame))) => return Some(Err(frame.map(|f| u16::from(f.code)))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Some(Err(None)),
            }
        }
    }

    /// Frames until one matches `pred` (returned last).
    pub async fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut frames = Vec::new();
        loop {
            let frame = self.recv().await;
            let done = pred(&frame);
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    /// Frames of `session` until its `complete` (inclusive), other frames skipped.
    pub async fn run_events(&mut self, session: &str) -> Vec<Value> {
        let frames = self.recv_until(|v| v["kind"] == "complete" && v["sessionId"] == session).await;
        frames.into_iter().filter(|v| v["sessionId"] == session && v.get("seq").is_some()).collect()
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(frame) = self.try_recv(wait).await {
            panic!("unexpected frame: {frame:?}");
        }
    }

    pub async fn send_chat(&mut self, session: &str, content: &str) {
        self.send(json!({ "type": "chat.send", "sessionId": session, "content": content })).await;
    }

    pub async fn subscribe(&mut self, session: &str, last_seq: u64) {
        self.send(json!({ "type": "chat.subscribe", "sessions": [{ "sessionId": session, "lastSeq": last_seq }] }))
            .await;
    }
}
