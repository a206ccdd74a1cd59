//! A back-end that behaves like a servlet container with a small worker pool: at most
//! `--workers` requests are served at once, each holding its worker for `--service-ms`; the
//! others wait for a worker (as in the container's accept queue). It answers GrowERP's
//! Authenticate shape for any key `demo-key-<user>` (the key scheme of the load generator) and
//! counts, for the `backend-storm` scenario, the calls, the most it ever had at once (waiting
//! or served), the distinct keys and the calls of the most-asked key.
//!
//! `GET /stats` → `{"authenticate", "chatRoom", "inFlight", "maxInFlight", "distinctKeys",
//! "maxCallsPerKey"}`; `POST /reset` zeroes the counters.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

#[derive(clap::Args, Clone, Debug)]
pub struct SlowBackendArgs {
    /// Listener.
    #[arg(long, default_value = "127.0.0.1:8083")]
    pub listen: SocketAddr,
    /// Requests served at once (the servlet container's worker pool).
    #[arg(long, default_value_t = 16)]
    pub workers: usize,
    /// Time each request holds its worker, milliseconds.
    #[arg(long, default_value_t = 25)]
    pub service_ms: u64,
}

struct Pool {
    workers: Semaphore,
    service: Duration,
    calls: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    per_key: Mutex<HashMap<String, u64>>,
}

pub async fn run(a: SlowBackendArgs) -> anyhow::Result<()> {
    let pool = Arc::new(Pool {
        workers: Semaphore::new(a.workers.max(1)),
        service: Duration::from_millis(a.service_ms),
        calls: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        max_in_flight: AtomicU64::new(0),
        per_key: Mutex::new(HashMap::new()),
    });
    let app = Router::new()
        .route("/rest/s1/growerp/100/Authenticate", get(authenticate))
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .with_state(pool);
    let listener = tokio::net::TcpListener::bind(a.listen).await?;
    eprintln!(
        "slow-backend: {} workers, {} ms per request, on {}",
        a.workers,
        a.service_ms,
        listener.local_addr()?
    );
    axum::serve(listener, app).await?;
    Ok(())
}

async fn authenticate(State(p): State<Arc<Pool>>, headers: HeaderMap) -> Response {
    p.calls.fetch_add(1, Ordering::Relaxed);
    let now = p.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    p.max_in_flight.fetch_max(now, Ordering::SeqCst);
    // Counted out when the call ends either way: a caller that gives up closes its connection,
    // and the server drops this future without running the rest of it.
    let _in_flight = InFlight(&p.in_flight);
    let key = headers
        .get("api_key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if let Ok(mut m) = p.per_key.lock() {
        *m.entry(key.clone()).or_default() += 1;
    }
    let resp = match p.workers.acquire().await {
        Ok(_worker) => {
            tokio::time::sleep(p.service).await;
            match key.strip_prefix("demo-key-") {
                Some(user) if !user.is_empty() => Json(json!({"authenticate": {
                    "ownerPartyId": "DEMO",
                    "user": {"userId": user, "firstName": user, "lastName": "Load", "loginName": user},
                    "company": {"partyId": "DEMO", "name": "Load"},
                    "apiKey": null
                }}))
                .into_response(),
                _ => (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"errorCode": 401, "errors": "User must be logged in"})),
                )
                    .into_response(),
            }
        }
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    };
    resp
}

/// One call in flight, counted out on drop.
struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn stats(State(p): State<Arc<Pool>>) -> Json<serde_json::Value> {
    let (distinct, max_per_key) = p
        .per_key
        .lock()
        .map(|m| (m.len(), m.values().copied().max().unwrap_or(0)))
        .unwrap_or((0, 0));
    Json(json!({
        "authenticate": p.calls.load(Ordering::Relaxed),
        "chatRoom": 0,
        "inFlight": p.in_flight.load(Ordering::SeqCst),
        "maxInFlight": p.max_in_flight.load(Ordering::SeqCst),
        "distinctKeys": distinct,
        "maxCallsPerKey": max_per_key,
    }))
}

async fn reset(State(p): State<Arc<Pool>>) -> StatusCode {
    p.calls.store(0, Ordering::Relaxed);
    p.max_in_flight
        .store(p.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    if let Ok(mut m) = p.per_key.lock() {
        m.clear();
    }
    StatusCode::NO_CONTENT
}
