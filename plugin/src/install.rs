//! `kubectl gpu install`: preflight, apply every object in order, then follow the rollout.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{DEFAULT_POLICY_NAME, Stage, label, webhook};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};
use serde_json::Value;

use crate::context::{Global, Kube, Output, explain};
use crate::objects::{self, Applied};
use crate::render::{self, Include, key};
use crate::values::{Values, apply_set, default_tree};

/// The oldest Kubernetes gpu-pilot supports (matchConditions and CEL validation are GA).
pub const MIN_KUBERNETES: (u32, u32) = (1, 30);
/// The newest Kubernetes gpu-pilot is tested against.
pub const MAX_TESTED_KUBERNETES: (u32, u32) = (1, 37);

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
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Install even though NVIDIA's GPU Operator is present (they would fight over the nodes).
    #[arg(long)]
    pub ignore_gpu_operator: bool,
}

/// Parse `90s`, `5m`, `1h` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write it like 90s, 5m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => {
            return Err(format!(
                "{s:?} is not a duration: unknown unit {unit:?}; write it like 90s, 5m or 1h"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
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
        Output::Yaml => print!("{}", render::to_yaml(objs)),
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

/// Plain progress lines, with colour only on a terminal.
pub struct Printer {
    colour: bool,
    terminal: bool,
}

impl Printer {
    pub fn new(colour: bool) -> Printer {
        Printer {
            colour,
            terminal: std::io::stdout().is_terminal(),
        }
    }
    pub fn heading(&mut self, s: &str) {
        if self.colour {
            println!("\n\x1b[1m==> {s}\x1b[0m");
        } else {
            println!("\n==> {s}");
        }
    }
    pub fn line(&mut self, s: &str) {
        println!("  {s}");
    }
    pub fn ok(&mut self, s: &str) {
        self.mark("ok", "32", s)
    }
    pub fn warn(&mut self, s: &str) {
        self.mark("warning", "33", s)
    }
    pub fn error(&mut self, s: &str) {
        self.mark("error", "31", s)
    }
    fn mark(&mut self, word: &str, code: &str, s: &str) {
        if self.colour {
            println!("  \x1b[{code}m{word:<7}\x1b[0m {s}");
        } else {
            println!("  {word:<7} {s}");
        }
    }
}

async fn can_i(
    kube: &Kube,
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
) -> anyhow::Result<bool> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: ns.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(kube.client.clone());
    let r = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "checking your permissions")))?;
    Ok(r.status.map(|s| s.allowed).unwrap_or(false))
}

/// `(major, minor)` of the apiserver.
pub async fn server_version(kube: &Kube) -> anyhow::Result<(u32, u32, String)> {
    let info = kube
        .client
        .apiserver_version()
        .await
        .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "reaching the cluster")))?;
    let digits = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
    };
    let major = digits(&info.major).parse().unwrap_or(0);
    let minor = digits(&info.minor).parse().unwrap_or(0);
    Ok((major, minor, info.git_version))
}

/// Whether a Kubernetes version is supported, and a sentence about it when not quite.
pub fn version_verdict(major: u32, minor: u32) -> Result<Option<String>, String> {
    if (major, minor) < MIN_KUBERNETES {
        return Err(format!(
            "Kubernetes {major}.{minor} is older than {}.{}, the oldest gpu-pilot supports (it needs webhook matchConditions and CEL validation); upgrade the cluster",
            MIN_KUBERNETES.0, MIN_KUBERNETES.1
        ));
    }
    if (major, minor) > MAX_TESTED_KUBERNETES {
        return Ok(Some(format!(
            "Kubernetes {major}.{minor} is newer than {}.{}, the newest gpu-pilot is tested on; it should work, report problems",
            MAX_TESTED_KUBERNETES.0, MAX_TESTED_KUBERNETES.1
        )));
    }
    Ok(None)
}

/// Signs of NVIDIA's GPU Operator in the cluster, as sentences.
pub async fn gpu_operator_signs(kube: &Kube) -> anyhow::Result<Vec<String>> {
    let mut signs = Vec::new();
    let crds: Api<CustomResourceDefinition> = Api::all(kube.client.clone());
    if crds
        .get_metadata_opt("clusterpolicies.nvidia.com")
        .await
        .map_err(|e| {
            anyhow::anyhow!(explain(
                &e,
                &kube.server,
                "looking for NVIDIA's GPU Operator"
            ))
        })?
        .is_some()
    {
        signs.push("the CRD clusterpolicies.nvidia.com exists".to_string());
    }
    let deploys: Api<Deployment> = Api::all(kube.client.clone());
    let lp = ListParams::default()
        .labels("app in (gpu-operator),app.kubernetes.io/component=gpu-operator");
    let found = deploys.list_metadata(&lp).await.map_err(|e| {
        anyhow::anyhow!(explain(
            &e,
            &kube.server,
            "looking for NVIDIA's GPU Operator"
        ))
    })?;
    for d in found.items {
        signs.push(format!(
            "Deployment {}/{} runs it",
            d.metadata.namespace.unwrap_or_default(),
            d.metadata.name.unwrap_or_default()
        ));
    }
    Ok(signs)
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
            out.error(&e);
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

async fn wait_established(kube: &Kube, name: &str) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(kube.client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let crd = api.get(name).await.map_err(|e| {
            anyhow::anyhow!(explain(&e, &kube.server, &format!("reading CRD {name}")))
        })?;
        let established = crd.status.and_then(|s| s.conditions).is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
        if established {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the CRD {name} was not established within 60s; see `kubectl describe crd {name}`"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
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

pub async fn follow_rollout(
    kube: &Kube,
    namespace: &str,
    timeout: Duration,
    out: &mut Printer,
) -> anyhow::Result<i32> {
    let api: Api<ClusterPolicy> = Api::all(kube.client.clone());
    let start = Instant::now();
    let mut last: Vec<String> = Vec::new();
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
        let lines = stage_lines(&policy);
        if lines != last {
            if out.terminal && !last.is_empty() {
                // Redraw the block in place.
                print!("\x1b[{}A", last.len() + 1);
            }
            println!("  after {:>4}s:", start.elapsed().as_secs());
            for l in &lines {
                if out.terminal {
                    println!("\x1b[2K    {l}");
                } else {
                    println!("    {l}");
                }
            }
            last = lines;
        }
        if let Some(s) = &status
            && fresh
            && s.state == Some(gpu_pilot_api::policy::PolicyState::Ready)
        {
            out.ok(&format!(
                "gpu-pilot is ready on {} GPU node(s) in {:.1}s",
                s.gpu_nodes,
                start.elapsed().as_secs_f64()
            ));
            return Ok(0);
        }
        if start.elapsed() > timeout {
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

    #[test]
    fn durations_and_versions() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5 min").is_err());
        assert!(version_verdict(1, 29).is_err());
        assert_eq!(version_verdict(1, 37), Ok(None));
        assert!(version_verdict(1, 40).unwrap().is_some());
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
