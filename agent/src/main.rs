//! `gpu-pilot-agent`: the one gpu-pilot process on each GPU node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};
use gpu_pilot_agent::backend::{GpuBackend, NvmlBackend, SimulatedBackend};
use gpu_pilot_agent::health::HealthRules;
use gpu_pilot_agent::plugin::api::DEVICE_PLUGIN_PATH;
use gpu_pilot_agent::plugin::config::{MigStrategy, PluginConfig};
use gpu_pilot_agent::{agent, labels, metrics, node, podresources, validate};
use gpu_pilot_core::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "gpu-pilot-agent",
    version,
    about = "Node agent: kubelet device plugin, GPU feature labels, MIG manager, metrics and validation",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: device plugin, labels and MIG manager (with --node-name), metrics.
    Run(Box<RunArgs>),
    /// Print the GPUs, the labels and one metrics scrape as JSON; changes nothing.
    Discover(BackendArgs),
    /// Run one validation step and exit non-zero with what to fix when it fails.
    Validate {
        /// After a pass, keep running until stopped (the validator pod's main container, whose
        /// readiness tells the controller the step passed).
        #[arg(long, global = true)]
        hold: bool,
        #[command(subcommand)]
        step: Step,
    },
}

#[derive(Subcommand)]
enum Step {
    /// The driver is loaded and sees GPUs.
    Driver(BackendArgs),
    /// The NVIDIA container toolkit or a CDI spec is on the host.
    Toolkit {
        /// Where the host's root is mounted.
        #[arg(long, default_value = "/")]
        host_root: PathBuf,
    },
    /// The kubelet advertises the device plugin's resources on this Node.
    Plugin {
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
    },
}

#[derive(Args, Clone)]
struct BackendArgs {
    /// Use a simulated inventory (dgx-h100, a100-40gb, t4, or a file) instead of NVML.
    #[arg(long, env = "GPU_PILOT_SIMULATE")]
    simulate: Option<String>,
    /// How long a reported XID keeps a GPU unhealthy after it was last seen (NVML only; e.g.
    /// 5m; `--xid-hold-seconds` is the old spelling).
    #[arg(long, alias = "xid-hold-seconds", default_value = "5m", value_parser = gpu_pilot_core::duration::parse)]
    xid_hold: Duration,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// The Node this agent runs on; enables labels and the MIG manager.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Take the simulated inventory from the node's gpupilot.io/simulated-inventory label.
    #[arg(long)]
    simulate_from_node: bool,
    /// The kubelet's device-plugin directory (kubelet.sock lives there).
    #[arg(long, default_value = DEVICE_PLUGIN_PATH)]
    device_plugin_dir: PathBuf,
    /// Do not serve the kubelet device plugin.
    #[arg(long)]
    no_device_plugin: bool,
    /// Do not write GPU feature labels on the Node (another DaemonSet does).
    #[arg(long)]
    no_labels: bool,
    /// Do not act on nvidia.com/mig.config (another DaemonSet does).
    #[arg(long)]
    no_mig_manager: bool,
    /// NVIDIA device-plugin config (`version: v1`): a file, or a folder with one file per config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The config to use from --config's folder when the node has no nvidia.com/device-plugin.config label.
    #[arg(long)]
    config_default: Option<String>,
    /// Override the config's MIG strategy: none, single or mixed.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(MigStrategy::ALL.map(MigStrategy::as_str))
        .map(|s| MigStrategy::parse(&s).expect("one of the possible values")))]
    mig_strategy: Option<MigStrategy>,
    /// Hand devices to containers as CDI names too (CDI on in the policy).
    #[arg(long)]
    cdi: bool,
    /// XIDs to ignore on top of NVIDIA's defaults (13,31,43,45,68,109); `all` turns health checks off.
    #[arg(long, default_value = "")]
    ignore_xids: String,
    /// mig-parted `version: v1` config; without it every `all-<profile>` layout is offered.
    #[arg(long)]
    mig_config: Option<PathBuf>,
    /// Where to serve /metrics; `off` to disable.
    #[arg(long, default_value = "127.0.0.1:9400")]
    metrics_addr: String,
    /// The kubelet's pod-resources socket, for the pod/namespace/container labels of metrics; `off` to disable.
    #[arg(long, default_value = podresources::DEFAULT_SOCKET)]
    pod_resources_socket: String,
    /// How often GPU facts are read again (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = gpu_pilot_core::duration::parse)]
    poll: Duration,
    /// How often the agent's Node is read again (one GET; MIG and config label changes take up to
    /// this long to be seen).
    #[arg(long, default_value = "5s", value_parser = gpu_pilot_core::duration::parse)]
    node_poll: Duration,
    /// The old spelling of --poll, in milliseconds.
    #[arg(long, hide = true, conflicts_with = "poll")]
    poll_ms: Option<u64>,
    /// The old spelling of --node-poll, in milliseconds.
    #[arg(long, hide = true, conflicts_with = "node_poll")]
    node_poll_ms: Option<u64>,
    /// Log format (lines on standard error).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn open_backend(args: &BackendArgs) -> anyhow::Result<Arc<dyn GpuBackend>> {
    Ok(match &args.simulate {
        Some(name) => Arc::new(SimulatedBackend::open(name)?),
        None => Arc::new(NvmlBackend::open(args.xid_hold)?),
    })
}

