//! ConfigMaps the policy and the nodes name.

use super::*;

pub(super) fn config_map_keys(s: &Snapshot, name: &str) -> Option<BTreeSet<String>> {
    let cm = s.config_maps.iter().find(|c| c.name_any() == name)?;
    Some(
        cm.data
            .iter()
            .flat_map(|d| d.keys().cloned())
            .chain(cm.binary_data.iter().flat_map(|d| d.keys().cloned()))
            .collect(),
    )
}

pub(super) fn device_plugin_config(s: &Snapshot) -> Vec<Finding> {
    let Some(p) = active_policy(s) else {
        return vec![];
    };
    let cfg = &p.spec.device_plugin.config;
    let keys = if cfg.name.is_empty() {
        None
    } else {
        config_map_keys(s, &cfg.name)
    };
    let mut by_entry: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in gpu_nodes(s) {
        let Some(entry) = node_label(n, label::DEVICE_PLUGIN_CONFIG) else {
            continue;
        };
        let ok = keys.as_ref().is_some_and(|k| k.contains(entry));
        if !ok {
            by_entry
                .entry(entry.to_string())
                .or_default()
                .push(node_ref(n));
        }
    }
    if by_entry.is_empty() {
        return vec![];
    }
    let evidence: Vec<String> = by_entry
        .iter()
        .map(|(e, ns)| {
            format!(
                "{}={e} on {}",
                label::DEVICE_PLUGIN_CONFIG,
                count_phrase(ns.len(), "node", "nodes")
            )
        })
        .chain([match &keys {
            Some(k) => format!(
                "ConfigMap {}/{} has the entries: {}",
                s.namespace,
                cfg.name,
                k.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            None if cfg.name.is_empty() => format!(
                "the policy {} names no device-plugin ConfigMap (spec.devicePlugin.config.name is empty)",
                p.name_any()
            ),
            None => format!("ConfigMap {}/{} does not exist", s.namespace, cfg.name),
        }])
        .collect();
    vec![
        Finding::new(
            "device-plugin-config-missing",
            Severity::Error,
            format!(
                "Nodes select device-plugin config entries that do not exist: the device plugin there falls back to {}",
                if cfg.default.is_empty() { "no sharing".to_string() } else { format!("the default entry {}", cfg.default) }
            ),
        )
        .objects(by_entry.values().flatten().cloned())
        .evidence(evidence)
        .fix(format!(
            "Add the entry to the ConfigMap named in spec.devicePlugin.config.name (kubectl {} edit configmap {}), or relabel the nodes: kubectl label node <node> {}=<entry> --overwrite (or {}- to use the default)",
            ns_flag(s),
            if cfg.name.is_empty() { "<name>" } else { &cfg.name },
            label::DEVICE_PLUGIN_CONFIG,
            label::DEVICE_PLUGIN_CONFIG
        )),
    ]
}

pub(super) fn policy_configmaps(s: &Snapshot) -> Vec<Finding> {
    let Some(p) = active_policy(s) else {
        return vec![];
    };
    if s.unreadable.iter().any(|u| u.contains("ConfigMaps")) {
        return vec![];
    }
    let mut out = Vec::new();
    let refs = [
        (
            "devicePlugin",
            &p.spec.device_plugin.config,
            p.spec.device_plugin.enabled,
        ),
        (
            "dcgmExporter",
            &p.spec.dcgm_exporter.config,
            p.spec.dcgm_exporter.enabled,
        ),
        (
            "migManager",
            &p.spec.mig_manager.config,
            p.spec.mig_manager.enabled,
        ),
    ];
    for (field, cfg, enabled) in refs {
        if !enabled || cfg.name.is_empty() {
            continue;
        }
        // The built-in layouts ConfigMap is created by install; without it the MIG manager
        // offers its own standard layouts.
        if field == "migManager" && cfg.name == gpu_pilot_core::render::install::MIG_PARTED_CONFIG {
            continue;
        }
        match config_map_keys(s, &cfg.name) {
            None => out.push(
                Finding::new(
                    "policy-configmap-missing",
                    Severity::Error,
                    format!("The ConfigMap {} that spec.{field}.config.name names is missing", cfg.name),
                )
                .objects([format!("ConfigMap/{}/{}", s.namespace, cfg.name)])
                .evidence([format!(
                    "policy {}: spec.{field}.config.name={}, no such ConfigMap in {}",
                    p.name_any(),
                    cfg.name,
                    s.namespace
                )])
                .fix(format!(
                    "Create it in {} (kubectl {} create configmap {} --from-file=<entry>=<file>), or clear spec.{field}.config in the policy",
                    s.namespace,
                    ns_flag(s),
                    cfg.name
                )),
            ),
            Some(keys) if field == "devicePlugin" && !cfg.default.is_empty() && !keys.contains(&cfg.default) => {
                out.push(
                    Finding::new(
                        "policy-configmap-missing",
                        Severity::Error,
                        format!("spec.{field}.config.default names {}, which the ConfigMap {} lacks", cfg.default, cfg.name),
                    )
                    .objects([format!("ConfigMap/{}/{}", s.namespace, cfg.name)])
                    .evidence([format!(
                        "entries of {}: {}",
                        cfg.name,
                        keys.iter().cloned().collect::<Vec<_>>().join(", ")
                    )])
                    .fix(format!(
                        "Add the entry {} to the ConfigMap, or set spec.{field}.config.default to one of its entries",
                        cfg.default
                    )),
                );
            }
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests;
