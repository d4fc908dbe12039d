//! The key table: what each key of NVIDIA's chart values does in gpu-pilot, generated into
//! docs/nvidia-values.md from NVIDIA's own values.yaml.

use gpu_pilot_api::policy::Family;
use serde_json::Value;

/// What one of NVIDIA's keys does in gpu-pilot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Does {
    /// What NVIDIA's chart does with it, gpu-pilot does (the text says where).
    Implemented(&'static str),
    /// NVIDIA's meaning, reached another way (the text says how).
    Mapped(&'static str),
    /// Accepted and kept (in the values, and in the ClusterPolicy when it is a field), no effect.
    Ignored(&'static str),
    /// Accepted and kept in the ClusterPolicy (or the values) for what NVIDIA's chart does with
    /// it, which gpu-pilot does not do yet: nothing it renders reads the key (the text says what
    /// is missing).
    NotRenderedYet(&'static str),
    /// Accepted while off, as NVIDIA's defaults leave it; refused when on.
    RefusedWhenOn(Family),
}

impl Does {
    pub fn kind(self) -> &'static str {
        match self {
            Does::Implemented(_) => "implemented",
            Does::Mapped(_) => "mapped",
            Does::Ignored(_) => "accepted, ignored",
            Does::NotRenderedYet(_) => "accepted, kept, not rendered yet",
            Does::RefusedWhenOn(_) => "refused when enabled",
        }
    }

    pub fn text(self) -> String {
        match self {
            Does::Implemented(t) | Does::Mapped(t) | Does::Ignored(t) | Does::NotRenderedYet(t) => {
                t.to_string()
            }
            Does::RefusedWhenOn(f) => format!("family not supported: {}", f.describe()),
        }
    }
}

/// One rule of the table: a key pattern (dot-separated; a segment `{a,b}` matches either, `*`
/// any one segment; a key also matches every key below it) and what such keys do.
pub struct Rule {
    pub pattern: &'static str,
    pub does: Does,
}

const fn rule(pattern: &'static str, does: Does) -> Rule {
    Rule { pattern, does }
}

use Does::{Ignored, Implemented, Mapped, NotRenderedYet, RefusedWhenOn};

const SANDBOX: Does = RefusedWhenOn(Family::SandboxWorkloads);
const SANDBOX_PART: Does = Ignored(
    "an operand of sandbox workloads, which NVIDIA's operator too runs only with sandboxWorkloads.enabled (refused here); kept in the ClusterPolicy",
);
const AGENT_IMAGE: Does = Mapped(
    "gpu-pilot's agent serves this component: the ClusterPolicy field of the same name; NVIDIA's own image name here means the agent image",
);

/// The table, first match wins. Every key of NVIDIA's values file must match a rule (tested
/// against NVIDIA's file from the module proxy).
pub const RULES: &[Rule] = &[
    // NVIDIA's chart-level switches.
    rule("platform.openshift", RefusedWhenOn(Family::OpenShift)),
    rule(
        "nfd.enabled",
        NotRenderedYet(
            "true in NVIDIA's chart deploys NFD; gpu-pilot deploys neither NFD nor its own node detector yet (the agent's PCI scan for it, agent/src/detect.rs, is written but no DaemonSet runs it). GPU nodes are found from NFD's PCI labels already on the nodes, or nvidia.com/gpu.present=true set by someone else",
        ),
    ),
    rule(
        "nfd.nodefeaturerules",
        RefusedWhenOn(Family::ConfidentialComputing),
    ),
    rule(
        "node-feature-discovery.priorityClassName",
        NotRenderedYet(
            "kept in the values as the priorityClassName of gpu-pilot's node detector, which is not deployed yet",
        ),
    ),
    rule(
        "node-feature-discovery.worker.tolerations",
        NotRenderedYet(
            "kept in the values as the tolerations of gpu-pilot's node detector, which is not deployed yet",
        ),
    ),
    rule(
        "node-feature-discovery.worker.nodeSelector",
        NotRenderedYet(
            "kept in the values as the nodeSelector of gpu-pilot's node detector, which is not deployed yet",
        ),
    ),
    rule(
        "node-feature-discovery.worker.config.sources.pci.deviceClassWhitelist",
        NotRenderedYet(
            "kept in the values as the PCI classes (of vendor 10de) gpu-pilot's node detector is to count as a GPU; the detector is not deployed yet",
        ),
    ),
    rule(
        "node-feature-discovery",
        Ignored(
            "values of NFD's own chart: gpu-pilot deploys no NFD master, worker or garbage collector",
        ),
    ),
    rule(
        "{nameOverride,fullnameOverride}",
        Ignored("gpu-pilot's object names are fixed (one install per cluster)"),
    ),
    rule(
        "extraObjects",
        Implemented("applied with the chart's other objects (maps, or YAML strings)"),
    ),
    rule(
        "psa.enabled",
        NotRenderedYet(
            "ClusterPolicy field of the same name; the namespace's pod-security.kubernetes.io/enforce, audit and warn = privileged labels are built (render::nvidia::psa_labels) but not applied to the namespace yet",
        ),
    ),
    rule(
        "psp.enabled",
        Ignored("PodSecurityPolicy was removed in Kubernetes 1.25"),
    ),
    rule(
        "cdi.{enabled,default}",
        Implemented("ClusterPolicy field of the same name"),
    ),
    rule(
        "hostPaths.{rootFS,driverInstallDir}",
        Implemented("ClusterPolicy field of the same name"),
    ),
    rule(
        "mig.strategy",
        Implemented("ClusterPolicy field of the same name"),
    ),
    rule("sandboxWorkloads.enabled", SANDBOX),
    rule("sandboxWorkloads.defaultWorkload", SANDBOX_PART),
    // Operand DaemonSets.
    rule(
        "daemonsets.{labels,annotations,tolerations,priorityClassName}",
        Implemented("ClusterPolicy field of the same name: every operand DaemonSet's pods"),
    ),
    rule(
        "daemonsets.{updateStrategy,rollingUpdate}",
        Implemented(
            "ClusterPolicy field of the same name: every operand DaemonSet but the driver's, which stays OnDelete as in NVIDIA's",
        ),
    ),
    // gpu-pilot's controller Deployment, where NVIDIA's chart has its operator.
    rule(
        "operator.{repository,image,version}",
        Mapped(
            "gpu-pilot's controller image; NVIDIA's gpu-operator image here means gpu-pilot's controller",
        ),
    ),
    rule(
        "operator.{imagePullPolicy,imagePullSecrets,resources,priorityClassName,tolerations,nodeSelector,affinity}",
        Implemented("the controller Deployment's pods"),
    ),
    rule(
        "operator.annotations",
        Implemented(
            "the controller's pods, and (as ClusterPolicy spec.operator.annotations) every object the controller creates",
        ),
    ),
    rule(
        "operator.labels",
        Implemented("every object gpu-pilot creates (ClusterPolicy spec.operator.labels)"),
    ),
    rule(
        "operator.runtimeClass",
        Implemented(
            "ClusterPolicy field of the same name: the RuntimeClass created, and set on GPU pods by the webhook",
        ),
    ),
    rule(
        "operator.defaultRuntime",
        Implemented("ClusterPolicy field of the same name: the runtime the toolkit configures"),
    ),
    rule(
        "operator.logging.level",
        Mapped("the controller's --log-level (a number means debug)"),
    ),
    rule(
        "operator.logging.develMode",
        Mapped("true: the controller logs text instead of JSON"),
    ),
    rule(
        "operator.logging.timeEncoding",
        Ignored("gpu-pilot's logs always carry RFC 3339 times"),
    ),
    rule(
        "operator.use_ocp_driver_toolkit",
        Ignored(
            "OpenShift only; kept in ClusterPolicy spec.operator (NVIDIA's operator ignores it off OpenShift too)",
        ),
    ),
    rule(
        "operator.initContainer",
        Ignored(
            "NVIDIA's CUDA image for its operands' init containers; gpu-pilot's operands need none. Kept in ClusterPolicy spec.operator",
        ),
    ),
    rule(
        "operator.cleanupCRD",
        Implemented(
            "the chart's post-delete hook deletes the ClusterPolicy CRD after helm uninstall (Helm never deletes a chart's crds/); kubectl gpu uninstall deletes it unless --keep-crd",
        ),
    ),
    rule(
        "operator.upgradeCRD",
        Ignored(
            "kubectl gpu install applies the CRD on every run; with Helm, apply charts/gpu-pilot/crds before an upgrade",
        ),
    ),
    rule(
        "operator.defaultGPUMode",
        Ignored("NVIDIA's chart writes it to a ClusterPolicy field its CRD does not have"),
    ),
    // The driver.
    rule(
        "driver.nvidiaDriverCRD.enabled",
        RefusedWhenOn(Family::NvidiaDriverCrd),
    ),
    rule(
        "driver.nvidiaDriverCRD",
        Ignored("settings of NVIDIA's NVIDIADriver custom resource, unused while it is off"),
    ),
    rule(
        "driver.useNvidiaDriverCRD",
        RefusedWhenOn(Family::NvidiaDriverCrd),
    ),
    rule(
        "driver.upgradePolicy.gpuPodDeletion",
        Mapped(
            "ClusterPolicy driver.upgradePolicy.podDeletion (as NVIDIA's chart writes it); kept for the driver upgrade flow",
        ),
    ),
    rule(
        "driver.upgradePolicy",
        Ignored(
            "ClusterPolicy field of the same name, kept for the driver upgrade flow, which is separate work",
        ),
    ),
    rule(
        "driver.usePrecompiled",
        NotRenderedYet(
            "ClusterPolicy field of the same name; the precompiled image tag <branch>-<kernel>-<os> is derived as NVIDIA does (policy::driver_image), but the driver DaemonSet is still one, with the plain image: no DaemonSet per kernel yet",
        ),
    ),
    rule(
        "driver.{enabled,kernelModuleType,repository,image,version,imagePullPolicy,imagePullSecrets,env,args,resources}",
        Implemented("ClusterPolicy field of the same name: the driver DaemonSet"),
    ),
    rule(
        "driver.{startupProbe,livenessProbe,readinessProbe}",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for the driver container's nvidia-smi probes; the driver pod's parts are built (render::nvidia::driver_pod_parts) but the driver DaemonSet does not use them yet",
        ),
    ),
    rule(
        "driver.manager",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for NVIDIA's k8s-driver-manager as the driver pod's init container; the driver pod's parts are built (render::nvidia::driver_pod_parts) but the driver DaemonSet does not use them yet",
        ),
    ),
    rule(
        "driver.rdma.enabled",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for the driver pod's nvidia-peermem container; the driver pod's parts are built (render::nvidia::driver_pod_parts) but the driver DaemonSet does not use them yet",
        ),
    ),
    rule(
        "driver.rdma.useHostMofed",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for the peermem container on the host's MOFED; the driver pod's parts are built (render::nvidia::driver_pod_parts) but the driver DaemonSet does not use them yet",
        ),
    ),
    rule(
        "driver.{repoConfig,certConfig,kernelModuleConfig}",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for the ConfigMap's files in the driver container where NVIDIA's operator mounts them; the driver pod's parts are built (render::nvidia::driver_pod_parts) but the driver DaemonSet does not use them yet",
        ),
    ),
    rule(
        "driver.{licensingConfig,virtualTopology}",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for vGPU guest licensing and topology files in the driver container where NVIDIA's operator mounts them; the driver pod's parts are built (render::nvidia::driver_pod_parts) but the driver DaemonSet does not use them yet",
        ),
    ),
    rule(
        "driver.useOpenKernelModules",
        Ignored("deprecated by NVIDIA and ignored by its operator; kernelModuleType replaces it"),
    ),
    rule(
        "{gds,gdrcopy}.enabled",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for a container of the driver pod that loads nvidia-fs (gds) or gdrdrv (gdrcopy); the driver pod's parts are built (render::nvidia::driver_pod_parts) but the driver DaemonSet does not use them yet",
        ),
    ),
    rule(
        "{gds,gdrcopy}.{repository,image,version,imagePullPolicy,imagePullSecrets,env,args,resources}",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for that container; the driver pod's parts are built (render::nvidia::driver_pod_parts) but the driver DaemonSet does not use them yet",
        ),
    ),
    // The toolkit and dcgm-exporter: NVIDIA's images, run by gpu-pilot.
    rule(
        "toolkit.{enabled,repository,image,version,imagePullPolicy,imagePullSecrets,env,args,resources,installDir}",
        Implemented("ClusterPolicy field of the same name: the toolkit DaemonSet (NVIDIA's image)"),
    ),
    rule(
        "dcgmExporter.hostNetwork",
        NotRenderedYet(
            "ClusterPolicy field of the same name; the dcgm-exporter DaemonSet does not set hostNetwork from it yet",
        ),
    ),
    rule(
        "dcgmExporter.{enabled,repository,image,version,imagePullPolicy,imagePullSecrets,env,args,resources}",
        Implemented(
            "ClusterPolicy field of the same name: the dcgm-exporter DaemonSet (NVIDIA's image)",
        ),
    ),
    rule(
        "dcgmExporter.config.{name,default}",
        Implemented(
            "ClusterPolicy field of the same name: the metrics CSV mounted into dcgm-exporter",
        ),
    ),
    rule(
        "dcgmExporter.config.{create,data}",
        Implemented("the ConfigMap config.name created with dcgm-metrics.csv = data"),
    ),
    rule(
        "dcgmExporter.service",
        NotRenderedYet(
            "ClusterPolicy field of the same name; the Service in front of the exporters is built (render::nvidia::dcgm_exporter_service) but the controller does not create it yet",
        ),
    ),
    rule(
        "dcgmExporter.serviceMonitor",
        NotRenderedYet(
            "ClusterPolicy field of the same name; the Prometheus operator ServiceMonitor is built (render::nvidia::dcgm_exporter_service_monitor) but the controller does not create it yet",
        ),
    ),
    // Components the agent serves.
    rule("devicePlugin.{repository,image,version}", AGENT_IMAGE),
    rule(
        "devicePlugin.{enabled,imagePullPolicy,imagePullSecrets,env,args,resources}",
        Implemented("ClusterPolicy field of the same name: the device-plugin DaemonSet"),
    ),
    rule(
        "devicePlugin.config.{name,default}",
        Implemented(
            "ClusterPolicy field of the same name: NVIDIA's device-plugin config format (time-slicing), per node by nvidia.com/device-plugin.config",
        ),
    ),
    rule(
        "devicePlugin.config.{create,data}",
        Implemented("the ConfigMap config.name created from data"),
    ),
    rule(
        "devicePlugin.mps",
        Ignored("gpu-pilot shares GPUs by time-slicing, not MPS; kept in the ClusterPolicy"),
    ),
    rule("gfd.{repository,image,version}", AGENT_IMAGE),
    rule(
        "gfd.{enabled,imagePullPolicy,imagePullSecrets,env,args,resources}",
        Implemented("ClusterPolicy field of the same name: the GPU feature discovery DaemonSet"),
    ),
    rule("migManager.{repository,image,version}", AGENT_IMAGE),
    rule(
        "migManager.{enabled,imagePullPolicy,imagePullSecrets,env,args,resources}",
        Implemented("ClusterPolicy field of the same name: the MIG manager DaemonSet"),
    ),
    rule(
        "migManager.config.name",
        Mapped(
            "ClusterPolicy field of the same name: the mig-parted ConfigMap; empty, as NVIDIA's chart leaves it, means default-mig-parted-config, which NVIDIA's operator and gpu-pilot both ship",
        ),
    ),
    rule(
        "migManager.config.default",
        Implemented(
            "ClusterPolicy field of the same name: the MIG layout applied to nodes that ask for none",
        ),
    ),
    rule(
        "migManager.config.{create,data}",
        Implemented("the ConfigMap config.name created from data"),
    ),
    rule(
        "migManager.gpuClientsConfig.name",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for stopping the host services in its clients.yaml while a MIG layout changes; the agent can read the file (agent/src/gpu_clients.rs) but the MIG manager neither mounts the ConfigMap nor stops them yet",
        ),
    ),
    rule("validator.{repository,image,version}", AGENT_IMAGE),
    rule(
        "validator.{imagePullPolicy,imagePullSecrets,env,args,resources}",
        Implemented("ClusterPolicy field of the same name: the validator DaemonSet"),
    ),
    rule(
        "validator.driver.env",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for the driver validation (the validator's main container); not set on it yet",
        ),
    ),
    rule(
        "validator.toolkit.env",
        NotRenderedYet(
            "ClusterPolicy field of the same name, for the toolkit validation (the validator's init container); not set on it yet",
        ),
    ),
    rule(
        "validator.{plugin,cuda}",
        Ignored(
            "NVIDIA's validation workloads; gpu-pilot validates the plugin from what the node advertises and runs no workload pod. Kept in the ClusterPolicy",
        ),
    ),
    rule("validator.{vfioPCI,vgpuManager,vgpuDevices}", SANDBOX_PART),
    // Operands gpu-pilot does not run.
    rule(
        "dcgm.enabled",
        Ignored(
            "no standalone DCGM hostengine: dcgm-exporter runs DCGM embedded, as NVIDIA's does with dcgm off (a warning when true). Kept in the ClusterPolicy",
        ),
    ),
    rule(
        "dcgm",
        Ignored(
            "settings of the standalone DCGM hostengine, which gpu-pilot does not run; kept in the ClusterPolicy",
        ),
    ),
    rule(
        "nodeStatusExporter.enabled",
        Ignored(
            "no node status exporter: each node's stage is in the policy status, the gpupilot.io/stage label and the controller's metrics (a warning when true). Kept in the ClusterPolicy",
        ),
    ),
    rule(
        "nodeStatusExporter",
        Ignored(
            "settings of the node status exporter, which gpu-pilot does not run; kept in the ClusterPolicy",
        ),
    ),
    // The sandbox family.
    rule(
        "{vgpuManager,vgpuDeviceManager,vfioManager,sandboxDevicePlugin,kataManager,ccManager}",
        SANDBOX_PART,
    ),
];

