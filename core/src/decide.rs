//! One reconcile pass's decision, made from the index alone: no clock is read (the caller
//! passes `now`), nothing is written, no metric is set. The controller executes the [`Plan`].

use gpu_pilot_api::names::label;
use gpu_pilot_api::{ClusterPolicy, ClusterPolicyStatus, Component};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::facts::pick_active;
use crate::index::Index;
use crate::render::operands::{self, Desired, hash_of};
use crate::rollout::{self, NodePlan, NodeState};
use crate::status::{self, WriteFailure};

/// What one pass does.
#[derive(Debug)]
pub enum Plan {
    /// No ClusterPolicy exists: nothing to do.
    Idle,
    /// The active policy is live: keep its operands in place and move the nodes on.
    Rollout(Box<Rollout>),
    /// The active policy is being deleted: take back everything it put in place.
    Cleanup(Box<Cleanup>),
    /// The active policy cannot be rendered: nothing moves, the status says why.
    Invalid(Box<Invalid>),
}

/// An active policy that cannot be turned into objects.
#[derive(Debug)]
pub struct Invalid {
    pub active: ClusterPolicy,
    pub ignored: Vec<(ClusterPolicy, ClusterPolicyStatus)>,
    /// Why, for the Error condition and a Warning Event.
    pub reason: String,
    /// The active policy's new status, when it differs from the stored one.
    pub status: Option<ClusterPolicyStatus>,
}

/// Keeping the active policy's operands in place.
#[derive(Debug)]
pub struct Rollout {
    pub active: ClusterPolicy,
    /// Policies that are not the active one, with the status they should show.
    pub ignored: Vec<(ClusterPolicy, ClusterPolicyStatus)>,
    pub desired: Desired,
    /// Operand DaemonSets whose component is disabled.
    pub stale_daemonsets: Vec<String>,
    /// DaemonSets whose stored hash differs from the rendered one.
    pub daemonset_applies: Vec<DaemonSet>,
    /// Nodes whose labels or annotations change.
    pub node_plans: Vec<(String, NodePlan)>,
    /// The active policy's new status, when it differs from the stored one.
    pub status: Option<ClusterPolicyStatus>,
    /// Every node's state (for the nodes-per-stage gauges).
    pub states: Vec<NodeState>,
}

/// Taking back what a deleted policy put in place.
#[derive(Debug)]
pub struct Cleanup {
    pub active: ClusterPolicy,
    pub ignored: Vec<(ClusterPolicy, ClusterPolicyStatus)>,
    /// Every operand DaemonSet.
    pub daemonsets: Vec<String>,
    /// Nodes that still carry something the controller set.
    pub node_plans: Vec<(String, NodePlan)>,
}

impl Plan {
    /// Policies other than the active one whose status must change.
    pub fn ignored(&self) -> &[(ClusterPolicy, ClusterPolicyStatus)] {
        match self {
            Plan::Idle => &[],
            Plan::Rollout(r) => &r.ignored,
            Plan::Cleanup(c) => &c.ignored,
            Plan::Invalid(i) => &i.ignored,
        }
    }
}

