//! The pod mutation, as a pure function from (pod, policy, MIG inventory) to a verdict.
//!
//! Only pods that ask for a GPU (a GPU resource in any container or init container, or one of the
//! request annotations) are touched, and only the fields that need it are patched. Running the
//! mutation on its own output yields no patch, so the apiserver may reinvoke it safely.

use std::collections::BTreeMap;

use gpu_pilot_api::names::{GPU_TAINT_KEY, annotation, label, resource};
use gpu_pilot_api::policy::{ClusterPolicySpec, MigStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Container, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    Pod, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::{Value, json};

use crate::inventory::{MigInventory, MigProfile, parse_memory};
use crate::review::{PatchOp, Verdict, pointer_segment};

/// True when the pod asks for a GPU in a way the webhook acts on.
pub fn wants_gpu(pod: &Pod) -> bool {
    let annotated = pod.metadata.annotations.as_ref().is_some_and(|a| {
        a.contains_key(annotation::MIG_PROFILE) || a.contains_key(annotation::GPU_MEMORY)
    });
    annotated
        || pod
            .spec
            .as_ref()
            .is_some_and(|s| all_containers(s).any(requests_gpu))
}

/// True when the pod opted out with the label `gpupilot.io/inject=false`.
pub fn opted_out(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(label::INJECT))
        .is_some_and(|v| v == "false")
}

/// True when the mutation will need the cluster's MIG inventory (it is built only then).
pub fn needs_inventory(pod: &Pod) -> bool {
    pod.metadata.annotations.as_ref().is_some_and(|a| {
        a.contains_key(annotation::MIG_PROFILE) || a.contains_key(annotation::GPU_MEMORY)
    })
}

fn all_containers(spec: &k8s_openapi::api::core::v1::PodSpec) -> impl Iterator<Item = &Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
}

fn requests_gpu(c: &Container) -> bool {
    c.resources.as_ref().is_some_and(|r| {
        r.limits
            .iter()
            .chain(r.requests.iter())
            .flat_map(|m| m.keys())
            .any(|k| resource::is_gpu_resource(k))
    })
}

