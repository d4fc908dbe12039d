//! How one GPU's MIG devices are laid out, as pure functions both backends share: the names
//! mig-parted gives GPU-instance profiles, where each instance may sit, and the ordered creation
//! steps for a set of requested devices (or why they do not fit).
//!
//! A GPU has 8 memory slices (and 7 compute slices). A GPU-instance profile may start only at
//! certain memory slices ("placements"): NVML reports them for a real GPU
//! (`nvmlDeviceGetGpuInstancePossiblePlacements_v2`); for a simulated one [`derived_placements`]
//! gives the same answer as NVIDIA's tables for A100 and H100. Creating instances at explicit
//! placements, chosen by a small exhaustive search, makes layouts such as `3g + 2g + 2g` work that
//! "first free spot" creation would fragment.

use std::collections::BTreeMap;

use crate::inventory::MigProfile;

/// Memory slices of a MIG-capable GPU (A100, H100, H200 alike).
pub const MEMORY_SLICES: u32 = 8;
/// Compute slices of a MIG-capable GPU.
pub const COMPUTE_SLICES: u32 = 7;

/// NVML's GPU-instance profile indices (`NVML_GPU_INSTANCE_PROFILE_*`) that have a name suffix in
/// mig-parted's spelling; every other index is a plain `<g>g.<mem>gb`.
const PROFILE_1_SLICE_REV1: u32 = 7; // +me: one slice with the media engines
const PROFILE_2_SLICE_REV1: u32 = 8; // +me
const PROFILE_1_SLICE_GFX: u32 = 10;
const PROFILE_2_SLICE_GFX: u32 = 11;
const PROFILE_4_SLICE_GFX: u32 = 12;
const PROFILE_1_SLICE_NO_ME: u32 = 13;
const PROFILE_2_SLICE_NO_ME: u32 = 14;
const PROFILE_1_SLICE_ALL_ME: u32 = 15;
const PROFILE_2_SLICE_ALL_ME: u32 = 16;

/// A GPU-instance profile as one GPU offers it.
#[derive(Debug, Clone, PartialEq)]
pub struct GiProfile {
    /// mig-parted's name, e.g. `3g.40gb` or `1g.10gb+me`.
    pub name: String,
    /// NVML's profile index (`NVML_GPU_INSTANCE_PROFILE_*`), which the profile-info call takes.
    pub index: u32,
    /// NVML's profile ID (`nvmlGpuInstanceProfileInfo_t.id`), which create and list calls take.
    pub id: u32,
    pub compute_slices: u32,
    /// Memory slices one instance occupies.
    pub size: u32,
    /// Memory slices an instance may start at.
    pub starts: Vec<u32>,
}

/// One GPU instance to create, with one compute instance spanning it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub profile: String,
    pub gi_index: u32,
    pub gi_id: u32,
    pub start: u32,
    pub size: u32,
    /// NVML's compute-instance profile index (`NVML_COMPUTE_INSTANCE_PROFILE_*`) of the same
    /// number of slices as the GPU instance.
    pub ci_index: u32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LayoutError {
    #[error("this GPU has no MIG profile '{wanted}' (it has: {have})")]
    UnknownProfile { wanted: String, have: String },
    #[error(
        "the MIG devices {wanted} do not fit on this GPU: no placement of them leaves every \
         instance on its own memory slices (GPU-instance placements: {placements})"
    )]
    NoPlacement { wanted: String, placements: String },
    #[error("MIG profile '{0}' has a slice count no compute-instance profile covers")]
    NoComputeProfile(String),
}

/// mig-parted's memory figure in a profile name: the profile's share of the GPU's memory,
/// rounded up to eighths, times the GPU's memory in whole GiB, rounded. An H100 80GB's 7-slice
/// profile has 80384 of 81559 MiB and is `7g.80gb`; its 1-slice profile (9856 MiB) is `1g.10gb`.
pub fn memory_gb(profile_mib: u64, total_mib: u64) -> u64 {
    if total_mib == 0 {
        return 0;
    }
    let eighths = (profile_mib * 8).div_ceil(total_mib);
    let total_gb = total_mib.div_ceil(1024);
    // round(eighths / 8 * total_gb) in integers
    (eighths * total_gb * 2 + 8) / 16
}

/// The name mig-parted (and the device plugin's resource names) give a GPU-instance profile.
pub fn gi_profile_name(index: u32, slices: u32, profile_mib: u64, total_mib: u64) -> String {
    let suffix = match index {
        PROFILE_1_SLICE_REV1 | PROFILE_2_SLICE_REV1 => "+me",
        PROFILE_1_SLICE_NO_ME | PROFILE_2_SLICE_NO_ME => "-me",
        PROFILE_1_SLICE_ALL_ME | PROFILE_2_SLICE_ALL_ME => "+me.all",
        PROFILE_1_SLICE_GFX | PROFILE_2_SLICE_GFX | PROFILE_4_SLICE_GFX => "+gfx",
        _ => "",
    };
    format!("{slices}g.{}gb{suffix}", memory_gb(profile_mib, total_mib))
}

