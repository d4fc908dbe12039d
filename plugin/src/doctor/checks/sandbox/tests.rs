use k8s_openapi::api::core::v1::Event;

use crate::doctor::checks::testkit::*;
use crate::doctor::snapshot::checked_event;

/// Events as the kubelet records them (`kubectl get events -o json`): two of a GPU pod whose
/// RuntimeClass names a handler containerd lacks (the message as containerd 2.4 on the real node
/// gave it in realnode::doctor_names_a_pod_whose_runtime_handler_containerd_lacks, moved to the
/// tests' clock and names), one of a CPU pod whose network cannot be set up, one of a pod that has
/// started since.
fn recorded() -> Vec<Event> {
    serde_json::from_str(include_str!("events.json")).unwrap()
}

fn pending(
    ns: &str,
    name: &str,
    uid: &str,
    node: &str,
    gpus: Option<&str>,
    rc: Option<&str>,
) -> Pod {
    let mut p = json!({
        "metadata": {"name": name, "namespace": ns, "uid": uid, "creationTimestamp": ts(-600)},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Pending", "containerStatuses": [{"name": "main", "image": "x", "imageID": "",
                   "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]},
    });
    if let Some(g) = gpus {
        p["spec"]["containers"][0]["resources"] = json!({"limits": {(resource::GPU): g}});
    }
    if let Some(rc) = rc {
        p["spec"]["runtimeClassName"] = json!(rc);
    }
    from(p)
}

fn with_events() -> Snapshot {
    let mut s = healthy();
    s.sandbox_events = recorded().into_iter().map(checked_event).collect();
    s
}

#[test]
fn a_gpu_pod_whose_runtime_handler_containerd_lacks_is_an_error_naming_pod_node_and_cause() {
    let mut s = with_events();
    s.pending_pods.push(pending(
        "ml",
        "train-7f9c",
        "9a3c1f44-7b0e-4d2a-8c55-61e2f0b7a913",
        "gpu-a",
        Some("1"),
        Some("nvidia"),
    ));
    let f = expect(
        &s,
        "pod-sandbox-failed",
        Severity::Error,
        "Pod/ml/train-7f9c",
        "no runtime for \"nvidia\" is configured",
    );
    assert!(f.objects.contains(&"Node/gpu-a".to_string()), "{f:#?}");
    assert!(
        f.title.contains("1 pod stuck") && f.title.contains("no runtime handler \"nvidia\""),
        "{}",
        f.title
    );
    // Both events of the pod count, and the latest is shown.
    assert!(
        f.evidence.iter().any(|e| e.contains(
            "on node gpu-a (runtimeClassName nvidia): 22x FailedCreatePodSandBox, last 20s ago"
        )),
        "{f:#?}"
    );
    // The policy's runtime class: the toolkit's job.
    assert!(
        f.fix.contains("toolkit") && f.fix.contains("nvidia-ctk runtime configure"),
        "{}",
        f.fix
    );
    // Only the pod still Pending counts: done-1 started since, web-5b8d is not in the snapshot.
    assert_eq!(found(&s, "pod-sandbox-failed").len(), 1);
}

#[test]
fn another_runtime_class_gets_the_containerd_fix() {
    let mut s = with_events();
    s.pending_pods.push(pending(
        "ml",
        "train-7f9c",
        "9a3c1f44-7b0e-4d2a-8c55-61e2f0b7a913",
        "gpu-a",
        None,
        Some("nvidia-experimental"),
    ));
    let f = expect(
        &s,
        "pod-sandbox-failed",
        Severity::Error,
        "Pod/ml/train-7f9c",
        "RuntimeClass nvidia-experimental sends these pods to the runtime handler \"nvidia\"",
    );
    assert!(
        f.fix
            .contains("containerd.runtimes.nvidia]) and restart containerd"),
        "{}",
        f.fix
    );
}

#[test]
fn a_cpu_pods_network_failure_is_a_warning() {
    let mut s = with_events();
    s.pending_pods.push(pending(
        "shop",
        "web-5b8d",
        "0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f",
        "cpu-1",
        None,
        None,
    ));
    let f = expect(
        &s,
        "pod-sandbox-failed",
        Severity::Warning,
        "Pod/shop/web-5b8d",
        "no IP addresses available",
    );
    assert!(f.title.contains("pod network"), "{}", f.title);
    assert!(f.fix.contains("CNI"), "{}", f.fix);
}

#[test]
fn a_pod_made_again_under_the_same_name_is_not_blamed_for_the_old_ones_events() {
    let mut s = with_events();
    s.pending_pods.push(pending(
        "ml",
        "train-7f9c",
        "another-uid",
        "gpu-a",
        Some("1"),
        Some("nvidia"),
    ));
    assert!(found(&s, "pod-sandbox-failed").is_empty());
    // And with no sandbox events at all, nothing.
    let mut s = healthy();
    s.pending_pods
        .push(pending("ml", "p", "u", "gpu-a", Some("1"), None));
    assert!(found(&s, "pod-sandbox-failed").is_empty());
}

#[test]
fn the_snapshot_keeps_only_what_the_check_reads() {
    let mut e = recorded().remove(0);
    e.message = Some(format!("{}{}", e.message.unwrap(), "x".repeat(5000)));
    let kept = checked_event(e);
    assert!(kept.metadata.managed_fields.is_none() && kept.metadata.uid.is_none());
    assert!(kept.involved_object.resource_version.is_none());
    assert_eq!(kept.message.as_ref().unwrap().chars().count(), 1000);
    assert_eq!(kept.count, Some(19));
    assert_eq!(
        kept.source.as_ref().and_then(|s| s.host.as_deref()),
        Some("gpu-a")
    );
}
