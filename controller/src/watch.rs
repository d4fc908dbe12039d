//! The watch tasks: each folds one kind's events into the shared index and wakes the reconciler.

use std::sync::Arc;

use futures::StreamExt;
use gpu_pilot_core::index::{Index, Indexed};
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

/// The index the watches fill and the passes read. parking_lot's mutex does not poison: no
/// code path panics while holding it, and if one ever did, the next lock would still work
/// instead of wedging every watch and pass behind a poisoned lock.
pub type SharedIndex = Arc<parking_lot::Mutex<Index>>;

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
                if index.lock().fold(ev) {
                    wake.notify_one();
                }
            }
            // Said every time, so a missing RBAC rule is visible; the backoff paces the retries.
            Err(e) => tracing::warn!(kind = K::KIND, error = %e, "watch failed, retrying"),
        }
    }
}
