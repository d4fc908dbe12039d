//! Hardening of the controller against what a user (a policy) or the cluster (a lost Lease, a
//! refused write, a webhook that is down) does to it, on the controller tests' cluster:
//!
//! - bad policies: a table of specs the CRD or the webhook must refuse with a clear message,
//!   each leaving the stored policy exactly as it was;
//! - the policy's bounds judged by the apiserver: generated specs are sent (dry run); whatever it
//!   admits must render;
//! - a deleted policy finishes deleting with the webhook unreachable, and with a ConfigMap it
//!   names gone;
//! - a pass in flight stops writing the moment its replica loses the Lease;
//! - a refused write reaches the policy's status and Events, and clears once writes succeed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::FINALIZER;
use gpu_pilot_core::testkit;
use gpu_pilot_e2e::controller::RunningController;
use gpu_pilot_e2e::{Cluster, TestEnv, eventually};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::TestFn;
use crate::controller::{
    Env, create_policy, daemonset_names, lease_holder, nodes_clean, serial, wait_policy,
};
use crate::webhook::{Fixture, steady_certs};
use crate::webhook_tls::TestCa;

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "hardening::bad_policies_are_refused_and_change_nothing",
            |_| Box::pin(serial(bad_policies)),
        ),
        ("hardening::whatever_the_apiserver_admits_renders", |c| {
            Box::pin(admitted_specs_render(c))
        }),
        (
            "hardening::a_deleted_policy_finishes_with_the_webhook_down_or_a_configmap_gone",
            |_| Box::pin(serial(deletion_never_sticks)),
        ),
        (
            "hardening::a_pass_stops_writing_the_moment_the_lease_is_lost",
            |_| Box::pin(serial(fenced_pass)),
        ),
        (
            "hardening::a_refused_write_reaches_the_status_and_events",
            |_| Box::pin(serial(write_failure_reported)),
        ),
    ]
}

fn test_env(env: &Env) -> TestEnv {
    TestEnv::in_namespace(env.client.clone(), &env.ns)
}

/// One bad input: how it is sent, and words the refusal must carry.
enum Bad {
    /// A merge patch of the stored policy's spec.
    Update(Value),
    /// A second policy with this spec.
    Create(Value),
}

