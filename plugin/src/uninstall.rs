//! `kubectl gpu uninstall`.
use crate::context::Global;

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {}

pub async fn run(_g: &Global, _a: UninstallArgs) -> anyhow::Result<i32> {
    anyhow::bail!("not built yet")
}
