//! gpu-pilot's controller: turns the one active `ClusterPolicy` into operands on every GPU node,
//! moving each node through the stages, and reports where every node stands.
//!
//! The decisions are pure functions in `gpu-pilot-core` (rendering, each node's stage, the
//! status) over an in-memory index of the cluster; this crate is the thin runtime around them:
//! the watches that feed the index ([`watch`]), the writes ([`reconcile`]), the write fence
//! that stops them when leadership ends ([`fence`]), leader election and the health server
//! ([`run`]), and the metrics and liveness ([`metrics`]). [`uninstall`] is what the Helm chart's
//! uninstall hooks run.

pub mod fence;
pub mod metrics;
pub mod reconcile;
pub mod run;
pub mod uninstall;
pub mod watch;
