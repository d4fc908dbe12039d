//! Certificates without cert-manager: a CA and a serving certificate kept in a Secret, the CA
//! bundle kept in both webhook configurations, rotation well before expiry, and hot reload.
//!
//! The decision of what to do is a pure function ([`plan`]) of the time and what the Secret holds.
//! Rotating the serving certificate keeps the CA, so the apiserver trusts the new one at once.
//! Rotating the CA takes two steps so that no request fails: the next CA first joins the bundle
//! next to the current one (and sits there for `ca_overlap`, long enough for the apiserver to see
//! the new bundle); only then does it sign the serving certificate. The old CA stays in the bundle
//! until it expires.
//!
//! Several replicas share the Secret: every write carries the resourceVersion read, so only one
//! wins a race and the others pick up its result on their next pass.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gpu_pilot_api::names::{label, webhook as names};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::metrics::Metrics;
use crate::server::tls_config;

const CA_COMMON_NAME: &str = "gpu-pilot-webhook-ca";
/// Certificates start a little in the past, so a node whose clock is behind accepts them.
const BACKDATE: time::Duration = time::Duration::minutes(5);
/// Writes that lose a race (409) are retried from a fresh read this many times in one pass.
const CONFLICT_ATTEMPTS: u32 = 5;
/// The longest validity (and any other certificate duration) the settings accept: 100 years,
/// far inside what X.509 dates (up to 9999) and date arithmetic can hold.
pub const MAX_VALIDITY: Duration = Duration::from_secs(36_500 * 24 * 3600);
const MAX_VALIDITY_TEXT: &str = "36500d (100 years)";

/// How certificates are made and kept.
#[derive(Debug, Clone)]
pub struct CertSettings {
    pub namespace: String,
    pub secret: String,
    /// DNS names and IP addresses the serving certificate is valid for.
    pub names: Vec<String>,
    pub ca_validity: Duration,
    pub ca_renew_before: Duration,
    /// How long a next CA sits in the bundle before it signs the serving certificate.
    pub ca_overlap: Duration,
    pub cert_validity: Duration,
    pub cert_renew_before: Duration,
    /// Webhook configurations whose `caBundle` is kept in sync (absent ones are skipped).
    pub mutating_config: Option<String>,
    pub validating_config: Option<String>,
}

