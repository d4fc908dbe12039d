//! Reading NVIDIA's installation: its ClusterPolicy, the Helm release that installed it, its
//! operator Deployment, its operand DaemonSets and their pods, and the GPU pods they serve.

use std::collections::BTreeMap;

use gpu_pilot_api::names::{label, resource};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::core::GroupVersionKind;
use serde_json::Value;

use super::helm_release::{self, HelmRelease};
use super::plan::{NvidiaDaemonSet, NvidiaPod, Operator, Snapshot, component_of_app};
use crate::cluster::objects;
use crate::cluster::{Kube, explain};

/// NVIDIA's ClusterPolicy kind.
pub fn nvidia_policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("nvidia.com", "v1", "ClusterPolicy"),
        "clusterpolicies",
    )
}

fn err(kube: &Kube, doing: &str) -> impl Fn(kube::Error) -> anyhow::Error {
    let server = kube.server.clone();
    let doing = doing.to_string();
    move |e| anyhow::anyhow!(explain(&e, &server, &doing))
}

/// Everything migrate needs to know, in a handful of requests.
pub async fn gather(kube: &Kube) -> anyhow::Result<Snapshot> {
    let policies: Api<DynamicObject> =
        Api::all_with(kube.client.clone(), &nvidia_policy_resource());
    let list = match policies.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
            "NVIDIA's GPU Operator is not installed here: the cluster at {} serves no clusterpolicies.nvidia.com; nothing to migrate (use `kubectl gpu install`)",
            kube.server
        ),
        Err(e) => return Err(err(kube, "reading NVIDIA's ClusterPolicies")(e)),
    };
    let policy = match list.as_slice() {
        [] => anyhow::bail!(
            "NVIDIA's CRD is installed but there is no ClusterPolicy (nvidia.com/v1): nothing to migrate; use `kubectl gpu install`"
        ),
        [one] => serde_json::to_value(one)?,
        many => anyhow::bail!(
            "{} ClusterPolicies of NVIDIA's exist ({}); NVIDIA's operator runs only the oldest. Delete the others, then migrate",
            many.len(),
            many.iter()
                .map(|p| p.name_any())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let policy_uid = policy["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();

    // The operator's namespace: the Deployment NVIDIA's chart makes, else the policy's status.
    let deployments: Api<Deployment> = Api::all(kube.client.clone());
    let found = deployments
        .list(&ListParams::default().labels("app.kubernetes.io/component=gpu-operator"))
        .await
        .map_err(err(kube, "looking for NVIDIA's operator Deployment"))?;
    let namespace = found
        .items
        .first()
        .and_then(|d| d.namespace())
        .or_else(|| policy["status"]["namespace"].as_str().map(str::to_string))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot tell which namespace NVIDIA's operator runs in: no Deployment labelled app.kubernetes.io/component=gpu-operator and no status.namespace on its ClusterPolicy"
            )
        })?;
    let operators = found
        .items
        .iter()
        .filter(|d| d.namespace().as_deref() == Some(namespace.as_str()))
        .map(|d| Operator {
            name: d.name_any(),
            replicas: d.spec.replicas.unwrap_or(1),
        })
        .collect();

    // Its operand DaemonSets: those its ClusterPolicy owns.
    let daemonsets: Api<DaemonSet> = Api::namespaced(kube.client.clone(), &namespace);
    let ds_list = daemonsets
        .list(&ListParams::default())
        .await
        .map_err(err(kube, &format!("listing DaemonSets in {namespace}")))?;
    let owned_by_policy =
        |refs: &Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            refs.iter()
                .flatten()
                .any(|r| r.uid == policy_uid && r.kind == "ClusterPolicy")
        };
    let app_of = |labels: &BTreeMap<String, String>| labels.get("app").cloned().unwrap_or_default();
    let nvidia_daemonsets: Vec<NvidiaDaemonSet> = ds_list
        .items
        .iter()
        .filter(|d| owned_by_policy(&d.metadata.owner_references))
        .map(|d| NvidiaDaemonSet {
            name: d.name_any(),
            component: component_of_app(&app_of(d.labels())),
        })
        .collect();
    let nvidia_ds_names: Vec<String> = nvidia_daemonsets.iter().map(|d| d.name.clone()).collect();

    // Their pods: owned by one of them, or (a resumed run) NVIDIA's by their `app` label.
    let pods: Api<Pod> = Api::namespaced(kube.client.clone(), &namespace);
    let pod_list = pods
        .list(&ListParams::default())
        .await
        .map_err(err(kube, &format!("listing pods in {namespace}")))?;
    let nvidia_pods = pod_list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let app = app_of(p.labels());
            let owner = p
                .owner_references()
                .iter()
                .find(|r| r.controller == Some(true))
                .map(|r| (r.kind.clone(), r.name.clone()));
            let ours = p.labels().get(label::MANAGED_BY).map(String::as_str)
                == Some(label::MANAGED_BY_VALUE);
            let nvidia = match &owner {
                Some((kind, name)) => kind == "DaemonSet" && nvidia_ds_names.contains(name),
                // Orphaned by an earlier run, or adopted by gpu-pilot but still NVIDIA's image.
                None => is_nvidia_operand_app(&app),
            } || (ours && is_nvidia_operand_app(&app));
            if !nvidia || app.is_empty() {
                return None;
            }
            Some(NvidiaPod {
                name: p.name_any(),
                node: p.spec.as_ref()?.node_name.clone().unwrap_or_default(),
                component: component_of_app(&app),
                handed_over: ours,
            })
        })
        .collect();

    // GPU pods anywhere: what the takeover must not disturb.
    let all_pods: Api<Pod> = Api::all(kube.client.clone());
    let running = all_pods
        .list(&ListParams::default().fields("status.phase=Running"))
        .await
        .map_err(err(kube, "listing running pods"))?;
    let mut gpu_pods: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in &running.items {
        if uses_gpus(p) {
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default();
            gpu_pods.entry(node).or_default().push(format!(
                "{}/{}",
                p.namespace().unwrap_or_default(),
                p.name_any()
            ));
        }
    }

    // What NVIDIA's operator made under names gpu-pilot's install and controller use.
    let mut to_adopt = Vec::new();
    let runtime_class = policy["spec"]["operator"]["runtimeClass"]
        .as_str()
        .unwrap_or("nvidia")
        .to_string();
    if let Some(rc) = Api::<RuntimeClass>::all(kube.client.clone())
        .get_metadata_opt(&runtime_class)
        .await
        .map_err(err(kube, "reading RuntimeClasses"))?
        && !objects::is_ours("RuntimeClass", &runtime_class, &rc.metadata)
    {
        to_adopt.push(format!("RuntimeClass/{runtime_class}"));
    }
    let cms: Api<ConfigMap> = Api::namespaced(kube.client.clone(), &namespace);
    let mig = gpu_pilot_core::render::install::MIG_PARTED_CONFIG;
    if let Some(cm) = cms
        .get_metadata_opt(mig)
        .await
        .map_err(err(kube, "reading ConfigMaps"))?
        && !objects::is_ours("ConfigMap", mig, &cm.metadata)
    {
        to_adopt.push(format!("ConfigMap/{namespace}/{mig}"));
    }

    // The runtime each GPU node runs.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(kube.client.clone());
    let node_list = nodes
        .list(&ListParams::default())
        .await
        .map_err(err(kube, "listing nodes"))?;
    let node_runtimes = node_list
        .items
        .iter()
        .filter(|n| {
            let l = n.labels();
            l.get(label::GPU_PRESENT).map(String::as_str) == Some("true")
                || label::NFD_GPU_LABELS
                    .iter()
                    .any(|k| l.get(*k).map(String::as_str) == Some("true"))
        })
        .filter_map(|n| {
            let version = n
                .status
                .as_ref()?
                .node_info
                .as_ref()?
                .container_runtime_version
                .clone();
            let runtime = version.split("://").next().unwrap_or_default().to_string();
            Some((n.name_any(), runtime))
        })
        .collect();

    let release = helm_release(kube, &namespace).await?;
    Ok(Snapshot {
        policy,
        namespace,
        release,
        operators,
        daemonsets: nvidia_daemonsets,
        pods: nvidia_pods,
        gpu_pods,
        to_adopt,
        node_runtimes,
    })
}