fn hostname() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default()
}

async fn run(args: Box<RunArgs>) -> anyhow::Result<()> {
    let node = match &args.node_name {
        Some(name) => {
            let client = kube::Client::try_default().await.context(
                "connecting to the Kubernetes API (in a pod: the service account; outside: KUBECONFIG)",
            )?;
            Some(node::NodeClient::new(client, name))
        }
        None => None,
    };
    let mut backend_args = args.backend.clone();
    if args.simulate_from_node {
        let nc = node
            .as_ref()
            .context("--simulate-from-node needs --node-name")?;
        let n = nc.get().await?;
        let inv = node::label_of(&n, gpu_pilot_api::names::label::SIMULATED_INVENTORY)
            .with_context(|| {
                format!(
                    "Node {} has no label {}",
                    nc.name,
                    gpu_pilot_api::names::label::SIMULATED_INVENTORY
                )
            })?;
        backend_args.simulate = Some(inv.to_string());
    }
    let backend = match open_backend(&backend_args) {
        Ok(b) => b,
        Err(e) => {
            // No driver is a state to report, not a crash: keep serving metrics (empty) and wait.
            tracing::error!("{e}");
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                if let Ok(b) = open_backend(&backend_args) {
                    break b;
                }
            }
        }
    };
    tracing::info!("GPU facts from {}", backend.name());
    let metrics_addr = match args.metrics_addr.as_str() {
        "off" => None,
        a => Some(
            a.parse::<SocketAddr>()
                .with_context(|| format!("--metrics-addr '{a}' is not host:port"))?,
        ),
    };
    let settings = agent::Settings {
        device_plugin_dir: (!args.no_device_plugin).then_some(args.device_plugin_dir),
        plugin_config: args.config,
        plugin_config_default: args.config_default,
        mig_strategy: args.mig_strategy,
        cdi: args.cdi,
        health: HealthRules::with_extra(&args.ignore_xids)?,
        metrics_addr,
        pod_resources: match args.pod_resources_socket.as_str() {
            "off" => None,
            p => Some(PathBuf::from(p)),
        },
        node,
        labels: !args.no_labels,
        mig_manager: !args.no_mig_manager,
        mig_config: args.mig_config,
        poll: args.poll_ms.map_or(args.poll, Duration::from_millis),
        node_poll: args
            .node_poll_ms
            .map_or(args.node_poll, Duration::from_millis),
        hostname: args.node_name.clone().unwrap_or_else(hostname),
    };
    agent::run(backend, settings).await
}

fn discover(args: &BackendArgs) -> anyhow::Result<()> {
    let backend = open_backend(args)?;
    let inv = backend.inventory()?;
    let out = serde_json::json!({
        "backend": backend.name(),
        "inventory": inv,
        "labels": labels::labels(&inv, &PluginConfig::default()),
        "metrics": metrics::render(&inv, &hostname(), &podresources::GpuOwners::new()),
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Completes on SIGTERM or SIGINT. In a container the agent is PID 1, which the kernel spares
/// every signal it has no handler for: without this, stopping its pod waits out the grace period.
async fn terminated() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Sleeps until SIGTERM or SIGINT.
fn hold_until_signal() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    if let Ok(rt) = rt {
        rt.block_on(terminated());
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run(args) => args.log_format,
        _ => LogFormat::Text,
    };
    telemetry::init(log_format, "info");
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                rt.block_on(async {
                    tokio::select! {
                        r = run(args) => r,
                        () = terminated() => {
                            tracing::info!("stopping: SIGTERM or SIGINT");
                            Ok(())
                        }
                    }
                })
            }),
        Command::Discover(args) => discover(&args),
        Command::Validate { hold, step } => {
            let r: anyhow::Result<String> = match step {
                Step::Driver(b) => open_backend(&b)
                    .and_then(|b| validate::driver(b.as_ref()).map_err(anyhow::Error::from)),
                Step::Toolkit { host_root } => {
                    validate::toolkit(&host_root).map_err(anyhow::Error::from)
                }
                Step::Plugin { node_name } => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| {
                        rt.block_on(async {
                            let client = kube::Client::try_default()
                                .await
                                .context("connecting to the Kubernetes API")?;
                            let n = node::NodeClient::new(client, &node_name).get().await?;
                            Ok(validate::plugin(&n)?)
                        })
                    }),
            };
            r.map(|msg| {
                println!("{msg}");
                if hold {
                    hold_until_signal();
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu-pilot-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
