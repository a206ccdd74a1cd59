//! The internal publish and presence API (`/api/v1` on the admin listener), used by the Moqui
//! notification listener and GrowERP's chat pushes. Requests carry `Authorization: Bearer
//! <--api-token>`; without a configured token the API is disabled (403) rather than open.
//!
//! The notification object is forwarded byte for byte: it is kept as raw JSON, checked, and
//! encoded into one envelope whatever the number of recipients.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, RawQuery, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::auth::bearer_token;
use crate::auth::credential_hash;
use crate::backend::Credential;
use crate::hub::{Channel, Hub, Revocation};
use crate::members::members;
use crate::metrics::Metrics;
use crate::protocol::{self, Kind};

/// Most user ids one request may name.
const MAX_USERS: usize = 10_000;

/// What the API uses of its node: the hub to publish into, the metrics, its token and body limit.
pub struct Api {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// `--api-token`; `None` disables the API. Never logged.
    pub token: Option<SecretString>,
    /// `--max-api-body`, in bytes.
    pub max_body: usize,
}

type ApiState = State<Arc<Api>>;

/// The API's routes, with their own state: nest them into any router.
pub fn router<S: Clone + Send + Sync + 'static>(api: Arc<Api>) -> Router<S> {
    let limit = api.max_body;
    Router::new()
        .route("/notifications", post(notifications))
        .route("/chat", post(chat))
        .route("/presence", get(presence))
        .route("/revocations", post(revocations))
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(api.clone(), require_token))
        .with_state(api)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    ApiError(status, msg.into()).into_response()
}

/// A request the API refuses: a status and a sentence naming the problem.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn route_of(path: &str) -> &'static str {
    if path.ends_with("/notifications") {
        "notifications"
    } else if path.ends_with("/chat") {
        "chat"
    } else if path.ends_with("/presence") {
        "presence"
    } else if path.ends_with("/revocations") {
        "revocations"
    } else {
        "other"
    }
}

/// Constant-time comparison (`subtle`), so the token cannot be guessed byte by byte from
/// timings; only the length can differ in time.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

async fn require_token(State(state): ApiState, req: Request, next: Next) -> Response {
    let route = route_of(req.uri().path());
    let resp = match &state.token {
        None => error(
            StatusCode::FORBIDDEN,
            "the publish API is disabled: start wsgate with --api-token (WSGATE_API_TOKEN)",
        ),
        Some(token) => {
            let given = bearer_token::<false>(req.headers());
            match given {
                Some(g) if same(g.as_bytes(), token.expose_secret().as_bytes()) => {
                    next.run(req).await
                }
                Some(_) => error(StatusCode::UNAUTHORIZED, "wrong API token"),
                None => error(
                    StatusCode::UNAUTHORIZED,
                    "missing Authorization: Bearer <api token>",
                ),
            }
        }
    };
    state
        .metrics
        .api_requests
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    resp
}

fn body_error(e: BytesRejection) -> Response {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
    } else {
        error(e.status(), e.body_text())
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid request: {e}")))
}

/// A user id of a request: borrowed from the body unless JSON escapes had to be undone, so a
/// publish to 1,000 users does not allocate 1,000 strings.
#[derive(Deserialize, PartialEq, Eq, PartialOrd, Ord)]
struct UserId<'a>(#[serde(borrow)] Cow<'a, str>);

impl UserId<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn channel(&self) -> Channel<'_> {
        Channel::User(&self.0)
    }
}

