//! The admission webhook test fixture: one webhook per test, run in this process on 127.0.0.1
//! (port 0) and registered by URL under configurations named after the test's namespace, with a
//! RuntimeClass and ClusterPolicy of its own; and a CA made with rcgen, independent of the
//! webhook's own certificate code, for the TLS tests.

use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::webhook as names;
use gpu_pilot_core::render::webhook::{Registration, Target};
use gpu_pilot_webhook::certs::CertSettings;
use gpu_pilot_webhook::cluster::Scope;
use gpu_pilot_webhook::server::Limits;
use gpu_pilot_webhook::{CertSource, Options, Running};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::{Cluster, TestEnv, ensure_crd, eventually};

/// Marks the ClusterPolicies and Nodes one test's webhook looks at.
pub const TEST_LABEL: &str = "gpupilot.io/e2e-webhook";
pub const TLS_SECRET: &str = "webhook-tls";
pub const MUTATE_ENDPOINT: &str = "mutate_pods";

/// Certificates that live long enough not to rotate during a test.
pub fn steady_certs(env: &TestEnv) -> CertSettings {
    CertSettings {
        namespace: env.namespace.clone(),
        secret: TLS_SECRET.into(),
        names: vec!["127.0.0.1".into()],
        ca_validity: Duration::from_secs(86400),
        ca_renew_before: Duration::from_secs(3600),
        ca_overlap: Duration::from_secs(60),
        cert_validity: Duration::from_secs(7200),
        cert_renew_before: Duration::from_secs(600),
        mutating_config: Some(env.namespace.clone()),
        validating_config: Some(env.namespace.clone()),
    }
}

/// One test's webhook, its registration and the objects made for it.
pub struct Fixture {
    pub client: Client,
    pub id: String,
    pub running: Option<Running>,
    pub registration: Registration,
    pub made_nodes: Vec<String>,
}

impl Fixture {
    /// Starts a webhook for the test: a RuntimeClass and ClusterPolicy of its own (named after
    /// the namespace), then the server.
    pub async fn start(
        env: &TestEnv,
        policy_spec: Value,
        certs: CertSettings,
    ) -> anyhow::Result<Fixture> {
        Fixture::start_as(env, policy_spec, certs, env.client.clone()).await
    }

    /// Like [`Fixture::start`], with the webhook talking to the apiserver as `webhook_client`.
    pub async fn start_as(
        env: &TestEnv,
        policy_spec: Value,
        certs: CertSettings,
        webhook_client: Client,
    ) -> anyhow::Result<Fixture> {
        let mut fx = Fixture::prepare(env, policy_spec).await?;
        let running = start_webhook(env, CertSource::Secret(certs), webhook_client).await?;
        fx.registration.target = Target::Url(format!("https://{}", running.addr));
        fx.running = Some(running);
        Ok(fx)
    }

    /// The test's RuntimeClass and ClusterPolicy (named after the namespace) and a registration
    /// for a webhook not started yet (its URL is set once it listens).
    pub async fn prepare(env: &TestEnv, policy_spec: Value) -> anyhow::Result<Fixture> {
        ensure_crd(&env.client).await?;
        let id = env.namespace.clone();
        let rc: RuntimeClass = serde_json::from_value(json!({
            "metadata": { "name": id, "labels": { (TEST_LABEL): id } }, "handler": "nvidia"
        }))?;
        Api::<RuntimeClass>::all(env.client.clone())
            .create(&PostParams::default(), &rc)
            .await
            .context("creating the test's RuntimeClass")?;
        let mut spec = policy_spec;
        spec["operator"] = json!({ "runtimeClass": id });
        create_policy(&env.client, &id, &id, spec).await?;
        let registration = Registration {
            name: id.clone(),
            // Port 1 refuses connections: nothing is called before the real URL is set.
            target: Target::Url("https://127.0.0.1:1".into()),
            excluded_namespaces: Vec::new(),
            namespace_match: vec![
                json!({"key": names::NAMESPACE_NAME_LABEL, "operator": "In", "values": [id]}),
            ],
            policy_match: vec![json!({"key": TEST_LABEL, "operator": "In", "values": [id]})],
            cert_manager_certificate: None,
            ca_bundle: None,
        };
        Ok(Fixture {
            client: env.client.clone(),
            id,
            running: None,
            registration,
            made_nodes: Vec::new(),
        })
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("the webhook runs")
    }

    /// Registers the pod webhook and waits until the apiserver calls it.
    pub async fn register_mutating(&mut self, ns: &str) -> anyhow::Result<()> {
        let bundle = ca_bundle(&self.client, ns).await?;
        self.register_mutating_with(ns, bundle).await
    }

