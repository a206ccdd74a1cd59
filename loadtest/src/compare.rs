//! Reads the result files of a run and prints wsgate-versus-peer ratios (medians over rounds).

use crate::report::{bar_chart, machine_md, Series};
use crate::stats::Machine;
use serde_json::Value;
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

/// (label, wsgate µs, peer µs, floor µs) of one fan-out variant.
type CpuBar<'a> = (&'a str, Option<f64>, Option<f64>, Option<f64>);

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

struct Files {
    by_key: BTreeMap<(String, String), Vec<Value>>,
    machine: Option<Machine>,
}

fn load(dir: &PathBuf) -> anyhow::Result<Files> {
    let mut by_key: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
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
        let (Some(s), Some(t)) = (v["scenario"].as_str(), v["target"].as_str()) else {
            continue;
        };
        let mut scenario = s.to_string();
        if s == "fanout" && v["params"]["burst"].as_u64().unwrap_or(1) > 1 {
            scenario = "fanout-burst".into();
        }
        if machine.is_none() {
            machine = serde_json::from_value(v["machine"].clone()).ok();
        }
        by_key.entry((scenario, t.to_string())).or_default().push(v);
    }
    Ok(Files { by_key, machine })
}

impl Files {
    fn get(&self, scenario: &str, target: &str) -> &[Value] {
        self.by_key
            .get(&(scenario.to_string(), target.to_string()))
            .map(|v| v.as_slice())
            .unwrap_or(&[])
    }

