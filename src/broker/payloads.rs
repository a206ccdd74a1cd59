//! The payloads a subscription received last, kept to be shared. A publish to many users reaches
//! a node as one message per user's channel, all with the same payload; a burst of `b` publishes
//! to the same users arrives grouped by channel (`publisher.rs`), so the same `b` payloads come
//! round again for every channel. A payload seen again among the last [`KEPT`] is handed out
//! as the same shared bytes, not copied: a fan-out, burst or not, copies each payload once, not
//! once per recipient, and the hub decodes it once (`hub/fanout.rs`).

use bytes::Bytes;

/// Distinct payloads kept. A burst of up to this many publishes to the same users shares its
/// payloads; a longer one copies them, as every message did before. What is kept stays in
/// memory until newer payloads replace it: at most this many of the largest accepted size.
pub const KEPT: usize = 16;

/// The last [`KEPT`] values kept, searched newest first: a fan-out repeats the newest, a burst
/// of `b` the `b`-th newest. The hub keeps its decoded envelopes in one too.
pub struct Recent<T> {
    kept: [Option<T>; KEPT],
    /// The slot the next value takes (the oldest).
    next: usize,
}

impl<T> Default for Recent<T> {
    fn default() -> Self {
        Recent {
            kept: std::array::from_fn(|_| None),
            next: 0,
        }
    }
}

impl<T> Recent<T> {
    /// The newest kept value that `matches`, else the one `make` gives, kept in place of the
    /// oldest (nothing is kept when `make` fails). Lent, not cloned.
    pub fn find_or_keep<E>(
        &mut self,
        matches: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Result<T, E>,
    ) -> Result<&T, E> {
        let hit = (1..=KEPT)
            .map(|back| (self.next + KEPT - back) % KEPT)
            .find(|&slot| self.kept[slot].as_ref().is_some_and(&matches));
        let slot = match hit {
            Some(slot) => slot,
            None => {
                let slot = self.next;
                self.kept[slot] = Some(make()?);
                self.next = (slot + 1) % KEPT;
                slot
            }
        };
        Ok(self.kept[slot]
            .as_ref()
            .expect("the slot was found holding a value or was just filled"))
    }
}

/// The payloads a subscription received last.
#[derive(Default)]
pub(super) struct RecentPayloads(Recent<Bytes>);

impl RecentPayloads {
    /// `payload` as shared bytes: a kept payload with the same bytes, or a copy that is kept.
    /// Two different payloads differ early (the envelope's publish time comes first), so a
    /// miss is cheap.
    pub(super) fn share(&mut self, payload: &[u8]) -> Bytes {
        let kept = self.0.find_or_keep(
            |kept| kept[..] == *payload,
            || Ok::<_, std::convert::Infallible>(Bytes::copy_from_slice(payload)),
        );
        match kept {
            Ok(kept) => kept.clone(),
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
        let first = recent.share(b"hello");
        for _ in 0..1000 {
            assert!(shared(&first, &recent.share(b"hello")));
        }
    }

    #[test]
    fn a_burst_grouped_by_channel_copies_each_payload_once() {
        let mut recent = RecentPayloads::default();
        let payloads: Vec<Vec<u8>> = (0..KEPT).map(|i| format!("m{i}").into_bytes()).collect();
        let first: Vec<Bytes> = payloads.iter().map(|p| recent.share(p)).collect();
        for _channel in 0..100 {
            for (p, f) in payloads.iter().zip(&first) {
                let got = recent.share(p);
                assert_eq!(&got[..], &p[..]);
                assert!(shared(&got, f), "payload {p:?} was copied again");
            }
        }
    }

    #[test]
    fn beyond_what_is_kept_payloads_are_copied_and_stay_correct() {
        let mut recent = RecentPayloads::default();
        let payloads: Vec<Vec<u8>> = (0..=KEPT).map(|i| format!("m{i}").into_bytes()).collect();
        let first: Vec<Bytes> = payloads.iter().map(|p| recent.share(p)).collect();
        // The oldest was replaced by the newest: asked again, it is a fresh copy.
        let again = recent.share(&payloads[0]);
        assert_eq!(&again[..], &payloads[0][..]);
        assert!(!shared(&again, &first[0]));
        // An empty payload is a payload like any other.
        assert!(recent.share(b"").is_empty());
    }
}
