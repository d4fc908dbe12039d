//! NVIDIA's device-plugin config file (`version: v1`): the MIG strategy, how devices are handed to
//! containers, and time-slicing. gpu-pilot reads the same files so admins' ConfigMaps carry over.
//!
//! What gpu-pilot does not do is refused, never ignored: a config asking for MPS, GPUDirect
//! Storage, resource renaming or device selection would otherwise be served as plain whole GPUs
//! while the admin believes the GPUs are shared. Every field NVIDIA defines is known here: the
//! ones gpu-pilot implements, the ones that make no difference to it (GFD's own flags, paths
//! NVIDIA's plugin needs in its own container), and the ones it refuses with what to do
//! instead. Anything else (a typo) is refused as unknown.

use std::collections::BTreeSet;
use std::path::Path;

pub use gpu_pilot_api::policy::MigStrategy;
use serde::Deserialize;

/// The most time-slicing replicas per device: more than a node runs pods (the kubelet's
/// `maxPods` is 110 by default) gains nothing, and the device list must fit a gRPC message.
pub const MAX_REPLICAS: u32 = 256;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginConfig {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub flags: Flags,
    #[serde(default)]
    pub sharing: Sharing,
    /// NVIDIA's resource renaming (`resources.gpus`/`resources.mig`): refused when set.
    #[serde(default)]
    pub resources: Option<serde_yaml::Value>,
    /// NVIDIA's IMEX channels: refused when set.
    #[serde(default)]
    pub imex: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Flags {
    #[serde(default)]
    pub mig_strategy: Option<MigStrategy>,
    #[serde(default)]
    pub plugin: PluginFlags,
    /// GPUDirect Storage and MOFED device injection: refused when true.
    #[serde(default)]
    pub gds_enabled: Option<bool>,
    #[serde(default, rename = "mofedEnabled")]
    pub mofed_enabled: Option<bool>,
    // Known to NVIDIA and no difference to gpu-pilot: the agent always fails on a broken driver
    // (its pod restarts), restarts nothing on unhealthy devices, and finds the driver root
    // through its mounts.
    #[serde(default)]
    pub fail_on_init_error: Option<bool>,
    #[serde(default)]
    pub restart_on_device_unhealthy: Option<bool>,
    #[serde(default)]
    pub nvidia_driver_root: Option<String>,
    #[serde(default)]
    pub nvidia_dev_root: Option<String>,
    /// GFD's own flags (oneshot, noTimestamp, sleepInterval, outputFile, machineTypeFile).
    #[serde(default)]
    pub gfd: Option<GfdFlags>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GfdFlags {
    #[serde(default)]
    pub oneshot: Option<bool>,
    #[serde(default)]
    pub no_timestamp: Option<bool>,
    #[serde(default)]
    pub sleep_interval: Option<serde_yaml::Value>,
    #[serde(default)]
    pub output_file: Option<String>,
    #[serde(default)]
    pub machine_type_file: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginFlags {
    /// `envvar`, `cdi-cri` (a string or a list of them, as NVIDIA accepts).
    #[serde(default)]
    pub device_list_strategy: Option<OneOrMany>,
    /// `uuid` only: gpu-pilot hands out devices by UUID.
    #[serde(default, rename = "deviceIDStrategy")]
    pub device_id_strategy: Option<String>,
    /// Device nodes passed by the plugin itself: refused when true (the runtime does it).
    #[serde(default)]
    pub pass_device_specs: Option<bool>,
    // Paths and names NVIDIA's plugin uses inside its own container; gpu-pilot's agent does not.
    #[serde(default)]
    pub cdi_annotation_prefix: Option<String>,
    #[serde(default, rename = "nvidiaCTKPath")]
    pub nvidia_ctk_path: Option<String>,
    #[serde(default)]
    pub container_driver_root: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sharing {
    #[serde(default)]
    pub time_slicing: Option<TimeSlicing>,
    /// NVIDIA's MPS sharing: refused until gpu-pilot supports it.
    #[serde(default)]
    pub mps: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeSlicing {
    /// NVIDIA defines only the empty strategy.
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub rename_by_default: bool,
    #[serde(default)]
    pub fail_requests_greater_than_one: bool,
    #[serde(default)]
    pub resources: Vec<ReplicatedResource>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplicatedResource {
    pub name: String,
    pub replicas: u32,
    #[serde(default)]
    pub rename: Option<String>,
    /// `all` only: selecting which devices to share is refused.
    #[serde(default)]
    pub devices: Option<serde_yaml::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading device-plugin config {path}: {message}")]
    Read { path: String, message: String },
    #[error(
        "device-plugin config {path} is not NVIDIA's `version: v1` format: {message}. \
         See https://github.com/NVIDIA/k8s-device-plugin#configuring-the-device-plugin"
    )]
    Parse { path: String, message: String },
    #[error(
        "device-plugin config {path} is refused: {message}. The node offers no GPUs until the config is fixed"
    )]
    Unsupported { path: String, message: String },
    #[error(
        "the node's label nvidia.com/device-plugin.config asks for config '{wanted}', but {dir} has \
         only: {have}. Add it to the device-plugin ConfigMap or fix the label"
    )]
    UnknownName {
        wanted: String,
        dir: String,
        have: String,
    },
}

