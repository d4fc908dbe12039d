//! The agent driven by the kubelet's own device manager (k8s.io/kubernetes
//! pkg/kubelet/cm/devicemanager, built by scripts/build-tools as `devicemanager-harness`).
//! No cluster needed: the harness listens on a kubelet.sock in a temp dir.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

fn harness_path() -> PathBuf {
    let dir = std::env::var_os("GPU_PILOT_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME is set"))
                .join(".cache/gpu-pilot/tools/bin")
        });
    let p = dir.join("devicemanager-harness");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/build-tools (it builds the kubelet device-manager harness from \
         k8s.io/kubernetes) and run the tests again",
        p.display()
    );
    p
}

struct Kubelet {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Kubelet {
    fn start(dir: &Path) -> Kubelet {
        Kubelet::start_with(dir, None)
    }

    /// With `pod_resources`, the harness also serves the kubelet's pod-resources API there.
    fn start_with(dir: &Path, pod_resources: Option<&Path>) -> Kubelet {
        let mut cmd = Command::new(harness_path());
        cmd.arg("--dir").arg(dir);
        if let Some(p) = pod_resources {
            cmd.arg("--pod-resources").arg(p);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting devicemanager-harness");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut k = Kubelet {
            child,
            stdin,
            stdout,
        };
        let ready = k.read();
        assert_eq!(ready["ok"], true, "harness did not start: {ready}");
        k
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading the harness");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("harness said {line:?}: {e}"))
    }

    /// Sends a command; returns the result, or the harness's error message.
    fn call(&mut self, cmd: &str) -> Result<Value, String> {
        writeln!(self.stdin, "{cmd}").unwrap();
        let v = self.read();
        if v["ok"] == true {
            Ok(v["result"].clone())
        } else {
            Err(v["error"].as_str().unwrap_or_default().to_string())
        }
    }