fn user_list(UserIds(ids): UserIds<'_>) -> Result<Vec<UserId<'_>>, ApiError> {
    if ids.is_empty() {
        return Err(bad_request("userIds is empty"));
    }
    if ids.len() > MAX_USERS {
        return Err(bad_request(format!(
            "userIds names more than {MAX_USERS} users"
        )));
    }
    if ids.iter().any(|u| u.is_empty()) {
        return Err(bad_request("userIds contains an empty user id"));
    }
    // Duplicates are dropped by hashing, not by sorting: a sort of 1,000 ids took a tenth of
    // the publishing side's CPU. Ids keep the request's order unless there were duplicates.
    let mut ids = ids;
    if duplicated(&ids) {
        ids.sort_unstable();
        ids.dedup();
    }
    Ok(ids)
}

/// Whether two of `ids` (at most [`MAX_USERS`]) are the same. An open-addressing table of
/// 4-byte entries, each a position in `ids` and 16 bits of the id's hash, at most half full:
/// 8 KiB for 1,000 ids, where a `HashSet<&str>` took 34 KiB (16-byte buckets and their control
/// bytes), past the allocator's small size classes. Ids are compared only when their hash bits
/// agree. The hasher's seed is random, so that chosen ids cannot make every probe collide.
fn duplicated(ids: &[UserId<'_>]) -> bool {
    use std::hash::BuildHasher as _;
    const POSITION: u32 = 0xFFFF;
    const _: () = assert!(MAX_USERS < POSITION as usize);
    let size = (ids.len() * 2).next_power_of_two().max(16);
    let mask = size - 1;
    let mut table = vec![0u32; size];
    let hasher = foldhash::fast::RandomState::default();
    for (i, id) in ids.iter().enumerate() {
        let hash = hasher.hash_one(&*id.0);
        // Positions are stored plus one: 0 is an empty entry.
        let entry = (i as u32 + 1) | ((hash >> 48) as u32) << 16;
        let mut at = hash as usize & mask;
        loop {
            let found = table[at];
            if found == 0 {
                table[at] = entry;
                break;
            }
            if found >> 16 == entry >> 16 && ids[(found & POSITION) as usize - 1] == *id {
                return true;
            }
            at = (at + 1) & mask;
        }
    }
    false
}

fn object(raw: &RawValue, field: &str) -> Result<(), ApiError> {
    if raw.get().trim_start().starts_with('{') {
        Ok(())
    } else {
        Err(bad_request(format!("{field} must be a JSON object")))
    }
}

/// A request's `userIds`. An array of plain strings (no escapes: the ids Moqui and GrowERP
/// send) is read by a scan of its bytes, after serde_json has checked the whole array as JSON;
/// anything else is read by serde_json. Reading the ids was about half of the instructions of
/// a publish request to 1,000 users; the scan takes about a tenth of that away (serde_json's
/// pass over the raw array costs about what its visit of each string did).
struct UserIds<'a>(Vec<UserId<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for UserIds<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'a RawValue>::deserialize(d)?.get();
        if let Some(ids) = plain_strings(raw) {
            return Ok(UserIds(ids));
        }
        serde_json::from_str(raw).map(UserIds).map_err(|e| {
            // The position in the request is the outer parser's to add, not the array's.
            let msg = e.to_string();
            let at = format!(" at line {} column {}", e.line(), e.column());
            serde::de::Error::custom(msg.strip_suffix(&at).unwrap_or(&msg))
        })
    }
}

/// The strings of a JSON array of strings without escapes, borrowed; `None` for any other
/// value, and for anything that is not JSON. A strict reader of its own: [`read_request`]
/// hands it a value serde_json has not checked.
fn plain_strings(raw: &str) -> Option<Vec<UserId<'_>>> {
    let b = raw.as_bytes();
    let space = |i: usize| crate::members::space(b, i);
    let mut i = space(0);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    i = space(i + 1);
    // At least 4 bytes per id (`"a",`): enough room for any list of non-empty ids, without
    // a pass to count them first; no more than a list may hold.
    let mut ids = Vec::with_capacity((b.len() / 4 + 1).min(MAX_USERS + 1));
    if b.get(i) == Some(&b']') {
        return (space(i + 1) == b.len()).then_some(ids);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let start = i + 1;
        // A quote ends the id; an escape or a control character (not allowed raw in a JSON
        // string) leaves the list to serde_json.
        let end = crate::members::stop(b, start)?;
        if b[end] != b'"' {
            return None;
        }
        ids.push(UserId(Cow::Borrowed(raw.get(start..end)?)));
        i = space(end + 1);
        match b.get(i) {
            Some(b',') => i = space(i + 1),
            Some(b']') => return (space(i + 1) == b.len()).then_some(ids),
            _ => return None,
        }
    }
}

