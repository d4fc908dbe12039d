use crate::doctor::checks::testkit::*;

#[test]
fn device_plugin_config_entries() {
    let mut s = healthy();
    set_label(&mut s, "gpu-a", label::DEVICE_PLUGIN_CONFIG, Some("a100"));
    expect(
        &s,
        "device-plugin-config-missing",
        Severity::Error,
        "Node/gpu-a",
        "names no device-plugin ConfigMap",
    );
    s.policies[0].spec.device_plugin.config.name = "dp-config".into();
    expect(
        &s,
        "policy-configmap-missing",
        Severity::Error,
        "ConfigMap/gpu-pilot/dp-config",
        "",
    );
    s.config_maps.push(from(json!({
        "metadata": {"name": "dp-config", "namespace": NS}, "data": {"a100": "version: v1", "t4": "version: v1"},
    })));
    assert!(found(&s, "device-plugin-config-missing").is_empty());
    assert!(found(&s, "policy-configmap-missing").is_empty());
    set_label(&mut s, "gpu-b", label::DEVICE_PLUGIN_CONFIG, Some("h100"));
    expect(
        &s,
        "device-plugin-config-missing",
        Severity::Error,
        "Node/gpu-b",
        "a100, t4",
    );
    s.policies[0].spec.device_plugin.config.default = "nope".into();
    expect(&s, "policy-configmap-missing", Severity::Error, "", "nope");
}
