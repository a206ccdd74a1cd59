//! The Redis broker: any number of nodes on one Redis behave as one gateway.
//!
//! - One dedicated pub/sub connection per node, owned by a single actor task: SUBSCRIBE and
//!   UNSUBSCRIBE requests are queued in call order, adjacent requests of one kind are merged
//!   into one command (one round trip for many channels), and a subscribe resolves only when
//!   Redis acknowledged it. A channel Redis refuses (an ACL) fails only the requests that
//!   named it: the rest of the merged SUBSCRIBE is retried channel by channel. When the
//!   connection fails mid-batch, what was not yet sent is recorded as wanted (or not), so the
//!   reconnect restores exactly the hub's set. The queue is bounded (`QUEUE_LIMIT` requests
//!   that add work; releases always pass, so nothing is left stale).
//! - Publishing goes over a deadpool-redis pool; a message for many channels is one pipeline.
//! - The actor remembers the whole wanted channel set: after a reconnect (with backoff) it
//!   restores it, and has the presence task (`presence.rs`) rewrite this node's online users,
//!   before the node reports ready again.
//! - A canary published on `{prefix}:canary:{node}` every second must come back through the
//!   subscription; if it does not, the subscription is silently dead: the node turns unready and
//!   reconnects.
//! - Presence: `{prefix}:node:{node}:users` (a SET with a TTL refreshed by heartbeat) and
//!   `{prefix}:nodes` (ZSET node → last heartbeat, ms), written by a task of its own
//!   (`presence.rs`), so that a Redis that hangs on a presence write never holds the actor (its
//!   canary check, its subscribes). Queries read them over the pool.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use redis::AsyncCommands;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use super::connect::{self, Endpoint, Pool, RedisCa, Topology};
use super::held::{Held, Kept};
use super::history::{self, StreamId, Verdict};
use super::payloads::RecentPayloads;
use super::presence;
use super::publish_connection::PublishConnection;
use super::publisher::Publisher;
use super::redis_cluster::{self, ShardCanary};
use super::subscription;
use super::ChannelList;
use super::{Ack, BrokerError, MessageSink, Outage, Presence};
use crate::metrics::Metrics;
use crate::protocol::{self, Kind};

/// How often the canary goes round, and how late it may be before the subscription is
/// considered dead.
const CANARY_INTERVAL: Duration = Duration::from_secs(1);
const CANARY_DEADLINE: Duration = Duration::from_secs(4);
/// Timeout of one Redis command; a Redis that does not answer is a Redis that is down.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Channels per SUBSCRIBE (users per SADD) when the whole set is restored.
pub(super) const RESTORE_CHUNK: usize = 1000;
/// Requests that add work (a subscribe for the actor, a user coming online for the presence
/// task) queued for one task at most; beyond it they fail at once (the handshake answers 503).
/// Releases (unsubscribe, offline) are always queued: there is at most one per earlier
/// successful request, so the queue stays bounded, and dropping one would leave a channel or a
/// user stale.
pub(super) const QUEUE_LIMIT: usize = 10_000;
/// Most messages delivered before the writers are woken: bounds what one batch can add to the
/// latency of its first message (about 1 µs each).
const READ_BATCH: usize = 256;

/// A subscribe request waiting for its acknowledgement: the channels it wants, and its answer.
type Waiter = (Vec<String>, oneshot::Sender<Result<(), BrokerError>>);

