//! Connection resume across a drain (`--resume-window`).
//!
//! - **Where a connection stopped.** The fan-out records, per channel, the position of the last
//!   message the node delivered on it (a user's channel in its user entry, a tenant's in its
//!   tenant entry, the everyone channel once), under the registry lock. A drain closes a
//!   connection under the same lock and copies those three positions and the connection's topics
//!   at that instant: every message up to them was queued (or filtered by the same topics) before
//!   the close, every later one was refused. A channel the node has delivered nothing on since
//!   the connection registered is recorded as the registration time (minus a margin for clocks),
//!   which positions are (milliseconds, sequence), on both brokers.
//! - **Under a resume key**: a random id in an HttpOnly cookie for browsers, the SHA-256 of the
//!   API key otherwise, with the endpoint. The session writes the record (a member of the broker
//!   set `{prefix}:resume:{endpoint}:{user}:{key}`, expiring after the window) before its close frame
//!   goes out, so a client that reconnects on the close finds it.
//! - **Resuming, before the 101.** The new connection is registered first, so live messages
//!   queue from then on (each queued copy carries its channel and position). Its topics become
//!   the record's (they take precedence over the remembered topics), then each channel's history
//!   is read after the recorded position, filtered by endpoint and topics, and put in front of
//!   the queue; queued live copies at or before the last replayed position of their channel are
//!   dropped. Every message published after the record's position is therefore either in the
//!   history read or queued live (the channel was subscribed before the read), and exactly once.
//! - **Several connections per key** (two tabs): each drained connection adds its own record. A
//!   resuming connection replays from the oldest position of each channel over all records and
//!   takes the union of their topics, so none misses anything; a replayed message that some
//!   record had already passed may be a duplicate and is counted
//!   (`wsgate_resume_duplicates_total`). A single record is removed once used (only that member, so a record
//!   another connection adds meanwhile stays), and a later reconnect does not replay it again; several are left to expire, as every connection of the
//!   key may still come.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::registry::{ConnEntry, Inner};
use super::remembered::TopicOrigin;
use super::{Channel, Connection, Hub, Outgoing};
use crate::broker::StreamId;
use crate::protocol::{self, Endpoint, Kind, ALL_TOPICS};

/// How long a broker read or write of a resume record or of history may take.
const RESUME_TIMEOUT: Duration = Duration::from_secs(2);

/// How far before its registration a connection's resume starts on a channel the node delivered
/// nothing on since: covers the clock difference between this node and Redis. A connection may
/// get a message published up to this long before it first connected; it never misses one.
const CLOCK_MARGIN_MS: u64 = 2_000;

/// Most messages replayed to one connection per channel (pages of the broker's read).
const MAX_PAGES: usize = 10;

/// The channel a message came through, as seen from a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    User = 0,
    Tenant = 1,
    Everyone = 2,
}

const SLOTS: [Slot; 3] = [Slot::User, Slot::Tenant, Slot::Everyone];

/// Where a connection's resume record is kept. The values never appear in logs.
#[derive(Clone)]
pub enum ResumeKey {
    /// The random id of the resume cookie (browsers).
    Cookie(String),
    /// The SHA-256 of the API key (clients without cookies).
    Key([u8; 32]),
}

impl std::fmt::Debug for ResumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResumeKey::Cookie(_) => "ResumeKey::Cookie(..)",
            ResumeKey::Key(_) => "ResumeKey::Key(..)",
        })
    }
}

impl ResumeKey {
    fn part(&self) -> String {
        match self {
            ResumeKey::Cookie(id) => format!("c:{id}"),
            ResumeKey::Key(h) => {
                let mut s = String::with_capacity(66);
                s.push_str("k:");
                for b in h {
                    s.push_str(&format!("{b:02x}"));
                }
                s
            }
        }
    }
}

/// What [`Hub::resume`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// The window is 0.
    Off,
    /// No record: the caller restores remembered topics instead.
    Nothing,
    /// The connection resumed from this many records with this many replayed messages.
    Replayed { records: usize, messages: usize },
    /// The broker did not answer; the connection starts without a replay.
    Failed,
}

