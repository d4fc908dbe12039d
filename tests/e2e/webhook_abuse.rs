//! A client that abuses the webhook directly, as any pod can: it must not stop GPU pods from
//! being admitted through the apiserver.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use gpu_pilot_e2e::webhook::{Fixture, ca_bundle, dry_run, gpu_pod, steady_certs, with_cleanup};
use gpu_pilot_e2e::{Cluster, TestEnv, eventually};
use gpu_pilot_webhook::metrics::Shed;
use hyper::body::{Bytes, Frame};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;

/// Where the abuse comes from: another loopback address than the apiserver's 127.0.0.1, as a pod
/// has its own IP.
const ABUSER: [u8; 4] = [127, 0, 0, 2];

/// An HTTP/2 connection from [`ABUSER`] that trusts `bundle`.
async fn h2_from_abuser(
    addr: SocketAddr,
    bundle: &[u8],
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<AbuseBody>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle) {
        roots.add(c?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::from((ABUSER, 0)))
        .context("binding 127.0.0.2 (Linux routes all of 127.0.0.0/8 to lo)")?;
    let tcp = socket.connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await?;
    tokio::spawn(conn);
    Ok(send)
}

/// A body that declares a length and never sends a byte of it.
type AbuseBody =
    http_body_util::StreamBody<futures::stream::Pending<Result<Frame<Bytes>, Infallible>>>;

/// Keeps `streams` reviews open on `send`, each declaring a body it never sends; each one the
/// webhook ends (429 at once, or its request timeout) is opened again, until the task is dropped.
fn hold_streams(
    send: hyper::client::conn::http2::SendRequest<AbuseBody>,
    streams: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..streams)
        .map(|_| {
            let mut send = send.clone();
            tokio::spawn(async move {
                loop {
                    if send.ready().await.is_err() {
                        return;
                    }
                    let req = hyper::Request::post("/mutate/pods")
                        .header("content-type", "application/json")
                        .header("content-length", "1024")
                        .body(http_body_util::StreamBody::new(futures::stream::pending()))
                        .expect("a request");
                    match send.send_request(req).await {
                        // Refused at once: wait a little, as a stubborn client would not.
                        Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        })
        .collect()
}

/// One client holds as many review streams open as HTTP/2 lets it, each with a body it never
/// sends. It gets its share (`--max-in-flight-per-peer`) and no more, so the apiserver's own
/// reviews always find a free slot: every GPU pod created meanwhile is mutated, and no review is
/// shed for the webhook's total capacity.
pub(crate) async fn abusive_client_cannot_starve_the_apiserver(
    cluster: Arc<Cluster>,
) -> anyhow::Result<()> {
    let env = TestEnv::new(&cluster, "webhook-abuse").await?;
    let mut fx = Fixture::start(&env, json!({}), steady_certs(&env)).await?;
    fx.register_mutating(&env.namespace).await?;
    let ns = env.namespace.clone();
    let client = env.client.clone();
    let id = fx.id.clone();
    let addr = fx.running().addr;
    let metrics = fx.running().metrics.clone();
    let body = async {
        let bundle = ca_bundle(&client, &ns).await?;
        let limits = gpu_pilot_webhook::limits::Limits::default();
        // Four connections of 40 streams: 160 reviews wanted at once, far past --max-in-flight.
        let mut abuse = Vec::new();
        for _ in 0..4 {
            abuse.extend(hold_streams(h2_from_abuser(addr, &bundle).await?, 40));
        }
        eventually(
            "the abusive client holds its whole share",
            Duration::from_secs(30),
            || {
                let m = metrics.clone();
                async move {
                    let (held, _) = m.in_flight_now();
                    Ok(
                        if held >= limits.max_in_flight_per_peer as i64
                            && m.shed_count(Shed::RequestsPerPeer) > 0
                        {
                            Ok(())
                        } else {
                            Err(format!("{held} reviews in flight"))
                        },
                    )
                }
            },
        )
        .await?;
        // Meanwhile, GPU pods through the apiserver (dry runs pass admission like real creates).
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let start = Instant::now();
        let mut failures = Vec::new();
        let total = 40;
        for i in 0..total {
            let name = format!("under-abuse-{i}");
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
                        == Some(id.as_str()) => {}
                Ok(p) => failures.push(format!(
                    "{name}: admitted without mutation ({:?})",
                    p.spec.and_then(|s| s.runtime_class_name)
                )),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        let (held, _) = metrics.in_flight_now();
        for task in &abuse {
            task.abort();
        }
        ensure!(
            failures.is_empty(),
            "{} of {total} GPU pods failed while one client abused the webhook:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
        ensure!(
            metrics.shed_count(Shed::Requests) == 0 && metrics.shed_count(Shed::Bytes) == 0,
            "reviews were shed for the webhook's total capacity ({} for --max-in-flight, {} for --max-in-flight-bytes): the apiserver's could have been among them",
            metrics.shed_count(Shed::Requests),
            metrics.shed_count(Shed::Bytes)
        );
        eprintln!(
            "webhook abuse: {total} GPU pods mutated in {:?} while one client held {} streams open ({} of its reviews shed for its share); {held} reviews in flight at the end",
            start.elapsed(),
            limits.max_in_flight_per_peer,
            metrics.shed_count(Shed::RequestsPerPeer)
        );
        Ok(())
    };
    with_cleanup(env, fx, body).await
}
