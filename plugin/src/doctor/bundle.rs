//! The support bundle `kubectl gpu doctor --bundle FILE.tar.gz` writes: what a maintainer needs to
//! see what the doctor saw, in one file to attach to a bug report.
//!
//! It holds the doctor's snapshot (policies, nodes, operand pods, DaemonSets, Deployments, events,
//! webhook configurations), the findings as JSON, version information, and the logs of a bounded
//! number of pods (failing operand pods first, then the controller and webhook, then one pod per
//! component), each capped in size. It never holds Secret data: Secrets are never read (only the
//! webhook Secret's metadata), ConfigMap contents are left out (only their names and keys), and log
//! lines are passed through [`redact`]. A `README.txt` inside lists every file.

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
    for v in &mut values {
        strip(v);
    }
    Ok(serde_yaml::to_string(&serde_json::json!({
        "apiVersion": "v1", "kind": "List", "items": values,
    }))?
    .into_bytes())
}

/// Drops what is bulky and useless for support (managedFields) from an object.
fn strip(v: &mut Value) {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
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
        serde_json::to_vec_pretty(report)?,
    );
    add(
        "findings.txt",
        "the same report as the doctor's table output".into(),
        crate::doctor::table(report, false).into_bytes(),
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
        serde_json::to_vec_pretty(&version)?,
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
            serde_yaml::to_string(&serde_json::json!({
                "tlsSecretMetadata": snap.tls_secret.as_ref().map(|m| serde_json::json!({
                    "name": m.name, "annotations": m.annotations, "creationTimestamp": m.creation_timestamp,
                })),
            }))?
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

/// Replaces what looks like a credential in a log line (`token=...`, `password: ...`,
/// `Authorization: Bearer ...`, PEM private keys) with `<redacted>`.
pub fn redact(text: &str) -> String {
    const KEYS: [&str; 7] = [
        "password",
        "passwd",
        "token",
        "secret",
        "apikey",
        "api_key",
        "authorization",
    ];
    let mut out = String::with_capacity(text.len());
    let mut in_key = false;
    for line in text.lines() {
        if line.contains("-----BEGIN") && line.contains("PRIVATE KEY-----") {
            in_key = true;
            out.push_str("<redacted private key>\n");
            continue;
        }
        if in_key {
            if line.contains("-----END") {
                in_key = false;
            }
            continue;
        }
        let lower = line.to_ascii_lowercase();
        let mut redacted = line.to_string();
        for key in KEYS {
            let mut from = 0;
            while let Some(pos) = lower[from..].find(key) {
                let start = from + pos + key.len();
                // Skip the rest of the key word and the separator (":", "=", quotes, spaces).
                let bytes = lower.as_bytes();
                let mut i = start;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let sep_start = i;
                while i < bytes.len() && matches!(bytes[i], b':' | b'=' | b' ' | b'"' | b'\'') {
                    i += 1;
                }
                if i == sep_start || !lower[sep_start..i].contains([':', '=']) {
                    from = start;
                    continue;
                }
                // "Bearer xyz": keep the scheme, hide the credential.
                if lower[i..].starts_with("bearer ") || lower[i..].starts_with("basic ") {
                    i += lower[i..].find(' ').map(|p| p + 1).unwrap_or(0);
                }
                let mut end = i;
                while end < bytes.len() && !matches!(bytes[end], b' ' | b'"' | b'\'' | b',' | b'}')
                {
                    end += 1;
                }
                if end > i {
                    redacted = format!("{}<redacted>{}", &line[..i], &line[end..]);
                    break;
                }
                from = start;
            }
            if redacted != line {
                break;
            }
        }
        out.push_str(&redacted);
        out.push('\n');
    }
    out
}

fn readme(entries: &[Entry]) -> String {
    let mut s = String::from(
        "gpu-pilot support bundle, written by `kubectl gpu doctor --bundle`.\n\
         It holds no Secret data: Secrets are not read (only the webhook Secret's name and\n\
         annotations), ConfigMaps appear by name and keys only, and log lines that look like\n\
         credentials are redacted.\n\nFiles:\n",
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
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile_in(dir, path)?;
    let result = (|| -> anyhow::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let mtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        for e in &entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(e.data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(mtime);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, format!("gpu-pilot-bundle/{}", e.name), &e.data[..])?;
        }
        let gz = tar.into_inner()?;
        let mut file = gz.finish()?;
        file.flush()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        anyhow::bail!(
            "cannot write the support bundle {}: {e:#}; pick a writable path with --bundle",
            path.display()
        );
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!(
            "cannot write the support bundle {}: {e}; pick a writable path with --bundle",
            path.display()
        )
    })?;
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    Ok(Written {
        path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        files: entries.len(),
        bytes,
    })
}

/// Fails, saying what to do, when a bundle cannot be written at `path` (checked before the
/// doctor reads the cluster).
pub fn check_path(path: &Path) -> anyhow::Result<()> {
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
    tempfile_in(dir, path).map(|_| ())
}

/// A temporary file name next to the target, so the final rename is atomic.
fn tempfile_in(dir: &Path, target: &Path) -> anyhow::Result<PathBuf> {
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot write the support bundle {}: the folder {} does not exist; create it or pick another path with --bundle",
            target.display(),
            dir.display()
        );
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle.tar.gz".into());
    Ok(dir.join(format!(".{name}.{}.partial", std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_logs_are_redacted() {
        let text = "start\nconnecting with token=abc123 to x\nAuthorization: Bearer eyJhbGci.x.y\n\
                    {\"password\": \"hunter2\", \"user\": \"a\"}\n-----BEGIN EC PRIVATE KEY-----\nMHcC\n\
                    -----END EC PRIVATE KEY-----\ntokens are fine as a word\n";
        let r = redact(text);
        for secret in ["abc123", "eyJhbGci", "hunter2", "MHcC"] {
            assert!(!r.contains(secret), "{secret} leaked: {r}");
        }
        assert!(r.contains("Authorization: Bearer <redacted>"), "{r}");
        assert!(r.contains("tokens are fine as a word"), "{r}");
        assert!(r.contains("start\n"));
    }

    #[test]
    fn a_bundle_lists_every_file_in_its_readme() {
        let snap = Snapshot {
            namespace: "gpu-pilot".into(),
            ..Default::default()
        };
        let report = Report::from_findings(&snap, crate::doctor::checks::run_all(&snap));
        let mut entries = objects(&snap, &report).unwrap();
        entries.push(Entry {
            name: "logs/p/c.log".into(),
            about: "a log".into(),
            data: b"hello".to_vec(),
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.tar.gz");
        let w = write_tar(&path, entries).unwrap();
        assert_eq!(w.files, 15, "13 snapshot files, a log and the README");
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
}
