//! Redis Cluster for the Redis broker (`--redis-mode cluster`), on the `redis` crate's own
//! cluster client: it keeps one connection per shard, routes every command by its key's slot,
//! follows `MOVED` and refreshes its slot map. What this module adds:
//!
//! - Sharded pub/sub: the node's channels are `SSUBSCRIBE`d over one RESP3 cluster connection
//!   (so one subscription connection per shard, not per channel), grouped by slot because one
//!   `SSUBSCRIBE` may only name channels of one slot; messages arrive as pushes.
//! - A dropped shard connection (the crate's `Disconnection` push) or a channel the server
//!   unsubscribed (its slot moved: resharding, failover) ends the subscription: the broker
//!   reconnects, subscribes the whole set again on the current slot map and catches every channel
//!   up from history, as after any pub/sub loss.
//! - One canary channel per shard (a hash tag chosen for a slot of that shard), so a dead
//!   subscription to any one shard makes the node unready.
//! - Publishing (in `redis.rs`): one pipeline per slot (`SPUBLISH`, or the history script
//!   with `SPUBLISH`, which runs on the shard that owns the channel and its stream), all sent at
//!   once; the crate writes the pipelines of one shard on that shard's connection.

use std::collections::HashMap;

use futures_util::{stream, StreamExt, TryStreamExt};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo, Slot};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::connect::RedisCa;

/// Slot groups sent at once when (un)subscribing many channels.
const CONCURRENCY: usize = 64;

/// The channels grouped by their slot, each group in the order given.
pub(super) fn by_slot<'a, I: IntoIterator<Item = &'a String>>(channels: I) -> Vec<Vec<&'a String>> {
    by_slot_of(channels, |c| c.as_str())
}

/// Groups anything named by a channel by the channel's slot.
pub(super) fn by_slot_of<T, I: IntoIterator<Item = T>>(
    items: I,
    channel: impl Fn(&T) -> &str,
) -> Vec<Vec<T>> {
    let mut groups: HashMap<Slot, Vec<T>> = HashMap::new();
    for item in items {
        let slot = Slot::for_key(channel(&item).as_bytes());
        groups.entry(slot).or_default().push(item);
    }
    groups.into_values().collect()
}

/// A cluster connection for commands, and one for sharded pub/sub with its pushes. With a CA,
/// every shard's `rediss://` connection (the seeds', and those the slot map names) is verified
/// against it.
pub(super) fn client(
    seeds: &[String],
    ca: Option<&RedisCa>,
    resp3: bool,
) -> redis::RedisResult<redis::cluster::ClusterClientBuilder> {
    let mut b = redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
        .connection_timeout(std::time::Duration::from_secs(2))
        .response_timeout(std::time::Duration::from_secs(3))
        .retries(3);
    if resp3 {
        b = b.use_protocol(redis::ProtocolVersion::RESP3);
    }
    if let Some(ca) = ca {
        b = b.certs(ca.certificates());
    }
    Ok(b)
}

/// `SSUBSCRIBE`s (or `SUNSUBSCRIBE`s) channels, one command per slot, many in flight.
pub(super) async fn shard_subscribe(
    conn: &ClusterConnection,
    channels: &[String],
    subscribe: bool,
) -> redis::RedisResult<()> {
    let calls: Vec<_> = by_slot(channels)
        .into_iter()
        .map(|group| {
            let group: Vec<String> = group.into_iter().cloned().collect();
            let mut conn = conn.clone();
            Box::pin(async move {
                if subscribe {
                    conn.ssubscribe(&group).await
                } else {
                    conn.sunsubscribe(&group).await
                }
            })
        })
        .collect();
    stream::iter(calls)
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

/// A shard: its label for operators (the master's address) and its canary channel.
#[derive(Debug, Clone)]
pub(super) struct ShardCanary {
    pub shard: String,
    pub channel: String,
}

/// One canary channel per master, named `{base}:{tag}` with a hash tag that lands in a slot the
/// master owns (`CLUSTER SLOTS`, and the crate's slot function).
pub(super) async fn canaries(
    conn: &mut ClusterConnection,
    base: &str,
) -> redis::RedisResult<Vec<ShardCanary>> {
    let slots = conn
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let Value::Array(ranges) = slots else {
        return Err((redis::ErrorKind::Parse, "CLUSTER SLOTS: not an array").into());
    };
    // The first slot of each master's ranges.
    let mut masters: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        let Value::Array(r) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Array(master))) = (r.first(), r.get(2)) else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            continue;
        };
        let shard = format!("{host}:{port}");
        if !masters.iter().any(|(s, _)| *s == shard) {
            masters.push((shard, *start as u16));
        }
    }
    masters.sort();
    let mut tags: HashMap<Slot, u32> = HashMap::new();
    let wanted: Vec<Slot> = masters.iter().filter_map(|(_, s)| Slot::new(*s)).collect();
    let mut i = 0u32;
    while !wanted.iter().all(|s| tags.contains_key(s)) && i < 1_000_000 {
        tags.entry(Slot::for_key(i.to_string())).or_insert(i);
        i += 1;
    }
    Ok(masters
        .into_iter()
        .filter_map(|(shard, start)| {
            let tag = tags.get(&Slot::new(start)?)?;
            Some(ShardCanary {
                shard,
                channel: format!("{base}:{{{tag}}}"),
            })
        })
        .collect())
}

/// A message that arrived on a sharded subscription.
pub(super) struct ShardMessage {
    pub channel: String,
    pub payload: Vec<u8>,
}

/// Reads the pushes of the sharded subscription: messages, until a shard connection drops or
/// the server unsubscribes a channel the node still wants (its slot moved); then `None`.
pub(super) async fn next_message(
    pushes: &mut mpsc::UnboundedReceiver<PushInfo>,
    wanted: impl Fn(&str) -> bool,
) -> Option<ShardMessage> {
    loop {
        let push = pushes.recv().await?;
        match push.kind {
            PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                    (data.next(), data.next())
                else {
                    continue;
                };
                let Ok(channel) = String::from_utf8(channel) else {
                    continue;
                };
                return Some(ShardMessage { channel, payload });
            }
            PushKind::Disconnection => {
                tracing::warn!("a Redis Cluster shard connection dropped");
                return None;
            }
            PushKind::SUnsubscribe => {
                let Some(Value::BulkString(channel)) = push.data.first() else {
                    continue;
                };
                let channel = String::from_utf8_lossy(channel);
                if wanted(&channel) {
                    tracing::warn!("Redis Cluster moved a subscribed channel's slot");
                    return None;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::history;

    #[test]
    fn a_channel_and_its_history_share_a_slot() {
        for ch in [
            "wsgate:u:john",
            "wsgate:t:ACME",
            "wsgate:all",
            "wsgate:u:a:b",
        ] {
            assert_eq!(
                Slot::for_key(ch),
                Slot::for_key(history::key(ch)),
                "{ch} and its stream"
            );
        }
    }

    #[test]
    fn channels_are_grouped_by_slot() {
        let chs: Vec<String> = ["x:{t}:1", "y:{t}:2", "wsgate:u:john", "wsgate:u:mary"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut groups: Vec<Vec<&String>> = by_slot(&chs);
        groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
        assert_eq!(
            groups[0],
            vec![&chs[0], &chs[1]],
            "one tag, one slot, in order"
        );
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 4);
        for g in &groups {
            assert!(g
                .iter()
                .all(|c| Slot::for_key(c.as_bytes()) == Slot::for_key(g[0].as_bytes())));
        }
    }
}
