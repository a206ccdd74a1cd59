//! wsgate: a horizontally scalable WebSocket gateway for Moqui / GrowERP notifications (`/notws`)
//! and chat (`/chat`).
//!
//! # Layout
//!
//! Dependencies point one way: transport ([`server`], [`upgrade`], [`api`]) → [`session`] →
//! [`chat`] → [`hub`] → [`broker`]. Nothing imports [`server`]: the session and the API get
//! narrow handles.
//!
//! - [`config`]: flags and environment, validated before anything binds (exit 64).
//! - [`server`]: the two listeners and routers, the pre-upgrade auth, the node's drain.
//! - [`upgrade`]: the WebSocket handshake, handing the session its TCP socket.
//! - [`api`]: the internal publish and presence API on the admin listener; [`members`]: the
//!   one-pass reader of its requests' common shape.
//! - [`session`]: one WebSocket: read client frames, finish writes the socket did not take at
//!   once, ping, close.
//! - [`chat`]: chat-room look-up and routing of client chat frames.
//! - [`auth`]: API key validation, cached in moka by key hash; bearer-token credentials.
//! - [`backend`]: the Moqui / GrowERP REST calls (Authenticate, ChatRoom).
//! - [`identity`]: who a connection belongs to.
//! - [`hub`]: [`hub::outbound`] (bounded per-connection queues, written straight into the
//!   socket by the fan-out), [`hub::registry`] (users →
//!   connections → topics), typed [`hub::Channel`]s and their reference counts with delayed
//!   release, fan-out, the node's ping sweep and drain.
//! - [`broker`]: the seam between nodes: [`broker::memory`] (one node) and [`broker::redis`]
//!   (publishing by group commit, grouped by channel, in `broker/publisher.rs`; the pub/sub
//!   connection read by the node itself on plain TCP, in `broker/subscription.rs`, its replies
//!   parsed in place by `broker/resp.rs`).
//! - [`protocol`]: wire formats with no I/O: client frames, server text frames, the broker
//!   envelope.
//! - [`metrics`]: one Prometheus registry per node.
//! - [`disconnect`]: the close-code table.
//! - [`demo`]: the built-in demo back-end; [`client`]: a small client for trying it by hand.

pub mod admission;
pub mod api;
pub mod auth;
pub mod backend;
pub mod broker;
pub mod chat;
pub mod client;
pub mod config;
pub mod demo;
pub mod disconnect;
pub mod hub;
pub mod identity;
pub mod members;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod session;
pub mod upgrade;
