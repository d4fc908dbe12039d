//! The checks: pure functions from a [`Snapshot`] to [`Finding`]s. None of them talks to the
//! cluster, so each is unit-tested over hand-built snapshots.

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

use super::snapshot::{Snapshot, is_operand};
use super::{Finding, Severity};

/// One check: its id, the worst severity it reports, what it looks for, and the function.
pub struct Check {
    pub id: &'static str,
    pub severity: &'static str,
    pub about: &'static str,
    pub run: fn(&Snapshot) -> Vec<Finding>,
}

macro_rules! checks {
    ($( $f:ident : $id:literal, $sev:literal, $about:literal; )*) => {
        /// Every check, in the order they run.
        pub const CHECKS: &[Check] = &[ $( Check { id: $id, severity: $sev, about: $about, run: $f } ),* ];
    };
}

checks! {
    kubernetes_version: "kubernetes-version", "error", "the Kubernetes version is one gpu-pilot supports";
    not_installed: "gpu-pilot-not-installed", "error", "the ClusterPolicy CRD (clusterpolicies.gpupilot.io) exists";
    no_policy: "no-cluster-policy", "error", "a ClusterPolicy exists";
    multiple_policies: "multiple-cluster-policies", "warning", "exactly one ClusterPolicy exists (the others are ignored)";
    gpu_operator: "gpu-operator-installed", "error", "NVIDIA's GPU Operator is not installed beside gpu-pilot";
    namespace_mismatch: "namespace-mismatch", "warning", "the checked namespace (-n) is the one the controller runs the operands in";
    controller_not_running: "controller-not-running", "error", "the controller runs: policy status current, Deployment available, Lease renewed";
    no_gpu_nodes: "no-gpu-nodes", "error", "some node is a GPU node (NFD label or nvidia.com/gpu.present=true)";
    gpu_not_allocatable: "gpu-not-allocatable", "error", "every GPU node past the rollout advertises nvidia.com/gpu (or MIG resources), and why not";
    stage_stuck: "stage-stuck", "error", "no GPU node is held in a stage by a failing operand pod (image pulls, crash loops, init)";
    rollout_in_progress: "rollout-in-progress", "info", "GPU nodes still moving through the stages";
    daemonset_unavailable: "operand-daemonset-unavailable", "error", "every enabled operand's DaemonSet exists and has a ready pod on every node it wants";
    runtime_class_missing: "runtimeclass-missing", "error", "the policy's RuntimeClass exists";
    webhook_not_installed: "webhook-not-installed", "warning", "the admission webhook is registered (info when neither configuration exists)";
    webhook_unreachable: "webhook-unreachable", "error", "the webhook configurations' target answers: Service with ready endpoints, or a URL that completes TLS";
    webhook_ca_bundle: "webhook-ca-bundle-empty", "error", "the webhook configurations carry a caBundle";
    webhook_cert: "webhook-cert-expiring", "error", "the webhook's certificate and CA are valid for 30 days or more";
    webhook_ignore: "webhook-failure-policy-ignore", "info", "webhooks fail closed (failurePolicy Fail)";
    mig_failed: "mig-config-failed", "error", "no node's MIG layout change failed (nvidia.com/mig.config.state=failed)";
    mig_pending: "mig-config-pending", "warning", "MIG layout changes in progress (warning after 15 minutes)";
    gate_paused: "gate-paused", "warning", "no deploy gate is left paused-* outside a MIG change";
    pending_gpu_pods: "pending-gpu-pods", "warning", "no pod asking for GPUs waits unscheduled, and why it does";
    driver_skew: "driver-version-skew", "warning", "every GPU node runs the same driver version";
    node_not_ready: "gpu-node-not-ready", "error", "every GPU node is Ready";
    node_cordoned: "gpu-node-cordoned", "warning", "no GPU node is cordoned";
    taint_not_tolerated: "taint-not-tolerated", "error", "the operands tolerate every GPU node's taints (policy daemonsets.tolerations)";
    gpu_unhealthy: "gpu-unhealthy", "warning", "allocatable nvidia.com/gpu equals capacity (no unhealthy GPUs)";
    device_plugin_config: "device-plugin-config-missing", "error", "nvidia.com/device-plugin.config labels name an entry of the policy's device-plugin ConfigMap";
    policy_configmaps: "policy-configmap-missing", "error", "the ConfigMaps the policy names exist in gpu-pilot's namespace";
    opted_out: "operands-opted-out", "info", "GPU nodes opted out with nvidia.com/gpu.deploy.operands=false";
    mig_strategy_mismatch: "mig-strategy-mismatch", "warning", "nodes' nvidia.com/mig.strategy label agrees with the policy";
    warning_events: "warning-events", "info", "Warning events in gpu-pilot's namespace in the last hour";
    incomplete: "doctor-incomplete", "warning", "every part of the snapshot could be read";
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

/// The policy the controller acts on: the oldest (ties broken by name), as the controller picks.
pub fn active_policy(s: &Snapshot) -> Option<&ClusterPolicy> {
    s.policies
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .min_by(|a, b| {
            let t = |p: &ClusterPolicy| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            t(a).cmp(&t(b))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        })
        .or_else(|| s.policies.first())
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

// ---------------------------------------------------------------------------------------------
// Installation
// ---------------------------------------------------------------------------------------------

fn kubernetes_version(s: &Snapshot) -> Vec<Finding> {
    let Some((major, minor, git)) = &s.version else {
        return vec![];
    };
    match crate::cluster::probe::version_verdict(*major, *minor) {
        Ok(None) => vec![],
        Ok(Some(note)) => vec![
            Finding::new(
                "kubernetes-version",
                Severity::Info,
                format!("Kubernetes {git} is newer than the versions gpu-pilot is tested on"),
            )
            .evidence([note])
            .fix("Nothing to do unless something misbehaves; then report it with a support bundle (kubectl gpu doctor --bundle FILE.tar.gz)."),
        ],
        Err(why) => vec![
            Finding::new(
                "kubernetes-version",
                Severity::Error,
                format!("Kubernetes {git} is not supported"),
            )
            .evidence([why])
            .fix("Upgrade the control plane to a supported Kubernetes version, then run kubectl gpu install again."),
        ],
    }
}

fn not_installed(s: &Snapshot) -> Vec<Finding> {
    if s.crds.iter().any(|c| c == CRD_NAME) || s.crds.is_empty() && !s.unreadable.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "gpu-pilot-not-installed",
            Severity::Error,
            "gpu-pilot is not installed: the ClusterPolicy CRD is missing",
        )
        .objects([format!("CustomResourceDefinition/{CRD_NAME}")])
        .evidence([format!("{} CRDs in the cluster, none named {CRD_NAME}", s.crds.len())])
        .fix(format!(
            "kubectl gpu install {} (or helm install gpu-pilot charts/gpu-pilot --namespace {} --create-namespace)",
            ns_flag(s),
            s.namespace
        )),
    ]
}

fn no_policy(s: &Snapshot) -> Vec<Finding> {
    if !s.crds.iter().any(|c| c == CRD_NAME) || !s.policies.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "no-cluster-policy",
            Severity::Error,
            "No ClusterPolicy: nothing deploys the GPU stack",
        )
        .evidence([format!("the CRD {CRD_NAME} exists but holds no object")])
        .fix(format!(
            "kubectl gpu install {} (it creates the policy), or: kubectl apply -f - <<<'{{\"apiVersion\": \"gpupilot.io/v1alpha1\", \"kind\": \"ClusterPolicy\", \"metadata\": {{\"name\": \"{}\"}}, \"spec\": {{}}}}'",
            ns_flag(s),
            gpu_pilot_api::names::DEFAULT_POLICY_NAME
        )),
    ]
}

fn multiple_policies(s: &Snapshot) -> Vec<Finding> {
    if s.policies.len() < 2 {
        return vec![];
    }
    let active = active_policy(s).map(|p| p.name_any()).unwrap_or_default();
    let others: Vec<String> = s
        .policies
        .iter()
        .map(|p| p.name_any())
        .filter(|n| *n != active)
        .collect();
    vec![
        Finding::new(
            "multiple-cluster-policies",
            Severity::Warning,
            format!(
                "{} ClusterPolicies: only {active} is active, the others are ignored",
                s.policies.len()
            ),
        )
        .objects(others.iter().map(|n| format!("ClusterPolicy/{n}")))
        .evidence([format!(
            "the oldest policy ({active}) is the active one; ignored: {}",
            others.join(", ")
        )])
        .fix(format!(
            "Move any settings you need into {active}, then delete the others: kubectl delete clusterpolicy {}",
            others.join(" ")
        )),
    ]
}

fn gpu_operator(s: &Snapshot) -> Vec<Finding> {
    if s.gpu_operator_signs.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "gpu-operator-installed",
            Severity::Error,
            "NVIDIA's GPU Operator is installed beside gpu-pilot: both manage the same nodes and labels",
        )
        .objects(["CustomResourceDefinition/clusterpolicies.nvidia.com"])
        .evidence(s.gpu_operator_signs.clone())
        .fix("Run one of the two. To keep gpu-pilot: helm uninstall gpu-operator -n gpu-operator, then kubectl delete crd clusterpolicies.nvidia.com nvidiadrivers.nvidia.com"),
    ]
}

