//! Property-based tests of every parser that sees client, back-end or Redis bytes: no input
//! panics, and each gives its documented outcome.

mod common;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Value};

use wsgate::backend::{identity_from, members_of, BackendError};
use wsgate::protocol::{self, ChatFrameError, Kind, NotwsCommand};

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("chatRooms".to_string()),
                        Just("chatRoom".to_string()),
                        Just("members".to_string()),
                        Just("user".to_string()),
                        Just("userId".to_string()),
                        Just("chatMessage".to_string()),
                        Just("chatRoomId".to_string()),
                        Just("topic".to_string()),
                        ".{0,6}",
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A topic as a client may name one: no comma, not blank, no surrounding whitespace.
fn topic() -> impl Strategy<Value = String> {
    "[^,\\s]([^,]{0,10}[^,\\s])?"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn notws_frames_never_panic_and_topics_are_trimmed_and_non_empty(text in ".{0,200}") {
        match protocol::parse_notws(&text) {
            NotwsCommand::Subscribe(topics) => {
                prop_assert!(text.starts_with("subscribe:"));
                for t in topics {
                    prop_assert!(!t.is_empty() && t == t.trim() && !t.contains(','));
                }
            }
            NotwsCommand::Unsubscribe(topics) => {
                prop_assert!(text.starts_with("unsubscribe:"));
                for t in topics {
                    prop_assert!(!t.is_empty() && t == t.trim() && !t.contains(','));
                }
            }
            NotwsCommand::Unknown => {
                prop_assert!(!text.starts_with("subscribe:") && !text.starts_with("unsubscribe:"));
            }
        }
    }

    #[test]
    fn notws_rendered_topics_parse_back(
        topics in prop::collection::vec(topic(), 0..20),
        sep in prop_oneof![Just(","), Just(", "), Just(" , ")],
        unsubscribe in any::<bool>(),
    ) {
        let prefix = if unsubscribe { "unsubscribe:" } else { "subscribe: " };
        let text = format!("{prefix}{}", topics.join(sep));
        let want: Vec<&str> = topics.iter().map(String::as_str).collect();
        let got = protocol::parse_notws(&text);
        if unsubscribe {
            prop_assert_eq!(got, NotwsCommand::Unsubscribe(want));
        } else {
            prop_assert_eq!(got, NotwsCommand::Subscribe(want));
        }
    }

    #[test]
    fn chat_frames_never_panic_and_always_carry_the_real_sender(
        text in prop_oneof![".{0,200}", any_json().prop_map(|v| v.to_string())],
        sender in "[a-z]{1,8}",
    ) {
        if let Ok(frame) = protocol::parse_chat(&text, &sender) {
            prop_assert!(!frame.room_id.is_empty());
            let v: Value = serde_json::from_str(&frame.frame).expect("the frame is JSON");
            let message = v.get("chatMessage").unwrap_or(&v);
            prop_assert_eq!(message["fromUserId"].as_str(), Some(sender.as_str()));
            prop_assert_eq!(message["chatRoom"]["chatRoomId"].as_str(), Some(frame.room_id.as_str()));
        }
    }

    #[test]
    fn chat_frames_with_a_room_are_routed(
        room in ".{1,20}",
        content in ".{0,40}",
        claimed in ".{0,8}",
        wrapped in any::<bool>(),
    ) {
        let message = json!({"chatRoom": {"chatRoomId": room}, "content": content, "fromUserId": claimed});
        let text = if wrapped { json!({"chatMessage": message}) } else { message }.to_string();
        let frame = protocol::parse_chat(&text, "alice").expect("a message with a room parses");
        prop_assert_eq!(frame.room_id, room);
        let v: Value = serde_json::from_str(&frame.frame).expect("JSON");
        let m = if wrapped { &v["chatMessage"] } else { &v };
        prop_assert_eq!(m["fromUserId"].as_str(), Some("alice"));
        prop_assert_eq!(m["content"].as_str(), Some(content.as_str()));
    }

    #[test]
    fn chat_frames_without_a_room_are_refused(v in any_json()) {
        let has_room = |m: &Value| {
            m.get("chatRoom")
                .and_then(|r| r.get("chatRoomId"))
                .and_then(Value::as_str)
                .is_some_and(|id| !id.is_empty())
        };
        let message = v.get("chatMessage").unwrap_or(&v);
        let result = protocol::parse_chat(&v.to_string(), "alice");
        if !has_room(message) {
            prop_assert!(matches!(
                result,
                Err(ChatFrameError::NoRoom) | Err(ChatFrameError::InvalidJson)
            ));
        }
    }

    #[test]
    fn envelope_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = protocol::decode(Bytes::from(bytes));
    }

    #[test]
    fn envelope_round_trips(
        kind in prop_oneof![Just(Kind::Notification), Just(Kind::Chat), Just(Kind::Canary)],
        topic in ".{0,30}",
        frame in ".{0,200}",
        at in any::<u64>(),
    ) {
        let env = protocol::decode(protocol::encode_at(kind, &topic, frame.as_bytes(), at))
            .expect("an encoded envelope decodes");
        prop_assert_eq!(env.kind, kind);
        prop_assert_eq!(env.published_at, at);
        prop_assert_eq!(env.topic.as_str(), topic.as_str());
        prop_assert_eq!(env.frame.as_str(), frame.as_str());
    }

    #[test]
    fn envelope_with_a_corrupted_byte_never_panics(
        frame in ".{0,40}",
        at in 0usize..64,
        byte in any::<u8>(),
    ) {
        let mut bytes = protocol::encode_at(Kind::Notification, "T", frame.as_bytes(), 1).to_vec();
        let i = at % bytes.len();
        bytes[i] = byte;
        let _ = protocol::decode(Bytes::from(bytes));
    }

    #[test]
    fn notification_topic_is_a_non_blank_string(
        raw in prop_oneof![".{0,80}", any_json().prop_map(|v| v.to_string())],
    ) {
        if let Some(t) = protocol::notification_topic(&raw) {
            prop_assert!(!t.trim().is_empty());
        }
    }

    #[test]
    fn authenticate_answers_never_panic(v in any_json()) {
        match identity_from(&v, "/userId", Some("/companyPartyId")) {
            Ok(id) => {
                prop_assert_eq!(v.pointer("/userId").and_then(Value::as_str), Some(&*id.user_id));
                prop_assert!(!id.user_id.is_empty());
            }
            Err(BackendError::Rejected) => {
                prop_assert!(matches!(v.pointer("/userId"), None | Some(Value::Null)));
            }
            Err(BackendError::InvalidResponse(_)) => {}
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }

    #[test]
    fn authenticate_answers_name_their_user_and_tenant(
        user in ".{1,12}",
        tenant in prop::option::of(".{0,12}"),
    ) {
        let v = json!({"user": {"userId": user, "companyPartyId": tenant}});
        let id = identity_from(&v, "/user/userId", Some("/user/companyPartyId")).expect("a user");
        prop_assert_eq!(&*id.user_id, user.as_str());
        prop_assert_eq!(id.tenant_id.as_deref(), tenant.as_deref().filter(|t| !t.is_empty()));
    }

    #[test]
    fn chat_room_answers_never_panic(v in any_json()) {
        if let Some(members) = members_of(&v) {
            for m in members {
                prop_assert!(m.len() <= 12);
            }
        }
    }

    #[test]
    fn chat_room_members_are_extracted(
        members in prop::collection::vec(".{0,12}", 0..8),
        nested in any::<bool>(),
    ) {
        let list: Vec<Value> = members
            .iter()
            .map(|m| if nested { json!({"user": {"userId": m}, "isActive": true}) } else { json!({"userId": m}) })
            .collect();
        let v = json!({"chatRooms": [{"chatRoomId": "R", "members": list}]});
        prop_assert_eq!(members_of(&v), Some(members));
    }
}

