//! MIG layouts in mig-parted's `version: v1` config format, and the pure planning step that turns
//! one named layout into what each GPU must look like (or says why it cannot).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::inventory::Inventory;

/// Compute and memory slices one GPU has in total (A100, H100, H200 alike).
const COMPUTE_SLICES: u32 = 7;
const MEMORY_SLICES: u32 = 8;

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
    pub device_filter: Option<serde_yaml::Value>,
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
            if entry.device_filter.is_some() {
                return Err(impossible(
                    "`device-filter` entries are not supported by gpu-pilot's MIG manager; \
                     give a config per GPU model and select it with the node's label instead"
                        .into(),
                ));
            }
            let indices: Vec<u32> = match &entry.devices {
                DeviceSelector::Keyword(k) if k == "all" => {
                    inv.gpus.iter().map(|g| g.index).collect()
                }
                DeviceSelector::Keyword(k) => {
                    return Err(impossible(format!(
                        "`devices: {k}` is not understood; use `all` or a list of GPU indices"
                    )));
                }
                DeviceSelector::Indices(v) => v.clone(),
            };
            for index in indices {
                let gpu = inv.gpu(index).ok_or_else(|| {
                    impossible(format!(
                        "it names GPU {index}, but this node has GPUs 0..{}",
                        inv.gpus.len()
                    ))
                })?;
                if entry.mig_enabled && !gpu.model.mig_capable {
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
                let (mut compute, mut memory) = (0, 0);
                for (profile, count) in &entry.mig_devices {
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
        let t4 = Inventory::from_yaml(built_in("t4").unwrap()).unwrap();
        let e = cfg.plan("all-1g.5gb", &t4).unwrap_err().to_string();
        assert!(e.contains("cannot run in MIG mode"), "{e}");
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
