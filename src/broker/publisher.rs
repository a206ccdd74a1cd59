//! Publishing to Redis by group commit: the publishes that arrive while a round trip is under
//! way go out together in the next one, grouped by channel, so that each channel's messages are
//! side by side.
//!
//! Why: Redis runs one publish's script for all of its channels before it starts the next, so a
//! burst of notifications to the same users (several publish calls at once) used to reach every
//! receiving node one whole fan-out apart, and each recipient's socket was written once per
//! message. Grouped by channel, a recipient's messages arrive back to back, are delivered in one
//! read batch of the subscription and go out in one socket write. Under load it also saves
//! round trips. A publish waits at most for the round trip before its own, and its answer is its
//! round trip's: success means Redis took every message of it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::connect::Pool;
use super::publish_connection::PublishConnection;
use super::redis::timed;
use super::resp::Request;
use super::{history, redis_cluster, BrokerError, ChannelList, Outage};
use crate::metrics::Metrics;

/// Messages (a channel and a payload) per round trip at most: bounds how long one round trip
/// holds Redis and what it buffers. A publish is never split; one larger than this goes alone.
const MESSAGES_PER_ROUND_TRIP: usize = 8192;

/// Round trips of one publish each after which publishes no longer count as bursty: a burst's
/// stragglers (a round trip or two of one publish each) do not make the next burst's first
/// publish go alone.
const BURST_MEMORY: u8 = 4;

struct Job {
    channels: ChannelList,
    payload: Bytes,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// A task is publishing the queue; it ends when it finds the queue empty.
    flushing: bool,
    /// Publishes come in bursts now, so one that finds the queue idle waits `linger` for the
    /// rest of its burst: the round trips left to wait for, set to [`BURST_MEMORY`] by a round
    /// trip that carried several publishes, counted down by each that carried one. A caller
    /// publishing one at a time never fills a round trip with two, so it waits at most
    /// `BURST_MEMORY` times after a burst.
    bursty: u8,
}

/// Bytes of a round trip's request buffer kept for the next one, at most. The buffer of a
/// notification to 1,000 users is about 70 KB: past jemalloc's small size classes, so a new one
/// per round trip went through its page-level allocator, and freeing it through the same.
const KEPT_REQUEST_BYTES: usize = 256 << 10;

pub(super) struct Publisher {
    queue: Mutex<Queue>,
    /// The last round trip's request buffer, emptied and filled again by the next one.
    spare: Mutex<Request>,
    /// The publisher's own connection (a single server or a Sentinel-named master); `None` in
    /// a Redis Cluster, which publishes through `pool`.
    own: Option<PublishConnection>,
    pool: Pool,
    cluster: bool,
    history_ttl: Duration,
    /// `--publish-linger`: how long a publish to an idle queue waits for others to join its
    /// round trip while publishes come in bursts (tokio's timer rounds it up to its next
    /// millisecond tick).
    linger: Duration,
    script: redis::Script,
    metrics: Arc<Metrics>,
}

/// What one round trip publishes: every channel once, with the payloads it gets in publish
/// order (indices into `payloads`, each payload once).
#[derive(Debug, PartialEq)]
struct Plan<'a> {
    pub payloads: Vec<&'a Bytes>,
    pub channels: Vec<(&'a str, Payloads)>,
}

/// A channel's payloads in a round trip: most channels get one, held without an allocation of
/// its own (a notification to 1,000 users plans 1,000 channels).
type Payloads = smallvec::SmallVec<[usize; 2]>;

/// Groups publishes by channel, channels in order of first appearance.
fn plan<'a>(publishes: &'a [Job]) -> Plan<'a> {
    let mut payloads = Vec::with_capacity(publishes.len());
    let n: usize = publishes.iter().map(|j| j.channels.len()).sum();
    let mut channels: Vec<(&str, Payloads)> = Vec::with_capacity(n);
    if let [only] = publishes {
        // A publish's channels are distinct (`Broker::publish`): nothing to group, and no
        // table of 1,000 names to build for a notification to 1,000 users.
        payloads.push(&only.payload);
        channels.extend(
            only.channels
                .iter()
                .map(|ch| (ch, Payloads::from_elem(0, 1))),
        );
        return Plan { payloads, channels };
    }
    let mut index: HashMap<&str, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(n, Default::default());
    for Job {
        channels: chs,
        payload,
        ..
    } in publishes
    {
        let p = payloads.len();
        payloads.push(payload);
        for ch in chs.iter() {
            let at = *index.entry(ch).or_insert_with(|| {
                channels.push((ch, Payloads::new()));
                channels.len() - 1
            });
            channels[at].1.push(p);
        }
    }
    Plan { payloads, channels }
}

