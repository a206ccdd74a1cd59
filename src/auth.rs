//! Credential validation (API keys and browser session cookies) with a moka cache in front of
//! the back-end.
//!
//! - Keyed by the SHA-256 of the credential (its kind and value): the raw key or cookie is never
//!   stored, logged or counted. Keys and cookies share one cache and the same rules below.
//! - Accepted keys live `--auth-ttl`, rejected keys `--auth-negative-ttl` (per-entry expiry).
//! - Concurrent misses for one key are coalesced into one back-end call (moka's
//!   `or_try_insert_with`): a reconnect storm of N tabs costs one call, not N.
//! - Back-end failures are not cached. With `--auth-serve-stale` a key that was accepted within
//!   that window is still accepted while the back-end is unreachable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;
use sha2::{Digest, Sha256};

use crate::backend::{Backend, BackendError, Credential, Identity};
use crate::config::Config;
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
            .expire_after(TtlByOutcome {
                positive: cfg.auth_ttl,
                negative: cfg.auth_negative_ttl,
            })
            .build();
        let stale = (!cfg.auth_serve_stale.is_zero()).then(|| {
            Cache::builder()
                .max_capacity(cfg.auth_cache_capacity)
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

    /// Who this credential belongs to. One back-end call per credential per TTL at most, however
    /// many connections ask at once.
    pub async fn authenticate(&self, credential: &Credential) -> Result<Identity, AuthError> {
        let h = hash(credential);
        let entry = self
            .cache
            .entry(h)
            .or_try_insert_with(async {
                match self.backend.authenticate(credential).await {
                    Ok(id) => Ok(Outcome::Valid(id)),
                    Err(BackendError::Rejected) | Err(BackendError::NotFound) => {
                        Ok(Outcome::Rejected)
                    }
                    Err(e) => Err(e),
                }
            })
            .await;
        match entry {
            Ok(entry) => {
                let fresh = entry.is_fresh();
                match entry.into_value() {
                    Outcome::Valid(id) => {
                        if fresh {
                            self.metrics.auth_miss.inc();
                            if let Some(stale) = &self.stale {
                                stale.insert(h, id.clone()).await;
                            }
                        } else {
                            self.metrics.auth_hit.inc();
                        }
                        Ok(id)
                    }
                    Outcome::Rejected => {
                        if fresh {
                            self.metrics.auth_miss.inc();
                            if let Some(stale) = &self.stale {
                                stale.invalidate(&h).await;
                            }
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

#[cfg(test)]
mod tests {
    use crate::backend::Credential;

    #[test]
    fn hash_is_not_the_key() {
        let key = Credential::ApiKey("secret-key".into());
        let h = super::hash(&key);
        assert_ne!(&h[..10], b"secret-key");
        assert_eq!(h, super::hash(&key));
        let cookie = Credential::SessionCookies("secret-key".into());
        assert_ne!(
            h,
            super::hash(&cookie),
            "a key and a cookie never share an entry"
        );
    }
}
