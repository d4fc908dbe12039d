//! The long-running agent: reads GPU facts on a timer, feeds the device plugin, the metrics
//! endpoint, the node labels and the MIG manager from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gpu_pilot_api::names::{label, mig_config_state};
use tokio::sync::watch;

use crate::backend::{BackendError, GpuBackend};
use crate::health::HealthRules;
use crate::inventory::Inventory;
use crate::labels;
use crate::mig::{self, MigConfigFile};
use crate::node::{self, NodeClient};
use crate::plugin::config::{MigStrategy, PluginConfig};
use crate::plugin::resources;
use crate::plugin::server::{self, DeviceListing, Snapshot};

pub struct Settings {
    pub device_plugin_dir: Option<PathBuf>,
    pub plugin_config: Option<PathBuf>,
    pub plugin_config_default: Option<String>,
    pub mig_strategy: Option<MigStrategy>,
    pub cdi: bool,
    pub health: HealthRules,
    pub metrics_addr: Option<SocketAddr>,
    /// The kubelet's pod-resources socket, asked on each scrape for pod labels (`None`: off).
    pub pod_resources: Option<PathBuf>,
    pub node: Option<NodeClient>,
    /// Write GFD's feature labels on the Node (the feature-discovery DaemonSet).
    pub labels: bool,
    /// Apply `nvidia.com/mig.config` layouts (the MIG-manager DaemonSet).
    pub mig_manager: bool,
    pub mig_config: Option<PathBuf>,
    pub poll: Duration,
    /// How often the Node is read (a GET of one object: no list/watch permission needed).
    pub node_poll: Duration,
    pub hostname: String,
}

/// The device-plugin config for this pass: file/folder, the node's label, then CLI overrides.
fn plugin_config(s: &Settings, node_choice: Option<&str>) -> PluginConfig {
    let mut cfg = match &s.plugin_config {
        Some(src) => match PluginConfig::load(src, node_choice, s.plugin_config_default.as_deref())
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("{e}; using the default config");
                PluginConfig::default()
            }
        },
        None => PluginConfig::default(),
    };
    if let Some(m) = s.mig_strategy {
        cfg.flags.mig_strategy = Some(m);
    }
    if s.cdi {
        cfg.flags.plugin.device_list_strategy = Some(crate::plugin::config::OneOrMany::Many(vec![
            "envvar".into(),
            "cdi-cri".into(),
        ]));
    }
    cfg
}

