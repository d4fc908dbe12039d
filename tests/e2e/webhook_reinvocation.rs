//! Reinvocation for real: another mutating webhook, called after ours, changes GPU pods, so the
//! apiserver calls ours a second time (`reinvocationPolicy: IfNeeded`) on the changed pod. Ours
//! must then change nothing, and re-applying the same pod spec must not double anything either:
//! `kubectl apply` sends the manifest's tolerations list and GPU resources back, and the
//! webhook's UPDATE entry keeps what it added at creation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use base64::Engine;
use gpu_pilot_e2e::{Cluster, TestEnv, eventually};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};

use gpu_pilot_e2e::webhook::TestCa;
use gpu_pilot_e2e::webhook::{
    Fixture, MUTATE_ENDPOINT, dry_run, gpu_pod, gpu_tolerations, kubectl, set_strategy,
    steady_certs, until_strategy, with_cleanup,
};

/// The env var and annotation the other webhook adds.
const PEER_ENV: &str = "PEER_INJECTED";
const PEER_ANNOTATION: &str = "e2e.gpupilot.io/peer";

#[derive(Default)]
struct PeerState {
    calls: AtomicU64,
    /// For each pod name, the runtimeClassName it carried when it reached the other webhook.
    saw_runtime_class: Mutex<BTreeMap<String, Option<String>>>,
}

/// A second, independent mutating admission webhook of the kind clusters run next to gpu-pilot
/// (a sidecar injector, a policy engine): TLS with its own CA, and for every pod that asks for
/// `nvidia.com/gpu` an env var in each container and an annotation, added only where missing.
struct PeerWebhook {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<PeerState>,
    handle: axum_server::Handle<SocketAddr>,
}

impl PeerWebhook {
    async fn start() -> anyhow::Result<PeerWebhook> {
        let ca = TestCa::new("e2e peer webhook CA")?;
        let (cert, key) = ca.leaf(24)?;
        let tls = gpu_pilot_webhook::server::tls_config(cert.as_bytes(), key.as_bytes())?;
        let state = Arc::new(PeerState::default());
        let app = axum::Router::new()
            .route("/mutate", post(peer_mutate))
            .with_state(state.clone());
        let handle = axum_server::Handle::new();
        let server = axum_server::bind_rustls(
            "127.0.0.1:0".parse::<SocketAddr>()?,
            axum_server::tls_rustls::RustlsConfig::from_config(tls),
        )
        .handle(handle.clone());
        tokio::spawn(async move { server.serve(app.into_make_service()).await });
        let addr = handle
            .listening()
            .await
            .context("the other webhook did not start")?;
        Ok(PeerWebhook {
            addr,
            ca_pem: ca.pem(),
            state,
            handle,
        })
    }

    fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Its configuration: pods created in `ns`, called once (`reinvocationPolicy: Never`).
    fn configuration(&self, name: &str, ns: &str) -> anyhow::Result<MutatingWebhookConfiguration> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name},
            "webhooks": [{
                "name": "peer.e2e.gpupilot.io",
                "clientConfig": {
                    "url": format!("https://{}/mutate", self.addr),
                    "caBundle": k8s_openapi::ByteString(self.ca_pem.clone().into_bytes()),
                },
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                           "operations": ["CREATE"], "scope": "Namespaced"}],
                "namespaceSelector": {"matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [ns]}
                ]},
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Fail",
                "reinvocationPolicy": "Never",
                "timeoutSeconds": 5
            }]
        }))?)
    }
}

