//! `kubectl gpu doctor`: every check, over one snapshot of the cluster.
//!
//! [`Snapshot::gather`] reads the cluster once (a fixed number of requests, plus one per further
//! page of nodes, pods or events; memory flat with the cluster's size);
//! [`checks::run_all`] turns it into [`Finding`]s with pure functions; this module prints them
//! (`-o table|json|yaml`) and picks the exit code: 0 healthy (info only), 1 warnings, 2 errors
//! (also when the cluster cannot be checked at all).

pub mod bundle;
pub mod checks;
pub mod redact;
pub mod snapshot;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::cluster::Kube;
use crate::global::Global;
use crate::ui::Output;
pub use snapshot::{Detail, Snapshot};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  kubectl gpu doctor                          what is wrong, grouped by severity
  kubectl gpu doctor -o json | jq '.findings[] | select(.severity == \"error\")'
  kubectl gpu doctor --bundle gpu-support.tar.gz   also write a support bundle
  kubectl gpu doctor --list-checks            every check and what it looks for

Exit code: 0 healthy (info only), 1 warnings, 2 errors or the cluster could not be checked.")]
pub struct DoctorArgs {
    /// Also write a support bundle (policy, nodes, operand pods, logs, events, findings).
    #[arg(long, value_name = "FILE.tar.gz")]
    pub bundle: Option<std::path::PathBuf>,
    /// Print every check (id, severity, what it looks for) and exit.
    #[arg(long)]
    pub list_checks: bool,
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// Objects listed by name in one finding; the rest are counted in `moreObjects`.
pub const MAX_OBJECTS: usize = 10;

/// One thing the doctor found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// The check that found it (stable, see `--list-checks`).
    pub check: String,
    pub severity: Severity,
    /// One line: what is wrong.
    pub title: String,
    /// Affected objects as `Kind/name` or `Kind/namespace/name`, at most [`MAX_OBJECTS`].
    pub objects: Vec<String>,
    /// How many more objects are affected than listed.
    pub more_objects: usize,
    /// What was seen, one fact a line.
    pub evidence: Vec<String>,
    /// What to do: a command or an edit.
    pub fix: String,
}

impl Finding {
    pub fn new(check: &str, severity: Severity, title: impl Into<String>) -> Finding {
        Finding {
            check: check.to_string(),
            severity,
            title: title.into(),
            objects: Vec::new(),
            more_objects: 0,
            evidence: Vec::new(),
            fix: String::new(),
        }
    }

    /// Sets the affected objects, keeping the first [`MAX_OBJECTS`] and counting the rest.
    pub fn objects<I, S>(mut self, objects: I) -> Finding
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let all: Vec<String> = objects.into_iter().map(Into::into).collect();
        self.more_objects = all.len().saturating_sub(MAX_OBJECTS);
        self.objects = all.into_iter().take(MAX_OBJECTS).collect();
        self
    }

    pub fn evidence<I, S>(mut self, lines: I) -> Finding
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.evidence.extend(lines.into_iter().map(Into::into));
        self
    }

    pub fn fix(mut self, fix: impl Into<String>) -> Finding {
        self.fix = fix.into();
        self
    }
}

/// Counts per severity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub errors: usize,
    pub warnings: usize,
    pub info: usize,
}

/// The doctor's whole answer; this is the `-o json|yaml` schema (`apiVersion` names it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// `gpupilot.io/doctor/v1`: fields are only ever added to this schema.
    pub api_version: String,
    /// The apiserver URL.
    pub cluster: String,
    /// Kubernetes gitVersion.
    pub kubernetes_version: String,
    /// gpu-pilot's namespace that was checked.
    pub namespace: String,
    /// The plugin's version.
    pub plugin_version: String,
    /// Checks that ran.
    pub checks: usize,
    /// Nodes in the snapshot (all of them, GPU or not) and GPU nodes among them.
    pub nodes: usize,
    pub gpu_nodes: usize,
    pub summary: Summary,
    /// Errors first, then warnings, then info.
    pub findings: Vec<Finding>,
    /// HTTP requests sent to the apiserver (constant whatever the cluster size).
    pub requests: u64,
    /// Seconds from the first request to the report.
    pub seconds: f64,
}

