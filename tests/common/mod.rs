//! Test harness: real parts only. A real `redis-server` on an ephemeral port (owned by the test,
//! so it can be killed and restarted), gateway nodes running in-process on port 0, a stub
//! GrowERP back-end answering with the real response shapes and counting its calls, and real
//! WebSocket clients that behave like GrowERP's `WsClient`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use wsgate::config::Config;

/// The unit tests' private CA, shared rather than written twice.
#[path = "../../src/broker/test_ca.rs"]
mod test_ca;
use wsgate::server::{self, AppState};

pub const TOKEN: &str = "test-token";

// ---------------------------------------------------------------- Redis

/// A `redis-server` child process on an ephemeral port; killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// Arguments beyond the defaults (cluster mode).
    extra: Vec<String>,
}

/// A free loopback port, never one this test process has been given before: the kernel may hand
/// the same ephemeral port to two binds in a row once the first listener is closed, and a test
/// that asks for two ports (a node's public and admin listeners) would then get one port twice.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("an ephemeral port is available");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no loopback port this process has not used yet")
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(free_port(), Vec::new())
    }

    /// On a given port, with extra arguments.
    pub fn start_on(port: u16, extra: Vec<String>) -> Redis {
        let mut r = Redis {
            port,
            child: None,
            extra,
        };
        r.spawn();
        r
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}). These tests need a real Redis: install it \
                     with `apt-get install redis-server` (Debian/Ubuntu) or `brew install redis`, \
                     so that `redis-server` is on PATH."
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING on port {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        self.is_running()
            && redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
    }

    /// SIGKILLs the server (no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to the test Redis")
    }

    /// `PUBSUB CHANNELS pattern`, sorted.
    pub fn channels(&self, pattern: &str) -> Vec<String> {
        let mut v: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(pattern)
            .query(&mut self.conn())
            .expect("PUBSUB CHANNELS");
        v.sort();
        v
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `redis` is a replica of `master` with its link up. Replication runs over the
/// socket (diskless sync and load), so nothing is written into the working directory.
pub fn replicate(master: &Redis, replica: &Redis) {
    for (server, name, value) in [
        (master, "repl-diskless-sync", "yes"),
        (master, "repl-diskless-sync-delay", "0"),
        (replica, "repl-diskless-load", "on-empty-db"),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query(&mut server.conn())
            .expect("CONFIG SET");
    }
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(master.port)
        .query(&mut replica.conn())
        .expect("REPLICAOF");
    wait_sync(Duration::from_secs(10), "replica in sync", || {
        info_field(replica, "replication", "master_link_status") == "up"
    });
}

/// One field of `INFO section`.
pub fn info_field(redis: &Redis, section: &str, field: &str) -> String {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query(&mut redis.conn())
        .unwrap_or_default();
    field_value(&info, field)
}

/// The value of `field` in `INFO`-style text (`field:value` lines), or "" without one.
fn field_value(info: &str, field: &str) -> String {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Polls `f` (blocking) until true or `timeout`.
pub fn wait_sync(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn spawn_or_explain(cmd: &mut Command, tool: &str) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {tool} ({e}). These tests need a real Redis 7: install it with \
                 `apt-get install redis-server` (Debian/Ubuntu) or `brew install redis`, so that \
                 `{tool}` is on PATH."
            )
        })
}

/// A Sentinel deployment: a master, one replica and three Sentinels (`redis-server --sentinel`, quorum 2) watching
/// the master set `wsgate`, with a 1 s down-after, so a killed master fails over in seconds.
pub struct SentinelSet {
    pub master: Redis,
    pub replica: Redis,
    pub sentinel_ports: Vec<u16>,
    sentinels: Vec<Child>,
    dir: std::path::PathBuf,
}

pub const SENTINEL_MASTER: &str = "wsgate";

