//! Listeners, routers and the node's lifecycle: start, serve, drain, stop.
//!
//! Two listeners: the public one serves only `/notws` and `/chat`; the internal one serves
//! `/metrics`, `/healthz`, `/readyz` and the publish API, and must never be exposed publicly.
//!
//! Upgraded sockets live outside axum's graceful shutdown, so the node drains them itself: on
//! the shutdown signal `/readyz` turns 503, new upgrades get 503, every session closes with 1012
//! at a random moment within `--drain-timeout`, and the process waits for them (with a grace
//! period) before it exits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{client_ip, ConnectionSlots, HandshakeLimiter};
use crate::api::Api;
use crate::auth::{bearer_token, credential_hash, Auth, AuthError};
use crate::backend::{Backend, Credential};
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisSettings};
use crate::broker::{Broker, Topology};
use crate::chat::Chat;
use crate::config::{Config, RedisMode};
use crate::hub::{Hub, HubLimits, RegisterError, ResumeKey, Resumed, Revocation};
use crate::metrics::{Metrics, RejectReason};
use crate::protocol::Endpoint;
use crate::session::{self, Session};
use crate::upgrade::Upgrade;

/// Largest request head (request line and headers) on the public listener; larger → 431.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Everything a node shares between its tasks. One per node: no global state.
pub struct AppState {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub auth: Arc<Auth>,
    pub hub: Arc<Hub>,
    /// What each session uses of the node (chat routing, metrics).
    pub sessions_node: Arc<session::Node>,
    draining: AtomicBool,
    sessions: TaskTracker,
    /// `--max-connections`: a slot per WebSocket, taken before the upgrade.
    slots: ConnectionSlots,
    /// `--max-handshakes-per-ip`.
    handshakes: HandshakeLimiter,
}

