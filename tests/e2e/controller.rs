//! The controller against a real control plane of its own (20 GPU nodes, 5 CPU nodes). The
//! scenarios change cluster-wide state (node labels, the one active policy), so they run one at a
//! time on that cluster, each starting from a clean slate.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use futures::StreamExt;
use gpu_pilot_api::names::{Component, annotation, label};
use gpu_pilot_api::policy::PolicyState;
use gpu_pilot_api::{ClusterPolicy, Stage};
use gpu_pilot_e2e::controller::{RunningController, gate_labels};
use gpu_pilot_e2e::{eventually, node_names};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Node, Pod, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::TestFn;

// The scenarios' helpers live in the test crate's library; these names stay for the modules
// that import them from here.
pub(crate) use gpu_pilot_e2e::serial::{Env, GPU, serial, shutdown};

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "controller::rollout_moves_every_gpu_node_through_the_stages",
            |_| Box::pin(serial(rollout)),
        ),
        ("controller::a_failing_driver_holds_one_node_only", |_| {
            Box::pin(serial(stuck_driver))
        }),
        ("controller::host_driver_and_toolkit_are_skipped", |_| {
            Box::pin(serial(host_driver))
        }),
        (
            "controller::disabling_and_reenabling_the_device_plugin",
            |_| Box::pin(serial(toggle_device_plugin)),
        ),
        (
            "controller::second_policy_ignored_and_delete_leaves_nothing",
            |_| Box::pin(serial(second_policy_and_delete)),
        ),
        (
            "controller::restart_mid_rollout_resumes_without_duplicates",
            |_| Box::pin(serial(restart_mid_rollout)),
        ),
        ("controller::two_replicas_one_leader_and_handover", |_| {
            Box::pin(serial(two_replicas))
        }),
    ]
}

pub(crate) async fn create_policy(client: &Client, name: &str, spec: Value) -> anyhow::Result<()> {
    let p: ClusterPolicy = serde_json::from_value(json!({
        "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
        "metadata": {"name": name}, "spec": spec
    }))?;
    Api::<ClusterPolicy>::all(client.clone())
        .create(&PostParams::default(), &p)
        .await?;
    Ok(())
}

async fn patch_policy(client: &Client, name: &str, spec: Value) -> anyhow::Result<()> {
    Api::<ClusterPolicy>::all(client.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await?;
    Ok(())
}

/// Waits until the policy reports `ready_nodes` ready GPU nodes and the given state.
pub(crate) async fn wait_policy(
    client: &Client,
    name: &str,
    state: PolicyState,
    ready_nodes: i32,
    timeout: Duration,
) -> anyhow::Result<ClusterPolicy> {
    let api: Api<ClusterPolicy> = Api::all(client.clone());
    eventually(
        &format!("policy {name} {state:?} with {ready_nodes} ready nodes"),
        timeout,
        || {
            let api = api.clone();
            async move {
                let p = api.get(name).await?;
                let st = p.status.clone().unwrap_or_default();
                Ok(
                    if st.state == Some(state) && st.ready_nodes == ready_nodes {
                        Ok(p)
                    } else {
                        Err(format!(
                            "state {:?}, ready {}/{}",
                            st.state, st.ready_nodes, st.gpu_nodes
                        ))
                    },
                )
            }
        },
    )
    .await
}

/// Stage label values seen per node, in order.
type StageLog = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// Records every value the stage label takes on every node, from a watch started now.
/// Records every node's stage label as it changes; returns once the first full list is in, so
/// no transition made after it is missed.
async fn record_stages(client: &Client) -> (StageLog, tokio::task::JoinHandle<()>) {
    let seen: StageLog = Arc::default();
    let api: Api<Node> = Api::all(client.clone());
    let s = seen.clone();
    let (listed_tx, listed) = tokio::sync::oneshot::channel();
    let mut listed_tx = Some(listed_tx);
    let task = tokio::spawn(async move {
        // The watcher restarts itself after an error (with backoff); the error is said, not
        // swallowed, and the recording goes on, so a stage seen after it still counts.
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = stream.next().await {
            let nodes = match ev {
                Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => vec![n],
                Ok(watcher::Event::InitDone) => {
                    if let Some(tx) = listed_tx.take() {
                        let _ = tx.send(());
                    }
                    vec![]
                }
                Ok(_) => vec![],
                Err(e) => {
                    eprintln!("stage recorder: node watch failed, retrying: {e}");
                    vec![]
                }
            };
            for n in nodes {
                if let Some(stage) = n.labels().get(label::STAGE) {
                    let mut m = s.lock().unwrap();
                    let v = m.entry(n.name_any()).or_default();
                    if v.last() != Some(stage) {
                        v.push(stage.clone());
                    }
                }
            }
        }
    });
    // A watch that never lists fails the scenario later, with what it saw.
    let _ = tokio::time::timeout(Duration::from_secs(30), listed).await;
    (seen, task)
}

async fn labels_of(client: &Client, node: &str) -> anyhow::Result<BTreeMap<String, String>> {
    Ok(Api::<Node>::all(client.clone())
        .get(node)
        .await?
        .labels()
        .clone())
}

pub(crate) async fn daemonset_names(client: &Client, ns: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(Api::<DaemonSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|d| d.name_any())
        .collect())
}

