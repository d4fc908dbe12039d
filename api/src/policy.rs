//! The `ClusterPolicy` custom resource (`gpupilot.io/v1alpha1`, cluster-scoped).
//!
//! The spec keeps the field names of NVIDIA's `nvidia.com/v1` ClusterPolicy so an admin's YAML and
//! habits carry over. Every field has a default that the apiserver fills in (through the schema), so
//! `spec: {}` is a complete, working policy. Rules one object can check live in the schema (enums,
//! CEL `x-kubernetes-validations`); rules that need other objects live in the validating webhook.

// kube's `printcolumn(...)` entries repeat keys such as `type_`, which clippy mistakes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::names::{Component, GPU_TAINT_KEY, Stage};

/// Version of gpu-pilot, which is also the default tag of the agent image.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where gpu-pilot's own images live.
pub const GPU_PILOT_REPOSITORY: &str = "ghcr.io/gpu-pilot";
/// The one image that serves every gpu-pilot-owned operand (device plugin, GFD, MIG manager, validator).
pub const AGENT_IMAGE: &str = "gpu-pilot-agent";

/// The bounds the schema puts on what the controller turns into objects, so that every policy the
/// apiserver admits renders (`gpu_pilot_core`'s `policy_bounds` tests hold the schema to them).
pub mod bounds {
    /// Items in a list the controller copies into a DaemonSet (pull secrets, args, env, tolerations).
    pub const MAX_ITEMS: usize = 64;
    /// Length of one extra container argument.
    pub const MAX_ARG: usize = 4096;
    /// Entries in a label or annotation map.
    pub const MAX_ENTRIES: usize = 64;
    /// Length of one annotation value (64 of them fill Kubernetes' 256 KiB annotation budget).
    pub const MAX_ANNOTATION_VALUE: usize = 4096;
    /// A DNS subdomain (RFC 1123): the names of Secrets, ConfigMaps and PriorityClasses.
    pub const DNS_SUBDOMAIN: &str =
        r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
    /// A label or annotation key: an optional DNS prefix and `/`, then a name of up to 63.
    pub const LABEL_KEY: &str =
        r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
    /// A label value: empty, or up to 63 letters, digits, '-', '_' and '.', alphanumeric at both ends.
    pub const LABEL_VALUE: &str = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";
}

/// The schema of a label map: bounded, every key and value as Kubernetes allows them.
fn label_map(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": bounds::MAX_ENTRIES,
        "additionalProperties": {"type": "string", "maxLength": 63},
        "x-kubernetes-validations": [{
            "rule": format!("self.all(k, k.matches('{}') && self[k].matches('{}'))", bounds::LABEL_KEY, bounds::LABEL_VALUE),
            "message": "labels must be valid Kubernetes labels: keys like example.com/name (a name of up to 63 letters, digits, '-', '_' and '.', alphanumeric at both ends, after an optional DNS prefix and '/'), values of up to 63 such characters"
        }]
    })
}

/// The schema of an annotation map: bounded, every key as Kubernetes allows it.
fn annotation_map(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": bounds::MAX_ENTRIES,
        "additionalProperties": {"type": "string", "maxLength": bounds::MAX_ANNOTATION_VALUE},
        "x-kubernetes-validations": [{
            "rule": format!("self.all(k, k.matches('{}'))", bounds::LABEL_KEY),
            "message": "annotation keys must be valid Kubernetes keys like example.com/name (a name of up to 63 letters, digits, '-', '_' and '.', alphanumeric at both ends, after an optional DNS prefix and '/')"
        }]
    })
}