impl SentinelSet {
    pub fn start() -> SentinelSet {
        let master = Redis::start();
        let replica = Redis::start();
        replicate(&master, &replica);
        let dir = std::env::temp_dir().join(format!("wsgate-sentinel-{}", master.port));
        std::fs::create_dir_all(&dir).expect("a temporary directory for the Sentinel configs");
        let mut set = SentinelSet {
            master,
            replica,
            sentinel_ports: Vec::new(),
            sentinels: Vec::new(),
            dir,
        };
        for _ in 0..3 {
            let port = free_port();
            let file = set.dir.join(format!("{port}.conf"));
            std::fs::write(
                &file,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {m} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                    dir = set.dir.display(),
                    m = set.master.port
                ),
            )
            .expect("write a Sentinel config");
            let child =
                // `redis-server --sentinel` is `redis-sentinel`, without the second package.
                spawn_or_explain(
                    Command::new("redis-server").arg(&file).arg("--sentinel"),
                    "redis-server",
                );
            set.sentinels.push(child);
            set.sentinel_ports.push(port);
        }
        // Ready when every Sentinel knows the replica and the two other Sentinels (they find
        // each other through the master's hello channel every 2 s).
        for port in set.sentinel_ports.clone() {
            wait_sync(Duration::from_secs(20), "Sentinels know each other", || {
                let q = |sub: &str| -> usize {
                    redis::Client::open(format!("redis://127.0.0.1:{port}"))
                        .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(300)))
                        .and_then(|mut c| {
                            redis::cmd("SENTINEL")
                                .arg(sub)
                                .arg(SENTINEL_MASTER)
                                .query::<Vec<redis::Value>>(&mut c)
                        })
                        .map(|v| v.len())
                        .unwrap_or(0)
                };
                q("replicas") == 1 && q("sentinels") == 2
            });
        }
        set
    }

    /// The Sentinels as a `--redis-url` list.
    pub fn url(&self) -> String {
        self.sentinel_ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for c in &mut self.sentinels {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of 3 masters and 3 replicas (`redis-cli --cluster create`), on loopback
/// ports below 55,000 (each node's bus port is its port + 10,000), with a 1 s node timeout so
/// that a killed master's replica takes over within seconds. Config files live in a temporary
/// directory, removed on drop.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
    dir: std::path::PathBuf,
}

/// A free loopback port below 55,000 whose cluster bus port (+10,000) is free too.
pub fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port below 55,000 with a free bus port");
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!("wsgate-cluster-{}", free_port()));
        std::fs::create_dir_all(&dir).expect("a temporary directory for the cluster");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_cluster_port();
            let d = dir.display().to_string();
            let conf = format!("nodes-{port}.conf");
            let extra: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "1000",
                "--cluster-replica-validity-factor",
                "0",
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                &d,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            nodes.push(Redis::start_on(port, extra));
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = create.output().unwrap_or_else(|e| {
            panic!(
                "cannot run redis-cli ({e}). These tests need a real Redis 7: install it with \
                 `apt-get install redis-server` (Debian/Ubuntu, includes redis-cli) or `brew \
                 install redis`, so that `redis-cli` is on PATH."
            )
        });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes, dir };
        for n in &cluster.nodes {
            wait_sync(Duration::from_secs(20), "cluster_state:ok", || {
                cluster_info(n, "cluster_state") == "ok"
            });
        }
        // Every replica in sync, so that a failover has the data.
        wait_sync(Duration::from_secs(20), "replicas in sync", || {
            cluster
                .replicas()
                .iter()
                .all(|r| info_field(r, "replication", "master_link_status") == "up")
                && cluster.masters().len() == 3
        });
        cluster
    }

    /// The seed nodes as a `--redis-url` list (the masters).
    pub fn url(&self) -> String {
        self.masters()
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes that are masters now (killed nodes excluded).
    pub fn masters(&self) -> Vec<&Redis> {
        self.nodes
            .iter()
            .filter(|n| n.is_running() && info_field(n, "replication", "role") == "master")
            .collect()
    }

    pub fn replicas(&self) -> Vec<&Redis> {
        self.nodes
            .iter()
            .filter(|n| n.is_running() && info_field(n, "replication", "role") == "slave")
            .collect()
    }

    /// The node that serves `key`'s slot now (asks `CLUSTER KEYSLOT` and `CLUSTER SLOTS`).
    pub fn owner_of(&mut self, key: &str) -> &mut Redis {
        let any = self.masters()[0].conn();
        let mut any = any;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut any)
            .expect("CLUSTER KEYSLOT");
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut any)
            .expect("CLUSTER SLOTS");
        let mut port = None;
        for r in ranges {
            if let redis::Value::Array(r) = r {
                if let (
                    Some(redis::Value::Int(a)),
                    Some(redis::Value::Int(b)),
                    Some(redis::Value::Array(m)),
                ) = (r.first(), r.get(1), r.get(2))
                {
                    if (*a..=*b).contains(&slot) {
                        if let Some(redis::Value::Int(p)) = m.get(1) {
                            port = Some(*p as u16);
                        }
                    }
                }
            }
        }
        let port = port.expect("the slot has an owner");
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("the owner is one of ours")
    }
}

