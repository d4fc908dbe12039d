//! Pods the kubelet cannot start because their sandbox cannot be created
//! (`FailedCreatePodSandBox`): a RuntimeClass whose handler the node's container runtime lacks
//! (the NVIDIA runtime not configured), a RuntimeClass gone, the pod network, or the pause image.
//! Only pods still Pending count: an event of a pod that started since is history.

use k8s_openapi::api::core::v1::Event;

use super::*;

/// Why a sandbox could not be created, read from the kubelet's message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Cause {
    /// `no runtime for "HANDLER" is configured` (containerd): the RuntimeClass's handler.
    MissingHandler(String),
    /// `RuntimeClass "NAME" not found`.
    RuntimeClassGone(String),
    /// The CNI plugin could not set up the pod's network.
    Network,
    /// The sandbox (pause) image could not be pulled.
    PauseImage,
    Other,
}

fn quoted_after<'a>(message: &'a str, before: &str) -> Option<&'a str> {
    let rest = &message[message.find(before)? + before.len()..];
    rest.split('"').next()
}

fn cause_of(message: &str) -> Cause {
    let lower = message.to_ascii_lowercase();
    if let Some(h) = quoted_after(message, "no runtime for \"") {
        Cause::MissingHandler(h.to_string())
    } else if let Some(rc) = quoted_after(message, "RuntimeClass \"")
        && lower.contains("not found")
    {
        Cause::RuntimeClassGone(rc.to_string())
    } else if lower.contains("network") || lower.contains("cni") {
        Cause::Network
    } else if lower.contains("pause") || lower.contains("sandbox image") {
        Cause::PauseImage
    } else {
        Cause::Other
    }
}

