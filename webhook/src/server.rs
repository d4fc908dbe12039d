//! The routes and their HTTP answers; the TLS accept loop is [`crate::listener`], the bounds
//! [`crate::limits`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::routing::{get, post};
use gpu_pilot_api::names::webhook;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::handler::{self, ClusterView, Endpoint, RequestError};
use crate::metrics::{Metrics, Outcome};

pub use crate::limits::Limits;
pub use crate::listener::{Handle, TlsCell, serve};

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
        let (status, reason) = match self {
            HttpError::Request(_) | HttpError::Body(_) => {
                (StatusCode::BAD_REQUEST, "InvalidRequest")
            }
            HttpError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge"),
            HttpError::Timeout(_) => (StatusCode::SERVICE_UNAVAILABLE, "Timeout"),
        };
        crate::limits::status_response(status, reason, &self.to_string())
    }
}

/// The routes: both admission endpoints (behind the gate of [`crate::limits`]), health,
/// readiness and metrics.
pub fn router(state: Arc<AppState>, limits: Limits) -> Router {
    let timeout = limits.request_timeout;
    let gate = Arc::new(crate::limits::Gate::new(limits, state.metrics.clone()));
    let gated = |route: MethodRouter<Arc<AppState>>| {
        route.layer(middleware::from_fn_with_state(
            gate.clone(),
            crate::limits::gate,
        ))
    };
    Router::new()
        .route(webhook::MUTATE_PODS_PATH, gated(post(mutate_pods)))
        .route(webhook::VALIDATE_POLICY_PATH, gated(post(validate_policy)))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        // Outermost, so a review that runs out of time gives back what the gate lent it.
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

    /// A view whose policy facts wait until the test lets them go, so reviews stay in flight.
    struct Held {
        release: Arc<tokio::sync::Semaphore>,
    }

    impl ClusterView for Held {
        fn active_policy(&self) -> Option<Arc<gpu_pilot_api::ClusterPolicy>> {
            None
        }
        fn mig_inventory(&self) -> crate::inventory::MigInventory {
            Default::default()
        }
        fn policy_facts<'a>(
            &'a self,
            _: &'a str,
            _: Vec<String>,
            _: bool,
        ) -> handler::BoxFuture<'a, Result<crate::validate::Facts, handler::FactsError>> {
            Box::pin(async move {
                let _ = self.release.acquire().await.unwrap();
                Ok(Default::default())
            })
        }
    }

    fn policy_update() -> Vec<u8> {
        let p = serde_json::json!({"metadata": {"name": "cp"}, "spec": {}});
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u", "kind": {"group": "gpupilot.io", "version": "v1alpha1", "kind": "ClusterPolicy"},
                "resource": {}, "operation": "UPDATE", "object": p, "oldObject": p}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn reviews_beyond_the_limits_are_shed_with_429_and_the_rest_answered() {
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let metrics = Arc::new(Metrics::default());
        let state = Arc::new(AppState {
            view: Arc::new(Held {
                release: release.clone(),
            }),
            metrics: metrics.clone(),
            ready: Arc::new(AtomicBool::new(true)),
        });
        let limits = Limits {
            max_in_flight: 2,
            ..Limits::default()
        };
        let app = router(state, limits);
        let body = policy_update();
        let send = |app: Router, body: Vec<u8>| {
            tokio::spawn(async move { call(app, "POST", "/validate/clusterpolicy", body).await })
        };
        let held: Vec<_> = (0..2).map(|_| send(app.clone(), body.clone())).collect();
        for _ in 0..1000 {
            if metrics.in_flight_now().0 == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            metrics.in_flight_now().0,
            2,
            "the reviews did not stay in flight"
        );
        // The third is answered at once, before its body is read, and says what to do.
        let req = axum::http::Request::post("/validate/clusterpolicy")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.clone()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        let status: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(status["reason"], "TooManyRequests");
        assert!(
            status["message"]
                .as_str()
                .unwrap()
                .contains("--max-in-flight"),
            "{status}"
        );
        assert_eq!(metrics.shed_count(crate::metrics::Shed::Requests), 1);
        // Health and metrics are not behind the gate.
        let (code, scrape) = call(app.clone(), "GET", "/metrics", vec![]).await;
        assert_eq!(code, StatusCode::OK);
        assert!(
            scrape.contains("gpupilot_webhook_shed_total{reason=\"requests\"} 1"),
            "{scrape}"
        );
        assert!(
            scrape.contains("gpupilot_webhook_in_flight_requests 2"),
            "{scrape}"
        );
        release.add_permits(2);
        for h in held {
            assert_eq!(h.await.unwrap().0, StatusCode::OK);
        }
        assert_eq!(metrics.in_flight_now(), (0, 0));
        // A declared length past the limit is refused before a byte of the body is read.
        let req = axum::http::Request::post("/mutate/pods")
            .header(
                "content-length",
                (Limits::default().max_body_bytes + 1).to_string(),
            )
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn a_review_that_times_out_gives_its_place_back() {
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let metrics = Arc::new(Metrics::default());
        let state = Arc::new(AppState {
            view: Arc::new(Held { release }),
            metrics: metrics.clone(),
            ready: Arc::new(AtomicBool::new(true)),
        });
        let limits = Limits {
            max_in_flight: 1,
            request_timeout: Duration::from_millis(100),
            ..Limits::default()
        };
        let app = router(state, limits);
        for _ in 0..3 {
            let (code, body) = call(
                app.clone(),
                "POST",
                "/validate/clusterpolicy",
                policy_update(),
            )
            .await;
            assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        }
        assert_eq!(metrics.in_flight_now(), (0, 0));
        assert_eq!(metrics.shed_count(crate::metrics::Shed::Requests), 0);
    }
}
