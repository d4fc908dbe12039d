use crate::doctor::checks::testkit::*;

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