enum Cmd {
    Subscribe(Vec<String>, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(Vec<String>),
}

struct Shared {
    up: AtomicBool,
    /// Requests queued for the actor and not yet taken.
    queued: std::sync::atomic::AtomicUsize,
    /// The canary of each shard (one without a cluster), and when it last came back.
    canaries: parking_lot::Mutex<Vec<Canary>>,
    epoch: Instant,
    metrics: Arc<Metrics>,
}

impl Shared {
    fn since_epoch(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A canary came back on `channel`.
    fn canary_arrived(&self, channel: &str) {
        if let Some(c) = self
            .canaries
            .lock()
            .iter_mut()
            .find(|c| c.canary.channel == channel)
        {
            c.waiting_since = None;
        }
    }

    /// The canaries are being sent now: marks them awaited and names their channels.
    fn canaries_sent(&self) -> Vec<String> {
        let now = self.since_epoch();
        let mut canaries = self.canaries.lock();
        for c in canaries.iter_mut() {
            c.waiting_since.get_or_insert(now);
        }
        canaries.iter().map(|c| c.canary.channel.clone()).collect()
    }

    /// Starts watching these canaries (after a (re)connect): all fresh, one gauge per shard.
    fn watch(&self, canaries: Vec<ShardCanary>) {
        let mut current = self.canaries.lock();
        for old in current.iter() {
            if !canaries.iter().any(|c| c.shard == old.canary.shard) {
                let _ = self
                    .metrics
                    .broker_shard_up
                    .remove_label_values(&[&old.canary.shard]);
            }
        }
        *current = canaries
            .into_iter()
            .map(|canary| Canary {
                canary,
                waiting_since: None,
            })
            .collect();
        for c in current.iter() {
            self.metrics
                .broker_shard_up
                .with_label_values(&[&c.canary.shard])
                .set(1);
        }
    }

    /// The shard whose canary is late, if any, and by how much (ms).
    fn late_canary(&self) -> Option<(String, u64)> {
        let now = self.since_epoch();
        self.canaries
            .lock()
            .iter()
            .filter_map(|c| Some((c.canary.shard.clone(), now.saturating_sub(c.waiting_since?))))
            .find(|(_, late)| *late > CANARY_DEADLINE.as_millis() as u64)
    }

    /// The subscription is down: every shard reads as down.
    fn all_shards_down(&self) {
        for c in self.canaries.lock().iter() {
            self.metrics
                .broker_shard_up
                .with_label_values(&[&c.canary.shard])
                .set(0);
        }
    }
}

struct Canary {
    canary: ShardCanary,
    /// Milliseconds since `epoch` when the oldest canary not yet back was sent (`None`: every
    /// canary sent came back). Lateness counts from the send, not from the last arrival: an
    /// actor busy restoring thousands of subscriptions in a reconnect storm sends no canary for
    /// a while, and that is not a lost subscription.
    waiting_since: Option<u64>,
}

pub struct RedisBroker {
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedSender<Cmd>,
    /// Joins and leaves, written in order by the presence task.
    presence_writes: presence::Queue,
    pool: Pool,
    keys: Keys,
    presence_ttl: Duration,
    publisher: Arc<Publisher>,
}

#[derive(Clone)]
struct Keys {
    node_id: String,
    /// `{prefix}` with a hash tag in a cluster (`{{prefix}}`), so that all presence keys share
    /// one slot: the heartbeat writes them in one MULTI and a query reads them in one pipeline.
    presence_base: String,
    nodes: String,
    node_users: String,
    /// The canary channel without a cluster; the prefix of each shard's canary in one.
    canary: String,
    cluster: bool,
}

impl Keys {
    fn new(prefix: &str, node_id: &str, cluster: bool) -> Keys {
        let presence_base = if cluster {
            format!("{{{prefix}}}")
        } else {
            prefix.to_owned()
        };
        Keys {
            node_id: node_id.to_owned(),
            nodes: format!("{presence_base}:nodes"),
            node_users: format!("{presence_base}:node:{node_id}:users"),
            presence_base,
            canary: format!("{prefix}:canary:{node_id}"),
            cluster,
        }
    }

    fn node_users_of(&self, node: &str) -> String {
        format!("{}:node:{node}:users", self.presence_base)
    }

    /// The publish command for pub/sub channels.
    fn publish_cmd(&self) -> &'static str {
        if self.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
}

/// The subscribing half of the node's pub/sub connection.
enum SubSink {
    /// wsgate's own connection (plain TCP or TLS: `subscription.rs`).
    Own(subscription::Commands),
    /// Sharded pub/sub over a RESP3 cluster connection.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl SubSink {
    async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            SubSink::Own(c) => c.subscribe(channels).await,
            SubSink::Cluster(c) => redis_cluster::shard_subscribe(c, channels, true).await,
        }
    }

    async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            SubSink::Own(c) => c.unsubscribe(channels).await,
            SubSink::Cluster(c) => redis_cluster::shard_subscribe(c, channels, false).await,
        }
    }
}

/// The receiving half.
enum SubStream {
    Own(subscription::Replies),
    Cluster(tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>),
}

fn redis_down(e: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(Outage::Redis(Arc::new(e)))
}

pub(super) async fn timed<T>(
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(redis_down(e)),
        Err(_) => Err(Outage::Timeout.into()),
    }
}

pub(super) fn now_ms() -> u64 {
    protocol::now_micros() / 1000
}

/// Redis answered with an error reply (NOPERM, a denied command...): the connection is fine,
/// only this command failed.
pub(super) fn refused_by_redis(e: &BrokerError) -> bool {
    matches!(e, BrokerError::Unavailable(Outage::Redis(e)) if e.code().is_some())
}

/// What the Redis broker needs to know, and nothing else (no API token, no back-end).
#[derive(Clone)]
pub struct RedisSettings {
    /// Where Redis is; its URLs may carry credentials: never logged, never in Debug output.
    pub topology: Topology,
    /// `--redis-ca-file`: the CAs `rediss://` connections are verified against (`None`: the
    /// public roots).
    pub ca: Option<RedisCa>,
    /// Installation prefix of every key and channel.
    pub prefix: String,
    /// This node's id, in its presence keys and canary channel.
    pub node_id: String,
    /// Connections of the publish pool.
    pub pool_size: usize,
    /// How long a node's presence set outlives its last heartbeat.
    pub presence_ttl: Duration,
    /// How long each channel's history is kept (zero: no history, no recovery).
    pub history_ttl: Duration,
    /// How long a publish to an idle queue waits for others to share its round trip.
    pub publish_linger: Duration,
    /// Bytes of live messages a reader holds while delivery waits for a recovery.
    pub hold_limit: usize,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("topology", &self.topology)
            .field("ca", &self.ca)
            .field("prefix", &self.prefix)
            .field("node_id", &self.node_id)
            .field("pool_size", &self.pool_size)
            .field("presence_ttl", &self.presence_ttl)
            .field("history_ttl", &self.history_ttl)
            .field("publish_linger", &self.publish_linger)
            .field("hold_limit", &self.hold_limit)
            .finish()
    }
}

