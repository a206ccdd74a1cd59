//! One WebSocket connection, one task: read client frames, write queued messages, ping, drain.
//!
//! Writes are coalesced: every message queued since the last write is fed into the socket's
//! write buffer and flushed once, so a burst to one connection costs one `write()` syscall
//! instead of one per message. Reading and writing share the task; a write that cannot
//! progress (the peer does not read) is abandoned as soon as the queue overflows, the gateway
//! closes the connection, or `--write-timeout` passes, whichever comes first: pings and close
//! frames included, so a peer with a full TCP window never holds a session (and its
//! registration) open.
//!
//! Client frames are rate limited per connection (`--max-frames-per-second`, a token bucket that
//! holds two seconds' worth): a client cannot keep its task, and the registry lock its commands
//! take, busy at the expense of the other connections.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;

use crate::chat::Chat;
use crate::disconnect::CloseReason;
use crate::hub::{Connection, Outgoing, Registration, TopicChange};
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
}

/// A token bucket over client frames: `rate` per second, `2 × rate` at most banked.
struct FrameBudget {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: tokio::time::Instant,
}

impl FrameBudget {
    fn new(rate: u32) -> FrameBudget {
        let rate = f64::from(rate.max(1));
        FrameBudget {
            tokens: 2.0 * rate,
            rate,
            burst: 2.0 * rate,
            last: tokio::time::Instant::now(),
        }
    }

    /// Takes one frame's token; false when the budget is spent.
    fn take(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.last = now;
        self.tokens = (self.tokens + earned).min(self.burst);
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

/// Runs a connection until it closes, then drops `guard` (what the connection holds of its node,
/// such as its connection slot). Pings, ping timeouts and the drain come from the hub (one sweep
/// per node, not a timer per connection) through the outbound queue.
///
/// Spawned as a task of its own (`server.rs`), and written as a function that returns an
/// `async move` block, not as an `async fn`: an `async fn` keeps its arguments twice for its
/// whole life (as arguments and as the locals they move into), and the socket alone is 368
/// bytes of every idle connection (ARCHITECTURE.md, "Memory per connection").
#[allow(clippy::manual_async_fn)]
pub fn run(
    mut socket: WebSocket,
    session: Session,
    node: Arc<Node>,
    guard: impl Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let node = &*node;
        let conn = session.registration.conn.clone();
        let endpoint = conn.endpoint;
        let m = node.metrics.endpoint(endpoint);
        m.connections.inc();
        m.opened.inc();
        let mut batch: VecDeque<Outgoing> = VecDeque::new();
        let limits = node.limits;
        let mut budget = FrameBudget::new(limits.frames_per_second);

        let reason = loop {
            tokio::select! {
                // Output first: a wake for output should not also poll the socket for input.
                // Input cannot starve: a queue that never empties overflows and closes.
                biased;
                _ = conn.outbound.ready.notified() => {
                    let wake = conn.outbound.take(&mut batch);
                    if !batch.is_empty() || wake.ping {
                        // Boxed, like every await below but the select: the task of an idle
                        // connection then carries only what waiting needs (ARCHITECTURE.md,
                        // "Memory per connection"); one allocation per batch, not per message.
                        let write = write_batch(&mut socket, &mut batch, wake.ping, node);
                        let written = Box::pin(bounded(&conn, limits.write_timeout, write)).await;
                        if let Some(reason) = written.failure(&conn) {
                            break reason;
                        }
                        if batch.capacity() > 64 {
                            // A burst grew the buffer: give the memory back to idle connections.
                            batch = VecDeque::new();
                        }
                    }
                    if let Some(reason) = wake.close {
                        break reason;
                    }
                }
                incoming = socket.recv() => {
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
                        Message::Ping(_) | Message::Pong(_) => {}
                    }
                }
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
                code: reason.code(),
                reason: Utf8Bytes::from_static(reason.text()),
            };
            let close = socket.send(Message::Close(Some(frame)));
            let sent = Box::pin(tokio::time::timeout(close_timeout, close)).await;
            if matches!(sent, Ok(Ok(()))) {
                // Read (and discard) until the client's close reply: closing a socket with unread
                // input makes the kernel send a reset, which can destroy our close frame before
                // the client has read it.
                let _ = Box::pin(tokio::time::timeout(close_timeout, async {
                    while let Some(Ok(_)) = socket.recv().await {}
                }))
                .await;
            }
        }
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
async fn bounded(
    conn: &Connection,
    timeout: Duration,
    write: impl Future<Output = Result<(), axum::Error>>,
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

/// Writes the taken messages, and a wanted ping after them, in one flush.
async fn write_batch(
    socket: &mut WebSocket,
    batch: &mut VecDeque<Outgoing>,
    ping: bool,
    node: &Node,
) -> Result<(), axum::Error> {
    // feed() only appends to the socket's write buffer (it writes early only past
    // WRITE_BUFFER_SIZE); flush() then writes the whole batch with as few syscalls as possible.
    if !batch.is_empty() {
        node.metrics
            .write_batch_messages
            .observe(batch.len() as f64);
    }
    for msg in batch.iter() {
        socket.feed(Message::Text(msg.frame.clone())).await?;
    }
    if ping {
        socket.feed(Message::Ping(bytes::Bytes::new())).await?;
    }
    socket.flush().await?;
    let now = protocol::now_micros();
    for msg in batch.drain(..) {
        let secs = now.saturating_sub(msg.published_at) as f64 / 1e6;
        node.metrics.delivery_latency.observe(secs);
    }
    Ok(())
}

fn read_error(e: axum::Error) -> CloseReason {
    use tungstenite::error::ProtocolError;
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => CloseReason::FrameTooLarge,
        Some(tungstenite::Error::Utf8(_)) => CloseReason::InvalidUtf8,
        // The peer went away without a close frame: nobody to answer.
        Some(tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake))
        | Some(tungstenite::Error::ConnectionClosed)
        | Some(tungstenite::Error::AlreadyClosed)
        | Some(tungstenite::Error::Io(_)) => CloseReason::Client,
        Some(tungstenite::Error::Protocol(_)) => CloseReason::Protocol,
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
