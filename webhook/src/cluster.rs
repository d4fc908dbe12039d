//! The [`ClusterView`] backed by the apiserver: watch caches for the ClusterPolicy, the nodes
//! (read on every pod, so never a round trip) and the GPU pods, and direct reads of the few
//! objects a policy review names.
//!
//! What is cached is only what the rules read, never whole objects: a Node keeps its name, its
//! `nvidia.com/gpu.product` label and its `nvidia.com/mig-*` capacity; a pod is kept only while
//! it holds GPUs, and then only as its namespace, name and whether it uses MIG. A policy review,
//! forged or real, costs no LIST: the webhook's Service is reachable by any pod, so a review must
//! not be able to make the webhook load the apiserver.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{annotation, label, resource};
use gpu_pilot_core::facts::pick_active;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::ListParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::handler::{BoxFuture, ClusterView, FactsError};
use crate::inventory::MigInventory;
use crate::validate::{Facts, GpuPod};

/// The watch caches did not fill in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "the ClusterPolicy, Node and Pod caches were not filled within {timeout:?}; check that the CRD is installed and the webhook may list and watch clusterpolicies, nodes and pods"
)]
pub struct CachesNotReady {
    pub timeout: Duration,
}

/// Which objects the webhook looks at.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Namespace of the ConfigMaps a policy names (gpu-pilot's own namespace).
    pub namespace: String,
    /// Label selector for the ClusterPolicies considered (empty: all).
    pub policy_selector: String,
    /// Label selector for the nodes whose MIG profiles count (empty: all).
    pub node_selector: String,
    /// Namespaces whose pods count as running GPU work (empty: all).
    pub pod_namespaces: Vec<String>,
}

pub struct KubeView {
    client: Client,
    scope: Scope,
    policies: Store<ClusterPolicy>,
    nodes: Store<Node>,
    /// One per watched pod namespace (one for all when the scope names none).
    pods: Vec<Arc<PodIndex>>,
}

/// Finished pods hold no GPU; a pod that finishes leaves a watch with this selector as a delete.
const UNFINISHED: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// Keeps of a Node only what [`MigInventory::from_nodes`] reads: the GPU product label and the
/// MIG capacity (no images, conditions, managedFields or other labels).
pub fn strip_node(node: &mut Node) {
    let keep = Node {
        metadata: kube::api::ObjectMeta {
            name: node.metadata.name.take(),
            resource_version: node.metadata.resource_version.take(),
            labels: node.metadata.labels.take().map(|mut l| {
                l.retain(|k, _| k == label::GPU_PRODUCT);
                l
            }),
            ..Default::default()
        },
        spec: None,
        status: node
            .status
            .take()
            .map(|s| k8s_openapi::api::core::v1::NodeStatus {
                capacity: s.capacity.map(|mut c| {
                    c.retain(|k, _| k.starts_with(resource::MIG_PREFIX));
                    c
                }),
                ..Default::default()
            }),
    };
    *node = keep;
}

/// The GPU pods of one watch that have not finished, by namespace and name, with whether each
/// uses MIG. Filled from the watch's events; a relist replaces it whole.
#[derive(Default)]
pub struct PodIndex {
    pods: RwLock<BTreeMap<(String, String), bool>>,
    listed: tokio::sync::watch::Sender<bool>,
}

impl PodIndex {
    /// Applies one watch event. `pending` holds a relist until it is complete.
    pub fn on(&self, pending: &mut Option<BTreeMap<(String, String), bool>>, event: Event<Pod>) {
        let entry = |p: &Pod| {
            let key = (p.namespace().unwrap_or_default(), p.name_any());
            let finished = p
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|ph| ph == "Succeeded" || ph == "Failed");
            (key, gpu_pod(p).filter(|_| !finished).map(|g| g.uses_mig))
        };
        match event {
            Event::Init => *pending = Some(BTreeMap::new()),
            Event::InitApply(p) => {
                if let (Some(m), (key, Some(mig))) = (pending.as_mut(), entry(&p)) {
                    m.insert(key, mig);
                }
            }
            Event::InitDone => {
                if let Some(m) = pending.take() {
                    *self.pods.write().expect("pod index lock") = m;
                    self.listed.send_replace(true);
                }
            }
            Event::Apply(p) => {
                let (key, gpu) = entry(&p);
                let mut pods = self.pods.write().expect("pod index lock");
                match gpu {
                    Some(mig) => pods.insert(key, mig),
                    None => pods.remove(&key),
                };
            }
            Event::Delete(p) => {
                let (key, _) = entry(&p);
                self.pods.write().expect("pod index lock").remove(&key);
            }
        }
    }

    pub fn gpu_pods(&self) -> Vec<GpuPod> {
        self.pods
            .read()
            .expect("pod index lock")
            .iter()
            .map(|((namespace, name), mig)| GpuPod {
                namespace: namespace.clone(),
                name: name.clone(),
                uses_mig: *mig,
            })
            .collect()
    }

    async fn wait_listed(&self) {
        let _ = self.listed.subscribe().wait_for(|l| *l).await;
    }
}

