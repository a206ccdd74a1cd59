//! Per-channel history (`--history-ttl`): what lets a node recover messages that pub/sub lost.
//!
//! With Redis, every publish runs one script per channel that appends the payload to the
//! channel's stream (`{channel}:history`, a hash tag so it shares the channel's cluster slot),
//! trims the stream to the window by time (`MINID`, Redis's clock), and publishes the payload
//! with a small frame in front: the id of the previous entry and the new entry's id. Receivers
//! therefore know every message's position and can see a gap (a previous id newer than the last
//! one they delivered) without waiting for anything else.
//!
//! Frame on the pub/sub channel: `{previous id}\n{id}\n{payload}`; both ids are empty when
//! history is off. The broker strips the frame; the envelope inside stays opaque.

/// A Redis stream id: milliseconds and sequence. Ordered as Redis orders them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64, pub u64);

impl StreamId {
    /// `ms-seq`, both plain decimal. Read from the bytes directly: every received message
    /// carries two ids, and the text detour (UTF-8 check, split, `str::parse`) was a visible
    /// part of the reader's CPU.
    pub fn parse(s: &[u8]) -> Option<StreamId> {
        let (ms, seq) = decimal_until(s, b'-')?;
        Some(StreamId(ms, decimal(seq)?))
    }
}

/// A non-empty run of ASCII digits that fits a `u64`.
fn decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// The history key of a channel: same hash slot as the channel.
pub fn key(channel: &str) -> String {
    format!("{{{channel}{KEY_SUFFIX}")
}

/// [`key`] in its three parts, for the publisher to write side by side into its request: it
/// names one key per recipient.
pub fn key_parts(channel: &str) -> [&[u8]; 3] {
    [b"{", channel.as_bytes(), KEY_SUFFIX.as_bytes()]
}

/// What follows the channel in its history key; [`PUBLISH_SCRIPT`] strips the `{` and this
/// (9 bytes) to read the channel back.
const KEY_SUFFIX: &str = "}:history";

/// Appends to each channel's history, trims it by time, publishes with the position frame; one
/// call for a whole group of channels, atomic per call, so each stream's order is its pub/sub
/// order. A call carries several publishes (`publisher.rs`), each payload once however many
/// channels get it: a notification to 400 users is one argument of 200 bytes, not 400 copies,
/// and one channel's messages go out back to back.
///
/// KEYS[i]: the history of channel i ([`key`]: the channel is read back from it, not sent
/// again). ARGV[1]: the window in ms; ARGV[2]: the publish command (`PUBLISH`, or `SPUBLISH` in
/// a Redis Cluster, where every channel of one call shares the slot of its keys); ARGV[3]: the
/// number of payloads P; ARGV[4 .. 3 + P]: the payloads. Then either `*`: every channel gets
/// every payload, in order (one publish to many users: a call names each recipient once, its
/// key); or per channel, in KEYS order, the numbers (1-based) of its payloads, separated by
/// commas. Returns the number of channels published.
pub const PUBLISH_SCRIPT: &str = r#"
local ttl = tonumber(ARGV[1])
local cmd = ARGV[2]
local np = tonumber(ARGV[3])
local every = ARGV[4 + np] == '*'
local t = redis.call('TIME')
local minid = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - ttl)
local function publish(key, channel, prev, payload)
  local id = redis.call('XADD', key, 'MINID', minid, '*', 'm', payload)
  redis.call(cmd, channel, prev .. '\n' .. id .. '\n' .. payload)
  return id
end
for i, key in ipairs(KEYS) do
  local channel = string.sub(key, 2, -10)
  local prev = ''
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if last[1] then prev = last[1][1] end
  if every then
    for j = 1, np do
      prev = publish(key, channel, prev, ARGV[3 + j])
    end
  else
    for j in string.gmatch(ARGV[3 + np + i], '%d+') do
      prev = publish(key, channel, prev, ARGV[3 + tonumber(j)])
    end
  end
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"#;

