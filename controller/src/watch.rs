//! The watch tasks: each folds one kind's events into the shared index and wakes the reconciler.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use gpu_pilot_core::index::{Index, Indexed};
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

pub type SharedIndex = Arc<Mutex<Index>>;

/// Runs one watch forever, folding its events into the index and waking the reconciler. After an
/// error the watch is retried with kube-runtime's default backoff (0.8 s doubling to 30 s, with
/// jitter), as the webhook's watches are.
pub async fn run_watch<K: Indexed>(
    api: Api<K>,
    config: watcher::Config,
    index: SharedIndex,
    wake: Arc<Notify>,
) {
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                if index.lock().unwrap().fold(ev) {
                    wake.notify_one();
                }
            }
            // Said every time, so a missing RBAC rule is visible; the backoff paces the retries.
            Err(e) => tracing::warn!(kind = K::KIND, error = %e, "watch failed, retrying"),
        }
    }
}