/// A publish request's body: the common shape (keys without escapes, each once, user ids
/// without escapes) in one pass ([`members`]), whose values are each checked by their own
/// reader; anything else by serde_json, which also words the errors. Both read a body the
/// same way (a property test holds them equal).
fn read_request<'a, T: Deserialize<'a>, const N: usize>(
    body: &'a [u8],
    names: [&str; N],
    fast: impl FnOnce([Option<&'a str>; N]) -> Option<T>,
) -> Result<T, ApiError> {
    std::str::from_utf8(body)
        .ok()
        .and_then(|text| members(text, names))
        .and_then(fast)
        .map_or_else(|| parse(body), Ok)
}

/// One member's value read by serde_json; `None` (leave the request to serde_json) if it does
/// not read as `T`. A missing member reads as `null`, as serde reads an absent `Option`.
fn member<'a, T: Deserialize<'a>>(raw: Option<&'a str>) -> Option<T> {
    serde_json::from_str(raw.unwrap_or("null")).ok()
}

/// `userIds` of the common shape: absent, or an array of plain strings.
fn member_ids(raw: Option<&str>) -> Option<Option<UserIds<'_>>> {
    match raw {
        None => Some(None),
        Some(raw) => plain_strings(raw).map(|ids| Some(UserIds(ids))),
    }
}

const NOTIFICATION_MEMBERS: [&str; 4] = ["userIds", "tenantId", "broadcast", "notification"];

/// A notification request of the common shape from its members; `None`: serde_json reads it.
fn notification_of(
    [ids, tenant, broadcast, notification]: [Option<&str>; 4],
) -> Option<NotificationRequest<'_>> {
    Some(NotificationRequest {
        user_ids: member_ids(ids)?,
        tenant_id: member(tenant)?,
        broadcast: member(broadcast)?,
        notification: member(notification)?,
    })
}

const CHAT_MEMBERS: [&str; 2] = ["userIds", "chatMessage"];

/// A chat request of the common shape from its members; `None`: serde_json reads it.
fn chat_of([ids, message]: [Option<&str>; 2]) -> Option<ChatRequest<'_>> {
    Some(ChatRequest {
        user_ids: member_ids(ids)?,
        chat_message: member(message)?,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NotificationRequest<'a> {
    #[serde(borrow, rename = "userIds")]
    user_ids: Option<UserIds<'a>>,
    #[serde(rename = "tenantId")]
    tenant_id: Option<String>,
    broadcast: Option<bool>,
    #[serde(borrow)]
    notification: Option<&'a RawValue>,
}

async fn notifications(State(state): ApiState, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let req = match read_request(&body, NOTIFICATION_MEMBERS, notification_of) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let Some(notification) = req.notification else {
        return error(StatusCode::BAD_REQUEST, "notification is required");
    };
    if let Err(e) = object(notification, "notification") {
        return e.into_response();
    }
    let Some(topic) = protocol::notification_topic(notification.get()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "notification.topic is required (a non-empty string)",
        );
    };
    let broadcast = req.broadcast.unwrap_or(false);
    let targets = req.user_ids.is_some() as u8 + req.tenant_id.is_some() as u8 + broadcast as u8;
    if targets != 1 {
        return error(
            StatusCode::BAD_REQUEST,
            "name exactly one of userIds, tenantId or \"broadcast\": true",
        );
    }
    let ids = match req.user_ids.map(user_list).transpose() {
        Ok(ids) => ids,
        Err(e) => return e.into_response(),
    };
    let (target, channels): (_, Vec<Channel>) = if let Some(ids) = &ids {
        ("users", ids.iter().map(UserId::channel).collect())
    } else if let Some(t) = &req.tenant_id {
        if t.is_empty() {
            return error(StatusCode::BAD_REQUEST, "tenantId is empty");
        }
        ("tenant", vec![Channel::Tenant(t)])
    } else {
        ("broadcast", vec![Channel::Everyone])
    };
    let n = channels.len();
    let payload = protocol::encode(Kind::Notification, &topic, notification.get().as_bytes());
    let answer = json!({"topic": topic, "target": target, "channels": n});
    publish(&state, &channels, payload, answer).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest<'a> {
    #[serde(borrow, rename = "userIds")]
    user_ids: Option<UserIds<'a>>,
    #[serde(borrow, rename = "chatMessage")]
    chat_message: Option<&'a RawValue>,
}