fn namespace_mismatch(s: &Snapshot) -> Vec<Finding> {
    let Some(p) = active_policy(s) else {
        return vec![];
    };
    let Some(ns) = p.status.as_ref().and_then(|st| st.namespace.clone()) else {
        return vec![];
    };
    if ns == s.namespace {
        return vec![];
    }
    vec![
        Finding::new(
            "namespace-mismatch",
            Severity::Warning,
            format!(
                "The controller runs the operands in namespace {ns}, but doctor checked {}",
                s.namespace
            ),
        )
        .objects([format!("ClusterPolicy/{}", p.name_any())])
        .evidence([format!("status.namespace of the policy is {ns}")])
        .fix(format!("kubectl gpu doctor -n {ns}")),
    ]
}

fn controller_not_running(s: &Snapshot) -> Vec<Finding> {
    let mut evidence = Vec::new();
    let mut broken = false;
    let deploy = s.deployments.iter().find(|d| d.name_any() == CONTROLLER);
    if let Some(d) = deploy {
        let want = d.spec.replicas.unwrap_or(1);
        let available = d
            .status
            .as_ref()
            .and_then(|st| st.available_replicas)
            .unwrap_or(0);
        if want > 0 && available == 0 {
            broken = true;
            evidence.push(format!(
                "Deployment {}/{CONTROLLER}: 0 of {want} replicas available",
                s.namespace
            ));
        }
        let controller_pods: Vec<&Pod> = s
            .pods
            .iter()
            .filter(|p| p.labels().get(label::NAME).map(String::as_str) == Some(CONTROLLER))
            .collect();
        for p in controller_pods.iter().take(3) {
            if let Some(r) = p.status.as_ref().and_then(pod_problem) {
                evidence.push(format!("Pod {}: {r}", p.name_any()));
            }
        }
    }
    // Without a Deployment the controller may run elsewhere (a test, a dev machine): the
    // policy status and the Lease tell.
    if let Some(p) = active_policy(s) {
        let generation = p.metadata.generation.unwrap_or(0);
        let observed = p.status.as_ref().and_then(|st| st.observed_generation);
        let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let old = age_seconds(s, created).unwrap_or(i64::MAX) > 60;
        match observed {
            None if old => {
                broken = true;
                evidence.push(format!(
                    "ClusterPolicy {} has no status {} after it was created",
                    p.name_any(),
                    age_seconds(s, created)
                        .map(|a| format!("{a} s"))
                        .unwrap_or_else(|| "long".into())
                ));
            }
            Some(o) if o < generation => {
                broken = true;
                evidence.push(format!(
                    "ClusterPolicy {}: status.observedGeneration {o} < metadata.generation {generation}: the last spec change was never acted on",
                    p.name_any()
                ));
            }
            _ => {}
        }
    }
    if let Some(lease) = &s.lease {
        let spec = lease.spec.as_ref();
        let renewed = spec.and_then(|l| l.renew_time.as_ref()).map(|t| t.0);
        let duration = spec
            .and_then(|l| l.lease_duration_seconds)
            .unwrap_or(15)
            .max(1) as i64;
        if let Some(age) = age_seconds(s, renewed)
            && age > 3 * duration
        {
            evidence.push(format!(
                "Lease {}/{}: last renewed {age} s ago by {} (duration {duration} s): no leader",
                s.namespace,
                super::snapshot::CONTROLLER_LEASE,
                spec.and_then(|l| l.holder_identity.clone())
                    .unwrap_or_else(|| "nobody".into())
            ));
            broken = true;
        }
    }
    if !broken {
        return vec![];
    }
    vec![
        Finding::new(
            "controller-not-running",
            Severity::Error,
            "The gpu-pilot controller is not running: policy changes and new nodes are not acted on",
        )
        .objects([format!("Deployment/{}/{CONTROLLER}", s.namespace)])
        .evidence(evidence)
        .fix(format!(
            "kubectl {} get pods -l {}={CONTROLLER}; kubectl {} logs deploy/{CONTROLLER}. If it is missing: kubectl gpu install {}",
            ns_flag(s),
            label::NAME,
            ns_flag(s),
            ns_flag(s)
        )),
    ]
}

