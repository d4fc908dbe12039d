use crate::doctor::checks::testkit::*;

#[test]
fn recent_warning_events_only() {
    let mut s = healthy();
    let ev = |age: i64| {
        from(json!({
            "metadata": {"name": format!("e{age}"), "namespace": NS},
            "type": "Warning", "reason": "FailedCreate", "message": "forbidden",
            "count": 3, "lastTimestamp": ts(-age),
            "involvedObject": {"kind": "DaemonSet", "name": "gpu-pilot-driver"},
        }))
    };
    s.events.push(ev(7200));
    assert!(found(&s, "warning-events").is_empty());
    s.events.push(ev(60));
    expect(
        &s,
        "warning-events",
        Severity::Info,
        "DaemonSet/gpu-pilot/gpu-pilot-driver",
        "3x FailedCreate",
    );
}

#[test]
fn unreadable_parts_are_reported() {
    let mut s = healthy();
    s.unreadable
        .push("reading Events in gpu-pilot: you are not allowed to".into());
    expect(
        &s,
        "doctor-incomplete",
        Severity::Warning,
        "",
        "not allowed",
    );
}