async fn bad_policies(env: Env) -> anyhow::Result<()> {
    let tenv = test_env(&env);
    // The real webhook, scoped to this test's policy (named after the namespace).
    let mut fx = Fixture::start(&tenv, json!({}), steady_certs(&tenv)).await?;
    fx.register_validating(&env.ns).await?;
    let name = env.ns.clone();
    let long = |n: usize| "a".repeat(n);
    let cases: Vec<(&str, Bad, &str)> = vec![
        (
            "count past 32 bits",
            Bad::Update(json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": "2147483648"}}})),
            "maxUnavailable must be a number of nodes from 1 to 999999999",
        ),
        (
            "zero nodes at once",
            Bad::Update(json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": "0"}}})),
            "maxUnavailable must be",
        ),
        (
            "over 100%",
            Bad::Update(json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": "101%"}}})),
            "maxUnavailable must be",
        ),
        (
            "negative count",
            Bad::Update(json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": "-1"}}})),
            "maxUnavailable must be",
        ),
        (
            "runtime class in capitals",
            Bad::Update(json!({"operator": {"runtimeClass": "Nvidia"}})),
            "runtimeClass must be a DNS label",
        ),
        (
            "runtime class with a dot (not a handler)",
            Bad::Update(json!({"operator": {"runtimeClass": "nvidia.gpu"}})),
            "runtimeClass must be a DNS label",
        ),
        (
            "runtime class too long",
            Bad::Update(json!({"operator": {"runtimeClass": long(64)}})),
            "Too long",
        ),
        (
            "tag with a space",
            Bad::Update(json!({"driver": {"version": "v1 .0"}})),
            "version must be an image tag",
        ),
        (
            "short digest",
            Bad::Update(json!({"toolkit": {"version": "sha256:abc"}})),
            "version must be an image tag",
        ),
        (
            "enabled without an image",
            Bad::Update(json!({"dcgmExporter": {"image": ""}})),
            "an enabled component needs an image",
        ),
        (
            "config entry without a ConfigMap",
            Bad::Update(json!({"devicePlugin": {"config": {"default": "any"}}})),
            "config.default names an entry",
        ),
        (
            "ConfigMap name with an underscore",
            Bad::Update(json!({"devicePlugin": {"config": {"name": "my_config"}}})),
            "config.name must be a ConfigMap name",
        ),
        (
            "config entry that reads as a flag",
            Bad::Update(json!({"migManager": {"config": {"default": "--help"}}})),
            "config.default must be a key of the ConfigMap",
        ),
        (
            "relative root",
            Bad::Update(json!({"hostPaths": {"rootFS": "host"}})),
            "rootFS must be an absolute path",
        ),
        (
            "driver dir climbing out",
            Bad::Update(json!({"hostPaths": {"driverInstallDir": "/run/../etc"}})),
            "without '..' elements",
        ),
        (
            "toolkit dir climbing out",
            Bad::Update(json!({"toolkit": {"installDir": "/usr/local/.."}})),
            "without '..' elements",
        ),
        (
            "label key with a space",
            Bad::Update(json!({"operator": {"labels": {"bad key": "v"}}})),
            "labels must be valid Kubernetes labels",
        ),
        (
            "label value too long",
            Bad::Update(json!({"daemonsets": {"labels": {"team": long(64)}}})),
            "Too long",
        ),
        (
            "annotation key with two slashes",
            Bad::Update(json!({"daemonsets": {"annotations": {"a/b/c": "v"}}})),
            "annotation keys must be valid",
        ),
        (
            "priority class in capitals",
            Bad::Update(json!({"daemonsets": {"priorityClassName": "GPU_Critical"}})),
            "priorityClassName must be a PriorityClass name",
        ),
        (
            "pull secret in capitals",
            Bad::Update(json!({"driver": {"imagePullSecrets": ["RegCred"]}})),
            "should match",
        ),
        (
            "65 extra args",
            Bad::Update(json!({"driver": {"args": vec!["-v"; 65]}})),
            "must have at most 64 items",
        ),
        (
            "unknown MIG strategy",
            Bad::Update(json!({"mig": {"strategy": "sometimes"}})),
            "Unsupported value: \"sometimes\"",
        ),
        (
            "unknown pull policy",
            Bad::Update(json!({"gfd": {"imagePullPolicy": "Sometimes"}})),
            "Unsupported value: \"Sometimes\"",
        ),
        (
            "unknown kernel modules",
            Bad::Update(json!({"driver": {"kernelModuleType": "closed"}})),
            "Unsupported value: \"closed\"",
        ),
        (
            "a component that is not an object",
            Bad::Update(json!({"driver": "off"})),
            "must be of type object",
        ),
        (
            "a second policy",
            Bad::Create(json!({})),
            "already exists and gpu-pilot runs from exactly one",
        ),
        (
            "a ConfigMap that does not exist",
            Bad::Update(json!({"devicePlugin": {"config": {"name": "no-such-config"}}})),
            "which does not exist in namespace",
        ),
    ];
    let api: Api<ClusterPolicy> = Api::all(env.client.clone());
    let before = api.get(&name).await?;
    let total = cases.len();
    for (what, bad, words) in cases {
        let result = match bad {
            Bad::Update(spec) => api
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": spec})),
                )
                .await
                .map(|_| ()),
            Bad::Create(spec) => {
                let p = crate::webhook::policy(&format!("{name}-second"), &name, spec)?;
                api.create(&PostParams::default(), &p).await.map(|_| ())
            }
        };
        match result {
            Err(kube::Error::Api(e)) => ensure!(
                e.message.contains(words),
                "{what}: refused, but the message lacks {words:?}: {}",
                e.message
            ),
            Ok(()) => anyhow::bail!("{what}: admitted"),
            Err(e) => anyhow::bail!("{what}: {e}"),
        }
        let now = api.get(&name).await?;
        ensure!(
            now.resource_version() == before.resource_version(),
            "{what}: the stored policy changed"
        );
        ensure!(
            api.list(&ListParams::default()).await?.items.len() == 1,
            "{what}: a policy was added"
        );
    }
    eprintln!("hardening e2e: {total} bad policies refused with a clear message, nothing changed");
    fx.stop().await;
    Ok(())
}

/// Generated specs (the unit property test's generator, from the CRD's own schema) go to the
/// apiserver as dry-run creates: it is the judge of what the schema and its CEL rules admit,
/// and every admitted spec must render.
async fn admitted_specs_render(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let client = cluster.client().await?;
    crate::foundation::ensure_crd(&client).await?;
    let api: Api<ClusterPolicy> = Api::all(client);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let seed: u64 = std::env::var("GPU_PILOT_BOUNDS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1)
        });
    eprintln!("hardening e2e: bounds seed {seed} (GPU_PILOT_BOUNDS_SEED={seed} replays it)");
    let mut specs: Vec<(String, Value)> = testkit::boundary_specs()
        .into_iter()
        .map(|(what, s)| (format!("boundary: {what}"), s))
        .collect();
    let boundary = specs.len();
    specs.extend(generated_specs(seed, 300)?);
    let (mut admitted, mut refused) = (0usize, 0usize);
    for (i, (what, spec)) in specs.into_iter().enumerate() {
        // A spec the Rust types cannot hold (a loose quantity) cannot be sent by them either.
        let Ok(p) = serde_json::from_value::<ClusterPolicy>(json!({
            "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
            "metadata": {"name": "bounds-probe"}, "spec": spec
        })) else {
            ensure!(
                i >= boundary,
                "{what}: a boundary spec does not deserialize"
            );
            continue;
        };
        match api.create(&dry, &p).await {
            Ok(stored) => {
                admitted += 1;
                let mut stored = stored;
                stored.metadata.uid.get_or_insert_with(|| "uid".into());
                gpu_pilot_core::render::operands::render(&stored, "gpu-pilot").map_err(|e| {
                    anyhow::anyhow!(
                        "{what}: admitted by the apiserver but does not render: {e}\n{}",
                        serde_json::to_string(&stored.spec).unwrap_or_default()
                    )
                })?;
            }
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                ensure!(
                    i >= boundary,
                    "{what}: a boundary spec was refused: {}",
                    e.message
                );
                refused += 1;
            }
            Err(e) => return Err(e).context(what),
        }
    }
    eprintln!("hardening e2e: {admitted} specs admitted and rendered, {refused} refused");
    ensure!(
        admitted > 50,
        "only {admitted} generated specs were admitted: the generator drifted from the schema"
    );
    Ok(())
}

/// `count` specs from the schema's generator, seeded (the strategy is not `Send`: made and
/// dropped here, away from the awaits).
fn generated_specs(seed: u64, count: usize) -> anyhow::Result<Vec<(String, Value)>> {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        RunnerConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    let strategy = testkit::spec_strategy();
    (0..count)
        .map(|i| {
            let tree = strategy
                .new_tree(&mut runner)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok((format!("generated #{i}"), tree.current()))
        })
        .collect()
}

/// Deletes the policy with the controller stopped, breaks the webhook's side (`break_it`), and
/// starts the controller: the deletion must finish.
async fn deletion_never_sticks(env: Env) -> anyhow::Result<()> {
    let tenv = test_env(&env);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &env.ns);
    let config = json!({"devicePlugin": {"config": {"name": "dp-config"}}});
    let make_cm = || async {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "dp-config"},
            "data": {"any": "version: v1\n"}
        }))?;
        cms.create(&PostParams::default(), &cm).await?;
        anyhow::Ok(())
    };
    make_cm().await?;
    let mut fx = Fixture::start(&tenv, config.clone(), steady_certs(&tenv)).await?;
    fx.register_validating(&env.ns).await?;
    let name = env.ns.clone();
    let api: Api<ClusterPolicy> = Api::all(env.client.clone());

    let (api, name, client, ns) = (&api, &name, &env.client, &env.ns);
    for case in ["configmap-gone", "webhook-down"] {
        if api.get_opt(name).await?.is_none() {
            make_cm().await?;
            crate::webhook::create_policy(client, name, name, config.clone()).await?;
        }
        let ctrl = RunningController::start(env.cluster.kubeconfig(), &env.ns, case, false);
        eventually(
            &format!("{case}: the finalizer on the policy and its DaemonSets out"),
            Duration::from_secs(60),
            || async move {
                let p = api.get(name).await?;
                let has = p.finalizers().iter().any(|f| f == FINALIZER);
                let ds = daemonset_names(client, ns).await?.len();
                Ok(if has && ds > 0 {
                    Ok(())
                } else {
                    Err(format!("finalizer {has}, {ds} DaemonSets"))
                })
            },
        )
        .await?;
        ctrl.kill();
        cms.delete("dp-config", &DeleteParams::default()).await?;
        // The delete itself is reviewed (no GPU pods run, so it is allowed)...
        api.delete(name, &DeleteParams::default()).await?;
        // ...and then the webhook goes away, with the policy Terminating.
        if case == "webhook-down"
            && let Some(r) = fx.running.take()
        {
            r.stop().await;
        }
        let ctrl = RunningController::start(env.cluster.kubeconfig(), &env.ns, case, false);
        eventually(
            &format!("{case}: the deleted policy is gone"),
            Duration::from_secs(90),
            || async move {
                Ok(match api.get_opt(name).await? {
                    None => Ok(()),
                    Some(p) => Err(format!("still there, finalizers {:?}", p.finalizers())),
                })
            },
        )
        .await?;
        eventually(
            "no gpu-pilot label left on any node",
            Duration::from_secs(30),
            || nodes_clean(client),
        )
        .await?;
        ensure!(daemonset_names(client, ns).await?.is_empty());
        ctrl.stop();
    }
    fx.stop().await;
    Ok(())
}

