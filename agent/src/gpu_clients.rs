//! The host services that hold GPUs and must stop while the MIG layout changes: mig-parted's
//! `clients.yaml` (NVIDIA's `migManager.gpuClientsConfig`), e.g.
//!
//! ```yaml
//! version: v1
//! systemd-services:
//!   - nvsm.service
//!   - dcgm.service
//! ```
//!
//! Only the services that are running are stopped, and exactly those are started again after the
//! change, whether it worked or not (as NVIDIA's MIG manager does).

use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GpuClients {
    pub version: String,
    #[serde(default)]
    pub systemd_services: Vec<String>,
}

/// Parse `clients.yaml`; the error says what is wrong with it.
pub fn parse(text: &str) -> Result<GpuClients, String> {
    let c: GpuClients = serde_yaml::from_str(text)
        .map_err(|e| format!("the GPU clients file is not mig-parted's clients.yaml: {e}"))?;
    if c.version != "v1" {
        return Err(format!(
            "the GPU clients file has version {:?}; mig-parted's format is version: v1",
            c.version
        ));
    }
    if let Some(bad) = c
        .systemd_services
        .iter()
        .find(|s| s.is_empty() || s.contains(|ch: char| ch.is_whitespace() || ch == '/'))
    {
        return Err(format!(
            "the GPU clients file names {bad:?}, which is not a systemd unit name"
        ));
    }
    Ok(c)
}

/// The host's service manager.
pub trait Services {
    fn is_active(&self, service: &str) -> Result<bool, String>;
    fn stop(&self, service: &str) -> Result<(), String>;
    fn start(&self, service: &str) -> Result<(), String>;
}

/// `systemctl` on the host, through `chroot <host root>` (the MIG manager's pod mounts the host's
/// root; `hostPID` lets systemctl reach the host's systemd). `command` replaces
/// `chroot <root> systemctl` (tests point it at a script).
#[derive(Debug, Clone)]
pub struct Systemctl {
    pub command: Vec<String>,
}

impl Systemctl {
    pub fn on_host(host_root: PathBuf) -> Systemctl {
        Systemctl {
            command: vec![
                "chroot".into(),
                host_root.to_string_lossy().into_owned(),
                "systemctl".into(),
            ],
        }
    }

    fn run(&self, verb: &str, service: &str) -> Result<std::process::Output, String> {
        let (program, args) = self
            .command
            .split_first()
            .ok_or("no systemctl command configured")?;
        Command::new(program)
            .args(args)
            .args([verb, service])
            .output()
            .map_err(|e| format!("could not run {program} {verb} {service}: {e}"))
    }
}

impl Services for Systemctl {
    fn is_active(&self, service: &str) -> Result<bool, String> {
        // `systemctl is-active` exits 0 only for an active unit.
        Ok(self.run("is-active", service)?.status.success())
    }