/// When an event last happened.
fn last_seen(e: &Event) -> Option<Timestamp> {
    e.last_timestamp
        .as_ref()
        .map(|t| t.0)
        .or(e.event_time.as_ref().map(|t| t.0))
        .or(e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// One stuck pod: the pod, its node, how often its sandbox failed, the latest event.
struct Stuck<'a> {
    pod: &'a Pod,
    node: String,
    count: i32,
    latest: &'a Event,
}

pub(super) fn sandbox_failures(s: &Snapshot) -> Vec<Finding> {
    let mut stuck: BTreeMap<(String, String), Stuck> = BTreeMap::new();
    for e in &s.sandbox_events {
        let o = &e.involved_object;
        if o.kind.as_deref() != Some("Pod") {
            continue;
        }
        let (ns, name) = (
            o.namespace.clone().unwrap_or_default(),
            o.name.clone().unwrap_or_default(),
        );
        // Still Pending, and the same pod (a pod made again under the name has another uid).
        let Some(pod) = s.pending_pods.iter().find(|p| {
            p.namespace().unwrap_or_default() == ns
                && p.name_any() == name
                && (o.uid.is_none() || p.metadata.uid.is_none() || o.uid == p.metadata.uid)
        }) else {
            continue;
        };
        let node = pod
            .spec
            .as_ref()
            .and_then(|sp| sp.node_name.clone())
            .or_else(|| e.source.as_ref().and_then(|src| src.host.clone()))
            .or_else(|| e.reporting_instance.clone())
            .unwrap_or_default();
        let count = e.count.unwrap_or(1).max(1);
        let entry = stuck.entry((ns, name)).or_insert(Stuck {
            pod,
            node,
            count: 0,
            latest: e,
        });
        entry.count += count;
        if last_seen(e) > last_seen(entry.latest) {
            entry.latest = e;
        }
    }
    let policy_rc = active_policy(s).map(|p| p.spec.operator.runtime_class.clone());
    let mut groups: BTreeMap<(Cause, bool), Vec<Stuck>> = BTreeMap::new();
    for (_, st) in stuck {
        let cause = cause_of(st.latest.message.as_deref().unwrap_or_default());
        let rc = st
            .pod
            .spec
            .as_ref()
            .and_then(|sp| sp.runtime_class_name.clone());
        let ours = !gpu_requests(st.pod).is_empty()
            || st.pod.namespace().as_deref() == Some(s.namespace.as_str())
            || (rc.is_some() && rc == policy_rc)
            || matches!(cause, Cause::MissingHandler(_));
        groups.entry((cause, ours)).or_default().push(st);
    }
    // GPU pods, gpu-pilot's own, the policy's runtime class or a missing handler: errors; the
    // same trouble with other pods is a warning (it is the node's, and GPU pods may meet it).
    groups
        .into_iter()
        .map(|((cause, ours), pods)| {
            let severity = if ours {
                Severity::Error
            } else {
                Severity::Warning
            };
            finding(s, &cause, severity, &pods, policy_rc.as_deref())
        })
        .collect()
}

fn finding(
    s: &Snapshot,
    cause: &Cause,
    severity: Severity,
    pods: &[Stuck],
    policy_rc: Option<&str>,
) -> Finding {
    let nodes: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
    let nodes: Vec<String> = nodes.into_iter().map(str::to_string).collect();
    let on = list_some(&nodes, 3);
    let what = match cause {
        Cause::MissingHandler(h) => {
            format!("the container runtime on {on} has no runtime handler \"{h}\"")
        }
        Cause::RuntimeClassGone(rc) => format!("their RuntimeClass {rc} no longer exists"),
        Cause::Network => format!("the pod network cannot be set up on {on}"),
        Cause::PauseImage => format!("the sandbox (pause) image cannot be had on {on}"),
        Cause::Other => format!("the container runtime on {on} fails to create them"),
    };
    let title = format!(
        "{} stuck before starting: sandbox creation fails (FailedCreatePodSandBox): {what}",
        count_phrase(pods.len(), "pod", "pods")
    );
    let first = &pods[0];
    let rc = first
        .pod
        .spec
        .as_ref()
        .and_then(|sp| sp.runtime_class_name.clone());
    let mut evidence: Vec<String> = pods
        .iter()
        .take(5)
        .map(|st| {
            let ago = age_seconds(s, last_seen(st.latest))
                .map(|a| format!(", last {a}s ago"))
                .unwrap_or_default();
            format!(
                "pod {}/{} on node {}{}: {}x FailedCreatePodSandBox{ago}: {}",
                st.pod.namespace().unwrap_or_default(),
                st.pod.name_any(),
                st.node,
                rc_phrase(st.pod),
                st.count,
                st.latest.message.as_deref().unwrap_or_default()
            )
        })
        .collect();
    let first_ref = format!(
        "-n {} {}",
        first.pod.namespace().unwrap_or_default(),
        first.pod.name_any()
    );
    let fix = match cause {
        Cause::MissingHandler(h) => {
            let rc = rc.unwrap_or_default();
            evidence.push(format!(
                "RuntimeClass {rc} sends these pods to the runtime handler \"{h}\", which the container runtime (containerd) on {on} does not have in its configuration"
            ));
            if policy_rc == Some(rc.as_str()) && !rc.is_empty() {
                format!(
                    "RuntimeClass {rc} is the policy's (spec.operator.runtimeClass), which the NVIDIA container toolkit adds to containerd on GPU nodes. With toolkit.enabled=true, see why the toolkit pod on {on} did not (kubectl {} get pods -o wide; its log). With the nodes' own toolkit (toolkit.enabled=false), run `nvidia-ctk runtime configure --runtime=containerd` on {on} and restart containerd, or set the policy's operator.runtimeClass to a RuntimeClass whose handler the nodes have. The kubelet retries by itself once the handler exists.",
                    ns_flag(s)
                )
            } else {
                format!(
                    "Add the runtime \"{h}\" to containerd's configuration on {on} ([plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.{h}]) and restart containerd; or point RuntimeClass {rc} at a handler the node has; or keep such pods off nodes without it (the RuntimeClass's scheduling.nodeSelector). The kubelet retries by itself once the handler exists; kubectl describe pod {first_ref} shows the events."
                )
            }
        }
        Cause::RuntimeClassGone(rc) => format!(
            "Create RuntimeClass {rc} again (kubectl get runtimeclass), or delete the pods and create them without it{}",
            if policy_rc == Some(rc.as_str()) {
                " (it is the policy's spec.operator.runtimeClass: the controller makes it again while it runs)"
            } else {
                ""
            }
        ),
        Cause::Network => format!(
            "The CNI plugin on {on} fails: check its configuration (/etc/cni/net.d) and its pods, and the kubelet's and containerd's logs there; kubectl describe pod {first_ref} shows the whole error"
        ),
        Cause::PauseImage => format!(
            "containerd on {on} cannot pull its sandbox image: check its sandbox image setting and access to that registry; kubectl describe pod {first_ref} shows the whole error"
        ),
        Cause::Other => format!(
            "kubectl describe pod {first_ref} shows the whole error; containerd's log on {on} says more"
        ),
    };
    Finding::new("pod-sandbox-failed", severity, title)
        .objects(
            pods.iter()
                .map(|st| pod_ref(st.pod))
                .chain(nodes.iter().map(|n| format!("Node/{n}"))),
        )
        .evidence(evidence)
        .fix(fix)
}

fn rc_phrase(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|sp| sp.runtime_class_name.as_deref())
        .map(|rc| format!(" (runtimeClassName {rc})"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
