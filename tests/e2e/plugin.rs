//! `kubectl gpu` as an admin runs it: the real kubectl finds the plugin on PATH, against the
//! controller tests' cluster (20 GPU nodes, 5 CPU nodes), with the controller and the webhook
//! running as processes of this test (their in-cluster pods are kwok fakes).

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, ensure};
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{DEFAULT_POLICY_NAME, label, webhook as names};
use gpu_pilot_core::render::install::{self as render, Include};
use gpu_pilot_core::render::key;
use gpu_pilot_core::values::Values;
use gpu_pilot_e2e::controller::RunningController;
use gpu_pilot_e2e::eventually;
use gpu_pilot_webhook::certs::CertSettings;
use gpu_pilot_webhook::cluster::Scope;
use gpu_pilot_webhook::server::Limits;
use gpu_pilot_webhook::{CertSource, Options, Running};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::TestFn;
use gpu_pilot_e2e::serial::{Env, serial};

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "plugin::install_waits_to_ready_reinstall_changes_nothing_uninstall_leaves_nothing",
            |_| Box::pin(serial(install_reinstall_uninstall)),
        ),
        (
            "plugin::install_and_uninstall_touch_only_what_gpu_pilot_created",
            |_| Box::pin(serial(ownership)),
        ),
        (
            "plugin::gpu_operator_flags_shape_the_policy_and_daemonsets",
            |_| Box::pin(serial(classic_flags)),
        ),
        (
            "plugin::mig_set_waits_for_each_node_and_reports_failures",
            |_| Box::pin(serial(mig_set)),
        ),
        (
            "plugin::preflight_refuses_gpu_operator_and_missing_rights",
            |_| Box::pin(serial(preflight)),
        ),
        (
            "plugin::install_stuck_past_timeout_shows_the_doctors_findings",
            |_| Box::pin(serial(stuck_install)),
        ),
    ]
}

