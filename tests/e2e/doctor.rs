//! `kubectl gpu doctor` against the controller tests' cluster (20 GPU and 5 CPU fake nodes) with
//! the real controller rolling a policy out: nothing wrong on the healthy cluster, then a table of
//! faults injected one at a time, each with the finding it must produce, each restored before the
//! next (and the cluster checked healthy again). A second scenario writes a support bundle.
//!
//! Without gpu-pilot's webhook installed the doctor reports one info finding,
//! `webhook-not-installed`, and nothing else: a healthy cluster exits 0.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use anyhow::{Context, ensure};
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{Component, gate_value, label, mig_config_state, resource, webhook};
use gpu_pilot_api::policy::PolicyState;
use gpu_pilot_e2e::controller::RunningController;
use gpu_pilot_e2e::{eventually, node_names};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use kubectl_gpu::cluster::Kube;
use kubectl_gpu::doctor::{Report, Severity};
use kubectl_gpu::global::Global;
use kubectl_gpu::ui::{ColorChoice, Output};
use serde_json::{Value, json};

use crate::TestFn;
use crate::controller::{Env, serial};

const GPU: i32 = 20;
const POLICY: &str = "cluster-policy";

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "doctor::healthy_cluster_then_one_finding_per_injected_fault",
            |_| Box::pin(serial(faults)),
        ),
        ("doctor::bundle_holds_what_its_readme_says", |_| {
            Box::pin(serial(bundle))
        }),
    ]
}

fn global(env: &Env) -> Global {
    Global {
        kubeconfig: Some(env.cluster.kubeconfig().to_path_buf()),
        context: None,
        namespace: env.ns.clone(),
        output: Output::Json,
        color: ColorChoice::Never,
    }
}

/// One doctor run with a fresh client, as the command makes it.
async fn doctor(env: &Env) -> anyhow::Result<Report> {
    let kube = Kube::connect(&global(env)).await?;
    let (report, _) =
        kubectl_gpu::doctor::diagnose(&kube, &env.ns, kubectl_gpu::doctor::Detail::Checked).await?;
    Ok(report)
}