/// Decides a pass over the index. `namespace` is the operands' namespace; `write_failure` is
/// the write that failed the last pass, if the last pass failed (it reaches the status).
/// Total: whatever the index holds, this returns a plan and never panics.
pub fn decide(
    idx: &Index,
    namespace: &str,
    now: &Time,
    write_failure: Option<&WriteFailure>,
) -> Plan {
    let Some(active) = pick_active(idx.policies.values()) else {
        return Plan::Idle;
    };
    let active = active.clone();
    let active_name = active.name_any();
    let ignored = idx
        .policies
        .values()
        .filter(|p| p.name_any() != active_name)
        .filter_map(|p| {
            let st =
                status::ignored_status(&active_name, p.metadata.generation, p.status.as_ref(), now);
            (p.status.as_ref() != Some(&st)).then(|| (p.clone(), st))
        })
        .collect();
    if active.metadata.deletion_timestamp.is_some() {
        let node_plans = idx
            .nodes
            .values()
            .map(|n| (n.name.clone(), rollout::cleanup_node(n)))
            .filter(|(_, p)| !p.is_noop())
            .collect();
        return Plan::Cleanup(Box::new(Cleanup {
            active,
            ignored,
            daemonsets: idx.daemonsets.keys().cloned().collect(),
            node_plans,
        }));
    }

    let desired = match operands::render(&active, namespace) {
        Ok(desired) => desired,
        Err(e) => {
            let reason = e.to_string();
            let st = status::invalid_status(
                &reason,
                active.metadata.generation,
                namespace,
                active.status.as_ref(),
                now,
            );
            let status = (active.status.as_ref() != Some(&st)).then_some(st);
            return Plan::Invalid(Box::new(Invalid {
                active,
                ignored,
                reason,
                status,
            }));
        }
    };
    let wanted: Vec<String> = desired
        .daemonsets
        .iter()
        .map(|(c, _)| c.daemonset_name())
        .collect();
    let stale_daemonsets = idx
        .daemonsets
        .keys()
        .filter(|k| !wanted.contains(k))
        .cloned()
        .collect();
    let daemonset_applies = desired
        .daemonsets
        .iter()
        .filter(|(c, ds)| {
            idx.daemonsets
                .get(&c.daemonset_name())
                .and_then(|f| f.hash.as_deref())
                != hash_of(&ds.metadata)
        })
        .map(|(_, ds)| ds.clone())
        .collect();

    let by_node = idx.pods_by_node();
    let mut node_plans = Vec::new();
    let mut states: Vec<(String, NodeState)> = Vec::with_capacity(idx.nodes.len());
    for node in idx.nodes.values() {
        let pods = by_node
            .get(node.name.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let plan = rollout::plan_node(&active.spec, node, pods);
        states.push((node.name.clone(), plan.state.clone()));
        if !plan.is_noop() {
            node_plans.push((node.name.clone(), plan));
        }
    }
    let node_refs: Vec<(&str, &NodeState)> = states.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let ds_counts = |c: Component| idx.daemonsets.get(&c.daemonset_name()).map(|f| f.counts);
    let gated = |c: Component| {
        let key = label::deploy_gate(c);
        idx.nodes
            .values()
            .filter(|n| n.labels.get(&key).map(String::as_str) == Some("true"))
            .count()
            .try_into()
            .unwrap_or(i32::MAX)
    };
    let st = status::active_status(
        &active.spec,
        active.metadata.generation,
        namespace,
        &status::Observed {
            nodes: &node_refs,
            daemonsets: &ds_counts,
            gated: &gated,
            write_failure,
        },
        active.status.as_ref(),
        now,
    );
    let status = (active.status.as_ref() != Some(&st)).then_some(st);
    Plan::Rollout(Box::new(Rollout {
        active,
        ignored,
        desired,
        stale_daemonsets,
        daemonset_applies,
        node_plans,
        status,
        states: states.into_iter().map(|(_, s)| s).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_pilot_api::names::{FINALIZER, Stage};
    use k8s_openapi::api::core::v1::Node;
    use kube::runtime::watcher::Event;
    use serde_json::json;

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap())
    }

    fn policy(name: &str, created: i64) -> ClusterPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": 1,
                "finalizers": [FINALIZER],
                "creationTimestamp": k8s_openapi::jiff::Timestamp::from_second(created).unwrap().to_string()},
            "spec": {},
        }))
        .unwrap()
    }

    fn index(policies: Vec<ClusterPolicy>) -> Index {
        let mut idx = Index::default();
        for p in policies {
            idx.fold(Event::Apply(p));
        }
        let gpu: Node = serde_json::from_value(json!({"metadata": {"name": "gpu-1",
            "labels": {(label::NFD_PCI_10DE): "true"}}}))
        .unwrap();
        let cpu: Node = serde_json::from_value(json!({"metadata": {"name": "cpu-1"}})).unwrap();
        idx.fold(Event::Apply(gpu));
        idx.fold(Event::Apply(cpu));
        idx
    }

    fn rollout(plan: Plan) -> Rollout {
        match plan {
            Plan::Rollout(r) => *r,
            other => panic!("expected a rollout, got {other:?}"),
        }
    }

    #[test]
    fn no_policy_means_nothing_to_do() {
        assert!(matches!(
            decide(&index(vec![]), "gpu-pilot", &now(), None),
            Plan::Idle
        ));
    }

    #[test]
    fn a_fresh_policy_renders_everything_and_gates_the_first_stage() {
        let r = rollout(decide(
            &index(vec![policy("p", 10)]),
            "gpu-pilot",
            &now(),
            None,
        ));
        let enabled = Component::ALL
            .into_iter()
            .filter(|c| r.active.spec.operand(*c).enabled())
            .count();
        assert_eq!(r.daemonset_applies.len(), enabled);
        assert!(r.stale_daemonsets.is_empty());
        assert_eq!(r.node_plans.len(), 1, "the CPU node needs nothing");
        let (name, plan) = &r.node_plans[0];
        assert_eq!(name, "gpu-1");
        assert_eq!(
            plan.labels
                .get(&label::deploy_gate(Component::ContainerToolkit)),
            Some(&Some("true".to_string()))
        );
        let st = r.status.expect("a policy without status gets one");
        assert_eq!((st.gpu_nodes, st.ready_nodes), (1, 0));
        assert_eq!(st.stages.unwrap().get(Stage::Toolkit), 1);
        assert_eq!(r.states.len(), 2);
    }

    #[test]
    fn applied_daemonsets_are_left_alone_and_disabled_ones_go() {
        let mut idx = index(vec![policy("p", 10)]);
        let first = rollout(decide(&idx, "gpu-pilot", &now(), None));
        for ds in first.daemonset_applies {
            idx.fold(Event::Apply(ds));
        }
        let stale: k8s_openapi::api::apps::v1::DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "gpu-pilot-left-over", "namespace": "gpu-pilot"}}))
        .unwrap();
        idx.fold(Event::Apply(stale));
        let r = rollout(decide(&idx, "gpu-pilot", &now(), None));
        assert!(r.daemonset_applies.is_empty(), "hashes match");
        assert_eq!(r.stale_daemonsets, ["gpu-pilot-left-over"]);
    }

    #[test]
    fn the_oldest_policy_acts_and_the_others_are_marked_ignored_once() {
        let mut idx = index(vec![policy("new", 20), policy("old", 10)]);
        let r = rollout(decide(&idx, "gpu-pilot", &now(), None));
        assert_eq!(r.active.name_any(), "old");
        assert_eq!(r.ignored.len(), 1);
        let (p, st) = &r.ignored[0];
        assert_eq!(p.name_any(), "new");
        assert_eq!(st.state, Some(gpu_pilot_api::policy::PolicyState::Ignored));
        // Once that status is stored, it is not written again.
        let mut stored = p.clone();
        stored.status = Some(st.clone());
        idx.fold(Event::Apply(stored));
        assert!(decide(&idx, "gpu-pilot", &now(), None).ignored().is_empty());
    }

    #[test]
    fn a_deleted_policy_takes_back_everything() {
        let mut p = policy("p", 10);
        let mut idx = index(vec![p.clone()]);
        for ds in rollout(decide(&idx, "gpu-pilot", &now(), None)).daemonset_applies {
            idx.fold(Event::Apply(ds));
        }
        idx.nodes.get_mut("gpu-1").unwrap().labels.insert(
            label::deploy_gate(Component::ContainerToolkit),
            "true".into(),
        );
        p.metadata.deletion_timestamp = Some(now());
        idx.fold(Event::Apply(p));
        let Plan::Cleanup(c) = decide(&idx, "gpu-pilot", &now(), None) else {
            panic!("a deleted policy is cleaned up");
        };
        assert_eq!(c.daemonsets.len(), idx.daemonsets.len());
        assert_eq!(c.node_plans.len(), 1);
        assert_eq!(
            c.node_plans[0].1.labels[&label::deploy_gate(Component::ContainerToolkit)],
            None
        );
    }

    #[test]
    fn a_policy_that_cannot_render_is_reported_not_panicked_on() {
        let mut p = policy("p", 10);
        p.spec.daemonsets.rolling_update.max_unavailable = "2147483648".into();
        let mut idx = index(vec![p]);
        let Plan::Invalid(inv) = decide(&idx, "gpu-pilot", &now(), None) else {
            panic!("an unrenderable policy is an Invalid plan");
        };
        assert!(inv.reason.contains("2147483648"), "{}", inv.reason);
        let st = inv.status.clone().expect("the reason reaches the status");
        let err = st.conditions.iter().find(|c| c.type_ == "Error").unwrap();
        assert_eq!(
            (err.status.as_str(), err.reason.as_str()),
            ("True", "InvalidSpec")
        );
        // Once stored, the same status is not written again.
        let mut stored = inv.active.clone();
        stored.status = Some(st);
        idx.fold(Event::Apply(stored));
        let Plan::Invalid(again) = decide(&idx, "gpu-pilot", &now(), None) else {
            panic!("still invalid");
        };
        assert!(again.status.is_none());
    }

    #[test]
    fn the_last_failed_write_reaches_the_status() {
        let idx = index(vec![policy("p", 10)]);
        let failure = WriteFailure {
            what: "DaemonSet gpu-pilot-driver".into(),
            reason: "Forbidden".into(),
            message: "forbidden (HTTP 403)".into(),
        };
        let r = rollout(decide(&idx, "gpu-pilot", &now(), Some(&failure)));
        let st = r.status.unwrap();
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == status::WRITE_FAILED)
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Forbidden")
        );
    }

    #[test]
    fn the_same_view_gives_the_same_plan() {
        let idx = index(vec![policy("p", 10)]);
        let a = rollout(decide(&idx, "gpu-pilot", &now(), None));
        let b = rollout(decide(&idx, "gpu-pilot", &now(), None));
        assert_eq!(a.node_plans, b.node_plans);
        assert_eq!(a.status, b.status);
        assert_eq!(a.daemonset_applies, b.daemonset_applies);
    }
}
