//! The agent's own Node: feature labels kept current, and the MIG manager's label protocol.
//! Pure decisions (which labels to write or remove, which gates to pause) are functions here;
//! the patches are the thin edge.

use std::collections::BTreeMap;

use gpu_pilot_api::names::{Component, annotation, gate_value, label, mig_config_state};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Map, Value, json};

use crate::labels::Labels;

/// The GPU clients the MIG manager stops while it changes the layout (as NVIDIA's does).
pub const PAUSED_COMPONENTS: [Component; 3] = [
    Component::DevicePlugin,
    Component::GpuFeatureDiscovery,
    Component::DcgmExporter,
];

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "reading Node {node}: {source}. The agent needs get and patch on its own Node (agent/deploy/rbac.yaml)"
    )]
    Get { node: String, source: kube::Error },
    #[error(
        "patching Node {node}: {source}. The agent needs patch on its own Node (agent/deploy/rbac.yaml)"
    )]
    Patch { node: String, source: kube::Error },
}

/// The merge patch that makes the node carry `want` and drops the labels the agent wrote before
/// that no longer apply. `None` when the node already matches.
pub fn label_patch(node: &Node, want: &Labels) -> Option<Value> {
    let have = node.metadata.labels.clone().unwrap_or_default();
    let annotations = node.metadata.annotations.clone().unwrap_or_default();
    // The annotation is only a memo: anyone who may annotate the Node can edit it, so only
    // GFD's feature labels it lists are ever removed.
    let previous: Vec<&str> = annotations
        .get(annotation::AGENT_LABELS)
        .map(|s| {
            s.split(',')
                .filter(|k| crate::labels::is_feature_label(k))
                .collect()
        })
        .unwrap_or_default();
    let mut labels = Map::new();
    for (k, v) in want {
        if have.get(k) != Some(v) {
            labels.insert(k.clone(), Value::String(v.clone()));
        }
    }
    for k in previous {
        if !want.contains_key(k) && have.contains_key(k) {
            labels.insert(k.to_string(), Value::Null);
        }
    }
    let keys = want.keys().cloned().collect::<Vec<_>>().join(",");
    let keys_changed = annotations.get(annotation::AGENT_LABELS) != Some(&keys);
    if labels.is_empty() && !keys_changed {
        return None;
    }
    Some(json!({"metadata": {"labels": labels, "annotations": {annotation::AGENT_LABELS: keys}}}))
}

/// Gate labels to pause: those of [`PAUSED_COMPONENTS`] that are `true` now.
pub fn gates_to_pause(node: &Node) -> Vec<String> {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    PAUSED_COMPONENTS
        .iter()
        .map(|c| label::deploy_gate(*c))
        .filter(|k| labels.get(k).map(String::as_str) == Some(gate_value::ENABLED))
        .collect()
}