/// Where a connection stopped: per slot a position, and its topics.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    positions: [StreamId; 3],
    topics: Vec<String>,
}

impl Record {
    /// `{nonce} {user} {tenant} {everyone}` then one topic per line. The nonce keeps records of
    /// several connections distinct members of the set.
    fn encode(&self) -> String {
        let nonce: u64 = rand::random();
        let [u, t, e] = &self.positions;
        let mut s = format!("{nonce:016x} {u} {t} {e}");
        for topic in &self.topics {
            s.push('\n');
            s.push_str(topic);
        }
        s
    }

    fn decode(s: &str) -> Option<Record> {
        let mut lines = s.split('\n');
        let mut head = lines.next()?.split(' ');
        head.next()?;
        let mut positions = [StreamId::default(); 3];
        for p in &mut positions {
            *p = StreamId::parse(head.next()?.as_bytes())?;
        }
        let topics = lines
            .filter(|t| !t.is_empty())
            .take(super::MAX_REMEMBERED_TOPICS)
            .map(str::to_string)
            .collect();
        Some(Record { positions, topics })
    }
}

/// A connection's part in resuming.
pub(crate) struct ConnResume {
    /// When it registered (ms since the epoch).
    registered_ms: u64,
    key: std::sync::OnceLock<ResumeKey>,
    /// Set by the drain at the close.
    stopped: Mutex<Option<Record>>,
    /// The drain closed it already: a later close (the drain's final sweep) keeps the first
    /// record, whose positions match what was queued.
    closed: std::sync::atomic::AtomicBool,
}

