//! `scripts/local-cluster` as a user drives it: up, status, down, and what it does with bad input.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use gpu_pilot_e2e::repo_root;

fn local_cluster(args: &[&str]) -> Output {
    Command::new(repo_root().join("scripts/local-cluster"))
        .args(args)
        .output()
        .expect("scripts/local-cluster runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The first block of 6 free loopback ports from `start`. Tests that run at the same time start
/// from different places, so two of them never pick the same block.
fn free_base(start: u16) -> u16 {
    (start..60000)
        .step_by(10)
        .find(|b| (*b..b + 6).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()))
        .expect("free ports")
}

/// Running, not a zombie waiting to be reaped by whoever inherited it.
fn pid_alive(pid: &str) -> bool {
    match std::fs::read_to_string(Path::new("/proc").join(pid.trim()).join("stat")) {
        Ok(stat) => !stat.rsplit(") ").next().unwrap_or("").starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn up_status_down_leaves_nothing_running() {
    gpu_pilot_e2e::build_tools().expect("the control plane's tools build");
    let dir = tempdir("lifecycle");
    let base = free_base(19440).to_string();
    let up = local_cluster(&[
        "up",
        "--dir",
        &dir,
        "--port-base",
        &base,
        "--gpu-nodes",
        "2",
        "--cpu-nodes",
        "1",
    ]);
    assert!(up.status.success(), "up failed:\n{}", text(&up));
    assert!(
        text(&up).contains(&format!("export KUBECONFIG={dir}/admin.kubeconfig")),
        "up must print the kubeconfig export:\n{}",
        text(&up)
    );

    let status = local_cluster(&["status", "--dir", &dir]);
    let st = text(&status);
    assert!(status.status.success(), "status:\n{st}");
    assert!(
        st.contains("nodes:      2 GPU, 1 CPU, 3 Ready"),
        "status:\n{st}"
    );

    // A second `up` on the same state refuses and leaves the running cluster alone.
    let again = local_cluster(&["up", "--dir", &dir, "--port-base", &base]);
    assert!(!again.status.success());
    assert!(text(&again).contains("already running"), "{}", text(&again));

    let pids: Vec<String> = std::fs::read_dir(Path::new(&dir).join("pids"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(
        pids.len(),
        5,
        "etcd, apiserver, controller-manager, scheduler, kwok"
    );
    assert!(pids.iter().all(|p| pid_alive(p)));

    let down = local_cluster(&["down", "--dir", &dir]);
    assert!(down.status.success(), "down:\n{}", text(&down));
    assert!(!Path::new(&dir).exists(), "down must remove {dir}");
    for p in &pids {
        let pid = p.trim();
        assert!(
            !pid_alive(p),
            "process {pid} is still running after down: {} / {}",
            std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default(),
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ")
        );
    }
    // The listening sockets are gone with their processes (the kernel may need a moment).
    let base: u16 = base.parse().unwrap();
    for port in base..base + 6 {
        let free = (0..50).any(|_| {
            let ok = TcpListener::bind(("127.0.0.1", port)).is_ok();
            if !ok {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            ok
        });
        let holders = Command::new("ss")
            .args(["-ltnp", &format!("sport = :{port}")])
            .output();
        assert!(
            free,
            "port {port} still in use 10s after down: {}",
            holders
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        );
    }
    // Safe to run twice.
    let twice = local_cluster(&["down", "--dir", &dir]);
    assert!(twice.status.success(), "{}", text(&twice));
    assert!(text(&twice).contains("nothing to stop"));
}

#[test]
fn busy_port_fails_clearly_and_leaves_no_state() {
    let dir = tempdir("busy");
    let base = free_base(19740);
    let _hold = TcpListener::bind(("127.0.0.1", base + 2)).unwrap();
    let out = local_cluster(&["up", "--dir", &dir, "--port-base", &base.to_string()]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains(&format!("port 127.0.0.1:{} is already in use", base + 2)),
        "{t}"
    );
    assert!(
        t.contains("--port-base"),
        "the error must say how to fix it: {t}"
    );
    assert!(
        !Path::new(&dir).join("pids").exists(),
        "nothing may be started"
    );
}

#[test]
fn bad_arguments_are_explained() {
    let cases: [(&[&str], &str); 4] = [
        (&["up", "--gpu-nodes", "many"], "'many' is not a number"),
        (
            &["up", "--port-base", "80"],
            "--port-base must be between 1024 and 65000",
        ),
        (&["up", "--frobnicate"], "unknown option '--frobnicate'"),
        (&["sideways"], "unknown command 'sideways'"),
    ];
    for (args, want) in cases {
        let out = local_cluster(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(text(&out).contains(want), "{args:?}: {}", text(&out));
    }
    let status = local_cluster(&["status", "--dir", &tempdir("none")]);
    assert!(!status.status.success());
    assert!(text(&status).contains("no local cluster"));
}

fn tempdir(name: &str) -> String {
    let d = std::env::temp_dir().join(format!("gpu-pilot-lc-test-{name}-{}", std::process::id()));
    d.to_string_lossy().into_owned()
}
