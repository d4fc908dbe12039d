//! Benchmark of the admission webhook.
//!
//! 1. Direct over TLS: the real router and rustls server on 127.0.0.1, HTTP/1.1 keep-alive
//!    clients posting a GPU pod review; requests per second and p50/p99 latency at 1, 16 and 64
//!    concurrent connections.
//! 2. Through the apiserver (with `--kubeconfig`, e.g. from `scripts/local-cluster up`): pods
//!    created per second in a namespace the webhook mutates versus one it does not, alternating
//!    rounds in the same run.
//!
//!     cargo run --release -p gpu-pilot-webhook --example bench -- [--seconds 5] [--kubeconfig PATH --pods 200]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use gpu_pilot_webhook::certs::{CertSettings, new_ca, new_serving_cert};
use gpu_pilot_webhook::handler::StaticView;
use gpu_pilot_webhook::metrics::Metrics;
use gpu_pilot_webhook::server::{self, AppState, Limits, tls_config};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Seconds per concurrency level.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// A running cluster to measure pod creation through.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// Pods per round through the apiserver.
    #[arg(long, default_value_t = 200)]
    pods: usize,
    /// Concurrent pod creations through the apiserver.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
}

fn review_body() -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE", "namespace": "ml", "name": "trainer",
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "trainer", "namespace": "ml", "annotations": {"gpupilot.io/gpu-memory": "20Gi"}},
                    "spec": {"containers": [{"name": "cuda", "image": "nvcr.io/nvidia/cuda:12.4.0-base",
                        "resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "4", "memory": "16Gi"}}}]}
                }
            }
        }))
        .unwrap(),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn client_loop(
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    until: Instant,
    body: Bytes,
) -> anyhow::Result<Vec<Duration>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let mut lat = Vec::new();
    while Instant::now() < until {
        let req = hyper::Request::post("/mutate/pods")
            .header("content-type", "application/json")
            .header("host", "127.0.0.1")
            .body(Full::new(body.clone()))?;
        let start = Instant::now();
        let resp = sender.send_request(req).await?;
        anyhow::ensure!(resp.status() == 200, "HTTP {}", resp.status());
        let bytes = resp.into_body().collect().await?.to_bytes();
        lat.push(start.elapsed());
        anyhow::ensure!(
            bytes.windows(9).any(|w| w == b"JSONPatch"),
            "no patch in the answer"
        );
    }
    Ok(lat)
}

async fn direct(seconds: u64) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let ca = new_ca(now, Duration::from_secs(86400))?;
    let (cert, key, _) = new_serving_cert(
        &ca,
        &["127.0.0.1".to_string()],
        now,
        Duration::from_secs(3600),
    )?;
    let nodes: Vec<k8s_openapi::api::core::v1::Node> = vec![serde_json::from_value(json!({
        "metadata": {"name": "a"},
        "status": {"capacity": {"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "2"}}
    }))?];
    let view = StaticView {
        policy: Some(serde_json::from_value(
            json!({"metadata": {"name": "cp"}, "spec": {"mig": {"strategy": "mixed"}}}),
        )?),
        inventory: gpu_pilot_webhook::inventory::MigInventory::from_nodes(&nodes),
        facts: Default::default(),
    };
    let state = Arc::new(AppState {
        view: Arc::new(view),
        metrics: Arc::new(Metrics::default()),
        ready: Arc::new(AtomicBool::new(true)),
    });
    let app = server::router(state, Limits::default());
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(tls_config(
        cert.as_bytes(),
        key.as_bytes(),
    )?);
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move { server::serve("127.0.0.1:0".parse().unwrap(), tls, app, h).await });
    let addr = handle
        .listening()
        .await
        .context("the server did not start")?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes())?)?;
    let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let body = review_body();

    println!(
        "direct over TLS (rustls, HTTP/1.1 keep-alive), POST /mutate/pods with a gpu-memory pod, {seconds}s per level:"
    );
    println!(
        "{:>12} {:>10} {:>10} {:>10} {:>10}",
        "connections", "requests", "req/s", "p50", "p99"
    );
    for conns in [1usize, 16, 64] {
        let until = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let tasks: Vec<_> = (0..conns)
            .map(|_| tokio::spawn(client_loop(addr, connector.clone(), until, body.clone())))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let elapsed = started.elapsed().as_secs_f64();
        all.sort();
        println!(
            "{:>12} {:>10} {:>10.0} {:>10.3?} {:>10.3?}",
            conns,
            all.len(),
            all.len() as f64 / elapsed,
            percentile(&all, 0.50),
            percentile(&all, 0.99)
        );
    }
    handle.shutdown();
    Ok(())
}