/// Keys NVIDIA's chart templates read that its values.yaml does not set, so that the table
/// covers them too (each must match a rule, and install must accept it).
pub const TEMPLATE_ONLY_KEYS: &[(&str, &str)] = &[
    ("nameOverride", "\"gpu\""),
    ("fullnameOverride", "\"gpu-operator\""),
    ("operator.version", "\"v25.3.0\""),
    ("operator.labels", "{team: ml}"),
    (
        "operator.nodeSelector",
        "{node-role.kubernetes.io/control-plane: \"\"}",
    ),
    ("operator.defaultGPUMode", "\"container\""),
    ("validator.version", "\"v25.3.0\""),
    (
        "validator.cuda.env",
        "[{name: WITH_WORKLOAD, value: \"false\"}]",
    ),
    (
        "validator.driver.env",
        "[{name: DISABLE_DEV_CHAR_SYMLINK_CREATION, value: \"true\"}]",
    ),
    ("validator.toolkit.env", "[{name: X, value: \"1\"}]"),
    ("validator.vfioPCI.env", "[]"),
    ("validator.vgpuManager.env", "[]"),
    ("validator.vgpuDevices.env", "[]"),
    ("driver.args", "[]"),
    (
        "driver.livenessProbe",
        "{initialDelaySeconds: 60, periodSeconds: 10}",
    ),
    ("driver.readinessProbe", "{initialDelaySeconds: 10}"),
    ("toolkit.args", "[]"),
    ("dcgmExporter.args", "[]"),
    ("dcgmExporter.imagePullSecrets", "[]"),
    ("dcgmExporter.config.name", "\"custom-dcgm-metrics\""),
    ("dcgmExporter.config.create", "true"),
    (
        "dcgmExporter.config.data",
        "\"DCGM_FI_DEV_GPU_UTIL, gauge, GPU utilization (in %).\"",
    ),
    ("gfd.args", "[]"),
    ("migManager.args", "[]"),
    ("nodeStatusExporter.version", "\"v25.3.0\""),
    ("nodeStatusExporter.env", "[]"),
    ("nodeStatusExporter.args", "[]"),
    ("dcgm.imagePullSecrets", "[]"),
    ("vgpuDeviceManager.args", "[]"),
    ("vfioManager.args", "[]"),
    ("vgpuManager.args", "[]"),
    ("kataManager.args", "[]"),
    ("ccManager.args", "[]"),
];

