//! From request bytes to an AdmissionReview answer: parse, check it is what the endpoint handles,
//! gather the facts through a [`ClusterView`], run the pure rules, wrap the verdict.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use gpu_pilot_api::ClusterPolicy;
use gpu_pilot_api::names::GROUP;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;

use crate::inventory::MigInventory;
use crate::metrics::Outcome;
use crate::review::{self, Operation, ReviewIn, ReviewOut, Verdict};
use crate::{mutate, validate};

/// The two admission endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    MutatePods,
    ValidatePolicy,
}

impl Endpoint {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::MutatePods => "mutate_pods",
            Endpoint::ValidatePolicy => "validate_clusterpolicy",
        }
    }
}

/// Why a request got no AdmissionReview answer (answered with an HTTP 4xx instead).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(
        "the body is not a JSON AdmissionReview: {0}. The webhook takes admission.k8s.io/v1 AdmissionReview objects as the apiserver sends them"
    )]
    NotJson(String),
    #[error(
        "the body is apiVersion {api_version:?}, kind {kind:?}; this webhook answers only admission.k8s.io/v1 AdmissionReview (set admissionReviewVersions: [v1] in the webhook configuration)"
    )]
    WrongVersion { api_version: String, kind: String },
    #[error("the AdmissionReview has no request to answer; send the review the apiserver built")]
    NoRequest,
}

/// Facts could not be read from the cluster; the apiserver applies the webhook's failure policy.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FactsError(pub String);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the handler needs from the cluster. The real one reads watch caches and the API; tests
/// use a fixed one.
pub trait ClusterView: Send + Sync + 'static {
    /// The ClusterPolicy in force, if any (shared, not copied: it is read for every GPU pod).
    fn active_policy(&self) -> Option<Arc<ClusterPolicy>>;
    /// The MIG profiles the nodes offer.
    fn mig_inventory(&self) -> MigInventory;
    /// Facts for the ClusterPolicy rules. `policy_name` is excluded from `other_policies`.
    fn policy_facts<'a>(
        &'a self,
        policy_name: &'a str,
        config_maps: Vec<String>,
        with_pods: bool,
    ) -> BoxFuture<'a, Result<validate::Facts, FactsError>>;
}

/// Answers one review. `Err` means the request was unreadable (HTTP 400).
pub async fn handle(
    view: &dyn ClusterView,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<(ReviewOut, Outcome), RequestError> {
    if endpoint == Endpoint::MutatePods {
        // The hot path: the pods are read straight into their type, in one pass, with no JSON
        // value tree in between. Whatever it cannot read takes the general path below, which says
        // precisely what is wrong.
        if let Ok(ReviewIn {
            api_version,
            kind,
            request: Some(request),
        }) = serde_json::from_slice::<ReviewIn<Pod>>(body)
            && api_version == review::API_VERSION
            && kind == review::KIND
        {
            let verdict = mutate_pods(
                view,
                &request.kind,
                request.operation,
                Ok(request.object),
                Ok(request.old_object),
            );
            return Ok(answer(&request.uid, Ok(verdict)));
        }
    }
    handle_general(view, endpoint, body).await
}

/// Answers one review read as JSON values first: every endpoint, every malformed input.
async fn handle_general(
    view: &dyn ClusterView,
    endpoint: Endpoint,
    body: &[u8],
) -> Result<(ReviewOut, Outcome), RequestError> {
    let review: ReviewIn =
        serde_json::from_slice(body).map_err(|e| RequestError::NotJson(e.to_string()))?;
    if review.api_version != review::API_VERSION || review.kind != review::KIND {
        return Err(RequestError::WrongVersion {
            api_version: review.api_version,
            kind: review.kind,
        });
    }
    let request = review.request.ok_or(RequestError::NoRequest)?;
    let verdict = match endpoint {
        Endpoint::MutatePods => mutate(view, &request),
        Endpoint::ValidatePolicy => validate(view, &request).await,
    };
    Ok(answer(&request.uid, verdict))
}

/// Wraps a verdict, or the reason facts were missing, into the answer and its metric outcome.
fn answer(uid: &str, verdict: Result<Verdict, FactsError>) -> (ReviewOut, Outcome) {
    let (verdict, outcome) = match verdict {
        Ok(v) => {
            let outcome = match &v {
                Verdict::Allow { patch, .. } if patch.is_empty() => Outcome::Allowed,
                Verdict::Allow { .. } => Outcome::Patched,
                Verdict::Deny { .. } => Outcome::Denied,
            };
            (v, outcome)
        }
        Err(e) => (
            Verdict::Deny {
                code: 500,
                reason: "InternalError",
                message: format!(
                    "gpu-pilot-webhook could not read what it needs from the cluster ({e}); retry, and if it persists check the webhook's logs and RBAC"
                ),
            },
            Outcome::Error,
        ),
    };
    (ReviewOut::new(uid, verdict), outcome)
}

fn mutate(view: &dyn ClusterView, request: &review::Request) -> Result<Verdict, FactsError> {
    let read = |v: &Option<serde_json::Value>| -> Result<Option<Pod>, String> {
        match v {
            None => Ok(None),
            Some(v) => Pod::deserialize(v).map(Some).map_err(|e| e.to_string()),
        }
    };
    Ok(mutate_pods(
        view,
        &request.kind,
        request.operation,
        read(&request.object),
        read(&request.old_object),
    ))
}

/// The pod rules on pods already read (`Err`: why `object` or `oldObject` is not a Pod).
fn mutate_pods(
    view: &dyn ClusterView,
    kind: &review::Gvk,
    operation: Operation,
    object: Result<Option<Pod>, String>,
    old_object: Result<Option<Pod>, String>,
) -> Verdict {
    if !kind.group.is_empty() || kind.kind != "Pod" {
        return Verdict::invalid(format!(
            "this endpoint mutates core/v1 Pods but was sent a {kind}; the webhook configuration's rules must select only pods"
        ));
    }
    if operation == Operation::Update {
        return match (old_object, object) {
            (Ok(Some(old)), Ok(Some(new))) => mutate::keep_on_update(&old, &new),
            _ => Verdict::allow(),
        };
    }
    if operation != Operation::Create {
        return Verdict::allow();
    }
    let pod = match object {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Verdict::invalid("a CREATE review must carry the pod in request.object");
        }
        Err(e) => return Verdict::invalid(format!("request.object is not a valid Pod: {e}")),
    };
    let policy = view.active_policy();
    mutate::mutate_pod(&pod, policy.as_ref().map(|p| &p.spec), || {
        view.mig_inventory()
    })
}

