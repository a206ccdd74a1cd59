//! Redis Cluster (`--redis-mode cluster`): sharded pub/sub across three masters, three gateway
//! nodes, a master killed mid-stream. Real `redis-server`s made into a cluster by `redis-cli`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use wsgate::config::RedisMode;

const SHORT: Duration = Duration::from_millis(300);

fn cluster_config(backend: &Backend, cluster: &RedisCluster, node: &str) -> wsgate::config::Config {
    let mut c = redis_node_config(backend, cluster.url(), "wsgate", node);
    c.redis_mode = RedisMode::Cluster;
    c
}

fn query<T: redis::FromRedisValue>(redis: &Redis, cmd: &mut redis::Cmd) -> T {
    cmd.query(&mut redis.conn()).expect("a Redis query")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_through_sharded_pubsub_spread_over_every_master() {
    let users: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
    let extra: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), "BULK")).collect();
    let cluster = RedisCluster::start();
    let backend = Backend::start_with(&extra).await;
    let nodes =
        start_ready_nodes(["a", "b", "c"].map(|id| cluster_config(&backend, &cluster, id))).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    let mut on = ThreeNodeClients::connect(a, b, c).await;
    let (s, _) = b
        .notify(json!({"userIds": ["alice", "dave"], "notification": notification("T", "users")}))
        .await;
    assert_eq!(s, 202);
    assert_eq!(on.alice_a.recv_json().await["title"], "users");
    assert_eq!(on.alice_c.recv_json().await["title"], "users");
    assert_eq!(on.dave_c.recv_json().await["title"], "users");
    on.bob_b.expect_silence(SHORT).await;
    let _chats = on.tenant_broadcast_and_chat(a, b, c, SHORT).await;

    // Presence lives in the cluster too (its keys share one slot).
    assert_eq!(
        a.presence(&["alice", "bob", "erin"]).await,
        json!({"alice": true, "bob": true, "erin": false})
    );

    // 1,000 users over the three nodes: their channels spread over every master, all sharded.
    let mut sockets = Vec::new();
    for (n, chunk) in users.chunks(50).enumerate() {
        let connects = chunk.iter().enumerate().map(|(i, u)| {
            let url = nodes[(n * 50 + i) % 3].notws(u);
            async move { Client::subscribed(&url).await }
        });
        sockets.extend(futures_util::future::join_all(connects).await);
    }
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let mut per_master = Vec::new();
    for m in &masters {
        let shard: Vec<String> = query(
            m,
            redis::cmd("PUBSUB").arg("SHARDCHANNELS").arg("wsgate:u:u*"),
        );
        let counts: Vec<(String, i64)> =
            query(m, redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&shard));
        assert!(
            counts.iter().all(|(_, n)| *n == 1),
            "each user channel has its one node subscribed"
        );
        let classic: Vec<String> = query(m, redis::cmd("PUBSUB").arg("CHANNELS").arg("wsgate*"));
        assert!(
            classic.is_empty(),
            "no classic pub/sub channel on {}: {classic:?}",
            m.port
        );
        per_master.push(shard.len());
    }
    assert_eq!(
        per_master.iter().sum::<usize>(),
        1000,
        "every user channel is subscribed once: {per_master:?}"
    );
    assert!(
        per_master.iter().all(|n| *n > 200),
        "the user channels are spread over all three masters: {per_master:?}"
    );
    let (s, _) = a
        .notify(
            json!({"userIds": ["u7", "u500", "u999"], "notification": notification("T", "bulk")}),
        )
        .await;
    assert_eq!(s, 202);
    for i in [7, 500, 999] {
        assert_eq!(sockets[i].recv_json().await["title"], "bulk");
    }
    let m = a.metrics().await;
    assert_eq!(shards_up(&m), 3, "one canary per shard");
}

/// The master that owns alice's channel is SIGKILLed while 200 notifications a second flow from
/// one node to alice on another: its replica takes over, the nodes resubscribe on the new slot
/// map, readiness dips and recovers, and every acknowledged message arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_over_and_nothing_acknowledged_is_lost() {
    let mut cluster = RedisCluster::start();
    let backend = Backend::start().await;
    // Whatever piles up while the shard fails over (200 a second for a few seconds) arrives
    // at once when the node catches up: alice's queue must hold it.
    let mut config_a = cluster_config(&backend, &cluster, "a");
    config_a.outbound_queue = 4096;
    config_a.outbound_queue_bytes = 16 << 20;
    let a = Node::start(config_a).await;
    let b = Node::start(cluster_config(&backend, &cluster, "b")).await;
    a.until_readyz(200).await;
    b.until_readyz(200).await;
    let mut alice = Client::subscribed(&a.notws("alice")).await;

    let watch = ReadinessWatch::start(&a);
    const N: usize = 1600;
    let kill_alice_shard = async {
        cluster.owner_of("wsgate:u:alice").kill();
    };
    let publisher = publish_numbered(&b, "alice", N, 200, N / 4, kill_alice_shard);
    let receiver = alice.recv_numbered_until(N - 1, Duration::from_secs(15));
    let (acked, got) = tokio::join!(publisher, receiver);
    let dipped = watch.stop().await;

    assert!(
        acked.iter().any(|i| *i > N / 2),
        "publishes were acknowledged again after the failover ({} of {N})",
        acked.len()
    );
    assert_acked_arrived_once_in_order(&acked, &got);
    assert!(dipped, "readiness dipped while the shard was gone");
    a.until_readyz(200).await;
    assert_eq!(cluster.masters().len(), 3, "the replica took over");
    assert_eq!(b.presence(&["alice"]).await, json!({"alice": true}));
    let m = a.metrics().await;
    assert!(metric(&m, "wsgate_broker_reconnects_total") >= 1.0);
    assert_eq!(metric(&m, "wsgate_broker_up"), 1.0);
    assert_eq!(
        shards_up(&m),
        3,
        "every shard, the promoted replica's included, is up again"
    );
}
