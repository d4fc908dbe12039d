//! `kubectl gpu status`.
use crate::context::Global;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {}

pub async fn run(_g: &Global, _a: StatusArgs) -> anyhow::Result<i32> {
    anyhow::bail!("not built yet")
}