    /// Registers the pod webhook with `bundle` as its caBundle and waits until the apiserver
    /// calls it.
    pub async fn register_mutating_with(
        &mut self,
        ns: &str,
        bundle: Vec<u8>,
    ) -> anyhow::Result<()> {
        self.registration.ca_bundle = Some(bundle);
        Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .create(&PostParams::default(), &self.registration.mutating())
            .await
            .context("registering the MutatingWebhookConfiguration")?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let rc = self.id.clone();
        eventually(
            "the apiserver calls the pod webhook",
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
        .await
    }

    /// Registers the ClusterPolicy webhook and waits until the apiserver calls it.
    pub async fn register_validating(&mut self, ns: &str) -> anyhow::Result<()> {
        self.registration.ca_bundle = Some(ca_bundle(&self.client, ns).await?);
        Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
            .create(&PostParams::default(), &self.registration.validating())
            .await
            .context("registering the ValidatingWebhookConfiguration")?;
        let client = self.client.clone();
        let id = self.id.clone();
        eventually(
            "the apiserver calls the policy webhook",
            Duration::from_secs(30),
            || {
                let client = client.clone();
                let id = id.clone();
                async move {
                    // A second policy is refused once the webhook is in the path.
                    let second = policy(&format!("{id}-probe"), &id, json!({}))?;
                    let pp = PostParams {
                        dry_run: true,
                        ..Default::default()
                    };
                    Ok(
                        match Api::<ClusterPolicy>::all(client).create(&pp, &second).await {
                            Err(kube::Error::Api(e)) if e.message.contains("already exists") => {
                                Ok(())
                            }
                            other => Err(format!("{:?}", other.map(|_| "admitted"))),
                        },
                    )
                }
            },
        )
        .await
    }

    /// Stops the server and removes everything the fixture made.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
        let dp = DeleteParams::default();
        let _ = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .delete(&self.id, &dp)
            .await;
        let _ = Api::<ValidatingWebhookConfiguration>::all(self.client.clone())
            .delete(&self.id, &dp)
            .await;
        let _ = Api::<RuntimeClass>::all(self.client.clone())
            .delete(&self.id, &dp)
            .await;
        let policies: Api<ClusterPolicy> = Api::all(self.client.clone());
        if let Ok(list) = policies
            .list(&kube::api::ListParams::default().labels(&format!("{TEST_LABEL}={}", self.id)))
            .await
        {
            for p in list.items {
                let _ = policies
                    .delete(&p.metadata.name.unwrap_or_default(), &dp)
                    .await;
            }
        }
        for n in &self.made_nodes {
            let _ = Api::<Node>::all(self.client.clone()).delete(n, &dp).await;
        }
    }
}

pub async fn start_webhook(
    env: &TestEnv,
    certs: CertSource,
    client: Client,
) -> anyhow::Result<Running> {
    let selector = format!("{TEST_LABEL}={}", env.namespace);
    let opts = Options {
        listen: "127.0.0.1:0".parse()?,
        scope: Scope {
            namespace: env.namespace.clone(),
            policy_selector: selector.clone(),
            node_selector: selector,
            pod_namespaces: vec![env.namespace.clone()],
        },
        certs,
        limits: Limits::default(),
        check_interval: Duration::from_secs(1),
        startup_timeout: Duration::from_secs(60),
    };
    Ok(Running::start(client, opts).await?)
}

pub async fn ca_bundle(client: &Client, ns: &str) -> anyhow::Result<Vec<u8>> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(TLS_SECRET)
        .await
        .context("the webhook's TLS Secret")?;
    let data = secret.data.unwrap_or_default();
    Ok(data
        .get(names::CA_BUNDLE_KEY)
        .context("the TLS Secret has no CA bundle")?
        .0
        .clone())
}

pub fn policy(name: &str, id: &str, spec: Value) -> anyhow::Result<ClusterPolicy> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
        "metadata": { "name": name, "labels": { (TEST_LABEL): id } },
        "spec": spec,
    }))?)
}

pub async fn create_policy(
    client: &Client,
    name: &str,
    id: &str,
    spec: Value,
) -> anyhow::Result<()> {
    Api::<ClusterPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy(name, id, spec)?)
        .await
        .with_context(|| format!("creating ClusterPolicy {name}"))?;
    Ok(())
}

pub fn gpu_pod(name: &str, annotations: Value, limits: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "annotations": annotations },
        "spec": { "containers": [{
            "name": "cuda", "image": "registry.k8s.io/pause:3.10",
            "resources": { "limits": limits }
        }]}
    })
}

pub async fn dry_run(pods: &Api<Pod>, pod: Value) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(pod)?;
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    Ok(pods.create(&pp, &pod).await?)
}

/// Runs the real kubectl with `stdin`, returning (success, stdout, stderr). Async, because the
/// webhook it ends up calling runs on this same runtime.
pub async fn kubectl(
    cluster: &Cluster,
    args: &[&str],
    stdin: Option<&Value>,
) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = tokio::process::Command::from(cluster.kubectl());
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running kubectl")?;
    let mut input = child.stdin.take().expect("piped stdin");
    if let Some(v) = stdin {
        input.write_all(v.to_string().as_bytes()).await?;
    }
    drop(input);
    let out = child.wait_with_output().await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

pub fn gpu_tolerations(pod: &Pod) -> usize {
    pod.spec
        .as_ref()
        .and_then(|s| s.tolerations.as_ref())
        .map(|t| {
            t.iter()
                .filter(|t| t.key.as_deref() == Some(gpu_pilot_api::names::GPU_TAINT_KEY))
                .count()
        })
        .unwrap_or(0)
}

/// Runs `body`, then always tears down the fixture and namespace.
pub async fn with_cleanup<F>(env: TestEnv, fx: Fixture, body: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let result = body.await;
    fx.stop().await;
    env.cleanup().await;
    result
}

/// A CA made here with rcgen, independent of the webhook's own certificate code.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<TestCa> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ok(TestCa {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate()?)?,
        })
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A serving certificate for 127.0.0.1, valid for `hours`, and its key, as PEM.
    pub fn leaf(&self, hours: i64) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(5);
        p.not_after = now + time::Duration::hours(hours);
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Connects to `addr` trusting only the certificates in `bundle` (as the apiserver does with a
/// caBundle) and returns the certificate the server handed out, DER.
pub async fn served_certificate(addr: SocketAddr, bundle: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr}"))?;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .context("the server sent no certificate")?;
    Ok(certs[0].to_vec())
}
