//! The long-running agent: reads GPU facts on a timer, feeds the device plugin, the metrics
//! endpoint, the node labels and the MIG manager from them.
//!
//! Each pass is decided by the pure [`step`] (what the loop remembers plus what it just read in,
//! the [`Action`]s to take out); [`run`] reads the facts and carries the actions out. NVML is
//! only ever called on tokio's blocking threads, so a MIG change that takes minutes does not
//! hold up Allocate, ListAndWatch or /metrics on the agent's runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpu_pilot_api::names::{label, mig_config_state};
use k8s_openapi::api::core::v1::Node;
use serde_json::Value;
use tokio::sync::watch;

use crate::backend::{BackendError, GpuBackend};
use crate::health::HealthRules;
use crate::inventory::Inventory;
use crate::labels;
use crate::mig::{self, MigConfigFile};
use crate::node::{self, NodeClient};
use crate::plugin::config::{MigStrategy, OneOrMany, PluginConfig};
use crate::plugin::resources::{self, Resource};
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

/// What the loop remembers from one pass to the next.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// "No driver" was logged; said again only after the driver was seen.
    no_driver_reported: bool,
    /// The MIG layout whose outcome was last written (success or failure).
    applied_mig: Option<String>,
    /// Gates that a crashed earlier run left paused were looked for (once, at start).
    checked_paused_gates: bool,
}

impl State {
    /// The outcome of a MIG change to `layout` is on the Node: do not apply it again.
    pub fn mig_written(&mut self, layout: &str) {
        self.applied_mig = Some(layout.to_string());
    }
}

/// The jobs this agent's DaemonSet gave it.
#[derive(Debug, Clone, Copy)]
pub struct Roles {
    pub labels: bool,
    pub mig_manager: bool,
}

/// What one pass read in.
pub struct Facts<'a> {
    /// The GPUs, or why the backend could not read them.
    pub gpus: &'a Result<Inventory, BackendError>,
    /// The Node, when this pass read it again (labels and MIG changes act on a fresh read only).
    pub fresh_node: Option<&'a Node>,
    /// The device-plugin config for this pass.
    pub config: &'a PluginConfig,
    /// Why the configured device-plugin config was refused: then no device is offered (the
    /// admin asked for something gpu-pilot does not do; whole GPUs would be a silent lie).
    pub config_error: Option<&'a str>,
    pub health: &'a HealthRules,
}

/// What the runtime does for one pass, in order.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Hand these devices to the kubelet and these GPUs to /metrics.
    Publish {
        inventory: Inventory,
        resources: Vec<Resource>,
    },
    /// No GPU can be read: the kubelet and /metrics get nothing.
    Unpublish,
    /// Say this (once per condition, at the given level).
    Warn(String),
    Error(String),
    /// Put back deploy gates a crashed earlier MIG change left paused.
    RestorePausedGates(Vec<String>),
    /// Apply this MIG layout (the runtime reports back with [`State::mig_written`]); the pass
    /// ends after it, so the next one sees the new GPUs and Node.
    ApplyMig(String),
    /// Merge-patch the Node's feature labels.
    PatchLabels(Value),
}

