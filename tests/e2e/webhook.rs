//! The admission webhooks, called for real by the local apiserver.
//!
//! Each test runs its own webhook in this process on 127.0.0.1 (port 0) and registers it by URL
//! under configurations named after the test's namespace. Pod mutation is confined to that
//! namespace (namespaceSelector), ClusterPolicy validation to policies carrying the test's label
//! (objectSelector), and the webhook itself only looks at policies, nodes and pods of its own test,
//! so the tests run in parallel with each other and with the rest of the suite.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::webhook as names;
use gpu_pilot_e2e::{Cluster, TestEnv, eventually};
use gpu_pilot_webhook::certs::CertSettings;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::TestFn;

use gpu_pilot_e2e::webhook::{
    Fixture, MUTATE_ENDPOINT, TEST_LABEL, TLS_SECRET, ca_bundle, dry_run, gpu_pod, gpu_tolerations,
    kubectl, policy, set_strategy, steady_certs, until_strategy, with_cleanup,
};

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        (
            "webhook::gpu_pods_are_mutated_other_pods_never_reach_it",
            |c| Box::pin(gpu_pods_mutated(c)),
        ),
        (
            "webhook::mig_profiles_and_memory_under_each_strategy",
            |c| Box::pin(mig_and_memory(c)),
        ),
        ("webhook::clusterpolicy_rules_as_kubectl_shows_them", |c| {
            Box::pin(policy_rules(c))
        }),
        (
            "webhook::reinvoked_after_another_webhook_and_reapplied_pods_stay_single",
            |c| Box::pin(crate::webhook_reinvocation::reinvoked_after_another_webhook(c)),
        ),
        (
            "webhook::cert_manager_files_rotate_under_load_fails_no_request",
            |c| Box::pin(crate::webhook_tls::cert_files_rotate_under_load(c)),
        ),
        ("webhook::two_replicas_race_to_one_ca", |c| {
            Box::pin(crate::webhook_tls::replicas_race_to_one_ca(c))
        }),
        (
            "webhook::certificate_rotation_under_load_fails_no_request",
            |c| Box::pin(rotation_under_load(c)),
        ),
        ("webhook::webhook_down_follows_failure_policy", |c| {
            Box::pin(webhook_down(c))
        }),
        ("webhook::runs_with_only_its_least_privilege_rbac", |c| {
            Box::pin(least_privilege(c))
        }),
        (
            "webhook::an_abusive_client_cannot_starve_the_apiserver",
            |c| Box::pin(crate::webhook_abuse::abusive_client_cannot_starve_the_apiserver(c)),
        ),
    ]
}

pub(crate) async fn gpu_pods_mutated(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "webhook-mutate").await?;
    let mut fx = Fixture::start(&env, json!({}), steady_certs(&env)).await?;
    fx.register_mutating(&env.namespace).await?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    let metrics = fx.running().metrics.clone();
    let id = fx.id.clone();
    let body = async {
        let pp = PostParams::default();
        pods.create(
            &pp,
            &serde_json::from_value(gpu_pod(
                "trainer",
                json!({}),
                json!({"nvidia.com/gpu": "1"}),
            ))?,
        )
        .await?;
        let stored = pods.get("trainer").await?;
        let spec = stored.spec.as_ref().context("a stored pod has a spec")?;
        ensure!(
            spec.runtime_class_name.as_deref() == Some(id.as_str()),
            "runtimeClassName is {:?}",
            spec.runtime_class_name
        );
        ensure!(
            gpu_tolerations(&stored) == 1,
            "tolerations: {:?}",
            spec.tolerations
        );
        let tol = spec
            .tolerations
            .iter()
            .flatten()
            .find(|t| t.key.as_deref() == Some("nvidia.com/gpu"))
            .unwrap();
        ensure!(
            tol.operator.as_deref() == Some("Exists")
                && tol.effect.as_deref() == Some("NoSchedule"),
            "{tol:?}"
        );

        // A pod that asks for no GPU: the apiserver does not even call the webhook.
        let calls_before = metrics.total(MUTATE_ENDPOINT);
        let plain: Pod = serde_json::from_value(json!({
            "metadata": { "name": "plain" },
            "spec": { "containers": [{ "name": "c", "image": "registry.k8s.io/pause:3.10", "resources": {"limits": {"cpu": "100m"}} }] }
        }))?;
        pods.create(&pp, &plain).await?;
        let stored = pods.get("plain").await?;
        ensure!(stored.spec.as_ref().unwrap().runtime_class_name.is_none());
        ensure!(gpu_tolerations(&stored) == 0);
        // An opted-out GPU pod is not sent either (objectSelector).
        let mut opted = gpu_pod("opted-out", json!({}), json!({"nvidia.com/gpu": "1"}));
        opted["metadata"]["labels"] = json!({"gpupilot.io/inject": "false"});
        pods.create(&pp, &serde_json::from_value(opted)?).await?;
        ensure!(
            pods.get("opted-out")
                .await?
                .spec
                .unwrap()
                .runtime_class_name
                .is_none()
        );
        let calls_after = metrics.total(MUTATE_ENDPOINT);
        ensure!(
            calls_after == calls_before,
            "the webhook saw {} request(s) for pods that ask for no GPU",
            calls_after - calls_before
        );

        // /metrics shows what was answered.
        let text = metrics.render();
        ensure!(
            text.contains(
                "gpupilot_webhook_requests_total{endpoint=\"mutate_pods\",outcome=\"patched\"}"
            ),
            "{text}"
        );
        Ok(())
    };
    with_cleanup(env, fx, body).await
}

