//! Nothing acknowledged is lost: per-channel history (`--history-ttl`) lets a node recover what
//! Redis pub/sub dropped. Real Redis, real WebSocket clients, nodes in this process.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn redis_config(backend: &Backend, redis: &Redis, node: &str) -> wsgate::config::Config {
    redis_node_config(backend, redis.url(), "zl", node)
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

/// Kills every pub/sub connection of `url`'s Redis (`CLIENT KILL TYPE pubsub`), expecting at
/// least `nodes` of them.
fn kill_pubsub(url: String, nodes: i64) -> impl FnOnce() {
    move || {
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
            killed >= nodes,
            "the nodes' subscriptions were killed ({killed} of at least {nodes})"
        );
    }
}

/// `rounds` streams of `n` notifications to alice, published through `via` at `rate` per
/// second, every pub/sub connection of `redis` killed half-way through each (at least `nodes`
/// of them): each stream arrives whole, in order, once.
async fn streams_through_kills(
    via: &Node,
    alice: &mut Client,
    redis: &Redis,
    rounds: usize,
    n: usize,
    rate: u64,
    nodes: i64,
) {
    for round in 0..rounds {
        let publisher = publish_stream(
            via,
            "alice",
            round,
            n,
            rate,
            kill_pubsub(redis.url(), nodes),
        );
        let receiver = expect_stream(alice, round, 0..n);
        tokio::join!(publisher, receiver);
    }
}

/// `n` users (`u0`, `u1`, …) and a stub back-end that knows each of them.
async fn bulk_users(n: usize) -> (Vec<String>, Backend) {
    let users: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
    let extra: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), "BULK")).collect();
    let backend = Backend::start_with(&extra).await;
    (users, backend)
}

/// One client per user on `node`, each subscribed to `ALL`.
async fn subscribe_each(node: &Node, users: &[String]) -> Vec<Client> {
    let mut clients = Vec::with_capacity(users.len());
    for u in users {
        clients.push(Client::subscribed(&node.notws(u)).await);
    }
    clients
}

/// Each client's next frame is a notification titled `title`.
async fn expect_each(clients: &mut [Client], title: &str) {
    for (i, c) in clients.iter_mut().enumerate() {
        let text = c
            .recv_within(Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("user {i} got nothing"));
        let v: serde_json::Value = serde_json::from_str(&text).expect("a JSON frame");
        assert_eq!(v["title"], title, "user {i}");
    }
}

