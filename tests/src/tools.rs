//! The Go tools and Rust build outputs the tests run (helm, krew, kubectl, release archives), and
//! running them with their output kept for the failure message.

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, ensure};

use crate::build_tools;

/// The tools folder with `helm` (and `kubectl`, `kubectl-krew`) in it, or how to get them.
pub fn tools_with(bins: &[&str]) -> anyhow::Result<PathBuf> {
    let tools = build_tools()?;
    for b in bins {
        ensure!(
            tools.join(b).is_file(),
            "{b} is missing from {}: scripts/build-tools builds it (helm from helm.sh/helm/v3, \
             kubectl-krew from sigs.k8s.io/krew, with `go install`); run scripts/build-tools and \
             look at its output",
            tools.display()
        );
    }
    Ok(tools)
}

/// `helm` with its cache, config and data folders in `home`, so no user setting takes part.
pub fn helm(tools: &Path, home: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(tools.join("helm"));
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG")
        .kill_on_drop(true);
    cmd
}

pub fn shown(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub async fn run_ok(cmd: &mut tokio::process::Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .await
        .with_context(|| format!("could not run {what}"))?;
    ensure!(out.status.success(), "{what} failed:\n{}", shown(&out));
    Ok(String::from_utf8(out.stdout)?)
}

/// cargo's target directory of this test binary (`<target>/debug/deps/e2e-...`).
pub fn cargo_target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .with_context(|| format!("no target directory above {}", exe.display()))
}
