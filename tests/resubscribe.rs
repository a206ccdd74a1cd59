//! Subscriptions survive reconnects (`--resubscribe-window`): a client that behaves exactly like
//! GrowERP's `WsClient` (it sends `subscribe: ALL` once per app start, reconnects a fixed delay
//! after any close and never subscribes again) keeps its notifications across a drain of its
//! node, reconnecting through another node on the same real Redis.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

/// GrowERP waits 5 s before reconnecting; shortened here.
const RECONNECT: Duration = Duration::from_millis(200);
/// Notifications published after the reconnect completed.
const AFTER: usize = 300;

fn redis_config(
    backend: &Backend,
    redis: &Redis,
    node: &str,
    window: Duration,
) -> wsgate::config::Config {
    let mut c = redis_node_config(backend, redis.url(), "rs", node);
    c.resubscribe_window = window;
    // These tests are about remembered topics; a drained connection's resume record
    // (tests/resume.rs) would take precedence over them.
    c.resume_window = Duration::ZERO;
    c
}

async fn two_nodes(backend: &Backend, redis: &Redis, window: Duration) -> (Node, Node) {
    let mut nodes = start_ready_nodes([
        redis_config(backend, redis, "a", window),
        redis_config(backend, redis, "b", window),
    ])
    .await
    .into_iter();
    match (nodes.next(), nodes.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => unreachable!("two configurations, two nodes"),
    }
}

/// What the GrowERP-like client saw, in order.
#[derive(Debug)]
enum Event {
    /// A handshake completed (the 101), on the n-th connection (1-based).
    Connected(usize),
    Frame(Value),
    Closed(Option<u16>),
}

/// A client that does exactly what GrowERP's `WsClient` plus `NotificationBloc` do: connect with
/// `?api_key=…&userId=…`, send `subscribe: ALL` once after the first successful connect, and
/// after any close or failed connect wait `reconnect` and connect again with the same URL,
/// never sending another subscribe. `urls` stands for the load balancer: each attempt takes
/// the next one.
fn growerp_client(urls: Vec<String>, reconnect: Duration) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut subscribed = false;
        let mut connections = 0;
        for attempt in 0.. {
            let url = &urls[attempt % urls.len()];
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
                tokio::time::sleep(reconnect).await;
                continue;
            };
            connections += 1;
            if tx.send(Event::Connected(connections)).is_err() {
                return;
            }
            if !subscribed {
                subscribed = ws.send(Message::text("subscribe: ALL")).await.is_ok();
            }
            let code = loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                        if tx.send(Event::Frame(v)).is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break None,
                }
            };
            if tx.send(Event::Closed(code)).is_err() {
                return;
            }
            tokio::time::sleep(reconnect).await;
        }
    });
    rx
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event within 10 s")
        .expect("the client is running")
}

async fn publish(node: &Node, user: &str, topic: &str, title: &str) {
    let (s, _) = node
        .notify(json!({"userIds": [user], "notification": notification(topic, title)}))
        .await;
    assert_eq!(s, 202, "publish accepted");
}

/// Publishes probes until the client shows that its `subscribe: ALL` took effect.
async fn until_receiving(node: &Node, user: &str, rx: &mut mpsc::UnboundedReceiver<Event>) {
    for i in 0..50 {
        publish(node, user, "T", &format!("probe{i}")).await;
        if let Ok(Some(Event::Frame(_))) = timeout(Duration::from_millis(100), rx.recv()).await {
            return;
        }
    }
    panic!("the client never received a notification after subscribing");
}

/// Waits for the client's `n`-th handshake; frames of the old connection are skipped.
async fn until_connected(rx: &mut mpsc::UnboundedReceiver<Event>, n: usize) -> Option<u16> {
    let mut close = None;
    loop {
        match next_event(rx).await {
            Event::Connected(k) if k == n => return close,
            Event::Closed(code) => close = code,
            _ => {}
        }
    }
}

/// Titles received within `wait` (stops early once `want` arrived).
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    want: usize,
    wait: Duration,
) -> BTreeSet<String> {
    let mut got = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + wait;
    while got.len() < want {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Event::Frame(v))) => {
                got.insert(v["title"].as_str().unwrap_or_default().to_string());
            }
            Ok(Some(other)) => panic!("unexpected event while counting: {other:?}"),
            Ok(None) | Err(_) => break,
        }
    }
    got
}

