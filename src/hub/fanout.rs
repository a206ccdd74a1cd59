//! Fan-out: a broker message is decoded once and the same shared bytes are pushed into the queue
//! of every local recipient, under one registry lock. The message's position is recorded per
//! channel in the registry (for a drained connection's resume record) and travels with each
//! queued copy (a few copied bytes, no allocation), so a resumed connection can drop live
//! copies of what it replayed.
//!
//! Writing happens after the broker's batch (`MessageSink::flush`), not per message: the
//! registry lock is released first, and a connection that got several messages of one batch
//! gets them all with one system call, made here, straight into its socket; its session task is
//! woken only when the socket does not take them at once.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::MutexGuard;

use super::channel::Channel;
use super::outbound::{Outgoing, Push, Writes};
use super::registry::{ConnEntry, Connection, Inner, Position, Registry, UserEntry};
use super::resume::Slot;
use super::users::Hashed;
use crate::broker::{self as broker, MessageSink, Recent, StreamId, Verdict};
use crate::metrics::{BulkCounts, Metrics};
use crate::protocol::{self, Endpoint, Envelope, Kind};

#[derive(Default)]
struct Counts {
    delivered: u64,
    overflowed: u64,
    dropped: u64,
}

/// What the fan-out counted since the broker's last flush. A message to one user is one
/// delivery: counted here under the registry lock already held, and added to the shared
/// metrics once per batch, not with a few atomic additions per message.
#[derive(Default)]
pub(super) struct Tally {
    received: u64,
    /// Deliveries per endpoint (`/notws`, `/chat`).
    delivered: [u64; 2],
    overflowed: u64,
    dropped: u64,
    recipients: BulkCounts,
}

impl Tally {
    fn add(&mut self, m: &Metrics, endpoint: Endpoint, n: &Counts) {
        m.fanout_recipients.count(&mut self.recipients, n.delivered);
        self.delivered[endpoint as usize] += n.delivered;
        self.overflowed += n.overflowed;
        self.dropped += n.dropped;
    }

    fn publish(self, m: &Metrics) {
        if self.received > 0 {
            m.broker_received.inc_by(self.received);
        }
        for (endpoint, n) in [Endpoint::Notws, Endpoint::Chat]
            .into_iter()
            .zip(self.delivered)
        {
            if n > 0 {
                m.endpoint(endpoint).deliveries.inc_by(n);
            }
        }
        if self.dropped > 0 {
            m.outbound_dropped.inc_by(self.dropped);
        }
        if self.overflowed > 0 {
            m.slow_consumer_disconnects.inc_by(self.overflowed);
        }
        m.fanout_recipients.add(&self.recipients);
    }
}

/// Envelopes decoded last, by the payload they were decoded from. The broker hands a payload
/// that many messages repeat (a publish to many users, or each of a burst's) out as the same
/// shared bytes (`broker/payloads.rs`), so it is decoded, its text checked, once; as many are
/// kept as the broker keeps payloads, so a burst is also decoded once per payload.
#[derive(Default)]
pub(super) struct Decoded(Recent<(Bytes, Envelope)>);

impl Decoded {
    /// The envelope of `payload`: a kept one if these are the same bytes (the same memory,
    /// which a kept payload keeps from being reused), else decoded and kept.
    /// Lent, not cloned: a clone and its drop are four atomic operations on the payload's
    /// shared count, per message.
    fn decode(&mut self, payload: &Bytes) -> Result<&Envelope, protocol::EnvelopeError> {
        let same = |(bytes, _): &(Bytes, Envelope)| {
            bytes.as_ptr() == payload.as_ptr() && bytes.len() == payload.len()
        };
        let (key, weight) = (payload.as_ptr() as u64, payload.len());
        let kept = self.0.find_or_keep(key, weight, same, || {
            protocol::decode(payload.clone()).map(|env| (payload.clone(), env))
        })?;
        Ok(&kept.1)
    }
}

