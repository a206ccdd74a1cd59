//! The WebSocket handshake (RFC 6455 §4.2), answered here rather than by axum's
//! `WebSocketUpgrade`, so that the session gets the TCP socket itself: the fan-out then writes
//! ready-made frames straight into it (`hub/outbound.rs`) instead of waking the session's task
//! for every message.
//!
//! Only what wsgate's clients use is offered: no subprotocol, no extension (a client that asks
//! for `permessage-deflate` gets plain frames, as the RFC allows).

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// A valid upgrade request: its `Sec-WebSocket-Accept` and the connection, once hyper hands it
/// over.
pub struct Upgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Why a request to a WebSocket endpoint is not a WebSocket handshake (the statuses axum's own
/// extractor gives).
fn refuse(status: StatusCode, why: &'static str) -> Response {
    (status, why).into_response()
}

/// Whether a comma-separated header holds `token` (case-insensitive), in any of its values.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        if parts.method != Method::GET {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket handshake is a GET request",
            ));
        }
        if !has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Connection header did not include 'upgrade'",
            ));
        }
        if !has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Upgrade header did not include 'websocket'",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version header did not include '13'",
            ));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY) else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key header missing",
            ));
        };
        let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Key header invalid",
            ));
        };
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ));
        };
        Ok(Upgrade { accept, on_upgrade })
    }
}

impl Upgrade {
    /// The 101 answer. Once the client has it, `then` gets the TCP socket and the bytes the
    /// client already sent behind its handshake (read by hyper with the request), copied out:
    /// hyper hands them over as a slice of its 8 KiB read buffer, which would otherwise stay
    /// allocated for as long as the connection keeps the slice.
    ///
    /// `then` runs in a small task of its own that ends once it returns, so it should spawn
    /// the session rather than run it: the task would otherwise keep the upgrade's state for
    /// the connection's whole life (ARCHITECTURE.md, "Memory per connection").
    pub fn on_upgrade<F>(self, then: F) -> Response
    where
        F: FnOnce(TcpStream, Vec<u8>) + Send + 'static,
    {
        let Upgrade { accept, on_upgrade } = self;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "the upgrade did not complete");
                    return;
                }
            };
            // The public listener serves every connection over `TokioIo<TcpStream>`
            // (server.rs); nothing else can arrive here.
            match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => then(parts.io.into_inner(), parts.read_buf.to_vec()),
                Err(_) => tracing::error!("an upgraded connection is not a TCP socket; dropped"),
            }
        });
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        resp
    }
}
