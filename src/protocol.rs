//! Wire formats, with no I/O: client frames on `/notws` and `/chat`, and the broker envelope.
//!
//! The envelope is what travels on a broker channel. It is encoded once by the publisher and
//! decoded once per node; the frame inside it is sliced out without copying, so every local
//! recipient is handed the same shared bytes.
//!
//! ```text
//! offset  size  field
//! 0       1     version (1)
//! 1       1     kind: 1 notification, 2 chat, 3 canary
//! 2       8     published_at, microseconds since the Unix epoch, big endian
//! 10      2     topic length T, big endian (0 for chat and canary)
//! 12      T     topic, UTF-8
//! 12+T    ..    frame: the exact text frame sent to clients, UTF-8
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// The two WebSocket endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// Moqui notifications: `/notws`.
    Notws,
    /// GrowERP chat: `/chat`.
    Chat,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Notws => "notws",
            Endpoint::Chat => "chat",
        }
    }
}

/// The topic that matches every notification, as Moqui's listener defines it.
pub const ALL_TOPICS: &str = "ALL";

/// A `/notws` client command (Moqui NotificationEndpoint semantics).
#[derive(Debug, PartialEq, Eq)]
pub enum NotwsCommand<'a> {
    Subscribe(Vec<&'a str>),
    Unsubscribe(Vec<&'a str>),
    /// Anything else: Moqui logs "Unknown command prefix" and keeps the connection.
    Unknown,
}

/// Parses one `/notws` text frame. Topics are comma separated and trimmed; empty items are
/// skipped. The prefixes are case-sensitive, exactly as in Moqui.
pub fn parse_notws(text: &str) -> NotwsCommand<'_> {
    fn topics(list: &str) -> Vec<&str> {
        list.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect()
    }
    if let Some(rest) = text.strip_prefix("subscribe:") {
        NotwsCommand::Subscribe(topics(rest))
    } else if let Some(rest) = text.strip_prefix("unsubscribe:") {
        NotwsCommand::Unsubscribe(topics(rest))
    } else {
        NotwsCommand::Unknown
    }
}

/// Why a `/chat` frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFrameError {
    /// Not JSON, or JSON that is not an object.
    InvalidJson,
    /// No `chatRoom.chatRoomId` string.
    NoRoom,
}

/// A chat message from a client, ready to be forwarded.
#[derive(Debug)]
pub struct ChatFrame {
    pub room_id: String,
    /// The frame recipients receive: the sender's JSON, in the sender's shape (flat or wrapped),
    /// with `fromUserId` set to the authenticated sender.
    pub frame: String,
}

/// Parses a GrowERP ChatMessage, flat (`{"chatRoom": {...}, ...}`) or wrapped
/// (`{"chatMessage": {...}}`), and overwrites `fromUserId` with the authenticated user: a client
/// can never speak for someone else.
pub fn parse_chat(text: &str, from_user_id: &str) -> Result<ChatFrame, ChatFrameError> {
    let mut value: Value = serde_json::from_str(text).map_err(|_| ChatFrameError::InvalidJson)?;
    let root = value.as_object_mut().ok_or(ChatFrameError::InvalidJson)?;
    let message: &mut Map<String, Value> = if root.contains_key("chatMessage") {
        root.get_mut("chatMessage")
            .and_then(Value::as_object_mut)
            .ok_or(ChatFrameError::InvalidJson)?
    } else {
        root
    };
    let room_id = message
        .get("chatRoom")
        .and_then(|r| r.get("chatRoomId"))
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or(ChatFrameError::NoRoom)?
        .to_owned();
    message.insert(
        "fromUserId".to_owned(),
        Value::String(from_user_id.to_owned()),
    );
    let frame = serde_json::to_string(&value).map_err(|_| ChatFrameError::InvalidJson)?;
    Ok(ChatFrame { room_id, frame })
}

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Notification = 1,
    Chat = 2,
    /// A node's own liveness probe through the broker; never delivered to clients.
    Canary = 3,
    /// A credential revocation for every node (topic `user` or `key`, frame the user id or the
    /// credential's hex SHA-256); never delivered to clients.
    Revoke = 4,
}

