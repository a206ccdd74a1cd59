//! What the reader holds back while delivery waits (the subscriptions being restored, the
//! history caught up, a gap recovered), bounded by `--max-recovery-hold`.
//!
//! Why a bound: the subscription is read all the while (so that Redis never drops the node as
//! a slow subscriber, and SUBSCRIBEs are acknowledged), and a catch-up of thousands of
//! channels under a full live stream could otherwise hold hundreds of megabytes. Past the
//! bound a message is not kept: it is in its channel's history already, so only where to read
//! it back from is remembered ([`Held::take_left`]), once per channel, and the reader reads it
//! back when what it holds is delivered. Without history (`--history-ttl 0`) such a message
//! cannot be read back and is counted as lost.
//!
//! Once one message is left to history, every later one is too until the queue is empty
//! again: a smaller message that still fits must not overtake a larger one of its channel.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use super::history::{self, StreamId};

/// Bytes counted per held message besides its channel and payload: the queue slot and the
/// channel's allocation.
const PER_MESSAGE: usize = 64;

/// A held message: its channel, its payload (still framed), and whether the gap before it
/// was already recovered (then it is delivered whatever its position says).
pub(super) type HeldMessage = (String, Bytes, bool);

/// What [`Held::push`] did with a message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Kept {
    /// Held, delivered in order later.
    Held,
    /// Left to its channel's history, read back later.
    LeftToHistory,
    /// Past the bound and not in any history: lost. `first`: the first lost since the queue
    /// was last empty (so that a flood of them is logged once).
    Lost { first: bool },
}

pub(super) struct Held {
    queue: VecDeque<HeldMessage>,
    bytes: usize,
    limit: usize,
    /// Something was left to history since the queue was last empty.
    overflowing: bool,
    /// Something was lost since the queue was last empty.
    lost: bool,
    /// Channels with messages left to history → the position to read after (that of the
    /// message before the first one left; `0-0` for a stream's first).
    left: HashMap<String, StreamId>,
}

fn size(channel: &str, payload: &[u8]) -> usize {
    channel.len() + payload.len() + PER_MESSAGE
}

impl Held {
    /// `limit`: bytes held at most (`--max-recovery-hold`).
    pub(super) fn new(limit: usize) -> Held {
        Held {
            queue: VecDeque::new(),
            bytes: 0,
            limit,
            overflowing: false,
            lost: false,
            left: HashMap::new(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Holds a message that arrived while delivery waits, or leaves it to history when the
    /// bound is reached.
    pub(super) fn push(&mut self, channel: &str, payload: &[u8]) -> Kept {
        let n = size(channel, payload);
        if !self.overflowing && self.bytes + n <= self.limit {
            self.bytes += n;
            self.queue
                .push_back((channel.to_owned(), Bytes::copy_from_slice(payload), false));
            return Kept::Held;
        }
        self.overflowing = true;
        match history::unframe(payload) {
            Some(history::Framed {
                id: Some(_), prev, ..
            }) => {
                self.left
                    .entry(channel.to_owned())
                    .or_insert(prev.unwrap_or_default());
                Kept::LeftToHistory
            }
            _ => Kept::Lost {
                first: !std::mem::replace(&mut self.lost, true),
            },
        }
    }

    /// Puts a message back first in line, whatever the bound: the one a gap's recovery holds
    /// back (one message, taken from this queue or from the read buffer).
    pub(super) fn push_front(&mut self, message: HeldMessage) {
        self.bytes += size(&message.0, &message.1);
        self.queue.push_front(message);
    }

    pub(super) fn pop_front(&mut self) -> Option<HeldMessage> {
        let message = self.queue.pop_front()?;
        self.bytes -= size(&message.0, &message.1);
        if self.queue.is_empty() {
            (self.overflowing, self.lost) = (false, false);
        }
        Some(message)
    }

    /// The channels with messages left to history and where to read each after; emptied.
    pub(super) fn take_left(&mut self) -> Vec<(String, StreamId)> {
        self.left.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(prev: &str, id: &str, body: &str) -> Vec<u8> {
        format!("{prev}\n{id}\n{body}").into_bytes()
    }

    #[test]
    fn messages_past_the_bound_are_left_to_history_once_per_channel() {
        let one = size("c", &framed("1-0", "2-0", "x"));
        let mut held = Held::new(2 * one);
        assert_eq!(held.push("c", &framed("1-0", "2-0", "x")), Kept::Held);
        assert_eq!(held.push("d", &framed("", "1-0", "x")), Kept::Held);
        // Full: the next ones are left, each channel read back from before its first.
        assert_eq!(
            held.push("c", &framed("2-0", "3-0", "x")),
            Kept::LeftToHistory
        );
        assert_eq!(
            held.push("c", &framed("3-0", "4-0", "x")),
            Kept::LeftToHistory
        );
        assert_eq!(held.push("e", &framed("", "1-0", "x")), Kept::LeftToHistory);
        // Without a position there is no history to read it back from.
        assert_eq!(
            held.push("f", &framed("", "", "x")),
            Kept::Lost { first: true }
        );
        assert_eq!(
            held.push("f", &framed("", "", "y")),
            Kept::Lost { first: false }
        );
        let mut left = held.take_left();
        left.sort();
        assert_eq!(
            left,
            vec![
                ("c".to_owned(), StreamId(2, 0)),
                ("e".to_owned(), StreamId(0, 0))
            ]
        );
        assert!(held.take_left().is_empty());
    }

    #[test]
    fn nothing_is_held_again_until_the_queue_is_empty() {
        let big = framed("1-0", "2-0", &"x".repeat(100));
        let mut held = Held::new(size("c", &big) + 10);
        assert_eq!(held.push("c", &big), Kept::Held);
        assert_eq!(held.push("c", &big), Kept::LeftToHistory);
        // It would fit, but must not overtake what was left.
        assert_eq!(
            held.push("c", &framed("2-0", "3-0", "")),
            Kept::LeftToHistory
        );
        let (channel, payload, after_gap) = held.pop_front().expect("held");
        assert_eq!(
            (channel.as_str(), &payload[..], after_gap),
            ("c", &big[..], false)
        );
        assert!(held.is_empty());
        assert_eq!(held.push("c", &big), Kept::Held);
    }

    #[test]
    fn a_gaps_message_goes_back_first_whatever_the_bound() {
        let mut held = Held::new(0);
        held.push_front(("c".into(), Bytes::from_static(b"later"), false));
        held.push_front(("c".into(), Bytes::from_static(b"first"), true));
        assert_eq!(
            held.pop_front().map(|m| m.1),
            Some(Bytes::from_static(b"first"))
        );
        assert_eq!(held.pop_front().map(|m| m.2), Some(false));
        assert!(held.pop_front().is_none());
        assert_eq!(held.bytes, 0);
    }
}
