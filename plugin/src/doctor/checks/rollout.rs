//! GPU nodes and the rollout: nodes found, GPUs advertised, stuck stages, DaemonSets, RuntimeClass.

use super::*;

pub(super) fn no_gpu_nodes(s: &Snapshot) -> Vec<Finding> {
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
pub(super) fn why_no_gpus(s: &Snapshot, n: &Node, pods: &[(&Pod, PodFacts)]) -> Option<String> {
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

pub(super) fn gpu_not_allocatable(s: &Snapshot) -> Vec<Finding> {
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
pub(super) fn failure_kind(reason: &str) -> &'static str {
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
pub(super) fn failing_container(
    p: &Pod,
) -> Option<(String, String, String, String, i32, Option<String>)> {
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

pub(super) fn stage_stuck(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn pod_age(s: &Snapshot, p: &Pod) -> Option<i64> {
    age_seconds(s, p.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

pub(super) fn rollout_in_progress(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn daemonset_unavailable(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn runtime_class_missing(s: &Snapshot) -> Vec<Finding> {
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

#[cfg(test)]
mod tests;