async fn validate(
    view: &dyn ClusterView,
    request: &review::Request,
) -> Result<Verdict, FactsError> {
    if request.kind.group != GROUP || request.kind.kind != "ClusterPolicy" {
        return Ok(Verdict::invalid(format!(
            "this endpoint validates {GROUP} ClusterPolicies but was sent a {}; the webhook configuration's rules must select only clusterpolicies",
            request.kind
        )));
    }
    let parse =
        |v: &Option<serde_json::Value>, which: &str| -> Result<Option<ClusterPolicy>, Verdict> {
            match v {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                    Verdict::invalid(format!("request.{which} is not a valid ClusterPolicy: {e}"))
                }),
            }
        };
    let new = match parse(&request.object, "object") {
        Ok(p) => p,
        Err(v) => return Ok(v),
    };
    let old = match parse(&request.old_object, "oldObject") {
        Ok(p) => p,
        Err(v) => return Ok(v),
    };
    let name = new
        .as_ref()
        .or(old.as_ref())
        .and_then(|p| p.metadata.name.clone())
        .or_else(|| request.name.clone())
        .unwrap_or_default();
    let config_maps = new
        .as_ref()
        .map(validate::referenced_config_maps)
        .unwrap_or_default();
    let facts = view
        .policy_facts(&name, config_maps, validate::needs_pods(request.operation))
        .await?;
    Ok(validate::validate_policy(
        request.operation,
        new.as_ref(),
        old.as_ref(),
        &facts,
    ))
}

/// A view over fixed data, for tests, benchmarks and the property test.
#[derive(Default, Clone)]
pub struct StaticView {
    pub policy: Option<Arc<ClusterPolicy>>,
    pub inventory: MigInventory,
    pub facts: validate::Facts,
}

