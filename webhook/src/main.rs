//! `gpu-pilot-webhook`: admission webhooks for GPU pods and `ClusterPolicy` edits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gpu_pilot_api::names::{DEFAULT_NAMESPACE, webhook};
use gpu_pilot_core::duration::parse as parse_duration;
use gpu_pilot_core::render::webhook as manifests;
use gpu_pilot_core::telemetry::{self, LogFormat};
use gpu_pilot_webhook::certs::CertSettings;
use gpu_pilot_webhook::cluster::Scope;
use gpu_pilot_webhook::server::Limits;
use gpu_pilot_webhook::{CertSource, Options};

#[derive(Parser)]
#[command(
    name = "gpu-pilot-webhook",
    version,
    about = "Admission webhooks: gives GPU pods their runtimeClass and MIG resources, guards ClusterPolicy edits",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the admission webhooks over HTTPS.
    Serve(Box<Serve>),
    /// Print the RBAC, Service, Deployment and webhook configurations as YAML.
    Manifests {
        #[arg(long, default_value = DEFAULT_NAMESPACE)]
        namespace: String,
        #[arg(long, default_value = manifests::DEFAULT_IMAGE)]
        image: String,
        /// Let cert-manager inject the CA from this Certificate (namespace/name) instead of the
        /// webhook's own CA; run `serve` with --tls-cert-file/--tls-key-file then.
        #[arg(long)]
        cert_manager_certificate: Option<String>,
    },
}

#[derive(Args)]
struct Serve {
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// gpu-pilot's namespace: the TLS Secret and the ConfigMaps a policy names live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    namespace: String,
    /// The Service the apiserver reaches the webhook through (its DNS names go in the certificate).
    #[arg(long, default_value = webhook::NAME)]
    service: String,
    /// More DNS names or IP addresses for the serving certificate (repeatable).
    #[arg(long = "extra-name")]
    extra_names: Vec<String>,
    /// The Secret holding the CA and serving certificate.
    #[arg(long, default_value = webhook::TLS_SECRET)]
    secret: String,
    /// Name of the Mutating- and ValidatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, default_value = webhook::NAME)]
    webhook_configuration: String,
    /// Serve this certificate file (e.g. from cert-manager) instead of managing a Secret.
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    #[arg(long, requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    #[arg(long, default_value = "3650d", value_parser = parse_duration)]
    ca_validity: Duration,
    #[arg(long, default_value = "365d", value_parser = parse_duration)]
    ca_renew_before: Duration,
    /// How long a new CA is trusted alongside the old one before it signs the serving certificate.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ca_overlap: Duration,
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    cert_validity: Duration,
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    cert_renew_before: Duration,
    /// How often certificates are checked.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    check_interval: Duration,
    /// Only ClusterPolicies with these labels count (a label selector; empty: all).
    #[arg(long, default_value = "")]
    policy_selector: String,
    /// Only nodes with these labels count for MIG profiles (a label selector; empty: all).
    #[arg(long, default_value = "")]
    node_selector: String,
    /// Largest review body accepted (413 past it). The default holds the two objects of an update
    /// at the apiserver's own 3 MiB request limit.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Reviews answered at once; more are answered 429 (the apiserver retries after a second).
    #[arg(long, default_value_t = Limits::default().max_in_flight)]
    max_in_flight: usize,
    /// Reviews from one IP address answered at once; more from it are answered 429, so one
    /// client cannot hold every slot the apiserver needs.
    #[arg(long, default_value_t = Limits::default().max_in_flight_per_peer)]
    max_in_flight_per_peer: usize,
    /// Bytes of review bodies held at once; more are answered 429. Bounds the memory reviews use.
    #[arg(long, default_value_t = Limits::default().max_in_flight_bytes)]
    max_in_flight_bytes: usize,
    /// Open connections; more are closed when accepted.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Open connections from one IP address.
    #[arg(long, default_value_t = Limits::default().max_connections_per_peer)]
    max_connections_per_peer: usize,
    /// A connection with no request for this long is closed (HTTP/2: with GOAWAY).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// HTTP/2 streams per connection.
    #[arg(long, default_value_t = Limits::default().max_concurrent_streams)]
    max_concurrent_streams: u32,
    /// Bytes of headers in one request.
    #[arg(long, default_value_t = Limits::default().max_header_bytes)]
    max_header_bytes: u32,
    /// Log format (lines on standard error).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Manifests {
            namespace,
            image,
            cert_manager_certificate,
        } => {
            print!(
                "{}{}",
                manifests::GENERATED_HEADER,
                manifests::all_yaml(&namespace, &image, cert_manager_certificate)
            );
            Ok(())
        }
        Command::Serve(s) => serve(*s).await,
    }
}

async fn serve(s: Serve) -> anyhow::Result<()> {
    telemetry::init(s.log_format, "info");
    let client = kube::Client::try_default().await.context(
        "no Kubernetes credentials: run in a pod with a service account, or set KUBECONFIG",
    )?;
    let certs = match (s.tls_cert_file, s.tls_key_file) {
        (Some(cert), Some(key)) => CertSource::Files { cert, key },
        _ => {
            let mut names = CertSettings::service_names(&s.service, &s.namespace);
            names.extend(s.extra_names);
            CertSource::Secret(CertSettings {
                namespace: s.namespace.clone(),
                secret: s.secret,
                names,
                ca_validity: s.ca_validity,
                ca_renew_before: s.ca_renew_before,
                ca_overlap: s.ca_overlap,
                cert_validity: s.cert_validity,
                cert_renew_before: s.cert_renew_before,
                mutating_config: Some(s.webhook_configuration.clone()),
                validating_config: Some(s.webhook_configuration),
            })
        }
    };
    let opts = Options {
        listen: s.listen,
        scope: Scope {
            namespace: s.namespace,
            policy_selector: s.policy_selector,
            node_selector: s.node_selector,
            pod_namespaces: Vec::new(),
        },
        certs,
        limits: Limits {
            max_body_bytes: s.max_body_bytes,
            request_timeout: s.request_timeout,
            max_in_flight: s.max_in_flight,
            max_in_flight_per_peer: s.max_in_flight_per_peer,
            max_in_flight_bytes: s.max_in_flight_bytes,
            max_connections: s.max_connections,
            max_connections_per_peer: s.max_connections_per_peer,
            idle_timeout: s.idle_timeout,
            max_concurrent_streams: s.max_concurrent_streams,
            max_header_bytes: s.max_header_bytes,
            ..Limits::default()
        },
        check_interval: s.check_interval,
        startup_timeout: Duration::from_secs(120),
    };
    let handle = gpu_pilot_webhook::server::Handle::new();
    let on_signal = handle.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler can be installed");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: finishing open requests");
        on_signal.graceful_shutdown(Some(Duration::from_secs(10)));
    });
    gpu_pilot_webhook::run(client, opts, Default::default(), handle).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_default_of_serve_parses() {
        // Defaults go through the same parsers as what a user types; one that a parser refuses
        // would stop the webhook at start (3650d once did, against a one-year duration cap).
        Cli::try_parse_from(["gpu-pilot-webhook", "serve"]).expect("serve's defaults parse");
    }
}
