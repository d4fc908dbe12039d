use crate::doctor::checks::testkit::*;

#[test]
fn webhook_absent_is_info_half_is_a_warning() {
    let mut s = healthy();
    s.mutating = None;
    s.validating = None;
    expect(&s, "webhook-not-installed", Severity::Info, "", "");
    assert_eq!(Report::from_findings(&s, run_all(&s)).exit_code(), 0);
    let mut s = healthy();
    s.validating = None;
    expect(
        &s,
        "webhook-not-installed",
        Severity::Warning,
        "ValidatingWebhookConfiguration",
        "",
    );
}

#[test]
fn webhook_without_endpoints_or_with_a_dead_url() {
    let mut s = healthy();
    s.endpoint_slices[0] = from(json!({
        "metadata": {"name": "x", "labels": {"kubernetes.io/service-name": webhook::NAME}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": false}}],
    }));
    s.deployments[0].status.as_mut().unwrap().available_replicas = Some(0);
    let f = expect(
        &s,
        "webhook-unreachable",
        Severity::Error,
        "Service/gpu-pilot/gpu-pilot-webhook",
        "no ready endpoints",
    );
    assert!(
        f.evidence.iter().any(|e| e.contains("0 of 1 replicas")),
        "{f:?}"
    );

    let mut s = healthy();
    let url = "https://127.0.0.1:1/validate/clusterpolicy";
    let mut v = webhook_config("v", webhook::VALIDATE_POLICY_WEBHOOK);
    v["webhooks"][0]["clientConfig"] = json!({"url": url});
    s.validating = Some(from(v));
    s.url_probes
        .insert(url.into(), Err("cannot connect to 127.0.0.1:1".into()));
    expect(
        &s,
        "webhook-unreachable",
        Severity::Error,
        "ValidatingWebhookConfiguration",
        "cannot connect",
    );
    // A URL target needs no caBundle (it may have a public certificate).
    assert!(found(&s, "webhook-ca-bundle-empty").is_empty());
}

#[test]
fn webhook_ca_bundle_empty() {
    let mut s = healthy();
    let mut m = webhook_config("m", webhook::MUTATE_PODS_WEBHOOK);
    m["webhooks"][0]["clientConfig"]
        .as_object_mut()
        .unwrap()
        .remove("caBundle");
    s.mutating = Some(from(m));
    expect(
        &s,
        "webhook-ca-bundle-empty",
        Severity::Error,
        "MutatingWebhookConfiguration",
        "",
    );
}

#[test]
fn webhook_certificate_expiring_or_expired() {
    let mut s = healthy();
    s.tls_secret
        .as_mut()
        .unwrap()
        .annotations
        .as_mut()
        .unwrap()
        .insert(webhook::CERT_NOT_AFTER.into(), ts(10 * 86400));
    let f = expect(
        &s,
        "webhook-cert-expiring",
        Severity::Warning,
        "Secret/gpu-pilot/gpu-pilot-webhook-tls",
        "",
    );
    assert!(f.title.contains("10 days"), "{}", f.title);
    s.tls_secret
        .as_mut()
        .unwrap()
        .annotations
        .as_mut()
        .unwrap()
        .insert(webhook::CA_NOT_AFTER.into(), ts(-86400));
    expect(&s, "webhook-cert-expiring", Severity::Error, "", "expired");
}

#[test]
fn failure_policy_ignore_is_info() {
    let mut s = healthy();
    let mut m = webhook_config("m", webhook::MUTATE_PODS_WEBHOOK);
    m["webhooks"][0]["failurePolicy"] = json!("Ignore");
    s.mutating = Some(from(m));
    expect(&s, "webhook-failure-policy-ignore", Severity::Info, "", "");
}

#[test]
fn entries_that_are_ignore_by_design_are_no_finding() {
    let mut s = healthy();
    s.mutating =
        Some(gpu_pilot_core::render::webhook::Registration::in_cluster("gpu-pilot").mutating());
    let found = crate::doctor::checks::run_all(&s);
    assert!(
        !found
            .iter()
            .any(|f| f.check == "webhook-failure-policy-ignore"),
        "{found:?}"
    );
}
