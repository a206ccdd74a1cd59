//! WebSocket clients: wsgate's `/notws` and `/chat`, and Socket.IO (Engine.IO v4 over WebSocket).

use crate::stats::{marker, now_us, Histogram};
use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// wsgate: `/notws` and `/chat`.
    Wsgate,
    /// The Socket.IO peer (Engine.IO v4 over a raw WebSocket).
    Socketio,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Notifications,
    Chat,
}

/// Counters shared by every connection of a run.
pub struct Shared {
    /// Only frames carrying this step number are counted.
    pub step: AtomicU64,
    pub received: AtomicU64,
    pub other_frames: AtomicU64,
    pub latency: Histogram,
    /// Deliveries per second since `t0` (index = whole seconds).
    pub timeline: Vec<AtomicU64>,
    pub t0: Instant,
    pub disconnects: AtomicU64,
    pub open: AtomicUsize,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        Arc::new(Shared {
            step: AtomicU64::new(0),
            received: AtomicU64::new(0),
            other_frames: AtomicU64::new(0),
            latency: Histogram::new(),
            timeline: (0..7200).map(|_| AtomicU64::new(0)).collect(),
            t0: Instant::now(),
            disconnects: AtomicU64::new(0),
            open: AtomicUsize::new(0),
        })
    }

    fn on_payload(&self, frame: &str) {
        let Some(ts) = marker(frame, "ts") else {
            self.other_frames.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if marker(frame, "step") != Some(self.step.load(Ordering::Relaxed)) {
            self.other_frames.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = now_us();
        self.latency.record(now.saturating_sub(ts));
        self.received.fetch_add(1, Ordering::Relaxed);
        let sec = self.t0.elapsed().as_secs() as usize;
        if let Some(slot) = self.timeline.get(sec) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How to reach one server node.
#[derive(Clone, Debug)]
pub struct NodeAddr {
    pub host: String,
    pub addr: SocketAddr,
}

pub fn parse_ws_url(url: &str) -> anyhow::Result<NodeAddr> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow!("only ws:// URLs are supported: {url}"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("{url}: host must be an IP address and port"))?;
    Ok(NodeAddr {
        host: hostport.to_string(),
        addr,
    })
}

#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub target: Target,
    pub endpoint: Endpoint,
    pub node: NodeAddr,
    pub user: String,
    /// Index used to pick a source address 127.0.0.(1 + index % source_ips).
    pub index: usize,
    pub source_ips: usize,
}

impl ClientSpec {
    fn key(&self) -> String {
        format!("demo-key-{}", self.user)
    }

    fn url(&self) -> String {
        match (self.target, self.endpoint) {
            (Target::Wsgate, Endpoint::Notifications) => format!(
                "ws://{}/notws?api_key={}&userId={}",
                self.node.host,
                self.key(),
                self.user
            ),
            (Target::Wsgate, Endpoint::Chat) => {
                format!("ws://{}/chat?api_key={}", self.node.host, self.key())
            }
            (Target::Socketio, _) => format!(
                "ws://{}/socket.io/?EIO=4&transport=websocket",
                self.node.host
            ),
        }
    }
}

/// IP_BIND_ADDRESS_NO_PORT: let connect() pick the port per (source, destination) pair.
const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;

async fn tcp_connect(spec: &ClientSpec) -> anyhow::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if spec.node.addr.ip().is_loopback() && spec.source_ips > 1 {
        let last = 1 + (spec.index % spec.source_ips) as u32;
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + last);
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own with a pointer to a live c_int.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))?;
    }
    let stream = sock.connect(spec.node.addr).await?;
    socket2::SockRef::from(&stream).set_tcp_nodelay(true)?;
    Ok(stream)
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
}

pub type Ws = WebSocketStream<TcpStream>;

