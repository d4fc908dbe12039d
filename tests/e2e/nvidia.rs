//! NVIDIA GPU Operator users' files, taken at test time from NVIDIA's Go module (pinned in
//! `scripts/nvidia-gpu-operator`, never copied into this repository):
//!
//! - NVIDIA's chart values file goes through the real `kubectl gpu install --dry-run -f`, and
//!   every key is either kept (same path in the rendered ClusterPolicy, or the object it places)
//!   or has a row in the key table saying why not;
//! - docs/nvidia-values.md is the table generated from that file;
//! - NVIDIA's sample ClusterPolicy, and the one NVIDIA's own chart renders, with only the
//!   apiVersion changed, are stored whole by the real apiserver through gpu-pilot's CRD under
//!   strict field validation; every property of NVIDIA's CRD has a counterpart in gpu-pilot's;
//! - the families gpu-pilot does not run are refused when on, naming them, by the CRD, by
//!   install and by the chart.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::policy::{DRIVER_CRD_REFUSAL, SANDBOX_REFUSAL};
use gpu_pilot_core::values::nvidia::{self, Does, NEWER_KEYS, TEMPLATE_ONLY_KEYS};
use gpu_pilot_core::values::{POLICY_OPERATOR_KEYS, POLICY_SECTIONS, merge};
use gpu_pilot_e2e::nvidia::{gpu_operator_module, read_yaml};
use gpu_pilot_e2e::{Cluster, TestEnv, build_tools, plugin_binary, repo_root};
use kube::Api;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, ValidationDirective,
};
use serde_json::{Value, json};

use crate::TestFn;
use gpu_pilot_e2e::ensure_crd;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "nvidia::values_file_is_accepted_with_every_key_kept_or_mapped",
            |c| Box::pin(values_accepted(c)),
        ),
        ("nvidia::values_table_in_docs_is_current", |_| {
            Box::pin(table_current())
        }),
        ("nvidia::crd_has_every_field_of_nvidias_crd", |_| {
            Box::pin(crd_fields())
        }),
        (
            "nvidia::sample_and_chart_cluster_policies_are_stored_whole",
            |c| Box::pin(policies_stored(c)),
        ),
        (
            "nvidia::unsupported_families_are_refused_naming_them",
            |c| Box::pin(families_refused(c)),
        ),
    ]
}

const VALUES: &str = "deployments/gpu-operator/values.yaml";

/// NVIDIA's keys its templates read beyond values.yaml, and newer releases' keys, as a values tree.
fn extra_keys_tree() -> anyhow::Result<Value> {
    let mut tree = json!({});
    for (key, yaml) in TEMPLATE_ONLY_KEYS.iter().chain(NEWER_KEYS) {
        let value: Value =
            serde_yaml::from_str(yaml).with_context(|| format!("the sample value of {key}"))?;
        let mut cur = &mut tree;
        let segments: Vec<&str> = key.split('.').collect();
        for seg in &segments[..segments.len() - 1] {
            cur = cur
                .as_object_mut()
                .context("a map")?
                .entry(seg.to_string())
                .or_insert_with(|| json!({}));
        }
        cur[segments[segments.len() - 1]] = value;
    }
    Ok(tree)
}

/// `kubectl gpu -n gpu-operator install --dry-run -o json -f ...` with the real binary.
fn dry_run(files: &[&Path], sets: &[&str]) -> std::io::Result<std::process::Output> {
    let mut cmd = std::process::Command::new(plugin_binary().map_err(std::io::Error::other)?);
    cmd.args(["-n", "gpu-operator", "install", "--dry-run", "-o", "json"]);
    for f in files {
        cmd.arg("-f").arg(f);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.output()
}

fn objects_by_key(list: &Value) -> BTreeMap<String, Value> {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| (gpu_pilot_core::render::key(o), o.clone()))
        .collect()
}

