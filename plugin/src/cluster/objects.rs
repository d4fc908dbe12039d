//! Applying and deleting the rendered objects through dynamic APIs.

use gpu_pilot_api::names::{annotation, field_manager, label};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;

use crate::cluster::{Kube, explain};
use gpu_pilot_core::render::key;

/// The plural resource name and scope of every kind install renders.
fn resource_of(kind: &str) -> Option<(&'static str, bool)> {
    Some(match kind {
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "Namespace" => ("namespaces", false),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "MutatingWebhookConfiguration" => ("mutatingwebhookconfigurations", false),
        "ValidatingWebhookConfiguration" => ("validatingwebhookconfigurations", false),
        "ValidatingAdmissionPolicy" => ("validatingadmissionpolicies", false),
        "ValidatingAdmissionPolicyBinding" => ("validatingadmissionpolicybindings", false),
        "ClusterPolicy" => ("clusterpolicies", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "ConfigMap" => ("configmaps", true),
        "Service" => ("services", true),
        "Deployment" => ("deployments", true),
        "Issuer" => ("issuers", true),
        "Certificate" => ("certificates", true),
        "RuntimeClass" => ("runtimeclasses", false),
        _ => return None,
    })
}

/// The dynamic API for an object's kind (in its namespace, for namespaced kinds).
pub fn api_for(kube: &Kube, obj: &Value) -> anyhow::Result<Api<DynamicObject>> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let (plural, namespaced) =
        resource_of(kind).ok_or_else(|| anyhow::anyhow!("kubectl-gpu cannot apply kind {kind}"))?;
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Ok(if namespaced {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
        Api::namespaced_with(kube.client.clone(), ns, &ar)
    } else {
        Api::all_with(kube.client.clone(), &ar)
    })
}

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Changed,
    Unchanged,
}

/// The dynamic API for any kind: the kinds install renders directly, others (`extraObjects`)
/// through the apiserver's discovery.
async fn api_for_any(kube: &Kube, obj: &Value) -> anyhow::Result<Api<DynamicObject>> {
    let kind = obj["kind"].as_str().unwrap_or_default();
    if resource_of(kind).is_some() {
        return api_for(kube, obj);
    }
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (ar, caps) = kube::discovery::pinned_kind(&kube.client, &gvk)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: the cluster does not serve {api_version} {kind} (is its CRD installed?)",
                explain(&e, &kube.server, &format!("looking up {}", key(obj)))
            )
        })?;
    Ok(match caps.scope {
        kube::discovery::Scope::Namespaced => {
            let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
            Api::namespaced_with(kube.client.clone(), ns, &ar)
        }
        kube::discovery::Scope::Cluster => Api::all_with(kube.client.clone(), &ar),
    })
}

/// Server-side apply one object as `kubectl-gpu`; tells whether anything changed. An object that
/// exists is first applied as a dry run: when that would change nothing but bookkeeping, nothing
/// is written. (A plain no-op apply is not always free: on an object whose status another manager
/// applies, e.g. a ValidatingAdmissionPolicy's type checking, it reorders `managedFields` and
/// bumps the resourceVersion.)
pub async fn apply(kube: &Kube, obj: &Value, dry_run: bool) -> anyhow::Result<Applied> {
    let api = api_for_any(kube, obj).await?;
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let failed = |what: &str, e: &kube::Error| {
        anyhow::anyhow!(explain(e, &kube.server, &format!("{what} {}", key(obj))))
    };
    let before = api.get_opt(name).await.map_err(|e| failed("reading", &e))?;
    let mut pp = PatchParams::apply(gpu_pilot_api::names::field_manager::PLUGIN).force();
    pp.dry_run = true;
    if let Some(b) = &before {
        let would = api
            .patch(name, &pp, &Patch::Apply(obj))
            .await
            .map_err(|e| failed("applying", &e))?;
        if same_content(b, &would) {
            return Ok(Applied::Unchanged);
        }
        if dry_run {
            return Ok(Applied::Changed);
        }
    }
    pp.dry_run = dry_run;
    api.patch(name, &pp, &Patch::Apply(obj))
        .await
        .map_err(|e| failed("applying", &e))?;
    Ok(match before {
        None => Applied::Created,
        Some(_) => Applied::Changed,
    })
}

/// Whether two versions of an object differ only in the apiserver's bookkeeping
/// (`resourceVersion`, `managedFields`).
fn same_content(a: &DynamicObject, b: &DynamicObject) -> bool {
    let strip = |o: &DynamicObject| {
        let mut v = serde_json::to_value(o).unwrap_or_default();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        v
    };
    strip(a) == strip(b)
}

