//! The real server over real TLS on 127.0.0.1: HTTP/1.1 and HTTP/2 through ALPN, a certificate
//! swapped while a connection stays open, and the bounds on connections (idle, silent, too many,
//! too many from one peer, oversized headers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use gpu_pilot_webhook::certs::{Ca, Reloader, new_ca, new_serving_cert};
use gpu_pilot_webhook::handler::StaticView;
use gpu_pilot_webhook::metrics::{Metrics, Shed};
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
    handle: server::Handle,
    metrics: Arc<Metrics>,
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
    start_with(ca, Limits::default()).await
}

async fn start_with(ca: &Ca, limits: Limits) -> Server {
    let (cert, key) = serving(ca);
    let metrics = Arc::new(Metrics::default());
    let reloader = Arc::new(Reloader::new(&cert, &key, metrics.clone()).unwrap());
    let state = Arc::new(AppState {
        view: Arc::new(StaticView::default()),
        metrics: metrics.clone(),
        ready: Arc::new(AtomicBool::new(true)),
    });
    let app = server::router(state, limits);
    let (addr, handle) = gpu_pilot_webhook::listener::spawn_local(
        reloader.tls.clone(),
        app,
        limits,
        metrics.clone(),
    )
    .await
    .expect("the server listens");
    Server {
        addr,
        reloader,
        handle,
        metrics,
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

/// An HTTP/2 client connection over TLS; the task driving it ends when the server closes it.
async fn h2_client(
    addr: SocketAddr,
    ca: &Ca,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tls = connect(addr, &[ca], &[b"h2"]).await.unwrap();
    let (h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    (h2, tokio::spawn(conn))
}

fn get(path: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get(format!("https://127.0.0.1{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// True when the peer closes the connection (EOF or reset) within `within`.
async fn closed_by_server(mut s: impl tokio::io::AsyncRead + Unpin, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read).await.is_ok()
}

#[tokio::test]
async fn idle_http2_connections_are_closed_with_goaway() {
    let ca = new_ca(OffsetDateTime::now_utc(), Duration::from_secs(86400)).unwrap();
    let srv = start_with(
        &ca,
        Limits {
            idle_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
    )
    .await;
    let (mut h2, conn) = h2_client(srv.addr, &ca).await;
    let resp = h2.send_request(get("/healthz")).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    // The server sends GOAWAY once nothing happened for the idle timeout, and the client's
    // connection ends cleanly (not with an error: no request was lost).
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the idle connection was not closed: {ended:?}"
    );
    assert_eq!(srv.metrics.idle_connections_closed(), 1);
    // The server's side of the connection ends right after the client's.
    for _ in 0..100 {
        if srv.metrics.open_connections() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(srv.metrics.open_connections(), 0);
    // A busy connection is not idle: requests every 100 ms keep it open past the timeout.
    let (mut h2, conn) = h2_client(srv.addr, &ca).await;
    for _ in 0..8 {
        assert_eq!(
            h2.send_request(get("/healthz")).await.unwrap().status(),
            200
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!conn.is_finished());
    srv.handle.shutdown();
}

#[tokio::test]
async fn silent_clients_are_dropped_after_the_handshake_and_first_request_timeouts() {
    let ca = new_ca(OffsetDateTime::now_utc(), Duration::from_secs(86400)).unwrap();
    let srv = start_with(
        &ca,
        Limits {
            handshake_timeout: Duration::from_millis(300),
            header_read_timeout: Duration::from_millis(300),
            ..Limits::default()
        },
    )
    .await;
    // TCP only, no TLS ClientHello.
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    assert!(closed_by_server(tcp, Duration::from_secs(5)).await);
    // TLS, then nothing: no HTTP/1.1 request line, no HTTP/2 preface.
    let tls = connect(srv.addr, &[&ca], &[b"h2"]).await.unwrap();
    assert!(closed_by_server(tls, Duration::from_secs(5)).await);
    srv.handle.shutdown();
}

#[tokio::test]
async fn connections_past_the_limits_are_closed_and_counted() {
    let ca = new_ca(OffsetDateTime::now_utc(), Duration::from_secs(86400)).unwrap();
    let srv = start_with(
        &ca,
        Limits {
            max_connections: 3,
            max_connections_per_peer: 2,
            ..Limits::default()
        },
    )
    .await;
    let (mut a, _ca) = h2_client(srv.addr, &ca).await;
    let (_b, _cb) = h2_client(srv.addr, &ca).await;
    // A third from the same address: refused before the handshake.
    assert!(connect(srv.addr, &[&ca], &[b"h2"]).await.is_err());
    assert_eq!(srv.metrics.shed_count(Shed::ConnectionsPerPeer), 1);
    // From another address of the host (127.0.0.2 reaches the same loopback listener only when
    // bound to 0.0.0.0, so the overall limit is shown with the per-peer one raised instead).
    assert_eq!(a.send_request(get("/healthz")).await.unwrap().status(), 200);
    let srv2 = start_with(
        &ca,
        Limits {
            max_connections: 2,
            max_connections_per_peer: 10,
            ..Limits::default()
        },
    )
    .await;
    let (_c, _cc) = h2_client(srv2.addr, &ca).await;
    let (_d, _cd) = h2_client(srv2.addr, &ca).await;
    assert!(connect(srv2.addr, &[&ca], &[b"h2"]).await.is_err());
    assert_eq!(srv2.metrics.shed_count(Shed::Connections), 1);
    assert_eq!(srv2.metrics.open_connections(), 2);
    // Slots come back when connections end.
    drop((_c, _cc, _d, _cd));
    let mut fresh = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(tls) = connect(srv2.addr, &[&ca], &[b"http/1.1"]).await {
            fresh = Some(tls);
            break;
        }
    }
    assert!(fresh.is_some(), "a slot was not given back");
    srv.handle.shutdown();
    srv2.handle.shutdown();
}

#[tokio::test]
async fn oversized_headers_are_refused_on_both_protocols() {
    let ca = new_ca(OffsetDateTime::now_utc(), Duration::from_secs(86400)).unwrap();
    let srv = start(&ca).await;
    // Above the 16 KiB limit, below hyper's HTTP/1.1 default (about 400 KiB).
    let big = "x".repeat(24 << 10);
    let (mut h2, _conn) = h2_client(srv.addr, &ca).await;
    let mut req = get("/healthz");
    req.headers_mut()
        .insert("x-big", hyper::header::HeaderValue::from_str(&big).unwrap());
    // Refused either by the server (431) or already by the client, which honours the server's
    // SETTINGS_MAX_HEADER_LIST_SIZE.
    if let Ok(resp) = h2.send_request(req).await {
        assert_eq!(resp.status(), 431);
    }
    let tls = connect(srv.addr, &[&ca], &[b"http/1.1"]).await.unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = h1
        .send_request(
            hyper::Request::get("/healthz")
                .header("host", "127.0.0.1")
                .header("x-big", &big)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    srv.handle.shutdown();
}