async fn rollout(env: Env) -> anyhow::Result<()> {
    let c = &env.client;
    // This scenario runs the controller as its own ServiceAccount with only its RBAC.
    let kubeconfig = gpu_pilot_e2e::controller::restricted_kubeconfig(&env.cluster, &env.ns)?;
    let ctrl = RunningController::start(&kubeconfig, &env.ns, "rollout", false);
    let (seen, watch) = record_stages(c).await;
    create_policy(c, "cluster-policy", json!({})).await?;
    let p = wait_policy(
        c,
        "cluster-policy",
        PolicyState::Ready,
        GPU as i32,
        Duration::from_secs(120),
    )
    .await?;
    watch.abort();
    let st = p.status.unwrap();
    ensure!(st.gpu_nodes == GPU as i32, "gpuNodes {}", st.gpu_nodes);
    let stages = st.stages.unwrap();
    ensure!(
        stages.ready == GPU as i32 && stages.toolkit == 0 && stages.driver == 0,
        "{stages:?}"
    );
    ensure!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True" && c.reason == "AllNodesReady")
    );
    ensure!(
        st.components
            .iter()
            .all(|c| c.state == gpu_pilot_api::policy::ComponentState::Ready),
        "{:?}",
        st.components
    );

    // Every GPU node passed the stages in order; the device plugin advertises GPUs at once here,
    // so plugin-validation is passed in the same step as device-plugin.
    let expected = vec![
        "toolkit",
        "driver",
        "driver-validation",
        "device-plugin",
        "ready",
    ];
    let gpu_nodes = node_names(c, true).await?;
    let seen = seen.lock().unwrap().clone();
    for n in &gpu_nodes {
        let got: Vec<&str> = seen
            .get(n)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default();
        ensure!(
            got == expected,
            "node {n} went through {got:?}, want {expected:?}"
        );
        let l = labels_of(c, n).await?;
        ensure!(l.get(label::GPU_PRESENT).map(String::as_str) == Some("true"));
        for g in gate_labels() {
            ensure!(
                l.get(&g).map(String::as_str) == Some("true"),
                "{n} lacks {g}"
            );
        }
    }
    // CPU nodes: no label, no operand pod.
    for n in node_names(c, false).await? {
        let l = labels_of(c, &n).await?;
        ensure!(
            !l.keys().any(|k| k.starts_with(label::DEPLOY_PREFIX)
                || k == label::STAGE
                || k == label::GPU_PRESENT),
            "CPU node {n} was touched: {l:?}"
        );
        ensure!(!seen.contains_key(&n));
    }
    let pods = Api::<Pod>::namespaced(c.clone(), &env.ns)
        .list(&ListParams::default())
        .await?;
    let cpu: BTreeSet<String> = node_names(c, false).await?.into_iter().collect();
    ensure!(
        pods.items.len() == GPU * Component::ALL.len(),
        "{} operand pods, want {}",
        pods.items.len(),
        GPU * Component::ALL.len()
    );
    ensure!(pods.items.iter().all(|p| {
        !cpu.contains(
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or(""),
        )
    }));
    // The driver DaemonSet is OnDelete; each carries an owner reference to the policy.
    let dss = Api::<DaemonSet>::namespaced(c.clone(), &env.ns)
        .list(&ListParams::default())
        .await?;
    ensure!(dss.items.len() == Component::ALL.len());
    for ds in &dss.items {
        let strategy = ds
            .spec
            .update_strategy
            .as_ref()
            .and_then(|u| u.type_.clone())
            .unwrap_or_default();
        let want = if ds.name_any() == Component::Driver.daemonset_name() {
            "OnDelete"
        } else {
            "RollingUpdate"
        };
        ensure!(strategy == want, "{}: {strategy}", ds.name_any());
        ensure!(
            ds.owner_references()
                .iter()
                .any(|o| o.kind == "ClusterPolicy" && o.name == "cluster-policy")
        );
    }
    ensure!(
        Api::<RuntimeClass>::all(c.clone())
            .get_opt("nvidia")
            .await?
            .is_some(),
        "RuntimeClass nvidia missing"
    );
    // Stage changes were reported as Events on the policy.
    // One StageReached Event per stage the nodes passed through (summaries flush every 5 s).
    eventually(
        "a StageReached Event for every stage on the policy",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move {
                let evs = policy_events(&c).await?;
                let notes: Vec<String> = evs
                    .iter()
                    .filter(|e| e.reason.as_deref() == Some("StageReached"))
                    .filter_map(|e| e.message.clone())
                    .collect();
                let missing: Vec<&str> = [
                    "toolkit",
                    "driver",
                    "driver-validation",
                    "device-plugin",
                    "ready",
                ]
                .into_iter()
                .filter(|st| {
                    !notes
                        .iter()
                        .any(|n| n.contains(&format!("reached stage {st}:")))
                })
                .collect();
                Ok(if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("no Event for {missing:?} in {notes:?}"))
                })
            }
        },
    )
    .await?;
    // Nothing changed since: another pass writes nothing.
    let writes = ctrl.metric("gpu_pilot_controller_writes_total", "").await?;
    tokio::time::sleep(Duration::from_secs(12)).await; // longer than the controller's resync
    let after = ctrl.metric("gpu_pilot_controller_writes_total", "").await?;
    ensure!(
        writes == after,
        "idle controller wrote {} times",
        after - writes
    );
    let node_writes = ctrl
        .metric("gpu_pilot_controller_writes_total", "kind=\"node\"")
        .await?;
    ensure!(
        node_writes == (GPU * 5) as f64,
        "{node_writes} node writes for {GPU} nodes x 5 steps"
    );
    delete_policies(c).await?;
    nodes_clean(c).await?.map_err(anyhow::Error::msg)?;
    ctrl.stop();
    // It holds a token; the cluster goes at the end of the run, the file goes now.
    let _ = std::fs::remove_file(&kubeconfig);
    Ok(())
}

