//! Pure status computation: node decisions and DaemonSet counts in, `ClusterPolicyStatus` out.

use gpu_pilot_api::names::{Component, Stage};
use gpu_pilot_api::policy::{ComponentState, ComponentStatus, PolicyState, StageCounts, StuckNode};
use gpu_pilot_api::{ClusterPolicySpec, ClusterPolicyStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::facts::DaemonSetCounts;
use crate::rollout::NodeState;

/// What the controller observed, as the status needs it.
pub struct Observed<'a> {
    /// Every node and the decision for it.
    pub nodes: &'a [(&'a str, &'a NodeState)],
    /// Each operand DaemonSet's pod counts.
    pub daemonsets: &'a dyn Fn(Component) -> Option<DaemonSetCounts>,
    /// How many nodes carry each component's gate label.
    pub gated: &'a dyn Fn(Component) -> i32,
    /// The write that failed the controller's last pass, while it keeps failing.
    pub write_failure: Option<&'a WriteFailure>,
}

/// A write the controller could not make (a 403, a webhook's refusal, an invalid object): shown
/// in the policy's `WriteFailed` condition until a pass succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailure {
    /// What was written, e.g. `DaemonSet gpu-pilot-driver` or `labels of node gpu-node-001`.
    pub what: String,
    /// A CamelCase reason, e.g. `Forbidden` (from the HTTP status).
    pub reason: String,
    /// The apiserver's own sentence and HTTP code.
    pub message: String,
}

impl WriteFailure {
    /// The reason a failed write gets from its HTTP status code (`None`: no answer at all).
    pub fn reason_for(code: Option<u16>) -> &'static str {
        match code {
            Some(400) => "BadRequest",
            Some(401) => "Unauthorized",
            Some(403) => "Forbidden",
            Some(404) => "NotFound",
            Some(409) => "Conflict",
            Some(422) => "Invalid",
            Some(429) => "TooManyRequests",
            Some(500..=599) => "ServerError",
            Some(_) => "WriteRefused",
            None => "Unreachable",
        }
    }
}

/// The `WriteFailed` condition: true while writes fail, naming the failing write.
pub const WRITE_FAILED: &str = "WriteFailed";

/// How many stuck nodes the status lists by name.
pub const MAX_STUCK_LISTED: usize = 20;

/// Computes the active policy's status. `previous` keeps conditions' transition times stable.
pub fn active_status(
    spec: &ClusterPolicySpec,
    generation: Option<i64>,
    namespace: &str,
    observed: &Observed,
    previous: Option<&ClusterPolicyStatus>,
    now: &Time,
) -> ClusterPolicyStatus {
    let &Observed {
        nodes,
        daemonsets,
        gated,
        write_failure,
    } = observed;
    let mut stages = StageCounts::default();
    let mut stuck: Vec<StuckNode> = Vec::new();
    let mut gpu_nodes = 0;
    for (name, state) in nodes {
        if let NodeState::Gpu {
            stage,
            reason,
            failure,
        } = state
        {
            gpu_nodes += 1;
            stages.add(*stage, 1);
            if *failure {
                stuck.push(StuckNode {
                    name: name.to_string(),
                    stage: stage.as_str().into(),
                    reason: reason.clone().unwrap_or_default(),
                });
            }
        }
    }
    stuck.sort_by(|a, b| a.name.cmp(&b.name));
    let stuck_total = stuck.len();
    stuck.truncate(MAX_STUCK_LISTED);
    let ready_nodes = stages.get(Stage::Ready);

    let components: Vec<ComponentStatus> = Component::ALL
        .into_iter()
        .map(|c| {
            let enabled = spec.operand(c).enabled();
            let counts = daemonsets(c).unwrap_or_default();
            // A DaemonSet's status lags behind new gate labels: it is ready only once it wants a
            // pod on every node gated for it and all of them are ready.
            let state = if !enabled {
                ComponentState::Disabled
            } else if counts.ready == counts.desired && counts.desired >= gated(c) {
                ComponentState::Ready
            } else {
                ComponentState::NotReady
            };
            ComponentStatus {
                name: c.spec_field().into(),
                enabled,
                state,
                desired: counts.desired,
                ready: counts.ready,
            }
        })
        .collect();

    let all_ready = gpu_nodes > 0
        && ready_nodes == gpu_nodes
        && components
            .iter()
            .all(|c: &ComponentStatus| c.state != ComponentState::NotReady);
    let (ready_status, ready_reason, ready_message) = if gpu_nodes == 0 {
        (
            "False",
            "NoGPUNodes",
            "no GPU nodes found: nodes need the label feature.node.kubernetes.io/pci-10de.present=true (Node Feature Discovery) or nvidia.com/gpu.present=true".to_string(),
        )
    } else if all_ready {
        (
            "True",
            "AllNodesReady",
            format!("all {gpu_nodes} GPU nodes are ready"),
        )
    } else if ready_nodes == gpu_nodes {
        let waiting: Vec<&str> = components
            .iter()
            .filter(|c| c.state == ComponentState::NotReady)
            .map(|c| c.name.as_str())
            .collect();
        (
            "False",
            "OperandsNotReady",
            format!(
                "all GPU nodes passed the stages; waiting for {} pods to be ready",
                waiting.join(", ")
            ),
        )
    } else {
        (
            "False",
            "NodesNotReady",
            format!("{ready_nodes} of {gpu_nodes} GPU nodes are ready"),
        )
    };
    let (error_status, error_reason, error_message) = if stuck_total > 0 {
        let listed: Vec<String> = stuck
            .iter()
            .take(5)
            .map(|s| format!("{} ({}: {})", s.name, s.stage, s.reason))
            .collect();
        let more = if stuck_total > 5 {
            format!(" and {} more", stuck_total - 5)
        } else {
            String::new()
        };
        (
            "True",
            "NodeStageFailed",
            format!(
                "{stuck_total} GPU node(s) cannot leave their stage: {}{more}",
                listed.join(", ")
            ),
        )
    } else {
        (
            "False",
            "NoErrors",
            "no node is held by a failure".to_string(),
        )
    };
    let conditions = vec![
        condition(
            previous,
            "Ready",
            ready_status,
            ready_reason,
            ready_message,
            generation,
            now,
        ),
        condition(
            previous,
            "Error",
            error_status,
            error_reason,
            error_message,
            generation,
            now,
        ),
        write_condition(previous, write_failure, generation, now),
    ];
    ClusterPolicyStatus {
        state: Some(if all_ready {
            PolicyState::Ready
        } else {
            PolicyState::NotReady
        }),
        observed_generation: generation,
        namespace: Some(namespace.into()),
        conditions,
        components,
        stages: Some(stages),
        gpu_nodes,
        ready_nodes,
        stuck_nodes: stuck,
    }
}

