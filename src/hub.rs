//! The node's local registry: users → connections → topic filters, and the reference-counted
//! set of broker channels those connections need (DESIGN.md section 2).
//!
//! - A user's channel (`{prefix}:u:{user}`) and tenant's channel (`{prefix}:t:{tenant}`) are
//!   subscribed, and acknowledged, before the connection's handshake completes; `{prefix}:all` is
//!   subscribed for the node's lifetime.
//! - The last release of a channel is delayed (`--unsubscribe-delay`) and re-checked, so a
//!   reconnecting client does not make the channel flap; a failed subscribe is rolled back.
//! - A broker message is decoded once; every local recipient gets the same shared bytes. The
//!   registry lock is a plain mutex, never held across an `.await`; delivering is a queue push.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::broker::{Broker, BrokerError, BrokerFuture, MessageSink};
use crate::disconnect::CloseReason;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::protocol::{self, Endpoint, Kind, ALL_TOPICS};

/// One message waiting to be written to a socket.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub frame: Utf8Bytes,
    /// Publisher's timestamp (µs since the epoch), for the delivery-latency histogram.
    pub published_at: u64,
}

struct QueueState {
    queue: VecDeque<Outgoing>,
    bytes: usize,
    closed: Option<CloseReason>,
    /// The node's heartbeat asks the session to send a ping.
    ping: bool,
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
enum Push {
    Queued,
    /// The queue overflowed just now: the connection is being closed.
    Overflow,
    /// The connection is already closing.
    Closed,
}

impl Outbound {
    fn new(max_messages: usize, max_bytes: usize) -> Outbound {
        Outbound {
            state: Mutex::new(QueueState {
                queue: VecDeque::new(),
                bytes: 0,
                closed: None,
                ping: false,
            }),
            max_messages,
            max_bytes,
            ready: Notify::new(),
            killed: Notify::new(),
        }
    }

