//! How dcgm-exporter's metrics are reached: its Service and, with the Prometheus operator, a
//! ServiceMonitor (NVIDIA's `dcgmExporter.service` and `dcgmExporter.serviceMonitor`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The Service in front of the exporters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct DcgmExporterServiceSpec {
    /// `ClusterIP` or `NodePort` (the exporters run on every GPU node, so a load balancer
    /// in front of them makes little sense, but Kubernetes' other types are accepted).
    #[serde(rename = "type")]
    #[schemars(extend("enum" = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]))]
    pub type_: String,
    /// `Cluster`, or `Local` to keep scrapes on the scraper's node.
    #[schemars(extend("enum" = ["Cluster", "Local"]))]
    pub internal_traffic_policy: String,
}

impl Default for DcgmExporterServiceSpec {
    fn default() -> Self {
        Self {
            type_: "ClusterIP".into(),
            internal_traffic_policy: "Cluster".into(),
        }
    }
}

/// A Prometheus operator ServiceMonitor for the exporters' Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct DcgmExporterServiceMonitorSpec {
    /// Create the ServiceMonitor (needs the `monitoring.coreos.com` CRDs).
    pub enabled: bool,
    /// Scrape interval, e.g. `15s`.
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.matches('^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$')", "message": "interval must be a Prometheus duration such as 15s or 1m"}
    ]))]
    pub interval: String,
    /// Keep the exporters' own labels when they clash with the target's.
    pub honor_labels: bool,
    /// Labels on the ServiceMonitor, e.g. the `release` a Prometheus selects.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::label_map")]
    pub additional_labels: BTreeMap<String, String>,
    /// Relabelings applied to the targets before scraping.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = super::bounds::MAX_ITEMS))]
    pub relabelings: Vec<RelabelConfig>,
}

impl Default for DcgmExporterServiceMonitorSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: "15s".into(),
            honor_labels: false,
            additional_labels: BTreeMap::new(),
            relabelings: Vec::new(),
        }
    }
}

/// One Prometheus relabeling rule, as the Prometheus operator spells it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelabelConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = [
        "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
        "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
        "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
        "dropequal", "DropEqual"
    ]))]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4_294_967_295i64))]
    pub modulus: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub replacement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub separator: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = super::bounds::MAX_ITEMS), inner(length(max = 1024)))]
    pub source_labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub target_label: Option<String>,
}
