//! Credential validation (API keys and browser session cookies) with a moka cache in front of
//! the back-end.
//!
//! - Keyed by the SHA-256 of the credential (its kind and value): the raw key or cookie is never
//!   stored, logged or counted. Keys and cookies share one cache and the same rules below.
//! - Accepted keys live `--auth-ttl`, rejected keys `--auth-negative-ttl` (per-entry expiry).
//! - Concurrent misses for one key are coalesced into one back-end call (moka's
//!   `or_try_insert_with`): a reconnect storm of N tabs costs one call, not N.
//! - A call that reached the back-end is finished and cached even when its handshake is gone
//!   (a client that gave up in a storm comes back to a cached answer); a handshake that goes
//!   while still queued for a slot takes its place in the queue with it.
//! - Back-end failures are not cached. With `--auth-serve-stale` a key that was accepted within
//!   that window is still accepted while the back-end is unreachable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use axum_extra::headers::authorization::Credentials;
use axum_extra::headers::{Authorization, HeaderMapExt};
use moka::future::Cache;
use moka::Expiry;
use sha2::{Digest, Sha256};

use crate::backend::{Backend, BackendError, Credential};
use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::Metrics;

type KeyHash = [u8; 32];

#[derive(Debug, Clone)]
enum Outcome {
    Valid(Identity),
    Rejected,
}

struct TtlByOutcome {
    positive: Duration,
    negative: Duration,
}

impl Expiry<KeyHash, Outcome> for TtlByOutcome {
    fn expire_after_create(&self, _: &KeyHash, v: &Outcome, _: Instant) -> Option<Duration> {
        Some(match v {
            Outcome::Valid(_) => self.positive,
            Outcome::Rejected => self.negative,
        })
    }
}

/// The credentials of an `Authorization: Bearer <token>` header, for the headers crate's typed
/// `Authorization<C>` (what `TypedHeader<Authorization<…>>` extracts). The crate's own `Bearer`
/// matches the scheme in any case; wsgate has always accepted exactly `Bearer` (and, with
/// `LOWERCASE`, `bearer` for client keys), so this type says which spellings are read. The token
/// is trimmed. No `Debug`: it is a secret.
pub struct BearerToken<const LOWERCASE: bool>(String);

impl<const LOWERCASE: bool> BearerToken<LOWERCASE> {
    pub fn token(&self) -> &str {
        &self.0
    }
}

impl<const LOWERCASE: bool> Credentials for BearerToken<LOWERCASE> {
    const SCHEME: &'static str = "Bearer";

    fn decode(value: &HeaderValue) -> Option<Self> {
        let v = value.to_str().ok()?;
        let token = match v.strip_prefix("Bearer ") {
            Some(t) => t,
            None if LOWERCASE => v.strip_prefix("bearer ")?,
            None => return None,
        };
        Some(BearerToken(token.trim().to_owned()))
    }

    fn encode(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .unwrap_or(HeaderValue::from_static("Bearer"));
        v.set_sensitive(true);
        v
    }
}

/// The bearer token of `headers`, if it carries one in an accepted spelling: `Bearer` only on
/// the publish API (`LOWERCASE = false`), `Bearer` or `bearer` from WebSocket clients.
pub fn bearer_token<const LOWERCASE: bool>(headers: &HeaderMap) -> Option<String> {
    let auth: Authorization<BearerToken<LOWERCASE>> = headers.typed_get()?;
    Some(auth.0 .0)
}

/// Why a connection could not be authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("credential rejected")]
    Rejected,
    #[error("authentication back-end unavailable")]
    Unavailable,
}

pub struct Auth {
    backend: Arc<Backend>,
    cache: Cache<KeyHash, Outcome>,
    stale: Option<Cache<KeyHash, Identity>>,
    metrics: Arc<Metrics>,
}

/// The cache key: a tag for the kind, so that a key and a cookie with the same text differ.
/// Also how a revocation names a key on the broker, never in clear.
pub fn credential_hash(credential: &Credential) -> KeyHash {
    hash(credential)
}

