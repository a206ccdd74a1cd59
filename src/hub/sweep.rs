//! The node's ping sweep and its drain: both reach sessions through their outbound queues, so no
//! session carries a timer of its own.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use super::registry::{now_ms, Connection};
use super::Hub;
use crate::disconnect::CloseReason;

/// Ping slots: each connection is pinged in one of these slices of the interval.
const PING_SLOTS: u32 = 32;

/// The connections of each ping slot, apart from the registry: a sweep visits only the slice it
/// pings, and takes neither the registry lock (which the fan-out needs) nor the other slices.
pub(super) struct PingSlots {
    slots: Box<[Mutex<Slice>]>,
}

/// One slice's connections, by id.
type Slice = HashMap<u64, Arc<Connection>>;

impl PingSlots {
    pub(super) fn new() -> PingSlots {
        PingSlots {
            slots: (0..PING_SLOTS).map(|_| Mutex::default()).collect(),
        }
    }

    fn slot(&self, id: u64) -> &Mutex<Slice> {
        &self.slots[(id % u64::from(PING_SLOTS)) as usize]
    }

    pub(super) fn add(&self, conn: &Arc<Connection>) {
        self.slot(conn.id).lock().insert(conn.id, conn.clone());
    }

    pub(super) fn remove(&self, id: u64) {
        let mut slot = self.slot(id).lock();
        slot.remove(&id);
        if slot.capacity() > 64 && slot.len() < slot.capacity() / 4 {
            // A storm of connections came and went: give the table back.
            slot.shrink_to_fit();
        }
    }
}

/// The node's heartbeat, instead of a timer per connection: every `interval / PING_SLOTS` one
/// slice of the connections (by id) is visited; a peer silent for two intervals is closed (4000),
/// the others get a ping wanted. The ping rides on the connection's next write of messages; half
/// an interval later the sweep visits the slice again and wakes the writers whose ping is still
/// waiting, which then write it alone. Under load most pings therefore cost no system call of
/// their own (one `sendto` per connection and interval otherwise: at 10,000 connections and a
/// 30 s interval, 333 a second). A ping goes out at most 1.5 intervals after the previous one,
/// so a live peer's pong always comes back before the two-interval silence limit.
///
/// Slicing spreads the pings over the interval: pinging 10,000 sockets in one instant costs
/// ~100 ms of CPU that every delivery waits behind.
pub(super) async fn heartbeat(hub: Weak<Hub>, interval: Duration) {
    let mut tick = tokio::time::interval(interval / PING_SLOTS);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut slot = 0u64;
    loop {
        tick.tick().await;
        slot = (slot + 1) % u64::from(PING_SLOTS);
        let Some(hub) = hub.upgrade() else { return };
        let silent_since = now_ms().saturating_sub(2 * interval.as_millis() as u64);
        {
            let conns = hub.registry.ping_slots.slot(slot).lock();
            for conn in conns.values() {
                if conn.last_seen.load(Ordering::Relaxed) < silent_since {
                    conn.outbound.close(CloseReason::PingTimeout);
                } else {
                    conn.outbound.want_ping();
                }
            }
        }
        let half_way = (slot + u64::from(PING_SLOTS / 2)) % u64::from(PING_SLOTS);
        let conns = hub.registry.ping_slots.slot(half_way).lock();
        for conn in conns.values() {
            conn.outbound.ping_if_pending();
        }
    }
}

impl Hub {
    /// Closes every connection with 1012, spread evenly (in random order) over `window`, so
    /// that clients do not all reconnect to the other nodes in the same instant.
    pub async fn drain(&self, window: Duration) {
        use rand::seq::SliceRandom;
        let mut conns: Vec<Arc<Connection>> = {
            let inner = self.registry.inner.lock();
            inner
                .users
                .values()
                .flat_map(|u| u.conns.iter().map(|c| c.conn.clone()))
                .collect()
        };
        conns.shuffle(&mut rand::rng());
        let n = conns.len().max(1) as u32;
        let start = tokio::time::Instant::now();
        for (i, conn) in conns.iter().enumerate() {
            tokio::time::sleep_until(start + window * i as u32 / n).await;
            self.close_for_drain(conn);
        }
        // Anything registered while the snapshot was taken.
        self.close_all(CloseReason::Drain);
    }
}
