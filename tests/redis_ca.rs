//! `--redis-ca-file`: a Redis whose certificate a private CA signed (cert-manager's internal
//! issuer, a chart's self-made CA) is verified against that CA, without `#insecure`, in every
//! topology; without the CA the same URL is refused. Real `redis-server`s with TLS, certificates
//! made by rcgen.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;
use wsgate::config::{Config, RedisMode};

/// The node publishes through its pool and receives through its own pub/sub reader: a message
/// that reaches the client crossed both connections.
async fn delivers_through_redis(node: &Node, title: &str) {
    let mut alice = Client::subscribed(&node.notws("alice")).await;
    let (s, body) = node
        .notify(json!({"userIds": ["alice"], "notification": notification("T", title)}))
        .await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(alice.recv_json().await["title"], title);
}

#[tokio::test]
async fn a_node_with_the_ca_file_verifies_redis_and_delivers() {
    let tls = TlsRedis::start_with_ca();
    let ca = tls.ca.as_ref().expect("a private CA");
    let backend = Backend::start().await;
    let mut config = redis_node_config(&backend, tls.verified_url(), "ca", "a");
    config.redis_ca = Some(ca.redis_ca());
    let nodes = start_ready_nodes([config]).await;
    delivers_through_redis(&nodes[0], "verified").await;
}

/// The same URL without the CA: the public roots do not know the private CA, so the node never
/// gets ready and a publish answers 503 naming the certificate.
#[tokio::test]
async fn a_node_without_the_ca_file_refuses_the_private_certificate() {
    let tls = TlsRedis::start_with_ca();
    let backend = Backend::start().await;
    let node = Node::start(redis_node_config(&backend, tls.verified_url(), "ca", "b")).await;
    // Long enough for several reconnect attempts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(node.readyz().await, 503, "not ready without the CA");
    let (s, body) = node
        .notify(json!({"userIds": ["alice"], "notification": notification("T", "refused")}))
        .await;
    assert_eq!(s, 503, "{body}");
    assert!(body.to_string().contains("certificate"), "{body}");
}

/// A configuration error stops the binary before it binds, with exit code 64 and one line that
/// names the flag.
#[test]
fn a_missing_ca_file_stops_the_binary_with_exit_code_64() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--redis-url",
            "rediss://127.0.0.1:6380",
            "--redis-ca-file",
            "/nonexistent/ca.pem",
        ])
        .env_clear()
        .output()
        .expect("run wsgate serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--redis-ca-file"), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");
}

/// A master, optionally a replica, and one Sentinel, all TLS with the CA's certificate; the
/// replica and the Sentinel reach the master over TLS too (`tls-replication yes`), and the
/// Sentinel watches it as `wsgate`.
struct TlsSentinel {
    master: Redis,
    /// The replica and its TLS port, which is what it announces (`tls-replication`).
    replica: Option<(Redis, u16)>,
    sentinel_tls_port: u16,
    sentinel: std::process::Child,
    dir: std::path::PathBuf,
}

/// A `redis-server` with TLS on `tls_port` (and plain TCP on another port, for the test's own
/// commands), replicating over TLS.
fn tls_server(ca: &PrivateCa, tls_port: u16) -> Redis {
    let mut args = vec!["--tls-port".to_owned(), tls_port.to_string()];
    args.extend(ca.tls_args());
    // Diskless full syncs, sent and loaded: either side of a disk-based one writes an RDB file
    // into the working directory.
    for (name, value) in [
        ("--tls-replication", "yes"),
        ("--repl-diskless-sync", "yes"),
        ("--repl-diskless-sync-delay", "0"),
        ("--repl-diskless-load", "on-empty-db"),
    ] {
        args.extend([name.to_owned(), value.to_owned()]);
    }
    Redis::start_on(free_port(), args)
}

