//! The node detector: the part of Node Feature Discovery gpu-pilot needs, on every node. It scans
//! the node's PCI devices in sysfs for NVIDIA's (vendor `10de`) of the classes NFD's default
//! configuration in NVIDIA's chart counts (display `0300`, 3D controller `0302`) and labels the
//! node `nvidia.com/gpu.present=true`, which makes it a GPU node for the controller. It records
//! the label in `gpupilot.io/agent-labels`, as the agent's feature labels are recorded, so it
//! takes back only a label it wrote (when the GPUs are gone) and uninstall removes it.
//!
//! NVIDIA's operator reads three things from NFD: the PCI vendor (which nodes have GPUs), the OS
//! release and the kernel (which driver image). The kubelet reports the last two in
//! `status.nodeInfo` (`osImage`, `kernelVersion`), which the controller reads when NFD's labels
//! are absent; this detector supplies the first. It needs no master, no CRDs and no garbage
//! collector.

use std::path::Path;

use gpu_pilot_api::names::{annotation, label};
use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};

/// NVIDIA's PCI vendor ID.
pub const NVIDIA_VENDOR: &str = "10de";
/// The PCI classes counted as GPUs (class and subclass, as NFD's `deviceClassWhitelist` spells
/// them; a shorter entry such as `03` is a prefix).
pub const DEFAULT_CLASSES: [&str; 2] = ["0300", "0302"];

/// One NVIDIA PCI device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// The bus address, e.g. `0000:17:00.0`.
    pub address: String,
    /// The class code as six hex digits, e.g. `030200`.
    pub class: String,
    /// The device ID, e.g. `2330`.
    pub device: String,
}

fn hex_file(dir: &Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    Some(text.trim().trim_start_matches("0x").to_ascii_lowercase())
}

/// NVIDIA's devices under `<sysfs>/bus/pci/devices` whose class starts with one of `classes`.
pub fn scan(sysfs: &Path, classes: &[String]) -> std::io::Result<Vec<PciDevice>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(sysfs.join("bus/pci/devices"))? {
        let dir = entry?.path();
        if hex_file(&dir, "vendor").as_deref() != Some(NVIDIA_VENDOR) {
            continue;
        }
        let Some(class) = hex_file(&dir, "class") else {
            continue;
        };
        if classes
            .iter()
            .any(|c| class.starts_with(&c.to_ascii_lowercase()))
        {
            out.push(PciDevice {
                address: dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                class,
                device: hex_file(&dir, "device").unwrap_or_default(),
            });
        }
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    Ok(out)
}

/// The merge patch that makes the node's `nvidia.com/gpu.present` say what the scan found, or
/// `None` when nothing needs to change. A label someone else set is left alone either way.
pub fn presence_patch(node: &Node, gpus_found: bool) -> Option<Value> {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let annotations = node.metadata.annotations.clone().unwrap_or_default();
    let recorded: Vec<&str> = annotations
        .get(annotation::AGENT_LABELS)
        .map(|s| s.split(',').filter(|k| !k.is_empty()).collect())
        .unwrap_or_default();
    let ours = recorded.contains(&label::GPU_PRESENT);
    let present = labels.get(label::GPU_PRESENT).map(String::as_str) == Some("true");
    match (gpus_found, present, ours) {
        (true, false, _) if !labels.contains_key(label::GPU_PRESENT) || ours => {
            let mut keys: Vec<&str> = recorded.clone();
            if !ours {
                keys.push(label::GPU_PRESENT);
            }
            Some(json!({"metadata": {
                "labels": { (label::GPU_PRESENT): "true" },
                "annotations": { (annotation::AGENT_LABELS): keys.join(",") },
            }}))
        }
        (false, _, true) => {
            let keys: Vec<&str> = recorded
                .into_iter()
                .filter(|k| *k != label::GPU_PRESENT)
                .collect();
            Some(json!({"metadata": {
                "labels": { (label::GPU_PRESENT): null },
                "annotations": { (annotation::AGENT_LABELS): keys.join(",") },
            }}))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;

    use super::*;

    fn device(root: &Path, address: &str, vendor: &str, class: &str) {
        let dir = root.join("bus/pci/devices").join(address);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vendor"), format!("0x{vendor}\n")).unwrap();
        std::fs::write(dir.join("class"), format!("0x{class}\n")).unwrap();
        std::fs::write(dir.join("device"), "0x2330\n").unwrap();
    }

    fn classes() -> Vec<String> {
        DEFAULT_CLASSES.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn nvidia_display_and_3d_controllers_count_others_do_not() {
        let sys = tempfile::tempdir().unwrap();
        device(sys.path(), "0000:17:00.0", "10de", "030200");
        device(sys.path(), "0000:18:00.0", "10de", "068000"); // NVSwitch bridge
        device(sys.path(), "0000:19:00.0", "15b3", "020000"); // a Mellanox NIC
        device(sys.path(), "0000:1a:00.0", "10DE", "030000");
        let found = scan(sys.path(), &classes()).unwrap();
        assert_eq!(
            found.iter().map(|d| d.address.as_str()).collect::<Vec<_>>(),
            ["0000:17:00.0", "0000:1a:00.0"]
        );
        assert_eq!(found[0].device, "2330");
        // NFD's whitelist spelling: a class prefix.
        assert_eq!(scan(sys.path(), &["03".into()]).unwrap().len(), 2);
        assert!(scan(sys.path(), &["0200".into()]).unwrap().is_empty());
        assert!(scan(&sys.path().join("missing"), &classes()).is_err());
    }

    fn node(labels: &[(&str, &str)], recorded: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                annotations: recorded
                    .map(|r| [(annotation::AGENT_LABELS.to_string(), r.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_label_is_set_recorded_and_taken_back_only_when_it_is_ours() {
        let p = presence_patch(&node(&[], Some("nvidia.com/gpu.count")), true).unwrap();
        assert_eq!(p["metadata"]["labels"][label::GPU_PRESENT], "true");
        assert_eq!(
            p["metadata"]["annotations"][annotation::AGENT_LABELS],
            "nvidia.com/gpu.count,nvidia.com/gpu.present"
        );
        // Already there: nothing to do, whoever set it.
        assert_eq!(
            presence_patch(&node(&[(label::GPU_PRESENT, "true")], None), true),
            None
        );
        // An admin's `false` stays.
        assert_eq!(
            presence_patch(&node(&[(label::GPU_PRESENT, "false")], None), true),
            None
        );
        // GPUs gone: ours is taken back, someone else's is not.
        let ours = node(
            &[(label::GPU_PRESENT, "true")],
            Some("nvidia.com/gpu.present,nvidia.com/gpu.count"),
        );
        let p = presence_patch(&ours, false).unwrap();
        assert!(p["metadata"]["labels"][label::GPU_PRESENT].is_null());
        assert_eq!(
            p["metadata"]["annotations"][annotation::AGENT_LABELS],
            "nvidia.com/gpu.count"
        );
        assert_eq!(
            presence_patch(&node(&[(label::GPU_PRESENT, "true")], None), false),
            None
        );
    }
}
