//! Several nodes on one real Redis: cross-node delivery, churn, Redis faults, node loss,
//! installations separated by prefix.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::json;

const SHORT: Duration = Duration::from_millis(300);

fn redis_config(
    backend: &Backend,
    redis: &Redis,
    prefix: &str,
    node: &str,
) -> wsgate::config::Config {
    redis_node_config(backend, redis.url(), prefix, node)
}

async fn cluster(backend: &Backend, redis: &Redis, prefix: &str, n: usize) -> Vec<Node> {
    start_ready_nodes((0..n).map(|i| redis_config(backend, redis, prefix, &format!("n{i}")))).await
}

#[tokio::test]
async fn delivery_across_nodes() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let nodes = cluster(&backend, &redis, "wsg", 3).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    // Alice on A and on C (same user, another node), bob (ACME) on B, dave (OTHER) on C.
    let mut on = ThreeNodeClients::connect(a, b, c).await;

    // Users: published on B, delivered on A and C.
    let (s, _) = b
        .notify(json!({"userIds": ["alice"], "notification": notification("T", "to alice")}))
        .await;
    assert_eq!(s, 202);
    assert_eq!(on.alice_a.recv_json().await["title"], "to alice");
    assert_eq!(on.alice_c.recv_json().await["title"], "to alice");
    on.bob_b.expect_silence(SHORT).await;

    // Tenant, broadcast, and chat across nodes.
    let [mut chat_alice, chat_bob, _chat_carol] =
        on.tenant_broadcast_and_chat(a, b, c, SHORT).await;
    chat_alice.expect_silence(SHORT).await;

    // Presence answers for the whole cluster, from any node.
    let p = a.presence(&["alice", "bob", "carol", "dave", "erin"]).await;
    assert_eq!(
        p,
        json!({"alice": true, "bob": true, "carol": true, "dave": true, "erin": false})
    );
    drop(on.bob_b);
    drop(chat_bob);
    eventually(Duration::from_secs(5), "bob offline everywhere", || async {
        c.presence(&["bob"]).await == json!({"bob": false})
    })
    .await;
}

/// What the live connections need: per node `all` and its canary, plus user and tenant channels.
fn expected_channels(prefix: &str, nodes: usize, users: &[(&str, &str)]) -> Vec<String> {
    let mut set = BTreeSet::new();
    set.insert(format!("{prefix}:all"));
    for i in 0..nodes {
        set.insert(format!("{prefix}:canary:n{i}"));
    }
    for (u, t) in users {
        set.insert(format!("{prefix}:u:{u}"));
        set.insert(format!("{prefix}:t:{t}"));
    }
    set.into_iter().collect()
}

/// A node on `rediss://` (its own pub/sub connection over TLS, the crate's pool for publishing)
/// and a node on the plain port deliver each other's publishes.
#[tokio::test]
async fn a_node_over_tls_and_a_node_over_plain_tcp_deliver_each_others_publishes() {
    let tls = TlsRedis::start();
    let backend = Backend::start().await;
    let nodes = start_ready_nodes([
        redis_node_config(&backend, tls.tls_url(), "wsg", "tls"),
        redis_config(&backend, &tls.redis, "wsg", "plain"),
    ])
    .await;
    let (tls, plain) = (&nodes[0], &nodes[1]);
    let mut on_tls = Client::subscribed(&tls.notws("alice")).await;
    let mut on_plain = Client::subscribed(&plain.notws("bob")).await;
    for (from, to, user) in [(plain, &mut on_tls, "alice"), (tls, &mut on_plain, "bob")] {
        let (s, _) = from
            .notify(json!({"userIds": [user], "notification": notification("T", user)}))
            .await;
        assert_eq!(s, 202);
        assert_eq!(to.recv_json().await["title"], user);
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn subscription_churn_leaves_exactly_what_is_needed() {
    let redis = Redis::start();
    let users: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
    let extra: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), "CHURN")).collect();
    let backend = Backend::start_with(&extra).await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut cfg = redis_config(&backend, &redis, "churn", &format!("n{i}"));
        cfg.max_connections_per_user = 0;
        cfg.unsubscribe_delay = Duration::from_millis(50);
        let node = Node::start(cfg).await;
        node.until_readyz(200).await;
        nodes.push(node);
    }
    // 1,000 connect/disconnect cycles, 50 at a time, spread over users and nodes.
    let mut kept = Vec::new();
    for round in 0..20 {
        let mut batch = Vec::new();
        for j in 0..50 {
            let i = round * 50 + j;
            let node = &nodes[i % 3];
            let user = &users[(i * 7) % users.len()];
            let url = node.ws(&format!("/notws?api_key=key-{user}&userId={user}"));
            batch.push(async move { Client::connect(&url).await });
        }
        let mut clients = futures_util::future::join_all(batch).await;
        // Keep a few alive at the end; everything else disconnects.
        if round == 19 {
            kept = clients.split_off(45);
        }
        drop(clients);
        // Let some unsubscribes fall in the delay window and others complete.
        tokio::time::sleep(Duration::from_millis(if round % 2 == 0 { 10 } else { 80 })).await;
    }
    // The 5 kept connections: i = 995..999.
    let live: Vec<(usize, &str)> = (995..1000)
        .map(|i| (i % 3, users[(i * 7) % users.len()].as_str()))
        .collect();
    let live_users: Vec<(&str, &str)> = live.iter().map(|(_, u)| (*u, "CHURN")).collect();
    let want = expected_channels("churn", 3, &live_users);
    eventually(Duration::from_secs(10), "channel set converges", || async {
        redis.channels("churn:*") == want
    })
    .await;
    // And it stays exactly that: nothing flaps back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(redis.channels("churn:*"), want);
    let total: usize = nodes.iter().map(|n| n.state.hub.connections()).sum();
    assert_eq!(total, kept.len());
    drop(kept);
    let want = expected_channels("churn", 3, &[]);
    eventually(
        Duration::from_secs(10),
        "all user channels released",
        || async { redis.channels("churn:*") == want },
    )
    .await;
}

