//! The members of a flat JSON object, found in one pass over its text: each known key's value
//! as raw text, for its caller to read. No I/O.
//!
//! Why: a publish request names up to 10,000 users, and serde_json went over its `userIds`
//! array twice (once to check the request as JSON, once to read the ids): the request's
//! handler ran about 600 of the node's 3,400 instructions per delivery, 420 once read in one
//! pass (callgrind, `loadtest/instructions.sh`). The scan here only finds where
//! each value begins and ends; the caller checks every value it takes (serde_json for the
//! small ones, its own strict reader for the ids), so nothing the scan lets through is read
//! unchecked.
//!
//! It answers `None` for anything but the plain shape: an unknown or repeated key, a key with
//! an escape, text after the object. The caller then reads the request with serde_json, which
//! also words the error.

/// For each name in `names`, the raw text of its value (`None` where the object lacks it);
/// `None` if `text` is not one object whose keys are all in `names`, each once, without
/// escapes.
pub fn members<'a, const N: usize>(
    text: &'a str,
    names: [&str; N],
) -> Option<[Option<&'a str>; N]> {
    let b = text.as_bytes();
    let mut found = [None; N];
    let mut i = space(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = space(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return (space(b, i + 1) == b.len()).then_some(found);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = i + 1 + b.get(i + 1..)?.iter().position(|&c| c == b'"')?;
        let key = text.get(i + 1..key_end)?;
        let slot = names.iter().position(|&n| n == key)?;
        if found[slot].is_some() {
            return None;
        }
        i = space(b, key_end + 1);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let start = space(b, i + 1);
        let end = value_end(b, start)?;
        found[slot] = Some(text.get(start..end)?);
        i = space(b, end);
        match b.get(i) {
            Some(b',') => i = space(b, i + 1),
            Some(b'}') => return (space(b, i + 1) == b.len()).then_some(found),
            _ => return None,
        }
    }
}

/// The first index from `i` that is not JSON whitespace (space, tab, line feed, carriage
/// return; not the form feed `u8::is_ascii_whitespace` also takes).
pub fn space(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// Where the value that starts at `i` ends (exclusive): a string to its closing quote, an
/// object or array to its matching bracket, anything else to the next delimiter. `None` if the
/// text ends first or there is no value. Not a check: the caller reads the value.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match *b.get(j)? {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let n = b[i..]
                .iter()
                .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(b.len() - i);
            (n > 0).then_some(i + n)
        }
    }
}

/// The end (exclusive) of the string whose opening quote is at `i`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j = stop(b, j)?;
        match b[j] {
            b'"' => return Some(j + 1),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
}

/// One in every byte of a word.
const ONES: u64 = 0x0101_0101_0101_0101;

/// The first index from `i` of a byte that can end a plain JSON string: a quote, a backslash or
/// a control character (below 0x20, not allowed raw in a string). Eight bytes at a time: the
/// user ids of a publish request are most of its bytes.
pub fn stop(b: &[u8], mut i: usize) -> Option<usize> {
    while let Some(word) = b.get(i..).and_then(<[u8]>::first_chunk::<8>) {
        let v = u64::from_le_bytes(*word);
        // The top bit of each byte that is zero in `x`, exact up to the first such byte.
        let zero = |x: u64| x.wrapping_sub(ONES) & !x & (ONES * 0x80);
        let control = v.wrapping_sub(ONES * 0x20) & !v & (ONES * 0x80);
        let hits =
            zero(v ^ (ONES * u64::from(b'"'))) | zero(v ^ (ONES * u64::from(b'\\'))) | control;
        if hits != 0 {
            return Some(i + hits.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    b.get(i..)?
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|k| i + k)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 3] = ["a", "b", "c"];

    #[test]
    fn finds_each_members_raw_value() {
        let text = r#" { "a" : [1, {"x": "]}\"}"}, 2] ,"c":"q\"}" , "b":true}  "#;
        assert_eq!(
            members(text, NAMES),
            Some([
                Some(r#"[1, {"x": "]}\"}"}, 2]"#),
                Some("true"),
                Some(r#""q\"}""#)
            ])
        );
        assert_eq!(members("{}", NAMES), Some([None, None, None]));
        assert_eq!(
            members(r#"{"b":null}"#, NAMES),
            Some([None, Some("null"), None])
        );
        assert_eq!(
            members(r#"{"a":-1.5e3}"#, NAMES),
            Some([Some("-1.5e3"), None, None])
        );
    }

    #[test]
    fn a_string_stops_at_its_first_quote_escape_or_control_character() {
        let naive = |b: &[u8], i: usize| {
            (i..b.len()).find(|&k| b[k] == b'"' || b[k] == b'\\' || b[k] < 0x20)
        };
        let mut text = b"abcdefghijklmnopqrstuvwxyz0123456789\xc3\xa9\xff~".to_vec();
        for special in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
            for at in 0..text.len() {
                let saved = text[at];
                text[at] = special;
                for from in 0..=text.len() {
                    assert_eq!(
                        stop(&text, from),
                        naive(&text, from),
                        "{special} at {at} from {from}"
                    );
                }
                text[at] = saved;
            }
        }
        assert_eq!(stop(&text, 0), None);
        assert_eq!(stop(b"ab", 3), None);
    }

    #[test]
    fn anything_but_the_plain_shape_is_left_to_serde_json() {
        for text in [
            "",
            "[]",
            r#"{"a":1,}"#,
            r#"{"a":1} x"#,
            r#"{"a":1 "b":2}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"d":1}"#,
            r#"{"\u0061":1}"#,
            r#"{"a":}"#,
            r#"{"a" 1}"#,
            r#"{"a":[1,2}"#,
            r#"{"a":"open}"#,
            r#"{"a":1"#,
            "{",
        ] {
            assert_eq!(members(text, NAMES), None, "{text}");
        }
    }
}