const VERSION: u8 = 1;
const HEADER: usize = 12;

/// Microseconds since the Unix epoch, the envelope's clock.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Encodes an envelope. Called once per publish, whatever the number of channels.
pub fn encode(kind: Kind, topic: &str, frame: &[u8]) -> Bytes {
    encode_at(kind, topic, frame, now_micros())
}

pub fn encode_at(kind: Kind, topic: &str, frame: &[u8], published_at: u64) -> Bytes {
    let topic = &topic.as_bytes()[..topic.len().min(u16::MAX as usize)];
    let mut buf = BytesMut::with_capacity(HEADER + topic.len() + frame.len());
    buf.put_u8(VERSION);
    buf.put_u8(kind as u8);
    buf.put_u64(published_at);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    buf.put_slice(frame);
    buf.freeze()
}

/// A server's WebSocket ping with no payload (RFC 6455 §5.5.2; server frames are not masked).
pub const PING_FRAME: [u8; 2] = [0x89, 0x00];

/// Bytes of a server text frame's header at most (opcode byte, 127, a 64-bit length).
pub const MAX_FRAME_HEADER: usize = 10;

/// Appends a server's text frame carrying `payload`: final, unmasked (RFC 6455 §5.2), so the
/// same bytes serve every recipient.
pub fn put_text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// A decoded envelope. `frame` shares the received buffer.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub kind: Kind,
    pub published_at: u64,
    pub topic: Utf8Bytes,
    pub frame: Utf8Bytes,
}

/// Why an envelope could not be decoded (a foreign publisher on our prefix, or corruption).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope too short")]
    Short,
    #[error("unknown envelope version or kind")]
    Unknown,
    #[error("envelope text is not UTF-8")]
    NotUtf8,
}

pub fn decode(payload: Bytes) -> Result<Envelope, EnvelopeError> {
    if payload.len() < HEADER {
        return Err(EnvelopeError::Short);
    }
    if payload[0] != VERSION {
        return Err(EnvelopeError::Unknown);
    }
    let kind = match payload[1] {
        1 => Kind::Notification,
        2 => Kind::Chat,
        3 => Kind::Canary,
        4 => Kind::Revoke,
        _ => return Err(EnvelopeError::Unknown),
    };
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&payload[2..10]);
    let published_at = u64::from_be_bytes(ts);
    let topic_len = u16::from_be_bytes([payload[10], payload[11]]) as usize;
    if payload.len() < HEADER + topic_len {
        return Err(EnvelopeError::Short);
    }
    let topic = Utf8Bytes::try_from(payload.slice(HEADER..HEADER + topic_len))
        .map_err(|_| EnvelopeError::NotUtf8)?;
    let frame = Utf8Bytes::try_from(payload.slice(HEADER + topic_len..))
        .map_err(|_| EnvelopeError::NotUtf8)?;
    Ok(Envelope {
        kind,
        published_at,
        topic,
        frame,
    })
}