/// The scenario of the issue: drained mid-stream, reconnected through the other node, and
/// everything published after the reconnect arrives.
async fn drain_and_count(window: Duration) -> (usize, Node, Option<u16>) {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let (mut a, b) = two_nodes(&backend, &redis, window).await;
    let mut rx = growerp_client(vec![a.notws("alice"), b.notws("alice")], RECONNECT);
    assert!(matches!(next_event(&mut rx).await, Event::Connected(1)));
    until_receiving(&b, "alice", &mut rx).await;

    a.begin_stop(); // the in-process drain: 1012, then the node stops
    let close = until_connected(&mut rx, 2).await;
    // The handshake with B is complete: from here on nothing may be missed.
    for i in 0..AFTER {
        publish(&b, "alice", "T", &format!("after{i}")).await;
    }
    let got = collect(&mut rx, AFTER, Duration::from_secs(3)).await;
    drop(redis);
    (got.len(), b, close)
}

#[tokio::test]
async fn growerp_client_keeps_its_notifications_across_a_drain() {
    let (received, b, close) = drain_and_count(Duration::from_secs(600)).await;
    assert_eq!(close, Some(1012), "the drain closes with 1012");
    assert_eq!(received, AFTER, "missing {} of {AFTER}", AFTER - received);
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"wsgate_remembered_topics_restores_total{outcome="restored"}"#
        ),
        1.0
    );
    assert_eq!(metric(&m, "wsgate_remembered_topics_restored_total"), 1.0);
}

#[tokio::test]
async fn growerp_client_keeps_its_notifications_across_a_sigterm_of_the_real_binary() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let url = redis.url();
    let args = [
        "--redis-url",
        url.as_str(),
        "--redis-prefix",
        "rsb",
        "--drain-timeout",
        "1s",
    ];
    let mut a = Binary::serve(&backend, &args).await;
    let b = Binary::serve(&backend, &args).await;
    let publish_b = |title: String| {
        let url = format!("http://{}/api/v1/notifications", b.admin);
        async move {
            let (s, _) = post(
                &url,
                json!({"userIds": ["alice"], "notification": notification("T", &title)}),
            )
            .await;
            assert_eq!(s, 202, "publish accepted");
        }
    };
    let mut rx = growerp_client(vec![a.notws("alice"), b.notws("alice")], RECONNECT);
    assert!(matches!(next_event(&mut rx).await, Event::Connected(1)));
    let mut receiving = false;
    for i in 0..50 {
        publish_b(format!("probe{i}")).await;
        if let Ok(Some(Event::Frame(_))) = timeout(Duration::from_millis(100), rx.recv()).await {
            receiving = true;
            break;
        }
    }
    assert!(
        receiving,
        "the client never received a notification after subscribing"
    );

    let pid = a.child.id().expect("pid").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "SIGTERM sent");
    assert_eq!(until_connected(&mut rx, 2).await, Some(1012));
    for i in 0..AFTER {
        publish_b(format!("after{i}")).await;
    }
    let got = collect(&mut rx, AFTER, Duration::from_secs(3)).await;
    assert_eq!(got.len(), AFTER, "missing {} of {AFTER}", AFTER - got.len());
    let status = timeout(Duration::from_secs(10), a.child.wait())
        .await
        .expect("the drained binary exits")
        .expect("exit status");
    assert!(status.success(), "exit 0 after the drain");
}

#[tokio::test]
async fn without_a_window_the_same_client_goes_deaf() {
    // The control: what the test above would measure without remembered topics.
    let (received, _b, _) = drain_and_count(Duration::ZERO).await;
    assert_eq!(
        received, 0,
        "with --resubscribe-window 0 nothing is restored"
    );
}

