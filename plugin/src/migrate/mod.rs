//! `kubectl gpu migrate`: from NVIDIA's GPU Operator to gpu-pilot.
//!
//! Without options it reads NVIDIA's installation (its ClusterPolicy, and the Helm release that
//! installed it) and prints the gpu-pilot values that do the same and what differs. `--dry-run`
//! adds the steps of the takeover; `--apply` takes them:
//!
//! 1. NVIDIA's operator is scaled to 0, so nothing recreates what follows.
//! 2. NVIDIA's operand DaemonSets are deleted with `propagationPolicy=Orphan`: their pods, the
//!    driver among them, keep running.
//! 3. On each node, those pods get the labels of gpu-pilot's DaemonSet for the same job, and the
//!    objects NVIDIA's operator made under names gpu-pilot uses (the RuntimeClass, the default
//!    mig-parted ConfigMap) become gpu-pilot's: its label, and NVIDIA's ClusterPolicy no longer
//!    their owner. Any other object of someone else's under a name gpu-pilot uses stops the
//!    takeover before anything changes.
//! 4. gpu-pilot is installed into NVIDIA's namespace (its DaemonSets must be there to adopt the
//!    pods). Each DaemonSet adopts the pod already on every node instead of starting a second
//!    one; the driver's is `OnDelete`, so NVIDIA's driver pods stay until an admin replaces them.
//! 5. Node by node, the other adopted pods (NVIDIA's images) are deleted and migrate waits until
//!    gpu-pilot's own are Ready there before it moves to the next node.
//! 6. NVIDIA's pods gpu-pilot has no counterpart for are deleted.
//!
//! No GPU pod is evicted: nothing here deletes, drains or cordons anything but NVIDIA's operand
//! pods. The device plugin that replaces NVIDIA's registers the same resource names with the
//! same device IDs (GPU UUIDs), so the kubelet's record of the devices running pods hold (what
//! its pod-resources API reports) still names devices that exist, and the driver those pods use
//! is never restarted. Every step checks what is already done, so running `--apply` again
//! after an interruption carries on where it stopped.

pub mod helm_release;
pub mod plan;
pub mod read;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use gpu_pilot_api::names::{Component, label};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::cluster::{Kube, explain};
use crate::global::{Global, Output};
use crate::ui::Printer;
use gpu_pilot_core::render::install::{self as render, Include};
use gpu_pilot_core::values::{Values, default_tree, merge};
use plan::{Snapshot, Step, Translation};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  kubectl gpu migrate                          the gpu-pilot values equivalent to NVIDIA's GPU Operator here, and what differs
  kubectl gpu migrate -o yaml > values.yaml    only the values
  kubectl gpu migrate --dry-run                and the steps of the takeover, node by node
  kubectl gpu migrate --apply                  take the cluster over; running GPU pods keep their GPUs
  kubectl gpu migrate --apply --set webhook.replicas=3   with values of your own on top

gpu-pilot is installed into NVIDIA's operator namespace (its DaemonSets adopt NVIDIA's pods there).
Running --apply again after an interruption carries on where it stopped.")]
pub struct MigrateArgs {
    /// Print the plan of the takeover too; change nothing.
    #[arg(long, conflicts_with = "apply")]
    pub dry_run: bool,
    /// Take the cluster over from NVIDIA's GPU Operator.
    #[arg(long)]
    pub apply: bool,
    /// More values over the translated ones (repeatable; later files win).
    #[arg(short = 'f', long = "values", value_name = "FILE")]
    pub values: Vec<PathBuf>,
    /// Set a value over the translated ones, e.g. webhook.replicas=3.
    #[arg(long, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Set a value, always as a string.
    #[arg(long, value_name = "KEY=VALUE")]
    pub set_string: Vec<String>,
    /// How long each waiting step may take (the operator gone, the DaemonSets orphaned, the
    /// rollout).
    #[arg(long, default_value = "15m", value_parser = gpu_pilot_core::duration::parse)]
    pub timeout: Duration,
}