/// Who made an object that has gpu-pilot's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// Nothing by that name.
    Absent,
    /// gpu-pilot made it (see [`is_ours`]).
    Ours,
    /// Someone else did: install must not overwrite it, uninstall must not delete it.
    Foreign,
}

/// Whether gpu-pilot made an object, judged from its metadata alone: every object gpu-pilot
/// creates carries `app.kubernetes.io/managed-by: gpu-pilot`. A Namespace is gpu-pilot's only if
/// install created it (the annotation [`annotation::NAMESPACE_CREATED_BY`]): install never marks a
/// namespace that existed before it, so a namespace of one's own is never deleted. The CRD of
/// gpu-pilot's own API group made by an older release carried only `part-of`.
pub fn is_ours(kind: &str, name: &str, meta: &ObjectMeta) -> bool {
    let label = |k: &str| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(k))
            .map(String::as_str)
    };
    match kind {
        "Namespace" => meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation::NAMESPACE_CREATED_BY))
            .is_some_and(|v| v == field_manager::PLUGIN),
        "CustomResourceDefinition"
            if name.ends_with(".gpupilot.io") && label(label::PART_OF) == Some("gpu-pilot") =>
        {
            true
        }
        _ => label(label::MANAGED_BY) == Some(label::MANAGED_BY_VALUE),
    }
}

/// Who made the object named like `obj`, and its uid when it exists.
pub async fn ownership(kube: &Kube, obj: &Value) -> anyhow::Result<(Ownership, Option<String>)> {
    let api = api_for(kube, obj)?;
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    match api.get_metadata_opt(name).await {
        Ok(None) => Ok((Ownership::Absent, None)),
        // A kind whose CRD is missing (cert-manager's) holds nothing.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok((Ownership::Absent, None)),
        Ok(Some(o)) => {
            let verdict = if is_ours(kind, name, &o.metadata) {
                Ownership::Ours
            } else {
                Ownership::Foreign
            };
            Ok((verdict, o.metadata.uid))
        }
        Err(e) => Err(anyhow::anyhow!(explain(
            &e,
            &kube.server,
            &format!("reading {}", key(obj))
        ))),
    }
}

/// What [`delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// It was gpu-pilot's and is now being deleted.
    Deleted,
    /// Nothing to delete (absent, or already terminating).
    Absent,
    /// It exists but gpu-pilot did not make it: left as it is.
    Kept,
}

/// Delete one object if, and only if, gpu-pilot made it. The delete carries the uid that was
/// judged, so an object replaced in between by someone else's is never deleted.
pub async fn delete(kube: &Kube, obj: &Value) -> anyhow::Result<Deleted> {
    let api = api_for(kube, obj)?;
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let meta = match api.get_metadata_opt(name).await {
        Ok(Some(o)) => o.metadata,
        Ok(None) => return Ok(Deleted::Absent),
        // A kind whose CRD is gone (cert-manager's) has nothing left to delete.
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Deleted::Absent),
        Err(e) => {
            return Err(anyhow::anyhow!(explain(
                &e,
                &kube.server,
                &format!("reading {}", key(obj))
            )));
        }
    };
    // Already going (a namespace terminating) counts as gone.
    if meta.deletion_timestamp.is_some() {
        return Ok(Deleted::Absent);
    }
    if !is_ours(kind, name, &meta) {
        return Ok(Deleted::Kept);
    }
    let mut dp = DeleteParams::background();
    dp.preconditions = meta.uid.map(|uid| Preconditions {
        uid: Some(uid),
        resource_version: None,
    });
    match api.delete(name, &dp).await {
        Ok(_) => Ok(Deleted::Deleted),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 405 => Ok(Deleted::Absent),
        // The uid precondition failed: the object was replaced since it was read.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Deleted::Kept),
        Err(e) => Err(anyhow::anyhow!(explain(
            &e,
            &kube.server,
            &format!("deleting {}", key(obj))
        ))),
    }
}

