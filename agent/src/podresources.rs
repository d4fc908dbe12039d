//! Which pod uses which GPU, from the kubelet's pod-resources API (v1, `List`), so metrics can carry
//! dcgm-exporter's `pod`, `namespace` and `container` labels.
//!
//! The mapping is pure ([`owners_by_gpu`]): a device ID the kubelet reports is a GPU UUID, a MIG
//! device UUID, or either with a time-slicing suffix `::<n>`; each is traced back to the physical
//! GPU (by index) it lives on. The client ([`PodResources`]) is the thin edge: one `List` per
//! scrape over the kubelet's unix socket, reconnecting after errors. A missing socket is a state,
//! not a failure: metrics go out without pod labels, one line is logged, the next scrape retries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::inventory::Inventory;

/// Rust types for the kubelet pod-resources API v1, generated at build time from the vendored
/// `proto/podresources/v1/api.proto` (see `build.rs`).
#[allow(clippy::all, missing_docs)]
pub mod api {
    tonic::include_proto!("v1");
}

/// Where the kubelet serves the pod-resources API.
pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// How long one `List` may take before the scrape goes out without pod labels.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// One container that was given (part of) a GPU.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerRef {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

/// GPU index -> the containers using it (whole, through a MIG device, or through a replica).
pub type GpuOwners = BTreeMap<u32, BTreeSet<ContainerRef>>;

/// Traces every device the kubelet handed to a container back to a GPU of this node. IDs that
/// are not this node's GPUs or MIG devices (other device plugins' resources) are ignored.
pub fn owners_by_gpu(resp: &api::ListPodResourcesResponse, inv: &Inventory) -> GpuOwners {
    let mut gpu_of: HashMap<&str, u32> = HashMap::new();
    for g in &inv.gpus {
        gpu_of.insert(g.uuid.as_str(), g.index);
        for m in &g.mig_devices {
            gpu_of.insert(m.uuid.as_str(), g.index);
        }
    }
    let mut owners = GpuOwners::new();
    for pod in &resp.pod_resources {
        for c in &pod.containers {
            for dev in &c.devices {
                for id in &dev.device_ids {
                    // A time-sliced replica is `<uuid>::<n>` (NVIDIA's device plugin spelling).
                    let base = id.split_once("::").map_or(id.as_str(), |(b, _)| b);
                    if let Some(&index) = gpu_of.get(base) {
                        owners.entry(index).or_default().insert(ContainerRef {
                            namespace: pod.namespace.clone(),
                            pod: pod.name.clone(),
                            container: c.name.clone(),
                        });
                    }
                }
            }
        }
    }
    owners
}

#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    #[error(
        "the kubelet's pod-resources socket {0} does not exist, so metrics carry no pod, namespace \
         or container labels (retrying on every scrape). In a pod, mount the host's \
         /var/lib/kubelet/pod-resources; elsewhere point --pod-resources-socket at the kubelet's \
         socket, or set it to `off`"
    )]
    Missing(String),
    #[error(
        "connecting to the kubelet's pod-resources socket {socket}: {message}; metrics carry no pod \
         labels until it answers (retrying on every scrape)"
    )]
    Connect { socket: String, message: String },
    #[error(
        "the kubelet's pod-resources List on {socket} failed: {message}; metrics carry no pod labels \
         until it answers (retrying on every scrape)"
    )]
    List { socket: String, message: String },
}

/// The client edge, with the state that keeps logging to one line per change.
pub struct PodResources {
    socket: PathBuf,
    channel: Option<Channel>,
    /// `true` while the last call worked, `false` after a failure was logged, `None` at start.
    healthy: Option<bool>,
}

