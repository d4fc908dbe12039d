//! `kubectl gpu install`: preflight, apply every object in order, then follow the rollout.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{DEFAULT_POLICY_NAME, label, webhook};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::Value;

use gpu_pilot_core::render::install::{self as render, Include};
use gpu_pilot_core::render::key;
use gpu_pilot_core::values::{Values, apply_set, default_tree};

use crate::cluster::objects::{self, Applied};
use crate::cluster::probe::{can_i, gpu_operator_signs, server_version, version_verdict};
use crate::cluster::{Kube, explain};
use crate::global::Global;
use crate::status::stage_lines;
use crate::ui::{Output, Printer, Progress};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  kubectl gpu install                                       defaults, follow the rollout
  kubectl gpu install --set driver.enabled=false --set toolkit.enabled=false
                                                            nodes with a preinstalled driver and toolkit
  kubectl gpu install --set mig.strategy=mixed -f my-values.yaml
  kubectl gpu install --version v0.1.0                      pin gpu-pilot's images
  kubectl gpu install --dry-run -o yaml > gpu-pilot.yaml    print every object, apply nothing

Running install again upgrades in place: objects are server-side applied and pruned.")]
pub struct InstallArgs {
    /// A values file in the Helm chart's format (repeatable; later files win).
    #[arg(short = 'f', long = "values", value_name = "FILE")]
    pub values: Vec<PathBuf>,
    /// Set a value, e.g. driver.enabled=false (repeatable, or comma-separated).
    #[arg(long, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Set a value, always as a string.
    #[arg(long, value_name = "KEY=VALUE")]
    pub set_string: Vec<String>,
    /// Tag of gpu-pilot's own images (controller, webhook, agent), e.g. v0.1.0.
    #[arg(long, value_name = "VERSION")]
    pub version: Option<String>,
    /// Print what would be applied (with -o yaml or -o json, every object); change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Follow the rollout until every GPU node is ready (default: on a terminal).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub wait: Option<bool>,
    /// How long --wait waits before it stops and shows what is stuck.
    #[arg(long, default_value = "10m", value_parser = gpu_pilot_core::duration::parse)]
    pub timeout: Duration,
    /// Install even though NVIDIA's GPU Operator is present (they would fight over the nodes).
    #[arg(long)]
    pub ignore_gpu_operator: bool,
}

/// The values install uses: defaults, --version, then -f files and --set.
pub fn load_values(args: &InstallArgs) -> anyhow::Result<Values> {
    let mut tree = default_tree();
    if let Some(v) = &args.version {
        let v = v.trim();
        anyhow::ensure!(
            !v.is_empty() && !v.contains(char::is_whitespace),
            "--version {v:?} is not an image tag; give one like v0.1.0"
        );
        // The images gpu-pilot builds: its controller, webhook and agent (the agent runs the
        // device plugin, GFD, MIG manager and validator).
        for section in [
            "operator",
            "webhook",
            "devicePlugin",
            "gfd",
            "migManager",
            "validator",
        ] {
            apply_set(&mut tree, &format!("{section}.version={v}"), true)?;
        }
    }
    // -f and --set go over the --version defaults.
    Ok(Values::load_over(
        tree,
        &args.values,
        &args.set,
        &args.set_string,
    )?)
}

pub async fn run(g: &Global, args: InstallArgs) -> anyhow::Result<i32> {
    let values = load_values(&args)?;
    // On stderr, so `--dry-run -o yaml` output stays a clean stream of objects.
    for notice in &values.notices {
        eprintln!("warning: {notice}");
    }
    let objs = render::objects(&g.namespace, &values, Include::ALL);
    if args.dry_run {
        print_objects(g.output, &objs)?;
        return Ok(0);
    }
    let kube = Kube::connect(g).await?;
    let wait = args.wait.unwrap_or_else(|| std::io::stdout().is_terminal());
    let mut out = Printer::new(g.colour());

    out.heading("preflight");
    let ok = preflight(&kube, &values, &args, &g.namespace, &objs, &mut out).await?;
    if !ok {
        anyhow::bail!("preflight failed: fix the errors above and run install again");
    }

    apply_and_prune(&kube, &g.namespace, &values, &objs, &mut out, args.timeout).await?;

    if !wait {
        out.line(
            "not waiting for the rollout (pass --wait to follow it); see `kubectl gpu status`",
        );
        return Ok(0);
    }
    out.heading("rollout");
    follow_rollout(&kube, &g.namespace, args.timeout, &mut out).await
}