pub(crate) async fn mig_and_memory(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "webhook-mig").await?;
    let mut fx = Fixture::start(
        &env,
        json!({"mig": {"strategy": "mixed"}}),
        steady_certs(&env),
    )
    .await?;
    let id = fx.id.clone();
    // Two nodes of this test only (no NFD label, so no other test counts them as GPU nodes):
    // one with mixed MIG capacity, one cut into 1g.5gb under single.
    let nodes: Api<Node> = Api::all(env.client.clone());
    for (suffix, labels, capacity) in [
        (
            "mixed",
            json!({ (TEST_LABEL): id }),
            json!({"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "2", "nvidia.com/mig-7g.80gb": "0", "pods": "110"}),
        ),
        (
            "single",
            json!({ (TEST_LABEL): id, "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb" }),
            json!({"nvidia.com/gpu": "28", "pods": "110"}),
        ),
    ] {
        let name = format!("{id}-{suffix}");
        let node: Node = serde_json::from_value(json!({
            "metadata": { "name": name, "labels": labels },
            "spec": { "taints": [{"key": "gpupilot.io/e2e-only", "effect": "NoSchedule"}] },
            "status": { "capacity": capacity, "allocatable": capacity }
        }))?;
        nodes
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("creating node {name}"))?;
        fx.made_nodes.push(name);
    }
    fx.register_mutating(&env.namespace).await?;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.namespace);
    let client = env.client.clone();
    let ns = env.namespace.clone();
    let body = async {
        // mixed: the profile becomes its own resource, in limits and requests.
        let mut p = gpu_pod(
            "mixed",
            json!({"gpupilot.io/mig-profile": "1g.10gb"}),
            json!({"nvidia.com/gpu": "2"}),
        );
        p["spec"]["containers"][0]["resources"]["requests"] = json!({"nvidia.com/gpu": "2"});
        pods.create(&PostParams::default(), &serde_json::from_value(p)?)
            .await?;
        let res = pods.get("mixed").await?.spec.unwrap().containers[0]
            .resources
            .clone()
            .unwrap();
        let want = [(
            "nvidia.com/mig-1g.10gb".to_string(),
            k8s_openapi::apimachinery::pkg::api::resource::Quantity("2".into()),
        )]
        .into();
        ensure!(
            res.limits.as_ref() == Some(&want) && res.requests.as_ref() == Some(&want),
            "stored resources {res:?}"
        );

        // Memory: 20Gi fits 3g.40gb best among the node's profiles (7g.80gb has no capacity);
        // kubectl shows the warning that says so.
        let mem = gpu_pod(
            "memory",
            json!({"gpupilot.io/gpu-memory": "20Gi"}),
            json!({}),
        );
        let (ok, out, err) = kubectl(
            &cluster,
            &[
                "-n",
                &ns,
                "create",
                "--dry-run=server",
                "-o",
                "json",
                "-f",
                "-",
            ],
            Some(&mem),
        )
        .await?;
        ensure!(ok, "kubectl create failed: {err}");
        let created: Value = serde_json::from_str(&out)?;
        ensure!(
            created["spec"]["containers"][0]["resources"]["limits"]
                == json!({"nvidia.com/mig-3g.40gb": "1"}),
            "{}",
            created["spec"]
        );
        ensure!(created["metadata"]["annotations"]["gpupilot.io/mig-profile"] == "3g.40gb");
        ensure!(
            err.contains("Warning: gpupilot.io/gpu-memory: 20Gi was met with MIG profile 3g.40gb"),
            "kubectl stderr: {err}"
        );
        // More than any profile holds: a whole GPU, and a warning.
        let big = gpu_pod("big", json!({"gpupilot.io/gpu-memory": "60Gi"}), json!({}));
        let (ok, out, err) = kubectl(
            &cluster,
            &[
                "-n",
                &ns,
                "create",
                "--dry-run=server",
                "-o",
                "json",
                "-f",
                "-",
            ],
            Some(&big),
        )
        .await?;
        ensure!(ok, "kubectl create failed: {err}");
        let created: Value = serde_json::from_str(&out)?;
        ensure!(
            created["spec"]["containers"][0]["resources"]["limits"]
                == json!({"nvidia.com/gpu": "1"}),
            "{}",
            created["spec"]
        );
        ensure!(
            err.contains("so the pod gets a whole GPU"),
            "kubectl stderr: {err}"
        );

        // single: nvidia.com/gpu stays, a node selector picks the product cut into the profile.
        set_strategy(&client, &id, "single").await?;
        until_strategy(&pods, "single").await?;
        let single = dry_run(
            &pods,
            gpu_pod(
                "single",
                json!({"gpupilot.io/mig-profile": "1g.5gb"}),
                json!({"nvidia.com/gpu": "1"}),
            ),
        )
        .await?;
        let spec = single.spec.unwrap();
        ensure!(
            spec.node_selector
                .as_ref()
                .and_then(|s| s.get("nvidia.com/gpu.product"))
                .map(String::as_str)
                == Some("NVIDIA-A100-SXM4-40GB-MIG-1g.5gb"),
            "nodeSelector {:?}",
            spec.node_selector
        );
        ensure!(
            spec.containers[0]
                .resources
                .as_ref()
                .unwrap()
                .limits
                .as_ref()
                .unwrap()
                .contains_key("nvidia.com/gpu")
        );

        // none: a MIG request is refused with the reason.
        set_strategy(&client, &id, "none").await?;
        until_strategy(&pods, "none").await?;
        let (ok, _, err) = kubectl(
            &cluster,
            &["-n", &ns, "create", "-f", "-"],
            Some(&gpu_pod(
                "none",
                json!({"gpupilot.io/mig-profile": "1g.10gb"}),
                json!({"nvidia.com/gpu": "1"}),
            )),
        )
        .await?;
        ensure!(!ok, "a MIG pod was admitted under strategy none");
        ensure!(err.contains("denied the request: MIG is off in this cluster (ClusterPolicy spec.mig.strategy is none)"), "kubectl stderr: {err}");
        Ok(())
    };
    with_cleanup(env, fx, body).await
}