fn write_condition(
    previous: Option<&ClusterPolicyStatus>,
    failure: Option<&WriteFailure>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    match failure {
        Some(f) => condition(
            previous,
            WRITE_FAILED,
            "True",
            &f.reason,
            format!("writing {} failed: {}", f.what, f.message),
            generation,
            now,
        ),
        None => condition(
            previous,
            WRITE_FAILED,
            "False",
            "WritesSucceeded",
            "the controller's last pass made every write it needed".into(),
            generation,
            now,
        ),
    }
}

/// `previous` with its `WriteFailed` condition set from `failure` (added when missing): what the
/// controller writes at once when a write fails, before its next full status.
pub fn with_write_failure(
    previous: Option<&ClusterPolicyStatus>,
    failure: Option<&WriteFailure>,
    generation: Option<i64>,
    now: &Time,
) -> ClusterPolicyStatus {
    let mut st = previous.cloned().unwrap_or_default();
    let c = write_condition(previous, failure, generation, now);
    match st
        .conditions
        .iter_mut()
        .find(|old| old.type_ == WRITE_FAILED)
    {
        Some(old) => *old = c,
        None => st.conditions.push(c),
    }
    st
}

/// Status of the active policy when it cannot be rendered (see
/// [`crate::render::operands::RenderError`]): the counts it had, and why nothing moves.
pub fn invalid_status(
    reason: &str,
    generation: Option<i64>,
    namespace: &str,
    previous: Option<&ClusterPolicyStatus>,
    now: &Time,
) -> ClusterPolicyStatus {
    ClusterPolicyStatus {
        state: Some(PolicyState::NotReady),
        observed_generation: generation,
        namespace: Some(namespace.into()),
        conditions: vec![
            condition(
                previous,
                "Ready",
                "False",
                "InvalidSpec",
                "the policy cannot be rendered; see the Error condition".into(),
                generation,
                now,
            ),
            condition(
                previous,
                "Error",
                "True",
                "InvalidSpec",
                reason.into(),
                generation,
                now,
            ),
            write_condition(previous, None, generation, now),
        ],
        ..previous.cloned().unwrap_or_default()
    }
}

