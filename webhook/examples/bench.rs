//! Benchmark of the admission webhook.
//!
//! 1. Direct over TLS: the real router and rustls server on 127.0.0.1, HTTP/1.1 keep-alive
//!    clients posting a GPU pod review; requests per second and p50/p99 latency at 1, 16 and 64
//!    concurrent connections.
//! 2. Through the apiserver (with `--kubeconfig`, e.g. from `scripts/local-cluster up`): pods
//!    created per second in a namespace the webhook mutates versus one it does not, and versus
//!    the already-mutated pod in that namespace, alternating rounds in the same run, with the CPU
//!    the apiserver and this process spent per pod and the time the apiserver spent calling the
//!    webhook (its own metrics).
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
        policy: Some(Arc::new(serde_json::from_value(
            json!({"metadata": {"name": "cp"}, "spec": {"mig": {"strategy": "mixed"}}}),
        )?)),
        inventory: gpu_pilot_webhook::inventory::MigInventory::from_nodes(&nodes),
        facts: Default::default(),
    };
    let state = Arc::new(AppState {
        view: Arc::new(view),
        metrics: Arc::new(Metrics::default()),
        ready: Arc::new(AtomicBool::new(true)),
    });
    let app = server::router(state.clone(), Limits::default());
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
        "{:>12} {:>10} {:>10} {:>10} {:>10} {:>14}",
        "connections", "requests", "req/s", "p50", "p99", "CPU/request"
    );
    for conns in [1usize, 16, 64] {
        let until = Instant::now() + Duration::from_secs(seconds);
        let started = Instant::now();
        let cpu_before = process_cpu_seconds();
        let tasks: Vec<_> = (0..conns)
            .map(|_| tokio::spawn(client_loop(addr, connector.clone(), until, body.clone())))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let elapsed = started.elapsed().as_secs_f64();
        all.sort();
        let cpu_us = (process_cpu_seconds() - cpu_before) * 1e6 / all.len().max(1) as f64;
        println!(
            "{:>12} {:>10} {:>10.0} {:>10.3?} {:>10.3?} {:>11.1} us",
            conns,
            all.len(),
            all.len() as f64 / elapsed,
            percentile(&all, 0.50),
            percentile(&all, 0.99),
            cpu_us
        );
    }
    println!(
        "CPU/request is this whole process (client and server, user and system time) per request; the machine's other load shows in p99, not in it."
    );
    let (handler_sum, handler_count) = handler_time(&state.metrics.render());
    println!(
        "the handler itself (body read to answer built): mean {:.1} us over {} reviews",
        handler_sum / (handler_count.max(1) as f64) * 1e6,
        handler_count
    );
    handle.shutdown();
    Ok(())
}

