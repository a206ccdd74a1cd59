//! The back-end storm: N distinct users connect at the same instant to a node that has never
//! seen their keys, against a slow back-end (`wsgate-loadtest slow-backend`: a worker pool, like
//! a servlet container). A refused client comes back after the `Retry-After` it was given, or
//! after `--retry` seconds without one (or after a timeout). Reports the time until every
//! client is back, the back-end's calls in total and at most at once, distinct keys asked and
//! the calls of the most-asked key (1 when every key cost exactly one call).

use crate::client::{self, ClientSpec, ConnectError, Endpoint};
use crate::common::{self, http_client, Common};
use crate::report::{self, machine_md, Envelope, Output};
use crate::stats;
use anyhow::{bail, Context};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct BackendStormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Clients, each with its own key.
    #[arg(long, default_value_t = 4000)]
    pub connections: usize,
    /// Seconds a refused client waits when the answer has no `Retry-After` (or on a timeout).
    #[arg(long, default_value_t = 5.0)]
    pub retry: f64,
    /// Give up on a client after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub deadline: f64,
    /// Target for "all back", seconds.
    #[arg(long, default_value_t = 8.0)]
    pub limit: f64,
    /// The node's `--backend-concurrency` (reported, and checked against the peak at the back-end).
    #[arg(long, default_value_t = 32)]
    pub concurrency: u64,
    /// Seconds to hold the connections once all are back (or given up) before reading the
    /// server's RSS (memory per connection after a storm); 0 = close at once.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
    /// Clients between their first attempt and getting in at once (0 = all of them): a larger
    /// storm comes in waves of this size, each client retrying as told until it is in.
    #[arg(long, default_value_t = 0)]
    pub wave: usize,
}

#[derive(Serialize, Default)]
pub struct SlowStats {
    pub authenticate: u64,
    pub max_in_flight: u64,
    pub distinct_keys: u64,
    pub max_calls_per_key: u64,
}

#[derive(Serialize)]
pub struct BackendStormResult {
    pub clients: usize,
    pub connected: usize,
    pub gave_up: usize,
    pub attempts: u64,
    pub refused_with_retry_after: u64,
    pub errors: BTreeMap<String, usize>,
    pub all_back_seconds: f64,
    pub p50_back_seconds: f64,
    pub p99_back_seconds: f64,
    pub backend: SlowStats,
    pub server_cpu_seconds: f64,
    pub within_limit: bool,
    pub within_concurrency: bool,
    pub one_call_per_key: bool,
    /// Server RSS before the storm and after holding the connections `--hold` seconds.
    pub server_rss_before_bytes: u64,
    pub server_rss_after_bytes: u64,
    pub hold_seconds: f64,
}

async fn slow_stats(http: &reqwest::Client, base: &str) -> anyhow::Result<SlowStats> {
    let v = common::get_json(http, &format!("{base}/stats")).await?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(SlowStats {
        authenticate: n("authenticate"),
        max_in_flight: n("maxInFlight"),
        distinct_keys: n("distinctKeys"),
        max_calls_per_key: n("maxCallsPerKey"),
    })
}

