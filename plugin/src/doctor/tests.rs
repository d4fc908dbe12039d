//! Every check over hand-built snapshots: the healthy one yields nothing, each fault its finding.

use gpu_pilot_api::names::{
    Component, annotation, gate_value, label, mig_config_state, resource, webhook,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::checks::{CHECKS, run_all};
use super::snapshot::Snapshot;
use super::{Finding, Report, Severity};

const NS: &str = "gpu-pilot";
const NOW: i64 = 1_800_000_000;

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn ts(offset: i64) -> String {
    Timestamp::from_second(NOW + offset).unwrap().to_string()
}

fn gpu_node(name: &str) -> Value {
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

fn cpu_node(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux"}},
        "status": {"capacity": {"cpu": "32"}, "allocatable": {"cpu": "32"},
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

fn operand_pod(component: Component, node: &str) -> Value {
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

fn policy(name: &str, created: i64) -> Value {
    json!({
        "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
        "metadata": {"name": name, "generation": 1, "creationTimestamp": ts(created)},
        "spec": {},
        "status": {"state": "ready", "observedGeneration": 1, "namespace": NS, "gpuNodes": 3, "readyNodes": 3},
    })
}

const GPU_NODES: [&str; 3] = ["gpu-a", "gpu-b", "gpu-c"];

fn webhook_config(kind: &str, hook: &str) -> Value {
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
fn healthy() -> Snapshot {
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

fn node_mut<'a>(s: &'a mut Snapshot, name: &str) -> &'a mut Node {
    s.nodes
        .iter_mut()
        .find(|n| n.metadata.name.as_deref() == Some(name))
        .unwrap()
}

fn set_label(s: &mut Snapshot, node: &str, key: &str, value: Option<&str>) {
    let labels = node_mut(s, node).metadata.labels.get_or_insert_default();
    match value {
        Some(v) => labels.insert(key.into(), v.into()),
        None => labels.remove(key),
    };
}

/// The findings of one check id.
fn found(s: &Snapshot, id: &str) -> Vec<Finding> {
    run_all(s).into_iter().filter(|f| f.check == id).collect()
}

#[track_caller]
fn expect(s: &Snapshot, id: &str, severity: Severity, object: &str, evidence: &str) -> Finding {
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

#[test]
fn the_healthy_cluster_has_no_findings() {
    let s = healthy();
    assert_eq!(run_all(&s), vec![]);
    let r = Report::from_findings(&s, run_all(&s));
    assert_eq!(r.exit_code(), 0);
    assert_eq!(r.gpu_nodes, 3);
}

#[test]
fn at_least_twenty_checks_with_unique_ids() {
    assert!(CHECKS.len() >= 20, "{}", CHECKS.len());
    let ids: std::collections::BTreeSet<_> = CHECKS.iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), CHECKS.len());
    for c in CHECKS {
        assert!(
            ["error", "warning", "info"].contains(&c.severity),
            "{}",
            c.id
        );
    }
}

#[test]
fn every_finding_names_a_registered_check() {
    // Run every fault below at once: each finding's id is one --list-checks prints.
    let mut s = healthy();
    s.policies.push(from(policy("second", -60)));
    s.nodes[0].metadata.labels.as_mut().unwrap().insert(
        label::MIG_CONFIG_STATE.into(),
        mig_config_state::FAILED.into(),
    );
    s.runtime_classes.clear();
    for f in run_all(&s) {
        assert!(CHECKS.iter().any(|c| c.id == f.check), "{}", f.check);
    }
}

#[test]
fn unsupported_and_untested_kubernetes_versions() {
    let mut s = healthy();
    s.version = Some((1, 20, "v1.20.0".into()));
    expect(&s, "kubernetes-version", Severity::Error, "", "v1.20.0");
    s.version = Some((1, 99, "v1.99.0".into()));
    expect(&s, "kubernetes-version", Severity::Info, "", "newer");
}

#[test]
fn crd_missing_means_not_installed() {
    let mut s = healthy();
    s.crds = vec!["other.example.com".into()];
    s.policies.clear();
    expect(
        &s,
        "gpu-pilot-not-installed",
        Severity::Error,
        "CustomResourceDefinition/clusterpolicies.gpupilot.io",
        "",
    );
    assert!(found(&s, "no-cluster-policy").is_empty());
}

#[test]
fn no_policy() {
    let mut s = healthy();
    s.policies.clear();
    let f = expect(&s, "no-cluster-policy", Severity::Error, "", "");
    assert!(f.fix.contains("kubectl gpu install"));
}

#[test]
fn second_policy_is_named_and_the_oldest_stays_active() {
    let mut s = healthy();
    s.policies.push(from(policy("newer", -60)));
    let f = expect(
        &s,
        "multiple-cluster-policies",
        Severity::Warning,
        "ClusterPolicy/newer",
        "",
    );
    assert!(f.title.contains("only cluster-policy is active"), "{f:?}");
}

#[test]
fn nvidia_gpu_operator_beside_gpu_pilot() {
    let mut s = healthy();
    s.gpu_operator_signs = vec!["the CRD clusterpolicies.nvidia.com exists".into()];
    expect(
        &s,
        "gpu-operator-installed",
        Severity::Error,
        "clusterpolicies.nvidia.com",
        "exists",
    );
}

#[test]
fn namespace_other_than_the_controllers() {
    let mut s = healthy();
    s.namespace = "elsewhere".into();
    let f = expect(&s, "namespace-mismatch", Severity::Warning, "", "");
    assert!(f.fix.contains("-n gpu-pilot"));
}

#[test]
fn stale_status_or_unavailable_deployment_means_no_controller() {
    let mut s = healthy();
    s.policies[0].metadata.generation = Some(3);
    expect(
        &s,
        "controller-not-running",
        Severity::Error,
        "",
        "observedGeneration 1 < metadata.generation 3",
    );
    let mut s = healthy();
    s.deployments.push(from(json!({
        "metadata": {"name": "gpu-pilot-controller", "namespace": NS},
        "spec": {"replicas": 1, "selector": {}, "template": {}},
        "status": {"availableReplicas": 0},
    })));
    expect(
        &s,
        "controller-not-running",
        Severity::Error,
        "",
        "0 of 1 replicas",
    );
    let mut s = healthy();
    s.lease = Some(from(json!({
        "metadata": {"name": "gpu-pilot-controller"},
        "spec": {"holderIdentity": "pod-1", "leaseDurationSeconds": 15, "renewTime": format!("{}", Timestamp::from_second(NOW - 600).unwrap())},
    })));
    expect(
        &s,
        "controller-not-running",
        Severity::Error,
        "",
        "no leader",
    );
    // A fresh policy without status yet is no fault.
    let mut s = healthy();
    s.policies[0] = from(json!({
        "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
        "metadata": {"name": "cluster-policy", "generation": 1, "creationTimestamp": ts(-5)}, "spec": {},
    }));
    assert!(found(&s, "controller-not-running").is_empty());
}

#[test]
fn no_gpu_nodes_without_nfd_labels() {
    let mut s = healthy();
    for n in GPU_NODES {
        set_label(&mut s, n, label::NFD_PCI_10DE, None);
    }
    let f = expect(&s, "no-gpu-nodes", Severity::Error, "Node/gpu-a", "");
    assert!(f.fix.contains("node-feature-discovery"), "{}", f.fix);
    assert!(f.fix.contains("nvidia.com/gpu.present=true"), "{}", f.fix);
}

#[test]
fn gpu_not_allocatable_explains_why() {
    // Device plugin paused by the MIG manager.
    let mut s = healthy();
    let gate = label::deploy_gate(Component::DevicePlugin);
    set_label(
        &mut s,
        "gpu-a",
        &gate,
        Some(gate_value::PAUSED_FOR_MIG_CHANGE),
    );
    node_mut(&mut s, "gpu-a")
        .status
        .as_mut()
        .unwrap()
        .allocatable
        .as_mut()
        .unwrap()
        .remove(resource::GPU);
    expect(
        &s,
        "gpu-not-allocatable",
        Severity::Error,
        "Node/gpu-a",
        "paused",
    );
    // Node NotReady.
    let mut s = healthy();
    let n = node_mut(&mut s, "gpu-b");
    n.status.as_mut().unwrap().allocatable = None;
    n.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "Unknown".into();
    expect(
        &s,
        "gpu-not-allocatable",
        Severity::Error,
        "Node/gpu-b",
        "NotReady",
    );
    // All GPUs unhealthy.
    let mut s = healthy();
    node_mut(&mut s, "gpu-c")
        .status
        .as_mut()
        .unwrap()
        .allocatable
        .as_mut()
        .unwrap()
        .insert(
            resource::GPU.into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("0".into()),
        );
    expect(
        &s,
        "gpu-not-allocatable",
        Severity::Error,
        "Node/gpu-c",
        "unhealthy",
    );
    // Device-plugin pod missing.
    let mut s = healthy();
    node_mut(&mut s, "gpu-a")
        .status
        .as_mut()
        .unwrap()
        .allocatable = None;
    s.pods
        .retain(|p| p.metadata.name.as_deref() != Some("gpu-pilot-device-plugin-gpu-a"));
    expect(
        &s,
        "gpu-not-allocatable",
        Severity::Error,
        "Node/gpu-a",
        "no device-plugin pod",
    );
    // MIG resources under mixed are GPUs too.
    let mut s = healthy();
    let st = node_mut(&mut s, "gpu-a").status.as_mut().unwrap();
    st.allocatable = Some(
        [(
            resource::mig("1g.10gb"),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("7".into()),
        )]
        .into(),
    );
    st.capacity = st.allocatable.clone();
    assert!(found(&s, "gpu-not-allocatable").is_empty());
}

fn failing_pod(component: Component, node: &str, reason: &str, restarts: i32) -> Pod {
    let mut p = operand_pod(component, node);
    p["status"] = json!({
        "phase": "Pending",
        "conditions": [{"type": "Ready", "status": "False"}],
        "containerStatuses": [{"name": "main", "image": "nvcr.io/nvidia/driver:580.95.05", "imageID": "",
            "ready": false, "restartCount": restarts,
            "state": {"waiting": {"reason": reason, "message": "Back-off pulling image \"nvcr.io/nvidia/driver:580.95.05\""}},
            "lastState": if restarts > 0 { json!({"terminated": {"exitCode": 1, "reason": "Error"}}) } else { json!({}) }}],
    });
    from(p)
}

#[test]
fn stuck_stage_names_the_image_or_the_logs() {
    let mut s = healthy();
    let i = s
        .pods
        .iter()
        .position(|p| p.metadata.name.as_deref() == Some("gpu-pilot-driver-gpu-b"))
        .unwrap();
    s.pods[i] = failing_pod(Component::Driver, "gpu-b", "ImagePullBackOff", 0);
    set_label(&mut s, "gpu-b", label::STAGE, Some("driver"));
    let f = expect(
        &s,
        "stage-stuck",
        Severity::Error,
        "Node/gpu-b",
        "image nvcr.io/nvidia/driver:580.95.05",
    );
    assert!(
        f.title.contains("stage driver") && f.title.contains("ImagePullBackOff"),
        "{f:?}"
    );
    assert!(f.fix.contains("spec.driver.repository"), "{}", f.fix);

    s.pods[i] = failing_pod(Component::Driver, "gpu-b", "CrashLoopBackOff", 7);
    s.logs.insert(
        "gpu-pilot-driver-gpu-b/main".into(),
        "loading modules\nmodprobe: FATAL: nvidia not found\n".into(),
    );
    let f = expect(
        &s,
        "stage-stuck",
        Severity::Error,
        "Node/gpu-b",
        "modprobe: FATAL",
    );
    assert!(f.evidence.iter().any(|e| e.contains("7 restarts")), "{f:?}");
    assert!(f.fix.contains("--previous"), "{}", f.fix);
    // A node held by a failure is not "still moving".
    assert!(
        found(&s, "rollout-in-progress").is_empty(),
        "{:?}",
        found(&s, "rollout-in-progress")
    );
}

#[test]
fn stuck_in_init_container() {
    let mut s = healthy();
    let i = s
        .pods
        .iter()
        .position(|p| p.metadata.name.as_deref() == Some("gpu-pilot-operator-validator-gpu-a"))
        .unwrap();
    let mut p = operand_pod(Component::OperatorValidator, "gpu-a");
    p["spec"]["initContainers"] = json!([{"name": "wait-for-toolkit", "image": "x"}]);
    p["status"] = json!({
        "phase": "Pending",
        "conditions": [{"type": "Ready", "status": "False"}],
        "initContainerStatuses": [{"name": "wait-for-toolkit", "image": "x", "imageID": "", "ready": false,
                                   "restartCount": 0, "state": {"running": {}}}],
        "containerStatuses": [{"name": "main", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                               "state": {"waiting": {"reason": "PodInitializing"}}}],
    });
    s.pods[i] = from(p);
    set_label(&mut s, "gpu-a", label::STAGE, Some("driver-validation"));
    node_mut(&mut s, "gpu-a")
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(
            annotation::STAGE_REASON.into(),
            "operator-validator pod: Init:wait-for-toolkit".into(),
        );
    let f = expect(
        &s,
        "stage-stuck",
        Severity::Error,
        "Node/gpu-a",
        "wait-for-toolkit",
    );
    assert!(f.fix.contains("wait-for-toolkit"), "{}", f.fix);
}

#[test]
fn a_failing_pod_on_a_ready_node() {
    let mut s = healthy();
    let i = s
        .pods
        .iter()
        .position(|p| p.metadata.name.as_deref() == Some("gpu-pilot-dcgm-exporter-gpu-c"))
        .unwrap();
    s.pods[i] = failing_pod(Component::DcgmExporter, "gpu-c", "CrashLoopBackOff", 2);
    let f = expect(
        &s,
        "stage-stuck",
        Severity::Error,
        "Node/gpu-c",
        "2 restarts",
    );
    assert_eq!(
        f.title,
        "dcgm-exporter pod CrashLoopBackOff on 1 ready GPU node"
    );
    assert!(f.fix.contains("spec.dcgmExporter"), "{}", f.fix);
}

#[test]
fn rollout_in_progress_is_info_only() {
    let mut s = healthy();
    set_label(&mut s, "gpu-a", label::STAGE, Some("toolkit"));
    let f = expect(&s, "rollout-in-progress", Severity::Info, "Node/gpu-a", "");
    assert!(f.evidence[0].contains("1 at stage toolkit"), "{f:?}");
    assert_eq!(Report::from_findings(&s, run_all(&s)).exit_code(), 0);
}

#[test]
fn daemonsets_missing_or_short() {
    let mut s = healthy();
    s.daemonsets
        .retain(|d| d.metadata.name.as_deref() != Some("gpu-pilot-dcgm-exporter"));
    expect(
        &s,
        "operand-daemonset-unavailable",
        Severity::Error,
        "gpu-pilot-dcgm-exporter",
        "",
    );
    let mut s = healthy();
    s.daemonsets[0].status.as_mut().unwrap().number_ready = 1;
    expect(
        &s,
        "operand-daemonset-unavailable",
        Severity::Warning,
        "",
        "1 of 3 pods ready",
    );
    // During a rollout pods are still starting: info only.
    set_label(&mut s, "gpu-a", label::STAGE, Some("toolkit"));
    expect(
        &s,
        "operand-daemonset-unavailable",
        Severity::Info,
        "",
        "rollout is in progress",
    );
}

#[test]
fn runtime_class_missing() {
    let mut s = healthy();
    s.runtime_classes = vec!["runc".into()];
    expect(
        &s,
        "runtimeclass-missing",
        Severity::Error,
        "RuntimeClass/nvidia",
        "runc",
    );
}

#[test]
fn webhook_absent_is_info_half_is_a_warning() {
    let mut s = healthy();
    s.mutating = None;
    s.validating = None;
    expect(&s, "webhook-not-installed", Severity::Info, "", "");
    assert_eq!(Report::from_findings(&s, run_all(&s)).exit_code(), 0);
    let mut s = healthy();
    s.validating = None;
    expect(
        &s,
        "webhook-not-installed",
        Severity::Warning,
        "ValidatingWebhookConfiguration",
        "",
    );
}

#[test]
fn webhook_without_endpoints_or_with_a_dead_url() {
    let mut s = healthy();
    s.endpoint_slices[0] = from(json!({
        "metadata": {"name": "x", "labels": {"kubernetes.io/service-name": webhook::NAME}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": false}}],
    }));
    s.deployments[0].status.as_mut().unwrap().available_replicas = Some(0);
    let f = expect(
        &s,
        "webhook-unreachable",
        Severity::Error,
        "Service/gpu-pilot/gpu-pilot-webhook",
        "no ready endpoints",
    );
    assert!(
        f.evidence.iter().any(|e| e.contains("0 of 1 replicas")),
        "{f:?}"
    );

    let mut s = healthy();
    let url = "https://127.0.0.1:1/validate/clusterpolicy";
    let mut v = webhook_config("v", webhook::VALIDATE_POLICY_WEBHOOK);
    v["webhooks"][0]["clientConfig"] = json!({"url": url});
    s.validating = Some(from(v));
    s.url_probes
        .insert(url.into(), Err("cannot connect to 127.0.0.1:1".into()));
    expect(
        &s,
        "webhook-unreachable",
        Severity::Error,
        "ValidatingWebhookConfiguration",
        "cannot connect",
    );
    // A URL target needs no caBundle (it may have a public certificate).
    assert!(found(&s, "webhook-ca-bundle-empty").is_empty());
}

#[test]
fn webhook_ca_bundle_empty() {
    let mut s = healthy();
    let mut m = webhook_config("m", webhook::MUTATE_PODS_WEBHOOK);
    m["webhooks"][0]["clientConfig"]
        .as_object_mut()
        .unwrap()
        .remove("caBundle");
    s.mutating = Some(from(m));
    expect(
        &s,
        "webhook-ca-bundle-empty",
        Severity::Error,
        "MutatingWebhookConfiguration",
        "",
    );
}

#[test]
fn webhook_certificate_expiring_or_expired() {
    let mut s = healthy();
    s.tls_secret
        .as_mut()
        .unwrap()
        .annotations
        .as_mut()
        .unwrap()
        .insert(webhook::CERT_NOT_AFTER.into(), ts(10 * 86400));
    let f = expect(
        &s,
        "webhook-cert-expiring",
        Severity::Warning,
        "Secret/gpu-pilot/gpu-pilot-webhook-tls",
        "",
    );
    assert!(f.title.contains("10 days"), "{}", f.title);
    s.tls_secret
        .as_mut()
        .unwrap()
        .annotations
        .as_mut()
        .unwrap()
        .insert(webhook::CA_NOT_AFTER.into(), ts(-86400));
    expect(&s, "webhook-cert-expiring", Severity::Error, "", "expired");
}

#[test]
fn failure_policy_ignore_is_info() {
    let mut s = healthy();
    let mut m = webhook_config("m", webhook::MUTATE_PODS_WEBHOOK);
    m["webhooks"][0]["failurePolicy"] = json!("Ignore");
    s.mutating = Some(from(m));
    expect(&s, "webhook-failure-policy-ignore", Severity::Info, "", "");
}

#[test]
fn entries_that_are_ignore_by_design_are_no_finding() {
    let mut s = healthy();
    s.mutating =
        Some(gpu_pilot_core::render::webhook::Registration::in_cluster("gpu-pilot").mutating());
    let found = crate::doctor::checks::run_all(&s);
    assert!(
        !found
            .iter()
            .any(|f| f.check == "webhook-failure-policy-ignore"),
        "{found:?}"
    );
}

#[test]
fn mig_failed_and_pending() {
    let mut s = healthy();
    set_label(
        &mut s,
        "gpu-a",
        label::MIG_CONFIG_STATE,
        Some(mig_config_state::FAILED),
    );
    set_label(&mut s, "gpu-a", label::MIG_CONFIG, Some("all-1g.10gb"));
    expect(
        &s,
        "mig-config-failed",
        Severity::Error,
        "Node/gpu-a",
        "all-1g.10gb",
    );

    let mut s = healthy();
    set_label(
        &mut s,
        "gpu-b",
        label::MIG_CONFIG_STATE,
        Some(mig_config_state::PENDING),
    );
    // A paused gate during a change is expected, not a gate-paused warning.
    set_label(
        &mut s,
        "gpu-b",
        &label::deploy_gate(Component::DevicePlugin),
        Some(gate_value::PAUSED_FOR_MIG_CHANGE),
    );
    expect(&s, "mig-config-pending", Severity::Info, "Node/gpu-b", "");
    assert!(found(&s, "gate-paused").is_empty());
    node_mut(&mut s, "gpu-b").metadata.managed_fields = Some(vec![from(json!({
        "manager": "gpu-pilot-agent", "operation": "Update", "time": ts(-3600), "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:labels": {(format!("f:{}", label::MIG_CONFIG_STATE)): {}}}},
    }))]);
    expect(
        &s,
        "mig-config-pending",
        Severity::Warning,
        "Node/gpu-b",
        "for 60 min",
    );
}

#[test]
fn gate_left_paused() {
    let mut s = healthy();
    set_label(
        &mut s,
        "gpu-c",
        &label::deploy_gate(Component::DevicePlugin),
        Some(gate_value::PAUSED_FOR_MIG_CHANGE),
    );
    expect(
        &s,
        "gate-paused",
        Severity::Warning,
        "Node/gpu-c",
        "paused-for-mig-change",
    );
}

fn pending_gpu_pod(name: &str, gpus: &str, message: &str) -> Pod {
    from(json!({
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": ts(-600)},
        "spec": {"containers": [{"name": "train", "image": "x",
                 "resources": {"limits": {(resource::GPU): gpus}}}],
                 "nodeSelector": {"pool": "h100"}},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                   "reason": "Unschedulable", "message": message}]},
    }))
}

