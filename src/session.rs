//! One WebSocket connection, one task: read client frames, finish writes the socket did not take
//! at once, ping, close, drain.
//!
//! Messages are written by the outbound queue (`hub/outbound.rs`): the fan-out writes them
//! straight into the socket after its batch, every message queued since the last write in one
//! `send`. The session is woken only for what the socket did not take, a wanted ping with no
//! message to ride on, or a close. A write that cannot progress (the peer does not read) is
//! abandoned as soon as the queue overflows, the gateway closes the connection, or
//! `--write-timeout` passes, whichever comes first: pings and close frames included, so a peer
//! with a full TCP window never holds a session (and its registration) open.
//!
//! tungstenite reads the client's frames; what it writes itself (pongs, the close reply) goes
//! through the queue's pending bytes, behind every frame accepted before ([`SessionIo`]).
//!
//! Client frames are rate limited per connection (`--max-frames-per-second`, a token bucket that
//! holds two seconds' worth): a client cannot keep its task, and the registry lock its commands
//! take, busy at the expense of the other connections.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::chat::Chat;
use crate::disconnect::CloseReason;
use crate::hub::{Connection, Registration, TopicChange, Wire, Writes};
use crate::metrics::IgnoredFrame;
use crate::metrics::Metrics;
use crate::protocol::{self, Endpoint, NotwsCommand};

/// How long a close frame may take to go out, and the client's close reply to come back,
/// before the socket is simply dropped (capped by `--write-timeout`).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a session uses of its node: chat routing, the metrics and the per-connection limits.
pub struct Node {
    pub chat: Chat,
    pub metrics: Arc<Metrics>,
    pub limits: SessionLimits,
}

/// Limits every session applies to its socket.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// `--max-frames-per-second`; the burst is twice this.
    pub frames_per_second: u32,
    /// `--write-timeout`: the longest one socket write may take.
    pub write_timeout: Duration,
    /// `--max-frame-size`: the largest client frame and message.
    pub max_frame_size: usize,
}

/// Read buffer of each socket. Client frames are tiny (`subscribe: ALL`, a chat line), and
/// tungstenite allocates this eagerly for every connection: 128 KiB by default would cost more
/// than everything else an idle connection holds. Larger frames grow it on demand (and are read
/// at most this much per call).
const READ_BUFFER_SIZE: usize = 256;
/// tungstenite's own write buffer, for the pongs and the close frame it writes (messages do not
/// go through it).
const WRITE_BUFFER_SIZE: usize = 1024;

type Socket = WebSocketStream<SessionIo>;

/// The socket as tungstenite sees it: reads come straight from the socket, writes go behind
/// the outbound queue's pending bytes, so a pong or a close frame never lands inside a frame
/// the fan-out wrote.
struct SessionIo {
    wire: Wire,
    conn: Arc<Connection>,
}

impl AsyncRead for SessionIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.wire.poll_read_ready(cx))?;
            match self.wire.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SessionIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // tungstenite hands over whole frames: accepted whole, in order, behind what is pending.
        self.conn.outbound.write_raw(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.conn.outbound.poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.conn.outbound.poll_drain(cx)
    }
}

/// A token bucket over client frames: `rate` per second, `2 × rate` at most banked.
struct FrameBudget {
    tokens: f64,
    rate: f64,
    last: tokio::time::Instant,
}

impl FrameBudget {
    fn new(rate: u32) -> FrameBudget {
        let rate = f64::from(rate.max(1));
        FrameBudget {
            tokens: 2.0 * rate,
            rate,
            last: tokio::time::Instant::now(),
        }
    }

    /// Takes one frame's token; false when the budget is spent.
    fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.last = now;
        self.tokens = (self.tokens + earned).min(2.0 * self.rate);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

pub struct Session {
    pub registration: Registration,
    /// Needed for chat-room look-ups, which the back-end answers for the sender's own credential
    /// (API key or session cookies). Never logged; its `Debug` is redacted.
    pub credential: crate::backend::Credential,
}

/// Starts a connection's session in a task of its own: tungstenite reads from `tcp`, first the
/// bytes the client sent behind its handshake (`read_ahead`), and the outbound queue writes to it.
pub fn start(
    tcp: TcpStream,
    read_ahead: Vec<u8>,
    session: Session,
    node: Arc<Node>,
    guard: impl Send + 'static,
) {
    let conn = &session.registration.conn;
    let wire: Wire = Arc::new(tcp);
    conn.outbound.attach(wire.clone());
    let max = node.limits.max_frame_size;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_SIZE)
        .write_buffer_size(WRITE_BUFFER_SIZE)
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let io = SessionIo {
        wire,
        conn: conn.clone(),
    };
    // There is no handshake left to do, so this completes at once. Built here rather than in
    // the session's task, whose state would otherwise keep its ingredients (the socket, the
    // read-ahead) for the connection's whole life.
    let socket = WebSocketStream::from_partially_read(io, read_ahead, Role::Server, Some(config))
        .now_or_never();
    match socket {
        Some(socket) => {
            tokio::spawn(run(socket, session, node, guard));
        }
        None => {
            tracing::error!("the WebSocket over an upgraded socket did not start; dropped");
            session.registration.conn.outbound.detach();
        }
    }
}

