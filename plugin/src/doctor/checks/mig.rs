//! MIG layout changes and paused gates.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

use super::*;

pub(super) fn mig_failed(s: &Snapshot) -> Vec<Finding> {
    let failed: Vec<&Node> = s
        .nodes
        .iter()
        .filter(|n| node_label(n, label::MIG_CONFIG_STATE) == Some(mig_config_state::FAILED))
        .collect();
    if failed.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "mig-config-failed",
            Severity::Error,
            format!(
                "MIG layout change failed on {}",
                count_phrase(failed.len(), "node", "nodes")
            ),
        )
        .objects(failed.iter().map(|n| node_ref(n)))
        .evidence(failed.iter().take(5).map(|n| {
            format!(
                "{}: {}={} asked, {}={}",
                n.name_any(),
                label::MIG_CONFIG,
                node_label(n, label::MIG_CONFIG).unwrap_or("(none)"),
                label::MIG_CONFIG_STATE,
                mig_config_state::FAILED
            )
        }))
        .fix(format!(
            "Read why: kubectl {} logs -l {}={} --field-selector spec.nodeName=<node> (a profile the GPU lacks?). Then ask for a layout it supports: kubectl label node <node> {}=all-disabled --overwrite",
            ns_flag(s),
            label::COMPONENT,
            Component::MigManager.gate_name(),
            label::MIG_CONFIG
        )),
    ]
}

/// When the MIG state label was last written, from the node's managedFields.
pub(super) fn mig_state_written(n: &Node) -> Option<Timestamp> {
    n.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| writes_mig_state(m))
        .filter_map(|m| m.time.as_ref().map(|t| t.0))
        .max()
}

/// A managedFields entry that owns the MIG state label: the only entries a check reads (the
/// snapshot keeps these and drops the rest).
pub fn writes_mig_state(m: &ManagedFieldsEntry) -> bool {
    let needle = format!("f:{}", label::MIG_CONFIG_STATE);
    m.fields_v1
        .as_ref()
        .is_some_and(|f| f.0.to_string().contains(&needle))
}

/// How long a MIG change may stay pending before it is a warning.
pub(super) const MIG_PENDING_WARN_SECONDS: i64 = 15 * 60;

pub(super) fn mig_pending(s: &Snapshot) -> Vec<Finding> {
    let mut long = Vec::new();
    let mut recent = Vec::new();
    for n in &s.nodes {
        let state = node_label(n, label::MIG_CONFIG_STATE);
        if state != Some(mig_config_state::PENDING) && state != Some(mig_config_state::REBOOTING) {
            continue;
        }
        let age = age_seconds(s, mig_state_written(n));
        let line = format!(
            "{}: {} toward {}={}{}",
            n.name_any(),
            state.unwrap_or_default(),
            label::MIG_CONFIG,
            node_label(n, label::MIG_CONFIG).unwrap_or("(none)"),
            age.map(|a| format!(", for {} min", a / 60))
                .unwrap_or_default()
        );
        if age.is_some_and(|a| a > MIG_PENDING_WARN_SECONDS) {
            long.push((n, line));
        } else {
            recent.push((n, line));
        }
    }
    let mut out = Vec::new();
    if !long.is_empty() {
        out.push(
            Finding::new(
                "mig-config-pending",
                Severity::Warning,
                format!(
                    "MIG layout change pending for more than 15 minutes on {}",
                    count_phrase(long.len(), "node", "nodes")
                ),
            )
            .objects(long.iter().map(|(n, _)| node_ref(n)))
            .evidence(long.iter().take(5).map(|(_, l)| l.clone()))
            .fix(format!(
                "Is the MIG manager running there? kubectl {} get pods -l {}={} -o wide; its logs say what it waits for (GPU pods still running on the GPUs?)",
                ns_flag(s),
                label::COMPONENT,
                Component::MigManager.gate_name()
            )),
        );
    }
    if !recent.is_empty() {
        out.push(
            Finding::new(
                "mig-config-pending",
                Severity::Info,
                format!(
                    "MIG layout change in progress on {}",
                    count_phrase(recent.len(), "node", "nodes")
                ),
            )
            .objects(recent.iter().map(|(n, _)| node_ref(n)))
            .evidence(recent.iter().take(5).map(|(_, l)| l.clone()))
            .fix("Nothing to do yet: GPU workloads on these nodes are paused until it finishes."),
        );
    }
    out
}

pub(super) fn gate_paused(s: &Snapshot) -> Vec<Finding> {
    let mut nodes = Vec::new();
    let mut lines = Vec::new();
    for n in &s.nodes {
        let state = node_label(n, label::MIG_CONFIG_STATE);
        // During a MIG change paused gates are expected (mig-config-pending reports it).
        if state == Some(mig_config_state::PENDING) || state == Some(mig_config_state::REBOOTING) {
            continue;
        }
        let paused: Vec<String> = n
            .labels()
            .iter()
            .filter(|(k, v)| {
                k.starts_with(label::DEPLOY_PREFIX) && v.starts_with(gate_value::PAUSED_PREFIX)
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if paused.is_empty() {
            continue;
        }
        if lines.len() < 5 {
            lines.push(format!("{}: {}", n.name_any(), paused.join(", ")));
        }
        nodes.push(node_ref(n));
    }
    if nodes.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "gate-paused",
            Severity::Warning,
            format!(
                "Deploy gates left paused on {} with no MIG change in progress: their operands stay off",
                count_phrase(nodes.len(), "node", "nodes")
            ),
        )
        .objects(nodes)
        .evidence(lines)
        .fix(format!(
            "A MIG manager that stopped mid-change leaves them; restarting it restores them (kubectl {} delete pod -l {}={} --field-selector spec.nodeName=<node>). By hand: kubectl label node <node> {}=true --overwrite",
            ns_flag(s),
            label::COMPONENT,
            Component::MigManager.gate_name(),
            label::deploy_gate(Component::DevicePlugin)
        )),
    ]
}

#[cfg(test)]
mod tests;
