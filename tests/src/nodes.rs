//! Fake nodes made and removed by a test (e.g. a node with a fault for the doctor to find).

use gpu_pilot_api::names::{label, resource};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// Creates a kwok GPU node with one `nvidia.com/gpu`, marked by NFD as carrying an NVIDIA GPU.
pub async fn add_fault_node(c: &Client, name: &str) -> anyhow::Result<()> {
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {(label::NFD_PCI_10DE): "true", "type": "kwok", "kubernetes.io/os": "linux"}
        },
        "status": {
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110", (resource::GPU): "1"},
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110", (resource::GPU): "1"}
        }
    }))?;
    Api::<Node>::all(c.clone())
        .create(&PostParams::default(), &node)
        .await?;
    Ok(())
}

/// Deletes a node and, at once, the pods bound to it.
pub async fn delete_node(c: &Client, name: &str) -> anyhow::Result<()> {
    let _ = Api::<Node>::all(c.clone())
        .delete(name, &DeleteParams::default())
        .await;
    // Its pods are orphans now: remove them rather than wait for the pod garbage collector.
    let pods: Api<Pod> = Api::all(c.clone());
    let lp = ListParams::default().fields(&format!("spec.nodeName={name}"));
    for p in pods.list(&lp).await?.items {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        let _ = Api::<Pod>::namespaced(c.clone(), &ns)
            .delete(
                p.metadata.name.as_deref().unwrap_or_default(),
                &DeleteParams::default().grace_period(0),
            )
            .await;
    }
    Ok(())
}
