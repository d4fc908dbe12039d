//! `kubectl-gpu`: the kubectl plugin admins use to install, inspect and fix gpu-pilot.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kubectl-gpu",
    bin_name = "kubectl gpu",
    version,
    about = "Run NVIDIA GPUs on Kubernetes with gpu-pilot"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the plugin's version and the ClusterPolicy API version it speaks.
    Version,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("kubectl-gpu v{}", gpu_pilot_api::policy::VERSION);
            println!("ClusterPolicy API {}/v1alpha1", gpu_pilot_api::names::GROUP);
        }
    }
}