/// Why a connection attempt failed, for the report.
#[derive(Debug)]
pub enum ConnectError {
    /// A refused handshake: its status and `Retry-After` (seconds), if any.
    Status(u16, Option<u64>),
    Other(anyhow::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Status(s, _) => write!(f, "HTTP {s}"),
            ConnectError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

/// Connects, upgrades and performs the protocol handshake (subscribe, Socket.IO connect).
pub async fn establish(spec: &ClientSpec, timeout: Duration) -> Result<Ws, ConnectError> {
    let fut = async {
        let stream = tcp_connect(spec).await.map_err(ConnectError::Other)?;
        let (mut ws, _resp) =
            tokio_tungstenite::client_async_with_config(spec.url(), stream, Some(ws_config()))
                .await
                .map_err(|e| match e {
                    WsError::Http(resp) => ConnectError::Status(
                        resp.status().as_u16(),
                        resp.headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse().ok()),
                    ),
                    other => ConnectError::Other(other.into()),
                })?;
        match spec.target {
            Target::Wsgate => {
                if spec.endpoint == Endpoint::Notifications {
                    ws.send(Message::text("subscribe: ALL"))
                        .await
                        .map_err(|e| ConnectError::Other(e.into()))?;
                }
            }
            Target::Socketio => {
                socketio_handshake(&mut ws, spec)
                    .await
                    .map_err(ConnectError::Other)?;
            }
        }
        Ok(ws)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Other(anyhow!("timed out"))),
    }
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_string()),
            Some(Ok(Message::Close(c))) => bail!("closed: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("connection ended"),
        }
    }
}

async fn socketio_handshake(ws: &mut Ws, spec: &ClientSpec) -> anyhow::Result<()> {
    // Engine.IO open packet: 0{"sid":...,"pingInterval":...}
    let open = next_text(ws).await?;
    if !open.starts_with('0') {
        bail!("expected an Engine.IO open packet, got {open:.40}");
    }
    // Socket.IO CONNECT to the main namespace with the auth payload.
    // Notifications use the main namespace, chat the `/chat` namespace.
    let ns = match spec.endpoint {
        Endpoint::Notifications => "",
        Endpoint::Chat => "/chat,",
    };
    let auth = serde_json::json!({ "api_key": spec.key(), "userId": spec.user });
    ws.send(Message::text(format!("40{ns}{auth}"))).await?;
    let (ok, fail) = (format!("40{ns}"), format!("44{ns}"));
    loop {
        let t = next_text(ws).await?;
        if t == "2" {
            ws.send(Message::text("3")).await?;
        } else if t.starts_with(&ok) {
            break;
        } else if let Some(err) = t.strip_prefix(&fail) {
            bail!("connect_error {err}");
        }
    }
    if spec.endpoint == Endpoint::Notifications {
        ws.send(Message::text(r#"42["subscribe","ALL"]"#)).await?;
    }
    Ok(())
}

/// Formats an outgoing chat frame for the target's protocol.
pub fn chat_frame(target: Target, room: &str, content: &str) -> String {
    let msg = serde_json::json!({ "chatRoom": { "chatRoomId": room }, "content": content });
    match target {
        Target::Wsgate => msg.to_string(),
        Target::Socketio => format!(r#"42/chat,["chat",{msg}]"#),
    }
}

/// Runs an established connection until `stop` turns true or the server closes it.
/// Frames from `outgoing` are sent as text. Returns true when the server ended it first.
pub async fn drive(
    mut ws: Ws,
    target: Target,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    mut outgoing: Option<mpsc::Receiver<String>>,
    abrupt_close: bool,
) -> bool {
    shared.open.fetch_add(1, Ordering::Relaxed);
    let ended_by_server = loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break false,
            out = async {
                match outgoing.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                match out {
                    Some(text) => {
                        if ws.send(Message::text(text)).await.is_err() {
                            break true;
                        }
                    }
                    None => outgoing = None,
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    let s = t.as_str();
                    match target {
                        Target::Wsgate => shared.on_payload(s),
                        Target::Socketio => {
                            if s == "2" {
                                if ws.send(Message::text("3")).await.is_err() {
                                    break true;
                                }
                            } else if s.starts_with("42") {
                                shared.on_payload(s);
                            } else if s.starts_with("41") || s.starts_with('1') {
                                break true;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break true,
                Some(Ok(_)) => {}
            }
        }
    };
    shared.open.fetch_sub(1, Ordering::Relaxed);
    if ended_by_server {
        shared.disconnects.fetch_add(1, Ordering::Relaxed);
    } else if abrupt_close {
        // Drop the TCP connection without a closing handshake (as a crashed client would).
        drop(ws);
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
    ended_by_server
}
