//! Every label key, annotation, resource name, stage name and field manager gpu-pilot uses.
//!
//! What workloads and dashboards see is spelled exactly as NVIDIA spells it (`nvidia.com/...`), so
//! existing pod specs, node selectors and Grafana boards keep working. What is gpu-pilot's own
//! carries the `gpupilot.io/` prefix. Nothing else in the workspace writes these strings.

/// API group of gpu-pilot's own resources.
pub const GROUP: &str = "gpupilot.io";
/// Prefix of gpu-pilot's own labels and annotations.
pub const PREFIX: &str = "gpupilot.io/";
/// The name an admin usually gives the one `ClusterPolicy`.
pub const DEFAULT_POLICY_NAME: &str = "cluster-policy";
/// The namespace the operands, controller and webhook run in unless told otherwise.
pub const DEFAULT_NAMESPACE: &str = "gpu-pilot";

/// Field managers for server-side apply: one per writer, so ownership is clear in `managedFields`.
pub mod field_manager {
    pub const CONTROLLER: &str = "gpu-pilot-controller";
    pub const AGENT: &str = "gpu-pilot-agent";
    pub const PLUGIN: &str = "kubectl-gpu";
    pub const WEBHOOK: &str = "gpu-pilot-webhook";
}

/// Extended resource names advertised by the device plugin (NVIDIA's, exactly).
pub mod resource {
    /// A whole GPU, or a time-sliced replica of one.
    pub const GPU: &str = "nvidia.com/gpu";
    /// Prefix of MIG resources under the `mixed` strategy, e.g. `nvidia.com/mig-1g.10gb`.
    pub const MIG_PREFIX: &str = "nvidia.com/mig-";
    /// Suffix NVIDIA appends to renamed time-sliced resources (`nvidia.com/gpu.shared`).
    pub const SHARED_SUFFIX: &str = ".shared";

    /// The resource name of a MIG profile under the `mixed` strategy.
    pub fn mig(profile: &str) -> String {
        format!("{MIG_PREFIX}{profile}")
    }

    /// True for every resource name the device plugin may advertise.
    pub fn is_gpu_resource(name: &str) -> bool {
        name == GPU || name.starts_with(MIG_PREFIX) || name == format!("{GPU}{SHARED_SUFFIX}")
    }
}

/// Node labels. GPU Feature Discovery's names for the facts, NFD's for PCI discovery.
pub mod label {
    /// Set by Node Feature Discovery on nodes with an NVIDIA (vendor 0x10de) PCI device.
    pub const NFD_PCI_10DE: &str = "feature.node.kubernetes.io/pci-10de.present";
    /// NFD's class-qualified variants: display controller (0300) and 3D controller (0302).
    pub const NFD_PCI_0300_10DE: &str = "feature.node.kubernetes.io/pci-0300_10de.present";
    pub const NFD_PCI_0302_10DE: &str = "feature.node.kubernetes.io/pci-0302_10de.present";
    /// All NFD labels that mark a GPU node.
    pub const NFD_GPU_LABELS: [&str; 3] = [NFD_PCI_10DE, NFD_PCI_0300_10DE, NFD_PCI_0302_10DE];