impl PluginConfig {
    pub fn parse(text: &str, path: &str) -> Result<PluginConfig, ConfigError> {
        let cfg: PluginConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        if cfg.version != "v1" {
            return Err(ConfigError::Parse {
                path: path.into(),
                message: format!("version is '{}', expected 'v1'", cfg.version),
            });
        }
        cfg.refuse_unsupported()
            .map_err(|message| ConfigError::Unsupported {
                path: path.into(),
                message,
            })?;
        Ok(cfg)
    }

    /// What NVIDIA's format allows and gpu-pilot does not do, said with what to do instead.
    fn refuse_unsupported(&self) -> Result<(), String> {
        if self.sharing.mps.is_some() {
            return Err(
                "sharing.mps asks for MPS, which gpu-pilot does not support yet; \
                 share GPUs with sharing.timeSlicing instead, or use NVIDIA's device plugin for MPS"
                    .into(),
            );
        }
        if self.resources.is_some() {
            return Err("resources (renaming GPUs or MIG devices by pattern) is not supported; \
                 remove it, or rename a time-sliced resource with sharing.timeSlicing.resources[].rename"
                .into());
        }
        if self.imex.is_some() {
            return Err("imex (IMEX channels) is not supported; remove it".into());
        }
        if self.flags.gds_enabled == Some(true) || self.flags.mofed_enabled == Some(true) {
            return Err("gdsEnabled and mofedEnabled (GPUDirect Storage, MOFED devices) are not supported; set them to false or remove them".into());
        }
        let plugin = &self.flags.plugin;
        if let Some(id) = plugin
            .device_id_strategy
            .as_deref()
            .filter(|s| *s != "uuid")
        {
            return Err(format!(
                "flags.plugin.deviceIDStrategy {id:?} is not supported: gpu-pilot hands out devices by uuid; remove it or set it to uuid"
            ));
        }
        if plugin.pass_device_specs == Some(true) {
            return Err("flags.plugin.passDeviceSpecs: true is not supported (the container runtime passes the device nodes); remove it".into());
        }
        for s in self.device_list_names() {
            if !["envvar", "cdi-cri"].contains(&s.as_str()) {
                return Err(format!(
                    "flags.plugin.deviceListStrategy {s:?} is not supported; use envvar or cdi-cri"
                ));
            }
        }
        let Some(ts) = &self.sharing.time_slicing else {
            return Ok(());
        };
        if let Some(st) = ts.strategy.as_deref().filter(|s| !s.is_empty()) {
            return Err(format!(
                "sharing.timeSlicing.strategy {st:?} is unknown (NVIDIA defines none yet); remove it"
            ));
        }
        for r in &ts.resources {
            if !(1..=MAX_REPLICAS).contains(&r.replicas) {
                return Err(format!(
                    "resource {} has {} replicas; use 1 to {MAX_REPLICAS}",
                    r.name, r.replicas
                ));
            }
            match &r.devices {
                None => {}
                Some(serde_yaml::Value::String(s)) if s == "all" => {}
                Some(other) => {
                    return Err(format!(
                        "resource {}: devices {} selects which devices to share, which gpu-pilot does not support; remove devices (all devices are shared)",
                        r.name,
                        serde_yaml::to_string(other).unwrap_or_default().trim()
                    ));
                }
            }
        }
        Ok(())
    }

    fn device_list_names(&self) -> Vec<String> {
        match &self.flags.plugin.device_list_strategy {
            None => vec!["envvar".into()],
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        }
    }

