//! MIG changes through NVML's raw functions (nvml-wrapper does not wrap the GPU- and
//! compute-instance calls), called through the library handle nvml-wrapper already loaded.
//!
//! Every raw call sits in a small safe function here: the pointers handed to NVML point at locals
//! or at buffers sized by NVML's own count, and a symbol missing from an old driver is an error
//! rather than a panic. What to create where is decided by the pure [`crate::mig_layout`] first,
//! so nothing is destroyed for a layout that cannot fit. On a failure half-way, what was created
//! is destroyed and the previous layout is put back where possible.

use std::collections::BTreeMap;
use std::ptr;

use nvml_wrapper::error::{NvmlError, nvml_sym, nvml_try};
use nvml_wrapper_sys::bindings::{
    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, NVML_COMPUTE_INSTANCE_PROFILE_COUNT,
    NVML_DEVICE_MIG_DISABLE, NVML_DEVICE_MIG_ENABLE, NVML_GPU_INSTANCE_PROFILE_COUNT, NvmlLib,
    nvmlComputeInstance_t, nvmlComputeInstanceProfileInfo_t, nvmlDevice_t, nvmlGpuInstance_t,
    nvmlGpuInstanceInfo_t, nvmlGpuInstancePlacement_t, nvmlGpuInstanceProfileInfo_t,
    nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT, nvmlReturn_enum_NVML_ERROR_NOT_FOUND,
    nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED, nvmlReturn_enum_NVML_SUCCESS, nvmlReturn_t,
};

use super::BackendError;
use crate::inventory::{MigEngines, MigProfile};
use crate::mig::GpuMigPlan;
use crate::mig_layout::{self, GiProfile, Step};

/// One GPU, by index, with the raw handle NVML gave for it.
pub struct MigGpu<'a> {
    pub lib: &'a NvmlLib,
    pub device: nvmlDevice_t,
    pub index: u32,
    pub total_memory_mib: u64,
}

/// A GPU instance that exists now, with its compute instances.
struct Existing {
    gi: nvmlGpuInstance_t,
    profile: GiProfile,
    start: u32,
    cis: Vec<(nvmlComputeInstance_t, u32 /* CI profile index */)>,
}

/// Looks a raw function up, or says which one an old driver lacks.
macro_rules! sym {
    ($gpu:expr, $name:ident) => {
        nvml_sym($gpu.lib.$name.as_ref()).map_err(|e| $gpu.fail(stringify!($name), "", e))?
    };
}

