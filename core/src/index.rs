//! The in-memory view of the cluster: watch events folded into small fact structs. Only the
//! facts the decisions need are kept (labels, readiness, counts), never whole objects, so 1,000
//! nodes and their operand pods fit in a few MiB. The fold is pure; the controller's watch tasks
//! feed it.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{Component, label};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::facts::{DaemonSetCounts, DaemonSetFacts, NodeFacts, PodFacts};
use crate::render::operands::hash_of;

/// The kinds the controller watches; the index is synced once each has listed once.
const KINDS: usize = 4;

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
    /// Keys seen during a (re)list in progress, per kind: what the list did not name is gone.
    relisting: HashMap<&'static str, HashSet<String>>,
}

impl Index {
    pub fn is_synced(&self) -> bool {
        self.synced.len() == KINDS
    }

    /// Operand pods grouped by node.
    pub fn pods_by_node(&self) -> HashMap<&str, Vec<&PodFacts>> {
        let mut by: HashMap<&str, Vec<&PodFacts>> = HashMap::new();
        for p in self.pods.values() {
            by.entry(p.node.as_str()).or_default().push(p);
        }
        by
    }

    /// Folds one watch event in. Returns whether the view changed in a way a pass should see
    /// (events inside a relist only count once the list is complete).
    pub fn fold<K: Indexed>(&mut self, event: Event<K>) -> bool {
        match event {
            Event::Init => {
                self.relisting.insert(K::KIND, HashSet::new());
                false
            }
            Event::InitApply(obj) => {
                if let Some(seen) = self.relisting.get_mut(K::KIND) {
                    seen.insert(obj.key());
                }
                obj.upsert(self);
                false
            }
            Event::InitDone => {
                if let Some(seen) = self.relisting.remove(K::KIND) {
                    for k in K::keys(self) {
                        if !seen.contains(&k) {
                            K::remove(&k, self);
                        }
                    }
                }
                self.synced.insert(K::KIND);
                true
            }
            Event::Apply(obj) => {
                obj.upsert(self);
                true
            }
            Event::Delete(obj) => {
                K::remove(&obj.key(), self);
                true
            }
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, gpu: bool) -> Node {
        let labels = if gpu {
            json!({ (label::NFD_PCI_10DE): "true" })
        } else {
            json!({})
        };
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
    }

    fn pod(name: &str, component: Option<&str>) -> Pod {
        let labels = match component {
            Some(c) => json!({ (label::COMPONENT): c }),
            None => json!({}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "gpu-pilot", "labels": labels},
            "spec": {"nodeName": "gpu-1", "containers": []},
        }))
        .unwrap()
    }

    #[test]
    fn a_relist_forgets_what_it_no_longer_names() {
        let mut idx = Index::default();
        assert!(!idx.fold(Event::Init::<Node>));
        assert!(!idx.fold(Event::InitApply(node("a", true))));
        assert!(!idx.fold(Event::InitApply(node("b", false))));
        assert!(
            idx.fold(Event::InitDone::<Node>),
            "a finished list wakes the pass"
        );
        assert_eq!(idx.nodes.len(), 2);
        assert!(idx.nodes["a"].is_gpu_node() && !idx.nodes["b"].is_gpu_node());

        // The watch restarts and lists again: b is gone, c is new.
        idx.fold(Event::Init::<Node>);
        idx.fold(Event::InitApply(node("a", true)));
        idx.fold(Event::InitApply(node("c", true)));
        assert_eq!(
            idx.nodes.len(),
            3,
            "nothing is forgotten before the list is complete"
        );
        idx.fold(Event::InitDone::<Node>);
        let mut names: Vec<&str> = idx.nodes.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["a", "c"]);
    }

    #[test]
    fn events_update_and_delete_and_sync_needs_every_kind() {
        let mut idx = Index::default();
        for done in [
            idx.fold(Event::InitDone::<Node>),
            idx.fold(Event::InitDone::<Pod>),
            idx.fold(Event::InitDone::<DaemonSet>),
        ] {
            assert!(done);
        }
        assert!(!idx.is_synced(), "three of four kinds listed");
        idx.fold(Event::InitDone::<ClusterPolicy>);
        assert!(idx.is_synced());

        assert!(idx.fold(Event::Apply(pod("p1", Some("driver")))));
        assert!(idx.fold(Event::Apply(pod("p2", None))));
        assert_eq!(
            idx.pods.len(),
            1,
            "pods without a component are not operands"
        );
        assert_eq!(idx.pods["gpu-pilot/p1"].component, Component::Driver);
        assert_eq!(idx.pods_by_node()["gpu-1"].len(), 1);
        // A pod that loses its component label leaves the index.
        idx.fold(Event::Apply(pod("p1", None)));
        assert!(idx.pods.is_empty());

        idx.fold(Event::Apply(node("a", true)));
        assert!(idx.fold(Event::Delete(node("a", true))));
        assert!(idx.nodes.is_empty());
    }

    #[test]
    fn daemonsets_and_policies_keep_only_what_is_read() {
        let mut idx = Index::default();
        let ds: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "gpu-pilot-driver", "namespace": "gpu-pilot",
                "labels": {(label::COMPONENT): "driver"},
                "annotations": {(gpu_pilot_api::names::annotation::SPEC_HASH): "abc"}},
            "status": {"desiredNumberScheduled": 3, "numberReady": 2, "currentNumberScheduled": 3,
                "numberMisscheduled": 0},
        }))
        .unwrap();
        idx.fold(Event::Apply(ds));
        let f = &idx.daemonsets["gpu-pilot-driver"];
        assert_eq!(f.component, Some(Component::Driver));
        assert_eq!(f.hash.as_deref(), Some("abc"));
        assert_eq!(
            f.counts,
            DaemonSetCounts {
                desired: 3,
                ready: 2
            }
        );

        let p: ClusterPolicy = serde_json::from_value(json!({
            "metadata": {"name": "cluster-policy",
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {},
        }))
        .unwrap();
        idx.fold(Event::Apply(p));
        assert!(
            idx.policies["cluster-policy"]
                .metadata
                .managed_fields
                .is_none()
        );
    }
}