/// Channels per script call: bounds how long one call holds Redis (each channel costs a few
/// µs of Redis time), while a notification to a few hundred users stays one call.
pub const CHANNELS_PER_CALL: usize = 128;

/// What goes before a payload published without history: the frame of no position.
pub const NO_POSITION: &[u8] = b"\n\n";

/// Frames a payload for publishing without history.
#[cfg(test)]
pub fn frame_without_history(payload: &[u8]) -> Vec<u8> {
    [NO_POSITION, payload].concat()
}

/// A received pub/sub message, unframed: the payload is still the received bytes.
#[derive(Debug)]
pub struct Framed<'a> {
    pub prev: Option<StreamId>,
    pub id: Option<StreamId>,
    pub payload: &'a [u8],
}

/// Splits the position frame off; `None` if the message is not framed. One pass over the two id
/// lines: every received message is unframed, and finding each line's end before parsing it
/// read the ids twice.
pub fn unframe(raw: &[u8]) -> Option<Framed<'_>> {
    let (prev, rest) = id_line(raw)?;
    let (id, payload) = id_line(rest)?;
    Some(Framed { prev, id, payload })
}

/// A frame line: empty or `ms-seq`, ended by `\n`; its id and the bytes after it.
fn id_line(s: &[u8]) -> Option<(Option<StreamId>, &[u8])> {
    if let [b'\n', rest @ ..] = s {
        return Some((None, rest));
    }
    if let Some((id, rest)) = usual_id_line(s) {
        return Some((Some(id), rest));
    }
    let (ms, s) = decimal_until(s, b'-')?;
    let (seq, rest) = decimal_until(s, b'\n')?;
    Some((Some(StreamId(ms, seq)), rest))
}

/// An id line of the shape every id Redis gives has until the year 2286: 13 digits of
/// milliseconds, `-`, a sequence of one to seven digits, `\n`, and at least eight bytes in all
/// after the `-`. Read in three words with no loop and no call; `None` for any other shape,
/// which [`decimal_until`] then reads. Every received message carries two of these lines: read
/// by the general loop they were about 400 instructions per message, most of them in its
/// per-call set-up for a one-digit sequence.
#[inline]
fn usual_id_line(s: &[u8]) -> Option<(StreamId, &[u8])> {
    let (head, tail) = (s.first_chunk::<8>()?, s.get(5..)?.first_chunk::<8>()?);
    let seq_at = s.get(14..)?;
    if s[13] != b'-' {
        return None;
    }
    // Bytes 0..8 and 5..13: thirteen digits when neither word has a non-digit.
    let head = u64::from_le_bytes(*head).wrapping_sub(ONES * u64::from(b'0'));
    let tail = u64::from_le_bytes(*tail).wrapping_sub(ONES * u64::from(b'0'));
    if non_digits(head) | non_digits(tail) != 0 {
        return None;
    }
    // The tail's last five digits (bytes 8..13), the three it shares with the head (its lowest
    // bytes) zeroed: leading zeros.
    let ms = eight_digits(head) * 100_000 + eight_digits(tail & !0xFF_FFFF);
    let (k, seq) = leading_digits(u64::from_le_bytes(*seq_at.first_chunk::<8>()?));
    if k == 0 || k == 8 || seq_at[k] != b'\n' {
        return None;
    }
    Some((StreamId(ms, seq), &seq_at[k + 1..]))
}

/// One in every byte of a word.
const ONES: u64 = 0x0101_0101_0101_0101;

/// The top bit of every byte of `d` (eight bytes, each already minus `'0'`) that was not a
/// digit: a byte below `'0'` borrowed, one above `'9'` reaches the top bit when 0x76 is added.
#[inline]
fn non_digits(d: u64) -> u64 {
    (d | d.wrapping_add(ONES * 0x76)) & (ONES * 0x80)
}

