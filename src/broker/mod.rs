//! The broker seam: moves opaque bytes on named channels between nodes, and answers presence.
//! It knows nothing of WebSockets, users' topics or the envelope's contents.
//!
//! Ordering contract: [`Broker::subscribe`] and [`Broker::unsubscribe`] take effect in the order
//! they are *called*, and so do the [`Broker::set_online`] calls among themselves (the request is
//! queued before the method returns; the returned [`Ack`] only waits for the acknowledgement).
//! The hub relies on this: it calls them while holding its registry lock, so an unsubscribe
//! decided under the lock can never overtake a later subscribe of the same channel, nor a user's
//! leave a later join. Subscriptions and presence are separate queues with Redis (a presence
//! write that hangs holds no subscribe), so the two kinds may take effect in either order.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::oneshot;

mod channel_list;
mod connect;
mod held;
pub mod history;
pub mod memory;
mod payloads;
mod presence;
mod publish_connection;
mod publisher;
pub mod redis;
mod redis_cluster;
mod replay;
mod resp;
mod sets;
mod subscription;
#[cfg(test)]
pub(crate) mod test_ca;

pub use channel_list::ChannelList;
pub use connect::{RedisCa, Topology};
pub use history::{advance, judge, StreamId, Verdict};
pub use payloads::Recent;
pub use replay::MAX_REPLAY;

use memory::MemoryBroker;
use redis::RedisBroker;

/// Where a broker hands the messages that arrive on subscribed channels, and the node's record
/// of what it delivered: the position of the last message delivered on each subscribed channel.
///
/// The record is kept by the sink, beside each channel's recipients, not by the broker: a
/// received message is judged by its position and delivered with one look-up of its channel
/// (ARCHITECTURE.md, "One record of what was delivered"). A channel's position lives as long as
/// the sink holds the channel (subscribed, or lingering before its unsubscribe); the broker reads
/// it to find gaps and to catch up after a reconnect. The provided methods are those of a sink
/// that keeps no record: it takes every message and has nothing to catch up on.
pub trait MessageSink: Send + Sync + 'static {
    /// Called once per message per node, in arrival order for one channel. A broker that sees
    /// one payload published on several channels at once (the in-process broker) passes them
    /// all in one call, so the payload is decoded once; Redis hands one channel at a time.
    /// `position` is the message's place in its channels' history (`None` without history); a
    /// multi-channel call has one position, the same in every channel named.
    ///
    /// Delivering queues the message but wakes no writer: the broker calls [`flush`](Self::flush)
    /// after each batch of messages it had at hand, so a connection that got several messages
    /// in one batch writes them with one system call.
    fn deliver(&self, channels: &[&str], payload: Bytes, position: Option<StreamId>);

    /// Judges one message on one channel by its position ([`judge`]) and, when the verdict is
    /// [`Verdict::Deliver`], delivers it as [`deliver`](Self::deliver) would: the Redis
    /// reader's hot path. A channel the sink does not hold is delivered (to nobody).
    fn admit(
        &self,
        channel: &str,
        payload: &Bytes,
        prev: Option<StreamId>,
        id: Option<StreamId>,
    ) -> Verdict {
        let _ = prev;
        self.deliver(&[channel], payload.clone(), id);
        Verdict::Deliver
    }

    /// The position of the last message delivered on a channel the sink holds.
    fn position(&self, _channel: &str) -> Option<StreamId> {
        None
    }

    /// Records a position as delivered on a channel the sink holds (only forwards).
    fn record(&self, _channel: &str, _id: StreamId) {}

    /// Whether the sink holds the channel (wants its messages).
    fn holds(&self, _channel: &str) -> bool {
        true
    }

    /// The channels with a known position, to catch up on after a reconnect.
    fn known(&self) -> Vec<(String, StreamId)> {
        Vec::new()
    }

    /// Wakes the writers of everything delivered since the last call.
    fn flush(&self);

    /// Messages on these channels are about to be delivered: a hint, to start loading what
    /// their deliveries will read. Among thousands of connections each delivery's look-ups
    /// miss the CPU cache one after the other; looked up here together, a run of messages
    /// waits for memory once, not once per message.
    fn warm(&self, _channels: &[&str]) {}
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(#[from] Outage),
    #[error("broker is shutting down")]
    Closed,
}