pub async fn run(g: &Global, a: MigrateArgs) -> anyhow::Result<i32> {
    let kube = Kube::connect(g).await?;
    let snap = read::gather(&kube).await?;
    let translation = plan::translate(&snap);
    if g.namespace != gpu_pilot_api::names::DEFAULT_NAMESPACE && g.namespace != snap.namespace {
        anyhow::bail!(
            "-n {}: gpu-pilot takes over in NVIDIA's namespace {} (its DaemonSets adopt NVIDIA's pods there); drop -n or give -n {}",
            g.namespace,
            snap.namespace,
            snap.namespace
        );
    }
    let values = values_for(&translation, &a)?;

    if g.output == Output::Yaml && !a.apply {
        print!("{}", values_yaml(&translation));
        return Ok(0);
    }
    let mut out = Printer::new(g.colour());
    report(&snap, &translation, &values, &mut out);
    if !translation.blockers.is_empty() {
        out.heading("gpu-pilot cannot take this installation over");
        for b in &translation.blockers {
            out.error(b);
        }
        return Ok(1);
    }
    let steps = plan::steps(&snap);
    if a.dry_run || a.apply {
        out.heading("the takeover");
        for (i, s) in steps.iter().enumerate() {
            out.line(&format!("{:>2}. {}", i + 1, plan::describe(s, &snap)));
        }
    }
    if !a.apply {
        if !a.dry_run {
            out.line("\n`kubectl gpu migrate --dry-run` shows the steps of the takeover; `--apply` takes them.");
        }
        return Ok(0);
    }
    apply(&kube, &snap, &steps, &values, &a, &mut out).await?;
    Ok(0)
}

/// The translated values under the user's own `-f` and `--set`, checked as install checks them.
fn values_for(t: &Translation, a: &MigrateArgs) -> anyhow::Result<Values> {
    let mut base = default_tree();
    merge(&mut base, t.values.clone());
    Ok(Values::load_over(base, &a.values, &a.set, &a.set_string)?)
}

fn values_yaml(t: &Translation) -> String {
    format!(
        "# gpu-pilot values equivalent to NVIDIA's GPU Operator installation (kubectl gpu migrate);\n# only what differs from gpu-pilot's defaults. Use with: kubectl gpu install -f THIS_FILE\n{}",
        serde_yaml::to_string(&t.values).expect("values serialize")
    )
}

fn report(snap: &Snapshot, t: &Translation, values: &Values, out: &mut Printer) {
    out.heading("NVIDIA's GPU Operator");
    let policy = snap.policy["metadata"]["name"].as_str().unwrap_or("?");
    out.line(&format!(
        "ClusterPolicy {policy} (state {}), namespace {}",
        snap.policy["status"]["state"].as_str().unwrap_or("unknown"),
        snap.namespace
    ));
    match &snap.release {
        Some(r) => out.line(&format!(
            "Helm release {}/{} revision {} (chart {} {})",
            r.namespace, r.name, r.revision, r.chart, r.chart_version
        )),
        None => {
            out.line("no Helm release (installed otherwise): the ClusterPolicy is all there is")
        }
    }
    for op in &snap.operators {
        out.line(&format!(
            "operator Deployment {} ({} replicas)",
            op.name, op.replicas
        ));
    }
    out.line(&format!(
        "{} operand DaemonSets, {} operand pods, {} GPU pods running on {} nodes",
        snap.daemonsets.len(),
        snap.pods.len(),
        snap.gpu_pods.values().map(Vec::len).sum::<usize>(),
        snap.gpu_pods.len()
    ));
    out.heading("gpu-pilot values (kubectl gpu migrate -o yaml prints them alone)");
    for l in values_yaml(t).lines() {
        out.line(&format!("  {l}"));
    }
    out.heading("what differs");
    if t.differences.is_empty() {
        out.line("nothing: gpu-pilot does what NVIDIA's operator did with these settings");
    }
    for d in &t.differences {
        out.line(&format!("  {}: {}", d.key, d.what));
    }
    for n in &values.notices {
        out.warn(n);
    }
}

