//! The registry and the report over hand-built snapshots; each check's own tests sit beside it
//! under `checks/`.

use super::checks::testkit::*;

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
            !c.about.is_empty() && c.id.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
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

#[test]
fn checks_find_the_same_on_checked_nodes_and_pods() {
    use crate::doctor::snapshot::{checked_node, checked_pod};
    // Faults on nodes (cordon, taint, unhealthy GPUs, a stage reason) and pods (a crash loop,
    // a pending GPU pod with a selector), in objects that also carry what no check reads.
    let mut s = healthy();
    let extra = json!({
        "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {}}}],
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
    });
    for n in &mut s.nodes {
        let mut v = serde_json::to_value(&*n).unwrap();
        v["metadata"]["managedFields"] = extra["managedFields"].clone();
        v["status"]["images"] = json!([{"names": ["example/img:1"], "sizeBytes": 1}]);
        v["status"]["nodeInfo"] = json!({"kernelVersion": "6.1", "machineID": "", "systemUUID": "",
            "bootID": "", "osImage": "", "containerRuntimeVersion": "", "kubeletVersion": "",
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"});
        *n = from(v);
    }
    let a = node_mut(&mut s, "gpu-a");
    a.spec.get_or_insert_default().unschedulable = Some(true);
    a.status
        .as_mut()
        .unwrap()
        .allocatable
        .as_mut()
        .unwrap()
        .insert(
            resource::GPU.into(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("6".into()),
        );
    let b = node_mut(&mut s, "gpu-b");
    b.spec.get_or_insert_default().taints = Some(vec![from(
        json!({"key": "example.com/maintenance", "effect": "NoSchedule"}),
    )]);
    b.metadata.annotations.get_or_insert_default().insert(
        annotation::STAGE_REASON.into(),
        "driver: waiting for the pod".into(),
    );
    // A MIG change pending for an hour: told by the managedFields entry that wrote its state.
    set_label(
        &mut s,
        "gpu-c",
        label::MIG_CONFIG_STATE,
        Some(mig_config_state::PENDING),
    );
    node_mut(&mut s, "gpu-c").metadata.managed_fields = Some(vec![
        from(extra["managedFields"][0].clone()),
        from(json!({
            "manager": "gpu-pilot-agent", "operation": "Update", "time": ts(-3600), "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {(format!("f:{}", label::MIG_CONFIG_STATE)): {}}}},
        })),
    ]);
    let mut crashing = serde_json::to_value(&s.pods[0]).unwrap();
    crashing["spec"]["volumes"] = json!([{"name": "host", "hostPath": {"path": "/"}}]);
    crashing["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "b"}]);
    crashing["status"]["conditions"] = json!([{"type": "Ready", "status": "False"}]);
    crashing["status"]["containerStatuses"][0]["state"] =
        json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}});
    crashing["status"]["containerStatuses"][0]["restartCount"] = json!(4);
    s.pods[0] = from(crashing);
    s.pending_pods.push(from(json!({
        "metadata": {"name": "train", "namespace": "ml", "creationTimestamp": ts(-600)},
        "spec": {"nodeSelector": {"pool": "h100"}, "containers": [{"name": "main",
            "resources": {"limits": {(resource::GPU): "2"}}, "env": [{"name": "A", "value": "b"}]}]},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."}]},
    })));
    let whole = run_all(&s);
    assert!(whole.len() >= 5, "{whole:?}");
    assert!(
        whole
            .iter()
            .any(|f| f.check == "mig-config-pending" && f.severity == Severity::Warning),
        "{whole:?}"
    );

    let mut checked = s.clone();
    checked.nodes = s.nodes.iter().cloned().map(checked_node).collect();
    checked.pods = s.pods.iter().cloned().map(checked_pod).collect();
    checked.pending_pods = s.pending_pods.iter().cloned().map(checked_pod).collect();
    assert_eq!(run_all(&checked), whole);

    let n = serde_json::to_value(&checked.nodes[0]).unwrap();
    assert!(n["metadata"].get("managedFields").is_none(), "{n}");
    let c = serde_json::to_value(&checked.nodes[2]).unwrap();
    assert_eq!(c["metadata"]["managedFields"].as_array().unwrap().len(), 1);
    assert!(n["status"].get("images").is_none() && n["status"].get("nodeInfo").is_none());
    let p = serde_json::to_value(&checked.pods[0]).unwrap();
    assert!(p["spec"].get("volumes").is_none() && p["spec"]["containers"][0].get("env").is_none());
    assert!(
        p["metadata"]["annotations"]
            .get("kubectl.kubernetes.io/last-applied-configuration")
            .is_none()
    );
}
