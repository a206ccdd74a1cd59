//! The user table: user id → [`UserEntry`], looked up once per message the broker delivers.
//!
//! Why a table of its own: the broker reader hands the fan-out runs of messages, and the
//! fan-out looks their users up ahead of delivering any (`fanout.rs`, `warm`), so that the CPU
//! waits for memory once per run rather than once per message. Between two runs the kernel's
//! work for the sockets' `send`s has evicted the table, so each look-up misses twice: on its
//! place in the index, then on the slot it names. In a library map the first of them is a load
//! the CPU waits on before it can start the second (hashbrown reads the control bytes to find
//! the bucket), one run member after another: at 25,000 deliveries/s over 10,000 users, that
//! wait was three quarters of the look-ahead's time. Here a bucket's address follows from the
//! hash alone, so the look-ahead goes in three passes over the run, each issuing the fetches
//! the next pass reads: every bucket ([`Users::prefetch_bucket`]), then every slot
//! ([`Users::prefetch`]), then every connection.

use std::hash::BuildHasher;

use compact_str::CompactString;

use super::outbound::prefetch_lines;
use super::registry::{FastHash, UserEntry};

/// An entry with its key, as the table stores it.
type Slot = (CompactString, UserEntry);

/// One bucket of the index: the slot's position plus one (0: empty) and the high half of its
/// key's hash, so that a probe compares a key only when the tags match.
#[derive(Clone, Copy, Default)]
struct Bucket {
    slot: u32,
    tag: u32,
}

impl Bucket {
    /// The position of the slot it names (only for a bucket that names one).
    fn at(self) -> usize {
        self.slot as usize - 1
    }
}

/// Buckets per entry at least: the index is at most half full, so a probe almost always ends
/// at its first bucket.
const SPREAD: usize = 2;

/// Users by id: an open-addressing index (linear probing) into a dense vector of slots. Ids
/// of up to 24 bytes are stored in the slot itself (`CompactString`), so that comparing a key
/// reads no other memory; the hasher is seeded per process (ids come from the back-end, not
/// from clients).
///
/// Why not a library map: a bucket's address here follows from the hash alone, so the fan-out
/// can start fetching a whole run's buckets before reading any ([`Users::prefetch_bucket`]),
/// then the slots they name ([`Users::prefetch`]). With hashbrown the first fetch (the control
/// bytes) was a load the CPU waited on, one run member after another.
#[derive(Default)]
pub(super) struct Users {
    index: Box<[Bucket]>,
    slots: Vec<Slot>,
    hasher: FastHash,
}

/// What [`Users::prefetch_bucket`] computed for an id, for the next steps of the look-ahead.
#[derive(Clone, Copy)]
pub(super) struct Hashed(u64);

impl Users {
    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    fn mask(&self) -> usize {
        self.index.len().wrapping_sub(1)
    }

    fn tag(hash: u64) -> u32 {
        (hash >> 32) as u32
    }

    /// The buckets a probe for `hash` visits, in order: from its home bucket on, every bucket
    /// at most once.
    fn probe(&self, hash: u64) -> impl Iterator<Item = usize> {
        let (mask, home) = (self.mask(), hash as usize);
        (0..self.index.len()).map(move |k| home.wrapping_add(k) & mask)
    }

