//! A connection's bounded outbound queue: what the fan-out pushes and the session writes.

use std::collections::VecDeque;

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::disconnect::CloseReason;

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
}

/// What the writer finds when it wakes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wake {
    /// Close the connection with this reason after writing what was taken.
    pub close: Option<CloseReason>,
    /// Send a ping.
    pub ping: bool,
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
            || s.bytes + len > self.max_bytes + s.extra_bytes
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