impl ConnResume {
    pub(super) fn new(registered_ms: u64) -> ConnResume {
        ConnResume {
            registered_ms,
            key: std::sync::OnceLock::new(),
            stopped: Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

fn topics_of(entry: &ConnEntry) -> Vec<String> {
    let mut out = Vec::new();
    if entry.topics.all {
        out.push(ALL_TOPICS.to_string());
    }
    out.extend(
        entry
            .topics
            .topics
            .iter()
            .filter(|t| &***t != ALL_TOPICS)
            .take(super::MAX_REMEMBERED_TOPICS)
            .map(|t| t.to_string()),
    );
    out
}

impl Hub {
    /// Per endpoint and user, so a cookie carried over to another login replays nothing of the
    /// previous user's record.
    fn resume_name(&self, conn: &Connection, key: &ResumeKey) -> String {
        format!(
            "{}{}:{}:{}",
            self.resume_prefix,
            conn.endpoint.as_str(),
            conn.identity.user_id,
            key.part()
        )
    }

    /// Records where a connection stops, at the instant of its drain close. Called with the
    /// registry lock held, in the same critical section as the close.
    pub(super) fn stop_for_resume(&self, inner: &Inner, entry: &ConnEntry) {
        let conn = &entry.conn;
        if self.resume_window.is_zero() || conn.resume.key.get().is_none() {
            return;
        }
        if conn
            .resume
            .closed
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let floor = StreamId(conn.resume.registered_ms.saturating_sub(CLOCK_MARGIN_MS), 0);
        let user = inner.users.get(&conn.identity.user_id);
        let tenant = conn
            .identity
            .tenant_id
            .as_ref()
            .and_then(|t| inner.tenants.get(t));
        let known = [
            user.and_then(|u| u.position.get()),
            tenant.and_then(|t| t.position.get()),
            inner.everyone_position.get(),
        ];
        let record = Record {
            positions: known.map(|p| p.map_or(floor, |p| p.max(floor))),
            topics: topics_of(entry),
        };
        *conn.resume.stopped.lock() = Some(record);
    }

    /// Writes the record of a drained connection (before its close frame goes out).
    pub async fn write_resume(&self, conn: &Connection) {
        let Some(key) = conn.resume.key.get() else {
            return;
        };
        let Some(record) = conn.resume.stopped.lock().take() else {
            return;
        };
        let name = self.resume_name(conn, key);
        let member = record.encode();
        let members = [member.as_str()];
        let write = self.broker.set_merge(&name, &members, self.resume_window);
        match tokio::time::timeout(RESUME_TIMEOUT, write).await {
            Ok(Ok(())) => self.metrics.resume_records.inc(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "writing a resume record failed");
                self.metrics.resume_errors.inc();
            }
            Err(_) => {
                tracing::warn!("writing a resume record timed out");
                self.metrics.resume_errors.inc();
            }
        }
    }

    /// Gives a just registered connection (before its 101) the key its resume record will be
    /// written under, and replays what a drained connection of that key missed. Returns
    /// [`Resumed::Nothing`] when there is no record: then the caller restores remembered topics.
    pub async fn resume(&self, conn: &Arc<Connection>, key: ResumeKey) -> Resumed {
        if self.resume_window.is_zero() {
            return Resumed::Off;
        }
        let name = self.resume_name(conn, &key);
        let _ = conn.resume.key.set(key);
        let Some(members) = self.read_set(&name, RESUME_TIMEOUT, "resume records").await else {
            self.metrics.resume_errors.inc();
            return Resumed::Failed;
        };
        let records: Vec<Record> = members.iter().filter_map(|m| Record::decode(m)).collect();
        if records.is_empty() {
            return Resumed::Nothing;
        }
        // Oldest position per channel over all records (nobody misses anything), newest to
        // count duplicates, union of topics.
        let mut from = records[0].positions;
        let mut seen = records[0].positions;
        let mut topics: Vec<String> = Vec::new();
        for r in &records {
            for i in 0..3 {
                from[i] = from[i].min(r.positions[i]);
                seen[i] = seen[i].max(r.positions[i]);
            }
            for t in &r.topics {
                if !topics.contains(t) {
                    topics.push(t.clone());
                }
            }
        }
        topics.truncate(super::MAX_REMEMBERED_TOPICS.min(self.max_topics));
        // Topics first: the history read that follows covers everything the fan-out filtered
        // out before they were set. A record without topics (drained before its client
        // subscribed) falls back to the remembered ones.
        if topics.is_empty() {
            self.restore_remembered(conn).await;
        } else {
            self.give_topics(conn, &topics);
        }
        let topics = self.topics_of(conn).map(|(t, _)| t).unwrap_or_default();
        let filter = {
            let mut f = super::registry::TopicFilter::default();
            f.topics
                .extend(topics.iter().map(|t| Box::from(t.as_str())));
            f.all = f.topics.contains(ALL_TOPICS);
            f
        };
        let names = &self.registry.names;
        let channels = [
            Some(names.render(Channel::User(&conn.identity.user_id))),
            conn.identity
                .tenant_id
                .as_ref()
                .map(|t| names.render(Channel::Tenant(t))),
            Some(names.render(Channel::Everyone)),
        ];
        let mut replay: Vec<Outgoing> = Vec::new();
        let mut reached: [Option<StreamId>; 3] = [None; 3];
        let mut duplicates = 0u64;
        for (i, channel) in channels.iter().enumerate() {
            let Some(channel) = channel else { continue };
            let mut after = from[i];
            for _ in 0..MAX_PAGES {
                let read = self.broker.history_after(channel, after);
                let page = match tokio::time::timeout(RESUME_TIMEOUT, read).await {
                    Ok(Ok(page)) => page,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "reading history for a resume failed");
                        self.metrics.resume_errors.inc();
                        break;
                    }
                    Err(_) => {
                        tracing::warn!("reading history for a resume timed out");
                        self.metrics.resume_errors.inc();
                        break;
                    }
                };
                let full = page.len() >= crate::broker::MAX_REPLAY;
                for (position, payload) in page {
                    after = position;
                    reached[i] = Some(position);
                    let Ok(env) = protocol::decode(payload) else {
                        continue;
                    };
                    let wanted = match env.kind {
                        Kind::Notification => {
                            conn.endpoint == Endpoint::Notws && filter.matches(&env.topic)
                        }
                        Kind::Chat => conn.endpoint == Endpoint::Chat,
                        Kind::Canary | Kind::Revoke => false,
                    };
                    if !wanted {
                        continue;
                    }
                    if position <= seen[i] {
                        duplicates += 1;
                    }
                    replay.push(Outgoing {
                        frame: env.frame,
                        published_at: env.published_at,
                        position: Some((SLOTS[i], position)),
                    });
                }
                if !full {
                    break;
                }
            }
        }
        // One order over the channels: by position (time), stable within a channel.
        replay.sort_by_key(|m| m.position.map(|(_, p)| p));
        let messages = replay.len();
        conn.outbound.splice_replay(replay, reached);
        if let [used] = members.as_slice() {
            // Used: a later reconnect of the same key must not replay it again. Only this
            // member goes: another connection's record written meanwhile stays for it.
            let _ = tokio::time::timeout(
                RESUME_TIMEOUT,
                self.broker.set_remove(&name, &[used.as_str()]),
            )
            .await;
        }
        self.metrics.resumed.inc();
        self.metrics.resume_replayed.inc_by(messages as u64);
        self.metrics.resume_duplicates.inc_by(duplicates);
        Resumed::Replayed {
            records: records.len(),
            messages,
        }
    }

