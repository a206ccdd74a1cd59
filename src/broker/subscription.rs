//! The node's pub/sub connection to one Redis server (a standalone server, or the master the
//! Sentinels name), over plain TCP or TLS, read by wsgate itself.
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
//! - TLS (`rediss://`) trusts what the crate's own connections trust: the CAs of
//!   `--redis-ca-file`, else the public roots; or anything with `#insecure`. Managed Redis
//!   services often require TLS, and a node there delivered through the crate's pub/sub at about
//!   twice the CPU per delivery.
//! - A Redis Cluster keeps the crate's sharded pub/sub (`redis_cluster.rs`).
//! - The publisher's own connection (`publish_connection.rs`) is made the same way and
//!   subscribes nothing: it sends whole requests ([`Commands::send`]) and counts their replies
//!   ([`Replies::answers`]).

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::rustls;

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

/// The reading half: a TCP socket's own, or TLS's.
enum ReadHalf {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// The writing half, boxed: it writes a SUBSCRIBE now and then, never a message.
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// The writing half: SUBSCRIBE and UNSUBSCRIBE, each answered when Redis acknowledged it.
pub(super) struct Commands {
    write: WriteHalf,
    acks: Acks,
}

/// Messages [`Replies::take`] hands over at a time: the reader looks their channels up together
/// before delivering any of them (`Reader::warm`), so the CPU waits for memory once per run.
pub(super) const RUN: usize = 16;

/// A run of messages (channel, payload), slices of the bytes read.
pub(super) type Run<'a> = smallvec::SmallVec<[(&'a str, &'a [u8]); RUN]>;

/// The reading half: messages in place, acknowledgements answered on the way.
pub(super) struct Replies {
    read: ReadHalf,
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

/// Connects and authenticates; over TLS the server is verified against `roots` (the CAs of
/// `--redis-ca-file`), or without them against the public roots.
pub(super) async fn connect(
    info: &redis::ConnectionInfo,
    roots: Option<Arc<rustls::RootCertStore>>,
) -> redis::RedisResult<(Commands, Replies)> {
    let (read, write): (ReadHalf, WriteHalf) = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => {
            let (read, write) = tcp(host, *port).await?.into_split();
            (ReadHalf::Tcp(read), Box::new(write))
        }
        // An address made with the CA carries the crate's parsed copy of the same certificates
        // (`tls_params`); the reader uses the roots it was given, parsed once.
        redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure,
            ..
        } => {
            let stream = tcp(host, *port).await?;
            let (read, write) = tokio::io::split(tls(host, stream, *insecure, roots).await?);
            (ReadHalf::Tls(read), Box::new(write))
        }
        // wsgate builds its connections from URLs (redis:// and rediss:// only), so no address
        // names a Unix socket.
        other => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("no pub/sub connection for the address {other}"),
            )
            .into())
        }
    };
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
        commands.write.flush().await?;
        replies.handshake_reply().await?;
    }
    Ok((commands, replies))
}

async fn tcp(host: &str, port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// TLS as the crate's connections do it: verified against the given CAs (instead of the public
/// roots) or the public roots, or, with `#insecure`, not verified at all (and without SNI).
async fn tls(
    host: &str,
    stream: TcpStream,
    insecure: bool,
    roots: Option<Arc<rustls::RootCertStore>>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let roots = roots.unwrap_or_else(|| {
        let mut public = rustls::RootCertStore::empty();
        public.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Arc::new(public)
    });
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    if insecure {
        let schemes = config
            .crypto_provider()
            .signature_verification_algorithms
            .supported_schemes();
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(Unverified(schemes)));
        config.enable_sni = false;
    }
    let name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
        .to_owned();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
}

/// `rediss://…/#insecure`: any certificate is accepted, as the operator asked.
#[derive(Debug)]
struct Unverified(Vec<rustls::SignatureScheme>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.clone()
    }
}

