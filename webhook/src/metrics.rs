//! Prometheus metrics (prometheus-client, OpenMetrics text): admission requests by endpoint and
//! outcome, a latency histogram per endpoint, and certificate facts.

use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

/// How a review ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Admitted unchanged.
    Allowed,
    /// Admitted with a patch.
    Patched,
    /// Refused by a rule.
    Denied,
    /// The request could not be read (answered with HTTP 4xx).
    Invalid,
    /// Facts could not be gathered (the apiserver applies the failure policy).
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Allowed,
        Outcome::Patched,
        Outcome::Denied,
        Outcome::Invalid,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Patched => "patched",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Why a review or connection was refused before it was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shed {
    /// `--max-in-flight` reviews were being answered.
    Requests,
    /// The bodies in flight would pass `--max-in-flight-bytes`.
    Bytes,
    /// `--max-connections` were open.
    Connections,
    /// `--max-connections-per-peer` were open from the same address.
    ConnectionsPerPeer,
    /// `--max-in-flight-per-peer` reviews from the same address were being answered.
    RequestsPerPeer,
}

impl Shed {
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Requests => "requests",
            Shed::Bytes => "bytes",
            Shed::Connections => "connections",
            Shed::ConnectionsPerPeer => "connections_per_peer",
            Shed::RequestsPerPeer => "requests_per_peer",
        }
    }
}

impl EncodeLabelValue for Shed {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabel {
    reason: Shed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: &'static str,
}

type HistogramFamily = Family<EndpointLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    rotations: Counter,
    reloads: Counter,
    reload_failures: Counter,
    write_conflicts: Counter,
    cert_not_after: Gauge<i64, AtomicI64>,
    shed: Family<ShedLabel, Counter>,
    in_flight_requests: Gauge<i64, AtomicI64>,
    in_flight_bytes: Gauge<i64, AtomicI64>,
    connections: Gauge<i64, AtomicI64>,
    idle_closed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gpupilot_webhook");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let rotations = Counter::default();
        let reloads = Counter::default();
        let reload_failures = Counter::default();
        let write_conflicts = Counter::default();
        let cert_not_after = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "requests",
            "Admission reviews answered, by endpoint and outcome",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer an admission review",
            latency.clone(),
        );
        registry.register(
            "certificate_rotations",
            "Serving certificates or CAs this process issued",
            rotations.clone(),
        );
        registry.register(
            "certificate_reloads",
            "Times the server loaded a new serving certificate",
            reloads.clone(),
        );
        registry.register(
            "certificate_reload_failures",
            "New certificates that could not be served (incomplete, mismatched or invalid); the previous one stayed",
            reload_failures.clone(),
        );
        registry.register(
            "certificate_write_conflicts",
            "Writes of the TLS Secret or caBundle that lost a race with another replica and were redone from a fresh read",
            write_conflicts.clone(),
        );
        registry.register(
            "certificate_not_after_seconds",
            "Expiry of the serving certificate, Unix time",
            cert_not_after.clone(),
        );
        let shed = Family::<ShedLabel, Counter>::default();
        let in_flight_requests = Gauge::<i64, AtomicI64>::default();
        let in_flight_bytes = Gauge::<i64, AtomicI64>::default();
        let connections = Gauge::<i64, AtomicI64>::default();
        let idle_closed = Counter::default();
        registry.register(
            "shed",
            "Reviews answered 429 and connections closed at once because a limit was reached, by reason (requests, bytes, connections, connections_per_peer)",
            shed.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Admission reviews being answered",
            in_flight_requests.clone(),
        );
        registry.register(
            "in_flight_bytes",
            "Bytes of review bodies being answered (declared lengths)",
            in_flight_bytes.clone(),
        );
        registry.register(
            "open_connections",
            "Client connections open",
            connections.clone(),
        );
        registry.register(
            "idle_connections_closed",
            "Connections closed because no request came for --idle-timeout",
            idle_closed.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            rotations,
            reloads,
            reload_failures,
            write_conflicts,
            cert_not_after,
            shed,
            in_flight_requests,
            in_flight_bytes,
            connections,
            idle_closed,
        }
    }
}

