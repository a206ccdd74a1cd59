//! The idle, fanout, chat and storm scenarios.

use crate::client::{self, ClientSpec, Endpoint, Shared, Target};
use crate::common::{self, backend_stats, http_client, open_pool, Common};
use crate::floor::{self, FloorResult};
use crate::report::{self, line_chart, machine_md, Envelope, Output, Series};
use crate::sampler::{CPU_SPLIT_SAMPLED, CPU_SPLIT_TICKS};
use crate::stats::{self, now_us, LatencySummary};
use anyhow::{bail, Context};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn target_name(t: Target) -> &'static str {
    match t {
        Target::Wsgate => "wsgate",
        Target::Socketio => "socketio",
    }
}

fn specs(
    c: &Common,
    n: usize,
    endpoint: Endpoint,
    user: impl Fn(usize) -> String,
    node: impl Fn(usize) -> usize,
) -> anyhow::Result<Vec<ClientSpec>> {
    let nodes = c.nodes()?;
    if nodes.is_empty() {
        bail!("--url names no node");
    }
    Ok((0..n)
        .map(|i| ClientSpec {
            target: c.target,
            endpoint,
            node: nodes[node(i) % nodes.len()].clone(),
            user: user(i),
            index: i,
            source_ips: c.source_ips,
        })
        .collect())
}

fn kib(b: f64) -> f64 {
    (b / 1024.0 * 100.0).round() / 100.0
}

// ---------------------------------------------------------------- idle

#[derive(clap::Args, Clone, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Distinct users (keys); connection i belongs to user i % keys. Default: one per connection.
    #[arg(long)]
    pub keys: Option<usize>,
    /// Seconds to hold the connections before reading the server's RSS.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
}

#[derive(Serialize)]
struct IdleParams {
    connections: usize,
    keys: usize,
    hold_seconds: f64,
    nodes: usize,
}

#[derive(Serialize)]
pub struct IdleResult {
    pub connected: usize,
    pub failed: usize,
    pub errors: BTreeMap<String, usize>,
    pub connect_seconds: f64,
    pub connects_per_second: f64,
    pub backend_auth_calls: u64,
    pub server_rss_before_bytes: u64,
    pub server_rss_after_bytes: u64,
    pub server_bytes_per_connection: f64,
    pub server_kib_per_connection: f64,
    pub server_cpu_seconds_connecting: f64,
    pub server_disconnects: u64,
}

pub async fn idle(a: IdleArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let machine = stats::machine();
    let keys = a.keys.unwrap_or(a.connections).max(1);
    let server = c.server();
    let http = http_client();
    let b0 = backend_stats(&http, &c.backend_url)
        .await
        .context("back-end /stats")?;
    let s0 = server.sample().await.context("server process")?;
    let shared = Shared::new();
    let prefix = c.user_prefix.clone();
    let sp = specs(
        c,
        a.connections,
        Endpoint::Notifications,
        |i| format!("{prefix}{}", i % keys),
        |i| i,
    )?;
    eprintln!("idle: opening {} connections", a.connections);
    let pool = open_pool(
        sp,
        c.connect_concurrency,
        Duration::from_secs_f64(c.connect_timeout),
        &shared,
        false,
        "idle",
    )
    .await;
    let s_conn = server.sample().await?;
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    let s1 = server.sample().await?;
    let b1 = backend_stats(&http, &c.backend_url).await?;
    let disconnects = shared.disconnects.load(Ordering::Relaxed);
    let connected = pool.connected;
    let r = IdleResult {
        connected,
        failed: pool.failed,
        errors: pool.errors.clone(),
        connect_seconds: pool.elapsed.as_secs_f64(),
        connects_per_second: connected as f64 / pool.elapsed.as_secs_f64().max(1e-9),
        backend_auth_calls: b1.authenticate - b0.authenticate,
        server_rss_before_bytes: s0.rss_bytes,
        server_rss_after_bytes: s1.rss_bytes,
        server_bytes_per_connection: (s1.rss_bytes as f64 - s0.rss_bytes as f64)
            / connected.max(1) as f64,
        server_kib_per_connection: kib(
            (s1.rss_bytes as f64 - s0.rss_bytes as f64) / connected.max(1) as f64
        ),
        server_cpu_seconds_connecting: s_conn.cpu_seconds - s0.cpu_seconds,
        server_disconnects: disconnects,
    };
    pool.close(Duration::from_secs(10)).await;
    eprintln!(
        "idle: {} connected ({} failed) in {:.2}s, {:.2} KiB RSS per connection, {} back-end calls",
        r.connected, r.failed, r.connect_seconds, r.server_kib_per_connection, r.backend_auth_calls
    );
    let out = Output {
        dir: &c.out,
        name: c.file_name("idle"),
    };
    let mut md = format!("# idle — {}\n\n", target_name(c.target));
    let _ = writeln!(md, "`{}`\n", report::command_line());
    md += &machine_md(&machine);
    let _ = writeln!(
        md,
        "\n| figure | value |\n| --- | --- |\n| connections held | {} of {} ({} failed: {:?}) |\n| connect time | {:.2} s ({:.0} connections/s) |\n| back-end Authenticate calls | {} ({} distinct keys) |\n| server RSS before / after | {:.1} MiB / {:.1} MiB |\n| **server RSS per connection** | **{:.2} KiB** ({:.0} bytes) |\n| server CPU while connecting | {:.2} s |\n| closed by the server while held | {} |",
        r.connected,
        a.connections,
        r.failed,
        r.errors,
        r.connect_seconds,
        r.connects_per_second,
        r.backend_auth_calls,
        keys,
        r.server_rss_before_bytes as f64 / 1048576.0,
        r.server_rss_after_bytes as f64 / 1048576.0,
        r.server_kib_per_connection,
        r.server_bytes_per_connection,
        r.server_cpu_seconds_connecting,
        r.server_disconnects
    );
    out.write_md(&md)?;
    out.write_json(&Envelope {
        scenario: "idle",
        target: target_name(c.target),
        started_at: report::utc_now(),
        command: report::command_line(),
        machine,
        params: IdleParams {
            connections: a.connections,
            keys,
            hold_seconds: a.hold,
            nodes: c.url.len(),
        },
        results: &r,
    })?;
    if r.connected == 0 {
        bail!("idle: no connection could be opened: {:?}", r.errors);
    }
    Ok(())
}

