//! Remembered topics: subscriptions that survive reconnects (`--resubscribe-window`).
//!
//! GrowERP's client sends `subscribe: ALL` once per app start and never again, so after any
//! reconnect (a drain's 1012, 4000, 4008, a network change) it would receive nothing. The hub
//! therefore remembers, per user and endpoint, the topics of that user's connections, in a
//! broker set named `{prefix}:topics:{endpoint}:{user}` that every node reads and writes (Redis
//! when configured, in memory on the in-process broker). Only `/notws` has topics.
//!
//! - **Restore, before the 101.** A new connection reads its user's set after it is registered
//!   and before the handshake completes, and starts with those topics; so whatever is published
//!   after the client sees the 101 reaches it.
//! - **An explicit frame wins.** A connection's first `subscribe:` replaces whatever it was
//!   given (it gets exactly what it asks for, as Moqui's browser client expects); an
//!   `unsubscribe:` edits its current set. After either, the connection's resulting set
//!   *replaces* the remembered set, with a fresh expiry.
//! - **Closing merges.** When a connection with topics closes (before its close frame is sent,
//!   so a client that reconnects on the close finds the set written) its topics are *added* to
//!   the remembered set and the expiry restarts.
//! - **Several connections**: the remembered set is the set declared by the user's most recent
//!   explicit frame on that endpoint, plus the topics of every connection that closed since, for
//!   `--resubscribe-window` after the last of these writes. So a GrowERP app (`ALL`) and a Moqui
//!   tab (its own list) of the same user cannot make each other miss anything on a reconnect:
//!   at worst a reconnecting client gets more topics than it had, never fewer.
//! - **Capped** at [`MAX_REMEMBERED_TOPICS`] per set read or written (`ALL` is kept first), and
//!   a restored connection gets at most `--max-topics` of them.
//! - **Not covered**: a node that dies without closing its sockets writes nothing at close, so
//!   its clients get the set of their last explicit frame only if that is younger than the
//!   window.
//!
//! A resume record of a drained connection, when one exists, takes precedence: the caller
//! skips [`Hub::restore_remembered`] then.

use std::time::Duration;

use super::registry::TopicFilter;
use super::Hub;
use crate::hub::Connection;
use crate::protocol::{Endpoint, ALL_TOPICS};

/// Most topics remembered (and restored) per user and endpoint.
pub const MAX_REMEMBERED_TOPICS: usize = 1000;

/// How long a broker write or read of a remembered set may take before it is abandoned.
const REMEMBERED_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a connection's topics came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum TopicOrigin {
    /// Nothing sent, nothing restored.
    #[default]
    Fresh,
    /// Given from the user's remembered set; the first `subscribe:` replaces them.
    Restored,
    /// The client sent `subscribe:` or `unsubscribe:`.
    Explicit,
}

/// What [`Hub::restore_remembered`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// The window is 0, or the endpoint has no topics.
    Off,
    /// Nothing was remembered (or it expired).
    Empty,
    /// This many topics were given to the connection.
    Restored(usize),
    /// The broker did not answer; the connection starts empty.
    Failed,
}

/// The remembered-topic settings of a hub.
pub(super) struct Remembered {
    prefix: String,
    window: Duration,
}

impl Remembered {
    pub(super) fn new(prefix: &str, window: Duration) -> Remembered {
        Remembered {
            prefix: format!("{prefix}:topics:"),
            window,
        }
    }

    fn enabled(&self, endpoint: Endpoint) -> bool {
        !self.window.is_zero() && endpoint == Endpoint::Notws
    }

    fn name(&self, conn: &Connection) -> String {
        format!(
            "{}{}:{}",
            self.prefix,
            conn.endpoint.as_str(),
            conn.identity.user_id
        )
    }
}

/// A topic filter's topics, `ALL` first, capped.
fn snapshot(filter: &TopicFilter) -> Vec<String> {
    let mut out = Vec::with_capacity(filter.topics.len().min(MAX_REMEMBERED_TOPICS));
    if filter.all {
        out.push(ALL_TOPICS.to_string());
    }
    out.extend(
        filter
            .topics
            .iter()
            .filter(|t| &***t != ALL_TOPICS)
            .take(MAX_REMEMBERED_TOPICS - out.len())
            .map(|t| t.to_string()),
    );
    out
}

