//! Install values: the Helm chart's keys, read the way Helm reads them.
//!
//! The defaults are the chart's own `values.yaml` (compiled in), so `kubectl gpu install` and
//! `helm install` start from the same file. As in Helm, the user's values are built first: `-f`
//! files deep-merged in order (maps merge, lists and scalars replace), then every `--set` written
//! into that tree; then they are laid over the defaults (maps merge, anything else replaces,
//! `null` removes the default). So `--set daemonsets.tolerations[0].key=x` replaces the default
//! list with a one-element list, as `helm install` does. The result is checked against the chart's `values.schema.json` (generated here, from the Rust
//! types and the CRD's schema), so a misspelt key is an error, never silently ignored.

use std::collections::BTreeMap;

use gpu_pilot_api::policy::{ClusterPolicySpec, ContainerRuntime, ImagePullPolicy, terse};
use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

mod schema;
mod set;

pub mod nvidia;
pub use schema::{check, schema};
pub use set::apply_set;
use set::set_values;

/// The chart's values.yaml, the defaults of every install.
pub const DEFAULT_VALUES: &str = include_str!("../../../charts/gpu-pilot/values.yaml");

/// The sections of the values that are ClusterPolicy spec sections under the same key (the
/// chart's `gpu-pilot.policySpec` lists the same).
pub const POLICY_SECTIONS: [&str; 24] = [
    "daemonsets",
    "driver",
    "toolkit",
    "devicePlugin",
    "dcgmExporter",
    "gfd",
    "migManager",
    "mig",
    "validator",
    "cdi",
    "hostPaths",
    "psa",
    "gds",
    "gdrcopy",
    "dcgm",
    "nodeStatusExporter",
    "psp",
    "sandboxWorkloads",
    "vfioManager",
    "sandboxDevicePlugin",
    "vgpuManager",
    "vgpuDeviceManager",
    "kataManager",
    "ccManager",
];

/// The keys of `operator` that go into the ClusterPolicy's `spec.operator`.
pub const POLICY_OPERATOR_KEYS: [&str; 6] = [
    "defaultRuntime",
    "runtimeClass",
    "labels",
    "annotations",
    "initContainer",
    "use_ocp_driver_toolkit",
];

#[derive(Debug, thiserror::Error)]
pub enum ValuesError {
    #[error("cannot read values file {path}: {source}; check the path given to -f/--values")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("values file {path} is not valid YAML: {source}")]
    Yaml {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("values file {path} must be a YAML map of keys (like values.yaml), found {found}")]
    NotAMap { path: String, found: &'static str },
    #[error(
        "--set {expr:?}: {why}. The form is key.sub=value[,key2=value2], lists as {{a,b}}, e.g. --set driver.enabled=false"
    )]
    Set { expr: String, why: String },
    #[error(
        "the values are not valid:\n{}\nsee charts/gpu-pilot/values.yaml (or `kubectl gpu install --help`) for the keys",
        .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n")
    )]
    Schema(Vec<String>),
}

