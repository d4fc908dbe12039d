use crate::doctor::checks::testkit::*;

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