/// Desired state of the GPU stack on every GPU node of the cluster.
// Each `printcolumn(...)` repeats `type_`; clippy reads that as one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "gpupilot.io",
    version = "v1alpha1",
    kind = "ClusterPolicy",
    plural = "clusterpolicies",
    singular = "clusterpolicy",
    shortname = "gpupolicy",
    category = "gpu-pilot",
    status = "ClusterPolicyStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "ClusterPolicy is the one object an admin edits to run NVIDIA GPUs on the cluster with gpu-pilot.",
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "GPU-Nodes", type_ = "integer", json_path = ".status.gpuNodes"),
    printcolumn(
        name = "Ready-Nodes",
        type_ = "integer",
        json_path = ".status.readyNodes"
    ),
    printcolumn(
        name = "MIG",
        type_ = "string",
        json_path = ".spec.mig.strategy",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", default)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.sandboxWorkloads) || !has(self.sandboxWorkloads.enabled) || !self.sandboxWorkloads.enabled",
        "message": SANDBOX_REFUSAL,
        "fieldPath": ".sandboxWorkloads.enabled",
        "reason": "FieldValueForbidden"
    }
]))]
pub struct ClusterPolicySpec {
    /// Cluster-wide settings of the operator itself.
    pub operator: OperatorSpec,
    /// Settings every operand DaemonSet shares.
    pub daemonsets: DaemonsetsSpec,
    /// The NVIDIA driver container. Disable it where the driver is installed on the host.
    pub driver: DriverSpec,
    /// The NVIDIA container toolkit, which makes the container runtime GPU-aware.
    pub toolkit: ToolkitSpec,
    /// The kubelet device plugin that advertises `nvidia.com/gpu` (served by the gpu-pilot agent).
    pub device_plugin: DevicePluginSpec,
    /// NVIDIA's DCGM exporter for detailed GPU metrics.
    pub dcgm_exporter: DcgmExporterSpec,
    /// GPU feature labels on nodes (served by the gpu-pilot agent).
    pub gfd: GfdSpec,
    /// Applies MIG layouts asked for with `nvidia.com/mig.config` (served by the gpu-pilot agent).
    pub mig_manager: MigManagerSpec,
    /// How MIG devices are exposed to workloads.
    pub mig: MigSpec,
    /// Validation steps between the stages (served by the gpu-pilot agent).
    pub validator: ValidatorSpec,
    /// Container Device Interface support.
    pub cdi: CdiSpec,
    /// Paths on the host the operands need.
    pub host_paths: HostPathsSpec,
    /// Pod Security admission: label the operator's namespace `privileged` (its operands are).
    /// Kept, not applied to the namespace yet.
    pub psa: PsaSpec,
    /// GPUDirect Storage: the driver pod also loads `nvidia-fs`. Kept, not rendered yet.
    pub gds: GdsSpec,
    /// GDRCopy: the driver pod also loads `gdrdrv`. Kept, not rendered yet.
    pub gdrcopy: GdrcopySpec,
    /// NVIDIA's standalone DCGM hostengine: accepted, not run (dcgm-exporter embeds DCGM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dcgm: Option<DcgmSpec>,
    /// NVIDIA's node status exporter: accepted, not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_status_exporter: Option<NodeStatusExporterSpec>,
    /// PodSecurityPolicy (removed in Kubernetes 1.25): accepted, not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub psp: Option<PspSpec>,
    /// GPUs for virtual machines: not supported; `enabled: true` is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_workloads: Option<SandboxWorkloadsSpec>,
    /// Sandbox workloads only: accepted, not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vfio_manager: Option<VfioManagerSpec>,
    /// Sandbox workloads only: accepted, not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sandbox_device_plugin: Option<SandboxDevicePluginSpec>,
    /// Sandbox workloads only: accepted, not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vgpu_manager: Option<VgpuManagerSpec>,
    /// Sandbox workloads only: accepted, not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vgpu_device_manager: Option<VgpuDeviceManagerSpec>,
    /// Sandbox workloads only: accepted, not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kata_manager: Option<KataManagerSpec>,
    /// Sandbox workloads only: accepted, not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cc_manager: Option<CcManagerSpec>,
}

/// An environment variable as NVIDIA's ClusterPolicy spells it: a name and a literal value.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NameValue {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
}

/// Resources as NVIDIA's ClusterPolicy spells them: limits and requests only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NvidiaResources {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "terse::<BTreeMap<String, Quantity>>")]
    pub limits: BTreeMap<String, Quantity>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "terse::<BTreeMap<String, Quantity>>")]
    pub requests: BTreeMap<String, Quantity>,
}

/// The schema of one of Kubernetes' own types (EnvVar, ResourceRequirements, Toleration,
/// Quantity) without its descriptions: `kubectl explain pod.spec.containers` has them, and with
/// a copy per component the CRD would outgrow the 256 KiB a client-side `kubectl apply` can keep
/// in its annotation. The field's own description stays.
pub fn terse<T: JsonSchema>(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(o) => {
                o.remove("description");
                o.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut value = generator.subschema_for::<T>().to_value();
    strip(&mut value);
    schemars::Schema::try_from(value).expect("a schema stays a schema without descriptions")
}

/// Image pull policy, as in a Pod.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePullPolicy::Always => "Always",
            ImagePullPolicy::IfNotPresent => "IfNotPresent",
            ImagePullPolicy::Never => "Never",
        }
    }
}

