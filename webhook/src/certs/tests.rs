use super::*;

fn settings() -> CertSettings {
    CertSettings {
        namespace: "gpu-pilot".into(),
        secret: "s".into(),
        names: vec!["gpu-pilot-webhook.gpu-pilot.svc".into(), "127.0.0.1".into()],
        ca_validity: Duration::from_secs(1000),
        ca_renew_before: Duration::from_secs(300),
        ca_overlap: Duration::from_secs(60),
        cert_validity: Duration::from_secs(100),
        cert_renew_before: Duration::from_secs(30),
        mutating_config: None,
        validating_config: None,
    }
}

fn at(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap()
}

fn step(now: OffsetDateTime, st: Stored, s: &CertSettings) -> (Plan, Stored) {
    let p = plan(now, Some(&st), s);
    let next = carry_out(p, now, Some(st.clone()), s)
        .unwrap()
        .unwrap_or(st);
    (p, next)
}

#[test]
fn settings_that_overlap_are_refused() {
    assert!(settings().check().is_ok());
    let mut s = settings();
    s.cert_renew_before = s.cert_validity;
    assert!(
        s.check()
            .unwrap_err()
            .to_string()
            .contains("--cert-renew-before")
    );
    let mut s = settings();
    s.ca_overlap = Duration::from_secs(290);
    assert!(
        s.check()
            .unwrap_err()
            .to_string()
            .contains("--ca-renew-before")
    );
}

#[test]
fn durations_too_long_for_a_certificate_are_refused_not_a_panic() {
    let huge = Duration::from_secs(u64::MAX);
    for field in 0..5 {
        let mut s = settings();
        let d = [
            &mut s.ca_validity,
            &mut s.ca_renew_before,
            &mut s.ca_overlap,
            &mut s.cert_validity,
            &mut s.cert_renew_before,
        ];
        *d.into_iter().nth(field).unwrap() = huge;
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("at most 36500d"), "{e}");
    }
    // Past the check (a caller that skipped it), certificates are still never made with a date
    // that overflows.
    let mut s = settings();
    s.ca_validity = huge;
    let e = carry_out(Plan::Create, at(0), None, &s).unwrap_err();
    assert!(e.to_string().contains("past the year 9999"), "{e}");
    let mut s = settings();
    s.cert_validity = Duration::from_secs(9000 * 365 * 24 * 3600);
    let ca = new_ca(at(0), Duration::from_secs(1000)).unwrap();
    assert!(new_serving_cert(&ca, &s.names, at(0), s.cert_validity).is_err());
    // The planner only compares, so huge settings decide without a panic.
    let st = carry_out(Plan::Create, at(0), None, &settings())
        .unwrap()
        .unwrap();
    let mut s = settings();
    (s.ca_renew_before, s.cert_renew_before, s.ca_overlap) = (huge, huge, huge);
    assert_eq!(plan(at(1), Some(&st), &s), Plan::StageNextCa);
}

#[test]
fn a_full_life_cycle_keeps_a_trusted_chain() {
    let s = settings();
    assert_eq!(plan(at(0), None, &s), Plan::Create);
    let st = carry_out(Plan::Create, at(0), None, &s).unwrap().unwrap();
    assert_eq!(st.cert_not_after, at(100));
    assert_eq!(plan(at(50), Some(&st), &s), Plan::Keep);
    let (p, st) = step(at(75), st, &s);
    assert_eq!(p, Plan::RenewCert);
    assert_eq!(st.cert_not_after, at(175));
    let first_ca = st.ca.cert_pem.clone();

    // Walk forward in 10 s steps; every step, the serving cert's CA must be in the bundle.
    let mut st = st;
    let mut seen = Vec::new();
    for t in (80..=2500).step_by(10) {
        let (p, next) = step(at(t), st, &s);
        if p != Plan::Keep {
            seen.push((t, p));
        }
        st = next;
        assert!(st.cert_not_after > at(t), "expired serving cert at {t}");
        assert!(st.ca.not_after > at(t), "expired CA at {t}");
        assert!(st.bundle().contains(&st.ca.cert_pem));
    }
    let staged = seen
        .iter()
        .find(|(_, p)| *p == Plan::StageNextCa)
        .expect("a next CA")
        .0;
    let promoted = seen
        .iter()
        .find(|(_, p)| *p == Plan::PromoteNextCa)
        .expect("a promotion")
        .0;
    assert_eq!(staged, 700, "staged ca_renew_before ahead of expiry");
    assert_eq!(promoted, 760, "promoted after ca_overlap");
    assert!(seen.iter().any(|(_, p)| *p == Plan::DropPreviousCa));
    assert!(
        !seen.iter().any(|(_, p)| *p == Plan::Create),
        "never from scratch: {seen:?}"
    );
    assert_ne!(st.ca.cert_pem, first_ca);
}