/// Events about the current `cluster-policy` (earlier scenarios' policies had other uids).
async fn policy_events(c: &Client) -> anyhow::Result<Vec<CoreEvent>> {
    let uid = Api::<ClusterPolicy>::all(c.clone())
        .get("cluster-policy")
        .await?
        .uid()
        .unwrap_or_default();
    Ok(Api::<CoreEvent>::namespaced(c.clone(), "default")
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=ClusterPolicy,involvedObject.uid={uid}"
        )))
        .await?
        .items)
}

/// A fake GPU node whose driver pods never start (kwok fails them by the node's name).
async fn add_fault_node(c: &Client, name: &str) -> anyhow::Result<()> {
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {(label::NFD_PCI_10DE): "true", "type": "kwok", "kubernetes.io/os": "linux"}
        },
        "status": {
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "1"},
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "1"}
        }
    }))?;
    Api::<Node>::all(c.clone())
        .create(&PostParams::default(), &node)
        .await?;
    Ok(())
}

async fn stuck_driver(env: Env) -> anyhow::Result<()> {
    let c = &env.client;
    let bad = "fault.driver.imagepull";
    add_fault_node(c, bad).await?;
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &env.ns, "stuck", false);
    create_policy(c, "cluster-policy", json!({})).await?;
    let result = async {
        let p = wait_policy(
            c,
            "cluster-policy",
            PolicyState::NotReady,
            GPU as i32,
            Duration::from_secs(120),
        )
        .await?;
        let p = eventually("the stuck node in status", Duration::from_secs(30), || {
            let api: Api<ClusterPolicy> = Api::all(c.clone());
            async move {
                let p = api.get("cluster-policy").await?;
                Ok(
                    if p.status.as_ref().is_some_and(|s| !s.stuck_nodes.is_empty()) {
                        Ok(p)
                    } else {
                        Err("no stuck node yet".into())
                    },
                )
            }
        })
        .await
        .unwrap_or(p);
        let st = p.status.unwrap();
        ensure!(st.gpu_nodes == GPU as i32 + 1);
        ensure!(st.stuck_nodes.len() == 1, "{:?}", st.stuck_nodes);
        let s = &st.stuck_nodes[0];
        ensure!(
            s.name == bad && s.stage == "driver" && s.reason.contains("ImagePullBackOff"),
            "{s:?}"
        );
        let err = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Error")
            .context("Error condition")?;
        ensure!(
            err.status == "True" && err.reason == "NodeStageFailed" && err.message.contains(bad),
            "{err:?}"
        );
        let l = labels_of(c, bad).await?;
        ensure!(l.get(label::STAGE).map(String::as_str) == Some("driver"));
        ensure!(
            !l.contains_key(&label::deploy_gate(Component::OperatorValidator)),
            "the stuck node moved on: {l:?}"
        );
        let node = Api::<Node>::all(c.clone()).get(bad).await?;
        ensure!(
            node.annotations()
                .get(annotation::STAGE_REASON)
                .is_some_and(|r| r.contains("ImagePullBackOff"))
        );
        eventually(
            "a Warning Event naming the node",
            Duration::from_secs(20),
            || {
                let c = c.clone();
                async move {
                    let evs = policy_events(&c).await?;
                    Ok(
                        if evs.iter().any(|e| {
                            e.type_.as_deref() == Some("Warning")
                                && e.message.as_deref().unwrap_or("").contains(bad)
                                && e.message
                                    .as_deref()
                                    .unwrap_or("")
                                    .contains("ImagePullBackOff")
                        }) {
                            Ok(())
                        } else {
                            Err(format!("{} events, none names {bad}", evs.len()))
                        },
                    )
                }
            },
        )
        .await
    }
    .await;
    let cleaned = delete_policies(c).await;
    ctrl.stop();
    Api::<Node>::all(c.clone())
        .delete(bad, &DeleteParams::default())
        .await?;
    result.and(cleaned)
}