/// API bodies and queries: whatever arrives, the publish API answers 202 or 400 and the presence
/// API 200 or 400, never anything else.
#[test]
fn api_bodies_never_cause_a_server_error() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (_backend, node) = rt.block_on(async {
        let backend = common::Backend::start().await;
        let node = common::Node::start(common::config(&backend)).await;
        (backend, node)
    });
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Bytes::from),
        any_json().prop_map(|v| Bytes::from(v.to_string())),
        (
            prop::option::of(prop::collection::vec(".{0,6}", 0..4)),
            prop::option::of(".{0,6}"),
            prop::option::of(any::<bool>()),
            prop::option::of(any_json()),
        )
            .prop_map(|(users, tenant, broadcast, notification)| {
                let mut o = serde_json::Map::new();
                if let Some(u) = users {
                    o.insert("userIds".into(), json!(u));
                }
                if let Some(t) = tenant {
                    o.insert("tenantId".into(), json!(t));
                }
                if let Some(b) = broadcast {
                    o.insert("broadcast".into(), json!(b));
                }
                if let Some(n) = notification {
                    o.insert("notification".into(), n);
                }
                Bytes::from(Value::Object(o).to_string())
            }),
    ];
    let http = common::http();
    let mut runner =
        proptest::test_runner::TestRunner::new(proptest::test_runner::Config::with_cases(128));
    runner
        .run(
            &(
                body,
                prop_oneof![Just("notifications"), Just("chat"), Just("presence")],
            ),
            |(body, path)| {
                let status = rt.block_on(async {
                    let req = if path == "presence" {
                        // The body's bytes as a query string, escaped or not.
                        let q: String = form_urlencoded::byte_serialize(&body).collect();
                        http.get(node.admin_url(&format!("/api/v1/presence?userId={q}&{q}")))
                    } else {
                        http.post(node.admin_url(&format!("/api/v1/{path}")))
                            .header("content-type", "application/json")
                            .body(body.clone())
                    };
                    req.bearer_auth(common::TOKEN)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0)
                });
                let documented: &[u16] = if path == "presence" {
                    &[200, 400]
                } else {
                    &[202, 400]
                };
                prop_assert!(
                    documented.contains(&status),
                    "{path} answered {status} to {:?}",
                    String::from_utf8_lossy(&body)
                );
                Ok(())
            },
        )
        .expect("no API body causes a server error");
    rt.block_on(node.stop());
}
