//! `kubectl gpu`: install, inspect and fix gpu-pilot. The library holds every command, so the
//! end-to-end tests and the benchmarks call the same code the binary runs.
//!
//! Each command is a module of its own ([`install`], [`uninstall`], [`status`], [`doctor`],
//! [`mig`], [`version`]) over three shared ones that depend on no command: [`cluster`] (the
//! connection, errors an admin can act on, dynamic apply/delete), [`ui`] (output formats,
//! colour, progress) and [`global`] (the options every command takes). What gets rendered and
//! decided lives in `gpu-pilot-core`.

pub mod cli;
pub mod cluster;
pub mod doctor;
pub mod global;
pub mod install;
pub mod mig;
pub mod migrate;
pub mod status;
pub mod ui;
pub mod uninstall;
pub mod version;
