//! Wiring: client, watches, leader election, the health server and graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use gpu_pilot_api::ClusterPolicy;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::{Notify, watch};

use gpu_pilot_core::index::Index;
use gpu_pilot_core::render::managed_selector;

use crate::fence::Fence;
use crate::metrics::{self, Metrics};
use crate::reconcile::{self, Context};
use crate::watch::{SharedIndex, run_watch};

/// The leader-election Lease in the operand namespace.
pub const LEASE: &str = "gpu-pilot-controller";

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub namespace: String,
    pub metrics_addr: SocketAddr,
    pub leader_elect: bool,
    pub identity: String,
    /// How long a leader's Lease lasts without renewal (whole seconds, at least one).
    pub lease_duration: Duration,
    pub resync: Duration,
}

/// A client from `kubeconfig` (and `context`), or the in-cluster configuration.
pub async fn client(
    kubeconfig: Option<&std::path::Path>,
    context: Option<String>,
) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("could not read the kubeconfig {}", path.display()))?;
            let o = kube::config::KubeConfigOptions {
                context,
                ..Default::default()
            };
            Config::from_custom_kubeconfig(kc, &o).await?
        }
        None => Config::infer().await.context(
            "no cluster configuration found: run in a pod, set KUBECONFIG, or pass --kubeconfig",
        )?,
    };
    Ok(Client::try_from(config)?)
}