/// Runs a connection until it closes, then drops `guard` (what the connection holds of its node,
/// such as its connection slot). Pings, ping timeouts and the drain come from the hub (one sweep
/// per node, not a timer per connection) through the outbound queue.
///
/// Written as a function that returns an `async move` block, not as an `async fn`: an
/// `async fn` keeps its arguments twice for its whole life (as arguments and as the locals they
/// move into), and the socket alone is 296 bytes of every idle connection (ARCHITECTURE.md,
/// "Memory per connection").
#[allow(clippy::manual_async_fn)]
fn run(
    mut socket: Socket,
    session: Session,
    node: Arc<Node>,
    guard: impl Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let node = &*node;
        let conn = session.registration.conn.clone();
        let endpoint = conn.endpoint;
        let m = node.metrics.endpoint(endpoint);
        let limits = &node.limits;
        m.connections.inc();
        m.opened.inc();
        let mut budget = FrameBudget::new(limits.frames_per_second);

        let reason = loop {
            // A close the gateway asked for, once what was accepted before it is written.
            let close = tokio::select! {
                // Output first: a wake for output should not also poll the socket for input.
                // Input cannot starve: a queue that never empties overflows and closes.
                biased;
                _ = conn.outbound.ready.notified() => {
                    let written = conn.outbound
                        .write_queued(&mut Writes::new(&node.metrics));
                    if written.broken {
                        break written.close.unwrap_or(CloseReason::Error);
                    }
                    written.close
                }
                incoming = socket.next() => {
                    let msg = match incoming {
                        None => break CloseReason::Client,
                        Some(Ok(msg)) => msg,
                        Some(Err(e)) => break read_error(e),
                    };
                    conn.touch();
                    if !budget.take() {
                        break CloseReason::FrameRate;
                    }
                    match msg {
                        // Boxed: the chat path (back-end call, cache) is a large future, and an
                        // inline await would make every idle connection's task carry its size.
                        Message::Text(text) => {
                            if let Err(reason) = Box::pin(handle_text(node, &session, endpoint, text)).await {
                                break reason;
                            }
                        }
                        Message::Binary(_) => m.ignored(IgnoredFrame::Binary).inc(),
                        Message::Close(_) => break CloseReason::Client,
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                    None
                }
            };
            // What the socket did not take at once: a batch, a ping, or the pong tungstenite
            // wrote while reading a client's ping. Boxed, like every await below but the
            // select: the task of an idle connection then carries only what waiting needs
            // (ARCHITECTURE.md, "Memory per connection"); one allocation per full socket, not
            // per message.
            if conn.outbound.has_pending() {
                let drain = conn.outbound.drain();
                let done = Box::pin(bounded(&conn, limits.write_timeout, drain)).await;
                if let Some(reason) = done.failure(&conn) {
                    break reason;
                }
            }
            if let Some(reason) = close {
                break reason;
            }
        };

        // Before the close frame goes out: a client that reconnects when it sees the close finds
        // its topics remembered.
        // Boxed: this future exists once per connection, at its end; inlined it would enlarge
        // every idle connection's task.
        if reason == CloseReason::Drain {
            // Where it stopped, before the close frame: a client that reconnects on the close
            // resumes from there on any node.
            Box::pin(session.registration.hub().write_resume(&conn)).await;
        }
        Box::pin(session.registration.hub().remember_on_close(&conn)).await;
        // Unregister from the hub (and release its channels) now: the closing handshake below may
        // take up to two close timeouts with a peer that does not read. Counted closed now too, so
        // the metrics agree with the hub whatever the peer does with the close frame.
        drop(session);
        m.connections.dec();
        m.closed(reason).inc();
        let close_timeout = CLOSE_TIMEOUT.min(limits.write_timeout);
        if reason == CloseReason::Client {
            // tungstenite queued the reply to the client's close frame; it goes out only when the
            // socket is flushed. (If the stream simply ended, this fails at once.)
            let _ = Box::pin(tokio::time::timeout(close_timeout, socket.flush())).await;
        } else {
            if matches!(
                reason,
                CloseReason::SlowConsumer | CloseReason::WriteTimeout | CloseReason::FrameRate
            ) {
                tracing::debug!(
                    user = %conn.identity.user_id,
                    endpoint = endpoint.as_str(),
                    reason = reason.as_str(),
                    "closing connection"
                );
            }
            let frame = CloseFrame {
                code: reason.code().into(),
                reason: Utf8Bytes::from_static(reason.text()),
            };
            let close = socket.send(Message::Close(Some(frame)));
            let sent = Box::pin(tokio::time::timeout(close_timeout, close)).await;
            if matches!(sent, Ok(Ok(()))) {
                // Read (and discard) until the client's close reply: closing a socket with unread
                // input makes the kernel send a reset, which can destroy our close frame before
                // the client has read it.
                let _ = Box::pin(tokio::time::timeout(close_timeout, async {
                    while let Some(Ok(_)) = socket.next().await {}
                }))
                .await;
            }
        }
        // The socket closes when the session lets go of it, whoever else holds the connection.
        conn.outbound.detach();
        drop(socket);
        drop(guard);
    }
}

