//! What gpu-pilot knows about the cluster, kept small: a node's labels and the annotations the
//! controller owns, an operand pod's readiness, a DaemonSet's counts, and which policy is the
//! active one. The controller, the doctor and uninstall read nodes and pods through these types,
//! so they cannot disagree about what a GPU node is or whether a pod is failing.

use std::collections::BTreeMap;

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{Component, annotation, label, resource};
use kube::ResourceExt;

/// What the controller knows about a node (kept small: 1,000s of these live in memory).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Only the annotations the controller reads or writes.
    pub annotations: BTreeMap<String, String>,
    /// Sum of `nvidia.com/gpu` and `nvidia.com/mig-*` allocatable.
    pub gpu_allocatable: i64,
}

impl NodeFacts {
    pub fn from_node(node: &k8s_openapi::api::core::v1::Node) -> NodeFacts {
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let annotations = node
            .metadata
            .annotations
            .as_ref()
            .map(|a| {
                a.iter()
                    .filter(|(k, _)| {
                        *k == annotation::STAGE_REASON || *k == annotation::GPU_PRESENT_SOURCE
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let gpu_allocatable = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .map(|a| {
                a.iter()
                    .filter(|(k, _)| *k == resource::GPU || k.starts_with(resource::MIG_PREFIX))
                    .map(|(_, q)| q.0.parse::<i64>().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0);
        NodeFacts {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels,
            annotations,
            gpu_allocatable,
        }
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    /// NFD saw an NVIDIA PCI device on this node.
    pub fn nfd_gpu(&self) -> bool {
        label::NFD_GPU_LABELS
            .iter()
            .any(|k| self.label(k) == Some("true"))
    }

    /// A GPU node: NFD says so, or `nvidia.com/gpu.present=true` came from someone other than
    /// this controller (the agent's PCI scan).
    pub fn is_gpu_node(&self) -> bool {
        self.nfd_gpu()
            || (self.label(label::GPU_PRESENT) == Some("true")
                && !self
                    .annotations
                    .contains_key(annotation::GPU_PRESENT_SOURCE))
    }
}

/// An operand pod's state as far as the rollout cares.
#[derive(Debug, Clone, PartialEq)]
pub struct PodFacts {
    pub node: String,
    pub component: Component,
    pub ready: bool,
    /// Why it is not ready: a waiting reason (`ImagePullBackOff`, `CrashLoopBackOff`),
    /// `Init:<container>` while init containers run, or the phase.
    pub reason: Option<String>,
}

impl PodFacts {
    pub fn from_pod(pod: &k8s_openapi::api::core::v1::Pod) -> Option<PodFacts> {
        let component = pod
            .metadata
            .labels
            .as_ref()?
            .get(label::COMPONENT)
            .and_then(|c| Component::ALL.into_iter().find(|k| k.gate_name() == c))?;
        let node = pod.spec.as_ref()?.node_name.clone()?;
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let reason = if ready {
            None
        } else {
            status.and_then(pod_reason)
        };
        Some(PodFacts {
            node,
            component,
            ready,
            reason,
        })
    }
}

fn pod_reason(status: &k8s_openapi::api::core::v1::PodStatus) -> Option<String> {
    let waiting = |cs: &Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>| {
        cs.as_ref()?.iter().find_map(|c| {
            let w = c.state.as_ref()?.waiting.as_ref()?;
            Some((c.name.clone(), w.reason.clone().unwrap_or_default()))
        })
    };
    let init_running = status.init_container_statuses.as_ref().and_then(|cs| {
        cs.iter()
            .find(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_none()))
            .map(|c| c.name.clone())
    });
    if let Some((_, r)) = waiting(&status.init_container_statuses)
        && !r.is_empty()
        && r != "PodInitializing"
    {
        return Some(format!("Init:{r}"));
    }
    if let Some(name) = init_running {
        return Some(format!("Init:{name}"));
    }
    if let Some((_, r)) = waiting(&status.container_statuses)
        && !r.is_empty()
    {
        return Some(r);
    }
    status.phase.clone()
}

/// Reasons that mean "this will not fix itself soon", reported as failures.
pub fn is_failure(reason: &str) -> bool {
    const FAILURES: [&str; 8] = [
        "ImagePullBackOff",
        "ErrImagePull",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "InvalidImageName",
        "RunContainerError",
        "Failed",
    ];
    let r = reason.strip_prefix("Init:").unwrap_or(reason);
    FAILURES.contains(&r)
}

/// Ready/desired pods of one operand DaemonSet.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DaemonSetCounts {
    pub desired: i32,
    pub ready: i32,
}

/// An operand DaemonSet as observed.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonSetFacts {
    pub component: Option<Component>,
    pub hash: Option<String>,
    pub counts: DaemonSetCounts,
}

/// The policy gpu-pilot acts on: the oldest, ties broken by name, so every replica of the
/// controller, the webhook and the doctor agree. A policy being deleted still counts: it stays
/// the active one until the controller has cleaned up after it.
pub fn pick_active<'a>(
    policies: impl IntoIterator<Item = &'a ClusterPolicy>,
) -> Option<&'a ClusterPolicy> {
    policies.into_iter().min_by(|a, b| {
        let key = |p: &ClusterPolicy| {
            (
                p.metadata.creation_timestamp.clone().map(|t| t.0),
                p.name_any(),
            )
        };
        key(a).cmp(&key(b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_reasons_are_read_from_container_states() {
        let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": "x", "labels": {"app.kubernetes.io/component": "driver"}},
            "spec": {"nodeName": "gpu-1", "containers": []},
            "status": {"phase": "Pending", "containerStatuses": [
                {"name": "driver", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"waiting": {"reason": "ImagePullBackOff"}}}
            ]}
        }))
        .unwrap();
        let f = PodFacts::from_pod(&p).unwrap();
        assert_eq!(
            (f.component, f.ready, f.reason.as_deref()),
            (Component::Driver, false, Some("ImagePullBackOff"))
        );
        let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": "x", "labels": {"app.kubernetes.io/component": "operator-validator"}},
            "spec": {"nodeName": "gpu-1", "containers": []},
            "status": {"phase": "Pending", "initContainerStatuses": [
                {"name": "driver-validation", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "state": {"running": {}}}
            ]}
        }))
        .unwrap();
        assert_eq!(
            PodFacts::from_pod(&p).unwrap().reason.as_deref(),
            Some("Init:driver-validation")
        );
        assert!(is_failure("Init:CrashLoopBackOff"));
        assert!(!is_failure("Init:driver-validation"));
    }

    #[test]
    fn the_oldest_policy_is_active_even_while_it_is_deleted() {
        let policy = |name: &str, created: i64, deleting: bool| -> ClusterPolicy {
            let mut p: ClusterPolicy =
                serde_json::from_value(json!({"metadata": {"name": name}, "spec": {}})).unwrap();
            p.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
                ));
            if deleting {
                p.metadata.deletion_timestamp = p.metadata.creation_timestamp.clone();
            }
            p
        };
        let ps = [
            policy("b", 10, false),
            policy("a", 10, false),
            policy("old", 5, true),
        ];
        assert_eq!(pick_active(&ps).unwrap().name_any(), "old");
        assert_eq!(
            pick_active(&ps[..2]).unwrap().name_any(),
            "a",
            "ties go by name"
        );
        assert!(pick_active(&[]).is_none());
    }
}
