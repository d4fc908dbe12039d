//! What the snapshot itself says: Warning events, parts that could not be read.

use super::*;

pub(super) fn warning_events(s: &Snapshot) -> Vec<Finding> {
    let mut groups: BTreeMap<(String, String), (i32, String, Vec<String>)> = BTreeMap::new();
    for e in &s.events {
        if e.type_.as_deref() != Some("Warning") {
            continue;
        }
        let when = e
            .last_timestamp
            .as_ref()
            .map(|t| t.0)
            .or(e.event_time.as_ref().map(|t| t.0))
            .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0));
        if age_seconds(s, when).is_some_and(|a| a > 3600) {
            continue;
        }
        let kind = e.involved_object.kind.clone().unwrap_or_default();
        let key = (e.reason.clone().unwrap_or_default(), kind.clone());
        let entry = groups
            .entry(key)
            .or_insert_with(|| (0, e.message.clone().unwrap_or_default(), Vec::new()));
        entry.0 += e.count.unwrap_or(1).max(1);
        let obj = format!(
            "{kind}/{}/{}",
            s.namespace,
            e.involved_object.name.clone().unwrap_or_default()
        );
        if !entry.2.contains(&obj) {
            entry.2.push(obj);
        }
    }
    if groups.is_empty() {
        return vec![];
    }
    let mut sorted: Vec<_> = groups.into_iter().collect();
    sorted.sort_by_key(|g| std::cmp::Reverse(g.1.0));
    let total: i32 = sorted.iter().map(|(_, v)| v.0).sum();
    vec![
        Finding::new(
            "warning-events",
            Severity::Info,
            format!("{total} Warning events in {} in the last hour", s.namespace),
        )
        .objects(sorted.iter().flat_map(|(_, v)| v.2.clone()))
        .evidence(
            sorted
                .iter()
                .take(5)
                .map(|((reason, kind), (n, msg, _))| format!("{n}x {reason} on {kind}: {msg}")),
        )
        .fix(format!(
            "kubectl {} get events --field-selector type=Warning --sort-by=.lastTimestamp",
            ns_flag(s)
        )),
    ]
}

pub(super) fn incomplete(s: &Snapshot) -> Vec<Finding> {
    if s.unreadable.is_empty() {
        return vec![];
    }
    vec![
        Finding::new(
            "doctor-incomplete",
            Severity::Warning,
            format!(
                "{} of the cluster could not be read: the checks that need them found nothing",
                count_phrase(s.unreadable.len(), "part", "parts")
            ),
        )
        .evidence(s.unreadable.clone())
        .fix("Run doctor as a cluster admin (it only reads: nodes, pods, DaemonSets, Deployments, Services, EndpointSlices, ConfigMaps, Events, Leases, RuntimeClasses, CRDs, ClusterPolicies, webhook configurations, and the webhook Secret's metadata)"),
    ]
}

#[cfg(test)]
mod tests;