    pub const GPU_PRESENT: &str = "nvidia.com/gpu.present";
    pub const GPU_COUNT: &str = "nvidia.com/gpu.count";
    pub const GPU_PRODUCT: &str = "nvidia.com/gpu.product";
    pub const GPU_MEMORY: &str = "nvidia.com/gpu.memory";
    pub const GPU_FAMILY: &str = "nvidia.com/gpu.family";
    pub const GPU_COMPUTE_MAJOR: &str = "nvidia.com/gpu.compute.major";
    pub const GPU_COMPUTE_MINOR: &str = "nvidia.com/gpu.compute.minor";
    pub const GPU_REPLICAS: &str = "nvidia.com/gpu.replicas";
    pub const GPU_SHARING_STRATEGY: &str = "nvidia.com/gpu.sharing-strategy";
    pub const CUDA_DRIVER_MAJOR: &str = "nvidia.com/cuda.driver-version.major";
    pub const CUDA_DRIVER_MINOR: &str = "nvidia.com/cuda.driver-version.minor";
    pub const CUDA_DRIVER_REV: &str = "nvidia.com/cuda.driver-version.revision";
    pub const CUDA_DRIVER_FULL: &str = "nvidia.com/cuda.driver-version.full";
    pub const CUDA_RUNTIME_MAJOR: &str = "nvidia.com/cuda.runtime-version.major";
    pub const CUDA_RUNTIME_MINOR: &str = "nvidia.com/cuda.runtime-version.minor";
    pub const CUDA_RUNTIME_FULL: &str = "nvidia.com/cuda.runtime-version.full";
    /// GFD's deprecated spellings, still written because selectors in the wild use them.
    pub const CUDA_DRIVER_MAJOR_OLD: &str = "nvidia.com/cuda.driver.major";
    pub const CUDA_DRIVER_MINOR_OLD: &str = "nvidia.com/cuda.driver.minor";
    pub const CUDA_DRIVER_REV_OLD: &str = "nvidia.com/cuda.driver.rev";
    pub const CUDA_RUNTIME_MAJOR_OLD: &str = "nvidia.com/cuda.runtime.major";
    pub const CUDA_RUNTIME_MINOR_OLD: &str = "nvidia.com/cuda.runtime.minor";
    /// The system's product name (DMI), e.g. `DGX-H100`.
    pub const GPU_MACHINE: &str = "nvidia.com/gpu.machine";
    pub const GPU_MULTIPROCESSORS: &str = "nvidia.com/gpu.multiprocessors";
    /// Prefix of GFD's per-MIG-profile labels under the `mixed` strategy:
    /// `nvidia.com/mig-<profile>.count|memory|multiprocessors|slices.gi|slices.ci|engines.*`.
    pub const MIG_PROFILE_PREFIX: &str = "nvidia.com/mig-";
    /// Prefix of the labels GFD derives from the single-strategy MIG profile:
    /// `nvidia.com/gpu.slices.gi`, `nvidia.com/gpu.engines.copy`, ...
    pub const GPU_PREFIX: &str = "nvidia.com/gpu.";
    pub const GPU_DRIVER_MAJOR: &str = "nvidia.com/gpu.driver.major";
    pub const GPU_DRIVER_MINOR: &str = "nvidia.com/gpu.driver.minor";
    pub const GPU_DRIVER_REV: &str = "nvidia.com/gpu.driver.rev";
    pub const MIG_CAPABLE: &str = "nvidia.com/mig.capable";
    pub const MIG_STRATEGY: &str = "nvidia.com/mig.strategy";
    /// The MIG layout an admin asks for on a node (a key of the mig-parted config).
    pub const MIG_CONFIG: &str = "nvidia.com/mig.config";
    /// Where the MIG manager is with that layout; values in [`super::mig_config_state`].
    pub const MIG_CONFIG_STATE: &str = "nvidia.com/mig.config.state";
    /// Selects a named entry of the device-plugin config for this node.
    pub const DEVICE_PLUGIN_CONFIG: &str = "nvidia.com/device-plugin.config";
    /// Per-node opt-out from every operand (`false`).
    pub const DEPLOY_OPERANDS: &str = "nvidia.com/gpu.deploy.operands";
    /// Prefix of the per-node, per-component deploy gates.
    pub const DEPLOY_PREFIX: &str = "nvidia.com/gpu.deploy.";

    /// The label that lets a component's DaemonSet schedule on a node.
    pub fn deploy_gate(component: super::Component) -> String {
        format!("{DEPLOY_PREFIX}{}", component.gate_name())
    }

    /// Which simulated GPU inventory a fake node represents (read by the agent's simulation).
    pub const SIMULATED_INVENTORY: &str = "gpupilot.io/simulated-inventory";
    /// The stage a node is in, as the controller last decided it.
    pub const STAGE: &str = "gpupilot.io/stage";
    /// Opts a pod or namespace out of the mutating webhook (`false`).
    pub const INJECT: &str = "gpupilot.io/inject";
    /// Marks objects gpu-pilot created, so uninstall finds all of them.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const MANAGED_BY_VALUE: &str = "gpu-pilot";
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    pub const NAME: &str = "app.kubernetes.io/name";
    pub const PART_OF: &str = "app.kubernetes.io/part-of";
}

