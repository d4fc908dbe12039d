//! Every object `kubectl gpu install` applies, rendered from the values. The Helm chart renders
//! the same objects from the same values; a test compares the two object by object.
//!
//! The controller's RBAC, the webhook's RBAC and webhook configurations and the CRD come from the
//! crates that use them, so each is defined once.

use gpu_pilot_api::names::{DEFAULT_POLICY_NAME, annotation, field_manager, label, webhook};
use serde_json::{Value, json};

use super::common_labels;
use super::webhook::{IGNORE_BY_DESIGN, Registration, Target};
use crate::values::{FailurePolicy, Values};

pub const CONTROLLER: &str = "gpu-pilot-controller";
/// The Secret cert-manager writes the webhook's certificate to (cert-manager mode only).
pub const CERT_MANAGER_SECRET: &str = "gpu-pilot-webhook-cert";
/// The ConfigMap with mig-parted's standard layouts, named by the default policy.
pub const MIG_PARTED_CONFIG: &str = "default-mig-parted-config";

/// What to render besides the chart's templates.
#[derive(Debug, Clone, Copy)]
pub struct Include {
    /// The CRD (the chart keeps it in `crds/`).
    pub crd: bool,
    /// The Namespace (Helm creates it with `--create-namespace`, outside the chart).
    pub namespace: bool,
}

impl Include {
    pub const ALL: Include = Include {
        crd: true,
        namespace: true,
    };
}

/// The objects in the order they are applied: the CRD and namespace first, the ClusterPolicy
/// last (its webhook and controller must exist by then).
pub fn objects(namespace: &str, values: &Values, include: Include) -> Vec<Value> {
    let mut out = Vec::new();
    if include.crd {
        out.push(serde_json::to_value(gpu_pilot_api::crd()).expect("the CRD serializes"));
    }
    if include.namespace {
        out.push(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {
                "name": namespace,
                "labels": labels("namespace"),
                // Applied only when the namespace is new or install's own (see objects::is_ours).
                "annotations": { (annotation::NAMESPACE_CREATED_BY): field_manager::PLUGIN },
            },
        }));
    }
    out.extend(super::controller_rbac::objects(namespace));
    out.extend(agent_own_node_policy(namespace));
    out.push(mig_parted_config(namespace));
    out.extend(values_config_maps(namespace, values));
    out.extend(controller(namespace, values));
    if values.webhook.enabled {
        let mut rbac = super::webhook::rbac(namespace);
        for o in &mut rbac {
            o["metadata"]["labels"] = json!(labels("webhook"));
        }
        out.extend(rbac);
        out.extend(webhook_workload(namespace, values));
        out.extend(webhook_configurations(namespace, values));
        if values.webhook.cert_manager.enabled {
            out.extend(cert_manager(namespace));
        }
    }
    out.push(cluster_policy(values));
    out.extend(extra_objects(values));
    out
}

/// The component label of the ConfigMaps made from `config.create/data`, so that install can
/// prune them and uninstall remove them whatever their names.
pub const VALUES_CONFIG_COMPONENT: &str = "values-config";

/// The ConfigMaps NVIDIA's chart makes from `devicePlugin.config`, `migManager.config` and
/// `dcgmExporter.config` when `create` is true and `data` is not empty (named `config.name`).
pub fn values_config_maps(namespace: &str, values: &Values) -> Vec<Value> {
    let tree = &values.tree;
    let mut out = Vec::new();
    for section in ["devicePlugin", "migManager", "dcgmExporter"] {
        let config = &tree[section]["config"];
        if config["create"] != json!(true) {
            continue;
        }
        let data = match (section, &config["data"]) {
            ("dcgmExporter", Value::String(csv)) if !csv.is_empty() => {
                json!({ "dcgm-metrics.csv": csv })
            }
            (_, Value::Object(m)) if !m.is_empty() => json!(m),
            _ => continue,
        };
        out.push(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": config["name"],
                "namespace": namespace,
                "labels": labels(VALUES_CONFIG_COMPONENT),
            },
            "data": data,
        }));
    }
    out
}

