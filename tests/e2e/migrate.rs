//! `kubectl gpu migrate` against NVIDIA's GPU Operator built from its own Go module
//! (`scripts/nvidia-gpu-operator`): installed with the real `helm install` of NVIDIA's chart, its
//! operator running as a process (its Deployment's pod on a kwok node stands in for it: the pod
//! carries a finalizer the test removes only once the process has stopped, so "the pod is gone"
//! means "the operator is gone", as on a real node), GPU pods running on every GPU node
//! throughout. gpu-pilot's controller runs in the test process.
//!
//! What must hold: the report and `-o yaml` carry NVIDIA's settings (its driver version, MIG
//! strategy, the device-plugin config its release created); `--dry-run` changes nothing;
//! `--apply` leaves NVIDIA's operator at 0 replicas and none of its DaemonSets, gpu-pilot's
//! policy ready on every GPU node, NVIDIA's driver pods running on (same UIDs) under gpu-pilot's
//! driver DaemonSet, every other operand pod gpu-pilot's, never more than one GPU node at a time
//! without a Ready device plugin, and every GPU pod exactly as it was (same UID, Running, never
//! terminating, no restart).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::label;
use gpu_pilot_api::policy::PolicyState;
use gpu_pilot_e2e::controller::RunningController;
use gpu_pilot_e2e::nvidia::gpu_operator_module;
use gpu_pilot_e2e::{Cluster, build_tools, eventually, node_names, plugin_binary, repo_root};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::TestFn;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![(
        "migrate::takes_nvidias_gpu_operator_over_with_gpu_pods_running",
        |_| Box::pin(takeover()),
    )]
}

const NS: &str = "gpu-operator";
const GPU_NODES: usize = 3;
const FINALIZER: &str = "gpupilot.io/e2e-operator-process";
const DRIVER_VERSION: &str = "570.172.08";

fn script() -> PathBuf {
    repo_root().join("scripts/nvidia-gpu-operator")
}

async fn run(cmd: &mut tokio::process::Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("could not run {what}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{what} failed:\n{text}");
    Ok(text)
}

fn kubectl_gpu(kubeconfig: &Path) -> anyhow::Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(plugin_binary()?);
    cmd.env("KUBECONFIG", kubeconfig).env("NO_COLOR", "1");
    Ok(cmd)
}

/// NVIDIA's chart installed with the real helm, some values of an admin's own.
async fn helm_install_nvidia(cluster: &Cluster, home: &Path) -> anyhow::Result<()> {
    let tools = build_tools()?;
    let chart = gpu_operator_module()?.join("deployments/gpu-operator");
    let mut cmd = tokio::process::Command::new(tools.join("helm"));
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", cluster.kubeconfig())
        .args(["install", "gpu-operator"])
        .arg(&chart)
        .args(["--namespace", NS, "--create-namespace", "--no-hooks"])
        // The fake nodes carry NFD's labels; NFD's own images cannot run here.
        .args(["--set", "nfd.enabled=false"])
        .args(["--set", &format!("driver.version={DRIVER_VERSION}")])
        .args(["--set", "mig.strategy=mixed"])
        .args(["--set", "devicePlugin.config.create=true"])
        .args(["--set", "devicePlugin.config.name=time-slicing"])
        .args(["--set", "devicePlugin.config.default=any"])
        .args([
            "--set-json",
            r#"devicePlugin.config.data={"any":"version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 2\n"}"#,
        ]);
    run(&mut cmd, "helm install of NVIDIA's chart").await?;
    Ok(())
}

/// The operator Deployment's pod, which stands in for the operator process.
async fn operator_pods(client: &Client) -> anyhow::Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels("app=gpu-operator"))
        .await?
        .items)
}

