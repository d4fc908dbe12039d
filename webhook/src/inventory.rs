//! What MIG profiles the cluster offers, read from the nodes, and how GPU memory requests map to
//! them.
//!
//! Under the `mixed` strategy a node advertises each profile as its own extended resource
//! (`nvidia.com/mig-1g.10gb`); under `single` every GPU of a node is cut the same way and GPU Feature
//! Discovery names the product `<model>-MIG-<profile>` in `nvidia.com/gpu.product`. A profile's size
//! is the number in its name, read as GiB (`3g.20gb` holds 20 GiB), which is what a user writing
//! `gpupilot.io/gpu-memory: 20Gi` means.

use std::collections::{BTreeMap, BTreeSet};

use gpu_pilot_api::names::{label, resource};
use k8s_openapi::api::core::v1::Node;

const GIB: u64 = 1 << 30;
/// What GFD puts between the model and the profile in `nvidia.com/gpu.product` under `single`.
const SINGLE_PRODUCT_MARKER: &str = "-MIG-";

/// A MIG profile name such as `1g.10gb`, `7g.80gb` or `1g.10gb+me`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MigProfile {
    /// GPU memory in GiB, from the name.
    pub memory_gib: u32,
    /// Compute slices (the `Ng` part).
    pub slices: u32,
    /// The name exactly as written.
    pub name: String,
}

impl MigProfile {
    /// Parses `[<c>c.]<g>g.<m>gb[+<attrs>]`; `None` for anything else.
    pub fn parse(name: &str) -> Option<MigProfile> {
        if name.is_empty() || name.len() > 63 {
            return None;
        }
        let base = name.split('+').next()?;
        let attrs_ok = name
            .split('+')
            .skip(1)
            .all(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'));
        if !attrs_ok {
            return None;
        }
        let parts: Vec<&str> = base.split('.').collect();
        let (slices, memory) = match parts.as_slice() {
            [g, m] => (*g, *m),
            [c, g, m] => {
                number(c.strip_suffix('c')?)?;
                (*g, *m)
            }
            _ => return None,
        };
        let slices = number(slices.strip_suffix('g')?)?;
        let memory_gib = number(memory.strip_suffix("gb")?)?;
        if slices == 0 || memory_gib == 0 {
            return None;
        }
        Some(MigProfile {
            memory_gib,
            slices,
            name: name.to_string(),
        })
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_gib) * GIB
    }
}

fn number(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 4 || !s.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a Kubernetes-style memory quantity (`20Gi`, `20G`, `1.5Ti`, `512Mi`, `21474836480`)
/// into bytes. `GB`/`GiB` spellings are accepted too, since people write them.
pub fn parse_memory(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, unit) = q.split_at(split);
    if num.is_empty() || num.len() > 20 {
        return None;
    }
    let value: f64 = num.parse().ok()?;
    let factor: f64 = match unit {
        "" => 1.0,
        "k" | "K" | "kB" | "KB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "Gi" | "GiB" => GIB as f64,
        "Ti" | "TiB" => GIB as f64 * 1024.0,
        _ => return None,
    };
    let bytes = value * factor;
    if !bytes.is_finite() || bytes <= 0.0 || bytes > 1e18 {
        return None;
    }
    Some(bytes.ceil() as u64)
}

/// The MIG profiles the cluster's nodes offer, under each strategy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigInventory {
    /// Profiles advertised as `nvidia.com/mig-<profile>` with capacity above zero.
    pub mixed: BTreeSet<MigProfile>,
    /// Profiles seen in `nvidia.com/gpu.product` labels, with the full product values naming them.
    pub single: BTreeMap<MigProfile, BTreeSet<String>>,
}