impl PodResources {
    pub fn new(socket: PathBuf) -> PodResources {
        PodResources {
            socket,
            channel: None,
            healthy: None,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Who uses which GPU now; empty (after one log line) while the kubelet does not answer.
    pub async fn owners(&mut self, inv: &Inventory) -> GpuOwners {
        match self.list().await {
            Ok(resp) => {
                if self.healthy != Some(true) {
                    tracing::info!(
                        "pod attribution of metrics from the kubelet's pod-resources API at {}",
                        self.socket.display()
                    );
                }
                self.healthy = Some(true);
                owners_by_gpu(&resp, inv)
            }
            Err(e) => {
                if self.healthy != Some(false) {
                    tracing::warn!("{e}");
                }
                self.healthy = Some(false);
                // A kubelet restart re-creates the socket: connect afresh next time.
                self.channel = None;
                GpuOwners::new()
            }
        }
    }

    /// One `List` call.
    pub async fn list(&mut self) -> Result<api::ListPodResourcesResponse, PodResourcesError> {
        let socket = self.socket.display().to_string();
        if !self.socket.exists() {
            return Err(PodResourcesError::Missing(socket));
        }
        let channel = match &self.channel {
            Some(c) => c.clone(),
            None => {
                let path = self.socket.clone();
                let c = Endpoint::try_from("http://kubelet.local")
                    .expect("static URI")
                    .connect_timeout(CALL_TIMEOUT)
                    .timeout(CALL_TIMEOUT)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let p = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?))
                        }
                    }))
                    .await
                    .map_err(|e| PodResourcesError::Connect {
                        socket: socket.clone(),
                        message: error_chain(&e),
                    })?;
                self.channel = Some(c.clone());
                c
            }
        };
        api::pod_resources_lister_client::PodResourcesListerClient::new(channel)
            .list(api::ListPodResourcesRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| PodResourcesError::List {
                socket,
                message: e.to_string(),
            })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{MigDevice, built_in};

    fn container(name: &str, resource: &str, ids: &[&str]) -> api::ContainerResources {
        api::ContainerResources {
            name: name.into(),
            devices: vec![api::ContainerDevices {
                resource_name: resource.into(),
                device_ids: ids.iter().map(|s| s.to_string()).collect(),
                topology: None,
            }],
            ..Default::default()
        }
    }

    fn pod(ns: &str, name: &str, containers: Vec<api::ContainerResources>) -> api::PodResources {
        api::PodResources {
            name: name.into(),
            namespace: ns.into(),
            containers,
            ..Default::default()
        }
    }

    fn who(owners: &GpuOwners, gpu: u32) -> Vec<String> {
        owners
            .get(&gpu)
            .map(|s| {
                s.iter()
                    .map(|c| format!("{}/{}/{}", c.namespace, c.pod, c.container))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn traces_whole_gpus_replicas_and_mig_devices_to_their_gpu() {
        let mut inv = Inventory::from_yaml(built_in("a100-40gb").unwrap()).unwrap();
        inv.gpus[3].mig_enabled = true;
        inv.gpus[3].mig_devices = vec![
            MigDevice {
                uuid: "MIG-aaaa".into(),
                profile: "3g.20gb".into(),
            },
            MigDevice {
                uuid: "MIG-bbbb".into(),
                profile: "3g.20gb".into(),
            },
        ];
        let u: Vec<String> = inv.gpus.iter().map(|g| g.uuid.clone()).collect();
        let resp = api::ListPodResourcesResponse {
            pod_resources: vec![
                pod(
                    "ml",
                    "train",
                    vec![
                        container("main", "nvidia.com/gpu", &[&u[0]]),
                        container("sidecar", "example.com/nic", &["nic-0"]),
                    ],
                ),
                pod(
                    "ml",
                    "shared",
                    vec![container(
                        "a",
                        "nvidia.com/gpu.shared",
                        &[&format!("{}::0", u[1]), &format!("{}::3", u[1])],
                    )],
                ),
                pod(
                    "web",
                    "infer",
                    vec![container(
                        "srv",
                        "nvidia.com/gpu.shared",
                        &[&format!("{}::1", u[1])],
                    )],
                ),
                pod(
                    "web",
                    "mig",
                    vec![container("m", "nvidia.com/mig-3g.20gb", &["MIG-bbbb::2"])],
                ),
                pod("web", "no-gpu", vec![container("x", "cpu", &[])]),
            ],
        };
        let owners = owners_by_gpu(&resp, &inv);
        assert_eq!(who(&owners, 0), vec!["ml/train/main"]);
        // Two replicas in one container count once; another pod on the same GPU is listed too.
        assert_eq!(who(&owners, 1), vec!["ml/shared/a", "web/infer/srv"]);
        assert!(who(&owners, 2).is_empty());
        assert_eq!(who(&owners, 3), vec!["web/mig/m"]);
        assert_eq!(
            owners.len(),
            3,
            "the NIC and the CPU-only pod map to no GPU"
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_clear_state_and_no_owners() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("kubelet.sock");
        let mut pr = PodResources::new(sock.clone());
        let e = pr.list().await.unwrap_err().to_string();
        assert!(e.contains(&sock.display().to_string()), "{e}");
        assert!(e.contains("--pod-resources-socket"), "{e}");
        let inv = Inventory::from_yaml(built_in("t4").unwrap()).unwrap();
        assert!(pr.owners(&inv).await.is_empty());
        assert_eq!(pr.healthy, Some(false));
    }
}
