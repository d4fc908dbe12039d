//! gpu-pilot on a real node: a cluster of its own with one node run by a real kubelet v1.37.2,
//! containerd 2.4, runc, the CNI plugins and kube-proxy (`scripts/local-cluster up --real-nodes
//! 1`, which needs root), gpu-pilot's images built by `scripts/images` and pulled by that
//! containerd from the cluster's registry. Only the GPUs are simulated (the agent's inventory
//! `a100-40gb`, named by the node's label).
//!
//! - the images: reproducible, labelled, non-root where they should be, tagged as install expects;
//! - `kubectl gpu install`: controller and webhook as Deployments on the node, the apiserver
//!   calling the webhook through its Service, the agent's DaemonSets in containers, a GPU pod
//!   mutated, admitted after Allocate and run; the doctor healthy; uninstall leaves the node clean;
//! - the agent's pod killed, then the kubelet restarted: the device plugin registers again and GPU
//!   pods run again;
//! - containerd restarted: running pods keep running, new ones start;
//! - the kubelet and containerd restarted while every GPU is in use: each pod keeps its GPU, the
//!   kubelet hands none out twice (a pod bound to the full node is refused), a freed one goes to
//!   the next pod;
//! - a GPU pod whose RuntimeClass names a handler the node's containerd lacks: the kubelet's
//!   FailedCreatePodSandBox, and `kubectl gpu doctor` naming the pod, the node and the cause;
//! - the Helm chart with the same images, and plain `helm uninstall` leaving nothing of
//!   gpu-pilot's and everything of others'.
//!
//! The scenarios share the node and gpu-pilot's one installation, so they run one at a time.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use gpu_pilot_agent::backend::{GpuBackend, SimulatedBackend};
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{DEFAULT_POLICY_NAME, label};
use gpu_pilot_api::policy::{PolicyState, VERSION};
use gpu_pilot_e2e::{Cluster, eventually, repo_root};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Node, Pod, Secret};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::TestFn;
use gpu_pilot_e2e::tools::{cargo_target_dir, helm, run_ok, shown, tools_with};

const NODE: &str = "real-node-1";
/// The inventory `scripts/local-cluster` gives real nodes (and scripts/lib/real-node-values.yaml).
const INVENTORY: &str = "a100-40gb";
const NS: &str = "gpu-pilot";
/// The sections of the values whose images gpu-pilot builds.
const IMAGE_SECTIONS: [&str; 6] = [
    "operator",
    "webhook",
    "devicePlugin",
    "gfd",
    "migManager",
    "validator",
];

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "realnode::images_are_reproducible_labelled_and_tagged_as_install_expects",
            |_| Box::pin(images_reproducible()),
        ),
        (
            "realnode::install_runs_gpu_pilot_in_containers_and_a_gpu_pod_gets_a_gpu",
            |_| Box::pin(serial(install_path)),
        ),
        (
            "realnode::agent_pod_killed_and_kubelet_restarted_the_gpus_come_back",
            |_| Box::pin(serial(agent_and_kubelet_restarts)),
        ),
        (
            "realnode::containerd_restarted_running_pods_keep_running",
            |_| Box::pin(serial(containerd_restart)),
        ),
        (
            "realnode::kubelet_and_containerd_restarted_under_gpu_load_no_gpu_handed_out_twice",
            |_| Box::pin(serial(restarts_under_gpu_load)),
        ),
        (
            "realnode::doctor_names_a_pod_whose_runtime_handler_containerd_lacks",
            |_| Box::pin(serial(doctor_sandbox_failure)),
        ),
        ("realnode::helm_chart_with_the_same_images", |_| {
            Box::pin(serial(helm_chart))
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Fixture: the cluster, and the images in its registry
// ---------------------------------------------------------------------------------------------

static CLUSTER: Mutex<Option<Arc<Cluster>>> = Mutex::new(None);
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cluster() -> anyhow::Result<Arc<Cluster>> {
    let mut c = CLUSTER.lock().unwrap();
    if c.is_none() {
        let started = Cluster::start_with_real_nodes("realnode", 0, 0, 1, false).context(
            "the real-node tests need root and the packages of the README's set-up table \
             (iptables, runc): scripts/local-cluster up --real-nodes 1 failed",
        )?;
        *c = Some(Arc::new(started));
    }
    Ok(c.as_ref().unwrap().clone())
}

/// Stops the real-node cluster (called once all tests ran).
pub fn shutdown() {
    CLUSTER.lock().unwrap().take();
}

/// One line of `scripts/images` output: name, where it went, index digest.
#[derive(Clone, Debug)]
struct Built {
    name: String,
    place: String,
    digest: String,
}

/// `scripts/images ARGS` with this test run's target directory (debug binaries), without the
/// CARGO_* variables cargo test sets (cargo would see them as changed inputs and rebuild).
fn scripts_images(args: &[&str]) -> anyhow::Result<Vec<Built>> {
    let mut cmd = std::process::Command::new(repo_root().join("scripts/images"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            cmd.env_remove(k);
        }
    }
    let target = cargo_target_dir()?;
    let out = cmd
        .arg("--target-dir")
        .arg(&target)
        .args(args)
        .output()
        .context("could not run scripts/images")?;
    ensure!(
        out.status.success(),
        "scripts/images {} failed:\n{}",
        args.join(" "),
        shown(&out)
    );
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [name, place, digest] => Ok(Built {
                    name: name.to_string(),
                    place: place.to_string(),
                    digest: digest.to_string(),
                }),
                _ => bail!("unexpected line from scripts/images: {l:?}"),
            }
        })
        .collect()
}

/// What the scenarios install from: the registry, and the sample workload's image.
struct Images {
    registry: String,
    busybox: String,
}

static IMAGES: OnceLock<Result<Arc<Images>, String>> = OnceLock::new();