fn hash(credential: &Credential) -> KeyHash {
    let (tag, value): (&[u8], &str) = match credential {
        Credential::ApiKey(k) => (b"key\0", k),
        Credential::SessionCookies(c) => (b"cookie\0", c),
    };
    let mut h = Sha256::new();
    h.update(tag);
    h.update(value.as_bytes());
    h.finalize().into()
}

impl Auth {
    pub fn new(cfg: &Config, backend: Arc<Backend>, metrics: Arc<Metrics>) -> Auth {
        let cache = Cache::builder()
            .max_capacity(cfg.auth_cache_capacity)
            .support_invalidation_closures()
            .expire_after(TtlByOutcome {
                positive: cfg.auth_ttl,
                negative: cfg.auth_negative_ttl,
            })
            .build();
        let stale = (!cfg.auth_serve_stale.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(cfg.auth_cache_capacity)
                .support_invalidation_closures()
                .time_to_live(cfg.auth_ttl + cfg.auth_serve_stale)
                .build()
        });
        Auth {
            backend,
            cache,
            stale,
            metrics,
        }
    }

    /// Forgets every cached answer that resolved to `user_id` (keys and cookies alike, fresh and
    /// serve-stale): the next handshake with any of them asks the back-end again.
    pub fn forget_user(&self, user_id: &str) {
        let user: Arc<str> = Arc::from(user_id);
        let u = user.clone();
        let fresh = self.cache.invalidate_entries_if(
            move |_, v| matches!(v, Outcome::Valid(id) if *id.user_id == *u),
        );
        if let Err(e) = fresh {
            tracing::warn!(error = %e, "forgetting a revoked user's cached identities failed");
        }
        if let Some(stale) = &self.stale {
            let u = user.clone();
            if let Err(e) = stale.invalidate_entries_if(move |_, id| *id.user_id == *u) {
                tracing::warn!(error = %e, "forgetting a revoked user's stale identities failed");
            }
        }
    }

    /// Forgets one credential, by its [`credential_hash`].
    pub fn forget_credential(&self, h: KeyHash) {
        if let Err(e) = self.cache.invalidate_entries_if(move |k, _| *k == h) {
            tracing::warn!(error = %e, "forgetting a revoked credential failed");
        }
        if let Some(stale) = &self.stale {
            if let Err(e) = stale.invalidate_entries_if(move |k, _| *k == h) {
                tracing::warn!(error = %e, "forgetting a revoked credential failed");
            }
        }
    }

    /// Asks the back-end. The wait for a slot ends with the handshake that waits; a call that
    /// has reached the back-end runs to its end in a task of its own, and if its handshake has
    /// gone by then (a client that gave up in a storm) the answer is cached for the retry: the
    /// back-end has done the work, and the retry would otherwise cost a second call.
    async fn ask(&self, h: KeyHash, credential: &Credential) -> Result<Outcome, BackendError> {
        let slot = self.backend.slot().await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let backend = self.backend.clone();
        let credential = credential.clone();
        let keep = (self.cache.clone(), self.stale.clone());
        tokio::spawn(async move {
            let answer = match backend.authenticate_in(slot, &credential).await {
                Ok(id) => Ok(Outcome::Valid(id)),
                Err(BackendError::Rejected) | Err(BackendError::NotFound) => Ok(Outcome::Rejected),
                Err(e) => Err(e),
            };
            // Cached here, before the answer is handed over, not only when the handshake is
            // already gone: a client that gives up can also have its handshake dropped between
            // this send and the handshake reading the answer, and its retry must not cost a
            // second call. The handshake's own insert of the same answer is harmless.
            if let Ok(outcome) = &answer {
                let (cache, stale) = keep;
                remember_stale(stale.as_ref(), h, outcome).await;
                cache.insert(h, outcome.clone()).await;
            }
            let _ = tx.send(answer);
        });
        // The task ends only by sending; a panic in it is a failed call.
        rx.await
            .unwrap_or(Err(BackendError::InvalidResponse("no answer")))
    }

    /// Who this credential belongs to. One back-end call per credential per TTL at most, however
    /// many connections ask at once.
    pub async fn authenticate(&self, credential: &Credential) -> Result<Identity, AuthError> {
        let h = hash(credential);
        let entry = self
            .cache
            .entry(h)
            .or_try_insert_with(self.ask(h, credential))
            .await;
        match entry {
            Ok(entry) => {
                let fresh = entry.is_fresh();
                match entry.into_value() {
                    // A fresh answer was kept for serve-stale by the call's task (`ask`).
                    Outcome::Valid(id) => {
                        if fresh {
                            self.metrics.auth_miss.inc();
                        } else {
                            self.metrics.auth_hit.inc();
                        }
                        Ok(id)
                    }
                    Outcome::Rejected => {
                        if fresh {
                            self.metrics.auth_miss.inc();
                        } else {
                            self.metrics.auth_negative_hit.inc();
                        }
                        Err(AuthError::Rejected)
                    }
                }
            }
            Err(_backend_down) => {
                self.metrics.auth_miss.inc();
                if let Some(stale) = &self.stale {
                    if let Some(id) = stale.get(&h).await {
                        self.metrics.auth_stale.inc();
                        return Ok(id);
                    }
                }
                Err(AuthError::Unavailable)
            }
        }
    }
}

