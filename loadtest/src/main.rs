//! wsgate-loadtest: drives real WebSocket clients against wsgate (or the Socket.IO peer) and
//! measures connections, fan-out, chat and reconnect storms, next to the kernel's own floor.

mod backend_storm;
mod client;
mod common;
mod compare;
mod floor;
mod report;
mod sampler;
mod scenarios;
mod slow_backend;
mod stats;
mod strace;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;

#[derive(Parser)]
#[command(name = "wsgate-loadtest", version, about)]
struct Cli {
    /// Tokio worker threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open N connections, subscribe, hold them; server RSS per connection.
    Idle(scenarios::IdleArgs),
    /// N subscribers, notifications to R recipients at a swept rate; loss, latency, CPU.
    Fanout(scenarios::FanoutArgs),
    /// Pairs of users on different nodes chatting at a set rate; latency and loss.
    Chat(scenarios::ChatArgs),
    /// N clients (re)connect within a few seconds; time until all are back, back-end calls.
    Storm(scenarios::StormArgs),
    /// N distinct users at once against a slow back-end; time until all are back, back-end calls.
    BackendStorm(backend_storm::BackendStormArgs),
    /// A back-end with a small worker pool (like a servlet container), for `backend-storm`.
    SlowBackend(slow_backend::SlowBackendArgs),
    /// CPU per small write() over loopback TCP with N socket pairs (the physical floor).
    Floor(floor::FloorArgs),
    /// Print and write the wsgate-versus-peer ratios from a directory of results.
    Compare(compare::CompareArgs),
    /// Receiving side of `floor` (run as a child process).
    #[command(hide = true)]
    FloorSink {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 1)]
        source_ips: usize,
        /// Hold the sockets without reading (no reader parked on them).
        #[arg(long)]
        no_read: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    stats::raise_nofile();
    if let Cmd::Compare(a) = cli.cmd {
        if let Err(e) = compare::run(a) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let res = rt.block_on(async move {
        match cli.cmd {
            Cmd::Idle(a) => scenarios::idle(a).await,
            Cmd::Fanout(a) => scenarios::fanout(a).await,
            Cmd::Chat(a) => scenarios::chat(a).await,
            Cmd::Storm(a) => scenarios::storm(a).await,
            Cmd::BackendStorm(a) => backend_storm::run(a).await,
            Cmd::SlowBackend(a) => slow_backend::run(a).await,
            Cmd::Floor(a) => floor::run(a).await,
            Cmd::FloorSink {
                connect,
                count,
                source_ips,
                no_read,
            } => floor::sink(connect, count, source_ips, no_read).await,
            Cmd::Compare(_) => Ok(()),
        }
    });
    // Do not wait for connection tasks still winding down.
    rt.shutdown_background();
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