async fn apply(
    kube: &Kube,
    snap: &Snapshot,
    steps: &[Step],
    values: &Values,
    a: &MigrateArgs,
    out: &mut Printer,
) -> anyhow::Result<()> {
    let ns = snap.namespace.as_str();
    // Before anything changes: no object of someone else's under a name gpu-pilot uses, but the
    // ones the takeover adopts.
    let objs = render::objects(
        ns,
        values,
        Include {
            crd: true,
            namespace: false,
        },
    );
    let foreign: Vec<String> = crate::install::foreign_objects(kube, &objs)
        .await?
        .into_iter()
        .filter(|k| !snap.to_adopt.contains(k))
        .collect();
    anyhow::ensure!(
        foreign.is_empty(),
        "{} exist but were not made by gpu-pilot or NVIDIA's operator; the takeover would overwrite them. Rename or remove them (or label them {}={} if gpu-pilot made them), then run `kubectl gpu migrate --apply` again. Nothing was changed",
        foreign.join(", "),
        label::MANAGED_BY,
        label::MANAGED_BY_VALUE
    );
    let started = Instant::now();
    for step in steps {
        out.heading(&plan::describe(step, snap));
        match step {
            Step::ScaleDown { deployment, from } => {
                scale_down(kube, ns, deployment, *from, a.timeout).await?;
                out.ok(&format!("{deployment} has no pods left"));
            }
            Step::Orphan { daemonsets } => {
                orphan(kube, ns, daemonsets, a.timeout).await?;
                out.ok("NVIDIA's DaemonSets are gone, their pods run on");
            }
            Step::HandOver { node, pods } => {
                for (pod, component) in pods {
                    hand_over(kube, ns, pod, *component).await?;
                }
                out.ok(&format!("{node}: {} pods labelled", pods.len()));
            }
            Step::Adopt { objects } => {
                for o in objects {
                    adopt(kube, ns, o).await?;
                }
                out.ok("done");
            }
            Step::Install { namespace } => {
                crate::install::apply_and_prune(kube, namespace, values, &objs, out, a.timeout)
                    .await?;
                adopted(kube, ns, values, a.timeout, out).await?;
            }
            Step::Replace { node, pods } => {
                replace(kube, ns, node, pods, a.timeout).await?;
                out.ok(&format!("{node}: gpu-pilot's pods are Ready"));
            }
            Step::WaitReady => {
                crate::install::follow_rollout(kube, ns, a.timeout, out).await?;
            }
            Step::DeleteLeftovers { .. } => {
                let n = delete_leftovers(kube, ns).await?;
                out.ok(&format!("{n} deleted"));
            }
        }
    }
    out.heading("done");
    out.ok(&format!(
        "gpu-pilot runs the GPU stack of {} in {:.0}s; no GPU pod was touched",
        kube.server,
        started.elapsed().as_secs_f64()
    ));
    if let Some(r) = &snap.release {
        out.line(&format!(
            "NVIDIA's Helm release {}/{} still holds its operator Deployment (0 replicas), RBAC and ClusterPolicy; `helm uninstall {} -n {}` removes them without touching gpu-pilot (ConfigMaps it created from config.create are removed too: see above).",
            r.namespace, r.name, r.name, r.namespace
        ));
    }
    out.line(
        "NVIDIA's driver pods run on under gpu-pilot's driver DaemonSet (OnDelete): delete one to have gpu-pilot's driver take that node, once its GPU pods are gone.",
    );
    Ok(())
}

fn patch_err(kube: &Kube, doing: String) -> impl Fn(kube::Error) -> anyhow::Error {
    let server = kube.server.clone();
    move |e| anyhow::anyhow!(explain(&e, &server, &doing))
}