/// Apply an install's objects in order, prune what an earlier install made and this one does not,
/// and say what changed.
pub async fn apply_and_prune(
    kube: &Kube,
    namespace: &str,
    values: &Values,
    objs: &[Value],
    out: &mut Printer,
    timeout: Duration,
) -> anyhow::Result<()> {
    out.heading(&format!(
        "applying {} objects to {} (namespace {namespace})",
        objs.len(),
        kube.server,
    ));
    let (created, changed, unchanged) =
        apply_all(kube, objs, values, namespace, out, timeout).await?;
    let pruned = prune(kube, namespace, objs).await?;
    for p in &pruned {
        out.line(&format!("pruned    {p} (no longer part of the install)"));
    }
    out.line(&format!(
        "{created} created, {changed} changed, {unchanged} unchanged, {} pruned",
        pruned.len()
    ));
    Ok(())
}

/// Print objects for `--dry-run`.
pub fn print_objects(output: Output, objs: &[Value]) -> anyhow::Result<()> {
    match output {
        Output::Yaml => print!("{}", gpu_pilot_core::render::to_yaml(objs)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "apiVersion": "v1", "kind": "List", "items": objs
            }))?
        ),
        Output::Table => {
            for o in objs {
                println!("{}", key(o));
            }
            println!(
                "\n{} objects would be applied (-o yaml prints them)",
                objs.len()
            );
        }
    }
    Ok(())
}

