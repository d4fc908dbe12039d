//! Every gRPC handler of the device plugin over arbitrary requests: an answer or an error
//! status, never a panic, and never a device this node does not offer (`PROPTEST_CASES`
//! overrides the 400 cases). Then a table of bad requests, each with the code and the sentence
//! the kubelet logs.

use std::sync::Arc;

use proptest::prelude::*;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::{Code, Request};

use super::*;
use crate::health::HealthRules;
use crate::inventory::{Inventory, built_in};
use crate::plugin::config::PluginConfig;

const TIME_SLICED: &str = "version: v1\nsharing:\n  timeSlicing:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 4}\n";

/// A server for `resource` answering from `inventory` under `config`.
fn service(inventory: &str, config: &str, resource: &str) -> (Service, Snapshot) {
    let inv = Inventory::from_yaml(built_in(inventory).expect("a built-in inventory"))
        .expect("it parses");
    let cfg = PluginConfig::parse(config, "test").expect("a valid config");
    let resources = resources::plan(&inv, &cfg, &HealthRules::default()).expect("a plan");
    let snap = Snapshot {
        inventory: Arc::new(Some(inv)),
        resources: Arc::new(resources),
    };
    let (_, snapshot) = watch::channel(snap.clone());
    let (_, listing) = watch::channel(DeviceListing {
        envvar: true,
        cdi: true,
    });
    let svc = Service {
        resource: resource.into(),
        snapshot,
        listing,
    };
    (svc, snap)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn known_ids(snap: &Snapshot) -> Vec<String> {
    snap.resources
        .iter()
        .flat_map(|r| r.devices.iter().map(|d| d.id.clone()))
        .collect()
}

/// IDs the node offers, stale ones, and junk.
fn ids(known: Vec<String>) -> impl Strategy<Value = Vec<String>> {
    let one = prop_oneof![
        4 => proptest::sample::select(known),
        1 => "GPU-[0-9a-f]{8}-[0-9a-f-]{0,27}",
        1 => "MIG-GPU-[0-9a-f-]{0,12}/[0-9]/[0-9]",
        1 => ".{0,24}",
        1 => Just(String::new()),
    ];
    proptest::collection::vec(one, 0..12)
}

fn size() -> impl Strategy<Value = i32> {
    prop_oneof![
        -2i32..10,
        Just(i32::MAX),
        Just(i32::MAX - 1),
        Just(i32::MIN),
        any::<i32>(),
    ]
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The servers the properties run against: whole GPUs with NVLinks and NUMA, time-sliced
/// replicas, and a resource this node no longer offers.
fn servers() -> Vec<(Service, Snapshot)> {
    vec![
        service("dgx-h100", "version: v1\n", "nvidia.com/gpu"),
        service("a100-40gb", "version: v1\n", "nvidia.com/gpu"),
        service("t4", TIME_SLICED, "nvidia.com/gpu"),
        service("t4", "version: v1\n", "nvidia.com/mig-1g.5gb"),
    ]
}

fn assert_error(s: &Status) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(s.code(), Code::InvalidArgument | Code::Unavailable),
        "unexpected code {:?}: {}",
        s.code(),
        s.message()
    );
    prop_assert!(!s.message().is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn get_preferred_allocation_answers_within_the_request_or_refuses(
        pick in 0usize..4,
        reqs in proptest::collection::vec((ids(known_ids(&servers()[0].1)), ids(known_ids(&servers()[2].1)), size()), 0..4),
    ) {
        let (svc, snap) = servers().swap_remove(pick);
        let known = known_ids(&snap);
        let request = api::PreferredAllocationRequest {
            container_requests: reqs
                .iter()
                .map(|(a, m, n)| api::ContainerPreferredAllocationRequest {
                    available_device_i_ds: a.clone(),
                    must_include_device_i_ds: m.clone(),
                    allocation_size: *n,
                })
                .collect(),
        };
        match runtime().block_on(svc.get_preferred_allocation(Request::new(request))) {
            Ok(resp) => {
                let resp = resp.into_inner();
                prop_assert_eq!(resp.container_responses.len(), reqs.len());
                for (c, (avail, must, n)) in resp.container_responses.iter().zip(&reqs) {
                    let mut seen = std::collections::BTreeSet::new();
                    for id in &c.device_i_ds {
                        prop_assert!(known.contains(id), "{id} is not offered");
                        prop_assert!(avail.contains(id) || must.contains(id), "{id} was not offered to it");
                        prop_assert!(seen.insert(id), "{id} twice");
                    }
                    prop_assert!(c.device_i_ds.len() <= usize::try_from(*n).unwrap_or(0));
                }
            }
            Err(s) => assert_error(&s)?,
        }
    }

    #[test]
    fn allocate_hands_out_only_offered_devices_or_refuses(
        pick in 0usize..4,
        reqs in proptest::collection::vec(ids(known_ids(&servers()[0].1)), 0..4),
    ) {
        let (svc, snap) = servers().swap_remove(pick);
        let uuids: Vec<String> = snap
            .resources
            .iter()
            .flat_map(|r| r.devices.iter().map(|d| d.uuid.clone()))
            .collect();
        let request = api::AllocateRequest {
            container_requests: reqs
                .iter()
                .map(|ids| api::ContainerAllocateRequest { devices_ids: ids.clone() })
                .collect(),
        };
        match runtime().block_on(svc.allocate(Request::new(request))) {
            Ok(resp) => {
                let resp = resp.into_inner();
                prop_assert_eq!(resp.container_responses.len(), reqs.len());
                for c in &resp.container_responses {
                    let visible = c.envs.get(resources::VISIBLE_DEVICES).cloned().unwrap_or_default();
                    for u in visible.split(',').filter(|u| !u.is_empty()) {
                        prop_assert!(uuids.iter().any(|k| k == u), "{u} is not a device of this node");
                    }
                    prop_assert_eq!(c.cdi_devices.len(), visible.split(',').filter(|u| !u.is_empty()).count());
                }
            }
            Err(s) => assert_error(&s)?,
        }
    }

    #[test]
    fn options_list_and_watch_and_pre_start_always_answer(pick in 0usize..4, ids in ids(known_ids(&servers()[0].1))) {
        let (svc, snap) = servers().swap_remove(pick);
        let rt = runtime();
        let opts = rt.block_on(svc.get_device_plugin_options(Request::new(api::Empty {}))).unwrap().into_inner();
        prop_assert!(opts.get_preferred_allocation_available && !opts.pre_start_required);
        let pre = rt.block_on(svc.pre_start_container(Request::new(api::PreStartContainerRequest { devices_ids: ids })));
        prop_assert!(pre.is_ok());
        let mut stream = rt.block_on(svc.list_and_watch(Request::new(api::Empty {}))).unwrap().into_inner();
        let first = rt.block_on(stream.next()).expect("a first device list").unwrap();
        prop_assert_eq!(first.devices, devices_of(&snap, &svc.resource));
    }
}

/// Bad requests, each with the status the kubelet gets and the words it logs.
#[test]
fn bad_grpc_requests_get_a_clear_error() {
    let (gpu, snap) = service("a100-40gb", "version: v1\n", "nvidia.com/gpu");
    let (sliced, _) = service("t4", TIME_SLICED, "nvidia.com/gpu");
    let (gone, _) = service("t4", "version: v1\n", "nvidia.com/mig-3g.20gb");
    let id = |i: usize| snap.resources[0].devices[i].id.clone();
    let prefer = |avail: Vec<String>, must: Vec<String>, n: i32| api::PreferredAllocationRequest {
        container_requests: vec![api::ContainerPreferredAllocationRequest {
            available_device_i_ds: avail,
            must_include_device_i_ds: must,
            allocation_size: n,
        }],
    };
    let alloc = |ids: Vec<String>| api::AllocateRequest {
        container_requests: vec![api::ContainerAllocateRequest { devices_ids: ids }],
    };
    let rt = runtime();
    type Case<'a> = (&'a str, Result<(), Status>, Code, &'a str);
    let p = |svc: &Service, r| {
        rt.block_on(svc.get_preferred_allocation(Request::new(r)))
            .map(drop)
    };
    let a = |svc: &Service, r| rt.block_on(svc.allocate(Request::new(r))).map(drop);
    let cases: Vec<Case> = vec![
        (
            "preferred: negative size",
            p(&gpu, prefer(vec![id(0)], vec![], -1)),
            Code::InvalidArgument,
            "is negative",
        ),
        (
            "preferred: i32::MIN size",
            p(&gpu, prefer(vec![id(0)], vec![], i32::MIN)),
            Code::InvalidArgument,
            "is negative",
        ),
        (
            "preferred: unknown must-include",
            p(&gpu, prefer(vec![id(0)], vec!["GPU-gone".into()], 1)),
            Code::InvalidArgument,
            "GPU-gone, which resource nvidia.com/gpu does not offer",
        ),
        (
            "preferred: empty must-include ID",
            p(&gpu, prefer(vec![], vec![String::new()], 1)),
            Code::InvalidArgument,
            "does not offer",
        ),
        (
            "preferred: resource no longer offered",
            p(&gone, prefer(vec![], vec![], 1)),
            Code::Unavailable,
            "no longer offered by this node",
        ),
        (
            "allocate: unknown ID",
            a(&gpu, alloc(vec!["GPU-nope".into()])),
            Code::InvalidArgument,
            "unknown device ID(s) GPU-nope",
        ),
        (
            "allocate: empty ID",
            a(&gpu, alloc(vec![String::new()])),
            Code::InvalidArgument,
            "unknown device ID(s)",
        ),
        (
            "allocate: one good, one stale",
            a(&gpu, alloc(vec![id(0), "GPU-stale".into()])),
            Code::InvalidArgument,
            "GPU-stale",
        ),
        (
            "allocate: a MIG UUID for whole GPUs",
            a(&gpu, alloc(vec!["MIG-0b1c/1/0".into()])),
            Code::InvalidArgument,
            "MIG-0b1c/1/0",
        ),
        (
            "allocate: replica index past the replicas",
            a(
                &sliced,
                alloc(vec![format!("{}::9", snap.resources[0].devices[0].uuid)]),
            ),
            Code::InvalidArgument,
            "unknown device ID(s)",
        ),
        (
            "allocate: resource no longer offered",
            a(&gone, alloc(vec![id(0)])),
            Code::Unavailable,
            "no longer offered by this node",
        ),
    ];
    let total = cases.len();
    for (what, got, code, words) in cases {
        let s = got.expect_err(what);
        assert_eq!(s.code(), code, "{what}: {}", s.message());
        assert!(s.message().contains(words), "{what}: {}", s.message());
    }
    println!("{total} bad gRPC requests refused with a clear error");
    assert!(total >= 11);
}