impl CertSettings {
    /// The service DNS names for a webhook Service.
    pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
        vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            format!("{service}.{namespace}"),
            service.to_string(),
        ]
    }

    /// Durations that would make the steps overlap or never happen, or that no certificate can
    /// carry, are refused.
    pub fn check(&self) -> Result<(), CertError> {
        for (flag, d) in [
            ("--ca-validity", self.ca_validity),
            ("--ca-renew-before", self.ca_renew_before),
            ("--ca-overlap", self.ca_overlap),
            ("--cert-validity", self.cert_validity),
            ("--cert-renew-before", self.cert_renew_before),
        ] {
            if d > MAX_VALIDITY {
                return Err(CertError::Settings(format!(
                    "{flag} is {}, longer than a certificate can reasonably carry; use at most {MAX_VALIDITY_TEXT} (e.g. 3650d for the CA, 90d for the serving certificate)",
                    gpu_pilot_core::duration::format(d),
                )));
            }
        }
        if self.cert_renew_before >= self.cert_validity {
            return Err(CertError::Settings(format!(
                "the serving certificate would be renewed as soon as it is made: --cert-renew-before ({:?}) must be shorter than --cert-validity ({:?})",
                self.cert_renew_before, self.cert_validity
            )));
        }
        if self.ca_renew_before >= self.ca_validity
            || self.ca_overlap.saturating_add(self.cert_renew_before) >= self.ca_renew_before
        {
            return Err(CertError::Settings(format!(
                "--ca-renew-before ({:?}) must be shorter than --ca-validity ({:?}) and longer than --ca-overlap plus --cert-renew-before ({:?})",
                self.ca_renew_before,
                self.ca_validity,
                self.ca_overlap.saturating_add(self.cert_renew_before)
            )));
        }
        if self.names.is_empty() {
            return Err(CertError::Settings(
                "the serving certificate needs at least one DNS name or IP address".into(),
            ));
        }
        Ok(())
    }

    /// The schedule against how often certificates are checked: every replica reads the Secret
    /// again within one `check_interval`, so a CA that is replaced must stay trusted at least that
    /// long, or a replica still serving the old leaf is refused by the apiserver meanwhile.
    pub fn check_with_interval(&self, check_interval: Duration) -> Result<(), CertError> {
        self.check()?;
        if self.ca_overlap <= check_interval {
            return Err(CertError::Settings(format!(
                "--ca-overlap ({}) must be longer than --check-interval ({}): other replicas pick up a new certificate only at their next check, and until then the CA they serve from must stay trusted; raise --ca-overlap or lower --check-interval",
                gpu_pilot_core::duration::format(self.ca_overlap),
                gpu_pilot_core::duration::format(check_interval),
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate settings: {0}")]
    Settings(String),
    #[error("could not make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(
        "talking to the apiserver about {what}: {source}; check the webhook's RBAC (it needs get/create/update on its Secret and get/update on its webhook configurations)"
    )]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::server::TlsError),
    #[error("reading {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A CA: its certificate, key and expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

/// What the Secret holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub ca: Ca,
    /// A CA that will replace `ca`, and since when it is in the bundle.
    pub next_ca: Option<(Ca, OffsetDateTime)>,
    /// The CA `ca` replaced, trusted until it expires.
    pub previous_ca: Option<(String, OffsetDateTime)>,
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_not_after: OffsetDateTime,
    /// The names the serving certificate was made for, comma-separated.
    pub cert_names: String,
}

impl Stored {
    /// The PEM bundle the apiserver must trust: the current CA, then any next and previous one.
    pub fn bundle(&self) -> String {
        let mut b = self.ca.cert_pem.clone();
        if let Some((next, _)) = &self.next_ca {
            b.push_str(&next.cert_pem);
        }
        if let Some((prev, _)) = &self.previous_ca {
            b.push_str(prev);
        }
        b
    }

    /// Reads a Secret written by [`Stored::to_secret`]; `None` when anything is missing.
    pub fn from_secret(secret: &Secret) -> Option<Stored> {
        let data = secret.data.as_ref()?;
        let ann = secret.metadata.annotations.as_ref()?;
        let text = |k: &str| -> Option<String> {
            data.get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        let when = |k: &str| -> Option<OffsetDateTime> {
            ann.get(k)
                .and_then(|v| OffsetDateTime::parse(v, &Rfc3339).ok())
        };
        let next_ca = match (
            text(names::NEXT_CA_CERT_KEY),
            text(names::NEXT_CA_KEY_KEY),
            when(names::NEXT_CA_SINCE),
        ) {
            (Some(cert_pem), Some(key_pem), Some(since)) => Some((
                Ca {
                    cert_pem,
                    key_pem,
                    // A next CA is always made with the full validity after `since`.
                    not_after: when(&format!("{}-next", names::CA_NOT_AFTER))?,
                },
                since,
            )),
            _ => None,
        };
        let previous_ca = match (
            text(names::PREVIOUS_CA_CERT_KEY),
            when(names::PREVIOUS_CA_NOT_AFTER),
        ) {
            (Some(p), Some(t)) => Some((p, t)),
            _ => None,
        };
        Some(Stored {
            ca: Ca {
                cert_pem: text(names::CA_CERT_KEY)?,
                key_pem: text(names::CA_KEY_KEY)?,
                not_after: when(names::CA_NOT_AFTER)?,
            },
            next_ca,
            previous_ca,
            cert_pem: text(names::TLS_CERT_KEY)?,
            key_pem: text(names::TLS_KEY_KEY)?,
            cert_not_after: when(names::CERT_NOT_AFTER)?,
            cert_names: ann.get(names::CERT_NAMES)?.clone(),
        })
    }

    /// The Secret's data and annotations.
    pub fn to_secret(&self, namespace: &str, name: &str) -> Secret {
        let fmt = |t: OffsetDateTime| t.format(&Rfc3339).expect("RFC 3339 formats any time");
        let mut data = BTreeMap::new();
        let mut ann = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
        };
        put(names::CA_CERT_KEY, &self.ca.cert_pem);
        put(names::CA_KEY_KEY, &self.ca.key_pem);
        put(names::TLS_CERT_KEY, &self.cert_pem);
        put(names::TLS_KEY_KEY, &self.key_pem);
        put(names::CA_BUNDLE_KEY, &self.bundle());
        ann.insert(names::CA_NOT_AFTER.to_string(), fmt(self.ca.not_after));
        ann.insert(names::CERT_NOT_AFTER.to_string(), fmt(self.cert_not_after));
        ann.insert(names::CERT_NAMES.to_string(), self.cert_names.clone());
        if let Some((next, since)) = &self.next_ca {
            put(names::NEXT_CA_CERT_KEY, &next.cert_pem);
            put(names::NEXT_CA_KEY_KEY, &next.key_pem);
            ann.insert(names::NEXT_CA_SINCE.to_string(), fmt(*since));
            ann.insert(format!("{}-next", names::CA_NOT_AFTER), fmt(next.not_after));
        }
        if let Some((prev, not_after)) = &self.previous_ca {
            put(names::PREVIOUS_CA_CERT_KEY, prev);
            ann.insert(names::PREVIOUS_CA_NOT_AFTER.to_string(), fmt(*not_after));
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some(namespace.to_string()),
                annotations: Some(ann),
                labels: Some(
                    [
                        (
                            label::MANAGED_BY.to_string(),
                            label::MANAGED_BY_VALUE.to_string(),
                        ),
                        (label::COMPONENT.to_string(), "webhook".to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        }
    }
}

/// The next step for the certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to do.
    Keep,
    /// Make a CA and a serving certificate from scratch (no usable Secret, or the CA expired).
    Create,
    /// Make a new serving certificate with the current CA.
    RenewCert,
    /// Add a next CA to the bundle.
    StageNextCa,
    /// Let the next CA sign a new serving certificate and become the current one.
    PromoteNextCa,
    /// Drop a previous CA that has expired from the bundle.
    DropPreviousCa,
}

fn dur(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// `now + validity`, or an error naming what is too long (never an overflow panic, whatever
/// settings reach here).
fn valid_until(
    now: OffsetDateTime,
    validity: Duration,
    what: &str,
) -> Result<OffsetDateTime, CertError> {
    now.checked_add(dur(validity))
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| {
            CertError::Settings(format!(
                "a {what} valid for {} from {now} would end past the year 9999; use a validity of at most {MAX_VALIDITY_TEXT}",
                gpu_pilot_core::duration::format(validity),
            ))
        })
}

/// What to do now with what is stored.
pub fn plan(now: OffsetDateTime, stored: Option<&Stored>, s: &CertSettings) -> Plan {
    let Some(st) = stored else {
        return Plan::Create;
    };
    if st.ca.not_after <= now {
        return Plan::Create;
    }
    if let Some((next, since)) = &st.next_ca {
        if next.not_after <= now {
            return Plan::Create;
        }
        if now - *since >= dur(s.ca_overlap) {
            return Plan::PromoteNextCa;
        }
    } else if st.ca.not_after - now <= dur(s.ca_renew_before) {
        return Plan::StageNextCa;
    }
    if st.cert_not_after - now <= dur(s.cert_renew_before) || st.cert_names != s.names.join(",") {
        return Plan::RenewCert;
    }
    if st.previous_ca.as_ref().is_some_and(|(_, t)| *t <= now) {
        return Plan::DropPreviousCa;
    }
    Plan::Keep
}

fn ca_params(not_before: OffsetDateTime, not_after: OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = not_before;
    p.not_after = not_after;
    p
}

/// Makes a self-signed CA valid from now for `validity`.
pub fn new_ca(now: OffsetDateTime, validity: Duration) -> Result<Ca, CertError> {
    let key = KeyPair::generate()?;
    let not_after = valid_until(now, validity, "CA")?;
    let cert = ca_params(now - BACKDATE, not_after).self_signed(&key)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// Makes a serving certificate for `names` signed by `ca`, never outliving it.
pub fn new_serving_cert(
    ca: &Ca,
    names: &[String],
    now: OffsetDateTime,
    validity: Duration,
) -> Result<(String, String, OffsetDateTime), CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    // The issuer is rebuilt from the same fixed name and the stored key, which is all a
    // signature and the authority key identifier need.
    let issuer = Issuer::new(ca_params(now, ca.not_after), ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    let not_after = valid_until(now, validity, "serving certificate")?.min(ca.not_after);
    p.not_before = now - BACKDATE;
    p.not_after = not_after;
    let cert = p.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem(), not_after))
}

/// Carries out a plan, returning what the Secret should hold next.
pub fn carry_out(
    plan: Plan,
    now: OffsetDateTime,
    stored: Option<Stored>,
    s: &CertSettings,
) -> Result<Option<Stored>, CertError> {
    let names = s.names.join(",");
    let fresh = || -> Result<Stored, CertError> {
        let ca = new_ca(now, s.ca_validity)?;
        let (cert_pem, key_pem, cert_not_after) =
            new_serving_cert(&ca, &s.names, now, s.cert_validity)?;
        Ok(Stored {
            ca,
            next_ca: None,
            previous_ca: None,
            cert_pem,
            key_pem,
            cert_not_after,
            cert_names: names.clone(),
        })
    };
    let Some(mut st) = stored else {
        return Ok(Some(fresh()?));
    };
    match plan {
        Plan::Keep => return Ok(None),
        Plan::Create => return Ok(Some(fresh()?)),
        Plan::RenewCert => {
            let (c, k, t) = new_serving_cert(&st.ca, &s.names, now, s.cert_validity)?;
            (st.cert_pem, st.key_pem, st.cert_not_after) = (c, k, t);
            st.cert_names = names;
        }
        Plan::StageNextCa => st.next_ca = Some((new_ca(now, s.ca_validity)?, now)),
        Plan::PromoteNextCa => {
            let (next, _) = st.next_ca.take().expect("PromoteNextCa needs a next CA");
            let old = std::mem::replace(&mut st.ca, next);
            st.previous_ca = Some((old.cert_pem, old.not_after));
            let (c, k, t) = new_serving_cert(&st.ca, &s.names, now, s.cert_validity)?;
            (st.cert_pem, st.key_pem, st.cert_not_after) = (c, k, t);
            st.cert_names = names;
        }
        Plan::DropPreviousCa => st.previous_ca = None,
    }
    Ok(Some(st))
}

/// When certificates are made from scratch while the webhook configurations still trust other
/// CAs (the Secret was deleted or damaged while replicas serve certificates from those CAs), keeps
/// the ones that have not expired in the bundle, as the previous CA, for `ca_overlap` from `now`:
/// replicas that still serve the old certificate stay trusted until their next pass reads the new
/// Secret, so replacing it opens no window in which the apiserver rejects a replica. `trusted` is
/// the PEM bundle the configurations hold now.
pub fn keep_trusted(next: &mut Stored, trusted: &str, now: OffsetDateTime, s: &CertSettings) {
    let kept = live_others(&next.bundle(), trusted, now);
    if !kept.is_empty() {
        let until = now
            .checked_add(dur(s.ca_overlap))
            .unwrap_or(next.ca.not_after);
        next.previous_ca = Some((kept, until));
    }
}

/// `bundle`, then the certificates of `other` that have not expired and are not in it.
pub fn merged_bundle(bundle: &str, other: &str, now: OffsetDateTime) -> String {
    format!("{bundle}{}", live_others(bundle, other, now))
}

/// The certificates of `other`, as PEM, that have not expired at `now` and are not in `bundle`
/// (each once).
fn live_others(bundle: &str, other: &str, now: OffsetDateTime) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut seen: Vec<CertificateDer> = CertificateDer::pem_slice_iter(bundle.as_bytes())
        .filter_map(Result::ok)
        .collect();
    let mut kept = String::new();
    for der in CertificateDer::pem_slice_iter(other.as_bytes()).filter_map(Result::ok) {
        let live = CertSummary::from_der(&der).is_some_and(|c| c.not_after > now);
        if live && !seen.contains(&der) {
            kept.push_str(&pem_of(&der));
            seen.push(der);
        }
    }
    kept
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Keeps the Secret, the webhook configurations' `caBundle` and the served certificate in step.
pub struct CertManager {
    pub client: Client,
    pub settings: CertSettings,
    pub metrics: Arc<Metrics>,
}

impl CertManager {
    /// One pass: read the Secret, rotate what is due, write it back, sync the CA bundle.
    pub async fn reconcile(&self) -> Result<Stored, CertError> {
        let s = &self.settings;
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &s.namespace);
        let kube_err = |what: &str| {
            let what = what.to_string();
            move |source| CertError::Kube { what, source }
        };
        let mut attempts = 0;
        let stored = loop {
            attempts += 1;
            let current = secrets
                .get_opt(&s.secret)
                .await
                .map_err(kube_err(&format!("Secret {}/{}", s.namespace, s.secret)))?;
            let stored = current.as_ref().and_then(Stored::from_secret);
            let now = OffsetDateTime::now_utc();
            let step = plan(now, stored.as_ref(), s);
            let Some(mut next) = carry_out(step, now, stored.clone(), s)? else {
                break stored.expect("Keep needs a stored Secret");
            };
            if step == Plan::Create {
                let trusted = self.trusted_bundle().await?;
                keep_trusted(&mut next, &trusted, now, s);
                if next.previous_ca.is_some() {
                    // The new CA is trusted before any replica can read its certificate.
                    tracing::warn!(
                        "certificates made from scratch while the webhook configurations trust other CAs; those stay in the bundle for --ca-overlap ({:?}), until every replica serves the new certificate",
                        s.ca_overlap
                    );
                    self.sync_ca_bundle(next.bundle().as_bytes(), true).await?;
                }
            }
            let mut secret = next.to_secret(&s.namespace, &s.secret);
            let written = match &current {
                Some(cur) => {
                    secret.metadata.resource_version = cur.metadata.resource_version.clone();
                    secrets
                        .replace(&s.secret, &PostParams::default(), &secret)
                        .await
                }
                None => secrets.create(&PostParams::default(), &secret).await,
            };
            match written {
                Ok(_) => {
                    tracing::info!(step = ?step, cert_not_after = %next.cert_not_after, ca_not_after = %next.ca.not_after, "certificates updated in Secret {}/{}", s.namespace, s.secret);
                    self.metrics.certificate_rotated();
                    break next;
                }
                // Another replica wrote first: read again and go from its result.
                Err(kube::Error::Api(e)) if e.code == 409 && attempts < CONFLICT_ATTEMPTS => {
                    self.metrics.write_conflict();
                    tracing::debug!(
                        "Secret {}/{} was written by another replica; reading it again",
                        s.namespace,
                        s.secret
                    );
                    continue;
                }
                Err(e) => {
                    return Err(CertError::Kube {
                        what: format!("writing Secret {}/{}", s.namespace, s.secret),
                        source: e,
                    });
                }
            }
        };
        self.sync_ca_bundle(stored.bundle().as_bytes(), false)
            .await?;
        Ok(stored)
    }

    /// The caBundle the webhook configurations hold now (the first found; empty when none).
    async fn trusted_bundle(&self) -> Result<String, CertError> {
        let err = |what: &str| {
            let what = what.to_string();
            move |source| CertError::Kube { what, source }
        };
        let mut bundles: Vec<Option<ByteString>> = Vec::new();
        if let Some(name) = &self.settings.mutating_config {
            let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
            let cfg = api.get_opt(name).await.map_err(err(name))?;
            bundles.extend(
                cfg.into_iter()
                    .flat_map(|c| c.webhooks.unwrap_or_default())
                    .map(|w| w.client_config.ca_bundle),
            );
        }
        if let Some(name) = &self.settings.validating_config {
            let api: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
            let cfg = api.get_opt(name).await.map_err(err(name))?;
            bundles.extend(
                cfg.into_iter()
                    .flat_map(|c| c.webhooks.unwrap_or_default())
                    .map(|w| w.client_config.ca_bundle),
            );
        }
        Ok(bundles
            .into_iter()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .collect())
    }

    /// Sets `bundle` as every webhook's caBundle; with `add`, keeps the unexpired CAs the
    /// configuration holds next to it (a replica racing to make certificates from scratch must
    /// not take out the CA of the one that wins).
    async fn sync_ca_bundle(&self, bundle: &[u8], add: bool) -> Result<(), CertError> {
        let bundle = ByteString(bundle.to_vec());
        if let Some(name) = &self.settings.mutating_config {
            let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
            sync_one(&api, name, &bundle, add, mutating_clients, &self.metrics).await?;
        }
        if let Some(name) = &self.settings.validating_config {
            let api: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
            sync_one(&api, name, &bundle, add, validating_clients, &self.metrics).await?;
        }
        Ok(())
    }
}

/// Sets `bundle` as the caBundle of every webhook in one configuration, writing only when one
/// differs. The two configuration kinds differ only in how their webhooks are reached.
///
/// Replicas starting together all write the same bundle; the write carries the resourceVersion
/// read, so a replica that loses the race (409 Conflict) reads the configuration again and
/// usually finds nothing left to do.
fn mutating_clients(c: &mut MutatingWebhookConfiguration) -> Vec<&mut WebhookClientConfig> {
    let hooks = c.webhooks.iter_mut().flatten();
    hooks.map(|w| &mut w.client_config).collect()
}

fn validating_clients(c: &mut ValidatingWebhookConfiguration) -> Vec<&mut WebhookClientConfig> {
    let hooks = c.webhooks.iter_mut().flatten();
    hooks.map(|w| &mut w.client_config).collect()
}

async fn sync_one<K>(
    api: &Api<K>,
    name: &str,
    bundle: &ByteString,
    add: bool,
    client_configs: impl Fn(&mut K) -> Vec<&mut WebhookClientConfig>,
    metrics: &Metrics,
) -> Result<(), CertError>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let what = format!("{} {name}", K::kind(&()));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let Some(mut cfg) = api.get_opt(name).await.map_err(|source| CertError::Kube {
            what: what.clone(),
            source,
        })?
        else {
            return Ok(());
        };
        let mut changed = false;
        for c in client_configs(&mut cfg) {
            let want = match (&c.ca_bundle, add) {
                (Some(have), true) => ByteString(
                    merged_bundle(
                        &String::from_utf8_lossy(&bundle.0),
                        &String::from_utf8_lossy(&have.0),
                        OffsetDateTime::now_utc(),
                    )
                    .into_bytes(),
                ),
                _ => bundle.clone(),
            };
            if c.ca_bundle.as_ref() != Some(&want) {
                c.ca_bundle = Some(want);
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        match api.replace(name, &PostParams::default(), &cfg).await {
            Ok(_) => {
                tracing::info!("caBundle updated in {what}");
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 && attempts < CONFLICT_ATTEMPTS => {
                metrics.write_conflict();
                tracing::debug!("{what} changed while the caBundle was written; reading it again");
            }
            Err(source) => {
                return Err(CertError::Kube {
                    what: what.clone(),
                    source,
                });
            }
        }
    }
}

mod reload;
pub use reload::{CertSummary, Reloader, read_pair, run_file_loop, run_secret_loop};

#[cfg(test)]
mod tests;
