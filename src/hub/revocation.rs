//! Cluster-wide revocation: one control envelope on the everyone channel, which every node
//! subscribes for its lifetime. Each node (the publisher included) first lets the node forget
//! the cached identities (the hook set with [`Hub::on_revoke`](super::Hub::on_revoke)), then
//! closes the matching local connections with 1008. A key travels only as the SHA-256 the auth
//! cache is keyed by, never in clear.

use std::sync::Arc;

use super::registry::Registry;
use crate::disconnect::CloseReason;
use crate::protocol::{self, Kind};

/// What is revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// Every credential that resolved to this user.
    User(Arc<str>),
    /// One credential, by the SHA-256 the auth cache keys it by.
    Credential([u8; 32]),
}

/// Called on every node when a revocation arrives, before the sockets are closed.
pub type RevokeHook = Box<dyn Fn(&Revocation) + Send + Sync>;

fn hex(h: &[u8; 32]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl Revocation {
    pub(super) fn encode(&self) -> bytes::Bytes {
        match self {
            Revocation::User(u) => protocol::encode(Kind::Revoke, "user", u.as_bytes()),
            Revocation::Credential(h) => protocol::encode(Kind::Revoke, "key", hex(h).as_bytes()),
        }
    }

    pub(super) fn decode(topic: &str, frame: &str) -> Option<Revocation> {
        match topic {
            "user" if !frame.is_empty() => Some(Revocation::User(Arc::from(frame))),
            "key" => unhex(frame).map(Revocation::Credential),
            _ => None,
        }
    }
}

impl Registry {
    /// Applies a revocation on this node: forget, then close with 1008.
    pub(super) fn revoke(&self, r: &Revocation) {
        self.revocations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(hook) = self.on_revoke.get() {
            hook(r);
        }
        self.metrics.revocations.inc();
        let inner = self.inner.lock();
        let mut closed = 0usize;
        match r {
            Revocation::User(u) => {
                if let Some(user) = inner.users.get(u) {
                    for c in &user.conns {
                        c.conn.outbound.close(CloseReason::Revoked);
                        closed += 1;
                    }
                }
            }
            Revocation::Credential(h) => {
                for user in inner.users.values() {
                    for c in &user.conns {
                        if c.conn.credential.as_ref() == Some(h) {
                            c.conn.outbound.close(CloseReason::Revoked);
                            closed += 1;
                        }
                    }
                }
            }
        }
        tracing::info!(
            kind = match r {
                Revocation::User(_) => "user",
                Revocation::Credential(_) => "key",
            },
            closed,
            "credentials revoked"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_round_trip_through_the_envelope() {
        for r in [
            Revocation::User(Arc::from("john")),
            Revocation::Credential([0xab; 32]),
        ] {
            let env = protocol::decode(r.encode()).expect("decodes");
            assert_eq!(env.kind, Kind::Revoke);
            assert_eq!(Revocation::decode(&env.topic, &env.frame), Some(r));
        }
        assert_eq!(Revocation::decode("key", "zz"), None);
        assert_eq!(Revocation::decode("user", ""), None);
        assert_eq!(Revocation::decode("other", "x"), None);
    }
}
