//! Benchmark of the admission webhook.
//!
//! 1. Direct over TLS: the real router and rustls server on 127.0.0.1, HTTP/1.1 keep-alive
//!    clients posting a GPU pod review; requests per second and p50/p99 latency at 1, 4 and 16
//!    concurrent connections (16: the server's limit per peer address).
//! 2. Through the apiserver (with `--kubeconfig`, e.g. from `scripts/local-cluster up`): pods
//!    created per second in a namespace the webhook mutates versus one it does not, and versus
//!    the already-mutated pod in that namespace, alternating rounds in the same run, with the CPU
//!    the apiserver and this process spent per pod and the time the apiserver spent calling the
//!    webhook (its own metrics).
//!
//!    With `--admission-policy`, a third namespace gets the simple part of the mutation
//!    (runtimeClassName and the GPU toleration) from a MutatingAdmissionPolicy instead: CEL run
//!    inside the apiserver, no webhook call (round M).
//! 3. The handler alone: one thread answering reviews in a loop, CPU per review (no TLS, no HTTP).
//!
//!     cargo run --release -p gpu-pilot-webhook --example bench -- [--seconds 5] [--kubeconfig PATH --pods 200 --rounds 5 --admission-policy]
//!
//! `scripts/bench-admission` runs it on a cluster of its own and reports the figures.

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
use serde_json::{Value, json};

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
    /// Rounds through the apiserver (each round runs every kind once, in turn).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Also measure the simple part of the mutation done by a MutatingAdmissionPolicy (round M, and P: the same without its parameter).
    #[arg(long)]
    admission_policy: bool,
    /// Only these kinds through the apiserver (letters of A, B, C, D, M, P), e.g. to profile one.
    #[arg(long, default_value = "ABCDMP")]
    kinds: String,
    /// Reviews the handler answers in the single-thread CPU measurement.
    #[arg(long, default_value_t = 20000)]
    handler_reviews: usize,
}

