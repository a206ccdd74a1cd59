//! Hostile clients before the upgrade, with real sockets: slowloris, the node's connection cap,
//! the per-IP handshake rate (with and without a trusted proxy), credentials that cannot be
//! credentials.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn slowloris_connections_are_closed_within_the_handshake_timeout() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.handshake_timeout = Duration::from_secs(1);
    let node = Node::start(cfg).await;

    // A few hundred connections that send half a request line and stall.
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut tcp = TcpStream::connect(node.public).await.expect("connect");
        tcp.write_all(b"GET /notws?api_key=key-alice HTT")
            .await
            .expect("half a request line");
        stalled.push(tcp);
    }

    // Meanwhile a normal client still gets in and is served.
    let mut alice = Client::subscribed(&node.notws("alice")).await;

    // Every stalled connection is closed by the gateway within the timeout (plus slack).
    let deadline = started + Duration::from_secs(4);
    for tcp in &mut stalled {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(left, async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    // hyper may answer 408 before closing; read until the end.
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            read.is_ok(),
            "a stalled connection was still open {:?} after it started",
            started.elapsed()
        );
    }
    let scrape = node.metrics().await;
    assert!(metric(&scrape, "wsgate_handshake_timeouts_total") >= 300.0);

    // The honest client is unaffected.
    let (status, _) = node
        .notify(serde_json::json!({"userIds": ["alice"], "notification": notification("Orders", "still here")}))
        .await;
    assert_eq!(status, 202);
    assert!(alice.recv_within(Duration::from_secs(2)).await.is_some());
}

#[tokio::test]
async fn the_node_connection_cap_answers_503_before_the_upgrade() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.max_connections = 2;
    let node = Node::start(cfg).await;
    let first = Client::connect(&node.notws("alice")).await;
    let _second = Client::connect(&node.notws("bob")).await;
    let calls = backend.auth_calls();
    let (status, body) = refused(&node.notws("carol")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connection limit"), "{body}");
    assert_eq!(backend.auth_calls(), calls, "refused before the back-end");
    let scrape = node.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            r#"wsgate_connections_rejected_total{endpoint="notws",reason="max_connections"}"#
        ),
        1.0
    );
    // A closed socket frees its slot.
    drop(first);
    let url = node.notws("carol");
    eventually(Duration::from_secs(3), "a slot frees up", || async {
        tokio_tungstenite::connect_async(&url).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn the_per_ip_handshake_rate_answers_429() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.max_handshakes_per_ip = 3;
    let node = Node::start(cfg).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Client::connect(&node.notws("alice")).await);
    }
    let (status, body) = refused(&node.notws("alice")).await;
    assert_eq!(status, 429, "{body}");
    let scrape = node.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            r#"wsgate_connections_rejected_total{endpoint="notws",reason="handshake_rate"}"#
        ),
        1.0
    );
    // The bucket refills: after a second the same address gets in again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    Client::connect(&node.notws("alice")).await;
}

async fn handshake_via(url: &str, forwarded_for: &str) -> u16 {
    match connect_with_header(url, "x-forwarded-for", forwarded_for).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("handshake failed without a status: {e}"),
    }
}

#[tokio::test]
async fn a_trusted_proxy_is_limited_per_forwarded_ip_and_an_untrusted_one_is_not_believed() {
    let backend = Backend::start().await;

    // The test client (127.0.0.1) is a trusted proxy: each forwarded IP has its own bucket.
    let mut cfg = config(&backend);
    cfg.max_handshakes_per_ip = 2;
    cfg.trusted_proxies = vec!["127.0.0.1/32".parse().expect("cidr")];
    let node = Node::start(cfg).await;
    let url = node.notws("alice");
    for _ in 0..2 {
        assert_eq!(handshake_via(&url, "203.0.113.1").await, 101);
    }
    assert_eq!(handshake_via(&url, "203.0.113.1").await, 429);
    assert_eq!(handshake_via(&url, "203.0.113.2").await, 101);
    // A client-written entry left of the proxy's does not buy a new bucket.
    assert_eq!(handshake_via(&url, "198.51.100.7, 203.0.113.1").await, 429);

    // The same header from a peer that is not trusted is ignored: one bucket for the peer.
    let mut cfg = config(&backend);
    cfg.max_handshakes_per_ip = 2;
    cfg.trusted_proxies = vec!["10.0.0.0/8".parse().expect("cidr")];
    let node = Node::start(cfg).await;
    let url = node.notws("alice");
    assert_eq!(handshake_via(&url, "203.0.113.1").await, 101);
    assert_eq!(handshake_via(&url, "203.0.113.2").await, 101);
    assert_eq!(handshake_via(&url, "203.0.113.3").await, 429);
}

