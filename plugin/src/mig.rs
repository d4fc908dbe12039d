//! `kubectl gpu mig`.
use crate::context::Global;

#[derive(Debug, clap::Subcommand)]
pub enum MigCommand {
    /// Set a MIG layout.
    Set {},
}

pub async fn run(_g: &Global, _a: MigCommand) -> anyhow::Result<i32> {
    anyhow::bail!("not built yet")
}