    fn wait(&mut self, resource: &str, healthy: u32, total: u32) -> Value {
        self.call(&format!("wait {resource} {healthy} {total} 30000"))
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

struct Agent(Child);

impl Agent {
    fn start(dir: &Path, inventory: &Path, extra: &[&str]) -> Agent {
        let child = Command::new(env!("CARGO_BIN_EXE_gpu-pilot-agent"))
            .args([
                "run",
                "--metrics-addr",
                "off",
                "--poll-ms",
                "100",
                "--simulate",
            ])
            .arg(inventory)
            .arg("--device-plugin-dir")
            .arg(dir)
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .expect("starting gpu-pilot-agent");
        Agent(child)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (namespace, pod, container) of one series; `None` for a series without pod labels.
type Owner = Option<(String, String, String)>;
/// GPU UUID -> the owners of its series.
type Owners = BTreeMap<String, Vec<Owner>>;

/// The agent with /metrics on a free port and its log lines kept, for the pod-attribution tests.
struct MetricsAgent {
    _agent: Agent,
    addr: String,
    log: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl MetricsAgent {
    fn start(dir: &Path, inventory: &Path, pod_resources: &Path, extra: &[&str]) -> MetricsAgent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gpu-pilot-agent"))
            .args(["run", "--metrics-addr", "127.0.0.1:0", "--poll-ms", "100"])
            .arg("--simulate")
            .arg(inventory)
            .arg("--device-plugin-dir")
            .arg(dir)
            .arg("--pod-resources-socket")
            .arg(pod_resources)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting gpu-pilot-agent");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, log) = mpsc::channel();
        // Drain stderr for the agent's whole life so it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = MetricsAgent {
            _agent: Agent(child),
            addr: String::new(),
            log,
            seen: Vec::new(),
        };
        loop {
            let line = agent.next_line().unwrap_or_else(|| {
                panic!(
                    "the agent stopped before serving metrics; it said:\n{}",
                    agent.seen.join("\n")
                )
            });
            if let Some(rest) = line.split("serving metrics on http://").nth(1) {
                agent.addr = rest.trim_end_matches("/metrics").trim().to_string();
                break;
            }
        }
        agent
    }

    fn next_line(&mut self) -> Option<String> {
        let line = self.log.recv_timeout(Duration::from_secs(30)).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Every log line so far.
    fn lines(&mut self) -> &[String] {
        while let Ok(line) = self.log.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    fn scrape(&self) -> prometheus_parse::Scrape {
        let mut s = TcpStream::connect(&self.addr).expect("connecting to the agent's /metrics");
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
            .expect("metrics in Prometheus text format")
    }

    /// GPU UUID -> the (namespace, pod, container) labels of its DCGM_FI_DEV_GPU_UTIL series
    /// (`None` for a series without pod labels).
    fn owners(&self) -> Owners {
        let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for s in self.scrape().samples {
            if s.metric != "DCGM_FI_DEV_GPU_UTIL" {
                continue;
            }
            let l = |k: &str| s.labels.get(k).map(str::to_string);
            let who = match (l("namespace"), l("pod"), l("container")) {
                (Some(n), Some(p), Some(c)) => Some((n, p, c)),
                (None, None, None) => None,
                other => panic!("partial pod labels {other:?} on {s:?}"),
            };
            out.entry(l("UUID").unwrap()).or_default().push(who);
        }
        out
    }

    /// Scrapes until `want` holds (the kubelet and the agent work asynchronously); fails with the
    /// last scrape after 30 s.
    fn owners_until(&self, what: &str, want: impl Fn(&Owners) -> bool) -> Owners {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.owners();
            if want(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "metrics never showed {what}; last scrape: {got:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn who(ns: &str, pod: &str, container: &str) -> Owner {
    Some((ns.into(), pod.into(), container.into()))
}

fn inventory_file(dir: &Path, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("inventories/{name}.yaml"));
    let text = edit(std::fs::read_to_string(src).unwrap());
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn uuids(inv: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(inv).unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("uuid: "))
        .map(str::to_string)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn registers_allocates_recovers_and_reregisters() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("plugins");
    std::fs::create_dir(&sock).unwrap();
    let mut kubelet = Kubelet::start(&sock);
    let inv = inventory_file(tmp.path(), "a100-40gb", |t| t);
    let ids = uuids(&inv);
    let _agent = Agent::start(&sock, &inv, &[]);

    let seen = kubelet.wait("nvidia.com/gpu", 4, 4);
    let healthy = &seen["healthy"]["nvidia.com/gpu"];
    for id in &ids {
        assert!(
            healthy.get(id).is_some(),
            "kubelet does not see {id}: {seen}"
        );
    }
    assert_eq!(
        healthy[&ids[2]],
        serde_json::json!([1]),
        "GPU 2 sits on NUMA node 1"
    );

    // Two GPUs: the kubelet asks GetPreferredAllocation, and the NVLinked pair wins.
    let a = kubelet.call("allocate p1 nvidia.com/gpu 2").unwrap();
    let got = strings(&a["devices"]);
    let pair01 = vec![ids[0].clone(), ids[1].clone()];
    let mut pair23 = vec![ids[2].clone(), ids[3].clone()];
    pair23.sort();
    let mut sorted01 = pair01.clone();
    sorted01.sort();
    assert!(
        got == sorted01 || got == pair23,
        "not an NVLinked pair: {got:?}"
    );
    let visible = a["envs"]["NVIDIA_VISIBLE_DEVICES"].as_str().unwrap();
    let mut v: Vec<_> = visible.split(',').map(str::to_string).collect();
    v.sort();
    assert_eq!(v, got);
    // The next two GPUs go to the other pair.
    let b = kubelet.call("allocate p2 nvidia.com/gpu 2").unwrap();
    let got_b = strings(&b["devices"]);
    assert!(got_b.iter().all(|d| !got.contains(d)));
    assert!(
        kubelet.call("allocate p3 nvidia.com/gpu 1").is_err(),
        "all 4 GPUs are taken"
    );
    kubelet.call("free p1").unwrap();
    kubelet.call("free p2").unwrap();

    // A critical XID on GPU 1 makes it unhealthy; clearing it makes it healthy again.
    let text = std::fs::read_to_string(&inv).unwrap();
    let marked = text.replacen(
        &format!("uuid: {}\n", ids[1]),
        &format!("uuid: {}\n    xidsMarker: true\n", ids[1]),
        1,
    );
    // Put `xids: [79]` on GPU 1 only (the line after its uuid block).
    let mut out = String::new();
    let mut in_gpu1 = false;
    for line in marked.lines() {
        if line.trim() == "xidsMarker: true" {
            in_gpu1 = true;
            continue;
        }
        if in_gpu1 && line.trim() == "xids: []" {
            out.push_str("    xids: [79]\n");
            in_gpu1 = false;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    std::fs::write(&inv, &out).unwrap();
    let seen = kubelet.wait("nvidia.com/gpu", 3, 4);
    assert!(seen["healthy"]["nvidia.com/gpu"].get(&ids[1]).is_none());
    // An ignored XID (13) does not count.
    std::fs::write(&inv, out.replace("xids: [79]", "xids: [13]")).unwrap();
    kubelet.wait("nvidia.com/gpu", 4, 4);
    std::fs::write(
        &inv,
        out.replace("xids: [79]", "xids: [79]\n")
            .replace("xids: [79]\n\n", "xids: [79]\n"),
    )
    .unwrap();
    kubelet.wait("nvidia.com/gpu", 3, 4);
    std::fs::write(&inv, &text).unwrap();
    kubelet.wait("nvidia.com/gpu", 4, 4);

    // The kubelet restarts: kubelet.sock is re-created, plugin sockets wiped; the agent registers again.
    kubelet.call("restart").unwrap();
    kubelet.wait("nvidia.com/gpu", 4, 4);
    let c = kubelet.call("allocate p4 nvidia.com/gpu 1").unwrap();
    assert_eq!(strings(&c["devices"]).len(), 1);
}

#[test]
fn mig_mixed_single_and_time_slicing_as_the_kubelet_sees_them() {
    let tmp = tempfile::tempdir().unwrap();
    // GPUs 0 and 1 in MIG mode with 7x 1g.5gb each, GPUs 2 and 3 whole.
    let inv = inventory_file(tmp.path(), "a100-40gb", |t| {
        let mut out = String::new();
        let mut gpu = -1;
        for line in t.lines() {
            if line.starts_with("  - index: ") {
                gpu = line.trim_start_matches("  - index: ").parse().unwrap();
            }
            out.push_str(line);
            out.push('\n');
            if line.starts_with("    uuid: ") && gpu < 2 {
                out.push_str("    migEnabled: true\n    migDevices:\n");
                for i in 0..7 {
                    out.push_str(&format!(
                        "      - {{uuid: MIG-{gpu}-{i}, profile: 1g.5gb}}\n"
                    ));
                }
            }
        }
        out
    });

    let sock = tmp.path().join("mixed");
    std::fs::create_dir(&sock).unwrap();
    let mut kubelet = Kubelet::start(&sock);
    let agent = Agent::start(&sock, &inv, &["--mig-strategy", "mixed", "--cdi"]);
    kubelet.wait("nvidia.com/mig-1g.5gb", 14, 14);
    kubelet.wait("nvidia.com/gpu", 2, 2);
    let a = kubelet.call("allocate m1 nvidia.com/mig-1g.5gb 1").unwrap();
    let dev = strings(&a["devices"]).remove(0);
    assert!(dev.starts_with("MIG-"), "{dev}");
    assert_eq!(a["envs"]["NVIDIA_VISIBLE_DEVICES"], dev);
    assert_eq!(
        strings(&a["cdiDevices"]),
        vec![format!("nvidia.com/gpu={dev}")]
    );
    drop(agent);
    drop(kubelet);

    // `single` refuses a node where only some GPUs are in MIG mode: nothing is offered.
    let uniform = inventory_file(tmp.path(), "t4", |t| t);
    let _ = uniform;

    // Time-slicing: 4 replicas per GPU, renamed to nvidia.com/gpu.shared.
    let cfg = tmp.path().join("plugin-config.yaml");
    std::fs::write(
        &cfg,
        "version: v1\nflags: {migStrategy: mixed}\nsharing:\n  timeSlicing:\n    renameByDefault: true\n    resources:\n    - {name: nvidia.com/gpu, replicas: 4}\n    - {name: nvidia.com/mig-1g.5gb, replicas: 2}\n",
    )
    .unwrap();
    let sock = tmp.path().join("shared");
    std::fs::create_dir(&sock).unwrap();
    let mut kubelet = Kubelet::start(&sock);
    let _agent = Agent::start(&sock, &inv, &["--config", cfg.to_str().unwrap()]);
    kubelet.wait("nvidia.com/gpu.shared", 8, 8);
    kubelet.wait("nvidia.com/mig-1g.5gb.shared", 28, 28);
    let a = kubelet.call("allocate s1 nvidia.com/gpu.shared 2").unwrap();
    let got = strings(&a["devices"]);
    assert!(got.iter().all(|d| d.contains("::")), "{got:?}");
    // Replicas are spread: two different GPUs.
    let visible = a["envs"]["NVIDIA_VISIBLE_DEVICES"].as_str().unwrap();
    assert_eq!(visible.split(',').count(), 2, "{visible}");
}

#[test]
fn mig_single_offers_every_mig_device_as_nvidia_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let inv = inventory_file(tmp.path(), "a100-40gb", |t| {
        let mut out = String::new();
        let mut gpu = -1;
        for line in t.lines() {
            if line.starts_with("  - index: ") {
                gpu = line.trim_start_matches("  - index: ").parse().unwrap();
            }
            out.push_str(line);
            out.push('\n');
            if line.starts_with("    uuid: ") {
                out.push_str("    migEnabled: true\n    migDevices:\n");
                for i in 0..2 {
                    out.push_str(&format!(
                        "      - {{uuid: MIG-{gpu}-{i}, profile: 3g.20gb}}\n"
                    ));
                }
            }
        }
        out
    });
    let sock = tmp.path().join("single");
    std::fs::create_dir(&sock).unwrap();
    let mut kubelet = Kubelet::start(&sock);
    let _agent = Agent::start(&sock, &inv, &["--mig-strategy", "single"]);
    let seen = kubelet.wait("nvidia.com/gpu", 8, 8);
    assert!(
        seen["capacity"].get("nvidia.com/mig-3g.20gb").is_none(),
        "{seen}"
    );
    let a = kubelet.call("allocate x nvidia.com/gpu 1").unwrap();
    assert!(strings(&a["devices"])[0].starts_with("MIG-"));
}

#[test]
fn metrics_name_the_pods_the_kubelet_gave_gpus_to() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("plugins");
    std::fs::create_dir(&sock).unwrap();
    let pr_dir = tmp.path().join("pod-resources");
    std::fs::create_dir(&pr_dir).unwrap();
    let pr = pr_dir.join("kubelet.sock");
    let inv = inventory_file(tmp.path(), "a100-40gb", |t| t);
    let ids = uuids(&inv);

    // No kubelet yet: metrics for every GPU, none with pod labels, and the agent says why once.
    let mut agent = MetricsAgent::start(&sock, &inv, &pr, &[]);
    let unowned = |m: &Owners| m.len() == 4 && m.values().all(|v| v == &vec![None]);
    for _ in 0..3 {
        let m = agent.owners();
        assert!(unowned(&m), "{m:#?}");
    }
    let missing: Vec<_> = agent
        .lines()
        .iter()
        .filter(|l| l.contains("pod-resources socket") && l.contains("does not exist"))
        .cloned()
        .collect();
    assert_eq!(
        missing.len(),
        1,
        "one log line for the missing socket, however many scrapes: {:#?}",
        agent.lines()
    );
    assert!(
        missing[0].contains(&pr.display().to_string()),
        "{missing:?}"
    );

    // The kubelet comes up, serving pod-resources; two pods get GPUs through its device manager.
    let mut kubelet = Kubelet::start_with(&sock, Some(&pr));
    kubelet.wait("nvidia.com/gpu", 4, 4);
    let trainer = strings(
        &kubelet
            .call("allocate team-a/trainer nvidia.com/gpu 2 cuda")
            .unwrap()["devices"],
    );
    let notebook = strings(
        &kubelet
            .call("allocate team-b/notebook nvidia.com/gpu 1 jupyter")
            .unwrap()["devices"],
    );
    let m = agent.owners_until("the trainer and the notebook", |m| {
        m.values().any(|v| v.iter().any(Option::is_some))
    });
    let mut expected = BTreeMap::new();
    for id in &ids {
        let owner = if trainer.contains(id) {
            who("team-a", "trainer", "cuda")
        } else if notebook.contains(id) {
            who("team-b", "notebook", "jupyter")
        } else {
            None
        };
        expected.insert(id.clone(), vec![owner]);
    }
    assert_eq!(
        m, expected,
        "trainer has {trainer:?}, notebook {notebook:?}"
    );
    // Every metric carries the labels, not only the one looked at above.
    let scrape = agent.scrape();
    let labelled: BTreeSet<_> = scrape
        .samples
        .iter()
        .filter(|s| s.labels.get("pod").is_some())
        .map(|s| s.metric.clone())
        .collect();
    assert_eq!(labelled.len(), 11, "{labelled:?}");

    // The trainer ends: its GPUs lose the labels (the kubelet frees them on the next List).
    kubelet.call("free team-a/trainer").unwrap();
    let m = agent.owners_until("the trainer gone", |m| {
        m.values()
            .flatten()
            .flatten()
            .all(|(_, pod, _)| pod != "trainer")
    });
    assert_eq!(
        m.values().flatten().flatten().count(),
        1,
        "only the notebook is left: {m:#?}"
    );
    let found: Vec<_> = agent
        .lines()
        .iter()
        .filter(|l| l.contains("pod attribution of metrics"))
        .cloned()
        .collect();
    assert_eq!(found.len(), 1, "{:#?}", agent.lines());
}

#[test]
fn metrics_trace_mig_devices_and_replicas_to_their_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    // GPUs 0 and 1 in MIG mode with 2x 3g.20gb each, GPUs 2 and 3 whole and time-sliced.
    let inv = inventory_file(tmp.path(), "a100-40gb", |t| {
        let mut out = String::new();
        let mut gpu = -1;
        for line in t.lines() {
            if line.starts_with("  - index: ") {
                gpu = line.trim_start_matches("  - index: ").parse().unwrap();
            }
            out.push_str(line);
            out.push('\n');
            if line.starts_with("    uuid: ") && gpu < 2 {
                out.push_str("    migEnabled: true\n    migDevices:\n");
                for i in 0..2 {
                    out.push_str(&format!(
                        "      - {{uuid: MIG-{gpu}-{i}, profile: 3g.20gb}}\n"
                    ));
                }
            }
        }
        out
    });
    let ids = uuids(&inv);
    let cfg = tmp.path().join("plugin-config.yaml");
    std::fs::write(
        &cfg,
        "version: v1\nflags: {migStrategy: mixed}\nsharing:\n  timeSlicing:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 4}\n",
    )
    .unwrap();
    let sock = tmp.path().join("plugins");
    std::fs::create_dir(&sock).unwrap();
    let pr = tmp.path().join("pod-resources.sock");
    let mut kubelet = Kubelet::start_with(&sock, Some(&pr));
    let agent = MetricsAgent::start(&sock, &inv, &pr, &["--config", cfg.to_str().unwrap()]);
    kubelet.wait("nvidia.com/mig-3g.20gb", 4, 4);
    kubelet.wait("nvidia.com/gpu", 8, 8);

    let mig = strings(
        &kubelet
            .call("allocate ml/mig-job nvidia.com/mig-3g.20gb 1 worker")
            .unwrap()["devices"],
    );
    let shared = strings(
        &kubelet
            .call("allocate ml/shared-job nvidia.com/gpu 2 main")
            .unwrap()["devices"],
    );
    let mig_gpu: usize = mig[0]
        .strip_prefix("MIG-")
        .and_then(|r| r.split('-').next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("unexpected MIG device ID {mig:?}"));
    let replica_gpus: BTreeSet<String> = shared
        .iter()
        .map(|r| r.split_once("::").expect("a replica ID").0.to_string())
        .collect();
    let m = agent.owners_until("the MIG job and the shared job", |m| {
        m.values().flatten().flatten().count() > replica_gpus.len()
    });
    for (i, id) in ids.iter().enumerate() {
        let want = if i == mig_gpu {
            vec![who("ml", "mig-job", "worker")]
        } else if replica_gpus.contains(id) {
            vec![who("ml", "shared-job", "main")]
        } else {
            vec![None]
        };
        assert_eq!(
            m[id], want,
            "GPU {i}; mig {mig:?}, replicas {shared:?}: {m:#?}"
        );
    }
}