#[test]
fn changed_names_renew_the_serving_cert() {
    let s = settings();
    let st = carry_out(Plan::Create, at(0), None, &s).unwrap().unwrap();
    let mut s2 = s.clone();
    s2.names.push("other.example".into());
    assert_eq!(plan(at(1), Some(&st), &s2), Plan::RenewCert);
}

#[test]
fn secret_round_trip() {
    let s = settings();
    let mut st = carry_out(Plan::Create, at(0), None, &s).unwrap().unwrap();
    st = carry_out(Plan::StageNextCa, at(1), Some(st), &s)
        .unwrap()
        .unwrap();
    let secret = st.to_secret("ns", "name");
    assert_eq!(Stored::from_secret(&secret), Some(st.clone()));
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let bundle = String::from_utf8(secret.data.unwrap()[names::CA_BUNDLE_KEY].0.clone()).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
}

#[test]
fn serving_cert_chains_to_the_ca_in_rustls() {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let s = settings();
    let now = OffsetDateTime::now_utc();
    let st = carry_out(Plan::Create, now, None, &s).unwrap().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(st.bundle().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let leaf = CertificateDer::from_pem_slice(st.cert_pem.as_bytes()).unwrap();
    for name in ["gpu-pilot-webhook.gpu-pilot.svc", "127.0.0.1"] {
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name).unwrap(),
                &[],
                UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from("evil.example").unwrap(),
                &[],
                UnixTime::now()
            )
            .is_err()
    );
}

#[test]
fn cert_summary_reads_serial_and_expiry() {
    let s = settings();
    let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let ca = new_ca(now, Duration::from_secs(1000)).unwrap();
    // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 on.
    for validity in [100u64, 40 * 365 * 86400] {
        let (pem, _, not_after) =
            new_serving_cert(&ca, &s.names, now, Duration::from_secs(validity)).unwrap();
        let summary = CertSummary::from_pem(&pem).expect("a summary");
        assert_eq!(summary.not_after, not_after.min(ca.not_after));
        assert!(!summary.serial.is_empty());
    }
    let far = new_ca(now, Duration::from_secs(40 * 365 * 86400)).unwrap();
    assert_eq!(
        CertSummary::from_pem(&far.cert_pem).unwrap().not_after,
        far.not_after
    );
    let mut params = CertificateParams::new(vec!["x".to_string()]).unwrap();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x01, 0xab, 0xcd]));
    let cert = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
    assert_eq!(CertSummary::from_pem(&cert.pem()).unwrap().serial, "01abcd");
    assert_eq!(CertSummary::from_pem("no PEM here"), None);
    assert_eq!(CertSummary::from_der(&[0x30, 0x82, 0x01]), None);
}

#[test]
fn a_mismatched_or_broken_pair_keeps_the_served_certificate() {
    let s = settings();
    let now = OffsetDateTime::now_utc();
    let ca = new_ca(now, Duration::from_secs(1000)).unwrap();
    let (c1, k1, _) = new_serving_cert(&ca, &s.names, now, Duration::from_secs(100)).unwrap();
    let (c2, k2, _) = new_serving_cert(&ca, &s.names, now, Duration::from_secs(200)).unwrap();
    let reloader = Reloader::new(&c1, &k1, Arc::new(Metrics::default())).unwrap();
    let first = reloader.served().unwrap();
    // The new certificate with the old key, half a file, an empty key.
    assert!(reloader.update(&c2, &k1, None).is_err());
    assert!(reloader.update(&c2[..c2.len() / 2], &k2, None).is_err());
    assert!(reloader.update(&c2, "", None).is_err());
    assert_eq!(reloader.served().unwrap(), first);
    assert!(reloader.update(&c2, &k2, None).unwrap());
    assert_ne!(reloader.served().unwrap(), first);
}