#[tokio::test]
async fn credentials_that_cannot_be_credentials_are_401_without_a_backend_call() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;

    let (status, _) = refused(&node.ws("/notws?api_key=%0Abad")).await;
    assert_eq!(status, 401, "control character in the key");
    let (status, _) = refused(&node.ws("/notws?api_key=bad%7F")).await;
    assert_eq!(status, 401, "DEL in the key");
    let long = "k".repeat(600);
    let (status, _) = refused(&node.ws(&format!("/notws?api_key={long}"))).await;
    assert_eq!(status, 401, "600-byte key");
    let status = match connect_with_header(&node.ws("/notws"), "api_key", &long).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    assert_eq!(status, 401, "600-byte key in a header");
    let cookie = format!("JSESSIONID={}", "c".repeat(5000));
    let status = match connect_with_header(&node.ws("/notws"), "cookie", &cookie).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    assert_eq!(status, 401, "over-long session cookie");

    assert_eq!(backend.auth_calls(), 0, "no Authenticate call");
    assert_eq!(
        backend.state.whoami_calls.load(Ordering::SeqCst),
        0,
        "no whoami call"
    );
    let scrape = node.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            r#"wsgate_connections_rejected_total{endpoint="notws",reason="invalid_key"}"#
        ),
        5.0
    );
    // A real key still works.
    Client::connect(&node.notws("alice")).await;
}

// ---------------------------------------------------------------- revocation

async fn revoke(node: &Node, body: serde_json::Value) -> (u16, serde_json::Value) {
    post(&node.admin_url("/api/v1/revocations"), body).await
}

/// Each client's close code, waited for at most one second after the revocation was accepted.
async fn all_closed_1008(clients: &mut [Client]) {
    for c in clients {
        assert_eq!(
            c.close_code(Duration::from_secs(1)).await,
            Some(1008),
            "closed with 1008 within 1 s"
        );
    }
}

#[tokio::test]
async fn revoking_a_user_on_the_in_process_broker_closes_its_sockets_and_forgets_it() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut alice = vec![
        Client::subscribed(&node.notws("alice")).await,
        Client::connect(&node.chat("alice")).await,
        Client {
            ws: connect_with_header(&node.ws("/notws"), "cookie", "JSESSIONID=sess-alice")
                .await
                .expect("cookie handshake"),
        },
    ];
    let mut bob = Client::subscribed(&node.notws("bob")).await;
    let calls = backend.auth_calls();
    let whoami = backend.state.whoami_calls.load(Ordering::SeqCst);
    // A cached key does not ask the back-end again.
    Client::connect(&node.notws("alice")).await;
    assert_eq!(backend.auth_calls(), calls);

    let (status, body) = revoke(&node, serde_json::json!({"userId": "alice"})).await;
    assert_eq!(status, 202, "{body}");
    all_closed_1008(&mut alice).await;

    // Others stay; the next handshake of the revoked user asks the back-end again.
    bob.sync().await;
    Client::connect(&node.notws("alice")).await;
    assert_eq!(backend.auth_calls(), calls + 1, "asked the back-end again");
    // The cookie that resolved to the user is forgotten too.
    connect_with_header(&node.ws("/notws"), "cookie", "JSESSIONID=sess-alice")
        .await
        .expect("cookie handshake");
    assert_eq!(
        backend.state.whoami_calls.load(Ordering::SeqCst),
        whoami + 1,
        "whoami asked again"
    );
    let scrape = node.metrics().await;
    assert_eq!(metric(&scrape, "wsgate_revocations_total"), 1.0);
    assert!(
        metric(
            &scrape,
            r#"wsgate_connections_closed_total{endpoint="notws",reason="revoked"}"#
        ) >= 1.0
    );
}