/// Poll `check` every 500 ms until it says done, or fail with `what` after `timeout`.
async fn until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<String>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let waiting = check().await?;
        match waiting {
            None => return Ok(()),
            Some(why) if Instant::now() >= deadline => anyhow::bail!(
                "{what} did not happen within {timeout:?} ({why}); nothing was undone: fix that and run `kubectl gpu migrate --apply` again to carry on"
            ),
            Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn scale_down(
    kube: &Kube,
    ns: &str,
    name: &str,
    from: i32,
    timeout: Duration,
) -> anyhow::Result<()> {
    let api: Api<Deployment> = Api::namespaced(kube.client.clone(), ns);
    // The replicas it had, so an admin can scale it back.
    let patch = json!({
        "metadata": { "annotations": { "gpupilot.io/replicas-before-migration": from.to_string() } },
        "spec": { "replicas": 0 },
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(patch_err(
            kube,
            format!("scaling Deployment {ns}/{name} to 0"),
        ))?;
    // Its pods gone, not only counted out: a terminating operator still reconciles.
    let selector = api
        .get(name)
        .await
        .map_err(patch_err(kube, format!("reading Deployment {ns}/{name}")))?
        .spec
        .selector
        .match_labels
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    anyhow::ensure!(
        !selector.is_empty(),
        "Deployment {ns}/{name} selects its pods by expressions only; stop NVIDIA's operator yourself and run `kubectl gpu migrate --apply` again"
    );
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), ns);
    let lp = ListParams::default().labels(&selector);
    until(
        &format!("NVIDIA's operator Deployment {ns}/{name} stopping"),
        timeout,
        || {
            let pods = pods.clone();
            let lp = lp.clone();
            async move {
                let left = pods.list_metadata(&lp).await?.items.len();
                Ok((left > 0).then(|| format!("{left} pods left")))
            }
        },
    )
    .await
}

async fn orphan(kube: &Kube, ns: &str, names: &[String], timeout: Duration) -> anyhow::Result<()> {
    let api: Api<DaemonSet> = Api::namespaced(kube.client.clone(), ns);
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..Default::default()
    };
    for name in names {
        match api.delete(name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(patch_err(kube, format!("orphaning DaemonSet {ns}/{name}"))(
                    e,
                ));
            }
        }
    }
    // The garbage collector removes the pods' owner references before the DaemonSets go.
    until("NVIDIA's DaemonSets going", timeout, || {
        let api = api.clone();
        async move {
            for name in names {
                if api.get_metadata_opt(name).await?.is_some() {
                    return Ok(Some(format!("{name} is still there")));
                }
            }
            Ok(None)
        }
    })
    .await
}

async fn hand_over(kube: &Kube, ns: &str, pod: &str, component: Component) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(kube.client.clone(), ns);
    let p = match api.get_opt(pod).await {
        Ok(Some(p)) => p,
        // Gone since it was read (its node left): nothing to hand over.
        Ok(None) => return Ok(()),
        Err(e) => return Err(patch_err(kube, format!("reading pod {ns}/{pod}"))(e)),
    };
    anyhow::ensure!(
        p.owner_references()
            .iter()
            .all(|r| r.controller != Some(true)
                || r.kind != "DaemonSet"
                || r.name == component.daemonset_name()),
        "pod {ns}/{pod} still has a DaemonSet of NVIDIA's as its owner; run `kubectl gpu migrate --apply` again"
    );
    let patch = json!({ "metadata": { "labels": plan::handover_labels(component) } });
    api.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(patch_err(kube, format!("labelling pod {ns}/{pod}")))?;
    Ok(())
}

