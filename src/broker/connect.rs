//! Where the Redis broker's connections go: one server, the master a set of Sentinels names, or
//! a Redis Cluster. The broker's actor and publish path ask this module for a pub/sub client and
//! for pooled command connections, and stay the same for every topology.
//!
//! - Standalone: one URL; a deadpool-redis pool and a client for the pub/sub connection.
//! - Sentinel: the URLs are Sentinels. Every (re)connect of the pub/sub connection asks them for
//!   the current master (`redis::sentinel`), and the pool (deadpool-redis's Sentinel manager)
//!   does the same for every new connection, so after a failover both reach the new master once
//!   the old connections have failed. Credentials and TLS of the first URL also apply to the
//!   master.
//! - Cluster: the URLs are seed nodes; commands go over one multiplexed cluster connection (the
//!   `redis` crate's, one connection per shard, routed by slot), made on first use; pub/sub is
//!   in `redis_cluster.rs`.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use super::{BrokerError, Outage};

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
    Sentinel(deadpool_redis::sentinel::Pool),
    /// One multiplexed cluster connection, made on first use (retried until it works).
    Cluster(ClusterCell),
}

/// One pooled connection, whatever the topology.
pub(super) enum Conn {
    Fixed(deadpool_redis::Connection),
    Sentinel(deadpool_redis::sentinel::Connection),
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

/// The pub/sub endpoint and the command pool for a topology.
pub(super) fn open(
    topology: &Topology,
    pool_size: usize,
    timeout: Duration,
) -> Result<(Endpoint, Pool), BrokerError> {
    match topology {
        Topology::Standalone(url) => {
            let client = redis::Client::open(url.as_str()).map_err(|_| Outage::BadUrl)?;
            let pool = deadpool_redis::Config::from_url(url.as_str())
                .builder()
                .map_err(|_| Outage::BadUrl)?
                .config(pool_config(pool_size, timeout))
                .runtime(deadpool_redis::Runtime::Tokio1)
                .build()
                .map_err(pool_setup)?;
            Ok((Endpoint::Fixed(client), Pool::Fixed(pool)))
        }
        Topology::Sentinel { sentinels, master } => {
            let first = sentinels
                .first()
                .ok_or(Outage::BadUrl)?
                .as_str()
                .into_connection_info()
                .map_err(|_| Outage::BadUrl)?;
            let tls = match first.addr() {
                redis::ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
                _ => None,
            };
            let settings = first.redis_settings();
            let urls: Vec<&str> = sentinels.iter().map(String::as_str).collect();

            let mut node = redis::sentinel::SentinelNodeConnectionInfo::default()
                .set_redis_connection_info(settings.clone());
            if let Some(insecure) = tls {
                node = node.set_tls_mode(if insecure {
                    redis::TlsMode::Insecure
                } else {
                    redis::TlsMode::Secure
                });
            }
            let client = redis::sentinel::SentinelClient::build(
                urls.clone(),
                master.as_str(),
                Some(node),
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|_| Outage::BadUrl)?;

            let node = deadpool_redis::sentinel::SentinelNodeConnectionInfo {
                tls_mode: tls.map(|insecure| {
                    if insecure {
                        deadpool_redis::sentinel::TlsMode::Insecure
                    } else {
                        deadpool_redis::sentinel::TlsMode::Secure
                    }
                }),
                redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
                    db: settings.db(),
                    username: settings.username().map(str::to_owned),
                    password: settings.password().map(str::to_owned),
                    protocol: Default::default(),
                }),
            };
            let manager = deadpool_redis::sentinel::Manager::new(
                urls,
                master.clone(),
                Some(node),
                deadpool_redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|_| Outage::BadUrl)?;
            let pool = deadpool_redis::sentinel::Pool::builder(manager)
                .config(pool_config(pool_size, timeout))
                .runtime(deadpool_redis::Runtime::Tokio1)
                .build()
                .map_err(pool_setup)?;
            Ok((
                Endpoint::Sentinel(tokio::sync::Mutex::new(client)),
                Pool::Sentinel(pool),
            ))
        }
        Topology::Cluster(seeds) => {
            let client = super::redis_cluster::client(seeds, false)
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
        match open(&standalone, 7, Duration::from_millis(250)) {
            Ok((_, Pool::Fixed(p))) => assert_pool(p.status(), p.timeouts()),
            _ => panic!("a standalone pool"),
        }
        let sentinel = Topology::Sentinel {
            sentinels: vec!["redis://127.0.0.1:1".into()],
            master: "m".into(),
        };
        match open(&sentinel, 7, Duration::from_millis(250)) {
            Ok((_, Pool::Sentinel(p))) => assert_pool(p.status(), p.timeouts()),
            _ => panic!("a Sentinel pool"),
        }
    }
}
