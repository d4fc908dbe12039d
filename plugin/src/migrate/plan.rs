//! The pure part of `kubectl gpu migrate`: what NVIDIA's installation is (a [`Snapshot`]), the
//! gpu-pilot values that do the same, what differs, and the steps of the takeover.

use std::collections::BTreeMap;

use gpu_pilot_api::names::{Component, label};
use serde_json::{Map, Value, json};

use super::helm_release::HelmRelease;
use gpu_pilot_core::values::nvidia::{Does, REPLACED_IMAGES};
use gpu_pilot_core::values::{POLICY_OPERATOR_KEYS, POLICY_SECTIONS};

/// NVIDIA's installation as migrate read it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The ClusterPolicy (`nvidia.com/v1`) as JSON.
    pub policy: Value,
    /// The namespace NVIDIA's operator and operands run in.
    pub namespace: String,
    /// The Helm release that installed it, when Helm did.
    pub release: Option<HelmRelease>,
    /// Deployments running NVIDIA's operator.
    pub operators: Vec<Operator>,
    /// NVIDIA's operand DaemonSets (owned by its ClusterPolicy).
    pub daemonsets: Vec<NvidiaDaemonSet>,
    /// The pods of those DaemonSets, and (on a second run) NVIDIA's pods already handed over.
    pub pods: Vec<NvidiaPod>,
    /// Running pods that hold GPUs, by node: what must not be disturbed.
    pub gpu_pods: BTreeMap<String, Vec<String>>,
    /// Objects NVIDIA's operator made under names gpu-pilot's install uses (the RuntimeClass,
    /// the default mig-parted ConfigMap), keyed as `render::key` keys them. gpu-pilot takes
    /// them over.
    pub to_adopt: Vec<String>,
    /// The container runtime of each GPU node (`containerd`, `cri-o`, `docker`), from its
    /// `nodeInfo.containerRuntimeVersion`: NVIDIA's operator configures the one the nodes run.
    pub node_runtimes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Operator {
    pub name: String,
    pub replicas: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NvidiaDaemonSet {
    pub name: String,
    /// The gpu-pilot component that does its job, if any.
    pub component: Option<Component>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NvidiaPod {
    pub name: String,
    pub node: String,
    pub component: Option<Component>,
    /// Already labelled for gpu-pilot's DaemonSet (a resumed migration).
    pub handed_over: bool,
}

/// The gpu-pilot component that does the job of one of NVIDIA's operand DaemonSets, from its
/// `app` label (NVIDIA's assets name each DaemonSet and its pods' `app` alike; precompiled
/// driver DaemonSets are `nvidia-driver-daemonset-<kernel>-<os>`).
pub fn component_of_app(app: &str) -> Option<Component> {
    Some(match app {
        a if a.starts_with("nvidia-driver-daemonset") => Component::Driver,
        "nvidia-container-toolkit-daemonset" => Component::ContainerToolkit,
        "nvidia-device-plugin-daemonset" => Component::DevicePlugin,
        "gpu-feature-discovery" => Component::GpuFeatureDiscovery,
        "nvidia-dcgm-exporter" => Component::DcgmExporter,
        "nvidia-mig-manager" => Component::MigManager,
        "nvidia-operator-validator" => Component::OperatorValidator,
        _ => return None,
    })
}

/// The labels that make one of NVIDIA's pods a pod of gpu-pilot's DaemonSet for `component`
/// (its selector), and one gpu-pilot's controller counts (managed-by, component). The template
/// generation of a new DaemonSet (1) makes the DaemonSet controller count the pod as current, so
/// it does not replace adopted pods on its own: migrate replaces them, a node at a time.
pub fn handover_labels(component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("pod-template-generation".to_string(), "1".to_string()),
        (label::NAME.to_string(), component.daemonset_name()),
        (
            label::COMPONENT.to_string(),
            component.gate_name().to_string(),
        ),
        (
            label::MANAGED_BY.to_string(),
            label::MANAGED_BY_VALUE.to_string(),
        ),
        (label::PART_OF.to_string(), "gpu-pilot".to_string()),
    ])
}