/// Runs kubectl and checks it failed with `phrase` in its error output.
async fn refused(
    cluster: &Cluster,
    what: &str,
    args: &[&str],
    stdin: Option<&Value>,
    phrase: &str,
) -> anyhow::Result<()> {
    let (ok, _, err) = kubectl(cluster, args, stdin).await?;
    ensure!(!ok, "{what}: admitted, should be denied");
    ensure!(
        err.contains("denied the request") && err.contains(phrase),
        "{what}: kubectl said {err:?}, expected {phrase:?}"
    );
    Ok(())
}

/// Runs kubectl and checks it succeeded, with `warning` in its error output when given.
async fn admitted(
    cluster: &Cluster,
    what: &str,
    args: &[&str],
    warning: Option<&str>,
) -> anyhow::Result<()> {
    let (ok, _, err) = kubectl(cluster, args, None).await?;
    ensure!(ok, "{what}: refused: {err}");
    if let Some(w) = warning {
        ensure!(
            err.contains(&format!("Warning: {w}")),
            "{what}: kubectl said {err:?}, expected warning {w:?}"
        );
    }
    Ok(())
}

pub(crate) async fn policy_rules(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "webhook-policy").await?;
    let mut fx = Fixture::start(
        &env,
        json!({"mig": {"strategy": "single"}}),
        steady_certs(&env),
    )
    .await?;
    fx.register_validating(&env.namespace).await?;
    let id = fx.id.clone();
    let ns = env.namespace.clone();
    let client = env.client.clone();
    let body = async {
        let merge = |p: Value| p.to_string();
        // A second policy, also as a dry run, which must leave nothing behind.
        let second = serde_json::to_value(policy(&format!("{id}-2"), &id, json!({}))?)?;
        refused(
            &cluster,
            "second policy",
            &["create", "-f", "-"],
            Some(&second),
            &format!("a ClusterPolicy named \"{id}\" already exists"),
        )
        .await?;
        refused(
            &cluster,
            "second policy (dry run)",
            &["create", "--dry-run=server", "-f", "-"],
            Some(&second),
            "already exists",
        )
        .await?;
        ensure!(
            Api::<ClusterPolicy>::all(client.clone())
                .get_opt(&format!("{id}-2"))
                .await?
                .is_none()
        );

        // ConfigMap references.
        refused(&cluster, "missing device-plugin ConfigMap", &["patch", "clusterpolicy", &id, "--type=merge", "-p", &merge(json!({"spec": {"devicePlugin": {"config": {"name": "no-such-config"}}}}))], None,
            &format!("spec.devicePlugin.config.name names ConfigMap \"no-such-config\", which does not exist in namespace {ns}")).await?;
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "mig-layouts"},
            "data": {"config.yaml": "version: v1\nmig-configs:\n  all-disabled:\n    - devices: all\n      mig-enabled: false\n  all-1g.10gb:\n    - devices: all\n      mig-enabled: true\n      mig-devices: {\"1g.10gb\": 7}\n"}
        }))?;
        Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &cm)
            .await?;
        refused(&cluster, "unknown MIG default", &["patch", "clusterpolicy", &id, "--type=merge", "-p", &merge(json!({"spec": {"migManager": {"config": {"name": "mig-layouts", "default": "all-2g.20gb"}}}}))], None,
            "spec.migManager.config.default is \"all-2g.20gb\"").await?;
        admitted(&cluster, "known MIG default", &["patch", "clusterpolicy", &id, "--type=merge", "-p", &merge(json!({"spec": {"migManager": {"config": {"name": "mig-layouts", "default": "all-1g.10gb"}}}}))], None).await?;

        // A pod on a MIG device blocks a strategy change.
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(gpu_pod(
                "mig-user",
                json!({}),
                json!({"nvidia.com/mig-1g.10gb": "1"}),
            ))?,
        )
        .await?;
        refused(&cluster, "strategy change under a MIG pod", &["patch", "clusterpolicy", &id, "--type=merge", "-p", &merge(json!({"spec": {"mig": {"strategy": "mixed"}}}))], None,
            // Counted, never named: the webhook's answer reaches whoever sent the review.
            "spec.mig.strategy cannot change from single to mixed while 1 pod(s) use MIG devices (in 1 namespace(s); kubectl get pods -A lists them)").await?;

        // Risky but legal: warnings.
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(gpu_pod(
                "trainer",
                json!({}),
                json!({"nvidia.com/gpu": "1"}),
            ))?,
        )
        .await?;
        admitted(
            &cluster,
            "driver disabled under GPU pods",
            &[
                "patch",
                "clusterpolicy",
                &id,
                "--type=merge",
                "-p",
                &merge(json!({"spec": {"driver": {"enabled": false}}})),
            ],
            Some("spec.driver.enabled is now false while 2 GPU pod(s) run"),
        )
        .await?;
        admitted(
            &cluster,
            "driver downgrade",
            &[
                "patch",
                "clusterpolicy",
                &id,
                "--type=merge",
                "-p",
                &merge(json!({"spec": {"driver": {"version": "570.172.08"}}})),
            ],
            Some("spec.driver.version goes down from 580.95.05 to 570.172.08"),
        )
        .await?;

        // Deleting under GPU pods needs the force annotation.
        refused(
            &cluster,
            "delete under GPU pods",
            &["delete", "clusterpolicy", &id],
            None,
            &format!("kubectl annotate clusterpolicy {id} gpupilot.io/force-delete=true"),
        )
        .await?;
        refused(
            &cluster,
            "delete under GPU pods (dry run)",
            &["delete", "--dry-run=server", "clusterpolicy", &id],
            None,
            "cannot be deleted while",
        )
        .await?;
        ensure!(
            Api::<ClusterPolicy>::all(client.clone())
                .get_opt(&id)
                .await?
                .is_some(),
            "the dry-run delete removed the policy"
        );
        admitted(
            &cluster,
            "force annotation",
            &[
                "annotate",
                "clusterpolicy",
                &id,
                "gpupilot.io/force-delete=true",
            ],
            None,
        )
        .await?;
        admitted(
            &cluster,
            "forced delete",
            &["delete", "clusterpolicy", &id],
            None,
        )
        .await?;
        Ok(())
    };
    with_cleanup(env, fx, body).await
}