impl RedisBroker {
    /// Starts the broker's tasks; the connection is made in the background, so a node can start
    /// while Redis is still coming up (it reports unready meanwhile).
    pub fn start(
        cfg: &RedisSettings,
        sink: Arc<dyn MessageSink>,
        metrics: Arc<Metrics>,
    ) -> Result<RedisBroker, BrokerError> {
        let (endpoint, pool) = connect::open(
            &cfg.topology,
            cfg.ca.as_ref(),
            cfg.pool_size,
            COMMAND_TIMEOUT,
        )?;
        let endpoint = Arc::new(endpoint);
        // The publisher writes its own RESP on a connection of its own, except in a cluster.
        let own = (!cfg.topology.is_cluster())
            .then(|| PublishConnection::new(endpoint.clone(), cfg.ca.as_ref().map(RedisCa::roots)));
        let keys = Keys::new(&cfg.prefix, &cfg.node_id, cfg.topology.is_cluster());
        let shared = Arc::new(Shared {
            up: AtomicBool::new(false),
            queued: std::sync::atomic::AtomicUsize::new(0),
            canaries: parking_lot::Mutex::new(Vec::new()),
            epoch: Instant::now(),
            metrics,
        });
        let presence_writes = presence::Queue::start(
            pool.clone(),
            presence::Keys {
                node_id: keys.node_id.clone(),
                nodes: keys.nodes.clone(),
                node_users: keys.node_users.clone(),
            },
            cfg.presence_ttl,
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = Actor {
            endpoint: endpoint.clone(),
            ca: cfg.ca.clone(),
            pool: pool.clone(),
            shared: shared.clone(),
            sink,
            keys: keys.clone(),
            presence: presence_writes.clone(),
            channels: HashSet::new(),
            hold_limit: cfg.hold_limit,
        };
        tokio::spawn(actor.run(rx));
        Ok(RedisBroker {
            publisher: Arc::new(Publisher::new(
                own,
                pool.clone(),
                keys.cluster,
                cfg.history_ttl,
                cfg.publish_linger,
                shared.metrics.clone(),
            )),
            shared,
            cmds: tx,
            presence_writes,
            pool,
            keys,
            presence_ttl: cfg.presence_ttl,
        })
    }

    fn send(&self, cmd: Cmd) -> Result<(), BrokerError> {
        let adds = matches!(cmd, Cmd::Subscribe(..));
        if adds && self.shared.queued.load(Ordering::Relaxed) >= QUEUE_LIMIT {
            return Err(Outage::Overloaded.into());
        }
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        self.cmds.send(cmd).map_err(|_| BrokerError::Closed)
    }

    /// Runs one pipeline on the pool, with the command timeout.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, BrokerError> {
        let mut conn = self.pool.get().await?;
        timed(pipe.query_async::<T>(&mut conn)).await
    }
}

impl RedisBroker {
    pub fn subscribe(&self, channels: Vec<String>) -> Ack {
        let (tx, rx) = oneshot::channel();
        match self.send(Cmd::Subscribe(channels, tx)) {
            Ok(()) => Ack::waiting(rx),
            Err(e) => Ack::done(Err(e)),
        }
    }

    pub fn unsubscribe(&self, channels: Vec<String>) {
        let _ = self.send(Cmd::Unsubscribe(channels));
    }

    /// Publishes (grouped with the publishes around it: `publisher.rs`); with history, each
    /// channel's message is appended to its history in the same atomic step, so success means
    /// Redis holds it for the window.
    pub async fn publish(&self, channels: ChannelList, payload: Bytes) -> Result<(), BrokerError> {
        self.publisher.publish(channels, payload).await
    }

    pub fn set_online(&self, user_id: Arc<str>, presence: Presence) -> Ack {
        self.presence_writes.set(user_id, presence)
    }

    pub async fn presence(&self, user_ids: Vec<String>) -> Result<Vec<bool>, BrokerError> {
        let keys = &self.keys;
        let nodes_key = &keys.nodes;
        let ttl_ms = self.presence_ttl.as_millis() as u64;
        let mut conn = self.pool.get().await?;
        let since = now_ms().saturating_sub(ttl_ms);
        let nodes: Vec<String> = timed(conn.zrangebyscore(nodes_key, since, "+inf")).await?;
        let mut online = vec![false; user_ids.len()];
        if nodes.is_empty() {
            return Ok(online);
        }
        let mut pipe = redis::pipe();
        for node in &nodes {
            pipe.cmd("SMISMEMBER")
                .arg(keys.node_users_of(node))
                .arg(&user_ids);
        }
        let answers: Vec<Vec<bool>> = timed(pipe.query_async(&mut conn)).await?;
        for per_node in answers {
            for (o, member) in online.iter_mut().zip(per_node) {
                *o |= member;
            }
        }
        Ok(online)
    }