/// Runs `kubectl gpu ARGS` with the real kubectl, the plugin on PATH (without blocking the
/// runtime, which also serves the in-process webhook).
async fn kubectl_gpu(env: &Env, args: &[&str]) -> anyhow::Result<Output> {
    let plugin = gpu_pilot_e2e::plugin_binary()?;
    let plugin_dir = plugin.parent().context("the plugin has a directory")?;
    let mut cmd = env.cluster.kubectl();
    let path = std::env::join_paths([plugin_dir.to_path_buf()].into_iter().chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    cmd.env("PATH", path).arg("gpu").args(args);
    tokio::process::Command::from(cmd)
        .output()
        .await
        .context("running kubectl gpu")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A webhook serving on 127.0.0.1 with its Secret in `ns`, keeping the caBundle of install's
/// configurations (named gpu-pilot-webhook) current.
async fn start_webhook(client: &Client, ns: &str) -> anyhow::Result<Running> {
    let opts = Options {
        listen: "127.0.0.1:0".parse()?,
        scope: Scope {
            namespace: ns.into(),
            policy_selector: String::new(),
            node_selector: String::new(),
            pod_namespaces: Vec::new(),
        },
        certs: CertSource::Secret(CertSettings {
            namespace: ns.into(),
            secret: names::TLS_SECRET.into(),
            names: vec!["127.0.0.1".into()],
            ca_validity: Duration::from_secs(86400),
            ca_renew_before: Duration::from_secs(3600),
            ca_overlap: Duration::from_secs(60),
            cert_validity: Duration::from_secs(7200),
            cert_renew_before: Duration::from_secs(600),
            mutating_config: Some(names::NAME.into()),
            validating_config: Some(names::NAME.into()),
        }),
        limits: Limits::default(),
        check_interval: Duration::from_secs(1),
        startup_timeout: Duration::from_secs(60),
    };
    Ok(Running::start(client.clone(), opts).await?)
}

/// resourceVersion of every object install renders, by kind/namespace/name.
async fn versions(env: &Env, objs: &[Value]) -> anyhow::Result<BTreeMap<String, String>> {
    let kube = kube_for(env).await?;
    let mut out = BTreeMap::new();
    for o in objs {
        let api = kubectl_gpu::cluster::objects::api_for(&kube, o)?;
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        if let Some(m) = api.get_metadata_opt(name).await? {
            out.insert(key(o), m.metadata.resource_version.unwrap_or_default());
        }
    }
    Ok(out)
}

async fn kube_for(env: &Env) -> anyhow::Result<kubectl_gpu::cluster::Kube> {
    let global = kubectl_gpu::global::Global {
        kubeconfig: Some(env.cluster.kubeconfig().to_path_buf()),
        context: None,
        namespace: env.ns.clone(),
        output: kubectl_gpu::ui::Output::Table,
        color: kubectl_gpu::ui::ColorChoice::Never,
    };
    kubectl_gpu::cluster::Kube::connect(&global).await
}

/// Every gpu-pilot label or annotation left on nodes, as `node: key`.
async fn leftovers_on_nodes(client: &Client) -> anyhow::Result<Vec<String>> {
    let mut left = Vec::new();
    for n in Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        for k in n.labels().keys().chain(n.annotations().keys()) {
            let ours = k.starts_with(label::DEPLOY_PREFIX)
                || k.starts_with("gpupilot.io/")
                    && k != label::SIMULATED_INVENTORY
                    && k != "gpupilot.io/simulated-gpus"
                || k == label::MIG_CONFIG_STATE;
            if ours {
                left.push(format!("{}: {k}", n.name_any()));
            }
        }
    }
    Ok(left)
}

async fn install_reinstall_uninstall(env: Env) -> anyhow::Result<()> {
    let ns = env.ns.clone();
    let mut wh = Some(start_webhook(&env.client, &ns).await?);
    let url = format!(
        "webhook.url=https://{}",
        wh.as_ref().context("started")?.addr
    );
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &ns, "plugin-install", false);
    let result = async {
        // 1. Install and follow the rollout to ready.
        let out = kubectl_gpu(&env, &["install", "-n", &ns, "--set", &url, "--wait", "--timeout", "4m"]).await?;
        let shown = text(&out);
        ensure!(out.status.success(), "install failed:\n{shown}");
        for expected in [
            "preflight",
            "20 GPU node(s) among 25 nodes",
            "created   ClusterPolicy/cluster-policy",
            "driver-validation",
            "plugin-validation",
            "gpu-pilot is ready on 20 GPU node(s)",
        ] {
            ensure!(shown.contains(expected), "install output lacks {expected:?}:\n{shown}");
        }
        // Progress lines for the stages appeared while it waited.
        ensure!(
            shown.matches("after ").count() >= 2,
            "--wait showed no progress:\n{shown}"
        );

        // 2. A GPU pod (outside gpu-pilot's own namespace, which the webhook leaves alone) is
        // mutated by the webhook install registered.
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), "default");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "cuda"},
            "spec": {"containers": [{"name": "c", "image": "cuda", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
        }))?;
        let stored = pods.create(&PostParams::default(), &pod).await?;
        ensure!(
            stored.spec.as_ref().and_then(|s| s.runtime_class_name.as_deref()) == Some("nvidia"),
            "the GPU pod was not given the runtime class: {:?}",
            stored.spec
        );
        pods.delete("cuda", &DeleteParams::default().grace_period(0)).await?;
        eventually("the GPU pod is gone", Duration::from_secs(30), || async {
            Ok(match pods.get_opt("cuda").await? {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            })
        })
        .await?;

        // 3. Again: nothing changes.
        let objs = render::objects(&ns, &kubectl_gpu::install::load_values(&install_args(&[&url]))?, Include::ALL);
        let before = versions(&env, &objs).await?;
        let out = kubectl_gpu(&env, &["install", "-n", &ns, "--set", &url, "--wait=false"]).await?;
        let shown = text(&out);
        ensure!(out.status.success(), "second install failed:\n{shown}");
        ensure!(
            shown.contains(&format!("0 created, 0 changed, {} unchanged, 0 pruned", objs.len())),
            "the second install changed something:\n{shown}"
        );
        let after = versions(&env, &objs).await?;
        ensure!(before == after, "resourceVersions moved:\nbefore {before:?}\nafter {after:?}");

        // 4. status says ready in a few lines.
        let out = kubectl_gpu(&env, &["status", "-n", &ns]).await?;
        let shown = text(&out);
        ensure!(out.status.success() && shown.contains("20/20 GPU nodes ready"), "{shown}");

        // 5. What each account may do is what docs/architecture.md shows: `kubectl auth can-i
        // --list` as the controller (its RBAC made by install) and as the agent and the operands
        // (their RBAC made by the controller), this test's namespace read as `gpu-pilot`.
        let mut differ = Vec::new();
        for account in [
            gpu_pilot_core::render::controller_rbac::SERVICE_ACCOUNT,
            gpu_pilot_core::render::operands::AGENT_SERVICE_ACCOUNT,
            gpu_pilot_core::render::operands::OPERAND_SERVICE_ACCOUNT,
        ] {
            let rename = |row: String| row.replace(&ns, "gpu-pilot");
            if let Err(e) =
                gpu_pilot_e2e::rbac::ensure_documented(&env.cluster, &ns, account, account, rename)
                    .await
            {
                differ.push(format!("{e:#}"));
            }
        }
        ensure!(differ.is_empty(), "{}", differ.join("\n"));

        // 6. Uninstall leaves nothing, and is safe twice.
        let out = kubectl_gpu(&env, &["uninstall", "-n", &ns]).await?;
        let shown = text(&out);
        ensure!(out.status.success(), "uninstall failed:\n{shown}");
        // In a cluster the webhook's pods go with its Deployment; this one runs in the test
        // process, would write its TLS Secret again, and stops here.
        if let Some(w) = wh.take() {
            w.stop().await;
        }
        let _ = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(env.client.clone(), &ns)
            .delete(names::TLS_SECRET, &DeleteParams::default())
            .await;
        let kube = kube_for(&env).await?;
        // The CRD finalizes asynchronously. The namespace existed before install (the test made
        // it), so it is the admin's and stays.
        eventually("every installed object is gone", Duration::from_secs(90), || async {
            let mut left = Vec::new();
            for o in objs.iter().filter(|o| o["kind"] != "Namespace") {
                if kubectl_gpu::cluster::objects::exists(&kube, o).await? {
                    left.push(key(o));
                }
            }
            Ok(if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) })
        })
        .await
        .with_context(|| format!("after uninstall:\n{shown}"))?;
        let left = leftovers_on_nodes(&env.client).await?;
        ensure!(left.is_empty(), "gpu-pilot's marks left on nodes: {left:?}");
        let ds = Api::<DaemonSet>::namespaced(env.client.clone(), &ns)
            .list(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        ensure!(ds == 0, "{ds} DaemonSets left");
        let out = kubectl_gpu(&env, &["uninstall", "-n", &ns]).await?;
        let shown = text(&out);
        ensure!(
            out.status.success() && shown.contains("nothing to remove"),
            "the second uninstall:\n{shown}"
        );
        Ok(())
    }
    .await;
    ctrl.stop();
    if let Some(w) = wh.take() {
        w.stop().await;
    }
    gpu_pilot_e2e::ensure_crd(&env.client).await?;
    result
}

