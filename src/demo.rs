//! `wsgate demo` and `wsgate demo-backend`: a stand-in for the Moqui / GrowERP back-end with the
//! real response shapes, so the gateway can be tried (and load-tested) with nothing else
//! installed.
//!
//! Any key `demo-key-<userId>` authenticates as `<userId>` (tenant `DemoCompany`); room
//! `demo-room` holds john, jane and bob; any room `pair-<a>-<b>` holds a and b. `GET /stats`
//! counts the calls.
//!
//! For a browser it is also a tiny web application, shaped like Moqui's: `GET /` logs a demo
//! user in (a `JSESSIONID` session cookie), `GET /app` is a page whose client behaves like
//! Moqui's NotificationClient (cookie only, `subscribe:` on every open, reopens) plus a chat box,
//! `POST /publish` forwards a notification to the gateway's publish API with the demo token
//! (which never reaches the browser), and `GET /rest/s1/wsgate/whoami` answers the real contract
//! for the gateway. The Authenticate and ChatRoom calls accept the session cookie too, as Moqui
//! does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::json;
use tokio::net::TcpListener;

pub const DEMO_TENANT: &str = "DemoCompany";
pub const DEMO_ROOM: &str = "demo-room";
pub const DEMO_USERS: [&str; 3] = ["john", "jane", "bob"];
pub const DEMO_TOKEN: &str = "demo-token";

/// The session cookie the demo back-end sets, as Moqui's servlet container does.
pub const SESSION_COOKIE: &str = "JSESSIONID";

#[derive(Default)]
pub struct Stats {
    pub authenticate: AtomicU64,
    pub chat_room: AtomicU64,
    pub whoami: AtomicU64,
}

/// Where the gateway that serves this demo listens: its public port (the page's WebSockets go
/// there, on the page's own host name) and its internal publish API.
#[derive(Debug, Clone)]
pub struct GatewayLinks {
    pub public_port: u16,
    pub admin: SocketAddr,
}

/// The demo back-end's state: call counters, web sessions, the gateway it publishes to.
pub struct Demo {
    stats: Arc<Stats>,
    /// session id → user
    sessions: Mutex<HashMap<String, String>>,
    gateway: Option<GatewayLinks>,
    http: reqwest::Client,
}

impl Demo {
    pub fn new(stats: Arc<Stats>, gateway: Option<GatewayLinks>) -> Demo {
        Demo {
            stats,
            sessions: Mutex::new(HashMap::new()),
            gateway,
            http: reqwest::Client::new(),
        }
    }

    fn session_user(&self, headers: &HeaderMap) -> Option<String> {
        let id = session_id(headers)?;
        self.sessions.lock().ok()?.get(&id).cloned()
    }

    /// The user of an `api_key: demo-key-<user>` header, else of the session cookie.
    fn user_of(&self, headers: &HeaderMap) -> Option<String> {
        key_user(headers).or_else(|| self.session_user(headers))
    }
}

fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn key_user(headers: &HeaderMap) -> Option<String> {
    let key = headers.get("api_key")?.to_str().ok()?;
    let user = key.strip_prefix("demo-key-")?;
    valid_user(user).then(|| user.to_owned())
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, value)| *name == SESSION_COOKIE && !value.is_empty())
        .map(|(_, value)| value.to_owned())
}