/// Takes the publishes of the next round trip from the front of the queue.
fn next_round_trip(jobs: &mut Vec<Job>) -> Vec<Job> {
    let (mut n, mut messages) = (0, 0);
    for job in jobs.iter() {
        if n > 0 && messages + job.channels.len() > MESSAGES_PER_ROUND_TRIP {
            break;
        }
        messages += job.channels.len();
        n += 1;
    }
    jobs.drain(..n).collect()
}

impl Publisher {
    pub(super) fn new(
        own: Option<PublishConnection>,
        pool: Pool,
        cluster: bool,
        history_ttl: Duration,
        linger: Duration,
        metrics: Arc<Metrics>,
    ) -> Publisher {
        Publisher {
            own,
            spare: Mutex::default(),
            linger,
            metrics,
            queue: Mutex::new(Queue::default()),
            pool,
            cluster,
            history_ttl,
            script: redis::Script::new(history::PUBLISH_SCRIPT),
        }
    }

    pub(super) async fn publish(
        self: &Arc<Self>,
        channels: ChannelList,
        payload: Bytes,
    ) -> Result<(), BrokerError> {
        let (done, answer) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock();
            q.jobs.push(Job {
                channels,
                payload,
                done,
            });
            !std::mem::replace(&mut q.flushing, true)
        };
        if start {
            // A task of its own, not the caller: a publish whose caller goes away (an HTTP
            // client that hung up) must not stop the others queued behind it. Boxed: the
            // round trip's state (the pool's and the redis crate's futures) is kilobytes, and
            // the task's cell copied it whole at every change of its stage, several times per
            // publish; behind a box it is written once.
            let me = self.clone();
            tokio::spawn(async move { Box::pin(me.flush()).await });
        }
        // Dropped unanswered only when the runtime is going away.
        answer.await.unwrap_or(Err(BrokerError::Closed))
    }

    async fn flush(&self) {
        let _reset = ResetOnPanic(self);
        // Publishes come in bursts (a back-end notifying the same users of several things at
        // once, its requests a fraction of a millisecond apart): wait for the rest of the burst
        // so that it goes out in one round trip, not as its first publish and then the others
        // a whole fan-out later. Only when the queue was idle (under load the round trips
        // themselves are the wait) and the last round trips showed bursts: a caller that
        // publishes one at a time would otherwise wait the linger on every publish.
        let bursty = self.queue.lock().bursty > 0;
        if bursty && !self.linger.is_zero() {
            tokio::time::sleep(self.linger).await;
        }
        loop {
            let jobs = {
                let mut q = self.queue.lock();
                if q.jobs.is_empty() {
                    q.flushing = false;
                    return;
                }
                next_round_trip(&mut q.jobs)
            };
            self.metrics
                .broker_round_trip_publishes
                .observe(jobs.len() as f64);
            {
                let mut q = self.queue.lock();
                q.bursty = if jobs.len() > 1 {
                    BURST_MEMORY
                } else {
                    q.bursty.saturating_sub(1)
                };
            }
            let result = self.round_trip(&jobs).await;
            for job in jobs {
                let _ = job.done.send(result.clone());
            }
        }
    }

    async fn round_trip(&self, jobs: &[Job]) -> Result<(), BrokerError> {
        let plan = plan(jobs);
        if self.cluster {
            // A pipeline may only name one slot: one per slot, all in flight at once.
            let groups = redis_cluster::by_slot_of(plan.channels, |(ch, _)| ch);
            let publishes = groups
                .iter()
                .map(|group| self.publish_on_one_slot(group, &plan.payloads));
            return futures_util::future::try_join_all(publishes)
                .await
                .map(|_| ());
        }
        self.publish_on_one_slot(&plan.channels, &plan.payloads)
            .await
    }

    /// One round trip: the script calls, or after `NOSCRIPT` (a restarted or failed-over
    /// Redis, its script cache empty) the same calls by EVAL, which loads the script; nothing
    /// ran then, since a missing script fails every call of the round trip.
    async fn publish_on_one_slot(
        &self,
        channels: &[(&str, Payloads)],
        payloads: &[&Bytes],
    ) -> Result<(), BrokerError> {
        match self.send(false, channels, payloads).await {
            Err(BrokerError::Unavailable(Outage::Redis(e))) if e.code() == Some("NOSCRIPT") => {
                self.send(true, channels, payloads).await
            }
            other => other,
        }
    }

    async fn send(
        &self,
        eval: bool,
        channels: &[(&str, Payloads)],
        payloads: &[&Bytes],
    ) -> Result<(), BrokerError> {
        if let Some(own) = &self.own {
            // Sized up front (a call for 128 channels would otherwise grow the buffer a dozen
            // times), from what the calls hold: every name with its key's framing, and each
            // payload once per call that uses it, at most once per channel that gets it.
            let calls = channels.len().div_ceil(history::CHANNELS_PER_CALL);
            let names: usize = channels.iter().map(|(ch, _)| ch.len() + 48).sum();
            let pairs: usize = channels
                .iter()
                .flat_map(|(_, ps)| ps.iter().map(|&p| payloads[p].len() + 16))
                .sum();
            let size = if self.history_ttl.is_zero() {
                names + pairs
            } else {
                let bytes: usize = payloads.iter().map(|p| p.len() + 16).sum();
                let script = if eval {
                    history::PUBLISH_SCRIPT.len()
                } else {
                    0
                };
                names + pairs.min(calls * bytes) + calls * (160 + script)
            };
            let mut request = std::mem::take(&mut *self.spare.lock());
            request.reuse(size);
            self.write_calls(&mut request, eval, channels, payloads);
            let result = own.round_trip(&request).await;
            if request.capacity() <= KEPT_REQUEST_BYTES {
                *self.spare.lock() = request;
            }
            return result;
        }
        let mut pipe = CratePipeline::default();
        self.write_calls(&mut pipe, eval, channels, payloads);
        let pipe = pipe.finish();
        let mut conn = self.pool.get().await?;
        timed(pipe.query_async::<()>(&mut conn)).await
    }

    /// Writes a round trip's commands. Without history, one PUBLISH per message; with it, one
    /// script call per group of channels, each payload once per call (`history.rs`).
    fn write_calls(
        &self,
        out: &mut impl Calls,
        eval: bool,
        channels: &[(&str, Payloads)],
        payloads: &[&Bytes],
    ) {
        let publish: &[u8] = if self.cluster {
            b"SPUBLISH"
        } else {
            b"PUBLISH"
        };
        if self.history_ttl.is_zero() {
            for (ch, ps) in channels {
                for &p in ps {
                    out.command(3);
                    out.arg(publish);
                    out.arg(ch.as_bytes());
                    out.arg_of(&[history::NO_POSITION, payloads[p]]);
                }
            }
            return;
        }
        let ttl_ms = self.history_ttl.as_millis() as u64;
        // A round trip of one publish (the common case) has one payload, which every channel
        // gets: nothing to collect or compare per channel.
        let lone = payloads.len() == 1;
        let mut list = String::new();
        for group in channels.chunks(history::CHANNELS_PER_CALL) {
            let used: smallvec::SmallVec<[usize; 4]> = if lone {
                smallvec::smallvec![0]
            } else {
                let mut used: smallvec::SmallVec<[usize; 4]> = group
                    .iter()
                    .flat_map(|(_, ps)| ps.iter().copied())
                    .collect();
                used.sort_unstable();
                used.dedup();
                used
            };
            // One publish to many users (the common call): every channel gets every payload,
            // and the call names each recipient once, by its key.
            let every = lone || group.iter().all(|(_, ps)| ps[..] == used[..]);
            let lists = if every { 1 } else { group.len() };
            out.command(6 + group.len() + used.len() + lists);
            if eval {
                out.arg(b"EVAL");
                out.arg(history::PUBLISH_SCRIPT.as_bytes());
            } else {
                out.arg(b"EVALSHA");
                out.arg(self.script.get_hash().as_bytes());
            }
            out.int(group.len() as u64);
            for (ch, _) in group {
                out.arg_of(&history::key_parts(ch));
            }
            out.int(ttl_ms);
            out.arg(publish);
            out.int(used.len() as u64);
            for &p in &used {
                out.arg(payloads[p]);
            }
            if every {
                out.arg(b"*");
                continue;
            }
            for (_, ps) in group {
                list.clear();
                for p in ps {
                    // 1-based position among this call's payloads; always found.
                    let k = used.binary_search(p).map_or(0, |k| k + 1);
                    if !list.is_empty() {
                        list.push(',');
                    }
                    let _ = write!(list, "{k}");
                }
                out.arg(list.as_bytes());
            }
        }
    }
}