/// What every operand can be configured with. Implemented by each component's spec.
pub trait OperandSpec {
    fn enabled(&self) -> bool;
    fn repository(&self) -> &str;
    fn image(&self) -> &str;
    fn version(&self) -> &str;
    fn image_pull_policy(&self) -> ImagePullPolicy;
    fn image_pull_secrets(&self) -> &[String];
    fn resources(&self) -> Option<&ResourceRequirements>;
    fn args(&self) -> &[String];
    fn env(&self) -> &[EnvVar];

    /// NVIDIA's images for this component that gpu-pilot runs its own in place of (the agent
    /// serves NVIDIA's device plugin, GFD, MIG manager and validator).
    fn replaced_images(&self) -> &'static [&'static str] {
        &[]
    }
    /// The image of the component's defaults.
    fn default_image_reference(&self) -> Option<String>;

    /// The full image reference the DaemonSet runs, or `None` when none can be formed. A
    /// policy taken from NVIDIA's operator names NVIDIA's image for components gpu-pilot's agent
    /// serves: that means the agent image.
    fn image_reference(&self) -> Option<String> {
        if names_image(self.image(), self.replaced_images()) {
            return self.default_image_reference();
        }
        image_reference(self.repository(), self.image(), self.version())
    }
}

/// True when `image` (a name, or a reference with registry, tag or digest) is one of `names`.
pub fn names_image(image: &str, names: &[&str]) -> bool {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let name = last.split(':').next().unwrap_or(last);
    names.contains(&name)
}

/// Builds an image reference the way NVIDIA's operator does: `image` may already be a full
/// reference (it contains a `/`), otherwise it is joined to `repository`; `version` is a tag, or a
/// digest when it starts with `sha256:`. An image that already carries a tag or digest keeps it.
pub fn image_reference(repository: &str, image: &str, version: &str) -> Option<String> {
    if image.is_empty() {
        return None;
    }
    let base = if image.contains('/') || repository.is_empty() {
        image.to_string()
    } else {
        format!("{}/{}", repository.trim_end_matches('/'), image)
    };
    let last = base.rsplit('/').next().unwrap_or(&base);
    if base.contains('@') || last.contains(':') {
        return Some(base);
    }
    if version.is_empty() {
        return None;
    }
    if version.starts_with("sha256:") {
        Some(format!("{base}@{version}"))
    } else {
        Some(format!("{base}:{version}"))
    }
}

/// Declares one operand's spec struct: the common fields, the component's own defaults, and any
/// extra fields. One macro keeps the eight component types identical where they should be.
macro_rules! component {
    (
        $(#[$doc:meta])*
        $name:ident {
            enabled: $enabled:expr,
            repository: $repo:expr,
            image: $image:expr,
            version: $version:expr
            $(, replaces: [$($nvidia:expr),* $(,)?])? $(,)?
        }
        $( extra { $( $(#[$fdoc:meta])* $field:ident : $ty:ty = $default:expr ),* $(,)? } )?
    ) => {
        $(#[$doc])*
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
        #[serde(rename_all = "camelCase", default)]
        #[schemars(extend("x-kubernetes-validations" = [
            {
                "rule": "!self.enabled || (self.image != '' && (self.image.contains('/') || self.repository != '') && (self.version != '' || self.image.contains('@') || self.image.matches(':[^/]*$')))",
                "message": "an enabled component needs an image it can pull: set image, repository and version (or a full image reference in image), or set enabled: false",
                "fieldPath": ".image",
                "reason": "FieldValueRequired"
            }
        ]))]
        pub struct $name {
            /// Deploy this component.
            pub enabled: bool,
            /// Registry and path the image is pulled from, e.g. `nvcr.io/nvidia`.
            #[schemars(length(max = 512))]
            pub repository: String,
            /// Image name, or a full image reference (then `repository` is ignored).
            #[schemars(length(max = 512))]
            pub image: String,
            /// Image tag, or a digest `sha256:<64 hex digits>`.
            #[schemars(length(max = 256))]
            #[schemars(extend("x-kubernetes-validations" = [
                {
                    "rule": "self == '' || self.matches('^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$') || self.matches('^sha256:[a-f0-9]{64}$')",
                    "message": "version must be an image tag (up to 128 letters, digits, '_', '.' or '-', not starting with '.' or '-') or a digest 'sha256:' followed by 64 lowercase hex digits"
                }
            ]))]
            pub version: String,
            /// When the kubelet pulls the image.
            pub image_pull_policy: ImagePullPolicy,
            /// Names of Secrets in the operator's namespace used to pull the image.
            #[serde(skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = bounds::MAX_ITEMS), inner(length(max = 253), pattern(bounds::DNS_SUBDOMAIN)))]
            pub image_pull_secrets: Vec<String>,
            /// CPU and memory for the component's containers.
            #[serde(skip_serializing_if = "Option::is_none")]
            #[schemars(schema_with = "terse::<Option<ResourceRequirements>>")]
            pub resources: Option<ResourceRequirements>,
            /// Extra arguments for the component's main container.
            #[serde(skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = bounds::MAX_ITEMS), inner(length(max = bounds::MAX_ARG)))]
            pub args: Vec<String>,
            /// Extra environment variables for the component's main container.
            #[serde(skip_serializing_if = "Vec::is_empty")]
            #[schemars(schema_with = "terse::<Vec<EnvVar>>", length(max = bounds::MAX_ITEMS))]
            pub env: Vec<EnvVar>,
            $($( $(#[$fdoc])* pub $field: $ty, )*)?
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    enabled: $enabled,
                    repository: $repo.into(),
                    image: $image.into(),
                    version: $version.into(),
                    image_pull_policy: ImagePullPolicy::IfNotPresent,
                    image_pull_secrets: Vec::new(),
                    resources: None,
                    args: Vec::new(),
                    env: Vec::new(),
                    $($( $field: $default, )*)?
                }
            }
        }

        impl OperandSpec for $name {
            fn enabled(&self) -> bool { self.enabled }
            fn repository(&self) -> &str { &self.repository }
            fn image(&self) -> &str { &self.image }
            fn version(&self) -> &str { &self.version }
            fn image_pull_policy(&self) -> ImagePullPolicy { self.image_pull_policy }
            fn image_pull_secrets(&self) -> &[String] { &self.image_pull_secrets }
            fn resources(&self) -> Option<&ResourceRequirements> { self.resources.as_ref() }
            fn args(&self) -> &[String] { &self.args }
            fn env(&self) -> &[EnvVar] { &self.env }
            fn replaced_images(&self) -> &'static [&'static str] { &[$($($nvidia),*)?] }
            fn default_image_reference(&self) -> Option<String> {
                Self::default().image_reference()
            }
        }
    };
}

