//! Why a connection ends: the one table of close codes, their reasons and their metric labels.
//!
//! | code | reason text            | when                                                        | client should |
//! |------|------------------------|-------------------------------------------------------------|---------------|
//! | 1000 | (none)                 | the client closed, or the gateway answers a client close    | nothing       |
//! | 1008 | `credentials revoked`  | `POST /api/v1/revocations` named the user or the key        | log in again  |
//! | 1009 | `frame too large`      | a client frame exceeded `--max-frame-size`                  | send less     |
//! | 1011 | `internal error`       | the gateway could not serve the connection                  | reconnect     |
//! | 1012 | `service restart`      | the node is draining (SIGTERM); spread over the drain window | reconnect     |
//! | 4000 | `ping timeout`         | the peer stopped answering pings                            | reconnect     |
//! | 4008 | `slow consumer`        | the outbound queue was full: the client did not read        | reconnect     |
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
    /// An I/O or protocol error.
    Error,
    /// The connection's user or credential was revoked.
    Revoked,
}

impl CloseReason {
    pub const ALL: [CloseReason; 7] = [
        CloseReason::Client,
        CloseReason::SlowConsumer,
        CloseReason::PingTimeout,
        CloseReason::FrameTooLarge,
        CloseReason::Drain,
        CloseReason::Error,
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
            CloseReason::Revoked => "credentials revoked",
        }
    }
}