    fn stop(&self, service: &str) -> Result<(), String> {
        let out = self.run("stop", service)?;
        out.status.success().then_some(()).ok_or_else(|| {
            format!(
                "systemctl stop {service} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }

    fn start(&self, service: &str) -> Result<(), String> {
        let out = self.run("start", service)?;
        out.status.success().then_some(()).ok_or_else(|| {
            format!(
                "systemctl start {service} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    }
}

/// Stop the listed services that run; returns those it stopped. If one cannot be stopped, the
/// ones already stopped are started again and the error says which failed.
pub fn stop_running(services: &dyn Services, clients: &GpuClients) -> Result<Vec<String>, String> {
    let mut stopped = Vec::new();
    for s in &clients.systemd_services {
        let result = services.is_active(s).and_then(|active| {
            if active {
                services.stop(s).map(|_| true)
            } else {
                Ok(false)
            }
        });
        match result {
            Ok(true) => stopped.push(s.clone()),
            Ok(false) => {}
            Err(e) => {
                let restart = start_again(services, &stopped);
                return Err(if restart.is_empty() {
                    e
                } else {
                    format!(
                        "{e}; and starting again what was stopped: {}",
                        restart.join("; ")
                    )
                });
            }
        }
    }
    Ok(stopped)
}

/// Start what [`stop_running`] stopped, in reverse order; the errors, if any.
pub fn start_again(services: &dyn Services, stopped: &[String]) -> Vec<String> {
    stopped
        .iter()
        .rev()
        .filter_map(|s| services.start(s).err())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use super::*;

    /// The host's services as a set, recording every call.
    struct Host {
        active: RefCell<BTreeSet<String>>,
        broken: Option<&'static str>,
        calls: RefCell<Vec<String>>,
    }

    impl Host {
        fn new(active: &[&str]) -> Host {
            Host {
                active: RefCell::new(active.iter().map(|s| s.to_string()).collect()),
                broken: None,
                calls: RefCell::new(Vec::new()),
            }
        }
    }

    impl Services for Host {
        fn is_active(&self, s: &str) -> Result<bool, String> {
            Ok(self.active.borrow().contains(s))
        }
        fn stop(&self, s: &str) -> Result<(), String> {
            self.calls.borrow_mut().push(format!("stop {s}"));
            if self.broken == Some(s) {
                return Err(format!("{s} refused to stop"));
            }
            self.active.borrow_mut().remove(s);
            Ok(())
        }
        fn start(&self, s: &str) -> Result<(), String> {
            self.calls.borrow_mut().push(format!("start {s}"));
            self.active.borrow_mut().insert(s.to_string());
            Ok(())
        }
    }

    const CLIENTS: &str = "version: v1\nsystemd-services:\n  - nvsm.service\n  - dcgm.service\n  - nvidia-persistenced.service\n";

    #[test]
    fn only_running_services_stop_and_exactly_those_start_again() {
        let clients = parse(CLIENTS).unwrap();
        let host = Host::new(&[
            "nvsm.service",
            "nvidia-persistenced.service",
            "sshd.service",
        ]);
        let stopped = stop_running(&host, &clients).unwrap();
        assert_eq!(stopped, ["nvsm.service", "nvidia-persistenced.service"]);
        assert_eq!(
            *host.active.borrow(),
            BTreeSet::from(["sshd.service".to_string()])
        );
        assert!(start_again(&host, &stopped).is_empty());
        assert_eq!(
            host.active.borrow().len(),
            3,
            "dcgm was not running and stays so"
        );
        assert_eq!(
            host.calls.borrow().last().map(String::as_str),
            Some("start nvsm.service")
        );
    }

    #[test]
    fn a_service_that_will_not_stop_restarts_the_others_and_says_which() {
        let clients = parse(CLIENTS).unwrap();
        let mut host = Host::new(&["nvsm.service", "dcgm.service"]);
        host.broken = Some("dcgm.service");
        let e = stop_running(&host, &clients).unwrap_err();
        assert!(e.contains("dcgm.service refused to stop"), "{e}");
        assert!(
            host.active.borrow().contains("nvsm.service"),
            "started again"
        );
    }

    #[test]
    fn bad_files_are_refused_naming_the_problem() {
        assert!(parse("version: v2\n").unwrap_err().contains("version: v1"));
        assert!(
            parse("version: v1\nsystemd-services: [\"a b\"]\n")
                .unwrap_err()
                .contains("\"a b\"")
        );
        assert!(
            parse("version: v1\nservices: []\n")
                .unwrap_err()
                .contains("clients.yaml")
        );
        assert_eq!(parse("version: v1\n").unwrap().systemd_services.len(), 0);
    }

    #[test]
    fn systemctl_runs_the_configured_command() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let script = dir.path().join("systemctl");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"$@\" >> {}\n[ \"$1\" = is-active ] && [ \"$2\" = up.service ] && exit 0\n[ \"$1\" = is-active ] && exit 3\nexit 0\n",
                log.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = Systemctl {
            command: vec![script.to_string_lossy().into_owned()],
        };
        let clients = parse("version: v1\nsystemd-services: [up.service, down.service]\n").unwrap();
        let stopped = stop_running(&s, &clients).unwrap();
        assert_eq!(stopped, ["up.service"]);
        assert!(start_again(&s, &stopped).is_empty());
        let calls = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            [
                "is-active up.service",
                "stop up.service",
                "is-active down.service",
                "start up.service"
            ]
        );
        assert_eq!(
            Systemctl::on_host("/host".into()).command,
            ["chroot", "/host", "systemctl"]
        );
    }
}
