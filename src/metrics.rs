//! Prometheus metrics: one [`Metrics`] (and one registry) per gateway instance, so that parallel
//! test servers never collide and nothing is global.
//!
//! Hot-path rule: every labelled child that the fan-out path touches is resolved once, here, at
//! start-up, and stored as a plain field. Delivering a message costs a few atomic adds, never a
//! label lookup, a string format or a map access. Counters on the fan-out path are incremented
//! once per broker message by the number of recipients, not once per recipient.

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::{
    proto, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::protocol::Endpoint;

/// Why a connection attempt was refused before the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    MissingKey,
    InvalidKey,
    UserMismatch,
    BackendUnavailable,
    BrokerUnavailable,
    Draining,
    TooManyConnections,
    Origin,
    /// The node holds `--max-connections` sockets.
    NodeFull,
    /// The client IP is over `--max-handshakes-per-ip`.
    HandshakeRate,
}

impl RejectReason {
    pub const ALL: [RejectReason; 10] = [
        RejectReason::MissingKey,
        RejectReason::InvalidKey,
        RejectReason::UserMismatch,
        RejectReason::BackendUnavailable,
        RejectReason::BrokerUnavailable,
        RejectReason::Draining,
        RejectReason::TooManyConnections,
        RejectReason::Origin,
        RejectReason::NodeFull,
        RejectReason::HandshakeRate,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MissingKey => "missing_key",
            RejectReason::InvalidKey => "invalid_key",
            RejectReason::UserMismatch => "user_mismatch",
            RejectReason::BackendUnavailable => "backend_unavailable",
            RejectReason::BrokerUnavailable => "broker_unavailable",
            RejectReason::Draining => "draining",
            RejectReason::TooManyConnections => "too_many_connections",
            RejectReason::Origin => "origin",
            RejectReason::NodeFull => "max_connections",
            RejectReason::HandshakeRate => "handshake_rate",
        }
    }
}

/// Client frames that were dropped without closing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredFrame {
    UnknownCommand,
    Binary,
    InvalidJson,
    NoRoom,
    NotMember,
    UnknownRoom,
    BrokerUnavailable,
    BackendUnavailable,
}

impl IgnoredFrame {
    pub const ALL: [IgnoredFrame; 8] = [
        IgnoredFrame::UnknownCommand,
        IgnoredFrame::Binary,
        IgnoredFrame::InvalidJson,
        IgnoredFrame::NoRoom,
        IgnoredFrame::NotMember,
        IgnoredFrame::UnknownRoom,
        IgnoredFrame::BrokerUnavailable,
        IgnoredFrame::BackendUnavailable,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            IgnoredFrame::UnknownCommand => "unknown_command",
            IgnoredFrame::Binary => "binary",
            IgnoredFrame::InvalidJson => "invalid_json",
            IgnoredFrame::NoRoom => "no_room",
            IgnoredFrame::NotMember => "not_member",
            IgnoredFrame::UnknownRoom => "unknown_room",
            IgnoredFrame::BrokerUnavailable => "broker_unavailable",
            IgnoredFrame::BackendUnavailable => "backend_unavailable",
        }
    }
}

/// Back-end calls, for latency and error metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendCall {
    Authenticate,
    Whoami,
    ChatRoom,
}

impl BackendCall {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendCall::Authenticate => "authenticate",
            BackendCall::Whoami => "whoami",
            BackendCall::ChatRoom => "chat_room",
        }
    }
}

/// Per-endpoint children, resolved once.
pub struct EndpointMetrics {
    pub connections: IntGauge,
    pub opened: IntCounter,
    pub deliveries: IntCounter,
    rejected: Vec<IntCounter>,
    closed: Vec<IntCounter>,
    ignored: Vec<IntCounter>,
}

impl EndpointMetrics {
    pub fn rejected(&self, reason: RejectReason) -> &IntCounter {
        &self.rejected[reason as usize]
    }
    pub fn closed(&self, reason: crate::disconnect::CloseReason) -> &IntCounter {
        &self.closed[reason as usize]
    }
    pub fn ignored(&self, kind: IgnoredFrame) -> &IntCounter {
        &self.ignored[kind as usize]
    }
}

