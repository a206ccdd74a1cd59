//! Fan-out: a broker message is decoded once and the same shared bytes are pushed into the queue
//! of every local recipient, under one registry lock.

use bytes::Bytes;

use super::channel::Channel;
use super::outbound::{Outgoing, Push};
use super::registry::{Registry, UserEntry};
use crate::broker::MessageSink;
use crate::protocol::{self, Endpoint, Kind};

impl MessageSink for Registry {
    fn deliver(&self, channels: &[&str], payload: Bytes) {
        self.metrics.broker_received.inc();
        let env = match protocol::decode(payload) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(channel = channels.first().copied().unwrap_or(""), error = %e, "undecodable broker message dropped");
                return;
            }
        };
        let (endpoint, topic) = match env.kind {
            Kind::Notification => (Endpoint::Notws, env.topic.as_str()),
            Kind::Chat => (Endpoint::Chat, ""),
            Kind::Canary => return,
            Kind::Revoke => {
                if let Some(r) = super::Revocation::decode(&env.topic, &env.frame) {
                    self.revoke(&r);
                }
                return;
            }
        };
        let msg = Outgoing {
            frame: env.frame.clone(),
            published_at: env.published_at,
        };
        let mut delivered = 0u64;
        let mut overflowed = 0u64;
        let mut dropped = 0u64;
        {
            let inner = self.inner.lock();
            let mut to_user = |user: &UserEntry| {
                for c in &user.conns {
                    if c.conn.endpoint != endpoint
                        || (endpoint == Endpoint::Notws && !c.topics.matches(topic))
                    {
                        continue;
                    }
                    match c.conn.outbound.push(&msg) {
                        Push::Queued => delivered += 1,
                        Push::Overflow => {
                            overflowed += 1;
                            dropped += 1;
                        }
                        Push::Closed => dropped += 1,
                    }
                }
            };
            for channel in channels {
                match self.names.parse(channel) {
                    Some(Channel::User(u)) => {
                        if let Some(user) = inner.users.get(u) {
                            to_user(user);
                        }
                    }
                    Some(Channel::Tenant(t)) => {
                        if let Some(users) = inner.tenants.get(t) {
                            for u in users {
                                if let Some(user) = inner.users.get(u) {
                                    to_user(user);
                                }
                            }
                        }
                    }
                    Some(Channel::Everyone) => {
                        for user in inner.users.values() {
                            to_user(user);
                        }
                    }
                    None => {}
                }
            }
        }
        let m = &self.metrics;
        m.fanout_recipients.observe(delivered as f64);
        if delivered > 0 {
            m.endpoint(endpoint).deliveries.inc_by(delivered);
        }
        if dropped > 0 {
            m.outbound_dropped.inc_by(dropped);
        }
        if overflowed > 0 {
            m.slow_consumer_disconnects.inc_by(overflowed);
        }
    }
}
