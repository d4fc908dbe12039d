//! Runs gpu-pilot's controller inside the test process, on a runtime of its own, so tests can
//! stop it gracefully or kill it mid-flight (dropping its runtime, as SIGKILL would: no Lease
//! release, no last pass).

use std::net::SocketAddr;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{Component, annotation, label};
use gpu_pilot_controller::run::{Options, run};
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use tokio::sync::oneshot;

pub struct RunningController {
    pub identity: String,
    pub metrics: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A free loopback port for a controller's /metrics.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RunningController {
    pub fn start(
        kubeconfig: &Path,
        namespace: &str,
        identity: &str,
        leader_elect: bool,
    ) -> RunningController {
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let opts = Options {
            kubeconfig: Some(kubeconfig.to_path_buf()),
            context: None,
            namespace: namespace.into(),
            metrics_addr: metrics,
            leader_elect,
            identity: identity.into(),
            lease_duration: std::time::Duration::from_secs(4),
            resync: Duration::from_secs(10),
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let name = identity.to_string();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime for the controller");
            rt.block_on(async move {
                tokio::select! {
                    r = run(opts, async { let _ = stop_rx.await; }) => {
                        if let Err(e) = r {
                            eprintln!("controller {name} failed: {e:#}");
                        }
                    }
                    _ = kill_rx => {}
                }
            });
            // Dropping the runtime cancels every task the controller spawned mid-await.
            rt.shutdown_background();
        });
        RunningController {
            identity: identity.into(),
            metrics,
            stop: Some(stop_tx),
            kill: Some(kill_tx),
            thread: Some(thread),
        }
    }

    /// Graceful stop, as on SIGTERM.
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Abrupt stop, as on SIGKILL.
    pub fn kill(mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Reads one metric of the controller's /metrics with prometheus-parse, summed over the series
    /// whose labels match `filter` (`kind="node"`, or empty for all).
    pub async fn metric(&self, name: &str, filter: &str) -> anyhow::Result<f64> {
        let body = http_get(self.metrics, "/metrics").await?;
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))?;
        let wanted = filter
            .split_once('=')
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()));
        Ok(scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| {
                wanted
                    .as_ref()
                    .is_none_or(|(k, v)| s.labels.get(k) == Some(v.as_str()))
            })
            .filter_map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
            .sum())
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A minimal HTTP/1.1 GET over loopback (the metrics endpoint is plain HTTP on 127.0.0.1).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Puts the cluster back as `scripts/local-cluster up` left it: no ClusterPolicy (finalizers
/// dropped), and none of gpu-pilot's labels or annotations on nodes.
pub async fn reset_cluster(client: &Client) -> anyhow::Result<()> {
    // Webhook configurations an install left behind would send later requests to a dead URL.
    use k8s_openapi::api::admissionregistration::v1::{
        MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
    };
    let name = gpu_pilot_api::names::webhook::NAME;
    let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
    let _ = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
    let policies: Api<ClusterPolicy> = Api::all(client.clone());
    // Before the CRD is installed there is nothing to list.
    let existing = policies
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    for p in existing {
        let _ = policies
            .patch(
                &p.name_any(),
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
            )
            .await;
        let _ = policies
            .delete(&p.name_any(), &DeleteParams::default())
            .await;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    for n in nodes.list(&ListParams::default()).await? {
        let mut labels = serde_json::Map::new();
        for k in n.labels().keys() {
            let ours =
                k.starts_with(label::DEPLOY_PREFIX) || k == label::STAGE || k == label::GPU_PRESENT;
            if ours {
                labels.insert(k.clone(), serde_json::Value::Null);
            }
        }
        let mut annotations = serde_json::Map::new();
        for k in n.annotations().keys() {
            if k == annotation::STAGE_REASON || k == annotation::GPU_PRESENT_SOURCE {
                annotations.insert(k.clone(), serde_json::Value::Null);
            }
        }
        if !labels.is_empty() || !annotations.is_empty() {
            nodes
                .patch(&n.name_any(), &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {"labels": labels, "annotations": annotations}})))
                .await?;
        }
    }
    Ok(())
}

/// Installs the controller's RBAC in `namespace` and writes a kubeconfig that authenticates as
/// its ServiceAccount (a bound token), so a test runs the controller with exactly its rights.
pub fn restricted_kubeconfig(
    cluster: &crate::Cluster,
    namespace: &str,
) -> anyhow::Result<std::path::PathBuf> {
    use std::io::Write;
    let rbac = gpu_pilot_core::render::controller_rbac::yaml(namespace);
    let mut apply = cluster
        .kubectl()
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    apply.stdin.take().unwrap().write_all(rbac.as_bytes())?;
    anyhow::ensure!(
        apply.wait()?.success(),
        "kubectl apply of the controller's RBAC failed"
    );
    let out = cluster
        .kubectl()
        .args([
            "create",
            "token",
            gpu_pilot_core::render::controller_rbac::SERVICE_ACCOUNT,
            "-n",
            namespace,
            "--duration=1h",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "kubectl create token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(cluster.kubeconfig())?)?;
    let cluster_entry = admin["clusters"][0]["cluster"].clone();
    let kc = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": serde_json::to_value(cluster_entry)?}],
        "users": [{"name": "controller", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "controller"}}],
        "current-context": "c",
    });
    let path = std::env::temp_dir().join(format!(
        "gpu-pilot-e2e-controller-{namespace}-{}.kubeconfig",
        std::process::id()
    ));
    std::fs::write(&path, serde_yaml::to_string(&kc)?)?;
    Ok(path)
}

/// Every gate label of every component.
pub fn gate_labels() -> Vec<String> {
    Component::ALL.into_iter().map(label::deploy_gate).collect()
}
