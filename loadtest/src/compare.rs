//! Reads the result files of a run and writes the wsgate-versus-peer summary: per figure the
//! median over the rounds with its spread (min–max), the ratio of the medians, the 1-minute load
//! average over the runs behind it, and the method of the figure next to it.

use crate::report::{bar_chart, machine_md, Series};
use crate::stats::Machine;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Clone, Debug)]
pub struct CompareArgs {
    /// Directory holding the JSON results of the run.
    #[arg(long, default_value = "results")]
    pub dir: PathBuf,
    /// Base name of the summary files written into the directory.
    #[arg(long, default_value = "summary")]
    pub name: String,
}

const TARGETS: [&str; 2] = ["wsgate", "socketio"];

/// Median and spread of one figure over the rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stat(mut v: Vec<f64>) -> Option<Stat> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

fn cell(s: Option<Stat>, digits: usize) -> String {
    match s {
        None => "-".into(),
        Some(s) if s.n == 1 || s.min == s.max => {
            format!("{:.digits$} (n={})", s.median, s.n)
        }
        Some(s) => format!(
            "{:.digits$} ({:.digits$}–{:.digits$}, n={})",
            s.median, s.min, s.max, s.n
        ),
    }
}

fn stat_json(s: Option<Stat>) -> Value {
    match s {
        None => Value::Null,
        Some(s) => json!({"median": s.median, "min": s.min, "max": s.max, "rounds": s.n}),
    }
}

fn ratio(a: Option<Stat>, b: Option<Stat>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => Some(a.median / b.median),
        _ => None,
    }
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// One result file: its name (without `.json`), round (from a `-rN` suffix) and content.
struct Run {
    round: Option<u32>,
    v: Value,
}

struct Files {
    by_key: BTreeMap<(String, String), Vec<Run>>,
    machine: Option<Machine>,
}

fn round_of(stem: &str) -> Option<u32> {
    let (_, r) = stem.rsplit_once("-r")?;
    r.parse().ok()
}

/// The summary key of a result: the scenario, told apart by its parameters.
fn key_of(v: &Value) -> Option<String> {
    let s = v["scenario"].as_str()?;
    Some(match s {
        "fanout" if v["params"]["burst"].as_u64().unwrap_or(1) > 1 => "fanout-burst".into(),
        "backend-storm" if v["params"]["hold_seconds"].as_f64().unwrap_or(0.0) > 0.0 => {
            format!(
                "memory-{}",
                v["params"]["connections"].as_u64().unwrap_or(0)
            )
        }
        "floor" if v["params"]["parked_reader"].as_bool() == Some(false) => "floor-noreader".into(),
        "floor" => "floor-reader".into(),
        other => other.to_string(),
    })
}

fn load(dir: &PathBuf) -> anyhow::Result<Files> {
    let mut by_key: BTreeMap<(String, String), Vec<Run>> = BTreeMap::new();
    let mut machine = None;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let (Some(key), Some(t)) = (key_of(&v), v["target"].as_str()) else {
            continue;
        };
        if machine.is_none() {
            machine = serde_json::from_value(v["machine"].clone()).ok();
        }
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        by_key.entry((key, t.to_string())).or_default().push(Run {
            round: round_of(&stem),
            v,
        });
    }
    Ok(Files { by_key, machine })
}

