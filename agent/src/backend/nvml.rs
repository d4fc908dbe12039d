//! GPU facts from NVML. `libnvidia-ml.so.1` is loaded when the backend opens (nvml-wrapper uses
//! `dlopen`), so the agent builds and runs on machines without a driver; there, opening fails with
//! [`BackendError::NoDriver`], which callers report as a state rather than a crash.
//!
//! XIDs arrive as NVML events on a thread of their own. A GPU counts an XID as active for
//! `xid_hold` after it was last reported; when no new one arrives in that time the GPU is healthy
//! again (NVIDIA's plugin keeps such a GPU unhealthy until the plugin restarts).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::enums::device::DeviceArchitecture;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use super::nvml_mig::MigGpu;
use super::{BackendError, GpuBackend};
use crate::inventory::{Gpu, GpuModel, Inventory, MigDevice, MigProfile, Telemetry};
use crate::mig::MigPlan;

pub struct NvmlBackend {
    nvml: Arc<Nvml>,
    /// GPU UUID -> (XID, when last seen).
    xids: Arc<Mutex<BTreeMap<String, (u64, Instant)>>>,
    xid_hold: Duration,
    /// GPU UUID -> (MIG mode on, its MIG profiles): read once per mode, not on every poll.
    profiles: Mutex<BTreeMap<String, (bool, Vec<MigProfile>)>>,
}

fn err(call: &'static str) -> impl Fn(NvmlError) -> BackendError {
    move |e| BackendError::Nvml {
        call,
        message: e.to_string(),
    }
}

impl NvmlBackend {
    /// Loads NVML. A missing library or driver is [`BackendError::NoDriver`].
    pub fn open(xid_hold: Duration) -> Result<NvmlBackend, BackendError> {
        let nvml = match Nvml::init() {
            Ok(n) => n,
            Err(
                e @ (NvmlError::LibloadingError(_)
                | NvmlError::LibraryNotFound
                | NvmlError::DriverNotLoaded
                | NvmlError::FailedToLoadSymbol(_)),
            ) => return Err(BackendError::NoDriver(e.to_string())),
            Err(e) => return Err(err("nvmlInit")(e)),
        };
        let backend = NvmlBackend {
            nvml: Arc::new(nvml),
            xids: Arc::default(),
            xid_hold,
            profiles: Mutex::default(),
        };
        backend.watch_xids();
        Ok(backend)
    }

    /// Listens for critical XID events until the process ends. Where events are not supported
    /// (some vGPU and older boards) health stays "healthy unless NVML stops answering".
    fn watch_xids(&self) {
        let nvml = Arc::clone(&self.nvml);
        let xids = Arc::clone(&self.xids);
        std::thread::Builder::new()
            .name("nvml-xid-events".into())
            .spawn(move || {
                let Ok(mut set) = nvml.create_event_set() else {
                    tracing::warn!(
                        "NVML event sets are not supported here; XIDs will not mark GPUs unhealthy"
                    );
                    return;
                };
                let count = nvml.device_count().unwrap_or(0);
                let events = nvml_wrapper::bitmasks::event::EventTypes::CRITICAL_XID_ERROR;
                // A failed registration consumes the set: rebuild it from the GPUs that worked.
                let mut registered = Vec::new();
                for i in 0..count {
                    let Ok(dev) = nvml.device_by_index(i) else {
                        continue;
                    };
                    match dev.register_events(events, set) {
                        Ok(s) => {
                            set = s;
                            registered.push(i);
                        }
                        Err(e) => {
                            tracing::warn!("GPU {i} cannot report XID events: {}", e.error);
                            let Ok(fresh) = nvml.create_event_set() else {
                                return;
                            };
                            set = fresh;
                            for &j in &registered {
                                if let Ok(d) = nvml.device_by_index(j) {
                                    match d.register_events(events, set) {
                                        Ok(s) => set = s,
                                        Err(_) => return,
                                    }
                                }
                            }
                        }
                    }
                }
                loop {
                    match set.wait(5_000) {
                        Ok(ev) => {
                            let xid = match ev.event_data {
                                Some(nvml_wrapper::enums::event::XidError::Value(v)) => v,
                                _ => 0,
                            };
                            if let Ok(uuid) = ev.device.uuid() {
                                tracing::warn!("GPU {uuid} reported XID {xid}");
                                xids.lock()
                                    .expect("xid map")
                                    .insert(uuid, (xid, Instant::now()));
                            }
                        }
                        Err(NvmlError::Timeout) => {}
                        Err(e) => {
                            tracing::warn!("waiting for NVML events failed ({e}); retrying in 5s");
                            std::thread::sleep(Duration::from_secs(5));
                        }
                    }
                }
            })
            .expect("spawning the XID event thread");
    }

