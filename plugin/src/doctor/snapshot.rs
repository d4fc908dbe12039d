//! One read of everything the checks look at, all lists sent at once and no per-node calls; the
//! only extra requests are the logs of at most [`MAX_LOG_PODS`] failing operand pods and a TLS
//! probe of a webhook URL (no API request). The checks then run as pure functions over this value.
//!
//! Memory stays flat with the cluster's size: the lists that grow with it (nodes, pods, events)
//! are read in pages of [`PAGE_SIZE`], and with [`Detail::Checked`] each node and pod is cut down
//! to the fields the checks read ([`checked_node`], [`checked_pod`]) before the next page comes.

use std::collections::BTreeMap;
use std::time::Duration;

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::{label, webhook};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, LogParams};
use kube::{Api, ResourceExt};

use crate::cluster::{Kube, explain};

/// Requests one snapshot takes when every list fits in one page: the version, 16 lists or gets,
/// the TLS Secret's metadata and the two of [`crate::cluster::probe::gpu_operator_signs`]. Each
/// further page of nodes, pods or events is one more; log reads of failing pods come on top.
pub const SNAPSHOT_REQUESTS: u64 = 20;
/// Items per page of the lists that grow with the cluster (nodes, pods, events): what the doctor
/// holds of whole objects at any moment. `kubectl get` pages by the same 500.
pub const PAGE_SIZE: u32 = 500;
/// Logs are fetched for at most this many failing operand pods.
pub const MAX_LOG_PODS: usize = 5;
/// Lines of log kept per failing container.
pub const LOG_TAIL_LINES: i64 = 20;
/// The controller's Lease (leader election) in the operand namespace.
pub const CONTROLLER_LEASE: &str = "gpu-pilot-controller";

/// How much of each node and pod a snapshot keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// The fields the checks read, nothing else: `kubectl gpu doctor`.
    Checked,
    /// Whole objects: the support bundle writes them out.
    Whole,
}

/// Everything the checks need, read once.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// gpu-pilot's namespace (`-n`).
    pub namespace: String,
    /// When the snapshot was taken.
    pub now: Option<Timestamp>,
    /// The apiserver URL.
    pub server: String,
    /// Kubernetes major, minor and gitVersion.
    pub version: Option<(u32, u32, String)>,
    /// Names of every CustomResourceDefinition.
    pub crds: Vec<String>,
    pub policies: Vec<ClusterPolicy>,
    pub nodes: Vec<Node>,
    /// Every pod in gpu-pilot's namespace.
    pub pods: Vec<Pod>,
    /// Pods in phase Pending, cluster-wide.
    pub pending_pods: Vec<Pod>,
    pub daemonsets: Vec<DaemonSet>,
    pub deployments: Vec<Deployment>,
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub config_maps: Vec<ConfigMap>,
    pub runtime_classes: Vec<String>,
    pub mutating: Option<MutatingWebhookConfiguration>,
    pub validating: Option<ValidatingWebhookConfiguration>,
    /// The webhook's TLS Secret: metadata only (its data is never read).
    pub tls_secret: Option<ObjectMeta>,
    /// Warning events in gpu-pilot's namespace.
    pub events: Vec<Event>,
    /// `FailedCreatePodSandBox` events of pods, cluster-wide (a field selector on the reason),
    /// each cut to what the check reads ([`checked_event`]).
    pub sandbox_events: Vec<Event>,
    pub lease: Option<Lease>,
    /// Signs of NVIDIA's GPU Operator, as sentences.
    pub gpu_operator_signs: Vec<String>,
    /// Result of a TLS handshake with each webhook URL target: `Err(why)` when it failed.
    pub url_probes: BTreeMap<String, Result<(), String>>,
    /// Last lines of failing operand containers, by `pod/container`.
    pub logs: BTreeMap<String, String>,
    /// Parts that could not be read (forbidden, ...), with why: the checks that need them say so.
    pub unreadable: Vec<String>,
}

fn names<K>(items: Vec<kube::core::PartialObjectMeta<K>>) -> Vec<String> {
    items
        .into_iter()
        .map(|m| m.metadata.name.unwrap_or_default())
        .collect()
}

/// What a list request gave: the items, or why none.
fn keep<T>(
    part: &str,
    r: Result<Vec<T>, kube::Error>,
    unreadable: &mut Vec<String>,
    server: &str,
) -> Vec<T> {
    match r {
        Ok(v) => v,
        // A resource the apiserver does not serve (no CRD yet) is simply empty.
        Err(kube::Error::Api(s)) if s.code == 404 => Vec::new(),
        Err(e) => {
            unreadable.push(explain(&e, server, &format!("reading {part}")));
            Vec::new()
        }
    }
}

