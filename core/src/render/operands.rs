//! Pure rendering: a `ClusterPolicy` and the operand namespace in, the objects that should exist
//! out. No I/O here; the reconciler applies what this returns.

use std::collections::BTreeMap;

use gpu_pilot_api::names::{Component, annotation, label};
use gpu_pilot_api::policy::{ContainerRuntime, UpdateStrategy};
use gpu_pilot_api::{ClusterPolicy, ClusterPolicySpec};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use serde_json::{Value, json};

use super::{common_labels, content_hash};

/// Service account of the operands that run the gpu-pilot agent image (they patch their Node).
pub const AGENT_SERVICE_ACCOUNT: &str = "gpu-pilot-agent";
/// Service account of NVIDIA's operands, which need no API access.
pub const OPERAND_SERVICE_ACCOUNT: &str = "gpu-pilot-operand";

/// The `app.kubernetes.io/component` values of the helper objects `render` makes (service
/// accounts, the agent's RBAC, the RuntimeClass), which the cleanup removes.
pub const HELPER_COMPONENTS: [&str; 3] = ["operand", "agent", "runtime-class"];

/// Everything the controller keeps in place for the active policy.
#[derive(Debug, Clone)]
pub struct Desired {
    pub runtime_class: RuntimeClass,
    pub service_accounts: Vec<ServiceAccount>,
    pub agent_role: ClusterRole,
    pub agent_role_binding: ClusterRoleBinding,
    /// One per enabled component.
    pub daemonsets: Vec<(Component, DaemonSet)>,
}

pub fn owner_reference(policy: &ClusterPolicy) -> OwnerReference {
    OwnerReference {
        api_version: ClusterPolicy::api_version(&()).into_owned(),
        kind: ClusterPolicy::kind(&()).into_owned(),
        name: policy.metadata.name.clone().unwrap_or_default(),
        uid: policy.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn with_hash<T: serde::Serialize + Resource>(mut obj: T) -> T {
    let hash = content_hash(&obj);
    obj.meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(annotation::SPEC_HASH.into(), hash);
    obj
}

/// Reads the hash annotation of an object.
pub fn hash_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(annotation::SPEC_HASH)
        .map(String::as_str)
}

/// A policy the controller cannot turn into objects. The schema's bounds keep every admitted
/// policy out of here; this is what a policy written around them (an older CRD, a direct etcd
/// write) gets instead of a panic: the reason, in the policy's status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RenderError {
    #[error(
        "spec.daemonsets.rollingUpdate.maxUnavailable is {0:?}: it must be a number of nodes from 1 to 999999999 or a percentage from 1% to 100%"
    )]
    MaxUnavailable(String),
    #[error(
        "the {what} rendered from the policy is not a valid object ({reason}); fix the policy field it names"
    )]
    Object { what: String, reason: String },
}

fn from<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T, RenderError> {
    serde_json::from_value(v).map_err(|e| RenderError::Object {
        what: what.into(),
        reason: e.to_string(),
    })
}

/// `maxUnavailable` as the DaemonSet's IntOrString: a count from 1 to 999999999 goes out as a
/// number, a percentage from 1% to 100% as a string. Anything else is refused, never wrapped.
pub fn max_unavailable(value: &str) -> Result<Value, RenderError> {
    let bad = || RenderError::MaxUnavailable(value.into());
    if let Some(pct) = value.strip_suffix('%') {
        return match pct.parse::<u8>() {
            Ok(1..=100) if !pct.starts_with(['0', '+']) => Ok(Value::from(value)),
            _ => Err(bad()),
        };
    }
    match value.parse::<i32>() {
        Ok(n @ 1..=999_999_999) if !value.starts_with(['0', '+']) => Ok(Value::from(n)),
        _ => Err(bad()),
    }
}

