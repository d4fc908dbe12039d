//! The foundation: the CRD in a real apiserver, its defaults and schema rules, fake GPU nodes that
//! run pods, and the real kubectl.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use gpu_pilot_api::names::label;
use gpu_pilot_api::{ClusterPolicy, ClusterPolicySpec};
use gpu_pilot_e2e::{Cluster, TestEnv, eventually, node_names};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::TestFn;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        ("foundation::crd_installs_and_is_established", |c| {
            Box::pin(crd_installs(c))
        }),
        (
            "foundation::empty_policy_is_accepted_and_fully_defaulted",
            |c| Box::pin(policy_defaulted(c)),
        ),
        (
            "foundation::full_image_references_and_digests_are_accepted",
            |c| Box::pin(image_forms_accepted(c)),
        ),
        (
            "foundation::invalid_policies_are_rejected_naming_the_field",
            |c| Box::pin(invalid_policies_rejected(c)),
        ),
        ("foundation::daemonset_runs_on_gpu_nodes_only", |c| {
            Box::pin(daemonset_on_gpu_nodes(c))
        }),
        ("foundation::real_kubectl_lists_the_fake_nodes", |c| {
            Box::pin(kubectl_lists_nodes(c))
        }),
    ]
}

pub(crate) use gpu_pilot_e2e::ensure_crd;

async fn crd_installs(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "crd").await?;
    ensure_crd(&env.client).await?;
    let crd = Api::<CustomResourceDefinition>::all(env.client.clone())
        .get("clusterpolicies.gpupilot.io")
        .await?;
    ensure!(crd.spec.scope == "Cluster", "scope is {}", crd.spec.scope);
    let version = &crd.spec.versions[0];
    ensure!(version.name == "v1alpha1" && version.storage && version.served);
    ensure!(
        version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some(),
        "the status subresource is not enabled"
    );
    let columns: Vec<&str> = version
        .additional_printer_columns
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    ensure!(
        columns == ["State", "GPU-Nodes", "Ready-Nodes", "MIG", "Age"],
        "printer columns: {columns:?}"
    );
    // The apiserver accepted the schema as structural: no NonStructuralSchema condition.
    let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
    ensure!(
        !conditions
            .iter()
            .any(|c| c.type_ == "NonStructuralSchema" && c.status == "True"),
        "the apiserver says the schema is not structural: {conditions:?}"
    );
    // Discovery finds it under its short name and category, as `kubectl get gpupolicy` needs.
    let out = cluster
        .kubectl()
        .args(["api-resources", "--api-group=gpupilot.io", "-o", "wide"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("gpupolicy") && text.contains("gpu-pilot"),
        "kubectl api-resources: {text}"
    );
    env.cleanup().await;
    Ok(())
}

fn policy(name: &str, spec: Value) -> anyhow::Result<ClusterPolicy> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "gpupilot.io/v1alpha1",
        "kind": "ClusterPolicy",
        "metadata": { "name": name },
        "spec": spec,
    }))?)
}

/// Sends the object as raw JSON so fields the Rust types would refuse (wrong types, unknown enum
/// values) reach the apiserver as a user's YAML would.
async fn create_raw(
    client: &Client,
    name: &str,
    spec: Value,
    dry_run: bool,
) -> Result<Value, kube::Error> {
    let api: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<ClusterPolicy>(&()),
    );
    let obj: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gpupilot.io/v1alpha1",
        "kind": "ClusterPolicy",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a DynamicObject from JSON");
    let pp = PostParams {
        dry_run,
        ..Default::default()
    };
    api.create(&pp, &obj)
        .await
        .map(|o| serde_json::to_value(o).unwrap())
}