/// Why the broker cannot serve a request right now.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Outage {
    #[error("the Redis URL cannot be used")]
    BadUrl,
    #[error("Redis did not answer in time")]
    Timeout,
    /// The pub/sub connection is down (reconnecting).
    #[error("Redis is unreachable")]
    Unreachable,
    /// The broker's command queue is full.
    #[error("the Redis command queue is full")]
    Overloaded,
    #[error("{0}")]
    Redis(Arc<::redis::RedisError>),
    #[error("{0}")]
    Pool(Arc<deadpool_redis::PoolError>),
    #[error("{0}")]
    PoolSetup(Arc<deadpool_redis::BuildError>),
}

/// Whether a user has a connection on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Online,
    Offline,
}

/// The node's broker: in-process for one node, Redis for a cluster. An enum rather than a trait
/// object: calls are static, and only the acknowledgements need a future type of their own.
pub enum Broker {
    Memory(MemoryBroker),
    Redis(RedisBroker),
}

impl Broker {
    /// Subscribes channels (one batch); the returned [`Ack`] resolves once the broker
    /// acknowledged all of them.
    pub fn subscribe(&self, channels: Vec<String>) -> Ack {
        match self {
            Broker::Memory(b) => b.subscribe(channels),
            Broker::Redis(b) => b.subscribe(channels),
        }
    }

    /// Unsubscribes channels (one batch), fire and forget.
    pub fn unsubscribe(&self, channels: Vec<String>) {
        match self {
            Broker::Memory(b) => b.unsubscribe(channels),
            Broker::Redis(b) => b.unsubscribe(channels),
        }
    }

    /// Publishes one payload on many channels in one round trip. The channels are distinct.
    pub async fn publish(&self, channels: ChannelList, payload: Bytes) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(b) => b.publish(channels, payload),
            Broker::Redis(b) => b.publish(channels, payload).await,
        }
    }

    /// Marks a user as having (or no longer having) a connection on this node.
    pub fn set_online(&self, user_id: Arc<str>, presence: Presence) -> Ack {
        match self {
            Broker::Memory(b) => b.set_online(user_id, presence),
            Broker::Redis(b) => b.set_online(user_id, presence),
        }
    }

    /// Which of these users have a connection on any node.
    pub async fn presence(&self, user_ids: Vec<String>) -> Result<Vec<bool>, BrokerError> {
        match self {
            Broker::Memory(b) => b.presence(user_ids),
            Broker::Redis(b) => b.presence(user_ids).await,
        }
    }

    /// True while the broker can deliver (connected, subscriptions restored, canary arriving).
    pub fn is_up(&self) -> bool {
        match self {
            Broker::Memory(_) => true,
            Broker::Redis(b) => b.is_up(),
        }
    }

    /// Leaves the cluster cleanly (removes this node's presence). Called once at shutdown.
    pub async fn shutdown(&self) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(_) => Ok(()),
            Broker::Redis(b) => b.shutdown().await,
        }
    }
}

/// The acknowledgement of a request that is already queued (see the ordering contract).
#[must_use = "dropping an Ack does not cancel the request, but its outcome is lost"]
pub struct Ack(AckState);

enum AckState {
    Done(Option<Result<(), BrokerError>>),
    Waiting(oneshot::Receiver<Result<(), BrokerError>>),
}

impl Ack {
    pub(crate) fn done(result: Result<(), BrokerError>) -> Ack {
        Ack(AckState::Done(Some(result)))
    }

    pub(crate) fn waiting(rx: oneshot::Receiver<Result<(), BrokerError>>) -> Ack {
        Ack(AckState::Waiting(rx))
    }
}

impl Future for Ack {
    type Output = Result<(), BrokerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            AckState::Done(result) => {
                Poll::Ready(result.take().unwrap_or(Err(BrokerError::Closed)))
            }
            AckState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(BrokerError::Closed))),
        }
    }
}
