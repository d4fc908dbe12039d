//! Scenarios that change cluster-wide state (node labels, the one active ClusterPolicy, the CRD)
//! run one at a time on a control plane of their own (20 GPU nodes, 5 CPU nodes), each from a
//! clean slate and with an operand namespace of its own. Used by the controller, plugin, helm,
//! doctor and fault tests alike.

use std::sync::{Arc, Mutex};

use kube::Client;

use crate::controller::reset_cluster;
use crate::{Cluster, OwnedNamespace, ensure_crd};

/// Fake GPU and CPU nodes of the serial scenarios' cluster.
pub const GPU: usize = 20;
pub const CPU: usize = 5;

static CLUSTER: Mutex<Option<Arc<Cluster>>> = Mutex::new(None);
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static NEXT_NS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

fn cluster() -> anyhow::Result<Arc<Cluster>> {
    let mut c = CLUSTER.lock().unwrap();
    if c.is_none() {
        *c = Some(Arc::new(Cluster::start_named(
            "controller",
            GPU,
            CPU,
            false,
        )?));
    }
    Ok(c.as_ref().unwrap().clone())
}

/// Stops the serial scenarios' cluster (called once all tests ran).
pub fn shutdown() {
    CLUSTER.lock().unwrap().take();
}

/// What a serial scenario gets.
pub struct Env {
    pub cluster: Arc<Cluster>,
    pub client: Client,
    /// The operand namespace of this scenario.
    pub ns: String,
}

/// Runs `f` alone on the serial cluster, from a clean slate, with an operand namespace of its
/// own that is deleted afterwards whatever `f` did (returned an error, or panicked).
pub async fn serial<F, Fut>(f: F) -> anyhow::Result<()>
where
    F: FnOnce(Env) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let _turn = SERIAL.lock().await;
    let cluster = tokio::task::spawn_blocking(cluster).await??;
    let client = cluster.client().await?;
    reset_cluster(&client).await?;
    // An operand namespace of its own: nothing left from an earlier scenario can count.
    let name = format!(
        "gpu-pilot-{}",
        NEXT_NS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let ns = OwnedNamespace::create(&cluster, &client, &name, &[]).await?;
    ensure_crd(&client).await?;
    let result = f(Env {
        cluster,
        client,
        ns: name,
    })
    .await;
    drop(ns);
    result
}
