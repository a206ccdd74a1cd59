//! A connection's bounded outbound queue, and the socket it is written into.
//!
//! The fan-out pushes messages; after its batch it writes each woken connection's queue straight
//! into the socket (`write_through`) when nothing is pending there: one non-blocking `send` of
//! ready-made frames, no task woken, no poll. Only what the kernel does not take at once (a full
//! socket buffer) is left pending, and the session writes it when the socket is writable, with
//! `--write-timeout`. Every write to the socket, the session's own included (pongs, close
//! frames), goes through the queue's lock and its pending bytes, so frames never interleave and
//! always leave in order.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::disconnect::CloseReason;
use crate::metrics::Metrics;
use crate::protocol;

/// A connection's socket, shared by its session (which reads it) and its outbound queue (which
/// writes it).
pub type Wire = Arc<TcpStream>;

/// Pending bytes kept allocated after they are written: a burst's buffer goes back.
const KEPT_PENDING: usize = 16 * 1024;

/// What a run of socket writes shares: one framing buffer, and the write histograms, added to
/// the registry's once at the end of the run (on drop), not with shared atomics per message.
pub struct Writes {
    frames: Vec<u8>,
    latency: prometheus::local::LocalHistogram,
    batch: prometheus::local::LocalHistogram,
}

impl Writes {
    pub fn new(metrics: &Metrics) -> Writes {
        Writes {
            frames: Vec::new(),
            latency: metrics.delivery_latency.local(),
            batch: metrics.write_batch_messages.local(),
        }
    }
}

/// Framing buffer a run of writes keeps between connections: a burst's grows it, and goes back.
const KEPT_FRAMES: usize = 64 * 1024;

/// One message waiting to be written to a socket.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub frame: Utf8Bytes,
    /// Publisher's timestamp (µs since the epoch), for the delivery-latency histogram.
    pub published_at: u64,
    /// The channel it came through and its position there (with history).
    pub position: Option<(super::resume::Slot, crate::broker::StreamId)>,
}

struct QueueState {
    queue: VecDeque<Outgoing>,
    bytes: usize,
    closed: Option<CloseReason>,
    /// The node's heartbeat wants a ping sent (with the next write, or alone when it says so).
    ping: bool,
    /// Room a resume replay takes on top of the bounds, until the writer first takes the queue.
    extra_messages: usize,
    extra_bytes: usize,
    /// The socket, while the session runs (none in the hub's unit tests).
    wire: Option<Wire>,
    /// Frames accepted for the socket that it has not taken yet: written before anything
    /// else, by the session. Counted against the byte bound.
    pending: BytesMut,
    /// A write failed: the socket is gone.
    broken: bool,
}

/// What the writer finds when it wakes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wake {
    /// Close the connection with this reason after writing what was taken.
    pub close: Option<CloseReason>,
    /// Send a ping.
    pub ping: bool,
}

/// What [`Outbound::write_queued`] left to the session.
#[derive(Debug, PartialEq, Eq)]
pub struct Flushed {
    /// Close the connection with this reason once the pending bytes are out.
    pub close: Option<CloseReason>,
    /// Bytes wait for the socket to become writable ([`Outbound::drain`]).
    pub pending: bool,
    /// The socket failed.
    pub broken: bool,
}

/// A connection's bounded outbound queue (messages and bytes). Pushing never blocks: a full
/// queue closes the connection as a slow consumer, so one client that does not read can neither
/// grow memory nor slow the other recipients.
pub struct Outbound {
    state: Mutex<QueueState>,
    max_messages: usize,
    max_bytes: usize,
    /// Wakes the writer when the queue goes from empty to non-empty, or on close.
    pub(crate) ready: Notify,
    /// Wakes a writer stuck in a socket write when the connection is closed by the gateway.
    pub(crate) killed: Notify,
}

/// Why a push did not queue the message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Push {
    /// Queued behind others: the writer is already due to wake.
    Queued,
    /// Queued into an empty queue: the writer must be woken (`wake`), which the fan-out does
    /// after the whole batch of broker messages, so that a burst is written in one go.
    First,
    /// The queue overflowed just now: the connection is being closed.
    Overflow,
    /// The connection is already closing.
    Closed,
}

