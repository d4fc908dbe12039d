//! The reconciler: one pass takes the [`Plan`] core's pure `decide` makes from the in-memory
//! view, and writes only what differs. Failed passes are retried with an exponential backoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use gpu_pilot_api::names::{FINALIZER, Stage, field_manager};
use gpu_pilot_api::{ClusterPolicy, ClusterPolicyStatus};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex as AsyncMutex;

use gpu_pilot_core::decide::{Cleanup, Invalid, Plan, Rollout, decide};
use gpu_pilot_core::facts::pick_active;
use gpu_pilot_core::index::Indexed;
use gpu_pilot_core::render::operands::{self as render, Desired};
use gpu_pilot_core::render::{content_hash, managed_selector};
use gpu_pilot_core::rollout::{self, NodePlan, NodeState};
use gpu_pilot_core::status::{self, WriteFailure};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Error as FinalizerError, Event as FinalizerEvent, finalizer};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::DefaultBackoff;

use crate::fence::{Fence, Fenced};
use crate::metrics::Metrics;
use crate::watch::SharedIndex;

/// Why a reconcile pass failed, grouped for metrics and Events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing {what}: {}", api_message(source))]
    Write {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// kube-runtime's finalizer helper refused the policy (no name); cannot happen for objects
    /// read from the apiserver.
    #[error("cannot manage the finalizer of ClusterPolicy {0:?}")]
    Finalizer(String),
    /// Leadership ended: the pass stopped before its next write.
    #[error(transparent)]
    Fenced(#[from] Fenced),
    /// The pass ran past its time limit and was stopped; the next one starts from the index.
    #[error("a reconcile pass ran longer than {0:?} and was stopped; the next pass starts over")]
    Timeout(Duration),
}

/// The API server's own sentence, without the debug dump of the whole Status.
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} (HTTP {})", s.message, s.code),
        other => other.to_string(),
    }
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Write { .. } => "write",
            Error::Finalizer(_) => "finalizer",
            Error::Fenced(_) => "fenced",
            Error::Timeout(_) => "timeout",
        }
    }

    /// The failed write, for the policy's `WriteFailed` condition and a Warning Event.
    pub fn failure(&self) -> Option<WriteFailure> {
        match self {
            Error::Write { what, source } => {
                let code = match source {
                    kube::Error::Api(s) => Some(s.code),
                    _ => None,
                };
                Some(WriteFailure {
                    what: what.clone(),
                    reason: WriteFailure::reason_for(code).into(),
                    message: api_message(source),
                })
            }
            _ => None,
        }
    }
}

/// Everything a pass needs.
pub struct Context {
    pub client: Client,
    pub namespace: String,
    pub index: SharedIndex,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Hashes of the cluster-scoped and namespaced helper objects applied by this process.
    applied: AsyncMutex<HashMap<String, String>>,
    /// Stage transitions waiting to be reported as one Event per stage.
    pending_events: AsyncMutex<PendingEvents>,
    /// How many node patches run at once.
    pub write_concurrency: usize,
    /// Open while this replica may write.
    pub fence: Fence,
    /// The write that failed the last pass, until a pass succeeds.
    last_failure: parking_lot::Mutex<Option<WriteFailure>>,
    /// The longest a pass may run before it is stopped (and counted as failed).
    pub pass_timeout: Duration,
}

/// How long one pass may take: thousands of node patches take seconds; a pass stuck on a hung
/// connection is stopped and the next one starts over.
pub const PASS_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Default)]
struct PendingEvents {
    reached: BTreeMap<Stage, Vec<String>>,
    last_flush: Option<Instant>,
}

/// How often stage-transition Events are summarised (at most one per stage per interval).
const EVENT_INTERVAL: Duration = Duration::from_secs(5);

impl Context {
    pub fn new(
        client: Client,
        namespace: String,
        index: SharedIndex,
        metrics: Arc<Metrics>,
        recorder: Recorder,
        fence: Fence,
    ) -> Context {
        Context {
            client,
            namespace,
            index,
            metrics,
            recorder,
            applied: AsyncMutex::new(HashMap::new()),
            pending_events: AsyncMutex::new(PendingEvents::default()),
            write_concurrency: 32,
            fence,
            last_failure: parking_lot::Mutex::new(None),
            pass_timeout: PASS_TIMEOUT,
        }
    }