component! {
    /// The NVIDIA driver container.
    DriverSpec {
        enabled: true,
        repository: "nvcr.io/nvidia",
        image: "driver",
        version: "580.95.05",
    }
    extra {
        /// Which kernel modules the driver container loads.
        kernel_module_type: KernelModuleType = KernelModuleType::Auto,
        /// Use NVIDIA's precompiled driver images (tag `<branch>-<kernel>-<os>`), one DaemonSet
        /// per kernel version found on the GPU nodes. Kept, not rendered yet.
        use_precompiled: bool = false,
        /// Deprecated by NVIDIA in favour of kernelModuleType, and ignored (as by NVIDIA).
        #[serde(skip_serializing_if = "Option::is_none")]
        use_open_kernel_modules: Option<bool> = None,
        /// NVIDIA's NVIDIADriver custom resource: not supported, `true` is refused.
        #[serde(rename = "useNvidiaDriverCRD", skip_serializing_if = "Option::is_none")]
        #[schemars(extend("x-kubernetes-validations" = [{"rule": "!self", "message": DRIVER_CRD_REFUSAL, "reason": "FieldValueForbidden"}]))]
        use_nvidia_driver_crd: Option<bool> = None,
        /// Timing of the driver container's startup probe (`nvidia-smi`). Kept, not rendered yet.
        startup_probe: ContainerProbeSpec = ContainerProbeSpec::driver_startup(),
        /// Timing of a liveness probe (`nvidia-smi`); none when unset. Kept, not rendered yet.
        #[serde(skip_serializing_if = "Option::is_none")]
        liveness_probe: Option<ContainerProbeSpec> = None,
        /// Timing of a readiness probe (`nvidia-smi`); none when unset. Kept, not rendered yet.
        #[serde(skip_serializing_if = "Option::is_none")]
        readiness_probe: Option<ContainerProbeSpec> = None,
        /// GPUDirect RDMA (`nvidia-peermem`). Kept, not rendered yet.
        rdma: GpuDirectRdmaSpec = GpuDirectRdmaSpec::default(),
        /// How driver upgrades roll across nodes: kept for the driver upgrade flow.
        #[serde(skip_serializing_if = "Option::is_none")]
        upgrade_policy: Option<DriverUpgradePolicySpec> = None,
        /// NVIDIA's driver manager, the driver pod's init container. Kept, not rendered yet.
        manager: DriverManagerSpec = DriverManagerSpec::default(),
        /// Package repository files for the driver container. Kept, not rendered yet.
        repo_config: DriverRepoConfigSpec = DriverRepoConfigSpec::default(),
        /// CA certificates for the driver container. Kept, not rendered yet.
        cert_config: DriverCertConfigSpec = DriverCertConfigSpec::default(),
        /// vGPU guest licensing. Kept, not rendered yet.
        licensing_config: DriverLicensingConfigSpec = DriverLicensingConfigSpec::default(),
        /// vGPU guest topology daemon configuration. Kept, not rendered yet.
        virtual_topology: VirtualTopologyConfigSpec = VirtualTopologyConfigSpec::default(),
        /// Kernel module parameters. Kept, not rendered yet.
        kernel_module_config: KernelModuleConfigSpec = KernelModuleConfigSpec::default(),
    }
}