impl Outbound {
    pub(super) fn new(max_messages: usize, max_bytes: usize) -> Outbound {
        Outbound {
            state: Mutex::new(QueueState {
                queue: VecDeque::new(),
                bytes: 0,
                closed: None,
                ping: false,
                extra_messages: 0,
                extra_bytes: 0,
                wire: None,
                pending: BytesMut::new(),
                broken: false,
            }),
            max_messages,
            max_bytes,
            ready: Notify::new(),
            killed: Notify::new(),
        }
    }

    /// Queues a message without waking the writer; [`Push::First`] says a wake is owed.
    pub(super) fn push(&self, msg: &Outgoing) -> Push {
        let mut s = self.state.lock();
        if s.closed.is_some() {
            return Push::Closed;
        }
        let len = msg.frame.len();
        if s.queue.len() >= self.max_messages + s.extra_messages
            || s.bytes + s.pending.len() + len > self.max_bytes + s.extra_bytes
        {
            s.closed = Some(CloseReason::SlowConsumer);
            s.queue = VecDeque::new();
            s.bytes = 0;
            drop(s);
            self.ready.notify_one();
            self.killed.notify_one();
            return Push::Overflow;
        }
        let was_empty = s.queue.is_empty();
        s.bytes += len;
        s.queue.push_back(msg.clone());
        if was_empty {
            Push::First
        } else {
            Push::Queued
        }
    }

    /// Wakes the writer for what [`push`](Self::push) queued.
    pub(super) fn wake(&self) {
        self.ready.notify_one();
    }

    /// Gives the queue its socket: from now on queued messages are written straight into it.
    pub fn attach(&self, wire: Wire) {
        self.state.lock().wire = Some(wire);
    }

    /// Lets go of the socket (the session ends), so it closes with the session.
    pub fn detach(&self) {
        let mut s = self.state.lock();
        s.wire = None;
        s.pending = BytesMut::new();
    }

    /// The fan-out's write after its batch: writes what is queued straight into the socket if
    /// nothing is pending there and the connection is not closing. True when nothing is left
    /// for the session; otherwise the caller wakes it.
    pub(super) fn write_through(&self, writes: &mut Writes) -> bool {
        let mut s = self.state.lock();
        if s.wire.is_none() || s.closed.is_some() || !s.pending.is_empty() {
            return false;
        }
        let w = write_locked(&mut s, writes);
        !w.pending && !w.broken
    }

    /// The session's write: what is queued, and a wanted ping, as far as the socket takes them
    /// now; the rest stays pending for [`drain`](Self::drain).
    pub fn write_queued(&self, writes: &mut Writes) -> Flushed {
        let mut s = self.state.lock();
        write_locked(&mut s, writes)
    }

    /// Appends bytes of whole frames the session writes itself (pongs, the close frame) behind
    /// everything accepted before, writing them now if nothing is pending.
    pub fn write_raw(&self, frames: &[u8]) {
        let mut s = self.state.lock();
        push_bytes(&mut s, frames);
    }

