//! The HTTPS server: axum over rustls, HTTP/1.1 and HTTP/2, with body size and time limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gpu_pilot_api::names::webhook;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::handler::{self, ClusterView, Endpoint, RequestError};
use crate::metrics::{Metrics, Outcome};

/// Limits on one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body accepted. The apiserver's own objects are at most ~3 MiB; a review of an
    /// update carries two of them.
    pub max_body_bytes: usize,
    /// Time to read the body and answer.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 8 << 20,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything a request handler shares.
pub struct AppState {
    pub view: Arc<dyn ClusterView>,
    pub metrics: Arc<Metrics>,
    /// Set once the watch caches are filled and a certificate is loaded.
    pub ready: Arc<AtomicBool>,
}

/// An error answered over HTTP (not as an AdmissionReview).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(
        "the body is larger than the webhook accepts (--max-body-bytes); the apiserver never sends reviews that big, so this is not an admission request"
    )]
    TooLarge,
    #[error("could not read the body: {0}")]
    Body(String),
    #[error("no answer within {0:?}; the webhook is overloaded or the cluster is slow, retry")]
    Timeout(Duration),
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match self {
            HttpError::Request(_) | HttpError::Body(_) => StatusCode::BAD_REQUEST,
            HttpError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let body = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "code": status.as_u16(), "reason": "InvalidRequest", "message": self.to_string(),
        });
        (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// The routes: both admission endpoints, health, readiness and metrics.
pub fn router(state: Arc<AppState>, limits: Limits) -> Router {
    let timeout = limits.request_timeout;
    Router::new()
        .route(webhook::MUTATE_PODS_PATH, post(mutate_pods))
        .route(webhook::VALIDATE_POLICY_PATH, post(validate_policy))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(middleware::from_fn(
            move |req: Request, next: Next| async move {
                match tokio::time::timeout(timeout, next.run(req)).await {
                    Ok(r) => r,
                    Err(_) => HttpError::Timeout(timeout).into_response(),
                }
            },
        ))
        .with_state(state)
}

async fn mutate_pods(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, HttpError> {
    review(state, Endpoint::MutatePods, body).await
}

async fn validate_policy(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, HttpError> {
    review(state, Endpoint::ValidatePolicy, body).await
}

async fn review(
    state: Arc<AppState>,
    endpoint: Endpoint,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, HttpError> {
    let start = Instant::now();
    let result = async {
        let body = body.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                HttpError::TooLarge
            } else {
                HttpError::Body(e.body_text())
            }
        })?;
        Ok::<_, HttpError>(handler::handle(state.view.as_ref(), endpoint, &body).await?)
    }
    .await;
    match result {
        Ok((out, outcome)) => {
            if let Some(status) = &out.response.status {
                tracing::info!(endpoint = endpoint.label(), uid = %out.response.uid, code = status.code, message = %status.message, "denied");
            }
            state
                .metrics
                .observe(endpoint.label(), outcome, start.elapsed());
            Ok((
                [(header::CONTENT_TYPE, "application/json")],
                serde_json::to_vec(&out).expect("a review serializes"),
            )
                .into_response())
        }
        Err(e) => {
            tracing::warn!(endpoint = endpoint.label(), error = %e, "unreadable admission request");
            state
                .metrics
                .observe(endpoint.label(), Outcome::Invalid, start.elapsed());
            Err(e)
        }
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the ClusterPolicy and Node caches and the serving certificate",
        )
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "the serving certificate PEM holds no certificate ({0}); from the webhook's own Secret: delete the Secret and the webhook makes a new one; from --tls-cert-file: check what writes it (cert-manager's Certificate)"
    )]
    Certificate(String),
    #[error(
        "the serving key PEM holds no private key ({0}); from the webhook's own Secret: delete the Secret and the webhook makes a new one; from --tls-key-file: check what writes it (cert-manager's Certificate)"
    )]
    Key(String),
    #[error(
        "rustls refused the certificate and key: {0} (a key mismatch means the key is not the certificate's, e.g. one file was replaced before the other)"
    )]
    Rustls(#[from] rustls::Error),
}

/// A rustls server configuration (TLS 1.2 and 1.3, ring, ALPN h2 and http/1.1) for a PEM chain and key.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Certificate("empty".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Key(e.to_string()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` over TLS on `addr` until `handle` is shut down. The TLS configuration can be
/// replaced at any time through `tls` (new connections get the new certificate).
pub async fn serve(
    addr: SocketAddr,
    tls: axum_server::tls_rustls::RustlsConfig,
    router: Router,
    handle: axum_server::Handle<SocketAddr>,
) -> std::io::Result<()> {
    // TCP_NODELAY: axum-server's default acceptor leaves Nagle's algorithm on, which may hold a
    // small write (an HTTP/2 DATA frame after its HEADERS) until the peer's delayed ACK. Request/
    // response servers turn it off; on the 2-core test box it made no difference that the noise
    // of the machine's other load let us see (docs/architecture.md, the webhook's figures).
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
        .acceptor(axum_server::accept::NoDelayAcceptor::new());
    let mut server = axum_server::bind(addr).acceptor(acceptor).handle(handle);
    // A slow client may not hold a connection open forever before its headers arrive. hyper
    // needs a timer for that, or it panics on the first HTTP/1.1 connection.
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    server.serve(router.into_make_service()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::StaticView;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app(limits: Limits) -> Router {
        let state = Arc::new(AppState {
            view: Arc::new(StaticView::default()),
            metrics: Arc::new(Metrics::default()),
            ready: Arc::new(AtomicBool::new(false)),
        });
        router(state, limits)
    }

    async fn call(app: Router, method: &str, path: &str, body: Vec<u8>) -> (StatusCode, String) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn health_ready_and_metrics() {
        assert_eq!(
            call(app(Limits::default()), "GET", "/healthz", vec![])
                .await
                .0,
            StatusCode::OK
        );
        let (status, body) = call(app(Limits::default()), "GET", "/readyz", vec![]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not ready"));
        let (status, body) = call(app(Limits::default()), "GET", "/metrics", vec![]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("gpupilot_webhook_certificate_reloads_total 0"));
    }

    #[tokio::test]
    async fn malformed_and_huge_bodies_get_4xx_with_a_reason() {
        let (status, body) = call(
            app(Limits::default()),
            "POST",
            "/mutate/pods",
            b"not json".to_vec(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body.contains("InvalidRequest") && body.contains("not a JSON AdmissionReview"),
            "{body}"
        );
        let limits = Limits {
            max_body_bytes: 1024,
            ..Limits::default()
        };
        let (status, body) = call(
            app(limits),
            "POST",
            "/validate/clusterpolicy",
            vec![b' '; 4096],
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(body.contains("larger than"), "{body}");
        let (status, _) = call(app(Limits::default()), "GET", "/mutate/pods", vec![]).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }
}
