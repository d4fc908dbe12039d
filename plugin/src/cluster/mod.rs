//! The connection to the cluster: kubeconfig and context as kubectl picks them, a client that
//! counts its requests (the doctor reports how many it made), errors an admin can act on, and
//! the few reads several commands share ([`probe`]) and the dynamic apply/delete ([`objects`]).

pub mod objects;
pub mod probe;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::global::Global;

/// A client plus the number of HTTP requests it has sent.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    requests: Arc<AtomicU64>,
    /// The apiserver URL, for messages.
    pub server: String,
}

impl Kube {
    /// Connect as kubectl would with the same `--kubeconfig` and `--context`.
    pub async fn connect(global: &Global) -> anyhow::Result<Kube> {
        let options = KubeConfigOptions {
            context: global.context.clone(),
            ..Default::default()
        };
        let config = match &global.kubeconfig {
            Some(path) => {
                // KUBECONFIG may list several files, like kubectl's.
                let mut merged: Option<Kubeconfig> = None;
                for p in std::env::split_paths(path) {
                    if p.as_os_str().is_empty() {
                        continue;
                    }
                    let kc = Kubeconfig::read_from(&p).map_err(|e| {
                        anyhow::anyhow!(
                            "cannot read kubeconfig {}: {e}; pass --kubeconfig with a readable file",
                            p.display()
                        )
                    })?;
                    merged = Some(match merged {
                        None => kc,
                        Some(m) => m.merge(kc)?,
                    });
                }
                let kc = merged.ok_or_else(|| {
                    anyhow::anyhow!("--kubeconfig/KUBECONFIG is empty; give a kubeconfig file")
                })?;
                kube::Config::from_custom_kubeconfig(kc, &options).await
            }
            None => kube::Config::from_kubeconfig(&options).await,
        };
        let mut config = match config {
            Ok(c) => c,
            Err(e) => match kube::Config::incluster() {
                Ok(c) if global.kubeconfig.is_none() && global.context.is_none() => c,
                _ => anyhow::bail!(
                    "no usable kubeconfig: {e}. Point --kubeconfig (or KUBECONFIG) at a kubeconfig file{}",
                    match &global.context {
                        Some(c) => format!(" that has the context {c:?}"),
                        None => String::new(),
                    }
                ),
            },
        };
        config.connect_timeout = Some(std::time::Duration::from_secs(10));
        config.read_timeout = Some(std::time::Duration::from_secs(60));
        let server = config.cluster_url.to_string();
        let requests = Arc::new(AtomicU64::new(0));
        let client = kube::client::ClientBuilder::try_from(config)?
            .with_layer(&CountLayer(requests.clone()))
            .build();
        Ok(Kube {
            client,
            requests,
            server,
        })
    }

    /// HTTP requests sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A tower layer that counts requests.
#[derive(Clone)]
struct CountLayer(Arc<AtomicU64>);

impl<S> tower::Layer<S> for CountLayer {
    type Service = CountService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountService {
            inner,
            count: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct CountService<S> {
    inner: S,
    count: Arc<AtomicU64>,
}

impl<S, R> tower::Service<R> for CountService<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.inner.call(req)
    }
}

/// Turn a kube error into a sentence an admin can act on.
pub fn explain(e: &kube::Error, server: &str, doing: &str) -> String {
    match e {
        kube::Error::Api(s) if s.code == 401 => format!(
            "{doing}: the cluster at {server} did not accept your credentials (401); refresh them (log in again) or pick another --context"
        ),
        kube::Error::Api(s) if s.code == 403 => format!(
            "{doing}: you are not allowed to ({}); ask a cluster admin for the rights or use an admin --context",
            s.message
        ),
        kube::Error::Api(s) => format!("{doing}: the apiserver said {} ({})", s.message, s.code),
        kube::Error::HyperError(_) | kube::Error::Service(_) => format!(
            "{doing}: cannot reach the cluster at {server} ({e}); check that it is running and that --kubeconfig/--context point at it"
        ),
        other => format!("{doing}: {other}"),
    }
}
