//! The command line: global options, the commands and their help with examples.

use std::io::Write;

use clap::{CommandFactory, Parser, Subcommand};

use crate::global::Global;

#[derive(Parser)]
#[command(
    name = "kubectl-gpu",
    bin_name = "kubectl gpu",
    version,
    about = "Run NVIDIA GPUs on Kubernetes with gpu-pilot: install it, see its state, find out what is wrong",
    after_help = "Examples:
  kubectl gpu install --set mig.strategy=mixed      install (or upgrade) and watch the rollout
  kubectl gpu status                                policy state and nodes per stage
  kubectl gpu doctor                                what is wrong, and how to fix it
  kubectl gpu mig set all-1g.10gb --nodes pool=a100  change the MIG layout of some nodes
  kubectl gpu migrate --dry-run                     take over from NVIDIA's GPU Operator (plan only)",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Install or upgrade gpu-pilot: CRD, controller, webhook and the ClusterPolicy.
    Install(crate::install::InstallArgs),
    /// Remove everything install created, and gpu-pilot's labels on nodes.
    Uninstall(crate::uninstall::UninstallArgs),
    /// The policy's state, its components and how many nodes are in each stage.
    Status(crate::status::StatusArgs),
    /// Check the cluster for everything that keeps GPUs from working, and say how to fix it.
    Doctor(crate::doctor::DoctorArgs),
    /// Move from NVIDIA's GPU Operator: its settings as gpu-pilot values, and a takeover that
    /// leaves running GPU pods alone.
    Migrate(crate::migrate::MigrateArgs),
    /// MIG layouts on nodes.
    #[command(subcommand)]
    Mig(crate::mig::MigCommand),
    /// Versions of the plugin, the controller and the CRD in the cluster.
    Version(crate::version::VersionArgs),
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  kubectl gpu completion bash > ~/.local/share/bash-completion/completions/kubectl-gpu
  kubectl gpu completion zsh > \"${fpath[1]}/_kubectl-gpu\"
  kubectl gpu completion fish > ~/.config/fish/completions/kubectl-gpu.fish")]
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the JSON schema of the install values (charts/gpu-pilot/values.schema.json).
    #[command(hide = true)]
    ValuesSchema,
    /// Print a CEL expression the chart reads from files/cel/ (gpu-pod or keep-on-update).
    #[command(hide = true)]
    Cel { which: String },
    /// Print the values the chart refuses when true (charts/gpu-pilot/files/refused.yaml).
    #[command(hide = true)]
    RefusedKeys,
    /// Print the table of what each key of NVIDIA's chart values does (docs/nvidia-values.md),
    /// from NVIDIA's values.yaml.
    #[command(hide = true)]
    NvidiaKeys { nvidia_values: std::path::PathBuf },
}

/// Run a command; the result is the process exit code.
pub async fn run(cli: Cli) -> i32 {
    let g = cli.global;
    let result = match cli.command {
        Command::Install(a) => crate::install::run(&g, a).await,
        Command::Uninstall(a) => crate::uninstall::run(&g, a).await,
        Command::Status(a) => crate::status::run(&g, a).await,
        Command::Doctor(a) => crate::doctor::run(&g, a).await,
        Command::Mig(a) => crate::mig::run(&g, a).await,
        Command::Migrate(a) => crate::migrate::run(&g, a).await,
        Command::Version(a) => crate::version::run(&g, a).await,
        Command::Completion { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "kubectl-gpu", &mut std::io::stdout());
            Ok(0)
        }
        Command::Cel { which } => match gpu_pilot_core::render::install::chart_cel(&which) {
            Some(text) => {
                println!("{text}");
                Ok(0)
            }
            None => Err(anyhow::anyhow!(
                "no CEL expression {which:?}; use gpu-pod or keep-on-update"
            )),
        },
        Command::RefusedKeys => {
            print!("{}", gpu_pilot_core::values::nvidia::refusals_yaml());
            Ok(0)
        }
        Command::NvidiaKeys { nvidia_values } => {
            gpu_pilot_core::values::nvidia::read_values_file(&nvidia_values)
                .map_err(|e| anyhow::anyhow!(e))
                .map(|v| {
                    print!(
                        "{}",
                        gpu_pilot_core::values::nvidia::markdown(
                            &v,
                            &gpu_pilot_core::values::nvidia::module_of(&nvidia_values)
                        )
                    );
                    0
                })
        }
        Command::ValuesSchema => {
            let text = serde_json::to_string_pretty(&gpu_pilot_core::values::schema())
                .expect("the schema serializes");
            println!("{text}");
            Ok(0)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("error: {e:#}");
            1
        }
    }
}
