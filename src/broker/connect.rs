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
        }
    }
}

/// Makes the node's pub/sub clients: the same server every time, or whatever master the
/// Sentinels name now.
pub(super) enum Endpoint {
    Fixed(redis::Client),
    Sentinel(tokio::sync::Mutex<redis::sentinel::SentinelClient>),
}

impl Endpoint {
    /// A client for the current master.
    pub(super) async fn client(&self) -> redis::RedisResult<redis::Client> {
        match self {
            Endpoint::Fixed(c) => Ok(c.clone()),
            Endpoint::Sentinel(s) => s.lock().await.async_get_client().await,
        }
    }
}

/// The pool of command connections (publish, presence, history, sets).
#[derive(Clone)]
pub(super) enum Pool {
    Fixed(deadpool_redis::Pool),
    Sentinel(deadpool_redis::sentinel::Pool),
}

/// One pooled connection, whatever the topology.
pub(super) enum Conn {
    Fixed(deadpool_redis::Connection),
    Sentinel(deadpool_redis::sentinel::Connection),
}

impl Pool {
    pub(super) async fn get(&self) -> Result<Conn, deadpool_redis::PoolError> {
        match self {
            Pool::Fixed(p) => p.get().await.map(Conn::Fixed),
            Pool::Sentinel(p) => p.get().await.map(Conn::Sentinel),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Fixed(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
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
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Fixed(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
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
                .max_size(pool_size)
                .wait_timeout(Some(timeout))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .runtime(deadpool_redis::Runtime::Tokio1)
                .build()
                .map_err(|e| Outage::PoolSetup(Arc::new(e)))?;
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
                .max_size(pool_size)
                .wait_timeout(Some(timeout))
                .create_timeout(Some(timeout))
                .recycle_timeout(Some(timeout))
                .runtime(deadpool_redis::Runtime::Tokio1)
                .build()
                .map_err(|e| Outage::PoolSetup(Arc::new(e)))?;
            Ok((
                Endpoint::Sentinel(tokio::sync::Mutex::new(client)),
                Pool::Sentinel(pool),
            ))
        }
    }
}