/// A review of a GPU pod being created; `gpu_memory` adds the annotation that asks for a MIG
/// profile by memory (the webhook's costliest path), without it the pod needs only the simple part
/// (runtime class and toleration).
fn review_body(gpu_memory: bool) -> Bytes {
    let annotations = if gpu_memory {
        json!({"gpupilot.io/gpu-memory": "20Gi"})
    } else {
        json!({})
    };
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
                    "metadata": {"name": "trainer", "namespace": "ml", "annotations": annotations},
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

/// The most connections measured: the webhook's default limit on connections from one address
/// (what one apiserver may hold open).
const PER_PEER: usize = 16;

async fn direct(seconds: u64, handler_reviews: usize) -> anyhow::Result<()> {
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
    // The default limits, but for connections from one address: the server counts a connection
    // until its task ends, a moment after the client closed it, so one level's connections would
    // otherwise still count against the next level's (by design; not what is measured here).
    let limits = Limits {
        max_connections: 4 * PER_PEER,
        max_connections_per_peer: 4 * PER_PEER,
        ..Limits::default()
    };
    let app = server::router(state.clone(), limits);
    let tls = server::TlsCell::new(tls_config(cert.as_bytes(), key.as_bytes())?);
    let (addr, handle) =
        gpu_pilot_webhook::listener::spawn_local(tls, app, limits, state.metrics.clone())
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
    let body = review_body(true);

    // The handler alone, on this thread: parse, decide, answer; no TLS, no HTTP, no other task.
    println!(
        "the handler alone, one thread, {handler_reviews} reviews each (bytes in to JSON answer out; CPU of this thread per review):"
    );
    for (what, body) in [
        ("GPU pod (runtime class, toleration)", review_body(false)),
        (
            "gpu-memory pod (MIG profile chosen, resources renamed)",
            review_body(true),
        ),
    ] {
        let cpu_before = thread_cpu_seconds();
        let started = Instant::now();
        for _ in 0..handler_reviews {
            let (out, _) = gpu_pilot_webhook::handler::handle(
                state.view.as_ref(),
                gpu_pilot_webhook::handler::Endpoint::MutatePods,
                &body,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            // As the server does: the answer goes out as JSON.
            std::hint::black_box(serde_json::to_vec(&out)?);
        }
        let cpu = thread_cpu_seconds() - cpu_before;
        println!(
            "  {what:<56} {:>7.1} us CPU, {:>7.1} us wall per review",
            cpu * 1e6 / handler_reviews as f64,
            started.elapsed().as_secs_f64() * 1e6 / handler_reviews as f64
        );
    }

    let per_peer = PER_PEER;
    println!(
        "direct over TLS (rustls, HTTP/1.1 keep-alive), POST /mutate/pods with a gpu-memory pod, {seconds}s per level, up to {per_peer} connections (--max-connections-per-peer):"
    );
    println!(
        "{:>12} {:>10} {:>10} {:>10} {:>10} {:>14}",
        "connections", "requests", "req/s", "p50", "p99", "CPU/request"
    );
    for conns in [1usize, 4, per_peer] {
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

/// What a round creates, and where.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A: plain pod, no mutation registered for its namespace.
    Plain,
    /// B: plain pod, the webhook mutates it.
    Webhook,
    /// C: the pod the mutation stores, sent pre-mutated, no mutation registered.
    Premutated,
    /// D: that pre-mutated pod where the webhook is called and answers without a patch.
    PremutatedWebhook,
    /// M: plain pod, a MutatingAdmissionPolicy mutates it (CEL in the apiserver, no call).
    Policy,
    /// P: the same policy without its parameter (the runtime class written into the CEL), to
    /// tell the cost of reading the ClusterPolicy as a parameter from the rest.
    PolicyNoParams,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Plain => "A",
            Kind::Webhook => "B",
            Kind::Premutated => "C",
            Kind::PremutatedWebhook => "D",
            Kind::Policy => "M",
            Kind::PolicyNoParams => "P",
        }
    }
}

/// The simple part of gpu-pilot's pod mutation as a MutatingAdmissionPolicy, as an install would
/// register it: for the pods the webhook is called for (its own match condition), in namespace
/// `namespace`, `runtimeClassName` from the ClusterPolicy's `spec.operator.runtimeClass` when
/// unset (never overriding), and the `nvidia.com/gpu:NoSchedule` toleration unless an `Exists`
/// toleration covers it already (the rules of `mutate::mutate_pod`). With `params` the
/// ClusterPolicy is the policy's parameter (every ClusterPolicy a candidate, those the controller
/// marked `ignored` skipped), so the runtime class follows it without a webhook; without, the
/// runtime class `nvidia-bench` is written into the CEL (round P), which tells the cost of the
/// parameter from the rest.
fn admission_policy(name: &str, namespace: &str, params: bool) -> (Value, Value) {
    use gpu_pilot_api::names::GPU_TAINT_KEY;
    let toleration = format!(
        "Object.spec.tolerations{{key: '{GPU_TAINT_KEY}', operator: 'Exists', effect: 'NoSchedule'}}"
    );
    let covered = format!(
        "has(object.spec.tolerations) && object.spec.tolerations.exists(t, (!has(t.key) || t.key == '' || t.key == '{GPU_TAINT_KEY}') && (!has(t.effect) || t.effect == '' || t.effect == 'NoSchedule') && has(t.operator) && t.operator == 'Exists')"
    );
    let (skip, runtime_class) = if params {
        ("variables.ignored ? [] : ", "variables.runtimeClass")
    } else {
        ("", "'nvidia-bench'")
    };
    let expression = format!(
        "{skip}(has(object.spec.runtimeClassName) || {runtime_class} == '' ? [] : \
           [JSONPatch{{op: 'add', path: '/spec/runtimeClassName', value: {runtime_class}}}]) + \
         ({covered} ? [] : has(object.spec.tolerations) ? \
           [JSONPatch{{op: 'add', path: '/spec/tolerations/-', value: {toleration}}}] : \
           [JSONPatch{{op: 'add', path: '/spec/tolerations', value: [{toleration}]}}])"
    );
    let mut policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]
            }]},
            "matchConditions": [{"name": "asks-for-a-gpu", "expression": gpu_pilot_core::render::webhook::gpu_pod_cel()}],
            "failurePolicy": "Fail",
            "reinvocationPolicy": "IfNeeded",
            "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": expression}}]
        }
    });
    let mut binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "matchResources": {"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [namespace]}
            ]}}
        }
    });
    if params {
        policy["spec"]["paramKind"] =
            json!({"apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy"});
        policy["spec"]["variables"] = json!([
            {"name": "runtimeClass", "expression": "params.?spec.?operator.?runtimeClass.orValue('')"},
            {"name": "ignored", "expression": "params.?status.?state.orValue('') == 'ignored'"}
        ]);
        binding["spec"]["paramRef"] = json!({"selector": {}, "parameterNotFoundAction": "Allow"});
    }
    (policy, binding)
}

