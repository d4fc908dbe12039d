//! `gpu-pilot-agent validate driver|toolkit|plugin`: the checks the controller's validator pods
//! run. Each returns a line that says what was found, or an error that says what to do.

use std::path::{Path, PathBuf};

use gpu_pilot_api::names::resource;
use k8s_openapi::api::core::v1::Node;

use crate::backend::{BackendError, GpuBackend};

/// Why a validation step failed; each says what to check or do.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(
        "the NVIDIA driver {driver_version} is loaded but sees no GPU: check `lspci -d 10de:` and \
         dmesg for NVRM errors"
    )]
    NoGpu { driver_version: String },
    #[error(
        "no NVIDIA container toolkit under {}: neither nvidia-container-runtime/nvidia-ctk nor a \
         CDI spec (/etc/cdi/nvidia.yaml, /var/run/cdi/nvidia.yaml). Enable gpu-pilot's toolkit \
         stage, or install nvidia-container-toolkit and run `nvidia-ctk cdi generate`",
        host_root.display()
    )]
    NoToolkit { host_root: PathBuf },
    #[error(
        "Node {node} advertises no nvidia.com/* resource: the device plugin has not registered \
         with the kubelet. Check the agent's log on that node and that \
         /var/lib/kubelet/device-plugins is mounted into it"
    )]
    NoGpuResources { node: String },
}

/// The driver sees at least one GPU; says which.
pub fn driver(backend: &dyn GpuBackend) -> Result<String, ValidationError> {
    let inv = backend.inventory()?;
    if inv.gpus.is_empty() {
        return Err(ValidationError::NoGpu {
            driver_version: inv.driver_version,
        });
    }
    Ok(format!(
        "driver {} (CUDA {}) sees {} GPU(s): {}",
        inv.driver_version,
        inv.cuda_version,
        inv.gpus.len(),
        inv.gpus
            .iter()
            .map(|g| format!("{} {}", g.index, g.model.product))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// Looks under `host_root` for the NVIDIA container runtime or a CDI spec for NVIDIA devices.
pub fn toolkit(host_root: &Path) -> Result<String, ValidationError> {
    let runtimes = [
        "usr/bin/nvidia-container-runtime",
        "usr/local/nvidia/toolkit/nvidia-container-runtime",
        "usr/bin/nvidia-ctk",
        "usr/local/nvidia/toolkit/nvidia-ctk",
    ];
    let cdi = [
        "etc/cdi/nvidia.yaml",
        "var/run/cdi/nvidia.yaml",
        "etc/cdi/nvidia.json",
        "var/run/cdi/nvidia.json",
    ];
    let found: Vec<_> = runtimes
        .iter()
        .chain(cdi.iter())
        .map(|p| host_root.join(p))
        .filter(|p| p.exists())
        .collect();
    if found.is_empty() {
        return Err(ValidationError::NoToolkit {
            host_root: host_root.to_path_buf(),
        });
    }
    Ok(format!(
        "container toolkit found: {}",
        found
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The kubelet has taken the device plugin's resources into the node's allocatable.
pub fn plugin(node: &Node) -> Result<String, ValidationError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let alloc = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.clone())
        .unwrap_or_default();
    let gpus: Vec<String> = alloc
        .iter()
        .filter(|(k, q)| resource::is_gpu_resource(k) && q.0 != "0")
        .map(|(k, q)| format!("{k}={}", q.0))
        .collect();
    if gpus.is_empty() {
        return Err(ValidationError::NoGpuResources { node: name });
    }
    Ok(format!("Node {name} advertises {}", gpus.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SimulatedBackend;

    #[test]
    fn driver_reports_the_gpus() {
        let b = SimulatedBackend::open("t4").unwrap();
        assert!(driver(&b).unwrap().contains("1 GPU(s): 0 Tesla T4"));
    }

    #[test]
    fn toolkit_missing_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let e = toolkit(dir.path()).unwrap_err().to_string();
        assert!(e.contains("nvidia-ctk cdi generate"), "{e}");
        std::fs::create_dir_all(dir.path().join("etc/cdi")).unwrap();
        std::fs::write(dir.path().join("etc/cdi/nvidia.yaml"), "").unwrap();
        assert!(toolkit(dir.path()).is_ok());
    }

    #[test]
    fn plugin_needs_allocatable_gpus() {
        let mut n = Node::default();
        assert!(plugin(&n).is_err());
        let mut alloc = std::collections::BTreeMap::new();
        alloc.insert(
            "nvidia.com/gpu".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("8".into()),
        );
        n.status = Some(k8s_openapi::api::core::v1::NodeStatus {
            allocatable: Some(alloc),
            ..Default::default()
        });
        assert!(plugin(&n).unwrap().contains("nvidia.com/gpu=8"));
    }
}