async fn policy_defaulted(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "defaults").await?;
    ensure_crd(&env.client).await?;
    let api: Api<ClusterPolicy> = Api::all(env.client.clone());
    let name = format!("defaults-{}", env.namespace);
    let created = api
        .create(&PostParams::default(), &policy(&name, json!({}))?)
        .await?;
    let stored = api.get(&name).await?;
    api.delete(&name, &DeleteParams::default()).await?;

    // The apiserver filled in every default from the schema, and they are the Rust defaults.
    ensure!(
        stored.spec == ClusterPolicySpec::default(),
        "stored spec differs from ClusterPolicySpec::default():\nstored:  {:?}\ndefault: {:?}",
        stored.spec,
        ClusterPolicySpec::default()
    );
    ensure!(created.spec == stored.spec);
    // Spot-check what an admin expects, in the raw stored JSON.
    let raw = serde_json::to_value(&stored.spec)?;
    let expect = [
        ("/operator/runtimeClass", json!("nvidia")),
        ("/mig/strategy", json!("single")),
        ("/driver/enabled", json!(true)),
        ("/driver/repository", json!("nvcr.io/nvidia")),
        ("/driver/imagePullPolicy", json!("IfNotPresent")),
        ("/toolkit/image", json!("container-toolkit")),
        ("/devicePlugin/image", json!("gpu-pilot-agent")),
        ("/migManager/config/default", json!("all-disabled")),
        (
            "/daemonsets/priorityClassName",
            json!("system-node-critical"),
        ),
        ("/daemonsets/tolerations/0/key", json!("nvidia.com/gpu")),
        ("/daemonsets/updateStrategy", json!("RollingUpdate")),
        ("/hostPaths/rootFS", json!("/")),
        ("/cdi/enabled", json!(false)),
    ];
    for (path, want) in expect {
        let got = raw.pointer(path);
        ensure!(got == Some(&want), "spec{path}: got {got:?}, want {want}");
    }

    // A partial component keeps what the user set and gets the rest defaulted.
    let name2 = format!("partial-{}", env.namespace);
    let partial = create_raw(
        &env.client,
        &name2,
        json!({"driver": {"enabled": false}, "mig": {"strategy": "mixed"}}),
        true,
    )
    .await?;
    ensure!(partial.pointer("/spec/driver/enabled") == Some(&json!(false)));
    ensure!(partial.pointer("/spec/driver/version") == Some(&json!("580.95.05")));
    ensure!(partial.pointer("/spec/mig/strategy") == Some(&json!("mixed")));
    env.cleanup().await;
    Ok(())
}

async fn image_forms_accepted(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "image-forms").await?;
    ensure_crd(&env.client).await?;
    let digest = format!("sha256:{}", "ab".repeat(32));
    let cases = [
        (
            "full reference with tag",
            json!({"driver": {"repository": "", "image": "registry.example.com/nvidia/driver:550.127.08", "version": ""}}),
        ),
        ("digest as version", json!({"toolkit": {"version": digest}})),
        (
            "full reference with digest",
            json!({"gfd": {"image": format!("registry.example.com/gfd@{digest}"), "version": ""}}),
        ),
        (
            "disabled component without image",
            json!({"dcgmExporter": {"enabled": false, "image": ""}}),
        ),
        (
            "percentage maxUnavailable",
            json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": "25%"}}}),
        ),
    ];
    for (i, (what, spec)) in cases.into_iter().enumerate() {
        create_raw(&env.client, &format!("ok-{i}"), spec, true)
            .await
            .with_context(|| format!("a valid policy ({what}) was rejected"))?;
    }
    env.cleanup().await;
    Ok(())
}

