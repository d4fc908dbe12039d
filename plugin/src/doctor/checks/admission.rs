//! The admission webhook: registered, reachable, its CA bundle, certificate and failure policy.

use super::*;

pub(super) fn webhook_not_installed(s: &Snapshot) -> Vec<Finding> {
    match (&s.mutating, &s.validating) {
        (None, None) => {
            if s.unreadable
                .iter()
                .any(|u| u.contains("WebhookConfiguration"))
            {
                return vec![];
            }
            vec![
                Finding::new(
                    "webhook-not-installed",
                    Severity::Info,
                    "The gpu-pilot admission webhook is not installed",
                )
                .evidence([format!(
                    "no MutatingWebhookConfiguration or ValidatingWebhookConfiguration named {}",
                    webhook::NAME
                ), "GPU pods do not get the runtime class, GPU toleration or MIG resource set for them; ClusterPolicy changes are not checked against other objects".to_string()])
                .fix(format!("kubectl gpu install {} --set webhook.enabled=true", ns_flag(s))),
            ]
        }
        (Some(_), Some(_)) => vec![],
        (m, _) => {
            let (have, lack) = if m.is_some() {
                ("Mutating", "Validating")
            } else {
                ("Validating", "Mutating")
            };
            vec![
                Finding::new(
                    "webhook-not-installed",
                    Severity::Warning,
                    format!("Only half of the webhook is registered: the {lack}WebhookConfiguration is missing"),
                )
                .objects([format!("{lack}WebhookConfiguration/{}", webhook::NAME)])
                .evidence([format!("{have}WebhookConfiguration/{} exists", webhook::NAME)])
                .fix(format!("kubectl gpu install {} registers both again", ns_flag(s))),
            ]
        }
    }
}

pub(super) fn webhook_unreachable(s: &Snapshot) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut seen_service: BTreeSet<(String, String)> = BTreeSet::new();
    let mut seen_url: BTreeSet<String> = BTreeSet::new();
    for (kind, hook, cc) in s.webhook_client_configs() {
        if let Some(svc) = &cc.service {
            if !seen_service.insert((svc.namespace.clone(), svc.name.clone())) {
                continue;
            }
            if svc.namespace != s.namespace {
                continue; // another namespace: not in the snapshot (namespace-mismatch may say why)
            }
            let service = s.services.iter().find(|x| x.name_any() == svc.name);
            let ready: usize = s
                .endpoint_slices
                .iter()
                .filter(|e| {
                    e.labels()
                        .get("kubernetes.io/service-name")
                        .map(String::as_str)
                        == Some(svc.name.as_str())
                })
                .flat_map(|e| e.endpoints.iter().flatten())
                .filter(|ep| ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                .count();
            let mut evidence = Vec::new();
            let broken = if service.is_none() {
                evidence.push(format!(
                    "{kind}/{} ({hook}) calls Service {}/{}, which does not exist",
                    webhook::NAME,
                    svc.namespace,
                    svc.name
                ));
                true
            } else if ready == 0 {
                evidence.push(format!(
                    "Service {}/{} has no ready endpoints",
                    svc.namespace, svc.name
                ));
                true
            } else {
                false
            };
            if !broken {
                continue;
            }
            if let Some(d) = s.deployments.iter().find(|d| d.name_any() == svc.name) {
                let want = d.spec.replicas.unwrap_or(1);
                let avail = d
                    .status
                    .as_ref()
                    .and_then(|st| st.available_replicas)
                    .unwrap_or(0);
                evidence.push(format!(
                    "Deployment {}/{}: {avail} of {want} replicas available",
                    svc.namespace, svc.name
                ));
            }
            for p in s
                .pods
                .iter()
                .filter(|p| {
                    p.labels().get(label::NAME).map(String::as_str) == Some(svc.name.as_str())
                })
                .take(3)
            {
                if let Some(r) = p.status.as_ref().and_then(pod_problem) {
                    evidence.push(format!("Pod {}: {r}", p.name_any()));
                }
            }
            out.push(
                Finding::new(
                    "webhook-unreachable",
                    Severity::Error,
                    "The admission webhook does not answer: GPU pods and ClusterPolicy changes are refused (failurePolicy Fail)",
                )
                .objects([
                    format!("Service/{}/{}", svc.namespace, svc.name),
                    format!("Deployment/{}/{}", svc.namespace, svc.name),
                ])
                .evidence(evidence)
                .fix(format!(
                    "kubectl -n {ns} get pods -l {}={}; kubectl -n {ns} logs deploy/{}. To unblock GPU pods meanwhile: kubectl delete mutatingwebhookconfiguration {}",
                    label::NAME,
                    svc.name,
                    svc.name,
                    webhook::NAME,
                    ns = svc.namespace
                )),
            );
        }
        if let Some(url) = &cc.url {
            if !seen_url.insert(url.clone()) {
                continue;
            }
            if let Some(Err(why)) = s.url_probes.get(url) {
                out.push(
                    Finding::new(
                        "webhook-unreachable",
                        Severity::Error,
                        format!("The admission webhook at {url} does not answer TLS"),
                    )
                    .objects([format!("{kind}/{}", webhook::NAME)])
                    .evidence([format!("{hook} calls {url}: {why}")])
                    .fix(format!(
                        "Start the webhook at that address, or point the configuration at the in-cluster Service: kubectl gpu install {} (webhook.url empty). To unblock requests meanwhile: kubectl delete {} {}",
                        ns_flag(s),
                        kind.to_lowercase(),
                        webhook::NAME
                    )),
                );
            }
        }
    }
    out
}