pub const REPORT_API_VERSION: &str = "gpupilot.io/doctor/v1";

impl Report {
    /// 0 healthy (info only), 1 warnings, 2 errors.
    pub fn exit_code(&self) -> i32 {
        if self.summary.errors > 0 {
            2
        } else if self.summary.warnings > 0 {
            1
        } else {
            0
        }
    }

    pub fn from_findings(snap: &Snapshot, mut findings: Vec<Finding>) -> Report {
        findings.sort_by(|a, b| a.severity.cmp(&b.severity).then(a.check.cmp(&b.check)));
        let count = |s| findings.iter().filter(|f| f.severity == s).count();
        let summary = Summary {
            errors: count(Severity::Error),
            warnings: count(Severity::Warning),
            info: count(Severity::Info),
        };
        Report {
            api_version: REPORT_API_VERSION.into(),
            cluster: snap.server.clone(),
            kubernetes_version: snap
                .version
                .as_ref()
                .map(|v| v.2.clone())
                .unwrap_or_default(),
            namespace: snap.namespace.clone(),
            plugin_version: env!("CARGO_PKG_VERSION").into(),
            checks: checks::CHECKS.len(),
            nodes: snap.nodes.len(),
            gpu_nodes: checks::gpu_nodes(snap).len(),
            summary,
            findings,
            requests: 0,
            seconds: 0.0,
        }
    }
}

/// Reads the cluster and runs every check. The snapshot comes back too (for the bundle, which
/// wants [`Detail::Whole`]).
pub async fn diagnose(
    kube: &Kube,
    namespace: &str,
    detail: Detail,
) -> anyhow::Result<(Report, Snapshot)> {
    let started = Instant::now();
    let snap = Snapshot::gather(kube, namespace, detail).await?;
    let mut report = Report::from_findings(&snap, checks::run_all(&snap));
    report.requests = kube.requests();
    report.seconds = started.elapsed().as_secs_f64();
    Ok((report, snap))
}

/// Run the doctor; the exit code is 0 healthy, 1 warnings, 2 errors.
pub async fn run(g: &Global, args: DoctorArgs) -> anyhow::Result<i32> {
    // Not a lock: this future must stay Send (the tests run it on a runtime).
    let mut out = std::io::stdout();
    if args.list_checks {
        for c in checks::CHECKS {
            writeln!(out, "{:<30} {:<8} {}", c.id, c.severity.as_str(), c.about)?;
        }
        return Ok(0);
    }
    if let Some(path) = &args.bundle {
        // Say so before reading the cluster, not after.
        if let Err(e) = bundle::check_path(path) {
            eprintln!("error: {e:#}");
            return Ok(2);
        }
    }
    let result = async {
        let kube = Kube::connect(g).await?;
        let detail = match args.bundle {
            Some(_) => Detail::Whole,
            None => Detail::Checked,
        };
        let (report, snap) = diagnose(&kube, &g.namespace, detail).await?;
        anyhow::Ok((kube, report, snap))
    }
    .await;
    let (kube, report, snap) = match result {
        Ok(r) => r,
        Err(e) => {
            // An unreachable cluster is the worst finding of all: exit 2, and say what to do.
            let _ = out.flush();
            eprintln!("error: {e:#}");
            eprintln!(
                "doctor could not check the cluster. Check that `kubectl get nodes` works with the same --kubeconfig/--context, then run it again."
            );
            return Ok(2);
        }
    };
    match g.output {
        Output::Table => write!(out, "{}", table(&report, g.colour()))?,
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
        Output::Yaml => write!(out, "{}", serde_yaml::to_string(&report)?)?,
    }
    out.flush()?;
    if let Some(path) = &args.bundle {
        let before = kube.requests();
        let line = match bundle::write(&kube, &snap, &report, path).await {
            Ok(b) => format!(
                "Support bundle written to {} ({} files, {} KiB, {} more API requests for logs). Attach it to your bug report; it holds no Secret data.",
                b.path.display(),
                b.files,
                b.bytes.div_ceil(1024),
                kube.requests() - before
            ),
            Err(e) => {
                eprintln!("error: {e:#}");
                return Ok(2);
            }
        };
        // On stderr for machine formats, so stdout stays parseable.
        if g.output == Output::Table {
            writeln!(out, "{line}")?;
        } else {
            eprintln!("{line}");
        }
    }
    Ok(report.exit_code())
}

