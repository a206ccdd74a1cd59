//! Three wsgate nodes on one Redis behind a real nginx load balancer
//! (deploy/local/cluster.sh): GrowERP-like clients connect through nginx, are spread over
//! the nodes, all receive a notification published on one node; then one node is
//! SIGKILLed, its clients reconnect through nginx to the survivors and receive everything
//! published after they are back.
//!
//! Needs `redis-server` and `nginx` (apt-get install -y redis-server nginx); without them
//! the test fails with that message.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio_tungstenite::{connect_async, tungstenite::Message};

const NODES: usize = 3;
const CLIENTS: usize = 9;
const TOPIC: &str = "LoadBalancerTest";

/// The local cluster; stopped (and its state directory removed) on drop, also on panic.
struct Cluster {
    dir: PathBuf,
    script: PathBuf,
    env: HashMap<String, String>,
}

impl Cluster {
    fn start() -> Cluster {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let script = root.join("deploy/local/cluster.sh");
        let unique = format!(
            "wsgate-lb-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let dir = std::env::temp_dir().join(unique);
        let mut cluster = Cluster {
            dir,
            script,
            env: HashMap::new(),
        };
        let out = Command::new("bash")
            .arg(&cluster.script)
            .arg("start")
            .env("WSGATE_BIN", env!("CARGO_BIN_EXE_wsgate"))
            .env("WSGATE_CLUSTER_DIR", &cluster.dir)
            .env("WSGATE_CLUSTER_NODES", NODES.to_string())
            .env("WSGATE_CLUSTER_TOKEN", "lb-test-token")
            .output()
            .expect("cannot run bash deploy/local/cluster.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let logs = cluster.logs();
            panic!(
                "deploy/local/cluster.sh start failed ({}).\n{stderr}\n{stdout}\n\
                 It needs redis-server and nginx: apt-get install -y redis-server nginx\n{logs}",
                out.status
            );
        }
        println!("{stdout}");
        let env_file = std::fs::read_to_string(cluster.dir.join("cluster.env"))
            .expect("cluster.sh start wrote no cluster.env");
        cluster.env = env_file
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cluster
    }

    fn get(&self, key: &str) -> String {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from cluster.env: {:?}", self.env))
            .clone()
    }

    fn admin(&self, node: usize) -> String {
        self.get(&format!("NODE{node}_ADMIN_URL"))
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for path in paths
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
            {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                all.push_str(&format!("--- {} (last lines)\n", path.display()));
                for line in tail.into_iter().rev() {
                    all.push_str(line);
                    all.push('\n');
                }
            }
        }
        all
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .env("WSGATE_CLUSTER_DIR", &self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one client saw.
#[derive(Default)]
struct ClientState {
    /// Successful connections so far (1 = first connection, 2 = after one reconnect...).
    connections: u32,
    connected: bool,
    /// Text frames received, in order.
    messages: Vec<String>,
}

type Shared = Arc<Mutex<HashMap<String, ClientState>>>;

/// Behaves like GrowERP's WsClient: connect with api_key and userId, send
/// `subscribe: ALL`, and when the socket closes, reconnect after a short delay.
async fn run_client(user: String, url: String, shared: Shared) {
    loop {
        if let Ok((mut ws, _response)) = connect_async(url.as_str()).await {
            if ws.send(Message::text("subscribe: ALL")).await.is_ok() {
                {
                    let mut all = shared.lock().await;
                    let me = all.entry(user.clone()).or_default();
                    me.connections += 1;
                    me.connected = true;
                }
                while let Some(frame) = ws.next().await {
                    match frame {
                        Ok(Message::Text(text)) => {
                            let mut all = shared.lock().await;
                            all.entry(user.clone())
                                .or_default()
                                .messages
                                .push(text.as_str().to_owned());
                        }
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                shared
                    .lock()
                    .await
                    .entry(user.clone())
                    .or_default()
                    .connected = false;
            }
        }
        // WsClient waits before it reconnects; spread the clients a little.
        let jitter = user.bytes().map(u64::from).sum::<u64>() % 200;
        tokio::time::sleep(Duration::from_millis(300 + jitter)).await;
    }
}

/// Sum of the samples of `metric` on one node whose labels contain `label` (if given).
async fn metric(http: &reqwest::Client, admin: &str, metric: &str, label: Option<&str>) -> f64 {
    let body = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {admin}/metrics: {e}"))
        .text()
        .await
        .unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{metric} ")) || l.starts_with(&format!("{metric}{{")))
        .filter(|l| label.is_none_or(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn notws_connections(http: &reqwest::Client, admin: &str) -> usize {
    metric(
        http,
        admin,
        "wsgate_connections",
        Some("endpoint=\"notws\""),
    )
    .await as usize
}

/// Polls `check` until it returns Ok (its value is returned) or `timeout` passes (panic
/// with the last state it reported).
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(state) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {state}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn publish(
    http: &reqwest::Client,
    admin: &str,
    token: &str,
    users: &[String],
    n: u32,
) -> Value {
    let notification = json!({
        "topic": TOPIC,
        "subTopic": format!("m{n}"),
        "sentDate": 1_700_000_000_000u64 + u64::from(n),
        "notificationMessageId": format!("lb-{n}"),
        "topicDescription": "load balancer test",
        "message": {"n": n},
        "title": format!("message {n}"),
        "link": null,
        "type": "info",
        "persistOnSend": false,
        "showAlert": true,
        "alertNoAutoHide": false
    });
    let response = http
        .post(format!("{admin}/api/v1/notifications"))
        .bearer_auth(token)
        .json(&json!({"userIds": users, "notification": notification}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {admin}/api/v1/notifications: {e}"));
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(
        status.as_u16(),
        202,
        "publish through {admin} answered {status}: {body}"
    );
    notification
}

/// Every client has received `expected` (in order) among its TOPIC messages.
async fn wait_delivered(shared: &Shared, users: &[String], expected: &[Value]) {
    eventually(
        "every client to receive every notification",
        Duration::from_secs(10),
        || {
            let (shared, users, expected) = (shared.clone(), users.to_vec(), expected.to_vec());
            async move {
                let all = shared.lock().await;
                for user in &users {
                    let got: Vec<Value> = all
                        .get(user)
                        .map(|c| {
                            c.messages
                                .iter()
                                .filter_map(|m| serde_json::from_str(m).ok())
                                .collect()
                        })
                        .unwrap_or_default();
                    let got: Vec<&Value> = got.iter().filter(|v| v["topic"] == TOPIC).collect();
                    let want: Vec<&Value> = expected.iter().collect();
                    if got != want {
                        return Err(format!(
                            "{user} got {} of {} notifications: {got:?}",
                            got.len(),
                            want.len()
                        ));
                    }
                }
                Ok(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_spread_over_nodes_and_survive_a_node_crash() {
    let cluster = Cluster::start();
    let lb = cluster.get("LB_URL");
    let token = cluster.get("API_TOKEN");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let admins: Vec<String> = (1..=NODES).map(|i| cluster.admin(i)).collect();

    // Clients connect one after the other through nginx (least_conn spreads them).
    let users: Vec<String> = (1..=CLIENTS).map(|i| format!("lbuser{i}")).collect();
    let shared: Shared = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for user in &users {
        let url = format!("{lb}/notws?api_key=demo-key-{user}&userId={user}");
        tasks.push(tokio::spawn(run_client(user.clone(), url, shared.clone())));
        let u = user.clone();
        eventually(
            &format!("{u} to connect through nginx"),
            Duration::from_secs(10),
            || {
                let (shared, u) = (shared.clone(), u.clone());
                async move {
                    match shared.lock().await.get(&u) {
                        Some(c) if c.connected => Ok(()),
                        _ => Err("not connected".to_string()),
                    }
                }
            },
        )
        .await;
    }

    // Spread: every node holds some of the clients, and all of them are accounted for.
    let per_node: Vec<usize> = eventually(
        "the nodes to count every connection",
        Duration::from_secs(10),
        || {
            let (http, admins) = (http.clone(), admins.clone());
            async move {
                let mut per_node = Vec::new();
                for admin in &admins {
                    per_node.push(notws_connections(&http, admin).await);
                }
                if per_node.iter().sum::<usize>() == CLIENTS {
                    Ok(per_node)
                } else {
                    Err(format!("connections per node {per_node:?}"))
                }
            }
        },
    )
    .await;
    println!("connections per node through nginx: {per_node:?}");
    assert!(
        per_node.iter().all(|&n| n > 0),
        "nginx did not spread the clients over all {NODES} nodes: {per_node:?}"
    );

    // Every client's `subscribe: ALL` has been processed before anything is published.
    eventually("all topic subscriptions", Duration::from_secs(10), || {
        let (http, admins) = (http.clone(), admins.clone());
        async move {
            let mut total = 0.0;
            for admin in &admins {
                total += metric(&http, admin, "wsgate_topic_subscriptions", None).await;
            }
            if total as usize >= CLIENTS {
                Ok(())
            } else {
                Err(format!("{total} topic subscriptions"))
            }
        }
    })
    .await;

    // Presence is cluster-wide: any node answers for users on every node.
    let query: String = users
        .iter()
        .map(|u| format!("userId={u}"))
        .collect::<Vec<_>>()
        .join("&");
    let presence: Value = http
        .get(format!("{}/api/v1/presence?{query}", admins[0]))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for user in &users {
        assert_eq!(
            presence["online"][user],
            json!(true),
            "presence of {user}: {presence}"
        );
    }

    // One notification published on node 1 reaches the clients on all nodes.
    let mut expected = vec![publish(&http, &admins[0], &token, &users, 1).await];
    wait_delivered(&shared, &users, &expected).await;

    // SIGKILL the node with the most clients.
    let victim = (0..NODES).max_by_key(|&i| per_node[i]).unwrap();
    let victim_clients = per_node[victim];
    let pid = cluster.get(&format!("NODE{}_PID", victim + 1));
    let status = Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL {pid} failed");
    let survivors: Vec<String> = (0..NODES)
        .filter(|&i| i != victim)
        .map(|i| admins[i].clone())
        .collect();

    // Its clients see the socket close, reconnect through nginx and land on the survivors.
    eventually("the killed node's clients to reconnect", Duration::from_secs(20), || {
        let (shared, users) = (shared.clone(), users.clone());
        async move {
        let all = shared.lock().await;
        let reconnected = users
            .iter()
            .filter(|u| all.get(*u).is_some_and(|c| c.connections >= 2 && c.connected))
            .count();
        let connected = users.iter().filter(|u| all.get(*u).is_some_and(|c| c.connected)).count();
        if reconnected >= victim_clients && connected == CLIENTS {
            Ok(())
        } else {
            Err(format!("{reconnected}/{victim_clients} reconnected, {connected}/{CLIENTS} connected"))
        }
        }
    })
    .await;
    let on_survivors: Vec<usize> = eventually(
        "the survivors to hold every client",
        Duration::from_secs(10),
        || {
            let (http, survivors) = (http.clone(), survivors.clone());
            async move {
                let mut on_survivors = Vec::new();
                let mut subs = 0.0;
                for admin in &survivors {
                    on_survivors.push(notws_connections(&http, admin).await);
                    subs += metric(&http, admin, "wsgate_topic_subscriptions", None).await;
                }
                if on_survivors.iter().sum::<usize>() == CLIENTS && subs as usize >= CLIENTS {
                    Ok(on_survivors)
                } else {
                    Err(format!(
                        "connections on survivors {on_survivors:?}, {subs} topic subscriptions"
                    ))
                }
            }
        },
    )
    .await;
    println!(
        "node{} killed ({victim_clients} clients); connections on the survivors: {on_survivors:?}",
        victim + 1
    );
    {
        let all = shared.lock().await;
        let reconnects: u32 = users.iter().map(|u| all[u].connections - 1).sum();
        assert_eq!(
            reconnects as usize, victim_clients,
            "only the killed node's clients should have reconnected"
        );
    }

    // Everything published after they are back reaches every client, through either survivor.
    for (n, admin) in (2..=5).zip(survivors.iter().cycle()) {
        expected.push(publish(&http, admin, &token, &users, n).await);
    }
    wait_delivered(&shared, &users, &expected).await;

    for task in tasks {
        task.abort();
    }
    drop(cluster);
}
