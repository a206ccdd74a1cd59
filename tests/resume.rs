//! Resume across a drain (`--resume-window`): a connection closed by a drain records where it
//! stopped, and the client's next connection, on any node, first receives what it missed, then
//! live traffic. Real Redis, real WebSocket clients; GrowERP-style clients (one `/notws` per key,
//! `subscribe: ALL` once, reconnect a fixed delay after a close) and a browser-style one (Moqui
//! session cookie, the resume cookie sent back).

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::Message;

/// GrowERP waits 5 s before reconnecting; shortened here.
const RECONNECT: Duration = Duration::from_millis(200);
/// Messages published per scenario, at about 300 per second.
const N: usize = 1500;
const RATE: u64 = 300;

/// A node of this file's installation (prefix `rm`) on `redis`.
fn redis_config(backend: &Backend, redis: &Redis, node: &str) -> wsgate::config::Config {
    redis_node_config(backend, redis.url(), "rm", node)
}

#[derive(Debug)]
enum Event {
    Connected(usize),
    Frame(Value),
    Closed,
}

/// GrowERP's `WsClient` + `NotificationBloc`: connect with the key in the URL, `subscribe: ALL`
/// once after the first connect, reconnect `RECONNECT` after any close, never subscribe again.
/// `urls` stands for the load balancer: each attempt takes the next one.
fn growerp_client(urls: Vec<String>) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut subscribed = false;
        let mut connections = 0;
        for attempt in 0.. {
            let url = &urls[attempt % urls.len()];
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
                tokio::time::sleep(RECONNECT).await;
                continue;
            };
            connections += 1;
            if tx.send(Event::Connected(connections)).is_err() {
                return;
            }
            if !subscribed {
                subscribed = ws.send(Message::text("subscribe: ALL")).await.is_ok();
            }
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let v = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                        if tx.send(Event::Frame(v)).is_err() {
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                }
            }
            if tx.send(Event::Closed).is_err() {
                return;
            }
            tokio::time::sleep(RECONNECT).await;
        }
    });
    rx
}

async fn publish(node: &Node, user: &str, title: &str) {
    let (s, _) = node
        .notify(json!({"userIds": [user], "notification": notification("T", title)}))
        .await;
    assert_eq!(s, 202, "publish accepted");
}

/// Publishes probes until the client shows that its `subscribe: ALL` took effect.
async fn until_receiving(node: &Node, user: &str, rx: &mut mpsc::UnboundedReceiver<Event>) {
    for i in 0..50 {
        publish(node, user, &format!("probe{i}")).await;
        if let Ok(Some(Event::Frame(_))) = timeout(Duration::from_millis(100), rx.recv()).await {
            return;
        }
    }
    panic!("the client never received a notification after subscribing");
}

/// Publishes `0..N` to `user` through `node` at `RATE`; calls `midway` once, half way.
async fn publish_stream(node: &Node, user: &str, midway: impl FnOnce()) {
    let mut midway = Some(midway);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for i in 0..N {
        tick.tick().await;
        publish(node, user, &i.to_string()).await;
        if i == N / 2 {
            if let Some(f) = midway.take() {
                f();
            }
        }
    }
}

/// The numbered titles a client received (probes skipped), until `N - 1` or 10 s of silence;
/// and how many connections it made.
async fn numbers(rx: &mut mpsc::UnboundedReceiver<Event>) -> (Vec<usize>, usize) {
    let mut got = Vec::new();
    let mut connections = 1;
    while let Ok(Some(e)) = timeout(Duration::from_secs(10), rx.recv()).await {
        match e {
            Event::Frame(v) => {
                if let Some(i) = v["title"].as_str().and_then(|t| t.parse::<usize>().ok()) {
                    got.push(i);
                    if i == N - 1 {
                        break;
                    }
                }
            }
            Event::Connected(n) => connections = n,
            Event::Closed => {}
        }
    }
    (got, connections)
}

fn keys(redis: &Redis, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query(&mut redis.conn())
        .expect("KEYS")
}

fn missing(got: &[usize]) -> Vec<usize> {
    let set: std::collections::BTreeSet<usize> = got.iter().copied().collect();
    (0..N).filter(|i| !set.contains(i)).collect()
}