pub(super) fn webhook_ca_bundle(s: &Snapshot) -> Vec<Finding> {
    let mut empty = Vec::new();
    for (kind, hook, cc) in s.webhook_client_configs() {
        // A URL target may use a publicly trusted certificate, which needs no caBundle.
        if cc.url.is_some() {
            continue;
        }
        if cc.ca_bundle.as_ref().is_none_or(|b| b.0.is_empty()) {
            empty.push((kind, hook));
        }
    }
    if empty.is_empty() {
        return vec![];
    }
    let cert_manager = [
        s.mutating.as_ref().map(|m| m.annotations()),
        s.validating.as_ref().map(|v| v.annotations()),
    ]
    .into_iter()
    .flatten()
    .any(|a| a.contains_key(webhook::CERT_MANAGER_INJECT_CA_FROM));
    let fix = if cert_manager {
        format!(
            "cert-manager's CA injector fills it in ({}): check that cert-manager runs and the Certificate {}/{} is Ready (kubectl -n {} get certificate)",
            webhook::CERT_MANAGER_INJECT_CA_FROM,
            s.namespace,
            webhook::NAME,
            s.namespace
        )
    } else {
        format!(
            "The webhook fills it in from its CA at start: kubectl {} rollout restart deploy/{} and check its logs",
            ns_flag(s),
            webhook::NAME
        )
    };
    let kinds: BTreeSet<&str> = empty.iter().map(|(k, _)| *k).collect();
    vec![
        Finding::new(
            "webhook-ca-bundle-empty",
            Severity::Error,
            "Webhook configurations without a caBundle: the apiserver cannot trust the webhook, calls fail",
        )
        .objects(kinds.iter().map(|k| format!("{k}/{}", webhook::NAME)))
        .evidence(
            empty
                .iter()
                .map(|(k, h)| format!("{k}/{}: webhook {h} has an empty clientConfig.caBundle", webhook::NAME)),
        )
        .fix(fix),
    ]
}

pub(super) fn webhook_cert(s: &Snapshot) -> Vec<Finding> {
    let Some(meta) = &s.tls_secret else {
        return vec![];
    };
    let Some(now) = s.now else {
        return vec![];
    };
    let ann = meta.annotations.clone().unwrap_or_default();
    let mut out = Vec::new();
    for (key, what) in [
        (webhook::CERT_NOT_AFTER, "serving certificate"),
        (webhook::CA_NOT_AFTER, "CA certificate"),
    ] {
        let Some(v) = ann.get(key) else { continue };
        let Ok(t) = v.parse::<Timestamp>() else {
            out.push(
                Finding::new(
                    "webhook-cert-expiring",
                    Severity::Warning,
                    format!("The webhook's {what} expiry cannot be read"),
                )
                .objects([format!("Secret/{}/{}", s.namespace, webhook::TLS_SECRET)])
                .evidence([format!("annotation {key}={v:?} is no RFC 3339 time")])
                .fix(format!(
                    "Delete the Secret so the webhook issues a new one: kubectl {} delete secret {}",
                    ns_flag(s),
                    webhook::TLS_SECRET
                )),
            );
            continue;
        };
        let days = (t.as_second() - now.as_second()) as f64 / 86400.0;
        if days >= 30.0 {
            continue;
        }
        let (sev, title) = if days <= 0.0 {
            (
                Severity::Error,
                format!("The webhook's {what} expired on {v}: the apiserver refuses its TLS"),
            )
        } else {
            (
                Severity::Warning,
                format!("The webhook's {what} expires in {days:.0} days ({v})"),
            )
        };
        out.push(
            Finding::new("webhook-cert-expiring", sev, title)
                .objects([format!("Secret/{}/{}", s.namespace, webhook::TLS_SECRET)])
                .evidence([
                    format!("annotation {key}={v}"),
                    "the webhook renews its certificate 30 days before expiry, so it has not run lately".to_string(),
                ])
                .fix(format!(
                    "Make sure the webhook runs (kubectl {} get deploy {}); it renews at start. With cert-manager, check the Certificate's status.",
                    ns_flag(s),
                    webhook::NAME
                )),
        );
    }
    out
}

pub(super) fn webhook_ignore(s: &Snapshot) -> Vec<Finding> {
    let mut hooks = Vec::new();
    if let Some(m) = &s.mutating {
        // The pod UPDATE entry and the policy CREATE entry are `Ignore` by design.
        for w in m.webhooks.iter().flatten().filter(|w| {
            !gpu_pilot_core::render::webhook::IGNORE_BY_DESIGN.contains(&w.name.as_str())
        }) {
            if w.failure_policy.as_deref() == Some("Ignore") {
                hooks.push(format!(
                    "MutatingWebhookConfiguration/{} ({})",
                    webhook::NAME,
                    w.name
                ));
            }
        }
    }
    if let Some(v) = &s.validating {
        for w in v.webhooks.iter().flatten().filter(|w| {
            !gpu_pilot_core::render::webhook::IGNORE_BY_DESIGN.contains(&w.name.as_str())
        }) {
            if w.failure_policy.as_deref() == Some("Ignore") {
                hooks.push(format!(
                    "ValidatingWebhookConfiguration/{} ({})",
                    webhook::NAME,
                    w.name
                ));
            }
        }
    }
    if hooks.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "webhook-failure-policy-ignore",
            Severity::Info,
            "Webhooks with failurePolicy Ignore: while the webhook is down, GPU pods start without their runtime class and policy changes go unchecked",
        )
        .objects(hooks.clone())
        .evidence(hooks.iter().map(|h| format!("{h}: failurePolicy Ignore")))
        .fix(format!("If that was not meant: kubectl gpu install {} --set webhook.failurePolicy=Fail", ns_flag(s))),
    ]
}

#[cfg(test)]
mod tests;
