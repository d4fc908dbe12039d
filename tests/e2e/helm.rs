//! The Helm chart and the krew package, with the real tools (built by scripts/build-tools):
//!
//! - `helm template` renders, object by object, what `kubectl gpu install --dry-run -o yaml`
//!   renders for the same values and namespace (the Namespace aside: Helm makes it with
//!   `--create-namespace`), CRD included, for a range of value sets;
//! - `helm lint --strict` is clean, and the chart's values.schema.json makes Helm reject a
//!   misspelt key, naming it;
//! - `helm install`, `upgrade` and `uninstall` on the controller tests' cluster, with the
//!   controller and the webhook running in this process;
//! - the release archive installs with the real krew, and the real kubectl runs it as
//!   `kubectl gpu`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{Component, label, webhook as webhook_names};
use gpu_pilot_api::policy::PolicyState;
use gpu_pilot_core::render::install::{self as render, Include};
use gpu_pilot_e2e::controller::RunningController;
use gpu_pilot_e2e::{Cluster, eventually, node_names, repo_root};
use gpu_pilot_webhook::certs::CertSettings;
use gpu_pilot_webhook::cluster::Scope;
use gpu_pilot_webhook::metrics::Outcome;
use gpu_pilot_webhook::server::Limits;
use gpu_pilot_webhook::{CertSource, Options, Running};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::TestFn;
use gpu_pilot_e2e::serial::{Env, serial};
use gpu_pilot_e2e::tools::{cargo_target_dir, helm, run_ok, shown, tools_with};

const RELEASE: &str = "gpu-pilot";
const VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "helm::template_renders_what_kubectl_gpu_install_renders",
            |_| Box::pin(template_parity()),
        ),
        ("helm::lint_strict_is_clean_and_chart_is_versioned", |_| {
            Box::pin(lint())
        }),
        ("helm::values_schema_rejects_a_misspelt_key", |_| {
            Box::pin(schema_enforced())
        }),
        (
            "helm::install_upgrade_uninstall_on_the_local_cluster",
            |_| Box::pin(serial(lifecycle)),
        ),
        (
            "helm::krew_installs_the_release_archive_and_kubectl_runs_it",
            |c| Box::pin(krew(c)),
        ),
    ]
}

fn chart() -> PathBuf {
    repo_root().join("charts/gpu-pilot")
}

/// Every document of a YAML stream, nulls dropped (the apiserver reads a null field as an
/// absent one; kubectl-gpu writes `namespace: null` on cluster-scoped RBAC), keyed by
/// kind/namespace/name.
fn objects_of(yaml: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if v.is_null() {
            continue;
        }
        let v = without_nulls(v);
        let key = gpu_pilot_core::render::key(&v);
        ensure!(
            out.insert(key.clone(), v).is_none(),
            "{key} is rendered twice"
        );
    }
    Ok(out)
}

fn without_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(without_nulls).collect()),
        v => v,
    }
}

/// Where two values differ, as `path: kubectl-gpu <a> | helm <b>` lines.
fn differences(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => differences(va, vb, &p, out),
                    (va, vb) => out.push(format!(
                        "  {p}: kubectl-gpu {} | helm {}",
                        brief(va),
                        brief(vb)
                    )),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                differences(va, vb, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!(
            "  {path}: kubectl-gpu {} | helm {}",
            brief(Some(a)),
            brief(Some(b))
        )),
        _ => {}
    }
}

fn brief(v: Option<&Value>) -> String {
    match v {
        None => "(absent)".into(),
        Some(v) => {
            let s = v.to_string();
            if s.len() > 200 {
                format!("{}...", &s[..s.floor_char_boundary(197)])
            } else {
                s
            }
        }
    }
}

/// What `kubectl gpu -n <ns> install --dry-run -o yaml <args>` prints, parsed, without the
/// Namespace: the same CLI parsing, values and rendering as the binary.
fn kubectl_gpu_objects(ns: &str, args: &[String]) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut argv: Vec<String> = [
        "kubectl-gpu",
        "-n",
        ns,
        "install",
        "--dry-run",
        "-o",
        "yaml",
    ]
    .map(String::from)
    .to_vec();
    argv.extend(args.iter().cloned());
    let cli = kubectl_gpu::cli::Cli::try_parse_from(&argv)
        .with_context(|| format!("kubectl gpu {argv:?}"))?;
    let kubectl_gpu::cli::Command::Install(install) = cli.command else {
        bail!("{argv:?} is not an install command");
    };
    let values = kubectl_gpu::install::load_values(&install)?;
    let yaml = gpu_pilot_core::render::to_yaml(&render::objects(
        &cli.global.namespace,
        &values,
        Include::ALL,
    ));
    let mut objs = objects_of(&yaml)?;
    objs.retain(|_, o| o["kind"] != "Namespace");
    Ok(objs)
}

/// `helm template gpu-pilot charts/gpu-pilot -n <ns> --include-crds --no-hooks <args>`, parsed.
async fn helm_objects(
    tools: &Path,
    home: &Path,
    ns: &str,
    args: &[String],
) -> anyhow::Result<BTreeMap<String, Value>> {
    let yaml = run_ok(
        helm(tools, home)
            .args(["template", RELEASE])
            .arg(chart())
            // The uninstall hooks are Helm's alone (kubectl gpu uninstall does their work itself).
            .args(["--namespace", ns, "--include-crds", "--no-hooks"])
            .args(args),
        &format!("helm template {}", args.join(" ")),
    )
    .await?;
    objects_of(&yaml)
}

