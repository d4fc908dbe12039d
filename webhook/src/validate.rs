//! The ClusterPolicy rules that need other objects, as a pure function over gathered facts.
//!
//! Single-object rules (enums, image references, name formats) are in the CRD schema; what is here
//! needs the rest of the cluster: the other policies, the GPU pods that run, the ConfigMaps a
//! policy names. Every denial names the field and the fix; risky but legal changes get warnings.

use std::collections::BTreeMap;

use gpu_pilot_api::names::annotation;
use gpu_pilot_api::policy::{ClusterPolicy, ConfigRef, MigManagerSpec};
use k8s_openapi::api::core::v1::ConfigMap;

use gpu_pilot_core::mig_parted::mig_layouts;

use crate::review::{Operation, Verdict};

/// A pod that holds GPUs, as far as the rules care.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuPod {
    pub namespace: String,
    pub name: String,
    /// It uses a MIG device (a `nvidia.com/mig-*` resource or a MIG profile annotation).
    pub uses_mig: bool,
}

/// What the rules need to know about the rest of the cluster.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Names of the other ClusterPolicies.
    pub other_policies: Vec<String>,
    /// Pods that hold GPUs and have not finished.
    pub gpu_pods: Vec<GpuPod>,
    /// The ConfigMaps the policy names, by name; `None` when it does not exist.
    pub config_maps: BTreeMap<String, Option<ConfigMap>>,
    /// The namespace the ConfigMaps are looked up in (for messages).
    pub namespace: String,
}

/// The ConfigMap names a policy refers to (the facts must cover these).
pub fn referenced_config_maps(policy: &ClusterPolicy) -> Vec<String> {
    let mut names = Vec::new();
    if policy.spec.device_plugin.enabled && !policy.spec.device_plugin.config.name.is_empty() {
        names.push(policy.spec.device_plugin.config.name.clone());
    }
    if policy.spec.mig_manager.enabled && !policy.spec.mig_manager.config.name.is_empty() {
        names.push(policy.spec.mig_manager.config.name.clone());
    }
    names.sort();
    names.dedup();
    names
}

/// True when deciding on this request needs the list of GPU pods.
pub fn needs_pods(op: Operation) -> bool {
    matches!(op, Operation::Update | Operation::Delete)
}

/// Decides on a create, update or delete of a ClusterPolicy.
pub fn validate_policy(
    op: Operation,
    new: Option<&ClusterPolicy>,
    old: Option<&ClusterPolicy>,
    facts: &Facts,
) -> Verdict {
    match (op, new, old) {
        (Operation::Create, Some(new), _) => {
            if let Some(existing) = facts.other_policies.first() {
                return Verdict::forbidden(format!(
                    "a ClusterPolicy named {existing:?} already exists and gpu-pilot runs from exactly one; edit that one instead (kubectl edit clusterpolicy {existing})"
                ));
            }
            check_config_maps(new, None, facts)
        }
        // A metadata-only update (the controller's finalizer, labels) or any update of a policy
        // being deleted changes nothing to check: refusing it could only leave the policy stuck
        // Terminating (say, once a ConfigMap it names is gone).
        (Operation::Update, Some(new), Some(old))
            if new.spec == old.spec || new.metadata.deletion_timestamp.is_some() =>
        {
            Verdict::allow()
        }
        (Operation::Update, Some(new), Some(old)) => {
            let deny = check_config_maps(new, Some(old), facts);
            if !deny.is_allowed() {
                return deny;
            }
            if new.spec.mig.strategy != old.spec.mig.strategy {
                let mig_pods: Vec<&GpuPod> = facts.gpu_pods.iter().filter(|p| p.uses_mig).collect();
                if !mig_pods.is_empty() {
                    return Verdict::forbidden(format!(
                        "spec.mig.strategy cannot change from {} to {} while {} pod(s) use MIG devices ({}); delete or move those pods first, then change the strategy",
                        old.spec.mig.strategy.as_str(),
                        new.spec.mig.strategy.as_str(),
                        mig_pods.len(),
                        some_pods(&mig_pods)
                    ));
                }
            }
            let mut warnings = Vec::new();
            let gpu_pods: Vec<&GpuPod> = facts.gpu_pods.iter().collect();
            for (field, was, is) in [
                ("driver", old.spec.driver.enabled, new.spec.driver.enabled),
                (
                    "toolkit",
                    old.spec.toolkit.enabled,
                    new.spec.toolkit.enabled,
                ),
                (
                    "devicePlugin",
                    old.spec.device_plugin.enabled,
                    new.spec.device_plugin.enabled,
                ),
            ] {
                if was && !is && !gpu_pods.is_empty() {
                    warnings.push(format!(
                        "spec.{field}.enabled is now false while {} GPU pod(s) run ({}); they may lose their GPUs when the {field} pods go",
                        gpu_pods.len(),
                        some_pods(&gpu_pods)
                    ));
                }
            }
            if is_downgrade(&old.spec.driver.version, &new.spec.driver.version) {
                warnings.push(format!(
                    "spec.driver.version goes down from {} to {}: a driver downgrade reinstalls the driver on every GPU node and may not support the CUDA versions your workloads use",
                    old.spec.driver.version, new.spec.driver.version
                ));
            }
            Verdict::Allow {
                patch: Vec::new(),
                warnings,
            }
        }
        (Operation::Delete, _, Some(old)) => {
            let forced = old
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(annotation::FORCE_DELETE))
                .is_some_and(|v| v == "true");
            if !facts.gpu_pods.is_empty() && !forced {
                let name = old.metadata.name.clone().unwrap_or_default();
                let pods: Vec<&GpuPod> = facts.gpu_pods.iter().collect();
                return Verdict::forbidden(format!(
                    "ClusterPolicy {name} cannot be deleted while {} GPU pod(s) run ({}): deleting it removes the GPU stack under them. Delete those pods first, or confirm with: kubectl annotate clusterpolicy {name} {}=true",
                    pods.len(),
                    some_pods(&pods),
                    annotation::FORCE_DELETE
                ));
            }
            Verdict::allow()
        }
        (Operation::Connect, _, _) => Verdict::allow(),
        (op, _, _) => Verdict::invalid(format!(
            "a {op:?} review of a ClusterPolicy must carry the object (and oldObject for updates and deletes); the apiserver always sends them, so check the webhook configuration's rules"
        )),
    }
}