component! {
    /// The NVIDIA container toolkit.
    ToolkitSpec {
        enabled: true,
        repository: "nvcr.io/nvidia/k8s",
        image: "container-toolkit",
        version: "v1.17.8",
    }
    extra {
        /// Where the toolkit is installed on the host.
        #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')", "message": "installDir must be an absolute path without '..' elements"}]))]
        #[schemars(length(max = 4096))]
        install_dir: String = "/usr/local/nvidia".into(),
    }
}

component! {
    /// The kubelet device plugin.
    DevicePluginSpec {
        enabled: true,
        repository: GPU_PILOT_REPOSITORY,
        image: AGENT_IMAGE,
        version: concat!("v", env!("CARGO_PKG_VERSION")),
        replaces: ["k8s-device-plugin"],
    }
    extra {
        /// Time-slicing and other device-plugin settings from a ConfigMap.
        #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.default == '' || self.name != ''", "message": "config.default names an entry of the ConfigMap in config.name: set config.name too", "fieldPath": ".name", "reason": "FieldValueRequired"}]))]
        config: ConfigRef = ConfigRef::default(),
        /// NVIDIA's MPS settings: accepted, not used (gpu-pilot shares GPUs by time-slicing).
        #[serde(skip_serializing_if = "Option::is_none")]
        mps: Option<MpsSpec> = None,
    }
}

component! {
    /// NVIDIA's DCGM exporter.
    DcgmExporterSpec {
        enabled: true,
        repository: "nvcr.io/nvidia/k8s",
        image: "dcgm-exporter",
        version: "4.2.3-4.1.3-ubuntu22.04",
    }
    extra {
        /// A ConfigMap with the metrics to collect, in dcgm-exporter's CSV format
        /// (`dcgm-metrics.csv`).
        #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.default == '' || self.name != ''", "message": "config.default names an entry of the ConfigMap in config.name: set config.name too", "fieldPath": ".name", "reason": "FieldValueRequired"}]))]
        config: ConfigRef = ConfigRef::default(),
        /// The Service in front of the exporters. Kept, not created yet.
        service: DcgmExporterServiceSpec = DcgmExporterServiceSpec::default(),
        /// A Prometheus operator ServiceMonitor for that Service. Kept, not created yet.
        service_monitor: DcgmExporterServiceMonitorSpec = DcgmExporterServiceMonitorSpec::default(),
        /// Run the exporters in the host's network namespace (to reach a DCGM on the host).
        /// Kept, not rendered yet.
        host_network: bool = false,
    }
}

component! {
    /// GPU feature discovery labels.
    GfdSpec {
        enabled: true,
        repository: GPU_PILOT_REPOSITORY,
        image: AGENT_IMAGE,
        version: concat!("v", env!("CARGO_PKG_VERSION")),
        replaces: ["k8s-device-plugin", "gpu-feature-discovery"],
    }
}

component! {
    /// The MIG manager.
    MigManagerSpec {
        enabled: true,
        repository: GPU_PILOT_REPOSITORY,
        image: AGENT_IMAGE,
        version: concat!("v", env!("CARGO_PKG_VERSION")),
        replaces: ["k8s-mig-manager"],
    }
    extra {
        /// The mig-parted config (`version: v1`, `mig-configs`) and the layout applied by default.
        /// With no name, the agent's built-in layouts (`all-disabled`, `all-enabled`,
        /// `all-<profile>`) serve.
        config: ConfigRef = ConfigRef {
            name: "default-mig-parted-config".into(),
            default: "all-disabled".into(),
        },
        /// A ConfigMap naming the host services and pods that hold GPUs and must stop while the
        /// MIG layout changes (mig-parted's `clients.yaml`). Kept, not used by the MIG manager yet.
        gpu_clients_config: GpuClientsConfigRef = GpuClientsConfigRef::default(),
    }
}

