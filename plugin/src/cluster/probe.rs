//! What kind of cluster this is: its Kubernetes version, signs of NVIDIA's GPU Operator, and
//! what the caller may do. Install's preflight, the doctor and `version` share these reads.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};

use super::{Kube, explain};

/// The oldest Kubernetes gpu-pilot supports (matchConditions and CEL validation are GA).
pub const MIN_KUBERNETES: (u32, u32) = (1, 30);
/// The newest Kubernetes gpu-pilot is tested against.
pub const MAX_TESTED_KUBERNETES: (u32, u32) = (1, 37);

pub async fn can_i(
    kube: &Kube,
    verb: &str,
    group: &str,
    resource: &str,
    ns: Option<&str>,
) -> anyhow::Result<bool> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: ns.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SelfSubjectAccessReview> = Api::all(kube.client.clone());
    let r = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "checking your permissions")))?;
    Ok(r.status.map(|s| s.allowed).unwrap_or(false))
}

/// `(major, minor)` of the apiserver.
pub async fn server_version(kube: &Kube) -> anyhow::Result<(u32, u32, String)> {
    let info = kube
        .client
        .apiserver_version()
        .await
        .map_err(|e| anyhow::anyhow!(explain(&e, &kube.server, "reaching the cluster")))?;
    let digits = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
    };
    let major = digits(&info.major).parse().unwrap_or(0);
    let minor = digits(&info.minor).parse().unwrap_or(0);
    Ok((major, minor, info.git_version))
}

/// A Kubernetes version older than gpu-pilot supports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Kubernetes {major}.{minor} is older than {}.{}, the oldest gpu-pilot supports (it needs webhook matchConditions and CEL validation); upgrade the cluster",
    MIN_KUBERNETES.0,
    MIN_KUBERNETES.1
)]
pub struct TooOld {
    pub major: u32,
    pub minor: u32,
}

/// Whether a Kubernetes version is supported, and a sentence about it when not quite.
pub fn version_verdict(major: u32, minor: u32) -> Result<Option<String>, TooOld> {
    if (major, minor) < MIN_KUBERNETES {
        return Err(TooOld { major, minor });
    }
    if (major, minor) > MAX_TESTED_KUBERNETES {
        return Ok(Some(format!(
            "Kubernetes {major}.{minor} is newer than {}.{}, the newest gpu-pilot is tested on; it should work, report problems",
            MAX_TESTED_KUBERNETES.0, MAX_TESTED_KUBERNETES.1
        )));
    }
    Ok(None)
}

/// Signs of NVIDIA's GPU Operator in the cluster, as sentences.
pub async fn gpu_operator_signs(kube: &Kube) -> anyhow::Result<Vec<String>> {
    let mut signs = Vec::new();
    let crds: Api<CustomResourceDefinition> = Api::all(kube.client.clone());
    if crds
        .get_metadata_opt("clusterpolicies.nvidia.com")
        .await
        .map_err(|e| {
            anyhow::anyhow!(explain(
                &e,
                &kube.server,
                "looking for NVIDIA's GPU Operator"
            ))
        })?
        .is_some()
    {
        signs.push("the CRD clusterpolicies.nvidia.com exists".to_string());
    }
    let deploys: Api<Deployment> = Api::all(kube.client.clone());
    let lp = ListParams::default()
        .labels("app in (gpu-operator),app.kubernetes.io/component=gpu-operator");
    let found = deploys.list_metadata(&lp).await.map_err(|e| {
        anyhow::anyhow!(explain(
            &e,
            &kube.server,
            "looking for NVIDIA's GPU Operator"
        ))
    })?;
    for d in found.items {
        signs.push(format!(
            "Deployment {}/{} runs it",
            d.metadata.namespace.unwrap_or_default(),
            d.metadata.name.unwrap_or_default()
        ));
    }
    Ok(signs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_versions() {
        assert!(version_verdict(1, 29).is_err());
        assert_eq!(version_verdict(1, 37), Ok(None));
        assert!(version_verdict(1, 40).unwrap().is_some());
    }
}