/// Whether `bundle` lets a client trust `leaf` for the service name now.
fn trusts(bundle: &str, leaf: &str) -> bool {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let leaf = CertificateDer::from_pem_slice(leaf.as_bytes()).unwrap();
    let name = ServerName::try_from("gpu-pilot-webhook.gpu-pilot.svc").unwrap();
    verifier
        .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
        .is_ok()
}

#[test]
fn certificates_made_again_from_scratch_keep_the_old_ca_trusted_for_the_overlap() {
    let s = settings();
    let now = OffsetDateTime::now_utc();
    // A replica serves this; then the Secret is deleted (or damaged).
    let old = carry_out(Plan::Create, now, None, &s).unwrap().unwrap();
    let trusted = old.bundle();
    let later = now + time::Duration::seconds(5);
    let mut next = carry_out(Plan::Create, later, None, &s).unwrap().unwrap();
    // Without the handover the new bundle would leave the old replica untrusted.
    assert!(!trusts(&next.bundle(), &old.cert_pem));
    // The configurations' bundle, read twice over (two webhooks), plus an expired CA.
    let expired = new_ca(now - time::Duration::days(3), Duration::from_secs(86400)).unwrap();
    keep_trusted(
        &mut next,
        &format!("{trusted}{trusted}{}", expired.cert_pem),
        later,
        &s,
    );
    let bundle = next.bundle();
    assert!(
        trusts(&bundle, &old.cert_pem),
        "the old replica is still trusted"
    );
    assert!(
        trusts(&bundle, &next.cert_pem),
        "the new certificate is trusted"
    );
    assert_eq!(
        bundle.matches("BEGIN CERTIFICATE").count(),
        2,
        "each CA once, no expired one"
    );
    assert_eq!(
        Stored::from_secret(&next.to_secret("ns", "s")).unwrap(),
        next
    );
    // Every replica has read the new Secret after --ca-overlap: the old CA goes.
    let (p, after) = step(later + time::Duration::seconds(61), next.clone(), &s);
    assert_eq!(p, Plan::DropPreviousCa);
    assert!(!trusts(&after.bundle(), &old.cert_pem));
    assert!(trusts(&after.bundle(), &after.cert_pem));
    // Nothing else trusted (a first install): nothing kept.
    let mut first = carry_out(Plan::Create, later, None, &s).unwrap().unwrap();
    keep_trusted(&mut first, "", later, &s);
    assert!(first.previous_ca.is_none());
    // A racing replica adds its CA without taking out the other's.
    let merged = merged_bundle(
        &first.bundle(),
        &format!("{bundle}{}", expired.cert_pem),
        later,
    );
    assert!(
        trusts(&merged, &old.cert_pem)
            && trusts(&merged, &next.cert_pem)
            && trusts(&merged, &first.cert_pem)
    );
    assert_eq!(merged.matches("BEGIN CERTIFICATE").count(), 3);
}

#[test]
fn an_overlap_shorter_than_the_check_interval_is_refused() {
    let s = settings();
    assert!(s.check_with_interval(Duration::from_secs(30)).is_ok());
    for interval in [s.ca_overlap, s.ca_overlap * 2] {
        let e = s.check_with_interval(interval).unwrap_err().to_string();
        assert!(
            e.contains("--ca-overlap (1m) must be longer than --check-interval"),
            "{e}"
        );
    }
    // The other checks still come first.
    let mut bad = settings();
    bad.cert_renew_before = bad.cert_validity;
    let e = bad
        .check_with_interval(Duration::from_secs(1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--cert-renew-before"), "{e}");
}
