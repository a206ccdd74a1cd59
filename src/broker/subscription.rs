//! The node's pub/sub connection to one Redis server over plain TCP (a standalone server, or
//! the master the Sentinels name), read by wsgate itself.
//!
//! Why not the `redis` crate's pub/sub: every delivery starts here. The crate parses each
//! message into owned values on its own task and hands it over through a channel, so each
//! message costs several allocations, copies and a task hand-over before the hub sees it. Here
//! the reader's task reads the socket, parses in place (`resp.rs`) and hands the hub slices of
//! the bytes read: a payload is copied once per fan-out (`Reader::share`), not per recipient.
//!
//! - [`Commands`] writes SUBSCRIBE and UNSUBSCRIBE; each call waits for Redis's
//!   acknowledgement, one reply per channel named, or one error for the whole command.
//! - [`Replies`] reads; it answers the acknowledgements in order as it meets them, so they
//!   are answered as long as the reader reads, including while it holds delivery back (a
//!   restore, a catch-up, a gap's recovery).
//! - TLS (`rediss://`) and Unix sockets keep the crate's pub/sub (`connect` answers `None`).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::resp::{self, Reply};

/// Bytes asked of the kernel per read: about 250 notifications of 200 bytes.
const READ_SIZE: usize = 64 * 1024;

/// A command waiting for its acknowledgements.
struct Pending {
    /// Replies still to come: one per channel named.
    left: usize,
    done: oneshot::Sender<redis::RedisResult<()>>,
}

type Acks = Arc<Mutex<VecDeque<Pending>>>;

/// The writing half: SUBSCRIBE and UNSUBSCRIBE, each answered when Redis acknowledged it.
pub(super) struct Commands {
    write: OwnedWriteHalf,
    acks: Acks,
}

/// Messages [`Replies::take`] hands over at a time: the reader looks their channels up together
/// before delivering any of them (`Reader::warm`), so the CPU waits for memory once per run.
pub(super) const RUN: usize = 16;

/// A run of messages (channel, payload), slices of the bytes read.
pub(super) type Run<'a> = smallvec::SmallVec<[(&'a str, &'a [u8]); RUN]>;

/// The reading half: messages in place, acknowledgements answered on the way.
pub(super) struct Replies {
    read: OwnedReadHalf,
    buf: BytesMut,
    /// Bytes of `buf` already parsed.
    at: usize,
    acks: Acks,
}

/// Bytes from Redis that are not RESP2: the connection is dropped and made again.
fn not_resp() -> redis::RedisError {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "Redis sent a reply that is not RESP2",
    )
    .into()
}

fn closed() -> redis::RedisError {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "the Redis pub/sub connection closed",
    )
    .into()
}

/// A Redis error reply as the crate's error, with its code (`NOPERM`, `WRONGPASS`...), so that
/// a refused channel is told apart from a broken connection.
fn server_error(line: &[u8]) -> redis::RedisError {
    let line = String::from_utf8_lossy(line);
    let (code, detail) = line.split_once(' ').unwrap_or((&line, ""));
    redis::make_extension_error(code.to_owned(), Some(detail.to_owned()))
}

/// Connects and authenticates; `None` when the address is not plain TCP.
pub(super) async fn connect(
    info: &redis::ConnectionInfo,
) -> redis::RedisResult<Option<(Commands, Replies)>> {
    let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
        return Ok(None);
    };
    let stream = TcpStream::connect((host.as_str(), *port)).await?;
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let acks = Acks::default();
    let mut commands = Commands {
        write,
        acks: acks.clone(),
    };
    let mut replies = Replies {
        read,
        buf: BytesMut::with_capacity(READ_SIZE),
        at: 0,
        acks,
    };
    let settings = info.redis_settings();
    if let Some(password) = settings.password() {
        let mut args = Vec::with_capacity(2);
        args.extend(settings.username().map(str::to_owned));
        args.push(password.to_owned());
        commands
            .write
            .write_all(&resp::command("AUTH", &args))
            .await?;
        replies.handshake_reply().await?;
    }
    Ok(Some((commands, replies)))
}

impl Commands {
    pub(super) async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        self.call("SUBSCRIBE", channels).await
    }

    pub(super) async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        self.call("UNSUBSCRIBE", channels).await
    }

    /// Sends the command and waits for its acknowledgements. A caller that gives up (a timeout)
    /// leaves its entry in place, so later acknowledgements still meet their own commands.
    async fn call(&mut self, verb: &str, channels: &[String]) -> redis::RedisResult<()> {
        if channels.is_empty() {
            return Ok(());
        }
        let (done, answer) = oneshot::channel();
        self.acks.lock().push_back(Pending {
            left: channels.len(),
            done,
        });
        self.write.write_all(&resp::command(verb, channels)).await?;
        answer.await.unwrap_or_else(|_| Err(closed()))
    }
}

impl Replies {
    /// Reads more from Redis; `Ok(false)` once Redis closed the connection.
    pub(super) async fn fill(&mut self) -> io::Result<bool> {
        if self.at > 0 {
            self.buf.advance(self.at);
            self.at = 0;
        }
        self.buf.reserve(READ_SIZE);
        Ok(self.read.read_buf(&mut self.buf).await? > 0)
    }

    /// The messages already read (channel, payload), up to [`RUN`] of them, in order, answering
    /// acknowledgements on the way; empty when more must be read. A message on a channel whose
    /// name is not UTF-8 (none of the node's own) is skipped.
    pub(super) fn take(&mut self) -> redis::RedisResult<Run<'_>> {
        let mut run = Run::new();
        let mut at = self.at;
        while run.len() < RUN {
            let Some((reply, used)) = resp::parse(&self.buf[at..]).map_err(|_| not_resp())? else {
                break;
            };
            at += used;
            match reply {
                Reply::Message { channel, payload } => {
                    if let Ok(channel) = std::str::from_utf8(channel) {
                        run.push((channel, payload));
                    }
                }
                Reply::Subscribed | Reply::Unsubscribed => self.acknowledge(Ok(())),
                Reply::Error(line) => self.acknowledge(Err(server_error(line))),
                Reply::Other => {}
            }
        }
        self.at = at;
        Ok(run)
    }

    /// One reply to the oldest command: an error answers it whole, an acknowledgement answers
    /// one of its channels.
    fn acknowledge(&self, result: redis::RedisResult<()>) {
        let mut acks = self.acks.lock();
        let Some(front) = acks.front_mut() else {
            return;
        };
        front.left = front.left.saturating_sub(1);
        if result.is_err() || front.left == 0 {
            if let Some(p) = acks.pop_front() {
                let _ = p.done.send(result);
            }
        }
    }

    /// The reply to a command sent before subscribing (AUTH).
    async fn handshake_reply(&mut self) -> redis::RedisResult<()> {
        loop {
            if let Some((reply, used)) =
                resp::parse(&self.buf[self.at..]).map_err(|_| not_resp())?
            {
                self.at += used;
                return match reply {
                    Reply::Error(line) => Err(server_error(line)),
                    _ => Ok(()),
                };
            }
            if !self.fill().await? {
                return Err(closed());
            }
        }
    }
}

impl Drop for Replies {
    /// Commands still waiting learn that the connection is gone.
    fn drop(&mut self) {
        for p in self.acks.lock().drain(..) {
            let _ = p.done.send(Err(closed()));
        }
    }
}
