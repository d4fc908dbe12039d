//! From an inventory and a device-plugin config to the resources the kubelet sees, and the pure
//! answers to `Allocate` and `GetPreferredAllocation`. No gRPC here.

use std::collections::{BTreeMap, BTreeSet};

use gpu_pilot_api::names::resource;

use super::config::{MigStrategy, PluginConfig};
use crate::health::HealthRules;
use crate::inventory::Inventory;

/// One device as the kubelet sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginDevice {
    /// The ID the kubelet uses: a GPU or MIG UUID, with `::<n>` for a time-sliced replica.
    pub id: String,
    /// The UUID the container runtime needs (GPU or MIG device).
    pub uuid: String,
    pub gpu_index: u32,
    pub numa_node: Option<i64>,
    pub healthy: bool,
}

/// One extended resource and its devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    pub devices: Vec<PluginDevice>,
    /// Time-slicing replicas per physical device (1 when not shared).
    pub replicas: u32,
    pub fail_requests_greater_than_one: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error(
        "MIG strategy 'single' needs every GPU in MIG mode with one MIG profile, but {0}. \
         Apply a uniform MIG layout (nvidia.com/mig.config=all-<profile>) or use migStrategy 'mixed'"
    )]
    NotUniform(String),
}

/// The resources to serve. Sorted by name; a resource with no devices is left out.
pub fn plan(
    inv: &Inventory,
    cfg: &PluginConfig,
    health: &HealthRules,
) -> Result<Vec<Resource>, PlanError> {
    let mut by_name: BTreeMap<String, Vec<PluginDevice>> = BTreeMap::new();
    let strategy = cfg.mig_strategy();
    if strategy == MigStrategy::Single {
        let mig: Vec<_> = inv.gpus.iter().filter(|g| g.mig_enabled).collect();
        if !mig.is_empty() {
            if mig.len() != inv.gpus.len() {
                return Err(PlanError::NotUniform(format!(
                    "only {} of {} GPUs are in MIG mode",
                    mig.len(),
                    inv.gpus.len()
                )));
            }
            let profiles: BTreeSet<_> = mig
                .iter()
                .flat_map(|g| g.mig_devices.iter().map(|d| d.profile.as_str()))
                .collect();
            if profiles.len() > 1 {
                return Err(PlanError::NotUniform(format!(
                    "the MIG devices have profiles {}",
                    profiles.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
        }
    }
    for gpu in &inv.gpus {
        let healthy = health.is_healthy(&gpu.xids);
        let device = |uuid: &str| PluginDevice {
            id: uuid.to_string(),
            uuid: uuid.to_string(),
            gpu_index: gpu.index,
            numa_node: gpu.numa_node,
            healthy,
        };
        if !gpu.mig_enabled {
            by_name
                .entry(resource::GPU.to_string())
                .or_default()
                .push(device(&gpu.uuid));
            continue;
        }
        for mig in &gpu.mig_devices {
            let name = match strategy {
                // A GPU in MIG mode cannot be handed out whole: under `none` it is not offered.
                MigStrategy::None => continue,
                MigStrategy::Single => resource::GPU.to_string(),
                MigStrategy::Mixed => resource::mig(&mig.profile),
            };
            by_name.entry(name).or_default().push(device(&mig.uuid));
        }
    }
    let ts = cfg.sharing.time_slicing.clone().unwrap_or_default();
    let mut out = Vec::new();
    for (name, devices) in by_name {
        let Some(shared) = ts.resources.iter().find(|r| r.name == name) else {
            out.push(Resource {
                name,
                devices,
                replicas: 1,
                fail_requests_greater_than_one: false,
            });
            continue;
        };
        let new_name = match &shared.rename {
            Some(r) => r.clone(),
            None if ts.rename_by_default => format!("{name}{}", resource::SHARED_SUFFIX),
            None => name.clone(),
        };
        let mut replicated = Vec::new();
        for d in devices {
            for n in 0..shared.replicas {
                replicated.push(PluginDevice {
                    id: format!("{}::{n}", d.id),
                    ..d.clone()
                });
            }
        }
        out.push(Resource {
            name: new_name,
            devices: replicated,
            replicas: shared.replicas,
            fail_requests_greater_than_one: ts.fail_requests_greater_than_one,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// What one container gets.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContainerAllocation {
    pub envs: BTreeMap<String, String>,
    pub cdi_devices: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AllocateError {
    #[error(
        "unknown device ID(s) {ids} for resource {resource}: this agent offers {offered}. The \
         kubelet's view is stale; it resyncs from ListAndWatch, so retry the pod"
    )]
    Unknown {
        resource: String,
        ids: String,
        offered: String,
    },
    #[error(
        "resource {resource} is time-sliced with failRequestsGreaterThanOne: a container may ask for \
         1, it asked for {asked}. Request 1, or turn failRequestsGreaterThanOne off"
    )]
    MoreThanOne { resource: String, asked: usize },
}

/// The env var NVIDIA's container runtime reads.
pub const VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
/// CDI vendor/class of NVIDIA's CDI specs (`nvidia-ctk cdi generate`).
pub const CDI_KIND: &str = "nvidia.com/gpu";

/// Answers one container's `Allocate` request.
pub fn allocate(
    res: &Resource,
    ids: &[String],
    envvar: bool,
    cdi: bool,
) -> Result<ContainerAllocation, AllocateError> {
    if res.replicas > 1 && res.fail_requests_greater_than_one && ids.len() > 1 {
        return Err(AllocateError::MoreThanOne {
            resource: res.name.clone(),
            asked: ids.len(),
        });
    }
    let mut uuids: Vec<&str> = Vec::new();
    let mut unknown = Vec::new();
    for id in ids {
        match res.devices.iter().find(|d| &d.id == id) {
            Some(d) if !uuids.contains(&d.uuid.as_str()) => uuids.push(&d.uuid),
            Some(_) => {}
            None => unknown.push(id.as_str()),
        }
    }
    if !unknown.is_empty() {
        return Err(AllocateError::Unknown {
            resource: res.name.clone(),
            ids: unknown.join(", "),
            offered: offered(res),
        });
    }
    let mut out = ContainerAllocation::default();
    if envvar {
        out.envs.insert(VISIBLE_DEVICES.into(), uuids.join(","));
    }
    if cdi {
        out.cdi_devices = uuids.iter().map(|u| format!("{CDI_KIND}={u}")).collect();
    }
    Ok(out)
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PreferError {
    #[error(
        "allocation_size {size} for resource {resource} is negative; the kubelet asks for a count of devices"
    )]
    NegativeSize { resource: String, size: i32 },
    #[error(
        "must_include_deviceIDs names {ids}, which resource {resource} does not offer (it offers {offered}). \
         The kubelet's view is stale; it resyncs from ListAndWatch, so retry the pod"
    )]
    UnknownMustInclude {
        resource: String,
        ids: String,
        offered: String,
    },
}

/// Up to four offered IDs, for messages.
fn offered(res: &Resource) -> String {
    let mut shown: Vec<_> = res.devices.iter().map(|d| d.id.as_str()).take(4).collect();
    if res.devices.len() > 4 {
        shown.push("...");
    }
    shown.join(", ")
}

/// Picks `size` devices from `available`, keeping `must_include`: the set whose GPUs share the
/// most NVLinks, then the most pairs on one NUMA node, then the lowest GPU indices. Replicas of
/// a time-sliced GPU are spread over the GPUs with the most free replicas instead.
///
/// Total over any request: IDs in `available` this resource does not offer (a kubelet a moment
/// behind) are left out, repeated IDs count once, and a `size` larger than what can be chosen
/// gets every device that can (the kubelet fills up the rest itself). A negative `size` or an
/// unknown ID the kubelet insists on is an error.
pub fn preferred(
    res: &Resource,
    inv: &Inventory,
    available: &[String],
    must_include: &[String],
    size: i32,
) -> Result<Vec<String>, PreferError> {
    let size = usize::try_from(size).map_err(|_| PreferError::NegativeSize {
        resource: res.name.clone(),
        size,
    })?;
    let find = |id: &String| res.devices.iter().find(|d| &d.id == id);
    let unknown: Vec<&str> = must_include
        .iter()
        .filter(|id| find(id).is_none())
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(PreferError::UnknownMustInclude {
            resource: res.name.clone(),
            ids: unknown.join(", "),
            offered: offered(res),
        });
    }
    let mut chosen: Vec<&PluginDevice> = Vec::new();
    for d in must_include.iter().filter_map(find) {
        if !chosen.iter().any(|c| c.id == d.id) {
            chosen.push(d);
        }
    }
    let mut pool: Vec<&PluginDevice> = Vec::new();
    for d in available
        .iter()
        .filter(|id| !must_include.contains(id))
        .filter_map(find)
    {
        if !pool.iter().any(|p| p.id == d.id) {
            pool.push(d);
        }
    }
    pool.sort_by(|a, b| (a.gpu_index, &a.id).cmp(&(b.gpu_index, &b.id)));
    // Never more than the pool holds: a size past it (or near i32::MAX) picks all of it.
    let need = size.saturating_sub(chosen.len()).min(pool.len());
    if need == 0 {
        return Ok(chosen
            .into_iter()
            .take(size)
            .map(|d| d.id.clone())
            .collect());
    }
    if res.replicas > 1 {
        for _ in 0..need {
            let mut free: BTreeMap<u32, usize> = BTreeMap::new();
            for d in &pool {
                *free.entry(d.gpu_index).or_default() += 1;
            }
            let used: BTreeSet<u32> = chosen.iter().map(|d| d.gpu_index).collect();
            let Some(pos) = pool.iter().enumerate().max_by_key(|(i, d)| {
                (
                    !used.contains(&d.gpu_index),
                    free[&d.gpu_index],
                    std::cmp::Reverse(*i),
                )
            }) else {
                break;
            };
            chosen.push(pool.remove(pos.0));
        }
        return Ok(chosen.into_iter().map(|d| d.id.clone()).collect());
    }
    let score = |set: &[&PluginDevice]| {
        let (mut links, mut numa) = (0u32, 0u32);
        for (i, a) in set.iter().enumerate() {
            for b in &set[i + 1..] {
                if a.gpu_index != b.gpu_index {
                    links += inv.nvlinks_between(a.gpu_index, b.gpu_index);
                }
                if a.numa_node.is_some() && a.numa_node == b.numa_node {
                    numa += 1;
                }
            }
        }
        (links, numa)
    };
    // Exhaustive over combinations while that stays small (8 GPUs choose 4 is 70), greedy beyond.
    if binomial(pool.len(), need) <= 20_000 {
        let mut best: Option<((u32, u32), Vec<usize>)> = None;
        let mut combo: Vec<usize> = (0..need).collect();
        loop {
            let mut set = chosen.clone();
            set.extend(combo.iter().map(|&i| pool[i]));
            let s = score(&set);
            if best.as_ref().is_none_or(|(b, _)| s > *b) {
                best = Some((s, combo.clone()));
            }
            if !next_combination(&mut combo, pool.len()) {
                break;
            }
        }
        if let Some((_, combo)) = best {
            chosen.extend(combo.into_iter().map(|i| pool[i]));
        }
    } else {
        for _ in 0..need {
            let Some(pos) = (0..pool.len()).max_by_key(|&i| {
                let mut set = chosen.clone();
                set.push(pool[i]);
                (score(&set), std::cmp::Reverse(i))
            }) else {
                break;
            };
            chosen.push(pool.remove(pos));
        }
    }
    Ok(chosen.into_iter().map(|d| d.id.clone()).collect())
}

