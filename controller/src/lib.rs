//! gpu-pilot's controller: turns the one active `ClusterPolicy` into operands on every GPU node,
//! moving each node through the stages, and reports where every node stands.
//!
//! The decisions are pure functions in `gpu-pilot-core` (rendering, each node's stage, the
//! status) over an in-memory index of the cluster; this crate is the thin runtime around them:
//! the watches that feed the index ([`watch`]), the writes ([`reconcile`]), leader election and
//! the health server ([`run`]), and the metrics ([`metrics`]).

pub mod metrics;
pub mod reconcile;
pub mod run;
pub mod watch;