#[test]
fn pending_gpu_pods_say_why() {
    let mut s = healthy();
    s.pending_pods.push(pending_gpu_pod(
        "big",
        "100",
        "0/4 nodes are available: 3 Insufficient nvidia.com/gpu, 1 node(s) didn't match Pod's node affinity/selector.",
    ));
    let f = expect(
        &s,
        "pending-gpu-pods",
        Severity::Warning,
        "Pod/ml/big",
        "Insufficient nvidia.com/gpu",
    );
    assert!(
        f.evidence
            .iter()
            .any(|e| e.contains("24 nvidia.com/gpu allocatable")),
        "{f:?}"
    );
    assert!(
        f.evidence
            .iter()
            .any(|e| e.contains("nodeSelector pool=h100 matches 0")),
        "{f:?}"
    );
    // Both causes get a fix.
    assert!(
        f.fix
            .contains("lower the pod's nvidia.com/gpu request to at most 8")
            && f.fix.contains("nodeSelector"),
        "{}",
        f.fix
    );
    // A pod asking for no GPU is not the doctor's business.
    let mut s = healthy();
    let mut p = pending_gpu_pod("cpu", "1", "whatever");
    p.spec.as_mut().unwrap().containers[0].resources = None;
    s.pending_pods.push(p);
    assert!(found(&s, "pending-gpu-pods").is_empty());
    // Taints.
    let mut s = healthy();
    s.pending_pods.push(pending_gpu_pod(
        "t",
        "1",
        "0/4 nodes are available: 3 node(s) had untolerated taint {dedicated: ml}.",
    ));
    let f = expect(&s, "pending-gpu-pods", Severity::Warning, "Pod/ml/t", "");
    assert!(f.fix.contains("toleration"), "{}", f.fix);
}

