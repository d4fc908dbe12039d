//! The driver's settings beyond the image: NVIDIA's driver manager, probes, RDMA, the ConfigMaps
//! NVIDIA's operator mounts into the driver container, precompiled modules, and the upgrade
//! policy. The names and shapes are those of NVIDIA's `nvidia.com/v1` ClusterPolicy.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ImagePullPolicy, NameValue};

/// NVIDIA's `k8s-driver-manager`, the driver pod's init container: before a driver (re)installs
/// it moves GPU pods off the node and unloads the old driver.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct DriverManagerSpec {
    #[schemars(length(max = 512))]
    pub repository: String,
    #[schemars(length(max = 512))]
    pub image: String,
    #[schemars(length(max = 256))]
    pub version: String,
    pub image_pull_policy: ImagePullPolicy,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    /// Settings of the driver manager (`ENABLE_GPU_POD_EVICTION`, `ENABLE_AUTO_DRAIN`, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<NameValue>,
}

impl Default for DriverManagerSpec {
    fn default() -> Self {
        Self {
            repository: "nvcr.io/nvidia/cloud-native".into(),
            image: "k8s-driver-manager".into(),
            version: "v0.8.1".into(),
            image_pull_policy: ImagePullPolicy::IfNotPresent,
            image_pull_secrets: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl DriverManagerSpec {
    /// The image reference, as for an operand.
    pub fn image_reference(&self) -> Option<String> {
        super::image_reference(&self.repository, &self.image, &self.version)
    }
}

/// A container probe's timing (the probe itself is fixed by what the container does).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerProbeSpec {
    #[schemars(range(min = 0))]
    pub initial_delay_seconds: i32,
    #[schemars(range(min = 1))]
    pub timeout_seconds: i32,
    #[schemars(range(min = 1))]
    pub period_seconds: i32,
    #[schemars(range(min = 1))]
    pub success_threshold: i32,
    #[schemars(range(min = 1))]
    pub failure_threshold: i32,
}

impl Default for ContainerProbeSpec {
    /// Kubernetes' own defaults.
    fn default() -> Self {
        Self {
            initial_delay_seconds: 0,
            timeout_seconds: 1,
            period_seconds: 10,
            success_threshold: 1,
            failure_threshold: 3,
        }
    }
}

impl ContainerProbeSpec {
    /// NVIDIA's startup probe of the driver container: building and loading a driver takes
    /// minutes, and `nvidia-smi` can take longer than 30 s.
    pub fn driver_startup() -> Self {
        Self {
            initial_delay_seconds: 60,
            timeout_seconds: 60,
            period_seconds: 10,
            success_threshold: 1,
            failure_threshold: 120,
        }
    }
}

/// GPUDirect RDMA: the driver pod also loads `nvidia-peermem`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct GpuDirectRdmaSpec {
    pub enabled: bool,
    /// Use the MOFED driver installed on the host rather than one from NVIDIA's network
    /// operator (`/run/mellanox/drivers`).
    pub use_host_mofed: bool,
}

/// A ConfigMap with package repository files for the driver container (a private mirror).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct DriverRepoConfigSpec {
    #[schemars(length(max = 253))]
    pub config_map_name: String,
}

/// A ConfigMap with CA certificates the driver container trusts (a private mirror's TLS).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct DriverCertConfigSpec {
    #[schemars(length(max = 253))]
    pub name: String,
}

/// vGPU guest licensing: a ConfigMap with `gridd.conf` (and `client_configuration_token.tok`
/// when the NVIDIA Licensing System is used).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct DriverLicensingConfigSpec {
    #[schemars(length(max = 253))]
    pub config_map_name: String,
    /// Mount the NLS client token too.
    pub nls_enabled: bool,
}

impl Default for DriverLicensingConfigSpec {
    fn default() -> Self {
        Self {
            config_map_name: String::new(),
            nls_enabled: true,
        }
    }
}

/// vGPU guest topology daemon: a ConfigMap with `virtual-topology.conf`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualTopologyConfigSpec {
    #[schemars(length(max = 253))]
    pub config: String,
}

/// A ConfigMap with kernel module parameters (`nvidia.conf`, `nvidia-uvm.conf`, ...).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct KernelModuleConfigSpec {
    #[schemars(length(max = 253))]
    pub name: String,
}

/// How the driver is upgraded across nodes (NVIDIA's `upgradePolicy`). Accepted and kept; the
/// driver upgrade flow that reads it is separate work.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DriverUpgradePolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_upgrade: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_parallel_upgrades: Option<i32>,
    /// A number of nodes or a percentage, e.g. `25%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_deletion: Option<PodDeletionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_completion: Option<WaitForCompletionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDeletionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_empty_dir: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaitForCompletionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub timeout_seconds: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_empty_dir: Option<bool>,
}

/// NFD's labels NVIDIA's operator reads to pick the driver image.
pub mod nfd {
    pub const OS_RELEASE_ID: &str = "feature.node.kubernetes.io/system-os_release.ID";
    pub const OS_VERSION_ID: &str = "feature.node.kubernetes.io/system-os_release.VERSION_ID";
    pub const KERNEL_VERSION_FULL: &str = "feature.node.kubernetes.io/kernel-version.full";
}

/// What the driver image of a node depends on: its OS (`ubuntu22.04`, NVIDIA's tag suffix) and,
/// for precompiled drivers, its kernel.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DriverTarget {
    pub os: String,
    /// Only set for precompiled drivers.
    pub kernel: Option<String>,
}