async fn through_apiserver(
    kubeconfig: &std::path::Path,
    pods: usize,
    parallel: usize,
    rounds: usize,
    with_policy: bool,
    only: &str,
) -> anyhow::Result<()> {
    use gpu_pilot_core::render::webhook::{Registration, Target};
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
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
    let (with_ns, without_ns, policy_ns, fixed_ns) = (
        format!("{id}-with"),
        format!("{id}-without"),
        format!("{id}-policy"),
        format!("{id}-fixed"),
    );
    for ns in [&with_ns, &without_ns, &policy_ns, &fixed_ns] {
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
            )
            .await?;
    }
    // Wait until the namespaces' default service accounts exist (pods need them).
    for ns in [&with_ns, &without_ns, &policy_ns, &fixed_ns] {
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
    // On a fresh cluster the CRD was just created: wait until the apiserver serves it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = policies.list(&Default::default()).await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the apiserver does not serve clusterpolicies.gpupilot.io 30s after the CRD was applied: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
        check_interval: Duration::from_secs(30),
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

    // The in-tree alternative, in its own namespace.
    let ar = |kind: &str| {
        ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "admissionregistration.k8s.io",
            "v1",
            kind,
        ))
    };
    let (map_api, mapb_api): (Api<DynamicObject>, Api<DynamicObject>) = (
        Api::all_with(client.clone(), &ar("MutatingAdmissionPolicy")),
        Api::all_with(client.clone(), &ar("MutatingAdmissionPolicyBinding")),
    );
    let fixed_id = format!("{id}-fixed");
    if with_policy {
        for (ns, name, params) in [(&policy_ns, &id, true), (&fixed_ns, &fixed_id, false)] {
            let (policy, binding) = admission_policy(name, ns, params);
            map_api
                .create(&PostParams::default(), &serde_json::from_value(policy)?)
                .await
                .context("creating the MutatingAdmissionPolicy (admissionregistration.k8s.io/v1 is served from Kubernetes 1.36 on)")?;
            mapb_api
                .create(&PostParams::default(), &serde_json::from_value(binding)?)
                .await?;
        }
    }

    // Wait until the apiserver applies each mutation (it loads new configurations in the background).
    let probe: Pod = serde_json::from_value(
        json!({"metadata": {"name": "probe"}, "spec": {"containers": [{"name": "c", "image": "i", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}),
    )?;
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let mut mutated_namespaces = vec![&with_ns];
    if with_policy {
        mutated_namespaces.push(&policy_ns);
        mutated_namespaces.push(&fixed_ns);
    }
    for ns in mutated_namespaces {
        let probe_api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mutated(&probe_api.create(&dry, &probe).await?) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "pods in {ns} were not mutated within 30s of registering the mutation"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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
    // The pod as the mutation leaves it: the same object stored, without the call.
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
    /// Creates `n` pods, `parallel` in flight; pods/s and every stored pod.
    async fn round(
        api: Api<Pod>,
        make: impl Fn(String) -> Pod,
        prefix: &str,
        n: usize,
        parallel: usize,
    ) -> anyhow::Result<(f64, Vec<Pod>)> {
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
        let rate = n as f64 / start.elapsed().as_secs_f64();
        Ok((rate, results.into_iter().collect::<anyhow::Result<_>>()?))
    }
    let mut kinds = vec![
        Kind::Plain,
        Kind::Webhook,
        Kind::Premutated,
        Kind::PremutatedWebhook,
    ];
    if with_policy {
        kinds.push(Kind::Policy);
        kinds.push(Kind::PolicyNoParams);
    }
    kinds.retain(|k| only.contains(k.label()));
    anyhow::ensure!(
        !kinds.is_empty(),
        "--kinds {only:?} selects no kind: use letters of ABCD, and M or P with --admission-policy"
    );
    println!(
        "\nthrough the apiserver: {pods} GPU pods per round, {parallel} in flight, {rounds} rounds, kinds in turn:\n  \
         A  plain pod, no mutation registered for its namespace\n  \
         B  plain pod, namespace the webhook mutates (runtimeClassName, toleration)\n  \
         C  the pod B stores, sent pre-mutated to A's namespace (same stored object, no webhook call)\n  \
         D  that pre-mutated pod in B's namespace (the webhook is called and answers without a patch){}\n\
         apiserver CPU from its process_cpu_seconds_total; bench CPU is this process (client and webhook)",
        if with_policy {
            "\n  M  plain pod, namespace a MutatingAdmissionPolicy mutates (the same two fields, CEL in the apiserver)\n  \
               P  plain pod, the same policy without its parameter (the runtime class written into the CEL)"
        } else {
            ""
        }
    );
    println!(
        "{:>6} {:>4} {:>8} {:>14} {:>14} {:>14} {:>14}",
        "round", "", "pods/s", "apiserver ms", "bench ms", "webhook calls", "apiserver sees"
    );
    println!(
        "{:>6} {:>4} {:>8} {:>14} {:>14} {:>14} {:>14}",
        "", "", "", "CPU/pod", "CPU/pod", "", "webhook mean"
    );
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut apiserver_cpu = vec![0.0; kinds.len()];
    let mut bench_cpu = vec![0.0; kinds.len()];
    let calls = || running.metrics.total("mutate_pods");
    for r in 0..rounds {
        for (k, &kind) in kinds.iter().enumerate() {
            let label = kind.label();
            let (ns, make): (&str, &dyn Fn(String) -> Pod) = match kind {
                Kind::Plain => (&without_ns, &plain),
                Kind::Webhook => (&with_ns, &plain),
                Kind::Premutated => (&without_ns, &premutated),
                Kind::PremutatedWebhook => (&with_ns, &premutated),
                Kind::Policy => (&policy_ns, &plain),
                Kind::PolicyNoParams => (&fixed_ns, &plain),
            };
            let (api_before, seen_before) = apiserver_facts(&client).await?;
            let (cpu_before, calls_before) = (process_cpu_seconds(), calls());
            let (rate, stored) = round(
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
            let want = if matches!(kind, Kind::Webhook | Kind::PremutatedWebhook) {
                pods as u64
            } else {
                0
            };
            anyhow::ensure!(
                n_calls == want,
                "round {r}{label}: the webhook answered {n_calls} reviews, expected {want}"
            );
            // Every kind but A must store the same pod: the runtime class and one toleration.
            let unmutated = stored.iter().filter(|p| !is_mutated(p)).count();
            anyhow::ensure!(
                (kind == Kind::Plain) == (unmutated == pods),
                "round {r}{label}: {unmutated} of {pods} stored pods lack the runtime class or the single GPU toleration"
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
            apiserver_cpu[k] += api_ms / rounds as f64;
            bench_cpu[k] += bench_ms / rounds as f64;
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let rate_of = |kind: Kind| {
        kinds
            .iter()
            .position(|&k| k == kind)
            .map(|i| mean(&rates[i]))
    };
    let means: Vec<String> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} {:.1}", k.label(), mean(&rates[i])))
        .collect();
    println!("  mean pods/s: {}", means.join(", "));
    let ratio = |a: Kind, b: Kind| match (rate_of(a), rate_of(b)) {
        (Some(a), Some(b)) => format!("{:.3}", a / b),
        _ => "-".into(),
    };
    println!(
        "  ratios: B/A {} (webhook vs no mutation), B/C {} (same stored pod), D/C {} (a call that changes nothing){}",
        ratio(Kind::Webhook, Kind::Plain),
        ratio(Kind::Webhook, Kind::Premutated),
        ratio(Kind::PremutatedWebhook, Kind::Premutated),
        if with_policy {
            format!(
                ", M/A {} (admission policy vs no mutation), M/C {} (same stored pod), B/M {} (webhook vs admission policy), P/A {} (the policy without its parameter)",
                ratio(Kind::Policy, Kind::Plain),
                ratio(Kind::Policy, Kind::Premutated),
                ratio(Kind::Webhook, Kind::Policy),
                ratio(Kind::PolicyNoParams, Kind::Plain)
            )
        } else {
            String::new()
        }
    );
    let cpu = |v: &[f64]| {
        kinds
            .iter()
            .zip(v)
            .map(|(k, ms)| format!("{} {ms:.2} ms", k.label()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "  mean CPU per pod: apiserver {}; bench process {}",
        cpu(&apiserver_cpu),
        cpu(&bench_cpu)
    );
    let (handler_sum, handler_count) = handler_time(&running.metrics.render());
    println!(
        "  the webhook's own handler time: mean {:.1} us over {} reviews",
        handler_sum / (handler_count.max(1) as f64) * 1e6,
        handler_count
    );
    running.stop().await;
    let _ = mwcs.delete(&id, &DeleteParams::default()).await;
    if with_policy {
        for name in [&id, &fixed_id] {
            let _ = mapb_api.delete(name, &DeleteParams::default()).await;
            let _ = map_api.delete(name, &DeleteParams::default()).await;
        }
    }
    let _ = policies.delete(&id, &DeleteParams::default()).await;
    for ns in [&with_ns, &without_ns, &policy_ns, &fixed_ns] {
        let _ = namespaces.delete(ns, &DeleteParams::background()).await;
    }
    Ok(())
}

/// The pod carries what the mutation adds: the bench's runtime class and exactly one toleration
/// of the GPU taint.
fn is_mutated(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    let gpu_tolerations = spec
        .tolerations
        .iter()
        .flatten()
        .filter(|t| t.key.as_deref() == Some(gpu_pilot_api::names::GPU_TAINT_KEY))
        .count();
    spec.runtime_class_name.as_deref() == Some("nvidia-bench") && gpu_tolerations == 1
}

/// CPU time (user + system) of this process so far, in seconds.
fn process_cpu_seconds() -> f64 {
    cpu_seconds("/proc/self/stat")
}

/// CPU time (user + system) of the calling thread so far, in seconds (10 ms ticks: measure
/// seconds of work).
fn thread_cpu_seconds() -> f64 {
    cpu_seconds("/proc/thread-self/stat")
}

fn cpu_seconds(path: &str) -> f64 {
    // Fields 14 and 15 of a stat file, in clock ticks (100 per second on Linux).
    let stat = std::fs::read_to_string(path).unwrap_or_default();
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
        direct(args.seconds, args.handler_reviews).await?;
        if let Some(kc) = &args.kubeconfig {
            through_apiserver(
                kc,
                args.pods,
                args.parallel,
                args.rounds,
                args.admission_policy,
                &args.kinds,
            )
            .await?;
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
