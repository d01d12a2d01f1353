//! Checks for the broker's parsers of pod-controlled and operator-controlled text: the role,
//! external-id and session-name annotations, the namespace restrictions (kube2iam globs,
//! kiam regexes), the base ARN, and the pods file. Self-contained (only `meshiam_broker`,
//! `serde_json` and `std`), so `broker/tests/fuzz_corpus.rs` includes this file as is.

use std::path::Path;

use meshiam_broker::file_source;
use meshiam_broker::policy::{
    ALLOWED_ROLES, BaseArn, EXTERNAL_ID, PERMITTED, PolicyConfig, ROLE, Restriction, RolePolicy,
    SESSION_NAME,
};
use serde_json::json;

/// Splits the input into `n` strings at NUL bytes (missing ones are empty).
fn fields(data: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(data);
    let mut out: Vec<String> = text.splitn(n, '\0').map(str::to_owned).collect();
    out.resize(n, String::new());
    out
}

fn is_session_name(s: &str) -> bool {
    (2..=64).contains(&s.len())
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '=' | ',' | '.' | '@' | '-')
        })
}

/// A pod with these annotations in a namespace with these, through the broker's own pods-file
/// parser (so the check does not depend on the `Pod` struct's fields).
fn pod_and_namespace(
    pod_annotations: serde_json::Value,
    ns_annotations: serde_json::Value,
) -> Option<(meshiam_broker::pods::Pod, meshiam_broker::pods::Namespace)> {
    let doc = json!({
        "pods": [{"namespace": "fuzz", "name": "app", "ips": ["198.18.0.10"],
                  "annotations": pod_annotations}],
        "namespaces": [{"name": "fuzz", "annotations": ns_annotations}],
    });
    let (mut pods, mut nss) =
        file_source::parse(Path::new("fuzz.yaml"), &doc.to_string(), None).ok()?;
    Some((pods.pop()?, nss.pop()?))
}

/// The role policy: whatever a pod or namespace annotation says, evaluating never panics; a
/// role it grants is a well-formed role ARN that resolves to itself; the session name and
/// external id it sends to STS are within STS's limits; `decide` refuses exactly what the
/// verdict does not permit; the base ARN parses back to itself.
pub fn policy(data: &[u8]) {
    let f = fields(data, 7);
    let (mode, base, role, external_id, session_name, allowed, permitted) =
        (&f[0], &f[1], &f[2], &f[3], &f[4], &f[5], &f[6]);

    let base_arn = BaseArn::parse(base).ok();
    if let Some(b) = &base_arn {
        assert!(b.as_str().ends_with('/'));
        assert_eq!(BaseArn::parse(b.as_str()).as_ref(), Ok(b));
    }
    let restriction = match mode.bytes().next().unwrap_or(0) % 3 {
        0 => Restriction::Off,
        1 => Restriction::AllowedRoles,
        _ => Restriction::Permitted,
    };
    let default_role = mode.get(1..).filter(|d| !d.is_empty()).map(str::to_owned);
    let policy = RolePolicy::new(PolicyConfig {
        base_arn: base_arn.clone(),
        default_role,
        restriction,
        ..PolicyConfig::default()
    });

    let mut pod_ann = serde_json::Map::new();
    for (k, v) in [
        (ROLE, role),
        (EXTERNAL_ID, external_id),
        (SESSION_NAME, session_name),
    ] {
        if !v.is_empty() {
            pod_ann.insert(k.to_owned(), json!(v));
        }
    }
    let mut ns_ann = serde_json::Map::new();
    for (k, v) in [(ALLOWED_ROLES, allowed), (PERMITTED, permitted)] {
        if !v.is_empty() {
            ns_ann.insert(k.to_owned(), json!(v));
        }
    }
    let Some((pod, ns)) = pod_and_namespace(pod_ann.into(), ns_ann.into()) else {
        // Annotation values the pods file refuses never reach the policy.
        return;
    };

    // The role name on its own: a refusal is an error.
    if let Ok(arn) = policy.resolve_arn(role) {
        assert!(arn.as_str().starts_with("arn:"), "{arn:?}");
        assert_eq!(
            policy.resolve_arn(arn.as_str()).as_ref(),
            Ok(&arn),
            "not a fixed point"
        );
        // No `.` or `..` segment: a glob such as `team/*` must not match `team/../x`.
        let (_, resource) = arn.as_str().split_once(":role/").expect("a role ARN");
        assert!(
            resource.split('/').all(|s| s != "." && s != ".."),
            "{arn:?}"
        );
    }

    for namespace in [Some(&ns), None] {
        let evaluated = policy.evaluate(&pod, namespace);
        let decided = policy.decide(&pod, namespace);
        match &evaluated {
            Ok(d) => {
                assert!(d.role_arn.as_str().starts_with("arn:"), "{:?}", d.role_arn);
                assert_eq!(
                    policy.resolve_arn(d.role_arn.as_str()).as_ref(),
                    Ok(&d.role_arn)
                );
                assert_eq!(d.request.role_arn, d.role_arn.as_str());
                assert!(!d.role_name().is_empty());
                assert!(!d.role_name().contains('/'));
                assert!(
                    is_session_name(&d.request.session_name),
                    "session name {:?}",
                    d.request.session_name
                );
                if let Some(e) = &d.request.external_id {
                    assert!(
                        (2..=1224).contains(&e.len()),
                        "external id length {}",
                        e.len()
                    );
                    assert!(!e.chars().any(char::is_whitespace));
                }
                assert_eq!(decided.is_ok(), d.verdict.permitted);
                if namespace.is_none() && restriction != Restriction::Off {
                    // Unknown namespace: only the operator's default role gets through.
                    assert!(
                        !d.verdict.permitted
                            || d.source == meshiam_broker::policy::RoleSource::Default
                    );
                }
            }
            Err(_) => assert!(decided.is_err()),
        }
    }
}

/// The pods file: never panics; what it accepts has non-empty, unique names, and with a node
/// name only that node's pods (or pods with none) are kept.
pub fn pods_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for node in [None, Some("node-1")] {
        let Ok((pods, namespaces)) = file_source::parse(Path::new("fuzz.yaml"), text, node) else {
            continue;
        };
        let mut seen = std::collections::HashSet::new();
        for p in &pods {
            assert!(!p.namespace.trim().is_empty() && !p.name.trim().is_empty());
            assert!(
                seen.insert((p.namespace.clone(), p.name.clone())),
                "duplicate pod"
            );
            if let Some(n) = node {
                assert!(
                    p.node.is_empty() || p.node == n,
                    "pod of node {:?} kept",
                    p.node
                );
            }
        }
        let mut ns_seen = std::collections::HashSet::new();
        for n in &namespaces {
            assert!(!n.name.trim().is_empty());
            assert!(ns_seen.insert(n.name.clone()), "duplicate namespace");
        }
    }
}