/// Runs until `shutdown` completes (SIGTERM/SIGINT in the binary), then stops cleanly: the last
/// pass finishes, the Lease is released so another replica takes over at once.
pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = client(opts.kubeconfig.as_deref(), opts.context.clone()).await?;
    // Say clearly when the CRD is missing or RBAC forbids reading policies, and wait for it
    // (an install applies the CRD and the controller at the same time).
    loop {
        match Api::<ClusterPolicy>::all(client.clone())
            .list(&kube::api::ListParams::default().limit(1))
            .await
        {
            Ok(_) => break,
            Err(e) => tracing::error!(
                error = %e,
                "cannot list ClusterPolicies: is the CRD installed (gpu-pilot-controller crd | kubectl apply --server-side -f -) and may this identity read them? Retrying in 5s"
            ),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }

    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for /healthz and /metrics; pick another --metrics-addr",
                opts.metrics_addr
            )
        })?;
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let server = {
        let mut rx = shutdown_rx.clone();
        let app = metrics::router(metrics.clone());
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.changed().await;
                })
                .await
        })
    };

    let index: SharedIndex = Arc::new(parking_lot::Mutex::new(Index::default()));
    let wake = Arc::new(Notify::new());
    let selector = managed_selector();
    let ns = opts.namespace.clone();
    // The watches and the reconcile loop must run for ever; one that ends (or panics) fails
    // /healthz and stops the process, so the pod restarts instead of serving a stale view.
    let watches = vec![
        tokio::spawn(run_watch(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            index.clone(),
            wake.clone(),
        )),
        tokio::spawn(run_watch(
            Api::<Pod>::namespaced(client.clone(), &ns),
            watcher::Config::default().labels(&selector),
            index.clone(),
            wake.clone(),
        )),
        tokio::spawn(run_watch(
            Api::<DaemonSet>::namespaced(client.clone(), &ns),
            watcher::Config::default().labels(&selector),
            index.clone(),
            wake.clone(),
        )),
        tokio::spawn(run_watch(
            Api::<ClusterPolicy>::all(client.clone()),
            watcher::Config::default(),
            index.clone(),
            wake.clone(),
        )),
    ];
    let mut tasks = Vec::new();
    {
        let index = index.clone();
        let metrics = metrics.clone();
        tasks.push(tokio::spawn(async move {
            while !index.lock().is_synced() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            metrics.ready.store(true, Ordering::Relaxed);
        }));
    }

    let lease_secs = opts.lease_duration.as_secs().max(1);
    let grace = lease_secs.div_ceil(3).max(1);
    let (leader_rx, lease_task, fence) = if opts.leader_elect {
        label_lease(&client, &ns).await?;
        let manager = LeaseManagerBuilder::new(client.clone(), LEASE)
            .with_namespace(&ns)
            .with_identity(&opts.identity)
            .with_duration(lease_secs)
            .with_grace(grace)
            .build()
            .await
            .with_context(|| format!("cannot set up leader election on the Lease {LEASE}"))?;
        let (rx, handle) = manager.watch().await;
        let (fence, fence_task) = Fence::leased(
            client.clone(),
            &ns,
            LEASE,
            opts.identity.clone(),
            Duration::from_secs(grace),
            rx.clone(),
        );
        tasks.push(fence_task);
        (rx, Some(handle), fence)
    } else {
        let (tx, rx) = watch::channel(true);
        std::mem::forget(tx);
        (rx, None, Fence::always_open())
    };
    // The leader gauge follows the fence: 1 only while this replica may write (kube-lease-manager
    // alone keeps saying "leader" while it cannot reach the apiserver).
    {
        let mut rx = fence.subscribe();
        let metrics = metrics.clone();
        let identity = opts.identity.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let is = *rx.borrow_and_update();
                metrics.set_leader(is);
                tracing::info!(identity = %identity, leader = is, "leadership");
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }));
    }

    let reporter = Reporter {
        controller: "gpu-pilot-controller".into(),
        instance: Some(opts.identity.clone()),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        ns,
        index,
        metrics.clone(),
        Recorder::new(client, reporter),
        fence,
    ));
    // The loop goes round at least every resync (and after each pass); give it a pass's time
    // limit and the longest retry wait on top before calling it stuck.
    metrics
        .health
        .set_stale_after(opts.resync + ctx.pass_timeout + Duration::from_secs(60));
    let mut reconciler = tokio::spawn(reconcile::run(ctx, wake, shutdown_rx, opts.resync));

    let mut watches = futures::future::select_all(watches);
    let ended = tokio::select! {
        _ = shutdown => None,
        r = &mut reconciler => Some(format!("the reconcile loop ended: {}", task_end(r))),
        (r, i, _) = &mut watches => {
            let kind = ["Node", "Pod", "DaemonSet", "ClusterPolicy"].get(i).copied().unwrap_or("a");
            Some(format!("the {kind} watch ended: {}", task_end(r)))
        }
    };
    if let Some(why) = &ended {
        tracing::error!("{why}; stopping so the pod restarts");
        metrics.health.task_ended(why.clone());
    } else {
        tracing::info!("shutting down");
    }
    let _ = shutdown_tx.send(true);
    if ended.is_none() {
        let _ = reconciler.await;
    }
    for w in watches.into_inner() {
        w.abort();
    }
    for t in tasks {
        t.abort();
    }
    drop(leader_rx);
    // Dropping the watch receiver ends the lease task, which releases the Lease so another
    // replica takes over at once instead of after it expires.
    if let Some(handle) = lease_task {
        match tokio::time::timeout(Duration::from_secs(5), handle).await {
            Ok(Ok(Ok(manager))) => {
                if let Err(e) = manager.release().await {
                    tracing::warn!(error = %e, "could not release the Lease");
                }
            }
            _ => tracing::warn!("the lease task did not stop in time"),
        }
    }
    let _ = server.await;
    match ended {
        Some(why) => anyhow::bail!("{why}"),
        None => Ok(()),
    }
}

/// How a task that should never end ended.
fn task_end(r: Result<(), tokio::task::JoinError>) -> String {
    match r {
        Ok(()) => "it returned".into(),
        Err(e) if e.is_panic() => "it panicked".into(),
        Err(e) => e.to_string(),
    }
}

/// Creates the leader-election Lease with gpu-pilot's labels, or labels the one that exists, so
/// `kubectl gpu uninstall` finds it by label like everything else gpu-pilot makes.
async fn label_lease(client: &Client, ns: &str) -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Patch, PatchParams, PostParams};
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    let labels = gpu_pilot_core::render::common_labels("controller");
    let patch = serde_json::json!({"metadata": {"labels": labels}});
    match api
        .patch(LEASE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let lease: Lease = serde_json::from_value(
                serde_json::json!({"metadata": {"name": LEASE, "labels": labels}, "spec": {}}),
            )?;
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(()),
                // Another replica made it first; it labelled it the same way.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                Err(e) => Err(e).with_context(|| format!("cannot create the Lease {ns}/{LEASE}")),
            }
        }
        Err(e) => Err(e).with_context(|| format!("cannot label the Lease {ns}/{LEASE}")),
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
