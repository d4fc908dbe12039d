//! `/metrics` in Prometheus text format with dcgm-exporter's metric names and labels, so existing
//! Grafana boards work. Rendering is a pure function of the inventory and of who uses which GPU
//! (the kubelet's pod-resources API, asked once per scrape); the HTTP part is tiny.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::{Mutex, watch};

use crate::inventory::{Gpu, Inventory};
use crate::podresources::{GpuOwners, PodResources};

type Field = (&'static str, &'static str, &'static str, fn(&Gpu) -> String);

/// dcgm-exporter's field names, their type and help, and how to read them from a GPU.
const FIELDS: [Field; 11] = [
    (
        "DCGM_FI_DEV_GPU_UTIL",
        "gauge",
        "GPU utilization (in %).",
        |g| g.telemetry.gpu_util.to_string(),
    ),
    (
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "gauge",
        "Memory utilization (in %).",
        |g| g.telemetry.mem_copy_util.to_string(),
    ),
    (
        "DCGM_FI_DEV_FB_USED",
        "gauge",
        "Framebuffer memory used (in MiB).",
        |g| g.telemetry.fb_used_mib.to_string(),
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "gauge",
        "Framebuffer memory free (in MiB).",
        |g| {
            g.model
                .memory_mib
                .saturating_sub(g.telemetry.fb_used_mib)
                .to_string()
        },
    ),
    (
        "DCGM_FI_DEV_GPU_TEMP",
        "gauge",
        "GPU temperature (in C).",
        |g| g.telemetry.temperature_c.to_string(),
    ),
    (
        "DCGM_FI_DEV_POWER_USAGE",
        "gauge",
        "Power draw (in W).",
        |g| format!("{:.3}", g.telemetry.power_w),
    ),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        "Total energy consumption since boot (in mJ).",
        |g| g.telemetry.energy_milli_joules.to_string(),
    ),
    (
        "DCGM_FI_DEV_SM_CLOCK",
        "gauge",
        "SM clock frequency (in MHz).",
        |g| g.telemetry.sm_clock_mhz.to_string(),
    ),
    (
        "DCGM_FI_DEV_MEM_CLOCK",
        "gauge",
        "Memory clock frequency (in MHz).",
        |g| g.telemetry.mem_clock_mhz.to_string(),
    ),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "gauge",
        "Value of the last XID error encountered.",
        |g| g.xids.last().copied().unwrap_or(0).to_string(),
    ),
    (
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "counter",
        "Total number of PCIe retries.",
        |g| g.telemetry.pcie_replays.to_string(),
    ),
];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text for one scrape. A GPU that containers use gets one series per container,
/// labelled with dcgm-exporter's `container`, `namespace` and `pod` (as dcgm-exporter does for
/// shared GPUs); a GPU nobody uses gets one series without them.
pub fn render(inv: &Inventory, hostname: &str, owners: &GpuOwners) -> String {
    let mut out = String::new();
    let no_owner = [None];
    for (name, kind, help, read) in FIELDS {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for g in &inv.gpus {
            let value = read(g);
            let base = format!(
                "gpu=\"{}\",UUID=\"{}\",pci_bus_id=\"{}\",device=\"nvidia{}\",modelName=\"{}\",Hostname=\"{}\",DCGM_FI_DRIVER_VERSION=\"{}\"",
                g.index,
                escape(&g.uuid),
                escape(&g.pci_bus_id),
                g.index,
                escape(&g.model.product),
                escape(hostname),
                escape(&inv.driver_version),
            );
            let users: Vec<_> = match owners.get(&g.index) {
                Some(set) if !set.is_empty() => set.iter().map(Some).collect(),
                _ => no_owner.to_vec(),
            };
            for user in users {
                match user {
                    Some(c) => {
                        let _ = writeln!(
                            out,
                            "{name}{{{base},container=\"{}\",namespace=\"{}\",pod=\"{}\"}} {value}",
                            escape(&c.container),
                            escape(&c.namespace),
                            escape(&c.pod),
                        );
                    }
                    None => {
                        let _ = writeln!(out, "{name}{{{base}}} {value}");
                    }
                }
            }
        }
    }
    out
}

#[derive(Clone)]
struct MetricsState {
    inventory: watch::Receiver<Option<Arc<Inventory>>>,
    hostname: Arc<str>,
    /// `None` when pod attribution is off.
    pods: Option<Arc<Mutex<PodResources>>>,
}

