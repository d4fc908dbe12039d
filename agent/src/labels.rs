//! GPU Feature Discovery's node labels, computed from an inventory: same names, same value
//! formats (product names with spaces turned into dashes, memory in MiB, `-MIG-<profile>` and
//! `-SHARED` product suffixes). `nvidia.com/gfd.timestamp` is left out on purpose: it would make
//! every pass a write.

use std::collections::BTreeMap;

use gpu_pilot_api::names::{label, resource};

use crate::inventory::{Inventory, MigProfile};
use crate::plugin::config::{MigStrategy, PluginConfig};

pub type Labels = BTreeMap<String, String>;

/// Whether `key` is one of GFD's feature labels, the only labels the agent writes and so the
/// only ones it may remove: `nvidia.com/cuda.*`, `nvidia.com/gpu.*`, `nvidia.com/mig-<profile>.*`,
/// `nvidia.com/mig.capable` and `nvidia.com/mig.strategy`; never a deploy gate
/// (`nvidia.com/gpu.deploy.*`) or an admin's choice (`nvidia.com/mig.config`,
/// `nvidia.com/device-plugin.config`), whatever a node's annotation lists.
pub fn is_feature_label(key: &str) -> bool {
    if key.starts_with(label::DEPLOY_PREFIX) {
        return false;
    }
    key.starts_with("nvidia.com/cuda.")
        || key.starts_with(label::GPU_PREFIX)
        || key.starts_with(label::MIG_PROFILE_PREFIX)
        || key == label::MIG_CAPABLE
        || key == label::MIG_STRATEGY
}

/// GFD's spelling of a product name: spaces become dashes.
pub fn product_label(product: &str) -> String {
    product.trim().replace(' ', "-")
}

