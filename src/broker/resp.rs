//! RESP2 replies as a subscribed Redis connection sends them, parsed in place: no I/O and no
//! allocation; a message's channel and payload are slices of the bytes read.
//!
//! A connection in subscribed mode receives only flat arrays (`message`, `subscribe`,
//! `unsubscribe`, `pong` and their sharded forms), simple strings and errors. Anything nested is
//! malformed here, and the connection is dropped and made again.

/// One reply.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Reply<'a> {
    /// A publish on a subscribed channel (`message` or `smessage`).
    Message {
        channel: &'a [u8],
        payload: &'a [u8],
    },
    /// One channel of a SUBSCRIBE acknowledged (one reply per channel named).
    Subscribed,
    /// One channel of an UNSUBSCRIBE released.
    Unsubscribed,
    /// An error: the command it answers failed as a whole (`NOPERM ...`, `WRONGPASS ...`).
    Error(&'a [u8]),
    /// Anything else: `+OK` (to AUTH), `pong`, an integer.
    Other,
}

/// Bytes that are not RESP2.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Malformed;

/// What was parsed and where the bytes after it start; `None` while incomplete.
pub(super) type Parsed<T> = Result<Option<(T, usize)>, Malformed>;

/// Largest bulk string accepted: Redis's own default `proto-max-bulk-len`.
const MAX_BULK: usize = 512 * 1024 * 1024;
/// Most elements of one array: subscribed-mode replies have at most four.
const MAX_ELEMENTS: usize = 16;

/// Parses the reply at the start of `buf`: `Ok(None)` while it is incomplete, else the reply
/// and how many bytes it took.
pub(super) fn parse(buf: &[u8]) -> Parsed<Reply<'_>> {
    // Nearly every reply of a subscribed connection is a message: its fixed head is checked at
    // once, not read as an array of three bulk strings.
    if let Some(head) = buf.get(..MESSAGE_HEAD.len()) {
        if head == MESSAGE_HEAD {
            return message(buf, MESSAGE_HEAD.len());
        }
    }
    let Some(((kind, line), mut at)) = line(buf, 0)? else {
        return Ok(None);
    };
    let reply = match kind {
        b'+' | b':' => Reply::Other,
        b'-' => Reply::Error(line),
        b'*' => {
            let n = int(line)?;
            if n < 0 {
                return Ok(Some((Reply::Other, at)));
            }
            let n = n as usize;
            if n > MAX_ELEMENTS {
                return Err(Malformed);
            }
            let mut bulks: [Option<&[u8]>; 3] = [None; 3];
            for i in 0..n {
                let Some((bulk, next)) = element(buf, at)? else {
                    return Ok(None);
                };
                if let Some(slot) = bulks.get_mut(i) {
                    *slot = bulk;
                }
                at = next;
            }
            classify(bulks)
        }
        _ => return Err(Malformed),
    };
    Ok(Some((reply, at)))
}

/// How a `message` reply starts: an array of three, the first `message`.
const MESSAGE_HEAD: &[u8] = b"*3\r\n$7\r\nmessage\r\n";

/// The channel and payload of a message whose head ends at `at`.
fn message(buf: &[u8], at: usize) -> Parsed<Reply<'_>> {
    if let Some((channel, next)) = short_bulk(buf, at) {
        if let Some((payload, end)) = short_bulk(buf, next) {
            return Ok(Some((Reply::Message { channel, payload }, end)));
        }
    }
    let Some((channel, at)) = element(buf, at)? else {
        return Ok(None);
    };
    let Some((payload, at)) = element(buf, at)? else {
        return Ok(None);
    };
    match (channel, payload) {
        (Some(channel), Some(payload)) => Ok(Some((Reply::Message { channel, payload }, at))),
        _ => Ok(Some((Reply::Other, at))),
    }
}

fn classify(bulks: [Option<&[u8]>; 3]) -> Reply<'_> {
    match bulks {
        [Some(b"message" | b"smessage"), Some(channel), Some(payload)] => {
            Reply::Message { channel, payload }
        }
        [Some(b"subscribe" | b"ssubscribe"), ..] => Reply::Subscribed,
        [Some(b"unsubscribe" | b"sunsubscribe"), ..] => Reply::Unsubscribed,
        _ => Reply::Other,
    }
}

/// One element of an array at `at`: a bulk string (`None` for an integer or a null), and where
/// the next element starts.
fn element(buf: &[u8], at: usize) -> Parsed<Option<&[u8]>> {
    let Some(((kind, line), at)) = line(buf, at)? else {
        return Ok(None);
    };
    match kind {
        b'$' => {
            let len = int(line)?;
            if len < 0 {
                return Ok(Some((None, at)));
            }
            let len = len as usize;
            if len > MAX_BULK {
                return Err(Malformed);
            }
            let end = at + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(Malformed);
            }
            Ok(Some((Some(&buf[at..end]), end + 2)))
        }
        b':' | b'+' => Ok(Some((None, at))),
        _ => Err(Malformed),
    }
}

