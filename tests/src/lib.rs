//! The end-to-end test fixture: one real local control plane per test run.
//!
//! [`Cluster::start`] brings up `scripts/local-cluster` in a state directory of its own (on ports it
//! checks are free), or reuses a running cluster named by `GPU_PILOT_E2E_KUBECONFIG`. Dropping the
//! [`Cluster`] stops what it started, also when tests failed or panicked, and a SIGINT/SIGTERM
//! stops it too. Each test gets a fresh [`kube::Client`] and its own namespace through [`TestEnv`].
//!
//! `GPU_PILOT_E2E_KUBECONFIG` is a variable of its own, not `KUBECONFIG`, so that the tests never
//! write to whatever cluster the developer's shell happens to point at.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use std::time::{Duration, Instant};

pub mod agent;
pub mod controller;
pub mod nodes;
pub mod nvidia;
pub mod rbac;
pub mod serial;
pub mod tools;
pub mod webhook;

use anyhow::{Context, bail};
use gpu_pilot_api::names::field_manager;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

/// Fake GPU and CPU nodes the fixture's own cluster gets.
pub const GPU_NODES: usize = 4;
pub const CPU_NODES: usize = 2;

/// The repository's root (the tests crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A running control plane the tests talk to.
pub struct Cluster {
    kubeconfig: PathBuf,
    tools: PathBuf,
    /// Set when this process started the cluster and must stop it.
    owned_dir: Option<PathBuf>,
}

static OWNED_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn local_cluster(args: &[&str]) -> Command {
    let mut cmd = Command::new(repo_root().join("scripts/local-cluster"));
    cmd.args(args);
    cmd
}

fn stop_cluster(dir: &Path) {
    let dir = dir.to_string_lossy().into_owned();
    match local_cluster(&["down", "--dir", &dir]).status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("e2e: 'scripts/local-cluster down --dir {dir}' exited with {s}"),
        Err(e) => eprintln!("e2e: could not run 'scripts/local-cluster down --dir {dir}': {e}"),
    }
}

impl Cluster {
    /// Starts a local control plane for this test run, or reuses the one named by
    /// `GPU_PILOT_E2E_KUBECONFIG`. Fails (never skips) with what to install when a part is missing.
    pub fn start() -> anyhow::Result<Cluster> {
        Self::start_named("shared", GPU_NODES, CPU_NODES, true)
    }

    /// A cluster of its own for tests that change cluster-wide state (node labels, the one
    /// active ClusterPolicy). `reuse_env` lets GPU_PILOT_E2E_KUBECONFIG stand in for it.
    pub fn start_named(
        name: &str,
        gpu_nodes: usize,
        cpu_nodes: usize,
        reuse_env: bool,
    ) -> anyhow::Result<Cluster> {
        Self::start_with_real_nodes(name, gpu_nodes, cpu_nodes, 0, reuse_env)
    }