/// Builds gpu-pilot's images (debug binaries) and busybox once per run, and pushes them to the
/// real-node cluster's registry, tagged v<version> as `kubectl gpu install` expects.
fn images(cluster: &Cluster) -> anyhow::Result<Arc<Images>> {
    IMAGES
        .get_or_init(|| {
            (|| -> anyhow::Result<Arc<Images>> {
                let out = cluster.local_cluster("registry", &[]).output()?;
                ensure!(out.status.success(), "no registry: {}", shown(&out));
                let registry = String::from_utf8(out.stdout)?.trim().to_string();
                let dir = cluster.dir().join("images");
                let dir = dir.to_string_lossy();
                let repo = format!("{registry}/gpu-pilot");
                scripts_images(&["--debug", "--out", &dir, "--push", &repo])?;
                let busybox = scripts_images(&["busybox", "--out", &dir, "--push", &registry])?;
                Ok(Arc::new(Images {
                    registry,
                    busybox: busybox[0].place.clone(),
                }))
            })()
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

struct Env {
    cluster: Arc<Cluster>,
    client: Client,
    images: Arc<Images>,
}

/// Runs `f` alone on the real-node cluster, with gpu-pilot not installed.
async fn serial<F, Fut>(f: F) -> anyhow::Result<()>
where
    F: FnOnce(Env) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let _turn = SERIAL.lock().await;
    let cluster = tokio::task::spawn_blocking(cluster).await??;
    let c = cluster.clone();
    let images = tokio::task::spawn_blocking(move || images(&c)).await??;
    let client = cluster.client().await?;
    let env = Env {
        cluster,
        client,
        images,
    };
    // A scenario that failed half-way leaves gpu-pilot installed: start from a clean node.
    if installed(&env.client).await? {
        let out = kubectl_gpu(&env, &["uninstall", "--force", "--timeout", "2m"]).await?;
        ensure!(
            out.status.success(),
            "cleaning up after an earlier scenario: kubectl gpu uninstall failed:\n{}",
            shown(&out)
        );
        eventually(
            "gpu-pilot's namespace and CRD gone",
            Duration::from_secs(180),
            || async {
                Ok(if installed(&env.client).await? {
                    Err("still there".to_string())
                } else {
                    Ok(())
                })
            },
        )
        .await?;
    }
    let cluster = env.cluster.clone();
    match f(env).await {
        Ok(()) => Ok(()),
        Err(e) => bail!("{e:#}\n\n{}", diagnostics(&cluster).await),
    }
}

/// What the node ran when a scenario failed: pods, gpu-pilot's Warning events, and the last log
/// lines of its controller and webhook.
async fn diagnostics(cluster: &Cluster) -> String {
    let mut out = String::from("on the real-node cluster at the failure:\n");
    for args in [
        vec!["get", "pods", "-A", "-o", "wide"],
        vec![
            "get",
            "events",
            "-n",
            NS,
            "--field-selector",
            "type=Warning",
        ],
        vec![
            "logs",
            "-n",
            NS,
            "deploy/gpu-pilot-controller",
            "--tail",
            "30",
        ],
        vec!["logs", "-n", NS, "deploy/gpu-pilot-webhook", "--tail", "10"],
    ] {
        let mut cmd = cluster.kubectl();
        cmd.args(&args);
        match tokio::process::Command::from(cmd).output().await {
            Ok(o) => out.push_str(&format!("$ kubectl {}\n{}\n", args.join(" "), shown(&o))),
            Err(e) => out.push_str(&format!("$ kubectl {}: {e}\n", args.join(" "))),
        }
    }
    out
}

async fn installed(client: &Client) -> anyhow::Result<bool> {
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt("clusterpolicies.gpupilot.io")
        .await?;
    let ns = Api::<Namespace>::all(client.clone()).get_opt(NS).await?;
    Ok(crd.is_some() || ns.is_some())
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// `kubectl gpu ARGS` through the real kubectl, the plugin on PATH.
async fn kubectl_gpu(env: &Env, args: &[&str]) -> anyhow::Result<Output> {
    let plugin = gpu_pilot_e2e::plugin_binary()?;
    let plugin_dir = plugin.parent().context("the plugin has a directory")?;
    let mut cmd = env.cluster.kubectl();
    let path = std::env::join_paths([plugin_dir.to_path_buf()].into_iter().chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    cmd.env("PATH", path)
        .arg("gpu")
        .arg("-n")
        .arg(NS)
        .args(args);
    tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .output()
        .await
        .context("running kubectl gpu")
}

/// The values every install here uses: the committed file, and the cluster's registry.
fn values_args(env: &Env) -> Vec<String> {
    let mut args = vec![
        "-f".to_string(),
        repo_root()
            .join("scripts/lib/real-node-values.yaml")
            .to_string_lossy()
            .into_owned(),
    ];
    for section in IMAGE_SECTIONS {
        args.push("--set".into());
        args.push(format!(
            "{section}.repository={}/gpu-pilot",
            env.images.registry
        ));
    }
    args
}

async fn install(env: &Env) -> anyhow::Result<()> {
    let mut args = vec!["install", "--wait", "--timeout", "5m"];
    let values = values_args(env);
    args.extend(values.iter().map(String::as_str));
    let out = kubectl_gpu(env, &args).await?;
    ensure!(
        out.status.success(),
        "kubectl gpu install failed:\n{}",
        shown(&out)
    );
    Ok(())
}

/// A command inside the real node (all its namespaces).
async fn node_exec(env: &Env, command: &str) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::from(
        env.cluster
            .local_cluster("node-exec", &[NODE, "--", "sh", "-c", command]),
    );
    let out = cmd.kill_on_drop(true).output().await?;
    ensure!(
        out.status.success(),
        "in {NODE}: {command}: {}",
        shown(&out)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The PID (inside the node) of one of the node's services, and its start time, which changes
/// when the node's supervisor starts it again.
async fn service_instance(env: &Env, service: &str) -> anyhow::Result<String> {
    let out = node_exec(
        env,
        &format!("p=$(cat /run/gpu-pilot/{service}.pid) && kill -0 $p && echo $p $(cut -d' ' -f22 /proc/$p/stat)"),
    )
    .await?;
    Ok(out.trim().to_string())
}

/// Stops a service of the node; the node starts it again a second later, as systemd would.
async fn restart_service(env: &Env, service: &str) -> anyhow::Result<()> {
    let before = service_instance(env, service).await?;
    node_exec(env, &format!("kill $(cat /run/gpu-pilot/{service}.pid)")).await?;
    eventually(
        &format!("{service} running again"),
        Duration::from_secs(60),
        || async {
            Ok(match service_instance(env, service).await {
                Ok(now) if now != before => Ok(()),
                Ok(now) => Err(format!("still {now}")),
                Err(e) => Err(format!("{e:#}")),
            })
        },
    )
    .await
}

/// How many device-plugin registrations the node's kubelets logged so far (all its starts).
async fn registrations(env: &Env) -> anyhow::Result<usize> {
    let out = node_exec(
        env,
        "grep -c 'Got registration request from device plugin' /var/log/gpu-pilot/kubelet.log || true",
    )
    .await?;
    Ok(out.trim().parse().unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

async fn node(client: &Client) -> anyhow::Result<Node> {
    Ok(Api::<Node>::all(client.clone()).get(NODE).await?)
}

fn allocatable_gpus(n: &Node) -> Option<String> {
    n.status
        .as_ref()?
        .allocatable
        .as_ref()?
        .get("nvidia.com/gpu")
        .map(|q| q.0.clone())
}

async fn wait_allocatable(client: &Client, want: &str) -> anyhow::Result<()> {
    eventually(
        &format!("{NODE} allocatable nvidia.com/gpu = {want}"),
        Duration::from_secs(120),
        || async {
            let n = node(client).await?;
            let have = allocatable_gpus(&n);
            Ok(if have.as_deref() == Some(want) {
                Ok(())
            } else {
                Err(format!("{have:?}"))
            })
        },
    )
    .await
}

async fn wait_policy_ready(client: &Client) -> anyhow::Result<()> {
    eventually(
        "the ClusterPolicy ready",
        Duration::from_secs(300),
        || async {
            let p = Api::<ClusterPolicy>::all(client.clone())
                .get_opt(DEFAULT_POLICY_NAME)
                .await?;
            Ok(match p.and_then(|p| p.status) {
                Some(s) if s.state == Some(PolicyState::Ready) => Ok(()),
                s => Err(format!("{s:?}")),
            })
        },
    )
    .await
}

/// The pods of a workload in gpu-pilot's namespace, by the label the chart and install give it.
async fn pods_of(client: &Client, name: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), NS)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/name={name}")))
        .await?
        .items)
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Every Deployment and DaemonSet of gpu-pilot runs in containers on the real node: Ready pods
/// there, with a pod address from the node's network, started from the registry's images. (The
/// policy turns ready as the last gates are set, a moment before their DaemonSets' pods start.)
async fn check_gpu_pilot_runs_on_the_node(env: &Env) -> anyhow::Result<()> {
    eventually(
        "gpu-pilot's pods Ready on the real node",
        Duration::from_secs(180),
        || async {
            Ok(gpu_pilot_pods_on_the_node(env)
                .await
                .map_err(|e| format!("{e:#}")))
        },
    )
    .await
}

async fn gpu_pilot_pods_on_the_node(env: &Env) -> anyhow::Result<()> {
    let client = &env.client;
    let mut workloads: Vec<String> = Api::<Deployment>::namespaced(client.clone(), NS)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|d| d.name_any())
        .collect();
    ensure!(
        workloads.contains(&"gpu-pilot-controller".to_string())
            && workloads.contains(&"gpu-pilot-webhook".to_string()),
        "Deployments: {workloads:?}"
    );
    workloads.extend(
        Api::<DaemonSet>::namespaced(client.clone(), NS)
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|d| d.name_any()),
    );
    for w in &workloads {
        let pods = pods_of(client, w).await?;
        ensure!(!pods.is_empty(), "{w} has no pods");
        for p in &pods {
            let spec = p.spec.as_ref().context("a pod spec")?;
            let status = p.status.as_ref().context("a pod status")?;
            ensure!(
                spec.node_name.as_deref() == Some(NODE) && ready(p),
                "{}: node {:?}, ready {}",
                p.name_any(),
                spec.node_name,
                ready(p)
            );
            let ip = status.pod_ip.clone().unwrap_or_default();
            ensure!(
                ip.starts_with("10.") && !ip.starts_with("10.244."),
                "{} has the address {ip:?}, not one of the real node's pods",
                p.name_any()
            );
            for c in status.container_statuses.iter().flatten() {
                ensure!(
                    c.image.starts_with(&env.images.registry)
                        && c.container_id
                            .as_deref()
                            .is_some_and(|id| id.starts_with("containerd://")),
                    "{}/{}: image {}, container {:?}",
                    p.name_any(),
                    c.name,
                    c.image,
                    c.container_id
                );
            }
        }
    }
    Ok(())
}

/// The GPU UUIDs of the node's simulated inventory.
fn inventory_uuids() -> anyhow::Result<Vec<String>> {
    let backend = SimulatedBackend::open(INVENTORY)?;
    Ok(backend
        .inventory()?
        .gpus
        .into_iter()
        .map(|g| g.uuid)
        .collect())
}

/// Creates a GPU pod with kubectl in `default`, waits until it ran, checks what the webhook
/// made of it, and returns the GPU its log names.
async fn run_gpu_pod(env: &Env, name: &str) -> anyhow::Result<String> {
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"gpupilot.io/real-node": "true"},
            "containers": [{
                "name": "cuda",
                "image": env.images.busybox,
                "command": ["sh", "-c", "echo \"GPU: $NVIDIA_VISIBLE_DEVICES\""],
                "resources": {"limits": {"nvidia.com/gpu": 1}}
            }]
        }
    });
    let mut apply = env.cluster.kubectl();
    apply.args(["apply", "-f", "-"]);
    let mut child = tokio::process::Command::from(apply)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().context("kubectl's stdin")?;
        stdin.write_all(manifest.to_string().as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    ensure!(
        out.status.success(),
        "kubectl apply {name}: {}",
        shown(&out)
    );
    let pods = Api::<Pod>::namespaced(env.client.clone(), "default");
    let pod = eventually(
        &format!("pod {name} Succeeded"),
        Duration::from_secs(180),
        || async {
            let p = pods.get(name).await?;
            let phase = p.status.as_ref().and_then(|s| s.phase.clone());
            Ok(match phase.as_deref() {
                Some("Succeeded") => Ok(p),
                Some("Failed") => return Err(anyhow::anyhow!("pod {name} failed: {:?}", p.status)),
                other => Err(format!("phase {other:?}")),
            })
        },
    )
    .await?;
    // The in-cluster webhook's mutation: the policy's runtime class and the GPU toleration.
    let spec = pod.spec.as_ref().context("a pod spec")?;
    ensure!(
        spec.runtime_class_name.as_deref() == Some("runc"),
        "{name}: runtimeClassName {:?}, not the policy's (the webhook did not mutate it)",
        spec.runtime_class_name
    );
    ensure!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.key.as_deref() == Some("nvidia.com/gpu")),
        "{name}: no nvidia.com/gpu toleration"
    );
    let log = pods.logs(name, &Default::default()).await?;
    let gpu = log
        .trim()
        .strip_prefix("GPU: ")
        .with_context(|| format!("{name} logged {log:?}"))?
        .to_string();
    let uuids = inventory_uuids()?;
    ensure!(
        uuids.contains(&gpu),
        "{name} was given {gpu:?}, not one of the node's GPUs {uuids:?}"
    );
    pods.delete(name, &DeleteParams::default()).await?;
    Ok(gpu)
}