async fn through_apiserver(
    kubeconfig: &std::path::Path,
    pods: usize,
    parallel: usize,
) -> anyhow::Result<()> {
    use gpu_pilot_core::render::webhook::{Registration, Target};
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

    // Scheduling gates keep the pods out of the scheduler, whose retries of unschedulable pods
    // would otherwise load the apiserver in the background, more with every round.
    let plain = |name: String| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"schedulingGates": [{"name": "gpupilot.io/bench"}],
                     "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
        }))
        .unwrap()
    };
    // The pod as the webhook leaves it: the same object stored, without the call.
    let premutated = |name: String| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"schedulingGates": [{"name": "gpupilot.io/bench"}],
                     "runtimeClassName": "nvidia-bench",
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}
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
        "\nthrough the apiserver: {pods} GPU pods per round, {parallel} in flight, rounds alternating:\n  \
         A  plain pod, namespace the webhook is not registered for\n  \
         B  plain pod, namespace the webhook mutates (runtimeClassName, toleration)\n  \
         C  the pod B stores, sent pre-mutated to A's namespace (same stored object, no webhook call)\n  \
         D  that pre-mutated pod in B's namespace (the webhook is called and answers without a patch)\n\
         apiserver CPU from its process_cpu_seconds_total; bench CPU is this process (client and webhook)"
    );
    println!(
        "{:>6} {:>4} {:>8} {:>14} {:>14} {:>14} {:>14}",
        "round", "", "pods/s", "apiserver ms", "bench ms", "webhook calls", "apiserver sees"
    );
    println!(
        "{:>6} {:>4} {:>8} {:>14} {:>14} {:>14} {:>14}",
        "", "", "", "CPU/pod", "CPU/pod", "", "webhook mean"
    );
    let mut rates: [Vec<f64>; 4] = Default::default();
    let mut apiserver_cpu: [f64; 4] = [0.0; 4];
    let mut bench_cpu: [f64; 4] = [0.0; 4];
    let calls = || running.metrics.total("mutate_pods");
    for r in 0..5 {
        for (k, label) in ["A", "B", "C", "D"].iter().enumerate() {
            let (ns, make): (&str, &dyn Fn(String) -> Pod) = match k {
                0 => (&without_ns, &plain),
                1 => (&with_ns, &plain),
                2 => (&without_ns, &premutated),
                _ => (&with_ns, &premutated),
            };
            let (api_before, seen_before) = apiserver_facts(&client).await?;
            let (cpu_before, calls_before) = (process_cpu_seconds(), calls());
            let rate = round(
                Api::namespaced(client.clone(), ns),
                make,
                &format!("r{r}{}", label.to_lowercase()),
                pods,
                parallel,
            )
            .await?;
            let (cpu_after, calls_after) = (process_cpu_seconds(), calls());
            let (api_after, seen_after) = apiserver_facts(&client).await?;
            let n_calls = calls_after - calls_before;
            let want = if k % 2 == 1 { pods as u64 } else { 0 };
            anyhow::ensure!(
                n_calls == want,
                "round {r}{label}: the webhook answered {n_calls} reviews, expected {want}"
            );
            let api_ms = (api_after - api_before) * 1000.0 / pods as f64;
            let bench_ms = (cpu_after - cpu_before) * 1000.0 / pods as f64;
            let seen = if seen_after.1 > seen_before.1 {
                format!(
                    "{:.2} ms",
                    (seen_after.0 - seen_before.0) * 1000.0 / (seen_after.1 - seen_before.1)
                )
            } else {
                "-".into()
            };
            println!(
                "{:>6} {label:>4} {rate:>8.1} {api_ms:>14.2} {bench_ms:>14.2} {n_calls:>14} {seen:>14}",
                r
            );
            rates[k].push(rate);
            apiserver_cpu[k] += api_ms / 5.0;
            bench_cpu[k] += bench_ms / 5.0;
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (a, b, c, d) = (
        mean(&rates[0]),
        mean(&rates[1]),
        mean(&rates[2]),
        mean(&rates[3]),
    );
    println!(
        "  mean pods/s: A {a:.1}, B {b:.1}, C {c:.1}, D {d:.1}; ratio B/A {:.3} (with vs without the webhook), B/C {:.3} (same stored pod), D/C {:.3} (a call that changes nothing)",
        b / a,
        b / c,
        d / c
    );
    println!(
        "  mean CPU per pod: apiserver A {:.2} ms, B {:.2} ms, C {:.2} ms, D {:.2} ms; bench process A {:.2} ms, B {:.2} ms, C {:.2} ms, D {:.2} ms",
        apiserver_cpu[0],
        apiserver_cpu[1],
        apiserver_cpu[2],
        apiserver_cpu[3],
        bench_cpu[0],
        bench_cpu[1],
        bench_cpu[2],
        bench_cpu[3]
    );
    let (handler_sum, handler_count) = handler_time(&running.metrics.render());
    println!(
        "  the webhook's own handler time: mean {:.1} us over {} reviews",
        handler_sum / (handler_count.max(1) as f64) * 1e6,
        handler_count
    );
    running.stop().await;
    let _ = mwcs.delete(&id, &DeleteParams::default()).await;
    let _ = policies.delete(&id, &DeleteParams::default()).await;
    for ns in [&with_ns, &without_ns] {
        let _ = namespaces.delete(ns, &DeleteParams::background()).await;
    }
    Ok(())
}

/// CPU time (user + system) of this process so far, in seconds.
fn process_cpu_seconds() -> f64 {
    // Fields 14 and 15 of /proc/self/stat, in clock ticks (100 per second on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// From the apiserver's own /metrics: its CPU seconds, and the sum and count of the time it spent
/// calling the pod webhook.
async fn apiserver_facts(client: &kube::Client) -> anyhow::Result<(f64, (f64, f64))> {
    let req = axum::http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    let mut cpu = 0.0;
    let (mut sum, mut count) = (0.0, 0.0);
    for line in text.lines() {
        if line.starts_with("process_cpu_seconds_total ") {
            cpu = value(line).unwrap_or(0.0);
        } else if line.contains("name=\"pods.gpupilot.io\"")
            && line.contains("operation=\"CREATE\"")
        {
            if line.starts_with("apiserver_admission_webhook_admission_duration_seconds_sum") {
                sum += value(line).unwrap_or(0.0);
            } else if line
                .starts_with("apiserver_admission_webhook_admission_duration_seconds_count")
            {
                count += value(line).unwrap_or(0.0);
            }
        }
    }
    Ok((cpu, (sum, count)))
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

/// Seconds the webhook spent in its pod handler and how many reviews, from a /metrics scrape.
fn handler_time(metrics: &str) -> (f64, u64) {
    let scrape =
        prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string()))).unwrap();
    scrape
        .samples
        .iter()
        .find_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets)
                if s.metric == "gpupilot_webhook_request_duration_seconds"
                    && s.labels.get("endpoint") == Some("mutate_pods") =>
            {
                let count = buckets.last().map_or(0.0, |b| b.count) as u64;
                let sum = scrape
                    .samples
                    .iter()
                    .find(|x| x.metric == "gpupilot_webhook_request_duration_seconds_sum")
                    .and_then(|x| match x.value {
                        prometheus_parse::Value::Untyped(v)
                        | prometheus_parse::Value::Counter(v) => Some(v),
                        _ => None,
                    })
                    .unwrap_or(0.0);
                Some((sum, count))
            }
            _ => None,
        })
        .unwrap_or((0.0, 0))
}