impl ClusterView for StaticView {
    fn active_policy(&self) -> Option<Arc<ClusterPolicy>> {
        self.policy.clone()
    }
    fn mig_inventory(&self) -> MigInventory {
        self.inventory.clone()
    }
    fn policy_facts<'a>(
        &'a self,
        policy_name: &'a str,
        _config_maps: Vec<String>,
        _with_pods: bool,
    ) -> BoxFuture<'a, Result<validate::Facts, FactsError>> {
        let mut facts = self.facts.clone();
        facts.other_policies.retain(|n| n != policy_name);
        Box::pin(async move { Ok(facts) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn view() -> StaticView {
        StaticView {
            policy: Some(Arc::new(
                serde_json::from_value(json!({"metadata": {"name": "cp"}, "spec": {}})).unwrap(),
            )),
            ..Default::default()
        }
    }

    fn review(kind: serde_json::Value, op: &str, object: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "kind": kind, "resource": {}, "operation": op, "object": object}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_gpu_pod_is_patched_and_the_uid_echoed() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}});
        let body = review(
            json!({"group": "", "version": "v1", "kind": "Pod"}),
            "CREATE",
            pod,
        );
        let (out, outcome) = handle(&view(), Endpoint::MutatePods, &body).await.unwrap();
        assert_eq!(out.response.uid, "u-1");
        assert_eq!(outcome, Outcome::Patched);
        assert_eq!(out.response.patch_type.as_deref(), Some("JSONPatch"));
        let patch = out.decoded_patch().unwrap();
        assert_eq!(patch.as_array().unwrap().len(), 2, "{patch}");
    }

    #[tokio::test]
    async fn wrong_kinds_and_bodies_are_refused_clearly() {
        let body = review(
            json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
            "CREATE",
            json!({}),
        );
        let (out, outcome) = handle(&view(), Endpoint::MutatePods, &body).await.unwrap();
        assert_eq!(outcome, Outcome::Denied);
        let status = out.response.status.unwrap();
        assert_eq!(status.code, 400);
        assert!(
            status.message.contains("apps/v1/Deployment"),
            "{}",
            status.message
        );

        let err = handle(&view(), Endpoint::MutatePods, b"{nope")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a JSON AdmissionReview"));
        let err = handle(
            &view(),
            Endpoint::MutatePods,
            br#"{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}"#,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("admissionReviewVersions"));
        let err = handle(
            &view(),
            Endpoint::ValidatePolicy,
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RequestError::NoRequest));
    }

    #[tokio::test]
    async fn validation_never_carries_a_patch() {
        let body = review(
            json!({"group": "gpupilot.io", "version": "v1alpha1", "kind": "ClusterPolicy"}),
            "CREATE",
            json!({"metadata": {"name": "cp"}, "spec": {}}),
        );
        let (out, outcome) = handle(&view(), Endpoint::ValidatePolicy, &body)
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Allowed);
        assert!(out.response.patch.is_none() && out.response.patch_type.is_none());
        let bad = review(
            json!({"group": "gpupilot.io", "version": "v1alpha1", "kind": "ClusterPolicy"}),
            "CREATE",
            json!({"spec": {"mig": {"strategy": 7}}}),
        );
        let (out, _) = handle(&view(), Endpoint::ValidatePolicy, &bad)
            .await
            .unwrap();
        assert!(
            out.response
                .status
                .unwrap()
                .message
                .contains("not a valid ClusterPolicy")
        );
    }

    #[tokio::test]
    async fn the_fast_pod_path_answers_as_the_general_one() {
        let gpu = json!({"metadata": {"name": "p", "annotations": {"gpupilot.io/gpu-memory": "20Gi"}}, "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}], "tolerations": [{"key": "x", "operator": "Exists"}]}});
        let plain = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        let pod_kind = json!({"group": "", "version": "v1", "kind": "Pod"});
        let mut bodies = vec![
            review(pod_kind.clone(), "CREATE", gpu.clone()),
            review(pod_kind.clone(), "CREATE", plain),
            review(pod_kind.clone(), "CREATE", json!(null)),
            review(
                pod_kind.clone(),
                "CREATE",
                json!({"spec": {"containers": 3}}),
            ),
            review(pod_kind.clone(), "DELETE", gpu.clone()),
            review(
                json!({"group": "apps", "version": "v1", "kind": "Deployment"}),
                "CREATE",
                gpu.clone(),
            ),
        ];
        let mut update: Value =
            serde_json::from_slice(&review(pod_kind, "UPDATE", gpu.clone())).unwrap();
        let mut old = gpu.clone();
        old["spec"]["tolerations"] = json!([{"key": "x", "operator": "Exists"}, {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]);
        update["request"]["oldObject"] = old;
        bodies.push(serde_json::to_vec(&update).unwrap());
        for body in bodies {
            let fast = handle(&view(), Endpoint::MutatePods, &body).await.unwrap();
            let general = handle_general(&view(), Endpoint::MutatePods, &body)
                .await
                .unwrap();
            assert_eq!(fast, general, "{}", String::from_utf8_lossy(&body));
        }
    }
}