impl KubeView {
    /// Starts the watches; the returned future drives them and must be spawned.
    pub fn start(client: Client, scope: Scope) -> (KubeView, impl Future<Output = ()> + Send) {
        let (policies, pw) = reflector::store();
        let (nodes, nw) = reflector::store();
        let policy_stream = reflector::reflector(
            pw,
            watcher(
                Api::<ClusterPolicy>::all(client.clone()),
                watcher::Config::default().labels(&scope.policy_selector),
            ),
        )
        .default_backoff()
        .for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!(error = %e, "watching ClusterPolicies (is the CRD installed?)");
            }
        });
        let node_stream = reflector::reflector(
            nw,
            watcher(
                Api::<Node>::all(client.clone()),
                watcher::Config::default().labels(&scope.node_selector),
            )
            .modify(strip_node),
        )
        .default_backoff()
        .for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!(error = %e, "watching Nodes");
            }
        });
        let apis: Vec<Api<Pod>> = if scope.pod_namespaces.is_empty() {
            vec![Api::all(client.clone())]
        } else {
            scope
                .pod_namespaces
                .iter()
                .map(|ns| Api::namespaced(client.clone(), ns))
                .collect()
        };
        let pods: Vec<Arc<PodIndex>> = apis.iter().map(|_| Arc::default()).collect();
        let pod_streams = apis
            .into_iter()
            .zip(pods.clone())
            .map(|(api, index)| async move {
                let mut pending = None;
                let events =
                    watcher(api, watcher::Config::default().fields(UNFINISHED)).default_backoff();
                let mut events = std::pin::pin!(events);
                while let Some(e) = events.next().await {
                    match e {
                        Ok(e) => index.on(&mut pending, e),
                        Err(e) => tracing::warn!(error = %e, "watching Pods"),
                    }
                }
            });
        let drive = async move {
            futures::future::join3(
                policy_stream,
                node_stream,
                futures::future::join_all(pod_streams),
            )
            .await;
        };
        (
            KubeView {
                client,
                scope,
                policies,
                nodes,
                pods,
            },
            drive,
        )
    }

    /// Waits until every cache holds a first full list.
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<(), CachesNotReady> {
        let both = async {
            self.policies.wait_until_ready().await.ok();
            self.nodes.wait_until_ready().await.ok();
            futures::future::join_all(self.pods.iter().map(|p| p.wait_listed())).await;
        };
        tokio::time::timeout(timeout, both)
            .await
            .map_err(|_| CachesNotReady { timeout })
    }
}

/// The pod as the policy rules see it, when it holds GPUs.
pub fn gpu_pod(pod: &Pod) -> Option<GpuPod> {
    let spec = pod.spec.as_ref()?;
    let names: Vec<&String> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| c.resources.as_ref())
        .flat_map(|r| r.limits.iter().chain(r.requests.iter()))
        .flat_map(|m| m.keys())
        .filter(|k| resource::is_gpu_resource(k))
        .collect();
    if names.is_empty() {
        return None;
    }
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(annotation::MIG_PROFILE));
    Some(GpuPod {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uses_mig: annotated || names.iter().any(|n| n.starts_with(resource::MIG_PREFIX)),
    })
}

impl ClusterView for KubeView {
    fn active_policy(&self) -> Option<std::sync::Arc<ClusterPolicy>> {
        // There should be one; if a second slipped in before the webhook ran, the controller's
        // choice holds.
        let policies = self.policies.state();
        let active = pick_active(policies.iter().map(AsRef::as_ref))?.name_any();
        policies.into_iter().find(|p| p.name_any() == active)
    }

    fn mig_inventory(&self) -> MigInventory {
        let nodes = self.nodes.state();
        MigInventory::from_nodes(nodes.iter().map(|n| n.as_ref()))
    }

