//! The CRD committed under charts/ must be exactly what the Rust types generate.

use std::path::Path;

#[test]
fn committed_crd_matches_the_rust_types() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/gpu-pilot/crds/clusterpolicies.gpupilot.io.yaml");
    let committed = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let generated = gpu_pilot_api::crd_yaml();
    if committed != generated {
        let first_diff = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "{} is out of date (first difference at line {}).\nRegenerate it with:\n  cargo run -p gpu-pilot-controller -- crd -o charts/gpu-pilot/crds/clusterpolicies.gpupilot.io.yaml",
            path.display(),
            first_diff + 1
        );
    }
}

#[test]
fn crd_parses_back_and_keeps_its_rules() {
    let crd: serde_json::Value = serde_yaml::from_str(&gpu_pilot_api::crd_yaml()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(
        spec["properties"]["mig"]["properties"]["strategy"]["enum"],
        serde_json::json!(["none", "single", "mixed"])
    );
    for component in [
        "driver",
        "toolkit",
        "devicePlugin",
        "dcgmExporter",
        "gfd",
        "migManager",
        "validator",
    ] {
        let c = &spec["properties"][component];
        let rules = c["x-kubernetes-validations"]
            .as_array()
            .unwrap_or_else(|| panic!("{component} has no CEL rules"));
        assert!(
            rules
                .iter()
                .any(|r| r["rule"].as_str().unwrap().contains("self.enabled")),
            "{component}"
        );
        let version_rules = &c["properties"]["version"]["x-kubernetes-validations"];
        assert!(
            version_rules.is_array(),
            "{component}.version has no CEL rule"
        );
        assert_eq!(
            c["properties"]["imagePullPolicy"]["enum"],
            serde_json::json!(["Always", "IfNotPresent", "Never"])
        );
    }
}
