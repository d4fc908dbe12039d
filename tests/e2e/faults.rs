//! Faults during a 1,000-node rollout, on a cluster of their own (kwok nodes), one scenario at a
//! time. The controller runs as its own process (the binary this build made), so SIGKILL is
//! real: no Lease release, no last pass, writes cut off wherever they were.
//!
//! - `controller_sigkilled_at_10_random_moments`: ten kills at seeded random moments of the
//!   rollout (the seed is printed; `GPU_PILOT_FAULT_SEED` replays it), then one during the
//!   cleanup of the deleted policy. Each time a new process takes over; at the end the rollout
//!   is complete with no duplicate DaemonSet or pod and no stale label, and after the deletion
//!   nothing of gpu-pilot's is left.
//! - `apiserver_and_etcd_restarted_mid_rollout`: two controller replicas (leader election), two
//!   webhook replicas behind one address, and GPU pods asking for admission all along; etcd and
//!   the apiserver are killed and started again mid-rollout, then the leading controller is
//!   killed. The rollout completes, the new leader is the other replica, and every GPU pod that
//!   reached a running apiserver was admitted and mutated.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use gpu_pilot_api::names::{Component, annotation, label};
use gpu_pilot_api::policy::PolicyState;
use gpu_pilot_api::{ClusterPolicy, Stage};
use gpu_pilot_e2e::controller::{free_port, gate_labels, http_get, reset_cluster};
use gpu_pilot_e2e::{Cluster, TestEnv, eventually};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};
use serde_json::json;

use crate::TestFn;
use crate::controller::{create_policy, lease_holder, nodes_clean, wait_policy};

/// Fake GPU nodes of the fault cluster.
const NODES: usize = 1000;
/// How long a 1,000-node rollout may take here (it takes a few minutes on 2 shared cores).
const ROLLOUT: Duration = Duration::from_secs(900);

pub fn tests() -> Vec<(&'static str, TestFn)> {
    vec![
        ("faults::controller_sigkilled_at_10_random_moments", |_| {
            Box::pin(turn(sigkill_rollout))
        }),
        ("faults::apiserver_and_etcd_restarted_mid_rollout", |_| {
            Box::pin(turn(control_plane_restart))
        }),
    ]
}

static CLUSTER: Mutex<Option<Arc<Cluster>>> = Mutex::new(None);
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cluster() -> anyhow::Result<Arc<Cluster>> {
    let mut c = CLUSTER.lock().unwrap();
    if c.is_none() {
        *c = Some(Arc::new(Cluster::start_named("faults", NODES, 0, false)?));
    }
    Ok(c.as_ref().unwrap().clone())
}

/// Stops the fault cluster (called once all tests ran).
pub fn shutdown() {
    CLUSTER.lock().unwrap().take();
}

/// Runs one scenario alone on the fault cluster, from a clean slate, with a fresh operand
/// namespace that is deleted afterwards.
async fn turn<F, Fut>(f: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<Cluster>, Client, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let _turn = SERIAL.lock().await;
    let cluster = tokio::task::spawn_blocking(cluster).await??;
    let client = cluster.client().await?;
    reset_cluster(&client).await?;
    crate::foundation::ensure_crd(&client).await?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() % 100_000_000)
        .unwrap_or(0);
    let ns = format!("faults-{stamp}");
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
        )
        .await?;
    let result = f(cluster, client.clone(), ns.clone()).await;
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::background())
        .await;
    result
}

/// A controller process: the real binary, killed with SIGKILL.
struct Process {
    child: Child,
    metrics: SocketAddr,
    identity: String,
}

