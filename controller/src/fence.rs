//! The write fence: a replica writes only while it holds the leader Lease, and a pass in
//! progress stops the moment that ends.
//!
//! kube-lease-manager's channel says when this replica won or lost the Lease, but while the
//! apiserver cannot be reached it keeps saying "leader" long after the Lease expired and another
//! replica may have taken it over. So the fence also watches the Lease itself and closes, by
//! this replica's own clock, `grace` before the last renewal it saw expires: a replica that
//! cannot renew stops writing before anyone else may start.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

/// Whether this replica may write now; cheap to clone and to check.
#[derive(Clone)]
pub struct Fence {
    open: watch::Receiver<bool>,
}

/// A write was about to be sent after leadership ended.
#[derive(Debug, thiserror::Error)]
#[error("this replica no longer holds the leader Lease; its pass stopped before the next write")]
pub struct Fenced;

impl Fence {
    /// A fence that is always open (no leader election: a single replica).
    pub fn always_open() -> Fence {
        let (tx, rx) = watch::channel(true);
        // Nothing ever closes it; keep the sender alive with the receiver.
        std::mem::forget(tx);
        Fence { open: rx }
    }

    /// A fence fed by a sender the caller drives (tests, and [`Fence::leased`]).
    pub fn new(open: watch::Receiver<bool>) -> Fence {
        Fence { open }
    }

    /// A receiver that sees the fence open and close.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.open.clone()
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// `Err(Fenced)` unless this replica may write now. Checked before every write.
    pub fn check(&self) -> Result<(), Fenced> {
        if self.is_open() { Ok(()) } else { Err(Fenced) }
    }

    /// Completes once the fence is closed (at once if it is closed now).
    pub async fn closed(&self) {
        let mut rx = self.open.clone();
        // An error means the sender is gone: nothing can open it again, so treat it as closed.
        let _ = rx.wait_for(|open| !*open).await;
    }

    /// Completes once the fence is open.
    pub async fn opened(&self) {
        let mut rx = self.open.clone();
        let _ = rx.wait_for(|open| *open).await;
    }

    /// The fence of a replica under leader election: open while `leader` says so and the Lease
    /// `name` in `namespace` names `identity` with a renewal that has not come within `grace`
    /// of its expiry.
    pub fn leased(
        client: Client,
        namespace: &str,
        name: &str,
        identity: String,
        grace: Duration,
        mut leader: watch::Receiver<bool>,
    ) -> (Fence, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let task = tokio::spawn(async move {
            let mut leases = watcher::watcher(api, config)
                .default_backoff()
                .applied_objects()
                .boxed();
            let mut held_until: Option<SystemTime> = None;
            loop {
                let open = *leader.borrow() && held_until.is_some_and(|t| SystemTime::now() < t);
                tx.send_if_modified(|v| std::mem::replace(v, open) != open);
                // Wake when the last renewal seen runs out, so an unrenewed Lease closes the fence.
                let expires_in = held_until
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or(Duration::from_secs(3600));
                tokio::select! {
                    changed = leader.changed() => if changed.is_err() { break },
                    ev = leases.next() => match ev {
                        Some(Ok(lease)) => held_until = valid_until(&lease, &identity, grace),
                        Some(Err(e)) => tracing::warn!(error = %e, "watching the leader Lease failed, retrying"),
                        None => break,
                    },
                    _ = tokio::time::sleep(expires_in) => {}
                }
            }
            tx.send_replace(false);
        });
        (Fence { open: rx }, task)
    }
}

/// Until when the Lease lets `identity` write: its last renewal plus its duration, less `grace`;
/// `None` when someone else holds it.
pub fn valid_until(lease: &Lease, identity: &str, grace: Duration) -> Option<SystemTime> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?;
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
    let renewed = SystemTime::from(renewed.0);
    renewed.checked_add(duration)?.checked_sub(grace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use serde_json::json;

    fn lease(holder: &str, renewed: SystemTime, secs: i32) -> Lease {
        let mut l: Lease = serde_json::from_value(json!({
            "metadata": {"name": "l"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": secs}
        }))
        .unwrap();
        l.spec.as_mut().unwrap().renew_time = Some(MicroTime(
            k8s_openapi::jiff::Timestamp::try_from(renewed).unwrap(),
        ));
        l
    }

    #[test]
    fn a_lease_is_valid_until_its_renewal_runs_out_less_grace() {
        let now = SystemTime::now();
        let grace = Duration::from_secs(5);
        let l = lease("me", now, 15);
        let until = valid_until(&l, "me", grace).unwrap();
        let left = until.duration_since(now).unwrap();
        assert!(
            left <= Duration::from_secs(10) && left > Duration::from_secs(9),
            "{left:?}"
        );
        assert_eq!(valid_until(&l, "someone-else", grace), None);
        let old = lease("me", now - Duration::from_secs(60), 15);
        assert!(valid_until(&old, "me", grace).unwrap() < now);
        let negative = lease("me", now, -5);
        assert_eq!(valid_until(&negative, "me", grace), None);
    }

    #[tokio::test]
    async fn closed_completes_when_the_fence_closes() {
        let (tx, rx) = watch::channel(true);
        let fence = Fence::new(rx);
        assert!(fence.check().is_ok());
        let waiter = tokio::spawn({
            let f = fence.clone();
            async move { f.closed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        tx.send_replace(false);
        waiter.await.unwrap();
        assert!(fence.check().is_err());
    }
}