/// How a bounded socket write ended.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    All,
    /// The socket failed.
    Failed,
    /// The write took longer than `--write-timeout`.
    TimedOut,
    /// The gateway closed the connection while the write was stuck (overflow, drain, ping).
    Killed,
}

impl Written {
    /// Why the session ends, if it does.
    fn failure(self, conn: &Connection) -> Option<CloseReason> {
        let reason = match self {
            Written::All => return None,
            Written::TimedOut => CloseReason::WriteTimeout,
            Written::Failed => CloseReason::Error,
            Written::Killed => CloseReason::Error,
        };
        // A gateway close (overflow, drain, ping timeout) names the real reason.
        let mut scratch = VecDeque::new();
        Some(conn.outbound.take(&mut scratch).close.unwrap_or(reason))
    }
}

/// Runs one socket write, bounded by `timeout` and by the gateway closing the connection.
async fn bounded<E>(
    conn: &Connection,
    timeout: Duration,
    write: impl Future<Output = Result<(), E>>,
) -> Written {
    tokio::select! {
        // The write first: one that completes at once (the socket had room) then neither
        // registers a timer nor a waiter on `killed`.
        biased;
        r = tokio::time::timeout(timeout, write) => match r {
            Ok(Ok(())) => Written::All,
            Ok(Err(_)) => Written::Failed,
            Err(_) => Written::TimedOut,
        },
        _ = conn.outbound.killed.notified() => Written::Killed,
    }
}

fn read_error(e: tungstenite::Error) -> CloseReason {
    use tungstenite::error::ProtocolError;
    match e {
        tungstenite::Error::Capacity(_) => CloseReason::FrameTooLarge,
        tungstenite::Error::Utf8(_) => CloseReason::InvalidUtf8,
        // The peer went away without a close frame: nobody to answer.
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)
        | tungstenite::Error::ConnectionClosed
        | tungstenite::Error::AlreadyClosed
        | tungstenite::Error::Io(_) => CloseReason::Client,
        tungstenite::Error::Protocol(_) => CloseReason::Protocol,
        _ => CloseReason::Error,
    }
}

/// Handles one text frame; `Err` closes the connection.
async fn handle_text(
    node: &Node,
    session: &Session,
    endpoint: Endpoint,
    text: Utf8Bytes,
) -> Result<(), CloseReason> {
    let conn = &session.registration.conn;
    let m = node.metrics.endpoint(endpoint);
    match endpoint {
        Endpoint::Notws => match protocol::parse_notws(text.as_str()) {
            NotwsCommand::Subscribe(topics) => {
                let hub = session.registration.hub();
                hub.set_topics(conn, &topics, TopicChange::Subscribe)
                    .map_err(|_| CloseReason::TooManyTopics)?;
                hub.remember_explicit(conn).await;
            }
            NotwsCommand::Unsubscribe(topics) => {
                let hub = session.registration.hub();
                hub.set_topics(conn, &topics, TopicChange::Unsubscribe)
                    .map_err(|_| CloseReason::TooManyTopics)?;
                hub.remember_explicit(conn).await;
            }
            NotwsCommand::Unknown => {
                tracing::debug!(user = %conn.identity.user_id, "unknown command prefix");
                m.ignored(IgnoredFrame::UnknownCommand).inc();
            }
        },
        Endpoint::Chat => {
            let hub = session.registration.hub();
            if let Err(kind) = node
                .chat
                .route(
                    hub,
                    text.as_str(),
                    &conn.identity.user_id,
                    &session.credential,
                )
                .await
            {
                tracing::debug!(user = %conn.identity.user_id, kind = kind.as_str(), "chat frame dropped");
                m.ignored(kind).inc();
            }
        }
    }
    Ok(())
}