/// The scenario: a GrowERP-style client on node A, 300 notifications a second published
/// through node B, A drained half way; the client reconnects through B. 0 missing, in order,
/// no duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growerp_client_resumes_through_another_node_with_nothing_missing() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let mut a = Node::start(redis_config(&backend, &redis, "a")).await;
    let b = Node::start(redis_config(&backend, &redis, "b")).await;
    a.until_readyz(200).await;
    b.until_readyz(200).await;
    let mut rx = growerp_client(vec![a.notws("alice"), b.notws("alice")]);
    until_receiving(&b, "alice", &mut rx).await;

    let publisher = publish_stream(&b, "alice", || a.begin_stop());
    let ((), (got, connections)) = tokio::join!(publisher, numbers(&mut rx));
    assert_eq!(connections, 2, "one reconnect, through B");
    assert_eq!(missing(&got), Vec::<usize>::new(), "0 missing");
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicates"
    );
    let m = b.metrics().await;
    assert_eq!(metric(&m, "wsgate_resumed_connections_total"), 1.0);
    assert!(
        metric(&m, "wsgate_resume_replayed_messages_total") >= 1.0,
        "the gap between the 1012 and the reconnect was replayed"
    );
    assert_eq!(metric(&m, "wsgate_resume_duplicates_total"), 0.0);
}

/// Two connections of one key (two tabs of an app with the same key) across a drain: neither
/// misses anything; duplicates are possible only here, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_of_one_key_miss_nothing_and_duplicates_are_counted() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let mut a = Node::start(redis_config(&backend, &redis, "a")).await;
    let b = Node::start(redis_config(&backend, &redis, "b")).await;
    a.until_readyz(200).await;
    b.until_readyz(200).await;
    let mut one = growerp_client(vec![a.notws("alice"), b.notws("alice")]);
    let mut two = growerp_client(vec![a.notws("alice"), b.notws("alice")]);
    until_receiving(&b, "alice", &mut one).await;
    until_receiving(&b, "alice", &mut two).await;

    let publisher = publish_stream(&b, "alice", || a.begin_stop());
    let ((), (got1, _), (got2, _)) = tokio::join!(publisher, numbers(&mut one), numbers(&mut two));
    let mut seen_twice = 0;
    for (name, got) in [("first", &got1), ("second", &got2)] {
        assert_eq!(missing(got), Vec::<usize>::new(), "{name}: 0 missing");
        seen_twice += got.len() - N;
    }
    let m = b.metrics().await;
    assert!(metric(&m, "wsgate_resumed_connections_total") >= 2.0);
    assert!(
        metric(&m, "wsgate_resume_duplicates_total") >= seen_twice as f64,
        "every duplicate a client saw is counted ({seen_twice} seen)"
    );
}

/// Opens a WebSocket with extra headers; returns the client and the 101's `Set-Cookie` values.
async fn open(url: &str, headers: &[(&str, &str)]) -> (Client, Vec<String>) {
    let mut req = url.into_client_request().expect("a WebSocket URL");
    for (name, value) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .unwrap_or_else(|e| panic!("handshake to {url}: {e}"));
    assert_eq!(resp.status().as_u16(), 101);
    let set_cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (Client { ws }, set_cookie)
}

async fn send(node: &Node, topic: &str, title: &str) {
    let body = json!({"userIds": ["alice"], "notification": notification(topic, title)});
    assert_eq!(node.notify(body).await.0, 202);
}

