//! Nothing acknowledged is lost: per-channel history (`--history-ttl`) lets a node recover what
//! Redis pub/sub dropped. Real Redis, real WebSocket clients, nodes in this process.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn redis_config(backend: &Backend, redis: &Redis, node: &str) -> wsgate::config::Config {
    let mut c = config(backend);
    c.redis_url = Some(redis.url());
    c.redis_prefix = "zl".to_string();
    c.node_id = node.to_string();
    c
}

async fn ready(node: &Node) {
    eventually(Duration::from_secs(10), "node ready", || async {
        node.readyz().await == 200
    })
    .await;
}

/// Publishes `n` notifications to `user` through `node` at about `rate` per second, in order;
/// calls `midway` once half of them are acknowledged. Every publish must answer 202.
async fn publish_stream(
    node: &Node,
    user: &str,
    round: usize,
    n: usize,
    rate: u64,
    midway: impl FnOnce(),
) {
    let mut midway = Some(midway);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for i in 0..n {
        tick.tick().await;
        let (s, _) = node
            .notify(json!({"userIds": [user], "notification": notification("T", &format!("{round}:{i}"))}))
            .await;
        assert_eq!(s, 202, "publish {i} of round {round}");
        if i == n / 2 {
            if let Some(f) = midway.take() {
                f();
            }
        }
    }
}

/// Reads `n` titles; each must be the next one expected: 0 lost, in order, no duplicates.
async fn expect_stream(client: &mut Client, round: usize, n: usize) {
    for i in 0..n {
        let text = client
            .recv_within(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("round {round}: message {i} of {n} never arrived"));
        let v: serde_json::Value = serde_json::from_str(&text).expect("a JSON frame");
        assert_eq!(
            v["title"],
            format!("{round}:{i}"),
            "round {round}: message {i} out of order, duplicated or lost"
        );
    }
    client.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_connections_killed_mid_stream_lose_nothing() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let a = Node::start(redis_config(&backend, &redis, "a")).await;
    let b = Node::start(redis_config(&backend, &redis, "b")).await;
    ready(&a).await;
    ready(&b).await;
    let mut alice = Client::subscribed(&a.notws("alice")).await;
    const N: usize = 1500;
    for round in 0..5 {
        let url = redis.url();
        let kill = move || {
            let killed: i64 = redis::Client::open(url)
                .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
                .and_then(|mut c| {
                    redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("TYPE")
                        .arg("pubsub")
                        .query(&mut c)
                })
                .expect("CLIENT KILL TYPE pubsub");
            assert!(
                killed >= 2,
                "both nodes' subscriptions were killed ({killed})"
            );
        };
        let publisher = publish_stream(&b, "alice", round, N, 300, kill);
        let receiver = expect_stream(&mut alice, round, N);
        tokio::join!(publisher, receiver);
    }
    let m = a.metrics().await;
    assert!(metric(&m, "wsgate_broker_reconnects_total") >= 5.0);
    assert!(
        metric(&m, "wsgate_broker_recovered_messages_total") >= 1.0,
        "the kills lost messages that history recovered"
    );
}

#[tokio::test]
async fn history_is_trimmed_by_time_and_expires() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let mut cfg = redis_config(&backend, &redis, "a");
    cfg.history_ttl = Duration::from_millis(500);
    let a = Node::start(cfg).await;
    ready(&a).await;
    let key = "{zl:u:alice}:history";
    for i in 0..50 {
        let (s, _) = a
            .notify(
                json!({"userIds": ["alice"], "notification": notification("T", &i.to_string())}),
            )
            .await;
        assert_eq!(s, 202);
    }
    let mut conn = redis.conn();
    let len: usize = redis::cmd("XLEN").arg(key).query(&mut conn).expect("XLEN");
    assert_eq!(len, 50, "every acknowledged publish is in the history");
    let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut conn).expect("PTTL");
    assert!(
        ttl > 0 && ttl <= 500,
        "the history key expires with the window ({ttl} ms)"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (s, _) = a
        .notify(json!({"userIds": ["alice"], "notification": notification("T", "late")}))
        .await;
    assert_eq!(s, 202);
    let len: usize = redis::cmd("XLEN").arg(key).query(&mut conn).expect("XLEN");
    assert_eq!(len, 1, "older entries were trimmed by the next publish");
    eventually(Duration::from_secs(3), "history key expired", || async {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query(&mut redis.conn())
            .expect("EXISTS");
        exists == 0
    })
    .await;
}

#[tokio::test]
async fn history_off_records_nothing_and_still_delivers() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let mut cfg = redis_config(&backend, &redis, "a");
    cfg.history_ttl = Duration::ZERO;
    let a = Node::start(cfg).await;
    ready(&a).await;
    let mut alice = Client::subscribed(&a.notws("alice")).await;
    let (s, _) = a
        .notify(json!({"userIds": ["alice"], "notification": notification("T", "x")}))
        .await;
    assert_eq!(s, 202);
    assert_eq!(alice.recv_json().await["title"], "x");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*history*")
        .query(&mut redis.conn())
        .expect("KEYS");
    assert!(keys.is_empty(), "no history with --history-ttl 0: {keys:?}");
}
