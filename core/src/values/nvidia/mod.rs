//! NVIDIA GPU Operator users' values: the keys of NVIDIA's chart (`deployments/gpu-operator` of
//! github.com/NVIDIA/gpu-operator) that are not ClusterPolicy fields, how they reach the spec,
//! what is refused, and a key-by-key table of what each of NVIDIA's keys does in gpu-pilot.
//!
//! The policy sections of NVIDIA's values are the ClusterPolicy's fields under the same names
//! (the CRD has all of NVIDIA's `nvidia.com/v1` fields), so most keys need nothing here. What
//! is here: NVIDIA's chart-only keys (`config.create/data`, `driver.nvidiaDriverCRD`,
//! `upgradePolicy.gpuPodDeletion`, `platform`, the NFD subchart's values, ...), the images of
//! NVIDIA's that gpu-pilot replaces by its own, and the table.

mod table;

pub use table::{
    Does, NEWER_KEYS, RULES, Rule, TEMPLATE_ONLY_KEYS, leaf_keys, lookup, markdown, table_keys,
};

use gpu_pilot_api::policy::ClusterPolicySpec;
use serde_json::{Map, Value, json};

/// NVIDIA's GPU Operator module, whose chart this module reads. Its version is pinned once, in
/// `scripts/nvidia-gpu-operator` (which the tests and the migration test use to fetch it).
pub const NVIDIA_MODULE: &str = "github.com/NVIDIA/gpu-operator";

/// `github.com/NVIDIA/gpu-operator@<version>` from a file's path in the Go module cache
/// (`.../gpu-operator@<version>/deployments/...`), or the path itself.
pub fn module_of(path: &std::path::Path) -> String {
    path.ancestors()
        .filter_map(|a| a.file_name()?.to_str())
        .find_map(|name| name.strip_prefix("gpu-operator@"))
        .map(|version| format!("{NVIDIA_MODULE}@{version}"))
        .unwrap_or_else(|| path.display().to_string())
}

/// The images of NVIDIA's that gpu-pilot's own binaries replace, by values section. A values file
/// or policy naming one of them (the last path segment, without tag or digest) gets gpu-pilot's.
pub const REPLACED_IMAGES: [(&str, &[&str]); 5] = [
    ("operator", &["gpu-operator"]),
    ("devicePlugin", &["k8s-device-plugin"]),
    ("gfd", &["k8s-device-plugin", "gpu-feature-discovery"]),
    ("migManager", &["k8s-mig-manager"]),
    ("validator", &["gpu-operator-validator"]),
];

/// True when `image` names NVIDIA's GPU Operator image.
pub fn is_nvidia_operator_image(image: &str) -> bool {
    gpu_pilot_api::policy::names_image(image, REPLACED_IMAGES[0].1)
}

// ---------------------------------------------------------------------------------------------
// The values schema and the spec

