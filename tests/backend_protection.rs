//! The node protects its back-end: a storm of distinct API keys never puts more than
//! `--backend-concurrency` calls in flight, each key costs exactly one call however many sockets
//! present it, and a handshake that waits too long for a slot gets 503 with a jittered
//! `Retry-After` without reaching the back-end.
//!
//! The back-end here is a stand-in for a servlet container: a pool of [`WORKERS`] workers, each
//! call holding one for [`SERVICE`]; it answers the real Authenticate shape for any `key-<user>`
//! and records the most calls it ever had at once and the calls per key.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use common::{metric, Node};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use wsgate::config::Config;

const WORKERS: usize = 16;
const SERVICE: Duration = Duration::from_millis(25);

#[derive(Default)]
struct Pool {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    calls: Mutex<HashMap<String, usize>>,
}

struct SlowBackend {
    addr: SocketAddr,
    pool: Arc<Pool>,
}

impl SlowBackend {
    async fn start() -> SlowBackend {
        let pool = Arc::new(Pool::default());
        let workers = Arc::new(Semaphore::new(WORKERS));
        let app = Router::new()
            .route("/rest/s1/growerp/100/Authenticate", get(authenticate))
            .with_state((pool.clone(), workers));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        let addr = listener.local_addr().expect("stub address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        SlowBackend { addr, pool }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A node's configuration with this back-end and no per-IP handshake limit (every client
    /// here comes from 127.0.0.1).
    fn config(&self) -> Config {
        let mut c = Config::for_backend(&self.url()).expect("valid test config");
        c.max_handshakes_per_ip = 0;
        c
    }

    fn max_in_flight(&self) -> usize {
        self.pool.max_in_flight.load(Ordering::SeqCst)
    }

    fn calls(&self) -> HashMap<String, usize> {
        self.pool.calls.lock().expect("calls").clone()
    }
}

async fn authenticate(
    State((pool, workers)): State<(Arc<Pool>, Arc<Semaphore>)>,
    headers: HeaderMap,
) -> Response {
    let now = pool.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    pool.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let key = headers
        .get("api_key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    *pool
        .calls
        .lock()
        .expect("calls")
        .entry(key.clone())
        .or_default() += 1;
    let resp = {
        let _worker = workers.acquire().await.expect("pool open");
        tokio::time::sleep(SERVICE).await;
        match key.strip_prefix("key-") {
            Some(user) => Json(json!({"authenticate": {
                "ownerPartyId": "ACME",
                "user": {"userId": user},
                "apiKey": null
            }}))
            .into_response(),
            None => StatusCode::UNAUTHORIZED.into_response(),
        }
    };
    pool.in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

/// What one handshake ended in: 101, or the refusal's status and `Retry-After`.
enum Outcome {
    Connected(Box<common::Ws>),
    Refused(u16, Option<String>),
}

async fn handshake(url: String) -> Outcome {
    match tokio_tungstenite::connect_async(&url).await {
        Ok((ws, _)) => Outcome::Connected(Box::new(ws)),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Outcome::Refused(
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ),
        Err(e) => panic!("handshake failed without an HTTP status: {e}"),
    }
}

async fn storm(node: &Node, users: &[String], sockets_per_user: usize) -> Vec<Outcome> {
    let mut tasks = Vec::new();
    for u in users {
        for _ in 0..sockets_per_user {
            tasks.push(tokio::spawn(handshake(node.notws(u))));
        }
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("handshake task"));
    }
    out
}

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("storm{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_distinct_keys_never_exceeds_the_concurrency_and_costs_one_call_per_key() {
    let backend = SlowBackend::start().await;
    let mut cfg = backend.config();
    cfg.backend_concurrency = 8;
    cfg.backend_timeout = Duration::from_secs(10);
    cfg.backend_queue_timeout = Duration::from_secs(30);
    let node = Node::start(cfg).await;

    // 600 keys, each presented by two sockets at once: 1,200 handshakes.
    let users = users(600);
    let outcomes = storm(&node, &users, 2).await;
    let mut open = Vec::new();
    for o in outcomes {
        match o {
            Outcome::Connected(ws) => open.push(ws),
            Outcome::Refused(s, _) => panic!("a handshake was refused with {s}"),
        }
    }
    assert_eq!(open.len(), 1200, "every socket connected");

    assert!(
        backend.max_in_flight() <= 8,
        "{} calls were in flight at the back-end at once; the limit is 8",
        backend.max_in_flight()
    );
    assert!(backend.max_in_flight() >= 2, "the calls ran one at a time");
    let calls = backend.calls();
    assert_eq!(calls.len(), 600, "every key was asked");
    let repeated: Vec<_> = calls.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        repeated.is_empty(),
        "keys asked more than once: {repeated:?}"
    );

    let scrape = node.metrics().await;
    assert_eq!(metric(&scrape, "wsgate_backend_in_flight"), 0.0);
    assert_eq!(metric(&scrape, "wsgate_backend_queued"), 0.0);
    assert_eq!(
        metric(&scrape, "wsgate_backend_queue_wait_seconds_count"),
        600.0
    );
    assert_eq!(metric(&scrape, "wsgate_backend_queue_timeouts_total"), 0.0);
    assert!(
        metric(&scrape, "wsgate_backend_queue_wait_seconds_sum") > 0.0,
        "calls waited for a slot"
    );
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_waits_too_long_gets_503_with_a_jittered_retry_after() {
    let backend = SlowBackend::start().await;
    let mut cfg = backend.config();
    cfg.backend_concurrency = 4;
    cfg.backend_timeout = Duration::from_secs(10);
    cfg.backend_queue_timeout = Duration::from_millis(60);
    let node = Node::start(cfg).await;

    let users = users(500);
    let outcomes = storm(&node, &users, 1).await;
    let (mut connected, mut refused) = (0, 0);
    for o in outcomes {
        match o {
            Outcome::Connected(_) => connected += 1,
            Outcome::Refused(status, retry) => {
                assert_eq!(status, 503);
                let secs: u64 = retry
                    .as_deref()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or_else(|| panic!("503 without a usable Retry-After: {retry:?}"));
                assert!((1..=3).contains(&secs), "Retry-After {secs}");
                refused += 1;
            }
        }
    }
    assert_eq!(connected + refused, 500);
    assert!(connected > 0, "nobody got through");
    assert!(
        refused > 0,
        "nobody waited longer than 60 ms for one of 4 slots"
    );
    assert!(backend.max_in_flight() <= 4, "{}", backend.max_in_flight());
    // A refused handshake never reached the back-end.
    let calls = backend.calls();
    assert_eq!(calls.values().sum::<usize>(), connected);

    let scrape = node.metrics().await;
    assert_eq!(
        metric(&scrape, "wsgate_backend_queue_timeouts_total"),
        refused as f64
    );
    assert_eq!(metric(&scrape, "wsgate_backend_in_flight"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_queue_bound_are_refused_at_once() {
    let backend = SlowBackend::start().await;
    let mut cfg = backend.config();
    cfg.backend_concurrency = 2;
    cfg.backend_queue = 10;
    cfg.backend_timeout = Duration::from_secs(10);
    cfg.backend_queue_timeout = Duration::from_secs(30);
    let node = Node::start(cfg).await;

    let outcomes = storm(&node, &users(100), 1).await;
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Refused(503, Some(_))))
        .count();
    let connected = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Connected(_)))
        .count();
    assert_eq!(connected + refused, 100);
    assert!(refused > 0, "a queue of 10 held 98 waiting calls");
    assert!(connected >= 12, "only {connected} connected");
    let scrape = node.metrics().await;
    assert_eq!(
        metric(&scrape, "wsgate_backend_queue_full_total"),
        refused as f64
    );
    assert!(backend.max_in_flight() <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_when_its_client_gives_up_still_fills_the_cache() {
    let backend = SlowBackend::start().await;
    let mut cfg = backend.config();
    cfg.backend_concurrency = 1;
    cfg.backend_timeout = Duration::from_secs(10);
    cfg.backend_queue_timeout = Duration::from_secs(30);
    let node = Node::start(cfg).await;

    // One slot: the first key's call is at the back-end (25 ms) when its client gives up, as
    // a client with a short handshake deadline does in a storm; the others wait for the slot
    // and give up after 10 ms. The first client gives up once the back-end has its call, not
    // after a fixed time, so that a slow machine cannot let another key take the slot first.
    let users = users(6);
    let first = format!("key-{}", users[0]);
    let url = node.notws(&users[0]);
    let first_client = tokio::spawn(async move { handshake(url).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !backend.calls().contains_key(&first) {
        assert!(
            std::time::Instant::now() < deadline,
            "the first key's call never reached the back-end"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first_client.abort();
    let mut tasks = Vec::new();
    for u in &users[1..] {
        let url = node.notws(u);
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(10), handshake(url))
                .await
                .is_err()
        }));
    }
    for t in tasks {
        assert!(
            t.await.expect("handshake task"),
            "a handshake ended within 10 ms"
        );
    }
    // The call at the back-end finishes without a client; the queued ones left with theirs.
    common::eventually(
        Duration::from_secs(5),
        "the back-end call to finish",
        || async {
            let scrape = node.metrics().await;
            metric(&scrape, "wsgate_backend_in_flight") == 0.0
                && metric(&scrape, "wsgate_backend_queued") == 0.0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let calls = backend.calls();
    assert_eq!(
        calls.get(&first),
        Some(&1),
        "the first key's call: {calls:?}"
    );

    // Every client comes back: the first key's answer was kept, the others are asked once.
    let outcomes = storm(&node, &users, 1).await;
    assert!(
        outcomes.iter().all(|o| matches!(o, Outcome::Connected(_))),
        "every client connected on its retry"
    );
    let calls = backend.calls();
    let repeated: Vec<_> = calls.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        repeated.is_empty(),
        "keys asked more than once: {repeated:?}"
    );
    assert_eq!(calls.len(), 6, "every key was asked: {calls:?}");
}