/// gpu-pilot's controller Deployment, and the cluster-wide part of the policy.
#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperatorValues {
    /// Registry and path of the controller image.
    pub repository: String,
    /// Controller image name.
    pub image: String,
    /// Controller image tag; empty means the chart's appVersion.
    pub version: String,
    pub image_pull_policy: ImagePullPolicy,
    /// Names of Secrets in the install namespace used to pull the controller image.
    #[serde(default)]
    pub image_pull_secrets: Vec<String>,
    /// Controller replicas (one leads at a time).
    #[schemars(range(min = 1, max = 5))]
    pub replicas: i32,
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    /// The container runtime the toolkit configures (ClusterPolicy spec.operator.defaultRuntime).
    pub default_runtime: ContainerRuntime,
    /// RuntimeClass created for GPU pods and set on them by the webhook.
    pub runtime_class: String,
    /// Labels added to every object the controller creates.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to every object the controller creates, and to the controller's pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// PriorityClass of the controller's pods.
    #[serde(default)]
    pub priority_class_name: String,
    /// Tolerations of the controller's pods.
    #[serde(default)]
    #[schemars(schema_with = "terse::<Vec<Toleration>>")]
    pub tolerations: Vec<Toleration>,
    /// Node selector of the controller's pods.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Affinity of the controller's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "terse::<Option<Affinity>>")]
    pub affinity: Option<Affinity>,
    /// Logging of the controller, in NVIDIA's terms.
    #[serde(default)]
    pub logging: LoggingValues,
    /// NVIDIA's init-container image for its operands (ClusterPolicy spec.operator): kept, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_container: Option<gpu_pilot_api::policy::InitContainerSpec>,
    /// OpenShift's driver toolkit (ClusterPolicy spec.operator): kept, unused off OpenShift.
    #[serde(
        default,
        rename = "use_ocp_driver_toolkit",
        skip_serializing_if = "Option::is_none"
    )]
    pub use_ocp_driver_toolkit: Option<bool>,
    /// Delete the ClusterPolicy CRD on `helm uninstall` (the chart's post-delete hook), as NVIDIA's
    /// chart does when true; Helm itself never deletes `crds/`. `kubectl gpu uninstall` deletes
    /// the CRD unless `--keep-crd`.
    #[serde(
        default,
        rename = "cleanupCRD",
        skip_serializing_if = "Option::is_none"
    )]
    pub cleanup_crd: Option<bool>,
    /// NVIDIA's chart applies its CRD in a pre-upgrade hook when true. gpu-pilot: `kubectl gpu
    /// install` applies the CRD on every run.
    #[serde(
        default,
        rename = "upgradeCRD",
        skip_serializing_if = "Option::is_none"
    )]
    pub upgrade_crd: Option<bool>,
    /// Read by NVIDIA's chart template, absent from NVIDIA's CRD: kept, unused.
    #[serde(
        default,
        rename = "defaultGPUMode",
        skip_serializing_if = "Option::is_none"
    )]
    pub default_gpu_mode: Option<String>,
}

/// The controller's logging, as NVIDIA's chart spells it for its operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoggingValues {
    /// zap's time encoding (`epoch`, `iso8601`, `rfc3339`, ...): gpu-pilot always writes RFC
    /// 3339 times, so this is kept and unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_encoding: Option<String>,
    /// `debug`, `info` or `error` (zap's levels; a number > 0 means debug): the controller's
    /// log level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "log_level_schema")]
    pub level: Option<Value>,
    /// Text logs (zap's development mode) instead of JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devel_mode: Option<bool>,
}

fn log_level_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "debug, info or error, or a number above 0 for debug",
        "anyOf": [
            { "type": "string", "enum": ["debug", "info", "error"] },
            { "type": "integer", "minimum": 1 }
        ]
    })
}

/// What the apiserver does when the webhook cannot be reached.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FailurePolicy {
    Fail,
    Ignore,
}

/// The admission webhook Deployment and its registration.
#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookValues {
    pub enabled: bool,
    pub repository: String,
    pub image: String,
    /// Webhook image tag; empty means the chart's appVersion.
    pub version: String,
    pub image_pull_policy: ImagePullPolicy,
    #[serde(default)]
    pub image_pull_secrets: Vec<String>,
    #[schemars(range(min = 1, max = 10))]
    pub replicas: i32,
    pub failure_policy: FailurePolicy,
    /// Register the webhook by this HTTPS URL instead of its Service.
    #[schemars(regex(pattern = r"^(|https://.+)$"))]
    pub url: String,
    /// Base64 of the PEM CA bundle to put in both configurations up front (a webhook outside the
    /// cluster, or certificates you manage). Empty: the webhook (or cert-manager) fills it in.
    #[schemars(regex(pattern = r"^[A-Za-z0-9+/=]*$"))]
    pub ca_bundle: String,
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    pub cert_manager: CertManagerValues,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertManagerValues {
    /// Let cert-manager issue the webhook's certificate and inject its CA.
    pub enabled: bool,
}

/// Node Feature Discovery: expected in the cluster, or not.
#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NfdValues {
    pub enabled: bool,
    /// NVIDIA's chart adds a NodeFeatureRule labelling TDX and SEV-SNP nodes for confidential
    /// computing, which gpu-pilot does not support: `true` is refused.
    #[serde(default)]
    pub nodefeaturerules: bool,
}

