//! Helm's record of a release: the Secret `sh.helm.release.v1.<release>.v<revision>` (Helm's
//! default storage) or a ConfigMap of the same name (`--storage configmap`), labelled
//! `owner=helm`. Its `release` entry is the release as JSON, gzipped, base64-encoded (and, in a
//! Secret, base64-encoded once more by Kubernetes, which the client has already undone).

use std::io::Read;

use base64::Engine;
use serde_json::Value;

/// What migrate needs of a release.
#[derive(Debug, Clone, PartialEq)]
pub struct HelmRelease {
    pub name: String,
    pub namespace: String,
    pub revision: i64,
    pub chart: String,
    pub chart_version: String,
    /// The values the admin gave (`-f`, `--set`): Helm's `config`.
    pub user_values: Value,
    /// The chart's own values.yaml: Helm's `chart.values`.
    pub chart_values: Value,
}

impl HelmRelease {
    /// The values the release was rendered with: the chart's defaults under the admin's.
    pub fn effective_values(&self) -> Value {
        let mut v = self.chart_values.clone();
        gpu_pilot_core::values::merge(&mut v, self.user_values.clone());
        v
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("its release entry is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("its release entry is not gzip: {0}")]
    Gzip(#[from] std::io::Error),
    #[error("its release entry is not Helm's release JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Decode a release entry (the bytes of the Secret's or ConfigMap's `release` key).
pub fn decode(entry: &[u8]) -> Result<HelmRelease, ReleaseError> {
    let trimmed: Vec<u8> = entry
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let raw = base64::engine::general_purpose::STANDARD.decode(trimmed)?;
    // Helm gzips releases since v3.0; it reads plain JSON too.
    let json = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out)?;
        out
    } else {
        raw
    };
    let v: Value = serde_json::from_slice(&json)?;
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    Ok(HelmRelease {
        name: s("/name"),
        namespace: s("/namespace"),
        revision: v["version"].as_i64().unwrap_or(0),
        chart: s("/chart/metadata/name"),
        chart_version: s("/chart/metadata/version"),
        user_values: object_or_empty(&v["config"]),
        chart_values: object_or_empty(&v["chart"]["values"]),
    })
}

fn object_or_empty(v: &Value) -> Value {
    if v.is_object() {
        v.clone()
    } else {
        Value::Object(Default::default())
    }
}

/// Encode a release entry as Helm does (for tests).
pub fn encode(release: &Value) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, release.to_string().as_bytes()).expect("writes to memory");
    let zipped = gz.finish().expect("writes to memory");
    base64::engine::general_purpose::STANDARD
        .encode(zipped)
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_release_round_trips_and_merges_values_as_helm_does() {
        let release = json!({
            "name": "gpu-operator", "namespace": "gpu-operator", "version": 3,
            "chart": {"metadata": {"name": "gpu-operator", "version": "v25.3.4"},
                      "values": {"driver": {"enabled": true, "version": "580"}, "mig": {"strategy": "single"}}},
            "config": {"driver": {"version": "570"}, "mig": {"strategy": "mixed"}},
        });
        let r = decode(&encode(&release)).unwrap();
        assert_eq!(
            (r.name.as_str(), r.revision, r.chart.as_str()),
            ("gpu-operator", 3, "gpu-operator")
        );
        assert_eq!(
            r.effective_values(),
            json!({"driver": {"enabled": true, "version": "570"}, "mig": {"strategy": "mixed"}})
        );
    }

    #[test]
    fn plain_json_releases_and_garbage() {
        let plain =
            base64::engine::general_purpose::STANDARD.encode(r#"{"name":"x","config":null}"#);
        let r = decode(plain.as_bytes()).unwrap();
        assert_eq!(r.name, "x");
        assert_eq!(r.user_values, json!({}));
        assert!(matches!(decode(b"%%%"), Err(ReleaseError::Base64(_))));
        let not_json = base64::engine::general_purpose::STANDARD.encode("nope");
        assert!(matches!(
            decode(not_json.as_bytes()),
            Err(ReleaseError::Json(_))
        ));
    }
}
