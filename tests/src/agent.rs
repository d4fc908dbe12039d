//! The node agent run in this process against the test cluster, for one node.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gpu_pilot_agent::agent::{self, Settings};
use gpu_pilot_agent::backend::{GpuBackend, SimulatedBackend};
use gpu_pilot_agent::health::HealthRules;
use gpu_pilot_agent::node::NodeClient;
use gpu_pilot_agent::plugin::config::MigStrategy;
use gpu_pilot_api::names::label;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client};

pub fn settings(
    client: &Client,
    node: &str,
    strategy: MigStrategy,
    mig_config: Option<std::path::PathBuf>,
) -> Settings {
    Settings {
        device_plugin_dir: None,
        plugin_config: None,
        plugin_config_default: None,
        mig_strategy: Some(strategy),
        cdi: false,
        health: HealthRules::default(),
        metrics_addr: None,
        pod_resources: None,
        node: Some(NodeClient::new(client.clone(), node)),
        labels: true,
        mig_manager: true,
        mig_config,
        poll: Duration::from_millis(1500),
        node_poll: Duration::from_millis(1500),
        hostname: node.to_string(),
    }
}

/// Starts the agent for `node`, simulating the inventory its label names.
pub async fn start_agent(
    client: &Client,
    node: &str,
    s: Settings,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let n = Api::<Node>::all(client.clone()).get(node).await?;
    let inv = n
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(label::SIMULATED_INVENTORY))
        .context("node has no simulated inventory label")?
        .clone();
    let backend: Arc<dyn GpuBackend> = Arc::new(SimulatedBackend::open(&inv)?);
    Ok(tokio::spawn(async move {
        if let Err(e) = agent::run(backend, s).await {
            eprintln!("agent stopped: {e:#}");
        }
    }))
}
