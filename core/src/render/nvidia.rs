//! The parts of the operands that come from NVIDIA's ClusterPolicy fields beyond the basics: the
//! driver pod's driver manager, probes, side containers (GPUDirect RDMA, GDS, GDRCopy) and
//! ConfigMap files, dcgm-exporter's Service and ServiceMonitor, and the Pod Security labels of the
//! namespace. Pure: the policy (and what the cluster says about the nodes and ConfigMaps) in,
//! JSON out; shaped as NVIDIA's operator renders them (its `assets/state-driver` and
//! `state-dcgm-exporter`).
//!
//! Not wired in yet: nothing in the operands' render, the controller or install calls these
//! builders, so the fields they read are accepted and kept in the policy but change no object
//! (docs/nvidia-values.md says "accepted, kept, not rendered yet" for each).

use std::collections::BTreeMap;

use gpu_pilot_api::ClusterPolicySpec;
use gpu_pilot_api::policy::{ConfigMount, ContainerProbeSpec, DriverTarget, driver_image};
use serde_json::{Value, json};

/// dcgm-exporter's port and its name in NVIDIA's Service (ServiceMonitors select it by name).
pub const DCGM_EXPORTER_PORT: (&str, u16) = ("gpu-metrics", 9400);

/// What the driver DaemonSet's pod gets beyond its main container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriverPodParts {
    pub init_containers: Vec<Value>,
    /// Side containers after the driver container.
    pub containers: Vec<Value>,
    pub volumes: Vec<Value>,
    /// Mounts and settings the driver container itself gets.
    pub driver_mounts: Vec<Value>,
    pub driver_env: Vec<Value>,
    pub driver_probes: BTreeMap<&'static str, Value>,
}

fn probe(command: &str, p: &ContainerProbeSpec) -> Value {
    json!({
        "exec": { "command": ["sh", "-c", command] },
        "initialDelaySeconds": p.initial_delay_seconds,
        "timeoutSeconds": p.timeout_seconds,
        "periodSeconds": p.period_seconds,
        "successThreshold": p.success_threshold,
        "failureThreshold": p.failure_threshold,
    })
}

fn host_path(name: &str, path: &str, kind: Option<&str>) -> Value {
    let mut hp = json!({ "path": path });
    if let Some(k) = kind {
        hp["type"] = json!(k);
    }
    json!({ "name": name, "hostPath": hp })
}