async fn preflight(
    kube: &Kube,
    values: &Values,
    args: &InstallArgs,
    namespace: &str,
    objs: &[Value],
    out: &mut Printer,
) -> anyhow::Result<bool> {
    let mut ok = true;
    let (major, minor, git) = server_version(kube).await?;
    match version_verdict(major, minor) {
        Ok(None) => out.ok(&format!(
            "cluster {} reachable, Kubernetes {git}",
            kube.server
        )),
        Ok(Some(w)) => out.warn(&w),
        Err(e) => {
            out.error(&e.to_string());
            ok = false;
        }
    }

    let needed: [(&str, &str, &str, bool); 13] = [
        (
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            false,
        ),
        ("create", "", "namespaces", false),
        ("create", "rbac.authorization.k8s.io", "clusterroles", false),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            false,
        ),
        (
            "create",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            false,
        ),
        (
            "create",
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            false,
        ),
        ("create", "gpupilot.io", "clusterpolicies", false),
        ("create", "apps", "deployments", true),
        ("create", "", "services", true),
        ("create", "", "serviceaccounts", true),
        ("create", "", "configmaps", true),
        ("create", "rbac.authorization.k8s.io", "roles", true),
        ("create", "rbac.authorization.k8s.io", "rolebindings", true),
    ];
    let mut denied = Vec::new();
    for (verb, group, resource, namespaced) in needed {
        let ns = namespaced.then_some(namespace);
        if !can_i(kube, verb, group, resource, ns).await? {
            denied.push(format!(
                "{verb} {resource}{}",
                if group.is_empty() {
                    String::new()
                } else {
                    format!(".{group}")
                }
            ));
        }
    }
    if denied.is_empty() {
        out.ok("you may create everything install needs");
    } else {
        out.error(&format!(
            "you may not: {}; install needs cluster-admin rights (use an admin --context)",
            denied.join(", ")
        ));
        ok = false;
    }

    let signs = gpu_operator_signs(kube).await?;
    if signs.is_empty() {
        out.ok("NVIDIA's GPU Operator is not installed");
    } else if args.ignore_gpu_operator {
        out.warn(&format!(
            "NVIDIA's GPU Operator is installed ({}); going on because of --ignore-gpu-operator",
            signs.join("; ")
        ));
    } else {
        out.error(&format!(
            "NVIDIA's GPU Operator is installed ({}); both would manage the same nodes. Uninstall it first (helm uninstall -n gpu-operator <release>), or pass --ignore-gpu-operator",
            signs.join("; ")
        ));
        ok = false;
    }

    let nodes: Api<Node> = Api::all(kube.client.clone());
    let list = nodes
        .list_metadata(&ListParams::default())
        .await
        .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "listing nodes")))?;
    let labelled = |n: &kube::core::PartialObjectMeta<Node>, keys: &[&str]| {
        n.metadata
            .labels
            .as_ref()
            .is_some_and(|l| keys.iter().any(|k| l.get(*k).is_some_and(|v| v == "true")))
    };
    let nfd = list
        .items
        .iter()
        .filter(|n| labelled(n, &label::NFD_GPU_LABELS))
        .count();
    let present = list
        .items
        .iter()
        .filter(|n| labelled(n, &label::NFD_GPU_LABELS) || labelled(n, &[label::GPU_PRESENT]))
        .count();
    if present > 0 {
        out.ok(&format!(
            "{present} GPU node(s) among {} nodes",
            list.items.len()
        ));
        if values.nfd.enabled && nfd == 0 {
            out.warn("no node has Node Feature Discovery's labels; with nfd.enabled=true gpu-pilot expects NFD (install it, or --set nfd.enabled=false)");
        }
    } else {
        out.warn(&format!(
            "no GPU nodes found among {} nodes: none has {} or {}=true. Install Node Feature Discovery, or label GPU nodes {}=true; gpu-pilot starts on them as they appear",
            list.items.len(),
            label::NFD_PCI_10DE,
            label::GPU_PRESENT,
            label::GPU_PRESENT
        ));
    }

    let policies = Api::<ClusterPolicy>::all(kube.client.clone());
    if let Ok(list) = policies.list_metadata(&ListParams::default()).await {
        let others: Vec<String> = list
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .filter(|n| n != DEFAULT_POLICY_NAME)
            .collect();
        if !others.is_empty() {
            out.error(&format!(
                "ClusterPolicy {} already exists; install manages the one named {DEFAULT_POLICY_NAME}. Delete the other (kubectl delete clusterpolicy {}) or edit it instead of installing",
                others.join(", "),
                others[0]
            ));
            ok = false;
        }
    }

    let foreign = foreign_objects(kube, objs).await?;
    if foreign.is_empty() {
        out.ok("no object of someone else's has a name install uses");
    } else {
        out.error(&format!(
            "{} exist but were not created by gpu-pilot (no label {}={}); install would overwrite them. Rename or remove them, or, if gpu-pilot did make them, label them so: kubectl label {} {}={}",
            foreign.join(", "),
            label::MANAGED_BY,
            label::MANAGED_BY_VALUE,
            kubectl_ref(&foreign[0]),
            label::MANAGED_BY,
            label::MANAGED_BY_VALUE,
        ));
        ok = false;
    }

    if values.webhook.enabled && values.webhook.cert_manager.enabled {
        let crds: Api<CustomResourceDefinition> = Api::all(kube.client.clone());
        let has = crds
            .get_metadata_opt("certificates.cert-manager.io")
            .await
            .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "looking for cert-manager")))?
            .is_some();
        if has {
            out.ok("cert-manager is installed (webhook.certManager.enabled=true)");
        } else {
            out.error("webhook.certManager.enabled=true, but cert-manager is not installed; install cert-manager or leave certManager off (the webhook then manages its own certificate)");
            ok = false;
        }
    }
    Ok(ok)
}