/// One line of what differs between NVIDIA's installation and gpu-pilot's.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub key: String,
    pub what: String,
}

/// The gpu-pilot values equivalent to NVIDIA's installation and what differs.
#[derive(Debug, Clone)]
pub struct Translation {
    /// Only what differs from gpu-pilot's defaults, as a values file.
    pub values: Value,
    pub differences: Vec<Difference>,
    /// What makes a takeover impossible (a family gpu-pilot does not run is on).
    pub blockers: Vec<String>,
}

/// Sections of NVIDIA's spec that are kept out of the values: they change nothing in gpu-pilot
/// and NVIDIA's chart writes them into every ClusterPolicy.
const LEFT_OUT: &[&str] = &[
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
    "operator.initContainer",
    "operator.use_ocp_driver_toolkit",
    "driver.useOpenKernelModules",
    "driver.useNvidiaDriverCRD",
    "devicePlugin.mps",
    "validator.plugin",
    "validator.cuda",
    "validator.vfioPCI",
    "validator.vgpuManager",
    "validator.vgpuDevices",
];

/// NVIDIA's chart values that are not ClusterPolicy fields and that carry over (the operator's
/// placement and logging, node discovery, Pod Security).
const CHART_KEYS: &[&str] = &[
    "operator.priorityClassName",
    "operator.tolerations",
    "operator.nodeSelector",
    "operator.affinity",
    "operator.resources",
    "operator.imagePullPolicy",
    "operator.imagePullSecrets",
    "operator.logging",
    "nfd.enabled",
    "node-feature-discovery.priorityClassName",
    "node-feature-discovery.worker.tolerations",
    "node-feature-discovery.worker.nodeSelector",
    "node-feature-discovery.worker.config.sources.pci.deviceClassWhitelist",
    "platform.openshift",
    "nfd.nodefeaturerules",
];

fn get<'a>(v: &'a Value, dotted: &str) -> Option<&'a Value> {
    v.pointer(&format!("/{}", dotted.replace('.', "/")))
}

fn set(v: &mut Value, dotted: &str, value: Value) {
    let mut cur = v;
    let segments: Vec<&str> = dotted.split('.').collect();
    for seg in &segments[..segments.len() - 1] {
        if !cur.get(*seg).is_some_and(Value::is_object) {
            cur[*seg] = json!({});
        }
        cur = &mut cur[*seg];
    }
    cur[segments[segments.len() - 1]] = value;
}

fn remove(v: &mut Value, dotted: &str) -> Option<Value> {
    let (parent, last) = match dotted.rsplit_once('.') {
        Some((p, l)) => (v.pointer_mut(&format!("/{}", p.replace('.', "/")))?, l),
        None => (v, dotted),
    };
    parent.as_object_mut()?.remove(last)
}