#[tokio::test]
async fn redis_restart_keeps_sockets_and_restores_subscriptions() {
    let mut redis = Redis::start();
    let backend = Backend::start().await;
    let nodes = cluster(&backend, &redis, "rr", 2).await;
    let mut alice = Client::subscribed(&nodes[0].notws("alice")).await;
    let mut bob = Client::subscribed(&nodes[1].notws("bob")).await;
    let mut dave = Client::subscribed(&nodes[1].notws("dave")).await;
    let mut chat = Client::connect(&nodes[0].chat("alice")).await.ws;

    redis.kill();
    // Unready while Redis is down.
    for n in &nodes {
        n.until_readyz(503).await;
    }
    // Publishing answers 503 while Redis is away.
    let (s, _) = nodes[0]
        .notify(json!({"userIds": ["alice"], "notification": notification("T", "lost")}))
        .await;
    assert_eq!(s, 503);
    // A chat frame is dropped and counted.
    drop(
        futures_util::SinkExt::send(
            &mut chat,
            tokio_tungstenite::tungstenite::Message::text(
                r#"{"chatRoom":{"chatRoomId":"room1"},"content":"x"}"#,
            ),
        )
        .await,
    );

    eventually(
        Duration::from_secs(10),
        "chat frame dropped and counted",
        || async {
            let m = nodes[0].metrics().await;
            metric(
                &m,
                r#"wsgate_client_frames_ignored_total{endpoint="chat",kind="broker_unavailable"}"#,
            ) == 1.0
        },
    )
    .await;
    // New sockets are refused while the node cannot deliver, even for a user it holds.
    let (s, _) = refused(&nodes[0].notws("alice")).await;
    assert_eq!(s, 503);

    redis.restart();
    for n in &nodes {
        n.until_readyz(200).await;
    }
    // Sockets stayed open; every message published after readiness returns is delivered.
    for i in 0..20 {
        let (s, _) = nodes[i % 2]
            .notify(json!({"userIds": ["alice", "bob"], "notification": notification("T", &i.to_string())}))
            .await;
        assert_eq!(s, 202);
    }
    nodes[1]
        .notify(json!({"tenantId": "OTHER", "notification": notification("T", "tenant")}))
        .await;
    nodes[0]
        .notify(json!({"broadcast": true, "notification": notification("T", "all")}))
        .await;
    for i in 0..20 {
        assert_eq!(alice.recv_json().await["title"], i.to_string());
        assert_eq!(bob.recv_json().await["title"], i.to_string());
    }
    assert_eq!(dave.recv_json().await["title"], "tenant");
    for c in [&mut alice, &mut bob, &mut dave] {
        assert_eq!(c.recv_json().await["title"], "all");
    }
    // Presence was restored too.
    assert_eq!(
        nodes[0].presence(&["alice", "bob"]).await,
        json!({"alice": true, "bob": true})
    );
    let m = nodes[0].metrics().await;
    assert!(metric(&m, "wsgate_broker_reconnects_total") >= 1.0);
    assert_eq!(metric(&m, "wsgate_broker_up"), 1.0);
}