    fn policy_facts<'a>(
        &'a self,
        policy_name: &'a str,
        config_maps: Vec<String>,
        with_pods: bool,
    ) -> BoxFuture<'a, Result<Facts, FactsError>> {
        Box::pin(async move {
            // A create reads the policies from the API, not the cache: two creates racing must
            // see each other as far as the apiserver allows (one small metadata LIST, cluster-
            // scoped, usually of one object). Updates and deletes read the caches only.
            let other_policies = if with_pods {
                self.policies
                    .state()
                    .iter()
                    .map(|p| p.name_any())
                    .filter(|n| n != policy_name)
                    .collect()
            } else {
                let mut lp = ListParams::default();
                if !self.scope.policy_selector.is_empty() {
                    lp = lp.labels(&self.scope.policy_selector);
                }
                let policies = Api::<ClusterPolicy>::all(self.client.clone())
                    .list_metadata(&lp)
                    .await
                    .map_err(|e| FactsError(format!("listing ClusterPolicies: {e}")))?;
                policies
                    .items
                    .into_iter()
                    .filter_map(|p| p.metadata.name)
                    .filter(|n| n != policy_name)
                    .collect()
            };
            let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.scope.namespace);
            let mut found = BTreeMap::new();
            for name in config_maps {
                let cm = cms.get_opt(&name).await.map_err(|e| {
                    FactsError(format!(
                        "reading ConfigMap {}/{name}: {e}",
                        self.scope.namespace
                    ))
                })?;
                found.insert(name, cm);
            }
            let gpu_pods = if with_pods {
                self.pods.iter().flat_map(|p| p.gpu_pods()).collect()
            } else {
                Vec::new()
            };
            Ok(Facts {
                other_policies,
                gpu_pods,
                config_maps: found,
                namespace: self.scope.namespace.clone(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, resource: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"containers": [{"name": "c", "resources": {"limits": {resource: "1"}}}]},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    fn names(index: &PodIndex) -> Vec<String> {
        index
            .gpu_pods()
            .iter()
            .map(|p| format!("{}/{}:{}", p.namespace, p.name, p.uses_mig))
            .collect()
    }

    #[test]
    fn the_pod_index_keeps_only_unfinished_gpu_pods_and_a_relist_replaces_it() {
        let index = PodIndex::default();
        let mut pending = None;
        index.on(&mut pending, Event::Init);
        index.on(
            &mut pending,
            Event::InitApply(pod("a", "gpu", "nvidia.com/gpu", "Running")),
        );
        index.on(
            &mut pending,
            Event::InitApply(pod("a", "cpu", "cpu", "Running")),
        );
        index.on(
            &mut pending,
            Event::InitApply(pod("b", "mig", "nvidia.com/mig-1g.10gb", "Pending")),
        );
        // Nothing shows before the list is complete.
        assert!(index.gpu_pods().is_empty());
        assert!(!*index.listed.borrow());
        index.on(&mut pending, Event::InitDone);
        assert!(*index.listed.borrow());
        assert_eq!(names(&index), ["a/gpu:false", "b/mig:true"]);
        // A pod that finishes leaves, whether as an update or (through the field selector) a delete.
        index.on(
            &mut pending,
            Event::Apply(pod("a", "gpu", "nvidia.com/gpu", "Succeeded")),
        );
        index.on(
            &mut pending,
            Event::Apply(pod("c", "new", "nvidia.com/gpu.shared", "Running")),
        );
        index.on(
            &mut pending,
            Event::Apply(pod("c", "cpu", "memory", "Running")),
        );
        assert_eq!(names(&index), ["b/mig:true", "c/new:false"]);
        index.on(
            &mut pending,
            Event::Delete(pod("b", "mig", "nvidia.com/mig-1g.10gb", "Running")),
        );
        assert_eq!(names(&index), ["c/new:false"]);
        // A relist (after a watch error) replaces everything once complete.
        index.on(&mut pending, Event::Init);
        index.on(
            &mut pending,
            Event::InitApply(pod("d", "late", "nvidia.com/gpu", "Running")),
        );
        assert_eq!(names(&index), ["c/new:false"]);
        index.on(&mut pending, Event::InitDone);
        assert_eq!(names(&index), ["d/late:false"]);
    }

    #[test]
    fn a_cached_node_keeps_only_what_the_inventory_reads() {
        let full: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1", "resourceVersion": "7",
                "labels": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", "kubernetes.io/hostname": "n1"},
                "annotations": {"big": "x".repeat(10_000)},
                "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"podCIDR": "10.0.0.0/24"},
            "status": {
                "capacity": {"cpu": "64", "nvidia.com/mig-1g.10gb": "7", "nvidia.com/gpu": "0"},
                "images": [{"names": ["registry/huge:1"], "sizeBytes": 1}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }))
        .unwrap();
        let mut node = full.clone();
        strip_node(&mut node);
        assert_eq!(
            serde_json::to_value(&node).unwrap(),
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "n1", "resourceVersion": "7",
                    "labels": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"}},
                "status": {"capacity": {"nvidia.com/mig-1g.10gb": "7"}}
            })
        );
        assert_eq!(
            MigInventory::from_nodes([&node]),
            MigInventory::from_nodes([&full]),
            "the inventory reads the same from the stripped node"
        );
    }
}
