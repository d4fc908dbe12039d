//! `kubectl gpu`: install, inspect and fix gpu-pilot. The library holds every command, so the
//! end-to-end tests and the benchmarks call the same code the binary runs.

pub mod bundle;
pub mod cli;
pub mod context;
pub mod doctor;
pub mod install;
pub mod mig;
pub mod migrate;
pub mod nvidia;
pub mod objects;
pub mod render;
pub mod status;
pub mod uninstall;
pub mod values;
pub mod version;