// ---------------------------------------------------------------- fanout

#[derive(clap::Args, Clone, Debug)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscribers (one user each), spread round-robin over the nodes.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Recipients per notification.
    #[arg(long, default_value_t = 1000)]
    pub recipients: usize,
    /// Delivery rates to run, in deliveries per second, ascending (a saturation sweep).
    #[arg(long, value_delimiter = ',', default_value = "50000,100000,200000")]
    pub rates: Vec<u64>,
    /// Seconds per rate step.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Consecutive notifications to the same recipients, sent at the same instant (1 = isolated
    /// deliveries; larger values queue several messages per connection at once). The rate
    /// stays the same: bursts come `burst` times less often.
    #[arg(long, default_value_t = 1)]
    pub burst: usize,
    /// Notification payload size in bytes (approximate; the JSON object forwarded to clients).
    #[arg(long, default_value_t = 200)]
    pub payload_size: usize,
    /// p99 latency limit of a passing step, milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub p99_limit_ms: f64,
    /// Keep stepping after a step that lost messages or missed the rate (by default the sweep
    /// stops there; steps over the latency limit alone do not stop it).
    #[arg(long)]
    pub no_stop: bool,
    /// Publish requests in flight at most.
    #[arg(long, default_value_t = 64)]
    pub publish_concurrency: usize,
    /// Seconds of the in-run floor measurement (0 = skip).
    #[arg(long, default_value_t = 3.0)]
    pub floor_seconds: f64,
    /// Writes per second of the floor measurement (default: the first rate step).
    #[arg(long)]
    pub floor_rate: Option<u64>,
    /// Seconds of unrecorded warm-up at the first rate before the sweep.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Seconds of `strace -c -f` attached to every `--pid` in the middle of a separate step at
    /// `--strace-rate`, run after the warm-up and before the sweep, to count socket write calls
    /// per delivery (0 = no such step). That step is not one of the CPU-measured steps.
    #[arg(long, default_value_t = 0.0)]
    pub strace_seconds: f64,
    /// Deliveries per second of the strace step (default: the first rate).
    #[arg(long)]
    pub strace_rate: Option<u64>,
}

#[derive(Clone, Copy, PartialEq)]
enum StepKind {
    Warmup,
    Strace,
    Measured,
}

/// Step number of the strace step (in the payloads' `step=` marker).
const STRACE_STEP: u64 = 1000;

#[derive(Serialize)]
struct FanoutParams {
    connections: usize,
    recipients: usize,
    rates: Vec<u64>,
    duration_seconds: f64,
    burst: usize,
    payload_size: usize,
    p99_limit_ms: f64,
    warmup_seconds: f64,
    strace_seconds: f64,
    nodes: usize,
}

#[derive(Serialize, Clone)]
pub struct FanoutStep {
    pub target_deliveries_per_second: u64,
    pub publishes_per_second: f64,
    pub publishes_sent: u64,
    pub publish_errors: u64,
    pub publish_achieved_ratio: f64,
    pub expected: u64,
    pub received: u64,
    pub lost: i64,
    pub deliveries_per_second: f64,
    pub latency: LatencySummary,
    pub server_cpu_seconds: f64,
    pub server_cpu_us_per_delivery: f64,
    /// User-space and kernel parts of it (0 without --pid): the total split by the share of
    /// perf's CPU-clock samples in user space (`sampler.rs`), or by /proc/PID/stat's tick-based
    /// utime and stime where perf cannot sample; `cpu_split` says which.
    pub server_user_us_per_delivery: f64,
    pub server_system_us_per_delivery: f64,
    pub cpu_split: &'static str,
    pub cpu_samples_user: u64,
    pub cpu_samples_kernel: u64,
    /// The tick-based split of /proc/PID/stat, recorded for comparison.
    pub proc_user_us_per_delivery: f64,
    pub proc_system_us_per_delivery: f64,
    /// `write`/`writev` calls of the server per delivery (/proc/PID/io `syscw`, which does not
    /// count `send`/`sendto`: not the socket writes; 0 without --pid).
    pub server_write_syscalls_per_delivery: f64,
    /// The floor measured in this run at this step's rate.
    pub floor_us_per_write: Option<f64>,
    pub ratio_to_floor: Option<f64>,
    pub loadgen_cpu_seconds: f64,
    pub server_rss_bytes: u64,
    pub passed: bool,
}

#[derive(Serialize)]
pub struct FanoutResult {
    pub connected: usize,
    pub failed: usize,
    pub connect_seconds: f64,
    pub floor: Option<FloorResult>,
    /// The floor at each rate of the sweep.
    pub floors: Vec<FloorResult>,
    pub steps: Vec<FanoutStep>,
    /// Highest rate with no loss and p99 under the limit.
    pub saturation_deliveries_per_second: Option<u64>,
    /// Highest rate delivered without loss, whatever the latency.
    pub lossless_max_deliveries_per_second: Option<u64>,
    pub server_disconnects: u64,
    /// Socket write calls per delivery, counted (perf stat, else strace) in a separate step.
    pub syscalls: Option<crate::strace::SyscallCount>,
}

