//! The objects that deploy and register the webhook, rendered from Rust so that names, paths and
//! rules are spelled once: least-privilege RBAC, the Service and Deployment, and both webhook
//! configurations. `gpu-pilot-webhook manifests` prints them; the end-to-end tests register the
//! same configurations by URL.
//!
//! Failure policy: both webhooks use `Fail`. The pod webhook only sees pods that ask for GPUs
//! (its `matchConditions` are evaluated by the apiserver first), so while the webhook is down
//! ordinary pods are created as usual and only GPU pods wait; admitting a GPU pod without its
//! runtime class would start it without GPU access, which is worse than a clear error. The
//! ClusterPolicy webhook guards against edits that break running GPU work; while it is down an
//! admin who must edit the policy anyway can delete the ValidatingWebhookConfiguration.

use gpu_pilot_api::names::{GROUP, annotation, label, resource, webhook};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use serde_json::{Value, json};

/// Where the apiserver sends reviews.
#[derive(Debug, Clone)]
pub enum Target {
    /// The in-cluster Service (port 443).
    Service { namespace: String, name: String },
    /// A URL, e.g. `https://127.0.0.1:8443` for a webhook outside the cluster.
    Url(String),
}

/// How a pair of webhook configurations is rendered.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Name of both configurations.
    pub name: String,
    pub target: Target,
    /// Namespaces excluded from pod mutation, besides kube-system.
    pub excluded_namespaces: Vec<String>,
    /// Extra requirements on a pod's namespace labels (e.g. to confine a test).
    pub namespace_match: Vec<Value>,
    /// Extra requirements on a ClusterPolicy's labels.
    pub policy_match: Vec<Value>,
    /// `namespace/certificate` for cert-manager's CA injector, instead of the webhook's own CA.
    pub cert_manager_certificate: Option<String>,
    pub ca_bundle: Option<Vec<u8>>,
}

impl Registration {
    /// The usual in-cluster registration.
    pub fn in_cluster(namespace: &str) -> Registration {
        Registration {
            name: webhook::NAME.into(),
            target: Target::Service {
                namespace: namespace.into(),
                name: webhook::NAME.into(),
            },
            excluded_namespaces: vec![namespace.into()],
            namespace_match: Vec::new(),
            policy_match: Vec::new(),
            cert_manager_certificate: None,
            ca_bundle: None,
        }
    }

    fn client_config(&self, path: &str) -> Value {
        let mut cc = match &self.target {
            Target::Service { namespace, name } => json!({
                "service": { "namespace": namespace, "name": name, "path": path, "port": 443 }
            }),
            Target::Url(base) => json!({ "url": format!("{}{path}", base.trim_end_matches('/')) }),
        };
        if let Some(ca) = &self.ca_bundle {
            cc["caBundle"] = json!(k8s_openapi::ByteString(ca.clone()));
        }
        cc
    }

    fn metadata(&self) -> Value {
        let mut meta = json!({
            "name": self.name,
            "labels": {
                (label::MANAGED_BY): label::MANAGED_BY_VALUE,
                (label::COMPONENT): "webhook",
                (label::PART_OF): "gpu-pilot",
            }
        });
        if let Some(cert) = &self.cert_manager_certificate {
            meta["annotations"] = json!({ (webhook::CERT_MANAGER_INJECT_CA_FROM): cert });
        }
        meta
    }

