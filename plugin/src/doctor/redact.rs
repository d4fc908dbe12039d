//! What keeps secrets out of the support bundle: log lines and every string of every object pass
//! through [`redact`], environment values and annotation values are replaced by a marker (their
//! names stay), and arguments that follow a credential flag are hidden.
//!
//! The bundle is attached to bug reports, so it errs on the side of hiding: a value that merely
//! looks like a credential (`secretName: x` in a log line) is hidden too.

use gpu_pilot_api::names::{annotation, webhook};
use serde_json::Value;

/// What a hidden value is replaced with.
pub const REDACTED: &str = "<redacted>";

/// Words that mark the value after them as a credential (compared without case). A key matches
/// when it contains one of them, so `client_secret`, `X-Auth-Token` and `DB_PASSWORD` all do.
const KEYS: [&str; 10] = [
    "password",
    "passwd",
    "token",
    "secret",
    "apikey",
    "api_key",
    "api-key",
    "authorization",
    "credential",
    "private_key",
];

/// Annotations whose values gpu-pilot itself writes and that say nothing secret; every other
/// annotation keeps its key and loses its value (`kubectl.kubernetes.io/last-applied-configuration`
/// alone carries the whole object, env values included).
const KEPT_ANNOTATIONS: [&str; 16] = [
    annotation::MIG_PROFILE,
    annotation::GPU_MEMORY,
    annotation::FORCE_DELETE,
    annotation::AGENT_LABELS,
    annotation::MIG_PAUSED_GATES,
    annotation::SIMULATED_GPUS,
    annotation::STAGE_REASON,
    annotation::GPU_PRESENT_SOURCE,
    annotation::SPEC_HASH,
    annotation::NAMESPACE_CREATED_BY,
    webhook::CA_NOT_AFTER,
    webhook::NEXT_CA_SINCE,
    webhook::PREVIOUS_CA_NOT_AFTER,
    webhook::CERT_NOT_AFTER,
    webhook::CERT_NAMES,
    webhook::CERT_MANAGER_INJECT_CA_FROM,
];

/// Text with every credential-looking value hidden: `key=value` and `key: value` for every
/// credential key on a line (not just the first), `Bearer`/`Basic` credentials, the user part
/// of URLs (`https://user:pass@host`), JSON Web Tokens, and PEM private keys.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_key = false;
    for line in text.split_inclusive('\n') {
        let (body, end) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        if body.contains("-----BEGIN") && body.contains("PRIVATE KEY-----") {
            in_key = !body.contains("-----END");
            out.push_str("<redacted private key>");
            out.push_str(end);
            continue;
        }
        if in_key {
            if body.contains("-----END") {
                in_key = false;
            }
            continue;
        }
        out.push_str(&redact_line(body));
        out.push_str(end);
    }
    out
}

/// One line (no newline in it) with its credentials hidden.
pub fn redact_line(line: &str) -> String {
    let line = hide_url_users(line);
    let line = hide_key_values(&line);
    let line = hide_schemes(&line);
    hide_jwts(&line)
}

fn is_value_end(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | b'"' | b'\'' | b',' | b'}' | b']' | b')' | b';' | b'&' | b'\\'
    )
}

/// `scheme://user:pass@host` -> `scheme://<redacted>@host`.
fn hide_url_users(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The authority ends at the first of these; a user part is what precedes its last '@'.
        let authority_end = tail
            .bytes()
            .position(|b| matches!(b, b'/' | b'?' | b'#') || is_value_end(b))
            .unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) if at > 0 => {
                out.push_str(REDACTED);
                rest = &tail[at..];
            }
            _ => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// The first of `words` in `lower` at or after `at`: its position and length.
fn first_of(lower: &str, at: usize, words: &[&str]) -> Option<(usize, usize)> {
    words
        .iter()
        .filter_map(|w| lower[at..].find(w).map(|p| (at + p, w.len())))
        .min()
}

/// Where a value that starts at `from` ends.
fn value_end(bytes: &[u8], from: usize) -> usize {
    bytes[from..]
        .iter()
        .position(|b| is_value_end(*b))
        .map_or(bytes.len(), |p| from + p)
}

/// Every `<credential key><separator><value>` on the line.
fn hide_key_values(line: &str) -> String {
    let lower = line.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let mut out = String::with_capacity(line.len());
    let mut copied = 0;
    let mut at = 0;
    while let Some((pos, key)) = first_of(&lower, at, &KEYS) {
        // The rest of the key word, then the separator (":", "=", quotes, spaces, escapes).
        let mut i = pos + key;
        while i < bytes.len()
            && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'-'))
        {
            i += 1;
        }
        let sep_start = i;
        while i < bytes.len() && matches!(bytes[i], b':' | b'=' | b' ' | b'"' | b'\'' | b'\\') {
            i += 1;
        }
        if !lower[sep_start..i].contains([':', '=']) {
            at = pos + key;
            continue;
        }
        // "Bearer xyz": keep the scheme, hide the credential.
        for scheme in ["bearer ", "basic "] {
            if lower[i..].starts_with(scheme) {
                i += scheme.len();
            }
        }
        let end = value_end(bytes, i);
        if end > i {
            out.push_str(&line[copied..i]);
            out.push_str(REDACTED);
            copied = end;
        }
        at = end.max(pos + key);
    }
    out.push_str(&line[copied..]);
    out
}

