//! Command line and environment: every flag also reads a `WSGATE_*` variable. The whole
//! configuration is validated here, before anything binds, so a bad value is reported in one line
//! (exit code 64) instead of as a half-started node.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};

use crate::broker::RedisCa;

/// Exit code for a configuration error (EX_USAGE from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "wsgate",
    version,
    about = "Horizontally scalable WebSocket gateway for Moqui / GrowERP notifications (/notws) and chat (/chat)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a gateway node.
    Serve(Box<ServeArgs>),
    /// Run a gateway on the in-process broker with a built-in demo back-end, and print how to try it.
    Demo(DemoArgs),
    /// Run only the built-in demo back-end (for load tests and local clusters).
    DemoBackend(DemoBackendArgs),
    /// Connect to a gateway, print what arrives, send what is typed (for trying it by hand).
    Client(ClientArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// WebSocket URL, e.g. ws://127.0.0.1:8081/notws?api_key=demo-key-john
    pub url: String,
    /// Frames to send right after connecting (repeatable), e.g. --send 'subscribe: ALL'
    #[arg(long)]
    pub send: Vec<String>,
}

/// A secret flag: kept as a `SecretString` from the start, so no `Debug` of the arguments
/// prints it.
fn secret(s: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(s))
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Public listener: /notws and /chat, nothing else.
    #[arg(long, env = "WSGATE_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,

    /// Internal listener: /metrics, /healthz, /readyz and the publish API under /api/v1/.
    #[arg(long, env = "WSGATE_ADMIN_LISTEN", default_value = "0.0.0.0:8082")]
    pub admin_listen: SocketAddr,

    /// Base URL of the Moqui / GrowERP back-end.
    #[arg(
        long,
        env = "WSGATE_BACKEND_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub backend_url: String,

    /// Path of the REST call that validates an API key.
    #[arg(
        long,
        env = "WSGATE_AUTH_PATH",
        default_value = "/rest/s1/growerp/100/Authenticate"
    )]
    pub auth_path: String,

    /// classificationId sent with the Authenticate call.
    #[arg(
        long,
        env = "WSGATE_AUTH_CLASSIFICATION_ID",
        default_value = "AppAdmin"
    )]
    pub auth_classification_id: String,

    /// Path of the REST call that lists a chat room's members.
    #[arg(
        long,
        env = "WSGATE_CHAT_ROOM_PATH",
        default_value = "/rest/s1/growerp/100/ChatRoom"
    )]
    pub chat_room_path: String,

    /// JSON pointer to the user id in the Authenticate answer.
    #[arg(
        long,
        env = "WSGATE_USER_ID_POINTER",
        default_value = "/authenticate/user/userId"
    )]
    pub user_id_pointer: String,

    /// JSON pointer to the tenant (company) in the Authenticate answer; empty disables tenants.
    #[arg(
        long,
        env = "WSGATE_TENANT_POINTER",
        default_value = "/authenticate/ownerPartyId"
    )]
    pub tenant_pointer: String,

    /// Cookies that identify a browser session (comma-separated); a handshake without an API key
    /// that carries one of them is authenticated by --session-auth-path with only these cookies.
    #[arg(long, env = "WSGATE_SESSION_COOKIES", default_value = "JSESSIONID")]
    pub session_cookies: String,

    /// Path of the REST call that says who a session cookie belongs to.
    #[arg(
        long,
        env = "WSGATE_SESSION_AUTH_PATH",
        default_value = "/rest/s1/wsgate/whoami"
    )]
    pub session_auth_path: String,

    /// JSON pointer to the user id in the session call's answer.
    #[arg(long, env = "WSGATE_SESSION_USER_POINTER", default_value = "/userId")]
    pub session_user_pointer: String,

    /// JSON pointer to the tenant in the session call's answer; empty disables tenants.
    #[arg(
        long,
        env = "WSGATE_SESSION_TENANT_POINTER",
        default_value = "/ownerPartyId"
    )]
    pub session_tenant_pointer: String,

    /// Origins (comma-separated, e.g. https://erp.example.com) besides the request's own from
    /// which a browser may connect; also checked for key-authenticated handshakes with an Origin.
    #[arg(long, env = "WSGATE_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,

    /// Timeout of one back-end call.
    #[arg(long, env = "WSGATE_BACKEND_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub backend_timeout: Duration,

    /// Back-end calls (Authenticate, whoami, ChatRoom) in flight at once on this node; the rest wait.
    #[arg(long, env = "WSGATE_BACKEND_CONCURRENCY", default_value_t = 32)]
    pub backend_concurrency: usize,

    /// Back-end calls that may wait for a free slot; more are refused at once (503).
    #[arg(long, env = "WSGATE_BACKEND_QUEUE", default_value_t = 20_000)]
    pub backend_queue: usize,

    /// Longest a back-end call waits for a free slot before the handshake gets 503 with Retry-After.
    #[arg(long, env = "WSGATE_BACKEND_QUEUE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub backend_queue_timeout: Duration,

    /// How long an accepted API key is cached.
    #[arg(long, env = "WSGATE_AUTH_TTL", default_value = "60s", value_parser = duration)]
    pub auth_ttl: Duration,

    /// How long a rejected API key is cached.
    #[arg(long, env = "WSGATE_AUTH_NEGATIVE_TTL", default_value = "5s", value_parser = duration)]
    pub auth_negative_ttl: Duration,

    /// How long a last accepted answer may still be used while the back-end is unreachable (0 = never).
    #[arg(long, env = "WSGATE_AUTH_SERVE_STALE", default_value = "0s", value_parser = duration)]
    pub auth_serve_stale: Duration,

    /// Most API keys held in the auth cache.
    #[arg(long, env = "WSGATE_AUTH_CACHE_CAPACITY", default_value_t = 100_000)]
    pub auth_cache_capacity: u64,

    /// How long a chat room's member list is cached.
    #[arg(long, env = "WSGATE_CHAT_ROOM_TTL", default_value = "10s", value_parser = duration)]
    pub chat_room_ttl: Duration,

    /// Redis URL (redis://, or rediss:// for TLS: the certificate must chain to a public root, or to a CA of --redis-ca-file, or `rediss://…/#insecure` skips verification), or a comma-separated list of Sentinels or Cluster seed nodes (see --redis-mode). Absent: a single node on the in-process broker.
    #[arg(long, env = "WSGATE_REDIS_URL", hide_env_values = true, value_parser = secret)]
    pub redis_url: Option<SecretString>,

    /// How --redis-url is used: one server (standalone), Sentinels that name the master (sentinel), or Cluster seed nodes with sharded pub/sub (cluster).
    #[arg(long, env = "WSGATE_REDIS_MODE", value_enum, default_value_t = RedisMode::Standalone)]
    pub redis_mode: RedisMode,

    /// The master set the Sentinels watch (required with --redis-mode sentinel).
    #[arg(long, env = "WSGATE_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// PEM file with the CA certificates (one or more) that rediss:// servers are verified against, instead of the public roots, like redis-cli --cacert: the server, the Sentinels and the master they name, every Cluster node. Needs rediss:// URLs without #insecure.
    #[arg(long, env = "WSGATE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Prefix of every Redis channel and key, so several installations can share one Redis.
    #[arg(long, env = "WSGATE_REDIS_PREFIX", default_value = "wsgate")]
    pub redis_prefix: String,

    /// Connections in the Redis publish pool.
    #[arg(long, env = "WSGATE_REDIS_POOL_SIZE", default_value_t = 8)]
    pub redis_pool_size: usize,

    /// This node's name in presence and logs (default: host name plus a random suffix).
    #[arg(long, env = "WSGATE_NODE_ID")]
    pub node_id: Option<String>,

    /// After a node crash its users read offline within this bound.
    #[arg(long, env = "WSGATE_PRESENCE_TTL", default_value = "15s", value_parser = duration)]
    pub presence_ttl: Duration,

    /// How long each channel keeps its messages for recovery (0 turns recovery off).
    #[arg(long, env = "WSGATE_HISTORY_TTL", default_value = "60s", value_parser = duration)]
    pub history_ttl: Duration,

    /// While publishes come in bursts, how long one that finds no round trip to Redis under way
    /// waits for the rest of its burst (0: never), so that a burst reaches each recipient in one
    /// write. A caller that publishes one at a time does not wait it (but for four publishes after
    /// a burst of others).
    #[arg(long, env = "WSGATE_PUBLISH_LINGER", default_value = "2ms", value_parser = duration)]
    pub publish_linger: Duration,

    /// Bytes of live messages a node holds while their delivery waits for a recovery from
    /// history (after a reconnect, or a gap); past it they are read back from history after.
    #[arg(long, env = "WSGATE_MAX_RECOVERY_HOLD", default_value_t = 16_777_216)]
    pub max_recovery_hold: usize,

    /// How long the last unsubscribe of a channel is delayed, to absorb reconnect churn.
    #[arg(long, env = "WSGATE_UNSUBSCRIBE_DELAY", default_value = "2s", value_parser = duration)]
    pub unsubscribe_delay: Duration,

    /// How long a user's /notws topics are remembered for a reconnect that sends no subscribe frame (0 = off).
    #[arg(long, env = "WSGATE_RESUBSCRIBE_WINDOW", default_value = "10m", value_parser = duration)]
    pub resubscribe_window: Duration,

    /// How long a connection closed by a drain can resume on any node and receive what it missed (0 = off).
    #[arg(long, env = "WSGATE_RESUME_WINDOW", default_value = "30s", value_parser = duration)]
    pub resume_window: Duration,

    /// Bearer token of the publish API. Without it the API answers 403.
    #[arg(long, env = "WSGATE_API_TOKEN", hide_env_values = true, value_parser = secret)]
    pub api_token: Option<SecretString>,

    /// Largest client frame in bytes; a larger one closes the connection with 1009.
    #[arg(long, env = "WSGATE_MAX_FRAME_SIZE", default_value_t = 65_536)]
    pub max_frame_size: usize,

    /// Largest publish API request body in bytes (413 above).
    #[arg(long, env = "WSGATE_MAX_API_BODY", default_value_t = 1_048_576)]
    pub max_api_body: usize,

    /// Messages queued for one connection before it is closed as a slow consumer (4008).
    #[arg(long, env = "WSGATE_OUTBOUND_QUEUE", default_value_t = 256)]
    pub outbound_queue: usize,

    /// Bytes queued for one connection before it is closed as a slow consumer (4008).
    #[arg(long, env = "WSGATE_OUTBOUND_QUEUE_BYTES", default_value_t = 1_048_576)]
    pub outbound_queue_bytes: usize,

    /// Open connections per user on this node (0 = unlimited); more are refused with 429.
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    pub max_connections_per_user: usize,

    /// Topics one connection may hold; a subscribe beyond it closes the connection (1008).
    #[arg(long, env = "WSGATE_MAX_TOPICS", default_value_t = 1_000)]
    pub max_topics: usize,

    /// Client frames per second per connection (a burst of twice this is allowed); beyond it
    /// the connection is closed (1008).
    #[arg(long, env = "WSGATE_MAX_FRAMES_PER_SECOND", default_value_t = 100)]
    pub max_frames_per_second: u32,

    /// Longest one socket write (messages, ping, close) may take before the connection is
    /// dropped (4008).
    #[arg(long, env = "WSGATE_WRITE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub write_timeout: Duration,
    /// Longest time a client may take to send a request's headers; slower connections are
    /// dropped (slowloris). Also bounds an idle keep-alive connection.
    #[arg(long, env = "WSGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,

    /// Open WebSocket connections on this node (0 = unlimited); more are refused with 503.
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// WebSocket handshakes per second from one client IP, with a burst of as many (0 = unlimited); more get 429.
    #[arg(long, env = "WSGATE_MAX_HANDSHAKES_PER_IP", default_value_t = 100)]
    pub max_handshakes_per_ip: u32,

    /// Proxies (comma-separated IPs or CIDRs, e.g. 10.0.0.0/8) whose X-Forwarded-For names the
    /// client IP; from any other peer the header is ignored and the TCP peer is the client.
    #[arg(long, env = "WSGATE_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,

    /// Interval between pings; a peer silent for two intervals is closed (4000).
    #[arg(long, env = "WSGATE_PING_INTERVAL", default_value = "30s", value_parser = duration)]
    pub ping_interval: Duration,

    /// On SIGTERM, open sockets are closed (1012) spread over this window.
    #[arg(long, env = "WSGATE_DRAIN_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// Log format: text or json.
    #[arg(long, env = "WSGATE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Log filter (tracing syntax, e.g. info or wsgate=debug).
    #[arg(long, env = "WSGATE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Public listener of the demo gateway.
    #[arg(long, env = "WSGATE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Internal listener of the demo gateway.
    #[arg(long, env = "WSGATE_ADMIN_LISTEN", default_value = "127.0.0.1:8082")]
    pub admin_listen: SocketAddr,
    /// Listener of the built-in demo back-end.
    #[arg(long, default_value = "127.0.0.1:8083")]
    pub backend_listen: SocketAddr,
}

