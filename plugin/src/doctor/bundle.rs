//! The support bundle `kubectl gpu doctor --bundle FILE.tar.gz` writes: what a maintainer needs to
//! see what the doctor saw, in one file to attach to a bug report.
//!
//! It holds the doctor's snapshot (policies, nodes, operand pods, DaemonSets, Deployments, events,
//! webhook configurations), the findings as JSON, version information, and the logs of a bounded
//! number of pods (failing operand pods first, then the controller and webhook, then one pod per
//! component), each capped in size. It never holds Secret data: Secrets are never read (only the
//! webhook Secret's metadata), ConfigMap contents are left out (only their names and keys), every
//! object passes through [`sanitize`] (env and annotation values hidden, names and keys kept) and
//! every log line and finding through [`redact`]. A `README.txt` inside lists every file.
//!
//! The file is written only by its owner (0600), through a temporary file of a random name made
//! with `O_EXCL` in the target's folder and renamed over the target, so a symbolic link planted
//! at the target or at a guessed temporary path is never followed.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;
use kube::{Api, ResourceExt};
use serde::Serialize;
use serde_json::Value;

use crate::cluster::Kube;
use crate::doctor::Report;
use crate::doctor::redact::{redact, sanitize};
use crate::doctor::snapshot::{Snapshot, is_operand};

/// Pods whose logs go into the bundle.
pub const MAX_LOG_PODS: usize = 40;
/// Bytes of log kept per container (the end of it).
pub const MAX_LOG_BYTES: i64 = 256 * 1024;
/// Lines of log asked for per container.
pub const LOG_TAIL_LINES: i64 = 2000;

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub path: PathBuf,
    pub files: usize,
    pub bytes: u64,
}

/// One file of the bundle.
struct Entry {
    name: String,
    about: String,
    data: Vec<u8>,
}

/// Writes the bundle for a snapshot and its report; reads only the pods' logs.
pub async fn write(
    kube: &Kube,
    snap: &Snapshot,
    report: &Report,
    path: &Path,
) -> anyhow::Result<Written> {
    let mut entries = objects(snap, report)?;
    entries.extend(logs(kube, snap).await);
    write_tar(path, entries)
}

fn yaml_list<T: Serialize>(items: &[T]) -> anyhow::Result<Vec<u8>> {
    let mut values: Vec<Value> = items
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    values.iter_mut().for_each(sanitize);
    Ok(serde_yaml::to_string(&serde_json::json!({
        "apiVersion": "v1", "kind": "List", "items": values,
    }))?
    .into_bytes())
}

/// A value as pretty JSON, sanitized like every object.
fn sanitized_json<T: Serialize>(v: &T) -> anyhow::Result<Vec<u8>> {
    let mut v = serde_json::to_value(v)?;
    sanitize(&mut v);
    Ok(serde_json::to_vec_pretty(&v)?)
}