/// Why a pod is not running, from its status, or `None` when it runs.
fn pod_problem(st: &k8s_openapi::api::core::v1::PodStatus) -> Option<String> {
    let statuses = st
        .init_container_statuses
        .iter()
        .flatten()
        .chain(st.container_statuses.iter().flatten());
    for cs in statuses {
        if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_default();
            if reason != "PodInitializing" && !reason.is_empty() {
                return Some(format!(
                    "container {} waiting: {reason}{}",
                    cs.name,
                    w.message
                        .as_deref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    if st.phase.as_deref() == Some("Running") {
        let ready = st
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        return (!ready).then(|| "running but not Ready".to_string());
    }
    st.phase.clone().map(|p| format!("phase {p}"))
}

// ---------------------------------------------------------------------------------------------
// Nodes and the rollout
// ---------------------------------------------------------------------------------------------

fn no_gpu_nodes(s: &Snapshot) -> Vec<Finding> {
    if !gpu_nodes(s).is_empty() || s.nodes.is_empty() && !s.unreadable.is_empty() {
        return vec![];
    }
    let with_gpu_capacity: Vec<String> = s
        .nodes
        .iter()
        .filter(|n| quantity(n, false, resource::GPU).unwrap_or(0) > 0)
        .map(node_ref)
        .collect();
    let mut evidence = vec![format!(
        "none of the {} nodes carries {}=true (or {}=true set by something other than gpu-pilot)",
        s.nodes.len(),
        label::NFD_PCI_10DE,
        label::GPU_PRESENT
    )];
    if !with_gpu_capacity.is_empty() {
        evidence.push(format!(
            "yet these advertise {} capacity: {}",
            resource::GPU,
            list_some(&with_gpu_capacity, 5)
        ));
    }
    vec![
        Finding::new(
            "no-gpu-nodes",
            Severity::Error,
            "No GPU nodes found: Node Feature Discovery labels are missing",
        )
        .objects(with_gpu_capacity)
        .evidence(evidence)
        .fix(format!(
            "Install Node Feature Discovery, which labels nodes with an NVIDIA PCI device:\n  helm install nfd oci://registry.k8s.io/nfd/charts/node-feature-discovery -n node-feature-discovery --create-namespace\nor label GPU nodes by hand: kubectl label node <node> {}=true",
            label::GPU_PRESENT
        )),
    ]
}

/// Why one GPU node advertises no GPUs, or `None` when it does or is still rolling out normally.
fn why_no_gpus(s: &Snapshot, n: &Node, pods: &[(&Pod, PodFacts)]) -> Option<String> {
    if quantity(n, true, resource::GPU).unwrap_or(0) > 0 || mig_allocatable(n) > 0 {
        return None;
    }
    if node_label(n, label::DEPLOY_OPERANDS) == Some(gate_value::DISABLED) {
        return None;
    }
    if !node_is_ready(n) {
        let (st, reason, _) = ready_condition(n).unwrap_or_default();
        return Some(format!(
            "the node is NotReady (Ready={}{}): its kubelet does not run pods or report devices",
            if st.is_empty() { "Unknown" } else { &st },
            if reason.is_empty() {
                String::new()
            } else {
                format!(", {reason}")
            }
        ));
    }
    let policy = active_policy(s)?;
    if !policy.spec.device_plugin.enabled {
        return Some(
            "devicePlugin.enabled=false in the policy: nothing advertises GPUs to the kubelet"
                .into(),
        );
    }
    let gate_key = label::deploy_gate(Component::DevicePlugin);
    let stage = node_label(n, label::STAGE).and_then(Stage::parse);
    if let Some(reason) = node_annotation(n, annotation::STAGE_REASON) {
        return Some(format!(
            "held at stage {} by: {reason} (see stage-stuck)",
            node_label(n, label::STAGE).unwrap_or("?")
        ));
    }
    match node_label(n, &gate_key) {
        Some(v) if v == gate_value::DISABLED => {
            return Some(format!(
                "{gate_key}=false: the device plugin is turned off on this node"
            ));
        }
        Some(v) if v.starts_with(gate_value::PAUSED_PREFIX) => {
            return Some(format!(
                "{gate_key}={v}: the MIG manager paused the device plugin (see gate-paused)"
            ));
        }
        Some(_) => {}
        None => {
            // Still before the device-plugin stage: a normal rollout, unless a pod fails.
            let failing = pods.iter().find(|(_, f)| {
                f.node == n.name_any() && f.reason.as_deref().is_some_and(is_failure)
            });
            return failing.map(|(p, f)| {
                format!(
                    "held at stage {}: {} pod {} is {}",
                    stage.map(|s| s.as_str()).unwrap_or("?"),
                    f.component.gate_name(),
                    p.name_any(),
                    f.reason.clone().unwrap_or_default()
                )
            });
        }
    }
    let dp = pods
        .iter()
        .find(|(_, f)| f.node == n.name_any() && f.component == Component::DevicePlugin);
    match dp {
        None => Some(format!(
            "no {} pod on the node although {gate_key}=true (DaemonSet {} cannot place it: check taints and its events)",
            Component::DevicePlugin.gate_name(),
            Component::DevicePlugin.daemonset_name()
        )),
        Some((p, f)) if !f.ready => Some(format!(
            "device-plugin pod {} is not ready: {}",
            p.name_any(),
            f.reason.clone().unwrap_or_else(|| "not ready".into())
        )),
        Some((p, _)) => {
            let cap = quantity(n, false, resource::GPU).unwrap_or(0);
            if cap > 0 {
                Some(format!(
                    "all {cap} GPUs are unhealthy (capacity {cap}, allocatable 0): XID errors or a lost GPU; see the logs of {}",
                    p.name_any()
                ))
            } else if policy.spec.mig.strategy == MigStrategy::Mixed {
                Some(format!(
                    "device-plugin pod {} runs, but the node advertises neither {} nor {}* (mig.strategy mixed: is MIG enabled with a layout? see nvidia.com/mig.config)",
                    p.name_any(),
                    resource::GPU,
                    resource::MIG_PREFIX
                ))
            } else {
                Some(format!(
                    "device-plugin pod {} runs, but has not registered {} with the kubelet: see its logs",
                    p.name_any(),
                    resource::GPU
                ))
            }
        }
    }
}

fn gpu_not_allocatable(s: &Snapshot) -> Vec<Finding> {
    let pods = operand_pods(s);
    let mut by_cause: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut lines = Vec::new();
    for n in gpu_nodes(s) {
        if let Some(why) = why_no_gpus(s, n, &pods) {
            if lines.len() < 10 {
                lines.push(format!("{}: {why}", n.name_any()));
            }
            by_cause.entry(why).or_default().push(node_ref(n));
        }
    }
    if by_cause.is_empty() {
        return vec![];
    }
    let total: usize = by_cause.values().map(Vec::len).sum();
    if total > lines.len() {
        lines.push(format!("and {} more nodes", total - lines.len()));
    }
    vec![
        Finding::new(
            "gpu-not-allocatable",
            Severity::Error,
            format!(
                "{} advertise no {}: pods cannot get GPUs there",
                count_phrase(total, "GPU node does", "GPU nodes"),
                resource::GPU
            ),
        )
        .objects(by_cause.values().flatten().cloned())
        .evidence(lines)
        .fix(format!(
            "Fix the cause named for each node (the related finding has the command); kubectl describe node <node> shows its allocatable resources, kubectl {} get pods -o wide --field-selector spec.nodeName=<node> its operand pods.",
            ns_flag(s)
        )),
    ]
}

/// The kind of failure a pod reason is, for grouping and advice.
fn failure_kind(reason: &str) -> &'static str {
    let r = reason.strip_prefix("Init:").unwrap_or(reason);
    match r {
        "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" => "image",
        "CrashLoopBackOff" | "RunContainerError" | "Failed" => "crash",
        "CreateContainerConfigError" | "CreateContainerError" => "config",
        _ if reason.starts_with("Init:") => "init",
        _ => "other",
    }
}

/// The container a failing pod waits on: name, image, reason, message, restarts, last exit.
fn failing_container(p: &Pod) -> Option<(String, String, String, String, i32, Option<String>)> {
    let st = p.status.as_ref()?;
    let statuses = st
        .init_container_statuses
        .iter()
        .flatten()
        .chain(st.container_statuses.iter().flatten());
    let mut running_init = None;
    for cs in statuses {
        let state = cs.state.as_ref();
        if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
            let r = w.reason.clone().unwrap_or_default();
            if r.is_empty() || r == "PodInitializing" {
                continue;
            }
            let last = cs
                .last_state
                .as_ref()
                .and_then(|l| l.terminated.as_ref())
                .map(|t| {
                    format!(
                        "last exit code {}{}",
                        t.exit_code,
                        t.reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    )
                });
            return Some((
                cs.name.clone(),
                cs.image.clone(),
                r,
                w.message.clone().unwrap_or_default(),
                cs.restart_count,
                last,
            ));
        }
        if running_init.is_none()
            && st
                .init_container_statuses
                .iter()
                .flatten()
                .any(|i| i.name == cs.name)
            && state.is_some_and(|s| s.running.is_some())
        {
            running_init = Some((
                cs.name.clone(),
                cs.image.clone(),
                "Init".to_string(),
                "init container still running".to_string(),
                cs.restart_count,
                None,
            ));
        }
    }
    running_init
}

fn stage_stuck(s: &Snapshot) -> Vec<Finding> {
    let nodes: BTreeMap<String, &Node> = s.nodes.iter().map(|n| (n.name_any(), n)).collect();
    // (component, kind) -> pods
    let mut groups: BTreeMap<(Component, &'static str), Vec<(&Pod, PodFacts)>> = BTreeMap::new();
    for (p, f) in operand_pods(s) {
        let Some(reason) = f.reason.clone() else {
            continue;
        };
        let on_gpu_node = nodes
            .get(&f.node)
            .is_some_and(|n| NodeFacts::from_node(n).is_gpu_node());
        let failing = is_failure(&reason) || reason.starts_with("Init:");
        if !on_gpu_node || !failing {
            continue;
        }
        // A pod in init is only stuck when the controller says the node is held.
        if !is_failure(&reason)
            && nodes
                .get(&f.node)
                .and_then(|n| node_annotation(n, annotation::STAGE_REASON))
                .is_none()
            && pod_age(s, p).is_none_or(|a| a < INIT_STUCK_SECONDS)
        {
            continue;
        }
        groups
            .entry((f.component, failure_kind(&reason)))
            .or_default()
            .push((p, f));
    }
    let mut out = Vec::new();
    let mut covered: BTreeSet<String> = BTreeSet::new();
    for ((component, kind), pods) in &groups {
        let node_names: Vec<String> = pods.iter().map(|(_, f)| f.node.clone()).collect();
        covered.extend(node_names.iter().cloned());
        let stages: BTreeSet<&str> = node_names
            .iter()
            .filter_map(|n| nodes.get(n).and_then(|n| node_label(n, label::STAGE)))
            .collect();
        let stage = stages.into_iter().collect::<Vec<_>>().join("/");
        let reason = pods[0].1.reason.clone().unwrap_or_default();
        let mut evidence = Vec::new();
        let mut first_pod = String::new();
        let mut first_container = String::new();
        for (p, f) in pods.iter().take(3) {
            let Some((container, image, r, msg, restarts, last)) = failing_container(p) else {
                evidence.push(format!(
                    "pod {} on {}: {}",
                    p.name_any(),
                    f.node,
                    f.reason.clone().unwrap_or_default()
                ));
                continue;
            };
            if first_pod.is_empty() {
                first_pod = p.name_any();
                first_container = container.clone();
            }
            let mut line = format!(
                "pod {} on {}: container {container} {r}",
                p.name_any(),
                f.node
            );
            if *kind == "image" {
                line.push_str(&format!(", image {image}"));
            }
            if restarts > 0 {
                line.push_str(&format!(", {restarts} restarts"));
            }
            if let Some(l) = last {
                line.push_str(&format!(", {l}"));
            }
            if !msg.is_empty() {
                line.push_str(&format!(": {msg}"));
            }
            evidence.push(line);
            if let Some(log) = s.logs.get(&format!("{}/{container}", p.name_any())) {
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                if !tail.is_empty() {
                    evidence.push(format!(
                        "last log lines of {}/{container}:\n{}",
                        p.name_any(),
                        tail.into_iter()
                            .rev()
                            .map(|l| format!("  | {l}"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    ));
                }
            }
        }
        if pods.len() > 3 {
            evidence.push(format!(
                "and {} more pods failing the same way",
                pods.len() - 3
            ));
        }
        let field = component.spec_field();
        let pn = policy_name(s);
        let nsf = ns_flag(s);
        let fix = match *kind {
            "image" => format!(
                "Check the image reference and registry access: kubectl {nsf} describe pod {first_pod}. Correct spec.{field}.repository/image/version (kubectl edit clusterpolicy {pn}), or give a pull secret in spec.{field}.imagePullSecrets; the pods retry by themselves."
            ),
            "crash" => format!(
                "Read why it exits: kubectl {nsf} logs {first_pod} -c {first_container} --previous. Fix the cause on the node, or spec.{field} in the policy (kubectl edit clusterpolicy {pn})."
            ),
            "init" => format!(
                "The init container {first_container} has not finished: kubectl {nsf} logs {first_pod} -c {first_container}. The validator's init containers wait for the toolkit and driver on the node: check those pods there."
            ),
            "config" => format!(
                "The container cannot be created: kubectl {nsf} describe pod {first_pod} (a missing ConfigMap, Secret or volume in spec.{field}?)"
            ),
            _ => format!("kubectl {nsf} describe pod {first_pod}"),
        };
        out.push(
            Finding::new(
                "stage-stuck",
                Severity::Error,
                if stage == Stage::Ready.as_str() {
                    format!(
                        "{} pod {reason} on {}",
                        component.gate_name(),
                        count_phrase(node_names.len(), "ready GPU node", "ready GPU nodes"),
                    )
                } else {
                    format!(
                        "{} held at stage {}: {} pod {reason}",
                        count_phrase(node_names.len(), "GPU node", "GPU nodes"),
                        if stage.is_empty() { "?" } else { &stage },
                        component.gate_name(),
                    )
                },
            )
            .objects(node_names.iter().map(|n| format!("Node/{n}")))
            .evidence(evidence)
            .fix(fix),
        );
    }
    // Nodes the controller says are held, whose failing pod is gone or not visible here.
    let other: Vec<&Node> = gpu_nodes(s)
        .into_iter()
        .filter(|n| node_annotation(n, annotation::STAGE_REASON).is_some())
        .filter(|n| !covered.contains(&n.name_any()))
        .collect();
    if !other.is_empty() {
        out.push(
            Finding::new(
                "stage-stuck",
                Severity::Error,
                format!(
                    "{} held in a stage by the controller",
                    count_phrase(other.len(), "GPU node", "GPU nodes")
                ),
            )
            .objects(other.iter().map(|n| node_ref(n)))
            .evidence(other.iter().take(5).map(|n| {
                format!(
                    "{} at stage {}: {}",
                    n.name_any(),
                    node_label(n, label::STAGE).unwrap_or("?"),
                    node_annotation(n, annotation::STAGE_REASON).unwrap_or_default()
                )
            }))
            .fix(format!(
                "kubectl {} get pods -o wide --field-selector spec.nodeName=<node> shows the operand pods of a node; kubectl describe clusterpolicy {} its Error condition",
                ns_flag(s),
                policy_name(s)
            )),
        );
    }
    out
}

/// An operand pod still in its init containers after this long counts as stuck.
pub const INIT_STUCK_SECONDS: i64 = 60;

fn pod_age(s: &Snapshot, p: &Pod) -> Option<i64> {
    age_seconds(s, p.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

fn rollout_in_progress(s: &Snapshot) -> Vec<Finding> {
    if active_policy(s).is_none() {
        return vec![];
    }
    let failing: BTreeSet<String> = operand_pods(s)
        .into_iter()
        .filter(|(_, f)| f.reason.as_deref().is_some_and(is_failure))
        .map(|(_, f)| f.node)
        .collect();
    let mut by_stage: BTreeMap<Stage, Vec<String>> = BTreeMap::new();
    for n in managed_gpu_nodes(s) {
        if node_annotation(n, annotation::STAGE_REASON).is_some() || failing.contains(&n.name_any())
        {
            continue;
        }
        match node_label(n, label::STAGE).and_then(Stage::parse) {
            Some(Stage::Ready) => {}
            Some(st) => by_stage.entry(st).or_default().push(node_ref(n)),
            None => by_stage
                .entry(Stage::Toolkit)
                .or_default()
                .push(node_ref(n)),
        }
    }
    let total: usize = by_stage.values().map(Vec::len).sum();
    if total == 0 {
        return vec![];
    }
    vec![
        Finding::new(
            "rollout-in-progress",
            Severity::Info,
            format!(
                "{} still moving through the stages",
                count_phrase(total, "GPU node is", "GPU nodes are")
            ),
        )
        .objects(by_stage.values().flatten().cloned())
        .evidence(
            by_stage
                .iter()
                .map(|(st, ns)| format!("{} at stage {st}", ns.len())),
        )
        .fix("Nothing to do; run kubectl gpu status to follow it, or doctor again if a node stays in one stage."),
    ]
}

fn daemonset_unavailable(s: &Snapshot) -> Vec<Finding> {
    let Some(policy) = active_policy(s) else {
        return vec![];
    };
    if policy.status.as_ref().and_then(|st| st.state) == Some(PolicyState::Ignored) {
        return vec![];
    }
    let mut out = Vec::new();
    let missing: Vec<Component> = Component::ALL
        .into_iter()
        .filter(|c| policy.spec.operand(*c).enabled())
        .filter(|c| {
            !s.daemonsets
                .iter()
                .any(|d| d.name_any() == c.daemonset_name())
        })
        .collect();
    // Only GPU nodes that want the operand: without any there is nothing to deploy yet.
    if !missing.is_empty() && !managed_gpu_nodes(s).is_empty() && policy.status.is_some() {
        out.push(
            Finding::new(
                "operand-daemonset-unavailable",
                Severity::Error,
                format!(
                    "{} of the enabled operands missing in {}",
                    count_phrase(missing.len(), "DaemonSet", "DaemonSets"),
                    s.namespace
                ),
            )
            .objects(
                missing
                    .iter()
                    .map(|c| format!("DaemonSet/{}/{}", s.namespace, c.daemonset_name())),
            )
            .evidence([format!(
                "the policy {} enables {}, but no DaemonSet of that name exists",
                policy.name_any(),
                missing
                    .iter()
                    .map(|c| c.spec_field())
                    .collect::<Vec<_>>()
                    .join(", ")
            )])
            .fix(format!(
                "The controller creates them: check it is running (kubectl {} logs deploy/{CONTROLLER}) and that this is its namespace.",
                ns_flag(s)
            )),
        );
    }
    let mut short = Vec::new();
    let mut lines = Vec::new();
    for ds in &s.daemonsets {
        let Some(st) = &ds.status else { continue };
        let is_operand = Component::ALL
            .iter()
            .any(|c| c.daemonset_name() == ds.name_any());
        if !is_operand || st.desired_number_scheduled == 0 {
            continue;
        }
        if st.number_ready < st.desired_number_scheduled {
            short.push(format!("DaemonSet/{}/{}", s.namespace, ds.name_any()));
            lines.push(format!(
                "{}: {} of {} pods ready{}",
                ds.name_any(),
                st.number_ready,
                st.desired_number_scheduled,
                st.number_unavailable
                    .filter(|u| *u > 0)
                    .map(|u| format!(", {u} unavailable"))
                    .unwrap_or_default()
            ));
        }
    }
    if !short.is_empty() {
        // While nodes still move through the stages, new pods are expected to be starting;
        // failing pods are reported by stage-stuck either way.
        let rolling = !rollout_in_progress(s).is_empty();
        out.push(
            Finding::new(
                "operand-daemonset-unavailable",
                if rolling {
                    Severity::Info
                } else {
                    Severity::Warning
                },
                format!(
                    "{} without a ready pod on every node they want{}",
                    count_phrase(short.len(), "operand DaemonSet", "operand DaemonSets"),
                    if rolling {
                        " (the rollout is in progress)"
                    } else {
                        ""
                    }
                ),
            )
            .objects(short)
            .evidence(lines)
            .fix(format!(
                "kubectl {} get pods -o wide | grep -v Running shows the pods that are not running; stage-stuck, if reported, names why.",
                ns_flag(s)
            )),
        );
    }
    out
}

fn runtime_class_missing(s: &Snapshot) -> Vec<Finding> {
    let Some(p) = active_policy(s) else {
        return vec![];
    };
    let rc = &p.spec.operator.runtime_class;
    if s.runtime_classes.iter().any(|r| r == rc)
        || s.runtime_classes.is_empty() && !s.unreadable.is_empty()
    {
        return vec![];
    }
    vec![
        Finding::new(
            "runtimeclass-missing",
            Severity::Error,
            format!("The RuntimeClass {rc} that GPU pods use is missing"),
        )
        .objects([format!("RuntimeClass/{rc}")])
        .evidence([format!(
            "spec.operator.runtimeClass of {} is {rc}; RuntimeClasses in the cluster: {}",
            p.name_any(),
            if s.runtime_classes.is_empty() {
                "none".to_string()
            } else {
                s.runtime_classes.join(", ")
            }
        ), format!("pods with runtimeClassName: {rc} (the webhook sets it) are rejected until it exists")])
        .fix(format!(
            "The controller recreates it when it runs: kubectl {} rollout restart deploy/{CONTROLLER}. By hand: kubectl apply -f - <<<'{{\"apiVersion\": \"node.k8s.io/v1\", \"kind\": \"RuntimeClass\", \"metadata\": {{\"name\": \"{rc}\"}}, \"handler\": \"{rc}\"}}'",
            ns_flag(s)
        )),
    ]
}

// ---------------------------------------------------------------------------------------------
// Webhook
// ---------------------------------------------------------------------------------------------

fn webhook_not_installed(s: &Snapshot) -> Vec<Finding> {
    match (&s.mutating, &s.validating) {
        (None, None) => {
            if s.unreadable
                .iter()
                .any(|u| u.contains("WebhookConfiguration"))
            {
                return vec![];
            }
            vec![
                Finding::new(
                    "webhook-not-installed",
                    Severity::Info,
                    "The gpu-pilot admission webhook is not installed",
                )
                .evidence([format!(
                    "no MutatingWebhookConfiguration or ValidatingWebhookConfiguration named {}",
                    webhook::NAME
                ), "GPU pods do not get the runtime class, GPU toleration or MIG resource set for them; ClusterPolicy changes are not checked against other objects".to_string()])
                .fix(format!("kubectl gpu install {} --set webhook.enabled=true", ns_flag(s))),
            ]
        }
        (Some(_), Some(_)) => vec![],
        (m, _) => {
            let (have, lack) = if m.is_some() {
                ("Mutating", "Validating")
            } else {
                ("Validating", "Mutating")
            };
            vec![
                Finding::new(
                    "webhook-not-installed",
                    Severity::Warning,
                    format!("Only half of the webhook is registered: the {lack}WebhookConfiguration is missing"),
                )
                .objects([format!("{lack}WebhookConfiguration/{}", webhook::NAME)])
                .evidence([format!("{have}WebhookConfiguration/{} exists", webhook::NAME)])
                .fix(format!("kubectl gpu install {} registers both again", ns_flag(s))),
            ]
        }
    }
}

fn webhook_unreachable(s: &Snapshot) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut seen_service: BTreeSet<(String, String)> = BTreeSet::new();
    let mut seen_url: BTreeSet<String> = BTreeSet::new();
    for (kind, hook, cc) in s.webhook_client_configs() {
        if let Some(svc) = &cc.service {
            if !seen_service.insert((svc.namespace.clone(), svc.name.clone())) {
                continue;
            }
            if svc.namespace != s.namespace {
                continue; // another namespace: not in the snapshot (namespace-mismatch may say why)
            }
            let service = s.services.iter().find(|x| x.name_any() == svc.name);
            let ready: usize = s
                .endpoint_slices
                .iter()
                .filter(|e| {
                    e.labels()
                        .get("kubernetes.io/service-name")
                        .map(String::as_str)
                        == Some(svc.name.as_str())
                })
                .flat_map(|e| e.endpoints.iter().flatten())
                .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .count();
            let mut evidence = Vec::new();
            let broken = if service.is_none() {
                evidence.push(format!(
                    "{kind}/{} ({hook}) calls Service {}/{}, which does not exist",
                    webhook::NAME,
                    svc.namespace,
                    svc.name
                ));
                true
            } else if ready == 0 {
                evidence.push(format!(
                    "Service {}/{} has no ready endpoints",
                    svc.namespace, svc.name
                ));
                true
            } else {
                false
            };
            if !broken {
                continue;
            }
            if let Some(d) = s.deployments.iter().find(|d| d.name_any() == svc.name) {
                let want = d.spec.replicas.unwrap_or(1);
                let avail = d
                    .status
                    .as_ref()
                    .and_then(|st| st.available_replicas)
                    .unwrap_or(0);
                evidence.push(format!(
                    "Deployment {}/{}: {avail} of {want} replicas available",
                    svc.namespace, svc.name
                ));
            }
            for p in s
                .pods
                .iter()
                .filter(|p| {
                    p.labels().get(label::NAME).map(String::as_str) == Some(svc.name.as_str())
                })
                .take(3)
            {
                if let Some(r) = p.status.as_ref().and_then(pod_problem) {
                    evidence.push(format!("Pod {}: {r}", p.name_any()));
                }
            }
            out.push(
                Finding::new(
                    "webhook-unreachable",
                    Severity::Error,
                    "The admission webhook does not answer: GPU pods and ClusterPolicy changes are refused (failurePolicy Fail)",
                )
                .objects([
                    format!("Service/{}/{}", svc.namespace, svc.name),
                    format!("Deployment/{}/{}", svc.namespace, svc.name),
                ])
                .evidence(evidence)
                .fix(format!(
                    "kubectl -n {ns} get pods -l {}={}; kubectl -n {ns} logs deploy/{}. To unblock GPU pods meanwhile: kubectl delete mutatingwebhookconfiguration {}",
                    label::NAME,
                    svc.name,
                    svc.name,
                    webhook::NAME,
                    ns = svc.namespace
                )),
            );
        }
        if let Some(url) = &cc.url {
            if !seen_url.insert(url.clone()) {
                continue;
            }
            if let Some(Err(why)) = s.url_probes.get(url) {
                out.push(
                    Finding::new(
                        "webhook-unreachable",
                        Severity::Error,
                        format!("The admission webhook at {url} does not answer TLS"),
                    )
                    .objects([format!("{kind}/{}", webhook::NAME)])
                    .evidence([format!("{hook} calls {url}: {why}")])
                    .fix(format!(
                        "Start the webhook at that address, or point the configuration at the in-cluster Service: kubectl gpu install {} (webhook.url empty). To unblock requests meanwhile: kubectl delete {} {}",
                        ns_flag(s),
                        kind.to_lowercase(),
                        webhook::NAME
                    )),
                );
            }
        }
    }
    out
}

fn webhook_ca_bundle(s: &Snapshot) -> Vec<Finding> {
    let mut empty = Vec::new();
    for (kind, hook, cc) in s.webhook_client_configs() {
        // A URL target may use a publicly trusted certificate, which needs no caBundle.
        if cc.url.is_some() {
            continue;
        }
        if cc.ca_bundle.as_ref().is_none_or(|b| b.0.is_empty()) {
            empty.push((kind, hook));
        }
    }
    if empty.is_empty() {
        return vec![];
    }
    let cert_manager = [
        s.mutating.as_ref().map(|m| m.annotations()),
        s.validating.as_ref().map(|v| v.annotations()),
    ]
    .into_iter()
    .flatten()
    .any(|a| a.contains_key(webhook::CERT_MANAGER_INJECT_CA_FROM));
    let fix = if cert_manager {
        format!(
            "cert-manager's CA injector fills it in ({}): check that cert-manager runs and the Certificate {}/{} is Ready (kubectl -n {} get certificate)",
            webhook::CERT_MANAGER_INJECT_CA_FROM,
            s.namespace,
            webhook::NAME,
            s.namespace
        )
    } else {
        format!(
            "The webhook fills it in from its CA at start: kubectl {} rollout restart deploy/{} and check its logs",
            ns_flag(s),
            webhook::NAME
        )
    };
    let kinds: BTreeSet<&str> = empty.iter().map(|(k, _)| *k).collect();
    vec![
        Finding::new(
            "webhook-ca-bundle-empty",
            Severity::Error,
            "Webhook configurations without a caBundle: the apiserver cannot trust the webhook, calls fail",
        )
        .objects(kinds.iter().map(|k| format!("{k}/{}", webhook::NAME)))
        .evidence(
            empty
                .iter()
                .map(|(k, h)| format!("{k}/{}: webhook {h} has an empty clientConfig.caBundle", webhook::NAME)),
        )
        .fix(fix),
    ]
}

fn webhook_cert(s: &Snapshot) -> Vec<Finding> {
    let Some(meta) = &s.tls_secret else {
        return vec![];
    };
    let Some(now) = s.now else {
        return vec![];
    };
    let ann = meta.annotations.clone().unwrap_or_default();
    let mut out = Vec::new();
    for (key, what) in [
        (webhook::CERT_NOT_AFTER, "serving certificate"),
        (webhook::CA_NOT_AFTER, "CA certificate"),
    ] {
        let Some(v) = ann.get(key) else { continue };
        let Ok(t) = v.parse::<Timestamp>() else {
            out.push(
                Finding::new(
                    "webhook-cert-expiring",
                    Severity::Warning,
                    format!("The webhook's {what} expiry cannot be read"),
                )
                .objects([format!("Secret/{}/{}", s.namespace, webhook::TLS_SECRET)])
                .evidence([format!("annotation {key}={v:?} is no RFC 3339 time")])
                .fix(format!(
                    "Delete the Secret so the webhook issues a new one: kubectl {} delete secret {}",
                    ns_flag(s),
                    webhook::TLS_SECRET
                )),
            );
            continue;
        };
        let days = (t.as_second() - now.as_second()) as f64 / 86400.0;
        if days >= 30.0 {
            continue;
        }
        let (sev, title) = if days <= 0.0 {
            (
                Severity::Error,
                format!("The webhook's {what} expired on {v}: the apiserver refuses its TLS"),
            )
        } else {
            (
                Severity::Warning,
                format!("The webhook's {what} expires in {days:.0} days ({v})"),
            )
        };
        out.push(
            Finding::new("webhook-cert-expiring", sev, title)
                .objects([format!("Secret/{}/{}", s.namespace, webhook::TLS_SECRET)])
                .evidence([
                    format!("annotation {key}={v}"),
                    "the webhook renews its certificate 30 days before expiry, so it has not run lately".to_string(),
                ])
                .fix(format!(
                    "Make sure the webhook runs (kubectl {} get deploy {}); it renews at start. With cert-manager, check the Certificate's status.",
                    ns_flag(s),
                    webhook::NAME
                )),
        );
    }
    out
}

fn webhook_ignore(s: &Snapshot) -> Vec<Finding> {
    let mut hooks = Vec::new();
    if let Some(m) = &s.mutating {
        // The pod UPDATE entry and the policy CREATE entry are `Ignore` by design.
        for w in m.webhooks.iter().flatten().filter(|w| {
            !gpu_pilot_core::render::webhook::IGNORE_BY_DESIGN.contains(&w.name.as_str())
        }) {
            if w.failure_policy.as_deref() == Some("Ignore") {
                hooks.push(format!(
                    "MutatingWebhookConfiguration/{} ({})",
                    webhook::NAME,
                    w.name
                ));
            }
        }
    }
    if let Some(v) = &s.validating {
        for w in v.webhooks.iter().flatten().filter(|w| {
            !gpu_pilot_core::render::webhook::IGNORE_BY_DESIGN.contains(&w.name.as_str())
        }) {
            if w.failure_policy.as_deref() == Some("Ignore") {
                hooks.push(format!(
                    "ValidatingWebhookConfiguration/{} ({})",
                    webhook::NAME,
                    w.name
                ));
            }
        }
    }
    if hooks.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "webhook-failure-policy-ignore",
            Severity::Info,
            "Webhooks with failurePolicy Ignore: while the webhook is down, GPU pods start without their runtime class and policy changes go unchecked",
        )
        .objects(hooks.clone())
        .evidence(hooks.iter().map(|h| format!("{h}: failurePolicy Ignore")))
        .fix(format!("If that was not meant: kubectl gpu install {} --set webhook.failurePolicy=Fail", ns_flag(s))),
    ]
}

// ---------------------------------------------------------------------------------------------
// MIG and gates
// ---------------------------------------------------------------------------------------------

fn mig_failed(s: &Snapshot) -> Vec<Finding> {
    let failed: Vec<&Node> = s
        .nodes
        .iter()
        .filter(|n| node_label(n, label::MIG_CONFIG_STATE) == Some(mig_config_state::FAILED))
        .collect();
    if failed.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "mig-config-failed",
            Severity::Error,
            format!(
                "MIG layout change failed on {}",
                count_phrase(failed.len(), "node", "nodes")
            ),
        )
        .objects(failed.iter().map(|n| node_ref(n)))
        .evidence(failed.iter().take(5).map(|n| {
            format!(
                "{}: {}={} asked, {}={}",
                n.name_any(),
                label::MIG_CONFIG,
                node_label(n, label::MIG_CONFIG).unwrap_or("(none)"),
                label::MIG_CONFIG_STATE,
                mig_config_state::FAILED
            )
        }))
        .fix(format!(
            "Read why: kubectl {} logs -l {}={} --field-selector spec.nodeName=<node> (a profile the GPU lacks?). Then ask for a layout it supports: kubectl label node <node> {}=all-disabled --overwrite",
            ns_flag(s),
            label::COMPONENT,
            Component::MigManager.gate_name(),
            label::MIG_CONFIG
        )),
    ]
}

/// When the MIG state label was last written, from the node's managedFields.
fn mig_state_written(n: &Node) -> Option<Timestamp> {
    let needle = format!("f:{}", label::MIG_CONFIG_STATE);
    n.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains(&needle))
        })
        .filter_map(|m| m.time.as_ref().map(|t| t.0))
        .max()
}