impl TlsSentinel {
    fn start(ca: &PrivateCa, with_replica: bool) -> TlsSentinel {
        let master_tls_port = free_port();
        let master = tls_server(ca, master_tls_port);
        let replica = with_replica.then(|| {
            let tls_port = free_port();
            let replica = tls_server(ca, tls_port);
            redis::cmd("REPLICAOF")
                .arg("127.0.0.1")
                .arg(master_tls_port)
                .query::<()>(&mut replica.conn())
                .expect("REPLICAOF");
            wait_sync(Duration::from_secs(10), "replica in sync over TLS", || {
                info_field(&replica, "replication", "master_link_status") == "up"
            });
            (replica, tls_port)
        });
        let dir = ca.dir.join("sentinel");
        std::fs::create_dir_all(&dir).expect("a directory for the Sentinel");
        let (port, sentinel_tls_port) = (free_port(), free_port());
        let file = dir.join("sentinel.conf");
        let tls: Vec<String> = ca
            .tls_args()
            .chunks(2)
            .map(|kv| format!("{} {}", kv[0].trim_start_matches("--"), kv[1]))
            .collect();
        std::fs::write(
            &file,
            format!(
                "port {port}\ntls-port {sentinel_tls_port}\n{tls}\ntls-replication yes\n\
                 bind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_tls_port} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 5000\n",
                tls = tls.join("\n"),
                dir = dir.display(),
            ),
        )
        .expect("write the Sentinel config");
        let sentinel = spawn_or_explain(
            Command::new("redis-server").arg(&file).arg("--sentinel"),
            "redis-server",
        );
        let replicas = usize::from(replica.is_some());
        let set = TlsSentinel {
            master,
            replica,
            sentinel_tls_port,
            sentinel,
            dir,
        };
        // Ready once the Sentinel has reached the master over TLS, calls it a master and knows
        // its replica (from the master's INFO).
        let sentinel = || {
            redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(300)))
        };
        wait_sync(
            Duration::from_secs(20),
            "the Sentinel sees the master and its replicas",
            || {
                let master = sentinel().and_then(|mut c| {
                    redis::cmd("SENTINEL")
                        .arg("MASTER")
                        .arg(SENTINEL_MASTER)
                        .query::<HashMap<String, String>>(&mut c)
                });
                let known = sentinel().and_then(|mut c| {
                    redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg(SENTINEL_MASTER)
                        .query::<Vec<redis::Value>>(&mut c)
                });
                master.is_ok_and(|m| m.get("flags").map(String::as_str) == Some("master"))
                    && known.is_ok_and(|r| r.len() == replicas)
            },
        );
        set
    }

    /// A node that finds the master through this Sentinel over TLS, verifying both against the CA.
    fn node_config(&self, ca: &PrivateCa, backend: &Backend, node: &str) -> Config {
        let url = format!("rediss://127.0.0.1:{}", self.sentinel_tls_port);
        let mut config = redis_node_config(backend, url, "ca", node);
        config.redis_mode = RedisMode::Sentinel;
        config.redis_sentinel_master = Some(SENTINEL_MASTER.to_owned());
        config.redis_ca = Some(ca.redis_ca());
        config
    }
}

