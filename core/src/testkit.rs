//! Policies for property tests, made from the CRD's own schema (feature `testkit`; always in this
//! crate's unit tests). Because the generator reads the generated schema instead of listing
//! fields, a field added to `api/src/policy.rs` is generated (and held to bounds) without a
//! change here.
//!
//! - [`spec_strategy`]: specs within the schema's structural bounds (types, enums, `maxLength`,
//!   `maxItems`, `maxProperties`, `minimum`/`maximum`), with values that sit on the bounds or
//!   just inside and strings shaped like what the fields hold (counts, percentages, names,
//!   paths, image tags). CEL rules are not evaluated here: a generated spec may be one the
//!   apiserver refuses, which only widens what must not panic. The end-to-end property test
//!   sends the same specs to a real apiserver, which is the judge of what it admits.
//! - [`unbounded`]: every place in the schema where the controller would take a number, string,
//!   list or map without a bound.
//! - [`boundary_specs`]: hand-picked specs on the edges that the schema admits.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Fields whose schema is a Kubernetes type copied verbatim into the DaemonSet: the apiserver
/// validates them when the DaemonSet is written, and their sizes are bounded by the lists that
/// hold them.
const PASSED_THROUGH: [&str; 3] = ["resources", "env[]", "tolerations[]"];

/// The `spec` schema of the ClusterPolicy CRD, as the apiserver sees it.
pub fn spec_schema() -> Value {
    let crd = serde_json::to_value(gpu_pilot_api::crd()).expect("the CRD serializes");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

/// Paths (`daemonsets.labels`, `driver.args[]`) where the schema leaves a value unbounded: a
/// string without `maxLength` or enum, an integer without `minimum` and `maximum`, a list
/// without `maxItems`, a map without `maxProperties`.
pub fn unbounded(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    walk_bounds(schema, "", &mut out);
    out
}

fn walk_bounds(s: &Value, path: &str, out: &mut Vec<String>) {
    let last = path.rsplit('.').next().unwrap_or(path);
    if PASSED_THROUGH.contains(&last) {
        return;
    }
    let has = |k: &str| s.get(k).is_some();
    match s["type"].as_str() {
        Some("string") if !has("maxLength") && !has("enum") => out.push(path.into()),
        Some("integer" | "number") if !(has("minimum") && has("maximum")) => out.push(path.into()),
        Some("array") => {
            if !has("maxItems") {
                out.push(path.into());
            }
            walk_bounds(&s["items"], &format!("{path}[]"), out);
        }
        Some("object") => {
            if let Some(props) = s["properties"].as_object() {
                for (k, v) in props {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk_bounds(v, &p, out);
                }
            }
            if let Some(ap) = s.get("additionalProperties").filter(|v| v.is_object()) {
                if !has("maxProperties") {
                    out.push(path.into());
                }
                walk_bounds(ap, &format!("{path}{{}}"), out);
            }
        }
        _ => {}
    }
}

/// Specs within the schema's structural bounds (see the module's documentation).
pub fn spec_strategy() -> BoxedStrategy<Value> {
    value(&spec_schema(), "", 0)
}

fn value(s: &Value, name: &str, depth: usize) -> BoxedStrategy<Value> {
    if let Some(choices) = s["enum"].as_array().filter(|c| !c.is_empty()) {
        return proptest::sample::select(choices.clone()).boxed();
    }
    if s["x-kubernetes-int-or-string"] == json!(true) {
        return prop_oneof![
            (0i64..100_000).prop_map(Value::from),
            quantity().prop_map(Value::from),
        ]
        .boxed();
    }
    match s["type"].as_str() {
        Some("boolean") => any::<bool>().prop_map(Value::from).boxed(),
        Some("integer") => integer(s),
        Some("string") => string(s, name).prop_map(Value::from).boxed(),
        Some("array") if depth < 6 => {
            let max = s["maxItems"].as_u64().unwrap_or(3).min(3) as usize;
            proptest::collection::vec(value(&s["items"], name, depth + 1), 0..=max)
                .prop_map(Value::from)
                .boxed()
        }
        Some("object") if depth < 6 => object(s, depth),
        _ => Just(Value::Null).boxed(),
    }
}

fn integer(s: &Value) -> BoxedStrategy<Value> {
    let lo = s["minimum"].as_i64().unwrap_or(i64::MIN);
    let hi = s["maximum"].as_i64().unwrap_or(i64::MAX);
    prop_oneof![Just(lo), Just(hi), lo..=hi]
        .prop_map(Value::from)
        .boxed()
}

fn object(s: &Value, depth: usize) -> BoxedStrategy<Value> {
    let mut fields: Vec<BoxedStrategy<Option<(String, Value)>>> = Vec::new();
    let required: Vec<&str> = s["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(props) = s["properties"].as_object() {
        for (k, v) in props {
            let key = k.clone();
            let field = value(v, k, depth + 1).prop_map(move |x| (key.clone(), x));
            fields.push(if required.contains(&k.as_str()) {
                field.prop_map(Some).boxed()
            } else {
                // Mostly absent: each field set is a chance for the whole spec to be refused,
                // and the end-to-end test needs specs the apiserver admits as well.
                proptest::option::weighted(0.3, field).boxed()
            });
        }
    }
    let extra = match s.get("additionalProperties").filter(|v| v.is_object()) {
        Some(ap) => {
            let max = s["maxProperties"].as_u64().unwrap_or(3).min(3) as usize;
            proptest::collection::btree_map(map_key(), value(ap, "", depth + 1), 0..=max).boxed()
        }
        None => Just(Default::default()).boxed(),
    };
    (fields, extra)
        .prop_map(|(fields, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            m.extend(fields.into_iter().flatten());
            Value::Object(m)
        })
        .boxed()
}

fn map_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z]{1,10}",
        "[a-z]{1,8}\\.(io|com)/[a-z][a-z0-9_.-]{0,8}[a-z0-9]",
        Just("nvidia.com/gpu.deploy.driver".to_string()),
        ".{0,12}",
    ]
}