impl MigGpu<'_> {
    fn fail(&self, call: &'static str, what: &str, e: NvmlError) -> BackendError {
        let what = if what.is_empty() {
            String::new()
        } else {
            format!(" ({what})")
        };
        BackendError::Nvml {
            call,
            message: format!("GPU {}{what}: {e}", self.index),
        }
    }

    fn check(&self, call: &'static str, what: &str, ret: nvmlReturn_t) -> Result<(), BackendError> {
        nvml_try(ret).map_err(|e| self.fail(call, what, e))
    }

    /// (current, pending) MIG mode.
    fn mig_mode(&self) -> Result<(u32, u32), BackendError> {
        let f = sym!(self, nvmlDeviceGetMigMode);
        let (mut current, mut pending) = (0, 0);
        // SAFETY: both out-pointers point at locals that outlive the call.
        let ret = unsafe { f(self.device, &mut current, &mut pending) };
        self.check("nvmlDeviceGetMigMode", "", ret)?;
        Ok((current, pending))
    }

    fn set_mig_mode(&self, mode: u32) -> Result<(), BackendError> {
        let f = sym!(self, nvmlDeviceSetMigMode);
        let mut activation: nvmlReturn_t = nvmlReturn_enum_NVML_SUCCESS;
        // SAFETY: the out-pointer points at a local.
        let ret = unsafe { f(self.device, mode, &mut activation) };
        let what = if mode == NVML_DEVICE_MIG_ENABLE {
            "enabling MIG mode"
        } else {
            "disabling MIG mode"
        };
        self.check("nvmlDeviceSetMigMode", what, ret)
    }

    /// The GPU-instance profiles this GPU offers, named the way mig-parted names them, with
    /// NVML's possible placements.
    pub fn offered(&self) -> Result<Vec<GiProfile>, BackendError> {
        Ok(self.profiles()?.into_iter().map(|(g, _)| g).collect())
    }

    /// The offered profiles, also as the inventory describes them.
    pub fn profiles(&self) -> Result<Vec<(GiProfile, MigProfile)>, BackendError> {
        let info_fn = sym!(self, nvmlDeviceGetGpuInstanceProfileInfo);
        let placements_fn = sym!(self, nvmlDeviceGetGpuInstancePossiblePlacements_v2);
        let mut out = Vec::new();
        for index in 0..NVML_GPU_INSTANCE_PROFILE_COUNT {
            // SAFETY: a zeroed plain C struct is a valid value; NVML fills it.
            let mut info: nvmlGpuInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: the out-pointer points at a local.
            let ret = unsafe { info_fn(self.device, index, &mut info) };
            if ret == nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED
                || ret == nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT
            {
                continue; // this GPU does not have this profile
            }
            self.check(
                "nvmlDeviceGetGpuInstanceProfileInfo",
                &format!("profile index {index}"),
                ret,
            )?;
            let name = mig_layout::gi_profile_name(
                index,
                info.sliceCount,
                info.memorySizeMB,
                self.total_memory_mib,
            );
            let mut count = 0u32;
            // SAFETY: a null buffer asks NVML for the number of placements only.
            let ret = unsafe { placements_fn(self.device, info.id, ptr::null_mut(), &mut count) };
            self.check(
                "nvmlDeviceGetGpuInstancePossiblePlacements_v2",
                &format!("profile {name}"),
                ret,
            )?;
            let mut buf = vec![nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count as usize];
            // SAFETY: `buf` holds `count` placements, the number NVML asked for.
            let ret = unsafe { placements_fn(self.device, info.id, buf.as_mut_ptr(), &mut count) };
            self.check(
                "nvmlDeviceGetGpuInstancePossiblePlacements_v2",
                &format!("profile {name}"),
                ret,
            )?;
            buf.truncate(count as usize);
            let size = buf.first().map_or(0, |p| p.size);
            let described = MigProfile {
                name: name.clone(),
                max_count: info.instanceCount,
                compute_slices: info.sliceCount,
                memory_slices: size,
                memory_mib: info.memorySizeMB,
                multiprocessors: info.multiprocessorCount,
                engines: MigEngines {
                    copy: info.copyEngineCount,
                    decoder: info.decoderCount,
                    encoder: info.encoderCount,
                    jpeg: info.jpegCount,
                    ofa: info.ofaCount,
                },
            };
            out.push((
                GiProfile {
                    name,
                    index,
                    id: info.id,
                    compute_slices: info.sliceCount,
                    size,
                    starts: buf.iter().map(|p| p.start).collect(),
                },
                described,
            ));
        }
        Ok(out)
    }

    /// The GPU and compute instances that exist now.
    fn existing(&self, offered: &[GiProfile]) -> Result<Vec<Existing>, BackendError> {
        let list_fn = sym!(self, nvmlDeviceGetGpuInstances);
        let info_fn = sym!(self, nvmlGpuInstanceGetInfo);
        let mut out = Vec::new();
        for p in offered {
            // At most one instance per memory slice.
            let mut buf: Vec<nvmlGpuInstance_t> = vec![ptr::null_mut(); 8];
            let mut count = buf.len() as u32;
            // SAFETY: `buf` has room for `count` handles.
            let ret = unsafe { list_fn(self.device, p.id, buf.as_mut_ptr(), &mut count) };
            if ret == nvmlReturn_enum_NVML_ERROR_NOT_FOUND {
                continue;
            }
            self.check(
                "nvmlDeviceGetGpuInstances",
                &format!("profile {}", p.name),
                ret,
            )?;
            for &gi in buf.iter().take(count as usize) {
                // SAFETY: a zeroed plain C struct is a valid value; NVML fills it.
                let mut info: nvmlGpuInstanceInfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: `gi` is a handle NVML just returned; the out-pointer is a local.
                let ret = unsafe { info_fn(gi, &mut info) };
                self.check(
                    "nvmlGpuInstanceGetInfo",
                    &format!("profile {}", p.name),
                    ret,
                )?;
                out.push(Existing {
                    gi,
                    profile: p.clone(),
                    start: info.placement.start,
                    cis: self.compute_instances(gi, &p.name)?,
                });
            }
        }
        Ok(out)
    }

    fn compute_instances(
        &self,
        gi: nvmlGpuInstance_t,
        profile: &str,
    ) -> Result<Vec<(nvmlComputeInstance_t, u32)>, BackendError> {
        let info_fn = sym!(self, nvmlGpuInstanceGetComputeInstanceProfileInfo);
        let list_fn = sym!(self, nvmlGpuInstanceGetComputeInstances);
        let mut out = Vec::new();
        for ci_index in 0..NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
            // SAFETY: a zeroed plain C struct is a valid value; NVML fills it.
            let mut info: nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `gi` is a live handle; the out-pointer is a local.
            let ret = unsafe {
                info_fn(
                    gi,
                    ci_index,
                    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                    &mut info,
                )
            };
            if ret != nvmlReturn_enum_NVML_SUCCESS {
                continue; // not offered inside this GPU instance
            }
            let mut buf: Vec<nvmlComputeInstance_t> = vec![ptr::null_mut(); 8];
            let mut count = buf.len() as u32;
            // SAFETY: `buf` has room for `count` handles.
            let ret = unsafe { list_fn(gi, info.id, buf.as_mut_ptr(), &mut count) };
            if ret == nvmlReturn_enum_NVML_ERROR_NOT_FOUND {
                continue;
            }
            self.check(
                "nvmlGpuInstanceGetComputeInstances",
                &format!("profile {profile}"),
                ret,
            )?;
            out.extend(buf.iter().take(count as usize).map(|&ci| (ci, ci_index)));
        }
        Ok(out)
    }

    fn destroy(&self, e: &Existing) -> Result<(), BackendError> {
        let ci_fn = sym!(self, nvmlComputeInstanceDestroy);
        let gi_fn = sym!(self, nvmlGpuInstanceDestroy);
        let what = format!("{} at memory slice {}", e.profile.name, e.start);
        for &(ci, _) in &e.cis {
            // SAFETY: `ci` is a live handle NVML returned; it is not used after this.
            let ret = unsafe { ci_fn(ci) };
            self.check("nvmlComputeInstanceDestroy", &what, ret)?;
        }
        // SAFETY: `gi` is a live handle whose compute instances are gone; not used after this.
        let ret = unsafe { gi_fn(e.gi) };
        self.check("nvmlGpuInstanceDestroy", &what, ret)
    }

    /// Creates one GPU instance at the step's placement and one compute instance over all of it.
    fn create(&self, step: &Step, profile: &GiProfile) -> Result<Existing, BackendError> {
        let gi_fn = sym!(self, nvmlDeviceCreateGpuInstanceWithPlacement);
        let ci_info_fn = sym!(self, nvmlGpuInstanceGetComputeInstanceProfileInfo);
        let ci_fn = sym!(self, nvmlGpuInstanceCreateComputeInstance);
        let gi_destroy = sym!(self, nvmlGpuInstanceDestroy);
        let what = format!("{} at memory slice {}", step.profile, step.start);
        let placement = nvmlGpuInstancePlacement_t {
            start: step.start,
            size: step.size,
        };
        let mut gi: nvmlGpuInstance_t = ptr::null_mut();
        // SAFETY: the placement and the out-pointer are locals.
        let ret = unsafe { gi_fn(self.device, step.gi_id, &placement, &mut gi) };
        self.check("nvmlDeviceCreateGpuInstanceWithPlacement", &what, ret)?;
        let ci = (|| {
            // SAFETY: a zeroed plain C struct is a valid value; NVML fills it.
            let mut info: nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `gi` was just created; the out-pointer is a local.
            let ret = unsafe {
                ci_info_fn(
                    gi,
                    step.ci_index,
                    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
                    &mut info,
                )
            };
            self.check("nvmlGpuInstanceGetComputeInstanceProfileInfo", &what, ret)?;
            let mut ci: nvmlComputeInstance_t = ptr::null_mut();
            // SAFETY: `gi` is live; the out-pointer is a local.
            let ret = unsafe { ci_fn(gi, info.id, &mut ci) };
            self.check("nvmlGpuInstanceCreateComputeInstance", &what, ret)?;
            Ok(ci)
        })();
        match ci {
            Ok(ci) => Ok(Existing {
                gi,
                profile: profile.clone(),
                start: step.start,
                cis: vec![(ci, step.ci_index)],
            }),
            Err(e) => {
                // A GPU instance without a compute instance is of no use: do not leave it.
                // SAFETY: `gi` was created above and has no compute instance.
                let _ = unsafe { gi_destroy(gi) };
                Err(e)
            }
        }
    }

    /// Makes this GPU match its plan. MIG mode changes only when the plan asks for the other
    /// mode; the instances are left alone when they already match; the layout is placed (or
    /// refused) before any instance is destroyed.
    pub fn apply(&self, plan: &GpuMigPlan) -> Result<(), BackendError> {
        let (current, _) = self.mig_mode()?;
        let enabled = current == NVML_DEVICE_MIG_ENABLE;
        if !plan.mig_enabled {
            if !enabled {
                return Ok(());
            }
            let offered = self.offered()?;
            for e in self.existing(&offered)? {
                self.destroy(&e)?;
            }
            return self.switch_mode(NVML_DEVICE_MIG_DISABLE);
        }
        if !enabled {
            self.switch_mode(NVML_DEVICE_MIG_ENABLE)?;
        }
        let offered = self.offered()?;
        let steps = self.layout(&plan.devices, &offered)?;
        let have = self.existing(&offered)?;
        let mut names: Vec<String> = have.iter().map(|e| e.profile.name.clone()).collect();
        names.sort();
        let whole = have.iter().all(|e| {
            e.cis.len() == 1
                && mig_layout::ci_profile_index(e.profile.compute_slices) == Some(e.cis[0].1)
        });
        if whole && names == mig_layout::multiset(&plan.devices) {
            tracing::info!("GPU {}: the MIG devices already match", self.index);
            return Ok(());
        }
        self.replace(&steps, &offered, have)
    }

    fn layout(
        &self,
        devices: &BTreeMap<String, u32>,
        offered: &[GiProfile],
    ) -> Result<Vec<Step>, BackendError> {
        mig_layout::steps(devices, offered)
            .map_err(|e| BackendError::Unsupported(format!("GPU {}: {e}", self.index)))
    }

    fn switch_mode(&self, mode: u32) -> Result<(), BackendError> {
        self.set_mig_mode(mode)?;
        let (current, pending) = self.mig_mode()?;
        if current != mode {
            let word = if mode == NVML_DEVICE_MIG_ENABLE {
                "on"
            } else {
                "off"
            };
            return Err(BackendError::Unsupported(format!(
                "GPU {}: MIG mode is set to turn {word} (pending {pending}) but takes effect only \
                 after a GPU reset; stop every process using the GPU and reset it \
                 (nvidia-smi -r -i {}) or reboot the node, then set nvidia.com/mig.config again",
                self.index, self.index
            )));
        }
        Ok(())
    }

    /// Destroys every instance and creates `steps`; on a failure half-way, destroys what it
    /// created and puts the previous layout back (best effort), and says both.
    fn replace(
        &self,
        steps: &[Step],
        offered: &[GiProfile],
        before: Vec<Existing>,
    ) -> Result<(), BackendError> {
        let previous: Vec<(GiProfile, u32)> = before
            .iter()
            .map(|e| (e.profile.clone(), e.start))
            .collect();
        for e in &before {
            self.destroy(e)?;
        }
        let mut created = Vec::new();
        for step in steps {
            let profile = offered
                .iter()
                .find(|p| p.id == step.gi_id)
                .expect("steps come from the offered profiles");
            match self.create(step, profile) {
                Ok(e) => created.push(e),
                Err(e) => {
                    for c in &created {
                        let _ = self.destroy(c);
                    }
                    let restored = self.restore(&previous);
                    return Err(BackendError::Unsupported(format!(
                        "creating MIG device {} on GPU {} failed: {e}; {restored}",
                        step.profile, self.index
                    )));
                }
            }
        }
        Ok(())
    }

    fn restore(&self, previous: &[(GiProfile, u32)]) -> String {
        let mut failed = Vec::new();
        for (p, start) in previous {
            let Some(ci_index) = mig_layout::ci_profile_index(p.compute_slices) else {
                failed.push(p.name.clone());
                continue;
            };
            let step = Step {
                profile: p.name.clone(),
                gi_index: p.index,
                gi_id: p.id,
                start: *start,
                size: p.size,
                ci_index,
            };
            if self.create(&step, p).is_err() {
                failed.push(format!("{} at {start}", p.name));
            }
        }
        if previous.is_empty() {
            "the GPU is left without MIG devices".into()
        } else if failed.is_empty() {
            "the previous MIG devices were put back".into()
        } else {
            format!(
                "putting the previous MIG devices back failed for {}; set nvidia.com/mig.config \
                 again once the cause is fixed",
                failed.join(", ")
            )
        }
    }
}