/// `Bearer xyz` / `Basic xyz` anywhere on the line, with or without a key before it.
fn hide_schemes(line: &str) -> String {
    let lower = line.to_ascii_lowercase();
    let mut out = String::with_capacity(line.len());
    let mut copied = 0;
    let mut at = 0;
    while let Some((pos, len)) = first_of(&lower, at, &["bearer ", "basic "]) {
        let start = pos + len;
        let end = value_end(lower.as_bytes(), start);
        // Only something credential-shaped (long, no plain words like "basic usage").
        if end - start >= 16 && !line[start..end].starts_with(REDACTED) {
            out.push_str(&line[copied..start]);
            out.push_str(REDACTED);
            copied = end;
        }
        at = end;
    }
    out.push_str(&line[copied..]);
    out
}

/// JSON Web Tokens (service-account tokens among them): `eyJ<base64url>.<base64url>.<sig>`.
fn hide_jwts(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(pos) = rest.find("eyJ") {
        let tail = &rest[pos..];
        let len = tail
            .bytes()
            .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'=')))
            .unwrap_or(tail.len());
        let candidate = &tail[..len];
        out.push_str(&rest[..pos]);
        if candidate.matches('.').count() >= 2 && len >= 20 {
            out.push_str(REDACTED);
        } else {
            out.push_str(candidate);
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// Hides what may be secret in a Kubernetes object (as JSON) before it goes into the bundle:
/// `managedFields` go; every annotation keeps its key but not its value (except gpu-pilot's own,
/// [`KEPT_ANNOTATIONS`]); every `env` entry keeps its name and `valueFrom` but not its `value`;
/// an argument after a credential flag (`--token X`) is hidden; and every other string goes
/// through [`redact_line`].
pub fn sanitize(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.remove("managedFields");
            for (key, value) in map.iter_mut() {
                match (key.as_str(), value) {
                    ("annotations", Value::Object(ann)) => {
                        for (k, val) in ann.iter_mut() {
                            if !KEPT_ANNOTATIONS.contains(&k.as_str()) {
                                *val = Value::String(REDACTED.into());
                            }
                        }
                    }
                    ("env", Value::Array(items)) => {
                        for item in items.iter_mut() {
                            if let Some(value) = item.get_mut("value") {
                                *value = Value::String(REDACTED.into());
                            }
                            sanitize(item);
                        }
                    }
                    ("args" | "command", Value::Array(items)) => {
                        let mut hide_next = false;
                        for item in items.iter_mut() {
                            if let Value::String(s) = item {
                                let flag = is_credential_flag(s);
                                *s = if hide_next {
                                    REDACTED.into()
                                } else {
                                    redact_line(s)
                                };
                                hide_next = flag;
                            } else {
                                sanitize(item);
                            }
                        }
                    }
                    (_, value) => sanitize(value),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(sanitize),
        Value::String(s) => {
            let r = redact_line(s);
            if r != *s {
                *s = r;
            }
        }
        _ => {}
    }
}

/// `--token`, `-password`, `--client-secret` (a flag whose value is the next argument).
fn is_credential_flag(arg: &str) -> bool {
    let lower = arg.to_ascii_lowercase();
    lower.starts_with('-') && !lower.contains('=') && KEYS.iter().any(|k| lower.contains(k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_credential_on_a_line_is_hidden_not_only_the_first() {
        let line = "login user=a password=hunter2 token=abc123 api_key: k-9 and secret=\"s3\" done";
        let r = redact_line(line);
        for s in ["hunter2", "abc123", "k-9", "s3"] {
            assert!(!r.contains(s), "{s} leaked: {r}");
        }
        assert!(r.starts_with("login user=a password=<redacted>"), "{r}");
        assert!(r.ends_with("done"), "{r}");
        // Two of the same key.
        let r = redact_line("token=one token=two");
        assert_eq!(r, "token=<redacted> token=<redacted>");
    }

    #[test]
    fn logs_are_redacted_line_by_line_and_keep_their_shape() {
        let text = "start\nconnecting with token=abc123 to x\nAuthorization: Bearer eyJhbGci.x.y\n\
                    {\"password\": \"hunter2\", \"user\": \"a\"}\n-----BEGIN EC PRIVATE KEY-----\nMHcC\n\
                    -----END EC PRIVATE KEY-----\ntokens are fine as a word\nbasic usage is fine\nend";
        let r = redact(text);
        for secret in ["abc123", "eyJhbGci", "hunter2", "MHcC"] {
            assert!(!r.contains(secret), "{secret} leaked: {r}");
        }
        assert!(r.contains("Authorization: Bearer <redacted>"), "{r}");
        assert!(r.contains("tokens are fine as a word\n"), "{r}");
        assert!(r.contains("basic usage is fine\n"), "{r}");
        assert!(r.starts_with("start\n") && r.ends_with("\nend"), "{r}");
    }

    #[test]
    fn url_users_jwts_and_escaped_json_are_hidden() {
        let r = redact_line(
            "pulling https://bob:s3cr3t@registry.example.com/v2/x and git@github.com:a/b",
        );
        assert_eq!(
            r,
            "pulling https://<redacted>@registry.example.com/v2/x and git@github.com:a/b"
        );
        let r = redact_line("redis://:pw@cache:6379/0 http://host/path@v1");
        assert_eq!(r, "redis://<redacted>@cache:6379/0 http://host/path@v1");
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0ifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
        assert_eq!(redact_line(&format!("got {jwt}!")), "got <redacted>!");
        let r = redact_line(r#"{\"clientSecret\":\"xyz\",\"n\":1}"#);
        assert!(!r.contains("xyz"), "{r}");
        let r = redact_line("sent Basic dXNlcjpwYXNzd29yZA== upstream");
        assert_eq!(r, "sent Basic <redacted> upstream");
    }

    #[test]
    fn objects_keep_names_and_keys_but_not_values() {
        let mut pod = json!({
            "metadata": {
                "name": "train", "namespace": "team-a",
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"env\":[{\"value\":\"hunter2\"}]}",
                    "backup.example.com/target": "s3://AKIA:wJalr@bucket/x",
                    "gpupilot.io/gpu-memory": "20Gi",
                },
                "managedFields": [{"manager": "kubectl"}],
            },
            "spec": {
                "containers": [{
                    "name": "c",
                    "args": ["--token", "abc123", "--url=https://u:p@h/x", "--verbose"],
                    "command": ["run", "--db-password=pw1"],
                    "env": [
                        {"name": "HF_TOKEN", "value": "hf_secret"},
                        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                    ],
                }],
            },
            "status": {"message": "failed with password=pw2"},
        });
        sanitize(&mut pod);
        let text = pod.to_string();
        for s in [
            "hunter2",
            "AKIA",
            "wJalr",
            "abc123",
            "u:p@",
            "pw1",
            "hf_secret",
            "pw2",
            "managedFields",
        ] {
            assert!(!text.contains(s), "{s} leaked: {text}");
        }
        let ann = &pod["metadata"]["annotations"];
        assert_eq!(
            ann["kubectl.kubernetes.io/last-applied-configuration"],
            REDACTED
        );
        assert_eq!(ann["gpupilot.io/gpu-memory"], "20Gi");
        assert!(pod["metadata"].get("managedFields").is_none());
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["env"][0], json!({"name": "HF_TOKEN", "value": REDACTED}));
        assert_eq!(c["env"][1]["valueFrom"]["secretKeyRef"]["name"], "s");
        assert_eq!(c["args"][0], "--token");
        assert_eq!(c["args"][1], REDACTED);
        assert_eq!(c["args"][3], "--verbose");
        assert_eq!(pod["metadata"]["name"], "train");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Any text, including multi-byte characters around keys and separators, is redacted
        /// without a panic, and every line survives as a line.
        #[test]
        fn any_text_is_redacted_without_panicking(text in "(?s).{0,300}") {
            let r = redact(&text);
            proptest::prop_assert!(r.matches('\n').count() <= text.matches('\n').count());
            let _ = redact_line(&text.replace('\n', " "));
        }

        /// A credential after any of the keys, in any surroundings, never comes out.
        #[test]
        fn a_planted_credential_never_comes_out(
            before in "[ -~é日]{0,40}",
            key in proptest::sample::select(KEYS.to_vec()),
            upper in proptest::bool::ANY,
            sep in proptest::sample::select(vec!["=", ": ", "=\"", "\": \"", ":"]),
            secret in "[A-Za-z0-9+/]{8,24}",
            after in "( [ -~]{0,40})?",
        ) {
            let key = if upper { key.to_ascii_uppercase() } else { key.to_string() };
            let marker = format!("Q{secret}Z");
            let line = format!("{before} {key}{sep}{marker}{after}");
            let r = redact_line(&line);
            proptest::prop_assert!(!r.contains(&marker), "{} -> {}", line, r);
        }

        /// Objects of any shape are sanitized without a panic.
        #[test]
        fn any_object_is_sanitized(text in "[ -~]{0,200}") {
            let mut v = json!({"metadata": {"annotations": {"k": text.clone()}}, "env": [{"name": "A", "value": text.clone()}], "args": [text.clone(), "--token", text.clone()], "x": [text]});
            sanitize(&mut v);
            proptest::prop_assert_eq!(&v["metadata"]["annotations"]["k"], REDACTED);
            proptest::prop_assert_eq!(&v["env"][0]["value"], REDACTED);
            proptest::prop_assert_eq!(&v["args"][2], REDACTED);
        }
    }
}
