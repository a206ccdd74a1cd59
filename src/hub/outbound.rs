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
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::disconnect::CloseReason;
use crate::metrics::{BulkCounts, Metrics};
use crate::protocol;

/// A connection's socket, shared by its session (which reads it) and its outbound queue (which
/// writes it).
pub type Wire = Arc<TcpStream>;

/// Pending bytes kept allocated after they are written: a burst's buffer goes back.
const KEPT_PENDING: usize = 16 * 1024;

/// What a run of socket writes shares: one framing buffer, and the write histograms, added to
/// the registry's once at the end of the run (on drop), not with shared atomics per message.
pub struct Writes<'m> {
    metrics: &'m Metrics,
    frames: Vec<u8>,
    /// Microseconds from publish to write, per message.
    latency: BulkCounts,
    /// Messages per write.
    batch: BulkCounts,
    /// The clock for the latency histogram, read once per [`CLOCK_EVERY`] writes: a run of
    /// writes lasts about a millisecond, and reading the clock per connection was a visible
    /// share of the fan-out's own CPU.
    now: u64,
    until_clock: u32,
}

/// Writes between two readings of the clock (about 0.1 ms of `send`s).
const CLOCK_EVERY: u32 = 16;

impl Writes<'_> {
    pub fn new(metrics: &Metrics) -> Writes<'_> {
        Writes {
            metrics,
            frames: Vec::new(),
            latency: BulkCounts::default(),
            batch: BulkCounts::default(),
            now: 0,
            until_clock: 0,
        }
    }

    fn now(&mut self) -> u64 {
        if self.until_clock == 0 {
            self.now = protocol::now_micros();
            self.until_clock = CLOCK_EVERY;
        }
        self.until_clock -= 1;
        self.now
    }
}