/// How long a MIG change may stay pending before it is a warning.
const MIG_PENDING_WARN_SECONDS: i64 = 15 * 60;

fn mig_pending(s: &Snapshot) -> Vec<Finding> {
    let mut long = Vec::new();
    let mut recent = Vec::new();
    for n in &s.nodes {
        let state = node_label(n, label::MIG_CONFIG_STATE);
        if state != Some(mig_config_state::PENDING) && state != Some(mig_config_state::REBOOTING) {
            continue;
        }
        let age = age_seconds(s, mig_state_written(n));
        let line = format!(
            "{}: {} toward {}={}{}",
            n.name_any(),
            state.unwrap_or_default(),
            label::MIG_CONFIG,
            node_label(n, label::MIG_CONFIG).unwrap_or("(none)"),
            age.map(|a| format!(", for {} min", a / 60))
                .unwrap_or_default()
        );
        if age.is_some_and(|a| a > MIG_PENDING_WARN_SECONDS) {
            long.push((n, line));
        } else {
            recent.push((n, line));
        }
    }
    let mut out = Vec::new();
    if !long.is_empty() {
        out.push(
            Finding::new(
                "mig-config-pending",
                Severity::Warning,
                format!(
                    "MIG layout change pending for more than 15 minutes on {}",
                    count_phrase(long.len(), "node", "nodes")
                ),
            )
            .objects(long.iter().map(|(n, _)| node_ref(n)))
            .evidence(long.iter().take(5).map(|(_, l)| l.clone()))
            .fix(format!(
                "Is the MIG manager running there? kubectl {} get pods -l {}={} -o wide; its logs say what it waits for (GPU pods still running on the GPUs?)",
                ns_flag(s),
                label::COMPONENT,
                Component::MigManager.gate_name()
            )),
        );
    }
    if !recent.is_empty() {
        out.push(
            Finding::new(
                "mig-config-pending",
                Severity::Info,
                format!(
                    "MIG layout change in progress on {}",
                    count_phrase(recent.len(), "node", "nodes")
                ),
            )
            .objects(recent.iter().map(|(n, _)| node_ref(n)))
            .evidence(recent.iter().take(5).map(|(_, l)| l.clone()))
            .fix("Nothing to do yet: GPU workloads on these nodes are paused until it finishes."),
        );
    }
    out
}