fn install_args(sets: &[&str]) -> kubectl_gpu::install::InstallArgs {
    kubectl_gpu::install::InstallArgs {
        values: vec![],
        set: sets.iter().map(|s| s.to_string()).collect(),
        set_string: vec![],
        version: None,
        dry_run: true,
        wait: None,
        timeout: Duration::from_secs(60),
        ignore_gpu_operator: false,
    }
}

async fn classic_flags(env: Env) -> anyhow::Result<()> {
    let ns = env.ns.clone();
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &ns, "plugin-flags", false);
    let result = async {
        let policies: Api<ClusterPolicy> = Api::all(env.client.clone());
        let daemonsets: Api<DaemonSet> = Api::namespaced(env.client.clone(), &ns);
        // Nodes with a preinstalled driver and toolkit (no webhook: this one is about the policy).
        let out = kubectl_gpu(
            &env,
            &[
                "install",
                "-n",
                &ns,
                "--set",
                "webhook.enabled=false",
                "--set",
                "driver.enabled=false",
                "--set",
                "toolkit.enabled=false",
                "--wait",
                "--timeout",
                "3m",
            ],
        )
        .await?;
        ensure!(out.status.success(), "install failed:\n{}", text(&out));
        let p = policies.get(DEFAULT_POLICY_NAME).await?;
        ensure!(
            !p.spec.driver.enabled && !p.spec.toolkit.enabled,
            "policy: {:?}",
            p.spec
        );
        let names: Vec<String> = daemonsets
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|d| d.name_any())
            .collect();
        ensure!(
            !names
                .iter()
                .any(|n| n.contains("driver") || n.contains("toolkit")),
            "driver/toolkit DaemonSets exist: {names:?}"
        );
        ensure!(
            names.iter().any(|n| n.contains("device-plugin")),
            "no device plugin: {names:?}"
        );

        // MIG mixed: the policy and the device plugin's arguments follow.
        let out = kubectl_gpu(
            &env,
            &[
                "install",
                "-n",
                &ns,
                "--set",
                "webhook.enabled=false,mig.strategy=mixed",
                "--wait=false",
            ],
        )
        .await?;
        ensure!(out.status.success(), "install failed:\n{}", text(&out));
        let p = policies.get(DEFAULT_POLICY_NAME).await?;
        ensure!(
            p.spec.mig.strategy.as_str() == "mixed",
            "policy: {:?}",
            p.spec.mig
        );
        ensure!(
            p.spec.driver.enabled,
            "an install without the flag turns the driver back on"
        );
        eventually(
            "the device plugin runs with --mig-strategy mixed",
            Duration::from_secs(60),
            || async {
                let list = daemonsets.list(&ListParams::default()).await?;
                let Some(dp) = list
                    .items
                    .iter()
                    .find(|d| d.name_any().contains("device-plugin"))
                else {
                    return Ok(Err("no device-plugin DaemonSet".to_string()));
                };
                let args = serde_json::to_string(&dp.spec.template)?;
                Ok(if args.contains("\"--mig-strategy\",\"mixed\"") {
                    Ok(())
                } else {
                    Err(format!("args: {args}"))
                })
            },
        )
        .await?;

        // A typo is an error that names the key, and nothing is applied.
        let gen_before = policies.get(DEFAULT_POLICY_NAME).await?.metadata.generation;
        let out = kubectl_gpu(
            &env,
            &["install", "-n", &ns, "--set", "driver.enabeld=false"],
        )
        .await?;
        let shown = text(&out);
        ensure!(
            !out.status.success() && shown.contains("driver.enabeld: unknown key"),
            "a misspelt key:\n{shown}"
        );
        let gen_after = policies.get(DEFAULT_POLICY_NAME).await?.metadata.generation;
        ensure!(
            gen_before == gen_after,
            "the policy changed on a failed install"
        );

        // The values install used render the same objects as --dry-run prints.
        let dry = kubectl_gpu(
            &env,
            &[
                "install",
                "-n",
                &ns,
                "--set",
                "webhook.enabled=false,mig.strategy=mixed",
                "--dry-run",
                "-o",
                "yaml",
            ],
        )
        .await?;
        ensure!(dry.status.success(), "{}", text(&dry));
        let docs: Vec<Value> = serde_yaml::Deserializer::from_slice(&dry.stdout)
            .map(|d| serde::Deserialize::deserialize(d).map_err(anyhow::Error::from))
            .collect::<Result<_, _>>()?;
        let mut tree = gpu_pilot_core::values::default_tree();
        gpu_pilot_core::values::apply_set(
            &mut tree,
            "webhook.enabled=false,mig.strategy=mixed",
            false,
        )?;
        let expected = render::objects(&ns, &Values::from_tree(tree)?, Include::ALL);
        ensure!(
            docs == expected,
            "--dry-run -o yaml differs from the rendered objects"
        );

        Ok(())
    }
    .await;
    let teardown = uninstall_and_stop(&env, ctrl).await;
    result?;
    teardown
}

