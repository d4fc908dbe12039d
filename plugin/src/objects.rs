//! Applying and deleting the rendered objects through dynamic APIs.

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;

use crate::context::{Kube, explain};
use crate::render::key;

/// The plural resource name and scope of every kind install renders.
fn resource_of(kind: &str) -> Option<(&'static str, bool)> {
    Some(match kind {
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "Namespace" => ("namespaces", false),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "MutatingWebhookConfiguration" => ("mutatingwebhookconfigurations", false),
        "ValidatingWebhookConfiguration" => ("validatingwebhookconfigurations", false),
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

/// Server-side apply one object as `kubectl-gpu`; tells whether anything changed.
pub async fn apply(kube: &Kube, obj: &Value, dry_run: bool) -> anyhow::Result<Applied> {
    let api = api_for_any(kube, obj).await?;
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let before = api.get_metadata_opt(name).await.map_err(|e| {
        anyhow::anyhow!(explain(&e, &kube.server, &format!("reading {}", key(obj))))
    })?;
    let mut pp = PatchParams::apply(gpu_pilot_api::names::field_manager::PLUGIN).force();
    pp.dry_run = dry_run;
    let after = api
        .patch(name, &pp, &Patch::Apply(obj))
        .await
        .map_err(|e| {
            anyhow::anyhow!(explain(&e, &kube.server, &format!("applying {}", key(obj))))
        })?;
    Ok(match before {
        None => Applied::Created,
        Some(b) if b.metadata.resource_version == after.metadata.resource_version => {
            Applied::Unchanged
        }
        Some(_) => Applied::Changed,
    })
}

/// Delete one object; `false` when it was not there.
pub async fn delete(kube: &Kube, obj: &Value) -> anyhow::Result<bool> {
    let api = api_for(kube, obj)?;
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    // Already going (a namespace terminating) counts as gone.
    match api.get_metadata_opt(name).await {
        Ok(Some(o)) if o.metadata.deletion_timestamp.is_some() => return Ok(false),
        Ok(None) => return Ok(false),
        _ => {}
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        // A kind whose CRD is gone (cert-manager's) has nothing left to delete.
        Err(kube::Error::Api(s)) if s.code == 405 => Ok(false),
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
        crate::render::VALUES_CONFIG_COMPONENT
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

/// Whether an object carries gpu-pilot's `managed-by` label (a missing object counts as not).
pub async fn made_by_gpu_pilot(kube: &Kube, obj: &Value) -> anyhow::Result<bool> {
    let api = api_for(kube, obj)?;
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let found = api.get_metadata_opt(name).await.map_err(|e| {
        anyhow::anyhow!(explain(&e, &kube.server, &format!("reading {}", key(obj))))
    })?;
    Ok(found.is_some_and(|o| {
        o.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(gpu_pilot_api::names::label::MANAGED_BY))
            .map(String::as_str)
            == Some(gpu_pilot_api::names::label::MANAGED_BY_VALUE)
    }))
}
