//! The Moqui / GrowERP back-end's REST calls: Authenticate (API keys), whoami (browser session
//! cookies) and ChatRoom. One HTTP client per node (connection pooling, no cookie store), a
//! timeout on every call, errors classified for metrics. A credential travels only in the
//! `api_key` or `Cookie` request header and never into an error or a log line; whatever the
//! back-end answers in `Set-Cookie` is dropped here and never reaches a client.
//!
//! The back-end is protected from the node: at most `--backend-concurrency` calls are in flight
//! at once, the rest wait in a queue bounded in length (`--backend-queue`) and in time
//! (`--backend-queue-timeout`), after which the call fails as [`BackendError::Busy`] without
//! reaching the back-end (the handshake gets 503 with a jittered `Retry-After`). The idle
//! connection pool holds at most as many connections as may be in flight. Callers coalesce
//! concurrent calls for one key before they get here (the auth and room caches), so a storm of
//! N distinct keys costs N calls, spread over the slots.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{StatusCode, Url};
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::identity::Identity;
use crate::metrics::{BackendCall, Metrics};

/// What a back-end call can end in.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The back-end answered 401/403 (or 400 for a malformed key): the key is not valid.
    #[error("the back-end rejected the API key")]
    Rejected,
    /// The call did not answer in time.
    #[error("the back-end did not answer in time")]
    Timeout,
    /// No connection could be made.
    #[error("the back-end cannot be reached")]
    Connect,
    /// 5xx or another unexpected status.
    #[error("the back-end answered HTTP {0}")]
    Status(u16),
    /// The answer was not the JSON we expect.
    #[error("the back-end's answer is not usable: {0}")]
    InvalidResponse(&'static str),
    /// The looked-up object does not exist (404 or an empty answer).
    #[error("not found")]
    NotFound,
    /// No slot freed up within `--backend-queue-timeout`, or the queue was full: the back-end
    /// was not asked.
    #[error("too many back-end calls waiting")]
    Busy,
}

impl BackendError {
    fn kind(&self) -> Option<&'static str> {
        match self {
            BackendError::Timeout => Some("timeout"),
            BackendError::Connect => Some("connect"),
            BackendError::Status(_) => Some("status"),
            BackendError::InvalidResponse(_) => Some("invalid_response"),
            // Counted by the queue's own metrics, not as a failed call.
            BackendError::Rejected | BackendError::NotFound | BackendError::Busy => None,
        }
    }

    /// True when the back-end could not give an answer (the client should retry: HTTP 503).
    pub fn is_unavailable(&self) -> bool {
        self.kind().is_some() || matches!(self, BackendError::Busy)
    }
}

/// What a client proved who it is with. Its `Debug` shows the kind only, never the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// An API key (GrowERP's app, scripts): sent as the `api_key` header.
    ApiKey(String),
    /// A browser's session cookies (Moqui's web UI), already reduced to the configured names:
    /// the value of the `Cookie` header sent to the back-end, e.g. `JSESSIONID=abc`.
    SessionCookies(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::ApiKey(_) => f.write_str("ApiKey(<redacted>)"),
            Credential::SessionCookies(_) => f.write_str("SessionCookies(<redacted>)"),
        }
    }
}

impl Credential {
    fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Credential::ApiKey(key) => req.header("api_key", key),
            Credential::SessionCookies(cookies) => req.header(reqwest::header::COOKIE, cookies),
        }
    }
}

pub struct Backend {
    http: reqwest::Client,
    auth_url: Url,
    chat_room_url: Url,
    user_id_pointer: String,
    tenant_pointer: Option<String>,
    session_auth_url: Url,
    session_user_pointer: String,
    session_tenant_pointer: Option<String>,
    metrics: Arc<Metrics>,
    /// `--backend-concurrency` permits.
    slots: Arc<Semaphore>,
    /// Calls waiting for a permit now.
    waiting: AtomicUsize,
    queue_limit: usize,
    queue_timeout: Duration,
}

/// How long an idle connection to the back-end is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One of the `--backend-concurrency` slots, held for the duration of a call. Owned, so that a
/// call can outlive the handshake that queued it ([`crate::auth`]).
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.backend_in_flight.dec();
    }
}