async fn invalid_policies_rejected(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "invalid").await?;
    ensure_crd(&env.client).await?;
    // (what, spec, the field the message must name, a phrase the message must contain)
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "unknown MIG strategy",
            json!({"mig": {"strategy": "dynamic"}}),
            "spec.mig.strategy",
            "Unsupported value: \"dynamic\"",
        ),
        (
            "unknown pull policy",
            json!({"driver": {"imagePullPolicy": "Sometimes"}}),
            "spec.driver.imagePullPolicy",
            "Unsupported value",
        ),
        (
            "unknown update strategy",
            json!({"daemonsets": {"updateStrategy": "Sideways"}}),
            "spec.daemonsets.updateStrategy",
            "Unsupported value",
        ),
        (
            "version that is not a tag",
            json!({"driver": {"version": "580 beta!"}}),
            "spec.driver.version",
            "version must be an image tag",
        ),
        (
            "truncated digest",
            json!({"devicePlugin": {"version": "sha256:abc"}}),
            "spec.devicePlugin.version",
            "version must be an image tag",
        ),
        (
            "enabled component without image",
            json!({"toolkit": {"image": ""}}),
            "spec.toolkit.image",
            "an enabled component needs an image",
        ),
        (
            "image without repository",
            json!({"dcgmExporter": {"repository": "", "image": "dcgm-exporter"}}),
            "spec.dcgmExporter.image",
            "an enabled component needs an image",
        ),
        (
            "config default without name",
            json!({"devicePlugin": {"config": {"default": "a100"}}}),
            "spec.devicePlugin.config.name",
            "set config.name too",
        ),
        (
            "invalid ConfigMap name",
            json!({"migManager": {"config": {"name": "My Config"}}}),
            "spec.migManager.config.name",
            "must be a ConfigMap name",
        ),
        (
            "invalid runtime class",
            json!({"operator": {"runtimeClass": "Nvidia_GPU"}}),
            "spec.operator.runtimeClass",
            "must be a valid RuntimeClass name",
        ),
        (
            "relative rootFS",
            json!({"hostPaths": {"rootFS": "host"}}),
            "spec.hostPaths.rootFS",
            "must be an absolute path",
        ),
        (
            "zero maxUnavailable",
            json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": "0"}}}),
            "spec.daemonsets.rollingUpdate.maxUnavailable",
            "maxUnavailable must be",
        ),
        (
            "boolean as string",
            json!({"driver": {"enabled": "yes"}}),
            "spec.driver.enabled",
            "must be of type boolean",
        ),
        (
            "env entry without name",
            json!({"gfd": {"env": [{"value": "x"}]}}),
            "spec.gfd.env[0].name",
            "Required value",
        ),
        (
            "unknown kernel module type",
            json!({"driver": {"kernelModuleType": "closed"}}),
            "spec.driver.kernelModuleType",
            "Unsupported value",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (what, spec, field, phrase)) in cases.iter().enumerate() {
        match create_raw(&env.client, &format!("bad-{i}"), spec.clone(), true).await {
            Ok(_) => failures.push(format!("{what}: accepted, should be rejected")),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 {
                    failures.push(format!(
                        "{what}: HTTP {} instead of 422: {}",
                        status.code, status.message
                    ));
                } else if !status.message.contains(field) || !status.message.contains(phrase) {
                    failures.push(format!(
                        "{what}: message does not name {field} with '{phrase}': {}",
                        status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{what}: unexpected error {e}")),
        }
    }
    env.cleanup().await;
    if !failures.is_empty() {
        bail!(
            "{} of {} invalid policies were not rejected as expected:\n  {}",
            failures.len(),
            cases.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

async fn daemonset_on_gpu_nodes(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "daemonset").await?;
    let gpu_nodes: BTreeSet<String> = node_names(&env.client, true).await?.into_iter().collect();
    let cpu_nodes: BTreeSet<String> = node_names(&env.client, false).await?.into_iter().collect();
    ensure!(
        !gpu_nodes.is_empty() && !cpu_nodes.is_empty(),
        "the cluster needs GPU and CPU nodes: {gpu_nodes:?} {cpu_nodes:?}"
    );

    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": { "name": "gpu-only" },
        "spec": {
            "selector": { "matchLabels": { "app": "gpu-only" } },
            "template": {
                "metadata": { "labels": { "app": "gpu-only" } },
                "spec": {
                    "nodeSelector": { (label::NFD_PCI_10DE): "true" },
                    "containers": [{ "name": "pause", "image": "registry.k8s.io/pause:3.10" }]
                }
            }
        }
    }))?;
    let dss: Api<DaemonSet> = Api::namespaced(env.client.clone(), &env.namespace);
    dss.create(&PostParams::default(), &ds).await?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    let want = gpu_nodes.len();
    let running: BTreeSet<String> = eventually(
        "a Running pod on every GPU node",
        Duration::from_secs(90),
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app=gpu-only"))
                    .await?;
                let on: BTreeSet<String> = list
                    .items
                    .iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                    .collect();
                Ok(if on.len() >= want {
                    Ok(on)
                } else {
                    Err(format!("{} of {want} running: {on:?}", on.len()))
                })
            }
        },
    )
    .await?;
    ensure!(
        running == gpu_nodes,
        "pods run on {running:?}, GPU nodes are {gpu_nodes:?}"
    );
    let all = pods
        .list(&ListParams::default().labels("app=gpu-only"))
        .await?;
    for p in &all.items {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        ensure!(
            !cpu_nodes.contains(&node),
            "pod {:?} landed on CPU node {node}",
            p.metadata.name
        );
    }
    ensure!(
        all.items.len() == want,
        "{} pods for {want} GPU nodes",
        all.items.len()
    );
    let status = eventually(
        "DaemonSet status counts every GPU node ready",
        Duration::from_secs(30),
        || {
            let dss = dss.clone();
            async move {
                let s = dss.get("gpu-only").await?.status.unwrap_or_default();
                Ok(if s.number_ready as usize == want {
                    Ok(s)
                } else {
                    Err(format!("{s:?}"))
                })
            }
        },
    )
    .await?;
    ensure!(status.desired_number_scheduled as usize == want);
    env.cleanup().await;
    Ok(())
}