    /// The pod-mutating configuration.
    pub fn mutating(&self) -> MutatingWebhookConfiguration {
        let mut excluded = vec![webhook::KUBE_SYSTEM.to_string()];
        excluded.extend(self.excluded_namespaces.iter().cloned());
        let mut ns_match = vec![
            json!({"key": webhook::NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": excluded}),
            json!({"key": label::INJECT, "operator": "NotIn", "values": ["false"]}),
        ];
        ns_match.extend(self.namespace_match.iter().cloned());
        serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": self.metadata(),
            "webhooks": [{
                "name": webhook::MUTATE_PODS_WEBHOOK,
                "clientConfig": self.client_config(webhook::MUTATE_PODS_PATH),
                "rules": [{
                    "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                    "operations": ["CREATE"], "scope": "Namespaced"
                }],
                "namespaceSelector": { "matchExpressions": ns_match },
                "objectSelector": { "matchExpressions": [
                    {"key": label::INJECT, "operator": "NotIn", "values": ["false"]}
                ]},
                "matchConditions": [{ "name": "asks-for-a-gpu", "expression": gpu_pod_cel() }],
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "reinvocationPolicy": "IfNeeded",
                "timeoutSeconds": 5
            }]
        }))
        .expect("the mutating configuration is well-formed")
    }

    /// The ClusterPolicy-validating configuration.
    pub fn validating(&self) -> ValidatingWebhookConfiguration {
        let mut webhook_entry = json!({
            "name": webhook::VALIDATE_POLICY_WEBHOOK,
            "clientConfig": self.client_config(webhook::VALIDATE_POLICY_PATH),
            "rules": [{
                "apiGroups": [GROUP], "apiVersions": ["*"], "resources": ["clusterpolicies"],
                "operations": ["CREATE", "UPDATE", "DELETE"], "scope": "Cluster"
            }],
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10
        });
        if !self.policy_match.is_empty() {
            webhook_entry["objectSelector"] = json!({ "matchExpressions": self.policy_match });
        }
        serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": self.metadata(),
            "webhooks": [webhook_entry]
        }))
        .expect("the validating configuration is well-formed")
    }
}

/// The CEL condition under which the apiserver calls the pod webhook at all: a GPU resource in
/// any container or init container, or one of the request annotations.
pub fn gpu_pod_cel() -> String {
    let key_is_gpu = format!(
        "k == '{gpu}' || k.startsWith('{mig}') || k == '{gpu}{shared}'",
        gpu = resource::GPU,
        mig = resource::MIG_PREFIX,
        shared = resource::SHARED_SUFFIX
    );
    let container = format!(
        "has(c.resources) && ((has(c.resources.limits) && c.resources.limits.exists(k, {key_is_gpu})) || (has(c.resources.requests) && c.resources.requests.exists(k, {key_is_gpu})))"
    );
    format!(
        "(has(object.metadata.annotations) && ('{mig_ann}' in object.metadata.annotations || '{mem_ann}' in object.metadata.annotations)) || object.spec.containers.exists(c, {container}) || (has(object.spec.initContainers) && object.spec.initContainers.exists(c, {container}))",
        mig_ann = annotation::MIG_PROFILE,
        mem_ann = annotation::GPU_MEMORY,
    )
}

/// Least-privilege RBAC: what the webhook reads and the only objects it writes.
pub fn rbac(namespace: &str) -> Vec<Value> {
    let name = webhook::NAME;
    vec![
        json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": { "name": name, "namespace": namespace }
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": { "name": name },
            "rules": [
                // The policy in force and the MIG profiles on the nodes, through watch caches.
                { "apiGroups": [GROUP], "resources": ["clusterpolicies"], "verbs": ["get", "list", "watch"] },
                { "apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"] },
                // Which GPU pods run, when a policy change could hurt them.
                { "apiGroups": [""], "resources": ["pods"], "verbs": ["list"] },
                // Only its own two configurations, only to keep caBundle current.
                { "apiGroups": ["admissionregistration.k8s.io"],
                  "resources": ["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
                  "resourceNames": [name], "verbs": ["get", "update"] }
            ]
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": { "name": name },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name },
            "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": namespace }]
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": { "name": name, "namespace": namespace },
            "rules": [
                // Its TLS Secret: read and rotate it; create it once (create cannot be narrowed by name).
                { "apiGroups": [""], "resources": ["secrets"], "resourceNames": [webhook::TLS_SECRET], "verbs": ["get", "update"] },
                { "apiGroups": [""], "resources": ["secrets"], "verbs": ["create"] },
                // The device-plugin and MIG ConfigMaps a policy names.
                { "apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"] }
            ]
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": { "name": name, "namespace": namespace },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name },
            "subjects": [{ "kind": "ServiceAccount", "name": name, "namespace": namespace }]
        }),
    ]
}