/// Decides one pass.
pub fn step(state: &mut State, roles: Roles, facts: Facts) -> Vec<Action> {
    let inv = match facts.gpus {
        Ok(inv) => inv,
        Err(e @ BackendError::NoDriver(_)) => {
            let mut out = vec![Action::Unpublish];
            if !state.no_driver_reported {
                out.push(Action::Warn(e.to_string()));
                state.no_driver_reported = true;
            }
            return out;
        }
        Err(e) => return vec![Action::Error(e.to_string())],
    };
    state.no_driver_reported = false;
    let mut out = Vec::new();
    let resources = match (
        facts.config_error,
        resources::plan(inv, facts.config, facts.health),
    ) {
        (Some(why), _) => {
            out.push(Action::Error(why.to_string()));
            Vec::new()
        }
        (None, Ok(r)) => r,
        (None, Err(e)) => {
            out.push(Action::Error(e.to_string()));
            Vec::new()
        }
    };
    out.push(Action::Publish {
        inventory: inv.clone(),
        resources,
    });
    let Some(n) = facts.fresh_node else {
        return out;
    };
    if roles.mig_manager && !state.checked_paused_gates {
        let left = node::paused_gates(n);
        if !left.is_empty() {
            out.push(Action::RestorePausedGates(left));
        }
        state.checked_paused_gates = true;
    }
    if let Some(wanted) = node::label_of(n, label::MIG_CONFIG).filter(|_| roles.mig_manager)
        && state.applied_mig.as_deref() != Some(wanted)
    {
        out.push(Action::ApplyMig(wanted.to_string()));
        return out;
    }
    if roles.labels
        && let Some(p) = node::label_patch(n, &labels::labels(inv, facts.config))
    {
        out.push(Action::PatchLabels(p));
    }
    out
}

/// The device-plugin config for this pass: file/folder, the node's label, then CLI overrides;
/// with the reason it was refused, if it was (then the default config stands in for labels).
fn plugin_config(s: &Settings, node_choice: Option<&str>) -> (PluginConfig, Option<String>) {
    let (mut cfg, refused) = match &s.plugin_config {
        Some(src) => match PluginConfig::load(src, node_choice, s.plugin_config_default.as_deref())
        {
            Ok(c) => (c, None),
            Err(e) => (PluginConfig::default(), Some(e.to_string())),
        },
        None => (PluginConfig::default(), None),
    };
    if let Some(m) = s.mig_strategy {
        cfg.flags.mig_strategy = Some(m);
    }
    if s.cdi {
        cfg.flags.plugin.device_list_strategy =
            Some(OneOrMany::Many(vec!["envvar".into(), "cdi-cri".into()]));
    }
    (cfg, refused)
}

/// Runs a blocking backend call on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    backend: &Arc<dyn GpuBackend>,
    call: impl FnOnce(&dyn GpuBackend) -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    let b = Arc::clone(backend);
    tokio::task::spawn_blocking(move || call(b.as_ref()))
        .await
        .unwrap_or_else(|e| {
            Err(BackendError::Unsupported(format!(
                "the NVML call panicked: {e}"
            )))
        })
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

    let roles = Roles {
        labels: s.labels,
        mig_manager: s.mig_manager,
    };
    let mut state = State::default();
    let mut node_read_at: Option<Instant> = None;
    let mut node_obj: Option<Node> = None;
    loop {
        let node_due = node_read_at.is_none_or(|t| t.elapsed() >= s.node_poll);
        let fresh_node = match &s.node {
            Some(n) if node_due => n.get().await.map_err(|e| tracing::warn!("{e}")).ok(),
            _ => None,
        };
        if fresh_node.is_some() {
            node_read_at = Some(Instant::now());
            node_obj.clone_from(&fresh_node);
        }
        let choice = node_obj
            .as_ref()
            .and_then(|n| node::label_of(n, label::DEVICE_PLUGIN_CONFIG))
            .map(str::to_string);
        let (cfg, refused) = plugin_config(&s, choice.as_deref());
        let (envvar, cdi) = cfg.device_list();
        list_tx.send_if_modified(|l| {
            let changed = l.envvar != envvar || l.cdi != cdi;
            *l = DeviceListing { envvar, cdi };
            changed
        });

        let gpus = blocking(&backend, |b| b.inventory()).await;
        let actions = step(
            &mut state,
            roles,
            Facts {
                gpus: &gpus,
                fresh_node: fresh_node.as_ref(),
                config: &cfg,
                config_error: refused.as_deref(),
                health: &s.health,
            },
        );
        let mut again_now = false;
        for action in actions {
            match action {
                Action::Publish {
                    inventory,
                    resources,
                } => {
                    let inv = Arc::new(inventory);
                    snap_tx.send_if_modified(|cur| {
                        let next = Snapshot {
                            inventory: Arc::new(Some((*inv).clone())),
                            resources: Arc::new(resources),
                        };
                        let changed = *cur != next;
                        if changed {
                            *cur = next;
                        }
                        changed
                    });
                    inv_tx.send_replace(Some(inv));
                }
                Action::Unpublish => {
                    snap_tx.send_replace(Snapshot::default());
                    inv_tx.send_replace(None);
                }
                Action::Warn(m) => tracing::warn!("{m}"),
                Action::Error(m) => tracing::error!("{m}"),
                Action::RestorePausedGates(left) => {
                    tracing::warn!("restoring gates a previous run left paused: {left:?}");
                    if let Some(nc) = &s.node
                        && let Err(e) = nc.patch(&node::restore_patch(&left, None)).await
                    {
                        tracing::warn!("{e}");
                    }
                }
                Action::ApplyMig(wanted) => {
                    let (Some(nc), Ok(inv)) = (&s.node, &gpus) else {
                        continue;
                    };
                    if mig_change(&backend, nc, &s, inv, &wanted).await.is_some() {
                        state.mig_written(&wanted);
                    }
                    // Read the GPUs and the Node again before labelling.
                    node_read_at = None;
                    again_now = true;
                }
                Action::PatchLabels(p) => {
                    if let Some(nc) = &s.node {
                        match nc.patch(&p).await {
                            Ok(updated) => node_obj = Some(updated),
                            Err(e) => tracing::warn!("{e}"),
                        }
                    }
                }
            }
        }
        if !again_now {
            tokio::time::sleep(s.poll).await;
        }
    }
}

