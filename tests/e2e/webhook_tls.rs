//! The webhook's TLS as the apiserver meets it: certificates written to files by someone else
//! (cert-manager) and rotated on disk under load, and two replicas racing to make the one CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use gpu_pilot_api::names::webhook as names;
use gpu_pilot_e2e::{Cluster, TestEnv, eventually};
use gpu_pilot_webhook::certs::CertSummary;
use gpu_pilot_webhook::{CertSource, Running};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{ListParams, PostParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;

use crate::webhook::{
    Fixture, MUTATE_ENDPOINT, TLS_SECRET, ca_bundle, dry_run, gpu_pod, start_webhook, steady_certs,
    with_cleanup,
};

pub(crate) use gpu_pilot_e2e::webhook::{TestCa, served_certificate};

/// Reads, changes and writes back a MutatingWebhookConfiguration.
async fn edit_mutating(
    client: &kube::Client,
    name: &str,
    change: impl FnOnce(&mut MutatingWebhookConfiguration),
) -> anyhow::Result<()> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut m = api.get(name).await?;
    change(&mut m);
    api.replace(name, &PostParams::default(), &m).await?;
    Ok(())
}

fn der(pem: &str) -> anyhow::Result<Vec<u8>> {
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())
}

fn describe(der: &[u8]) -> String {
    CertSummary::from_der(der)
        .map(|s| format!("serial {} not after {}", s.serial, s.not_after))
        .unwrap_or_else(|| "an unreadable certificate".into())
}

/// A directory laid out the way the kubelet mounts a Secret: `tls.crt` and `tls.key` are links
/// into `..data`, itself a link to a versioned directory that a rotation swaps in one rename.
struct MountedSecret {
    dir: PathBuf,
    version: u32,
}

impl MountedSecret {
    fn new(dir: PathBuf, cert: &str, key: &str) -> anyhow::Result<MountedSecret> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut m = MountedSecret { dir, version: 0 };
        m.swap_in(cert, key)?;
        for f in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(Path::new("..data").join(f), m.dir.join(f))?;
        }
        Ok(m)
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }

    /// The kubelet's atomic update: a new directory, then one rename of the `..data` link.
    fn swap_in(&mut self, cert: &str, key: &str) -> anyhow::Result<()> {
        self.version += 1;
        let name = format!("..v{}", self.version);
        let v = self.dir.join(&name);
        std::fs::create_dir(&v)?;
        std::fs::write(v.join("tls.crt"), cert)?;
        std::fs::write(v.join("tls.key"), key)?;
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        Ok(())
    }

    /// A writer that is not atomic, caught half-way.
    fn write_in_place(&self, cert: &str, key: &str) -> anyhow::Result<()> {
        std::fs::write(self.cert(), cert)?;
        std::fs::write(self.key(), key)?;
        Ok(())
    }
}

/// GPU pods created one after another until `done` says the step is over; every one must be
/// admitted and mutated by the webhook.
struct Load {
    pods: Api<Pod>,
    runtime_class: String,
    admitted: usize,
    failures: Vec<String>,
}

impl Load {
    async fn one(&mut self) {
        let name = format!("p{}", self.admitted + self.failures.len());
        // Server-side dry runs pass admission exactly like real creates, without filling the
        // shared scheduler with pending pods.
        match dry_run(
            &self.pods,
            gpu_pod(&name, json!({}), json!({"nvidia.com/gpu": "1"})),
        )
        .await
        {
            Ok(p)
                if p.spec
                    .as_ref()
                    .and_then(|s| s.runtime_class_name.as_deref())
                    == Some(self.runtime_class.as_str()) =>
            {
                self.admitted += 1
            }
            Ok(p) => self.failures.push(format!(
                "{name}: admitted without mutation: {:?}",
                p.spec.and_then(|s| s.runtime_class_name)
            )),
            Err(e) => self.failures.push(format!("{name}: {e:#}")),
        }
    }

    /// Creates pods until `check` holds (checked between pods), or fails after 30 s.
    async fn until<F, Fut>(&mut self, what: &str, mut check: F) -> anyhow::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<Result<(), String>>>,
    {
        let start = Instant::now();
        loop {
            self.one().await;
            let last = match check().await? {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            ensure!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: still not true after 30 s of pod creations; last seen: {last}"
            );
        }
    }
}