/// Queues `msg` for the user's connections of `endpoint` whose topics match. An owned `msg` goes
/// itself to the last of them, the others get clones: most users hold one connection, and a
/// clone and its drop are two atomic operations on the payload's shared count, per delivery.
/// A lent one is cloned only for a connection that takes it.
fn to_user(
    user: &UserEntry,
    msg: Cow<'_, Outgoing>,
    endpoint: Endpoint,
    topic: &str,
    n: &mut Counts,
    wakes: &mut Vec<Arc<Connection>>,
) {
    let wanted = |c: &&ConnEntry| {
        c.endpoint == endpoint && (endpoint != Endpoint::Notws || c.topics.matches(topic))
    };
    let mut matching = user.conns.iter().filter(wanted).peekable();
    let mut msg = Some(msg);
    while let Some(c) = matching.next() {
        let one = if matching.peek().is_some() {
            msg.as_deref().cloned()
        } else {
            msg.take().map(Cow::into_owned)
        };
        let Some(one) = one else { return };
        match c.conn.outbound.push(one) {
            Push::Queued => n.delivered += 1,
            Push::First => {
                n.delivered += 1;
                wakes.push(c.conn.clone());
            }
            Push::Overflow => {
                n.overflowed += 1;
                n.dropped += 1;
            }
            Push::Closed => n.dropped += 1,
        }
    }
}

/// Records `position` (if any) as the channel's last delivered one, only forwards.
fn advance(slot: &mut Position, position: Option<StreamId>) {
    if let Some(p) = position {
        slot.with(|last| broker::advance(last, p));
    }
}

/// What a received payload asks of the fan-out.
enum Opened<'e> {
    /// Queue the message (its position not yet set) for the connections of the endpoint whose
    /// topics match (the topic borrowed from the kept envelope).
    Deliver(Outgoing, Endpoint, &'e str),
    /// Apply a revocation, if it could be read, once the registry lock is released.
    Revoke(Option<super::Revocation>),
    /// Nothing to deliver: a canary, or a payload that does not decode (logged).
    Nothing,
}

/// Decodes a received payload (once per payload, `Decoded`) into what it asks for.
fn open<'e>(decoded: &'e mut Decoded, payload: &Bytes, channel: &str) -> Opened<'e> {
    let env = match decoded.decode(payload) {
        Ok(env) => env,
        Err(e) => {
            tracing::warn!(channel, error = %e, "undecodable broker message dropped");
            return Opened::Nothing;
        }
    };
    let (endpoint, topic) = match env.kind {
        Kind::Notification => (Endpoint::Notws, env.topic.as_str()),
        Kind::Chat => (Endpoint::Chat, ""),
        Kind::Canary => return Opened::Nothing,
        Kind::Revoke => return Opened::Revoke(super::Revocation::decode(&env.topic, &env.frame)),
    };
    let msg = Outgoing {
        frame: env.frame.clone(),
        published_at: env.published_at,
        position: None,
    };
    Opened::Deliver(msg, endpoint, topic)
}

impl Registry {
    /// Applies a revocation read from the everyone channel (called without the registry lock).
    fn apply(&self, revocation: Option<super::Revocation>) {
        if let Some(r) = revocation {
            self.revoke(&r);
        }
    }

    /// The recorded position of a channel the registry holds: a user's or a tenant's channel
    /// while its entry exists (until the channel's unsubscribe, `Hub::poll_reap`), the node-wide
    /// one always.
    fn slot<'a>(&self, inner: &'a mut Inner, channel: &str) -> Option<&'a mut Position> {
        match self.names.parse(channel)? {
            Channel::User(u) => inner.users.get_mut(u).map(|e| &mut e.position),
            Channel::Tenant(t) => inner.tenants.get_mut(t).map(|e| &mut e.position),
            Channel::Everyone => Some(&mut inner.everyone_position),
        }
    }

    /// [`MessageSink::deliver`] with the registry locked.
    fn deliver_locked(
        &self,
        mut guard: MutexGuard<'_, Inner>,
        channels: &[&str],
        payload: Bytes,
        position: Option<StreamId>,
    ) {
        let inner = &mut *guard;
        inner.tally.received += 1;
        let channel = channels.first().copied().unwrap_or("");
        let (mut msg, endpoint, topic) = match open(&mut inner.decoded, &payload, channel) {
            Opened::Deliver(msg, endpoint, topic) => (msg, endpoint, topic),
            Opened::Revoke(revocation) => {
                drop(guard);
                self.apply(revocation);
                return;
            }
            Opened::Nothing => return,
        };
        let mut n = Counts::default();
        for channel in channels {
            match self.names.parse(channel) {
                Some(Channel::User(u)) => {
                    if let Some(user) = inner.users.get_mut(u) {
                        advance(&mut user.position, position);
                        msg.position = position.map(|p| (Slot::User, p));
                        let m = Cow::Borrowed(&msg);
                        to_user(user, m, endpoint, topic, &mut n, &mut inner.wakes);
                    }
                }
                Some(Channel::Tenant(t)) => {
                    if let Some(users) = inner.tenants.get_mut(t) {
                        advance(&mut users.position, position);
                        msg.position = position.map(|p| (Slot::Tenant, p));
                        for u in &users.users {
                            if let Some(user) = inner.users.get(u) {
                                let m = Cow::Borrowed(&msg);
                                to_user(user, m, endpoint, topic, &mut n, &mut inner.wakes);
                            }
                        }
                    }
                }
                Some(Channel::Everyone) => {
                    advance(&mut inner.everyone_position, position);
                    msg.position = position.map(|p| (Slot::Everyone, p));
                    for user in inner.users.values() {
                        let m = Cow::Borrowed(&msg);
                        to_user(user, m, endpoint, topic, &mut n, &mut inner.wakes);
                    }
                }
                None => {}
            }
        }
        inner.tally.add(&self.metrics, endpoint, &n);
    }
}