/// Gates a previous run paused and did not restore (it crashed in the middle). Only the gates
/// of [`PAUSED_COMPONENTS`] count, whatever else the annotation lists: restoring sets a label
/// to `true`, and the annotation is no proof of who wrote it.
pub fn paused_gates(node: &Node) -> Vec<String> {
    let pausable: Vec<String> = PAUSED_COMPONENTS
        .iter()
        .map(|c| label::deploy_gate(*c))
        .collect();
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation::MIG_PAUSED_GATES))
        .map(|s| {
            s.split(',')
                .filter(|k| pausable.iter().any(|p| p == k))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

pub fn label_of<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

/// Patch: state `pending`, the gates paused and remembered.
pub fn pause_patch(gates: &[String]) -> Value {
    let mut labels: BTreeMap<String, Value> = gates
        .iter()
        .map(|g| {
            (
                g.clone(),
                Value::String(gate_value::PAUSED_FOR_MIG_CHANGE.into()),
            )
        })
        .collect();
    labels.insert(
        label::MIG_CONFIG_STATE.into(),
        mig_config_state::PENDING.into(),
    );
    json!({"metadata": {"labels": labels, "annotations": {annotation::MIG_PAUSED_GATES: gates.join(",")}}})
}

/// Patch: the gates back to `true`, the memo removed, the state set (when given).
pub fn restore_patch(gates: &[String], state: Option<&str>) -> Value {
    let mut labels: BTreeMap<String, Value> = gates
        .iter()
        .map(|g| (g.clone(), Value::String(gate_value::ENABLED.into())))
        .collect();
    if let Some(s) = state {
        labels.insert(label::MIG_CONFIG_STATE.into(), s.into());
    }
    json!({"metadata": {"labels": labels, "annotations": {annotation::MIG_PAUSED_GATES: null}}})
}

/// The thin Kubernetes edge.
#[derive(Clone)]
pub struct NodeClient {
    pub api: Api<Node>,
    pub name: String,
}

impl NodeClient {
    pub fn new(client: Client, name: &str) -> NodeClient {
        NodeClient {
            api: Api::all(client),
            name: name.to_string(),
        }
    }

    pub async fn get(&self) -> Result<Node, NodeError> {
        self.api
            .get(&self.name)
            .await
            .map_err(|source| NodeError::Get {
                node: self.name.clone(),
                source,
            })
    }

    pub async fn patch(&self, patch: &Value) -> Result<Node, NodeError> {
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(|source| NodeError::Patch {
                node: self.name.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn node(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn writes_changes_and_removes_only_its_own_stale_labels() {
        let n = node(
            &[
                ("nvidia.com/gpu.count", "4"),
                ("nvidia.com/mig-1g.5gb.count", "7"),
                ("team", "a"),
            ],
            &[(
                annotation::AGENT_LABELS,
                "nvidia.com/gpu.count,nvidia.com/mig-1g.5gb.count",
            )],
        );
        let want: Labels = [("nvidia.com/gpu.count".to_string(), "8".to_string())].into();
        let p = label_patch(&n, &want).unwrap();
        assert_eq!(p["metadata"]["labels"]["nvidia.com/gpu.count"], "8");
        assert_eq!(
            p["metadata"]["labels"]["nvidia.com/mig-1g.5gb.count"],
            Value::Null
        );
        assert!(p["metadata"]["labels"].get("team").is_none());
        let done = node(
            &[("nvidia.com/gpu.count", "8")],
            &[(annotation::AGENT_LABELS, "nvidia.com/gpu.count")],
        );
        assert_eq!(label_patch(&done, &want), None);
    }

    #[test]
    fn a_forged_annotation_removes_no_label_it_does_not_own() {
        let n = node(
            &[
                ("nvidia.com/gpu.deploy.driver", "true"),
                ("kubernetes.io/hostname", "n1"),
                ("nvidia.com/mig.config", "all-1g.10gb"),
                ("team", "a"),
            ],
            &[
                (
                    annotation::AGENT_LABELS,
                    "nvidia.com/gpu.deploy.driver,kubernetes.io/hostname,nvidia.com/mig.config,team",
                ),
                (
                    annotation::MIG_PAUSED_GATES,
                    "nvidia.com/gpu.deploy.driver,team,nvidia.com/gpu.deploy.device-plugin",
                ),
            ],
        );
        let p = label_patch(&n, &Labels::new()).unwrap();
        assert_eq!(p["metadata"]["labels"], serde_json::json!({}), "{p}");
        assert_eq!(
            paused_gates(&n),
            vec!["nvidia.com/gpu.deploy.device-plugin".to_string()]
        );
    }

    #[test]
    fn pauses_only_enabled_gates() {
        let n = node(
            &[
                ("nvidia.com/gpu.deploy.device-plugin", "true"),
                ("nvidia.com/gpu.deploy.dcgm-exporter", "false"),
            ],
            &[],
        );
        assert_eq!(
            gates_to_pause(&n),
            vec!["nvidia.com/gpu.deploy.device-plugin".to_string()]
        );
        let p = pause_patch(&gates_to_pause(&n));
        assert_eq!(
            p["metadata"]["labels"]["nvidia.com/gpu.deploy.device-plugin"],
            "paused-for-mig-change"
        );
        assert_eq!(
            p["metadata"]["labels"]["nvidia.com/mig.config.state"],
            "pending"
        );
        let r = restore_patch(&gates_to_pause(&n), Some("failed"));
        assert_eq!(
            r["metadata"]["labels"]["nvidia.com/gpu.deploy.device-plugin"],
            "true"
        );
        assert_eq!(
            r["metadata"]["labels"]["nvidia.com/mig.config.state"],
            "failed"
        );
    }

    /// The agent's RBAC stays least-privilege: what it grants is exactly what `NodeClient` uses
    /// (get and merge-patch of Nodes), and the own-node admission policy is there. Pod attribution
    /// reads the kubelet's pod-resources socket, which needs no Kubernetes permission.
    #[test]
    fn deploy_rbac_grants_only_get_and_patch_of_nodes() {
        use serde::Deserialize;
        let text = include_str!("../deploy/rbac.yaml");
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).unwrap())
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding"
            ]
        );
        let role = &docs[1];
        assert_eq!(
            role["rules"],
            json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]),
            "agent/deploy/rbac.yaml grants more than the agent uses"
        );
        let vap = &docs[3];
        assert_eq!(vap["spec"]["failurePolicy"], "Fail");
        assert!(
            vap["spec"]["validations"][0]["expression"]
                .as_str()
                .unwrap()
                .contains("object.metadata.name"),
            "{vap}"
        );
    }
}
