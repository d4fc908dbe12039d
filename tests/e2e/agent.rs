//! The node agent against the real apiserver: it runs in-process (the library's `agent::run`)
//! for a fake node of its own, so tests in parallel never share a node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gpu_pilot_agent::plugin::config::MigStrategy;
use gpu_pilot_api::names::{Component, annotation, gate_value, label, mig_config_state};
use gpu_pilot_e2e::agent::{settings, start_agent};
use gpu_pilot_e2e::{Cluster, TestEnv, eventually};
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::TestFn;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        ("agent::labels_for_dgx_h100", |c| {
            Box::pin(labels_for(c, "dgx-h100"))
        }),
        ("agent::labels_for_a100_40gb", |c| {
            Box::pin(labels_for(c, "a100-40gb"))
        }),
        ("agent::labels_for_t4", |c| Box::pin(labels_for(c, "t4"))),
        (
            "agent::mig_config_with_device_filters_walks_pending_to_success_and_failed",
            |c| Box::pin(mig_manager(c)),
        ),
    ]
}

/// A kwok node shaped like the ones scripts/local-cluster makes, with one simulated inventory.
async fn create_node(client: &Client, name: &str, inventory: &str) -> anyhow::Result<()> {
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "annotations": { (annotation::KWOK_NODE): "fake" },
            "labels": {
                "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": name,
                "type": "kwok",
                (label::NFD_PCI_10DE): "true",
                (label::SIMULATED_INVENTORY): inventory,
            }
        }
    }))?;
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .with_context(|| format!("creating fake node {name}"))?;
    Ok(())
}

async fn delete_node(client: &Client, name: &str) {
    let _ = Api::<Node>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

fn node_labels(n: &Node) -> BTreeMap<String, String> {
    n.metadata.labels.clone().unwrap_or_default()
}

async fn wait_labels(
    client: &Client,
    node: &str,
    want: &[(&str, &str)],
) -> anyhow::Result<BTreeMap<String, String>> {
    let api = Api::<Node>::all(client.clone());
    eventually(
        &format!("labels {want:?} on {node}"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move {
                let l = node_labels(&api.get(node).await?);
                let missing: Vec<_> = want
                    .iter()
                    .filter(|(k, v)| l.get(*k).map(String::as_str) != Some(*v))
                    .map(|(k, v)| format!("{k}={v} (is {:?})", l.get(*k)))
                    .collect();
                Ok(if missing.is_empty() {
                    Ok(l)
                } else {
                    Err(missing.join(", "))
                })
            }
        },
    )
    .await
}

async fn labels_for(cluster: Arc<Cluster>, inventory: &str) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, &format!("agent-{inventory}")).await?;
    let node = format!("{}-agent-{inventory}", env.namespace);
    create_node(&env.client, &node, inventory).await?;
    let agent = start_agent(
        &env.client,
        &node,
        settings(&env.client, &node, MigStrategy::None, None),
    )
    .await?;
    let want: &[(&str, &str)] = match inventory {
        "dgx-h100" => &[
            (label::GPU_COUNT, "8"),
            (label::GPU_PRODUCT, "NVIDIA-H100-80GB-HBM3"),
            (label::GPU_MEMORY, "81559"),
            (label::GPU_FAMILY, "hopper"),
            (label::GPU_COMPUTE_MAJOR, "9"),
            (label::MIG_CAPABLE, "true"),
            (label::CUDA_DRIVER_FULL, "550.54.15"),
        ],
        "a100-40gb" => &[
            (label::GPU_COUNT, "4"),
            (label::GPU_PRODUCT, "NVIDIA-A100-SXM4-40GB"),
            (label::GPU_MEMORY, "40960"),
            (label::GPU_FAMILY, "ampere"),
            (label::GPU_COMPUTE_MAJOR, "8"),
            (label::MIG_CAPABLE, "true"),
        ],
        _ => &[
            (label::GPU_COUNT, "1"),
            (label::GPU_PRODUCT, "Tesla-T4"),
            (label::GPU_MEMORY, "15360"),
            (label::GPU_FAMILY, "turing"),
            (label::GPU_COMPUTE_MINOR, "5"),
            (label::MIG_CAPABLE, "false"),
        ],
    };
    let result = async {
        let mut all = want.to_vec();
        all.push((label::MIG_STRATEGY, "none"));
        all.push((label::GPU_PRESENT, "true"));
        wait_labels(&env.client, &node, &all).await?;
        // A label the agent wrote that no longer applies is removed; foreign labels stay.
        let api = Api::<Node>::all(env.client.clone());
        api.patch(
            &node,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"team": "ml", (label::GPU_COUNT): "99"}}}),
            ),
        )
        .await?;
        let l = wait_labels(
            &env.client,
            &node,
            &[(label::GPU_COUNT, want[0].1), ("team", "ml")],
        )
        .await?;
        anyhow::ensure!(l.contains_key(label::CUDA_RUNTIME_FULL), "{l:?}");
        Ok(())
    }
    .await;
    agent.abort();
    delete_node(&env.client, &node).await;
    env.cleanup().await;
    result
}