/// A place in the queue; given back however the wait ends (a slot, a timeout, or the handshake
/// dropped by its client).
struct Waiting<'a>(&'a Backend);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.backend_queued.dec();
    }
}

impl Backend {
    pub fn new(
        cfg: &crate::config::Config,
        metrics: Arc<Metrics>,
    ) -> Result<Backend, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(cfg.backend_timeout)
            .connect_timeout(cfg.backend_timeout)
            // Never more idle connections than calls that may be in flight: after a storm the
            // node does not sit on hundreds of the back-end's connections (or worker threads).
            .pool_max_idle_per_host(cfg.backend_concurrency)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .user_agent(concat!("wsgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Backend {
            http,
            auth_url: cfg.auth_url.clone(),
            chat_room_url: cfg.chat_room_url.clone(),
            user_id_pointer: cfg.user_id_pointer.clone(),
            tenant_pointer: cfg.tenant_pointer.clone(),
            session_auth_url: cfg.session_auth_url.clone(),
            session_user_pointer: cfg.session_user_pointer.clone(),
            session_tenant_pointer: cfg.session_tenant_pointer.clone(),
            metrics,
            slots: Arc::new(Semaphore::new(cfg.backend_concurrency)),
            waiting: AtomicUsize::new(0),
            queue_limit: cfg.backend_queue,
            queue_timeout: cfg.backend_queue_timeout,
        })
    }

    /// Takes a slot, waiting in the bounded queue if all are taken (the semaphore is fair: first
    /// come, first served). Dropping the wait leaves the queue.
    pub async fn slot(&self) -> Result<Slot, BackendError> {
        let started = Instant::now();
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => {
                self.metrics.backend_queue_wait.observe(0.0);
                p
            }
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue_limit {
                    self.waiting.fetch_sub(1, Ordering::Relaxed);
                    self.metrics.backend_queue_full.inc();
                    return Err(BackendError::Busy);
                }
                self.metrics.backend_queued.inc();
                let _place = Waiting(self);
                let got =
                    tokio::time::timeout(self.queue_timeout, self.slots.clone().acquire_owned())
                        .await;
                self.metrics
                    .backend_queue_wait
                    .observe(started.elapsed().as_secs_f64());
                match got {
                    Ok(Ok(p)) => p,
                    // The semaphore is never closed; treat it like a timeout if it were.
                    Ok(Err(_)) | Err(_) => {
                        self.metrics.backend_queue_timeouts.inc();
                        return Err(BackendError::Busy);
                    }
                }
            }
        };
        self.metrics.backend_in_flight.inc();
        Ok(Slot {
            _permit: permit,
            metrics: self.metrics.clone(),
        })
    }

    async fn get_json(
        &self,
        call: BackendCall,
        url: Url,
        credential: &Credential,
        slot: Slot,
    ) -> Result<Value, BackendError> {
        let started = Instant::now();
        let result = self.get_json_inner(url, credential).await;
        self.metrics
            .backend_duration
            .with_label_values(&[call.as_str()])
            .observe(started.elapsed().as_secs_f64());
        drop(slot);
        if let Err(e) = &result {
            if let Some(kind) = e.kind() {
                self.metrics.backend_error(call, kind);
                tracing::warn!(call = call.as_str(), error = %e, "back-end call failed");
            }
        }
        result
    }

    async fn get_json_inner(
        &self,
        url: Url,
        credential: &Credential,
    ) -> Result<Value, BackendError> {
        let resp = credential
            .apply(self.http.get(url))
            .header("accept", "application/json")
            .send()
            .await
            .map_err(classify)?;
        let status = resp.status();
        match status {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST => {
                return Err(BackendError::Rejected)
            }
            StatusCode::NOT_FOUND => return Err(BackendError::NotFound),
            s => return Err(BackendError::Status(s.as_u16())),
        }
        let body = resp.bytes().await.map_err(classify)?;
        serde_json::from_slice(&body).map_err(|_| BackendError::InvalidResponse("not JSON"))
    }

    /// Says who a credential belongs to: an API key with the Authenticate call, session cookies
    /// with the whoami call, each read at its own JSON pointers.
    pub async fn authenticate(&self, credential: &Credential) -> Result<Identity, BackendError> {
        let slot = self.slot().await?;
        self.authenticate_in(slot, credential).await
    }

    /// [`Backend::authenticate`] in a slot already taken.
    pub async fn authenticate_in(
        &self,
        slot: Slot,
        credential: &Credential,
    ) -> Result<Identity, BackendError> {
        let (call, url, user_pointer, tenant_pointer) = match credential {
            Credential::ApiKey(_) => (
                BackendCall::Authenticate,
                &self.auth_url,
                &self.user_id_pointer,
                &self.tenant_pointer,
            ),
            Credential::SessionCookies(_) => (
                BackendCall::Whoami,
                &self.session_auth_url,
                &self.session_user_pointer,
                &self.session_tenant_pointer,
            ),
        };
        let v = self.get_json(call, url.clone(), credential, slot).await?;
        identity_from(&v, user_pointer, tenant_pointer.as_deref())
    }

    /// Lists a chat room's member user ids, asked with the sender's own credential.
    pub async fn chat_room_members(
        &self,
        room_id: &str,
        credential: &Credential,
    ) -> Result<Vec<String>, BackendError> {
        let mut url = self.chat_room_url.clone();
        url.query_pairs_mut().append_pair("chatRoomId", room_id);
        let slot = self.slot().await?;
        let v = self
            .get_json(BackendCall::ChatRoom, url, credential, slot)
            .await?;
        members_of(&v).ok_or(BackendError::NotFound)
    }
}