component! {
    /// The validator that gates the stages.
    ValidatorSpec {
        enabled: true,
        repository: GPU_PILOT_REPOSITORY,
        image: AGENT_IMAGE,
        version: concat!("v", env!("CARGO_PKG_VERSION")),
        replaces: ["gpu-operator-validator"],
    }
    extra {
        /// Environment of the driver validation (the validator's main container). Kept, not
        /// rendered yet.
        #[serde(skip_serializing_if = "Option::is_none")]
        driver: Option<ValidatorEnv> = None,
        /// Environment of the toolkit validation (the validator's init container). Kept, not
        /// rendered yet.
        #[serde(skip_serializing_if = "Option::is_none")]
        toolkit: Option<ValidatorEnv> = None,
        /// NVIDIA's device-plugin validation workload: accepted, not used (gpu-pilot validates
        /// the plugin from what the node advertises).
        #[serde(skip_serializing_if = "Option::is_none")]
        plugin: Option<ValidatorEnv> = None,
        /// NVIDIA's CUDA validation workload: accepted, not used.
        #[serde(skip_serializing_if = "Option::is_none")]
        cuda: Option<ValidatorEnv> = None,
        /// Sandbox workloads only: accepted, not used.
        #[serde(rename = "vfioPCI", skip_serializing_if = "Option::is_none")]
        vfio_pci: Option<ValidatorEnv> = None,
        /// Sandbox workloads only: accepted, not used.
        #[serde(skip_serializing_if = "Option::is_none")]
        vgpu_manager: Option<ValidatorEnv> = None,
        /// Sandbox workloads only: accepted, not used.
        #[serde(skip_serializing_if = "Option::is_none")]
        vgpu_devices: Option<ValidatorEnv> = None,
    }
}

component! {
    /// GPUDirect Storage (`nvidia-fs`), a container of the driver pod.
    GdsSpec {
        enabled: false,
        repository: "nvcr.io/nvidia/cloud-native",
        image: "nvidia-fs",
        version: "2.20.5",
    }
}

component! {
    /// GDRCopy (`gdrdrv`), a container of the driver pod.
    GdrcopySpec {
        enabled: false,
        repository: "nvcr.io/nvidia/cloud-native",
        image: "gdrdrv",
        version: "v2.5.1",
    }
}

mod dcgm_exporter;
mod driver;
mod not_run;

pub use dcgm_exporter::*;
pub use driver::*;
pub use not_run::*;

/// Extra environment for one of the validator's steps.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidatorEnv {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bounds::MAX_ITEMS))]
    pub env: Vec<NameValue>,
}

/// NVIDIA's MPS settings of the device plugin.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MpsSpec {
    /// MPS's folder on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub root: Option<String>,
}

/// The ConfigMap with mig-parted's `clients.yaml`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct GpuClientsConfigRef {
    /// ConfigMap name; empty means none.
    #[schemars(length(max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self == '' || self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
            "message": "gpuClientsConfig.name must be a ConfigMap name: lowercase letters, digits, '-' and '.'"
        }
    ]))]
    pub name: String,
}

/// Pod Security admission.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct PsaSpec {
    /// Label the operator's namespace `pod-security.kubernetes.io/enforce=privileged` (and
    /// audit, warn), so a cluster-wide restricted default does not refuse the operands.
    pub enabled: bool,
}

/// Which kernel modules the driver loads.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KernelModuleType {
    /// Open modules where the GPU supports them, proprietary otherwise.
    #[default]
    Auto,
    Open,
    Proprietary,
}

/// A reference to a ConfigMap in the operator's namespace and the entry used by default.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ConfigRef {
    /// ConfigMap name; empty means no ConfigMap.
    #[schemars(length(max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self == '' || self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
            "message": "config.name must be a ConfigMap name: lowercase letters, digits, '-' and '.'"
        }
    ]))]
    pub name: String,
    /// The entry of that ConfigMap used on nodes that do not choose one (a ConfigMap key).
    #[schemars(length(max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self == '' || self.matches('^[-._a-zA-Z0-9]+$') && !self.startsWith('-')",
            "message": "config.default must be a key of the ConfigMap: letters, digits, '-', '_' and '.', not starting with '-'"
        }
    ]))]
    pub default: String,
}

/// Container runtime on the nodes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ContainerRuntime {
    #[default]
    Containerd,
    Crio,
    Docker,
}