/// Where a key of NVIDIA's values must show up in what install renders, when the table says it
/// does something: (object key, JSON pointer, expected value).
fn target(key: &str, value: &Value, ns: &str) -> Option<(String, String, Value)> {
    let policy = "ClusterPolicy/cluster-policy".to_string();
    let deployment = format!("Deployment/{ns}/gpu-pilot-controller");
    let pointer = |k: &str| format!("/{}", k.replace('.', "/"));
    let first = key.split('.').next().unwrap_or_default();
    let rest = key.split_once('.').map(|x| x.1).unwrap_or_default();
    if POLICY_SECTIONS.contains(&first) {
        if let Some(section) = ["devicePlugin", "migManager", "dcgmExporter"]
            .into_iter()
            .find(|s| key == format!("{s}.config.data"))
        {
            // Checked through the ConfigMap when it is created (config.create).
            let _ = section;
            return None;
        }
        if key.ends_with(".config.create") || key.starts_with("driver.nvidiaDriverCRD.") {
            return if key == "driver.nvidiaDriverCRD.enabled" {
                Some((
                    policy,
                    "/spec/driver/useNvidiaDriverCRD".into(),
                    value.clone(),
                ))
            } else {
                None
            };
        }
        if key == "migManager.config.name" && value == &json!("") {
            return Some((
                policy,
                "/spec/migManager/config/name".into(),
                json!(gpu_pilot_core::render::install::MIG_PARTED_CONFIG),
            ));
        }
        if let Some(r) = key.strip_prefix("driver.upgradePolicy.gpuPodDeletion.") {
            return Some((
                policy,
                format!("/spec/driver/upgradePolicy/podDeletion/{r}"),
                value.clone(),
            ));
        }
        return Some((policy, format!("/spec{}", pointer(key)), value.clone()));
    }
    if first == "operator" {
        if POLICY_OPERATOR_KEYS.contains(&rest) {
            return Some((policy, format!("/spec{}", pointer(key)), value.clone()));
        }
        let pod = "/spec/template/spec";
        let container = "/spec/template/spec/containers/0";
        return match rest {
            "imagePullPolicy" => Some((
                deployment,
                format!("{container}/imagePullPolicy"),
                value.clone(),
            )),
            "resources" => Some((deployment, format!("{container}/resources"), value.clone())),
            "imagePullSecrets" => Some((
                deployment,
                format!("{pod}/imagePullSecrets"),
                json!(
                    value
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|n| json!({"name": n}))
                        .collect::<Vec<_>>()
                ),
            )),
            "priorityClassName" | "tolerations" | "nodeSelector" | "affinity" => {
                Some((deployment, format!("{pod}/{rest}"), value.clone()))
            }
            "logging.level" => Some((
                deployment,
                format!("{container}/env/1/value"),
                json!(value.as_str().unwrap_or("debug")),
            )),
            "image" | "repository" | "version" => Some((
                deployment,
                format!("{container}/image"),
                json!(format!(
                    "ghcr.io/gpu-pilot/gpu-pilot-controller:v{}",
                    env!("CARGO_PKG_VERSION")
                )),
            )),
            _ => None,
        };
    }
    None
}

