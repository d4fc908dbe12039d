//! NVIDIA mig-parted's `version: v1` config as gpu-pilot reads it from a ConfigMap.

use k8s_openapi::api::core::v1::ConfigMap;

/// The layout names under `mig-configs` in every YAML value of a mig-parted ConfigMap.
pub fn mig_layouts(cm: &ConfigMap) -> Vec<String> {
    let mut names = Vec::new();
    for text in cm.data.iter().flat_map(|d| d.values()) {
        let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(text) else {
            continue;
        };
        if let Some(map) = doc.get("mig-configs").and_then(|m| m.as_mapping()) {
            names.extend(map.keys().filter_map(|k| k.as_str().map(str::to_string)));
        }
    }
    names.sort();
    names.dedup();
    names
}