/// `extraObjects`: maps, or YAML strings holding one object each, applied as given (the values
/// check refuses items that are not objects). Unlike Helm's, strings are not templates, and a
/// namespaced object needs its `metadata.namespace`.
pub fn extra_objects(values: &Values) -> Vec<Value> {
    crate::values::nvidia::extra_objects(&values.tree)
        .into_iter()
        .filter_map(Result::ok)
        .collect()
}

/// The name of the admission policy (and its binding) that keeps the agent to its own Node.
pub const AGENT_OWN_NODE_POLICY: &str = "gpu-pilot-agent-own-node-only";

/// RBAC lets the agent patch every Node (it cannot name "the node this pod runs on"); this
/// ValidatingAdmissionPolicy refuses any Node update by the agent's ServiceAccount to a Node other
/// than the one its kubelet-issued token is bound to (`authentication.kubernetes.io/node-name`).
/// Installed with the controller that creates the agent's RBAC, by `kubectl gpu install` and the
/// chart alike; agent/deploy/rbac.yaml holds the same policy.
pub fn agent_own_node_policy(namespace: &str) -> Vec<Value> {
    let agent = super::operands::AGENT_SERVICE_ACCOUNT;
    vec![
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": { "name": AGENT_OWN_NODE_POLICY, "labels": labels("agent") },
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": { "resourceRules": [{
                    "apiGroups": [""], "apiVersions": ["v1"],
                    "operations": ["UPDATE"], "resources": ["nodes"]
                }] },
                "matchConditions": [{
                    "name": "is-gpu-pilot-agent",
                    "expression": format!("request.userInfo.username == 'system:serviceaccount:{namespace}:{agent}'")
                }],
                "validations": [{
                    "expression": "'authentication.kubernetes.io/node-name' in request.userInfo.extra && request.userInfo.extra['authentication.kubernetes.io/node-name'].exists(n, n == object.metadata.name)",
                    "message": "gpu-pilot-agent may only change the Node it runs on",
                    "reason": "Forbidden"
                }]
            }
        }),
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": { "name": AGENT_OWN_NODE_POLICY, "labels": labels("agent") },
            "spec": { "policyName": AGENT_OWN_NODE_POLICY, "validationActions": ["Deny"] }
        }),
    ]
}

/// Every object any install can create in `namespace` (all optional parts on), for pruning and
/// uninstalling whatever an earlier install chose.
pub fn every_possible_object(namespace: &str) -> Vec<Value> {
    let mut tree = crate::values::default_tree();
    crate::values::apply_set(
        &mut tree,
        "webhook.enabled=true,webhook.certManager.enabled=true",
        false,
    )
    .expect("a fixed --set expression");
    let values = Values::from_tree(tree).expect("the defaults with optional parts on are valid");
    objects(namespace, &values, Include::ALL)
}

fn labels(component: &str) -> Value {
    json!(common_labels(component))
}

fn selector(name: &str) -> Value {
    json!({ (label::NAME): name, (label::PART_OF): "gpu-pilot" })
}

fn pod_labels(name: &str, component: &str) -> Value {
    json!({ (label::NAME): name, (label::PART_OF): "gpu-pilot", (label::COMPONENT): component })
}

fn restricted_pod_security() -> Value {
    json!({ "runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": { "type": "RuntimeDefault" } })
}

