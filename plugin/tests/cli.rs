//! The binary as a user meets it before any cluster is involved: help, dry runs, completion and
//! the errors for bad input. No test here needs a cluster; a kubeconfig pointing nowhere shows
//! that `--dry-run` and `version --client` never contact one.

use std::process::{Command, Output};

fn kubectl_gpu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-gpu"))
        .args(args)
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("NO_COLOR")
        .output()
        .expect("the binary runs")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn every_command_has_help_with_examples() {
    for cmd in [
        vec!["install"],
        vec!["uninstall"],
        vec!["status"],
        vec!["doctor"],
        vec!["mig", "set"],
        vec!["completion"],
    ] {
        let mut args = cmd.clone();
        args.push("--help");
        let o = kubectl_gpu(&args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{cmd:?} --help: {err}");
        assert!(
            out.contains("Examples:"),
            "{cmd:?} --help has no examples:\n{out}"
        );
        assert!(
            out.contains("--kubeconfig"),
            "{cmd:?} lacks the global options"
        );
    }
}

#[test]
fn dry_run_prints_every_object_without_a_cluster() {
    let o = kubectl_gpu(&[
        "install",
        "--dry-run",
        "-o",
        "yaml",
        "--set",
        "mig.strategy=mixed",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(
        docs.len(),
        24,
        "CRD, namespace, 7 controller objects, the agent's own-node admission policy and binding, 11 webhook objects, the MIG ConfigMap, the policy"
    );
    let policy = docs.last().unwrap();
    assert_eq!(policy["kind"], "ClusterPolicy");
    assert_eq!(policy["spec"]["mig"]["strategy"], "mixed");
    assert!(!out.contains('\x1b'), "no colour when not on a terminal");

    let o = kubectl_gpu(&["install", "--dry-run", "-o", "json", "-n", "gpus"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["kind"], "List");
    assert!(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == "gpus")
    );
}

#[test]
fn bad_values_say_what_and_how() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["install", "--dry-run", "--set", "driver.enabeld=false"],
            "driver.enabeld: unknown key",
        ),
        (
            &["install", "--dry-run", "--set", "mig.strategy=both"],
            "mig.strategy: \"both\" is not one of",
        ),
        (
            &["install", "--dry-run", "--set", "driver.enabled"],
            "has no '='",
        ),
        (
            &["install", "--dry-run", "-f", "/nonexistent/values.yaml"],
            "cannot read values file",
        ),
        (
            &["install", "--dry-run", "--version", "not a tag"],
            "is not an image tag",
        ),
        (&["install", "--timeout", "5 parsecs"], "is not a duration"),
    ];
    for (args, expected) in cases {
        let o = kubectl_gpu(args);
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn no_cluster_is_a_clear_error() {
    let o = kubectl_gpu(&["status"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("kubeconfig"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let o = kubectl_gpu(&["mig", "set", "all 1g", "--nodes", "x=y"]);
    let (_, err) = text(&o);
    assert!(err.contains("cannot be a label value"), "{err}");
}

#[test]
fn version_and_completion_work_offline() {
    let o = kubectl_gpu(&["version", "--client"]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(
        out.contains(concat!("kubectl-gpu  v", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );

    let o = kubectl_gpu(&["version"]);
    let (out, _) = text(&o);
    assert!(o.status.success(), "version still prints the plugin's");
    assert!(out.contains("unreachable"), "{out}");

    for shell in ["bash", "zsh", "fish"] {
        let o = kubectl_gpu(&["completion", shell]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{shell}: {err}");
        assert!(out.contains("install") && out.contains("doctor"), "{shell}");
    }
}