/// NVML's compute-instance profile index for a compute instance of `slices` slices.
pub fn ci_profile_index(slices: u32) -> Option<u32> {
    Some(match slices {
        1 => 0,
        2 => 1,
        3 => 2,
        4 => 3,
        7 => 4,
        8 => 5,
        6 => 6,
        _ => return None,
    })
}

/// Where an instance of a profile may start when the driver is not there to say: aligned to its
/// own size, within the 8 memory slices, and with its compute slices within the 7. This is
/// NVIDIA's placement table for A100 and H100 (e.g. `3g` at 0 or 4, `2g` at 0, 2 or 4, `1g` of
/// two memory slices at 0, 2, 4 or 6).
pub fn derived_placements(compute_slices: u32, memory_slices: u32) -> Vec<u32> {
    if memory_slices == 0 {
        return Vec::new();
    }
    (0..MEMORY_SLICES)
        .step_by(memory_slices as usize)
        .filter(|s| s + memory_slices <= MEMORY_SLICES && s + compute_slices <= COMPUTE_SLICES)
        .collect()
}

/// The profiles of an inventory model, as a simulated GPU offers them.
pub fn simulated_profiles(profiles: &[MigProfile]) -> Vec<GiProfile> {
    profiles
        .iter()
        .enumerate()
        .map(|(i, p)| GiProfile {
            name: p.name.clone(),
            index: i as u32,
            id: i as u32,
            compute_slices: p.compute_slices,
            size: p.memory_slices,
            starts: derived_placements(p.compute_slices, p.memory_slices),
        })
        .collect()
}

/// The creation steps for `devices` (profile name -> count) on a GPU offering `offered`: one
/// GPU instance per device at a placement that overlaps no other, each with one compute instance
/// over all of its slices. Steps come in placement order.
pub fn steps(
    devices: &BTreeMap<String, u32>,
    offered: &[GiProfile],
) -> Result<Vec<Step>, LayoutError> {
    let mut wanted: Vec<&GiProfile> = Vec::new();
    for (name, count) in devices {
        let p = offered.iter().find(|p| &p.name == name).ok_or_else(|| {
            LayoutError::UnknownProfile {
                wanted: name.clone(),
                have: offered
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })?;
        wanted.extend(std::iter::repeat_n(p, *count as usize));
    }
    // Big instances and those with few places to go first: the search then rarely backtracks.
    wanted.sort_by_key(|p| (std::cmp::Reverse(p.size), p.starts.len(), p.index));
    let mut chosen = vec![0u32; wanted.len()];
    if !place(&wanted, 0, 0, &mut chosen) {
        let mut desc: Vec<String> = devices
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(p, n)| format!("{n}x {p}"))
            .collect();
        desc.sort();
        let mut placements: Vec<String> = Vec::new();
        for p in &wanted {
            let line = format!("{} at {:?} of size {}", p.name, p.starts, p.size);
            if !placements.contains(&line) {
                placements.push(line);
            }
        }
        return Err(LayoutError::NoPlacement {
            wanted: desc.join(" + "),
            placements: placements.join("; "),
        });
    }
    let mut out = Vec::with_capacity(wanted.len());
    for (p, start) in wanted.iter().zip(chosen) {
        let ci_index = ci_profile_index(p.compute_slices)
            .ok_or_else(|| LayoutError::NoComputeProfile(p.name.clone()))?;
        out.push(Step {
            profile: p.name.clone(),
            gi_index: p.index,
            gi_id: p.id,
            start,
            size: p.size,
            ci_index,
        });
    }
    out.sort_by_key(|s| s.start);
    Ok(out)
}

/// Backtracking over placements; `used` is a bit mask of occupied memory slices.
fn place(wanted: &[&GiProfile], next: usize, used: u32, chosen: &mut [u32]) -> bool {
    let Some(p) = wanted.get(next) else {
        return true;
    };
    for &start in &p.starts {
        let mask = ((1u32 << p.size) - 1) << start;
        if used & mask == 0 && start + p.size <= MEMORY_SLICES {
            chosen[next] = start;
            if place(wanted, next + 1, used | mask, chosen) {
                return true;
            }
        }
    }
    false
}