fn gate_paused(s: &Snapshot) -> Vec<Finding> {
    let mut nodes = Vec::new();
    let mut lines = Vec::new();
    for n in &s.nodes {
        let state = node_label(n, label::MIG_CONFIG_STATE);
        // During a MIG change paused gates are expected (mig-config-pending reports it).
        if state == Some(mig_config_state::PENDING) || state == Some(mig_config_state::REBOOTING) {
            continue;
        }
        let paused: Vec<String> = n
            .labels()
            .iter()
            .filter(|(k, v)| {
                k.starts_with(label::DEPLOY_PREFIX) && v.starts_with(gate_value::PAUSED_PREFIX)
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if paused.is_empty() {
            continue;
        }
        if lines.len() < 5 {
            lines.push(format!("{}: {}", n.name_any(), paused.join(", ")));
        }
        nodes.push(node_ref(n));
    }
    if nodes.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "gate-paused",
            Severity::Warning,
            format!(
                "Deploy gates left paused on {} with no MIG change in progress: their operands stay off",
                count_phrase(nodes.len(), "node", "nodes")
            ),
        )
        .objects(nodes)
        .evidence(lines)
        .fix(format!(
            "A MIG manager that stopped mid-change leaves them; restarting it restores them (kubectl {} delete pod -l {}={} --field-selector spec.nodeName=<node>). By hand: kubectl label node <node> {}=true --overwrite",
            ns_flag(s),
            label::COMPONENT,
            Component::MigManager.gate_name(),
            label::deploy_gate(Component::DevicePlugin)
        )),
    ]
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

/// GPU resources a pod asks for: name -> count (requests, or limits where no request is given).
fn gpu_requests(p: &Pod) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let Some(spec) = &p.spec else { return out };
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let Some(r) = &c.resources else { continue };
        for map in [r.limits.as_ref(), r.requests.as_ref()]
            .into_iter()
            .flatten()
        {
            for (k, q) in map {
                if resource::is_gpu_resource(k) {
                    let v = parse_count(&q.0);
                    let e = out.entry(k.clone()).or_insert(0);
                    *e = (*e).max(v);
                }
            }
        }
    }
    out
}