impl Process {
    fn start(
        kubeconfig: &Path,
        ns: &str,
        identity: &str,
        leader_elect: bool,
        log: &Path,
    ) -> anyhow::Result<Process> {
        let bin = gpu_pilot_e2e::controller_binary()?;
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(bin)
            .args([
                "run",
                "--namespace",
                ns,
                "--resync",
                "10s",
                "--lease-duration",
                "6s",
                "--log-format",
                "json",
            ])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg(format!("--leader-elect={leader_elect}"))
            .arg(format!("--metrics-addr={metrics}"))
            .arg(format!("--identity={identity}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting gpu-pilot-controller")?;
        Ok(Process {
            child,
            metrics,
            identity: identity.into(),
        })
    }

    /// Waits until its caches are synced (`/readyz`).
    async fn ready(&mut self) -> anyhow::Result<()> {
        let addr = self.metrics;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("gpu-pilot-controller exited with {status} before it was ready");
            }
            if http_get(addr, "/readyz").await.is_ok_and(|b| b == "ok") {
                return Ok(());
            }
            ensure!(
                start.elapsed() < Duration::from_secs(120),
                "not ready after 2 minutes"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILL, and reaped.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seeded_rng() -> (u64, TestRng) {
    let seed: u64 = std::env::var("GPU_PILOT_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    (seed, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

fn log_path(ns: &str) -> PathBuf {
    std::env::temp_dir().join(format!("gpu-pilot-{ns}-controller.log"))
}

async fn ready_nodes(c: &Client, policy: &str) -> i32 {
    Api::<ClusterPolicy>::all(c.clone())
        .get_opt(policy)
        .await
        .ok()
        .flatten()
        .and_then(|p| p.status)
        .map(|s| s.ready_nodes)
        .unwrap_or(0)
}

async fn sigkill_rollout(cluster: Arc<Cluster>, c: Client, ns: String) -> anyhow::Result<()> {
    let (seed, mut rng) = seeded_rng();
    eprintln!("faults e2e: kill seed {seed} (GPU_PILOT_FAULT_SEED={seed} replays it)");
    let log = log_path(&ns);
    let started = Instant::now();
    create_policy(&c, "cluster-policy", json!({})).await?;
    for kill in 1..=10 {
        let mut p = Process::start(
            cluster.kubeconfig(),
            &ns,
            &format!("kill-{kill}"),
            false,
            &log,
        )?;
        p.ready().await?;
        let after = Duration::from_millis(300 + rng.next_u64() % 6000);
        tokio::time::sleep(after).await;
        p.kill();
        eprintln!(
            "faults e2e: SIGKILL {kill} {:.1}s after the controller was ready; {} of {NODES} nodes ready",
            after.as_secs_f64(),
            ready_nodes(&c, "cluster-policy").await
        );
    }
    let mut last = Process::start(cluster.kubeconfig(), &ns, "last", false, &log)?;
    last.ready().await?;
    wait_policy(
        &c,
        "cluster-policy",
        PolicyState::Ready,
        NODES as i32,
        ROLLOUT,
    )
    .await
    .with_context(|| format!("controller log: {}", log.display()))?;
    eprintln!(
        "faults e2e: rollout complete {:.0}s after the policy was created",
        started.elapsed().as_secs_f64()
    );
    converged(&c, &ns).await?;

    // The deletion, killed once in the middle: nothing of gpu-pilot's may be left.
    Api::<ClusterPolicy>::all(c.clone())
        .delete("cluster-policy", &DeleteParams::default())
        .await?;
    let after = Duration::from_millis(300 + rng.next_u64() % 3000);
    tokio::time::sleep(after).await;
    last.kill();
    eprintln!(
        "faults e2e: SIGKILL during the cleanup, {:.1}s after the delete",
        after.as_secs_f64()
    );
    let mut cleaner = Process::start(cluster.kubeconfig(), &ns, "cleaner", false, &log)?;
    cleaner.ready().await?;
    let client = &c;
    eventually(
        "the deleted policy gone",
        Duration::from_secs(300),
        || async move {
            Ok(
                match Api::<ClusterPolicy>::all(client.clone())
                    .get_opt("cluster-policy")
                    .await?
                {
                    None => Ok(()),
                    Some(p) => Err(format!("finalizers {:?}", p.finalizers())),
                },
            )
        },
    )
    .await?;
    eventually(
        "no gpu-pilot label on any node",
        Duration::from_secs(60),
        || nodes_clean(client),
    )
    .await?;
    nothing_left(&c, &ns).await?;
    cleaner.kill();
    let _ = std::fs::remove_file(&log);
    Ok(())
}

/// The rollout is complete and nothing is doubled or stale.
async fn converged(c: &Client, ns: &str) -> anyhow::Result<()> {
    let want: BTreeSet<String> = Component::ALL.iter().map(|c| c.daemonset_name()).collect();
    let dss: BTreeSet<String> = Api::<DaemonSet>::namespaced(c.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|d| d.name_any())
        .collect();
    ensure!(dss == want, "DaemonSets {dss:?}, want {want:?}");
    let pods = Api::<Pod>::namespaced(c.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let mut per: HashMap<(String, String), usize> = HashMap::new();
    for p in &pods.items {
        let comp = p
            .labels()
            .get(label::COMPONENT)
            .cloned()
            .unwrap_or_default();
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        *per.entry((comp, node)).or_default() += 1;
    }
    let doubled: Vec<_> = per.iter().filter(|(_, n)| **n > 1).take(5).collect();
    ensure!(doubled.is_empty(), "duplicate operand pods: {doubled:?}");
    ensure!(
        per.len() == NODES * Component::ALL.len(),
        "{} operand pods",
        per.len()
    );
    for n in Api::<Node>::all(c.clone())
        .list(&ListParams::default())
        .await?
    {
        let l = n.labels();
        ensure!(
            l.get(label::STAGE).map(String::as_str) == Some(Stage::Ready.as_str()),
            "{} is at {:?}",
            n.name_any(),
            l.get(label::STAGE)
        );
        for g in gate_labels() {
            ensure!(
                l.get(&g).map(String::as_str) == Some("true"),
                "{} lacks {g}",
                n.name_any()
            );
        }
        ensure!(
            !n.annotations().contains_key(annotation::STAGE_REASON),
            "{} keeps a stale stage reason",
            n.name_any()
        );
    }
    let sas = Api::<ServiceAccount>::namespaced(c.clone(), ns)
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=gpu-pilot"))
        .await?;
    ensure!(sas.items.len() == 2, "{} service accounts", sas.items.len());
    Ok(())
}

/// After the deletion: no DaemonSet, no operand helper, no RuntimeClass of gpu-pilot's.
async fn nothing_left(c: &Client, ns: &str) -> anyhow::Result<()> {
    let managed = ListParams::default().labels("app.kubernetes.io/managed-by=gpu-pilot");
    let ds = Api::<DaemonSet>::namespaced(c.clone(), ns)
        .list(&managed)
        .await?
        .items
        .len();
    let sa = Api::<ServiceAccount>::namespaced(c.clone(), ns)
        .list(&managed)
        .await?
        .items
        .len();
    let helpers = ListParams::default().labels("app.kubernetes.io/managed-by=gpu-pilot,app.kubernetes.io/component in (agent,runtime-class,operand)");
    let cr = Api::<ClusterRole>::all(c.clone())
        .list(&helpers)
        .await?
        .items
        .len();
    let crb = Api::<ClusterRoleBinding>::all(c.clone())
        .list(&helpers)
        .await?
        .items
        .len();
    let rc = Api::<RuntimeClass>::all(c.clone())
        .list(&helpers)
        .await?
        .items
        .len();
    ensure!(
        (ds, sa, cr, crb, rc) == (0, 0, 0, 0, 0),
        "left behind: {ds} DaemonSets, {sa} ServiceAccounts, {cr} ClusterRoles, {crb} ClusterRoleBindings, {rc} RuntimeClasses"
    );
    Ok(())
}

/// Accepts TCP connections on one address and hands each to the next of `backends` in turn,
/// as a Service does for the webhook's replicas.
async fn round_robin(backends: Vec<SocketAddr>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let backend = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(addr)
}

/// What the GPU pods asking for admission got.
#[derive(Default, Debug)]
struct Admissions {
    mutated: usize,
    /// The apiserver could not be reached (it was restarting): not the webhook's doing.
    unreachable: usize,
    /// Refused or not mutated while the apiserver answered: must stay empty.
    failed: Vec<String>,
}

async fn control_plane_restart(cluster: Arc<Cluster>, c: Client, ns: String) -> anyhow::Result<()> {
    let env = TestEnv::in_namespace(c.clone(), &ns);
    // The webhook: two replicas sharing the TLS Secret, one address in front of them.
    let mut fx = crate::webhook::Fixture::prepare(&env, json!({})).await?;
    let certs = crate::webhook::steady_certs(&env);
    let one = crate::webhook::start_webhook(
        &env,
        gpu_pilot_webhook::CertSource::Secret(certs.clone()),
        c.clone(),
    )
    .await?;
    let two = crate::webhook::start_webhook(
        &env,
        gpu_pilot_webhook::CertSource::Secret(certs),
        c.clone(),
    )
    .await?;
    let front = round_robin(vec![one.addr, two.addr]).await?;
    fx.registration.target =
        gpu_pilot_core::render::webhook::Target::Url(format!("https://{front}"));
    fx.register_mutating(&ns).await?;

    let log = log_path(&ns);
    let a = Process::start(cluster.kubeconfig(), &ns, "replica-a", true, &log)?;
    let b = Process::start(cluster.kubeconfig(), &ns, "replica-b", true, &log)?;
    let mut replicas = vec![a, b];
    for r in &mut replicas {
        r.ready().await?;
    }
    // The fixture's policy (named after the namespace) is the one rolled out.
    let policy = fx.id.clone();

    // GPU pods ask for admission all along (server-side dry runs, so nothing piles up).
    let admissions = Arc::new(Mutex::new(Admissions::default()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let asker = {
        let (admissions, stop, pods) = (
            admissions.clone(),
            stop.clone(),
            Api::<Pod>::namespaced(c.clone(), &ns),
        );
        let rc = fx.id.clone();
        tokio::spawn(async move {
            let pod: Pod = serde_json::from_value(crate::webhook::gpu_pod(
                "asker",
                json!({}),
                json!({"nvidia.com/gpu": "1"}),
            ))
            .expect("a pod");
            let dry = PostParams {
                dry_run: true,
                ..Default::default()
            };
            loop {
                let got = pods.create(&dry, &pod).await;
                {
                    let mut a = admissions.lock().unwrap();
                    match got {
                        Ok(p)
                            if p.spec
                                .as_ref()
                                .and_then(|s| s.runtime_class_name.as_deref())
                                == Some(rc.as_str()) =>
                        {
                            a.mutated += 1
                        }
                        Ok(_) => a.failed.push("admitted without the runtime class".into()),
                        Err(kube::Error::Api(e))
                            if e.code >= 500 && !e.message.contains("webhook") =>
                        {
                            a.unreachable += 1
                        }
                        Err(kube::Error::Api(e)) => a.failed.push(e.message),
                        Err(_) => a.unreachable += 1,
                    }
                }
                tokio::select! {
                    _ = stop.notified() => return,
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            }
        })
    };

    let body = async {
        let (client, policy_name, ns_ref) = (&c, &policy, &ns);
        eventually(
            "the rollout under way",
            Duration::from_secs(300),
            || async move {
                let n = ready_nodes(client, policy_name).await;
                Ok(if n > 0 {
                    Ok(())
                } else {
                    Err("no node ready yet".to_string())
                })
            },
        )
        .await?;
        eprintln!(
            "faults e2e: restarting etcd and kube-apiserver with {} of {NODES} nodes ready",
            ready_nodes(&c, &policy).await
        );
        let cl = cluster.clone();
        tokio::task::spawn_blocking(move || cl.restart(&["etcd", "kube-apiserver"])).await??;
        eprintln!(
            "faults e2e: control plane back, {} of {NODES} nodes ready",
            ready_nodes(&c, &policy).await
        );
        // Then the leader dies: the other replica must take over and finish.
        let leader = eventually(
            "a leader after the restart",
            Duration::from_secs(120),
            || async move {
                Ok(lease_holder(client, ns_ref)
                    .await?
                    .ok_or_else(|| "no holder".to_string()))
            },
        )
        .await?;
        let pos = replicas
            .iter()
            .position(|r| r.identity == leader)
            .context("the leader is one of ours")?;
        replicas.remove(pos).kill();
        eprintln!("faults e2e: killed the leader {leader}");
        wait_policy(&c, &policy, PolicyState::Ready, NODES as i32, ROLLOUT)
            .await
            .with_context(|| format!("controller log: {}", log.display()))?;
        let holder = lease_holder(&c, &ns).await?;
        ensure!(
            holder.as_deref() == Some(replicas[0].identity.as_str()),
            "the Lease is held by {holder:?}"
        );
        converged(&c, &ns).await
    }
    .await;
    stop.notify_one();
    let _ = asker.await;
    let adm = std::mem::take(&mut *admissions.lock().unwrap());
    eprintln!(
        "faults e2e: GPU pods mutated {}, apiserver unreachable {}, failed {}",
        adm.mutated,
        adm.unreachable,
        adm.failed.len()
    );
    one.stop().await;
    two.stop().await;
    fx.stop().await;
    drop(replicas);
    body?;
    ensure!(
        adm.failed.is_empty(),
        "GPU pods refused or not mutated while the apiserver answered: {:?}",
        &adm.failed[..adm.failed.len().min(5)]
    );
    ensure!(
        adm.mutated > 10,
        "only {} GPU pods were admitted",
        adm.mutated
    );
    let _ = std::fs::remove_file(&log);
    Ok(())
}