/// A complete bulk string at `at` whose length has at most five digits (every channel name, and
/// a message's payload unless it is 100 kB or more), and where the next element starts; `None`
/// for anything else, which [`element`] then reads (or finds incomplete or malformed). The
/// length line is read from one eight-byte word, not searched for its `\r` first: the two
/// elements of every received message were about 250 instructions read the general way.
#[inline]
fn short_bulk(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let head = buf.get(at..)?.first_chunk::<8>()?;
    if head[0] != b'$' {
        return None;
    }
    let mut len = 0;
    let mut i = 1;
    while i < 6 {
        let digit = head[i].wrapping_sub(b'0');
        if digit > 9 {
            break;
        }
        len = len * 10 + usize::from(digit);
        i += 1;
    }
    if i == 1 || head[i..i + 2] != *b"\r\n" {
        return None;
    }
    let start = at + i + 2;
    let end = start + len;
    if buf.get(end..end + 2)? != b"\r\n" {
        return None;
    }
    Some((&buf[start..end], end + 2))
}

/// The line at `at`: its type byte, its content, and where the next line starts.
fn line(buf: &[u8], at: usize) -> Parsed<(u8, &[u8])> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let rest = &buf[at + 1..];
    let Some(cr) = rest.iter().position(|b| *b == b'\r') else {
        // A line is a length or a short status; one this long is not RESP.
        return if rest.len() > 64 * 1024 {
            Err(Malformed)
        } else {
            Ok(None)
        };
    };
    match rest.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some(((kind, &rest[..cr]), at + 1 + cr + 2))),
        Some(_) => Err(Malformed),
    }
}

/// A length or count: an optional `-` and up to 18 digits (what RESP2 sends; more could
/// overflow). Read from the bytes: four of these per received message, and the UTF-8 check and
/// `str::parse` behind them were a sixth of the reader's instructions.
fn int(line: &[u8]) -> Result<i64, Malformed> {
    let (negative, digits) = match line {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() || digits.len() > 18 {
        return Err(Malformed);
    }
    let mut n: i64 = 0;
    for &b in digits {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return Err(Malformed);
        }
        n = n * 10 + i64::from(digit);
    }
    Ok(if negative { -n } else { n })
}

/// A command as RESP2: an array of bulk strings.
pub(super) fn command(verb: &str, args: &[String]) -> Vec<u8> {
    let size = 16 + verb.len() + args.iter().map(|a| a.len() + 16).sum::<usize>();
    let mut out = Request::with_capacity(size);
    out.command(args.len() + 1);
    out.arg(verb.as_bytes());
    for arg in args {
        out.arg(arg.as_bytes());
    }
    out.bytes
}

/// Commands written as RESP straight into one buffer, to be sent in one write: each command's
/// length, then its arguments, each copied once.
#[derive(Debug, Default)]
pub(super) struct Request {
    bytes: Vec<u8>,
    commands: usize,
}

impl Request {
    pub(super) fn with_capacity(bytes: usize) -> Request {
        Request {
            bytes: Vec::with_capacity(bytes),
            commands: 0,
        }
    }

    /// Empties it for the next round trip, keeping its memory, with room for `bytes` more.
    pub(super) fn reuse(&mut self, bytes: usize) {
        self.bytes.clear();
        self.bytes.reserve(bytes);
        self.commands = 0;
    }

    /// The memory it holds.
    pub(super) fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// Starts a command of `args` arguments (its name included).
    pub(super) fn command(&mut self, args: usize) {
        self.commands += 1;
        self.head(b'*', args);
    }

    pub(super) fn arg(&mut self, arg: &[u8]) {
        self.head(b'$', arg.len());
        self.bytes.extend_from_slice(arg);
        self.bytes.extend_from_slice(b"\r\n");
    }

    /// An argument made of `parts`, side by side, with no buffer of its own in between.
    pub(super) fn arg_of(&mut self, parts: &[&[u8]]) {
        self.head(b'$', parts.iter().map(|p| p.len()).sum());
        for part in parts {
            self.bytes.extend_from_slice(part);
        }
        self.bytes.extend_from_slice(b"\r\n");
    }

    pub(super) fn int(&mut self, n: u64) {
        self.arg(itoa::Buffer::new().format(n).as_bytes());
    }

    fn head(&mut self, kind: u8, n: usize) {
        self.bytes.push(kind);
        self.bytes
            .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        self.bytes.extend_from_slice(b"\r\n");
    }