/// The end of a scenario that installed: uninstall (checked after the scenario's own result),
/// stop the controller, and put the CRD back for the next scenario.
async fn uninstall_and_stop(env: &Env, ctrl: RunningController) -> anyhow::Result<()> {
    let out = kubectl_gpu(env, &["uninstall", "-n", &env.ns, "--timeout", "60s"]).await;
    ctrl.stop();
    gpu_pilot_e2e::ensure_crd(&env.client).await?;
    let out = out?;
    ensure!(out.status.success(), "uninstall failed:\n{}", text(&out));
    Ok(())
}

async fn mig_set(env: Env) -> anyhow::Result<()> {
    use gpu_pilot_agent::plugin::config::MigStrategy;
    let ns = env.ns.clone();
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &ns, "plugin-mig", false);
    // An H100 node and an A100 40GB node (scripts/local-cluster cycles the inventories), each
    // with the agent's MIG manager reading the layouts install ships.
    let (h100, a100) = ("gpu-node-001", "gpu-node-002");
    let dir = std::env::temp_dir().join(format!("gpu-pilot-e2e-{ns}-mig"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.yaml");
    std::fs::write(&config, render::MIG_PARTED_LAYOUTS)?;
    let mut agents = Vec::new();
    let nodes: Api<Node> = Api::all(env.client.clone());
    let result = async {
        let out = kubectl_gpu(
            &env,
            &[
                "install",
                "-n",
                &ns,
                "--set",
                "webhook.enabled=false",
                "--wait",
                "--timeout",
                "3m",
            ],
        )
        .await?;
        ensure!(out.status.success(), "install failed:\n{}", text(&out));
        for node in [h100, a100] {
            let s = gpu_pilot_e2e::agent::settings(
                &env.client,
                node,
                MigStrategy::Mixed,
                Some(config.clone()),
            );
            agents.push(gpu_pilot_e2e::agent::start_agent(&env.client, node, s).await?);
        }
        let selector = format!("kubernetes.io/hostname in ({h100},{a100})");

        // A layout that is not in the config is refused before any node is touched.
        let out = kubectl_gpu(
            &env,
            &["mig", "set", "all-9g.99gb", "--nodes", &selector, "-n", &ns],
        )
        .await?;
        let shown = text(&out);
        ensure!(
            !out.status.success()
                && shown.contains("has no layout")
                && shown.contains("all-1g.10gb"),
            "an unknown layout:\n{shown}"
        );
        let out = kubectl_gpu(
            &env,
            &[
                "mig",
                "set",
                "all-disabled",
                "--nodes",
                "pool=none",
                "-n",
                &ns,
            ],
        )
        .await?;
        ensure!(
            !out.status.success() && text(&out).contains("no node matches"),
            "{}",
            text(&out)
        );

        // 1g.5gb exists on the A100 40GB only: one success, one failure, exit 1.
        let out = kubectl_gpu(
            &env,
            &[
                "mig",
                "set",
                "all-1g.5gb",
                "--nodes",
                &selector,
                "-n",
                &ns,
                "--timeout",
                "2m",
            ],
        )
        .await?;
        let shown = text(&out);
        ensure!(
            out.status.code() == Some(1),
            "a partly failed layout must exit 1:\n{shown}"
        );
        for expected in [
            format!("{a100}: success"),
            format!("{h100}: failed"),
            format!("all-1g.5gb failed on {h100}"),
        ] {
            ensure!(
                shown.contains(&expected),
                "mig set output lacks {expected:?}:\n{shown}"
            );
        }
        let n = nodes.get(a100).await?;
        ensure!(
            n.labels()
                .get("nvidia.com/mig-1g.5gb.count")
                .map(String::as_str)
                == Some("28"),
            "the A100 node's MIG devices: {:?}",
            n.labels()
        );

        // The H100 takes 1g.10gb; the A100 is left as it is.
        let out = kubectl_gpu(
            &env,
            &[
                "mig",
                "set",
                "all-1g.10gb",
                "--nodes",
                &format!("kubernetes.io/hostname={h100}"),
                "-n",
                &ns,
                "--timeout",
                "2m",
            ],
        )
        .await?;
        let shown = text(&out);
        ensure!(
            out.status.success() && shown.contains(&format!("{h100}: success")),
            "{shown}"
        );
        Ok(())
    }
    .await;
    for a in agents {
        a.abort();
    }
    // The admin's request label is the admin's: uninstall leaves it, the test removes it.
    for node in [h100, a100] {
        let _ = nodes
            .patch(
                node,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(
                    json!({"metadata": {"labels": {(label::MIG_CONFIG): null}}}),
                ),
            )
            .await;
    }
    let teardown = uninstall_and_stop(&env, ctrl).await;
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    teardown?;
    let left = leftovers_on_nodes(&env.client).await?;
    ensure!(
        left.is_empty(),
        "the agent's labels are left after uninstall: {left:?}"
    );
    Ok(())
}

async fn preflight(env: Env) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let ns = env.ns.clone();
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let nvidia: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "clusterpolicies.nvidia.com"},
        "spec": {
            "group": "nvidia.com", "scope": "Cluster",
            "names": {"plural": "clusterpolicies", "singular": "clusterpolicy", "kind": "ClusterPolicy", "listKind": "ClusterPolicyList"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    }))?;
    crds.create(&PostParams::default(), &nvidia).await?;
    let restricted = gpu_pilot_e2e::controller::restricted_kubeconfig(&env.cluster, &ns)?;
    let result = async {
        // NVIDIA's operator present: refused, nothing applied, and the way out named.
        let out = kubectl_gpu(&env, &["install", "-n", &ns, "--wait=false"]).await?;
        let shown = text(&out);
        ensure!(
            out.status.code() == Some(1)
                && shown.contains(
                    "NVIDIA's GPU Operator is installed (the CRD clusterpolicies.nvidia.com exists)"
                )
                && shown.contains("--ignore-gpu-operator")
                && shown.contains("preflight failed"),
            "{shown}"
        );
        let deploys: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(env.client.clone(), &ns);
        ensure!(
            deploys.list(&ListParams::default()).await?.items.is_empty(),
            "a failed preflight applied something"
        );

        // Someone without the rights: every missing permission listed, nothing applied.
        let out = kubectl_gpu(
            &env,
            &[
                "install",
                "-n",
                &ns,
                "--wait=false",
                "--ignore-gpu-operator",
                "--kubeconfig",
                restricted.to_str().context("path")?,
            ],
        )
        .await?;
        let shown = text(&out);
        ensure!(
            out.status.code() == Some(1)
                && shown
                    .contains("you may not: create customresourcedefinitions.apiextensions.k8s.io")
                && shown.contains("mutatingwebhookconfigurations")
                && shown.contains("--context"),
            "{shown}"
        );
        ensure!(
            deploys.list(&ListParams::default()).await?.items.is_empty(),
            "applied anyway"
        );
        Ok(())
    }
    .await;
    let _ = std::fs::remove_file(&restricted);
    crds.delete("clusterpolicies.nvidia.com", &DeleteParams::default())
        .await?;
    result
}

