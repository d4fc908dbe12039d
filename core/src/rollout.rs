//! Pure stage logic: what a node's facts say about where it stands, and which labels it should
//! carry. One node's decision never depends on another node's.

use std::collections::BTreeMap;

use gpu_pilot_api::ClusterPolicySpec;
use gpu_pilot_api::names::{Component, Stage, annotation, gate_value, label, resource};

use crate::facts::{NodeFacts, PodFacts, is_failure};

/// Where a node stands.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeState {
    /// Not a GPU node: gpu-pilot leaves it alone.
    NotGpu,
    /// A GPU node whose admin opted out with `nvidia.com/gpu.deploy.operands=false`.
    OptedOut,
    /// A GPU node in `stage`; `reason` says what it waits for, `failure` whether that is a fault.
    Gpu {
        stage: Stage,
        reason: Option<String>,
        failure: bool,
    },
}

/// The decision for one node: its state and the label/annotation changes it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePlan {
    pub state: NodeState,
    /// `Some(v)` sets a label, `None` removes it. Empty when nothing changes.
    pub labels: BTreeMap<String, Option<String>>,
    pub annotations: BTreeMap<String, Option<String>>,
}

impl NodePlan {
    pub fn is_noop(&self) -> bool {
        self.labels.is_empty() && self.annotations.is_empty()
    }
}

/// The stages and the component whose pod must be ready to leave each; plugin validation is
/// judged from the node's advertised resources instead.
const STAGE_COMPONENTS: [(Stage, Option<Component>); 5] = [
    (Stage::Toolkit, Some(Component::ContainerToolkit)),
    (Stage::Driver, Some(Component::Driver)),
    (Stage::DriverValidation, Some(Component::OperatorValidator)),
    (Stage::DevicePlugin, Some(Component::DevicePlugin)),
    (Stage::PluginValidation, None),
];

/// Components deployed once a node is ready.
const READY_COMPONENTS: [Component; 3] = [
    Component::GpuFeatureDiscovery,
    Component::DcgmExporter,
    Component::MigManager,
];

