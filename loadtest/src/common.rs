//! Options shared by every scenario, server accounting and connection pools.

use crate::client::{self, ClientSpec, ConnectError, NodeAddr, Shared, Target};
use crate::stats::{proc_sample, ProcSample};
use anyhow::{anyhow, Context};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// Server under test.
    #[arg(long, value_enum, default_value = "wsgate")]
    pub target: Target,
    /// Public WebSocket base URL(s) of the node(s), comma-separated (ws://IP:PORT).
    #[arg(long, value_delimiter = ',', default_value = "ws://127.0.0.1:8081")]
    pub url: Vec<String>,
    /// Admin / publish API base URL(s), comma-separated, one per node.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8082")]
    pub admin_url: Vec<String>,
    /// Bearer token of the publish API.
    #[arg(long, default_value = "demo-token")]
    pub api_token: String,
    /// Back-end base URL, read for `GET /stats` (back-end call counts).
    #[arg(long, default_value = "http://127.0.0.1:8083")]
    pub backend_url: String,
    /// Server process id(s), comma-separated, for CPU and RSS from /proc. Without it, the
    /// `process_*` metrics of each admin URL's `/metrics` are read instead.
    #[arg(long = "pid", alias = "gateway-pid", value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Spread client source addresses over 127.0.0.1 .. 127.0.0.N.
    #[arg(long, default_value_t = 64)]
    pub source_ips: usize,
    /// Connections being established at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Per-attempt connect + handshake timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// User id prefix (user ids are PREFIX + number).
    #[arg(long, default_value = "lt")]
    pub user_prefix: String,
    /// Directory for the JSON result, Markdown report and SVG charts.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Base name of the result files (default: SCENARIO-TARGET).
    #[arg(long)]
    pub name: Option<String>,
}

impl Common {
    pub fn nodes(&self) -> anyhow::Result<Vec<NodeAddr>> {
        self.url.iter().map(|u| client::parse_ws_url(u)).collect()
    }

    pub fn file_name(&self, scenario: &str) -> String {
        self.name.clone().unwrap_or_else(|| {
            let t = match self.target {
                Target::Wsgate => "wsgate",
                Target::Socketio => "socketio",
            };
            format!("{scenario}-{t}")
        })
    }

