//! The checks: pure functions from a [`Snapshot`] to [`Finding`]s. None of them talks to the
//! cluster, so each is unit-tested over hand-built snapshots. They are grouped by theme, one
//! module each with its tests beside it; this module registers them and holds the helpers they
//! share.

use std::collections::{BTreeMap, BTreeSet};

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{
    Component, Stage, annotation, gate_value, label, mig_config_state, resource, webhook,
};
use gpu_pilot_api::policy::{MigStrategy, PolicyState};
use gpu_pilot_core::facts::{NodeFacts, PodFacts, is_failure};
use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::{Finding, Severity};
use crate::doctor::snapshot::{Snapshot, is_operand};

mod admission;
mod config;
mod events;
mod install;
mod mig;
mod nodes;
mod rollout;
mod sandbox;
#[cfg(test)]
pub(crate) mod testkit;
mod workloads;

use admission::*;
use config::*;
use events::*;
use install::*;
use mig::*;
use nodes::*;
use rollout::*;
use sandbox::*;
use workloads::*;

pub use mig::writes_mig_state;

/// One check: its id, the worst severity it reports, what it looks for, and the function.
pub struct Check {
    pub id: &'static str,
    pub severity: Severity,
    pub about: &'static str,
    pub run: fn(&Snapshot) -> Vec<Finding>,
}

macro_rules! checks {
    ($( $f:ident : $id:literal, $sev:ident, $about:literal; )*) => {
        /// Every check, in the order they run.
        pub const CHECKS: &[Check] = &[ $( Check { id: $id, severity: Severity::$sev, about: $about, run: $f } ),* ];
    };
}

checks! {
    kubernetes_version: "kubernetes-version", Error, "the Kubernetes version is one gpu-pilot supports";
    not_installed: "gpu-pilot-not-installed", Error, "the ClusterPolicy CRD (clusterpolicies.gpupilot.io) exists";
    no_policy: "no-cluster-policy", Error, "a ClusterPolicy exists";
    multiple_policies: "multiple-cluster-policies", Warning, "exactly one ClusterPolicy exists (the others are ignored)";
    gpu_operator: "gpu-operator-installed", Error, "NVIDIA's GPU Operator is not installed beside gpu-pilot";
    namespace_mismatch: "namespace-mismatch", Warning, "the checked namespace (-n) is the one the controller runs the operands in";
    controller_not_running: "controller-not-running", Error, "the controller runs: policy status current, Deployment available, Lease renewed";
    no_gpu_nodes: "no-gpu-nodes", Error, "some node is a GPU node (NFD label or nvidia.com/gpu.present=true)";
    gpu_not_allocatable: "gpu-not-allocatable", Error, "every GPU node past the rollout advertises nvidia.com/gpu (or MIG resources), and why not";
    stage_stuck: "stage-stuck", Error, "no GPU node is held in a stage by a failing operand pod (image pulls, crash loops, init)";
    rollout_in_progress: "rollout-in-progress", Info, "GPU nodes still moving through the stages";
    daemonset_unavailable: "operand-daemonset-unavailable", Error, "every enabled operand's DaemonSet exists and has a ready pod on every node it wants";
    runtime_class_missing: "runtimeclass-missing", Error, "the policy's RuntimeClass exists";
    webhook_not_installed: "webhook-not-installed", Warning, "the admission webhook is registered (info when neither configuration exists)";
    webhook_unreachable: "webhook-unreachable", Error, "the webhook configurations' target answers: Service with ready endpoints, or a URL that completes TLS";
    webhook_ca_bundle: "webhook-ca-bundle-empty", Error, "the webhook configurations carry a caBundle";
    webhook_cert: "webhook-cert-expiring", Error, "the webhook's certificate and CA are valid for 30 days or more";
    webhook_ignore: "webhook-failure-policy-ignore", Info, "webhooks fail closed (failurePolicy Fail)";
    mig_failed: "mig-config-failed", Error, "no node's MIG layout change failed (nvidia.com/mig.config.state=failed)";
    mig_pending: "mig-config-pending", Warning, "MIG layout changes in progress (warning after 15 minutes)";
    gate_paused: "gate-paused", Warning, "no deploy gate is left paused-* outside a MIG change";
    pending_gpu_pods: "pending-gpu-pods", Warning, "no pod asking for GPUs waits unscheduled, and why it does";
    sandbox_failures: "pod-sandbox-failed", Error, "no pod is stuck before starting because its sandbox cannot be created (FailedCreatePodSandBox: a runtime handler containerd lacks, a RuntimeClass gone, the pod network, the pause image)";
    driver_skew: "driver-version-skew", Warning, "every GPU node runs the same driver version";
    node_not_ready: "gpu-node-not-ready", Error, "every GPU node is Ready";
    node_cordoned: "gpu-node-cordoned", Warning, "no GPU node is cordoned";
    taint_not_tolerated: "taint-not-tolerated", Error, "the operands tolerate every GPU node's taints (policy daemonsets.tolerations)";
    gpu_unhealthy: "gpu-unhealthy", Warning, "allocatable nvidia.com/gpu equals capacity (no unhealthy GPUs)";
    device_plugin_config: "device-plugin-config-missing", Error, "nvidia.com/device-plugin.config labels name an entry of the policy's device-plugin ConfigMap";
    policy_configmaps: "policy-configmap-missing", Error, "the ConfigMaps the policy names exist in gpu-pilot's namespace";
    opted_out: "operands-opted-out", Info, "GPU nodes opted out with nvidia.com/gpu.deploy.operands=false";
    mig_strategy_mismatch: "mig-strategy-mismatch", Warning, "nodes' nvidia.com/mig.strategy label agrees with the policy";
    warning_events: "warning-events", Info, "Warning events in gpu-pilot's namespace in the last hour";
    incomplete: "doctor-incomplete", Warning, "every part of the snapshot could be read";
}

