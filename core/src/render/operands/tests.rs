use super::*;
use serde_json::json;

fn policy(spec: Value) -> ClusterPolicy {
    let mut p: ClusterPolicy = serde_json::from_value(json!({
        "apiVersion": "gpupilot.io/v1alpha1", "kind": "ClusterPolicy",
        "metadata": {"name": "cluster-policy", "uid": "0000-1111"},
        "spec": spec
    }))
    .unwrap();
    p.metadata.uid = Some("0000-1111".into());
    p
}

fn ds_of(d: &Desired, c: Component) -> &DaemonSet {
    &d.daemonsets.iter().find(|(k, _)| *k == c).unwrap().1
}

#[test]
fn default_policy_renders_every_component_gated_by_its_label() {
    let d = render(&policy(json!({})), "gpu-pilot").unwrap();
    assert_eq!(d.daemonsets.len(), Component::ALL.len());
    for (c, ds) in &d.daemonsets {
        let pod = ds.spec.template.spec.as_ref().unwrap();
        let sel = pod.node_selector.as_ref().unwrap();
        assert_eq!(
            sel.get(&label::deploy_gate(*c)).map(String::as_str),
            Some("true"),
            "{c:?}"
        );
        assert_eq!(ds.metadata.namespace.as_deref(), Some("gpu-pilot"));
        let owner = &ds.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ClusterPolicy", "0000-1111")
        );
        assert!(hash_of(&ds.metadata).is_some());
    }
    assert_eq!(d.runtime_class.handler, "nvidia");
}

#[test]
fn only_the_agents_pods_get_an_api_token() {
    // Every operand but the agent makes no API call (the validator runs privileged): no
    // token in its pods, and none by default on its ServiceAccount either.
    let d = render(&policy(json!({})), "ns").unwrap();
    let mut without = 0;
    for (c, ds) in &d.daemonsets {
        let pod = ds.spec.template.spec.as_ref().unwrap();
        let agent = pod.service_account_name.as_deref() == Some(AGENT_SERVICE_ACCOUNT);
        assert_eq!(pod.automount_service_account_token, Some(agent), "{c:?}");
        without += usize::from(!agent);
    }
    assert!(without > 0 && without < d.daemonsets.len());
    for sa in &d.service_accounts {
        let agent = sa.metadata.name.as_deref() == Some(AGENT_SERVICE_ACCOUNT);
        assert_eq!(sa.automount_service_account_token, Some(agent));
    }
}