    pub fn server(&self) -> Server {
        Server {
            pids: self.pid.clone(),
            admin_urls: self.admin_url.clone(),
            http: http_client(),
        }
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(512)
        .build()
        .unwrap_or_default()
}

/// CPU and memory of the server process(es) under test.
pub struct Server {
    pids: Vec<u32>,
    admin_urls: Vec<String>,
    http: reqwest::Client,
}

impl Server {
    /// The server's process ids given with `--pid` (empty without).
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    pub async fn sample(&self) -> anyhow::Result<ProcSample> {
        let mut total = ProcSample::default();
        if !self.pids.is_empty() {
            for pid in &self.pids {
                let s = proc_sample(*pid).with_context(|| format!("reading /proc/{pid}"))?;
                total.cpu_seconds += s.cpu_seconds;
                total.user_seconds += s.user_seconds;
                total.system_seconds += s.system_seconds;
                total.rss_bytes += s.rss_bytes;
                total.write_syscalls += s.write_syscalls;
            }
            return Ok(total);
        }
        for url in &self.admin_urls {
            let text = self
                .http
                .get(format!("{url}/metrics"))
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            let find = |name: &str| -> Option<f64> {
                text.lines()
                    .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            };
            total.cpu_seconds += find("process_cpu_seconds_total")
                .ok_or_else(|| anyhow!("{url}/metrics has no process_cpu_seconds_total"))?;
            total.rss_bytes += find("process_resident_memory_bytes").unwrap_or(0.0) as u64;
        }
        Ok(total)
    }
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct BackendStats {
    pub authenticate: u64,
    pub chat_room: u64,
}

/// GETs `url` and reads the JSON it answers with; a status other than 2xx is an error.
pub async fn get_json(http: &reqwest::Client, url: &str) -> anyhow::Result<serde_json::Value> {
    Ok(http
        .get(url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

pub async fn backend_stats(http: &reqwest::Client, base: &str) -> anyhow::Result<BackendStats> {
    let v = get_json(http, &format!("{base}/stats")).await?;
    Ok(BackendStats {
        authenticate: v["authenticate"].as_u64().unwrap_or(0),
        chat_room: v["chatRoom"].as_u64().unwrap_or(0),
    })
}

/// Connections held open for a scenario.
pub struct Pool {
    pub connected: usize,
    pub failed: usize,
    pub errors: BTreeMap<String, usize>,
    pub elapsed: Duration,
    /// Per client index: the sender of outgoing frames (chat), when connected.
    pub senders: Vec<Option<mpsc::Sender<String>>>,
    pub handles: Vec<JoinHandle<bool>>,
    pub stop: watch::Sender<bool>,
}

impl Pool {
    /// Closes every connection and waits for the tasks (at most `wait`).
    pub async fn close(self, wait: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(wait, futures_util::future::join_all(self.handles)).await;
    }
}

pub fn error_key(e: &ConnectError) -> String {
    match e {
        ConnectError::Status(s, _) => format!("HTTP {s}"),
        ConnectError::Other(e) => {
            let s = format!("{e:#}");
            if s.contains("timed out") {
                "timeout".into()
            } else if s.contains("refused") {
                "connection refused".into()
            } else if s.contains("Address not available") || s.contains("in use") {
                "no source port".into()
            } else {
                s.chars().take(60).collect()
            }
        }
    }
}

/// Opens `specs` with bounded concurrency and keeps them open until the pool is closed.
pub async fn open_pool(
    specs: Vec<ClientSpec>,
    concurrency: usize,
    timeout: Duration,
    shared: &Arc<Shared>,
    with_senders: bool,
    progress_label: &str,
) -> Pool {
    let (stop_tx, stop_rx) = watch::channel(false);
    let n = specs.len();
    let start = Instant::now();
    let mut senders: Vec<Option<mpsc::Sender<String>>> = vec![None; n];
    let mut handles = Vec::with_capacity(n);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut connected = 0;
    let mut failed = 0;
    let mut results = futures_util::stream::iter(specs.into_iter().enumerate())
        .map(|(i, spec)| async move {
            let r = client::establish(&spec, timeout).await;
            (i, spec.target, r)
        })
        .buffer_unordered(concurrency.max(1));
    let mut last_print = Instant::now();
    while let Some((i, target, r)) = results.next().await {
        match r {
            Ok(ws) => {
                connected += 1;
                let rx = if with_senders {
                    let (tx, rx) = mpsc::channel(64);
                    senders[i] = Some(tx);
                    Some(rx)
                } else {
                    None
                };
                handles.push(tokio::spawn(client::drive(
                    ws,
                    target,
                    shared.clone(),
                    stop_rx.clone(),
                    rx,
                    false,
                )));
            }
            Err(e) => {
                failed += 1;
                *errors.entry(error_key(&e)).or_default() += 1;
            }
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "  {progress_label}: {connected}/{n} connected, {failed} failed, {:.1}s",
                start.elapsed().as_secs_f64()
            );
        }
    }
    Pool {
        connected,
        failed,
        errors,
        elapsed: start.elapsed(),
        senders,
        handles,
        stop: stop_tx,
    }
}

/// A small deterministic pseudo-random generator (splitmix64).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stub's `/stats` is read as JSON and as back-end stats; an error status is an error.
    #[tokio::test]
    async fn get_json_reads_an_answer_and_refuses_an_error_status() {
        use axum::http::StatusCode;
        use axum::routing::get;
        let app = axum::Router::new()
            .route(
                "/up/stats",
                get(|| async { axum::Json(serde_json::json!({"authenticate": 3, "chatRoom": 2})) }),
            )
            .route(
                "/down/stats",
                get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let base = format!("http://{}", listener.local_addr().expect("its address"));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let http = http_client();

        let v = get_json(&http, &format!("{base}/up/stats"))
            .await
            .expect("the JSON answer");
        assert_eq!(v["authenticate"], 3);
        let b = backend_stats(&http, &format!("{base}/up"))
            .await
            .expect("the stats");
        assert_eq!((b.authenticate, b.chat_room), (3, 2));
        assert!(get_json(&http, &format!("{base}/down/stats"))
            .await
            .is_err());
        server.abort();
    }
}
