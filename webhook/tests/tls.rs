//! The real server over real TLS on 127.0.0.1: HTTP/1.1 and HTTP/2 through ALPN, and a
//! certificate swapped while a connection stays open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use gpu_pilot_webhook::certs::{Ca, Reloader, new_ca, new_serving_cert};
use gpu_pilot_webhook::handler::StaticView;
use gpu_pilot_webhook::metrics::Metrics;
use gpu_pilot_webhook::server::{self, AppState, Limits};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use time::OffsetDateTime;
use tokio_rustls::client::TlsStream;

struct Server {
    addr: SocketAddr,
    reloader: Arc<Reloader>,
    handle: axum_server::Handle<SocketAddr>,
}

fn serving(ca: &Ca) -> (String, String) {
    let (c, k, _) = new_serving_cert(
        ca,
        &["127.0.0.1".to_string()],
        OffsetDateTime::now_utc(),
        Duration::from_secs(3600),
    )
    .unwrap();
    (c, k)
}

async fn start(ca: &Ca) -> Server {
    let (cert, key) = serving(ca);
    let metrics = Arc::new(Metrics::default());
    let reloader = Arc::new(Reloader::new(&cert, &key, metrics.clone()).unwrap());
    let state = Arc::new(AppState {
        view: Arc::new(StaticView::default()),
        metrics,
        ready: Arc::new(AtomicBool::new(true)),
    });
    let handle = axum_server::Handle::new();
    let app = server::router(state, Limits::default());
    tokio::spawn(server::serve(
        "127.0.0.1:0".parse().unwrap(),
        reloader.tls.clone(),
        app,
        handle.clone(),
    ));
    let addr = handle.listening().await.expect("the server listens");
    Server {
        addr,
        reloader,
        handle,
    }
}

async fn connect(
    addr: SocketAddr,
    cas: &[&Ca],
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap().to_owned(), tcp)
        .await
}

fn served_cert(tls: &TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn http1_and_http2_are_served_over_tls() {
    let ca = new_ca(OffsetDateTime::now_utc(), Duration::from_secs(86400)).unwrap();
    let srv = start(&ca).await;

    let tls = connect(srv.addr, &[&ca], &[b"h2"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = h2
        .send_request(
            hyper::Request::get("https://127.0.0.1/healthz")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");

    let tls = connect(srv.addr, &[&ca], &[b"http/1.1"]).await.unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = h1
        .send_request(
            hyper::Request::post("/mutate/pods")
                .header("host", "127.0.0.1")
                .body(Full::new(Bytes::from_static(b"{")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("not a JSON AdmissionReview"));
    srv.handle.shutdown();
}

#[tokio::test]
async fn a_new_certificate_is_served_without_a_restart_and_open_connections_keep_working() {
    let ca = new_ca(OffsetDateTime::now_utc(), Duration::from_secs(86400)).unwrap();
    let srv = start(&ca).await;
    let old = connect(srv.addr, &[&ca], &[b"http/1.1"]).await.unwrap();
    let old_cert = served_cert(&old);
    let (mut old_conn, conn) = hyper::client::conn::http1::handshake(TokioIo::new(old))
        .await
        .unwrap();
    tokio::spawn(conn);

    // Same CA, new serving certificate: clients that trust the CA see the new one at once.
    let (cert, key) = serving(&ca);
    assert!(srv.reloader.update(&cert, &key, None).unwrap());
    assert!(
        !srv.reloader.update(&cert, &key, None).unwrap(),
        "the same pair is not reloaded twice"
    );
    let fresh = connect(srv.addr, &[&ca], &[b"http/1.1"]).await.unwrap();
    assert_ne!(served_cert(&fresh), old_cert);
    assert_eq!(
        served_cert(&fresh),
        CertificateDer::from_pem_slice(cert.as_bytes())
            .unwrap()
            .to_vec()
    );

    // The connection opened before the swap still answers.
    let resp = old_conn
        .send_request(
            hyper::Request::get("/healthz")
                .header("host", "127.0.0.1")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A certificate from a CA the client does not trust is refused by the client: the bundle
    // must carry a new CA before the server uses it, which is why CA rotation has two steps.
    let other = new_ca(OffsetDateTime::now_utc(), Duration::from_secs(86400)).unwrap();
    let (cert, key) = serving(&other);
    srv.reloader.update(&cert, &key, None).unwrap();
    assert!(connect(srv.addr, &[&ca], &[b"http/1.1"]).await.is_err());
    assert!(
        connect(srv.addr, &[&ca, &other], &[b"http/1.1"])
            .await
            .is_ok()
    );
    srv.handle.shutdown();
}
