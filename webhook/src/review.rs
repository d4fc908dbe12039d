//! The `admission.k8s.io/v1` AdmissionReview wire format, in and out.
//!
//! These types are written out here rather than taken from kube-core because the response must be
//! byte-exact for the apiserver: the JSON patch travels as a base64 string (kube-core 5 writes it
//! as an array of numbers, kube-rs issue 1781), `patchType` appears only with a patch, and a
//! validation answer never carries either.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// What the apiserver posts. `O` is how the objects are read: as JSON values by default, or
/// straight into their type (the pod endpoint's fast path).
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
#[serde(bound(deserialize = "O: Deserialize<'de>"))]
pub struct ReviewIn<O = Value> {
    pub api_version: String,
    pub kind: String,
    pub request: Option<Request<O>>,
}

/// Group, version and kind of the object under review.
#[derive(Deserialize, Debug, Clone, Default, PartialEq)]
pub struct Gvk {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

impl std::fmt::Display for Gvk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.group.is_empty() {
            write!(f, "{}/{}", self.version, self.kind)
        } else {
            write!(f, "{}/{}/{}", self.group, self.version, self.kind)
        }
    }
}

/// The operation being admitted.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Operation {
    Create,
    Update,
    Delete,
    Connect,
}

/// The part of the review the decision is made on.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
#[serde(bound(deserialize = "O: Deserialize<'de>"))]
pub struct Request<O = Value> {
    pub uid: String,
    pub kind: Gvk,
    pub operation: Operation,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default = "none")]
    pub object: Option<O>,
    #[serde(default = "none")]
    pub old_object: Option<O>,
    #[serde(default)]
    pub dry_run: Option<bool>,
}

fn none<O>() -> Option<O> {
    None
}

/// One RFC 6902 operation. Only the three the webhook needs.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct PatchOp {
    pub op: &'static str,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

impl PatchOp {
    pub fn add(path: impl Into<String>, value: Value) -> PatchOp {
        PatchOp {
            op: "add",
            path: path.into(),
            value: Some(value),
        }
    }
    pub fn replace(path: impl Into<String>, value: Value) -> PatchOp {
        PatchOp {
            op: "replace",
            path: path.into(),
            value: Some(value),
        }
    }
}

/// Escapes one JSON pointer segment (RFC 6901): `~` and `/` in map keys such as annotation names.
pub fn pointer_segment(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The decision of a mutating or validating rule set.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Admit, changing the object with `patch` (empty: unchanged), telling the user `warnings`.
    Allow {
        patch: Vec<PatchOp>,
        warnings: Vec<String>,
    },
    /// Refuse with a message the user sees in kubectl.
    Deny {
        code: u16,
        reason: &'static str,
        message: String,
    },
}

impl Verdict {
    pub fn allow() -> Verdict {
        Verdict::Allow {
            patch: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// A refusal because the request asks for something that conflicts with the rules.
    pub fn forbidden(message: impl Into<String>) -> Verdict {
        Verdict::Deny {
            code: 403,
            reason: "Forbidden",
            message: message.into(),
        }
    }

    /// A refusal because the request itself is not what this endpoint handles.
    pub fn invalid(message: impl Into<String>) -> Verdict {
        Verdict::Deny {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
        }
    }

    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

/// What the webhook answers.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReviewOut {
    pub api_version: String,
    pub kind: String,
    pub response: Response,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub patch_type: Option<String>,
    /// Base64 of the JSON patch document.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub patch: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub warnings: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Status {
    pub code: u16,
    pub reason: String,
    pub message: String,
}

impl ReviewOut {
    /// Wraps a verdict for the request with `uid`. A patch is attached only when non-empty.
    pub fn new(uid: &str, verdict: Verdict) -> ReviewOut {
        let response = match verdict {
            Verdict::Allow { patch, warnings } => {
                let (patch_type, patch) = if patch.is_empty() {
                    (None, None)
                } else {
                    let doc = serde_json::to_vec(&patch).expect("a JSON patch always serializes");
                    (
                        Some("JSONPatch".to_string()),
                        Some(base64::engine::general_purpose::STANDARD.encode(doc)),
                    )
                };
                Response {
                    uid: uid.to_string(),
                    allowed: true,
                    status: None,
                    patch_type,
                    patch,
                    warnings,
                }
            }
            Verdict::Deny {
                code,
                reason,
                message,
            } => Response {
                uid: uid.to_string(),
                allowed: false,
                status: Some(Status {
                    code,
                    reason: reason.to_string(),
                    message,
                }),
                patch_type: None,
                patch: None,
                warnings: Vec::new(),
            },
        };
        ReviewOut {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            response,
        }
    }

    /// The decoded JSON patch, for tests and tools.
    pub fn decoded_patch(&self) -> Option<Value> {
        let b64 = self.response.patch.as_ref()?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patch_is_base64_with_patch_type_and_uid_echoed() {
        let out = ReviewOut::new(
            "abc-123",
            Verdict::Allow {
                patch: vec![PatchOp::add("/spec/runtimeClassName", json!("nvidia"))],
                warnings: vec!["w".into()],
            },
        );
        let v = serde_json::to_value(&out).unwrap();
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(v["kind"], "AdmissionReview");
        assert_eq!(v["response"]["uid"], "abc-123");
        assert_eq!(v["response"]["allowed"], true);
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        let b64 = v["response"]["patch"].as_str().expect("patch is a string");
        let doc: Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!([{"op": "add", "path": "/spec/runtimeClassName", "value": "nvidia"}])
        );
        assert_eq!(v["response"]["warnings"], json!(["w"]));
        assert!(v["response"].get("status").is_none());
    }

    #[test]
    fn no_patch_fields_without_a_patch_or_on_denial() {
        let v = serde_json::to_value(ReviewOut::new("u", Verdict::allow())).unwrap();
        assert_eq!(v["response"], json!({"uid": "u", "allowed": true}));
        let v = serde_json::to_value(ReviewOut::new("u", Verdict::forbidden("no"))).unwrap();
        assert_eq!(
            v["response"],
            json!({"uid": "u", "allowed": false, "status": {"code": 403, "reason": "Forbidden", "message": "no"}})
        );
    }

    #[test]
    fn pointer_segments_are_escaped() {
        assert_eq!(
            pointer_segment("gpupilot.io/mig-profile"),
            "gpupilot.io~1mig-profile"
        );
        assert_eq!(pointer_segment("a~b"), "a~0b");
    }
}