async fn kubectl_lists_nodes(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "kubectl").await?;
    let gpu_nodes = node_names(&env.client, true).await?;
    let out = cluster
        .kubectl()
        .args(["get", "nodes", "-l", &format!("{}=true", label::NFD_PCI_10DE), "-o", "custom-columns=NAME:.metadata.name,GPUS:.status.capacity.nvidia\\.com/gpu,INVENTORY:.metadata.labels.gpupilot\\.io/simulated-inventory,READY:.status.conditions[?(@.type==\"Ready\")].status"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = text.lines().skip(1).collect();
    ensure!(
        rows.len() == gpu_nodes.len(),
        "kubectl listed {} GPU nodes, the API has {}:\n{text}",
        rows.len(),
        gpu_nodes.len()
    );
    for row in rows {
        let cols: Vec<&str> = row.split_whitespace().collect();
        ensure!(cols.len() == 4, "unexpected row {row:?}");
        let gpus: u32 = cols[1]
            .parse()
            .with_context(|| format!("GPU count in {row:?}"))?;
        let expected = match cols[2] {
            "dgx-h100" => 8,
            "a100-40gb" => 4,
            "t4" => 1,
            other => bail!("unknown simulated inventory {other:?} in {row:?}"),
        };
        ensure!(
            gpus == expected,
            "{row:?}: {gpus} GPUs, the inventory has {expected}"
        );
        ensure!(cols[3] == "True", "node not Ready: {row:?}");
    }
    // The kubectl is the one built with the control plane: same minor version.
    let out = cluster.kubectl().args(["version", "-o", "json"]).output()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["clientVersion"]["minor"] == v["serverVersion"]["minor"],
        "kubectl and apiserver differ: {v}"
    );
    ensure!(
        v["serverVersion"]["gitVersion"] == "v1.37.2",
        "server is {}",
        v["serverVersion"]["gitVersion"]
    );
    env.cleanup().await;
    Ok(())
}