impl Commands {
    /// Writes `bytes` (whole commands) and flushes them.
    pub(super) async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write.write_all(bytes).await?;
        self.write.flush().await
    }

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
        // TLS may keep the end of a record back until flushed.
        self.write.flush().await?;
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
        let n = match &mut self.read {
            ReadHalf::Tcp(r) => r.read_buf(&mut self.buf).await?,
            ReadHalf::Tls(r) => r.read_buf(&mut self.buf).await?,
        };
        Ok(n > 0)
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
                    if let Some(channel) = text(channel) {
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

    /// The replies to `n` commands sent on a connection that subscribes nothing (the
    /// publisher's): the first error among them, once all `n` are read, so that the next
    /// request's replies start where its own do.
    pub(super) async fn answers(&mut self, n: usize) -> redis::RedisResult<()> {
        let mut first = Ok(());
        let mut left = n;
        while left > 0 {
            match resp::parse(&self.buf[self.at..]).map_err(|_| not_resp())? {
                Some((reply, used)) => {
                    self.at += used;
                    left -= 1;
                    if let (Reply::Error(line), Ok(())) = (reply, &first) {
                        first = Err(server_error(line));
                    }
                }
                None => {
                    if !self.fill().await? {
                        return Err(closed());
                    }
                }
            }
        }
        first
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

/// A channel name as text. The node's own names are ASCII, checked a word at a time; a full
/// UTF-8 check of each received name was about 3 % of the node's instructions.
fn text(name: &[u8]) -> Option<&str> {
    if name.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(name) })
    } else {
        std::str::from_utf8(name).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::IntoConnectionInfo;
    use tokio::net::TcpListener;

    #[test]
    fn channel_names_are_text_ascii_or_not() {
        assert_eq!(text(b"wsgate:u:john"), Some("wsgate:u:john"));
        assert_eq!(text("wsgate:u:jöhn".as_bytes()), Some("wsgate:u:jöhn"));
        assert_eq!(text(b"wsgate:u:\xff"), None);
    }

    /// A TLS server with this certificate for 127.0.0.1 that answers each connection's
    /// handshake and then holds it; its port.
    async fn tls_server(
        cert: rustls::pki_types::CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> u16 {
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("a server configuration");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let port = listener.local_addr().expect("its address").port();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(socket).await {
                        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        drop(stream);
                    }
                });
            }
        });
        port
    }

    /// A TLS server with a self-signed certificate for 127.0.0.1; its port.
    async fn self_signed_server() -> u16 {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()])
            .expect("a self-signed certificate");
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der());
        tls_server(cert.cert.der().clone(), key.into()).await
    }

    fn info(url: &str) -> redis::ConnectionInfo {
        url.into_connection_info().expect("a valid URL")
    }

    #[tokio::test]
    async fn tls_refuses_a_certificate_no_public_root_signed() {
        let port = self_signed_server().await;
        let Err(e) = connect(&info(&format!("rediss://127.0.0.1:{port}")), None).await else {
            panic!("a self-signed certificate was trusted");
        };
        let text = e.to_string();
        assert!(text.contains("certificate"), "{text}");
    }

    #[tokio::test]
    async fn tls_with_insecure_accepts_any_certificate() {
        let port = self_signed_server().await;
        connect(&info(&format!("rediss://127.0.0.1:{port}/#insecure")), None)
            .await
            .expect("the handshake succeeds with #insecure");
    }

    /// `--redis-ca-file`: a certificate the configured CA signed is accepted without
    /// `#insecure`; one it did not sign (self-signed) is refused, though the URL is the same.
    #[tokio::test]
    async fn tls_with_a_ca_accepts_what_it_signed_and_nothing_else() {
        let ca = crate::broker::test_ca::TestCa::new();
        let roots = crate::broker::RedisCa::from_pem(ca.pem().into_bytes())
            .expect("the CA parses")
            .roots();
        let (cert, key) = ca.issue("127.0.0.1");
        let signed = tls_server(cert, key).await;
        connect(
            &info(&format!("rediss://127.0.0.1:{signed}")),
            Some(roots.clone()),
        )
        .await
        .expect("the CA's certificate is trusted");

        let stranger = self_signed_server().await;
        let Err(e) = connect(
            &info(&format!("rediss://127.0.0.1:{stranger}")),
            Some(roots),
        )
        .await
        else {
            panic!("a certificate the CA did not sign was trusted");
        };
        let text = e.to_string();
        assert!(text.contains("certificate"), "{text}");
    }

    /// The CA replaces the public roots: a certificate the CA signed is refused by a reader
    /// that was given no CA (and so trusts only the public roots).
    #[tokio::test]
    async fn tls_without_the_ca_refuses_what_the_ca_signed() {
        let ca = crate::broker::test_ca::TestCa::new();
        let (cert, key) = ca.issue("127.0.0.1");
        let port = tls_server(cert, key).await;
        assert!(connect(&info(&format!("rediss://127.0.0.1:{port}")), None)
            .await
            .is_err());
    }
}
