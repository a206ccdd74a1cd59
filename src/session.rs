//! One WebSocket connection, one task: read client frames, write queued messages, ping, drain.
//!
//! Writes are coalesced: every message queued since the last write is fed into the socket's
//! write buffer and flushed once, so a burst to one connection costs one `write()` syscall
//! instead of one per message. Reading and writing share the task; a write that cannot
//! progress (the peer does not read) is abandoned as soon as the queue overflows.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;

use crate::chat::Chat;
use crate::disconnect::CloseReason;
use crate::hub::{Outgoing, Registration, TopicChange};
use crate::metrics::IgnoredFrame;
use crate::metrics::Metrics;
use crate::protocol::{self, Endpoint, NotwsCommand};

/// How long a close frame may take to go out before the socket is simply dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a session uses of its node: chat routing and the metrics.
pub struct Node {
    pub chat: Chat,
    pub metrics: Arc<Metrics>,
}

pub struct Session {
    pub registration: Registration,
    /// Needed for chat-room look-ups, which the back-end answers for the sender's own credential
    /// (API key or session cookies). Never logged; its `Debug` is redacted.
    pub credential: crate::backend::Credential,
}

/// Runs a connection until it closes. Pings, ping timeouts and the drain come from the hub
/// (one sweep per node, not a timer per connection) through the outbound queue.
pub async fn run(mut socket: WebSocket, session: Session, node: &Node) {
    let conn = session.registration.conn.clone();
    let endpoint = conn.endpoint;
    let m = node.metrics.endpoint(endpoint);
    m.connections.inc();
    m.opened.inc();
    let mut batch: VecDeque<Outgoing> = VecDeque::new();

    let reason = loop {
        tokio::select! {
            // Output first: a wake for output should not also poll the socket for input.
            // Input cannot starve: a queue that never empties overflows and closes.
            biased;
            _ = conn.outbound.ready.notified() => {
                let wake = conn.outbound.take(&mut batch);
                if !batch.is_empty() {
                    let written = tokio::select! {
                        r = write_batch(&mut socket, &mut batch, node) => match r {
                            Ok(()) => Written::All,
                            Err(_) => Written::Failed,
                        },
                        _ = conn.outbound.killed.notified() => Written::Killed,
                    };
                    if written != Written::All {
                        // Either the socket failed, or the queue overflowed while we were
                        // stuck writing; the queue knows which.
                        let mut scratch = VecDeque::new();
                        break conn.outbound.take(&mut scratch).close.unwrap_or(CloseReason::Error);
                    }
                    if batch.capacity() > 64 {
                        // A burst grew the buffer: give the memory back to idle connections.
                        batch = VecDeque::new();
                    }
                }
                if let Some(reason) = wake.close {
                    break reason;
                }
                if wake.ping && socket.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    break CloseReason::Error;
                }
            }
            incoming = socket.recv() => {
                let msg = match incoming {
                    None => break CloseReason::Client,
                    Some(Ok(msg)) => msg,
                    Some(Err(e)) => break read_error(e),
                };
                conn.touch();
                match msg {
                    // Boxed: the chat path (back-end call, cache) is a large future, and an
                    // inline await would make every idle connection's task carry its size.
                    Message::Text(text) => {
                        Box::pin(handle_text(node, &session, endpoint, text)).await
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
    Box::pin(session.registration.hub().remember_on_close(&conn)).await;
    if reason != CloseReason::Client {
        if reason == CloseReason::SlowConsumer {
            tracing::debug!(
                user = %conn.identity.user_id,
                endpoint = endpoint.as_str(),
                "closing slow consumer"
            );
        }
        let frame = CloseFrame {
            code: reason.code(),
            reason: Utf8Bytes::from_static(reason.text()),
        };
        let _ = tokio::time::timeout(
            CLOSE_WRITE_TIMEOUT,
            socket.send(Message::Close(Some(frame))),
        )
        .await;
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, socket.close()).await;
    }
    m.connections.dec();
    m.closed(reason).inc();
    // Unregisters from the hub (and releases its channels) here.
    drop(session);
}

/// How a batch write ended.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    All,
    /// The socket failed.
    Failed,
    /// The gateway closed the connection while the write was stuck (overflow, drain, ping).
    Killed,
}

async fn write_batch(
    socket: &mut WebSocket,
    batch: &mut VecDeque<Outgoing>,
    node: &Node,
) -> Result<(), axum::Error> {
    // feed() only appends to the socket's write buffer (it writes early only past
    // WRITE_BUFFER_SIZE); flush() then writes the whole batch with as few syscalls as possible.
    for msg in batch.iter() {
        socket.feed(Message::Text(msg.frame.clone())).await?;
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
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => CloseReason::FrameTooLarge,
        Some(tungstenite::Error::ConnectionClosed)
        | Some(tungstenite::Error::AlreadyClosed)
        | Some(tungstenite::Error::Io(_))
        | Some(tungstenite::Error::Protocol(_)) => CloseReason::Client,
        _ => CloseReason::Error,
    }
}

async fn handle_text(node: &Node, session: &Session, endpoint: Endpoint, text: Utf8Bytes) {
    let conn = &session.registration.conn;
    let m = node.metrics.endpoint(endpoint);
    match endpoint {
        Endpoint::Notws => match protocol::parse_notws(text.as_str()) {
            NotwsCommand::Subscribe(topics) => {
                let hub = session.registration.hub();
                hub.set_topics(conn, &topics, TopicChange::Subscribe);
                hub.remember_explicit(conn).await;
            }
            NotwsCommand::Unsubscribe(topics) => {
                let hub = session.registration.hub();
                hub.set_topics(conn, &topics, TopicChange::Unsubscribe);
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
}