/// Reads the `topic` of a Moqui wrapped notification without rebuilding the object.
pub fn notification_topic(raw: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Topic {
        topic: Option<Value>,
    }
    let t: Topic = serde_json::from_str(raw).ok()?;
    match t.topic? {
        Value::String(s) if !s.trim().is_empty() => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_frames_carry_their_length_in_the_shortest_form() {
        for (len, header) in [
            (0usize, vec![0x81, 0]),
            (125, vec![0x81, 125]),
            (126, vec![0x81, 126, 0, 126]),
            (65_535, vec![0x81, 126, 0xff, 0xff]),
            (65_536, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let payload = vec![b'x'; len];
            let mut out = Vec::new();
            put_text_frame(&mut out, &payload);
            assert!(header.len() <= MAX_FRAME_HEADER);
            assert_eq!(&out[..header.len()], &header[..], "length {len}");
            assert_eq!(&out[header.len()..], &payload[..], "length {len}");
        }
    }

    #[test]
    fn subscribe_trims_and_skips_empty_items() {
        assert_eq!(
            parse_notws("subscribe: A, ,B ,,  C"),
            NotwsCommand::Subscribe(vec!["A", "B", "C"])
        );
        assert_eq!(
            parse_notws("subscribe: ALL"),
            NotwsCommand::Subscribe(vec!["ALL"])
        );
        assert_eq!(
            parse_notws("unsubscribe:A"),
            NotwsCommand::Unsubscribe(vec!["A"])
        );
        assert_eq!(parse_notws("subscribe:"), NotwsCommand::Subscribe(vec![]));
    }

    #[test]
    fn unknown_prefixes_are_unknown() {
        assert_eq!(parse_notws("Subscribe: A"), NotwsCommand::Unknown);
        assert_eq!(parse_notws(" subscribe: A"), NotwsCommand::Unknown);
        assert_eq!(parse_notws("hello"), NotwsCommand::Unknown);
    }

    #[test]
    fn chat_flat_and_wrapped_get_the_real_sender() {
        let flat = parse_chat(
            r#"{"chatRoom":{"chatRoomId":"R1"},"content":"hi","fromUserId":"mallory"}"#,
            "alice",
        )
        .expect("flat message parses");
        assert_eq!(flat.room_id, "R1");
        let v: Value = serde_json::from_str(&flat.frame).expect("json");
        assert_eq!(v["fromUserId"], "alice");
        assert_eq!(v["content"], "hi");

        let wrapped = parse_chat(
            r#"{"chatMessage":{"chatRoom":{"chatRoomId":"R2"},"content":"yo"}}"#,
            "bob",
        )
        .expect("wrapped message parses");
        assert_eq!(wrapped.room_id, "R2");
        let v: Value = serde_json::from_str(&wrapped.frame).expect("json");
        assert_eq!(v["chatMessage"]["fromUserId"], "bob");
    }

    #[test]
    fn chat_errors() {
        assert_eq!(
            parse_chat("not json", "a").unwrap_err(),
            ChatFrameError::InvalidJson
        );
        assert_eq!(
            parse_chat("[1,2]", "a").unwrap_err(),
            ChatFrameError::InvalidJson
        );
        assert_eq!(
            parse_chat(r#"{"content":"x"}"#, "a").unwrap_err(),
            ChatFrameError::NoRoom
        );
        assert_eq!(
            parse_chat(r#"{"chatRoom":{"chatRoomId":7}}"#, "a").unwrap_err(),
            ChatFrameError::NoRoom
        );
        assert_eq!(
            parse_chat(r#"{"chatMessage":"x"}"#, "a").unwrap_err(),
            ChatFrameError::InvalidJson
        );
    }

    #[test]
    fn envelope_round_trip_shares_the_buffer() {
        let frame = br#"{"topic":"T","title":"x"}"#;
        let bytes = encode_at(Kind::Notification, "T", frame, 42);
        let env = decode(bytes.clone()).expect("decodes");
        assert_eq!(env.kind, Kind::Notification);
        assert_eq!(env.published_at, 42);
        assert_eq!(env.topic.as_str(), "T");
        assert_eq!(env.frame.as_str().as_bytes(), frame);
        let frame_bytes: Bytes = env.frame.into();
        // Same allocation: the frame is a slice of the received payload.
        assert_eq!(
            frame_bytes.as_ptr(),
            bytes[bytes.len() - frame.len()..].as_ptr()
        );
    }

    #[test]
    fn envelope_rejects_garbage() {
        assert_eq!(
            decode(Bytes::from_static(b"x")).unwrap_err(),
            EnvelopeError::Short
        );
        assert_eq!(
            decode(Bytes::from_static(b"\x09\x01\0\0\0\0\0\0\0\0\0\0")).unwrap_err(),
            EnvelopeError::Unknown
        );
        assert_eq!(
            decode(Bytes::from_static(b"\x01\x01\0\0\0\0\0\0\0\0\0\x05ab")).unwrap_err(),
            EnvelopeError::Short
        );
    }

    #[test]
    fn topic_of_a_notification() {
        assert_eq!(
            notification_topic(r#"{"topic":"Orders","x":1}"#).as_deref(),
            Some("Orders")
        );
        assert_eq!(notification_topic(r#"{"topic":""}"#), None);
        assert_eq!(notification_topic(r#"{"topic":5}"#), None);
        assert_eq!(notification_topic(r#"{"x":1}"#), None);
    }
}
