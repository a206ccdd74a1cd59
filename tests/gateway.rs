//! One node on the in-process broker, driven as GrowERP and Moqui clients drive it.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SHORT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn notification_reaches_every_tab_byte_for_byte() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut tab1 = Client::subscribed(&node.notws("alice")).await;
    let mut tab2 = Client::subscribed(&node.notws("alice")).await;
    let mut other = Client::subscribed(&node.notws("bob")).await;

    // Odd spacing and key order must survive: the gateway forwards, it does not rebuild.
    let raw =
        r#"{"topic":"Orders",  "title":"New order","message":{"b":2,"a":1},"showAlert":true}"#;
    let body = format!(r#"{{"userIds":["alice"],"notification":{raw}}}"#);
    let resp = http()
        .post(node.admin_url("/api/v1/notifications"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("publish");
    assert_eq!(resp.status().as_u16(), 202);
    let answer: serde_json::Value = resp.json().await.expect("JSON answer");
    assert_eq!(answer["topic"], "Orders");
    assert_eq!(answer["channels"], 1);

    for tab in [&mut tab1, &mut tab2] {
        let got = tab
            .recv_within(Duration::from_secs(5))
            .await
            .expect("frame");
        assert_eq!(got, raw);
    }
    other.expect_silence(SHORT).await;
}

#[tokio::test]
async fn topic_filtering_follows_moqui() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut c = Client::connect(&node.notws("alice")).await;
    c.send("subscribe: A, ,B ,").await;
    c.sync().await;
    for t in ["A", "B", "C"] {
        let (s, _) = node
            .notify(json!({"userIds": ["alice"], "notification": notification(t, t)}))
            .await;
        assert_eq!(s, 202);
    }
    assert_eq!(c.recv_json().await["topic"], "A");
    assert_eq!(c.recv_json().await["topic"], "B");
    c.expect_silence(SHORT).await;

    c.send("unsubscribe:A").await;
    c.sync().await;
    for t in ["A", "B"] {
        node.notify(json!({"userIds": ["alice"], "notification": notification(t, t)}))
            .await;
    }
    assert_eq!(c.recv_json().await["topic"], "B");
    c.expect_silence(SHORT).await;

    // A client that never subscribed, of a user with nothing remembered, receives nothing.
    // (Another connection of alice would start with her remembered topics: tests/resubscribe.rs.)
    let mut silent = Client::connect(&node.notws("bob")).await;
    silent.sync().await;
    node.notify(json!({"userIds": ["bob"], "notification": notification("B", "x")}))
        .await;
    silent.expect_silence(SHORT).await;
}

#[tokio::test]
async fn unknown_commands_are_counted_and_ignored() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut c = Client::subscribed(&node.notws("alice")).await;
    c.send("hello there").await;
    c.send("Subscribe: X").await;
    c.ws.send(Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("binary");
    c.sync().await;
    node.notify(json!({"userIds": ["alice"], "notification": notification("T", "still open")}))
        .await;
    assert_eq!(c.recv_json().await["title"], "still open");
    let m = node.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"wsgate_client_frames_ignored_total{endpoint="notws",kind="unknown_command"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            r#"wsgate_client_frames_ignored_total{endpoint="notws",kind="binary"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn tenant_and_broadcast_notifications() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut alice = Client::subscribed(&node.notws("alice")).await; // ACME
    let mut bob = Client::subscribed(&node.notws("bob")).await; // ACME
    let mut dave = Client::subscribed(&node.notws("dave")).await; // OTHER

    let (s, v) = node
        .notify(json!({"tenantId": "ACME", "notification": notification("T", "acme")}))
        .await;
    assert_eq!((s, v["target"].as_str()), (202, Some("tenant")));
    assert_eq!(alice.recv_json().await["title"], "acme");
    assert_eq!(bob.recv_json().await["title"], "acme");
    dave.expect_silence(SHORT).await;

    let (s, _) = node
        .notify(json!({"broadcast": true, "notification": notification("T", "all")}))
        .await;
    assert_eq!(s, 202);
    for c in [&mut alice, &mut bob, &mut dave] {
        assert_eq!(c.recv_json().await["title"], "all");
    }
}

#[tokio::test]
async fn chat_between_members() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut alice = Client::connect(&node.chat("alice")).await;
    let mut alice2 = Client::connect(&node.chat("alice")).await;
    let mut bob = Client::connect(&node.chat("bob")).await;
    let mut carol = Client::connect(&node.chat("carol")).await;
    let mut dave = Client::connect(&node.chat("dave")).await;
    // A notification socket of a member gets no chat.
    let mut bob_notes = Client::subscribed(&node.notws("bob")).await;

    // Flat, with a spoofed sender.
    alice
        .send(r#"{"chatRoom":{"chatRoomId":"room1"},"content":"hi","fromUserId":"mallory"}"#)
        .await;
    for c in [&mut bob, &mut carol] {
        let m = c.recv_json().await;
        assert_eq!(m["content"], "hi");
        assert_eq!(m["fromUserId"], "alice", "sender is the authenticated user");
    }
    alice.expect_silence(SHORT).await;
    alice2.expect_silence(Duration::from_millis(50)).await;
    dave.expect_silence(Duration::from_millis(50)).await;
    bob_notes.expect_silence(Duration::from_millis(50)).await;

    // Wrapped.
    bob.send(r#"{"chatMessage":{"chatRoom":{"chatRoomId":"room1"},"content":"yo"}}"#)
        .await;
    for c in [&mut alice, &mut alice2, &mut carol] {
        let m = c.recv_json().await;
        assert_eq!(m["chatMessage"]["content"], "yo");
        assert_eq!(m["chatMessage"]["fromUserId"], "bob");
    }

    // Non-member, unknown room, invalid frames: dropped, connection kept.
    dave.send(r#"{"chatRoom":{"chatRoomId":"room1"},"content":"intruder"}"#)
        .await;
    dave.send(r#"{"chatRoom":{"chatRoomId":"nope"},"content":"x"}"#)
        .await;
    dave.send("not json").await;
    dave.send("[1,2]").await;
    dave.send(r#"{"content":"no room"}"#).await;
    dave.sync().await;
    for c in [&mut alice, &mut bob, &mut carol] {
        c.expect_silence(Duration::from_millis(100)).await;
    }
    // dave still works in his own room.
    dave.send(r#"{"chatRoom":{"chatRoomId":"room2"},"content":"hello alice"}"#)
        .await;
    assert_eq!(alice.recv_json().await["content"], "hello alice");

    let m = node.metrics().await;
    for (kind, n) in [
        ("not_member", 1.0),
        ("unknown_room", 1.0),
        ("invalid_json", 2.0),
        ("no_room", 1.0),
    ] {
        assert_eq!(
            metric(
                &m,
                &format!(r#"wsgate_client_frames_ignored_total{{endpoint="chat",kind="{kind}"}}"#)
            ),
            n,
            "{kind}"
        );
    }
    // Room members are cached: room1 was looked up once (by alice), then hit.
    assert_eq!(
        backend.room_calls(),
        3,
        "room1 once (then cached, dave included), nope once, room2 once"
    );
}

#[tokio::test]
async fn server_originated_chat_and_presence() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let mut bob = Client::connect(&node.chat("bob")).await;
    let (s, _) = post(
        &node.admin_url("/api/v1/chat"),
        json!({"userIds": ["bob", "carol"], "chatMessage": {"chatRoom": {"chatRoomId": "room1"}, "content": "from server"}}),
    )
    .await;
    assert_eq!(s, 202);
    assert_eq!(bob.recv_json().await["content"], "from server");
    let p = node.presence(&["bob", "carol"]).await;
    assert_eq!(p, json!({"bob": true, "carol": false}));
    drop(bob);
    eventually(Duration::from_secs(5), "bob offline", || async {
        node.presence(&["bob"]).await == json!({"bob": false})
    })
    .await;
}

#[tokio::test]
async fn handshake_refusals() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;

    let (s, body) = refused(&node.ws("/notws")).await;
    assert_eq!(s, 401);
    assert!(body.contains("missing API key"), "{body}");
    let (s, _) = refused(&node.ws("/notws?api_key=wrong")).await;
    assert_eq!(s, 401);
    let (s, body) = refused(&node.ws("/chat?api_key=key-alice&userId=bob")).await;
    assert_eq!(s, 403);
    assert!(
        !body.contains("key-alice"),
        "the key never appears in errors"
    );

    // Every key source works.
    Client::connect(&node.ws("/notws?apiKey=key-alice")).await;
    connect_with_header(&node.ws("/notws"), "api_key", "key-bob")
        .await
        .expect("api_key header accepted");
    connect_with_header(&node.ws("/notws"), "Authorization", "Bearer key-carol")
        .await
        .expect("bearer accepted");

    // Back-end failing: 503, unless the answer is cached.
    backend.set_mode(Mode::Fail);
    let (s, _) = refused(&node.ws("/notws?api_key=key-dave")).await;
    assert_eq!(s, 503);
    Client::connect(&node.notws("alice")).await; // cached
    backend.set_mode(Mode::Hang);
    let started = std::time::Instant::now();
    let (s, _) = refused(&node.ws("/notws?api_key=key-dave")).await;
    assert_eq!(s, 503);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the back-end timeout applies"
    );

    // The raw key never reaches the metrics.
    let m = node.metrics().await;
    assert!(!m.contains("key-"), "no API key in metrics");
    assert_eq!(
        metric(
            &m,
            r#"wsgate_connections_rejected_total{endpoint="notws",reason="backend_unavailable"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn auth_calls_are_cached_and_coalesced() {
    let backend = Backend::start().await;
    backend
        .state
        .auth_delay_ms
        .store(200, std::sync::atomic::Ordering::SeqCst);
    let mut cfg = config(&backend);
    cfg.auth_ttl = Duration::from_millis(1500);
    cfg.max_connections_per_user = 0;
    let node = Node::start(cfg).await;

    let url = node.notws("alice");
    let clients = futures_util::future::join_all((0..50).map(|_| Client::connect(&url))).await;
    assert_eq!(clients.len(), 50);
    assert_eq!(
        backend.auth_calls(),
        1,
        "50 simultaneous connections, one back-end call"
    );
    Client::connect(&url).await;
    assert_eq!(backend.auth_calls(), 1, "a cached key makes no call");
    tokio::time::sleep(Duration::from_millis(1700)).await;
    Client::connect(&url).await;
    assert_eq!(
        backend.auth_calls(),
        2,
        "an expired key makes one call again"
    );

    // Negative answers are cached too.
    let _ = refused(&node.ws("/notws?api_key=nope")).await;
    let _ = refused(&node.ws("/notws?api_key=nope")).await;
    assert_eq!(backend.auth_calls(), 3);
    let m = node.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"wsgate_auth_cache_requests_total{result="negative_hit"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn serve_stale_answers_while_the_backend_is_down() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.auth_ttl = Duration::from_millis(200);
    cfg.auth_serve_stale = Duration::from_secs(60);
    let node = Node::start(cfg).await;
    Client::connect(&node.notws("alice")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    backend.set_mode(Mode::Fail);
    Client::connect(&node.notws("alice")).await;
    let (s, _) = refused(&node.ws("/notws?api_key=key-bob")).await;
    assert_eq!(s, 503, "a key never seen is not served stale");
}

#[tokio::test]
async fn frame_too_large_closes_with_1009() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.max_frame_size = 1024;
    let node = Node::start(cfg).await;
    let mut c = Client::subscribed(&node.notws("alice")).await;
    let big = format!("subscribe: {}", "x".repeat(4096));
    let _ = c.ws.send(Message::text(big)).await;
    assert_eq!(c.close_code(Duration::from_secs(5)).await, Some(1009));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_4008_and_others_get_everything() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.outbound_queue = 64;
    cfg.outbound_queue_bytes = 1024 * 1024;
    let node = Node::start(cfg).await;

    // The stalled client subscribes, then stops reading: its socket buffers fill up and its
    // outbound queue overflows. Only once the node has given up on it (the overflow is counted)
    // does it read again, draining what the kernel buffered, so that the close frame the node
    // is still trying to write reaches it (the node gives it 2 s before dropping the socket). A
    // client that never read again would never see it.
    let mut stalled = Client::subscribed(&node.notws("bob")).await;
    let mut reader = Client::subscribed(&node.notws("alice")).await;
    let stalled = {
        let scrape = node.admin_url("/metrics");
        tokio::spawn(async move {
            eventually(
                Duration::from_secs(30),
                "the node to count the slow consumer",
                || async {
                    let Ok(resp) = http().get(&scrape).send().await else {
                        return false;
                    };
                    let m = resp.text().await.unwrap_or_default();
                    metric(&m, "wsgate_slow_consumer_disconnects_total") >= 1.0
                },
            )
            .await;
            stalled.close_code(Duration::from_secs(10)).await
        })
    };

    // More than the kernel's socket buffers can absorb for the stalled client (~10 MB).
    let n = 300;
    let payload = "p".repeat(64 * 1024);
    let publisher = {
        let url = node.admin_url("/api/v1/notifications");
        let payload = payload.clone();
        tokio::spawn(async move {
            for i in 0..n {
                let mut note = notification("Load", &i.to_string());
                note["message"] = json!(payload);
                let (s, _) = post(
                    &url,
                    json!({"userIds": ["alice", "bob"], "notification": note}),
                )
                .await;
                assert_eq!(s, 202);
            }
        })
    };
    for i in 0..n {
        let m = reader.recv_json().await;
        assert_eq!(
            m["title"],
            i.to_string(),
            "the reader gets every message in order"
        );
    }
    publisher.await.expect("publisher");
    assert_eq!(
        stalled.await.expect("stalled client"),
        Some(4008),
        "the client that stopped reading is closed with 4008 (slow consumer)"
    );
    let m = node.metrics().await;
    assert_eq!(metric(&m, "wsgate_slow_consumer_disconnects_total"), 1.0);
    assert!(metric(&m, "wsgate_outbound_dropped_total") >= 1.0);
    eventually(Duration::from_secs(5), "slow consumer closed", || async {
        let m = node.metrics().await;
        metric(
            &m,
            r#"wsgate_connections_closed_total{endpoint="notws",reason="slow_consumer"}"#,
        ) == 1.0
    })
    .await;
}

#[tokio::test]
async fn per_user_connection_limit_is_429() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.max_connections_per_user = 2;
    let node = Node::start(cfg).await;
    let _a = Client::connect(&node.notws("alice")).await;
    let _b = Client::connect(&node.notws("alice")).await;
    let (s, _) = refused(&node.notws("alice")).await;
    assert_eq!(s, 429);
}

#[tokio::test]
async fn silent_peer_is_closed_after_two_ping_intervals() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.ping_interval = Duration::from_millis(200);
    let node = Node::start(cfg).await;
    // A raw TCP client that completes the handshake and then never reads or answers pings.
    let (ws, _) = tokio_tungstenite::connect_async(node.notws("alice"))
        .await
        .expect("connect");
    let _hold = ws; // never polled: pongs are never sent
    eventually(Duration::from_secs(5), "ping timeout close", || async {
        let m = node.metrics().await;
        metric(
            &m,
            r#"wsgate_connections_closed_total{endpoint="notws",reason="ping_timeout"}"#,
        ) == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_peer_that_answers_pings_stays_open_while_idle() {
    use futures_util::StreamExt;
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.ping_interval = Duration::from_millis(200);
    let node = Node::start(cfg).await;
    // A client that only reads: tungstenite answers each ping with a pong as it reads. With no
    // messages for the pings to ride on, the sweep must send them alone, in time for the pongs
    // to come back inside the two-interval silence limit.
    let (mut ws, _) = tokio_tungstenite::connect_async(node.notws("alice"))
        .await
        .expect("connect");
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(2_000);
    loop {
        match tokio::time::timeout_at(until, ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(other))) => panic!("an idle connection got {other:?}"),
            Ok(other) => panic!("the connection ended after {pings} pings: {other:?}"),
        }
    }
    // One every 1.5 intervals at the longest: at least 6 in ten intervals.
    assert!(pings >= 6, "only {pings} pings in ten ping intervals");
    let m = node.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"wsgate_connections_closed_total{endpoint="notws",reason="ping_timeout"}"#,
        ),
        0.0
    );
}

#[tokio::test]
async fn publish_api_validation() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    let url = node.admin_url("/api/v1/notifications");
    let cases = [
        (json!({"userIds": ["a"]}), "notification is required"),
        (
            json!({"userIds": ["a"], "notification": {"title": "x"}}),
            "topic",
        ),
        (
            json!({"userIds": ["a"], "notification": {"topic": 5}}),
            "topic",
        ),
        (json!({"notification": {"topic": "t"}}), "exactly one"),
        (
            json!({"userIds": ["a"], "broadcast": true, "notification": {"topic": "t"}}),
            "exactly one",
        ),
        (
            json!({"userIds": [], "notification": {"topic": "t"}}),
            "empty",
        ),
        (
            json!({"userIds": "a", "notification": {"topic": "t"}}),
            "invalid type",
        ),
        (
            json!({"userIds": ["a"], "notification": "x"}),
            "JSON object",
        ),
        (
            json!({"tenantId": "", "notification": {"topic": "t"}}),
            "empty",
        ),
    ];
    for (body, needle) in cases {
        let (s, v) = post(&url, body.clone()).await;
        assert_eq!(s, 400, "{body}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(needle), "{body}: {e}");
    }
    // Not JSON at all.
    let r = http()
        .post(&url)
        .bearer_auth(TOKEN)
        .body("nope")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 400);
    // Too large.
    let big = json!({"userIds": ["a"], "notification": {"topic": "t", "x": "y".repeat(2 << 20)}});
    let (s, v) = post(&url, big).await;
    assert_eq!(s, 413, "{v}");
    // Token: wrong, missing.
    let r = http()
        .post(&url)
        .bearer_auth("wrong")
        .json(&json!({}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 401);
    let r = http()
        .post(&url)
        .json(&json!({}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 401);
    // Presence without users.
    let r = http()
        .get(node.admin_url("/api/v1/presence"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 400);
}

#[tokio::test]
async fn publish_api_is_disabled_without_a_token() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    cfg.api_token = None;
    let node = Node::start(cfg).await;
    let r = http()
        .post(node.admin_url("/api/v1/notifications"))
        .json(&json!({"broadcast": true, "notification": {"topic": "t"}}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 403);
    let body: serde_json::Value = r.json().await.expect("JSON");
    assert!(body["error"]
        .as_str()
        .unwrap_or_default()
        .contains("--api-token"));
}

#[tokio::test]
async fn public_listener_serves_only_the_websocket_endpoints() {
    let backend = Backend::start().await;
    let node = Node::start(config(&backend)).await;
    for path in ["/metrics", "/api/v1/presence?userId=a", "/healthz"] {
        let r = http()
            .get(format!("http://{}{path}", node.public))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status().as_u16(), 404, "{path} is not public");
    }
    let r = http()
        .get(node.admin_url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(node.readyz().await, 200);
}

#[tokio::test]
async fn drain_closes_with_1012_and_refuses_new_upgrades() {
    let backend = Backend::start().await;
    let mut cfg = config(&backend);
    let window = Duration::from_millis(1500);
    cfg.drain_timeout = window;
    let mut node = Node::start(cfg).await;
    const CLIENTS: usize = 10;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Client::subscribed(&node.notws("alice")).await);
    }
    let admin = node.admin_url("/readyz");
    let ws_url = node.notws("bob");
    // Every client waits for its own close frame at the same time, so each records when its
    // 1012 arrived (reading them one after the other would only record when we got to it).
    let started = std::time::Instant::now();
    let closes = tokio::spawn(futures_util::future::join_all(clients.into_iter().map(
        |mut c| async move {
            let code = c.close_code(Duration::from_secs(10)).await;
            (code, started.elapsed())
        },
    )));
    node.begin_stop();
    eventually(Duration::from_secs(2), "readyz 503", || async {
        http()
            .get(&admin)
            .send()
            .await
            .map(|r| r.status().as_u16() == 503)
            .unwrap_or(false)
    })
    .await;
    let (s, _) = refused(&ws_url).await;
    assert_eq!(s, 503, "no new upgrades while draining");
    let closes = closes.await.expect("close readers");
    let mut at = Vec::new();
    for (code, t) in closes {
        assert_eq!(code, Some(1012), "every client is closed with 1012");
        at.push(t);
    }
    at.sort();
    let (first, last) = (at[0], at[CLIENTS - 1]);
    assert!(
        last < Duration::from_secs(5),
        "all closed within the window (plus slack): {at:?}"
    );
    // The node spreads the closes over 90 % of the window: 10 clients, one every 135 ms, so
    // first and last are ~1.2 s apart. Load on the machine can delay single closes but not
    // pull the last one towards the first; without the spread they are a few ms apart.
    assert!(
        last - first >= window * 2 / 5,
        "the 1012s are spread over the drain window ({window:?}): first at {first:?}, \
         last at {last:?}, all {at:?}"
    );
}