pub fn render(policy: &ClusterPolicy, namespace: &str) -> Result<Desired, RenderError> {
    let owner = owner_reference(policy);
    let spec = &policy.spec;
    let meta = |name: &str, component: &str, ns: Option<&str>| -> Value {
        // The admin's labels first: gpu-pilot's own (which it selects by) win.
        let mut labels = spec.operator.labels.clone();
        labels.extend(common_labels(component));
        json!({
            "name": name,
            "namespace": ns,
            "labels": labels,
            "annotations": if spec.operator.annotations.is_empty() { None } else { Some(&spec.operator.annotations) },
            "ownerReferences": [owner],
        })
    };

    let runtime_class: RuntimeClass = from(
        "RuntimeClass",
        json!({
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": meta(&spec.operator.runtime_class, "runtime-class", None),
            "handler": spec.operator.runtime_class,
        }),
    )?;
    let service_accounts = [AGENT_SERVICE_ACCOUNT, OPERAND_SERVICE_ACCOUNT]
        .into_iter()
        .map(|name| {
            from(
                "ServiceAccount",
                json!({
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": meta(name, "operand", Some(namespace)),
                    "automountServiceAccountToken": name == AGENT_SERVICE_ACCOUNT,
                }),
            )
            .map(with_hash)
        })
        .collect::<Result<_, _>>()?;
    // The agent reads (GET, no list or watch) and labels its own Node; RBAC cannot narrow that
    // to one node, so the agent itself only ever touches the node it runs on (its NODE_NAME).
    // Kept equal to agent/deploy/rbac.yaml.
    let agent_role: ClusterRole = from(
        "ClusterRole",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": meta("gpu-pilot-agent", "agent", None),
            "rules": [
                { "apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"] },
            ],
        }),
    )?;
    let agent_role_binding: ClusterRoleBinding = from(
        "ClusterRoleBinding",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": meta("gpu-pilot-agent", "agent", None),
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "gpu-pilot-agent" },
            "subjects": [{ "kind": "ServiceAccount", "name": AGENT_SERVICE_ACCOUNT, "namespace": namespace }],
        }),
    )?;
    let mut daemonsets = Vec::new();
    for c in Component::ALL {
        if let Some(ds) = render_daemonset(policy, c, namespace)? {
            daemonsets.push((c, ds));
        }
    }
    Ok(Desired {
        runtime_class: with_hash(runtime_class),
        service_accounts,
        agent_role: with_hash(agent_role),
        agent_role_binding: with_hash(agent_role_binding),
        daemonsets,
    })
}

/// How one operand runs on the host.
struct Shape {
    /// Arguments of the agent image, or `None` for NVIDIA's own images.
    agent_args: Option<&'static [&'static str]>,
    privileged: bool,
    host_pid: bool,
    /// (volume name, host path, mount path, read-only)
    mounts: Vec<(&'static str, String, &'static str, bool)>,
    /// Operands that talk to GPUs run under the NVIDIA runtime class.
    gpu_runtime: bool,
}