/// The snapshot's objects, the findings and the version, as bundle entries (no requests).
fn objects(snap: &Snapshot, report: &Report) -> anyhow::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut add = |name: &str, about: String, data: Vec<u8>| {
        out.push(Entry {
            name: name.to_string(),
            about,
            data,
        })
    };
    add(
        "findings.json",
        format!(
            "the doctor's report (schema {}): {} errors, {} warnings, {} info",
            report.api_version, report.summary.errors, report.summary.warnings, report.summary.info
        ),
        sanitized_json(report)?,
    );
    add(
        "findings.txt",
        "the same report as the doctor's table output".into(),
        redact(&crate::doctor::table(report, false)).into_bytes(),
    );
    let version = serde_json::json!({
        "plugin": env!("CARGO_PKG_VERSION"),
        "kubernetes": snap.version.as_ref().map(|v| v.2.clone()),
        "cluster": snap.server,
        "namespace": snap.namespace,
        "takenAt": snap.now.map(|t| t.to_string()),
        "crds": snap.crds.iter().filter(|c| c.contains("gpupilot.io") || c.contains("nvidia.com")).collect::<Vec<_>>(),
        "runtimeClasses": snap.runtime_classes,
        "gpuOperatorSigns": snap.gpu_operator_signs,
        "unreadable": snap.unreadable,
    });
    add(
        "version.json",
        "plugin and Kubernetes versions, cluster URL, gpu-pilot's CRDs, RuntimeClasses".into(),
        sanitized_json(&version)?,
    );
    add(
        "clusterpolicies.yaml",
        format!("{} ClusterPolicies with status", snap.policies.len()),
        yaml_list(&snap.policies)?,
    );
    add(
        "nodes.yaml",
        format!(
            "{} nodes (labels, taints, capacity, conditions)",
            snap.nodes.len()
        ),
        yaml_list(&snap.nodes)?,
    );
    add(
        "pods.yaml",
        format!("{} pods in {}", snap.pods.len(), snap.namespace),
        yaml_list(&snap.pods)?,
    );
    let gpu_pending: Vec<&Pod> = snap
        .pending_pods
        .iter()
        .filter(|p| {
            p.spec.iter().flat_map(|s| s.containers.iter()).any(|c| {
                c.resources.iter().any(|r| {
                    r.limits
                        .iter()
                        .chain(r.requests.iter())
                        .flat_map(|m| m.keys())
                        .any(|k| gpu_pilot_api::names::resource::is_gpu_resource(k))
                })
            })
        })
        .collect();
    add(
        "pending-gpu-pods.yaml",
        format!(
            "{} Pending pods cluster-wide that ask for GPUs",
            gpu_pending.len()
        ),
        yaml_list(&gpu_pending)?,
    );
    add(
        "daemonsets.yaml",
        format!("{} DaemonSets in {}", snap.daemonsets.len(), snap.namespace),
        yaml_list(&snap.daemonsets)?,
    );
    add(
        "deployments.yaml",
        format!(
            "{} Deployments in {}",
            snap.deployments.len(),
            snap.namespace
        ),
        yaml_list(&snap.deployments)?,
    );
    add(
        "services.yaml",
        format!(
            "{} Services and {} EndpointSlices in {}",
            snap.services.len(),
            snap.endpoint_slices.len(),
            snap.namespace
        ),
        [
            yaml_list(&snap.services)?,
            yaml_list(&snap.endpoint_slices)?,
        ]
        .join(&b"---\n"[..]),
    );
    add(
        "events.yaml",
        format!("{} Warning events in {}", snap.events.len(), snap.namespace),
        yaml_list(&snap.events)?,
    );
    add(
        "sandbox-events.yaml",
        format!(
            "{} {} events of pods, cluster-wide",
            snap.sandbox_events.len(),
            crate::doctor::snapshot::SANDBOX_FAILED
        ),
        yaml_list(&snap.sandbox_events)?,
    );
    let hooks: Vec<Value> = [
        snap.mutating.as_ref().map(serde_json::to_value),
        snap.validating.as_ref().map(serde_json::to_value),
    ]
    .into_iter()
    .flatten()
    .collect::<Result<_, _>>()?;
    add(
        "webhook.yaml",
        "gpu-pilot's webhook configurations, and the webhook Secret's metadata (never its data)"
            .into(),
        [
            yaml_list(&hooks)?,
            serde_yaml::to_string(&{
                let mut v = serde_json::json!({
                    "tlsSecretMetadata": snap.tls_secret.as_ref().map(|m| serde_json::json!({
                        "name": m.name, "annotations": m.annotations, "creationTimestamp": m.creation_timestamp,
                    })),
                });
                sanitize(&mut v);
                v
            })?
            .into_bytes(),
        ]
        .join(&b"---\n"[..]),
    );
    let cms: Vec<Value> = snap
        .config_maps
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name_any(),
                "keys": c.data.iter().flat_map(|d| d.keys()).chain(c.binary_data.iter().flat_map(|d| d.keys())).collect::<Vec<_>>(),
            })
        })
        .collect();
    add(
        "configmaps.yaml",
        format!(
            "names and keys of the {} ConfigMaps in {} (not their contents)",
            cms.len(),
            snap.namespace
        ),
        serde_yaml::to_string(&cms)?.into_bytes(),
    );
    Ok(out)
}