fn keep_opt<T>(
    part: &str,
    r: Result<Option<T>, kube::Error>,
    unreadable: &mut Vec<String>,
    server: &str,
) -> Option<T> {
    match r {
        Ok(v) => v,
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => {
            unreadable.push(explain(&e, server, &format!("reading {part}")));
            None
        }
    }
}

async fn list<K>(api: Api<K>, lp: ListParams) -> Result<Vec<K>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api.list(&lp).await?.items)
}

/// A list read in pages of [`PAGE_SIZE`], each item passed through `keep` before the next page is
/// asked for, so only one page of whole objects is held at a time.
async fn list_paged<K>(api: Api<K>, lp: ListParams, keep: fn(K) -> K) -> Result<Vec<K>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut lp = lp.limit(PAGE_SIZE);
    let mut out = Vec::new();
    loop {
        let page = api.list(&lp).await?;
        out.extend(page.items.into_iter().map(keep));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => lp = lp.continue_token(&token),
            _ => break,
        }
    }
    out.shrink_to_fit();
    Ok(out)
}

/// Whole objects but for `metadata.managedFields` (who set which field: most of an object's
/// size, read by no check on these kinds, and left out of the bundle).
fn without_managed_fields<K: kube::Resource>(mut k: K) -> K {
    k.meta_mut().managed_fields = None;
    k
}

/// Of a node's managedFields, only the entries that own the MIG state label (when it was last
/// written tells a MIG change pending for long from one under way).
fn keep_mig_state_fields(m: &mut ObjectMeta) {
    if let Some(fields) = m.managed_fields.as_mut() {
        fields.retain(crate::doctor::checks::writes_mig_state);
    }
}

/// A whole node but for the managedFields no check reads.
fn whole_node(mut n: Node) -> Node {
    keep_mig_state_fields(&mut n.metadata);
    n
}

/// The annotation `kubectl apply` keeps: a copy of the whole object, read by no check.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The metadata the checks read: name, namespace, labels, annotations, owners, timestamps and
/// the managedFields entries that own the MIG state label.
fn checked_meta(mut m: ObjectMeta) -> ObjectMeta {
    if let Some(a) = m.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
    keep_mig_state_fields(&mut m);
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels,
        annotations: m.annotations,
        owner_references: m.owner_references,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        managed_fields: m.managed_fields.filter(|f| !f.is_empty()),
        ..ObjectMeta::default()
    }
}

/// A node cut down to what the checks read: metadata, taints and cordon, capacity, allocatable
/// and conditions (no images, addresses, system info or heartbeat times).
pub fn checked_node(n: Node) -> Node {
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus};
    Node {
        metadata: checked_meta(n.metadata),
        spec: n.spec.map(|s| NodeSpec {
            taints: s.taints,
            unschedulable: s.unschedulable,
            ..NodeSpec::default()
        }),
        status: n.status.map(|s| NodeStatus {
            allocatable: s.allocatable,
            capacity: s.capacity,
            conditions: s.conditions.map(|cs| {
                cs.into_iter()
                    .map(|c| NodeCondition {
                        last_heartbeat_time: None,
                        ..c
                    })
                    .collect()
            }),
            ..NodeStatus::default()
        }),
    }
}

/// A pod cut down to what the checks read: metadata; node, selector, tolerations, runtime class
/// and each container's name, image and resources; phase, conditions and container states (no
/// volumes, environment, probes, commands, IPs or image IDs).
pub fn checked_pod(p: Pod) -> Pod {
    use k8s_openapi::api::core::v1::{Container, ContainerStatus, PodSpec, PodStatus};
    let container = |c: Container| Container {
        name: c.name,
        image: c.image,
        resources: c.resources,
        ..Container::default()
    };
    let status = |c: ContainerStatus| ContainerStatus {
        name: c.name,
        image: c.image,
        ready: c.ready,
        started: c.started,
        restart_count: c.restart_count,
        state: c.state,
        last_state: c.last_state,
        ..ContainerStatus::default()
    };
    Pod {
        metadata: checked_meta(p.metadata),
        spec: p.spec.map(|s| PodSpec {
            node_name: s.node_name,
            node_selector: s.node_selector,
            tolerations: s.tolerations,
            runtime_class_name: s.runtime_class_name,
            containers: s.containers.into_iter().map(container).collect(),
            init_containers: s
                .init_containers
                .map(|cs| cs.into_iter().map(container).collect()),
            ..PodSpec::default()
        }),
        status: p.status.map(|s| PodStatus {
            phase: s.phase,
            reason: s.reason,
            message: s.message,
            start_time: s.start_time,
            conditions: s.conditions,
            container_statuses: s
                .container_statuses
                .map(|cs| cs.into_iter().map(status).collect()),
            init_container_statuses: s
                .init_container_statuses
                .map(|cs| cs.into_iter().map(status).collect()),
            ..PodStatus::default()
        }),
    }
}