#[derive(Debug, Clone, Args)]
pub struct DemoBackendArgs {
    /// Listener of the demo back-end.
    #[arg(long, default_value = "127.0.0.1:8083")]
    pub listen: SocketAddr,
}

/// A configuration value that cannot work, named by its flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for {flag}: {problem}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub problem: String,
}

fn bad(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        problem: problem.into(),
    }
}

/// The validated configuration of one gateway node.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub backend_url: Url,
    pub auth_url: Url,
    pub chat_room_url: Url,
    pub user_id_pointer: String,
    pub tenant_pointer: Option<String>,
    /// Names of the session cookies forwarded to the session call (never their values).
    pub session_cookies: Vec<String>,
    pub session_auth_url: Url,
    pub session_user_pointer: String,
    pub session_tenant_pointer: Option<String>,
    /// Exact origins (`scheme://host[:port]`) allowed besides the request's own.
    pub allowed_origins: Vec<String>,
    pub backend_timeout: Duration,
    /// At least 1.
    pub backend_concurrency: usize,
    pub backend_queue: usize,
    pub backend_queue_timeout: Duration,
    pub auth_ttl: Duration,
    pub auth_negative_ttl: Duration,
    pub auth_serve_stale: Duration,
    pub auth_cache_capacity: u64,
    pub chat_room_ttl: Duration,
    /// May hold a password: typed so that `Debug` shows `[REDACTED]`.
    pub redis_url: Option<SecretString>,
    pub redis_mode: RedisMode,
    /// Set exactly when `redis_mode` is `Sentinel`.
    pub redis_sentinel_master: Option<String>,
    /// `--redis-ca-file`, read and parsed: set only with `rediss://` URLs without `#insecure`.
    pub redis_ca: Option<RedisCa>,
    pub redis_prefix: String,
    pub redis_pool_size: usize,
    pub node_id: String,
    pub presence_ttl: Duration,
    pub history_ttl: Duration,
    pub publish_linger: Duration,
    pub max_recovery_hold: usize,
    pub unsubscribe_delay: Duration,
    /// Zero: nothing is remembered.
    pub resubscribe_window: Duration,
    /// Zero: drained connections do not resume.
    pub resume_window: Duration,
    /// The publish API's bearer token: typed so that `Debug` shows `[REDACTED]`.
    pub api_token: Option<SecretString>,
    pub max_frame_size: usize,
    pub max_api_body: usize,
    pub outbound_queue: usize,
    pub outbound_queue_bytes: usize,
    pub max_connections_per_user: usize,
    pub max_topics: usize,
    pub max_frames_per_second: u32,
    pub write_timeout: Duration,
    pub ping_interval: Duration,
    pub drain_timeout: Duration,
    pub handshake_timeout: Duration,
    /// WebSocket connections on this node; 0 = unlimited.
    pub max_connections: usize,
    /// Handshakes per second per client IP; 0 = unlimited.
    pub max_handshakes_per_ip: u32,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// Trusted proxies: IPs or CIDRs, comma-separated.
