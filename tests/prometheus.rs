//! Observability, end to end, with real tools only:
//!
//! - `promtool check rules` and `promtool test rules` on `deploy/prometheus`;
//! - the Grafana dashboard's structure (data source and instance variables, rate intervals);
//! - two gateway nodes and the demo back-end started from the real `wsgate` binary, driven by real
//!   WebSocket clients and the publish API; the counters are checked against what the clients
//!   actually received;
//! - `promtool check metrics` on a live scrape of `/metrics`;
//! - a real Prometheus server scraping both nodes every second, which must answer every panel
//!   query of the dashboard with data and evaluate every alert rule without error.
//!
//! `promtool` and `prometheus` must be on PATH. On Debian/Ubuntu: `apt-get install prometheus`.
//! When they are missing these tests fail with that message; they never skip.

mod common;

use common::free_port;
use std::{
    fs,
    future::Future,
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::{stream::SplitSink, SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::{
    tungstenite::{self, Message},
    MaybeTlsStream, WebSocketStream,
};

const API_TOKEN: &str = "wsgate-observability-test-token";

// ---------------------------------------------------------------------------------------------
// Tools, files, processes
// ---------------------------------------------------------------------------------------------

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Finds a Prometheus tool on PATH or fails with how to install it.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not on PATH. It ships with Prometheus: install it with \
         `apt-get install prometheus` (Debian/Ubuntu), or put the prometheus and promtool \
         binaries of a Prometheus release on PATH."
    );
}

fn run_tool(program: &Path, args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A scratch directory, removed when the test passes and kept (and named) when it fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!("wsgate-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process that is killed when dropped; its output goes to a log file that is printed
/// when the test fails.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[String], dir: &TempDir) -> Proc {
        let log = dir.0.join(format!("{name}.log"));
        let out = fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", program.display()));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Fails the test if the process has already exited.
    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited early ({status}); its output:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- output of {} ----\n{}", self.name, self.log_tail());
        }
    }
}

/// Polls `check` until it succeeds or `timeout` passes; then fails with its last error.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("timed out waiting for {what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The Prometheus text format
// ---------------------------------------------------------------------------------------------

struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A parsed `/metrics` body.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(',') | Some(' ')) {
            chars.next();
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if key.is_empty() {
            return out;
        }
        assert_eq!(chars.next(), Some('"'), "label {key} in {{{s}}}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim().to_string(), value));
    }
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, rest) = match line.find('{') {
                Some(open) => {
                    let close = line.rfind('}').expect("closing brace");
                    (
                        &line[..open],
                        parse_labels(&line[open + 1..close]),
                        &line[close + 1..],
                    )
                }
                None => {
                    let sp = line.find(' ').expect("a value");
                    (&line[..sp], Vec::new(), &line[sp..])
                }
            };
            let value = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN);
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Scrape { text, samples }
    }

    /// Sum of every series of `name` whose labels include `want`.
    fn get(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                want.iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.samples.iter().map(|s| s.name.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway nodes and clients
// ---------------------------------------------------------------------------------------------

struct Node {
    name: &'static str,
    public: u16,
    admin: u16,
    proc: Proc,
}

impl Node {
    fn ws(&self, path_and_query: &str) -> String {
        format!("ws://127.0.0.1:{}{}", self.public, path_and_query)
    }
    fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin, path)
    }
    fn target(&self) -> String {
        format!("127.0.0.1:{}", self.admin)
    }
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client that behaves like GrowERP's WsClient: it connects with its key in the
/// query string, sends text frames and records every text frame it receives.
struct Client {
    name: String,
    tx: SplitSink<Ws, Message>,
    frames: Arc<Mutex<Vec<String>>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Client {
    async fn connect(name: &str, url: &str) -> Client {
        let (ws, resp) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("{name}: WebSocket upgrade of {url} failed: {e}"));
        assert_eq!(resp.status().as_u16(), 101, "{name}: {url}");
        let (tx, mut rx) = ws.split();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let sink = frames.clone();
        let reader = tokio::spawn(async move {
            while let Some(msg) = rx.next().await {
                match msg {
                    Ok(Message::Text(t)) => sink.lock().unwrap().push(t.to_string()),
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        });
        Client {
            name: name.to_string(),
            tx,
            frames,
            reader: Some(reader),
        }
    }

    async fn send(&mut self, text: &str) {
        self.tx
            .send(Message::text(text))
            .await
            .unwrap_or_else(|e| panic!("{}: send failed: {e}", self.name));
    }

    fn count(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    fn frames(&self) -> Vec<String> {
        self.frames.lock().unwrap().clone()
    }

    /// Closes normally (close frame 1000) and waits for the server's answer.
    async fn close(&mut self) {
        let _ = self.tx.send(Message::Close(None)).await;
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(r) = self.reader.take() {
            r.abort();
        }
    }
}

/// The HTTP status of a WebSocket upgrade attempt (101 when it was accepted).
async fn upgrade_status(url: &str) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("upgrade of {url} failed without an HTTP answer: {e}"),
    }
}

async fn scrape(http: &reqwest::Client, node: &Node) -> Scrape {
    let resp = http
        .get(node.admin_url("/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("scraping {}: {e}", node.name));
    assert_eq!(resp.status().as_u16(), 200, "GET /metrics on {}", node.name);
    Scrape::parse(resp.text().await.unwrap())
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut req = http.post(url).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// One expected change of a counter or gauge between two scrapes of a node.
struct Expect {
    name: &'static str,
    labels: Vec<(&'static str, &'static str)>,
    delta: f64,
}

fn exp(name: &'static str, labels: &[(&'static str, &'static str)], delta: f64) -> Expect {
    Expect {
        name,
        labels: labels.to_vec(),
        delta,
    }
}

/// Waits (briefly: only for increments that are in flight) until every expectation holds
/// relative to `base`, and returns the ones that still do not.
async fn check_deltas(
    http: &reqwest::Client,
    node: &Node,
    base: &Scrape,
    phase: &str,
    expects: &[Expect],
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = scrape(http, node).await;
        let mut wrong = Vec::new();
        for e in expects {
            let was = base.get(e.name, &e.labels);
            let is = now.get(e.name, &e.labels);
            if !now.has(e.name) {
                wrong.push(format!(
                    "{phase}, {}: metric {} is missing from /metrics",
                    node.name, e.name
                ));
            } else if (is - was - e.delta).abs() > 1e-9 {
                wrong.push(format!(
                    "{phase}, {}: {}{:?} changed by {} (from {was} to {is}), expected {}",
                    node.name,
                    e.name,
                    e.labels,
                    is - was,
                    e.delta
                ));
            }
        }
        if wrong.is_empty() || Instant::now() >= deadline {
            return wrong;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_frames(clients: &[(&Client, usize)], what: &str) {
    eventually(what, Duration::from_secs(10), || async {
        let short: Vec<String> = clients
            .iter()
            .filter(|(c, n)| c.count() < *n)
            .map(|(c, n)| format!("{} has {} of {n}", c.name, c.count()))
            .collect();
        if short.is_empty() {
            Ok(())
        } else {
            Err(short.join(", "))
        }
    })
    .await;
    // Anything still in flight would arrive now: the counts must then be exact. A look for
    // extras, not a wait for something expected: load can only make it miss an extra frame,
    // never fail a correct run.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn exact_frames(clients: &[(&Client, usize)], phase: &str, problems: &mut Vec<String>) {
    for (c, n) in clients {
        if c.count() != *n {
            problems.push(format!(
                "{phase}: {} received {} frames, expected {n}: {:?}",
                c.name,
                c.count(),
                c.frames()
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dashboard and rules files
// ---------------------------------------------------------------------------------------------

fn dashboard() -> Value {
    let path = repo_file("deploy/grafana/wsgate-dashboard.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, including those nested in collapsed rows.
fn panels(dash: &Value) -> Vec<Value> {
    fn walk(list: &Value, out: &mut Vec<Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p.clone());
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// (panel title, expression) for every query target of the dashboard.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    expr.to_string(),
                ));
            }
        }
    }
    out
}

/// Replaces Grafana's variables the way Grafana would before sending a query.
fn substitute(expr: &str, instance_regex: &str) -> String {
    expr.replace("${instance}", instance_regex)
        .replace("$instance", instance_regex)
        .replace("${__rate_interval}", "10s")
        .replace("$__rate_interval", "10s")
        .replace("${__interval}", "2s")
        .replace("$__interval", "2s")
        .replace("$__range", "5m")
}

/// (alert name, expression) of every rule in the rules file. The file's expressions are either
/// on one line or folded block scalars (`>-`), which is all this reader needs to understand.
fn rule_expressions() -> Vec<(String, String)> {
    let text = fs::read_to_string(repo_file("deploy/prometheus/wsgate.rules.yml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut name = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(n) = trimmed
            .strip_prefix("- alert:")
            .or_else(|| trimmed.strip_prefix("- record:"))
        {
            name = n.trim().to_string();
        } else if let Some(rest) = trimmed.strip_prefix("expr:") {
            let indent = line.len() - trimmed.len();
            let rest = rest.trim();
            let expr = if rest.starts_with('>') || rest.starts_with('|') {
                let mut parts = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    parts.push(next.trim());
                    i += 1;
                }
                parts.join(" ")
            } else {
                rest.to_string()
            };
            out.push((name.clone(), expr));
        }
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn promtool_checks_and_unit_tests_the_alert_rules() {
    let promtool = tool("promtool");
    let dir = repo_file("deploy/prometheus");
    let (ok, out) = run_tool(&promtool, &["check", "rules", "wsgate.rules.yml"], &dir);
    assert!(ok, "promtool check rules failed:\n{out}");
    println!("{out}");
    let (ok, out) = run_tool(&promtool, &["test", "rules", "wsgate.rules.test.yml"], &dir);
    assert!(ok, "promtool test rules failed:\n{out}");
    println!("{out}");

    // Every alert has unit tests, showing it both firing and not firing.
    let tests = fs::read_to_string(dir.join("wsgate.rules.test.yml")).unwrap();
    let rules = rule_expressions();
    assert!(
        rules.len() >= 10,
        "expected the full set of alerts, found {rules:?}"
    );
    for (alert, _) in &rules {
        let evals: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|block| block.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            evals.iter().any(|b| b.contains("exp_alerts: []")),
            "{alert} has no unit test showing it not firing"
        );
        assert!(
            evals.iter().any(|b| b.contains("exp_labels:")),
            "{alert} has no unit test showing it firing"
        );
    }
}

#[test]
fn dashboard_is_importable_and_parameterised() {
    let dash = dashboard();
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["pluginId"] == "prometheus" && i["type"] == "datasource"),
        "__inputs must declare a Prometheus data source"
    );
    let vars = dash["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let inst = vars
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("an `instance` variable");
    assert_eq!(inst["type"], "query");
    assert_eq!(
        inst["definition"],
        "label_values(wsgate_build_info, instance)"
    );
    assert_eq!(inst["multi"], true);
    assert_eq!(inst["includeAll"], true);
    assert_eq!(inst["datasource"]["uid"], "${datasource}");

    let mut ids = std::collections::HashSet::new();
    for p in panels(&dash) {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        assert!(
            ids.insert(p["id"].as_i64().expect("panel id")),
            "duplicate id: {title}"
        );
        assert!(p["gridPos"]["w"].as_i64().is_some(), "{title}: gridPos");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: panel data source"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{title}: target data source"
            );
            let expr = t["expr"].as_str().expect("expr");
            if expr.contains("rate(") || expr.contains("increase(") {
                assert!(expr.contains("[$__rate_interval]"), "{title}: {expr}");
            }
            assert!(expr.contains("instance=~\"$instance\""), "{title}: {expr}");
        }
    }
    let all: String = dashboard_queries(&dash)
        .into_iter()
        .map(|(_, e)| e)
        .collect::<Vec<_>>()
        .join("\n");
    for metric in [
        "wsgate_connections{",
        "wsgate_connections_opened_total",
        "wsgate_connections_rejected_total",
        "wsgate_auth_cache_requests_total",
        "wsgate_backend_request_duration_seconds_bucket",
        "wsgate_deliveries_total",
        "wsgate_fanout_recipients_sum",
        "wsgate_delivery_latency_seconds_bucket",
        "wsgate_slow_consumer_disconnects_total",
        "wsgate_outbound_dropped_total",
        "wsgate_broker_channels",
        "wsgate_broker_reconnects_total",
        "wsgate_broker_up",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "wsgate_client_frames_ignored_total",
        "wsgate_api_requests_total",
    ] {
        assert!(all.contains(metric), "no panel shows {metric}");
    }
}

// ---------------------------------------------------------------------------------------------
// Two nodes scraped by Prometheus: the shared stack and the scenarios run against it
// ---------------------------------------------------------------------------------------------

/// Notifications sent to node A's users in [`notifications_to_users_on_node_a`].
const NOTIFICATIONS: usize = 4;

/// What every scenario runs against: the demo back-end and two nodes started from the real
/// binary (each on its own in-process broker), and a real Prometheus scraping both every second.
/// Starting Prometheus and waiting for its first scrapes takes seconds, and the dashboard
/// scenario needs the history the earlier scenarios leave in its TSDB, so the scenarios run in
/// order against one stack.
struct Stack {
    http: reqwest::Client,
    promtool: PathBuf,
    prom_url: String,
    backend: Proc,
    nodes: Vec<Node>,
    _prometheus: Proc,
    // Last: the processes above write their logs into it.
    _dir: TempDir,
}

impl Stack {
    fn a(&self) -> &Node {
        &self.nodes[0]
    }

    fn b(&self) -> &Node {
        &self.nodes[1]
    }

    fn targets(&self) -> [String; 2] {
        [self.a().target(), self.b().target()]
    }

    /// An instant query against Prometheus: its `data`, or the error it answered.
    async fn query(&self, expr: &str) -> Result<Value, String> {
        let resp = self
            .http
            .post(format!("{}/api/v1/query", self.prom_url))
            .form(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// Waits until Prometheus has scraped every target at least `scrapes` times since
    /// `since` (seconds since the epoch), so that the state at `since` is in the TSDB.
    async fn scraped_since(&self, since: f64, scrapes: f64) {
        let targets = self.targets();
        eventually(
            &format!("{scrapes} scrapes of each node after the workload"),
            Duration::from_secs(30),
            || async {
                let data = self.query(r#"timestamp(up{job="wsgate"})"#).await?;
                let rows = data["result"].as_array().cloned().unwrap_or_default();
                let last: Vec<f64> = targets
                    .iter()
                    .map(|t| {
                        rows.iter()
                            .find(|r| r["metric"]["instance"] == t.as_str())
                            .and_then(|r| r["value"][1].as_str())
                            .and_then(|v| v.parse::<f64>().ok())
                            .unwrap_or(0.0)
                    })
                    .collect();
                // One scrape a second: a last scrape more than (scrapes - 1) s after `since`
                // means `scrapes` scrapes after it.
                if last.iter().all(|ts| *ts > since + scrapes - 1.0) {
                    Ok(())
                } else {
                    Err(format!(
                        "last scrapes at {last:?}, workload ended at {since}"
                    ))
                }
            },
        )
        .await;
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Starts the demo back-end, two nodes and Prometheus, and waits until Prometheus has scraped
/// both nodes at least three times.
async fn start_stack() -> Stack {
    let promtool = tool("promtool");
    let prometheus_bin = tool("prometheus");
    let wsgate = Path::new(env!("CARGO_BIN_EXE_wsgate"));
    let dir = TempDir::new("observability");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // --- the demo back-end and two nodes, each on its own in-process broker ------------------
    let backend_port = free_port();
    let backend_url = format!("http://127.0.0.1:{backend_port}");
    let mut backend = Proc::spawn(
        "demo-backend",
        wsgate,
        &[
            "demo-backend".into(),
            "--listen".into(),
            format!("127.0.0.1:{backend_port}"),
        ],
        &dir,
    );
    {
        let http = &http;
        let url = format!("{backend_url}/stats");
        let url = &url;
        eventually(
            "the demo back-end",
            Duration::from_secs(30),
            || async move {
                match http.get(url).send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
    }
    backend.assert_running();

    let mut nodes = Vec::new();
    for name in ["node-a", "node-b"] {
        let public = free_port();
        let admin = free_port();
        let proc = Proc::spawn(
            name,
            wsgate,
            &[
                "serve".into(),
                "--listen".into(),
                format!("127.0.0.1:{public}"),
                "--admin-listen".into(),
                format!("127.0.0.1:{admin}"),
                "--backend-url".into(),
                backend_url.clone(),
                "--api-token".into(),
                API_TOKEN.into(),
                "--node-id".into(),
                name.into(),
                // Long enough that the keys cached at the start still serve once the
                // back-end is stopped near the end of the test.
                "--auth-ttl".into(),
                "10m".into(),
                "--log-level".into(),
                "warn".into(),
            ],
            &dir,
        );
        nodes.push(Node {
            name,
            public,
            admin,
            proc,
        });
    }
    for node in nodes.iter_mut() {
        let http = &http;
        let url = node.admin_url("/readyz");
        let url = &url;
        let what = format!("{} to be ready", node.name);
        // Fail fast with the node's output if it exits.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            node.proc.assert_running();
            match http.get(url).send().await {
                Ok(r) if r.status().as_u16() == 200 => break,
                _ if Instant::now() >= deadline => panic!("timed out waiting for {what}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    // --- Prometheus, scraping both admin ports every second -------------------------------------
    let prom_port = free_port();
    let prom_url = format!("http://127.0.0.1:{prom_port}");
    let config = dir.0.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: wsgate\n    static_configs:\n      - targets: ['{ta}', '{tb}']\n",
            rules = repo_file("deploy/prometheus/wsgate.rules.yml").display(),
            ta = nodes[0].target(),
            tb = nodes[1].target(),
        ),
    )
    .unwrap();
    let (ok, out) = run_tool(
        &promtool,
        &["check", "config", config.to_str().unwrap()],
        &dir.0,
    );
    assert!(ok, "promtool check config:\n{out}");
    let mut prometheus = Proc::spawn(
        "prometheus",
        &prometheus_bin,
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", dir.0.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
            "--log.level=warn".into(),
        ],
        &dir,
    );
    prometheus.assert_running();
    {
        let http = &http;
        let url = format!("{prom_url}/-/ready");
        let url = &url;
        eventually(
            "Prometheus to be ready",
            Duration::from_secs(60),
            || async move {
                match http.get(url).send().await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
    }
    let stack = Stack {
        http,
        promtool,
        prom_url,
        backend,
        nodes,
        _prometheus: prometheus,
        _dir: dir,
    };
    let targets = stack.targets();
    {
        let stack = &stack;
        let targets = &targets;
        eventually(
            "both targets up with at least 3 scrapes each",
            Duration::from_secs(60),
            || async move {
                let data = stack
                    .query(r#"count_over_time(up{job="wsgate"}[1m]) and up{job="wsgate"} == 1"#)
                    .await?;
                let rows = data["result"].as_array().cloned().unwrap_or_default();
                let mut ok = 0;
                for t in targets {
                    let n = rows
                        .iter()
                        .find(|r| r["metric"]["instance"] == t.as_str())
                        .and_then(|r| r["value"][1].as_str())
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0);
                    if n >= 3.0 {
                        ok += 1;
                    }
                }
                if ok == targets.len() {
                    Ok(())
                } else {
                    Err(format!("{rows:?}"))
                }
            },
        )
        .await;
    }
    stack
}

/// The WebSocket clients the scenarios drive.
/// Node A: alice with two tabs, carol and frank on /notws; john, jane, bob in demo-room on /chat.
/// Node B: dave and eve on /notws and on /chat (room pair-dave-eve).
struct Clients {
    alice1: Client,
    alice2: Client,
    carol: Client,
    frank: Client,
    john: Client,
    jane: Client,
    bob: Client,
    dave: Client,
    eve: Client,
    dave_chat: Client,
    eve_chat: Client,
}

fn notws(node: &Node, user: &str) -> String {
    node.ws(&format!("/notws?api_key=demo-key-{user}&userId={user}"))
}

fn chat(node: &Node, user: &str) -> String {
    node.ws(&format!("/chat?api_key=demo-key-{user}"))
}

/// Connects the clients, subscribes the /notws ones, and waits until the nodes count the
/// subscriptions.
async fn connect_clients(s: &Stack) -> Clients {
    let (a, b) = (s.a(), s.b());
    let mut c = Clients {
        alice1: Client::connect("alice tab 1", &notws(a, "alice")).await,
        alice2: Client::connect("alice tab 2", &notws(a, "alice")).await,
        carol: Client::connect("carol", &notws(a, "carol")).await,
        frank: Client::connect("frank", &notws(a, "frank")).await,
        john: Client::connect("john", &chat(a, "john")).await,
        jane: Client::connect("jane", &chat(a, "jane")).await,
        bob: Client::connect("bob", &chat(a, "bob")).await,
        dave: Client::connect("dave", &notws(b, "dave")).await,
        eve: Client::connect("eve", &notws(b, "eve")).await,
        dave_chat: Client::connect("dave chat", &chat(b, "dave")).await,
        eve_chat: Client::connect("eve chat", &chat(b, "eve")).await,
    };
    for client in [
        &mut c.alice1,
        &mut c.alice2,
        &mut c.carol,
        &mut c.dave,
        &mut c.eve,
    ] {
        client.send("subscribe: ALL").await;
    }
    // Two topics (the empty item is skipped), neither of which the notifications below use.
    c.frank.send("subscribe: Other, , Another").await;

    // The subscriptions are in place once the nodes count them.
    for (node, want) in [(a, 5.0), (b, 2.0)] {
        let http = &s.http;
        eventually(
            &format!("wsgate_topic_subscriptions on {}", node.name),
            Duration::from_secs(10),
            || async move {
                let scraped = scrape(http, node).await;
                let v = scraped.get("wsgate_topic_subscriptions", &[]);
                if v == want {
                    Ok(())
                } else {
                    Err(format!("{v}, expected {want}"))
                }
            },
        )
        .await;
    }
    c
}

/// Open connections, subscriptions, readiness and refused upgrades (one per reason) are
/// counted exactly, per endpoint and reason, from a fresh start.
async fn connections_and_refusals_are_counted(s: &Stack) -> Vec<String> {
    let (http, a, b) = (&s.http, s.a(), s.b());
    let mut problems = Vec::new();
    // Refused upgrades, so that the labelled series exist and are counted exactly.
    let refused = [
        (a.ws("/notws?api_key=not-a-demo-key"), 401, "bad key"),
        (a.ws("/notws"), 401, "missing key"),
        (
            a.ws("/notws?api_key=demo-key-alice&userId=bob"),
            403,
            "userId mismatch",
        ),
        (b.ws("/chat"), 401, "missing key"),
        (b.ws("/chat?apiKey=not-a-demo-key"), 401, "bad key (apiKey)"),
    ];
    for (url, want, what) in &refused {
        let got = upgrade_status(url).await;
        if got != *want {
            problems.push(format!(
                "{what}: upgrade of {url} answered {got}, expected {want}"
            ));
        }
    }

    let zero = Scrape::parse(String::new());
    problems.extend(
        check_deltas(
            http,
            a,
            &zero,
            "connections",
            &[
                exp("wsgate_connections", &[("endpoint", "notws")], 4.0),
                exp("wsgate_connections", &[("endpoint", "chat")], 3.0),
                exp(
                    "wsgate_connections_opened_total",
                    &[("endpoint", "notws")],
                    4.0,
                ),
                exp(
                    "wsgate_connections_opened_total",
                    &[("endpoint", "chat")],
                    3.0,
                ),
                exp(
                    "wsgate_connections_rejected_total",
                    &[("endpoint", "notws"), ("reason", "invalid_key")],
                    1.0,
                ),
                exp(
                    "wsgate_connections_rejected_total",
                    &[("endpoint", "notws"), ("reason", "missing_key")],
                    1.0,
                ),
                exp(
                    "wsgate_connections_rejected_total",
                    &[("endpoint", "notws"), ("reason", "user_mismatch")],
                    1.0,
                ),
                exp("wsgate_connections_rejected_total", &[], 3.0),
                exp("wsgate_topic_subscriptions", &[], 5.0),
                exp("wsgate_ready", &[], 1.0),
                exp("wsgate_broker_up", &[], 1.0),
            ],
        )
        .await,
    );
    problems.extend(
        check_deltas(
            http,
            b,
            &zero,
            "connections",
            &[
                exp("wsgate_connections", &[("endpoint", "notws")], 2.0),
                exp("wsgate_connections", &[("endpoint", "chat")], 2.0),
                exp(
                    "wsgate_connections_opened_total",
                    &[("endpoint", "notws")],
                    2.0,
                ),
                exp(
                    "wsgate_connections_opened_total",
                    &[("endpoint", "chat")],
                    2.0,
                ),
                exp(
                    "wsgate_connections_rejected_total",
                    &[("endpoint", "chat"), ("reason", "missing_key")],
                    1.0,
                ),
                exp(
                    "wsgate_connections_rejected_total",
                    &[("endpoint", "chat"), ("reason", "invalid_key")],
                    1.0,
                ),
                exp("wsgate_connections_rejected_total", &[], 2.0),
                exp("wsgate_topic_subscriptions", &[], 2.0),
            ],
        )
        .await,
    );
    problems
}

/// Notifications to alice (2 tabs), carol and frank on node A: the subscribers get each one
/// byte for byte, frank (other topics) gets none, and deliveries, fan-out, latency, broker and
/// API counters move by exactly that; node B's do not move.
async fn notifications_to_users_on_node_a(s: &Stack, c: &Clients) -> Vec<String> {
    let (http, a, b) = (&s.http, s.a(), s.b());
    let mut problems = Vec::new();
    let base_a = scrape(http, a).await;
    let base_b = scrape(http, b).await;
    const N: usize = NOTIFICATIONS;
    let mut channels = 0.0;
    let mut sent = Vec::new();
    for i in 0..N {
        let notification = json!({
            "topic": "ObservabilityTest",
            "subTopic": format!("n{i}"),
            "sentDate": "2026-11-29T02:00:00Z",
            "notificationMessageId": format!("obs-{i}"),
            "topicDescription": "Observability test",
            "message": {"n": i},
            "title": format!("Notification {i}"),
            "link": "/apps/test",
            "type": "info",
            "persistOnSend": false,
            "showAlert": true,
            "alertNoAutoHide": false
        });
        let (status, body) = post(
            http,
            &a.admin_url("/api/v1/notifications"),
            Some(API_TOKEN),
            &json!({"userIds": ["alice", "carol", "frank"], "notification": notification}),
        )
        .await;
        assert_eq!(status, 202, "POST /api/v1/notifications: {body}");
        match body["channels"].as_f64() {
            Some(ch) => {
                channels += ch;
                if ch != 3.0 {
                    problems.push(format!("notification to 3 users answered channels={ch}"));
                }
            }
            None => problems.push(format!("202 answer has no `channels`: {body}")),
        }
        sent.push(notification);
    }
    let expected = [(&c.alice1, N), (&c.alice2, N), (&c.carol, N), (&c.frank, 0)];
    wait_frames(&expected, "phase 1 notifications").await;
    exact_frames(&expected, "phase 1", &mut problems);
    for (i, frame) in c.alice1.frames().iter().enumerate() {
        let got: Value = serde_json::from_str(frame).unwrap_or(Value::Null);
        if sent.get(i) != Some(&got) {
            problems.push(format!(
                "alice received {frame}, expected {:?}",
                sent.get(i)
            ));
        }
    }
    let delivered = (3 * N) as f64;
    problems.extend(
        check_deltas(
            http,
            a,
            &base_a,
            "phase 1 (notifications on node A)",
            &[
                exp(
                    "wsgate_deliveries_total",
                    &[("endpoint", "notws")],
                    delivered,
                ),
                exp("wsgate_deliveries_total", &[("endpoint", "chat")], 0.0),
                // The in-process broker hands a publish to all its channels in one message:
                // one observation (and one received message) per publish.
                exp("wsgate_fanout_recipients_count", &[], N as f64),
                exp("wsgate_fanout_recipients_sum", &[], delivered),
                exp("wsgate_delivery_latency_seconds_count", &[], delivered),
                exp("wsgate_broker_messages_published_total", &[], channels),
                exp("wsgate_broker_messages_received_total", &[], N as f64),
                exp(
                    "wsgate_api_requests_total",
                    &[("route", "notifications"), ("status", "202")],
                    N as f64,
                ),
                exp("wsgate_outbound_dropped_total", &[], 0.0),
                exp("wsgate_slow_consumer_disconnects_total", &[], 0.0),
            ],
        )
        .await,
    );
    problems.extend(
        check_deltas(
            http,
            b,
            &base_b,
            "phase 1 (node B untouched)",
            &[
                exp("wsgate_deliveries_total", &[], 0.0),
                exp("wsgate_fanout_recipients_sum", &[], 0.0),
            ],
        )
        .await,
    );
    problems
}

/// A broadcast and a tenant notification on node B reach dave and eve on /notws (not their
/// /chat sockets), counted once per recipient.
async fn broadcast_and_tenant_on_node_b(s: &Stack, c: &Clients) -> Vec<String> {
    let (http, b) = (&s.http, s.b());
    let mut problems = Vec::new();
    let base_b = scrape(http, b).await;
    let mut channels_b = 0.0;
    for target in [
        json!({"broadcast": true}),
        json!({"tenantId": "DemoCompany"}),
    ] {
        let mut body = target.clone();
        body["notification"] =
            json!({"topic": "ObservabilityTest", "title": "to many", "message": {}});
        let (status, answer) = post(
            http,
            &b.admin_url("/api/v1/notifications"),
            Some(API_TOKEN),
            &body,
        )
        .await;
        assert_eq!(status, 202, "POST {body}: {answer}");
        channels_b += answer["channels"].as_f64().unwrap_or(f64::NAN);
    }
    let expected = [
        (&c.dave, 2),
        (&c.eve, 2),
        (&c.dave_chat, 0),
        (&c.eve_chat, 0),
    ];
    wait_frames(&expected, "phase 2 notifications").await;
    exact_frames(&expected, "phase 2", &mut problems);
    problems.extend(
        check_deltas(
            http,
            b,
            &base_b,
            "phase 2 (broadcast and tenant on node B)",
            &[
                exp("wsgate_deliveries_total", &[("endpoint", "notws")], 4.0),
                exp("wsgate_deliveries_total", &[("endpoint", "chat")], 0.0),
                exp("wsgate_fanout_recipients_count", &[], channels_b),
                exp("wsgate_fanout_recipients_sum", &[], 4.0),
                exp("wsgate_delivery_latency_seconds_count", &[], 4.0),
            ],
        )
        .await,
    );
    problems
}

/// A chat line as the GrowERP client sends it (with a `fromUserId` the gateway must replace).
fn line(room: &str, text: &str) -> String {
    json!({"chatRoom": {"chatRoomId": room}, "content": text, "fromUserId": "spoofed"}).to_string()
}

/// Chat in demo-room (node A) and pair-dave-eve (node B): every other member gets each line,
/// the sender none, `fromUserId` is the real sender, and chat deliveries, fan-out, back-end
/// calls and the room cache are counted.
async fn chat_on_both_nodes(s: &Stack, c: &mut Clients) -> Vec<String> {
    let (http, a, b) = (&s.http, s.a(), s.b());
    let mut problems = Vec::new();
    let base_a = scrape(http, a).await;
    let base_b = scrape(http, b).await;
    c.john.send(&line("demo-room", "hi")).await;
    c.john.send(&line("demo-room", "hi again")).await;
    c.jane.send(&line("demo-room", "hi john")).await;
    c.dave_chat.send(&line("pair-dave-eve", "hi eve")).await;
    let expected = [
        (&c.john, 1),
        (&c.jane, 2),
        (&c.bob, 3),
        (&c.eve_chat, 1),
        (&c.dave_chat, 0),
    ];
    wait_frames(&expected, "phase 3 chat").await;
    exact_frames(&expected, "phase 3", &mut problems);
    for frame in c.bob.frames() {
        let v: Value = serde_json::from_str(&frame).unwrap_or(Value::Null);
        let from = v["fromUserId"]
            .as_str()
            .or(v["chatMessage"]["fromUserId"].as_str());
        if !matches!(from, Some("john") | Some("jane")) {
            problems.push(format!(
                "bob received a chat frame with fromUserId {from:?}: {frame}"
            ));
        }
    }
    problems.extend(
        check_deltas(
            http,
            a,
            &base_a,
            "phase 3 (chat in demo-room on node A)",
            &[
                exp("wsgate_deliveries_total", &[("endpoint", "chat")], 6.0),
                exp("wsgate_deliveries_total", &[("endpoint", "notws")], 0.0),
                // 3 messages, each to the 2 other members (one connection each): one
                // observation per message with the in-process broker.
                exp("wsgate_fanout_recipients_count", &[], 3.0),
                exp("wsgate_fanout_recipients_sum", &[], 6.0),
                exp("wsgate_delivery_latency_seconds_count", &[], 6.0),
            ],
        )
        .await,
    );
    problems.extend(
        check_deltas(
            http,
            b,
            &base_b,
            "phase 3 (chat in pair-dave-eve on node B)",
            &[
                exp("wsgate_deliveries_total", &[("endpoint", "chat")], 1.0),
                exp("wsgate_fanout_recipients_count", &[], 1.0),
                exp("wsgate_fanout_recipients_sum", &[], 1.0),
            ],
        )
        .await,
    );
    let scraped = scrape(http, a).await;
    if scraped.get(
        "wsgate_backend_request_duration_seconds_count",
        &[("call", "chat_room")],
    ) < 1.0
    {
        problems.push("no chat_room back-end call was observed on node A".into());
    }
    if scraped.get("wsgate_chat_room_cache_requests_total", &[]) < 3.0 {
        problems.push("chat room cache requests were not counted on node A".into());
    }
    problems
}

/// Frames the gateway ignores are counted by endpoint and kind; nothing is delivered and the
/// connections stay open.
async fn ignored_frames_are_counted(s: &Stack, c: &mut Clients) -> Vec<String> {
    let (http, a) = (&s.http, s.a());
    let base_a = scrape(http, a).await;
    c.alice1.send("hello there").await;
    c.john.send("not json").await;
    c.john.send(r#"{"content": "no room"}"#).await;
    c.john.send(&line("pair-x-y", "not a member")).await;
    c.john.send(&line("no-such-room", "unknown room")).await;
    check_deltas(
        http,
        a,
        &base_a,
        "phase 4 (ignored frames)",
        &[
            exp(
                "wsgate_client_frames_ignored_total",
                &[("endpoint", "notws"), ("kind", "unknown_command")],
                1.0,
            ),
            exp(
                "wsgate_client_frames_ignored_total",
                &[("endpoint", "chat"), ("kind", "invalid_json")],
                1.0,
            ),
            exp(
                "wsgate_client_frames_ignored_total",
                &[("endpoint", "chat"), ("kind", "no_room")],
                1.0,
            ),
            exp(
                "wsgate_client_frames_ignored_total",
                &[("endpoint", "chat"), ("kind", "not_member")],
                1.0,
            ),
            exp(
                "wsgate_client_frames_ignored_total",
                &[("endpoint", "chat"), ("kind", "unknown_room")],
                1.0,
            ),
            exp("wsgate_client_frames_ignored_total", &[], 5.0),
            exp("wsgate_deliveries_total", &[], 0.0),
            // The connections stay open.
            exp("wsgate_connections", &[], 0.0),
            exp("wsgate_connections_closed_total", &[], 0.0),
        ],
    )
    .await
}

/// The internal API's other answers: presence (200), a wrong token (401), a notification
/// without topic (400), each counted by route and status.
async fn api_answers_are_counted(s: &Stack) -> Vec<String> {
    let (http, b) = (&s.http, s.b());
    let mut problems = Vec::new();
    let base_b = scrape(http, b).await;
    let resp = http
        .get(b.admin_url("/api/v1/presence?userId=dave&userId=nobody"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let presence: Value = resp.json().await.unwrap_or(Value::Null);
    if status != 200 || presence["online"] != json!({"dave": true, "nobody": false}) {
        problems.push(format!("presence answered {status} {presence}"));
    }
    let (status, _) = post(
        http,
        &b.admin_url("/api/v1/notifications"),
        Some("wrong-token"),
        &json!({"broadcast": true, "notification": {"topic": "T"}}),
    )
    .await;
    if status != 401 {
        problems.push(format!(
            "a wrong API token was answered {status}, expected 401"
        ));
    }
    let (status, _) = post(
        http,
        &b.admin_url("/api/v1/notifications"),
        Some(API_TOKEN),
        &json!({"broadcast": true, "notification": {"title": "no topic"}}),
    )
    .await;
    if status != 400 {
        problems.push(format!(
            "a notification without topic was answered {status}, expected 400"
        ));
    }
    problems.extend(
        check_deltas(
            http,
            b,
            &base_b,
            "phase 5 (API)",
            &[
                exp(
                    "wsgate_api_requests_total",
                    &[("route", "presence"), ("status", "200")],
                    1.0,
                ),
                exp(
                    "wsgate_api_requests_total",
                    &[("route", "notifications"), ("status", "401")],
                    1.0,
                ),
                exp(
                    "wsgate_api_requests_total",
                    &[("route", "notifications"), ("status", "400")],
                    1.0,
                ),
                exp("wsgate_deliveries_total", &[], 0.0),
            ],
        )
        .await,
    );
    problems
}

/// A client that closes normally is counted as closed by the client, and its connection and
/// subscription are released.
async fn a_client_close_is_counted(s: &Stack, c: &mut Clients) -> Vec<String> {
    let (http, a) = (&s.http, s.a());
    let base_a = scrape(http, a).await;
    c.carol.close().await;
    check_deltas(
        http,
        a,
        &base_a,
        "phase 6 (carol closes)",
        &[
            exp("wsgate_connections", &[("endpoint", "notws")], -1.0),
            exp("wsgate_connections", &[("endpoint", "chat")], 0.0),
            exp(
                "wsgate_connections_closed_total",
                &[("endpoint", "notws"), ("reason", "client")],
                1.0,
            ),
            exp("wsgate_connections_closed_total", &[], 1.0),
            exp("wsgate_topic_subscriptions", &[], -1.0),
        ],
    )
    .await
}

/// `promtool check metrics` accepts live scrapes of both nodes, and every exported `wsgate_`
/// and `process_` metric family is documented in docs/metrics.md.
async fn exposition_is_valid_and_documented(s: &Stack) -> Vec<String> {
    let (http, a, b) = (&s.http, s.a(), s.b());
    let mut problems = Vec::new();
    for node in [a, b] {
        let body = scrape(http, node).await.text;
        let mut child = Command::new(&s.promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool check metrics");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || !text.trim().is_empty() {
            problems.push(format!(
                "promtool check metrics on {} ({}):\n{text}",
                node.name, out.status
            ));
        }
    }

    // Every exported wsgate_ metric is documented.
    let docs = fs::read_to_string(repo_file("docs/metrics.md")).unwrap_or_default();
    let scraped = scrape(http, a).await;
    for name in scraped.names() {
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        let family = if scraped.has(&format!("{base}_bucket")) {
            base
        } else {
            name.as_str()
        };
        if (family.starts_with("wsgate_") || family.starts_with("process_"))
            && !docs.contains(&format!("`{family}`"))
        {
            problems.push(format!(
                "{family} is exported but not documented in docs/metrics.md"
            ));
        }
    }

    println!("---- node A /metrics (excerpt) ----");
    for l in scraped.text.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("wsgate_connections{")
                || l.starts_with("wsgate_deliveries_total")
                || l.starts_with("wsgate_fanout_recipients_sum")
                || l.starts_with("wsgate_fanout_recipients_count")
                || l.starts_with("wsgate_delivery_latency_seconds_count")
                || l.starts_with("wsgate_auth_cache_requests_total")
                || l.starts_with("process_resident_memory_bytes"))
    }) {
        println!("{l}");
    }
    problems
}

/// With the back-end stopped, an uncached key is refused with 503, counted as
/// `backend_unavailable`, and the failed Authenticate call is counted as a back-end error.
async fn backend_outage_is_counted(s: &mut Stack) -> Vec<String> {
    let mut problems = Vec::new();
    let base_a = scrape(&s.http, s.a()).await;
    s.backend.kill();
    let (http, a) = (&s.http, s.a());
    let status = upgrade_status(&notws(a, "zed")).await;
    if status != 503 {
        problems.push(format!(
            "with the back-end down, an uncached key was answered {status}, expected 503"
        ));
    }
    problems.extend(
        check_deltas(
            http,
            a,
            &base_a,
            "phase 7 (back-end down)",
            &[
                exp(
                    "wsgate_connections_rejected_total",
                    &[("endpoint", "notws"), ("reason", "backend_unavailable")],
                    1.0,
                ),
                exp("wsgate_connections_opened_total", &[], 0.0),
            ],
        )
        .await,
    );
    let scraped = scrape(http, a).await;
    if scraped.get("wsgate_backend_errors_total", &[("call", "authenticate")])
        <= base_a.get("wsgate_backend_errors_total", &[("call", "authenticate")])
    {
        problems.push(
            "the failed Authenticate call was not counted in wsgate_backend_errors_total".into(),
        );
    }
    problems
}

/// Four seconds of steady traffic on both nodes while Prometheus scrapes (so that the rate
/// panels have something to show); clients with cached keys still connect while the back-end
/// is down (auth cache hits). Alice's tabs get every notification. Returns when Prometheus has
/// scraped the end state twice.
async fn steady_traffic_is_delivered(s: &Stack, c: &Clients) -> Vec<String> {
    let (http, a, b) = (&s.http, s.a(), s.b());
    let mut problems = Vec::new();
    let traffic_started = Instant::now();
    let mut sent_to_alice = 0;
    while traffic_started.elapsed() < Duration::from_secs(4) {
        let (status, body) = post(
            http,
            &a.admin_url("/api/v1/notifications"),
            Some(API_TOKEN),
            &json!({"userIds": ["alice"], "notification": {"topic": "Traffic", "title": "t"}}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        sent_to_alice += 1;
        let (status, body) = post(
            http,
            &b.admin_url("/api/v1/notifications"),
            Some(API_TOKEN),
            &json!({"broadcast": true, "notification": {"topic": "Traffic", "title": "t"}}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        if sent_to_alice == 1 {
            let mut extra = Client::connect("alice tab 3", &notws(a, "alice")).await;
            extra.close().await;
        }
        // Pacing, not waiting: about ten publishes a second on each node.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut extra = Client::connect("alice tab 4", &notws(a, "alice")).await;
    extra.close().await;
    let n = NOTIFICATIONS + sent_to_alice;
    let expected = [(&c.alice1, n), (&c.alice2, n)];
    wait_frames(&expected, "steady traffic").await;
    exact_frames(&expected, "steady traffic", &mut problems);

    // Two more scrapes, so that the last state of the workload is in the TSDB.
    s.scraped_since(unix_now(), 2.0).await;
    problems
}

/// Every panel query of the dashboard answers with data from the two nodes; the headline
/// panels show the traffic that just happened, and the connection count Prometheus holds
/// matches what is open (10).
async fn dashboard_panels_show_the_workload(s: &Stack) -> Vec<String> {
    let mut problems = Vec::new();
    let targets = s.targets();
    let instance_regex = format!("{}|{}", targets[0], targets[1]);
    let dash = dashboard();
    let queries = dashboard_queries(&dash);
    assert!(
        queries.len() >= 20,
        "the dashboard has only {} queries",
        queries.len()
    );
    println!("---- dashboard queries against Prometheus ----");
    // The values of each panel's first query, for the headline checks below.
    let mut first: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for (title, expr) in &queries {
        let q = substitute(expr, &instance_regex);
        match s.query(&q).await {
            Ok(data) => {
                let rows = data["result"].as_array().cloned().unwrap_or_default();
                if rows.is_empty() {
                    problems.push(format!("panel `{title}`: no series for {q}"));
                }
                first.entry(title.clone()).or_insert_with(|| {
                    rows.iter()
                        .map(|r| {
                            r["value"][1]
                                .as_str()
                                .and_then(|v| v.parse::<f64>().ok())
                                .unwrap_or(f64::NAN)
                        })
                        .collect()
                });
                let shown: Vec<String> = rows
                    .iter()
                    .take(6)
                    .map(|r| {
                        let mut m = r["metric"].as_object().cloned().unwrap_or_default();
                        m.remove("job");
                        format!("{} = {}", Value::Object(m), r["value"][1])
                    })
                    .collect();
                println!("[{title}] {q}\n    {}", shown.join("\n    "));
            }
            Err(e) => problems.push(format!("panel `{title}`: {q}: {e}")),
        }
    }

    // The headline panels show the traffic that just happened.
    let headline = |title: &str| first.get(title).cloned().unwrap_or_default();
    let deliveries: f64 = headline("Deliveries per second").iter().sum();
    if deliveries.is_nan() || deliveries <= 0.0 {
        problems.push(format!("`Deliveries per second` shows {deliveries}"));
    }
    for (title, min) in [
        ("Delivery latency p50 / p99", 0.0),
        ("p99 delivery latency", 0.0),
        ("Recipients per message", 1.0),
        ("Auth cache hit ratio", 0.0),
        ("Resident memory per connection", 1024.0),
        ("Connect rate", 0.0),
    ] {
        let v = headline(title);
        if v.is_empty() || v.iter().any(|x| !x.is_finite() || *x < min) {
            problems.push(format!(
                "panel `{title}` shows {v:?}, expected finite values >= {min}"
            ));
        }
    }
    let conns: f64 = headline("Connections per node and endpoint").iter().sum();
    if conns != 10.0 {
        problems.push(format!(
            "`Connections per node and endpoint` adds up to {conns}, expected 10"
        ));
    }

    // Prometheus sees what the nodes report.
    match s
        .query(&format!(
            r#"sum(wsgate_connections{{instance=~"{instance_regex}"}})"#
        ))
        .await
    {
        Ok(data) => {
            let v = data["result"][0]["value"][1]
                .as_str()
                .unwrap_or("?")
                .to_string();
            // node A: 3 /notws (carol left) + 3 /chat; node B: 2 + 2.
            if v != "10" {
                problems.push(format!(
                    "Prometheus reports {v} open connections, expected 10"
                ));
            }
        }
        Err(e) => problems.push(format!("sum(wsgate_connections): {e}")),
    }
    problems
}

/// Every alert expression parses and evaluates against the live data, and the rules file
/// loaded into this Prometheus evaluates without errors.
async fn alert_rules_evaluate(s: &Stack) -> Vec<String> {
    let mut problems = Vec::new();
    let rules = rule_expressions();
    for (alert, expr) in &rules {
        if let Err(e) = s.query(expr).await {
            problems.push(format!("alert {alert}: {e}"));
        }
    }
    let http = &s.http;
    let url = format!("{}/api/v1/rules", s.prom_url);
    let url = &url;
    let want = rules.len();
    eventually(
        "every rule evaluated without error",
        Duration::from_secs(30),
        || async move {
            let body: Value = http
                .get(url)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            let all: Vec<Value> = body["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let bad: Vec<String> = all
                .iter()
                .filter(|r| r["health"] != "ok")
                .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
                .collect();
            if all.len() == want && bad.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} of {want} rules loaded; not ok: {bad:?}",
                    all.len()
                ))
            }
        },
    )
    .await;
    problems
}

/// Two nodes and a real Prometheus; the scenarios above, in order. Each scenario returns the
/// problems it found (so that one run reports all of them); the test fails if any did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_scraped_by_prometheus() {
    let mut stack = start_stack().await;
    let mut clients = connect_clients(&stack).await;
    let mut problems: Vec<String> = Vec::new();
    let mut record = |scenario: &str, found: Vec<String>| {
        problems.extend(found.into_iter().map(|p| format!("[{scenario}] {p}")));
    };

    record(
        "connections_and_refusals_are_counted",
        connections_and_refusals_are_counted(&stack).await,
    );
    record(
        "notifications_to_users_on_node_a",
        notifications_to_users_on_node_a(&stack, &clients).await,
    );
    record(
        "broadcast_and_tenant_on_node_b",
        broadcast_and_tenant_on_node_b(&stack, &clients).await,
    );
    record(
        "chat_on_both_nodes",
        chat_on_both_nodes(&stack, &mut clients).await,
    );
    record(
        "ignored_frames_are_counted",
        ignored_frames_are_counted(&stack, &mut clients).await,
    );
    record(
        "api_answers_are_counted",
        api_answers_are_counted(&stack).await,
    );
    record(
        "a_client_close_is_counted",
        a_client_close_is_counted(&stack, &mut clients).await,
    );
    record(
        "exposition_is_valid_and_documented",
        exposition_is_valid_and_documented(&stack).await,
    );
    record(
        "backend_outage_is_counted",
        backend_outage_is_counted(&mut stack).await,
    );
    record(
        "steady_traffic_is_delivered",
        steady_traffic_is_delivered(&stack, &clients).await,
    );
    record(
        "dashboard_panels_show_the_workload",
        dashboard_panels_show_the_workload(&stack).await,
    );
    record("alert_rules_evaluate", alert_rules_evaluate(&stack).await);

    for node in stack.nodes.iter_mut() {
        node.proc.assert_running();
    }
    drop(clients);
    assert!(
        problems.is_empty(),
        "{} problem(s):\n- {}",
        problems.len(),
        problems.join("\n- ")
    );
    drop(stack);
}