/// An admission webhook of the test's own that counts DaemonSet writes and can hold one.
#[derive(Default)]
struct Gate {
    calls: AtomicUsize,
    hold_next: AtomicBool,
    holding: Notify,
    release: Notify,
}

async fn gate_review(
    State(gate): State<Arc<Gate>>,
    body: Bytes,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    gate.calls.fetch_add(1, Ordering::SeqCst);
    let review: Value = serde_json::from_slice(&body).unwrap_or_default();
    if gate.hold_next.swap(false, Ordering::SeqCst) {
        gate.holding.notify_one();
        gate.release.notified().await;
    }
    let answer = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "response": {"uid": review["request"]["uid"], "allowed": true}
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        answer.to_string(),
    )
}

async fn start_gate(
    client: &Client,
    ns: &str,
) -> anyhow::Result<(Arc<Gate>, axum_server::Handle<SocketAddr>)> {
    let ca = TestCa::new("e2e write gate CA")?;
    let (cert, key) = ca.leaf(2)?;
    let tls = gpu_pilot_webhook::server::tls_config(cert.as_bytes(), key.as_bytes())?;
    let gate = Arc::new(Gate::default());
    let app = axum::Router::new()
        .route("/review", post(gate_review))
        .with_state(gate.clone());
    let handle = axum_server::Handle::new();
    let server = axum_server::bind_rustls(
        "127.0.0.1:0".parse::<SocketAddr>()?,
        axum_server::tls_rustls::RustlsConfig::from_config(tls),
    )
    .handle(handle.clone());
    tokio::spawn(async move { server.serve(app.into_make_service()).await });
    let addr = handle.listening().await.context("the gate did not start")?;
    let vwc: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": format!("gate-{ns}")},
        "webhooks": [{
            "name": "gate.e2e.gpupilot.io",
            "clientConfig": {
                "url": format!("https://{addr}/review"),
                "caBundle": k8s_openapi::ByteString(ca.pem().into_bytes()),
            },
            "rules": [{"apiGroups": ["apps"], "apiVersions": ["v1"], "resources": ["daemonsets"],
                       "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [ns]}
            ]},
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Ignore",
            "timeoutSeconds": 20
        }]
    }))?;
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &vwc)
        .await?;
    Ok((gate, handle))
}

