//! `gpu-pilot-webhook`: admission webhooks that give GPU pods their runtime class, toleration and
//! MIG resources, and guard `ClusterPolicy` edits against breaking running GPU work.
//!
//! The rules are pure functions ([`mutate`], [`validate`], [`certs::plan`]); the apiserver, TLS and
//! HTTP sit around them in [`cluster`], [`certs`] and [`server`].

pub mod certs;
pub mod cluster;
pub mod handler;
pub mod inventory;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod mutate;
pub mod review;
pub mod server;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube::Client;

use crate::certs::{CertError, CertManager, CertSettings, Reloader};
use crate::cluster::{KubeView, Scope};
use crate::metrics::Metrics;
use crate::server::{AppState, Limits};

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Made and rotated by the webhook itself, kept in a Secret.
    Secret(CertSettings),
    /// Files written by someone else (cert-manager), re-read when they change.
    Files { cert: PathBuf, key: PathBuf },
}

/// How the webhook runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub scope: Scope,
    pub certs: CertSource,
    pub limits: Limits,
    /// How often certificates are checked (and files re-read).
    pub check_interval: Duration,
    /// How long to wait for the watch caches before giving up.
    pub startup_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Certs(#[from] CertError),
    #[error(transparent)]
    NotReady(#[from] crate::cluster::CachesNotReady),
    #[error(transparent)]
    Limits(#[from] crate::limits::LimitsError),
    #[error("the server stopped before it listened")]
    StoppedEarly,
    #[error("serving HTTPS on {addr}: {source}; is the port free and may this process bind it?")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the webhook until `handle` is shut down: fills the watch caches, gets a certificate,
/// then serves. Certificates are kept current in the background.
pub async fn run(
    client: Client,
    opts: Options,
    metrics: Arc<Metrics>,
    handle: server::Handle,
) -> Result<(), RunError> {
    opts.limits.check()?;
    let (view, drive) = KubeView::start(client.clone(), opts.scope.clone());
    let drive = tokio::spawn(drive);
    let mut background = vec![drive];
    let result = async {
        let (reloader, upkeep) = match &opts.certs {
            CertSource::Secret(settings) => {
                settings.check_with_interval(opts.check_interval)?;
                let manager = CertManager {
                    client: client.clone(),
                    settings: settings.clone(),
                    metrics: metrics.clone(),
                };
                let stored = manager.reconcile().await?;
                let reloader = Arc::new(Reloader::new(
                    &stored.cert_pem,
                    &stored.key_pem,
                    metrics.clone(),
                )?);
                metrics.certificate_reloaded(stored.cert_not_after.unix_timestamp());
                let upkeep = tokio::spawn(certs::run_secret_loop(
                    manager,
                    reloader.clone(),
                    opts.check_interval,
                ));
                (reloader, upkeep)
            }
            CertSource::Files { cert, key } => {
                let (c, k) = certs::read_pair(cert, key).await?;
                let reloader = Arc::new(Reloader::new(&c, &k, metrics.clone())?);
                let served = reloader.served();
                metrics.certificate_reloaded(
                    served.as_ref().map_or(0, |s| s.not_after.unix_timestamp()),
                );
                tracing::info!(
                    cert = %cert.display(),
                    serial = served.as_ref().map_or("?", |s| s.serial.as_str()),
                    "serving the certificate files; they are read again every {:?}",
                    opts.check_interval
                );
                let upkeep = tokio::spawn(certs::run_file_loop(
                    cert.clone(),
                    key.clone(),
                    reloader.clone(),
                    opts.check_interval,
                ));
                (reloader, upkeep)
            }
        };
        background.push(upkeep);
        // Answering before the caches are filled would admit GPU pods as if no policy existed.
        view.wait_until_ready(opts.startup_timeout)
            .await
            .map_err(RunError::from)?;
        let ready = Arc::new(AtomicBool::new(true));
        let state = Arc::new(AppState {
            view: Arc::new(view),
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
        let app = server::router(state, opts.limits);
        tracing::info!(addr = %opts.listen, "serving admission reviews");
        server::serve(
            opts.listen,
            reloader.tls.clone(),
            app,
            handle,
            opts.limits,
            metrics,
        )
        .await
        .map_err(|source| RunError::Serve {
            addr: opts.listen,
            source,
        })?;
        ready.store(false, Ordering::Release);
        Ok(())
    }
    .await;
    for task in background {
        task.abort();
    }
    result
}

/// A webhook running on this process's runtime (for tests, benchmarks and embedding).
pub struct Running {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    handle: server::Handle,
    task: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl Running {
    /// Starts [`run`] in a task and waits until it listens, or returns why it could not start.
    pub async fn start(client: Client, opts: Options) -> Result<Running, RunError> {
        let metrics = Arc::new(Metrics::default());
        let handle = server::Handle::new();
        let mut task = tokio::spawn(run(client, opts, metrics.clone(), handle.clone()));
        tokio::select! {
            addr = handle.listening() => match addr {
                Some(addr) => Ok(Running { addr, metrics, handle, task }),
                None => Err(match task.await {
                    Ok(Err(e)) => e,
                    _ => RunError::StoppedEarly,
                }),
            },
            done = &mut task => Err(match done {
                Ok(Err(e)) => e,
                _ => RunError::StoppedEarly,
            }),
        }
    }

    /// Stops accepting, ends open connections and waits for the server to finish.
    pub async fn stop(self) {
        self.handle.shutdown();
        let _ = self.task.await;
    }
}
