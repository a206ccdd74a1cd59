//! Where the Redis broker's connections go: one server, the master a set of Sentinels names, or
//! a Redis Cluster. The broker's actor and publish path ask this module for a pub/sub client and
//! for pooled command connections, and stay the same for every topology.
//!
//! - Standalone: one URL; a deadpool-redis pool and a client for the pub/sub connection.
//! - Sentinel: the URLs are Sentinels. Every (re)connect of the pub/sub connection asks them for
//!   the current master (`redis::sentinel`), and the pool ([`SentinelManager`]) does the same for
//!   every new connection, so after a failover both reach the new master once the old
//!   connections have failed. Credentials and TLS of the first URL also apply to the master.
//! - Cluster: the URLs are seed nodes; commands go over one multiplexed cluster connection (the
//!   `redis` crate's, one connection per shard, routed by slot), made on first use; pub/sub is
//!   in `redis_cluster.rs`.
//!
//! With `--redis-ca-file` ([`RedisCa`]) every `rediss://` connection of every topology (the
//! pool's, the pub/sub reader's, the Sentinels', the master's, every shard's) verifies the server
//! against those CAs instead of the public roots.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};
use tokio_rustls::rustls;

use super::{BrokerError, Outage};

/// The CA certificates of `--redis-ca-file`. A Redis behind a private CA (cert-manager's internal
/// issuer, a chart's self-made CA) is verified against them instead of being reached with
/// `#insecure`. They replace the public roots rather than add to them, as `redis-cli --cacert`
/// does and as the `redis` crate does with a root certificate: a deployment that names its CA
/// means that CA, and a certificate some public CA issued for the same name is not its Redis.
#[derive(Clone)]
pub struct RedisCa {
    /// The file as read, for the `redis` crate's connections, which take PEM (it reads only the
    /// certificates in it).
    pem: Arc<[u8]>,
    /// The same certificates, parsed once, for the pub/sub reader.
    roots: Arc<rustls::RootCertStore>,
}

impl RedisCa {
    /// The certificates of a PEM file: at least one, each usable as a trust anchor. Other PEM
    /// sections (a key left in the same file) are skipped and never shown.
    pub fn from_pem(pem: Vec<u8>) -> Result<RedisCa, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for (i, cert) in rustls::pki_types::CertificateDer::pem_slice_iter(&pem).enumerate() {
            // The parser's own messages may quote the file's lines: only the kind of damage.
            let cert = cert.map_err(|e| match e {
                rustls::pki_types::pem::Error::Base64Decode(_) => {
                    "has a PEM section that is not valid base64".to_owned()
                }
                rustls::pki_types::pem::Error::MissingSectionEnd { .. } => {
                    "has a PEM section without its END line (a truncated file?)".to_owned()
                }
                _ => "cannot be read as PEM".to_owned(),
            })?;
            roots.add(cert).map_err(|e| {
                format!(
                    "has certificate {}, which is not usable as a CA certificate: {e}",
                    i + 1
                )
            })?;
        }
        if roots.is_empty() {
            return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
        }
        Ok(RedisCa {
            pem: pem.into(),
            roots: Arc::new(roots),
        })
    }

    /// How many CA certificates there are.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Never empty: [`RedisCa::from_pem`] refuses a file without a certificate.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The certificates for the pub/sub reader's TLS.
    pub(super) fn roots(&self) -> Arc<rustls::RootCertStore> {
        self.roots.clone()
    }

    /// The certificates as the `redis` crate takes them: trust anchors, no client certificate.
    pub(super) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(self.pem.to_vec()),
        }
    }
}

impl std::fmt::Debug for RedisCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisCa({} certificates)", self.len())
    }
}

/// How to reach Redis. URLs may carry credentials: never logged, never in Debug output.
#[derive(Clone)]
pub enum Topology {
    /// One server.
    Standalone(String),
    /// Sentinels watching the master set `master`.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    /// Redis Cluster seed nodes.
    Cluster(Vec<String>),
}

impl Topology {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Topology::Cluster(_))
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Topology::Standalone(_) => f.write_str("Standalone(<redacted>)"),
            Topology::Sentinel { sentinels, master } => f
                .debug_struct("Sentinel")
                .field("sentinels", &sentinels.len())
                .field("master", master)
                .finish(),
            Topology::Cluster(seeds) => write!(f, "Cluster({} seeds)", seeds.len()),
        }
    }
}