#[tokio::test]
async fn an_explicit_subscribe_replaces_the_remembered_set() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let (a, b) = two_nodes(&backend, &redis, Duration::from_secs(600)).await;

    let mut first = Client::subscribed(&a.notws("bob")).await;
    first.ws.close(None).await.expect("close");
    drop(first);
    let key = "rs:topics:notws:bob";
    eventually(Duration::from_secs(5), "ALL remembered", || async {
        members(&redis, key) == ["ALL"]
    })
    .await;

    // Moqui's browser client: asks for its own topics on every open.
    let mut moqui = Client::connect(&b.notws("bob")).await;
    moqui.send("subscribe: Orders, Chat").await;
    moqui.sync().await;
    publish(&b, "bob", "Invoices", "not asked for").await;
    publish(&b, "bob", "Orders", "asked for").await;
    assert_eq!(moqui.recv_json().await["title"], "asked for");
    moqui.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(members(&redis, key), ["Chat", "Orders"]);

    // A later client that sends nothing gets that set, not ALL.
    let mut later = Client::connect(&a.notws("bob")).await;
    publish(&a, "bob", "Invoices", "still not").await;
    publish(&a, "bob", "Chat", "restored").await;
    assert_eq!(later.recv_json().await["title"], "restored");
    later.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn after_the_window_a_client_starts_empty() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let (a, b) = two_nodes(&backend, &redis, Duration::from_millis(500)).await;

    let mut first = Client::subscribed(&a.notws("carol")).await;
    first.ws.close(None).await.expect("close");
    drop(first);
    let key = "rs:topics:notws:carol";
    eventually(Duration::from_secs(5), "ALL remembered", || async {
        members(&redis, key) == ["ALL"]
    })
    .await;
    eventually(
        Duration::from_secs(5),
        "the remembered set expired",
        || async { members(&redis, key).is_empty() },
    )
    .await;

    let mut later = Client::connect(&b.notws("carol")).await;
    publish(&b, "carol", "T", "nobody listens").await;
    later.expect_silence(Duration::from_millis(300)).await;
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"wsgate_remembered_topics_restores_total{outcome="empty"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn the_in_process_broker_remembers_too() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut rx = growerp_client(vec![node.notws("alice")], RECONNECT);
    assert!(matches!(next_event(&mut rx).await, Event::Connected(1)));
    until_receiving(&node, "alice", &mut rx).await;

    // The close a ping timeout or a slow consumer would cause; the client reconnects.
    node.state
        .hub
        .close_all(wsgate::disconnect::CloseReason::PingTimeout);
    assert_eq!(until_connected(&mut rx, 2).await, Some(4000));
    for i in 0..50 {
        publish(&node, "alice", "T", &format!("after{i}")).await;
    }
    assert_eq!(collect(&mut rx, 50, Duration::from_secs(3)).await.len(), 50);
}

#[tokio::test]
async fn chat_and_notws_are_remembered_separately() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let (a, b) = two_nodes(&backend, &redis, Duration::from_secs(600)).await;

    let mut notws = Client::subscribed(&a.notws("alice")).await;
    let mut chat = Client::connect(&b.chat("alice")).await;
    // A /chat frame that looks like a subscribe is not a topic command there.
    chat.send("subscribe: Orders").await;
    chat.sync().await;
    assert_eq!(members(&redis, "rs:topics:notws:alice"), ["ALL"]);
    assert!(members(&redis, "rs:topics:chat:alice").is_empty());
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("rs:topics:*")
        .query(&mut redis.conn())
        .expect("KEYS");
    keys.sort();
    assert_eq!(keys, ["rs:topics:notws:alice"]);

    // Another /chat connection does not look anything up, and chat still reaches it.
    let mut chat2 = Client::connect(&a.chat("alice")).await;
    let (s, _) = post(
        &a.admin_url("/api/v1/chat"),
        json!({"userIds": ["alice"], "chatMessage": {"content": "hi", "chatRoom": {"chatRoomId": "room1"}}}),
    )
    .await;
    assert_eq!(s, 202);
    assert_eq!(chat2.recv_json().await["content"], "hi");
    assert_eq!(chat.recv_json().await["content"], "hi");
    notws.expect_silence(Duration::from_millis(100)).await;
    let m = a.metrics().await;
    for outcome in ["restored", "empty", "error"] {
        let series = format!(r#"wsgate_remembered_topics_restores_total{{outcome="{outcome}"}}"#);
        // The /notws client of this test was the first of its user: one empty look-up.
        let want = if outcome == "empty" { 1.0 } else { 0.0 };
        assert_eq!(metric(&m, &series), want, "{series}");
    }
}

fn members(redis: &Redis, key: &str) -> Vec<String> {
    let mut v: Vec<String> = redis::cmd("SMEMBERS")
        .arg(key)
        .query(&mut redis.conn())
        .expect("SMEMBERS");
    v.sort();
    v
}