pub(crate) async fn rotation_under_load(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "webhook-rotation").await?;
    // Short lives: a new serving certificate every ~8 s, a new CA staged after ~30 s and promoted
    // 5 s later.
    let certs = CertSettings {
        ca_validity: Duration::from_secs(90),
        ca_renew_before: Duration::from_secs(60),
        ca_overlap: Duration::from_secs(5),
        cert_validity: Duration::from_secs(20),
        cert_renew_before: Duration::from_secs(12),
        ..steady_certs(&env)
    };
    let mut fx = Fixture::start(&env, json!({}), certs).await?;
    fx.register_mutating(&env.namespace).await?;
    let ns = env.namespace.clone();
    let client = env.client.clone();
    let id = fx.id.clone();
    let metrics = fx.running().metrics.clone();
    let body = async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let mut serving = BTreeSet::new();
        let mut cas = BTreeSet::new();
        let mut failures = Vec::new();
        let mut created = 0;
        let start = Instant::now();
        let mut i = 0;
        // Until a CA rotation has gone through (at most 75 s): GPU pods one after another.
        while start.elapsed() < Duration::from_secs(75) && (cas.len() < 2 || serving.len() < 4) {
            i += 1;
            let name = format!("p{i}");
            // Dry runs pass admission exactly like real creates, without filling the shared
            // scheduler with a thousand Pending pods.
            match dry_run(
                &pods,
                gpu_pod(&name, json!({}), json!({"nvidia.com/gpu": "1"})),
            )
            .await
            {
                Ok(p)
                    if p.spec
                        .as_ref()
                        .and_then(|s| s.runtime_class_name.as_deref())
                        == Some(id.as_str()) =>
                {
                    created += 1
                }
                Ok(p) => failures.push(format!(
                    "{name}: admitted without mutation: {:?}",
                    p.spec.and_then(|s| s.runtime_class_name)
                )),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
            let s = secrets.get(TLS_SECRET).await?;
            let data = s.data.unwrap_or_default();
            serving.insert(
                data.get(names::TLS_CERT_KEY)
                    .map(|b| b.0.clone())
                    .unwrap_or_default(),
            );
            cas.insert(
                data.get(names::CA_CERT_KEY)
                    .map(|b| b.0.clone())
                    .unwrap_or_default(),
            );
        }
        ensure!(
            failures.is_empty(),
            "{} of {} pod creations failed during rotation:\n  {}",
            failures.len(),
            i,
            failures.join("\n  ")
        );
        ensure!(
            serving.len() >= 4,
            "only {} serving certificates seen in {:?}",
            serving.len(),
            start.elapsed()
        );
        ensure!(
            cas.len() >= 2,
            "the CA did not rotate within {:?}",
            start.elapsed()
        );
        ensure!(
            metrics.reloads() >= 4,
            "the server reloaded {} time(s)",
            metrics.reloads()
        );
        eprintln!(
            "webhook rotation: {created} GPU pods admitted and mutated (server-side dry runs), {} serving certificates, {} CAs, no failure",
            serving.len(),
            cas.len()
        );
        // Both configurations carry the bundle the Secret has.
        let bundle = ca_bundle(&client, &ns).await?;
        let m = Api::<MutatingWebhookConfiguration>::all(client.clone())
            .get(&id)
            .await?;
        let in_config = m.webhooks.unwrap()[0]
            .client_config
            .ca_bundle
            .clone()
            .unwrap()
            .0;
        if in_config != bundle {
            // The Secret may have moved on after the last sync: wait for the next one.
            eventually(
                "caBundle matches the Secret",
                Duration::from_secs(10),
                || {
                    let client = client.clone();
                    let ns = ns.clone();
                    let id = id.clone();
                    async move {
                        let b = ca_bundle(&client, &ns).await?;
                        let m = Api::<MutatingWebhookConfiguration>::all(client)
                            .get(&id)
                            .await?;
                        Ok(
                            if m.webhooks.unwrap()[0]
                                .client_config
                                .ca_bundle
                                .clone()
                                .unwrap()
                                .0
                                == b
                            {
                                Ok(())
                            } else {
                                Err("differs".to_string())
                            },
                        )
                    }
                },
            )
            .await?;
        }
        Ok(())
    };
    with_cleanup(env, fx, body).await
}