/// The kubelet's event when it cannot create a pod's sandbox.
pub const SANDBOX_FAILED: &str = "FailedCreatePodSandBox";
/// Characters of an event's message a snapshot keeps (the runtime's error comes first).
const MESSAGE_CHARS: usize = 1000;

/// An event cut down to what the checks read: its object, reason, message (the first
/// [`MESSAGE_CHARS`]), count, times and where it came from.
pub fn checked_event(e: Event) -> Event {
    use k8s_openapi::api::core::v1::ObjectReference;
    let o = e.involved_object;
    Event {
        metadata: ObjectMeta {
            name: e.metadata.name,
            namespace: e.metadata.namespace,
            creation_timestamp: e.metadata.creation_timestamp,
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            kind: o.kind,
            namespace: o.namespace,
            name: o.name,
            uid: o.uid,
            ..ObjectReference::default()
        },
        type_: e.type_,
        reason: e.reason,
        message: e.message.map(|m| m.chars().take(MESSAGE_CHARS).collect()),
        count: e.count,
        last_timestamp: e.last_timestamp,
        event_time: e.event_time,
        source: e.source,
        reporting_instance: e.reporting_instance,
        ..Event::default()
    }
}

impl Snapshot {
    /// Reads the cluster. Fails only when the cluster cannot be reached at all (with what to do);
    /// a part that cannot be read is recorded in `unreadable` and the rest is still checked.
    pub async fn gather(kube: &Kube, namespace: &str, detail: Detail) -> anyhow::Result<Snapshot> {
        let c = kube.client.clone();
        let ns = namespace;
        // The small lists are served from the apiserver's watch cache (resourceVersion=0): a
        // doctor can live with a view a moment old. The paged ones are consistent reads, which
        // the apiserver also serves from its cache (and pages only so).
        let all = ListParams::default().match_any();
        let paged = ListParams::default();
        let node: fn(Node) -> Node = match detail {
            Detail::Checked => checked_node,
            Detail::Whole => whole_node,
        };
        let pod: fn(Pod) -> Pod = match detail {
            Detail::Checked => checked_pod,
            Detail::Whole => without_managed_fields,
        };
        let event: fn(Event) -> Event = match detail {
            Detail::Checked => checked_event,
            Detail::Whole => without_managed_fields,
        };
        // The version first: it tells "cannot reach the cluster" apart from everything else.
        let version = crate::cluster::probe::server_version(kube).await?;

        let crd_api = Api::<CustomResourceDefinition>::all(c.clone());
        let rc_api = Api::<RuntimeClass>::all(c.clone());
        let mwc_api = Api::<MutatingWebhookConfiguration>::all(c.clone());
        let vwc_api = Api::<ValidatingWebhookConfiguration>::all(c.clone());
        let secret_api = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), ns);
        let lease_api = Api::<Lease>::namespaced(c.clone(), ns);
        let (
            crds,
            policies,
            nodes,
            pods,
            pending,
            daemonsets,
            deployments,
            services,
            slices,
            config_maps,
            runtime_classes,
            mutating,
            validating,
            tls_secret,
            events,
            sandbox_events,
            lease,
            signs,
        ) = tokio::join!(
            crd_api.list_metadata(&all),
            list(Api::<ClusterPolicy>::all(c.clone()), all.clone()),
            list_paged(Api::<Node>::all(c.clone()), paged.clone(), node),
            list_paged(Api::<Pod>::namespaced(c.clone(), ns), paged.clone(), pod),
            list_paged(
                Api::<Pod>::all(c.clone()),
                paged.clone().fields("status.phase=Pending"),
                pod
            ),
            list(Api::<DaemonSet>::namespaced(c.clone(), ns), all.clone()),
            list(Api::<Deployment>::namespaced(c.clone(), ns), all.clone()),
            list(Api::<Service>::namespaced(c.clone(), ns), all.clone()),
            list(Api::<EndpointSlice>::namespaced(c.clone(), ns), all.clone()),
            list(Api::<ConfigMap>::namespaced(c.clone(), ns), all.clone()),
            rc_api.list_metadata(&all),
            mwc_api.get_opt(webhook::NAME),
            vwc_api.get_opt(webhook::NAME),
            secret_api.get_metadata_opt(webhook::TLS_SECRET),
            // Only Warnings: a rollout leaves thousands of Normal events (Scheduled, Pulled...).
            list_paged(
                Api::<Event>::namespaced(c.clone(), ns),
                paged.clone().fields("type=Warning"),
                without_managed_fields
            ),
            // Pods whose sandbox cannot be created, wherever they are: only that reason is read.
            list_paged(
                Api::<Event>::all(c.clone()),
                paged
                    .clone()
                    .fields(&format!("reason={SANDBOX_FAILED},involvedObject.kind=Pod")),
                event
            ),
            lease_api.get_opt(CONTROLLER_LEASE),
            crate::cluster::probe::gpu_operator_signs(kube),
        );
        let server = kube.server.clone();
        let mut u = Vec::new();
        let mut snap = Snapshot {
            namespace: ns.to_string(),
            now: Some(Timestamp::now()),
            server: server.clone(),
            version: Some(version),
            crds: names(keep(
                "CustomResourceDefinitions",
                crds.map(|l| l.items),
                &mut u,
                &server,
            )),
            policies: keep("ClusterPolicies", policies, &mut u, &server),
            nodes: keep("Nodes", nodes, &mut u, &server),
            pods: keep(&format!("Pods in {ns}"), pods, &mut u, &server),
            pending_pods: keep("Pending Pods", pending, &mut u, &server),
            daemonsets: keep(&format!("DaemonSets in {ns}"), daemonsets, &mut u, &server),
            deployments: keep(
                &format!("Deployments in {ns}"),
                deployments,
                &mut u,
                &server,
            ),
            services: keep(&format!("Services in {ns}"), services, &mut u, &server),
            endpoint_slices: keep(&format!("EndpointSlices in {ns}"), slices, &mut u, &server),
            config_maps: keep(&format!("ConfigMaps in {ns}"), config_maps, &mut u, &server),
            runtime_classes: names(keep(
                "RuntimeClasses",
                runtime_classes.map(|l| l.items),
                &mut u,
                &server,
            )),
            mutating: keep_opt(
                "the MutatingWebhookConfiguration",
                mutating,
                &mut u,
                &server,
            ),
            validating: keep_opt(
                "the ValidatingWebhookConfiguration",
                validating,
                &mut u,
                &server,
            ),
            tls_secret: keep_opt(
                "the webhook's TLS Secret (metadata)",
                tls_secret,
                &mut u,
                &server,
            )
            .map(|m| m.metadata),
            events: keep(&format!("Events in {ns}"), events, &mut u, &server),
            sandbox_events: keep(
                &format!("{SANDBOX_FAILED} Events"),
                sandbox_events,
                &mut u,
                &server,
            ),
            lease: keep_opt("the controller's Lease", lease, &mut u, &server),
            gpu_operator_signs: match signs {
                Ok(s) => s,
                Err(e) => {
                    u.push(format!("{e:#}"));
                    Vec::new()
                }
            },
            url_probes: BTreeMap::new(),
            logs: BTreeMap::new(),
            unreadable: Vec::new(),
        };
        snap.unreadable = u;

        // Webhook URL targets are probed from here (a Service target is judged by its endpoints).
        let urls = snap.webhook_urls();
        let probes = futures::future::join_all(urls.iter().map(|(url, ca)| probe_url(url, ca)));
        let logs = fetch_logs(kube, ns, &snap);
        let (probes, logs) = tokio::join!(probes, logs);
        snap.url_probes = urls.into_iter().map(|(u, _)| u).zip(probes).collect();
        snap.logs = logs;
        Ok(snap)
    }

    /// Every distinct URL the webhook configurations call, with their caBundle.
    pub fn webhook_urls(&self) -> Vec<(String, Vec<u8>)> {
        let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (_, _, cc) in self.webhook_client_configs() {
            if let Some(url) = &cc.url {
                let ca = cc
                    .ca_bundle
                    .as_ref()
                    .map(|b| b.0.clone())
                    .unwrap_or_default();
                out.entry(url.clone()).or_insert(ca);
            }
        }
        out.into_iter().collect()
    }

    /// `(configuration kind, webhook name, client config)` of every webhook gpu-pilot registered.
    pub fn webhook_client_configs(
        &self,
    ) -> Vec<(
        &'static str,
        String,
        &k8s_openapi::api::admissionregistration::v1::WebhookClientConfig,
    )> {
        let mut out = Vec::new();
        if let Some(m) = &self.mutating {
            for w in m.webhooks.iter().flatten() {
                out.push((
                    "MutatingWebhookConfiguration",
                    w.name.clone(),
                    &w.client_config,
                ));
            }
        }
        if let Some(v) = &self.validating {
            for w in v.webhooks.iter().flatten() {
                out.push((
                    "ValidatingWebhookConfiguration",
                    w.name.clone(),
                    &w.client_config,
                ));
            }
        }
        out
    }
}

