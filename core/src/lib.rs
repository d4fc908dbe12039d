//! gpu-pilot's pure core: every rule that more than one binary needs, as plain functions over
//! plain data. Nothing here talks to Kubernetes, NVML or the network; the controller, the
//! webhook, the agent and `kubectl gpu` are thin runtimes around it.
//!
//! - [`facts`]: what is known about a node, an operand pod, a DaemonSet, and which policy is
//!   the active one.
//! - [`index`]: watch events folded into those facts.
//! - [`rollout`], [`status`]: one node's next stage and labels; the policy's status.
//! - [`render`]: every object gpu-pilot creates: the operands, the controller's and the
//!   webhook's RBAC and webhook configurations, and the install manifests.
//! - [`cleanup`]: what removing gpu-pilot takes off a node.
//! - [`values`]: the Helm chart's values, read the way Helm reads them.
//! - [`duration`]: the one duration syntax of every flag; `telemetry` (feature `telemetry`):
//!   the one logging set-up of every daemon.
//! - `testkit` (feature `testkit`): policies generated from the CRD's schema, for property tests.

pub mod cleanup;
pub mod decide;
pub mod duration;
pub mod facts;
pub mod index;
pub mod mig_parted;
pub mod render;
pub mod rollout;
pub mod status;
#[cfg(feature = "telemetry")]
pub mod telemetry;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod values;