/// The driver pod's extra parts for the nodes of `target`. `namespace` is the operator's.
pub fn driver_pod_parts(
    spec: &ClusterPolicySpec,
    target: &DriverTarget,
    config: &[ConfigMount],
) -> DriverPodParts {
    let d = &spec.driver;
    let mut parts = DriverPodParts::default();
    let mellanox = json!({
        "name": "run-mellanox-drivers",
        "mountPath": "/run/mellanox/drivers",
        "mountPropagation": "HostToContainer",
    });
    parts.volumes.extend([
        host_path("host-sys", "/sys", Some("Directory")),
        host_path("dev-log", "/dev/log", None),
        host_path(
            "run-mellanox-drivers",
            "/run/mellanox/drivers",
            Some("DirectoryOrCreate"),
        ),
        host_path(
            "mlnx-ofed-usr-src",
            "/run/mellanox/drivers/usr/src",
            Some("DirectoryOrCreate"),
        ),
    ]);

    // NVIDIA's driver manager: before a driver (re)installs, GPU pods leave the node and the old
    // driver is unloaded.
    if let Some(image) = d.manager.image_reference() {
        let mut env = vec![json!({
            "name": "NODE_NAME",
            "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } },
        })];
        env.extend(
            gpu_pilot_api::policy::driver_manager_env(d)
                .into_iter()
                .map(|(name, value)| json!({ "name": name, "value": value })),
        );
        env.push(json!({
            "name": "OPERATOR_NAMESPACE",
            "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } },
        }));
        parts.init_containers.push(json!({
            "name": "k8s-driver-manager",
            "image": image,
            "imagePullPolicy": d.manager.image_pull_policy.as_str(),
            "command": ["driver-manager"],
            "args": ["uninstall_driver"],
            "env": env,
            "securityContext": { "privileged": true },
            "volumeMounts": [
                { "name": "run-nvidia", "mountPath": "/run/nvidia", "mountPropagation": "Bidirectional" },
                { "name": "host-root", "mountPath": "/host", "readOnly": true, "mountPropagation": "HostToContainer" },
                { "name": "host-sys", "mountPath": "/sys" },
                mellanox,
            ],
        }));
    }

    // The driver container: nvidia-smi probes, RDMA settings, ConfigMap files.
    parts.driver_probes.insert(
        "startupProbe",
        probe(
            "nvidia-smi && touch /run/nvidia/validations/.driver-ctr-ready",
            &d.startup_probe,
        ),
    );
    if let Some(p) = &d.liveness_probe {
        parts
            .driver_probes
            .insert("livenessProbe", probe("nvidia-smi", p));
    }
    if let Some(p) = &d.readiness_probe {
        parts
            .driver_probes
            .insert("readinessProbe", probe("nvidia-smi", p));
    }
    if d.rdma.enabled {
        parts
            .driver_env
            .push(json!({ "name": "GPU_DIRECT_RDMA_ENABLED", "value": "true" }));
        if d.rdma.use_host_mofed {
            parts
                .driver_env
                .push(json!({ "name": "USE_HOST_MOFED", "value": "true" }));
        }
        parts.driver_mounts.push(json!({
            "name": "mlnx-ofed-usr-src",
            "mountPath": "/run/mellanox/drivers/usr/src",
            "mountPropagation": "HostToContainer",
        }));
        parts.driver_mounts.push(mellanox.clone());
    }
    let mut kernel_module_mounts = Vec::new();
    for m in config {
        parts.volumes.push(json!({
            "name": m.volume,
            "configMap": {
                "name": m.config_map,
                "items": m.files.iter().map(|(k, _)| json!({ "key": k, "path": k })).collect::<Vec<_>>(),
            },
        }));
        for (key, path) in &m.files {
            let mount =
                json!({ "name": m.volume, "mountPath": path, "subPath": key, "readOnly": true });
            if m.volume == "kernel-module-config" {
                kernel_module_mounts.push(mount.clone());
            }
            parts.driver_mounts.push(mount);
        }
    }

    // Side containers, as in NVIDIA's driver pod.
    let logs = [
        json!({ "name": "var-log", "mountPath": "/var/log" }),
        json!({ "name": "dev-log", "mountPath": "/dev/log", "readOnly": true }),
    ];
    let side_probe = |cmd: &str| {
        probe(
            cmd,
            &ContainerProbeSpec {
                initial_delay_seconds: 10,
                timeout_seconds: 10,
                period_seconds: 10,
                success_threshold: 1,
                failure_threshold: 120,
            },
        )
    };
    if d.rdma.enabled
        && let Some(image) = driver_image(
            &d.repository,
            &d.image,
            &d.version,
            d.use_precompiled,
            target,
        )
    {
        let mut mounts = vec![
            json!({ "name": "run-nvidia", "mountPath": "/run/nvidia", "mountPropagation": "Bidirectional" }),
        ];
        mounts.extend(logs.iter().cloned());
        mounts.push(mellanox.clone());
        mounts.extend(kernel_module_mounts.iter().cloned());
        let mut env = Vec::new();
        if d.rdma.use_host_mofed {
            env.push(json!({ "name": "USE_HOST_MOFED", "value": "true" }));
        }
        let mut liveness = side_probe("nvidia-driver probe_nvidia_peermem");
        liveness["initialDelaySeconds"] = json!(30);
        liveness["periodSeconds"] = json!(30);
        liveness["failureThreshold"] = json!(1);
        parts.containers.push(json!({
            "name": "nvidia-peermem-ctr",
            "image": image,
            "imagePullPolicy": d.image_pull_policy.as_str(),
            "command": ["nvidia-driver"],
            // Loads nvidia_peermem again whenever a MOFED driver reinstall unloads it.
            "args": ["reload_nvidia_peermem"],
            "env": env,
            "securityContext": { "privileged": true, "seLinuxOptions": { "level": "s0" } },
            "volumeMounts": mounts,
            "startupProbe": side_probe("nvidia-driver probe_nvidia_peermem"),
            "livenessProbe": liveness,
        }));
    }
    for (enabled, name, component, install, module) in [
        (
            spec.gds.enabled,
            "nvidia-fs-ctr",
            &spec.gds as &dyn gpu_pilot_api::OperandSpec,
            "nvidia-gds-driver install",
            "nvidia_fs",
        ),
        (
            spec.gdrcopy.enabled,
            "nvidia-gdrcopy-ctr",
            &spec.gdrcopy,
            "nvidia-gdrcopy-driver install",
            "gdrdrv",
        ),
    ] {
        if !enabled {
            continue;
        }
        let Some(image) = driver_image(
            component.repository(),
            component.image(),
            component.version(),
            false,
            target,
        ) else {
            continue;
        };
        let mut mounts = vec![
            json!({ "name": "run-nvidia", "mountPath": "/run/nvidia", "mountPropagation": "HostToContainer" }),
        ];
        mounts.extend(logs.iter().cloned());
        let env: Vec<Value> = component
            .env()
            .iter()
            .map(|e| serde_json::to_value(e).expect("env serializes"))
            .collect();
        parts.containers.push(json!({
            "name": name,
            "image": image,
            "imagePullPolicy": component.image_pull_policy().as_str(),
            "command": ["bash", "-xc"],
            "args": [format!(
                "until [ -d /run/nvidia/driver/usr/src ] && lsmod | grep nvidia; do echo Waiting for nvidia-driver to be installed...; sleep 10; done; exec {install}"
            )],
            "env": env,
            "securityContext": { "privileged": true, "seLinuxOptions": { "level": "s0" } },
            "volumeMounts": mounts,
            "startupProbe": side_probe(&format!("lsmod | grep {module}")),
        }));
    }
    parts
}

