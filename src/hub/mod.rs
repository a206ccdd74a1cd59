//! The node's local registry: users → connections → topic filters, and the reference-counted
//! set of broker channels those connections need (DESIGN.md section 2).
//!
//! - A user's channel (`{prefix}:u:{user}`) and tenant's channel (`{prefix}:t:{tenant}`) are
//!   subscribed, and acknowledged, before the connection's handshake completes; `{prefix}:all` is
//!   subscribed for the node's lifetime.
//! - The last release of a channel is delayed (`--unsubscribe-delay`), so a reconnecting client
//!   does not make the channel flap; a failed subscribe is rolled back.
//! - A broker message is decoded once; every local recipient gets the same shared bytes. The
//!   registry lock is a plain mutex, never held across an `.await`; delivering is a queue push.
//! - The registry is the node's one record of what it delivered: each held channel's last
//!   position, beside its recipients, read by the broker to judge and recover (`fanout.rs`). A
//!   user's and a tenant's entries therefore last as long as their channel, lingering included.

//!
//! Parts: [`outbound`] (a connection's bounded queue), [`registry`] (users, connections, topic
//! filters), `users` (the user table, prefetched ahead of a run), `channels` (reference counts
//! and lingering channels), `fanout` (the broker's sink), `sweep` (ping sweep and drain); this
//! file ties them to the broker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio_util::task::AbortOnDropHandle;

use crate::broker::{Ack, Broker, BrokerError, ChannelList, MessageSink, Presence};
use crate::disconnect::CloseReason;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::protocol::{Endpoint, ALL_TOPICS};

mod channel;
mod channels;
mod fanout;
pub mod outbound;
pub mod registry;
mod remembered;
mod resume;
mod revocation;
mod sweep;
#[cfg(test)]
mod tests;
mod users;

pub use channel::Channel;
use channel::ChannelNames;
pub use outbound::{Flushed, Outbound, Outgoing, Wake, Wire, Writes};
use registry::{now_ms, ConnEntry, Inner, Position, TopicFilter, UserEntry};
pub use registry::{Connection, Registry};
use remembered::{Remembered, TopicOrigin};
pub use remembered::{Restore, MAX_REMEMBERED_TOPICS};
pub use resume::{ResumeKey, Resumed};
pub use revocation::{Revocation, RevokeHook};

/// What a `subscribe:` / `unsubscribe:` command does to a connection's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicChange {
    Subscribe,
    Unsubscribe,
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
    broker: Broker,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    max_per_user: usize,
    queue_messages: usize,
    queue_bytes: usize,
    unsubscribe_delay: Duration,
    ping_interval: Duration,
    max_topics: usize,
    /// Topics remembered across reconnects (`remembered.rs`).
    remembered: Remembered,
    /// How long a drained connection's resume record is kept (zero: off), and its names.
    resume_window: Duration,
    resume_prefix: String,
    /// The lingering-channel reaper; aborted when the hub goes.
    reaper: Mutex<Option<AbortOnDropHandle<()>>>,
}

/// Limits a hub applies to every connection.
#[derive(Debug, Clone)]
pub struct HubLimits {
    pub max_connections_per_user: usize,
    pub outbound_queue: usize,
    pub outbound_queue_bytes: usize,
    pub unsubscribe_delay: Duration,
    pub ping_interval: Duration,
    /// Topics one connection may hold (`--max-topics`).
    pub max_topics: usize,
    /// How long a user's topics are remembered for a reconnect (zero: off).
    pub resubscribe_window: Duration,
    /// How long a drained connection can resume (zero: off).
    pub resume_window: Duration,
}

/// A subscribe would take a connection over `--max-topics`; nothing was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many topics")]
pub struct TooManyTopics;