    /// The occupied buckets of `hash`'s probe run (up to the first empty one), with their
    /// places: every entry a look-up of that hash may find is among them.
    fn run(&self, hash: u64) -> impl Iterator<Item = (usize, Bucket)> + '_ {
        self.probe(hash)
            .map(|i| (i, self.index[i]))
            .take_while(|(_, b)| b.slot != 0)
    }

    /// The bucket holding `id`, or None.
    fn find(&self, id: &str, hash: u64) -> Option<usize> {
        let tag = Self::tag(hash);
        self.run(hash)
            .find(|(_, b)| b.tag == tag && self.slots[b.at()].0 == id)
            .map(|(i, _)| i)
    }

    pub(super) fn get(&self, id: &str) -> Option<&UserEntry> {
        self.get_hashed(id, Hashed(self.hash(id)))
    }

    /// [`get`](Self::get) with what [`prefetch_bucket`](Self::prefetch_bucket) returned for
    /// `id`.
    pub(super) fn get_hashed(&self, id: &str, hash: Hashed) -> Option<&UserEntry> {
        let i = self.find(id, hash.0)?;
        Some(&self.slots[self.index[i].at()].1)
    }

    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut UserEntry> {
        let i = self.find(id, self.hash(id))?;
        let slot = self.index[i].at();
        Some(&mut self.slots[slot].1)
    }

    /// The user's entry, made by `new` if there is none.
    pub(super) fn get_or_insert_with(
        &mut self,
        id: &str,
        new: impl FnOnce() -> UserEntry,
    ) -> &mut UserEntry {
        let hash = self.hash(id);
        let slot = match self.find(id, hash) {
            Some(i) => self.index[i].at(),
            None => {
                if (self.slots.len() + 1) * SPREAD > self.index.len() {
                    self.grow();
                }
                self.slots.push((CompactString::from(id), new()));
                let slot = self.slots.len();
                self.place(hash, slot);
                slot - 1
            }
        };
        &mut self.slots[slot].1
    }

    /// Puts slot number `slot` (position plus one) into the first free bucket from `hash`'s.
    /// The index is at most half full (`grow` first), so there always is one.
    fn place(&mut self, hash: u64, slot: usize) {
        let free = self.probe(hash).find(|&i| self.index[i].slot == 0);
        if let Some(i) = free {
            self.index[i] = Bucket {
                // The index holds at most `u32::MAX / SPREAD` entries: a node runs out of
                // descriptors long before.
                slot: slot as u32,
                tag: Self::tag(hash),
            };
        }
    }

    /// Twice the buckets, every slot placed again.
    fn grow(&mut self) {
        let buckets = (self.index.len() * 2).max(16);
        self.index = vec![Bucket::default(); buckets].into_boxed_slice();
        for n in 0..self.slots.len() {
            let hash = self.hash(self.slots[n].0.as_str());
            self.place(hash, n + 1);
        }
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<UserEntry> {
        let i = self.find(id, self.hash(id))?;
        let slot = self.index[i].at();
        self.unlink(i);
        let last = self.slots.len() - 1;
        if slot != last {
            // The last slot moves into the freed place: its bucket follows it.
            let moved = self.hash(self.slots[last].0.as_str());
            let bucket = self.run(moved).find(|(_, b)| b.at() == last);
            if let Some((j, _)) = bucket {
                self.index[j].slot = slot as u32 + 1;
            }
        }
        Some(self.slots.swap_remove(slot).1)
    }

    /// Empties bucket `i` and shifts the buckets of its probe run back, so that no probe ever
    /// stops early at a gap (no tombstones).
    fn unlink(&mut self, mut i: usize) {
        let mask = self.mask();
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let b = self.index[j];
            if b.slot == 0 {
                break;
            }
            let home = self.hash(self.slots[b.at()].0.as_str()) as usize & mask;
            // `b` may move back to `i` unless its home lies cyclically in (i, j].
            let stays = if i <= j {
                i < home && home <= j
            } else {
                i < home || home <= j
            };
            if !stays {
                self.index[i] = b;
                i = j;
            }
        }
        self.index[i] = Bucket::default();
    }

    /// Every entry with its id.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &UserEntry)> + '_ {
        self.slots.iter().map(|(k, e)| (k.as_str(), e))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &UserEntry> + '_ {
        self.slots.iter().map(|(_, e)| e)
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The look-ahead's first step: starts fetching the bucket of `id` from its hash alone,
    /// without reading anything of the table but its address.
    pub(super) fn prefetch_bucket(&self, id: &str) -> Hashed {
        let hash = self.hash(id);
        if !self.index.is_empty() {
            let i = hash as usize & self.mask();
            prefetch_lines(
                std::ptr::from_ref(&self.index[i]).cast(),
                std::mem::size_of::<Bucket>(),
            );
        }
        Hashed(hash)
    }

    /// The look-ahead's second step, once the bucket is on its way: starts fetching the slot
    /// it names (the whole slot, about two lines), without reading the slot.
    pub(super) fn prefetch(&self, hash: Hashed) {
        let tag = Self::tag(hash.0);
        if let Some((_, b)) = self.run(hash.0).find(|(_, b)| b.tag == tag) {
            let slot = &self.slots[b.at()];
            prefetch_lines(std::ptr::from_ref(slot).cast(), std::mem::size_of::<Slot>());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn entry() -> UserEntry {
        UserEntry {
            conns: smallvec::SmallVec::new(),
            tenant: None,
            position: Default::default(),
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
        let hash = users.prefetch_bucket("ann");
        users.prefetch(hash);
        assert!(users.get_hashed("ann", hash).is_some());
        let hash = users.prefetch_bucket("nobody");
        users.prefetch(hash);
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

    /// Every recipient's slot is fetched whole (`prefetch`): at 96 bytes, in a vector that
    /// starts on a 32-byte boundary (jemalloc aligns a block of a multiple of 32 bytes so), each
    /// slot is exactly two cache lines.
    #[test]
    fn a_slot_is_two_cache_lines() {
        assert_eq!(std::mem::size_of::<Slot>(), 96);
    }

    #[test]
    fn a_position_of_none_reads_back_as_none() {
        use crate::broker::StreamId;
        let mut p = super::super::registry::Position::default();
        assert_eq!(p.get(), None);
        p.set(Some(StreamId(5, 1)));
        assert_eq!(p.get(), Some(StreamId(5, 1)));
        let kept = p.with(|last| last.replace(StreamId(6, 0)));
        assert_eq!(
            (kept, p.get()),
            (Some(StreamId(5, 1)), Some(StreamId(6, 0)))
        );
        p.set(None);
        assert_eq!(p.get(), None);
    }

    /// Inserts and removals in a pseudo-random order, checked against a std map after every
    /// step: removals shift probe runs back and move the last slot, and neither may lose or
    /// misplace an entry.
    #[test]
    fn the_table_agrees_with_a_std_map_through_inserts_and_removals() {
        let mut users = Users::default();
        let mut model = std::collections::HashMap::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for step in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = format!("user-{}", x % 700);
            if x % 3 == 0 {
                assert_eq!(
                    users.remove(&id).map(|e| e.tenant),
                    model.remove(&id),
                    "step {step}"
                );
            } else {
                let t: Arc<str> = step.to_string().into();
                users.get_or_insert_with(&id, entry).tenant = Some(t.clone());
                model.insert(id.clone(), Some(t));
            }
            if step % 97 == 0 {
                assert_eq!(users.iter().count(), model.len());
                for (k, v) in &model {
                    assert_eq!(users.get(k).map(|e| &e.tenant), Some(v), "step {step}");
                }
            }
        }
        for (k, v) in &model {
            let hash = users.prefetch_bucket(k);
            users.prefetch(hash);
            assert_eq!(users.get_hashed(k, hash).map(|e| &e.tenant), Some(v));
        }
        assert!(users.get("user-none").is_none());
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
