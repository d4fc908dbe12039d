//! What removing gpu-pilot takes off a node: every label and annotation it put there, the agent's
//! GPU feature labels as the agent recorded them included, and nothing an admin set. Shared by
//! `kubectl gpu uninstall` and the chart's uninstall hook (`gpu-pilot-controller uninstall-hook`).

use std::collections::BTreeMap;

use gpu_pilot_api::names::{annotation, label};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::facts::NodeFacts;
use crate::rollout::cleanup_node;

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
