//! NVIDIA's GPU Operator, taken at test time from the Go module proxy and never copied into this
//! repository: its chart (`deployments/gpu-operator`: values.yaml, CRDs), its sample
//! ClusterPolicy (`config/samples/v1_clusterpolicy.yaml`) and its `assets/`. The version is
//! pinned once, in `scripts/nvidia-gpu-operator`, which downloads it (`go mod download`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::Context;

use crate::repo_root;

/// The module's folder in the Go module cache (downloaded on first use), or why it cannot be had.
pub fn gpu_operator_module() -> anyhow::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| download().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn download() -> anyhow::Result<PathBuf> {
    let script = repo_root().join("scripts/nvidia-gpu-operator");
    let out = Command::new(&script)
        .arg("module")
        .output()
        .with_context(|| format!("could not run {} (is bash installed?)", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "`scripts/nvidia-gpu-operator module` could not get NVIDIA's GPU Operator module (it needs \
         Go 1.26+ on PATH and the Go module proxy):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    for file in [
        "deployments/gpu-operator/values.yaml",
        "config/samples/v1_clusterpolicy.yaml",
        "deployments/gpu-operator/crds/nvidia.com_clusterpolicies.yaml",
    ] {
        anyhow::ensure!(
            dir.join(file).is_file(),
            "NVIDIA's module in {} has no {file}: NVIDIA moved it; pin another version in \
             scripts/nvidia-gpu-operator",
            dir.display()
        );
    }
    Ok(dir)
}

/// A file of the module, read as YAML into JSON.
pub fn read_yaml(relative: &str) -> anyhow::Result<serde_json::Value> {
    let path = gpu_operator_module()?.join(relative);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}