/// The operand pods whose logs explain their failure (crash loops and errored containers),
/// at most [`MAX_LOG_PODS`], with the container and whether to read the previous instance.
pub fn log_targets(snap: &Snapshot) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for p in &snap.pods {
        if !is_operand(p) {
            continue;
        }
        let statuses = p.status.as_ref().into_iter().flat_map(|s| {
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
        });
        for cs in statuses {
            let waiting = cs
                .state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref());
            let terminated_error = cs
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_some_and(|t| t.exit_code != 0);
            if matches!(waiting, Some("CrashLoopBackOff" | "RunContainerError")) || terminated_error
            {
                out.push((p.name_any(), cs.name.clone(), cs.restart_count > 0));
                break;
            }
        }
        if out.len() >= MAX_LOG_PODS {
            break;
        }
    }
    out
}

async fn fetch_logs(kube: &Kube, ns: &str, snap: &Snapshot) -> BTreeMap<String, String> {
    let api: Api<Pod> = Api::namespaced(kube.client.clone(), ns);
    let targets = log_targets(snap);
    let fetched = futures::future::join_all(targets.iter().map(|(pod, container, previous)| {
        let api = api.clone();
        async move {
            let lp = LogParams {
                container: Some(container.clone()),
                previous: *previous,
                tail_lines: Some(LOG_TAIL_LINES),
                limit_bytes: Some(16 * 1024),
                ..Default::default()
            };
            match api.logs(pod, &lp).await {
                Ok(text) => text,
                Err(e) => format!("(no logs: {})", short_error(&e)),
            }
        }
    }))
    .await;
    targets
        .into_iter()
        .zip(fetched)
        .map(|((pod, container, _), text)| (format!("{pod}/{container}"), text))
        .collect()
}

