//! GPU facts as plain data: what a node has, whichever backend found it.
//!
//! The simulated backend reads these types from an inventory file; the NVML backend fills the
//! same types from the driver. Everything downstream (device-plugin resources, feature labels,
//! MIG plans, metrics) is a pure function of an [`Inventory`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything the agent knows about the GPUs of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    /// The system's product name (GFD's `nvidia.com/gpu.machine`), e.g. `DGX-H100`.
    #[serde(default)]
    pub machine: String,
    /// The kernel driver's version, e.g. `550.54.15`.
    pub driver_version: String,
    /// The newest CUDA version the driver supports, e.g. `12.4`.
    pub cuda_version: String,
    pub gpus: Vec<Gpu>,
}

/// One physical GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub pci_bus_id: String,
    /// NUMA node the GPU is attached to; `None` where the platform does not say.
    #[serde(default)]
    pub numa_node: Option<i64>,
    #[serde(flatten)]
    pub model: GpuModel,
    /// Whether MIG mode is on (a GPU in MIG mode is only usable through its MIG devices).
    #[serde(default)]
    pub mig_enabled: bool,
    /// The MIG devices that exist now.
    #[serde(default)]
    pub mig_devices: Vec<MigDevice>,
    /// NVLinks to other GPUs: peer GPU index -> number of links.
    #[serde(default)]
    pub nvlinks: BTreeMap<u32, u32>,
    /// XID errors active on the GPU now. The health rules decide which of them count.
    #[serde(default)]
    pub xids: Vec<u64>,
    #[serde(default)]
    pub telemetry: Telemetry,
}

/// What a GPU model is, shared by every GPU of that model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuModel {
    /// NVML's product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub product: String,
    /// The PCI device ID as NVML reports it, device << 16 | vendor: `0x233010DE` for an H100 SXM5
    /// 80GB. Written as a hex string in inventory files; mig-parted's `device-filter` matches it.
    #[serde(default, with = "pci_id", skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u32>,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Architecture in GFD's spelling: `turing`, `ampere`, `hopper`, ...
    pub family: String,
    /// `major.minor`, e.g. `9.0`.
    pub compute_capability: String,
    #[serde(default)]
    pub multiprocessors: u32,
    #[serde(default)]
    pub mig_capable: bool,
    #[serde(default)]
    pub mig_profiles: Vec<MigProfile>,
}

/// Parses `0x233010DE` (hex digits in any case), mig-parted's spelling of a PCI device ID.
pub fn parse_pci_device_id(s: &str) -> Option<u32> {
    let s = s.trim();
    let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    if hex.is_empty() || hex.len() > 8 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// mig-parted's spelling: `0x` and eight upper-case hex digits.
pub fn format_pci_device_id(id: u32) -> String {
    format!("0x{id:08X}")
}

mod pci_id {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(id: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.serialize_str(&super::format_pci_device_id(*id)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| {
            super::parse_pci_device_id(&t).ok_or_else(|| {
                D::Error::custom(format!(
                    "pciDeviceId '{t}' is not a PCI device ID like \"0x233010DE\""
                ))
            })
        })
        .transpose()
    }
}

impl GpuModel {
    pub fn compute_major_minor(&self) -> (String, String) {
        match self.compute_capability.split_once('.') {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (self.compute_capability.clone(), "0".to_string()),
        }
    }

    pub fn mig_profile(&self, name: &str) -> Option<&MigProfile> {
        self.mig_profiles.iter().find(|p| p.name == name)
    }
}

/// A MIG profile a GPU model offers, e.g. `1g.10gb`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigProfile {
    pub name: String,
    /// How many instances of this profile alone fit on one GPU.
    pub max_count: u32,
    /// Compute slices (of 7) and memory slices (of 8) one instance uses.
    pub compute_slices: u32,
    pub memory_slices: u32,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    #[serde(default)]
    pub multiprocessors: u32,
    #[serde(default)]
    pub engines: MigEngines,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigEngines {
    pub copy: u32,
    pub decoder: u32,
    pub encoder: u32,
    pub jpeg: u32,
    pub ofa: u32,
}

/// A MIG device that exists on a GPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigDevice {
    pub uuid: String,
    pub profile: String,
}