/// cert-manager mode: `serve --tls-cert-file/--tls-key-file` over files that change on disk.
pub(crate) async fn cert_files_rotate_under_load(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "webhook-cert-files").await?;
    let ca1 = TestCa::new("e2e cert-manager CA 1")?;
    let (c1, k1) = ca1.leaf(24)?;
    let mut mounted = MountedSecret::new(
        std::env::temp_dir().join(format!("{}-tls", env.namespace)),
        &c1,
        &k1,
    )?;
    let mut fx = Fixture::prepare(&env, json!({})).await?;
    let source = CertSource::Files {
        cert: mounted.cert(),
        key: mounted.key(),
    };
    let started = start_webhook(&env, source, env.client.clone()).await;
    let running = match started {
        Ok(r) => r,
        Err(e) => {
            fx.stop().await;
            env.cleanup().await;
            return Err(e.context("the webhook did not start on certificate files"));
        }
    };
    let addr = running.addr;
    fx.registration.target =
        gpu_pilot_core::render::webhook::Target::Url(format!("https://{addr}"));
    fx.running = Some(running);
    let dir = mounted.dir.clone();
    let ns = env.namespace.clone();
    let client = env.client.clone();
    let body = async {
        // cert-manager's CA injector would put ca.crt here; the test does it.
        fx.register_mutating_with(&ns, ca1.pem().into_bytes())
            .await?;
        let metrics = fx.running().metrics.clone();
        let mut load = Load {
            pods: Api::namespaced(client.clone(), &ns),
            runtime_class: fx.id.clone(),
            admitted: 0,
            failures: Vec::new(),
        };
        let bundle1 = ca1.pem().into_bytes();
        let first = served_certificate(addr, &bundle1).await?;
        ensure!(
            first == der(&c1)?,
            "the webhook does not serve the file's certificate"
        );
        let mut seen = vec![describe(&first)];
        let served_is = |want: Vec<u8>, bundle: Vec<u8>| {
            move || {
                let (want, bundle) = (want.clone(), bundle.clone());
                async move {
                    let got = served_certificate(addr, &bundle).await?;
                    Ok(if got == want {
                        Ok(())
                    } else {
                        Err(format!("still serving {}", describe(&got)))
                    })
                }
            }
        };

        // 1. cert-manager renews the leaf (same CA); the kubelet swaps the mounted files.
        let (c2, k2) = ca1.leaf(48)?;
        mounted.swap_in(&c2, &k2)?;
        load.until(
            "the renewed certificate is served",
            served_is(der(&c2)?, bundle1.clone()),
        )
        .await?;
        seen.push(describe(&der(&c2)?));

        // 2. A writer caught half-way: a new certificate next to the old key, then a truncated
        // certificate. Neither may be served; the previous one stays, requests keep passing.
        let (c3, k3) = ca1.leaf(72)?;
        let failed_before = metrics.reload_failures();
        mounted.write_in_place(&c3, &k2)?;
        load.until("the mismatched pair is refused", || {
            let m = metrics.clone();
            async move {
                Ok(if m.reload_failures() >= failed_before + 2 {
                    Ok(())
                } else {
                    Err("fewer than two refused reads yet".to_string())
                })
            }
        })
        .await?;
        let still = served_certificate(addr, &bundle1).await?;
        ensure!(
            still == der(&c2)?,
            "after a mismatched pair the webhook serves {}",
            describe(&still)
        );
        let failed_before = metrics.reload_failures();
        mounted.write_in_place(&c3[..c3.len() / 2], &k3)?;
        load.until("the truncated certificate is refused", || {
            let m = metrics.clone();
            async move {
                Ok(if m.reload_failures() >= failed_before + 2 {
                    Ok(())
                } else {
                    Err("fewer than two refused reads yet".to_string())
                })
            }
        })
        .await?;
        let still = served_certificate(addr, &bundle1).await?;
        ensure!(
            still == der(&c2)?,
            "after a truncated certificate the webhook serves {}",
            describe(&still)
        );
        // The writer finishes: the complete pair is served.
        mounted.write_in_place(&c3, &k3)?;
        load.until(
            "the completed pair is served",
            served_is(der(&c3)?, bundle1.clone()),
        )
        .await?;
        seen.push(describe(&der(&c3)?));

        // 3. A new CA. The injector puts old and new CA in the caBundle first; the webhook
        // switches to a leaf of the new CA only once the apiserver uses that bundle. The same
        // update stops sending pods labelled `e2e-bundle: old` to the webhook, which tells when
        // the apiserver has taken the update in.
        let ca2 = TestCa::new("e2e cert-manager CA 2")?;
        let both = format!("{}{}", ca1.pem(), ca2.pem()).into_bytes();
        edit_mutating(&client, &fx.id, |m| {
            let w = &mut m.webhooks.as_mut().expect("one webhook")[0];
            w.client_config.ca_bundle = Some(k8s_openapi::ByteString(both.clone()));
            w.object_selector
                .get_or_insert_with(Default::default)
                .match_expressions
                .get_or_insert_with(Vec::new)
                .push(
                    serde_json::from_value(json!(
                        {"key": "e2e-bundle", "operator": "NotIn", "values": ["old"]}
                    ))
                    .expect("a label selector requirement"),
                );
        })
        .await
        .context("adding the new CA to the caBundle")?;
        let pods = load.pods.clone();
        eventually(
            "the apiserver uses the updated configuration",
            Duration::from_secs(30),
            || {
                let pods = pods.clone();
                async move {
                    let mut probe = gpu_pod("probe", json!({}), json!({"nvidia.com/gpu": "1"}));
                    probe["metadata"]["labels"] = json!({"e2e-bundle": "old"});
                    let p = dry_run(&pods, probe).await?;
                    Ok(match p.spec.and_then(|s| s.runtime_class_name) {
                        None => Ok(()),
                        Some(rc) => Err(format!("still mutated (runtimeClassName {rc})")),
                    })
                }
            },
        )
        .await?;
        let (c4, k4) = ca2.leaf(96)?;
        mounted.swap_in(&c4, &k4)?;
        load.until(
            "the new CA's certificate is served",
            served_is(der(&c4)?, both.clone()),
        )
        .await?;
        // Only the new CA is needed now.
        served_certificate(addr, ca2.pem().as_bytes())
            .await
            .context("the served certificate with only the new CA trusted")?;
        seen.push(describe(&der(&c4)?));
        // A few more pods on the new certificate.
        for _ in 0..20 {
            load.one().await;
        }

        ensure!(
            load.failures.is_empty(),
            "{} of {} GPU pod creations failed while the files rotated:\n  {}",
            load.failures.len(),
            load.admitted + load.failures.len(),
            load.failures.join("\n  ")
        );
        eprintln!(
            "webhook cert files: {} GPU pods admitted and mutated (server-side dry runs), {} refused file states kept the served certificate, no failure; served in turn:\n  {}",
            load.admitted,
            metrics.reload_failures(),
            seen.join("\n  ")
        );
        Ok(())
    };
    let result = body.await;
    let result = with_cleanup(env, fx, async { result }).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Two replicas start at once in a namespace without the TLS Secret.