fn shape(spec: &ClusterPolicySpec, c: Component) -> Shape {
    let driver_root = if spec.driver.enabled {
        spec.host_paths.driver_install_dir.clone()
    } else {
        spec.host_paths.root_fs.clone()
    };
    match c {
        Component::ContainerToolkit => Shape {
            agent_args: None,
            privileged: true,
            host_pid: false,
            mounts: vec![
                ("run-nvidia", "/run/nvidia".into(), "/run/nvidia", false),
                (
                    "toolkit-install-dir",
                    spec.toolkit.install_dir.clone(),
                    "/usr/local/nvidia",
                    false,
                ),
                (
                    "runtime-config",
                    runtime_config_dir(spec.operator.default_runtime).into(),
                    "/runtime/config-dir",
                    false,
                ),
                (
                    "runtime-socket",
                    runtime_socket_dir(spec.operator.default_runtime).into(),
                    "/runtime/sock-dir",
                    false,
                ),
                ("cdi-root", "/var/run/cdi".into(), "/var/run/cdi", false),
            ],
            gpu_runtime: false,
        },
        Component::Driver => Shape {
            agent_args: None,
            privileged: true,
            host_pid: true,
            mounts: vec![
                ("run-nvidia", "/run/nvidia".into(), "/run/nvidia", false),
                ("host-root", spec.host_paths.root_fs.clone(), "/host", true),
                (
                    "host-os-release",
                    "/etc/os-release".into(),
                    "/host-etc/os-release",
                    true,
                ),
                ("firmware", "/lib/firmware".into(), "/lib/firmware", false),
                ("var-log", "/var/log".into(), "/var/log", false),
            ],
            gpu_runtime: false,
        },
        Component::OperatorValidator => Shape {
            agent_args: Some(&["validate", "--hold", "driver"]),
            privileged: true,
            host_pid: false,
            mounts: vec![
                ("driver-root", driver_root, "/run/nvidia/driver", true),
                ("host-root", spec.host_paths.root_fs.clone(), "/host", true),
                (
                    "validations",
                    "/run/nvidia/validations".into(),
                    "/run/nvidia/validations",
                    false,
                ),
                (
                    "toolkit-install-dir",
                    spec.toolkit.install_dir.clone(),
                    "/usr/local/nvidia",
                    true,
                ),
            ],
            gpu_runtime: true,
        },
        // The device plugin also serves the agent's NVML metrics (dcgm-exporter's names, with
        // pod labels from the kubelet's pod-resources API) on :9401; NVIDIA's dcgm-exporter
        // (the dcgmExporter component, :9400) adds DCGM's profiling metrics where wanted.
        Component::DevicePlugin => Shape {
            agent_args: Some(&[
                "run",
                "--no-labels",
                "--no-mig-manager",
                "--metrics-addr",
                "0.0.0.0:9401",
            ]),
            privileged: true,
            host_pid: false,
            mounts: vec![
                (
                    "device-plugins",
                    "/var/lib/kubelet/device-plugins".into(),
                    "/var/lib/kubelet/device-plugins",
                    false,
                ),
                (
                    "pod-resources",
                    "/var/lib/kubelet/pod-resources".into(),
                    "/var/lib/kubelet/pod-resources",
                    true,
                ),
                ("driver-root", driver_root, "/run/nvidia/driver", true),
                ("cdi-root", "/var/run/cdi".into(), "/var/run/cdi", false),
            ],
            gpu_runtime: true,
        },
        Component::GpuFeatureDiscovery => Shape {
            agent_args: Some(&[
                "run",
                "--no-device-plugin",
                "--no-mig-manager",
                "--metrics-addr",
                "off",
            ]),
            privileged: false,
            host_pid: false,
            mounts: vec![("driver-root", driver_root, "/run/nvidia/driver", true)],
            gpu_runtime: true,
        },
        Component::DcgmExporter => Shape {
            agent_args: None,
            privileged: false,
            host_pid: false,
            mounts: vec![(
                "pod-resources",
                "/var/lib/kubelet/pod-resources".into(),
                "/var/lib/kubelet/pod-resources",
                true,
            )],
            gpu_runtime: true,
        },
        Component::MigManager => Shape {
            agent_args: Some(&[
                "run",
                "--no-device-plugin",
                "--no-labels",
                "--metrics-addr",
                "off",
            ]),
            privileged: true,
            host_pid: true,
            mounts: vec![
                ("host-sys", "/sys".into(), "/sys", false),
                ("run-nvidia", "/run/nvidia".into(), "/run/nvidia", false),
                ("driver-root", driver_root, "/run/nvidia/driver", true),
            ],
            gpu_runtime: true,
        },
    }
}

fn runtime_config_dir(rt: ContainerRuntime) -> &'static str {
    match rt {
        ContainerRuntime::Containerd => "/etc/containerd",
        ContainerRuntime::Crio => "/etc/crio",
        ContainerRuntime::Docker => "/etc/docker",
    }
}

fn runtime_socket_dir(rt: ContainerRuntime) -> &'static str {
    match rt {
        ContainerRuntime::Containerd => "/run/containerd",
        ContainerRuntime::Crio => "/var/run/crio",
        ContainerRuntime::Docker => "/var/run",
    }
}