    /// Writes the pending bytes, waiting for the socket to become writable as often as needed.
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let wire = {
                let mut s = self.state.lock();
                let s = &mut *s;
                if s.pending.is_empty() {
                    if s.pending.capacity() > KEPT_PENDING {
                        s.pending = BytesMut::new();
                    }
                    return Poll::Ready(Ok(()));
                }
                let Some(wire) = s.wire.clone() else {
                    return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
                };
                match wire.try_write(&s.pending) {
                    Ok(n) => {
                        s.pending.advance(n);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => wire,
                    Err(e) => {
                        s.pending.clear();
                        s.broken = true;
                        return Poll::Ready(Err(e));
                    }
                }
            };
            std::task::ready!(wire.poll_write_ready(cx))?;
        }
    }

    /// Whether bytes wait for the socket.
    pub fn has_pending(&self) -> bool {
        !self.state.lock().pending.is_empty()
    }

    /// [`poll_drain`](Self::poll_drain) as a future.
    pub async fn drain(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await
    }

    /// Moves every queued message into `into` (which must be empty), so the writer can feed them
    /// all and flush once, and says whether to ping or close. Messages queued before a drain
    /// close are still written; an overflow has already discarded the queue.
    pub fn take(&self, into: &mut VecDeque<Outgoing>) -> Wake {
        let mut s = self.state.lock();
        std::mem::swap(&mut s.queue, into);
        s.bytes = 0;
        s.extra_messages = 0;
        s.extra_bytes = 0;
        Wake {
            close: s.closed,
            ping: std::mem::take(&mut s.ping),
        }
    }

    /// Puts a resume replay in front of what is queued, and drops the queued live copies of
    /// replayed messages: a queued message whose channel's replay reached its position. The
    /// replay does not count against the bounds (it is bounded by the history read).
    pub(super) fn splice_replay(
        &self,
        replay: Vec<Outgoing>,
        reached: [Option<crate::broker::StreamId>; 3],
    ) {
        let mut s = self.state.lock();
        if s.closed.is_some() {
            return;
        }
        let live = std::mem::take(&mut s.queue);
        let replay_bytes: usize = replay.iter().map(|m| m.frame.len()).sum();
        s.extra_messages = replay.len();
        s.extra_bytes = replay_bytes;
        let mut queue: VecDeque<Outgoing> = replay.into();
        let mut bytes = replay_bytes;
        for m in live {
            let copy = m
                .position
                .is_some_and(|(slot, p)| reached[slot as usize].is_some_and(|r| p <= r));
            if !copy {
                bytes += m.frame.len();
                queue.push_back(m);
            }
        }
        s.queue = queue;
        s.bytes = bytes;
        drop(s);
        self.ready.notify_one();
    }

    /// The sweep wants a ping sent, without waking the writer: the ping goes out in the next
    /// write of messages, in the same system call, or alone on [`ping_if_pending`] (half an
    /// interval later) if no message came. A busy connection's pings then cost no write of
    /// their own.
    ///
    /// [`ping_if_pending`]: Self::ping_if_pending
    pub(super) fn want_ping(&self) {
        self.state.lock().ping = true;
    }

    /// Wakes the writer for a wanted ping that no write has carried yet.
    pub(super) fn ping_if_pending(&self) {
        let pending = self.state.lock().ping;
        if pending {
            self.ready.notify_one();
        }
    }

    /// Closes the connection from the gateway's side.
    pub fn close(&self, reason: CloseReason) {
        let mut s = self.state.lock();
        if s.closed.is_none() {
            s.closed = Some(reason);
        }
        drop(s);
        self.ready.notify_one();
        self.killed.notify_one();
    }
}

/// Frames everything queued (and a wanted ping) and hands it to the socket.
fn write_locked(s: &mut QueueState, writes: &mut Writes) -> Flushed {
    let n = s.queue.len();
    let ping = std::mem::take(&mut s.ping);
    if n > 0 || ping {
        let mut frames = std::mem::take(&mut writes.frames);
        frames.clear();
        frames.reserve(s.bytes + n * protocol::MAX_FRAME_HEADER + protocol::PING_FRAME.len());
        let now = protocol::now_micros();
        for msg in s.queue.drain(..) {
            protocol::put_text_frame(&mut frames, msg.frame.as_str().as_bytes());
            let secs = now.saturating_sub(msg.published_at) as f64 / 1e6;
            writes.latency.observe(secs);
        }
        if ping {
            frames.extend_from_slice(&protocol::PING_FRAME);
        }
        if n > 0 {
            writes.batch.observe(n as f64);
        }
        s.bytes = 0;
        s.extra_messages = 0;
        s.extra_bytes = 0;
        if s.queue.capacity() > 64 {
            // A burst grew the queue: give the memory back to idle connections.
            s.queue = VecDeque::new();
        }
        push_bytes(s, &frames);
        if frames.capacity() <= KEPT_FRAMES {
            writes.frames = frames;
        }
    }
    Flushed {
        close: s.closed,
        pending: !s.pending.is_empty(),
        broken: s.broken,
    }
}

/// Writes `frames` now if nothing is pending and the socket takes them; keeps the rest pending.
///
/// The `send` goes straight to the socket, not through tokio's readiness: that check reads the
/// socket's registration, one more cache miss per delivery among thousands of connections, to
/// learn what the `send` itself says. When the socket is full, the rest waits for
/// [`Outbound::poll_drain`], which writes through tokio and so learns the socket's readiness
/// from its own `WouldBlock` (one extra `send` in that rare case). Rust programs ignore SIGPIPE,
/// so a peer that is gone is an `EPIPE` here, not a signal.
fn push_bytes(s: &mut QueueState, frames: &[u8]) {
    if s.broken {
        return;
    }
    let mut rest = frames;
    if s.pending.is_empty() {
        if let Some(wire) = &s.wire {
            match socket2::SockRef::from(&**wire).send(frames) {
                Ok(n) => rest = &frames[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => {
                    s.broken = true;
                    return;
                }
            }
        }
    }
    s.pending.extend_from_slice(rest);
}