/// The labels for this node's GPUs. Empty when the node has no GPU.
pub fn labels(inv: &Inventory, cfg: &PluginConfig) -> Labels {
    let mut l = Labels::new();
    let Some(first) = inv.gpus.first() else {
        return l;
    };
    let mut put = |k: &str, v: String| {
        l.insert(k.to_string(), v);
    };
    let strategy = cfg.mig_strategy();
    let (d_major, d_minor, d_rev) = inv.driver_parts();
    let (c_major, c_minor) = inv
        .cuda_version
        .split_once('.')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap_or((inv.cuda_version.clone(), "0".into()));
    put(label::GPU_PRESENT, "true".into());
    put(label::CUDA_DRIVER_MAJOR, d_major.clone());
    put(label::CUDA_DRIVER_MINOR, d_minor.clone());
    put(label::CUDA_DRIVER_REV, d_rev.clone());
    put(label::CUDA_DRIVER_FULL, inv.driver_version.clone());
    put(label::CUDA_RUNTIME_MAJOR, c_major.clone());
    put(label::CUDA_RUNTIME_MINOR, c_minor.clone());
    put(label::CUDA_RUNTIME_FULL, format!("{c_major}.{c_minor}"));
    put(label::CUDA_DRIVER_MAJOR_OLD, d_major);
    put(label::CUDA_DRIVER_MINOR_OLD, d_minor);
    put(label::CUDA_DRIVER_REV_OLD, d_rev);
    put(label::CUDA_RUNTIME_MAJOR_OLD, c_major);
    put(label::CUDA_RUNTIME_MINOR_OLD, c_minor);
    if !inv.machine.is_empty() {
        put(label::GPU_MACHINE, product_label(&inv.machine));
    }
    let model = &first.model;
    let (cc_major, cc_minor) = model.compute_major_minor();
    put(label::GPU_FAMILY, model.family.clone());
    put(label::GPU_COMPUTE_MAJOR, cc_major);
    put(label::GPU_COMPUTE_MINOR, cc_minor);
    put(
        label::MIG_CAPABLE,
        inv.gpus.iter().any(|g| g.model.mig_capable).to_string(),
    );
    put(label::MIG_STRATEGY, strategy.as_str().into());

    // Time-slicing of the whole-GPU resource decides replicas and the -SHARED suffix.
    let ts = cfg.sharing.time_slicing.clone().unwrap_or_default();
    let shared = ts.resources.iter().find(|r| r.name == resource::GPU);
    let replicas = shared.map(|r| r.replicas).unwrap_or(1);
    let renamed = shared.is_some_and(|r| r.rename.is_some() || ts.rename_by_default);
    let suffix = if replicas > 1 && !renamed {
        "-SHARED"
    } else {
        ""
    };
    put(label::GPU_REPLICAS, replicas.to_string());
    put(
        label::GPU_SHARING_STRATEGY,
        if replicas > 1 { "time-slicing" } else { "none" }.into(),
    );

    let mig_gpus: Vec<_> = inv.gpus.iter().filter(|g| g.mig_enabled).collect();
    match strategy {
        MigStrategy::Single if !mig_gpus.is_empty() => {
            // Every MIG device is an `nvidia.com/gpu`; the labels describe the profile.
            let count: usize = mig_gpus.iter().map(|g| g.mig_devices.len()).sum();
            let profile = mig_gpus
                .iter()
                .flat_map(|g| {
                    g.mig_devices
                        .first()
                        .and_then(|d| g.model.mig_profile(&d.profile))
                })
                .next();
            put(label::GPU_COUNT, count.to_string());
            match profile {
                Some(p) => {
                    put(
                        label::GPU_PRODUCT,
                        format!("{}-MIG-{}{suffix}", product_label(&model.product), p.name),
                    );
                    put(label::GPU_MEMORY, p.memory_mib.to_string());
                    profile_labels(&mut l, label::GPU_PREFIX, p);
                }
                None => {
                    put(
                        label::GPU_PRODUCT,
                        format!("{}{suffix}", product_label(&model.product)),
                    );
                    put(label::GPU_MEMORY, "0".into());
                }
            }
        }
        _ => {
            let whole = inv.gpus.iter().filter(|g| !g.mig_enabled).count();
            let count = if strategy == MigStrategy::Mixed {
                whole
            } else {
                inv.gpus.len()
            };
            put(label::GPU_COUNT, count.to_string());
            put(
                label::GPU_PRODUCT,
                format!("{}{suffix}", product_label(&model.product)),
            );
            put(label::GPU_MEMORY, model.memory_mib.to_string());
            if model.multiprocessors > 0 {
                put(
                    label::GPU_MULTIPROCESSORS,
                    model.multiprocessors.to_string(),
                );
            }
        }
    }
    if strategy == MigStrategy::Mixed {
        let mut counts: BTreeMap<&str, (u32, &MigProfile)> = BTreeMap::new();
        for g in &mig_gpus {
            for d in &g.mig_devices {
                if let Some(p) = g.model.mig_profile(&d.profile) {
                    counts.entry(p.name.as_str()).or_insert((0, p)).0 += 1;
                }
            }
        }
        for (name, (n, p)) in counts {
            let prefix = format!("{}{name}.", label::MIG_PROFILE_PREFIX);
            l.insert(format!("{prefix}count"), n.to_string());
            l.insert(format!("{prefix}memory"), p.memory_mib.to_string());
            l.insert(
                format!("{prefix}product"),
                format!("{}-MIG-{name}", product_label(&model.product)),
            );
            l.insert(format!("{prefix}replicas"), "1".into());
            profile_labels(&mut l, &prefix, p);
        }
    }
    l
}