/// Errors that stop a node from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("broker: {0}")]
    Broker(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

impl AppState {
    pub async fn new(config: Config) -> Result<Arc<AppState>, StartError> {
        let metrics = Arc::new(Metrics::new());
        let backend = Arc::new(Backend::new(&config, metrics.clone())?);
        let auth = Arc::new(Auth::new(&config, backend.clone(), metrics.clone()));
        let chat = Chat::new(backend, metrics.clone(), config.chat_room_ttl);
        let limits = HubLimits {
            max_connections_per_user: config.max_connections_per_user,
            outbound_queue: config.outbound_queue,
            outbound_queue_bytes: config.outbound_queue_bytes,
            unsubscribe_delay: config.unsubscribe_delay,
            ping_interval: config.ping_interval,
            max_topics: config.max_topics,
            resubscribe_window: config.resubscribe_window,
            resume_window: config.resume_window,
        };
        let session_limits = session::SessionLimits {
            frames_per_second: config.max_frames_per_second,
            write_timeout: config.write_timeout,
            max_frame_size: config.max_frame_size,
        };
        let mut broker_error = None;
        let hub = Hub::new(
            &config.redis_prefix,
            metrics.clone(),
            limits,
            |sink| -> Broker {
                match &config.redis_url {
                    None => Broker::Memory(MemoryBroker::new(sink, config.history_ttl)),
                    Some(url) => match RedisBroker::start(
                        &RedisSettings {
                            topology: topology(&config, url.expose_secret()),
                            ca: config.redis_ca.clone(),
                            prefix: config.redis_prefix.clone(),
                            node_id: config.node_id.clone(),
                            pool_size: config.redis_pool_size,
                            presence_ttl: config.presence_ttl,
                            history_ttl: config.history_ttl,
                            publish_linger: config.publish_linger,
                            hold_limit: config.max_recovery_hold,
                        },
                        sink,
                        metrics.clone(),
                    ) {
                        Ok(b) => Broker::Redis(b),
                        Err(e) => {
                            broker_error = Some(e);
                            Broker::Memory(MemoryBroker::new(Arc::new(NullSink), Duration::ZERO))
                        }
                    },
                }
            },
        );
        if let Some(e) = broker_error {
            return Err(StartError::Broker(e.to_string()));
        }
        {
            let auth = auth.clone();
            hub.on_revoke(Box::new(move |r: &Revocation| match r {
                Revocation::User(u) => auth.forget_user(u),
                Revocation::Credential(h) => auth.forget_credential(*h),
            }));
        }
        hub.start()
            .await
            .map_err(|e| StartError::Broker(e.to_string()))?;
        Ok(Arc::new(AppState {
            metrics: metrics.clone(),
            auth,
            sessions_node: Arc::new(session::Node {
                chat,
                metrics: metrics.clone(),
                limits: session_limits,
            }),
            hub,
            draining: AtomicBool::new(false),
            sessions: TaskTracker::new(),
            slots: ConnectionSlots::new(config.max_connections),
            handshakes: HandshakeLimiter::new(config.max_handshakes_per_ip),
            config,
        }))
    }

    /// Ready: broker up and not draining.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.hub.broker().is_up()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

struct NullSink;
impl crate::broker::MessageSink for NullSink {
    fn deliver(&self, _: &[&str], _: bytes::Bytes, _: Option<crate::broker::StreamId>) {}
    fn flush(&self) {}
}

/// The public router: `/notws` and `/chat`, nothing else.
pub fn public_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/notws", get(notws))
        .route("/chat", get(chat))
        .with_state(state)
}

/// The internal router: health, readiness, metrics, publish API.
pub fn admin_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest(
            "/api/v1",
            crate::api::router(Arc::new(Api {
                hub: state.hub.clone(),
                metrics: state.metrics.clone(),
                token: state.config.api_token.clone(),
                max_body: state.config.max_api_body,
            })),
        )
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !state.hub.broker().is_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.ready.set(state.is_ready() as i64);
    state
        .metrics
        .broker_up
        .set(state.hub.broker().is_up() as i64);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn notws(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Upgrade,
) -> Response {
    upgrade(state, Endpoint::Notws, peer, query, headers, ws).await
}

async fn chat(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Upgrade,
) -> Response {
    upgrade(state, Endpoint::Chat, peer, query, headers, ws).await
}

/// Where the API key and the claimed user id came from.
#[derive(Default)]
struct Credentials {
    key: Option<String>,
    user_id: Option<String>,
}

/// `api_key` or `apiKey` query parameter, `api_key` header, or `Authorization: Bearer`.
fn credentials(query: Option<&str>, headers: &HeaderMap) -> Credentials {
    let mut c = Credentials::default();
    let mut api_key = None;
    let mut api_key_old = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "api_key" if !v.is_empty() => api_key = Some(v.into_owned()),
            "apiKey" if !v.is_empty() => api_key_old = Some(v.into_owned()),
            "userId" if !v.is_empty() => c.user_id = Some(v.into_owned()),
            _ => {}
        }
    }
    let header_key = headers
        .get("api_key")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let bearer = bearer_token::<true>(headers).filter(|v| !v.is_empty());
    c.key = api_key.or(api_key_old).or(header_key).or(bearer);
    c
}

/// The configured session cookies among the request's cookies, as the value of a `Cookie`
/// header for the back-end (`a=1; b=2`); every other cookie of the browser stays here.
fn session_cookies(headers: &HeaderMap, names: &[String]) -> Option<String> {
    let mut picked: Vec<&str> = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';').map(str::trim) {
            let Some((name, val)) = pair.split_once('=') else {
                continue;
            };
            if !val.is_empty() && names.iter().any(|n| n == name.trim()) {
                picked.push(pair);
            }
        }
    }
    (!picked.is_empty()).then(|| picked.join("; "))
}

/// Splits a `Host` header into host and optional port (`[::1]:80`, `example.com`).
fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = if host.starts_with('[') {
        let end = host.find(']')?;
        let rest = &host[end + 1..];
        let port = match rest.strip_prefix(':') {
            Some(p) => Some(p),
            None if rest.is_empty() => None,
            None => return None,
        };
        (&host[..=end], port)
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok()?),
        None => None,
    };
    Some((name, port))
}

/// Whether a browser's `Origin` may open a socket here: the request's own origin (host and port
/// of its `Host` header; http or https, since TLS usually ends at a proxy) or one listed in
/// `--allowed-origins`. `null` and anything unparsable are refused.
fn origin_allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    let origin = origin.trim();
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let Ok(url) = reqwest::Url::parse(origin) else {
        return false;
    };
    let (Some(o_host), Some((h_host, h_port))) = (url.host_str(), host.and_then(split_host)) else {
        return false;
    };
    if !matches!(url.scheme(), "http" | "https") || !o_host.eq_ignore_ascii_case(h_host) {
        return false;
    }
    match h_port {
        Some(p) => url.port_or_known_default() == Some(p),
        None => url.port().is_none(),
    }
}