fn restricted_container_security() -> Value {
    json!({ "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] } })
}

fn pull_secrets(names: &[String]) -> Value {
    json!(
        names
            .iter()
            .map(|n| json!({ "name": n }))
            .collect::<Vec<_>>()
    )
}

fn resources(r: &Option<k8s_openapi::api::core::v1::ResourceRequirements>) -> Value {
    r.as_ref()
        .map(|r| serde_json::to_value(r).expect("resources serialize"))
        .unwrap_or_else(|| json!({}))
}

/// The controller's Deployment and the Service in front of its metrics. Where its pods run and
/// how it logs follow the `operator` values, as NVIDIA's chart places its operator.
pub fn controller(namespace: &str, values: &Values) -> Vec<Value> {
    let op = &values.operator;
    let devel = op.logging.devel_mode == Some(true);
    let mut env = vec![
        json!({ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }),
    ];
    if let Some(level) = &op.logging.level {
        // zap's levels; a number above 0 is one of zap's debug levels.
        let level = level.as_str().unwrap_or("debug");
        env.push(json!({ "name": "RUST_LOG", "value": level }));
    }
    let mut objs = service_and_deployment(
        namespace,
        Workload {
            name: CONTROLLER,
            component: "controller",
            service_account: super::controller_rbac::SERVICE_ACCOUNT,
            replicas: op.replicas,
            image: values.controller_image(),
            pull_policy: json!(op.image_pull_policy),
            pull_secrets: &op.image_pull_secrets,
            resources: &op.resources,
            port: ("metrics", 8080, 8080),
            probe_scheme: None,
            probe_period: 10,
            volumes: None,
        },
        json!({
            "name": "controller",
            "args": ["run", "--namespace", namespace, "--metrics-addr", "0.0.0.0:8080", "--log-format", if devel { "text" } else { "json" }],
            "env": env,
        }),
    );
    let deployment = objs
        .iter_mut()
        .find(|o| o["kind"] == "Deployment")
        .expect("service_and_deployment makes a Deployment");
    let pod = &mut deployment["spec"]["template"]["spec"];
    if op.priority_class_name.is_empty() {
        pod.as_object_mut()
            .expect("a pod spec")
            .remove("priorityClassName");
    } else {
        pod["priorityClassName"] = json!(op.priority_class_name);
    }
    if !op.tolerations.is_empty() {
        pod["tolerations"] = json!(op.tolerations);
    }
    if !op.node_selector.is_empty() {
        pod["nodeSelector"] = json!(op.node_selector);
    }
    if let Some(affinity) = op.affinity.as_ref().filter(|a| **a != Default::default()) {
        pod["affinity"] = json!(affinity);
    }
    if !op.annotations.is_empty() {
        deployment["spec"]["template"]["metadata"]["annotations"] = json!(op.annotations);
    }
    objs
}

/// The webhook's Service and Deployment.
pub fn webhook_workload(namespace: &str, values: &Values) -> Vec<Value> {
    webhook_workload_with_image(namespace, values, values.webhook_image())
}

/// The webhook's Service and Deployment running `image` (the webhook's own `manifests` command
/// passes the image it was given; install takes it from the values).
pub fn webhook_workload_with_image(namespace: &str, values: &Values, image: String) -> Vec<Value> {
    let w = &values.webhook;
    let mut args = vec![json!("serve"), json!("--namespace"), json!(namespace)];
    let mut volumes = json!([]);
    let mut mounts = json!([]);
    if w.cert_manager.enabled {
        args.extend([
            json!("--tls-cert-file"),
            json!("/tls/tls.crt"),
            json!("--tls-key-file"),
            json!("/tls/tls.key"),
        ]);
        volumes = json!([{ "name": "tls", "secret": { "secretName": CERT_MANAGER_SECRET } }]);
        mounts = json!([{ "name": "tls", "mountPath": "/tls", "readOnly": true }]);
    }
    service_and_deployment(
        namespace,
        Workload {
            name: webhook::NAME,
            component: "webhook",
            service_account: webhook::NAME,
            replicas: w.replicas,
            image,
            pull_policy: json!(w.image_pull_policy),
            pull_secrets: &w.image_pull_secrets,
            resources: &w.resources,
            port: ("https", 443, 8443),
            probe_scheme: Some("HTTPS"),
            probe_period: 5,
            volumes: Some(volumes),
        },
        json!({ "name": "webhook", "args": args, "volumeMounts": mounts }),
    )
}

/// What differs between gpu-pilot's two Deployments.
struct Workload<'a> {
    name: &'a str,
    component: &'a str,
    service_account: &'a str,
    replicas: i32,
    image: String,
    pull_policy: Value,
    pull_secrets: &'a [String],
    resources: &'a Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// Port name, Service port, container port.
    port: (&'a str, u16, u16),
    probe_scheme: Option<&'a str>,
    probe_period: u32,
    volumes: Option<Value>,
}

/// A Service in front of one named port and a restricted Deployment; `container` holds the
/// container's own fields (name, args, env, mounts), the rest is the same for both.
fn service_and_deployment(namespace: &str, w: Workload, mut container: Value) -> Vec<Value> {
    let (port_name, service_port, container_port) = w.port;
    let probe = |path: &str| {
        let mut get = json!({ "path": path, "port": port_name });
        if let Some(scheme) = w.probe_scheme {
            get["scheme"] = json!(scheme);
        }
        json!({ "httpGet": get, "periodSeconds": w.probe_period })
    };
    container["image"] = json!(w.image);
    container["imagePullPolicy"] = w.pull_policy;
    container["ports"] = json!([{ "name": port_name, "containerPort": container_port }]);
    container["readinessProbe"] = probe("/readyz");
    container["livenessProbe"] = probe("/healthz");
    container["resources"] = resources(w.resources);
    container["securityContext"] = restricted_container_security();
    let mut pod = json!({
        "serviceAccountName": w.service_account,
        "priorityClassName": "system-cluster-critical",
        "securityContext": restricted_pod_security(),
        "imagePullSecrets": pull_secrets(w.pull_secrets),
        "containers": [container],
    });
    if let Some(volumes) = w.volumes {
        pod["volumes"] = volumes;
    }
    vec![
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": w.name, "namespace": namespace, "labels": labels(w.component) },
            "spec": {
                "selector": selector(w.name),
                "ports": [{ "name": port_name, "port": service_port, "targetPort": port_name }],
            },
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": w.name, "namespace": namespace, "labels": labels(w.component) },
            "spec": {
                "replicas": w.replicas,
                "selector": { "matchLabels": selector(w.name) },
                "template": {
                    "metadata": { "labels": pod_labels(w.name, w.component) },
                    "spec": pod,
                },
            },
        }),
    ]
}

