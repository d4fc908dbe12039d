//! `kubectl-gpu`: the kubectl plugin admins use to install, inspect and fix gpu-pilot.

use clap::Parser;

fn main() {
    // Like other command-line tools, stop quietly when the reader of our output goes away
    // (`kubectl gpu status -o json | head`) instead of failing on a broken pipe.
    // SAFETY: called first thing, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = kubectl_gpu::cli::Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let code = runtime.block_on(kubectl_gpu::cli::run(cli));
    std::process::exit(code);
}