    fn gpu(
        &self,
        dev: &Device<'_>,
        index: u32,
        bus_ids: &BTreeMap<String, u32>,
    ) -> Result<Gpu, BackendError> {
        let uuid = dev.uuid().map_err(err("nvmlDeviceGetUUID"))?;
        let pci = dev.pci_info().map_err(err("nvmlDeviceGetPciInfo"))?;
        let mem = dev.memory_info().map_err(err("nvmlDeviceGetMemoryInfo"))?;
        let cc = dev
            .cuda_compute_capability()
            .map_err(err("nvmlDeviceGetCudaComputeCapability"))?;
        let family = match dev.architecture() {
            Ok(DeviceArchitecture::Ada) => "ada-lovelace".to_string(),
            Ok(a) => format!("{a:?}").to_lowercase(),
            Err(_) => "undefined".to_string(),
        };
        let mig_enabled = dev.mig_mode().map(|m| m.current == 1).unwrap_or(false);
        let mig_capable = dev.mig_mode().is_ok();
        let mig_profiles = if mig_capable {
            self.mig_profiles(dev, index, &uuid, mig_enabled, mem.total / (1024 * 1024))
        } else {
            Vec::new()
        };
        let mut mig_devices = Vec::new();
        if mig_enabled {
            let n = dev.mig_device_count().unwrap_or(0);
            for i in 0..n {
                if let Ok(m) = dev.mig_device_by_index(i) {
                    let uuid = m.uuid().map_err(err("nvmlDeviceGetUUID"))?;
                    // MIG device names end with the profile: "NVIDIA H100 80GB HBM3 MIG 1g.10gb".
                    let name = m.name().unwrap_or_default();
                    let profile = name.rsplit(' ').next().unwrap_or_default().to_string();
                    mig_devices.push(MigDevice { uuid, profile });
                }
            }
        }
        let mut nvlinks = BTreeMap::new();
        for link in 0..18 {
            let l = dev.link_wrapper_for(link);
            if l.is_active().unwrap_or(false)
                && let Ok(remote) = l.remote_pci_info()
                && let Some(peer) = bus_ids.get(&normalise_bus_id(&remote.bus_id))
            {
                *nvlinks.entry(*peer).or_insert(0) += 1;
            }
        }
        let held = self.xids.lock().expect("xid map").get(&uuid).copied();
        let xids = match held {
            Some((xid, at)) if at.elapsed() < self.xid_hold => vec![xid],
            _ => vec![],
        };
        let utilization = dev.utilization_rates().ok();
        let telemetry = Telemetry {
            gpu_util: utilization.as_ref().map(|u| u.gpu).unwrap_or(0),
            mem_copy_util: utilization.as_ref().map(|u| u.memory).unwrap_or(0),
            fb_used_mib: mem.used / (1024 * 1024),
            temperature_c: dev.temperature(TemperatureSensor::Gpu).unwrap_or(0),
            power_w: dev
                .power_usage()
                .map(|mw| mw as f64 / 1000.0)
                .unwrap_or(0.0),
            energy_milli_joules: dev.total_energy_consumption().unwrap_or(0),
            sm_clock_mhz: dev.clock_info(Clock::SM).unwrap_or(0),
            mem_clock_mhz: dev.clock_info(Clock::Memory).unwrap_or(0),
            pcie_replays: dev.pcie_replay_counter().map(u64::from).unwrap_or(0),
        };
        Ok(Gpu {
            index,
            uuid,
            numa_node: numa_node_of(&pci.bus_id),
            pci_bus_id: pci.bus_id,
            model: GpuModel {
                product: dev.name().map_err(err("nvmlDeviceGetName"))?,
                pci_device_id: Some(pci.pci_device_id),
                memory_mib: mem.total / (1024 * 1024),
                family,
                compute_capability: format!("{}.{}", cc.major, cc.minor),
                multiprocessors: 0,
                mig_capable,
                mig_profiles,
            },
            mig_enabled,
            mig_devices,
            nvlinks,
            xids,
            telemetry,
        })
    }
}

