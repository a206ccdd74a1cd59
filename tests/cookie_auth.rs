//! Browser sessions: a handshake without an API key that carries the Moqui session cookie is
//! authenticated by the back-end's whoami call (stub back-end, real contract), cached like keys,
//! and accepted only from an allowed Origin.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::Error as WsError;

use common::*;

/// Opens a WebSocket with extra headers; `Ok` holds the socket and the 101's `Set-Cookie`
/// headers, `Err` the HTTP status of the refusal.
async fn open(url: &str, headers: &[(&str, &str)]) -> Result<(Client, Vec<String>), u16> {
    let mut req = url.into_client_request().expect("a WebSocket URL");
    for (name, value) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            assert_eq!(resp.status().as_u16(), 101);
            let set_cookie = resp
                .headers()
                .get_all("set-cookie")
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            Ok((Client { ws }, set_cookie))
        }
        Err(WsError::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("handshake to {url} failed without an HTTP status: {e}"),
    }
}

fn whoami_calls(b: &Backend) -> u64 {
    b.state.whoami_calls.load(Ordering::SeqCst)
}

fn last_cookie(b: &Backend) -> Option<String> {
    b.state.whoami_cookie.lock().ok().and_then(|c| c.clone())
}

fn own_origin(node: &Node) -> String {
    format!("http://{}", node.public)
}

async fn rejected(node: &Node, endpoint: &str, reason: &str) -> f64 {
    metric(
        &node.metrics().await,
        &format!(r#"wsgate_connections_rejected_total{{endpoint="{endpoint}",reason="{reason}"}}"#),
    )
}

#[tokio::test]
async fn cookie_session_receives_notifications_and_only_the_session_cookie_is_forwarded() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let origin = own_origin(&node);
    let (mut c, set_cookie) = open(
        &node.ws("/notws"),
        &[
            (
                "Cookie",
                "_ga=tracking-id; JSESSIONID=sess-alice; theme=dark",
            ),
            ("Origin", &origin),
        ],
    )
    .await
    .expect("a same-origin cookie handshake is accepted");
    // The only cookie set is the gateway's own resume cookie (`--resume-window`).
    assert!(
        set_cookie.len() == 1 && set_cookie[0].starts_with("wsgate_resume="),
        "the back-end's Set-Cookie must not reach the client: {set_cookie:?}"
    );
    assert_eq!(whoami_calls(&backend), 1);
    assert_eq!(backend.auth_calls(), 0, "no API key, no Authenticate call");
    assert_eq!(
        last_cookie(&backend).as_deref(),
        Some("JSESSIONID=sess-alice"),
        "only the configured session cookie is forwarded"
    );

    // Moqui's client: `subscribe:` + its topics on open.
    c.send("subscribe:ALL").await;
    c.sync().await;
    let (status, _) = node
        .notify(json!({"userIds": ["alice"], "notification": notification("MantleEvent", "hi")}))
        .await;
    assert_eq!(status, 202);
    let got = c.recv_json().await;
    assert_eq!(got["title"], "hi");
    assert_eq!(got["topic"], "MantleEvent");
}

#[tokio::test]
async fn several_configured_cookies_are_forwarded_together() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.session_cookies = vec!["JSESSIONID".into(), "moqui_sso".into()];
    let node = Node::start(cfg).await;
    open(
        &node.ws("/notws"),
        &[("Cookie", "moqui_sso=t1; other=x; JSESSIONID=sess-bob")],
    )
    .await
    .expect("accepted");
    assert_eq!(
        last_cookie(&backend).as_deref(),
        Some("moqui_sso=t1; JSESSIONID=sess-bob")
    );
}

#[tokio::test]
async fn foreign_origin_is_refused_before_any_backend_call() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    for endpoint in ["notws", "chat"] {
        let status = open(
            &node.ws(&format!("/{endpoint}")),
            &[
                ("Cookie", "JSESSIONID=sess-alice"),
                ("Origin", "http://evil.example.com"),
            ],
        )
        .await
        .err();
        assert_eq!(status, Some(403), "{endpoint}");
        assert_eq!(rejected(&node, endpoint, "origin").await, 1.0);
    }
    // Same host, other port: another origin.
    let other_port = format!("http://127.0.0.1:{}", node.public.port() + 1);
    let status = open(
        &node.ws("/notws"),
        &[("Cookie", "JSESSIONID=sess-alice"), ("Origin", &other_port)],
    )
    .await
    .err();
    assert_eq!(status, Some(403));
    assert_eq!(
        open(
            &node.ws("/notws"),
            &[("Cookie", "JSESSIONID=sess-alice"), ("Origin", "null")]
        )
        .await
        .err(),
        Some(403)
    );
    assert_eq!(whoami_calls(&backend), 0, "refused before the back-end");
    assert_eq!(backend.auth_calls(), 0);
}