/// The profile names of a layout as a sorted list, to compare what exists with what is wanted.
pub fn multiset(devices: &BTreeMap<String, u32>) -> Vec<String> {
    let mut out: Vec<String> = devices
        .iter()
        .flat_map(|(p, n)| std::iter::repeat_n(p.clone(), *n as usize))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Inventory, built_in};

    fn offered(inventory: &str) -> Vec<GiProfile> {
        let inv = Inventory::from_yaml(built_in(inventory).unwrap()).unwrap();
        simulated_profiles(&inv.gpus[0].model.mig_profiles)
    }

    fn want(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(p, n)| (p.to_string(), *n)).collect()
    }

    #[test]
    fn names_profiles_as_mig_parted_does() {
        // H100 80GB HBM3: 81559 MiB in all.
        let h100 = 81559;
        assert_eq!(gi_profile_name(0, 1, 9856, h100), "1g.10gb");
        assert_eq!(gi_profile_name(7, 1, 9856, h100), "1g.10gb+me");
        assert_eq!(gi_profile_name(9, 1, 19968, h100), "1g.20gb");
        assert_eq!(gi_profile_name(1, 2, 19968, h100), "2g.20gb");
        assert_eq!(gi_profile_name(2, 3, 40192, h100), "3g.40gb");
        assert_eq!(gi_profile_name(3, 4, 40192, h100), "4g.40gb");
        assert_eq!(gi_profile_name(4, 7, 80384, h100), "7g.80gb");
        // A100-SXM4-40GB: 40960 MiB.
        assert_eq!(gi_profile_name(0, 1, 4864, 40960), "1g.5gb");
        assert_eq!(gi_profile_name(9, 1, 9984, 40960), "1g.10gb");
        assert_eq!(gi_profile_name(2, 3, 20096, 40960), "3g.20gb");
        assert_eq!(gi_profile_name(4, 7, 40320, 40960), "7g.40gb");
        assert_eq!(gi_profile_name(13, 1, 4864, 40960), "1g.5gb-me");
        assert_eq!(gi_profile_name(15, 1, 4864, 40960), "1g.5gb+me.all");
        assert_eq!(gi_profile_name(10, 1, 4864, 40960), "1g.5gb+gfx");
        assert_eq!(memory_gb(1, 0), 0);
    }

    #[test]
    fn derived_placements_match_nvidias_tables() {
        assert_eq!(derived_placements(7, 8), vec![0]);
        assert_eq!(derived_placements(4, 4), vec![0]);
        assert_eq!(derived_placements(3, 4), vec![0, 4]);
        assert_eq!(derived_placements(2, 2), vec![0, 2, 4]);
        assert_eq!(derived_placements(1, 2), vec![0, 2, 4, 6]);
        assert_eq!(derived_placements(1, 1), vec![0, 1, 2, 3, 4, 5, 6]);
        assert!(derived_placements(1, 0).is_empty());
    }

    #[test]
    fn maps_names_to_profile_ids_and_compute_profiles() {
        let h100 = offered("dgx-h100");
        let s = steps(&want(&[("7g.80gb", 1)]), &h100).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].start, s[0].size, s[0].ci_index), (0, 8, 4));
        let s = steps(&want(&[("1g.10gb", 7)]), &h100).unwrap();
        assert_eq!(
            s.iter().map(|s| s.start).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5, 6]
        );
        assert!(s.iter().all(|s| s.ci_index == 0 && s.profile == "1g.10gb"));
        let e = steps(&want(&[("1g.5gb", 1)]), &h100).unwrap_err();
        assert!(e.to_string().contains("no MIG profile '1g.5gb'"), "{e}");
    }

    #[test]
    fn finds_placements_first_free_spot_would_miss() {
        // 3g.20gb first at 0 would leave 4-5 and 6-7; a 2g cannot start at 6. At 4 it works.
        let a100 = offered("a100-40gb");
        let s = steps(&want(&[("3g.20gb", 1), ("2g.10gb", 2)]), &a100).unwrap();
        let layout: Vec<_> = s.iter().map(|s| (s.profile.as_str(), s.start)).collect();
        assert_eq!(
            layout,
            [("2g.10gb", 0), ("2g.10gb", 2), ("3g.20gb", 4)],
            "{s:?}"
        );
        let s = steps(
            &want(&[("4g.20gb", 1), ("2g.10gb", 1), ("1g.5gb", 1)]),
            &a100,
        )
        .unwrap();
        let layout: Vec<_> = s.iter().map(|s| (s.profile.as_str(), s.start)).collect();
        assert_eq!(layout, [("4g.20gb", 0), ("2g.10gb", 4), ("1g.5gb", 6)]);
    }

    #[test]
    fn says_when_nothing_fits() {
        let a100 = offered("a100-40gb");
        let e = steps(
            &want(&[("4g.20gb", 1), ("3g.20gb", 1), ("1g.5gb", 1)]),
            &a100,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("1x 1g.5gb + 1x 3g.20gb + 1x 4g.20gb"), "{e}");
        assert!(e.contains("3g.20gb at [0, 4] of size 4"), "{e}");
        // Placements as a driver might report them, narrower than the derived ones.
        let narrow = vec![GiProfile {
            name: "2g.20gb".into(),
            index: 1,
            id: 14,
            compute_slices: 2,
            size: 2,
            starts: vec![0, 2],
        }];
        assert!(steps(&want(&[("2g.20gb", 2)]), &narrow).is_ok());
        assert!(matches!(
            steps(&want(&[("2g.20gb", 3)]), &narrow),
            Err(LayoutError::NoPlacement { .. })
        ));
    }

    #[test]
    fn multiset_compares_layouts() {
        assert_eq!(
            multiset(&want(&[("2g.10gb", 2), ("1g.5gb", 1)])),
            ["1g.5gb", "2g.10gb", "2g.10gb"]
        );
        assert!(multiset(&want(&[("1g.5gb", 0)])).is_empty());
    }
}