/// How many pods and in how many namespaces, never which: the webhook's Service is reachable by
/// any pod, and a forged review must not learn other tenants' pod names from a denial. A cluster
/// admin finds them with `kubectl get pods -A`.
fn some_pods(pods: &[&GpuPod]) -> String {
    let namespaces: std::collections::BTreeSet<&str> =
        pods.iter().map(|p| p.namespace.as_str()).collect();
    format!(
        "in {} namespace(s); kubectl get pods -A lists them",
        namespaces.len()
    )
}

fn check_config_maps(new: &ClusterPolicy, old: Option<&ClusterPolicy>, facts: &Facts) -> Verdict {
    let dp = &new.spec.device_plugin;
    if dp.enabled
        && let Some(v) = missing_config_map("devicePlugin", &dp.config, facts, false)
    {
        return v;
    }
    let mm = &new.spec.mig_manager;
    if mm.enabled {
        // The MIG manager's built-in config is created by the controller, so it may not exist yet.
        let builtin = mm.config.name == MigManagerSpec::default().config.name;
        if let Some(v) = missing_config_map("migManager", &mm.config, facts, builtin) {
            return v;
        }
        if !mm.config.default.is_empty()
            && let Some(Some(cm)) = facts.config_maps.get(&mm.config.name)
        {
            let unchanged = old.is_some_and(|o| o.spec.mig_manager.config == mm.config);
            let layouts = mig_layouts(cm);
            if !layouts.contains(&mm.config.default) && !unchanged {
                return Verdict::forbidden(format!(
                    "spec.migManager.config.default is {:?}, but ConfigMap {}/{} defines no such MIG layout under mig-configs (it defines: {}); set default to one of those or add the layout to the ConfigMap",
                    mm.config.default,
                    facts.namespace,
                    mm.config.name,
                    if layouts.is_empty() {
                        "none".to_string()
                    } else {
                        layouts.join(", ")
                    }
                ));
            }
        }
    }
    Verdict::allow()
}

fn missing_config_map(
    field: &str,
    config: &ConfigRef,
    facts: &Facts,
    absent_ok: bool,
) -> Option<Verdict> {
    if config.name.is_empty() || absent_ok {
        return None;
    }
    match facts.config_maps.get(&config.name) {
        Some(Some(_)) => None,
        _ => Some(Verdict::forbidden(format!(
            "spec.{field}.config.name names ConfigMap {:?}, which does not exist in namespace {}; create it first (kubectl -n {} create configmap {} --from-file=config.yaml) or clear config.name",
            config.name, facts.namespace, facts.namespace, config.name
        ))),
    }
}