#[tokio::test]
async fn installations_with_different_prefixes_are_separate() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let one = Node::start(redis_config(&backend, &redis, "one", "a")).await;
    let two = Node::start(redis_config(&backend, &redis, "two", "b")).await;
    one.until_readyz(200).await;
    two.until_readyz(200).await;
    let mut alice1 = Client::subscribed(&one.notws("alice")).await;
    let mut alice2 = Client::subscribed(&two.notws("alice")).await;
    one.notify(json!({"userIds": ["alice"], "notification": notification("T", "one")}))
        .await;
    one.notify(json!({"broadcast": true, "notification": notification("T", "one-all")}))
        .await;
    assert_eq!(alice1.recv_json().await["title"], "one");
    assert_eq!(alice1.recv_json().await["title"], "one-all");
    alice2.expect_silence(SHORT).await;
    assert_eq!(
        two.presence(&["alice"]).await,
        json!({"alice": true}),
        "presence is per installation too"
    );
    drop(alice2);
    eventually(Duration::from_secs(5), "alice offline in two", || async {
        two.presence(&["alice"]).await == json!({"alice": false})
    })
    .await;
    assert_eq!(one.presence(&["alice"]).await, json!({"alice": true}));
}

#[tokio::test]
async fn a_killed_node_reads_offline_within_the_presence_ttl() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let survivor = Node::start(redis_config(&backend, &redis, "kill", "survivor")).await;
    survivor.until_readyz(200).await;
    let redis_url = redis.url();
    let mut victim = Binary::serve(
        &backend,
        &[
            "--redis-url",
            &redis_url,
            "--redis-prefix",
            "kill",
            "--node-id",
            "victim",
            "--presence-ttl",
            "3s",
        ],
    )
    .await;
    let _on_victim = Client::subscribed(&victim.notws("bob")).await;
    let mut on_survivor = Client::subscribed(&survivor.notws("alice")).await;
    assert_eq!(
        survivor.presence(&["alice", "bob"]).await,
        json!({"alice": true, "bob": true})
    );

    victim.child.start_kill().expect("SIGKILL");
    let _ = victim.child.wait().await;
    let killed_at = std::time::Instant::now();
    eventually(
        Duration::from_secs(10),
        "bob offline after the crash",
        || async { survivor.presence(&["bob"]).await == json!({"bob": false}) },
    )
    .await;
    let took = killed_at.elapsed();
    assert!(
        took <= Duration::from_millis(3500),
        "offline within the 3 s presence TTL (took {took:?})"
    );
    // The survivor is undisturbed.
    assert_eq!(survivor.presence(&["alice"]).await, json!({"alice": true}));
    survivor
        .notify(json!({"userIds": ["alice"], "notification": notification("T", "still here")}))
        .await;
    assert_eq!(on_survivor.recv_json().await["title"], "still here");
}

#[tokio::test]
async fn a_silently_dead_subscription_is_detected_by_the_canary() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let node = Node::start(redis_config(&backend, &redis, "canary", "n0")).await;
    node.until_readyz(200).await;
    let mut alice = Client::subscribed(&node.notws("alice")).await;
    // Redis stops answering while every connection stays open: nothing arrives any more. A
    // canary is late 4 s after the first one sent into the silence (up to a canary interval
    // after it began), and the check runs once a second: 10 s leaves a loaded machine room.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10000)
        .arg("ALL")
        .query(&mut redis.conn())
        .expect("CLIENT PAUSE");
    // Unready once the canary is late.
    node.until_readyz(503).await;
    // Repaired after Redis answers again, and delivery works.
    node.until_readyz(200).await;
    let m = node.metrics().await;
    assert!(metric(&m, "wsgate_broker_canary_failures_total") >= 1.0);
    node.notify(json!({"userIds": ["alice"], "notification": notification("T", "back")}))
        .await;
    assert_eq!(alice.recv_json().await["title"], "back");
}

