//! Options every command shares: which cluster, gpu-pilot's namespace, output and colour.

use std::io::IsTerminal;
use std::path::PathBuf;

pub use crate::ui::{ColorChoice, Output};

/// Options every command shares.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// gpu-pilot's namespace.
    #[arg(short = 'n', long, global = true, default_value = gpu_pilot_api::names::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Output format, for commands that print data.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    /// Colour: auto (only on a terminal), always or never.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub color: ColorChoice,
}

impl Global {
    /// Whether to colour standard output.
    pub fn colour(&self) -> bool {
        match self.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal()
            }
        }
    }
}
