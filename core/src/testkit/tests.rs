//! The schema holds every policy field to a bound, and every spec within the bounds renders and
//! decides without panicking (`PROPTEST_CASES` overrides the 600 cases).

use gpu_pilot_api::{ClusterPolicy, ClusterPolicySpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::watcher::Event;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::decide::{Plan, decide};
use crate::index::Index;
use crate::render::operands::render;

fn policy(spec: ClusterPolicySpec) -> ClusterPolicy {
    let mut p = ClusterPolicy::new("cluster-policy", spec);
    p.metadata.uid = Some("uid-1".into());
    p.metadata.generation = Some(1);
    p.metadata.finalizers = Some(vec![gpu_pilot_api::names::FINALIZER.into()]);
    p
}

fn index_with(p: ClusterPolicy) -> Index {
    let mut idx = Index::default();
    idx.fold(Event::Apply(p));
    for (name, gpu) in [("gpu-1", true), ("cpu-1", false)] {
        let labels = if gpu {
            json!({(gpu_pilot_api::names::label::NFD_PCI_10DE): "true"})
        } else {
            json!({})
        };
        let n: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
            .expect("a node");
        idx.fold(Event::Apply(n));
    }
    idx
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("a time"))
}

#[test]
fn every_value_the_controller_uses_has_a_bound_in_the_schema() {
    let open = unbounded(&spec_schema());
    assert!(
        open.is_empty(),
        "the ClusterPolicy schema leaves these unbounded (add maxLength/maxItems/maxProperties/minimum+maximum in api/src/policy.rs): {open:?}"
    );
}

#[test]
fn the_lint_finds_what_is_unbounded() {
    let s = json!({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 0},
        "s": {"type": "string"},
        "e": {"type": "string", "enum": ["a"]},
        "l": {"type": "array", "items": {"type": "string", "maxLength": 3}},
        "m": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 1}},
        "resources": {"type": "object", "properties": {"x": {"type": "string"}}},
    }});
    assert_eq!(unbounded(&s), ["l", "m", "n", "s"]);
}

#[test]
fn boundary_specs_render_and_roll_out() {
    for (what, spec) in boundary_specs() {
        let spec: ClusterPolicySpec =
            serde_json::from_value(spec).unwrap_or_else(|e| panic!("{what}: {e}"));
        let p = policy(spec);
        render(&p, "gpu-pilot").unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            matches!(
                decide(&index_with(p), "gpu-pilot", &now(), None),
                Plan::Rollout(_)
            ),
            "{what}"
        );
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_spec_within_the_bounds_renders_and_decides_without_panicking(spec in spec_strategy()) {
        // Quantities and int-or-strings are generated loosely; a spec serde refuses is one the
        // apiserver refuses too, and never reaches the controller.
        let Ok(parsed) = serde_json::from_value::<ClusterPolicySpec>(spec.clone()) else {
            return Ok(());
        };
        let p = policy(parsed);
        let rendered = render(&p, "gpu-pilot");
        let plan = decide(&index_with(p), "gpu-pilot", &now(), None);
        match (&rendered, &plan) {
            (Ok(_), Plan::Rollout(_)) | (Err(_), Plan::Invalid(_)) => {}
            _ => prop_assert!(false, "render {rendered:?} but plan {plan:?} for {spec}"),
        }
        if let Err(e) = rendered {
            // The only way a spec within the structural bounds fails to render is a value that
            // the schema's CEL rules refuse.
            prop_assert!(e.to_string().contains("spec."), "{e}");
        }
    }
}

#[test]
fn the_generator_mostly_makes_specs_the_controller_can_read() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = spec_strategy();
    let total = 300;
    let read = (0..total)
        .filter(|_| {
            let v: Value = strategy.new_tree(&mut runner).expect("a tree").current();
            serde_json::from_value::<ClusterPolicySpec>(v).is_ok()
        })
        .count();
    assert!(
        read * 2 > total,
        "only {read} of {total} generated specs deserialize"
    );
}