async fn values_accepted(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let module = gpu_operator_module()?;
    let nv_file = module.join(VALUES);
    let nv: Value = read_yaml(VALUES)?;
    let dir = tempfile::tempdir()?;
    let extra_file = dir.path().join("template-and-newer-keys.yaml");
    let extra = extra_keys_tree()?;
    std::fs::write(&extra_file, serde_yaml::to_string(&extra)?)?;

    let out = dry_run(&[&nv_file, &extra_file], &[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "kubectl gpu install --dry-run -f {} -f {} refused NVIDIA's values:\n{stderr}",
        nv_file.display(),
        extra_file.display()
    );
    // NVIDIA's images for the components gpu-pilot's agent serves are named as replaced.
    for section in ["operator", "devicePlugin", "gfd", "migManager", "validator"] {
        ensure!(
            stderr.contains(&format!("warning: {section}.image: NVIDIA's")),
            "install did not say it replaces NVIDIA's {section} image:\n{stderr}"
        );
    }
    let objects = objects_by_key(&serde_json::from_slice(&out.stdout)?);

    // The values as install read them: NVIDIA's file, then the extra keys.
    let mut user = nv.clone();
    merge(&mut user, extra.clone());

    let mut keys: Vec<String> = nvidia::table_keys(&nv);
    keys.extend(
        TEMPLATE_ONLY_KEYS
            .iter()
            .chain(NEWER_KEYS)
            .map(|(k, _)| k.to_string()),
    );
    let mut missing_rule = Vec::new();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for key in &keys {
        let Some(does) = nvidia::lookup(key) else {
            missing_rule.push(key.clone());
            continue;
        };
        let value = user
            .pointer(&format!("/{}", key.replace('.', "/")))
            .cloned()
            .unwrap_or(Value::Null);
        if matches!(
            does,
            Does::Implemented(_) | Does::Mapped(_) | Does::Ignored(_) | Does::NotRenderedYet(_)
        ) && let Some((object, pointer, want)) = target(key, &value, "gpu-operator")
        {
            let got = objects.get(&object).and_then(|o| o.pointer(&pointer));
            // An empty value may be left out of what is rendered.
            let empty = want == json!({}) || want == json!([]) || want == json!("");
            if got == Some(&want) || (got.is_none() && empty) {
                checked += 1;
            } else {
                wrong.push(format!(
                    "  {key} = {want}: {object}{pointer} is {}",
                    got.map(Value::to_string).unwrap_or("absent".into())
                ));
            }
        }
    }
    ensure!(
        missing_rule.is_empty(),
        "keys of NVIDIA's values with no row in gpu_pilot_core::values::nvidia::RULES: {missing_rule:?}"
    );
    ensure!(
        wrong.is_empty(),
        "keys of NVIDIA's values not kept where they belong:\n{}",
        wrong.join("\n")
    );

    // The ConfigMaps made from config.create/data, and extraObjects.
    let cm = |name: &str| objects.get(&format!("ConfigMap/gpu-operator/{name}"));
    ensure!(
        cm("custom-dcgm-metrics").map(|c| &c["data"]["dcgm-metrics.csv"])
            == Some(&extra["dcgmExporter"]["config"]["data"]),
        "no ConfigMap custom-dcgm-metrics from dcgmExporter.config.create/data"
    );
    ensure!(
        objects.contains_key("ConfigMap/extra"),
        "extraObjects were not rendered: {:?}",
        objects.keys().collect::<Vec<_>>()
    );
    // The apiserver takes the ClusterPolicy install would apply (CEL rules, strict fields).
    let env = TestEnv::new(&cluster, "nvidia-values").await?;
    ensure_crd(&env.client).await?;
    let mut policy = objects["ClusterPolicy/cluster-policy"].clone();
    let name = format!("nvidia-values-{}", env.namespace);
    policy["metadata"]["name"] = json!(name);
    let api: Api<DynamicObject> = Api::all_with(
        env.client.clone(),
        &ApiResource::erase::<ClusterPolicy>(&()),
    );
    let mut pp = PatchParams::apply("gpu-pilot-e2e").validation(ValidationDirective::Strict);
    pp.dry_run = true;
    api.patch(&name, &pp, &Patch::Apply(&policy))
        .await
        .context("the apiserver refused the ClusterPolicy install renders from NVIDIA's values")?;
    env.cleanup().await;
    eprintln!(
        "nvidia: {} keys of NVIDIA's values ({} in its values.yaml), {checked} checked in the rendered objects",
        keys.len(),
        nvidia::table_keys(&nv).len()
    );
    Ok(())
}

async fn table_current() -> anyhow::Result<()> {
    let nv = read_yaml(VALUES)?;
    let file = gpu_operator_module()?.join(VALUES);
    let generated = nvidia::markdown(&nv, &nvidia::module_of(&file));
    ensure!(
        !generated.contains("NOT IN THE TABLE"),
        "some key has no rule:\n{}",
        generated
            .lines()
            .filter(|l| l.contains("NOT IN THE TABLE"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let path = repo_root().join("docs/nvidia-values.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    ensure!(
        committed == generated,
        "{} is stale; regenerate it with:\n  cargo run -p kubectl-gpu -- nvidia-keys {} > docs/nvidia-values.md",
        path.display(),
        file.display()
    );
    Ok(())
}

/// Every property path of a CRD's spec schema, with its type.
fn schema_paths(schema: &Value, path: &str, out: &mut BTreeMap<String, String>) {
    let ty = schema["type"].as_str().unwrap_or_else(|| {
        if schema["x-kubernetes-int-or-string"] == json!(true) {
            "int-or-string"
        } else {
            "?"
        }
    });
    out.insert(path.to_string(), ty.to_string());
    if let Some(props) = schema["properties"].as_object() {
        for (k, v) in props {
            schema_paths(v, &format!("{path}.{k}"), out);
        }
    }
    if let Some(items) = schema.get("items") {
        schema_paths(items, &format!("{path}[]"), out);
    }
    if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        schema_paths(extra, &format!("{path}{{}}"), out);
    }
}

fn spec_schema(crd: &Value) -> Value {
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

async fn crd_fields() -> anyhow::Result<()> {
    let theirs = read_yaml("deployments/gpu-operator/crds/nvidia.com_clusterpolicies.yaml")?;
    let ours = serde_json::to_value(gpu_pilot_api::crd())?;
    let (mut t, mut o) = (BTreeMap::new(), BTreeMap::new());
    schema_paths(&spec_schema(&theirs), "spec", &mut t);
    schema_paths(&spec_schema(&ours), "spec", &mut o);
    let mut missing = Vec::new();
    for (path, ty) in &t {
        match o.get(path) {
            None => missing.push(format!("  {path} ({ty}): not in gpu-pilot's CRD")),
            // A quantity is an int-or-string on both sides, however each spells it.
            Some(ours) if ours != ty && !(ty == "int-or-string" || ours == "int-or-string") => {
                missing.push(format!("  {path}: NVIDIA's is {ty}, gpu-pilot's {ours}"))
            }
            _ => {}
        }
    }
    ensure!(
        missing.is_empty(),
        "gpu-pilot's ClusterPolicy lacks fields of NVIDIA's ({} of {}):\n{}",
        missing.len(),
        t.len(),
        missing.join("\n")
    );
    eprintln!(
        "nvidia: all {} schema paths of NVIDIA's ClusterPolicy spec are in gpu-pilot's",
        t.len()
    );
    Ok(())
}

/// True when every field `want` sets (nulls aside) is in `got` with the same value.
fn kept(want: &Value, got: &Value, path: &str, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Null, _) => {}
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                match g.get(k) {
                    Some(gv) => kept(v, gv, &format!("{path}.{k}"), out),
                    None if v.is_null() => {}
                    None => out.push(format!("  {path}.{k}: dropped (was {v})")),
                }
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (a, b)) in w.iter().zip(g).enumerate() {
                kept(a, b, &format!("{path}[{i}]"), out);
            }
        }
        (w, g) if w == g => {}
        (w, g) => out.push(format!("  {path}: {w} became {g}")),
    }
}

