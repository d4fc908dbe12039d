//! The chart's `values.schema.json`, generated from the Rust types and the CRD, and the check of
//! a values tree against it (jsonschema) with messages that name the key as `--set` spells it.

use std::sync::OnceLock;

use serde_json::{Map, Value, json};

use super::{NfdValues, OperatorValues, POLICY_SECTIONS, WebhookValues, kind};

/// The chart's `values.schema.json`: gpu-pilot's own sections from the Rust types, the policy
/// sections from the CRD's structural schema, and no unknown keys anywhere.
pub fn schema() -> Value {
    let mut settings = schemars::generate::SchemaSettings::draft07();
    settings.inline_subschemas = true;
    let generator = settings.into_generator();
    let own = |schema: schemars::Schema| -> Value {
        let mut v = schema.to_value();
        if let Some(o) = v.as_object_mut() {
            o.remove("$schema");
            o.remove("title");
        }
        v
    };
    let mut g = generator;
    let mut properties = Map::new();
    properties.insert(
        "operator".into(),
        own(g.root_schema_for::<OperatorValues>()),
    );
    properties.insert("webhook".into(), own(g.root_schema_for::<WebhookValues>()));
    properties.insert("nfd".into(), own(g.root_schema_for::<NfdValues>()));
    let crd = serde_json::to_value(gpu_pilot_api::crd()).expect("the CRD serializes");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    for key in POLICY_SECTIONS {
        let mut s = spec[key].clone();
        strip_openapi(&mut s);
        properties.insert(key.into(), s);
    }
    super::nvidia::add_chart_keys(&mut properties);
    let mut root = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "gpu-pilot chart values",
        "type": "object",
        "properties": properties,
    });
    close_objects(&mut root);
    root
}

/// Drop OpenAPI-only keywords a JSON-schema validator does not know, keeping their meaning
/// where it matters (`nullable` becomes a `null` type).
fn strip_openapi(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.retain(|k, _| !k.starts_with("x-kubernetes-validations"));
            if o.remove("nullable") == Some(Value::Bool(true))
                && let Some(Value::String(t)) = o.get("type").cloned()
            {
                o.insert("type".into(), json!([t, "null"]));
            }
            if o.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
                o.remove("x-kubernetes-int-or-string");
                o.insert("type".into(), json!(["integer", "string"]));
            }
            o.retain(|k, _| !k.starts_with("x-kubernetes-"));
            for child in o.values_mut() {
                strip_openapi(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_openapi),
        _ => {}
    }
}

/// Every object schema with `properties` and no rule for other keys gets
/// `additionalProperties: false`.
fn close_objects(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.contains_key("properties") && !o.contains_key("additionalProperties") {
                o.insert("additionalProperties".into(), Value::Bool(false));
            }
            for child in o.values_mut() {
                close_objects(child);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// Checks `value` against [`schema`] (with the jsonschema crate); one sentence per problem,
/// naming the key as `--set` spells it and, for unknown keys, the ones that exist.
pub fn check(value: &Value) -> Vec<String> {
    static SCHEMA: OnceLock<(Value, jsonschema::Validator)> = OnceLock::new();
    let (schema, validator) = SCHEMA.get_or_init(|| {
        let schema = schema();
        let validator =
            jsonschema::draft7::new(&schema).expect("the values schema is valid JSON Schema");
        (schema, validator)
    });
    validator
        .iter_errors(value)
        .flat_map(|e| describe(&e, value, schema))
        .collect()
}

fn describe(e: &jsonschema::ValidationError, root: &Value, schema: &Value) -> Vec<String> {
    use jsonschema::error::ValidationErrorKind as Kind;
    let at = dotted(e.instance_path().as_str(), root);
    let here = if at.is_empty() { "(top level)" } else { &at };
    let keyword = schema.pointer(e.schema_path().as_str());
    let instance: &Value = e.instance();
    match e.kind() {
        Kind::AdditionalProperties { unexpected } => {
            let known: Vec<&str> = e
                .schema_path()
                .as_str()
                .strip_suffix("/additionalProperties")
                .and_then(|p| schema.pointer(p))
                .and_then(|s| s.get("properties"))
                .and_then(Value::as_object)
                .map(|p| p.keys().map(String::as_str).collect())
                .unwrap_or_default();
            unexpected
                .iter()
                .map(|k| {
                    let child = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    if known.is_empty() {
                        format!("{child}: unknown key")
                    } else {
                        format!("{child}: unknown key ({here} takes: {})", known.join(", "))
                    }
                })
                .collect()
        }
        Kind::Enum { options } => vec![format!(
            "{here}: {} is not one of {}",
            short(instance),
            options
                .as_array()
                .map(|o| o.iter().map(short).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        )],
        Kind::Type { .. } => {
            let types: Vec<&str> = match keyword {
                Some(Value::String(t)) => vec![t.as_str()],
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            vec![format!(
                "{here}: expected {}, found {} {}",
                types.join(" or "),
                kind(instance),
                short(instance)
            )]
        }
        Kind::Minimum { limit } => vec![format!("{here}: {instance} is below the minimum {limit}")],
        Kind::Maximum { limit } => vec![format!("{here}: {instance} is above the maximum {limit}")],
        _ => vec![format!("{here}: {e}")],
    }
}

/// A JSON pointer into `root` as `--set` spells the key: `daemonsets.tolerations[0].key`.
fn dotted(pointer: &str, root: &Value) -> String {
    let mut out = String::new();
    let mut node = Some(root);
    for raw in pointer.split('/').skip(1) {
        let seg = raw.replace("~1", "/").replace("~0", "~");
        match node {
            Some(Value::Array(a)) => {
                out.push_str(&format!("[{seg}]"));
                node = seg.parse::<usize>().ok().and_then(|i| a.get(i));
            }
            other => {
                if !out.is_empty() {
                    out.push('.');
                }
                node = other.and_then(|v| v.get(&seg));
                out.push_str(&seg);
            }
        }
    }
    out
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..s.floor_char_boundary(57)])
    } else {
        s
    }
}