async fn authenticate(State(demo): State<Arc<Demo>>, headers: HeaderMap) -> Response {
    demo.stats.authenticate.fetch_add(1, Ordering::Relaxed);
    match demo.user_of(&headers) {
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
    State(demo): State<Arc<Demo>>,
    headers: HeaderMap,
    Query(q): Query<RoomQuery>,
) -> Response {
    demo.stats.chat_room.fetch_add(1, Ordering::Relaxed);
    if demo.user_of(&headers).is_none() {
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

/// The whoami contract of the Moqui component: who this request's session (or key) is.
async fn whoami(State(demo): State<Arc<Demo>>, headers: HeaderMap) -> Response {
    demo.stats.whoami.fetch_add(1, Ordering::Relaxed);
    match demo.user_of(&headers) {
        Some(user) => Json(json!({"userId": user, "ownerPartyId": DEMO_TENANT})).into_response(),
        None => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"errorCode": 401, "errors": "User must be logged in"})),
        )
            .into_response(),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn login_page(State(demo): State<Arc<Demo>>, headers: HeaderMap) -> Response {
    if demo.session_user(&headers).is_some() {
        return Redirect::to("/app").into_response();
    }
    let buttons: String = DEMO_USERS
        .iter()
        .map(|u| {
            format!(r#"<button name="user" value="{u}" id="login-{u}">Log in as {u}</button>"#)
        })
        .collect();
    Html(include_str!("demo_login.html").replace("{{BUTTONS}}", &buttons)).into_response()
}

#[derive(serde::Deserialize)]
struct LoginForm {
    user: String,
}

async fn login(State(demo): State<Arc<Demo>>, Form(form): Form<LoginForm>) -> Response {
    if !DEMO_USERS.contains(&form.user.as_str()) {
        return (StatusCode::UNAUTHORIZED, "unknown demo user\n").into_response();
    }
    let id = format!("{:032x}", rand::random::<u128>());
    match demo.sessions.lock() {
        Ok(mut sessions) => sessions.insert(id.clone(), form.user),
        Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    (
        [(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Lax"),
        )],
        Redirect::to("/app"),
    )
        .into_response()
}

async fn logout(State(demo): State<Arc<Demo>>, headers: HeaderMap) -> Response {
    if let (Some(id), Ok(mut sessions)) = (session_id(&headers), demo.sessions.lock()) {
        sessions.remove(&id);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

async fn app_page(State(demo): State<Arc<Demo>>, headers: HeaderMap) -> Response {
    let Some(user) = demo.session_user(&headers) else {
        return Redirect::to("/").into_response();
    };
    let Some(gateway) = &demo.gateway else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this demo back-end runs without a gateway; start `wsgate demo` for the page\n",
        )
            .into_response();
    };
    let config = json!({"user": user, "gatewayPort": gateway.public_port, "room": DEMO_ROOM});
    let recipients: String = DEMO_USERS
        .iter()
        .map(|u| {
            let selected = if *u == user { " selected" } else { "" };
            format!(r#"<option value="{u}"{selected}>{u}</option>"#)
        })
        .collect();
    // The user name is one of DEMO_USERS; escaping keeps it so if that ever changes.
    let page = include_str!("demo_app.html")
        .replace("{{CONFIG}}", &config.to_string().replace('<', "\\u003c"))
        .replace("{{RECIPIENTS}}", &recipients)
        .replace("{{USER}}", &escape(&user));
    Html(page).into_response()
}

#[derive(serde::Deserialize)]
struct PublishForm {
    /// A demo user, or `*` for the whole demo tenant.
    to: String,
    topic: String,
    title: String,
    #[serde(default)]
    message: String,
}

/// Publishes a notification from the page through the gateway's internal API, as a Moqui
/// service would: the API token stays on this side. JSON only, so a cross-site form cannot post
/// here with the visitor's cookie.
async fn publish(
    State(demo): State<Arc<Demo>>,
    headers: HeaderMap,
    Json(form): Json<PublishForm>,
) -> Response {
    let Some(user) = demo.session_user(&headers) else {
        return (StatusCode::UNAUTHORIZED, "log in first\n").into_response();
    };
    let Some(gateway) = &demo.gateway else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no gateway\n").into_response();
    };
    let topic = if form.topic.trim().is_empty() {
        "DemoTopic"
    } else {
        form.topic.trim()
    };
    let notification = json!({
        "topic": topic,
        "subTopic": "",
        "sentDate": sent_date(),
        "notificationMessageId": format!("{:016x}", rand::random::<u64>()),
        "topicDescription": "wsgate demo",
        "message": {"text": form.message, "from": user},
        "title": form.title,
        "link": "/app",
        "type": "info",
        "persistOnSend": false,
        "showAlert": true,
        "alertNoAutoHide": false,
    });
    let body = if form.to == "*" {
        json!({"tenantId": DEMO_TENANT, "notification": notification})
    } else if DEMO_USERS.contains(&form.to.as_str()) {
        json!({"userIds": [form.to], "notification": notification})
    } else {
        return (StatusCode::BAD_REQUEST, "unknown recipient\n").into_response();
    };
    let url = format!("http://{}/api/v1/notifications", gateway.admin);
    match demo
        .http
        .post(url)
        .bearer_auth(DEMO_TOKEN)
        .json(&body)
        .send()
        .await
    {
        Ok(resp) => {
            let status =
                StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let text = resp.text().await.unwrap_or_default();
            (status, text).into_response()
        }
        Err(_) => (StatusCode::BAD_GATEWAY, "the gateway cannot be reached\n").into_response(),
    }
}

/// Moqui sends `sentDate` as a string: now, in RFC 3339.
fn sent_date() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The demo back-end's router.
pub fn backend_app(stats: Arc<Stats>) -> Router {
    demo_app(Arc::new(Demo::new(stats, None)))
}

/// The demo back-end's router with its web pages wired to a gateway.
pub fn demo_app(demo: Arc<Demo>) -> Router {
    Router::new()
        .route("/", get(login_page))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/app", get(app_page))
        .route("/publish", post(publish))
        .route("/rest/s1/growerp/100/Authenticate", get(authenticate))
        .route("/rest/s1/growerp/100/ChatRoom", get(chat_room))
        .route("/rest/s1/wsgate/whoami", get(whoami))
        .route(
            "/stats",
            get(|State(d): State<Arc<Demo>>| async move {
                Json(json!({
                    "authenticate": d.stats.authenticate.load(Ordering::Relaxed),
                    "chatRoom": d.stats.chat_room.load(Ordering::Relaxed),
                    "whoami": d.stats.whoami.load(Ordering::Relaxed),
                }))
            }),
        )
        .with_state(demo)
}

/// Serves the demo back-end on `listener` until the process ends.
pub async fn serve_backend(listener: TcpListener) -> std::io::Result<()> {
    axum::serve(listener, backend_app(Arc::new(Stats::default()))).await
}

/// Serves the demo back-end with its pages publishing through `gateway`.
pub async fn serve_demo(listener: TcpListener, gateway: GatewayLinks) -> std::io::Result<()> {
    let demo = Arc::new(Demo::new(Arc::new(Stats::default()), Some(gateway)));
    axum::serve(listener, demo_app(demo)).await
}

/// The browser origins of the demo page: the back-end's address, and `localhost` for a loopback
/// address (both reach the same page).
pub fn page_origins(backend: SocketAddr) -> Vec<String> {
    let mut v = vec![format!("http://{backend}")];
    if backend.ip().is_loopback() {
        v.push(format!("http://localhost:{}", backend.port()));
    }
    v
}

/// What `wsgate demo` prints once everything listens.
pub fn banner(public: SocketAddr, admin: SocketAddr, backend: SocketAddr) -> String {
    format!(
        r#"wsgate demo: open http://{backend}/ in a browser (log in as john, jane or bob).

wsgate demo is running (in-process broker, built-in demo back-end).

  notifications  ws://{public}/notws?api_key=demo-key-john&userId=john
  chat           ws://{public}/chat?api_key=demo-key-jane
  metrics        http://{admin}/metrics
  demo back-end  http://{backend}   (users: john, jane, bob; any key demo-key-<user> works;
                                      chat room: {DEMO_ROOM}; web sessions: JSESSIONID)
  browser page   http://{backend}/   (logs in with a session cookie, no API key; the gateway
                                      accepts this origin through --allowed-origins)

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
