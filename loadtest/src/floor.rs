//! The physical floor: CPU per small write() over loopback TCP with as many sockets as the
//! gateway holds. The receiving ends live in a child process (like the clients of a gateway),
//! so this process's CPU is the sender's: the write() system call plus the loopback receive
//! path that the kernel runs in the sender's context.

use crate::common::Common;
use crate::report::{self, machine_md, Envelope, Output};
use crate::sampler::{CPU_SPLIT_SAMPLED, CPU_SPLIT_TICKS};
use crate::stats;
use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

pub struct FloorParams {
    pub connections: usize,
    pub rate: u64,
    pub duration: f64,
    pub size: usize,
    pub source_ips: usize,
    /// A reader parked on every receiving socket (woken by each write, as a client is), or none:
    /// then a write costs only the sender's side of the loopback path.
    pub parked_reader: bool,
}

#[derive(Serialize, Clone, Debug)]
pub struct FloorResult {
    pub connections: usize,
    pub size: usize,
    pub target_writes_per_second: u64,
    pub writes: u64,
    pub writes_per_second: f64,
    pub would_block: u64,
    /// The sending process's CPU over the writes: exact in sum (getrusage), split into user
    /// space and kernel by the share of perf samples taken in user space, as the servers' CPU
    /// is (`cpu_split` says which; without perf, the tick-based getrusage split).
    pub user_seconds: f64,
    pub system_seconds: f64,
    pub cpu_split: &'static str,
    /// CPU per write() of one message (user + system), microseconds.
    pub us_per_write: f64,
    /// CPU per message when 16 messages share one write(), microseconds.
    pub coalesced_us_per_message: f64,
}