    fn med(
        &self,
        scenario: &str,
        target: &str,
        pick: impl Fn(&Value) -> Option<f64>,
    ) -> Option<f64> {
        median(
            self.get(scenario, target)
                .iter()
                .filter_map(&pick)
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

/// Highest rate at which every round of both targets passed (else the lowest rate run).
fn reference_rate(files: &Files, scenario: &str) -> Option<u64> {
    let mut rates: Vec<u64> = Vec::new();
    for t in ["wsgate", "socketio"] {
        for v in files.get(scenario, t) {
            if let Some(steps) = v["results"]["steps"].as_array() {
                for s in steps {
                    if let Some(r) = s["target_deliveries_per_second"].as_u64() {
                        if !rates.contains(&r) {
                            rates.push(r);
                        }
                    }
                }
            }
        }
    }
    rates.sort();
    let passed_everywhere = |r: u64| {
        ["wsgate", "socketio"].iter().all(|t| {
            let runs = files.get(scenario, t);
            !runs.is_empty()
                && runs
                    .iter()
                    .all(|v| step_at(v, r).is_some_and(|s| s["passed"].as_bool() == Some(true)))
        })
    };
    rates
        .iter()
        .rev()
        .copied()
        .find(|r| passed_everywhere(*r))
        .or_else(|| rates.first().copied())
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

pub fn run(a: CompareArgs) -> anyhow::Result<()> {
    let files = load(&a.dir)?;
    let mut md = String::from("# wsgate vs Socket.IO 4 — summary\n\n");
    if let Some(m) = &files.machine {
        md += &machine_md(m);
    }
    let rounds = |s: &str, t: &str| files.get(s, t).len();
    let _ = writeln!(
        md,
        "\nMedians over the rounds of this run (rounds: idle {}/{}, fanout {}/{}, burst {}/{}, chat {}/{}, storm {}/{} for wsgate/Socket.IO). Ratios are Socket.IO ÷ wsgate unless stated.\n",
        rounds("idle", "wsgate"), rounds("idle", "socketio"),
        rounds("fanout", "wsgate"), rounds("fanout", "socketio"),
        rounds("fanout-burst", "wsgate"), rounds("fanout-burst", "socketio"),
        rounds("chat", "wsgate"), rounds("chat", "socketio"),
        rounds("storm", "wsgate"), rounds("storm", "socketio"),
    );
    md += "| figure | wsgate | Socket.IO | ratio | target |\n| --- | --- | --- | --- | --- |\n";
    let mut summary = serde_json::Map::new();
    let mut row = |md: &mut String,
                   key: &str,
                   label: &str,
                   w: Option<f64>,
                   s: Option<f64>,
                   r: Option<f64>,
                   digits: usize,
                   target: &str| {
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {target} |",
            fmt(w, digits),
            fmt(s, digits),
            r.map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into())
        );
        summary.insert(
            key.to_string(),
            serde_json::json!({"wsgate": w, "socketio": s, "ratio": r}),
        );
    };

    // idle
    let mem = |t: &str| {
        files.med("idle", t, |v| {
            f(&v["results"]["server_bytes_per_connection"])
        })
    };
    let (mw, ms) = (mem("wsgate"), mem("socketio"));
    let conns = files
        .get("idle", "wsgate")
        .first()
        .and_then(|v| v["params"]["connections"].as_u64())
        .unwrap_or(0);
    row(
        &mut md,
        "idle_kib_per_connection",
        &format!("idle RSS per connection, KiB ({conns} connections)"),
        mw.map(|x| x / 1024.0),
        ms.map(|x| x / 1024.0),
        ratio(ms, mw),
        2,
        "wsgate ≤ 8 KiB; ratio ≥ 3x",
    );

    let mut cpu_bars = Vec::new();
    for (scenario, label) in [("fanout", "isolated"), ("fanout-burst", "burst")] {
        let Some(rate) = reference_rate(&files, scenario) else {
            continue;
        };
        let at = |t: &str, key: &'static str| {
            files.med(scenario, t, move |v| {
                step_at(v, rate).and_then(|s| f(&s[key]))
            })
        };
        let lat = |t: &str| {
            files.med(scenario, t, move |v| {
                step_at(v, rate).and_then(|s| f(&s["latency"]["p99_ms"]))
            })
        };
        let floor = median(
            ["wsgate", "socketio"]
                .iter()
                .flat_map(|t| files.get(scenario, t))
                .filter_map(|v| {
                    step_at(v, rate)
                        .and_then(|s| f(&s["floor_us_per_write"]))
                        .or_else(|| f(&v["results"]["floor"]["us_per_write"]))
                })
                .collect(),
        );
        let (cw, cs) = (
            at("wsgate", "server_cpu_us_per_delivery"),
            at("socketio", "server_cpu_us_per_delivery"),
        );
        row(
            &mut md,
            &format!("{scenario}_cpu_us_per_delivery"),
            &format!("{label} fan-out: server CPU µs per delivery at {rate}/s"),
            cw,
            cs,
            ratio(cs, cw),
            2,
            "ratio ≥ 3x",
        );
        row(
            &mut md,
            &format!("{scenario}_vs_floor"),
            &format!(
                "{label} fan-out: CPU per delivery ÷ floor ({} µs/write)",
                fmt(floor, 2)
            ),
            ratio(cw, floor),
            ratio(cs, floor),
            None,
            2,
            if label == "isolated" {
                "wsgate ≤ 1.5x"
            } else {
                "wsgate < 1x"
            },
        );
        row(
            &mut md,
            &format!("{scenario}_p99_ms"),
            &format!("{label} fan-out: p99 latency ms at {rate}/s"),
            lat("wsgate"),
            lat("socketio"),
            ratio(lat("socketio"), lat("wsgate")),
            2,
            "< 50 ms",
        );
        let sat = |t: &str| {
            files.med(scenario, t, |v| {
                Some(
                    v["results"]["saturation_deliveries_per_second"]
                        .as_f64()
                        .unwrap_or(0.0),
                )
            })
        };
        row(
            &mut md,
            &format!("{scenario}_saturation"),
            &format!("{label} fan-out: saturation, deliveries/s (highest passing step)"),
            sat("wsgate"),
            sat("socketio"),
            ratio(sat("wsgate"), sat("socketio")),
            0,
            "wsgate ≥ 200000 with p99 < 50 ms (ratio: wsgate ÷ Socket.IO)",
        );
        // CPU ÷ floor at the highest rate each run delivered without loss (where queues form
        // and coalescing can pay off).
        let top = |t: &str, key: &'static str| {
            files.med(scenario, t, move |v| {
                let steps = v["results"]["steps"].as_array()?;
                steps
                    .iter()
                    .filter(|s| {
                        s["lost"].as_i64() == Some(0)
                            && s["publish_errors"].as_u64() == Some(0)
                            && s["publish_achieved_ratio"].as_f64().unwrap_or(0.0) >= 0.95
                    })
                    .max_by_key(|s| s["target_deliveries_per_second"].as_u64().unwrap_or(0))
                    .and_then(|s| f(&s[key]))
            })
        };
        row(
            &mut md,
            &format!("{scenario}_top_vs_floor"),
            &format!(
                "{label} fan-out: CPU per delivery ÷ floor at the highest lossless rate (wsgate {} /s, Socket.IO {} /s)",
                fmt(top("wsgate", "target_deliveries_per_second"), 0),
                fmt(top("socketio", "target_deliveries_per_second"), 0)
            ),
            top("wsgate", "ratio_to_floor"),
            top("socketio", "ratio_to_floor"),
            None,
            2,
            if label == "isolated" { "-" } else { "wsgate < 1x" },
        );
        let lossless = |t: &str| {
            files.med(scenario, t, |v| {
                Some(
                    v["results"]["lossless_max_deliveries_per_second"]
                        .as_f64()
                        .unwrap_or(0.0),
                )
            })
        };
        row(
            &mut md,
            &format!("{scenario}_lossless_max"),
            &format!("{label} fan-out: highest rate without loss (any latency), deliveries/s"),
            lossless("wsgate"),
            lossless("socketio"),
            ratio(lossless("wsgate"), lossless("socketio")),
            0,
            "wsgate ≥ 200000 (ratio: wsgate ÷ Socket.IO)",
        );
        cpu_bars.push((label, cw, cs, floor));
    }

