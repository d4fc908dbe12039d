//! Prometheus metrics and the health endpoints (`/healthz`, `/readyz`, `/metrics`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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

async fn healthz() -> &'static str {
    "ok"
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