/// Create `policy` (NVIDIA's, apiVersion changed) with strict field validation, read it back,
/// delete it; what was lost on the way.
async fn store(
    client: &kube::Client,
    mut policy: Value,
    name: &str,
) -> anyhow::Result<Vec<String>> {
    policy["apiVersion"] = json!("gpupilot.io/v1alpha1");
    policy["metadata"] = json!({ "name": name });
    let api: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::erase::<ClusterPolicy>(&()));
    // Server-side apply with strict field validation: an unknown field is an error, not
    // silently pruned.
    let pp = PatchParams::apply("gpu-pilot-e2e").validation(ValidationDirective::Strict);
    api.patch(name, &pp, &Patch::Apply(&policy))
        .await
        .with_context(|| format!("the apiserver refused NVIDIA's ClusterPolicy {name}"))?;
    let stored = serde_json::to_value(api.get(name).await?)?;
    api.delete(name, &DeleteParams::default()).await?;
    let mut lost = Vec::new();
    kept(&policy["spec"], &stored["spec"], "spec", &mut lost);
    Ok(lost)
}

async fn policies_stored(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "nvidia-policy").await?;
    ensure_crd(&env.client).await?;
    let sample = read_yaml("config/samples/v1_clusterpolicy.yaml")?;
    let lost = store(
        &env.client,
        sample,
        &format!("nvidia-sample-{}", env.namespace),
    )
    .await?;
    ensure!(
        lost.is_empty(),
        "NVIDIA's sample ClusterPolicy lost fields in gpu-pilot's CRD:\n{}",
        lost.join("\n")
    );

    // The ClusterPolicy NVIDIA's own chart renders from its own values (helm template, offline:
    // the module carries the NFD subchart).
    let tools = build_tools()?;
    let helm = tools.join("helm");
    ensure!(
        helm.is_file(),
        "helm is missing from {}: run scripts/build-tools",
        tools.display()
    );
    let home = tempfile::tempdir()?;
    let out = std::process::Command::new(&helm)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .args(["template", "gpu-operator"])
        .arg(gpu_operator_module()?.join("deployments/gpu-operator"))
        .args(["--namespace", "gpu-operator"])
        .output()?;
    ensure!(
        out.status.success(),
        "helm template of NVIDIA's chart failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut rendered = None;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if v["kind"] == "ClusterPolicy" {
            rendered = Some(v);
        }
    }
    let Some(rendered) = rendered else {
        bail!("NVIDIA's chart rendered no ClusterPolicy");
    };
    let lost = store(
        &env.client,
        rendered,
        &format!("nvidia-chart-{}", env.namespace),
    )
    .await?;
    ensure!(
        lost.is_empty(),
        "the ClusterPolicy NVIDIA's chart renders lost fields in gpu-pilot's CRD:\n{}",
        lost.join("\n")
    );
    env.cleanup().await;
    Ok(())
}