impl MessageSink for Registry {
    fn deliver(&self, channels: &[&str], payload: Bytes, position: Option<StreamId>) {
        self.deliver_locked(self.inner.lock(), channels, payload, position);
    }

    /// One look-up of the user for the common message, a notification to one user: its entry
    /// holds both the channel's position and the connections.
    fn admit(
        &self,
        channel: &str,
        payload: &Bytes,
        prev: Option<StreamId>,
        id: Option<StreamId>,
    ) -> Verdict {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let Some(Channel::User(u)) = self.names.parse(channel) else {
            // Tenants' and the node-wide channel: judged, then delivered as by `deliver`.
            let verdict = match self.slot(inner, channel) {
                Some(last) => last.with(|last| broker::judge(last, prev, id)),
                None => Verdict::Deliver,
            };
            if verdict == Verdict::Deliver {
                self.deliver_locked(guard, &[channel], payload.clone(), id);
            }
            return verdict;
        };
        let Some(user) = inner.users.get_mut(u) else {
            // Not held (any more): nobody to deliver to, nothing to judge.
            inner.tally.received += 1;
            return Verdict::Deliver;
        };
        let verdict = user.position.with(|last| broker::judge(last, prev, id));
        if verdict != Verdict::Deliver {
            return verdict;
        }
        inner.tally.received += 1;
        let (mut msg, endpoint, topic) = match open(&mut inner.decoded, payload, channel) {
            Opened::Deliver(msg, endpoint, topic) => (msg, endpoint, topic),
            Opened::Revoke(revocation) => {
                drop(guard);
                self.apply(revocation);
                return verdict;
            }
            Opened::Nothing => return verdict,
        };
        msg.position = id.map(|p| (Slot::User, p));
        let mut n = Counts::default();
        to_user(
            user,
            Cow::Owned(msg),
            endpoint,
            topic,
            &mut n,
            &mut inner.wakes,
        );
        inner.tally.add(&self.metrics, endpoint, &n);
        verdict
    }

    fn position(&self, channel: &str) -> Option<StreamId> {
        self.slot(&mut self.inner.lock(), channel)
            .and_then(|last| last.get())
    }

    fn record(&self, channel: &str, id: StreamId) {
        if let Some(last) = self.slot(&mut self.inner.lock(), channel) {
            last.with(|last| broker::advance(last, id));
        }
    }

    fn holds(&self, channel: &str) -> bool {
        self.slot(&mut self.inner.lock(), channel).is_some()
    }

    fn known(&self) -> Vec<(String, StreamId)> {
        let inner = self.inner.lock();
        let users = inner
            .users
            .iter()
            .filter_map(|(u, e)| Some((self.names.render(Channel::User(u)), e.position.get()?)));
        let tenants = inner
            .tenants
            .iter()
            .filter_map(|(t, e)| Some((self.names.render(Channel::Tenant(t)), e.position.get()?)));
        let everyone = inner
            .everyone_position
            .get()
            .map(|p| (self.names.render(Channel::Everyone), p));
        users.chain(tenants).chain(everyone).collect()
    }

    fn warm(&self, channels: &[&str]) {
        let inner = self.inner.lock();
        // Three passes, each issuing the fetches the next one reads: the run waits for memory
        // about once per pass, not once per message (`users.rs`). Each name is parsed and
        // hashed once.
        let run: smallvec::SmallVec<[(&str, Hashed); WARM_RUN]> = channels
            .iter()
            .filter_map(|channel| match self.names.parse(channel) {
                Some(Channel::User(u)) => Some((u, inner.users.prefetch_bucket(u))),
                _ => None,
            })
            .collect();
        for &(_, hash) in &run {
            inner.users.prefetch(hash);
        }
        // The prefetch took the whole slot, not just the key the look-up compares: the
        // delivery also reads the connection's filter and writes the user's position.
        for (u, hash) in run {
            if let Some(user) = inner.users.get_hashed(u, hash) {
                for c in &user.conns {
                    c.conn.outbound.prefetch();
                }
            }
        }
    }