impl Hub {
    /// The connection's topics now, `None` if it is gone.
    pub(super) fn topics_of(&self, conn: &Connection) -> Option<(Vec<String>, TopicOrigin)> {
        let inner = self.registry.inner.lock();
        let user = inner.users.get(&conn.identity.user_id)?;
        let entry = user.conns.iter().find(|c| c.conn.id == conn.id)?;
        Some((snapshot(&entry.topics), entry.topics.origin))
    }

    /// Gives a connection that has sent no topic frame its user's remembered topics. Called
    /// after [`Hub::register`] and before the handshake completes.
    pub async fn restore_remembered(&self, conn: &Connection) -> Restore {
        if !self.remembered.enabled(conn.endpoint) {
            return Restore::Off;
        }
        let name = self.remembered.name(conn);
        let read = self.read_set(
            &name,
            REMEMBERED_TIMEOUT,
            "remembered topics (starting empty)",
        );
        let Some(mut topics) = read.await else {
            self.metrics.remembered_errors.inc();
            return Restore::Failed;
        };
        // Deterministic under the cap, ALL first. The set merges every closed connection's
        // topics, so it can hold more than one connection may (`--max-topics`): a restored
        // connection gets no more than a `subscribe:` frame could give it.
        topics.sort_unstable_by(|a, b| (b == ALL_TOPICS).cmp(&(a == ALL_TOPICS)).then(a.cmp(b)));
        topics.truncate(MAX_REMEMBERED_TOPICS.min(self.max_topics));
        let given = {
            let mut inner = self.registry.inner.lock();
            let entry = inner
                .users
                .get_mut(&conn.identity.user_id)
                .and_then(|u| u.conns.iter_mut().find(|c| c.conn.id == conn.id));
            match entry {
                Some(entry) if entry.topics.origin == TopicOrigin::Fresh && !topics.is_empty() => {
                    let filter = &mut entry.topics;
                    let before = filter.topics.len();
                    filter
                        .topics
                        .extend(topics.iter().map(|t| Box::from(t.as_str())));
                    filter.all = filter.topics.contains(ALL_TOPICS);
                    filter.origin = TopicOrigin::Restored;
                    let added = filter.topics.len() - before;
                    self.metrics.topic_subscriptions.add(added as i64);
                    added
                }
                _ => 0,
            }
        };
        if given == 0 {
            self.metrics.remembered_empty.inc();
            Restore::Empty
        } else {
            self.metrics.remembered_restored.inc();
            self.metrics.remembered_topics_restored.inc_by(given as u64);
            Restore::Restored(given)
        }
    }

    /// After a `subscribe:` / `unsubscribe:` frame: the connection's set becomes its user's
    /// remembered set.
    pub async fn remember_explicit(&self, conn: &Connection) {
        if !self.remembered.enabled(conn.endpoint) {
            return;
        }
        let Some((topics, _)) = self.topics_of(conn) else {
            return;
        };
        let name = self.remembered.name(conn);
        let members: Vec<&str> = topics.iter().map(String::as_str).collect();
        let write = self
            .broker
            .set_replace(&name, &members, self.remembered.window);
        self.finish_write(tokio::time::timeout(REMEMBERED_TIMEOUT, write).await);
    }

    /// When the connection closes: its topics join its user's remembered set.
    pub async fn remember_on_close(&self, conn: &Connection) {
        if !self.remembered.enabled(conn.endpoint) {
            return;
        }
        let Some((topics, origin)) = self.topics_of(conn) else {
            return;
        };
        if topics.is_empty() || origin == TopicOrigin::Fresh {
            return;
        }
        let name = self.remembered.name(conn);
        let members: Vec<&str> = topics.iter().map(String::as_str).collect();
        let write = self
            .broker
            .set_merge(&name, &members, self.remembered.window);
        self.finish_write(tokio::time::timeout(REMEMBERED_TIMEOUT, write).await);
    }

