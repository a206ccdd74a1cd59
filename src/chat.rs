//! Chat routing: a client's ChatMessage goes to every `/chat` connection of every *other* member
//! of its room, on any node. Room members come from the back-end (asked with the sender's own
//! credential: API key or session cookies) and are cached by room for `--chat-room-ttl`; concurrent look-ups of one room coalesce.

use std::sync::Arc;

use moka::future::Cache;

use crate::backend::{Backend, BackendError, Credential};
use crate::hub::{Channel, Hub};
use crate::metrics::{IgnoredFrame, Metrics};
use crate::protocol::{self, Kind};

pub struct Chat {
    backend: Arc<Backend>,
    rooms: Cache<String, Arc<[String]>>,
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
            metrics,
        }
    }

    async fn members(
        &self,
        room_id: &str,
        credential: &Credential,
    ) -> Result<Arc<[String]>, BackendError> {
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
            .map_err(|e| (*e).clone())?;
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
        let channels: Vec<Channel> = members
            .iter()
            .filter(|m| m.as_str() != sender)
            .map(|m| Channel::User(m))
            .collect();
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