/// The objects install would apply over that someone else made (a Namespace of one's own is
/// fine: install uses it without touching it).
pub async fn foreign_objects(kube: &Kube, objs: &[Value]) -> anyhow::Result<Vec<String>> {
    let mut foreign = Vec::new();
    for o in objs.iter().filter(|o| o["kind"] != "Namespace") {
        if objects::ownership(kube, o).await?.0 == objects::Ownership::Foreign {
            foreign.push(key(o));
        }
    }
    Ok(foreign)
}

/// `Kind/ns/name` as kubectl arguments (`kind name -n ns`).
fn kubectl_ref(k: &str) -> String {
    let parts: Vec<&str> = k.split('/').collect();
    match parts.as_slice() {
        [kind, ns, name] => format!("{} {name} -n {ns}", kind.to_lowercase()),
        [kind, name] => format!("{} {name}", kind.to_lowercase()),
        _ => k.to_string(),
    }
}

async fn apply_all(
    kube: &Kube,
    objs: &[Value],
    values: &Values,
    namespace: &str,
    out: &mut Printer,
    timeout: Duration,
) -> anyhow::Result<(usize, usize, usize)> {
    let (mut created, mut changed, mut unchanged) = (0, 0, 0);
    for o in objs {
        if o["kind"] == "ClusterPolicy" && values.webhook.enabled {
            wait_for_webhook(kube, namespace, values, out, timeout).await?;
        }
        // A namespace that existed before install is the admin's: used, never labelled.
        if o["kind"] == "Namespace"
            && objects::ownership(kube, o).await?.0 == objects::Ownership::Foreign
        {
            out.line(&format!(
                "using     {} (not created by gpu-pilot: left as it is, and kept by uninstall)",
                key(o)
            ));
            unchanged += 1;
            continue;
        }
        let r = objects::apply(kube, o, false).await?;
        match r {
            Applied::Created => {
                created += 1;
                out.line(&format!("created   {}", key(o)));
            }
            Applied::Changed => {
                changed += 1;
                out.line(&format!("changed   {}", key(o)));
            }
            Applied::Unchanged => unchanged += 1,
        }
        if o["kind"] == "CustomResourceDefinition" {
            wait_established(kube, o["metadata"]["name"].as_str().unwrap_or_default()).await?;
        }
    }
    Ok((created, changed, unchanged))
}

/// Waits (watching, with kube-runtime's `await_condition`) until the apiserver serves the CRD.
async fn wait_established(kube: &Kube, name: &str) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(kube.client.clone());
    let established = await_condition(api, name, conditions::is_crd_established());
    match tokio::time::timeout(Duration::from_secs(60), established).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => anyhow::bail!("watching CRD {name} until it is established: {e}"),
        Err(_) => anyhow::bail!(
            "the CRD {name} was not established within 60s; see `kubectl describe crd {name}`"
        ),
    }
}

fn all_have_ca<'a>(
    configs: impl Iterator<Item = &'a k8s_openapi::api::admissionregistration::v1::WebhookClientConfig>,
) -> bool {
    configs
        .into_iter()
        .all(|c| c.ca_bundle.as_ref().is_some_and(|b| !b.0.is_empty()))
}