fn binomial(n: usize, k: usize) -> u64 {
    if k > n {
        return 0;
    }
    let k = k.min(n - k) as u64;
    let mut r: u64 = 1;
    for i in 0..k {
        r = r.saturating_mul(n as u64 - i) / (i + 1);
    }
    r
}

/// Advances `c` (a sorted k-subset of 0..n) to the next one in lexical order.
fn next_combination(c: &mut [usize], n: usize) -> bool {
    let k = c.len();
    for i in (0..k).rev() {
        if c[i] < n - k + i {
            c[i] += 1;
            for j in i + 1..k {
                c[j] = c[j - 1] + 1;
            }
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::super::config::PluginConfig;
    use super::*;
    use crate::inventory::{Inventory, MigDevice, built_in};

    fn inv(name: &str) -> Inventory {
        Inventory::from_yaml(built_in(name).unwrap()).unwrap()
    }

    fn cfg(text: &str) -> PluginConfig {
        PluginConfig::parse(text, "test").unwrap()
    }

    fn with_mig(mut inv: Inventory, layout: &[(u32, &str, u32)]) -> Inventory {
        for (gpu, profile, n) in layout {
            let g = inv.gpus.iter_mut().find(|g| g.index == *gpu).unwrap();
            g.mig_enabled = true;
            for i in 0..*n {
                g.mig_devices.push(MigDevice {
                    uuid: format!("MIG-{gpu}-{profile}-{i}"),
                    profile: profile.to_string(),
                });
            }
        }
        inv
    }

    #[test]
    fn whole_gpus_by_uuid() {
        let r = plan(
            &inv("dgx-h100"),
            &PluginConfig::default(),
            &HealthRules::default(),
        )
        .unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].name, "nvidia.com/gpu");
        assert_eq!(r[0].devices.len(), 8);
        assert!(r[0].devices[0].id.starts_with("GPU-"));
    }

    #[test]
    fn mig_mixed_and_single_names() {
        let a100 = with_mig(inv("a100-40gb"), &[(0, "1g.5gb", 7), (1, "3g.20gb", 2)]);
        let mixed = plan(
            &a100,
            &cfg("version: v1\nflags: {migStrategy: mixed}\n"),
            &HealthRules::default(),
        )
        .unwrap();
        let counts: Vec<_> = mixed
            .iter()
            .map(|r| (r.name.as_str(), r.devices.len()))
            .collect();
        assert_eq!(
            counts,
            vec![
                ("nvidia.com/gpu", 2),
                ("nvidia.com/mig-1g.5gb", 7),
                ("nvidia.com/mig-3g.20gb", 2)
            ]
        );
        let single = cfg("version: v1\nflags: {migStrategy: single}\n");
        let e = plan(&a100, &single, &HealthRules::default()).unwrap_err();
        assert!(e.to_string().contains("only 2 of 4 GPUs"), "{e}");
        let uniform = with_mig(
            inv("a100-40gb"),
            &[
                (0, "1g.5gb", 7),
                (1, "1g.5gb", 7),
                (2, "1g.5gb", 7),
                (3, "1g.5gb", 7),
            ],
        );
        let r = plan(&uniform, &single, &HealthRules::default()).unwrap();
        assert_eq!(
            (r[0].name.as_str(), r[0].devices.len()),
            ("nvidia.com/gpu", 28)
        );
    }

    #[test]
    fn time_slicing_replicas_and_rename() {
        let c = cfg(
            "version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n    resources:\n    - {name: nvidia.com/gpu, replicas: 4}\n",
        );
        let r = plan(&inv("t4"), &c, &HealthRules::default()).unwrap();
        assert_eq!(r[0].name, "nvidia.com/gpu.shared");
        assert_eq!(r[0].devices.len(), 4);
        let a = allocate(
            &r[0],
            &[r[0].devices[1].id.clone(), r[0].devices[2].id.clone()],
            true,
            false,
        )
        .unwrap();
        // Two replicas of the same GPU are one GPU to the runtime.
        assert_eq!(a.envs[VISIBLE_DEVICES], r[0].devices[0].uuid);
    }

    #[test]
    fn fail_requests_greater_than_one() {
        let c = cfg(
            "version: v1\nsharing:\n  timeSlicing:\n    failRequestsGreaterThanOne: true\n    resources:\n    - {name: nvidia.com/gpu, replicas: 2}\n",
        );
        let r = plan(&inv("t4"), &c, &HealthRules::default()).unwrap();
        let ids: Vec<_> = r[0].devices.iter().map(|d| d.id.clone()).collect();
        assert!(matches!(
            allocate(&r[0], &ids, true, false),
            Err(AllocateError::MoreThanOne { .. })
        ));
    }

    #[test]
    fn allocate_envvar_cdi_and_unknown() {
        let r = &plan(
            &inv("a100-40gb"),
            &PluginConfig::default(),
            &HealthRules::default(),
        )
        .unwrap()[0];
        let ids = vec![r.devices[0].id.clone(), r.devices[3].id.clone()];
        let a = allocate(r, &ids, true, true).unwrap();
        assert_eq!(a.envs[VISIBLE_DEVICES], format!("{},{}", ids[0], ids[1]));
        assert_eq!(
            a.cdi_devices,
            vec![
                format!("nvidia.com/gpu={}", ids[0]),
                format!("nvidia.com/gpu={}", ids[1])
            ]
        );
        let e = allocate(r, &["GPU-nope".into()], true, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown device ID(s) GPU-nope for resource nvidia.com/gpu"),
            "{e}"
        );
    }

    #[test]
    fn preferred_follows_nvlinks_then_numa() {
        let a100 = inv("a100-40gb");
        let r = &plan(&a100, &PluginConfig::default(), &HealthRules::default()).unwrap()[0];
        let id = |i: usize| r.devices[i].id.clone();
        let all: Vec<_> = (0..4).map(id).collect();
        // GPU 2 must be in: its NVLink partner is 3.
        let mut got = preferred(r, &a100, &all, &[id(2)], 2).unwrap();
        got.sort();
        let mut want = vec![id(2), id(3)];
        want.sort();
        assert_eq!(got, want);
        // Without 0 and 1 joined... 1 and 3 are only 4-linked, but 1+3 beats nothing: size 2 from {1,2,3}.
        let got = preferred(r, &a100, &[id(1), id(2), id(3)], &[], 2).unwrap();
        assert_eq!(got, vec![id(2), id(3)]);
        // The DGX is all-to-all: NUMA decides.
        let dgx = inv("dgx-h100");
        let r = &plan(&dgx, &PluginConfig::default(), &HealthRules::default()).unwrap()[0];
        let all: Vec<_> = r.devices.iter().map(|d| d.id.clone()).collect();
        let got = preferred(r, &dgx, &all, &[all[5].clone()], 4).unwrap();
        let gpus: BTreeSet<_> = got
            .iter()
            .map(|id| r.devices.iter().find(|d| &d.id == id).unwrap().gpu_index)
            .collect();
        assert!(gpus.iter().all(|g| *g >= 4), "{gpus:?}");
    }

    #[test]
    fn preferred_spreads_replicas() {
        let c = cfg(
            "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 3}\n",
        );
        let a100 = inv("a100-40gb");
        let r = &plan(&a100, &c, &HealthRules::default()).unwrap()[0];
        let all: Vec<_> = r.devices.iter().map(|d| d.id.clone()).collect();
        let got = preferred(r, &a100, &all, &[], 3).unwrap();
        let gpus: BTreeSet<_> = got
            .iter()
            .map(|id| r.devices.iter().find(|d| &d.id == id).unwrap().gpu_index)
            .collect();
        assert_eq!(gpus.len(), 3);
    }

    #[test]
    fn preferred_with_stale_ids_and_huge_sizes_never_indexes_past_the_pool() {
        let a100 = inv("a100-40gb");
        let r = &plan(&a100, &PluginConfig::default(), &HealthRules::default()).unwrap()[0];
        let id = |i: usize| r.devices[i].id.clone();
        // Two of three available IDs are stale: the exhaustive search once built combinations
        // of `size` indices into a pool of one and indexed past it.
        let stale = vec![id(0), "GPU-gone-1".into(), "GPU-gone-2".into()];
        assert_eq!(preferred(r, &a100, &stale, &[], 3), Ok(vec![id(0)]));
        // A size near i32::MAX once allocated a combination of that many indices.
        let all: Vec<_> = (0..4).map(id).collect();
        assert_eq!(preferred(r, &a100, &all, &[], i32::MAX).unwrap().len(), 4);
        assert_eq!(
            preferred(r, &a100, &all, &[id(1), id(1)], 2).unwrap().len(),
            2
        );
        let e = preferred(r, &a100, &all, &[], -1).unwrap_err();
        assert!(e.to_string().contains("is negative"), "{e}");
        let e = preferred(r, &a100, &all, &["GPU-gone".into()], 1).unwrap_err();
        assert!(e.to_string().contains("GPU-gone"), "{e}");
        assert_eq!(preferred(r, &a100, &[], &[], 0), Ok(vec![]));
    }

    #[test]
    fn combinations_enumerate() {
        let mut c = vec![0, 1];
        let mut n = 1;
        while next_combination(&mut c, 4) {
            n += 1;
        }
        assert_eq!(n, binomial(4, 2));
    }
}
