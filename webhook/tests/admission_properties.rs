//! Property tests over the whole admission handler (bytes in, AdmissionReview out).
//!
//! Inputs per run (`PROPTEST_CASES` overrides each):
//! - 3000 generated pods (GPU or not, annotations valid or not, any strategy and MIG inventory):
//!   no panic; the uid is echoed; a patch comes only with `allowed: true` and always with
//!   `patchType: JSONPatch`; the patch is a valid RFC 6902 document for the pod; applying it and
//!   asking again yields no patch (idempotency); pods that ask for no GPU are never patched.
//! - 2000 arbitrary byte strings and 2000 arbitrary JSON documents as reviews, on both endpoints:
//!   no panic, and every answer is either a review for the same uid or a clean request error.

use std::collections::BTreeMap;

use gpu_pilot_webhook::handler::{Endpoint, StaticView, handle};
use gpu_pilot_webhook::inventory::MigInventory;
use gpu_pilot_webhook::review::ReviewOut;
use k8s_openapi::api::core::v1::Node;
use proptest::prelude::*;
use serde_json::{Value, json};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
}

fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn resource_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("nvidia.com/gpu".to_string()),
        Just("nvidia.com/mig-1g.10gb".to_string()),
        Just("nvidia.com/mig-3g.40gb".to_string()),
        Just("nvidia.com/gpu.shared".to_string()),
        Just("cpu".to_string()),
        Just("memory".to_string()),
        "[a-z./-]{1,20}",
    ]
}

fn quantity() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u32..9).prop_map(|n| n.to_string()),
        Just("100m".to_string()),
        Just("1Gi".to_string())
    ]
}

fn resources() -> impl Strategy<Value = Value> {
    let map = || proptest::collection::btree_map(resource_name(), quantity(), 0..3);
    (proptest::option::of(map()), proptest::option::of(map())).prop_map(|(limits, requests)| {
        let mut r = serde_json::Map::new();
        if let Some(l) = limits {
            r.insert("limits".into(), json!(l));
        }
        if let Some(q) = requests {
            r.insert("requests".into(), json!(q));
        }
        Value::Object(r)
    })
}

fn container() -> impl Strategy<Value = Value> {
    ("[a-z]{1,8}", proptest::option::of(resources())).prop_map(|(name, res)| {
        let mut c = json!({"name": name, "image": "img"});
        if let Some(r) = res {
            c["resources"] = r;
        }
        c
    })
}

fn annotation_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1g.10gb".to_string()),
        Just("3g.40gb".to_string()),
        Just("1g.5gb".to_string()),
        Just("2g.20gb+me".to_string()),
        Just("20Gi".to_string()),
        Just("5G".to_string()),
        Just("999Gi".to_string()),
        ".{0,12}",
    ]
}

fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(
        prop_oneof![
            Just("gpupilot.io/mig-profile".to_string()),
            Just("gpupilot.io/gpu-memory".to_string()),
            Just("other".to_string()),
        ],
        annotation_value(),
        0..3,
    )
}

fn toleration() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(Value::Null),
            Just(json!("nvidia.com/gpu")),
            Just(json!("x"))
        ],
        prop_oneof![Just(json!("Exists")), Just(json!("Equal"))],
        prop_oneof![
            Just(Value::Null),
            Just(json!("NoSchedule")),
            Just(json!("NoExecute"))
        ],
    )
        .prop_map(|(key, op, effect)| {
            let mut t = json!({"operator": op});
            if !key.is_null() {
                t["key"] = key;
            }
            if !effect.is_null() {
                t["effect"] = effect;
            }
            t
        })
}

fn pod() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(container(), 1..3),
        proptest::option::of(proptest::collection::vec(container(), 0..2)),
        annotations(),
        proptest::option::of(proptest::collection::vec(toleration(), 0..3)),
        proptest::option::of(Just("custom")),
        proptest::option::of(Just(json!({"nvidia.com/gpu.product": "Tesla-T4"}))),
        any::<bool>(),
    )
        .prop_map(|(containers, init, ann, tols, rc, sel, opt_out)| {
            let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": containers}});
            if !ann.is_empty() {
                p["metadata"]["annotations"] = json!(ann);
            }
            if opt_out {
                p["metadata"]["labels"] = json!({"gpupilot.io/inject": "false"});
            }
            if let Some(i) = init {
                p["spec"]["initContainers"] = json!(i);
            }
            if let Some(t) = tols {
                p["spec"]["tolerations"] = json!(t);
            }
            if let Some(r) = rc {
                p["spec"]["runtimeClassName"] = json!(r);
            }
            if let Some(s) = sel {
                p["spec"]["nodeSelector"] = s;
            }
            p
        })
}

