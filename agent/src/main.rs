//! `gpu-pilot-agent`: the one gpu-pilot process on each GPU node.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "gpu-pilot-agent",
    version,
    about = "Node agent: kubelet device plugin, GPU feature labels, MIG manager, metrics and validation",
    arg_required_else_help = true
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