#[test]
fn driver_is_on_delete_and_others_follow_the_policy() {
    let d = render(
        &policy(json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": "10%"}}})),
        "ns",
    )
    .unwrap();
    let strat = |c| ds_of(&d, c).spec.update_strategy.clone().unwrap();
    assert_eq!(strat(Component::Driver).type_.as_deref(), Some("OnDelete"));
    let dp = strat(Component::DevicePlugin);
    assert_eq!(dp.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        serde_json::to_value(dp.rolling_update.unwrap().max_unavailable).unwrap(),
        json!("10%")
    );
}

#[test]
fn a_plain_number_of_unavailable_nodes_is_an_integer() {
    let d = render(&policy(json!({})), "ns").unwrap();
    let ru = ds_of(&d, Component::DevicePlugin)
        .spec
        .update_strategy
        .clone()
        .unwrap()
        .rolling_update
        .unwrap();
    assert_eq!(serde_json::to_value(ru.max_unavailable).unwrap(), json!(1));
}

#[test]
fn disabled_components_render_no_daemonset() {
    let d = render(
        &policy(json!({"driver": {"enabled": false}, "toolkit": {"enabled": false}})),
        "ns",
    )
    .unwrap();
    let comps: Vec<Component> = d.daemonsets.iter().map(|(c, _)| *c).collect();
    assert!(!comps.contains(&Component::Driver));
    assert!(!comps.contains(&Component::ContainerToolkit));
    assert_eq!(comps.len(), Component::ALL.len() - 2);
    // With a host driver, operands look for it at the host root.
    let dp = ds_of(&d, Component::DevicePlugin);
    let vols = dp
        .spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap();
    let root = vols.iter().find(|v| v.name == "driver-root").unwrap();
    assert_eq!(root.host_path.as_ref().unwrap().path, "/");
}

#[test]
fn policy_fields_reach_the_pod() {
    let d = render(
        &policy(json!({
            "devicePlugin": {
                "version": "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "imagePullPolicy": "Always",
                "imagePullSecrets": ["regcred"],
                "args": ["--fail-on-init-error=false"],
                "env": [{"name": "EXTRA", "value": "1"}],
                "resources": {"limits": {"memory": "64Mi"}},
                "config": {"name": "time-slicing", "default": "any"}
            },
            "daemonsets": {"labels": {"team": "ml"}, "priorityClassName": "gpu-critical",
                           "tolerations": [{"operator": "Exists"}]},
            "mig": {"strategy": "mixed"}
        })),
        "ns",
    ).unwrap();
    let ds = ds_of(&d, Component::DevicePlugin);
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some(
            "ghcr.io/gpu-pilot/gpu-pilot-agent@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        )
    );
    assert_eq!(
        c.args.as_ref().unwrap(),
        &[
            "run",
            "--no-labels",
            "--no-mig-manager",
            "--metrics-addr",
            "0.0.0.0:9401",
            "--mig-strategy",
            "mixed",
            "--config",
            "/config",
            "--config-default",
            "any",
            "--fail-on-init-error=false"
        ]
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    let env = c.env.as_ref().unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "EXTRA" && e.value.as_deref() == Some("1"))
    );
    assert!(
        env.iter()
            .any(|e| e.name == "MIG_STRATEGY" && e.value.as_deref() == Some("mixed"))
    );
    assert!(
        c.resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .contains_key("memory")
    );
    assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
    assert_eq!(pod.priority_class_name.as_deref(), Some("gpu-critical"));
    assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
    assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"));
    let labels = ds
        .spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(labels.get("team").map(String::as_str), Some("ml"));
    let vols = pod.volumes.as_ref().unwrap();
    let cfg = vols.iter().find(|v| v.name == "config").unwrap();
    assert_eq!(cfg.config_map.as_ref().unwrap().name, "time-slicing");
}

#[test]
fn max_unavailable_past_32_bits_is_refused_not_wrapped() {
    // The CRD once admitted this; rendering it panicked inside the pass with the index
    // locked. It is an error now, whatever reaches the renderer.
    for bad in [
        "2147483648",
        "9999999999999999999999",
        "1000000000",
        "0",
        "-1",
        "+5",
        "007",
        "0%",
        "101%",
        "1.5",
        "",
        "%",
    ] {
        let p = policy(json!({"daemonsets": {"rollingUpdate": {"maxUnavailable": bad}}}));
        let e = render(&p, "ns").unwrap_err();
        assert!(
            matches!(&e, RenderError::MaxUnavailable(v) if v == bad),
            "{bad}: {e}"
        );
        assert!(e.to_string().contains("from 1 to 999999999"), "{e}");
    }
    assert_eq!(max_unavailable("999999999"), Ok(json!(999_999_999)));
    assert_eq!(max_unavailable("100%"), Ok(json!("100%")));
    assert_eq!(max_unavailable("1%"), Ok(json!("1%")));
}

#[test]
fn hash_changes_with_the_policy_and_only_then() {
    let a = render(&policy(json!({})), "ns").unwrap();
    let b = render(&policy(json!({})), "ns").unwrap();
    let c = render(
        &policy(json!({"devicePlugin": {"version": "v9.9.9"}})),
        "ns",
    )
    .unwrap();
    let h = |d: &Desired, comp| hash_of(&ds_of(d, comp).metadata).unwrap().to_string();
    assert_eq!(
        h(&a, Component::DevicePlugin),
        h(&b, Component::DevicePlugin)
    );
    assert_ne!(
        h(&a, Component::DevicePlugin),
        h(&c, Component::DevicePlugin)
    );
    assert_eq!(h(&a, Component::Driver), h(&c, Component::Driver));
}
