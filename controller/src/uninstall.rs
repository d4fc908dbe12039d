//! `gpu-pilot-controller uninstall-hook`: what the Helm chart's uninstall hooks run. Helm deletes a
//! release's objects together, so without them the controller and the webhook would go while the
//! ClusterPolicy still carries the controller's finalizer, and the nodes would keep gpu-pilot's
//! labels and operands. Both stages touch only what gpu-pilot made.
//!
//! - `pre-delete`, before Helm deletes anything: deletes every ClusterPolicy, waits until the
//!   controller has finalized them (operand DaemonSets and helpers deleted, its node labels
//!   removed, finalizer released), waits until the operand pods are gone, then takes the agent's
//!   GPU feature labels off the nodes, as `kubectl gpu uninstall` does.
//! - `post-delete`, after Helm deleted the chart's objects: waits until the controller's and the
//!   webhook's pods are gone, then deletes what they made while they ran (the webhook's TLS Secret,
//!   cert-manager's Secret, the controller's Lease), each only when it carries gpu-pilot's
//!   managed-by label; with `--delete-crd` (the chart's `operator.cleanupCRD`) the CRD too.
//!
//! Each wait is bounded by `--timeout`; when it runs out the hook fails with what is left and what
//! to do, forcing nothing (Helm then stops and keeps the release).

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, bail};
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{label, webhook};
use gpu_pilot_core::cleanup::node_cleanup_patch;
use gpu_pilot_core::render::install::CERT_MANAGER_SECRET;
use gpu_pilot_core::render::managed_selector;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Client, CustomResourceExt, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::run::LEASE;

/// When the hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// Before Helm deletes the release's objects.
    PreDelete,
    /// After Helm deleted them.
    PostDelete,
}

#[derive(Debug, Clone)]
pub struct HookOptions {
    /// The namespace gpu-pilot runs in.
    pub namespace: String,
    /// The longest the whole stage waits.
    pub timeout: Duration,
    /// post-delete: delete the ClusterPolicy CRD too.
    pub delete_crd: bool,
}

/// The pods of the chart's controller and webhook Deployments (the chart's pod labels).
const COMPONENT_PODS: &str = "app.kubernetes.io/part-of=gpu-pilot,app.kubernetes.io/name in (gpu-pilot-controller,gpu-pilot-webhook)";

pub async fn run(client: Client, stage: Stage, o: &HookOptions) -> anyhow::Result<()> {
    let deadline = Instant::now() + o.timeout;
    match stage {
        Stage::PreDelete => pre_delete(&client, o, deadline).await,
        Stage::PostDelete => post_delete(&client, o, deadline).await,
    }
}