pub(crate) async fn webhook_down(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "webhook-down").await?;
    let mut fx = Fixture::start(&env, json!({}), steady_certs(&env)).await?;
    fx.register_mutating(&env.namespace).await?;
    fx.register_validating(&env.namespace).await?;
    let ns = env.namespace.clone();
    let client = env.client.clone();
    // Stop the server; the registration stays.
    if let Some(r) = fx.running.take() {
        r.stop().await;
    }
    let body = async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        // failurePolicy Fail: a GPU pod is refused with the reason...
        let (ok, _, err) = kubectl(
            &cluster,
            &["-n", &ns, "create", "-f", "-"],
            Some(&gpu_pod("gpu", json!({}), json!({"nvidia.com/gpu": "1"}))),
        )
        .await?;
        ensure!(!ok, "a GPU pod was admitted while the webhook was down");
        ensure!(
            err.contains("failed calling webhook") && err.contains(names::MUTATE_PODS_WEBHOOK),
            "kubectl said: {err}"
        );
        ensure!(pods.get_opt("gpu").await?.is_none());
        // A ClusterPolicy create is let through (its entry is Ignore: that is how an install
        // creates the policy before the webhook's pods are ready); an edit waits for the guard.
        let policies: Api<ClusterPolicy> = Api::all(client.clone());
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        policies
            .create(&dry, &policy(&format!("{ns}-down"), &ns, json!({}))?)
            .await
            .context("a ClusterPolicy create was refused while the webhook was down")?;
        let dry_patch = PatchParams {
            dry_run: true,
            ..Default::default()
        };
        match policies
            .patch(
                &ns,
                &dry_patch,
                &Patch::Merge(json!({"spec": {"mig": {"strategy": "mixed"}}})),
            )
            .await
        {
            Err(kube::Error::Api(e)) if e.message.contains("failed calling webhook") => {}
            other => anyhow::bail!(
                "a policy edit while the webhook was down: {:?}",
                other.map(|_| "admitted")
            ),
        }
        // ...while pods that ask for no GPU never reach the webhook and are created as usual.
        let plain = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"}, "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}});
        let (ok, _, err) =
            kubectl(&cluster, &["-n", &ns, "create", "-f", "-"], Some(&plain)).await?;
        ensure!(
            ok,
            "a plain pod was refused while the webhook was down: {err}"
        );
        Ok(())
    };
    with_cleanup(env, fx, body).await
}

