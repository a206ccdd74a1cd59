//! Counting a server's socket write system calls.
//!
//! `/proc/PID/io` `syscw` counts `write` and `writev` but not `send`/`sendto`/`sendmsg`, which
//! is how Rust's standard library (so tokio) and Node's libuv write to TCP sockets, so the
//! calls are counted by attaching a counter to every server process for a few seconds:
//! `perf stat` on the `syscalls:sys_enter_*` tracepoints where the kernel allows it, which
//! counts in the kernel without stopping the process, else `strace -c -f`, which stops the
//! process at every counted call. The stops matter: they stretch how long a server takes to
//! read a burst of publishes, and so change how many messages it can write together. The
//! result says which counter was used. Either way the window must not overlap a CPU
//! measurement.

use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

/// The system calls counted: every way a process can write to a socket.
pub const CALLS: &str = "sendto,sendmsg,writev,write";

/// A counter attached to a set of processes.
pub struct Tracer {
    children: Vec<tokio::process::Child>,
    tool: &'static str,
}

/// Starts a counter on `pid`, its report on stderr.
fn counter(program: &str, args: &[&str], pid: u32) -> std::io::Result<tokio::process::Child> {
    tokio::process::Command::new(program)
        .args(args)
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

fn perf(pid: u32) -> std::io::Result<tokio::process::Child> {
    let events: Vec<String> = CALLS
        .split(',')
        .map(|c| format!("syscalls:sys_enter_{c}"))
        .collect();
    counter(
        "perf",
        &["stat", "-x", ",", "-e", &events.join(","), "-p"],
        pid,
    )
}

fn strace(pid: u32) -> std::io::Result<tokio::process::Child> {
    counter(
        "strace",
        &["-c", "-f", "-e", &format!("trace={CALLS}"), "-p"],
        pid,
    )
}

/// Attaches a counter of sendto, sendmsg, writev and write to each pid (`perf stat`, or
/// `strace -c -f` when perf is missing or may not read the tracepoints), then waits `settle`
/// for the attachments (all threads) to be in place.
pub async fn attach(pids: &[u32], settle: Duration) -> anyhow::Result<Tracer> {
    let mut children = Vec::with_capacity(pids.len());
    for pid in pids {
        match perf(*pid) {
            Ok(child) => children.push(child),
            Err(_) => {
                children.clear();
                break;
            }
        }
    }
    tokio::time::sleep(settle).await;
    // perf exits at once when it cannot attach (no tracepoints, perf_event_paranoid).
    let mut perf_ok = !children.is_empty();
    for c in &mut children {
        if !matches!(c.try_wait(), Ok(None)) {
            perf_ok = false;
        }
    }
    if perf_ok {
        return Ok(Tracer {
            children,
            tool: "perf stat",
        });
    }
    drop(children);
    let mut children = Vec::with_capacity(pids.len());
    for pid in pids {
        children.push(strace(*pid).context("starting strace (is it installed?)")?);
    }
    tokio::time::sleep(settle).await;
    Ok(Tracer {
        children,
        tool: "strace",
    })
}

impl Tracer {
    /// Which counter is attached: `perf stat` or `strace`.
    pub fn tool(&self) -> &'static str {
        self.tool
    }

    /// Detaches (SIGINT, on which both print their counts) and returns the calls per system
    /// call, summed over the processes.
    pub async fn detach(self) -> anyhow::Result<BTreeMap<String, u64>> {
        for c in &self.children {
            if let Some(id) = c.id() {
                // SAFETY: signalling a child process we started and have not reaped.
                unsafe {
                    libc::kill(id as libc::pid_t, libc::SIGINT);
                }
            }
        }
        let mut total: BTreeMap<String, u64> = CALLS.split(',').map(|c| (c.into(), 0)).collect();
        for c in self.children {
            let out = tokio::time::timeout(Duration::from_secs(10), c.wait_with_output())
                .await
                .context("the system call counter did not detach")??;
            let text = String::from_utf8_lossy(&out.stderr);
            let counts = if self.tool == "strace" {
                parse_table(&text)
            } else {
                parse_perf(&text)
            };
            for (name, n) in counts {
                *total.entry(name).or_default() += n;
            }
        }
        Ok(total)
    }
}

