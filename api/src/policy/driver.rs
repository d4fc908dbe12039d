//! The driver's settings beyond the image: NVIDIA's driver manager, probes, RDMA, the ConfigMaps
//! NVIDIA's operator mounts into the driver container, precompiled modules, and the upgrade
//! policy. The names and shapes are those of NVIDIA's `nvidia.com/v1` ClusterPolicy.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ImagePullPolicy, NameValue, bounds};

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
    #[schemars(length(max = bounds::MAX_ITEMS), inner(length(max = 253), pattern(bounds::DNS_SUBDOMAIN)))]
    pub image_pull_secrets: Vec<String>,
    /// Settings of the driver manager (`ENABLE_GPU_POD_EVICTION`, `ENABLE_AUTO_DRAIN`, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = bounds::MAX_ITEMS))]
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

/// The longest a probe waits, an upgrade step waits or a probe counts: a day.
const MAX_SECONDS: i32 = 86_400;

/// A container probe's timing (the probe itself is fixed by what the container does).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ContainerProbeSpec {
    #[schemars(range(min = 0, max = MAX_SECONDS))]
    pub initial_delay_seconds: i32,
    #[schemars(range(min = 1, max = MAX_SECONDS))]
    pub timeout_seconds: i32,
    #[schemars(range(min = 1, max = MAX_SECONDS))]
    pub period_seconds: i32,
    #[schemars(range(min = 1, max = MAX_SECONDS))]
    pub success_threshold: i32,
    #[schemars(range(min = 1, max = MAX_SECONDS))]
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
    #[schemars(range(min = 0, max = 100_000))]
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
    #[schemars(range(min = 0, max = MAX_SECONDS))]
    pub timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_empty_dir: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WaitForCompletionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub pod_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_SECONDS))]
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
    #[schemars(length(max = 4096))]
    pub pod_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_SECONDS))]
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

/// One ConfigMap mounted into the driver container, file by file (`subPath`), so the image's own
/// files in the same folder stay visible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMount {
    /// The pod's volume name.
    pub volume: String,
    pub config_map: String,
    /// (key, mount path) of each file.
    pub files: Vec<(String, String)>,
}

/// Where package repository files go on `os` (NVIDIA's RepoConfigPathMap, plus Debian and SUSE).
pub fn repo_config_dir(os_id: &str) -> Option<&'static str> {
    Some(match os_id {
        "ubuntu" | "debian" => "/etc/apt/sources.list.d",
        "centos" | "rhel" | "rhcos" | "rocky" | "almalinux" => "/etc/yum.repos.d",
        "sles" | "sl-micro" => "/etc/zypp/repos.d",
        _ => return None,
    })
}

/// Where CA certificates go on `os` (NVIDIA's CertConfigPathMap, plus Debian).
pub fn cert_config_dir(os_id: &str) -> Option<&'static str> {
    Some(match os_id {
        "ubuntu" | "debian" => "/usr/local/share/ca-certificates",
        "centos" | "rhel" | "rhcos" | "rocky" | "almalinux" => "/etc/pki/ca-trust/extracted/pem",
        _ => return None,
    })
}

/// The distribution of an OS tag (`ubuntu22.04` -> `ubuntu`).
pub fn os_id(os_tag: &str) -> &str {
    let end = os_tag
        .find(|c: char| c.is_ascii_digit())
        .unwrap_or(os_tag.len());
    &os_tag[..end]
}

/// The ConfigMaps the driver container mounts, where NVIDIA's operator mounts them: licensing
/// (`gridd.conf`, and the NLS client token when NLS is on) in `/drivers`, the topology daemon's
/// file, kernel module parameters in `/drivers`, and (not for precompiled drivers) package
/// repositories and CA certificates in the distribution's folders. `keys` holds the keys of the
/// ConfigMaps that are mounted file by file; a ConfigMap missing from it mounts nothing (the
/// controller reports it). Errors name what cannot be placed.
pub fn config_mounts(
    driver: &super::DriverSpec,
    os_id: &str,
    keys: &std::collections::BTreeMap<String, Vec<String>>,
) -> (Vec<ConfigMount>, Vec<String>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let each_key = |volume: &str, cm: &str, dir: &str| {
        keys.get(cm).map(|ks| ConfigMount {
            volume: volume.into(),
            config_map: cm.into(),
            files: ks
                .iter()
                .map(|k| (k.clone(), format!("{dir}/{k}")))
                .collect(),
        })
    };
    let lic = &driver.licensing_config;
    if !lic.config_map_name.is_empty() {
        let mut files = vec![("gridd.conf".to_string(), "/drivers/gridd.conf".to_string())];
        if lic.nls_enabled {
            files.push((
                "client_configuration_token.tok".into(),
                "/drivers/ClientConfigToken/client_configuration_token.tok".into(),
            ));
        }
        out.push(ConfigMount {
            volume: "licensing-config".into(),
            config_map: lic.config_map_name.clone(),
            files,
        });
    }
    if !driver.virtual_topology.config.is_empty() {
        out.push(ConfigMount {
            volume: "topology-config".into(),
            config_map: driver.virtual_topology.config.clone(),
            files: vec![(
                "nvidia-topologyd.conf".into(),
                "/etc/nvidia/nvidia-topologyd.conf".into(),
            )],
        });
    }
    if !driver.kernel_module_config.name.is_empty() {
        out.extend(each_key(
            "kernel-module-config",
            &driver.kernel_module_config.name,
            "/drivers",
        ));
    }
    if !driver.use_precompiled {
        if !driver.repo_config.config_map_name.is_empty() {
            match repo_config_dir(os_id) {
                Some(dir) => out.extend(each_key(
                    "repo-config",
                    &driver.repo_config.config_map_name,
                    dir,
                )),
                None => errors.push(format!(
                    "driver.repoConfig: no known folder for package repositories on {os_id}"
                )),
            }
        }
        if !driver.cert_config.name.is_empty() {
            match cert_config_dir(os_id) {
                Some(dir) => out.extend(each_key("cert-config", &driver.cert_config.name, dir)),
                None => errors.push(format!(
                    "driver.certConfig: no known folder for CA certificates on {os_id}"
                )),
            }
        }
    }
    (out, errors)
}