/// Keeps a fresh answer for `--auth-serve-stale`: an accepted key is served while the back-end
/// is down, a rejected one never again.
async fn remember_stale(stale: Option<&Cache<KeyHash, Identity>>, h: KeyHash, outcome: &Outcome) {
    let Some(stale) = stale else { return };
    match outcome {
        Outcome::Valid(id) => stale.insert(h, id.clone()).await,
        Outcome::Rejected => stale.invalidate(&h).await,
    }
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, hash};
    use crate::backend::Credential;
    use axum::http::{header, HeaderMap, HeaderValue};

    fn with_auth(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn bearer_tokens_are_read_as_before() {
        let cases: [(&'static str, Option<&str>, Option<&str>); 8] = [
            ("Bearer tok", Some("tok"), Some("tok")),
            ("bearer tok", Some("tok"), None),
            ("BEARER tok", None, None),
            ("Bearer   tok", Some("tok"), Some("tok")),
            ("Bearer ", Some(""), Some("")),
            ("Basic dXNlcjpwdw==", None, None),
            ("Bearertok", None, None),
            ("tok", None, None),
        ];
        for (value, for_client, for_api) in cases {
            let h = with_auth(value);
            assert_eq!(bearer_token::<true>(&h).as_deref(), for_client, "{value:?}");
            assert_eq!(bearer_token::<false>(&h).as_deref(), for_api, "{value:?}");
        }
        assert_eq!(bearer_token::<true>(&HeaderMap::new()), None);
    }

    fn key(k: &str) -> Credential {
        Credential::ApiKey(k.into())
    }

    fn hex(h: &[u8]) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_cache_key_is_the_sha256_of_the_api_key() {
        // A fixed vector: a different digest (or no digest) fails here.
        assert_eq!(
            hex(&hash(&key("abc"))),
            // SHA-256 of "key\0abc": the kind tag keeps keys and cookies apart.
            "2128517b6e80ec3a6bd649a475aa3b94f2963691a4ba37c68340c4eafdb5c03b"
        );
        assert_eq!(
            hash(&key("secret-key")),
            hash(&key("secret-key")),
            "equal keys share an entry"
        );
        assert_ne!(
            hash(&key("secret-key")),
            hash(&key("secret-kez")),
            "different keys never do"
        );
    }

    #[test]
    fn the_cache_key_does_not_reveal_the_api_key() {
        let key = "secret-key";
        let h = hash(&Credential::ApiKey(key.into()));
        let shown = format!("{h:?} {}", hex(&h));
        assert!(!shown.contains(key), "{shown}");
        assert!(
            !h.windows(key.len()).any(|w| w == key.as_bytes()),
            "the digest holds the key's bytes"
        );
    }

    #[test]
    fn a_key_and_a_cookie_with_the_same_text_never_share_an_entry() {
        let cookie = Credential::SessionCookies("secret-key".into());
        assert_ne!(hash(&key("secret-key")), hash(&cookie));
    }
}