/// Why a MIG layout could not be applied.
#[derive(Debug, thiserror::Error)]
enum MigChangeError {
    #[error("reading MIG config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] mig::MigConfigError),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// One MIG change, NVIDIA's way: state `pending`, GPU clients paused, the layout applied, clients
/// restored (also on failure), state `success` or `failed`. `Some` when the outcome was written.
async fn mig_change(
    backend: &Arc<dyn GpuBackend>,
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
    let result = apply_layout(backend, s, inv, wanted).await;
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

/// Plans `wanted` against the GPUs and applies it (on a blocking thread: MIG calls take long).
async fn apply_layout(
    backend: &Arc<dyn GpuBackend>,
    s: &Settings,
    inv: &Inventory,
    wanted: &str,
) -> Result<(), MigChangeError> {
    let config = match &s.mig_config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| MigChangeError::Read {
                path: p.display().to_string(),
                source,
            })?;
            MigConfigFile::parse(&text)?
        }
        None => mig::default_config(inv),
    };
    let plan = config.plan(wanted, inv)?;
    for line in mig::untouched(&plan, inv) {
        tracing::info!("MIG config '{wanted}': {line}");
    }
    Ok(blocking(backend, move |b| b.apply_mig(&plan)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SimulatedBackend;
    use serde_json::json;

    fn gpus(model: &str) -> Result<Inventory, BackendError> {
        SimulatedBackend::open(model).unwrap().inventory()
    }

    fn node(labels: Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "gpu-1", "labels": labels}})).unwrap()
    }

    const ALL: Roles = Roles {
        labels: true,
        mig_manager: true,
    };

    fn run(
        state: &mut State,
        roles: Roles,
        gpus: &Result<Inventory, BackendError>,
        node: Option<&Node>,
    ) -> Vec<Action> {
        step(
            state,
            roles,
            Facts {
                gpus,
                fresh_node: node,
                config: &PluginConfig::default(),
                config_error: None,
                health: &HealthRules::default(),
            },
        )
    }

    fn kinds(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .map(|a| match a {
                Action::Publish { .. } => "publish",
                Action::Unpublish => "unpublish",
                Action::Warn(_) => "warn",
                Action::Error(_) => "error",
                Action::RestorePausedGates(_) => "restore",
                Action::ApplyMig(_) => "mig",
                Action::PatchLabels(_) => "labels",
            })
            .collect()
    }

    #[test]
    fn a_refused_config_offers_no_devices_and_says_why() {
        let mut st = State::default();
        let t4 = gpus("t4");
        let why = "device-plugin config x is refused: sharing.mps asks for MPS";
        let actions = step(
            &mut st,
            ALL,
            Facts {
                gpus: &t4,
                fresh_node: None,
                config: &PluginConfig::default(),
                config_error: Some(why),
                health: &HealthRules::default(),
            },
        );
        assert!(actions.contains(&Action::Error(why.into())), "{actions:?}");
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::Publish { resources, .. } if resources.is_empty())),
            "{actions:?}"
        );
    }

    #[test]
    fn no_driver_is_said_once_until_the_driver_comes() {
        let mut st = State::default();
        let none = Err(BackendError::NoDriver("libnvidia-ml.so.1 missing".into()));
        assert_eq!(
            kinds(&run(&mut st, ALL, &none, None)),
            ["unpublish", "warn"]
        );
        assert_eq!(kinds(&run(&mut st, ALL, &none, None)), ["unpublish"]);
        let t4 = gpus("t4");
        assert_eq!(kinds(&run(&mut st, ALL, &t4, None)), ["publish"]);
        assert_eq!(
            kinds(&run(&mut st, ALL, &none, None)),
            ["unpublish", "warn"]
        );
    }

    #[test]
    fn devices_are_published_and_labels_written_on_a_fresh_node_only() {
        let mut st = State::default();
        let t4 = gpus("t4");
        let n = node(json!({}));
        let a = run(&mut st, ALL, &t4, Some(&n));
        assert_eq!(kinds(&a), ["publish", "labels"]);
        let Action::Publish { resources, .. } = &a[0] else {
            unreachable!()
        };
        assert!(resources.iter().any(|r| r.name == "nvidia.com/gpu"));
        assert_eq!(
            kinds(&run(&mut st, ALL, &t4, None)),
            ["publish"],
            "no Node read: no labels"
        );
        let no_labels = Roles {
            labels: false,
            mig_manager: true,
        };
        assert_eq!(kinds(&run(&mut st, no_labels, &t4, Some(&n))), ["publish"]);
    }

    #[test]
    fn a_mig_layout_is_applied_once_and_ends_the_pass() {
        let mut st = State::default();
        let a100 = gpus("a100-40gb");
        let n = node(json!({ (label::MIG_CONFIG): "all-1g.5gb" }));
        let a = run(&mut st, ALL, &a100, Some(&n));
        assert_eq!(kinds(&a), ["publish", "mig"]);
        assert_eq!(a[1], Action::ApplyMig("all-1g.5gb".into()));
        // Until the outcome is written, the next fresh read asks again.
        assert_eq!(
            kinds(&run(&mut st, ALL, &a100, Some(&n))),
            ["publish", "mig"]
        );
        st.mig_written("all-1g.5gb");
        assert_eq!(
            kinds(&run(&mut st, ALL, &a100, Some(&n))),
            ["publish", "labels"]
        );
        // Not the MIG manager: the label is someone else's business.
        let labels_only = Roles {
            labels: true,
            mig_manager: false,
        };
        let mut other = State::default();
        assert_eq!(
            kinds(&run(&mut other, labels_only, &a100, Some(&n))),
            ["publish", "labels"]
        );
    }

    #[test]
    fn gates_left_paused_by_a_crash_are_restored_once() {
        let mut st = State::default();
        let t4 = gpus("t4");
        let gate = label::deploy_gate(gpu_pilot_api::Component::DevicePlugin);
        let n: Node = serde_json::from_value(json!({"metadata": {"name": "gpu-1",
            "labels": { (gate.as_str()): "paused-for-mig-change" },
            "annotations": { (gpu_pilot_api::names::annotation::MIG_PAUSED_GATES): gate.clone() }}}))
        .unwrap();
        let a = run(&mut st, ALL, &t4, Some(&n));
        assert_eq!(a[1], Action::RestorePausedGates(vec![gate]));
        assert!(!kinds(&run(&mut st, ALL, &t4, Some(&n))).contains(&"restore"));
    }
}