/// Annotations.
pub mod annotation {
    /// Ask for a MIG profile by name, e.g. `1g.10gb`.
    pub const MIG_PROFILE: &str = "gpupilot.io/mig-profile";
    /// Ask for GPU memory, e.g. `20Gi`; the webhook picks the smallest profile that fits.
    pub const GPU_MEMORY: &str = "gpupilot.io/gpu-memory";
    /// Lets the policy be deleted while GPU pods run (`true`).
    pub const FORCE_DELETE: &str = "gpupilot.io/force-delete";
    /// The label keys the agent wrote last time, comma-separated, so it removes only its own.
    pub const AGENT_LABELS: &str = "gpupilot.io/agent-labels";
    /// Gate labels the MIG manager paused, comma-separated, so they are restored after a crash.
    pub const MIG_PAUSED_GATES: &str = "gpupilot.io/mig-paused-gates";
    /// Human-readable GPU description on simulated nodes, e.g. `8x NVIDIA-H100-80GB-HBM3`.
    pub const SIMULATED_GPUS: &str = "gpupilot.io/simulated-gpus";
    /// Why a node is held in its stage, written by the controller.
    pub const STAGE_REASON: &str = "gpupilot.io/stage-reason";
    /// Set by the controller when it labelled `nvidia.com/gpu.present` from NFD's labels, so it
    /// can take the label back when NFD stops reporting a GPU (value `nfd`).
    pub const GPU_PRESENT_SOURCE: &str = "gpupilot.io/gpu-present-source";
    /// Hash of the rendered object, so unchanged objects are not applied again.
    pub const SPEC_HASH: &str = "gpupilot.io/spec-hash";
    /// kwok manages nodes carrying this annotation (value `fake`).
    pub const KWOK_NODE: &str = "kwok.x-k8s.io/node";
    /// On a Namespace that `kubectl gpu install` created (value `kubectl-gpu`). Install never
    /// labels a namespace that existed before it, and uninstall deletes only a namespace that
    /// carries this annotation, so installing into a namespace of one's own never loses it.
    pub const NAMESPACE_CREATED_BY: &str = "gpupilot.io/namespace-created-by";
}

/// The admission webhook's objects, paths and bookkeeping.
pub mod webhook {
    /// Name of the Service, Deployment, ServiceAccount and both webhook configurations.
    pub const NAME: &str = "gpu-pilot-webhook";
    /// The Secret that holds the CA, the serving certificate and the CA bundle.
    pub const TLS_SECRET: &str = "gpu-pilot-webhook-tls";
    /// HTTPS paths the apiserver calls.
    pub const MUTATE_PODS_PATH: &str = "/mutate/pods";
    pub const VALIDATE_POLICY_PATH: &str = "/validate/clusterpolicy";
    /// Names of the webhooks inside the configurations (must be fully qualified).
    pub const MUTATE_PODS_WEBHOOK: &str = "pods.gpupilot.io";
    pub const VALIDATE_POLICY_WEBHOOK: &str = "clusterpolicies.gpupilot.io";
    /// Keys of the TLS Secret's data.
    pub const CA_CERT_KEY: &str = "ca.crt";
    pub const CA_KEY_KEY: &str = "ca.key";
    pub const NEXT_CA_CERT_KEY: &str = "next-ca.crt";
    pub const NEXT_CA_KEY_KEY: &str = "next-ca.key";
    pub const PREVIOUS_CA_CERT_KEY: &str = "previous-ca.crt";
    pub const CA_BUNDLE_KEY: &str = "ca-bundle.crt";
    pub const TLS_CERT_KEY: &str = "tls.crt";
    pub const TLS_KEY_KEY: &str = "tls.key";
    /// Annotations on the TLS Secret recording what its certificates are (RFC 3339 times).
    pub const CA_NOT_AFTER: &str = "gpupilot.io/ca-not-after";
    pub const NEXT_CA_SINCE: &str = "gpupilot.io/next-ca-since";
    pub const PREVIOUS_CA_NOT_AFTER: &str = "gpupilot.io/previous-ca-not-after";
    pub const CERT_NOT_AFTER: &str = "gpupilot.io/cert-not-after";
    pub const CERT_NAMES: &str = "gpupilot.io/cert-names";
    /// cert-manager's annotation that fills in `caBundle` from a Certificate (Helm users).
    pub const CERT_MANAGER_INJECT_CA_FROM: &str = "cert-manager.io/inject-ca-from";
    /// Namespaces whose pods are never mutated.
    pub const KUBE_SYSTEM: &str = "kube-system";
    /// The label every namespace carries with its own name (set by the apiserver).
    pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
}