pub async fn run(backend: Arc<dyn GpuBackend>, s: Settings) -> anyhow::Result<()> {
    let (snap_tx, snap_rx) = watch::channel(Snapshot::default());
    let (list_tx, list_rx) = watch::channel(DeviceListing {
        envvar: true,
        cdi: false,
    });
    let (inv_tx, inv_rx) = watch::channel::<Option<Arc<Inventory>>>(None);

    if let Some(dir) = s.device_plugin_dir.clone() {
        tokio::spawn(server::run(dir, snap_rx, list_rx, Duration::from_secs(1)));
    }
    if let Some(addr) = s.metrics_addr {
        let rx = inv_rx.clone();
        let host = s.hostname.clone();
        let pods = s.pod_resources.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, rx, host, pods).await {
                tracing::error!("{e}");
            }
        });
    }

    let mut no_driver_reported = false;
    let mut applied_mig: Option<String> = None;
    let mut restored_after_crash = false;
    let mut node_read_at: Option<std::time::Instant> = None;
    let mut node_obj = None;
    loop {
        let node_due = node_read_at.is_none_or(|t| t.elapsed() >= s.node_poll);
        let fresh_node = match &s.node {
            Some(n) if node_due => match n.get().await {
                Ok(obj) => Some(obj),
                Err(e) => {
                    tracing::warn!("{e}");
                    None
                }
            },
            _ => None,
        };
        // Labels and MIG changes are decided on a freshly read Node only.
        let node_fresh = fresh_node.is_some();
        if node_fresh {
            node_read_at = Some(std::time::Instant::now());
            node_obj = fresh_node;
        }
        let choice = node_obj
            .as_ref()
            .and_then(|n| node::label_of(n, label::DEVICE_PLUGIN_CONFIG))
            .map(str::to_string);
        let cfg = plugin_config(&s, choice.as_deref());
        let (envvar, cdi) = cfg.device_list();
        list_tx.send_if_modified(|l| {
            let changed = l.envvar != envvar || l.cdi != cdi;
            *l = DeviceListing { envvar, cdi };
            changed
        });

        match backend.inventory() {
            Ok(inv) => {
                no_driver_reported = false;
                let planned = match resources::plan(&inv, &cfg, &s.health) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("{e}");
                        Vec::new()
                    }
                };
                let inv = Arc::new(inv);
                snap_tx.send_if_modified(|cur| {
                    let next = Snapshot {
                        inventory: Arc::new(Some((*inv).clone())),
                        resources: Arc::new(planned),
                    };
                    let changed = *cur != next;
                    if changed {
                        *cur = next;
                    }
                    changed
                });
                inv_tx.send_replace(Some(Arc::clone(&inv)));

                if let (Some(nc), Some(obj), true) = (&s.node, &node_obj, node_fresh) {
                    if s.mig_manager && !restored_after_crash {
                        let left = node::paused_gates(obj);
                        if !left.is_empty() {
                            tracing::warn!("restoring gates a previous run left paused: {left:?}");
                            if let Err(e) = nc.patch(&node::restore_patch(&left, None)).await {
                                tracing::warn!("{e}");
                            }
                        }
                        restored_after_crash = true;
                    }
                    let wanted = node::label_of(obj, label::MIG_CONFIG)
                        .filter(|_| s.mig_manager)
                        .map(str::to_string);
                    if let Some(wanted) = wanted
                        && applied_mig.as_deref() != Some(wanted.as_str())
                    {
                        let ok = mig_change(backend.as_ref(), nc, &s, &inv, &wanted).await;
                        if ok.is_some() {
                            applied_mig = Some(wanted);
                        }
                        node_read_at = None;
                        continue; // re-read the GPUs and the Node before labelling
                    }
                    let want = labels::labels(&inv, &cfg);
                    if let Some(p) = node::label_patch(obj, &want).filter(|_| s.labels) {
                        match nc.patch(&p).await {
                            Ok(updated) => node_obj = Some(updated),
                            Err(e) => tracing::warn!("{e}"),
                        }
                    }
                }
            }
            Err(e @ BackendError::NoDriver(_)) => {
                if !no_driver_reported {
                    tracing::warn!("{e}");
                    no_driver_reported = true;
                }
                snap_tx.send_replace(Snapshot::default());
                inv_tx.send_replace(None);
            }
            Err(e) => tracing::error!("{e}"),
        }
        tokio::time::sleep(s.poll).await;
    }
}

/// One MIG change, NVIDIA's way: state `pending`, GPU clients paused, the layout applied, clients
/// restored (also on failure), state `success` or `failed`. `Some` when the outcome was written.
async fn mig_change(
    backend: &dyn GpuBackend,
    nc: &NodeClient,
    s: &Settings,
    inv: &Inventory,
    wanted: &str,
) -> Option<()> {
    let node = nc.get().await.map_err(|e| tracing::warn!("{e}")).ok()?;
    let gates = node::gates_to_pause(&node);
    tracing::info!("applying MIG config '{wanted}', pausing {gates:?}");
    nc.patch(&node::pause_patch(&gates))
        .await
        .map_err(|e| tracing::warn!("{e}"))
        .ok()?;
    let config = match &s.mig_config {
        Some(p) => std::fs::read_to_string(p)
            .map_err(|e| format!("reading MIG config file {}: {e}", p.display()))
            .and_then(|t| MigConfigFile::parse(&t).map_err(|e| e.to_string())),
        None => Ok(mig::default_config(inv)),
    };
    let result = config
        .and_then(|c| c.plan(wanted, inv).map_err(|e| e.to_string()))
        .and_then(|plan| {
            for line in mig::untouched(&plan, inv) {
                tracing::info!("MIG config '{wanted}': {line}");
            }
            backend.apply_mig(&plan).map_err(|e| e.to_string())
        });
    let state = match &result {
        Ok(()) => mig_config_state::SUCCESS,
        Err(e) => {
            tracing::error!("MIG config '{wanted}' failed: {e}");
            mig_config_state::FAILED
        }
    };
    // Give paused clients a moment to notice (NVIDIA's manager waits for their pods to go).
    tokio::time::sleep(s.poll.min(Duration::from_secs(2))).await;
    let mut tries = 0;
    loop {
        match nc.patch(&node::restore_patch(&gates, Some(state))).await {
            Ok(_) => return Some(()),
            Err(e) if tries < 5 => {
                tracing::warn!("{e}; retrying");
                tries += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::error!("{e}");
                return None;
            }
        }
    }
}
