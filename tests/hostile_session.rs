//! Hostile clients after the handshake: topic floods, frame floods, protocol errors, close
//! frames, peers that never read, bogus chat rooms. Real sockets against an in-process node.

mod common;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use common::{eventually, metric, notification, Backend, Client, Node};

fn closed(scrape: &str, endpoint: &str, reason: &str) -> f64 {
    metric(
        scrape,
        &format!("wsgate_connections_closed_total{{endpoint=\"{endpoint}\",reason=\"{reason}\"}}"),
    )
}

/// Waits until the node has counted `n` closes for `reason` (a session counts its close after
/// the closing handshake).
async fn closes_counted(node: &Node, endpoint: &str, reason: &str, n: f64) {
    eventually(Duration::from_secs(5), reason, || async {
        closed(&node.metrics().await, endpoint, reason) == n
    })
    .await;
}

/// Publishes a notification for `user` and returns how long it took to reach `client`.
async fn notification_latency(node: &Node, client: &mut Client, user: &str) -> Duration {
    let body = serde_json::json!({"userIds": [user], "notification": notification("Probe", "still served")});
    let started = Instant::now();
    let (status, _) = node.notify(body).await;
    assert_eq!(status, 202);
    let got = client
        .recv_within(Duration::from_secs(5))
        .await
        .expect("the other client's notification arrives");
    assert!(got.contains("still served"), "unexpected frame {got}");
    let took = started.elapsed();
    eprintln!("notification to {user} took {took:?}");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_is_answered_with_a_close_frame() {
    let backend = Backend::start().await;
    let node = Node::start(common::config(&backend)).await;
    let mut c = Client::subscribed(&node.notws("alice")).await;
    c.ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .expect("send close");
    assert_eq!(
        c.close_code(Duration::from_secs(3)).await,
        Some(1000),
        "the gateway answers a client close with a close frame"
    );
    node.stop().await;
}

/// Opens a socket and writes raw bytes after the handshake; returns the close code received.
async fn close_code_after_raw(node: &Node, raw: &[u8]) -> Option<u16> {
    let mut c = Client::connect(&node.notws("alice")).await;
    match c.ws.get_mut() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => {
            tcp.write_all(raw).await.expect("raw write");
            tcp.flush().await.expect("raw flush");
        }
        _ => panic!("plain TCP expected"),
    }
    c.close_code(Duration::from_secs(3)).await
}