fn quantity() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u32..100_000).prop_map(|n| n.to_string()),
        (1u32..1000).prop_map(|n| format!("{n}m")),
        (1u32..1000).prop_map(|n| format!("{n}Mi")),
        Just("9223372036854775807".to_string()),
    ]
}

/// A string within `maxLength`, shaped after what fields of that name hold.
fn string(s: &Value, name: &str) -> BoxedStrategy<String> {
    let max = s["maxLength"].as_u64().unwrap_or(64) as usize;
    let default = s["default"].as_str().map(str::to_string);
    let shaped: BoxedStrategy<String> = match name {
        "maxUnavailable" => prop_oneof![
            (1u64..=999_999_999).prop_map(|n| n.to_string()),
            Just("999999999".to_string()),
            Just("2147483647".to_string()),
            Just("2147483648".to_string()),
            "[0-9]{1,16}",
            (0u32..=101).prop_map(|n| format!("{n}%")),
        ]
        .boxed(),
        "version" => {
            prop_oneof!["[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", "sha256:[a-f0-9]{64}",].boxed()
        }
        "rootFS" | "driverInstallDir" | "installDir" => {
            prop_oneof!["/[a-z0-9/._-]{0,40}", Just("/a/../b".to_string())].boxed()
        }
        _ => prop_oneof![
            "[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?",
            "[a-z0-9.-]{0,30}",
            "[A-Za-z0-9_.:/@-]{0,40}",
            ".{0,24}",
        ]
        .boxed(),
    };
    let mut choices: Vec<(u32, BoxedStrategy<String>)> = vec![
        (3, shaped),
        (1, Just(String::new()).boxed()),
        (1, Just("a".repeat(max)).boxed()),
        (1, Just("a".repeat(max.saturating_sub(1))).boxed()),
    ];
    if let Some(d) = default {
        // Often the default, so that a generated spec is more than its one odd field.
        choices.push((4, Just(d).boxed()));
    }
    proptest::strategy::Union::new_weighted(choices)
        .prop_map(move |v| v.chars().take(max).collect())
        .boxed()
}

/// Specs on the edges of what the schema admits, each of which must render.
pub fn boundary_specs() -> Vec<(&'static str, Value)> {
    let label_key = format!("{}.io/{}", "a".repeat(250), "n".repeat(63));
    let labels: Map<String, Value> = (0..gpu_pilot_api::policy::bounds::MAX_ENTRIES)
        .map(|i| (format!("k{i}"), json!("v".repeat(63))))
        .collect();
    let many = |v: &str| vec![json!(v); gpu_pilot_api::policy::bounds::MAX_ITEMS];
    vec![
        ("empty", json!({})),
        (
            "largest count",
            json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": "999999999"}}}),
        ),
        (
            "whole cluster at once",
            json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": "100%"}}}),
        ),
        (
            "smallest percentage",
            json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": "1%"}}}),
        ),
        (
            "longest label key",
            json!({"operator": {"labels": {(label_key): "v"}}}),
        ),
        (
            "most labels",
            json!({"operator": {"labels": labels.clone()}, "daemonsets": {"labels": labels}}),
        ),
        (
            "longest runtime class",
            json!({"operator": {"runtimeClass": "r".repeat(63)}}),
        ),
        (
            "most args and pull secrets",
            json!({"driver": {"args": many(&"x".repeat(gpu_pilot_api::policy::bounds::MAX_ARG)), "imagePullSecrets": many("s")}}),
        ),
        (
            "longest tag",
            json!({"driver": {"version": format!("v{}", "1".repeat(127))}}),
        ),
        (
            "digest",
            json!({"toolkit": {"version": format!("sha256:{}", "f".repeat(64))}}),
        ),
        (
            "every component off",
            json!({"driver": {"enabled": false}, "toolkit": {"enabled": false}, "devicePlugin": {"enabled": false},
                   "dcgmExporter": {"enabled": false}, "gfd": {"enabled": false}, "migManager": {"enabled": false},
                   "validator": {"enabled": false}}),
        ),
        (
            "on delete",
            json!({"daemonsets": {"updateStrategy": "OnDelete"}}),
        ),
    ]
}

#[cfg(test)]
mod tests;
