//! gpu-pilot's controller: turns the one active `ClusterPolicy` into operands on every GPU node,
//! moving each node through the stages, and reports where every node stands.
//!
//! The decisions are pure functions ([`render`], [`rollout`], [`status`]) over an in-memory view
//! of the cluster ([`index`]); [`reconcile`] is the thin layer that writes what differs.

pub mod index;
pub mod metrics;
pub mod rbac;
pub mod reconcile;
pub mod render;
pub mod render_nvidia;
pub mod rollout;
pub mod run;
pub mod status;
