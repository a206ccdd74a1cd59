//! What a Redis URL names beyond the address: a password and a database. The node publishes
//! on a connection of its own (RESP it writes itself), reads pub/sub on another and keeps its
//! sets on the pool's; each must authenticate, and the histories must land in the URL's
//! database. A real `redis-server` with `requirepass`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const PASSWORD: &str = "s3cret-pw";

/// A Redis that asks for [`PASSWORD`] (set once it answers, so the harness's checks can run).
fn guarded_redis() -> Redis {
    let redis = Redis::start();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query(&mut redis.conn())
        .expect("set a password");
    redis
}

fn conn_to_db(redis: &Redis, db: u8) -> redis::Connection {
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/{db}", redis.port);
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        .expect("connect with the password")
}

fn history_keys(conn: &mut redis::Connection) -> Vec<String> {
    redis::cmd("KEYS")
        .arg("*:history")
        .query(conn)
        .expect("KEYS")
}

#[tokio::test]
async fn a_password_and_a_database_in_the_url_reach_every_connection() {
    let redis = guarded_redis();
    let backend = Backend::start().await;
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/3", redis.port);
    let nodes = start_ready_nodes([redis_node_config(&backend, url, "auth", "a")]).await;
    let mut alice = Client::subscribed(&nodes[0].notws("alice")).await;
    for title in ["one", "two"] {
        let (s, body) = nodes[0]
            .notify(json!({"userIds": ["alice"], "notification": notification("T", title)}))
            .await;
        assert_eq!(s, 202, "{body}");
        assert_eq!(alice.recv_json().await["title"], title);
    }
    let in_3 = history_keys(&mut conn_to_db(&redis, 3));
    assert_eq!(in_3.len(), 1, "alice's history, in database 3: {in_3:?}");
    assert!(in_3[0].contains("alice"), "{in_3:?}");
    assert_eq!(
        history_keys(&mut conn_to_db(&redis, 0)),
        Vec::<String>::new()
    );
}

/// A Redis that lost its scripts (restarted, failed over, `SCRIPT FLUSH`) answers the
/// publisher's script calls `NOSCRIPT`; the publisher sends the script itself and nothing is
/// lost or sent twice.
#[tokio::test]
async fn a_flushed_script_cache_is_filled_again_by_the_next_publish() {
    let redis = Redis::start();
    let backend = Backend::start().await;
    let nodes =
        start_ready_nodes([redis_node_config(&backend, redis.url(), "noscript", "a")]).await;
    let mut alice = Client::subscribed(&nodes[0].notws("alice")).await;
    let publish = |title: &'static str| {
        nodes[0]
            .notify(json!({"userIds": ["alice", "bob"], "notification": notification("T", title)}))
    };
    let (s, body) = publish("before").await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(alice.recv_json().await["title"], "before");
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.conn())
        .expect("SCRIPT FLUSH");
    let (s, body) = publish("after").await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(alice.recv_json().await["title"], "after");
    alice.expect_silence(Duration::from_millis(300)).await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())
        .expect("INFO");
    assert!(
        stats.contains("cmdstat_eval:"),
        "the script went again by EVAL: {stats}"
    );
}