fn profile_labels(l: &mut Labels, prefix: &str, p: &MigProfile) {
    let mut put = |k: &str, v: u32| {
        l.insert(format!("{prefix}{k}"), v.to_string());
    };
    put("multiprocessors", p.multiprocessors);
    put("slices.gi", p.compute_slices);
    put("slices.ci", p.compute_slices);
    put("engines.copy", p.engines.copy);
    put("engines.decoder", p.engines.decoder);
    put("engines.encoder", p.engines.encoder);
    put("engines.jpeg", p.engines.jpeg);
    put("engines.ofa", p.engines.ofa);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{MigDevice, built_in};

    fn inv(name: &str) -> Inventory {
        Inventory::from_yaml(built_in(name).unwrap()).unwrap()
    }

    #[test]
    fn dgx_h100_labels_match_gfd() {
        let l = labels(&inv("dgx-h100"), &PluginConfig::default());
        assert_eq!(l["nvidia.com/gpu.count"], "8");
        assert_eq!(l["nvidia.com/gpu.product"], "NVIDIA-H100-80GB-HBM3");
        assert_eq!(l["nvidia.com/gpu.memory"], "81559");
        assert_eq!(l["nvidia.com/gpu.family"], "hopper");
        assert_eq!(l["nvidia.com/gpu.compute.major"], "9");
        assert_eq!(l["nvidia.com/gpu.compute.minor"], "0");
        assert_eq!(l["nvidia.com/cuda.driver-version.full"], "550.54.15");
        assert_eq!(l["nvidia.com/cuda.driver-version.revision"], "15");
        assert_eq!(l["nvidia.com/cuda.runtime-version.full"], "12.4");
        assert_eq!(l["nvidia.com/mig.capable"], "true");
        assert_eq!(l["nvidia.com/mig.strategy"], "none");
        assert_eq!(l["nvidia.com/gpu.replicas"], "1");
        assert_eq!(l["nvidia.com/gpu.machine"], "DGX-H100");
    }

    #[test]
    fn t4_and_sharing() {
        let cfg = PluginConfig::parse(
            "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 4}\n",
            "t",
        )
        .unwrap();
        let l = labels(&inv("t4"), &cfg);
        assert_eq!(l["nvidia.com/gpu.product"], "Tesla-T4-SHARED");
        assert_eq!(l["nvidia.com/gpu.replicas"], "4");
        assert_eq!(l["nvidia.com/gpu.sharing-strategy"], "time-slicing");
        assert_eq!(l["nvidia.com/mig.capable"], "false");
    }

    #[test]
    fn every_label_written_is_a_feature_label_and_nothing_else_is() {
        let mut mixed = inv("a100-40gb");
        mixed.gpus[0].mig_enabled = true;
        mixed.gpus[0].mig_devices = vec![MigDevice {
            uuid: "MIG-0".into(),
            profile: "1g.5gb".into(),
        }];
        let configs = [
            "version: v1\n",
            "version: v1\nflags: {migStrategy: mixed}\n",
            "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 2}\n",
        ];
        for (inv, cfg) in [inv("dgx-h100"), inv("t4"), mixed]
            .into_iter()
            .flat_map(|i| configs.map(|c| (i.clone(), PluginConfig::parse(c, "c").unwrap())))
        {
            for k in labels(&inv, &cfg).keys() {
                assert!(
                    is_feature_label(k),
                    "{k} is written but not a feature label"
                );
            }
        }
        for k in [
            "nvidia.com/gpu.deploy.driver",
            "nvidia.com/gpu.deploy.operands",
            "nvidia.com/mig.config",
            "nvidia.com/mig.config.state",
            "nvidia.com/device-plugin.config",
            "gpupilot.io/stage",
            "kubernetes.io/hostname",
            "node-role.kubernetes.io/control-plane",
            "team",
        ] {
            assert!(!is_feature_label(k), "{k}");
        }
    }

    #[test]
    fn mig_mixed_and_single() {
        let mut a = inv("a100-40gb");
        for g in a.gpus.iter_mut().take(2) {
            g.mig_enabled = true;
            g.mig_devices = (0..7)
                .map(|i| MigDevice {
                    uuid: format!("MIG-{}-{i}", g.index),
                    profile: "1g.5gb".into(),
                })
                .collect();
        }
        let mixed = PluginConfig::parse("version: v1\nflags: {migStrategy: mixed}\n", "m").unwrap();
        let l = labels(&a, &mixed);
        assert_eq!(l["nvidia.com/gpu.count"], "2");
        assert_eq!(l["nvidia.com/mig-1g.5gb.count"], "14");
        assert_eq!(l["nvidia.com/mig-1g.5gb.memory"], "4864");
        assert_eq!(l["nvidia.com/mig-1g.5gb.slices.gi"], "1");
        let single =
            PluginConfig::parse("version: v1\nflags: {migStrategy: single}\n", "s").unwrap();
        let l = labels(&a, &single);
        assert_eq!(
            l["nvidia.com/gpu.product"],
            "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"
        );
        assert_eq!(l["nvidia.com/gpu.count"], "14");
        assert_eq!(l["nvidia.com/gpu.memory"], "4864");
    }
}