/// The driver manager's environment: NVIDIA's defaults, RDMA, then `driver.manager.env`.
pub fn driver_manager_env(driver: &super::DriverSpec) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("NVIDIA_VISIBLE_DEVICES", "void"),
        ("ENABLE_GPU_POD_EVICTION", "true"),
        ("ENABLE_AUTO_DRAIN", "false"),
        ("DRAIN_USE_FORCE", "false"),
        ("DRAIN_POD_SELECTOR_LABEL", ""),
        ("DRAIN_TIMEOUT_SECONDS", "0s"),
        ("DRAIN_DELETE_EMPTYDIR_DATA", "false"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut set = |k: &str, v: &str| match env.iter_mut().find(|(n, _)| n == k) {
        Some(e) => e.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    };
    if driver.rdma.enabled {
        set("GPU_DIRECT_RDMA_ENABLED", "true");
        if driver.rdma.use_host_mofed {
            set("USE_HOST_MOFED", "true");
        }
    }
    for e in &driver.manager.env {
        set(&e.name, &e.value);
    }
    env
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
    fn config_maps_mount_where_nvidias_operator_mounts_them() {
        let mut d = crate::policy::DriverSpec::default();
        d.licensing_config.config_map_name = "licensing".into();
        d.kernel_module_config.name = "kmod".into();
        d.repo_config.config_map_name = "repos".into();
        d.cert_config.name = "certs".into();
        let keys = BTreeMap::from([
            ("kmod".to_string(), vec!["nvidia.conf".to_string()]),
            ("repos".to_string(), vec!["mirror.list".to_string()]),
        ]);
        let (mounts, errors) = config_mounts(&d, "ubuntu", &keys);
        assert!(errors.is_empty());
        let files: Vec<(&str, &str)> = mounts
            .iter()
            .flat_map(|m| m.files.iter().map(|(k, p)| (k.as_str(), p.as_str())))
            .collect();
        assert!(files.contains(&("gridd.conf", "/drivers/gridd.conf")));
        assert!(files.contains(&(
            "client_configuration_token.tok",
            "/drivers/ClientConfigToken/client_configuration_token.tok"
        )));
        assert!(files.contains(&("nvidia.conf", "/drivers/nvidia.conf")));
        assert!(files.contains(&("mirror.list", "/etc/apt/sources.list.d/mirror.list")));
        assert!(
            !mounts.iter().any(|m| m.config_map == "certs"),
            "its keys are unknown"
        );
        let (_, errors) = config_mounts(&d, "plan9", &keys);
        assert_eq!(errors.len(), 2, "{errors:?}");
        d.use_precompiled = true;
        let (mounts, errors) = config_mounts(&d, "plan9", &keys);
        assert!(errors.is_empty() && !mounts.iter().any(|m| m.config_map == "repos"));
        assert_eq!(os_id("rhcos4.14"), "rhcos");
    }

    #[test]
    fn the_driver_manager_gets_nvidias_settings_and_the_admins() {
        let mut d = crate::policy::DriverSpec::default();
        d.rdma.enabled = true;
        d.manager.env = vec![crate::policy::NameValue {
            name: "ENABLE_AUTO_DRAIN".into(),
            value: "true".into(),
        }];
        let env = driver_manager_env(&d);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ENABLE_AUTO_DRAIN"), Some("true"));
        assert_eq!(get("ENABLE_GPU_POD_EVICTION"), Some("true"));
        assert_eq!(get("GPU_DIRECT_RDMA_ENABLED"), Some("true"));
        assert_eq!(get("USE_HOST_MOFED"), None);
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