/// The Service in front of the dcgm-exporters (NVIDIA's `nvidia-dcgm-exporter` Service, under
/// gpu-pilot's name and labels).
pub fn dcgm_exporter_service(
    spec: &ClusterPolicySpec,
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    selector: &BTreeMap<String, String>,
) -> Value {
    let s = &spec.dcgm_exporter.service;
    let (port_name, port) = DCGM_EXPORTER_PORT;
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": namespace, "labels": labels,
            "annotations": { "prometheus.io/scrape": "true" },
        },
        "spec": {
            "type": s.type_,
            "internalTrafficPolicy": s.internal_traffic_policy,
            "selector": selector,
            "ports": [{ "name": port_name, "port": port, "targetPort": port, "protocol": "TCP" }],
        },
    })
}

/// The Prometheus operator ServiceMonitor for that Service, when enabled.
pub fn dcgm_exporter_service_monitor(
    spec: &ClusterPolicySpec,
    name: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    service_labels: &BTreeMap<String, String>,
) -> Option<Value> {
    let m = &spec.dcgm_exporter.service_monitor;
    if !m.enabled {
        return None;
    }
    let mut all = m.additional_labels.clone();
    all.extend(labels.clone());
    let mut endpoint = json!({
        "port": DCGM_EXPORTER_PORT.0,
        "path": "/metrics",
        "interval": m.interval,
        "honorLabels": m.honor_labels,
    });
    if !m.relabelings.is_empty() {
        endpoint["relabelings"] = serde_json::to_value(&m.relabelings).expect("serializes");
    }
    Some(json!({
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": { "name": name, "namespace": namespace, "labels": all },
        "spec": {
            "endpoints": [endpoint],
            "jobLabel": "app.kubernetes.io/name",
            "namespaceSelector": { "matchNames": [namespace] },
            "selector": { "matchLabels": service_labels },
        },
    }))
}