/// The merged values, checked and split into what each part of the install needs.
#[derive(Clone, Debug)]
pub struct Values {
    /// The merged tree (what Helm calls `.Values`).
    pub tree: Value,
    pub operator: OperatorValues,
    pub webhook: WebhookValues,
    pub nfd: NfdValues,
    /// The ClusterPolicy spec exactly as the values spell it (what the chart renders).
    pub spec_json: Value,
    /// The same spec, typed.
    pub spec: ClusterPolicySpec,
    /// What install should say about the values: NVIDIA keys that do nothing here, NVIDIA
    /// images replaced by gpu-pilot's.
    pub notices: Vec<String>,
}

impl Values {
    /// The default values, as `kubectl gpu install` with no options uses them.
    pub fn defaults() -> Values {
        Values::from_tree(default_tree()).expect("the chart's values.yaml is valid")
    }

    /// Check a merged tree and split it.
    pub fn from_tree(tree: Value) -> Result<Values, ValuesError> {
        let mut errors = check(&tree);
        if !errors.is_empty() {
            return Err(ValuesError::Schema(errors));
        }
        errors.extend(nvidia::refused(&tree));
        errors.extend(nvidia::invalid(&tree));
        let section = |key: &str| tree.get(key).cloned().unwrap_or_else(|| json!({}));
        let operator: OperatorValues = typed("operator", section("operator"))?;
        let webhook: WebhookValues = typed("webhook", section("webhook"))?;
        let nfd: NfdValues = typed("nfd", section("nfd"))?;
        let spec_json = spec_json(&tree);

        let spec: ClusterPolicySpec = typed("the ClusterPolicy sections", spec_json.clone())?;
        errors.extend(
            gpu_pilot_api::policy::unsupported(&spec)
                .into_iter()
                .map(|(_, _, message)| message),
        );
        if !errors.is_empty() {
            return Err(ValuesError::Schema(errors));
        }
        let notices = nvidia::notices(&tree, &spec);
        Ok(Values {
            tree,
            operator,
            webhook,
            nfd,
            spec_json,
            spec,
            notices,
        })
    }

    /// Each `-f` file, then each `--set`, `--set-string`, laid over the defaults (Helm's order).
    pub fn load(
        files: &[std::path::PathBuf],
        sets: &[String],
        set_strings: &[String],
    ) -> Result<Values, ValuesError> {
        Values::load_over(default_tree(), files, sets, set_strings)
    }

    /// Like [`Values::load`], over `base` instead of the chart's defaults (install's `--version`
    /// changes the defaults the user's values are laid over).
    pub fn load_over(
        base: Value,
        files: &[std::path::PathBuf],
        sets: &[String],
        set_strings: &[String],
    ) -> Result<Values, ValuesError> {
        // The user's values alone; nulls stay in it until they remove defaults below.
        let mut user = Value::Object(Map::new());
        for path in files {
            let shown = path.display().to_string();
            let text = if shown == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|source| {
                    ValuesError::Read {
                        path: shown.clone(),
                        source,
                    }
                })?;
                s
            } else {
                std::fs::read_to_string(path).map_err(|source| ValuesError::Read {
                    path: shown.clone(),
                    source,
                })?
            };
            let overlay: Value = if text.trim().is_empty() {
                json!({})
            } else {
                serde_yaml::from_str(&text).map_err(|source| ValuesError::Yaml {
                    path: shown.clone(),
                    source,
                })?
            };
            match overlay {
                Value::Object(_) => merge_user(&mut user, overlay),
                Value::Null => {}
                other => {
                    return Err(ValuesError::NotAMap {
                        path: shown,
                        found: kind(&other),
                    });
                }
            }
        }
        for expr in sets {
            set_values(&mut user, expr, false, true)?;
        }
        for expr in set_strings {
            set_values(&mut user, expr, true, true)?;
        }
        let mut tree = base;
        merge(&mut tree, user);
        Values::from_tree(tree)
    }

    /// The controller's image reference (NVIDIA's operator image, from NVIDIA's values, means
    /// gpu-pilot's controller).
    pub fn controller_image(&self) -> String {
        if nvidia::is_nvidia_operator_image(&self.operator.image) {
            let defaults = Values::defaults();
            return image_ref(
                &defaults.operator.repository,
                &defaults.operator.image,
                &defaults.operator.version,
            );
        }
        image_ref(
            &self.operator.repository,
            &self.operator.image,
            &self.operator.version,
        )
    }

    /// The webhook's image reference.
    pub fn webhook_image(&self) -> String {
        image_ref(
            &self.webhook.repository,
            &self.webhook.image,
            &self.webhook.version,
        )
    }
}

