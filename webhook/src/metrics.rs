//! Prometheus metrics in the text exposition format: admission requests by endpoint and outcome,
//! a latency histogram per endpoint, and certificate facts. Written by hand: a handful of series
//! does not need a metrics library.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

/// How a review ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Patched => "patched",
            Outcome::Denied => "denied",
            Outcome::Invalid => "invalid",
            Outcome::Error => "error",
        }
    }
}

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, Outcome), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    rotations: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
    write_conflicts: AtomicU64,
    cert_not_after: AtomicI64,
}

impl Metrics {
    pub fn observe(&self, endpoint: &'static str, outcome: Outcome, took: Duration) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((endpoint, outcome))
            .or_default() += 1;
        let secs = took.as_secs_f64();
        let mut lat = self.latency.lock().expect("metrics lock");
        let h = lat.entry(endpoint).or_default();
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn requests(&self, endpoint: &str, outcome: Outcome) -> u64 {
        self.requests
            .lock()
            .expect("metrics lock")
            .iter()
            .filter(|((e, o), _)| *e == endpoint && *o == outcome)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Reviews answered on `endpoint`, whatever the outcome.
    pub fn total(&self, endpoint: &str) -> u64 {
        self.requests
            .lock()
            .expect("metrics lock")
            .iter()
            .filter(|((e, _), _)| *e == endpoint)
            .map(|(_, n)| *n)
            .sum()
    }

    pub fn certificate_rotated(&self) {
        self.rotations.fetch_add(1, Ordering::Relaxed);
    }

    pub fn certificate_reloaded(&self, not_after_unix: i64) {
        self.reloads.fetch_add(1, Ordering::Relaxed);
        self.cert_not_after.store(not_after_unix, Ordering::Relaxed);
    }

    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    pub fn certificate_rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    /// A new certificate (from the Secret or the files) could not be served; the old one stays.
    pub fn reload_failed(&self) {
        self.reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// A write to the Secret or a webhook configuration lost a race with another writer (409).
    pub fn write_conflict(&self) {
        self.write_conflicts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn write_conflicts(&self) -> u64 {
        self.write_conflicts.load(Ordering::Relaxed)
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP gpupilot_webhook_requests_total Admission reviews answered, by endpoint and outcome.\n");
        out.push_str("# TYPE gpupilot_webhook_requests_total counter\n");
        for ((endpoint, outcome), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "gpupilot_webhook_requests_total{{endpoint=\"{endpoint}\",outcome=\"{}\"}} {n}",
                outcome.as_str()
            );
        }
        out.push_str("# HELP gpupilot_webhook_request_duration_seconds Time to answer an admission review.\n");
        out.push_str("# TYPE gpupilot_webhook_request_duration_seconds histogram\n");
        for (endpoint, h) in self.latency.lock().expect("metrics lock").iter() {
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "gpupilot_webhook_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"{le}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "gpupilot_webhook_request_duration_seconds_bucket{{endpoint=\"{endpoint}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "gpupilot_webhook_request_duration_seconds_sum{{endpoint=\"{endpoint}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "gpupilot_webhook_request_duration_seconds_count{{endpoint=\"{endpoint}\"}} {}",
                h.count
            );
        }
        out.push_str("# HELP gpupilot_webhook_certificate_rotations_total Serving certificates or CAs this process issued.\n");
        out.push_str("# TYPE gpupilot_webhook_certificate_rotations_total counter\n");
        let _ = writeln!(
            out,
            "gpupilot_webhook_certificate_rotations_total {}",
            self.rotations.load(Ordering::Relaxed)
        );
        out.push_str("# HELP gpupilot_webhook_certificate_reloads_total Times the server loaded a new serving certificate.\n");
        out.push_str("# TYPE gpupilot_webhook_certificate_reloads_total counter\n");
        let _ = writeln!(
            out,
            "gpupilot_webhook_certificate_reloads_total {}",
            self.reloads()
        );
        out.push_str("# HELP gpupilot_webhook_certificate_reload_failures_total New certificates that could not be served (incomplete, mismatched or invalid); the previous one stayed.\n");
        out.push_str("# TYPE gpupilot_webhook_certificate_reload_failures_total counter\n");
        let _ = writeln!(
            out,
            "gpupilot_webhook_certificate_reload_failures_total {}",
            self.reload_failures()
        );
        out.push_str("# HELP gpupilot_webhook_certificate_write_conflicts_total Writes of the TLS Secret or caBundle that lost a race with another replica and were redone from a fresh read.\n");
        out.push_str("# TYPE gpupilot_webhook_certificate_write_conflicts_total counter\n");
        let _ = writeln!(
            out,
            "gpupilot_webhook_certificate_write_conflicts_total {}",
            self.write_conflicts()
        );
        out.push_str("# HELP gpupilot_webhook_certificate_not_after_seconds Expiry of the serving certificate, Unix time.\n");
        out.push_str("# TYPE gpupilot_webhook_certificate_not_after_seconds gauge\n");
        let _ = writeln!(
            out,
            "gpupilot_webhook_certificate_not_after_seconds {}",
            self.cert_not_after.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe("mutate", Outcome::Patched, Duration::from_micros(300));
        m.observe("mutate", Outcome::Allowed, Duration::from_millis(30));
        let text = m.render();
        assert!(text.contains(
            "gpupilot_webhook_requests_total{endpoint=\"mutate\",outcome=\"patched\"} 1"
        ));
        assert!(text.contains("le=\"0.00025\"} 0"));
        assert!(text.contains("le=\"0.0005\"} 1"));
        assert!(text.contains("le=\"0.05\"} 2"));
        assert!(text.contains("le=\"+Inf\"} 2"));
        assert_eq!(m.requests("mutate", Outcome::Allowed), 1);
    }
}
