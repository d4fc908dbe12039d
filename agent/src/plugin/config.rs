//! NVIDIA's device-plugin config file (`version: v1`): the MIG strategy, how devices are handed to
//! containers, and time-slicing. gpu-pilot reads the same files so admins' ConfigMaps carry over.

use std::collections::BTreeSet;
use std::path::Path;

pub use gpu_pilot_api::policy::MigStrategy;
use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConfig {
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub flags: Flags,
    #[serde(default)]
    pub sharing: Sharing,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Flags {
    #[serde(default)]
    pub mig_strategy: Option<MigStrategy>,
    #[serde(default)]
    pub plugin: PluginFlags,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginFlags {
    /// `envvar`, `cdi-cri` (a string or a list of them, as NVIDIA accepts).
    #[serde(default)]
    pub device_list_strategy: Option<OneOrMany>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sharing {
    #[serde(default)]
    pub time_slicing: Option<TimeSlicing>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimeSlicing {
    #[serde(default)]
    pub rename_by_default: bool,
    #[serde(default)]
    pub fail_requests_greater_than_one: bool,
    #[serde(default)]
    pub resources: Vec<ReplicatedResource>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedResource {
    pub name: String,
    pub replicas: u32,
    #[serde(default)]
    pub rename: Option<String>,
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
        for r in cfg.sharing.time_slicing.iter().flat_map(|t| &t.resources) {
            if r.replicas < 1 {
                return Err(ConfigError::Parse {
                    path: path.into(),
                    message: format!(
                        "resource {} has {} replicas; use 1 or more",
                        r.name, r.replicas
                    ),
                });
            }
        }
        Ok(cfg)
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
        let list: Vec<String> = match &self.flags.plugin.device_list_strategy {
            None => vec!["envvar".into()],
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
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
    fn wrong_version_is_refused() {
        assert!(PluginConfig::parse("version: v2\n", "x").is_err());
        assert!(PluginConfig::parse("flags: {}\n", "x").is_err());
    }
}