/// The Service and Deployment.
pub fn workload(namespace: &str, image: &str) -> Vec<Value> {
    let name = webhook::NAME;
    let labels = json!({ (label::NAME): name, (label::PART_OF): "gpu-pilot" });
    let probe = |path: &str| json!({ "httpGet": { "path": path, "port": 8443, "scheme": "HTTPS" }, "periodSeconds": 5 });
    vec![
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": namespace, "labels": labels },
            "spec": { "selector": labels, "ports": [{ "name": "https", "port": 443, "targetPort": 8443 }] }
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": name, "namespace": namespace, "labels": labels },
            "spec": {
                "replicas": 2,
                "selector": { "matchLabels": labels },
                "template": {
                    "metadata": { "labels": labels },
                    "spec": {
                        "serviceAccountName": name,
                        "priorityClassName": "system-cluster-critical",
                        "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": { "type": "RuntimeDefault" } },
                        "containers": [{
                            "name": "webhook",
                            "image": image,
                            "args": ["serve", "--namespace", namespace],
                            "ports": [{ "name": "https", "containerPort": 8443 }],
                            "readinessProbe": probe("/readyz"),
                            "livenessProbe": probe("/healthz"),
                            "resources": { "requests": { "cpu": "50m", "memory": "64Mi" }, "limits": { "memory": "256Mi" } },
                            "securityContext": { "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] } }
                        }]
                    }
                }
            }
        }),
    ]
}

/// Everything, as one multi-document YAML stream.
pub fn all_yaml(namespace: &str, image: &str, cert_manager_certificate: Option<String>) -> String {
    let mut reg = Registration::in_cluster(namespace);
    reg.cert_manager_certificate = cert_manager_certificate;
    let mut docs = rbac(namespace);
    docs.extend(workload(namespace, image));
    docs.push(serde_json::to_value(reg.mutating()).expect("serializes"));
    docs.push(serde_json::to_value(reg.validating()).expect("serializes"));
    docs.iter()
        .map(|d| serde_yaml::to_string(d).expect("YAML serializes"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_exclude_system_namespaces_and_carry_the_cel() {
        let m = serde_json::to_value(Registration::in_cluster("gpu-pilot").mutating()).unwrap();
        let w = &m["webhooks"][0];
        assert_eq!(
            w["namespaceSelector"]["matchExpressions"][0]["values"],
            json!(["kube-system", "gpu-pilot"])
        );
        assert_eq!(w["clientConfig"]["service"]["path"], "/mutate/pods");
        assert_eq!(w["reinvocationPolicy"], "IfNeeded");
        assert!(
            w["matchConditions"][0]["expression"]
                .as_str()
                .unwrap()
                .contains("k.startsWith('nvidia.com/mig-')")
        );
        let v = serde_json::to_value(Registration::in_cluster("gpu-pilot").validating()).unwrap();
        assert_eq!(
            v["webhooks"][0]["rules"][0]["resources"],
            json!(["clusterpolicies"])
        );
        assert!(v["webhooks"][0].get("objectSelector").is_none());
    }

    #[test]
    fn url_targets_and_ca_bundles_render() {
        let mut reg = Registration::in_cluster("x");
        reg.target = Target::Url("https://127.0.0.1:9443/".into());
        reg.ca_bundle = Some(b"PEM".to_vec());
        let v = serde_json::to_value(reg.validating()).unwrap();
        assert_eq!(
            v["webhooks"][0]["clientConfig"]["url"],
            "https://127.0.0.1:9443/validate/clusterpolicy"
        );
        assert_eq!(v["webhooks"][0]["clientConfig"]["caBundle"], "UEVN");
    }

    #[test]
    fn rbac_writes_only_its_own_objects() {
        let docs = rbac("gpu-pilot");
        let text = serde_json::to_string(&docs).unwrap();
        assert!(!text.contains("\"*\""), "no wildcards");
        let cluster_role = &docs[1]["rules"];
        for rule in cluster_role.as_array().unwrap() {
            let verbs = rule["verbs"].as_array().unwrap();
            if verbs.iter().any(|v| v == "update") {
                assert_eq!(rule["resourceNames"], json!([webhook::NAME]));
            }
        }
        let yaml = all_yaml(
            "gpu-pilot",
            "ghcr.io/gpu-pilot/gpu-pilot-webhook:v0.1.0",
            Some("gpu-pilot/webhook".into()),
        );
        assert_eq!(
            yaml.split("---\n").count(),
            9,
            "5 RBAC objects, Service, Deployment, 2 configurations"
        );
        assert!(yaml.contains("cert-manager.io/inject-ca-from: gpu-pilot/webhook"));
    }
}