/// One field of `CLUSTER INFO`.
pub fn cluster_info(redis: &Redis, field: &str) -> String {
    let info: String = redis::cmd("CLUSTER")
        .arg("INFO")
        .query(&mut redis.conn())
        .unwrap_or_default();
    field_value(&info, field)
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private CA, as cert-manager or a chart makes one, and a server certificate for 127.0.0.1 it
/// signed, written to a temporary directory (removed on drop): `ca.pem` is what
/// `--redis-ca-file` names.
pub struct PrivateCa {
    pub dir: std::path::PathBuf,
    pub ca_file: std::path::PathBuf,
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
}

impl PrivateCa {
    pub fn new() -> PrivateCa {
        let dir = std::env::temp_dir().join(format!("wsgate-ca-{}", free_port()));
        std::fs::create_dir_all(&dir).expect("a temporary directory for the certificates");
        let ca = test_ca::TestCa::new();
        let (cert, key) = ca.issue_pem("127.0.0.1");
        let pki = PrivateCa {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("redis.crt"),
            key_file: dir.join("redis.key"),
            dir,
        };
        std::fs::write(&pki.ca_file, ca.pem()).expect("write the CA certificate");
        std::fs::write(&pki.cert_file, cert).expect("write the certificate");
        std::fs::write(&pki.key_file, key).expect("write the key");
        pki
    }

    /// `redis-server` arguments for TLS with the CA's certificate; clients need none of their
    /// own. The CA also verifies the server's own TLS links (replication, the Sentinels').
    pub fn tls_args(&self) -> Vec<String> {
        [
            "--tls-cert-file",
            &self.cert_file.display().to_string(),
            "--tls-key-file",
            &self.key_file.display().to_string(),
            "--tls-ca-cert-file",
            &self.ca_file.display().to_string(),
            "--tls-auth-clients",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// `--redis-ca-file`, read as the node reads it.
    pub fn redis_ca(&self) -> wsgate::broker::RedisCa {
        wsgate::config::read_redis_ca(&self.ca_file).expect("the CA file is valid")
    }
}

impl Drop for PrivateCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` that also serves TLS on a second port: with a self-signed certificate for
/// 127.0.0.1 (written to a temporary directory, removed on drop), or with one a private CA signed.
pub struct TlsRedis {
    pub redis: Redis,
    pub tls_port: u16,
    dir: std::path::PathBuf,
    pub ca: Option<PrivateCa>,
}

impl TlsRedis {
    pub fn start() -> TlsRedis {
        let dir = std::env::temp_dir().join(format!("wsgate-tls-{}", free_port()));
        std::fs::create_dir_all(&dir).expect("a temporary directory for the certificate");
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()])
            .expect("a self-signed certificate");
        let (cert_file, key_file) = (dir.join("redis.crt"), dir.join("redis.key"));
        std::fs::write(&cert_file, cert.cert.pem()).expect("write the certificate");
        std::fs::write(&key_file, cert.key_pair.serialize_pem()).expect("write the key");
        let tls_port = free_port();
        let redis = Redis::start_on(
            free_port(),
            [
                "--tls-port".to_owned(),
                tls_port.to_string(),
                "--tls-cert-file".to_owned(),
                cert_file.display().to_string(),
                "--tls-key-file".to_owned(),
                key_file.display().to_string(),
                "--tls-auth-clients".to_owned(),
                "no".to_owned(),
            ]
            .into(),
        );
        TlsRedis {
            redis,
            tls_port,
            dir,
            ca: None,
        }
    }

    /// With a certificate a private CA signed (`self.ca`).
    pub fn start_with_ca() -> TlsRedis {
        let ca = PrivateCa::new();
        let tls_port = free_port();
        let mut args = vec!["--tls-port".to_owned(), tls_port.to_string()];
        args.extend(ca.tls_args());
        TlsRedis {
            redis: Redis::start_on(free_port(), args),
            tls_port,
            dir: ca.dir.clone(),
            ca: Some(ca),
        }
    }

    /// The TLS port's URL; the certificate is self-signed, so it is not verified.
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}/#insecure", self.tls_port)
    }

    /// The TLS port's URL, verified (against `--redis-ca-file` for a CA-signed certificate).
    pub fn verified_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------- stub back-end

/// How the stub back-end answers.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Normal = 0,
    /// Every call answers 500.
    Fail = 1,
    /// Every call sleeps longer than the gateway's timeout.
    Hang = 2,
}

pub struct BackendState {
    /// key → (userId, tenant)
    keys: HashMap<String, (String, String)>,
    /// room → members
    rooms: HashMap<String, Vec<String>>,
    pub auth_calls: AtomicU64,
    pub room_calls: AtomicU64,
    mode: AtomicU8,
    /// Delay added to every Authenticate call, in ms (to make concurrent misses overlap).
    pub auth_delay_ms: AtomicU64,
    /// whoami (session cookie) calls, and the `Cookie` header of the last one.
    pub whoami_calls: AtomicU64,
    pub whoami_cookie: std::sync::Mutex<Option<String>>,
}

/// A stand-in for the Moqui/GrowERP back-end with the real Authenticate and ChatRoom response
/// shapes. Keys: `key-<user>` for users alice, bob, carol (tenant ACME) and dave (tenant OTHER),
/// plus any `key-<name>` registered with [`Backend::start_with`]. Rooms: `room1` (alice, bob,
/// carol), `room2` (alice, dave).
pub struct Backend {
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
}

impl Backend {
    pub async fn start() -> Backend {
        Backend::start_with(&[]).await
    }

    pub async fn start_with(extra_users: &[(&str, &str)]) -> Backend {
        let mut keys = HashMap::new();
        for (u, t) in [
            ("alice", "ACME"),
            ("bob", "ACME"),
            ("carol", "ACME"),
            ("dave", "OTHER"),
        ]
        .iter()
        .chain(extra_users.iter())
        {
            keys.insert(format!("key-{u}"), (u.to_string(), t.to_string()));
        }
        let mut rooms = HashMap::new();
        rooms.insert(
            "room1".to_string(),
            vec!["alice".into(), "bob".into(), "carol".into()],
        );
        rooms.insert("room2".to_string(), vec!["alice".into(), "dave".into()]);
        let state = Arc::new(BackendState {
            keys,
            rooms,
            auth_calls: AtomicU64::new(0),
            room_calls: AtomicU64::new(0),
            mode: AtomicU8::new(0),
            auth_delay_ms: AtomicU64::new(0),
            whoami_calls: AtomicU64::new(0),
            whoami_cookie: std::sync::Mutex::new(None),
        });
        let app = Router::new()
            .route("/rest/s1/growerp/100/Authenticate", get(authenticate))
            .route("/rest/s1/growerp/100/ChatRoom", get(chat_room))
            .route("/rest/s1/wsgate/whoami", get(whoami))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stub back-end");
        let addr = listener.local_addr().expect("stub address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Backend { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, m: Mode) {
        self.state.mode.store(m as u8, Ordering::SeqCst);
    }

    pub fn auth_calls(&self) -> u64 {
        self.state.auth_calls.load(Ordering::SeqCst)
    }

    pub fn room_calls(&self) -> u64 {
        self.state.room_calls.load(Ordering::SeqCst)
    }
}

async fn misbehave(s: &BackendState) -> Option<Response> {
    match s.mode.load(Ordering::SeqCst) {
        1 => Some((StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()),
        2 => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Some(StatusCode::GATEWAY_TIMEOUT.into_response())
        }
        _ => None,
    }
}

/// The `api_key` header the gateway sends the back-end ("" without one).
fn api_key(headers: &HeaderMap) -> &str {
    headers
        .get("api_key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn authenticate(State(s): State<Arc<BackendState>>, headers: HeaderMap) -> Response {
    s.auth_calls.fetch_add(1, Ordering::SeqCst);
    let delay = s.auth_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(r) = misbehave(&s).await {
        return r;
    }
    let key = api_key(&headers);
    match s.keys.get(key) {
        Some((user, tenant)) => Json(json!({"authenticate": {
            "ownerPartyId": tenant,
            "user": {"userId": user, "firstName": user, "lastName": "Test", "loginName": user},
            "company": {"partyId": tenant, "name": tenant},
            "apiKey": null,
            "moquiSessionToken": "x"
        }}))
        .into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"errorCode": 401, "errors": "User must be logged in"})),
        )
            .into_response(),
    }
}

/// The Moqui component's whoami: cookie `JSESSIONID=sess-<user>` is that user's web session.
/// Answers with a `Set-Cookie` (as a servlet container may) that must never reach a client.
async fn whoami(State(s): State<Arc<BackendState>>, headers: HeaderMap) -> Response {
    s.whoami_calls.fetch_add(1, Ordering::SeqCst);
    let cookie = headers
        .get("cookie")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Ok(mut last) = s.whoami_cookie.lock() {
        last.clone_from(&cookie);
    }
    let delay = s.auth_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(r) = misbehave(&s).await {
        return r;
    }
    let user = cookie.as_deref().unwrap_or("").split(';').find_map(|c| {
        c.trim()
            .strip_prefix("JSESSIONID=sess-")
            .filter(|u| s.keys.contains_key(&format!("key-{u}")))
    });
    let set_cookie = [("set-cookie", "JSESSIONID=rotated; Path=/; HttpOnly")];
    match user {
        Some(u) => {
            let tenant = s.keys[&format!("key-{u}")].1.clone();
            (
                set_cookie,
                Json(json!({"userId": u, "ownerPartyId": tenant})),
            )
                .into_response()
        }
        None => (StatusCode::UNAUTHORIZED, set_cookie, "not logged in").into_response(),
    }
}

async fn chat_room(
    State(s): State<Arc<BackendState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    s.room_calls.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = misbehave(&s).await {
        return r;
    }
    let key = api_key(&headers);
    if !s.keys.contains_key(key) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let room = q.get("chatRoomId").cloned().unwrap_or_default();
    match s.rooms.get(&room) {
        Some(members) => Json(json!({"chatRooms": [{
            "chatRoomId": room,
            "chatRoomName": room,
            "members": members.iter().map(|m| json!({"user": {"userId": m}, "isActive": true})).collect::<Vec<_>>()
        }]}))
        .into_response(),
        None => Json(json!({"chatRooms": []})).into_response(),
    }
}

// ---------------------------------------------------------------- gateway node

/// A gateway node running in this process on loopback port 0.
pub struct Node {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A configuration for tests: the stub back-end, an API token, fast timers, no per-IP limit.
pub fn config(backend: &Backend) -> Config {
    let mut c = Config::for_backend(&backend.url()).expect("valid test config");
    c.api_token = Some(TOKEN.into());
    c.unsubscribe_delay = Duration::from_millis(100);
    c.backend_timeout = Duration::from_millis(500);
    c.presence_ttl = Duration::from_secs(3);
    c.drain_timeout = Duration::from_millis(500);
    // Every test client comes from 127.0.0.1, and churn tests open hundreds of sockets a
    // second: the per-IP limit is tested on its own (hostile_handshake.rs).
    c.max_handshakes_per_ip = 0;
    c
}

/// [`config`] for the node `node` of an installation whose Redis is at `redis_url` and whose keys
/// and channels start with `prefix`.
pub fn redis_node_config(backend: &Backend, redis_url: String, prefix: &str, node: &str) -> Config {
    let mut c = config(backend);
    c.redis_url = Some(redis_url.into());
    c.redis_prefix = prefix.to_string();
    c.node_id = node.to_string();
    c
}

/// How long a node may take to answer `/readyz` as a test expects.
pub const READYZ_WITHIN: Duration = Duration::from_secs(10);

/// Starts a node for each configuration in turn, each ready before the next one starts.
pub async fn start_ready_nodes(configs: impl IntoIterator<Item = Config>) -> Vec<Node> {
    let mut nodes = Vec::new();
    for c in configs {
        let node = Node::start(c).await;
        node.until_readyz(200).await;
        nodes.push(node);
    }
    nodes
}

impl Node {
    pub async fn start(config: Config) -> Node {
        let public = TcpListener::bind("127.0.0.1:0").await.expect("bind public");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let (pa, aa) = (
            public.local_addr().expect("addr"),
            admin.local_addr().expect("addr"),
        );
        let state = AppState::new(config).await.expect("node starts");
        let (tx, rx) = oneshot::channel::<()>();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let _ = server::run(st, public, admin, async move {
                let _ = rx.await;
            })
            .await;
        });
        Node {
            public: pa,
            admin: aa,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn ws(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.public, path_and_query)
    }

    /// URL of a GrowERP-style notification client.
    pub fn notws(&self, user: &str) -> String {
        self.ws(&format!("/notws?api_key=key-{user}&userId={user}"))
    }

    pub fn chat(&self, user: &str) -> String {
        self.ws(&format!("/chat?api_key=key-{user}&userId={user}"))
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Begins the drain and waits for the node to stop.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    /// Triggers the drain without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn readyz(&self) -> u16 {
        status_of(&self.admin_url("/readyz")).await
    }

    /// Waits until `/readyz` answers `status` ([`READYZ_WITHIN`] at most).
    pub async fn until_readyz(&self, status: u16) {
        eventually(READYZ_WITHIN, &format!("readyz {status}"), || async {
            self.readyz().await == status
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        http()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("metrics body")
    }

    /// Publishes a notification through this node's API; returns the status.
    pub async fn notify(&self, body: Value) -> (u16, Value) {
        post(&self.admin_url("/api/v1/notifications"), body).await
    }

    pub async fn presence(&self, users: &[&str]) -> Value {
        let q: Vec<String> = users.iter().map(|u| format!("userId={u}")).collect();
        let resp = http()
            .get(self.admin_url(&format!("/api/v1/presence?{}", q.join("&"))))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("presence");
        assert_eq!(resp.status().as_u16(), 200, "presence answers 200");
        resp.json::<Value>().await.expect("presence JSON")["online"].clone()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
}

/// The status a GET of `url` answers with, 0 when nothing answers.
pub async fn status_of(url: &str) -> u16 {
    http()
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

pub async fn post(url: &str, body: Value) -> (u16, Value) {
    let resp = http()
        .post(url)
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .expect("POST");
    let status = resp.status().as_u16();
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, v)
}

/// A notification in Moqui's wrapped shape.
pub fn notification(topic: &str, title: &str) -> Value {
    json!({
        "topic": topic, "subTopic": "sub", "sentDate": "2026-11-29T10:00:00Z",
        "notificationMessageId": title, "topicDescription": "d", "message": {"n": title},
        "title": title, "link": "/x", "type": "info", "persistOnSend": false,
        "showAlert": true, "alertNoAutoHide": false
    })
}

// ---------------------------------------------------------------- WebSocket client

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A client that behaves like GrowERP's `WsClient`: connect, `subscribe: ALL`, read frames.
pub struct Client {
    pub ws: Ws,
}

/// The HTTP status of a refused handshake, or panics.
pub async fn refused(url: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("handshake to {url} was accepted; expected an HTTP refusal"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("handshake to {url} failed without an HTTP status: {e}"),
    }
}

/// Opens a WebSocket with one extra request header (the key sources that are not in the URL).
pub async fn connect_with_header(
    url: &str,
    name: &str,
    value: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request()?;
    req.headers_mut().insert(
        http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
        http::HeaderValue::from_str(value).expect("header value"),
    );
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, resp) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        Client { ws }
    }

    /// Connects and subscribes `ALL`, as the GrowERP client does.
    pub async fn subscribed(url: &str) -> Client {
        let mut c = Client::connect(url).await;
        c.send("subscribe: ALL").await;
        c.sync().await;
        c
    }

    pub async fn send(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .await
            .expect("send a frame");
    }

    /// Makes sure every frame sent so far was processed by the gateway: a ping is answered
    /// only after the frames before it were read.
    pub async fn sync(&mut self) {
        self.ws
            .send(Message::Ping(b"sync".to_vec().into()))
            .await
            .expect("send ping");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Ok(Some(Ok(Message::Pong(p)))) if p.as_ref() == b"sync" => return,
                Ok(Some(Ok(_))) => continue,
                other => panic!("no pong while syncing: {other:?}"),
            }
        }
    }

    /// Next text frame within `timeout`, or None.
    pub async fn recv_within(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return Some(t.to_string()),
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Err(_) => return None,
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) => return None,
            }
        }
    }

    /// Reads notifications whose `title` is a number until `last` arrives, or until nothing has
    /// arrived for `idle`: the numbers in arrival order, for loss, order and duplicate checks.
    pub async fn recv_numbered_until(&mut self, last: usize, idle: Duration) -> Vec<usize> {
        let mut got = Vec::new();
        while let Some(text) = self.recv_within(idle).await {
            let v: Value = serde_json::from_str(&text).expect("a JSON frame");
            let i: usize = v["title"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .expect("a numbered title");
            got.push(i);
            if i == last {
                break;
            }
        }
        got
    }

    /// Next text frame (5 s at most), parsed.
    pub async fn recv_json(&mut self) -> Value {
        let text = self
            .recv_within(Duration::from_secs(5))
            .await
            .expect("a message within 5 s");
        serde_json::from_str(&text).expect("a JSON frame")
    }

    /// Asserts nothing arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Some(t) = self.recv_within(d).await {
            panic!("expected no message, got {t}");
        }
    }

    /// Waits for the close frame and returns its code.
    pub async fn close_code(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => return Some(u16::from(f.code)),
                Ok(Some(Ok(Message::Close(None)))) => return Some(u16::from(CloseCode::Status)),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) | Err(_) => return None,
            }
        }
    }
}

/// Value of a metric sample in a scrape (exact series text, e.g. `wsgate_deliveries_total{endpoint="notws"}`).
pub fn metric(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("series {series} not in scrape"))
}

/// How many shards a scrape reports up (`wsgate_broker_shard_up` series at 1).
pub fn shards_up(scrape: &str) -> usize {
    scrape
        .lines()
        .filter(|l| l.starts_with("wsgate_broker_shard_up{") && l.ends_with(" 1"))
        .count()
}

/// A loopback address with a free port, for the real binary's listeners.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// The real `wsgate serve` binary on fresh loopback ports, killed on drop; waits until ready.
pub struct Binary {
    pub public: String,
    pub admin: String,
    pub child: tokio::process::Child,
}

impl Binary {
    pub async fn serve(backend: &Backend, extra: &[&str]) -> Binary {
        let (public, admin) = (free_addr(), free_addr());
        let backend_url = backend.url();
        let mut args = vec![
            "serve",
            "--listen",
            &public,
            "--admin-listen",
            &admin,
            "--backend-url",
            &backend_url,
            "--api-token",
            TOKEN,
        ];
        args.extend_from_slice(extra);
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the wsgate binary");
        let ready = format!("http://{admin}/readyz");
        eventually(Duration::from_secs(10), "the binary is ready", || async {
            http()
                .get(&ready)
                .send()
                .await
                .map(|r| r.status().as_u16() == 200)
                .unwrap_or(false)
        })
        .await;
        Binary {
            public,
            admin,
            child,
        }
    }

    pub fn notws(&self, user: &str) -> String {
        format!(
            "ws://{}/notws?api_key=key-{user}&userId={user}",
            self.public
        )
    }

    pub async fn readyz(&self) -> u16 {
        status_of(&format!("http://{}/readyz", self.admin)).await
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------- scenarios over several nodes

/// Polls a node's `/readyz` every 50 ms in the background and remembers whether it ever answered
/// anything but 200.
pub struct ReadinessWatch {
    dipped: Arc<AtomicBool>,
    watching: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadinessWatch {
    pub fn start(node: &Node) -> ReadinessWatch {
        let dipped = Arc::new(AtomicBool::new(false));
        let watching = Arc::new(AtomicBool::new(true));
        let task = {
            let (dipped, watching) = (dipped.clone(), watching.clone());
            let url = node.admin_url("/readyz");
            tokio::spawn(async move {
                while watching.load(Ordering::Relaxed) {
                    if status_of(&url).await != 200 {
                        dipped.store(true, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        ReadinessWatch {
            dipped,
            watching,
            task,
        }
    }

    /// Stops watching (after the poll under way) and tells whether readiness ever dipped.
    pub async fn stop(self) -> bool {
        self.watching.store(false, Ordering::Relaxed);
        let _ = self.task.await;
        self.dipped.load(Ordering::Relaxed)
    }
}

/// Publishes notifications titled `0` to `n - 1` to `user` through `node`, `rate` a second, and
/// awaits `fault` just before publish `fault_at`. Returns the titles acknowledged with 202; a
/// client reads them with [`Client::recv_numbered_until`].
pub async fn publish_numbered(
    node: &Node,
    user: &str,
    n: usize,
    rate: u64,
    fault_at: usize,
    fault: impl std::future::Future<Output = ()>,
) -> Vec<usize> {
    let mut fault = Some(fault);
    let mut acked = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    for i in 0..n {
        tick.tick().await;
        if i == fault_at {
            if let Some(f) = fault.take() {
                f.await;
            }
        }
        let (s, _) = node
            .notify(json!({"userIds": [user], "notification": notification("T", &i.to_string())}))
            .await;
        if s == 202 {
            acked.push(i);
        }
    }
    acked
}

/// Asserts that the numbered titles in `got` (in arrival order) came in order and without
/// duplicates, and that every acknowledged one in `acked` is among them.
#[track_caller]
pub fn assert_acked_arrived_once_in_order(acked: &[usize], got: &[usize]) {
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order and without duplicates"
    );
    let received: std::collections::BTreeSet<usize> = got.iter().copied().collect();
    let lost: Vec<usize> = acked
        .iter()
        .copied()
        .filter(|i| !received.contains(i))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {lost:?}"
    );
}

/// Notification clients on three nodes a, b and c: alice on a and on c, bob (ACME) on b, dave
/// (OTHER) on c.
pub struct ThreeNodeClients {
    pub alice_a: Client,
    pub alice_c: Client,
    pub bob_b: Client,
    pub dave_c: Client,
}

impl ThreeNodeClients {
    pub async fn connect(a: &Node, b: &Node, c: &Node) -> ThreeNodeClients {
        ThreeNodeClients {
            alice_a: Client::subscribed(&a.notws("alice")).await,
            alice_c: Client::subscribed(&c.notws("alice")).await,
            bob_b: Client::subscribed(&b.notws("bob")).await,
            dave_c: Client::subscribed(&c.notws("dave")).await,
        }
    }

    /// A tenant notification published on a reaches ACME's three sockets and not dave's (silent
    /// for `quiet`); a broadcast published on c reaches all four; a chat message alice sends on a
    /// reaches bob on b and carol on c. Returns the chat sockets, still open: alice's on a, bob's
    /// on b, carol's on c.
    pub async fn tenant_broadcast_and_chat(
        &mut self,
        a: &Node,
        b: &Node,
        c: &Node,
        quiet: Duration,
    ) -> [Client; 3] {
        a.notify(json!({"tenantId": "ACME", "notification": notification("T", "acme")}))
            .await;
        for cl in [&mut self.alice_a, &mut self.alice_c, &mut self.bob_b] {
            assert_eq!(cl.recv_json().await["title"], "acme");
        }
        self.dave_c.expect_silence(quiet).await;

        c.notify(json!({"broadcast": true, "notification": notification("T", "all")}))
            .await;
        for cl in [
            &mut self.alice_a,
            &mut self.alice_c,
            &mut self.bob_b,
            &mut self.dave_c,
        ] {
            assert_eq!(cl.recv_json().await["title"], "all");
        }

        let mut chat_alice = Client::connect(&a.chat("alice")).await;
        let mut chat_bob = Client::connect(&b.chat("bob")).await;
        let mut chat_carol = Client::connect(&c.chat("carol")).await;
        chat_alice
            .send(r#"{"chatRoom":{"chatRoomId":"room1"},"content":"cross"}"#)
            .await;
        for cl in [&mut chat_bob, &mut chat_carol] {
            let m = cl.recv_json().await;
            assert_eq!(m["content"], "cross");
            assert_eq!(m["fromUserId"], "alice");
        }
        [chat_alice, chat_bob, chat_carol]
    }
}