async fn peer_mutate(
    State(state): State<Arc<PeerState>>,
    body: Bytes,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    state.calls.fetch_add(1, Ordering::SeqCst);
    let review: Value = serde_json::from_slice(&body).unwrap_or_default();
    let request = &review["request"];
    let pod = &request["object"];
    let containers = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let asks_gpu = containers.iter().any(|c| {
        c["resources"]["limits"]
            .as_object()
            .is_some_and(|l| l.keys().any(|k| k.starts_with("nvidia.com/")))
    });
    let mut patch = Vec::new();
    if asks_gpu {
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let rc = pod["spec"]["runtimeClassName"].as_str().map(String::from);
        state.saw_runtime_class.lock().unwrap().insert(name, rc);
        for (i, c) in containers.iter().enumerate() {
            match c["env"].as_array() {
                Some(env) if env.iter().any(|e| e["name"] == PEER_ENV) => {}
                Some(_) => patch.push(
                    json!({"op": "add", "path": format!("/spec/containers/{i}/env/-"),
                                             "value": {"name": PEER_ENV, "value": "1"}}),
                ),
                None => patch.push(
                    json!({"op": "add", "path": format!("/spec/containers/{i}/env"),
                                          "value": [{"name": PEER_ENV, "value": "1"}]}),
                ),
            }
        }
        match pod["metadata"]["annotations"].as_object() {
            Some(a) if a.contains_key(PEER_ANNOTATION) => {}
            Some(_) => patch.push(json!({"op": "add",
                "path": format!("/metadata/annotations/{}", PEER_ANNOTATION.replace('/', "~1")),
                "value": "seen"})),
            None => patch.push(json!({"op": "add", "path": "/metadata/annotations",
                                      "value": {(PEER_ANNOTATION): "seen"}})),
        }
    }
    let mut response = json!({"uid": request["uid"], "allowed": true});
    if !patch.is_empty() {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(
            base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&patch).unwrap())
        );
    }
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
            .to_string(),
    )
}

/// Everything both webhooks add is there exactly once, and nothing the user wrote is doubled.
fn single(pod: &Pod, runtime_class: &str, gpu_resource: &str, count: &str) -> anyhow::Result<()> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().context("a pod has a spec")?;
    ensure!(
        spec.runtime_class_name.as_deref() == Some(runtime_class),
        "{name}: runtimeClassName {:?}",
        spec.runtime_class_name
    );
    ensure!(
        gpu_tolerations(pod) == 1,
        "{name}: tolerations {:?}",
        spec.tolerations
    );
    for c in &spec.containers {
        let env = c.env.clone().unwrap_or_default();
        let peer = env.iter().filter(|e| e.name == PEER_ENV).count();
        ensure!(
            peer == 1,
            "{name}/{}: {PEER_ENV} {peer} times: {env:?}",
            c.name
        );
        let mut names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        let all = names.len();
        names.sort();
        names.dedup();
        ensure!(
            names.len() == all,
            "{name}/{}: duplicated env {env:?}",
            c.name
        );
    }
    let gpu = &spec.containers[0];
    let res = gpu.resources.clone().unwrap_or_default();
    for (which, list) in [("limits", &res.limits), ("requests", &res.requests)] {
        if let Some(list) = list {
            let gpus: Vec<_> = list
                .keys()
                .filter(|k| k.starts_with("nvidia.com/"))
                .collect();
            ensure!(
                gpus == [gpu_resource] && list[gpu_resource].0 == count,
                "{name}: {which} {list:?}, want {gpu_resource}: {count} once"
            );
        }
    }
    ensure!(
        pod.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.get(PEER_ANNOTATION).map(String::as_str) == Some("seen")),
        "{name}: the other webhook's annotation is missing"
    );
    Ok(())
}

/// A GPU container with an env var of its own next to a container without GPU or env.
fn two_container_pod(name: &str) -> Value {
    let mut pod = gpu_pod(name, json!({}), json!({"nvidia.com/gpu": "1"}));
    pod["spec"]["containers"][0]["env"] = json!([{"name": "MODEL", "value": "llama"}]);
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "sidecar", "image": "registry.k8s.io/pause:3.10"}));
    pod["spec"]["tolerations"] = json!([{"key": "other", "operator": "Exists"}]);
    pod
}