/// The value of eight digit bytes (each already minus `'0'`, the first byte lowest and most
/// significant; zero bytes are leading zeros): pairs, quads and the two halves combined.
#[inline]
fn eight_digits(v: u64) -> u64 {
    let v = (v.wrapping_mul(10) + (v >> 8)) & 0x00FF_00FF_00FF_00FF;
    let v = (v.wrapping_mul(100) + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
    (v.wrapping_mul(10_000) + (v >> 32)) & 0xFFFF_FFFF
}

/// A non-empty run of ASCII digits that fits a `u64`, ended by `end`: its value and the bytes
/// after `end`. Read eight bytes at a time: every received message carries two positions of
/// about 14 digits each, which a byte at a time took about 480 instructions per message, and
/// eight at a time about 390.
fn decimal_until(s: &[u8], end: u8) -> Option<(u64, &[u8])> {
    let mut n: u64 = 0;
    let mut i = 0;
    while let Some(chunk) = s.get(i..).and_then(<[u8]>::first_chunk::<8>) {
        let (k, v) = leading_digits(u64::from_le_bytes(*chunk));
        if i + k > 19 {
            // Only a 20th digit can overflow: the careful path decides.
            return decimal_until_bytewise(s, end);
        }
        n = n * POW10[k] + v;
        i += k;
        if k < 8 {
            return (s[i] == end && i > 0).then(|| (n, &s[i + 1..]));
        }
    }
    // Fewer than eight bytes left (only when a message's payload is shorter than that): the
    // byte loop reads the number again from its start.
    decimal_until_bytewise(s, end)
}

const POW10: [u64; 9] = [
    1,
    10,
    100,
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    100_000_000,
];

/// The ASCII digits at the start of eight bytes (the first byte lowest): how many, and their
/// value.
fn leading_digits(chunk: u64) -> (usize, u64) {
    let d = chunk.wrapping_sub(ONES * u64::from(b'0'));
    // A byte below '0' borrows (its top bit set), one above '9' reaches the top bit when 0x76
    // is added; bytes before the first non-digit neither borrow nor carry, so the lowest flagged
    // byte is the first non-digit.
    let flagged = non_digits(d);
    let k = (flagged.trailing_zeros() / 8) as usize;
    if k == 0 {
        return (0, 0);
    }
    // The k digits moved to the top, zeros (leading zeros of the number) below them.
    (k, eight_digits(d << (8 * (8 - k))))
}

/// [`decimal_until`] a byte at a time, with overflow checked on every digit past the 19th.
fn decimal_until_bytewise(s: &[u8], end: u8) -> Option<(u64, &[u8])> {
    let mut n: u64 = 0;
    for (i, &b) in s.iter().enumerate() {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return (b == end && i > 0).then(|| (n, &s[i + 1..]));
        }
        n = n.checked_mul(10)?.checked_add(u64::from(digit))?;
    }
    None
}

/// What to do with a received message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it.
    Deliver,
    /// Already delivered (recovered earlier): drop it.
    Duplicate,
    /// Messages after `after` and before this one are missing: recover them first.
    Gap { after: StreamId },
}

/// Judges a message by its position against `last`, the position of the last message delivered
/// on its channel, and records it there when the verdict is [`Verdict::Deliver`]. Messages
/// without history are always delivered. A gap is not recorded: the message is recorded after
/// what the gap recovers.
///
/// The slot is kept by the [`MessageSink`](super::MessageSink), beside the channel's
/// recipients, so that judging and delivering a message are one look-up.
pub fn judge(last: &mut Option<StreamId>, prev: Option<StreamId>, id: Option<StreamId>) -> Verdict {
    let Some(id) = id else {
        return Verdict::Deliver;
    };
    let Some(l) = *last else {
        *last = Some(id);
        return Verdict::Deliver;
    };
    if id <= l {
        return Verdict::Duplicate;
    }
    match prev {
        Some(p) if p > l => Verdict::Gap { after: l },
        _ => {
            *last = Some(id);
            Verdict::Deliver
        }
    }
}