fn proxies(list: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut out = Vec::new();
    for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net = match p.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => match p.parse::<std::net::IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(bad(
                        "--trusted-proxies",
                        format!("'{p}' is not an IP address or CIDR (e.g. 10.0.0.0/8)"),
                    ))
                }
            },
        };
        out.push(net);
    }
    Ok(out)
}

fn pointer(flag: &'static str, p: &str) -> Result<String, ConfigError> {
    if !p.starts_with('/') {
        return Err(bad(
            flag,
            format!("'{p}' is not a JSON pointer (it must start with '/')"),
        ));
    }
    Ok(p.to_owned())
}

/// Cookie names: RFC 6265 tokens, at least one.
fn cookie_names(list: &str) -> Result<Vec<String>, ConfigError> {
    let flag = "--session-cookies";
    let names: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return Err(bad(flag, "needs at least one cookie name"));
    }
    for n in &names {
        let token = n
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !token {
            return Err(bad(flag, format!("'{n}' is not a cookie name")));
        }
    }
    Ok(names)
}

/// Allowed origins: each exactly `http(s)://host[:port]`, as browsers send them.
fn origins(list: &str) -> Result<Vec<String>, ConfigError> {
    let flag = "--allowed-origins";
    let mut out = Vec::new();
    for o in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let parsed = Url::parse(o).map_err(|e| bad(flag, format!("'{o}': {e}")))?;
        let canonical = parsed.origin().ascii_serialization();
        if !matches!(parsed.scheme(), "http" | "https") || canonical != o.to_ascii_lowercase() {
            return Err(bad(
                flag,
                format!("'{o}' is not an origin (scheme://host[:port], no path, e.g. https://erp.example.com)"),
            ));
        }
        out.push(canonical);
    }
    Ok(out)
}