async fn stuck_install(env: Env) -> anyhow::Result<()> {
    let ns = env.ns.clone();
    let node = "fault.driver.imagepull";
    gpu_pilot_e2e::nodes::add_fault_node(&env.client, node).await?;
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &ns, "plugin-stuck", false);
    let result = async {
        let out = kubectl_gpu(
            &env,
            &[
                "install",
                "-n",
                &ns,
                "--set",
                "webhook.enabled=false",
                "--wait",
                "--timeout",
                "40s",
            ],
        )
        .await?;
        let shown = text(&out);
        ensure!(
            out.status.code() == Some(1),
            "a stuck install must exit 1:\n{shown}"
        );
        for expected in [
            "not ready after 40s; what the doctor finds:",
            node,
            "ImagePull",
            "fix:",
        ] {
            ensure!(
                shown.contains(expected),
                "install output lacks {expected:?}:\n{shown}"
            );
        }
        Ok(())
    }
    .await;
    let teardown = uninstall_and_stop(&env, ctrl).await;
    gpu_pilot_e2e::nodes::delete_node(&env.client, node).await?;
    result?;
    teardown
}

/// Labels and resourceVersion of an object, to show it was not touched.
async fn fingerprint<K>(
    api: &Api<K>,
    name: &str,
) -> anyhow::Result<(BTreeMap<String, String>, String)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let m = api
        .get_metadata(name)
        .await
        .with_context(|| format!("reading {name}"))?;
    ensure!(
        m.metadata.deletion_timestamp.is_none(),
        "{name} is being deleted"
    );
    Ok((
        m.labels().clone(),
        m.metadata.resource_version.unwrap_or_default(),
    ))
}