    /// Loads the config to use: `source` is a file, or a folder of them (a mounted ConfigMap, one
    /// key per config) from which `name` (the node's label) or `default_name` picks one.
    pub fn load(
        source: &Path,
        name: Option<&str>,
        default_name: Option<&str>,
    ) -> Result<PluginConfig, ConfigError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                path: p.display().to_string(),
                message: e.to_string(),
            })
        };
        if !source.is_dir() {
            return PluginConfig::parse(&read(source)?, &source.display().to_string());
        }
        let mut have = BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(source) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !n.starts_with('.') {
                    have.insert(n);
                }
            }
        }
        let wanted = name.or(default_name).map(str::to_string).or_else(|| {
            // A ConfigMap with exactly one key needs no name.
            (have.len() == 1).then(|| have.iter().next().cloned().unwrap_or_default())
        });
        let Some(wanted) = wanted else {
            return Ok(PluginConfig::default());
        };
        let path = [
            wanted.clone(),
            format!("{wanted}.yaml"),
            format!("{wanted}.yml"),
        ]
        .into_iter()
        .map(|n| source.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| ConfigError::UnknownName {
            wanted: wanted.clone(),
            dir: source.display().to_string(),
            have: have.iter().cloned().collect::<Vec<_>>().join(", "),
        })?;
        PluginConfig::parse(&read(&path)?, &path.display().to_string())
    }

    pub fn mig_strategy(&self) -> MigStrategy {
        // NVIDIA's device plugin exposes no MIG devices unless its config says otherwise (the
        // policy's own default, `single`, reaches the plugin as --mig-strategy).
        self.flags.mig_strategy.unwrap_or(MigStrategy::None)
    }

    /// Whether containers get CDI device names (`cdi-cri`), the env var (`envvar`), or both.
    pub fn device_list(&self) -> (bool, bool) {
        let list = self.device_list_names();
        (
            list.iter().any(|s| s == "envvar"),
            list.iter().any(|s| s == "cdi-cri"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nvidias_time_slicing_example() {
        let cfg = PluginConfig::parse(
            r#"
version: v1
flags:
  migStrategy: mixed
sharing:
  timeSlicing:
    renameByDefault: true
    failRequestsGreaterThanOne: true
    resources:
    - name: nvidia.com/gpu
      replicas: 4
"#,
            "x",
        )
        .unwrap();
        assert_eq!(cfg.mig_strategy(), MigStrategy::Mixed);
        let ts = cfg.sharing.time_slicing.unwrap();
        assert!(ts.rename_by_default && ts.fail_requests_greater_than_one);
        assert_eq!(ts.resources[0].replicas, 4);
    }

    #[test]
    fn picks_the_labelled_config_from_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a"),
            "version: v1\nflags: {migStrategy: single}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b"),
            "version: v1\nflags: {migStrategy: mixed}\n",
        )
        .unwrap();
        let b = PluginConfig::load(dir.path(), Some("b"), Some("a")).unwrap();
        assert_eq!(b.mig_strategy(), MigStrategy::Mixed);
        let a = PluginConfig::load(dir.path(), None, Some("a")).unwrap();
        assert_eq!(a.mig_strategy(), MigStrategy::Single);
        let e = PluginConfig::load(dir.path(), Some("c"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has only: a, b"), "{e}");
    }

    #[test]
    fn nvidias_mps_example_is_refused_until_mps_is_supported() {
        // NVIDIA's own example (k8s-device-plugin README): once accepted, and the node went on
        // advertising whole GPUs.
        let mps = "version: v1\nsharing:\n  mps:\n    resources:\n    - name: nvidia.com/gpu\n      replicas: 10\n";
        let e = PluginConfig::parse(mps, "cm/any").unwrap_err().to_string();
        assert!(
            e.contains("sharing.mps asks for MPS, which gpu-pilot does not support yet"),
            "{e}"
        );
        assert!(
            e.contains("cm/any") && e.contains("offers no GPUs until"),
            "{e}"
        );
    }

    #[test]
    fn what_is_not_understood_is_refused_with_the_field() {
        for (text, want) in [
            (
                "version: v1\nflags: {migStrategy: mixed, migStratgy: none}\n",
                "unknown field `migStratgy`",
            ),
            (
                "version: v1\nsharing: {timeSlice: {}}\n",
                "unknown field `timeSlice`",
            ),
            (
                "version: v1\nresources: {gpus: [{pattern: '*', name: gpu}]}\n",
                "resources (renaming",
            ),
            (
                "version: v1\nflags: {gdsEnabled: true}\n",
                "GPUDirect Storage",
            ),
            (
                "version: v1\nflags: {plugin: {deviceIDStrategy: index}}\n",
                "deviceIDStrategy \"index\"",
            ),
            (
                "version: v1\nflags: {plugin: {deviceListStrategy: volume-mounts}}\n",
                "\"volume-mounts\" is not supported",
            ),
            (
                "version: v1\nsharing: {timeSlicing: {strategy: packed, resources: [{name: nvidia.com/gpu, replicas: 2}]}}\n",
                "strategy \"packed\"",
            ),
            (
                "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 2, devices: [0, 1]}]}}\n",
                "selects which devices",
            ),
            (
                "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 4294967295}]}}\n",
                "use 1 to 256",
            ),
            (
                "version: v1\nsharing: {timeSlicing: {resources: [{name: nvidia.com/gpu, replicas: 0}]}}\n",
                "use 1 to 256",
            ),
            ("version: v1\nimex: {channelIDs: [0]}\n", "IMEX"),
        ] {
            let e = PluginConfig::parse(text, "x").unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        // NVIDIA's fields that make no difference to gpu-pilot are read and left alone.
        let fine = "version: v1\nflags:\n  failOnInitError: true\n  nvidiaDriverRoot: /run/nvidia/driver\n  gdsEnabled: false\n  plugin: {passDeviceSpecs: false, deviceIDStrategy: uuid, deviceListStrategy: [envvar, cdi-cri]}\n  gfd: {oneshot: false, sleepInterval: 60s}\nsharing:\n  timeSlicing:\n    resources:\n    - {name: nvidia.com/gpu, replicas: 256, devices: all}\n";
        let cfg = PluginConfig::parse(fine, "x").unwrap();
        assert_eq!(cfg.device_list(), (true, true));
    }

    #[test]
    fn wrong_version_is_refused() {
        assert!(PluginConfig::parse("version: v2\n", "x").is_err());
        assert!(PluginConfig::parse("flags: {}\n", "x").is_err());
    }
}