async fn metrics(State(s): State<MetricsState>) -> impl IntoResponse {
    let inv = s.inventory.borrow().clone();
    let body = match inv {
        Some(inv) => {
            let owners = match &s.pods {
                Some(p) => p.lock().await.owners(&inv).await,
                None => GpuOwners::new(),
            };
            render(&inv, &s.hostname, &owners)
        }
        None => String::new(),
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// The `/metrics` router; `pod_resources` is the kubelet's pod-resources socket (`None`: no pod
/// labels).
pub fn router(
    inventory: watch::Receiver<Option<Arc<Inventory>>>,
    hostname: &str,
    pod_resources: Option<std::path::PathBuf>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(MetricsState {
            inventory,
            hostname: hostname.into(),
            pods: pod_resources.map(|p| Arc::new(Mutex::new(PodResources::new(p)))),
        })
}

/// Serves `/metrics` until the process ends.
pub async fn serve(
    addr: SocketAddr,
    inventory: watch::Receiver<Option<Arc<Inventory>>>,
    hostname: String,
    pod_resources: Option<std::path::PathBuf>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("binding the metrics port {addr}: {e}; pick another with --metrics-addr"),
        )
    })?;
    // The bound address (the port when --metrics-addr asked for :0), for people and tests.
    tracing::info!(
        "serving metrics on http://{}/metrics",
        listener.local_addr()?
    );
    axum::serve(listener, router(inventory, &hostname, pod_resources)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::built_in;

    #[test]
    fn renders_every_gpu_with_dcgm_names_and_labels() {
        let inv = Inventory::from_yaml(built_in("dgx-h100").unwrap()).unwrap();
        let text = render(&inv, "node-a", &GpuOwners::new());
        let util: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("DCGM_FI_DEV_GPU_UTIL{"))
            .collect();
        assert_eq!(util.len(), 8);
        assert!(
            util[0].contains("modelName=\"NVIDIA H100 80GB HBM3\""),
            "{}",
            util[0]
        );
        assert!(util[0].contains("Hostname=\"node-a\""));
        assert!(text.contains("# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter"));
        assert!(
            !text.contains("pod=\""),
            "no pod labels without pod-resources"
        );
    }

    #[test]
    fn a_gpu_in_use_gets_one_series_per_container_with_pod_labels() {
        use crate::podresources::ContainerRef;
        let inv = Inventory::from_yaml(built_in("a100-40gb").unwrap()).unwrap();
        let c = |ns: &str, pod: &str, ctr: &str| ContainerRef {
            namespace: ns.into(),
            pod: pod.into(),
            container: ctr.into(),
        };
        let owners = GpuOwners::from([
            (1, [c("ml", "train", "main")].into()),
            (2, [c("a", "p", "x"), c("b", "q", "y")].into()),
        ]);
        let text = render(&inv, "node-c", &owners);
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        let util: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "DCGM_FI_DEV_GPU_UTIL")
            .collect();
        assert_eq!(util.len(), 5, "GPUs 0 and 3 once, GPU 1 once, GPU 2 twice");
        let of = |gpu: &str| -> Vec<(Option<&str>, Option<&str>, Option<&str>)> {
            util.iter()
                .filter(|s| s.labels.get("gpu") == Some(gpu))
                .map(|s| {
                    (
                        s.labels.get("namespace"),
                        s.labels.get("pod"),
                        s.labels.get("container"),
                    )
                })
                .collect()
        };
        assert_eq!(of("0"), vec![(None, None, None)]);
        assert_eq!(of("1"), vec![(Some("ml"), Some("train"), Some("main"))]);
        assert_eq!(
            of("2"),
            vec![
                (Some("a"), Some("p"), Some("x")),
                (Some("b"), Some("q"), Some("y"))
            ]
        );
    }

    #[tokio::test]
    async fn metrics_endpoint_parses_as_prometheus_text() {
        use axum::body::Body;
        use axum::http::Request;
        use tower::ServiceExt;

        let inv = Inventory::from_yaml(built_in("a100-40gb").unwrap()).unwrap();
        let (_tx, rx) = watch::channel(Some(Arc::new(inv)));
        let resp = router(rx, "node-b", None)
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        for (name, _, _, _) in FIELDS {
            let samples: Vec<_> = scrape.samples.iter().filter(|s| s.metric == name).collect();
            assert_eq!(samples.len(), 4, "{name}");
            assert_eq!(
                samples[0].labels.get("modelName"),
                Some("NVIDIA A100-SXM4-40GB")
            );
            assert!(samples[0].labels.get("UUID").unwrap().starts_with("GPU-"));
        }
        let fb_free = scrape
            .samples
            .iter()
            .find(|s| s.metric == "DCGM_FI_DEV_FB_FREE" && s.labels.get("gpu") == Some("0"))
            .unwrap();
        assert!(matches!(fb_free.value, prometheus_parse::Value::Gauge(v) if v == 40960.0 - 512.0));
    }
}