impl DriverTarget {
    /// NVIDIA's OS tag of a node, from NFD's labels (as NVIDIA's operator reads it) or else the
    /// kubelet's `osImage` (`Ubuntu 22.04.5 LTS` -> `ubuntu22.04`; other distributions need NFD).
    pub fn os_of(
        labels: &std::collections::BTreeMap<String, String>,
        os_image: Option<&str>,
    ) -> Option<String> {
        if let (Some(id), Some(version)) = (
            labels.get(nfd::OS_RELEASE_ID),
            labels.get(nfd::OS_VERSION_ID),
        ) {
            return Some(format!("{id}{version}"));
        }
        let image = os_image?;
        let mut words = image.split_whitespace();
        match (words.next()?, words.next()?) {
            ("Ubuntu", version) => {
                let mut parts = version.split('.');
                Some(format!("ubuntu{}.{}", parts.next()?, parts.next()?))
            }
            _ => None,
        }
    }

    /// A node's kernel, from NFD's label or else the kubelet's `kernelVersion` (both are
    /// `uname -r`).
    pub fn kernel_of(
        labels: &std::collections::BTreeMap<String, String>,
        kernel_version: Option<&str>,
    ) -> Option<String> {
        labels
            .get(nfd::KERNEL_VERSION_FULL)
            .cloned()
            .or_else(|| kernel_version.map(str::to_string))
    }

    /// The suffix of the DaemonSet that serves these nodes (`ubuntu22.04`,
    /// `5.15.0-105-generic-ubuntu22.04`), a valid part of a name.
    pub fn name_suffix(&self) -> String {
        let raw = match &self.kernel {
            Some(k) => format!("{k}-{}", self.os),
            None => self.os.clone(),
        };
        raw.to_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .trim_matches(|c| c == '-' || c == '.')
            .to_string()
    }
}

/// The driver image for `target`, as NVIDIA's operator derives it: the version tag gets the OS
/// (`580.82.07-ubuntu22.04`); a precompiled driver's version is the driver branch and gets the
/// kernel too (`580-5.15.0-105-generic-ubuntu22.04`); a digest is used as it is.
pub fn driver_image(
    repository: &str,
    image: &str,
    version: &str,
    precompiled: bool,
    target: &DriverTarget,
) -> Option<String> {
    let base = if precompiled {
        let kernel = target.kernel.as_deref()?;
        if repository.is_empty() && version.is_empty() {
            // NVIDIA's: image holds path:branch (what tools such as kbld write).
            (!image.is_empty()).then(|| format!("{image}-{kernel}"))?
        } else {
            let path = if repository.is_empty() {
                image.to_string()
            } else {
                format!("{}/{image}", repository.trim_end_matches('/'))
            };
            format!("{path}:{version}-{kernel}")
        }
    } else {
        super::image_reference(repository, image, version)?
    };
    if base.contains("sha256:") {
        Some(base)
    } else {
        Some(format!("{base}-{}", target.os))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_os_tag_comes_from_nfd_or_the_kubelet() {
        let nfd = labels(&[(nfd::OS_RELEASE_ID, "rhcos"), (nfd::OS_VERSION_ID, "4.14")]);
        assert_eq!(
            DriverTarget::os_of(&nfd, Some("Ubuntu 22.04.5 LTS")).as_deref(),
            Some("rhcos4.14")
        );
        assert_eq!(
            DriverTarget::os_of(&BTreeMap::new(), Some("Ubuntu 22.04.5 LTS")).as_deref(),
            Some("ubuntu22.04")
        );
        assert_eq!(
            DriverTarget::os_of(&BTreeMap::new(), Some("Debian GNU/Linux 12 (bookworm)")),
            None
        );
        assert_eq!(
            DriverTarget::kernel_of(&BTreeMap::new(), Some("5.15.0-105-generic")).as_deref(),
            Some("5.15.0-105-generic")
        );
    }

    #[test]
    fn driver_tags_are_nvidias() {
        let t = DriverTarget {
            os: "ubuntu22.04".into(),
            kernel: None,
        };
        assert_eq!(
            driver_image("nvcr.io/nvidia", "driver", "580.82.07", false, &t).as_deref(),
            Some("nvcr.io/nvidia/driver:580.82.07-ubuntu22.04")
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            driver_image("nvcr.io/nvidia", "driver", &digest, false, &t),
            Some(format!("nvcr.io/nvidia/driver@{digest}"))
        );
        let p = DriverTarget {
            os: "ubuntu22.04".into(),
            kernel: Some("5.15.0-105-generic".into()),
        };
        assert_eq!(
            driver_image("nvcr.io/nvidia", "driver", "580", true, &p).as_deref(),
            Some("nvcr.io/nvidia/driver:580-5.15.0-105-generic-ubuntu22.04")
        );
        assert_eq!(
            driver_image("", "my.registry/driver:580", "", true, &p).as_deref(),
            Some("my.registry/driver:580-5.15.0-105-generic-ubuntu22.04")
        );
        assert_eq!(
            driver_image("nvcr.io/nvidia", "driver", "580", true, &t),
            None,
            "precompiled needs a kernel"
        );
        assert_eq!(p.name_suffix(), "5.15.0-105-generic-ubuntu22.04");
    }
}
