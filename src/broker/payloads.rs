//! The payloads a subscription received last, kept to be shared. A publish to many users reaches
//! a node as one message per user's channel, all with the same payload; a burst of `b` publishes
//! to the same users arrives grouped by channel (`publisher.rs`), so the same `b` payloads come
//! round again for every channel. A payload seen again among the last [`KEPT`] is handed out
//! as the same shared bytes, not copied: a fan-out, burst or not, copies each payload once, not
//! once per recipient, and the hub decodes it once (`hub/fanout.rs`).

use bytes::Bytes;

/// Distinct payloads kept at most. A burst of up to this many publishes to the same users
/// shares its payloads; a longer one copies them, as every message did before. (A round trip
/// carries at most 8,192 messages, `publisher.rs`: a burst of more than 64 publishes reaches
/// at most 128 users each.)
pub const KEPT: usize = 64;

/// Bytes of kept payloads at most: the oldest go first beyond it, so that 64 large payloads
/// do not stay in memory until newer ones replace them.
pub const KEPT_BYTES: usize = 4 << 20;

/// The last values kept, at most [`KEPT`] of at most [`KEPT_BYTES`] in all. A fan-out repeats
/// the value found last, a burst grouped by channel the one kept after it: both are tried
/// first, then every kept value whose key is the same, newest first. A key is a cheap
/// fingerprint of the value ([`fingerprint`], or an address), compared before any value.
/// The hub keeps its decoded envelopes in one too.
pub struct Recent<T> {
    keys: [u64; KEPT],
    weights: [usize; KEPT],
    kept: Box<[Option<T>; KEPT]>,
    bytes: usize,
    /// The slot the next value takes (the oldest).
    next: usize,
    /// The slot found or filled last.
    last: usize,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent {
            keys: [0; KEPT],
            weights: [0; KEPT],
            kept: Box::new(std::array::from_fn(|_| None)),
            bytes: 0,
            next: 0,
            last: 0,
        }
    }
}

/// A payload's key for [`Recent`]: its length and first 16 bytes (an envelope's kind and publish
/// time), so that different payloads seldom share one and the same payload always does.
pub fn fingerprint(payload: &[u8]) -> u64 {
    let mut head = [0u8; 16];
    let n = payload.len().min(16);
    head[..n].copy_from_slice(&payload[..n]);
    let (a, b) = head.split_at(8);
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
    word(a) ^ word(b).rotate_left(29) ^ (payload.len() as u64).rotate_left(47)
}

impl<T> Recent<T> {
    fn holds(&self, slot: usize, key: u64, matches: &impl Fn(&T) -> bool) -> bool {
        self.keys[slot] == key && self.kept[slot].as_ref().is_some_and(matches)
    }

