//! The hub's unit tests.

use std::collections::VecDeque;

use super::*;
use crate::broker::memory::MemoryBroker;
use crate::protocol::{self, Kind};

/// The hub's in-process broker, for looking at its subscriptions.
struct Mem(Arc<Hub>);

impl Mem {
    fn channels(&self) -> Vec<String> {
        match self.0.broker() {
            Broker::Memory(m) => m.channels(),
            Broker::Redis(_) => unreachable!("hub tests run on the in-process broker"),
        }
    }
}

fn hub(delay_ms: u64) -> (Arc<Hub>, Mem) {
    let metrics = Arc::new(Metrics::new());
    let hub = Hub::new(
        "t",
        metrics,
        HubLimits {
            max_connections_per_user: 2,
            outbound_queue: 4,
            outbound_queue_bytes: 1 << 20,
            unsubscribe_delay: Duration::from_millis(delay_ms),
            ping_interval: Duration::from_secs(30),
            max_topics: 3,
            resubscribe_window: Duration::from_secs(600),
            resume_window: Duration::from_secs(30),
        },
        |sink| Broker::Memory(MemoryBroker::new(sink, Duration::from_secs(60))),
    );
    (hub.clone(), Mem(hub))
}

fn id(user: &str, tenant: Option<&str>) -> Identity {
    Identity {
        user_id: Arc::from(user),
        tenant_id: tenant.map(Arc::from),
    }
}

async fn register(
    hub: &Arc<Hub>,
    user: &str,
    tenant: Option<&str>,
    endpoint: Endpoint,
) -> Registration {
    hub.register(id(user, tenant), endpoint)
        .await
        .expect("register")
}

fn subscribed(mem: &Mem, channel: &str) -> bool {
    mem.channels().iter().any(|c| c == channel)
}

/// Lets the hub's tasks (the reaper) run at the current (paused) instant.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

// Paused time: the clock moves only when every task is idle, straight to the next timer, so
// these tests are exact and never wait for real.
#[tokio::test(start_paused = true)]
async fn channels_are_reference_counted_and_released_after_the_delay() {
    let (hub, mem) = hub(50);
    hub.start().await.expect("start");
    let a = register(&hub, "u1", Some("T"), Endpoint::Notws).await;
    let b = register(&hub, "u1", Some("T"), Endpoint::Chat).await;
    let mut chans = mem.channels();
    chans.sort();
    assert_eq!(chans, vec!["t:all", "t:t:T", "t:u:u1"]);
    drop(a);
    assert!(subscribed(&mem, "t:u:u1"));
    drop(b);
    tokio::time::sleep(Duration::from_millis(49)).await;
    settle().await;
    assert!(subscribed(&mem, "t:u:u1"), "still there during the delay");
    tokio::time::sleep(Duration::from_millis(2)).await;
    settle().await;
    assert_eq!(mem.channels(), vec!["t:all"]);
}

#[tokio::test(start_paused = true)]
async fn reconnect_within_the_delay_keeps_the_channel() {
    let (hub, mem) = hub(200);
    hub.start().await.expect("start");
    let a = register(&hub, "u1", None, Endpoint::Notws).await;
    drop(a);
    // The client takes a while to come back; the reaper runs meanwhile.
    tokio::time::sleep(Duration::from_millis(150)).await;
    settle().await;
    assert!(
        subscribed(&mem, "t:u:u1"),
        "dropped before the delay ran out"
    );
    let _b = register(&hub, "u1", None, Endpoint::Notws).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    settle().await;
    assert!(subscribed(&mem, "t:u:u1"));
    assert_eq!(
        hub.channel_refs(),
        vec![("t:all".to_string(), 1), ("t:u:u1".to_string(), 1)]
    );
}