/// Both webhook configurations. Without cert-manager their `caBundle` is left out: the webhook
/// fills it in from its own CA (and install waits for that before it applies the policy).
pub fn webhook_configurations(namespace: &str, values: &Values) -> Vec<Value> {
    let w = &values.webhook;
    let mut reg = Registration::in_cluster(namespace);
    if !w.url.is_empty() {
        reg.target = Target::Url(w.url.clone());
    }
    if w.cert_manager.enabled {
        reg.cert_manager_certificate = Some(format!("{namespace}/{}", webhook::NAME));
    }
    let policy = match w.failure_policy {
        FailurePolicy::Fail => "Fail",
        FailurePolicy::Ignore => "Ignore",
    };
    let mut out = vec![
        serde_json::to_value(reg.mutating()).expect("serializes"),
        serde_json::to_value(reg.validating()).expect("serializes"),
    ];
    for o in &mut out {
        if let Some(hooks) = o["webhooks"].as_array_mut() {
            for h in hooks {
                // The pod UPDATE entry and the policy CREATE entry are `Ignore` by design.
                let name = h["name"].as_str().unwrap_or_default();
                if !IGNORE_BY_DESIGN.contains(&name) {
                    h["failurePolicy"] = json!(policy);
                }
                if !w.ca_bundle.is_empty() {
                    h["clientConfig"]["caBundle"] = json!(w.ca_bundle);
                }
            }
        }
    }
    out
}

/// A self-signed Issuer and the webhook's Certificate, for clusters with cert-manager.
pub fn cert_manager(namespace: &str) -> Vec<Value> {
    let svc = webhook::NAME;
    vec![
        json!({
            "apiVersion": "cert-manager.io/v1", "kind": "Issuer",
            "metadata": { "name": svc, "namespace": namespace, "labels": labels("webhook") },
            "spec": { "selfSigned": {} },
        }),
        json!({
            "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": { "name": svc, "namespace": namespace, "labels": labels("webhook") },
            "spec": {
                "secretName": CERT_MANAGER_SECRET,
                // So uninstall finds cert-manager's Secret by gpu-pilot's label.
                "secretTemplate": { "labels": labels("webhook") },
                "dnsNames": [
                    format!("{svc}.{namespace}.svc"),
                    format!("{svc}.{namespace}.svc.cluster.local"),
                ],
                "issuerRef": { "kind": "Issuer", "name": svc },
                "duration": "2160h",
                "renewBefore": "720h",
                "privateKey": { "algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always" },
            },
        }),
    ]
}