async fn fenced_pass(env: Env) -> anyhow::Result<()> {
    let c = &env.client;
    let (gate, handle) = start_gate(c, &env.ns).await?;
    let body = async {
        let a = RunningController::start(env.cluster.kubeconfig(), &env.ns, "fence-a", true);
        let b = RunningController::start(env.cluster.kubeconfig(), &env.ns, "fence-b", true);
        let ns = &env.ns;
        let leader = eventually("a leader", Duration::from_secs(60), || async move {
            Ok(lease_holder(c, ns).await?.ok_or_else(|| "no holder".to_string()))
        })
        .await?;
        let by_name = |n: &str| if n == a.identity { &a } else { &b };
        let lead = by_name(&leader);
        gate.hold_next.store(true, Ordering::SeqCst);
        create_policy(c, "cluster-policy", json!({})).await?;
        tokio::time::timeout(Duration::from_secs(60), gate.holding.notified())
            .await
            .context("the leader's first DaemonSet write never reached the gate")?;
        // The leader's pass is inside a write. The Lease goes to someone else meanwhile.
        // Held for 15 s: long enough to watch nobody write, short enough for a replica to
        // take over afterwards (their lease managers sleep until it expires).
        let lease = json!({"spec": {
            "holderIdentity": "intruder", "leaseDurationSeconds": 15,
            "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now()),
            "acquireTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now()),
        }});
        Api::<Lease>::namespaced(c.clone(), &env.ns)
            .patch("gpu-pilot-controller", &PatchParams::default(), &Patch::Merge(lease))
            .await?;
        // The leader learns it through its watch of the Lease; its leader gauge follows its
        // fence. (A fixed wait raced the watch on a loaded machine.)
        eventually("the leader's fence closed", Duration::from_secs(30), || async {
            let g = lead.metric("gpu_pilot_controller_leader", "").await?;
            Ok(if g == 0.0 { Ok(()) } else { Err(format!("leader gauge {g}")) })
        })
        .await?;
        let seen = gate.calls.load(Ordering::SeqCst);
        let writes = lead.metric("gpu_pilot_controller_writes_total", "").await?;
        gate.release.notify_one();
        // Without the fence the pass would go on with six more DaemonSets and every node.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = gate.calls.load(Ordering::SeqCst);
        ensure!(after == seen, "{} DaemonSet write(s) after the Lease was lost", after - seen);
        let more = lead.metric("gpu_pilot_controller_writes_total", "").await? - writes;
        ensure!(more <= 1.0, "the fenced leader made {more} writes after losing the Lease (the one held is the most)");
        let fenced = lead.metric("gpu_pilot_controller_reconcile_errors_total", "kind=\"fenced\"").await?;
        ensure!(fenced >= 1.0, "the leader's pass was not stopped by the fence");
        // Once the intruder's Lease expires, a replica takes over and finishes the rollout.
        wait_policy(c, "cluster-policy", gpu_pilot_api::policy::PolicyState::Ready, 20, Duration::from_secs(180)).await?;
        a.stop();
        b.stop();
        anyhow::Ok(())
    }
    .await;
    gate.release.notify_waiters();
    handle.shutdown();
    let _ = Api::<ValidatingWebhookConfiguration>::all(c.clone())
        .delete(&format!("gate-{}", env.ns), &DeleteParams::default())
        .await;
    body
}

