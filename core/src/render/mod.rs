//! Every object gpu-pilot creates, rendered from plain data:
//!
//! - [`operands`]: what the controller keeps in place for the active policy (one DaemonSet per
//!   enabled component, their service accounts, the agent's RBAC, the RuntimeClass);
//! - [`controller_rbac`]: the controller's own RBAC;
//! - [`webhook`]: the webhook's RBAC, workload and both webhook configurations;
//! - [`install`]: everything `kubectl gpu install` applies (and the Helm chart renders), in order.

use std::collections::BTreeMap;

use gpu_pilot_api::names::label;
use serde_json::Value;

pub mod controller_rbac;
pub mod install;
pub mod nvidia;
pub mod operands;
pub mod webhook;

/// Labels every object gpu-pilot creates carries, so it can be found and removed.
pub fn common_labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            label::MANAGED_BY.to_string(),
            label::MANAGED_BY_VALUE.to_string(),
        ),
        (label::PART_OF.to_string(), "gpu-pilot".to_string()),
        (label::COMPONENT.to_string(), component.to_string()),
    ])
}

/// The selector of every object the controller owns.
pub fn managed_selector() -> String {
    format!("{}={}", label::MANAGED_BY, label::MANAGED_BY_VALUE)
}

/// A stable hash of an object's JSON, stored in an annotation so unchanged objects are skipped.
pub fn content_hash(value: &impl serde::Serialize) -> String {
    let bytes = serde_json::to_vec(value).expect("Kubernetes objects serialize");
    let h = bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    });
    format!("{h:016x}")
}

/// `kind/namespace/name` of an object, for messages and comparisons.
pub fn key(o: &Value) -> String {
    let kind = o["kind"].as_str().unwrap_or("?");
    let name = o["metadata"]["name"].as_str().unwrap_or("?");
    match o["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind}/{ns}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

/// Objects as one YAML stream.
pub fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_yaml::to_string(o).expect("YAML serializes"))
        .collect::<Vec<_>>()
        .join("---\n")
}