/// Status of a policy that is not the active one.
pub fn ignored_status(
    active: &str,
    generation: Option<i64>,
    previous: Option<&ClusterPolicyStatus>,
    now: &Time,
) -> ClusterPolicyStatus {
    ClusterPolicyStatus {
        state: Some(PolicyState::Ignored),
        observed_generation: generation,
        conditions: vec![
            condition(
                previous,
                "Ready",
                "False",
                "Ignored",
                format!(
                    "ClusterPolicy {active} is the active one (the oldest); this one does nothing. Delete it, or merge its settings into {active}."
                ),
                generation,
                now,
            ),
            condition(
                previous,
                "Error",
                "True",
                "MultiplePolicies",
                format!("more than one ClusterPolicy exists; only {active} is used"),
                generation,
                now,
            ),
        ],
        ..Default::default()
    }
}

fn condition(
    previous: Option<&ClusterPolicyStatus>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let last = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The production signature, spelled out per argument for readable tests.
    #[allow(clippy::too_many_arguments)]
    fn active_status(
        spec: &ClusterPolicySpec,
        generation: Option<i64>,
        namespace: &str,
        nodes: &[(&str, &NodeState)],
        daemonsets: &dyn Fn(Component) -> Option<DaemonSetCounts>,
        gated: &dyn Fn(Component) -> i32,
        previous: Option<&ClusterPolicyStatus>,
        now: &Time,
    ) -> ClusterPolicyStatus {
        super::active_status(
            spec,
            generation,
            namespace,
            &Observed {
                nodes,
                daemonsets,
                gated,
                write_failure: None,
            },
            previous,
            now,
        )
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap())
    }

    fn gpu(stage: Stage, failure: bool) -> NodeState {
        NodeState::Gpu {
            stage,
            reason: failure.then(|| "driver pod: ImagePullBackOff".into()),
            failure,
        }
    }

    #[test]
    fn counts_stages_and_reports_ready() {
        let states = [
            gpu(Stage::Ready, false),
            gpu(Stage::Ready, false),
            NodeState::NotGpu,
        ];
        let nodes: Vec<(&str, &NodeState)> =
            vec![("a", &states[0]), ("b", &states[1]), ("c", &states[2])];
        let s = active_status(
            &ClusterPolicySpec::default(),
            Some(3),
            "gpu-pilot",
            &nodes,
            &|_| None,
            &|_| 0,
            None,
            &now(),
        );
        assert_eq!(s.state, Some(PolicyState::Ready));
        assert_eq!((s.gpu_nodes, s.ready_nodes), (2, 2));
        assert_eq!(s.stages.as_ref().unwrap().ready, 2);
        assert_eq!(s.conditions[0].reason, "AllNodesReady");
        assert_eq!(s.conditions[1].status, "False");
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn operands_lagging_behind_their_gates_are_not_ready() {
        let states = [gpu(Stage::Ready, false)];
        let nodes: Vec<(&str, &NodeState)> = vec![("a", &states[0])];
        // The DaemonSet says 0 of 0 while a node is already gated for it.
        let counts = |_| {
            Some(DaemonSetCounts {
                desired: 0,
                ready: 0,
            })
        };
        let s = active_status(
            &ClusterPolicySpec::default(),
            None,
            "ns",
            &nodes,
            &counts,
            &|_| 1,
            None,
            &now(),
        );
        assert_eq!(s.state, Some(PolicyState::NotReady));
        assert_eq!(s.conditions[0].reason, "OperandsNotReady");
        let counts = |_| {
            Some(DaemonSetCounts {
                desired: 1,
                ready: 1,
            })
        };
        let s = active_status(
            &ClusterPolicySpec::default(),
            None,
            "ns",
            &nodes,
            &counts,
            &|_| 1,
            None,
            &now(),
        );
        assert_eq!(s.state, Some(PolicyState::Ready));
    }

    #[test]
    fn stuck_nodes_are_named_with_their_reason() {
        let states = [gpu(Stage::Ready, false), gpu(Stage::Driver, true)];
        let nodes: Vec<(&str, &NodeState)> = vec![("a", &states[0]), ("bad", &states[1])];
        let s = active_status(
            &ClusterPolicySpec::default(),
            None,
            "ns",
            &nodes,
            &|_| None,
            &|_| 0,
            None,
            &now(),
        );
        assert_eq!(s.state, Some(PolicyState::NotReady));
        assert_eq!(s.stuck_nodes.len(), 1);
        assert_eq!(s.stuck_nodes[0].name, "bad");
        let err = &s.conditions[1];
        assert_eq!(
            (err.status.as_str(), err.reason.as_str()),
            ("True", "NodeStageFailed")
        );
        assert!(
            err.message
                .contains("bad (driver: driver pod: ImagePullBackOff)"),
            "{}",
            err.message
        );
    }

    #[test]
    fn no_gpu_nodes_says_how_they_are_found() {
        let s = active_status(
            &ClusterPolicySpec::default(),
            None,
            "ns",
            &[],
            &|_| None,
            &|_| 0,
            None,
            &now(),
        );
        assert_eq!(s.state, Some(PolicyState::NotReady));
        assert_eq!(s.conditions[0].reason, "NoGPUNodes");
        assert!(s.conditions[0].message.contains("pci-10de.present"));
    }

    #[test]
    fn transition_time_is_kept_while_the_status_holds() {
        let states = [gpu(Stage::Ready, false)];
        let nodes: Vec<(&str, &NodeState)> = vec![("a", &states[0])];
        let first = active_status(
            &ClusterPolicySpec::default(),
            None,
            "ns",
            &nodes,
            &|_| None,
            &|_| 0,
            None,
            &now(),
        );
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_100).unwrap());
        let second = active_status(
            &ClusterPolicySpec::default(),
            None,
            "ns",
            &nodes,
            &|_| None,
            &|_| 0,
            Some(&first),
            &later,
        );
        assert_eq!(first, second);
    }

    #[test]
    fn components_report_disabled_and_counts() {
        let spec: ClusterPolicySpec =
            serde_json::from_str(r#"{"driver": {"enabled": false}}"#).unwrap();
        let s = active_status(
            &spec,
            None,
            "ns",
            &[],
            &|c| {
                (c == Component::DevicePlugin).then_some(DaemonSetCounts {
                    desired: 3,
                    ready: 2,
                })
            },
            &|_| 0,
            None,
            &now(),
        );
        let by = |n: &str| s.components.iter().find(|c| c.name == n).unwrap().clone();
        assert_eq!(by("driver").state, ComponentState::Disabled);
        let dp = by("devicePlugin");
        assert_eq!(
            (dp.state, dp.desired, dp.ready),
            (ComponentState::NotReady, 3, 2)
        );
    }

    #[test]
    fn a_failing_write_is_a_condition_until_a_pass_succeeds() {
        let failure = WriteFailure {
            what: "DaemonSet gpu-pilot-driver".into(),
            reason: WriteFailure::reason_for(Some(403)).into(),
            message: "daemonsets.apps is forbidden (HTTP 403)".into(),
        };
        let observed = |f| Observed {
            nodes: &[],
            daemonsets: &|_| None,
            gated: &|_| 0,
            write_failure: f,
        };
        let spec = ClusterPolicySpec::default();
        let failing =
            super::active_status(&spec, None, "ns", &observed(Some(&failure)), None, &now());
        let c = failing
            .conditions
            .iter()
            .find(|c| c.type_ == WRITE_FAILED)
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Forbidden")
        );
        assert!(
            c.message.contains(
                "writing DaemonSet gpu-pilot-driver failed: daemonsets.apps is forbidden"
            ),
            "{}",
            c.message
        );
        let fine = super::active_status(&spec, None, "ns", &observed(None), Some(&failing), &now());
        let c = fine
            .conditions
            .iter()
            .find(|c| c.type_ == WRITE_FAILED)
            .unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "WritesSucceeded")
        );
    }

    #[test]
    fn an_invalid_spec_keeps_the_counts_and_says_why() {
        let mut before = ClusterPolicyStatus {
            gpu_nodes: 7,
            ready_nodes: 5,
            ..Default::default()
        };
        before.conditions.push(condition(
            None,
            "Ready",
            "True",
            "AllNodesReady",
            "x".into(),
            None,
            &now(),
        ));
        let s = invalid_status(
            "maxUnavailable is bad",
            Some(4),
            "ns",
            Some(&before),
            &now(),
        );
        assert_eq!(
            (s.gpu_nodes, s.ready_nodes, s.observed_generation),
            (7, 5, Some(4))
        );
        assert_eq!(s.state, Some(PolicyState::NotReady));
        let err = s.conditions.iter().find(|c| c.type_ == "Error").unwrap();
        assert_eq!(
            (err.reason.as_str(), err.message.as_str()),
            ("InvalidSpec", "maxUnavailable is bad")
        );
    }

    #[test]
    fn ignored_policies_name_the_active_one() {
        let s = ignored_status("cluster-policy", Some(1), None, &now());
        assert_eq!(s.state, Some(PolicyState::Ignored));
        assert!(
            s.conditions[0]
                .message
                .contains("cluster-policy is the active one")
        );
    }
}