/// Longest API key accepted; a longer one cannot be a key and is refused without a back-end call.
pub const MAX_API_KEY: usize = 512;
/// Longest session cookie value accepted (what browsers store at most).
pub const MAX_COOKIE_VALUE: usize = 4096;

/// Whether a credential could be one at all: not too long, no control characters. Anything else
/// is refused (401) before the back-end sees it, so a hostile client cannot turn garbage into
/// back-end errors, `Retry-After` loops or warnings.
fn plausible(credential: &Credential) -> bool {
    let no_controls = |v: &str| !v.chars().any(char::is_control);
    match credential {
        Credential::ApiKey(k) => k.len() <= MAX_API_KEY && no_controls(k),
        Credential::SessionCookies(c) => c.split("; ").all(|pair| {
            let value = pair.split_once('=').map_or(pair, |(_, v)| v);
            value.len() <= MAX_COOKIE_VALUE && no_controls(pair)
        }),
    }
}

/// Which credential a handshake presents, after the Origin check: an API key first, then the
/// session cookies, else 401. A cookie handshake must come from an allowed origin (cookies ride
/// along with cross-site requests); a key handshake only when `--allowed-origins` is set and the
/// client sent an Origin. Refused before any back-end call.
fn credential_of(
    cfg: &Config,
    key: Option<String>,
    headers: &HeaderMap,
) -> Result<Credential, RejectReason> {
    let (credential, check_origin) = match key {
        Some(key) => (Credential::ApiKey(key), !cfg.allowed_origins.is_empty()),
        None => match session_cookies(headers, &cfg.session_cookies) {
            Some(c) => (Credential::SessionCookies(c), true),
            None => return Err(RejectReason::MissingKey),
        },
    };
    if !plausible(&credential) {
        return Err(RejectReason::InvalidKey);
    }
    if check_origin {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
            let ok = origin
                .to_str()
                .is_ok_and(|o| origin_allowed(o, host, &cfg.allowed_origins));
            if !ok {
                return Err(RejectReason::Origin);
            }
        }
    }
    Ok(credential)
}