async fn host_driver(env: Env) -> anyhow::Result<()> {
    let c = &env.client;
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &env.ns, "host-driver", false);
    let (seen, watch) = record_stages(c).await;
    create_policy(
        c,
        "cluster-policy",
        json!({"driver": {"enabled": false}, "toolkit": {"enabled": false}}),
    )
    .await?;
    wait_policy(
        c,
        "cluster-policy",
        PolicyState::Ready,
        GPU as i32,
        Duration::from_secs(120),
    )
    .await?;
    watch.abort();
    let names = daemonset_names(c, &env.ns).await?;
    ensure!(
        !names.contains(&Component::Driver.daemonset_name())
            && !names.contains(&Component::ContainerToolkit.daemonset_name()),
        "{names:?}"
    );
    ensure!(names.len() == Component::ALL.len() - 2);
    for n in node_names(c, true).await? {
        let got = seen.lock().unwrap().get(&n).cloned().unwrap_or_default();
        ensure!(
            got == ["driver-validation", "device-plugin", "ready"],
            "{n}: {got:?}"
        );
        let l = labels_of(c, &n).await?;
        ensure!(
            !l.contains_key(&label::deploy_gate(Component::Driver))
                && !l.contains_key(&label::deploy_gate(Component::ContainerToolkit))
        );
    }
    delete_policies(c).await?;
    nodes_clean(c).await?.map_err(anyhow::Error::msg)?;
    ctrl.stop();
    Ok(())
}