fn pad_to(s: &mut String, size: usize) {
    while s.len() < size {
        s.push('x');
    }
}

pub async fn fanout(a: FanoutArgs) -> anyhow::Result<()> {
    let c = &a.common;
    if a.recipients == 0 || a.recipients > a.connections {
        bail!("--recipients must be between 1 and --connections");
    }
    if c.admin_url.is_empty() {
        bail!("--admin-url names no node");
    }
    let machine = stats::machine();
    // The floor at every rate of the sweep (or at --floor-rate), same socket count.
    let floors: Vec<FloorResult> = if a.floor_seconds > 0.0 {
        let rates = match a.floor_rate {
            Some(r) => vec![r],
            None => a.rates.clone(),
        };
        eprintln!(
            "fanout: floor with {} socket pairs at {:?} writes/s",
            a.connections, rates
        );
        let v = floor::measure_rates(
            &floor::FloorParams {
                connections: a.connections,
                rate: rates.first().copied().unwrap_or(100_000),
                duration: a.floor_seconds,
                size: a.payload_size,
                source_ips: c.source_ips,
                parked_reader: true,
            },
            &rates,
        )
        .await?;
        for f in &v {
            eprintln!(
                "fanout: floor at {} writes/s (reached {:.0}): {:.2} us per write",
                f.target_writes_per_second, f.writes_per_second, f.us_per_write
            );
        }
        v
    } else {
        Vec::new()
    };
    let floor_for = |rate: u64| -> Option<FloorResult> {
        floors
            .iter()
            .find(|f| f.target_writes_per_second == rate)
            .or_else(|| floors.first())
            .cloned()
    };
    let floor_res = floors.first().cloned();
    let server = c.server();
    let shared = Shared::new();
    let prefix = c.user_prefix.clone();
    let sp = specs(
        c,
        a.connections,
        Endpoint::Notifications,
        |i| format!("{prefix}{i}"),
        |i| i,
    )?;
    eprintln!("fanout: opening {} subscribers", a.connections);
    let pool = open_pool(
        sp,
        c.connect_concurrency,
        Duration::from_secs_f64(c.connect_timeout),
        &shared,
        false,
        "fanout",
    )
    .await;
    if pool.connected < a.connections {
        eprintln!(
            "fanout: only {} of {} connected: {:?}",
            pool.connected, a.connections, pool.errors
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Recipient groups: user ids of consecutive blocks, prebuilt as JSON arrays.
    let groups = a.connections.div_ceil(a.recipients);
    let group_json: Arc<Vec<String>> = Arc::new(
        (0..groups)
            .map(|g| {
                let ids: Vec<String> = (0..a.recipients)
                    .map(|k| format!("{prefix}{}", (g * a.recipients + k) % a.connections))
                    .collect();
                serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into())
            })
            .collect(),
    );
    // Users that are connected (expected deliveries only count those).
    let http = http_client();
    let mut steps: Vec<FanoutStep> = Vec::new();
    let mut saturation = None;
    let mut lossless_max = None;
    let mut syscalls = None;
    let mut plan: Vec<(u64, u64, f64, StepKind)> = Vec::new();
    if a.warmup > 0.0 {
        if let Some(first) = a.rates.first() {
            plan.push((0, *first, a.warmup, StepKind::Warmup));
        }
    }
    if a.strace_seconds > 0.0 {
        if let Some(rate) = a.strace_rate.or(a.rates.first().copied()) {
            // Lead and tail of 1.5 s around the traced window.
            let d = a.duration.max(a.strace_seconds + 3.0);
            plan.push((STRACE_STEP, rate, d, StepKind::Strace));
        }
    }
    for (si, rate) in a.rates.iter().copied().enumerate() {
        plan.push((si as u64 + 1, rate, a.duration, StepKind::Measured));
    }
    for (step_no, rate, duration, kind) in plan {
        shared.step.store(step_no, Ordering::Relaxed);
        shared.latency.reset();
        shared.received.store(0, Ordering::Relaxed);
        let pps = rate as f64 / a.recipients as f64;
        let total = (pps * duration).round().max(1.0) as u64;
        eprintln!(
            "fanout: step {step_no}{}: {rate} deliveries/s = {pps:.1} publishes/s x {} recipients, burst {}",
            match kind {
                StepKind::Warmup => " (warm-up, not recorded)",
                StepKind::Strace => " (write calls counted with perf stat or strace; CPU not recorded)",
                StepKind::Measured => "",
            },
            a.recipients, a.burst
        );
        let tracer = if kind == StepKind::Strace {
            let pids = server.pids().to_vec();
            let shared = shared.clone();
            let (lead, window) = ((duration - a.strace_seconds) / 2.0, a.strace_seconds);
            Some(tokio::spawn(async move {
                count_syscalls(&pids, &shared, rate, lead, window).await
            }))
        } else {
            None
        };
        // The user/kernel split of a measured step comes from CPU-clock samples (`sampler.rs`).
        let sampler = if kind == StepKind::Measured {
            crate::sampler::start(server.pids(), &format!("step{step_no}")).await
        } else {
            None
        };
        let s0 = server.sample().await?;
        let l0 = stats::self_cpu_seconds();
        let accepted = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let sem = Arc::new(tokio::sync::Semaphore::new(a.publish_concurrency.max(1)));
        let start = Instant::now();
        let mut sent = 0u64;
        let mut tasks = Vec::with_capacity(total as usize);
        while sent < total {
            // A burst's notifications are due at the same instant (and sent back to back), so
            // they reach each recipient together; bursts are spread evenly over the step.
            let burst = a.burst.max(1) as u64;
            let bursts_due = (start.elapsed().as_secs_f64() * pps / burst as f64) as u64 + 1;
            let due = (bursts_due * burst).min(total);
            while sent < due {
                let permit = match sem.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break,
                };
                let group = (sent as usize / a.burst.max(1)) % groups;
                let mut msg = format!("step={step_no} seq={sent} ts={} ", now_us());
                pad_to(&mut msg, a.payload_size.saturating_sub(90));
                let body = format!(
                    r#"{{"userIds":{},"notification":{{"topic":"load","title":"load test","type":"info","message":{{"lt":"{msg}"}}}}}}"#,
                    group_json[group]
                );
                let admin = &c.admin_url[sent as usize % c.admin_url.len()];
                let req = http
                    .post(format!("{admin}/api/v1/notifications"))
                    .bearer_auth(&c.api_token)
                    .header("content-type", "application/json")
                    .body(body);
                let accepted = accepted.clone();
                let errors = errors.clone();
                tasks.push(tokio::spawn(async move {
                    match req.send().await {
                        Ok(r) if r.status().is_success() => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    drop(permit);
                }));
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let publish_elapsed = start.elapsed().as_secs_f64();
        futures_util::future::join_all(tasks).await;
        let expected = accepted.load(Ordering::Relaxed) * a.recipients as u64;
        let drain_deadline = Instant::now() + Duration::from_secs(5);
        while shared.received.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Settle: count late duplicates or stragglers too.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s1 = server.sample().await?;
        let l1 = stats::self_cpu_seconds();
        let samples = match sampler {
            Some(s) => match s.stop().await {
                Ok(split) => Some(split),
                Err(e) => {
                    eprintln!(
                        "fanout: CPU samples of step {step_no} lost ({e:#}); /proc split used"
                    );
                    None
                }
            },
            None => None,
        };
        let received = shared.received.load(Ordering::Relaxed);
        let lat = shared.latency.snapshot().summary(true);
        let cpu = s1.cpu_seconds - s0.cpu_seconds;
        let per = cpu * 1e6 / received.max(1) as f64;
        let proc_user = (s1.user_seconds - s0.user_seconds) * 1e6 / received.max(1) as f64;
        let proc_system = (s1.system_seconds - s0.system_seconds) * 1e6 / received.max(1) as f64;
        let (user_us, system_us, cpu_split) = match samples.and_then(|s| s.user_share()) {
            Some(share) => (per * share, per * (1.0 - share), CPU_SPLIT_SAMPLED),
            None => (proc_user, proc_system, CPU_SPLIT_TICKS),
        };
        let achieved = (sent as f64 / publish_elapsed.max(1e-9)) / pps;
        let errs = errors.load(Ordering::Relaxed);
        let lost = expected as i64 - received as i64;
        let passed = lost == 0 && errs == 0 && lat.p99_ms <= a.p99_limit_ms && achieved >= 0.95;
        let step = FanoutStep {
            target_deliveries_per_second: rate,
            publishes_per_second: pps,
            publishes_sent: sent,
            publish_errors: errs,
            publish_achieved_ratio: (achieved * 1000.0).round() / 1000.0,
            expected,
            received,
            lost,
            deliveries_per_second: received as f64 / publish_elapsed.max(1e-9),
            latency: lat,
            server_cpu_seconds: cpu,
            server_cpu_us_per_delivery: per,
            server_user_us_per_delivery: user_us,
            server_system_us_per_delivery: system_us,
            cpu_split,
            cpu_samples_user: samples.map_or(0, |s| s.user),
            cpu_samples_kernel: samples.map_or(0, |s| s.kernel),
            proc_user_us_per_delivery: proc_user,
            proc_system_us_per_delivery: proc_system,
            server_write_syscalls_per_delivery: s1.write_syscalls.saturating_sub(s0.write_syscalls)
                as f64
                / received.max(1) as f64,
            floor_us_per_write: floor_for(rate).map(|f| f.us_per_write),
            ratio_to_floor: floor_for(rate).map(|f| per / f.us_per_write),
            loadgen_cpu_seconds: l1 - l0,
            server_rss_bytes: s1.rss_bytes,
            passed,
        };
        eprintln!(
            "fanout: step {step_no}: {:.0} deliveries/s, lost {}, p50 {:.2} ms p99 {:.2} ms max {:.1} ms, server {:.2} us/delivery (user {:.2}, kernel {:.2} by {}, {:.3} syscw){}, {}",
            step.deliveries_per_second,
            step.lost,
            step.latency.p50_ms,
            step.latency.p99_ms,
            step.latency.max_ms,
            step.server_cpu_us_per_delivery,
            step.server_user_us_per_delivery,
            step.server_system_us_per_delivery,
            step.cpu_split,
            step.server_write_syscalls_per_delivery,
            step.ratio_to_floor
                .map(|r| format!(" ({r:.2}x floor)"))
                .unwrap_or_default(),
            if passed { "PASS" } else { "FAIL" }
        );
        if let Some(t) = tracer {
            let c = t.await.unwrap_or_else(|e| crate::strace::SyscallCount {
                error: Some(format!("strace task: {e}")),
                ..Default::default()
            });
            eprintln!(
                "fanout: strace step: {} deliveries in {:.1} s, {:.3} socket write calls per delivery {:?}{}",
                c.deliveries,
                c.window_seconds,
                c.total_per_delivery,
                c.per_delivery,
                c.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
            );
            syscalls = Some(c);
        }
        if kind != StepKind::Measured {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let lossless = lost == 0 && errs == 0 && achieved >= 0.95;
        if passed {
            saturation = Some(rate);
        }
        if lossless {
            lossless_max = Some(rate);
        }
        steps.push(step);
        // Go on while every message arrives (latency may already be over the limit), so the
        // sweep shows both the latency limit and the throughput limit.
        if !lossless && !a.no_stop {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let disconnects = shared.disconnects.load(Ordering::Relaxed);
    let timeline: Vec<(f64, f64)> = {
        let end = shared.t0.elapsed().as_secs() as usize;
        (0..=end.min(shared.timeline.len() - 1))
            .map(|s| (s as f64, shared.timeline[s].load(Ordering::Relaxed) as f64))
            .collect()
    };
    let r = FanoutResult {
        connected: pool.connected,
        failed: pool.failed,
        connect_seconds: pool.elapsed.as_secs_f64(),
        floor: floor_res,
        floors: floors.clone(),
        steps,
        saturation_deliveries_per_second: saturation,
        lossless_max_deliveries_per_second: lossless_max,
        server_disconnects: disconnects,
        syscalls,
    };
    pool.close(Duration::from_secs(10)).await;

    let out = Output {
        dir: &c.out,
        name: c.file_name("fanout"),
    };
    let lat_series: Vec<Series> = r
        .steps
        .iter()
        .map(|s| Series {
            name: format!("{}k/s", s.target_deliveries_per_second / 1000),
            points: s
                .latency
                .cdf
                .iter()
                .map(|(x, y)| (x.max(0.001), *y))
                .collect(),
        })
        .collect();
    let lat_svg = out.write_svg(
        "latency",
        &line_chart(
            &format!("fanout latency distribution — {}", target_name(c.target)),
            "delivery latency (ms, log scale)",
            "fraction of deliveries",
            &lat_series,
            true,
        ),
    )?;
    let tp_svg = out.write_svg(
        "throughput",
        &line_chart(
            &format!("deliveries per second — {}", target_name(c.target)),
            "seconds since start",
            "deliveries / s",
            &[Series {
                name: "received".into(),
                points: timeline,
            }],
            false,
        ),
    )?;
    let mut md = format!(
        "# fanout — {} (burst {})\n\n`{}`\n\n",
        target_name(c.target),
        a.burst,
        report::command_line()
    );
    md += &machine_md(&machine);
    let _ = writeln!(
        md,
        "\n{} subscribers ({} failed to connect) on {} node(s), {} recipients per notification, ~{} byte payload, {} s per step.\n",
        r.connected,
        r.failed,
        c.url.len(),
        a.recipients,
        a.payload_size,
        a.duration
    );
    if let Some(f) = &r.floor {
        let _ = writeln!(
            md,
            "Floor (same run): {} loopback socket pairs, one {}-byte write() per message, at each step's rate (column *floor*); 16 messages per write() cost {:.2} µs per message.\n",
            f.connections, f.size, f.coalesced_us_per_message
        );
    }
    md += "| target/s | achieved/s | lost | p50 ms | p90 ms | p99 ms | max ms | server µs/delivery | floor µs/write | vs floor | result |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for s in &r.steps {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} | {} | {} | {} |",
            s.target_deliveries_per_second,
            s.deliveries_per_second,
            s.lost,
            s.latency.p50_ms,
            s.latency.p90_ms,
            s.latency.p99_ms,
            s.latency.max_ms,
            s.server_cpu_us_per_delivery,
            s.floor_us_per_write
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "-".into()),
            s.ratio_to_floor
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into()),
            if s.passed { "pass" } else { "FAIL" }
        );
    }
    let _ = writeln!(
        md,
        "\nSaturation (no loss, p99 ≤ {} ms): **{}**. Highest rate without loss (any latency): **{}**.\n\n![latency]({lat_svg})\n![throughput]({tp_svg})",
        a.p99_limit_ms,
        r.saturation_deliveries_per_second
            .map(|v| format!("{v} deliveries/s"))
            .unwrap_or_else(|| "no step passed".into()),
        r.lossless_max_deliveries_per_second
            .map(|v| format!("{v} deliveries/s"))
            .unwrap_or_else(|| "none".into())
    );
    if let Some(sc) = &r.syscalls {
        let _ = writeln!(
            md,
            "\nSocket write calls (separate step at {}/s, {} counting {} on {} process(es) for {:.1} s): {:.3} per delivery (bounds {:.3}–{:.3}) over {} deliveries: {:?}{}",
            sc.target_deliveries_per_second,
            sc.tool,
            crate::strace::CALLS,
            sc.processes,
            sc.window_seconds,
            sc.total_per_delivery,
            sc.total_per_delivery_bounds.0,
            sc.total_per_delivery_bounds.1,
            sc.deliveries,
            sc.calls,
            sc.error.as_deref().map(|e| format!(" (error: {e})")).unwrap_or_default()
        );
    }
    out.write_md(&md)?;
    // Drop the CDF points from the JSON's steps only where huge; keep them (they are small).
    out.write_json(&Envelope {
        scenario: "fanout",
        target: target_name(c.target),
        started_at: report::utc_now(),
        command: report::command_line(),
        machine,
        params: FanoutParams {
            connections: a.connections,
            recipients: a.recipients,
            rates: a.rates.clone(),
            duration_seconds: a.duration,
            burst: a.burst,
            payload_size: a.payload_size,
            p99_limit_ms: a.p99_limit_ms,
            warmup_seconds: a.warmup,
            strace_seconds: a.strace_seconds,
            nodes: c.url.len(),
        },
        results: &r,
    })?;
    if r.steps.iter().all(|s| s.received == 0) {
        bail!("fanout: no notification was delivered");
    }
    Ok(())
}

/// Counts the socket write calls of `pids` over `window` seconds starting `lead` seconds into a
/// step, and the deliveries the clients received meanwhile.
async fn count_syscalls(
    pids: &[u32],
    shared: &Shared,
    rate: u64,
    lead: f64,
    window: f64,
) -> crate::strace::SyscallCount {
    let mut c = crate::strace::SyscallCount {
        target_deliveries_per_second: rate,
        processes: pids.len(),
        ..Default::default()
    };
    if pids.is_empty() {
        c.error = Some("no --pid given".into());
        return c;
    }
    tokio::time::sleep(Duration::from_secs_f64(lead.max(0.0))).await;
    // strace counts from its attachment to its detachment, which take a while under load: the
    // deliveries are counted both over the inner window (attached … detach asked) and the outer
    // one (strace started … strace exited); the traced window lies between the two.
    let outer0 = shared.received.load(Ordering::Relaxed);
    let tracer = match crate::strace::attach(pids, Duration::from_millis(300)).await {
        Ok(t) => t,
        Err(e) => {
            c.error = Some(format!("{e:#}"));
            return c;
        }
    };
    c.tool = tracer.tool().to_owned();
    let r0 = shared.received.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let r1 = shared.received.load(Ordering::Relaxed);
    c.window_seconds = t0.elapsed().as_secs_f64();
    let detached = tracer.detach().await;
    let outer1 = shared.received.load(Ordering::Relaxed);
    c.deliveries_inner = r1.saturating_sub(r0);
    c.deliveries_outer = outer1.saturating_sub(outer0);
    c.deliveries = (c.deliveries_inner + c.deliveries_outer) / 2;
    match detached {
        Ok(calls) => {
            let d = c.deliveries.max(1) as f64;
            let total = calls.values().sum::<u64>() as f64;
            c.per_delivery = calls
                .iter()
                .map(|(k, v)| (k.clone(), *v as f64 / d))
                .collect();
            c.total_per_delivery = total / d;
            c.total_per_delivery_bounds = (
                total / c.deliveries_outer.max(1) as f64,
                total / c.deliveries_inner.max(1) as f64,
            );
            c.calls = calls;
        }
        Err(e) => c.error = Some(format!("{e:#}")),
    }
    c
}

// ---------------------------------------------------------------- chat

#[derive(clap::Args, Clone, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: Common,
    /// Pairs of users; in pair i user A is on node i and user B on node i+1.
    #[arg(long, default_value_t = 500)]
    pub pairs: usize,
    /// Chat message rates to run, messages per second in total.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
    pub rates: Vec<u64>,
    /// Seconds per rate step.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
}

#[derive(Serialize)]
pub struct ChatStep {
    pub target_messages_per_second: u64,
    pub sent: u64,
    pub send_failures: u64,
    pub received: u64,
    pub lost: i64,
    pub messages_per_second: f64,
    pub latency: LatencySummary,
    pub server_cpu_seconds: f64,
    pub server_cpu_us_per_message: f64,
    pub passed: bool,
}

#[derive(Serialize)]
pub struct ChatResult {
    pub connected: usize,
    pub failed: usize,
    pub backend_chat_room_calls: u64,
    pub warmup_received: u64,
    pub steps: Vec<ChatStep>,
}

pub async fn chat(a: ChatArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let machine = stats::machine();
    let nodes = c.url.len().max(1);
    let prefix = c.user_prefix.clone();
    let user = |i: usize| {
        let pair = i / 2;
        if i % 2 == 0 {
            format!("{prefix}a{pair}")
        } else {
            format!("{prefix}b{pair}")
        }
    };
    let sp = specs(c, a.pairs * 2, Endpoint::Chat, user, |i| (i / 2) + (i % 2))?;
    let server = c.server();
    let http = http_client();
    let b0 = backend_stats(&http, &c.backend_url).await?;
    let shared = Shared::new();
    eprintln!(
        "chat: opening {} connections on {nodes} node(s)",
        a.pairs * 2
    );
    let pool = open_pool(
        sp,
        c.connect_concurrency,
        Duration::from_secs_f64(c.connect_timeout),
        &shared,
        true,
        "chat",
    )
    .await;
    let senders = pool.senders.clone();
    let room = |pair: usize| format!("pair-{prefix}a{pair}-{prefix}b{pair}");
    // Warm-up (step 1000): one message per room so room look-ups are cached.
    shared.step.store(1000, Ordering::Relaxed);
    for pair in 0..a.pairs {
        if let Some(Some(tx)) = senders.get(pair * 2) {
            let content = format!("lt step=1000 seq={pair} ts={}", now_us());
            let _ = tx
                .send(client::chat_frame(c.target, &room(pair), &content))
                .await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let warmup_received = shared.received.load(Ordering::Relaxed);
    let mut steps = Vec::new();
    for (si, rate) in a.rates.iter().copied().enumerate() {
        let step_no = si as u64 + 1;
        shared.step.store(step_no, Ordering::Relaxed);
        shared.latency.reset();
        shared.received.store(0, Ordering::Relaxed);
        let total = (rate as f64 * a.duration).round() as u64;
        let s0 = server.sample().await?;
        let start = Instant::now();
        let (mut sent, mut failures, mut k) = (0u64, 0u64, 0u64);
        while k < total {
            let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
            while k < due {
                let pair = (k as usize) % a.pairs;
                let side = (k as usize / a.pairs) % 2;
                let content = format!("lt step={step_no} seq={k} ts={}", now_us());
                match senders.get(pair * 2 + side) {
                    Some(Some(tx)) => {
                        if tx
                            .try_send(client::chat_frame(c.target, &room(pair), &content))
                            .is_ok()
                        {
                            sent += 1;
                        } else {
                            failures += 1;
                        }
                    }
                    _ => failures += 1,
                }
                k += 1;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let deadline = Instant::now() + Duration::from_secs(5);
        while shared.received.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s1 = server.sample().await?;
        let received = shared.received.load(Ordering::Relaxed);
        let lat = shared.latency.snapshot().summary(true);
        let cpu = s1.cpu_seconds - s0.cpu_seconds;
        let lost = sent as i64 - received as i64;
        let passed = lost == 0 && failures == 0 && lat.p99_ms <= 50.0;
        eprintln!(
            "chat: step {step_no}: {rate} msg/s, lost {lost}, p50 {:.2} ms p99 {:.2} ms, {}",
            lat.p50_ms,
            lat.p99_ms,
            if passed { "PASS" } else { "FAIL" }
        );
        steps.push(ChatStep {
            target_messages_per_second: rate,
            sent,
            send_failures: failures,
            received,
            lost,
            messages_per_second: received as f64 / elapsed.max(1e-9),
            latency: lat,
            server_cpu_seconds: cpu,
            server_cpu_us_per_message: cpu * 1e6 / received.max(1) as f64,
            passed,
        });
    }
    let b1 = backend_stats(&http, &c.backend_url).await?;
    let r = ChatResult {
        connected: pool.connected,
        failed: pool.failed,
        backend_chat_room_calls: b1.chat_room - b0.chat_room,
        warmup_received,
        steps,
    };
    pool.close(Duration::from_secs(10)).await;
    let out = Output {
        dir: &c.out,
        name: c.file_name("chat"),
    };
    let lat_svg = out.write_svg(
        "latency",
        &line_chart(
            &format!("chat latency distribution — {}", target_name(c.target)),
            "latency (ms, log scale)",
            "fraction of messages",
            &r.steps
                .iter()
                .map(|s| Series {
                    name: format!("{} msg/s", s.target_messages_per_second),
                    points: s
                        .latency
                        .cdf
                        .iter()
                        .map(|(x, y)| (x.max(0.001), *y))
                        .collect(),
                })
                .collect::<Vec<_>>(),
            true,
        ),
    )?;
    let mut md = format!(
        "# chat — {}\n\n`{}`\n\n",
        target_name(c.target),
        report::command_line()
    );
    md += &machine_md(&machine);
    let _ = writeln!(
        md,
        "\n{} pairs ({} connections, {} failed) over {nodes} node(s); each pair's users on different nodes when there are several. Back-end ChatRoom calls: {}.\n\n| target msg/s | achieved | lost | p50 ms | p99 ms | max ms | server µs/message | result |\n| --- | --- | --- | --- | --- | --- | --- | --- |",
        a.pairs, r.connected, r.failed, r.backend_chat_room_calls
    );
    for s in &r.steps {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {:.2} | {:.2} | {:.1} | {:.2} | {} |",
            s.target_messages_per_second,
            s.messages_per_second,
            s.lost,
            s.latency.p50_ms,
            s.latency.p99_ms,
            s.latency.max_ms,
            s.server_cpu_us_per_message,
            if s.passed { "pass" } else { "FAIL" }
        );
    }
    let _ = writeln!(md, "\n![latency]({lat_svg})");
    out.write_md(&md)?;
    out.write_json(&Envelope {
        scenario: "chat",
        target: target_name(c.target),
        started_at: report::utc_now(),
        command: report::command_line(),
        machine,
        params: serde_json::json!({
            "pairs": a.pairs, "rates": a.rates, "duration_seconds": a.duration, "nodes": nodes
        }),
        results: &r,
    })?;
    if r.steps.iter().all(|s| s.received == 0) {
        bail!("chat: no message was delivered");
    }
    Ok(())
}

// ---------------------------------------------------------------- storm

#[derive(clap::Args, Clone, Debug)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Clients.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Distinct keys (users); client i uses key i % keys.
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// Window over which the clients (re)connect, seconds (random start in the window).
    #[arg(long, default_value_t = 1.0)]
    pub spread: f64,
    /// Give up on a client after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub deadline: f64,
    /// Target for "all back", seconds.
    #[arg(long, default_value_t = 5.0)]
    pub limit: f64,
}

#[derive(Serialize)]
pub struct Wave {
    pub clients: usize,
    pub connected: usize,
    pub gave_up: usize,
    pub attempts: u64,
    pub retries: u64,
    pub errors: BTreeMap<String, usize>,
    /// Seconds from the first attempt until the last client was connected and subscribed.
    pub all_back_seconds: f64,
    pub p50_back_seconds: f64,
    pub p99_back_seconds: f64,
    pub backend_auth_calls: u64,
    pub server_cpu_seconds: f64,
    pub within_limit: bool,
}

#[derive(Serialize)]
pub struct StormResult {
    /// First wave: a node that has never seen these keys (as the survivor of a node loss).
    pub cold: Wave,
    /// Second wave: every client dropped abruptly and reconnected to the same node.
    pub warm: Wave,
    pub distinct_keys: usize,
}

async fn wave(
    c: &Common,
    a: &StormArgs,
    seed: u64,
    shared: &Arc<Shared>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Wave, Vec<tokio::task::JoinHandle<bool>>)> {
    let prefix = c.user_prefix.clone();
    let keys = a.keys.max(1);
    let sp = specs(
        c,
        a.connections,
        Endpoint::Notifications,
        |i| format!("{prefix}{}", i % keys),
        |i| i,
    )?;
    let http = http_client();
    let server = c.server();
    let b0 = backend_stats(&http, &c.backend_url).await?;
    let s0 = server.sample().await?;
    let start = Instant::now();
    let spread = a.spread.max(0.0);
    let deadline = Duration::from_secs_f64(a.deadline);
    let timeout = Duration::from_secs_f64(c.connect_timeout.min(a.deadline));
    let mut joins = Vec::with_capacity(sp.len());
    for (i, spec) in sp.into_iter().enumerate() {
        let r = common::mix(seed ^ i as u64);
        let offset = Duration::from_secs_f64(spread * (r % 1_000_000) as f64 / 1_000_000.0);
        joins.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut attempts = 0u64;
            let mut errs: Vec<String> = Vec::new();
            let mut backoff = 0.1f64;
            loop {
                attempts += 1;
                match client::establish(&spec, timeout).await {
                    Ok(ws) => return (Some((ws, start.elapsed())), attempts, errs),
                    Err(e) => errs.push(common::error_key(&e)),
                }
                if start.elapsed() >= deadline {
                    return (None, attempts, errs);
                }
                let jitter = (common::mix(r ^ attempts) % 1000) as f64 / 1000.0;
                tokio::time::sleep(Duration::from_secs_f64(backoff * (0.5 + jitter))).await;
                backoff = (backoff * 2.0).min(2.0);
            }
        }));
    }
    let mut times = Vec::new();
    let mut handles = Vec::new();
    let (mut attempts, mut gave_up) = (0u64, 0usize);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for j in joins {
        let (ws, att, errs) = j.await?;
        attempts += att;
        for e in errs {
            *errors.entry(e).or_default() += 1;
        }
        match ws {
            Some((ws, t)) => {
                times.push(t.as_secs_f64());
                handles.push(tokio::spawn(client::drive(
                    ws,
                    c.target,
                    shared.clone(),
                    stop.clone(),
                    None,
                    true,
                )));
            }
            None => gave_up += 1,
        }
    }
    let s1 = server.sample().await?;
    let b1 = backend_stats(&http, &c.backend_url).await?;
    times.sort_by(|x, y| x.total_cmp(y));
    let q = |p: f64| -> f64 {
        if times.is_empty() {
            return 0.0;
        }
        let i = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1;
        times[i]
    };
    let all_back = if gave_up == 0 { q(1.0) } else { f64::INFINITY };
    let w = Wave {
        clients: a.connections,
        connected: times.len(),
        gave_up,
        attempts,
        retries: attempts - a.connections as u64,
        errors,
        all_back_seconds: if all_back.is_finite() { all_back } else { -1.0 },
        p50_back_seconds: q(0.5),
        p99_back_seconds: q(0.99),
        backend_auth_calls: b1.authenticate - b0.authenticate,
        server_cpu_seconds: s1.cpu_seconds - s0.cpu_seconds,
        within_limit: gave_up == 0 && all_back <= a.limit,
    };
    Ok((w, handles))
}