fn reject(state: &AppState, endpoint: Endpoint, reason: RejectReason) -> Response {
    state.metrics.endpoint(endpoint).rejected(reason).inc();
    let (status, body) = match reason {
        RejectReason::MissingKey => (
            StatusCode::UNAUTHORIZED,
            "missing API key (api_key query parameter, api_key header or Authorization: Bearer) \
             or session cookie\n",
        ),
        RejectReason::InvalidKey => (StatusCode::UNAUTHORIZED, "API key or session rejected\n"),
        RejectReason::UserMismatch => (
            StatusCode::FORBIDDEN,
            "userId does not match the API key's user\n",
        ),
        RejectReason::Origin => (
            StatusCode::FORBIDDEN,
            "Origin not allowed (not this host and not in --allowed-origins)\n",
        ),
        RejectReason::BackendUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "authentication back-end unavailable, retry later\n",
        ),
        RejectReason::BrokerUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "message broker unavailable, retry later\n",
        ),
        RejectReason::Draining => (
            StatusCode::SERVICE_UNAVAILABLE,
            "node is shutting down, reconnect\n",
        ),
        RejectReason::TooManyConnections => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections for this user\n",
        ),
        RejectReason::NodeFull => (
            StatusCode::SERVICE_UNAVAILABLE,
            "node connection limit reached, retry later\n",
        ),
        RejectReason::HandshakeRate => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many handshakes from this address, slow down\n",
        ),
    };
    let mut resp = (status, body).into_response();
    if reason == RejectReason::BackendUnavailable {
        // Jittered, and short: the back-end is shielded by --backend-concurrency, and a storm's
        // clients that all come back after the same delay would arrive as a second storm.
        const SPREAD: [&str; 3] = ["1", "2", "3"];
        let pick = SPREAD[rand::random_range(0..SPREAD.len())];
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(pick));
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    } else if reason == RejectReason::HandshakeRate {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// Authenticates and registers before answering 101, so that an auth failure is an HTTP status
/// (never an accepted-then-closed socket) and the user's channel is live when the client sees
/// the handshake complete.
async fn upgrade(
    state: Arc<AppState>,
    endpoint: Endpoint,
    peer: SocketAddr,
    query: Option<String>,
    headers: HeaderMap,
    ws: Upgrade,
) -> Response {
    if state.is_draining() {
        return reject(&state, endpoint, RejectReason::Draining);
    }
    // Cheapest refusals first, before any credential is read or the back-end is asked.
    let ip = client_ip(peer.ip(), &headers, &state.config.trusted_proxies);
    if !state.handshakes.allow(ip) {
        return reject(&state, endpoint, RejectReason::HandshakeRate);
    }
    let Some(slot) = state.slots.take() else {
        return reject(&state, endpoint, RejectReason::NodeFull);
    };
    if !state.hub.broker().is_up() {
        // Consistent with /readyz: a node that cannot deliver takes no new sockets, even for
        // users whose channels it still holds from before the outage.
        return reject(&state, endpoint, RejectReason::BrokerUnavailable);
    }
    let creds = credentials(query.as_deref(), &headers);
    let credential = match credential_of(&state.config, creds.key, &headers) {
        Ok(c) => c,
        Err(reason) => return reject(&state, endpoint, reason),
    };
    let revocations = state.hub.revocations();
    let identity = match state.auth.authenticate(&credential).await {
        Ok(id) => id,
        Err(AuthError::Rejected) => return reject(&state, endpoint, RejectReason::InvalidKey),
        Err(AuthError::Unavailable) => {
            return reject(&state, endpoint, RejectReason::BackendUnavailable)
        }
    };
    if let Some(claimed) = &creds.user_id {
        if claimed.as_str() != &*identity.user_id {
            return reject(&state, endpoint, RejectReason::UserMismatch);
        }
    }
    let registration = match state
        .hub
        .register_with(identity, endpoint, Some(credential_hash(&credential)))
        .await
    {
        Ok(r) => r,
        Err(RegisterError::TooManyConnections) => {
            return reject(&state, endpoint, RejectReason::TooManyConnections)
        }
        Err(RegisterError::Broker(e)) => {
            tracing::warn!(error = %e, "registering a connection failed");
            return reject(&state, endpoint, RejectReason::BrokerUnavailable);
        }
    };
    if state.hub.revocations() != revocations {
        // A revocation arrived while this handshake was in flight: its identity (and the cache
        // entry it left, inserted after the revocation's forget) may come from before it.
        // Forget it and ask the back-end again.
        state.auth.forget_credential(credential_hash(&credential));
        match state.auth.authenticate(&credential).await {
            Ok(id) if id.user_id == registration.conn.identity.user_id => {}
            Ok(_) | Err(AuthError::Rejected) => {
                return reject(&state, endpoint, RejectReason::InvalidKey)
            }
            Err(AuthError::Unavailable) => {
                return reject(&state, endpoint, RejectReason::BackendUnavailable)
            }
        }
    }
    // Before the 101: a drained connection's resume record (what it missed, its topics) takes
    // precedence; otherwise whatever is published once the client sees the handshake matches
    // the topics it had before its reconnect.
    let resume_key = resume_key_of(&headers, &credential);
    let resumed = if state.config.resume_window.is_zero() {
        Resumed::Off
    } else {
        state
            .hub
            .resume(&registration.conn, resume_key.clone())
            .await
    };
    if !matches!(resumed, Resumed::Replayed { .. }) {
        state.hub.restore_remembered(&registration.conn).await;
    }
    // Taken now, so a drain that starts before the socket runs still waits for it.
    let token = state.sessions.token();
    let session = Session {
        registration,
        credential,
    };
    let node = state.sessions_node.clone();
    let mut resp = ws.on_upgrade(move |tcp, read_ahead| {
        // A task of its own rather than inside the upgrade's task: that task keeps the
        // upgrade's state and this closure for as long as its callback runs, doubling what an
        // idle connection costs (ARCHITECTURE.md, "Memory per connection").
        session::start(tcp, read_ahead, session, node, (slot, token));
    });
    if let (ResumeKey::Cookie(id), false) = (&resume_key, state.config.resume_window.is_zero()) {
        let cookie = format!(
            "{RESUME_COOKIE}={id}; Max-Age={}; Path=/; HttpOnly; SameSite=Lax",
            state.config.resume_window.as_secs().max(1)
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// The cookie a browser's connection resumes by after a drain (`hub/resume.rs`).
pub const RESUME_COOKIE: &str = "wsgate_resume";

/// Where a connection's resume record goes: the browser's resume cookie (kept, or a new random
/// id), or for an API key without that cookie (an app) the key's hash.
fn resume_key_of(headers: &HeaderMap, credential: &Credential) -> ResumeKey {
    for value in headers.get_all(header::COOKIE) {
        let Ok(value) = value.to_str() else { continue };
        for pair in value.split(';').map(str::trim) {
            if let Some(id) = pair
                .strip_prefix(RESUME_COOKIE)
                .and_then(|r| r.strip_prefix('='))
            {
                if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return ResumeKey::Cookie(id.to_ascii_lowercase());
                }
            }
        }
    }
    match credential {
        Credential::ApiKey(_) => ResumeKey::Key(credential_hash(credential)),
        Credential::SessionCookies(_) => {
            ResumeKey::Cookie(format!("{:032x}", rand::random::<u128>()))
        }
    }
}

/// Addresses a running node listens on.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

/// Serves a node on the given listeners until `shutdown` resolves, then drains and returns.
/// Tests call this directly with listeners bound to port 0.
pub async fn run(
    state: Arc<AppState>,
    public: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    // Writes are coalesced in user space (see session), so Nagle's algorithm only adds delay:
    // with it, a frame written while an earlier one is unacknowledged waits for the peer's
    // delayed ACK (tens of milliseconds).
    let nodelay = |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    };
    let admin = admin.tap_io(nodelay);
    let stop_http = CancellationToken::new();
    let public_srv = tokio::spawn(serve_public(
        public,
        public_app(state.clone()),
        state.clone(),
        stop_http.clone(),
    ));
    let forget = {
        let stop = stop_http.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = every.tick() => state.handshakes.forget_idle(),
                    _ = stop.cancelled() => break,
                }
            }
        })
    };
    let admin_srv = {
        let stop = stop_http.clone();
        let app = admin_app(state.clone());
        tokio::spawn(async move {
            axum::serve(admin, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };

    shutdown.await;
    drain(&state).await;
    stop_http.cancel();
    let grace = Duration::from_secs(2);
    let _ = tokio::time::timeout(grace, public_srv).await;
    let _ = tokio::time::timeout(grace, admin_srv).await;
    let _ = forget.await;
    if let Err(e) = tokio::time::timeout(grace, state.hub.broker().shutdown()).await {
        tracing::warn!(error = %e, "broker did not shut down in time");
    }
    Ok(())
}

/// Serves the public listener with hyper directly (axum's `serve` runs hyper without a timer,
/// so it cannot time out a client that never finishes its headers): every connection gets
/// `--handshake-timeout` to send its request headers, then keeps its upgrade. On `stop` the
/// listener closes and open HTTP connections finish gracefully; upgraded sockets have left
/// hyper by then and are drained by [`drain`].
async fn serve_public(
    listener: TcpListener,
    app: Router,
    state: Arc<AppState>,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower_service::Service;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(state.config.handshake_timeout)
        // A handshake is a URL and a few headers (cookies at most a few KiB); hyper's default
        // (about 400 KiB per connection) would let each stalled connection hold far more.
        .max_buf_size(MAX_REQUEST_HEAD);
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let router = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            router.clone().call(req)
        });
        let conn = http
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let stop = stop.clone();
        let metrics = state.metrics.clone();
        connections.spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    metrics.handshake_timeouts.inc();
                }
                tracing::debug!(error = %e, "public connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Drains the node: unready at once, refuse upgrades, close sessions (1012) spread over the
/// drain window, wait for them with a grace period.
pub async fn drain(state: &AppState) {
    if state.draining.swap(true, Ordering::SeqCst) {
        return;
    }
    state.metrics.ready.set(0);
    let open = state.hub.connections();
    tracing::info!(
        connections = open,
        window = ?state.config.drain_timeout,
        "draining: closing sockets with 1012"
    );
    state.sessions.close();
    // Spread the 1012s over 90 % of the window; the rest is for the last closes to go out.
    let spread = state.config.drain_timeout.mul_f64(0.9);
    let grace = state.config.drain_timeout + Duration::from_secs(3);
    let wait_all = async {
        state.hub.drain(spread).await;
        state.sessions.wait().await;
    };
    if tokio::time::timeout(grace, wait_all).await.is_err() {
        tracing::warn!(
            remaining = state.sessions.len(),
            "drain window over, dropping remaining sockets"
        );
        state.hub.close_all(crate::disconnect::CloseReason::Drain);
    }
}

/// Where the Redis broker connects, from the validated configuration.
fn topology(config: &Config, urls: &str) -> Topology {
    let urls: Vec<String> = crate::config::split_urls(urls)
        .into_iter()
        .map(str::to_owned)
        .collect();
    match (config.redis_mode, &config.redis_sentinel_master) {
        (RedisMode::Sentinel, Some(master)) => Topology::Sentinel {
            sentinels: urls,
            master: master.trim().to_owned(),
        },
        (RedisMode::Cluster, _) => Topology::Cluster(urls),
        _ => Topology::Standalone(urls.into_iter().next().unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_session_cookies_are_kept() {
        let names = vec!["JSESSIONID".to_string(), "moqui_session".to_string()];
        let mut h = HeaderMap::new();
        assert_eq!(session_cookies(&h, &names), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("_ga=1; JSESSIONID=abc; theme=dark; moqui_session=x=y"),
        );
        assert_eq!(
            session_cookies(&h, &names).as_deref(),
            Some("JSESSIONID=abc; moqui_session=x=y")
        );
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("JSESSIONID=; other=1"),
        );
        assert_eq!(session_cookies(&h, &names), None);
    }

    #[test]
    fn origins() {
        let none: Vec<String> = Vec::new();
        let host = Some("gw.example.com:8081");
        assert!(origin_allowed("http://gw.example.com:8081", host, &none));
        assert!(origin_allowed("https://GW.example.com:8081", host, &none));
        assert!(!origin_allowed("http://gw.example.com:8082", host, &none));
        assert!(!origin_allowed("http://evil.example.com:8081", host, &none));
        assert!(!origin_allowed("null", host, &none));
        assert!(!origin_allowed("http://gw.example.com:8081", None, &none));
        // No port in Host: the origin must not name one either.
        assert!(origin_allowed(
            "https://erp.example.com",
            Some("erp.example.com"),
            &none
        ));
        assert!(!origin_allowed(
            "https://erp.example.com:444",
            Some("erp.example.com"),
            &none
        ));
        assert!(origin_allowed(
            "http://[::1]:8081",
            Some("[::1]:8081"),
            &none
        ));
        let allowed = vec!["http://127.0.0.1:5173".to_string()];
        assert!(origin_allowed("http://127.0.0.1:5173", host, &allowed));
        assert!(!origin_allowed("http://127.0.0.1:5174", host, &allowed));
    }

    #[test]
    fn implausible_credentials_are_refused() {
        let key = |k: &str| Credential::ApiKey(k.into());
        assert!(plausible(&key("demo-key-john")));
        assert!(plausible(&key(&"k".repeat(MAX_API_KEY))));
        assert!(!plausible(&key(&"k".repeat(MAX_API_KEY + 1))));
        assert!(!plausible(&key("\nbad")));
        assert!(!plausible(&key("bad\u{7f}")));
        let cookie = |c: String| Credential::SessionCookies(c);
        assert!(plausible(&cookie("JSESSIONID=abc; x=y".into())));
        assert!(!plausible(&cookie(format!(
            "JSESSIONID={}",
            "c".repeat(MAX_COOKIE_VALUE + 1)
        ))));
    }

    #[test]
    fn key_sources_in_order() {
        let mut h = HeaderMap::new();
        h.insert("api_key", HeaderValue::from_static("hdr"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tok"),
        );
        assert_eq!(
            credentials(Some("api_key=q&apiKey=old&userId=u"), &h)
                .key
                .as_deref(),
            Some("q")
        );
        assert_eq!(
            credentials(Some("apiKey=old"), &h).key.as_deref(),
            Some("old")
        );
        assert_eq!(credentials(None, &h).key.as_deref(), Some("hdr"));
        h.remove("api_key");
        assert_eq!(credentials(Some(""), &h).key.as_deref(), Some("tok"));
        assert_eq!(credentials(None, &HeaderMap::new()).key, None);
        assert_eq!(
            credentials(Some("userId=john"), &HeaderMap::new())
                .user_id
                .as_deref(),
            Some("john")
        );
    }
}