/// The Pod Security labels of the operator's namespace when `psa.enabled` (NVIDIA's: its
/// operands are privileged).
pub fn psa_labels(spec: &ClusterPolicySpec) -> BTreeMap<String, String> {
    if !spec.psa.enabled {
        return BTreeMap::new();
    }
    ["enforce", "audit", "warn"]
        .into_iter()
        .map(|mode| {
            (
                format!("pod-security.kubernetes.io/{mode}"),
                "privileged".to_string(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: Value) -> ClusterPolicySpec {
        serde_json::from_value(json).unwrap()
    }

    fn target() -> DriverTarget {
        DriverTarget {
            os: "ubuntu22.04".into(),
            kernel: None,
        }
    }

    fn names(v: &[Value]) -> Vec<&str> {
        v.iter().filter_map(|c| c["name"].as_str()).collect()
    }

    #[test]
    fn the_driver_pod_has_nvidias_manager_and_probe_and_no_side_containers_by_default() {
        let p = driver_pod_parts(&spec(json!({})), &target(), &[]);
        assert_eq!(names(&p.init_containers), ["k8s-driver-manager"]);
        let manager = &p.init_containers[0];
        assert_eq!(
            manager["image"],
            json!("nvcr.io/nvidia/cloud-native/k8s-driver-manager:v0.8.1")
        );
        let env = names(manager["env"].as_array().unwrap());
        assert!(env.contains(&"ENABLE_GPU_POD_EVICTION") && env.contains(&"OPERATOR_NAMESPACE"));
        assert!(p.containers.is_empty());
        assert_eq!(
            p.driver_probes["startupProbe"]["failureThreshold"],
            json!(120)
        );
        assert!(!p.driver_probes.contains_key("livenessProbe"));
    }

    #[test]
    fn rdma_gds_and_gdrcopy_add_nvidias_side_containers() {
        let s = spec(json!({
            "driver": {"rdma": {"enabled": true, "useHostMofed": true}, "version": "580.82.07",
                       "kernelModuleConfig": {"name": "kmod"},
                       "livenessProbe": {"initialDelaySeconds": 60, "periodSeconds": 10}},
            "gds": {"enabled": true},
            "gdrcopy": {"enabled": true},
        }));
        let config = vec![ConfigMount {
            volume: "kernel-module-config".into(),
            config_map: "kmod".into(),
            files: vec![("nvidia.conf".into(), "/drivers/nvidia.conf".into())],
        }];
        let p = driver_pod_parts(&s, &target(), &config);
        assert_eq!(
            names(&p.containers),
            ["nvidia-peermem-ctr", "nvidia-fs-ctr", "nvidia-gdrcopy-ctr"]
        );
        assert_eq!(
            p.containers[0]["image"],
            json!("nvcr.io/nvidia/driver:580.82.07-ubuntu22.04")
        );
        assert_eq!(
            p.containers[1]["image"],
            json!("nvcr.io/nvidia/cloud-native/nvidia-fs:2.20.5-ubuntu22.04")
        );
        // peermem sees the kernel module parameters too, as in NVIDIA's pod.
        assert!(
            p.containers[0]["volumeMounts"]
                .to_string()
                .contains("/drivers/nvidia.conf")
        );
        assert!(p.driver_env.iter().any(|e| e["name"] == "USE_HOST_MOFED"));
        assert!(p.driver_probes.contains_key("livenessProbe"));
        let cm = p
            .volumes
            .iter()
            .find(|v| v["name"] == "kernel-module-config")
            .unwrap();
        assert_eq!(cm["configMap"]["items"][0]["key"], json!("nvidia.conf"));
        let mount = p
            .driver_mounts
            .iter()
            .find(|m| m["name"] == "kernel-module-config")
            .unwrap();
        assert_eq!(mount["subPath"], json!("nvidia.conf"));
    }

    #[test]
    fn the_exporter_service_and_monitor_follow_the_policy() {
        let s = spec(json!({"dcgmExporter": {
            "service": {"type": "NodePort", "internalTrafficPolicy": "Local"},
            "serviceMonitor": {"enabled": true, "interval": "30s", "honorLabels": true,
                               "additionalLabels": {"release": "prom"},
                               "relabelings": [{"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "instance"}]},
        }}));
        let labels = BTreeMap::from([("a".to_string(), "b".to_string())]);
        let svc = dcgm_exporter_service(&s, "x", "ns", &labels, &labels);
        assert_eq!(svc["spec"]["type"], json!("NodePort"));
        assert_eq!(svc["spec"]["ports"][0]["name"], json!("gpu-metrics"));
        let sm = dcgm_exporter_service_monitor(&s, "x", "ns", &labels, &labels).unwrap();
        assert_eq!(sm["metadata"]["labels"]["release"], json!("prom"));
        assert_eq!(sm["spec"]["endpoints"][0]["interval"], json!("30s"));
        assert_eq!(
            sm["spec"]["endpoints"][0]["relabelings"][0]["targetLabel"],
            json!("instance")
        );
        assert!(
            dcgm_exporter_service_monitor(&spec(json!({})), "x", "ns", &labels, &labels).is_none()
        );
    }

    #[test]
    fn pod_security_labels_only_when_asked() {
        assert!(psa_labels(&spec(json!({}))).is_empty());
        let l = psa_labels(&spec(json!({"psa": {"enabled": true}})));
        assert_eq!(l["pod-security.kubernetes.io/enforce"], "privileged");
        assert_eq!(l.len(), 3);
    }
}