    /// The record's topics replace whatever the connection has (it sent nothing yet).
    fn give_topics(&self, conn: &Connection, topics: &[String]) {
        if conn.endpoint != Endpoint::Notws || topics.is_empty() {
            return;
        }
        let mut inner = self.registry.inner.lock();
        let entry = inner
            .users
            .get_mut(&conn.identity.user_id)
            .and_then(|u| u.conns.iter_mut().find(|c| c.conn.id == conn.id));
        if let Some(entry) = entry {
            if entry.topics.origin != TopicOrigin::Fresh {
                return;
            }
            let filter = &mut entry.topics;
            let before = filter.topics.len();
            filter
                .topics
                .extend(topics.iter().map(|t| Box::from(t.as_str())));
            filter.all = filter.topics.contains(ALL_TOPICS);
            filter.origin = TopicOrigin::Restored;
            let added = filter.topics.len() - before;
            self.metrics.topic_subscriptions.add(added as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::Broker;
    use crate::hub::{HubLimits, TopicChange};
    use crate::identity::Identity;
    use crate::metrics::Metrics;
    use std::collections::VecDeque;

    async fn hub() -> Arc<Hub> {
        let hub = Hub::new(
            "t",
            Arc::new(Metrics::new()),
            HubLimits {
                max_connections_per_user: 0,
                outbound_queue: 8,
                outbound_queue_bytes: 1 << 20,
                unsubscribe_delay: Duration::from_millis(10),
                ping_interval: Duration::from_secs(30),
                max_topics: usize::MAX,
                resubscribe_window: Duration::from_secs(60),
                resume_window: Duration::from_secs(30),
            },
            |sink| Broker::Memory(MemoryBroker::new(sink, Duration::from_secs(60))),
        );
        hub.start().await.expect("start");
        hub
    }

    fn who() -> Identity {
        Identity {
            user_id: Arc::from("u"),
            tenant_id: Some(Arc::from("t1")),
        }
    }

    async fn send(hub: &Hub, range: std::ops::Range<u32>) {
        for i in range {
            let channel = if i % 3 == 0 {
                Channel::Everyone
            } else if i % 3 == 1 {
                Channel::Tenant("t1")
            } else {
                Channel::User("u")
            };
            let env = protocol::encode(Kind::Notification, "A", i.to_string().as_bytes());
            hub.publish(&[channel], env).await.expect("publish");
        }
    }

    fn taken(conn: &Connection) -> Vec<u32> {
        let mut q = VecDeque::new();
        conn.outbound.take(&mut q);
        q.iter()
            .map(|m| m.frame.as_str().parse().expect("number"))
            .collect()
    }

    #[tokio::test]
    async fn a_drained_connection_resumes_with_no_gap_and_no_duplicate() {
        let hub = hub().await;
        let key = ResumeKey::Key([7; 32]);
        let a = hub
            .register(who(), Endpoint::Notws)
            .await
            .expect("register");
        assert_eq!(hub.resume(&a.conn, key.clone()).await, Resumed::Nothing);
        hub.set_topics(&a.conn, &["ALL"], TopicChange::Subscribe)
            .expect("topics");
        send(&hub, 0..5).await;
        assert_eq!(taken(&a.conn), (0..5).collect::<Vec<_>>());
        hub.close_for_drain(&a.conn);
        send(&hub, 5..10).await;
        // The drain's final sweep closes it again: the first record stays.
        hub.close_all(crate::disconnect::CloseReason::Drain);
        hub.write_resume(&a.conn).await;
        drop(a);
        let b = hub
            .register(who(), Endpoint::Notws)
            .await
            .expect("register");
        // Published between the registration and the replay: live and in history.
        send(&hub, 10..12).await;
        let resumed = hub.resume(&b.conn, key.clone()).await;
        assert_eq!(
            resumed,
            Resumed::Replayed {
                records: 1,
                messages: 7
            }
        );
        send(&hub, 12..14).await;
        assert_eq!(taken(&b.conn), (5..14).collect::<Vec<_>>());
        assert_eq!(hub.metrics.resume_duplicates.get(), 0);
        // Used once: a later reconnect does not replay it again.
        let c = hub
            .register(who(), Endpoint::Notws)
            .await
            .expect("register");
        assert_eq!(hub.resume(&c.conn, key).await, Resumed::Nothing);
    }

    #[tokio::test]
    async fn a_record_without_topics_falls_back_to_the_remembered_ones() {
        let hub = hub().await;
        let app = hub
            .register(who(), Endpoint::Notws)
            .await
            .expect("register");
        hub.set_topics(&app.conn, &["ALL"], TopicChange::Subscribe)
            .expect("topics");
        hub.remember_explicit(&app.conn).await;
        let key = ResumeKey::Key([9; 32]);
        // Drained before its client subscribed.
        let early = hub
            .register(who(), Endpoint::Notws)
            .await
            .expect("register");
        hub.resume(&early.conn, key.clone()).await;
        hub.close_for_drain(&early.conn);
        send(&hub, 0..3).await;
        hub.write_resume(&early.conn).await;
        drop(early);
        let back = hub
            .register(who(), Endpoint::Notws)
            .await
            .expect("register");
        hub.resume(&back.conn, key).await;
        assert_eq!(taken(&back.conn), vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn two_connections_of_one_key_both_get_everything() {
        let hub = hub().await;
        let key = ResumeKey::Cookie("ab".repeat(16));
        let a = hub
            .register(who(), Endpoint::Notws)
            .await
            .expect("register");
        let b = hub
            .register(who(), Endpoint::Notws)
            .await
            .expect("register");
        for r in [&a, &b] {
            hub.resume(&r.conn, key.clone()).await;
            hub.set_topics(&r.conn, &["ALL"], TopicChange::Subscribe)
                .expect("topics");
        }
        send(&hub, 0..3).await;
        hub.close_for_drain(&a.conn);
        send(&hub, 3..6).await;
        hub.close_for_drain(&b.conn);
        send(&hub, 6..8).await;
        hub.write_resume(&a.conn).await;
        hub.write_resume(&b.conn).await;
        drop((a, b));
        for _ in 0..2 {
            let r = hub
                .register(who(), Endpoint::Notws)
                .await
                .expect("register");
            hub.resume(&r.conn, key.clone()).await;
            assert_eq!(taken(&r.conn), (3..8).collect::<Vec<_>>());
        }
        assert_eq!(hub.metrics.resume_duplicates.get(), 6, "3..6 twice");
    }

    #[test]
    fn records_round_trip() {
        let r = Record {
            positions: [StreamId(1, 2), StreamId(3, 0), StreamId(4, 5)],
            topics: vec!["ALL".into(), "a b".into()],
        };
        assert_eq!(Record::decode(&r.encode()), Some(r.clone()));
        assert_ne!(r.encode(), r.encode(), "two connections: two members");
        assert_eq!(Record::decode("x 1-0 bad 2-0"), None);
    }
}
