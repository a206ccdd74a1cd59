//! The in-process broker: a single node with no Redis. Same interface as the Redis broker, so
//! everything above the seam runs unchanged; publishing delivers synchronously in the publisher's
//! task.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::{Ack, BrokerError, MessageSink, Presence};

#[derive(Default)]
struct State {
    channels: HashSet<String>,
    online: HashMap<Arc<str>, ()>,
}

pub struct MemoryBroker {
    state: Mutex<State>,
    sink: Arc<dyn MessageSink>,
    /// Named sets with a TTL (`sets.rs`).
    pub(super) sets: Mutex<super::sets::Sets>,
}

impl MemoryBroker {
    pub fn new(sink: Arc<dyn MessageSink>) -> MemoryBroker {
        MemoryBroker {
            state: Mutex::new(State::default()),
            sink,
            sets: Mutex::default(),
        }
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

    pub fn publish(&self, channels: Vec<String>, payload: Bytes) -> Result<(), BrokerError> {
        let targets: Vec<&str> = {
            let state = self.state.lock();
            channels
                .iter()
                .filter(|c| state.channels.contains(*c))
                .map(String::as_str)
                .collect()
        };
        // Delivered outside the broker's lock (the sink takes its own), in one call: one decode
        // and one registry lock for a publish to many users.
        if !targets.is_empty() {
            self.sink.deliver(&targets, payload);
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
