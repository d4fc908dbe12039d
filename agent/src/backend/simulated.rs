//! GPUs described by an inventory file. Used by tests, the local demo and fake nodes.
//!
//! The file is read again whenever its modification time or size changes, so a test injects an
//! XID (or clears it) by rewriting the file. MIG changes are kept in memory on top of the file.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use super::{BackendError, GpuBackend};
use crate::inventory::{Inventory, MigDevice};
use crate::mig::MigPlan;

pub struct SimulatedBackend {
    name: String,
    source: Source,
    state: Mutex<State>,
}

enum Source {
    File(PathBuf),
    BuiltIn(&'static str),
}

struct State {
    stamp: Option<(SystemTime, u64)>,
    from_file: Inventory,
    /// MIG layout applied by the MIG manager, per GPU index: (enabled, devices).
    mig: Vec<(u32, bool, Vec<MigDevice>)>,
}

impl SimulatedBackend {
    /// A shipped inventory by name (`dgx-h100`, `a100-40gb`, `t4`) or a path to a file.
    pub fn open(name_or_path: &str) -> Result<SimulatedBackend, BackendError> {
        let (name, source) = match crate::inventory::built_in(name_or_path) {
            Some(text) => (name_or_path.to_string(), Source::BuiltIn(text)),
            None => {
                let path = PathBuf::from(name_or_path);
                if !path.is_file() {
                    let names: Vec<_> =
                        crate::inventory::BUILT_IN.iter().map(|(n, _)| *n).collect();
                    return Err(BackendError::Inventory {
                        path: name_or_path.to_string(),
                        message: format!(
                            "it is neither a shipped inventory ({}) nor a file",
                            names.join(", ")
                        ),
                    });
                }
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, Source::File(path))
            }
        };
        let (stamp, from_file) = source.read()?;
        Ok(SimulatedBackend {
            name,
            source,
            state: Mutex::new(State {
                stamp,
                from_file,
                mig: Vec::new(),
            }),
        })
    }
}

impl Source {
    fn read(&self) -> Result<(Option<(SystemTime, u64)>, Inventory), BackendError> {
        match self {
            Source::BuiltIn(text) => Ok((None, parse(text, Path::new("(built in)"))?)),
            Source::File(path) => {
                let stamp = file_stamp(path);
                let text = std::fs::read_to_string(path).map_err(|e| BackendError::Inventory {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                Ok((stamp, parse(&text, path)?))
            }
        }
    }
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn parse(text: &str, path: &Path) -> Result<Inventory, BackendError> {
    Inventory::from_yaml(text).map_err(|e| BackendError::Inventory {
        path: path.display().to_string(),
        message: format!("{e}; fix the file (see agent/inventories/ for the format)"),
    })
}

impl GpuBackend for SimulatedBackend {
    fn name(&self) -> String {
        format!("simulated:{}", self.name)
    }

    fn inventory(&self) -> Result<Inventory, BackendError> {
        let mut state = self.state.lock().expect("simulated backend lock");
        if let Source::File(path) = &self.source {
            let now = file_stamp(path);
            if now != state.stamp {
                // A half-written file fails to parse: keep the last good one and try next time.
                match self.source.read() {
                    Ok((stamp, inv)) => {
                        state.stamp = stamp;
                        state.from_file = inv;
                    }
                    Err(e) => tracing::warn!("keeping the previous inventory: {e}"),
                }
            }
        }
        let mut inv = state.from_file.clone();
        for (index, enabled, devices) in &state.mig {
            if let Some(gpu) = inv.gpus.iter_mut().find(|g| g.index == *index) {
                gpu.mig_enabled = *enabled;
                gpu.mig_devices = devices.clone();
            }
        }
        Ok(inv)
    }

    fn apply_mig(&self, plan: &MigPlan) -> Result<(), BackendError> {
        let inv = self.inventory()?;
        let mut state = self.state.lock().expect("simulated backend lock");
        for gpu_plan in &plan.gpus {
            let Some(gpu) = inv.gpu(gpu_plan.index) else {
                return Err(BackendError::Unsupported(format!(
                    "the plan names GPU {}, which this node does not have",
                    gpu_plan.index
                )));
            };
            // The same placement rules as on a GPU: a layout that cannot be placed fails here too.
            let offered = crate::mig_layout::simulated_profiles(&gpu.model.mig_profiles);
            let steps = if gpu_plan.mig_enabled {
                crate::mig_layout::steps(&gpu_plan.devices, &offered).map_err(|e| {
                    BackendError::Unsupported(format!("GPU {}: {e}", gpu_plan.index))
                })?
            } else {
                Vec::new()
            };
            // Stable, recognisable UUIDs: MIG-<gpu uuid without prefix>-<profile>-<n>.
            let base = gpu.uuid.trim_start_matches("GPU-");
            let mut seen: std::collections::BTreeMap<&str, u32> = Default::default();
            let devices: Vec<MigDevice> = steps
                .iter()
                .map(|s| {
                    let n = seen.entry(s.profile.as_str()).or_default();
                    let d = MigDevice {
                        uuid: format!("MIG-{base}-{}-{n}", s.profile),
                        profile: s.profile.clone(),
                    };
                    *n += 1;
                    d
                })
                .collect();
            state.mig.retain(|(i, _, _)| *i != gpu_plan.index);
            state
                .mig
                .push((gpu_plan.index, gpu_plan.mig_enabled, devices));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rereads_the_file_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.yaml");
        let text = crate::inventory::built_in("t4").unwrap();
        std::fs::write(&path, text).unwrap();
        let b = SimulatedBackend::open(path.to_str().unwrap()).unwrap();
        assert!(b.inventory().unwrap().gpus[0].xids.is_empty());
        std::fs::write(&path, text.replace("xids: []", "xids: [79]")).unwrap();
        assert_eq!(b.inventory().unwrap().gpus[0].xids, vec![79]);
    }

    #[test]
    fn applies_layouts_with_the_placement_rules_of_a_gpu() {
        use crate::mig::GpuMigPlan;
        let b = SimulatedBackend::open("a100-40gb").unwrap();
        let plan = |devices: &[(&str, u32)]| MigPlan {
            gpus: vec![GpuMigPlan {
                index: 1,
                mig_enabled: true,
                devices: devices.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
            }],
        };
        b.apply_mig(&plan(&[("3g.20gb", 1), ("2g.10gb", 2)]))
            .unwrap();
        let inv = b.inventory().unwrap();
        let profiles: Vec<_> = inv.gpus[1]
            .mig_devices
            .iter()
            .map(|d| d.profile.as_str())
            .collect();
        assert_eq!(profiles, ["2g.10gb", "2g.10gb", "3g.20gb"]);
        assert!(inv.gpus[1].mig_enabled && !inv.gpus[0].mig_enabled);
        assert_eq!(
            inv.gpus[1].mig_devices[1].uuid,
            "MIG-0cb1e29c-658c-4a14-95e6-0af593bd04cf-2g.10gb-1"
        );
        let e = b
            .apply_mig(&plan(&[("4g.20gb", 1), ("3g.20gb", 1), ("1g.5gb", 1)]))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("GPU 1: the MIG devices"), "{e}");
        // The failed layout changed nothing.
        assert_eq!(b.inventory().unwrap(), inv);
    }

    #[test]
    fn unknown_inventory_names_the_shipped_ones() {
        let err = SimulatedBackend::open("no-such-inventory")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("dgx-h100, a100-40gb, t4"), "{err}");
    }
}
