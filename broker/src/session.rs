//! STS session naming and tagging: who the session is for, as CloudTrail will show it.
//!
//! By default a session is named after the pod (`namespace.pod`), so an audit can tell which
//! pod did what (kube2iam#98, kiam#38: shared session names could not).

use sha2::{Digest, Sha256};

use crate::pods::Pod;

/// STS limits on `RoleSessionName` (and `SourceIdentity`).
pub const MIN_LEN: usize = 2;
pub const MAX_LEN: usize = 64;
/// Hex digits of the hash suffix added when a name is shortened.
const HASH_LEN: usize = 8;

/// Tag keys, in the style of EKS Pod Identity's session tags.
pub const TAG_NAMESPACE: &str = "kubernetes-namespace";
pub const TAG_POD: &str = "kubernetes-pod-name";
pub const TAG_SERVICE_ACCOUNT: &str = "kubernetes-service-account";
pub const TAG_NODE: &str = "kubernetes-node-name";
pub const TAG_CLUSTER: &str = "kubernetes-cluster-name";

fn is_session_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '=' | ',' | '.' | '@' | '-')
}

/// Makes `raw` a valid session name: characters outside `[\w+=,.@-]` become `-`; a name
/// longer than 64 is cut and ends in `-` plus a hash of the whole original, so two long
/// names that share a prefix stay distinct and the same pod always gets the same name; a
/// name shorter than 2 is padded with `-`.
pub fn fit(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| if is_session_char(c) { c } else { '-' })
        .collect();
    if s.len() > MAX_LEN {
        let digest = Sha256::digest(raw.as_bytes());
        let hex: String = digest
            .iter()
            .take(HASH_LEN / 2)
            .map(|b| format!("{b:02x}"))
            .collect();
        // Every char is ASCII now, so byte slicing is char slicing.
        s.truncate(MAX_LEN - HASH_LEN - 1);
        s.push('-');
        s.push_str(&hex);
    }
    while s.len() < MIN_LEN {
        s.push('-');
    }
    s
}

/// The default session name for a pod: `namespace.pod`.
pub fn default_name(pod: &Pod) -> String {
    fit(&format!("{}.{}", pod.namespace, pod.name))
}

/// Tag values may hold letters, digits, spaces and `_.:/=+-@`, up to 256 characters.
fn tag_value(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_alphanumeric()
                || matches!(c, ' ' | '_' | '.' | ':' | '/' | '=' | '+' | '-' | '@')
            {
                c
            } else {
                '-'
            }
        })
        .take(256)
        .collect()
}

/// Session tags describing the pod, sorted by key. Empty values are left out.
pub fn tags(pod: &Pod, cluster_name: Option<&str>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = [
        (TAG_NAMESPACE, pod.namespace.as_str()),
        (TAG_POD, pod.name.as_str()),
        (TAG_SERVICE_ACCOUNT, pod.service_account.as_str()),
        (TAG_NODE, pod.node.as_str()),
        (TAG_CLUSTER, cluster_name.unwrap_or("")),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| (k.to_string(), tag_value(v)))
    .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_valid_names() {
        assert_eq!(fit("default.myapp"), "default.myapp");
        assert_eq!(fit("a+b=c,d.e@f_g-h"), "a+b=c,d.e@f_g-h");
    }

    #[test]
    fn replaces_invalid_characters() {
        assert_eq!(fit("ns/pod name:x"), "ns-pod-name-x");
        assert_eq!(fit("caf\u{e9}"), "caf-");
    }

    #[test]
    fn pads_short_names() {
        assert_eq!(fit(""), "--");
        assert_eq!(fit("a"), "a-");
    }

    #[test]
    fn shortens_long_names_with_a_stable_distinct_suffix() {
        let long_a = format!("ns.{}a", "x".repeat(80));
        let long_b = format!("ns.{}b", "x".repeat(80));
        let a = fit(&long_a);
        let b = fit(&long_b);
        assert_eq!(a.len(), MAX_LEN);
        assert_eq!(b.len(), MAX_LEN);
        assert_ne!(a, b);
        assert_eq!(a, fit(&long_a));
        assert!(a.starts_with("ns.xxx"));
        assert!(a.chars().all(is_session_char));
        // Exactly 64 is not shortened.
        let exact = "y".repeat(64);
        assert_eq!(fit(&exact), exact);
    }

    #[test]
    fn default_name_is_namespace_dot_pod() {
        let pod = Pod {
            namespace: "team-a".into(),
            name: "web-0".into(),
            ..Pod::default()
        };
        assert_eq!(default_name(&pod), "team-a.web-0");
    }

    #[test]
    fn tags_describe_the_pod() {
        let pod = Pod {
            namespace: "default".into(),
            name: "myapp".into(),
            service_account: "myapp-sa".into(),
            node: "".into(),
            ..Pod::default()
        };
        let t = tags(&pod, Some("prod-1"));
        assert_eq!(
            t,
            vec![
                (TAG_CLUSTER.to_string(), "prod-1".to_string()),
                (TAG_NAMESPACE.to_string(), "default".to_string()),
                (TAG_POD.to_string(), "myapp".to_string()),
                (TAG_SERVICE_ACCOUNT.to_string(), "myapp-sa".to_string()),
            ]
        );
    }
}