fn typed<T: serde::de::DeserializeOwned>(key: &str, v: Value) -> Result<T, ValuesError> {
    serde_json::from_value(v).map_err(|e| ValuesError::Schema(vec![format!("{key}: {e}")]))
}

/// `repository/image:version`, the version defaulting to this release.
pub fn image_ref(repository: &str, image: &str, version: &str) -> String {
    let version = if version.is_empty() {
        concat!("v", env!("CARGO_PKG_VERSION"))
    } else {
        version
    };
    let sep = if version.starts_with("sha256:") {
        '@'
    } else {
        ':'
    };
    if repository.is_empty() {
        format!("{image}{sep}{version}")
    } else {
        format!("{}/{image}{sep}{version}", repository.trim_end_matches('/'))
    }
}

/// The chart's defaults as a JSON tree.
pub fn default_tree() -> Value {
    serde_yaml::from_str(DEFAULT_VALUES).expect("charts/gpu-pilot/values.yaml is valid YAML")
}

/// The ClusterPolicy spec the values describe, spelled as the values spell it.
pub fn spec_json(tree: &Value) -> Value {
    let mut spec = Map::new();
    let mut operator = Map::new();
    for key in POLICY_OPERATOR_KEYS {
        if let Some(v) = tree.pointer(&format!("/operator/{key}")) {
            operator.insert(key.into(), v.clone());
        }
    }
    spec.insert("operator".into(), Value::Object(operator));
    for key in POLICY_SECTIONS {
        if let Some(v) = tree.get(key) {
            spec.insert(key.into(), v.clone());
        }
    }
    let mut spec = Value::Object(spec);
    nvidia::chart_keys_to_spec(&mut spec);
    spec
}