/// Add NVIDIA's chart-only keys to the values schema's top-level `properties`.
pub fn add_chart_keys(properties: &mut Map<String, Value>) {
    let config_data_map = json!({
        "create": { "type": "boolean", "description": "Create the ConfigMap config.name from config.data (NVIDIA's chart does the same)." },
        "data": { "type": "object", "additionalProperties": { "type": "string" }, "description": "The ConfigMap's entries, when create is true." },
    });
    for section in ["devicePlugin", "migManager"] {
        if let Some(p) = properties
            .get_mut(section)
            .and_then(|s| s.pointer_mut("/properties/config/properties"))
            .and_then(Value::as_object_mut)
        {
            p.extend(config_data_map.as_object().expect("a map").clone());
        }
    }
    if let Some(p) = properties
        .get_mut("dcgmExporter")
        .and_then(|s| s.pointer_mut("/properties/config/properties"))
        .and_then(Value::as_object_mut)
    {
        p.insert("create".into(), json!({ "type": "boolean", "description": "Create the ConfigMap config.name from config.data." }));
        p.insert(
            "data".into(),
            json!({ "type": "string", "description": "dcgm-exporter's metrics CSV (dcgm-metrics.csv), when create is true." }),
        );
    }
    if let Some(driver) = properties
        .get_mut("driver")
        .and_then(|s| s.pointer_mut("/properties"))
        .and_then(Value::as_object_mut)
    {
        driver.insert(
            "nvidiaDriverCRD".into(),
            json!({
                "type": "object",
                "description": "NVIDIA's NVIDIADriver custom resource: not supported, enabled=true is refused.",
                "properties": {
                    "enabled": { "type": "boolean" },
                    "deployDefaultCR": { "type": "boolean" },
                    "driverType": { "type": "string", "enum": ["gpu", "vgpu", "vgpu-host-manager"] },
                    "nodeSelector": { "type": "object", "additionalProperties": { "type": "string" } },
                },
            }),
        );
        if let Some(up) = driver
            .get_mut("upgradePolicy")
            .and_then(|u| u.pointer_mut("/properties"))
            .and_then(Value::as_object_mut)
        {
            let pod_deletion = up.get("podDeletion").cloned().unwrap_or(json!({}));
            up.insert("gpuPodDeletion".into(), pod_deletion);
        }
    }
    properties.insert(
        "platform".into(),
        json!({
            "type": "object",
            "properties": { "openshift": { "type": "boolean", "description": "OpenShift is not supported: true is refused." } },
        }),
    );
    for key in ["nameOverride", "fullnameOverride"] {
        properties.insert(
            key.into(),
            json!({ "type": "string", "description": "Accepted from NVIDIA's chart; gpu-pilot's object names are fixed." }),
        );
    }
    properties.insert(
        "node-feature-discovery".into(),
        json!({
            "type": "object",
            "description": "Values of NVIDIA's node-feature-discovery subchart. worker.tolerations, worker.nodeSelector, priorityClassName and worker.config.sources.pci.deviceClassWhitelist are kept for gpu-pilot's node detector, which is not deployed yet; the rest is kept and unused.",
        }),
    );
    properties.insert(
        "extraObjects".into(),
        json!({
            "type": "array",
            "description": "More objects to install with the chart, as maps or YAML strings.",
            "items": { "type": ["object", "string"] },
        }),
    );
}

/// Turn the values' policy sections into the ClusterPolicy spec: NVIDIA's chart-only keys are
/// dropped or renamed as NVIDIA's chart template does (the chart's `gpu-pilot.policySpec` does
/// the same).
pub fn chart_keys_to_spec(spec: &mut Value) {
    for section in ["devicePlugin", "migManager", "dcgmExporter"] {
        if let Some(config) = spec
            .pointer_mut(&format!("/{section}/config"))
            .and_then(Value::as_object_mut)
        {
            config.remove("create");
            config.remove("data");
        }
    }
    // NVIDIA's operator reads an empty mig-parted ConfigMap name as its default ConfigMap, which
    // gpu-pilot ships under the same name.
    if let Some(name) = spec.pointer_mut("/migManager/config/name")
        && name.as_str() == Some("")
    {
        *name = json!(crate::render::install::MIG_PARTED_CONFIG);
    }
    if let Some(driver) = spec.get_mut("driver").and_then(Value::as_object_mut) {
        if let Some(crd) = driver.remove("nvidiaDriverCRD")
            && let Some(enabled) = crd.get("enabled")
        {
            driver.insert("useNvidiaDriverCRD".into(), enabled.clone());
        }
        if let Some(up) = driver
            .get_mut("upgradePolicy")
            .and_then(Value::as_object_mut)
            && let Some(d) = up.remove("gpuPodDeletion")
        {
            up.insert("podDeletion".into(), d);
        }
    }
}

fn on(tree: &Value, pointer: &str) -> bool {
    tree.pointer(pointer) == Some(&Value::Bool(true))
}

/// The refusal of `platform.openshift=true`.
pub const OPENSHIFT_REFUSAL: &str = "platform.openshift=true asks for Red Hat OpenShift (SecurityContextConstraints, the OpenShift driver toolkit), which gpu-pilot does not support; set platform.openshift=false";
/// The refusal of `nfd.nodefeaturerules=true`.
pub const NODE_FEATURE_RULES_REFUSAL: &str = "nfd.nodefeaturerules=true adds NVIDIA's NodeFeatureRule for confidential computing (TDX and SEV-SNP nodes), which gpu-pilot does not support; set nfd.nodefeaturerules=false";

