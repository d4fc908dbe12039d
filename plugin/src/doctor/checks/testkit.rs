//! What the checks' tests share: a healthy snapshot built by hand (it yields no finding) and
//! helpers to add one fault to it and look at what a check found.

pub use gpu_pilot_api::names::{
    Component, annotation, gate_value, label, mig_config_state, resource, webhook,
};
pub use k8s_openapi::api::core::v1::{Node, Pod};
pub use k8s_openapi::jiff::Timestamp;
pub use serde_json::{Value, json};

pub use super::{CHECKS, run_all};
pub use crate::doctor::snapshot::Snapshot;
pub use crate::doctor::{Finding, Report, Severity};

pub const NS: &str = "gpu-pilot";
pub const NOW: i64 = 1_800_000_000;

pub fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

pub fn ts(offset: i64) -> String {
    Timestamp::from_second(NOW + offset).unwrap().to_string()
}

pub fn gpu_node(name: &str) -> Value {
    let mut labels = json!({
        (label::NFD_PCI_10DE): "true",
        (label::GPU_PRESENT): "true",
        (label::STAGE): "ready",
    });
    for c in Component::ALL {
        labels[label::deploy_gate(c)] = json!("true");
    }
    json!({
        "metadata": {"name": name, "labels": labels, "annotations": {(annotation::GPU_PRESENT_SOURCE): "nfd"}},
        "spec": {},
        "status": {
            "capacity": {"cpu": "32", (resource::GPU): "8"},
            "allocatable": {"cpu": "32", (resource::GPU): "8"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    })
}

pub fn cpu_node(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux"}},
        "status": {"capacity": {"cpu": "32"}, "allocatable": {"cpu": "32"},
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

pub fn operand_pod(component: Component, node: &str) -> Value {
    json!({
        "metadata": {
            "name": format!("{}-{node}", component.daemonset_name()),
            "namespace": NS,
            "creationTimestamp": ts(-3600),
            "labels": {(label::MANAGED_BY): label::MANAGED_BY_VALUE, (label::COMPONENT): component.gate_name(),
                       (label::NAME): component.daemonset_name()},
        },
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "example/img:1"}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "main", "image": "example/img:1", "imageID": "", "ready": true,
                                   "restartCount": 0, "state": {"running": {}}}],
        },
    })
}

pub fn policy(name: &str, created: i64) -> Value {
    json!({
        "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
        "metadata": {"name": name, "generation": 1, "creationTimestamp": ts(created)},
        "spec": {},
        "status": {"state": "ready", "observedGeneration": 1, "namespace": NS, "gpuNodes": 3, "readyNodes": 3},
    })
}

pub const GPU_NODES: [&str; 3] = ["gpu-a", "gpu-b", "gpu-c"];

pub fn webhook_config(kind: &str, hook: &str) -> Value {
    json!({
        "metadata": {"name": webhook::NAME},
        "webhooks": [{
            "name": hook, "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
            "clientConfig": {"service": {"namespace": NS, "name": webhook::NAME, "port": 443, "path": "/x"},
                             "caBundle": "UEVN"},
            "kind": kind,
        }],
    })
}

/// A healthy cluster: three ready GPU nodes with every operand, a CPU node, the webhook up.
pub fn healthy() -> Snapshot {
    let mut pods: Vec<Pod> = Vec::new();
    for n in GPU_NODES {
        for c in Component::ALL {
            pods.push(from(operand_pod(c, n)));
        }
    }
    let mut webhook_pod = operand_pod(Component::DevicePlugin, "cpu-1");
    webhook_pod["metadata"] = json!({"name": "gpu-pilot-webhook-abc", "namespace": NS, "labels": {(label::NAME): webhook::NAME}});
    pods.push(from(webhook_pod));
    let daemonsets = Component::ALL
        .into_iter()
        .map(|c| {
            from(json!({
                "metadata": {"name": c.daemonset_name(), "namespace": NS},
                "spec": {"selector": {}, "template": {}},
                "status": {"desiredNumberScheduled": 3, "numberReady": 3, "currentNumberScheduled": 3, "numberMisscheduled": 0},
            }))
        })
        .collect();
    let mut nodes: Vec<Node> = GPU_NODES.iter().map(|n| from(gpu_node(n))).collect();
    nodes.push(from(cpu_node("cpu-1")));
    Snapshot {
        namespace: NS.into(),
        now: Some(Timestamp::from_second(NOW).unwrap()),
        server: "https://127.0.0.1:6443".into(),
        version: Some((1, 37, "v1.37.2".into())),
        crds: vec![
            "clusterpolicies.gpupilot.io".into(),
            "other.example.com".into(),
        ],
        policies: vec![from(policy("cluster-policy", -7200))],
        nodes,
        pods,
        daemonsets,
        deployments: vec![from(json!({
            "metadata": {"name": webhook::NAME, "namespace": NS},
            "spec": {"replicas": 1, "selector": {}, "template": {}},
            "status": {"availableReplicas": 1},
        }))],
        services: vec![from(
            json!({"metadata": {"name": webhook::NAME, "namespace": NS}}),
        )],
        endpoint_slices: vec![from(json!({
            "metadata": {"name": "gpu-pilot-webhook-x", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": webhook::NAME}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": true}}],
        }))],
        runtime_classes: vec!["nvidia".into()],
        mutating: Some(from(webhook_config("m", webhook::MUTATE_PODS_WEBHOOK))),
        validating: Some(from(webhook_config("v", webhook::VALIDATE_POLICY_WEBHOOK))),
        tls_secret: Some(from(json!({
            "name": webhook::TLS_SECRET,
            "annotations": {(webhook::CERT_NOT_AFTER): ts(80 * 86400), (webhook::CA_NOT_AFTER): ts(3000 * 86400)},
        }))),
        ..Default::default()
    }
}

pub fn node_mut<'a>(s: &'a mut Snapshot, name: &str) -> &'a mut Node {
    s.nodes
        .iter_mut()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .unwrap()
}

pub fn set_label(s: &mut Snapshot, node: &str, key: &str, value: Option<&str>) {
    let labels = node_mut(s, node).metadata.labels.get_or_insert_default();
    match value {
        Some(v) => labels.insert(key.into(), v.into()),
        None => labels.remove(key),
    };
}

/// The findings of one check id.
pub fn found(s: &Snapshot, id: &str) -> Vec<Finding> {
    run_all(s).into_iter().filter(|f| f.check == id).collect()
}

#[track_caller]
pub fn expect(s: &Snapshot, id: &str, severity: Severity, object: &str, evidence: &str) -> Finding {
    let all = run_all(s);
    let f = all
        .iter()
        .find(|f| {
            f.check == id
                && f.severity == severity
                && (object.is_empty() || f.objects.iter().any(|o| o.contains(object)))
                && (evidence.is_empty()
                    || f.evidence.iter().any(|e| e.contains(evidence))
                    || f.title.contains(evidence))
        })
        .unwrap_or_else(|| {
            panic!("no {severity:?} {id} about {object:?} with {evidence:?} in {all:#?}")
        });
    assert!(!f.title.is_empty() && !f.fix.is_empty(), "{f:#?}");
    f.clone()
}