async fn write_failure_reported(env: Env) -> anyhow::Result<()> {
    let c = &env.client;
    let name = format!("deny-dcgm-{}", env.ns);
    let vap: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
                "resources": ["daemonsets"], "operations": ["CREATE", "UPDATE"]}]},
            "validations": [{"expression": "object.metadata.name != 'gpu-pilot-dcgm-exporter'",
                "message": "e2e: no dcgm-exporter in this namespace"}]
        }
    }))?;
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": env.ns}}}}
    }))?;
    let vaps: Api<ValidatingAdmissionPolicy> = Api::all(c.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(c.clone());
    vaps.create(&PostParams::default(), &vap).await?;
    bindings.create(&PostParams::default(), &binding).await?;
    let body = async {
        // The admission policy takes a moment to be in force.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ctrl = RunningController::start(env.cluster.kubeconfig(), &env.ns, "refused", false);
        create_policy(c, "cluster-policy", json!({})).await?;
        let api: Api<ClusterPolicy> = Api::all(c.clone());
        let api = &api;
        let cond = |p: &ClusterPolicy| {
            p.status.as_ref().and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == "WriteFailed")
                    .cloned()
            })
        };
        let failed = eventually(
            "a WriteFailed condition",
            Duration::from_secs(60),
            || async move {
                let p = api.get("cluster-policy").await?;
                Ok(match cond(&p) {
                    Some(c) if c.status == "True" => Ok(c),
                    other => Err(format!("{other:?}")),
                })
            },
        )
        .await?;
        ensure!(
            failed.message.contains("DaemonSet gpu-pilot-dcgm-exporter")
                && failed
                    .message
                    .contains("e2e: no dcgm-exporter in this namespace"),
            "the condition does not name the write and the refusal: {}",
            failed.message
        );
        ensure!(
            ["Invalid", "Forbidden"].contains(&failed.reason.as_str()),
            "reason {}",
            failed.reason
        );
        let events = Api::<CoreEvent>::all(c.clone())
            .list(
                &ListParams::default()
                    .fields("involvedObject.name=cluster-policy,reason=WriteFailed"),
            )
            .await?;
        ensure!(
            events.items.iter().any(|e| e
                .message
                .as_deref()
                .is_some_and(|m| m.contains("gpu-pilot-dcgm-exporter"))),
            "no WriteFailed Event names the DaemonSet"
        );
        // The refusal lifted, the next passes succeed and the condition clears.
        bindings.delete(&name, &DeleteParams::default()).await?;
        vaps.delete(&name, &DeleteParams::default()).await?;
        eventually(
            "WriteFailed cleared",
            Duration::from_secs(90),
            || async move {
                let p = api.get("cluster-policy").await?;
                Ok(match cond(&p) {
                    Some(c) if c.status == "False" => Ok(()),
                    other => Err(format!("{other:?}")),
                })
            },
        )
        .await?;
        ctrl.stop();
        anyhow::Ok(())
    }
    .await;
    let _ = bindings.delete(&name, &DeleteParams::default()).await;
    let _ = vaps.delete(&name, &DeleteParams::default()).await;
    body
}