impl Hub {
    /// Builds the registry first, then the broker around it (the broker delivers into it).
    pub fn new(
        prefix: &str,
        metrics: Arc<Metrics>,
        limits: HubLimits,
        make_broker: impl FnOnce(Arc<dyn MessageSink>) -> Broker,
    ) -> Arc<Hub> {
        let registry = Arc::new(Registry {
            inner: Mutex::new(Inner::default()),
            metrics: metrics.clone(),
            names: ChannelNames::new(prefix),
            on_revoke: std::sync::OnceLock::new(),
            revocations: AtomicU64::new(0),
            ping_slots: sweep::PingSlots::new(),
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
            max_topics: limits.max_topics,
            remembered: Remembered::new(prefix, limits.resubscribe_window),
            resume_window: limits.resume_window,
            resume_prefix: format!("{prefix}:resume:"),
            reaper: Mutex::new(None),
        })
    }

    /// Reads a named broker set within `within`, for the reads a handshake waits on (remembered
    /// topics, resume records). A failure or a timeout is logged with `what` and is `None`: the
    /// caller counts it and carries on without the set.
    async fn read_set(&self, name: &str, within: Duration, what: &str) -> Option<Vec<String>> {
        match tokio::time::timeout(within, self.broker.set_members(name)).await {
            Ok(Ok(members)) => Some(members),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading {what} failed");
                None
            }
            Err(_) => {
                tracing::warn!("reading {what} timed out");
                None
            }
        }
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Subscribes the node-wide channel and starts the delayed-unsubscribe reaper.
    pub async fn start(self: &Arc<Self>) -> Result<(), BrokerError> {
        let all = self.registry.names.render(Channel::Everyone);
        let fut = {
            let mut inner = self.registry.inner.lock();
            inner.channels.pin(&all);
            self.metrics
                .broker_channels
                .set(inner.channels.len() as i64);
            self.broker.subscribe(vec![all])
        };
        *self.reaper.lock() = Some(AbortOnDropHandle::new(tokio::spawn(reaper(
            Arc::downgrade(self),
        ))));
        tokio::spawn(sweep::heartbeat(Arc::downgrade(self), self.ping_interval));
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
        self.register_with(identity, endpoint, None).await
    }

