use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use wsgate::config::{Cli, Command, ServeArgs, EXIT_CONFIG};
use wsgate::{demo, server};

// The allocator: see ARCHITECTURE.md, "Memory per connection". jemalloc by default: its
// size-class slabs keep the many small blocks an idle connection holds apart from the large
// transient buffers of a handshake, so a reconnect storm leaves less memory behind than with
// glibc's malloc.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at start (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them): a background thread returns freed pages to the system within about a second
/// even when the node is idle afterwards (without it, pages are purged only while the process
/// allocates), and pages are returned at once instead of being kept as lazily freed.
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: Option<&'static u8> = Some(&JEMALLOC_OPTIONS[0]);
#[cfg(feature = "jemalloc")]
const JEMALLOC_OPTIONS: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line that names the flag and what is wrong.
            let msg = e.to_string();
            eprintln!("{}", msg.lines().next().unwrap_or("invalid arguments"));
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Demo(args) => demo_cmd(args).await,
            Command::DemoBackend(args) => demo_backend(args).await,
            Command::Client(args) => match wsgate::client::run(&args.url, &args.send).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

fn init_logging(format: &str, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn bind(flag: &str, addr: std::net::SocketAddr) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(addr).await.map_err(|e| {
        eprintln!("error: cannot listen on {addr} ({flag}): {e}");
        ExitCode::FAILURE
    })
}

/// Validates before anything binds; a bad value is one line and exit code 64.
fn validate(args: &ServeArgs) -> Result<wsgate::config::Config, ExitCode> {
    args.validate().map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

async fn bind_both(
    config: &wsgate::config::Config,
) -> Result<(TcpListener, TcpListener), ExitCode> {
    let public = bind("--listen", config.listen).await?;
    let admin = bind("--admin-listen", config.admin_listen).await?;
    Ok((public, admin))
}

async fn serve(args: ServeArgs) -> ExitCode {
    if let Err(problem) = tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        eprintln!("error: invalid value for --log-level: {problem}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let config = match validate(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&args.log_format, &args.log_level);
    let (public, admin) = match bind_both(&config).await {
        Ok(pair) => pair,
        Err(code) => return code,
    };
    run_node(config, public, admin).await
}

async fn run_node(
    config: wsgate::config::Config,
    public: TcpListener,
    admin: TcpListener,
) -> ExitCode {
    let broker = if config.redis_url.is_some() {
        "redis"
    } else {
        "in-process"
    };
    let node_id = config.node_id.clone();
    let state = match server::AppState::new(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        public = %public.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        broker,
        node = %node_id,
        "wsgate listening"
    );
    match server::run(state, public, admin, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}

/// The gateway and the demo back-end in one process. The demo page is served by the back-end
/// (as Moqui serves its screens) and opens its WebSockets on the gateway's port: another origin,
/// so the gateway is started with `--allowed-origins` set to the page's origin. Cookies are not
/// scoped by port, so the browser sends the back-end's session cookie to the gateway.
async fn demo_cmd(args: wsgate::config::DemoArgs) -> ExitCode {
    init_logging("text", "info");
    let backend = match bind("--backend-listen", args.backend_listen).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let backend_addr = backend.local_addr().unwrap_or(args.backend_listen);
    let backend_url = format!("http://{backend_addr}");
    let origins = demo::page_origins(backend_addr).join(",");
    let serve = match Cli::try_parse_from([
        "wsgate",
        "serve",
        "--listen",
        &args.listen.to_string(),
        "--admin-listen",
        &args.admin_listen.to_string(),
        "--backend-url",
        &backend_url,
        "--api-token",
        demo::DEMO_TOKEN,
        "--allowed-origins",
        &origins,
    ]) {
        Ok(Cli {
            command: Command::Serve(a),
        }) => a,
        _ => return ExitCode::from(EXIT_CONFIG as u8),
    };
    let config = match validate(&serve) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (public, admin) = match bind_both(&config).await {
        Ok(pair) => pair,
        Err(code) => return code,
    };
    let (p, a) = (
        public.local_addr().unwrap_or(args.listen),
        admin.local_addr().unwrap_or(args.admin_listen),
    );
    let links = demo::GatewayLinks {
        public_port: p.port(),
        admin: a,
    };
    tokio::spawn(demo::serve_demo(backend, links));
    println!("{}", demo::banner(p, a, backend_addr));
    run_node(config, public, admin).await
}

async fn demo_backend(args: wsgate::config::DemoBackendArgs) -> ExitCode {
    init_logging("text", "info");
    let listener = match bind("--listen", args.listen).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "demo back-end listening");
    tokio::select! {
        r = demo::serve_backend(listener) => {
            if let Err(e) = r {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        _ = shutdown_signal() => ExitCode::SUCCESS,
    }
}
