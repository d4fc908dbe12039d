//! `gpu-pilot-webhook`: admission webhooks for GPU pods and `ClusterPolicy` edits.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "gpu-pilot-webhook",
    version,
    about = "Admission webhooks: gives GPU pods their runtimeClass and MIG resources, guards ClusterPolicy edits",
    arg_required_else_help = true
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
