//! The reconciler: one pass looks at the whole in-memory view, decides with the pure functions
//! in `render`, `rollout` and `status`, and then writes only what differs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use gpu_pilot_api::names::{FINALIZER, Stage, field_manager};
use gpu_pilot_api::{ClusterPolicy, ClusterPolicyStatus, Component};
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

use crate::index::SharedIndex;
use crate::metrics::Metrics;
use crate::render::{self, Desired, managed_selector};
use crate::rollout::{self, NodePlan, NodeState};
use crate::status;

/// Why a reconcile pass failed, grouped for metrics and Events.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing {what}: {}", api_message(source))]
    Write {
        what: String,
        #[source]
        source: kube::Error,
    },
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
}

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
        }
    }
}

/// What a pass decided before any I/O.
struct Plan {
    active: Option<ClusterPolicy>,
    ignored: Vec<(ClusterPolicy, ClusterPolicyStatus)>,
    deleting: bool,
    desired: Option<Desired>,
    /// Operand DaemonSets to delete (component disabled).
    stale_daemonsets: Vec<String>,
    /// DaemonSets whose stored hash differs from the rendered one.
    daemonset_applies: Vec<DaemonSet>,
    node_plans: Vec<(String, NodePlan)>,
    active_status: Option<ClusterPolicyStatus>,
}

