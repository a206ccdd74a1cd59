//! This node's presence in Redis, written by a task of its own: the node's user set
//! `{prefix}:node:{node}:users` (a SET with a TTL) and its heartbeat in `{prefix}:nodes` (ZSET
//! node → last heartbeat, ms).
//!
//! Why a task of its own: a presence write waits for Redis, up to the command timeout when Redis
//! hangs. Awaited by the subscription actor, it would hold the actor's whole loop meanwhile: no
//! canary check (a dead subscription noticed seconds late, the node still reading ready), and
//! queued subscribes waiting. Here a hanging Redis holds back only the presence writes behind it.
//!
//! - One queue, taken in order: a user's join and a later leave reach Redis in that order,
//!   and adjacent joins and leaves go out as one pipeline (SADD/SREM + PEXPIRE). A write Redis
//!   refuses (an ACL) rewrites the node's set in full at once; a write that fails otherwise
//!   marks it for a full rewrite at the next heartbeat.
//! - The actor says in the same queue when the pub/sub connection is lost (`Down`) and when it
//!   is back (`Restore`). While it is down, joins and leaves are only recorded (and answered at
//!   once) and no heartbeat is sent: after `--presence-ttl` without a subscription the node's
//!   users read offline. `Restore` rewrites the set in full before the actor reports ready: a
//!   join queued before it is in the rewrite, one queued after it is written on its own, and
//!   nothing falls between the two.
//! - While connected, a heartbeat every `--presence-ttl / 3` refreshes the TTL (one PEXPIRE
//!   whatever the number of users) and this node's heartbeat time, atomically with the full
//!   rewrite when one is due. A crashed node stops heartbeating, so its users read offline
//!   within `--presence-ttl`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use super::connect::Pool;
use super::redis::{now_ms, refused_by_redis, timed, COMMAND_TIMEOUT, QUEUE_LIMIT, RESTORE_CHUNK};
use super::{Ack, BrokerError, Outage, Presence};

/// Requests taken from the queue at once at most: adjacent joins and leaves among them share
/// one round trip.
const BATCH: usize = 4096;

type Answer = oneshot::Sender<Result<(), BrokerError>>;

enum Op {
    /// A user joins (or leaves) this node.
    Set(Arc<str>, Presence, Answer),
    /// The pub/sub connection is lost: record, write nothing.
    Down,
    /// The pub/sub connection is back: rewrite the set in full, then answer.
    Restore(Answer),
}

/// The names of this node's presence keys.
pub(super) struct Keys {
    pub(super) node_id: String,
    pub(super) nodes: String,
    pub(super) node_users: String,
}

/// The presence task's queue: joins and leaves from the hub, the connection's state from the
/// actor. The task ends when every copy is dropped.
#[derive(Clone)]
pub(super) struct Queue {
    ops: mpsc::UnboundedSender<Op>,
    /// Joins and leaves queued and not yet taken.
    queued: Arc<AtomicUsize>,
}

impl Queue {
    /// Starts the presence task; it writes nothing until the first [`restore`](Self::restore).
    pub(super) fn start(pool: Pool, keys: Keys, ttl: Duration) -> Queue {
        let (ops, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let task = Task {
            pool,
            keys,
            ttl,
            queued: queued.clone(),
            online: HashSet::new(),
            connected: false,
            resync: true,
        };
        tokio::spawn(task.run(rx));
        Queue { ops, queued }
    }

    /// Queues a join or a leave. Joins add work: past `QUEUE_LIMIT` queued they fail at once
    /// (the handshake answers 503). Leaves always pass: there is at most one per earlier join,
    /// so the queue stays bounded, and dropping one would leave the user online.
    pub(super) fn set(&self, user: Arc<str>, presence: Presence) -> Ack {
        if presence == Presence::Online && self.queued.load(Ordering::Relaxed) >= QUEUE_LIMIT {
            return Ack::done(Err(Outage::Overloaded.into()));
        }
        let (tx, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::Relaxed);
        match self.ops.send(Op::Set(user, presence, tx)) {
            Ok(()) => Ack::waiting(rx),
            Err(_) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                Ack::done(Err(BrokerError::Closed))
            }
        }
    }

    /// The pub/sub connection is lost: presence is only recorded until the next `restore`.
    pub(super) fn down(&self) {
        let _ = self.ops.send(Op::Down);
    }

    /// The pub/sub connection is back: rewrites this node's set in full (with everything queued
    /// before) and answers within the command timeout.
    pub(super) async fn restore(&self) -> Result<(), BrokerError> {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(Op::Restore(tx))
            .map_err(|_| BrokerError::Closed)?;
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(answer) => answer.unwrap_or(Err(BrokerError::Closed)),
            Err(_) => Err(Outage::Timeout.into()),
        }
    }
}