pub struct Metrics {
    registry: Registry,
    pub ready: IntGauge,
    pub notws: EndpointMetrics,
    pub chat: EndpointMetrics,
    pub auth_hit: IntCounter,
    pub auth_miss: IntCounter,
    pub auth_negative_hit: IntCounter,
    pub auth_stale: IntCounter,
    pub room_hit: IntCounter,
    pub room_miss: IntCounter,
    pub backend_duration: HistogramVec,
    pub backend_errors: IntCounterVec,
    /// Back-end calls holding one of the `--backend-concurrency` slots.
    pub backend_in_flight: IntGauge,
    /// Back-end calls waiting for a slot.
    pub backend_queued: IntGauge,
    /// How long a back-end call waited for a slot (including the ones that gave up).
    pub backend_queue_wait: Histogram,
    pub backend_queue_timeouts: IntCounter,
    pub backend_queue_full: IntCounter,
    pub topic_subscriptions: IntGauge,
    pub broker_channels: IntGauge,
    pub broker_up: IntGauge,
    pub broker_received: IntCounter,
    pub broker_published: IntCounter,
    pub broker_publish_duration: Histogram,
    pub broker_publish_errors: IntCounter,
    pub broker_reconnects: IntCounter,
    pub broker_recovered: IntCounter,
    /// Live messages that did not fit `--max-recovery-hold`, by `outcome`: `history` (read back
    /// from it after) or `lost` (no history to read back from).
    pub broker_hold_overflow: IntCounterVec,
    pub broker_round_trip_publishes: Histogram,
    pub broker_read_batch: Histogram,
    pub write_batch_messages: BulkHistogram,
    pub broker_canary_failures: IntCounter,
    /// Per Redis shard (its master's address): 1 while its canary comes back.
    pub broker_shard_up: IntGaugeVec,
    pub fanout_recipients: BulkHistogram,
    pub delivery_latency: BulkHistogram,
    pub outbound_dropped: IntCounter,
    pub slow_consumer_disconnects: IntCounter,
    pub api_requests: IntCounterVec,
    /// Remembered-topic look-ups at handshake, by outcome (see `hub/remembered.rs`).
    pub remembered_restored: IntCounter,
    pub remembered_empty: IntCounter,
    pub remembered_errors: IntCounter,
    pub remembered_topics_restored: IntCounter,
    pub remembered_write_errors: IntCounter,
    pub handshake_timeouts: IntCounter,
    pub revocations: IntCounter,
    /// Connection resume across a drain (see `hub/resume.rs`).
    pub resume_records: IntCounter,
    pub resumed: IntCounter,
    pub resume_replayed: IntCounter,
    pub resume_duplicates: IntCounter,
    pub resume_errors: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("static metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("static metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("static metric definition");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

/// A histogram of whole numbers (recipients, messages, microseconds) that its hot-path writers
/// count into a [`BulkCounts`] of their own and add here once per batch. Through prometheus's
/// `Histogram`, each observation searched the buckets with float comparisons: the fan-out
/// observes three per delivery (recipients per message, latency, messages per write), about
/// 60 to 90 instructions each. Here a value costs an integer search of at most
/// [`MAX_BOUNDS`] bounds, and the text rendered is a prometheus histogram's, with each bound
/// and the sum divided by `per_unit` (1e6 for microseconds rendered as seconds).
#[derive(Clone)]
pub struct BulkHistogram(std::sync::Arc<BulkInner>);

struct BulkInner {
    desc: Desc,
    bounds: &'static [u64],
    per_unit: f64,
    totals: Mutex<BulkCounts>,
}

/// Most bounds a [`BulkHistogram`] has.
pub const MAX_BOUNDS: usize = 16;

/// Values by bucket of one [`BulkHistogram`] (the bucket after its last bound: above every
/// bound), their sum and their number; counted by one writer, added to the histogram at once.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
pub struct BulkCounts {
    buckets: [u64; MAX_BOUNDS + 1],
    sum: u64,
    count: u64,
}

impl BulkCounts {
    fn add(&mut self, other: &BulkCounts) {
        for (total, n) in self.buckets.iter_mut().zip(other.buckets) {
            *total += n;
        }
        self.sum += other.sum;
        self.count += other.count;
    }
}

impl BulkHistogram {
    fn register(
        registry: &Registry,
        name: &str,
        help: &str,
        bounds: &'static [u64],
        per_unit: f64,
    ) -> BulkHistogram {
        assert!(bounds.len() <= MAX_BOUNDS && bounds.is_sorted());
        let desc = Desc::new(name.into(), help.into(), vec![], Default::default())
            .expect("static metric definition");
        let histogram = BulkHistogram(std::sync::Arc::new(BulkInner {
            desc,
            bounds,
            per_unit,
            totals: Mutex::default(),
        }));
        registry
            .register(Box::new(histogram.clone()))
            .expect("metric registered once");
        histogram
    }

    /// Counts `value` into `counts` (to be added later with [`add`](Self::add)).
    pub fn count(&self, counts: &mut BulkCounts, value: u64) {
        let bucket = self.0.bounds.partition_point(|&b| b < value);
        counts.buckets[bucket] += 1;
        counts.sum += value;
        counts.count += 1;
    }

    /// Adds a writer's counts.
    pub fn add(&self, counts: &BulkCounts) {
        if counts.count > 0 {
            self.0.totals.lock().add(counts);
        }
    }

    /// Values observed so far.
    pub fn get_sample_count(&self) -> u64 {
        self.0.totals.lock().count
    }
}

impl Collector for BulkHistogram {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    /// The same text as a prometheus `Histogram`: cumulative buckets, then the sum and count
    /// (the `+Inf` bucket is the count), read under one lock so that they agree.
    fn collect(&self) -> Vec<proto::MetricFamily> {
        let totals = self.0.totals.lock().clone();
        let per_unit = self.0.per_unit;
        let mut cumulative = 0;
        let buckets = self
            .0
            .bounds
            .iter()
            .zip(totals.buckets)
            .map(|(&bound, n)| {
                cumulative += n;
                let mut b = proto::Bucket::default();
                b.set_upper_bound(bound as f64 / per_unit);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut h = proto::Histogram::default();
        h.set_sample_count(totals.count);
        h.set_sample_sum(totals.sum as f64 / per_unit);
        h.set_bucket(buckets);
        let mut m = proto::Metric::default();
        m.set_histogram(h);
        let mut family = proto::MetricFamily::default();
        family.set_name(self.0.desc.fq_name.clone());
        family.set_help(self.0.desc.help.clone());
        family.set_field_type(proto::MetricType::HISTOGRAM);
        family.set_metric(vec![m]);
        vec![family]
    }
}

/// Buckets of `wsgate_fanout_recipients`.
const RECIPIENT_BOUNDS: [u64; 12] = [0, 1, 2, 5, 10, 25, 50, 100, 250, 1000, 5000, 20000];

/// Buckets of `wsgate_socket_write_messages`.
const WRITE_BATCH_BOUNDS: [u64; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Latency buckets from 100 µs to 10 s, in microseconds (`wsgate_delivery_latency_seconds`
/// counts whole microseconds); [`LATENCY_BUCKETS`] are the same in seconds.
const LATENCY_MICROS: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Latency buckets from 100 µs to 10 s: fine enough at the low end to see the in-process path,
/// wide enough at the top to see a stalled broker.
pub const LATENCY_BUCKETS: [f64; 16] = seconds(LATENCY_MICROS);

const fn seconds(micros: [u64; 16]) -> [f64; 16] {
    let mut secs = [0.0; 16];
    let mut i = 0;
    while i < micros.len() {
        secs[i] = micros[i] as f64 / 1e6;
        i += 1;
    }
    secs
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new("wsgate_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("static metric definition");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        r.register(Box::new(build)).expect("metric registered once");

        #[cfg(target_os = "linux")]
        {
            // Standard process_* metrics (RSS, CPU, fds): what memory per connection is sized by.
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            r.register(Box::new(pc)).expect("metric registered once");
        }

        let broker_shard_up = IntGaugeVec::new(
            Opts::new(
                "wsgate_broker_shard_up",
                "1 while the node's subscription to this Redis shard works (its canary arrives).",
            ),
            &["shard"],
        )
        .expect("static metric definition");
        r.register(Box::new(broker_shard_up.clone()))
            .expect("metric registered once");

        let connections = IntGaugeVec::new(
            Opts::new("wsgate_connections", "Open WebSocket connections."),
            &["endpoint"],
        )
        .expect("static metric definition");
        r.register(Box::new(connections.clone()))
            .expect("metric registered once");
        let opened = counter_vec(
            &r,
            "wsgate_connections_opened_total",
            "WebSocket connections accepted (upgraded).",
            &["endpoint"],
        );
        let rejected = counter_vec(
            &r,
            "wsgate_connections_rejected_total",
            "Connection attempts refused before the upgrade, by reason.",
            &["endpoint", "reason"],
        );
        let closed = counter_vec(
            &r,
            "wsgate_connections_closed_total",
            "WebSocket connections closed, by reason.",
            &["endpoint", "reason"],
        );
        let deliveries = counter_vec(
            &r,
            "wsgate_deliveries_total",
            "Messages queued to a client connection (one per recipient connection).",
            &["endpoint"],
        );
        let ignored = counter_vec(
            &r,
            "wsgate_client_frames_ignored_total",
            "Client frames dropped without closing the connection, by kind.",
            &["endpoint", "kind"],
        );
        let endpoint = |e: Endpoint| {
            let name = e.as_str();
            EndpointMetrics {
                connections: connections.with_label_values(&[name]),
                opened: opened.with_label_values(&[name]),
                deliveries: deliveries.with_label_values(&[name]),
                rejected: RejectReason::ALL
                    .iter()
                    .map(|r| rejected.with_label_values(&[name, r.as_str()]))
                    .collect(),
                closed: crate::disconnect::CloseReason::ALL
                    .iter()
                    .map(|r| closed.with_label_values(&[name, r.as_str()]))
                    .collect(),
                ignored: IgnoredFrame::ALL
                    .iter()
                    .map(|k| ignored.with_label_values(&[name, k.as_str()]))
                    .collect(),
            }
        };
        let notws = endpoint(Endpoint::Notws);
        let chat = endpoint(Endpoint::Chat);

        let auth = counter_vec(
            &r,
            "wsgate_auth_cache_requests_total",
            "API key look-ups, by cache result (hit, miss, negative_hit, stale).",
            &["result"],
        );
        let room = counter_vec(
            &r,
            "wsgate_chat_room_cache_requests_total",
            "Chat room member look-ups, by cache result.",
            &["result"],
        );
        let backend_duration = HistogramVec::new(
            HistogramOpts::new(
                "wsgate_backend_request_duration_seconds",
                "Latency of calls to the Moqui/GrowERP back-end.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["call"],
        )
        .expect("static metric definition");
        r.register(Box::new(backend_duration.clone()))
            .expect("metric registered once");
        let backend_errors = counter_vec(
            &r,
            "wsgate_backend_errors_total",
            "Failed back-end calls, by call and kind (timeout, connect, status, invalid_response).",
            &["call", "kind"],
        );
        for call in ["authenticate", "whoami", "chat_room"] {
            backend_duration.with_label_values(&[call]);
            for kind in ["timeout", "connect", "status", "invalid_response"] {
                backend_errors.with_label_values(&[call, kind]);
            }
        }
        let remembered = counter_vec(
            &r,
            "wsgate_remembered_topics_restores_total",
            "/notws handshakes that looked up their user's remembered topics, by outcome (restored, empty, error).",
            &["outcome"],
        );
        let api_requests = counter_vec(
            &r,
            "wsgate_api_requests_total",
            "Internal publish/presence API requests, by route and status.",
            &["route", "status"],
        );
        for (route, ok) in [
            ("notifications", "202"),
            ("chat", "202"),
            ("presence", "200"),
            ("revocations", "202"),
        ] {
            api_requests.with_label_values(&[route, ok]);
        }

        Metrics {
            ready: gauge(
                &r,
                "wsgate_ready",
                "1 when this node accepts connections (broker up, not draining).",
            ),
            notws,
            chat,
            auth_hit: auth.with_label_values(&["hit"]),
            auth_miss: auth.with_label_values(&["miss"]),
            auth_negative_hit: auth.with_label_values(&["negative_hit"]),
            auth_stale: auth.with_label_values(&["stale"]),
            handshake_timeouts: counter(
                &r,
                "wsgate_handshake_timeouts_total",
                "Public connections dropped because the request headers did not arrive within --handshake-timeout.",
            ),
            revocations: counter(
                &r,
                "wsgate_revocations_total",
                "Credential revocations applied on this node (cached identities forgotten, sockets closed 1008).",
            ),
            room_hit: room.with_label_values(&["hit"]),
            room_miss: room.with_label_values(&["miss"]),
            backend_duration,
            backend_errors,
            backend_in_flight: gauge(
                &r,
                "wsgate_backend_in_flight",
                "Back-end calls in flight (at most --backend-concurrency).",
            ),
            backend_queued: gauge(
                &r,
                "wsgate_backend_queued",
                "Back-end calls waiting for a free slot (at most --backend-queue).",
            ),
            backend_queue_wait: histogram(
                &r,
                "wsgate_backend_queue_wait_seconds",
                "How long back-end calls waited for a free slot, including the ones that gave up.",
                LATENCY_BUCKETS.to_vec(),
            ),
            backend_queue_timeouts: counter(
                &r,
                "wsgate_backend_queue_timeouts_total",
                "Back-end calls given up after waiting --backend-queue-timeout for a slot (the handshake got 503).",
            ),
            backend_queue_full: counter(
                &r,
                "wsgate_backend_queue_full_total",
                "Back-end calls refused at once because --backend-queue calls were already waiting (the handshake got 503).",
            ),
            topic_subscriptions: gauge(
                &r,
                "wsgate_topic_subscriptions",
                "Topic subscriptions held by /notws connections on this node (ALL counts as one).",
            ),
            broker_channels: gauge(
                &r,
                "wsgate_broker_channels",
                "Broker channels this node is subscribed to.",
            ),
            broker_up: gauge(
                &r,
                "wsgate_broker_up",
                "1 while the broker connection is up and its canary arrives.",
            ),
            broker_received: counter(
                &r,
                "wsgate_broker_messages_received_total",
                "Messages received from the broker.",
            ),
            broker_published: counter(
                &r,
                "wsgate_broker_messages_published_total",
                "Messages published to the broker (one per channel).",
            ),
            broker_publish_duration: histogram(
                &r,
                "wsgate_broker_publish_duration_seconds",
                "Time to publish one batch to the broker.",
                LATENCY_BUCKETS.to_vec(),
            ),
            broker_publish_errors: counter(
                &r,
                "wsgate_broker_publish_errors_total",
                "Publish batches that failed.",
            ),
            broker_reconnects: counter(
                &r,
                "wsgate_broker_reconnects_total",
                "Times the broker subscription connection was re-established.",
            ),
            broker_recovered: counter(
                &r,
                "wsgate_broker_recovered_messages_total",
                "Messages the node read from channel history because pub/sub had lost them.",
            ),
            broker_hold_overflow: counter_vec(
                &r,
                "wsgate_broker_hold_overflow_total",
                "Live messages that did not fit --max-recovery-hold while delivery waited for a recovery, by outcome: read back from history after (history) or lost (lost, no history).",
                &["outcome"],
            ),
            broker_round_trip_publishes: histogram(
                &r,
                "wsgate_broker_round_trip_publishes",
                "Publishes that went to Redis in one round trip (grouped by channel).",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            broker_read_batch: histogram(
                &r,
                "wsgate_broker_read_batch_messages",
                "Messages the subscription delivered before waking the writers.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            write_batch_messages: BulkHistogram::register(
                &r,
                "wsgate_socket_write_messages",
                "Messages written to a socket together (one flush).",
                &WRITE_BATCH_BOUNDS,
                1.0,
            ),
            broker_canary_failures: counter(
                &r,
                "wsgate_broker_canary_failures_total",
                "Canary messages that did not come back through the broker in time.",
            ),
            broker_shard_up,
            fanout_recipients: BulkHistogram::register(
                &r,
                "wsgate_fanout_recipients",
                "Local recipient connections per broker message on this node.",
                &RECIPIENT_BOUNDS,
                1.0,
            ),
            delivery_latency: BulkHistogram::register(
                &r,
                "wsgate_delivery_latency_seconds",
                "Time from the publisher's timestamp to the socket write.",
                &LATENCY_MICROS,
                1e6,
            ),
            outbound_dropped: counter(
                &r,
                "wsgate_outbound_dropped_total",
                "Messages not queued because a connection's outbound queue was full.",
            ),
            slow_consumer_disconnects: counter(
                &r,
                "wsgate_slow_consumer_disconnects_total",
                "Connections closed because they did not read fast enough (close 4008).",
            ),
            api_requests,
            remembered_restored: remembered.with_label_values(&["restored"]),
            remembered_empty: remembered.with_label_values(&["empty"]),
            remembered_errors: remembered.with_label_values(&["error"]),
            remembered_topics_restored: counter(
                &r,
                "wsgate_remembered_topics_restored_total",
                "Topics given to /notws connections from their user's remembered set.",
            ),
            remembered_write_errors: counter(
                &r,
                "wsgate_remembered_topics_write_errors_total",
                "Writes of a user's remembered /notws topics that the broker did not accept.",
            ),
            resume_records: counter(
                &r,
                "wsgate_resume_records_written_total",
                "Resume records written for connections closed by a drain.",
            ),
            resumed: counter(
                &r,
                "wsgate_resumed_connections_total",
                "Connections that found a resume record at their handshake and were given what they missed.",
            ),
            resume_replayed: counter(
                &r,
                "wsgate_resume_replayed_messages_total",
                "Messages replayed from history to resumed connections.",
            ),
            resume_duplicates: counter(
                &r,
                "wsgate_resume_duplicates_total",
                "Replayed messages that another connection of the same resume key had already received (several connections per key).",
            ),
            resume_errors: counter(
                &r,
                "wsgate_resume_errors_total",
                "Resume records or history reads the broker did not answer; the connection starts without a replay.",
            ),
            registry: r,
        }
    }

    pub fn endpoint(&self, e: Endpoint) -> &EndpointMetrics {
        match e {
            Endpoint::Notws => &self.notws,
            Endpoint::Chat => &self.chat,
        }
    }

    pub fn backend_error(&self, call: BackendCall, kind: &str) {
        self.backend_errors
            .with_label_values(&[call.as_str(), kind])
            .inc();
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bulk histogram renders what prometheus's own `Histogram` renders for the same
    /// observations, so dashboards and rules read it unchanged.
    fn renders_as_prometheus(
        bulk: &BulkHistogram,
        name: &str,
        help: &str,
        bounds: Vec<f64>,
        values: &[u64],
        per_unit: f64,
    ) {
        let mut counts = BulkCounts::default();
        for &v in values {
            bulk.count(&mut counts, v);
        }
        bulk.add(&counts);
        bulk.add(&BulkCounts::default());
        assert_eq!(bulk.get_sample_count(), values.len() as u64);
        let reference = Registry::new();
        let h = histogram(&reference, name, help, bounds);
        for &v in values {
            h.observe(v as f64 / per_unit);
        }
        let text = |r: &Registry| {
            let mut out = Vec::new();
            TextEncoder::new()
                .encode(&r.gather(), &mut out)
                .expect("encodes");
            String::from_utf8(out).expect("text")
        };
        let ours = Registry::new();
        ours.register(Box::new(bulk.clone())).expect("registers");
        assert_eq!(text(&ours), text(&reference));
    }

    #[test]
    fn bulk_histograms_render_as_prometheus_histograms() {
        let m = Metrics::new();
        renders_as_prometheus(
            &m.fanout_recipients,
            "wsgate_fanout_recipients",
            "Local recipient connections per broker message on this node.",
            RECIPIENT_BOUNDS.iter().map(|&b| b as f64).collect(),
            &[0, 1, 1, 2, 3, 5, 6, 999, 1000, 1001, 20000, 30000],
            1.0,
        );
        renders_as_prometheus(
            &m.write_batch_messages,
            "wsgate_socket_write_messages",
            "Messages written to a socket together (one flush).",
            WRITE_BATCH_BOUNDS.iter().map(|&b| b as f64).collect(),
            &[1, 1, 3, 128, 129],
            1.0,
        );
        // Microseconds rendered as seconds: the bounds exactly; a sum of whole microseconds
        // converted once can differ from a sum of converted values in its last digits, so
        // these values convert exactly.
        assert_eq!(
            LATENCY_MICROS.map(|b| b as f64 / 1e6),
            LATENCY_BUCKETS,
            "the same bounds"
        );
        renders_as_prometheus(
            &m.delivery_latency,
            "wsgate_delivery_latency_seconds",
            "Time from the publisher's timestamp to the socket write.",
            LATENCY_BUCKETS.to_vec(),
            &[0, 500_000, 20_000_000],
            1e6,
        );
    }
}