/// Stops the operator process when its Deployment is scaled to 0, then lets its pod go.
async fn stand_in(client: Client, dir: PathBuf) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    loop {
        let d = deployments.get("gpu-operator").await?;
        if d.spec.replicas == Some(0) {
            run(
                tokio::process::Command::new(script())
                    .args(["stop", "--dir"])
                    .arg(&dir),
                "scripts/nvidia-gpu-operator stop",
            )
            .await?;
            let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
            for p in operator_pods(&client).await? {
                let finalizers: Vec<String> = p
                    .finalizers()
                    .iter()
                    .filter(|f| f.as_str() != FINALIZER)
                    .cloned()
                    .collect();
                pods.patch(
                    &p.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"metadata": {"finalizers": finalizers}})),
                )
                .await?;
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the watcher saw while the takeover ran.
#[derive(Default)]
struct Seen {
    /// GPU pods seen terminating, or gone.
    disturbed: BTreeSet<String>,
    /// The most GPU nodes at once without a Ready device plugin (NVIDIA's or gpu-pilot's).
    max_nodes_without_plugin: usize,
    samples: usize,
}

async fn watch(
    client: Client,
    gpu_pods: BTreeMap<String, String>,
    nodes: Vec<String>,
    seen: Arc<Mutex<Seen>>,
) {
    let all: Api<Pod> = Api::all(client.clone());
    loop {
        if let Ok(list) = all.list(&ListParams::default()).await {
            let mut s = seen.lock().unwrap();
            s.samples += 1;
            let by_name: BTreeMap<String, &Pod> = list
                .items
                .iter()
                .map(|p| {
                    (
                        format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()),
                        p,
                    )
                })
                .collect();
            for (name, uid) in &gpu_pods {
                match by_name.get(name) {
                    Some(p)
                        if p.uid().as_deref() == Some(uid.as_str())
                            && p.metadata.deletion_timestamp.is_none() => {}
                    _ => {
                        s.disturbed.insert(name.clone());
                    }
                }
            }
            let without = nodes
                .iter()
                .filter(|n| {
                    !list.items.iter().any(|p| {
                        let l = p.labels();
                        let plugin = l.get("app").map(String::as_str)
                            == Some("nvidia-device-plugin-daemonset")
                            || l.get(label::COMPONENT).map(String::as_str) == Some("device-plugin");
                        plugin
                            && p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                                == Some(n.as_str())
                            && p.metadata.deletion_timestamp.is_none()
                            && gpu_pilot_core::facts::PodFacts::from_pod(p)
                                .map(|f| f.ready)
                                .unwrap_or_else(|| ready(p))
                    })
                })
                .count();
            s.max_nodes_without_plugin = s.max_nodes_without_plugin.max(without);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn takeover() -> anyhow::Result<()> {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(|| Cluster::start_named("migrate", GPU_NODES, 1, false))
            .await??,
    );
    let work = tempfile::tempdir()?;
    let operator_dir = work.path().join("nvidia");
    let result = takeover_steps(&cluster, work.path(), &operator_dir).await;
    // The operator process, whatever happened.
    let _ = std::process::Command::new(script())
        .args(["stop", "--dir"])
        .arg(&operator_dir)
        .output();
    result
}

async fn takeover_steps(
    cluster: &Arc<Cluster>,
    work: &Path,
    operator_dir: &Path,
) -> anyhow::Result<()> {
    let client = cluster.client().await?;
    let kubeconfig = cluster.kubeconfig().to_path_buf();

    // NVIDIA's GPU Operator, as its chart installs it, running.
    helm_install_nvidia(cluster, &work.join("helm")).await?;
    let op_pod = eventually(
        "the operator Deployment's pod",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move {
                let pods = operator_pods(&client).await?;
                Ok(pods.into_iter().next().ok_or_else(|| "not yet".to_string()))
            }
        },
    )
    .await?;
    Api::<Pod>::namespaced(client.clone(), NS)
        .patch(
            &op_pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"finalizers": [FINALIZER]}})),
        )
        .await?;
    run(
        tokio::process::Command::new(script())
            .args(["start", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--namespace", NS, "--dir"])
            .arg(operator_dir)
            .args(["--", "--leader-elect=false"]),
        "scripts/nvidia-gpu-operator start",
    )
    .await?;
    let stand_in_task = tokio::spawn(stand_in(client.clone(), operator_dir.to_path_buf()));
    run(
        tokio::process::Command::new(script())
            .args(["wait-ready", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--namespace", NS, "--timeout", "600"]),
        "scripts/nvidia-gpu-operator wait-ready",
    )
    .await?;

    // GPU pods on every GPU node, as workloads would be.
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "ml"}}))?,
        )
        .await?;
    let gpu_nodes = node_names(&client, true).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ml");
    for (i, node) in gpu_nodes.iter().enumerate() {
        for j in 0..2 {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("train-{i}-{j}")},
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "c", "image": "cuda:fake",
                                    "resources": {"limits": {"nvidia.com/gpu": 1}}}],
                },
            }))?;
            pods.create(&PostParams::default(), &pod).await?;
        }
    }
    let gpu_pods: BTreeMap<String, String> =
        eventually("GPU pods Running", Duration::from_secs(60), || {
            let pods = pods.clone();
            async move {
                let list = pods.list(&ListParams::default()).await?.items;
                if list.len() == 2 * GPU_NODES && list.iter().all(ready) {
                    Ok(Ok(list
                        .iter()
                        .map(|p| (format!("ml/{}", p.name_any()), p.uid().unwrap_or_default()))
                        .collect()))
                } else {
                    Ok(Err("not all Ready".to_string()))
                }
            }
        })
        .await?;
    let driver_pods_before: BTreeSet<String> = Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels("app=nvidia-driver-daemonset"))
        .await?
        .items
        .iter()
        .filter_map(|p| p.uid())
        .collect();
    ensure!(
        driver_pods_before.len() == GPU_NODES,
        "NVIDIA's driver pods: {driver_pods_before:?}"
    );

    // The report: NVIDIA's settings as gpu-pilot values.
    let yaml = run(
        kubectl_gpu(&kubeconfig)?.args(["migrate", "-o", "yaml"]),
        "kubectl gpu migrate -o yaml",
    )
    .await?;
    let values: Value = serde_yaml::from_str(&yaml)?;
    ensure!(
        values["driver"]["version"] == json!(DRIVER_VERSION)
            && values["mig"]["strategy"] == json!("mixed")
            && values["devicePlugin"]["config"]["name"] == json!("time-slicing")
            && values["devicePlugin"].get("image").is_none(),
        "the migrated values do not carry NVIDIA's settings:\n{yaml}"
    );
    let report = run(
        kubectl_gpu(&kubeconfig)?.args(["migrate", "--dry-run"]),
        "kubectl gpu migrate --dry-run",
    )
    .await?;
    ensure!(
        report.contains("Helm release gpu-operator/gpu-operator")
            && report.contains("NVIDIA's k8s-device-plugin is replaced by gpu-pilot's agent")
            && report.contains("propagationPolicy=Orphan")
            && report.contains(&format!("({} GPU pods running)", 2)),
        "the dry run misses parts of the plan:\n{report}"
    );
    // A dry run changed nothing.
    let d = Api::<Deployment>::namespaced(client.clone(), NS)
        .get("gpu-operator")
        .await?;
    ensure!(
        d.spec.replicas == Some(1),
        "the dry run scaled NVIDIA's operator"
    );

    // The takeover, with GPU pods watched all along.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watcher = tokio::spawn(watch(
        client.clone(),
        gpu_pods.clone(),
        gpu_nodes.clone(),
        seen.clone(),
    ));
    let ctrl = RunningController::start(&kubeconfig, NS, "e2e-migrate", false);
    let applied = run(
        kubectl_gpu(&kubeconfig)?.args([
            "migrate",
            "--apply",
            "--timeout",
            "5m",
            // The webhook's own tests cover it; here only the controller runs (in this process).
            "--set",
            "webhook.enabled=false",
        ]),
        "kubectl gpu migrate --apply",
    )
    .await;
    watcher.abort();
    tokio::task::spawn_blocking(move || ctrl.stop()).await?;
    let applied = applied?;
    eprintln!("{applied}");
    stand_in_task.await??;

    // NVIDIA's operator is down and its DaemonSets are gone.
    let d = Api::<Deployment>::namespaced(client.clone(), NS)
        .get("gpu-operator")
        .await?;
    ensure!(
        d.spec.replicas == Some(0),
        "NVIDIA's operator still has replicas"
    );
    let ds = Api::<DaemonSet>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await?;
    let names: Vec<String> = ds.items.iter().map(|d| d.name_any()).collect();
    ensure!(
        names.iter().all(|n| n.starts_with("gpu-pilot-")),
        "DaemonSets left in {NS}: {names:?}"
    );
    // gpu-pilot's policy is ready on every GPU node.
    let policy = Api::<ClusterPolicy>::all(client.clone())
        .get("cluster-policy")
        .await?;
    let st = policy.status.clone().unwrap_or_default();
    ensure!(
        st.state == Some(PolicyState::Ready) && st.gpu_nodes == GPU_NODES as i32,
        "gpu-pilot's policy: {:?}",
        policy.status
    );
    ensure!(
        policy.spec.driver.version == DRIVER_VERSION,
        "the driver version changed"
    );
    // NVIDIA's driver pods run on, adopted; every other operand pod is gpu-pilot's own.
    let operands = Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await?;
    for p in &operands.items {
        let owner = p
            .owner_references()
            .iter()
            .find(|r| r.controller == Some(true))
            .map(|r| r.name.clone());
        let app = p.labels().get("app").cloned().unwrap_or_default();
        if app == "gpu-operator" {
            continue;
        }
        if app == "nvidia-driver-daemonset" {
            ensure!(
                driver_pods_before.contains(&p.uid().unwrap_or_default())
                    && owner.as_deref() == Some("gpu-pilot-driver"),
                "driver pod {} is not NVIDIA's, adopted: owner {owner:?}",
                p.name_any()
            );
        } else {
            ensure!(
                app.is_empty()
                    && owner
                        .as_deref()
                        .is_some_and(|o| o.starts_with("gpu-pilot-")),
                "operand pod {} ({app}) is not gpu-pilot's own: owner {owner:?}",
                p.name_any()
            );
        }
    }
    let adopted = operands
        .items
        .iter()
        .filter(|p| driver_pods_before.contains(&p.uid().unwrap_or_default()))
        .count();
    ensure!(
        adopted == GPU_NODES,
        "{adopted} of NVIDIA's driver pods kept"
    );
    // Objects gpu-pilot uses are no longer NVIDIA's ClusterPolicy's to take away.
    let rc = Api::<RuntimeClass>::all(client.clone())
        .get("nvidia")
        .await?;
    ensure!(
        rc.owner_references()
            .iter()
            .all(|r| r.api_version != "nvidia.com/v1"),
        "RuntimeClass nvidia still owned by NVIDIA's policy: {:?}",
        rc.owner_references()
    );

    // Not one GPU pod disturbed; never more than one node at a time without a device plugin.
    let (samples, disturbed, max_without) = {
        let s = seen.lock().unwrap();
        (s.samples, s.disturbed.clone(), s.max_nodes_without_plugin)
    };
    ensure!(samples > 10, "the watcher took only {samples} samples");
    ensure!(disturbed.is_empty(), "GPU pods disturbed: {disturbed:?}");
    ensure!(
        max_without <= 1,
        "{max_without} GPU nodes at once had no Ready device plugin"
    );
    let after = pods.list(&ListParams::default()).await?.items;
    for p in &after {
        let name = format!("ml/{}", p.name_any());
        let restarts: i32 = p
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
            .map(|c| c.restart_count)
            .sum();
        ensure!(
            gpu_pods.get(&name) == p.uid().as_ref() && ready(p) && restarts == 0,
            "GPU pod {name} changed during the takeover"
        );
    }
    eprintln!(
        "migrate: {} GPU pods undisturbed over {} samples; at most {} node(s) at once without a Ready device plugin; {} driver pods adopted",
        after.len(),
        samples,
        max_without,
        adopted
    );
    Ok(())
}
