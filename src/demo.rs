//! `wsgate demo` and `wsgate demo-backend`: a stand-in for the Moqui / GrowERP back-end with the
//! real response shapes, so the gateway can be tried (and load-tested) with nothing else
//! installed.
//!
//! Any key `demo-key-<userId>` authenticates as `<userId>` (tenant `DemoCompany`); room
//! `demo-room` holds john, jane and bob; any room `pair-<a>-<b>` holds a and b. `GET /stats`
//! counts the calls.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

pub const DEMO_TENANT: &str = "DemoCompany";
pub const DEMO_ROOM: &str = "demo-room";
pub const DEMO_USERS: [&str; 3] = ["john", "jane", "bob"];
pub const DEMO_TOKEN: &str = "demo-token";

#[derive(Default)]
pub struct Stats {
    pub authenticate: AtomicU64,
    pub chat_room: AtomicU64,
}

fn user_of(headers: &HeaderMap) -> Option<String> {
    let key = headers.get("api_key")?.to_str().ok()?;
    let user = key.strip_prefix("demo-key-")?;
    let ok = !user.is_empty()
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    ok.then(|| user.to_owned())
}

async fn authenticate(State(stats): State<Arc<Stats>>, headers: HeaderMap) -> Response {
    stats.authenticate.fetch_add(1, Ordering::Relaxed);
    match user_of(&headers) {
        Some(user) => Json(json!({"authenticate": {
            "ownerPartyId": DEMO_TENANT,
            "user": {"userId": user, "firstName": user, "lastName": "Demo", "loginName": user},
            "company": {"partyId": DEMO_TENANT, "name": "Demo Company"},
            "apiKey": null
        }}))
        .into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"errorCode": 401, "errors": "User must be logged in"})),
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
struct RoomQuery {
    #[serde(rename = "chatRoomId")]
    chat_room_id: Option<String>,
}

fn members_of(room: &str) -> Option<Vec<String>> {
    if room == DEMO_ROOM {
        return Some(DEMO_USERS.iter().map(|u| u.to_string()).collect());
    }
    let pair = room.strip_prefix("pair-")?;
    let (a, b) = pair.split_once('-')?;
    (!a.is_empty() && !b.is_empty()).then(|| vec![a.to_owned(), b.to_owned()])
}

async fn chat_room(
    State(stats): State<Arc<Stats>>,
    headers: HeaderMap,
    Query(q): Query<RoomQuery>,
) -> Response {
    stats.chat_room.fetch_add(1, Ordering::Relaxed);
    if user_of(&headers).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(room) = q.chat_room_id else {
        return Json(json!({"chatRooms": []})).into_response();
    };
    match members_of(&room) {
        Some(members) => Json(json!({"chatRooms": [{
            "chatRoomId": room,
            "chatRoomName": room,
            "isPrivate": false,
            "members": members.iter().map(|m| json!({"user": {"userId": m}, "isActive": true})).collect::<Vec<_>>()
        }]}))
        .into_response(),
        None => Json(json!({"chatRooms": []})).into_response(),
    }
}

/// The demo back-end's router.
pub fn backend_app(stats: Arc<Stats>) -> Router {
    Router::new()
        .route("/rest/s1/growerp/100/Authenticate", get(authenticate))
        .route("/rest/s1/growerp/100/ChatRoom", get(chat_room))
        .route(
            "/stats",
            get(|State(s): State<Arc<Stats>>| async move {
                Json(json!({
                    "authenticate": s.authenticate.load(Ordering::Relaxed),
                    "chatRoom": s.chat_room.load(Ordering::Relaxed),
                }))
            }),
        )
        .with_state(stats)
}

/// Serves the demo back-end on `listener` until the process ends.
pub async fn serve_backend(listener: TcpListener) -> std::io::Result<()> {
    axum::serve(listener, backend_app(Arc::new(Stats::default()))).await
}

/// What `wsgate demo` prints once everything listens.
pub fn banner(public: SocketAddr, admin: SocketAddr, backend: SocketAddr) -> String {
    format!(
        r#"wsgate demo is running (in-process broker, built-in demo back-end).

  notifications  ws://{public}/notws?api_key=demo-key-john&userId=john
  chat           ws://{public}/chat?api_key=demo-key-jane
  metrics        http://{admin}/metrics
  demo back-end  http://{backend}   (users: john, jane, bob; any key demo-key-<user> works;
                                      chat room: {DEMO_ROOM})

1. Open a client (in another terminal; from a source tree: cargo run --release -- client ...):
     wsgate client 'ws://{public}/notws?api_key=demo-key-john&userId=john' --send 'subscribe: ALL'

2. Publish a notification to john:
     curl -s -H 'Authorization: Bearer {DEMO_TOKEN}' -H 'Content-Type: application/json' \
       -d '{{"userIds":["john"],"notification":{{"topic":"DemoTopic","title":"Hello from wsgate","message":{{"text":"hi"}}}}}}' \
       http://{admin}/api/v1/notifications

Chat: connect two clients to /chat, e.g.
     wsgate client 'ws://{public}/chat?api_key=demo-key-bob'
     wsgate client 'ws://{public}/chat?api_key=demo-key-jane'
   and type in one of them:  {{"chatRoom":{{"chatRoomId":"{DEMO_ROOM}"}},"content":"hello"}}
Stop with Ctrl-C.
"#
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn pair_rooms() {
        assert_eq!(
            super::members_of("pair-a-b"),
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(super::members_of("pair-a"), None);
        assert_eq!(super::members_of("other"), None);
    }
}