pub async fn run(a: BackendStormArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let machine = stats::machine();
    let nodes = c.nodes()?;
    if nodes.is_empty() {
        bail!("--url names no node");
    }
    let http = http_client();
    http.post(format!("{}/reset", c.backend_url))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .context("slow back-end /reset (run `wsgate-loadtest slow-backend`)")?;
    let server = c.server();
    let s0 = server.sample().await?;
    // Distinct users per run, so that a node's auth cache from an earlier run does not help.
    let run_id = stats::now_us() % 1_000_000_000;
    let prefix = format!("{}bs{run_id}-", c.user_prefix);
    let timeout = Duration::from_secs_f64(c.connect_timeout.min(a.deadline));
    let deadline = Duration::from_secs_f64(a.deadline);
    let retry = Duration::from_secs_f64(a.retry);
    eprintln!(
        "backend-storm: {} clients with distinct keys at once",
        a.connections
    );
    let start = Instant::now();
    let wave = Arc::new(tokio::sync::Semaphore::new(if a.wave == 0 {
        a.connections.max(1)
    } else {
        a.wave
    }));
    let mut joins = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let spec = ClientSpec {
            target: c.target,
            endpoint: Endpoint::Notifications,
            node: nodes[i % nodes.len()].clone(),
            user: format!("{prefix}{i}"),
            index: i,
            source_ips: c.source_ips,
        };
        let wave = wave.clone();
        joins.push(tokio::spawn(async move {
            let _in_wave = wave.acquire_owned().await;
            let (mut attempts, mut with_retry_after) = (0u64, 0u64);
            let mut errs: Vec<String> = Vec::new();
            loop {
                attempts += 1;
                let wait = match client::establish(&spec, timeout).await {
                    Ok(ws) => {
                        return (
                            Some((ws, start.elapsed())),
                            attempts,
                            with_retry_after,
                            errs,
                        )
                    }
                    Err(e) => {
                        errs.push(common::error_key(&e));
                        match e {
                            ConnectError::Status(_, Some(s)) => {
                                with_retry_after += 1;
                                Duration::from_secs(s)
                            }
                            _ => retry,
                        }
                    }
                };
                if start.elapsed() + wait >= deadline {
                    return (None, attempts, with_retry_after, errs);
                }
                tokio::time::sleep(wait).await;
            }
        }));
    }
    let mut times = Vec::new();
    let mut open = Vec::new();
    let (mut attempts, mut refused_ra, mut gave_up) = (0u64, 0u64, 0usize);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for j in joins {
        let (ws, att, ra, errs) = j.await?;
        attempts += att;
        refused_ra += ra;
        for e in errs {
            *errors.entry(e).or_default() += 1;
        }
        match ws {
            Some((ws, t)) => {
                times.push(t.as_secs_f64());
                open.push(ws);
            }
            None => gave_up += 1,
        }
    }
    let s1 = server.sample().await?;
    let b = slow_stats(&http, &c.backend_url).await?;
    let rss_after = if a.hold > 0.0 {
        eprintln!(
            "backend-storm: holding {} connections {} s before reading RSS",
            open.len(),
            a.hold
        );
        tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
        server.sample().await?.rss_bytes
    } else {
        s1.rss_bytes
    };
    drop(open);
    times.sort_by(|x, y| x.total_cmp(y));
    let q = |p: f64| -> f64 {
        if times.is_empty() {
            return 0.0;
        }
        let i = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1;
        times[i]
    };
    let all_back = if gave_up == 0 { q(1.0) } else { -1.0 };
    let r = BackendStormResult {
        clients: a.connections,
        connected: times.len(),
        gave_up,
        attempts,
        refused_with_retry_after: refused_ra,
        errors,
        all_back_seconds: all_back,
        p50_back_seconds: q(0.5),
        p99_back_seconds: q(0.99),
        within_limit: gave_up == 0 && all_back <= a.limit,
        within_concurrency: b.max_in_flight <= a.concurrency,
        one_call_per_key: b.max_calls_per_key <= 1 && b.distinct_keys == a.connections as u64,
        backend: b,
        server_cpu_seconds: s1.cpu_seconds - s0.cpu_seconds,
        server_rss_before_bytes: s0.rss_bytes,
        server_rss_after_bytes: rss_after,
        hold_seconds: a.hold,
    };
    eprintln!(
        "backend-storm: {}/{} back in {:.2} s (p50 {:.2}, p99 {:.2}), {} attempts, back-end: {} calls for {} keys, at most {} at once, most-asked key {} times",
        r.connected,
        r.clients,
        r.all_back_seconds,
        r.p50_back_seconds,
        r.p99_back_seconds,
        r.attempts,
        r.backend.authenticate,
        r.backend.distinct_keys,
        r.backend.max_in_flight,
        r.backend.max_calls_per_key
    );
    let out = Output {
        dir: &c.out,
        name: c.file_name("backend-storm"),
    };
    let mut md = format!("# backend-storm\n\n`{}`\n\n", report::command_line());
    md += &machine_md(&machine);
    let _ = writeln!(
        md,
        "\n{} clients with distinct keys connect at once to a node that has never seen them; the back-end serves a fixed number of requests at a time (see its command line). A refused client retries after its `Retry-After`, or after {} s.\n\n| back | all back (s) | p50 (s) | p99 (s) | attempts | refused with Retry-After | back-end calls | distinct keys | most calls for one key | most calls at once (limit {}) | server CPU s | within {} s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        a.connections, a.retry, a.concurrency, a.limit
    );
    let md_tail = if a.hold > 0.0 {
        format!(
            "\nServer RSS before the storm {:.1} MiB, after holding the {} connections {} s: {:.1} MiB.\n",
            r.server_rss_before_bytes as f64 / 1048576.0,
            r.connected,
            a.hold,
            r.server_rss_after_bytes as f64 / 1048576.0
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        md,
        "| {}/{} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
        r.connected,
        r.clients,
        r.all_back_seconds,
        r.p50_back_seconds,
        r.p99_back_seconds,
        r.attempts,
        r.refused_with_retry_after,
        r.backend.authenticate,
        r.backend.distinct_keys,
        r.backend.max_calls_per_key,
        r.backend.max_in_flight,
        r.server_cpu_seconds,
        if r.within_limit { "yes" } else { "NO" }
    );
    md += &md_tail;
    if !r.errors.is_empty() {
        let _ = writeln!(md, "\nFailed attempts: {:?}.", r.errors);
    }
    out.write_md(&md)?;
    out.write_json(&Envelope {
        scenario: "backend-storm",
        target: match c.target {
            client::Target::Wsgate => "wsgate",
            client::Target::Socketio => "socketio",
        },
        started_at: report::utc_now(),
        command: report::command_line(),
        machine,
        params: serde_json::json!({
            "connections": a.connections, "retry_seconds": a.retry, "deadline_seconds": a.deadline,
            "limit_seconds": a.limit, "concurrency": a.concurrency, "nodes": c.url.len(),
            "hold_seconds": a.hold
        }),
        results: &r,
    })?;
    if r.connected == 0 {
        bail!("backend-storm: no client could connect: {:?}", r.errors);
    }
    // The admission checks concern wsgate; the Socket.IO peer has no back-end admission, so
    // against it the figures are reported, not judged.
    if c.target != client::Target::Wsgate {
        return Ok(());
    }
    if !r.within_concurrency {
        bail!(
            "backend-storm: {} back-end calls at once, more than the node's {}",
            r.backend.max_in_flight,
            a.concurrency
        );
    }
    if !r.one_call_per_key {
        bail!(
            "backend-storm: {} calls for {} keys (most-asked key: {})",
            r.backend.authenticate,
            a.connections,
            r.backend.max_calls_per_key
        );
    }
    Ok(())
}