impl ContainerRuntime {
    /// The name as the policy spells it, which is also what the toolkit's `RUNTIME` reads.
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerRuntime::Containerd => "containerd",
            ContainerRuntime::Crio => "crio",
            ContainerRuntime::Docker => "docker",
        }
    }
}

/// Cluster-wide operator settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct OperatorSpec {
    /// The container runtime the toolkit configures.
    pub default_runtime: ContainerRuntime,
    /// RuntimeClass created for GPU pods and set on them by the webhook; also its handler, the
    /// runtime name the toolkit configures, so it must be a DNS label.
    #[schemars(length(max = 63))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
            "message": "runtimeClass must be a DNS label (it is also the RuntimeClass handler): up to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        }
    ]))]
    pub runtime_class: String,
    /// Labels added to every object the operator creates.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "label_map")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to every object the operator creates.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "annotation_map")]
    pub annotations: BTreeMap<String, String>,
    /// NVIDIA's CUDA image for its operands' init containers: accepted, not used (gpu-pilot's
    /// operands need none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_container: Option<InitContainerSpec>,
    /// OpenShift's driver toolkit: accepted, not used (NVIDIA's operator ignores it off
    /// OpenShift too).
    #[serde(
        rename = "use_ocp_driver_toolkit",
        skip_serializing_if = "Option::is_none"
    )]
    pub use_ocp_driver_toolkit: Option<bool>,
}

impl Default for OperatorSpec {
    fn default() -> Self {
        Self {
            default_runtime: ContainerRuntime::Containerd,
            runtime_class: "nvidia".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            init_container: None,
            use_ocp_driver_toolkit: None,
        }
    }
}

/// How a DaemonSet replaces its pods.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum UpdateStrategy {
    #[default]
    RollingUpdate,
    OnDelete,
}

/// Settings shared by all operand DaemonSets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct DaemonsetsSpec {
    /// Labels added to every operand pod.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "label_map")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to every operand pod.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "annotation_map")]
    pub annotations: BTreeMap<String, String>,
    /// Tolerations of every operand pod.
    #[schemars(schema_with = "terse::<Vec<Toleration>>", length(max = bounds::MAX_ITEMS))]
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of every operand pod (empty: none).
    #[schemars(length(max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self == '' || self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')",
            "message": "priorityClassName must be a PriorityClass name: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
        }
    ]))]
    pub priority_class_name: String,
    /// Update strategy of the operand DaemonSets (the driver's is always OnDelete).
    pub update_strategy: UpdateStrategy,
    /// Rolling update parameters when updateStrategy is RollingUpdate.
    pub rolling_update: RollingUpdateSpec,
}

impl Default for DaemonsetsSpec {
    fn default() -> Self {
        Self {
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            tolerations: vec![Toleration {
                key: Some(GPU_TAINT_KEY.into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }],
            priority_class_name: "system-node-critical".into(),
            update_strategy: UpdateStrategy::RollingUpdate,
            rolling_update: RollingUpdateSpec::default(),
        }
    }
}

/// Rolling update parameters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RollingUpdateSpec {
    /// How many nodes (a number from 1 to 999999999, or a percentage like `10%`) may update at
    /// once. The count becomes a DaemonSet's 32-bit `maxUnavailable`, hence its nine digits.
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self.matches('^([1-9][0-9]{0,8}|([1-9][0-9]?|100)%)$')",
            "message": "maxUnavailable must be a number of nodes from 1 to 999999999 like '1', or a percentage from 1% to 100% like '10%'"
        }
    ]))]
    pub max_unavailable: String,
}

impl Default for RollingUpdateSpec {
    fn default() -> Self {
        Self {
            max_unavailable: "1".into(),
        }
    }
}

/// How MIG devices are exposed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MigStrategy {
    /// MIG devices are not exposed; whole GPUs only.
    None,
    /// Every GPU of a node has the same MIG layout; MIG devices are `nvidia.com/gpu`.
    #[default]
    Single,
    /// Each MIG profile is its own resource, e.g. `nvidia.com/mig-1g.10gb`.
    Mixed,
}

impl MigStrategy {
    pub const ALL: [MigStrategy; 3] = [MigStrategy::None, MigStrategy::Single, MigStrategy::Mixed];

    pub fn as_str(self) -> &'static str {
        match self {
            MigStrategy::None => "none",
            MigStrategy::Single => "single",
            MigStrategy::Mixed => "mixed",
        }
    }

    pub fn parse(s: &str) -> Option<MigStrategy> {
        MigStrategy::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// MIG settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct MigSpec {
    /// How MIG devices are exposed: none, single or mixed.
    pub strategy: MigStrategy,
}