async fn check_doctor_healthy(env: &Env) -> anyhow::Result<()> {
    let out = kubectl_gpu(env, &["doctor", "-o", "json"]).await?;
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("doctor's JSON:\n{}", shown(&out)))?;
    let bad: Vec<&Value> = report["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["severity"] != "info")
        .collect();
    ensure!(
        out.status.success() && bad.is_empty(),
        "kubectl gpu doctor (exit {:?}) found: {bad:#?}",
        out.status.code()
    );
    Ok(())
}

/// After an uninstall: no gpu-pilot object, pod, container, label or GPU left on the node.
async fn check_node_clean(env: &Env) -> anyhow::Result<()> {
    let client = &env.client;
    eventually(
        "gpu-pilot's namespace gone",
        Duration::from_secs(120),
        || async {
            Ok(
                match Api::<Namespace>::all(client.clone()).get_opt(NS).await? {
                    None => Ok(()),
                    Some(_) => Err("still there".to_string()),
                },
            )
        },
    )
    .await?;
    let n = node(client).await?;
    let left: Vec<String> = n
        .labels()
        .keys()
        .chain(n.annotations().keys())
        .filter(|k| {
            (k.starts_with("nvidia.com/") || k.starts_with("gpupilot.io/"))
                && *k != label::SIMULATED_INVENTORY
                && *k != "gpupilot.io/real-node"
        })
        .cloned()
        .collect();
    ensure!(left.is_empty(), "left on {NODE}: {left:?}");
    // The kubelet drops the device plugin's GPUs from allocatable once its socket is gone.
    wait_allocatable(client, "0").await?;
    // And containerd runs nothing of gpu-pilot's any more.
    eventually(
        "no gpu-pilot containers on the node",
        Duration::from_secs(60),
        || async {
            let ls = node_exec(env, "ctr -n k8s.io containers ls -q").await?;
            let info = node_exec(
                env,
                "for c in $(ctr -n k8s.io containers ls -q); do ctr -n k8s.io containers info $c | grep -c '\"io.kubernetes.pod.namespace\": \"gpu-pilot\"' || true; done",
            )
            .await?;
            let count: usize = info.lines().filter_map(|l| l.trim().parse::<usize>().ok()).sum();
            Ok(if count == 0 {
                Ok(())
            } else {
                Err(format!("{count} of {} containers", ls.lines().count()))
            })
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

async fn images_reproducible() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(|| {
        let a = tempfile::tempdir()?;
        let b = tempfile::tempdir()?;
        let first = scripts_images(&["--debug", "--out", &a.path().to_string_lossy()])?;
        let second = scripts_images(&["--debug", "--out", &b.path().to_string_lossy()])?;
        let names: Vec<&str> = first.iter().map(|i| i.name.as_str()).collect();
        ensure!(
            names
                == [
                    "gpu-pilot-controller",
                    "gpu-pilot-webhook",
                    "gpu-pilot-agent"
                ],
            "built {names:?}"
        );
        for (x, y) in first.iter().zip(&second) {
            ensure!(
                x.digest == y.digest,
                "{}: two builds gave {} and {}",
                x.name,
                x.digest,
                y.digest
            );
            check_layout(Path::new(&x.place), &x.name)?;
        }
        Ok(())
    })
    .await?
}

/// One image's OCI layout: tagged v<version> (the tag `kubectl gpu install` and the chart use),
/// a linux/amd64 image with the OCI labels, non-root for the controller and the webhook.
fn check_layout(dir: &Path, name: &str) -> anyhow::Result<()> {
    let blob = |digest: &str| -> anyhow::Result<Value> {
        let path: PathBuf = dir.join("blobs/sha256").join(
            digest
                .strip_prefix("sha256:")
                .with_context(|| format!("digest {digest}"))?,
        );
        Ok(serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?)
    };
    let top: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let entry = &top["manifests"][0];
    let tag = format!("v{VERSION}");
    ensure!(
        entry["annotations"]["org.opencontainers.image.ref.name"] == tag.as_str(),
        "{name} is tagged {}, install uses {tag}",
        entry["annotations"]["org.opencontainers.image.ref.name"]
    );
    let index = blob(entry["digest"].as_str().context("index digest")?)?;
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!("{}/{}", m["platform"]["os"], m["platform"]["architecture"]).replace('"', "")
        })
        .collect();
    ensure!(
        platforms.contains(&"linux/amd64".to_string()),
        "{name}: platforms {platforms:?}"
    );
    let manifest = blob(
        index["manifests"][0]["digest"]
            .as_str()
            .context("manifest")?,
    )?;
    let config = blob(manifest["config"]["digest"].as_str().context("config")?)?;
    let labels = &config["config"]["Labels"];
    for key in ["source", "version", "revision", "created"] {
        ensure!(
            labels[format!("org.opencontainers.image.{key}")].is_string(),
            "{name}: no org.opencontainers.image.{key} label in {labels}"
        );
    }
    ensure!(
        labels["org.opencontainers.image.version"] == tag.as_str(),
        "{name}: version label {}",
        labels["org.opencontainers.image.version"]
    );
    let user = config["config"]["User"].as_str().unwrap_or("");
    let want = if name == "gpu-pilot-agent" {
        "0:0"
    } else {
        "65532:65532"
    };
    ensure!(user == want, "{name} runs as {user:?}, not {want}");
    let created = config["created"].as_str().unwrap_or("");
    ensure!(
        labels["org.opencontainers.image.created"] == created,
        "{name}: created {created} and its label differ"
    );
    Ok(())
}