/// mig-parted's `version: v1` config with the layouts admins expect by name.
pub fn mig_parted_config(namespace: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": MIG_PARTED_CONFIG, "namespace": namespace, "labels": labels("mig-manager") },
        "data": { "config.yaml": MIG_PARTED_LAYOUTS },
    })
}

/// The standard layouts (the chart's `files/mig-parted-config.yaml`, one copy for both tools).
/// Profiles that exist only on some GPUs fail on the others, which the MIG manager reports as
/// `nvidia.com/mig.config.state=failed` with the reason.
pub const MIG_PARTED_LAYOUTS: &str =
    include_str!("../../../charts/gpu-pilot/files/mig-parted-config.yaml");

/// The webhook's CEL match conditions, which the chart reads from `files/cel/<name>.cel`
/// (written by `kubectl-gpu cel <name>`, test-checked), so they are spelled once in Rust.
pub fn chart_cel(name: &str) -> Option<String> {
    match name {
        "gpu-pod" => Some(super::webhook::gpu_pod_cel()),
        "keep-on-update" => Some(super::webhook::update_drops_cel()),
        _ => None,
    }
}

/// The one ClusterPolicy, its spec spelled as the values spell it.
pub fn cluster_policy(values: &Values) -> Value {
    json!({
        "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
        "metadata": { "name": DEFAULT_POLICY_NAME, "labels": labels("policy") },
        "spec": values.spec_json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::key;
    use crate::values::{Values, apply_set, default_tree};

    fn with(sets: &[&str]) -> Values {
        let mut t = default_tree();
        for s in sets {
            apply_set(&mut t, s, false).unwrap();
        }
        Values::from_tree(t).unwrap()
    }

    #[test]
    fn the_agents_own_node_policy_is_the_one_agent_deploy_holds() {
        let shipped: Vec<Value> =
            serde_yaml::Deserializer::from_str(include_str!("../../../agent/deploy/rbac.yaml"))
                .map(|d| serde::Deserialize::deserialize(d).unwrap())
                .collect();
        let rendered = agent_own_node_policy("gpu-pilot");
        for kind in [
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ] {
            let a = shipped.iter().find(|o| o["kind"] == kind).unwrap();
            let b = rendered.iter().find(|o| o["kind"] == kind).unwrap();
            assert_eq!(a["spec"], b["spec"], "{kind}");
            assert_eq!(a["metadata"]["name"], b["metadata"]["name"], "{kind}");
        }
    }

    #[test]
    fn default_install_has_every_part_once() {
        let objs = objects("gpu-pilot", &Values::defaults(), Include::ALL);
        let keys: Vec<String> = objs.iter().map(key).collect();
        let unique: std::collections::BTreeSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "no object twice: {keys:?}");
        assert_eq!(
            keys[0],
            "CustomResourceDefinition/clusterpolicies.gpupilot.io"
        );
        assert_eq!(keys[1], "Namespace/gpu-pilot");
        assert_eq!(keys.last().unwrap(), "ClusterPolicy/cluster-policy");
        for k in [
            "Deployment/gpu-pilot/gpu-pilot-controller",
            "Deployment/gpu-pilot/gpu-pilot-webhook",
            "MutatingWebhookConfiguration/gpu-pilot-webhook",
            "ValidatingWebhookConfiguration/gpu-pilot-webhook",
            "ConfigMap/gpu-pilot/default-mig-parted-config",
            "ClusterRole/gpu-pilot-webhook",
            "ClusterRole/gpu-pilot-controller",
            "ValidatingAdmissionPolicy/gpu-pilot-agent-own-node-only",
            "ValidatingAdmissionPolicyBinding/gpu-pilot-agent-own-node-only",
            "ValidatingAdmissionPolicy/gpu-pilot-webhook-own-secret-only",
            "ValidatingAdmissionPolicyBinding/gpu-pilot-webhook-own-secret-only",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
        assert!(!keys.iter().any(|k| k.starts_with("Certificate/")));
        // Every object but the CRD is labelled as gpu-pilot's.
        for o in &objs[1..] {
            assert_eq!(
                o["metadata"]["labels"][label::MANAGED_BY],
                "gpu-pilot",
                "{}",
                key(o)
            );
        }
    }

    #[test]
    fn classic_flags_shape_the_policy_and_parts() {
        let v = with(&[
            "driver.enabled=false,toolkit.enabled=false",
            "mig.strategy=mixed",
            "webhook.enabled=false",
        ]);
        let objs = objects("ops", &v, Include::ALL);
        let policy = objs.last().unwrap();
        assert_eq!(policy["spec"]["driver"]["enabled"], false);
        assert_eq!(policy["spec"]["toolkit"]["enabled"], false);
        assert_eq!(policy["spec"]["mig"]["strategy"], "mixed");
        assert!(!objs.iter().any(|o| key(o).contains("gpu-pilot-webhook")));
        let ctrl = objs
            .iter()
            .find(|o| key(o) == "Deployment/ops/gpu-pilot-controller")
            .unwrap();
        assert_eq!(
            ctrl["spec"]["template"]["spec"]["containers"][0]["args"][2],
            "ops"
        );
    }

    #[test]
    fn webhook_url_cert_manager_and_failure_policy() {
        let v = with(&[
            "webhook.url=https://127.0.0.1:9443",
            "webhook.failurePolicy=Ignore",
            "webhook.certManager.enabled=true",
            "webhook.caBundle=UEVN",
        ]);
        let objs = objects("gpu-pilot", &v, Include::ALL);
        let m = objs
            .iter()
            .find(|o| o["kind"] == "MutatingWebhookConfiguration")
            .unwrap();
        assert_eq!(
            m["webhooks"][0]["clientConfig"]["url"],
            "https://127.0.0.1:9443/mutate/pods"
        );
        assert_eq!(m["webhooks"][0]["failurePolicy"], "Ignore");
        assert_eq!(m["webhooks"][0]["clientConfig"]["caBundle"], "UEVN");
        let v = objs
            .iter()
            .find(|o| o["kind"] == "ValidatingWebhookConfiguration")
            .unwrap();
        assert_eq!(v["webhooks"][0]["failurePolicy"], "Ignore", "the value");
        assert_eq!(
            v["webhooks"][1]["name"],
            "create.clusterpolicies.gpupilot.io"
        );
        assert_eq!(v["webhooks"][1]["failurePolicy"], "Ignore", "by design");
        let fail = objects("gpu-pilot", &Values::defaults(), Include::ALL);
        let v = fail
            .iter()
            .find(|o| o["kind"] == "ValidatingWebhookConfiguration")
            .unwrap();
        assert_eq!(v["webhooks"][0]["failurePolicy"], "Fail");
        assert_eq!(
            v["webhooks"][1]["failurePolicy"], "Ignore",
            "whatever the value"
        );
        assert_eq!(
            m["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            "gpu-pilot/gpu-pilot-webhook"
        );
        assert!(objs.iter().any(|o| o["kind"] == "Certificate"));
        let d = objs
            .iter()
            .find(|o| key(o) == "Deployment/gpu-pilot/gpu-pilot-webhook")
            .unwrap();
        let args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(args.contains("--tls-cert-file"), "{args}");
    }

    #[test]
    fn the_charts_cel_files_are_current() {
        for (name, committed) in [
            (
                "gpu-pod",
                include_str!("../../../charts/gpu-pilot/files/cel/gpu-pod.cel"),
            ),
            (
                "keep-on-update",
                include_str!("../../../charts/gpu-pilot/files/cel/keep-on-update.cel"),
            ),
        ] {
            assert!(
                committed.trim_end() == chart_cel(name).unwrap(),
                "charts/gpu-pilot/files/cel/{name}.cel is stale: run `cargo run -p kubectl-gpu -- cel {name} > charts/gpu-pilot/files/cel/{name}.cel`"
            );
        }
    }

    #[test]
    fn mig_layouts_parse_and_include_the_default() {
        let parsed: serde_yaml::Value = serde_yaml::from_str(MIG_PARTED_LAYOUTS).unwrap();
        assert!(parsed["mig-configs"]["all-disabled"].is_sequence());
        assert!(parsed["mig-configs"]["all-1g.10gb"].is_sequence());
    }
}