    fn push(&self, msg: &Outgoing) -> Push {
        let mut s = self.state.lock();
        if s.closed.is_some() {
            return Push::Closed;
        }
        let len = msg.frame.len();
        if s.queue.len() >= self.max_messages || s.bytes + len > self.max_bytes {
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
        drop(s);
        if was_empty {
            self.ready.notify_one();
        }
        Push::Queued
    }

    /// Moves every queued message into `into` (which must be empty), so the writer can feed them
    /// all and flush once, and says whether to ping or close. Messages queued before a drain
    /// close are still written; an overflow has already discarded the queue.
    pub fn take(&self, into: &mut VecDeque<Outgoing>) -> Wake {
        let mut s = self.state.lock();
        std::mem::swap(&mut s.queue, into);
        s.bytes = 0;
        Wake {
            close: s.closed,
            ping: std::mem::take(&mut s.ping),
        }
    }

    fn request_ping(&self) {
        let mut s = self.state.lock();
        s.ping = true;
        drop(s);
        self.ready.notify_one();
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

/// What the session holds of its connection.
pub struct Connection {
    pub id: u64,
    pub endpoint: Endpoint,
    pub identity: Identity,
    pub outbound: Outbound,
    /// When the peer last sent anything (ms since the epoch), for the node's ping sweep.
    last_seen: AtomicU64,
}

fn now_ms() -> u64 {
    protocol::now_micros() / 1000
}

impl Connection {
    /// Records that the peer is alive (any frame, pongs included).
    pub fn touch(&self) {
        self.last_seen.store(now_ms(), Ordering::Relaxed);
    }
}

/// A connection's topics; `ALL` matches everything.
#[derive(Default)]
struct TopicFilter {
    /// `ALL` is subscribed: the common GrowERP case costs no hashing per delivery.
    all: bool,
    /// An empty set allocates nothing.
    topics: HashSet<Box<str>>,
}

impl TopicFilter {
    fn matches(&self, topic: &str) -> bool {
        self.all || (!self.topics.is_empty() && self.topics.contains(topic))
    }
}

struct ConnEntry {
    conn: Arc<Connection>,
    topics: TopicFilter,
}

struct UserEntry {
    conns: Vec<ConnEntry>,
    tenant: Option<Arc<str>>,
}

#[derive(Default)]
struct ChannelEntry {
    refs: usize,
    confirmed: bool,
}

#[derive(Default)]
struct Inner {
    users: HashMap<Arc<str>, UserEntry>,
    tenants: HashMap<Arc<str>, HashSet<Arc<str>>>,
    channels: HashMap<String, ChannelEntry>,
    /// Channels whose references reached zero, with when they may be unsubscribed.
    lingering: Vec<(String, Instant)>,
    connections: usize,
}

/// The registry is the broker's [`MessageSink`]: it owns no broker, so there is no cycle.
pub struct Registry {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
    prefix: String,
    user_prefix: String,
    tenant_prefix: String,
    all_channel: String,
}

/// Channel names for one installation prefix.
impl Registry {
    pub fn user_channel(&self, user: &str) -> String {
        format!("{}{user}", self.user_prefix)
    }
    pub fn tenant_channel(&self, tenant: &str) -> String {
        format!("{}{tenant}", self.tenant_prefix)
    }
    pub fn all_channel(&self) -> &str {
        &self.all_channel
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

enum Target<'a> {
    User(&'a str),
    Tenant(&'a str),
    All,
}

impl Registry {
    fn target<'a>(&self, channel: &'a str) -> Option<Target<'a>> {
        if let Some(u) = channel.strip_prefix(self.user_prefix.as_str()) {
            Some(Target::User(u))
        } else if let Some(t) = channel.strip_prefix(self.tenant_prefix.as_str()) {
            Some(Target::Tenant(t))
        } else if channel == self.all_channel {
            Some(Target::All)
        } else {
            None
        }
    }
}

impl MessageSink for Registry {
    fn deliver(&self, channels: &[&str], payload: Bytes) {
        self.metrics.broker_received.inc();
        let env = match protocol::decode(payload) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(channel = channels.first().copied().unwrap_or(""), error = %e, "undecodable broker message dropped");
                return;
            }
        };
        let (endpoint, topic) = match env.kind {
            Kind::Notification => (Endpoint::Notws, env.topic.as_str()),
            Kind::Chat => (Endpoint::Chat, ""),
            Kind::Canary => return,
        };
        let msg = Outgoing {
            frame: env.frame.clone(),
            published_at: env.published_at,
        };
        let mut delivered = 0u64;
        let mut overflowed = 0u64;
        let mut dropped = 0u64;
        {
            let inner = self.inner.lock();
            let mut to_user = |user: &UserEntry| {
                for c in &user.conns {
                    if c.conn.endpoint != endpoint
                        || (endpoint == Endpoint::Notws && !c.topics.matches(topic))
                    {
                        continue;
                    }
                    match c.conn.outbound.push(&msg) {
                        Push::Queued => delivered += 1,
                        Push::Overflow => {
                            overflowed += 1;
                            dropped += 1;
                        }
                        Push::Closed => dropped += 1,
                    }
                }
            };
            for channel in channels {
                match self.target(channel) {
                    Some(Target::User(u)) => {
                        if let Some(user) = inner.users.get(u) {
                            to_user(user);
                        }
                    }
                    Some(Target::Tenant(t)) => {
                        if let Some(users) = inner.tenants.get(t) {
                            for u in users {
                                if let Some(user) = inner.users.get(u) {
                                    to_user(user);
                                }
                            }
                        }
                    }
                    Some(Target::All) => {
                        for user in inner.users.values() {
                            to_user(user);
                        }
                    }
                    None => {}
                }
            }
        }
        let m = &self.metrics;
        m.fanout_recipients.observe(delivered as f64);
        if delivered > 0 {
            m.endpoint(endpoint).deliveries.inc_by(delivered);
        }
        if dropped > 0 {
            m.outbound_dropped.inc_by(dropped);
        }
        if overflowed > 0 {
            m.slow_consumer_disconnects.inc_by(overflowed);
        }
    }
}

/// Why a connection could not be registered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegisterError {
    #[error("too many connections for this user on this node")]
    TooManyConnections,
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The hub: registry plus broker.
pub struct Hub {
    registry: Arc<Registry>,
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    max_per_user: usize,
    queue_messages: usize,
    queue_bytes: usize,
    unsubscribe_delay: Duration,
    ping_interval: Duration,
}

/// Limits a hub applies to every connection.
#[derive(Debug, Clone)]
pub struct HubLimits {
    pub max_connections_per_user: usize,
    pub outbound_queue: usize,
    pub outbound_queue_bytes: usize,
    pub unsubscribe_delay: Duration,
    pub ping_interval: Duration,
}

impl Hub {
    /// Builds the registry first, then the broker around it (the broker delivers into it).
    pub fn new(
        prefix: &str,
        metrics: Arc<Metrics>,
        limits: HubLimits,
        make_broker: impl FnOnce(Arc<dyn MessageSink>) -> Arc<dyn Broker>,
    ) -> Arc<Hub> {
        let registry = Arc::new(Registry {
            inner: Mutex::new(Inner::default()),
            metrics: metrics.clone(),
            prefix: prefix.to_owned(),
            user_prefix: format!("{prefix}:u:"),
            tenant_prefix: format!("{prefix}:t:"),
            all_channel: format!("{prefix}:all"),
        });
        let broker = make_broker(registry.clone());
        Arc::new(Hub {
            registry,
            broker,
            metrics,
            next_id: AtomicU64::new(1),
            max_per_user: limits.max_connections_per_user,
            queue_messages: limits.outbound_queue,
            queue_bytes: limits.outbound_queue_bytes,
            unsubscribe_delay: limits.unsubscribe_delay,
            ping_interval: limits.ping_interval,
        })
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Subscribes the node-wide channel and starts the delayed-unsubscribe reaper.
    pub async fn start(self: &Arc<Self>) -> Result<(), BrokerError> {
        let all = self.registry.all_channel.clone();
        let fut = {
            let mut inner = self.registry.inner.lock();
            let e = inner.channels.entry(all.clone()).or_default();
            e.refs += 1;
            e.confirmed = true;
            self.metrics
                .broker_channels
                .set(inner.channels.len() as i64);
            self.broker.subscribe(vec![all])
        };
        tokio::spawn(reaper(Arc::downgrade(self), self.unsubscribe_delay));
        tokio::spawn(heartbeat(Arc::downgrade(self), self.ping_interval));
        // The node may start while the broker is still connecting: the broker restores its set
        // when it comes up, and readiness says 503 meanwhile.
        tokio::spawn(async move {
            if let Err(e) = fut.await {
                tracing::warn!(error = %e, "subscribing the broadcast channel is deferred");
            }
        });
        Ok(())
    }

    /// Registers a connection before its handshake completes: its user's and tenant's channels
    /// are subscribed and acknowledged when this returns, so nothing published afterwards is
    /// missed. The returned guard unregisters on drop.
    pub async fn register(
        self: &Arc<Self>,
        identity: Identity,
        endpoint: Endpoint,
    ) -> Result<Registration, RegisterError> {
        let conn = Arc::new(Connection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            endpoint,
            identity: identity.clone(),
            outbound: Outbound::new(self.queue_messages, self.queue_bytes),
            last_seen: AtomicU64::new(now_ms()),
        });
        let mut channels = vec![self.registry.user_channel(&identity.user_id)];
        if let Some(t) = &identity.tenant_id {
            channels.push(self.registry.tenant_channel(t));
        }
        let (subscribed, online) = {
            let mut inner = self.registry.inner.lock();
            let first = match inner.users.get(&identity.user_id) {
                Some(u) => {
                    if self.max_per_user > 0 && u.conns.len() >= self.max_per_user {
                        return Err(RegisterError::TooManyConnections);
                    }
                    false
                }
                None => true,
            };
            let user = inner
                .users
                .entry(identity.user_id.clone())
                .or_insert_with(|| UserEntry {
                    conns: Vec::new(),
                    tenant: identity.tenant_id.clone(),
                });
            user.conns.push(ConnEntry {
                conn: conn.clone(),
                topics: TopicFilter::default(),
            });
            if let Some(t) = &identity.tenant_id {
                inner
                    .tenants
                    .entry(t.clone())
                    .or_default()
                    .insert(identity.user_id.clone());
            }
            inner.connections += 1;
            let subscribed = self.acquire(&mut inner, &channels);
            let online = first.then(|| self.broker.set_online(identity.user_id.clone(), true));
            (subscribed, online)
        };
        let registration = Registration {
            hub: self.clone(),
            conn,
            channels: channels.clone(),
        };
        // On error the registration is dropped here, which unregisters and releases.
        if let Some(fut) = subscribed {
            fut.await?;
            self.confirm(&channels);
        }
        if let Some(fut) = online {
            fut.await?;
        }
        Ok(registration)
    }

    /// Takes references on channels; returns the broker subscription to await for those that
    /// are not yet confirmed. Called with the registry lock held (ordering contract).
    fn acquire(&self, inner: &mut Inner, channels: &[String]) -> Option<BrokerFuture<()>> {
        let mut need = Vec::new();
        for ch in channels {
            let e = inner.channels.entry(ch.clone()).or_default();
            e.refs += 1;
            if !e.confirmed {
                need.push(ch.clone());
            }
        }
        self.metrics
            .broker_channels
            .set(inner.channels.len() as i64);
        (!need.is_empty()).then(|| self.broker.subscribe(need))
    }

    fn confirm(&self, channels: &[String]) {
        let mut inner = self.registry.inner.lock();
        for ch in channels {
            if let Some(e) = inner.channels.get_mut(ch) {
                if e.refs > 0 {
                    e.confirmed = true;
                }
            }
        }
    }

    fn release(&self, inner: &mut Inner, channels: &[String]) {
        let deadline = Instant::now() + self.unsubscribe_delay;
        for ch in channels {
            if let Some(e) = inner.channels.get_mut(ch) {
                e.refs = e.refs.saturating_sub(1);
                if e.refs == 0 {
                    inner.lingering.push((ch.clone(), deadline));
                }
            }
        }
    }

    /// Unsubscribes channels whose delay ran out and that nobody took again.
    fn reap(&self, now: Instant) {
        let mut inner = self.registry.inner.lock();
        if inner.lingering.is_empty() {
            return;
        }
        let lingering = std::mem::take(&mut inner.lingering);
        let mut gone = Vec::new();
        for (ch, deadline) in lingering {
            let refs = inner.channels.get(&ch).map(|e| e.refs);
            match refs {
                Some(0) if deadline <= now => {
                    inner.channels.remove(&ch);
                    gone.push(ch);
                }
                Some(0) => inner.lingering.push((ch, deadline)),
                _ => {}
            }
        }
        self.metrics
            .broker_channels
            .set(inner.channels.len() as i64);
        if !gone.is_empty() {
            // Queued under the lock: a later subscribe of the same channel comes after it.
            self.broker.unsubscribe(gone);
        }
    }

    fn unregister(&self, conn: &Connection, channels: &[String]) {
        let mut inner = self.registry.inner.lock();
        let user_id = &conn.identity.user_id;
        let mut removed_topics = 0usize;
        let mut found = false;
        let mut last = false;
        if let Some(user) = inner.users.get_mut(user_id) {
            if let Some(pos) = user.conns.iter().position(|c| c.conn.id == conn.id) {
                let entry = user.conns.swap_remove(pos);
                removed_topics = entry.topics.topics.len();
                found = true;
            }
            last = user.conns.is_empty();
        }
        if !found {
            return;
        }
        inner.connections -= 1;
        if last {
            if let Some(user) = inner.users.remove(user_id) {
                if let Some(t) = user.tenant {
                    if let Some(set) = inner.tenants.get_mut(&t) {
                        set.remove(user_id);
                        if set.is_empty() {
                            inner.tenants.remove(&t);
                        }
                    }
                }
            }
            // Presence is exact: the user leaves now, not after the unsubscribe delay.
            drop(self.broker.set_online(user_id.clone(), false));
        }
        self.release(&mut inner, channels);
        self.metrics.topic_subscriptions.sub(removed_topics as i64);
    }

    /// Applies `subscribe:` / `unsubscribe:` topics to a connection.
    pub fn set_topics(&self, conn: &Connection, topics: &[&str], subscribe: bool) {
        let mut inner = self.registry.inner.lock();
        let Some(user) = inner.users.get_mut(&conn.identity.user_id) else {
            return;
        };
        let Some(entry) = user.conns.iter_mut().find(|c| c.conn.id == conn.id) else {
            return;
        };
        let before = entry.topics.topics.len() as i64;
        for t in topics {
            if subscribe {
                entry.topics.topics.insert(Box::from(*t));
            } else {
                entry.topics.topics.remove(*t);
            }
        }
        if entry.topics.topics.is_empty() {
            // Give the memory back: an idle connection should cost as little as possible.
            entry.topics.topics = HashSet::new();
        }
        entry.topics.all = entry.topics.topics.contains(ALL_TOPICS);
        let after = entry.topics.topics.len() as i64;
        self.metrics.topic_subscriptions.add(after - before);
    }

    /// Publishes one envelope to many channels: encoded once, one broker round trip.
    pub async fn publish(&self, channels: Vec<String>, payload: Bytes) -> Result<(), BrokerError> {
        let n = channels.len() as u64;
        let started = Instant::now();
        let result = self.broker.publish(channels, payload).await;
        self.metrics
            .broker_publish_duration
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => self.metrics.broker_published.inc_by(n),
            Err(_) => self.metrics.broker_publish_errors.inc(),
        }
        result
    }

    /// Closes every connection with `reason` (used only when the node stops without a drain).
    pub fn close_all(&self, reason: CloseReason) {
        let inner = self.registry.inner.lock();
        for user in inner.users.values() {
            for c in &user.conns {
                c.conn.outbound.close(reason);
            }
        }
    }

    /// Open connections on this node.
    pub fn connections(&self) -> usize {
        self.registry.inner.lock().connections
    }

    /// Channels this node holds, with their reference counts (tests, debugging).
    pub fn channel_refs(&self) -> Vec<(String, usize)> {
        let inner = self.registry.inner.lock();
        let mut v: Vec<_> = inner
            .channels
            .iter()
            .map(|(k, e)| (k.clone(), e.refs))
            .collect();
        v.sort();
        v
    }
}

async fn reaper(hub: Weak<Hub>, delay: Duration) {
    let tick = (delay / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(hub) = hub.upgrade() else { return };
        hub.reap(Instant::now());
    }
}

/// Ping slots: each connection is pinged in one of these slices of the interval.
const PING_SLOTS: u32 = 32;

/// The node's heartbeat, instead of a timer per connection: every `interval / PING_SLOTS` one
/// slice of the connections (by id) is visited; a peer silent for two intervals is closed (4000),
/// the others are asked to ping. Slicing spreads the pings (one write each) over the interval:
/// pinging 10,000 sockets in one instant costs ~100 ms of CPU that every delivery waits behind.
async fn heartbeat(hub: Weak<Hub>, interval: Duration) {
    let mut tick = tokio::time::interval(interval / PING_SLOTS);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut slot = 0u64;
    loop {
        tick.tick().await;
        slot = (slot + 1) % u64::from(PING_SLOTS);
        let Some(hub) = hub.upgrade() else { return };
        let silent_since = now_ms().saturating_sub(2 * interval.as_millis() as u64);
        let inner = hub.registry.inner.lock();
        for user in inner.users.values() {
            for c in &user.conns {
                if c.conn.id % u64::from(PING_SLOTS) != slot {
                    continue;
                }
                if c.conn.last_seen.load(Ordering::Relaxed) < silent_since {
                    c.conn.outbound.close(CloseReason::PingTimeout);
                } else {
                    c.conn.outbound.request_ping();
                }
            }
        }
    }
}

impl Hub {
    /// Closes every connection with 1012, spread evenly (in random order) over `window`, so
    /// that clients do not all reconnect to the other nodes in the same instant.
    pub async fn drain(&self, window: Duration) {
        use rand::seq::SliceRandom;
        let mut conns: Vec<Arc<Connection>> = {
            let inner = self.registry.inner.lock();
            inner
                .users
                .values()
                .flat_map(|u| u.conns.iter().map(|c| c.conn.clone()))
                .collect()
        };
        conns.shuffle(&mut rand::rng());
        let n = conns.len().max(1) as u32;
        let start = tokio::time::Instant::now();
        for (i, conn) in conns.iter().enumerate() {
            tokio::time::sleep_until(start + window * i as u32 / n).await;
            conn.outbound.close(CloseReason::Drain);
        }
        // Anything registered while the snapshot was taken.
        self.close_all(CloseReason::Drain);
    }
}

/// A registered connection. Dropping it unregisters the connection and releases its channels,
/// whether the socket ran, failed to upgrade, or the registration was abandoned half way.
pub struct Registration {
    hub: Arc<Hub>,
    pub conn: Arc<Connection>,
    channels: Vec<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(&self.conn, &self.channels);
    }
}

impl Registration {
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;

