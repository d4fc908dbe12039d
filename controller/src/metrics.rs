//! Prometheus metrics and the health endpoints (`/healthz`, `/readyz`, `/metrics`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use gpu_pilot_api::names::Stage;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use gpu_pilot_core::rollout::NodeState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

pub struct Metrics {
    registry: Registry,
    passes: Counter,
    errors: Family<KindLabel, Counter>,
    duration: Histogram,
    writes: Family<KindLabel, Counter>,
    nodes: Family<StageLabel, Gauge>,
    leader: Gauge,
    /// True once every watch has listed its objects.
    pub ready: AtomicBool,
    /// What `/healthz` answers from.
    pub health: Health,
}

/// Liveness: the reconcile loop bumps a heartbeat every time it goes round (at least once per
/// resync, and around every pass); `/healthz` fails once the heartbeat is older than
/// `stale_after`, or once a task the controller cannot live without has ended. The kubelet's
/// livenessProbe then restarts the pod instead of leaving a wedged controller that answers ok.
pub struct Health {
    started: Instant,
    /// Milliseconds after `started` of the last heartbeat.
    beat_ms: AtomicU64,
    stale_after_ms: AtomicU64,
    ended: parking_lot::Mutex<Option<String>>,
}

impl Health {
    fn new() -> Health {
        Health {
            started: Instant::now(),
            beat_ms: AtomicU64::new(0),
            stale_after_ms: AtomicU64::new(u64::MAX),
            ended: parking_lot::Mutex::new(None),
        }
    }

    fn since_start_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How old the heartbeat may get before `/healthz` fails.
    pub fn set_stale_after(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.stale_after_ms.store(ms, Ordering::Relaxed);
    }

    /// The reconcile loop is alive and not stuck.
    pub fn beat(&self) {
        self.beat_ms.store(self.since_start_ms(), Ordering::Relaxed);
    }

    /// A task that must run for ever has ended (or panicked).
    pub fn task_ended(&self, what: String) {
        self.ended.lock().get_or_insert(what);
    }

    /// `Err(why)` when the controller is wedged or part of it is dead.
    pub fn check(&self) -> Result<(), String> {
        if let Some(what) = self.ended.lock().as_ref() {
            return Err(what.clone());
        }
        let age = self
            .since_start_ms()
            .saturating_sub(self.beat_ms.load(Ordering::Relaxed));
        let limit = self.stale_after_ms.load(Ordering::Relaxed);
        if age > limit {
            return Err(format!(
                "the reconcile loop has not gone round for {:.0}s (limit {:.0}s): it is stuck",
                age as f64 / 1000.0,
                limit as f64 / 1000.0
            ));
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("gpu_pilot_controller");
        let passes = Counter::default();
        let errors = Family::<KindLabel, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let writes = Family::<KindLabel, Counter>::default();
        let nodes = Family::<StageLabel, Gauge>::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconcile passes run", passes.clone());
        registry.register(
            "reconcile_errors",
            "Reconcile passes that failed, by category",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile pass took",
            duration.clone(),
        );
        registry.register(
            "writes",
            "Write requests sent to the API server, by object kind",
            writes.clone(),
        );
        registry.register(
            "nodes",
            "GPU nodes per stage (plus notGpu and optedOut)",
            nodes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Metrics {
            registry,
            passes,
            errors,
            duration,
            writes,
            nodes,
            leader,
            ready: AtomicBool::new(false),
            health: Health::new(),
        }
    }

    pub fn observe_pass(&self, took: Duration, error: Option<&str>) {
        self.passes.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.errors
                .get_or_create(&KindLabel { kind: kind.into() })
                .inc();
        }
    }

    pub fn write(&self, kind: &str) {
        self.writes
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Publishes nodes per stage from the states a pass decided (no second evaluation).
    pub fn set_stages<'a>(&self, states: impl IntoIterator<Item = &'a NodeState>) {
        let mut counts: std::collections::BTreeMap<&str, i64> =
            Stage::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        counts.insert("notGpu", 0);
        counts.insert("optedOut", 0);
        for state in states {
            let key = match state {
                NodeState::Gpu { stage, .. } => stage.as_str(),
                NodeState::NotGpu => "notGpu",
                NodeState::OptedOut => "optedOut",
            };
            *counts.entry(key).or_default() += 1;
        }
        for (stage, n) in counts {
            self.nodes
                .get_or_create(&StageLabel {
                    stage: stage.into(),
                })
                .set(n);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    match m.health.check() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet")
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

pub fn router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_fails_when_the_loop_stops_beating_or_a_task_ends() {
        let h = Health::new();
        h.beat();
        assert_eq!(h.check(), Ok(()), "no limit set yet");
        h.set_stale_after(Duration::from_millis(50));
        h.beat();
        assert_eq!(h.check(), Ok(()));
        std::thread::sleep(Duration::from_millis(120));
        let e = h.check().unwrap_err();
        assert!(e.contains("it is stuck"), "{e}");
        h.beat();
        assert_eq!(h.check(), Ok(()));
        h.task_ended("the Node watch ended".into());
        assert_eq!(h.check(), Err("the Node watch ended".into()));
    }
}