pub(crate) async fn replicas_race_to_one_ca(cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "webhook-replicas").await?;
    let fx = Fixture::prepare(&env, json!({})).await?;
    let ns = env.namespace.clone();
    let client = env.client.clone();
    let mut replicas: Vec<Running> = Vec::new();
    let body = async {
        // The configurations exist before either replica runs, without a caBundle: both replicas
        // fill it in at start-up, racing. The pod configuration has one webhook per replica.
        let mut mutating = fx.registration.mutating();
        let mut second = mutating.webhooks.as_ref().unwrap()[0].clone();
        second.name = format!("replica-b.{}", second.name);
        mutating.webhooks.as_mut().unwrap().push(second);
        let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        mwcs.create(&PostParams::default(), &mutating).await?;
        vwcs.create(&PostParams::default(), &fx.registration.validating())
            .await?;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

        let mut conflicts = 0;
        let mut last_ca: Option<Vec<u8>> = None;
        for round in 1..=3 {
            for r in replicas.drain(..) {
                r.stop().await;
            }
            if round > 1 {
                // The next round starts from nothing again.
                secrets
                    .delete(TLS_SECRET, &Default::default())
                    .await
                    .context("deleting the Secret between rounds")?;
            }
            ensure!(secrets.get_opt(TLS_SECRET).await?.is_none());
            let (a, b) = futures::join!(
                start_webhook(&env, CertSource::Secret(steady_certs(&env)), client.clone()),
                start_webhook(&env, CertSource::Secret(steady_certs(&env)), client.clone()),
            );
            let a = a.with_context(|| format!("round {round}: replica A did not start"))?;
            let b = b.with_context(|| format!("round {round}: replica B did not start"))?;
            let made: u64 = [&a, &b]
                .iter()
                .map(|r| r.metrics.certificate_rotations())
                .sum();
            conflicts += a.metrics.write_conflicts() + b.metrics.write_conflicts();
            replicas = vec![a, b];
            ensure!(
                made == 1,
                "round {round}: the replicas wrote {made} certificate sets to the Secret, want exactly one"
            );

            // One Secret; both replicas serve its certificate, and the caBundle in both
            // configurations is the Secret's and verifies both.
            let listed = secrets
                .list(&ListParams::default().labels("app.kubernetes.io/component=webhook"))
                .await?;
            ensure!(
                listed.items.len() == 1,
                "round {round}: {} webhook Secrets",
                listed.items.len()
            );
            let secret = secrets.get(TLS_SECRET).await?;
            let data = secret.data.unwrap_or_default();
            let leaf = der(std::str::from_utf8(&data[names::TLS_CERT_KEY].0)?)?;
            let bundle = ca_bundle(&client, &ns).await?;
            let ca = data[names::CA_CERT_KEY].0.clone();
            // Round 1 starts from nothing: one CA. Later rounds start with the configurations
            // still trusting the CA of the round before (its Secret was deleted): that one stays
            // in the bundle next to the new CA, for --ca-overlap, so no replica still serving a
            // certificate from it is refused in between.
            let previous = data.get(names::PREVIOUS_CA_CERT_KEY).map(|b| b.0.clone());
            match (&last_ca, &previous) {
                (None, None) => ensure!(
                    bundle == ca,
                    "round {round}: the bundle is not the Secret's one CA"
                ),
                (Some(last), Some(prev)) => ensure!(
                    prev.windows(last.len()).any(|w| w == last.as_slice())
                        && bundle == [ca.clone(), prev.clone()].concat(),
                    "round {round}: the bundle is not the new CA followed by the previous round's"
                ),
                _ => anyhow::bail!(
                    "round {round}: the previous round's CA is {} in the Secret",
                    if previous.is_some() {
                        "unexpectedly"
                    } else {
                        "not"
                    }
                ),
            }
            last_ca = Some(ca);
            let m = mwcs.get(&fx.id).await?;
            let v = vwcs.get(&fx.id).await?;
            let in_configs: Vec<Vec<u8>> = m
                .webhooks
                .iter()
                .flatten()
                .map(|w| &w.client_config)
                .chain(v.webhooks.iter().flatten().map(|w| &w.client_config))
                .map(|c| c.ca_bundle.clone().map(|b| b.0).unwrap_or_default())
                .collect();
            ensure!(
                in_configs.len()
                    == m.webhooks.iter().flatten().count() + v.webhooks.iter().flatten().count()
                    && in_configs.iter().all(|b| *b == bundle),
                "round {round}: the configurations' caBundles are not the Secret's"
            );
            for (name, r) in [("A", &replicas[0]), ("B", &replicas[1])] {
                let served = served_certificate(r.addr, &bundle)
                    .await
                    .with_context(|| format!("round {round}: replica {name} with the caBundle"))?;
                ensure!(
                    served == leaf,
                    "round {round}: replica {name} serves {}, the Secret holds {}",
                    describe(&served),
                    describe(&leaf)
                );
            }
        }

        // The apiserver calls both replicas through the bundle they agreed on.
        let (a, b) = (replicas[0].addr, replicas[1].addr);
        edit_mutating(&client, &fx.id, |m| {
            for w in m.webhooks.iter_mut().flatten() {
                let addr = if w.name.starts_with("replica-b.") {
                    b
                } else {
                    a
                };
                w.client_config.url = Some(format!("https://{addr}{}", names::MUTATE_PODS_PATH));
            }
        })
        .await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let (ma, mb) = (replicas[0].metrics.clone(), replicas[1].metrics.clone());
        let rc = fx.id.clone();
        eventually(
            "the apiserver calls both replicas",
            Duration::from_secs(30),
            || {
                let (pods, ma, mb, rc) = (pods.clone(), ma.clone(), mb.clone(), rc.clone());
                async move {
                    let p = dry_run(
                        &pods,
                        gpu_pod("probe", json!({}), json!({"nvidia.com/gpu": "1"})),
                    )
                    .await?;
                    let (a, b) = (ma.total(MUTATE_ENDPOINT), mb.total(MUTATE_ENDPOINT));
                    let mutated = p.spec.and_then(|s| s.runtime_class_name) == Some(rc);
                    Ok(if mutated && a > 0 && b > 0 {
                        Ok(())
                    } else {
                        Err(format!("mutated {mutated}, calls: A {a}, B {b}"))
                    })
                }
            },
        )
        .await?;
        eprintln!(
            "webhook replicas: 3 rounds of two replicas starting at once made one CA each round ({conflicts} write conflict(s) re-read and resolved), both serve the Secret's certificate, the apiserver calls both"
        );
        Ok(())
    };
    let result = body.await;
    for r in replicas.drain(..) {
        r.stop().await;
    }
    with_cleanup(env, fx, async { result }).await
}
