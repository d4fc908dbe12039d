//! The device plugin at run time: one gRPC server per resource on a unix socket, registered with
//! the kubelet, and registered again whenever the kubelet's socket is re-created (a kubelet
//! restart wipes the plugin sockets, so the servers are re-created too).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

use super::api::{self, device_plugin_server::DevicePlugin};
use super::resources::{self, Resource};
use crate::inventory::Inventory;

/// What the servers answer from: the latest inventory and the resources planned from it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub inventory: Arc<Option<Inventory>>,
    pub resources: Arc<Vec<Resource>>,
}

impl Snapshot {
    fn resource(&self, name: &str) -> Option<&Resource> {
        self.resources.iter().find(|r| r.name == name)
    }
}

/// How containers are told about devices.
#[derive(Debug, Clone, Copy)]
pub struct DeviceListing {
    pub envvar: bool,
    pub cdi: bool,
}

struct Service {
    resource: String,
    snapshot: watch::Receiver<Snapshot>,
    listing: watch::Receiver<DeviceListing>,
}

fn devices_of(s: &Snapshot, name: &str) -> Vec<api::Device> {
    s.resource(name)
        .map(|r| {
            r.devices
                .iter()
                .map(|d| api::Device {
                    id: d.id.clone(),
                    health: if d.healthy {
                        api::HEALTHY
                    } else {
                        api::UNHEALTHY
                    }
                    .into(),
                    topology: d.numa_node.map(|n| api::TopologyInfo {
                        nodes: vec![api::NumaNode { id: n }],
                    }),
                })
                .collect()
        })
        .unwrap_or_default()
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<api::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for Service {
    async fn get_device_plugin_options(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<api::DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        // The current devices first, then again whenever they change (a device turning
        // unhealthy, or healthy again when its XIDs clear).
        let name = self.resource.clone();
        let mut last = None;
        let stream: DeviceStream = Box::pin(WatchStream::new(self.snapshot.clone()).filter_map(
            move |snap| {
                let devices = devices_of(&snap, &name);
                (last.as_ref() != Some(&devices)).then(|| {
                    last = Some(devices.clone());
                    Ok(api::ListAndWatchResponse { devices })
                })
            },
        ));
        Ok(Response::new(stream))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<api::PreferredAllocationRequest>,
    ) -> Result<Response<api::PreferredAllocationResponse>, Status> {
        let snap = self.snapshot.borrow().clone();
        let res = snap
            .resource(&self.resource)
            .ok_or_else(|| gone(&self.resource))?;
        let inv = snap
            .inventory
            .as_ref()
            .as_ref()
            .ok_or_else(|| gone(&self.resource))?;
        let container_responses = req
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| {
                resources::preferred(
                    res,
                    inv,
                    &c.available_device_i_ds,
                    &c.must_include_device_i_ds,
                    c.allocation_size,
                )
                .map(|device_i_ds| api::ContainerPreferredAllocationResponse { device_i_ds })
                .map_err(|e| Status::invalid_argument(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Response::new(api::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        req: Request<api::AllocateRequest>,
    ) -> Result<Response<api::AllocateResponse>, Status> {
        let snap = self.snapshot.borrow().clone();
        let listing = *self.listing.borrow();
        let res = snap
            .resource(&self.resource)
            .ok_or_else(|| gone(&self.resource))?;
        let mut container_responses = Vec::new();
        for c in req.into_inner().container_requests {
            let a = resources::allocate(res, &c.devices_ids, listing.envvar, listing.cdi)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            container_responses.push(api::ContainerAllocateResponse {
                envs: a.envs.into_iter().collect(),
                cdi_devices: a
                    .cdi_devices
                    .into_iter()
                    .map(|name| api::CdiDevice { name })
                    .collect(),
                ..Default::default()
            });
        }
        Ok(Response::new(api::AllocateResponse {
            container_responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<api::PreStartContainerRequest>,
    ) -> Result<Response<api::PreStartContainerResponse>, Status> {
        Ok(Response::new(api::PreStartContainerResponse {}))
    }
}

fn gone(resource: &str) -> Status {
    Status::unavailable(format!(
        "resource {resource} is no longer offered by this node (its GPUs or MIG layout changed); \
         the kubelet will see the new device list shortly"
    ))
}

fn options() -> api::DevicePluginOptions {
    api::DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

/// The socket file name for a resource: `gpu-pilot-nvidia.com_mig-1g.10gb.sock`.
pub fn socket_name(resource: &str) -> String {
    format!("gpu-pilot-{}.sock", resource.replace('/', "_"))
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(
        "listening on {path}: {source}. Check that the directory exists and is writable (it is the kubelet's device-plugins directory, usually mounted from the host)"
    )]
    Listen {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "connecting to the kubelet at {path}: {message}. Is the kubelet running, and is its device-plugins directory mounted into this pod?"
    )]
    Connect { path: String, message: String },
    #[error("the kubelet refused to register {resource}: {message}")]
    Register { resource: String, message: String },
}

struct Running {
    shutdown: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the gRPC server for one resource on `dir/socket_name(resource)`.
async fn serve(
    dir: &Path,
    resource: &str,
    snapshot: watch::Receiver<Snapshot>,
    listing: watch::Receiver<DeviceListing>,
) -> Result<Running, PluginError> {
    let path = dir.join(socket_name(resource));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| PluginError::Listen {
        path: path.display().to_string(),
        source,
    })?;
    let svc = Service {
        resource: resource.to_string(),
        snapshot,
        listing,
    };
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let result = Server::builder()
            .add_service(api::device_plugin_server::DevicePluginServer::new(svc))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("device plugin server stopped: {e}");
        }
    });
    Ok(Running { shutdown: tx, task })
}

async fn register(kubelet: &Path, resource: &str) -> Result<(), PluginError> {
    let path = kubelet.to_path_buf();
    let channel = Endpoint::try_from("http://kubelet.local")
        .expect("static URI")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
        .map_err(|e| PluginError::Connect {
            path: kubelet.display().to_string(),
            message: format!("{e}"),
        })?;
    let mut client = api::registration_client::RegistrationClient::new(channel);
    client
        .register(api::RegisterRequest {
            version: api::VERSION.into(),
            endpoint: socket_name(resource),
            resource_name: resource.into(),
            options: Some(options()),
        })
        .await
        .map_err(|s| PluginError::Register {
            resource: resource.into(),
            message: s.message().to_string(),
        })?;
    Ok(())
}

/// Identity of the kubelet's socket: a new inode means the kubelet (re)started.
fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino()))
}

/// Keeps one registered server per planned resource, for as long as `snapshot` has senders.
pub async fn run(
    dir: PathBuf,
    mut snapshot: watch::Receiver<Snapshot>,
    listing: watch::Receiver<DeviceListing>,
    check_every: Duration,
) {
    let kubelet = dir.join(api::KUBELET_SOCKET);
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let mut registered_with: Option<(u64, u64)> = None;
    loop {
        let wanted: Vec<String> = snapshot
            .borrow()
            .resources
            .iter()
            .map(|r| r.name.clone())
            .collect();
        let kubelet_now = socket_identity(&kubelet);
        let sockets_ok = running.keys().all(|r| dir.join(socket_name(r)).exists());
        let same = running.keys().eq(wanted.iter()) && kubelet_now == registered_with && sockets_ok;
        if !same {
            for (_, r) in std::mem::take(&mut running) {
                let _ = r.shutdown.send(());
                let _ = r.task.await;
            }
            registered_with = None;
            if kubelet_now.is_some() {
                let mut all_ok = true;
                for name in &wanted {
                    match serve(&dir, name, snapshot.clone(), listing.clone()).await {
                        Ok(r) => {
                            running.insert(name.clone(), r);
                        }
                        Err(e) => {
                            tracing::error!("{e}");
                            all_ok = false;
                            continue;
                        }
                    }
                    match register(&kubelet, name).await {
                        Ok(()) => tracing::info!("registered {name} with the kubelet"),
                        Err(e) => {
                            tracing::error!("{e}; retrying");
                            all_ok = false;
                        }
                    }
                }
                if all_ok {
                    registered_with = kubelet_now;
                }
            } else {
                tracing::info!(
                    "waiting for the kubelet socket {} to appear",
                    kubelet.display()
                );
            }
        }
        tokio::select! {
            changed = snapshot.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep(check_every) => {}
        }
    }
    for (_, r) in running {
        let _ = r.shutdown.send(());
        let _ = r.task.await;
    }
}

#[cfg(test)]
mod tests;