async fn install_path(env: Env) -> anyhow::Result<()> {
    install(&env).await?;
    wait_policy_ready(&env.client).await?;
    check_gpu_pilot_runs_on_the_node(&env).await?;
    // The webhook is called by the apiserver through its Service (no URL registration).
    let mutating: Value = serde_json::from_slice(
        &env.cluster
            .kubectl()
            .args([
                "get",
                "mutatingwebhookconfiguration",
                "gpu-pilot-webhook",
                "-o",
                "json",
            ])
            .output()?
            .stdout,
    )?;
    for w in mutating["webhooks"].as_array().into_iter().flatten() {
        ensure!(
            w["clientConfig"]["service"]["name"] == "gpu-pilot-webhook"
                && w["clientConfig"]["url"].is_null(),
            "webhook {} is not called through its Service: {}",
            w["name"],
            w["clientConfig"]
        );
    }
    wait_allocatable(&env.client, "4").await?;
    run_gpu_pod(&env, "gpu-pod-install").await?;
    check_doctor_healthy(&env).await?;
    let out = kubectl_gpu(&env, &["uninstall"]).await?;
    ensure!(
        out.status.success(),
        "kubectl gpu uninstall:\n{}",
        shown(&out)
    );
    check_node_clean(&env).await
}

async fn agent_and_kubelet_restarts(env: Env) -> anyhow::Result<()> {
    install(&env).await?;
    wait_policy_ready(&env.client).await?;
    wait_allocatable(&env.client, "4").await?;
    run_gpu_pod(&env, "gpu-pod-before").await?;

    // The agent's device-plugin pod killed: the DaemonSet starts another, which registers with
    // the kubelet again; a GPU pod needs its Allocate to start.
    let first = registrations(&env).await?;
    ensure!(
        first >= 1,
        "the kubelet never logged the device plugin's registration"
    );
    let pods = Api::<Pod>::namespaced(env.client.clone(), NS);
    let old = pods_of(&env.client, "gpu-pilot-device-plugin").await?;
    let old_uid = old.first().and_then(|p| p.metadata.uid.clone());
    for p in &old {
        pods.delete(&p.name_any(), &DeleteParams::default().grace_period(0))
            .await?;
    }
    eventually(
        "a new device-plugin pod Ready",
        Duration::from_secs(120),
        || async {
            let now = pods_of(&env.client, "gpu-pilot-device-plugin").await?;
            Ok(match now.first() {
                Some(p) if p.metadata.uid != old_uid && ready(p) => Ok(()),
                _ => Err(format!("{} pods, none new and Ready", now.len())),
            })
        },
    )
    .await?;
    wait_allocatable(&env.client, "4").await?;
    run_gpu_pod(&env, "gpu-pod-after-agent").await?;
    let second = registrations(&env).await?;
    ensure!(
        second > first,
        "no new registration in the kubelet's log after the agent's pod was replaced ({first} then {second})"
    );

    // The kubelet restarted (kubelet.sock made anew, plugin sockets wiped): the agent sees it and
    // registers again.
    restart_service(&env, "kubelet").await?;
    eventually("the node Ready again", Duration::from_secs(120), || async {
        let n = node(&env.client).await?;
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Ok(if ready {
            Ok(())
        } else {
            Err("NotReady".to_string())
        })
    })
    .await?;
    wait_allocatable(&env.client, "4").await?;
    run_gpu_pod(&env, "gpu-pod-after-kubelet").await?;
    let third = registrations(&env).await?;
    ensure!(
        third > second,
        "the restarted kubelet logged no registration of the device plugin ({second} then {third})"
    );

    let out = kubectl_gpu(&env, &["uninstall"]).await?;
    ensure!(
        out.status.success(),
        "kubectl gpu uninstall:\n{}",
        shown(&out)
    );
    check_node_clean(&env).await
}