fn nonzero(flag: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(bad(flag, "must be greater than zero"));
    }
    Ok(d)
}

impl ServeArgs {
    /// Checks every value; nothing has been bound or spawned yet.
    pub fn validate(&self) -> Result<Config, ConfigError> {
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err(bad(
                "--admin-listen",
                "must differ from --listen (the internal API is never public)",
            ));
        }
        let backend_url = Url::parse(&self.backend_url)
            .map_err(|e| bad("--backend-url", format!("'{}': {e}", self.backend_url)))?;
        if !matches!(backend_url.scheme(), "http" | "https") || backend_url.host().is_none() {
            return Err(bad(
                "--backend-url",
                format!("'{}' must be an http(s) URL with a host", self.backend_url),
            ));
        }
        let join = |flag: &'static str, path: &str| -> Result<Url, ConfigError> {
            if !path.starts_with('/') {
                return Err(bad(flag, format!("'{path}' must start with '/'")));
            }
            let base = backend_url.as_str().trim_end_matches('/');
            Url::parse(&format!("{base}{path}")).map_err(|e| bad(flag, e.to_string()))
        };
        let mut auth_url = join("--auth-path", &self.auth_path)?;
        if !self.auth_classification_id.is_empty() {
            auth_url
                .query_pairs_mut()
                .append_pair("classificationId", &self.auth_classification_id);
        }
        let chat_room_url = join("--chat-room-path", &self.chat_room_path)?;
        let user_id_pointer = pointer("--user-id-pointer", &self.user_id_pointer)?;
        let tenant_pointer = if self.tenant_pointer.is_empty() {
            None
        } else {
            Some(pointer("--tenant-pointer", &self.tenant_pointer)?)
        };
        let session_cookies = cookie_names(&self.session_cookies)?;
        let session_auth_url = join("--session-auth-path", &self.session_auth_path)?;
        let session_user_pointer = pointer("--session-user-pointer", &self.session_user_pointer)?;
        let session_tenant_pointer = if self.session_tenant_pointer.is_empty() {
            None
        } else {
            Some(pointer(
                "--session-tenant-pointer",
                &self.session_tenant_pointer,
            )?)
        };
        let allowed_origins = origins(self.allowed_origins.as_deref().unwrap_or(""))?;
        let redis_ca = self.validate_redis()?;
        if self.redis_prefix.is_empty()
            || self
                .redis_prefix
                .chars()
                .any(|c| c.is_whitespace() || c == '*' || c == '?' || c == '[')
        {
            return Err(bad(
                "--redis-prefix",
                "must be non-empty, without spaces or glob characters",
            ));
        }
        if self.redis_pool_size == 0 {
            return Err(bad("--redis-pool-size", "must be at least 1"));
        }
        if let Some(t) = &self.api_token {
            if t.expose_secret().trim().is_empty() {
                return Err(bad(
                    "--api-token",
                    "is empty; leave it unset to disable the publish API",
                ));
            }
        }
        if self.max_topics == 0 {
            return Err(bad("--max-topics", "must be at least 1"));
        }
        if self.max_frames_per_second == 0 {
            return Err(bad("--max-frames-per-second", "must be at least 1"));
        }
        if self.max_frame_size < 128 {
            return Err(bad("--max-frame-size", "must be at least 128 bytes"));
        }
        if self.max_api_body < 1024 {
            return Err(bad("--max-api-body", "must be at least 1024 bytes"));
        }
        if self.outbound_queue == 0 {
            return Err(bad("--outbound-queue", "must be at least 1"));
        }
        if self.outbound_queue_bytes < 1024 {
            return Err(bad("--outbound-queue-bytes", "must be at least 1024 bytes"));
        }
        if self.auth_cache_capacity == 0 {
            return Err(bad("--auth-cache-capacity", "must be at least 1"));
        }
        let presence_ttl = nonzero("--presence-ttl", self.presence_ttl)?;
        if presence_ttl < Duration::from_secs(3) || presence_ttl > Duration::from_secs(30) {
            return Err(bad("--presence-ttl", "must be between 3s and 30s"));
        }
        if self.resubscribe_window > Duration::from_secs(24 * 3600) {
            return Err(bad(
                "--resubscribe-window",
                "must be at most 24h (0 turns it off)",
            ));
        }
        if self.publish_linger > Duration::from_millis(100) {
            return Err(bad("--publish-linger", "must be at most 100ms"));
        }
        if self.history_ttl > Duration::from_secs(24 * 3600) {
            return Err(bad("--history-ttl", "must be at most 24h"));
        }
        if !self.history_ttl.is_zero() && self.resume_window > self.history_ttl {
            return Err(bad(
                "--resume-window",
                "must not be longer than --history-ttl (a resume replays from history; 0 turns it off)",
            ));
        }
        let node_id = match &self.node_id {
            Some(id) if id.is_empty() || id.contains(char::is_whitespace) => {
                return Err(bad("--node-id", "must be non-empty without spaces"));
            }
            Some(id) => id.clone(),
            None => default_node_id(),
        };
        Ok(Config {
            listen: self.listen,
            admin_listen: self.admin_listen,
            backend_url,
            auth_url,
            chat_room_url,
            user_id_pointer,
            tenant_pointer,
            session_cookies,
            session_auth_url,
            session_user_pointer,
            session_tenant_pointer,
            allowed_origins,
            backend_timeout: nonzero("--backend-timeout", self.backend_timeout)?,
            backend_concurrency: match self.backend_concurrency {
                0 => return Err(bad("--backend-concurrency", "must be at least 1")),
                n => n,
            },
            backend_queue: self.backend_queue,
            backend_queue_timeout: nonzero("--backend-queue-timeout", self.backend_queue_timeout)?,
            auth_ttl: nonzero("--auth-ttl", self.auth_ttl)?,
            auth_negative_ttl: nonzero("--auth-negative-ttl", self.auth_negative_ttl)?,
            auth_serve_stale: self.auth_serve_stale,
            auth_cache_capacity: self.auth_cache_capacity,
            chat_room_ttl: nonzero("--chat-room-ttl", self.chat_room_ttl)?,
            redis_url: self.redis_url.clone(),
            redis_mode: self.redis_mode,
            redis_sentinel_master: self.redis_sentinel_master.clone(),
            redis_ca,
            redis_prefix: self.redis_prefix.clone(),
            redis_pool_size: self.redis_pool_size,
            node_id,
            presence_ttl,
            history_ttl: self.history_ttl,
            publish_linger: self.publish_linger,
            max_recovery_hold: self.max_recovery_hold,
            unsubscribe_delay: self.unsubscribe_delay,
            resubscribe_window: self.resubscribe_window,
            resume_window: self.resume_window,
            api_token: self.api_token.clone(),
            max_frame_size: self.max_frame_size,
            max_api_body: self.max_api_body,
            outbound_queue: self.outbound_queue,
            outbound_queue_bytes: self.outbound_queue_bytes,
            max_connections_per_user: self.max_connections_per_user,
            max_topics: self.max_topics,
            max_frames_per_second: self.max_frames_per_second,
            write_timeout: nonzero("--write-timeout", self.write_timeout)?,
            ping_interval: nonzero("--ping-interval", self.ping_interval)?,
            drain_timeout: self.drain_timeout,
            handshake_timeout: nonzero("--handshake-timeout", self.handshake_timeout)?,
            max_connections: self.max_connections,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            trusted_proxies: proxies(self.trusted_proxies.as_deref().unwrap_or(""))?,
        })
    }
}