fn tolerates(tols: &[Toleration], t: &Taint) -> bool {
    tols.iter().any(|tol| {
        let op = tol.operator.as_deref().unwrap_or("Equal");
        let key_ok = match tol.key.as_deref() {
            None | Some("") => op == "Exists",
            Some(k) => k == t.key,
        };
        let value_ok = op == "Exists"
            || tol.value.as_deref().unwrap_or("") == t.value.as_deref().unwrap_or("");
        let effect_ok = tol
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == t.effect);
        key_ok && value_ok && effect_ok
    })
}

fn pending_gpu_pods(s: &Snapshot) -> Vec<Finding> {
    type Asked<'a> = Vec<(&'a Pod, BTreeMap<String, i64>)>;
    let mut groups: BTreeMap<String, Asked> = BTreeMap::new();
    for p in &s.pending_pods {
        let req = gpu_requests(p);
        if req.is_empty() || p.spec.as_ref().is_some_and(|sp| sp.node_name.is_some()) {
            continue;
        }
        let cond = p
            .status
            .as_ref()
            .and_then(|st| st.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"));
        let message = match cond {
            Some(c) if c.status == "False" => c
                .message
                .clone()
                .unwrap_or_else(|| c.reason.clone().unwrap_or_default()),
            _ => {
                if pod_age(s, p).is_some_and(|a| a > 60) {
                    "not seen by the scheduler yet (is kube-scheduler running?)".to_string()
                } else {
                    continue;
                }
            }
        };
        groups.entry(message).or_default().push((p, req));
    }
    let total_gpu: i64 = s
        .nodes
        .iter()
        .map(|n| quantity(n, true, resource::GPU).unwrap_or(0))
        .sum();
    let biggest: Option<(&Node, i64)> = s
        .nodes
        .iter()
        .map(|n| (n, quantity(n, true, resource::GPU).unwrap_or(0)))
        .max_by_key(|(_, q)| *q);
    let mig_only = total_gpu == 0 && s.nodes.iter().any(|n| mig_allocatable(n) > 0);
    let mut out = Vec::new();
    for (message, pods) in groups {
        let (p, req) = &pods[0];
        let asked: Vec<String> = req.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let mut evidence = vec![
            format!("scheduler: {message}"),
            format!(
                "pod {}/{} asks for {}",
                p.namespace().unwrap_or_default(),
                p.name_any(),
                asked.join(", ")
            ),
        ];
        let mut fixes: Vec<String> = Vec::new();
        if message.contains(&format!("Insufficient {}", resource::GPU)) {
            let per_pod = req.get(resource::GPU).copied().unwrap_or(0);
            evidence.push(format!(
                "the cluster has {total_gpu} {} allocatable in all; the largest node, {}, has {}",
                resource::GPU,
                biggest.map(|(n, _)| n.name_any()).unwrap_or_default(),
                biggest.map(|(_, q)| q).unwrap_or(0)
            ));
            fixes.push(if per_pod > biggest.map(|(_, q)| q).unwrap_or(0) {
                format!(
                    "No node has {per_pod} GPUs: lower the pod's {} request to at most {}, or add bigger GPU nodes",
                    resource::GPU,
                    biggest.map(|(_, q)| q).unwrap_or(0)
                )
            } else {
                "The GPUs are taken: wait for other GPU pods to finish, free some (kubectl get pods -A -o wide), or add GPU nodes".to_string()
            });
        }
        if mig_only && req.contains_key(resource::GPU) {
            evidence.push(format!(
                "no node offers {} but some offer {}* (mig.strategy mixed)",
                resource::GPU,
                resource::MIG_PREFIX
            ));
            fixes.push(format!(
                "Ask for a MIG device instead: resources {}<profile> (e.g. {}), or the annotation {}: <profile>",
                resource::MIG_PREFIX,
                resource::mig("1g.10gb"),
                annotation::MIG_PROFILE
            ));
        }
        if message.contains("untolerated taint") {
            let gpu_taints: BTreeSet<String> = gpu_nodes(s)
                .iter()
                .flat_map(|n| n.spec.iter().flat_map(|sp| sp.taints.iter().flatten()))
                .map(|t| {
                    format!(
                        "{}={}:{}",
                        t.key,
                        t.value.clone().unwrap_or_default(),
                        t.effect
                    )
                })
                .collect();
            if !gpu_taints.is_empty() {
                evidence.push(format!(
                    "GPU nodes carry taints: {}",
                    gpu_taints.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            fixes.push(format!(
                "Add a toleration for the GPU nodes' taints to the pod (the webhook adds {}:NoSchedule to GPU pods when it is installed)",
                gpu_pilot_api::names::GPU_TAINT_KEY
            ));
        }
        if message.contains("node affinity/selector") || message.contains("node selector") {
            if let Some(sel) = p.spec.as_ref().and_then(|sp| sp.node_selector.as_ref()) {
                let matching = s
                    .nodes
                    .iter()
                    .filter(|n| {
                        sel.iter()
                            .all(|(k, v)| node_label(n, k) == Some(v.as_str()))
                    })
                    .count();
                evidence.push(format!(
                    "its nodeSelector {} matches {matching} node(s)",
                    sel.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
            fixes.push("Correct the pod's nodeSelector/affinity to labels GPU nodes carry (kubectl get nodes --show-labels), e.g. nvidia.com/gpu.product".to_string());
        }
        out.push(
            Finding::new(
                "pending-gpu-pods",
                Severity::Warning,
                format!(
                    "{} asking for GPUs cannot be scheduled",
                    count_phrase(pods.len(), "pod", "pods")
                ),
            )
            .objects(pods.iter().map(|(p, _)| pod_ref(p)))
            .evidence(evidence)
            .fix(if fixes.is_empty() {
                format!(
                    "kubectl -n {} describe pod {} shows the scheduler's events",
                    p.namespace().unwrap_or_default(),
                    p.name_any()
                )
            } else {
                fixes.join("\n")
            }),
        );
    }
    out
}

/// The driver version a node reports through GFD's labels.
fn driver_version(n: &Node) -> Option<String> {
    if let Some(v) = node_label(n, label::CUDA_DRIVER_FULL) {
        return Some(v.to_string());
    }
    let major =
        node_label(n, label::GPU_DRIVER_MAJOR).or(node_label(n, label::CUDA_DRIVER_MAJOR_OLD))?;
    let minor =
        node_label(n, label::GPU_DRIVER_MINOR).or(node_label(n, label::CUDA_DRIVER_MINOR_OLD));
    let rev = node_label(n, label::GPU_DRIVER_REV).or(node_label(n, label::CUDA_DRIVER_REV_OLD));
    Some(
        [Some(major), minor, rev]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("."),
    )
}

fn driver_skew(s: &Snapshot) -> Vec<Finding> {
    let mut by_version: BTreeMap<String, Vec<&Node>> = BTreeMap::new();
    for n in gpu_nodes(s) {
        if let Some(v) = driver_version(n) {
            by_version.entry(v).or_default().push(n);
        }
    }
    if by_version.len() < 2 {
        return vec![];
    }
    let majority = by_version
        .iter()
        .max_by_key(|(v, ns)| (ns.len(), (*v).clone()))
        .map(|(v, _)| v.clone())
        .unwrap_or_default();
    let odd: Vec<String> = by_version
        .iter()
        .filter(|(v, _)| **v != majority)
        .flat_map(|(_, ns)| ns.iter().map(|n| node_ref(n)))
        .collect();
    let policy_driver = active_policy(s).map(|p| &p.spec.driver);
    let fix = match policy_driver {
        Some(d) if d.enabled => format!(
            "The driver DaemonSet is OnDelete: a node gets the policy's driver ({}) when its driver pod is deleted. Drain each odd node, then kubectl {} delete pod -l {}={} --field-selector spec.nodeName=<node>",
            d.version,
            ns_flag(s),
            label::COMPONENT,
            Component::Driver.gate_name()
        ),
        _ => "The driver is installed on the hosts (driver.enabled=false): upgrade the host driver on the odd nodes to the same version".to_string(),
    };
    vec![
        Finding::new(
            "driver-version-skew",
            Severity::Warning,
            format!(
                "GPU nodes run {} different driver versions",
                by_version.len()
            ),
        )
        .objects(odd)
        .evidence(by_version.iter().map(|(v, ns)| {
            let names: Vec<String> = ns.iter().map(|n| n.name_any()).collect();
            format!(
                "{v}: {} ({})",
                count_phrase(ns.len(), "node", "nodes"),
                list_some(&names, 3)
            )
        }))
        .fix(fix),
    ]
}

fn node_not_ready(s: &Snapshot) -> Vec<Finding> {
    let bad: Vec<&Node> = gpu_nodes(s)
        .into_iter()
        .filter(|n| !node_is_ready(n))
        .collect();
    if bad.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "gpu-node-not-ready",
            Severity::Error,
            format!("{} NotReady", count_phrase(bad.len(), "GPU node is", "GPU nodes are")),
        )
        .objects(bad.iter().map(|n| node_ref(n)))
        .evidence(bad.iter().take(5).map(|n| {
            let (st, reason, msg) = ready_condition(n).unwrap_or_default();
            format!(
                "{}: Ready={} {reason} {msg}",
                n.name_any(),
                if st.is_empty() { "Unknown" } else { &st }
            )
            .trim_end()
            .to_string()
        }))
        .fix("kubectl describe node <node>; on the node: systemctl status kubelet containerd, journalctl -u kubelet"),
    ]
}

fn node_cordoned(s: &Snapshot) -> Vec<Finding> {
    let bad: Vec<&Node> = gpu_nodes(s)
        .into_iter()
        .filter(|n| n.spec.as_ref().and_then(|sp| sp.unschedulable) == Some(true))
        .collect();
    if bad.is_empty() {
        return vec![];
    }
    let names: Vec<String> = bad.iter().map(|n| n.name_any()).collect();
    vec![
        Finding::new(
            "gpu-node-cordoned",
            Severity::Warning,
            format!(
                "{} cordoned: no new GPU pods land there",
                count_phrase(bad.len(), "GPU node is", "GPU nodes are")
            ),
        )
        .objects(bad.iter().map(|n| node_ref(n)))
        .evidence([format!(
            "spec.unschedulable=true on {}",
            list_some(&names, 5)
        )])
        .fix(format!(
            "When maintenance is done: kubectl uncordon {}",
            names.join(" ")
        )),
    ]
}

/// Taints DaemonSet pods tolerate by themselves (added by the DaemonSet controller).
const DAEMONSET_AUTO_TOLERATED: [&str; 6] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/disk-pressure",
    "node.kubernetes.io/memory-pressure",
    "node.kubernetes.io/pid-pressure",
    "node.kubernetes.io/unschedulable",
];

fn taint_not_tolerated(s: &Snapshot) -> Vec<Finding> {
    let Some(p) = active_policy(s) else {
        return vec![];
    };
    let tols = &p.spec.daemonsets.tolerations;
    let mut nodes = Vec::new();
    let mut taints: BTreeSet<String> = BTreeSet::new();
    for n in managed_gpu_nodes(s) {
        let bad: Vec<&Taint> = n
            .spec
            .iter()
            .flat_map(|sp| sp.taints.iter().flatten())
            .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
            .filter(|t| !DAEMONSET_AUTO_TOLERATED.contains(&t.key.as_str()))
            .filter(|t| !tolerates(tols, t))
            .collect();
        if bad.is_empty() {
            continue;
        }
        for t in bad {
            taints.insert(format!(
                "{}{}:{}",
                t.key,
                t.value
                    .as_deref()
                    .map(|v| format!("={v}"))
                    .unwrap_or_default(),
                t.effect
            ));
        }
        nodes.push(node_ref(n));
    }
    if nodes.is_empty() {
        return vec![];
    }
    let example = taints.iter().next().cloned().unwrap_or_default();
    let key = example
        .split([':', '='])
        .next()
        .unwrap_or_default()
        .to_string();
    vec![
        Finding::new(
            "taint-not-tolerated",
            Severity::Error,
            format!(
                "{} taints the operands do not tolerate: no new operand pods land there",
                count_phrase(nodes.len(), "GPU node carries", "GPU nodes carry")
            ),
        )
        .objects(nodes)
        .evidence([
            format!("untolerated taints: {}", taints.iter().cloned().collect::<Vec<_>>().join(", ")),
            format!(
                "policy spec.daemonsets.tolerations: {}",
                serde_json::to_string(tols).unwrap_or_default()
            ),
        ])
        .fix(format!(
            "Add a toleration to the policy: kubectl patch clusterpolicy {} --type json -p '[{{\"op\": \"add\", \"path\": \"/spec/daemonsets/tolerations/-\", \"value\": {{\"key\": \"{key}\", \"operator\": \"Exists\"}}}}]', or remove the taint from the nodes",
            p.name_any()
        )),
    ]
}

fn gpu_unhealthy(s: &Snapshot) -> Vec<Finding> {
    let mut nodes = Vec::new();
    let mut lines = Vec::new();
    for n in gpu_nodes(s) {
        let cap = quantity(n, false, resource::GPU).unwrap_or(0);
        let alloc = quantity(n, true, resource::GPU).unwrap_or(0);
        if cap > alloc && alloc >= 0 && cap > 0 {
            if lines.len() < 5 {
                lines.push(format!(
                    "{}: {} capacity {cap}, allocatable {alloc}: {} unhealthy",
                    n.name_any(),
                    resource::GPU,
                    cap - alloc
                ));
            }
            nodes.push(node_ref(n));
        }
    }
    if nodes.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "gpu-unhealthy",
            Severity::Warning,
            format!(
                "Unhealthy GPUs on {}: fewer allocatable than installed",
                count_phrase(nodes.len(), "node", "nodes")
            ),
        )
        .objects(nodes)
        .evidence(lines)
        .fix(format!(
            "The device plugin marks a GPU unhealthy on XID errors: kubectl {} logs -l {}={} --field-selector spec.nodeName=<node>, and DCGM_FI_DEV_XID_ERRORS in the metrics. Drain the node and reset or replace the GPU if it stays unhealthy.",
            ns_flag(s),
            label::COMPONENT,
            Component::DevicePlugin.gate_name()
        )),
    ]
}

fn config_map_keys(s: &Snapshot, name: &str) -> Option<BTreeSet<String>> {
    let cm = s.config_maps.iter().find(|c| c.name_any() == name)?;
    Some(
        cm.data
            .iter()
            .flat_map(|d| d.keys().cloned())
            .chain(cm.binary_data.iter().flat_map(|d| d.keys().cloned()))
            .collect(),
    )
}

fn device_plugin_config(s: &Snapshot) -> Vec<Finding> {
    let Some(p) = active_policy(s) else {
        return vec![];
    };
    let cfg = &p.spec.device_plugin.config;
    let keys = if cfg.name.is_empty() {
        None
    } else {
        config_map_keys(s, &cfg.name)
    };
    let mut by_entry: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in gpu_nodes(s) {
        let Some(entry) = node_label(n, label::DEVICE_PLUGIN_CONFIG) else {
            continue;
        };
        let ok = keys.as_ref().is_some_and(|k| k.contains(entry));
        if !ok {
            by_entry
                .entry(entry.to_string())
                .or_default()
                .push(node_ref(n));
        }
    }
    if by_entry.is_empty() {
        return vec![];
    }
    let evidence: Vec<String> = by_entry
        .iter()
        .map(|(e, ns)| {
            format!(
                "{}={e} on {}",
                label::DEVICE_PLUGIN_CONFIG,
                count_phrase(ns.len(), "node", "nodes")
            )
        })
        .chain([match &keys {
            Some(k) => format!(
                "ConfigMap {}/{} has the entries: {}",
                s.namespace,
                cfg.name,
                k.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            None if cfg.name.is_empty() => format!(
                "the policy {} names no device-plugin ConfigMap (spec.devicePlugin.config.name is empty)",
                p.name_any()
            ),
            None => format!("ConfigMap {}/{} does not exist", s.namespace, cfg.name),
        }])
        .collect();
    vec![
        Finding::new(
            "device-plugin-config-missing",
            Severity::Error,
            format!(
                "Nodes select device-plugin config entries that do not exist: the device plugin there falls back to {}",
                if cfg.default.is_empty() { "no sharing".to_string() } else { format!("the default entry {}", cfg.default) }
            ),
        )
        .objects(by_entry.values().flatten().cloned())
        .evidence(evidence)
        .fix(format!(
            "Add the entry to the ConfigMap named in spec.devicePlugin.config.name (kubectl {} edit configmap {}), or relabel the nodes: kubectl label node <node> {}=<entry> --overwrite (or {}- to use the default)",
            ns_flag(s),
            if cfg.name.is_empty() { "<name>" } else { &cfg.name },
            label::DEVICE_PLUGIN_CONFIG,
            label::DEVICE_PLUGIN_CONFIG
        )),
    ]
}

fn policy_configmaps(s: &Snapshot) -> Vec<Finding> {
    let Some(p) = active_policy(s) else {
        return vec![];
    };
    if s.unreadable.iter().any(|u| u.contains("ConfigMaps")) {
        return vec![];
    }
    let mut out = Vec::new();
    let refs = [
        (
            "devicePlugin",
            &p.spec.device_plugin.config,
            p.spec.device_plugin.enabled,
        ),
        (
            "dcgmExporter",
            &p.spec.dcgm_exporter.config,
            p.spec.dcgm_exporter.enabled,
        ),
        (
            "migManager",
            &p.spec.mig_manager.config,
            p.spec.mig_manager.enabled,
        ),
    ];
    for (field, cfg, enabled) in refs {
        if !enabled || cfg.name.is_empty() {
            continue;
        }
        // The built-in layouts ConfigMap is created by install; without it the MIG manager
        // offers its own standard layouts.
        if field == "migManager" && cfg.name == gpu_pilot_core::render::install::MIG_PARTED_CONFIG {
            continue;
        }
        match config_map_keys(s, &cfg.name) {
            None => out.push(
                Finding::new(
                    "policy-configmap-missing",
                    Severity::Error,
                    format!("The ConfigMap {} that spec.{field}.config.name names is missing", cfg.name),
                )
                .objects([format!("ConfigMap/{}/{}", s.namespace, cfg.name)])
                .evidence([format!(
                    "policy {}: spec.{field}.config.name={}, no such ConfigMap in {}",
                    p.name_any(),
                    cfg.name,
                    s.namespace
                )])
                .fix(format!(
                    "Create it in {} (kubectl {} create configmap {} --from-file=<entry>=<file>), or clear spec.{field}.config in the policy",
                    s.namespace,
                    ns_flag(s),
                    cfg.name
                )),
            ),
            Some(keys) if field == "devicePlugin" && !cfg.default.is_empty() && !keys.contains(&cfg.default) => {
                out.push(
                    Finding::new(
                        "policy-configmap-missing",
                        Severity::Error,
                        format!("spec.{field}.config.default names {}, which the ConfigMap {} lacks", cfg.default, cfg.name),
                    )
                    .objects([format!("ConfigMap/{}/{}", s.namespace, cfg.name)])
                    .evidence([format!(
                        "entries of {}: {}",
                        cfg.name,
                        keys.iter().cloned().collect::<Vec<_>>().join(", ")
                    )])
                    .fix(format!(
                        "Add the entry {} to the ConfigMap, or set spec.{field}.config.default to one of its entries",
                        cfg.default
                    )),
                );
            }
            Some(_) => {}
        }
    }
    out
}

fn opted_out(s: &Snapshot) -> Vec<Finding> {
    let nodes: Vec<&Node> = gpu_nodes(s)
        .into_iter()
        .filter(|n| node_label(n, label::DEPLOY_OPERANDS) == Some(gate_value::DISABLED))
        .collect();
    if nodes.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "operands-opted-out",
            Severity::Info,
            format!(
                "{} opted out of gpu-pilot's operands",
                count_phrase(nodes.len(), "GPU node", "GPU nodes")
            ),
        )
        .objects(nodes.iter().map(|n| node_ref(n)))
        .evidence([format!("{}=false", label::DEPLOY_OPERANDS)])
        .fix(format!(
            "If that was not meant: kubectl label node <node> {}-",
            label::DEPLOY_OPERANDS
        )),
    ]
}

