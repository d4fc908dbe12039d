//! NVIDIA's GPU Operator, taken at test time from the Go module proxy and never copied into this
//! repository: its chart (`deployments/gpu-operator`: values.yaml, CRDs), its sample
//! ClusterPolicy (`config/samples/v1_clusterpolicy.yaml`) and its `assets/`. The version is
//! pinned once, in `kubectl_gpu::nvidia::NVIDIA_MODULE_VERSION`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::Context;
use kubectl_gpu::nvidia::{NVIDIA_MODULE, NVIDIA_MODULE_VERSION};

/// The module's folder in the Go module cache (downloaded on first use), or why it cannot be had.
pub fn gpu_operator_module() -> anyhow::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| download().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn download() -> anyhow::Result<PathBuf> {
    let module = format!("{NVIDIA_MODULE}@{NVIDIA_MODULE_VERSION}");
    // Outside any go.mod, so no module of ours takes part.
    let scratch = tempfile::tempdir()?;
    let out = Command::new("go")
        .args(["mod", "download", "-json", &module])
        .current_dir(scratch.path())
        .output()
        .context(
            "could not run `go` to download NVIDIA's GPU Operator module: install Go 1.26+ \
             (see the README's set-up table) and put it on PATH",
        )?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "`go mod download -json {module}` failed (it needs the Go module proxy, \
         https://proxy.golang.org or $GOPROXY):\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("`go mod download -json {module}` printed no JSON: {text}"))?;
    let dir = info["Dir"]
        .as_str()
        .with_context(|| format!("`go mod download -json {module}` names no Dir: {text}"))?;
    let dir = PathBuf::from(dir);
    for file in [
        "deployments/gpu-operator/values.yaml",
        "config/samples/v1_clusterpolicy.yaml",
        "deployments/gpu-operator/crds/nvidia.com_clusterpolicies.yaml",
    ] {
        anyhow::ensure!(
            dir.join(file).is_file(),
            "{module} has no {file} (in {}): NVIDIA moved it; pin another version in \
             kubectl_gpu::nvidia::NVIDIA_MODULE_VERSION",
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