fn default_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "wsgate".to_owned());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

impl ServeArgs {
    /// `--redis-url`, `--redis-mode` and `--redis-sentinel-master` agree; every URL parses; the
    /// CAs of `--redis-ca-file`, read once here, have URLs to verify.
    fn validate_redis(&self) -> Result<Option<RedisCa>, ConfigError> {
        let master = self
            .redis_sentinel_master
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty());
        match (self.redis_mode, master) {
            (RedisMode::Sentinel, None) => {
                return Err(bad(
                    "--redis-sentinel-master",
                    "is required with --redis-mode sentinel (the master set the Sentinels watch)",
                ))
            }
            (RedisMode::Standalone | RedisMode::Cluster, Some(_)) => {
                return Err(bad(
                    "--redis-sentinel-master",
                    "is only used with --redis-mode sentinel",
                ))
            }
            _ => {}
        }
        let Some(list) = self.redis_url.as_ref().map(|u| u.expose_secret()) else {
            if self.redis_mode != RedisMode::Standalone {
                return Err(bad(
                    "--redis-mode",
                    "sentinel and cluster need --redis-url (the Sentinels or the seed nodes)",
                ));
            }
            if self.redis_ca_file.is_some() {
                return Err(bad(
                    "--redis-ca-file",
                    "is only used with --redis-url (it verifies the rediss:// servers)",
                ));
            }
            return Ok(None);
        };
        let urls = split_urls(list);
        if urls.is_empty() {
            return Err(bad("--redis-url", "is empty"));
        }
        if self.redis_mode == RedisMode::Standalone && urls.len() > 1 {
            return Err(bad(
                "--redis-url",
                "takes one URL in standalone mode (a list needs --redis-mode sentinel or cluster)",
            ));
        }
        for url in urls {
            let scheme = url.split("://").next().unwrap_or_default();
            if !matches!(scheme, "redis" | "rediss") || !url.contains("://") {
                return Err(bad(
                    "--redis-url",
                    "must be redis:// or rediss:// URLs (credentials are not shown here)",
                ));
            }
            let Ok(info) = redis::IntoConnectionInfo::into_connection_info(url) else {
                return Err(bad(
                    "--redis-url",
                    "cannot be parsed as a Redis URL (credentials are not shown here)",
                ));
            };
            if self.redis_ca_file.is_some() {
                match info.addr() {
                    redis::ConnectionAddr::TcpTls {
                        insecure: false, ..
                    } => {}
                    redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                        return Err(bad(
                            "--redis-ca-file",
                            "cannot verify a --redis-url with #insecure, which turns verification \
                             off: drop #insecure",
                        ))
                    }
                    _ => {
                        return Err(bad(
                            "--redis-ca-file",
                            "needs rediss:// URLs in --redis-url (redis:// is plain TCP, with no \
                             certificate to verify)",
                        ))
                    }
                }
            }
        }
        self.redis_ca_file.as_deref().map(read_redis_ca).transpose()
    }
}