pub(crate) async fn least_privilege(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "webhook-rbac").await?;
    let id = env.namespace.clone();
    // The shipped RBAC, named for this test, and a client that acts as its ServiceAccount.
    let rbac = gpu_pilot_core::render::webhook::rbac_for(&id, &id, TLS_SECRET);
    let list = json!({"apiVersion": "v1", "kind": "List", "items": rbac});
    let (ok, _, err) = kubectl(&cluster, &["create", "-f", "-"], Some(&list)).await?;
    ensure!(ok, "creating the RBAC objects: {err}");
    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig())?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{id}:{id}"));
    let as_webhook = Client::try_from(config)?;
    // Short-lived serving certificates, so the Secret is rewritten under this identity too.
    let certs = CertSettings {
        cert_validity: Duration::from_secs(8),
        cert_renew_before: Duration::from_secs(4),
        ..steady_certs(&env)
    };
    let started = Fixture::start_as(&env, json!({}), certs, as_webhook.clone()).await;
    let mut fx = match started {
        Ok(fx) => fx,
        Err(e) => {
            cleanup_rbac(&env.client, &id).await;
            env.cleanup().await;
            return Err(e.context("the webhook did not start with its own RBAC"));
        }
    };
    let client = env.client.clone();
    let ns = env.namespace.clone();
    let body = async {
        // Registered without a caBundle: the webhook must fill it in (get/update on its
        // configurations) before the apiserver can call it.
        fx.registration.ca_bundle = None;
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &fx.registration.mutating())
            .await?;
        Api::<ValidatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &fx.registration.validating())
            .await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let rc = fx.id.clone();
        eventually(
            "a GPU pod mutated by the webhook running as its ServiceAccount",
            Duration::from_secs(30),
            || {
                let pods = pods.clone();
                let rc = rc.clone();
                async move {
                    let out = dry_run(
                        &pods,
                        gpu_pod("probe", json!({}), json!({"nvidia.com/gpu": "1"})),
                    )
                    .await?;
                    Ok(match out.spec.and_then(|s| s.runtime_class_name) {
                        Some(r) if r == rc => Ok(()),
                        other => Err(format!("runtimeClassName {other:?}")),
                    })
                }
            },
        )
        .await?;
        // Policy rules read policies, pods and ConfigMaps.
        let (ok, _, err) = kubectl(
            &cluster,
            &[
                "patch",
                "clusterpolicy",
                &fx.id,
                "--type=merge",
                "-p",
                &json!({"spec": {"devicePlugin": {"config": {"name": "absent"}}}}).to_string(),
            ],
            None,
        )
        .await?;
        ensure!(
            !ok && err.contains("spec.devicePlugin.config.name"),
            "kubectl said: {err}"
        );
        let (ok, _, err) = kubectl(
            &cluster,
            &[
                "patch",
                "clusterpolicy",
                &fx.id,
                "--type=merge",
                "-p",
                &json!({"spec": {"driver": {"version": "570.172.08"}}}).to_string(),
            ],
            None,
        )
        .await?;
        ensure!(ok && err.contains("goes down"), "kubectl said: {err}");
        // Its Role lets it create Secrets (RBAC cannot narrow create by name); the admission
        // policy shipped with it refuses any but its own TLS Secret, so it cannot mint a
        // service-account token Secret for another account.
        let secrets: Api<Secret> = Api::namespaced(as_webhook.clone(), &ns);
        for (name, kind, extra) in [
            (
                "minted-token",
                "kubernetes.io/service-account-token",
                json!({"kubernetes.io/service-account.name": "default"}),
            ),
            ("other-tls", "kubernetes.io/tls", json!({})),
            (TLS_SECRET, "Opaque", json!({})),
        ] {
            let mut secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "annotations": extra}, "type": kind});
            if kind == "kubernetes.io/tls" {
                secret["data"] = json!({"tls.crt": "", "tls.key": ""});
            }
            let refused = secrets
                .create(&PostParams::default(), &serde_json::from_value(secret)?)
                .await;
            match refused {
                Err(kube::Error::Api(e)) if e.code == 422 || e.code == 403 || e.code == 409 => {
                    ensure!(
                        e.code == 409 || e.message.contains("may only write its own TLS Secret"),
                        "creating Secret {name} ({kind}) as the webhook: {e:?}"
                    );
                }
                other => anyhow::bail!(
                    "the webhook's account created Secret {name} ({kind}): {:?}",
                    other.map(|_| "created")
                ),
            }
        }
        // What `kubectl auth can-i --list` shows for the account, beyond what any account may,
        // is what docs/architecture.md says.
        gpu_pilot_e2e::rbac::ensure_documented(&cluster, &ns, &id, "gpu-pilot-webhook", |row| {
            row.replace(&format!("[{id}]"), &format!("[{}]", names::NAME))
                .replace(
                    &format!("[{TLS_SECRET}]"),
                    &format!("[{}]", names::TLS_SECRET),
                )
        })
        .await?;
        // And it keeps rotating its certificate.
        let metrics = fx.running().metrics.clone();
        eventually(
            "a rotated serving certificate served",
            Duration::from_secs(20),
            || {
                let m = metrics.clone();
                async move {
                    Ok(if m.reloads() >= 3 {
                        Ok(())
                    } else {
                        Err(format!("{} reloads", m.reloads()))
                    })
                }
            },
        )
        .await?;
        Ok(())
    };
    let result = body.await;
    cleanup_rbac(&env.client, &id).await;
    with_cleanup(env, fx, async { result }).await
}

async fn cleanup_rbac(client: &Client, id: &str) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let dp = DeleteParams::default();
    let policy = gpu_pilot_core::render::webhook::own_secret_policy(id);
    let _ = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .delete(&policy, &dp)
        .await;
    let _ = Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .delete(&policy, &dp)
        .await;
    let _ = Api::<ClusterRoleBinding>::all(client.clone())
        .delete(id, &dp)
        .await;
    let _ = Api::<ClusterRole>::all(client.clone())
        .delete(id, &dp)
        .await;
}