/// Decides one node. `pods` are the operand pods bound to this node.
pub fn plan_node(spec: &ClusterPolicySpec, node: &NodeFacts, pods: &[&PodFacts]) -> NodePlan {
    let mut labels: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut annotations: BTreeMap<String, Option<String>> = BTreeMap::new();

    if !node.is_gpu_node() {
        // Take back only what this controller put there (e.g. NFD stopped reporting a GPU).
        remove_owned(node, &mut labels, &mut annotations);
        return NodePlan {
            state: NodeState::NotGpu,
            labels,
            annotations,
        };
    }
    // Keep nvidia.com/gpu.present in step with NFD.
    if node.nfd_gpu() && node.label(label::GPU_PRESENT) != Some("true") {
        labels.insert(label::GPU_PRESENT.into(), Some("true".into()));
        annotations.insert(annotation::GPU_PRESENT_SOURCE.into(), Some("nfd".into()));
    }
    if node.label(label::DEPLOY_OPERANDS) == Some(gate_value::DISABLED) {
        for c in Component::ALL {
            if node.label(&label::deploy_gate(c)) == Some(gate_value::ENABLED) {
                labels.insert(label::deploy_gate(c), None);
            }
        }
        if node.labels.contains_key(label::STAGE) {
            labels.insert(label::STAGE.into(), None);
        }
        if node.annotations.contains_key(annotation::STAGE_REASON) {
            annotations.insert(annotation::STAGE_REASON.into(), None);
        }
        return NodePlan {
            state: NodeState::OptedOut,
            labels,
            annotations,
        };
    }

    let enabled_here = |c: Component| {
        spec.operand(c).enabled()
            && node.label(&label::deploy_gate(c)) != Some(gate_value::DISABLED)
    };
    let pod_of = |c: Component| pods.iter().find(|p| p.component == c);

    let mut wanted: Vec<Component> = Vec::new();
    let mut stage = Stage::Ready;
    let mut reason = None;
    // Whether what holds the node is a fault (a pod that will not start by itself), not a wait.
    let mut failure = false;
    for (st, comp) in STAGE_COMPONENTS {
        match comp {
            Some(c) => {
                if !enabled_here(c) {
                    continue;
                }
                wanted.push(c);
                let gate = node.label(&label::deploy_gate(c));
                if let Some(v) = gate
                    && v.starts_with(gate_value::PAUSED_PREFIX)
                {
                    stage = st;
                    reason = Some(format!("{} is {v}", label::deploy_gate(c)));
                    break;
                }
                match pod_of(c) {
                    Some(p) if p.ready => continue,
                    Some(p) => {
                        stage = st;
                        failure = p.reason.as_deref().is_some_and(is_failure);
                        let why = p.reason.clone().unwrap_or_else(|| "not ready".into());
                        reason = Some(format!("{} pod: {why}", c.gate_name()));
                        break;
                    }
                    None => {
                        stage = st;
                        reason = Some(format!("waiting for the {} pod", c.gate_name()));
                        break;
                    }
                }
            }
            None => {
                if !enabled_here(Component::DevicePlugin) || node.gpu_allocatable > 0 {
                    continue;
                }
                stage = st;
                reason = Some(format!(
                    "the node advertises no {} or {}* yet",
                    resource::GPU,
                    resource::MIG_PREFIX
                ));
                break;
            }
        }
    }
    if stage == Stage::Ready {
        wanted.extend(READY_COMPONENTS.into_iter().filter(|c| enabled_here(*c)));
    }

    for c in Component::ALL {
        let key = label::deploy_gate(c);
        let current = node.label(&key);
        let policy_enabled = spec.operand(c).enabled();
        match current {
            // Someone else's value (an admin's `false`, the MIG manager's `paused-*`): respected.
            Some(v) if v != gate_value::ENABLED => {}
            // A gate stays once given, even if the node slips back a stage: taking it away would
            // stop pods that work. It goes when the component is disabled.
            Some(_) if !policy_enabled => {
                labels.insert(key, None);
            }
            Some(_) => {}
            None if wanted.contains(&c) => {
                labels.insert(key, Some(gate_value::ENABLED.into()));
            }
            None => {}
        }
    }

    if node.label(label::STAGE) != Some(stage.as_str()) {
        labels.insert(label::STAGE.into(), Some(stage.as_str().into()));
    }
    // The reason is written only for failures: transient waits would cost a write each.
    let want_reason = if failure { reason.clone() } else { None };
    if node.annotations.get(annotation::STAGE_REASON) != want_reason.as_ref() {
        annotations.insert(annotation::STAGE_REASON.into(), want_reason);
    }
    NodePlan {
        state: NodeState::Gpu {
            stage,
            reason,
            failure,
        },
        labels,
        annotations,
    }
}

/// The changes that remove everything this controller set on a node (policy deleted, or the node
/// is no longer a GPU node). Admins' `false` gates stay; `paused-*` gates (set by gpu-pilot's MIG
/// manager) go too.
pub fn cleanup_node(node: &NodeFacts) -> NodePlan {
    let mut labels = BTreeMap::new();
    let mut annotations = BTreeMap::new();
    remove_owned(node, &mut labels, &mut annotations);
    NodePlan {
        state: NodeState::NotGpu,
        labels,
        annotations,
    }
}

fn remove_owned(
    node: &NodeFacts,
    labels: &mut BTreeMap<String, Option<String>>,
    annotations: &mut BTreeMap<String, Option<String>>,
) {
    for c in Component::ALL {
        let key = label::deploy_gate(c);
        if let Some(v) = node.label(&key)
            && (v == gate_value::ENABLED || v.starts_with(gate_value::PAUSED_PREFIX))
        {
            labels.insert(key, None);
        }
    }
    if node.labels.contains_key(label::STAGE) {
        labels.insert(label::STAGE.into(), None);
    }
    if node
        .annotations
        .contains_key(annotation::GPU_PRESENT_SOURCE)
    {
        if node.labels.contains_key(label::GPU_PRESENT) {
            labels.insert(label::GPU_PRESENT.into(), None);
        }
        annotations.insert(annotation::GPU_PRESENT_SOURCE.into(), None);
    }
    if node.annotations.contains_key(annotation::STAGE_REASON) {
        annotations.insert(annotation::STAGE_REASON.into(), None);
    }
}

