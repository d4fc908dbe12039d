//! End-to-end tests against a real local control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok). One cluster serves the whole run; it is torn
//! down when the run ends, whatever the outcome.

mod agent;
mod controller;
mod doctor;
mod faults;
mod foundation;
mod hardening;
mod helm;
mod migrate;
mod nvidia;
mod plugin;
mod realnode;
mod webhook;
mod webhook_abuse;
mod webhook_reinvocation;
mod webhook_tls;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use gpu_pilot_e2e::Cluster;
use libtest_mimic::{Arguments, Failed, Trial};

type TestFn = fn(Arc<Cluster>) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Tests too long for every run (a 1,000-node cluster of their own, about half an hour on two
/// cores): listed as `ignored` in a normal run, run with
/// `cargo test -p gpu-pilot-e2e --test e2e -- --ignored faults::`.
fn is_long(name: &str) -> bool {
    name.starts_with("faults::")
}

/// Every end-to-end test, by name.
fn tests() -> Vec<(&'static str, TestFn)> {
    let mut all = Vec::new();
    all.extend(foundation::tests());
    all.extend(controller::tests());
    all.extend(agent::tests());
    all.extend(webhook::tests());
    all.extend(helm::tests());
    all.extend(nvidia::tests());
    all.extend(migrate::tests());
    all.extend(plugin::tests());
    all.extend(doctor::tests());
    all.extend(hardening::tests());
    all.extend(faults::tests());
    all.extend(realnode::tests());
    all
}

fn main() {
    let args = Arguments::from_args();
    let wanted: Vec<(&str, TestFn)> = tests()
        .into_iter()
        .filter(|(name, _)| args.filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    if args.list || wanted.is_empty() {
        // Nothing to run: do not start a cluster just to list names.
        let trials = tests()
            .into_iter()
            .map(|(name, _)| Trial::test(name, || Ok(())).with_ignored_flag(is_long(name)))
            .collect();
        libtest_mimic::run(&args, trials).exit();
    }

    let cluster = match Cluster::start() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("e2e: could not start the local control plane:\n{e:#}");
            std::process::exit(101);
        }
    };
    let trials = tests()
        .into_iter()
        .map(|(name, f)| {
            let cluster = cluster.clone();
            Trial::test(name, move || run_one(cluster, f)).with_ignored_flag(is_long(name))
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // The trials (and their handles on the clusters) are gone; this stops the control planes.
    gpu_pilot_e2e::serial::shutdown();
    faults::shutdown();
    realnode::shutdown();
    drop(cluster);
    conclusion.exit();
}

fn run_one(cluster: Arc<Cluster>, f: TestFn) -> Result<(), Failed> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed::from(format!("tokio runtime: {e}")))?;
    rt.block_on(f(cluster))
        .map_err(|e| Failed::from(format!("{e:#}")))
}