/// A browser (Moqui session cookie) resumes through the resume cookie its first handshake set:
/// its reconnect through the other node first receives what was published while it was away,
/// then live traffic; without the cookie it would not.
#[tokio::test]
async fn a_browser_resumes_with_its_resume_cookie() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let mut a = Node::start(redis_config(&backend, &redis, "a")).await;
    let b = Node::start(redis_config(&backend, &redis, "b")).await;
    a.until_readyz(200).await;
    b.until_readyz(200).await;
    let origin_a = format!("http://{}", a.public);
    let (mut tab, set_cookie) = open(
        &a.ws("/notws"),
        &[("Cookie", "JSESSIONID=sess-alice"), ("Origin", &origin_a)],
    )
    .await;
    let resume = set_cookie
        .iter()
        .find(|c| c.starts_with("wsgate_resume="))
        .unwrap_or_else(|| panic!("a resume cookie is set: {set_cookie:?}"));
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=30"] {
        assert!(resume.contains(attr), "{attr} in {resume}");
    }
    let pair = resume.split(';').next().unwrap_or_default().to_string();
    // Moqui's client subscribes its topics on open.
    tab.send("subscribe:MantleEvent").await;
    tab.sync().await;
    send(&b, "MantleEvent", "before").await;
    assert_eq!(tab.recv_json().await["title"], "before");

    a.begin_stop();
    assert_eq!(tab.close_code(Duration::from_secs(5)).await, Some(1012));
    // While the browser is away: one of its topic, one of another topic.
    send(&b, "MantleEvent", "away").await;
    send(&b, "Other", "not-for-this-tab").await;

    let origin_b = format!("http://{}", b.public);
    let cookie = format!("JSESSIONID=sess-alice; {pair}");
    let (mut back, set_again) = open(
        &b.ws("/notws"),
        &[("Cookie", &cookie), ("Origin", &origin_b)],
    )
    .await;
    assert!(
        set_again.iter().any(|c| c.starts_with(&pair)),
        "the same resume id is set again: {set_again:?}"
    );
    assert_eq!(back.recv_json().await["title"], "away", "missed, replayed");
    send(&b, "MantleEvent", "live").await;
    assert_eq!(back.recv_json().await["title"], "live");
    back.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(
        metric(&b.metrics().await, "wsgate_resumed_connections_total"),
        1.0
    );
}

/// After the window nothing is replayed: the reconnect gets live traffic only (with its
/// remembered topics), and the record is gone from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_window_nothing_is_replayed() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let window = |node: &str| {
        let mut c = redis_config(&backend, &redis, node);
        c.resume_window = Duration::from_secs(1);
        c
    };
    let mut a = Node::start(window("a")).await;
    let b = Node::start(window("b")).await;
    a.until_readyz(200).await;
    b.until_readyz(200).await;
    let mut alice = Client::subscribed(&a.notws("alice")).await;
    publish(&b, "alice", "before").await;
    assert_eq!(alice.recv_json().await["title"], "before");
    a.begin_stop();
    assert_eq!(alice.close_code(Duration::from_secs(5)).await, Some(1012));
    eventually(
        Duration::from_secs(3),
        "a resume record written",
        || async { !keys(&redis, "rm:resume:*").is_empty() },
    )
    .await;
    publish(&b, "alice", "missed").await;
    eventually(Duration::from_secs(5), "the record expired", || async {
        keys(&redis, "rm:resume:*").is_empty()
    })
    .await;
    let mut again = Client::connect(&b.notws("alice")).await;
    publish(&b, "alice", "live").await;
    assert_eq!(again.recv_json().await["title"], "live", "no replay");
    let m = b.metrics().await;
    assert_eq!(metric(&m, "wsgate_resumed_connections_total"), 0.0);
}

/// The in-process broker keeps the same window in memory: a connection closed by the hub's
/// drain (the node stays up) resumes on its reconnect with what was published meanwhile.
#[tokio::test]
async fn the_in_process_broker_resumes_too() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut alice = Client::subscribed(&node.notws("alice")).await;
    publish(&node, "alice", "before").await;
    assert_eq!(alice.recv_json().await["title"], "before");
    node.state.hub.drain(Duration::ZERO).await;
    assert_eq!(alice.close_code(Duration::from_secs(5)).await, Some(1012));
    // The record is written before the close frame; the client reconnects later.
    for i in 0..20 {
        publish(&node, "alice", &format!("away{i}")).await;
    }
    let mut back = Client::connect(&node.notws("alice")).await;
    for i in 0..20 {
        assert_eq!(back.recv_json().await["title"], format!("away{i}"));
    }
    publish(&node, "alice", "live").await;
    assert_eq!(back.recv_json().await["title"], "live");
    back.expect_silence(Duration::from_millis(300)).await;
    let m = node.metrics().await;
    assert_eq!(metric(&m, "wsgate_resumed_connections_total"), 1.0);
    assert_eq!(metric(&m, "wsgate_resume_replayed_messages_total"), 20.0);
}
