//! The registry: users → connections → topic filters, the tenants' users, the node's channels.
//! One plain mutex guards it, never held across an `.await`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::channel::ChannelNames;
use super::channels::Channels;
use super::outbound::Outbound;
use crate::broker::StreamId;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::protocol::{self, Endpoint};

/// What the session holds of its connection. The outbound queue comes first, so that its hot
/// fields share cache lines with the `Arc`'s reference counts (`outbound.rs`, `QueueState`).
#[repr(C)]
pub struct Connection {
    pub outbound: Outbound,
    pub id: u64,
    pub endpoint: Endpoint,
    pub identity: Identity,
    /// SHA-256 of the credential the connection authenticated with (as the auth cache keys
    /// it), so that a revoked key closes exactly its sockets.
    pub credential: Option<[u8; 32]>,
    /// When the peer last sent anything (ms since the epoch), for the node's ping sweep.
    pub(super) last_seen: AtomicU64,
    /// Its resume key and, once drained, where it stopped (`resume.rs`).
    pub(super) resume: super::resume::ConnResume,
}

pub(super) type FastHash = foldhash::fast::RandomState;

pub(super) fn now_ms() -> u64 {
    protocol::now_micros() / 1000
}

impl Connection {
    /// Records that the peer is alive (any frame, pongs included).
    pub fn touch(&self) {
        self.last_seen.store(now_ms(), Ordering::Relaxed);
    }
}

/// A connection's topics; `ALL` matches everything.
#[derive(Default)]
pub(super) struct TopicFilter {
    /// `ALL` is subscribed: the common GrowERP case costs no hashing per delivery.
    pub(super) all: bool,
    /// An empty set allocates nothing.
    pub(super) topics: TopicSet,
    /// Whether the topics were sent by the client or restored (`remembered.rs`).
    pub(super) origin: super::remembered::TopicOrigin,
}

impl TopicFilter {
    pub(super) fn matches(&self, topic: &str) -> bool {
        self.all || self.topics.contains(topic)
    }
}

/// A connection's named topics, behind one pointer. Inline, a set is 48 bytes of every user
/// entry in the user table, and most connections name none (GrowERP's `ALL` is a flag, chat
/// names none): the pointer keeps the entry, key included, at 96 bytes, two cache lines that
/// the fan-out fetches for every recipient (`users.rs`).
#[derive(Default)]
// The box is the point: one pointer in the entry instead of the set's 48 bytes.
#[allow(clippy::box_collection)]
pub(super) struct TopicSet(Option<Box<HashSet<Box<str>>>>);

impl TopicSet {
    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.len())
    }

    pub(super) fn contains(&self, topic: &str) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(topic))
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Box<str>> + '_ {
        self.0.iter().flat_map(|s| s.iter())
    }

    /// The set to change; [`shrink`](Self::shrink) afterwards gives an emptied one back.
    pub(super) fn edit(&mut self) -> &mut HashSet<Box<str>> {
        self.0.get_or_insert_default()
    }

    pub(super) fn extend(&mut self, topics: impl IntoIterator<Item = Box<str>>) {
        self.edit().extend(topics);
        self.shrink();
    }

    /// Frees an empty set: an idle connection should cost as little as possible.
    pub(super) fn shrink(&mut self) {
        if self.0.as_ref().is_some_and(|s| s.is_empty()) {
            self.0 = None;
        }
    }

    pub(super) fn clear(&mut self) {
        self.0 = None;
    }
}

/// The position of the last message delivered on a channel, in 16 bytes rather than an
/// `Option`'s 24: no message is ever at `0-0` (Redis refuses that id, and the in-process
/// broker's ids start at the clock), so `0-0` stands for "none yet".
#[derive(Clone, Copy, Default)]
pub(super) struct Position(StreamId);

impl Position {
    pub(super) fn get(self) -> Option<StreamId> {
        (self.0 != StreamId::default()).then_some(self.0)
    }

    pub(super) fn set(&mut self, p: Option<StreamId>) {
        self.0 = p.unwrap_or_default();
    }

    /// Runs `f` on the position as an `Option` (what the broker's judging takes) and keeps
    /// what it leaves.
    pub(super) fn with<R>(&mut self, f: impl FnOnce(&mut Option<StreamId>) -> R) -> R {
        let mut p = self.get();
        let r = f(&mut p);
        self.set(p);
        r
    }
}

pub(super) struct ConnEntry {
    /// The connection's endpoint, copied here (8 bytes with the alignment) so that the fan-out
    /// skips other endpoints' connections without reading them.
    pub(super) endpoint: Endpoint,
    pub(super) conn: Arc<Connection>,
    pub(super) topics: TopicFilter,
}

pub(super) struct UserEntry {
    /// Most users hold one connection, kept inside the entry: a delivery reads no other block
    /// to find it.
    pub(super) conns: smallvec::SmallVec<[ConnEntry; 1]>,
    pub(super) tenant: Option<Arc<str>>,
    /// Position of the last message this node delivered on the user's channel.
    pub(super) position: Position,
}

#[derive(Default)]
pub(super) struct TenantEntry {
    pub(super) users: HashSet<Arc<str>>,
    /// Position of the last message this node delivered on the tenant's channel.
    pub(super) position: Position,
}

#[derive(Default)]
pub(super) struct Inner {
    /// Looked up once per delivery (`users.rs`).
    pub(super) users: super::users::Users,
    pub(super) tenants: HashMap<Arc<str>, TenantEntry, FastHash>,
    /// Position of the last message this node delivered on the everyone channel.
    pub(super) everyone_position: Position,
    pub(super) channels: Channels,
    pub(super) connections: usize,
    /// Writers owed a wake-up by the fan-out since the broker's last flush (`fanout.rs`).
    pub(super) wakes: Vec<Arc<Connection>>,
    /// The fan-out's metrics since the broker's last flush, added to the registry's at the
    /// flush (`fanout.rs`).
    pub(super) tally: super::fanout::Tally,
    /// The broker payloads decoded last and their envelopes (`fanout.rs`).
    pub(super) decoded: super::fanout::Decoded,
    /// How much of the broker reader's time its writes took lately (`fanout.rs`).
    pub(super) write_load: super::fanout::WriteLoad,
}

/// The registry is the broker's [`MessageSink`](crate::broker::MessageSink): it owns no broker, so
/// there is no cycle.
pub struct Registry {
    pub(super) inner: Mutex<Inner>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) names: ChannelNames,
    pub(super) on_revoke: std::sync::OnceLock<super::RevokeHook>,
    /// Revocations applied so far; a handshake that saw it change while it was authenticating
    /// checks its credential again (see [`Hub::revocations`](super::Hub::revocations)).
    pub(super) revocations: AtomicU64,
    /// The connections by ping slot, for the heartbeat (`sweep.rs`).
    pub(super) ping_slots: super::sweep::PingSlots,
}
