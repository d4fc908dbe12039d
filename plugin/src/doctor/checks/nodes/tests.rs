use crate::doctor::checks::testkit::*;

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
