//! The publisher's own connection to a single server or to the master the Sentinels name: a
//! round trip's commands are written as RESP into one buffer (`resp::Request`) and sent in one
//! write, and their replies are counted off the bytes read (`subscription::Replies::answers`).
//!
//! Why: through the `redis` crate every recipient's history key was copied into a command
//! object, again into its pipeline's buffer and again into the connection's, and the round trip
//! ran through the connection's driver task. Writing the calls here saved 100 to 170 of about
//! 3,150 instructions per delivery of a notification to 1,000 users (two callgrind runs); in
//! alternated pairs the user CPU per delivery fell to 0.91 of what it was. The connection
//! reuses what the pub/sub reader already has (TCP or TLS, AUTH) and adds SELECT, since the
//! history streams live in the URL's database.
//! A Redis Cluster keeps the crate's cluster connection, which routes each slot's calls.
//!
//! One round trip at a time: the publisher has one flushing task. A round trip that fails in
//! any way (a timeout, a broken connection, an error reply other than a missing script) drops
//! the connection, and the next one connects again, asking the Sentinels anew: after a
//! failover the old master answers writes with `READONLY`.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio_rustls::rustls;

use super::connect::Endpoint;
use super::redis::timed;
use super::resp::Request;
use super::subscription::{self, Commands, Replies};
use super::{BrokerError, Outage};

pub(super) struct PublishConnection {
    endpoint: Arc<Endpoint>,
    roots: Option<Arc<rustls::RootCertStore>>,
    /// The open connection; taken by a round trip, put back when it went well.
    open: Mutex<Option<(Commands, Replies)>>,
}

impl PublishConnection {
    pub(super) fn new(
        endpoint: Arc<Endpoint>,
        roots: Option<Arc<rustls::RootCertStore>>,
    ) -> PublishConnection {
        PublishConnection {
            endpoint,
            roots,
            open: Mutex::new(None),
        }
    }

    /// Sends the request's commands and reads all their replies: `Err` with the first error
    /// reply among them, or the outage that stopped the round trip.
    pub(super) async fn round_trip(&self, request: &Request) -> Result<(), BrokerError> {
        let taken = self.open.lock().take();
        let (mut commands, mut replies) = match taken {
            Some(open) => open,
            None => self.connect().await?,
        };
        let result = timed(exchange(&mut commands, &mut replies, request)).await;
        let keep = match &result {
            Ok(()) => true,
            Err(BrokerError::Unavailable(Outage::Redis(e))) => e.code() == Some("NOSCRIPT"),
            Err(_) => false,
        };
        if keep {
            *self.open.lock() = Some((commands, replies));
        }
        result
    }

    async fn connect(&self) -> Result<(Commands, Replies), BrokerError> {
        let client = timed(self.endpoint.client()).await?;
        let info = client.get_connection_info();
        let (mut commands, mut replies) =
            timed(subscription::connect(info, self.roots.clone())).await?;
        let db = info.redis_settings().db();
        if db != 0 {
            let mut select = Request::default();
            select.command(2);
            select.arg(b"SELECT");
            select.int(db.unsigned_abs());
            timed(exchange(&mut commands, &mut replies, &select)).await?;
        }
        Ok((commands, replies))
    }
}

/// Sends the request's commands and reads all their replies.
async fn exchange(
    commands: &mut Commands,
    replies: &mut Replies,
    request: &Request,
) -> redis::RedisResult<()> {
    commands.send(request.bytes()).await?;
    replies.answers(request.commands()).await
}