/// Install into a namespace of the admin's, with a RuntimeClass `nvidia` of the admin's, then
/// uninstall: neither is changed or deleted. Objects of someone else's with install's names stop
/// install before it applies anything, and uninstall in a namespace full of look-alikes deletes
/// none of them. A namespace install created is deleted by uninstall.
async fn ownership(env: Env) -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
    use k8s_openapi::api::node::v1::RuntimeClass;
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let ns = env.ns.clone();
    let c = env.client.clone();
    let namespaces: Api<Namespace> = Api::all(c.clone());
    let runtime_classes: Api<RuntimeClass> = Api::all(c.clone());
    let cluster_roles: Api<ClusterRole> = Api::all(c.clone());
    let other = format!("{ns}-lookalikes");
    let fresh = format!("{ns}-fresh");
    let pp = PostParams::default();
    // The admin's things: data in the namespace install will use, and a RuntimeClass `nvidia`.
    Api::<ConfigMap>::namespaced(c.clone(), &ns)
        .create(
            &pp,
            &serde_json::from_value(
                json!({"metadata": {"name": "team-data"}, "data": {"k": "v"}}),
            )?,
        )
        .await?;
    runtime_classes
        .create(&pp, &serde_json::from_value(json!({"metadata": {"name": "nvidia", "labels": {"owner": "admin"}}, "handler": "nvidia"}))?)
        .await?;
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &ns, "plugin-ownership", true);
    let result = async {
        // 1. Someone else's ClusterRole named like the controller's: refused before anything.
        cluster_roles
            .create(&pp, &serde_json::from_value(json!({"metadata": {"name": "gpu-pilot-controller"}, "rules": []}))?)
            .await?;
        let role_before = fingerprint(&cluster_roles, "gpu-pilot-controller").await?;
        let out = kubectl_gpu(&env, &["install", "-n", &ns, "--set", "webhook.enabled=false", "--wait=false"]).await?;
        let shown = text(&out);
        ensure!(
            out.status.code() == Some(1)
                && shown.contains("ClusterRole/gpu-pilot-controller exist but were not created by gpu-pilot")
                && shown.contains("kubectl label clusterrole gpu-pilot-controller app.kubernetes.io/managed-by=gpu-pilot")
                && shown.contains("preflight failed"),
            "install over someone else's ClusterRole:\n{shown}"
        );
        ensure!(
            Api::<Deployment>::namespaced(c.clone(), &ns).list(&ListParams::default()).await?.items.is_empty(),
            "a refused install applied something"
        );
        ensure!(fingerprint(&cluster_roles, "gpu-pilot-controller").await? == role_before, "the ClusterRole changed");
        cluster_roles.delete("gpu-pilot-controller", &DeleteParams::default()).await?;
        eventually("the look-alike ClusterRole is gone", Duration::from_secs(30), || async {
            Ok(match cluster_roles.get_opt("gpu-pilot-controller").await? {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            })
        })
        .await?;

        // 2. Install into the admin's namespace, with their RuntimeClass: both left alone.
        let ns_before = fingerprint(&namespaces, &ns).await?;
        let rc_before = fingerprint(&runtime_classes, "nvidia").await?;
        let out = kubectl_gpu(&env, &["install", "-n", &ns, "--set", "webhook.enabled=false", "--wait", "--timeout", "4m"]).await?;
        let shown = text(&out);
        ensure!(out.status.success(), "install failed:\n{shown}");
        ensure!(shown.contains(&format!("using     Namespace/{ns} (not created by gpu-pilot")), "{shown}");
        ensure!(fingerprint(&namespaces, &ns).await? == ns_before, "install changed the admin's namespace");
        ensure!(fingerprint(&runtime_classes, "nvidia").await? == rc_before, "the controller changed the admin's RuntimeClass");
        // The controller said why it left the RuntimeClass alone.
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(c.clone());
        eventually("a NotOwned Event about the RuntimeClass", Duration::from_secs(30), || async {
            let found = events.list(&ListParams::default()).await?.items.into_iter().any(|e| {
                e.reason.as_deref() == Some("NotOwned")
                    && e.note.as_deref().is_some_and(|n| n.contains("RuntimeClass nvidia exists and was not created by gpu-pilot"))
            });
            Ok(if found { Ok(()) } else { Err("no such Event".to_string()) })
        })
        .await?;
        // The controller's Lease carries the label uninstall finds it by.
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(c.clone(), &ns);
        let lease = leases.get("gpu-pilot-controller").await?;
        ensure!(
            lease.labels().get(label::MANAGED_BY).map(String::as_str) == Some(label::MANAGED_BY_VALUE),
            "the controller's Lease is not labelled: {:?}",
            lease.labels()
        );

        // 3. Uninstall: gpu-pilot's objects go, the admin's namespace, data and RuntimeClass stay.
        let out = kubectl_gpu(&env, &["uninstall", "-n", &ns, "--timeout", "60s"]).await?;
        let shown = text(&out);
        ensure!(out.status.success(), "uninstall failed:\n{shown}");
        ensure!(
            shown.contains(&format!("kept      Namespace/{ns} (not created by gpu-pilot"))
                && shown.contains("deleted   Lease/gpu-pilot-controller"),
            "{shown}"
        );
        ensure!(fingerprint(&namespaces, &ns).await? == ns_before, "uninstall changed the admin's namespace");
        ensure!(fingerprint(&runtime_classes, "nvidia").await? == rc_before, "uninstall changed the admin's RuntimeClass");
        Api::<ConfigMap>::namespaced(c.clone(), &ns).get("team-data").await.context("the admin's ConfigMap is gone")?;
        let kube = kube_for(&env).await?;
        let values = kubectl_gpu::install::load_values(&install_args(&["webhook.enabled=false"]))?;
        eventually("every object gpu-pilot made is gone", Duration::from_secs(90), || async {
            let mut left = Vec::new();
            for o in render::objects(&ns, &values, Include::ALL).iter().filter(|o| o["kind"] != "Namespace") {
                if kubectl_gpu::cluster::objects::exists(&kube, o).await? {
                    left.push(key(o));
                }
            }
            Ok(if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) })
        })
        .await?;
        gpu_pilot_e2e::ensure_crd(&c).await?;

        // 4. Uninstall in a namespace where gpu-pilot never ran, full of look-alikes: nothing goes.
        namespaces.create(&pp, &serde_json::from_value(json!({"metadata": {"name": other}}))?).await?;
        let cms: Api<ConfigMap> = Api::namespaced(c.clone(), &other);
        cms.create(&pp, &serde_json::from_value(json!({"metadata": {"name": render::MIG_PARTED_CONFIG}}))?).await?;
        let sas: Api<ServiceAccount> = Api::namespaced(c.clone(), &other);
        sas.create(&pp, &serde_json::from_value(json!({"metadata": {"name": "gpu-pilot-controller"}}))?).await?;
        let cm_before = fingerprint(&cms, render::MIG_PARTED_CONFIG).await?;
        let sa_before = fingerprint(&sas, "gpu-pilot-controller").await?;
        let out = kubectl_gpu(&env, &["uninstall", "-n", &other, "--keep-crd", "--timeout", "10s"]).await?;
        let shown = text(&out);
        ensure!(out.status.success(), "uninstall among look-alikes failed:\n{shown}");
        ensure!(
            shown.contains(&format!("kept      ConfigMap/{other}/{}", render::MIG_PARTED_CONFIG))
                && shown.contains("nothing to remove"),
            "{shown}"
        );
        ensure!(fingerprint(&cms, render::MIG_PARTED_CONFIG).await? == cm_before, "the look-alike ConfigMap changed");
        ensure!(fingerprint(&sas, "gpu-pilot-controller").await? == sa_before, "the look-alike ServiceAccount changed");
        fingerprint(&namespaces, &other).await.context("the look-alikes' namespace")?;

        // 5. A namespace install created is install's: uninstall deletes it.
        let out = kubectl_gpu(&env, &["install", "-n", &fresh, "--set", "webhook.enabled=false", "--wait=false"]).await?;
        let shown = text(&out);
        ensure!(out.status.success() && shown.contains(&format!("created   Namespace/{fresh}")), "{shown}");
        let out = kubectl_gpu(&env, &["uninstall", "-n", &fresh, "--timeout", "10s"]).await?;
        let shown = text(&out);
        ensure!(out.status.success() && shown.contains(&format!("deleted   Namespace/{fresh}")), "{shown}");
        eventually("the namespace install created is gone", Duration::from_secs(90), || async {
            Ok(match namespaces.get_opt(&fresh).await? {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            })
        })
        .await?;
        Ok(())
    }
    .await;
    ctrl.stop();
    let _ = runtime_classes
        .delete("nvidia", &DeleteParams::default())
        .await;
    let _ = cluster_roles
        .delete("gpu-pilot-controller", &DeleteParams::default())
        .await;
    let _ = namespaces.delete(&other, &DeleteParams::default()).await;
    let _ = namespaces.delete(&fresh, &DeleteParams::default()).await;
    gpu_pilot_e2e::ensure_crd(&c).await?;
    result
}