async fn toggle_device_plugin(env: Env) -> anyhow::Result<()> {
    let c = &env.client;
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &env.ns, "toggle", false);
    create_policy(c, "cluster-policy", json!({})).await?;
    wait_policy(
        c,
        "cluster-policy",
        PolicyState::Ready,
        GPU as i32,
        Duration::from_secs(120),
    )
    .await?;
    let dp = Component::DevicePlugin;
    patch_policy(
        c,
        "cluster-policy",
        json!({"devicePlugin": {"enabled": false}}),
    )
    .await?;
    eventually(
        "device plugin DaemonSet and labels gone",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            let ns = env.ns.clone();
            async move {
                if daemonset_names(&c, &ns)
                    .await?
                    .contains(&dp.daemonset_name())
                {
                    return Ok(Err("DaemonSet still there".into()));
                }
                let labelled = Api::<Node>::all(c.clone())
                    .list(&ListParams::default().labels(&label::deploy_gate(dp)))
                    .await?
                    .items
                    .len();
                Ok(if labelled == 0 {
                    Ok(())
                } else {
                    Err(format!("{labelled} nodes still carry the gate"))
                })
            }
        },
    )
    .await?;
    eventually(
        "status says the device plugin is disabled",
        Duration::from_secs(30),
        || {
            let api: Api<ClusterPolicy> = Api::all(c.clone());
            async move {
                let p = api.get("cluster-policy").await?;
                let comp = p
                    .status
                    .unwrap_or_default()
                    .components
                    .into_iter()
                    .find(|x| x.name == "devicePlugin");
                Ok(match comp {
                    Some(x)
                        if x.state == gpu_pilot_api::policy::ComponentState::Disabled
                            && !x.enabled =>
                    {
                        Ok(())
                    }
                    other => Err(format!("{other:?}")),
                })
            }
        },
    )
    .await?;
    patch_policy(
        c,
        "cluster-policy",
        json!({"devicePlugin": {"enabled": true}}),
    )
    .await?;
    eventually(
        "device plugin back on every GPU node",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            let ns = env.ns.clone();
            async move {
                let labelled = Api::<Node>::all(c.clone())
                    .list(
                        &ListParams::default().labels(&format!("{}=true", label::deploy_gate(dp))),
                    )
                    .await?
                    .items
                    .len();
                let has_ds = daemonset_names(&c, &ns)
                    .await?
                    .contains(&dp.daemonset_name());
                Ok(if has_ds && labelled == GPU {
                    Ok(())
                } else {
                    Err(format!("DaemonSet {has_ds}, {labelled} nodes gated"))
                })
            }
        },
    )
    .await?;
    wait_policy(
        c,
        "cluster-policy",
        PolicyState::Ready,
        GPU as i32,
        Duration::from_secs(60),
    )
    .await?;
    delete_policies(c).await?;
    nodes_clean(c).await?.map_err(anyhow::Error::msg)?;
    ctrl.stop();
    Ok(())
}

/// Deletes every policy while a controller runs, and waits until its cleanup released them.
pub(crate) async fn delete_policies(c: &Client) -> anyhow::Result<()> {
    let api: Api<ClusterPolicy> = Api::all(c.clone());
    for p in api.list(&ListParams::default()).await? {
        api.delete(&p.name_any(), &DeleteParams::default()).await?;
    }
    eventually(
        "every policy gone (finalizer released)",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let left = api.list(&ListParams::default()).await?.items.len();
                Ok(if left == 0 {
                    Ok(())
                } else {
                    Err(format!("{left} left"))
                })
            }
        },
    )
    .await
}

/// True when no node carries anything gpu-pilot's controller sets.
pub(crate) async fn nodes_clean(c: &Client) -> anyhow::Result<Result<(), String>> {
    for n in Api::<Node>::all(c.clone())
        .list(&ListParams::default())
        .await?
    {
        let bad: Vec<&String> =
            n.labels()
                .keys()
                .filter(|k| {
                    k.starts_with(label::DEPLOY_PREFIX)
                        || *k == label::STAGE
                        || *k == label::GPU_PRESENT
                })
                .chain(n.annotations().keys().filter(|k| {
                    *k == annotation::STAGE_REASON || *k == annotation::GPU_PRESENT_SOURCE
                }))
                .collect();
        if !bad.is_empty() {
            return Ok(Err(format!("{} still has {bad:?}", n.name_any())));
        }
    }
    Ok(Ok(()))
}