fn view(strategy: &str, with_policy: bool, inventory_kind: u8) -> StaticView {
    let nodes: Vec<Node> = match inventory_kind {
        0 => vec![],
        1 => vec![
            serde_json::from_value(json!({"metadata": {"name": "a"}, "status": {"capacity": {"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "2"}}})).unwrap(),
        ],
        _ => vec![
            serde_json::from_value(json!({"metadata": {"name": "b", "labels": {"nvidia.com/gpu.product": "A100-MIG-1g.5gb"}}})).unwrap(),
            serde_json::from_value(json!({"metadata": {"name": "c", "labels": {"nvidia.com/gpu.product": "H100-MIG-1g.10gb"}}})).unwrap(),
            serde_json::from_value(json!({"metadata": {"name": "d", "labels": {"nvidia.com/gpu.product": "A100-80-MIG-1g.10gb"}}})).unwrap(),
        ],
    };
    StaticView {
        policy: with_policy.then(|| {
            std::sync::Arc::new(
                serde_json::from_value(
                    json!({"metadata": {"name": "cp"}, "spec": {"mig": {"strategy": strategy}}}),
                )
                .unwrap(),
            )
        }),
        inventory: MigInventory::from_nodes(&nodes),
        facts: Default::default(),
    }
}

fn review(uid: &str, pod: &Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "operation": "CREATE", "object": pod}
    }))
    .unwrap()
}

fn asks_for_gpu(pod: &Value) -> bool {
    let ann = pod["metadata"]["annotations"].as_object();
    let annotated = ann.is_some_and(|a| {
        a.contains_key("gpupilot.io/mig-profile") || a.contains_key("gpupilot.io/gpu-memory")
    });
    let containers = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .chain(pod["spec"]["initContainers"].as_array())
        .flatten();
    let resources = containers.flat_map(|c| {
        ["limits", "requests"]
            .into_iter()
            .filter_map(|k| c["resources"][k].as_object())
            .flat_map(|m| m.keys().cloned())
            .collect::<Vec<_>>()
    });
    annotated
        || resources
            .into_iter()
            .any(|k| gpu_pilot_api::names::resource::is_gpu_resource(&k))
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn pod_mutation_is_well_formed_and_idempotent(
        pod in pod(),
        strategy in prop_oneof![Just("none"), Just("single"), Just("mixed")],
        with_policy in prop::bool::weighted(0.9),
        inventory_kind in 0u8..3,
        uid in "[a-f0-9-]{1,36}",
    ) {
        let rt = runtime();
        let v = view(strategy, with_policy, inventory_kind);
        let (out, _) = rt.block_on(handle(&v, Endpoint::MutatePods, &review(&uid, &pod))).expect("a well-formed review is answered");
        prop_assert_eq!(&out.response.uid, &uid);
        prop_assert_eq!(out.response.patch.is_some(), out.response.patch_type.is_some());
        if out.response.patch.is_some() {
            prop_assert!(out.response.allowed, "a patch on a denial");
            prop_assert_eq!(out.response.patch_type.as_deref(), Some("JSONPatch"));
            prop_assert!(asks_for_gpu(&pod), "a pod that asks for no GPU was patched");
        }
        if !out.response.allowed {
            prop_assert!(out.response.status.as_ref().is_some_and(|s| !s.message.is_empty()), "a denial without a message");
        }
        if let Some(doc) = out.decoded_patch() {
            let patch: json_patch::Patch = serde_json::from_value(doc.clone()).expect("an RFC 6902 document");
            let mut patched = pod.clone();
            json_patch::patch(&mut patched, &patch).map_err(|e| TestCaseError::fail(format!("patch {doc} does not apply: {e}")))?;
            let (again, _) = rt.block_on(handle(&v, Endpoint::MutatePods, &review(&uid, &patched))).unwrap();
            prop_assert!(again.response.allowed, "the patched pod is denied: {:?}", again.response.status);
            prop_assert!(again.response.patch.is_none(), "not idempotent: second patch {:?}", again.decoded_patch());
        }
    }
}

fn check_answer(body: &[u8], endpoint: Endpoint) -> Result<(), TestCaseError> {
    let rt = runtime();
    let v = view("mixed", true, 1);
    match rt.block_on(handle(&v, endpoint, body)) {
        Ok((out, _)) => {
            let out: ReviewOut =
                serde_json::from_value(serde_json::to_value(&out).unwrap()).unwrap();
            prop_assert_eq!(out.api_version, "admission.k8s.io/v1");
            if !out.response.allowed {
                prop_assert!(out.response.patch.is_none());
            }
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("apiVersion".to_string()),
                    Just("kind".to_string()),
                    Just("request".to_string()),
                    Just("uid".to_string()),
                    Just("object".to_string()),
                    Just("oldObject".to_string()),
                    Just("operation".to_string()),
                    Just("spec".to_string()),
                    Just("metadata".to_string()),
                    Just("containers".to_string()),
                    Just("resources".to_string()),
                    Just("limits".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_answer(&body, Endpoint::MutatePods)?;
        check_answer(&body, Endpoint::ValidatePolicy)?;
    }

    #[test]
    fn arbitrary_json_reviews_never_panic(
        object in arbitrary_json(),
        old in arbitrary_json(),
        op in prop_oneof![Just("CREATE"), Just("UPDATE"), Just("DELETE"), Just("CONNECT")],
        kind in prop_oneof![
            Just(json!({"group": "", "version": "v1", "kind": "Pod"})),
            Just(json!({"group": "gpupilot.io", "version": "v1alpha1", "kind": "ClusterPolicy"})),
            Just(json!({"group": "apps", "version": "v1", "kind": "Deployment"})),
        ],
        raw in arbitrary_json(),
    ) {
        let review = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": kind, "operation": op, "object": object, "oldObject": old}
        });
        for body in [serde_json::to_vec(&review).unwrap(), serde_json::to_vec(&raw).unwrap()] {
            check_answer(&body, Endpoint::MutatePods)?;
            check_answer(&body, Endpoint::ValidatePolicy)?;
        }
    }
}
