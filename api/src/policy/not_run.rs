//! Sections of NVIDIA's ClusterPolicy that gpu-pilot accepts, keeps and does not run.
//!
//! Two kinds: operands whose job gpu-pilot does another way (a standalone DCGM hostengine, the
//! node status exporter), and the families gpu-pilot does not support at all (GPUs handed to
//! virtual machines: VFIO passthrough, vGPU, Kata, confidential computing). Every field is
//! optional and has no default, so a policy that does not mention them stores nothing, and one
//! taken from NVIDIA's operator keeps exactly what it said. A family that would run is refused
//! by the CRD (see [`unsupported`]); NVIDIA's defaults, which leave them off, pass silently.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ClusterPolicySpec, NameValue, NvidiaResources, bounds};

/// Declares a section with NVIDIA's common operand fields, all optional, plus its own.
macro_rules! nvidia_operand {
    (
        $(#[$doc:meta])*
        $name:ident
        $( { $( $(#[$fdoc:meta])* $(#[serde($($sattr:tt)*)])? $field:ident : $ty:ty ),* $(,)? } )?
    ) => {
        $(#[$doc])*
        #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub enabled: Option<bool>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(max = 512))]
            pub repository: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(max = 512))]
            pub image: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(max = 256))]
            pub version: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(max = 32))]
            pub image_pull_policy: Option<String>,
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = bounds::MAX_ITEMS), inner(length(max = 253)))]
            pub image_pull_secrets: Vec<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub resources: Option<NvidiaResources>,
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = bounds::MAX_ITEMS), inner(length(max = bounds::MAX_ARG)))]
            pub args: Vec<String>,
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = bounds::MAX_ITEMS))]
            pub env: Vec<NameValue>,
            $($(
                $(#[$fdoc])*
                #[serde(default, skip_serializing_if = "Option::is_none" $(, $($sattr)*)?)]
                pub $field: Option<$ty>,
            )*)?
        }

    };
}

nvidia_operand! {
    /// NVIDIA's standalone DCGM hostengine. gpu-pilot's dcgm-exporter runs DCGM embedded, as
    /// NVIDIA's does when this is off.
    DcgmSpec {
        /// The hostengine's port on the host.
        #[schemars(range(min = 1, max = 65535))]
        host_port: i32,
    }
}

nvidia_operand! {
    /// NVIDIA's node status exporter (validation results as metrics). gpu-pilot reports each
    /// node's stage in the policy status, the `gpupilot.io/stage` label and the controller's
    /// metrics.
    NodeStatusExporterSpec
}

nvidia_operand! {
    /// The vGPU host driver (sandbox workloads).
    VgpuManagerSpec {
        driver_manager: NvidiaDriverManagerSpec,
    }
}

nvidia_operand! {
    /// Creates vGPU devices on the host (sandbox workloads).
    VgpuDeviceManagerSpec {
        config: VgpuDevicesConfigSpec,
    }
}

nvidia_operand! {
    /// Binds GPUs to vfio-pci for passthrough to VMs (sandbox workloads).
    VfioManagerSpec {
        driver_manager: NvidiaDriverManagerSpec,
    }
}

nvidia_operand! {
    /// KubeVirt's device plugin for passthrough and vGPU devices (sandbox workloads).
    SandboxDevicePluginSpec
}

nvidia_operand! {
    /// Kata Containers runtime classes and artifacts (sandbox workloads).
    KataManagerSpec {
        config: KataManagerConfig,
    }
}

nvidia_operand! {
    /// Confidential computing mode of the GPUs (sandbox workloads).
    CcManagerSpec {
        /// `on`, `off` or `devtools`.
        #[schemars(extend("enum" = ["on", "off", "devtools"]))]
        default_mode: String,
    }
}

/// NVIDIA's driver manager settings of the vGPU and VFIO managers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NvidiaDriverManagerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bounds::MAX_ITEMS), inner(length(max = 253)))]
    pub image_pull_secrets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bounds::MAX_ITEMS))]
    pub env: Vec<NameValue>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VgpuDevicesConfigSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub default: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KataManagerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub artifacts_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bounds::MAX_ITEMS))]
    pub runtime_classes: Vec<KataRuntimeClass>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KataRuntimeClass {
    #[serde(default)]
    #[schemars(length(max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::label_map")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<KataArtifacts>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KataArtifacts {
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub pull_secret: Option<String>,
}

/// NVIDIA's switch for GPUs handed to virtual machines.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWorkloadsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// `container`, `vm-passthrough` or `vm-vgpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["container", "vm-passthrough", "vm-vgpu"]))]
    pub default_workload: Option<String>,
}

/// PodSecurityPolicy, removed from Kubernetes in 1.25.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PspSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// NVIDIA's image for init containers of its operands (CUDA base image).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InitContainerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub image_pull_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bounds::MAX_ITEMS), inner(length(max = 253)))]
    pub image_pull_secrets: Vec<String>,
}

/// A family of NVIDIA GPU Operator features that gpu-pilot does not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// GPUs handed to virtual machines: `sandboxWorkloads` and the operands it switches on.
    SandboxWorkloads,
    /// NVIDIA's `NVIDIADriver` custom resource, one driver per node pool.
    NvidiaDriverCrd,
    /// Red Hat OpenShift: SecurityContextConstraints and the driver toolkit.
    OpenShift,
    /// Confidential computing (TDX/SEV-SNP node rules, the CC manager).
    ConfidentialComputing,
}

