use crate::doctor::checks::testkit::*;

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