async fn containerd_restart(env: Env) -> anyhow::Result<()> {
    install(&env).await?;
    wait_policy_ready(&env.client).await?;
    // A workload that serves HTTP, reached from the host throughout.
    let pods = Api::<Pod>::namespaced(env.client.clone(), "default");
    let server: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "nodeSelector": {"gpupilot.io/real-node": "true"},
            "containers": [{
                "name": "web",
                "image": env.images.busybox,
                "command": ["sh", "-c", "mkdir -p /www && echo up > /www/index.html && exec httpd -f -p 8080 -h /www"],
            }]
        }
    }))?;
    let _ = pods
        .delete("web", &DeleteParams::default().grace_period(0))
        .await;
    eventually("no old web pod", Duration::from_secs(60), || async {
        Ok(match pods.get_opt("web").await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await?;
    pods.create(&PostParams::default(), &server).await?;
    let ip = eventually("web Ready", Duration::from_secs(120), || async {
        let p = pods.get("web").await?;
        Ok(match p.status.as_ref().and_then(|s| s.pod_ip.clone()) {
            Some(ip) if ready(&p) => Ok(ip),
            _ => Err("not yet".to_string()),
        })
    })
    .await?;
    let fetch = |ip: String| async move {
        let out = tokio::process::Command::new("curl")
            .args(["-sf", "-m", "3", &format!("http://{ip}:8080/")])
            .output()
            .await?;
        anyhow::Ok(out.status.success() && out.stdout == b"up\n")
    };
    ensure!(
        fetch(ip.clone()).await?,
        "the host cannot reach web at {ip}"
    );

    // Every container of the node now, by pod, with its ID and restart count.
    let snapshot = || async {
        let mut all: Vec<(String, String, i32)> = Vec::new();
        for ns in ["default", NS] {
            for p in Api::<Pod>::namespaced(env.client.clone(), ns)
                .list(&ListParams::default())
                .await?
                .items
            {
                for c in p
                    .status
                    .iter()
                    .flat_map(|s| s.container_statuses.iter().flatten())
                {
                    all.push((
                        format!("{ns}/{}/{}", p.name_any(), c.name),
                        c.container_id.clone().unwrap_or_default(),
                        c.restart_count,
                    ));
                }
            }
        }
        all.sort();
        anyhow::Ok(all)
    };
    let before = snapshot().await?;
    let task_pids = node_exec(&env, "ctr -n k8s.io tasks ls -q | sort").await?;

    restart_service(&env, "containerd").await?;
    // While containerd was away and after: the workload answered, its process is the same.
    ensure!(
        fetch(ip.clone()).await?,
        "web stopped answering across the containerd restart"
    );
    eventually(
        "containerd serving the kubelet again",
        Duration::from_secs(60),
        || async {
            let now = node_exec(&env, "ctr -n k8s.io tasks ls -q | sort").await?;
            Ok(if now == task_pids {
                Ok(())
            } else {
                Err(format!("tasks before:\n{task_pids}\nnow:\n{now}"))
            })
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after = snapshot().await?;
    ensure!(
        before == after,
        "containers changed across the containerd restart:\nbefore {before:#?}\nafter {after:#?}"
    );
    ensure!(fetch(ip).await?, "web stopped answering after the restart");
    // And new pods start: containerd and the kubelet work together again.
    run_gpu_pod(&env, "gpu-pod-after-containerd").await?;

    pods.delete("web", &DeleteParams::default().grace_period(0))
        .await?;
    let out = kubectl_gpu(&env, &["uninstall"]).await?;
    ensure!(
        out.status.success(),
        "kubectl gpu uninstall:\n{}",
        shown(&out)
    );
    check_node_clean(&env).await
}

/// What the kubelet's device manager checkpointed: (pod UID, container) -> the GPUs it holds.
async fn checkpointed_gpus(
    env: &Env,
) -> anyhow::Result<std::collections::BTreeMap<(String, String), Vec<String>>> {
    let raw = node_exec(
        env,
        "cat /var/lib/kubelet/device-plugins/kubelet_internal_checkpoint",
    )
    .await?;
    let v: Value = serde_json::from_str(&raw).context("the kubelet's device checkpoint")?;
    let mut out = std::collections::BTreeMap::new();
    for e in v["Data"]["PodDeviceEntries"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if e["ResourceName"] != "nvidia.com/gpu" {
            continue;
        }
        // DeviceIDs: NUMA node -> IDs.
        let mut ids: Vec<String> = e["DeviceIDs"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .flat_map(|l| l.as_array().into_iter().flatten())
            .filter_map(|id| id.as_str().map(str::to_string))
            .collect();
        ids.sort();
        out.insert(
            (
                e["PodUID"].as_str().unwrap_or_default().to_string(),
                e["ContainerName"].as_str().unwrap_or_default().to_string(),
            ),
            ids,
        );
    }
    Ok(out)
}

/// One GPU pod that stays up: its GPU, as its process sees it, through `kubectl exec` (the
/// kubelet and containerd serving the running container).
async fn exec_visible_devices(env: &Env, pod: &str) -> anyhow::Result<String> {
    let out = env
        .cluster
        .kubectl()
        .args(["exec", "-n", "default", pod, "--"])
        .args([
            "sh",
            "-c",
            "tr '\\0' '\\n' < /proc/1/environ | sed -n 's/^NVIDIA_VISIBLE_DEVICES=//p'",
        ])
        .output()?;
    ensure!(out.status.success(), "kubectl exec {pod}: {}", shown(&out));
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

async fn restarts_under_gpu_load(env: Env) -> anyhow::Result<()> {
    install(&env).await?;
    wait_policy_ready(&env.client).await?;
    wait_allocatable(&env.client, "4").await?;
    let pods = Api::<Pod>::namespaced(env.client.clone(), "default");
    let gpu_pod = |name: &str, bound: bool| -> anyhow::Result<Pod> {
        let mut spec = json!({
            "containers": [{
                "name": "cuda",
                "image": env.images.busybox,
                "command": ["sh", "-c", "echo \"GPU: $NVIDIA_VISIBLE_DEVICES\" && exec sleep 86400"],
                "resources": {"limits": {"nvidia.com/gpu": 1}}
            }],
            "terminationGracePeriodSeconds": 0
        });
        // Bound by name, the pod skips the scheduler: the kubelet alone decides.
        spec[if bound { "nodeName" } else { "nodeSelector" }] = if bound {
            json!(NODE)
        } else {
            json!({"gpupilot.io/real-node": "true"})
        };
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec
        }))?)
    };
    // Every GPU of the node taken by a pod that keeps running.
    let names: Vec<String> = (0..4).map(|i| format!("gpu-load-{i}")).collect();
    for n in &names {
        let _ = pods
            .delete(n, &DeleteParams::default().grace_period(0))
            .await;
    }
    for n in &names {
        eventually(&format!("no old {n}"), Duration::from_secs(60), || async {
            Ok(match pods.get_opt(n).await? {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            })
        })
        .await?;
        pods.create(&PostParams::default(), &gpu_pod(n, false)?)
            .await?;
    }
    // name -> (GPU from its log, container ID, pod UID)
    let mut held = std::collections::BTreeMap::new();
    for n in &names {
        let state = eventually(
            &format!("{n} running"),
            Duration::from_secs(180),
            || async {
                let p = pods.get(n).await?;
                let Some(c) = p
                    .status
                    .iter()
                    .flat_map(|s| s.container_statuses.iter().flatten())
                    .find(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                    .cloned()
                else {
                    return Ok(Err(format!("{:?}", p.status.and_then(|s| s.phase))));
                };
                let log = pods.logs(n, &Default::default()).await.unwrap_or_default();
                Ok(match log.trim().strip_prefix("GPU: ") {
                    Some(gpu) => Ok((
                        gpu.to_string(),
                        c.container_id.unwrap_or_default(),
                        p.metadata.uid.unwrap_or_default(),
                    )),
                    None => Err(format!("log {log:?}")),
                })
            },
        )
        .await?;
        held.insert(n.clone(), state);
    }
    let mut gpus: Vec<&String> = held.values().map(|(g, _, _)| g).collect();
    gpus.sort();
    let mut uuids = inventory_uuids()?;
    uuids.sort();
    ensure!(
        gpus.iter().copied().eq(uuids.iter()),
        "the four pods hold {gpus:?}, not the node's four GPUs {uuids:?} once each"
    );
    let checkpoint = checkpointed_gpus(&env).await?;
    for (n, (gpu, _, uid)) in &held {
        let cp = checkpoint.get(&(uid.clone(), "cuda".to_string()));
        ensure!(
            cp == Some(&vec![gpu.clone()]),
            "{n} logged {gpu} but the kubelet checkpointed {cp:?} for it"
        );
    }

    // The kubelet restarted, then containerd, with every GPU in use.
    restart_service(&env, "kubelet").await?;
    eventually("the node Ready again", Duration::from_secs(120), || async {
        let n = node(&env.client).await?;
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Ok(if ready {
            Ok(())
        } else {
            Err("NotReady".to_string())
        })
    })
    .await?;
    wait_allocatable(&env.client, "4").await?;
    restart_service(&env, "containerd").await?;
    tokio::time::sleep(Duration::from_secs(15)).await;

    // Each pod still runs the same container, with the same GPU, as its process and the
    // kubelet's checkpoint both say.
    let checkpoint = checkpointed_gpus(&env).await?;
    for (n, (gpu, container, uid)) in &held {
        let p = pods.get(n).await?;
        let status = p.status.as_ref().context("a pod status")?;
        let c = status
            .container_statuses
            .iter()
            .flatten()
            .next()
            .context("a container status")?;
        ensure!(
            p.metadata.uid.as_ref() == Some(uid)
                && c.container_id.as_ref() == Some(container)
                && c.restart_count == 0
                && c.state.as_ref().is_some_and(|s| s.running.is_some()),
            "{n} did not keep running across the restarts: {c:?}"
        );
        let seen = exec_visible_devices(&env, n).await?;
        ensure!(
            &seen == gpu,
            "{n} held {gpu}, its process now sees {seen:?}"
        );
        let cp = checkpoint.get(&(uid.clone(), "cuda".to_string()));
        ensure!(
            cp == Some(&vec![gpu.clone()]),
            "after the restarts the kubelet checkpointed {cp:?} for {n}, which holds {gpu}"
        );
    }

    // No GPU is free: a pod bound straight to the node (no scheduler) is refused by the kubelet.
    let _ = pods
        .delete("gpu-too-many", &DeleteParams::default().grace_period(0))
        .await;
    eventually("no old gpu-too-many", Duration::from_secs(60), || async {
        Ok(match pods.get_opt("gpu-too-many").await? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        })
    })
    .await?;
    pods.create(&PostParams::default(), &gpu_pod("gpu-too-many", true)?)
        .await?;
    let refused = eventually(
        "the kubelet refusing a fifth GPU pod",
        Duration::from_secs(120),
        || async {
            let p = pods.get("gpu-too-many").await?;
            let s = p.status.unwrap_or_default();
            Ok(match s.phase.as_deref() {
                Some("Failed") => Ok(format!("{:?}: {:?}", s.reason, s.message)),
                Some("Running") | Some("Succeeded") => {
                    return Err(anyhow::anyhow!(
                        "the kubelet ran a fifth GPU pod on a node with four GPUs, all taken: {:?}",
                        pods.logs("gpu-too-many", &Default::default()).await
                    ));
                }
                other => Err(format!("phase {other:?}")),
            })
        },
    )
    .await?;
    ensure!(
        refused.contains("nvidia.com/gpu"),
        "gpu-too-many failed, but not for want of a GPU: {refused}"
    );
    pods.delete("gpu-too-many", &DeleteParams::default())
        .await?;

    // A GPU freed goes to the next pod, and it is that one.
    let (freed, _, _) = held[&names[0]].clone();
    pods.delete(&names[0], &DeleteParams::default().grace_period(0))
        .await?;
    eventually(
        &format!("{} gone", names[0]),
        Duration::from_secs(60),
        || async {
            Ok(match pods.get_opt(&names[0]).await? {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            })
        },
    )
    .await?;
    let next = run_gpu_pod(&env, "gpu-pod-after-restarts").await?;
    ensure!(
        next == freed,
        "the freed GPU was {freed}, the next pod got {next}, which another pod holds"
    );

    for n in &names[1..] {
        pods.delete(n, &DeleteParams::default().grace_period(0))
            .await?;
    }
    let out = kubectl_gpu(&env, &["uninstall"]).await?;
    ensure!(
        out.status.success(),
        "kubectl gpu uninstall:\n{}",
        shown(&out)
    );
    check_node_clean(&env).await
}

/// A RuntimeClass of the test's own whose handler, "nvidia", the real node's containerd does not
/// have (its only runtime is runc): the kubelet cannot create the sandbox of a GPU pod that uses
/// it, and the doctor says which pod, on which node, why, and what to do.
async fn doctor_sandbox_failure(env: Env) -> anyhow::Result<()> {
    const RC: &str = "e2e-no-such-handler";
    const POD: &str = "gpu-pod-no-runtime";
    install(&env).await?;
    wait_policy_ready(&env.client).await?;
    wait_allocatable(&env.client, "4").await?;
    check_doctor_healthy(&env).await?;
    let rcs = Api::<RuntimeClass>::all(env.client.clone());
    rcs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": RC}, "handler": "nvidia"}))?,
    )
    .await?;
    let pods = Api::<Pod>::namespaced(env.client.clone(), "default");
    let result = async {
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": POD},
                "spec": {
                    "runtimeClassName": RC,
                    "nodeSelector": {"gpupilot.io/real-node": "true"},
                    "containers": [{
                        "name": "cuda",
                        "image": env.images.busybox,
                        "command": ["sleep", "3600"],
                        "resources": {"limits": {"nvidia.com/gpu": 1}}
                    }]
                }
            }))?,
        )
        .await?;
        let events = Api::<Event>::namespaced(env.client.clone(), "default");
        let event = eventually(
            "the kubelet's FailedCreatePodSandBox event for the pod",
            Duration::from_secs(120),
            || async {
                let list = events
                    .list(&ListParams::default().fields(&format!(
                        "involvedObject.name={POD},reason=FailedCreatePodSandBox"
                    )))
                    .await?;
                Ok(match list.items.into_iter().next() {
                    Some(e) => Ok(e),
                    None => Err("none yet".to_string()),
                })
            },
        )
        .await?;
        let message = event.message.clone().unwrap_or_default();
        eprintln!(
            "realnode: the kubelet's event, as recorded: {}",
            serde_json::to_string(&event)?
        );
        ensure!(
            message.contains("no runtime for \"nvidia\" is configured"),
            "the kubelet's message is not the one the doctor reads: {message}"
        );

        let out = kubectl_gpu(&env, &["doctor"]).await?;
        let text = shown(&out);
        ensure!(
            out.status.code() == Some(2),
            "doctor should exit 2 (errors) with a GPU pod stuck, exit {:?}:\n{text}",
            out.status.code()
        );
        for want in [
            "pod-sandbox-failed",
            &format!("default/{POD}"),
            NODE,
            "no runtime for \"nvidia\" is configured",
            &format!("RuntimeClass {RC}"),
            "restart containerd",
        ] {
            ensure!(
                text.contains(want),
                "doctor's output lacks {want:?}:\n{text}"
            );
        }
        let out = kubectl_gpu(&env, &["doctor", "-o", "json"]).await?;
        let report: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("doctor's JSON:\n{}", shown(&out)))?;
        let found: Vec<&Value> = report["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["check"] == "pod-sandbox-failed")
            .collect();
        ensure!(
            found.len() == 1
                && found[0]["severity"] == "error"
                && found[0]["objects"]
                    .as_array()
                    .is_some_and(|o| o.contains(&json!(format!("Pod/default/{POD}")))
                        && o.contains(&json!(format!("Node/{NODE}")))),
            "doctor -o json: {found:#?}"
        );

        // Once the pod is gone its events are history: healthy again.
        pods.delete(POD, &DeleteParams::default().grace_period(0))
            .await?;
        eventually("the stuck pod gone", Duration::from_secs(60), || async {
            Ok(match pods.get_opt(POD).await? {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            })
        })
        .await?;
        check_doctor_healthy(&env).await
    }
    .await;
    let _ = pods
        .delete(POD, &DeleteParams::default().grace_period(0))
        .await;
    let _ = rcs.delete(RC, &DeleteParams::default()).await;
    result?;
    let out = kubectl_gpu(&env, &["uninstall"]).await?;
    ensure!(
        out.status.success(),
        "kubectl gpu uninstall:\n{}",
        shown(&out)
    );
    check_node_clean(&env).await
}