/// The validating webhook guards the ClusterPolicy: before applying it, wait until the webhook
/// has published its CA into both configurations (cert-manager does that with certManager on).
async fn wait_for_webhook(
    kube: &Kube,
    namespace: &str,
    values: &Values,
    out: &mut Printer,
    timeout: Duration,
) -> anyhow::Result<()> {
    let m: Api<MutatingWebhookConfiguration> = Api::all(kube.client.clone());
    let v: Api<ValidatingWebhookConfiguration> = Api::all(kube.client.clone());
    let deadline = Instant::now() + timeout.min(Duration::from_secs(300));
    let mut said = false;
    loop {
        let mb = m
            .get_opt(webhook::NAME)
            .await
            .ok()
            .flatten()
            .is_some_and(|c| all_have_ca(c.webhooks.iter().flatten().map(|w| &w.client_config)));
        let vb = v
            .get_opt(webhook::NAME)
            .await
            .ok()
            .flatten()
            .is_some_and(|c| all_have_ca(c.webhooks.iter().flatten().map(|w| &w.client_config)));
        if mb && vb {
            if said {
                out.ok("the webhook published its CA");
            }
            return Ok(());
        }
        if !said {
            out.line(&format!(
                "waiting for the webhook to publish its CA in both webhook configurations ({})",
                if values.webhook.cert_manager.enabled {
                    "cert-manager injects it"
                } else {
                    "the webhook writes it when it starts"
                }
            ));
            said = true;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the webhook configurations still have no caBundle; is the webhook running? Check `kubectl -n {namespace} get pods -l app.kubernetes.io/name={} ` and its logs, then run install again",
                webhook::NAME
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Delete objects an earlier install created that this one no longer renders (a component
/// turned off, cert-manager switched off).
async fn prune(kube: &Kube, namespace: &str, objs: &[Value]) -> anyhow::Result<Vec<String>> {
    let mut all = render::every_possible_object(namespace);
    all.extend(objects::values_config_maps(kube, namespace).await?);
    let wanted: std::collections::BTreeSet<String> = objs.iter().map(key).collect();
    let mut pruned = Vec::new();
    for o in all.iter().filter(|o| !wanted.contains(&key(o))) {
        if objects::delete(kube, o).await? == objects::Deleted::Deleted {
            pruned.push(key(o));
        }
    }
    Ok(pruned)
}

pub async fn follow_rollout(
    kube: &Kube,
    namespace: &str,
    timeout: Duration,
    out: &mut Printer,
) -> anyhow::Result<i32> {
    let api: Api<ClusterPolicy> = Api::all(kube.client.clone());
    let start = Instant::now();
    let mut progress = Progress::new(out.terminal);
    loop {
        let policy = api
            .get(DEFAULT_POLICY_NAME)
            .await
            .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "reading the ClusterPolicy")))?;
        let current_gen = policy.metadata.generation;
        let status = policy.status.clone();
        let fresh = status
            .as_ref()
            .is_some_and(|s| s.observed_generation == current_gen);
        progress.update(start.elapsed(), stage_lines(&policy));
        if let Some(s) = &status
            && fresh
            && s.state == Some(gpu_pilot_api::policy::PolicyState::Ready)
        {
            progress.finish();
            out.ok(&format!(
                "gpu-pilot is ready on {} GPU node(s) in {:.1}s",
                s.gpu_nodes,
                start.elapsed().as_secs_f64()
            ));
            return Ok(0);
        }
        if start.elapsed() > timeout {
            progress.finish();
            out.error(&format!(
                "not ready after {}s; what the doctor finds:",
                timeout.as_secs()
            ));
            let findings = crate::doctor::summary(kube, namespace).await;
            match findings {
                Ok(text) => println!("{text}"),
                Err(e) => println!("  (the doctor could not run: {e:#})"),
            }
            return Ok(1);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(sets: &[&str], version: Option<&str>) -> InstallArgs {
        InstallArgs {
            values: vec![],
            set: sets.iter().map(|s| s.to_string()).collect(),
            set_string: vec![],
            version: version.map(Into::into),
            dry_run: true,
            wait: None,
            timeout: Duration::from_secs(1),
            ignore_gpu_operator: false,
        }
    }

    #[test]
    fn version_pins_gpu_pilot_images_and_set_still_wins() {
        let v = load_values(&args(&["gfd.version=v9"], Some("v0.2.0"))).unwrap();
        assert_eq!(v.operator.version, "v0.2.0");
        assert_eq!(v.webhook.version, "v0.2.0");
        assert_eq!(v.spec.device_plugin.version, "v0.2.0");
        assert_eq!(v.spec.gfd.version, "v9");
        assert_eq!(
            v.spec.driver.version, "580.95.05",
            "NVIDIA's images keep theirs"
        );
        assert!(load_values(&args(&[], Some("v 1"))).is_err());
    }
}