    // chat: p99 at the highest rate both ran
    let chat_rate = files
        .get("chat", "wsgate")
        .first()
        .and_then(|v| v["results"]["steps"].as_array())
        .and_then(|s| s.last())
        .and_then(|s| s["target_messages_per_second"].as_u64());
    if let Some(rate) = chat_rate {
        let p99 = |t: &str| {
            files.med("chat", t, move |v| {
                v["results"]["steps"].as_array().and_then(|steps| {
                    steps
                        .iter()
                        .find(|s| s["target_messages_per_second"].as_u64() == Some(rate))
                        .and_then(|s| f(&s["latency"]["p99_ms"]))
                })
            })
        };
        let lost = |t: &str| {
            files.med("chat", t, move |v| {
                v["results"]["steps"].as_array().map(|steps| {
                    steps
                        .iter()
                        .map(|s| s["lost"].as_f64().unwrap_or(0.0))
                        .sum()
                })
            })
        };
        row(
            &mut md,
            "chat_p99_ms",
            &format!("chat across nodes: p99 ms at {rate} msg/s"),
            p99("wsgate"),
            p99("socketio"),
            ratio(p99("socketio"), p99("wsgate")),
            2,
            "< 50 ms",
        );
        row(
            &mut md,
            "chat_lost",
            "chat: messages lost (all steps)",
            lost("wsgate"),
            lost("socketio"),
            None,
            0,
            "0",
        );
    }

    // storm
    let back = |t: &str| files.med("storm", t, |v| f(&v["results"]["cold"]["all_back_seconds"]));
    let calls = |t: &str| {
        files.med("storm", t, |v| {
            f(&v["results"]["cold"]["backend_auth_calls"])
        })
    };
    let keys = files
        .get("storm", "wsgate")
        .first()
        .and_then(|v| v["params"]["keys"].as_u64());
    let n = files
        .get("storm", "wsgate")
        .first()
        .and_then(|v| v["params"]["connections"].as_u64());
    if let (Some(keys), Some(n)) = (keys, n) {
        row(
            &mut md,
            "storm_all_back_seconds",
            &format!("storm: {n} clients / {keys} keys all back, s"),
            back("wsgate"),
            back("socketio"),
            ratio(back("socketio"), back("wsgate")),
            2,
            "≤ 5 s",
        );
        row(
            &mut md,
            "storm_backend_calls",
            "storm: back-end Authenticate calls (cold)",
            calls("wsgate"),
            calls("socketio"),
            None,
            0,
            &format!("exactly {keys}"),
        );
    }
    let _ = writeln!(md);

    // Charts.
    let dir = &a.dir;
    if mw.is_some() || ms.is_some() {
        let svg = bar_chart(
            "gateway RSS per idle connection (KiB)",
            "KiB per connection",
            &["idle".to_string()],
            &[
                Series {
                    name: "wsgate".into(),
                    points: vec![(0.0, mw.unwrap_or(0.0) / 1024.0)],
                },
                Series {
                    name: "Socket.IO 4".into(),
                    points: vec![(0.0, ms.unwrap_or(0.0) / 1024.0)],
                },
            ],
        );
        let file = format!("{}-memory.svg", a.name);
        std::fs::write(dir.join(&file), svg)?;
        let _ = writeln!(md, "![memory]({file})");
    }
    if !cpu_bars.is_empty() {
        let cats: Vec<String> = cpu_bars.iter().map(|c| c.0.to_string()).collect();
        let ser = |name: &str, pick: &dyn Fn(&CpuBar) -> Option<f64>| Series {
            name: name.into(),
            points: cpu_bars
                .iter()
                .map(|c| (0.0, pick(c).unwrap_or(0.0)))
                .collect(),
        };
        let svg = bar_chart(
            "server CPU per delivery (µs)",
            "µs CPU per delivery",
            &cats,
            &[
                ser("wsgate", &|c| c.1),
                ser("Socket.IO 4", &|c| c.2),
                ser("floor (1 write)", &|c| c.3),
            ],
        );
        let file = format!("{}-cpu.svg", a.name);
        std::fs::write(dir.join(&file), svg)?;
        let _ = writeln!(md, "![cpu]({file})");
    }
    std::fs::write(dir.join(format!("{}.md", a.name)), &md)?;
    std::fs::write(
        dir.join(format!("{}.json", a.name)),
        serde_json::to_string_pretty(&Value::Object(summary))? + "\n",
    )?;
    println!("{md}");
    Ok(())
}