/// The findings as text, for `install --wait` when the rollout is stuck: errors and warnings
/// only (a line each with the fix), or a sentence saying none were found.
pub async fn summary(kube: &Kube, namespace: &str) -> anyhow::Result<String> {
    let (report, _) = diagnose(kube, namespace, Detail::Checked).await?;
    let mut s = String::new();
    let serious: Vec<&Finding> = report
        .findings
        .iter()
        .filter(|f| f.severity != Severity::Info)
        .collect();
    if serious.is_empty() {
        s.push_str("kubectl gpu doctor found no errors or warnings.\n");
        return Ok(s);
    }
    for f in serious {
        s.push_str(&format!(
            "{}: [{}] {}\n",
            f.severity.as_str(),
            f.check,
            f.title
        ));
        if !f.objects.is_empty() {
            s.push_str(&format!("  objects: {}\n", objects_line(f)));
        }
        for e in f.evidence.iter().take(3) {
            s.push_str(&format!("  {e}\n"));
        }
        s.push_str(&format!("  fix: {}\n", f.fix));
    }
    s.push_str("Run `kubectl gpu doctor` for every finding.\n");
    Ok(s)
}

fn objects_line(f: &Finding) -> String {
    let shown = 5.min(f.objects.len());
    let more = f.objects.len() - shown + f.more_objects;
    let mut s = f.objects[..shown].join(", ");
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

/// The table output: findings grouped by severity, each with its objects, evidence and fix.
pub fn table(r: &Report, colour: bool) -> String {
    let paint = |code: &str, s: &str| {
        if colour {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    };
    let mut s = String::new();
    s.push_str(&format!(
        "gpu-pilot doctor: cluster {} (Kubernetes {}), namespace {}, {} nodes ({} GPU)\n",
        r.cluster, r.kubernetes_version, r.namespace, r.nodes, r.gpu_nodes
    ));
    for (sev, heading, code, mark) in [
        (Severity::Error, "ERRORS", "1;31", "x"),
        (Severity::Warning, "WARNINGS", "1;33", "!"),
        (Severity::Info, "INFO", "1;34", "i"),
    ] {
        let group: Vec<&Finding> = r.findings.iter().filter(|f| f.severity == sev).collect();
        if group.is_empty() {
            continue;
        }
        s.push('\n');
        s.push_str(&paint(code, &format!("{heading} ({})", group.len())));
        s.push('\n');
        for f in group {
            s.push_str(&format!(
                "  {} {} {}\n",
                paint(code, mark),
                f.title,
                paint("2", &format!("[{}]", f.check))
            ));
            if !f.objects.is_empty() {
                s.push_str(&format!("      objects:  {}\n", objects_line(f)));
            }
            for (i, e) in f.evidence.iter().enumerate() {
                let label = if i == 0 { "evidence:" } else { "" };
                for (j, line) in e.lines().enumerate() {
                    let label = if j == 0 { label } else { "" };
                    s.push_str(&format!("      {label:<9} {line}\n"));
                }
            }
            if !f.fix.is_empty() {
                for (j, line) in f.fix.lines().enumerate() {
                    let label = if j == 0 { "fix:" } else { "" };
                    s.push_str(&format!("      {label:<9} {line}\n"));
                }
            }
        }
    }
    s.push('\n');
    let verdict = if r.summary.errors > 0 {
        paint("1;31", "NOT HEALTHY")
    } else if r.summary.warnings > 0 {
        paint("1;33", "WARNINGS")
    } else {
        paint("1;32", "HEALTHY")
    };
    s.push_str(&format!(
        "{verdict}: {} errors, {} warnings, {} info from {} checks; {} API requests in {:.2} s.\n",
        r.summary.errors, r.summary.warnings, r.summary.info, r.checks, r.requests, r.seconds
    ));
    s
}