    pub fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    pub async fn shutdown(&self) -> Result<(), BrokerError> {
        let keys = &self.keys;
        self.shared.up.store(false, Ordering::Relaxed);
        let mut conn = self.pool.get().await?;
        let mut pipe = redis::pipe();
        pipe.zrem(&keys.nodes, &keys.node_id)
            .ignore()
            .del(&keys.node_users)
            .ignore();
        timed(pipe.query_async::<()>(&mut conn)).await
    }
}

struct Actor {
    endpoint: Arc<Endpoint>,
    /// `--redis-ca-file`: what the pub/sub connection's TLS trusts.
    ca: Option<RedisCa>,
    pool: Pool,
    shared: Arc<Shared>,
    sink: Arc<dyn MessageSink>,
    keys: Keys,
    /// The presence task: told when the connection is lost, and asked to restore this node's
    /// presence before the node reports ready.
    presence: presence::Queue,
    /// Every channel the hub wants, whether or not Redis has it right now.
    channels: HashSet<String>,
    /// `--max-recovery-hold`, handed to each connection's reader.
    hold_limit: usize,
}

/// Why a connected session of the actor ended.
enum End {
    /// The hub side is gone: the node is stopping.
    Stopped,
    /// The connection broke or the canary stopped: reconnect.
    Lost(String),
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut backoff = Duration::from_millis(100);
        let mut connected_before = false;
        loop {
            match self.connect_and_serve(&mut rx, &mut connected_before).await {
                End::Stopped => return,
                End::Lost(why) => {
                    // A connection that worked starts the backoff over: a blip after an hour
                    // of service is retried at once, so the gap history must fill stays small.
                    if self.shared.up.swap(false, Ordering::Relaxed) {
                        backoff = Duration::from_millis(100);
                    }
                    self.shared.metrics.broker_up.set(0);
                    self.shared.all_shards_down();
                    self.presence.down();
                    tracing::warn!(reason = %why, retry_in = ?backoff, "Redis pub/sub connection lost");
                }
            }
            // While disconnected, answer requests at once (the hub rolls back) but keep
            // recording what is wanted, so the reconnect restores it.
            let deadline = Instant::now() + backoff;
            loop {
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        None => return,
                        Some(cmd) => {
                            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                            self.record_while_down(cmd)
                        }
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            let jitter = rand::random::<f64>() * 0.3 + 0.85;
            backoff = (backoff * 2).min(Duration::from_secs(5)).mul_f64(jitter);
        }
    }