    fn finish_write(
        &self,
        result: Result<Result<(), crate::broker::BrokerError>, tokio::time::error::Elapsed>,
    ) {
        let failed = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        tracing::warn!(error = %failed, "writing remembered topics failed");
        self.metrics.remembered_write_errors.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::Broker;
    use crate::hub::{HubLimits, Registration, TopicChange};
    use crate::identity::Identity;
    use crate::metrics::Metrics;

    fn hub(window: Duration) -> Arc<Hub> {
        hub_with(window, usize::MAX)
    }

    fn hub_with(window: Duration, max_topics: usize) -> Arc<Hub> {
        Hub::new(
            "t",
            Arc::new(Metrics::new()),
            HubLimits {
                max_connections_per_user: 0,
                outbound_queue: 4,
                outbound_queue_bytes: 1 << 20,
                unsubscribe_delay: Duration::from_millis(10),
                ping_interval: Duration::from_secs(30),
                max_topics,
                resubscribe_window: window,
                resume_window: Duration::ZERO,
            },
            |sink| Broker::Memory(MemoryBroker::new(sink, Duration::from_secs(60))),
        )
    }

    async fn connect(hub: &Arc<Hub>, user: &str, endpoint: Endpoint) -> (Registration, Restore) {
        let identity = Identity {
            user_id: Arc::from(user),
            tenant_id: None,
        };
        let reg = hub.register(identity, endpoint).await.expect("register");
        let restore = hub.restore_remembered(&reg.conn).await;
        (reg, restore)
    }

    async fn frame(hub: &Hub, reg: &Registration, topics: &[&str], change: TopicChange) {
        hub.set_topics(&reg.conn, topics, change)
            .expect("within --max-topics");
        hub.remember_explicit(&reg.conn).await;
    }

    async fn close(hub: &Hub, reg: Registration) {
        hub.remember_on_close(&reg.conn).await;
        drop(reg);
    }

    fn topics(hub: &Hub, reg: &Registration) -> Vec<String> {
        let mut t = hub.topics_of(&reg.conn).expect("registered").0;
        t.sort();
        t
    }

    fn sets(hub: &Hub) -> Vec<String> {
        match hub.broker() {
            Broker::Memory(m) => m.set_names(),
            Broker::Redis(_) => unreachable!("in-process broker"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnect_without_subscribe_gets_the_previous_topics() {
        let hub = hub(Duration::from_secs(600));
        let (first, restore) = connect(&hub, "u", Endpoint::Notws).await;
        assert_eq!(restore, Restore::Empty);
        frame(&hub, &first, &["ALL"], TopicChange::Subscribe).await;
        close(&hub, first).await;

        let (second, restore) = connect(&hub, "u", Endpoint::Notws).await;
        assert_eq!(restore, Restore::Restored(1));
        assert_eq!(topics(&hub, &second), ["ALL"]);
        // Its close keeps the set alive for a third connection.
        close(&hub, second).await;
        tokio::time::sleep(Duration::from_secs(599)).await;
        let (third, _) = connect(&hub, "u", Endpoint::Notws).await;
        assert_eq!(topics(&hub, &third), ["ALL"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_set_expires_after_the_window() {
        let hub = hub(Duration::from_secs(60));
        let (first, _) = connect(&hub, "u", Endpoint::Notws).await;
        frame(&hub, &first, &["A"], TopicChange::Subscribe).await;
        close(&hub, first).await;
        tokio::time::sleep(Duration::from_secs(61)).await;
        let (second, restore) = connect(&hub, "u", Endpoint::Notws).await;
        assert_eq!(restore, Restore::Empty);
        assert!(topics(&hub, &second).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_explicit_subscribe_replaces_restored_topics_and_the_set() {
        let hub = hub(Duration::from_secs(600));
        let (first, _) = connect(&hub, "u", Endpoint::Notws).await;
        frame(&hub, &first, &["ALL"], TopicChange::Subscribe).await;
        close(&hub, first).await;

        let (moqui, restore) = connect(&hub, "u", Endpoint::Notws).await;
        assert_eq!(restore, Restore::Restored(1));
        frame(&hub, &moqui, &["B", "A"], TopicChange::Subscribe).await;
        assert_eq!(
            topics(&hub, &moqui),
            ["A", "B"],
            "exactly what it asked for"
        );
        // A second subscribe adds, as in Moqui.
        frame(&hub, &moqui, &["C"], TopicChange::Subscribe).await;
        frame(&hub, &moqui, &["A"], TopicChange::Unsubscribe).await;
        assert_eq!(topics(&hub, &moqui), ["B", "C"]);

        let (later, _) = connect(&hub, "u", Endpoint::Notws).await;
        assert_eq!(
            topics(&hub, &later),
            ["B", "C"],
            "the explicit set replaced ALL"
        );
        // Unsubscribing everything forgets the set.
        frame(&hub, &moqui, &["B", "C"], TopicChange::Unsubscribe).await;
        assert!(sets(&hub).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn closing_connections_add_their_topics() {
        let hub = hub(Duration::from_secs(600));
        let (app, _) = connect(&hub, "u", Endpoint::Notws).await;
        frame(&hub, &app, &["ALL"], TopicChange::Subscribe).await;
        let (tab, _) = connect(&hub, "u", Endpoint::Notws).await;
        assert_eq!(topics(&hub, &tab), ["ALL"]);
        frame(&hub, &tab, &["Orders"], TopicChange::Subscribe).await;
        // The tab's frame made its list the set; the app's close adds ALL back.
        close(&hub, app).await;
        let (back, _) = connect(&hub, "u", Endpoint::Notws).await;
        assert_eq!(topics(&hub, &back), ["ALL", "Orders"]);
        // A connection that never had topics writes nothing when it closes.
        let (fresh, _) = connect(&hub, "v", Endpoint::Notws).await;
        close(&hub, fresh).await;
        assert_eq!(sets(&hub), ["t:topics:notws:u"]);
    }

    #[tokio::test(start_paused = true)]
    async fn only_notws_and_only_with_a_window() {
        let hub_on = hub(Duration::from_secs(600));
        let (chat, restore) = connect(&hub_on, "u", Endpoint::Chat).await;
        assert_eq!(restore, Restore::Off);
        close(&hub_on, chat).await;
        assert!(sets(&hub_on).is_empty());

        let off = hub(Duration::ZERO);
        let (first, _) = connect(&off, "u", Endpoint::Notws).await;
        frame(&off, &first, &["ALL"], TopicChange::Subscribe).await;
        close(&off, first).await;
        let (second, restore) = connect(&off, "u", Endpoint::Notws).await;
        assert_eq!(restore, Restore::Off);
        assert!(topics(&off, &second).is_empty());
        assert!(sets(&off).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_set_is_capped_and_keeps_all() {
        let hub = hub(Duration::from_secs(600));
        let (first, _) = connect(&hub, "u", Endpoint::Notws).await;
        let many: Vec<String> = (0..MAX_REMEMBERED_TOPICS + 50)
            .map(|i| format!("t{i}"))
            .collect();
        let mut refs: Vec<&str> = many.iter().map(String::as_str).collect();
        refs.push(ALL_TOPICS);
        frame(&hub, &first, &refs, TopicChange::Subscribe).await;
        close(&hub, first).await;
        let (second, restore) = connect(&hub, "u", Endpoint::Notws).await;
        assert_eq!(restore, Restore::Restored(MAX_REMEMBERED_TOPICS));
        assert!(topics(&hub, &second).iter().any(|t| t == ALL_TOPICS));
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_connection_gets_no_more_than_max_topics() {
        let hub = hub_with(Duration::from_secs(600), 3);
        // Two connections of one user, within the limit each; merged on close, over it.
        let (a, _) = connect(&hub, "u", Endpoint::Notws).await;
        let (b, _) = connect(&hub, "u", Endpoint::Notws).await;
        frame(&hub, &a, &["t1", "t2", ALL_TOPICS], TopicChange::Subscribe).await;
        frame(&hub, &b, &["t3", "t4"], TopicChange::Subscribe).await;
        close(&hub, a).await;
        close(&hub, b).await;
        let (c, restore) = connect(&hub, "u", Endpoint::Notws).await;
        assert_eq!(restore, Restore::Restored(3));
        let got = topics(&hub, &c);
        assert!(
            got.iter().any(|t| t == ALL_TOPICS),
            "ALL is kept first: {got:?}"
        );
    }
}