/// The pods whose logs go into the bundle: failing operand pods, then the controller and the
/// webhook, then one pod per operand component; at most [`MAX_LOG_PODS`].
pub fn log_pods(snap: &Snapshot) -> Vec<&Pod> {
    let mut chosen: Vec<&Pod> = Vec::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    let failing = |p: &Pod| {
        p.status.as_ref().is_some_and(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
                .any(|c| {
                    c.restart_count > 0
                        || c.state
                            .as_ref()
                            .and_then(|s| s.waiting.as_ref())
                            .is_some_and(|w| {
                                w.reason.as_deref().is_some_and(|r| r != "PodInitializing")
                            })
                })
        })
    };
    let mut tmp: Vec<&Pod> = Vec::new();
    for p in snap.pods.iter().filter(|p| is_operand(p) && failing(p)) {
        tmp.push(p);
    }
    for p in snap.pods.iter().filter(|p| !is_operand(p)) {
        tmp.push(p);
    }
    let mut components: BTreeSet<String> = BTreeSet::new();
    for p in snap.pods.iter().filter(|p| is_operand(p)) {
        let c = p
            .labels()
            .get(gpu_pilot_api::names::label::COMPONENT)
            .cloned()
            .unwrap_or_default();
        if components.insert(c) {
            tmp.push(p);
        }
    }
    for p in tmp {
        if chosen.len() >= MAX_LOG_PODS {
            break;
        }
        if names.insert(p.name_any()) {
            chosen.push(p);
        }
    }
    chosen
}

async fn logs(kube: &Kube, snap: &Snapshot) -> Vec<Entry> {
    let api: Api<Pod> = Api::namespaced(kube.client.clone(), &snap.namespace);
    let mut jobs = Vec::new();
    for p in log_pods(snap) {
        let containers = p
            .spec
            .iter()
            .flat_map(|s| {
                s.init_containers
                    .iter()
                    .flatten()
                    .chain(s.containers.iter())
            })
            .map(|c| c.name.clone());
        let restarted: BTreeSet<String> = p
            .status
            .iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
            })
            .filter(|c| c.restart_count > 0)
            .map(|c| c.name.clone())
            .collect();
        for c in containers {
            jobs.push((p.name_any(), c.clone(), false));
            if restarted.contains(&c) {
                jobs.push((p.name_any(), c, true));
            }
        }
    }
    // Bounded concurrency: a bundle of 40 pods must not open 100 streams at once.
    use futures::StreamExt;
    futures::stream::iter(jobs)
        .map(|(pod, container, previous)| {
            let api = api.clone();
            async move {
                let lp = LogParams {
                    container: Some(container.clone()),
                    previous,
                    tail_lines: Some(LOG_TAIL_LINES),
                    limit_bytes: Some(MAX_LOG_BYTES),
                    ..Default::default()
                };
                let text = match api.logs(&pod, &lp).await {
                    Ok(t) => redact(&t),
                    Err(e) => format!("(no logs: {e})\n"),
                };
                let suffix = if previous { ".previous" } else { "" };
                Entry {
                    name: format!("logs/{pod}/{container}{suffix}.log"),
                    about: format!(
                        "{}log of container {container} of pod {pod} (last {LOG_TAIL_LINES} lines, at most {} KiB)",
                        if previous { "previous instance's " } else { "" },
                        MAX_LOG_BYTES / 1024
                    ),
                    data: text.into_bytes(),
                }
            }
        })
        .buffer_unordered(8)
        .collect()
        .await
}

fn readme(entries: &[Entry]) -> String {
    let mut s = String::from(
        "gpu-pilot support bundle, written by `kubectl gpu doctor --bundle`.\n\
         It holds no Secret data: Secrets are not read (only the webhook Secret's name and\n\
         annotations), ConfigMaps appear by name and keys only, environment and annotation\n\
         values are replaced by <redacted> (names and keys stay), and log lines, arguments and\n\
         fields that look like credentials are redacted.\n\nFiles:\n",
    );
    for e in entries {
        s.push_str(&format!("  {:<48} {}\n", e.name, e.about));
    }
    s
}

