//! MIG layouts in mig-parted's `version: v1` config format, and the pure planning step that turns
//! one named layout into what each GPU must look like (or says why it cannot).
//!
//! Entries select GPUs as mig-parted does: `device-filter` (one PCI device ID such as
//! `0x233010DE`, or a list) and `devices` (`all`, or GPU indices on the node) must both match; a
//! later entry overrides an earlier one for the same GPU; GPUs no entry selects are left as they
//! are. A GPU that cannot do MIG is skipped by `devices: all` and by `mig-enabled: false`, and is
//! an error only when an entry names it by index and asks for MIG. So one layout can serve nodes
//! with different GPUs, as NVIDIA's default-mig-parted-config does.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::inventory::{Inventory, format_pci_device_id, parse_pci_device_id};

use crate::mig_layout::{COMPUTE_SLICES, MEMORY_SLICES};

/// A whole mig-parted config file: named layouts.
#[derive(Debug, Clone, Deserialize)]
pub struct MigConfigFile {
    pub version: String,
    #[serde(rename = "mig-configs")]
    pub mig_configs: BTreeMap<String, Vec<MigConfigEntry>>,
}

/// One entry of a layout: which GPUs, MIG on or off, and which MIG devices.
#[derive(Debug, Clone, Deserialize)]
pub struct MigConfigEntry {
    pub devices: DeviceSelector,
    #[serde(rename = "device-filter", default)]
    pub device_filter: Option<DeviceFilter>,
    #[serde(rename = "mig-enabled")]
    pub mig_enabled: bool,
    #[serde(rename = "mig-devices", default)]
    pub mig_devices: BTreeMap<String, u32>,
}

/// `devices: all` or `devices: [0, 1]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DeviceSelector {
    Keyword(String),
    Indices(Vec<u32>),
}

/// `device-filter: "0x20B010DE"` or `device-filter: ["0x20B010DE", "0x20B110DE"]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DeviceFilter {
    One(String),
    Many(Vec<String>),
}

impl DeviceFilter {
    /// The PCI device IDs, or the first entry that is not one.
    fn ids(&self) -> Result<Vec<u32>, String> {
        let texts: Vec<&String> = match self {
            DeviceFilter::One(s) => vec![s],
            DeviceFilter::Many(v) => v.iter().collect(),
        };
        texts
            .into_iter()
            .map(|t| {
                parse_pci_device_id(t).ok_or_else(|| {
                    format!(
                        "device-filter '{t}' is not a PCI device ID; write it as mig-parted does, \
                         e.g. \"0x233010DE\" for an H100 SXM5 80GB"
                    )
                })
            })
            .collect()
    }
}

/// What each named GPU must look like after the change.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MigPlan {
    pub gpus: Vec<GpuMigPlan>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GpuMigPlan {
    pub index: u32,
    pub mig_enabled: bool,
    /// Profile -> how many devices of it.
    pub devices: BTreeMap<String, u32>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MigConfigError {
    #[error("the MIG config file is not valid YAML in mig-parted's format: {0}")]
    Parse(String),
    #[error("the MIG config file has version '{0}'; only 'v1' is understood")]
    Version(String),
    #[error(
        "the node asks for MIG config '{wanted}', which the config file does not have (it has: {have})"
    )]
    UnknownConfig { wanted: String, have: String },
    #[error("MIG config '{config}': {message}")]
    Impossible { config: String, message: String },
}

impl MigConfigFile {
    pub fn parse(text: &str) -> Result<MigConfigFile, MigConfigError> {
        let file: MigConfigFile =
            serde_yaml::from_str(text).map_err(|e| MigConfigError::Parse(e.to_string()))?;
        if file.version != "v1" {
            return Err(MigConfigError::Version(file.version));
        }
        Ok(file)
    }