/// The DaemonSet of one component, or `None` when the policy disables it (or gives it no image,
/// which the schema refuses for an enabled component).
pub fn render_daemonset(
    policy: &ClusterPolicy,
    c: Component,
    namespace: &str,
) -> Result<Option<DaemonSet>, RenderError> {
    let spec = &policy.spec;
    let operand = spec.operand(c);
    if !operand.enabled() {
        return Ok(None);
    }
    let Some(image) = operand.image_reference() else {
        return Ok(None);
    };
    let shape = shape(spec, c);
    let name = c.daemonset_name();

    // The admin's labels first: gpu-pilot's own win (a policy from NVIDIA's chart labels its
    // operands managed-by gpu-operator).
    let mut pod_labels = spec.daemonsets.labels.clone();
    pod_labels.extend(common_labels(c.gate_name()));
    pod_labels.insert(label::NAME.into(), name.clone());
    let selector = BTreeMap::from([
        (label::NAME.to_string(), name.clone()),
        (label::COMPONENT.to_string(), c.gate_name().to_string()),
    ]);

    let mut env: Vec<Value> = vec![json!({
        "name": "NODE_NAME",
        "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } }
    })];
    match c {
        Component::ContainerToolkit => {
            env.push(json!({"name": "RUNTIME", "value": spec.operator.default_runtime.as_str()}));
            env.push(
                json!({"name": "CONTAINERD_RUNTIME_CLASS", "value": spec.operator.runtime_class}),
            );
            env.push(json!({"name": "CDI_ENABLED", "value": spec.cdi.enabled.to_string()}));
        }
        Component::Driver => {
            env.push(
                json!({"name": "KERNEL_MODULE_TYPE", "value": spec.driver.kernel_module_type}),
            );
        }
        Component::DevicePlugin | Component::GpuFeatureDiscovery => {
            env.push(json!({"name": "MIG_STRATEGY", "value": spec.mig.strategy.as_str()}));
            env.push(json!({"name": "CDI_ENABLED", "value": spec.cdi.enabled.to_string()}));
        }
        Component::DcgmExporter => {
            env.push(json!({"name": "DCGM_EXPORTER_LISTEN", "value": ":9400"}));
            env.push(json!({"name": "DCGM_EXPORTER_KUBERNETES", "value": "true"}));
        }
        Component::MigManager => {
            env.push(
                json!({"name": "DEFAULT_MIG_CONFIG", "value": spec.mig_manager.config.default}),
            );
            env.push(json!({"name": "MIG_CONFIG_FILE", "value": "/mig-parted-config/config.yaml"}));
        }
        Component::OperatorValidator => {
            env.push(json!({"name": "DRIVER_ENABLED", "value": spec.driver.enabled.to_string()}));
            env.push(json!({"name": "TOOLKIT_ENABLED", "value": spec.toolkit.enabled.to_string()}));
        }
    }
    env.extend(operand.env().iter().map(|e| json!(e)));

    let mut args: Vec<String> = shape
        .agent_args
        .map(|a| a.iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    // The agent's flags that follow the policy.
    let strategy = [
        "--mig-strategy".to_string(),
        spec.mig.strategy.as_str().to_string(),
    ];
    match c {
        Component::DevicePlugin => {
            args.extend(strategy);
            if !spec.device_plugin.config.name.is_empty() {
                args.extend(["--config".into(), "/config".into()]);
                if !spec.device_plugin.config.default.is_empty() {
                    args.extend([
                        "--config-default".into(),
                        spec.device_plugin.config.default.clone(),
                    ]);
                }
            }
            if spec.cdi.enabled {
                args.push("--cdi".into());
            }
        }
        Component::GpuFeatureDiscovery => args.extend(strategy),
        Component::MigManager if !spec.mig_manager.config.name.is_empty() => {
            args.extend([
                "--mig-config".into(),
                "/mig-parted-config/config.yaml".into(),
            ]);
        }
        _ => {}
    }
    args.extend(operand.args().iter().cloned());

    let mut volumes: Vec<Value> = shape
        .mounts
        .iter()
        .map(|(vname, host, _, _)| json!({"name": vname, "hostPath": {"path": host}}))
        .collect();
    let mut mounts: Vec<Value> = shape
        .mounts
        .iter()
        .map(|(vname, _, path, ro)| json!({"name": vname, "mountPath": path, "readOnly": ro}))
        .collect();
    let config = match c {
        Component::DevicePlugin => Some((&spec.device_plugin.config, "/config")),
        Component::DcgmExporter => Some((&spec.dcgm_exporter.config, "/etc/dcgm-exporter/custom")),
        Component::MigManager => Some((&spec.mig_manager.config, "/mig-parted-config")),
        _ => None,
    };
    if let Some((cfg, path)) = config
        && !cfg.name.is_empty()
    {
        // Optional: a missing ConfigMap is reported by the operand (and the webhook), not by a
        // pod stuck in ContainerCreating with no explanation.
        volumes.push(json!({"name": "config", "configMap": {"name": cfg.name, "optional": true}}));
        mounts.push(json!({"name": "config", "mountPath": path, "readOnly": true}));
    }

    let security_context = if shape.privileged {
        json!({"privileged": true})
    } else if c == Component::DcgmExporter {
        json!({"capabilities": {"add": ["SYS_ADMIN"]}, "runAsNonRoot": false})
    } else {
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true})
    };
    let container = json!({
        "name": c.gate_name(),
        "image": image,
        "imagePullPolicy": operand.image_pull_policy().as_str(),
        "args": args,
        "env": env,
        "resources": operand.resources(),
        "securityContext": security_context,
        "volumeMounts": mounts,
    });

    // The validator checks the toolkit in an init container; its main container validates the
    // driver and then holds, so its readiness is the driver-validation stage's signal.
    let init_containers: Vec<Value> = if c == Component::OperatorValidator && spec.toolkit.enabled {
        vec![json!({
            "name": "toolkit-validation",
            "image": container["image"],
            "imagePullPolicy": container["imagePullPolicy"],
            "args": ["validate", "toolkit", "--host-root", "/host"],
            "securityContext": container["securityContext"],
            "volumeMounts": container["volumeMounts"],
        })]
    } else {
        vec![]
    };
    let update_strategy =
        if c == Component::Driver || spec.daemonsets.update_strategy == UpdateStrategy::OnDelete {
            // The driver is replaced only when an admin (or the upgrade flow) deletes its pod:
            // restarting it under running GPU workloads would kill them.
            json!({"type": "OnDelete"})
        } else {
            // IntOrString: "1" must go out as the number 1; only "10%" stays a string.
            let max = max_unavailable(&spec.daemonsets.rolling_update.max_unavailable)?;
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": max}})
        };
    let service_account = if shape.agent_args.is_some() {
        AGENT_SERVICE_ACCOUNT
    } else {
        OPERAND_SERVICE_ACCOUNT
    };
    let mut ds_labels = spec.operator.labels.clone();
    ds_labels.extend(common_labels(c.gate_name()));
    let ds = json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": ds_labels,
            "annotations": if spec.operator.annotations.is_empty() { None } else { Some(&spec.operator.annotations) },
            "ownerReferences": [owner_reference(policy)],
        },
        "spec": {
            "selector": { "matchLabels": selector },
            "updateStrategy": update_strategy,
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": if spec.daemonsets.annotations.is_empty() { None } else { Some(&spec.daemonsets.annotations) },
                },
                "spec": {
                    "nodeSelector": { label::deploy_gate(c): "true" },
                    "tolerations": spec.daemonsets.tolerations,
                    "priorityClassName": if spec.daemonsets.priority_class_name.is_empty() { None } else { Some(&spec.daemonsets.priority_class_name) },
                    "serviceAccountName": service_account,
                    "automountServiceAccountToken": shape.agent_args.is_some(),
                    "hostPID": shape.host_pid,
                    "runtimeClassName": if shape.gpu_runtime { Some(&spec.operator.runtime_class) } else { None },
                    "imagePullSecrets": operand.image_pull_secrets().iter().map(|s| json!({"name": s})).collect::<Vec<_>>(),
                    "initContainers": init_containers,
                    "containers": [container],
                    "volumes": volumes,
                }
            }
        }
    });
    Ok(Some(with_hash(from(&format!("DaemonSet {name}"), ds)?)))
}

#[cfg(test)]
mod tests;