/// Values of the gate labels other than `true`/`false` that are respected, never overwritten.
pub mod gate_value {
    pub const ENABLED: &str = "true";
    pub const DISABLED: &str = "false";
    /// Set by the MIG manager on GPU clients while it changes the layout.
    pub const PAUSED_FOR_MIG_CHANGE: &str = "paused-for-mig-change";
    /// Prefix of every paused value.
    pub const PAUSED_PREFIX: &str = "paused-";
}

/// Values of `nvidia.com/mig.config.state`.
pub mod mig_config_state {
    pub const PENDING: &str = "pending";
    pub const REBOOTING: &str = "rebooting";
    pub const SUCCESS: &str = "success";
    pub const FAILED: &str = "failed";
}

/// Finalizer on the ClusterPolicy: the controller removes operands and node labels first.
pub const FINALIZER: &str = "gpupilot.io/cleanup";

/// Taint key of GPU nodes; the webhook adds a toleration for it to GPU pods.
pub const GPU_TAINT_KEY: &str = "nvidia.com/gpu";

/// The operands, one DaemonSet each. The name is the DaemonSet's and the gate label's suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    ContainerToolkit,
    Driver,
    OperatorValidator,
    DevicePlugin,
    GpuFeatureDiscovery,
    DcgmExporter,
    MigManager,
}

impl Component {
    pub const ALL: [Component; 7] = [
        Component::ContainerToolkit,
        Component::Driver,
        Component::OperatorValidator,
        Component::DevicePlugin,
        Component::GpuFeatureDiscovery,
        Component::DcgmExporter,
        Component::MigManager,
    ];

    /// NVIDIA's gate-label suffix: `nvidia.com/gpu.deploy.<gate_name>`.
    pub const fn gate_name(self) -> &'static str {
        match self {
            Component::ContainerToolkit => "container-toolkit",
            Component::Driver => "driver",
            Component::OperatorValidator => "operator-validator",
            Component::DevicePlugin => "device-plugin",
            Component::GpuFeatureDiscovery => "gpu-feature-discovery",
            Component::DcgmExporter => "dcgm-exporter",
            Component::MigManager => "mig-manager",
        }
    }

    /// The ClusterPolicy spec field that configures this component.
    pub const fn spec_field(self) -> &'static str {
        match self {
            Component::ContainerToolkit => "toolkit",
            Component::Driver => "driver",
            Component::OperatorValidator => "validator",
            Component::DevicePlugin => "devicePlugin",
            Component::GpuFeatureDiscovery => "gfd",
            Component::DcgmExporter => "dcgmExporter",
            Component::MigManager => "migManager",
        }
    }

    /// The DaemonSet's name.
    pub fn daemonset_name(self) -> String {
        format!("gpu-pilot-{}", self.gate_name())
    }
}

/// The stages a GPU node moves through, in order.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Toolkit,
    Driver,
    DriverValidation,
    DevicePlugin,
    PluginValidation,
    Ready,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Toolkit,
        Stage::Driver,
        Stage::DriverValidation,
        Stage::DevicePlugin,
        Stage::PluginValidation,
        Stage::Ready,
    ];

    /// The stage's name as it appears in labels, status and output.
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Toolkit => "toolkit",
            Stage::Driver => "driver",
            Stage::DriverValidation => "driver-validation",
            Stage::DevicePlugin => "device-plugin",
            Stage::PluginValidation => "plugin-validation",
            Stage::Ready => "ready",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_labels_are_nvidias() {
        assert_eq!(
            label::deploy_gate(Component::DevicePlugin),
            "nvidia.com/gpu.deploy.device-plugin"
        );
        assert_eq!(
            label::deploy_gate(Component::ContainerToolkit),
            "nvidia.com/gpu.deploy.container-toolkit"
        );
    }

    #[test]
    fn stage_names_round_trip() {
        for st in Stage::ALL {
            assert_eq!(Stage::parse(st.as_str()), Some(st));
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        assert_eq!(Stage::parse("bogus"), None);
    }

    #[test]
    fn gpu_resources_are_recognised() {
        assert!(resource::is_gpu_resource("nvidia.com/gpu"));
        assert!(resource::is_gpu_resource("nvidia.com/gpu.shared"));
        assert!(resource::is_gpu_resource(&resource::mig("1g.10gb")));
        assert!(!resource::is_gpu_resource("cpu"));
        assert!(!resource::is_gpu_resource("amd.com/gpu"));
    }
}