async fn helm_chart(env: Env) -> anyhow::Result<()> {
    let tools = tools_with(&["helm"])?;
    let home = tempfile::tempdir()?;
    let helm_here = || {
        let mut cmd = helm(&tools, home.path());
        cmd.arg("--kubeconfig").arg(env.cluster.kubeconfig());
        cmd
    };
    let mut install = helm_here();
    install
        .args(["install", "gpu-pilot"])
        .arg(repo_root().join("charts/gpu-pilot"))
        .args([
            "--namespace",
            NS,
            "--create-namespace",
            "--wait",
            "--timeout",
            "5m",
        ])
        .args(values_args(&env))
        // As NVIDIA's chart: the CRD goes too (Helm never deletes a chart's crds/ itself).
        .args(["--set", "operator.cleanupCRD=true"]);
    run_ok(&mut install, "helm install").await?;
    wait_policy_ready(&env.client).await?;
    check_gpu_pilot_runs_on_the_node(&env).await?;
    wait_allocatable(&env.client, "4").await?;
    run_gpu_pod(&env, "gpu-pod-helm").await?;
    check_doctor_healthy(&env).await?;

    // What gpu-pilot did not make, under names and prefixes like its own: uninstall keeps it.
    let foreign = Foreign::make(&env.client).await?;
    // Plain `helm uninstall`: the chart's pre-delete hook deletes the policy and waits for the
    // controller to finalize it, Helm deletes the release, the post-delete hook what the
    // controller and webhook made while they ran, and the CRD.
    let out = run_ok(
        helm_here().args([
            "uninstall",
            "gpu-pilot",
            "--namespace",
            NS,
            "--wait",
            "--timeout",
            "5m",
        ]),
        "helm uninstall",
    )
    .await?;
    eprintln!("realnode: helm uninstall: {}", out.trim());
    let releases = run_ok(helm_here().args(["list", "-A", "-a", "-q"]), "helm list").await?;
    ensure!(releases.trim().is_empty(), "Helm releases left: {releases}");
    let left = managed_objects(&env.client).await?;
    ensure!(
        left.is_empty(),
        "helm uninstall left objects labelled {}={}: {left:?}",
        label::MANAGED_BY,
        label::MANAGED_BY_VALUE
    );
    foreign.check_kept(&env.client).await?;
    // Helm leaves the namespace `--create-namespace` made; with the admin's objects gone, the
    // node must be as before: no label of gpu-pilot's, no GPU, no container.
    foreign.remove(&env.client).await?;
    Api::<Namespace>::all(env.client.clone())
        .delete(NS, &DeleteParams::default())
        .await?;
    check_node_clean(&env).await
}