fn brief(r: &Report) -> String {
    r.findings
        .iter()
        .map(|f| {
            format!(
                "{} {} [{}] {:?}",
                f.severity.as_str(),
                f.check,
                f.title,
                f.objects
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Healthy: no error or warning. Returns the report.
async fn wait_healthy(env: &Env, what: &str) -> anyhow::Result<Report> {
    eventually(
        &format!("doctor finds nothing wrong {what}"),
        Duration::from_secs(120),
        || async {
            let r = doctor(env).await?;
            Ok(if r.summary.errors == 0 && r.summary.warnings == 0 {
                Ok(r)
            } else {
                Err(brief(&r))
            })
        },
    )
    .await
}

async fn create_policy(c: &Client, name: &str) -> anyhow::Result<()> {
    let p: ClusterPolicy = serde_json::from_value(json!({
        "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
        "metadata": {"name": name}, "spec": {}
    }))?;
    Api::<ClusterPolicy>::all(c.clone())
        .create(&PostParams::default(), &p)
        .await?;
    Ok(())
}

async fn wait_ready(c: &Client) -> anyhow::Result<()> {
    let api: Api<ClusterPolicy> = Api::all(c.clone());
    eventually(
        "the policy ready on every GPU node",
        Duration::from_secs(180),
        || {
            let api = api.clone();
            async move {
                let p = api.get(POLICY).await?;
                let st = p.status.unwrap_or_default();
                Ok(
                    if st.state == Some(PolicyState::Ready) && st.ready_nodes == GPU {
                        Ok(())
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

async fn patch_node(c: &Client, name: &str, patch: Value) -> anyhow::Result<()> {
    Api::<Node>::all(c.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .with_context(|| format!("patching node {name}"))?;
    Ok(())
}

async fn label_node(c: &Client, name: &str, key: &str, value: Option<&str>) -> anyhow::Result<()> {
    patch_node(c, name, json!({"metadata": {"labels": {key: value}}})).await
}

pub(crate) use gpu_pilot_e2e::nodes::{add_fault_node, delete_node};

/// The faults, one at a time. Each says what it does, the finding it must produce, and is undone.
#[derive(Debug, Clone, Copy)]
enum Fault {
    DriverImagePull,
    DevicePluginCrashLoop,
    ValidatorInit,
    RuntimeClassDeleted,
    SecondPolicy,
    MigConfigFailed,
    GatePaused,
    PendingPodWants100Gpus,
    DriverVersionSkew,
    WebhookDeadUrl,
    NvidiaGpuOperatorCrd,
    NfdLabelsRemoved,
    ControllerStoppedPolicyEdited,
    NodeCordoned,
    UntoleratedTaint,
    DevicePluginConfigMissing,
    OperandsOptedOut,
    MigStrategyMismatch,
    UnhealthyGpu,
}

const FAULTS: [Fault; 19] = [
    Fault::DriverImagePull,
    Fault::DevicePluginCrashLoop,
    Fault::ValidatorInit,
    Fault::RuntimeClassDeleted,
    Fault::SecondPolicy,
    Fault::MigConfigFailed,
    Fault::GatePaused,
    Fault::PendingPodWants100Gpus,
    Fault::DriverVersionSkew,
    Fault::WebhookDeadUrl,
    Fault::NvidiaGpuOperatorCrd,
    Fault::NfdLabelsRemoved,
    Fault::ControllerStoppedPolicyEdited,
    Fault::NodeCordoned,
    Fault::UntoleratedTaint,
    Fault::DevicePluginConfigMissing,
    Fault::OperandsOptedOut,
    Fault::MigStrategyMismatch,
    Fault::UnhealthyGpu,
];

const PENDING_POD: &str = "doctor-e2e-wants-100-gpus";
const SECOND_POLICY: &str = "doctor-second-policy";
const NVIDIA_CRD: &str = "clusterpolicies.nvidia.com";

struct Ctx<'a> {
    env: &'a Env,
    /// GPU node names, sorted; faults use different ones.
    gpu: Vec<String>,
    ctrl: Option<RunningController>,
    /// A loopback port nothing listens on.
    dead_port: u16,
    /// What a node looked like before a fault changed it.
    saved: Option<Value>,
}

impl Ctx<'_> {
    fn c(&self) -> &Client {
        &self.env.client
    }

    fn start_controller(&mut self) {
        if self.ctrl.is_none() {
            self.ctrl = Some(RunningController::start(
                self.env.cluster.kubeconfig(),
                &self.env.ns,
                "doctor",
                false,
            ));
        }
    }

    fn stop_controller(&mut self) {
        if let Some(c) = self.ctrl.take() {
            c.stop();
        }
    }
}

/// What a fault must make the doctor report: check, severity, an affected object, and a piece
/// of the evidence (or title).
struct Expect {
    check: &'static str,
    severity: Severity,
    object: String,
    evidence: &'static str,
}

impl Fault {
    fn expect(self, x: &Ctx) -> Expect {
        let e = |check, severity, object: String, evidence| Expect {
            check,
            severity,
            object,
            evidence,
        };
        let node = |i: usize| format!("Node/{}", x.gpu[i]);
        match self {
            Fault::DriverImagePull => e(
                "stage-stuck",
                Severity::Error,
                "Node/fault.driver.imagepull".into(),
                "ImagePullBackOff, image nvcr.io/nvidia/driver:",
            ),
            Fault::DevicePluginCrashLoop => e(
                "stage-stuck",
                Severity::Error,
                "Node/fault.device-plugin.crashloop".into(),
                "CrashLoopBackOff",
            ),
            Fault::ValidatorInit => e(
                "stage-stuck",
                Severity::Error,
                "Node/fault.operator-validator.init".into(),
                "init container still running",
            ),
            Fault::RuntimeClassDeleted => e(
                "runtimeclass-missing",
                Severity::Error,
                "RuntimeClass/nvidia".into(),
                "",
            ),
            Fault::SecondPolicy => e(
                "multiple-cluster-policies",
                Severity::Warning,
                format!("ClusterPolicy/{SECOND_POLICY}"),
                "",
            ),
            Fault::MigConfigFailed => {
                e("mig-config-failed", Severity::Error, node(2), "all-1g.10gb")
            }
            Fault::GatePaused => e(
                "gate-paused",
                Severity::Warning,
                node(1),
                "paused-for-mig-change",
            ),
            Fault::PendingPodWants100Gpus => e(
                "pending-gpu-pods",
                Severity::Warning,
                format!("Pod/{}/{PENDING_POD}", x.env.ns),
                "Insufficient nvidia.com/gpu",
            ),
            Fault::DriverVersionSkew => e(
                "driver-version-skew",
                Severity::Warning,
                node(4),
                "550.54.15",
            ),
            Fault::WebhookDeadUrl => e(
                "webhook-unreachable",
                Severity::Error,
                format!("ValidatingWebhookConfiguration/{}", webhook::NAME),
                "cannot connect",
            ),
            Fault::NvidiaGpuOperatorCrd => e(
                "gpu-operator-installed",
                Severity::Error,
                NVIDIA_CRD.into(),
                "clusterpolicies.nvidia.com exists",
            ),
            Fault::NfdLabelsRemoved => e("no-gpu-nodes", Severity::Error, node(0), ""),
            Fault::ControllerStoppedPolicyEdited => e(
                "controller-not-running",
                Severity::Error,
                "Deployment/".into(),
                "observedGeneration",
            ),
            Fault::NodeCordoned => e("gpu-node-cordoned", Severity::Warning, node(5), ""),
            Fault::UntoleratedTaint => e(
                "taint-not-tolerated",
                Severity::Error,
                node(6),
                "doctor-e2e=ml:NoSchedule",
            ),
            Fault::DevicePluginConfigMissing => e(
                "device-plugin-config-missing",
                Severity::Error,
                node(7),
                "does-not-exist",
            ),
            Fault::OperandsOptedOut => e("operands-opted-out", Severity::Info, node(8), ""),
            Fault::MigStrategyMismatch => {
                e("mig-strategy-mismatch", Severity::Warning, node(9), "mixed")
            }
            Fault::UnhealthyGpu => e("gpu-unhealthy", Severity::Warning, node(10), "1 unhealthy"),
        }
    }

    async fn inject(self, x: &mut Ctx<'_>) -> anyhow::Result<()> {
        let c = x.c().clone();
        let g = x.gpu.clone();
        match self {
            Fault::DriverImagePull => add_fault_node(&c, "fault.driver.imagepull").await?,
            Fault::DevicePluginCrashLoop => {
                add_fault_node(&c, "fault.device-plugin.crashloop").await?
            }
            Fault::ValidatorInit => add_fault_node(&c, "fault.operator-validator.init").await?,
            Fault::RuntimeClassDeleted => {
                x.stop_controller();
                Api::<RuntimeClass>::all(c)
                    .delete("nvidia", &DeleteParams::default())
                    .await?;
            }
            Fault::SecondPolicy => create_policy(&c, SECOND_POLICY).await?,
            Fault::MigConfigFailed => {
                patch_node(
                    &c,
                    &g[2],
                    json!({"metadata": {"labels": {
                        (label::MIG_CONFIG): "all-1g.10gb",
                        (label::MIG_CONFIG_STATE): mig_config_state::FAILED,
                    }}}),
                )
                .await?
            }
            Fault::GatePaused => {
                label_node(
                    &c,
                    &g[1],
                    &label::deploy_gate(Component::DevicePlugin),
                    Some(gate_value::PAUSED_FOR_MIG_CHANGE),
                )
                .await?
            }
            Fault::PendingPodWants100Gpus => {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": PENDING_POD},
                    "spec": {"containers": [{"name": "train", "image": "example.com/train:1",
                        "resources": {"limits": {(resource::GPU): "100"}}}]},
                }))?;
                Api::<Pod>::namespaced(c, &x.env.ns)
                    .create(&PostParams::default(), &pod)
                    .await?;
            }
            Fault::DriverVersionSkew => {
                label_node(&c, &g[3], label::CUDA_DRIVER_FULL, Some("580.95.05")).await?;
                label_node(&c, &g[4], label::CUDA_DRIVER_FULL, Some("550.54.15")).await?;
            }
            Fault::WebhookDeadUrl => {
                let cfg: ValidatingWebhookConfiguration = serde_json::from_value(json!({
                    "metadata": {"name": webhook::NAME},
                    "webhooks": [{
                        "name": webhook::VALIDATE_POLICY_WEBHOOK,
                        "admissionReviewVersions": ["v1"], "sideEffects": "None",
                        "failurePolicy": "Ignore",
                        "clientConfig": {"url": format!("https://127.0.0.1:{}{}", x.dead_port, webhook::VALIDATE_POLICY_PATH)},
                        // Matches nothing, so no request of another test ever waits on it.
                        "objectSelector": {"matchLabels": {"gpupilot.io/doctor-e2e": "never"}},
                        "rules": [{"apiGroups": ["gpupilot.io"], "apiVersions": ["*"],
                                   "operations": ["CREATE"], "resources": ["clusterpolicies"]}],
                    }],
                }))?;
                Api::<ValidatingWebhookConfiguration>::all(c)
                    .create(&PostParams::default(), &cfg)
                    .await?;
            }
            Fault::NvidiaGpuOperatorCrd => {
                let crd: CustomResourceDefinition = serde_json::from_value(json!({
                    "metadata": {"name": NVIDIA_CRD},
                    "spec": {
                        "group": "nvidia.com", "scope": "Cluster",
                        "names": {"plural": "clusterpolicies", "singular": "clusterpolicy",
                                  "kind": "ClusterPolicy", "listKind": "ClusterPolicyList"},
                        "versions": [{"name": "v1", "served": true, "storage": true,
                            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}],
                    },
                }))?;
                Api::<CustomResourceDefinition>::all(c)
                    .create(&PostParams::default(), &crd)
                    .await?;
            }
            Fault::NfdLabelsRemoved => {
                x.stop_controller();
                for n in &g {
                    label_node(&c, n, label::NFD_PCI_10DE, None).await?;
                }
            }
            Fault::ControllerStoppedPolicyEdited => {
                x.stop_controller();
                Api::<ClusterPolicy>::all(c)
                    .patch(
                        POLICY,
                        &PatchParams::default(),
                        &Patch::Merge(
                            json!({"spec": {"daemonsets": {"rollingUpdate": {"maxUnavailable": "2"}}}}),
                        ),
                    )
                    .await?;
            }
            Fault::NodeCordoned => {
                patch_node(&c, &g[5], json!({"spec": {"unschedulable": true}})).await?
            }
            Fault::UntoleratedTaint => {
                let node = Api::<Node>::all(c.clone()).get(&g[6]).await?;
                let mut taints: Vec<Value> = node
                    .spec
                    .and_then(|s| s.taints)
                    .unwrap_or_default()
                    .into_iter()
                    .map(serde_json::to_value)
                    .collect::<Result<_, _>>()?;
                x.saved = Some(json!(taints.clone()));
                taints.push(json!({"key": "doctor-e2e", "value": "ml", "effect": "NoSchedule"}));
                patch_node(&c, &g[6], json!({"spec": {"taints": taints}})).await?
            }
            Fault::DevicePluginConfigMissing => {
                label_node(
                    &c,
                    &g[7],
                    label::DEVICE_PLUGIN_CONFIG,
                    Some("does-not-exist"),
                )
                .await?
            }
            Fault::OperandsOptedOut => {
                label_node(
                    &c,
                    &g[8],
                    label::DEPLOY_OPERANDS,
                    Some(gate_value::DISABLED),
                )
                .await?
            }
            Fault::MigStrategyMismatch => {
                label_node(&c, &g[9], label::MIG_STRATEGY, Some("mixed")).await?
            }
            Fault::UnhealthyGpu => {
                let node = Api::<Node>::all(c.clone()).get(&g[10]).await?;
                let cap = node
                    .status
                    .as_ref()
                    .and_then(|s| s.capacity.as_ref())
                    .and_then(|c| c.get(resource::GPU))
                    .map(|q| q.0.clone())
                    .context("GPU capacity")?;
                x.saved = Some(json!(cap.clone()));
                let less = cap.parse::<i64>()? - 1;
                Api::<Node>::all(c)
                    .patch_status(
                        &g[10],
                        &PatchParams::default(),
                        &Patch::Merge(
                            json!({"status": {"allocatable": {(resource::GPU): less.to_string()}}}),
                        ),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn restore(self, x: &mut Ctx<'_>) -> anyhow::Result<()> {
        let c = x.c().clone();
        let g = x.gpu.clone();
        match self {
            Fault::DriverImagePull => delete_node(&c, "fault.driver.imagepull").await?,
            Fault::DevicePluginCrashLoop => delete_node(&c, "fault.device-plugin.crashloop").await?,
            Fault::ValidatorInit => delete_node(&c, "fault.operator-validator.init").await?,
            Fault::RuntimeClassDeleted => x.start_controller(),
            Fault::SecondPolicy => {
                let api: Api<ClusterPolicy> = Api::all(c);
                let _ = api
                    .patch(
                        SECOND_POLICY,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
                let _ = api.delete(SECOND_POLICY, &DeleteParams::default()).await;
            }
            Fault::MigConfigFailed => {
                patch_node(
                    &c,
                    &g[2],
                    json!({"metadata": {"labels": {(label::MIG_CONFIG): null, (label::MIG_CONFIG_STATE): null}}}),
                )
                .await?
            }
            Fault::GatePaused => {
                label_node(
                    &c,
                    &g[1],
                    &label::deploy_gate(Component::DevicePlugin),
                    Some(gate_value::ENABLED),
                )
                .await?
            }
            Fault::PendingPodWants100Gpus => {
                let _ = Api::<Pod>::namespaced(c, &x.env.ns)
                    .delete(PENDING_POD, &DeleteParams::default().grace_period(0))
                    .await;
            }
            Fault::DriverVersionSkew => {
                label_node(&c, &g[3], label::CUDA_DRIVER_FULL, None).await?;
                label_node(&c, &g[4], label::CUDA_DRIVER_FULL, None).await?;
            }
            Fault::WebhookDeadUrl => {
                let _ = Api::<ValidatingWebhookConfiguration>::all(c)
                    .delete(webhook::NAME, &DeleteParams::default())
                    .await;
            }
            Fault::NvidiaGpuOperatorCrd => {
                let _ = Api::<CustomResourceDefinition>::all(c)
                    .delete(NVIDIA_CRD, &DeleteParams::default())
                    .await;
            }
            Fault::NfdLabelsRemoved => {
                for n in &g {
                    label_node(&c, n, label::NFD_PCI_10DE, Some("true")).await?;
                }
                x.start_controller();
            }
            Fault::ControllerStoppedPolicyEdited => {
                Api::<ClusterPolicy>::all(c)
                    .patch(
                        POLICY,
                        &PatchParams::default(),
                        &Patch::Merge(
                            json!({"spec": {"daemonsets": {"rollingUpdate": {"maxUnavailable": "1"}}}}),
                        ),
                    )
                    .await?;
                x.start_controller();
            }
            Fault::NodeCordoned => {
                patch_node(&c, &g[5], json!({"spec": {"unschedulable": null}})).await?
            }
            Fault::UntoleratedTaint => {
                let before = x.saved.take().unwrap_or(json!([]));
                let taints = if before.as_array().is_some_and(Vec::is_empty) {
                    Value::Null
                } else {
                    before
                };
                patch_node(&c, &g[6], json!({"spec": {"taints": taints}})).await?
            }
            Fault::DevicePluginConfigMissing => {
                label_node(&c, &g[7], label::DEVICE_PLUGIN_CONFIG, None).await?
            }
            Fault::OperandsOptedOut => label_node(&c, &g[8], label::DEPLOY_OPERANDS, None).await?,
            Fault::MigStrategyMismatch => label_node(&c, &g[9], label::MIG_STRATEGY, None).await?,
            Fault::UnhealthyGpu => {
                if let Some(cap) = x.saved.take() {
                    Api::<Node>::all(c)
                        .patch_status(
                            &g[10],
                            &PatchParams::default(),
                            &Patch::Merge(json!({"status": {"allocatable": {(resource::GPU): cap}}})),
                        )
                        .await?;
                }
            }
        }
        Ok(())
    }
}

fn dead_port() -> u16 {
    // Bound and released at once: nothing listens there afterwards.
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(1)
}

async fn faults(env: Env) -> anyhow::Result<()> {
    let gpu = node_names(&env.client, true).await?;
    ensure!(
        gpu.len() >= 11,
        "want at least 11 GPU nodes, have {}",
        gpu.len()
    );
    let mut x = Ctx {
        env: &env,
        gpu,
        ctrl: None,
        dead_port: dead_port(),
        saved: None,
    };
    x.start_controller();
    create_policy(&env.client, POLICY).await?;
    let result = run_faults(&mut x).await;
    x.stop_controller();
    result
}

async fn run_faults(x: &mut Ctx<'_>) -> anyhow::Result<()> {
    let env = x.env;
    wait_ready(&env.client).await?;
    let healthy = wait_healthy(env, "on the healthy cluster").await?;
    // The one finding without a webhook: info, and the exit code stays 0.
    ensure!(
        healthy.exit_code() == 0
            && healthy.findings.len() == 1
            && healthy.findings[0].check == "webhook-not-installed"
            && healthy.findings[0].severity == Severity::Info,
        "healthy cluster: {}",
        brief(&healthy)
    );
    ensure!(
        healthy.gpu_nodes == GPU as usize,
        "{} GPU nodes",
        healthy.gpu_nodes
    );
    let base = healthy.requests;
    ensure!(
        base == kubectl_gpu::doctor::snapshot::SNAPSHOT_REQUESTS,
        "{base} requests, the snapshot is {}",
        kubectl_gpu::doctor::snapshot::SNAPSHOT_REQUESTS
    );
    eprintln!(
        "doctor e2e: healthy cluster: {} nodes, {} API requests, {:.2} s",
        healthy.nodes, base, healthy.seconds
    );

    let mut table = Vec::new();
    for fault in FAULTS {
        let want = fault.expect(x);
        let injected = fault.inject(x).await;
        let seen = match injected {
            Ok(()) => {
                eventually(
                    &format!(
                        "{fault:?}: doctor reports {} {}",
                        want.severity.as_str(),
                        want.check
                    ),
                    Duration::from_secs(150),
                    || async {
                        let r = doctor(env).await?;
                        let hit = r.findings.iter().find(|f| {
                            f.check == want.check
                                && f.severity == want.severity
                                && f.objects.iter().any(|o| o.contains(&want.object))
                                && (want.evidence.is_empty()
                                    || f.title.contains(want.evidence)
                                    || f.evidence.iter().any(|e| e.contains(want.evidence)))
                        });
                        Ok(match hit {
                            Some(f) => Ok((f.clone(), r.requests, r.exit_code())),
                            None => Err(brief(&r)),
                        })
                    },
                )
                .await
            }
            Err(e) => Err(e.context(format!("injecting {fault:?}"))),
        };
        let restored = fault.restore(x).await;
        let (finding, requests, code) = seen?;
        restored.with_context(|| format!("restoring after {fault:?}"))?;
        ensure!(
            !finding.fix.is_empty() && !finding.evidence.is_empty(),
            "{fault:?}: a finding without evidence or fix: {finding:?}"
        );
        let want_code = match want.severity {
            Severity::Error => 2,
            Severity::Warning => 1,
            Severity::Info => 0,
        };
        ensure!(code >= want_code, "{fault:?}: exit code {code}");
        // A fixed number of requests, plus at most the bounded log reads of failing pods.
        ensure!(
            requests >= base
                && requests <= base + kubectl_gpu::doctor::snapshot::MAX_LOG_PODS as u64,
            "{fault:?}: {requests} requests, healthy took {base}"
        );
        let after = wait_healthy(env, &format!("after undoing {fault:?}")).await?;
        ensure!(
            after.requests == base,
            "healthy again with {} requests, not {base}",
            after.requests
        );
        table.push(format!(
            "  {:<32} {:<8} {:<30} {}",
            format!("{fault:?}"),
            want.severity.as_str(),
            want.check,
            finding.title
        ));
    }
    eprintln!("doctor e2e: fault -> finding\n{}", table.join("\n"));
    Ok(())
}

async fn bundle(env: Env) -> anyhow::Result<()> {
    let c = &env.client;
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &env.ns, "doctor-bundle", false);
    create_policy(c, POLICY).await?;
    // A Secret whose value must not reach the bundle.
    let secret_value = "doctor-e2e-s3cr3t-value";
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "doctor-e2e-secret"},
        "stringData": {"password": secret_value},
    }))?;
    Api::<Secret>::namespaced(c.clone(), &env.ns)
        .create(&PostParams::default(), &secret)
        .await?;
    let dir = std::env::temp_dir().join(format!("gpu-pilot-doctor-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("support.tar.gz");
    let result = async {
        wait_ready(c).await?;
        wait_healthy(&env, "before the bundle").await?;
        // The command itself, as `kubectl gpu doctor -o yaml --bundle FILE` runs it: exit 0.
        let args = kubectl_gpu::doctor::DoctorArgs {
            bundle: Some(path.clone()),
            list_checks: false,
        };
        let mut g = global(&env);
        g.output = Output::Yaml;
        let code = kubectl_gpu::doctor::run(&g, args).await?;
        ensure!(code == 0, "doctor exited {code} on the healthy cluster");
        ensure!(path.is_file(), "no bundle at {}", path.display());
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut archive =
            tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&path)?));
        for e in archive.entries()? {
            let mut e = e?;
            let name = e.path()?.to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            let short = name
                .strip_prefix("gpu-pilot-bundle/")
                .with_context(|| format!("{name} outside gpu-pilot-bundle/"))?
                .to_string();
            files.insert(short, data);
        }
        let text = |name: &str| -> anyhow::Result<String> {
            Ok(String::from_utf8(
                files
                    .get(name)
                    .with_context(|| format!("{name} missing"))?
                    .clone(),
            )?)
        };
        let readme = text("README.txt")?;
        for name in files.keys().filter(|n| *n != "README.txt") {
            ensure!(
                readme.contains(name.as_str()),
                "README.txt does not list {name}:\n{readme}"
            );
        }
        let findings: Report = serde_json::from_str(&text("findings.json")?)?;
        ensure!(
            findings.summary.errors == 0
                && findings.summary.warnings == 0
                && findings.requests == kubectl_gpu::doctor::snapshot::SNAPSHOT_REQUESTS
                && findings.gpu_nodes == GPU as usize,
            "{findings:?}"
        );
        let version: Value = serde_json::from_str(&text("version.json")?)?;
        ensure!(
            version["kubernetes"]
                .as_str()
                .is_some_and(|v| v.starts_with("v1.")),
            "{version}"
        );
        let nodes = text("nodes.yaml")?;
        for n in node_names(c, true).await? {
            ensure!(nodes.contains(&n), "nodes.yaml lacks {n}");
        }
        ensure!(!nodes.contains("managedFields"), "managedFields kept");
        ensure!(text("clusterpolicies.yaml")?.contains(POLICY));
        let pods = text("pods.yaml")?;
        for comp in Component::ALL {
            ensure!(
                pods.contains(&comp.daemonset_name()),
                "pods.yaml lacks {}",
                comp.daemonset_name()
            );
        }
        let logs: Vec<&String> = files.keys().filter(|n| n.starts_with("logs/")).collect();
        ensure!(
            logs.len() >= Component::ALL.len()
                && logs.len() <= kubectl_gpu::doctor::bundle::MAX_LOG_PODS * 4,
            "{} log files: {logs:?}",
            logs.len()
        );
        for (name, data) in &files {
            ensure!(
                !String::from_utf8_lossy(data).contains(secret_value),
                "{name} holds the Secret's value"
            );
        }
        eprintln!(
            "doctor e2e: bundle with {} files, {} KiB",
            files.len(),
            std::fs::metadata(&path)?.len().div_ceil(1024)
        );
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    ctrl.stop();
    result
}