fn short_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

/// An operand pod: managed by gpu-pilot and labelled with an operand component.
pub fn is_operand(p: &Pod) -> bool {
    let l = p.labels();
    l.get(label::MANAGED_BY).map(String::as_str) == Some(label::MANAGED_BY_VALUE)
        && l.get(label::COMPONENT).is_some_and(|c| {
            gpu_pilot_api::names::Component::ALL
                .iter()
                .any(|k| k.gate_name() == c)
        })
}

/// Connects to a webhook URL and completes a TLS handshake that trusts only its caBundle.
async fn probe_url(url: &str, ca_bundle: &[u8]) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{url} is not an https:// URL; the apiserver only calls https"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h.trim_start_matches('[').trim_end_matches(']'), p),
            Err(_) => (hostport, 443),
        },
        _ => (hostport, 443),
    };
    let connect = tokio::net::TcpStream::connect((host, port));
    let tcp = match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Err(_) => return Err(format!("no answer from {host}:{port} within 3 s")),
        Ok(Err(e)) => return Err(format!("cannot connect to {host}:{port}: {e}")),
        Ok(Ok(s)) => s,
    };
    let mut roots = rustls::RootCertStore::empty();
    let mut rest = ca_bundle;
    let mut any = false;
    while let Some(der) = next_pem_cert(&mut rest) {
        if roots.add(der.into()).is_ok() {
            any = true;
        }
    }
    if !any {
        // TCP answered; without a CA there is nothing to verify against (reported by another check).
        return Ok(());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host} is not a valid TLS server name: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    match tokio::time::timeout(Duration::from_secs(3), tls.connect(name, tcp)).await {
        Err(_) => Err(format!(
            "{host}:{port} accepted TCP but no TLS handshake within 3 s"
        )),
        Ok(Err(e)) => Err(format!("TLS handshake with {host}:{port} failed: {e}")),
        Ok(Ok(_)) => Ok(()),
    }
}

/// The next certificate of a PEM bundle, as DER bytes.
fn next_pem_cert(rest: &mut &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    let text = std::str::from_utf8(rest).ok()?;
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = text.find(BEGIN)? + BEGIN.len();
    let len = text[start..].find(END)?;
    let body: String = text[start..start + len]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    let consumed = start + len + END.len();
    *rest = &rest[consumed..];
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()
        .or_else(|| next_pem_cert(rest))
}