/// Where a round trip's commands are written: RESP into one buffer for the publisher's own
/// connection (`resp::Request`), or the `redis` crate's pipeline for a Redis Cluster, whose
/// connection routes each slot's calls.
trait Calls {
    /// Starts a command of `args` arguments, its name included.
    fn command(&mut self, args: usize);
    /// One argument made of `parts`, side by side.
    fn arg_of(&mut self, parts: &[&[u8]]);
    fn arg(&mut self, arg: &[u8]) {
        self.arg_of(&[arg]);
    }
    fn int(&mut self, n: u64) {
        self.arg(itoa::Buffer::new().format(n).as_bytes());
    }
}

impl Calls for Request {
    fn command(&mut self, args: usize) {
        Request::command(self, args);
    }
    fn arg_of(&mut self, parts: &[&[u8]]) {
        Request::arg_of(self, parts);
    }
    fn arg(&mut self, arg: &[u8]) {
        Request::arg(self, arg);
    }
}

/// The `redis` crate's pipeline, each command ignored (only errors are read).
#[derive(Default)]
struct CratePipeline {
    pipe: redis::Pipeline,
    cmd: Option<redis::Cmd>,
}

impl CratePipeline {
    fn finish(mut self) -> redis::Pipeline {
        if let Some(cmd) = self.cmd.take() {
            self.pipe.add_command(cmd).ignore();
        }
        self.pipe
    }
}