/// Every value key install and the chart refuse when it is `true`, with the message; the chart
/// reads the same from `files/refused.yaml` (written by `kubectl-gpu refused-keys`).
pub fn refusals() -> [(&'static str, &'static str); 5] {
    use gpu_pilot_api::policy::{DRIVER_CRD_REFUSAL, SANDBOX_REFUSAL};
    [
        ("platform.openshift", OPENSHIFT_REFUSAL),
        ("nfd.nodefeaturerules", NODE_FEATURE_RULES_REFUSAL),
        ("sandboxWorkloads.enabled", SANDBOX_REFUSAL),
        ("driver.nvidiaDriverCRD.enabled", DRIVER_CRD_REFUSAL),
        ("driver.useNvidiaDriverCRD", DRIVER_CRD_REFUSAL),
    ]
}

/// `files/refused.yaml`: value key -> message.
pub fn refusals_yaml() -> String {
    let map: std::collections::BTreeMap<&str, &str> = refusals().into_iter().collect();
    format!(
        "# Written by `kubectl-gpu refused-keys` (a test keeps it current): the values the chart\n# refuses when true, and why.\n{}",
        serde_yaml::to_string(&map).expect("a map of strings serializes")
    )
}

/// Values that ask for what gpu-pilot does not do and that are not ClusterPolicy fields (those
/// are [`gpu_pilot_api::policy::unsupported`]).
pub fn refused(tree: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if on(tree, "/platform/openshift") {
        out.push(OPENSHIFT_REFUSAL.to_string());
    }
    if on(tree, "/nfd/nodefeaturerules") {
        out.push(NODE_FEATURE_RULES_REFUSAL.to_string());
    }
    out
}

/// The items of `extraObjects`, each an object (a map, or a YAML string holding one) or what is
/// wrong with it.
pub fn extra_objects(tree: &Value) -> Vec<Result<Value, String>> {
    let Some(items) = tree.get("extraObjects").and_then(Value::as_array) else {
        return Vec::new();
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let obj = match item {
                Value::String(text) => serde_yaml::from_str::<Value>(text)
                    .map_err(|e| format!("extraObjects[{i}] is not YAML: {e}"))?,
                other => other.clone(),
            };
            let named = ["/apiVersion", "/kind", "/metadata/name"]
                .iter()
                .all(|p| obj.pointer(p).and_then(Value::as_str).is_some_and(|s| !s.is_empty()));
            if named {
                Ok(obj)
            } else {
                Err(format!(
                    "extraObjects[{i}] is not a Kubernetes object: it needs apiVersion, kind and metadata.name"
                ))
            }
        })
        .collect()
}

/// Errors in NVIDIA's chart-only keys: a ConfigMap to create without a name, an `extraObjects`
/// item that is no object.
pub fn invalid(tree: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for section in ["devicePlugin", "migManager", "dcgmExporter"] {
        let config = &tree[section]["config"];
        if config["create"] == json!(true) && config["name"].as_str().unwrap_or("").is_empty() {
            out.push(format!(
                "{section}.config.create=true needs {section}.config.name, the ConfigMap to create from {section}.config.data"
            ));
        }
    }
    out.extend(extra_objects(tree).into_iter().filter_map(Result::err));
    out
}

/// What install says about values that are accepted but change nothing, or are replaced.
pub fn notices(tree: &Value, spec: &ClusterPolicySpec) -> Vec<String> {
    let mut out = Vec::new();
    for (section, images) in REPLACED_IMAGES {
        if let Some(image) = tree
            .pointer(&format!("/{section}/image"))
            .and_then(Value::as_str)
            && gpu_pilot_api::policy::names_image(image, images)
        {
            let by = if section == "operator" {
                "gpu-pilot's controller"
            } else {
                "gpu-pilot's agent, which serves this component"
            };
            out.push(format!(
                "{section}.image: NVIDIA's {image} is replaced by {by} (its repository and version are not used)"
            ));
        }
    }
    for (field, why) in gpu_pilot_api::policy::inert(spec) {
        out.push(format!("{field}=true is accepted and does nothing: {why}"));
    }
    for key in not_rendered_switches_on(spec) {
        if let Some(does) = table::lookup(key) {
            out.push(format!("{key}=true is {}: {}", does.kind(), does.text()));
        }
    }
    out
}

