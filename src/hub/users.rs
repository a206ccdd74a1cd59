//! The user table: user id → [`UserEntry`], looked up once per message the broker delivers.
//!
//! Why not `std::collections::HashMap`: the broker reader hands the fan-out runs of messages
//! and the fan-out looks their users up ahead of delivering any (`fanout.rs`, `warm`), so that
//! the CPU waits for memory once per run rather than once per message. Between two runs the
//! kernel's work for the sockets' `send`s has evicted the table, so each look-up misses twice:
//! on the bucket's control bytes, then on the bucket itself, whose address is known only once
//! the control bytes are read. A plain map's `get` takes the two misses in a row, and a run's
//! look-ups overlap little, each waiting on its own branch. [`Users::prefetch`] starts the
//! fetch of a user's bucket from its control bytes alone (hashbrown's `HashTable::find` hands
//! over a candidate without reading it), so a run's buckets are all on their way before the
//! first key is compared. At 25,000 deliveries/s over 10,000 users the key compares of the
//! look-ahead were an eighth of the node's user-space CPU.

use std::hash::BuildHasher;

use compact_str::CompactString;
use hashbrown::HashTable;

use super::outbound::prefetch_lines;
use super::registry::{FastHash, UserEntry};

/// An entry with its key, as the table stores it.
type Slot = (CompactString, UserEntry);

/// Users by id. Ids of up to 24 bytes are stored in the table itself (`CompactString`), so that
/// comparing a key reads no other memory; the hasher is seeded per process (ids come from the
/// back-end, not from clients).
#[derive(Default)]
pub(super) struct Users {
    table: HashTable<Slot>,
    hasher: FastHash,
}

impl Users {
    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    pub(super) fn get(&self, id: &str) -> Option<&UserEntry> {
        self.get_hashed(id, self.hash(id))
    }

    /// [`get`](Self::get) with the hash [`prefetch`](Self::prefetch) returned for `id`.
    pub(super) fn get_hashed(&self, id: &str, hash: u64) -> Option<&UserEntry> {
        self.table.find(hash, |(k, _)| k == id).map(|(_, e)| e)
    }

    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut UserEntry> {
        let hash = self.hash(id);
        self.table.find_mut(hash, |(k, _)| k == id).map(|(_, e)| e)
    }

    /// The user's entry, made by `new` if there is none.
    pub(super) fn get_or_insert_with(
        &mut self,
        id: &str,
        new: impl FnOnce() -> UserEntry,
    ) -> &mut UserEntry {
        let hash = self.hash(id);
        let hasher = &self.hasher;
        let entry = self
            .table
            .entry(hash, |(k, _)| k == id, |(k, _)| hasher.hash_one(k.as_str()));
        &mut entry
            .or_insert_with(|| (CompactString::from(id), new()))
            .into_mut()
            .1
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<UserEntry> {
        let hash = self.hash(id);
        let found = self.table.find_entry(hash, |(k, _)| k == id).ok()?;
        Some(found.remove().0 .1)
    }

    /// Every entry with its id.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &UserEntry)> + '_ {
        self.table.iter().map(|(k, e)| (k.as_str(), e))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &UserEntry> + '_ {
        self.table.iter().map(|(_, e)| e)
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Starts fetching the bucket of every entry whose hash matches `id`'s in its control
    /// bytes (almost always one: the user's), without reading the bucket: what a `get` of `id`
    /// soon after then finds in cache. Returns `id`'s hash, for [`get_hashed`](Self::get_hashed).
    pub(super) fn prefetch(&self, id: &str) -> u64 {
        let hash = self.hash(id);
        let _ = self.table.find(hash, |slot| {
            prefetch_lines(std::ptr::from_ref(slot).cast(), std::mem::size_of::<Slot>());
            false
        });
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> UserEntry {
        UserEntry {
            conns: smallvec::SmallVec::new(),
            tenant: None,
            position: None,
        }
    }

    #[test]
    fn entries_are_found_by_id_and_removed_once() {
        let mut users = Users::default();
        assert!(users.is_empty());
        // Short ids are stored inline, long ones on the heap: both are found.
        let long = "a-user-id-longer-than-twenty-four-bytes";
        for id in ["ann", long] {
            users.get_or_insert_with(id, entry).tenant = Some(id.into());
        }
        // An existing entry is returned, not replaced.
        assert_eq!(
            users.get_or_insert_with("ann", entry).tenant.as_deref(),
            Some("ann")
        );
        assert_eq!(
            users.get(long).and_then(|e| e.tenant.as_deref()),
            Some(long)
        );
        let hash = users.prefetch("ann");
        assert!(users.get_hashed("ann", hash).is_some());
        let hash = users.prefetch("nobody");
        assert!(users.get_hashed("nobody", hash).is_none());
        assert!(users.get("nobody").is_none());
        if let Some(e) = users.get_mut("ann") {
            e.tenant = None;
        }
        assert!(users.get("ann").is_some_and(|e| e.tenant.is_none()));
        assert_eq!(users.values().count(), 2);
        assert!(users.remove("ann").is_some());
        assert!(users.remove("ann").is_none());
        assert!(users.get("ann").is_none());
        assert_eq!(users.values().count(), 1);
    }

    #[test]
    fn many_entries_survive_the_table_growing() {
        let mut users = Users::default();
        for i in 0..5000 {
            users.get_or_insert_with(&format!("u{i}"), entry).tenant = Some(i.to_string().into());
        }
        for i in (0..5000).step_by(7) {
            let e = users.get(&format!("u{i}")).map(|e| e.tenant.clone());
            assert_eq!(e, Some(Some(i.to_string().into())));
        }
    }
}