/// Make an object NVIDIA's operator made gpu-pilot's (`Kind/name`): gpu-pilot's label, and
/// NVIDIA's ClusterPolicy removed from its owner references.
async fn adopt(kube: &Kube, ns: &str, object: &str) -> anyhow::Result<()> {
    let kind = object.split('/').next().unwrap_or_default();
    let name = object.rsplit('/').next().unwrap_or_default();
    let obj = match kind {
        "RuntimeClass" => {
            json!({"apiVersion": "node.k8s.io/v1", "kind": kind, "metadata": {"name": name}})
        }
        _ => json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": ns}}),
    };
    let api = crate::cluster::objects::api_for(kube, &obj)?;
    let Some(current) = api
        .get_metadata_opt(name)
        .await
        .map_err(patch_err(kube, format!("reading {object}")))?
    else {
        return Ok(());
    };
    let refs: Vec<Value> = current
        .metadata
        .owner_references
        .iter()
        .flatten()
        .map(|r| serde_json::to_value(r).expect("owner references serialize"))
        .filter(|r| !read::is_nvidia_policy_owner(r))
        .collect();
    // With the resourceVersion read, so a concurrent change is not overwritten.
    let patch = json!({
        "metadata": {
            "resourceVersion": current.meta().resource_version,
            "ownerReferences": refs,
            "labels": { (label::MANAGED_BY): label::MANAGED_BY_VALUE },
        }
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(patch_err(
            kube,
            format!("removing NVIDIA's owner from {object}"),
        ))?;
    Ok(())
}

/// Wait until every gpu-pilot DaemonSet exists and has a Ready pod (adopted or its own) on each
/// of its nodes.
async fn adopted(
    kube: &Kube,
    ns: &str,
    values: &Values,
    timeout: Duration,
    out: &mut Printer,
) -> anyhow::Result<()> {
    let api: Api<DaemonSet> = Api::namespaced(kube.client.clone(), ns);
    let lp = ListParams::default().labels(&format!(
        "{}={}",
        label::MANAGED_BY,
        label::MANAGED_BY_VALUE
    ));
    let wanted: usize = Component::ALL
        .iter()
        .filter(|c| values.spec.operand(**c).enabled())
        .count();
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        let list = api
            .list(&lp)
            .await
            .map_err(patch_err(kube, format!("listing DaemonSets in {ns}")))?;
        let mut waiting = Vec::new();
        for ds in &list.items {
            let st = ds.status.clone().unwrap_or_default();
            let desired = st.desired_number_scheduled;
            let current = st.observed_generation == ds.metadata.generation;
            if !current || st.number_ready < desired {
                waiting.push(format!(
                    "{} {}/{desired} ready",
                    ds.name_any(),
                    st.number_ready
                ));
            }
        }
        if list.items.len() < wanted {
            waiting.push(format!(
                "{} of {wanted} DaemonSets created",
                list.items.len()
            ));
        }
        if waiting.is_empty() {
            break;
        }
        let line = waiting.join("; ");
        if line != last {
            out.line(&format!("  waiting: {line}"));
            last = line;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "gpu-pilot's DaemonSets did not adopt NVIDIA's pods within {timeout:?} ({last}); nothing was undone: see `kubectl gpu doctor -n {ns}`, then run `kubectl gpu migrate --apply` again to carry on"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    out.ok("every gpu-pilot DaemonSet has a Ready pod on each of its nodes");
    Ok(())
}

/// On one node, delete the adopted pods of NVIDIA's images and wait until gpu-pilot's
/// DaemonSets have their own Ready pod there for each of those components.
async fn replace(
    kube: &Kube,
    ns: &str,
    node: &str,
    pods: &[(String, Component)],
    timeout: Duration,
) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(kube.client.clone(), ns);
    for (pod, _) in pods {
        match api.delete(pod, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(patch_err(kube, format!("deleting pod {ns}/{pod}"))(e)),
        }
    }
    let old: Vec<&str> = pods.iter().map(|(p, _)| p.as_str()).collect();
    let lp = ListParams::default()
        .fields(&format!("spec.nodeName={node}"))
        .labels(&format!(
            "{}={}",
            label::MANAGED_BY,
            label::MANAGED_BY_VALUE
        ));
    until(
        &format!("gpu-pilot's pods on {node} becoming Ready"),
        timeout,
        || {
            let api = api.clone();
            let lp = lp.clone();
            let old = old.clone();
            async move {
                let on_node = api.list(&lp).await?.items;
                for (pod, component) in pods {
                    if on_node.iter().any(|p| p.name_any() == *pod) {
                        return Ok(Some(format!("{pod} is still going")));
                    }
                    let ready = on_node.iter().any(|p| {
                        !old.contains(&p.name_any().as_str())
                            && p.labels().get(label::COMPONENT).map(String::as_str)
                                == Some(component.gate_name())
                            && p.metadata.deletion_timestamp.is_none()
                            && gpu_pilot_core::facts::PodFacts::from_pod(p).is_some_and(|f| f.ready)
                    });
                    if !ready {
                        return Ok(Some(format!(
                            "no Ready {} pod of gpu-pilot's yet",
                            component.gate_name()
                        )));
                    }
                }
                Ok(None)
            }
        },
    )
    .await
}

/// NVIDIA's pods no gpu-pilot DaemonSet adopted (their job has no counterpart here).
async fn delete_leftovers(kube: &Kube, ns: &str) -> anyhow::Result<usize> {
    let snap_pods = read::gather(kube).await?.pods;
    let api: Api<Pod> = Api::namespaced(kube.client.clone(), ns);
    let mut n = 0;
    for p in snap_pods.iter().filter(|p| p.component.is_none()) {
        match api.delete(&p.name, &DeleteParams::default()).await {
            Ok(_) => n += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(patch_err(kube, format!("deleting pod {ns}/{}", p.name))(e)),
        }
    }
    Ok(n)
}
