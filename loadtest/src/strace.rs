//! Counting a server's socket write system calls with `strace -c -f`.
//!
//! `/proc/PID/io` `syscw` counts `write` and `writev` but not `send`/`sendto`/`sendmsg`, which
//! is how Rust's standard library (so tokio) and Node's libuv write to TCP sockets, so the
//! calls are counted by attaching `strace` to every server process for a few seconds. `strace`
//! slows the traced process, so the window must not overlap a CPU measurement.

use anyhow::Context;
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

/// The system calls counted: every way a process can write to a socket.
pub const CALLS: &str = "sendto,sendmsg,writev,write";

/// `strace -c -f` attached to a set of processes.
pub struct Tracer {
    children: Vec<tokio::process::Child>,
}

/// Attaches `strace -c -f -e trace=sendto,sendmsg,writev,write` to each pid, then waits
/// `settle` for the attachments (all threads) to be in place.
pub async fn attach(pids: &[u32], settle: Duration) -> anyhow::Result<Tracer> {
    let mut children = Vec::with_capacity(pids.len());
    for pid in pids {
        let child = tokio::process::Command::new("strace")
            .args(["-c", "-f", "-e", &format!("trace={CALLS}"), "-p"])
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting strace (is it installed?)")?;
        children.push(child);
    }
    tokio::time::sleep(settle).await;
    Ok(Tracer { children })
}

impl Tracer {
    /// Detaches (SIGINT, on which strace prints its table) and returns the calls per system call,
    /// summed over the processes.
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
                .context("strace did not detach")??;
            for (name, n) in parse_table(&String::from_utf8_lossy(&out.stderr)) {
                *total.entry(name).or_default() += n;
            }
        }
        Ok(total)
    }
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
    /// Why nothing was counted, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
