//! GPU pods that wait to be scheduled, and why.

use super::*;

/// GPU resources a pod asks for: name -> count (requests, or limits where no request is given).
pub(super) fn gpu_requests(p: &Pod) -> BTreeMap<String, i64> {
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

pub(super) fn tolerates(tols: &[Toleration], t: &Taint) -> bool {
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

pub(super) fn pending_gpu_pods(s: &Snapshot) -> Vec<Finding> {
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

#[cfg(test)]
mod tests;