impl Drop for TlsSentinel {
    fn drop(&mut self) {
        let _ = self.sentinel.kill();
        let _ = self.sentinel.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sentinel mode over TLS: the Sentinel and the master it names are both verified against the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_mode_verifies_the_sentinels_and_the_master_against_the_ca() {
    let ca = PrivateCa::new();
    let set = TlsSentinel::start(&ca, false);
    let backend = Backend::start().await;
    let nodes = start_ready_nodes([set.node_config(&ca, &backend, "s")]).await;
    delivers_through_redis(&nodes[0], "via the Sentinel").await;
    assert!(set.master.is_running());
}

/// A failover behind TLS Sentinels: the master is killed, the Sentinel promotes the replica, and
/// the node asks the Sentinel again, verifies the new master against the CA and delivers
/// through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_mode_over_tls_follows_a_failover_to_the_replica() {
    let ca = PrivateCa::new();
    let mut set = TlsSentinel::start(&ca, true);
    let backend = Backend::start().await;
    let nodes = start_ready_nodes([set.node_config(&ca, &backend, "f")]).await;
    let node = &nodes[0];
    delivers_through_redis(node, "before the failover").await;

    let mut alice = Client::subscribed(&node.notws("alice")).await;
    set.master.kill();
    let Some((replica, replica_tls_port)) = &set.replica else {
        panic!("the set was started with a replica");
    };
    wait_sync(
        Duration::from_secs(30),
        "the Sentinel promoted the replica",
        || info_field(replica, "replication", "role") == "master",
    );
    // Publishes fail (503) until the node has found the new master; the first one it takes
    // reaches alice, whose subscription the node restored there.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, body) = node
            .notify(json!({"userIds": ["alice"], "notification": notification("T", "after")}))
            .await;
        if s == 202 {
            break;
        }
        assert_eq!(s, 503, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "the node took no publish within 30 s of the failover: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alice.recv_json().await["title"], "after");
    node.until_readyz(200).await;
    let m = node.metrics().await;
    assert!(metric(&m, "wsgate_broker_reconnects_total") >= 1.0);
    assert_eq!(
        metric(
            &m,
            &format!("wsgate_broker_shard_up{{shard=\"127.0.0.1:{replica_tls_port}\"}}")
        ),
        1.0,
        "the node is on the promoted replica's TLS port"
    );
}

/// A cluster-enabled `redis-server` with TLS on `tls_port` for clients and for the cluster bus
/// (`tls-cluster yes`: the bus listens on the TLS port + 10,000, and the slot map names TLS
/// ports), its node file in `dir`; plain TCP on another port for the test's own commands.
fn tls_cluster_node(ca: &PrivateCa, dir: &std::path::Path, tls_port: u16) -> Redis {
    let mut args: Vec<String> = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        &format!("nodes-{tls_port}.conf"),
        "--dir",
        &dir.display().to_string(),
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cluster",
        "yes",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(ca.tls_args());
    Redis::start_on(free_port(), args)
}

/// Cluster mode over TLS: one master that owns every slot (`tls-cluster yes`, so the slot map
/// names its TLS port), verified against the CA for commands and for sharded pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_verifies_every_shard_against_the_ca() {
    let ca = PrivateCa::new();
    let dir = ca.dir.join("cluster");
    std::fs::create_dir_all(&dir).expect("a directory for the cluster node");
    let tls_port = free_cluster_port();
    let node = tls_cluster_node(&ca, &dir, tls_port);
    redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query::<()>(&mut node.conn())
        .expect("CLUSTER ADDSLOTSRANGE");
    wait_sync(Duration::from_secs(20), "cluster_state:ok", || {
        cluster_info(&node, "cluster_state") == "ok"
    });

    let backend = Backend::start().await;
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let mut config = redis_node_config(&backend, url, "ca", "c");
    config.redis_mode = RedisMode::Cluster;
    config.redis_ca = Some(ca.redis_ca());
    let nodes = start_ready_nodes([config]).await;
    delivers_through_redis(&nodes[0], "via the cluster").await;
}

/// Cluster mode over TLS with three masters (`tls-cluster yes` on every one, the bus over TLS
/// too): the node learns every shard's TLS address from the slot map, verifies each against the
/// CA, and subscribes users' channels on whichever master owns their slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_over_tls_reaches_every_one_of_three_masters() {
    let ca = PrivateCa::new();
    let dir = ca.dir.join("cluster-3");
    std::fs::create_dir_all(&dir).expect("a directory for the cluster nodes");
    let mut masters = Vec::new();
    let mut tls_ports = Vec::new();
    for _ in 0..3 {
        let tls_port = free_cluster_port();
        masters.push(tls_cluster_node(&ca, &dir, tls_port));
        tls_ports.push(tls_port);
    }
    // Each master owns a third of the slots; the first meets the others over the TLS bus.
    let thirds = [(0, 5460), (5461, 10922), (10923, 16383)];
    for (m, (from, to)) in masters.iter().zip(thirds) {
        redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(from)
            .arg(to)
            .query::<()>(&mut m.conn())
            .expect("CLUSTER ADDSLOTSRANGE");
    }
    for port in &tls_ports[1..] {
        redis::cmd("CLUSTER")
            .arg("MEET")
            .arg("127.0.0.1")
            .arg(*port)
            .query::<()>(&mut masters[0].conn())
            .expect("CLUSTER MEET");
    }
    wait_sync(
        Duration::from_secs(30),
        "all three masters agree: cluster_state:ok, 3 known nodes",
        || {
            masters.iter().all(|m| {
                cluster_info(m, "cluster_state") == "ok"
                    && cluster_info(m, "cluster_known_nodes") == "3"
            })
        },
    );

    let users: Vec<String> = (0..60).map(|i| format!("u{i}")).collect();
    let extra: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), "BULK")).collect();
    let backend = Backend::start_with(&extra).await;
    let url = format!("rediss://127.0.0.1:{}", tls_ports[0]);
    let mut config = redis_node_config(&backend, url, "ca", "d");
    config.redis_mode = RedisMode::Cluster;
    config.redis_ca = Some(ca.redis_ca());
    let nodes = start_ready_nodes([config]).await;
    let node = &nodes[0];

    let mut sockets = Vec::new();
    for u in &users {
        sockets.push(Client::subscribed(&node.notws(u)).await);
    }
    // Every master holds some of the users' channels, each subscribed once.
    let mut per_master = Vec::new();
    for m in &masters {
        let shard: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .arg("ca:u:u*")
            .query(&mut m.conn())
            .expect("PUBSUB SHARDCHANNELS");
        per_master.push(shard.len());
    }
    assert_eq!(
        per_master.iter().sum::<usize>(),
        users.len(),
        "every user channel is subscribed once: {per_master:?}"
    );
    assert!(
        per_master.iter().all(|n| *n > 0),
        "the user channels are spread over all three masters: {per_master:?}"
    );
    let (s, body) = node
        .notify(json!({"userIds": users, "notification": notification("T", "all shards")}))
        .await;
    assert_eq!(s, 202, "{body}");
    for (u, socket) in users.iter().zip(&mut sockets) {
        assert_eq!(socket.recv_json().await["title"], "all shards", "{u}");
    }
    assert_eq!(
        shards_up(&node.metrics().await),
        3,
        "one canary per shard, each over TLS"
    );
}