    /// The commands written so far, as RESP.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How many commands: the replies to wait for.
    pub(super) fn commands(&self) -> usize {
        self.commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_its_commands_in_resp() {
        let mut r = Request::default();
        r.command(3);
        r.arg(b"SET");
        r.arg_of(&[b"{", b"k", b"}:h"]);
        r.int(1234);
        r.command(1);
        r.arg(b"");
        assert_eq!(
            r.bytes(),
            b"*3\r\n$3\r\nSET\r\n$5\r\n{k}:h\r\n$4\r\n1234\r\n*1\r\n$0\r\n\r\n"
        );
        assert_eq!(r.commands(), 2);
        assert_eq!(
            command("SUBSCRIBE", &["a".to_owned()]),
            b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n"
        );
    }

    const MESSAGE: &[u8] = b"*3\r\n$7\r\nmessage\r\n$6\r\np:u:ab\r\n$5\r\nhe\r\no\r\n";

    #[test]
    fn a_message_is_its_channel_and_payload_in_place() {
        let (reply, used) = parse(MESSAGE).expect("valid").expect("complete");
        assert_eq!(
            reply,
            Reply::Message {
                channel: b"p:u:ab",
                payload: b"he\r\no"
            }
        );
        assert_eq!(used, MESSAGE.len());
    }

    #[test]
    fn an_incomplete_reply_waits_for_more_at_every_cut() {
        for cut in 0..MESSAGE.len() {
            assert_eq!(parse(&MESSAGE[..cut]), Ok(None), "cut at {cut}");
        }
        let mut two = MESSAGE.to_vec();
        two.extend_from_slice(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:2\r\n");
        let (_, used) = parse(&two).expect("valid").expect("complete");
        assert_eq!(
            parse(&two[used..]),
            Ok(Some((Reply::Subscribed, two.len() - used)))
        );
    }

    #[test]
    fn acknowledgements_errors_and_others() {
        let cases: [(&[u8], Reply<'_>); 6] = [
            (
                b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nc\r\n:0\r\n",
                Reply::Unsubscribed,
            ),
            (
                b"*3\r\n$10\r\nssubscribe\r\n$1\r\nc\r\n:1\r\n",
                Reply::Subscribed,
            ),
            (b"-NOPERM no\r\n", Reply::Error(b"NOPERM no")),
            (b"+OK\r\n", Reply::Other),
            (b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", Reply::Other),
            (b"*-1\r\n", Reply::Other),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse(bytes), Ok(Some((want, bytes.len()))));
        }
    }

    #[test]
    fn what_is_not_resp_is_malformed() {
        for bad in [
            &b"?x\r\n"[..],
            b"*x\r\n",
            b"*1\r\n*1\r\n:1\r\n",
            b"*1\r\n$3\r\nabcd\r\n",
            b"+OK\rX",
        ] {
            assert_eq!(parse(bad), Err(Malformed), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// The short reader answers as the general one wherever it answers: bulk strings of
        /// digits, `\r`, `\n` and other bytes, whole, cut, or with a wrong length.
        #[test]
        fn short_bulks_read_as_any_element(
            data in proptest::collection::vec(proptest::sample::select(&b"ab\r\n$0"[..]), 0..12),
            len in 0usize..14,
            digits in proptest::option::of("[0-9]{1,7}"),
            cut in 0usize..32,
        ) {
            let whole = digits.is_none() && data.len() == len;
            let digits = digits.unwrap_or_else(|| len.to_string());
            let mut buf = format!("${digits}\r\n").into_bytes();
            buf.extend_from_slice(&data);
            buf.extend_from_slice(b"\r\n");
            let full = buf.len();
            buf.truncate(cut.max(1));
            if let Some((bulk, next)) = short_bulk(&buf, 0) {
                proptest::prop_assert_eq!(element(&buf, 0), Ok(Some((Some(bulk), next))));
            }
            if whole && buf.len() == full && full >= 8 {
                proptest::prop_assert_eq!(short_bulk(&buf, 0), Some((&data[..], full)), "a whole short bulk string takes the short path");
            }
        }

        /// No bytes from Redis panic the parser, and a reply never claims more than it got.
        #[test]
        fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Ok(Some((_, used))) = parse(&bytes) {
                proptest::prop_assert!(used <= bytes.len());
            }
        }

        /// Any payload (CRLF and all) comes back byte for byte, complete or waiting for more.
        #[test]
        fn any_payload_comes_back_as_sent(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), cut in 0usize..400) {
            let mut bytes = format!("*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n${}\r\n", payload.len()).into_bytes();
            bytes.extend_from_slice(&payload);
            bytes.extend_from_slice(b"\r\n");
            let cut = cut.min(bytes.len());
            if cut < bytes.len() {
                proptest::prop_assert_eq!(parse(&bytes[..cut]), Ok(None));
            }
            let want = Reply::Message { channel: b"ch", payload: &payload };
            proptest::prop_assert_eq!(parse(&bytes), Ok(Some((want, bytes.len()))));
        }
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            command("SUBSCRIBE", &["a".into(), "bc".into()]),
            b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$2\r\nbc\r\n"
        );
    }
}