/// Released at 0 (deadline 1000), taken again at 500, released again at 600: the channel must
/// live until 1600, not go at the first, stale deadline.
#[tokio::test(start_paused = true)]
async fn a_channel_released_again_lingers_from_its_latest_release() {
    let (hub, mem) = hub(1000);
    hub.start().await.expect("start");
    let a = register(&hub, "u1", None, Endpoint::Notws).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = register(&hub, "u1", None, Endpoint::Notws).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(b);
    tokio::time::sleep(Duration::from_millis(500)).await; // t = 1100
    settle().await;
    assert!(
        subscribed(&mem, "t:u:u1"),
        "dropped at the deadline of an earlier release"
    );
    tokio::time::sleep(Duration::from_millis(501)).await; // t = 1601
    settle().await;
    assert!(!subscribed(&mem, "t:u:u1"), "kept past its latest deadline");
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

/// Memory per idle connection: a user's only connection takes one slot, not the four a first
/// push into an empty `Vec` reserves (ARCHITECTURE.md, "Memory per connection").
#[tokio::test]
async fn a_single_connection_user_reserves_one_slot() {
    let (hub, _) = hub(10);
    let _a = hub.register(id("u", None), Endpoint::Notws).await;
    let capacity = |hub: &Hub| {
        hub.registry
            .inner
            .lock()
            .users
            .get("u")
            .map_or(0, |u| u.conns.capacity())
    };
    assert_eq!(capacity(&hub), 1);
    let _b = hub.register(id("u", None), Endpoint::Notws).await;
    assert!(capacity(&hub) >= 2);
}

#[tokio::test]
async fn topic_filter_and_shared_bytes() {
    let (hub, _) = hub(10);
    hub.start().await.expect("start");
    let a = register(&hub, "u", None, Endpoint::Notws).await;
    let b = register(&hub, "u", None, Endpoint::Notws).await;
    hub.set_topics(&a.conn, &["A", "B"], TopicChange::Subscribe)
        .expect("within --max-topics");
    hub.set_topics(&b.conn, &["ALL"], TopicChange::Subscribe)
        .expect("within --max-topics");
    for topic in ["A", "C"] {
        let frame = format!(r#"{{"topic":"{topic}"}}"#);
        let env = protocol::encode(Kind::Notification, topic, frame.as_bytes());
        hub.publish(&[Channel::User("u")], env)
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

/// A publish to many users reaches a node as one broker message per user, all with one
/// payload: each recipient gets it, and the metrics count every delivery once the batch is
/// flushed (they are tallied under the registry's lock, not per message).
#[tokio::test]
async fn messages_sharing_a_payload_are_all_delivered_and_counted_at_the_flush() {
    use crate::broker::MessageSink;
    let (hub, _) = hub(10);
    hub.start().await.expect("start");
    let a = register(&hub, "u1", None, Endpoint::Notws).await;
    let b = register(&hub, "u2", None, Endpoint::Notws).await;
    for r in [&a, &b] {
        hub.set_topics(&r.conn, &["ALL"], TopicChange::Subscribe)
            .expect("within --max-topics");
    }
    let before = hub.metrics.notws.deliveries.get();
    let payload = protocol::encode(Kind::Notification, "X", br#"{"n":1}"#);
    hub.registry.deliver(&["t:u:u1"], payload.clone(), None);
    hub.registry.deliver(&["t:u:u2"], payload, None);
    assert_eq!(
        hub.metrics.notws.deliveries.get(),
        before,
        "counted at the flush"
    );
    hub.registry.flush();
    assert_eq!(hub.metrics.notws.deliveries.get(), before + 2);
    assert_eq!(hub.metrics.fanout_recipients.get_sample_count(), 2);
    let (mut qa, mut qb) = (VecDeque::new(), VecDeque::new());
    a.conn.outbound.take(&mut qa);
    b.conn.outbound.take(&mut qb);
    assert_eq!(qa.len() + qb.len(), 2);
    assert_eq!(qa[0].frame.as_ptr(), qb[0].frame.as_ptr());
}

#[tokio::test]
async fn overflow_closes_as_slow_consumer() {
    let (hub, _) = hub(10);
    hub.start().await.expect("start");
    let a = register(&hub, "u", None, Endpoint::Notws).await;
    hub.set_topics(&a.conn, &["ALL"], TopicChange::Subscribe)
        .expect("within --max-topics");
    for _ in 0..10 {
        let env = protocol::encode(Kind::Notification, "X", b"{}");
        hub.publish(&[Channel::User("u")], env)
            .await
            .expect("publish");
    }
    let mut q = VecDeque::new();
    let wake = a.conn.outbound.take(&mut q);
    assert_eq!(wake.close, Some(CloseReason::SlowConsumer));
    assert!(q.is_empty(), "an overflow discards the queue");
}

#[tokio::test]
async fn max_topics_counts_distinct_topics_and_applies_nothing_beyond_it() {
    let (hub, _) = hub(10);
    hub.start().await.expect("start");
    let a = register(&hub, "u", None, Endpoint::Notws).await;
    // Duplicates count once; re-subscribing a held topic costs nothing.
    hub.set_topics(&a.conn, &["A", "A", "B"], TopicChange::Subscribe)
        .expect("two distinct topics");
    hub.set_topics(&a.conn, &["B", "C"], TopicChange::Subscribe)
        .expect("three distinct topics");
    assert_eq!(
        hub.set_topics(&a.conn, &["D"], TopicChange::Subscribe),
        Err(TooManyTopics)
    );
    // Refused without the lock: more distinct topics in one frame than the limit.
    assert_eq!(
        hub.set_topics(&a.conn, &["1", "2", "3", "4"], TopicChange::Subscribe),
        Err(TooManyTopics)
    );
    assert_eq!(hub.metrics.topic_subscriptions.get(), 3);
    // A long unsubscribe walks the connection's set instead.
    hub.set_topics(
        &a.conn,
        &["A", "B", "x", "y", "z"],
        TopicChange::Unsubscribe,
    )
    .expect("unsubscribe");
    hub.set_topics(&a.conn, &["D"], TopicChange::Subscribe)
        .expect("room again");
    assert_eq!(hub.metrics.topic_subscriptions.get(), 2);
}

/// Whether the writer has a wake-up waiting, without waiting for one.
fn woken(out: &Outbound) -> bool {
    use futures_util::FutureExt;
    out.ready.notified().now_or_never().is_some()
}

#[test]
fn a_wanted_ping_rides_on_the_next_write_and_wakes_the_writer_only_when_none_came() {
    let msg = Outgoing {
        frame: "m".into(),
        published_at: 0,
        position: None,
    };
    let mut taken = VecDeque::new();

    // A busy connection: the ping is taken with the messages, and no wake is left for it.
    let out = Outbound::new(4, 1 << 20);
    out.want_ping();
    assert!(!woken(&out), "wanting a ping must not wake the writer");
    assert_eq!(out.push(msg.clone()), outbound::Push::First);
    out.wake();
    assert!(woken(&out));
    let wake = out.take(&mut taken);
    assert_eq!((taken.len(), wake.ping), (1, true));
    out.ping_if_pending();
    assert!(
        !woken(&out),
        "a ping that went with the messages is not sent again"
    );

    // An idle connection: half an interval later the sweep wakes it for the ping alone.
    let out = Outbound::new(4, 1 << 20);
    out.want_ping();
    out.ping_if_pending();
    assert!(woken(&out));
    taken.clear();
    let wake = out.take(&mut taken);
    assert_eq!((taken.len(), wake.ping), (0, true));
    assert!(!out.take(&mut taken).ping, "one ping per wanted ping");
}

/// The registry is the node's record of what it delivered per channel (`MessageSink`): a
/// user's channel keeps its position while it lingers, so that a gap is still seen when the
/// user comes back within the delay, and loses it with the unsubscribe.
#[tokio::test(start_paused = true)]
async fn a_lingering_channel_keeps_its_position_until_it_is_unsubscribed() {
    use crate::broker::{MessageSink, StreamId, Verdict};
    let (hub, mem) = hub(200);
    hub.start().await.expect("start");
    let sink: &Registry = &hub.registry;
    let at = |ms| Some(StreamId(ms, 0));
    let payload = protocol::encode(Kind::Notification, "X", b"{}");
    let user = "t:u:u1";
    let tenant = "t:t:T";

    let a = register(&hub, "u1", Some("T"), Endpoint::Notws).await;
    assert_eq!(sink.admit(user, &payload, None, at(1)), Verdict::Deliver);
    assert_eq!(sink.admit(tenant, &payload, None, at(2)), Verdict::Deliver);
    assert_eq!(sink.admit(user, &payload, None, at(1)), Verdict::Duplicate);
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    settle().await;
    assert!(subscribed(&mem, user), "lingering");
    assert!(sink.holds(user) && sink.holds(tenant));
    assert_eq!((sink.position(user), sink.position(tenant)), (at(1), at(2)));
    let mut known = sink.known();
    known.sort();
    assert_eq!(
        known,
        vec![
            (tenant.to_string(), StreamId(2, 0)),
            (user.to_string(), StreamId(1, 0)),
        ]
    );
    // Nobody is connected, yet the node is subscribed: what arrives is still recorded.
    assert_eq!(sink.admit(user, &payload, at(1), at(3)), Verdict::Deliver);

    // Back within the delay: the position is the channel's, not a fresh one, so a message
    // after a gap is held back for recovery rather than delivered over the hole.
    let b = register(&hub, "u1", Some("T"), Endpoint::Notws).await;
    assert_eq!(
        sink.admit(user, &payload, at(4), at(5)),
        Verdict::Gap {
            after: StreamId(3, 0)
        }
    );
    assert_eq!(
        hub.broker()
            .presence(vec!["u1".into()])
            .await
            .expect("presence"),
        vec![true],
        "back online"
    );

    drop(b);
    tokio::time::sleep(Duration::from_millis(201)).await;
    settle().await;
    assert_eq!(mem.channels(), vec!["t:all"]);
    assert!(!sink.holds(user) && !sink.holds(tenant));
    assert_eq!(sink.position(user), None);
    assert!(sink.known().is_empty());
    assert!(
        hub.registry.inner.lock().users.is_empty(),
        "the entry went with its channel"
    );
    // A channel not held is delivered to nobody and judged by nothing.
    assert_eq!(sink.admit(user, &payload, at(9), at(10)), Verdict::Deliver);
}