async fn mig_manager(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "agent-mig").await?;
    let node = format!("{}-agent-mig", env.namespace);
    create_node(&env.client, &node, "a100-40gb").await?;
    let dir = tempfile_dir(&env.namespace)?;
    let mig_config = dir.join("mig-config.yaml");
    std::fs::write(
        &mig_config,
        // One name for every GPU model, as NVIDIA's default-mig-parted-config writes it: each
        // entry's device-filter picks the GPUs it applies to (H100 SXM5 80GB, A100-SXM4-40GB).
        r#"version: v1
mig-configs:
  all-1g:
    - device-filter: ["0x233010DE", "0x233110DE"]
      devices: all
      mig-enabled: true
      mig-devices: {"1g.10gb": 7}
    - device-filter: "0x20B010DE"
      devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 7}
  h100-only:
    - device-filter: "0x233010DE"
      devices: all
      mig-enabled: true
      mig-devices: {"7g.80gb": 1}
  too-many:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 8}
"#,
    )?;
    let api = Api::<Node>::all(env.client.clone());
    let dp = label::deploy_gate(Component::DevicePlugin);
    let gfd = label::deploy_gate(Component::GpuFeatureDiscovery);
    let dcgm = label::deploy_gate(Component::DcgmExporter);
    api.patch(
        &node,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {(dp.as_str()): "true", (gfd.as_str()): "true", (dcgm.as_str()): "false"}}})),
    )
    .await?;
    let agent = start_agent(
        &env.client,
        &node,
        settings(&env.client, &node, MigStrategy::Mixed, Some(mig_config)),
    )
    .await?;
    let result = async {
        wait_labels(&env.client, &node, &[(label::GPU_COUNT, "4")]).await?;
        let set = |name: &'static str| {
            let api = api.clone();
            let node = node.clone();
            async move {
                api.patch(
                    &node,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {(label::MIG_CONFIG): name}}})),
                )
                .await
            }
        };
        set("all-1g").await?;
        // While the layout changes, the GPU clients are paused; `false` gates are left alone.
        wait_labels(
            &env.client,
            &node,
            &[
                (label::MIG_CONFIG_STATE, mig_config_state::PENDING),
                (dp.as_str(), gate_value::PAUSED_FOR_MIG_CHANGE),
                (gfd.as_str(), gate_value::PAUSED_FOR_MIG_CHANGE),
                (dcgm.as_str(), "false"),
            ],
        )
        .await?;
        wait_labels(
            &env.client,
            &node,
            &[
                (label::MIG_CONFIG_STATE, mig_config_state::SUCCESS),
                (dp.as_str(), "true"),
                (gfd.as_str(), "true"),
                (dcgm.as_str(), "false"),
                ("nvidia.com/mig-1g.5gb.count", "28"),
                (label::GPU_COUNT, "0"),
            ],
        )
        .await?;
        // A layout with no entry for this node's GPUs leaves them as they are and succeeds, as
        // mig-parted does (it walks only the GPUs an entry selects).
        set("h100-only").await?;
        wait_labels(
            &env.client,
            &node,
            &[(label::MIG_CONFIG_STATE, mig_config_state::PENDING)],
        )
        .await?;
        wait_labels(
            &env.client,
            &node,
            &[
                (label::MIG_CONFIG_STATE, mig_config_state::SUCCESS),
                (dp.as_str(), "true"),
                ("nvidia.com/mig-1g.5gb.count", "28"),
            ],
        )
        .await?;
        let l = node_labels(&api.get(&node).await?);
        anyhow::ensure!(
            !l.contains_key("nvidia.com/mig-7g.40gb.count"),
            "the A100s were changed by an H100-only layout: {l:?}"
        );
        // A layout that cannot fit fails, and the clients are restored all the same.
        set("too-many").await?;
        wait_labels(
            &env.client,
            &node,
            &[
                (label::MIG_CONFIG_STATE, mig_config_state::FAILED),
                (dp.as_str(), "true"),
                (gfd.as_str(), "true"),
            ],
        )
        .await?;
        let n = api.get(&node).await?;
        let ann = n.metadata.annotations.unwrap_or_default();
        anyhow::ensure!(
            !ann.contains_key(annotation::MIG_PAUSED_GATES),
            "the paused-gates memo is left behind: {ann:?}"
        );
        Ok(())
    }
    .await;
    agent.abort();
    delete_node(&env.client, &node).await;
    let _ = std::fs::remove_dir_all(&dir);
    env.cleanup().await;
    result
}

fn tempfile_dir(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("gpu-pilot-e2e-{name}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