pub(crate) async fn reinvoked_after_another_webhook(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "webhook-reinvoke").await?;
    let mut fx = Fixture::start(&env, json!({}), steady_certs(&env)).await?;
    fx.register_mutating(&env.namespace).await?;
    let peer = PeerWebhook::start().await?;
    // Configurations are called in name order: "<id>-peer" after "<id>", ours.
    let peer_config = format!("{}-peer", fx.id);
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    let ns = env.namespace.clone();
    let client = env.client.clone();
    let ours = fx.running().metrics.clone();
    let rc = fx.id.clone();
    let body = async {
        mwcs.create(
            &PostParams::default(),
            &peer.configuration(&peer_config, &ns)?,
        )
        .await
        .context("registering the other webhook")?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        eventually(
            "the apiserver calls the other webhook",
            Duration::from_secs(30),
            || {
                let pods = pods.clone();
                async move {
                    let p = dry_run(&pods, two_container_pod("probe")).await?;
                    let env = p.spec.unwrap().containers[0]
                        .env
                        .clone()
                        .unwrap_or_default();
                    Ok(if env.iter().any(|e| e.name == PEER_ENV) {
                        Ok(())
                    } else {
                        Err(format!("env {env:?}"))
                    })
                }
            },
        )
        .await?;

        // One pod, created for real: ours, then the other webhook, then ours again.
        let (ours_before, peer_before) = (ours.total(MUTATE_ENDPOINT), peer.calls());
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(two_container_pod("trainer"))?,
        )
        .await?;
        let (ours_calls, peer_calls) = (
            ours.total(MUTATE_ENDPOINT) - ours_before,
            peer.calls() - peer_before,
        );
        ensure!(
            ours_calls >= 2,
            "gpu-pilot's webhook saw {ours_calls} request(s) for one pod: the apiserver did not reinvoke it after the other webhook changed the pod"
        );
        ensure!(
            peer_calls == 1,
            "the other webhook saw {peer_calls} request(s)"
        );
        let seen = peer
            .state
            .saw_runtime_class
            .lock()
            .unwrap()
            .get("trainer")
            .cloned();
        ensure!(
            seen == Some(Some(rc.clone())),
            "the other webhook saw runtimeClassName {seen:?}: gpu-pilot's webhook did not run first"
        );
        let stored = pods.get("trainer").await?;
        single(&stored, &rc, "nvidia.com/gpu", "1")?;
        let other = stored
            .spec
            .as_ref()
            .unwrap()
            .tolerations
            .iter()
            .flatten()
            .filter(|t| t.key.as_deref() == Some("other"))
            .count();
        ensure!(
            other == 1,
            "the pod's own toleration is there {other} times"
        );
        eprintln!(
            "webhook reinvocation: one pod create, gpu-pilot's webhook called {ours_calls} times, the other webhook {peer_calls} time; stored pod has one GPU toleration, one {PEER_ENV}, runtimeClassName {rc}"
        );

        // The same spec applied twice, client-side and server-side: nothing doubles.
        for (name, args) in [
            ("applied", vec!["apply", "-f", "-"]),
            (
                "ssa",
                vec!["apply", "--server-side", "--field-manager=e2e", "-f", "-"],
            ),
        ] {
            let spec = two_container_pod(name);
            for round in 1..=2 {
                let mut full = vec!["-n", ns.as_str()];
                full.extend(&args);
                let (ok, _, err) = kubectl(&cluster, &full, Some(&spec)).await?;
                ensure!(ok, "kubectl {} round {round}: {err}", args.join(" "));
                single(&pods.get(name).await?, &rc, "nvidia.com/gpu", "1")
                    .with_context(|| format!("after kubectl {} round {round}", args.join(" ")))?;
            }
        }

        // A MIG pod under mixed: the resource is renamed on the first call and left alone on
        // the reinvocation.
        set_strategy(&client, &rc, "mixed").await?;
        until_strategy(&pods, "mixed").await?;
        let before = ours.total(MUTATE_ENDPOINT);
        let mut mig = two_container_pod("mig");
        mig["metadata"]["annotations"] = json!({"gpupilot.io/mig-profile": "1g.10gb"});
        mig["spec"]["containers"][0]["resources"] =
            json!({"limits": {"nvidia.com/gpu": "3"}, "requests": {"nvidia.com/gpu": "3"}});
        let p = dry_run(&pods, mig.clone()).await?;
        ensure!(
            ours.total(MUTATE_ENDPOINT) - before >= 2,
            "no reinvocation for the MIG pod"
        );
        single(&p, &rc, "nvidia.com/mig-1g.10gb", "3")?;
        // Applied twice: the manifest's nvidia.com/gpu comes back in the second apply's patch,
        // and the webhook keeps the renamed resource.
        mig["metadata"]["name"] = json!("mig-applied");
        for round in 1..=2 {
            let (ok, _, err) =
                kubectl(&cluster, &["-n", &ns, "apply", "-f", "-"], Some(&mig)).await?;
            ensure!(ok, "kubectl apply of a MIG pod, round {round}: {err}");
            single(
                &pods.get("mig-applied").await?,
                &rc,
                "nvidia.com/mig-1g.10gb",
                "3",
            )
            .with_context(|| format!("MIG pod after kubectl apply round {round}"))?;
        }
        Ok(())
    };
    let result = body.await;
    let _ = mwcs.delete(&peer_config, &DeleteParams::default()).await;
    peer.handle.shutdown();
    with_cleanup(env, fx, async { result }).await
}