/// Runs every check.
pub fn run_all(s: &Snapshot) -> Vec<Finding> {
    CHECKS.iter().flat_map(|c| (c.run)(s)).collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers over the snapshot
// ---------------------------------------------------------------------------------------------

const CRD_NAME: &str = "clusterpolicies.gpupilot.io";
const CONTROLLER: &str = gpu_pilot_core::render::install::CONTROLLER;

fn node_ref(n: &Node) -> String {
    format!("Node/{}", n.name_any())
}

fn pod_ref(p: &Pod) -> String {
    format!("Pod/{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

fn node_label<'a>(n: &'a Node, key: &str) -> Option<&'a str> {
    n.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

fn node_annotation<'a>(n: &'a Node, key: &str) -> Option<&'a str> {
    n.metadata
        .annotations
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

/// GPU nodes, by the controller's own rule.
pub fn gpu_nodes(s: &Snapshot) -> Vec<&Node> {
    s.nodes
        .iter()
        .filter(|n| NodeFacts::from_node(n).is_gpu_node())
        .collect()
}

/// GPU nodes that did not opt out of the operands.
fn managed_gpu_nodes(s: &Snapshot) -> Vec<&Node> {
    gpu_nodes(s)
        .into_iter()
        .filter(|n| node_label(n, label::DEPLOY_OPERANDS) != Some(gate_value::DISABLED))
        .collect()
}

/// The policy the controller acts on, as the controller picks it (a policy being deleted is
/// still the active one until the controller has cleaned up after it).
pub fn active_policy(s: &Snapshot) -> Option<&ClusterPolicy> {
    gpu_pilot_core::facts::pick_active(&s.policies)
}

fn quantity(n: &Node, allocatable: bool, res: &str) -> Option<i64> {
    let st = n.status.as_ref()?;
    let map = if allocatable {
        st.allocatable.as_ref()?
    } else {
        st.capacity.as_ref()?
    };
    map.get(res).map(|q| parse_count(&q.0))
}

/// A count quantity ("8", "8000m" is unusual for devices but parsed, "1k").
fn parse_count(q: &str) -> i64 {
    let q = q.trim();
    if let Ok(v) = q.parse::<i64>() {
        return v;
    }
    if let Some(m) = q.strip_suffix('m') {
        return m.parse::<i64>().map(|v| v / 1000).unwrap_or(0);
    }
    if let Some(k) = q.strip_suffix('k') {
        return k.parse::<i64>().map(|v| v * 1000).unwrap_or(0);
    }
    0
}

fn mig_allocatable(n: &Node) -> i64 {
    n.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .map(|a| {
            a.iter()
                .filter(|(k, _)| k.starts_with(resource::MIG_PREFIX))
                .map(|(_, q)| parse_count(&q.0))
                .sum()
        })
        .unwrap_or(0)
}

/// The node's Ready condition: `(status, reason, message)`.
fn ready_condition(n: &Node) -> Option<(String, String, String)> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

fn node_is_ready(n: &Node) -> bool {
    ready_condition(n).is_some_and(|(s, _, _)| s == "True")
}

/// Operand pods with their facts.
fn operand_pods(s: &Snapshot) -> Vec<(&Pod, PodFacts)> {
    s.pods
        .iter()
        .filter(|p| is_operand(p))
        .filter_map(|p| PodFacts::from_pod(p).map(|f| (p, f)))
        .collect()
}

fn ns_flag(s: &Snapshot) -> String {
    format!("-n {}", s.namespace)
}

fn count_phrase(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// Lists up to `max` items and says how many more there are.
fn list_some(items: &[String], max: usize) -> String {
    let mut s = items
        .iter()
        .take(max)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > max {
        s.push_str(&format!(" and {} more", items.len() - max));
    }
    s
}

fn policy_name(s: &Snapshot) -> String {
    active_policy(s)
        .map(|p| p.name_any())
        .unwrap_or_else(|| gpu_pilot_api::names::DEFAULT_POLICY_NAME.to_string())
}

fn age_seconds(s: &Snapshot, t: Option<Timestamp>) -> Option<i64> {
    Some(s.now?.as_second() - t?.as_second())
}