    fn flush(&self) {
        let (mut wakes, share_out) = {
            let mut inner = self.inner.lock();
            std::mem::take(&mut inner.tally).publish(&self.metrics);
            (std::mem::take(&mut inner.wakes), inner.write_load.share_out)
        };
        if wakes.is_empty() {
            return;
        }
        let batch = wakes.len();
        if share_out && batch > WRITES_PER_TASK {
            // The reader cannot keep up writing alone: a large batch (a publish to many local
            // users) is shared out among tasks, so that every worker thread sends.
            // The connections move to their task, not cloned: a clone and a drop are two
            // atomic operations on each connection's counter, from two threads.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let mut rest = wakes.split_off(WRITES_PER_TASK);
                while !rest.is_empty() {
                    let tail = rest.split_off(rest.len().min(WRITES_PER_TASK));
                    let (chunk, metrics) = (rest, self.metrics.clone());
                    runtime.spawn(async move { write_owed(&chunk, &metrics) });
                    rest = tail;
                }
            }
        }
        let start = Instant::now();
        write_owed(&wakes, &self.metrics);
        let now = Instant::now();
        // What the whole batch's writes take on one thread, from the part written here.
        let took = (now - start).mul_f64(batch as f64 / wakes.len() as f64);
        wakes.clear();
        let mut inner = self.inner.lock();
        inner.write_load.record(now, took);
        // The emptied buffer goes back for the next batch, unless a huge batch grew it.
        if wakes.capacity() <= MAX_KEPT_WAKES && inner.wakes.is_empty() {
            inner.wakes = wakes;
        }
    }
}

/// How much of the broker reader's time its writes took lately. The reader writes a batch's
/// sockets itself, and only while writing takes most of its time are large batches shared out
/// among the runtime's threads. Shared out always, every large batch paid for waking another
/// thread and for the connections' cache lines moving to it: at 25,000 deliveries/s (1,000
/// recipients per publish), where one thread writes everything with time to spare, that was
/// about 6 % more user CPU per delivery.
#[derive(Default)]
pub(super) struct WriteLoad {
    window: Option<Instant>,
    busy: Duration,
    share_out: bool,
}

impl WriteLoad {
    /// How often the decision is made again.
    const WINDOW: Duration = Duration::from_millis(100);

    /// Adds a batch's writes (`took`, as if written on one thread) that ended at `now`; at the
    /// end of a window, large batches are shared out from then on if writes took more than half
    /// of it.
    fn record(&mut self, now: Instant, took: Duration) {
        let start = *self.window.get_or_insert(now);
        self.busy += took;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= Self::WINDOW {
            self.share_out = self.busy * 2 > elapsed;
            self.window = Some(now);
            self.busy = Duration::ZERO;
        }
    }
}

/// Writes what is owed to each connection straight into its socket; the session is woken only
/// for what the socket does not take at once (a full socket buffer), a close, or a connection
/// without a socket yet.
fn write_owed(conns: &[Arc<Connection>], metrics: &Metrics) {
    let mut writes = Writes::new(metrics);
    for (i, conn) in conns.iter().enumerate() {
        if let Some(next) = conns.get(i + 1) {
            next.outbound.prefetch();
        }
        if !conn.outbound.write_through(&mut writes) {
            conn.outbound.wake();
        }
    }
}

/// Wake-up buffer kept between batches (entries; 8 bytes each).
const MAX_KEPT_WAKES: usize = 4096;

/// Names the look-ahead keeps on the stack: the broker's runs are of 16 messages
/// (`broker/subscription.rs`); a longer run spills to the heap.
const WARM_RUN: usize = 16;

/// Connections one task writes after a batch: about a millisecond of `send`s.
const WRITES_PER_TASK: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_shared_out_only_while_they_take_most_of_the_readers_time() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut load = WriteLoad::default();
        load.record(t0, ms(5));
        assert!(!load.share_out, "nothing is decided before a window ends");
        load.record(t0 + ms(100), ms(70));
        assert!(load.share_out, "75 ms of writes in 100 ms");
        load.record(t0 + ms(150), ms(10));
        assert!(load.share_out, "kept until the window ends");
        load.record(t0 + ms(200), ms(10));
        assert!(!load.share_out, "20 ms of writes in 100 ms");
    }
}
