//! The installation: Kubernetes version, CRD, policy, NVIDIA's operator, namespace, controller.

use super::*;

pub(super) fn kubernetes_version(s: &Snapshot) -> Vec<Finding> {
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
            .evidence([why.to_string()])
            .fix("Upgrade the control plane to a supported Kubernetes version, then run kubectl gpu install again."),
        ],
    }
}

pub(super) fn not_installed(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn no_policy(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn multiple_policies(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn gpu_operator(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn namespace_mismatch(s: &Snapshot) -> Vec<Finding> {
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

pub(super) fn controller_not_running(s: &Snapshot) -> Vec<Finding> {
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
                crate::doctor::snapshot::CONTROLLER_LEASE,
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
pub(super) fn pod_problem(st: &k8s_openapi::api::core::v1::PodStatus) -> Option<String> {
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

#[cfg(test)]
mod tests;