impl Family {
    /// What the family is, for messages and the documentation.
    pub fn describe(self) -> &'static str {
        match self {
            Family::SandboxWorkloads => {
                "sandbox workloads (GPUs handed to virtual machines: VFIO passthrough, vGPU, KubeVirt's device plugin, Kata Containers, confidential computing)"
            }
            Family::NvidiaDriverCrd => {
                "NVIDIA's NVIDIADriver custom resource (one driver per node pool)"
            }
            Family::OpenShift => {
                "Red Hat OpenShift (SecurityContextConstraints, the OpenShift driver toolkit)"
            }
            Family::ConfidentialComputing => {
                "confidential computing (NFD rules for TDX and SEV-SNP nodes, NVIDIA's CC manager)"
            }
        }
    }
}

/// The sandbox operands that are switched on, by spec field. As in NVIDIA's types, an
/// operand that does not say `enabled` is off (NVIDIA's chart writes `true` for some of them).
fn sandbox_operands_on(spec: &ClusterPolicySpec) -> Vec<&'static str> {
    [
        (
            "vfioManager",
            spec.vfio_manager.as_ref().and_then(|s| s.enabled),
        ),
        (
            "sandboxDevicePlugin",
            spec.sandbox_device_plugin.as_ref().and_then(|s| s.enabled),
        ),
        (
            "vgpuDeviceManager",
            spec.vgpu_device_manager.as_ref().and_then(|s| s.enabled),
        ),
        (
            "vgpuManager",
            spec.vgpu_manager.as_ref().and_then(|s| s.enabled),
        ),
        (
            "kataManager",
            spec.kata_manager.as_ref().and_then(|s| s.enabled),
        ),
        (
            "ccManager",
            spec.cc_manager.as_ref().and_then(|s| s.enabled),
        ),
    ]
    .into_iter()
    .filter(|(_, on)| *on == Some(true))
    .map(|(name, _)| name)
    .collect()
}

/// The refusal of `sandboxWorkloads.enabled=true` (the CRD's CEL rule says the same).
pub const SANDBOX_REFUSAL: &str = "sandboxWorkloads.enabled=true asks for sandbox workloads (GPUs handed to virtual machines: VFIO passthrough, vGPU, KubeVirt's device plugin, Kata Containers, confidential computing), which gpu-pilot does not support; set sandboxWorkloads.enabled=false (containers only)";
/// The refusal of `driver.useNvidiaDriverCRD=true` (the CRD's CEL rule says the same).
pub const DRIVER_CRD_REFUSAL: &str = "driver.useNvidiaDriverCRD=true (driver.nvidiaDriverCRD.enabled in NVIDIA's chart values) hands the driver to NVIDIA's NVIDIADriver custom resource (one driver per node pool), which gpu-pilot does not support; set it to false and configure the driver in the policy's driver section";

/// What in this spec asks for a family gpu-pilot does not run, as (family, field, message).
/// NVIDIA's operator runs the sandbox operands only with `sandboxWorkloads.enabled`, so their own
/// `enabled` (which NVIDIA's chart sets for some) is refused only together with it. The CRD's CEL
/// rules refuse the same, so a policy applied without the plugin is refused too.
pub fn unsupported(spec: &ClusterPolicySpec) -> Vec<(Family, &'static str, String)> {
    let mut out = Vec::new();
    if spec
        .sandbox_workloads
        .as_ref()
        .and_then(|s| s.enabled)
        .unwrap_or(false)
    {
        let running = sandbox_operands_on(spec);
        let mut message = SANDBOX_REFUSAL.to_string();
        if !running.is_empty() {
            message.push_str(&format!(
                " (NVIDIA's operator would run {})",
                running.join(", ")
            ));
        }
        out.push((
            Family::SandboxWorkloads,
            "sandboxWorkloads.enabled",
            message,
        ));
    }
    if spec.driver.use_nvidia_driver_crd == Some(true) {
        out.push((
            Family::NvidiaDriverCrd,
            "driver.useNvidiaDriverCRD",
            DRIVER_CRD_REFUSAL.to_string(),
        ));
    }
    out
}

/// Sections of the spec that NVIDIA's operator would run but that do nothing here while their
/// family is off, as (field, why): shown as warnings, never errors.
pub fn inert(spec: &ClusterPolicySpec) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    let sandbox_on = spec
        .sandbox_workloads
        .as_ref()
        .and_then(|s| s.enabled)
        .unwrap_or(false);
    if !sandbox_on {
        for (field, set) in [
            (
                "kataManager.enabled",
                spec.kata_manager.as_ref().and_then(|s| s.enabled),
            ),
            (
                "ccManager.enabled",
                spec.cc_manager.as_ref().and_then(|s| s.enabled),
            ),
        ] {
            if set == Some(true) {
                out.push((
                    field,
                    "runs only with sandboxWorkloads.enabled in NVIDIA's operator too, and gpu-pilot does not support sandbox workloads",
                ));
            }
        }
    }
    if spec.dcgm.as_ref().and_then(|d| d.enabled) == Some(true) {
        out.push((
            "dcgm.enabled",
            "gpu-pilot runs no standalone DCGM hostengine: dcgm-exporter uses its embedded one (as NVIDIA's does when dcgm is off)",
        ));
    }
    if spec.node_status_exporter.as_ref().and_then(|d| d.enabled) == Some(true) {
        out.push((
            "nodeStatusExporter.enabled",
            "gpu-pilot runs no node status exporter: each node's stage is in the policy status, the gpupilot.io/stage label and the controller's metrics",
        ));
    }
    out
}
