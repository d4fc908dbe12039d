//! `kubectl-gpu`: the kubectl plugin admins use to install, inspect and fix gpu-pilot.

use clap::Parser;

fn main() {
    let cli = kubectl_gpu::cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let code = runtime.block_on(kubectl_gpu::cli::run(cli));
    std::process::exit(code);
}
