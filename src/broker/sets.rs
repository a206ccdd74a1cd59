//! Small named sets of strings with a time to live, shared by every node: the broker stores them
//! for the hub's remembered topics (`hub/remembered.rs`) without knowing what they mean.
//!
//! - Redis: a SET per name; a replace is `DEL` + `SADD` + `PEXPIRE` in one `MULTI`, a merge is
//!   `SADD` + `PEXPIRE` in one `MULTI`, so a reader never sees a set without its expiry.
//! - In-process: a map of sets with their deadlines, pruned as it grows.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::memory::MemoryBroker;
use super::redis::RedisBroker;
use super::{Broker, BrokerError};

impl Broker {
    /// Makes the set `name` exactly `members` (empty: removes it), expiring after `ttl`.
    pub async fn set_replace(
        &self,
        name: &str,
        members: &[&str],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(b) => {
                b.sets.lock().write(name, members, ttl, true);
                Ok(())
            }
            Broker::Redis(b) => b.set_write(name, members, ttl, true).await,
        }
    }

    /// Adds `members` to the set `name` and restarts its expiry; nothing when `members` is empty.
    pub async fn set_merge(
        &self,
        name: &str,
        members: &[&str],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        if members.is_empty() {
            return Ok(());
        }
        match self {
            Broker::Memory(b) => {
                b.sets.lock().write(name, members, ttl, false);
                Ok(())
            }
            Broker::Redis(b) => b.set_write(name, members, ttl, false).await,
        }
    }

    /// Removes `members` from the set `name` (its expiry stays).
    pub async fn set_remove(&self, name: &str, members: &[&str]) -> Result<(), BrokerError> {
        if members.is_empty() {
            return Ok(());
        }
        match self {
            Broker::Memory(b) => {
                b.sets.lock().remove(name, members);
                Ok(())
            }
            Broker::Redis(b) => {
                let mut pipe = redis::pipe();
                pipe.srem(name, members).ignore();
                b.query::<()>(&pipe).await
            }
        }
    }

    /// The members of the set `name` (empty when it does not exist or expired).
    pub async fn set_members(&self, name: &str) -> Result<Vec<String>, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.sets.lock().members(name)),
            Broker::Redis(b) => b.set_members(name).await,
        }
    }
}

/// The in-process broker's sets.
#[derive(Default)]
pub(super) struct Sets {
    sets: HashMap<String, (HashSet<String>, Instant)>,
    /// Size after the last prune: the map is pruned when it has doubled since.
    pruned_at: usize,
}

impl Sets {
    fn write(&mut self, name: &str, members: &[&str], ttl: Duration, replace: bool) {
        let now = Instant::now();
        if self.sets.len() >= 2 * self.pruned_at.max(64) {
            self.sets.retain(|_, (_, deadline)| *deadline > now);
            self.pruned_at = self.sets.len();
        }
        if replace && members.is_empty() {
            self.sets.remove(name);
            return;
        }
        let entry = self
            .sets
            .entry(name.to_string())
            .or_insert_with(|| (HashSet::new(), now));
        if replace || entry.1 <= now {
            entry.0.clear();
        }
        entry.0.extend(members.iter().map(|m| m.to_string()));
        entry.1 = now + ttl;
    }

    fn remove(&mut self, name: &str, members: &[&str]) {
        if let Some((set, _)) = self.sets.get_mut(name) {
            for m in members {
                set.remove(*m);
            }
            if set.is_empty() {
                self.sets.remove(name);
            }
        }
    }

    fn members(&self, name: &str) -> Vec<String> {
        match self.sets.get(name) {
            Some((members, deadline)) if *deadline > Instant::now() => {
                members.iter().cloned().collect()
            }
            _ => Vec::new(),
        }
    }
}

impl MemoryBroker {
    /// Names of the live sets (tests).
    pub fn set_names(&self) -> Vec<String> {
        let now = Instant::now();
        let sets = self.sets.lock();
        sets.sets
            .iter()
            .filter(|(_, (_, deadline))| *deadline > now)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

impl RedisBroker {
    async fn set_write(
        &self,
        name: &str,
        members: &[&str],
        ttl: Duration,
        replace: bool,
    ) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        if replace {
            pipe.del(name).ignore();
        }
        if !members.is_empty() {
            pipe.sadd(name, members)
                .ignore()
                .pexpire(name, ttl.as_millis().max(1) as i64)
                .ignore();
        }
        self.query::<()>(&pipe).await
    }

    async fn set_members(&self, name: &str) -> Result<Vec<String>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.smembers(name);
        let (members,): (Vec<String>,) = self.query(&pipe).await?;
        Ok(members)
    }
}