/// One value set, as each tool spells it, and what it must show in the output (so that a
/// value both tools ignored cannot pass).
struct Case {
    name: &'static str,
    namespace: &'static str,
    kubectl_gpu: Vec<String>,
    helm: Vec<String>,
    /// (object key, JSON pointer, expected value)
    expect: Vec<(String, &'static str, Value)>,
}

fn same(name: &'static str, namespace: &'static str, args: &[&str]) -> Case {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    Case {
        name,
        namespace,
        kubectl_gpu: args.clone(),
        helm: args,
        expect: Vec::new(),
    }
}

const POLICY: &str = "ClusterPolicy/cluster-policy";

fn deployment(ns: &str, name: &str) -> String {
    format!("Deployment/{ns}/{name}")
}

fn cases(values_file: &Path) -> Vec<Case> {
    let file = values_file.to_string_lossy().into_owned();
    let mut out = Vec::new();

    let mut c = same("defaults", "gpu-pilot", &[]);
    c.expect = vec![
        (POLICY.into(), "/spec/mig/strategy", json!("single")),
        (
            deployment("gpu-pilot", "gpu-pilot-controller"),
            "/spec/template/spec/containers/0/image",
            json!(format!("ghcr.io/gpu-pilot/gpu-pilot-controller:v{VERSION}")),
        ),
        (
            "CustomResourceDefinition/clusterpolicies.gpupilot.io".into(),
            "/spec/group",
            json!("gpupilot.io"),
        ),
    ];
    out.push(c);

    let mut c = same(
        "host driver and toolkit",
        "gpu-pilot",
        &[
            "--set",
            "driver.enabled=false",
            "--set",
            "toolkit.enabled=false",
        ],
    );
    c.expect = vec![
        (POLICY.into(), "/spec/driver/enabled", json!(false)),
        (POLICY.into(), "/spec/toolkit/enabled", json!(false)),
    ];
    out.push(c);

    let mut c = same("mixed MIG", "gpu-pilot", &["--set", "mig.strategy=mixed"]);
    c.expect = vec![(POLICY.into(), "/spec/mig/strategy", json!("mixed"))];
    out.push(c);

    let mut c = same("values file", "ops", &["-f", &file]);
    c.expect = vec![
        (
            POLICY.into(),
            "/spec/daemonsets/tolerations/0/key",
            json!("dedicated"),
        ),
        (POLICY.into(), "/spec/daemonsets/labels/team", json!("ml")),
        (
            POLICY.into(),
            "/spec/operator/labels/cost-center",
            json!("42"),
        ),
        (
            POLICY.into(),
            "/spec/driver/resources/limits/memory",
            json!("2Gi"),
        ),
        (
            deployment("ops", "gpu-pilot-controller"),
            "/spec/template/spec/containers/0/resources/requests/cpu",
            json!("250m"),
        ),
        (
            deployment("ops", "gpu-pilot-controller"),
            "/spec/template/spec/imagePullSecrets/1/name",
            json!("other"),
        ),
        (
            deployment("ops", "gpu-pilot-webhook"),
            "/spec/template/spec/containers/0/resources/limits/cpu",
            json!("1"),
        ),
        (
            deployment("ops", "gpu-pilot-controller"),
            "/spec/replicas",
            json!(2),
        ),
    ];
    out.push(c);

    let mut c = same(
        "no webhook",
        "gpu-pilot",
        &["--set", "webhook.enabled=false"],
    );
    c.expect = vec![(
        POLICY.into(),
        "/spec/operator/runtimeClass",
        json!("nvidia"),
    )];
    out.push(c);

    let mut c = same(
        "cert-manager",
        "gpu-system",
        &["--set", "webhook.certManager.enabled=true"],
    );
    c.expect = vec![
        (
            "Certificate/gpu-system/gpu-pilot-webhook".into(),
            "/spec/dnsNames/0",
            json!("gpu-pilot-webhook.gpu-system.svc"),
        ),
        (
            "MutatingWebhookConfiguration/gpu-pilot-webhook".into(),
            "/metadata/annotations/cert-manager.io~1inject-ca-from",
            json!("gpu-system/gpu-pilot-webhook"),
        ),
    ];
    out.push(c);

    let mut c = same(
        "webhook by URL with a CA bundle",
        "gpu-pilot",
        &[
            "--set",
            "webhook.url=https://127.0.0.1:9443/",
            "--set",
            "webhook.caBundle=UEVNIGJ1bmRsZQ==",
            "--set",
            "webhook.failurePolicy=Ignore",
        ],
    );
    c.expect = vec![
        (
            "ValidatingWebhookConfiguration/gpu-pilot-webhook".into(),
            "/webhooks/0/clientConfig/url",
            json!("https://127.0.0.1:9443/validate/clusterpolicy"),
        ),
        (
            "MutatingWebhookConfiguration/gpu-pilot-webhook".into(),
            "/webhooks/0/clientConfig/caBundle",
            json!("UEVNIGJ1bmRsZQ=="),
        ),
        (
            "MutatingWebhookConfiguration/gpu-pilot-webhook".into(),
            "/webhooks/0/failurePolicy",
            json!("Ignore"),
        ),
    ];
    out.push(c);

    let mut c = same(
        "pinned images, a digest, no repository",
        "gpu-pilot",
        &[
            "--set",
            "operator.version=v0.0.9",
            "--set",
            "webhook.version=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "--set",
            "webhook.repository=",
        ],
    );
    c.expect = vec![
        (
            deployment("gpu-pilot", "gpu-pilot-controller"),
            "/spec/template/spec/containers/0/image",
            json!("ghcr.io/gpu-pilot/gpu-pilot-controller:v0.0.9"),
        ),
        (
            deployment("gpu-pilot", "gpu-pilot-webhook"),
            "/spec/template/spec/containers/0/image",
            json!(
                "gpu-pilot-webhook@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            ),
        ),
    ];
    out.push(c);

    // `kubectl gpu install --version` is the chart's six version keys.
    let sections = [
        "operator",
        "webhook",
        "devicePlugin",
        "gfd",
        "migManager",
        "validator",
    ];
    let mut c = Case {
        name: "install --version = --set-string <section>.version",
        namespace: "gpu-pilot",
        kubectl_gpu: vec!["--version".into(), "v0.3.0".into()],
        helm: vec![
            "--set-string".into(),
            sections
                .iter()
                .map(|s| format!("{s}.version=v0.3.0"))
                .collect::<Vec<_>>()
                .join(","),
        ],
        expect: vec![(POLICY.into(), "/spec/devicePlugin/version", json!("v0.3.0"))],
    };
    c.expect.push((
        deployment("gpu-pilot", "gpu-pilot-webhook"),
        "/spec/template/spec/containers/0/image",
        json!("ghcr.io/gpu-pilot/gpu-pilot-webhook:v0.3.0"),
    ));
    out.push(c);

    // Helm's --set grammar: lists, escaped commas, --set-string, null removing a key.
    let mut c = same(
        "--set lists, escapes, strings and null",
        "gpu-pilot",
        &[
            "--set",
            "devicePlugin.args={--fail-on-init-error,--pass-device-specs}",
            "--set",
            "operator.labels.team=ml\\,infra",
            "--set-string",
            "driver.version=550",
            "--set",
            "operator.resources=null",
            "--set",
            "daemonsets.tolerations[0].key=gpu,daemonsets.tolerations[0].operator=Exists",
        ],
    );
    c.expect = vec![
        (
            POLICY.into(),
            "/spec/devicePlugin/args/1",
            json!("--pass-device-specs"),
        ),
        (
            POLICY.into(),
            "/spec/operator/labels/team",
            json!("ml,infra"),
        ),
        (POLICY.into(), "/spec/driver/version", json!("550")),
        (
            POLICY.into(),
            "/spec/daemonsets/tolerations/0/key",
            json!("gpu"),
        ),
        (
            deployment("gpu-pilot", "gpu-pilot-controller"),
            "/spec/template/spec/containers/0/resources",
            json!({}),
        ),
    ];
    out.push(c);
    out
}

/// NVIDIA's own chart values (from its Go module), plus the keys install makes objects of: the
/// config.create/data ConfigMaps, extraObjects, the controller's placement and logging.
fn nvidia_values_case(dir: &Path) -> anyhow::Result<Case> {
    let nvidia =
        gpu_pilot_e2e::nvidia::gpu_operator_module()?.join("deployments/gpu-operator/values.yaml");
    let extra = dir.join("nvidia-extra.yaml");
    std::fs::write(&extra, NVIDIA_EXTRA)?;
    let args: Vec<String> = [
        "-f".to_string(),
        nvidia.to_string_lossy().into_owned(),
        "-f".to_string(),
        extra.to_string_lossy().into_owned(),
    ]
    .to_vec();
    let ns = "gpu-operator";
    Ok(Case {
        name: "NVIDIA's values.yaml and its chart-only keys",
        namespace: ns,
        kubectl_gpu: args.clone(),
        helm: args,
        expect: vec![
            (
                POLICY.into(),
                "/spec/driver/useNvidiaDriverCRD",
                json!(false),
            ),
            (
                POLICY.into(),
                "/spec/migManager/config/name",
                json!("default-mig-parted-config"),
            ),
            (
                deployment(ns, "gpu-pilot-controller"),
                "/spec/template/spec/containers/0/image",
                json!(format!("ghcr.io/gpu-pilot/gpu-pilot-controller:v{VERSION}")),
            ),
            (
                deployment(ns, "gpu-pilot-controller"),
                "/spec/template/spec/tolerations/0/key",
                json!("node-role.kubernetes.io/master"),
            ),
            (
                deployment(ns, "gpu-pilot-controller"),
                "/spec/template/spec/priorityClassName",
                json!("system-node-critical"),
            ),
            (
                deployment(ns, "gpu-pilot-controller"),
                "/spec/template/spec/containers/0/args/6",
                json!("text"),
            ),
            (
                format!("ConfigMap/{ns}/dp-config"),
                "/metadata/labels/app.kubernetes.io~1component",
                json!("values-config"),
            ),
            (
                format!("ConfigMap/{ns}/dcgm-metrics"),
                "/data/dcgm-metrics.csv",
                json!("DCGM_FI_DEV_SM_CLOCK, gauge, SM clock frequency (in MHz)."),
            ),
            (format!("ConfigMap/{ns}/extra-a"), "/data/a", json!("b")),
            (format!("Secret/{ns}/extra-b"), "/stringData/c", json!("d")),
        ],
    })
}

const NVIDIA_EXTRA: &str = "\
devicePlugin:
  config:
    name: dp-config
    create: true
    data:
      default: |-
        version: v1
        flags:
          migStrategy: none
dcgmExporter:
  config:
    name: dcgm-metrics
    create: true
    data: DCGM_FI_DEV_SM_CLOCK, gauge, SM clock frequency (in MHz).
extraObjects:
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: extra-a, namespace: gpu-operator}
  data: {a: b}
- |
  apiVersion: v1
  kind: Secret
  metadata:
    name: extra-b
    namespace: gpu-operator
  stringData: {c: d}
operator:
  nodeSelector: {kubernetes.io/os: linux}
  logging: {level: 4, develMode: true}
";

const VALUES_FILE: &str = "\
daemonsets:
  tolerations:
  - key: dedicated
    operator: Equal
    value: gpu
    effect: NoSchedule
  labels:
    team: ml
  annotations:
    example.com/owner: platform
  priorityClassName: gpu-critical
operator:
  replicas: 2
  labels:
    cost-center: \"42\"
  annotations:
    example.com/note: set by a values file
  imagePullSecrets: [regcred, other]
  resources:
    requests:
      cpu: 250m
      memory: 128Mi
webhook:
  replicas: 3
  imagePullSecrets: [regcred]
  resources:
    limits:
      cpu: \"1\"
      memory: 512Mi
driver:
  env:
  - name: DRIVER_OPTS
    value: nvreg
  args: [--accept-license]
  resources:
    limits:
      memory: 2Gi
gfd:
  enabled: false
";

async fn template_parity() -> anyhow::Result<()> {
    let tools = tools_with(&["helm"])?;
    let home = tempfile::tempdir()?;
    let values_file = home.path().join("values.yaml");
    std::fs::write(&values_file, VALUES_FILE)?;
    let mut failures = Vec::new();
    let mut compared = 0;
    let mut all = cases(&values_file);
    all.push(nvidia_values_case(home.path())?);
    for case in all {
        let ours = kubectl_gpu_objects(case.namespace, &case.kubectl_gpu)
            .with_context(|| format!("case {:?}: kubectl gpu install", case.name))?;
        let theirs = helm_objects(&tools, home.path(), case.namespace, &case.helm)
            .await
            .with_context(|| format!("case {:?}", case.name))?;
        let mut problems = Vec::new();
        for k in ours.keys().filter(|k| !theirs.contains_key(*k)) {
            problems.push(format!("  {k}: rendered by kubectl gpu install only"));
        }
        for k in theirs.keys().filter(|k| !ours.contains_key(*k)) {
            problems.push(format!("  {k}: rendered by helm template only"));
        }
        for (k, a) in &ours {
            if let Some(b) = theirs.get(k) {
                let mut d = Vec::new();
                differences(a, b, "", &mut d);
                if !d.is_empty() {
                    problems.push(format!("  {k}:"));
                    problems.extend(d.into_iter().map(|l| format!("  {l}")));
                }
            }
        }
        for (key, pointer, want) in &case.expect {
            let got = theirs.get(key).and_then(|o| o.pointer(pointer));
            if got != Some(want) {
                problems.push(format!(
                    "  {key}{pointer}: expected {want}, helm rendered {}",
                    brief(got)
                ));
            }
        }
        ensure!(
            ours.contains_key(POLICY)
                && ours.contains_key("CustomResourceDefinition/clusterpolicies.gpupilot.io"),
            "case {:?}: the rendering lacks the policy or the CRD: {:?}",
            case.name,
            ours.keys().collect::<Vec<_>>()
        );
        if problems.is_empty() {
            compared += ours.len();
            eprintln!("helm: {:<48} {} objects equal", case.name, ours.len());
        } else {
            failures.push(format!(
                "case {:?} (kubectl gpu -n {ns} install {} | helm template -n {ns} --include-crds {}):\n{}",
                case.name,
                case.kubectl_gpu.join(" "),
                case.helm.join(" "),
                problems.join("\n"),
                ns = case.namespace,
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "the chart and `kubectl gpu install` disagree:\n{}",
        failures.join("\n\n")
    );
    eprintln!("helm: {compared} objects compared, all equal");
    Ok(())
}

async fn lint() -> anyhow::Result<()> {
    let tools = tools_with(&["helm"])?;
    let home = tempfile::tempdir()?;
    let values_file = home.path().join("values.yaml");
    std::fs::write(&values_file, VALUES_FILE)?;
    let file = values_file.to_string_lossy().into_owned();
    let sets: [&[&str]; 5] = [
        &[],
        &["--set", "webhook.enabled=false"],
        &[
            "--set",
            "webhook.certManager.enabled=true,mig.strategy=mixed",
        ],
        &[
            "--set",
            "webhook.url=https://10.0.0.1:8443,webhook.caBundle=UEVN",
        ],
        &["-f", &file, "--set", "driver.enabled=false"],
    ];
    for args in sets {
        let out = run_ok(
            helm(&tools, home.path())
                .args(["lint", "--strict", "--namespace", "gpu-pilot"])
                .arg(chart())
                .args(args),
            &format!("helm lint --strict {}", args.join(" ")),
        )
        .await?;
        ensure!(
            out.contains("0 chart(s) failed")
                && !out.contains("[WARNING]")
                && !out.contains("[ERROR]"),
            "helm lint --strict {}:\n{out}",
            args.join(" ")
        );
    }

    // Chart.yaml carries the workspace's version, and the Kubernetes floor install checks.
    let meta: Value = serde_yaml::from_str(&std::fs::read_to_string(chart().join("Chart.yaml"))?)?;
    ensure!(
        meta["apiVersion"] == "v2" && meta["name"] == "gpu-pilot",
        "{meta}"
    );
    ensure!(
        meta["version"] == VERSION && meta["appVersion"] == VERSION,
        "Chart.yaml version {} / appVersion {} must be the workspace version {VERSION} (Cargo.toml)",
        meta["version"],
        meta["appVersion"]
    );
    let (major, minor) = kubectl_gpu::cluster::probe::MIN_KUBERNETES;
    ensure!(
        meta["kubeVersion"] == format!(">={major}.{minor}.0-0"),
        "Chart.yaml kubeVersion {} must be >={major}.{minor}.0-0, the oldest Kubernetes `kubectl gpu install` accepts",
        meta["kubeVersion"]
    );
    // Helm holds the chart to it.
    let out = helm(&tools, home.path())
        .args(["template", RELEASE])
        .arg(chart())
        .args(["--kube-version", &format!("{major}.{}.0", minor - 1)])
        .output()
        .await?;
    ensure!(
        !out.status.success() && shown(&out).contains("kubeVersion"),
        "helm template for Kubernetes {major}.{} should fail on kubeVersion:\n{}",
        minor - 1,
        shown(&out)
    );
    uninstall_hooks_render(&tools, home.path()).await
}

/// The uninstall hooks (templates/uninstall-hook.yaml): hooks only, so `helm install` creates
/// none of them; both Jobs run the controller's image as the controller's Deployment does; the
/// RBAC reaches the CRD, by name, only with operator.cleanupCRD, which also passes --delete-crd.
async fn uninstall_hooks_render(tools: &Path, home: &Path) -> anyhow::Result<()> {
    const NS: &str = "gpu-pilot";
    let want = [
        "ClusterRole/gpu-pilot-uninstall-hook",
        "ClusterRoleBinding/gpu-pilot-uninstall-hook",
        "Job/gpu-pilot/gpu-pilot-uninstall-post-delete",
        "Job/gpu-pilot/gpu-pilot-uninstall-pre-delete",
        "Role/gpu-pilot/gpu-pilot-uninstall-hook",
        "RoleBinding/gpu-pilot/gpu-pilot-uninstall-hook",
        "ServiceAccount/gpu-pilot/gpu-pilot-uninstall-hook",
    ];
    for cleanup in [false, true] {
        let set = format!("operator.cleanupCRD={cleanup}");
        let objects = objects_of(
            &run_ok(
                helm(tools, home)
                    .args(["template", RELEASE])
                    .arg(chart())
                    .args(["--namespace", NS, "--set", &set]),
                &format!("helm template --set {set}"),
            )
            .await?,
        )?;
        let hooks: BTreeMap<&str, &Value> = objects
            .iter()
            .filter(|(_, o)| o["metadata"]["annotations"]["helm.sh/hook"].is_string())
            .map(|(k, o)| (k.as_str(), o))
            .collect();
        ensure!(
            hooks.keys().copied().eq(want),
            "{set}: the hooks are {:?}",
            hooks.keys()
        );
        let controller_image = &objects[&deployment(NS, "gpu-pilot-controller")]["spec"]["template"]
            ["spec"]["containers"][0]["image"];
        for stage in ["pre-delete", "post-delete"] {
            let job = hooks[format!("Job/{NS}/gpu-pilot-uninstall-{stage}").as_str()];
            let pod = &job["spec"]["template"]["spec"];
            let args: Vec<&str> = pod["containers"][0]["args"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            ensure!(
                job["metadata"]["annotations"]["helm.sh/hook"] == stage
                    && &pod["containers"][0]["image"] == controller_image
                    && args[..2] == ["uninstall-hook", stage]
                    && pod["serviceAccountName"] == "gpu-pilot-uninstall-hook"
                    && job["spec"]["backoffLimit"] == 0
                    && args.contains(&"--delete-crd") == (cleanup && stage == "post-delete"),
                "{set}: {stage} Job: {job:#}"
            );
        }
        let crd_rules: Vec<&Value> = hooks["ClusterRole/gpu-pilot-uninstall-hook"]["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["apiGroups"][0] == "apiextensions.k8s.io")
            .collect();
        ensure!(
            match cleanup {
                false => crd_rules.is_empty(),
                true =>
                    crd_rules.len() == 1
                        && crd_rules[0]["resourceNames"] == json!(["clusterpolicies.gpupilot.io"]),
            },
            "{set}: the hook's CRD rules {crd_rules:?}"
        );
        // Nothing else reaches past what the hooks touch: no wildcard, no secrets list.
        for (k, o) in &hooks {
            for r in o["rules"].as_array().into_iter().flatten() {
                let text = r.to_string();
                ensure!(
                    !text.contains('*')
                        && (r["resources"] != json!(["secrets"])
                            || r["resourceNames"].is_array()
                                && r["verbs"] == json!(["get", "delete"])),
                    "{k}: rule {r}"
                );
            }
        }
    }
    Ok(())
}

async fn schema_enforced() -> anyhow::Result<()> {
    let tools = tools_with(&["helm"])?;
    let home = tempfile::tempdir()?;
    for (set, names) in [
        ("driver.enabeld=false", "enabeld"),
        ("mig.strategy=mixd", "strategy"),
        ("webhook.replicas=many", "replicas"),
    ] {
        let out = helm(&tools, home.path())
            .args(["template", RELEASE])
            .arg(chart())
            .args(["--set", set])
            .output()
            .await?;
        let text = shown(&out);
        ensure!(
            !out.status.success(),
            "helm template --set {set} rendered, but values.schema.json should reject it"
        );
        ensure!(
            text.contains("schema") && text.contains(names),
            "helm template --set {set} failed without naming {names:?}:\n{text}"
        );
        // kubectl gpu install refuses the same values.
        let e = kubectl_gpu_objects("gpu-pilot", &["--set".into(), set.into()])
            .err()
            .with_context(|| format!("kubectl gpu install --set {set} should fail"))?;
        ensure!(
            format!("{e:#}").contains(names),
            "kubectl gpu install --set {set}: {e:#}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// helm install / upgrade / uninstall

const GPU_NODES: i32 = 20;

/// A webhook for the release, in this process: its CA is handed to the chart as
/// webhook.caBundle and its address as webhook.url, so the ClusterPolicy the chart creates is
/// admitted by a live webhook.
async fn start_webhook(env: &Env) -> anyhow::Result<Running> {
    let opts = Options {
        listen: "127.0.0.1:0".parse()?,
        scope: Scope {
            namespace: env.ns.clone(),
            policy_selector: String::new(),
            node_selector: String::new(),
            pod_namespaces: Vec::new(),
        },
        certs: CertSource::Secret(CertSettings {
            namespace: env.ns.clone(),
            secret: webhook_names::TLS_SECRET.into(),
            names: vec!["127.0.0.1".into()],
            ca_validity: Duration::from_secs(86400),
            ca_renew_before: Duration::from_secs(3600),
            ca_overlap: Duration::from_secs(60),
            cert_validity: Duration::from_secs(7200),
            cert_renew_before: Duration::from_secs(600),
            // The chart owns both configurations and gets the CA as a value.
            mutating_config: None,
            validating_config: None,
        }),
        limits: Limits::default(),
        check_interval: Duration::from_secs(5),
        startup_timeout: Duration::from_secs(60),
    };
    Ok(Running::start(env.client.clone(), opts).await?)
}

async fn ca_bundle_base64(client: &Client, ns: &str) -> anyhow::Result<String> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(webhook_names::TLS_SECRET)
        .await
        .context("the webhook's TLS Secret")?;
    let pem = secret
        .data
        .unwrap_or_default()
        .remove(webhook_names::CA_BUNDLE_KEY)
        .context("the webhook's TLS Secret has no CA bundle")?;
    // ByteString serializes as base64, as caBundle wants it.
    Ok(serde_json::to_value(pem)?
        .as_str()
        .context("a ByteString serializes as a string")?
        .to_string())
}

/// Cluster-wide objects of the chart that an earlier scenario may have made without Helm
/// (the controller's RBAC is applied by kubectl there); Helm refuses to adopt them.
async fn remove_foreign_cluster_objects(client: &Client) -> anyhow::Result<()> {
    for name in ["gpu-pilot-controller", "gpu-pilot-webhook"] {
        let _ = Api::<ClusterRole>::all(client.clone())
            .delete(name, &DeleteParams::default())
            .await;
        let _ = Api::<ClusterRoleBinding>::all(client.clone())
            .delete(name, &DeleteParams::default())
            .await;
    }
    delete_webhook_configurations(client).await;
    Ok(())
}

async fn delete_webhook_configurations(client: &Client) {
    let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(webhook_names::NAME, &DeleteParams::default())
        .await;
    let _ = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .delete(webhook_names::NAME, &DeleteParams::default())
        .await;
}

async fn wait_ready(client: &Client, what: &str) -> anyhow::Result<ClusterPolicy> {
    let api: Api<ClusterPolicy> = Api::all(client.clone());
    eventually(what, Duration::from_secs(300), || {
        let api = api.clone();
        async move {
            let p = api.get("cluster-policy").await?;
            let st = p.status.clone().unwrap_or_default();
            let observed = st.observed_generation == p.metadata.generation;
            Ok(
                if observed && st.state == Some(PolicyState::Ready) && st.ready_nodes == GPU_NODES {
                    Ok(p)
                } else {
                    Err(format!(
                        "state {:?}, ready {}/{}, observed generation {:?} of {:?}",
                        st.state,
                        st.ready_nodes,
                        st.gpu_nodes,
                        st.observed_generation,
                        p.metadata.generation
                    ))
                },
            )
        }
    })
    .await
}

async fn lifecycle(env: Env) -> anyhow::Result<()> {
    let tools = tools_with(&["helm"])?;
    remove_foreign_cluster_objects(&env.client).await?;
    let home = tempfile::tempdir()?;
    let webhook = start_webhook(&env).await?;
    let ctrl = RunningController::start(env.cluster.kubeconfig(), &env.ns, "helm", false);
    let result = lifecycle_steps(&env, &tools, home.path(), &webhook).await;
    if result.is_err() {
        // Leave no release behind; the next scenario's reset clears what the controller set.
        let _ = helm(&tools, home.path())
            .env("KUBECONFIG", env.cluster.kubeconfig())
            .args(["uninstall", RELEASE, "--namespace", &env.ns, "--no-hooks"])
            .output()
            .await;
    }
    tokio::task::spawn_blocking(move || ctrl.stop()).await?;
    webhook.stop().await;
    delete_webhook_configurations(&env.client).await;
    let _ = Api::<Secret>::namespaced(env.client.clone(), &env.ns)
        .delete(webhook_names::TLS_SECRET, &DeleteParams::default())
        .await;
    result
}

async fn lifecycle_steps(
    env: &Env,
    tools: &Path,
    home: &Path,
    webhook: &Running,
) -> anyhow::Result<()> {
    let client = &env.client;
    let ns = env.ns.as_str();
    let ca = ca_bundle_base64(client, ns).await?;
    let url = format!("https://{}", webhook.addr);
    let base_args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--namespace".into(),
            ns.into(),
            "--set".into(),
            format!("webhook.url={url}"),
            "--set".into(),
            format!("webhook.caBundle={ca}"),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let helm_in_cluster = || {
        let mut c = helm(tools, home);
        c.env("KUBECONFIG", env.cluster.kubeconfig());
        c
    };
    let validated = |outcome| webhook.metrics.requests("validate_clusterpolicy", outcome);

    // install
    let out = run_ok(
        helm_in_cluster()
            .args(["install", RELEASE])
            .arg(chart())
            .args(base_args(&[])),
        "helm install",
    )
    .await?;
    ensure!(
        out.contains("STATUS: deployed") && out.contains("kubectl gpu status"),
        "helm install printed no deployed status or notes:\n{out}"
    );
    // The apiserver picks up a new webhook configuration from its own watch, so the create that
    // follows it in the same `helm install` may or may not be reviewed; the upgrades below are.
    eprintln!(
        "helm: ClusterPolicy create reviewed by the webhook: {}",
        validated(Outcome::Allowed) >= 1
    );
    let p = wait_ready(client, "the chart's policy ready on every GPU node").await?;
    let st = p.status.unwrap_or_default();
    ensure!(st.gpu_nodes == GPU_NODES, "gpuNodes {}", st.gpu_nodes);
    ensure!(
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("meta.helm.sh/release-name"))
            == Some(&RELEASE.to_string()),
        "the policy is not the release's: {:?}",
        p.metadata.annotations
    );
    let dcgm_gate = label::deploy_gate(Component::DcgmExporter);
    for n in node_names(client, true).await? {
        let node = Api::<Node>::all(client.clone()).get(&n).await?;
        ensure!(
            node.labels().get(&dcgm_gate).map(String::as_str) == Some("true"),
            "{n} lacks {dcgm_gate}=true at ready"
        );
    }

    // An upgrade the webhook refuses leaves the policy as it was.
    let denied_before = validated(Outcome::Denied);
    let out = helm_in_cluster()
        .args(["upgrade", RELEASE])
        .arg(chart())
        .args(base_args(&[
            "--set",
            "devicePlugin.config.name=no-such-config",
        ]))
        .output()
        .await?;
    let text = shown(&out);
    ensure!(
        !out.status.success() && text.contains("denied") && text.contains("no-such-config"),
        "helm upgrade naming a missing ConfigMap should be refused by the webhook:\n{text}"
    );
    ensure!(validated(Outcome::Denied) > denied_before);
    let p = Api::<ClusterPolicy>::all(client.clone())
        .get("cluster-policy")
        .await?;
    ensure!(
        p.spec.device_plugin.config.name.is_empty(),
        "a refused upgrade changed the policy: {:?}",
        p.spec.device_plugin.config
    );

    // An upgrade with a changed value changes the policy, and the controller follows it.
    run_ok(
        helm_in_cluster()
            .args(["upgrade", RELEASE])
            .arg(chart())
            .args(base_args(&["--set", "dcgmExporter.enabled=false"])),
        "helm upgrade --set dcgmExporter.enabled=false",
    )
    .await?;
    ensure!(
        validated(Outcome::Allowed) >= 1,
        "the webhook admitted no ClusterPolicy change during helm upgrade"
    );
    let p = wait_ready(client, "the upgraded policy ready again").await?;
    ensure!(!p.spec.dcgm_exporter.enabled, "{:?}", p.spec.dcgm_exporter);
    eventually(
        "the dcgm-exporter gate removed from every node",
        Duration::from_secs(120),
        || {
            let nodes: Api<Node> = Api::all(client.clone());
            let gate = dcgm_gate.clone();
            async move {
                let with: Vec<String> = nodes
                    .list(&ListParams::default().labels(&gate))
                    .await?
                    .items
                    .iter()
                    .map(|n| n.name_any())
                    .collect();
                Ok(if with.is_empty() {
                    Ok(())
                } else {
                    Err(format!("still on {with:?}"))
                })
            }
        },
    )
    .await?;
    let status = run_ok(
        helm_in_cluster().args(["status", RELEASE, "--namespace", ns, "-o", "json"]),
        "helm status",
    )
    .await?;
    let status: Value = serde_json::from_str(&status)?;
    ensure!(
        status["version"] == 3 && status["info"]["status"] == "deployed",
        "release after install, refused upgrade and upgrade: revision {} {}",
        status["version"],
        status["info"]["status"]
    );

    // uninstall: the controller releases the policy's finalizer once it has cleaned up. The
    // controller and webhook run in this process and the chart's pods are kwok's, so its
    // uninstall hook Jobs (the controller's image) would never run here: --no-hooks. The hooks
    // run for real in realnode::helm_chart_with_the_same_images.
    run_ok(
        helm_in_cluster().args([
            "uninstall",
            RELEASE,
            "--namespace",
            ns,
            "--no-hooks",
            "--wait",
            "--timeout",
            "5m",
        ]),
        "helm uninstall --no-hooks --wait",
    )
    .await?;
    let policies = Api::<ClusterPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    ensure!(
        policies.items.is_empty(),
        "ClusterPolicies left: {:?}",
        policies
            .items
            .iter()
            .map(|p| p.name_any())
            .collect::<Vec<_>>()
    );
    for n in Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
    {
        let ours: Vec<&String> = n
            .labels()
            .keys()
            .filter(|k| k.starts_with(label::DEPLOY_PREFIX) || *k == label::STAGE)
            .collect();
        ensure!(ours.is_empty(), "{} keeps {ours:?}", n.name_any());
    }
    let mut left = Vec::new();
    let names = |l: Vec<String>| {
        l.into_iter()
            .filter(|n| n.starts_with("gpu-pilot"))
            .collect::<Vec<_>>()
    };
    left.extend(names(
        list_names(Api::<Deployment>::namespaced(client.clone(), ns)).await?,
    ));
    left.extend(names(
        list_names(Api::<Service>::namespaced(client.clone(), ns)).await?,
    ));
    left.extend(names(
        list_names(Api::<ServiceAccount>::namespaced(client.clone(), ns)).await?,
    ));
    left.extend(names(
        list_names(Api::<Role>::namespaced(client.clone(), ns)).await?,
    ));
    left.extend(names(
        list_names(Api::<RoleBinding>::namespaced(client.clone(), ns)).await?,
    ));
    left.extend(names(
        list_names(Api::<ClusterRole>::all(client.clone())).await?,
    ));
    left.extend(names(
        list_names(Api::<ClusterRoleBinding>::all(client.clone())).await?,
    ));
    left.extend(list_names(Api::<DaemonSet>::namespaced(client.clone(), ns)).await?);
    left.extend(
        list_names(Api::<ConfigMap>::namespaced(client.clone(), ns))
            .await?
            .into_iter()
            .filter(|n| n == render::MIG_PARTED_CONFIG),
    );
    left.extend(
        list_names(Api::<MutatingWebhookConfiguration>::all(client.clone()))
            .await?
            .into_iter()
            .filter(|n| n == webhook_names::NAME),
    );
    left.extend(
        list_names(Api::<ValidatingWebhookConfiguration>::all(client.clone()))
            .await?
            .into_iter()
            .filter(|n| n == webhook_names::NAME),
    );
    ensure!(left.is_empty(), "helm uninstall left {left:?}");
    let list = run_ok(
        helm_in_cluster().args(["list", "--namespace", ns, "--all", "-q"]),
        "helm list",
    )
    .await?;
    ensure!(list.trim().is_empty(), "releases left: {list}");
    Ok(())
}

async fn list_names<K>(api: Api<K>) -> anyhow::Result<Vec<String>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|o| o.name_any())
        .collect())
}

// ---------------------------------------------------------------------------------------------
// krew

async fn krew(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let tools = tools_with(&["kubectl", "kubectl-krew"])?;
    let tmp = tempfile::tempdir()?;
    let dist = tmp.path().join("dist");
    // The release build of kubectl-gpu (several minutes the first time, then incremental).
    let target = cargo_target_dir()?;
    let mut release = tokio::process::Command::new(repo_root().join("scripts/release"));
    // cargo test sets CARGO_PKG_* and friends for this process; cargo would read them as changed
    // env!() inputs of kubectl-gpu and rebuild it, here and again in the next plain build.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME" && k != "CARGO_TARGET_DIR" {
            release.env_remove(k);
        }
    }
    // The images (scripts/images --release) are the real-node tests' business, not krew's.
    let out = release
        .arg("--out")
        .arg(&dist)
        .arg("--target-dir")
        .arg(&target)
        .arg("--no-images")
        .kill_on_drop(true)
        .output()
        .await
        .context("could not run scripts/release")?;
    ensure!(
        out.status.success(),
        "scripts/release failed:\n{}",
        shown(&out)
    );

    let archive_name = format!("kubectl-gpu_v{VERSION}_linux_amd64.tar.gz");
    let archive = dist.join(&archive_name);
    ensure!(archive.is_file(), "no {}", archive.display());
    let listing = run_ok(
        tokio::process::Command::new("tar")
            .arg("-tzf")
            .arg(&archive),
        "tar -tzf",
    )
    .await?;
    let mut files: Vec<&str> = listing.lines().collect();
    files.sort();
    ensure!(
        files == ["LICENSE", "kubectl-gpu"],
        "the archive holds {files:?}"
    );
    let sum = run_ok(
        tokio::process::Command::new("sha256sum").arg(&archive),
        "sha256sum",
    )
    .await?;
    let sum = sum
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();

    let manifest_path = dist.join("gpu.yaml");
    let manifest: Value = serde_yaml::from_str(&std::fs::read_to_string(&manifest_path)?)?;
    ensure!(
        manifest["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2"
            && manifest["kind"] == "Plugin"
            && manifest["metadata"]["name"] == "gpu"
            && manifest["spec"]["version"] == format!("v{VERSION}"),
        "{manifest}"
    );
    let linux = manifest["spec"]["platforms"]
        .as_array()
        .and_then(|p| {
            p.iter()
                .find(|p| p["selector"]["matchLabels"] == json!({"os": "linux", "arch": "amd64"}))
        })
        .with_context(|| format!("no linux/amd64 platform in {manifest}"))?;
    ensure!(
        linux["sha256"] == sum,
        "sha256 {} of {sum}",
        linux["sha256"]
    );
    ensure!(
        linux["uri"]
            == format!(
                "https://github.com/gpu-pilot/gpu-pilot/releases/download/v{VERSION}/{archive_name}"
            ),
        "uri {}",
        linux["uri"]
    );

    // krew and kubectl, offline, in a home and KREW_ROOT of their own.
    let home = tmp.path().join("home");
    let krew_root = tmp.path().join("krew");
    std::fs::create_dir_all(&home)?;
    let path = format!(
        "{}:{}:/usr/local/bin:/usr/bin:/bin",
        krew_root.join("bin").display(),
        tools.display()
    );
    let kubectl = || {
        let mut c = tokio::process::Command::new(tools.join("kubectl"));
        c.env_clear()
            .env("PATH", &path)
            .env("HOME", &home)
            .env("KREW_ROOT", &krew_root)
            .env("KREW_NO_UPGRADE_CHECK", "1")
            .env("KUBECONFIG", cluster.kubeconfig())
            .kill_on_drop(true);
        c
    };
    run_ok(
        kubectl()
            .args(["krew", "install"])
            .arg(format!("--manifest={}", manifest_path.display()))
            .arg(format!("--archive={}", archive.display())),
        "kubectl krew install --manifest --archive",
    )
    .await?;
    // `krew list` wants an index, which needs the network; the receipt is what it would read.
    let receipt: Value = serde_yaml::from_str(
        &std::fs::read_to_string(krew_root.join("receipts/gpu.yaml"))
            .context("krew wrote no receipt for gpu")?,
    )?;
    ensure!(
        receipt["metadata"]["name"] == "gpu" && receipt["spec"]["version"] == format!("v{VERSION}"),
        "krew's receipt: {receipt}"
    );
    let version = run_ok(kubectl().args(["gpu", "version"]), "kubectl gpu version").await?;
    ensure!(
        version.contains(VERSION),
        "kubectl gpu version does not print {VERSION}:\n{version}"
    );
    let plugins = run_ok(kubectl().args(["plugin", "list"]), "kubectl plugin list").await?;
    ensure!(
        plugins.contains(&krew_root.join("bin/kubectl-gpu").display().to_string()),
        "kubectl plugin list does not show krew's kubectl-gpu:\n{plugins}"
    );
    // (`krew uninstall` wants the index too; the temporary KREW_ROOT goes with the test.)
    Ok(())
}
