//! `kubectl gpu uninstall`: the policy first (the controller removes operands and node labels),
//! then whatever is left on nodes, then every object install created. Safe to run twice.

use std::time::{Duration, Instant};

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{FINALIZER, annotation, label};
use gpu_pilot_core::cleanup::node_cleanup_patch;
use gpu_pilot_core::render::managed_selector;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use serde_json::json;

use gpu_pilot_core::render::install as render;
use gpu_pilot_core::render::key;

use crate::cluster::objects::{self, Deleted};
use crate::cluster::{Kube, explain};
use crate::global::Global;
use crate::ui::Printer;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  kubectl gpu uninstall
  kubectl gpu uninstall --keep-crd          keep the ClusterPolicy CRD (and so other policies)
  kubectl gpu uninstall --force             even while GPU pods run (they lose their GPU stack)")]
pub struct UninstallArgs {
    /// Keep the ClusterPolicy CustomResourceDefinition.
    #[arg(long)]
    pub keep_crd: bool,
    /// Remove the policy even while GPU pods run (the webhook refuses that otherwise).
    #[arg(long)]
    pub force: bool,
    /// How long to wait for the controller to clean up before uninstall does it itself.
    #[arg(long, default_value = "2m", value_parser = gpu_pilot_core::duration::parse)]
    pub timeout: Duration,
}

pub async fn run(g: &Global, a: UninstallArgs) -> anyhow::Result<i32> {
    let kube = Kube::connect(g).await?;
    let mut out = Printer::new(g.colour());
    let ns = g.namespace.as_str();
    let mut removed = 0usize;

    out.heading("the ClusterPolicy");
    removed += remove_policies(&kube, &a, &mut out).await?;

    out.heading("gpu-pilot's labels and annotations on nodes");
    let (cleaned, ds) = clean_leftovers(&kube, ns).await?;
    out.line(&format!(
        "{cleaned} node(s) cleaned, {ds} operand DaemonSet(s) removed"
    ));
    removed += cleaned + ds;

    out.heading(&format!("what install created (namespace {ns})"));
    let mut objs = render::every_possible_object(ns);
    objs.extend(objects::values_config_maps(&kube, ns).await?);
    let mut kept = Vec::new();
    for o in objs.iter().rev() {
        match o["kind"].as_str() {
            Some("ClusterPolicy") => continue,
            Some("CustomResourceDefinition") if a.keep_crd => {
                out.line(&format!("kept      {} (--keep-crd)", key(o)));
                continue;
            }
            Some("Namespace") => {
                // Last: what gpu-pilot's components made at run time goes first.
                removed += delete_runtime_objects(&kube, ns, &mut out).await?;
            }
            _ => {}
        }
        match objects::delete(&kube, o).await? {
            Deleted::Deleted => {
                out.line(&format!("deleted   {}", key(o)));
                removed += 1;
            }
            Deleted::Kept => kept.push(key(o)),
            Deleted::Absent => {}
        }
    }
    // Helpers the controller renders (RuntimeClass, the agent's RBAC) if it never cleaned up.
    removed += delete_helpers(&kube, ns, &mut out).await?;
    for k in &kept {
        out.line(&format!(
            "kept      {k} (not created by gpu-pilot: no {}={} label{})",
            label::MANAGED_BY,
            label::MANAGED_BY_VALUE,
            if k.starts_with("Namespace/") {
                ", or it existed before install"
            } else {
                ""
            }
        ));
    }
    if removed == 0 {
        out.ok("nothing to remove: gpu-pilot is not installed");
    } else {
        out.ok(&format!(
            "gpu-pilot is uninstalled ({removed} objects or nodes changed)"
        ));
    }
    Ok(0)
}