impl Calls for CratePipeline {
    fn command(&mut self, _args: usize) {
        if let Some(cmd) = self.cmd.replace(redis::Cmd::new()) {
            self.pipe.add_command(cmd).ignore();
        }
    }
    fn arg_of(&mut self, parts: &[&[u8]]) {
        use redis::RedisWrite;
        use std::io::Write;
        if let Some(cmd) = &mut self.cmd {
            let mut arg = cmd.writer_for_next_arg();
            for part in parts {
                // Into a vector: cannot fail.
                let _ = arg.write_all(part);
            }
        }
    }
}

/// A publishing task that panics leaves the queue to the next publish, and fails the
/// publishes it had not taken yet instead of leaving them waiting.
struct ResetOnPanic<'a>(&'a Publisher);

impl Drop for ResetOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut q = self.0.queue.lock();
            q.flushing = false;
            q.jobs.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chans(names: &[&str]) -> ChannelList {
        names.iter().copied().collect()
    }

    #[test]
    fn a_plan_groups_each_channels_payloads_in_publish_order() {
        let (a, b, c) = (
            Bytes::from_static(b"1"),
            Bytes::from_static(b"2"),
            Bytes::from_static(b"3"),
        );
        let (x, y, z) = (chans(&["u1", "u2"]), chans(&["u2", "u3"]), chans(&["u1"]));
        let job = |channels: ChannelList, payload: &Bytes| Job {
            channels,
            payload: payload.clone(),
            done: oneshot::channel().0,
        };
        let jobs = [job(x, &a), job(y, &b), job(z, &c)];
        let p = plan(&jobs);
        assert_eq!(p.payloads, vec![&a, &b, &c]);
        let sorted = |v: &[usize]| Payloads::from_slice(v);
        assert_eq!(
            p.channels,
            vec![
                ("u1", sorted(&[0, 2])),
                ("u2", sorted(&[0, 1])),
                ("u3", sorted(&[1]))
            ]
        );
    }

    #[test]
    fn a_plan_of_one_publish_keeps_its_channels_in_order() {
        let a = Bytes::from_static(b"1");
        let job = Job {
            channels: chans(&["u2", "u1", "u3"]),
            payload: a.clone(),
            done: oneshot::channel().0,
        };
        let p = plan(std::slice::from_ref(&job));
        assert_eq!(p.payloads, vec![&a]);
        let first = Payloads::from_slice(&[0]);
        assert_eq!(
            p.channels,
            vec![("u2", first.clone()), ("u1", first.clone()), ("u3", first)]
        );
    }

    #[test]
    fn a_round_trip_takes_whole_publishes_up_to_its_bound() {
        let job = |n: usize| Job {
            channels: {
                let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
                names.iter().map(String::as_str).collect()
            },
            payload: Bytes::new(),
            done: oneshot::channel().0,
        };
        let mut jobs = vec![job(5000), job(3000), job(500), job(1)];
        assert_eq!(
            next_round_trip(&mut jobs).len(),
            2,
            "5,000 + 3,000 fit in 8,192"
        );
        assert_eq!(next_round_trip(&mut jobs).len(), 2);
        assert!(jobs.is_empty());
        // A publish larger than the bound still goes, alone.
        let mut jobs = vec![job(10_000), job(1)];
        assert_eq!(next_round_trip(&mut jobs).len(), 1);
        assert_eq!(next_round_trip(&mut jobs).len(), 1);
    }
}