/// The switches NVIDIA's operator acts on, turned on in `spec`, that gpu-pilot keeps but renders
/// nothing for yet (the key table says "accepted, kept, not rendered yet" of each).
fn not_rendered_switches_on(spec: &ClusterPolicySpec) -> Vec<&'static str> {
    use gpu_pilot_api::policy::OperandSpec;
    [
        ("psa.enabled", spec.psa.enabled),
        ("gds.enabled", spec.gds.enabled()),
        ("gdrcopy.enabled", spec.gdrcopy.enabled()),
        ("driver.rdma.enabled", spec.driver.rdma.enabled),
        ("driver.usePrecompiled", spec.driver.use_precompiled),
        (
            "dcgmExporter.serviceMonitor.enabled",
            spec.dcgm_exporter.service_monitor.enabled,
        ),
        ("dcgmExporter.hostNetwork", spec.dcgm_exporter.host_network),
    ]
    .into_iter()
    .filter_map(|(key, on)| on.then_some(key))
    .collect()
}

/// NVIDIA's values.yaml (or any values file) as a JSON tree.
pub fn read_values_file(path: &std::path::Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| format!("{} is not valid YAML: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_keys_become_nvidias_spec_fields() {
        let mut spec = json!({
            "devicePlugin": {"config": {"name": "c", "create": true, "data": {"a": "b"}}},
            "migManager": {"config": {"name": "", "default": "all-disabled"}},
            "driver": {"nvidiaDriverCRD": {"enabled": false, "driverType": "gpu"},
                       "upgradePolicy": {"gpuPodDeletion": {"force": true}}},
        });
        chart_keys_to_spec(&mut spec);
        assert_eq!(
            spec,
            json!({
                "devicePlugin": {"config": {"name": "c"}},
                "migManager": {"config": {"name": "default-mig-parted-config", "default": "all-disabled"}},
                "driver": {"useNvidiaDriverCRD": false, "upgradePolicy": {"podDeletion": {"force": true}}},
            })
        );
    }

    #[test]
    fn switches_not_rendered_yet_are_said_when_on() {
        let spec = ClusterPolicySpec::default();
        assert!(not_rendered_switches_on(&spec).is_empty());
        let spec: ClusterPolicySpec = serde_json::from_value(json!({
            "psa": {"enabled": true},
            "gds": {"enabled": true},
            "dcgmExporter": {"serviceMonitor": {"enabled": true}, "hostNetwork": true},
        }))
        .expect("a spec");
        let said = notices(&json!({}), &spec);
        for key in [
            "psa.enabled",
            "gds.enabled",
            "dcgmExporter.serviceMonitor.enabled",
            "dcgmExporter.hostNetwork",
        ] {
            assert!(
                said.iter()
                    .any(|n| n
                        .starts_with(&format!("{key}=true is accepted, kept, not rendered yet: "))),
                "{key}: {said:?}"
            );
        }
        assert!(!said.iter().any(|n| n.starts_with("gdrcopy.")), "{said:?}");
    }

    #[test]
    fn module_versions_come_from_the_module_cache_path() {
        let p = std::path::Path::new(
            "/root/go/pkg/mod/github.com/!n!v!i!d!i!a/gpu-operator@v0.0.0-2025-abc/deployments/gpu-operator/values.yaml",
        );
        assert_eq!(
            module_of(p),
            "github.com/NVIDIA/gpu-operator@v0.0.0-2025-abc"
        );
        assert_eq!(
            module_of(std::path::Path::new("values.yaml")),
            "values.yaml"
        );
    }

    #[test]
    fn the_charts_refusals_are_current() {
        assert!(
            include_str!("../../../../charts/gpu-pilot/files/refused.yaml") == refusals_yaml(),
            "charts/gpu-pilot/files/refused.yaml is stale: run `cargo run -p kubectl-gpu -- refused-keys > charts/gpu-pilot/files/refused.yaml`"
        );
    }

    #[test]
    fn openshift_and_cc_rules_are_refused_naming_the_key() {
        let e =
            refused(&json!({"platform": {"openshift": true}, "nfd": {"nodefeaturerules": true}}));
        assert_eq!(e.len(), 2);
        assert!(e[0].starts_with("platform.openshift=true") && e[0].contains("OpenShift"));
        assert!(e[1].contains("confidential computing"));
        assert!(refused(&json!({"platform": {"openshift": false}})).is_empty());
    }
}
