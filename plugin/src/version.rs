//! `kubectl gpu version`.
use crate::context::Global;

#[derive(Debug, clap::Args)]
pub struct VersionArgs {}

pub async fn run(_g: &Global, _a: VersionArgs) -> anyhow::Result<i32> {
    println!("kubectl-gpu v{}", env!("CARGO_PKG_VERSION"));
    Ok(0)
}