    /// The kept value with this `key` that `matches`, else the one `make` gives, kept in place
    /// of the oldest (nothing is kept when `make` fails); `weight`: its bytes, for
    /// [`KEPT_BYTES`]. Lent, not cloned.
    pub fn find_or_keep<E>(
        &mut self,
        key: u64,
        weight: usize,
        matches: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<&T, E> {
        let after = (self.last + 1) % KEPT;
        let hit = [self.last, after]
            .into_iter()
            .chain((1..=KEPT).map(|back| (self.next + KEPT - back) % KEPT))
            .find(|&slot| self.holds(slot, key, &matches));
        let slot = match hit {
            Some(slot) => slot,
            None => self.keep(key, weight, make()?),
        };
        self.last = slot;
        Ok(self.kept[slot]
            .as_ref()
            .expect("the slot was found holding a value or was just filled"))
    }

    /// Keeps `value` in the oldest slot, then lets the oldest others go while over the budget.
    fn keep(&mut self, key: u64, weight: usize, value: T) -> usize {
        let slot = self.next;
        self.bytes = self.bytes - self.weights[slot] + weight;
        (self.keys[slot], self.weights[slot]) = (key, weight);
        self.kept[slot] = Some(value);
        self.next = (slot + 1) % KEPT;
        let mut oldest = self.next;
        while self.bytes > KEPT_BYTES && oldest != slot {
            if self.kept[oldest].take().is_some() {
                self.bytes -= std::mem::take(&mut self.weights[oldest]);
            }
            oldest = (oldest + 1) % KEPT;
        }
        slot
    }
}

/// The payloads a subscription received last.
#[derive(Default)]
pub(super) struct RecentPayloads(Recent<Bytes>);

impl RecentPayloads {
    /// `payload` as shared bytes: a kept payload with the same bytes, or a copy that is kept.
    /// Lent: the reader clones it only where it needs its own (a clone and its drop are two
    /// atomic operations on the payload's shared count, per message).
    pub(super) fn share(&mut self, payload: &[u8]) -> &Bytes {
        let kept = self.0.find_or_keep(
            fingerprint(payload),
            payload.len(),
            |kept| kept[..] == *payload,
            || Ok::<_, std::convert::Infallible>(Bytes::copy_from_slice(payload)),
        );
        match kept {
            Ok(kept) => kept,
            Err(never) => match never {},
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(a: &Bytes, b: &Bytes) -> bool {
        a.as_ptr() == b.as_ptr() && a.len() == b.len()
    }

    #[test]
    fn a_fan_out_copies_its_payload_once() {
        let mut recent = RecentPayloads::default();
        let first = recent.share(b"hello").clone();
        for _ in 0..1000 {
            assert!(shared(&first, recent.share(b"hello")));
        }
    }

    #[test]
    fn a_burst_grouped_by_channel_copies_each_payload_once() {
        let mut recent = RecentPayloads::default();
        let payloads: Vec<Vec<u8>> = (0..KEPT).map(|i| format!("m{i}").into_bytes()).collect();
        let first: Vec<Bytes> = payloads.iter().map(|p| recent.share(p).clone()).collect();
        for _channel in 0..100 {
            for (p, f) in payloads.iter().zip(&first) {
                let got = recent.share(p).clone();
                assert_eq!(&got[..], &p[..]);
                assert!(shared(&got, f), "payload {p:?} was copied again");
            }
        }
    }

    #[test]
    fn bursts_of_distinct_payloads_past_the_byte_budget_keep_the_newest() {
        let mut recent = RecentPayloads::default();
        let big = |i: u8| vec![i; KEPT_BYTES / 3];
        let first: Vec<Bytes> = (0..4).map(|i| recent.share(&big(i)).clone()).collect();
        assert!(recent.0.bytes <= KEPT_BYTES);
        // The three newest fit; the oldest went to make room.
        for (i, kept) in first.iter().enumerate().skip(1) {
            assert!(shared(recent.share(&big(i as u8)), kept));
        }
        assert!(!shared(recent.share(&big(0)), &first[0]));
        assert!(recent.0.bytes <= KEPT_BYTES);
    }

    #[test]
    fn payloads_with_the_same_fingerprint_are_told_apart() {
        let mut recent = RecentPayloads::default();
        let (a, b) = (b"same head 16 b..a".to_vec(), b"same head 16 b..b".to_vec());
        assert_eq!(fingerprint(&a), fingerprint(&b));
        let (sa, sb) = (recent.share(&a).clone(), recent.share(&b).clone());
        assert_eq!((&sa[..], &sb[..]), (&a[..], &b[..]));
        assert!(shared(recent.share(&a), &sa));
        assert!(shared(recent.share(&b), &sb));
    }

    #[test]
    fn beyond_what_is_kept_payloads_are_copied_and_stay_correct() {
        let mut recent = RecentPayloads::default();
        let payloads: Vec<Vec<u8>> = (0..=KEPT).map(|i| format!("m{i}").into_bytes()).collect();
        let first: Vec<Bytes> = payloads.iter().map(|p| recent.share(p).clone()).collect();
        // The oldest was replaced by the newest: asked again, it is a fresh copy.
        let again = recent.share(&payloads[0]).clone();
        assert_eq!(&again[..], &payloads[0][..]);
        assert!(!shared(&again, &first[0]));
        // An empty payload is a payload like any other.
        assert!(recent.share(b"").is_empty());
    }
}
