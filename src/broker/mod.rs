//! The broker seam: moves opaque bytes on named channels between nodes, and answers presence.
//! It knows nothing of WebSockets, users' topics or the envelope's contents.
//!
//! Ordering contract: [`Broker::subscribe`], [`Broker::unsubscribe`] and [`Broker::set_online`]
//! take effect in the order they are *called* (the request is queued before the method returns;
//! the returned future only waits for the acknowledgement). The hub relies on this: it calls them
//! while holding its registry lock, so an unsubscribe decided under the lock can never overtake
//! a later subscribe of the same channel.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

pub mod memory;
pub mod redis;

/// Where a broker hands the messages that arrive on subscribed channels.
pub trait MessageSink: Send + Sync + 'static {
    /// Called once per message per node, in arrival order for one channel. A broker that sees
    /// one payload published on several channels at once (the in-process broker) passes them
    /// all in one call, so the payload is decoded once; Redis hands one channel at a time.
    fn deliver(&self, channels: &[&str], payload: Bytes);
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker is shutting down")]
    Closed,
}

/// Whether a user has a connection on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Online,
    Offline,
}

pub type BrokerFuture<T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'static>>;

pub trait Broker: Send + Sync + 'static {
    /// Subscribes channels (one batch); resolves once the broker acknowledged all of them.
    fn subscribe(&self, channels: Vec<String>) -> BrokerFuture<()>;
    /// Unsubscribes channels (one batch), fire and forget.
    fn unsubscribe(&self, channels: Vec<String>);
    /// Publishes one payload on many channels in one round trip.
    fn publish(&self, channels: Vec<String>, payload: Bytes) -> BrokerFuture<()>;
    /// Marks a user as having (or no longer having) a connection on this node.
    fn set_online(&self, user_id: Arc<str>, presence: Presence) -> BrokerFuture<()>;
    /// Which of these users have a connection on any node.
    fn presence(&self, user_ids: Vec<String>) -> BrokerFuture<Vec<bool>>;
    /// True while the broker can deliver (connected, subscriptions restored, canary arriving).
    fn is_up(&self) -> bool;
    /// Leaves the cluster cleanly (removes this node's presence). Called once at shutdown.
    fn shutdown(&self) -> BrokerFuture<()>;
}

pub(crate) fn ready<T: Send + 'static>(v: Result<T, BrokerError>) -> BrokerFuture<T> {
    Box::pin(std::future::ready(v))
}