/// Keys of newer NVIDIA releases than the pinned module that gpu-pilot takes as well.
pub const NEWER_KEYS: &[(&str, &str)] = &[
    ("dcgmExporter.hostNetwork", "false"),
    (
        "extraObjects",
        "[{apiVersion: v1, kind: ConfigMap, metadata: {name: extra}, data: {a: b}}]",
    ),
];

fn segment_matches(pattern: &str, segment: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(alts) = pattern.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
        return alts.split(',').any(|a| a == segment);
    }
    pattern == segment
}

/// True when `key` is the pattern's key or a key below it.
fn matches(pattern: &str, key: &str) -> bool {
    // `{a,b}` may hold dots in neither part, so splitting on '.' outside braces is splitting.
    let pat = split_pattern(pattern);
    let segs: Vec<&str> = key.split('.').collect();
    pat.len() <= segs.len() && pat.iter().zip(&segs).all(|(p, s)| segment_matches(p, s))
}

fn split_pattern(pattern: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in pattern.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            '.' if depth == 0 => {
                out.push(&pattern[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&pattern[start..]);
    out
}

/// What a key does, or `None` when no rule covers it.
pub fn lookup(key: &str) -> Option<Does> {
    RULES
        .iter()
        .find(|r| matches(r.pattern, key))
        .map(|r| r.does)
}

/// The keys of a values tree as the table lists them: a key is a leaf when its value is not a
/// map, or an empty map; the subtrees of free-form keys (maps of labels, resources, affinity,
/// ConfigMap data, the NFD subchart's values) are one key.
pub fn leaf_keys(tree: &Value) -> Vec<String> {
    fn walk(v: &Value, path: &str, out: &mut Vec<String>) {
        let whole = FREE_FORM
            .iter()
            .any(|f| matches(f, path) && split_pattern(f).len() == path.split('.').count())
            || NODE_DETECTOR_KEYS.contains(&path);
        match v {
            Value::Object(m) if !m.is_empty() && !whole => {
                for (k, child) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(child, &p, out);
                }
            }
            _ => out.push(path.to_string()),
        }
    }
    let mut out = Vec::new();
    walk(tree, "", &mut out);
    out
}

/// Keys whose value is one thing however many keys it holds.
const FREE_FORM: &[&str] = &[
    "*.{labels,annotations,nodeSelector,affinity,resources,additionalLabels,data}",
    "*.*.{nodeSelector,data,additionalLabels}",
    "kataManager.config",
    "operator.initContainer",
];

/// The NFD subchart keys gpu-pilot's node detector reads; the rest of the subchart is one key.
const NODE_DETECTOR_KEYS: &[&str] = &[
    "node-feature-discovery.priorityClassName",
    "node-feature-discovery.worker.tolerations",
    "node-feature-discovery.worker.nodeSelector",
    "node-feature-discovery.worker.config.sources.pci.deviceClassWhitelist",
];

/// NVIDIA's values with the keys the table lists split from the rest of the NFD subchart.
pub fn table_keys(nvidia_values: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    for key in leaf_keys(nvidia_values) {
        if key.starts_with("node-feature-discovery.") && !NODE_DETECTOR_KEYS.contains(&key.as_str())
        {
            if !keys.iter().any(|k| k == "node-feature-discovery") {
                keys.push("node-feature-discovery".to_string());
            }
        } else {
            keys.push(key);
        }
    }
    keys
}

/// The table as Markdown: every key of NVIDIA's values file (`nvidia_values`, from `module`), then
/// the keys its templates read beyond it and the newer keys gpu-pilot takes; with totals per kind.
pub fn markdown(nvidia_values: &Value, module: &str) -> String {
    let mut rows: Vec<(String, &str, Does)> = Vec::new();
    for key in table_keys(nvidia_values) {
        let does = lookup(&key).unwrap_or(Ignored("NOT IN THE TABLE"));
        rows.push((key, "values.yaml", does));
    }
    for (key, _) in TEMPLATE_ONLY_KEYS {
        let does = lookup(key).unwrap_or(Ignored("NOT IN THE TABLE"));
        rows.push((key.to_string(), "templates", does));
    }
    for (key, _) in NEWER_KEYS {
        let does = lookup(key).unwrap_or(Ignored("NOT IN THE TABLE"));
        rows.push((key.to_string(), "newer", does));
    }
    let count = |kind: &str, source: Option<&str>| {
        rows.iter()
            .filter(|(_, s, d)| d.kind() == kind && source.is_none_or(|x| x == *s))
            .count()
    };
    let kinds = [
        "implemented",
        "mapped",
        "accepted, ignored",
        "accepted, kept, not rendered yet",
        "refused when enabled",
    ];
    let mut out = String::from(
        "# NVIDIA GPU Operator values in gpu-pilot\n\n\
         `kubectl gpu install -f` and `helm install -f` take NVIDIA's chart values file as it is. \
         This is what each of its keys does in gpu-pilot: *implemented* (what NVIDIA's chart does \
         with it, gpu-pilot does), *mapped* (NVIDIA's meaning, reached another way), *accepted, \
         ignored* (kept, and why it changes nothing), *accepted, kept, not rendered yet* (kept \
         for what NVIDIA's chart does with it, which gpu-pilot does not do yet: nothing it \
         renders reads the key), or *refused when enabled* (a family \
         gpu-pilot does not run: NVIDIA's default, off, passes; on is an error naming the \
         family). Keys of policy sections are also fields of gpu-pilot's ClusterPolicy under the \
         same names, so NVIDIA's ClusterPolicy carries over as well.\n\n",
    );
    out.push_str("<!-- Generated by `kubectl-gpu nvidia-keys FILE`, FILE being deployments/gpu-operator/values.yaml of ");
    out.push_str(&format!("{module} (the version scripts/nvidia-gpu-operator pins); the e2e test nvidia::values_table_in_docs_is_current keeps it equal. -->\n\n"));
    out.push_str("| | values.yaml | read by the templates only | newer releases | all |\n|---|---|---|---|---|\n");
    for kind in kinds {
        out.push_str(&format!(
            "| {kind} | {} | {} | {} | {} |\n",
            count(kind, Some("values.yaml")),
            count(kind, Some("templates")),
            count(kind, Some("newer")),
            count(kind, None)
        ));
    }
    let total = |s: Option<&str>| {
        rows.iter()
            .filter(|(_, x, _)| s.is_none_or(|s| s == *x))
            .count()
    };
    out.push_str(&format!(
        "| **keys** | {} | {} | {} | {} |\n\n",
        total(Some("values.yaml")),
        total(Some("templates")),
        total(Some("newer")),
        total(None)
    ));
    out.push_str("| key | from | in gpu-pilot | what it does |\n|---|---|---|---|\n");
    for (key, source, does) in &rows {
        out.push_str(&format!(
            "| `{key}` | {source} | {} | {} |\n",
            does.kind(),
            does.text().replace('|', "\\|")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn patterns_match_keys_and_what_is_below() {
        assert!(matches(
            "driver.{repoConfig,certConfig}",
            "driver.certConfig.name"
        ));
        assert!(matches(
            "driver.{repoConfig,certConfig}",
            "driver.repoConfig"
        ));
        assert!(!matches(
            "driver.{repoConfig,certConfig}",
            "driver.manager.image"
        ));
        assert!(matches("*.resources", "toolkit.resources"));
        assert!(!matches("driver.rdma.enabled", "driver.rdma"));
    }

    #[test]
    fn first_rule_wins() {
        assert_eq!(
            lookup("driver.nvidiaDriverCRD.enabled"),
            Some(RefusedWhenOn(Family::NvidiaDriverCrd))
        );
        assert_eq!(
            lookup("driver.nvidiaDriverCRD.driverType").map(Does::kind),
            Some("accepted, ignored")
        );
        assert_eq!(lookup("devicePlugin.image"), Some(AGENT_IMAGE));
        assert_eq!(lookup("no.such.key"), None);
    }

    #[test]
    fn every_template_only_and_newer_key_has_a_rule() {
        for (key, _) in TEMPLATE_ONLY_KEYS.iter().chain(NEWER_KEYS) {
            assert!(lookup(key).is_some(), "{key}");
        }
    }

    #[test]
    fn leaf_keys_keep_free_form_maps_whole() {
        let v = json!({
            "operator": {"annotations": {"a": "b"}, "logging": {"level": "info"}},
            "devicePlugin": {"config": {"data": {"x": "y"}, "create": false}},
            "node-feature-discovery": {"worker": {"tolerations": [], "serviceAccount": {"name": "n"}}},
            "mig": {},
        });
        let keys = leaf_keys(&v);
        assert!(
            keys.contains(&"operator.annotations".to_string()),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"devicePlugin.config.data".to_string()),
            "{keys:?}"
        );
        assert!(keys.contains(&"mig".to_string()), "{keys:?}");
        let table = table_keys(&v);
        assert!(table.contains(&"node-feature-discovery.worker.tolerations".to_string()));
        assert!(table.contains(&"node-feature-discovery".to_string()));
        assert!(!table.iter().any(|k| k.ends_with("serviceAccount.name")));
    }
}