async fn pre_delete(client: &Client, o: &HookOptions, deadline: Instant) -> anyhow::Result<()> {
    let ns = o.namespace.as_str();
    let policies: Api<ClusterPolicy> = Api::all(client.clone());
    let list = match policies.list_metadata(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            say("no ClusterPolicy API in the cluster: no policy to finalize");
            Vec::new()
        }
        Err(e) => return Err(e).context("listing ClusterPolicies"),
    };
    for p in &list {
        let name = p.name_any();
        if p.metadata.deletion_timestamp.is_some() {
            say(&format!("ClusterPolicy {name} is already being deleted"));
            continue;
        }
        match policies.delete(&name, &DeleteParams::default()).await {
            Ok(_) => say(&format!("deleting ClusterPolicy {name}")),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(kube::Error::Api(s)) if s.message.contains("admission webhook") => bail!(
                "the webhook refused to delete ClusterPolicy {name}, so nothing was removed and \
                 helm uninstall stops with the release installed: {}\nDo as it says, then run \
                 helm uninstall again.",
                s.message
            ),
            Err(e) => return Err(e).with_context(|| format!("deleting ClusterPolicy {name}")),
        }
    }

    let waited = wait_until(
        deadline,
        "the controller to finalize the ClusterPolicy",
        || async {
            let left = policies.list(&ListParams::default()).await?.items;
            Ok((!left.is_empty()).then(|| {
                left.iter()
                    .map(|p| {
                        format!(
                            "{} (finalizers {:?}, state {})",
                            p.name_any(),
                            p.finalizers(),
                            p.status
                                .as_ref()
                                .map_or("unknown".to_string(), |s| format!("{:?}", s.state))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }))
        },
    )
    .await?;
    if let Some(left) = waited {
        bail!(
            "timed out after {}s waiting for the controller to finalize the ClusterPolicy: {left}. \
             The controller removes the operands and its node labels, then releases its \
             finalizer; it has not. Nothing was forced and helm uninstall stops with the release \
             installed.\nSee why: kubectl -n {ns} logs deploy/gpu-pilot-controller; kubectl -n \
             {ns} get pods.\nTo finish without the controller: kubectl gpu uninstall -n {ns} \
             (it cleans the nodes and releases the policy itself), then helm uninstall again.",
            o.timeout.as_secs()
        );
    }
    say("the controller finalized every ClusterPolicy");

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let operands = ListParams::default().labels(&managed_selector());
    let waited = wait_until(deadline, "the operand pods to stop", || async {
        let left = pods.list_metadata(&operands).await?.items;
        Ok((!left.is_empty()).then(|| names(&left)))
    })
    .await?;
    if let Some(left) = waited {
        bail!(
            "timed out after {}s waiting for the operand pods to stop: {left} in namespace {ns}. \
             Their DaemonSets are deleted; the kubelets of their nodes have not stopped them \
             (kubectl -n {ns} describe pod NAME says why). Run helm uninstall again once they are \
             gone.",
            o.timeout.as_secs()
        );
    }

    // The agent's GPU feature labels stay after its pods, as NVIDIA's GFD leaves its own; like
    // `kubectl gpu uninstall`, the hook takes them off (the agent recorded which on the node).
    let nodes: Api<Node> = Api::all(client.clone());
    let mut cleaned = 0;
    for m in nodes
        .list_metadata(&ListParams::default())
        .await
        .context("listing nodes")?
        .items
    {
        let node = Node {
            metadata: m.metadata,
            ..Node::default()
        };
        let Some(patch) = node_cleanup_patch(&node) else {
            continue;
        };
        let name = node.name_any();
        let keys: Vec<String> = patch["metadata"]["labels"]
            .as_object()
            .into_iter()
            .chain(patch["metadata"]["annotations"].as_object())
            .flat_map(|m| m.keys().cloned())
            .collect();
        match nodes
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => {
                say(&format!("node {name}: removed {}", keys.join(", ")));
                cleaned += 1;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("cleaning node {name}")),
        }
    }
    say(&format!(
        "pre-delete done: policies finalized, operands gone, {cleaned} node(s) cleaned of the agent's labels"
    ));
    Ok(())
}

async fn post_delete(client: &Client, o: &HookOptions, deadline: Instant) -> anyhow::Result<()> {
    let ns = o.namespace.as_str();
    // While they run, the webhook would make its Secret again and the controller renew its Lease.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let components = ListParams::default().labels(COMPONENT_PODS);
    let waited = wait_until(
        deadline,
        "the controller's and webhook's pods to stop",
        || async {
            let left = pods.list_metadata(&components).await?.items;
            Ok((!left.is_empty()).then(|| names(&left)))
        },
    )
    .await?;
    if let Some(left) = waited {
        bail!(
            "timed out after {}s waiting for the controller's and webhook's pods to stop: {left} \
             in namespace {ns}. Helm deleted their Deployments; once the pods are gone, \
             kubectl gpu uninstall -n {ns} removes what they made (the webhook's TLS Secret, the \
             controller's Lease).",
            o.timeout.as_secs()
        );
    }
    let mut removed = 0;
    for name in [webhook::TLS_SECRET, CERT_MANAGER_SECRET] {
        removed += delete_own(Api::<Secret>::namespaced(client.clone(), ns), name).await?;
    }
    removed += delete_own(Api::<Lease>::namespaced(client.clone(), ns), LEASE).await?;
    if o.delete_crd {
        let left = Api::<ClusterPolicy>::all(client.clone())
            .list_metadata(&ListParams::default())
            .await;
        match left {
            Ok(l) if !l.items.is_empty() => bail!(
                "not deleting the ClusterPolicy CRD: ClusterPolicies are left ({}), and deleting \
                 the CRD would delete them without the controller's cleanup",
                names(&l.items)
            ),
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(e).context("listing ClusterPolicies"),
        }
        removed += delete_own(
            Api::<CustomResourceDefinition>::all(client.clone()),
            ClusterPolicy::crd_name(),
        )
        .await?;
    }
    say(&format!(
        "post-delete done: {removed} object(s) gpu-pilot made at run time deleted"
    ));
    Ok(())
}

/// Deletes `name` if it carries gpu-pilot's managed-by label (with a uid precondition, so an
/// object made again under the same name in between stays); 1 when it did.
async fn delete_own<K>(api: Api<K>, name: &str) -> anyhow::Result<usize>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&());
    let Some(o) = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading {kind} {name}"))?
    else {
        return Ok(0);
    };
    if o.labels().get(label::MANAGED_BY).map(String::as_str) != Some(label::MANAGED_BY_VALUE) {
        say(&format!(
            "kept {kind}/{name}: not made by gpu-pilot (no {}={} label)",
            label::MANAGED_BY,
            label::MANAGED_BY_VALUE
        ));
        return Ok(0);
    }
    let mut dp = DeleteParams::background();
    dp.preconditions = o.uid().map(|uid| Preconditions {
        uid: Some(uid),
        resource_version: None,
    });
    match api.delete(name, &dp).await {
        Ok(_) => {
            say(&format!("deleted {kind}/{name}"));
            Ok(1)
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(0),
        Err(e) => Err(e).with_context(|| format!("deleting {kind} {name}")),
    }
}

/// Polls `left` (what is still in the way, or `None` when nothing is) until nothing is or the
/// deadline passes; returns what was left then. Says what it waits for every 10 seconds.
async fn wait_until<F, Fut>(
    deadline: Instant,
    what: &str,
    mut left: F,
) -> anyhow::Result<Option<String>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<String>, kube::Error>>,
{
    let mut next_note = Instant::now();
    loop {
        let now_left = left()
            .await
            .with_context(|| format!("waiting for {what}"))?;
        let Some(now_left) = now_left else {
            return Ok(None);
        };
        if Instant::now() >= deadline {
            return Ok(Some(now_left));
        }
        if Instant::now() >= next_note {
            say(&format!("waiting for {what}: {now_left}"));
            next_note = Instant::now() + Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_secs(1).min(deadline - Instant::now())).await;
    }
}

fn names<K: Resource>(items: &[K]) -> String {
    let shown: Vec<String> = items.iter().take(5).map(|o| o.name_any()).collect();
    match items.len() - shown.len() {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

/// The hook's log is its Job's: plain lines on standard output.
fn say(line: &str) {
    println!("{line}");
}