fn write_tar(path: &Path, mut entries: Vec<Entry>) -> anyhow::Result<Written> {
    entries.sort_by(|a, b| {
        let logs = |e: &Entry| e.name.starts_with("logs/");
        logs(a).cmp(&logs(b)).then(a.name.cmp(&b.name))
    });
    let readme = readme(&entries);
    entries.insert(
        0,
        Entry {
            name: "README.txt".into(),
            about: "this index".into(),
            data: readme.into_bytes(),
        },
    );
    let dir = check_path(path)?;
    let fail = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "cannot write the support bundle {}: {e}; pick a writable path with --bundle",
            path.display()
        )
    };
    // O_CREAT|O_EXCL under a random name, mode 0600: nothing planted at a guessed name is opened,
    // and no one else can read the bundle while it is written or after.
    let mut tmp = tempfile::Builder::new()
        .prefix(".gpu-pilot-bundle-")
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(|e| fail(&e))?;
    let result = (|| -> anyhow::Result<()> {
        let gz = flate2::write::GzEncoder::new(tmp.as_file_mut(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for e in &entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(e.data.len() as u64);
            h.set_mode(0o600);
            h.set_mtime(mtime);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, format!("gpu-pilot-bundle/{}", e.name), &e.data[..])?;
        }
        let gz = tar.into_inner()?;
        gz.finish()?.flush()?;
        Ok(())
    })();
    // On error the temporary file is removed when `tmp` drops.
    result.map_err(|e| fail(&format!("{e:#}")))?;
    // A link may have been planted at the target since the check: rename replaces the link
    // itself, never what it points to, so checking again only makes the error clearer.
    refuse_link(path)?;
    let file = tmp.persist(path).map_err(|e| fail(&e.error))?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok(Written {
        path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        files: entries.len(),
        bytes,
    })
}

/// Fails, saying what to do, when a bundle cannot be written at `path` (checked before the
/// doctor reads the cluster); returns the folder it goes into.
pub fn check_path(path: &Path) -> anyhow::Result<&Path> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if path.is_dir() {
        anyhow::bail!(
            "--bundle {} is a folder; give a file name such as {}",
            path.display(),
            path.join("gpu-pilot-support.tar.gz").display()
        );
    }
    refuse_link(path)?;
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot write the support bundle {}: the folder {} does not exist; create it or pick another path with --bundle",
            path.display(),
            dir.display()
        );
    }
    Ok(dir)
}