/// Reads who an Authenticate or whoami answer names: the user id at `user_pointer` (a non-empty
/// string; absent or null means the credential was rejected), the tenant at `tenant_pointer`
/// (ignored unless a non-empty string).
pub fn identity_from(
    v: &Value,
    user_pointer: &str,
    tenant_pointer: Option<&str>,
) -> Result<Identity, BackendError> {
    let user_id = match v.pointer(user_pointer) {
        Some(Value::String(s)) if !s.is_empty() => s.as_str(),
        // A 200 without a user is how some Moqui versions answer a bad key.
        Some(Value::Null) | None => return Err(BackendError::Rejected),
        Some(_) => return Err(BackendError::InvalidResponse("user id is not a string")),
    };
    let tenant_id = tenant_pointer
        .and_then(|p| v.pointer(p))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(Arc::from);
    Ok(Identity {
        user_id: Arc::from(user_id),
        tenant_id,
    })
}

/// Reads member user ids from a ChatRoom answer: `chatRooms[0].members[*].user.userId`, or
/// `members[*].userId` (also accepted under `chatRoom`). `None` when there is no room.
pub fn members_of(v: &Value) -> Option<Vec<String>> {
    let room = v
        .get("chatRooms")
        .and_then(Value::as_array)
        .and_then(|rooms| rooms.first())
        .or_else(|| v.get("chatRoom"))
        .unwrap_or(v);
    let members = room.get("members")?.as_array()?;
    Some(
        members
            .iter()
            .filter_map(|m| {
                m.pointer("/user/userId")
                    .or_else(|| m.get("userId"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect(),
    )
}

fn classify(e: reqwest::Error) -> BackendError {
    if e.is_timeout() {
        BackendError::Timeout
    } else if e.is_connect() || e.is_request() {
        BackendError::Connect
    } else if e.is_body() || e.is_decode() {
        BackendError::InvalidResponse("body could not be read")
    } else {
        BackendError::Connect
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credential_debug_hides_the_secret() {
        let k = format!("{:?}", Credential::ApiKey("secret-key".into()));
        let c = format!(
            "{:?}",
            Credential::SessionCookies("JSESSIONID=s3cr3t".into())
        );
        assert!(!k.contains("secret-key") && k.contains("ApiKey"), "{k}");
        assert!(!c.contains("s3cr3t") && c.contains("SessionCookies"), "{c}");
    }

    #[test]
    fn members_in_both_shapes() {
        let growerp = json!({"chatRooms": [{"chatRoomId": "R", "members": [
            {"user": {"userId": "a"}}, {"user": {"userId": "b"}}]}]});
        assert_eq!(
            members_of(&growerp),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        let flat = json!({"members": [{"userId": "c"}]});
        assert_eq!(members_of(&flat), Some(vec!["c".to_string()]));
        assert_eq!(members_of(&json!({"chatRooms": []})), None);
    }
}