/// The counts of `perf stat -x ,` (`count,,syscalls:sys_enter_NAME,…`), per system call.
pub fn parse_perf(text: &str) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split(',').collect();
        if t.len() < 3 {
            continue;
        }
        let Some(name) = t[2].strip_prefix("syscalls:sys_enter_") else {
            continue;
        };
        if !CALLS.split(',').any(|c| c == name) {
            continue;
        }
        if let Ok(n) = t[0].parse::<u64>() {
            *m.entry(name.to_string()).or_default() += n;
        }
    }
    m
}

/// The `calls` column of `strace -c`'s table, per system call.
pub fn parse_table(text: &str) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors], syscall
        if t.len() < 5 || t[0].parse::<f64>().is_err() {
            continue;
        }
        let Some(name) = t.last() else { continue };
        if !CALLS.split(',').any(|c| c == *name) {
            continue;
        }
        if let Ok(n) = t[3].parse::<u64>() {
            *m.entry(name.to_string()).or_default() += n;
        }
    }
    m
}

/// The socket write calls of a server over a window of a fan-out step.
#[derive(Serialize, Clone, Debug, Default)]
pub struct SyscallCount {
    pub target_deliveries_per_second: u64,
    pub window_seconds: f64,
    /// Deliveries received by the clients while strace was attached: the mean of the inner and
    /// the outer count below.
    pub deliveries: u64,
    /// Deliveries from the end of attaching to the detach request (a lower bound of the traced
    /// window's) and from starting strace to its exit (an upper bound).
    pub deliveries_inner: u64,
    pub deliveries_outer: u64,
    /// Calls per system call over the window, summed over the server's processes.
    pub calls: BTreeMap<String, u64>,
    /// The same per delivery.
    pub per_delivery: BTreeMap<String, f64>,
    /// All counted calls per delivery (÷ `deliveries`).
    pub total_per_delivery: f64,
    /// The same ÷ the outer and ÷ the inner count: the true figure lies between.
    pub total_per_delivery_bounds: (f64, f64),
    pub processes: usize,
    /// The counter: `perf stat` (tracepoints, the process is not stopped) or `strace`.
    pub tool: String,
    /// Why nothing was counted, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_counts() {
        let text = "1234,,syscalls:sys_enter_sendto,1905923,100.00,,\n\
0,,syscalls:sys_enter_sendmsg,1905923,100.00,,\n\
7,,syscalls:sys_enter_writev,1905923,100.00,,\n\
<not counted>,,syscalls:sys_enter_write,0,0.00,,\n";
        let m = parse_perf(text);
        assert_eq!(m.get("sendto"), Some(&1234));
        assert_eq!(m.get("sendmsg"), Some(&0));
        assert_eq!(m.get("writev"), Some(&7));
        assert_eq!(m.get("write"), None);
    }

    #[test]
    fn parses_strace_summary() {
        let text = "strace: Process 12 attached with 3 threads\n\
% time     seconds  usecs/call     calls    errors syscall\n\
------ ----------- ----------- --------- --------- ----------------\n\
 97.10    0.120000          10     12000           sendto\n\
  2.00    0.002000          20       100        4 writev\n\
  0.90    0.001000           5        20           write\n\
------ ----------- ----------- --------- --------- ----------------\n\
100.00    0.123000          10     12120        4 total\n";
        let m = parse_table(text);
        assert_eq!(m.get("sendto"), Some(&12000));
        assert_eq!(m.get("writev"), Some(&100));
        assert_eq!(m.get("write"), Some(&20));
        assert_eq!(m.get("total"), None);
    }
}