impl Drop for Writes<'_> {
    /// The run's observations go to the node's histograms together.
    fn drop(&mut self) {
        self.metrics.delivery_latency.add(&self.latency);
        self.metrics.write_batch_messages.add(&self.batch);
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

/// The queue's state, laid out for the fan-out. With `Outbound` and `Connection` first in their
/// structs (`repr(C)`), and jemalloc's class for a `Connection` a multiple of 64 bytes (so its
/// blocks start on a cache line):
/// - line 1: the `Arc`'s reference counts, the lock, the byte count and the rest of the queue;
/// - line 2: the oldest queued message ([`Queue`]);
/// - line 3: the bounds, the socket, the flags and the pending buffer's pointer and length.
///
/// A delivery among thousands of cold connections then reads three neighbouring lines of its
/// connection and nothing else, and the fan-out prefetches them ([`Outbound::prefetch`]).
#[repr(C)]
struct QueueState {
    bytes: usize,
    queue: Queue,
    max_messages: usize,
    max_bytes: usize,
    /// Room a resume replay takes on top of the bounds, until the writer first takes the queue.
    extra_messages: usize,
    extra_bytes: usize,
    /// `wire`'s descriptor (-1 without one), kept beside the queue: the direct write then reads
    /// no memory of the socket's own, one cache miss less per delivery.
    fd: RawFd,
    closed: Option<CloseReason>,
    /// The node's heartbeat wants a ping sent (with the next write, or alone when it says so).
    ping: bool,
    /// A write failed: the socket is gone.
    broken: bool,
    /// The socket, while the session runs (none in the hub's unit tests).
    wire: Option<Wire>,
    /// Frames accepted for the socket that it has not taken yet: written before anything
    /// else, by the session. Counted against the byte bound.
    pending: BytesMut,
}

/// The queued messages: the oldest inside the state itself (the allocation's second line), the
/// others in a `VecDeque`. A connection that gets one message at a time, the usual case, then
/// never allocates for its queue, and its delivery reads no memory outside its `Connection`.
/// Invariant: without a `first`, `rest` is empty (messages are only ever taken all at once).
#[repr(C)]
#[derive(Default)]
struct Queue {
    rest: VecDeque<Outgoing>,
    first: Option<Outgoing>,
}

impl Queue {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn push_back(&mut self, msg: Outgoing) {
        if self.first.is_none() {
            self.first = Some(msg);
        } else {
            self.rest.push_back(msg);
        }
    }

    /// Takes every message, oldest first.
    fn drain(&mut self) -> impl Iterator<Item = Outgoing> + '_ {
        self.first.take().into_iter().chain(self.rest.drain(..))
    }

    /// Hands every message to `f`, oldest first, as [`drain`](Self::drain) would. For the
    /// socket writes: an isolated delivery queues one message, and the chained iterator, with
    /// `VecDeque::drain` of the empty rest, cost about 80 instructions per delivery to build
    /// and drop (callgrind, `loadtest/instructions.sh`); the rest is drained only when it holds
    /// any.
    fn drain_each(&mut self, mut f: impl FnMut(Outgoing)) {
        if let Some(first) = self.first.take() {
            f(first);
        }
        if !self.rest.is_empty() {
            self.rest.drain(..).for_each(f);
        }
    }

    /// After the queue was emptied: a burst that grew it gives the memory back, so that idle
    /// connections keep none.
    fn release_burst(&mut self) {
        if self.rest.capacity() > 64 {
            self.rest = VecDeque::new();
        }
    }

    fn from_deque(mut rest: VecDeque<Outgoing>) -> Queue {
        Queue {
            first: rest.pop_front(),
            rest,
        }
    }
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
#[repr(C)]
pub struct Outbound {
    /// First: see [`QueueState`].
    state: Mutex<QueueState>,
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
                queue: Queue::default(),
                bytes: 0,
                max_messages,
                max_bytes,
                closed: None,
                ping: false,
                extra_messages: 0,
                extra_bytes: 0,
                wire: None,
                fd: -1,
                pending: BytesMut::new(),
                broken: false,
            }),
            ready: Notify::new(),
            killed: Notify::new(),
        }
    }

    /// Queues a message without waking the writer; [`Push::First`] says a wake is owed.
    pub(super) fn push(&self, msg: Outgoing) -> Push {
        let mut s = self.state.lock();
        if s.closed.is_some() {
            return Push::Closed;
        }
        let len = msg.frame.len();
        if s.queue.len() >= s.max_messages + s.extra_messages
            || s.bytes + s.pending.len() + len > s.max_bytes + s.extra_bytes
        {
            s.closed = Some(CloseReason::SlowConsumer);
            s.queue = Queue::default();
            s.bytes = 0;
            drop(s);
            self.ready.notify_one();
            self.killed.notify_one();
            return Push::Overflow;
        }
        let was_empty = s.queue.is_empty();
        s.bytes += len;
        s.queue.push_back(msg);
        if was_empty {
            Push::First
        } else {
            Push::Queued
        }
    }

    /// Starts loading the queue's state (the three lines [`QueueState`] describes) into the CPU
    /// cache: the reader asks for the recipients of a run of messages before delivering them
    /// (`MessageSink::warm`), and the fan-out's writes for the next connection while the
    /// kernel takes the current one's `send`. Only a hint; it reads nothing the program sees.
    pub(super) fn prefetch(&self) {
        prefetch_lines(std::ptr::from_ref(&self.state).cast(), 3 * 64);
    }

    /// Wakes the writer for what [`push`](Self::push) queued.
    pub(super) fn wake(&self) {
        self.ready.notify_one();
    }

    /// Gives the queue its socket: from now on queued messages are written straight into it.
    pub fn attach(&self, wire: Wire) {
        let mut s = self.state.lock();
        s.fd = wire.as_raw_fd();
        s.wire = Some(wire);
    }

    /// Lets go of the socket (the session ends), so it closes with the session.
    pub fn detach(&self) {
        let mut s = self.state.lock();
        s.wire = None;
        s.fd = -1;
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
        into.extend(s.queue.drain());
        s.queue.release_burst();
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
        let mut live = std::mem::take(&mut s.queue);
        let replay_bytes: usize = replay.iter().map(|m| m.frame.len()).sum();
        s.extra_messages = replay.len();
        s.extra_bytes = replay_bytes;
        let mut queue: VecDeque<Outgoing> = replay.into();
        let mut bytes = replay_bytes;
        for m in live.drain() {
            let copy = m
                .position
                .is_some_and(|(slot, p)| reached[slot as usize].is_some_and(|r| p <= r));
            if !copy {
                bytes += m.frame.len();
                queue.push_back(m);
            }
        }
        s.queue = Queue::from_deque(queue);
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

/// Starts loading the cache lines of the `len` bytes at `start` (at most a few lines: one hint
/// per line). Only a hint; it reads nothing the program sees.
pub(super) fn prefetch_lines(start: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = start.cast::<i8>();
        let mut offset = 0;
        while offset < len {
            // SAFETY: SSE is part of x86_64's baseline, and a prefetch cannot fault, whatever
            // the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset)) };
            offset += 64;
        }
        if len > 0 {
            // The last line, when the bytes do not start on a line boundary.
            // SAFETY: as above.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(len - 1)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, len);
}

/// Frames everything queued (and a wanted ping) and hands it to the socket.
fn write_locked(s: &mut QueueState, writes: &mut Writes) -> Flushed {
    let n = s.queue.len();
    let ping = std::mem::take(&mut s.ping);
    if n > 0 || ping {
        let mut frames = std::mem::take(&mut writes.frames);
        frames.clear();
        frames.reserve(s.bytes + n * protocol::MAX_FRAME_HEADER + protocol::PING_FRAME.len());
        let now = writes.now();
        s.queue.drain_each(|msg| {
            protocol::put_text_frame(&mut frames, msg.frame.as_str().as_bytes());
            let micros = now.saturating_sub(msg.published_at);
            writes
                .metrics
                .delivery_latency
                .count(&mut writes.latency, micros);
        });
        if ping {
            frames.extend_from_slice(&protocol::PING_FRAME);
        }
        if n > 0 {
            writes
                .metrics
                .write_batch_messages
                .count(&mut writes.batch, n as u64);
        }
        s.bytes = 0;
        s.extra_messages = 0;
        s.extra_bytes = 0;
        s.queue.release_burst();
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
/// from its own `WouldBlock` (one extra `send` in that rare case). `MSG_NOSIGNAL`: a peer that
/// is gone is an `EPIPE` here, not a signal.
fn push_bytes(s: &mut QueueState, frames: &[u8]) {
    if s.broken {
        return;
    }
    let mut rest = frames;
    if s.pending.is_empty() && s.fd >= 0 {
        {
            // SAFETY: `fd` is the descriptor of `wire`, which this same state holds (and so
            // keeps open) for as long as `fd` is set; both change only under the queue's lock,
            // which the caller holds.
            let fd = unsafe { BorrowedFd::borrow_raw(s.fd) };
            match rustix::net::send(fd, frames, rustix::net::SendFlags::NOSIGNAL) {
                Ok(n) => rest = &frames[n..],
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                Err(_) => {
                    s.broken = true;
                    return;
                }
            }
        }
    }
    if !rest.is_empty() {
        s.pending.extend_from_slice(rest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    fn msg(text: &str) -> Outgoing {
        Outgoing {
            frame: Utf8Bytes::from(text.to_owned()),
            published_at: 0,
            position: None,
        }
    }

    fn texts(q: &mut Queue) -> Vec<String> {
        q.drain().map(|m| m.frame.as_str().to_owned()).collect()
    }

    #[test]
    fn the_queue_keeps_its_oldest_message_inline_and_its_order() {
        let mut q = Queue::default();
        assert!(q.is_empty());
        q.push_back(msg("a"));
        assert_eq!(
            (q.len(), q.rest.capacity()),
            (1, 0),
            "one message allocates nothing"
        );
        q.push_back(msg("b"));
        q.push_back(msg("c"));
        assert_eq!(q.len(), 3);
        assert_eq!(texts(&mut q), ["a", "b", "c"]);
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
        let mut q = Queue::from_deque(VecDeque::from([msg("x"), msg("y")]));
        q.push_back(msg("z"));
        assert_eq!(texts(&mut q), ["x", "y", "z"]);
        let mut q = Queue::from_deque(VecDeque::new());
        assert!(q.is_empty());
        for i in 0..100 {
            q.push_back(msg(&i.to_string()));
        }
        q.drain().for_each(drop);
        q.release_burst();
        assert_eq!(q.rest.capacity(), 0, "a burst's memory goes back");
    }

    /// The layout `QueueState` describes: behind an `Arc`'s two counts and the lock, everything
    /// a delivery reads fits in the allocation's first three lines.
    #[test]
    fn a_deliverys_fields_fit_in_three_cache_lines() {
        let counts = 2 * size_of::<usize>();
        let state =
            offset_of!(crate::hub::registry::Connection, outbound) + offset_of!(Outbound, state);
        assert_eq!(state, 0);
        let at = |field: usize| {
            counts + size_of::<Mutex<QueueState>>() - size_of::<QueueState>() + field
        };
        let first = offset_of!(QueueState, queue) + offset_of!(Queue, first);
        assert_eq!(at(first), 64, "the oldest message fills the second line");
        assert_eq!(size_of::<Option<Outgoing>>(), 64);
        // The pending buffer's first words (pointer and length) are read by every delivery, its
        // storage only while bytes are pending.
        let hot_end = offset_of!(QueueState, pending) + 2 * size_of::<usize>();
        assert!(at(hot_end) <= 192, "{}", at(hot_end));
    }
}
