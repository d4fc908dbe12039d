//! `kubectl gpu version`: the plugin's version, and what runs in the cluster when it can tell.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use serde::Serialize;

use crate::cluster::Kube;
use crate::global::Global;
use crate::ui::Output;

#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// Only the plugin's version; do not contact the cluster.
    #[arg(long)]
    pub client: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Versions {
    pub plugin: String,
    pub api: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// The CRD's served versions, when it is installed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_error: Option<String>,
}

fn image_tag(d: &Deployment) -> Option<String> {
    let image = d
        .spec
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .clone()?;
    Some(match image.rsplit_once(['@', ':']) {
        Some((_, tag)) if !tag.contains('/') => tag.to_string(),
        _ => image,
    })
}

pub async fn run(g: &Global, a: VersionArgs) -> anyhow::Result<i32> {
    let mut v = Versions {
        plugin: format!("v{}", env!("CARGO_PKG_VERSION")),
        api: format!("{}/v1alpha1", gpu_pilot_api::names::GROUP),
        kubernetes: None,
        controller: None,
        webhook: None,
        crd: None,
        cluster_error: None,
    };
    if !a.client {
        match cluster_versions(g, &mut v).await {
            Ok(()) => {}
            Err(e) => v.cluster_error = Some(format!("{e:#}")),
        }
    }
    match g.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&v)?),
        Output::Table => {
            println!("kubectl-gpu  {}", v.plugin);
            println!("API          {}", v.api);
            if !a.client {
                let show = |o: &Option<String>| o.clone().unwrap_or_else(|| "not installed".into());
                if let Some(e) = &v.cluster_error {
                    println!("cluster      unreachable: {e}");
                } else {
                    println!("kubernetes   {}", show(&v.kubernetes));
                    println!("controller   {}", show(&v.controller));
                    println!("webhook      {}", show(&v.webhook));
                    println!("CRD          {}", show(&v.crd));
                }
            }
        }
    }
    Ok(0)
}

async fn cluster_versions(g: &Global, v: &mut Versions) -> anyhow::Result<()> {
    let kube = Kube::connect(g).await?;
    let (_, _, git) = crate::cluster::probe::server_version(&kube).await?;
    v.kubernetes = Some(git);
    let deploys: Api<Deployment> = Api::namespaced(kube.client.clone(), &g.namespace);
    v.controller = deploys
        .get_opt(gpu_pilot_core::render::install::CONTROLLER)
        .await?
        .as_ref()
        .and_then(image_tag);
    v.webhook = deploys
        .get_opt(gpu_pilot_api::names::webhook::NAME)
        .await?
        .as_ref()
        .and_then(image_tag);
    let crds: Api<CustomResourceDefinition> = Api::all(kube.client.clone());
    v.crd = crds.get_opt("clusterpolicies.gpupilot.io").await?.map(|c| {
        c.spec
            .versions
            .iter()
            .filter(|v| v.served)
            .map(|v| format!("{}{}", v.name, if v.storage { " (stored)" } else { "" }))
            .collect::<Vec<_>>()
            .join(", ")
    });
    Ok(())
}