    /// Turns the layout `name` into a per-GPU plan for this node's GPUs, checking that every
    /// requested profile exists on the GPU and that the devices fit in its slices.
    pub fn plan(&self, name: &str, inv: &Inventory) -> Result<MigPlan, MigConfigError> {
        let entries = self
            .mig_configs
            .get(name)
            .ok_or_else(|| MigConfigError::UnknownConfig {
                wanted: name.to_string(),
                have: self
                    .mig_configs
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let impossible = |message: String| MigConfigError::Impossible {
            config: name.to_string(),
            message,
        };
        let mut plan = MigPlan::default();
        for entry in entries {
            let filter = match &entry.device_filter {
                Some(f) => Some(f.ids().map_err(impossible)?),
                None => None,
            };
            let all = match &entry.devices {
                DeviceSelector::Keyword(k) if k == "all" => true,
                DeviceSelector::Keyword(k) => {
                    return Err(impossible(format!(
                        "`devices: {k}` is not understood; use `all` or a list of GPU indices"
                    )));
                }
                DeviceSelector::Indices(_) => false,
            };
            // Indices the node does not have select nothing (one layout serves nodes of any size).
            for gpu in inv.gpus.iter().filter(|g| match &entry.devices {
                DeviceSelector::Indices(v) => v.contains(&g.index),
                DeviceSelector::Keyword(_) => true,
            }) {
                let index = gpu.index;
                if let Some(ids) = &filter
                    && !gpu.model.pci_device_id.is_some_and(|id| ids.contains(&id))
                {
                    continue;
                }
                if !gpu.model.mig_capable {
                    if all || !entry.mig_enabled {
                        continue;
                    }
                    return Err(impossible(format!(
                        "GPU {index} ({}) cannot run in MIG mode",
                        gpu.model.product
                    )));
                }
                if !entry.mig_enabled && !entry.mig_devices.is_empty() {
                    return Err(impossible(format!(
                        "GPU {index}: mig-devices are listed but mig-enabled is false"
                    )));
                }
                // A GPU whose driver lists no profiles (MIG mode still off) is checked by the
                // backend once MIG is on; the others are checked here, before anything changes.
                let known = !gpu.model.mig_profiles.is_empty();
                let (mut compute, mut memory) = (0, 0);
                for (profile, count) in entry.mig_devices.iter().filter(|_| known) {
                    let p = gpu.model.mig_profile(profile).ok_or_else(|| {
                        let have: Vec<_> = gpu
                            .model
                            .mig_profiles
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect();
                        impossible(format!(
                            "GPU {index} ({}) has no MIG profile '{profile}' (it has: {})",
                            gpu.model.product,
                            have.join(", ")
                        ))
                    })?;
                    if *count > p.max_count {
                        return Err(impossible(format!(
                            "GPU {index} fits at most {} x {profile}, the config asks for {count}",
                            p.max_count
                        )));
                    }
                    compute += p.compute_slices * count;
                    memory += p.memory_slices * count;
                }
                if compute > COMPUTE_SLICES || memory > MEMORY_SLICES {
                    return Err(impossible(format!(
                        "the MIG devices asked for on GPU {index} need {compute} of {COMPUTE_SLICES} \
                         compute slices and {memory} of {MEMORY_SLICES} memory slices"
                    )));
                }
                plan.gpus.retain(|g: &GpuMigPlan| g.index != index);
                plan.gpus.push(GpuMigPlan {
                    index,
                    mig_enabled: entry.mig_enabled,
                    devices: entry.mig_devices.clone(),
                });
            }
        }
        plan.gpus.sort_by_key(|g| g.index);
        Ok(plan)
    }
}

/// What a plan leaves alone: one line per GPU no entry selected, naming its PCI device ID, so a
/// layout that does not cover a GPU model is visible in the log.
pub fn untouched(plan: &MigPlan, inv: &Inventory) -> Vec<String> {
    inv.gpus
        .iter()
        .filter(|g| g.model.mig_capable && !plan.gpus.iter().any(|p| p.index == g.index))
        .map(|g| {
            format!(
                "GPU {} ({}, {}) is selected by no entry and stays as it is",
                g.index,
                g.model.product,
                g.model
                    .pci_device_id
                    .map(format_pci_device_id)
                    .unwrap_or_else(|| "no PCI device ID".into())
            )
        })
        .collect()
}

/// The config the agent uses when none is given: mig-parted's usual all-same layouts for every
/// profile of the node's GPUs, plus `all-disabled` and `all-enabled`.
pub fn default_config(inv: &Inventory) -> MigConfigFile {
    let mut configs = BTreeMap::new();
    configs.insert(
        "all-disabled".to_string(),
        vec![entry(false, BTreeMap::new())],
    );
    configs.insert(
        "all-enabled".to_string(),
        vec![entry(true, BTreeMap::new())],
    );
    if let Some(gpu) = inv.gpus.iter().find(|g| g.model.mig_capable) {
        for p in &gpu.model.mig_profiles {
            configs.insert(
                format!("all-{}", p.name),
                vec![entry(true, BTreeMap::from([(p.name.clone(), p.max_count)]))],
            );
        }
    }
    MigConfigFile {
        version: "v1".into(),
        mig_configs: configs,
    }
}

fn entry(mig_enabled: bool, mig_devices: BTreeMap<String, u32>) -> MigConfigEntry {
    MigConfigEntry {
        devices: DeviceSelector::Keyword("all".into()),
        device_filter: None,
        mig_enabled,
        mig_devices,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Inventory, built_in};

    const CONFIG: &str = r#"
version: v1
mig-configs:
  all-disabled:
    - devices: all
      mig-enabled: false
  all-1g.5gb:
    - devices: all
      mig-enabled: true
      mig-devices:
        "1g.5gb": 7
  all-balanced:
    - devices: all
      mig-enabled: true
      mig-devices:
        "1g.5gb": 2
        "2g.10gb": 1
        "3g.20gb": 1
  half:
    - devices: [0, 1]
      mig-enabled: true
      mig-devices: {"3g.20gb": 2}
    - devices: [2, 3]
      mig-enabled: false
  too-many:
    - devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 8}
  overfull:
    - devices: all
      mig-enabled: true
      mig-devices: {"3g.20gb": 2, "1g.5gb": 2}
"#;

    fn a100() -> Inventory {
        Inventory::from_yaml(built_in("a100-40gb").unwrap()).unwrap()
    }

    #[test]
    fn plans_layouts_that_fit() {
        let cfg = MigConfigFile::parse(CONFIG).unwrap();
        let plan = cfg.plan("all-balanced", &a100()).unwrap();
        assert_eq!(plan.gpus.len(), 4);
        assert_eq!(plan.gpus[0].devices["2g.10gb"], 1);
        let half = cfg.plan("half", &a100()).unwrap();
        assert!(half.gpus[1].mig_enabled && !half.gpus[2].mig_enabled);
    }

    #[test]
    fn refuses_layouts_that_do_not_fit() {
        let cfg = MigConfigFile::parse(CONFIG).unwrap();
        let e = cfg.plan("too-many", &a100()).unwrap_err().to_string();
        assert!(e.contains("at most 7 x 1g.5gb"), "{e}");
        let e = cfg.plan("overfull", &a100()).unwrap_err().to_string();
        assert!(e.contains("need 8 of 7 compute slices"), "{e}");
        let e = cfg.plan("nope", &a100()).unwrap_err().to_string();
        assert!(e.contains("does not have (it has: all-1g.5gb"), "{e}");
    }

    #[test]
    fn gpus_without_mig_are_skipped_unless_named_by_index() {
        // mig-parted's rules: `devices: all` and `mig-enabled: false` skip a GPU without MIG.
        let cfg = MigConfigFile::parse(CONFIG).unwrap();
        let t4 = Inventory::from_yaml(built_in("t4").unwrap()).unwrap();
        assert_eq!(cfg.plan("all-1g.5gb", &t4).unwrap(), MigPlan::default());
        assert_eq!(cfg.plan("all-disabled", &t4).unwrap(), MigPlan::default());
        let named = MigConfigFile::parse(
            "version: v1\nmig-configs:\n  x:\n    - devices: [0]\n      mig-enabled: true\n",
        )
        .unwrap();
        let e = named.plan("x", &t4).unwrap_err().to_string();
        assert!(e.contains("GPU 0 (Tesla T4) cannot run in MIG mode"), "{e}");
        // An index the node does not have selects nothing.
        let beyond = MigConfigFile::parse(
            "version: v1\nmig-configs:\n  x:\n    - devices: [4, 5]\n      mig-enabled: true\n",
        )
        .unwrap();
        assert_eq!(beyond.plan("x", &a100()).unwrap(), MigPlan::default());
    }

    const FILTERED: &str = r#"
version: v1
mig-configs:
  all-balanced:
    - device-filter: ["0x233010DE", "0x233110DE"]
      devices: all
      mig-enabled: true
      mig-devices: {"1g.10gb": 2, "2g.20gb": 1, "3g.40gb": 1}
    - device-filter: "0x20B010DE"
      devices: all
      mig-enabled: true
      mig-devices: {"1g.5gb": 2, "2g.10gb": 1, "3g.20gb": 1}
  h100-only:
    - device-filter: "0x233010DE"
      devices: all
      mig-enabled: true
      mig-devices: {"7g.80gb": 1}
  a100-first-two:
    - device-filter: "0x20b010de"
      devices: [0, 1]
      mig-enabled: true
      mig-devices: {"7g.40gb": 1}
  typo:
    - device-filter: "A100"
      devices: all
      mig-enabled: true
"#;

    #[test]
    fn device_filters_pick_the_entry_for_each_gpu_model() {
        let cfg = MigConfigFile::parse(FILTERED).unwrap();
        let h100 = Inventory::from_yaml(built_in("dgx-h100").unwrap()).unwrap();
        let plan = cfg.plan("all-balanced", &h100).unwrap();
        assert_eq!(plan.gpus.len(), 8);
        assert_eq!(plan.gpus[7].devices["3g.40gb"], 1);
        let plan = cfg.plan("all-balanced", &a100()).unwrap();
        assert_eq!(plan.gpus.len(), 4);
        assert_eq!(plan.gpus[0].devices["3g.20gb"], 1);
        assert!(untouched(&plan, &a100()).is_empty());
        // Filters compare numbers, so case does not matter; indices still apply.
        let plan = cfg.plan("a100-first-two", &a100()).unwrap();
        assert_eq!(
            plan.gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
            [0, 1]
        );
        // No entry for the A100s: mig-parted leaves them alone, and says so in the log.
        let plan = cfg.plan("h100-only", &a100()).unwrap();
        assert_eq!(plan, MigPlan::default());
        let left = untouched(&plan, &a100());
        assert_eq!(left.len(), 4);
        assert!(left[0].contains("0x20B010DE"), "{left:?}");
        // A T4 is skipped by the filter before MIG capability is looked at.
        let t4 = Inventory::from_yaml(built_in("t4").unwrap()).unwrap();
        assert_eq!(cfg.plan("h100-only", &t4).unwrap(), MigPlan::default());
        let e = cfg.plan("typo", &a100()).unwrap_err().to_string();
        assert!(
            e.contains("device-filter 'A100' is not a PCI device ID"),
            "{e}"
        );
    }

    #[test]
    fn nvidias_default_config_shape_serves_mixed_nodes() {
        // The shape of NVIDIA's default-mig-parted-config: one name, one entry per GPU model.
        let cfg = MigConfigFile::parse(FILTERED).unwrap();
        let t4 = Inventory::from_yaml(built_in("t4").unwrap()).unwrap();
        for inv in [
            a100(),
            Inventory::from_yaml(built_in("dgx-h100").unwrap()).unwrap(),
            t4,
        ] {
            let plan = cfg.plan("all-balanced", &inv).unwrap();
            let capable = inv.gpus.iter().filter(|g| g.model.mig_capable).count();
            assert_eq!(plan.gpus.len(), capable, "{}", inv.machine);
        }
    }

    #[test]
    fn default_config_offers_every_profile() {
        let cfg = default_config(&a100());
        assert!(cfg.mig_configs.contains_key("all-1g.5gb"));
        assert!(cfg.plan("all-7g.40gb", &a100()).is_ok());
    }

    #[test]
    fn wrong_version_is_named() {
        let e = MigConfigFile::parse("version: v2\nmig-configs: {}\n").unwrap_err();
        assert_eq!(e, MigConfigError::Version("v2".into()));
    }
}