    fn record_while_down(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Subscribe(chs, tx) => {
                self.channels.extend(chs);
                let _ = tx.send(Err(Outage::Unreachable.into()));
            }
            Cmd::Unsubscribe(chs) => {
                for c in chs {
                    self.channels.remove(&c);
                }
            }
        }
    }

    async fn connect_and_serve(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Cmd>,
        connected_before: &mut bool,
    ) -> End {
        let (mut sink, mut stream, canaries) = match self.open_subscription().await {
            Ok(s) => s,
            Err(e) => return End::Lost(e.to_string()),
        };

        // Reader: decode nothing here, hand bytes to the hub; intercept the canary. It starts
        // reading once the whole set is subscribed again, and first catches up on what the
        // node missed while it was disconnected.
        let (lost_tx, mut lost_rx) = oneshot::channel::<()>();
        let (restored_tx, restored_rx) = oneshot::channel::<()>();
        let reader = {
            let reader = Reader {
                sink: self.sink.clone(),
                shared: self.shared.clone(),
                canary: self.keys.canary.clone(),
                pool: self.pool.clone(),
                recent: parking_lot::Mutex::new(RecentPayloads::default()),
                hold_limit: self.hold_limit,
            };
            tokio::spawn(async move {
                match &mut stream {
                    SubStream::Own(replies) => reader.read_own(replies, restored_rx).await,
                    stream => reader.read(stream, restored_rx).await,
                }
                let _ = lost_tx.send(());
            })
        };
        let _abort_reader = AbortOnDropHandle::new(reader);

        // Restore the whole set, then presence, before reporting ready.
        let mut all: Vec<String> = self.channels.iter().cloned().collect();
        all.extend(canaries.iter().map(|c| c.channel.clone()));
        let shards = canaries.len();
        for chunk in all.chunks(RESTORE_CHUNK) {
            match timed(sink.subscribe(chunk)).await {
                Ok(()) => {}
                // A channel Redis now refuses (an ACL changed) must not keep the node down.
                Err(e) if refused_by_redis(&e) => {
                    if let Err(e) = self
                        .subscribe_one_by_one(&mut sink, chunk, &mut Vec::new())
                        .await
                    {
                        return End::Lost(e.to_string());
                    }
                }
                Err(e) => return End::Lost(e.to_string()),
            }
        }
        if let Err(e) = self.presence.restore().await {
            return End::Lost(e.to_string());
        }
        self.shared.watch(canaries);
        let _ = restored_tx.send(());
        self.shared.up.store(true, Ordering::Relaxed);
        self.shared.metrics.broker_up.set(1);
        if *connected_before {
            self.shared.metrics.broker_reconnects.inc();
            tracing::info!(
                channels = all.len(),
                shards,
                "Redis pub/sub reconnected, subscriptions restored"
            );
        } else {
            tracing::info!(shards, "Redis pub/sub connected");
        }
        *connected_before = true;

        let mut canary = tokio::time::interval(CANARY_INTERVAL);
        let mut batch: Vec<Cmd> = Vec::new();
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return End::Stopped };
                    batch.push(cmd);
                    while batch.len() < 4096 {
                        match rx.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                    self.shared.queued.fetch_sub(batch.len(), Ordering::Relaxed);
                    if let Err(e) = self.apply(&mut sink, &mut batch).await {
                        return End::Lost(e.to_string());
                    }
                }
                _ = &mut lost_rx => return End::Lost("connection closed".into()),
                _ = canary.tick() => {
                    if let Some((shard, late)) = self.shared.late_canary() {
                        self.shared.metrics.broker_canary_failures.inc();
                        return End::Lost(format!("canary of {shard} not received for {late} ms"));
                    }
                    self.send_canary();
                }
            }
        }
    }

    /// Publishes the canaries (one per shard) without blocking the actor: a Redis that hangs
    /// shows up as a canary that does not come back.
    fn send_canary(&self) {
        let channels = self.shared.canaries_sent();
        let publish = self.keys.publish_cmd();
        for channel in channels {
            let pool = self.pool.clone();
            tokio::spawn(async move {
                if let Ok(mut conn) = pool.get().await {
                    let payload = protocol::encode(Kind::Canary, "", b"");
                    let _ = timed(
                        redis::cmd(publish)
                            .arg(&channel)
                            .arg(payload.as_ref())
                            .query_async::<()>(&mut conn),
                    )
                    .await;
                }
            });
        }
    }

    /// Opens the node's pub/sub connection and names the canaries it must subscribe: one on a
    /// single server (the shard label is its address), one per master in a cluster.
    async fn open_subscription(
        &self,
    ) -> Result<(SubSink, SubStream, Vec<ShardCanary>), BrokerError> {
        if let Endpoint::Cluster(seeds) = &*self.endpoint {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let client = redis_cluster::client(seeds, self.ca.as_ref(), true)
                .map(|b| b.push_sender(tx))
                .and_then(|b| b.build())
                .map_err(|_| Outage::BadUrl)?;
            let mut conn = timed(client.get_async_connection()).await?;
            let canaries = timed(redis_cluster::canaries(&mut conn, &self.keys.canary)).await?;
            return Ok((SubSink::Cluster(conn), SubStream::Cluster(rx), canaries));
        }
        let client = timed(self.endpoint.client()).await?;
        let info = client.get_connection_info();
        let canary = ShardCanary {
            shard: info.addr().to_string(),
            channel: self.keys.canary.clone(),
        };
        let roots = self.ca.as_ref().map(RedisCa::roots);
        let (commands, replies) = timed(subscription::connect(info, roots)).await?;
        Ok((
            SubSink::Own(commands),
            SubStream::Own(replies),
            vec![canary],
        ))
    }

    /// After Redis refused a SUBSCRIBE of many channels: subscribes them one at a time and
    /// returns the ones refused, which are no longer wanted (the requests that named them fail
    /// and roll back). A connection failure here ends the session; the waiters are answered.
    async fn subscribe_one_by_one(
        &mut self,
        sink: &mut SubSink,
        chs: &[String],
        waiters: &mut Vec<Waiter>,
    ) -> Result<Vec<(String, BrokerError)>, BrokerError> {
        let mut refused = Vec::new();
        for c in chs {
            match timed(sink.subscribe(std::slice::from_ref(c))).await {
                Ok(()) => {}
                Err(e) if refused_by_redis(&e) => {
                    tracing::warn!(error = %e, "Redis refused a channel");
                    self.channels.remove(c);
                    refused.push((c.clone(), e));
                }
                Err(e) => {
                    for (_, w) in waiters.drain(..) {
                        let _ = w.send(Err(e.clone()));
                    }
                    return Err(e);
                }
            }
        }
        Ok(refused)
    }

    /// Applies queued commands in order, merging adjacent commands of one kind. A command Redis
    /// refuses (an ACL that denies a channel, say) never takes the rest of the batch with it: a
    /// refused SUBSCRIBE is retried channel by channel, so only the refused channels (and the
    /// requests that wanted them) fail. If the connection itself fails, the commands not yet
    /// sent are recorded as while disconnected, so the reconnect restores exactly what is
    /// wanted.
    async fn apply(&mut self, sink: &mut SubSink, batch: &mut Vec<Cmd>) -> Result<(), BrokerError> {
        let mut cmds = std::mem::take(batch).into_iter().peekable();
        let result = self.apply_in_order(sink, &mut cmds).await;
        if result.is_err() {
            for cmd in cmds {
                self.record_while_down(cmd);
            }
        }
        result
    }

    async fn apply_in_order(
        &mut self,
        sink: &mut SubSink,
        cmds: &mut std::iter::Peekable<std::vec::IntoIter<Cmd>>,
    ) -> Result<(), BrokerError> {
        while let Some(cmd) = cmds.next() {
            match cmd {
                Cmd::Subscribe(chs, tx) => {
                    let mut waiters = vec![(chs, tx)];
                    while let Some(Cmd::Subscribe(..)) = cmds.peek() {
                        if let Some(Cmd::Subscribe(more, tx)) = cmds.next() {
                            waiters.push((more, tx));
                        }
                    }
                    let mut chs: Vec<String> = waiters
                        .iter()
                        .flat_map(|(c, _)| c.iter().cloned())
                        .collect();
                    chs.sort_unstable();
                    chs.dedup();
                    self.channels.extend(chs.iter().cloned());
                    let refused = match timed(sink.subscribe(&chs)).await {
                        Ok(()) => Vec::new(),
                        Err(e) if refused_by_redis(&e) => {
                            self.subscribe_one_by_one(sink, &chs, &mut waiters).await?
                        }
                        Err(e) => {
                            for (_, w) in waiters {
                                let _ = w.send(Err(e.clone()));
                            }
                            return Err(e);
                        }
                    };
                    for (wanted, w) in waiters {
                        let failed = refused.iter().find(|(c, _)| wanted.contains(c));
                        let _ = w.send(match failed {
                            None => Ok(()),
                            Some((_, e)) => Err(e.clone()),
                        });
                    }
                }
                Cmd::Unsubscribe(mut chs) => {
                    while let Some(Cmd::Unsubscribe(..)) = cmds.peek() {
                        if let Some(Cmd::Unsubscribe(more)) = cmds.next() {
                            chs.extend(more);
                        }
                    }
                    for c in &chs {
                        self.channels.remove(c);
                    }
                    match timed(sink.unsubscribe(&chs)).await {
                        Ok(()) => {}
                        // Redis refusing an UNSUBSCRIBE leaves nothing subscribed that we know of.
                        Err(e) if refused_by_redis(&e) => {
                            tracing::warn!(error = %e, "Redis refused an UNSUBSCRIBE");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }
}

/// The receiving half of one pub/sub connection: gaps, recovery, catch-up, judged by the
/// positions the sink records (`MessageSink`).
struct Reader {
    sink: Arc<dyn MessageSink>,
    shared: Arc<Shared>,
    canary: String,
    pool: Pool,
    /// The payloads received last, shared by the messages that repeat them (`payloads.rs`).
    recent: parking_lot::Mutex<RecentPayloads>,
    /// `--max-recovery-hold`: bytes of live messages held while delivery waits (`held.rs`).
    hold_limit: usize,
}

impl Reader {
    /// Delivers, in order, what each channel's history holds after the last delivered position.
    async fn catch_up(&self) -> Result<(), BrokerError> {
        let known = self.sink.known();
        for (channel, after) in known {
            self.recover(&channel, after, None).await?;
        }
        Ok(())
    }

    /// Reads history after `after` (and before `before`) and delivers it.
    async fn recover(
        &self,
        channel: &str,
        after: StreamId,
        before: Option<StreamId>,
    ) -> Result<(), BrokerError> {
        let mut conn = self.pool.get().await?;
        let end = before.map_or_else(|| "+".to_owned(), |b| format!("({b}"));
        let entries: Vec<(String, Vec<Vec<u8>>)> = timed(
            redis::cmd("XRANGE")
                .arg(history::key(channel))
                .arg(format!("({after}"))
                .arg(end)
                .query_async(&mut conn),
        )
        .await?;
        let mut recovered = 0u64;
        for (id, fields) in entries {
            let (Some(id), Some(payload)) = (StreamId::parse(id.as_bytes()), fields.get(1)) else {
                continue;
            };
            self.sink
                .deliver(&[channel], Bytes::copy_from_slice(payload), Some(id));
            recovered += 1;
        }
        self.sink.flush();
        if recovered > 0 {
            self.shared.metrics.broker_recovered.inc_by(recovered);
            tracing::info!(recovered, "messages recovered from history");
        }
        Ok(())
    }

    /// Reads the crate's sharded subscription stream (a cluster) until it ends; a
    /// failed recovery ends it too, so that the reconnect catches up from the last delivered
    /// position. As on wsgate's own connection (`read_own`), the stream is read all the while
    /// delivery waits (the subscriptions restored and history caught up first, a gap's
    /// recovery), and what arrives meanwhile is held within `--max-recovery-hold`. Messages
    /// already at hand are delivered as one batch before any writer is woken
    /// (`MessageSink::flush`): a connection that got several of them writes them with one
    /// system call.
    async fn read(&self, stream: &mut SubStream, restored: oneshot::Receiver<()>) {
        let (mut held, mut work) = self.start(restored);
        loop {
            tokio::select! {
                biased;
                ok = until_done(&mut work) => {
                    if !self.work_done(ok, &mut held, &mut work) {
                        return;
                    }
                }
                first = self.next_message(stream) => {
                    let Some(first) = first else {
                        self.sink.flush();
                        return;
                    };
                    let mut next = Some(first);
                    let mut batch = 0;
                    while let Some(msg) = next.take() {
                        self.take_in(&mut held, &mut work, &msg.channel, &msg.payload);
                        batch += 1;
                        if batch < READ_BATCH {
                            next = self.next_message(stream).now_or_never().flatten();
                            if next.is_none() {
                                // The client's connection task parses what Redis sent and hands
                                // it over one message at a time: when it is merely a step behind,
                                // let it catch up once before waking the writers, so that the
                                // messages Redis sent together (a channel's burst) are written
                                // together.
                                tokio::task::yield_now().await;
                                next = self.next_message(stream).now_or_never().flatten();
                            }
                        }
                    }
                    self.shared.metrics.broker_read_batch.observe(batch as f64);
                    self.sink.flush();
                }
            }
        }
    }

    /// A reader's start: nothing held, and delivery waits for the subscriptions to be restored
    /// and the history caught up.
    fn start<'a>(&'a self, restored: oneshot::Receiver<()>) -> (Held, Option<Work<'a>>) {
        let work: Work<'a> =
            Box::pin(async move { restored.await.is_ok() && self.catch_up().await.is_ok() });
        (Held::new(self.hold_limit), Some(work))
    }

    /// One message read: delivered now, or held while delivery waits.
    fn take_in<'a>(
        &'a self,
        held: &mut Held,
        work: &mut Option<Work<'a>>,
        channel: &str,
        payload: &[u8],
    ) {
        if work.is_none() && held.is_empty() {
            if let Handled::Gap { after, before } = self.handle_now(channel, payload, false) {
                let (channel, payload) = (channel.to_owned(), Bytes::copy_from_slice(payload));
                *work = Some(self.recovery(held, channel, payload, after, before));
            }
        } else if channel.starts_with(self.canary.as_str()) {
            // A canary needs no order: held, it could read as a dead subscription.
            self.shared.canary_arrived(channel);
        } else {
            self.hold(held, channel, payload);
        }
    }

    /// The work that held delivery back ended (`ok`: it succeeded): what it held is delivered.
    /// `false` ends the subscription, so that the reconnect catches up.
    fn work_done<'a>(&'a self, ok: bool, held: &mut Held, work: &mut Option<Work<'a>>) -> bool {
        *work = None;
        if !ok {
            self.sink.flush();
            return false;
        }
        self.release(held, work);
        true
    }

    /// Delivers what was held, in order, once the work that held it is done: until a held
    /// message shows a gap (its recovery becomes the next work), then what did not fit the
    /// hold, read back from history.
    fn release<'a>(&'a self, held: &mut Held, work: &mut Option<Work<'a>>) {
        while let Some((channel, payload, after_gap)) = held.pop_front() {
            if let Handled::Gap { after, before } = self.handle_now(&channel, &payload, after_gap) {
                *work = Some(self.recovery(held, channel, payload, after, before));
                break;
            }
        }
        if work.is_none() {
            // What did not fit is in history: read it back before anything newer.
            let left = held.take_left();
            if !left.is_empty() {
                *work = Some(Box::pin(self.recover_left(left)));
            }
        }
        self.sink.flush();
    }

    async fn next_message(&self, stream: &mut SubStream) -> Option<redis_cluster::ShardMessage> {
        match stream {
            // Read by `read_own`, never here.
            SubStream::Own(_) => None,
            SubStream::Cluster(pushes) => {
                let wanted = |c: &str| c.starts_with(self.canary.as_str()) || self.sink.holds(c);
                redis_cluster::next_message(pushes, wanted).await
            }
        }
    }

    /// Delivers one message unless it shows a gap, which it leaves to recover first. `after_gap`:
    /// the gap before it was recovered (or cannot be), deliver it whatever its position says.
    fn handle_now(&self, channel: &str, payload: &[u8], after_gap: bool) -> Handled {
        if channel.starts_with(self.canary.as_str()) {
            self.shared.canary_arrived(channel);
            return Handled::Done;
        }
        let Some(framed) = history::unframe(payload) else {
            tracing::warn!(channel, "unframed broker message dropped");
            return Handled::Done;
        };
        // As shared bytes: a recent payload again if it is the same. The reader is the only
        // one to lock `recent`, so holding it while the hub delivers blocks nobody.
        let mut recent = self.recent.lock();
        let payload = recent.share(framed.payload);
        if after_gap {
            // Delivering records the position.
            self.sink.deliver(&[channel], payload.clone(), framed.id);
            return Handled::Done;
        }
        // Judged, recorded and delivered in one look-up of the channel (`MessageSink::admit`).
        match self.sink.admit(channel, payload, framed.prev, framed.id) {
            Verdict::Deliver | Verdict::Duplicate => Handled::Done,
            Verdict::Gap { after } => Handled::Gap {
                after,
                before: framed.id,
            },
        }
    }

    /// Reads wsgate's own subscription connection until it ends. Messages are handled straight
    /// from the bytes read. While delivery is held back (until the subscriptions are restored
    /// and the history caught up, and while a gap is recovered) messages are kept in order, up
    /// to `--max-recovery-hold` (`held.rs`; past it they are read back from history after), and
    /// the socket is still read, so that the actor's SUBSCRIBEs are acknowledged meanwhile.
    async fn read_own(&self, replies: &mut subscription::Replies, restored: oneshot::Receiver<()>) {
        let (mut held, mut work) = self.start(restored);
        loop {
            tokio::select! {
                biased;
                ok = until_done(&mut work) => {
                    if !self.work_done(ok, &mut held, &mut work) {
                        return;
                    }
                }
                read = replies.fill() => {
                    if !matches!(read, Ok(true)) {
                        self.sink.flush();
                        return;
                    }
                    let mut batch = 0;
                    loop {
                        let run = match replies.take() {
                            Ok(run) => run,
                            Err(e) => {
                                tracing::warn!(error = %e, "Redis pub/sub connection unreadable");
                                self.sink.flush();
                                return;
                            }
                        };
                        if run.is_empty() {
                            drop(run);
                            if batch >= READ_BATCH {
                                break;
                            }
                            // More already waiting (a burst larger than one read) joins this
                            // batch, so its writes go out together.
                            match replies.fill().now_or_never() {
                                Some(Ok(true)) => continue,
                                Some(_) => {
                                    self.sink.flush();
                                    return;
                                }
                                None => break,
                            }
                        }
                        if work.is_none() && held.is_empty() {
                            self.warm(&run);
                        }
                        for (channel, payload) in run {
                            batch += 1;
                            self.take_in(&mut held, &mut work, channel, payload);
                        }
                    }
                    if batch > 0 {
                        self.shared.metrics.broker_read_batch.observe(batch as f64);
                        self.sink.flush();
                    }
                }
            }
        }
    }

    /// Holds a message while delivery waits; counts what the bound left to history or lost.
    fn hold(&self, held: &mut Held, channel: &str, payload: &[u8]) {
        let m = &self.shared.metrics;
        match held.push(channel, payload) {
            Kept::Held => {}
            Kept::LeftToHistory => m.broker_hold_overflow.with_label_values(&["history"]).inc(),
            Kept::Lost { first } => {
                m.broker_hold_overflow.with_label_values(&["lost"]).inc();
                if first {
                    tracing::warn!(
                        "messages without history did not fit --max-recovery-hold and are lost \
                         (wsgate_broker_hold_overflow_total counts them)"
                    );
                }
            }
        }
    }

    /// Reads back from history what did not fit the hold: each channel after its last delivered
    /// position, or after the message before the first one left when nothing was delivered on
    /// it yet. `false` when the subscription must be made again.
    async fn recover_left(&self, left: Vec<(String, StreamId)>) -> bool {
        self.sink.flush();
        for (channel, after) in left {
            let after = self.sink.position(&channel).unwrap_or_else(|| {
                // Nothing is held any more: recorded as delivered, so that a reconnect's
                // catch-up reads it back if this read fails. (This reader is the only one
                // that delivers on its channels, so nothing moves between the two calls.)
                self.sink.record(&channel, after);
                after
            });
            if let Err(e) = self.recover(&channel, after, None).await {
                tracing::warn!(error = %e, "reading back what did not fit the hold failed; reconnecting");
                return false;
            }
        }
        true
    }

    /// Looks up the channels of a run of messages together, before any of them is handled
    /// (`MessageSink::warm`): the look-ups of one message depend on each other, those of
    /// different messages do not, so the CPU waits for memory once for the run, not once per
    /// message.
    fn warm(&self, run: &subscription::Run<'_>) {
        let channels: smallvec::SmallVec<[&str; subscription::RUN]> =
            run.iter().map(|(channel, _)| *channel).collect();
        self.sink.warm(&channels);
    }

    /// Holds `payload` back (first in line) and returns the recovery of the gap before it.
    fn recovery<'a>(
        &'a self,
        held: &mut Held,
        channel: String,
        payload: Bytes,
        after: StreamId,
        before: Option<StreamId>,
    ) -> Work<'a> {
        held.push_front((channel.clone(), payload, true));
        Box::pin(async move { self.recover_gap(&channel, after, before).await })
    }

    /// Reads a gap from history and delivers it; `false` when the subscription must be made
    /// again (the reconnect catches up from the last delivered position).
    async fn recover_gap(&self, channel: &str, after: StreamId, before: Option<StreamId>) -> bool {
        // Writers of what is already delivered need not wait for the history read.
        self.sink.flush();
        match self.recover(channel, after, before).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "recovering a gap failed; reconnecting");
                false
            }
        }
    }
}

/// What holds delivery back: it ends with `false` when the subscription must be made again.
type Work<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>>;

/// Waits for the work in hand (never, without any).
async fn until_done(work: &mut Option<Work<'_>>) -> bool {
    match work {
        Some(w) => w.await,
        None => std::future::pending().await,
    }
}

/// What became of a message.
enum Handled {
    Done,
    /// Messages between `after` and this one (`before`) are missing: recover them first.
    Gap {
        after: StreamId,
        before: Option<StreamId>,
    },
}
