//! `kubectl gpu doctor`: every check, over one snapshot of the cluster.
//! (Being built: see the doctor work in progress.)

use crate::context::{Global, Kube};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  kubectl gpu doctor
  kubectl gpu doctor -o json | jq '.findings[] | select(.severity == \"error\")'
  kubectl gpu doctor --bundle gpu-support.tar.gz")]
pub struct DoctorArgs {
    /// Also write a support bundle (policy, nodes, operand pods, logs, events, findings).
    #[arg(long, value_name = "FILE.tar.gz")]
    pub bundle: Option<std::path::PathBuf>,
}

/// Run the doctor; the exit code is 0 healthy, 1 warnings, 2 errors.
pub async fn run(_g: &Global, _args: DoctorArgs) -> anyhow::Result<i32> {
    anyhow::bail!("doctor is not built yet")
}

/// The findings as text, for `install --wait` when the rollout is stuck.
pub async fn summary(_kube: &Kube, _namespace: &str) -> anyhow::Result<String> {
    anyhow::bail!("doctor is not built yet")
}