/// Write `total` messages paced at `rate`, `per_write` messages per write() call, round-robin
/// over the sockets. Returns (writes done, would-block count, user s, system s, elapsed s).
fn paced_writes(
    socks: &[TcpStream],
    rate: f64,
    duration: f64,
    size: usize,
    per_write: usize,
) -> (u64, u64, f64, f64, f64) {
    let buf = vec![b'x'; size * per_write];
    let write_rate = rate / per_write as f64;
    let total = (write_rate * duration) as u64;
    let (u0, s0) = stats::self_cpu_split();
    let start = Instant::now();
    let (mut done, mut blocked, mut i) = (0u64, 0u64, 0usize);
    while done < total {
        let due = ((start.elapsed().as_secs_f64() * write_rate) as u64 + 1).min(total);
        while done < due {
            let fd = socks[i % socks.len()].as_raw_fd();
            i += 1;
            // send(2) with MSG_NOSIGNAL, as Rust's standard library (so tokio, so the gateway)
            // writes to a TCP socket.
            // SAFETY: sending from a live buffer on a socket we own.
            let n = unsafe {
                libc::send(
                    fd,
                    buf.as_ptr() as *const libc::c_void,
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                blocked += 1;
            }
            done += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (u1, s1) = stats::self_cpu_split();
    (done, blocked, u1 - u0, s1 - s0, elapsed)
}

pub async fn measure(p: &FloorParams) -> anyhow::Result<FloorResult> {
    let mut v = measure_rates(p, &[p.rate]).await?;
    v.pop().ok_or_else(|| anyhow!("floor: no result"))
}

/// Measures the floor at each of `rates` on one set of socket pairs.
pub async fn measure_rates(p: &FloorParams, rates: &[u64]) -> anyhow::Result<Vec<FloorResult>> {
    stats::raise_nofile();
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let exe = std::env::current_exe().context("locating the load generator binary")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("floor-sink");
    if !p.parked_reader {
        cmd.arg("--no-read");
    }
    let mut child = cmd
        .args([
            "--connect",
            &addr.to_string(),
            "--count",
            &p.connections.to_string(),
            "--source-ips",
            &p.source_ips.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the floor sink")?;
    let n = p.connections;
    let socks = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<TcpStream>> {
        let mut socks = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs(120);
        while socks.len() < n {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true)?;
                    s.set_nodelay(true)?;
                    socks.push(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!(
                            "floor: only {} of {n} sink connections arrived",
                            socks.len()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(socks)
    })
    .await??;
    // Let the sink settle into its read loops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (duration, size) = (p.duration, p.size);
    let mut runs = Vec::new();
    let mut socks = socks;
    for &r in rates {
        // This process's threads are sampled while they write, as a server's are in a step.
        let sampler = crate::sampler::start(&[std::process::id()], &format!("floor{r}")).await;
        let (run, back) = tokio::task::spawn_blocking(move || {
            let run = paced_writes(&socks, r as f64, duration, size, 1);
            (run, socks)
        })
        .await?;
        socks = back;
        let samples = match sampler {
            Some(s) => s.stop().await.ok(),
            None => None,
        };
        runs.push((r, run, samples.and_then(|s| s.user_share())));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let first = rates.first().copied().unwrap_or(100_000) as f64;
    let (coalesced, socks) = tokio::task::spawn_blocking(move || {
        let run = paced_writes(&socks, first, duration.min(2.0), size, 16);
        (run, socks)
    })
    .await?;
    drop(socks);
    drop(child.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let _ = child.kill().await;
    let (cw, _, cu, cs, _) = coalesced;
    let coalesced_us = (cu + cs) * 1e6 / (cw.max(1) * 16) as f64;
    Ok(runs
        .into_iter()
        .map(|(rate, (writes, blocked, u, s, elapsed), share)| {
            let (user_seconds, system_seconds, cpu_split) = match share {
                Some(share) => ((u + s) * share, (u + s) * (1.0 - share), CPU_SPLIT_SAMPLED),
                None => (u, s, CPU_SPLIT_TICKS),
            };
            FloorResult {
                connections: n,
                size,
                target_writes_per_second: rate,
                writes,
                writes_per_second: writes as f64 / elapsed.max(1e-9),
                would_block: blocked,
                user_seconds,
                system_seconds,
                cpu_split,
                us_per_write: (u + s) * 1e6 / writes.max(1) as f64,
                coalesced_us_per_message: coalesced_us,
            }
        })
        .collect())
}

/// The receiving side of the floor measurement (a hidden subcommand, run as a child process).
pub async fn sink(
    connect: SocketAddr,
    count: usize,
    source_ips: usize,
    no_read: bool,
) -> anyhow::Result<()> {
    stats::raise_nofile();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let sock = tokio::net::TcpSocket::new_v4()?;
        if source_ips > 1 {
            let ip =
                Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + (i % source_ips) as u32);
            sock.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0)))?;
        }
        let mut stream = sock
            .connect(connect)
            .await
            .map_err(|e| anyhow!("floor sink connect {i}: {e}"))?;
        tasks.push(tokio::spawn(async move {
            if no_read {
                // Hold the socket until the parent says stop; never read it.
                std::future::pending::<()>().await;
            }
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }));
    }
    // Exit when the parent closes our stdin (or all sockets end).
    let mut stdin = tokio::io::stdin();
    let mut b = [0u8; 1];
    tokio::select! {
        _ = stdin.read(&mut b) => {},
        _ = futures_util::future::join_all(tasks) => {},
    }
    Ok(())
}

#[derive(clap::Args, Clone, Debug)]
pub struct FloorArgs {
    #[command(flatten)]
    pub common: Common,
    /// Loopback socket pairs (the same number as the gateway's connections).
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Writes per second.
    #[arg(long, default_value_t = 200_000)]
    pub rate: u64,
    /// Seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
    /// Measure without a reader parked on the receiving sockets (the sink holds them and never
    /// reads), so the figure is the sending side only.
    #[arg(long)]
    pub no_reader: bool,
}

pub async fn run(a: FloorArgs) -> anyhow::Result<()> {
    let machine = stats::machine();
    let r = measure(&FloorParams {
        connections: a.connections,
        rate: a.rate,
        duration: a.duration,
        size: a.size,
        source_ips: a.common.source_ips,
        parked_reader: !a.no_reader,
    })
    .await?;
    eprintln!(
        "floor: {} sockets, {:.0} writes/s: {:.2} us CPU per write ({:.2} us per message coalesced x16)",
        r.connections, r.writes_per_second, r.us_per_write, r.coalesced_us_per_message
    );
    let out = Output {
        dir: &a.common.out,
        name: a.common.name.clone().unwrap_or_else(|| "floor".into()),
    };
    let mut md = format!("# floor\n\n`{}`\n\n", report::command_line());
    md += &machine_md(&machine);
    let _ = writeln!(
        md,
        "\n{} loopback TCP socket pairs (TCP_NODELAY), one {}-byte send() per message, round-robin over the sockets, {:.0} writes/s; {}.\n\n| figure | value |\n| --- | --- |\n| CPU per write (user + system) | **{:.2} µs** |\n| of which user / system | {:.3} s / {:.3} s |\n| would-block writes | {} |\n| CPU per message, 16 messages per write() | {:.2} µs |",
        r.connections, r.size, r.writes_per_second,
        if a.no_reader { "no reader on the receiving sockets (they are held, never read)" } else { "a reader parked on every receiving socket, in another process" },
        r.us_per_write, r.user_seconds, r.system_seconds, r.would_block, r.coalesced_us_per_message
    );
    out.write_md(&md)?;
    out.write_json(&Envelope {
        scenario: "floor",
        target: "kernel",
        started_at: report::utc_now(),
        command: report::command_line(),
        machine,
        params: serde_json::json!({"connections": a.connections, "rate": a.rate, "duration_seconds": a.duration, "size": a.size, "parked_reader": !a.no_reader}),
        results: r,
    })?;
    Ok(())
}