async fn through_apiserver(
    kubeconfig: &std::path::Path,
    pods: usize,
    parallel: usize,
) -> anyhow::Result<()> {
    use gpu_pilot_webhook::manifests::{Registration, Target};
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
    use kube::{Api, Client};

    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let client = Client::try_from(config)?;
    let id = format!("bench-{}", std::process::id());
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "clusterpolicies.gpupilot.io",
        &PatchParams::apply("gpu-pilot-bench").force(),
        &Patch::Apply(gpu_pilot_api::crd()),
    )
    .await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let (with_ns, without_ns) = (format!("{id}-with"), format!("{id}-without"));
    for ns in [&with_ns, &without_ns] {
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
            )
            .await?;
    }
    // Wait until the namespaces' default service accounts exist (pods need them).
    for ns in [&with_ns, &without_ns] {
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(client.clone(), ns);
        for _ in 0..100 {
            if sas.get_opt("default").await?.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let policies: Api<gpu_pilot_api::ClusterPolicy> = Api::all(client.clone());
    let label = "gpupilot.io/bench";
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
                "metadata": {"name": id, "labels": {(label): id}}, "spec": {}
            }))?,
        )
        .await?;
    let rc: k8s_openapi::api::node::v1::RuntimeClass =
        serde_json::from_value(json!({"metadata": {"name": "nvidia-bench"}, "handler": "nvidia"}))?;
    let _ = Api::<k8s_openapi::api::node::v1::RuntimeClass>::all(client.clone())
        .create(&PostParams::default(), &rc)
        .await;
    policies
        .patch(
            &id,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"operator": {"runtimeClass": "nvidia-bench"}}})),
        )
        .await?;

    let opts = gpu_pilot_webhook::Options {
        listen: "127.0.0.1:0".parse()?,
        scope: gpu_pilot_webhook::cluster::Scope {
            namespace: with_ns.clone(),
            policy_selector: format!("{label}={id}"),
            node_selector: format!("{label}={id}"),
            pod_namespaces: vec![with_ns.clone()],
        },
        certs: gpu_pilot_webhook::CertSource::Secret(CertSettings {
            namespace: with_ns.clone(),
            secret: "bench-tls".into(),
            names: vec!["127.0.0.1".into()],
            ca_validity: Duration::from_secs(86400),
            ca_renew_before: Duration::from_secs(3600),
            ca_overlap: Duration::from_secs(60),
            cert_validity: Duration::from_secs(7200),
            cert_renew_before: Duration::from_secs(600),
            mutating_config: Some(id.clone()),
            validating_config: None,
        }),
        limits: Limits::default(),
        check_interval: Duration::from_secs(60),
        startup_timeout: Duration::from_secs(60),
    };
    let running = gpu_pilot_webhook::Running::start(client.clone(), opts).await?;
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &with_ns)
        .get("bench-tls")
        .await?;
    let mut reg = Registration::in_cluster(&with_ns);
    reg.name = id.clone();
    reg.target = Target::Url(format!("https://{}", running.addr));
    // Only the "with" namespace, which is also where the webhook keeps its Secret: do not exclude it.
    reg.excluded_namespaces = Vec::new();
    reg.namespace_match =
        vec![json!({"key": "kubernetes.io/metadata.name", "operator": "In", "values": [with_ns]})];
    reg.ca_bundle = Some(secret.data.unwrap()["ca-bundle.crt"].0.clone());
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    mwcs.create(&PostParams::default(), &reg.mutating()).await?;
    // Wait until the apiserver calls the webhook.
    let probe_api: Api<Pod> = Api::namespaced(client.clone(), &with_ns);
    let probe: Pod = serde_json::from_value(
        json!({"metadata": {"name": "probe"}, "spec": {"containers": [{"name": "c", "image": "i", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}),
    )?;
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe_api
        .create(&dry, &probe)
        .await?
        .spec
        .and_then(|s| s.runtime_class_name)
        .is_none()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the apiserver did not start calling the webhook within 30s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let pod = |name: String| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeSelector": {"gpupilot.io/bench": "nowhere"}, "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
        }))
        .unwrap()
    };
    async fn round(
        api: Api<Pod>,
        make: impl Fn(String) -> Pod,
        prefix: &str,
        n: usize,
        parallel: usize,
    ) -> anyhow::Result<f64> {
        use futures::StreamExt;
        let start = Instant::now();
        let results: Vec<anyhow::Result<Pod>> = futures::stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                let p = make(format!("{prefix}-{i}"));
                async move { Ok(api.create(&PostParams::default(), &p).await?) }
            })
            .buffer_unordered(parallel)
            .collect()
            .await;
        for r in results {
            r?;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }
    println!(
        "\nthrough the apiserver: {pods} GPU pods per round, {parallel} in flight, alternating rounds:"
    );
    let mut with = Vec::new();
    let mut without = Vec::new();
    for r in 0..5 {
        let a = round(
            Api::namespaced(client.clone(), &without_ns),
            pod,
            &format!("r{r}"),
            pods,
            parallel,
        )
        .await?;
        let b = round(
            Api::namespaced(client.clone(), &with_ns),
            pod,
            &format!("r{r}"),
            pods,
            parallel,
        )
        .await?;
        println!("  round {r}: without webhook {a:.1} pods/s, with webhook {b:.1} pods/s");
        without.push(a);
        with.push(b);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mutated = running
        .metrics
        .requests("mutate_pods", gpu_pilot_webhook::metrics::Outcome::Patched);
    println!(
        "  mean: without {:.1} pods/s, with {:.1} pods/s, ratio {:.3} (webhook patched {mutated} pods)",
        mean(&without),
        mean(&with),
        mean(&with) / mean(&without)
    );
    running.stop().await;
    let _ = mwcs.delete(&id, &DeleteParams::default()).await;
    let _ = policies.delete(&id, &DeleteParams::default()).await;
    for ns in [&with_ns, &without_ns] {
        let _ = namespaces.delete(ns, &DeleteParams::background()).await;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        direct(args.seconds).await?;
        if let Some(kc) = &args.kubeconfig {
            through_apiserver(kc, args.pods, args.parallel).await?;
        }
        Ok(())
    })
}