/// NVIDIA's operand pods carry their DaemonSet's name as `app`.
fn is_nvidia_operand_app(app: &str) -> bool {
    app.starts_with("nvidia-") || app == "gpu-feature-discovery"
}

/// A pod whose containers ask for NVIDIA GPU resources.
pub fn uses_gpus(p: &Pod) -> bool {
    p.spec.iter().flat_map(|s| &s.containers).any(|c| {
        c.resources
            .iter()
            .flat_map(|r| {
                r.limits
                    .iter()
                    .chain(r.requests.iter())
                    .flat_map(|m| m.keys())
            })
            .any(|k| resource::is_gpu_resource(k))
    })
}

/// The newest deployed Helm release of NVIDIA's chart in `namespace`, if Helm installed it
/// (Secrets, Helm's default storage; ConfigMaps with `--storage configmap`).
async fn helm_release(kube: &Kube, namespace: &str) -> anyhow::Result<Option<HelmRelease>> {
    let lp = ListParams::default().labels("owner=helm,status=deployed");
    let mut entries: Vec<Vec<u8>> = Vec::new();
    let secrets: Api<Secret> = Api::namespaced(kube.client.clone(), namespace);
    match secrets.list(&lp).await {
        Ok(list) => entries.extend(
            list.items
                .into_iter()
                .filter(|s| s.name_any().starts_with("sh.helm.release.v1."))
                .filter_map(|s| s.data?.remove("release").map(|b| b.0)),
        ),
        // Not allowed to read Secrets: say so rather than guess.
        Err(e) => {
            return Err(err(
                kube,
                &format!("reading Helm's release Secrets in {namespace}"),
            )(e));
        }
    }
    let cms: Api<ConfigMap> = Api::namespaced(kube.client.clone(), namespace);
    if let Ok(list) = cms.list(&lp).await {
        entries.extend(
            list.items
                .into_iter()
                .filter_map(|c| c.data?.remove("release").map(String::into_bytes)),
        );
    }
    let mut best: Option<HelmRelease> = None;
    for entry in entries {
        let r = match helm_release::decode(&entry) {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "warning: a Helm release record in {namespace} cannot be read ({e}); ignoring it"
                );
                continue;
            }
        };
        if r.chart == "gpu-operator" && best.as_ref().is_none_or(|b| r.revision > b.revision) {
            best = Some(r);
        }
    }
    Ok(best)
}

/// Whether gpu-pilot's own ClusterPolicy exists already (a resumed run).
pub async fn gpu_pilot_installed(kube: &Kube) -> anyhow::Result<bool> {
    let api: Api<gpu_pilot_api::ClusterPolicy> = Api::all(kube.client.clone());
    match api.list_metadata(&ListParams::default()).await {
        Ok(l) => Ok(!l.items.is_empty()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(err(kube, "reading gpu-pilot's ClusterPolicies")(e)),
    }
}

/// The `kind/name` of an owner reference to NVIDIA's ClusterPolicy.
pub fn is_nvidia_policy_owner(r: &Value) -> bool {
    r["kind"] == "ClusterPolicy"
        && r["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with(&format!("{}/", nvidia_policy_resource().group)))
}
