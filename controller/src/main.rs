//! `gpu-pilot-controller`: reconciles the `ClusterPolicy` and rolls the GPU stack out node by node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gpu_pilot_controller::run::{Options, run, shutdown_signal};
use gpu_pilot_core::telemetry::{self, LogFormat};

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
    /// Run the controller (in a pod, or outside the cluster with a kubeconfig).
    #[command(
        after_help = "Examples:\n  gpu-pilot-controller run                       # in-cluster\n  gpu-pilot-controller run --kubeconfig ~/.kube/config --namespace gpu-pilot --metrics-addr 127.0.0.1:8080"
    )]
    Run {
        /// Kubeconfig to use outside a cluster (default: in-cluster config, then $KUBECONFIG).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Kubeconfig context.
        #[arg(long)]
        context: Option<String>,
        /// Namespace the operands run in.
        #[arg(short, long, env = "POD_NAMESPACE", default_value = gpu_pilot_api::names::DEFAULT_NAMESPACE)]
        namespace: String,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, default_value = "0.0.0.0:8080")]
        metrics_addr: SocketAddr,
        /// Hold a Lease so only one replica writes (on by default; off for a single local process).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        leader_elect: bool,
        /// Identity in the Lease (default: the pod name, or host name and process id).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// How long a leader's Lease lasts without renewal (e.g. 15s).
        #[arg(long, default_value = "15s", value_parser = gpu_pilot_core::duration::parse)]
        lease_duration: Duration,
        /// Time between full passes when nothing changes (e.g. 30s; `--resync-seconds` is the
        /// old spelling).
        #[arg(long, alias = "resync-seconds", default_value = "30s", value_parser = gpu_pilot_core::duration::parse)]
        resync: Duration,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Print the controller's RBAC (ServiceAccount, ClusterRole, Role and bindings) as YAML.
    #[command(
        after_help = "Example:\n  gpu-pilot-controller rbac --namespace gpu-pilot | kubectl apply -f -"
    )]
    Rbac {
        /// Namespace the controller runs in.
        #[arg(short, long, default_value = gpu_pilot_api::names::DEFAULT_NAMESPACE)]
        namespace: String,
    },
    /// What the Helm chart's uninstall hooks run: pre-delete deletes the ClusterPolicy and waits
    /// until the controller has finalized it, then takes the agent's labels off the nodes;
    /// post-delete deletes what the controller and webhook made while they ran.
    #[command(
        after_help = "Examples (as the chart's hook Jobs run them):\n  gpu-pilot-controller uninstall-hook pre-delete --namespace gpu-pilot --timeout 3m\n  gpu-pilot-controller uninstall-hook post-delete --namespace gpu-pilot --timeout 1m --delete-crd"
    )]
    UninstallHook {
        /// When the hook runs.
        #[arg(value_enum)]
        stage: gpu_pilot_controller::uninstall::Stage,
        /// Kubeconfig to use outside a cluster (default: in-cluster config, then $KUBECONFIG).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Namespace gpu-pilot runs in.
        #[arg(short, long, env = "POD_NAMESPACE", default_value = gpu_pilot_api::names::DEFAULT_NAMESPACE)]
        namespace: String,
        /// The longest the stage waits (for the controller, then for pods to stop).
        #[arg(long, default_value = "3m", value_parser = gpu_pilot_core::duration::parse)]
        timeout: Duration,
        /// post-delete: delete the ClusterPolicy CRD too (the chart's operator.cleanupCRD).
        #[arg(long)]
        delete_crd: bool,
    },
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
            Ok(())
        }
        Command::Rbac { namespace } => {
            print!(
                "{}",
                gpu_pilot_core::render::controller_rbac::yaml(&namespace)
            );
            Ok(())
        }
        Command::UninstallHook {
            stage,
            kubeconfig,
            namespace,
            timeout,
            delete_crd,
        } => {
            let opts = gpu_pilot_controller::uninstall::HookOptions {
                namespace,
                timeout,
                delete_crd,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let client =
                        gpu_pilot_controller::run::client(kubeconfig.as_deref(), None).await?;
                    gpu_pilot_controller::uninstall::run(client, stage, &opts).await
                })
        }
        Command::Run {
            kubeconfig,
            context,
            namespace,
            metrics_addr,
            leader_elect,
            identity,
            lease_duration,
            resync,
            log_format,
        } => {
            telemetry::init(log_format, "info,kube_lease_manager=warn");
            let identity = identity.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            });
            let opts = Options {
                kubeconfig,
                context,
                namespace,
                metrics_addr,
                leader_elect,
                identity,
                lease_duration,
                resync,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(run(opts, shutdown_signal()))
        }
    }
}