/// Whether an object exists (a missing kind counts as missing).
pub async fn exists(kube: &Kube, obj: &Value) -> anyhow::Result<bool> {
    let api = api_for(kube, obj)?;
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match api.get_metadata_opt(name).await {
        Ok(o) => Ok(o.is_some()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(anyhow::anyhow!(explain(
            &e,
            &kube.server,
            &format!("reading {}", key(obj))
        ))),
    }
}

/// The ConfigMaps of `namespace` that install made from values (`config.create/data`), as objects
/// `delete` takes: their names depend on the values, so they are found by label.
pub async fn values_config_maps(kube: &Kube, namespace: &str) -> anyhow::Result<Vec<Value>> {
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(kube.client.clone(), namespace);
    let selector = format!(
        "{}={},{}={}",
        gpu_pilot_api::names::label::MANAGED_BY,
        gpu_pilot_api::names::label::MANAGED_BY_VALUE,
        gpu_pilot_api::names::label::COMPONENT,
        gpu_pilot_core::render::install::VALUES_CONFIG_COMPONENT
    );
    let list = api
        .list_metadata(&kube::api::ListParams::default().labels(&selector))
        .await
        .map_err(|e| {
            anyhow::anyhow!(explain(
                &e,
                &kube.server,
                &format!("listing ConfigMaps in {namespace}")
            ))
        })?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|m| m.metadata.name)
        .map(|name| {
            serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": { "name": name, "namespace": namespace },
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ObjectMeta {
        let map = |kv: &[(&str, &str)]| {
            Some(
                kv.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        ObjectMeta {
            labels: map(labels),
            annotations: map(annotations),
            ..Default::default()
        }
    }

    const OURS: (&str, &str) = (label::MANAGED_BY, label::MANAGED_BY_VALUE);

    #[test]
    fn only_the_managed_by_label_makes_an_object_ours() {
        assert!(is_ours(
            "ConfigMap",
            "default-mig-parted-config",
            &meta(&[OURS], &[])
        ));
        assert!(!is_ours(
            "ConfigMap",
            "default-mig-parted-config",
            &meta(&[], &[])
        ));
        assert!(!is_ours(
            "RuntimeClass",
            "nvidia",
            &meta(&[(label::MANAGED_BY, "gpu-operator")], &[])
        ));
        assert!(!is_ours(
            "ClusterRole",
            "gpu-pilot-controller",
            &meta(&[(label::PART_OF, "gpu-pilot")], &[])
        ));
    }

    #[test]
    fn a_namespace_is_ours_only_if_install_created_it() {
        // An existing namespace install ran in: labelled by an older release, never created by it.
        assert!(!is_ours("Namespace", "ml", &meta(&[OURS], &[])));
        assert!(!is_ours("Namespace", "ml", &meta(&[], &[])));
        assert!(!is_ours(
            "Namespace",
            "ml",
            &meta(&[], &[(annotation::NAMESPACE_CREATED_BY, "helm")])
        ));
        assert!(is_ours(
            "Namespace",
            "gpu-pilot",
            &meta(
                &[OURS],
                &[(annotation::NAMESPACE_CREATED_BY, field_manager::PLUGIN)]
            )
        ));
    }

    #[test]
    fn the_crd_of_gpu_pilots_group_from_an_older_release_is_ours() {
        let old = meta(&[(label::PART_OF, "gpu-pilot")], &[]);
        assert!(is_ours(
            "CustomResourceDefinition",
            "clusterpolicies.gpupilot.io",
            &old
        ));
        assert!(!is_ours(
            "CustomResourceDefinition",
            "clusterpolicies.nvidia.com",
            &old
        ));
        assert!(is_ours(
            "CustomResourceDefinition",
            "clusterpolicies.gpupilot.io",
            &meta(&[OURS], &[])
        ));
    }

    #[test]
    fn the_rendered_namespace_is_marked_as_created_by_install() {
        let values =
            gpu_pilot_core::values::Values::from_tree(gpu_pilot_core::values::default_tree())
                .unwrap();
        let objs = gpu_pilot_core::render::install::objects(
            "gpu-pilot",
            &values,
            gpu_pilot_core::render::install::Include::ALL,
        );
        let ns = objs.iter().find(|o| o["kind"] == "Namespace").unwrap();
        let m: ObjectMeta = serde_json::from_value(ns["metadata"].clone()).unwrap();
        assert!(is_ours("Namespace", "gpu-pilot", &m));
        // Everything else install renders carries the label.
        for o in &objs {
            let m: ObjectMeta = serde_json::from_value(o["metadata"].clone()).unwrap();
            let kind = o["kind"].as_str().unwrap();
            assert!(
                is_ours(kind, m.name.as_deref().unwrap(), &m),
                "{}",
                gpu_pilot_core::render::key(o)
            );
        }
    }
}
