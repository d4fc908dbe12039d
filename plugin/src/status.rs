//! `kubectl gpu status`: the policy, its components and nodes per stage, in a few lines.

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::Stage;
use gpu_pilot_api::policy::PolicyState;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams};
use serde::Serialize;

use crate::cluster::{Kube, explain};
use crate::global::Global;
use crate::ui::Output;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  kubectl gpu status
  kubectl gpu status -o json | jq .stages")]
pub struct StatusArgs {}

/// What `status` prints, also as JSON/YAML.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub policy: Option<PolicySummary>,
    /// Policies that are not in force (only one is).
    pub ignored_policies: Vec<String>,
    pub deployments: Vec<DeploymentSummary>,
}

fn policy_state<S: serde::Serializer>(s: &Option<PolicyState>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.map_or("unknown", PolicyState::as_str))
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySummary {
    pub name: String,
    /// `None` until the controller has written a status (printed `unknown`).
    #[serde(serialize_with = "policy_state")]
    pub state: Option<PolicyState>,
    pub generation: i64,
    pub observed_generation: i64,
    pub message: String,
    pub gpu_nodes: i32,
    pub ready_nodes: i32,
    /// Nodes in each stage, in stage order.
    pub stages: Vec<StageNodes>,
    pub components: Vec<gpu_pilot_api::policy::ComponentStatus>,
    pub stuck_nodes: Vec<gpu_pilot_api::policy::StuckNode>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StageNodes {
    pub stage: String,
    pub nodes: i32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSummary {
    pub name: String,
    pub image: String,
    pub desired: i32,
    pub available: i32,
}

pub async fn collect(kube: &Kube, namespace: &str) -> anyhow::Result<Status> {
    let policies: Api<ClusterPolicy> = Api::all(kube.client.clone());
    let list = match policies.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
            "gpu-pilot is not installed in the cluster at {} (no ClusterPolicy API); run `kubectl gpu install`",
            kube.server
        ),
        Err(e) => anyhow::bail!(explain(&e, &kube.server, "listing ClusterPolicies")),
    };
    let deploys: Api<Deployment> = Api::namespaced(kube.client.clone(), namespace);
    let lp = ListParams::default().labels(&gpu_pilot_core::render::managed_selector());
    let deployments = deploys
        .list(&lp)
        .await
        .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "listing gpu-pilot's Deployments")))?
        .items
        .into_iter()
        .map(|d| DeploymentSummary {
            name: d.metadata.name.clone().unwrap_or_default(),
            image: d
                .spec
                .template
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.image.clone())
                .unwrap_or_default(),
            desired: d.spec.replicas.unwrap_or(1),
            available: d
                .status
                .as_ref()
                .and_then(|s| s.available_replicas)
                .unwrap_or(0),
        })
        .collect();
    let mut ignored = Vec::new();
    let mut active = None;
    for p in list {
        let is_ignored = p
            .status
            .as_ref()
            .is_some_and(|s| s.state == Some(PolicyState::Ignored));
        if is_ignored || active.is_some() {
            ignored.push(p.metadata.name.clone().unwrap_or_default());
        } else {
            active = Some(p);
        }
    }
    let policy = active.map(|p| {
        let status = p.status.clone().unwrap_or_default();
        let stages = status.stages.clone().unwrap_or_default();
        let message = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        PolicySummary {
            name: p.metadata.name.clone().unwrap_or_default(),
            state: status.state,
            generation: p.metadata.generation.unwrap_or(0),
            observed_generation: status.observed_generation.unwrap_or(0),
            message,
            gpu_nodes: status.gpu_nodes,
            ready_nodes: status.ready_nodes,
            stages: Stage::ALL
                .iter()
                .map(|s| StageNodes {
                    stage: s.as_str().to_string(),
                    nodes: stages.get(*s),
                })
                .collect(),
            components: status.components.clone(),
            stuck_nodes: status.stuck_nodes.clone(),
        }
    });
    Ok(Status {
        policy,
        ignored_policies: ignored,
        deployments,
    })
}

pub async fn run(g: &Global, _a: StatusArgs) -> anyhow::Result<i32> {
    let kube = Kube::connect(g).await?;
    let status = collect(&kube, &g.namespace).await?;
    match g.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&status)?),
        Output::Table => print!("{}", table(&status, g.colour())),
    }
    Ok(0)
}

