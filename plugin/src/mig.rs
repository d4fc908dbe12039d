//! `kubectl gpu mig set`: ask for a MIG layout on some nodes and follow the MIG manager.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gpu_pilot_api::names::{label, mig_config_state};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::cluster::{Kube, explain};
use crate::global::Global;
use crate::ui::{Output, Printer};

#[derive(Debug, clap::Subcommand)]
pub enum MigCommand {
    /// Set the MIG layout (an entry of the MIG manager's config) on the selected nodes and wait
    /// until each reports success or failure.
    #[command(after_help = "Examples:
  kubectl gpu mig set all-1g.10gb --nodes nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3
  kubectl gpu mig set all-disabled --nodes kubernetes.io/hostname=gpu-node-001
  kubectl gpu mig set all-balanced --nodes pool=train --no-wait")]
    Set(SetArgs),
}

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// The layout, a key under mig-configs in the MIG manager's ConfigMap.
    pub profile: String,
    /// A label selector for the nodes, e.g. pool=a100 (required: MIG changes stop GPU work).
    #[arg(long, value_name = "SELECTOR")]
    pub nodes: String,
    /// How long to wait for every node.
    #[arg(long, default_value = "10m", value_parser = gpu_pilot_core::duration::parse)]
    pub timeout: Duration,
    /// Set the label and return.
    #[arg(long)]
    pub no_wait: bool,
}

pub async fn run(g: &Global, cmd: MigCommand) -> anyhow::Result<i32> {
    let MigCommand::Set(a) = cmd;
    anyhow::ensure!(
        !a.nodes.trim().is_empty(),
        "--nodes is empty; give a label selector such as pool=a100 (MIG changes stop the GPU work on those nodes)"
    );
    anyhow::ensure!(
        is_label_value(&a.profile),
        "{:?} cannot be a label value (letters, digits, '-', '_', '.', at most 63); name a layout under mig-configs, e.g. all-1g.10gb",
        a.profile
    );
    let kube = Kube::connect(g).await?;
    let mut out = Printer::new(g.colour());

    // The layout must exist in the config the policy names, or every node would fail.
    if let Some((cm_name, layouts)) = known_layouts(&kube, &g.namespace).await?
        && !layouts.contains(&a.profile)
    {
        anyhow::bail!(
            "the MIG config {}/{cm_name} has no layout {:?}; it has: {}. Pick one of those, or add it to the ConfigMap",
            g.namespace,
            a.profile,
            layouts.join(", ")
        );
    }

    let nodes: Api<Node> = Api::all(kube.client.clone());
    let selected = nodes
        .list(&ListParams::default().labels(&a.nodes))
        .await
        .map_err(|e| {
            anyhow::anyhow!(explain(
                &e,
                &kube.server,
                &format!("listing nodes with {:?}", a.nodes)
            ))
        })?
        .items;
    anyhow::ensure!(
        !selected.is_empty(),
        "no node matches --nodes {:?}; check the selector with `kubectl get nodes -l '{}'`",
        a.nodes,
        a.nodes
    );
    let mut changed = Vec::new();
    for n in &selected {
        let name = n.name_any();
        let already = n.labels().get(label::MIG_CONFIG).map(String::as_str)
            == Some(a.profile.as_str())
            && n.labels().get(label::MIG_CONFIG_STATE).map(String::as_str)
                == Some(mig_config_state::SUCCESS);
        if already {
            out.line(&format!("{name}: already {} (success)", a.profile));
            continue;
        }
        // The state goes back to pending with the request, so an old success is never read as
        // this change's.
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {
                    (label::MIG_CONFIG): a.profile,
                    (label::MIG_CONFIG_STATE): mig_config_state::PENDING,
                }}})),
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!(explain(&e, &kube.server, &format!("labelling node {name}")))
            })?;
        out.line(&format!(
            "{name}: {}={} requested",
            label::MIG_CONFIG,
            a.profile
        ));
        changed.push(name);
    }
    if a.no_wait || changed.is_empty() {
        return Ok(0);
    }
    let deadline = Instant::now() + a.timeout;
    let mut states: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let list = nodes
            .list(&ListParams::default().labels(&a.nodes))
            .await
            .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "listing nodes")))?;
        for n in list
            .items
            .iter()
            .filter(|n| changed.contains(&n.name_any()))
        {
            let state = n
                .labels()
                .get(label::MIG_CONFIG_STATE)
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            if states.get(&n.name_any()) != Some(&state) {
                out.line(&format!("{}: {state}", n.name_any()));
                states.insert(n.name_any(), state);
            }
        }
        let done = changed.iter().all(|n| {
            matches!(
                states.get(n).map(String::as_str),
                Some(mig_config_state::SUCCESS | mig_config_state::FAILED)
            )
        });
        if done {
            break;
        }
        if Instant::now() > deadline {
            let waiting: Vec<&String> = changed
                .iter()
                .filter(|n| {
                    !matches!(
                        states.get(*n).map(String::as_str),
                        Some(mig_config_state::SUCCESS | mig_config_state::FAILED)
                    )
                })
                .collect();
            out.error(&format!(
                "{} node(s) did not finish within {}s: {}; is the MIG manager running there? `kubectl gpu doctor` tells",
                waiting.len(),
                a.timeout.as_secs(),
                waiting.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ));
            return Ok(1);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let failed: Vec<&String> = changed
        .iter()
        .filter(|n| states.get(*n).map(String::as_str) == Some(mig_config_state::FAILED))
        .collect();
    if g.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&states)?);
    }
    if failed.is_empty() {
        out.ok(&format!("{} node(s) now have {}", changed.len(), a.profile));
        Ok(0)
    } else {
        out.error(&format!(
            "{} failed on {}; the MIG manager's log there says why (`kubectl gpu doctor` shows it)",
            a.profile,
            failed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        Ok(1)
    }
}

fn is_label_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The layouts in the MIG config the active policy names, when it can be read.
async fn known_layouts(kube: &Kube, ns: &str) -> anyhow::Result<Option<(String, Vec<String>)>> {
    let policies: Api<gpu_pilot_api::ClusterPolicy> = Api::all(kube.client.clone());
    let Ok(list) = policies.list(&ListParams::default()).await else {
        return Ok(None);
    };
    let Some(p) = list.items.into_iter().find(|p| {
        p.status
            .as_ref()
            .is_none_or(|s| s.state != Some(gpu_pilot_api::policy::PolicyState::Ignored))
    }) else {
        return Ok(None);
    };
    let name = p.spec.mig_manager.config.name.clone();
    if name.is_empty() {
        return Ok(None);
    }
    let cms: Api<ConfigMap> = Api::namespaced(kube.client.clone(), ns);
    let Ok(Some(cm)) = cms.get_opt(&name).await else {
        return Ok(None);
    };
    Ok(Some((name, gpu_pilot_core::mig_parted::mig_layouts(&cm))))
}

#[cfg(test)]
mod tests {
    #[test]
    fn layout_names_must_be_label_values() {
        assert!(super::is_label_value("all-1g.10gb"));
        assert!(!super::is_label_value("all 1g"));
        assert!(!super::is_label_value("-x"));
        assert!(!super::is_label_value(""));
    }
}
