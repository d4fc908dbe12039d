//! The [`ClusterView`] backed by the apiserver: watch caches for the ClusterPolicy and the nodes
//! (read on every pod, so never a round trip), and direct reads for the rarer policy reviews.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{annotation, resource};
use gpu_pilot_core::facts::pick_active;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::ListParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::handler::{BoxFuture, ClusterView, FactsError};
use crate::inventory::MigInventory;
use crate::validate::{Facts, GpuPod};

/// The watch caches did not fill in time.
#[derive(Debug, thiserror::Error)]
#[error(
    "the ClusterPolicy and Node caches were not filled within {timeout:?}; check that the CRD is installed and the webhook may list and watch clusterpolicies and nodes"
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
            ),
        )
        .default_backoff()
        .for_each(|e| async move {
            if let Err(e) = e {
                tracing::warn!(error = %e, "watching Nodes");
            }
        });
        let drive = async move {
            futures::future::join(policy_stream, node_stream).await;
        };
        (
            KubeView {
                client,
                scope,
                policies,
                nodes,
            },
            drive,
        )
    }

    /// Waits until both caches hold a first full list.
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<(), CachesNotReady> {
        let both = async {
            self.policies.wait_until_ready().await.ok();
            self.nodes.wait_until_ready().await.ok();
        };
        tokio::time::timeout(timeout, both)
            .await
            .map_err(|_| CachesNotReady { timeout })
    }

    async fn gpu_pods(&self) -> Result<Vec<GpuPod>, kube::Error> {
        let apis: Vec<Api<Pod>> = if self.scope.pod_namespaces.is_empty() {
            vec![Api::all(self.client.clone())]
        } else {
            self.scope
                .pod_namespaces
                .iter()
                .map(|ns| Api::namespaced(self.client.clone(), ns))
                .collect()
        };
        let mut out = Vec::new();
        // Finished pods hold no GPU.
        let lp = ListParams::default()
            .fields("status.phase!=Succeeded,status.phase!=Failed")
            .limit(500);
        for api in apis {
            let mut lp = lp.clone();
            loop {
                let page = api.list(&lp).await?;
                out.extend(page.items.iter().filter_map(gpu_pod));
                match page.metadata.continue_ {
                    Some(c) if !c.is_empty() => lp.continue_token = Some(c),
                    _ => break,
                }
            }
        }
        Ok(out)
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
            // Read from the API, not the cache: two creates racing must see each other as far
            // as the apiserver allows.
            let mut lp = ListParams::default();
            if !self.scope.policy_selector.is_empty() {
                lp = lp.labels(&self.scope.policy_selector);
            }
            let policies = Api::<ClusterPolicy>::all(self.client.clone())
                .list_metadata(&lp)
                .await
                .map_err(|e| FactsError(format!("listing ClusterPolicies: {e}")))?;
            let other_policies = policies
                .items
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .filter(|n| n != policy_name)
                .collect();
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
                self.gpu_pods()
                    .await
                    .map_err(|e| FactsError(format!("listing pods: {e}")))?
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
