use crate::doctor::checks::testkit::*;

#[test]
fn mig_failed_and_pending() {
    let mut s = healthy();
    set_label(
        &mut s,
        "gpu-a",
        label::MIG_CONFIG_STATE,
        Some(mig_config_state::FAILED),
    );
    set_label(&mut s, "gpu-a", label::MIG_CONFIG, Some("all-1g.10gb"));
    expect(
        &s,
        "mig-config-failed",
        Severity::Error,
        "Node/gpu-a",
        "all-1g.10gb",
    );

    let mut s = healthy();
    set_label(
        &mut s,
        "gpu-b",
        label::MIG_CONFIG_STATE,
        Some(mig_config_state::PENDING),
    );
    // A paused gate during a change is expected, not a gate-paused warning.
    set_label(
        &mut s,
        "gpu-b",
        &label::deploy_gate(Component::DevicePlugin),
        Some(gate_value::PAUSED_FOR_MIG_CHANGE),
    );
    expect(&s, "mig-config-pending", Severity::Info, "Node/gpu-b", "");
    assert!(found(&s, "gate-paused").is_empty());
    node_mut(&mut s, "gpu-b").metadata.managed_fields = Some(vec![from(json!({
        "manager": "gpu-pilot-agent", "operation": "Update", "time": ts(-3600), "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:labels": {(format!("f:{}", label::MIG_CONFIG_STATE)): {}}}},
    }))]);
    expect(
        &s,
        "mig-config-pending",
        Severity::Warning,
        "Node/gpu-b",
        "for 60 min",
    );
}

#[test]
fn gate_left_paused() {
    let mut s = healthy();
    set_label(
        &mut s,
        "gpu-c",
        &label::deploy_gate(Component::DevicePlugin),
        Some(gate_value::PAUSED_FOR_MIG_CHANGE),
    );
    expect(
        &s,
        "gate-paused",
        Severity::Warning,
        "Node/gpu-c",
        "paused-for-mig-change",
    );
}
