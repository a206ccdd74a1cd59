//! Chat routing: a client's ChatMessage goes to every `/chat` connection of every *other* member
//! of its room, on any node. Room members come from the back-end (asked with the sender's own
//! credential: API key or session cookies) and are cached by room for `--chat-room-ttl`; concurrent look-ups of one room coalesce.
//! A room the back-end does not know is remembered too (for `--chat-room-ttl`, at most
//! [`UNKNOWN_ROOM_TTL`]), so a client naming a bogus room does not cost a back-end call per frame.

use std::sync::Arc;

use moka::future::Cache;

use crate::backend::{Backend, BackendError, Credential};
use crate::hub::{Channel, Hub};
use crate::metrics::{IgnoredFrame, Metrics};
use crate::protocol::{self, Kind};

/// The longest an unknown room is remembered: a room created meanwhile is usable after this.
pub const UNKNOWN_ROOM_TTL: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Chat {
    backend: Arc<Backend>,
    rooms: Cache<String, Arc<[String]>>,
    /// Rooms the back-end answered "not found" for (negative cache).
    unknown_rooms: Cache<String, ()>,
    metrics: Arc<Metrics>,
}

impl Chat {
    pub fn new(backend: Arc<Backend>, metrics: Arc<Metrics>, ttl: std::time::Duration) -> Chat {
        Chat {
            backend,
            rooms: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            unknown_rooms: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl.min(UNKNOWN_ROOM_TTL))
                .build(),
            metrics,
        }
    }

    async fn members(
        &self,
        room_id: &str,
        credential: &Credential,
    ) -> Result<Arc<[String]>, BackendError> {
        if self.unknown_rooms.contains_key(room_id) {
            self.metrics.room_hit.inc();
            return Err(BackendError::NotFound);
        }
        let entry = self
            .rooms
            .entry_by_ref(room_id)
            .or_try_insert_with(async {
                self.backend
                    .chat_room_members(room_id, credential)
                    .await
                    .map(Arc::from)
            })
            .await
            .map_err(|e| (*e).clone());
        let entry = match entry {
            Ok(entry) => entry,
            Err(BackendError::NotFound) => {
                self.unknown_rooms.insert(room_id.to_owned(), ()).await;
                self.metrics.room_miss.inc();
                return Err(BackendError::NotFound);
            }
            Err(e) => return Err(e),
        };
        if entry.is_fresh() {
            self.metrics.room_miss.inc();
        } else {
            self.metrics.room_hit.inc();
        }
        Ok(entry.into_value())
    }

    /// Routes one client frame. `Err` says why it was dropped; the connection stays open either way.
    pub async fn route(
        &self,
        hub: &Hub,
        text: &str,
        sender: &str,
        credential: &Credential,
    ) -> Result<usize, IgnoredFrame> {
        let frame = protocol::parse_chat(text, sender).map_err(|e| match e {
            protocol::ChatFrameError::InvalidJson => IgnoredFrame::InvalidJson,
            protocol::ChatFrameError::NoRoom => IgnoredFrame::NoRoom,
        })?;
        let members = match self.members(&frame.room_id, credential).await {
            Ok(m) => m,
            Err(BackendError::NotFound) | Err(BackendError::Rejected) => {
                return Err(IgnoredFrame::UnknownRoom)
            }
            Err(_) => return Err(IgnoredFrame::BackendUnavailable),
        };
        if !members.iter().any(|m| m == sender) {
            return Err(IgnoredFrame::NotMember);
        }
        let mut others: Vec<&str> = members
            .iter()
            .map(String::as_str)
            .filter(|m| *m != sender)
            .collect();
        // A member the back-end lists twice still gets the message once.
        others.sort_unstable();
        others.dedup();
        let channels: Vec<Channel> = others.into_iter().map(Channel::User).collect();
        if channels.is_empty() {
            return Ok(0);
        }
        let n = channels.len();
        let payload = protocol::encode(Kind::Chat, "", frame.frame.as_bytes());
        hub.publish(&channels, payload)
            .await
            .map_err(|_| IgnoredFrame::BrokerUnavailable)?;
        Ok(n)
    }
}