/// True when `new` is a lower dotted version than `old` (e.g. 580.95.05 -> 570.172.08). Versions
/// that are not dotted numbers (digests, custom tags) are never called a downgrade.
pub fn is_downgrade(old: &str, new: &str) -> bool {
    fn parts(v: &str) -> Option<Vec<u64>> {
        v.trim_start_matches('v')
            .split('.')
            .map(|p| p.parse().ok())
            .collect()
    }
    match (parts(old), parts(new)) {
        (Some(o), Some(n)) => n < o,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, spec: serde_json::Value) -> ClusterPolicy {
        serde_json::from_value(json!({
            "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
            "metadata": {"name": name}, "spec": spec
        }))
        .unwrap()
    }

    fn cm(name: &str, yaml: &str) -> (String, Option<ConfigMap>) {
        (
            name.to_string(),
            Some(
                serde_json::from_value(
                    json!({"metadata": {"name": name}, "data": {"config.yaml": yaml}}),
                )
                .unwrap(),
            ),
        )
    }

    fn pod(name: &str, uses_mig: bool) -> GpuPod {
        GpuPod {
            namespace: "ml".into(),
            name: name.into(),
            uses_mig,
        }
    }

    fn message(v: Verdict) -> String {
        match v {
            Verdict::Deny { message, .. } => message,
            a => panic!("allowed: {a:?}"),
        }
    }

    fn warnings(v: Verdict) -> Vec<String> {
        match v {
            Verdict::Allow { warnings, .. } => warnings,
            d => panic!("denied: {d:?}"),
        }
    }

    #[test]
    fn a_second_policy_is_denied() {
        let facts = Facts {
            other_policies: vec!["cluster-policy".into()],
            ..Default::default()
        };
        let m = message(validate_policy(
            Operation::Create,
            Some(&policy("two", json!({}))),
            None,
            &facts,
        ));
        assert!(
            m.contains("\"cluster-policy\" already exists")
                && m.contains("kubectl edit clusterpolicy cluster-policy"),
            "{m}"
        );
        assert!(
            validate_policy(
                Operation::Create,
                Some(&policy("one", json!({}))),
                None,
                &Facts::default()
            )
            .is_allowed()
        );
    }

    #[test]
    fn missing_config_maps_are_denied_naming_the_field() {
        let p = policy(
            "p",
            json!({"devicePlugin": {"config": {"name": "dp-config"}}}),
        );
        let facts = Facts {
            namespace: "gpu-pilot".into(),
            ..Default::default()
        };
        let m = message(validate_policy(Operation::Create, Some(&p), None, &facts));
        assert!(
            m.contains("spec.devicePlugin.config.name") && m.contains("dp-config"),
            "{m}"
        );
        let facts = Facts {
            config_maps: [cm("dp-config", "version: v1")].into(),
            ..Default::default()
        };
        assert!(validate_policy(Operation::Create, Some(&p), None, &facts).is_allowed());
        // The built-in MIG config may be absent: the controller creates it.
        assert!(
            validate_policy(
                Operation::Create,
                Some(&policy("p", json!({}))),
                None,
                &Facts::default()
            )
            .is_allowed()
        );
    }

    #[test]
    fn releasing_the_finalizer_is_never_refused() {
        let mut old = policy(
            "p",
            serde_json::json!({"devicePlugin": {"config": {"name": "gone"}}}),
        );
        old.metadata.finalizers = Some(vec![gpu_pilot_api::names::FINALIZER.into()]);
        old.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let mut new = old.clone();
        new.metadata.finalizers = None;
        let facts = Facts {
            config_maps: [("gone".to_string(), None)].into(),
            ..Facts::default()
        };
        // The ConfigMap the policy names is gone: the spec check would refuse any edit, but the
        // finalizer's release changes no spec.
        let v = validate_policy(Operation::Update, Some(&new), Some(&old), &facts);
        assert!(v.is_allowed(), "{}", message(v));
        new.spec.mig.strategy = gpu_pilot_api::policy::MigStrategy::Mixed;
        assert!(
            validate_policy(Operation::Update, Some(&new), Some(&old), &facts).is_allowed(),
            "a policy being deleted is not held to its spec checks"
        );
        old.metadata.deletion_timestamp = None;
        new.metadata.deletion_timestamp = None;
        assert!(!validate_policy(Operation::Update, Some(&new), Some(&old), &facts).is_allowed());
    }

    #[test]
    fn mig_default_must_be_a_layout_of_the_config() {
        let yaml = "version: v1\nmig-configs:\n  all-disabled: []\n  all-1g.10gb: []\n";
        let facts = Facts {
            config_maps: [cm("mig", yaml)].into(),
            namespace: "gpu-pilot".into(),
            ..Default::default()
        };
        let bad = policy(
            "p",
            json!({"migManager": {"config": {"name": "mig", "default": "all-2g.20gb"}}}),
        );
        let m = message(validate_policy(Operation::Create, Some(&bad), None, &facts));
        assert!(
            m.contains("spec.migManager.config.default") && m.contains("all-1g.10gb, all-disabled"),
            "{m}"
        );
        let good = policy(
            "p",
            json!({"migManager": {"config": {"name": "mig", "default": "all-1g.10gb"}}}),
        );
        assert!(validate_policy(Operation::Create, Some(&good), None, &facts).is_allowed());
        let missing = policy(
            "p",
            json!({"migManager": {"config": {"name": "nope", "default": "x"}}}),
        );
        assert!(
            message(validate_policy(
                Operation::Create,
                Some(&missing),
                None,
                &facts
            ))
            .contains("spec.migManager.config.name")
        );
    }

    #[test]
    fn strategy_change_with_mig_pods_is_denied() {
        let old = policy("p", json!({"mig": {"strategy": "mixed"}}));
        let new = policy("p", json!({"mig": {"strategy": "single"}}));
        let pods: Vec<GpuPod> = (0..7)
            .map(|i| pod(&format!("m{i}"), true))
            .chain([pod("whole", false)])
            .collect();
        let facts = Facts {
            gpu_pods: pods,
            ..Default::default()
        };
        let m = message(validate_policy(
            Operation::Update,
            Some(&new),
            Some(&old),
            &facts,
        ));
        assert!(
            m.contains("from mixed to single while 7 pod(s) use MIG devices (in 1 namespace(s)"),
            "{m}"
        );
        // No pod is named, MIG or not.
        assert!(!m.contains("m0") && !m.contains("whole"), "{m}");
        let facts = Facts {
            gpu_pods: vec![pod("whole", false)],
            ..Default::default()
        };
        assert!(validate_policy(Operation::Update, Some(&new), Some(&old), &facts).is_allowed());
    }

    #[test]
    fn disabling_components_under_gpu_pods_and_downgrades_warn() {
        let old = policy("p", json!({}));
        let new = policy(
            "p",
            json!({"driver": {"enabled": false}, "devicePlugin": {"enabled": false}}),
        );
        let facts = Facts {
            gpu_pods: vec![pod("train", false)],
            ..Default::default()
        };
        let w = warnings(validate_policy(
            Operation::Update,
            Some(&new),
            Some(&old),
            &facts,
        ));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("spec.driver.enabled")
                && w[0].contains("1 GPU pod(s) run (in 1 namespace(s)"),
            "{w:?}"
        );
        assert!(!w.concat().contains("train"), "{w:?}");
        assert!(
            warnings(validate_policy(
                Operation::Update,
                Some(&new),
                Some(&old),
                &Facts::default()
            ))
            .is_empty()
        );
        let down = policy("p", json!({"driver": {"version": "570.172.08"}}));
        let w = warnings(validate_policy(
            Operation::Update,
            Some(&down),
            Some(&old),
            &Facts::default(),
        ));
        assert!(
            w[0].contains("goes down from 580.95.05 to 570.172.08"),
            "{w:?}"
        );
        let w = warnings(validate_policy(
            Operation::Update,
            Some(&old),
            Some(&down),
            &Facts::default(),
        ));
        assert!(w.is_empty(), "an upgrade is not a downgrade");
    }

    #[test]
    fn delete_with_gpu_pods_needs_force() {
        let old = policy("cluster-policy", json!({}));
        let facts = Facts {
            gpu_pods: vec![pod("train", false)],
            ..Default::default()
        };
        let m = message(validate_policy(Operation::Delete, None, Some(&old), &facts));
        assert!(
            m.contains(
                "kubectl annotate clusterpolicy cluster-policy gpupilot.io/force-delete=true"
            ) && !m.contains("train"),
            "{m}"
        );
        let mut forced = old.clone();
        forced.metadata.annotations =
            Some([("gpupilot.io/force-delete".to_string(), "true".to_string())].into());
        assert!(validate_policy(Operation::Delete, None, Some(&forced), &facts).is_allowed());
        assert!(
            validate_policy(Operation::Delete, None, Some(&old), &Facts::default()).is_allowed()
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(is_downgrade("580.95.05", "575.51.03"));
        assert!(is_downgrade("v1.17.8", "v1.9.0"));
        assert!(!is_downgrade("575.51.03", "580.95.05"));
        assert!(!is_downgrade("580.95.05", "sha256:abc"));
        assert!(!is_downgrade("580.95.05", "580.95.05"));
    }
}