    fn hub(delay_ms: u64) -> (Arc<Hub>, Arc<MemoryBroker>) {
        let metrics = Arc::new(Metrics::new());
        let mut mem = None;
        let hub = Hub::new(
            "t",
            metrics,
            HubLimits {
                max_connections_per_user: 2,
                outbound_queue: 4,
                outbound_queue_bytes: 1 << 20,
                unsubscribe_delay: Duration::from_millis(delay_ms),
                ping_interval: Duration::from_secs(30),
            },
            |sink| {
                let b = Arc::new(MemoryBroker::new(sink));
                mem = Some(b.clone());
                b
            },
        );
        (hub, mem.expect("broker built"))
    }

    fn id(user: &str, tenant: Option<&str>) -> Identity {
        Identity {
            user_id: Arc::from(user),
            tenant_id: tenant.map(Arc::from),
        }
    }

    #[tokio::test]
    async fn channels_are_reference_counted_and_released_after_the_delay() {
        let (hub, mem) = hub(50);
        hub.start().await.expect("start");
        let a = hub
            .register(id("u1", Some("T")), Endpoint::Notws)
            .await
            .expect("register");
        let b = hub
            .register(id("u1", Some("T")), Endpoint::Chat)
            .await
            .expect("register");
        let mut chans = mem.channels();
        chans.sort();
        assert_eq!(chans, vec!["t:all", "t:t:T", "t:u:u1"]);
        drop(a);
        assert!(mem.channels().contains(&"t:u:u1".to_string()));
        drop(b);
        // Still there during the delay...
        assert!(mem.channels().contains(&"t:u:u1".to_string()));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(mem.channels(), vec!["t:all"]);
    }