#[tokio::test]
async fn allowed_and_same_origins_and_native_clients_are_accepted() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.allowed_origins = vec!["http://erp.example.com:5173".into()];
    let node = Node::start(cfg).await;
    let cookie = ("Cookie", "JSESSIONID=sess-carol");
    let same = own_origin(&node);
    let same_https = format!("https://{}", node.public);
    for origin in [
        "http://erp.example.com:5173",
        same.as_str(),
        same_https.as_str(),
    ] {
        open(&node.ws("/notws"), &[cookie, ("Origin", origin)])
            .await
            .unwrap_or_else(|s| panic!("Origin {origin}: refused with {s}"));
    }
    // No Origin: not a browser, nothing to protect against.
    open(&node.ws("/chat"), &[cookie])
        .await
        .expect("no Origin is accepted");
    assert_eq!(rejected(&node, "notws", "origin").await, 0.0);
}

#[tokio::test]
async fn cookie_answers_are_cached_and_concurrent_misses_coalesce() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.max_connections_per_user = 0;
    let node = Node::start(cfg).await;
    let cookie = ("Cookie", "JSESSIONID=sess-alice");
    let _first = open(&node.ws("/notws"), &[cookie]).await.expect("first");
    let _second = open(&node.ws("/chat"), &[cookie]).await.expect("second");
    assert_eq!(
        whoami_calls(&backend),
        1,
        "the second connect is a cache hit"
    );

    backend.state.auth_delay_ms.store(300, Ordering::SeqCst);
    let url = node.ws("/notws");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                open(&url, &[("Cookie", "JSESSIONID=sess-bob")])
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), Ok(()));
    }
    assert_eq!(
        whoami_calls(&backend),
        2,
        "50 concurrent connects with one new cookie cost one call"
    );
}

#[tokio::test]
async fn a_known_session_is_served_stale_while_the_backend_is_down() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.auth_ttl = Duration::from_millis(200);
    cfg.auth_serve_stale = Duration::from_secs(30);
    let node = Node::start(cfg).await;
    let cookie = ("Cookie", "JSESSIONID=sess-carol");
    open(&node.ws("/notws"), &[cookie]).await.expect("fresh");
    backend.set_mode(Mode::Fail);
    let calls = whoami_calls(&backend);
    let url = node.ws("/notws");
    let backend = &backend;
    // Once the fresh entry has expired the back-end is asked again, fails, and the last
    // accepted answer is used.
    eventually(Duration::from_secs(5), "the entry expires", || {
        let url = url.clone();
        async move {
            let ok = open(&url, &[cookie]).await.is_ok();
            assert!(ok, "a known session is accepted while the back-end fails");
            whoami_calls(backend) > calls
        }
    })
    .await;
    assert_eq!(
        open(&node.ws("/notws"), &[("Cookie", "JSESSIONID=sess-bob")])
            .await
            .err(),
        Some(503),
        "an unknown session has nothing stale to fall back on"
    );
}

#[tokio::test]
async fn rejected_session_is_401_and_unreachable_backend_is_503() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let unknown = ("Cookie", "JSESSIONID=sess-nobody");
    assert_eq!(open(&node.ws("/notws"), &[unknown]).await.err(), Some(401));
    assert_eq!(open(&node.ws("/notws"), &[unknown]).await.err(), Some(401));
    assert_eq!(whoami_calls(&backend), 1, "the rejection is cached");
    // An unrelated cookie alone is no credential.
    assert_eq!(
        open(&node.ws("/notws"), &[("Cookie", "theme=dark")])
            .await
            .err(),
        Some(401)
    );
    assert_eq!(whoami_calls(&backend), 1);
    // userId that differs from the session's user: 403, as for keys.
    assert_eq!(
        open(
            &node.ws("/notws?userId=bob"),
            &[("Cookie", "JSESSIONID=sess-alice")]
        )
        .await
        .err(),
        Some(403)
    );

    backend.set_mode(Mode::Fail);
    assert_eq!(
        open(&node.ws("/notws"), &[("Cookie", "JSESSIONID=sess-dave")])
            .await
            .err(),
        Some(503)
    );
    assert_eq!(
        metric(
            &node.metrics().await,
            r#"wsgate_backend_errors_total{call="whoami",kind="status"}"#
        ),
        1.0
    );

    // Nothing listens at the back-end's address at all.
    let mut down = config(&backend);
    down.session_auth_url = format!("http://{}/rest/s1/wsgate/whoami", free_addr())
        .parse()
        .expect("URL");
    let node = Node::start(down).await;
    assert_eq!(
        open(&node.ws("/chat"), &[("Cookie", "JSESSIONID=sess-alice")])
            .await
            .err(),
        Some(503)
    );
}