/// `tree` without what equals `defaults` (maps compared key by key, anything else whole), and
/// without maps left empty.
fn minus_defaults(tree: &Value, defaults: &Value) -> Option<Value> {
    match (tree, defaults) {
        (Value::Object(t), Value::Object(d)) => {
            let mut out = Map::new();
            for (k, v) in t {
                let kept = match d.get(k) {
                    Some(dv) => minus_defaults(v, dv),
                    // gpu-pilot leaves empty settings out; NVIDIA's chart writes `{}` and `[]`.
                    None if is_empty_collection(v) => None,
                    None => Some(v.clone()),
                };
                if let Some(v) = kept {
                    out.insert(k.clone(), v);
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        (t, d) if t == d => None,
        (t, _) => Some(t.clone()),
    }
}

/// NVIDIA's installation as gpu-pilot values.
pub fn translate(snap: &Snapshot) -> Translation {
    let spec = &snap.policy["spec"];
    let mut values = json!({});
    let mut differences = Vec::new();
    let mut blockers = Vec::new();

    // The ClusterPolicy is what NVIDIA's operator runs: its sections are gpu-pilot's.
    if let Some(spec) = spec.as_object() {
        for (key, v) in spec {
            if key == "operator" {
                for k in POLICY_OPERATOR_KEYS {
                    if let Some(x) = v.get(k) {
                        values["operator"][k] = x.clone();
                    }
                }
                if values["operator"].is_null() {
                    values["operator"] = json!({});
                }
            } else if POLICY_SECTIONS.contains(&key.as_str()) {
                values[key] = v.clone();
            } else {
                differences.push(Difference {
                    key: key.clone(),
                    what: "a ClusterPolicy field gpu-pilot does not know (a newer NVIDIA release?): left out".into(),
                });
            }
        }
    }
    // What only the Helm release knows.
    if let Some(release) = &snap.release {
        let nv = release.effective_values();
        for key in CHART_KEYS {
            if let Some(v) = get(&nv, key) {
                set(&mut values, key, v.clone());
            }
        }
        for section in ["devicePlugin", "migManager", "dcgmExporter"] {
            if get(&nv, &format!("{section}.config.create")) == Some(&json!(true)) {
                differences.push(Difference {
                    key: format!("{section}.config.create"),
                    what: format!(
                        "the ConfigMap {} belongs to NVIDIA's Helm release {}; gpu-pilot's policy names it where it is (uninstalling that release deletes it: install gpu-pilot again with {section}.config.create/data then)",
                        get(&nv, &format!("{section}.config.name")).and_then(Value::as_str).unwrap_or("?"),
                        release.name
                    ),
                });
            }
        }
    }

    // NVIDIA's chart labels its operands with its own bookkeeping; gpu-pilot's must carry
    // gpu-pilot's managed-by, which its controller selects them by.
    if let Some(labels) = values
        .pointer_mut("/daemonsets/labels")
        .and_then(Value::as_object_mut)
    {
        for k in [label::MANAGED_BY, "helm.sh/chart"] {
            if let Some(v) = labels.remove(k) {
                differences.push(Difference {
                    key: format!("daemonsets.labels.{k}"),
                    what: format!(
                        "{v} is NVIDIA's chart's label for its operands; gpu-pilot's carry their own"
                    ),
                });
            }
        }
    }
    // NVIDIA's operator configures the runtime its nodes report; defaultRuntime is a fallback.
    let runtimes: std::collections::BTreeSet<&str> =
        snap.node_runtimes.values().map(String::as_str).collect();
    if let [runtime] = runtimes.iter().copied().collect::<Vec<_>>()[..] {
        let ours = match runtime {
            "cri-o" => Some("crio"),
            "containerd" | "docker" => Some(runtime),
            _ => None,
        };
        if let Some(ours) = ours {
            let theirs = get(&values, "operator.defaultRuntime").cloned();
            if theirs.as_ref().is_some_and(|t| t != ours) {
                differences.push(Difference {
                    key: "operator.defaultRuntime".into(),
                    what: format!(
                        "NVIDIA's ClusterPolicy says {}, but NVIDIA's operator configures what the nodes run ({runtime}); gpu-pilot configures {ours}",
                        theirs.unwrap_or_default()
                    ),
                });
            }
            set(&mut values, "operator.defaultRuntime", json!(ours));
        }
    }

    // Families gpu-pilot does not run stop the takeover; inert sections are left out.
    let typed: Result<gpu_pilot_api::ClusterPolicySpec, _> =
        serde_json::from_value(strip_nulls(spec.clone()));
    match &typed {
        Ok(spec) => {
            for (_, field, message) in gpu_pilot_api::policy::unsupported(spec) {
                blockers.push(format!("{field}: {message}"));
            }
            for (field, why) in gpu_pilot_api::policy::inert(spec) {
                differences.push(Difference {
                    key: field.to_string(),
                    what: format!("NVIDIA runs it; gpu-pilot does not: {why}"),
                });
            }
        }
        Err(e) => blockers.push(format!(
            "NVIDIA's ClusterPolicy does not read as gpu-pilot's: {e}"
        )),
    }
    for key in LEFT_OUT {
        if let Some(v) = remove(&mut values, key)
            && !is_empty(&v)
            && let Some(does) = gpu_pilot_core::values::nvidia::lookup(key)
            && !matches!(does, Does::RefusedWhenOn(_))
            && !differences.iter().any(|d| d.key.starts_with(key))
        {
            differences.push(Difference {
                key: key.to_string(),
                what: format!("left out, {}: {}", does.kind(), does.text()),
            });
        }
    }

    // NVIDIA's images of what gpu-pilot's own binaries do: gpu-pilot's instead.
    for (section, images) in REPLACED_IMAGES {
        let image = get(&values, &format!("{section}.image"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                snap.release.as_ref().and_then(|r| {
                    get(&r.effective_values(), &format!("{section}.image"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
            });
        let named = image
            .as_deref()
            .is_some_and(|i| gpu_pilot_api::policy::names_image(i, images));
        if named || section == "operator" {
            for k in ["repository", "image", "version"] {
                remove(&mut values, &format!("{section}.{k}"));
            }
            differences.push(Difference {
                key: format!("{section}.image"),
                what: format!(
                    "NVIDIA's {} is replaced by gpu-pilot's {}",
                    image.unwrap_or_else(|| "image".into()),
                    if section == "operator" {
                        "controller"
                    } else {
                        "agent"
                    }
                ),
            });
        }
    }

    let values =
        minus_defaults(&values, &gpu_pilot_core::values::default_tree()).unwrap_or(json!({}));
    Translation {
        values,
        differences,
        blockers,
    }
}

fn is_empty_collection(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(is_empty),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        _ => false,
    }
}

/// NVIDIA's chart renders `key:` for empty values, which the apiserver stores as null.
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        v => v,
    }
}

/// One step of the takeover, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Scale NVIDIA's operator to 0, so it stops reconciling.
    ScaleDown { deployment: String, from: i32 },
    /// Delete NVIDIA's operand DaemonSets but not their pods, which keep running.
    Orphan { daemonsets: Vec<String> },
    /// Label NVIDIA's pods on a node so that gpu-pilot's DaemonSets adopt them.
    HandOver {
        node: String,
        pods: Vec<(String, Component)>,
    },
    /// Take over objects NVIDIA's operator made under names gpu-pilot uses: gpu-pilot's label,
    /// and NVIDIA's ClusterPolicy no longer among their owners.
    Adopt { objects: Vec<String> },
    /// Install gpu-pilot into NVIDIA's namespace with the translated values, and wait until its
    /// DaemonSets have adopted the pods.
    Install { namespace: String },
    /// On one node, delete the adopted pods of NVIDIA's images (not the driver's) and wait until
    /// gpu-pilot's DaemonSets have their own Ready there.
    Replace {
        node: String,
        pods: Vec<(String, Component)>,
    },
    /// Wait until gpu-pilot's ClusterPolicy is ready.
    WaitReady,
    /// NVIDIA's pods gpu-pilot has no counterpart for.
    DeleteLeftovers { pods: Vec<String> },
}

/// The takeover's steps for this installation (steps already done on a resumed run are left out).
pub fn steps(snap: &Snapshot) -> Vec<Step> {
    let mut out = Vec::new();
    for op in &snap.operators {
        if op.replicas > 0 {
            out.push(Step::ScaleDown {
                deployment: op.name.clone(),
                from: op.replicas,
            });
        }
    }
    if !snap.daemonsets.is_empty() {
        out.push(Step::Orphan {
            daemonsets: snap.daemonsets.iter().map(|d| d.name.clone()).collect(),
        });
    }
    let mut by_node: BTreeMap<&str, Vec<(String, Component)>> = BTreeMap::new();
    for p in &snap.pods {
        if let Some(c) = p.component
            && !p.handed_over
        {
            by_node
                .entry(p.node.as_str())
                .or_default()
                .push((p.name.clone(), c));
        }
    }
    for (node, pods) in by_node {
        out.push(Step::HandOver {
            node: node.to_string(),
            pods,
        });
    }
    if !snap.to_adopt.is_empty() {
        out.push(Step::Adopt {
            objects: snap.to_adopt.clone(),
        });
    }
    out.push(Step::Install {
        namespace: snap.namespace.clone(),
    });
    // Node by node, the non-driver pods of NVIDIA's images; in the stage order on each node.
    let mut replace: BTreeMap<&str, Vec<(String, Component)>> = BTreeMap::new();
    for p in &snap.pods {
        if let Some(c) = p.component
            && c != Component::Driver
        {
            replace
                .entry(p.node.as_str())
                .or_default()
                .push((p.name.clone(), c));
        }
    }
    for (node, mut pods) in replace {
        pods.sort_by_key(|(_, c)| Component::ALL.iter().position(|x| x == c));
        out.push(Step::Replace {
            node: node.to_string(),
            pods,
        });
    }
    let leftovers: Vec<String> = snap
        .pods
        .iter()
        .filter(|p| p.component.is_none())
        .map(|p| format!("{} (on {})", p.name, p.node))
        .collect();
    if !leftovers.is_empty() {
        out.push(Step::DeleteLeftovers { pods: leftovers });
    }
    out.push(Step::WaitReady);
    out
}

/// One line per step, for `--dry-run` and progress.
pub fn describe(step: &Step, snap: &Snapshot) -> String {
    match step {
        Step::ScaleDown { deployment, from } => format!(
            "scale NVIDIA's operator Deployment {}/{deployment} from {from} to 0 replicas",
            snap.namespace
        ),
        Step::Orphan { daemonsets } => format!(
            "delete NVIDIA's DaemonSets {} with propagationPolicy=Orphan: their pods keep running",
            daemonsets.join(", ")
        ),
        Step::HandOver { node, pods } => {
            let gpu = snap.gpu_pods.get(node).map(Vec::len).unwrap_or(0);
            format!(
                "node {node} ({gpu} GPU pod{} running): label {} for gpu-pilot's DaemonSets to adopt",
                if gpu == 1 { "" } else { "s" },
                pods.iter()
                    .map(|(p, c)| format!("{p} ({})", c.gate_name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        Step::Adopt { objects } => format!(
            "take over {}: label them {}={} and remove NVIDIA's ClusterPolicy from their owners (deleting NVIDIA's policy later must not take them away)",
            objects.join(", "),
            label::MANAGED_BY,
            label::MANAGED_BY_VALUE
        ),
        Step::Install { namespace } => format!(
            "install gpu-pilot into {namespace} with the values above (CRD, controller, webhook, ClusterPolicy; the namespace itself stays NVIDIA's); its DaemonSets adopt the labelled pods, the driver's (OnDelete) keeps NVIDIA's driver pods"
        ),
        Step::Replace { node, pods } => {
            let gpu = snap.gpu_pods.get(node).map(Vec::len).unwrap_or(0);
            format!(
                "node {node} ({gpu} GPU pod{} running): replace {} by gpu-pilot's, and wait until they are Ready",
                if gpu == 1 { "" } else { "s" },
                pods.iter()
                    .map(|(p, c)| format!("{p} ({})", c.gate_name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        Step::WaitReady => "wait until gpu-pilot's ClusterPolicy is ready on every GPU node".into(),
        Step::DeleteLeftovers { pods } => format!(
            "delete NVIDIA's pods gpu-pilot has no counterpart for: {}",
            pods.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nvidia_policy() -> Value {
        json!({
            "apiVersion": "nvidia.com/v1", "kind": "ClusterPolicy",
            "metadata": {"name": "cluster-policy"},
            "spec": {
                "operator": {"defaultRuntime": "docker", "runtimeClass": "nvidia", "initContainer": {"image": "cuda"}},
                "daemonsets": {"labels": {"app.kubernetes.io/managed-by": "gpu-operator", "helm.sh/chart": "gpu-operator-v25", "team": "ml"}, "priorityClassName": "system-node-critical", "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}], "updateStrategy": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "1"}},
                "driver": {"enabled": true, "repository": "nvcr.io/nvidia", "image": "driver", "version": "580.82.07", "useNvidiaDriverCRD": false},
                "devicePlugin": {"enabled": true, "repository": "nvcr.io/nvidia", "image": "k8s-device-plugin", "version": "v0.17.4", "config": {"name": "time-slicing", "default": "any"}},
                "gfd": {"enabled": true, "repository": "nvcr.io/nvidia", "image": "k8s-device-plugin", "version": "v0.17.4"},
                "migManager": {"enabled": true, "config": {"name": "default-mig-parted-config", "default": "all-disabled"}},
                "mig": {"strategy": "mixed"},
                "dcgm": {"enabled": false},
                "sandboxWorkloads": {"enabled": false, "defaultWorkload": "container"},
                "vfioManager": {"enabled": true},
                "validator": {"plugin": null, "repository": "nvcr.io/nvidia/cloud-native", "image": "gpu-operator-validator", "version": "v25.3.4"},
            }
        })
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            policy: nvidia_policy(),
            namespace: "gpu-operator".into(),
            operators: vec![Operator {
                name: "gpu-operator".into(),
                replicas: 1,
            }],
            daemonsets: vec![
                NvidiaDaemonSet {
                    name: "nvidia-driver-daemonset".into(),
                    component: Some(Component::Driver),
                },
                NvidiaDaemonSet {
                    name: "nvidia-dcgm".into(),
                    component: None,
                },
            ],
            pods: vec![
                NvidiaPod {
                    name: "nvidia-driver-daemonset-a".into(),
                    node: "n1".into(),
                    component: Some(Component::Driver),
                    handed_over: false,
                },
                NvidiaPod {
                    name: "nvidia-device-plugin-daemonset-a".into(),
                    node: "n1".into(),
                    component: Some(Component::DevicePlugin),
                    handed_over: false,
                },
                NvidiaPod {
                    name: "nvidia-container-toolkit-daemonset-a".into(),
                    node: "n1".into(),
                    component: Some(Component::ContainerToolkit),
                    handed_over: false,
                },
                NvidiaPod {
                    name: "nvidia-dcgm-a".into(),
                    node: "n1".into(),
                    component: None,
                    handed_over: false,
                },
                NvidiaPod {
                    name: "nvidia-driver-daemonset-b".into(),
                    node: "n2".into(),
                    component: Some(Component::Driver),
                    handed_over: true,
                },
            ],
            gpu_pods: BTreeMap::from([("n1".into(), vec!["ml/train".into()])]),
            node_runtimes: BTreeMap::from([
                ("n1".into(), "containerd".into()),
                ("n2".into(), "containerd".into()),
            ]),
            ..Default::default()
        }
    }

    #[test]
    fn the_policy_becomes_values_that_differ_from_gpu_pilots_defaults_only() {
        let t = translate(&snapshot());
        assert!(t.blockers.is_empty(), "{:?}", t.blockers);
        // NVIDIA's driver version is kept, so the takeover changes no driver.
        assert_eq!(t.values["driver"]["version"], json!("580.82.07"));
        assert_eq!(t.values["mig"]["strategy"], json!("mixed"));
        assert_eq!(
            t.values["devicePlugin"]["config"]["name"],
            json!("time-slicing")
        );
        // Equal to gpu-pilot's defaults: left out; NVIDIA's chart's operand labels too.
        assert_eq!(
            t.values["daemonsets"],
            json!({"labels": {"team": "ml"}}),
            "{}",
            t.values
        );
        assert!(
            t.differences
                .iter()
                .any(|d| d.key == "daemonsets.labels.helm.sh/chart")
        );
        // What the nodes run, not the policy's fallback (containerd is gpu-pilot's default).
        assert!(t.values["operator"].get("defaultRuntime").is_none());
        assert!(
            t.differences
                .iter()
                .any(|d| d.key == "operator.defaultRuntime")
        );
        assert!(t.values["driver"].get("enabled").is_none());
        // NVIDIA's images for the agent's components: replaced, and said so.
        assert!(t.values["devicePlugin"].get("image").is_none());
        assert!(t.values.get("gfd").is_none() && t.values.get("validator").is_none());
        assert!(
            t.differences
                .iter()
                .any(|d| d.key == "devicePlugin.image" && d.what.contains("k8s-device-plugin"))
        );
        // Inert sections are left out of the values.
        for k in ["dcgm", "sandboxWorkloads", "vfioManager"] {
            assert!(t.values.get(k).is_none(), "{k}");
        }
        assert!(t.values["operator"].get("initContainer").is_none());
        assert!(
            t.differences
                .iter()
                .any(|d| d.key == "operator.initContainer")
        );
        // What it says is accepted by install.
        gpu_pilot_core::values::Values::load_over(
            gpu_pilot_core::values::default_tree(),
            &[],
            &[],
            &[],
        )
        .unwrap();
        let mut tree = gpu_pilot_core::values::default_tree();
        gpu_pilot_core::values::merge(&mut tree, t.values.clone());
        gpu_pilot_core::values::Values::from_tree(tree).unwrap();
    }

    #[test]
    fn a_family_gpu_pilot_does_not_run_blocks_the_takeover() {
        let mut s = snapshot();
        s.policy["spec"]["sandboxWorkloads"]["enabled"] = json!(true);
        let t = translate(&s);
        assert!(
            t.blockers[0].starts_with("sandboxWorkloads.enabled"),
            "{:?}",
            t.blockers
        );
    }

    #[test]
    fn helm_values_bring_the_operators_placement() {
        let mut s = snapshot();
        s.release = Some(HelmRelease {
            name: "gpu-operator".into(),
            namespace: "gpu-operator".into(),
            revision: 1,
            chart: "gpu-operator".into(),
            chart_version: "v25.3.4".into(),
            chart_values: json!({"operator": {"tolerations": [{"key": "a", "operator": "Exists"}], "priorityClassName": "system-node-critical", "image": "gpu-operator"},
                                 "devicePlugin": {"config": {"create": false}}}),
            user_values: json!({"devicePlugin": {"config": {"create": true, "name": "time-slicing", "data": {"any": "x"}}}}),
        });
        let t = translate(&s);
        assert_eq!(t.values["operator"]["tolerations"][0]["key"], json!("a"));
        assert_eq!(
            t.values["operator"]["priorityClassName"],
            json!("system-node-critical")
        );
        assert!(t.values["operator"].get("image").is_none());
        assert!(
            t.differences
                .iter()
                .any(|d| d.key == "devicePlugin.config.create")
        );
    }

    #[test]
    fn steps_skip_what_a_resumed_run_already_did() {
        let s = snapshot();
        let steps = steps(&s);
        assert_eq!(
            steps[0],
            Step::ScaleDown {
                deployment: "gpu-operator".into(),
                from: 1
            }
        );
        let handovers: Vec<&Step> = steps
            .iter()
            .filter(|s| matches!(s, Step::HandOver { .. }))
            .collect();
        assert_eq!(handovers.len(), 1, "n2's pod is handed over already");
        // n1's pods of NVIDIA's images are replaced in stage order, the driver's is not.
        assert!(steps.contains(&Step::Replace {
            node: "n1".into(),
            pods: vec![
                (
                    "nvidia-container-toolkit-daemonset-a".into(),
                    Component::ContainerToolkit
                ),
                (
                    "nvidia-device-plugin-daemonset-a".into(),
                    Component::DevicePlugin
                ),
            ],
        }));
        assert!(steps.iter().any(
            |s| matches!(s, Step::DeleteLeftovers { pods } if pods[0].starts_with("nvidia-dcgm-a"))
        ));
        assert_eq!(steps.last(), Some(&Step::WaitReady));
        let text = describe(handovers[0], &s);
        assert!(text.contains("1 GPU pod running"), "{text}");
        let mut done = s.clone();
        done.operators[0].replicas = 0;
        assert!(!matches!(super::steps(&done)[0], Step::ScaleDown { .. }));
    }

    #[test]
    fn nvidias_daemonsets_map_to_components_by_app_label() {
        assert_eq!(
            component_of_app("nvidia-driver-daemonset-5.15.0-105-generic-ubuntu22.04"),
            Some(Component::Driver)
        );
        assert_eq!(
            component_of_app("nvidia-device-plugin-daemonset"),
            Some(Component::DevicePlugin)
        );
        assert_eq!(
            component_of_app("nvidia-device-plugin-mps-control-daemon"),
            None
        );
        assert_eq!(
            handover_labels(Component::DevicePlugin)[label::NAME],
            "gpu-pilot-device-plugin"
        );
    }
}