/// Largest `--redis-ca-file` read: a CA bundle is kilobytes (all public roots together are a few
/// hundred); a path to something else is refused before it is read whole.
const MAX_CA_FILE: u64 = 4 << 20;

/// The CA certificates of a `--redis-ca-file`. Errors name the file and what is wrong with it,
/// never its contents.
pub fn read_redis_ca(path: &Path) -> Result<RedisCa, ConfigError> {
    let flag = "--redis-ca-file";
    let shown = path.display();
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CA_FILE + 1).read_to_end(&mut pem))
        .map_err(|e| bad(flag, format!("cannot read {shown}: {e}")))?;
    if pem.len() as u64 > MAX_CA_FILE {
        return Err(bad(
            flag,
            format!("{shown} is larger than 4 MiB; a CA file holds a few certificates"),
        ));
    }
    RedisCa::from_pem(pem).map_err(|problem| bad(flag, format!("{shown} {problem}")))
}

/// The URLs of a comma-separated `--redis-url`, trimmed, empty entries dropped.
pub fn split_urls(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// How `--redis-url` is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisMode {
    /// One Redis server.
    Standalone,
    /// Sentinels; they name the master of `--redis-sentinel-master`.
    Sentinel,
    /// Redis Cluster seed nodes; channels use sharded pub/sub.
    Cluster,
}