struct Task {
    pool: Pool,
    keys: Keys,
    ttl: Duration,
    queued: Arc<AtomicUsize>,
    /// Users with a connection on this node.
    online: HashSet<Arc<str>>,
    /// The pub/sub connection is up and the set restored: only then is presence written.
    connected: bool,
    /// Redis may not hold exactly `online` (a write failed, the connection was lost): the next
    /// heartbeat rewrites the set in full.
    resync: bool,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut heartbeat = tokio::time::interval(self.ttl / 3);
        // A heartbeat that waited for a hanging Redis is followed by one, not by a burst.
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                taken = rx.recv_many(&mut batch, BATCH) => {
                    if taken == 0 {
                        return;
                    }
                    let sets = batch.iter().filter(|op| matches!(op, Op::Set(..))).count();
                    self.queued.fetch_sub(sets, Ordering::Relaxed);
                    if self.apply(&mut batch).await {
                        // The rewrite was a heartbeat: the next is a period away.
                        heartbeat.reset();
                    }
                }
                _ = heartbeat.tick(), if self.connected => {
                    // A failed heartbeat is on the pool, not the subscription: the canary judges
                    // the subscription; presence is re-asserted in full next time round.
                    match self.heartbeat(self.resync).await {
                        Ok(()) => self.resync = false,
                        Err(e) => {
                            tracing::warn!(error = %e, "presence heartbeat failed");
                            self.resync = true;
                        }
                    }
                }
            }
        }
    }

    /// Takes a batch in order; adjacent joins and leaves are written together. Returns whether
    /// the set was restored.
    async fn apply(&mut self, batch: &mut Vec<Op>) -> bool {
        let mut restored = false;
        let mut ops = batch.drain(..).peekable();
        while let Some(op) = ops.next() {
            match op {
                Op::Down => {
                    self.connected = false;
                    self.resync = true;
                }
                Op::Restore(answer) => {
                    let result = self.heartbeat(true).await;
                    self.connected = result.is_ok();
                    self.resync = result.is_err();
                    restored |= result.is_ok();
                    let _ = answer.send(result);
                }
                Op::Set(user, presence, answer) => {
                    let mut sets = vec![(user, presence, answer)];
                    while let Some(Op::Set(..)) = ops.peek() {
                        if let Some(Op::Set(u, p, a)) = ops.next() {
                            sets.push((u, p, a));
                        }
                    }
                    self.write(sets).await;
                }
            }
        }
        restored
    }

    /// Records joins and leaves and, while connected, writes them in one pipeline.
    async fn write(&mut self, sets: Vec<(Arc<str>, Presence, Answer)>) {
        let mut pipe = redis::pipe();
        for (user, presence, _) in &sets {
            match presence {
                Presence::Online => {
                    self.online.insert(user.clone());
                    pipe.sadd(&self.keys.node_users, &**user).ignore();
                }
                Presence::Offline => {
                    self.online.remove(user);
                    pipe.srem(&self.keys.node_users, &**user).ignore();
                }
            }
        }
        if !self.connected {
            // Restored with the whole set when the connection is back.
            for (_, _, answer) in sets {
                let _ = answer.send(Ok(()));
            }
            return;
        }
        pipe.cmd("PEXPIRE")
            .arg(&self.keys.node_users)
            .arg(self.ttl.as_millis() as u64)
            .ignore();
        let mut result = match self.pool.get().await {
            Ok(mut conn) => timed(pipe.query_async::<()>(&mut conn)).await,
            Err(e) => Err(e),
        };
        if matches!(&result, Err(e) if refused_by_redis(e)) {
            // One refused command fails the whole pipeline's answer, though Redis ran the others:
            // rewrite the set from what this node knows instead.
            tracing::warn!("a presence write was refused; rewriting this node's set");
            result = self.heartbeat(true).await;
            if result.is_ok() {
                self.resync = false;
            }
        }
        for (_, _, answer) in sets {
            let _ = answer.send(result.clone());
        }
        if let Err(e) = &result {
            // Repaired by the next heartbeat, which rewrites the whole set.
            tracing::warn!(error = %e, "presence write failed; resynchronising");
            self.resync = true;
        }
    }

    /// Refreshes this node's presence; `full` rewrites the node's user set from what the node
    /// knows (after a reconnect Redis may have lost users; after a failed write it may hold
    /// users who left), atomically, so a reader never sees it half written.
    async fn heartbeat(&self, full: bool) -> Result<(), BrokerError> {
        let mut conn = self.pool.get().await?;
        let ttl_ms = self.ttl.as_millis() as u64;
        let now = now_ms();
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.zadd(&self.keys.nodes, &self.keys.node_id, now)
            .ignore();
        if full {
            pipe.del(&self.keys.node_users).ignore();
        }
        if full && !self.online.is_empty() {
            let users: Vec<&str> = self.online.iter().map(|u| &**u).collect();
            for chunk in users.chunks(RESTORE_CHUNK) {
                pipe.sadd(&self.keys.node_users, chunk).ignore();
            }
        }
        pipe.cmd("PEXPIRE")
            .arg(&self.keys.node_users)
            .arg(ttl_ms)
            .ignore();
        // Forget nodes that stopped heartbeating long ago (their user sets have expired).
        pipe.zrembyscore(&self.keys.nodes, 0, now.saturating_sub(ttl_ms * 4))
            .ignore();
        timed(pipe.query_async::<()>(&mut conn)).await
    }
}