/// A stream's entries as XRANGE answers: id, then field and value pairs.
type StreamEntries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// The titles of one user's history stream, oldest first.
fn history_titles(redis: &Redis, prefix: &str, user: &str) -> Vec<String> {
    let entries: StreamEntries = redis::cmd("XRANGE")
        .arg(format!("{{{prefix}:u:{user}}}:history"))
        .arg("-")
        .arg("+")
        .query(&mut redis.conn())
        .expect("XRANGE of the history");
    entries
        .iter()
        .flat_map(|(_, fields)| fields.iter().map(|(_, v)| bytes::Bytes::from(v.clone())))
        .map(|payload| {
            let envelope = wsgate::protocol::decode(payload).expect("an envelope");
            let v: serde_json::Value =
                serde_json::from_str(envelope.frame.as_str()).expect("a JSON frame");
            v["title"].as_str().expect("a title").to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_made_at_the_same_instant_arrive_once_each_in_history_order() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let nodes = cluster(&backend, &redis, "wsg", 2).await;
    let mut alice = Client::subscribed(&nodes[1].notws("alice")).await;
    let mut bob = Client::subscribed(&nodes[1].notws("bob")).await;

    // 40 publishes at once on the other node, every other one to both users, the rest to bob
    // alone: they share round trips to Redis, grouped by channel, and a round trip's channels
    // get different payloads.
    let publishes = (0..40).map(|i| {
        let users = if i % 2 == 0 {
            json!(["alice", "bob"])
        } else {
            json!(["bob"])
        };
        nodes[0].notify(json!({
            "userIds": users,
            "notification": notification("T", &format!("m{i}"))
        }))
    });
    for (status, body) in futures_util::future::join_all(publishes).await {
        assert_eq!(status, 202, "{body}");
    }
    for (user, client, n) in [("alice", &mut alice, 20), ("bob", &mut bob, 40)] {
        let mut got = Vec::new();
        for _ in 0..n {
            got.push(
                client.recv_json().await["title"]
                    .as_str()
                    .expect("a title")
                    .to_owned(),
            );
        }
        client.expect_silence(SHORT).await;
        let distinct: BTreeSet<&String> = got.iter().collect();
        assert_eq!(distinct.len(), n, "{user} got each message once: {got:?}");
        assert_eq!(
            got,
            history_titles(&redis, "wsg", user),
            "{user} got the messages in the order of the user's history"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_bursts_wait_the_publish_linger() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let mut cfg = redis_config(&backend, &redis, "wsg", "n0");
    // Long enough that a publish which waited it cannot hide among round trips.
    let linger = Duration::from_millis(100);
    cfg.publish_linger = linger;
    let node = start_ready_nodes([cfg]).await.remove(0);
    let mut alice = Client::subscribed(&node.notws("alice")).await;
    let publish = |i: usize| {
        node.notify(json!({
            "userIds": ["alice"],
            "notification": notification("T", &format!("m{i}"))
        }))
    };
    let round_trips = |scrape: &str| {
        (
            metric(scrape, "wsgate_broker_round_trip_publishes_count"),
            metric(scrape, "wsgate_broker_round_trip_publishes_sum"),
        )
    };

    // A caller that publishes one at a time (each after the previous answer) never waits it.
    const SEQUENTIAL: u32 = 20;
    let started = std::time::Instant::now();
    for i in 0..SEQUENTIAL as usize {
        assert_eq!(publish(i).await.0, 202);
    }
    let took = started.elapsed();
    assert!(
        took < linger * SEQUENTIAL / 2,
        "{SEQUENTIAL} publishes one at a time took {took:?}: some waited the {linger:?} linger"
    );

    // A burst: its first publish goes alone, the rest share a round trip; that shows bursts, so
    // the next burst's first publish waits for the others and the whole burst is one round trip.
    const BURST: usize = 20;
    for (status, body) in futures_util::future::join_all((0..BURST).map(|i| publish(100 + i))).await
    {
        assert_eq!(status, 202, "{body}");
    }
    tokio::time::sleep(linger * 2).await;
    let before = round_trips(&node.metrics().await);
    for (status, body) in futures_util::future::join_all((0..BURST).map(|i| publish(200 + i))).await
    {
        assert_eq!(status, 202, "{body}");
    }
    let after = round_trips(&node.metrics().await);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1.0, BURST as f64),
        "the second burst's {BURST} publishes should share one round trip"
    );
    for _ in 0..SEQUENTIAL as usize + 2 * BURST {
        alice.recv_json().await;
    }
    alice.expect_silence(SHORT).await;
}