impl Files {
    fn get(&self, key: &str, target: &str) -> &[Run] {
        self.by_key
            .get(&(key.to_string(), target.to_string()))
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    fn stat(&self, key: &str, target: &str, pick: impl Fn(&Value) -> Option<f64>) -> Option<Stat> {
        stat(
            self.get(key, target)
                .iter()
                .filter_map(|r| pick(&r.v))
                .collect(),
        )
    }

    /// The 1-minute load average at the start of the runs behind a figure (both targets).
    fn load(&self, keys: &[&str]) -> Option<Stat> {
        stat(
            keys.iter()
                .flat_map(|k| {
                    ["wsgate", "socketio", "kernel"]
                        .into_iter()
                        .flat_map(move |t| self.get(k, t))
                })
                .filter_map(|r| f(&r.v["machine"]["load_average_1m"]))
                .collect(),
        )
    }
}

/// The step of a fanout result at `rate`.
fn step_at(v: &Value, rate: u64) -> Option<&Value> {
    v["results"]["steps"]
        .as_array()?
        .iter()
        .find(|s| s["target_deliveries_per_second"].as_u64() == Some(rate))
}

/// Highest rate at which every round of both targets passed (no loss, rate reached, p99 under
/// the limit), so that both are compared at the same delivery rate (true); else the lowest rate
/// run (false).
fn reference_rate(files: &Files, key: &str) -> Option<(u64, bool)> {
    let mut rates: Vec<u64> = Vec::new();
    for t in TARGETS {
        for r in files.get(key, t) {
            for s in r.v["results"]["steps"].as_array().into_iter().flatten() {
                if let Some(x) = s["target_deliveries_per_second"].as_u64() {
                    if !rates.contains(&x) {
                        rates.push(x);
                    }
                }
            }
        }
    }
    rates.sort();
    let passed_everywhere = |rate: u64| {
        TARGETS.iter().all(|t| {
            let runs = files.get(key, t);
            !runs.is_empty()
                && runs.iter().all(|r| {
                    step_at(&r.v, rate).is_some_and(|s| s["passed"].as_bool() == Some(true))
                })
        })
    };
    rates
        .iter()
        .rev()
        .copied()
        .find(|r| passed_everywhere(*r))
        .map(|r| (r, true))
        .or_else(|| rates.first().map(|r| (*r, false)))
}

struct Table {
    md: String,
    json: serde_json::Map<String, Value>,
}

impl Table {
    fn header(&mut self, title: &str) {
        let _ = writeln!(
            self.md,
            "\n### {title}\n\n| figure | wsgate | Socket.IO | ratio | load (1 min) | method |\n| --- | --- | --- | --- | --- | --- |"
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        key: &str,
        label: &str,
        w: Option<Stat>,
        s: Option<Stat>,
        ratio: Option<f64>,
        digits: usize,
        load: Option<Stat>,
        method: &str,
    ) {
        let _ = writeln!(
            self.md,
            "| {label} | {} | {} | {} | {} | {method} |",
            cell(w, digits),
            cell(s, digits),
            ratio
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into()),
            load.map(|l| format!("{:.1}–{:.1}", l.min, l.max))
                .unwrap_or_else(|| "-".into()),
        );
        self.json.insert(
            key.to_string(),
            json!({"label": label, "wsgate": stat_json(w), "socketio": stat_json(s), "ratio": ratio,
                   "load_average_1m": stat_json(load), "method": method}),
        );
    }
}

const M_IDLE: &str = "fresh server per round (wsgate on the Redis broker; Socket.IO: its processes on the redis adapter), N connections of N distinct users, each `subscribe: ALL`, held, then (RSS after − RSS before) ÷ N; RSS summed over all server processes";
const M_MEMORY: &str = "fresh server per point; N distinct users at once against the 16-worker, 25 ms back-end (`slow-backend`), retrying as told; once all are back held, then RSS summed over all server processes";
const M_SLOPE: &str = "per round (RSS at the high point − RSS at the low point) ÷ (connections back at the high point − at the low point; 14,000 when all are back), both points from fresh servers of the same round";
const M_CPU: &str = "the highest step that every round of both servers passed (no loss, rate reached, p99 ≤ 50 ms), so both at the same delivery rate; server CPU from /proc/PID/stat (utime / stime) over the step, summed over all server processes, ÷ deliveries received";
const M_CPU_SPLIT: &str = "the highest step that every round of both servers passed (no loss, rate reached, p99 ≤ 50 ms), so both at the same delivery rate; server CPU from /proc/PID/stat (utime + stime, exact in sum) over the step, summed over all server processes, split by the share of `perf record -e cpu-clock -F 1999` samples of those processes taken in user space (the tick-based utime/stime split aliases with the periodic load; where perf cannot sample it is used instead, as each step's `cpu_split` says), ÷ deliveries received";
const M_ACHIEVED: &str = "deliveries received ÷ publishing time of that step";
const M_FLOOR_RATIO: &str = "CPU per delivery ÷ the floor measured in the same run (one send() per message over as many loopback socket pairs, reader parked, same rate)";
const M_P99: &str = "latency from the publish timestamp in the payload to the client's receipt, all deliveries of the step";
const M_SAT: &str = "rate sweep; highest step with no loss, no publish error, ≥ 95 % of the rate reached and p99 ≤ 50 ms (0 = none passed)";
const M_LOSSLESS: &str = "rate sweep; highest step with no loss and the rate reached, any latency";
const M_STRACE: &str = "a separate step at a fixed rate (not a CPU-measured step): `perf stat` on the `syscalls:sys_enter_{sendto,sendmsg,writev,write}` tracepoints (which does not stop the process; `strace -c -f` where perf cannot, as each run's file says) attached to every server process for a few seconds in its middle; calls ÷ deliveries received in that window (mean of the deliveries counted from attached to detach-asked and from strace start to exit; *bounds*: ÷ each of the two)";
const M_CHAT: &str = "two nodes of each on one redis-server (Socket.IO: two clusters); user A of a pair on node 1, B on node 2; p99 at the highest rate run, losses over all steps";
const M_STORM: &str = "N clients / K keys connect at random instants within the spread, with exponential backoff; cold node; time until all are connected and subscribed";
const M_BSTORM: &str = "N distinct users (N in the figure) at the same instant against the 16-worker, 25 ms back-end (`slow-backend`); wsgate with default flags and `--max-handshakes-per-ip 0`; a refused client retries after its Retry-After (else 5 s); counts from the back-end's /stats";
const M_FLOOR: &str = "`wsgate-loadtest floor`: one send(…, MSG_NOSIGNAL) per message round-robin over loopback socket pairs at a fixed rate; CPU of the sending process (getrusage, exact in sum) ÷ sends, split into user space and kernel by the share of `perf record -e cpu-clock -F 1999` samples of the process taken in user space, as the servers' CPU is (each run's `cpu_split` says which split was used)";

pub fn run(a: CompareArgs) -> anyhow::Result<()> {
    let files = load(&a.dir)?;
    let mut t = Table {
        md: String::from("# wsgate vs Socket.IO 4 — summary\n\n"),
        json: serde_json::Map::new(),
    };
    if let Some(m) = &files.machine {
        t.md += &machine_md(m);
    }
    // How many processes each Socket.IO server had (primary and workers: the --pid list).
    let peer_procs = files
        .by_key
        .iter()
        .filter(|((k, tg), _)| tg == "socketio" && k != "chat")
        .flat_map(|(_, runs)| runs.iter())
        .find_map(|r| {
            let cmd = r.v["command"].as_str()?;
            let list = cmd.split_once("--pid ")?.1.split_whitespace().next()?;
            Some(list.split(',').count())
        });
    if let Some(n) = peer_procs {
        let _ = writeln!(
            t.md,
            "\nSocket.IO ran as {n} process(es) per server ({}); CPU and RSS are summed over them. wsgate: one process on its Redis broker.",
            if n > 1 {
                format!("a node:cluster primary and {} workers on @socket.io/redis-adapter", n - 1)
            } else {
                "one process on @socket.io/redis-adapter".to_string()
            }
        );
    }
    t.md += "\nEvery cell: median over the rounds of this run (min–max, n = rounds). Ratios are of the medians, Socket.IO ÷ wsgate unless stated. *load*: the 1-minute load average at the start of the runs behind the row (min–max). Method of each figure in the last column; the full description is in loadtest/README.md.\n";

    // ---- memory
    t.header("Memory");
    let conns = files
        .get("idle", "wsgate")
        .first()
        .and_then(|r| r.v["params"]["connections"].as_u64())
        .unwrap_or(0);
    let idle = |t: &str| {
        files.stat("idle", t, |v| {
            f(&v["results"]["server_bytes_per_connection"]).map(|b| b / 1024.0)
        })
    };
    let (iw, is) = (idle("wsgate"), idle("socketio"));
    if iw.is_some() || is.is_some() {
        t.row(
            "idle_kib_per_connection",
            &format!("idle RSS per connection, KiB ({conns} connections)"),
            iw,
            is,
            ratio(is, iw),
            2,
            files.load(&["idle"]),
            M_IDLE,
        );
    }
    let rss_mib = |key: &str, tg: &str| {
        files.stat(key, tg, |v| {
            f(&v["results"]["server_rss_after_bytes"]).map(|b| b / 1048576.0)
        })
    };
    // The memory points of the run (2,000 and 16,000 by default).
    let mut points: Vec<u64> = files
        .by_key
        .keys()
        .filter_map(|(k, _)| k.strip_prefix("memory-")?.parse().ok())
        .collect();
    points.sort();
    points.dedup();
    for &n in &points {
        let key = format!("memory-{n}");
        let (w, s) = (rss_mib(&key, "wsgate"), rss_mib(&key, "socketio"));
        t.row(
            &format!("rss_mib_after_storm_{n}"),
            &format!("RSS after a storm of {n} connections, MiB"),
            w,
            s,
            ratio(s, w),
            1,
            files.load(&[&key]),
            M_MEMORY,
        );
    }
    // Slope per round, from the lowest and highest point of the same round:
    // (RSS_hi − RSS_lo) ÷ (connections back at hi − connections back at lo).
    let (lo_n, hi_n) = (
        points.first().copied().unwrap_or(0),
        points.last().copied().unwrap_or(0),
    );
    let slope = |tg: &str| {
        let pick = |n: u64| -> BTreeMap<u32, (f64, f64)> {
            files
                .get(&format!("memory-{n}"), tg)
                .iter()
                .filter_map(|r| {
                    let res = &r.v["results"];
                    Some((
                        r.round?,
                        (f(&res["server_rss_after_bytes"])?, f(&res["connected"])?),
                    ))
                })
                .collect()
        };
        let (lo, hi) = (pick(lo_n), pick(hi_n));
        stat(
            lo.iter()
                .filter_map(|(r, (rss_lo, c_lo))| {
                    let (rss_hi, c_hi) = hi.get(r)?;
                    (c_hi > c_lo).then(|| (rss_hi - rss_lo) / (c_hi - c_lo) / 1024.0)
                })
                .collect(),
        )
    };
    let (sw, ss) = if lo_n < hi_n {
        (slope("wsgate"), slope("socketio"))
    } else {
        (None, None)
    };
    if lo_n < hi_n {
        let (lk, hk) = (format!("memory-{lo_n}"), format!("memory-{hi_n}"));
        t.row(
            "memory_slope_kib_per_connection",
            &format!("**memory slope, KiB per connection** ({lo_n} → {hi_n})"),
            sw,
            ss,
            ratio(ss, sw),
            2,
            files.load(&[&lk, &hk]),
            M_SLOPE,
        );
    }

    // ---- CPU and latency per delivery
    let mut cpu_bars = Vec::new();
    for (key, label) in [("fanout", "isolated (burst 1)"), ("fanout-burst", "burst")] {
        let burst = files
            .get(key, "wsgate")
            .first()
            .and_then(|r| r.v["params"]["burst"].as_u64())
            .unwrap_or(1);
        let label = if key == "fanout-burst" {
            format!("burst {burst}")
        } else {
            label.to_string()
        };
        t.header(&format!("Fan-out over Redis, {label}"));
        let ld = files.load(&[key]);
        if let Some((rate, matched)) = reference_rate(&files, key) {
            if !matched {
                let _ = writeln!(
                    t.md,
                    "| **no step was passed by every round of both servers: the rows below are at the lowest rate, {rate}/s, and not matched** | | | | | |"
                );
            }
            let at = |tg: &str, pick: &dyn Fn(&Value) -> Option<f64>| {
                files.stat(key, tg, |v| step_at(v, rate).and_then(pick))
            };
            let pair =
                |pick: &dyn Fn(&Value) -> Option<f64>| (at("wsgate", pick), at("socketio", pick));
            let (w, s) = pair(&|s| f(&s["deliveries_per_second"]));
            t.row(
                &format!("{key}_achieved_rate"),
                &format!("achieved deliveries/s at the matched step ({rate}/s)"),
                w,
                s,
                None,
                0,
                ld,
                M_ACHIEVED,
            );
            let (uw, us) = pair(&|s| f(&s["server_user_us_per_delivery"]));
            t.row(
                &format!("{key}_user_us_per_delivery"),
                &format!("**user-space CPU µs per delivery** at {rate}/s"),
                uw,
                us,
                ratio(us, uw),
                2,
                ld,
                M_CPU_SPLIT,
            );
            let (kw, ks) = pair(&|s| f(&s["server_system_us_per_delivery"]));
            t.row(
                &format!("{key}_kernel_us_per_delivery"),
                &format!("**kernel CPU µs per delivery** at {rate}/s"),
                kw,
                ks,
                ratio(ks, kw),
                2,
                ld,
                M_CPU_SPLIT,
            );
            let (cw, cs) = pair(&|s| f(&s["server_cpu_us_per_delivery"]));
            t.row(
                &format!("{key}_cpu_us_per_delivery"),
                &format!("total CPU µs per delivery at {rate}/s"),
                cw,
                cs,
                ratio(cs, cw),
                2,
                ld,
                M_CPU,
            );
            let (fw, fs) = pair(&|s| f(&s["ratio_to_floor"]));
            t.row(
                &format!("{key}_vs_floor"),
                "CPU per delivery ÷ floor",
                fw,
                fs,
                None,
                2,
                ld,
                M_FLOOR_RATIO,
            );
            let (pw, ps) = pair(&|s| f(&s["latency"]["p99_ms"]));
            t.row(
                &format!("{key}_p99_ms"),
                &format!("p99 latency ms at {rate}/s"),
                pw,
                ps,
                ratio(ps, pw),
                2,
                ld,
                M_P99,
            );
            cpu_bars.push((label.clone(), uw, us, kw, ks));
        }
        let sc = |tg: &str| {
            files.stat(key, tg, |v| {
                f(&v["results"]["syscalls"]["total_per_delivery"])
                    .filter(|_| v["results"]["syscalls"]["error"].is_null())
            })
        };
        let srate = files
            .get(key, "wsgate")
            .iter()
            .find_map(|r| r.v["results"]["syscalls"]["target_deliveries_per_second"].as_u64());
        if let Some(srate) = srate {
            let (w, s) = (sc("wsgate"), sc("socketio"));
            let detail = |tg: &str| -> String {
                crate::strace::CALLS
                    .split(',')
                    .filter_map(|call| {
                        let st = files.stat(key, tg, |v| {
                            f(&v["results"]["syscalls"]["per_delivery"][call])
                        })?;
                        (st.median > 0.0).then(|| format!("{call} {:.3}", st.median))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let bounds = |tg: &str| -> String {
                let b = |i: usize| {
                    files.stat(key, tg, |v| {
                        f(&v["results"]["syscalls"]["total_per_delivery_bounds"][i])
                    })
                };
                match (b(0), b(1)) {
                    (Some(lo), Some(hi)) => format!("{:.3}–{:.3}", lo.median, hi.median),
                    _ => "-".into(),
                }
            };
            t.row(
                &format!("{key}_socket_writes_per_delivery"),
                &format!(
                    "**socket write calls per delivery** at {srate}/s (wsgate: {}; bounds {}. Socket.IO: {}; bounds {})",
                    detail("wsgate"),
                    bounds("wsgate"),
                    detail("socketio"),
                    bounds("socketio")
                ),
                w,
                s,
                ratio(s, w),
                3,
                ld,
                M_STRACE,
            );
        }
        let sat = |tg: &str| {
            files.stat(key, tg, |v| {
                Some(
                    v["results"]["saturation_deliveries_per_second"]
                        .as_f64()
                        .unwrap_or(0.0),
                )
            })
        };
        let (w, s) = (sat("wsgate"), sat("socketio"));
        t.row(
            &format!("{key}_saturation"),
            "saturation, deliveries/s (ratio wsgate ÷ Socket.IO)",
            w,
            s,
            ratio(w, s),
            0,
            ld,
            M_SAT,
        );
        let lossless = |tg: &str| {
            files.stat(key, tg, |v| {
                Some(
                    v["results"]["lossless_max_deliveries_per_second"]
                        .as_f64()
                        .unwrap_or(0.0),
                )
            })
        };
        let (w, s) = (lossless("wsgate"), lossless("socketio"));
        t.row(
            &format!("{key}_lossless_max"),
            "highest rate without loss, deliveries/s (ratio wsgate ÷ Socket.IO)",
            w,
            s,
            ratio(w, s),
            0,
            ld,
            M_LOSSLESS,
        );
    }

    // ---- chat
    let chat_rate = files
        .get("chat", "wsgate")
        .first()
        .and_then(|r| r.v["results"]["steps"].as_array())
        .and_then(|s| s.last())
        .and_then(|s| s["target_messages_per_second"].as_u64());
    if let Some(rate) = chat_rate {
        t.header("Chat across two nodes");
        let ld = files.load(&["chat"]);
        let p99 = |tg: &str| {
            files.stat("chat", tg, move |v| {
                v["results"]["steps"].as_array().and_then(|steps| {
                    steps
                        .iter()
                        .find(|s| s["target_messages_per_second"].as_u64() == Some(rate))
                        .and_then(|s| f(&s["latency"]["p99_ms"]))
                })
            })
        };
        let lost = |tg: &str| {
            files.stat("chat", tg, move |v| {
                v["results"]["steps"].as_array().map(|steps| {
                    steps
                        .iter()
                        .map(|s| s["lost"].as_f64().unwrap_or(0.0))
                        .sum()
                })
            })
        };
        let (w, s) = (p99("wsgate"), p99("socketio"));
        t.row(
            "chat_p99_ms",
            &format!("p99 ms at {rate} msg/s"),
            w,
            s,
            ratio(s, w),
            2,
            ld,
            M_CHAT,
        );
        t.row(
            "chat_lost",
            "messages lost (all steps)",
            lost("wsgate"),
            lost("socketio"),
            None,
            0,
            ld,
            M_CHAT,
        );
    }

    // ---- storms
    t.header("Reconnect storms");
    let first = |k: &str, p: &str| {
        files
            .get(k, "wsgate")
            .first()
            .and_then(|r| r.v["params"][p].as_u64())
    };
    if let (Some(keys), Some(n)) = (first("storm", "keys"), first("storm", "connections")) {
        let ld = files.load(&["storm"]);
        let back = |tg: &str| {
            files.stat(
                "storm",
                tg,
                |v| f(&v["results"]["cold"]["all_back_seconds"]),
            )
        };
        let calls = |tg: &str| {
            files.stat("storm", tg, |v| {
                f(&v["results"]["cold"]["backend_auth_calls"])
            })
        };
        let (w, s) = (back("wsgate"), back("socketio"));
        t.row(
            "storm_all_back_seconds",
            &format!("storm: {n} clients / {keys} keys all back, s"),
            w,
            s,
            ratio(s, w),
            2,
            ld,
            M_STORM,
        );
        t.row(
            "storm_backend_calls",
            &format!("storm: back-end Authenticate calls, cold (keys: {keys})"),
            calls("wsgate"),
            calls("socketio"),
            None,
            0,
            ld,
            M_STORM,
        );
    }
    if let Some(n) = first("backend-storm", "connections") {
        let ld = files.load(&["backend-storm"]);
        let pick = |tg: &str, p: &'static str| {
            files.stat("backend-storm", tg, move |v| {
                // -1 = some client gave up
                f(&v["results"][p]).filter(|x| *x >= 0.0)
            })
        };
        let be = |tg: &str, p: &'static str| {
            files.stat("backend-storm", tg, move |v| f(&v["results"]["backend"][p]))
        };
        let (w, s) = (
            pick("wsgate", "all_back_seconds"),
            pick("socketio", "all_back_seconds"),
        );
        t.row(
            "backend_storm_all_back_seconds",
            &format!("back-end storm: {n} distinct users all back, s (floor 6.25 s)"),
            w,
            s,
            ratio(s, w),
            2,
            ld,
            M_BSTORM,
        );
        let (w, s) = (
            be("wsgate", "max_in_flight"),
            be("socketio", "max_in_flight"),
        );
        t.row(
            "backend_storm_max_in_flight",
            "back-end storm: most back-end calls in flight at once",
            w,
            s,
            ratio(s, w),
            0,
            ld,
            M_BSTORM,
        );
        let (w, s) = (be("wsgate", "authenticate"), be("socketio", "authenticate"));
        t.row(
            "backend_storm_calls",
            &format!("back-end storm: Authenticate calls in total ({n} keys)"),
            w,
            s,
            ratio(s, w),
            0,
            ld,
            M_BSTORM,
        );
        let (w, s) = (
            be("wsgate", "max_calls_per_key"),
            be("socketio", "max_calls_per_key"),
        );
        t.row(
            "backend_storm_max_calls_per_key",
            "back-end storm: calls for the most-asked key",
            w,
            s,
            None,
            0,
            ld,
            M_BSTORM,
        );
        let (w, s) = (pick("wsgate", "connected"), pick("socketio", "connected"));
        t.row(
            "backend_storm_connected",
            &format!("back-end storm: clients back before the deadline (of {n})"),
            w,
            s,
            None,
            0,
            ld,
            M_BSTORM,
        );
    }

    // ---- floor
    let floors: Vec<(&str, &str)> = vec![
        ("floor-reader", "a reader parked on every receiving socket"),
        ("floor-noreader", "no reader (sockets held, never read)"),
    ];
    if floors
        .iter()
        .any(|(k, _)| !files.get(k, "kernel").is_empty())
    {
        let _ = writeln!(
            t.md,
            "\n### Floor: the kernel's cost of one small TCP send\n\n| receiving sockets | µs CPU per send | of which user | of which kernel | load (1 min) | method |\n| --- | --- | --- | --- | --- | --- |"
        );
        for (k, label) in floors {
            let per = |p: &'static str| {
                files.stat(k, "kernel", move |v| {
                    let w = f(&v["results"]["writes"])?;
                    if p == "total" {
                        f(&v["results"]["us_per_write"])
                    } else {
                        Some(f(&v["results"][p])? * 1e6 / w.max(1.0))
                    }
                })
            };
            let (tot, us, sy) = (per("total"), per("user_seconds"), per("system_seconds"));
            let params = files
                .get(k, "kernel")
                .first()
                .map(|r| {
                    format!(
                        "{} socket pairs, {} sends/s, {} bytes",
                        r.v["params"]["connections"], r.v["params"]["rate"], r.v["params"]["size"]
                    )
                })
                .unwrap_or_default();
            let ld = files.load(&[k]);
            let _ = writeln!(
                t.md,
                "| {label} | {} | {} | {} | {} | {M_FLOOR}; {params} |",
                cell(tot, 2),
                cell(us, 3),
                cell(sy, 2),
                ld.map(|l| format!("{:.1}–{:.1}", l.min, l.max))
                    .unwrap_or_else(|| "-".into()),
            );
            t.json.insert(
                k.replace('-', "_"),
                json!({"label": label, "us_per_send": stat_json(tot), "user_us_per_send": stat_json(us),
                       "kernel_us_per_send": stat_json(sy), "load_average_1m": stat_json(ld), "method": M_FLOOR}),
            );
        }
    }
    let _ = writeln!(t.md);

    // Charts (medians).
    let dir = &a.dir;
    let mut md = t.md;
    if sw.is_some() || ss.is_some() || iw.is_some() || is.is_some() {
        let m = |s: Option<Stat>| s.map(|s| s.median).unwrap_or(0.0);
        let svg = bar_chart(
            "gateway memory per connection (KiB, medians)",
            "KiB per connection",
            &[
                "idle (after − before) ÷ N".to_string(),
                "slope 2k → 16k".to_string(),
            ],
            &[
                Series {
                    name: "wsgate".into(),
                    points: vec![(0.0, m(iw)), (0.0, m(sw))],
                },
                Series {
                    name: "Socket.IO 4".into(),
                    points: vec![(0.0, m(is)), (0.0, m(ss))],
                },
            ],
        );
        let file = format!("{}-memory.svg", a.name);
        std::fs::write(dir.join(&file), svg)?;
        let _ = writeln!(md, "![memory]({file})");
    }
    if !cpu_bars.is_empty() {
        let m = |s: &Option<Stat>| s.map(|s| s.median).unwrap_or(0.0);
        let cats: Vec<String> = cpu_bars.iter().map(|c| c.0.clone()).collect();
        let svg = bar_chart(
            "server CPU per delivery at the matched rate (µs, medians)",
            "µs CPU per delivery",
            &cats,
            &[
                Series {
                    name: "wsgate user".into(),
                    points: cpu_bars.iter().map(|c| (0.0, m(&c.1))).collect(),
                },
                Series {
                    name: "Socket.IO user".into(),
                    points: cpu_bars.iter().map(|c| (0.0, m(&c.2))).collect(),
                },
                Series {
                    name: "wsgate kernel".into(),
                    points: cpu_bars.iter().map(|c| (0.0, m(&c.3))).collect(),
                },
                Series {
                    name: "Socket.IO kernel".into(),
                    points: cpu_bars.iter().map(|c| (0.0, m(&c.4))).collect(),
                },
            ],
        );
        let file = format!("{}-cpu.svg", a.name);
        std::fs::write(dir.join(&file), svg)?;
        let _ = writeln!(md, "![cpu]({file})");
    }
    std::fs::write(dir.join(format!("{}.md", a.name)), &md)?;
    std::fs::write(
        dir.join(format!("{}.json", a.name)),
        serde_json::to_string_pretty(&Value::Object(t.json))? + "\n",
    )?;
    println!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = stat(vec![3.0, 1.0, 2.0, f64::NAN, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
        assert!(stat(vec![]).is_none());
        assert_eq!(cell(Some(s), 1), "2.5 (1.0–10.0, n=4)");
    }

    #[test]
    fn rounds_from_names() {
        assert_eq!(round_of("memory-2000-wsgate-r3"), Some(3));
        assert_eq!(round_of("fanout-socketio-r12"), Some(12));
        assert_eq!(round_of("summary"), None);
    }

    #[test]
    fn keys_tell_variants_apart() {
        let v = json!({"scenario": "backend-storm", "params": {"hold_seconds": 10.0, "connections": 2000}});
        assert_eq!(key_of(&v).as_deref(), Some("memory-2000"));
        let v = json!({"scenario": "backend-storm", "params": {"hold_seconds": 0.0, "connections": 4000}});
        assert_eq!(key_of(&v).as_deref(), Some("backend-storm"));
        let v = json!({"scenario": "fanout", "params": {"burst": 8}});
        assert_eq!(key_of(&v).as_deref(), Some("fanout-burst"));
        let v = json!({"scenario": "floor", "params": {"parked_reader": false}});
        assert_eq!(key_of(&v).as_deref(), Some("floor-noreader"));
    }
}