/// The few lines `status` prints.
pub fn table(s: &Status, colour: bool) -> String {
    let paint = |code: &str, text: &str| {
        if colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    };
    let mut out = String::new();
    match &s.policy {
        None => out.push_str(
            "no ClusterPolicy: gpu-pilot is installed but not configured; run `kubectl gpu install`\n",
        ),
        Some(p) => {
            let state = match p.state {
                Some(PolicyState::Ready) => paint("32", "ready"),
                other => paint("33", other.map_or("unknown", PolicyState::as_str)),
            };
            let stale = if p.observed_generation < p.generation {
                paint(
                    "33",
                    " (the controller has not seen the latest change: is it running?)",
                )
            } else {
                String::new()
            };
            out.push_str(&format!(
                "policy      {}: {state}, {}/{} GPU nodes ready{stale}\n",
                p.name, p.ready_nodes, p.gpu_nodes
            ));
            if !p.message.is_empty() {
                out.push_str(&format!("            {}\n", p.message));
            }
            let counts = gpu_pilot_api::policy::StageCounts {
                toolkit: stage(p, Stage::Toolkit),
                driver: stage(p, Stage::Driver),
                driver_validation: stage(p, Stage::DriverValidation),
                device_plugin: stage(p, Stage::DevicePlugin),
                plugin_validation: stage(p, Stage::PluginValidation),
                ready: stage(p, Stage::Ready),
            };
            let stages: Vec<String> = Stage::ALL
                .iter()
                .map(|st| {
                    if *st == Stage::Ready {
                        format!("ready {}", counts.get(*st))
                    } else {
                        format!(
                            "{} {} (passed {})",
                            st.as_str(),
                            counts.get(*st),
                            passed(&counts, *st)
                        )
                    }
                })
                .collect();
            out.push_str(&format!("stages      {}\n", stages.join(", ")));
            let comps: Vec<String> = p
                .components
                .iter()
                .map(|c| {
                    if c.enabled {
                        format!("{} {}/{}", c.name, c.ready, c.desired)
                    } else {
                        format!("{} off", c.name)
                    }
                })
                .collect();
            if !comps.is_empty() {
                out.push_str(&format!("components  {}\n", comps.join(", ")));
            }
            for n in p.stuck_nodes.iter().take(5) {
                out.push_str(&format!(
                    "{}       {} in {}: {}\n",
                    paint("31", "stuck"),
                    n.name,
                    n.stage,
                    n.reason
                ));
            }
            if p.stuck_nodes.len() > 5 {
                out.push_str(&format!(
                    "            and {} more stuck nodes (kubectl gpu doctor)\n",
                    p.stuck_nodes.len() - 5
                ));
            }
        }
    }
    for d in &s.deployments {
        let avail = format!("{}/{} available", d.available, d.desired);
        let avail = if d.available >= d.desired {
            paint("32", &avail)
        } else {
            paint("33", &avail)
        };
        out.push_str(&format!("deployment  {} {avail} ({})\n", d.name, d.image));
    }
    if !s.ignored_policies.is_empty() {
        out.push_str(&format!(
            "{}     ignored ClusterPolicies (only one is in force): {}\n",
            paint("33", "note"),
            s.ignored_policies.join(", ")
        ));
    }
    out
}

fn stage(p: &PolicySummary, s: Stage) -> i32 {
    p.stages
        .iter()
        .find(|n| n.stage == s.as_str())
        .map(|n| n.nodes)
        .unwrap_or(0)
}

/// How many nodes have passed each stage (are in a later one).
pub fn passed(stages: &gpu_pilot_api::policy::StageCounts, stage: Stage) -> i32 {
    Stage::ALL
        .iter()
        .skip_while(|s| **s != stage)
        .skip(1)
        .map(|s| stages.get(*s))
        .sum()
}

/// One line per stage for progress output.
pub fn stage_lines(policy: &ClusterPolicy) -> Vec<String> {
    let Some(status) = &policy.status else {
        return vec![
            "waiting for the controller to report (is gpu-pilot-controller running?)".into(),
        ];
    };
    let total = status.gpu_nodes;
    let stages = status.stages.clone().unwrap_or_default();
    let mut lines = Vec::new();
    for s in Stage::ALL {
        if s == Stage::Ready {
            lines.push(format!("{:<18} {:>5}/{total}", "ready", stages.get(s)));
        } else {
            lines.push(format!(
                "{:<18} {:>5}/{total} passed{}",
                s.as_str(),
                passed(&stages, s),
                if stages.get(s) > 0 {
                    format!(", {} in it", stages.get(s))
                } else {
                    String::new()
                }
            ));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_a_few_lines_and_names_stuck_nodes() {
        let s = Status {
            policy: Some(PolicySummary {
                name: "cluster-policy".into(),
                state: Some(PolicyState::NotReady),
                generation: 2,
                observed_generation: 1,
                message: "1 node stuck".into(),
                gpu_nodes: 3,
                ready_nodes: 2,
                stages: vec![
                    StageNodes {
                        stage: "driver".into(),
                        nodes: 1,
                    },
                    StageNodes {
                        stage: "ready".into(),
                        nodes: 2,
                    },
                ],
                components: vec![],
                stuck_nodes: vec![gpu_pilot_api::policy::StuckNode {
                    name: "n1".into(),
                    stage: "driver".into(),
                    reason: "ImagePullBackOff".into(),
                }],
            }),
            ignored_policies: vec!["other".into()],
            deployments: vec![DeploymentSummary {
                name: "gpu-pilot-controller".into(),
                image: "x".into(),
                desired: 1,
                available: 0,
            }],
        };
        let t = table(&s, false);
        assert!(t.contains("2/3 GPU nodes ready"), "{t}");
        assert!(t.contains("is it running?"), "{t}");
        assert!(t.contains("n1 in driver: ImagePullBackOff"), "{t}");
        assert!(t.contains("driver 1 (passed 2)"), "{t}");
        assert!(t.contains("0/1 available"), "{t}");
        assert!(t.contains("other"), "{t}");
        assert!(t.lines().count() <= 8, "{t}");
        assert!(!t.contains('\x1b'));
    }

    #[test]
    fn passed_counts_later_stages() {
        let s = gpu_pilot_api::policy::StageCounts {
            toolkit: 1,
            driver: 2,
            driver_validation: 0,
            device_plugin: 3,
            plugin_validation: 0,
            ready: 4,
        };
        assert_eq!(passed(&s, Stage::Toolkit), 9);
        assert_eq!(passed(&s, Stage::Driver), 7);
        assert_eq!(passed(&s, Stage::PluginValidation), 4);
    }
}
