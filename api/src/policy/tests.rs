use super::*;

#[test]
fn image_reference_joins_repository_image_and_version() {
    assert_eq!(
        image_reference("nvcr.io/nvidia", "driver", "580.95.05").as_deref(),
        Some("nvcr.io/nvidia/driver:580.95.05")
    );
    assert_eq!(
        image_reference("nvcr.io/nvidia/", "driver", "sha256:abc").as_deref(),
        Some("nvcr.io/nvidia/driver@sha256:abc")
    );
}

#[test]
fn full_image_references_keep_their_tag_or_digest() {
    assert_eq!(
        image_reference("ignored", "registry:5000/x/driver:1.0", "2.0").as_deref(),
        Some("registry:5000/x/driver:1.0")
    );
    assert_eq!(
        image_reference("", "registry:5000/x/driver", "2.0").as_deref(),
        Some("registry:5000/x/driver:2.0"),
        "a port in the registry is not a tag"
    );
    assert_eq!(
        image_reference("r", "a/b@sha256:00", "").as_deref(),
        Some("a/b@sha256:00")
    );
}

#[test]
fn no_reference_without_image_or_version() {
    assert_eq!(image_reference("r", "", "1"), None);
    assert_eq!(image_reference("r", "driver", ""), None);
}

#[test]
fn empty_spec_deserializes_to_the_defaults() {
    let spec: ClusterPolicySpec = serde_json::from_str("{}").unwrap();
    assert_eq!(spec, ClusterPolicySpec::default());
    assert_eq!(spec.operator.runtime_class, "nvidia");
    assert_eq!(spec.mig.strategy, MigStrategy::Single);
    assert!(spec.driver.enabled && spec.toolkit.enabled);
    assert_eq!(
        spec.daemonsets.tolerations[0].key.as_deref(),
        Some(GPU_TAINT_KEY)
    );
    let partial: ClusterPolicySpec =
        serde_json::from_str(r#"{"driver": {"enabled": false}}"#).unwrap();
    assert!(!partial.driver.enabled);
    assert_eq!(partial.driver.version, DriverSpec::default().version);
}

#[test]
fn every_default_component_has_an_image() {
    let spec = ClusterPolicySpec::default();
    for c in Component::ALL {
        let operand = spec.operand(c);
        assert!(operand.image_reference().is_some(), "{c:?}");
    }
    assert_eq!(
        spec.operand(Component::DevicePlugin)
            .image_reference()
            .unwrap(),
        format!("ghcr.io/gpu-pilot/gpu-pilot-agent:v{VERSION}")
    );
}