#[tokio::test]
async fn api_key_wins_over_cookie_and_allowed_origins_apply_to_keys_with_an_origin() {
    let backend = Backend::start().await;
    // Without --allowed-origins a key handshake is not checked (unchanged behaviour).
    let open_node = Node::start(config(&backend)).await;
    open(
        &open_node.notws("alice"),
        &[("Origin", "http://anywhere.example.com")],
    )
    .await
    .expect("key handshakes are not origin-checked by default");

    let mut cfg = config(&backend);
    cfg.allowed_origins = vec!["https://erp.example.com".into()];
    let node = Node::start(cfg).await;
    assert_eq!(
        open(
            &node.notws("alice"),
            &[("Origin", "http://anywhere.example.com")]
        )
        .await
        .err(),
        Some(403)
    );
    open(
        &node.notws("alice"),
        &[("Origin", "https://erp.example.com")],
    )
    .await
    .expect("listed origin");
    open(&node.notws("alice"), &[])
        .await
        .expect("a native app sends no Origin");
    // Key first: a valid key with a bogus cookie never asks whoami.
    open(&node.notws("bob"), &[("Cookie", "JSESSIONID=sess-nobody")])
        .await
        .expect("the key decides");
    assert_eq!(whoami_calls(&backend), 0);
    assert_eq!(rejected(&node, "notws", "origin").await, 1.0);
}

#[test]
fn bad_session_and_origin_flags_exit_64() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["serve", "--allowed-origins", "https://erp.example.com/app"],
            "--allowed-origins",
        ),
        (
            &["serve", "--allowed-origins", "erp.example.com"],
            "--allowed-origins",
        ),
        (
            &["serve", "--allowed-origins", "ftp://erp.example.com"],
            "--allowed-origins",
        ),
        (&["serve", "--session-cookies", " , "], "--session-cookies"),
        (&["serve", "--session-cookies", "a=b"], "--session-cookies"),
        (
            &["serve", "--session-user-pointer", "userId"],
            "--session-user-pointer",
        ),
        (
            &["serve", "--session-auth-path", "whoami"],
            "--session-auth-path",
        ),
    ];
    for (args, flag) in cases {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        for (k, _) in std::env::vars() {
            if k.starts_with("WSGATE_") {
                cmd.env_remove(k);
            }
        }
        let out = cmd.args(*args).output().expect("run wsgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

/// Logs a demo user in on the built-in demo back-end; returns its `Cookie` header value.
async fn demo_login(backend: &str, user: &str) -> String {
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .post(format!("{backend}/login"))
        .form(&[("user", user)])
        .send()
        .await
        .expect("login");
    assert_eq!(resp.status().as_u16(), 303);
    let set = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie");
    set.split(';').next().expect("name=value").to_string()
}

#[tokio::test]
async fn chat_from_a_cookie_session_asks_room_members_with_the_cookie() {
    // The built-in demo back-end: web sessions, whoami, and a ChatRoom call that answers only
    // for a key or a session, as Moqui does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stats = std::sync::Arc::new(wsgate::demo::Stats::default());
    let app = wsgate::demo::backend_app(stats.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let backend_url = format!("http://{addr}");
    let mut cfg = wsgate::config::Config::for_backend(&backend_url).expect("config");
    cfg.unsubscribe_delay = Duration::from_millis(100);
    let node = Node::start(cfg).await;

    let john = demo_login(&backend_url, "john").await;
    let jane = demo_login(&backend_url, "jane").await;
    let (mut john_ws, _) = open(&node.ws("/chat"), &[("Cookie", &john)])
        .await
        .expect("john");
    let (mut jane_ws, _) = open(&node.ws("/chat"), &[("Cookie", &jane)])
        .await
        .expect("jane");
    john_ws
        .send(
            r#"{"chatRoom":{"chatRoomId":"demo-room"},"content":"hi jane","fromUserId":"mallory"}"#,
        )
        .await;
    let got = jane_ws.recv_json().await;
    assert_eq!(got["content"], "hi jane");
    assert_eq!(
        got["fromUserId"], "john",
        "the sender is the session's user"
    );
    assert_eq!(stats.chat_room.load(Ordering::SeqCst), 1);
    assert_eq!(
        stats.authenticate.load(Ordering::SeqCst),
        0,
        "no API key anywhere"
    );
}