async fn families_refused(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "nvidia-families").await?;
    ensure_crd(&env.client).await?;
    let api: Api<DynamicObject> = Api::all_with(
        env.client.clone(),
        &ApiResource::erase::<ClusterPolicy>(&()),
    );
    let cases = [
        (
            json!({"sandboxWorkloads": {"enabled": true}, "vfioManager": {"enabled": true}}),
            SANDBOX_REFUSAL,
            "sandboxWorkloads.enabled=true",
        ),
        (
            json!({"driver": {"useNvidiaDriverCRD": true}}),
            DRIVER_CRD_REFUSAL,
            "driver.nvidiaDriverCRD.enabled=true",
        ),
    ];
    for (i, (spec, message, set)) in cases.iter().enumerate() {
        // The apiserver, through the CRD's CEL rules.
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
            "metadata": { "name": format!("family-{i}-{}", env.namespace) },
            "spec": spec,
        }))?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => bail!("the apiserver accepted {spec}"),
            Err(kube::Error::Api(s)) => ensure!(
                s.code == 422 && s.message.contains(message),
                "the apiserver refused {spec} with {} {:?}, not the family's message",
                s.code,
                s.message
            ),
            Err(e) => return Err(e.into()),
        }
        // Install, naming the family.
        let out = dry_run(&[], &[set])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(message),
            "install --set {set} did not refuse it with the family's message:\n{stderr}"
        );
    }
    // Install and the chart refuse the chart-only families alike, from the same messages.
    let tools = build_tools()?;
    let home = tempfile::tempdir()?;
    for (key, message) in nvidia::refusals() {
        let set = format!("{key}=true");
        let out = dry_run(&[], &[&set])?;
        ensure!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(message),
            "install --set {set}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new(tools.join("helm"))
            .env("HELM_CACHE_HOME", home.path().join("cache"))
            .env("HELM_CONFIG_HOME", home.path().join("config"))
            .env("HELM_DATA_HOME", home.path().join("data"))
            .args(["template", "gpu-pilot"])
            .arg(repo_root().join("charts/gpu-pilot"))
            .args(["--set", &set])
            .output()?;
        ensure!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(message),
            "helm template --set {set}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // NVIDIA's defaults for the family (operands enabled, the switch off) pass silently.
    let out = dry_run(
        &[],
        &[
            "vfioManager.enabled=true,sandboxDevicePlugin.enabled=true,vgpuDeviceManager.enabled=true,sandboxWorkloads.enabled=false",
        ],
    )?;
    ensure!(
        out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "NVIDIA's defaults for the sandbox family were not accepted silently: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.cleanup().await;
    Ok(())
}