/// A symbolic link at the target is refused rather than followed or silently replaced.
fn refuse_link(path: &Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        anyhow::bail!(
            "--bundle {} is a symbolic link; the bundle is never written through a link: remove it or pick another path",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The snapshot's objects and one log, written as a bundle in a new folder.
    fn bundle_of(snap: &Snapshot, log: &str) -> (tempfile::TempDir, PathBuf, Written) {
        let report = Report::from_findings(snap, crate::doctor::checks::run_all(snap));
        let mut entries = objects(snap, &report).unwrap();
        entries.push(Entry {
            name: "logs/p/c.log".into(),
            about: "a log".into(),
            data: redact(log).into_bytes(),
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.tar.gz");
        let w = write_tar(&path, entries).unwrap();
        (dir, path, w)
    }

    #[test]
    fn a_bundle_lists_every_file_in_its_readme() {
        let snap = Snapshot {
            namespace: "gpu-pilot".into(),
            ..Default::default()
        };
        let (dir, path, w) = bundle_of(&snap, "hello");
        assert_eq!(w.files, 16, "14 snapshot files, a log and the README");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
            std::fs::File::open(&path).unwrap(),
        ));
        let mut names = Vec::new();
        let mut readme = String::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name.ends_with("README.txt") {
                std::io::Read::read_to_string(&mut e, &mut readme).unwrap();
            }
            names.push(name);
        }
        assert_eq!(names[0], "gpu-pilot-bundle/README.txt");
        for n in &names[1..] {
            let short = n.trim_start_matches("gpu-pilot-bundle/");
            assert!(readme.contains(short), "{short} not in README:\n{readme}");
        }
        assert!(names.iter().any(|n| n.ends_with("findings.json")));
        // No stray temporary file next to it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A folder that does not exist is a clear error.
        let e = write_tar(&dir.path().join("nope/b.tar.gz"), vec![]).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    /// Every file of a bundle, by name, as text.
    fn read_bundle(path: &Path) -> BTreeMap<String, String> {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
            std::fs::File::open(path).unwrap(),
        ));
        let mut out = BTreeMap::new();
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            assert_eq!(e.header().mode().unwrap(), 0o600);
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            out.insert(name, text);
        }
        out
    }

    #[test]
    fn no_secret_of_a_pod_a_node_or_a_policy_reaches_the_bundle() {
        let gpu_pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "train", "namespace": "team-a", "annotations": {
                "backup.example.com/target": "https://svc:Pa55w0rd@minio.team-a:9000/bucket",
                "kubectl.kubernetes.io/last-applied-configuration": "{\"spec\":{\"containers\":[{\"env\":[{\"name\":\"HF_TOKEN\",\"value\":\"hf_AbCdEf\"}]}]}}"
            }},
            "spec": {"containers": [{
                "name": "c", "image": "trainer",
                "args": ["--api-token", "tok-9f8e7d", "--epochs=3"],
                "env": [{"name": "HF_TOKEN", "value": "hf_AbCdEf"}, {"name": "EPOCHS", "value": "30"}],
                "resources": {"limits": {"nvidia.com/gpu": "1"}}
            }]},
            "status": {"phase": "Pending"}
        }))
        .unwrap();
        let operand: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gpu-pilot-driver-x", "namespace": "gpu-pilot",
                "labels": {"app.kubernetes.io/managed-by": "gpu-pilot", "app.kubernetes.io/component": "driver"}},
            "spec": {"containers": [{"name": "driver", "image": "d",
                "env": [{"name": "NGC_API_KEY", "value": "nvapi-secret-1"}]}]}
        }))
        .unwrap();
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "gpu-1", "annotations": {
                "registry.example.com/pull": "token=ghp_0123456789abcdef password=hunter2",
                "gpupilot.io/agent-labels": "nvidia.com/gpu.product"
            }}
        }))
        .unwrap();
        let snap = Snapshot {
            namespace: "gpu-pilot".into(),
            pods: vec![operand],
            pending_pods: vec![gpu_pod],
            nodes: vec![node],
            ..Default::default()
        };
        let (_dir, path, _) = bundle_of(&snap, "auth ok token=t1 then password=p2 secret=s3\n");
        let files = read_bundle(&path);
        let all: String = files.values().cloned().collect();
        for secret in [
            "Pa55w0rd",
            "hf_AbCdEf",
            "tok-9f8e7d",
            "nvapi-secret-1",
            "ghp_0123456789abcdef",
            "hunter2",
            "=t1",
            "=p2",
            "=s3",
        ] {
            assert!(!all.contains(secret), "{secret} is in the bundle");
        }
        // Names and keys stay, so the bundle still says what was there.
        let pending = &files["gpu-pilot-bundle/pending-gpu-pods.yaml"];
        for kept in [
            "HF_TOKEN",
            "EPOCHS",
            "--api-token",
            "--epochs=3",
            "backup.example.com/target",
        ] {
            assert!(pending.contains(kept), "{kept} missing:\n{pending}");
        }
        assert!(files["gpu-pilot-bundle/nodes.yaml"].contains("nvidia.com/gpu.product"));
    }

    #[cfg(unix)]
    #[test]
    fn the_bundle_is_private_and_never_written_through_a_link() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let entries = || {
            vec![Entry {
                name: "a.txt".into(),
                about: "a".into(),
                data: b"bundle".to_vec(),
            }]
        };
        // A link at the target is refused before anything is written, and after.
        let target = dir.path().join("b.tar.gz");
        symlink(&victim, &target).unwrap();
        let e = write_tar(&target, entries()).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(check_path(&target).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        std::fs::remove_file(&target).unwrap();
        // Links at the temporary names an older version used (and any guessable name) are not
        // opened: the temporary file has a random name and is created exclusively.
        for guess in [
            format!(".b.tar.gz.{}.partial", std::process::id()),
            ".b.tar.gz.partial".to_string(),
        ] {
            symlink(&victim, dir.path().join(guess)).unwrap();
        }
        let w = write_tar(&target, entries()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        let meta = std::fs::symlink_metadata(&target).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "owner only");
        assert!(w.bytes > 0);
        // Writing again replaces the file, still private, and leaves no temporary file behind.
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_tar(&target, entries()).unwrap();
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