impl Config {
    /// The Redis URL, credentials included: only for connecting.
    pub fn redis_url_secret(&self) -> Option<&str> {
        self.redis_url.as_ref().map(|u| u.expose_secret())
    }

    /// A configuration for tests and embedding: defaults with the given back-end, listeners on
    /// loopback port 0.
    pub fn for_backend(backend_url: &str) -> Result<Config, ConfigError> {
        let args = Cli::try_parse_from([
            "wsgate",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backend-url",
            backend_url,
        ])
        .map_err(|e| bad("arguments", e.to_string()))?;
        match args.command {
            Command::Serve(a) => a.validate(),
            _ => Err(bad("arguments", "not serve")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret() {
        let mut cfg = Config::for_backend("http://127.0.0.1:1").expect("config");
        cfg.api_token = Some("tok-very-secret".into());
        cfg.redis_url = Some("redis://user:pw-very-secret@127.0.0.1:6379".into());
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
        assert_eq!(
            cfg.redis_url_secret(),
            Some("redis://user:pw-very-secret@127.0.0.1:6379")
        );
    }

    #[test]
    fn parsed_arguments_show_no_secret_either() {
        let cli = Cli::try_parse_from([
            "wsgate",
            "serve",
            "--api-token",
            "tok-very-secret",
            "--redis-url",
            "redis://:pw-very-secret@127.0.0.1:6379",
        ])
        .expect("parses");
        let shown = format!("{cli:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let cfg = args.validate().expect("valid");
        assert_eq!(
            cfg.api_token.as_ref().map(|t| t.expose_secret()),
            Some("tok-very-secret")
        );
    }

    #[test]
    fn trusted_proxies_take_ips_and_cidrs() {
        let p = proxies("10.0.0.0/8, 192.168.1.7,::1").expect("valid");
        assert_eq!(p.len(), 3);
        assert!(p[1].contains(&"192.168.1.7".parse::<std::net::IpAddr>().expect("ip")));
        assert!(proxies("10.0.0.0/33").is_err());
        assert!(proxies("proxy.local").is_err());
    }

    /// `wsgate serve` with these arguments, validated.
    fn serve(args: &[&str]) -> Result<Config, ConfigError> {
        let cli = Cli::try_parse_from(["wsgate", "serve"].iter().chain(args)).expect("parses");
        let Command::Serve(a) = cli.command else {
            panic!("serve")
        };
        a.validate()
    }

    /// A file in a directory of its own, removed on drop.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &str) -> TempFile {
            let dir = std::env::temp_dir().join(format!(
                "wsgate-config-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).expect("a temporary directory");
            let path = dir.join(name);
            std::fs::write(&path, contents).expect("write the file");
            TempFile(path)
        }

        fn arg(&self) -> &str {
            self.0.to_str().expect("a UTF-8 temporary path")
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn ca_error(args: &[&str]) -> String {
        let e = serve(args).expect_err("refused");
        assert_eq!(e.flag, "--redis-ca-file", "{e}");
        e.to_string()
    }

    #[test]
    fn a_ca_file_verifies_rediss_urls_in_every_mode() {
        let ca = crate::broker::test_ca::TestCa::new();
        let other = crate::broker::test_ca::TestCa::new();
        // A bundle of two CAs, with a key someone left in the same file: the key is skipped.
        let key = rcgen::KeyPair::generate().expect("a key").serialize_pem();
        let file = TempFile::new("ca.pem", &format!("{}{key}{}", ca.pem(), other.pem()));
        let cfg = serve(&[
            "--redis-url",
            "rediss://127.0.0.1:6380",
            "--redis-ca-file",
            file.arg(),
        ])
        .expect("valid");
        assert_eq!(cfg.redis_ca.as_ref().map(RedisCa::len), Some(2));
        assert_eq!(
            format!("{:?}", cfg.redis_ca),
            "Some(RedisCa(2 certificates))"
        );
        let two = "rediss://127.0.0.1:7000,rediss://127.0.0.1:7001";
        let sentinel = serve(&[
            "--redis-mode",
            "sentinel",
            "--redis-sentinel-master",
            "m",
            "--redis-url",
            two,
            "--redis-ca-file",
            file.arg(),
        ])
        .expect("valid");
        assert!(sentinel.redis_ca.is_some());
        let cfg = serve(&[
            "--redis-mode",
            "cluster",
            "--redis-url",
            two,
            "--redis-ca-file",
            file.arg(),
        ])
        .expect("valid");
        assert!(cfg.redis_ca.is_some());
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let file = TempFile::new("present.pem", "");
        let missing = file.0.with_file_name("missing.pem");
        let missing = missing.to_str().expect("UTF-8");
        let text = ca_error(&[
            "--redis-url",
            "rediss://127.0.0.1:6380",
            "--redis-ca-file",
            missing,
        ]);
        assert!(text.contains("cannot read"), "{text}");
        assert!(text.contains(missing), "{text}");
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused_without_showing_it() {
        let key = rcgen::KeyPair::generate().expect("a key").serialize_pem();
        let secret_line = key.lines().nth(1).expect("a base64 line").to_owned();
        for contents in [key.as_str(), "", "not PEM at all\n"] {
            let file = TempFile::new("ca.pem", contents);
            let text = ca_error(&[
                "--redis-url",
                "rediss://127.0.0.1:6380",
                "--redis-ca-file",
                file.arg(),
            ]);
            assert!(text.contains("holds no PEM certificate"), "{text}");
            assert!(!text.contains(&secret_line), "{text}");
        }
        let broken = TempFile::new("ca.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
        let text = ca_error(&[
            "--redis-url",
            "rediss://127.0.0.1:6380",
            "--redis-ca-file",
            broken.arg(),
        ]);
        assert!(text.contains("without its END line"), "{text}");
    }

    #[test]
    fn a_ca_file_needs_rediss_urls_that_verify() {
        let ca = crate::broker::test_ca::TestCa::new();
        let file = TempFile::new("ca.pem", &ca.pem());
        let text = ca_error(&["--redis-ca-file", file.arg()]);
        assert!(text.contains("only used with --redis-url"), "{text}");
        let text = ca_error(&[
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-ca-file",
            file.arg(),
        ]);
        assert!(text.contains("needs rediss:// URLs"), "{text}");
        let text = ca_error(&[
            "--redis-url",
            "rediss://:pw-very-secret@127.0.0.1:6380/#insecure",
            "--redis-ca-file",
            file.arg(),
        ]);
        assert!(text.contains("#insecure"), "{text}");
        assert!(!text.contains("very-secret"), "{text}");
    }
}
