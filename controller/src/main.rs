//! `gpu-pilot-controller`: reconciles the `ClusterPolicy` and rolls the GPU stack out node by node.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "gpu-pilot-controller",
    version,
    about = "Reconciles gpu-pilot's ClusterPolicy and moves every GPU node through the stages"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the ClusterPolicy CustomResourceDefinition generated from the Rust types.
    #[command(
        after_help = "Example:\n  gpu-pilot-controller crd > charts/gpu-pilot/crds/clusterpolicies.gpupilot.io.yaml\n  gpu-pilot-controller crd | kubectl apply --server-side -f -"
    )]
    Crd {
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { output } => {
            let yaml = gpu_pilot_api::crd_yaml();
            match output {
                Some(path) => std::fs::write(&path, yaml)
                    .with_context(|| format!("could not write the CRD to {}", path.display()))?,
                None => print!("{yaml}"),
            }
        }
    }
    Ok(())
}
