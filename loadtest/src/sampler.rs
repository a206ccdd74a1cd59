//! The user-space / kernel split of a server's CPU, by sampling.
//!
//! `/proc/PID/stat`'s `utime` and `stime` add up to the exact CPU time, but the split between
//! them is made by the scheduler tick: each tick charges a whole tick to the mode the CPU is in
//! at that instant. A load that repeats at a rate the tick divides (a fan-out step publishes
//! 25 times a second; the tick comes every 4 ms at 250 Hz) meets the tick at the same phase
//! again and again, so the split swings between identical steps: 0.9 to 2.6 µs of user time
//! per delivery in one 5-step run of the same server at the same rate. `perf record` samples
//! the processes' CPU clock at a rate that is no multiple of the load's (1,999 Hz, a prime),
//! and the share of samples taken in user space splits the exact total instead.

use anyhow::Context;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// How a measurement's CPU was split into user space and kernel: by samples, or (where perf
/// cannot sample) by the tick-based utime/stime.
pub const CPU_SPLIT_SAMPLED: &str = "perf cpu-clock samples";
pub const CPU_SPLIT_TICKS: &str = "/proc ticks";

/// Samples per second of CPU time.
const FREQUENCY: &str = "1999";

/// Kernel text and data live in the upper half of the address space (x86-64, arm64).
const KERNEL_START: u64 = 0xffff_0000_0000_0000;

/// `perf record` attached to a set of processes.
pub struct Sampler {
    child: tokio::process::Child,
    file: PathBuf,
}

/// Samples taken in user space and in the kernel.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Split {
    pub user: u64,
    pub kernel: u64,
}

impl Split {
    /// The share of samples in user space (`None` without samples).
    pub fn user_share(&self) -> Option<f64> {
        let all = self.user + self.kernel;
        (all > 0).then(|| self.user as f64 / all as f64)
    }
}

/// Starts sampling `pids` (every thread of each); `None` when perf is missing or may not attach
/// (`perf_event_paranoid`), in which case the caller keeps the tick-based split.
pub async fn start(pids: &[u32], name: &str) -> Option<Sampler> {
    if pids.is_empty() {
        return None;
    }
    let file = std::env::temp_dir().join(format!(
        "wsgate-loadtest-{}-{name}.perf.data",
        std::process::id()
    ));
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let mut child = tokio::process::Command::new("perf")
        .args([
            "record",
            "--quiet",
            "-e",
            "cpu-clock",
            "-F",
            FREQUENCY,
            "-p",
        ])
        .arg(list.join(","))
        .arg("-o")
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    // perf exits at once when it cannot attach.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if !matches!(child.try_wait(), Ok(None)) {
        let _ = std::fs::remove_file(&file);
        return None;
    }
    Some(Sampler { child, file })
}

impl Sampler {
    /// Stops sampling (SIGINT, on which perf writes its file) and counts the samples by mode.
    pub async fn stop(mut self) -> anyhow::Result<Split> {
        if let Some(id) = self.child.id() {
            // SAFETY: signalling a child process we started and have not reaped.
            unsafe {
                libc::kill(id as libc::pid_t, libc::SIGINT);
            }
        }
        let waited = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
        let result = async {
            waited
                .context("perf record did not stop")?
                .context("perf record")?;
            let out = tokio::process::Command::new("perf")
                .args(["script", "-F", "ip", "-i"])
                .arg(&self.file)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .await
                .context("perf script")?;
            Ok(count(&String::from_utf8_lossy(&out.stdout)))
        }
        .await;
        let _ = std::fs::remove_file(&self.file);
        result
    }
}

/// Counts `perf script -F ip` lines (one hexadecimal address per sample) by mode.
pub fn count(text: &str) -> Split {
    let mut split = Split::default();
    for line in text.lines() {
        let Ok(ip) = u64::from_str_radix(line.trim(), 16) else {
            continue;
        };
        if ip >= KERNEL_START {
            split.kernel += 1;
        } else {
            split.user += 1;
        }
    }
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_split_by_address() {
        let text =
            "ffffffff8223b5d1\n    7f3a2b1c0d10\n  693c59\n\nnot an address\nffffffffc0a01234\n";
        let split = count(text);
        assert_eq!(split, Split { user: 2, kernel: 2 });
        assert_eq!(split.user_share(), Some(0.5));
        assert_eq!(Split::default().user_share(), None);
    }
}