    #[tokio::test]
    async fn reconnect_within_the_delay_keeps_the_channel() {
        let (hub, mem) = hub(200);
        hub.start().await.expect("start");
        let a = hub
            .register(id("u1", None), Endpoint::Notws)
            .await
            .expect("register");
        drop(a);
        let _b = hub
            .register(id("u1", None), Endpoint::Notws)
            .await
            .expect("register");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(mem.channels().contains(&"t:u:u1".to_string()));
        assert_eq!(
            hub.channel_refs(),
            vec![("t:all".to_string(), 1), ("t:u:u1".to_string(), 1)]
        );
    }

    #[tokio::test]
    async fn per_user_limit() {
        let (hub, _) = hub(10);
        let _a = hub.register(id("u", None), Endpoint::Notws).await;
        let _b = hub.register(id("u", None), Endpoint::Notws).await;
        assert!(matches!(
            hub.register(id("u", None), Endpoint::Notws).await,
            Err(RegisterError::TooManyConnections)
        ));
    }

    #[tokio::test]
    async fn topic_filter_and_shared_bytes() {
        let (hub, _) = hub(10);
        hub.start().await.expect("start");
        let a = hub
            .register(id("u", None), Endpoint::Notws)
            .await
            .expect("register");
        let b = hub
            .register(id("u", None), Endpoint::Notws)
            .await
            .expect("register");
        hub.set_topics(&a.conn, &["A", "B"], true);
        hub.set_topics(&b.conn, &["ALL"], true);
        for topic in ["A", "C"] {
            let frame = format!(r#"{{"topic":"{topic}"}}"#);
            let env = protocol::encode(Kind::Notification, topic, frame.as_bytes());
            hub.publish(vec!["t:u:u".into()], env)
                .await
                .expect("publish");
        }
        let mut qa = VecDeque::new();
        let mut qb = VecDeque::new();
        assert_eq!(a.conn.outbound.take(&mut qa), Wake::default());
        assert_eq!(b.conn.outbound.take(&mut qb), Wake::default());
        assert_eq!(qa.len(), 1);
        assert_eq!(qb.len(), 2);
        assert_eq!(qa[0].frame.as_str(), r#"{"topic":"A"}"#);
        // Same allocation handed to both recipients.
        assert_eq!(qa[0].frame.as_ptr(), qb[0].frame.as_ptr());
    }

    #[tokio::test]
    async fn overflow_closes_as_slow_consumer() {
        let (hub, _) = hub(10);
        hub.start().await.expect("start");
        let a = hub
            .register(id("u", None), Endpoint::Notws)
            .await
            .expect("register");
        hub.set_topics(&a.conn, &["ALL"], true);
        for _ in 0..10 {
            let env = protocol::encode(Kind::Notification, "X", b"{}");
            hub.publish(vec!["t:u:u".into()], env)
                .await
                .expect("publish");
        }
        let mut q = VecDeque::new();
        let wake = a.conn.outbound.take(&mut q);
        assert_eq!(wake.close, Some(CloseReason::SlowConsumer));
        assert!(q.is_empty(), "an overflow discards the queue");
    }
}