#[test]
fn driver_versions_differ() {
    let mut s = healthy();
    for n in GPU_NODES {
        set_label(&mut s, n, label::CUDA_DRIVER_FULL, Some("580.95.05"));
    }
    assert!(found(&s, "driver-version-skew").is_empty());
    set_label(&mut s, "gpu-c", label::CUDA_DRIVER_FULL, None);
    set_label(&mut s, "gpu-c", label::GPU_DRIVER_MAJOR, Some("550"));
    set_label(&mut s, "gpu-c", label::GPU_DRIVER_MINOR, Some("54"));
    set_label(&mut s, "gpu-c", label::GPU_DRIVER_REV, Some("15"));
    let f = expect(
        &s,
        "driver-version-skew",
        Severity::Warning,
        "Node/gpu-c",
        "550.54.15",
    );
    assert_eq!(f.objects, vec!["Node/gpu-c"]);
}

#[test]
fn not_ready_and_cordoned_gpu_nodes() {
    let mut s = healthy();
    node_mut(&mut s, "gpu-a")
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "False".into();
    expect(&s, "gpu-node-not-ready", Severity::Error, "Node/gpu-a", "");
    let mut s = healthy();
    node_mut(&mut s, "gpu-b")
        .spec
        .get_or_insert_default()
        .unschedulable = Some(true);
    let f = expect(&s, "gpu-node-cordoned", Severity::Warning, "Node/gpu-b", "");
    assert!(f.fix.contains("kubectl uncordon gpu-b"));
}

