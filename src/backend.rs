//! The Moqui / GrowERP back-end's REST calls: Authenticate and ChatRoom. One HTTP client per
//! node (connection pooling), a timeout on every call, errors classified for metrics. The API key
//! travels only in the `api_key` request header and never into an error or a log line.

use std::sync::Arc;
use std::time::Instant;

use reqwest::{StatusCode, Url};
use serde_json::Value;

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
}

impl BackendError {
    fn kind(&self) -> Option<&'static str> {
        match self {
            BackendError::Timeout => Some("timeout"),
            BackendError::Connect => Some("connect"),
            BackendError::Status(_) => Some("status"),
            BackendError::InvalidResponse(_) => Some("invalid_response"),
            BackendError::Rejected | BackendError::NotFound => None,
        }
    }

    /// True when the back-end could not give an answer (the client should retry: HTTP 503).
    pub fn is_unavailable(&self) -> bool {
        self.kind().is_some()
    }
}

pub struct Backend {
    http: reqwest::Client,
    auth_url: Url,
    chat_room_url: Url,
    user_id_pointer: String,
    tenant_pointer: Option<String>,
    metrics: Arc<Metrics>,
}

impl Backend {
    pub fn new(
        cfg: &crate::config::Config,
        metrics: Arc<Metrics>,
    ) -> Result<Backend, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(cfg.backend_timeout)
            .connect_timeout(cfg.backend_timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .user_agent(concat!("wsgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Backend {
            http,
            auth_url: cfg.auth_url.clone(),
            chat_room_url: cfg.chat_room_url.clone(),
            user_id_pointer: cfg.user_id_pointer.clone(),
            tenant_pointer: cfg.tenant_pointer.clone(),
            metrics,
        })
    }

    async fn get_json(
        &self,
        call: BackendCall,
        url: Url,
        key: &str,
    ) -> Result<Value, BackendError> {
        let started = Instant::now();
        let result = self.get_json_inner(url, key).await;
        self.metrics
            .backend_duration
            .with_label_values(&[call.as_str()])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            if let Some(kind) = e.kind() {
                self.metrics.backend_error(call, kind);
                tracing::warn!(call = call.as_str(), error = %e, "back-end call failed");
            }
        }
        result
    }

    async fn get_json_inner(&self, url: Url, key: &str) -> Result<Value, BackendError> {
        let resp = self
            .http
            .get(url)
            .header("api_key", key)
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

    /// Validates an API key with the Authenticate call.
    pub async fn authenticate(&self, key: &str) -> Result<Identity, BackendError> {
        let v = self
            .get_json(BackendCall::Authenticate, self.auth_url.clone(), key)
            .await?;
        let user_id = match v.pointer(&self.user_id_pointer) {
            Some(Value::String(s)) if !s.is_empty() => s.as_str(),
            // A 200 without a user is how some Moqui versions answer a bad key.
            Some(Value::Null) | None => return Err(BackendError::Rejected),
            Some(_) => return Err(BackendError::InvalidResponse("user id is not a string")),
        };
        let tenant_id = self
            .tenant_pointer
            .as_deref()
            .and_then(|p| v.pointer(p))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(Arc::from);
        Ok(Identity {
            user_id: Arc::from(user_id),
            tenant_id,
        })
    }

    /// Lists a chat room's member user ids, asked with the sender's own key.
    pub async fn chat_room_members(
        &self,
        room_id: &str,
        key: &str,
    ) -> Result<Vec<String>, BackendError> {
        let mut url = self.chat_room_url.clone();
        url.query_pairs_mut().append_pair("chatRoomId", room_id);
        let v = self.get_json(BackendCall::ChatRoom, url, key).await?;
        members_of(&v).ok_or(BackendError::NotFound)
    }
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