/// Objects gpu-pilot did not make, with names and label prefixes like its own: a Secret named as
/// cert-manager's for the webhook (which the post-delete hook deletes only when labelled), a
/// ConfigMap in gpu-pilot's namespace, and an admin's `nvidia.com/` label on the node.
struct Foreign;

const FOREIGN_LABEL: &str = "nvidia.com/team";
const FOREIGN_SECRET: &str = "gpu-pilot-webhook-cert";
const FOREIGN_CONFIGMAP: &str = "gpu-pilot-admin-notes";

impl Foreign {
    async fn make(client: &Client) -> anyhow::Result<Foreign> {
        let pp = PostParams::default();
        Api::<Secret>::namespaced(client.clone(), NS)
            .create(
                &pp,
                &serde_json::from_value(json!({
                    "metadata": {"name": FOREIGN_SECRET, "labels": {"owner": "admin"}},
                    "stringData": {"note": "not gpu-pilot's"},
                }))?,
            )
            .await?;
        Api::<ConfigMap>::namespaced(client.clone(), NS)
            .create(
                &pp,
                &serde_json::from_value(json!({
                    "metadata": {"name": FOREIGN_CONFIGMAP},
                    "data": {"note": "not gpu-pilot's"},
                }))?,
            )
            .await?;
        label_node(client, Some("vision")).await?;
        Ok(Foreign)
    }