    /// Like [`Cluster::start_named`], with `real_nodes` nodes run by a real kubelet and
    /// containerd (`scripts/local-cluster up --real-nodes`, which needs root).
    pub fn start_with_real_nodes(
        name: &str,
        gpu_nodes: usize,
        cpu_nodes: usize,
        real_nodes: usize,
        reuse_env: bool,
    ) -> anyhow::Result<Cluster> {
        let tools = build_tools()?;
        if let (true, Ok(path)) = (reuse_env, std::env::var("GPU_PILOT_E2E_KUBECONFIG")) {
            let kubeconfig = PathBuf::from(path);
            if !kubeconfig.is_file() {
                bail!(
                    "GPU_PILOT_E2E_KUBECONFIG={} is not a file; unset it to let the tests start their own cluster",
                    kubeconfig.display()
                );
            }
            eprintln!("e2e: reusing the cluster of {}", kubeconfig.display());
            return Ok(Cluster {
                kubeconfig,
                tools,
                owned_dir: None,
            });
        }

        // One state directory per checkout: a run killed before it could clean up is cleaned
        // up by the next one.
        let dir = std::env::temp_dir().join(format!(
            "gpu-pilot-e2e-{name}-{:x}",
            fnv1a(repo_root().to_string_lossy().as_bytes())
        ));
        if dir.exists() {
            stop_cluster(&dir);
        }
        // Each named cluster searches its own range, so clusters started at once do not race for
        // the same ports.
        let first = match name {
            "shared" => 17440,
            "faults" => 17840,
            _ => 17640,
        };
        let port_base = free_port_block(first, 6)?;
        let dir_s = dir.to_string_lossy().into_owned();
        let gpu = gpu_nodes.to_string();
        let cpu = cpu_nodes.to_string();
        let real = real_nodes.to_string();
        let port = port_base.to_string();
        // Registered before `up` so a signal during start-up also cleans up.
        OWNED_DIRS.lock().unwrap().push(dir.clone());
        install_signal_handler();
        let started = Instant::now();
        let out = local_cluster(&[
            "up",
            "--dir",
            &dir_s,
            "--port-base",
            &port,
            "--gpu-nodes",
            &gpu,
            "--cpu-nodes",
            &cpu,
            "--real-nodes",
            &real,
        ])
        .output()
        .context("could not run scripts/local-cluster (is bash installed?)")?;
        if !out.status.success() {
            stop_cluster(&dir);
            bail!(
                "scripts/local-cluster up failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!(
            "e2e: local control plane '{name}' up in {:.1}s ({gpu_nodes} GPU nodes, {cpu_nodes} CPU nodes, {real_nodes} real nodes, ports from {port_base})",
            started.elapsed().as_secs_f64()
        );
        Ok(Cluster {
            kubeconfig: dir.join("admin.kubeconfig"),
            tools,
            owned_dir: Some(dir),
        })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Kills the named control-plane components (`etcd`, `kube-apiserver`, ...) and starts them
    /// again with the same flags and data (`scripts/local-cluster restart`). Only on a cluster
    /// this process started.
    pub fn restart(&self, components: &[&str]) -> anyhow::Result<()> {
        let Some(dir) = &self.owned_dir else {
            bail!(
                "restarting components needs a cluster the tests started, not GPU_PILOT_E2E_KUBECONFIG's"
            );
        };
        let dir = dir.to_string_lossy().into_owned();
        let mut args = vec!["restart"];
        args.extend_from_slice(components);
        args.extend(["--dir", &dir]);
        let out = local_cluster(&args)
            .output()
            .context("could not run scripts/local-cluster")?;
        if !out.status.success() {
            bail!(
                "scripts/local-cluster restart {components:?} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The cluster's state directory (`scripts/local-cluster --dir`).
    pub fn dir(&self) -> &Path {
        self.kubeconfig.parent().unwrap_or(Path::new("."))
    }

    /// `scripts/local-cluster COMMAND --dir <this cluster's> ARGS...`.
    pub fn local_cluster(&self, command: &str, args: &[&str]) -> Command {
        let mut cmd = local_cluster(&[command, "--dir"]);
        cmd.arg(self.dir()).args(args);
        cmd
    }

    /// The real `kubectl` built to match the control plane, pointed at this cluster.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.tools.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// A fresh client (each test runs on its own runtime, and a client belongs to one).
    pub async fn client(&self) -> anyhow::Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(dir) = self.owned_dir.take() {
            stop_cluster(&dir);
            OWNED_DIRS.lock().unwrap().retain(|d| d != &dir);
        }
    }
}

fn install_signal_handler() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = ctrlc::set_handler(|| {
            let dirs = std::mem::take(&mut *OWNED_DIRS.lock().unwrap());
            for dir in dirs {
                eprintln!(
                    "e2e: interrupted, stopping the local cluster in {}",
                    dir.display()
                );
                stop_cluster(&dir);
            }
            std::process::exit(130);
        });
    });
}

/// The `kubectl-gpu` binary of this build, built first if needed (the e2e binary sits in
/// `<target>/debug/deps`, the plugin in `<target>/debug`).
pub fn plugin_binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    workspace_binary(&BUILT, "kubectl-gpu")
}

/// The `gpu-pilot-controller` binary of this build, built first if needed: the fault tests run
/// it as a process of its own so that SIGKILL is real.
pub fn controller_binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    workspace_binary(&BUILT, "gpu-pilot-controller")
}

