//! gpu-pilot's node agent as a library; `main.rs` is a thin command line over it.
//!
//! - [`inventory`]: GPU facts as plain data; [`backend`]: where they come from (NVML or a file).
//! - [`plugin`]: the kubelet device plugin (resources, allocation, gRPC, registration).
//! - [`labels`]: GPU Feature Discovery's node labels; [`mig`]: mig-parted layouts;
//!   [`mig_layout`]: profile names, placements and creation steps on one GPU.
//! - [`node`]: the agent's own Node (labels, MIG manager); [`metrics`]: dcgm-exporter's metrics,
//!   attributed to pods through [`podresources`] (the kubelet's pod-resources API).
//! - [`validate`]: the checks the validator pods run.

pub mod agent;
pub mod backend;
pub mod detect;
pub mod gpu_clients;
pub mod health;
pub mod inventory;
pub mod labels;
pub mod metrics;
pub mod mig;
pub mod mig_layout;
pub mod node;
pub mod plugin;
pub mod podresources;
pub mod validate;