fn mig_strategy_mismatch(s: &Snapshot) -> Vec<Finding> {
    let Some(p) = active_policy(s) else {
        return vec![];
    };
    let want = p.spec.mig.strategy.as_str();
    let bad: Vec<(&Node, &str)> = managed_gpu_nodes(s)
        .into_iter()
        .filter_map(|n| node_label(n, label::MIG_STRATEGY).map(|v| (n, v)))
        .filter(|(_, v)| *v != want)
        .collect();
    if bad.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "mig-strategy-mismatch",
            Severity::Warning,
            format!(
                "{} a MIG strategy other than the policy's {want}",
                count_phrase(bad.len(), "node reports", "nodes report")
            ),
        )
        .objects(bad.iter().map(|(n, _)| node_ref(n)))
        .evidence(bad.iter().take(5).map(|(n, v)| format!("{}: {}={v}", n.name_any(), label::MIG_STRATEGY)))
        .fix(format!(
            "The agents there still run with the old strategy: kubectl {} rollout restart ds/{} ds/{} and wait for kubectl {} rollout status ds/{}",
            ns_flag(s),
            Component::DevicePlugin.daemonset_name(),
            Component::GpuFeatureDiscovery.daemonset_name(),
            ns_flag(s),
            Component::DevicePlugin.daemonset_name()
        )),
    ]
}

