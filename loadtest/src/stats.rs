//! Latency histograms, process CPU/RSS accounting and machine facts.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (the clock both publisher and receiver read).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

const SUB_BITS: u32 = 5; // 32 sub-buckets per power of two: <= 3.2 % relative error
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB as usize;

/// A lock-free log-linear histogram of microsecond values.
pub struct Histogram {
    counts: Vec<AtomicU64>,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros(); // >= SUB_BITS
        let shift = exp - SUB_BITS;
        let mantissa = (v >> shift) & (SUB - 1);
        ((shift as u64 + 1) * SUB + mantissa) as usize
    }

    /// Upper bound of the values that land in bucket `i`.
    fn value_of(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let shift = i / SUB - 1;
        let mantissa = i % SUB;
        ((SUB + mantissa) << shift) + ((1u64 << shift) - 1)
    }

    pub fn record(&self, v: u64) {
        let i = Self::index(v).min(BUCKETS - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
        self.max.store(0, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistSnapshot {
        HistSnapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

#[derive(Clone, Debug)]
pub struct HistSnapshot {
    counts: Vec<u64>,
    max: u64,
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// (latency ms, cumulative fraction) points for the distribution chart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdf: Vec<(f64, f64)>,
}

impl HistSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn quantile_us(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Histogram::value_of(i).min(self.max);
            }
        }
        self.max
    }

    pub fn summary(&self, with_cdf: bool) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        let total = self.count();
        let mut cdf = Vec::new();
        if with_cdf && total > 0 {
            let mut seen = 0u64;
            for (i, c) in self.counts.iter().enumerate() {
                if *c == 0 {
                    continue;
                }
                seen += c;
                cdf.push((
                    ms(Histogram::value_of(i).min(self.max)),
                    seen as f64 / total as f64,
                ));
            }
        }
        LatencySummary {
            count: total,
            p50_ms: ms(self.quantile_us(0.50)),
            p90_ms: ms(self.quantile_us(0.90)),
            p99_ms: ms(self.quantile_us(0.99)),
            p999_ms: ms(self.quantile_us(0.999)),
            max_ms: ms(self.max),
            cdf,
        }
    }
}

/// CPU time and resident memory of a process, from /proc.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ProcSample {
    pub cpu_seconds: f64,
    /// User-space and kernel CPU, separately (`cpu_seconds` is their sum).
    pub user_seconds: f64,
    pub system_seconds: f64,
    pub rss_bytes: u64,
    /// `syscw` of /proc/PID/io: `write` and `writev` calls (the eventfd writes of the runtime's
    /// wake-ups among them), **not** `send`/`sendto`/`sendmsg`, which is how tokio writes to a
    /// TCP socket: the strace step counts socket writes. 0 when /proc/PID/io cannot be read.
    pub write_syscalls: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

pub fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .ok_or_else(|| anyhow::anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime is field 14, stime 15 (1-based); after the name we start at field 3.
    let utime: f64 = fields.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let write_syscalls = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("syscw:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    Ok(ProcSample {
        cpu_seconds: (utime + stime) / clock_ticks(),
        user_seconds: utime / clock_ticks(),
        system_seconds: stime / clock_ticks(),
        rss_bytes: rss_kb * 1024,
        write_syscalls,
    })
}

/// CPU seconds (user + system) of this process so far.
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User and system CPU seconds of this process so far, separately.
pub fn self_cpu_split() -> (f64, f64) {
    // SAFETY: as above.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return (0.0, 0.0);
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// Raise the soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit write/read the struct we pass.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        }
        rl.rlim_cur as u64
    }
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, Default)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub open_files_limit: u64,
    /// 1-minute load average when the run started (/proc/loadavg).
    #[serde(default)]
    pub load_average_1m: f64,
}

/// The 1-minute load average (/proc/loadavg), 0 when it cannot be read.
pub fn load_average_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem_kb: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu_model,
        kernel,
        memory_gib: (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        open_files_limit: raise_nofile(),
        load_average_1m: load_average_1m(),
    }
}

/// Extracts `key=<digits>` from a frame (the marker the load generator puts in payloads).
pub fn marker(frame: &str, key: &str) -> Option<u64> {
    let mut from = 0;
    while let Some(pos) = frame[from..].find(key) {
        let start = from + pos + key.len();
        let rest = &frame.as_bytes()[start..];
        if rest.first() == Some(&b'=') {
            let digits = rest[1..].iter().take_while(|b| b.is_ascii_digit()).count();
            if digits > 0 {
                return frame[start + 1..start + 1 + digits].parse().ok();
            }
        }
        from = start;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let s = h.snapshot();
        let p50 = s.quantile_us(0.5) as f64;
        let p99 = s.quantile_us(0.99) as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.04, "{p50}");
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.04, "{p99}");
        assert_eq!(s.count(), 10_000);
        assert_eq!(s.quantile_us(1.0), 10_000);
    }

    #[test]
    fn marker_parses() {
        let f = r#"{"topic":"load","message":{"lt":"step=3 seq=17 ts=1234567"}}"#;
        assert_eq!(marker(f, "step"), Some(3));
        assert_eq!(marker(f, "seq"), Some(17));
        assert_eq!(marker(f, "ts"), Some(1234567));
        assert_eq!(marker("no marker", "ts"), None);
    }
}