async fn remove_policies(
    kube: &Kube,
    a: &UninstallArgs,
    out: &mut Printer,
) -> anyhow::Result<usize> {
    let api: Api<ClusterPolicy> = Api::all(kube.client.clone());
    let policies = match api.list_metadata(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            out.line("no ClusterPolicy API in the cluster");
            return Ok(0);
        }
        Err(e) => anyhow::bail!(explain(&e, &kube.server, "listing ClusterPolicies")),
    };
    if policies.is_empty() {
        out.line("no ClusterPolicy");
        return Ok(0);
    }
    let mut n = 0;
    for p in &policies {
        let name = p.name_any();
        if a.force {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {annotation::FORCE_DELETE: "true"}}}),
                ),
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(explain(
                    &e,
                    &kube.server,
                    &format!("marking ClusterPolicy {name} for forced deletion")
                ))
            })?;
        }
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                out.line(&format!("deleting  ClusterPolicy/{name}"));
                n += 1;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(kube::Error::Api(s))
                if !a.force
                    && (s.code == 403 || s.code == 400 || s.code == 422)
                    && s.message.contains("admission webhook") =>
            {
                anyhow::bail!(
                    "the webhook refused to delete ClusterPolicy {name}: {}\n(`kubectl gpu uninstall --force` confirms it for you)",
                    s.message
                );
            }
            Err(e) => anyhow::bail!(explain(
                &e,
                &kube.server,
                &format!("deleting ClusterPolicy {name}")
            )),
        }
    }
    // The controller removes the operands and node labels, then the finalizer.
    let deadline = Instant::now() + a.timeout;
    loop {
        let left = api
            .list_metadata(&ListParams::default())
            .await
            .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "listing ClusterPolicies")))?
            .items;
        if left.is_empty() {
            out.ok("the controller cleaned up and released the policy");
            return Ok(n);
        }
        if Instant::now() > deadline {
            out.warn(&format!(
                "the controller did not finish within {}s (is it running?); cleaning up without it",
                a.timeout.as_secs()
            ));
            // A guarded edit: the patch tests that the finalizer is still where it was read, so a
            // concurrent change to the list fails it (and the list is read again) instead of
            // being overwritten.
            let mut raced = false;
            for p in left {
                let name = p.name_any();
                let Some(i) = p.finalizers().iter().position(|f| f == FINALIZER) else {
                    continue;
                };
                let release: json_patch::Patch = serde_json::from_value(json!([
                    {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
                    {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
                ]))?;
                match api
                    .patch(&name, &PatchParams::default(), &Patch::Json::<()>(release))
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => raced = true,
                    Err(e) => anyhow::bail!(explain(
                        &e,
                        &kube.server,
                        &format!("releasing ClusterPolicy {name}")
                    )),
                }
            }
            if !raced {
                return Ok(n);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Node labels, and operand DaemonSets, that a controller which never ran its cleanup left.
async fn clean_leftovers(kube: &Kube, ns: &str) -> anyhow::Result<(usize, usize)> {
    let nodes: Api<Node> = Api::all(kube.client.clone());
    let list = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "listing nodes")))?;
    let mut cleaned = 0;
    for n in &list.items {
        if let Some(patch) = node_cleanup_patch(n) {
            match nodes
                .patch(&n.name_any(), &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                Ok(_) => cleaned += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => anyhow::bail!(explain(
                    &e,
                    &kube.server,
                    &format!("cleaning node {}", n.name_any())
                )),
            }
        }
    }
    let ds: Api<DaemonSet> = Api::namespaced(kube.client.clone(), ns);
    let lp = ListParams::default().labels(&managed_selector());
    let mut removed = 0;
    if let Ok(list) = ds.list_metadata(&lp).await {
        for d in list.items {
            if ds
                .delete(&d.name_any(), &DeleteParams::background())
                .await
                .is_ok()
            {
                removed += 1;
            }
        }
    }
    Ok((cleaned, removed))
}

/// Deletes every object of `api` that carries `selector`, printing each; a kind the cluster does
/// not serve counts as empty.
async fn delete_selected<K>(
    api: Api<K>,
    selector: &str,
    what: &str,
    out: &mut Printer,
    server: &str,
) -> anyhow::Result<usize>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let list = match api
        .list_metadata(&ListParams::default().labels(selector))
        .await
    {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(0),
        Err(e) => anyhow::bail!(explain(&e, server, &format!("listing {what}s"))),
    };
    let mut n = 0;
    for o in list {
        let name = o.name_any();
        let mut dp = DeleteParams::background();
        dp.preconditions = o.metadata.uid.clone().map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        });
        match api.delete(&name, &dp).await {
            Ok(_) => {
                out.line(&format!("deleted   {what}/{name}"));
                n += 1;
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => anyhow::bail!(explain(&e, server, &format!("deleting {what} {name}"))),
        }
    }
    Ok(n)
}

/// What gpu-pilot's components made while they ran, in its namespace: the webhook's TLS Secret,
/// cert-manager's Secret (labelled through the Certificate's secretTemplate) and the
/// controller's Lease. Only objects with the managed-by label.
async fn delete_runtime_objects(kube: &Kube, ns: &str, out: &mut Printer) -> anyhow::Result<usize> {
    let selector = managed_selector();
    let c = kube.client.clone();
    Ok(delete_selected(
        Api::<Secret>::namespaced(c.clone(), ns),
        &selector,
        "Secret",
        out,
        &kube.server,
    )
    .await?
        + delete_selected(
            Api::<Lease>::namespaced(c, ns),
            &selector,
            "Lease",
            out,
            &kube.server,
        )
        .await?)
}

/// The helper objects the controller renders (the agent's RBAC and ServiceAccounts, the
/// RuntimeClass), when the controller did not clean up: found by their labels, never by name, so
/// a RuntimeClass `nvidia` someone else made stays.
async fn delete_helpers(kube: &Kube, ns: &str, out: &mut Printer) -> anyhow::Result<usize> {
    let selector = format!(
        "{},{} in ({})",
        managed_selector(),
        label::COMPONENT,
        gpu_pilot_core::render::operands::HELPER_COMPONENTS.join(",")
    );
    let c = kube.client.clone();
    let s = &kube.server;
    Ok(delete_selected(
        Api::<ServiceAccount>::namespaced(c.clone(), ns),
        &selector,
        "ServiceAccount",
        out,
        s,
    )
    .await?
        + delete_selected(
            Api::<ClusterRoleBinding>::all(c.clone()),
            &selector,
            "ClusterRoleBinding",
            out,
            s,
        )
        .await?
        + delete_selected(
            Api::<ClusterRole>::all(c.clone()),
            &selector,
            "ClusterRole",
            out,
            s,
        )
        .await?
        + delete_selected(
            Api::<RuntimeClass>::all(c),
            &selector,
            "RuntimeClass",
            out,
            s,
        )
        .await?)
}