    /// Publishes an Event on `policy`, unless this replica may no longer write.
    async fn publish(&self, ev: &Event, policy: &k8s_openapi::api::core::v1::ObjectReference) {
        if self.fence.check().is_err() {
            return;
        }
        if let Err(e) = self.recorder.publish(ev, policy).await {
            tracing::warn!(error = %e, "could not publish an Event");
        }
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// One reconcile pass. Returns how many writes it made.
pub async fn reconcile_once(ctx: &Context) -> Result<usize, Error> {
    let started = Instant::now();
    let failure = ctx.last_failure.lock().clone();
    let plan = decide(&ctx.index.lock(), &ctx.namespace, &now(), failure.as_ref());
    if let Plan::Rollout(r) = &plan {
        ctx.metrics.set_stages(&r.states);
    }
    let mut writes = 0usize;
    let result = execute(ctx, plan, &mut writes).await;
    ctx.metrics.observe_pass(
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    result.map(|_| writes)
}

async fn execute(ctx: &Context, plan: Plan, writes: &mut usize) -> Result<(), Error> {
    let policies: Api<ClusterPolicy> = Api::all(ctx.client.clone());
    for (p, st) in plan.ignored() {
        patch_status(ctx, &policies, p, st).await?;
        *writes += 1;
    }
    let active = match &plan {
        Plan::Idle => return Ok(()),
        Plan::Rollout(r) => r.active.clone(),
        Plan::Cleanup(c) => c.active.clone(),
        Plan::Invalid(i) => i.active.clone(),
    };
    // kube-runtime's finalizer helper adds and removes `gpupilot.io/cleanup` with a JSON patch
    // that first tests the list it read, so a concurrent edit fails the patch instead of being
    // overwritten; it runs the rollout only once the finalizer is in place, and the cleanup only
    // while it still is.
    let has_finalizer = active.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = matches!(plan, Plan::Cleanup(_));
    let name = active.name_any();
    let mut done = 0usize;
    // The helper may write the finalizer before it calls back.
    ctx.fence.check()?;
    let result = finalizer(&policies, FINALIZER, Arc::new(active), |event| {
        let done = &mut done;
        async move {
            match (event, plan) {
                (FinalizerEvent::Apply(_), Plan::Rollout(r)) => rollout(ctx, *r, done).await,
                (FinalizerEvent::Apply(_), Plan::Invalid(i)) => invalid(ctx, *i, done).await,
                (FinalizerEvent::Cleanup(_), Plan::Cleanup(c)) => cleanup(ctx, *c, done).await,
                // The helper reads the same deletion timestamp `decide` did.
                _ => Ok(()),
            }
            .map(|()| Action::await_change())
        }
    })
    .await;
    *writes += done;
    match result {
        Ok(_) => {}
        Err(FinalizerError::ApplyFailed(e) | FinalizerError::CleanupFailed(e)) => return Err(e),
        // Gone already: nothing is left to release.
        Err(FinalizerError::RemoveFinalizer(kube::Error::Api(s))) if s.code == 404 => {}
        Err(FinalizerError::AddFinalizer(source)) => {
            return Err(Error::Write {
                what: format!("the finalizer of ClusterPolicy {name}"),
                source,
            });
        }
        Err(FinalizerError::RemoveFinalizer(source)) => {
            return Err(Error::Write {
                what: format!("removing the finalizer of ClusterPolicy {name}"),
                source,
            });
        }
        Err(FinalizerError::UnnamedObject | FinalizerError::InvalidFinalizer) => {
            return Err(Error::Finalizer(name));
        }
    }
    // The helper's own write: the finalizer added (rollouts start with it) or released.
    if has_finalizer == deleting {
        ctx.metrics.write("policy");
        *writes += 1;
        if deleting {
            ctx.applied.lock().await.clear();
            tracing::info!(policy = %name, "removed every operand and node label; finalizer released");
        }
    }
    Ok(())
}

/// The policy cannot be rendered: nothing is touched; the status and a Warning Event say why.
async fn invalid(ctx: &Context, plan: Invalid, writes: &mut usize) -> Result<(), Error> {
    let Some(st) = &plan.status else {
        return Ok(());
    };
    let policies: Api<ClusterPolicy> = Api::all(ctx.client.clone());
    patch_status(ctx, &policies, &plan.active, st).await?;
    *writes += 1;
    tracing::warn!(policy = %plan.active.name_any(), reason = %plan.reason, "the policy cannot be rendered");
    let ev = Event {
        type_: EventType::Warning,
        reason: "InvalidSpec".into(),
        note: Some(plan.reason),
        action: "Render".into(),
        secondary: None,
    };
    ctx.publish(&ev, &plan.active.object_ref(&())).await;
    Ok(())
}

/// Keeps the active policy's operands in place and moves the nodes on.
async fn rollout(ctx: &Context, plan: Rollout, writes: &mut usize) -> Result<(), Error> {
    let Rollout {
        active,
        desired,
        stale_daemonsets,
        daemonset_applies,
        node_plans,
        status,
        ..
    } = plan;
    *writes += apply_helpers(ctx, &active, &desired).await?;

    let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let ssa = PatchParams::apply(field_manager::CONTROLLER).force();
    for ds in &daemonset_applies {
        let name = ds.name_any();
        // The index sees only gpu-pilot's DaemonSets: one it does not know may be someone else's.
        let known = ctx.index.lock().daemonsets.contains_key(&name);
        if !known && !may_write(&ds_api, &name, "DaemonSet").await? {
            not_owned(ctx, &active, "DaemonSet", &name).await;
            continue;
        }
        ctx.fence.check()?;
        let applied = ds_api
            .patch(&name, &ssa, &Patch::Apply(ds))
            .await
            .map_err(|source| Error::Write {
                what: format!("DaemonSet {name}"),
                source,
            })?;
        ctx.metrics.write("daemonset");
        *writes += 1;
        applied.upsert(&mut ctx.index.lock());
        tracing::info!(daemonset = %name, "applied");
    }
    for name in &stale_daemonsets {
        delete_daemonset(ctx, &ds_api, name).await?;
        *writes += 1;
    }

    *writes += patch_nodes(ctx, node_plans).await?;

    if let Some(st) = &status {
        let policies: Api<ClusterPolicy> = Api::all(ctx.client.clone());
        patch_status(ctx, &policies, &active, st).await?;
        *writes += 1;
    }
    flush_events(ctx, &active).await;
    Ok(())
}

/// Service accounts, the agent's RBAC and the RuntimeClass: applied when their rendering changes
/// (and once after each start, since this process does not watch them).
/// An object by that name that someone else made is left as it is (a RuntimeClass `nvidia` an
/// admin or another operator created, say): reported once per rendering, never overwritten.
async fn apply_helpers(
    ctx: &Context,
    policy: &ClusterPolicy,
    desired: &Desired,
) -> Result<usize, Error> {
    let mut applied = ctx.applied.lock().await;
    let ssa = PatchParams::apply(field_manager::CONTROLLER).force();
    let mut writes = 0;
    macro_rules! apply_if_changed {
        ($api:expr, $obj:expr, $kind:literal, $display:literal) => {{
            let obj = $obj;
            let name = obj.name_any();
            let key = format!("{}/{}", $kind, name);
            let hash = content_hash(obj);
            if applied.get(&key) != Some(&hash) {
                if may_write(&$api, &name, $display).await? {
                    ctx.fence.check()?;
                    $api.patch(&name, &ssa, &Patch::Apply(obj))
                        .await
                        .map_err(|source| Error::Write {
                            what: key.clone(),
                            source,
                        })?;
                    ctx.metrics.write($kind);
                    writes += 1;
                } else {
                    not_owned(ctx, policy, $display, &name).await;
                }
                applied.insert(key, hash);
            }
        }};
    }
    let sa_api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    for sa in &desired.service_accounts {
        apply_if_changed!(sa_api, sa, "serviceaccount", "ServiceAccount");
    }
    let cr_api: Api<ClusterRole> = Api::all(ctx.client.clone());
    apply_if_changed!(cr_api, &desired.agent_role, "clusterrole", "ClusterRole");
    let crb_api: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    apply_if_changed!(
        crb_api,
        &desired.agent_role_binding,
        "clusterrolebinding",
        "ClusterRoleBinding"
    );
    let rc_api: Api<RuntimeClass> = Api::all(ctx.client.clone());
    apply_if_changed!(
        rc_api,
        &desired.runtime_class,
        "runtimeclass",
        "RuntimeClass"
    );
    Ok(writes)
}

/// Whether the controller may write an object: it does not exist, or gpu-pilot made it.
async fn may_write<K>(api: &Api<K>, name: &str, kind: &str) -> Result<bool, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_metadata_opt(name).await {
        Ok(None) => Ok(true),
        Ok(Some(o)) => Ok(o
            .labels()
            .get(gpu_pilot_api::names::label::MANAGED_BY)
            .is_some_and(|v| v == gpu_pilot_api::names::label::MANAGED_BY_VALUE)),
        Err(source) => Err(Error::Write {
            what: format!("reading {kind} {name}"),
            source,
        }),
    }
}

/// Logs and reports (a Warning Event on the policy) an object gpu-pilot would write but did not
/// make.
async fn not_owned(ctx: &Context, policy: &ClusterPolicy, kind: &str, name: &str) {
    let note = format!(
        "{kind} {name} exists and was not created by gpu-pilot (no {}={} label): left as it is",
        gpu_pilot_api::names::label::MANAGED_BY,
        gpu_pilot_api::names::label::MANAGED_BY_VALUE
    );
    tracing::warn!(kind, name, "{note}");
    let ev = Event {
        type_: EventType::Warning,
        reason: "NotOwned".into(),
        note: Some(note),
        action: "Apply".into(),
        secondary: None,
    };
    ctx.publish(&ev, &policy.object_ref(&())).await;
}

async fn delete_daemonset(ctx: &Context, api: &Api<DaemonSet>, name: &str) -> Result<(), Error> {
    ctx.fence.check()?;
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(source) => {
            return Err(Error::Write {
                what: format!("deleting DaemonSet {name}"),
                source,
            });
        }
    }
    ctx.metrics.write("daemonset");
    ctx.index.lock().daemonsets.remove(name);
    tracing::info!(daemonset = %name, "deleted: its component is disabled");
    Ok(())
}

/// Sends the label changes, many nodes at once; keeps the in-memory view current on success.
async fn patch_nodes(ctx: &Context, plans: Vec<(String, NodePlan)>) -> Result<usize, Error> {
    if plans.is_empty() {
        return Ok(0);
    }
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut reached: Vec<(Stage, String)> = Vec::new();
    let mut failures: Vec<(String, Stage, String)> = Vec::new();
    for (name, plan) in &plans {
        if let NodeState::Gpu {
            stage,
            reason,
            failure,
        } = &plan.state
        {
            if plan.labels.contains_key(gpu_pilot_api::names::label::STAGE) {
                reached.push((*stage, name.clone()));
            }
            if *failure
                && plan
                    .annotations
                    .get(gpu_pilot_api::names::annotation::STAGE_REASON)
                    .is_some_and(|v| v.is_some())
            {
                failures.push((name.clone(), *stage, reason.clone().unwrap_or_default()));
            }
        }
    }
    let results: Vec<Result<(), Error>> = stream::iter(plans)
        .map(|(name, plan)| {
            let nodes = nodes.clone();
            async move {
                let body = json!({
                    "metadata": { "labels": plan.labels, "annotations": plan.annotations }
                });
                ctx.fence.check()?;
                let r = nodes
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                    .await;
                match r {
                    Ok(_) => {
                        ctx.metrics.write("node");
                        if let Some(n) = ctx.index.lock().nodes.get_mut(&name) {
                            rollout::apply_plan(n, &plan);
                        }
                        Ok(())
                    }
                    // A node deleted under us needs nothing more.
                    Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                    Err(source) => Err(Error::Write {
                        what: format!("labels of node {name}"),
                        source,
                    }),
                }
            }
        })
        .buffer_unordered(ctx.write_concurrency)
        .collect()
        .await;
    let written = results.iter().filter(|r| r.is_ok()).count();
    {
        let mut pending = ctx.pending_events.lock().await;
        for (stage, name) in reached {
            pending.reached.entry(stage).or_default().push(name);
        }
    }
    for (name, stage, reason) in failures {
        publish_failure(ctx, &name, stage, &reason).await;
    }
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(written)
}

async fn patch_status(
    ctx: &Context,
    api: &Api<ClusterPolicy>,
    policy: &ClusterPolicy,
    st: &ClusterPolicyStatus,
) -> Result<(), Error> {
    let name = policy.name_any();
    let body = json!({
        "apiVersion": "gpupilot.io/v1alpha1",
        "kind": "ClusterPolicy",
        "status": st,
    });
    ctx.fence.check()?;
    let updated = api
        .patch_status(
            &name,
            &PatchParams::apply(field_manager::CONTROLLER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| Error::Write {
            what: format!("status of ClusterPolicy {name}"),
            source,
        })?;
    ctx.metrics.write("status");
    updated.upsert(&mut ctx.index.lock());
    Ok(())
}

/// The policy is being deleted: remove operands and every node label (the finalizer helper
/// releases the policy afterwards).
async fn cleanup(ctx: &Context, plan: Cleanup, writes: &mut usize) -> Result<(), Error> {
    let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    for name in &plan.daemonsets {
        delete_daemonset(ctx, &ds_api, name).await?;
        *writes += 1;
    }
    *writes += patch_nodes(ctx, plan.node_plans).await?;
    *writes += delete_helpers(ctx).await?;
    Ok(())
}

async fn delete_helpers(ctx: &Context) -> Result<usize, Error> {
    // Only what `render` made (the controller's own RBAC carries the same managed-by label).
    let lp = ListParams::default().labels(&format!(
        "{},{} in ({})",
        managed_selector(),
        gpu_pilot_api::names::label::COMPONENT,
        render::HELPER_COMPONENTS.join(",")
    ));
    let mut n = 0;
    macro_rules! delete_all {
        ($api:expr) => {{
            let api = $api;
            let list = api
                .list_metadata(&lp)
                .await
                .map_err(|source| Error::Write {
                    what: "listing operand helpers".into(),
                    source,
                })?;
            for o in list.items {
                ctx.fence.check()?;
                match api.delete(&o.name_any(), &DeleteParams::background()).await {
                    Ok(_) => n += 1,
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(source) => {
                        return Err(Error::Write {
                            what: format!("deleting {}", o.name_any()),
                            source,
                        });
                    }
                }
            }
        }};
    }
    delete_all!(Api::<ServiceAccount>::namespaced(
        ctx.client.clone(),
        &ctx.namespace
    ));
    delete_all!(Api::<ClusterRoleBinding>::all(ctx.client.clone()));
    delete_all!(Api::<ClusterRole>::all(ctx.client.clone()));
    delete_all!(Api::<RuntimeClass>::all(ctx.client.clone()));
    Ok(n)
}

async fn publish_failure(ctx: &Context, node: &str, stage: Stage, reason: &str) {
    let policy = {
        let idx = ctx.index.lock();
        pick_active(idx.policies.values()).map(|p| p.object_ref(&()))
    };
    let Some(reference) = policy else { return };
    let ev = Event {
        type_: EventType::Warning,
        reason: "NodeStageFailed".into(),
        note: Some(format!("node {node} is held at stage {stage}: {reason}")),
        action: "Rollout".into(),
        secondary: None,
    };
    ctx.publish(&ev, &reference).await;
}

/// Publishes one summary Event per stage for the nodes that reached it since the last flush.
async fn flush_events(ctx: &Context, policy: &ClusterPolicy) {
    let mut pending = ctx.pending_events.lock().await;
    let due = pending
        .last_flush
        .is_none_or(|t| t.elapsed() >= EVENT_INTERVAL);
    if !due || pending.reached.is_empty() {
        return;
    }
    pending.last_flush = Some(Instant::now());
    let reached = std::mem::take(&mut pending.reached);
    drop(pending);
    let reference = policy.object_ref(&());
    for (stage, mut names) in reached {
        names.sort();
        let shown: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
        let more = names.len().saturating_sub(shown.len());
        let note = format!(
            "{} node(s) reached stage {stage}: {}{}",
            names.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
        let ev = Event {
            type_: EventType::Normal,
            reason: "StageReached".into(),
            note: Some(note),
            // One action per stage, so each stage keeps an Event of its own instead of all of
            // them folding into one series.
            action: format!("Reach-{stage}"),
            secondary: None,
        };
        ctx.publish(&ev, &reference).await;
    }
}

/// A write failed a pass: remember it (the next passes' status carries it until one succeeds),
/// say it in a Warning Event on the active policy, and write the stored status with the
/// `WriteFailed` condition now, since the failed write may come before the pass's status write.
async fn report_failure(ctx: &Context, failure: WriteFailure) {
    let changed = ctx.last_failure.lock().replace(failure.clone()).as_ref() != Some(&failure);
    let active = {
        let idx = ctx.index.lock();
        pick_active(idx.policies.values()).cloned()
    };
    let Some(active) = active else { return };
    if changed {
        let ev = Event {
            type_: EventType::Warning,
            reason: "WriteFailed".into(),
            note: Some(format!(
                "writing {} failed: {}",
                failure.what, failure.message
            )),
            action: "Write".into(),
            secondary: None,
        };
        ctx.publish(&ev, &active.object_ref(&())).await;
    }
    let st = status::with_write_failure(
        active.status.as_ref(),
        Some(&failure),
        active.metadata.generation,
        &now(),
    );
    if active.status.as_ref() != Some(&st) {
        let policies: Api<ClusterPolicy> = Api::all(ctx.client.clone());
        if let Err(e) = patch_status(ctx, &policies, &active, &st).await {
            tracing::warn!(error = %e, "could not report the failed write in the policy's status");
        }
    }
}

/// Runs passes while the fence is open (this replica leads): after watch events (debounced),
/// and every `resync`. A pass stops at once when the fence closes, and after `pass_timeout`.
/// Every round bumps the health heartbeat, so `/healthz` fails if this loop dies or hangs.
pub async fn run(
    ctx: Arc<Context>,
    wake: Arc<tokio::sync::Notify>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    resync: Duration,
) {
    let mut fence = ctx.fence.subscribe();
    let debounce = Duration::from_millis(200);
    // Failed passes wait 0.8 s, 1.6 s, ... up to 30 s (with jitter), like the watches; a pass that
    // succeeds starts the series again.
    let mut backoff = DefaultBackoff::default();
    loop {
        ctx.metrics.health.beat();
        // Stage Events waiting for their summary are flushed by a pass within EVENT_INTERVAL.
        let events_waiting = !ctx.pending_events.lock().await.reached.is_empty();
        let idle = if events_waiting {
            EVENT_INTERVAL
        } else {
            resync
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(idle) => {}
            changed = fence.changed() => if changed.is_err() {
                // The fence's task ended: this replica can never write again. Ending the loop
                // fails /healthz and stops the process, so the pod restarts.
                tracing::error!("the write fence stopped; the reconcile loop ends");
                return;
            },
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if !ctx.fence.is_open() {
            continue;
        }
        if !ctx.index.lock().is_synced() {
            continue;
        }
        // Let a burst of watch events settle into one pass.
        tokio::time::sleep(debounce).await;
        ctx.metrics.health.beat();
        let started = Instant::now();
        let pass = tokio::time::timeout(ctx.pass_timeout, reconcile_once(&ctx));
        // A pass in flight is dropped the moment leadership ends: no write after that. A dropped
        // pass did not count itself, so it is counted here (errors{kind="fenced"|"timeout"}).
        let dropped = |e: Error| {
            ctx.metrics
                .observe_pass(started.elapsed(), Some(e.metric_label()));
            Err(e)
        };
        let result = tokio::select! {
            biased;
            _ = ctx.fence.closed() => dropped(Error::Fenced(Fenced)),
            r = pass => r.unwrap_or_else(|_| dropped(Error::Timeout(ctx.pass_timeout))),
        };
        ctx.metrics.health.beat();
        match result {
            Ok(n) => {
                backoff.reset();
                if ctx.last_failure.lock().take().is_some() {
                    // The next pass clears the WriteFailed condition.
                    wake.notify_one();
                }
                if n > 0 {
                    tracing::debug!(writes = n, "pass done");
                    // Writes change what we watch; look again soon even if no event arrives.
                    wake.notify_one();
                }
            }
            Err(Error::Fenced(_)) => {
                tracing::warn!("leadership ended during a pass; it stopped before its next write");
            }
            Err(e) => {
                let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %e, retry_in = ?wait, "reconcile pass failed");
                if let Some(failure) = e.failure() {
                    report_failure(&ctx, failure).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
                wake.notify_one();
            }
        }
    }
}