/// Builds one binary of the workspace (package and binary share the name) into this test
/// binary's target directory, once per run.
fn workspace_binary(
    built: &'static std::sync::OnceLock<Result<PathBuf, String>>,
    name: &str,
) -> anyhow::Result<PathBuf> {
    built
        .get_or_init(|| {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let dir = exe
                .parent()
                .and_then(Path::parent)
                .ok_or("the test binary has no target directory")?
                .to_path_buf();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .args(["build", "--quiet", "-p", name, "--bin", name])
                .env("CARGO_TARGET_DIR", dir.parent().ok_or("no target dir")?)
                .current_dir(repo_root())
                .output()
                .map_err(|e| format!("could not run cargo to build {name}: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building {name} failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(dir.join(name))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// Builds (or finds already built) etcd, the Kubernetes components, kubectl and kwok.
pub fn build_tools() -> anyhow::Result<PathBuf> {
    let out = Command::new(repo_root().join("scripts/build-tools"))
        .output()
        .context("could not run scripts/build-tools (is bash installed?)")?;
    if !out.status.success() {
        bail!(
            "scripts/build-tools failed, so the local control plane cannot run. It needs Go 1.26+ on PATH and the Go module proxy.\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = String::from_utf8(out.stdout)?.trim().to_string();
    Ok(PathBuf::from(dir))
}

fn free_port_block(start: u16, len: u16) -> anyhow::Result<u16> {
    let mut base = start;
    while base < 60000 {
        let free =
            (base..base + len).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return Ok(base);
        }
        base += 10;
    }
    bail!("no block of {len} free loopback ports found from {start} up")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// A namespace a test created. Dropping it deletes the namespace (without waiting), so it goes
/// whatever the test did: returned early with an error, or panicked. This is the one teardown of
/// the suite; fixtures with processes of their own stop those in their own `Drop`.
pub struct OwnedNamespace {
    name: String,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl OwnedNamespace {
    /// Creates `name` with `labels`.
    pub async fn create(
        cluster: &Cluster,
        client: &Client,
        name: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<OwnedNamespace> {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": labels }
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(OwnedNamespace {
            name: name.to_string(),
            kubectl: cluster.tools.join("kubectl"),
            kubeconfig: cluster.kubeconfig.clone(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for OwnedNamespace {
    fn drop(&mut self) {
        // Synchronous on purpose: a Drop cannot await, and the test's runtime may be ending.
        let out = Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "e2e: deleting namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("e2e: deleting namespace {}: {e}", self.name),
        }
    }
}

/// What one test gets: a client and a namespace of its own, deleted when the `TestEnv` is
/// dropped (see [`OwnedNamespace`]).
pub struct TestEnv {
    pub client: Client,
    pub namespace: String,
    /// `None` when the namespace belongs to someone else (see [`TestEnv::in_namespace`]).
    _owned: Option<OwnedNamespace>,
}

impl TestEnv {
    pub async fn new(cluster: &Cluster, test: &str) -> anyhow::Result<TestEnv> {
        let client = cluster.client().await?;
        let suffix = format!(
            "{:x}",
            fnv1a(format!("{test}{:?}", Instant::now()).as_bytes())
        );
        let mut name: String = format!("e2e-{test}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(50)
            .collect();
        name.push('-');
        name.push_str(&suffix[..8]);
        let owned =
            OwnedNamespace::create(cluster, &client, &name, &[("gpupilot.io/e2e", "true")]).await?;
        Ok(TestEnv {
            client,
            namespace: name,
            _owned: Some(owned),
        })
    }

    /// A `TestEnv` in a namespace that something else made and deletes (e.g. a `serial`
    /// scenario's operand namespace), for fixtures that take a `TestEnv`.
    pub fn in_namespace(client: Client, namespace: &str) -> TestEnv {
        TestEnv {
            client,
            namespace: namespace.to_string(),
            _owned: None,
        }
    }

    /// Ends the test's use of the namespace now (the same as dropping the `TestEnv`).
    pub async fn cleanup(self) {
        drop(self);
    }
}

/// Applies the generated CRD (idempotent) and waits until the apiserver serves it.
pub async fn ensure_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = gpu_pilot_api::crd();
    let name = crd.metadata.name.clone().unwrap();
    crds.patch(
        &name,
        &PatchParams::apply(field_manager::PLUGIN).force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("applying the ClusterPolicy CRD")?;
    eventually("CRD Established", Duration::from_secs(30), || {
        let crds = crds.clone();
        let name = name.clone();
        async move {
            let crd = crds.get(&name).await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            Ok(if established {
                Ok(())
            } else {
                Err("not Established".into())
            })
        }
    })
    .await
}

/// Names of the nodes that carry (or do not carry) the NFD GPU label.
pub async fn node_names(client: &Client, gpu: bool) -> anyhow::Result<Vec<String>> {
    let selector = if gpu {
        format!("{}=true", gpu_pilot_api::names::label::NFD_PCI_10DE)
    } else {
        format!("!{}", gpu_pilot_api::names::label::NFD_PCI_10DE)
    };
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await?;
    let mut names: Vec<String> = nodes
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    names.sort();
    Ok(names)
}

/// Polls `check` until it returns `Ok(Some(v))`, or fails after `timeout` with the last reason.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Result<T, String>>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(why)) => why,
            Err(e) => format!("error: {e:#}"),
        };
        if start.elapsed() > timeout {
            bail!("{what}: still not true after {timeout:?}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
