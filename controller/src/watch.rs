//! The watch tasks: each folds one kind's events into the shared index and wakes the reconciler.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use gpu_pilot_core::index::{Index, Indexed};
use kube::Api;
use kube::runtime::watcher;
use tokio::sync::Notify;

pub type SharedIndex = Arc<Mutex<Index>>;

/// Runs one watch forever, folding its events into the index and waking the reconciler.
pub async fn run_watch<K: Indexed>(
    api: Api<K>,
    config: watcher::Config,
    index: SharedIndex,
    wake: Arc<Notify>,
) {
    let mut stream = watcher::watcher(api, config).boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                if index.lock().unwrap().fold(ev) {
                    wake.notify_one();
                }
            }
            Err(e) => {
                // The watcher retries by itself; say why so a missing RBAC rule is visible.
                tracing::warn!(kind = K::KIND, error = %e, "watch failed, retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}