impl MigInventory {
    pub fn from_nodes<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> MigInventory {
        let mut inv = MigInventory::default();
        for node in nodes {
            if let Some(capacity) = node.status.as_ref().and_then(|s| s.capacity.as_ref()) {
                for (name, qty) in capacity {
                    let Some(profile) = name.strip_prefix(resource::MIG_PREFIX) else {
                        continue;
                    };
                    let positive = qty
                        .0
                        .trim()
                        .parse::<f64>()
                        .map(|n| n > 0.0)
                        .unwrap_or(false);
                    if let (true, Some(p)) = (positive, MigProfile::parse(profile)) {
                        inv.mixed.insert(p);
                    }
                }
            }
            if let Some(product) = node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(label::GPU_PRODUCT))
                && let Some((_, profile)) = product.rsplit_once(SINGLE_PRODUCT_MARKER)
                && let Some(p) = MigProfile::parse(profile)
            {
                inv.single.entry(p).or_default().insert(product.clone());
            }
        }
        inv
    }

    /// The smallest profile offered under `mixed` holding at least `bytes`.
    pub fn smallest_mixed(&self, bytes: u64) -> Option<&MigProfile> {
        // Ordered by memory, then slices, then name: the first that fits is the smallest.
        self.mixed.iter().find(|p| p.memory_bytes() >= bytes)
    }

    /// The smallest profile offered under `single` holding at least `bytes`.
    pub fn smallest_single(&self, bytes: u64) -> Option<&MigProfile> {
        self.single.keys().find(|p| p.memory_bytes() >= bytes)
    }

    /// The `nvidia.com/gpu.product` values of nodes cut into `profile` under `single`.
    pub fn single_products(&self, profile: &str) -> Vec<String> {
        self.single
            .iter()
            .filter(|(p, _)| p.name == profile)
            .flat_map(|(_, products)| products.iter().cloned())
            .collect()
    }

    /// Profile names for messages.
    pub fn mixed_names(&self) -> Vec<&str> {
        self.mixed.iter().map(|p| p.name.as_str()).collect()
    }
    pub fn single_names(&self) -> Vec<&str> {
        self.single.keys().map(|p| p.name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn profiles_parse() {
        let p = MigProfile::parse("1g.10gb").unwrap();
        assert_eq!((p.slices, p.memory_gib), (1, 10));
        assert_eq!(MigProfile::parse("7g.80gb").unwrap().memory_gib, 80);
        assert_eq!(MigProfile::parse("1g.10gb+me").unwrap().memory_gib, 10);
        assert_eq!(MigProfile::parse("1c.3g.20gb").unwrap().slices, 3);
        for bad in [
            "",
            "1g",
            "10gb",
            "g.10gb",
            "1g.gb",
            "1g.10",
            "0g.10gb",
            "1g.10gb+",
            "a.b.c.d",
            "1g.10gb/x",
        ] {
            assert_eq!(MigProfile::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn memory_quantities_parse() {
        assert_eq!(parse_memory("20Gi"), Some(20 * GIB));
        assert_eq!(parse_memory("20G"), Some(20_000_000_000));
        assert_eq!(parse_memory("512Mi"), Some(512 << 20));
        assert_eq!(parse_memory("1.5Gi"), Some(3 * GIB / 2));
        assert_eq!(parse_memory("1024"), Some(1024));
        for bad in ["", "Gi", "20 apples", "-1Gi", "0", "1e3Gi", "20Xi"] {
            assert_eq!(parse_memory(bad), None, "{bad:?}");
        }
    }

    fn node(capacity: serde_json::Value, product: Option<&str>) -> Node {
        let mut labels = serde_json::Map::new();
        if let Some(p) = product {
            labels.insert(label::GPU_PRODUCT.into(), json!(p));
        }
        serde_json::from_value(json!({
            "metadata": {"name": "n", "labels": labels},
            "status": {"capacity": capacity}
        }))
        .unwrap()
    }

    #[test]
    fn inventory_reads_mixed_capacity_and_single_products() {
        let nodes = [
            node(
                json!({"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "2", "nvidia.com/mig-7g.80gb": "0", "nvidia.com/gpu": "8"}),
                None,
            ),
            node(
                json!({"nvidia.com/gpu": "4"}),
                Some("NVIDIA-A100-SXM4-40GB-MIG-2g.10gb"),
            ),
            node(json!({"nvidia.com/gpu": "1"}), Some("Tesla-T4")),
        ];
        let inv = MigInventory::from_nodes(&nodes);
        assert_eq!(
            inv.mixed_names(),
            vec!["1g.10gb", "3g.40gb"],
            "zero capacity is not offered"
        );
        assert_eq!(inv.single_names(), vec!["2g.10gb"]);
        assert_eq!(
            inv.single_products("2g.10gb"),
            vec!["NVIDIA-A100-SXM4-40GB-MIG-2g.10gb".to_string()]
        );
        assert_eq!(inv.smallest_mixed(5 * GIB).unwrap().name, "1g.10gb");
        assert_eq!(inv.smallest_mixed(10 * GIB).unwrap().name, "1g.10gb");
        assert_eq!(inv.smallest_mixed(10 * GIB + 1).unwrap().name, "3g.40gb");
        assert_eq!(inv.smallest_mixed(41 * GIB), None);
        assert_eq!(inv.smallest_single(8 * GIB).unwrap().name, "2g.10gb");
    }
}
