//! `kubectl gpu uninstall`: the policy first (the controller removes operands and node labels),
//! then whatever is left on nodes, then every object install created. Safe to run twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{FINALIZER, annotation, label};
use gpu_pilot_controller::rollout::{NodeFacts, cleanup_node};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::context::{Global, Kube, explain};
use crate::install::{Printer, parse_duration};
use crate::objects;
use crate::render::{self, key};

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
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
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
    for o in objs.iter().rev() {
        match o["kind"].as_str() {
            Some("ClusterPolicy") => continue,
            Some("CustomResourceDefinition") if a.keep_crd => {
                out.line(&format!("kept      {} (--keep-crd)", key(o)));
                continue;
            }
            Some("Namespace") if !objects::made_by_gpu_pilot(&kube, o).await? => {
                if objects::exists(&kube, o).await? {
                    out.line(&format!(
                        "kept      {} (gpu-pilot did not create it)",
                        key(o)
                    ));
                }
                continue;
            }
            _ => {}
        }
        if objects::delete(&kube, o).await? {
            out.line(&format!("deleted   {}", key(o)));
            removed += 1;
        }
    }
    // Helpers the controller renders (RuntimeClass, the agent's RBAC) if it never cleaned up.
    removed += delete_helpers(&kube, ns).await?;
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
            for p in left {
                let name = p.name_any();
                let finalizers: Vec<String> = p
                    .finalizers()
                    .iter()
                    .filter(|f| *f != FINALIZER)
                    .cloned()
                    .collect();
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
                )
                .await
                .map_err(|e| {
                    anyhow::anyhow!(explain(
                        &e,
                        &kube.server,
                        &format!("releasing ClusterPolicy {name}")
                    ))
                })?;
            }
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The merge patch that removes every label and annotation gpu-pilot put on a node, or `None`.
pub fn node_cleanup_patch(node: &Node) -> Option<Value> {
    let facts = NodeFacts::from_node(node);
    let plan = cleanup_node(&facts);
    let mut labels: BTreeMap<String, Value> =
        plan.labels.into_keys().map(|k| (k, Value::Null)).collect();
    let mut annotations: BTreeMap<String, Value> = plan
        .annotations
        .into_keys()
        .map(|k| (k, Value::Null))
        .collect();
    let node_labels = node.labels();
    let node_annotations = node.annotations();
    // The agent's labels (GFD's names), as it recorded them.
    if let Some(keys) = node_annotations.get(annotation::AGENT_LABELS) {
        for k in keys.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            if node_labels.contains_key(k) {
                labels.insert(k.to_string(), Value::Null);
            }
        }
        annotations.insert(annotation::AGENT_LABELS.into(), Value::Null);
    }
    for k in [annotation::MIG_PAUSED_GATES, annotation::STAGE_REASON] {
        if node_annotations.contains_key(k) {
            annotations.insert(k.into(), Value::Null);
        }
    }
    // Gates the MIG manager paused, and its state label.
    for (k, v) in node_labels {
        if k.starts_with(label::DEPLOY_PREFIX)
            && v.starts_with(gpu_pilot_api::names::gate_value::PAUSED_PREFIX)
        {
            labels.insert(k.clone(), Value::Null);
        }
    }
    if node_labels.contains_key(label::MIG_CONFIG_STATE) {
        labels.insert(label::MIG_CONFIG_STATE.into(), Value::Null);
    }
    if labels.is_empty() && annotations.is_empty() {
        return None;
    }
    Some(json!({"metadata": {"labels": labels, "annotations": annotations}}))
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
    let lp = ListParams::default().labels(&gpu_pilot_controller::render::managed_selector());
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

async fn delete_helpers(kube: &Kube, ns: &str) -> anyhow::Result<usize> {
    let policy = ClusterPolicy::new(
        gpu_pilot_api::names::DEFAULT_POLICY_NAME,
        Default::default(),
    );
    let desired = gpu_pilot_controller::render::render(&policy, ns);
    let mut objs: Vec<Value> = vec![
        serde_json::to_value(&desired.runtime_class)?,
        serde_json::to_value(&desired.agent_role)?,
        serde_json::to_value(&desired.agent_role_binding)?,
    ];
    for sa in &desired.service_accounts {
        objs.push(serde_json::to_value(sa)?);
    }
    let mut n = 0;
    for mut o in objs {
        if o["kind"] == "RuntimeClass" {
            // Not a kind install applies; delete it directly.
            let api: Api<k8s_openapi::api::node::v1::RuntimeClass> = Api::all(kube.client.clone());
            let name = o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if api.delete(&name, &DeleteParams::background()).await.is_ok() {
                n += 1;
            }
            continue;
        }
        if o["metadata"]["namespace"].is_null() && o["kind"] == "ServiceAccount" {
            o["metadata"]["namespace"] = json!(ns);
        }
        if objects::delete(kube, &o).await? {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: Value, annotations: Value) -> Node {
        serde_json::from_value(
            json!({"metadata": {"name": "n", "labels": labels, "annotations": annotations}}),
        )
        .unwrap()
    }

    #[test]
    fn cleanup_takes_gpu_pilots_labels_and_keeps_the_admins() {
        let n = node(
            json!({
                "nvidia.com/gpu.deploy.driver": "true",
                "nvidia.com/gpu.deploy.device-plugin": "false",
                "nvidia.com/gpu.deploy.gpu-feature-discovery": "paused-for-mig-change",
                "gpupilot.io/stage": "ready",
                "nvidia.com/gpu.count": "8",
                "nvidia.com/mig.config": "all-1g.10gb",
                "nvidia.com/mig.config.state": "success",
                "team": "ml",
            }),
            json!({"gpupilot.io/agent-labels": "nvidia.com/gpu.count,nvidia.com/gpu.product", "gpupilot.io/stage-reason": "x"}),
        );
        let p = node_cleanup_patch(&n).unwrap();
        let l = &p["metadata"]["labels"];
        assert!(
            l["nvidia.com/gpu.deploy.driver"].is_null()
                && l.get("nvidia.com/gpu.deploy.driver").is_some()
        );
        assert!(
            l.get("nvidia.com/gpu.deploy.device-plugin").is_none(),
            "an admin's false stays"
        );
        assert!(
            l.get("nvidia.com/gpu.deploy.gpu-feature-discovery")
                .is_some()
        );
        assert!(l.get("gpupilot.io/stage").is_some());
        assert!(l.get("nvidia.com/gpu.count").is_some());
        assert!(l.get("nvidia.com/gpu.product").is_none(), "not on the node");
        assert!(
            l.get("nvidia.com/mig.config").is_none(),
            "the admin's request stays"
        );
        assert!(l.get("nvidia.com/mig.config.state").is_some());
        assert!(l.get("team").is_none());
        assert!(
            p["metadata"]["annotations"]
                .get("gpupilot.io/agent-labels")
                .is_some()
        );
        assert!(node_cleanup_patch(&node(json!({"team": "ml"}), json!({}))).is_none());
    }
}