/// Merging `-f` files into the user's values (Helm's mergeMaps): maps merge key by key,
/// anything else replaces, and a `null` stays so that it removes the default later.
fn merge_user(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        merge_user(existing, v)
                    }
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Helm's merge of values over defaults, which is a JSON merge patch (RFC 7386): maps merge key
/// by key, anything else replaces, `null` deletes.
pub fn merge(base: &mut Value, overlay: Value) {
    json_patch::merge(base, &overlay);
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_yaml_policy_defaults_are_the_apis_defaults() {
        let values = Values::defaults();
        assert_eq!(values.spec, ClusterPolicySpec::default());
        // Spelled exactly as the API serializes its defaults, so `helm template` and
        // `install --dry-run` print the same spec.
        let api = serde_json::to_value(ClusterPolicySpec::default()).unwrap();
        assert_eq!(values.spec_json, api);
    }

    #[test]
    fn set_follows_helms_rules() {
        let mut t = default_tree();
        apply_set(
            &mut t,
            "driver.enabled=false,toolkit.version=v1.17.0",
            false,
        )
        .unwrap();
        apply_set(&mut t, "mig.strategy=mixed", false).unwrap();
        apply_set(
            &mut t,
            "daemonsets.tolerations[1].key=gpu,daemonsets.tolerations[1].operator=Exists",
            false,
        )
        .unwrap();
        apply_set(&mut t, "operator.replicas=2", false).unwrap();
        apply_set(&mut t, "devicePlugin.args={--a,--b}", false).unwrap();
        apply_set(&mut t, "operator.labels.team=ml\\,infra", false).unwrap();
        apply_set(&mut t, "driver.version=550", true).unwrap();
        let v = Values::from_tree(t).unwrap();
        assert!(!v.spec.driver.enabled);
        assert_eq!(v.spec.toolkit.version, "v1.17.0");
        assert_eq!(v.spec.mig.strategy.as_str(), "mixed");
        assert_eq!(v.spec.daemonsets.tolerations.len(), 2);
        assert_eq!(v.operator.replicas, 2);
        assert_eq!(v.spec.device_plugin.args, vec!["--a", "--b"]);
        assert_eq!(v.spec.operator.labels["team"], "ml,infra");
        assert_eq!(v.spec.driver.version, "550");
    }

    #[test]
    fn bad_values_name_the_key_and_the_choices() {
        let mut t = default_tree();
        apply_set(&mut t, "driver.enabeld=false", false).unwrap();
        let e = Values::from_tree(t).unwrap_err().to_string();
        assert!(e.contains("driver.enabeld: unknown key"), "{e}");
        assert!(e.contains("enabled"), "{e}");

        let mut t = default_tree();
        apply_set(&mut t, "mig.strategy=mixd", false).unwrap();
        let e = Values::from_tree(t).unwrap_err().to_string();
        assert!(e.contains("mig.strategy: \"mixd\" is not one of"), "{e}");

        let mut t = default_tree();
        apply_set(&mut t, "driver.enabled=yes", false).unwrap();
        let e = Values::from_tree(t).unwrap_err().to_string();
        assert!(e.contains("driver.enabled: expected boolean"), "{e}");

        let mut t = default_tree();
        apply_set(&mut t, "operator.replicas=0", false).unwrap();
        assert!(Values::from_tree(t).is_err());

        for bad in ["driver.enabled", "=x", "a..b=1", "a[x]=1", "a[1=2", "[0]=1"] {
            let mut t = default_tree();
            let e = apply_set(&mut t, bad, false).unwrap_err().to_string();
            assert!(e.contains("--set"), "{bad}: {e}");
        }
    }

    #[test]
    fn null_removes_and_files_merge() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v.yaml");
        std::fs::write(&f, "toolkit:\n  enabled: false\nmig:\n  strategy: mixed\n").unwrap();
        let v = Values::load(std::slice::from_ref(&f), &["mig.strategy=none".into()], &[]).unwrap();
        assert!(!v.spec.toolkit.enabled);
        assert_eq!(
            v.spec.toolkit.version, "v1.17.8",
            "other keys keep their defaults"
        );
        assert_eq!(v.spec.mig.strategy.as_str(), "none", "--set wins over -f");

        std::fs::write(&f, "- a\n- b\n").unwrap();
        let e = Values::load(std::slice::from_ref(&f), &[], &[]).unwrap_err();
        assert!(e.to_string().contains("must be a YAML map"), "{e}");
        let e = Values::load(&[dir.path().join("missing.yaml")], &[], &[]).unwrap_err();
        assert!(e.to_string().contains("cannot read values file"), "{e}");
    }

    #[test]
    fn set_writes_into_the_users_values_as_helm_does() {
        // An index into a list the user did not give starts a new list, which replaces the
        // default one (helm install does the same).
        let v = Values::load(
            &[],
            &[
                "daemonsets.tolerations[0].key=gpu,daemonsets.tolerations[0].operator=Exists"
                    .into(),
                "operator.resources=null".into(),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(
            v.spec_json["daemonsets"]["tolerations"],
            json!([{"key": "gpu", "operator": "Exists"}])
        );
        assert!(v.operator.resources.is_none(), "null removes the default");
        // Into a list from a -f file, the index edits that list.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v.yaml");
        std::fs::write(
            &f,
            "daemonsets:\n  tolerations:\n  - key: a\n    operator: Exists\n    effect: NoSchedule\n",
        )
        .unwrap();
        let v = Values::load(
            std::slice::from_ref(&f),
            &["daemonsets.tolerations[0].key=b".into()],
            &[],
        )
        .unwrap();
        assert_eq!(
            v.spec_json["daemonsets"]["tolerations"],
            json!([{"key": "b", "operator": "Exists", "effect": "NoSchedule"}])
        );
    }

    #[test]
    fn image_refs() {
        assert_eq!(image_ref("r.io/x/", "c", "v1"), "r.io/x/c:v1");
        assert_eq!(
            image_ref("r", "c", ""),
            concat!("r/c:v", env!("CARGO_PKG_VERSION"))
        );
        assert!(image_ref("r", "c", "sha256:abc").contains("@sha256:"));
    }

    #[test]
    fn the_committed_schema_is_current() {
        let committed: Value =
            serde_json::from_str(include_str!("../../../charts/gpu-pilot/values.schema.json"))
                .unwrap();
        assert!(
            committed == schema(),
            "charts/gpu-pilot/values.schema.json is stale: run `cargo run -p kubectl-gpu -- values-schema > charts/gpu-pilot/values.schema.json`"
        );
    }
}