/// Decides what to change on a pod being created.
pub fn mutate_pod(
    pod: &Pod,
    policy: Option<&ClusterPolicySpec>,
    inventory: impl FnOnce() -> MigInventory,
) -> Verdict {
    if opted_out(pod) || !wants_gpu(pod) {
        return Verdict::allow();
    }
    let Some(policy) = policy else {
        return Verdict::Allow {
            patch: Vec::new(),
            warnings: vec![
                "gpu-pilot left this GPU pod unchanged because no ClusterPolicy exists; create one (kubectl gpu install) so GPU pods get their runtime class and toleration".into(),
            ],
        };
    };
    let Some(spec) = pod.spec.as_ref() else {
        return Verdict::invalid("the pod has no spec; send a complete Pod object");
    };
    if spec.containers.is_empty() {
        return Verdict::invalid("the pod has no containers; a Pod needs at least one container");
    }
    let strategy = policy.mig.strategy;
    let no_annotations = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&no_annotations);
    let mut ops = Vec::new();
    let mut warnings = Vec::new();

    // Which MIG profile, if any, the pod should get.
    let mut profile: Option<MigProfile> = None;
    let inv = if needs_inventory(pod) {
        inventory()
    } else {
        MigInventory::default()
    };
    if let Some(name) = annotations.get(annotation::MIG_PROFILE) {
        let Some(p) = MigProfile::parse(name) else {
            return Verdict::invalid(format!(
                "{}: {name:?} is not a MIG profile name; write it as NVIDIA does, e.g. 1g.10gb or 3g.40gb",
                annotation::MIG_PROFILE
            ));
        };
        if strategy == MigStrategy::None {
            return Verdict::forbidden(format!(
                "MIG is off in this cluster (ClusterPolicy spec.mig.strategy is none), so {}: {name} cannot be honoured; remove the annotation to get a whole GPU, or ask an admin to set spec.mig.strategy to single or mixed",
                annotation::MIG_PROFILE
            ));
        }
        profile = Some(p);
    } else if let Some(mem) = annotations.get(annotation::GPU_MEMORY) {
        let Some(bytes) = parse_memory(mem) else {
            return Verdict::invalid(format!(
                "{}: {mem:?} is not a memory quantity; write it like 20Gi, 40G or 512Mi",
                annotation::GPU_MEMORY
            ));
        };
        let found = match strategy {
            MigStrategy::None => None,
            MigStrategy::Mixed => inv.smallest_mixed(bytes).cloned(),
            MigStrategy::Single => inv.smallest_single(bytes).cloned(),
        };
        match found {
            Some(p) => {
                warnings.push(format!(
                    "{}: {mem} was met with MIG profile {} ({} GiB), the smallest that fits among those the nodes offer",
                    annotation::GPU_MEMORY,
                    p.name,
                    p.memory_gib
                ));
                // Recording the choice keeps a reinvocation from choosing again.
                ops.push(PatchOp::add(
                    format!(
                        "/metadata/annotations/{}",
                        pointer_segment(annotation::MIG_PROFILE)
                    ),
                    json!(p.name),
                ));
                profile = Some(p);
            }
            None => warnings.push(match strategy {
                MigStrategy::None => format!(
                    "{}: {mem}: MIG is off (spec.mig.strategy none), so the pod gets a whole GPU",
                    annotation::GPU_MEMORY
                ),
                _ => format!(
                    "{}: {mem}: no MIG profile offered by the nodes holds that much, so the pod gets a whole GPU",
                    annotation::GPU_MEMORY
                ),
            }),
        }
    }

    // Resources: under `mixed` the profile is its own resource; otherwise `nvidia.com/gpu`.
    let wanted_resource = match (&profile, strategy) {
        (Some(p), MigStrategy::Mixed) => resource::mig(&p.name),
        _ => resource::GPU.to_string(),
    };
    if let (Some(p), MigStrategy::Mixed) = (&profile, strategy) {
        if !inv.mixed.contains(p) {
            warnings.push(format!(
                "no node offers {wanted_resource} yet, so the pod stays Pending until one does (offered now: {})",
                list_or_none(&inv.mixed_names())
            ));
        }
        for (field, list) in [
            ("containers", Some(&spec.containers)),
            ("initContainers", spec.init_containers.as_ref()),
        ] {
            for (i, c) in list.into_iter().flatten().enumerate() {
                if let Some(res) = moved_to_mig(c.resources.as_ref(), &wanted_resource) {
                    ops.push(PatchOp::add(
                        format!("/spec/{field}/{i}/resources"),
                        serde_json::to_value(res).expect("resources serialize"),
                    ));
                }
            }
        }
    }
    if !all_containers(spec).any(requests_gpu) {
        // Only an annotation asked for a GPU: the first container gets one.
        let mut res = spec.containers[0].resources.clone().unwrap_or_default();
        res.limits
            .get_or_insert_with(BTreeMap::new)
            .insert(wanted_resource.clone(), Quantity("1".into()));
        ops.push(PatchOp::add(
            "/spec/containers/0/resources",
            serde_json::to_value(res).expect("resources serialize"),
        ));
    }

    // Under `single`, a MIG profile is a kind of node, chosen by its product label.
    if let (Some(p), MigStrategy::Single) = (&profile, strategy) {
        match single_placement(spec, &p.name, &inv) {
            Ok(mut more) => ops.append(&mut more),
            Err(deny) => return deny,
        }
    }

    if !tolerates_gpu_taint(spec.tolerations.as_deref().unwrap_or_default()) {
        let tol = serde_json::to_value(gpu_toleration()).expect("toleration serializes");
        ops.push(match spec.tolerations {
            Some(_) => PatchOp::add("/spec/tolerations/-", tol),
            None => PatchOp::add("/spec/tolerations", Value::Array(vec![tol])),
        });
    }
    if spec.runtime_class_name.is_none() && !policy.operator.runtime_class.is_empty() {
        ops.push(PatchOp::add(
            "/spec/runtimeClassName",
            json!(policy.operator.runtime_class),
        ));
    }
    Verdict::Allow {
        patch: ops,
        warnings,
    }
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The toleration a GPU pod needs for the `nvidia.com/gpu:NoSchedule` taint.
pub fn gpu_toleration() -> Toleration {
    Toleration {
        key: Some(GPU_TAINT_KEY.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    }
}

/// Keeps, on an update, what the webhook added when the pod was created.
///
/// A pod's spec is almost immutable, yet applying the same manifest again sends fields back:
/// client-side `kubectl apply` and server-side apply replace the whole `tolerations` list (it has
/// no merge key) with the manifest's, dropping the GPU toleration the webhook added, and merge the
/// manifest's `nvidia.com/gpu` back next to the MIG resource the webhook renamed it to. The
/// apiserver would refuse either change ("existing toleration can not be modified", "pod updates
/// may not change fields"); putting the old values back turns the update into what the user
/// meant, no change to those fields. A real change (another GPU count) is left for the apiserver
/// to refuse.
pub fn keep_on_update(old: &Pod, new: &Pod) -> Verdict {
    let (Some(old_spec), Some(new_spec)) = (old.spec.as_ref(), new.spec.as_ref()) else {
        return Verdict::allow();
    };
    let mut ops = Vec::new();
    let new_tols = new_spec.tolerations.as_deref().unwrap_or_default();
    let mut listed = new_spec.tolerations.is_some();
    for t in old_spec.tolerations.iter().flatten() {
        let ours = t.key.as_deref() == Some(GPU_TAINT_KEY);
        if ours && !new_tols.iter().any(|n| same_toleration(t, n)) {
            let value = serde_json::to_value(t).expect("toleration serializes");
            ops.push(if listed {
                PatchOp::add("/spec/tolerations/-", value)
            } else {
                listed = true;
                PatchOp::add("/spec/tolerations", Value::Array(vec![value]))
            });
        }
    }
    for (field, old_list, new_list) in [
        (
            "containers",
            Some(&old_spec.containers),
            Some(&new_spec.containers),
        ),
        (
            "initContainers",
            old_spec.init_containers.as_ref(),
            new_spec.init_containers.as_ref(),
        ),
    ] {
        for (i, n) in new_list.into_iter().flatten().enumerate() {
            let Some(o) = old_list.into_iter().flatten().find(|o| o.name == n.name) else {
                continue;
            };
            if o.resources != n.resources
                && gpu_put_back(o.resources.as_ref(), n.resources.as_ref())
            {
                ops.push(PatchOp::add(
                    format!("/spec/{field}/{i}/resources"),
                    serde_json::to_value(&o.resources).expect("resources serialize"),
                ));
            }
        }
    }
    Verdict::Allow {
        patch: ops,
        warnings: Vec::new(),
    }
}

/// Equal but for `tolerationSeconds`, the one field an update may change.
fn same_toleration(a: &Toleration, b: &Toleration) -> bool {
    let mut a = a.clone();
    a.toleration_seconds = b.toleration_seconds;
    a == *b
}

/// True when `new` is `old` with the `nvidia.com/gpu` quantity the webhook renamed to a MIG
/// resource merged back in, and nothing else changed.
fn gpu_put_back(old: Option<&ResourceRequirements>, new: Option<&ResourceRequirements>) -> bool {
    let (Some(old), Some(new)) = (old, new) else {
        return false;
    };
    let map_ok = |o: Option<&BTreeMap<String, Quantity>>,
                  n: Option<&BTreeMap<String, Quantity>>| {
        let (o, n) = (
            o.cloned().unwrap_or_default(),
            n.cloned().unwrap_or_default(),
        );
        if o == n {
            return true;
        }
        let mut n = n;
        let Some(gpu) = n.remove(resource::GPU) else {
            return false;
        };
        n == o
            && o.iter()
                .filter(|(k, _)| k.starts_with(resource::MIG_PREFIX))
                .any(|(_, q)| *q == gpu)
    };
    old.claims == new.claims
        && map_ok(old.limits.as_ref(), new.limits.as_ref())
        && map_ok(old.requests.as_ref(), new.requests.as_ref())
}

fn tolerates_gpu_taint(tols: &[Toleration]) -> bool {
    // Only `Exists` is certain to match: the taint's value is not known here.
    tols.iter().any(|t| {
        let key_ok = matches!(t.key.as_deref(), None | Some("") | Some(GPU_TAINT_KEY));
        let effect_ok = matches!(t.effect.as_deref(), None | Some("") | Some("NoSchedule"));
        key_ok && effect_ok && t.operator.as_deref() == Some("Exists")
    })
}

/// The container's resources with `nvidia.com/gpu` renamed to the MIG resource, or `None` when
/// there is nothing to rename.
fn moved_to_mig(res: Option<&ResourceRequirements>, mig: &str) -> Option<ResourceRequirements> {
    let mut res = res?.clone();
    let mut changed = false;
    for map in [res.limits.as_mut(), res.requests.as_mut()]
        .into_iter()
        .flatten()
    {
        if let Some(q) = map.remove(resource::GPU) {
            map.entry(mig.to_string()).or_insert(q);
            changed = true;
        }
    }
    changed.then_some(res)
}

/// Node selection for a MIG profile under the `single` strategy.
fn single_placement(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    profile: &str,
    inv: &MigInventory,
) -> Result<Vec<PatchOp>, Verdict> {
    let products = inv.single_products(profile);
    let selected = spec
        .node_selector
        .as_ref()
        .and_then(|s| s.get(label::GPU_PRODUCT));
    if products.is_empty() {
        return Err(Verdict::forbidden(format!(
            "{}: {profile}: no node is cut into {profile} under the single MIG strategy (profiles on the nodes now: {}); choose one of those, or have an admin apply a MIG layout with {profile} first",
            annotation::MIG_PROFILE,
            list_or_none(&inv.single_names())
        )));
    }
    if let Some(sel) = selected {
        return if products.contains(sel) {
            Ok(Vec::new())
        } else {
            Err(Verdict::forbidden(format!(
                "the pod's nodeSelector {}={sel} contradicts {}: {profile}, which needs one of: {}; remove one of the two",
                label::GPU_PRODUCT,
                annotation::MIG_PROFILE,
                products.join(", ")
            )))
        };
    }
    if let [only] = products.as_slice() {
        let path_value = match spec.node_selector {
            Some(_) => (
                format!("/spec/nodeSelector/{}", pointer_segment(label::GPU_PRODUCT)),
                json!(only),
            ),
            None => (
                "/spec/nodeSelector".to_string(),
                json!({ (label::GPU_PRODUCT): only }),
            ),
        };
        return Ok(vec![PatchOp::add(path_value.0, path_value.1)]);
    }
    // Several models are cut into this profile: a node affinity can name them all.
    let requirement = NodeSelectorRequirement {
        key: label::GPU_PRODUCT.into(),
        operator: "In".into(),
        values: Some(products),
    };
    let mut affinity: Affinity = spec.affinity.clone().unwrap_or_default();
    let node_affinity = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    let required = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: Vec::new(),
        });
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    let mut changed = false;
    for term in &mut required.node_selector_terms {
        let exprs = term.match_expressions.get_or_insert_with(Vec::new);
        if !exprs.contains(&requirement) {
            exprs.push(requirement.clone());
            changed = true;
        }
    }
    Ok(if changed {
        vec![PatchOp::add(
            "/spec/affinity",
            serde_json::to_value(affinity).expect("affinity serializes"),
        )]
    } else {
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies the webhook's patch with json-patch (RFC 6902), so the tests check idempotency
    /// on the pod the apiserver would store.
    fn apply(doc: &mut Value, ops: &[crate::review::PatchOp]) {
        let patch: json_patch::Patch =
            serde_json::from_value(serde_json::to_value(ops).unwrap()).expect("an RFC 6902 patch");
        json_patch::patch(doc, &patch).unwrap_or_else(|e| panic!("{ops:?} does not apply: {e}"));
    }

    fn policy(strategy: MigStrategy) -> ClusterPolicySpec {
        let mut p = ClusterPolicySpec::default();
        p.mig.strategy = strategy;
        p
    }

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn gpu_pod(n: u32) -> Value {
        json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [{"name": "c", "image": "i", "resources": {"limits": {"nvidia.com/gpu": n.to_string()}}}]}
        })
    }

    fn inventory() -> MigInventory {
        let nodes: Vec<k8s_openapi::api::core::v1::Node> = vec![
            serde_json::from_value(json!({"metadata": {"name": "a"}, "status": {"capacity": {"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "2"}}})).unwrap(),
            serde_json::from_value(json!({"metadata": {"name": "b", "labels": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"}}})).unwrap(),
            serde_json::from_value(json!({"metadata": {"name": "c", "labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb"}}})).unwrap(),
            serde_json::from_value(json!({"metadata": {"name": "d", "labels": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb"}}})).unwrap(),
        ];
        MigInventory::from_nodes(&nodes)
    }

    /// Mutates, applies the patch, and checks that a second pass changes nothing.
    fn run(v: Value, strategy: MigStrategy) -> (Value, Vec<String>) {
        let p = policy(strategy);
        match mutate_pod(&pod(v.clone()), Some(&p), inventory) {
            Verdict::Allow { patch, warnings } => {
                let mut out = v;
                apply(&mut out, &patch);
                let again = mutate_pod(&pod(out.clone()), Some(&p), inventory);
                match again {
                    Verdict::Allow { patch, .. } => {
                        assert!(patch.is_empty(), "not idempotent: second pass {patch:?}")
                    }
                    d => panic!("second pass denied: {d:?}"),
                }
                (out, warnings)
            }
            d => panic!("denied: {d:?}"),
        }
    }

    fn denied(v: Value, strategy: MigStrategy) -> String {
        match mutate_pod(&pod(v), Some(&policy(strategy)), inventory) {
            Verdict::Deny { message, .. } => message,
            a => panic!("allowed: {a:?}"),
        }
    }

    #[test]
    fn gpu_pod_gets_runtime_class_and_toleration() {
        let (out, warnings) = run(gpu_pod(1), MigStrategy::Single);
        assert_eq!(out["spec"]["runtimeClassName"], "nvidia");
        assert_eq!(
            out["spec"]["tolerations"],
            json!([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
        );
        assert!(warnings.is_empty());
    }

    #[test]
    fn pods_without_gpus_and_opted_out_pods_are_untouched() {
        let plain = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "resources": {"limits": {"cpu": "1"}}}]}});
        assert_eq!(
            mutate_pod(&pod(plain), Some(&policy(MigStrategy::Single)), inventory),
            Verdict::allow()
        );
        let mut out = gpu_pod(1);
        out["metadata"]["labels"] = json!({"gpupilot.io/inject": "false"});
        assert_eq!(
            mutate_pod(&pod(out), Some(&policy(MigStrategy::Single)), inventory),
            Verdict::allow()
        );
    }

    #[test]
    fn user_runtime_class_and_existing_tolerations_are_kept() {
        let mut v = gpu_pod(1);
        v["spec"]["runtimeClassName"] = json!("custom");
        v["spec"]["tolerations"] = json!([{"key": "other", "operator": "Exists"}]);
        let (out, _) = run(v, MigStrategy::Single);
        assert_eq!(out["spec"]["runtimeClassName"], "custom");
        assert_eq!(out["spec"]["tolerations"].as_array().unwrap().len(), 2);
        let mut v = gpu_pod(1);
        v["spec"]["tolerations"] = json!([{"operator": "Exists"}]);
        let (out, _) = run(v, MigStrategy::Single);
        assert_eq!(
            out["spec"]["tolerations"].as_array().unwrap().len(),
            1,
            "a wildcard toleration already covers the taint"
        );
    }

    #[test]
    fn mig_profile_under_mixed_becomes_the_mig_resource() {
        let mut v = gpu_pod(2);
        v["metadata"]["annotations"] = json!({"gpupilot.io/mig-profile": "1g.10gb"});
        v["spec"]["containers"][0]["resources"]["requests"] =
            json!({"nvidia.com/gpu": "2", "cpu": "1"});
        let (out, warnings) = run(v, MigStrategy::Mixed);
        let res = &out["spec"]["containers"][0]["resources"];
        assert_eq!(res["limits"], json!({"nvidia.com/mig-1g.10gb": "2"}));
        assert_eq!(
            res["requests"],
            json!({"nvidia.com/mig-1g.10gb": "2", "cpu": "1"})
        );
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn mig_profile_nobody_offers_under_mixed_warns() {
        let mut v = gpu_pod(1);
        v["metadata"]["annotations"] = json!({"gpupilot.io/mig-profile": "2g.20gb"});
        let (out, warnings) = run(v, MigStrategy::Mixed);
        assert_eq!(
            out["spec"]["containers"][0]["resources"]["limits"],
            json!({"nvidia.com/mig-2g.20gb": "1"})
        );
        assert!(warnings[0].contains("1g.10gb, 3g.40gb"), "{warnings:?}");
    }

    #[test]
    fn mig_profile_under_single_selects_the_product() {
        let mut v = gpu_pod(1);
        v["metadata"]["annotations"] = json!({"gpupilot.io/mig-profile": "1g.5gb"});
        let (out, _) = run(v, MigStrategy::Single);
        assert_eq!(
            out["spec"]["nodeSelector"],
            json!({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"})
        );
        assert_eq!(
            out["spec"]["containers"][0]["resources"]["limits"],
            json!({"nvidia.com/gpu": "1"})
        );
    }

    #[test]
    fn mig_profile_under_single_on_two_models_uses_affinity() {
        let mut v = gpu_pod(1);
        v["metadata"]["annotations"] = json!({"gpupilot.io/mig-profile": "1g.10gb"});
        v["spec"]["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}});
        let (out, _) = run(v, MigStrategy::Single);
        let exprs = &out["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"];
        assert_eq!(exprs[0]["key"], "zone");
        assert_eq!(
            exprs[1]["values"],
            json!([
                "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb",
                "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb"
            ])
        );
    }

    #[test]
    fn mig_profile_conflicts_and_bad_names_are_denied() {
        let mut v = gpu_pod(1);
        v["metadata"]["annotations"] = json!({"gpupilot.io/mig-profile": "1g.10gb"});
        assert!(denied(v.clone(), MigStrategy::None).contains("spec.mig.strategy is none"));
        v["metadata"]["annotations"] = json!({"gpupilot.io/mig-profile": "9g.99gb"});
        assert!(denied(v.clone(), MigStrategy::Single).contains("no node is cut into 9g.99gb"));
        v["metadata"]["annotations"] = json!({"gpupilot.io/mig-profile": "1g.5gb"});
        v["spec"]["nodeSelector"] = json!({"nvidia.com/gpu.product": "Tesla-T4"});
        assert!(denied(v.clone(), MigStrategy::Single).contains("contradicts"));
        v["metadata"]["annotations"] = json!({"gpupilot.io/mig-profile": "big"});
        assert!(denied(v, MigStrategy::Mixed).contains("not a MIG profile name"));
    }

    #[test]
    fn gpu_memory_picks_the_smallest_profile_that_fits() {
        let mut v = gpu_pod(1);
        v["metadata"]["annotations"] = json!({"gpupilot.io/gpu-memory": "20Gi"});
        let (out, warnings) = run(v, MigStrategy::Mixed);
        assert_eq!(
            out["spec"]["containers"][0]["resources"]["limits"],
            json!({"nvidia.com/mig-3g.40gb": "1"})
        );
        assert_eq!(
            out["metadata"]["annotations"]["gpupilot.io/mig-profile"],
            "3g.40gb"
        );
        assert!(warnings[0].contains("3g.40gb"), "{warnings:?}");

        let mut v = gpu_pod(1);
        v["metadata"]["annotations"] = json!({"gpupilot.io/gpu-memory": "8Gi"});
        let (out, _) = run(v, MigStrategy::Mixed);
        assert_eq!(
            out["spec"]["containers"][0]["resources"]["limits"],
            json!({"nvidia.com/mig-1g.10gb": "1"})
        );
    }

    #[test]
    fn gpu_memory_without_a_fitting_profile_gets_a_whole_gpu() {
        for strategy in [MigStrategy::Mixed, MigStrategy::None] {
            let v = json!({"metadata": {"name": "p", "annotations": {"gpupilot.io/gpu-memory": "60Gi"}}, "spec": {"containers": [{"name": "c"}, {"name": "d"}]}});
            let (out, warnings) = run(v, strategy);
            assert_eq!(
                out["spec"]["containers"][0]["resources"]["limits"],
                json!({"nvidia.com/gpu": "1"})
            );
            assert!(out["spec"]["containers"][1].get("resources").is_none());
            assert!(warnings[0].contains("whole GPU"), "{warnings:?}");
        }
    }

    #[test]
    fn gpu_memory_that_is_not_a_quantity_is_denied() {
        let mut v = gpu_pod(1);
        v["metadata"]["annotations"] = json!({"gpupilot.io/gpu-memory": "lots"});
        assert!(denied(v, MigStrategy::Mixed).contains("not a memory quantity"));
    }

    #[test]
    fn init_containers_count_and_are_rewritten() {
        let v = json!({"metadata": {"name": "p", "annotations": {"gpupilot.io/mig-profile": "1g.10gb"}}, "spec": {
            "initContainers": [{"name": "i", "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
            "containers": [{"name": "c"}]}});
        let (out, _) = run(v, MigStrategy::Mixed);
        assert_eq!(
            out["spec"]["initContainers"][0]["resources"]["limits"],
            json!({"nvidia.com/mig-1g.10gb": "1"})
        );
        assert!(out["spec"]["containers"][0].get("resources").is_none());
    }

    #[test]
    fn without_a_policy_the_pod_is_left_alone_with_a_warning() {
        match mutate_pod(&pod(gpu_pod(1)), None, inventory) {
            Verdict::Allow { patch, warnings } => {
                assert!(patch.is_empty());
                assert!(warnings[0].contains("no ClusterPolicy"));
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_reapplied_manifest_keeps_what_the_webhook_added() {
        let manifest: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": {"gpupilot.io/mig-profile": "1g.10gb"}},
            "spec": {
                "tolerations": [{"key": "other", "operator": "Exists"}],
                "containers": [{"name": "c", "resources": {
                    "limits": {"nvidia.com/gpu": "2", "cpu": "1"},
                    "requests": {"nvidia.com/gpu": "2"}}}]
            }
        }))
        .unwrap();
        let inv = MigInventory::default();
        let Verdict::Allow { patch, .. } =
            mutate_pod(&manifest, Some(&policy(MigStrategy::Mixed)), || inv.clone())
        else {
            panic!("denied")
        };
        let mut created = serde_json::to_value(&manifest).unwrap();
        apply(&mut created, &patch);
        let created: Pod = serde_json::from_value(created).unwrap();
        // What kubectl apply sends back: the manifest's toleration list replaces the stored one,
        // its resources merge into the stored ones.
        let mut reapplied = serde_json::to_value(&created).unwrap();
        reapplied["spec"]["tolerations"] = json!([{"key": "other", "operator": "Exists"}]);
        reapplied["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = json!("2");
        reapplied["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = json!("2");
        let Verdict::Allow { patch, .. } = keep_on_update(
            &created,
            &serde_json::from_value(reapplied.clone()).unwrap(),
        ) else {
            panic!("denied")
        };
        assert_eq!(patch.len(), 2, "{patch:?}");
        apply(&mut reapplied, &patch);
        let kept: Pod = serde_json::from_value(reapplied).unwrap();
        assert_eq!(
            kept.spec.as_ref().unwrap().containers[0].resources,
            created.spec.as_ref().unwrap().containers[0].resources
        );
        let mut tols = kept.spec.unwrap().tolerations.unwrap();
        let mut want = created.spec.clone().unwrap().tolerations.unwrap();
        tols.sort_by_key(|t| t.key.clone());
        want.sort_by_key(|t| t.key.clone());
        assert_eq!(tols, want);

        // An unchanged pod, or a real change of the GPU count, is left alone.
        assert_eq!(keep_on_update(&created, &created), Verdict::allow());
        let mut more = serde_json::to_value(&created).unwrap();
        more["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = json!("3");
        let Verdict::Allow { patch, .. } =
            keep_on_update(&created, &serde_json::from_value(more).unwrap())
        else {
            panic!("denied")
        };
        assert!(patch.is_empty(), "{patch:?}");
    }
}
