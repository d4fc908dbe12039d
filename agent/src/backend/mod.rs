//! Where GPU facts come from: NVML on a real node, an inventory file where no GPU exists.
//!
//! Both sit behind [`GpuBackend`]; the rest of the agent only ever sees an [`Inventory`].

mod nvml;
mod nvml_mig;
mod simulated;

pub use nvml::NvmlBackend;
pub use simulated::SimulatedBackend;

use crate::inventory::Inventory;
use crate::mig::MigPlan;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `libnvidia-ml.so.1` could not be loaded or NVML would not start: a normal state on a node
    /// whose driver is not (yet) installed.
    #[error(
        "no NVIDIA driver on this node: {0}. Install the NVIDIA driver (or let gpu-pilot's driver \
         stage install it), or run the agent with --simulate <inventory> where no GPU exists"
    )]
    NoDriver(String),
    #[error("NVML call {call} failed: {message}")]
    Nvml { call: &'static str, message: String },
    #[error("reading the simulated inventory {path}: {message}")]
    Inventory { path: String, message: String },
    #[error("{0}")]
    Unsupported(String),
}

/// A source of GPU facts and the one place that changes GPU state (MIG layouts).
pub trait GpuBackend: Send + Sync + 'static {
    /// A short name for logs and `discover` output: `nvml` or `simulated:<name>`.
    fn name(&self) -> String;
    /// The node's GPUs as they are now, health events and telemetry included.
    fn inventory(&self) -> Result<Inventory, BackendError>;
    /// Makes the GPUs' MIG mode and MIG devices match the plan.
    fn apply_mig(&self, plan: &MigPlan) -> Result<(), BackendError>;
}
