//! Reading a channel's history after a position: what a resumed connection missed
//! (`hub/resume.rs`). The broker returns opaque payloads with their positions, oldest first;
//! it does not know who asked or why.

use bytes::Bytes;

use super::history::{self, StreamId};
use super::redis::RedisBroker;
use super::{Broker, BrokerError};

/// Most entries one read returns: a resume replays at most this many messages per channel.
pub const MAX_REPLAY: usize = 10_000;

impl Broker {
    /// The messages recorded on `channel` after `after`, oldest first (empty without history).
    pub async fn history_after(
        &self,
        channel: &str,
        after: StreamId,
    ) -> Result<Vec<(StreamId, Bytes)>, BrokerError> {
        match self {
            Broker::Memory(b) => {
                let mut v = b.history(channel, after);
                v.truncate(MAX_REPLAY);
                Ok(v)
            }
            Broker::Redis(b) => b.history_after(channel, after).await,
        }
    }
}

impl RedisBroker {
    async fn history_after(
        &self,
        channel: &str,
        after: StreamId,
    ) -> Result<Vec<(StreamId, Bytes)>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(history::key(channel))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(MAX_REPLAY);
        let (entries,): (Vec<(String, Vec<Vec<u8>>)>,) = self.query(&pipe).await?;
        Ok(entries
            .into_iter()
            .filter_map(|(id, mut fields)| {
                let id = StreamId::parse(id.as_bytes())?;
                (fields.len() >= 2).then(|| (id, Bytes::from(fields.swap_remove(1))))
            })
            .collect())
    }
}