/// Container Device Interface settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct CdiSpec {
    /// Generate CDI specs and let the device plugin hand out CDI devices.
    pub enabled: bool,
    /// Make CDI the default way GPUs reach containers.
    pub default: bool,
}

/// Host paths the operands mount.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct HostPathsSpec {
    /// The host's root filesystem.
    #[serde(rename = "rootFS")]
    #[schemars(length(max = 4096))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')", "message": "rootFS must be an absolute path without '..' elements"}]))]
    pub root_fs: String,
    /// Where the driver container installs the driver on the host.
    #[schemars(length(max = 4096))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')", "message": "driverInstallDir must be an absolute path without '..' elements"}]))]
    pub driver_install_dir: String,
}

impl Default for HostPathsSpec {
    fn default() -> Self {
        Self {
            root_fs: "/".into(),
            driver_install_dir: "/run/nvidia/driver".into(),
        }
    }
}

impl ClusterPolicySpec {
    /// The spec of one operand, seen through the fields all operands share.
    pub fn operand(&self, component: Component) -> &dyn OperandSpec {
        match component {
            Component::ContainerToolkit => &self.toolkit,
            Component::Driver => &self.driver,
            Component::OperatorValidator => &self.validator,
            Component::DevicePlugin => &self.device_plugin,
            Component::GpuFeatureDiscovery => &self.gfd,
            Component::DcgmExporter => &self.dcgm_exporter,
            Component::MigManager => &self.mig_manager,
        }
    }
}

/// Overall state of a policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PolicyState {
    /// Every GPU node is ready.
    Ready,
    /// Some GPU node is still moving through the stages, or stuck in one.
    NotReady,
    /// Another ClusterPolicy is the active one; this one does nothing.
    Ignored,
}

impl PolicyState {
    /// The wire spelling, e.g. `notReady`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyState::Ready => "ready",
            PolicyState::NotReady => "notReady",
            PolicyState::Ignored => "ignored",
        }
    }
}

/// One operand DaemonSet's state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ComponentState {
    /// Every pod it wants runs and is ready, on every node gated for it.
    Ready,
    /// Some pod is missing or not ready.
    NotReady,
    /// Turned off in the policy.
    #[default]
    Disabled,
}

/// What the controller observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterPolicyStatus {
    /// ready, notReady or ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<PolicyState>,
    /// The spec generation this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The namespace the operands run in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `Ready` and `Error`, with reasons.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// One entry per component.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentStatus>,
    /// How many GPU nodes are in each stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<StageCounts>,
    /// GPU nodes found.
    pub gpu_nodes: i32,
    /// GPU nodes in the ready stage.
    pub ready_nodes: i32,
    /// GPU nodes held in a stage by a failure, worst first (at most 20 are listed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stuck_nodes: Vec<StuckNode>,
}

/// A node that cannot move on, and why.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct StuckNode {
    pub name: String,
    /// The stage it is held in.
    pub stage: String,
    /// What holds it, e.g. `driver pod: ImagePullBackOff`.
    pub reason: String,
}

/// One component's state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ComponentStatus {
    /// The spec field, e.g. `devicePlugin`.
    pub name: String,
    pub enabled: bool,
    pub state: ComponentState,
    /// Pods the DaemonSet wants.
    pub desired: i32,
    /// Pods ready.
    pub ready: i32,
}

/// Node counts per stage.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct StageCounts {
    pub toolkit: i32,
    pub driver: i32,
    pub driver_validation: i32,
    pub device_plugin: i32,
    pub plugin_validation: i32,
    pub ready: i32,
}

impl StageCounts {
    pub fn get(&self, stage: Stage) -> i32 {
        match stage {
            Stage::Toolkit => self.toolkit,
            Stage::Driver => self.driver,
            Stage::DriverValidation => self.driver_validation,
            Stage::DevicePlugin => self.device_plugin,
            Stage::PluginValidation => self.plugin_validation,
            Stage::Ready => self.ready,
        }
    }

    pub fn add(&mut self, stage: Stage, n: i32) {
        let slot = match stage {
            Stage::Toolkit => &mut self.toolkit,
            Stage::Driver => &mut self.driver,
            Stage::DriverValidation => &mut self.driver_validation,
            Stage::DevicePlugin => &mut self.device_plugin,
            Stage::PluginValidation => &mut self.plugin_validation,
            Stage::Ready => &mut self.ready,
        };
        *slot += n;
    }
}

#[cfg(test)]
mod tests;