/// What NVML reads for dcgm-exporter's basic fields. Counters are totals since driver load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Telemetry {
    pub gpu_util: u32,
    pub mem_copy_util: u32,
    #[serde(rename = "fbUsedMiB")]
    pub fb_used_mib: u64,
    pub temperature_c: u32,
    pub power_w: f64,
    pub energy_milli_joules: u64,
    pub sm_clock_mhz: u32,
    pub mem_clock_mhz: u32,
    pub pcie_replays: u64,
}

impl Inventory {
    /// Parses an inventory file: GPUs refer to a model by key, as in the shipped files.
    pub fn from_yaml(text: &str) -> Result<Inventory, serde_yaml::Error> {
        let file: InventoryFile = serde_yaml::from_str(text)?;
        file.resolve().map_err(serde::de::Error::custom)
    }

    /// The driver version split GFD's way: major, minor, revision (empty when absent).
    pub fn driver_parts(&self) -> (String, String, String) {
        let mut it = self.driver_version.split('.');
        let major = it.next().unwrap_or_default().to_string();
        let minor = it.next().unwrap_or_default().to_string();
        let rev = it.next().unwrap_or_default().to_string();
        (major, minor, rev)
    }

    pub fn gpu(&self, index: u32) -> Option<&Gpu> {
        self.gpus.iter().find(|g| g.index == index)
    }

    /// NVLinks between two GPUs (0 when they are not joined).
    pub fn nvlinks_between(&self, a: u32, b: u32) -> u32 {
        self.gpu(a)
            .and_then(|g| g.nvlinks.get(&b).copied())
            .unwrap_or(0)
    }
}

/// The on-disk form: models are written once and GPUs point at them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InventoryFile {
    #[serde(default)]
    machine: String,
    driver_version: String,
    cuda_version: String,
    models: BTreeMap<String, GpuModel>,
    gpus: Vec<GpuEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GpuEntry {
    index: u32,
    model: String,
    uuid: String,
    pci_bus_id: String,
    #[serde(default)]
    numa_node: Option<i64>,
    #[serde(default)]
    mig_enabled: bool,
    #[serde(default)]
    mig_devices: Vec<MigDevice>,
    #[serde(default)]
    nvlinks: BTreeMap<u32, u32>,
    #[serde(default)]
    xids: Vec<u64>,
    #[serde(default)]
    telemetry: Telemetry,
}

/// An inventory file that names something it does not define.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(
        "GPU {index} names model '{model}', which the file's `models` does not define (it has: {known})"
    )]
    UnknownModel {
        index: u32,
        model: String,
        known: String,
    },
    #[error(
        "GPU {index} has a MIG device of profile '{profile}', which model '{model}' does not offer"
    )]
    UnknownProfile {
        index: u32,
        profile: String,
        model: String,
    },
}

impl InventoryFile {
    fn resolve(self) -> Result<Inventory, InventoryError> {
        let mut gpus = Vec::with_capacity(self.gpus.len());
        for g in self.gpus {
            let model =
                self.models
                    .get(&g.model)
                    .cloned()
                    .ok_or_else(|| InventoryError::UnknownModel {
                        index: g.index,
                        model: g.model.clone(),
                        known: self.models.keys().cloned().collect::<Vec<_>>().join(", "),
                    })?;
            for d in &g.mig_devices {
                if model.mig_profile(&d.profile).is_none() {
                    return Err(InventoryError::UnknownProfile {
                        index: g.index,
                        profile: d.profile.clone(),
                        model: g.model.clone(),
                    });
                }
            }
            gpus.push(Gpu {
                index: g.index,
                uuid: g.uuid,
                pci_bus_id: g.pci_bus_id,
                numa_node: g.numa_node,
                model,
                mig_enabled: g.mig_enabled,
                mig_devices: g.mig_devices,
                nvlinks: g.nvlinks,
                xids: g.xids,
                telemetry: g.telemetry,
            });
        }
        gpus.sort_by_key(|g| g.index);
        Ok(Inventory {
            machine: self.machine,
            driver_version: self.driver_version,
            cuda_version: self.cuda_version,
            gpus,
        })
    }
}