impl NvmlBackend {
    /// The GPU's MIG profiles through the raw GPU-instance-profile calls, cached per MIG mode.
    /// Where the driver does not list them (some drivers only do with MIG on) the list is empty
    /// and the MIG planner leaves the profile check to the apply step.
    fn mig_profiles(
        &self,
        dev: &Device<'_>,
        index: u32,
        uuid: &str,
        mig_enabled: bool,
        total_memory_mib: u64,
    ) -> Vec<MigProfile> {
        let mut cache = self.profiles.lock().expect("profile cache");
        if let Some((mode, p)) = cache.get(uuid)
            && *mode == mig_enabled
        {
            return p.clone();
        }
        let gpu = MigGpu {
            lib: self.nvml.lib(),
            // SAFETY: the handle stays valid while `self.nvml` is alive, which outlives this call.
            device: unsafe { dev.handle() },
            index,
            total_memory_mib,
        };
        let profiles = match gpu.profiles() {
            Ok(p) => p.into_iter().map(|(_, m)| m).collect(),
            Err(e) => {
                tracing::debug!("reading MIG profiles: {e}");
                Vec::new()
            }
        };
        cache.insert(uuid.to_string(), (mig_enabled, profiles.clone()));
        profiles
    }
}

/// NVML spells bus IDs `00000000:1B:00.0`; sysfs spells them `0000:1b:00.0`.
fn normalise_bus_id(id: &str) -> String {
    id.to_ascii_lowercase()
}

fn numa_node_of(bus_id: &str) -> Option<i64> {
    let lower = bus_id.to_ascii_lowercase();
    // Drop the upper half of NVML's 8-digit domain.
    let sysfs = if lower.len() > 12 {
        &lower[4..]
    } else {
        &lower[..]
    };
    let text = std::fs::read_to_string(format!("/sys/bus/pci/devices/{sysfs}/numa_node")).ok()?;
    let n: i64 = text.trim().parse().ok()?;
    (n >= 0).then_some(n)
}

impl GpuBackend for NvmlBackend {
    fn name(&self) -> String {
        "nvml".into()
    }

    fn inventory(&self) -> Result<Inventory, BackendError> {
        let nvml = &self.nvml;
        let driver_version = nvml
            .sys_driver_version()
            .map_err(err("nvmlSystemGetDriverVersion"))?;
        let cuda = nvml
            .sys_cuda_driver_version()
            .map_err(err("nvmlSystemGetCudaDriverVersion"))?;
        let count = nvml.device_count().map_err(err("nvmlDeviceGetCount"))?;
        let mut devices = Vec::new();
        let mut bus_ids = BTreeMap::new();
        for i in 0..count {
            let dev = nvml
                .device_by_index(i)
                .map_err(err("nvmlDeviceGetHandleByIndex"))?;
            if let Ok(pci) = dev.pci_info() {
                bus_ids.insert(normalise_bus_id(&pci.bus_id), i);
            }
            devices.push(dev);
        }
        let mut gpus = Vec::new();
        for (i, dev) in devices.iter().enumerate() {
            gpus.push(self.gpu(dev, i as u32, &bus_ids)?);
        }
        let machine = std::fs::read_to_string("/sys/class/dmi/id/product_name")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Ok(Inventory {
            machine,
            driver_version,
            cuda_version: format!(
                "{}.{}",
                nvml_wrapper::cuda_driver_version_major(cuda),
                nvml_wrapper::cuda_driver_version_minor(cuda)
            ),
            gpus,
        })
    }

    fn apply_mig(&self, plan: &MigPlan) -> Result<(), BackendError> {
        for gpu_plan in &plan.gpus {
            let dev = self
                .nvml
                .device_by_index(gpu_plan.index)
                .map_err(err("nvmlDeviceGetHandleByIndex"))?;
            let mem = dev.memory_info().map_err(err("nvmlDeviceGetMemoryInfo"))?;
            let gpu = MigGpu {
                lib: self.nvml.lib(),
                // SAFETY: the handle stays valid while `self.nvml` is alive.
                device: unsafe { dev.handle() },
                index: gpu_plan.index,
                total_memory_mib: mem.total / (1024 * 1024),
            };
            gpu.apply(gpu_plan)?;
        }
        // MIG mode or devices changed: read the profiles again next time.
        self.profiles.lock().expect("profile cache").clear();
        Ok(())
    }
}