fn warning_events(s: &Snapshot) -> Vec<Finding> {
    let mut groups: BTreeMap<(String, String), (i32, String, Vec<String>)> = BTreeMap::new();
    for e in &s.events {
        if e.type_.as_deref() != Some("Warning") {
            continue;
        }
        let when = e
            .last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or(e.event_time.as_ref().map(|t| t.0))
            .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0));
        if age_seconds(s, when).is_some_and(|a| a > 3600) {
            continue;
        }
        let kind = e.involved_object.kind.clone().unwrap_or_default();
        let key = (e.reason.clone().unwrap_or_default(), kind.clone());
        let entry = groups
            .entry(key)
            .or_insert_with(|| (0, e.message.clone().unwrap_or_default(), Vec::new()));
        entry.0 += e.count.unwrap_or(1).max(1);
        let obj = format!(
            "{kind}/{}/{}",
            s.namespace,
            e.involved_object.name.clone().unwrap_or_default()
        );
        if !entry.2.contains(&obj) {
            entry.2.push(obj);
        }
    }
    if groups.is_empty() {
        return vec![];
    }
    let mut sorted: Vec<_> = groups.into_iter().collect();
    sorted.sort_by_key(|g| std::cmp::Reverse(g.1.0));
    let total: i32 = sorted.iter().map(|(_, v)| v.0).sum();
    vec![
        Finding::new(
            "warning-events",
            Severity::Info,
            format!("{total} Warning events in {} in the last hour", s.namespace),
        )
        .objects(sorted.iter().flat_map(|(_, v)| v.2.clone()))
        .evidence(
            sorted
                .iter()
                .take(5)
                .map(|((reason, kind), (n, msg, _))| format!("{n}x {reason} on {kind}: {msg}")),
        )
        .fix(format!(
            "kubectl {} get events --field-selector type=Warning --sort-by=.lastTimestamp",
            ns_flag(s)
        )),
    ]
}

fn incomplete(s: &Snapshot) -> Vec<Finding> {
    if s.unreadable.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "doctor-incomplete",
            Severity::Warning,
            format!(
                "{} of the cluster could not be read: the checks that need them found nothing",
                count_phrase(s.unreadable.len(), "part", "parts")
            ),
        )
        .evidence(s.unreadable.clone())
        .fix("Run doctor as a cluster admin (it only reads: nodes, pods, DaemonSets, Deployments, Services, EndpointSlices, ConfigMaps, Events, Leases, RuntimeClasses, CRDs, ClusterPolicies, webhook configurations, and the webhook Secret's metadata)"),
    ]
}