/// Records a delivered position, only forwards.
pub fn advance(last: &mut Option<StreamId>, id: StreamId) {
    if last.is_none_or(|l| l < id) {
        *last = Some(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_publish_script_reads_each_channel_back_from_its_key() {
        // `string.sub(key, 2, -10)`: the `{` before the channel, the 9 bytes after it.
        assert_eq!(KEY_SUFFIX.len(), 9);
        assert!(PUBLISH_SCRIPT.contains("string.sub(key, 2, -10)"));
        assert_eq!(key("wsgate:u:jo{hn"), "{wsgate:u:jo{hn}:history");
    }

    #[test]
    fn stream_ids_are_plain_decimal_pairs() {
        assert_eq!(StreamId::parse(b"0-0"), Some(StreamId(0, 0)));
        assert_eq!(
            StreamId::parse(b"18446744073709551615-7"),
            Some(StreamId(u64::MAX, 7))
        );
        for bad in [
            &b""[..],
            b"1",
            b"1-",
            b"-1",
            b"+1-0",
            b"1-+0",
            b"1-2-3",
            b"1 -2",
            b"18446744073709551616-0",
            b"\xff-1",
        ] {
            assert_eq!(
                StreamId::parse(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_id_reads_back_as_written(ms in proptest::prelude::any::<u64>(), seq in proptest::prelude::any::<u64>()) {
            let text = StreamId(ms, seq).to_string();
            proptest::prop_assert_eq!(StreamId::parse(text.as_bytes()), Some(StreamId(ms, seq)));
        }
    }

    #[test]
    fn frames_round_trip() {
        let f = unframe(b"1-0\n2-5\n\x01payload").expect("framed");
        assert_eq!(f.prev, Some(StreamId(1, 0)));
        assert_eq!(f.id, Some(StreamId(2, 5)));
        assert_eq!(f.payload, b"\x01payload");
        let unhistoried = frame_without_history(b"x\ny");
        let f = unframe(&unhistoried).expect("framed");
        assert_eq!((f.prev, f.id), (None, None));
        assert_eq!(f.payload, b"x\ny");
        assert!(unframe(b"no frame").is_none());
        assert!(unframe(b"bad\n1-1\nx").is_none());
        let padded = unframe(b"000000000000000000001-2\n\nx").expect("21 digits, value 1");
        assert_eq!(padded.prev, Some(StreamId(1, 2)));
        for bad in [
            &b"1-\n\nx"[..],
            b"-1\n\nx",
            b"1-1x\n\nx",
            b"\n1-1",
            b"18446744073709551616-0\n\nx",
            b"99999999999999999999-0\n\nx",
            b"1-1\n",
        ] {
            assert!(unframe(bad).is_none(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    proptest::proptest! {
        /// Eight bytes at a time read what a byte at a time reads: mostly digits, with the end
        /// byte, other bytes and lengths around the eight-byte steps.
        #[test]
        fn chunked_digits_read_as_bytewise(
            s in proptest::collection::vec(proptest::sample::select(
                &b"0123456789000999-\n/:a\xff"[..]), 0..48),
        ) {
            for end in [b'-', b'\n'] {
                proptest::prop_assert_eq!(decimal_until(&s, end), decimal_until_bytewise(&s, end));
            }
        }
    }

    proptest::proptest! {
        /// The usual shape's reader answers as the general one wherever it answers, and answers
        /// for every id of that shape: lines built of digits, `-`, `\n` and other bytes around
        /// the 13th byte and the sequence's end.
        #[test]
        fn usual_id_lines_read_as_any_line(
            s in proptest::collection::vec(proptest::sample::select(
                &b"0123456789000999999-\n/:a\xff"[..]), 0..32),
        ) {
            fn general(s: &[u8]) -> Option<(StreamId, &[u8])> {
                let (ms, s) = decimal_until_bytewise(s, b'-')?;
                let (seq, rest) = decimal_until_bytewise(s, b'\n')?;
                Some((StreamId(ms, seq), rest))
            }
            if let Some(usual) = usual_id_line(&s) {
                proptest::prop_assert_eq!(Some(usual), general(&s));
            }
            let line = match &s[..] {
                [b'\n', rest @ ..] => Some((None, rest)),
                _ => general(&s).map(|(id, rest)| (Some(id), rest)),
            };
            proptest::prop_assert_eq!(id_line(&s), line);
        }

        #[test]
        fn every_usual_id_takes_the_usual_path(
            ms in 1_000_000_000_000u64..10_000_000_000_000,
            seq in 0u64..10_000_000,
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
        ) {
            let mut line = format!("{ms}-{seq}\n").into_bytes();
            line.extend_from_slice(&payload);
            let seq_digits = seq.to_string().len();
            // Only a line too short to read the sequence's word from goes the general way.
            let expected = (1 + seq_digits + payload.len() >= 8).then_some((StreamId(ms, seq), &payload[..]));
            proptest::prop_assert_eq!(usual_id_line(&line), expected);
        }
    }

    #[test]
    fn leading_digits_of_eight_bytes() {
        let read = |s: &[u8; 8]| leading_digits(u64::from_le_bytes(*s));
        assert_eq!(read(b"12345678"), (8, 12_345_678));
        assert_eq!(read(b"99999999"), (8, 99_999_999));
        assert_eq!(read(b"1764-0\n{"), (4, 1764));
        assert_eq!(read(b"0-1\n\n\n\n\n"), (1, 0));
        assert_eq!(read(b"-1234567"), (0, 0));
        assert_eq!(read(b"1234567/"), (7, 1_234_567));
        assert_eq!(read(b"1234567:"), (7, 1_234_567));
        assert_eq!(
            read(b"\x00\xff1234567"[..8].try_into().expect("8 bytes")),
            (0, 0)
        );
    }

    proptest::proptest! {
        /// Any pair of ids (or none) and any payload come back as framed.
        #[test]
        fn any_frame_reads_back_as_written(
            prev in proptest::option::of(proptest::prelude::any::<(u64, u64)>()),
            id in proptest::option::of(proptest::prelude::any::<(u64, u64)>()),
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let text = |i: Option<(u64, u64)>| i.map(|(a, b)| StreamId(a, b).to_string()).unwrap_or_default();
            let mut raw = format!("{}\n{}\n", text(prev), text(id)).into_bytes();
            raw.extend_from_slice(&payload);
            let f = unframe(&raw).expect("framed");
            proptest::prop_assert_eq!(f.prev, prev.map(|(a, b)| StreamId(a, b)));
            proptest::prop_assert_eq!(f.id, id.map(|(a, b)| StreamId(a, b)));
            proptest::prop_assert_eq!(f.payload, &payload[..]);
        }
    }

    #[test]
    fn judging_records_only_what_is_delivered() {
        let id = |ms| Some(StreamId(ms, 0));
        let mut last = None;
        assert_eq!(judge(&mut last, None, id(1)), Verdict::Deliver);
        assert_eq!(judge(&mut last, id(1), id(2)), Verdict::Deliver);
        assert_eq!(judge(&mut last, id(1), id(2)), Verdict::Duplicate);
        // A gap is not recorded: the message is delivered after the recovery.
        for _ in 0..2 {
            assert_eq!(
                judge(&mut last, id(4), id(5)),
                Verdict::Gap {
                    after: StreamId(2, 0)
                }
            );
        }
        // Without history nothing is judged or recorded.
        assert_eq!(judge(&mut last, None, None), Verdict::Deliver);
        assert_eq!(last, id(2));
        // Recorded positions only move forwards.
        advance(&mut last, StreamId(1, 0));
        assert_eq!(last, id(2));
        advance(&mut last, StreamId(3, 0));
        assert_eq!(last, id(3));
    }
}