/// Makes the node's pub/sub clients: the same server every time, or whatever master the
/// Sentinels name now.
pub(super) enum Endpoint {
    Fixed(redis::Client),
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
    /// Seed nodes: the sharded subscription makes its own cluster connection.
    Cluster(Vec<String>),
}

impl Endpoint {
    /// A client for the current master.
    pub(super) async fn client(&self) -> redis::RedisResult<redis::Client> {
        match self {
            Endpoint::Fixed(c) => Ok(c.clone()),
            Endpoint::Sentinel(s) => s.lock().await.async_get_client().await,
            Endpoint::Cluster(_) => Err((
                redis::ErrorKind::InvalidClientConfig,
                "a cluster has no single pub/sub client",
            )
                .into()),
        }
    }
}

/// The pool of command connections (publish, presence, history, sets).
#[derive(Clone)]
pub(super) enum Pool {
    Fixed(deadpool_redis::Pool),
    Sentinel(SentinelPool),
    /// One multiplexed cluster connection, made on first use (retried until it works).
    Cluster(ClusterCell),
}

/// One pooled connection, whatever the topology.
pub(super) enum Conn {
    Fixed(deadpool_redis::Connection),
    Sentinel(deadpool::managed::Object<SentinelManager>),
    Cluster(redis::cluster_async::ClusterConnection, ClusterCell),
}

impl Pool {
    pub(super) async fn get(&self) -> Result<Conn, BrokerError> {
        let pool_down = |e| BrokerError::Unavailable(Outage::Pool(Arc::new(e)));
        match self {
            Pool::Fixed(p) => p.get().await.map(Conn::Fixed).map_err(pool_down),
            Pool::Sentinel(p) => p.get().await.map(Conn::Sentinel).map_err(pool_down),
            Pool::Cluster(c) => Ok(Conn::Cluster(cluster_conn(c.clone()).await?, c.clone())),
        }
    }
}

/// The cluster client and its shared connection (none until first use, or after a failure).
type ClusterCell = Arc<(
    redis::cluster::ClusterClient,
    parking_lot::Mutex<Option<redis::cluster_async::ClusterConnection>>,
)>;

/// The shared cluster connection, made on first use (two racing first uses make two; one stays).
async fn cluster_conn(
    cell: ClusterCell,
) -> Result<redis::cluster_async::ClusterConnection, BrokerError> {
    if let Some(conn) = cell.1.lock().as_ref() {
        return Ok(conn.clone());
    }
    match tokio::time::timeout(Duration::from_secs(3), cell.0.get_async_connection()).await {
        Ok(Ok(conn)) => {
            *cell.1.lock() = Some(conn.clone());
            Ok(conn)
        }
        Ok(Err(e)) => Err(BrokerError::Unavailable(Outage::Redis(Arc::new(e)))),
        Err(_) => Err(Outage::Timeout.into()),
    }
}

