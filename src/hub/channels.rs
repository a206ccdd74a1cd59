//! Channel reference counts and lingering channels: which broker channels this node needs, and
//! how long a channel nobody needs any more stays subscribed (`--unsubscribe-delay`), so that a
//! reconnecting client does not make the channel flap.
//!
//! Plain data, no broker: the hub calls these under its registry lock and turns what they return
//! into broker calls under the same lock (the ordering contract in [`crate::broker`]).
//!
//! Lingering channels sit in a [`DelayQueue`]: taking a lingering channel again removes its
//! entry, and releasing it later inserts a new one, so a channel is only ever dropped at its
//! latest deadline.

use std::collections::HashMap;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::time::delay_queue::{DelayQueue, Key};

#[derive(Default)]
struct Entry {
    refs: usize,
    /// The broker acknowledged the subscription.
    confirmed: bool,
    /// In the lingering queue (refs is 0).
    lingering: Option<Key>,
}

/// The node's broker channels with their reference counts.
#[derive(Default)]
pub(super) struct Channels {
    map: HashMap<String, Entry>,
    lingering: DelayQueue<String>,
}

impl Channels {
    /// Takes a reference on each channel (cancelling a pending release) and returns those that
    /// still need a broker subscription.
    pub(super) fn acquire(&mut self, channels: &[String]) -> Vec<String> {
        let mut need = Vec::new();
        for ch in channels {
            let e = self.map.entry(ch.clone()).or_default();
            e.refs += 1;
            if let Some(key) = e.lingering.take() {
                self.lingering.try_remove(&key);
            }
            if !e.confirmed {
                need.push(ch.clone());
            }
        }
        need
    }

    /// Takes a reference that is never released, already confirmed (the node-wide channel).
    pub(super) fn pin(&mut self, channel: &str) {
        let e = self.map.entry(channel.to_owned()).or_default();
        e.refs += 1;
        e.confirmed = true;
    }

    /// Records the broker's acknowledgement for channels that are still wanted.
    pub(super) fn confirm(&mut self, channels: &[String]) {
        for ch in channels {
            if let Some(e) = self.map.get_mut(ch) {
                if e.refs > 0 {
                    e.confirmed = true;
                }
            }
        }
    }

    /// Drops a reference on each channel; a channel nobody holds lingers for `delay`.
    pub(super) fn release(&mut self, channels: &[String], delay: Duration) {
        for ch in channels {
            if let Some(e) = self.map.get_mut(ch) {
                e.refs = e.refs.saturating_sub(1);
                // The delay queue needs the runtime's timer; a registration dropped outside any
                // runtime (the node is gone) leaves the channel to the broker's own end.
                if e.refs == 0
                    && e.lingering.is_none()
                    && tokio::runtime::Handle::try_current().is_ok()
                {
                    e.lingering = Some(self.lingering.insert(ch.clone(), delay));
                }
            }
        }
    }

    /// Forgets the channels whose delay ran out and that nobody took again, and returns them
    /// (to unsubscribe). `Pending` when there are none; `cx` is woken when there may be.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Vec<String>> {
        let mut gone = Vec::new();
        while let Poll::Ready(Some(expired)) = self.lingering.poll_expired(cx) {
            let ch = expired.into_inner();
            let idle = self.map.get_mut(&ch).is_some_and(|e| {
                e.lingering = None;
                e.refs == 0
            });
            if idle {
                self.map.remove(&ch);
                gone.push(ch);
            }
        }
        if gone.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(gone)
        }
    }

    /// Channels held (lingering ones included).
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Channels with their reference counts, sorted.
    pub(super) fn refs(&self) -> Vec<(String, usize)> {
        let mut v: Vec<_> = self.map.iter().map(|(k, e)| (k.clone(), e.refs)).collect();
        v.sort();
        v
    }
}