async fn second_policy_and_delete(env: Env) -> anyhow::Result<()> {
    let c = &env.client;
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &env.ns, "second", false);
    create_policy(c, "cluster-policy", json!({})).await?;
    wait_policy(
        c,
        "cluster-policy",
        PolicyState::Ready,
        GPU as i32,
        Duration::from_secs(120),
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later creationTimestamp
    create_policy(c, "another-policy", json!({"mig": {"strategy": "mixed"}})).await?;
    let api: Api<ClusterPolicy> = Api::all(c.clone());
    let other = eventually(
        "the second policy is ignored",
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                let p = api.get("another-policy").await?;
                Ok(
                    if p.status.as_ref().and_then(|s| s.state) == Some(PolicyState::Ignored) {
                        Ok(p)
                    } else {
                        Err(format!("{:?}", p.status))
                    },
                )
            }
        },
    )
    .await?;
    let ready = other
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    ensure!(
        ready.message.contains("cluster-policy is the active one"),
        "{}",
        ready.message
    );
    // The ignored policy changed nothing: the device plugin still runs with the active strategy.
    let ds = Api::<DaemonSet>::namespaced(c.clone(), &env.ns)
        .get(&Component::DevicePlugin.daemonset_name())
        .await?;
    let env_vars =
        serde_json::to_string(&ds.spec.template.spec.as_ref().unwrap().containers[0].env)?;
    ensure!(env_vars.contains("\"single\""), "{env_vars}");

    api.delete("another-policy", &DeleteParams::default())
        .await?;
    api.delete("cluster-policy", &DeleteParams::default())
        .await?;
    eventually(
        "both policies gone (finalizer released)",
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let left = api.list(&ListParams::default()).await?.items.len();
                Ok(if left == 0 {
                    Ok(())
                } else {
                    Err(format!("{left} left"))
                })
            }
        },
    )
    .await?;
    ensure!(
        daemonset_names(c, &env.ns).await?.is_empty(),
        "DaemonSets left: {:?}",
        daemonset_names(c, &env.ns).await?
    );
    let sas: Vec<String> = Api::<ServiceAccount>::namespaced(c.clone(), &env.ns)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=gpu-pilot"))
        .await?
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    ensure!(sas.is_empty(), "service accounts left: {sas:?}");
    ensure!(
        Api::<RuntimeClass>::all(c.clone())
            .get_opt("nvidia")
            .await?
            .is_none(),
        "RuntimeClass left"
    );
    nodes_clean(c).await?.map_err(anyhow::Error::msg)?;
    ctrl.stop();
    Ok(())
}

async fn restart_mid_rollout(env: Env) -> anyhow::Result<()> {
    let c = &env.client;
    let nodes: Api<Node> = Api::all(c.clone());
    let gpu_nodes = node_names(c, true).await?;
    // Hold every node at the device-plugin stage (as the MIG manager would), so the rollout is
    // certainly in flight when the controller dies.
    let paused = json!({"metadata": {"labels": {(label::deploy_gate(Component::DevicePlugin)): "paused-for-mig-change"}}});
    for n in &gpu_nodes {
        nodes
            .patch(n, &PatchParams::default(), &Patch::Merge(&paused))
            .await?;
    }
    let first = RunningController::start(env.cluster.kubeconfig(), &env.ns, "first", false);
    create_policy(c, "cluster-policy", json!({})).await?;
    eventually(
        "every node held at device-plugin",
        Duration::from_secs(120),
        || {
            let nodes = nodes.clone();
            async move {
                let n = nodes
                    .list(&ListParams::default().labels(&format!(
                        "{}={}",
                        label::STAGE,
                        Stage::DevicePlugin
                    )))
                    .await?
                    .items
                    .len();
                Ok(if n == GPU {
                    Ok(())
                } else {
                    Err(format!("{n} held"))
                })
            }
        },
    )
    .await?;
    first.kill();
    let unpause =
        json!({"metadata": {"labels": {(label::deploy_gate(Component::DevicePlugin)): null}}});
    for n in &gpu_nodes {
        nodes
            .patch(n, &PatchParams::default(), &Patch::Merge(&unpause))
            .await?;
    }
    let second = RunningController::start(env.cluster.kubeconfig(), &env.ns, "second", false);
    wait_policy(
        c,
        "cluster-policy",
        PolicyState::Ready,
        GPU as i32,
        Duration::from_secs(120),
    )
    .await?;
    // No duplicates, no orphans: one DaemonSet per component, one pod per gated node each.
    let dss = Api::<DaemonSet>::namespaced(c.clone(), &env.ns)
        .list(&ListParams::default())
        .await?;
    ensure!(
        dss.items.len() == Component::ALL.len(),
        "{} DaemonSets",
        dss.items.len()
    );
    let pods_api = Api::<Pod>::namespaced(c.clone(), &env.ns);
    eventually(
        "one operand pod per component and GPU node",
        Duration::from_secs(60),
        || {
            let pods_api = pods_api.clone();
            async move {
                let pods = pods_api.list(&ListParams::default()).await?;
                let mut per: HashMap<(String, String), usize> = HashMap::new();
                for p in &pods.items {
                    let comp = p
                        .labels()
                        .get(label::COMPONENT)
                        .cloned()
                        .unwrap_or_default();
                    let node = p
                        .spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default();
                    *per.entry((comp, node)).or_default() += 1;
                }
                if per.values().any(|n| *n > 1) {
                    return Ok(Err(format!("duplicate operand pods: {per:?}")));
                }
                Ok(if per.len() == GPU * Component::ALL.len() {
                    Ok(())
                } else {
                    Err(format!("{} operand pods", per.len()))
                })
            }
        },
    )
    .await?;
    let sas = Api::<ServiceAccount>::namespaced(c.clone(), &env.ns)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=gpu-pilot"))
        .await?;
    ensure!(sas.items.len() == 2, "{} service accounts", sas.items.len());
    delete_policies(c).await?;
    nodes_clean(c).await?.map_err(anyhow::Error::msg)?;
    second.stop();
    Ok(())
}