    async fn check_kept(&self, client: &Client) -> anyhow::Result<()> {
        let secret = Api::<Secret>::namespaced(client.clone(), NS)
            .get_opt(FOREIGN_SECRET)
            .await?;
        ensure!(
            secret.is_some_and(|s| s.data.is_some_and(|d| d.contains_key("note"))),
            "uninstall deleted or changed Secret {NS}/{FOREIGN_SECRET}, which gpu-pilot did not make"
        );
        let cm = Api::<ConfigMap>::namespaced(client.clone(), NS)
            .get_opt(FOREIGN_CONFIGMAP)
            .await?;
        ensure!(
            cm.is_some_and(|c| c.data.is_some_and(|d| d.contains_key("note"))),
            "uninstall deleted or changed ConfigMap {NS}/{FOREIGN_CONFIGMAP}"
        );
        let n = node(client).await?;
        ensure!(
            n.labels().get(FOREIGN_LABEL).map(String::as_str) == Some("vision"),
            "uninstall removed the admin's label {FOREIGN_LABEL} from {NODE}: {:?}",
            n.labels()
        );
        Ok(())
    }

    async fn remove(self, client: &Client) -> anyhow::Result<()> {
        label_node(client, None).await
    }
}

async fn label_node(client: &Client, value: Option<&str>) -> anyhow::Result<()> {
    Api::<Node>::all(client.clone())
        .patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {FOREIGN_LABEL: value}}})),
        )
        .await?;
    Ok(())
}

/// Every object in the cluster that carries gpu-pilot's managed-by label, of every kind the
/// apiserver serves and lists, as `kind/namespace/name`.
async fn managed_objects(client: &Client) -> anyhow::Result<Vec<String>> {
    let discovery = kube::Discovery::new(client.clone()).run().await?;
    let lp = ListParams::default().labels(&format!(
        "{}={}",
        label::MANAGED_BY,
        label::MANAGED_BY_VALUE
    ));
    let mut out = Vec::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            if !caps.supports_operation(kube::discovery::verbs::LIST) {
                continue;
            }
            let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &ar);
            let list = api
                .list_metadata(&lp)
                .await
                .with_context(|| format!("listing {}", ar.plural))?;
            out.extend(list.items.iter().map(|o| {
                format!(
                    "{}/{}/{}",
                    ar.kind,
                    o.metadata.namespace.clone().unwrap_or_default(),
                    o.name_any()
                )
            }));
        }
    }
    Ok(out)
}