#[tokio::test]
async fn revoking_a_key_closes_only_that_keys_sockets() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut by_key = vec![Client::subscribed(&node.notws("alice")).await];
    let mut by_cookie = Client {
        ws: connect_with_header(&node.ws("/notws"), "cookie", "JSESSIONID=sess-alice")
            .await
            .expect("cookie handshake"),
    };
    let calls = backend.auth_calls();
    let (status, body) = revoke(&node, serde_json::json!({"apiKey": "key-alice"})).await;
    assert_eq!(status, 202, "{body}");
    assert!(
        !body.to_string().contains("key-alice"),
        "the key is not echoed"
    );
    all_closed_1008(&mut by_key).await;
    // The same user's session cookie is another credential: it stays.
    by_cookie.sync().await;
    Client::connect(&node.notws("alice")).await;
    assert_eq!(backend.auth_calls(), calls + 1, "asked the back-end again");
}

#[tokio::test]
async fn bad_revocation_requests_are_400_with_a_message() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let url = node.admin_url("/api/v1/revocations");
    for body in [
        serde_json::json!({}),
        serde_json::json!({"userId": "a", "apiKey": "b"}),
        serde_json::json!({"userId": ""}),
        serde_json::json!({"userId": 5}),
        serde_json::json!({"user": "a"}),
        serde_json::json!(["a"]),
    ] {
        let (status, answer) = post(&url, body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let resp = http()
        .post(&url)
        .bearer_auth(TOKEN)
        .body("not json")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 400);
    let resp = http()
        .post(&url)
        .json(&serde_json::json!({"userId": "alice"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status().as_u16(), 401, "same token auth as the API");
}

#[tokio::test]
async fn revocation_reaches_every_node_over_redis() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut c = config(&backend);
        c.redis_url = Some(redis.url().into());
        c.redis_prefix = "rev".to_string();
        c.node_id = format!("n{i}");
        let node = Node::start(c).await;
        eventually(Duration::from_secs(10), "node ready", || async {
            node.readyz().await == 200
        })
        .await;
        nodes.push(node);
    }
    let mut alice = Vec::new();
    for n in &nodes {
        alice.push(Client::subscribed(&n.notws("alice")).await);
        alice.push(Client::connect(&n.chat("alice")).await);
    }
    let mut bob = Client::subscribed(&nodes[2].notws("bob")).await;
    let calls = backend.auth_calls();

    let (status, body) = revoke(&nodes[0], serde_json::json!({"userId": "alice"})).await;
    assert_eq!(status, 202, "{body}");
    all_closed_1008(&mut alice).await;
    bob.sync().await;
    for n in &nodes {
        Client::connect(&n.notws("alice")).await;
    }
    assert_eq!(
        backend.auth_calls(),
        calls + 3,
        "every node asked the back-end again"
    );

    // By key, published on another node.
    let mut again = Vec::new();
    for n in &nodes {
        again.push(Client::subscribed(&n.notws("alice")).await);
    }
    let (status, body) = revoke(&nodes[1], serde_json::json!({"apiKey": "key-alice"})).await;
    assert_eq!(status, 202, "{body}");
    all_closed_1008(&mut again).await;
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test]
async fn a_handshake_in_flight_during_a_revocation_asks_the_backend_again() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    backend.state.auth_delay_ms.store(400, Ordering::SeqCst);
    let url = node.notws("alice");
    let handshake = tokio::spawn(async move { Client::connect(&url).await });
    // The Authenticate call is under way (its answer predates the revocation)...
    eventually(Duration::from_secs(2), "Authenticate called", || async {
        backend.auth_calls() == 1
    })
    .await;
    let (status, body) = revoke(&node, serde_json::json!({"userId": "alice"})).await;
    assert_eq!(status, 202, "{body}");
    // ...so before the 101 the gateway asks once more (the stub still accepts the key).
    handshake.await.expect("handshake task");
    assert_eq!(backend.auth_calls(), 2, "the credential was checked again");
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut tcp = TcpStream::connect(node.public).await.expect("connect");
    let head = format!(
        "GET /notws HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n",
        "j".repeat(100 * 1024)
    );
    // The gateway may answer and close before it read everything: a failed write is fine.
    let _ = tcp.write_all(head.as_bytes()).await;
    let mut answer = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(3), tcp.read_exact(&mut answer))
        .await
        .expect("an answer within 3 s")
        .expect("a status line");
    let answer = String::from_utf8_lossy(&answer);
    // hyper refuses a head over the limit with 400 or 431, before the router sees it.
    assert!(
        answer == "HTTP/1.1 400" || answer == "HTTP/1.1 431",
        "expected a 400/431 refusal, got {answer:?}"
    );
    assert_eq!(backend.auth_calls(), 0);
}