#[test]
fn taints_the_operands_do_not_tolerate() {
    let mut s = healthy();
    node_mut(&mut s, "gpu-a")
        .spec
        .get_or_insert_default()
        .taints = Some(vec![
        from(json!({"key": "nvidia.com/gpu", "effect": "NoSchedule"})),
        from(json!({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"})),
        from(json!({"key": "dedicated", "value": "ml", "effect": "NoSchedule"})),
    ]);
    let f = expect(
        &s,
        "taint-not-tolerated",
        Severity::Error,
        "Node/gpu-a",
        "dedicated=ml:NoSchedule",
    );
    assert!(
        !f.evidence[0].contains("nvidia.com/gpu:"),
        "the default toleration covers it: {f:?}"
    );
    assert!(!f.evidence[0].contains("unschedulable"), "{f:?}");
}

#[test]
fn unhealthy_gpus() {
    let mut s = healthy();
    node_mut(&mut s, "gpu-a")
        .status
        .as_mut()
        .unwrap()
        .allocatable
        .as_mut()
        .unwrap()
        .insert(
            resource::GPU.into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("6".into()),
        );
    expect(
        &s,
        "gpu-unhealthy",
        Severity::Warning,
        "Node/gpu-a",
        "2 unhealthy",
    );
}

#[test]
fn device_plugin_config_entries() {
    let mut s = healthy();
    set_label(&mut s, "gpu-a", label::DEVICE_PLUGIN_CONFIG, Some("a100"));
    expect(
        &s,
        "device-plugin-config-missing",
        Severity::Error,
        "Node/gpu-a",
        "names no device-plugin ConfigMap",
    );
    s.policies[0].spec.device_plugin.config.name = "dp-config".into();
    expect(
        &s,
        "policy-configmap-missing",
        Severity::Error,
        "ConfigMap/gpu-pilot/dp-config",
        "",
    );
    s.config_maps.push(from(json!({
        "metadata": {"name": "dp-config", "namespace": NS}, "data": {"a100": "version: v1", "t4": "version: v1"},
    })));
    assert!(found(&s, "device-plugin-config-missing").is_empty());
    assert!(found(&s, "policy-configmap-missing").is_empty());
    set_label(&mut s, "gpu-b", label::DEVICE_PLUGIN_CONFIG, Some("h100"));
    expect(
        &s,
        "device-plugin-config-missing",
        Severity::Error,
        "Node/gpu-b",
        "a100, t4",
    );
    s.policies[0].spec.device_plugin.config.default = "nope".into();
    expect(&s, "policy-configmap-missing", Severity::Error, "", "nope");
}

#[test]
fn opted_out_nodes_are_info() {
    let mut s = healthy();
    set_label(&mut s, "gpu-a", label::DEPLOY_OPERANDS, Some("false"));
    expect(&s, "operands-opted-out", Severity::Info, "Node/gpu-a", "");
}

#[test]
fn mig_strategy_disagreeing_with_the_policy() {
    let mut s = healthy();
    set_label(&mut s, "gpu-a", label::MIG_STRATEGY, Some("single"));
    assert!(found(&s, "mig-strategy-mismatch").is_empty());
    set_label(&mut s, "gpu-b", label::MIG_STRATEGY, Some("mixed"));
    expect(
        &s,
        "mig-strategy-mismatch",
        Severity::Warning,
        "Node/gpu-b",
        "mixed",
    );
}

#[test]
fn recent_warning_events_only() {
    let mut s = healthy();
    let ev = |age: i64| {
        from(json!({
            "metadata": {"name": format!("e{age}"), "namespace": NS},
            "type": "Warning", "reason": "FailedCreate", "message": "forbidden",
            "count": 3, "lastTimestamp": ts(-age),
            "involvedObject": {"kind": "DaemonSet", "name": "gpu-pilot-driver"},
        }))
    };
    s.events.push(ev(7200));
    assert!(found(&s, "warning-events").is_empty());
    s.events.push(ev(60));
    expect(
        &s,
        "warning-events",
        Severity::Info,
        "DaemonSet/gpu-pilot/gpu-pilot-driver",
        "3x FailedCreate",
    );
}

#[test]
fn unreadable_parts_are_reported() {
    let mut s = healthy();
    s.unreadable
        .push("reading Events in gpu-pilot: you are not allowed to".into());
    expect(
        &s,
        "doctor-incomplete",
        Severity::Warning,
        "",
        "not allowed",
    );
}

#[test]
fn many_objects_are_capped_and_counted() {
    let mut s = healthy();
    for i in 0..25 {
        let mut n: Node = from(gpu_node(&format!("extra-{i:02}")));
        n.spec.get_or_insert_default().unschedulable = Some(true);
        s.nodes.push(n);
    }
    let f = expect(&s, "gpu-node-cordoned", Severity::Warning, "extra-00", "");
    assert_eq!(f.objects.len(), super::MAX_OBJECTS);
    assert_eq!(f.more_objects, 25 - super::MAX_OBJECTS);
    let r = Report::from_findings(&s, run_all(&s));
    let t = super::table(&r, false);
    assert!(t.contains("and 20 more"), "{t}");
}

#[test]
fn report_schema_exit_codes_and_table() {
    let mut s = healthy();
    s.runtime_classes.clear();
    set_label(&mut s, "gpu-a", label::STAGE, Some("toolkit"));
    s.policies.push(from(policy("second", -60)));
    let mut r = Report::from_findings(&s, run_all(&s));
    r.requests = 17;
    assert_eq!(r.exit_code(), 2);
    assert!(
        r.findings
            .iter()
            .map(|f| f.severity)
            .collect::<Vec<_>>()
            .windows(2)
            .all(|w| w[0] <= w[1]),
        "errors first"
    );
    let v = serde_json::to_value(&r).unwrap();
    for key in [
        "apiVersion",
        "cluster",
        "kubernetesVersion",
        "namespace",
        "checks",
        "summary",
        "findings",
        "requests",
    ] {
        assert!(v.get(key).is_some(), "{key} missing from {v}");
    }
    assert_eq!(v["apiVersion"], super::REPORT_API_VERSION);
    assert_eq!(v["summary"]["errors"], 1);
    assert_eq!(v["summary"]["warnings"], 1);
    let f = &v["findings"][0];
    for key in [
        "check",
        "severity",
        "title",
        "objects",
        "moreObjects",
        "evidence",
        "fix",
    ] {
        assert!(f.get(key).is_some(), "{key} missing from {f}");
    }
    assert_eq!(f["severity"], "error");
    let t = super::table(&r, false);
    assert!(t.contains("ERRORS (1)") && t.contains("WARNINGS (1)") && t.contains("INFO"));
    assert!(t.contains("17 API requests"), "{t}");
    assert!(!t.contains('\x1b'), "no colour unless asked");
    assert!(super::table(&r, true).contains("\x1b[1;31m"));
    // Warnings only: exit 1.
    let mut s = healthy();
    s.policies.push(from(policy("second", -60)));
    assert_eq!(Report::from_findings(&s, run_all(&s)).exit_code(), 1);
}

#[test]
fn empty_snapshot_does_not_panic() {
    let s = Snapshot::default();
    let findings = run_all(&s);
    assert!(
        findings
            .iter()
            .any(|f| f.check == "gpu-pilot-not-installed")
    );
    let _ = super::table(&Report::from_findings(&s, findings), true);
}

#[tokio::test]
async fn an_unreachable_cluster_exits_2_and_a_bad_bundle_path_is_refused_first() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    // Nothing listens on port 1 of loopback.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: x}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
    )
    .unwrap();
    let g = crate::global::Global {
        kubeconfig: Some(kubeconfig),
        context: None,
        namespace: NS.into(),
        output: crate::ui::Output::Json,
        color: crate::ui::ColorChoice::Never,
    };
    let args = |bundle: Option<std::path::PathBuf>| super::DoctorArgs {
        bundle,
        list_checks: false,
    };
    assert_eq!(super::run(&g, args(None)).await.unwrap(), 2);
    // The bundle path is checked before the cluster is read: no folder, no bundle.
    let bad = dir.path().join("missing/b.tar.gz");
    assert_eq!(super::run(&g, args(Some(bad.clone()))).await.unwrap(), 2);
    assert!(!bad.exists());
    assert!(super::bundle::check_path(&bad).is_err());
    assert!(
        super::bundle::check_path(dir.path()).is_err(),
        "a folder is no file name"
    );
    assert!(super::bundle::check_path(&dir.path().join("b.tar.gz")).is_ok());
}