impl Metrics {
    pub fn observe(&self, endpoint: &'static str, outcome: Outcome, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, outcome })
            .inc();
        self.latency
            .get_or_create(&EndpointLabel { endpoint })
            .observe(took.as_secs_f64());
    }

    pub fn requests(&self, endpoint: &'static str, outcome: Outcome) -> u64 {
        self.requests
            .get_or_create(&RequestLabels { endpoint, outcome })
            .get()
    }

    /// Reviews answered on `endpoint`, whatever the outcome.
    pub fn total(&self, endpoint: &'static str) -> u64 {
        Outcome::ALL
            .into_iter()
            .map(|outcome| self.requests(endpoint, outcome))
            .sum()
    }

    pub fn certificate_rotated(&self) {
        self.rotations.inc();
    }

    pub fn certificate_reloaded(&self, not_after_unix: i64) {
        self.reloads.inc();
        self.cert_not_after.set(not_after_unix);
    }

    pub fn reloads(&self) -> u64 {
        self.reloads.get()
    }

    pub fn certificate_rotations(&self) -> u64 {
        self.rotations.get()
    }

    /// A new certificate (from the Secret or the files) could not be served; the old one stays.
    pub fn reload_failed(&self) {
        self.reload_failures.inc();
    }

    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.get()
    }

    /// A write to the Secret or a webhook configuration lost a race with another writer (409).
    pub fn write_conflict(&self) {
        self.write_conflicts.inc();
    }

    pub fn write_conflicts(&self) -> u64 {
        self.write_conflicts.get()
    }

    /// A review or connection was refused because a limit was reached.
    pub fn shed(&self, reason: Shed) {
        self.shed.get_or_create(&ShedLabel { reason }).inc();
    }

    pub fn shed_count(&self, reason: Shed) -> u64 {
        self.shed.get_or_create(&ShedLabel { reason }).get()
    }

    /// Reviews and body bytes in flight changed by these amounts.
    pub fn in_flight(&self, requests: i64, bytes: i64) {
        self.in_flight_requests.inc_by(requests);
        self.in_flight_bytes.inc_by(bytes);
    }

    /// Reviews and body bytes in flight now.
    pub fn in_flight_now(&self) -> (i64, i64) {
        (self.in_flight_requests.get(), self.in_flight_bytes.get())
    }

    /// A connection opened (+1) or closed (-1).
    pub fn connection(&self, delta: i64) {
        self.connections.inc_by(delta);
    }

    pub fn open_connections(&self) -> i64 {
        self.connections.get()
    }

    pub fn idle_connection_closed(&self) {
        self.idle_closed.inc();
    }

    pub fn idle_connections_closed(&self) -> u64 {
        self.idle_closed.get()
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_cumulative_buckets_as_a_scraper_reads_them() {
        let m = Metrics::default();
        m.observe("mutate", Outcome::Patched, Duration::from_micros(300));
        m.observe("mutate", Outcome::Allowed, Duration::from_millis(30));
        m.certificate_reloaded(1_900_000_000);
        assert_eq!(m.requests("mutate", Outcome::Allowed), 1);
        assert_eq!(m.total("mutate"), 2);
        let text = m.render();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        let scrape = prometheus_parse::Scrape::parse(lines.into_iter().map(Ok)).unwrap();
        let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .map(|s| match &s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => *v,
                    other => panic!("{name}: {other:?}"),
                })
                .unwrap_or_else(|| panic!("{name} {labels:?} in:\n{text}"))
        };
        assert_eq!(
            value(
                "gpupilot_webhook_requests_total",
                &[("endpoint", "mutate"), ("outcome", "patched")]
            ),
            1.0
        );
        assert_eq!(
            value("gpupilot_webhook_certificate_not_after_seconds", &[]),
            1.9e9
        );
        let hist = scrape
            .samples
            .iter()
            .find_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h)
                    if s.metric == "gpupilot_webhook_request_duration_seconds" =>
                {
                    Some(h.clone())
                }
                _ => None,
            })
            .expect("the latency histogram");
        let at = |le: f64| hist.iter().find(|b| b.less_than == le).unwrap().count;
        assert_eq!((at(0.00025), at(0.0005), at(0.05)), (0.0, 1.0, 2.0));
        assert!(
            text.contains("gpupilot_webhook_request_duration_seconds_sum{endpoint=\"mutate\"}")
        );
    }
}
