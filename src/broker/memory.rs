//! The in-process broker: a single node with no Redis. Same interface as the Redis broker, so
//! everything above the seam runs unchanged; publishing delivers synchronously in the publisher's
//! task.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::history::StreamId;
use super::{Ack, BrokerError, ChannelList, MessageSink, Presence};

#[derive(Default)]
struct State {
    channels: HashSet<String>,
    online: HashMap<Arc<str>, ()>,
    /// Per channel: (position, time, payload), oldest first, within `history_ttl`.
    history: HashMap<String, VecDeque<(StreamId, Instant, Bytes)>>,
    /// The last position handed out: positions are stream ids (milliseconds since the epoch and
    /// a sequence), like Redis's, so a position means the same on both brokers.
    last_position: StreamId,
    publishes: u64,
}

pub struct MemoryBroker {
    state: Mutex<State>,
    sink: Arc<dyn MessageSink>,
    /// Named sets with a TTL (`sets.rs`).
    pub(super) sets: Mutex<super::sets::Sets>,
    history_ttl: Duration,
    /// Held from taking a position to delivering it, so that messages reach the sink in
    /// position order (a drained connection's recorded position covers everything before it).
    order: Mutex<()>,
}

impl MemoryBroker {
    /// `history_ttl` is the window each channel's messages are kept (zero: none kept), the same
    /// window the Redis broker keeps in its streams.
    pub fn new(sink: Arc<dyn MessageSink>, history_ttl: Duration) -> MemoryBroker {
        MemoryBroker {
            state: Mutex::new(State::default()),
            sink,
            sets: Mutex::default(),
            history_ttl,
            order: Mutex::new(()),
        }
    }

    /// Messages recorded on `channel` after position `after`, oldest first, within the window.
    pub fn history(&self, channel: &str, after: StreamId) -> Vec<(StreamId, Bytes)> {
        let mut state = self.state.lock();
        let now = Instant::now();
        let ttl = self.history_ttl;
        let Some(h) = state.history.get_mut(channel) else {
            return Vec::new();
        };
        trim(h, now, ttl);
        h.iter()
            .filter(|(p, _, _)| *p > after)
            .map(|(p, _, b)| (*p, b.clone()))
            .collect()
    }

    /// Messages held in history over all channels (tests: nothing grows without bound).
    pub fn history_len(&self) -> usize {
        let mut state = self.state.lock();
        let now = Instant::now();
        let ttl = self.history_ttl;
        state.history.retain(|_, h| {
            trim(h, now, ttl);
            !h.is_empty()
        });
        state.history.values().map(VecDeque::len).sum()
    }

    /// Channels currently subscribed (for tests and metrics).
    pub fn channels(&self) -> Vec<String> {
        self.state.lock().channels.iter().cloned().collect()
    }
}

impl MemoryBroker {
    pub fn subscribe(&self, channels: Vec<String>) -> Ack {
        self.state.lock().channels.extend(channels);
        Ack::done(Ok(()))
    }

    pub fn unsubscribe(&self, channels: Vec<String>) {
        let mut state = self.state.lock();
        for c in &channels {
            state.channels.remove(c);
        }
    }

    pub fn publish(&self, channels: ChannelList, payload: Bytes) -> Result<(), BrokerError> {
        let _order = self.order.lock();
        let (targets, position) = {
            let mut state = self.state.lock();
            let mut position = None;
            if !self.history_ttl.is_zero() {
                let now = Instant::now();
                let ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let last = state.last_position;
                let next = if ms > last.0 {
                    StreamId(ms, 0)
                } else {
                    StreamId(last.0, last.1 + 1)
                };
                state.last_position = next;
                state.publishes += 1;
                position = Some(next);
                for c in channels.iter() {
                    let h = state.history.entry(c.to_owned()).or_default();
                    trim(h, now, self.history_ttl);
                    h.push_back((next, now, payload.clone()));
                }
                // Channels nobody published to within the window go (bounded memory).
                if state.publishes % 1024 == 0 {
                    let ttl = self.history_ttl;
                    state.history.retain(|_, h| {
                        trim(h, now, ttl);
                        !h.is_empty()
                    });
                }
            }
            let targets: Vec<&str> = channels
                .iter()
                .filter(|c| state.channels.contains(*c))
                .collect();
            (targets, position)
        };
        // Delivered outside the broker's lock (the sink takes its own), in one call: one decode
        // and one registry lock for a publish to many users.
        if !targets.is_empty() {
            self.sink.deliver(&targets, payload, position);
            self.sink.flush();
        }
        Ok(())
    }

    pub fn set_online(&self, user_id: Arc<str>, presence: Presence) -> Ack {
        let mut state = self.state.lock();
        match presence {
            Presence::Online => state.online.insert(user_id, ()),
            Presence::Offline => state.online.remove(&user_id),
        };
        Ack::done(Ok(()))
    }

    pub fn presence(&self, user_ids: Vec<String>) -> Result<Vec<bool>, BrokerError> {
        let state = self.state.lock();
        let v = user_ids
            .iter()
            .map(|u| state.online.contains_key(u.as_str()))
            .collect();
        Ok(v)
    }
}

fn trim(h: &mut VecDeque<(StreamId, Instant, Bytes)>, now: Instant, ttl: Duration) {
    while h
        .front()
        .is_some_and(|(_, at, _)| now.duration_since(*at) > ttl)
    {
        h.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl MessageSink for Nothing {
        fn deliver(&self, _: &[&str], _: Bytes, _: Option<StreamId>) {}
        fn flush(&self) {}
    }

    #[test]
    fn history_keeps_the_window_per_channel_and_forgets_the_rest() {
        let b = MemoryBroker::new(Arc::new(Nothing), Duration::from_millis(50));
        b.publish(["a", "b"].into_iter().collect(), Bytes::from_static(b"1"))
            .expect("publish");
        b.publish(["a"].into_iter().collect(), Bytes::from_static(b"2"))
            .expect("publish");
        let a = b.history("a", StreamId(0, 0));
        assert_eq!(a.len(), 2);
        assert_eq!(b.history("a", a[0].0).len(), 1, "after a position");
        assert_eq!(b.history("b", StreamId(0, 0)).len(), 1);
        std::thread::sleep(Duration::from_millis(80));
        assert!(
            b.history("a", StreamId(0, 0)).is_empty(),
            "older than the window"
        );
        assert_eq!(b.history_len(), 0, "nothing grows without bound");
        let off = MemoryBroker::new(Arc::new(Nothing), Duration::ZERO);
        off.publish(["a"].into_iter().collect(), Bytes::from_static(b"1"))
            .expect("publish");
        assert_eq!(off.history_len(), 0, "history off keeps nothing");
    }
}