/// The inventories shipped with the agent, by the name fake nodes carry in
/// `gpupilot.io/simulated-inventory`.
pub const BUILT_IN: [(&str, &str); 3] = [
    ("dgx-h100", include_str!("../inventories/dgx-h100.yaml")),
    ("a100-40gb", include_str!("../inventories/a100-40gb.yaml")),
    ("t4", include_str!("../inventories/t4.yaml")),
];

/// The text of a shipped inventory.
pub fn built_in(name: &str) -> Option<&'static str> {
    BUILT_IN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_inventories_parse_and_match_the_fake_nodes() {
        let dgx = Inventory::from_yaml(built_in("dgx-h100").unwrap()).unwrap();
        assert_eq!(dgx.gpus.len(), 8);
        assert!(
            dgx.gpus
                .iter()
                .all(|g| g.model.product == "NVIDIA H100 80GB HBM3")
        );
        assert_eq!(dgx.nvlinks_between(0, 7), 18);
        let a100 = Inventory::from_yaml(built_in("a100-40gb").unwrap()).unwrap();
        assert_eq!(a100.gpus.len(), 4);
        assert_eq!(a100.nvlinks_between(0, 1), 12);
        assert_eq!(a100.nvlinks_between(1, 2), 4);
        let t4 = Inventory::from_yaml(built_in("t4").unwrap()).unwrap();
        assert_eq!(t4.gpus.len(), 1);
        assert_eq!(dgx.gpus[0].model.pci_device_id, Some(0x2330_10DE));
        assert_eq!(a100.gpus[0].model.pci_device_id, Some(0x20B0_10DE));
        assert_eq!(t4.gpus[0].model.pci_device_id, Some(0x1EB8_10DE));
        assert!(!t4.gpus[0].model.mig_capable);
        let mut uuids: Vec<_> = BUILT_IN
            .iter()
            .flat_map(|(_, t)| Inventory::from_yaml(t).unwrap().gpus)
            .map(|g| g.uuid)
            .collect();
        let n = uuids.len();
        uuids.sort();
        uuids.dedup();
        assert_eq!(
            uuids.len(),
            n,
            "GPU UUIDs must be unique across inventories"
        );
    }

    #[test]
    fn unknown_model_is_explained() {
        let text = "driverVersion: '1'\ncudaVersion: '1'\nmodels: {}\ngpus:\n  - {index: 0, model: x, uuid: u, pciBusId: p}\n";
        let err = Inventory::from_yaml(text).unwrap_err().to_string();
        assert!(err.contains("names model 'x'"), "{err}");
    }

    #[test]
    fn pci_device_ids_read_and_write_in_mig_parteds_spelling() {
        assert_eq!(parse_pci_device_id("0x20B010DE"), Some(0x20B0_10DE));
        assert_eq!(parse_pci_device_id("0x20b010de"), Some(0x20B0_10DE));
        assert_eq!(parse_pci_device_id("20B010DE"), None, "hex needs its 0x");
        assert_eq!(parse_pci_device_id("0x"), None);
        assert_eq!(parse_pci_device_id("0x1234567890"), None);
        assert_eq!(parse_pci_device_id("A100"), None);
        assert_eq!(format_pci_device_id(0x2330_10DE), "0x233010DE");
        let inv = Inventory::from_yaml(built_in("t4").unwrap()).unwrap();
        let text = serde_json::to_string(&inv).unwrap();
        assert!(text.contains("\"pciDeviceId\":\"0x1EB810DE\""), "{text}");
        let bad = built_in("t4").unwrap().replace("0x1EB810DE", "T4");
        let err = Inventory::from_yaml(&bad).unwrap_err().to_string();
        assert!(err.contains("pciDeviceId 'T4'"), "{err}");
    }

    #[test]
    fn driver_version_splits_like_gfd() {
        let inv = Inventory::from_yaml(built_in("dgx-h100").unwrap()).unwrap();
        assert_eq!(inv.driver_parts(), ("550".into(), "54".into(), "15".into()));
    }
}