pub async fn storm(a: StormArgs) -> anyhow::Result<()> {
    let c = &a.common;
    let machine = stats::machine();
    let shared = Shared::new();
    eprintln!(
        "storm: {} clients, {} keys, spread {} s (cold wave)",
        a.connections, a.keys, a.spread
    );
    let (stop1_tx, stop1_rx) = tokio::sync::watch::channel(false);
    let (cold, handles) = wave(c, &a, 1, &shared, &stop1_rx).await?;
    eprintln!(
        "storm: cold: {}/{} back in {:.2} s, {} back-end calls, {} retries",
        cold.connected, cold.clients, cold.all_back_seconds, cold.backend_auth_calls, cold.retries
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Drop every client abruptly.
    let _ = stop1_tx.send(true);
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(handles),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (stop2_tx, stop2_rx) = tokio::sync::watch::channel(false);
    let (warm, handles) = wave(c, &a, 2, &shared, &stop2_rx).await?;
    eprintln!(
        "storm: warm: {}/{} back in {:.2} s, {} back-end calls, {} retries",
        warm.connected, warm.clients, warm.all_back_seconds, warm.backend_auth_calls, warm.retries
    );
    let _ = stop2_tx.send(true);
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(handles),
    )
    .await;
    let r = StormResult {
        cold,
        warm,
        distinct_keys: a.keys,
    };
    let out = Output {
        dir: &c.out,
        name: c.file_name("storm"),
    };
    let mut md = format!(
        "# storm — {}\n\n`{}`\n\n",
        target_name(c.target),
        report::command_line()
    );
    md += &machine_md(&machine);
    let _ = writeln!(
        md,
        "\n{} clients with {} distinct keys connect at random instants within {} s. The cold wave hits a node that has never seen the keys (as after a node loss); then every client is dropped abruptly and reconnects (warm wave).\n\n| wave | back | all back (s) | p50 (s) | p99 (s) | retries | back-end Authenticate calls | server CPU s | within {} s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        a.connections, a.keys, a.spread, a.limit
    );
    for (name, w) in [("cold", &r.cold), ("warm", &r.warm)] {
        let _ = writeln!(
            md,
            "| {name} | {}/{} | {:.2} | {:.2} | {:.2} | {} | {} | {:.2} | {} |",
            w.connected,
            w.clients,
            w.all_back_seconds,
            w.p50_back_seconds,
            w.p99_back_seconds,
            w.retries,
            w.backend_auth_calls,
            w.server_cpu_seconds,
            if w.within_limit { "yes" } else { "NO" }
        );
    }
    if !r.cold.errors.is_empty() || !r.warm.errors.is_empty() {
        let _ = writeln!(
            md,
            "\nFailed attempts: cold {:?}, warm {:?}.",
            r.cold.errors, r.warm.errors
        );
    }
    out.write_md(&md)?;
    out.write_json(&Envelope {
        scenario: "storm",
        target: target_name(c.target),
        started_at: report::utc_now(),
        command: report::command_line(),
        machine,
        params: serde_json::json!({
            "connections": a.connections, "keys": a.keys, "spread_seconds": a.spread,
            "limit_seconds": a.limit, "nodes": c.url.len()
        }),
        results: &r,
    })?;
    if r.cold.connected == 0 {
        bail!("storm: no client could connect: {:?}", r.cold.errors);
    }
    Ok(())
}
