//! Redis behind Sentinels (`--redis-mode sentinel`): the nodes find the master through the
//! Sentinels and follow a failover. Real `redis-server`s and `redis-sentinel`s.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use wsgate::config::RedisMode;

fn sentinel_config(backend: &Backend, set: &SentinelSet, node: &str) -> wsgate::config::Config {
    let mut c = redis_node_config(backend, set.url(), "sn", node);
    c.redis_mode = RedisMode::Sentinel;
    c.redis_sentinel_master = Some(SENTINEL_MASTER.to_string());
    c
}

/// The master is SIGKILLed while 200 notifications a second flow from one node to a user on
/// another: the Sentinels promote the replica, both nodes reconnect to it, readiness dips and
/// recovers, every acknowledged message arrives once and in order, and presence is restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_fails_over_and_nothing_acknowledged_is_lost() {
    let mut set = SentinelSet::start();
    let backend = Backend::start().await;
    // What piles up during the failover (200 a second for a few seconds) arrives at once when
    // the node catches up from history: alice's queue must hold it.
    let mut config_a = sentinel_config(&backend, &set, "a");
    config_a.outbound_queue = 4096;
    config_a.outbound_queue_bytes = 16 << 20;
    let a = Node::start(config_a).await;
    let b = Node::start(sentinel_config(&backend, &set, "b")).await;
    a.until_readyz(200).await;
    b.until_readyz(200).await;

    // Before the failover: cross-node delivery through the master the Sentinels named.
    let mut alice = Client::subscribed(&a.notws("alice")).await;
    let (s, _) = b
        .notify(json!({"userIds": ["alice"], "notification": notification("T", "warm-up")}))
        .await;
    assert_eq!(s, 202);
    assert_eq!(alice.recv_json().await["title"], "warm-up");
    assert_eq!(b.presence(&["alice"]).await, json!({"alice": true}));

    let watch = ReadinessWatch::start(&a);
    const N: usize = 1600;
    let kill_master = async {
        set.master.kill();
    };
    let publisher = publish_numbered(&b, "alice", N, 200, N / 4, kill_master);
    let receiver = alice.recv_numbered_until(N - 1, Duration::from_secs(15));
    let (acked, got) = tokio::join!(publisher, receiver);
    let dipped = watch.stop().await;

    assert_eq!(
        info_field(&set.replica, "replication", "role"),
        "master",
        "the Sentinels promoted the replica"
    );
    assert!(
        acked.len() > N / 2,
        "delivery continued after the failover ({} of {N} acknowledged)",
        acked.len()
    );
    assert!(
        acked.iter().any(|i| *i > N / 2),
        "publishes were acknowledged again after the failover"
    );
    assert_acked_arrived_once_in_order(&acked, &got);
    assert!(dipped, "readiness dipped while the master was gone");
    a.until_readyz(200).await;
    assert_eq!(
        b.presence(&["alice"]).await,
        json!({"alice": true}),
        "presence was restored on the new master"
    );
    let m = a.metrics().await;
    assert!(metric(&m, "wsgate_broker_reconnects_total") >= 1.0);
    assert_eq!(metric(&m, "wsgate_broker_up"), 1.0);
    assert_eq!(
        metric(
            &m,
            &format!(
                "wsgate_broker_shard_up{{shard=\"127.0.0.1:{}\"}}",
                set.replica.port
            )
        ),
        1.0,
        "the shard gauge names the new master"
    );
}
