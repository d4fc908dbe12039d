//! Serving what the certificate manager decided: the certificate in use, swapped in place when
//! its source changes (the Secret, or files another tool writes), and what it says of itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Serves a certificate and hot-swaps it when what it is built from changes.
pub struct Reloader {
    pub tls: Arc<crate::listener::TlsCell>,
    /// The certificate and key PEM served now, and what the certificate says of itself.
    served: std::sync::Mutex<(String, String, Option<CertSummary>)>,
    metrics: Arc<Metrics>,
}

impl Reloader {
    /// Starts serving `cert_pem`/`key_pem`.
    pub fn new(
        cert_pem: &str,
        key_pem: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Reloader, CertError> {
        let tls =
            crate::listener::TlsCell::new(tls_config(cert_pem.as_bytes(), key_pem.as_bytes())?);
        Ok(Reloader {
            tls,
            served: std::sync::Mutex::new((
                cert_pem.to_string(),
                key_pem.to_string(),
                CertSummary::from_pem(cert_pem),
            )),
            metrics,
        })
    }

    /// Serial number and expiry of the certificate served now.
    pub fn served(&self) -> Option<CertSummary> {
        self.served.lock().expect("reloader lock").2.clone()
    }

    /// Serves the new pair if it differs from the served one. Connections already open keep the
    /// old one; new handshakes get the new one, so no request fails. A pair rustls refuses (no
    /// certificate, no key, a key that does not belong to the certificate) is an error and the
    /// served pair stays. `not_after` is read from the certificate when not given.
    pub fn update(
        &self,
        cert_pem: &str,
        key_pem: &str,
        not_after: Option<OffsetDateTime>,
    ) -> Result<bool, CertError> {
        let mut served = self.served.lock().expect("reloader lock");
        if served.0 == cert_pem && served.1 == key_pem {
            return Ok(false);
        }
        let config = tls_config(cert_pem.as_bytes(), key_pem.as_bytes())?;
        self.tls.set(config);
        let summary = CertSummary::from_pem(cert_pem);
        let not_after = not_after.or(summary.as_ref().map(|s| s.not_after));
        *served = (cert_pem.to_string(), key_pem.to_string(), summary.clone());
        self.metrics
            .certificate_reloaded(not_after.map(|t| t.unix_timestamp()).unwrap_or(0));
        match summary {
            Some(s) => {
                tracing::info!(serial = %s.serial, not_after = %s.not_after, "serving a new certificate")
            }
            None => tracing::info!("serving a new certificate"),
        }
        Ok(true)
    }
}

/// What a certificate says of itself that matters for running it: which one it is and until when
/// it is valid, for logs, metrics and tests (read with x509-parser).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The serial number, lowercase hex of its DER bytes.
    pub serial: String,
    pub not_after: OffsetDateTime,
}

impl CertSummary {
    /// The first certificate of a PEM chain; `None` when there is none or it does not parse.
    pub fn from_pem(pem: &str) -> Option<CertSummary> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
        CertSummary::from_der(&der)
    }

    /// An X.509 certificate in DER.
    pub fn from_der(der: &[u8]) -> Option<CertSummary> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let serial = cert
            .tbs_certificate
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let not_after =
            OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()?;
        Some(CertSummary { serial, not_after })
    }
}

/// Keeps the certificates current: every `interval`, one [`CertManager::reconcile`] pass and a
/// reload when the serving certificate changed.
pub async fn run_secret_loop(manager: CertManager, reloader: Arc<Reloader>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match manager.reconcile().await {
            Ok(st) => {
                if let Err(e) = reloader.update(&st.cert_pem, &st.key_pem, Some(st.cert_not_after))
                {
                    reloader.metrics.reload_failed();
                    tracing::error!(error = %e, "the certificate in the Secret cannot be served; still serving the previous one");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "certificate upkeep failed; retrying in {interval:?}")
            }
        }
    }
}

/// For certificates made by someone else (cert-manager): re-read the files every `interval` and
/// serve them when they change.
///
/// Files are polled rather than watched: the kubelet updates a mounted Secret by swapping a
/// symlink to a new directory, which file watches follow badly, and reading two small files once
/// an interval costs nothing. Whoever writes them may be caught half-way (a new certificate with
/// the old key, an empty or truncated file); such a pair is refused, the previous certificate
/// stays in service, the problem is logged once, and the next read tries again.
pub async fn run_file_loop(
    cert: PathBuf,
    key: PathBuf,
    reloader: Arc<Reloader>,
    interval: Duration,
) {
    let mut failing: Option<String> = None;
    loop {
        tokio::time::sleep(interval).await;
        let result = match read_pair(&cert, &key).await {
            Ok((c, k)) => reloader.update(&c, &k, None).map(|_| ()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                if failing.take().is_some() {
                    tracing::info!(cert = %cert.display(), key = %key.display(), "the certificate files can be served again");
                }
            }
            Err(e) => {
                reloader.metrics.reload_failed();
                let message = e.to_string();
                if failing.as_deref() != Some(message.as_str()) {
                    let served = reloader.served();
                    tracing::warn!(
                        error = %e,
                        cert = %cert.display(),
                        key = %key.display(),
                        serving_serial = served.as_ref().map(|s| s.serial.as_str()).unwrap_or("?"),
                        serving_not_after = %served.as_ref().map(|s| s.not_after.to_string()).unwrap_or_default(),
                        "the certificate files are incomplete, mismatched or invalid; still serving the previous certificate, reading them again every {interval:?}"
                    );
                }
                failing = Some(message);
            }
        }
    }
}

/// Reads a certificate and key file pair.
pub async fn read_pair(cert: &PathBuf, key: &PathBuf) -> Result<(String, String), CertError> {
    let read = |p: &PathBuf| {
        let p = p.clone();
        async move {
            tokio::fs::read_to_string(&p)
                .await
                .map_err(|source| CertError::File { path: p, source })
        }
    };
    Ok((read(cert).await?, read(key).await?))
}