pub(crate) async fn lease_holder(c: &Client, ns: &str) -> anyhow::Result<Option<String>> {
    Ok(Api::<Lease>::namespaced(c.clone(), ns)
        .get_opt("gpu-pilot-controller")
        .await?
        .and_then(|l| l.spec?.holder_identity))
}

async fn two_replicas(env: Env) -> anyhow::Result<()> {
    let c = &env.client;
    let a = RunningController::start(env.cluster.kubeconfig(), &env.ns, "replica-a", true);
    let b = RunningController::start(env.cluster.kubeconfig(), &env.ns, "replica-b", true);
    let holder = eventually(
        "one replica holds the Lease",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            let ns = env.ns.clone();
            async move {
                Ok(lease_holder(&c, &ns)
                    .await?
                    .ok_or_else(|| "no holder".to_string()))
            }
        },
    )
    .await?;
    create_policy(c, "cluster-policy", json!({})).await?;
    wait_policy(
        c,
        "cluster-policy",
        PolicyState::Ready,
        GPU as i32,
        Duration::from_secs(120),
    )
    .await?;
    let (leader, follower) = if holder == a.identity { (a, b) } else { (b, a) };
    ensure!(
        leader.identity == holder,
        "holder {holder} is neither replica"
    );
    ensure!(leader.metric("gpu_pilot_controller_leader", "").await? == 1.0);
    ensure!(follower.metric("gpu_pilot_controller_leader", "").await? == 0.0);
    let follower_writes = follower
        .metric("gpu_pilot_controller_writes_total", "")
        .await?;
    ensure!(
        follower_writes == 0.0,
        "the follower wrote {follower_writes} times"
    );
    ensure!(
        leader
            .metric("gpu_pilot_controller_writes_total", "")
            .await?
            > 0.0
    );

    // The leader dies without releasing the Lease; the follower takes over once it expires.
    leader.kill();
    let new_holder = eventually(
        "the follower takes the Lease",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            let ns = env.ns.clone();
            let want = follower.identity.clone();
            async move {
                let h = lease_holder(&c, &ns).await?;
                Ok(if h.as_deref() == Some(want.as_str()) {
                    Ok(want)
                } else {
                    Err(format!("holder {h:?}"))
                })
            }
        },
    )
    .await?;
    ensure!(new_holder == follower.identity);
    patch_policy(
        c,
        "cluster-policy",
        json!({"dcgmExporter": {"enabled": false}}),
    )
    .await?;
    eventually(
        "the new leader acts on a change",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            let ns = env.ns.clone();
            async move {
                Ok(
                    if daemonset_names(&c, &ns)
                        .await?
                        .contains(&Component::DcgmExporter.daemonset_name())
                    {
                        Err("dcgm-exporter DaemonSet still there".into())
                    } else {
                        Ok(())
                    },
                )
            }
        },
    )
    .await?;
    ensure!(
        follower
            .metric("gpu_pilot_controller_writes_total", "")
            .await?
            > 0.0
    );
    delete_policies(c).await?;
    nodes_clean(c).await?.map_err(anyhow::Error::msg)?;
    follower.stop();
    Ok(())
}