async fn chat(State(state): ApiState, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    let req = match read_request(&body, CHAT_MEMBERS, chat_of) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let Some(message) = req.chat_message else {
        return error(StatusCode::BAD_REQUEST, "chatMessage is required");
    };
    if let Err(e) = object(message, "chatMessage") {
        return e.into_response();
    }
    let Some(ids) = req.user_ids else {
        return error(StatusCode::BAD_REQUEST, "userIds is required");
    };
    let ids = match user_list(ids) {
        Ok(ids) => ids,
        Err(e) => return e.into_response(),
    };
    let channels: Vec<Channel> = ids.iter().map(UserId::channel).collect();
    let n = channels.len();
    let payload = protocol::encode(Kind::Chat, "", message.get().as_bytes());
    let answer = json!({"target": "users", "channels": n});
    publish(&state, &channels, payload, answer).await
}

/// Publishes one envelope; 202 with `answer` once the broker took it, 503 when it cannot.
async fn publish(
    state: &Api,
    channels: &[Channel<'_>],
    payload: bytes::Bytes,
    answer: Value,
) -> Response {
    match state.hub.publish(channels, payload).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(answer)).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevocationRequest {
    #[serde(rename = "userId")]
    user_id: Option<String>,
    #[serde(rename = "apiKey")]
    api_key: Option<String>,
}

/// `{"userId"}` or `{"apiKey"}`: every node forgets the cached identities of that user (every
/// key and cookie that resolved to it) or of that key, and closes their sockets with 1008.
/// The key is sent to the other nodes only as its SHA-256.
async fn revocations(State(state): ApiState, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return body_error(e),
    };
    // Not `parse`: serde's message could quote the body, and the body may hold a key.
    let Ok(req) = serde_json::from_slice::<RevocationRequest>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid request: expected a JSON object {\"userId\": \"...\"} or {\"apiKey\": \"...\"}",
        );
    };
    let (revocation, target) = match (req.user_id, req.api_key) {
        (Some(u), None) if !u.is_empty() => (Revocation::User(Arc::from(u.as_str())), "user"),
        (None, Some(k)) if !k.is_empty() => (
            Revocation::Credential(credential_hash(&Credential::ApiKey(k))),
            "apiKey",
        ),
        (Some(_), None) | (None, Some(_)) => {
            return error(StatusCode::BAD_REQUEST, "userId or apiKey is empty")
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "name exactly one of userId or apiKey",
            )
        }
    };
    match state.hub.revoke(&revocation).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({ "revoked": target }))).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn presence(State(state): ApiState, RawQuery(query): RawQuery) -> Response {
    let mut ids: Vec<String> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(k, _)| k == "userId")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
        .collect();
    if ids.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "name at least one user: ?userId=a&userId=b",
        );
    }
    if ids.len() > MAX_USERS {
        return error(
            StatusCode::BAD_REQUEST,
            format!("more than {MAX_USERS} users"),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    match state.hub.broker().presence(ids.clone()).await {
        Ok(online) => {
            let map: BTreeMap<String, Value> = ids
                .into_iter()
                .zip(online)
                .map(|(u, o)| (u, Value::Bool(o)))
                .collect();
            (StatusCode::OK, Json(json!({ "online": map }))).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(body: &str) -> Result<Vec<String>, String> {
        serde_json::from_str::<ChatRequest>(body)
            .map(|r| {
                r.user_ids.map_or_else(Vec::new, |ids| {
                    ids.0.into_iter().map(|u| u.0.into_owned()).collect()
                })
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn plain_user_id_lists_are_scanned_and_borrowed() {
        let raw = r#"[ "alice" ,"bob",
            "c d" ]"#;
        let scanned = plain_strings(raw).expect("plain strings");
        let got: Vec<&str> = scanned.iter().map(|u| &*u.0).collect();
        assert_eq!(got, ["alice", "bob", "c d"]);
        assert!(scanned.iter().all(|u| matches!(u.0, Cow::Borrowed(_))));
        assert_eq!(plain_strings("[]").map(|v| v.len()), Some(0));
        assert_eq!(plain_strings("[ ]").map(|v| v.len()), Some(0));
        for other in [
            r#"["a\"b"]"#,
            r#""a""#,
            "5",
            r#"["a", 5]"#,
            r#"[["a"]]"#,
            "null",
            "{}",
        ] {
            assert!(plain_strings(other).is_none(), "{other}");
        }
    }

    #[test]
    fn other_user_id_lists_are_read_by_serde_json() {
        assert_eq!(
            ids(r#"{"userIds": ["a\"b", "\u00e9"]}"#),
            Ok(vec!["a\"b".into(), "é".into()])
        );
        assert_eq!(ids(r#"{"userIds": ["jöhn"]}"#), Ok(vec!["jöhn".into()]));
        let e = ids(r#"{"userIds": "a"}"#).expect_err("not an array");
        assert_eq!(
            e,
            r#"invalid type: string "a", expected a sequence at line 1 column 16"#
        );
        let e = ids(r#"{"userIds": ["a", 5]}"#).expect_err("not a string");
        assert!(e.starts_with("invalid type: integer `5`, expected"), "{e}");
        assert!(
            ids(r#"{"userIds": ["a",]}"#).is_err(),
            "a trailing comma is not JSON"
        );
    }

    proptest::proptest! {
        /// Whatever the ids, the list reads as serde_json reads it.
        #[test]
        fn any_user_id_list_reads_as_serde_json_reads_it(list in proptest::collection::vec(".{0,8}", 0..8)) {
            let body = serde_json::json!({ "userIds": list }).to_string();
            proptest::prop_assert_eq!(ids(&body), Ok(list));
        }
    }

    /// What a notification request reads as, for comparing the two readers.
    type Read = (
        Option<Vec<String>>,
        Option<String>,
        Option<bool>,
        Option<String>,
    );

    fn projection(r: Result<NotificationRequest<'_>, ApiError>) -> Result<Read, String> {
        r.map(|r| {
            (
                r.user_ids
                    .map(|u| u.0.into_iter().map(|u| u.0.into_owned()).collect()),
                r.tenant_id,
                r.broadcast,
                r.notification.map(|n| n.get().to_owned()),
            )
        })
        .map_err(|e| e.1)
    }

    fn by_serde(body: &str) -> Result<Read, String> {
        projection(parse(body.as_bytes()))
    }

    fn by_one_pass(body: &str) -> Result<Read, String> {
        projection(read_request(
            body.as_bytes(),
            NOTIFICATION_MEMBERS,
            notification_of,
        ))
    }

    #[test]
    fn the_common_shape_is_read_in_one_pass() {
        let moqui = r#"{"userIds":["john.doe","EX_JOHN_DOE"],"notification":{"topic":"t","title":"x \"y\""}}"#;
        let found = members(moqui, NOTIFICATION_MEMBERS).expect("plain object");
        let req = notification_of(found).expect("the common shape");
        let ids = req.user_ids.expect("ids").0;
        let ids: Vec<&str> = ids.iter().map(|u| &*u.0).collect();
        assert_eq!(ids, ["john.doe", "EX_JOHN_DOE"]);
        let chat = r#" {"chatMessage": {"content": "hi"}, "userIds": ["a"]} "#;
        let req = chat_of(members(chat, CHAT_MEMBERS).expect("plain object")).expect("common");
        assert_eq!(
            req.chat_message.map(RawValue::get),
            Some(r#"{"content": "hi"}"#)
        );
    }

    #[test]
    fn the_one_pass_leaves_every_other_body_to_serde_json() {
        for body in [
            r#"{"userIds":["a\u0041"],"notification":{"topic":"t"}}"#,
            "{\"userIds\":[\"a\u{1}\"],\"notification\":{\"topic\":\"t\"}}",
            r#"{"userIds":["a"],"userIds":["b"],"notification":{"topic":"t"}}"#,
            r#"{"userIds":["a"],"notification":{"topic":"t"},"other":1}"#,
            r#"{"userIds":["a"],"notification":{"topic":"t"}} {}"#,
            r#"{"userIds":["a"],"notification":{"topic":"t"},}"#,
            r#"{"userIds":["a",],"notification":{"topic":"t"}}"#,
            r#"{"userIds":["a"] "notification":{"topic":"t"}}"#,
            r#"{"userIds":["a"],"notification":{"topic":"t",}}"#,
            r#"{"userIds":["a"],"broadcast":"yes","notification":{"topic":"t"}}"#,
            r#"{"userIds":null,"tenantId":"x","notification":{"topic":"t"}}"#,
            "{\"userIds\":[\"a\"\u{c}],\"notification\":{\"topic\":\"t\"}}",
        ] {
            assert_eq!(by_one_pass(body), by_serde(body), "{body}");
        }
        let bytes = b"{\"userIds\":[\"\xff\"],\"notification\":{\"topic\":\"t\"}}";
        let fast = read_request(bytes, NOTIFICATION_MEMBERS, notification_of).map(|_| ());
        assert_eq!(
            fast.map_err(|e| e.1),
            parse::<NotificationRequest>(bytes)
                .map(|_| ())
                .map_err(|e| e.1)
        );
    }

    proptest::proptest! {
        /// Whatever the members, their order, their spacing, the request reads as serde_json
        /// reads it, errors included.
        #[test]
        fn a_request_reads_as_serde_json_reads_it(
            ids in proptest::option::of(proptest::collection::vec("[a-z\"\\\\\u{1}é ]{0,4}", 0..4)),
            tenant in proptest::option::of(proptest::option::of("[a-z\"]{0,3}")),
            broadcast in proptest::option::of(proptest::option::of(proptest::bool::ANY)),
            topic in proptest::option::of("[a-z}\\]\"]{0,3}"),
            space in "[ \n]{0,1}",
            order in proptest::strategy::Strategy::prop_shuffle(proptest::strategy::Just(vec![0usize, 1, 2, 3])),
        ) {
            let values = [
                ids.map(|v| serde_json::json!(v)),
                tenant.map(|v| serde_json::json!(v)),
                broadcast.map(|v| serde_json::json!(v)),
                topic.map(|t| serde_json::json!({ "topic": t, "n": [1, {"x": null}] })),
            ];
            let present: Vec<String> = order
                .iter()
                .filter_map(|&k| {
                    values[k].as_ref().map(|v| format!("{space}\"{}\"{space}:{space}{v}", NOTIFICATION_MEMBERS[k]))
                })
                .collect();
            let body = format!("{space}{{{}}}{space}", present.join(","));
            proptest::prop_assert_eq!(by_one_pass(&body), by_serde(&body));
        }
    }

    #[test]
    fn constant_time_compare() {
        assert!(super::same(b"abc", b"abc"));
        assert!(!super::same(b"abc", b"abd"));
        assert!(!super::same(b"abc", b"abcd"));
    }

    #[test]
    fn user_ids_are_borrowed_from_the_body_unless_escaped() {
        use std::borrow::Cow;
        let body = br#"{"userIds": ["b", "a\u0041", "b", "a"], "notification": {"topic": "t"}}"#;
        let req: super::NotificationRequest = super::parse(body).expect("valid");
        let ids = super::user_list(req.user_ids.expect("userIds")).expect("valid ids");
        let seen: Vec<(&str, bool)> = ids
            .iter()
            .map(|u| (&*u.0, matches!(u.0, Cow::Borrowed(_))))
            .collect();
        assert_eq!(seen, [("a", true), ("aA", false), ("b", true)]);
    }

    #[test]
    fn user_ids_without_duplicates_keep_their_order() {
        let body = br#"{"userIds": ["c", "a", "b"], "notification": {"topic": "t"}}"#;
        let req: super::NotificationRequest = super::parse(body).expect("valid");
        let ids = super::user_list(req.user_ids.expect("userIds")).expect("valid ids");
        let seen: Vec<&str> = ids.iter().map(|u| &*u.0).collect();
        assert_eq!(seen, ["c", "a", "b"]);
    }

    proptest::proptest! {
        /// The duplicate check's table says what a set of the ids says, from lists of a few
        /// short ids (many repeats, colliding probes) to thousands (a table past its first
        /// size, entries that wrap around its end).
        #[test]
        fn the_duplicate_check_agrees_with_a_set(
            list in proptest::collection::vec("[ab]{0,3}|[a-z0-9]{1,12}", 0..3000),
        ) {
            let ids: Vec<super::UserId<'_>> =
                list.iter().map(|u| super::UserId(u.as_str().into())).collect();
            let distinct: std::collections::HashSet<&String> = list.iter().collect();
            proptest::prop_assert_eq!(super::duplicated(&ids), distinct.len() < list.len());
        }
    }

    #[test]
    fn distinct_ids_up_to_the_limit_have_no_duplicate() {
        let list: Vec<String> = (0..super::MAX_USERS).map(|i| format!("u{i}")).collect();
        let mut ids: Vec<super::UserId<'_>> = list
            .iter()
            .map(|u| super::UserId(u.as_str().into()))
            .collect();
        assert!(!super::duplicated(&ids));
        ids.push(super::UserId("u9999".into()));
        assert!(super::duplicated(&ids));
    }
}
