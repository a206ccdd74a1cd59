//! Why a connection ends: the one table of close codes, their reasons and their metric labels.
//!
//! | code | reason text            | when                                                        | client should |
//! |------|------------------------|-------------------------------------------------------------|---------------|
//! | 1000 | (none)                 | the client closed, or the gateway answers a client close    | nothing       |
//! | 1002 | `protocol error`       | the client broke RFC 6455 (unmasked frame, reserved opcode or bits, bad fragmentation) | fix the client |
//! | 1007 | `invalid utf-8`        | a text frame was not UTF-8                                  | fix the client |
//! | 1008 | `too many topics`      | the connection asked for more than `--max-topics` topics    | subscribe less |
//! | 1008 | `too many frames`      | the client sent faster than `--max-frames-per-second` (after its burst) | send less |
//! | 1008 | `credentials revoked`  | `POST /api/v1/revocations` named the user or the key        | log in again  |
//! | 1009 | `frame too large`      | a client frame exceeded `--max-frame-size`                  | send less     |
//! | 1011 | `internal error`       | the gateway could not serve the connection                  | reconnect     |
//! | 1012 | `service restart`      | the node is draining (SIGTERM); spread over the drain window | reconnect     |
//! | 4000 | `ping timeout`         | the peer stopped answering pings                            | reconnect     |
//! | 4008 | `slow consumer`        | the outbound queue was full: the client did not read        | reconnect     |
//! | 4008 | `write timeout`        | one socket write (message, ping) took over `--write-timeout` | reconnect     |
//!
//! Authentication failures never appear here: they are answered with HTTP 401/403/503 before the
//! upgrade, so a client never sees an accepted socket closed for an auth reason, except when its
//! credential is explicitly revoked afterwards (1008).

/// Why a connection was closed; each maps to a close code and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed the socket or the stream ended.
    Client,
    /// The outbound queue overflowed.
    SlowConsumer,
    /// No pong (or any frame) within the ping window.
    PingTimeout,
    /// A client frame exceeded the configured maximum.
    FrameTooLarge,
    /// The node is shutting down.
    Drain,
    /// An I/O error, or anything else the gateway could not handle.
    Error,
    /// The client broke the WebSocket protocol.
    Protocol,
    /// A text frame was not UTF-8.
    InvalidUtf8,
    /// More than `--max-topics` topics on one connection.
    TooManyTopics,
    /// Frames faster than `--max-frames-per-second`, burst spent.
    FrameRate,
    /// A socket write did not finish within `--write-timeout`.
    WriteTimeout,
    /// The connection's user or credential was revoked.
    Revoked,
}

impl CloseReason {
    pub const ALL: [CloseReason; 12] = [
        CloseReason::Client,
        CloseReason::SlowConsumer,
        CloseReason::PingTimeout,
        CloseReason::FrameTooLarge,
        CloseReason::Drain,
        CloseReason::Error,
        CloseReason::Protocol,
        CloseReason::InvalidUtf8,
        CloseReason::TooManyTopics,
        CloseReason::FrameRate,
        CloseReason::WriteTimeout,
        CloseReason::Revoked,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::PingTimeout => "ping_timeout",
            CloseReason::FrameTooLarge => "frame_too_large",
            CloseReason::Drain => "drain",
            CloseReason::Error => "error",
            CloseReason::Protocol => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::TooManyTopics => "too_many_topics",
            CloseReason::FrameRate => "frame_rate",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::Revoked => "revoked",
        }
    }

    /// The WebSocket close code sent to the client.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Client => 1000,
            CloseReason::SlowConsumer => 4008,
            CloseReason::PingTimeout => 4000,
            CloseReason::FrameTooLarge => 1009,
            CloseReason::Drain => 1012,
            CloseReason::Error => 1011,
            CloseReason::Protocol => 1002,
            CloseReason::InvalidUtf8 => 1007,
            CloseReason::TooManyTopics | CloseReason::FrameRate => 1008,
            CloseReason::WriteTimeout => 4008,
            CloseReason::Revoked => 1008,
        }
    }

    /// The close frame's reason text.
    pub fn text(self) -> &'static str {
        match self {
            CloseReason::Client => "",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::PingTimeout => "ping timeout",
            CloseReason::FrameTooLarge => "frame too large",
            CloseReason::Drain => "service restart",
            CloseReason::Error => "internal error",
            CloseReason::Protocol => "protocol error",
            CloseReason::InvalidUtf8 => "invalid utf-8",
            CloseReason::TooManyTopics => "too many topics",
            CloseReason::FrameRate => "too many frames",
            CloseReason::WriteTimeout => "write timeout",
            CloseReason::Revoked => "credentials revoked",
        }
    }
}