    /// [`Hub::register`], remembering the SHA-256 of the connection's credential so that a
    /// revocation of that credential closes it.
    pub async fn register_with(
        self: &Arc<Self>,
        identity: Identity,
        endpoint: Endpoint,
        credential: Option<[u8; 32]>,
    ) -> Result<Registration, RegisterError> {
        let conn = Arc::new(Connection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            endpoint,
            identity: identity.clone(),
            outbound: Outbound::new(self.queue_messages, self.queue_bytes),
            credential,
            last_seen: AtomicU64::new(now_ms()),
            resume: resume::ConnResume::new(now_ms()),
        });
        let names = &self.registry.names;
        let mut channels = vec![names.render(Channel::User(&identity.user_id))];
        if let Some(t) = &identity.tenant_id {
            channels.push(names.render(Channel::Tenant(t)));
        }
        let (subscribed, online) = {
            let mut inner = self.registry.inner.lock();
            // An entry without connections is the user's lingering channel (kept for its
            // position): the user is back, not new to the node's presence.
            let first = match inner.users.get(&identity.user_id) {
                Some(u) => {
                    if self.max_per_user > 0 && u.conns.len() >= self.max_per_user {
                        return Err(RegisterError::TooManyConnections);
                    }
                    u.conns.is_empty()
                }
                None => true,
            };
            let user = inner
                .users
                .get_or_insert_with(&identity.user_id, || UserEntry {
                    conns: smallvec::SmallVec::new(),
                    tenant: None,
                    position: Position::default(),
                });
            if first {
                user.tenant = identity.tenant_id.clone();
            }
            user.conns.push(ConnEntry {
                endpoint: conn.endpoint,
                conn: conn.clone(),
                topics: TopicFilter::default(),
            });
            if let Some(t) = &identity.tenant_id {
                inner
                    .tenants
                    .entry(t.clone())
                    .or_default()
                    .users
                    .insert(identity.user_id.clone());
            }
            inner.connections += 1;
            self.registry.ping_slots.add(&conn);
            let subscribed = self.acquire(&mut inner, &channels);
            let online = first.then(|| {
                self.broker
                    .set_online(identity.user_id.clone(), Presence::Online)
            });
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
    fn acquire(&self, inner: &mut Inner, channels: &[String]) -> Option<Ack> {
        let need = inner.channels.acquire(channels);
        self.metrics
            .broker_channels
            .set(inner.channels.len() as i64);
        (!need.is_empty()).then(|| self.broker.subscribe(need))
    }

    fn confirm(&self, channels: &[String]) {
        self.registry.inner.lock().channels.confirm(channels);
    }

    fn release(&self, inner: &mut Inner, channels: &[String]) {
        inner.channels.release(channels, self.unsubscribe_delay);
    }

    /// Unsubscribes the channels whose delay ran out and that nobody took again; `Pending`
    /// until there are some.
    fn poll_reap(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.registry.inner.lock();
        let gone = std::task::ready!(inner.channels.poll_expired(cx));
        self.metrics
            .broker_channels
            .set(inner.channels.len() as i64);
        // With its channel go the positions kept for it (`fanout.rs`): the entries of users
        // and tenants nobody on this node has any more.
        for name in &gone {
            match self.registry.names.parse(name) {
                Some(Channel::User(u)) => {
                    if inner.users.get(u).is_some_and(|e| e.conns.is_empty()) {
                        inner.users.remove(u);
                    }
                }
                Some(Channel::Tenant(t)) => {
                    if inner.tenants.get(t).is_some_and(|e| e.users.is_empty()) {
                        inner.tenants.remove(t);
                    }
                }
                Some(Channel::Everyone) | None => {}
            }
        }
        // Queued under the lock: a later subscribe of the same channel comes after it.
        self.broker.unsubscribe(gone);
        Poll::Ready(())
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
        self.registry.ping_slots.remove(conn.id);
        if last {
            // The entry stays while the user's channel lingers: it keeps the channel's position
            // (`poll_reap` removes it with the channel). So does the tenant's, without the user.
            let tenant = inner.users.get_mut(user_id).and_then(|u| u.tenant.take());
            if let Some(t) = tenant {
                if let Some(set) = inner.tenants.get_mut(&t) {
                    set.users.remove(user_id);
                }
            }
            // Presence is exact: the user leaves now, not after the unsubscribe delay.
            drop(self.broker.set_online(user_id.clone(), Presence::Offline));
        }
        self.release(&mut inner, channels);
        self.metrics.topic_subscriptions.sub(removed_topics as i64);
    }

    /// Applies `subscribe:` / `unsubscribe:` topics to a connection. A subscribe that would
    /// take it over `--max-topics` applies nothing and says so (the session closes with 1008).
    ///
    /// The registry lock is shared by every delivery, so the work done under it is bounded by
    /// `--max-topics`, not by what a client sends: topics are de-duplicated and allocated
    /// before locking, an oversized subscribe is refused without the lock, and an unsubscribe
    /// longer than the connection's set walks the set instead of the list.
    pub fn set_topics(
        &self,
        conn: &Connection,
        topics: &[&str],
        change: TopicChange,
    ) -> Result<(), TooManyTopics> {
        let wanted: HashSet<&str> = topics.iter().copied().collect();
        if change == TopicChange::Subscribe && wanted.len() > self.max_topics {
            return Err(TooManyTopics);
        }
        let boxed: Vec<Box<str>> = match change {
            TopicChange::Subscribe => wanted.iter().map(|t| Box::from(*t)).collect(),
            TopicChange::Unsubscribe => Vec::new(),
        };
        let mut inner = self.registry.inner.lock();
        let Some(user) = inner.users.get_mut(&conn.identity.user_id) else {
            return Ok(());
        };
        let Some(entry) = user.conns.iter_mut().find(|c| c.conn.id == conn.id) else {
            return Ok(());
        };
        if entry.topics.origin == TopicOrigin::Restored && change == TopicChange::Subscribe {
            // A client that asks for topics gets exactly those, not what it was given.
            entry.topics.topics.clear();
        }
        entry.topics.origin = TopicOrigin::Explicit;
        let before = entry.topics.topics.len() as i64;
        let set = entry.topics.topics.edit();
        match change {
            TopicChange::Subscribe => {
                let new = boxed.iter().filter(|t| !set.contains(&***t)).count();
                if set.len() + new > self.max_topics {
                    entry.topics.topics.shrink();
                    return Err(TooManyTopics);
                }
                set.extend(boxed);
            }
            TopicChange::Unsubscribe if wanted.len() > set.len() => {
                set.retain(|t| !wanted.contains(&**t));
            }
            TopicChange::Unsubscribe => {
                for t in &wanted {
                    set.remove(*t);
                }
            }
        }
        entry.topics.topics.shrink();
        entry.topics.all = entry.topics.topics.contains(ALL_TOPICS);
        let after = entry.topics.topics.len() as i64;
        self.metrics.topic_subscriptions.add(after - before);
        Ok(())
    }

    /// Publishes one envelope to many channels: encoded once, one broker round trip. The
    /// channels are distinct (a channel named twice would get the message twice).
    pub async fn publish(
        &self,
        channels: &[Channel<'_>],
        payload: Bytes,
    ) -> Result<(), BrokerError> {
        let n = channels.len() as u64;
        let names = &self.registry.names;
        let bytes = channels.iter().map(|c| names.rendered_len(*c)).sum();
        let mut list = ChannelList::with_capacity(channels.len(), bytes);
        for c in channels {
            names.render_into(&mut list, *c);
        }
        let started = Instant::now();
        let result = self.broker.publish(list, payload).await;
        self.metrics
            .broker_publish_duration
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => self.metrics.broker_published.inc_by(n),
            Err(_) => self.metrics.broker_publish_errors.inc(),
        }
        result
    }

    /// Sets what every revocation does first on this node (forget cached identities). Once.
    pub fn on_revoke(&self, hook: RevokeHook) {
        if self.registry.on_revoke.set(hook).is_err() {
            tracing::warn!("revocation hook set twice; the first one stays");
        }
    }

    /// How many revocations this node has applied. A handshake reads it before authenticating
    /// and again after registering: if it moved, a revocation may have passed between the two
    /// (too late for the cache, too early for the close), so the credential is checked again.
    pub fn revocations(&self) -> u64 {
        self.registry.revocations.load(Ordering::SeqCst)
    }

    /// Revokes a user or a credential on every node: published on the everyone channel, which
    /// every node (this one included) subscribes; each forgets and closes with 1008.
    pub async fn revoke(&self, r: &Revocation) -> Result<(), BrokerError> {
        let mut everyone = ChannelList::default();
        self.registry
            .names
            .render_into(&mut everyone, Channel::Everyone);
        let result = self.broker.publish(everyone, r.encode()).await;
        match &result {
            Ok(()) => self.metrics.broker_published.inc(),
            Err(_) => self.metrics.broker_publish_errors.inc(),
        }
        result
    }

    /// Closes every connection with `reason` (used only when the node stops without a drain).
    pub fn close_all(&self, reason: CloseReason) {
        let inner = self.registry.inner.lock();
        for user in inner.users.values() {
            for c in &user.conns {
                if reason == CloseReason::Drain {
                    self.stop_for_resume(&inner, c);
                }
                c.conn.outbound.close(reason);
            }
        }
    }

    /// Closes one connection for a drain, recording where it stopped in the same critical
    /// section as the close (`resume.rs`).
    pub(super) fn close_for_drain(&self, conn: &Connection) {
        let inner = self.registry.inner.lock();
        let entry = inner
            .users
            .get(&conn.identity.user_id)
            .and_then(|u| u.conns.iter().find(|c| c.conn.id == conn.id));
        if let Some(entry) = entry {
            self.stop_for_resume(&inner, entry);
        }
        conn.outbound.close(CloseReason::Drain);
    }

    /// Open connections on this node.
    pub fn connections(&self) -> usize {
        self.registry.inner.lock().connections
    }

    /// Channels this node holds, with their reference counts (tests, debugging).
    pub fn channel_refs(&self) -> Vec<(String, usize)> {
        self.registry.inner.lock().channels.refs()
    }
}

/// Unsubscribes lingering channels when their delay runs out; woken by the delay queue only.
async fn reaper(hub: Weak<Hub>) {
    loop {
        let alive = std::future::poll_fn(|cx| match hub.upgrade() {
            None => Poll::Ready(false),
            Some(hub) => hub.poll_reap(cx).map(|()| true),
        })
        .await;
        if !alive {
            return;
        }
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