/// Reads the titles `{round}:{i}` for `i` in `range`; each must be the next one expected: 0
/// lost, in order, no duplicates.
async fn expect_stream(client: &mut Client, round: usize, range: std::ops::Range<usize>) {
    let n = range.end;
    for i in range {
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
    a.until_readyz(200).await;
    b.until_readyz(200).await;
    let mut alice = Client::subscribed(&a.notws("alice")).await;
    streams_through_kills(&b, &mut alice, &redis, 5, 1500, 300, 2).await;
    let m = a.metrics().await;
    assert!(metric(&m, "wsgate_broker_reconnects_total") >= 5.0);
    assert!(
        metric(&m, "wsgate_broker_recovered_messages_total") >= 1.0,
        "the kills lost messages that history recovered"
    );
}

/// While a node catches up after its subscription came back, the live messages that arrive are
/// held in memory only up to `--max-recovery-hold`; here nothing fits (0 bytes), so every one
/// of them is left in history and read back from there: still none lost, none out of order,
/// none twice. Hundreds of channels with a known position make each catch-up take a while.
/// `a_url`: where the node under test reaches `redis` (its own reader on plain TCP, the crate's
/// pub/sub over TLS).
async fn past_the_hold_bound_nothing_is_lost(redis: &Redis, a_url: String) {
    let (users, backend) = bulk_users(300).await;
    let mut cfg = redis_node_config(&backend, a_url, "zl", "a");
    cfg.max_recovery_hold = 0;
    let a = Node::start(cfg).await;
    let b = Node::start(redis_config(&backend, redis, "b")).await;
    a.until_readyz(200).await;
    b.until_readyz(200).await;
    let mut alice = Client::subscribed(&a.notws("alice")).await;
    let mut others = subscribe_each(&a, &users).await;
    // Every channel gets a known position, so each reconnect catches up on all of them.
    let (s, _) = b
        .notify(json!({"userIds": users, "notification": notification("T", "position")}))
        .await;
    assert_eq!(s, 202);
    streams_through_kills(&b, &mut alice, redis, 3, 600, 1000, 1).await;
    let m = a.metrics().await;
    let left = metric(
        &m,
        r#"wsgate_broker_hold_overflow_total{outcome="history"}"#,
    );
    assert!(
        left >= 1.0,
        "messages arrived during the catch-ups and were left to history ({left})"
    );
    assert!(
        !m.contains(r#"wsgate_broker_hold_overflow_total{outcome="lost"}"#),
        "nothing was lost"
    );
    expect_each(&mut others, "position").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_messages_past_the_hold_bound_are_read_back_from_history() {
    let redis = Redis::start();
    past_the_hold_bound_nothing_is_lost(&redis, redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_live_messages_past_the_hold_bound_are_read_back_from_history() {
    let tls = TlsRedis::start();
    past_the_hold_bound_nothing_is_lost(&tls.redis, tls.tls_url()).await;
}

/// A message that reached a channel's history but never came through pub/sub (as when Redis
/// drops a subscriber's output) is seen as a gap by the next one, read from history and
/// delivered before it; the messages that arrive during the recovery wait for it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_pubsub_never_carried_is_recovered_before_the_next_in_order() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let a = Node::start(redis_config(&backend, &redis, "a")).await;
    a.until_readyz(200).await;
    let mut alice = Client::subscribed(&a.notws("alice")).await;
    let publish = |i: usize| {
        a.notify(
            json!({"userIds": ["alice"], "notification": notification("T", &format!("0:{i}"))}),
        )
    };
    // The first message gives the node the channel's position.
    assert_eq!(publish(0).await.0, 202);
    expect_stream(&mut alice, 0, 0..1).await;

    let frame = serde_json::to_vec(&notification("T", "0:1")).expect("JSON");
    let envelope = wsgate::protocol::encode(wsgate::protocol::Kind::Notification, "T", &frame);
    let _: String = redis::cmd("XADD")
        .arg(wsgate::broker::history::key("zl:u:alice"))
        .arg("*")
        .arg("m")
        .arg(envelope.as_ref())
        .query(&mut redis.conn())
        .expect("XADD into alice's history");
    for i in 2..6 {
        assert_eq!(publish(i).await.0, 202);
    }
    expect_stream(&mut alice, 0, 1..6).await;
    let m = a.metrics().await;
    assert_eq!(metric(&m, "wsgate_broker_recovered_messages_total"), 1.0);
}

#[tokio::test]
async fn history_is_trimmed_by_time_and_expires() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let mut cfg = redis_config(&backend, &redis, "a");
    cfg.history_ttl = Duration::from_millis(500);
    let a = Node::start(cfg).await;
    a.until_readyz(200).await;
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
    a.until_readyz(200).await;
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

/// A TCP forwarder in front of Redis, standing in for the address clients use for "the master"
/// (a virtual IP or a DNS name moved by the failover tooling): `switch` points it at another
/// server and cuts every open connection, as moving the address does.
struct MasterAddress {
    port: u16,
    upstream: std::sync::Arc<std::sync::atomic::AtomicU16>,
    conns: std::sync::Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    _accept: tokio_util::task::AbortOnDropHandle<()>,
}

impl MasterAddress {
    async fn start(upstream: u16) -> MasterAddress {
        use std::sync::atomic::{AtomicU16, Ordering};
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the master address");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicU16::new(upstream));
        let conns = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let accept = {
            let (up, conns) = (up.clone(), conns.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let to = up.load(Ordering::SeqCst);
                    conns.lock().push(tokio::spawn(async move {
                        if let Ok(mut server) =
                            tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    }));
                }
            })
        };
        MasterAddress {
            port,
            upstream: up,
            conns,
            _accept: tokio_util::task::AbortOnDropHandle::new(accept),
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn switch(&self, upstream: u16) {
        self.upstream
            .store(upstream, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().drain(..) {
            c.abort();
        }
    }
}

/// A coordinated failover (`FAILOVER`: the master pauses writes until its replica has them all,
/// then the roles swap) while 300 notifications a second flow; the master address moves to the
/// promoted replica. Every acknowledged message arrives, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_failover_to_a_replica_loses_nothing_acknowledged() {
    let master = Redis::start();
    let replica = Redis::start();
    replicate(&master, &replica);
    let address = MasterAddress::start(master.port).await;
    let backend = Backend::start().await;
    let node = |id: &str| redis_node_config(&backend, address.url(), "zl", id);
    let a = Node::start(node("a")).await;
    let b = Node::start(node("b")).await;
    a.until_readyz(200).await;
    b.until_readyz(200).await;
    let mut alice = Client::subscribed(&a.notws("alice")).await;

    const N: usize = 1500;
    let failover = async {
        let _: () = redis::cmd("FAILOVER")
            .query(&mut master.conn())
            .expect("FAILOVER");
        eventually(Duration::from_secs(10), "replica promoted", || async {
            info_field(&replica, "replication", "role") == "master"
        })
        .await;
        address.switch(replica.port);
    };
    let publisher = publish_numbered(&b, "alice", N, 300, N / 2, failover);
    let receiver = alice.recv_numbered_until(N - 1, Duration::from_secs(10));
    let (acked, got) = tokio::join!(publisher, receiver);
    assert!(
        acked.len() > N / 2,
        "most publishes were acknowledged ({} of {N})",
        acked.len()
    );
    assert_acked_arrived_once_in_order(&acked, &got);
}

/// A publish to more users than one publish script call takes (128 channels a call) is split
/// into several calls of one pipeline: every user gets it once, and every user's history holds
/// it once, with the same payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_hundreds_of_users_reaches_each_once_and_each_history() {
    let redis = Redis::start();
    let (users, backend) = bulk_users(300).await;
    let a = Node::start(redis_config(&backend, &redis, "a")).await;
    a.until_readyz(200).await;
    let mut clients = subscribe_each(&a, &users).await;
    let (s, _) = a
        .notify(json!({"userIds": users, "notification": notification("T", "to many")}))
        .await;
    assert_eq!(s, 202);
    expect_each(&mut clients, "to many").await;
    for c in clients.iter_mut().take(5) {
        c.expect_silence(Duration::from_millis(200)).await;
    }
    let mut conn = redis.conn();
    for u in &users {
        let entries: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(format!("{{zl:u:{u}}}:history"))
            .arg("-")
            .arg("+")
            .query(&mut conn)
            .expect("XRANGE");
        assert_eq!(entries.len(), 1, "{u}'s history holds the publish once");
        assert!(
            String::from_utf8_lossy(&entries[0].1[1]).contains("to many"),
            "{u}'s history holds the payload"
        );
    }
}