/// The oldest policy is the active one (ties broken by name, so every replica agrees).
pub fn pick_active(policies: &[&ClusterPolicy]) -> Option<usize> {
    policies
        .iter()
        .enumerate()
        .min_by(|(_, a), (_, b)| {
            let ka = (
                a.metadata.creation_timestamp.clone().map(|t| t.0),
                a.name_any(),
            );
            let kb = (
                b.metadata.creation_timestamp.clone().map(|t| t.0),
                b.name_any(),
            );
            ka.cmp(&kb)
        })
        .map(|(i, _)| i)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn decide(ctx: &Context) -> Plan {
    let idx = ctx.index.lock().unwrap();
    let policies: Vec<&ClusterPolicy> = idx.policies.values().collect();
    let Some(active_i) = pick_active(&policies) else {
        return Plan {
            active: None,
            ignored: vec![],
            deleting: false,
            desired: None,
            stale_daemonsets: vec![],
            daemonset_applies: vec![],
            node_plans: vec![],
            active_status: None,
        };
    };
    let active = policies[active_i].clone();
    let active_name = active.name_any();
    let t = now();
    let ignored = policies
        .iter()
        .filter(|p| p.name_any() != active_name)
        .filter_map(|p| {
            let st =
                status::ignored_status(&active_name, p.metadata.generation, p.status.as_ref(), &t);
            (p.status.as_ref() != Some(&st)).then(|| ((*p).clone(), st))
        })
        .collect();
    let deleting = active.metadata.deletion_timestamp.is_some();
    if deleting {
        let node_plans = idx
            .nodes
            .values()
            .map(|n| (n.name.clone(), rollout::cleanup_node(n)))
            .filter(|(_, p)| !p.is_noop())
            .collect();
        return Plan {
            active: Some(active),
            ignored,
            deleting,
            desired: None,
            stale_daemonsets: idx.daemonsets.keys().cloned().collect(),
            daemonset_applies: vec![],
            node_plans,
            active_status: None,
        };
    }

    let desired = render::render(&active, &ctx.namespace);
    let wanted: Vec<String> = desired
        .daemonsets
        .iter()
        .map(|(c, _)| c.daemonset_name())
        .collect();
    let stale_daemonsets = idx
        .daemonsets
        .keys()
        .filter(|k| !wanted.contains(k))
        .cloned()
        .collect();
    let daemonset_applies = desired
        .daemonsets
        .iter()
        .filter(|(c, ds)| {
            idx.daemonsets
                .get(&c.daemonset_name())
                .and_then(|f| f.hash.as_deref())
                != render::hash_of(&ds.metadata)
        })
        .map(|(_, ds)| ds.clone())
        .collect();

    let by_node = idx.pods_by_node();
    let mut node_plans = Vec::new();
    let mut states: Vec<(String, NodeState)> = Vec::with_capacity(idx.nodes.len());
    for node in idx.nodes.values() {
        let pods = by_node
            .get(node.name.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let plan = rollout::plan_node(&active.spec, node, pods);
        states.push((node.name.clone(), plan.state.clone()));
        if !plan.is_noop() {
            node_plans.push((node.name.clone(), plan));
        }
    }
    ctx.metrics.set_stages(states.iter().map(|(_, s)| s));
    let node_refs: Vec<(&str, &NodeState)> = states.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let ds_counts = |c: Component| idx.daemonsets.get(&c.daemonset_name()).map(|f| f.counts);
    let gated = |c: Component| {
        let key = gpu_pilot_api::names::label::deploy_gate(c);
        idx.nodes
            .values()
            .filter(|n| n.labels.get(&key).map(String::as_str) == Some("true"))
            .count() as i32
    };
    let st = status::active_status(
        &active.spec,
        active.metadata.generation,
        &ctx.namespace,
        &status::Observed {
            nodes: &node_refs,
            daemonsets: &ds_counts,
            gated: &gated,
        },
        active.status.as_ref(),
        &t,
    );
    let active_status = (active.status.as_ref() != Some(&st)).then_some(st);
    Plan {
        active: Some(active),
        ignored,
        deleting,
        desired: Some(desired),
        stale_daemonsets,
        daemonset_applies,
        node_plans,
        active_status,
    }
}

/// One reconcile pass. Returns how many writes it made.
pub async fn reconcile_once(ctx: &Context) -> Result<usize, Error> {
    let started = Instant::now();
    let plan = decide(ctx);
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
    for (p, st) in &plan.ignored {
        patch_status(ctx, &policies, p, st).await?;
        *writes += 1;
    }
    let Some(active) = plan.active else {
        return Ok(());
    };
    if plan.deleting {
        return cleanup(ctx, &active, plan.node_plans, plan.stale_daemonsets, writes).await;
    }

    if !active.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = active.finalizers().to_vec();
        finalizers.push(FINALIZER.into());
        policies
            .patch(
                &active.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
            )
            .await
            .map_err(|source| Error::Write {
                what: "the policy's finalizer".into(),
                source,
            })?;
        ctx.metrics.write("policy");
        *writes += 1;
    }

    let desired = plan.desired.expect("rendered when not deleting");
    *writes += apply_helpers(ctx, &active, &desired).await?;

    let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let ssa = PatchParams::apply(field_manager::CONTROLLER).force();
    for ds in &plan.daemonset_applies {
        let name = ds.name_any();
        // The index sees only gpu-pilot's DaemonSets: one it does not know may be someone else's.
        let known = ctx.index.lock().unwrap().daemonsets.contains_key(&name);
        if !known && !may_write(&ds_api, &name, "DaemonSet").await? {
            not_owned(ctx, &active, "DaemonSet", &name).await;
            continue;
        }
        let applied = ds_api
            .patch(&name, &ssa, &Patch::Apply(ds))
            .await
            .map_err(|source| Error::Write {
                what: format!("DaemonSet {name}"),
                source,
            })?;
        ctx.metrics.write("daemonset");
        *writes += 1;
        use crate::index::Indexed;
        applied.upsert(&mut ctx.index.lock().unwrap());
        tracing::info!(daemonset = %name, "applied");
    }
    for name in &plan.stale_daemonsets {
        delete_daemonset(ctx, &ds_api, name).await?;
        *writes += 1;
    }

    *writes += patch_nodes(ctx, plan.node_plans).await?;

    if let Some(st) = &plan.active_status {
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
            let hash = render::content_hash(obj);
            if applied.get(&key) != Some(&hash) {
                if may_write(&$api, &name, $display).await? {
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
    if let Err(e) = ctx.recorder.publish(&ev, &policy.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an Event");
    }
}

async fn delete_daemonset(ctx: &Context, api: &Api<DaemonSet>, name: &str) -> Result<(), Error> {
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
    ctx.index.lock().unwrap().daemonsets.remove(name);
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
                let r = nodes
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                    .await;
                match r {
                    Ok(_) => {
                        ctx.metrics.write("node");
                        if let Some(n) = ctx.index.lock().unwrap().nodes.get_mut(&name) {
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
    use crate::index::Indexed;
    updated.upsert(&mut ctx.index.lock().unwrap());
    Ok(())
}

/// The policy is being deleted: remove operands and every node label, then the finalizer.
async fn cleanup(
    ctx: &Context,
    policy: &ClusterPolicy,
    node_plans: Vec<(String, NodePlan)>,
    daemonsets: Vec<String>,
    writes: &mut usize,
) -> Result<(), Error> {
    if !policy.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let ds_api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    for name in &daemonsets {
        delete_daemonset(ctx, &ds_api, name).await?;
        *writes += 1;
    }
    *writes += patch_nodes(ctx, node_plans).await?;
    *writes += delete_helpers(ctx).await?;
    let finalizers: Vec<String> = policy
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let api: Api<ClusterPolicy> = Api::all(ctx.client.clone());
    match api
        .patch(
            &policy.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(source) => {
            return Err(Error::Write {
                what: "removing the policy's finalizer".into(),
                source,
            });
        }
    }
    ctx.metrics.write("policy");
    *writes += 1;
    ctx.applied.lock().await.clear();
    tracing::info!(policy = %policy.name_any(), "removed every operand and node label; finalizer released");
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
        let idx = ctx.index.lock().unwrap();
        let ps: Vec<&ClusterPolicy> = idx.policies.values().collect();
        pick_active(&ps).map(|i| ps[i].object_ref(&()))
    };
    let Some(reference) = policy else { return };
    let ev = Event {
        type_: EventType::Warning,
        reason: "NodeStageFailed".into(),
        note: Some(format!("node {node} is held at stage {stage}: {reason}")),
        action: "Rollout".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
        tracing::warn!(error = %e, "could not publish an Event");
    }
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
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, "could not publish an Event");
        }
    }
}

/// Runs passes while `leader` is true: after watch events (debounced), and every `resync`.
pub async fn run(
    ctx: Arc<Context>,
    wake: Arc<tokio::sync::Notify>,
    mut leader: tokio::sync::watch::Receiver<bool>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    resync: Duration,
) {
    let debounce = Duration::from_millis(200);
    loop {
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
            _ = leader.changed() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if !*leader.borrow() {
            continue;
        }
        if !ctx.index.lock().unwrap().is_synced() {
            continue;
        }
        // Let a burst of watch events settle into one pass.
        tokio::time::sleep(debounce).await;
        match reconcile_once(&ctx).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(writes = n, "pass done");
                // Writes change what we watch; look again soon even if no event arrives.
                wake.notify_one();
            }
            Err(e) => {
                tracing::warn!(error = %e, "reconcile pass failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                wake.notify_one();
            }
        }
    }
}
