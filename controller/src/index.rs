//! The in-memory view of the cluster, fed by watches. Only the facts the decisions need are
//! kept (labels, readiness, counts), never whole objects, so 1,000 nodes and their operand pods
//! fit in a few MiB.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{Component, label};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::render::hash_of;
use crate::rollout::{NodeFacts, PodFacts};
use crate::status::DaemonSetCounts;

/// An operand DaemonSet as observed.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonSetFacts {
    pub component: Option<Component>,
    pub hash: Option<String>,
    pub counts: DaemonSetCounts,
}

#[derive(Debug, Default)]
pub struct Index {
    pub nodes: HashMap<String, NodeFacts>,
    /// Operand pods by `namespace/name`.
    pub pods: HashMap<String, PodFacts>,
    /// Operand DaemonSets by name.
    pub daemonsets: HashMap<String, DaemonSetFacts>,
    pub policies: HashMap<String, ClusterPolicy>,
    /// Kinds whose first full list has arrived.
    synced: HashSet<&'static str>,
}

impl Index {
    pub fn is_synced(&self) -> bool {
        self.synced.len() == 4
    }

    /// Operand pods grouped by node.
    pub fn pods_by_node(&self) -> HashMap<&str, Vec<&PodFacts>> {
        let mut by: HashMap<&str, Vec<&PodFacts>> = HashMap::new();
        for p in self.pods.values() {
            by.entry(p.node.as_str()).or_default().push(p);
        }
        by
    }
}

pub type SharedIndex = Arc<Mutex<Index>>;

/// How one kind is folded into the index.
pub trait Indexed: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    const KIND: &'static str;
    fn upsert(&self, index: &mut Index);
    fn remove(key: &str, index: &mut Index);
    fn keys(index: &Index) -> Vec<String>;
    fn key(&self) -> String {
        match self.meta().namespace.as_deref() {
            Some(ns) => format!("{ns}/{}", self.name_any()),
            None => self.name_any(),
        }
    }
}

impl Indexed for Node {
    const KIND: &'static str = "Node";
    fn upsert(&self, index: &mut Index) {
        index.nodes.insert(self.key(), NodeFacts::from_node(self));
    }
    fn remove(key: &str, index: &mut Index) {
        index.nodes.remove(key);
    }
    fn keys(index: &Index) -> Vec<String> {
        index.nodes.keys().cloned().collect()
    }
}

impl Indexed for Pod {
    const KIND: &'static str = "Pod";
    fn upsert(&self, index: &mut Index) {
        match PodFacts::from_pod(self) {
            Some(f) => index.pods.insert(self.key(), f),
            None => index.pods.remove(&self.key()),
        };
    }
    fn remove(key: &str, index: &mut Index) {
        index.pods.remove(key);
    }
    fn keys(index: &Index) -> Vec<String> {
        index.pods.keys().cloned().collect()
    }
}

impl Indexed for DaemonSet {
    const KIND: &'static str = "DaemonSet";
    fn key(&self) -> String {
        self.name_any()
    }
    fn upsert(&self, index: &mut Index) {
        let component = self
            .labels()
            .get(label::COMPONENT)
            .and_then(|c| Component::ALL.into_iter().find(|k| k.gate_name() == c));
        let status = self.status.clone().unwrap_or_default();
        index.daemonsets.insert(
            self.key(),
            DaemonSetFacts {
                component,
                hash: hash_of(&self.metadata).map(String::from),
                counts: DaemonSetCounts {
                    desired: status.desired_number_scheduled,
                    ready: status.number_ready,
                },
            },
        );
    }
    fn remove(key: &str, index: &mut Index) {
        index.daemonsets.remove(key);
    }
    fn keys(index: &Index) -> Vec<String> {
        index.daemonsets.keys().cloned().collect()
    }
}

impl Indexed for ClusterPolicy {
    const KIND: &'static str = "ClusterPolicy";
    fn upsert(&self, index: &mut Index) {
        let mut p = self.clone();
        // Never read, and the largest part of the object.
        p.metadata.managed_fields = None;
        index.policies.insert(self.key(), p);
    }
    fn remove(key: &str, index: &mut Index) {
        index.policies.remove(key);
    }
    fn keys(index: &Index) -> Vec<String> {
        index.policies.keys().cloned().collect()
    }
}

/// Runs one watch forever, folding its events into the index and waking the reconciler.
pub async fn run_watch<K: Indexed>(
    api: Api<K>,
    config: watcher::Config,
    index: SharedIndex,
    wake: Arc<Notify>,
) {
    let mut relist: Option<HashSet<String>> = None;
    let mut stream = watcher::watcher(api, config).boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => relist = Some(HashSet::new()),
            Ok(Event::InitApply(obj)) => {
                if let Some(seen) = relist.as_mut() {
                    seen.insert(obj.key());
                }
                obj.upsert(&mut index.lock().unwrap());
            }
            Ok(Event::InitDone) => {
                let mut idx = index.lock().unwrap();
                if let Some(seen) = relist.take() {
                    for k in K::keys(&idx) {
                        if !seen.contains(&k) {
                            K::remove(&k, &mut idx);
                        }
                    }
                }
                idx.synced.insert(K::KIND);
                drop(idx);
                wake.notify_one();
            }
            Ok(Event::Apply(obj)) => {
                obj.upsert(&mut index.lock().unwrap());
                wake.notify_one();
            }
            Ok(Event::Delete(obj)) => {
                K::remove(&obj.key(), &mut index.lock().unwrap());
                wake.notify_one();
            }
            Err(e) => {
                // The watcher retries by itself; say why so a missing RBAC rule is visible.
                tracing::warn!(kind = K::KIND, error = %e, "watch failed, retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}