/// Applies a plan to facts, as the API server will: used to keep the in-memory view current
/// right after a successful patch, before the watch event arrives.
pub fn apply_plan(node: &mut NodeFacts, plan: &NodePlan) {
    for (k, v) in &plan.labels {
        match v {
            Some(v) => node.labels.insert(k.clone(), v.clone()),
            None => node.labels.remove(k),
        };
    }
    for (k, v) in &plan.annotations {
        match v {
            Some(v) => node.annotations.insert(k.clone(), v.clone()),
            None => node.annotations.remove(k),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> ClusterPolicySpec {
        serde_json::from_value(v).unwrap()
    }

    fn gpu_node() -> NodeFacts {
        NodeFacts {
            name: "gpu-1".into(),
            labels: BTreeMap::from([(label::NFD_PCI_10DE.into(), "true".into())]),
            annotations: BTreeMap::new(),
            gpu_allocatable: 0,
        }
    }

    fn pod(c: Component, ready: bool, reason: Option<&str>) -> PodFacts {
        PodFacts {
            node: "gpu-1".into(),
            component: c,
            ready,
            reason: reason.map(String::from),
        }
    }

    /// Runs the node to a fixed point, pretending every gated pod becomes ready at once and the
    /// device plugin advertises GPUs; returns the stages it passed through.
    fn walk(spec: &ClusterPolicySpec, mut node: NodeFacts) -> (Vec<Stage>, NodeFacts) {
        let mut stages = Vec::new();
        for _ in 0..20 {
            let pods: Vec<PodFacts> = Component::ALL
                .into_iter()
                .filter(|c| node.label(&label::deploy_gate(*c)) == Some("true"))
                .map(|c| pod(c, true, None))
                .collect();
            if node.label(&label::deploy_gate(Component::DevicePlugin)) == Some("true") {
                node.gpu_allocatable = 8;
            }
            let refs: Vec<&PodFacts> = pods.iter().collect();
            let plan = plan_node(spec, &node, &refs);
            if let NodeState::Gpu { stage, .. } = plan.state
                && stages.last() != Some(&stage)
            {
                stages.push(stage);
            }
            if plan.is_noop() {
                break;
            }
            apply_plan(&mut node, &plan);
        }
        (stages, node)
    }

    #[test]
    fn a_node_passes_every_stage_in_order() {
        let (stages, node) = walk(&ClusterPolicySpec::default(), gpu_node());
        assert_eq!(
            stages,
            vec![
                Stage::Toolkit,
                Stage::Driver,
                Stage::DriverValidation,
                Stage::DevicePlugin,
                Stage::Ready
            ]
        );
        for c in Component::ALL {
            assert_eq!(node.label(&label::deploy_gate(c)), Some("true"), "{c:?}");
        }
        assert_eq!(node.label(label::GPU_PRESENT), Some("true"));
        assert_eq!(node.label(label::STAGE), Some("ready"));
    }

    #[test]
    fn the_first_step_gates_only_the_toolkit() {
        let plan = plan_node(&ClusterPolicySpec::default(), &gpu_node(), &[]);
        let gates: Vec<&String> = plan
            .labels
            .keys()
            .filter(|k| k.starts_with(label::DEPLOY_PREFIX))
            .collect();
        assert_eq!(gates, vec!["nvidia.com/gpu.deploy.container-toolkit"]);
        assert!(matches!(
            plan.state,
            NodeState::Gpu {
                stage: Stage::Toolkit,
                failure: false,
                ..
            }
        ));
    }

    #[test]
    fn disabled_driver_and_toolkit_are_skipped() {
        let s = spec(json!({"driver": {"enabled": false}, "toolkit": {"enabled": false}}));
        let (stages, node) = walk(&s, gpu_node());
        assert_eq!(
            stages,
            vec![Stage::DriverValidation, Stage::DevicePlugin, Stage::Ready]
        );
        assert_eq!(node.label("nvidia.com/gpu.deploy.driver"), None);
        assert_eq!(node.label("nvidia.com/gpu.deploy.container-toolkit"), None);
    }

    #[test]
    fn plugin_validation_waits_for_advertised_gpus() {
        let mut node = gpu_node();
        for c in [
            Component::ContainerToolkit,
            Component::Driver,
            Component::OperatorValidator,
            Component::DevicePlugin,
        ] {
            node.labels.insert(label::deploy_gate(c), "true".into());
        }
        let pods: Vec<PodFacts> = [
            Component::ContainerToolkit,
            Component::Driver,
            Component::OperatorValidator,
            Component::DevicePlugin,
        ]
        .into_iter()
        .map(|c| pod(c, true, None))
        .collect();
        let refs: Vec<&PodFacts> = pods.iter().collect();
        let plan = plan_node(&ClusterPolicySpec::default(), &node, &refs);
        let NodeState::Gpu {
            stage,
            reason,
            failure,
        } = plan.state
        else {
            panic!()
        };
        assert_eq!(stage, Stage::PluginValidation);
        assert!(reason.unwrap().contains("nvidia.com/gpu"));
        assert!(!failure);
        node.gpu_allocatable = 2;
        let plan = plan_node(&ClusterPolicySpec::default(), &node, &refs);
        assert!(matches!(
            plan.state,
            NodeState::Gpu {
                stage: Stage::Ready,
                ..
            }
        ));
    }

    #[test]
    fn a_failing_pod_holds_the_node_and_is_reported() {
        let mut node = gpu_node();
        node.labels.insert(
            label::deploy_gate(Component::ContainerToolkit),
            "true".into(),
        );
        node.labels
            .insert(label::deploy_gate(Component::Driver), "true".into());
        let pods = [
            pod(Component::ContainerToolkit, true, None),
            pod(Component::Driver, false, Some("ImagePullBackOff")),
        ];
        let refs: Vec<&PodFacts> = pods.iter().collect();
        let plan = plan_node(&ClusterPolicySpec::default(), &node, &refs);
        assert_eq!(
            plan.state,
            NodeState::Gpu {
                stage: Stage::Driver,
                reason: Some("driver pod: ImagePullBackOff".into()),
                failure: true
            }
        );
        assert_eq!(
            plan.annotations.get(annotation::STAGE_REASON),
            Some(&Some("driver pod: ImagePullBackOff".into()))
        );
        assert!(
            !plan
                .labels
                .contains_key(&label::deploy_gate(Component::OperatorValidator))
        );
    }

    #[test]
    fn foreign_gate_values_are_respected() {
        let mut node = gpu_node();
        node.labels.insert(
            label::deploy_gate(Component::ContainerToolkit),
            "true".into(),
        );
        node.labels
            .insert(label::deploy_gate(Component::Driver), "false".into());
        node.labels.insert(
            label::deploy_gate(Component::OperatorValidator),
            "paused-for-mig-change".into(),
        );
        let pods = [pod(Component::ContainerToolkit, true, None)];
        let refs: Vec<&PodFacts> = pods.iter().collect();
        let plan = plan_node(&ClusterPolicySpec::default(), &node, &refs);
        // driver=false skips the driver here; the paused validator holds the node.
        assert!(
            !plan
                .labels
                .contains_key(&label::deploy_gate(Component::Driver))
        );
        assert!(
            !plan
                .labels
                .contains_key(&label::deploy_gate(Component::OperatorValidator))
        );
        let NodeState::Gpu {
            stage,
            reason,
            failure,
        } = plan.state
        else {
            panic!()
        };
        assert_eq!(stage, Stage::DriverValidation);
        assert!(reason.unwrap().contains("paused-for-mig-change"));
        assert!(!failure);
    }

    #[test]
    fn gates_survive_a_slip_back_but_not_a_disabled_component() {
        let (_, mut node) = walk(&ClusterPolicySpec::default(), gpu_node());
        // The toolkit pod goes away: the node is reported at toolkit, but no gate is taken.
        let plan = plan_node(&ClusterPolicySpec::default(), &node, &[]);
        assert!(plan.labels.values().all(|v| v.is_some()), "{plan:?}");
        assert!(matches!(
            plan.state,
            NodeState::Gpu {
                stage: Stage::Toolkit,
                ..
            }
        ));
        apply_plan(&mut node, &plan);
        let s = spec(json!({"devicePlugin": {"enabled": false}}));
        let plan = plan_node(&s, &node, &[]);
        assert_eq!(
            plan.labels
                .get(&label::deploy_gate(Component::DevicePlugin)),
            Some(&None)
        );
    }

    #[test]
    fn cpu_nodes_are_never_touched() {
        let node = NodeFacts {
            name: "cpu".into(),
            ..Default::default()
        };
        let plan = plan_node(&ClusterPolicySpec::default(), &node, &[]);
        assert_eq!(plan.state, NodeState::NotGpu);
        assert!(plan.is_noop());
    }

    #[test]
    fn a_node_that_lost_its_gpu_label_is_cleaned() {
        let (_, mut node) = walk(&ClusterPolicySpec::default(), gpu_node());
        node.labels.remove(label::NFD_PCI_10DE);
        let plan = plan_node(&ClusterPolicySpec::default(), &node, &[]);
        assert_eq!(plan.state, NodeState::NotGpu);
        apply_plan(&mut node, &plan);
        assert!(node.labels.is_empty(), "{:?}", node.labels);
        assert!(node.annotations.is_empty());
    }

    #[test]
    fn agent_reported_gpu_present_counts_and_is_not_removed() {
        let node = NodeFacts {
            name: "n".into(),
            labels: BTreeMap::from([(label::GPU_PRESENT.into(), "true".into())]),
            ..Default::default()
        };
        let plan = plan_node(&ClusterPolicySpec::default(), &node, &[]);
        assert!(matches!(plan.state, NodeState::Gpu { .. }));
        assert!(!plan.labels.contains_key(label::GPU_PRESENT));
    }

    #[test]
    fn opt_out_removes_gates_but_not_admin_values() {
        let (_, mut node) = walk(&ClusterPolicySpec::default(), gpu_node());
        node.labels
            .insert(label::DEPLOY_OPERANDS.into(), "false".into());
        node.labels
            .insert(label::deploy_gate(Component::Driver), "false".into());
        let plan = plan_node(&ClusterPolicySpec::default(), &node, &[]);
        assert_eq!(plan.state, NodeState::OptedOut);
        apply_plan(&mut node, &plan);
        assert_eq!(
            node.label(&label::deploy_gate(Component::Driver)),
            Some("false")
        );
        assert_eq!(
            node.label(&label::deploy_gate(Component::DevicePlugin)),
            None
        );
    }

    #[test]
    fn cleanup_takes_everything_gpu_pilot_set() {
        let (_, mut node) = walk(&ClusterPolicySpec::default(), gpu_node());
        node.labels.insert(
            label::deploy_gate(Component::MigManager),
            "paused-for-mig-change".into(),
        );
        node.annotations
            .insert(annotation::STAGE_REASON.into(), "x".into());
        let plan = cleanup_node(&node);
        apply_plan(&mut node, &plan);
        assert_eq!(
            node.labels,
            BTreeMap::from([(label::NFD_PCI_10DE.into(), "true".into())])
        );
        assert!(node.annotations.is_empty());
    }
}