/// A masked client frame: FIN + `opcode`, the payload masked with a fixed key.
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11u8, 0x22, 0x33, 0x44];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_are_closed_with_1002_and_bad_utf8_with_1007() {
    let backend = Backend::start().await;
    let node = Node::start(common::config(&backend)).await;
    // An unmasked client frame (RFC 6455 5.1).
    assert_eq!(
        close_code_after_raw(&node, &[0x81, 0x02, b'h', b'i']).await,
        Some(1002)
    );
    // A reserved data opcode.
    assert_eq!(
        close_code_after_raw(&node, &masked(0x3, b"x")).await,
        Some(1002)
    );
    // Reserved bits set.
    let mut rsv = masked(0x1, b"x");
    rsv[0] |= 0x40;
    assert_eq!(close_code_after_raw(&node, &rsv).await, Some(1002));
    // A text frame that is not UTF-8.
    assert_eq!(
        close_code_after_raw(&node, &masked(0x1, &[0xff, 0xfe, 0xfd])).await,
        Some(1007)
    );
    closes_counted(&node, "notws", "protocol_error", 3.0).await;
    closes_counted(&node, "notws", "invalid_utf8", 1.0).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_topics_closes_1008_and_a_huge_subscribe_stalls_nobody() {
    let backend = Backend::start().await;
    let mut config = common::config(&backend);
    config.max_frame_size = 4 << 20;
    let node = Node::start(config).await;
    let mut bob = Client::subscribed(&node.notws("bob")).await;

    // Up to the limit is fine; one more topic closes the connection.
    let mut alice = Client::connect(&node.notws("alice")).await;
    let thousand: Vec<String> = (0..1_000).map(|i| format!("T{i}")).collect();
    alice
        .send(&format!("subscribe: {}", thousand.join(",")))
        .await;
    alice.sync().await;
    alice.send("subscribe: T0, one-too-many").await;
    assert_eq!(alice.close_code(Duration::from_secs(3)).await, Some(1008));

    // 200,000 topics in one frame, while bob still gets his notification in time.
    let mut carol = Client::connect(&node.notws("carol")).await;
    let huge: Vec<String> = (0..200_000).map(|i| format!("topic-{i}")).collect();
    let frame = format!("subscribe: {}", huge.join(","));
    let flood = tokio::spawn(async move {
        carol.send(&frame).await;
        carol.close_code(Duration::from_secs(5)).await
    });
    let latency = notification_latency(&node, &mut bob, "bob").await;
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    assert_eq!(flood.await.expect("flood task"), Some(1008));

    closes_counted(&node, "notws", "too_many_topics", 2.0).await;
    assert_eq!(
        metric(&node.metrics().await, "wsgate_topic_subscriptions"),
        1.0
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_flood_is_closed_1008_and_others_are_still_served() {
    let backend = Backend::start().await;
    let mut config = common::config(&backend);
    config.max_frames_per_second = 50;
    let node = Node::start(config).await;
    let mut bob = Client::subscribed(&node.notws("bob")).await;

    let alice = Client::connect(&node.notws("alice")).await;
    let (mut tx, mut rx) = alice.ws.split();
    let flood = tokio::spawn(async move {
        for i in 0..20_000 {
            if tx
                .feed(Message::text(format!("subscribe: F{}", i % 10)))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = tx.flush().await;
    });
    // Another client's notification, published while the flood is being sent.
    let latency = notification_latency(&node, &mut bob, "bob").await;
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    // The flood's close frame.
    let code = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(msg)) = rx.next().await {
            if let Message::Close(Some(f)) = msg {
                return Some(u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("closed within 5 s");
    let _ = flood.await;
    assert_eq!(code, Some(1008));
    closes_counted(&node, "notws", "frame_rate", 1.0).await;

    // A client within its budget (a burst of twice the rate) is not touched.
    let mut carol = Client::connect(&node.notws("carol")).await;
    for _ in 0..60 {
        carol.send("subscribe: ALL").await;
    }
    carol.sync().await;
    let latency = notification_latency(&node, &mut carol, "carol").await;
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_loses_its_registration_within_the_write_timeout() {
    let backend = Backend::start().await;
    let mut config = common::config(&backend);
    config.ping_interval = Duration::from_millis(200);
    // Shorter than the ping timeout (two intervals), so the write timeout is what ends it.
    config.write_timeout = Duration::from_millis(100);
    // Large enough that the queue never overflows before the socket is stuck.
    config.outbound_queue = 100_000;
    config.outbound_queue_bytes = 1 << 30;
    let node = Node::start(config).await;
    // alice subscribes and then never reads again (pings included), but keeps sending, so she
    // never looks silent to the ping sweep: only the write timeout can end her session.
    let alice = Client::subscribed(&node.notws("alice")).await;
    assert_eq!(node.state.hub.connections(), 1);
    let (mut alice_tx, alice_rx) = alice.ws.split();
    let keepalive = tokio::spawn(async move {
        loop {
            if alice_tx
                .send(Message::text("subscribe: ALL"))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    let big = "x".repeat(60_000);
    let body =
        serde_json::json!({"userIds": ["alice"], "notification": notification("Bulk", &big)});
    // Enough to fill the socket buffers on both sides several times over.
    for _ in 0..1_000 {
        let (status, _) = node.notify(body.clone()).await;
        assert_eq!(status, 202);
        if node.state.hub.connections() == 0 {
            break;
        }
    }
    eventually(
        Duration::from_secs(5),
        "the stuck session is unregistered",
        || async { node.state.hub.connections() == 0 },
    )
    .await;
    closes_counted(&node, "notws", "write_timeout", 1.0).await;
    keepalive.abort();
    drop(alice_rx);
    let mut bob = Client::subscribed(&node.notws("bob")).await;
    let latency = notification_latency(&node, &mut bob, "bob").await;
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_chat_room_costs_one_backend_call() {
    let backend = Backend::start().await;
    let node = Node::start(common::config(&backend)).await;
    let mut alice = Client::connect(&node.chat("alice")).await;
    for _ in 0..20 {
        alice
            .send(r#"{"chatRoom":{"chatRoomId":"no-such-room"},"content":"hi"}"#)
            .await;
    }
    alice.sync().await;
    assert_eq!(backend.room_calls(), 1, "unknown rooms are cached");
    let scrape = node.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "wsgate_client_frames_ignored_total{endpoint=\"chat\",kind=\"unknown_room\"}"
        ),
        20.0
    );
    node.stop().await;
}

/// Redis denies one channel (an ACL) and SREM: the other channels of the same batches are still
/// subscribed, the node stays ready, nothing stale is left in Redis, and presence stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_redis_command_leaves_nothing_stale() {
    let redis = common::Redis::start();
    let mut admin = redis.conn();
    redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "gate",
            "on",
            ">gate-pw",
            "~*",
            "resetchannels",
            "&wsgate:u:ok*",
            "&wsgate:t:*",
            "&wsgate:all",
            "&wsgate:canary:*",
            "+@all",
            "-srem",
        ])
        .query::<()>(&mut admin)
        .expect("ACL SETUSER");
    let backend =
        Backend::start_with(&[("okalice", "ACME"), ("okbob", "ACME"), ("bad", "ACME")]).await;
    let mut config = common::config(&backend);
    config.redis_url = Some(format!("redis://gate:gate-pw@127.0.0.1:{}", redis.port).into());
    let node = Node::start(config).await;
    eventually(Duration::from_secs(5), "the node is ready", || async {
        node.readyz().await == 200
    })
    .await;

    // Three handshakes at once, so their subscribes share a batch; one channel is denied.
    let (a, b, bad) = tokio::join!(
        tokio_tungstenite::connect_async(node.notws("okalice")),
        tokio_tungstenite::connect_async(node.notws("okbob")),
        tokio_tungstenite::connect_async(node.notws("bad")),
    );
    assert!(bad.is_err(), "the denied user's handshake is refused");
    let mut alice = Client {
        ws: a.expect("okalice connects").0,
    };
    let mut bob = Client {
        ws: b.expect("okbob connects").0,
    };
    alice.send("subscribe: ALL").await;
    alice.sync().await;
    bob.send("subscribe: ALL").await;
    bob.sync().await;
    assert_eq!(node.readyz().await, 200, "the node stays ready");
    // And right after the failure, a new handshake works.
    let mut carol_like = Client::subscribed(&node.notws("okalice")).await;
    let latency = notification_latency(&node, &mut bob, "okbob").await;
    assert!(latency < Duration::from_secs(1), "took {latency:?}");
    let _ = notification_latency(&node, &mut alice, "okalice").await;
    let _ = carol_like.recv_within(Duration::from_secs(2)).await;

    // Nothing denied or abandoned stays wanted: the channels Redis has are exactly the live ones.
    let mut want = vec![
        "wsgate:all".to_string(),
        "wsgate:t:ACME".to_string(),
        "wsgate:u:okalice".to_string(),
        "wsgate:u:okbob".to_string(),
    ];
    want.sort();
    let got = || {
        let mut c: Vec<String> = redis
            .channels("wsgate:*")
            .into_iter()
            .filter(|c| !c.starts_with("wsgate:canary:"))
            .collect();
        c.sort();
        c
    };
    eventually(
        Duration::from_secs(5),
        "Redis holds exactly the live channels",
        || {
            let ok = got() == want;
            async move { ok }
        },
    )
    .await;

    // Presence: SREM is denied, yet a user who leaves reads offline (the node reconciles).
    assert_eq!(
        node.presence(&["okalice", "okbob", "bad"]).await,
        serde_json::json!({"okalice": true, "okbob": true, "bad": false})
    );
    drop(bob);
    eventually(Duration::from_secs(5), "okbob reads offline", || async {
        node.presence(&["okbob"]).await == serde_json::json!({"okbob": false})
    })
    .await;
    assert_eq!(
        node.presence(&["okalice"]).await,
        serde_json::json!({"okalice": true})
    );
    drop((alice, carol_like));
    node.stop().await;
}

/// The pub/sub connection is killed while a burst of handshakes is being subscribed: after the
/// reconnect Redis holds exactly the channels of the connections that were accepted, and
/// presence names exactly their users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_mid_batch_leaves_nothing_stale() {
    let redis = common::Redis::start();
    let users: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
    let extra: Vec<(&str, &str)> = users.iter().map(|u| (u.as_str(), "ACME")).collect();
    let backend = Backend::start_with(&extra).await;
    let mut config = common::config(&backend);
    config.redis_url = Some(redis.url().into());
    let node = Node::start(config).await;
    eventually(Duration::from_secs(5), "the node is ready", || async {
        node.readyz().await == 200
    })
    .await;

    let mut admin = redis.conn();
    let connects = futures_util::future::join_all(
        users
            .iter()
            .map(|u| tokio_tungstenite::connect_async(node.notws(u))),
    );
    let kill = async {
        tokio::time::sleep(Duration::from_millis(2)).await;
        redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "pubsub"])
            .query::<i64>(&mut admin)
            .expect("CLIENT KILL")
    };
    let (results, killed) = tokio::join!(connects, kill);
    assert!(killed >= 1, "the pub/sub connection was killed");
    let mut open = Vec::new();
    let mut accepted = Vec::new();
    for (u, r) in users.iter().zip(results) {
        if let Ok((ws, _)) = r {
            open.push(ws);
            accepted.push(u.clone());
        }
    }
    eventually(
        Duration::from_secs(10),
        "the node is ready again",
        || async { node.readyz().await == 200 },
    )
    .await;

    let mut want: Vec<String> = accepted.iter().map(|u| format!("wsgate:u:{u}")).collect();
    want.push("wsgate:all".into());
    if !accepted.is_empty() {
        want.push("wsgate:t:ACME".into());
    }
    want.sort();
    eventually(
        Duration::from_secs(5),
        "Redis holds exactly the live channels",
        || {
            let mut got: Vec<String> = redis
                .channels("wsgate:*")
                .into_iter()
                .filter(|c| !c.starts_with("wsgate:canary:"))
                .collect();
            got.sort();
            let ok = got == want;
            async move { ok }
        },
    )
    .await;
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let want_presence: serde_json::Map<String, serde_json::Value> = users
        .iter()
        .map(|u| (u.clone(), serde_json::json!(accepted.contains(u))))
        .collect();
    eventually(
        Duration::from_secs(5),
        "presence names exactly the accepted users",
        || async {
            node.presence(&names).await == serde_json::Value::Object(want_presence.clone())
        },
    )
    .await;
    drop(open);
    node.stop().await;
}