/// After a failed command, the next one makes a new cluster connection, with a fresh slot map:
/// the crate follows `MOVED` for single commands but not inside a `MULTI`, and a failed-over
/// master's slots must be looked up again. A missing script is only a cache miss.
fn forget_on_failure<T>(cell: &ClusterCell, result: &redis::RedisResult<T>) {
    if let Err(e) = result {
        if e.code() != Some("NOSCRIPT") {
            *cell.1.lock() = None;
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Fixed(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
            Conn::Cluster(c, cell) => Box::pin(async move {
                let result = c.req_packed_command(cmd).await;
                forget_on_failure(cell, &result);
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Fixed(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c, cell) => Box::pin(async move {
                let result = c.req_packed_commands(cmd, offset, count).await;
                forget_on_failure(cell, &result);
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Fixed(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
            Conn::Cluster(c, _) => c.get_db(),
        }
    }
}

/// The settings of both pooled topologies' command pools: `pool_size` connections at most, and
/// `timeout` to wait for a free one, to make one and to check one that comes back.
fn pool_config(pool_size: usize, timeout: Duration) -> deadpool_redis::PoolConfig {
    let mut config = deadpool_redis::PoolConfig::new(pool_size);
    config.timeouts = deadpool_redis::Timeouts {
        wait: Some(timeout),
        create: Some(timeout),
        recycle: Some(timeout),
    };
    config
}

/// A pool that could not be built.
fn pool_setup(e: deadpool_redis::BuildError) -> Outage {
    Outage::PoolSetup(Arc::new(e))
}

/// The master the Sentinels name, for command connections: deadpool-redis's Sentinel manager
/// does the same, but builds its Sentinel client itself, and that one cannot be given a CA.
pub(super) struct SentinelManager {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    pings: AtomicUsize,
}

pub(super) type SentinelPool = deadpool::managed::Pool<SentinelManager>;

impl deadpool::managed::Manager for SentinelManager {
    type Type = redis::aio::MultiplexedConnection;
    type Error = redis::RedisError;

    async fn create(&self) -> Result<Self::Type, Self::Error> {
        self.client.lock().await.get_async_connection().await
    }

    /// A connection that comes back answers a numbered PING with its number, or is dropped (a
    /// connection to a demoted master fails here, and the next one asks the Sentinels again).
    async fn recycle(
        &self,
        conn: &mut Self::Type,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<Self::Error> {
        let n = self.pings.fetch_add(1, Ordering::Relaxed).to_string();
        let answer: String = redis::cmd("PING").arg(&n).query_async(conn).await?;
        if answer == n {
            Ok(())
        } else {
            Err(deadpool::managed::RecycleError::message(
                "Invalid PING response",
            ))
        }
    }
}

/// A client of the Sentinels that names the master `master`. Credentials and TLS of the first URL
/// also apply to the master; with a CA, the Sentinels and the master are both verified against it.
fn sentinel_client(
    sentinels: &[String],
    master: &str,
    ca: Option<&RedisCa>,
) -> Result<redis::sentinel::SentinelClient, Outage> {
    use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
    let infos = sentinels
        .iter()
        .map(|u| u.as_str().into_connection_info())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Outage::BadUrl)?;
    let first = infos.first().ok_or(Outage::BadUrl)?;
    let insecure = match first.addr() {
        redis::ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
        _ => None,
    };
    let settings = first.redis_settings().clone();
    let Some(ca) = ca else {
        let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(settings);
        if let Some(insecure) = insecure {
            node = node.set_tls_mode(if insecure {
                redis::TlsMode::Insecure
            } else {
                redis::TlsMode::Secure
            });
        }
        return SentinelClient::build(infos, master, Some(node), SentinelServerType::Master)
            .map_err(|_| Outage::BadUrl);
    };
    // Only the builder passes certificates on to the master's connections. It takes one set of
    // credentials for all Sentinels: the first URL's, as for the master.
    let mut b = SentinelClientBuilder::new(
        infos.iter().map(|i| i.addr().clone()),
        master,
        SentinelServerType::Master,
    )
    .map_err(|_| Outage::BadUrl)?
    .set_client_to_redis_db(settings.db())
    .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
    .set_client_to_redis_certificates(ca.certificates())
    .set_client_to_sentinel_certificates(ca.certificates());
    if let Some(user) = settings.username() {
        b = b
            .set_client_to_redis_username(user)
            .set_client_to_sentinel_username(user);
    }
    if let Some(password) = settings.password() {
        b = b
            .set_client_to_redis_password(password)
            .set_client_to_sentinel_password(password);
    }
    b.build().map_err(|_| Outage::BadUrl)
}

/// The pub/sub endpoint and the command pool for a topology; `ca` verifies every `rediss://`
/// connection instead of the public roots.
pub(super) fn open(
    topology: &Topology,
    ca: Option<&RedisCa>,
    pool_size: usize,
    timeout: Duration,
) -> Result<(Endpoint, Pool), BrokerError> {
    match topology {
        Topology::Standalone(url) => {
            let client = match ca {
                None => redis::Client::open(url.as_str()),
                Some(ca) => redis::Client::build_with_tls(url.as_str(), ca.certificates()),
            }
            .map_err(|_| Outage::BadUrl)?;
            // The pool's connections are the client's, certificates included.
            let manager = deadpool_redis::Manager::new(client.get_connection_info().clone())
                .map_err(|_| Outage::BadUrl)?;
            let pool = deadpool_redis::Pool::builder(manager)
                .config(pool_config(pool_size, timeout))
                .runtime(deadpool_redis::Runtime::Tokio1)
                .build()
                .map_err(pool_setup)?;
            Ok((Endpoint::Fixed(client), Pool::Fixed(pool)))
        }
        Topology::Sentinel { sentinels, master } => {
            let manager = SentinelManager {
                client: tokio::sync::Mutex::new(sentinel_client(sentinels, master, ca)?),
                pings: AtomicUsize::new(0),
            };
            let pool = SentinelPool::builder(manager)
                .config(pool_config(pool_size, timeout))
                .runtime(deadpool_redis::Runtime::Tokio1)
                .build()
                .map_err(pool_setup)?;
            Ok((
                Endpoint::Sentinel(tokio::sync::Mutex::new(sentinel_client(
                    sentinels, master, ca,
                )?)),
                Pool::Sentinel(pool),
            ))
        }
        Topology::Cluster(seeds) => {
            let client = super::redis_cluster::client(seeds, ca, false)
                .and_then(|b| b.build())
                .map_err(|_| Outage::BadUrl)?;
            Ok((
                Endpoint::Cluster(seeds.clone()),
                Pool::Cluster(Arc::new((client, parking_lot::Mutex::new(None)))),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_pool(status: deadpool_redis::Status, timeouts: deadpool_redis::Timeouts) {
        let t = Some(Duration::from_millis(250));
        assert_eq!(status.max_size, 7);
        assert_eq!(
            (timeouts.wait, timeouts.create, timeouts.recycle),
            (t, t, t)
        );
    }

    /// Both pooled topologies' pools get the size and the three timeouts (nothing connects yet).
    #[tokio::test]
    async fn pools_take_the_size_and_the_timeouts() {
        let standalone = Topology::Standalone("redis://127.0.0.1:1".into());
        match open(&standalone, None, 7, Duration::from_millis(250)) {
            Ok((_, Pool::Fixed(p))) => assert_pool(p.status(), p.timeouts()),
            _ => panic!("a standalone pool"),
        }
        let sentinel = Topology::Sentinel {
            sentinels: vec!["redis://127.0.0.1:1".into()],
            master: "m".into(),
        };
        match open(&sentinel, None, 7, Duration::from_millis(250)) {
            Ok((_, Pool::Sentinel(p))) => assert_pool(p.status(), p.timeouts()),
            _ => panic!("a Sentinel pool"),
        }
    }

    /// With a CA every topology builds its clients and pools (nothing connects yet), and the
    /// standalone pub/sub client's address carries the certificates.
    #[tokio::test]
    async fn every_topology_takes_a_ca() {
        let ca = RedisCa::from_pem(crate::broker::test_ca::TestCa::new().pem().into_bytes())
            .expect("the CA parses");
        let timeout = Duration::from_millis(250);
        let standalone = Topology::Standalone("rediss://127.0.0.1:1".into());
        match open(&standalone, Some(&ca), 7, timeout) {
            Ok((Endpoint::Fixed(client), Pool::Fixed(p))) => {
                assert_pool(p.status(), p.timeouts());
                assert!(matches!(
                    client.get_connection_info().addr(),
                    redis::ConnectionAddr::TcpTls {
                        insecure: false,
                        tls_params: Some(_),
                        ..
                    }
                ));
            }
            _ => panic!("a standalone pool"),
        }
        let sentinel = Topology::Sentinel {
            sentinels: vec![
                "rediss://:pw@127.0.0.1:1".into(),
                "rediss://:pw@127.0.0.1:2".into(),
            ],
            master: "m".into(),
        };
        match open(&sentinel, Some(&ca), 7, timeout) {
            Ok((Endpoint::Sentinel(_), Pool::Sentinel(p))) => assert_pool(p.status(), p.timeouts()),
            _ => panic!("a Sentinel pool"),
        }
        let cluster = Topology::Cluster(vec!["rediss://127.0.0.1:1".into()]);
        assert!(matches!(
            open(&cluster, Some(&ca), 7, timeout),
            Ok((Endpoint::Cluster(_), Pool::Cluster(_)))
        ));
    }
}
