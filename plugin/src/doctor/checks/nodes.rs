//! The GPU nodes themselves: driver versions, readiness, cordons, taints, GPU health, opt-outs, MIG strategy labels.

use super::*;

/// The driver version a node reports through GFD's labels.
pub(super) fn driver_version(n: &Node) -> Option<String> {
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

pub(super) fn driver_skew(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn node_not_ready(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn node_cordoned(s: &Snapshot) -> Vec<Finding> {
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
pub(super) const DAEMONSET_AUTO_TOLERATED: [&str; 6] = [
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/disk-pressure",
    "node.kubernetes.io/memory-pressure",
    "node.kubernetes.io/pid-pressure",
    "node.kubernetes.io/unschedulable",
];

pub(super) fn taint_not_tolerated(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn gpu_unhealthy(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn opted_out(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn mig_strategy_mismatch(s: &Snapshot) -> Vec<Finding> {
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

#[cfg(test)]
mod tests;
